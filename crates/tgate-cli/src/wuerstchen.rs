//! `tgate generate` on a Würstchen folder: prior (gated), decoder, Stage A.

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use tgate::loader::{DirSource, ModelSource, Variant};
use tgate::pipeline::{to_rgb8, StepInfo};
use tgate::pipeline_wuerstchen::{Wuerstchen, WuerstchenNoise, WuerstchenParams};
use tgate::safetensors::{write_f32, SafeTensors};
use tgate::schedulers::ddpm_wuerstchen::default_stage_c_timesteps;
use tgate::tgate::{GateConfig, Phase};
use tgate::Error;

use crate::{device, model_dir, web_seed, write_png, GenerateArgs};

/// Reads a `--noise` file, checking each tensor's shape against what this run needs.
fn read_noise(
    path: &Path,
    model: &Wuerstchen,
    p: &WuerstchenParams,
) -> Result<WuerstchenNoise, Error> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::MissingFile(format!("{}: {e}", path.display())))?;
    let st = SafeTensors::parse(path.display().to_string(), bytes)?;
    let prior = model.prior_shape(p.width, p.height);
    let decoder = model.decoder_shape(prior[2], prior[3]);
    let with_steps = |n: usize, s: [usize; 4]| vec![n, s[0], s[1], s[2], s[3]];
    let get = |name: &str, shape: Vec<usize>| {
        let t = st.read_f32_any(name)?;
        if t.shape != shape {
            return Err(Error::input(
                name,
                format!(
                    "shape {:?}, expected {shape:?} for {}x{}",
                    t.shape, p.width, p.height
                ),
            ));
        }
        Ok(t.data)
    };
    Ok(WuerstchenNoise::Tensors {
        prior_noise: get("prior_noise", prior.to_vec())?,
        prior_step_noise: get("prior_step_noise", with_steps(p.prior_step_count(), prior))?,
        decoder_noise: get("decoder_noise", decoder.to_vec())?,
        decoder_step_noise: get("decoder_step_noise", with_steps(p.decoder_steps, decoder))?,
    })
}

fn host(t: &Tensor<4>) -> Result<Vec<f32>, Error> {
    t.clone()
        .try_into_data()
        .map_err(|e| Error::Device(format!("{e:?}")))?
        .try_to_vec::<f32>()
        .map_err(|e| Error::Device(format!("{e:?}")))
}

fn bar(stage: &'static str) -> (ProgressBar, impl FnMut(&StepInfo) -> ControlFlow<()>) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(stage);
    let b = bar.clone();
    let update = move |s: &StepInfo| {
        b.set_length(s.total as u64);
        b.set_position(s.index as u64 + 1);
        b.set_message(format!(
            "{} t={:.3} {:.0} ms",
            s.phase.name(),
            s.timestep,
            s.seconds * 1e3
        ));
        ControlFlow::Continue(())
    };
    (bar, update)
}

pub fn generate(a: GenerateArgs, src: DirSource) -> Result<(), Error> {
    for (flag, set) in [
        ("scheduler", a.scheduler.is_some()),
        ("sp-interval", a.sp_interval.is_some()),
        ("fi-interval", a.fi_interval.is_some()),
        ("warm-up", a.warm_up.is_some()),
    ] {
        if set {
            return Err(Error::param(
                flag,
                "not available for Würstchen (DDPMWuerstchenScheduler; the Stage C gate has no self-attention cache)",
            ));
        }
    }
    let (device, limit) = device(a.backend, a.max_tensor_bytes)?;
    let src = src.with_max_tensor_bytes(limit);
    let prior_src = a
        .prior
        .as_deref()
        .map(|p| model_dir(p).map(|s| s.with_max_tensor_bytes(limit)))
        .transpose()?;
    eprintln!("loading Würstchen from {} ...", a.model.display());
    let model = Wuerstchen::load_as(
        &src,
        prior_src.as_ref().map(|p| p as &dyn ModelSource),
        Variant::parse(&a.variant)?,
        a.dtype.dtype(),
        &device,
    )?;
    for part in &model.loaded {
        eprintln!("  {part}");
    }

    let (noise, seed_note) = match a.seed {
        Some(seed) => (WuerstchenNoise::Seed(seed), format!("seed {seed}")),
        None => {
            let seed = web_seed();
            (WuerstchenNoise::Seed(seed), format!("seed {seed} (random)"))
        }
    };
    let mut p = WuerstchenParams::new(a.prompt.clone(), noise);
    p.negative_prompt = a.negative_prompt.clone();
    p.width = a.width.unwrap_or(512);
    p.height = a.height.unwrap_or(512);
    if a.default_timesteps {
        p.prior_timesteps = Some(default_stage_c_timesteps());
    } else if let Some(steps) = a.steps {
        p.prior_steps = steps;
    }
    p.prior_guidance = a.guidance.unwrap_or(4.0);
    p.decoder_steps = a.decoder_steps.unwrap_or(12);
    p.decoder_guidance = a.decoder_guidance.unwrap_or(0.0);
    let prior_steps = p.prior_step_count();
    p.gate_step = if a.no_gate {
        None
    } else {
        Some(
            a.gate_step
                .unwrap_or_else(|| GateConfig::default_gate_step(prior_steps)),
        )
    };
    model.validate(&p)?;
    let seed_note = match &a.noise {
        Some(path) => {
            p.noise = read_noise(path, &model, &p)?;
            format!("noise from {}", path.display())
        }
        None => seed_note,
    };
    let (out_w, out_h) = model.output_size(p.width, p.height);
    eprintln!(
        "{}x{} (output {}x{}), prior {} steps guidance {}, decoder {} steps guidance {}, {}, {}",
        p.width,
        p.height,
        out_w,
        out_h,
        prior_steps,
        p.prior_guidance,
        p.decoder_steps,
        p.decoder_guidance,
        match p.gate_step {
            Some(g) => format!("Stage C T-GATE gate_step {g}"),
            None => "no gate".into(),
        },
        seed_note
    );

    let (pb, mut on_step) = bar("prior");
    let prior = model.generate_prior(&p, &mut on_step)?;
    pb.finish_and_clear();
    let (db, mut on_step) = bar("decoder");
    let decoder = model.generate_decoder(prior.latents.clone(), &p, &mut on_step)?;
    db.finish_and_clear();

    if let Some(path) = &a.save_latents {
        let (pd, dd) = (prior.latents.dims(), decoder.latents.dims());
        let (pv, dv) = (host(&prior.latents)?, host(&decoder.latents)?);
        std::fs::write(
            path,
            write_f32(&[("prior_latents", &pd, &pv), ("decoder_latents", &dd, &dv)]),
        )
        .map_err(|e| Error::input("save_latents", format!("{}: {e}", path.display())))?;
        eprintln!("latents written to {}", path.display());
    }
    let (w, h, rgb) = to_rgb8(model.decode(decoder.latents))?;
    write_png(&a.out, w, h, &rgb)?;

    let summary = |label: &str, steps: &[&StepInfo]| {
        if !steps.is_empty() {
            let mean = steps.iter().map(|s| s.seconds).sum::<f64>() / steps.len() as f64;
            eprintln!(
                "{label:>26}: {:>3} steps, mean {:.1} ms/step",
                steps.len(),
                mean * 1e3
            );
        }
    };
    for phase in [Phase::SemanticsPlanning, Phase::FidelityImproving] {
        let steps: Vec<&StepInfo> = prior.steps.iter().filter(|s| s.phase == phase).collect();
        summary(&format!("prior {}", phase.name()), &steps);
    }
    summary("decoder", &decoder.steps.iter().collect::<Vec<_>>());
    let total: f64 = prior
        .steps
        .iter()
        .chain(&decoder.steps)
        .map(|s| s.seconds)
        .sum();
    eprintln!(
        "{:>26}: {:.2} s denoising; image written to {}",
        "total",
        total,
        a.out.display()
    );
    Ok(())
}
