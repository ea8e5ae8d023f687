#!/usr/bin/env bash
# The GPU benchmark in one call (issue 13 §4): ours natively (wgpu on Vulkan) against PyTorch
# diffusers + tgate, same GPU, same script, and our wgpu reference tests on that GPU.
#
#   bash tests/gpu/prepare.sh            here, once: builds and packs everything into .gpu/
#   bash tests/gpu/run.sh                on the GPU machine (the `device` tool's `run`, carrying
#                                        .gpu); what it prints also lands in $OUT
#   bash tests/gpu/run.sh --dry-run      here: the same steps at toy sizes (lavapipe, PyTorch on
#                                        the CPU), to check the plumbing
#
# Parts, in this order (PARTS=a,b,... runs a subset; each has a time limit, and the parts that
# no longer fit in BUDGET seconds, default 480, are skipped and named, for a second call):
#   env             the GPU, driver, Vulkan adapter, PyTorch
#   ours-f16        bench_gate, SD 1.5's UNet at 512x512 in f16, PNDM 25 steps, gate 10 (the
#                   original T-GATE): kernel launches, distinct kernels, device time by op class,
#                   attention kernels per shape, step times, gated/ungated loops, one step ahead
#   torch           tests/gpu/torch_bench.py: diffusers' UNet and pipeline, tgate, f16 and f32
#   tests           our wgpu reference tests (crates/tgate/tests/wgpu.rs) on that GPU
#   ours-f32        bench_gate as ours-f16, in f32, without the kernel accounting
#   memory          bench_memory: two whole SD 1.5 generations at 512x512 in f16, tensors capped at
#                   WebGPU's default 128 MiB binding
#   before-after    bench_gate --before-after in f16: burn's generic ops against tgate's kernels
#   tgate-defaults  bench_gate in f16 with tgate's defaults (sp_interval 5, warm_up 2)
# Output: $OUT/gpu.log (everything), $OUT/torch.json, $OUT/summary.md (tests/gpu/summarize.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
dry=0
[ "${1:-}" = --dry-run ] && dry=1
out=${OUT:-$root/target/gpu-out}
mkdir -p "$out"
log=$out/gpu.log
: >"$log"
budget=${BUDGET:-480}
((dry)) && budget=${BUDGET:-2400}
parts=${PARTS:-env,ours-f16,torch,tests,ours-f32,memory,before-after,tgate-defaults}
pkg=$root/.gpu
bin=/tmp/tgate-gpu
mkdir -p "$bin"
t0=$SECONDS
skipped=()

say() { echo "$*" | tee -a "$log"; }

# part NAME LIMIT COMMAND...: runs COMMAND under min(LIMIT, what is left of the budget).
part() {
  local name=$1 limit=$2
  shift 2
  case ",$parts," in *",$name,"*) ;; *) return 0 ;; esac
  local left=$((budget - (SECONDS - t0)))
  if ((left < 45)); then
    say "== $name: skipped, ${left} s of the budget left"
    skipped+=("$name")
    return 0
  fi
  ((dry)) && limit=$((limit * 4)) # lavapipe on two cores
  ((limit > left)) && limit=$left
  say "== $name (limit ${limit} s): $*"
  local s=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  say "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - s)) s"
}

[ -f "$pkg/manifest" ] || { echo "no $pkg/manifest: run bash tests/gpu/prepare.sh first" >&2; exit 2; }
say "package: $(tr '\n' ' ' <"$pkg/manifest")"
for f in bench_gate bench_memory wgpu-tests; do
  xz -dc "$pkg/$f.xz" >"$bin/$f" && chmod +x "$bin/$f" || { echo "cannot unpack $pkg/$f.xz" >&2; exit 2; }
done
# The tests and bench_memory find the repository where it was built (CARGO_MANIFEST_DIR).
built=$(sed -n 's/^root=//p' "$pkg/manifest")
if [ -n "$built" ] && [ "$built" != "$root" ] && [ ! -e "$built" ]; then
  mkdir -p "$(dirname "$built")" && ln -s "$root" "$built"
fi

python=${PYTHON:-python3}
if ((dry)); then
  model=(--model small --size 64 --steps 6 --gate-step 3)
  torch_args=(--model small --size 64 --steps 6 --gate-step 3 --runs 2 --dtypes f32 --device cpu)
  tests=(launch_counter_sees_wgpu_kernels)
  mem_size=64
else
  model=(--model sd15 --size 512 --steps 25 --gate-step 10)
  torch_args=(--size 512 --steps 25 --gate-step 10 --dtypes f16,f32)
  tests=()
  mem_size=512
  # Vulkan: the image has NVIDIA's driver; bring the loader when it is missing.
  if ! ldconfig -p | grep 'libvulkan\.so\.1' >/dev/null; then
    for f in "$pkg"/gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ -f "$icd" ] && ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    export VK_DRIVER_FILES=$icd
  fi
  # diffusers, tgate and what they need beyond the image's packages.
  if ! "$python" -c 'import diffusers, tgate' 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$pkg"/whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

part env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo 'no nvidia-smi';
  uname -r; nproc; ldconfig -p | grep libvulkan; echo VK_DRIVER_FILES=\${VK_DRIVER_FILES:-};
  $python -c 'import torch, diffusers, tgate; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"diffusers\", diffusers.__version__)'"
part ours-f16 240 "$bin/bench_gate" --backend wgpu "${model[@]}" --dtype f16 --no-deepcache --one-ahead-too
part torch 200 env PYTHONUNBUFFERED=1 "$python" tests/gpu/torch_bench.py "${torch_args[@]}" --json "$out/torch.json"
part tests 240 "$bin/wgpu-tests" "${tests[@]}"
part ours-f32 150 "$bin/bench_gate" --backend wgpu "${model[@]}" --dtype f32 --no-deepcache --no-kernels
part memory 120 "$bin/bench_memory" --backend wgpu --size "$mem_size" --dtype f16 --max-tensor-mib 128 --generations 2
part before-after 240 "$bin/bench_gate" --backend wgpu "${model[@]}" --dtype f16 --no-deepcache --before-after
part tgate-defaults 150 "$bin/bench_gate" --backend wgpu "${model[@]}" --dtype f16 --no-deepcache --no-kernels \
  --sp-interval 5 --warm-up 2

((${#skipped[@]})) && say "skipped for lack of time: PARTS=$(IFS=,; echo "${skipped[*]}") runs them"
say "total $((SECONDS - t0)) s"
"$python" tests/gpu/summarize.py "$log" "$out/torch.json" >"$out/summary.md" 2>&1
cat "$out/summary.md"
