//! Browser bindings of the model crate on burn-wgpu's WebGPU path (wasm-bindgen).
//!
//! Meant to run inside a Web Worker (see `web/src/worker.js`). Every step is enqueued with the
//! model crate's step-wise API and then awaited with a one-value asynchronous readback, so the
//! worker never blocks and step times are real. Errors are thrown as JS `Error`s whose `name` is
//! one of the package's error codes (`webgpu_unsupported`, `device_lost`, `out_of_memory`,
//! `bad_weights`, `invalid_parameter`, `cancelled`). A Rust panic traps the module; its message
//! stays readable through [`last_panic`] so the worker can report it before it is replaced.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use burn::tensor::{DType, Device, Tensor};
use js_sys::{Function, Map, Uint8Array};
use serde::{Deserialize, Serialize};
use tgate::loader::{ModelSource, Variant};
use tgate::pipeline::{Denoiser, EnqueuedStep, GenerateParams, Noise, StableDiffusion, StepInfo};
use tgate::pipeline_wuerstchen::{Wuerstchen, WuerstchenNoise, WuerstchenParams};
use tgate::profile::{LaunchCounter, Launches, Timing};
use tgate::safetensors::{ByteSource, SafeTensors};
use tgate::tgate::GateConfig;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_time::Instant;

fn js_error(code: &str, message: impl std::fmt::Display) -> JsValue {
    let e = js_sys::Error::new(&message.to_string());
    e.set_name(code);
    e.into()
}

/// The package's error code of a model-crate error.
fn code(e: &tgate::Error) -> &'static str {
    use tgate::Error::*;
    match e {
        Config { .. }
        | MissingFile(_)
        | CorruptWeights { .. }
        | MissingTensor { .. }
        | ShapeMismatch { .. }
        | DtypeMismatch { .. }
        | Tokenizer(_) => "bad_weights",
        TensorTooLarge { .. } | ActivationTooLarge { .. } => "out_of_memory",
        InvalidParameter { .. } | Input { .. } => "invalid_parameter",
        Device(msg) if is_out_of_memory(msg) => "out_of_memory",
        Device(_) => "device_lost",
        Cancelled => "cancelled",
    }
}

fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("outofmemory") || m.contains("allocation")
}

fn to_js(e: tgate::Error) -> JsValue {
    js_error(code(&e), e)
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The message of the panic that trapped the module, if one did (read by the worker after a
/// `RuntimeError`), with the error code it maps to.
#[wasm_bindgen(js_name = lastPanic)]
pub fn last_panic() -> JsValue {
    match LAST_PANIC.with(|p| p.borrow().clone()) {
        Some(msg) => {
            let code = if is_out_of_memory(&msg) {
                "out_of_memory"
            } else {
                "device_lost"
            };
            js_error(code, msg)
        }
        None => JsValue::NULL,
    }
}

/// Forwards warnings and errors of the `log` facade (cubecl reports WGSL compilation failures
/// there) to the console.
struct ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let text = format!("[{}] {}", r.target(), r.args());
            web_sys::console::error_1(&text.into());
        }
    }
    fn flush(&self) {}
}

static LOGGER: ConsoleLog = ConsoleLog;

/// Records panics (the worker turns the resulting trap into a typed error), forwards log errors
/// to the console, and keeps kernel autotuning short: every candidate is compiled in the
/// browser, which is slow on first use.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("tgate panicked: {info}");
        web_sys::console::error_1(&msg.clone().into());
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
    }));
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    use cubecl_environment::config::RuntimeConfig;
    let mut config = cubecl_runtime::config::CubeClRuntimeConfig::default();
    config.autotune.level = cubecl_runtime::config::autotune::AutotuneLevel::Minimal;
    cubecl_runtime::config::CubeClRuntimeConfig::try_set(config);
}

/// How much of the weights has been read, for progress reports and for the load result.
struct ReadStats {
    /// Bytes of all weight files handed over.
    total: f64,
    read: Cell<f64>,
    largest: Cell<f64>,
    on_progress: Option<Function>,
}

/// Files handed over from JS: `Map<path, Blob | Uint8Array>`. A weight file is read tensor by
/// tensor (a `Blob` through `FileReaderSync`, which exists in workers), so wasm memory holds one
/// tensor at a time and there is no second full copy of a checkpoint; its entry is removed from
/// the map when it is opened, so the page's reference goes as soon as the load is done with it.
struct JsSource {
    files: Map,
    name: &'static str,
    stats: Rc<ReadStats>,
    /// The device's largest storage binding (or the caller's smaller cap), in bytes.
    max_tensor_bytes: Option<u64>,
}

/// One file as JS gave it.
#[derive(Clone)]
enum JsFile {
    Bytes(Uint8Array),
    Blob(web_sys::Blob),
}

impl JsFile {
    fn of(value: &JsValue) -> Option<JsFile> {
        if let Some(a) = value.dyn_ref::<Uint8Array>() {
            Some(JsFile::Bytes(a.clone()))
        } else {
            value
                .dyn_ref::<web_sys::Blob>()
                .map(|b| JsFile::Blob(b.clone()))
        }
    }

    fn len(&self) -> u64 {
        match self {
            JsFile::Bytes(a) => a.length() as u64,
            JsFile::Blob(b) => b.size() as u64,
        }
    }

    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let describe = |e: JsValue| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
                .unwrap_or_else(|| format!("{e:?}"))
        };
        match self {
            JsFile::Bytes(a) => Ok(a.subarray(start as u32, end as u32).to_vec()),
            JsFile::Blob(b) => {
                let part = b
                    .slice_with_f64_and_f64(start as f64, end as f64)
                    .map_err(describe)?;
                let buf = web_sys::FileReaderSync::new()
                    .and_then(|r| r.read_as_array_buffer(&part))
                    .map_err(describe)?;
                Ok(Uint8Array::new(&buf).to_vec())
            }
        }
    }
}

/// A weight file being read in ranges (counted for progress).
struct JsBytes {
    file: JsFile,
    stats: Rc<ReadStats>,
}

impl ByteSource for JsBytes {
    fn len(&self) -> u64 {
        self.file.len()
    }

    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let bytes = self.file.read_range(start, end)?;
        let s = &self.stats;
        let n = bytes.len() as f64;
        s.read.set(s.read.get() + n);
        s.largest.set(s.largest.get().max(n));
        if let Some(f) = &s.on_progress {
            // A failing progress callback must not fail the load.
            let _ = f.call2(&JsValue::NULL, &s.read.get().into(), &s.total.into());
        }
        Ok(bytes)
    }
}

impl JsSource {
    fn new(
        files: Map,
        name: &'static str,
        stats: Rc<ReadStats>,
        max_tensor_bytes: Option<u64>,
    ) -> Result<Self, JsValue> {
        let mut ok = true;
        files.for_each(&mut |value, key| {
            ok &= key.is_string() && JsFile::of(&value).is_some();
        });
        if !ok {
            return Err(js_error(
                "invalid_parameter",
                "files must map path strings to Blob or Uint8Array",
            ));
        }
        Ok(JsSource {
            files,
            name,
            stats,
            max_tensor_bytes,
        })
    }

    /// Bytes of the weight files in `files`.
    fn weight_bytes(files: &Map) -> f64 {
        let mut total = 0.0;
        files.for_each(&mut |value, key| {
            if key.as_string().is_some_and(|k| k.ends_with(".safetensors")) {
                total += JsFile::of(&value).map_or(0, |f| f.len()) as f64;
            }
        });
        total
    }

    fn get(&self, path: &str) -> Option<JsFile> {
        JsFile::of(&self.files.get(&JsValue::from_str(path)))
    }
}

impl ModelSource for JsSource {
    fn read(&self, path: &str) -> tgate::Result<Option<Vec<u8>>> {
        let Some(file) = self.get(path) else {
            return Ok(None);
        };
        file.read_range(0, file.len())
            .map(Some)
            .map_err(|e| tgate::Error::MissingFile(format!("{path}: {e}")))
    }

    fn open(&self, path: &str) -> tgate::Result<Option<Box<dyn ByteSource>>> {
        let Some(file) = self.get(path) else {
            return Ok(None);
        };
        self.files.delete(&JsValue::from_str(path));
        Ok(Some(Box::new(JsBytes {
            file,
            stats: self.stats.clone(),
        })))
    }

    fn max_tensor_bytes(&self) -> Option<u64> {
        self.max_tensor_bytes
    }

    fn describe(&self) -> String {
        self.name.into()
    }
}

/// Generation parameters, as the JS API names them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Params {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    /// SD: denoising steps; Würstchen: prior steps.
    steps: Option<usize>,
    /// SD: guidance scale; Würstchen: prior guidance.
    guidance: Option<f64>,
    scheduler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    seed: Option<f64>,
    /// Würstchen only.
    decoder_steps: Option<usize>,
    decoder_guidance: Option<f64>,
    /// `false` (no gate) or the knobs; absent or `true`: the default gate.
    gate: Option<GateParam>,
    /// Send a small RGBA preview of the latents with every step report.
    #[serde(default)]
    preview: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum GateParam {
    Enabled(bool),
    Knobs(GateKnobs),
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GateKnobs {
    step: Option<usize>,
    sp_interval: Option<usize>,
    fi_interval: Option<usize>,
    warm_up: Option<usize>,
}

impl Params {
    /// The gate knobs; `None` when the gate is off.
    fn gate(&self) -> Option<GateKnobs> {
        match &self.gate {
            Some(GateParam::Enabled(false)) => None,
            Some(GateParam::Enabled(true)) | None => Some(GateKnobs::default()),
            Some(GateParam::Knobs(k)) => Some(GateKnobs {
                step: k.step,
                sp_interval: k.sp_interval,
                fi_interval: k.fi_interval,
                warm_up: k.warm_up,
            }),
        }
    }

    fn seed(&self) -> Result<u64, JsValue> {
        match self.seed {
            Some(s) if s >= 0.0 && s.fract() == 0.0 && s <= 9007199254740991.0 => Ok(s as u64),
            Some(s) => Err(js_error(
                "invalid_parameter",
                format!("seed must be a non-negative integer, got {s}"),
            )),
            None => Ok((js_sys::Math::random() * 4294967296.0) as u64),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StepReport {
    /// `unet` (SD), `prior` or `decoder` (Würstchen).
    stage: &'static str,
    step: usize,
    total: usize,
    timestep: f64,
    phase: &'static str,
    ms: f64,
    /// GPU kernels the step launched, and how many distinct compiled kernels that was.
    launches: usize,
    kernels: usize,
}

impl StepReport {
    fn new(stage: &'static str, s: &StepInfo, launches: &Launches) -> Self {
        StepReport {
            stage,
            step: s.index,
            total: s.total,
            timestep: s.timestep,
            phase: s.phase.name(),
            ms: s.seconds * 1e3,
            launches: launches.total(),
            kernels: launches.distinct,
        }
    }
}

async fn read_back<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, JsValue> {
    let data = t.into_data_async().await.map_err(|e| {
        let msg = format!("{e:?}");
        let code = if is_out_of_memory(&msg) {
            "out_of_memory"
        } else {
            "device_lost"
        };
        js_error(code, msg)
    })?;
    data.try_to_vec::<f32>()
        .map_err(|e| js_error("device_lost", format!("{e:?}")))
}

/// A cheap preview of latents `[1, c, h, w]`: the first three channels (for four-channel SD
/// latents, the usual linear map to RGB), each stretched to its range, as RGBA.
fn preview_rgba(values: &[f32], dims: [usize; 4], sd: bool) -> (Vec<u8>, usize, usize) {
    let [_, c, h, w] = dims;
    let n = h * w;
    let mut rgb = vec![0f32; 3 * n];
    // Contribution of each SD latent channel to R, G, B (a published approximation).
    const SD_RGB: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    for i in 0..n {
        for k in 0..3 {
            rgb[k * n + i] = if sd && c == 4 {
                (0..4).map(|ch| SD_RGB[ch][k] * values[ch * n + i]).sum()
            } else {
                values[(k % c) * n + i]
            };
        }
    }
    let mut rgba = vec![255u8; 4 * n];
    for k in 0..3 {
        let plane = &rgb[k * n..(k + 1) * n];
        let lo = plane.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = plane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        for i in 0..n {
            rgba[4 * i + k] = (((plane[i] - lo) / span) * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    (rgba, w, h)
}

/// Runs the step loop of one stage: enqueue, await a one-value readback, report.
async fn drive_stage(
    stage: &'static str,
    sd: bool,
    mut step: impl FnMut() -> tgate::Result<Option<(EnqueuedStep, Tensor<4>)>>,
    preview: bool,
    on_step: &Function,
    reports: &mut Vec<StepReport>,
) -> Result<(), JsValue> {
    loop {
        let started = Instant::now();
        // Counts the step's launches, up to its readback (the fused kernels run there).
        let counter = LaunchCounter::start(Timing::Off);
        let Some((enqueued, latents)) = step().map_err(to_js)? else {
            return Ok(());
        };
        let dims = latents.dims();
        let preview = if preview {
            let values = read_back(latents).await?;
            Some(preview_rgba(&values, dims, sd))
        } else {
            // Wait for the step without blocking the worker: read one value back.
            read_back(latents.slice([0..1, 0..1, 0..1, 0..1])).await?;
            None
        };
        let info = enqueued.finish(started.elapsed().as_secs_f64());
        let report = StepReport::new(stage, &info, &counter.finish());
        let js = serde_wasm_bindgen::to_value(&report)?;
        if let Some((rgba, w, h)) = preview {
            let p = js_sys::Object::new();
            js_sys::Reflect::set(
                &p,
                &"rgba".into(),
                &js_sys::Uint8ClampedArray::from(&rgba[..]).into(),
            )?;
            js_sys::Reflect::set(&p, &"width".into(), &w.into())?;
            js_sys::Reflect::set(&p, &"height".into(), &h.into())?;
            js_sys::Reflect::set(&js, &"preview".into(), &p)?;
        }
        let go = on_step.call1(&JsValue::NULL, &js)?;
        reports.push(report);
        if go == JsValue::FALSE {
            return Err(js_error("cancelled", "cancelled"));
        }
    }
}

enum Model {
    Sd(Rc<StableDiffusion>),
    Wuerstchen(Rc<Wuerstchen>),
}

/// A WebGPU device and the loaded model.
#[wasm_bindgen]
pub struct Engine {
    device: Device,
    model: Option<Model>,
}

#[wasm_bindgen]
impl Engine {
    /// Initialises burn's WebGPU device (asynchronously, as browsers require). cubecl asks for
    /// the adapter's own limits, so bindings up to its `maxStorageBufferBindingSize` are allowed.
    pub async fn create() -> Result<Engine, JsValue> {
        let device = Device::wgpu_options()
            .init_async()
            .await
            .map_err(|e| js_error("webgpu_unsupported", format!("{e:?}")))?;
        Ok(Engine {
            device,
            model: None,
        })
    }

    /// Loads a diffusers folder: `kind` is `sd` or `wuerstchen`; `files` maps paths of the
    /// diffusers layout (`unet/config.json`, ...) to bytes. For Würstchen, `files` is either a
    /// combined folder (`prior_*` subfolders) or the decoder pipeline, and then `prior_files`
    /// is the prior pipeline. Values are `Blob`s (read tensor by tensor) or `Uint8Array`s; weight
    /// files are removed from the maps as they are opened. `on_progress(read, total)` follows
    /// the weight bytes read. `max_tensor_bytes` (the adapter's `maxStorageBufferBindingSize`,
    /// or less) refuses, before reading it, any tensor bigger than one binding. `dtype`: `auto`
    /// (the default: f16 when the device has `shader-f16`, else f32), `f16` or `f32`. Resolves
    /// to `{ kind, width, height, weightBytes, largestReadBytes, dtype }` (the model's default
    /// image size; the largest single read shows that no file was read whole) and `files`: per
    /// model part, `{ part, files, bytes, reason }` (which weight files, and why that variant).
    /// `variant`: `auto`, `fp32`, `fp16` or `bf16` (which weight files to prefer).
    pub fn load(
        &mut self,
        kind: &str,
        files: Map,
        prior_files: Option<Map>,
        on_progress: Option<Function>,
        max_tensor_bytes: Option<f64>,
        dtype: Option<String>,
        variant: Option<String>,
    ) -> Result<JsValue, JsValue> {
        let variant = Variant::parse(variant.as_deref().unwrap_or("auto")).map_err(to_js)?;
        let dtype = match dtype.as_deref().unwrap_or("auto") {
            "auto" if self.device.supports_dtype(DType::F16) => DType::F16,
            "auto" | "f32" => DType::F32,
            // Refused here, before the loaded model is dropped.
            "f16" => {
                tgate::loader::check_dtype(DType::F16, &self.device).map_err(to_js)?;
                DType::F16
            }
            other => {
                return Err(js_error(
                    "invalid_parameter",
                    format!("dtype must be 'auto', 'f16' or 'f32', got '{other}'"),
                ))
            }
        };
        let max_tensor_bytes = match max_tensor_bytes {
            Some(m) if !(m >= 1.0) => {
                return Err(js_error(
                    "invalid_parameter",
                    format!("maxTensorBytes must be a positive number of bytes, got {m}"),
                ))
            }
            Some(m) => Some(m.min(u64::MAX as f64) as u64),
            None => None,
        };
        let stats = Rc::new(ReadStats {
            total: JsSource::weight_bytes(&files)
                + prior_files.as_ref().map_or(0.0, JsSource::weight_bytes),
            read: Cell::new(0.0),
            largest: Cell::new(0.0),
            on_progress,
        });
        let src = JsSource::new(files, "model files", stats.clone(), max_tensor_bytes)?;
        let prior = prior_files
            .map(|m| JsSource::new(m, "prior files", stats.clone(), max_tensor_bytes))
            .transpose()?;
        self.model = None;
        let (model, size) = match kind {
            "sd" => {
                if prior.is_some() {
                    return Err(js_error(
                        "invalid_parameter",
                        "a prior only goes with kind 'wuerstchen'",
                    ));
                }
                let sd =
                    StableDiffusion::load_as(&src, variant, dtype, &self.device).map_err(to_js)?;
                let size = sd.default_size();
                (Model::Sd(Rc::new(sd)), (size, size))
            }
            "wuerstchen" => {
                let w = Wuerstchen::load_as(
                    &src,
                    prior.as_ref().map(|p| p as &dyn ModelSource),
                    variant,
                    dtype,
                    &self.device,
                )
                .map_err(to_js)?;
                (Model::Wuerstchen(Rc::new(w)), (512, 512))
            }
            other => {
                return Err(js_error(
                    "invalid_parameter",
                    format!("kind must be 'sd' or 'wuerstchen', got '{other}'"),
                ))
            }
        };
        let loaded = match &model {
            Model::Sd(sd) => &sd.loaded,
            Model::Wuerstchen(w) => &w.loaded,
        };
        let files = js_sys::Array::new();
        for l in loaded {
            let o = js_sys::Object::new();
            js_sys::Reflect::set(&o, &"part".into(), &l.part.as_str().into())?;
            let names: js_sys::Array = l.files.iter().map(|f| JsValue::from(f.as_str())).collect();
            js_sys::Reflect::set(&o, &"files".into(), &names)?;
            js_sys::Reflect::set(&o, &"bytes".into(), &(l.bytes as f64).into())?;
            js_sys::Reflect::set(&o, &"reason".into(), &l.reason.as_str().into())?;
            files.push(&o);
        }
        self.model = Some(model);
        let out = js_sys::Object::new();
        js_sys::Reflect::set(&out, &"files".into(), &files)?;
        js_sys::Reflect::set(&out, &"kind".into(), &kind.into())?;
        js_sys::Reflect::set(&out, &"width".into(), &size.0.into())?;
        js_sys::Reflect::set(&out, &"height".into(), &size.1.into())?;
        js_sys::Reflect::set(&out, &"weightBytes".into(), &stats.total.into())?;
        let dtype_name = if dtype == DType::F16 { "f16" } else { "f32" };
        js_sys::Reflect::set(&out, &"dtype".into(), &dtype_name.into())?;
        js_sys::Reflect::set(
            &out,
            &"largestReadBytes".into(),
            &stats.largest.get().into(),
        )?;
        Ok(out.into())
    }

    /// Generates an image. `noise` is the CLI's `--noise` file (safetensors bytes); `on_step`
    /// is called after every step and returning `false` cancels. Resolves to `{ latents:
    /// { name: { data, shape } }, rgba, width, height, steps }`, the latents named as the CLI's
    /// `--save-latents` file.
    pub fn generate(
        &self,
        params: JsValue,
        noise: Option<Uint8Array>,
        on_step: Function,
    ) -> Result<js_sys::Promise, JsValue> {
        let params: Params =
            serde_wasm_bindgen::from_value(params).map_err(|e| js_error("invalid_parameter", e))?;
        let noise = noise.map(|n| n.to_vec());
        match &self.model {
            None => Err(js_error("invalid_parameter", "no model loaded")),
            Some(Model::Sd(sd)) => {
                let sd = sd.clone();
                Ok(wasm_bindgen_futures::future_to_promise(async move {
                    run_sd(&sd, params, noise, on_step).await
                }))
            }
            Some(Model::Wuerstchen(w)) => {
                let w = w.clone();
                Ok(wasm_bindgen_futures::future_to_promise(async move {
                    run_wuerstchen(&w, params, noise, on_step).await
                }))
            }
        }
    }
}

/// Parses the CLI's `--noise` file and returns the named tensors (flattened).
fn noise_tensors(bytes: Vec<u8>, names: &[&str]) -> tgate::Result<Vec<Option<Vec<f32>>>> {
    let st = SafeTensors::parse("noise", bytes)?;
    names
        .iter()
        .map(|n| {
            if st.contains(n) {
                Ok(Some(st.read_f32_any(n)?.data))
            } else {
                Ok(None)
            }
        })
        .collect()
}

fn missing_noise(name: &str) -> JsValue {
    js_error(
        "invalid_parameter",
        format!("the noise file has no tensor '{name}'"),
    )
}

async fn run_sd(
    sd: &StableDiffusion,
    params: Params,
    noise: Option<Vec<u8>>,
    on_step: Function,
) -> Result<JsValue, JsValue> {
    if params.decoder_steps.is_some() || params.decoder_guidance.is_some() {
        return Err(js_error(
            "invalid_parameter",
            "decoderSteps and decoderGuidance are Würstchen parameters",
        ));
    }
    let steps = params.steps.unwrap_or(25);
    let size = sd.default_size();
    let gate = params.gate().map(|k| GateConfig {
        gate_step: k.step.unwrap_or(GateConfig::default_gate_step(steps)),
        sp_interval: k.sp_interval.unwrap_or(1),
        fi_interval: k.fi_interval.unwrap_or(1),
        warm_up: k.warm_up.unwrap_or(0),
    });
    let noise = match noise {
        Some(bytes) => {
            let mut t = noise_tensors(bytes, &["noise", "step_noise"])
                .map_err(to_js)?
                .into_iter();
            let noise = t.next().flatten().ok_or_else(|| missing_noise("noise"))?;
            Noise::Tensors {
                noise,
                step_noise: t.next().flatten(),
            }
        }
        None => Noise::Seed(params.seed()?),
    };
    let scheduler = params
        .scheduler
        .as_deref()
        .map(str::parse::<tgate::schedulers::SchedulerKind>)
        .transpose()
        .map_err(to_js)?;
    let p = GenerateParams {
        prompt: params.prompt,
        negative_prompt: params.negative_prompt,
        steps,
        guidance: params.guidance.unwrap_or(7.5),
        scheduler,
        width: params.width.unwrap_or(size),
        height: params.height.unwrap_or(size),
        gate,
        noise,
        clip_skip: 0,
    };
    sd.validate(&p).map_err(to_js)?;
    let cond = sd.encode_prompt(&p.prompt, 0).map_err(to_js)?;
    let uncond = if p.guidance > 1.0 {
        Some(sd.encode_prompt(&p.negative_prompt, 0).map_err(to_js)?)
    } else {
        None
    };
    let mut d = Denoiser::new(&sd.unet, &sd.scheduler_config, &p, cond, uncond).map_err(to_js)?;
    let mut reports = Vec::new();
    drive_stage(
        "unet",
        true,
        || Ok(d.step()?.map(|s| (s, d.latents().clone()))),
        params.preview,
        &on_step,
        &mut reports,
    )
    .await?;
    let latents = d.latents().clone();
    let image = sd.decode(latents.clone());
    finish(vec![("latents", latents)], image, reports).await
}

async fn run_wuerstchen(
    w: &Wuerstchen,
    params: Params,
    noise: Option<Vec<u8>>,
    on_step: Function,
) -> Result<JsValue, JsValue> {
    if params.scheduler.is_some() {
        return Err(js_error(
            "invalid_parameter",
            "Würstchen has one scheduler (DDPMWuerstchenScheduler); leave scheduler out",
        ));
    }
    let noise = match noise {
        Some(bytes) => {
            let names = [
                "prior_noise",
                "prior_step_noise",
                "decoder_noise",
                "decoder_step_noise",
            ];
            let mut t = noise_tensors(bytes, &names).map_err(to_js)?.into_iter();
            let mut next = |name| t.next().flatten().ok_or_else(|| missing_noise(name));
            WuerstchenNoise::Tensors {
                prior_noise: next(names[0])?,
                prior_step_noise: next(names[1])?,
                decoder_noise: next(names[2])?,
                decoder_step_noise: next(names[3])?,
            }
        }
        None => WuerstchenNoise::Seed(params.seed()?),
    };
    let mut p = WuerstchenParams::new(params.prompt.clone(), noise);
    p.negative_prompt = params.negative_prompt.clone();
    p.width = params.width.unwrap_or(p.width);
    p.height = params.height.unwrap_or(p.height);
    p.prior_steps = params.steps.unwrap_or(p.prior_steps);
    p.prior_guidance = params.guidance.unwrap_or(p.prior_guidance);
    p.decoder_steps = params.decoder_steps.unwrap_or(p.decoder_steps);
    p.decoder_guidance = params.decoder_guidance.unwrap_or(p.decoder_guidance);
    p.gate_step = match params.gate() {
        None => None,
        Some(k) => {
            if k.sp_interval.unwrap_or(1) != 1
                || k.fi_interval.unwrap_or(1) != 1
                || k.warm_up.unwrap_or(0) != 0
            {
                return Err(js_error(
                    "invalid_parameter",
                    "the Würstchen gate takes only `step` (spInterval, fiInterval and warmUp are SD knobs)",
                ));
            }
            Some(
                k.step
                    .unwrap_or(GateConfig::default_gate_step(p.prior_step_count())),
            )
        }
    };
    let mut reports = Vec::new();
    let prior_latents = {
        let mut d = w.prior_denoiser(&p).map_err(to_js)?;
        drive_stage(
            "prior",
            false,
            || Ok(d.step()?.map(|s| (s, d.latents().clone()))),
            params.preview,
            &on_step,
            &mut reports,
        )
        .await?;
        w.finish_prior(d.latents().clone())
    };
    let decoder_latents = {
        let mut d = w
            .decoder_denoiser(prior_latents.clone(), &p)
            .map_err(to_js)?;
        drive_stage(
            "decoder",
            false,
            || Ok(d.step()?.map(|s| (s, d.latents().clone()))),
            params.preview,
            &on_step,
            &mut reports,
        )
        .await?;
        d.latents().clone()
    };
    let image = w.decode(decoder_latents.clone());
    finish(
        vec![
            ("prior_latents", prior_latents),
            ("decoder_latents", decoder_latents),
        ],
        image,
        reports,
    )
    .await
}

/// Reads the latents and the image `[1, 3, H, W]` in `[0, 1]` back and builds the result.
async fn finish(
    latents: Vec<(&str, Tensor<4>)>,
    image: Tensor<4>,
    reports: Vec<StepReport>,
) -> Result<JsValue, JsValue> {
    let named = js_sys::Object::new();
    for (name, t) in latents {
        let shape = t.dims();
        let values = read_back(t).await?;
        let entry = js_sys::Object::new();
        js_sys::Reflect::set(
            &entry,
            &"data".into(),
            &js_sys::Float32Array::from(&values[..]).into(),
        )?;
        js_sys::Reflect::set(
            &entry,
            &"shape".into(),
            &serde_wasm_bindgen::to_value(&shape.to_vec())?,
        )?;
        js_sys::Reflect::set(&named, &name.into(), &entry)?;
    }
    let [_, _, h, w] = image.dims();
    let pixels = read_back(image).await?;
    let mut rgba = vec![255u8; h * w * 4];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = pixels[c * h * w + y * w + x];
                rgba[(y * w + x) * 4 + c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    let out = js_sys::Object::new();
    let set = |k: &str, v: JsValue| js_sys::Reflect::set(&out, &k.into(), &v);
    set("latents", named.into())?;
    set("rgba", js_sys::Uint8ClampedArray::from(&rgba[..]).into())?;
    set("width", w.into())?;
    set("height", h.into())?;
    set("steps", serde_wasm_bindgen::to_value(&reports)?)?;
    Ok(out.into())
}
