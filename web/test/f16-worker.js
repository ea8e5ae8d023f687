// Test worker: the package's own worker on a device that pretends to compute in f16 and to
// overflow there. SwiftShader has no shader-f16, so a load asking for f16 (or 'auto') runs in f32
// and is reported as f16, and every generation of such a model reports non-finite latents, as an
// f16 overflow would; a load asking for f32 runs untouched. Used by the browser test of the
// page's f16 → f32 retry only.
import '../src/worker.js';

const SEEDS = 'tgate-test-f16-seeds';
let pretend = false;
const kinds = new Map(); // request id → 'load' | 'generate', until it is answered
const post = self.postMessage.bind(self);
self.postMessage = (msg, transfer) => {
  const kind = kinds.get(msg.id);
  if (kind && msg.ok !== undefined) {
    kinds.delete(msg.id);
    if (msg.ok && pretend && kind === 'load') msg.result.dtype = 'f16';
    if (msg.ok && pretend && kind === 'generate') {
      msg.result.finite = false;
      // The seed this (discarded) run drew, for the test to check that the retry reused it.
      const seed = String(msg.result.seed);
      caches.open(SEEDS).then((c) => c.put('/first-seed', new Response(seed)));
    }
  }
  return transfer ? post(msg, transfer) : post(msg);
};

const handle = self.onmessage;
self.onmessage = (event) => {
  const msg = event.data;
  if (msg.type === 'load') {
    pretend = msg.dtype !== 'f32';
    kinds.set(msg.id, 'load');
    return handle({ data: { ...msg, dtype: 'f32' } });
  }
  if (msg.type === 'generate') kinds.set(msg.id, 'generate');
  return handle(event);
};
