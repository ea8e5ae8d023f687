#!/usr/bin/env bash
# The project's main job: the browser demo. Installs what the build needs (tests/setup.sh demo:
# the wasm32 target, wasm-bindgen-cli, web/'s npm packages), builds the wasm package and serves
# the page and the bundled tiny models (tests/fixtures/, random weights) on localhost, so it
# works offline. Open the printed address in a browser with WebGPU (Chrome/Edge 113+, Safari 26,
# Firefox 141+ on Windows). PORT overrides 8080.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh demo
npm --prefix web run build
exec node web/scripts/server.mjs "${PORT:-8080}"
