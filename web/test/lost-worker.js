// Test worker: the package's own worker, except that a `generate` request arriving while the
// Cache Storage entry 'tgate-test-device-lost' exists deletes that entry and destroys the
// worker's WebGPU device first, which makes the device lost as a driver reset would. The entry
// is deleted by the first worker that sees it, so the replacement worker the Generator starts
// after the loss runs normally. Used by the browser test of `device_lost` only.
//
// Likewise, a `generate` request arriving while 'tgate-test-readback-fails' exists deletes it and
// makes the next GPU buffer mapping fail (its promise rejects, as a driver's would), on a device
// that stays alive: the generation must fail with `internal`, and the worker and its model stay.
import '../src/worker.js';

const ARM = 'tgate-test-device-lost';
const ARM_READBACK = 'tgate-test-readback-fails';

let failNextMapping = false;
const mapAsync = GPUBuffer.prototype.mapAsync;
GPUBuffer.prototype.mapAsync = function (...args) {
  if (failNextMapping) {
    failNextMapping = false;
    return Promise.reject(new DOMException('injected by the test: the mapping failed', 'OperationError'));
  }
  return mapAsync.apply(this, args);
};

const devices = [];
const requestDevice = GPUAdapter.prototype.requestDevice;
GPUAdapter.prototype.requestDevice = async function (...args) {
  const device = await requestDevice.apply(this, args);
  devices.push(device);
  return device;
};

const handle = self.onmessage;
self.onmessage = async (event) => {
  if (event.data.type === 'generate' && (await caches.delete(ARM))) {
    for (const device of devices) device.destroy();
  }
  if (event.data.type === 'generate' && (await caches.delete(ARM_READBACK))) failNextMapping = true;
  return handle(event);
};
