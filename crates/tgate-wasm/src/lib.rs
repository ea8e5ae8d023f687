//! Browser bindings of the model crate on burn-wgpu's WebGPU path (wasm-bindgen).
//!
//! Meant to run inside a Web Worker (see `web/src/worker.js`). Every step is enqueued with the
//! model crate's step-wise API and then awaited with a one-value asynchronous readback, so the
//! worker never blocks and step times are real. Errors are thrown as JS `Error`s whose `name` is
//! one of the package's error codes (`webgpu_unsupported`, `device_lost`, `bad_weights`,
//! `invalid_parameter`, `cancelled`).

use std::rc::Rc;

use burn::tensor::{Device, Tensor};
use js_sys::{Function, Map, Uint8Array};
use serde::{Deserialize, Serialize};
use tgate::loader::{MemorySource, Variant};
use tgate::pipeline::{Denoiser, GenerateParams, Noise, StableDiffusion, StepInfo};
use tgate::safetensors::SafeTensors;
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
        InvalidParameter { .. } | Input { .. } => "invalid_parameter",
        Device(_) => "device_lost",
        Cancelled => "cancelled",
    }
}

fn to_js(e: tgate::Error) -> JsValue {
    js_error(code(&e), e)
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

/// Sends Rust panics and log errors to the console (the worker turns the resulting trap into an
/// error message), and keeps kernel autotuning short: every candidate is compiled in the
/// browser, which is slow on first use.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&format!("tgate panicked: {info}").into());
    }));
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    use cubecl_environment::config::RuntimeConfig;
    let mut config = cubecl_runtime::config::CubeClRuntimeConfig::default();
    config.autotune.level = cubecl_runtime::config::autotune::AutotuneLevel::Minimal;
    cubecl_runtime::config::CubeClRuntimeConfig::try_set(config);
}

/// Generation parameters, as the JS API names them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    steps: Option<usize>,
    guidance: Option<f64>,
    scheduler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    seed: Option<f64>,
    /// `false` (no gate) or the knobs; absent: the default gate.
    gate: Option<GateParam>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum GateParam {
    Enabled(bool),
    Knobs(GateKnobs),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GateKnobs {
    step: Option<usize>,
    sp_interval: Option<usize>,
    fi_interval: Option<usize>,
    warm_up: Option<usize>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StepReport {
    step: usize,
    total: usize,
    timestep: f64,
    phase: &'static str,
    ms: f64,
}

impl From<&StepInfo> for StepReport {
    fn from(s: &StepInfo) -> Self {
        StepReport {
            step: s.index,
            total: s.total,
            timestep: s.timestep,
            phase: s.phase.name(),
            ms: s.seconds * 1e3,
        }
    }
}

/// Reads the CLI's `--noise` file format (`noise`, optional `step_noise`).
fn read_noise(bytes: Vec<u8>) -> Result<Noise, tgate::Error> {
    let st = SafeTensors::parse("noise", bytes)?;
    let noise = st.read_f32_any("noise")?.data;
    let step_noise = if st.contains("step_noise") {
        Some(st.read_f32_any("step_noise")?.data)
    } else {
        None
    };
    Ok(Noise::Tensors { noise, step_noise })
}

async fn read_back(t: Tensor<4>) -> Result<Vec<f32>, JsValue> {
    t.into_data_async()
        .await
        .map_err(|e| js_error("device_lost", format!("{e:?}")))?
        .try_to_vec::<f32>()
        .map_err(|e| js_error("device_lost", format!("{e:?}")))
}

/// A WebGPU device and the loaded model.
#[wasm_bindgen]
pub struct Engine {
    device: Device,
    sd: Option<Rc<StableDiffusion>>,
}

#[wasm_bindgen]
impl Engine {
    /// Initialises burn's WebGPU device (asynchronously, as browsers require).
    pub async fn create() -> Result<Engine, JsValue> {
        let device = Device::wgpu_options()
            .init_async()
            .await
            .map_err(|e| js_error("webgpu_unsupported", format!("{e:?}")))?;
        Ok(Engine { device, sd: None })
    }

    /// Loads a Stable Diffusion folder from `files` (`Map<path, Uint8Array>`, paths as in the
    /// diffusers layout, e.g. `unet/config.json`). The bytes are copied into wasm memory one
    /// component at a time by the loader and dropped after upload.
    #[wasm_bindgen(js_name = loadStableDiffusion)]
    pub fn load_stable_diffusion(&mut self, files: &Map) -> Result<(), JsValue> {
        let mut src = MemorySource::default();
        let mut bad = None;
        files.for_each(
            &mut |value, key| match (key.as_string(), value.dyn_into::<Uint8Array>()) {
                (Some(k), Ok(bytes)) => {
                    src.files.insert(k, bytes.to_vec());
                }
                _ => bad = Some("files must map path strings to Uint8Array"),
            },
        );
        if let Some(msg) = bad {
            return Err(js_error("invalid_parameter", msg));
        }
        self.sd = None;
        let sd = StableDiffusion::load(&src, Variant::Auto, &self.device).map_err(to_js)?;
        self.sd = Some(Rc::new(sd));
        Ok(())
    }

    /// Generates an image. `on_step(report)` is called after every step; returning `false`
    /// cancels. Resolves to `{ latents, latentsShape, rgba, width, height, steps }`.
    pub fn generate(
        &self,
        params: JsValue,
        noise: Option<Uint8Array>,
        on_step: Function,
    ) -> Result<js_sys::Promise, JsValue> {
        let sd = self
            .sd
            .clone()
            .ok_or_else(|| js_error("invalid_parameter", "no model loaded"))?;
        let params: Params =
            serde_wasm_bindgen::from_value(params).map_err(|e| js_error("invalid_parameter", e))?;
        let noise = noise.map(|n| n.to_vec());
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            run(&sd, params, noise, on_step).await
        }))
    }
}

async fn run(
    sd: &StableDiffusion,
    params: Params,
    noise: Option<Vec<u8>>,
    on_step: Function,
) -> Result<JsValue, JsValue> {
    let steps = params.steps.unwrap_or(25);
    let size = sd.default_size();
    let gate = match params.gate {
        Some(GateParam::Enabled(false)) => None,
        Some(GateParam::Enabled(true)) | None => {
            Some(GateConfig::original(GateConfig::default_gate_step(steps)))
        }
        Some(GateParam::Knobs(k)) => Some(GateConfig {
            gate_step: k.step.unwrap_or(GateConfig::default_gate_step(steps)),
            sp_interval: k.sp_interval.unwrap_or(1),
            fi_interval: k.fi_interval.unwrap_or(1),
            warm_up: k.warm_up.unwrap_or(0),
        }),
    };
    let noise = match (noise, params.seed) {
        (Some(bytes), _) => read_noise(bytes).map_err(to_js)?,
        (None, Some(seed)) if seed >= 0.0 && seed.fract() == 0.0 => Noise::Seed(seed as u64),
        (None, Some(seed)) => {
            return Err(js_error(
                "invalid_parameter",
                format!("seed must be a non-negative integer, got {seed}"),
            ))
        }
        (None, None) => Noise::Seed((js_sys::Math::random() * 1e9) as u64),
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
    loop {
        let started = Instant::now();
        let Some(step) = d.step().map_err(to_js)? else {
            break;
        };
        // Wait for the step without blocking the worker: read one value back.
        read_back(d.latents().clone().slice([0..1, 0..1, 0..1, 0..1])).await?;
        let info = step.finish(started.elapsed().as_secs_f64());
        let report = serde_wasm_bindgen::to_value(&StepReport::from(&info))?;
        let go = on_step.call1(&JsValue::NULL, &report)?;
        reports.push(StepReport::from(&info));
        if go == JsValue::FALSE {
            return Err(js_error("cancelled", "cancelled"));
        }
    }
    let latents = d.latents().clone();
    let shape = latents.dims();
    let latent_values = read_back(latents.clone()).await?;
    let image = sd.decode(latents);
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
    set(
        "latents",
        js_sys::Float32Array::from(&latent_values[..]).into(),
    )?;
    set(
        "latentsShape",
        serde_wasm_bindgen::to_value(&shape.to_vec())?,
    )?;
    set("rgba", js_sys::Uint8ClampedArray::from(&rgba[..]).into())?;
    set("width", w.into())?;
    set("height", h.into())?;
    set("steps", serde_wasm_bindgen::to_value(&reports)?)?;
    Ok(out.into())
}
