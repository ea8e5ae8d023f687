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

export interface LoadOptions {
  /** A diffusers folder URL, e.g. a Hugging Face `resolve/main/` address. */
  baseUrl?: string;
  /** Or the files themselves: path (as in the diffusers layout) → bytes. */
  files?: Map<string, Uint8Array | Blob> | Record<string, Uint8Array | Blob>;
  kind?: 'sd';
  onProgress?: (p: { loaded: number; fileTotal: number }) => void;
  signal?: AbortSignal;
}

export interface LoadStats { bytes: number; fromCache: number; fromNetwork: number }

export interface StepReport {
  step: number;
  total: number;
  timestep: number;
  phase: 'semantics-planning' | 'fidelity-improving';
  ms: number;
}

export interface GenerateOptions {
  prompt: string;
  negativePrompt?: string;
  steps?: number;
  guidance?: number;
  scheduler?: 'ddim' | 'pndm' | 'euler' | 'euler-a' | 'dpm++2m';
  width?: number;
  height?: number;
  seed?: number;
  /** The CLI's `--noise` safetensors (`noise`, optional `step_noise`), as bytes or a URL. */
  noise?: Uint8Array | string;
  gate?: false | { step?: number; spInterval?: number; fiInterval?: number; warmUp?: number };
  signal?: AbortSignal;
  onStep?: (report: StepReport) => void;
}

export interface GenerateResult {
  image: ImageData;
  latents: Float32Array;
  latentsShape: number[];
  timings: StepReport[];
}

export class Generator {
  static create(options?: { workerUrl?: string | URL }): Promise<Generator>;
  load(options: LoadOptions): Promise<LoadStats>;
  generate(options: GenerateOptions): Promise<GenerateResult>;
  terminate(): void;
}
