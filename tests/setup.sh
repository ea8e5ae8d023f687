#!/usr/bin/env bash
# Installs what building and testing need, on a machine that has Rust (rustup) and Node.js:
#
#   bash tests/setup.sh demo    the wasm32 target, wasm-bindgen-cli at the crate's exact version,
#                               the npm packages of web/ (what `bash web/demo.sh` needs)
#   bash tests/setup.sh test    all of that, plus Debian's chromium (browser tests; no browser
#                               is downloaded) and Mesa's software Vulkan driver (native wgpu tests)
#
# Each tool is installed only when missing, so a second run costs seconds. System packages come
# from apt-get (as root, or through sudo); where neither works, the script stops and prints the
# exact command to run.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
case "$what" in demo | test) ;; *) echo "usage: bash tests/setup.sh demo|test" >&2; exit 2 ;; esac

say() { echo "setup: $*" >&2; }

# System packages (Debian): node + npm where missing; for tests chromium and lavapipe.
apt_need=()
command -v node >/dev/null && command -v npm >/dev/null || apt_need+=(nodejs npm)
if [ "$what" = test ]; then
  [ -x "${CHROMIUM:-/usr/bin/chromium}" ] || apt_need+=(chromium)
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || apt_need+=(mesa-vulkan-drivers libvulkan1)
fi
if [ ${#apt_need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; else
    say "missing system packages: ${apt_need[*]}; install them with:"
    say "  sudo apt-get install -y --no-install-recommends ${apt_need[*]}"
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    say "missing ${apt_need[*]} and no apt-get here: install them with your package manager"
    exit 1
  fi
  say "installing ${apt_need[*]} (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_need[@]}" >/dev/null
fi

# The wasm32 target.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  say "adding the Rust target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

# wasm-bindgen's CLI must match the wasm-bindgen crate the browser crate builds with, exactly.
want="$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' crates/tgate-wasm/Cargo.toml)"
[ -n "$want" ] || { say "cannot read the wasm-bindgen version from crates/tgate-wasm/Cargo.toml"; exit 1; }
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $want" ]; then
  say "installing wasm-bindgen-cli $want (cargo install, a few minutes once)"
  cargo install --quiet wasm-bindgen-cli --version "$want"
fi
command -v wasm-bindgen >/dev/null || {
  say "wasm-bindgen was installed but is not on PATH: add ~/.cargo/bin to PATH"
  exit 1
}

# The npm packages of web/ (playwright-core drives the system chromium; it downloads no browser).
if [ ! -d web/node_modules/playwright-core ]; then
  say "installing web/'s npm packages"
  npm --prefix web ci --no-audit --no-fund --loglevel=error
fi
