// The generation worker: owns the wasm module and the WebGPU device, so the page never blocks.
//
// Requests: { id, type: 'init' | 'load' | 'generate' | 'cancel', ... }.
// Replies:  { id, type: 'step', report } during a generation, then { id, ok: true, result } or
//           { id, ok: false, error: { code, message } }.

import init, { Engine } from '../pkg/tgate_wasm.js';

let engine = null;
let ready = null;
let busy = false;
const cancelled = new Set();

function fail(id, err) {
  const code = err && typeof err.name === 'string' && err.name !== 'Error' && err.name !== 'RuntimeError'
    ? err.name
    : (err instanceof WebAssembly.RuntimeError ? 'device_lost' : 'internal');
  const message = err && err.message ? err.message : String(err);
  self.postMessage({ id, ok: false, error: { code, message } });
}

async function ensureEngine() {
  if (!ready) {
    ready = (async () => {
      if (!self.navigator || !self.navigator.gpu) {
        const e = new Error('this browser has no WebGPU (navigator.gpu is missing)');
        e.name = 'webgpu_unsupported';
        throw e;
      }
      await init();
      engine = await Engine.create();
    })();
    ready.catch(() => { ready = null; });
  }
  return ready;
}

self.onmessage = async (event) => {
  const msg = event.data;
  const { id } = msg;
  if (msg.type === 'cancel') {
    cancelled.add(msg.target);
    return;
  }
  if (busy && msg.type !== 'init') {
    self.postMessage({ id, ok: false, error: { code: 'busy', message: 'a load or generation is already running' } });
    return;
  }
  try {
    await ensureEngine();
    if (msg.type === 'init') {
      self.postMessage({ id, ok: true, result: null });
    } else if (msg.type === 'load') {
      busy = true;
      try {
        if (msg.kind !== 'sd') {
          const e = new Error(`kind '${msg.kind}' is not supported by this build (only 'sd')`);
          e.name = 'invalid_parameter';
          throw e;
        }
        engine.loadStableDiffusion(msg.files);
      } finally {
        busy = false;
      }
      self.postMessage({ id, ok: true, result: null });
    } else if (msg.type === 'generate') {
      busy = true;
      try {
        const result = await engine.generate(msg.params, msg.noise || undefined, (report) => {
          self.postMessage({ id, type: 'step', report });
          return !cancelled.has(id);
        });
        self.postMessage({ id, ok: true, result }, [result.latents.buffer, result.rgba.buffer]);
      } finally {
        busy = false;
        cancelled.delete(id);
      }
    } else {
      self.postMessage({ id, ok: false, error: { code: 'invalid_parameter', message: `unknown request ${msg.type}` } });
    }
  } catch (err) {
    fail(id, err);
  }
};
