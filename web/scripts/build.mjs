// Builds the wasm crate and binds it with wasm-bindgen (the CLI at the crate's exact version,
// installed from crates.io: `cargo install wasm-bindgen-cli --version 0.2.130`).
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const profile = process.env.TGATE_WASM_PROFILE || 'dev';
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

run('cargo', ['build', '--target', 'wasm32-unknown-unknown', '-p', 'tgate-wasm',
  ...(profile === 'release' ? ['--release'] : [])]);
const dir = profile === 'release' ? 'release' : 'debug';
run('wasm-bindgen', ['--target', 'web', '--no-typescript', '--out-dir', 'web/pkg',
  `target/wasm32-unknown-unknown/${dir}/tgate_wasm.wasm`]);
