//! `tgate`: text-to-image from a diffusers model folder, with T-GATE.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tgate::deepcache::DeepCacheConfig;
use tgate::loader::{tighter_limit, DirSource, ModelSource, Variant};
use tgate::pipeline::to_rgb8;
use tgate::safetensors::write_f32;
use tgate::stage::{phase_means, StepInfo};
use tgate::text_to_image::{
    read_f32, GateKnobs, ModelKind, NoiseSource, Output, Pipeline, Request,
};
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
enum Backend {
    Cpu,
    Wgpu,
}

/// The compute dtype of the model's parameters and activations.
#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    F32,
    /// Half precision (norms and softmax still in f32); needs a device with f16 support.
    F16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
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
    /// Denoising steps (Würstchen: prior steps). Default: 25 (SD), 4 (LCM), 60 (Würstchen).
    #[arg(long)]
    steps: Option<usize>,
    /// Würstchen: run the prior on diffusers' DEFAULT_STAGE_C_TIMESTEPS (29 steps) instead of --steps.
    #[arg(long, conflicts_with = "steps")]
    default_timesteps: bool,
    /// Classifier-free guidance scale, off at 1 or below (Würstchen: the prior's; an LCM UNet
    /// takes it through its guidance embedding, one batch). Default: 7.5 (SD), 8.5 (LCM), 4.0
    /// (Würstchen).
    #[arg(long)]
    guidance: Option<f64>,
    /// Würstchen: decoder (Stage B) steps (default 12).
    #[arg(long)]
    decoder_steps: Option<usize>,
    /// Würstchen: decoder guidance scale, off at 1 or below (default 0).
    #[arg(long)]
    decoder_guidance: Option<f64>,
    /// ddim, pndm, euler, euler-a, dpm++2m or lcm (default: the model folder's scheduler).
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
    /// DeepCache (SD only): run the whole UNet every N steps and only its shallow branch in
    /// between (default 3 when --deepcache-branch is given; off otherwise). With the gate, as
    /// tgate's TgateSDDeepCacheLoader.
    #[arg(long)]
    deepcache_interval: Option<usize>,
    /// DeepCache's cache_branch_id: the shallow branch ends at down block K/3, layer K%3
    /// (default 0 when --deepcache-interval is given).
    #[arg(long)]
    deepcache_branch: Option<usize>,
    #[arg(long, conflicts_with = "noise")]
    seed: Option<u64>,
    /// safetensors with `noise` [1,4,H/8,W/8] (and `step_noise` [steps,1,4,H/8,W/8] for euler-a and lcm);
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
    /// The memory (bytes) a generation may use at once; default: the host's available memory
    /// (MemAvailable; the CPU's memory, and a bound for wgpu, whose adapters do not report
    /// theirs). Sizes whose feature maps cannot fit are refused before any work is done.
    #[arg(long)]
    max_memory_bytes: Option<u64>,
}

fn main() -> ExitCode {
    // The CPU backend allocates every operation's output: keep freed blocks for reuse.
    tgate::host_memory::keep_large_allocations();
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
fn device(backend: Backend, cap: Option<u64>) -> Result<(Device, Option<u64>), Error> {
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

/// The request the flags describe (defaults are the model family's, applied by the core).
fn request(a: &GenerateArgs) -> Result<(Request, String), Error> {
    let (noise, note) = match (&a.noise, a.seed) {
        (Some(path), _) => {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::MissingFile(format!("{}: {e}", path.display())))?;
            let name = path.display().to_string();
            let note = format!("noise from {name}");
            (NoiseSource::File { name, bytes }, note)
        }
        (None, Some(seed)) => (NoiseSource::Seed(seed), format!("seed {seed}")),
        (None, None) => {
            let seed = web_seed();
            (NoiseSource::Seed(seed), format!("seed {seed} (random)"))
        }
    };
    let mut r = Request::new(a.prompt.clone(), noise);
    r.negative_prompt = a.negative_prompt.clone();
    r.steps = a.steps;
    r.default_timesteps = a.default_timesteps;
    r.guidance = a.guidance;
    r.decoder_steps = a.decoder_steps;
    r.decoder_guidance = a.decoder_guidance;
    r.scheduler = a.scheduler.clone();
    r.width = a.width;
    r.height = a.height;
    r.gate = (!a.no_gate).then_some(GateKnobs {
        step: a.gate_step,
        sp_interval: a.sp_interval,
        fi_interval: a.fi_interval,
        warm_up: a.warm_up,
    });
    r.deep_cache = match (a.deepcache_interval, a.deepcache_branch) {
        (None, None) => None,
        (interval, branch) => {
            let d = DeepCacheConfig::tgate_default();
            Some(DeepCacheConfig {
                interval: interval.unwrap_or(d.interval),
                branch: branch.unwrap_or(d.branch),
            })
        }
    };
    Ok((r, note))
}

/// The folders of a model, as the flags give them.
struct Folders<'a> {
    src: &'a dyn ModelSource,
    prior: Option<&'a dyn ModelSource>,
    kind: ModelKind,
    variant: Variant,
}

/// Loads the model in `dtype` and runs the request, with progress bars.
fn load_and_run(
    f: &Folders,
    dtype: DType,
    device: &Device,
    request: &Request,
    noise_note: &str,
) -> Result<Output, Error> {
    let model = Pipeline::load(f.src, f.prior, Some(f.kind), f.variant, dtype, device)?;
    for part in model.loaded() {
        eprintln!("  {part}");
    }
    let plan = model.plan(request)?;
    eprintln!("{}; {noise_note}", plan.describe(&model));
    let mut bars = Bars { bar: None };
    let out = model.start(plan).run(&mut |s: &StepInfo| {
        bars.update(s);
        ControlFlow::Continue(())
    });
    bars.finish();
    out
}

/// A progress bar per stage, replaced when the next stage starts.
struct Bars {
    bar: Option<(ProgressBar, &'static str)>,
}

impl Bars {
    fn update(&mut self, s: &StepInfo) {
        if self.bar.as_ref().map(|(_, st)| *st) != Some(s.stage) {
            if let Some((b, _)) = self.bar.take() {
                b.finish_and_clear();
            }
            let b = ProgressBar::new(s.total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix:>8} {bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(s.stage);
            self.bar = Some((b, s.stage));
        }
        if let Some((b, _)) = &self.bar {
            b.set_position(s.index as u64 + 1);
            b.set_message(format!(
                "{}{} t={:.3} {:.0} ms",
                s.phase.name(),
                if s.shallow {
                    " (DeepCache: shallow)"
                } else {
                    ""
                },
                s.timestep,
                s.seconds * 1e3
            ));
        }
    }

    fn finish(&mut self) {
        if let Some((b, _)) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn generate(a: GenerateArgs) -> Result<(), Error> {
    // Where the results go is checked first: minutes of generation must not end in a write error.
    check_writable("out", &a.out)?;
    if let Some(p) = &a.save_latents {
        check_writable("save-latents", p)?;
    }
    let src = model_dir(&a.model)?;
    let kind = Pipeline::detect(&src)?;
    let (request, noise_note) = request(&a)?;
    let (device, limit) = device(a.backend, a.max_tensor_bytes)?;
    let budget = a.max_memory_bytes.or_else(available_memory);
    let src = src
        .with_max_tensor_bytes(limit)
        .with_max_memory_bytes(budget);
    let prior = a
        .prior
        .as_deref()
        .map(|p| model_dir(p).map(|s| s.with_max_tensor_bytes(limit).with_max_memory_bytes(budget)))
        .transpose()?;
    let folders = Folders {
        src: &src,
        prior: prior.as_ref().map(|p| p as &dyn ModelSource),
        kind,
        variant: Variant::parse(&a.variant)?,
    };
    eprintln!("loading {} ({}) ...", a.model.display(), kind.name());
    let mut out = load_and_run(&folders, a.dtype.dtype(), &device, &request, &noise_note)?;
    if a.dtype.dtype() == DType::F16 && !out.latents_finite()? {
        // An overflow in half precision: NaN latents would make a black image.
        eprintln!("f16 gave non-finite latents (an overflow): loading in f32 and generating again");
        out = load_and_run(&folders, DType::F32, &device, &request, &noise_note)?;
        eprintln!("generated in f32 after the f16 overflow");
    }

    if let Some(path) = &a.save_latents {
        let mut tensors = Vec::new();
        for (name, t) in &out.latents {
            tensors.push((*name, t.dims().to_vec(), read_f32(t.clone(), name)?));
        }
        let refs: Vec<(&str, &[usize], &[f32])> = tensors
            .iter()
            .map(|(n, s, d)| (*n, &s[..], &d[..]))
            .collect();
        std::fs::write(path, write_f32(&refs))
            .map_err(|e| Error::input("save_latents", format!("{}: {e}", path.display())))?;
        eprintln!("latents written to {}", path.display());
    }
    let (w, h, rgb) = to_rgb8(out.image)?;
    write_png(&a.out, w, h, &rgb)?;

    for (stage, phase, count, mean) in phase_means(&out.steps) {
        let label = match kind {
            ModelKind::StableDiffusion => phase.name().to_string(),
            ModelKind::Wuerstchen if stage == "prior" => format!("prior {}", phase.name()),
            ModelKind::Wuerstchen => stage.to_string(),
        };
        eprintln!(
            "{label:>26}: {count:>3} steps, mean {:.1} ms/step",
            mean * 1e3
        );
    }
    let shallow: Vec<f64> = out
        .steps
        .iter()
        .filter(|s| s.shallow)
        .map(|s| s.seconds)
        .collect();
    if !shallow.is_empty() {
        eprintln!(
            "{:>26}: {:>3} steps, mean {:.1} ms/step (counted in the phases above)",
            "of which DeepCache shallow",
            shallow.len(),
            shallow.iter().sum::<f64>() / shallow.len() as f64 * 1e3
        );
    }
    let total: f64 = out.steps.iter().map(|s| s.seconds).sum();
    eprintln!(
        "{:>26}: {:.2} s denoising; image written to {}",
        "total",
        total,
        a.out.display()
    );
    Ok(())
}

/// The host's available memory in bytes (Linux's `MemAvailable`), if known.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

fn web_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        % 1_000_000_007
}

fn write_png(path: &Path, w: usize, h: usize, rgb: &[u8]) -> Result<(), Error> {
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
