// Builds the wasm crate (release profile) and binds it with wasm-bindgen: the CLI at the crate's
// exact version, installed from crates.io (`cargo install wasm-bindgen-cli --version 0.2.130`).
// crates/tgate-wasm/prepare.sh first makes the patched cubecl-wgpu that crate builds against.
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

run('bash', ['crates/tgate-wasm/prepare.sh']);
run('cargo', ['build', '--release', '--target', 'wasm32-unknown-unknown',
  '--manifest-path', 'crates/tgate-wasm/Cargo.toml', '--target-dir', 'target/wasm']);
// Function names are only for debugging: dropped (a fifth of the module).
run('wasm-bindgen', ['--target', 'web', '--no-typescript', '--remove-name-section', '--remove-producers-section', '--out-dir', 'web/pkg',
  'target/wasm/wasm32-unknown-unknown/release/tgate_wasm.wasm']);
