//! Kernel-launch accounting for benchmarks: which GPU kernels a piece of work launches, how
//! often, how many distinct compiled kernels that is, and (when asked) how long each kernel ran,
//! grouped by op class. It listens through cubecl's launch observer, so it sees every launch burn
//! makes, fused ones included, on any cubecl device (native wgpu, WebGPU in the browser). The CPU
//! backend (Flex) launches no kernels: its counts are all zero.
//!
//! ```ignore
//! let (out, launches) = tgate::profile::observe(Timing::Off, || unet.forward(..).into_data());
//! println!("{} launches, {} distinct kernels", launches.total(), launches.distinct);
//! ```

use std::collections::BTreeMap;
#[cfg(feature = "wgpu")]
use std::sync::{Arc, Mutex};

/// Whether to time each kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    /// Count only: kernels run as they normally do (pipelined).
    Off,
    /// Time each kernel on the device. The launch path waits for every kernel, so they run one
    /// at a time: right for where the time goes, wrong for the pass's wall time.
    PerKernel,
}

/// The op classes launches are grouped in.
pub const CLASSES: [&str; 7] = [
    "conv",
    "matmul",
    "attention",
    "norm/reduce",
    "elementwise",
    "copy/layout",
    "other",
];

/// The op class of a kernel, from its name (cubecl names kernels by their Rust type; the first
/// ` | `-separated part is the kernel, the rest its arguments).
pub fn class_of(kernel: &str) -> &'static str {
    let k = kernel
        .split(" | ")
        .next()
        .unwrap_or(kernel)
        .to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| k.contains(w));
    if has(&["attention", "flash"]) {
        "attention"
    } else if has(&["conv", "im2col", "col2im"]) {
        "conv"
    } else if has(&["matmul", "gemm", "gemv", "mma"]) {
        "matmul"
    } else if has(&["norm", "reduce", "sum", "mean", "argmax", "softmax", "var"]) {
        "norm/reduce"
    } else if has(&[
        "elemwise",
        "fuse",
        "unary",
        "binop",
        "binary",
        "scalar",
        "cast",
        "clamp",
        "mask",
        "cmp",
        "activation",
    ]) {
        "elementwise"
    } else if has(&[
        "copy",
        "contiguous",
        "slice",
        "cat",
        "gather",
        "scatter",
        "permute",
        "swap",
        "reshape",
        "interpolate",
        "repeat",
        "layout",
        "index",
    ]) {
        "copy/layout"
    } else {
        "other"
    }
}

/// A kernel's name without its argument list (`MatmulEntry`, `KernelBinop | AddOp`).
pub fn short_name(kernel: &str) -> String {
    let mut parts = kernel.split(" | ");
    let head = parts.next().unwrap_or(kernel);
    match parts.next() {
        Some(op) if op.ends_with("Op") => format!("{head} {op}"),
        _ => head.to_string(),
    }
}

/// What one kernel name did during an observation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelStat {
    pub launches: usize,
    /// Device time in seconds (only with [`Timing::PerKernel`]).
    pub seconds: f64,
}

/// The launches of one observed piece of work.
#[derive(Clone, Debug, Default)]
pub struct Launches {
    /// Per kernel name (shortened as cubecl's profiler shortens them).
    pub kernels: BTreeMap<String, KernelStat>,
    /// Distinct compiled kernels launched (a kernel name covers several compiled variants).
    pub distinct: usize,
}

impl Launches {
    /// Launches in all.
    pub fn total(&self) -> usize {
        self.kernels.values().map(|s| s.launches).sum()
    }

    /// Launches and seconds per op class, in [`CLASSES`] order.
    pub fn by_class(&self) -> Vec<(&'static str, KernelStat)> {
        let mut out: Vec<(&'static str, KernelStat)> = CLASSES
            .iter()
            .map(|c| (*c, KernelStat::default()))
            .collect();
        for (name, s) in &self.kernels {
            let slot = &mut out
                .iter_mut()
                .find(|(c, _)| *c == class_of(name))
                .expect("every class is listed")
                .1;
            slot.launches += s.launches;
            slot.seconds += s.seconds;
        }
        out
    }

    /// `conv 54, matmul 292, ...`: launches per op class, the empty ones left out.
    pub fn class_summary(&self) -> String {
        let parts: Vec<String> = self
            .by_class()
            .into_iter()
            .filter(|(_, s)| s.launches > 0)
            .map(|(c, s)| format!("{c} {}", s.launches))
            .collect();
        parts.join(", ")
    }
}

/// Runs `work` and returns what it launched. Observations are process-wide: run one at a time.
pub fn observe<R>(timing: Timing, work: impl FnOnce() -> R) -> (R, Launches) {
    let counter = LaunchCounter::start(timing);
    let out = work();
    (out, counter.finish())
}

/// Counts launches from [`LaunchCounter::start`] to [`LaunchCounter::finish`] (across `.await`s
/// too, for the browser's asynchronous steps). One counter at a time per process.
#[cfg(feature = "wgpu")]
pub struct LaunchCounter {
    counter: Arc<Counter>,
    compiled: burn::cubecl::launched::LaunchedKernels,
    watching: burn::cubecl::logging::LaunchObservation,
}

#[cfg(feature = "wgpu")]
#[derive(Default)]
struct Counter {
    timed: bool,
    stats: Mutex<BTreeMap<&'static str, KernelStat>>,
}

#[cfg(feature = "wgpu")]
impl burn::cubecl::logging::LaunchObserver for Counter {
    fn launched(&self, kernel: &'static str) {
        if let Ok(mut s) = self.stats.lock() {
            s.entry(kernel).or_default().launches += 1;
        }
    }
    fn timing(&self) -> burn::cubecl::logging::TimingRequest {
        use burn::cubecl::logging::TimingRequest;
        if self.timed {
            TimingRequest::Resolved
        } else {
            TimingRequest::None
        }
    }
    fn timed(
        &self,
        kernel: &'static str,
        duration: burn::cubecl::logging::Duration,
        _method: burn::cubecl::logging::TimingMethod,
    ) {
        if let Ok(mut s) = self.stats.lock() {
            s.entry(kernel).or_default().seconds += duration.as_secs_f64();
        }
    }
}

#[cfg(feature = "wgpu")]
impl LaunchCounter {
    pub fn start(timing: Timing) -> Self {
        let counter = Arc::new(Counter {
            timed: timing == Timing::PerKernel,
            ..Counter::default()
        });
        let compiled = burn::cubecl::launched::LaunchedKernels::new();
        let watching = burn::cubecl::logging::LaunchObservation::new(counter.clone());
        LaunchCounter {
            counter,
            compiled,
            watching,
        }
    }

    pub fn finish(self) -> Launches {
        use burn::cubecl::config::{type_name_format, TypeNameFormatLevel};
        drop(self.watching);
        let distinct = self.compiled.finish().len();
        let mut kernels: BTreeMap<String, KernelStat> = BTreeMap::new();
        let stats = self
            .counter
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        for (name, s) in stats {
            let slot = kernels
                .entry(type_name_format(name, TypeNameFormatLevel::Balanced))
                .or_default();
            slot.launches += s.launches;
            slot.seconds += s.seconds;
        }
        Launches { kernels, distinct }
    }
}

/// Without a cubecl backend nothing launches kernels.
#[cfg(not(feature = "wgpu"))]
pub struct LaunchCounter;

#[cfg(not(feature = "wgpu"))]
impl LaunchCounter {
    pub fn start(_timing: Timing) -> Self {
        LaunchCounter
    }
    pub fn finish(self) -> Launches {
        Launches::default()
    }
}

/// Device memory: bytes reserved by the device's pools now (they keep most pages once made, but
/// give emptied ones back now and then: after a pass this is near its peak, not always at it) and
/// bytes in use; `None` where the backend does not report it.
pub fn device_memory(device: &burn::tensor::Device) -> Option<(u64, u64)> {
    device
        .memory_pool_usage()
        .map(|u| (u.bytes_reserved, u.bytes_in_use))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_classed_by_their_own_name() {
        for (name, class) in [
            ("DirectConv2dKernel", "conv"),
            ("MatmulEntry | TensorArgs | DynamicScalar | __Lhs", "matmul"),
            ("Attention | TensorArgs | DynamicScalar", "attention"),
            ("ReduceKernel | TensorArgs", "norm/reduce"),
            ("KernelBinop | AddOp", "elementwise"),
            ("MaskFillKernel", "elementwise"),
            ("ElemwiseFuse", "elementwise"),
            ("CopyKernelPack", "copy/layout"),
            ("SomethingNew", "other"),
        ] {
            assert_eq!(class_of(name), class, "{name}");
        }
        assert_eq!(short_name("KernelBinop | AddOp"), "KernelBinop AddOp");
        assert_eq!(
            short_name("MatmulEntry | TensorArgs | DynamicScalar"),
            "MatmulEntry"
        );
    }

    #[test]
    fn launches_add_up_by_class() {
        let mut l = Launches::default();
        for (name, n) in [
            ("MatmulEntry", 3),
            ("KernelBinop | AddOp", 2),
            ("CopyKernel", 1),
        ] {
            l.kernels.insert(
                name.into(),
                KernelStat {
                    launches: n,
                    seconds: 0.5,
                },
            );
        }
        assert_eq!(l.total(), 6);
        assert_eq!(l.class_summary(), "matmul 3, elementwise 2, copy/layout 1");
        let by = l.by_class();
        assert_eq!(by.iter().map(|(_, s)| s.seconds).sum::<f64>(), 1.5);
    }
}
