//! The Stable Diffusion pipeline: prompt → text embeddings → (gated) denoising loop → VAE.
//!
//! Mirrors diffusers' `StableDiffusionPipeline.__call__` (and, with a gate, `tgate`'s
//! `pipe.tgate(...)`): classifier-free guidance with the `[uncond, cond]` batch order when
//! `guidance > 1`, latents = noise × the scheduler's initial sigma, final latents decoded after
//! dividing by the VAE's `scaling_factor`.

use std::ops::ControlFlow;

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::deepcache::{DeepCache, DeepCacheConfig, DeepStep};
use crate::embeddings::guidance_scale_embedding;
use crate::error::{Error, Result};
use crate::loader::{
    check_dtype, load_weights_as, read_required, LoadedFiles, ModelSource, Variant,
};
use crate::nn::ActivationSize;
use crate::noise::{randn, Draw, StepNoise};
use crate::schedulers::{build_scheduler, SchedulerConfig, SchedulerKind};
use crate::stage::drive;
pub use crate::stage::{EnqueuedStep, Stage, StepInfo};
use crate::tgate::{Gate, GateConfig};
use crate::tokenizer::ClipTokenizer;
use crate::unet_2d_condition::{TimeTable, UNet2DConditionModel, UNetConfig};
use crate::vae::{VaeConfig, VaeDecoder};
use crate::weights::{load_persistent, Weights};

/// Where the noise comes from.
#[derive(Clone, Debug)]
pub enum Noise {
    /// Seeded noise ([`crate::noise`]): stream 0 for the latents, stream `1 + j` for step `j`.
    Seed(u64),
    /// Given tensors, as diffusers' `latents=` argument: `noise` `[1, 4, h, w]` and, for
    /// ancestral schedulers, one `[1, 4, h, w]` tensor per step, flattened in order.
    Tensors {
        noise: Vec<f32>,
        step_noise: Option<Vec<f32>>,
    },
}

/// Everything a generation needs besides the model.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is on when it is above 1.
    pub guidance: f64,
    /// `None`: the model folder's own scheduler.
    pub scheduler: Option<SchedulerKind>,
    pub width: usize,
    pub height: usize,
    /// `None`: no gate (plain diffusers).
    pub gate: Option<GateConfig>,
    /// `None`: no DeepCache. With the gate, tgate's `TgateSDDeepCacheLoader` semantics.
    pub deep_cache: Option<DeepCacheConfig>,
    pub noise: Noise,
    /// Skip the last `clip_skip` text-encoder layers (diffusers' `clip_skip`).
    pub clip_skip: usize,
}

/// The result of a denoising run.
pub struct Latents {
    /// Final latents `[1, 4, h, w]` (what diffusers returns with `output_type="latent"`).
    pub latents: Tensor<4>,
    pub steps: Vec<StepInfo>,
    pub scheduler: SchedulerKind,
}

/// A loaded Stable Diffusion 1.x / 2.x pipeline.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: VaeDecoder,
    pub scheduler_config: SchedulerConfig,
    device: Device,
    /// The device's largest buffer ([`ModelSource::max_tensor_bytes`]), if it has one.
    max_tensor_bytes: Option<u64>,
    /// The memory a generation may use at once ([`ModelSource::max_memory_bytes`]).
    max_memory_bytes: Option<u64>,
    /// Which weight files each part was read from, and why.
    pub loaded: Vec<LoadedFiles>,
}

impl StableDiffusion {
    /// Loads a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    /// `scheduler/`), computing in f32.
    pub fn load(src: &dyn ModelSource, variant: Variant, device: &Device) -> Result<Self> {
        Self::load_as(src, variant, DType::F32, device)
    }

    /// [`Self::load`] with the parameters and activations in `dtype` (`F32`, or `F16` where the
    /// device supports it: see [`check_dtype`]); norms and softmax still compute in f32, and the
    /// scheduler works on f32 latents.
    pub fn load_as(
        src: &dyn ModelSource,
        variant: Variant,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_dtype(dtype, device)?;
        let mut loaded = Vec::new();
        let mut weights = |dir: &str, stem: &str| -> Result<Weights> {
            let w = load_weights_as(src, dir, stem, variant, dtype, device)?;
            loaded.push(LoadedFiles::of(dir, &w));
            Ok(w)
        };
        let tokenizer = ClipTokenizer::from_folder(src, "tokenizer")?;
        // Every config first: inconsistent folders fail before gigabytes of weights are read.
        let text_cfg = ClipTextConfig::from_json(
            "text_encoder/config.json",
            &read_required(src, "text_encoder/config.json")?,
        )?;
        let unet_cfg =
            UNetConfig::from_json("unet/config.json", &read_required(src, "unet/config.json")?)?;
        let vae_cfg =
            VaeConfig::from_json("vae/config.json", &read_required(src, "vae/config.json")?)?;
        let scheduler_config = SchedulerConfig::from_json(
            "scheduler/scheduler_config.json",
            &read_required(src, "scheduler/scheduler_config.json")?,
        )?;
        let (unet_in, unet_out, latent) = (
            unet_cfg.in_channels,
            unet_cfg.out_channels,
            vae_cfg.latent_channels,
        );
        if unet_in != unet_out || unet_out != latent {
            return Err(Error::config(
                "unet/config.json",
                format!(
                    "in_channels {unet_in}, out_channels {unet_out} and the VAE's latent_channels {latent} must agree \
                     (inpainting and depth UNets are not supported)"
                ),
            ));
        }
        if text_cfg.hidden_size != unet_cfg.cross_attention_dim {
            return Err(Error::config(
                "unet/config.json",
                format!(
                    "cross_attention_dim {} differs from the text encoder's hidden_size {}",
                    unet_cfg.cross_attention_dim, text_cfg.hidden_size
                ),
            ));
        }
        // Then the weights, one component at a time (each file's bytes are dropped after use),
        // each parameter in a device buffer of its own size.
        let (text_encoder, unet, vae) = load_persistent(device, || -> Result<_> {
            let text_encoder = ClipTextModel::load(&text_cfg, &weights("text_encoder", "model")?)?;
            let unet_w = weights("unet", "diffusion_pytorch_model")?;
            let unet = UNet2DConditionModel::load(&unet_cfg, &unet_w)?;
            drop(unet_w);
            let vae_w = weights("vae", "diffusion_pytorch_model")?;
            let vae = VaeDecoder::load(&vae_cfg, &vae_w)?;
            Ok((text_encoder, unet, vae))
        })?;
        Ok(StableDiffusion {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device: device.clone(),
            max_tensor_bytes: src.max_tensor_bytes(),
            max_memory_bytes: src.max_memory_bytes(),
            loaded,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The scheduler the model folder names.
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        self.scheduler_config.class_kind().ok_or_else(|| {
            Error::config(
                "scheduler/scheduler_config.json",
                "unknown `_class_name`; pick a scheduler by name",
            )
        })
    }

    /// Default image size: the UNet's `sample_size` × 8.
    pub fn default_size(&self) -> usize {
        self.unet.config().sample_size * 8
    }

    /// Text embeddings `[1, 77, d]` of one prompt.
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<Tensor<3>> {
        if self.text_encoder.config().use_attention_mask {
            let (ids, mask) = self.tokenizer.encode_with_mask(prompt)?;
            return self
                .text_encoder
                .forward(&[ids], Some(&[mask]), clip_skip, &self.device);
        }
        let ids = self.tokenizer.encode(prompt)?;
        self.text_encoder
            .forward(&[ids], None, clip_skip, &self.device)
    }

    /// Checks parameters before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        validate(p)?;
        let largest = self.largest_activation(p);
        largest.check_memory(self.max_memory_bytes, p.width, p.height)?;
        largest.check(self.max_tensor_bytes, p.width, p.height)
    }

    /// The largest activation (attention scores excepted, which are split to fit) of a
    /// generation with `p`: in the UNet (batch 2 with guidance) or the VAE decoder.
    pub fn largest_activation(&self, p: &GenerateParams) -> ActivationSize {
        let (h, w) = (p.height / 8, p.width / 8);
        let batch = if classifier_free_guidance(&self.unet, p.guidance) {
            2
        } else {
            1
        };
        self.unet
            .largest_activation(batch, h, w)
            .max(self.vae.largest_activation(h, w))
    }

    /// Runs the denoising loop. `on_step` is called after every iteration and may stop the run
    /// (returning `ControlFlow::Break`), which yields [`Error::Cancelled`].
    pub fn generate_latents(
        &self,
        p: &GenerateParams,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<Latents> {
        self.validate(p)?;
        let cond = self.encode_prompt(&p.prompt, p.clip_skip)?;
        let uncond = if classifier_free_guidance(&self.unet, p.guidance) {
            Some(self.encode_prompt(&p.negative_prompt, p.clip_skip)?)
        } else {
            None
        };
        denoise(&self.unet, &self.scheduler_config, p, cond, uncond, on_step)
    }

    /// Decodes final latents to an image `[1, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        self.vae
            .decode_latents(latents)
            .div_scalar(2.0)
            .add_scalar(0.5)
            .clamp(0.0, 1.0)
    }
}

/// Whether a generation runs classifier-free guidance (two batches), as diffusers'
/// `do_classifier_free_guidance`: a scale above 1 on a UNet without a guidance embedding.
/// Latent-consistency UNets (`time_cond_proj_dim`) take the scale through `timestep_cond` and
/// run one batch.
pub fn classifier_free_guidance(unet: &UNet2DConditionModel, guidance: f64) -> bool {
    guidance > 1.0 && unet.config().time_cond_proj_dim.is_none()
}

/// Most steps a run may ask for (far beyond any schedule in use; keeps sizes bounded).
pub const MAX_STEPS: usize = 1000;

/// Checks generation parameters before any work is done.
pub fn validate(p: &GenerateParams) -> Result<()> {
    if p.steps == 0 || p.steps > MAX_STEPS {
        return Err(Error::param(
            "steps",
            format!("must be in 1..={MAX_STEPS}, got {}", p.steps),
        ));
    }
    for (name, v) in [("width", p.width), ("height", p.height)] {
        if v == 0 || v % 8 != 0 || v > 16384 {
            return Err(Error::param(
                name,
                format!("must be a positive multiple of 8 up to 16384, got {v}"),
            ));
        }
    }
    if !p.guidance.is_finite() {
        return Err(Error::param("guidance", "must be a finite number"));
    }
    if let Some(g) = &p.gate {
        g.validate(p.steps)?;
    }
    if let Some(d) = &p.deep_cache {
        d.validate()?;
    }
    Ok(())
}

/// The denoising loop on text embeddings: `cond` `[1, 77, d]` and, when guidance is on,
/// `uncond` (the negative prompt's). The prompt fields of `p` are not used here.
///
/// Runs natively, one iteration enqueued ahead of the one waited for ([`drive`]); see
/// [`Denoiser`] for driving the loop yourself (e.g. with asynchronous waits in a browser).
pub fn denoise(
    unet: &UNet2DConditionModel,
    scheduler_config: &SchedulerConfig,
    p: &GenerateParams,
    cond: Tensor<3>,
    uncond: Option<Tensor<3>>,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<Latents> {
    let mut d = Denoiser::new(unet, scheduler_config, p, cond, uncond)?;
    let infos = drive(&mut d, on_step)?;
    Ok(Latents {
        latents: d.latents().clone(),
        steps: infos,
        scheduler: d.scheduler_kind(),
    })
}

/// Stable Diffusion's denoising loop as a [`Stage`]: [`Denoiser::step`] enqueues one iteration
/// on the device without waiting for it, so the caller decides how to wait (blocking natively,
/// an awaited readback in a browser) and when to stop.
pub struct Denoiser<'a> {
    unet: &'a UNet2DConditionModel,
    scheduler: Box<dyn crate::schedulers::Scheduler>,
    kind: SchedulerKind,
    timesteps: Vec<f64>,
    gate: Gate,
    cond: Tensor<3>,
    both: Option<Tensor<3>>,
    guidance: f64,
    /// The UNet's time input of every iteration (with the guidance embedding of a
    /// latent-consistency UNet), made once per generation.
    time: TimeTable,
    /// DeepCache's schedule and kept feature (`None`: every step runs the whole UNet).
    deep: Option<DeepCache>,
    latents: Tensor<4>,
    shape: [usize; 4],
    step_noise: Option<StepNoise>,
    next: usize,
}

impl<'a> Denoiser<'a> {
    /// Validates `p`, draws or checks the noise and prepares the scheduler and the gate.
    pub fn new(
        unet: &'a UNet2DConditionModel,
        scheduler_config: &SchedulerConfig,
        p: &GenerateParams,
        cond: Tensor<3>,
        uncond: Option<Tensor<3>>,
    ) -> Result<Self> {
        validate(p)?;
        Self::new_validated(unet, scheduler_config, p, cond, uncond)
    }

    /// [`Self::new`] for parameters already checked by [`validate`].
    pub(crate) fn new_validated(
        unet: &'a UNet2DConditionModel,
        scheduler_config: &SchedulerConfig,
        p: &GenerateParams,
        cond: Tensor<3>,
        uncond: Option<Tensor<3>>,
    ) -> Result<Self> {
        let device = cond.device();
        let kind = match p.scheduler {
            Some(k) => k,
            None => scheduler_config.class_kind().ok_or_else(|| {
                Error::config(
                    "scheduler/scheduler_config.json",
                    "unknown `_class_name`; pick a scheduler by name",
                )
            })?,
        };
        let scheduler = build_scheduler(scheduler_config, kind, p.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let gate = Gate::new(p.gate, p.steps, timesteps.len(), scheduler.order())?;
        let shape = [1, unet.config().in_channels, p.height / 8, p.width / 8];
        let numel: usize = shape.iter().product();
        let needs_noise = scheduler.needs_noise();
        let (noise, step_noise): (Vec<f32>, Option<Draw>) = match &p.noise {
            Noise::Seed(seed) => {
                let seed = *seed;
                (
                    randn(seed, 0, numel),
                    Some(Box::new(move |j| randn(seed, 1 + j as u64, numel))),
                )
            }
            Noise::Tensors { noise, step_noise } => {
                if noise.len() != numel {
                    return Err(Error::input(
                        "noise",
                        format!("has {} values, expected shape {shape:?}", noise.len()),
                    ));
                }
                let given = step_noise.as_ref().map(|s| s.len()).unwrap_or(0);
                if needs_noise && given != timesteps.len() * numel {
                    return Err(Error::input(
                        "step_noise",
                        format!(
                            "{} needs {} tensors of shape {shape:?}, got {} values",
                            kind.name(),
                            timesteps.len(),
                            given
                        ),
                    ));
                }
                let steps = step_noise.clone().filter(|_| needs_noise).map(|s| {
                    Box::new(move |j: usize| s[j * numel..(j + 1) * numel].to_vec()) as Draw
                });
                (noise.clone(), steps)
            }
        };
        let latents = Tensor::<4>::from_data(TensorData::new(noise, shape), &device)
            .mul_scalar(scheduler.init_noise_sigma());
        let both = uncond
            .filter(|_| classifier_free_guidance(unet, p.guidance))
            .map(|u| Tensor::cat(vec![u, cond.clone()], 0));
        let timestep_cond = unet
            .config()
            .time_cond_proj_dim
            .map(|dim| guidance_scale_embedding(&[p.guidance - 1.0], dim, &device));
        let time = unet.time_table(&timesteps, timestep_cond.as_ref(), &device);
        let step_noise = step_noise.filter(|_| needs_noise).map(|f| {
            let cap = StepNoise::up_front_cap(unet.max_tensor_bytes());
            StepNoise::within(f, timesteps.len(), shape, &device, cap)
        });
        Ok(Denoiser {
            unet,
            scheduler,
            kind,
            timesteps,
            gate,
            cond,
            both,
            guidance: p.guidance,
            time,
            deep: p.deep_cache.map(DeepCache::new).transpose()?,
            latents,
            shape,
            step_noise,
            next: 0,
        })
    }

    /// Number of iterations.
    pub fn total(&self) -> usize {
        self.timesteps.len()
    }

    pub fn scheduler_kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The current latents (after the last enqueued iteration).
    pub fn latents(&self) -> &Tensor<4> {
        &self.latents
    }

    /// Enqueues the next iteration; `None` when all are done.
    pub fn step(&mut self) -> Result<Option<EnqueuedStep>> {
        let i = self.next;
        let Some(&t) = self.timesteps.get(i) else {
            return Ok(None);
        };
        self.next += 1;
        if let Some(deep) = self.deep.as_mut().filter(|_| self.gate.at_gate(i)) {
            deep.restart();
        }
        let plan = self.gate.begin_iteration(i, self.both.is_some());
        let latents = self.latents.clone();
        let (input, context) = match (&self.both, plan.guidance) {
            (Some(both), true) => (Tensor::cat(vec![latents.clone(), latents.clone()], 0), both),
            _ => (latents.clone(), &self.cond),
        };
        let input = self.scheduler.scale_model_input(input, i);
        // DeepCache counts steps by the timestep's (first) place in the schedule.
        let index = self.timesteps.iter().position(|&x| x == t).unwrap_or(i);
        let batch = input.dims()[0];
        let unet = self.unet;
        let deep = self.deep.as_mut().and_then(|d| {
            let place = unet.branch_place(d.config());
            (!unet.branch_skips_nothing(place)).then(|| d.step(index, place, batch))
        });
        let shallow = matches!(deep, Some(DeepStep::Shallow { .. }));
        let time = unet.time_at(&self.time, i).ok_or_else(|| {
            Error::param(
                "steps",
                format!("internal: the time table has no row for iteration {i}"),
            )
        })?;
        let mut pred = unet.forward_time(input, &time, context, self.gate.cache(), deep);
        if plan.guidance {
            let uncond = pred.clone().narrow(0, 0, 1);
            let text = pred.narrow(0, 1, 1);
            pred = uncond.clone() + (text - uncond).mul_scalar(self.guidance);
        }
        let noise = self
            .step_noise
            .as_ref()
            .map(|n| n.get(i, self.shape, &latents.device()));
        self.latents = self.scheduler.step(pred, i, latents, noise)?;
        Ok(Some(EnqueuedStep {
            stage: "unet",
            index: i,
            total: self.timesteps.len(),
            timestep: t,
            phase: plan.phase,
            shallow,
        }))
    }
}

impl Stage for Denoiser<'_> {
    fn name(&self) -> &'static str {
        "unet"
    }
    fn total(&self) -> usize {
        Denoiser::total(self)
    }
    fn latents(&self) -> &Tensor<4> {
        Denoiser::latents(self)
    }
    fn step(&mut self) -> Result<Option<EnqueuedStep>> {
        Denoiser::step(self)
    }
}

/// Converts a `[1, 3, H, W]` image in `[0, 1]` to interleaved 8-bit RGB (a host readback).
pub fn to_rgb8(image: Tensor<4>) -> Result<(usize, usize, Vec<u8>)> {
    let [_, _, h, w] = image.dims();
    let data = crate::text_to_image::read_f32(image, "the image")?;
    Ok((w, h, crate::text_to_image::interleave(&data, h, w, false)))
}
