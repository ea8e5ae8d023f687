// Builds the wasm crate (release profile) and binds it with wasm-bindgen: the CLI at the crate's
// exact version, installed from crates.io (`cargo install wasm-bindgen-cli --version 0.2.130`).
// crates/tgate-wasm/prepare.sh first makes the patched cubecl-wgpu that crate builds against.
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

run('bash', ['crates/tgate-wasm/prepare.sh']);
run('cargo', ['build', '--release', '--target', 'wasm32-unknown-unknown',
  '--manifest-path', 'crates/tgate-wasm/Cargo.toml', '--target-dir', 'target/wasm']);
// wasm-ld wraps every export of a module whose static constructors are not run explicitly in a
// call of all of them (`<name>.command_export`): then each crossing from JS into wasm re-runs
// cubecl's registrations, milliseconds each. `start()` in crates/tgate-wasm/src/lib.rs runs them
// once; refuse a build where the wrappers are back (the names are still in cargo's output).
const built = fs.readFileSync(path.join(root, 'target/wasm/wasm32-unknown-unknown/release/tgate_wasm.wasm'));
if (built.includes('.command_export') || !built.includes('__wasm_call_ctors')) {
  throw new Error('the wasm module wraps its exports in static-constructor calls (`.command_export`): '
    + 'call __wasm_call_ctors once from the start function (crates/tgate-wasm/src/lib.rs)');
}
// Function names are only for debugging: dropped (a fifth of the module).
run('wasm-bindgen', ['--target', 'web', '--no-typescript', '--remove-name-section', '--remove-producers-section', '--out-dir', 'web/pkg',
  'target/wasm/wasm32-unknown-unknown/release/tgate_wasm.wasm']);
