//! `tgate`: text-to-image from a diffusers model folder, with T-GATE.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tgate::loader::{tighter_limit, DirSource, ModelSource, Variant};
use tgate::pipeline::{to_rgb8, GenerateParams, Noise, StableDiffusion, StepInfo};
use tgate::pipeline_wuerstchen::WuerstchenLayout;
use tgate::safetensors::{write_f32, SafeTensors};
use tgate::schedulers::SchedulerKind;
use tgate::tgate::{GateConfig, Phase};
use tgate::tokenizer::ClipTokenizer;
use tgate::Error;

#[derive(Parser)]
#[command(
    name = "tgate",
    version,
    about = "Stable Diffusion with T-GATE (burn: CPU or wgpu)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Generate(GenerateArgs),
    /// Print the 77 token ids of a prompt as a JSON array.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Backend {
    Cpu,
    Wgpu,
}

/// The compute dtype of the model's parameters and activations.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Precision {
    F32,
    /// Half precision (norms and softmax still in f32); needs a device with f16 support.
    F16,
}

impl Precision {
    pub(crate) fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// A diffusers pipeline folder: Stable Diffusion (unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/) or Würstchen (a combined folder with prior_* subfolders, or a decoder folder
    /// with --prior).
    #[arg(long)]
    model: PathBuf,
    /// Würstchen only: the prior pipeline folder when --model is a decoder pipeline folder.
    #[arg(long)]
    prior: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps (Würstchen: prior steps). Default: 25 (SD), 60 (Würstchen).
    #[arg(long)]
    steps: Option<usize>,
    /// Würstchen: run the prior on diffusers' DEFAULT_STAGE_C_TIMESTEPS (29 steps) instead of --steps.
    #[arg(long, conflicts_with = "steps")]
    default_timesteps: bool,
    /// Classifier-free guidance scale, off at 1 or below (Würstchen: the prior's).
    /// Default: 7.5 (SD), 4.0 (Würstchen).
    #[arg(long)]
    guidance: Option<f64>,
    /// Würstchen: decoder (Stage B) steps (default 12).
    #[arg(long)]
    decoder_steps: Option<usize>,
    /// Würstchen: decoder guidance scale, off at 1 or below (default 0).
    #[arg(long)]
    decoder_guidance: Option<f64>,
    /// ddim, pndm, euler, euler-a or dpm++2m (default: the model folder's scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    /// Default: the UNet's sample_size × 8.
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Steps before the gate (default: round(0.4 × steps)).
    #[arg(long, conflicts_with = "no_gate")]
    gate_step: Option<usize>,
    /// Run without T-GATE (plain diffusers behaviour).
    #[arg(long)]
    no_gate: bool,
    /// Self-attention refresh interval before the gate (1 = always computed; SD only).
    #[arg(long)]
    sp_interval: Option<usize>,
    /// Self-attention refresh interval after the gate (default 1; SD only).
    #[arg(long)]
    fi_interval: Option<usize>,
    /// Steps at the start that never reuse self-attention (default 0; SD only).
    #[arg(long)]
    warm_up: Option<usize>,
    #[arg(long, conflicts_with = "noise")]
    seed: Option<u64>,
    /// safetensors with `noise` [1,4,H/8,W/8] (and `step_noise` [steps,1,4,H/8,W/8] for euler-a);
    /// Würstchen: `prior_noise`, `prior_step_noise`, `decoder_noise`, `decoder_step_noise`.
    #[arg(long)]
    noise: Option<PathBuf>,
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// Write the final latents (before the VAE) to this safetensors file as `latents`;
    /// Würstchen: `prior_latents` (after ·42−1) and `decoder_latents` (before Stage A).
    #[arg(long)]
    save_latents: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Compute dtype: f32, or f16 (weights and activations; norms and softmax in f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Which weight files to prefer: auto (fp16 files for --dtype f16, else full precision),
    /// fp32, fp16 or bf16 (diffusers' `variant=`); the others are used when it is absent.
    #[arg(long, default_value = "auto")]
    variant: String,
    /// The largest buffer (bytes) one tensor may take on the device. On wgpu the adapter's
    /// maxStorageBufferBindingSize always applies; this can lower it. Bigger weights, or an
    /// image whose feature maps would not fit, are refused (attention is split to fit).
    #[arg(long)]
    max_tensor_bytes: Option<u64>,
}

mod wuerstchen;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Tokenize { model, prompt } => tokenize(&model, &prompt),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn model_dir(path: &Path) -> Result<DirSource, Error> {
    if !path.is_dir() {
        return Err(Error::MissingFile(format!(
            "{} is not a directory",
            path.display()
        )));
    }
    Ok(DirSource::new(path))
}

fn tokenize(model: &Path, prompt: &str) -> Result<(), Error> {
    let src = model_dir(model)?;
    let tok = ClipTokenizer::from_folder(&src, "tokenizer")?;
    let ids = tok.encode(prompt)?;
    println!("{}", serde_json::to_string(&ids).unwrap_or_default());
    Ok(())
}

/// Refuses an output path that cannot be written: its folder must exist and take a new file
/// (tried with a probe file, removed at once; an existing output is left untouched).
fn check_writable(flag: &str, path: &Path) -> Result<(), Error> {
    let refuse =
        |why: String| Error::param(flag, format!("cannot write {}: {why}", path.display()));
    if path.is_dir() {
        return Err(refuse("it is a folder".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(refuse(format!("no folder {}", dir.display())));
    }
    let probe = dir.join(format!(".tgate-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| refuse(e.to_string()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The device, and the largest buffer it binds: the wgpu adapter's storage-binding and buffer
/// limits, lowered to `cap` if given.
pub(crate) fn device(backend: Backend, cap: Option<u64>) -> Result<(Device, Option<u64>), Error> {
    match backend {
        Backend::Cpu => Ok((Device::flex(), cap)),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            let (device, setup) = Device::wgpu_options()
                .init_with_setup()
                .map_err(|e| Error::Device(format!("no usable wgpu adapter: {e:?}")))?;
            let l = setup.device.limits();
            let limit = u64::from(l.max_storage_buffer_binding_size).min(l.max_buffer_size);
            Ok((device, tighter_limit(Some(limit), cap)))
        }
        #[cfg(not(feature = "wgpu"))]
        Backend::Wgpu => Err(Error::Device(
            "this build has no wgpu support (build with --features wgpu)".into(),
        )),
    }
}

/// Reads a `--noise` file; returns the noise and the shape of `noise`.
fn read_noise(path: &Path, steps: usize) -> Result<(Noise, Vec<usize>), Error> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::MissingFile(format!("{}: {e}", path.display())))?;
    let st = SafeTensors::parse(path.display().to_string(), bytes)?;
    let noise = st.read_f32_any("noise")?;
    if noise.shape.len() != 4 || noise.shape[0] != 1 {
        return Err(Error::input(
            "noise",
            format!("shape {:?}, expected [1, 4, H/8, W/8]", noise.shape),
        ));
    }
    let step_noise = if st.contains("step_noise") {
        let s = st.read_f32_any("step_noise")?;
        if s.shape.len() != 5 || s.shape[0] != steps || s.shape[1..] != noise.shape[..] {
            return Err(Error::input(
                "step_noise",
                format!("shape {:?}, expected [{steps}, {:?}]", s.shape, noise.shape),
            ));
        }
        Some(s.data)
    } else {
        None
    };
    Ok((
        Noise::Tensors {
            noise: noise.data,
            step_noise,
        },
        noise.shape,
    ))
}

fn generate(a: GenerateArgs) -> Result<(), Error> {
    // Where the results go is checked first: minutes of generation must not end in a write error.
    check_writable("out", &a.out)?;
    if let Some(p) = &a.save_latents {
        check_writable("save-latents", p)?;
    }
    let src = model_dir(&a.model)?;
    if WuerstchenLayout::detect(&src)?.is_some() {
        return wuerstchen::generate(a, src);
    }
    if a.prior.is_some() {
        return Err(Error::param(
            "prior",
            "only Würstchen models take a separate prior folder",
        ));
    }
    for (flag, set) in [
        ("default-timesteps", a.default_timesteps),
        ("decoder-steps", a.decoder_steps.is_some()),
        ("decoder-guidance", a.decoder_guidance.is_some()),
    ] {
        if set {
            return Err(Error::param(flag, "only for Würstchen models"));
        }
    }
    let steps = a.steps.unwrap_or(25);
    if src.read("unet/config.json")?.is_none() {
        return Err(Error::MissingFile(format!(
            "{}/unet/config.json (not a Stable Diffusion pipeline folder)",
            a.model.display()
        )));
    }
    let scheduler = a
        .scheduler
        .as_deref()
        .map(str::parse::<SchedulerKind>)
        .transpose()?;
    let (device, limit) = device(a.backend, a.max_tensor_bytes)?;
    let src = src.with_max_tensor_bytes(limit);
    eprintln!("loading {} ...", a.model.display());
    let model =
        StableDiffusion::load_as(&src, Variant::parse(&a.variant)?, a.dtype.dtype(), &device)?;
    for part in &model.loaded {
        eprintln!("  {part}");
    }
    let size = model.default_size();
    let gate = if a.no_gate {
        None
    } else {
        Some(GateConfig {
            gate_step: a
                .gate_step
                .unwrap_or_else(|| GateConfig::default_gate_step(steps)),
            sp_interval: a.sp_interval.unwrap_or(1),
            fi_interval: a.fi_interval.unwrap_or(1),
            warm_up: a.warm_up.unwrap_or(0),
        })
    };
    let mut noise_shape: Option<Vec<usize>> = None;
    let (noise, seed_note) = match (&a.noise, a.seed) {
        (Some(path), _) => {
            let (noise, shape) = read_noise(path, steps)?;
            noise_shape = Some(shape);
            (noise, format!("noise from {}", path.display()))
        }
        (None, Some(seed)) => (Noise::Seed(seed), format!("seed {seed}")),
        (None, None) => {
            let seed = web_seed();
            (Noise::Seed(seed), format!("seed {seed} (random)"))
        }
    };
    // Without --width/--height, a noise file decides the size.
    let from_noise = |dim: usize| noise_shape.as_ref().map(|s| s[dim] * 8);
    let params = GenerateParams {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps,
        guidance: a.guidance.unwrap_or(7.5),
        scheduler,
        width: a.width.or(from_noise(3)).unwrap_or(size),
        height: a.height.or(from_noise(2)).unwrap_or(size),
        gate,
        noise,
        clip_skip: 0,
    };
    model.validate(&params)?;
    if let Some(shape) = &noise_shape {
        let expected = [
            1,
            model.unet.config().in_channels,
            params.height / 8,
            params.width / 8,
        ];
        if shape[..] != expected[..] {
            return Err(Error::input(
                "noise",
                format!(
                    "shape {shape:?}, expected {expected:?} for {}x{}",
                    params.width, params.height
                ),
            ));
        }
    }
    let kind = match scheduler {
        Some(k) => k,
        None => model.default_scheduler()?,
    };
    eprintln!(
        "{}x{}, {} steps, guidance {}, scheduler {}, {}, {}",
        params.width,
        params.height,
        params.steps,
        params.guidance,
        kind.name(),
        match gate {
            Some(g) => format!(
                "T-GATE gate_step {} (sp_interval {}, fi_interval {}, warm_up {})",
                g.gate_step, g.sp_interval, g.fi_interval, g.warm_up
            ),
            None => "no gate".into(),
        },
        seed_note
    );

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let out = model.generate_latents(&params, &mut |s: &StepInfo| {
        bar.set_length(s.total as u64);
        bar.set_position(s.index as u64 + 1);
        bar.set_message(format!(
            "{} t={:.0} {:.0} ms",
            s.phase.name(),
            s.timestep,
            s.seconds * 1e3
        ));
        ControlFlow::Continue(())
    })?;
    bar.finish_and_clear();

    if let Some(path) = &a.save_latents {
        let dims = out.latents.dims();
        let data = out
            .latents
            .clone()
            .try_into_data()
            .map_err(|e| Error::Device(format!("{e:?}")))?
            .try_to_vec::<f32>()
            .map_err(|e| Error::Device(format!("{e:?}")))?;
        std::fs::write(path, write_f32(&[("latents", &dims, &data)]))
            .map_err(|e| Error::input("save_latents", format!("{}: {e}", path.display())))?;
        eprintln!("latents written to {}", path.display());
    }
    let (w, h, rgb) = to_rgb8(model.decode(out.latents))?;
    write_png(&a.out, w, h, &rgb)?;

    let total: f64 = out.steps.iter().map(|s| s.seconds).sum();
    for phase in [Phase::SemanticsPlanning, Phase::FidelityImproving] {
        let times: Vec<f64> = out
            .steps
            .iter()
            .filter(|s| s.phase == phase)
            .map(|s| s.seconds)
            .collect();
        if !times.is_empty() {
            let mean = times.iter().sum::<f64>() / times.len() as f64;
            eprintln!(
                "{:>20}: {:>3} steps, mean {:.1} ms/step",
                phase.name(),
                times.len(),
                mean * 1e3
            );
        }
    }
    eprintln!(
        "{:>20}: {:.2} s denoising; image written to {}",
        "total",
        total,
        a.out.display()
    );
    Ok(())
}

pub(crate) fn web_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        % 1_000_000_007
}

pub(crate) fn write_png(path: &Path, w: usize, h: usize, rgb: &[u8]) -> Result<(), Error> {
    let fail = |e: String| Error::input("out", format!("{}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(|e| fail(e.to_string()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| fail(e.to_string()))?;
    writer
        .write_image_data(rgb)
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}
