// Browser tests: the package served from localhost, driven in Debian's Chromium (WebGPU on
// SwiftShader) through playwright-core. Run `npm run build` first (web/pkg).
//
//   node web/test/browser.test.mjs
import fs from 'node:fs';
import path from 'node:path';
import assert from 'node:assert/strict';
import os from 'node:os';
import { execFileSync } from 'node:child_process';
import { chromium } from 'playwright-core';
import { root, send, sendRange, serve, typeOf } from '../scripts/server.mjs';

// Weight downloads seen by the server (to prove the second load comes from the browser cache).
const weightHits = [];

// /broken/<kind>/... serves the sd1 fixture with one defect.
function broken(kind, rel) {
  const file = path.join(root, 'tests/fixtures/sd1', rel);
  if (kind === '404' || !fs.existsSync(file)) return null;
  let body = fs.readFileSync(file);
  if (kind === 'truncated' && rel === 'unet/diffusion_pytorch_model.safetensors') {
    body = body.subarray(0, body.length >> 1);
  }
  if (kind === 'overflow' && rel === 'unet/diffusion_pytorch_model.safetensors') {
    // conv_out's weights scaled past f32's range: the latents become infinite / NaN.
    body = Buffer.from(body);
    const n = Number(body.readBigUInt64LE(0));
    const t = JSON.parse(body.subarray(8, 8 + n).toString())['conv_out.weight'];
    const [a, b] = t.data_offsets;
    for (let o = 8 + n + a; o < 8 + n + b; o += 4) body.writeFloatLE(body.readFloatLE(o) * 3e38, o);
  }
  if (kind === 'gray' && rel === 'vae/config.json') {
    body = Buffer.from(JSON.stringify({ ...JSON.parse(body.toString()), out_channels: 1 }));
  }
  if (kind === 'shape' && rel === 'vae/config.json') {
    const cfg = JSON.parse(body.toString());
    cfg.block_out_channels = cfg.block_out_channels.map((c, i) => (i === cfg.block_out_channels.length - 1 ? c * 2 : c));
    body = Buffer.from(JSON.stringify(cfg));
  }
  return body;
}

/** Splits a safetensors file into `parts` shards (tensors round-robin by name, bytes as they are). */
function splitSafetensors(buf, parts) {
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString());
  const names = Object.keys(header).filter((k) => k !== '__metadata__').sort();
  const shards = [];
  for (let i = 0; i < parts; i++) {
    const mine = names.filter((_, j) => j % parts === i);
    const head = {};
    const chunks = [];
    let offset = 0;
    for (const name of mine) {
      const [a, b] = header[name].data_offsets;
      head[name] = { ...header[name], data_offsets: [offset, offset + b - a] };
      chunks.push(buf.subarray(8 + n + a, 8 + n + b));
      offset += b - a;
    }
    let json = JSON.stringify(head);
    while ((json.length + 8) % 8) json += ' ';
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
    shards.push({ names: mine, body: Buffer.concat([len, Buffer.from(json), ...chunks]) });
  }
  return shards;
}

// /today/sd1/... serves the sd1 fixture as a folder saved today looks: the tokenizer as
// transformers 5's save_pretrained writes it (tokenizer.json, no vocab.json / merges.txt) and the
// UNet as a sharded checkpoint (diffusers' index and shard names).
const todayFiles = (() => {
  const files = new Map();
  const saved = path.join(root, 'tests/fixtures/saved-today/sd1/tokenizer');
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) files.set(`tokenizer/${f}`, fs.readFileSync(path.join(saved, f)));
  for (const f of ['vocab.json', 'merges.txt', 'special_tokens_map.json']) files.set(`tokenizer/${f}`, null);
  const unet = fs.readFileSync(path.join(root, 'tests/fixtures/sd1/unet/diffusion_pytorch_model.safetensors'));
  const weightMap = {};
  splitSafetensors(unet, 2).forEach((shard, i) => {
    const name = `diffusion_pytorch_model-0000${i + 1}-of-00002.safetensors`;
    for (const t of shard.names) weightMap[t] = name;
    files.set(`unet/${name}`, shard.body);
  });
  files.set('unet/diffusion_pytorch_model.safetensors', null);
  files.set('unet/diffusion_pytorch_model.safetensors.index.json',
    Buffer.from(JSON.stringify({ metadata: { total_size: unet.length }, weight_map: weightMap })));
  return files;
})();

// /big/sd1/...: the sd1 fixture whose UNet file also holds a 64 MiB tensor no model part uses (a
// large download for precompile: 'auto'; the loader reads only the tensors it needs).
const bigUnet = (() => {
  const unet = fs.readFileSync(path.join(root, 'tests/fixtures/sd1/unet/diffusion_pytorch_model.safetensors'));
  const n = Number(unet.readBigUInt64LE(0));
  const head = JSON.parse(unet.subarray(8, 8 + n).toString('utf8'));
  const data = unet.subarray(8 + n);
  const extra = 64 * 2 ** 20;
  head.unused_padding = { dtype: 'F32', shape: [extra / 4], data_offsets: [data.length, data.length + extra] };
  let json = JSON.stringify(head);
  while ((json.length + 8) % 8) json += ' ';
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  return Buffer.concat([len, Buffer.from(json), data, Buffer.alloc(extra)]);
})();

/** ONNX Runtime Web for the side-by-side benchmark (TGATE_BENCH only: 150 MB, not a CI dependency). */
function ensureOrt() {
  const web = path.join(root, 'web');
  if (fs.existsSync(path.join(web, 'node_modules/onnxruntime-web/dist/ort.webgpu.min.mjs'))) return;
  console.log('installing onnxruntime-web@1.31.1 into web/node_modules (not saved to package.json)');
  execFileSync('npm', ['install', '--no-save', '--no-audit', '--no-fund', '--loglevel=error', 'onnxruntime-web@1.31.1'], { cwd: web, stdio: 'inherit' });
}

const server = await serve({
  route(p, res) {
    // A noise file that arrives only after 5 s (to abort its download).
    if (p === '/slow/noise.safetensors') {
      setTimeout(() => send(res, 404, Buffer.from('too late')), 5000);
      return true;
    }
    // /slow/sd1/...: the sd1 fixture, each whole weight file held back 4 s (a slow network);
    // /nofull/sd1/...: whole weight files fail (HTTP 500). Byte ranges (the weight headers) at once.
    const slow = p.match(/^\/(slow|nofull)\/sd1\/(.*)$/);
    if (slow) {
      const file = path.join(root, 'tests/fixtures/sd1', slow[2]);
      if (!fs.existsSync(file)) { send(res, 404, Buffer.from('not found')); return true; }
      const body = fs.readFileSync(file);
      if (sendRange(res, p, body)) return true;
      const weights = p.endsWith('.safetensors');
      if (weights && slow[1] === 'nofull') send(res, 500, Buffer.from('failed'));
      else setTimeout(() => send(res, 200, body, typeOf(p)), weights ? 4000 : 0);
      return true;
    }
    const big = p.match(/^\/big\/sd1\/(.*)$/);
    if (big) {
      const file = path.join(root, 'tests/fixtures/sd1', big[1]);
      const body = big[1] === 'unet/diffusion_pytorch_model.safetensors' ? bigUnet : (fs.existsSync(file) ? fs.readFileSync(file) : null);
      if (!body) { send(res, 404, Buffer.from('not found')); return true; }
      if (!sendRange(res, p, body)) send(res, 200, body, typeOf(p));
      return true;
    }
    const t = p.match(/^\/today\/sd1\/(.*)$/);
    if (t) {
      const file = path.join(root, 'tests/fixtures/sd1', t[1]);
      const body = todayFiles.has(t[1]) ? todayFiles.get(t[1]) : (fs.existsSync(file) ? fs.readFileSync(file) : null);
      if (body) send(res, 200, body, typeOf(p)); else send(res, 404, Buffer.from('not found'));
      return true;
    }
    // /bk/<name>/... serves a small-model fixture (BK-SDM, LCM): its own UNet (and scheduler),
    // sd1's other parts.
    const bk = p.match(/^\/bk\/(bk-sdm-[a-z]+|lcm)\/(.*)$/);
    if (bk) {
      const file = [path.join(root, 'tests/fixtures', bk[1], bk[2]), path.join(root, 'tests/fixtures/sd1', bk[2])]
        .find((f) => fs.existsSync(f) && fs.statSync(f).isFile());
      if (file) send(res, 200, fs.readFileSync(file), typeOf(p)); else send(res, 404, Buffer.from('not found'));
      return true;
    }
    const m = p.match(/^\/broken\/([a-z0-9]+)\/(.*)$/);
    if (!m) return false;
    const body = broken(m[1], m[2]);
    if (body) send(res, 200, body, typeOf(p)); else send(res, 404, Buffer.from('not found'));
    return true;
  },
  onFile(p, { range }) {
    if (p.endsWith('.safetensors') && p.includes('/fixtures/sd1/') && !range) weightHits.push(p);
  },
});
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
  const page = await browser.newPage({ viewport: { width: 1180, height: 900 } });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e}`));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') pageErrors.push(`${m.type()}: ${m.text()}`);
  });
  // The demo page first (through its UI); then the harness runs in the same page on the demo's
  // generator, whose kernels are compiled by then (a new worker compiles for minutes on SwiftShader).
  const demo = page;
  await demo.goto(`${origin}/web/demo/`);
  await demo.waitForSelector('body[data-ready="true"]');

  page.setDefaultTimeout(600_000);
  const call = (fn, ...args) => page.evaluate(([f, a]) => window.harness[f](...a), [fn, args]);

  // ONLY=<substring>[|<substring>...] runs the matching tests (and the loads they need) while
  // developing.
  const only = process.env.ONLY && process.env.ONLY.split('|');
  const step = async (name, fn) => {
    const wanted = !only || only.some((o) => name.includes(o));
    if (!wanted && !['first load (network)', 'wuerstchen: load'].includes(name)) return;
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

  await step('demo page: load the tiny model, generate, chart', async () => {
    await demo.selectOption('#model', 'tiny-sd');
    // Time to first image in a fresh worker: load, kernel compilation and 5 steps, as a user sees it.
    const t0 = Date.now();
    await demo.click('#load');
    await demo.waitForSelector('#generate:not([disabled])', { timeout: 120_000 });
    const loadedS = (Date.now() - t0) / 1e3;
    await demo.fill('#steps', '5');
    await demo.fill('#gateStep', '2');
    await demo.click('#generate');
    await demo.waitForSelector('body[data-generated="1"]', { timeout: 600_000 });
    const firstImageS = (Date.now() - t0) / 1e3;
    const state = await demo.evaluate(() => {
      const lit = (id) => {
        const c = document.getElementById(id);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i]) n += 1;
        return n;
      };
      return {
        chartPixels: lit('chart'), imagePixels: lit('image'),
        summary: document.getElementById('summary').textContent,
        status: document.getElementById('status').textContent,
        error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
      };
    });
    fs.mkdirSync(path.join(root, 'target/browser'), { recursive: true });
    await demo.screenshot({ path: path.join(root, 'target/browser/demo.png'), fullPage: true });
    assert.equal(state.error, null);
    assert.ok(state.chartPixels > 1000 && state.imagePixels > 1000, JSON.stringify(state));
    assert.match(state.summary, /T-GATE saved/);
    assert.deepEqual(pageErrors.filter((e) => e.startsWith('pageerror')), []);
    return { ...state, firstImageS, loadedS };
  });
  await page.addScriptTag({ type: 'module', url: '/web/test/harness.js' });
  await page.waitForFunction(() => window.harnessReady === true);

  // 'auto' computes in f16 where the adapter has shader-f16 (SwiftShader has not); f16 results
  // follow the f32 references within 3% (as natively on wgpu), f32 within 1e-3.
  let shaderF16 = false;
  let tolerance = 1e-3;
  await step('detect', async () => {
    const d = await call('detect');
    assert.equal(d.webgpu, true);
    assert.ok(d.limits && d.limits.maxStorageBufferBindingSize > 0, JSON.stringify(d));
    shaderF16 = d.shaderF16;
    return d;
  });
  await step('first load (network)', async () => {
    await call('purgeCache');
    const before = weightHits.length;
    const r = await call('load', 'sd1');
    assert.ok(weightHits.length - before >= 3, `weights fetched: ${weightHits.length - before}`);
    assert.equal(r.dtype, shaderF16 ? 'f16' : 'f32');
    if (r.dtype === 'f16') tolerance = 3e-2;
    // Weights are read tensor by tensor, never a whole file at once.
    const unet = fs.statSync(path.join(root, 'tests/fixtures/sd1/unet/diffusion_pytorch_model.safetensors')).size;
    assert.ok(r.largestReadBytes > 0 && r.largestReadBytes < unet / 4, JSON.stringify(r));
    const last = r.upload[r.upload.length - 1];
    assert.ok(last && last[1] === r.weightBytes && last[0] > 0.9 * r.weightBytes, JSON.stringify(r.upload));
    // 'auto': a 3 MB download hides no compilation, so none runs ahead.
    assert.equal(r.precompile, undefined, JSON.stringify(r.precompile));
    return { ...r, upload: r.upload.length };
  });
  await step("precompile 'auto': only a large uncached download into a worker without a model", async () => {
    const r = await call('autoPrecompile', '/big/sd1/');
    // 64 MiB not in the browser cache, no model in the worker: the kernels compile on placeholders.
    assert.ok(r.first.precompile && r.first.precompile.launches > 500, JSON.stringify(r.first));
    assert.ok(r.first.weightBytes > 64 * 2 ** 20 && r.first.largestReadBytes < 16 * 2 ** 20, 'the unused tensor is never read');
    // The same folder again, out of the cache again: a model is loaded, so none runs.
    assert.equal(r.again.precompile, undefined, JSON.stringify(r.again));
    // A fresh worker, the weights in the browser cache: nothing to hide, no precompilation.
    assert.equal(r.cached.precompile, undefined, JSON.stringify(r.cached));
    assert.equal(r.err <= tolerance * r.scale, true, `max abs err ${r.err} (scale ${r.scale})`);
    return r;
  });
  await step('precompile: kernels run on placeholder weights before the weights, then the references match', async () => {
    const r = await call('precompileCase', { key: 'pipe.pndm.tgate' });
    // 60 px is not a multiple of 8: only the precompilation is refused, by name.
    assert.equal(r.refused && r.refused.error && r.refused.error.code, 'invalid_parameter', JSON.stringify(r.refused));
    assert.match(r.refused.error.message, /width|multiple/, JSON.stringify(r.refused));
    assert.ok(r.precompile.ms > 0 && r.precompile.launches > 500 && r.precompile.kernels > 50, JSON.stringify(r.precompile));
    assert.ok(r.err <= tolerance * r.scale, `max abs err ${r.err} (scale ${r.scale})`);
    // A precompilation whose load never came (its download failed) is not reported by the next.
    assert.equal(r.orphan.code, 'network', JSON.stringify(r.orphan));
    assert.equal(r.afterOrphan.precompile, undefined, JSON.stringify(r.afterOrphan));
    assert.equal(r.afterOrphan.kind, 'sd');
    return r;
  });
  for (const [label, gate, key] of [
    ['sd: pndm ungated', false, 'pipe.pndm.full'],
    // Loaded from Blobs (the user-picked files path) for the gated case.
    ['sd: pndm gated', { step: 3 }, 'pipe.pndm.tgate'],
    // A folder as saved today: tokenizer.json, sharded UNet.
    ['sd: pndm gated, folder saved today', { step: 3 }, 'pipe.pndm.tgate'],
    // tgate's self-attention cache: the knobs reach the model (its references differ from the
    // plain gate's).
    ['sd: pndm gated with the self-attention cache before the gate', { step: 6, spInterval: 3, fiInterval: 1, warmUp: 1 }, 'pipe.pndm.tgate_sp'],
    ['sd: pndm gated with the self-attention cache on both sides', { step: 4, spInterval: 2, fiInterval: 2, warmUp: 1 }, 'pipe.pndm.tgate_sa'],
  ]) {
    if (label.includes('saved today')) {
      await step('load a folder saved today (tokenizer.json, sharded UNet)', async () => {
        const r = await call('loadUrl', '/today/sd1/');
        const unet = r.files.find((f) => f.part === 'unet');
        assert.deepEqual(unet.files, ['unet/diffusion_pytorch_model-00001-of-00002.safetensors',
          'unet/diffusion_pytorch_model-00002-of-00002.safetensors'], JSON.stringify(r.files));
        assert.ok(r.selected.some((s) => s.part === 'unet' && s.files.length === 2 && /compute/.test(s.reason)), JSON.stringify(r.selected));
        assert.ok(r.progress.includes('select'), JSON.stringify(r.progress));
        return { files: r.files, selected: r.selected };
      });
    } else if (label === 'sd: pndm gated') {
      await step('load from Blobs (picked files)', async () => {
        const r = await call('loadBlobs', 'sd1');
        assert.equal(r.kind, 'sd');
        assert.ok(r.largestReadBytes < r.sizes['unet/diffusion_pytorch_model.safetensors'] / 4, JSON.stringify(r));
        return r;
      });
    }
    await step(label, async () => {
      const r = await call('sdCase', 'sd1', { scheduler: 'pndm', gate, key });
      assert.ok(r.err <= tolerance * r.scale, `${key}: max abs err ${r.err} (scale ${r.scale})`);
      // At 64×64 a step on SwiftShader is almost all per-dispatch cost, so halving the batch saves
      // little and the ratio is reported, not asserted (Würstchen's is asserted below; the
      // TGATE_BENCH=1 step measures SD at 256×256, where compute dominates).
      return {
        err: r.err, scale: r.scale, size: [r.width, r.height], phases: r.phases,
        stepMs: r.timings.map((t) => Math.round(t.ms)),
      };
    });
  }
  if (process.env.TGATE_BENCH) {
    // A benchmark, not part of CI: new shapes are compiled first.
    await step('bench: sd gated steps at 256×256 (same run)', async () => {
      const r = await call('sdTiming', 'sd1', { size: 256, steps: 8, gateStep: 4 });
      assert.ok(r.phases.ratio < 1, JSON.stringify(r.phases));
      return { phases: r.phases, stepMs: r.timings.map((t) => Math.round(t.ms)) };
    });
    // Side by side with ONNX Runtime Web (WebGPU) on the same UNet and weights, same browser.
    ensureOrt();
    for (const size of [64, 256]) {
      await step(`bench: our UNet step vs ONNX Runtime Web's at ${size}×${size} (same UNet, same run)`, async () => {
        const ours = await call('sdTiming', 'sd1', { size, steps: 8, gateStep: 4 });
        const ort = await call('ortTiming', 'sd1', { size, runs: 3 });
        const p = ours.phases;
        const round = (x) => Math.round(x);
        return {
          ours: { planningMs: round(p.spMs), gatedMs: round(p.fiMs), planningLaunches: p.spLaunches, gatedLaunches: p.fiLaunches, planningEnqueueMs: round(p.spEnqueueMs), gatedEnqueueMs: round(p.fiEnqueueMs) },
          ort: { sessionMs: round(ort.sessionMs), firstMs: ort.firstMs, batch2Ms: round(ort.batch2Ms), batch1Ms: round(ort.batch1Ms) },
          // Below 1: ours is faster (batch 2 = a planning step, batch 1 = a gated step).
          oursOverOrt: { batch2: +(p.spMs / ort.batch2Ms).toFixed(2), batch1: +(p.fiMs / ort.batch1Ms).toFixed(2) },
        };
      });
    }
    // Time to first image when the weights take a while to arrive (the test server holds each
    // weight file of /slow/sd1/ back 4 s, as a network would): with and without the
    // precompilation, each in a fresh worker, same run.
    await step('bench: first image with the weights arriving slowly, precompiled or not', async () => {
      const runs = {};
      for (const [name, precompile] of [['precompiled', true], ['notPrecompiled', false]]) {
        await call('purgeCache');
        runs[name] = await call('firstImage', '/slow/sd1/', precompile);
      }
      assert.ok(runs.precompiled.precompile && runs.precompiled.precompile.ms > 0, JSON.stringify(runs.precompiled));
      assert.equal(runs.notPrecompiled.precompile, undefined);
      return { ...runs, ratio: +(runs.notPrecompiled.firstImageMs / runs.precompiled.firstImageMs).toFixed(2) };
    });
    // SD 1.5's UNet structure at a fifth of its width (37.5 M parameters, random weights) at
    // 256×256 (32×32 latents, as SD 1.5's at 512): ours against ONNX Runtime Web on the same UNet
    // and weights, then whole images gated and ungated. The model is made by
    // tests/make_bench_sd15.py into target/bench-sd15/ (not committed: it needs Python and torch).
    if (!fs.existsSync(path.join(root, 'target/bench-sd15/unet/model.onnx'))) {
      console.log('skip bench sd15: no target/bench-sd15/unet/model.onnx (make it with: python3 tests/make_bench_sd15.py, e.g. /work/venv/bin/python)');
    } else {
      const round = (x) => (x == null ? x : Math.round(x));
      const sd15 = {};
      await step('bench sd15: load target/bench-sd15 (SD 1.5 UNet structure, 37.5 M random weights)', async () => {
        const r = await call('loadUrl', '/target/bench-sd15/');
        assert.equal(r.kind, 'sd');
        return { dtype: r.dtype, weightBytes: r.weightBytes, fromNetwork: r.fromNetwork, fromCache: r.fromCache, ms: round(r.ms) };
      });
      await step('bench sd15: our UNet steps at 256×256 (planning = batch 2, gated = batch 1)', async () => {
        const r = await call('sdTiming', null, { size: 256, steps: 8, gateStep: 4 });
        assert.equal(r.finite, true);
        const p = r.phases;
        sd15.ours = p;
        return {
          // The first step compiles this model's kernels at this size.
          firstStepMs: round(r.timings[0].ms),
          planningMs: round(p.spMs), gatedMs: round(p.fiMs), gatedOverPlanning: +p.ratio.toFixed(2),
          planningLaunches: p.spLaunches, gatedLaunches: p.fiLaunches,
          planningEnqueueMs: round(p.spEnqueueMs), gatedEnqueueMs: round(p.fiEnqueueMs),
          stepMs: r.timings.map((t) => round(t.ms)),
        };
      });
      await step('bench sd15: ONNX Runtime Web on the same UNet at 256×256 (batch 2 and 1, same page)', async () => {
        const ort = await call('ortTiming', '/target/bench-sd15/', { size: 256, runs: 3 });
        const p = sd15.ours;
        return {
          ort: {
            sessionMs: round(ort.sessionMs), firstMs: { 2: round(ort.firstMs[2]), 1: round(ort.firstMs[1]) },
            batch2Ms: round(ort.batch2Ms), batch1Ms: round(ort.batch1Ms),
          },
          // Below 1: ours is faster (batch 2 = a planning step, batch 1 = a gated step).
          oursOverOrt: p && { batch2: +(p.spMs / ort.batch2Ms).toFixed(2), batch1: +(p.fiMs / ort.batch1Ms).toFixed(2) },
        };
      });
      // SD15_STEPS=<n> shortens the images (a smoke run); the gate at 40% of the steps, as the
      // generator's default (10 of 25).
      const steps = Number(process.env.SD15_STEPS || 25);
      const gateStep = Math.round(0.4 * steps);
      await step(`bench sd15: whole ${steps}-step image at 256×256, gated vs ungated (same run, same seed)`, async () => {
        const base = { prompt: 'a tiny red fox', steps, guidance: 7.5, scheduler: 'pndm', width: 256, height: 256, seed: 11 };
        // Warm-up (not reported): PNDM's kernels and the self-attention cache's store and reuse.
        const warm = await call('generateTiming', { ...base, steps: 4, gate: { step: 4, spInterval: 2, fiInterval: 1, warmUp: 0 } });
        const runs = {};
        // SD15_RUNS=<name>,<name>... picks the images (each is ~8-14 minutes here).
        const pick = process.env.SD15_RUNS && process.env.SD15_RUNS.split(',');
        // DeepCache's shallow steps, warmed up too when its image is timed.
        if (!pick || pick.includes('gatedDeepCache')) {
          await call('generateTiming', { ...base, steps: 4, gate: { step: 2 }, deepCache: { interval: 2, branch: 0 } });
        }
        for (const [name, gate, deepCache] of [
          ['ungated', false, false],
          ['gated', { step: gateStep }, false],
          // tgate's defaults for its self-attention cache (TgateSDLoader: sp_interval 5, fi_interval 1, warm_up 2).
          ['gatedSelfAttnCache', { step: gateStep, spInterval: 5, fiInterval: 1, warmUp: 2 }, false],
          // tgate's TgateSDDeepCacheLoader: the gate with DeepCache (interval 3, branch 0).
          ['gatedDeepCache', { step: gateStep }, true],
        ]) {
          if (pick && !pick.includes(name)) continue;
          const r = await call('generateTiming', { ...base, gate, deepCache });
          assert.equal(r.finite, true, `${name}: non-finite latents`);
          assert.deepEqual(r.size, [256, 256]);
          runs[name] = {
            gate, deepCache, totalMs: round(r.totalMs), wallMs: round(r.wallMs), unetMs: round(r.unetMs), unetCalls: r.unetCalls,
            planningMs: round(r.phases.spMs), gatedMs: round(r.phases.fiMs),
            stepMs: r.stepMs.map(round),
          };
        }
        // Above 1: the run saves time against the ungated image (ungated time over its time).
        const speedUp = {};
        for (const name of Object.keys(runs)) {
          if (name === 'ungated' || !runs.ungated) continue;
          const ratio = (key) => +(runs.ungated[key] / runs[name][key]).toFixed(2);
          speedUp[name] = { total: ratio('totalMs'), unet: ratio('unetMs') };
        }
        return { steps, gateStep, warmUpMs: round(warm.wallMs), ...runs, ungatedOver: speedUp };
      });
    }
  }
  await step('bk-sdm-tiny (no mid block, two levels): gated matches tgate', async () => {
    const loaded = await call('loadUrl', '/bk/bk-sdm-tiny/');
    assert.equal(loaded.kind, 'sd');
    const r = await call('sdCase', 'bk-sdm-tiny', { scheduler: 'ddim', gate: { step: 3 }, key: 'pipe.ddim.tgate' });
    assert.ok(r.err <= tolerance * r.scale, `bk-sdm-tiny: max abs err ${r.err} (scale ${r.scale})`);
    return { err: r.err, scale: r.scale, phases: r.phases, stepMs: r.timings.map((t) => Math.round(t.ms)) };
  });
  await step('lcm (guidance embedding, LCMScheduler, one batch): gated matches the no-guidance gate', async () => {
    const loaded = await call('loadUrl', '/bk/lcm/');
    assert.equal(loaded.kind, 'sd');
    const r = await call('sdCase', 'lcm', { scheduler: 'lcm', gate: { step: 2 }, key: 'pipe.lcm.gated' });
    assert.ok(r.err <= tolerance * r.scale, `lcm: max abs err ${r.err} (scale ${r.scale})`);
    return { err: r.err, scale: r.scale, phases: r.phases, stepMs: r.timings.map((t) => Math.round(t.ms)) };
  });
  await step('second load (browser cache)', async () => {
    const before = weightHits.length;
    const r = await call('load', 'sd1');
    assert.equal(weightHits.length, before, 'weights were downloaded again');
    assert.ok(r.fromCache >= 3, JSON.stringify(r));
    return r;
  });
  await step('inspect: download and GPU bytes of a folder, without downloading its weights', async () => {
    const before = weightHits.length;
    const r = await call('inspectCase', '/tests/fixtures/sd1/', { dtype: 'f32' });
    assert.equal(weightHits.length, before, 'weights were downloaded');
    // The tensor data of each safetensors file: its size less the 8-byte length and the header.
    const data = (rel) => {
      const buf = fs.readFileSync(path.join(root, 'tests/fixtures/sd1', rel));
      return buf.length - 8 - Number(buf.readBigUInt64LE(0));
    };
    const want = { text_encoder: data('text_encoder/model.safetensors'), unet: data('unet/diffusion_pytorch_model.safetensors'), vae: data('vae/diffusion_pytorch_model.safetensors') };
    assert.deepEqual(Object.fromEntries(r.parts.map((p) => [p.part, p.downloadBytes])), want);
    // All f32 on disk and on the device here.
    assert.equal(r.deviceBytes, r.downloadBytes);
    assert.equal(r.dtype, 'f32');
    const half = await call('inspectCase', '/tests/fixtures/sd1/', { dtype: 'f16' });
    // Float tensors take half the bytes in f16 (integer ones, if any, keep theirs).
    assert.ok(Math.abs(half.deviceBytes * 2 - r.deviceBytes) <= r.deviceBytes * 0.01, JSON.stringify(half));
    assert.equal(half.dtype, 'f16');
    return { parts: r.parts, downloadBytes: r.downloadBytes, deviceBytesF16: half.deviceBytes };
  });
  await step('T-GATE + DeepCache (interval 3, branch 0) matches tgate\'s TgateSDDeepCacheLoader', async () => {
    const key = 'pipe.tgate_deepcache.ddim.i3b0';
    const r = await call('sdCase', 'sd1', {
      scheduler: 'ddim', gate: { step: 3 }, deepCache: { interval: 3, branch: 0 }, key, expected: 'deepcache',
    });
    assert.ok(r.err <= tolerance * r.scale, `${key}: max abs err ${r.err} (scale ${r.scale})`);
    // Full steps at 0, 2 and 3 (restarts at the gate step and the one before) and 6.
    assert.deepEqual(r.shallow, [1, 4, 5, 7]);
    return { err: r.err, scale: r.scale, shallow: r.shallow, stepMs: r.timings.map((t) => Math.round(t.ms)) };
  });
  // On the SD generator, whose kernels are compiled by now.
  await step('non-finite latents are reported', async () => {
    const r = await call('overflow', '/broken/overflow/');
    assert.equal(r.finite, false, JSON.stringify(r));
    assert.equal(r.retriedInF32, false, JSON.stringify(r));
    assert.equal(r.normal, true, JSON.stringify(r));
    return r;
  });
  await step('f16 overflow: the page retries once in f32 with the same seed', async () => {
    const r = await call('f16Retry');
    assert.equal(r.loadedDtype, 'f16', JSON.stringify(r));
    assert.equal(r.retriedInF32, true, JSON.stringify(r));
    assert.equal(r.finite, true, JSON.stringify(r));
    assert.ok(Number.isInteger(r.firstSeed) && r.seed === r.firstSeed, JSON.stringify(r));
    // Both runs' steps reach the caller's onStep (3 DDIM steps each).
    assert.equal(r.stepsSeen, 6, JSON.stringify(r));
    // Later generations stay in f32 (no retry) and give the retried latents exactly.
    assert.equal(r.plainRetried, false, JSON.stringify(r));
    assert.equal(r.plainFinite, true, JSON.stringify(r));
    assert.equal(r.maxDiff, 0, JSON.stringify(r));
    return r;
  });
  await step('cancel while the noise downloads', async () => {
    const r = await call('abortNoiseDownload', '/slow/noise.safetensors');
    assert.equal(r.code, 'cancelled', JSON.stringify(r));
    return r;
  });
  await step('cancel, then generate', async () => {
    const r = await call('cancelThenGenerate', 'sd1', 2);
    assert.equal(r.cancelled && r.cancelled.code, 'cancelled', JSON.stringify(r));
    // The abort reaches the worker while the next step runs: it stops at the step after.
    assert.ok(r.stepsBeforeCancel <= 3, JSON.stringify(r));
    assert.equal(r.nextSteps, 2);
    return r;
  });
  await step('cancel during the first step at a new size', async () => {
    const r = await call('cancelEarly', 80);
    assert.equal(r.code, 'cancelled', JSON.stringify(r));
    assert.equal(r.steps, 0, JSON.stringify(r));
    return r;
  });
  await step('abort a load inside the worker', async () => {
    const r = await call('abortLoad', 'sd1');
    assert.equal(r.aborted.code, 'cancelled', JSON.stringify(r));
    assert.equal(r.without.code, 'invalid_parameter', JSON.stringify(r));
    assert.match(r.without.message, /no model loaded/);
    assert.equal(r.nextKind, 'sd');
    return r;
  });
  // From here on the harness runs on a generator of its own, whose first worker loses its device.
  await step('wuerstchen: device lost, then generate', async () => {
    const seen = pageErrors.length;
    const r = await call('deviceLost', 'wuerstchen', 'wuerstchen');
    assert.equal(r.lost && r.lost.code, 'device_lost', JSON.stringify(r));
    assert.ok(r.disarmed, 'the test worker did not see the request to lose its device');
    // The loss itself was seen (cubecl logs the device's lost callback), not some other failure.
    assert.ok(pageErrors.slice(seen).some((e) => e.includes('device was lost (Destroyed)')), JSON.stringify(pageErrors.slice(seen)));
    assert.equal(r.stepsBeforeLoss, 0, JSON.stringify(r));
    assert.equal(r.nextSteps, 4);
    return r;
  });
  await step('wuerstchen: load', async () => {
    const r = await call('load', 'wuerstchen', 'wuerstchen');
    assert.equal(r.kind, 'wuerstchen');
    return r;
  });
  for (const [label, gate, prefix] of [
    ['wuerstchen: ungated', false, 'pipe'],
    ['wuerstchen: prior gated at 2', { step: 2 }, 'gate2'],
  ]) {
    await step(label, async () => {
      const r = await call('wuerstchenCase', 'wuerstchen', { gate, prefix });
      for (const stage of ['prior', 'decoder']) {
        const { err, scale } = r[stage];
        assert.ok(err <= tolerance * scale, `${prefix} ${stage}: max abs err ${err} (scale ${scale})`);
      }
      if (gate) assert.ok(r.phases.ratio < 1, JSON.stringify(r.phases));
      return {
        prior: r.prior, decoder: r.decoder, size: [r.width, r.height], phases: r.phases,
        stepMs: r.timings.map((t) => `${t.stage[0]}${Math.round(t.ms)}`),
      };
    });
  }
  for (const [kind, code, text] of [
    ['404', 'network'], ['truncated', 'bad_weights'], ['shape', 'bad_weights'],
    // A decoder that is not RGB is refused at load, before it could trap the module.
    ['gray', 'bad_weights', /out_channels 1/],
  ]) {
    await step(`typed error: ${kind}`, async () => {
      await call('purgeCache');
      const r = await call('loadError', `/broken/${kind}/`);
      assert.equal(r.code, code, JSON.stringify(r));
      if (text) assert.match(r.message, text, JSON.stringify(r));
      return r;
    });
  }
  if (!shaderF16) {
    await step('typed error: f16 without shader-f16', async () => {
      const r = await call('loadError', '/tests/fixtures/sd1/', 'sd', { dtype: 'f16' });
      assert.equal(r.code, 'invalid_parameter', JSON.stringify(r));
      assert.match(r.message, /shader-f16/);
      return r;
    });
  }
  await step('typed error: a tensor over the binding limit, before any download', async () => {
    // The tiny model's largest tensor is CLIP's token embedding, 193792 bytes in f32. With an
    // empty cache, the weight headers are read with range requests and nothing is downloaded.
    await call('purgeCache');
    const before = weightHits.length;
    const r = await call('loadError', '/tests/fixtures/sd1/', 'sd', { dtype: 'f32', maxTensorBytes: 193791 });
    assert.equal(r.code, 'out_of_memory', JSON.stringify(r));
    assert.ok(r.message.includes('token_embedding') && r.message.includes('193792'), JSON.stringify(r));
    assert.match(r.message, /before downloading/);
    assert.equal(weightHits.length, before, 'weights were downloaded');
    return r;
  });
  await step('typed error: weights over the memory budget, before any download', async () => {
    const before = weightHits.length;
    const r = await call('loadError', '/tests/fixtures/sd1/', 'sd', { dtype: 'f32', maxMemoryBytes: 1_000_000 });
    assert.equal(r.code, 'out_of_memory', JSON.stringify(r));
    assert.match(r.message, /in all/);
    assert.match(r.message, /1000000/);
    assert.equal(weightHits.length, before, 'weights were downloaded');
    return r;
  });
  await step('typed error: an image whose activations exceed the binding limit', async () => {
    // 193792 bytes holds every tensor of the tiny model, but not its VAE's last feature map at
    // 64×64 (16 × 64 × 64 f32 = 262144 bytes): refused before the first step.
    const r = await call('generateError', 'sd1', 193792, 64);
    assert.equal(r.code, 'out_of_memory', JSON.stringify(r));
    assert.equal(r.steps, 0);
    assert.ok(r.message.includes('VAE decoder feature map') && r.message.includes('262144'), JSON.stringify(r));
    return r;
  });
  await step('typed errors a faulty environment shows: webgpu_unsupported, busy', async () => {
    const r = await call('faultCodes', Boolean(only));
    assert.equal(r.noWebgpu.code, 'webgpu_unsupported', JSON.stringify(r));
    assert.match(r.noWebgpu.message, /no WebGPU/);
    assert.equal(r.busy.code, 'busy', JSON.stringify(r));
    assert.match(r.busy.message, /already running/);
    return r;
  });
  // Last of the generations: after it the suite's worker reads nothing back (a known weakness).
  await step('a failed readback on a live device is internal', async () => {
    const r = await call('failedReadback', Boolean(only));
    assert.ok(r.disarmed, 'the test worker did not see the request to fail a mapping');
    assert.equal(r.failedRead && r.failedRead.code, 'internal', JSON.stringify(r));
    assert.match(r.failedRead.message, /reading a result back failed: .*staging buffer could not be mapped/s);
    return r;
  });
  await step('npm pack: a scratch app installs the tarball, imports it and loads a model', async () => {
    const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'tgate-scratch-'));
    const web = path.join(root, 'web');
    const tgz = execFileSync('npm', ['pack', '--silent', '--pack-destination', scratch], { cwd: web })
      .toString().trim().split('\n').pop();
    fs.writeFileSync(path.join(scratch, 'package.json'), JSON.stringify({ name: 'scratch', private: true, type: 'module' }));
    execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', `./${tgz}`], { cwd: scratch, stdio: 'ignore' });
    fs.writeFileSync(path.join(scratch, 'index.html'), `<!doctype html><meta charset="utf-8">
<script type="importmap">{ "imports": { "tgate-web": "./node_modules/tgate-web/src/index.js" } }</script>
<script type="module">
import { Generator } from 'tgate-web';
// Worker, wasm module, WebGPU device and a model load; generation itself is tested above (each
// new worker compiles its kernels again, minutes on SwiftShader).
const gen = await Generator.create();
const info = await gen.load({ baseUrl: '/fixtures/sd1/', kind: 'sd' });
let error = null;
try { await gen.generate({ prompt: 'x', steps: 0 }); } catch (e) { error = e.code; }
window.result = { kind: info.kind, width: info.width, invalidSteps: error };
</script>`);
    const app = await serve({
      dir: scratch,
      route(p, res) {
        if (!p.startsWith('/fixtures/')) return false;
        const file = path.join(root, 'tests', p);
        if (fs.existsSync(file)) send(res, 200, fs.readFileSync(file), typeOf(p)); else send(res, 404, Buffer.from('not found'));
        return true;
      },
    });
    const pageApp = await browser.newPage();
    const appErrors = [];
    pageApp.on('pageerror', (e) => appErrors.push(String(e)));
    try {
      await pageApp.goto(`http://127.0.0.1:${app.address().port}/`);
      await pageApp.waitForFunction(() => window.result, null, { timeout: 300_000 });
      const r = await pageApp.evaluate(() => window.result);
      assert.deepEqual(r, { kind: 'sd', width: 64, invalidSteps: 'invalid_parameter' });
      const size = fs.statSync(path.join(scratch, tgz)).size;
      return { tarball: tgz, tarballBytes: size, ...r, errors: appErrors };
    } finally {
      await pageApp.close();
      app.close();
      fs.rmSync(scratch, { recursive: true, force: true });
    }
  });
  results.pageErrors = pageErrors.filter((e) => !e.includes('status of 404')).slice(0, 6);
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(results, null, 1));
process.exit(failed ? 1 : 0);
