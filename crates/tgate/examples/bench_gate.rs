//! Benchmark (not a test): the denoising loop with and without T-GATE on random-weight UNets.
//!
//! ```text
//! cargo run -p tgate --example bench_gate [--features wgpu] -- [--backend cpu|wgpu]
//!     [--model sd15|small|both|CONFIG.json] [--size PIXELS] [--steps N] [--gate-step K] [--dtype f32|f16]
//!     [--no-kernels] [--kernels-only] [--memory-only] [--deepcache-interval N] [--deepcache-branch K]
//!     [--before-after] [--no-deepcache] [--default-malloc] [--max-tensor-mib N] [--one-ahead-too]
//! ```
//! The timed loops wait for the device after each step (`tgate::stage::set_one_ahead(false)`), so
//! each step's time is its own; generations enqueue one step ahead of the one they wait for.
//! `--one-ahead-too` runs the gated loop a second time that way and prints both totals, with
//! the host's time to enqueue a step (what the device idles per step in lockstep). Where the
//! host blocks while it enqueues (lavapipe runs kernels on the CPU), one step ahead cannot gain.
//! `--model PATH`: a UNet `config.json` (or a folder holding one), random weights of its shape.
//! `--sp-interval N --fi-interval N --warm-up N`: tgate's self-attention cache in the gated loops
//! (default 1, 1, 0: the original T-GATE; tgate's `pipe.tgate()` uses 5, 1, 2).
//! `--max-tensor-mib N`: cap every tensor at N MiB as a device with that binding limit would
//! (WebGPU's default is 128): weights over it fail to load, attention splits its queries to fit.
//! `--default-malloc`: leave glibc's malloc as it is (by default the benchmark calls
//! `tgate::host_memory::keep_large_allocations`, as the CLI does).
//! `--kernels-only`: the kernel accounting alone (no timed loops).
//! `--before-after` (GPU backends): the kernel accounting and the plain / gated loops first with
//! burn's generic ops only, then with tgate's own kernels (`shaders/`), same run; then a line of
//! before → after ratios. `--no-deepcache` skips the DeepCache loops.
//! Prints per-phase step times, the gated / ungated ratio for the whole loop (both measured in
//! the same run), and the MACs per step of each phase (counted from the layers actually run);
//! then the same loop with DeepCache alone and with gate + DeepCache (tgate's
//! `TgateSDDeepCacheLoader`; interval 3, branch 0 by default), full and shallow steps apart, and
//! the whole-loop speed-up of each against the plain loop, all in the same run.
//! On wgpu it first accounts for the kernels (`tgate::profile`): launches per UNet forward
//! (planning batch 2, gated batch 1; the time input made beforehand, as a generation makes it
//! once for all its calls), the kernels a gated forward launches more often than a planning one,
//! distinct kernels compiled by a cold run, device time per op class (each kernel timed alone)
//! for a planning forward, a gated one and a planning one reusing self-attention, the kernels each attention shape launches (flash or the
//! fallback that builds the score matrix), and the device memory reserved.

mod common;

use std::ops::ControlFlow;

use burn::tensor::{DType, Device, Tensor, TensorData};
use tgate::deepcache::DeepCacheConfig;

use tgate::noise::randn;
use tgate::pipeline::{denoise, GenerateParams, Noise, StepInfo};
use tgate::profile::{class_of, device_memory, observe, Launches, Timing};
use tgate::resnet::TimeInput;
use tgate::schedulers::SchedulerConfig;
use tgate::tgate::{AttentionCache, CacheMode, GateConfig, Phase};
use tgate::unet_2d_condition::{UNet2DConditionModel, UNetConfig};
use tgate::weights::Weights;

/// runwayml/stable-diffusion-v1-5 `unet/config.json` (the keys that shape the network).
const SD15_UNET: &str = r#"{"block_out_channels":[320,640,1280,1280],"layers_per_block":2,
 "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
 "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
 "attention_head_dim":8,"cross_attention_dim":768,"norm_num_groups":32,"sample_size":64,
 "in_channels":4,"out_channels":4}"#;
/// A smaller network of the same family.
const SMALL_UNET: &str = r#"{"block_out_channels":[64,128,256],"layers_per_block":1,
 "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
 "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
 "attention_head_dim":4,"cross_attention_dim":256,"norm_num_groups":32,"sample_size":32,
 "in_channels":4,"out_channels":4}"#;
/// SD 1.5's `scheduler/scheduler_config.json`.
const SD15_SCHEDULER: &str = r#"{"_class_name":"PNDMScheduler","beta_end":0.012,"beta_schedule":"scaled_linear",
 "beta_start":0.00085,"num_train_timesteps":1000,"set_alpha_to_one":false,"skip_prk_steps":true,"steps_offset":1,
 "clip_sample":false}"#;

struct Args {
    backend: String,
    model: String,
    size: Option<usize>,
    steps: usize,
    gate_step: Option<usize>,
    kernels: bool,
    /// Only the kernel accounting (no timed loops).
    kernels_only: bool,
    dtype: DType,
    memory_only: bool,
    deep_cache: DeepCacheConfig,
    before_after: bool,
    deepcache_runs: bool,
    default_malloc: bool,
    max_tensor_mib: Option<u64>,
    one_ahead_too: bool,
    /// sp_interval, fi_interval, warm_up of the gated loops.
    knobs: (usize, usize, usize),
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        backend: "cpu".into(),
        model: "both".into(),
        size: None,
        steps: 10,
        gate_step: None,
        kernels: true,
        kernels_only: false,
        dtype: DType::F32,
        memory_only: false,
        deep_cache: DeepCacheConfig::tgate_default(),
        before_after: false,
        deepcache_runs: true,
        default_malloc: false,
        max_tensor_mib: None,
        one_ahead_too: false,
        knobs: (1, 1, 0),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = val()?,
            "--model" => a.model = val()?,
            "--size" => a.size = Some(val()?.parse().map_err(|e| format!("--size: {e}"))?),
            "--steps" => a.steps = val()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--gate-step" => {
                a.gate_step = Some(val()?.parse().map_err(|e| format!("--gate-step: {e}"))?)
            }
            "--no-kernels" => a.kernels = false,
            "--kernels-only" => a.kernels_only = true,
            "--before-after" => a.before_after = true,
            "--no-deepcache" => a.deepcache_runs = false,
            "--one-ahead-too" => a.one_ahead_too = true,
            "--sp-interval" => {
                a.knobs.0 = val()?.parse().map_err(|e| format!("--sp-interval: {e}"))?
            }
            "--fi-interval" => {
                a.knobs.1 = val()?.parse().map_err(|e| format!("--fi-interval: {e}"))?
            }
            "--warm-up" => a.knobs.2 = val()?.parse().map_err(|e| format!("--warm-up: {e}"))?,
            "--default-malloc" => a.default_malloc = true,
            "--max-tensor-mib" => {
                a.max_tensor_mib = Some(
                    val()?
                        .parse()
                        .map_err(|e| format!("--max-tensor-mib: {e}"))?,
                )
            }
            "--deepcache-interval" => {
                a.deep_cache.interval = val()?
                    .parse()
                    .map_err(|e| format!("--deepcache-interval: {e}"))?
            }
            "--deepcache-branch" => {
                a.deep_cache.branch = val()?
                    .parse()
                    .map_err(|e| format!("--deepcache-branch: {e}"))?
            }
            "--memory-only" => a.memory_only = true,
            "--dtype" => a.dtype = common::dtype(&val()?)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.kernels_only && (!a.kernels || a.before_after || a.backend == "cpu") {
        return Err(
            "--kernels-only is the kernel accounting of a GPU backend alone: not with --no-kernels, --before-after or --backend cpu".into(),
        );
    }
    Ok(a)
}

/// The device and its largest buffer (attention scores are split to fit, as in generation).
fn device(backend: &str) -> Result<(Device, Option<u64>), String> {
    match backend {
        "cpu" => Ok((Device::flex(), None)),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            let (device, setup) = Device::wgpu_options()
                .init_with_setup()
                .map_err(|e| format!("wgpu: {e:?}"))?;
            let info = setup.adapter.get_info();
            println!(
                "adapter: {} ({:?}; driver {} {})",
                info.name, info.backend, info.driver, info.driver_info
            );
            let l = setup.device.limits();
            Ok((
                device,
                Some(u64::from(l.max_storage_buffer_binding_size).min(l.max_buffer_size)),
            ))
        }
        other => Err(format!("backend {other} is not available in this build")),
    }
}

struct Run {
    /// Phase, seconds, MACs, DeepCache shallow.
    steps: Vec<(Phase, f64, u64, bool)>,
    /// Phase, host seconds to enqueue the step.
    enqueue: Vec<(Phase, f64)>,
}

impl Run {
    fn phase(&self, phase: Phase) -> Option<(usize, f64, u64)> {
        self.select(|s| s.0 == phase)
    }
    /// Steps of `phase` that ran the whole UNet (`shallow` false) or DeepCache's branch.
    fn deep(&self, phase: Phase, shallow: bool) -> Option<(usize, f64, u64)> {
        self.select(|s| s.0 == phase && s.3 == shallow)
    }
    fn select(
        &self,
        keep: impl Fn(&&(Phase, f64, u64, bool)) -> bool,
    ) -> Option<(usize, f64, u64)> {
        let s: Vec<_> = self.steps.iter().filter(keep).collect();
        // Mean time and mean MACs (steps of a phase differ when self-attention is reused).
        (!s.is_empty()).then(|| {
            (
                s.len(),
                s.iter().map(|s| s.1).sum::<f64>() / s.len() as f64,
                s.iter().map(|s| s.2).sum::<u64>() / s.len() as u64,
            )
        })
    }
    fn total(&self) -> f64 {
        self.steps.iter().map(|s| s.1).sum()
    }
    /// Mean host time to enqueue a step of `phase`.
    fn enqueue_mean(&self, phase: Phase) -> f64 {
        let e: Vec<f64> = self
            .enqueue
            .iter()
            .filter(|e| e.0 == phase)
            .map(|e| e.1)
            .collect();
        e.iter().sum::<f64>() / e.len().max(1) as f64
    }
}

fn run(
    unet: &UNet2DConditionModel,
    sched: &SchedulerConfig,
    p: &GenerateParams,
    cond: &Tensor<3>,
) -> Result<Run, String> {
    let mut steps = Vec::new();
    let mut enqueue = Vec::new();
    denoise(
        unet,
        sched,
        p,
        cond.clone(),
        Some(cond.clone()),
        &mut |s: &StepInfo| {
            steps.push((s.phase, s.seconds, s.macs, s.shallow));
            enqueue.push((s.phase, s.enqueue_seconds));
            ControlFlow::Continue(())
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Run { steps, enqueue })
}

/// One UNet forward at batch `b` with the cache in the given modes, waited for.
fn forward(
    unet: &UNet2DConditionModel,
    cache: &mut AttentionCache,
    b: usize,
    side: usize,
    cond: &Tensor<3>,
    time: &TimeInput,
    modes: (CacheMode, CacheMode),
) {
    let device = cond.device();
    let sample = Tensor::<4>::from_data(
        TensorData::new(randn(3, 0, b * 4 * side * side), [b, 4, side, side]),
        &device,
    );
    let context = Tensor::cat(vec![cond.clone(); b], 0);
    cache.begin(modes.0, modes.1);
    let _ = unet
        .forward_time(sample, time, &context, cache, None)
        .into_data();
}

/// The time input of a call at timestep 500, as a generation makes it: once, in its
/// [`tgate::unet_2d_condition::TimeTable`], outside the calls measured.
fn time_input(unet: &UNet2DConditionModel, device: &burn::tensor::Device) -> TimeInput {
    let table = unet.time_table(&[500.0], None, device);
    let time = unet.time_at(&table, 0).expect("the table holds call 0");
    // Run it now, so that none of it is counted in the calls measured.
    let (TimeInput::Joined(t) | TimeInput::Activated(t)) = &time;
    let _ = t.clone().into_data();
    time
}

fn print_launches(label: &str, l: &Launches) {
    println!(
        "  {label:<34}: {:>5} launches ({})",
        l.total(),
        l.class_summary()
    );
}

/// Kernel accounting on cubecl devices (see the module docs).
/// Returns (launches per planning forward, per gated forward, distinct kernels cold).
fn kernels(
    unet: &UNet2DConditionModel,
    side: usize,
    cond: &Tensor<3>,
    limit: Option<u64>,
) -> (usize, usize, usize) {
    let (compute, store, reuse) = (
        (CacheMode::Compute, CacheMode::Compute),
        (CacheMode::StoreMean, CacheMode::Compute),
        (CacheMode::Reuse, CacheMode::Compute),
    );
    let time = time_input(unet, &cond.device());
    let mut cache = AttentionCache::new();
    let t0 = std::time::Instant::now();
    let ((), cold) = observe(Timing::Off, || {
        forward(unet, &mut cache, 2, side, cond, &time, compute);
        forward(unet, &mut cache, 2, side, cond, &time, store);
        forward(unet, &mut cache, 1, side, cond, &time, reuse);
    });
    println!(
        "  cold (planning, gate, gated forward): {} distinct kernels compiled, {} launches, {:.1} s",
        cold.distinct,
        cold.total(),
        t0.elapsed().as_secs_f64()
    );
    // A planning step of a generation: the text keys and values are already projected (once
    // per generation, by its first step).
    forward(unet, &mut cache, 2, side, cond, &time, compute);
    let ((), planning) = observe(Timing::Off, || {
        forward(unet, &mut cache, 2, side, cond, &time, compute)
    });
    print_launches("planning forward (batch 2)", &planning);
    let ((), gated) = observe(Timing::Off, || {
        forward(unet, &mut cache, 1, side, cond, &time, reuse)
    });
    print_launches("gated forward (batch 1)", &gated);
    // Work a batch-1 call does that the batch-2 one does not (layout copies, mostly).
    let more: Vec<String> = gated
        .kernels
        .iter()
        .filter_map(|(n, g)| {
            let p = planning.kernels.get(n).map_or(0, |s| s.launches);
            (g.launches > p).then(|| format!("{} {p} -> {}", short(n), g.launches))
        })
        .collect();
    if !more.is_empty() {
        println!(
            "    launched more often by the gated forward: {}",
            more.join(", ")
        );
    }
    let ((), timed) = observe(Timing::PerKernel, || {
        forward(unet, &mut cache, 2, side, cond, &time, compute)
    });
    // The same per kernel for a gated forward and for a planning forward that reuses
    // self-attention (tgate's self-attention cache before the gate): what each phase saves, by
    // op class.
    let ((), timed_gated) = observe(Timing::PerKernel, || {
        forward(unet, &mut cache, 1, side, cond, &time, reuse)
    });
    let self_store = (CacheMode::Compute, CacheMode::Store);
    let self_reuse = (CacheMode::Compute, CacheMode::Reuse);
    forward(unet, &mut cache, 2, side, cond, &time, self_store);
    let ((), timed_self) = observe(Timing::PerKernel, || {
        forward(unet, &mut cache, 2, side, cond, &time, self_reuse)
    });
    let seconds = |l: &Launches| l.kernels.values().map(|s| s.seconds).sum::<f64>();
    let total = seconds(&timed);
    println!(
        "  device time by op class (kernels timed one at a time): planning forward {:.1} ms; gated forward {:.1} ms ({:.2}x); planning forward reusing self-attention {:.1} ms ({:.2}x)",
        total * 1e3,
        seconds(&timed_gated) * 1e3,
        seconds(&timed_gated) / total.max(1e-12),
        seconds(&timed_self) * 1e3,
        seconds(&timed_self) / total.max(1e-12)
    );
    let (gated_classes, self_classes) = (timed_gated.by_class(), timed_self.by_class());
    for (i, (class, s)) in timed.by_class().into_iter().enumerate() {
        let (g, r) = (&gated_classes[i].1, &self_classes[i].1);
        if s.launches + g.launches + r.launches > 0 {
            println!(
                "    {class:<12} {:>5} launches {:>9.2} ms ({:>4.1} %) | gated {:>5} launches {:>9.2} ms | self-attention reused {:>5} launches {:>9.2} ms",
                s.launches,
                s.seconds * 1e3,
                100.0 * s.seconds / total.max(1e-12),
                g.launches,
                g.seconds * 1e3,
                r.launches,
                r.seconds * 1e3
            );
        }
    }
    let mut top: Vec<_> = timed.kernels.iter().collect();
    top.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    let others: Vec<String> = timed
        .kernels
        .iter()
        .filter(|(n, _)| class_of(n) == "other")
        .map(|(n, s)| format!("{}x {}", s.launches, short(n)))
        .collect();
    if !others.is_empty() {
        println!("    other: {}", others.join(", "));
    }
    println!("    top kernels:");
    for (name, s) in top.iter().take(8) {
        println!(
            "      {:>8.2} ms {:>4}x {}",
            s.seconds * 1e3,
            s.launches,
            short(name)
        );
    }
    attention_shapes(unet, side, cond, limit);
    if let Some((reserved, in_use)) = device_memory(&cond.device()) {
        println!(
            "  device memory: {:.1} MiB reserved by the pools after the runs, {:.1} MiB in use",
            reserved as f64 / 1048576.0,
            in_use as f64 / 1048576.0
        );
    }
    (planning.total(), gated.total(), cold.distinct)
}

fn short(name: &str) -> String {
    tgate::profile::short_name(name)
}

/// The kernels one attention call launches at each shape this UNet uses at `side` (latent side):
/// a flash kernel, or the fallback's separate score / softmax / value kernels.
fn attention_shapes(
    unet: &UNet2DConditionModel,
    side: usize,
    cond: &Tensor<3>,
    limit: Option<u64>,
) {
    let cfg = unet.config();
    let device = cond.device();
    println!("  attention kernels by shape (batch 2; autotuned on first use):");
    let levels = cfg.block_out_channels.len();
    let mut seen = std::collections::BTreeSet::new();
    // The transformer levels (down blocks with cross-attention), then the mid block.
    let mut at: Vec<usize> = (0..levels).filter(|&l| cfg.down_cross[l]).collect();
    at.push(levels - 1);
    for level in at {
        let ch = cfg.block_out_channels[level];
        let s = side >> level;
        let heads = cfg.heads[level];
        for (kind, n_k) in [("self", s * s), ("cross", 77)] {
            let key = (s * s, n_k, ch, heads);
            if !seen.insert(key) {
                continue;
            }
            let rnd = |n: usize, c: usize, seed: u64| {
                Tensor::<3>::from_data(
                    TensorData::new(randn(seed, 0, 2 * n * c), [2, n, c]),
                    &device,
                )
            };
            let (q, k, v) = (rnd(s * s, ch, 5), rnd(n_k, ch, 6), rnd(n_k, ch, 7));
            let run = || {
                let _ = tgate::nn::multi_head_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    heads,
                    None,
                    false,
                    limit,
                )
                .into_data();
            };
            run(); // tune first
            let ((), l) = observe(Timing::Off, run);
            let names: Vec<String> = l
                .kernels
                .iter()
                .map(|(n, s)| format!("{}x {}", s.launches, short(n)))
                .collect();
            println!(
                "    {kind:<5} q {:>5} k {:>5} heads {heads} d {:>3}: {}",
                s * s,
                n_k,
                ch / heads,
                names.join(" | ")
            );
        }
    }
}

fn bench(
    name: &str,
    config_json: &str,
    a: &Args,
    device: &Device,
    limit: Option<u64>,
) -> Result<(), String> {
    let cfg = UNetConfig::from_json(name, config_json.as_bytes()).map_err(|e| e.to_string())?;
    let size = a.size.unwrap_or(cfg.sample_size * 8);
    let t0 = std::time::Instant::now();
    let weights = Weights::random(1, device)
        .with_dtype(a.dtype)
        .with_max_tensor_bytes(limit);
    let gpu = a.backend != "cpu";
    let modes: &[bool] = if a.before_after && gpu && !a.memory_only {
        &[false, true]
    } else {
        &[true]
    };
    // Weight layouts are chosen at load (channels-last convolution weights on GPUs): each mode
    // runs a model loaded with tgate's kernels in that mode.
    let load = |custom: bool| {
        tgate::nn::set_custom_kernels(custom);
        UNet2DConditionModel::load(&cfg, &weights).map_err(|e| e.to_string())
    };
    let mut loaded_with = modes[0];
    let mut unet = load(loaded_with)?;
    let sched = SchedulerConfig::from_json("scheduler", SD15_SCHEDULER.as_bytes())
        .map_err(|e| e.to_string())?;
    let d = cfg.cross_attention_dim;
    let cond = Tensor::<3>::from_data(TensorData::new(randn(2, 0, 77 * d), [1, 77, d]), device);
    let gate_step = a
        .gate_step
        .unwrap_or(GateConfig::default_gate_step(a.steps));
    let mut p = GenerateParams {
        prompt: String::new(),
        negative_prompt: String::new(),
        steps: a.steps,
        guidance: 7.5,
        scheduler: None,
        width: size,
        height: size,
        gate: None,
        deep_cache: None,
        noise: Noise::Seed(0),
        clip_skip: 0,
    };
    let knobs = GateConfig {
        gate_step,
        sp_interval: a.knobs.0,
        fi_interval: a.knobs.1,
        warm_up: a.knobs.2,
    };
    knobs.validate(a.steps).map_err(|e| e.to_string())?;
    println!("== {name}: {size}x{size} px, {} steps, gate_step {gate_step}, sp_interval {}, fi_interval {}, warm_up {}, random weights (built in {:.1} s)", a.steps, knobs.sp_interval, knobs.fi_interval, knobs.warm_up, t0.elapsed().as_secs_f64());
    if a.memory_only {
        memory(&unet, size, &cond, a.dtype, device);
        return Ok(());
    }
    let mut results = Vec::new();
    for &custom in modes {
        if custom != loaded_with {
            drop(unet);
            unet = load(custom)?;
            loaded_with = custom;
        }
        if gpu {
            println!(
                "-- {}",
                if custom {
                    "tgate's kernels (shaders/) where they apply, burn's ops elsewhere"
                } else {
                    "burn's generic ops only (before)"
                }
            );
        }
        let counts = (a.kernels && gpu).then(|| kernels(&unet, size / 8, &cond, limit));
        if a.kernels_only {
            continue;
        }
        // Warm-up: kernel compilation and autotuning on wgpu, allocator growth on CPU.
        run(
            &unet,
            &sched,
            &GenerateParams {
                steps: 2,
                gate: Some(GateConfig::original(1)),
                ..p.clone()
            },
            &cond,
        )?;
        p.gate = None;
        let ungated = run(&unet, &sched, &p, &cond)?;
        p.gate = Some(knobs);
        let gated = run(&unet, &sched, &p, &cond)?;
        report(&ungated, &gated)?;
        if a.one_ahead_too {
            tgate::stage::set_one_ahead(true);
            let ahead = run(&unet, &sched, &p, &cond);
            tgate::stage::set_one_ahead(false);
            report_one_ahead(&ahead?, &gated);
        }
        results.push((counts, ungated, gated));
    }
    if a.kernels_only {
        return Ok(());
    }
    if let [(before_counts, before_u, before_g), (after_counts, after_u, after_g)] = &results[..] {
        let step = |r: &Run, phase| r.phase(phase).map(|(_, t, _)| t).unwrap_or(f64::NAN);
        println!("  before -> after (same run):");
        if let (Some(b), Some(a)) = (before_counts, after_counts) {
            println!(
                "    launches per planning forward {} -> {} ({:.2}x fewer), gated forward {} -> {} ({:.2}x fewer), distinct kernels cold {} -> {}",
                b.0, a.0, b.0 as f64 / a.0 as f64, b.1, a.1, b.1 as f64 / a.1 as f64, b.2, a.2
            );
        }
        let sp = Phase::SemanticsPlanning;
        let fi = Phase::FidelityImproving;
        println!(
            "    planning step {:.1} -> {:.1} ms ({:.2}x), gated step {:.1} -> {:.1} ms ({:.2}x), gated loop {:.2} -> {:.2} s; gated/ungated loop {:.3} -> {:.3}",
            step(before_u, sp) * 1e3,
            step(after_u, sp) * 1e3,
            step(before_u, sp) / step(after_u, sp),
            step(before_g, fi) * 1e3,
            step(after_g, fi) * 1e3,
            step(before_g, fi) / step(after_g, fi),
            before_g.total(),
            after_g.total(),
            before_g.total() / before_u.total(),
            after_g.total() / after_u.total()
        );
    }
    if !a.deepcache_runs {
        return Ok(());
    }
    let (_, ungated, gated) = results.pop().ok_or("no runs")?;
    p.gate = None;
    p.deep_cache = Some(a.deep_cache);
    let deep = run(&unet, &sched, &p, &cond)?;
    p.gate = Some(knobs);
    let both = run(&unet, &sched, &p, &cond)?;
    report_deep(&a.deep_cache, &ungated, &gated, &deep, &both);
    Ok(())
}

/// The gated loop enqueued one step ahead against the same loop waiting after each step.
fn report_one_ahead(ahead: &Run, lockstep: &Run) {
    let sp = Phase::SemanticsPlanning;
    let fi = Phase::FidelityImproving;
    let step = |r: &Run, phase| r.phase(phase).map(|(_, t, _)| t).unwrap_or(f64::NAN);
    println!(
        "  one step ahead vs waiting after each step (gated loop, same run): {:.2} s vs {:.2} s ({:.3}x faster); planning step {:.1} vs {:.1} ms, gated step {:.1} vs {:.1} ms (one step ahead, a step's time is the interval between completions); host wall time to enqueue a step (cubecl's own waits for the device included): planning {:.1} ms, gated {:.1} ms (lockstep: {:.1} / {:.1} ms)",
        ahead.total(),
        lockstep.total(),
        lockstep.total() / ahead.total(),
        step(ahead, sp) * 1e3,
        step(lockstep, sp) * 1e3,
        step(ahead, fi) * 1e3,
        step(lockstep, fi) * 1e3,
        ahead.enqueue_mean(sp) * 1e3,
        ahead.enqueue_mean(fi) * 1e3,
        lockstep.enqueue_mean(sp) * 1e3,
        lockstep.enqueue_mean(fi) * 1e3,
    );
}

/// DeepCache alone and with the gate, full and shallow steps apart, and the whole-loop
/// speed-ups of the gate, DeepCache and both against the plain loop (same run).
fn report_deep(c: &DeepCacheConfig, ungated: &Run, gated: &Run, deep: &Run, both: &Run) {
    let (_, _, m_u) = ungated
        .phase(Phase::SemanticsPlanning)
        .unwrap_or((0, 0.0, 1));
    println!(
        "  DeepCache interval {} branch {} (alone, and with the gate as tgate's TgateSDDeepCacheLoader):",
        c.interval, c.branch
    );
    for (label, r) in [("deepcache", deep), ("gate+deepcache", both)] {
        for phase in [Phase::SemanticsPlanning, Phase::FidelityImproving] {
            for shallow in [false, true] {
                if let Some((n, t, m)) = r.deep(phase, shallow) {
                    println!(
                        "  {label:<15}{:<19} {:<7}: {n:>3} steps, {:>9.1} ms/step, {:>8.2} GMAC/step ({:.2} of ungated)",
                        phase.name(),
                        if shallow { "shallow" } else { "full" },
                        t * 1e3,
                        m as f64 / 1e9,
                        m as f64 / m_u.max(1) as f64
                    );
                }
            }
        }
    }
    let base = ungated.total();
    println!(
        "  {:<26}: gate x{:.2}, DeepCache x{:.2}, both x{:.2} (ungated {:.2} s; gate {:.2} s, DeepCache {:.2} s, both {:.2} s)",
        "whole-loop speed-up",
        base / gated.total(),
        base / deep.total(),
        base / both.total(),
        base,
        gated.total(),
        deep.total(),
        both.total()
    );
}

fn main() {
    let result = parse_args().and_then(|a| {
        if !a.default_malloc {
            tgate::host_memory::keep_large_allocations();
        }
        let (device, limit) = device(&a.backend)?;
        // A lower cap than the device's (e.g. WebGPU's default 128 MiB): weights over it fail to
        // load, attention is split to fit it, as on a device with that limit.
        let limit = match a.max_tensor_mib {
            Some(mib) => Some(limit.map_or(mib << 20, |l| l.min(mib << 20))),
            None => limit,
        };
        println!("backend {} ({device:?})", a.backend);
        // Each step's time its own (see the module docs).
        tgate::stage::set_one_ahead(false);
        if a.model == "small" || a.model == "both" {
            bench("small", SMALL_UNET, &a, &device, limit)?;
        }
        if a.model == "sd15" || a.model == "both" {
            bench("sd15", SD15_UNET, &a, &device, limit)?;
        }
        if !["small", "sd15", "both"].contains(&a.model.as_str()) {
            let mut path = std::path::PathBuf::from(&a.model);
            if path.is_dir() {
                path.push("config.json");
            }
            let json = std::fs::read_to_string(&path)
                .map_err(|e| format!("--model {}: {e}", path.display()))?;
            bench(&path.display().to_string(), &json, &a, &device, limit)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Device memory after one planning forward and one gated forward: what the pools still reserve
/// (they keep most pages once made, but give back emptied ones now and then, so this can be
/// below the peak) and what is in use.
fn memory(
    unet: &UNet2DConditionModel,
    size: usize,
    cond: &Tensor<3>,
    dtype: DType,
    device: &Device,
) {
    let mut cache = AttentionCache::new();
    let time = time_input(unet, device);
    let planning = (CacheMode::StoreMean, CacheMode::Compute);
    forward(unet, &mut cache, 2, size / 8, cond, &time, planning);
    let gated = (CacheMode::Reuse, CacheMode::Compute);
    forward(unet, &mut cache, 1, size / 8, cond, &time, gated);
    match device_memory(device) {
        Some((reserved, in_use)) => println!(
            "  device memory ({dtype:?}): {:.1} MiB reserved by the pools after, {:.1} MiB in use (weights and gate cache)",
            reserved as f64 / 1048576.0,
            in_use as f64 / 1048576.0
        ),
        None => println!("  device memory: not reported by this backend"),
    }
}

/// Prints the per-phase step times and the whole-loop ratios of an ungated and a gated run.
fn report(ungated: &Run, gated: &Run) -> Result<(), String> {
    let (n_u, t_u, m_u) = ungated.phase(Phase::SemanticsPlanning).ok_or("no steps")?;
    println!(
        "  ungated            : {n_u:>3} steps, {:>9.1} ms/step, {:>8.2} GMAC/step",
        t_u * 1e3,
        m_u as f64 / 1e9
    );
    let mut macs_total = 0u64;
    for phase in [Phase::SemanticsPlanning, Phase::FidelityImproving] {
        if let Some((n, t, m)) = gated.phase(phase) {
            macs_total += m * n as u64;
            println!(
                "  gated {:<20}: {n:>3} steps, {:>9.1} ms/step, {:>8.2} GMAC/step ({:.2} of ungated)",
                phase.name(),
                t * 1e3,
                m as f64 / 1e9,
                m as f64 / m_u as f64
            );
        }
    }
    let macs_ungated = m_u * n_u as u64;
    println!(
        "  {:<26}: gated {:.2} s vs ungated {:.2} s -> time ratio {:.3}, MAC ratio {:.3}",
        "whole loop",
        gated.total(),
        ungated.total(),
        gated.total() / ungated.total(),
        macs_total as f64 / macs_ungated as f64
    );
    Ok(())
}
