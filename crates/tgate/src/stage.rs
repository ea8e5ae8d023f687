//! One denoising loop as a state machine, shared by every model family.
//!
//! diffusers writes each loop inline in a pipeline's `__call__` (`for i, t in enumerate(timesteps)`);
//! here a loop is a [`Stage`]: [`Stage::step`] enqueues one iteration on the device *without
//! waiting for it*, so the caller decides how to wait (blocking natively with [`drive`], an
//! awaited one-value readback in a browser) and when to stop. Stable Diffusion's UNet loop
//! ([`crate::pipeline::Denoiser`]) and Würstchen's Stage C and Stage B loops
//! ([`crate::pipeline_wuerstchen::StageDenoiser`]) implement it; [`crate::text_to_image`]
//! sequences them.

use std::cell::Cell;
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
        self.finish_measured(Measured {
            seconds,
            ..Measured::default()
        })
    }

    /// The step's report with what the native loop measured.
    pub fn finish_measured(self, m: Measured) -> StepInfo {
        StepInfo {
            stage: self.stage,
            index: self.index,
            total: self.total,
            timestep: self.timestep,
            phase: self.phase,
            shallow: self.shallow,
            seconds: m.seconds,
            enqueue_seconds: m.enqueue_seconds,
            macs: m.macs,
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
    /// Host wall time spent enqueuing it, cubecl's own waits for the device included (0 where
    /// not measured).
    pub enqueue_seconds: f64,
    /// Multiply-accumulates its layers issued (0 where not measured).
    pub macs: u64,
}

/// A readback queued on the device behind the work enqueued so far, not yet awaited: how a loop
/// waits for one step while it enqueues the next.
///
/// [`Readback::issue`] starts the read at once (the fused operations so far are launched and the
/// copy to a mappable buffer is submitted), so the caller can enqueue the next piece of work
/// before awaiting this one. The read resolves when the device has finished the work before it.
/// burn's cubecl reads are lazy on native builds (the copy would be queued when the bytes are
/// first touched, behind everything enqueued since); `issue` asks for an eager one there. A read
/// dropped unfinished is completed in the background (a staging buffer still being mapped must
/// not be reused): natively on a thread of its own; in a browser hand it to the executor.
pub struct Readback(Option<ReadState>);

enum ReadState {
    /// The read is on its way.
    Pending(ReadFuture),
    /// The read finished when it was issued (CPU backends compute as they enqueue).
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
        let polled = {
            let _eager = eager::Reads::declare();
            read.as_mut().poll(&mut cx)
        };
        Readback(Some(match polled {
            Poll::Ready(out) => ReadState::Ready(out),
            Poll::Pending => ReadState::Pending(read),
        }))
    }

    /// Whether the values were already there when the read was issued (the work ran as it was
    /// enqueued).
    pub fn was_ready(&self) -> bool {
        matches!(self.0, Some(ReadState::Ready(_)))
    }

    /// The values, once the device has finished the work before the read.
    pub async fn data(mut self) -> std::result::Result<TensorData, ExecutionError> {
        match self.0.take() {
            Some(ReadState::Pending(read)) => read.await,
            Some(ReadState::Ready(out)) => out,
            None => unreachable!("a readback is only emptied by data() or drop"),
        }
    }

    /// Natively: blocks until the values are there.
    pub fn wait(self) -> Result<TensorData> {
        let data = burn::tensor::try_read_sync(self.data())
            .ok_or_else(|| {
                Error::Device("this platform cannot block on a device read; await it".into())
            })?
            .map_err(|e| {
                Error::Device(format!(
                    "the GPU work did not complete (a lost or reset device, or memory exhausted): {e:?}"
                ))
            })?;
        // A lazy read (another thread's declaration, say) copies when its bytes are touched.
        let _ = data.as_bytes().len();
        Ok(data)
    }
}

impl Drop for Readback {
    fn drop(&mut self) {
        #[cfg(not(target_family = "wasm"))]
        if let Some(ReadState::Pending(read)) = self.0.take() {
            // Blocking here could hang the caller on a lost device; the thread can wait.
            let _ = std::thread::Builder::new()
                .name("tgate-readback".into())
                .spawn(move || {
                    let _ = burn::tensor::try_read_sync(read);
                });
        }
    }
}

/// Eager device reads on native builds, for the duration of a [`Reads`] guard.
mod eager {
    #[cfg(not(target_family = "wasm"))]
    use burn_std::{runtime_kind, set_runtime_kind, RuntimeKind};
    #[cfg(not(target_family = "wasm"))]
    use std::sync::Mutex;

    /// burn reads eagerly when the host declares an asynchronous runtime, lazily otherwise (the
    /// only use of the declaration in burn 0.22). The declaration is process-wide: guards
    /// overlapping on several threads are counted, and the last one restores what the host had
    /// declared when the first began (a declaration the host makes while a guard is live is
    /// overwritten). A read made eager by another thread's guard is still correct.
    #[cfg(not(target_family = "wasm"))]
    static ACTIVE: Mutex<(usize, RuntimeKind)> = Mutex::new((0, RuntimeKind::Sync));

    pub struct Reads(());

    impl Reads {
        pub fn declare() -> Self {
            #[cfg(not(target_family = "wasm"))]
            {
                let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
                if active.0 == 0 {
                    active.1 = runtime_kind();
                    set_runtime_kind(RuntimeKind::Async);
                }
                active.0 += 1;
            }
            Reads(())
        }
    }

    impl Drop for Reads {
        fn drop(&mut self) {
            #[cfg(not(target_family = "wasm"))]
            {
                let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
                active.0 -= 1;
                if active.0 == 0 {
                    set_runtime_kind(active.1);
                }
            }
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

thread_local! {
    static ONE_AHEAD: Cell<bool> = const { Cell::new(true) };
}

/// Whether native loops ([`drive`], [`crate::text_to_image::Generation::run`]) enqueue one piece
/// of work ahead of the one they wait for (the default), or wait for the device after each piece
/// (`false`: for benchmarks that compare both in one run, or attribute per-thread counters to
/// single steps). Per thread.
pub fn set_one_ahead(on: bool) {
    ONE_AHEAD.with(|c| c.set(on));
}

/// See [`set_one_ahead`].
pub fn one_ahead() -> bool {
    ONE_AHEAD.with(|c| c.get())
}

/// What the host measured of one piece of work.
#[derive(Clone, Copy, Debug, Default)]
pub struct Measured {
    /// From the completion of the piece before (or the loop's start) to this one's completion.
    pub seconds: f64,
    /// Host wall time spent enqueuing the piece, including the waits cubecl itself makes for the
    /// device while it submits (natively it keeps at most about 512 kernels in flight): on a
    /// device that runs asynchronously, what it would idle per piece if the loop waited after
    /// each one.
    pub enqueue_seconds: f64,
    /// Multiply-accumulates its layers issued ([`crate::nn::macs`]).
    pub macs: u64,
}

/// The first value of latents `[b, c, h, w]`: ready once the work that wrote them is.
pub(crate) fn probe_of(t: &Tensor<4>) -> Tensor<1> {
    t.clone().slice([0..1, 0..1, 0..1, 0..1]).reshape([1])
}

struct InFlight<W> {
    work: W,
    done: Completion,
    enqueue_seconds: f64,
    macs: u64,
}

type ReadResult = std::result::Result<TensorData, ExecutionError>;

/// A piece's readback and the instant it completed.
enum Completion {
    /// The values were there when the read was issued (the CPU computes as it enqueues).
    At(Instant, ReadResult),
    /// A thread of its own waits for the read and notes when it completes: the host may be
    /// blocked in cubecl's submissions then (software Vulkan runs kernels as they are submitted),
    /// and a step must not be credited with the time its successor took to enqueue.
    #[cfg_attr(target_family = "wasm", allow(dead_code))]
    Watched(std::sync::mpsc::Receiver<(Instant, ReadResult)>),
    /// Waited for by the loop itself (no thread could be made).
    Inline(Readback),
}

impl Completion {
    fn of(read: Readback) -> Self {
        let ready = read.was_ready();
        let mut read = read;
        if ready {
            if let Some(ReadState::Ready(out)) = read.0.take() {
                return Completion::At(Instant::now(), out);
            }
        }
        #[cfg(not(target_family = "wasm"))]
        {
            let (tx, rx) = std::sync::mpsc::channel();
            let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(read)));
            let theirs = slot.clone();
            let spawned = std::thread::Builder::new()
                .name("tgate-step-wait".into())
                .spawn(move || {
                    let read = theirs.lock().ok().and_then(|mut r| r.take());
                    if let Some(read) = read {
                        if let Some(out) = burn::tensor::try_read_sync(read.data()) {
                            let _ = tx.send((Instant::now(), out));
                        }
                    }
                });
            if spawned.is_ok() {
                return Completion::Watched(rx);
            }
            read = match slot.lock().ok().and_then(|mut r| r.take()) {
                Some(read) => read,
                None => return Completion::Watched(rx),
            };
        }
        Completion::Inline(read)
    }

    /// Blocks until the piece is done; the instant it completed.
    fn wait(self) -> Result<Instant> {
        let failed = |e: ExecutionError| {
            Error::Device(format!(
                "the GPU work did not complete (a lost or reset device, or memory exhausted): {e:?}"
            ))
        };
        // A lazy read (another thread's declaration, say) copies when its bytes are touched.
        let touch = |data: TensorData| data.as_bytes().len();
        match self {
            Completion::At(at, out) => {
                touch(out.map_err(failed)?);
                Ok(at)
            }
            Completion::Watched(rx) => {
                let (at, out) = rx.recv().map_err(|_| {
                    Error::Device("the GPU work did not complete: its readback was lost".into())
                })?;
                touch(out.map_err(failed)?);
                Ok(at)
            }
            Completion::Inline(read) => {
                read.wait()?;
                Ok(Instant::now())
            }
        }
    }
}

/// The native loop behind [`drive`] and [`crate::text_to_image::Generation::run`]: `enqueue`
/// puts the next piece of work on the device without waiting (its probe: one value ready when
/// the piece is), and the loop waits for piece `i` only after piece `i + 1` is enqueued, so the
/// device never idles while the host builds a step (see [`set_one_ahead`]). A piece for which
/// `ends_stage` is true is waited for before the next is enqueued (the next stage's first
/// kernels are built on the host, and would land in the last step's time). `done` sees each
/// piece once the device finished it; it may stop the run ([`Error::Cancelled`]). The piece then
/// in flight finishes unobserved.
///
/// The loop first waits for `device` to finish what is already on it: a device lost since its
/// last use is then reported as [`Error::Device`] before any new work is written to it (wgpu
/// learns of a loss when it next polls the device; a write before that is a validation error,
/// which cubecl raises as a panic). A loss during the run can still meet that panic while the
/// next piece is enqueued; the loop turns a panic raised by wgpu into [`Error::Device`] too.
pub(crate) fn pipelined<S: ?Sized, W>(
    device: &Device,
    state: &mut S,
    mut enqueue: impl FnMut(&mut S) -> Result<Option<(W, Tensor<1>)>>,
    ends_stage: impl Fn(&W) -> bool,
    mut done: impl FnMut(&mut S, W, Measured) -> ControlFlow<()>,
) -> Result<()> {
    device_panics(|| sync(device))?;
    let ahead = one_ahead();
    let mut last_done = Instant::now();
    let mut finish = |state: &mut S, piece: InFlight<W>| -> Result<()> {
        let InFlight {
            work,
            done: completion,
            enqueue_seconds,
            macs,
        } = piece;
        // The device completes pieces in order; the max only guards against clock noise.
        let at = device_panics(|| completion.wait())?.max(last_done);
        let measured = Measured {
            seconds: at.duration_since(last_done).as_secs_f64(),
            enqueue_seconds,
            macs,
        };
        last_done = at;
        let flow = done(state, work, measured);
        if !ahead {
            // Waiting after each step, the next step starts once the callback returns.
            last_done = Instant::now();
        }
        match flow {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(Error::Cancelled),
        }
    };
    let mut pending: Option<InFlight<W>> = None;
    loop {
        if let Some(piece) = pending.take_if(|p| ends_stage(&p.work)) {
            finish(state, piece)?;
        }
        let started = Instant::now();
        let macs_before = crate::nn::macs();
        let next = device_panics(|| {
            Ok(enqueue(state)?.map(|(work, probe)| (work, Readback::issue(probe))))
        })?
        .map(|(work, read)| InFlight {
            work,
            done: Completion::of(read),
            enqueue_seconds: started.elapsed().as_secs_f64(),
            macs: crate::nn::macs().wrapping_sub(macs_before),
        });
        if let Some(piece) = pending.take() {
            finish(state, piece)?;
        }
        match next {
            None => return Ok(()),
            Some(piece) if !ahead => finish(state, piece)?,
            Some(piece) => pending = Some(piece),
        }
    }
}

/// Runs `f`, turning a panic raised by wgpu (cubecl re-raises wgpu's errors as panics until it
/// learns of a lost device) into [`Error::Device`]; other panics go on.
fn device_panics<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(out) => out,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or_default()
                .to_string();
            if message.starts_with("wgpu error") {
                Err(Error::Device(format!(
                    "the GPU work did not complete (a lost or reset device, or memory exhausted): {message}"
                )))
            } else {
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// Runs a stage to its end natively, one step enqueued ahead of the one waited for (see
/// [`pipelined`]); `on_step` sees each step once the device finished it and may stop the run
/// ([`Error::Cancelled`]).
pub fn drive(
    stage: &mut dyn Stage,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<Vec<StepInfo>> {
    let mut infos = Vec::with_capacity(stage.total());
    let device = stage.latents().device();
    pipelined(
        &device,
        stage,
        |stage| Ok(stage.step()?.map(|s| (s, probe_of(stage.latents())))),
        |_| false,
        |_, step, measured| {
            let info = step.finish_measured(measured);
            infos.push(info);
            on_step(&info)
        },
    )?;
    Ok(infos)
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
            enqueue_seconds: 0.0,
            macs: 0,
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
