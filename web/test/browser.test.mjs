// Browser tests: the package served from localhost, driven in Debian's Chromium (WebGPU on
// SwiftShader) through playwright-core. Run `npm run build` first (web/pkg).
//
//   node web/test/browser.test.mjs
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TYPES = {
  '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm',
  '.json': 'application/json', '.txt': 'text/plain', '.safetensors': 'application/octet-stream',
};

// Weight downloads seen by the server (to prove the second load comes from the browser cache).
const weightHits = [];

function send(res, status, body, type = 'text/plain') {
  res.writeHead(status, { 'content-type': type, 'content-length': body.length, 'cache-control': 'no-store' });
  res.end(body);
}

// /broken/<kind>/... serves the sd1 fixture with one defect.
function broken(kind, rel) {
  const file = path.join(root, 'tests/fixtures/sd1', rel);
  if (kind === '404' || !fs.existsSync(file)) return null;
  let body = fs.readFileSync(file);
  if (kind === 'truncated' && rel === 'unet/diffusion_pytorch_model.safetensors') {
    body = body.subarray(0, body.length >> 1);
  }
  if (kind === 'shape' && rel === 'vae/config.json') {
    const cfg = JSON.parse(body.toString());
    cfg.block_out_channels = cfg.block_out_channels.map((c, i) => (i === cfg.block_out_channels.length - 1 ? c * 2 : c));
    body = Buffer.from(JSON.stringify(cfg));
  }
  return body;
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const p = decodeURIComponent(url.pathname);
  const m = p.match(/^\/broken\/([a-z0-9]+)\/(.*)$/);
  if (m) {
    const body = broken(m[1], m[2]);
    return body ? send(res, 200, body, TYPES[path.extname(p)] || 'application/octet-stream') : send(res, 404, Buffer.from('not found'));
  }
  const file = path.join(root, p);
  if (!file.startsWith(root) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    return send(res, 404, Buffer.from('not found'));
  }
  if (p.endsWith('.safetensors') && p.includes('/fixtures/sd1/')) weightHits.push(p);
  send(res, 200, fs.readFileSync(file), TYPES[path.extname(p)] || 'application/octet-stream');
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader', '--no-sandbox',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic',
  ],
});
const results = {};
let failed = false;
try {
  const page = await browser.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') pageErrors.push(`${m.type()}: ${m.text()}`);
  });
  await page.goto(`${origin}/web/test/harness.html`);
  await page.waitForFunction(() => window.harnessReady === true);
  page.setDefaultTimeout(600_000);
  const call = (fn, ...args) => page.evaluate(([f, a]) => window.harness[f](...a), [fn, args]);

  const step = async (name, fn) => {
    const t0 = Date.now();
    try {
      results[name] = await fn();
      console.log(`ok   ${name} (${((Date.now() - t0) / 1e3).toFixed(1)} s)`);
    } catch (e) {
      failed = true;
      results[name] = String(e.stack || e);
      console.log(`FAIL ${name}: ${e.message}`);
    }
  };

  await step('detect', async () => {
    const d = await call('detect');
    assert.equal(d.webgpu, true);
    return d;
  });
  await step('first load (network)', async () => {
    await call('purgeCache');
    const r = await call('load', 'sd1');
    assert.ok(weightHits.length >= 3, `weights fetched: ${weightHits.length}`);
    return r;
  });
  for (const [label, gate, key] of [
    ['pndm ungated', false, 'pipe.pndm.full'],
    ['pndm gated', { step: 3 }, 'pipe.pndm.tgate'],
  ]) {
    await step(label, async () => {
      const r = await call('sdCase', 'sd1', { scheduler: 'pndm', gate, key });
      assert.ok(r.err <= 1e-3 * r.scale, `${key}: max abs err ${r.err} (scale ${r.scale})`);
      const phase = (name) => r.timings.filter((t) => t.phase === name).map((t) => t.ms);
      const mean = (xs) => xs.reduce((a, b) => a + b, 0) / Math.max(xs.length, 1);
      // The first steps include kernel compilation: report the later ones of each phase too.
      return {
        err: r.err, scale: r.scale, size: [r.width, r.height],
        spMs: mean(phase('semantics-planning').slice(1)), fiMs: mean(phase('fidelity-improving')),
        stepMs: r.timings.map((t) => Math.round(t.ms)),
      };
    });
  }
  await step('second load (browser cache)', async () => {
    const before = weightHits.length;
    const r = await call('load', 'sd1');
    assert.equal(weightHits.length, before, 'weights were downloaded again');
    assert.ok(r.fromCache >= 3, JSON.stringify(r));
    return r;
  });
  await step('cancel, then generate', async () => {
    const r = await call('cancelThenGenerate', 'sd1', 2);
    assert.equal(r.cancelled && r.cancelled.code, 'cancelled', JSON.stringify(r));
    assert.equal(r.nextSteps, 2);
    return r;
  });
  for (const [kind, code] of [['404', 'network'], ['truncated', 'bad_weights'], ['shape', 'bad_weights']]) {
    await step(`typed error: ${kind}`, async () => {
      await call('purgeCache');
      const r = await call('loadError', `/broken/${kind}/`);
      assert.equal(r.code, code, JSON.stringify(r));
      return r;
    });
  }
  results.pageErrors = pageErrors.filter((e) => !e.includes('status of 404')).slice(0, 6);
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(results, null, 1));
process.exit(failed ? 1 : 0);
