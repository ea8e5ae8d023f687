#!/usr/bin/env bash
# Every test: the Rust workspace (CPU and native wgpu), then the browser package built for wasm32
# and tested in Chromium (WebGPU on SwiftShader). Needs: Rust with the wasm32-unknown-unknown
# target, wasm-bindgen-cli 0.2.130, node + npm, and Debian's chromium (CHROMIUM overrides the
# path); .ci/run installs all of them on a clean Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace

for tool in wasm-bindgen node npm; do
  command -v "$tool" >/dev/null || { echo "tests/all.sh: '$tool' is missing (see .ci/run)" >&2; exit 1; }
done
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || { echo "tests/all.sh: no chromium at ${CHROMIUM:-/usr/bin/chromium}" >&2; exit 1; }
[ -d web/node_modules/playwright-core ] || npm --prefix web ci --no-audit --no-fund
npm --prefix web run build
npm --prefix web test
