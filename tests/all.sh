#!/usr/bin/env bash
# Every test, on a machine with Rust (rustup) and Node.js: installs what is missing
# (tests/setup.sh test: the wasm32 target, wasm-bindgen-cli, web/'s npm packages, Debian's
# chromium, Mesa's software Vulkan driver), then runs the Rust workspace's tests (CPU and native
# wgpu), builds the browser package for wasm32 and runs the browser tests in Chromium (WebGPU on
# SwiftShader). CHROMIUM overrides the browser's path.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup.sh test

# Kernels are compiled and tuned on first use; keep tuning short on the software rasterisers.
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"

cargo test --workspace
npm --prefix web run build
npm --prefix web test
