//! Benchmark (not a test): the Würstchen Stage C loop with and without the Stage C gate, on
//! random-weight priors.
//!
//! ```text
//! cargo run --release -p tgate --example bench_wuerstchen -- [--backend cpu|wgpu]
//!     [--model production|small|both] [--latent SIDE] [--steps N] [--gate-step K] [--kernels]
//! ```
//! `production` has the shape of `warp-ai/wuerstchen-prior` (c 1536, depth 32, 24 heads,
//! c_cond 1280); `--latent 12` is a 512×512 image, 24 is 1024×1024. Prints per-phase step times
//! and MACs per step (counted from the layers actually run), and the gated / ungated ratios of
//! the whole loop, both runs measured in the same process. On wgpu also the kernels
//! (`tgate::profile`): distinct kernels compiled by the cold warm-up run, launches per planning
//! and per gated step (`--kernels`: each kernel's launches too), and the device memory
//! reserved. The loops wait for the device after each
//! step (`tgate::stage::set_one_ahead(false)`), so each step's time and launches are its own.

mod common;

use std::ops::ControlFlow;

use burn::tensor::{Device, Tensor, TensorData};

use tgate::noise::randn;
use tgate::pipeline::StepInfo;
use tgate::pipeline_wuerstchen::{denoise_prior, WuerstchenNoise, WuerstchenParams};
use tgate::profile::{device_memory, observe, LaunchCounter, Launches, Timing};
use tgate::schedulers::ddpm_wuerstchen::DdpmWuerstchenConfig;
use tgate::tgate::{GateConfig, Phase};
use tgate::weights::Weights;
use tgate::wuerstchen_prior::{PriorConfig, WuerstchenPrior};

const PRODUCTION: &str = r#"{"c_in":16,"c":1536,"c_cond":1280,"c_r":64,"depth":32,"nhead":24}"#;
const SMALL: &str = r#"{"c_in":16,"c":256,"c_cond":256,"c_r":64,"depth":8,"nhead":4}"#;

struct Args {
    backend: String,
    model: String,
    latent: usize,
    steps: usize,
    gate_step: Option<usize>,
    kernels: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        backend: "cpu".into(),
        model: "both".into(),
        latent: 12,
        steps: 6,
        gate_step: None,
        kernels: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String, f: &str| v.parse::<usize>().map_err(|e| format!("{f}: {e}"));
        match flag.as_str() {
            "--backend" => a.backend = val()?,
            "--model" => a.model = val()?,
            "--latent" => a.latent = num(val()?, "--latent")?,
            "--steps" => a.steps = num(val()?, "--steps")?,
            "--gate-step" => a.gate_step = Some(num(val()?, "--gate-step")?),
            "--kernels" => a.kernels = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// Runs the prior loop; `each` sees every step when it is done.
fn run_with(
    prior: &WuerstchenPrior,
    p: &WuerstchenParams,
    shape: [usize; 4],
    cond: &Tensor<3>,
    uncond: &Tensor<3>,
    each: &mut dyn FnMut(&StepInfo),
) -> Result<(), String> {
    denoise_prior(
        prior,
        DdpmWuerstchenConfig::default(),
        p,
        shape,
        cond.clone(),
        Some(uncond.clone()),
        &mut |s: &StepInfo| {
            each(s);
            ControlFlow::Continue(())
        },
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// (phase, seconds, MACs) per step.
fn run(
    prior: &WuerstchenPrior,
    p: &WuerstchenParams,
    shape: [usize; 4],
    cond: &Tensor<3>,
    uncond: &Tensor<3>,
) -> Result<Vec<(Phase, f64, u64)>, String> {
    let mut steps = Vec::new();
    run_with(prior, p, shape, cond, uncond, &mut |s| {
        steps.push((s.phase, s.seconds, s.macs));
    })?;
    Ok(steps)
}

/// The launches of every step of a run (each step's count ends when the step is done).
fn launches_per_step(
    prior: &WuerstchenPrior,
    p: &WuerstchenParams,
    shape: [usize; 4],
    cond: &Tensor<3>,
    uncond: &Tensor<3>,
) -> Result<Vec<(Phase, Launches)>, String> {
    let mut out = Vec::new();
    let mut counter = Some(LaunchCounter::start(Timing::Off));
    run_with(prior, p, shape, cond, uncond, &mut |s| {
        if let Some(c) = counter.take() {
            out.push((s.phase, c.finish()));
        }
        counter = Some(LaunchCounter::start(Timing::Off));
    })?;
    drop(counter);
    Ok(out)
}

fn summary(steps: &[(Phase, f64, u64)], phase: Phase) -> Option<(usize, f64, f64)> {
    let s: Vec<_> = steps.iter().filter(|s| s.0 == phase).collect();
    (!s.is_empty()).then(|| {
        let n = s.len();
        (
            n,
            s.iter().map(|s| s.1).sum::<f64>() / n as f64,
            s.iter().map(|s| s.2 as f64).sum::<f64>() / n as f64,
        )
    })
}

fn bench(name: &str, json: &str, a: &Args, device: &Device) -> Result<(), String> {
    let cfg = PriorConfig::from_json(name, json.as_bytes()).map_err(|e| e.to_string())?;
    let t0 = std::time::Instant::now();
    let prior =
        WuerstchenPrior::load(&cfg, &Weights::random(1, device)).map_err(|e| e.to_string())?;
    let d = cfg.c_cond;
    let text = |stream| {
        Tensor::<3>::from_data(
            TensorData::new(randn(2, stream, 77 * d), [1, 77, d]),
            device,
        )
    };
    let (cond, uncond) = (text(0), text(1));
    let shape = [1, cfg.c_in, a.latent, a.latent];
    let gate_step = a
        .gate_step
        .unwrap_or(GateConfig::default_gate_step(a.steps));
    let mut p = WuerstchenParams::new("", WuerstchenNoise::Seed(0));
    p.prior_steps = a.steps;
    println!(
        "== {name}: c {} depth {} heads {}, latent {}x{} (image ~{} px), {} steps, guidance {}, gate_step {gate_step} (weights built in {:.1} s)",
        cfg.c, cfg.depth, cfg.nhead, a.latent, a.latent, (a.latent as f64 * 42.67) as usize, a.steps,
        p.prior_guidance, t0.elapsed().as_secs_f64()
    );
    // Warm-up: kernel compilation / autotuning on wgpu, allocator growth on CPU.
    let mut warm = p.clone();
    warm.prior_steps = 2;
    warm.gate_step = Some(1);
    let (warmed, cold) = observe(Timing::Off, || run(&prior, &warm, shape, &cond, &uncond));
    warmed?;
    if a.backend != "cpu" {
        println!(
            "  cold (2 steps, gate at 1): {} distinct kernels compiled, {} launches",
            cold.distinct,
            cold.total()
        );
        let mut k = p.clone();
        k.prior_steps = 4;
        k.gate_step = Some(2);
        // Steps 0 and 1 plan (1 also fills the gate's cache), 2 and 3 are gated.
        for (i, (phase, l)) in launches_per_step(&prior, &k, shape, &cond, &uncond)?
            .iter()
            .enumerate()
        {
            println!(
                "  step {i} {:<19}: {:>5} launches ({})",
                phase.name(),
                l.total(),
                l.class_summary()
            );
            if a.kernels {
                for (n, s) in &l.kernels {
                    println!("      {:>4} {}", s.launches, n);
                }
            }
        }
        if let Some((reserved, in_use)) = device_memory(device) {
            println!(
                "  device memory: {:.1} MiB reserved by the pools after, {:.1} MiB in use",
                reserved as f64 / 1048576.0,
                in_use as f64 / 1048576.0
            );
        }
    }

    let ungated = run(&prior, &p, shape, &cond, &uncond)?;
    p.gate_step = Some(gate_step);
    let gated = run(&prior, &p, shape, &cond, &uncond)?;

    let (n_u, t_u, m_u) = summary(&ungated, Phase::SemanticsPlanning).ok_or("no steps")?;
    println!(
        "  ungated                      : {n_u:>3} steps, {:>9.1} ms/step, {:>9.2} GMAC/step",
        t_u * 1e3,
        m_u / 1e9
    );
    for phase in [Phase::SemanticsPlanning, Phase::FidelityImproving] {
        if let Some((n, t, m)) = summary(&gated, phase) {
            println!(
                "  gated {:<23}: {n:>3} steps, {:>9.1} ms/step, {:>9.2} GMAC/step (time {:.3}, MACs {:.3} of ungated)",
                phase.name(),
                t * 1e3,
                m / 1e9,
                t / t_u,
                m / m_u
            );
        }
    }
    let total = |s: &[(Phase, f64, u64)]| {
        (
            s.iter().map(|s| s.1).sum::<f64>(),
            s.iter().map(|s| s.2 as f64).sum::<f64>(),
        )
    };
    let ((tg, mg), (tu, mu)) = (total(&gated), total(&ungated));
    println!(
        "  whole loop                   : gated {tg:.2} s vs ungated {tu:.2} s -> time ratio {:.3}, MAC ratio {:.3}",
        tg / tu,
        mg / mu
    );
    Ok(())
}

fn main() {
    tgate::host_memory::keep_large_allocations();
    let result = parse_args().and_then(|a| {
        let device = common::device(&a.backend)?;
        println!("backend {} ({device:?})", a.backend);
        tgate::stage::set_one_ahead(false);
        if a.model == "small" || a.model == "both" {
            bench("small", SMALL, &a, &device)?;
        }
        if a.model == "production" || a.model == "both" {
            bench("production", PRODUCTION, &a, &device)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
