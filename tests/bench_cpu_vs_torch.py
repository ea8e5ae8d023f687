"""CPU benchmark (not a test): our SD-1.5-shaped UNet step against PyTorch eager, same run.

    python3 tests/bench_cpu_vs_torch.py [--size 256] [--threads 2] [--steps 4] [--runs 3]

Both sides run the same network (runwayml/stable-diffusion-v1-5's `unet/config.json`, random
weights) on the CPU with the same number of threads:
- ours: `cargo run --release -p tgate --example bench_gate -- --backend cpu --model sd15` (Flex,
  burn's CPU backend, AVX-512 matmuls where the CPU has them), whose per-phase step times are
  parsed: an ungated step (UNet at batch 2 + guidance + scheduler) and a gated step after the gate
  (batch 1); run twice, with glibc's malloc kept as the CLI sets it
  (`tgate::host_memory::keep_large_allocations`) and left at its defaults (`--default-malloc`);
- PyTorch: diffusers' `UNet2DConditionModel` under `torch.inference_mode()`, median of `--runs`
  forwards at batch 2 and at batch 1 after one warm-up each (the UNet alone: the guidance and
  scheduler arithmetic is a few element-wise ops on 4-channel latents).
Prints both and the ratios ours / PyTorch (the issue's target: at most 1.3). Needs the packages
in tests/requirements.txt; ours is built by cargo on first use (`--release`: 15–25 min cold on
two cores; `--dev` uses the dev profile instead, dependencies at opt-level 3).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    sample_size=64,
    in_channels=4,
    out_channels=4,
)


def ours(size, threads, steps, release, default_malloc=False):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = ["cargo", "run", "-q"] + (["--release"] if release else []) + [
        "-p", "tgate", "--example", "bench_gate", "--",
        "--backend", "cpu", "--model", "sd15", "--size", str(size), "--steps", str(steps),
        "--gate-step", str(max(1, steps // 2)), "--no-deepcache",
    ] + (["--default-malloc"] if default_malloc else [])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_gate failed:\n{out.stderr[-4000:]}")
    text = out.stdout
    ungated = re.search(r"^\s*ungated\s*:\s*\d+ steps,\s*([\d.]+) ms/step", text, re.M)
    gated = re.search(r"^\s*gated fidelity-improving\s*:\s*\d+ steps,\s*([\d.]+) ms/step", text, re.M)
    if not (ungated and gated):
        sys.exit(f"could not read bench_gate's output:\n{text}")
    return float(ungated.group(1)) / 1e3, float(gated.group(1)) / 1e3


def pytorch(size, threads, runs):
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    side = size // 8

    def forward(batch):
        x = torch.randn(batch, 4, side, side)
        ctx = torch.randn(batch, 77, 768)
        t0 = time.perf_counter()
        with torch.inference_mode():
            unet(x, 500, ctx, return_dict=False)
        return time.perf_counter() - t0

    times = {}
    for batch in (2, 1):
        forward(batch)
        times[batch] = statistics.median(forward(batch) for _ in range(runs))
    return times[2], times[1], torch.__version__


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--size", type=int, default=256)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--steps", type=int, default=4)
    a.add_argument("--runs", type=int, default=3)
    a.add_argument("--dev", action="store_true", help="build ours with the dev profile")
    args = a.parse_args()
    print(f"SD-1.5-shaped UNet, {args.size}x{args.size} px, {args.threads} threads, CPU")
    release = not args.dev
    d2, d1 = ours(args.size, args.threads, args.steps, release, default_malloc=True)
    o2, o1 = ours(args.size, args.threads, args.steps, release)
    t2, t1, version = pytorch(args.size, args.threads, args.runs)
    profile = "release" if release else "dev"
    print(f"  ours ({profile}, default malloc): planning step (batch 2) {d2:.2f} s, gated step (batch 1) {d1:.2f} s")
    print(f"  ours ({profile}, as the CLI)     : planning step (batch 2) {o2:.2f} s, gated step (batch 1) {o1:.2f} s, gated/planning {o1 / o2:.2f}")
    print(f"  PyTorch {version:<21}: UNet batch 2 {t2:.2f} s, batch 1 {t1:.2f} s, batch1/batch2 {t1 / t2:.2f}")
    print(f"  ours / PyTorch                : batch 2 {o2 / t2:.2f}x, batch 1 {o1 / t1:.2f}x (target: at most 1.3x)")


if __name__ == "__main__":
    main()
