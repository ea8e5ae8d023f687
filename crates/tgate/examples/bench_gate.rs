//! Benchmark (not a test): the denoising loop with and without T-GATE on random-weight UNets.
//!
//! ```text
//! cargo run -p tgate --example bench_gate [--features wgpu] -- [--backend cpu|wgpu]
//!     [--model sd15|small|both] [--size PIXELS] [--steps N] [--gate-step K]
//! ```
//! Prints per-phase step times, the gated / ungated ratio for the whole loop (both measured in
//! the same run), and the MACs per step of each phase (counted from the layers actually run).

use std::ops::ControlFlow;

use burn::tensor::{Device, Tensor, TensorData};
use tgate::nn::{macs, reset_macs};
use tgate::noise::randn;
use tgate::pipeline::{denoise, GenerateParams, Noise, StepInfo};
use tgate::schedulers::SchedulerConfig;
use tgate::tgate::{GateConfig, Phase};
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
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        backend: "cpu".into(),
        model: "both".into(),
        size: None,
        steps: 10,
        gate_step: None,
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
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn device(backend: &str) -> Result<Device, String> {
    match backend {
        "cpu" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu_options()
            .init()
            .map_err(|e| format!("wgpu: {e:?}")),
        other => Err(format!("backend {other} is not available in this build")),
    }
}

struct Run {
    steps: Vec<(Phase, f64, u64)>,
}

impl Run {
    fn phase(&self, phase: Phase) -> Option<(usize, f64, u64)> {
        let s: Vec<_> = self.steps.iter().filter(|s| s.0 == phase).collect();
        (!s.is_empty()).then(|| {
            (
                s.len(),
                s.iter().map(|s| s.1).sum::<f64>() / s.len() as f64,
                s[0].2,
            )
        })
    }
    fn total(&self) -> f64 {
        self.steps.iter().map(|s| s.1).sum()
    }
}

fn run(
    unet: &UNet2DConditionModel,
    sched: &SchedulerConfig,
    p: &GenerateParams,
    cond: &Tensor<3>,
) -> Result<Run, String> {
    let mut steps = Vec::new();
    reset_macs();
    denoise(
        unet,
        sched,
        p,
        cond.clone(),
        Some(cond.clone()),
        &mut |s: &StepInfo| {
            steps.push((s.phase, s.seconds, macs()));
            reset_macs();
            ControlFlow::Continue(())
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Run { steps })
}

fn bench(name: &str, config_json: &str, a: &Args, device: &Device) -> Result<(), String> {
    let cfg = UNetConfig::from_json(name, config_json.as_bytes()).map_err(|e| e.to_string())?;
    let size = a.size.unwrap_or(cfg.sample_size * 8);
    let t0 = std::time::Instant::now();
    let unet =
        UNet2DConditionModel::load(&cfg, &Weights::random(1, device)).map_err(|e| e.to_string())?;
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
        noise: Noise::Seed(0),
        clip_skip: 0,
    };
    println!("== {name}: {size}x{size} px, {} steps, gate_step {gate_step}, random weights (built in {:.1} s)", a.steps, t0.elapsed().as_secs_f64());
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
    let ungated = run(&unet, &sched, &p, &cond)?;
    p.gate = Some(GateConfig::original(gate_step));
    let gated = run(&unet, &sched, &p, &cond)?;

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

fn main() {
    let result = parse_args().and_then(|a| {
        let device = device(&a.backend)?;
        println!("backend {} ({device:?})", a.backend);
        if a.model == "small" || a.model == "both" {
            bench("small", SMALL_UNET, &a, &device)?;
        }
        if a.model == "sd15" || a.model == "both" {
            bench("sd15", SD15_UNET, &a, &device)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
