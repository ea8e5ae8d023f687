// Browser-side half of the tests: drives the public API against the fixtures served over HTTP.
import { detect, Generator, inspect, purgeCache, TGateError } from '../src/index.js';

/** Removes the files under `baseUrl` (a path) from the generator's browser cache. */
async function forget(baseUrl) {
  const cache = await caches.open('tgate-weights-v1');
  for (const req of await cache.keys()) if (new URL(req.url).pathname.startsWith(baseUrl)) await cache.delete(req);
}

/** Minimal safetensors reader (F32 only, which is what the reference files hold). */
function readSafetensors(buffer) {
  const view = new DataView(buffer);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, n)));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    if (t.dtype !== 'F32') continue; // ids and masks (I64) are not needed here
    const [a, b] = t.data_offsets;
    out[name] = { shape: t.shape, data: new Float32Array(buffer.slice(8 + n + a, 8 + n + b)) };
  }
  return out;
}

/** Writes F32 tensors in the safetensors format (the CLI's --noise file). */
function writeSafetensors(tensors) {
  const header = {};
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: 'F32', shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  while ((json.length + 8) % 8) json += ' ';
  const head = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let pos = 8 + head.length;
  for (const t of Object.values(tensors)) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), pos);
    pos += t.data.byteLength;
  }
  return out;
}

let generator = null;
async function gen() {
  // On the demo page, use its generator (kernels already compiled there).
  if (!generator) generator = (window.tgateDemo && window.tgateDemo.generator) || await Generator.create();
  return generator;
}

async function reference(fixture) {
  const base = `/tests/fixtures/${fixture}`;
  const ref = readSafetensors(await (await fetch(`${base}/reference.safetensors`)).arrayBuffer());
  const json = await (await fetch(`${base}/reference.json`)).json();
  return { ref, json };
}

function compare(actual, expected) {
  let err = 0;
  let scale = 1;
  for (let i = 0; i < expected.length; i++) {
    scale = Math.max(scale, Math.abs(expected[i]));
    const d = Math.abs(actual[i] - expected[i]);
    err = Math.max(err, Number.isNaN(d) ? Infinity : d);
  }
  return { err, scale };
}

/**
 * Median step time per phase of `stage`. Kernels of the planning phase were compiled by an
 * earlier run; the first gated step compiles the one-batch kernels, so it is left out. The
 * lower median: with two planning steps, one may also compile the gate's caching kernels.
 */
function phases(steps, stage) {
  const own = steps.filter((t) => t.stage === stage);
  const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[(s.length - 1) >> 1]; };
  const sp = own.filter((t) => t.phase === 'semantics-planning');
  const fi = own.filter((t) => t.phase === 'fidelity-improving').slice(1);
  const ms = (xs) => median(xs.map((t) => t.ms));
  // Kernel launches of a warm step (the last of its phase: no compilation or caching in it).
  const launches = (xs) => (xs.length ? xs[xs.length - 1].launches : undefined);
  const enqueue = (xs) => median(xs.map((t) => t.enqueueMs));
  const out = { spMs: ms(sp), spLaunches: launches(sp), spEnqueueMs: enqueue(sp) };
  if (!fi.length) return out;
  return { ...out, fiMs: ms(fi), fiLaunches: launches(fi), fiEnqueueMs: enqueue(fi), ratio: ms(fi) / ms(sp) };
}

function errorInfo(e) {
  return { code: e instanceof TGateError ? e.code : `untyped:${e && e.name}`, message: String(e && e.message) };
}

const SD_FIXTURE_FILES = [
  'tokenizer/vocab.json', 'tokenizer/merges.txt', 'tokenizer/tokenizer_config.json',
  'tokenizer/special_tokens_map.json', 'scheduler/scheduler_config.json',
  'text_encoder/config.json', 'text_encoder/model.safetensors', 'unet/config.json',
  'unet/diffusion_pytorch_model.safetensors', 'vae/config.json', 'vae/diffusion_pytorch_model.safetensors',
];

window.harness = {
  detect,
  purgeCache,

  /** Loads over HTTP; also returns the upload progress reports. */
  async load(fixture, kind = 'sd') {
    const g = await gen();
    const upload = [];
    const r = await g.load({
      baseUrl: `/tests/fixtures/${fixture}/`,
      kind,
      onProgress: (p) => { if (p.phase === 'upload') upload.push([p.loaded, p.total]); },
    });
    return { ...r, upload };
  },

  /** Loads an SD folder from any URL; also returns the progress phases seen. */
  async loadUrl(baseUrl) {
    const progress = new Set();
    const r = await (await gen()).load({ baseUrl, kind: 'sd', onProgress: (p) => progress.add(p.phase) });
    return { ...r, progress: [...progress] };
  },

  /** Starts a generation whose noise file downloads slowly and aborts it meanwhile. */
  async abortNoiseDownload(url) {
    const controller = new AbortController();
    const running = (await gen()).generate({ prompt: 'x', steps: 2, noise: url, signal: controller.signal });
    setTimeout(() => controller.abort(), 300);
    try {
      await running;
      return { code: 'none' };
    } catch (e) {
      return errorInfo(e);
    }
  },

  /**
   * Aborts a load once the worker has the files (they are given as files, so nothing is
   * downloaded first), then checks that generating is refused (no model) and a new load works.
   */
  async abortLoad(fixture) {
    const g = await gen();
    const files = new Map();
    for (const name of SD_FIXTURE_FILES) {
      files.set(name, await (await fetch(`/tests/fixtures/${fixture}/${name}`)).blob());
    }
    const controller = new AbortController();
    const t0 = performance.now();
    const loading = g.load({ files, kind: 'sd', signal: controller.signal });
    // load() has posted the files to the worker by now (its first await is on the worker).
    controller.abort();
    let aborted = null;
    try {
      await loading;
      aborted = { code: 'none' };
    } catch (e) {
      aborted = errorInfo(e);
    }
    const answeredMs = performance.now() - t0;
    // Generating without a model is refused; a new load works.
    let without = null;
    try {
      await g.generate({ prompt: 'x', steps: 1, seed: 1 });
      without = { code: 'none' };
    } catch (e) {
      without = errorInfo(e);
    }
    const next = await g.load({ baseUrl: `/tests/fixtures/${fixture}/`, kind: 'sd' });
    return { aborted, answeredMs, without, nextKind: next.kind };
  },

  /**
   * Cancels 200 ms into a generation at a size not run before (its text encoding and first
   * step's kernel compilation take longer): the answer must come before any step report.
   */
  async cancelEarly(size) {
    const g = await gen();
    const controller = new AbortController();
    let steps = 0;
    const t0 = performance.now();
    const running = g.generate({
      prompt: 'x', steps: 4, seed: 1, width: size, height: size, signal: controller.signal,
      onStep: () => { steps += 1; },
    });
    setTimeout(() => controller.abort(), 200);
    try {
      await running;
      return { code: 'none', steps };
    } catch (e) {
      return { ...errorInfo(e), steps, answeredMs: performance.now() - t0 };
    }
  },

  /** Loads the SD fixture from Blobs, as a page does with user-picked files. */
  async loadBlobs(fixture) {
    const files = new Map();
    const sizes = {};
    for (const name of SD_FIXTURE_FILES) {
      const blob = await (await fetch(`/tests/fixtures/${fixture}/${name}`)).blob();
      files.set(name, blob);
      sizes[name] = blob.size;
    }
    const r = await (await gen()).load({ files, kind: 'sd' });
    return { ...r, sizes };
  },

  /** Generates with the reference noise and compares the latents with `key`. */
  async sdCase(fixture, { scheduler, gate, key, deepCache, expected }) {
    const { ref, json } = await reference(fixture);
    // `expected`: another fixture's references hold `key` (DeepCache's runs of sd1).
    const want = expected ? (await reference(expected)).ref : ref;
    const noise = writeSafetensors({ noise: ref['pipe.noise'], step_noise: ref['pipe.step_noise'] });
    const g = await gen();
    const params = {
      prompt: json.prompt,
      negativePrompt: json.negative_prompt || '',
      steps: json.steps,
      guidance: json.guidance,
      scheduler,
      width: json.width,
      height: json.height,
      gate,
      noise,
    };
    if (deepCache) params.deepCache = deepCache;
    const out = await g.generate(params);
    return {
      ...compare(out.latents.latents.data, want[key].data),
      shallow: out.timings.steps.filter((t) => t.shallow).map((t) => t.step),
      timings: out.timings.steps,
      phases: phases(out.timings.steps, 'unet'),
      width: out.image.width,
      height: out.image.height,
    };
  },

  /**
   * A seeded gated run at `size`² for step times only (compute, not dispatch, dominates there),
   * with the prompt and guidance of `fixture`'s references; `fixture` null: a model without
   * references (the benchmark model), prompted with `prompt`.
   */
  async sdTiming(fixture, { size, steps, gateStep, prompt = 'a tiny red fox' }) {
    const { json } = fixture ? await reference(fixture) : { json: { prompt, negative_prompt: '', guidance: 7.5 } };
    const out = await (await gen()).generate({
      prompt: json.prompt, negativePrompt: json.negative_prompt, steps, guidance: json.guidance,
      scheduler: 'ddim', width: size, height: size, seed: 7, gate: { step: gateStep },
    });
    return { timings: out.timings.steps, phases: phases(out.timings.steps, 'unet'), finite: out.finite, totalMs: out.timings.totalMs };
  },

  /**
   * One generation with `params` (the generator's own), for its times: `totalMs` (the result's:
   * text encoding, every step, the VAE decode and the readback of the image), `wallMs` (around
   * the call), `unetMs` (the steps' times summed) and the per-phase medians.
   */
  async generateTiming(params) {
    const t0 = performance.now();
    const out = await (await gen()).generate(params);
    const wallMs = performance.now() - t0;
    const steps = out.timings.steps;
    return {
      totalMs: out.timings.totalMs,
      wallMs,
      unetMs: steps.reduce((a, t) => a + t.ms, 0),
      firstStepMs: steps.length ? steps[0].ms : null,
      stepMs: steps.map((t) => t.ms),
      unetCalls: steps.length,
      phases: phases(steps, 'unet'),
      finite: out.finite,
      size: [out.image.width, out.image.height],
    };
  },

  /**
   * The same UNet in ONNX Runtime Web's WebGPU backend (the engine behind most in-browser
   * generators): `<model>unet/model.onnx` (made by tests/export_onnx.py), its weights read from
   * the folder's safetensors as external data. `model`: a model folder's URL ending in `/`
   * (`/target/bench-sd15/`), or a fixture's name (`sd1`: `/tests/fixtures/sd1/`). Times the
   * session, the first run at batch 2 and 1, then `runs` warm runs of each (a run includes
   * reading the output back, as our step includes its one-value readback).
   */
  async ortTiming(model, { size, runs = 3 }) {
    const dist = '/web/node_modules/onnxruntime-web/dist/';
    const ort = await import(`${dist}ort.webgpu.min.mjs`);
    ort.env.wasm.wasmPaths = dist;
    ort.env.wasm.numThreads = 1;
    const base = `${model.endsWith('/') ? model : `/tests/fixtures/${model}/`}unet/`;
    const cfg = await (await fetch(`${base}config.json`)).json();
    let t = performance.now();
    const session = await ort.InferenceSession.create(`${base}model.onnx`, {
      executionProviders: ['webgpu'],
      externalData: [{ path: 'diffusion_pytorch_model.safetensors', data: `${base}diffusion_pytorch_model.safetensors` }],
    });
    const sessionMs = performance.now() - t;
    const side = size / 8;
    const d = cfg.cross_attention_dim;
    const noise = (n) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898) * 0.5);
    const feeds = (b) => ({
      sample: new ort.Tensor('float32', noise(b * cfg.in_channels * side * side), [b, cfg.in_channels, side, side]),
      timestep: new ort.Tensor('float32', Float32Array.of(500), [1]),
      encoder_hidden_states: new ort.Tensor('float32', noise(b * 77 * d), [b, 77, d]),
    });
    const once = async (b) => {
      const f = feeds(b);
      t = performance.now();
      const out = await session.run(f);
      const ms = performance.now() - t;
      if (!out.noise_pred.data.every(Number.isFinite)) throw new Error('ONNX Runtime produced non-finite values');
      return ms;
    };
    const first = { 2: await once(2), 1: await once(1) };
    const warm = { 2: [], 1: [] };
    for (let i = 0; i < runs; i++) for (const b of [2, 1]) warm[b].push(await once(b));
    const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];
    await session.release();
    return { sessionMs, firstMs: first, batch2Ms: median(warm[2]), batch1Ms: median(warm[1]), warm };
  },

  /** Würstchen with the reference noise; compares both stages' latents with `<prefix>.*`. */
  async wuerstchenCase(fixture, { gate, prefix }) {
    const { ref, json } = await reference(fixture);
    const noise = writeSafetensors({
      prior_noise: ref['pipe.prior_noise'],
      prior_step_noise: ref['pipe.prior_step_noise'],
      decoder_noise: ref['pipe.decoder_noise'],
      decoder_step_noise: ref['pipe.decoder_step_noise'],
    });
    const g = await gen();
    const out = await g.generate({
      prompt: json.prompt,
      negativePrompt: json.negative_prompt,
      steps: json.prior_steps,
      guidance: json.prior_guidance,
      decoderSteps: json.decoder_steps,
      decoderGuidance: json.decoder_guidance,
      width: json.width,
      height: json.height,
      gate,
      noise,
    });
    return {
      prior: compare(out.latents.prior_latents.data, ref[`${prefix}.prior_latents`].data),
      decoder: compare(out.latents.decoder_latents.data, ref[`${prefix}.decoder_latents`].data),
      timings: out.timings.steps,
      phases: phases(out.timings.steps, 'prior'),
      width: out.image.width,
      height: out.image.height,
    };
  },

  /** Cancels after `after` steps, then checks that the next generation succeeds. */
  async cancelThenGenerate(fixture, after) {
    const { json } = await reference(fixture);
    const g = await gen();
    const controller = new AbortController();
    let steps = 0;
    let cancelled = null;
    try {
      await g.generate({
        prompt: json.prompt, steps: json.steps, seed: 1, signal: controller.signal,
        onStep: () => { steps += 1; if (steps === after) controller.abort(); },
      });
    } catch (e) {
      cancelled = errorInfo(e);
    }
    const next = await g.generate({ prompt: json.prompt, steps: 2, seed: 2, scheduler: 'ddim' });
    return { cancelled, stepsBeforeCancel: steps, nextSteps: next.timings.steps.length };
  },

  /**
   * A generator whose first generation finds its WebGPU device destroyed (see lost-worker.js):
   * it must fail with `device_lost`, and the next one must succeed on a new worker and device,
   * with the model loaded again from the browser cache. The recovered generator then serves the
   * following steps (its new worker has compiled this model's kernels by then).
   */
  async deviceLost(fixture, kind) {
    const { json } = await reference(fixture);
    const g = await Generator.create({ workerUrl: new URL('./lost-worker.js', import.meta.url) });
    await g.load({ baseUrl: `/tests/fixtures/${fixture}/`, kind });
    const params = kind === 'sd'
      ? { prompt: json.prompt, seed: 3, steps: 2, scheduler: 'ddim', gate: false }
      : {
        prompt: json.prompt, seed: 3, steps: 2, guidance: json.prior_guidance, decoderSteps: 2,
        decoderGuidance: json.decoder_guidance, width: json.width, height: json.height, gate: false,
      };
    let lost = null;
    let steps = 0;
    await caches.open('tgate-test-device-lost'); // armed: the next generate request loses the device
    const t0 = performance.now();
    // A generation left hanging on the lost device fails the test here, not at the suite timeout.
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no answer within 300 s')), 300_000));
    try {
      await Promise.race([g.generate({ ...params, onStep: () => { steps += 1; } }), timeout]);
    } catch (e) {
      lost = errorInfo(e);
    }
    const lostMs = performance.now() - t0;
    const disarmed = !(await caches.has('tgate-test-device-lost'));
    const t1 = performance.now();
    const next = await g.generate(params);
    const nextMs = performance.now() - t1;
    generator = g;
    return { lost, disarmed, stepsBeforeLoss: steps, lostMs, nextMs, nextSteps: next.timings.steps.length };
  },

  /**
   * A GPU buffer mapping that fails on a live device (see lost-worker.js): the generation must
   * fail with `internal`, not `device_lost`. Runs on the suite's generator, a lost-worker.js one
   * since the device-loss test (`own`: a new one, when this step runs alone); that worker's later
   * readbacks fail too (a known weakness), so this runs after every other generation.
   */
  async failedReadback(own = false) {
    const g = own ? await Generator.create({ workerUrl: new URL('./lost-worker.js', import.meta.url) }) : await gen();
    await g.load({ baseUrl: '/tests/fixtures/sd1/', kind: 'sd' });
    const params = { prompt: 'x', steps: 2, seed: 1, scheduler: 'ddim' };
    await g.generate(params);
    await caches.open('tgate-test-readback-fails');
    const bounded = (p) => Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error('no answer within 240 s')), 240_000))]);
    let failedRead = null;
    try {
      await bounded(g.generate(params));
    } catch (e) {
      failedRead = errorInfo(e);
    }
    return { failedRead, disarmed: !(await caches.has('tgate-test-readback-fails')) };
  },

  /**
   * `load({ precompile })` on a fresh generator: the kernels run on placeholder weights before the
   * weights arrive, then the real generation still matches the references (`key`); a size the
   * model refuses fails the precompilation only, not the load.
   */
  async precompileCase({ key }) {
    const own = await Generator.create();
    const shared = generator;
    try {
      const base = { baseUrl: '/tests/fixtures/sd1/', kind: 'sd' };
      const refused = await own.load({ ...base, precompile: { width: 60, height: 64 } });
      const loaded = await own.load({ ...base, precompile: { width: 64, height: 64 } });
      generator = own;
      const r = await window.harness.sdCase('sd1', { scheduler: 'pndm', gate: { step: 3 }, key });
      let orphan = null;
      try {
        await own.load({ baseUrl: '/nofull/sd1/', kind: 'sd', precompile: true });
      } catch (e) {
        orphan = errorInfo(e);
      }
      const after = await own.load({ ...base, precompile: false });
      return {
        refused: refused.precompile, precompile: loaded.precompile, err: r.err, scale: r.scale,
        stepMs: r.timings.map((t) => Math.round(t.ms)), orphan, afterOrphan: { kind: after.kind, precompile: after.precompile },
      };
    } finally {
      generator = shared;
      own.terminate();
    }
  },

  /**
   * precompile: 'auto' (the default) on a folder with a large weight file: loaded into a fresh
   * worker (not cached), again into the same worker, then into another fresh worker (cached);
   * then the references of a gated run on the last.
   */
  async autoPrecompile(baseUrl) {
    const summary = (r) => ({ precompile: r.precompile, weightBytes: r.weightBytes, largestReadBytes: r.largestReadBytes });
    const own = await Generator.create();
    const shared = generator;
    let fresh = null;
    try {
      const first = await own.load({ baseUrl, kind: 'sd' });
      // Out of the browser cache again: only the loaded model stops the second precompilation.
      await forget(baseUrl);
      const again = await own.load({ baseUrl, kind: 'sd' });
      fresh = await Generator.create();
      const cached = await fresh.load({ baseUrl, kind: 'sd' });
      generator = fresh;
      const r = await window.harness.sdCase('sd1', { scheduler: 'pndm', gate: { step: 3 }, key: 'pipe.pndm.tgate' });
      return { first: summary(first), again: summary(again), cached: summary(cached), err: r.err, scale: r.scale };
    } finally {
      generator = shared;
      own.terminate();
      if (fresh) fresh.terminate();
      // The 64 MiB file leaves the browser cache.
      await forget(baseUrl);
    }
  },

  /**
   * Time to first image of the sd1 fixture served at `baseUrl` (slowly, by the test server) in a
   * fresh worker, with `precompile` as given: load (download, precompilation), then 5 steps.
   */
  async firstImage(baseUrl, precompile) {
    const g = await Generator.create();
    try {
      const t0 = performance.now();
      const loaded = await g.load({ baseUrl, kind: 'sd', precompile });
      const loadMs = performance.now() - t0;
      const out = await g.generate({ prompt: 'a red fox', steps: 5, gate: { step: 2 }, seed: 3 });
      return {
        firstImageMs: performance.now() - t0, loadMs, precompile: loaded.precompile,
        firstStepMs: out.timings.steps[0].ms, stepMs: out.timings.steps.map((t) => Math.round(t.ms)),
      };
    } finally {
      g.terminate();
    }
  },

  /**
   * The page's f16 → f32 retry, on a worker whose f16 generations report non-finite latents
   * (f16-worker.js; SwiftShader cannot compute in f16): the result must come from one retry in
   * f32 with the same seed, equal to a plain f32 generation of that seed.
   */
  async f16Retry() {
    const g = await Generator.create({ workerUrl: new URL('./f16-worker.js', import.meta.url) });
    try {
      const loaded = await g.load({ baseUrl: '/tests/fixtures/sd1/', kind: 'sd', dtype: 'f16' });
      const steps = [];
      await caches.delete('tgate-test-f16-seeds');
      // No seed given: the first (f16) run draws one, and the retry must reuse it.
      const params = { prompt: 'a red fox', steps: 3, scheduler: 'ddim' };
      const retried = await g.generate({ ...params, onStep: (s) => steps.push(s.step) });
      const hit = await (await caches.open('tgate-test-f16-seeds')).match('/first-seed');
      const firstSeed = hit ? Number(await hit.text()) : null;
      await caches.delete('tgate-test-f16-seeds');
      const plain = await g.generate({ ...params, seed: retried.seed });
      const a = retried.latents.latents.data;
      const b = plain.latents.latents.data;
      let diff = a.length === b.length ? 0 : Infinity;
      for (let i = 0; i < Math.min(a.length, b.length); i++) diff = Math.max(diff, Math.abs(a[i] - b[i]));
      return {
        loadedDtype: loaded.dtype, retriedInF32: Boolean(retried.retriedInF32), finite: retried.finite,
        seed: retried.seed, firstSeed, stepsSeen: steps.length, plainRetried: Boolean(plain.retriedInF32),
        plainFinite: plain.finite, maxDiff: diff,
      };
    } finally {
      g.terminate();
    }
  },

  /** Loads under `maxTensorBytes`, then reports the typed error of a generation at `size`². */
  async generateError(fixture, maxTensorBytes, size) {
    const g = await gen();
    await g.load({ baseUrl: `/tests/fixtures/${fixture}/`, kind: 'sd', dtype: 'f32', maxTensorBytes });
    let steps = 0;
    try {
      await g.generate({ prompt: 'x', steps: 2, seed: 1, width: size, height: size, onStep: () => { steps += 1; } });
      return { code: 'none', steps };
    } catch (e) {
      return { ...errorInfo(e), steps };
    }
  },

  /**
   * A model whose f32 latents overflow: the result says `finite: false` (f32 has no wider type
   * to retry in); the sd1 fixture's result is finite.
   */
  async overflow(baseUrl) {
    const g = await gen();
    await g.load({ baseUrl, kind: 'sd', dtype: 'f32' });
    const bad = await g.generate({ prompt: 'x', steps: 2, seed: 1, scheduler: 'ddim' });
    await g.load({ baseUrl: '/tests/fixtures/sd1/', kind: 'sd' });
    const good = await g.generate({ prompt: 'x', steps: 2, seed: 1, scheduler: 'ddim' });
    return { finite: bad.finite, retriedInF32: Boolean(bad.retriedInF32), seed: bad.seed, normal: good.finite };
  },

  /**
   * The error codes only a faulty environment shows: `webgpu_unsupported` (a worker without
   * navigator.gpu) and `busy` (a load while a generation runs).
   */
  async faultCodes(own = false) {
    const out = {};
    // Each wait is bounded: a hang is reported as such, not as a stuck test.
    const bounded = (p) => Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error('no answer within 240 s')), 240_000))]);
    try {
      await bounded(Generator.create({ workerUrl: new URL('./fault-worker.js', import.meta.url) }));
      out.noWebgpu = { code: 'none' };
    } catch (e) {
      out.noWebgpu = errorInfo(e);
    }
    // `own`: a generator of its own (when the suite runs this step alone).
    const g = own ? await Generator.create() : await gen();
    await g.load({ baseUrl: '/tests/fixtures/sd1/', kind: 'sd' });
    const params = { prompt: 'x', steps: 2, seed: 1, scheduler: 'ddim' };
    // A long generation, so the load surely arrives while it runs.
    const running = bounded(g.generate({ ...params, steps: 8 }));
    try {
      await g.load({ baseUrl: '/tests/fixtures/sd1/', kind: 'sd' });
      out.busy = { code: 'none' };
    } catch (e) {
      out.busy = errorInfo(e);
    }
    await running;
    return out;
  },

  /** What `inspect` says a model folder would download and hold on the GPU. */
  async inspectCase(baseUrl, options = {}) {
    return inspect({ baseUrl, kind: 'sd', ...options });
  },

  /** Loads from a URL and reports the typed error. */
  async loadError(baseUrl, kind = 'sd', options = {}) {
    try {
      await (await gen()).load({ baseUrl, kind, ...options });
      return { code: 'none' };
    } catch (e) {
      return errorInfo(e);
    }
  },
};
window.harnessReady = true;
