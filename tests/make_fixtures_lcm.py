#!/usr/bin/env python3
"""Reference fixtures for latent-consistency (LCM-distilled) Stable Diffusion, ungated and gated.

Run from the repository root, after tests/make_fixtures.py (it reuses tests/fixtures/sd1's text
encoder, VAE and tokenizer, so the fixture holds only its UNet, its scheduler and references):

    python3 tests/make_fixtures_lcm.py

An LCM model (e.g. SimianLuo/LCM_Dreamshaper_v7) is SD 1.5 with a guidance embedding: its UNet has
`time_cond_proj_dim`, and the time embedding adds `cond_proj(w_embedding)` to the sinusoidal
timestep projection, where `w_embedding` is the sinusoidal embedding of `(guidance_scale - 1) * 1000`.
There is no classifier-free guidance (one batch), and diffusers' `LCMScheduler` samples in 4-8 steps.

The gate without classifier-free guidance (tgate 1.0.0 crashes at the gate step there), as the
project defines it (crates/tgate/src/tgate.rs, README "T-GATE without guidance"):
  * steps are counted from 0 (LCM's order is 1, there are no warm-up iterations);
  * before step `gate_step - 1` every cross-attention layer is computed;
  * at step `gate_step - 1` each layer computes its output and keeps it (the single batch: there
    are no guidance halves to average);
  * from step `gate_step` on each layer returns what it kept, without computing;
  * self-attention is always computed; the batch stays 1.
It is written here independently of the Rust code, with diffusers attention processors.

  tests/fixtures/lcm/unet/                      config.json (time_cond_proj_dim) + weights
  tests/fixtures/lcm/scheduler/                 LCMScheduler config as LCM_Dreamshaper_v7 ships it
  tests/fixtures/lcm/reference.safetensors      pipe.noise, pipe.step_noise, pipe.lcm.{full,gated},
                                                unet.* (one forward with timestep_cond), sched.lcm.*
  tests/fixtures/lcm/reference.json             prompt, steps, guidance, gate, versions
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

NAME = "lcm"
SEED = 500
TIME_COND_PROJ_DIM = 32
STEPS = 4
GUIDANCE = 8.5
GATE_STEP = 2
SCHED_STEPS = 8
# scheduler/scheduler_config.json of SimianLuo/LCM_Dreamshaper_v7.
LCM_SCHEDULER_CONFIG = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


class GateState:
    def __init__(self):
        self.step = 0


class GatedCrossAttention:
    """The no-guidance gate of one cross-attention layer (see the module docstring)."""

    def __init__(self, state: GateState, gate_step: int):
        self.state, self.gate_step, self.kept = state, gate_step, None
        self.inner = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if self.state.step >= self.gate_step:
            assert self.kept is not None, "reused before it was kept"
            return self.kept
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.state.step == self.gate_step - 1:
            self.kept = out
        return out


def make_pipe(te, unet, vae, tok):
    pipe = LatentConsistencyModelPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=LCMScheduler.from_config(LCM_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, noise, step_noise, gate_step=None):
    import copy

    pipe.unet = copy.deepcopy(pipe.unet)
    state = GateState()
    procs = {}
    for name in pipe.unet.attn_processors:
        gated = gate_step is not None and name.endswith("attn2.processor")
        procs[name] = GatedCrossAttention(state, gate_step) if gated else AttnProcessor()
    kept = [p for p in procs.values() if isinstance(p, GatedCrossAttention)]
    assert gate_step is None or kept
    # (set_attn_processor empties the dict it is given.)
    pipe.unet.set_attn_processor(procs)

    def advance(p, i, t, kwargs):
        state.step = i + 1
        return kwargs

    with mf.noise_source(step_noise) as st, torch.no_grad():
        out = pipe(mf.PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=mf.HEIGHT,
                   width=mf.WIDTH, latents=noise.clone(), output_type="latent",
                   callback_on_step_end=advance).images
    # LCM draws noise after every step but the last.
    assert st["used"] == STEPS - 1, st["used"]
    assert all(p.kept is not None for p in kept)
    return out


def unet_refs(pipe, g, R):
    """One UNet forward with a guidance embedding, and the embedding itself."""
    w = torch.tensor(GUIDANCE - 1).repeat(1)
    emb = pipe.get_guidance_scale_embedding(w, embedding_dim=TIME_COND_PROJ_DIM)
    sample = mf.randn((1, 4, 8, 8), g)
    ctx = mf.randn((1, 77, pipe.unet.config.cross_attention_dim), g)
    with torch.no_grad():
        out = pipe.unet(sample, 599, encoder_hidden_states=ctx, timestep_cond=emb).sample
        plain = pipe.unet(sample, 599, encoder_hidden_states=ctx).sample
    assert (out - plain).abs().max() > 1e-4, "the guidance embedding changed nothing"
    R.update({"unet.sample": sample, "unet.timestep": torch.tensor([599.0]),
              "unet.encoder_hidden_states": ctx, "unet.timestep_cond": emb, "unet.out": out,
              "unet.guidance": torch.tensor([GUIDANCE])})


def scheduler_refs(g, R, meta):
    s = LCMScheduler.from_config(LCM_SCHEDULER_CONFIG)
    s.set_timesteps(SCHED_STEPS)
    n = len(s.timesteps)
    x0 = mf.randn((1, 4, 8, 8), g)
    outputs = mf.randn((n, 1, 4, 8, 8), g)
    step_noise = mf.randn((n, 1, 4, 8, 8), g)
    sample = x0 * s.init_noise_sigma
    samples, scaled = [sample.clone()], []
    with mf.noise_source(step_noise) as st, torch.no_grad():
        for i, t in enumerate(s.timesteps):
            scaled.append(s.scale_model_input(sample, t).clone())
            sample = s.step(outputs[i], t, sample).prev_sample
            samples.append(sample.clone())
    assert st["used"] == n - 1
    R.update({"sched.lcm.timesteps": s.timesteps.to(torch.float32),
              "sched.lcm.init_noise_sigma": torch.tensor([float(s.init_noise_sigma)]),
              "sched.lcm.x0": x0, "sched.lcm.samples": torch.stack(samples),
              "sched.lcm.scaled_inputs": torch.stack(scaled), "sched.lcm.model_outputs": outputs,
              "sched.lcm.step_noise": step_noise})
    meta["scheduler_steps"] = SCHED_STEPS
    meta["scheduler_kinds"] = ["lcm"]
    meta["lcm_timesteps"] = [int(t) for t in s.timesteps]


def main():
    mf.setup_determinism()
    sd1 = mf.FIX / "sd1"
    tok = CLIPTokenizer.from_pretrained(sd1 / "tokenizer")
    te = CLIPTextModel.from_pretrained(sd1 / "text_encoder", dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(sd1, subfolder="vae").eval()
    cfg = dict(mf.unet_config("sd1"), time_cond_proj_dim=TIME_COND_PROJ_DIM)
    unet = UNet2DConditionModel(**cfg)
    assert unet.time_embedding.cond_proj is not None
    mf.randomise_(unet, mf.gen(SEED))
    unet.eval()
    unet.requires_grad_(False)
    out = mf.FIX / NAME
    if out.exists():
        shutil.rmtree(out)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(LCM_SCHEDULER_CONFIG, indent=2) + "\n")

    pipe = make_pipe(te, unet, vae, tok)
    g = mf.gen(SEED + 1)
    noise = mf.randn((1, 4, 8, 8), g)
    step_noise = mf.randn((STEPS, 1, 4, 8, 8), g)
    R = {"pipe.noise": noise, "pipe.step_noise": step_noise}
    full = run(pipe, noise, step_noise)
    gated = run(pipe, noise, step_noise, GATE_STEP)
    again = run(pipe, noise, step_noise)
    assert torch.equal(full, again), "runs are not repeatable"
    R["pipe.lcm.full"], R["pipe.lcm.gated"] = full, gated
    diff = (full - gated).abs().max().item()
    assert mf.max_abs(full) < mf.SANE_MAX and diff > 1e-4, (mf.max_abs(full), diff)
    meta = {
        "prompt": mf.PROMPT,
        "steps": STEPS,
        "guidance": GUIDANCE,
        "width": mf.WIDTH,
        "height": mf.HEIGHT,
        "gate_step": GATE_STEP,
        "gate_definition": "no guidance: each cross-attention keeps its output at step gate_step - 1 "
                           "and returns it from step gate_step on",
        "shares": "tests/fixtures/sd1: text_encoder, vae, tokenizer",
        "unet_config": mf.json_safe(cfg),
        "checks": {"max_abs_full": mf.max_abs(full), "gate_changes_by": diff},
    }
    unet_refs(pipe, g, R)
    scheduler_refs(g, R, meta)
    meta["versions"] = mf.versions()
    save_file({k: v.contiguous() for k, v in R.items()}, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  {NAME}: {mf.dir_size(out) / 1024:.0f} KiB, checks {meta['checks']}")


if __name__ == "__main__":
    main()
