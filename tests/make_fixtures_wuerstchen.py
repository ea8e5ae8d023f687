#!/usr/bin/env python3
"""Reference fixtures for the Würstchen v2 port (Stage C prior, Stage B DiffNeXt, Stage A Paella) and for
the gated Stage C defined by this project.

Run from the repository root (after tests/make_fixtures.py, whose tiny CLIP vocabulary it reuses):

    python3 tests/make_fixtures_wuerstchen.py

It writes tests/fixtures/wuerstchen/: a tiny random-weight pipeline in the folder layout of diffusers'
`WuerstchenCombinedPipeline.save_pretrained` (decoder components at the top, prior components in `prior_*`
subfolders) and reference.{safetensors,json}. Everything runs on the CPU in float32 with fixed seeds.

The gated prior ("T-GATE for Stage C") is defined here on top of diffusers' own `WuerstchenPrior` through
forward hooks on each AttnBlock's `attention` module (the model is not copied):

  * before the gate step: normal computation, classifier-free guidance with the [cond, uncond] batch;
  * at the gate step (the last step of the semantics-planning phase, index gate_step - 1), per AttnBlock:
    delta = attention(norm_x, kv = [image tokens, text tokens]) - attention(norm_x, kv = image tokens),
    averaged over the conditional and unconditional halves;
  * after it: one batch (no guidance), and each AttnBlock's attention is attention(norm_x, image tokens) + delta.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (shared helpers: randomisation, determinism, versions)

from diffusers.pipelines.deprecated.wuerstchen import (  # noqa: E402
    PaellaVQModel,
    WuerstchenCombinedPipeline,
    WuerstchenDecoderPipeline,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    WuerstchenPriorPipeline,
)
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import AttnBlock  # noqa: E402
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import (  # noqa: E402
    DEFAULT_STAGE_C_TIMESTEPS,
)
from diffusers.schedulers import DDPMWuerstchenScheduler  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

OUT = mf.FIX / "wuerstchen"
PROMPT = "a tiny red fox"
NEGATIVE_PROMPT = "blurry"
HEIGHT, WIDTH = 256, 128  # prior latent 6 x 3, decoder latent 64 x 32, image 256 x 128
PRIOR_STEPS = 6
PRIOR_GUIDANCE = 4.0
DECODER_STEPS = 4
DECODER_GUIDANCE_ON = 2.0
GATE_STEPS = [2, 4]
SCHED_STEPS = 6

PRIOR_CONFIG = dict(c_in=16, c=32, c_cond=32, c_r=16, depth=2, nhead=4, dropout=0.0)
DECODER_CONFIG = dict(
    c_in=4,
    c_out=4,
    c_r=16,
    patch_size=2,
    c_cond=32,
    c_hidden=[16, 32],
    nhead=[-1, 4],
    blocks=[1, 1],
    level_config=["CT", "CTA"],
    inject_effnet=[True, True],
    effnet_embd=16,
    clip_embd=24,
    kernel_size=3,
    dropout=0.0,
)
VQGAN_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    up_down_scale_factor=2,
    levels=2,
    bottleneck_blocks=2,
    embed_dim=16,
    latent_channels=4,
    num_vq_embeddings=32,
    scale_factor=0.3764,
)

_RANDN_MODULES = [
    "diffusers.schedulers.scheduling_ddpm_wuerstchen",
    "diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior",
    "diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen",
]


@contextmanager
def step_noise(noise: torch.Tensor | None):
    """The scheduler's per-step `randn_tensor` hands out `noise[0], noise[1], ...`; any other draw fails.
    On exit every tensor must have been consumed."""
    import importlib

    mods = [importlib.import_module(m) for m in _RANDN_MODULES]
    saved = [(m, m.randn_tensor) for m in mods]
    state = {"used": 0}

    def forbidden(*a, **k):
        raise AssertionError("unexpected randn_tensor call (hidden randomness)")

    def feed(shape, generator=None, device=None, dtype=None, layout=None, **kw):
        i = state["used"]
        assert noise is not None and i < len(noise), f"scheduler wanted noise #{i}"
        assert tuple(shape) == tuple(noise[i].shape), (shape, noise[i].shape)
        state["used"] += 1
        return noise[i].clone().to(dtype=dtype or torch.float32)

    for m, _ in saved:
        m.randn_tensor = forbidden
    mods[0].randn_tensor = feed
    try:
        yield state
        if noise is not None:
            assert state["used"] == len(noise), f"{state['used']} of {len(noise)} noise tensors used"
    finally:
        for m, f in saved:
            m.randn_tensor = f


def text_config(tok: CLIPTokenizer, hidden: int, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=layers,
        hidden_act="gelu",
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        projection_dim=hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
        dropout=0.0,
    )


def finish(m, seed):
    mf.randomise_(m, mf.gen(seed))
    m.eval()
    m.requires_grad_(False)
    return m


def build(tok):
    prior_te = finish(CLIPTextModel(text_config(tok, 32, 2)), 11)
    te = finish(CLIPTextModel(text_config(tok, 24, 2)), 12)
    prior = finish(WuerstchenPrior(**PRIOR_CONFIG), 13)
    decoder = finish(WuerstchenDiffNeXt(**DECODER_CONFIG), 14)
    vqgan = finish(PaellaVQModel(**VQGAN_CONFIG), 15)
    with torch.no_grad():
        # Keep the final divisions away from blow-ups (see ../shared notes): small output projections.
        prior.out[1].weight.mul_(0.05)
        decoder.clf[1].weight.mul_(0.05)
    return prior_te, te, prior, decoder, vqgan


def encode(tok, te, text):
    t = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return te(t.input_ids, attention_mask=t.attention_mask).last_hidden_state


class PriorGate:
    """The gated Stage C, through hooks on diffusers' modules (see the module docstring)."""

    def __init__(self, prior: WuerstchenPrior):
        self.mode = "compute"
        self.deltas: dict[int, torch.Tensor] = {}
        self.inner = False
        self.handles = []
        blocks = [b for b in prior.blocks if isinstance(b, AttnBlock)]
        for idx, block in enumerate(blocks):
            self.handles.append(
                block.attention.register_forward_hook(self.hook(idx), with_kwargs=True)
            )

    def hook(self, idx):
        def run(module, args, kwargs, output):
            if self.inner or self.mode == "compute":
                return None
            norm_x = args[0] if args else kwargs["hidden_states"]
            kv = kwargs["encoder_hidden_states"]
            n_img = norm_x.shape[2] * norm_x.shape[3]
            self.inner = True
            try:
                image_only = module(norm_x, encoder_hidden_states=kv[:, :n_img])
            finally:
                self.inner = False
            if self.mode == "store":
                d = output - image_only
                half = d.shape[0] // 2
                self.deltas[idx] = (d[:half] + d[half:]) / 2 if half else d
                return None
            assert self.mode == "reuse"
            return image_only + self.deltas[idx]

        return run

    def remove(self):
        for h in self.handles:
            h.remove()


def run_prior_loop(prior, sched, cond, uncond, noise, step_noise_t, steps, guidance, gate_step):
    """The prior pipeline's loop (as WuerstchenPriorPipeline.__call__) with the gate; gate_step None = plain."""
    gate = PriorGate(prior) if gate_step is not None else None
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    latents = noise * sched.init_noise_sigma
    with step_noise(step_noise_t):
        for i, t in enumerate(timesteps[:-1]):
            planning = gate_step is None or i < gate_step
            if gate is not None:
                gate.mode = "compute" if i < gate_step - 1 else ("store" if i == gate_step - 1 else "reuse")
            ratio = t.expand(latents.size(0))
            if planning:
                pred = prior(torch.cat([latents] * 2), r=torch.cat([ratio] * 2), c=torch.cat([cond, uncond]))
                p_text, p_uncond = pred.chunk(2)
                pred = torch.lerp(p_uncond, p_text, guidance)
            else:
                pred = prior(latents, r=ratio, c=cond)
            latents = sched.step(model_output=pred, timestep=ratio, sample=latents).prev_sample
    if gate is not None:
        assert len(gate.deltas) == PRIOR_CONFIG["depth"]
        gate.remove()
    return latents * 42.0 - 1.0


def main():
    mf.setup_determinism()
    versions = mf.versions()
    print("versions:", versions)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    src_tok = mf.FIX / "sd2" / "tokenizer"  # tiny real-BPE vocabulary, pad token "!" as Würstchen's
    tok = CLIPTokenizer.from_pretrained(src_tok)
    prior_te, te, prior, decoder, vqgan = build(tok)
    sched = DDPMWuerstchenScheduler()
    prior_sched = DDPMWuerstchenScheduler()

    # ---- save in the combined layout
    pipe = WuerstchenCombinedPipeline(
        tokenizer=tok, text_encoder=te, decoder=decoder, scheduler=sched, vqgan=vqgan,
        prior_tokenizer=tok, prior_text_encoder=prior_te, prior_prior=prior, prior_scheduler=prior_sched,
    )
    pipe.save_pretrained(OUT, safe_serialization=True)
    for sub in ("tokenizer", "prior_tokenizer"):  # the real vocab.json + merges.txt layout
        shutil.rmtree(OUT / sub)
        shutil.copytree(src_tok, OUT / sub)
    for sub in ("text_encoder", "prior_text_encoder"):  # released checkpoints carry `text_model.`
        f = OUT / sub / "model.safetensors"
        sd = mf.load_file(str(f))
        save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}, str(f),
                  metadata={"format": "pt"})
    # reload component by component (diffusers 0.42.1 cannot reload the combined pipeline as a whole)
    tok = CLIPTokenizer.from_pretrained(OUT / "tokenizer")
    prior_tok = CLIPTokenizer.from_pretrained(OUT / "prior_tokenizer")
    te = CLIPTextModel.from_pretrained(OUT / "text_encoder").eval()
    prior_te = CLIPTextModel.from_pretrained(OUT / "prior_text_encoder").eval()
    prior2 = WuerstchenPrior.from_pretrained(OUT, subfolder="prior_prior").eval()
    decoder2 = WuerstchenDiffNeXt.from_pretrained(OUT, subfolder="decoder").eval()
    vqgan2 = PaellaVQModel.from_pretrained(OUT, subfolder="vqgan").eval()
    for a, b in ((prior, prior2), (decoder, decoder2), (vqgan, vqgan2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    prior, decoder, vqgan = prior2, decoder2, vqgan2
    sched = DDPMWuerstchenScheduler.from_pretrained(OUT, subfolder="scheduler")
    prior_sched = DDPMWuerstchenScheduler.from_pretrained(OUT, subfolder="prior_scheduler")

    R: dict[str, torch.Tensor] = {}
    g = mf.gen(7000)
    with torch.no_grad():
        # ---- text encoders (with the padding mask Würstchen passes)
        R["prior_text.cond"] = encode(prior_tok, prior_te, PROMPT)
        R["prior_text.uncond"] = encode(prior_tok, prior_te, NEGATIVE_PROMPT)
        R["prior_text.empty"] = encode(prior_tok, prior_te, "")
        R["decoder_text.cond"] = encode(tok, te, PROMPT)
        R["decoder_text.uncond"] = encode(tok, te, NEGATIVE_PROMPT)

        # ---- Stage C forward
        x = mf.randn([2, 16, 6, 3], g)
        r = torch.tensor([0.73, 0.21])
        c = mf.randn([2, 77, 32], g)
        R["prior.x"], R["prior.r"], R["prior.c"] = x, r, c
        R["prior.out"] = prior(x, r=r, c=c)

        # ---- Stage B forward: effnet 12x12 is resized up to 16x16 (level 0) and down to 8x8 (level 1)
        x = mf.randn([2, 4, 32, 32], g)
        r = torch.tensor([0.8, 0.35])
        effnet = mf.randn([2, 16, 12, 12], g)
        clip = mf.randn([2, 77, 24], g)
        R["decoder.x"], R["decoder.r"], R["decoder.effnet"], R["decoder.clip"] = x, r, effnet, clip
        R["decoder.out"] = decoder(x, r=r, effnet=effnet, clip=clip)

        # ---- Stage A decode (no quantisation, no clamp)
        lat = mf.randn([1, 4, 16, 8], g)
        R["vqgan.latents"] = lat
        R["vqgan.out"] = vqgan.decode(lat).sample

        # ---- antialiased bicubic resize (align_corners=True), up, down and mixed
        img = mf.randn([1, 3, 7, 5], g)
        R["resize.in"] = img
        for h, w in ((16, 11), (3, 4), (9, 2), (1, 1)):
            R[f"resize.{h}x{w}"] = torch.nn.functional.interpolate(
                img, size=(h, w), mode="bicubic", antialias=True, align_corners=True)

        # ---- scheduler: timesteps and a chain of steps with given model outputs and noise
        s = DDPMWuerstchenScheduler()
        s.set_timesteps(SCHED_STEPS)
        R["sched.timesteps"] = s.timesteps.clone()
        s.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
        R["sched.default_timesteps"] = s.timesteps.clone()
        for name, scaler in (("sched", 1.0), ("sched_scaled", 2.0), ("sched_scaled_down", 0.5)):
            s = DDPMWuerstchenScheduler(scaler=scaler)
            s.set_timesteps(SCHED_STEPS)
            sample = mf.randn([1, 16, 6, 3], g)
            outs = mf.randn([SCHED_STEPS, 1, 16, 6, 3], g)
            noise = mf.randn([SCHED_STEPS, 1, 16, 6, 3], g)
            chain = [sample]
            with step_noise(noise):
                for i, t in enumerate(s.timesteps[:-1]):
                    sample = s.step(outs[i], t.expand(1), sample).prev_sample
                    chain.append(sample)
            R[f"{name}.model_output"], R[f"{name}.noise"] = outs, noise
            R[f"{name}.samples"] = torch.stack(chain)

        # ---- the pipeline, ungated, as diffusers runs it (prior pipe, then decoder pipe)
        ph, pw = math.ceil(HEIGHT / 42.67), math.ceil(WIDTH / 42.67)
        dh, dw = int(ph * 10.67), int(pw * 10.67)
        prior_noise = mf.randn([1, 16, ph, pw], g)
        prior_step = mf.randn([PRIOR_STEPS, 1, 16, ph, pw], g)
        dec_noise = mf.randn([1, 4, dh, dw], g)
        dec_step = mf.randn([DECODER_STEPS, 1, 4, dh, dw], g)
        R["pipe.prior_noise"], R["pipe.prior_step_noise"] = prior_noise, prior_step
        R["pipe.decoder_noise"], R["pipe.decoder_step_noise"] = dec_noise, dec_step

        prior_pipe = WuerstchenPriorPipeline(tokenizer=prior_tok, text_encoder=prior_te, prior=prior,
                                             scheduler=prior_sched)
        dec_pipe = WuerstchenDecoderPipeline(tokenizer=tok, text_encoder=te, decoder=decoder, scheduler=sched,
                                             vqgan=vqgan)
        for p in (prior_pipe, dec_pipe):
            p.set_progress_bar_config(disable=True)

        def prior_run(noise, step_n, **kw):
            with step_noise(step_n):
                return prior_pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=HEIGHT, width=WIDTH,
                                  latents=noise.clone(), output_type="pt", return_dict=False, **kw)[0]

        def decoder_run(emb, guidance, output_type):
            with step_noise(dec_step):
                return dec_pipe(image_embeddings=emb, prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT,
                                num_inference_steps=DECODER_STEPS, guidance_scale=guidance,
                                latents=dec_noise.clone(), output_type=output_type).images

        prior_lat = prior_run(prior_noise, prior_step, num_inference_steps=PRIOR_STEPS,
                              guidance_scale=PRIOR_GUIDANCE)
        R["pipe.prior_latents"] = prior_lat
        for tag, guidance in (("pipe", 0.0), ("pipe_dg", DECODER_GUIDANCE_ON)):
            R[f"{tag}.decoder_latents"] = decoder_run(prior_lat, guidance, "latent")
            R[f"{tag}.image"] = decoder_run(prior_lat, guidance, "pt")
            again = vqgan.decode(R[f"{tag}.decoder_latents"] * 0.3764).sample.clamp(0, 1)
            assert torch.equal(again, R[f"{tag}.image"]), tag
        del R["pipe_dg.image"]  # the decoder latents cover it (Stage A is tested by pipe.image); saves 400 kB

        # the prior's default schedule (DEFAULT_STAGE_C_TIMESTEPS: 29 steps)
        n_default = len(DEFAULT_STAGE_C_TIMESTEPS) - 1
        default_step = mf.randn([n_default, 1, 16, ph, pw], g)
        R["prior_default.step_noise"] = default_step
        R["prior_default.prior_latents"] = prior_run(prior_noise, default_step,
                                                     timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                                                     guidance_scale=PRIOR_GUIDANCE)

        # ---- the gated prior (this project's definition, hooks on diffusers' modules)
        cond, uncond = R["prior_text.cond"], R["prior_text.uncond"]
        plain = run_prior_loop(prior, prior_sched, cond, uncond, prior_noise, prior_step, PRIOR_STEPS,
                               PRIOR_GUIDANCE, None)
        err = (plain - prior_lat).abs().max().item()
        assert err <= 1e-6 * max(1.0, prior_lat.abs().max().item()), f"own loop differs from diffusers: {err}"
        gate_info = {}
        for gs in GATE_STEPS:
            gated = run_prior_loop(prior, prior_sched, cond, uncond, prior_noise, prior_step, PRIOR_STEPS,
                                   PRIOR_GUIDANCE, gs)
            R[f"gate{gs}.prior_latents"] = gated
            R[f"gate{gs}.decoder_latents"] = decoder_run(gated, 0.0, "latent")
            diff = (gated - prior_lat).abs().max().item()
            gate_info[str(gs)] = {"max_abs_diff_to_ungated_prior_latents": diff}
            assert diff > 1e-4, f"gate {gs} changed nothing"

    for k, v in R.items():
        assert torch.isfinite(v).all(), k
        assert v.abs().max() < 1e4, (k, v.abs().max())
    save_file({k: v.contiguous().float() for k, v in R.items()}, str(OUT / "reference.safetensors"))
    meta = {
        "description": "tiny random-weight Würstchen v2 (combined layout) and references; see "
                       "tests/make_fixtures_wuerstchen.py",
        "versions": versions,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "height": HEIGHT,
        "width": WIDTH,
        "prior_steps": PRIOR_STEPS,
        "prior_guidance": PRIOR_GUIDANCE,
        "decoder_steps": DECODER_STEPS,
        "decoder_guidance": 0.0,
        "decoder_guidance_on": DECODER_GUIDANCE_ON,
        "gate_steps": GATE_STEPS,
        "gate": gate_info,
        "sched_steps": SCHED_STEPS,
        "sched_scalers": {"sched": 1.0, "sched_scaled": 2.0, "sched_scaled_down": 0.5},
        "prior_latent": [ph, pw],
        "decoder_latent": [dh, dw],
        "tensors": {k: list(v.shape) for k, v in R.items()},
    }
    with open(OUT / "reference.json", "w") as f:
        json.dump(mf.json_safe(meta), f, indent=1)
    for f in OUT.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            print(f"  {f.stat().st_size:>10,d}  {f.relative_to(mf.ROOT)}")
    print(f"  total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
