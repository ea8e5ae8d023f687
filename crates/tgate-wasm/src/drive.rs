//! Driving a generation from the worker: every piece of work (text encoding, each step, the
//! decoder) is enqueued with the model crate's [`Generation::advance`], one piece ahead of the
//! one awaited, and awaited with a one-value asynchronous readback raced against the caller's
//! cancel promise, so the worker never blocks, the device never waits for the worker, and a
//! cancel is answered while the device is still busy (compiling the first step's kernels, say);
//! the enqueued work then finishes unobserved.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use burn::tensor::Tensor;
use js_sys::{Function, Promise};
use serde::Serialize;
use tgate::profile::{LaunchCounter, Launches, Timing};
use tgate::stage::{Readback, StepInfo};
use tgate::text_to_image::{
    interleave, Generation, ModelKind, NoiseSource, Output, Pipeline, Request, Work,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_time::Instant;

use crate::errors::{js_error, readback_error, to_js};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StepReport {
    /// `unet` (SD), `prior` or `decoder` (Würstchen).
    stage: &'static str,
    step: usize,
    total: usize,
    timestep: f64,
    phase: &'static str,
    /// DeepCache ran only its shallow branch.
    shallow: bool,
    ms: f64,
    /// GPU kernels the step launched, and how many distinct compiled kernels that was.
    launches: usize,
    kernels: usize,
    /// Worker time spent enqueuing the step (building the fused kernels, launching them, queueing
    /// its readback): what the device would idle per step if the worker waited after each one.
    enqueue_ms: f64,
}

impl StepReport {
    fn new(s: &StepInfo, launches: &Launches, enqueue_ms: f64) -> Self {
        StepReport {
            stage: s.stage,
            step: s.index,
            total: s.total,
            timestep: s.timestep,
            phase: s.phase.name(),
            shallow: s.shallow,
            ms: s.seconds * 1e3,
            launches: launches.total(),
            kernels: launches.distinct,
            enqueue_ms,
        }
    }
}

async fn read_back<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, JsValue> {
    read_values(Readback::issue(t)).await
}

async fn read_values(read: Readback) -> Result<Vec<f32>, JsValue> {
    let data = read.data().await.map_err(readback_error)?;
    data.try_to_vec::<f32>()
        .map_err(|e| js_error("internal", format!("reading a result back failed: {e:?}")))
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

/// How the caller stops a generation: `on_step` returning `false`, or `cancel` (a promise the
/// worker resolves when a cancel request arrives) settling.
pub struct Control {
    pub on_step: Function,
    pub cancel: Option<Promise>,
    pub preview: bool,
}

fn cancelled() -> JsValue {
    js_error("cancelled", "cancelled")
}

/// Awaits `fut`, or fails with `cancelled` as soon as the cancel promise settles. A readback
/// that lost the race is not dropped (cubecl would hand its staging buffer, still being mapped,
/// to the next readback): it finishes in the background, unobserved.
async fn or_cancel<T: 'static>(
    fut: impl Future<Output = Result<T, JsValue>> + 'static,
    cancel: &Option<Promise>,
) -> Result<T, JsValue> {
    let Some(cancel) = cancel else {
        return fut.await;
    };
    let mut fut = Box::pin(fut);
    let mut stop = pin!(JsFuture::from(cancel.clone()));
    let won = std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    match won {
        Some(out) => out,
        None => {
            wasm_bindgen_futures::spawn_local(async move {
                let _ = fut.await;
            });
            Err(cancelled())
        }
    }
}

/// A piece of work whose readback is queued but not yet awaited.
struct InFlight {
    work: Work,
    read: Readback,
    /// The latents' shape when the readback is a preview of the whole latents.
    preview: Option<[usize; 4]>,
    launches: Launches,
    enqueue_ms: f64,
}

impl InFlight {
    /// Whether this is the last step of its stage.
    fn ends_stage(&self) -> bool {
        matches!(&self.work, Work::Step(s) if s.index + 1 == s.total)
    }
}

/// Lets readbacks still in flight finish in the background (a staging buffer being mapped must
/// not be handed to the next readback).
fn detach(read: Readback) {
    wasm_bindgen_futures::spawn_local(async move {
        let _ = read.data().await;
    });
}

/// Runs a request to its result: `{ latents: { name: { data, shape } }, rgba, width, height,
/// steps }`, the latents named as the CLI's `--save-latents` file.
///
/// One piece of work is enqueued ahead of the one awaited: piece `i + 1` is enqueued (and its
/// readback queued) before piece `i`'s readback is awaited, so the device never idles while the
/// worker prepares a step; only a stage's last step is awaited before the next piece. A step's time is the interval between the completions of the piece
/// before it and of itself; its launches are those of its own enqueueing.
pub async fn run(
    pipeline: &Pipeline,
    request: Request,
    control: Control,
) -> Result<JsValue, JsValue> {
    let plan = pipeline.plan(&request).map_err(to_js)?;
    let seed = match request.noise {
        NoiseSource::Seed(s) => Some(s),
        NoiseSource::File { .. } => None,
    };
    let sd = pipeline.kind() == ModelKind::StableDiffusion;
    let mut generation = pipeline.start(plan);
    let mut reports = Vec::new();
    let mut in_flight: Option<InFlight> = None;
    let mut last_done = Instant::now();
    loop {
        // After a stage's last step comes new work (the decoder, Würstchen's next stage) whose
        // kernels the worker may spend seconds building: the last step is awaited first, so its
        // time is its own and not that compilation's.
        let ends_stage = in_flight.as_ref().is_some_and(InFlight::ends_stage);
        let next = if ends_stage {
            Ok(None)
        } else {
            enqueue(&mut generation, control.preview)
        };
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                if let Some(p) = in_flight {
                    detach(p.read);
                }
                return Err(e);
            }
        };
        let Some(done) = in_flight.take() else {
            match next {
                Some(next) => {
                    in_flight = Some(next);
                    continue;
                }
                None => break,
            }
        };
        let values = match or_cancel(read_values(done.read), &control.cancel).await {
            Ok(values) => values,
            Err(e) => {
                if let Some(n) = next {
                    detach(n.read);
                }
                return Err(e);
            }
        };
        let now = Instant::now();
        let seconds = now.duration_since(last_done).as_secs_f64();
        last_done = now;
        in_flight = next;
        let Work::Step(step) = done.work else {
            continue;
        };
        let preview = done.preview.map(|dims| preview_rgba(&values, dims, sd));
        let info = generation.record(step, seconds);
        let report = StepReport::new(&info, &done.launches, done.enqueue_ms);
        let go_on = report_step(&report, preview, &control.on_step);
        if !matches!(go_on, Ok(true)) {
            if let Some(n) = in_flight {
                detach(n.read);
            }
            return Err(go_on.err().unwrap_or_else(cancelled));
        }
        reports.push(report);
    }
    finish(generation, reports, seed, &control.cancel).await
}

/// Enqueues the next piece of work and queues its readback (the whole latents for a step's
/// preview, else one value); `None` when the image is enqueued.
fn enqueue(generation: &mut Generation<'_>, preview: bool) -> Result<Option<InFlight>, JsValue> {
    // Counts the piece's launches, up to its queued readback (the fused kernels run there).
    let started = Instant::now();
    let counter = LaunchCounter::start(Timing::Off);
    let Some(advance) = generation.advance().map_err(to_js)? else {
        return Ok(None);
    };
    let latents = match advance.work {
        Work::Step(_) if preview => generation.latents().cloned(),
        _ => None,
    };
    let (read, preview) = match latents {
        Some(latents) => {
            let dims = latents.dims();
            (Readback::issue(latents), Some(dims))
        }
        None => (Readback::issue(advance.probe), None),
    };
    Ok(Some(InFlight {
        work: advance.work,
        read,
        preview,
        launches: counter.finish(),
        enqueue_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Sends a step report (with its preview) to `on_step`; `false` when the caller cancels.
fn report_step(
    report: &StepReport,
    preview: Option<(Vec<u8>, usize, usize)>,
    on_step: &Function,
) -> Result<bool, JsValue> {
    let js = serde_wasm_bindgen::to_value(report)?;
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
    Ok(on_step.call1(&JsValue::NULL, &js)? != JsValue::FALSE)
}

/// Reads the latents and the image back and builds the result; `finite` says whether every
/// latent value is finite (an f16 overflow makes NaNs and a black image: the page then
/// generates again in f32 with the same `seed`).
async fn finish(
    generation: Generation<'_>,
    reports: Vec<StepReport>,
    seed: Option<u64>,
    cancel: &Option<Promise>,
) -> Result<JsValue, JsValue> {
    let Output { latents, image, .. } = generation.finish().map_err(to_js)?;
    let named = js_sys::Object::new();
    let mut finite = true;
    for (name, t) in latents {
        let shape = t.dims();
        let values = or_cancel(read_back(t), cancel).await?;
        finite &= values.iter().all(|v| v.is_finite());
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
    let pixels = or_cancel(read_back(image), cancel).await?;
    let rgba = interleave(&pixels, h, w, true);
    let out = js_sys::Object::new();
    let set = |k: &str, v: JsValue| js_sys::Reflect::set(&out, &k.into(), &v);
    set("latents", named.into())?;
    set("rgba", js_sys::Uint8ClampedArray::from(&rgba[..]).into())?;
    set("width", w.into())?;
    set("height", h.into())?;
    set("steps", serde_wasm_bindgen::to_value(&reports)?)?;
    set("finite", finite.into())?;
    set("seed", seed.map_or(JsValue::NULL, |s| (s as f64).into()))?;
    Ok(out.into())
}
