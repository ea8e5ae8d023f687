// The demo page: picks a model, loads it with progress, generates with a live preview and draws
// the per-step time chart (semantics-planning vs. fidelity-improving).
import { detect, Generator, inspect, TGateError } from '../src/index.js';

const $ = (id) => document.getElementById(id);
const here = (path) => new URL(path, location.href).href;

const MODELS = {
  'tiny-sd': { kind: 'sd', baseUrl: here('../../tests/fixtures/sd1/'), preset: { steps: 20, guidance: 7.5, gateStep: 8, width: 64, height: 64 } },
  'tiny-wuerstchen': {
    kind: 'wuerstchen', baseUrl: here('../../tests/fixtures/wuerstchen/'),
    preset: { steps: 20, guidance: 4, gateStep: 8, width: 128, height: 256, decoderSteps: 4 },
  },
  // BK-SDM-Tiny: SD 1.4 with a third of its UNet removed (no mid block, one level fewer).
  'bk-sdm-tiny': {
    kind: 'sd', baseUrl: 'https://huggingface.co/nota-ai/bk-sdm-tiny/resolve/main/', small: true,
    preset: { steps: 25, guidance: 7.5, gateStep: 10, width: 512, height: 512, scheduler: 'pndm', deepCache: true },
  },
  'lcm-dreamshaper': {
    kind: 'sd', baseUrl: 'https://huggingface.co/SimianLuo/LCM_Dreamshaper_v7/resolve/main/',
    preset: { steps: 4, guidance: 8.5, gateStep: 2, width: 512, height: 512, scheduler: 'lcm', deepCache: false },
  },
  sd15: {
    kind: 'sd', baseUrl: 'https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/',
    preset: { steps: 25, guidance: 7.5, gateStep: 10, width: 512, height: 512, scheduler: 'pndm', deepCache: false },
  },
  wuerstchen: {
    kind: 'wuerstchen', baseUrl: 'https://huggingface.co/warp-ai/wuerstchen/resolve/main/',
    priorBaseUrl: 'https://huggingface.co/warp-ai/wuerstchen-prior/resolve/main/',
    preset: { steps: 60, guidance: 4, gateStep: 24, width: 512, height: 512, decoderSteps: 12 },
  },
};

const MESSAGES = {
  webgpu_unsupported: 'This browser has no usable WebGPU. Try a recent Chrome or Edge, or enable WebGPU.',
  device_lost: 'The GPU device was lost (driver reset or a failed kernel). The model is loaded again on the next run.',
  out_of_memory: 'The GPU ran out of memory. Try a smaller image or a smaller model.',
  bad_weights: 'The model files are missing, damaged or do not fit together.',
  network: 'A model file could not be downloaded.',
  cancelled: 'Cancelled.',
  busy: 'Still busy with the previous request.',
  invalid_parameter: 'A setting is not valid.',
};

let generator = null;
let loaded = null; // the MODELS entry (or custom) that is loaded
let controller = null;

function showError(e) {
  const box = $('error');
  if (!e) { box.hidden = true; return; }
  const code = e instanceof TGateError ? e.code : 'internal';
  box.textContent = `${MESSAGES[code] || 'Something went wrong.'} (${code}: ${e.message})`;
  box.hidden = false;
}

function progress(fraction, text) {
  $('bar').style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  $('status').textContent = text;
}

function applyPreset(p = {}) {
  for (const k of ['steps', 'guidance', 'gateStep', 'width', 'height', 'decoderSteps', 'scheduler']) {
    if (p[k] !== undefined) $(k).value = p[k];
  }
  if (p.deepCache !== undefined) $('deepCache').checked = p.deepCache;
}

const gb = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : `${(n / 1e6).toFixed(0)} MB`);

/** Shows, before loading, what a remote model downloads and how much GPU memory its weights take. */
async function describe(choice) {
  const m = MODELS[choice];
  const box = $('modelInfo');
  box.textContent = '';
  if (!m || !m.baseUrl.startsWith('http')) return;
  box.textContent = 'Reading the model\'s file list…';
  try {
    const info = await inspect(m);
    if ($('model').value !== choice) return;
    const files = info.parts.map((p) => `${p.part}: ${p.files.join(', ')}`).join('; ');
    box.textContent = info.downloadBytes === null
      ? `Computing in ${info.dtype}. Files: ${files}.`
      : `Download ${gb(info.downloadBytes)} (once; then from the browser cache) · weights take ${gb(info.deviceBytes)} of GPU memory in ${info.dtype}, plus the activations of the image size. Files: ${files}.`;
  } catch (e) {
    if ($('model').value === choice) box.textContent = `Could not read the model's files: ${e.message}`;
  }
}

function setKind(kind) {
  document.querySelectorAll('.sd-only').forEach((el) => { el.hidden = kind !== 'sd'; });
  document.querySelectorAll('.w-only').forEach((el) => { el.hidden = kind !== 'wuerstchen'; });
}

function selected() {
  const choice = $('model').value;
  if (choice === 'url') return { kind: $('kind').value, baseUrl: $('url').value };
  if (choice === 'folder') {
    const files = new Map();
    for (const f of $('folder').files) {
      // Drop the picked folder's own name: keys are paths inside the diffusers layout.
      files.set(f.webkitRelativePath.split('/').slice(1).join('/'), f);
    }
    const kind = [...files.keys()].some((k) => k.startsWith('decoder/')) ? 'wuerstchen' : 'sd';
    return { kind, files };
  }
  return MODELS[choice];
}

async function load() {
  showError(null);
  const model = selected();
  $('load').disabled = true;
  $('generate').disabled = true;
  try {
    if (!generator) generator = await Generator.create();
    progress(0, 'Downloading…');
    const info = await generator.load({
      ...model,
      onProgress: (p) => {
        const mb = (p.loaded / 1e6).toFixed(1);
        if (p.phase === 'upload') progress(p.total ? p.loaded / p.total : 1, `Uploading weights to the GPU: ${mb} of ${(p.total / 1e6).toFixed(1)} MB…`);
        else progress(p.fileTotal ? 0.5 : 0, `Downloading ${mb} MB…`);
      },
    });
    loaded = model;
    setKind(info.kind);
    if (!model.preset || model.preset.width === undefined) applyPreset({ width: info.width, height: info.height });
    const source = info.fromNetwork ? `${info.fromNetwork} files downloaded` : 'all files from the browser cache';
    progress(1, `Loaded (${(info.bytes / 1e6).toFixed(1)} MB, ${source}, ${Math.round(info.ms)} ms; computing in ${info.dtype}).`);
    $('generate').disabled = false;
  } catch (e) {
    progress(0, 'No model loaded.');
    showError(e);
  } finally {
    $('load').disabled = false;
  }
}

function drawImage(canvas, rgba, width, height) {
  const img = new ImageData(rgba, width, height);
  const tmp = new OffscreenCanvas(width, height);
  tmp.getContext('2d').putImageData(img, 0, 0);
  const ctx = canvas.getContext('2d');
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
}

/** Bars per step, coloured by phase; the dashed line is the mean planning step. */
function drawChart(steps) {
  const canvas = $('chart');
  const ctx = canvas.getContext('2d');
  const W = canvas.width;
  const H = canvas.height;
  const pad = { l: 44, r: 10, t: 26, b: 22 };
  ctx.clearRect(0, 0, W, H);
  if (!steps.length) return;
  const max = Math.max(...steps.map((s) => s.ms)) * 1.1;
  const bw = (W - pad.l - pad.r) / steps.length;
  const y = (ms) => H - pad.b - (ms / max) * (H - pad.t - pad.b);
  ctx.font = '11px system-ui';
  ctx.fillStyle = '#9aa0aa';
  const seconds = max > 5000;
  for (let i = 0; i <= 4; i++) {
    const ms = (max * i) / 4;
    ctx.fillText(seconds ? (ms / 1e3).toFixed(0) : `${Math.round(ms)}`, 4, y(ms) + 4);
    ctx.fillRect(pad.l - 4, y(ms), W - pad.l - pad.r + 4, 0.5);
  }
  ctx.fillText(seconds ? 's' : 'ms', 4, pad.t - 10);
  steps.forEach((s, i) => {
    ctx.fillStyle = s.stage === 'decoder' ? '#6b7280' : s.phase === 'semantics-planning' ? '#3b82f6' : '#f59e0b';
    ctx.fillRect(pad.l + i * bw + 1, y(s.ms), Math.max(1, bw - 2), H - pad.b - y(s.ms));
  });
  const legend = [['#3b82f6', 'semantics-planning'], ['#f59e0b', 'fidelity-improving (gated)'], ['#6b7280', 'decoder']];
  let x = pad.l;
  for (const [color, label] of legend) {
    ctx.fillStyle = color;
    ctx.fillRect(x, 8, 10, 10);
    ctx.fillStyle = '#e8e8ea';
    ctx.fillText(label, x + 14, 17);
    x += ctx.measureText(label).width + 34;
  }
  const sp = steps.filter((s) => s.stage !== 'decoder' && s.phase === 'semantics-planning').slice(1);
  if (sp.length) {
    const mean = sp.reduce((a, s) => a + s.ms, 0) / sp.length;
    ctx.strokeStyle = '#e8e8ea';
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(pad.l, y(mean));
    ctx.lineTo(W - pad.r, y(mean));
    ctx.stroke();
    ctx.setLineDash([]);
  }
}

function summarize(steps, totalMs) {
  const main = steps.filter((s) => s.stage !== 'decoder');
  const sp = main.filter((s) => s.phase === 'semantics-planning');
  const fi = main.filter((s) => s.phase === 'fidelity-improving');
  const mean = (xs) => xs.reduce((a, s) => a + s.ms, 0) / Math.max(1, xs.length);
  // The first step also compiles kernels: leave it out of the per-step estimate.
  const spMean = mean(sp.length > 1 ? sp.slice(1) : sp);
  let text = `${steps.length} steps in ${(totalMs / 1e3).toFixed(2)} s`
    + ' (the first run in a page also compiles the GPU kernels).';
  if (fi.length && sp.length) {
    const fiMean = mean(fi.length > 1 ? fi.slice(1) : fi);
    const saved = fi.reduce((a, s) => a + Math.max(0, spMean - s.ms), 0);
    text += ` Planning steps ${spMean.toFixed(1)} ms, gated steps ${fiMean.toFixed(1)} ms`
      + ` (×${(fiMean / spMean).toFixed(2)}); T-GATE saved about ${(saved / 1e3).toFixed(2)} s.`;
  }
  $('summary').textContent = text;
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  const kind = loaded.kind;
  const steps = Number($('steps').value);
  const params = {
    prompt: $('prompt').value,
    negativePrompt: $('negative').value,
    steps,
    guidance: Number($('guidance').value),
    width: Number($('width').value),
    height: Number($('height').value),
    seed: Number($('seed').value),
    gate: $('gate').checked ? { step: Number($('gateStep').value) } : false,
    preview: true,
  };
  if (kind === 'sd') params.scheduler = $('scheduler').value;
  else params.decoderSteps = Number($('decoderSteps').value);
  if (kind === 'sd' && $('deepCache').checked) params.deepCache = { interval: Number($('deepCacheInterval').value) };
  const total = kind === 'sd' ? steps : steps + params.decoderSteps;
  const done = [];
  controller = new AbortController();
  $('generate').disabled = true;
  $('cancel').disabled = false;
  $('image').width = params.width;
  $('image').height = params.height;
  drawChart([]);
  progress(0, 'Starting…');
  try {
    const out = await generator.generate({
      ...params,
      signal: controller.signal,
      onStep: (s) => {
        done.push(s);
        progress(done.length / total, `${s.stage} step ${s.step + 1}/${s.total} · ${s.phase} · ${s.ms.toFixed(0)} ms`);
        if (s.preview) drawImage($('image'), s.preview.rgba, s.preview.width, s.preview.height);
        drawChart(done);
      },
    });
    drawImage($('image'), out.image.data, out.image.width, out.image.height);
    drawChart(out.timings.steps);
    summarize(out.timings.steps, out.timings.totalMs);
    progress(1, `Done: ${out.image.width}×${out.image.height}.`);
    document.body.dataset.generated = String(Number(document.body.dataset.generated || 0) + 1);
  } catch (e) {
    progress(0, 'Stopped.');
    showError(e);
  } finally {
    $('generate').disabled = false;
    $('cancel').disabled = true;
    controller = null;
  }
}

$('model').addEventListener('change', () => {
  const choice = $('model').value;
  $('custom').hidden = choice !== 'url';
  $('local').hidden = choice !== 'folder';
  const m = MODELS[choice];
  if (m) { applyPreset(m.preset); setKind(m.kind); }
  describe(choice);
});
$('load').addEventListener('click', load);
$('form').addEventListener('submit', generate);
$('cancel').addEventListener('click', () => controller && controller.abort());

// The browser tests drive this page and then reuse its generator (its kernels are compiled).
window.tgateDemo = { get generator() { return generator; } };

(async () => {
  applyPreset(MODELS['tiny-sd'].preset);
  const d = await detect();
  $('support').textContent = d.webgpu
    ? `WebGPU ready · shader-f16 ${d.shaderF16 ? 'yes' : 'no'} · max binding ${(d.limits.maxStorageBufferBindingSize / 2 ** 20).toFixed(0)} MiB`
    : 'This browser has no WebGPU: generation is not possible here.';
  // A small adapter (no f16, or bindings under 1 GiB): BK-SDM-Tiny is the real model to try.
  const small = d.webgpu && (!d.shaderF16 || d.limits.maxStorageBufferBindingSize < 2 ** 30);
  for (const [key, m] of Object.entries(MODELS)) {
    const option = document.querySelector(`#model option[value="${key}"]`);
    if (option && m.small && small) option.textContent += ' — recommended for this GPU';
  }
  document.body.dataset.ready = 'true';
})();
