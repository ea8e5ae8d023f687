#!/usr/bin/env python3
"""Reference fixtures for the small distilled Stable Diffusion UNets (the BK-SDM family).

Run from the repository root, after tests/make_fixtures.py (it reuses tests/fixtures/sd1's text
encoder, VAE, tokenizer and scheduler, so each fixture holds only its UNet and references):

    python3 tests/make_fixtures_small.py

BK-SDM (nota-ai/bk-sdm-base, -small, -tiny) distils SD 1.x by removing blocks; its UNets are
plain `UNet2DConditionModel` configs:
  base   one resnet (and transformer) per down block: `layers_per_block: 1` (up blocks keep 2)
  small  base without the mid block: `mid_block_type: null`
  tiny   small without the innermost level: three levels, every one with cross-attention
Each is made here at fixture size (random weights, every parameter randomised), saved as a
diffusers `unet/` folder, and run through StableDiffusionPipeline (no gate) and tgate's
TgateSDLoader (the original gate) with stored noise:

  tests/fixtures/<name>/unet/                      config.json + diffusion_pytorch_model.safetensors
  tests/fixtures/<name>/reference.safetensors      pipe.noise, pipe.step_noise, pipe.<sched>.<run>
  tests/fixtures/<name>/reference.json             prompts, sizes, schedulers, gate, versions
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

# The sd1 fixture's UNet config; each variant removes what BK-SDM removes.
SD1 = mf.unet_config("sd1")

VARIANTS = {
    "bk-sdm-small": dict(SD1, layers_per_block=1, mid_block_type=None),
    "bk-sdm-tiny": dict(
        SD1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        mid_block_type=None,
    ),
}

RUN_SCHEDULERS = ["ddim", "euler-a"]
SEEDS = {"bk-sdm-small": 300, "bk-sdm-tiny": 400}


def main():
    mf.setup_determinism()
    sd1 = mf.FIX / "sd1"
    tok = CLIPTokenizer.from_pretrained(sd1 / "tokenizer")
    te = CLIPTextModel.from_pretrained(sd1 / "text_encoder", dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(sd1, subfolder="vae").eval()
    base_config = json.loads((sd1 / "scheduler" / "scheduler_config.json").read_text())
    for name, cfg in VARIANTS.items():
        seed = SEEDS[name]
        unet = UNet2DConditionModel(**cfg)
        assert (unet.mid_block is None) == (cfg.get("mid_block_type", "") is None)
        mf.randomise_(unet, mf.gen(seed))
        unet.eval()
        unet.requires_grad_(False)
        out = mf.FIX / name
        if out.exists():
            shutil.rmtree(out)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        # What a user's folder would say: the diffusers config as saved.
        saved_cfg = json.loads((out / "unet" / "config.json").read_text())
        assert saved_cfg["mid_block_type"] == cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")

        factory = mf.PipeFactory(te, unet, vae, tok, base_config)
        g = mf.gen(seed + 1)
        noise = mf.randn((1, 4, 8, 8), g)
        step_noise = mf.randn((mf.STEPS, 1, 4, 8, 8), g)
        R = {"pipe.noise": noise, "pipe.step_noise": step_noise}
        checks = {}
        for sched in RUN_SCHEDULERS:
            full = mf.run_full(factory(sched), noise, step_noise, sched)
            gated = mf.run_tgate(factory(sched), noise, step_noise, sched, mf.GATE_RUNS["tgate"])
            R[f"pipe.{sched}.full"] = full.contiguous()
            R[f"pipe.{sched}.tgate"] = gated.contiguous()
            diff = (full - gated).abs().max().item()
            checks[sched] = {"max_abs_full": mf.max_abs(full), "gate_changes_by": diff}
            assert mf.max_abs(full) < mf.SANE_MAX, (name, sched, mf.max_abs(full))
            assert diff > 1e-4, f"{name} {sched}: the gate changed nothing"
        save_file({k: v.contiguous() for k, v in R.items()}, str(out / "reference.safetensors"))
        meta = {
            "prompt": mf.PROMPT,
            "negative_prompt": mf.NEGATIVE_PROMPT,
            "steps": mf.STEPS,
            "guidance": mf.GUIDANCE,
            "width": mf.WIDTH,
            "height": mf.HEIGHT,
            "schedulers": RUN_SCHEDULERS,
            "gate_runs": {"tgate": mf.GATE_RUNS["tgate"]},
            "shares": "tests/fixtures/sd1: text_encoder, vae, tokenizer, scheduler",
            "unet_config": mf.json_safe(cfg),
            "checks": checks,
            "versions": mf.versions(),
        }
        (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"  {name}: {mf.dir_size(out) / 1024:.0f} KiB, checks {checks}")


if __name__ == "__main__":
    main()
