"""GPU benchmark, PyTorch side (not a test): diffusers + tgate on the network `bench_gate` runs.

    python3 tests/gpu/torch_bench.py [--model sd15|small] [--size 512] [--dtypes f16,f32]
        [--steps 25] [--gate-step 10] [--runs 10] [--device cuda|cpu] [--json FILE]

Part of `tests/gpu/run.sh` (the one call made on a lent GPU machine); runs alone too. For each
dtype, with random weights (no download; the timing does not depend on the values):
- the UNet alone (diffusers' `UNet2DConditionModel`, SD 1.5's config by default): the median of
  `--runs` forwards at batch 2 (a planning step with classifier-free guidance) and at batch 1,
  after warm-ups, each timed between two device synchronisations;
- whole pipelines (`StableDiffusionPipeline`: CLIP ViT-L/14's text tower, the UNet, SD's VAE;
  PNDM, `--steps` steps, guidance 7.5): plain diffusers, then tgate's `TgateSDLoader` with the
  original T-GATE (gate at `--gate-step`, no self-attention cache: what `bench_gate`'s gated loop
  runs) and with tgate's defaults (sp_interval 5, fi_interval 1, warm_up 2), the prompt's
  embeddings made beforehand. A step's time runs from the end of the step before to its own end
  (synchronised in the step callback); per phase the mean, as `bench_gate` reports it; planning
  steps are those before the gate. Whole images from the prompt (text encoder, loop, VAE
  decode), plain (before tgate patches the UNet) and gated;
- the peak memory PyTorch's allocator held for a whole generation (`max_memory_allocated`,
  `max_memory_reserved`), on CUDA.
Prints a line per figure and, with `--json`, writes them all.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench_cpu_vs_torch import SD15_UNET  # noqa: E402 (runwayml/stable-diffusion-v1-5's UNet config)

# The networks bench_gate runs (the keys that shape them).
UNETS = {
    "sd15": SD15_UNET,
    # bench_gate's `small`.
    "small": dict(
        block_out_channels=[64, 128, 256],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=4,
        cross_attention_dim=256,
        norm_num_groups=32,
        sample_size=32,
        in_channels=4,
        out_channels=4,
    ),
}
VAES = {
    "sd15": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2),
    # Four levels (a factor of 8, as SD's), few channels.
    "small": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
}
TEXT = {
    # CLIP ViT-L/14's text tower.
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    "small": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=2),
}
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
PROMPT = "a photograph of an astronaut riding a horse"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model, dtype, device):
    torch.manual_seed(0)
    # The fixture's tokenizer (vocab.json + merges.txt); the text tower keeps CLIP's 49408 rows.
    tok = CLIPTokenizer.from_pretrained(os.path.join(ROOT, "tests/fixtures/sd1/tokenizer"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=768, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                        **TEXT[model]))
    unet = UNet2DConditionModel(**UNETS[model])
    vae_levels = len(VAES[model]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, act_fn="silu",
                        down_block_types=["DownEncoderBlock2D"] * vae_levels,
                        up_block_types=["UpDecoderBlock2D"] * vae_levels, **VAES[model])
    for m in (text, unet, vae):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_step(unet, size, batch, device, dtype, runs):
    """Median seconds of a UNet forward at `batch`, after two warm-ups."""
    side = size // 8
    x = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):
            sync(device)
            t0 = time.perf_counter()
            unet(x, 500, ctx, return_dict=False)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation(call, device, steps, **kwargs):
    """One pipeline call: (whole call seconds, each denoising call's seconds). A call's time runs
    from the end of the one before (the start, for the first) to its own end, synchronised in the
    step callback."""
    ends = []

    def on_step_end(pipe, i, t, callback_kwargs):
        sync(device)
        ends.append(time.perf_counter())
        return callback_kwargs

    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        call(num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator(device="cpu").manual_seed(0),
             callback_on_step_end=on_step_end, **kwargs)
    sync(device)
    total = time.perf_counter() - t0
    return total, [b - a for a, b in zip([t0] + ends, ends)]


def pipelines(pipe, size, steps, gate_step, device):
    from tgate import TgateSDLoader

    # The loops take the prompt's embeddings made beforehand, as bench_gate's do.
    with torch.inference_mode():
        cond, uncond = pipe.encode_prompt(PROMPT, device, 1, True, "")
    loop = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=size, width=size, output_type="latent")
    out = {}
    # A warm-up (kernel selection, allocator growth), then the timed call.
    generation(pipe, device, 2, **loop)
    total, per = generation(pipe, device, steps, **loop)
    out["ungated"] = dict(loop_s=total, calls=len(per), step_s=statistics.mean(per))
    # The plain whole image (text encoder, loop, VAE decode) before tgate touches the UNet: its
    # loader replaces the attention layers' forward for good (after a gated call, a plain call
    # would reuse the cached cross-attention). A short image first, so the decoder is warm.
    img = dict(prompt=PROMPT, negative_prompt="", height=size, width=size, output_type="np")
    generation(pipe, device, 2, **img)
    out["image_ungated_s"] = generation(pipe, device, steps, **img)[0]
    # PNDM runs steps + 1 calls (its first step twice); tgate counts its gate from after those
    # extra calls, so the first `gate_step + extra` calls plan.
    extra = len(pipe.scheduler.timesteps) - steps * pipe.scheduler.order
    tpipe = TgateSDLoader(pipe)
    for name, knobs in [("gated", dict(sp_interval=1, fi_interval=1, warm_up=0)),
                        ("gated_tgate_defaults", dict(sp_interval=5, fi_interval=1, warm_up=2))]:
        generation(tpipe.tgate, device, 2, gate_step=1, sp_interval=1, fi_interval=1, warm_up=0, **loop)
        total, per = generation(tpipe.tgate, device, steps, gate_step=gate_step, **knobs, **loop)
        planning, gated = per[:gate_step + extra], per[gate_step + extra:]
        out[name] = dict(loop_s=total, calls=len(per),
                         planning_step_s=statistics.mean(planning) if planning else None,
                         gated_step_s=statistics.mean(gated) if gated else None)
    out["image_gated_s"] = generation(tpipe.tgate, device, steps, gate_step=gate_step, sp_interval=1, fi_interval=1,
                                      warm_up=0, **img)[0]
    return out


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default="sd15", choices=sorted(UNETS))
    a.add_argument("--size", type=int, default=512)
    a.add_argument("--dtypes", default="f16,f32")
    a.add_argument("--steps", type=int, default=25)
    a.add_argument("--gate-step", type=int, default=10)
    a.add_argument("--runs", type=int, default=10)
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--json")
    args = a.parse_args()
    device = torch.device(args.device)
    report = dict(torch=torch.__version__, device=args.device, model=args.model, size=args.size, steps=args.steps,
                  gate_step=args.gate_step, results={})
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    print(f"PyTorch {torch.__version__} on {report.get('gpu', args.device)}: {args.model} UNet, "
          f"{args.size}x{args.size}, PNDM {args.steps} steps, gate {args.gate_step}", flush=True)
    for name in args.dtypes.split(","):
        dtype = {"f16": torch.float16, "f32": torch.float32}[name]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        pipe = build(args.model, dtype, device)
        r = dict(unet_batch2_s=unet_step(pipe.unet, args.size, 2, device, dtype, args.runs),
                 unet_batch1_s=unet_step(pipe.unet, args.size, 1, device, dtype, args.runs))
        print(f"  {name}: UNet forward batch 2 {r['unet_batch2_s'] * 1e3:.1f} ms, batch 1 "
              f"{r['unet_batch1_s'] * 1e3:.1f} ms ({r['unet_batch1_s'] / r['unet_batch2_s']:.2f})", flush=True)
        r.update(pipelines(pipe, args.size, args.steps, args.gate_step, device))
        u, g, d = r["ungated"], r["gated"], r["gated_tgate_defaults"]
        print(f"  {name}: ungated step {u['step_s'] * 1e3:.1f} ms; gated loop: planning {g['planning_step_s'] * 1e3:.1f}"
              f" ms, gated {g['gated_step_s'] * 1e3:.1f} ms; loops ungated {u['loop_s']:.2f} s, gated "
              f"{g['loop_s']:.2f} s ({u['loop_s'] / g['loop_s']:.2f}x), tgate's defaults {d['loop_s']:.2f} s "
              f"({u['loop_s'] / d['loop_s']:.2f}x); whole image ungated {r['image_ungated_s']:.2f} s, gated "
              f"{r['image_gated_s']:.2f} s ({r['image_ungated_s'] / r['image_gated_s']:.2f}x)", flush=True)
        if device.type == "cuda":
            r["max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            r["max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
            print(f"  {name}: peak memory {r['max_allocated_mib']:.1f} MiB allocated, "
                  f"{r['max_reserved_mib']:.1f} MiB reserved (the whole dtype's run)", flush=True)
        report["results"][name] = r
        del pipe
        # After each dtype: a time limit that stops the next one keeps this one's figures.
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
