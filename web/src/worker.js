// The generation worker: owns the wasm module and the WebGPU device, so the page never blocks.
//
// Requests: { id, type: 'init' | 'load' | 'generate' | 'cancel', ... }; and { type: 'precompile',
// ... } (no answer: its report joins the next load's result).
// Replies:  { id, type: 'step', report } during a generation, then { id, ok: true, result } or
//           { id, ok: false, fatal, error: { code, message } }. `fatal`: the module trapped (a
//           Rust panic) or the WebGPU device was lost, and this worker must be replaced.

import init, { Engine, lastPanic } from '../pkg/tgate_wasm.js';

let engine = null;
let bindingLimit = undefined; // the adapter's largest storage binding, in bytes
let ready = null;
let busy = false;
let trapped = null;
let current = null; // the id of the running load or generation
// The last kernel precompilation: `{ token, promise, settle }`; `promise` resolves to its report
// (or `{ error }`) and never rejects. Only the load sent with the same token reports it.
let precompiling = null;
const failedReport = (e) => ({ error: { code: (e && e.name) || 'internal', message: String((e && e.message) || e) } });
const cancelled = new Set();
const cancelWaiters = new Map(); // id → resolves the promise the running generation races against
const CODES = new Set([
  'webgpu_unsupported', 'device_lost', 'out_of_memory', 'bad_weights', 'network', 'cancelled',
  'busy', 'invalid_parameter',
]);

function fail(id, err) {
  let code = err && CODES.has(err.name) ? err.name : 'internal';
  let message = err && err.message ? err.message : String(err);
  let fatal = false;
  if (err instanceof WebAssembly.RuntimeError || trapped) {
    // A panic: the message was recorded by the panic hook before the trap.
    fatal = true;
    let panic = null;
    try { panic = lastPanic(); } catch (_) { /* the module is unusable */ }
    if (panic) { code = panic.name; message = panic.message; }
    else if (code === 'internal') code = 'device_lost';
    trapped = trapped || { code, message };
  } else if (code === 'device_lost') {
    // The engine's device is gone for good: this worker is replaced too, with a new device.
    fatal = true;
    trapped = trapped || { code, message };
  }
  self.postMessage({ id, ok: false, fatal, error: { code, message } });
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
      // cubecl requests the adapter's own limits (of the high-performance adapter, as asked
      // here); no tensor may exceed one binding. Without an answer, no limit is applied.
      try {
        const adapter = await self.navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
        if (adapter) bindingLimit = Math.min(adapter.limits.maxStorageBufferBindingSize, adapter.limits.maxBufferSize);
      } catch (_) { /* keep the engine; the load-time check is skipped */ }
    })();
    ready.catch(() => { ready = null; });
  }
  return ready;
}

// The memory a generation may use at once: the caller's, else the device's memory as the
// browser reports it (navigator.deviceMemory, in GiB, rounded and capped by the browser; GPUs
// report none). Without either, only the per-binding limit applies.
function memoryBudget(given) {
  if (typeof given === 'number') return given;
  const gib = self.navigator && self.navigator.deviceMemory;
  return typeof gib === 'number' && gib > 0 ? gib * 2 ** 30 : undefined;
}

// A trap inside a polled future surfaces here rather than in the awaited promise (which then
// never settles): answer the running request, so nothing hangs.
function onUncaught(event) {
  const err = event.error || event.reason || new Error(event.message || 'unknown error');
  if (current === null) {
    // A trap in a precompilation's own work: its load must not wait for it forever, and the
    // module is unusable (that load then fails as any crash does).
    if (!precompiling) return;
    event.preventDefault();
    precompiling.settle(failedReport(err));
    fail(undefined, err instanceof WebAssembly.RuntimeError ? err : new WebAssembly.RuntimeError(String((err && err.message) || err)));
    return;
  }
  event.preventDefault();
  const id = current;
  current = null;
  fail(id, err instanceof WebAssembly.RuntimeError ? err : new WebAssembly.RuntimeError(String((err && err.message) || err)));
}
self.addEventListener('error', onUncaught);
self.addEventListener('unhandledrejection', onUncaught);

self.onmessage = async (event) => {
  const msg = event.data;
  const { id } = msg;
  if (msg.type === 'cancel') {
    cancelled.add(msg.target);
    const wake = cancelWaiters.get(msg.target);
    if (wake) wake();
    return;
  }
  // A precompilation is only worth it before a load; never answered.
  if (msg.type === 'precompile' && (busy || trapped)) return;
  if (trapped) {
    fail(id, Object.assign(new Error(trapped.message), { name: trapped.code }));
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
    } else if (msg.type === 'precompile') {
      // The model's kernels, compiled on placeholder weights while the real ones download.
      // One at a time: a later one (its load never came, say) starts when the earlier has run.
      const limit = bindingLimit === undefined ? msg.maxTensorBytes : Math.min(bindingLimit, msg.maxTensorBytes || Infinity);
      const earlier = precompiling ? precompiling.promise : Promise.resolve();
      let settle;
      const promise = new Promise((resolve) => { settle = resolve; });
      precompiling = { token: msg.token, promise, settle };
      await earlier;
      try {
        engine.precompile(msg.kind, msg.files, msg.priorFiles || undefined, msg.dtype, msg.width, msg.height, limit, memoryBudget(msg.maxMemoryBytes))
          .then(settle, (e) => settle(failedReport(e)));
      } catch (e) {
        settle(failedReport(e));
        if (e instanceof WebAssembly.RuntimeError) throw e;
      }
    } else if (msg.type === 'load') {
      busy = true;
      current = id;
      try {
        // The placeholders of a precompilation go before the real weights take their memory;
        // only this load's own precompilation is reported.
        const pending = precompiling;
        precompiling = null;
        const report = pending ? await pending.promise : undefined;
        const precompiled = pending && pending.token === msg.precompileToken ? report : undefined;
        // Progress is posted at most every 50 ms, not per tensor, and the final count always
        // (the last read may end short of the total, which is then never posted by itself).
        let last = 0;
        let unposted = null;
        const limits = [bindingLimit, msg.maxTensorBytes].filter((v) => typeof v === 'number');
        const info = engine.load(msg.kind, msg.files, msg.priorFiles || undefined, (loaded, total) => {
          const now = performance.now();
          if (now - last < 50 && loaded < total) {
            unposted = { loaded, total };
            return;
          }
          last = now;
          unposted = null;
          self.postMessage({ id, type: 'progress', report: { loaded, total } });
        }, limits.length ? Math.min(...limits) : undefined, msg.dtype, msg.variant, memoryBudget(msg.maxMemoryBytes));
        if (unposted) self.postMessage({ id, type: 'progress', report: unposted });
        if (precompiled) info.precompile = precompiled;
        self.postMessage({ id, ok: true, result: info });
      } finally {
        busy = false;
        current = null;
      }
    } else if (msg.type === 'generate') {
      busy = true;
      current = id;
      try {
        // Settles on a cancel request: the engine then answers at once, even mid-step.
        const cancel = new Promise((resolve) => cancelWaiters.set(id, resolve));
        if (cancelled.has(id)) cancelWaiters.get(id)();
        const result = await engine.generate(msg.params, msg.noise || undefined, (report) => {
          const transfer = report.preview ? [report.preview.rgba.buffer] : [];
          self.postMessage({ id, type: 'step', report }, transfer);
          return !cancelled.has(id);
        }, cancel);
        const transfer = [result.rgba.buffer, ...Object.values(result.latents).map((t) => t.data.buffer)];
        self.postMessage({ id, ok: true, result }, transfer);
      } finally {
        busy = false;
        current = null;
        cancelled.delete(id);
        cancelWaiters.delete(id);
      }
    } else {
      self.postMessage({ id, ok: false, error: { code: 'invalid_parameter', message: `unknown request ${msg.type}` } });
    }
  } catch (err) {
    fail(id, err);
  }
};
