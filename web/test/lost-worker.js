// Test worker: the package's own worker, except that a `generate` request arriving while the
// Cache Storage entry 'tgate-test-device-lost' exists deletes that entry and destroys the
// worker's WebGPU device first, which makes the device lost as a driver reset would. The entry
// is deleted by the first worker that sees it, so the replacement worker the Generator starts
// after the loss runs normally. Used by the browser test of `device_lost` only.
import '../src/worker.js';

const ARM = 'tgate-test-device-lost';

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
  return handle(event);
};
