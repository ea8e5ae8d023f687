#!/usr/bin/env python3
"""Writes a benchmark model: Stable Diffusion 1.5's pipeline structure with random weights.

    /work/venv/bin/python tests/make_bench_sd15.py      # writes target/bench-sd15/ (about 250 MB)

Not a fixture (nothing is committed; `target/` is ignored): the browser benchmark
(`TGATE_BENCH=1 node web/test/browser.test.mjs`, steps named `bench sd15: ...`) times it at
256x256, ours against ONNX Runtime Web on the same UNet and weights. The folder is a complete
diffusers pipeline, as `StableDiffusionPipeline.save_pretrained` writes it:

  unet/          UNet2DConditionModel with SD 1.5's structure (CrossAttnDownBlock2D x3 + DownBlock2D,
                 UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3, 2 layers per block,
                 attention_head_dim 8, cross-attention width 768, 32 groups) at a fifth of its width:
                 block_out_channels (64, 128, 256, 256) (SD 1.5: 320, 640, 1280, 1280); 37.5 M
                 parameters (SD 1.5: 860 M).
                 Plus model.onnx (tests/export_onnx.py --unet), its weights read from the safetensors.
  text_encoder/  CLIPTextModel of SD 1.5's width (768, 12 heads, MLP 3072, 77 positions, quick_gelu)
                 with 2 layers and the sd1 fixture's tokenizer vocabulary (1514 tokens)
  tokenizer/     the sd1 fixture's tokenizer files
  vae/           AutoencoderKL with 4 levels (scale factor 8 as SD's: 256x256 <-> 32x32) and small
                 channels (32, 32, 64, 64), 2 layers per block as SD's
  scheduler/     SD 1.5's PNDM scheduler_config.json, as the real checkpoint ships it

Every parameter is randomised (diffusers zero-initialises some layers, e.g. the UNet's conv_out):
weights of rank >= 2 (linear, convolution, embedding) N/sqrt(fan_in), biases 0.1N, norm scales
1+0.1N. Weights are float32 safetensors.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
import diffusers
import transformers
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench-sd15"
SD1 = ROOT / "tests" / "fixtures" / "sd1"
SEED = 1500

# SD 1.5's scheduler_config.json as the checkpoint ships it: the sd1 fixture's (written by
# tests/make_fixtures.py).
SCHEDULER_CONFIG = SD1 / "scheduler" / "scheduler_config.json"

UNET_CONFIG = dict(
    sample_size=32,  # 256x256 images
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 256, 256),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
)

# Four levels (scale factor 8, as SD's); diffusers' defaults otherwise (RGB, 4 latent channels,
# scaling factor 0.18215).
VAE_CONFIG = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=256,
)


def gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(shape, g):
    # With tens of millions of draws an exact 0.0 does come up (seen here): nudge it, so that
    # "no zero left" below can hold.
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return t.masked_fill_(t == 0, 1e-3)


def randomise_(module: nn.Module, g: torch.Generator):
    """Overwrites every parameter by its name and rank (a benchmark needs no more than this; the
    reference fixtures use tests/make_fixtures.py's finer rules): weights of rank >= 2 (linear,
    convolution, embedding) N(0, 1/fan_in), biases 0.1 N, other vectors (norm scales) 1 + 0.1 N.
    Checks that no zero is left (diffusers zero-initialises some layers, which hides bugs)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = randn(p.shape, g)
            if p.dim() >= 2:
                value = z / p[0].numel() ** 0.5
            else:
                value = 0.1 * z if name.endswith("bias") else 1.0 + 0.1 * z
            p.copy_(value)
            assert torch.isfinite(p).all() and (p != 0).all(), f"{name}: zero or non-finite left"
    return module


def count(module):
    return sum(p.numel() for p in module.parameters())


def main():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    # The sd1 fixture's tokenizer, and its text encoder's special token ids.
    tok = CLIPTokenizer.from_pretrained(SD1 / "tokenizer")
    sd1_te = json.loads((SD1 / "text_encoder" / "config.json").read_text())
    assert len(tok) == sd1_te["vocab_size"], (len(tok), sd1_te["vocab_size"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        sd1_te["bos_token_id"], sd1_te["eos_token_id"], sd1_te["pad_token_id"]), "tokenizer and fixture disagree"
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
        dropout=0.0,
    ))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    randomise_(te, gen(SEED + 1))
    randomise_(unet, gen(SEED + 2))
    randomise_(vae, gen(SEED + 3))
    for m in (te, unet, vae):
        m.eval()
        m.requires_grad_(False)
    print(f"UNet parameters: {count(unet):,} ({count(unet) / 1e6:.2f} M)")
    print(f"text encoder parameters: {count(te):,}; VAE parameters: {count(vae):,}")

    # Sanity, at the benchmark's size: finite values of a sensible scale at every stage.
    with torch.no_grad():
        ids = tok(["a fox", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        text = te(ids)[0]
        x = randn((2, 4, 32, 32), gen(SEED + 4))
        eps = unet(x, 500, text).sample
        image = vae.decode(x[:1] / vae.config.scaling_factor).sample
    for name, t in (("text", text), ("unet at 32x32 latents", eps), ("vae decode to 256x256", image)):
        assert torch.isfinite(t).all(), name
        print(f"  {name}: shape {list(t.shape)} max |v| {t.abs().max():.3g}")

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    (OUT / "scheduler").mkdir()
    shutil.copy(SCHEDULER_CONFIG, OUT / "scheduler" / "scheduler_config.json")
    scheduler = PNDMScheduler.from_pretrained(OUT, subfolder="scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(OUT, safe_serialization=True)
    # save_pretrained rewrote these: the checkpoint-style scheduler config and the fixture's tokenizer files.
    shutil.copy(SCHEDULER_CONFIG, OUT / "scheduler" / "scheduler_config.json")
    shutil.rmtree(OUT / "tokenizer")
    shutil.copytree(SD1 / "tokenizer", OUT / "tokenizer")
    # transformers 5 writes CLIPTextModel keys without the `text_model.` prefix real SD checkpoints have
    # (and the sd1 fixture has): rewrite them so (transformers loads both identically).
    te_file = OUT / "text_encoder" / "model.safetensors"
    te_sd = load_file(str(te_file))
    if not all(k.startswith("text_model.") for k in te_sd):
        save_file({(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te_sd.items()},
                  str(te_file), metadata={"format": "pt"})

    # Reloads identically, in float32.
    for name, cls, model in (("unet", UNet2DConditionModel, unet), ("vae", AutoencoderKL, vae),
                             ("text_encoder", CLIPTextModel, te)):
        again = cls.from_pretrained(OUT / name)
        a, b = model.state_dict(), again.state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), (name, k)
    assert CLIPTokenizer.from_pretrained(OUT / "tokenizer")("a fox").input_ids == tok("a fox").input_ids
    unet_file = OUT / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet_file.exists(), sorted(p.name for p in (OUT / "unet").iterdir())

    # The ONNX graph for ONNX Runtime Web, its weights read from the UNet's safetensors.
    sys.path.insert(0, str(ROOT / "tests"))
    import export_onnx

    export_onnx.export(str(OUT / "unet"))

    total = 0
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"  {f.stat().st_size:>12,d}  {f.relative_to(ROOT)}")
    print(f"  total {total / 1e6:.1f} MB in {OUT.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
