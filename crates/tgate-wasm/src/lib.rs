//! Browser bindings of the model crate on burn-wgpu's WebGPU path (wasm-bindgen).
//!
//! Meant to run inside a Web Worker (see `web/src/worker.js`). A thin adapter over the model
//! crate's request → result API ([`tgate::text_to_image`]): [`source`] hands the page's files to
//! the loader, [`params`] turns the JS parameters into a request, [`drive`] awaits every piece of
//! work without blocking the worker, and [`errors`] gives every failure its error code. A Rust
//! panic traps the module; its message stays readable through [`errors::last_panic`] so the
//! worker can report it before it is replaced.

mod drive;
mod errors;
mod params;
mod source;

use std::cell::Cell;
use std::rc::Rc;

use burn::tensor::{DType, Device};
use js_sys::{Function, Map, Promise, Uint8Array};
use tgate::loader::{ModelSource, Variant};
use tgate::profile::{LaunchCounter, Timing};
use tgate::stage::Readback;
use tgate::text_to_image::{ModelKind, Pipeline};
use wasm_bindgen::prelude::*;

use crate::errors::{js_error, readback_error, to_js};
use crate::params::Params;
use crate::source::{JsSource, Limits, ReadStats};

/// An optional positive byte count from JS.
fn byte_count(name: &str, value: Option<f64>) -> Result<Option<u64>, JsValue> {
    match value {
        Some(m) if !(m >= 1.0) => Err(js_error(
            "invalid_parameter",
            format!("{name} must be a positive number of bytes, got {m}"),
        )),
        Some(m) => Ok(Some(m.min(u64::MAX as f64) as u64)),
        None => Ok(None),
    }
}

pub use crate::errors::last_panic;

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

/// Records panics (the worker turns the resulting trap into a typed error) and forwards log
/// errors to the console. The browser build has no kernel autotuning (burn's `autotune` feature
/// is off: tuning compiles and times every candidate in a fresh worker, minutes on first use), so
/// cubecl picks matmul, convolution and reduction kernels by rule; the level below only matters
/// to a build that turns tuning back on.
#[wasm_bindgen(start)]
pub fn start() {
    run_constructors_once();
    errors::record_panics();
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    use cubecl_environment::config::RuntimeConfig;
    let mut config = cubecl_runtime::config::CubeClRuntimeConfig::default();
    config.autotune.level = cubecl_runtime::config::autotune::AutotuneLevel::Minimal;
    cubecl_runtime::config::CubeClRuntimeConfig::try_set(config);
}

extern "C" {
    /// wasm-ld's function running the module's static constructors (cubecl's IR dialects
    /// register themselves with `inventory` from constructors).
    fn __wasm_call_ctors();
}

/// Runs the static constructors, once. Without an explicit call, wasm-ld treats the module as a
/// command and wraps *every* export in a call of all constructors: every crossing from JS into
/// wasm (each WebGPU object handed back, each callback, each Blob read) re-registered cubecl's
/// dialects, 31 of the worker's 35 busy seconds of a first image on the demo page. Calling it
/// here, from the start function wasm-bindgen runs right after instantiation and before any
/// other Rust code, makes wasm-ld leave the exports unwrapped.
fn run_constructors_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: runs once (`start` is exported too), first, on the module's only thread; the
    // constructors only fill registries that nothing has read yet.
    ONCE.call_once(|| unsafe { __wasm_call_ctors() });
}

/// A WebGPU device and the loaded model.
#[wasm_bindgen]
pub struct Engine {
    device: Device,
    model: Option<Rc<Pipeline>>,
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
    /// `max_memory_bytes`: the memory a generation may use at once (the worker passes the
    /// caller's `maxMemoryBytes`, else `navigator.deviceMemory`); sizes that cannot fit are
    /// refused with `out_of_memory` before any work.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        &mut self,
        kind: &str,
        files: Map,
        prior_files: Option<Map>,
        on_progress: Option<Function>,
        max_tensor_bytes: Option<f64>,
        dtype: Option<String>,
        variant: Option<String>,
        max_memory_bytes: Option<f64>,
    ) -> Result<JsValue, JsValue> {
        let variant = Variant::parse(variant.as_deref().unwrap_or("auto")).map_err(to_js)?;
        let dtype = self.dtype(dtype.as_deref())?;
        let limits = Limits {
            tensor: byte_count("maxTensorBytes", max_tensor_bytes)?,
            memory: byte_count("maxMemoryBytes", max_memory_bytes)?,
        };
        let stats = Rc::new(ReadStats {
            total: JsSource::weight_bytes(&files)
                + prior_files.as_ref().map_or(0.0, JsSource::weight_bytes),
            read: Cell::new(0.0),
            largest: Cell::new(0.0),
            on_progress,
        });
        let src = JsSource::new(files, "model files", stats.clone(), limits)?;
        let prior = prior_files
            .map(|m| JsSource::new(m, "prior files", stats.clone(), limits))
            .transpose()?;
        let kind = ModelKind::parse(kind).map_err(to_js)?;
        // The previous model is dropped before the new one takes device memory.
        self.model = None;
        let model = Pipeline::load(
            &src,
            prior.as_ref().map(|p| p as &dyn ModelSource),
            Some(kind),
            variant,
            dtype,
            &self.device,
        )
        .map_err(to_js)?;
        let size = model.default_size();
        let files = js_sys::Array::new();
        for l in model.loaded() {
            let o = js_sys::Object::new();
            js_sys::Reflect::set(&o, &"part".into(), &l.part.as_str().into())?;
            let names: js_sys::Array = l.files.iter().map(|f| JsValue::from(f.as_str())).collect();
            js_sys::Reflect::set(&o, &"files".into(), &names)?;
            js_sys::Reflect::set(&o, &"bytes".into(), &(l.bytes as f64).into())?;
            js_sys::Reflect::set(&o, &"reason".into(), &l.reason.as_str().into())?;
            files.push(&o);
        }
        self.model = Some(Rc::new(model));
        let out = js_sys::Object::new();
        js_sys::Reflect::set(&out, &"files".into(), &files)?;
        js_sys::Reflect::set(&out, &"kind".into(), &kind.name().into())?;
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

    /// Compiles the kernels of a generation before the weights arrive. `files` (and
    /// `prior_files`) hold the folder's configs and tokenizer; no weight file is read: the model
    /// is built with zero placeholder weights on the device, and a short gated generation at
    /// `width`×`height` (default: the model's own size) — planning steps, the gate step, gated
    /// steps, the decoder — is enqueued at once. The placeholders are dropped as soon as it is
    /// enqueued. Resolves to `{ ms, launches, kernels }` once the device has run it (the worker
    /// waits for that before it uploads the real weights, so both never take memory at once).
    /// The limits are those of [`Engine::load`]: a size the real model would refuse is refused.
    #[allow(clippy::too_many_arguments)]
    pub fn precompile(
        &self,
        kind: &str,
        files: Map,
        prior_files: Option<Map>,
        dtype: Option<String>,
        width: Option<f64>,
        height: Option<f64>,
        max_tensor_bytes: Option<f64>,
        max_memory_bytes: Option<f64>,
    ) -> Result<Promise, JsValue> {
        let started = web_time::Instant::now();
        let dtype = self.dtype(dtype.as_deref())?;
        let kind = ModelKind::parse(kind).map_err(to_js)?;
        let size = |name: &str, v: Option<f64>| match v {
            Some(v) if !(v >= 1.0 && v.fract() == 0.0 && v <= 65536.0) => Err(js_error(
                "invalid_parameter",
                format!("{name} must be a positive whole number of pixels, got {v}"),
            )),
            v => Ok(v.map(|v| v as usize)),
        };
        let (width, height) = (size("width", width)?, size("height", height)?);
        let limits = Limits {
            tensor: byte_count("maxTensorBytes", max_tensor_bytes)?,
            memory: byte_count("maxMemoryBytes", max_memory_bytes)?,
        };
        let stats = Rc::new(ReadStats {
            total: 0.0,
            read: Cell::new(0.0),
            largest: Cell::new(0.0),
            on_progress: None,
        });
        let src = JsSource::new(files, "model files", stats.clone(), limits)?;
        let prior = prior_files
            .map(|m| JsSource::new(m, "prior files", stats, limits))
            .transpose()?;
        let counter = LaunchCounter::start(Timing::Off);
        let probe = {
            let model = Pipeline::placeholder(
                &src,
                prior.as_ref().map(|p| p as &dyn ModelSource),
                Some(kind),
                dtype,
                &self.device,
            )
            .map_err(to_js)?;
            let plan = model
                .plan(&model.warm_up_request(width, height))
                .map_err(to_js)?;
            let mut generation = model.start(plan);
            generation.enqueue_all().map_err(to_js)?
        };
        let launches = counter.finish();
        let read = probe.map(Readback::issue);
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            if let Some(read) = read {
                read.data().await.map_err(readback_error)?;
            }
            let out = js_sys::Object::new();
            let ms = started.elapsed().as_secs_f64() * 1e3;
            js_sys::Reflect::set(&out, &"ms".into(), &ms.into())?;
            js_sys::Reflect::set(&out, &"launches".into(), &launches.total().into())?;
            js_sys::Reflect::set(&out, &"kernels".into(), &launches.distinct.into())?;
            Ok(out.into())
        }))
    }

    /// The compute dtype a load asks for: `auto` (f16 where the device has it), `f16`, `f32`.
    fn dtype(&self, name: Option<&str>) -> Result<DType, JsValue> {
        match name.unwrap_or("auto") {
            "auto" if self.device.supports_dtype(DType::F16) => Ok(DType::F16),
            "auto" | "f32" => Ok(DType::F32),
            // Refused here, before the loaded model is dropped.
            "f16" => {
                tgate::loader::check_dtype(DType::F16, &self.device).map_err(to_js)?;
                Ok(DType::F16)
            }
            other => Err(js_error(
                "invalid_parameter",
                format!("dtype must be 'auto', 'f16' or 'f32', got '{other}'"),
            )),
        }
    }

    /// Generates an image. `noise` is the CLI's `--noise` file (safetensors bytes); `on_step`
    /// is called after every step and returning `false` cancels; `cancel`, a promise the caller
    /// resolves to cancel, is also answered while the device is busy (text encoding, the first
    /// step's kernel compilation, the decoder). Resolves to `{ latents: { name: { data, shape }
    /// }, rgba, width, height, steps }`, the latents named as the CLI's `--save-latents` file.
    pub fn generate(
        &self,
        params: JsValue,
        noise: Option<Uint8Array>,
        on_step: Function,
        cancel: Option<Promise>,
    ) -> Result<Promise, JsValue> {
        let params = Params::from_js(params)?;
        let request = params.request(noise.map(|n| n.to_vec()))?;
        let Some(model) = self.model.clone() else {
            return Err(js_error("invalid_parameter", "no model loaded"));
        };
        let control = drive::Control {
            on_step,
            cancel,
            preview: params.preview,
        };
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            drive::run(&model, request, control).await
        }))
    }
}
