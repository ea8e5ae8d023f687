//! One denoising loop as a state machine, shared by every model family.
//!
//! diffusers writes each loop inline in a pipeline's `__call__` (`for i, t in enumerate(timesteps)`);
//! here a loop is a [`Stage`]: [`Stage::step`] enqueues one iteration on the device *without
//! waiting for it*, so the caller decides how to wait (blocking natively with [`drive`], an
//! awaited one-value readback in a browser) and when to stop. Stable Diffusion's UNet loop
//! ([`crate::pipeline::Denoiser`]) and Würstchen's Stage C and Stage B loops
//! ([`crate::pipeline_wuerstchen::StageDenoiser`]) implement it; [`crate::text_to_image`]
//! sequences them.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use burn::tensor::{Device, ExecutionError, Tensor, TensorData};
use web_time::Instant;

use crate::error::{Error, Result};
use crate::tgate::Phase;

/// One denoising loop.
pub trait Stage {
    /// The loop's name in reports: `unet` (Stable Diffusion), `prior` or `decoder` (Würstchen).
    fn name(&self) -> &'static str;
    /// Number of iterations.
    fn total(&self) -> usize;
    /// The current latents (after the last enqueued iteration).
    fn latents(&self) -> &Tensor<4>;
    /// Enqueues the next iteration; `None` when all are done. Nothing here waits for the
    /// device or reads values back.
    fn step(&mut self) -> Result<Option<EnqueuedStep>>;
}

/// One enqueued iteration: what [`StepInfo`] needs besides the time.
#[derive(Clone, Copy, Debug)]
pub struct EnqueuedStep {
    /// The [`Stage::name`] of the loop.
    pub stage: &'static str,
    pub index: usize,
    pub total: usize,
    pub timestep: f64,
    pub phase: Phase,
    /// DeepCache ran only its shallow branch (the deep features came from its cache).
    pub shallow: bool,
}

impl EnqueuedStep {
    /// The step's report once the device has finished it.
    pub fn finish(self, seconds: f64) -> StepInfo {
        StepInfo {
            stage: self.stage,
            index: self.index,
            total: self.total,
            timestep: self.timestep,
            phase: self.phase,
            shallow: self.shallow,
            seconds,
        }
    }
}

/// What the progress callback sees after each iteration.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    /// The [`Stage::name`] of the loop.
    pub stage: &'static str,
    /// 0-based iteration.
    pub index: usize,
    pub total: usize,
    pub timestep: f64,
    pub phase: Phase,
    /// DeepCache ran only its shallow branch (the deep features came from its cache).
    pub shallow: bool,
    /// Wall time of the iteration in seconds (measured after the device finished it).
    pub seconds: f64,
}

/// A readback queued on the device behind the work enqueued so far, not yet awaited: the
/// browser worker's way to wait for a step while it enqueues the next one.
///
/// [`Readback::issue`] starts the read at once (the fused operations so far are launched and the
/// copy to a mappable buffer is submitted), so the caller can enqueue the next piece of work
/// before awaiting this one. In a browser the read is eager and resolves when the device has
/// finished the work before it; hand an unfinished one to the executor rather than dropping it (a
/// staging buffer still being mapped must not be reused). Natively burn's cubecl reads are lazy
/// (the copy happens when the bytes are first touched), so native loops wait with [`sync`].
pub enum Readback {
    /// The read is on its way.
    Pending(ReadFuture),
    /// The read finished when it was issued (CPU backends, lazy native reads).
    Ready(std::result::Result<TensorData, ExecutionError>),
}

type ReadFuture =
    Pin<Box<dyn Future<Output = std::result::Result<TensorData, ExecutionError>> + Send>>;

impl Readback {
    /// Queues the read of `t` behind everything enqueued so far.
    pub fn issue<const D: usize>(t: Tensor<D>) -> Self {
        let mut read: ReadFuture = Box::pin(t.into_data_async());
        // One poll runs the read up to its first real wait (the buffer mapping); the waker is
        // not needed, whoever awaits the result later polls again with its own.
        let mut cx = Context::from_waker(Waker::noop());
        match read.as_mut().poll(&mut cx) {
            Poll::Ready(out) => Readback::Ready(out),
            Poll::Pending => Readback::Pending(read),
        }
    }

    /// The values, once the device has finished the work before the read.
    pub async fn data(self) -> std::result::Result<TensorData, ExecutionError> {
        match self {
            Readback::Pending(read) => read.await,
            Readback::Ready(out) => out,
        }
    }
}

/// Natively: blocks until the device has finished everything enqueued on it.
pub fn sync(device: &Device) -> Result<()> {
    device.sync().map_err(|e| {
        Error::Device(format!(
            "the GPU work did not complete (a lost or reset device, or memory exhausted): {e}"
        ))
    })
}

/// Runs a stage to its end natively: enqueues each step, waits for the device (so step times
/// are real) and reports it; `on_step` may stop the run ([`Error::Cancelled`]).
///
/// Natively the wait costs nothing to overlap: cubecl-wgpu 0.11 itself waits for the device
/// every 64 buffer writes on native builds, so host and device run in lockstep anyway, and the
/// CPU backend computes as it enqueues. The browser worker enqueues one step ahead instead
/// (see [`Readback`]).
pub fn drive(
    stage: &mut dyn Stage,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<Vec<StepInfo>> {
    let device = stage.latents().device();
    let mut infos = Vec::with_capacity(stage.total());
    loop {
        let started = Instant::now();
        let Some(enqueued) = stage.step()? else {
            return Ok(infos);
        };
        sync(&device)?;
        let info = enqueued.finish(started.elapsed().as_secs_f64());
        infos.push(info);
        if on_step(&info).is_break() {
            return Err(Error::Cancelled);
        }
    }
}

/// Per-phase means of a run's steps, for summaries: `(stage, phase, steps, mean seconds)` in
/// the order the phases first ran.
pub fn phase_means(steps: &[StepInfo]) -> Vec<(&'static str, Phase, usize, f64)> {
    let mut out: Vec<(&'static str, Phase, usize, f64)> = Vec::new();
    for s in steps {
        match out
            .iter_mut()
            .find(|(st, ph, _, _)| *st == s.stage && *ph == s.phase)
        {
            Some(entry) => {
                entry.2 += 1;
                entry.3 += s.seconds;
            }
            None => out.push((s.stage, s.phase, 1, s.seconds)),
        }
    }
    for entry in &mut out {
        entry.3 /= entry.2 as f64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readback_issued_early_returns_the_values() {
        let device = Device::flex();
        let t = Tensor::<1>::from_data([5.0, 6.0], &device);
        let read = Readback::issue(t.clone() * 2.0);
        let data = burn::tensor::try_read_sync(read.data())
            .expect("the CPU can wait")
            .expect("reads");
        assert_eq!(data.try_to_vec::<f32>().unwrap(), vec![10.0, 12.0]);
    }

    #[test]
    fn phase_means_groups_by_stage_and_phase() {
        let s = |stage, phase, seconds| StepInfo {
            stage,
            index: 0,
            total: 4,
            timestep: 0.0,
            phase,
            shallow: false,
            seconds,
        };
        let steps = [
            s("prior", Phase::SemanticsPlanning, 2.0),
            s("prior", Phase::SemanticsPlanning, 4.0),
            s("prior", Phase::FidelityImproving, 1.0),
            s("decoder", Phase::SemanticsPlanning, 5.0),
        ];
        let m = phase_means(&steps);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].0, m[0].2, m[0].3), ("prior", 2, 3.0));
        assert_eq!((m[1].1, m[1].2, m[1].3), (Phase::FidelityImproving, 1, 1.0));
        assert_eq!((m[2].0, m[2].2, m[2].3), ("decoder", 1, 5.0));
    }
}
