// tgate-web: text-to-image on WebGPU, generation in a Web Worker.
//
//   import { detect, Generator } from 'tgate-web';
//   const gen = await Generator.create();
//   await gen.load({ baseUrl: 'https://huggingface.co/<repo>/resolve/main/', onProgress });
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

// The files of a diffusers Stable Diffusion folder; weights are tried plain first, then fp16.
const SD_FILES = [
  ['tokenizer/vocab.json'], ['tokenizer/merges.txt'],
  ['tokenizer/tokenizer_config.json', { optional: true }],
  ['tokenizer/special_tokens_map.json', { optional: true }],
  ['text_encoder/config.json'], ['unet/config.json'], ['vae/config.json'],
  ['scheduler/scheduler_config.json'],
  ['text_encoder/model', { weights: true }],
  ['unet/diffusion_pytorch_model', { weights: true }],
  ['vae/diffusion_pytorch_model', { weights: true }],
];

async function fetchCached(url, signal, onBytes) {
  const cache = globalThis.caches ? await caches.open(CACHE) : null;
  let response = cache ? await cache.match(url) : undefined;
  const fromCache = Boolean(response);
  if (!response) {
    try {
      response = await fetch(url, { signal });
    } catch (e) {
      if (signal && signal.aborted) throw new TGateError('cancelled', 'cancelled');
      throw new TGateError('network', `${url}: ${e.message}`);
    }
    if (response.status === 404) return null;
    if (!response.ok) throw new TGateError('network', `${url}: HTTP ${response.status}`);
    if (cache) await cache.put(url, response.clone());
  }
  const total = Number(response.headers.get('content-length')) || 0;
  const reader = response.body.getReader();
  const parts = [];
  let received = 0;
  for (;;) {
    if (signal && signal.aborted) throw new TGateError('cancelled', 'cancelled');
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    received += value.length;
    onBytes(value.length, total);
  }
  const bytes = new Uint8Array(received);
  let offset = 0;
  for (const p of parts) { bytes.set(p, offset); offset += p.length; }
  return { bytes, fromCache };
}

export class Generator {
  #worker;
  #next = 1;
  #pending = new Map();

  constructor(worker) {
    this.#worker = worker;
    worker.onmessage = (event) => {
      const msg = event.data;
      const p = this.#pending.get(msg.id);
      if (!p) return;
      if (msg.type === 'step') { p.onStep && p.onStep(msg.report); return; }
      this.#pending.delete(msg.id);
      if (msg.ok) p.resolve(msg.result);
      else p.reject(new TGateError(msg.error.code, msg.error.message));
    };
    worker.onerror = (event) => {
      const err = new TGateError('device_lost', `the worker failed: ${event.message || 'unknown error'}`);
      for (const p of this.#pending.values()) p.reject(err);
      this.#pending.clear();
    };
  }

  /** Starts the worker and the WebGPU device. */
  static async create({ workerUrl } = {}) {
    const url = workerUrl || new URL('./worker.js', import.meta.url);
    const gen = new Generator(new Worker(url, { type: 'module' }));
    await gen.#request({ type: 'init' });
    return gen;
  }

  #request(msg, transfer = [], onStep = null) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, onStep });
      this.#worker.postMessage({ ...msg, id }, transfer);
    });
  }

  /**
   * Loads a diffusers folder from `baseUrl` (downloads are cached in the browser) or from
   * `files` (a Map or object of path → Uint8Array / Blob).
   */
  async load({ baseUrl, files, kind = 'sd', onProgress, signal } = {}) {
    const map = new Map();
    const stats = { bytes: 0, fromCache: 0, fromNetwork: 0 };
    if (files) {
      for (const [k, v] of files instanceof Map ? files : Object.entries(files)) {
        map.set(k, v instanceof Uint8Array ? v : new Uint8Array(await v.arrayBuffer()));
      }
    } else {
      if (!baseUrl) throw new TGateError('invalid_parameter', 'give baseUrl or files');
      const base = baseUrl.endsWith('/') ? baseUrl : `${baseUrl}/`;
      let done = 0;
      const report = (n, total) => {
        done += n;
        stats.bytes = done;
        onProgress && onProgress({ loaded: done, fileTotal: total });
      };
      for (const [name, opts = {}] of SD_FILES) {
        const candidates = opts.weights
          ? [`${name}.safetensors`, `${name}.fp16.safetensors`]
          : [name];
        let got = null;
        for (const path of candidates) {
          got = await fetchCached(base + path, signal, report);
          if (got) { map.set(path, got.bytes); break; }
        }
        if (got) {
          if (got.fromCache) stats.fromCache += 1; else stats.fromNetwork += 1;
        } else if (!opts.optional) {
          throw new TGateError('network', `HTTP 404 (not found): ${base}${candidates.join(' or ')}`);
        }
      }
    }
    const transfer = [...map.values()].map((b) => b.buffer);
    await this.#request({ type: 'load', kind, files: map }, transfer);
    return stats;
  }

  /**
   * Generates an image. `noise`: the CLI's `--noise` safetensors (bytes or a URL); `gate`:
   * `false` or `{ step, spInterval, fiInterval, warmUp }`. Resolves to
   * `{ image: ImageData, latents: Float32Array, latentsShape, timings }`.
   */
  async generate({ signal, onStep, noise, ...params } = {}) {
    if (typeof noise === 'string') {
      const r = await fetch(noise);
      if (!r.ok) throw new TGateError('network', `${noise}: HTTP ${r.status}`);
      noise = new Uint8Array(await r.arrayBuffer());
    }
    const id = this.#next; // the id #request is about to use
    const onAbort = () => this.#worker.postMessage({ type: 'cancel', target: id });
    if (signal) {
      if (signal.aborted) throw new TGateError('cancelled', 'cancelled');
      signal.addEventListener('abort', onAbort, { once: true });
    }
    try {
      const result = await this.#request({ type: 'generate', params, noise: noise || null }, [], onStep);
      const image = typeof ImageData === 'function'
        ? new ImageData(result.rgba, result.width, result.height)
        : result.rgba;
      return { image, latents: result.latents, latentsShape: result.latentsShape, timings: result.steps };
    } finally {
      if (signal) signal.removeEventListener('abort', onAbort);
    }
  }

  terminate() {
    this.#worker.terminate();
  }
}
