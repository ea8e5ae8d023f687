#!/usr/bin/env python3
"""Reference fixtures for DeepCache, alone and with T-GATE, on the sd1 fixture.

Run from the repository root, after tests/make_fixtures.py (it runs tests/fixtures/sd1 as saved):

    python3 tests/make_fixtures_deepcache.py

DeepCache (DeepCache 0.1.1, `DeepCacheSDHelper`) keeps the UNet's deep features between "full"
steps: every `cache_interval` steps the UNet runs whole and each wrapped module keeps its output;
on the steps in between only the shallow branch runs (down to block `cache_branch_id // 3`, layer
`cache_branch_id % 3`) and the deeper modules return what they kept. tgate 1.0.0's
`TgateSDDeepCacheLoader(pipe, cache_interval, cache_branch_id)` combines it with the gate and
restarts DeepCache's interval at steps gate_step - 1 and gate_step (the cross-attention cache is
taken at the first, and the batch halves at the second). Both run here exactly as the packages
ship them, on the StableDiffusionPipeline of tests/fixtures/sd1, with the stored noise of sd1's
references:

  tests/fixtures/deepcache/reference.safetensors   pipe.<run>   (final latents; pipe.noise and
                                                                  pipe.step_noise are sd1's)
  tests/fixtures/deepcache/reference.json          the runs' settings and versions
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402
import torch  # noqa: E402
from DeepCache import DeepCacheSDHelper  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tgate import TgateSDDeepCacheLoader  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

# name: (scheduler, cache_interval, cache_branch_id, gate_step or None for DeepCache alone)
RUNS = {
    "deepcache.ddim.i3b0": ("ddim", 3, 0, None),
    "deepcache.ddim.i2b4": ("ddim", 2, 4, None),
    "deepcache.euler-a.i3b8": ("euler-a", 3, 8, None),
    "tgate_deepcache.ddim.i3b0": ("ddim", 3, 0, 3),
    "tgate_deepcache.pndm.i2b4": ("pndm", 2, 4, 3),
    "tgate_deepcache.euler-a.i3b1": ("euler-a", 3, 1, 5),
}


def run_deepcache(factory, noise, step_noise, sched, interval, branch):
    pipe = factory(sched)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return mf.run_full(pipe, noise, step_noise, sched)
    finally:
        helper.disable()


def run_tgate_deepcache(factory, noise, step_noise, sched, interval, branch, gate_step):
    pipe = TgateSDDeepCacheLoader(factory(sched), cache_interval=interval, cache_branch_id=branch)
    with mf.noise_source(step_noise if sched == "euler-a" else None) as st, torch.no_grad():
        out = pipe.tgate(mf.PROMPT, negative_prompt=mf.NEGATIVE_PROMPT, num_inference_steps=mf.STEPS,
                         guidance_scale=mf.GUIDANCE, height=mf.HEIGHT, width=mf.WIDTH, latents=noise.clone(),
                         output_type="latent", gate_step=gate_step).images
    if sched == "euler-a":
        assert st["used"] == mf.STEPS
    return out


def main():
    mf.setup_determinism()
    sd1 = mf.FIX / "sd1"
    tok = CLIPTokenizer.from_pretrained(sd1 / "tokenizer")
    te = CLIPTextModel.from_pretrained(sd1 / "text_encoder", dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(sd1, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(sd1, subfolder="unet").eval()
    base_config = json.loads((sd1 / "scheduler" / "scheduler_config.json").read_text())
    factory = mf.PipeFactory(te, unet, vae, tok, base_config)
    ref = load_file(str(sd1 / "reference.safetensors"))
    noise, step_noise = ref["pipe.noise"], ref["pipe.step_noise"]

    R, runs = {}, {}
    for name, (sched, interval, branch, gate_step) in RUNS.items():
        if gate_step is None:
            out = run_deepcache(factory, noise, step_noise, sched, interval, branch)
            base = ref[f"pipe.{sched}.full"]
        else:
            out = run_tgate_deepcache(factory, noise, step_noise, sched, interval, branch, gate_step)
            base = mf.run_tgate(factory(sched), noise, step_noise, sched,
                                dict(mf.GATE_RUNS["tgate"], gate_step=gate_step))
        changed = (out - base).abs().max().item()
        assert changed > 1e-4, f"{name}: DeepCache changed nothing"
        assert mf.max_abs(out) < mf.SANE_MAX
        R[f"pipe.{name}"] = out.contiguous()
        runs[name] = {"scheduler": sched, "cache_interval": interval, "cache_branch_id": branch,
                      "gate_step": gate_step, "changes_by": changed}
        print(f"  {name}: max |latents| {mf.max_abs(out):.3f}, DeepCache changes it by {changed:.4f}")
    out_dir = mf.FIX / "deepcache"
    out_dir.mkdir(exist_ok=True)
    save_file(R, str(out_dir / "reference.safetensors"))
    meta = {
        "model": "tests/fixtures/sd1 (its pipe.noise and pipe.step_noise)",
        "prompt": mf.PROMPT,
        "negative_prompt": mf.NEGATIVE_PROMPT,
        "steps": mf.STEPS,
        "guidance": mf.GUIDANCE,
        "width": mf.WIDTH,
        "height": mf.HEIGHT,
        "runs": runs,
        "versions": dict(mf.versions(), DeepCache="0.1.1"),
    }
    (out_dir / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
