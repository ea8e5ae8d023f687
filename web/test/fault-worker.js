// Test worker: the package's own worker in a browser without WebGPU (navigator.gpu missing).
// Used by the browser test of the `webgpu_unsupported` error code only. The import is static:
// the worker must be listening before the page's first message arrives.
import '../src/worker.js';

Object.defineProperty(self.navigator, 'gpu', { value: undefined, configurable: true });
