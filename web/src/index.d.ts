export type ErrorCode =
  | 'webgpu_unsupported' | 'device_lost' | 'out_of_memory' | 'bad_weights'
  | 'network' | 'cancelled' | 'busy' | 'invalid_parameter' | 'internal';

export class TGateError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string);
}

export interface DetectResult {
  webgpu: boolean;
  shaderF16: boolean;
  limits: null | {
    maxStorageBufferBindingSize: number;
    maxBufferSize: number;
    maxComputeWorkgroupStorageSize: number;
  };
}

export function detect(): Promise<DetectResult>;
export function purgeCache(): Promise<void>;

/** What `load` would download and hold on the GPU, read before any weight is downloaded. */
export interface InspectResult {
  kind: 'sd' | 'wuerstchen';
  dtype: 'f16' | 'f32';
  parts: Array<{ part: string; files: string[]; reason: string; downloadBytes: number | null; deviceBytes: number | null }>;
  /** Tensor bytes of the weight files; `null` when the server has no range requests. */
  downloadBytes: number | null;
  /** Weight bytes on the GPU in the compute dtype (activations come on top). */
  deviceBytes: number | null;
}

export function inspect(options: {
  baseUrl: string;
  priorBaseUrl?: string;
  kind?: 'sd' | 'wuerstchen';
  dtype?: 'auto' | 'f16' | 'f32';
  variant?: 'auto' | 'fp32' | 'fp16' | 'bf16';
  signal?: AbortSignal;
}): Promise<InspectResult>;

/** Path (as in the diffusers layout) → contents. Blobs (a picked `File` is one) are read tensor by tensor. */
export type ModelFiles =
  | Map<string, Blob | Uint8Array | ArrayBuffer>
  | Record<string, Blob | Uint8Array | ArrayBuffer>;

/** Which weight files a model part uses, and why that variant. */
export interface WeightChoice {
  /** The part's folder: `unet`, `text_encoder`, `prior_prior`, ... */
  part: string;
  /** One file, or the shards of a sharded checkpoint. */
  files: string[];
  /** e.g. "f16 compute: the fp16 variant is preferred". */
  reason: string;
  /** In `LoadResult.files`: bytes of tensor data. */
  bytes?: number;
}

export interface LoadProgress {
  /** `select`: a weight variant was chosen (`part`, `files`, `reason`); `download`: files
   * fetched (network or browser cache); `upload`: weights sent to the GPU. */
  phase: 'select' | 'download' | 'upload';
  /** Bytes so far in this phase. */
  loaded: number;
  /** `upload`: bytes of all weight files. */
  total?: number;
  file?: string;
  fileTotal?: number;
  part?: string;
  files?: string[];
  reason?: string;
}

export interface LoadOptions {
  /** A diffusers folder URL, e.g. a Hugging Face `resolve/main/` address. */
  baseUrl?: string;
  /** Or the files themselves: path (as in the diffusers layout) → bytes. */
  files?: ModelFiles;
  /** Würstchen's prior pipeline when `baseUrl`/`files` is the decoder pipeline. */
  priorBaseUrl?: string;
  priorFiles?: ModelFiles;
  kind?: 'sd' | 'wuerstchen';
  /** 'auto' (default): f16 weights and activations when the adapter has `shader-f16` (norms and
   * softmax in f32), f32 otherwise. 'f16' fails with `invalid_parameter` without `shader-f16`. */
  dtype?: 'auto' | 'f16' | 'f32';
  /** Which weight files to prefer (diffusers' `variant=`): 'auto' (default: `fp16` files when
   * computing in f16, else full precision), 'fp32', 'fp16' or 'bf16'; the others are used when
   * the preferred one is absent. Sharded checkpoints (`*.safetensors.index.json`) load too. */
  variant?: 'auto' | 'fp32' | 'fp16' | 'bf16';
  /** Refuse tensors over this many bytes on the GPU (`out_of_memory`); the adapter's
   * `maxStorageBufferBindingSize` (and `maxBufferSize`) always applies. Weights are checked at
   * load; activations at `generate` (attention is split to fit; a feature map that cannot fit
   * is refused before the first step). */
  maxTensorBytes?: number;
  /** The memory a generation may use at once (default: `navigator.deviceMemory` GiB where the
   * browser reports it): a size whose largest feature map, held three times, cannot fit is
   * refused with `out_of_memory` before any work. */
  maxMemoryBytes?: number;
  onProgress?: (p: LoadProgress) => void;
  signal?: AbortSignal;
  /** Loads from `baseUrl` only: compile the GPU kernels while the weights download, with a
   * short generation (planning, gate and gated steps, decoder) on zero placeholder weights made
   * from the configs, at the model's own size (`true`) or at `{ width, height }` (the size of
   * the first generation you expect); `false` skips it. `'auto'` (the default): as `true` when at
   * least 64 MiB of weights are not in the browser cache yet and no model is loaded. */
  precompile?: 'auto' | boolean | { width?: number; height?: number };
}

export interface LoadResult {
  kind: 'sd' | 'wuerstchen';
  /** The model's default image size. */
  width: number;
  height: number;
  /** The compute dtype chosen. */
  dtype: 'f16' | 'f32';
  bytes: number;
  fromCache: number;
  fromNetwork: number;
  /** Bytes of the weight files. */
  weightBytes: number;
  /** The largest single read of a weight file (one tensor: files are never read whole). */
  largestReadBytes: number;
  /** The weight files each part was built from, and why. */
  files: WeightChoice[];
  /** The download choices (loads from `baseUrl` only). */
  selected?: WeightChoice[];
  /** The weights' size on the device in the compute dtype, from the safetensors headers read
   * (with range requests) before downloading; loads from `baseUrl` only. */
  weightDeviceBytes?: number;
  /** The precompilation's generation (see `LoadOptions.precompile`): its time, kernel launches
   * and distinct kernels, or why it could not run (the load went on without it; a crash of the
   * worker fails the load as any crash does). */
  precompile?: { ms: number; launches: number; kernels: number } | { error: { code: string; message: string } };
  ms: number;
}

export interface StepReport {
  stage: 'unet' | 'prior' | 'decoder';
  step: number;
  total: number;
  timestep: number;
  phase: 'semantics-planning' | 'fidelity-improving';
  /** DeepCache ran only its shallow branch (SD with `deepCache`). */
  shallow: boolean;
  /**
   * The step's time: from the device finishing the previous piece of work to it finishing this
   * step (the worker enqueues each step before waiting for the one before).
   */
  ms: number;
  /** Worker time spent enqueuing the step (overlaps the previous step on the device). */
  enqueueMs: number;
  /** GPU kernels the step launched (fused ones counted once), and the distinct compiled kernels among them. */
  launches: number;
  kernels: number;
  /** With `preview: true`: the latents' first channels as a small RGBA image. */
  preview?: { rgba: Uint8ClampedArray; width: number; height: number };
}

export interface GenerateOptions {
  prompt: string;
  negativePrompt?: string;
  /** SD: denoising steps (25; LCM models 4); Würstchen: prior steps (60). */
  steps?: number;
  /** SD: guidance scale (7.5; LCM models 8.5, through their guidance embedding); Würstchen: prior guidance (4). */
  guidance?: number;
  /** SD only. */
  scheduler?: 'ddim' | 'pndm' | 'euler' | 'euler-a' | 'dpm++2m' | 'lcm';
  /** Würstchen only (12 and 0, as diffusers). */
  decoderSteps?: number;
  /** Würstchen: the prior on diffusers' `DEFAULT_STAGE_C_TIMESTEPS` (29 steps) instead of `steps`. */
  defaultTimesteps?: boolean;
  decoderGuidance?: number;
  width?: number;
  height?: number;
  seed?: number;
  /**
   * The CLI's `--noise` safetensors as bytes or a URL: SD `noise` (+ `step_noise`); Würstchen
   * `prior_noise`, `prior_step_noise`, `decoder_noise`, `decoder_step_noise`.
   */
  noise?: Uint8Array | string;
  /** Default: on at 40% of the steps. Würstchen takes `{ step }` only. */
  gate?: boolean | { step?: number; spInterval?: number; fiInterval?: number; warmUp?: number };
  /** SD only: DeepCache; `true` is `{ interval: 3, branch: 0 }` (tgate's defaults). */
  deepCache?: boolean | { interval?: number; branch?: number };
  preview?: boolean;
  output?: 'imagedata' | 'png';
  signal?: AbortSignal;
  onStep?: (report: StepReport) => void;
}

export interface Latent { data: Float32Array; shape: number[] }

export interface GenerateResult {
  image: ImageData | Blob;
  /** Named as in the CLI's `--save-latents` file: SD `latents`; Würstchen `prior_latents`, `decoder_latents`. */
  latents: Record<string, Latent>;
  timings: { steps: StepReport[]; totalMs: number };
  /** False when a latent value is NaN or infinite (an f32 run that overflowed). */
  finite: boolean;
  /** The seed used (a random one when none was given); null with a noise file. */
  seed: number | null;
  /** An f16 generation overflowed and was run again in f32 (the model now computes in f32). */
  retriedInF32?: boolean;
}

export class Generator {
  static create(options?: { workerUrl?: string | URL }): Promise<Generator>;
  load(options: LoadOptions): Promise<LoadResult>;
  generate(options: GenerateOptions): Promise<GenerateResult>;
  terminate(): void;
}

/** The latents of a result as a safetensors file (the CLI's `--save-latents` format). */
export function latentsToSafetensors(latents: Record<string, Latent>): Uint8Array;
