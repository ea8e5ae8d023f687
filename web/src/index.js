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

// The files of each diffusers layout. `weights`: a safetensors stem, tried plain, then fp16.
const TOKENIZER = (dir) => [
  [`${dir}/vocab.json`], [`${dir}/merges.txt`],
  [`${dir}/tokenizer_config.json`, { optional: true }],
  [`${dir}/special_tokens_map.json`, { optional: true }],
];
const TEXT_ENCODER = (dir) => [[`${dir}/config.json`], [`${dir}/model`, { weights: true }]];
const MODEL = (dir) => [[`${dir}/config.json`], [`${dir}/diffusion_pytorch_model`, { weights: true }]];

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

/** Downloads `list` below `base` into `map` (keys prefixed with `keyPrefix`). */
async function fetchFolder(base, list, map, stats, signal, report) {
  const root = base.endsWith('/') ? base : `${base}/`;
  for (const [name, opts = {}] of list) {
    const candidates = opts.weights ? [`${name}.safetensors`, `${name}.fp16.safetensors`] : [name];
    let got = null;
    for (const path of candidates) {
      got = await fetchCached(root + path, signal, report);
      if (got) { map.set(path, got.blob); break; }
    }
    if (got) {
      if (got.fromCache) stats.fromCache += 1; else stats.fromNetwork += 1;
    } else if (!opts.optional) {
      throw new TGateError('network', `HTTP 404 (not found): ${root}${candidates.join(' or ')}`);
    }
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
   * gets `{ phase: 'download', loaded, file, fileTotal }` then `{ phase: 'upload', loaded, total }`.
   * A tensor bigger than the adapter's largest storage binding (or than `maxTensorBytes`) is
   * refused with `out_of_memory` before it is read. `dtype`: 'auto' (f16 weights and activations
   * when the adapter has `shader-f16`, norms and softmax in f32; f32 otherwise), 'f16' or 'f32'.
   * Resolves to `{ kind, width, height, dtype, bytes, fromCache, fromNetwork, weightBytes,
   * largestReadBytes, ms }`.
   */
  async load(options = {}) {
    const {
      baseUrl, files, priorBaseUrl, priorFiles, kind = 'sd', dtype = 'auto', maxTensorBytes, onProgress, signal,
    } = options;
    // Options first: a refused call leaves the worker and any pending reload as they were.
    if (kind !== 'sd' && kind !== 'wuerstchen') {
      throw new TGateError('invalid_parameter', `kind must be 'sd' or 'wuerstchen', got '${kind}'`);
    }
    if (!['auto', 'f16', 'f32'].includes(dtype)) {
      throw new TGateError('invalid_parameter', `dtype must be 'auto', 'f16' or 'f32', got '${dtype}'`);
    }
    if (maxTensorBytes !== undefined && !(typeof maxTensorBytes === 'number' && maxTensorBytes >= 1)) {
      throw new TGateError('invalid_parameter', `maxTensorBytes must be a positive number, got ${maxTensorBytes}`);
    }
    if (!this.#worker) await this.#start();
    this.#needsReload = false;
    const t0 = performance.now();
    const stats = { bytes: 0, fromCache: 0, fromNetwork: 0 };
    let map;
    let priorMap = null;
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
      if (kind === 'sd') {
        await fetchFolder(baseUrl, SD_FILES, map, stats, signal, report);
      } else if (priorBaseUrl) {
        await fetchFolder(baseUrl, WUERSTCHEN_DECODER, map, stats, signal, report);
        priorMap = new Map();
        await fetchFolder(priorBaseUrl, [['model_index.json'], ...WUERSTCHEN_PRIOR('')], priorMap, stats, signal, report);
      } else {
        await fetchFolder(baseUrl, [...WUERSTCHEN_DECODER, ...WUERSTCHEN_PRIOR('prior_')], map, stats, signal, report);
      }
    }
    const upload = onProgress && ((r) => onProgress({ phase: 'upload', loaded: r.loaded, total: r.total }));
    const info = await this.#request({ type: 'load', kind, files: map, priorFiles: priorMap, dtype, maxTensorBytes }, [], upload);
    // Reloading after a worker replacement goes through the cache (URLs) or the caller's files.
    this.#lastLoad = { baseUrl, files, priorBaseUrl, priorFiles, kind, dtype, maxTensorBytes };
    return { ...info, ...stats, ms: performance.now() - t0 };
  }

  /**
   * Generates an image. `noise`: the CLI's `--noise` safetensors (bytes or a URL); `gate`:
   * `false` or `{ step, spInterval, fiInterval, warmUp }` (Würstchen: `{ step }`); `output`:
   * 'imagedata' (default) or 'png'. Resolves to `{ image, latents, timings }`: `latents` are
   * named as in the CLI's `--save-latents` file, `{ name: { data: Float32Array, shape } }`.
   */
  async generate({ signal, onStep, noise, output = 'imagedata', ...params } = {}) {
    if (signal && signal.aborted) throw new TGateError('cancelled', 'cancelled');
    if (typeof noise === 'string') {
      let r;
      try {
        r = await fetch(noise, { signal });
      } catch (e) {
        throw new TGateError('network', `${noise}: ${e.message}`);
      }
      if (!r.ok) throw new TGateError('network', `${noise}: HTTP ${r.status}`);
      noise = new Uint8Array(await r.arrayBuffer());
    }
    await this.#ready();
    const id = this.#next; // the id #request is about to use
    const onAbort = () => this.#worker && this.#worker.postMessage({ type: 'cancel', target: id });
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
    const t0 = performance.now();
    try {
      const result = await this.#request({ type: 'generate', params, noise: noise || null }, [], onStep);
      let image = typeof ImageData === 'function'
        ? new ImageData(result.rgba, result.width, result.height)
        : { data: result.rgba, width: result.width, height: result.height };
      if (output === 'png') image = await toPng(image);
      const timings = { steps: result.steps, totalMs: performance.now() - t0 };
      return { image, latents: result.latents, timings };
    } finally {
      if (signal) signal.removeEventListener('abort', onAbort);
    }
  }

  terminate() {
    this.#lastLoad = null;
    this.#replace();
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
