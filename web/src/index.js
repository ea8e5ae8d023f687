// tgate-web: text-to-image on WebGPU (Stable Diffusion with T-GATE, Würstchen v2), generation in
// a Web Worker.
//
//   import { detect, Generator } from 'tgate-web';
//   const gen = await Generator.create();
//   await gen.load({ baseUrl: 'https://huggingface.co/<repo>/resolve/main/', kind: 'sd', onProgress });
//   const { image, latents, timings } = await gen.generate({ prompt: 'a red fox', steps: 25 });

const CACHE = 'tgate-weights-v1';

/** A typed error: `code` is one of the package's error codes. */
export class TGateError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'TGateError';
    this.code = code;
  }
}

/** WebGPU availability, the adapter's limits and whether it has `shader-f16`. */
export async function detect() {
  const gpu = globalThis.navigator && globalThis.navigator.gpu;
  if (!gpu) return { webgpu: false, shaderF16: false, limits: null };
  const adapter = await gpu.requestAdapter();
  if (!adapter) return { webgpu: false, shaderF16: false, limits: null };
  const l = adapter.limits;
  return {
    webgpu: true,
    shaderF16: adapter.features.has('shader-f16'),
    limits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
    },
  };
}

/** Deletes every cached download. */
export async function purgeCache() {
  if (globalThis.caches) await caches.delete(CACHE);
}

// The files of each diffusers layout. `tokenizer`: a tokenizer folder (`tokenizer.json` as
// transformers 5 saves it, else `vocab.json` + `merges.txt`); `weights`: a safetensors stem, in
// the variant order of `variantOrder`, each as one file or as the shards of an index.
const TOKENIZER = (dir) => [
  [dir, { tokenizer: true }],
  [`${dir}/tokenizer_config.json`, { optional: true }],
  [`${dir}/special_tokens_map.json`, { optional: true }],
];
const TEXT_ENCODER = (dir) => [[`${dir}/config.json`], [`${dir}/model`, { weights: true }]];
const MODEL = (dir) => [[`${dir}/config.json`], [`${dir}/diffusion_pytorch_model`, { weights: true }]];

/**
 * Weight variants to try, best first ('' is the plain file), and why the first: the order of
 * the Rust loader (`Variant::order`). 'auto' follows the compute dtype: f16 downloads the
 * `fp16` files (half the bytes) when the folder has them.
 */
function variantOrder(variant, f16) {
  switch (variant) {
    case 'fp32': return [['', 'fp16', 'bf16'], 'variant fp32 requested'];
    case 'fp16': return [['fp16', '', 'bf16'], 'variant fp16 requested'];
    case 'bf16': return [['bf16', '', 'fp16'], 'variant bf16 requested'];
    default: return f16
      ? [['fp16', '', 'bf16'], 'f16 compute: the fp16 variant is preferred']
      : [['', 'fp16', 'bf16'], 'f32 compute: the full-precision file is preferred'];
  }
}

/** The single-file and sharded-index names of checkpoint `stem` in variant `v`, as diffusers names them. */
const checkpointNames = (stem, v) => (v
  ? [`${stem}.${v}.safetensors`, `${stem}.safetensors.index.${v}.json`]
  : [`${stem}.safetensors`, `${stem}.safetensors.index.json`]);

const SD_FILES = [
  ...TOKENIZER('tokenizer'), ['scheduler/scheduler_config.json'],
  ...TEXT_ENCODER('text_encoder'), ...MODEL('unet'), ...MODEL('vae'),
];
// Würstchen's decoder pipeline (`warp-ai/wuerstchen`) and its prior pipeline
// (`warp-ai/wuerstchen-prior`); a combined folder holds both, the prior parts as `prior_*`.
const WUERSTCHEN_DECODER = [
  ['model_index.json'], ...TOKENIZER('tokenizer'), ['scheduler/scheduler_config.json'],
  ...TEXT_ENCODER('text_encoder'), ...MODEL('decoder'), ...MODEL('vqgan'),
];
const WUERSTCHEN_PRIOR = (p) => [
  ...TOKENIZER(`${p}tokenizer`), [`${p}scheduler/scheduler_config.json`],
  ...TEXT_ENCODER(`${p}text_encoder`), ...MODEL(`${p}prior`),
];

const cancelled = () => new TGateError('cancelled', 'cancelled');

// Downloads `url` (or takes it from the browser cache) as a Blob. Nothing here holds the file in
// one ArrayBuffer: the body streams into the Cache API (or into a Blob of chunks where there is
// no cache), and the worker reads the Blob tensor by tensor. Only complete downloads stay cached.
async function fetchCached(url, signal, onBytes) {
  const cache = globalThis.caches ? await caches.open(CACHE) : null;
  const hit = cache ? await cache.match(url) : undefined;
  if (hit) {
    const blob = await hit.blob();
    onBytes(blob.size, url, blob.size);
    return { blob, fromCache: true };
  }
  let response;
  try {
    response = await fetch(url, { signal });
  } catch (e) {
    if (signal && signal.aborted) throw cancelled();
    throw new TGateError('network', `${url}: ${e.message}`);
  }
  if (response.status === 404) return null;
  if (!response.ok) throw new TGateError('network', `${url}: HTTP ${response.status}`);
  const total = Number(response.headers.get('content-length')) || 0;
  let received = 0;
  const counted = response.body.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      if (signal && signal.aborted) { controller.error(cancelled()); return; }
      received += chunk.length;
      onBytes(chunk.length, url, total);
      controller.enqueue(chunk);
    },
  }));
  let blob;
  try {
    if (cache) {
      await cache.put(url, new Response(counted, { headers: { 'content-type': 'application/octet-stream' } }));
      if (total && received !== total) {
        await cache.delete(url);
      } else {
        blob = await (await cache.match(url)).blob();
      }
    } else {
      const chunks = [];
      const reader = counted.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
      }
      blob = new Blob(chunks);
    }
  } catch (e) {
    if (cache) await cache.delete(url).catch(() => {});
    if (signal && signal.aborted) throw cancelled();
    if (e instanceof TGateError) throw e;
    throw new TGateError('network', `${url}: ${e.message}`);
  }
  if (total && received !== total) {
    throw new TGateError('network', `${url}: got ${received} of ${total} bytes`);
  }
  return { blob, fromCache: false };
}

/**
 * Downloads the small files of `list` below `base` into `map` (see TOKENIZER / MODEL for the entry
 * kinds) and picks each checkpoint's files without downloading them: the picks go to
 * `ctx.pending`, for the fit check and then `downloadWeights`.
 */
async function fetchFolder(base, list, map, ctx) {
  const root = base.endsWith('/') ? base : `${base}/`;
  const take = async (path) => {
    const got = await fetchCached(root + path, ctx.signal, ctx.report);
    if (!got) return null;
    map.set(path, got.blob);
    if (got.fromCache) ctx.stats.fromCache += 1; else ctx.stats.fromNetwork += 1;
    return got.blob;
  };
  const missing = (paths) => new TGateError('network', `HTTP 404 (not found): ${paths.map((p) => root + p).join(' or ')}`);
  for (const [name, opts = {}] of list) {
    if (opts.tokenizer) {
      if (await take(`${name}/tokenizer.json`)) continue;
      for (const f of ['vocab.json', 'merges.txt']) {
        if (!await take(`${name}/${f}`)) throw missing([`${name}/tokenizer.json`, `${name}/${f}`]);
      }
    } else if (opts.weights) {
      ctx.pending.push({ ...await chooseWeights(root, name, take, ctx, missing), take, missing, root });
    } else if (!await take(name) && !opts.optional) {
      throw missing([name]);
    }
  }
}

/**
 * Picks checkpoint `stem` in the first variant present (one file, or an index and its shards)
 * and reads the safetensors headers of its files, without downloading them.
 */
async function chooseWeights(root, stem, take, ctx, missing) {
  const [order, why] = ctx.variants;
  const part = stem.slice(0, stem.lastIndexOf('/'));
  const tried = [];
  for (const [i, v] of order.entries()) {
    const reason = i === 0 ? why : `${why}, but only this variant is present`;
    const [file, index] = checkpointNames(stem, v);
    const header = await headerOf(root + file, ctx.signal);
    if (header !== undefined) return { part, files: [file], reason, headers: [header] };
    const blob = await take(index);
    if (blob) {
      let shards;
      try {
        shards = [...new Set(Object.values(JSON.parse(await blob.text()).weight_map))];
      } catch (e) {
        throw new TGateError('bad_weights', `${index}: not a sharded-checkpoint index (${e.message})`);
      }
      // Shards lie beside the index (the Rust loader refuses anything else too).
      const bad = shards.find((f) => typeof f !== 'string' || !f || /[\\/]/.test(f) || f === '.' || f === '..');
      if (bad !== undefined || !shards.length) {
        throw new TGateError('bad_weights', `${index}: \`${bad}\` is not a shard file beside the index`);
      }
      const files = shards.map((f) => `${part}/${f}`);
      const headers = [];
      for (const f of files) {
        const h = await headerOf(root + f, ctx.signal);
        if (h === undefined) throw missing([f]);
        headers.push(h);
      }
      return { part, files, reason, headers };
    }
    tried.push(file, index);
  }
  throw missing(tried);
}

/**
 * 'auto' precompiles when at least this many weight bytes still come over the network: a
 * download long enough to hide the compilation (about 10 s of it on a software GPU; the
 * precompiling generation itself costs a few seconds, a loss when the weights are at hand).
 */
const PRECOMPILE_AUTO_BYTES = 64 * 2 ** 20;

/** Stored bytes of the picked checkpoints not wholly in the browser cache yet. */
async function networkBytes(pending) {
  const cache = globalThis.caches ? await caches.open(CACHE) : null;
  let bytes = 0;
  for (const pick of pending) {
    const cached = cache ? await Promise.all(pick.files.map((f) => cache.match(pick.root + f))) : [];
    if (cached.length && cached.every(Boolean)) continue;
    const { stored } = pickBytes(pick, false);
    bytes += stored === null ? Infinity : stored;
  }
  return bytes;
}

/** Downloads the files `chooseWeights` picked. */
async function downloadWeights({ part, files, reason, take, missing }, ctx) {
  ctx.select({ part, files, reason });
  for (const f of files) if (!await take(f)) throw missing([f]);
}

const DTYPE_BYTES = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

/** Stored and on-device bytes of one pick's tensors (`null` where a header could not be read). */
function pickBytes({ headers }, f16) {
  let stored = 0;
  let device = 0;
  for (const header of headers) {
    if (!header) return { stored: null, device: null };
    for (const [name, t] of Object.entries(header)) {
      if (name === '__metadata__' || !t || !Array.isArray(t.shape)) continue;
      const float = ['F64', 'F32', 'F16', 'BF16'].includes(t.dtype);
      const n = t.shape.reduce((a, b) => a * b, 1);
      device += n * (float ? (f16 ? 2 : 4) : (DTYPE_BYTES[t.dtype] || 4));
      const [start, end] = Array.isArray(t.data_offsets) ? t.data_offsets : [0, 0];
      stored += end - start;
    }
  }
  return { stored, device };
}

/**
 * Picks every weight file of a model folder (URLs) without downloading them: the configs and
 * tokenizers are fetched (into the cache), each checkpoint's variant is chosen and its
 * safetensors headers read with range requests. Fills `map` (and returns the prior's map).
 */
async function pickFolder({ baseUrl, priorBaseUrl, kind }, map, ctx) {
  if (kind === 'sd') {
    await fetchFolder(baseUrl, SD_FILES, map, ctx);
    return null;
  }
  if (priorBaseUrl) {
    await fetchFolder(baseUrl, WUERSTCHEN_DECODER, map, ctx);
    const priorMap = new Map();
    await fetchFolder(priorBaseUrl, [['model_index.json'], ...WUERSTCHEN_PRIOR('')], priorMap, ctx);
    return priorMap;
  }
  await fetchFolder(baseUrl, [...WUERSTCHEN_DECODER, ...WUERSTCHEN_PRIOR('prior_')], map, ctx);
  return null;
}

/**
 * What loading a model folder from URLs would take, before anything heavy is downloaded (for a
 * model picker): `{ kind, dtype, parts: [{ part, files, reason, downloadBytes, deviceBytes }],
 * downloadBytes, deviceBytes }`. `downloadBytes` counts the weight files' tensor data in the
 * variant that `load` would pick for `dtype` ('auto': f16 where the adapter has shader-f16);
 * `deviceBytes` the weights on the GPU in the compute dtype (activations come on top, see
 * `generate`'s `out_of_memory`). Sizes are `null` where the server answers without range
 * requests. Configs and tokenizers are fetched into the browser cache (a later `load` reuses them).
 */
export async function inspect({ baseUrl, priorBaseUrl, kind = 'sd', dtype = 'auto', variant = 'auto', signal } = {}) {
  if (!baseUrl) throw new TGateError('invalid_parameter', 'give baseUrl');
  if (kind !== 'sd' && kind !== 'wuerstchen') {
    throw new TGateError('invalid_parameter', `kind must be 'sd' or 'wuerstchen', got '${kind}'`);
  }
  const f16 = dtype === 'f16' || (dtype === 'auto' && (await detect()).shaderF16);
  const ctx = {
    stats: { bytes: 0, fromCache: 0, fromNetwork: 0 }, signal, report: () => {}, variants: variantOrder(variant, f16),
    pending: [], select: () => {},
  };
  await pickFolder({ baseUrl, priorBaseUrl, kind }, new Map(), ctx);
  const parts = ctx.pending.map((p) => {
    const b = pickBytes(p, f16);
    return { part: p.part, files: p.files, reason: p.reason, downloadBytes: b.stored, deviceBytes: b.device };
  });
  const sum = (k) => (parts.some((p) => p[k] === null) ? null : parts.reduce((a, p) => a + p[k], 0));
  return { kind, dtype: f16 ? 'f16' : 'f32', parts, downloadBytes: sum('downloadBytes'), deviceBytes: sum('deviceBytes') };
}

/**
 * Refuses, before any weight is downloaded, a model that cannot fit: a tensor bigger than one
 * binding of the adapter (in the compute dtype: float tensors become f16 or f32), or weights
 * bigger in all than the memory a generation may use. Files whose header could not be read
 * (a server without range requests) are checked by the worker as they load.
 */
function checkFit(picks, { bindingLimit, memoryBudget, f16 }) {
  let total = 0;
  for (const { part, headers } of picks) {
    for (const header of headers) {
      if (!header) continue;
      for (const [name, t] of Object.entries(header)) {
        if (name === '__metadata__' || !t || !Array.isArray(t.shape)) continue;
        const float = ['F64', 'F32', 'F16', 'BF16'].includes(t.dtype);
        const size = float ? (f16 ? 2 : 4) : (DTYPE_BYTES[t.dtype] || 4);
        const bytes = t.shape.reduce((a, b) => a * b, 1) * size;
        total += bytes;
        if (bindingLimit && bytes > bindingLimit) {
          throw new TGateError('out_of_memory', `${part}: tensor \`${name}\` needs ${bytes} bytes on the device, over the adapter's largest binding of ${bindingLimit} bytes (checked before downloading)`);
        }
      }
    }
  }
  if (memoryBudget && total > memoryBudget) {
    throw new TGateError('out_of_memory', `the weights need ${total} bytes on the device in all (${picks.map((p) => p.part).join(', ')}), over the ${memoryBudget} bytes available (checked before downloading)`);
  }
  return total;
}

/**
 * Bytes [start, end) of `url`: from the cache, or with a range request. `undefined`: no such
 * file; `null`: the server answers with whole files only (the body is not read).
 */
async function readRange(url, start, end, signal) {
  const cache = globalThis.caches ? await caches.open(CACHE) : null;
  const hit = cache ? await cache.match(url) : undefined;
  if (hit) return new Uint8Array(await (await hit.blob()).slice(start, end).arrayBuffer());
  let r;
  try {
    r = await fetch(url, { signal, headers: { range: `bytes=${start}-${end - 1}` } });
  } catch (e) {
    if (signal && signal.aborted) throw cancelled();
    throw new TGateError('network', `${url}: ${e.message}`);
  }
  if (r.status === 404) return undefined;
  if (r.status !== 206) {
    if (r.body) r.body.cancel().catch(() => {});
    if (r.ok) return null;
    throw new TGateError('network', `${url}: HTTP ${r.status}`);
  }
  return new Uint8Array(await r.arrayBuffer());
}

/** The safetensors header of `url` (`{ name: { dtype, shape, data_offsets } }`); `undefined`
 * when the file does not exist, `null` when it cannot be read without downloading it. */
async function headerOf(url, signal) {
  const head = await readRange(url, 0, 8, signal);
  if (!head) return head;
  if (head.length < 8) throw new TGateError('bad_weights', `${url}: too short for a safetensors file`);
  const n = Number(new DataView(head.buffer, head.byteOffset, 8).getBigUint64(0, true));
  if (n > 100_000_000) throw new TGateError('bad_weights', `${url}: a ${n}-byte safetensors header`);
  const json = await readRange(url, 8, 8 + n, signal);
  if (!json) return json;
  try {
    return JSON.parse(new TextDecoder().decode(json));
  } catch (e) {
    throw new TGateError('bad_weights', `${url}: corrupt safetensors header (${e.message})`);
  }
}

// User files: Blobs (a picked File is one) are handed to the worker as they are and read there
// tensor by tensor; bytes are copied, so the caller's arrays stay usable.
function toFileMap(files) {
  const map = new Map();
  for (const [k, v] of files instanceof Map ? files : Object.entries(files)) {
    if (v instanceof Blob || v instanceof Uint8Array) map.set(k, v);
    else if (v instanceof ArrayBuffer) map.set(k, new Uint8Array(v));
    else throw new TGateError('invalid_parameter', `files['${k}'] must be a Blob, File, Uint8Array or ArrayBuffer`);
  }
  return map;
}

export class Generator {
  #worker = null;
  #workerUrl;
  #next = 1;
  #pending = new Map();
  // What the last successful load was given, to load again after the worker had to be replaced.
  #lastLoad = null;
  #needsReload = false;
  #dtype = null; // the loaded model's compute dtype
  #modelLoaded = false; // whether the worker holds a model

  constructor(workerUrl) {
    this.#workerUrl = workerUrl;
  }

  /** Starts the worker and the WebGPU device. */
  static async create({ workerUrl } = {}) {
    const gen = new Generator(workerUrl || new URL('./worker.js', import.meta.url));
    await gen.#start();
    return gen;
  }

  async #start() {
    const worker = new Worker(this.#workerUrl, { type: 'module' });
    this.#worker = worker;
    // Events of a replaced worker (a trapped module keeps reporting errors) are ignored.
    worker.onmessage = (event) => {
      if (worker !== this.#worker) return;
      const msg = event.data;
      const p = this.#pending.get(msg.id);
      if (!p) return;
      if (msg.type === 'step' || msg.type === 'progress') { p.onEvent && p.onEvent(msg.report); return; }
      this.#pending.delete(msg.id);
      if (msg.ok) { p.resolve(msg.result); return; }
      p.reject(new TGateError(msg.error.code, msg.error.message));
      // A panic traps the wasm module: replace the worker; the model is loaded again (from
      // the browser cache) on the next request.
      if (msg.fatal) this.#replace();
    };
    worker.onerror = (event) => {
      event.preventDefault && event.preventDefault();
      if (worker !== this.#worker) return;
      const err = new TGateError('device_lost', `the worker failed: ${event.message || 'unknown error'}`);
      for (const p of this.#pending.values()) p.reject(err);
      this.#pending.clear();
      this.#replace();
    };
    await this.#request({ type: 'init' });
  }

  #replace() {
    const err = new TGateError('device_lost', 'the worker was replaced after a failure');
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
    if (this.#worker) this.#worker.terminate();
    this.#worker = null;
    this.#modelLoaded = false;
    this.#needsReload = this.#lastLoad !== null;
  }

  async #ready() {
    if (!this.#worker) await this.#start();
    if (this.#needsReload) {
      this.#needsReload = false;
      await this.load(this.#lastLoad);
    }
  }

  #request(msg, transfer = [], onEvent = null) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, onEvent });
      this.#worker.postMessage({ ...msg, id }, transfer);
    });
  }

  /**
   * Loads a diffusers folder from `baseUrl` (downloads are cached in the browser) or from
   * `files` (a Map or object of path → Blob / File / Uint8Array). `kind`: 'sd' or 'wuerstchen'.
   * For Würstchen, `baseUrl`/`files` is a combined folder, or the decoder pipeline with the prior
   * pipeline in `priorBaseUrl`/`priorFiles`. Weights go to the GPU tensor by tensor; `onProgress`
   * gets `{ phase: 'select', part, files, reason }` when a weight file (or the shards of a sharded
   * checkpoint) is chosen, `{ phase: 'download', loaded, file, fileTotal }`, then `{ phase: 'upload',
   * loaded, total }`. Tokenizers load from `tokenizer.json` (as transformers 5 saves them) or
   * `vocab.json` + `merges.txt`. `variant`: 'auto' (the `fp16` files when computing in f16, else the
   * full-precision ones), 'fp32', 'fp16' or 'bf16' (diffusers' `variant=`); the others are used
   * when the preferred one is absent. A tensor bigger than the adapter's largest storage binding (or than `maxTensorBytes`) is
   * refused with `out_of_memory` before it is read. `dtype`: 'auto' (f16 weights and activations
   * when the adapter has `shader-f16`, norms and softmax in f32; f32 otherwise), 'f16' or 'f32'.
   * `precompile` (from `baseUrl` only): `true` compiles the model's GPU kernels while its
   * weights download, with a short generation at the model's own size on zero placeholder
   * weights made from the configs; `{ width, height }` at that size instead (the size of the
   * first generation you expect); `false` skips it; `'auto'` (the default): as `true` when at
   * least 64 MiB of weights are not in the browser cache yet (a download that hides it) and no
   * model is loaded (its placeholders would sit beside that model on the GPU).
   * Resolves to `{ kind, width, height, dtype, bytes, fromCache, fromNetwork, weightBytes,
   * largestReadBytes, files, selected, precompile, ms }` (`precompile`: `{ ms, launches, kernels }`
   * of that generation, or `{ error: { code, message } }` when it could not run: the load goes on,
   * unless the precompilation crashed the worker, which fails the load as any crash does): `files` lists, per model part, the weight files the
   * model was built from and why that variant (`[{ part, files, bytes, reason }]`); `selected`
   * the download choices (from `baseUrl` only).
   */
  async load(options = {}) {
    const {
      baseUrl, files, priorBaseUrl, priorFiles, kind = 'sd', dtype = 'auto', variant = 'auto', maxTensorBytes,
      maxMemoryBytes, onProgress, signal, precompile = 'auto',
    } = options;
    // Options first: a refused call leaves the worker and any pending reload as they were.
    if (kind !== 'sd' && kind !== 'wuerstchen') {
      throw new TGateError('invalid_parameter', `kind must be 'sd' or 'wuerstchen', got '${kind}'`);
    }
    if (!['auto', 'f16', 'f32'].includes(dtype)) {
      throw new TGateError('invalid_parameter', `dtype must be 'auto', 'f16' or 'f32', got '${dtype}'`);
    }
    if (!['auto', 'fp32', 'fp16', 'bf16'].includes(variant)) {
      throw new TGateError('invalid_parameter', `variant must be 'auto', 'fp32', 'fp16' or 'bf16', got '${variant}'`);
    }
    for (const [name, v] of [['maxTensorBytes', maxTensorBytes], ['maxMemoryBytes', maxMemoryBytes]]) {
      if (v !== undefined && !(typeof v === 'number' && v >= 1)) {
        throw new TGateError('invalid_parameter', `${name} must be a positive number, got ${v}`);
      }
    }
    const size = precompile && typeof precompile === 'object' ? precompile : {};
    if (precompile !== 'auto' && typeof precompile !== 'boolean' && !(precompile && typeof precompile === 'object')) {
      throw new TGateError('invalid_parameter', `precompile must be 'auto', true, false or { width, height }, got ${precompile}`);
    }
    for (const name of ['width', 'height']) {
      const v = size[name];
      if (v !== undefined && !(Number.isInteger(v) && v >= 1)) {
        throw new TGateError('invalid_parameter', `precompile.${name} must be a positive whole number of pixels, got ${v}`);
      }
    }
    if (!this.#worker) await this.#start();
    this.#needsReload = false;
    const t0 = performance.now();
    const stats = { bytes: 0, fromCache: 0, fromNetwork: 0 };
    let map;
    let priorMap = null;
    let precompileToken = null;
    if (files) {
      map = toFileMap(files);
      if (priorFiles) priorMap = toFileMap(priorFiles);
    } else {
      if (!baseUrl) throw new TGateError('invalid_parameter', 'give baseUrl or files');
      map = new Map();
      const report = (n, url, fileTotal) => {
        stats.bytes += n;
        onProgress && onProgress({ phase: 'download', loaded: stats.bytes, file: url, fileTotal });
      };
      // The compute dtype decides which weight variant to download ('auto': f16 where the
      // adapter has shader-f16, as the worker decides).
      const f16 = dtype === 'f16' || (dtype === 'auto' && (await detect()).shaderF16);
      const selected = [];
      const ctx = {
        stats, signal, report, variants: variantOrder(variant, f16), pending: [],
        select: (s) => { selected.push(s); onProgress && onProgress({ phase: 'select', ...s }); },
      };
      priorMap = await pickFolder({ baseUrl, priorBaseUrl, kind }, map, ctx);
      // Nothing heavy is downloaded until the model is known to fit.
      const limits = (await detect()).limits;
      const bindings = [maxTensorBytes, limits && limits.maxStorageBufferBindingSize, limits && limits.maxBufferSize]
        .filter((v) => typeof v === 'number');
      const gib = globalThis.navigator && globalThis.navigator.deviceMemory;
      stats.weightDeviceBytes = checkFit(ctx.pending, {
        f16,
        bindingLimit: bindings.length ? Math.min(...bindings) : undefined,
        memoryBudget: maxMemoryBytes !== undefined ? maxMemoryBytes : (typeof gib === 'number' && gib > 0 ? gib * 2 ** 30 : undefined),
      });
      // The kernels compile on placeholder weights (made on the GPU from the configs) while the
      // weights download; the worker drops the placeholders before the real weights go up.
      // 'auto' only without a model in the worker: placeholders would sit beside it.
      const wanted = precompile === 'auto'
        ? !this.#modelLoaded && await networkBytes(ctx.pending) >= PRECOMPILE_AUTO_BYTES
        : precompile !== false;
      if (wanted && this.#worker) {
        precompileToken = this.#next++;
        this.#worker.postMessage({
          type: 'precompile', token: precompileToken, kind, files: map, priorFiles: priorMap, dtype,
          maxTensorBytes, maxMemoryBytes, width: size.width, height: size.height,
        });
      }
      for (const pick of ctx.pending) await downloadWeights(pick, ctx);
      stats.selected = selected;
    }
    const upload = onProgress && ((r) => onProgress({ phase: 'upload', loaded: r.loaded, total: r.total }));
    if (signal && signal.aborted) throw cancelled();
    // The worker may have been replaced (a crash) while the weights downloaded.
    if (!this.#worker) await this.#start();
    // The worker drops its current model before reading the new one.
    this.#modelLoaded = false;
    const loading = this.#request({
      type: 'load', kind, files: map, priorFiles: priorMap, dtype, variant, maxTensorBytes, maxMemoryBytes,
      precompileToken,
    }, [], upload);
    const info = await this.#abortable(loading, signal);
    this.#dtype = info.dtype;
    this.#modelLoaded = true;
    // Reloading after a worker replacement goes through the cache (URLs) or the caller's files.
    this.#lastLoad = {
      baseUrl, files, priorBaseUrl, priorFiles, kind, dtype, variant, maxTensorBytes, maxMemoryBytes,
    };
    return { ...info, ...stats, ms: performance.now() - t0 };
  }

  /**
   * Generates an image. `noise`: the CLI's `--noise` safetensors (bytes or a URL); `gate`:
   * `false` or `{ step, spInterval, fiInterval, warmUp }` (Würstchen: `{ step }`); `deepCache`
   * (Stable Diffusion): `true` (interval 3, branch 0, tgate's defaults) or `{ interval, branch }`:
   * the whole UNet runs every `interval` steps, only its shallow branch in between (step reports
   * say `shallow: true`); `output`:
   * 'imagedata' (default) or 'png'. Resolves to `{ image, latents, timings, finite, seed }`:
   * `latents` are named as in the CLI's `--save-latents` file, `{ name: { data: Float32Array,
   * shape } }`; `finite` is false when a latent value is NaN or infinite. An f16 generation
   * that overflows so is run again in f32 (the model is reloaded in f32 from the cache) and the
   * result says `retriedInF32: true`.
   */
  async generate({ signal, onStep, noise, output = 'imagedata', ...params } = {}) {
    if (signal && signal.aborted) throw new TGateError('cancelled', 'cancelled');
    if (typeof noise === 'string') {
      // An abort while the noise downloads is a cancellation, not a network failure.
      const failed = (e) => (signal && signal.aborted ? cancelled() : new TGateError('network', `${noise}: ${e.message}`));
      let r;
      try {
        r = await fetch(noise, { signal });
      } catch (e) {
        throw failed(e);
      }
      if (!r.ok) throw new TGateError('network', `${noise}: HTTP ${r.status}`);
      try {
        noise = new Uint8Array(await r.arrayBuffer());
      } catch (e) {
        throw failed(e);
      }
    }
    await this.#ready();
    const id = this.#next; // the id #request is about to use
    const onAbort = () => this.#worker && this.#worker.postMessage({ type: 'cancel', target: id });
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
    const t0 = performance.now();
    try {
      const result = await this.#request({ type: 'generate', params, noise: noise || null }, [], onStep);
      if (result.finite === false && this.#dtype === 'f16' && this.#lastLoad) {
        // Half precision overflowed (NaN latents, a black image): load the model in f32 (from
        // the browser cache) and generate again with the same seed; later calls stay in f32.
        if (signal) signal.removeEventListener('abort', onAbort);
        await this.load({ ...this.#lastLoad, dtype: 'f32', signal, precompile: false });
        const seed = result.seed === null ? params.seed : result.seed;
        const again = await this.generate({ signal, onStep, noise, output, ...params, seed });
        return { ...again, retriedInF32: true };
      }
      let image = typeof ImageData === 'function'
        ? new ImageData(result.rgba, result.width, result.height)
        : { data: result.rgba, width: result.width, height: result.height };
      if (output === 'png') image = await toPng(image);
      const timings = { steps: result.steps, totalMs: performance.now() - t0 };
      return { image, latents: result.latents, timings, finite: result.finite, seed: result.seed };
    } finally {
      if (signal) signal.removeEventListener('abort', onAbort);
    }
  }

  terminate() {
    this.#lastLoad = null;
    this.#replace();
  }

  /**
   * Awaits a worker-side load, or rejects with `cancelled` as soon as `signal` aborts. The
   * worker reads the weights in one synchronous call that cannot be interrupted, so it is
   * replaced: the model it was loading is gone either way (the previous one was dropped when
   * the load began), and downloaded files stay in the browser cache.
   */
  async #abortable(loading, signal) {
    if (!signal) return loading;
    let onAbort;
    const aborted = new Promise((_, reject) => {
      onAbort = () => reject(cancelled());
      signal.addEventListener('abort', onAbort, { once: true });
    });
    try {
      return await Promise.race([loading, aborted]);
    } catch (e) {
      if (signal.aborted && e instanceof TGateError && e.code === 'cancelled') {
        loading.catch(() => {}); // its rejection by the replacement below is expected
        this.#lastLoad = null;
        this.#replace();
      }
      throw e;
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
  }
}

async function toPng(image) {
  const canvas = new OffscreenCanvas(image.width, image.height);
  canvas.getContext('2d').putImageData(image, 0, 0);
  return canvas.convertToBlob({ type: 'image/png' });
}

/** The latents of a result as a safetensors file (the CLI's `--save-latents` format). */
export function latentsToSafetensors(latents) {
  const header = {};
  let offset = 0;
  const entries = Object.entries(latents);
  for (const [name, t] of entries) {
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
  for (const [, t] of entries) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), pos);
    pos += t.data.byteLength;
  }
  return out;
}
