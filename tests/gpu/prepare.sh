#!/usr/bin/env bash
# Packs what tests/gpu/run.sh needs on a GPU machine into .gpu/ (git-ignored), here, so that the
# machine only runs: it has no Rust, no diffusers or tgate, maybe no Vulkan loader, and reaches
# no network.
#   - bench_gate and bench_memory, release build (autotune on, as native users run), stripped;
#   - the wgpu reference tests (crates/tgate/tests/wgpu.rs), as `cargo test --workspace` builds
#     them; they read the fixtures from this checkout's path, which run.sh links there;
#   - wheels: diffusers, tgate and what they need beyond the machine's image (Python 3.12);
#   - Debian's Vulkan loader (libvulkan1), unpacked there only when the image lacks one.
# Binaries travel xz-compressed: the carried tree is limited to 64 MiB. Then, with the `device`
# tool: run(command="bash tests/gpu/run.sh", carry=[".gpu"], timeout_s=560).
set -euo pipefail
cd "$(dirname "$0")/../.."
pkg=.gpu
rm -rf "$pkg"
mkdir -p "$pkg/whl" "$pkg/gl"
say() { echo "prepare: $*" >&2; }

say "building the benchmarks (release)"
cargo build --release -p tgate --example bench_gate --example bench_memory
say "building the wgpu reference tests"
tests=$(cargo test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "wgpu" and m.get("executable"):
        print(m["executable"])')
[ -n "$tests" ] || { say "no wgpu test executable"; exit 1; }

pack() {
  strip -o "$pkg/$2" "$1"
  xz -T2 -6 "$pkg/$2"
}
pack target/release/examples/bench_gate bench_gate
pack target/release/examples/bench_memory bench_memory
pack "$tests" wgpu-tests

say "downloading wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d "$pkg/whl" \
  diffusers==0.42.1 tgate==1.0.0 DeepCache==0.1.1 importlib_metadata==10.2.0 lazy-importer==0.1.0

say "downloading the Vulkan loader"
lists=/tmp/gpu-apt-lists
mkdir -p "$lists/partial"
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$lists)
apt-get "${o[@]}" -qq update
(cd "$pkg/gl" && apt-get "${o[@]}" -qq download libvulkan1)

{
  echo "root=$PWD"
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +changes)"
  echo "built=$(date -u +%FT%TZ)"
} >"$pkg/manifest"
du -sh "$pkg" >&2
say 'done; on a lent GPU: run(command="bash tests/gpu/run.sh", carry=[".gpu"], timeout_s=560)'
