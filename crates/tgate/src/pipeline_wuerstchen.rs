//! The Würstchen v2 pipeline: prompt → Stage C (prior, optionally gated) → Stage B (decoder) →
//! Stage A (Paella) → image.
//!
//! Mirrors diffusers' `WuerstchenCombinedPipeline` (`WuerstchenPriorPipeline` then
//! `WuerstchenDecoderPipeline`): prior latent size `ceil(size / 42.67)`, guidance with the
//! `[cond, uncond]` batch order and `torch.lerp`, prior output `latents · 42 − 1`, decoder latent
//! size `int(h · 10.67)`, a zero image embedding for the decoder's unconditional batch, and
//! `0.3764 · latents` into Stage A. Text encoders always get the tokenizer's padding mask.
//!
//! The gate (T-GATE for Stage C) is described in [`crate::tgate::AttentionCache::text_kv_attention`].

use std::ops::ControlFlow;

use burn::tensor::{DType, Device, Tensor, TensorData};
use serde_json::Value;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::error::{Error, Result};
use crate::loader::{
    check_dtype, load_weights_as, read_required, tighter_limit, LoadedFiles, ModelSource, Variant,
};
use crate::nn::ActivationSize;
use crate::noise::{randn, Draw, StepNoise};
use crate::paella_vq_model::{PaellaConfig, PaellaDecoder};
use crate::pipeline::MAX_STEPS;
use crate::schedulers::ddpm_wuerstchen::{DdpmWuerstchenConfig, DdpmWuerstchenScheduler};
use crate::stage::{EnqueuedStep, Stage, StepInfo};
use crate::tgate::{Gate, GateConfig, Phase};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{load_persistent, Weights};
use crate::wuerstchen_common::RTable;
use crate::wuerstchen_diffnext::{DiffNeXtConditioning, DiffNeXtConfig, WuerstchenDiffNeXt};
use crate::wuerstchen_prior::{PriorConfig, WuerstchenPrior};

/// Where the noise comes from.
#[derive(Clone, Debug)]
pub enum WuerstchenNoise {
    /// Seeded noise ([`crate::noise`]): prior latents stream 0, prior step `j` stream `1 + j`;
    /// decoder latents stream `2^32`, decoder step `j` stream `2^32 + 1 + j`.
    Seed(u64),
    /// Given tensors (flattened): `prior_noise` `[1, 16, h, w]`, `prior_step_noise`
    /// `[prior_steps, 1, 16, h, w]`, `decoder_noise` `[1, 4, H', W']`, `decoder_step_noise`
    /// `[decoder_steps, 1, 4, H', W']`. The schedulers use one step tensor per step, the last
    /// multiplied by zero as in diffusers.
    Tensors {
        prior_noise: Vec<f32>,
        prior_step_noise: Vec<f32>,
        decoder_noise: Vec<f32>,
        decoder_step_noise: Vec<f32>,
    },
}

const DECODER_STREAM: u64 = 1 << 32;

/// Everything a Würstchen generation needs besides the model.
#[derive(Clone, Debug)]
pub struct WuerstchenParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    /// Prior steps (`prior_num_inference_steps`), used when `prior_timesteps` is `None`.
    pub prior_steps: usize,
    /// Explicit prior timesteps from 1 towards 0 (e.g. [`default_stage_c_timesteps`](crate::schedulers::ddpm_wuerstchen::default_stage_c_timesteps)).
    pub prior_timesteps: Option<Vec<f64>>,
    /// Prior guidance; on above 1.
    pub prior_guidance: f64,
    pub decoder_steps: usize,
    /// Decoder guidance; on above 1 (off by default, as diffusers).
    pub decoder_guidance: f64,
    /// Steps of the prior's semantics-planning phase; `None` = no gate (plain diffusers).
    pub gate_step: Option<usize>,
    pub noise: WuerstchenNoise,
}

impl WuerstchenParams {
    /// diffusers' `WuerstchenCombinedPipeline` defaults: 512×512, prior 60 steps at guidance 4,
    /// decoder 12 steps without guidance; no gate.
    pub fn new(prompt: impl Into<String>, noise: WuerstchenNoise) -> Self {
        WuerstchenParams {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            prior_steps: 60,
            prior_timesteps: None,
            prior_guidance: 4.0,
            decoder_steps: 12,
            decoder_guidance: 0.0,
            gate_step: None,
            noise,
        }
    }

    /// Number of prior steps these parameters run.
    pub fn prior_step_count(&self) -> usize {
        match &self.prior_timesteps {
            Some(t) => t.len().saturating_sub(1),
            None => self.prior_steps,
        }
    }
}

/// The output of one stage.
pub struct StageOutput {
    /// Prior: the image embedding after `· latent_mean − latent_std`; decoder: the latents
    /// before Stage A's scale factor.
    pub latents: Tensor<4>,
    pub steps: Vec<StepInfo>,
}

/// Pipeline-level numbers that diffusers keeps in `model_index.json`.
#[derive(Clone, Copy, Debug)]
pub struct WuerstchenSettings {
    pub latent_mean: f64,
    pub latent_std: f64,
    pub resolution_multiple: f64,
    pub latent_dim_scale: f64,
}

impl Default for WuerstchenSettings {
    fn default() -> Self {
        WuerstchenSettings {
            latent_mean: 42.0,
            latent_std: 1.0,
            resolution_multiple: 42.67,
            latent_dim_scale: 10.67,
        }
    }
}

/// A loaded Würstchen v2 pipeline.
pub struct Wuerstchen {
    pub prior_tokenizer: ClipTokenizer,
    pub prior_text_encoder: ClipTextModel,
    pub prior: WuerstchenPrior,
    pub prior_scheduler: DdpmWuerstchenConfig,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub decoder: WuerstchenDiffNeXt,
    pub decoder_scheduler: DdpmWuerstchenConfig,
    pub vqgan: PaellaDecoder,
    pub settings: WuerstchenSettings,
    device: Device,
    /// The device's largest buffer ([`ModelSource::max_tensor_bytes`]), if it has one.
    max_tensor_bytes: Option<u64>,
    /// The memory a generation may use at once ([`ModelSource::max_memory_bytes`]).
    max_memory_bytes: Option<u64>,
    /// Which weight files each part was read from, and why.
    pub loaded: Vec<LoadedFiles>,
}

fn model_index(bytes: Option<&[u8]>) -> Result<Option<Value>> {
    match bytes {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|e| Error::config("model_index.json", e.to_string())),
    }
}

fn number(index: &Option<Value>, key: &str, default: f64) -> Result<f64> {
    match index.as_ref().and_then(|v| v.get(key)) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| Error::config("model_index.json", format!("`{key}` must be a number"))),
    }
}

impl WuerstchenSettings {
    /// Reads the pipeline numbers from the prior's and the decoder's `model_index.json` (the
    /// same file in a combined folder; absent files and keys take diffusers' defaults).
    pub fn from_model_index(prior: Option<&[u8]>, decoder: Option<&[u8]>) -> Result<Self> {
        let prior_index = model_index(prior)?;
        let index = model_index(decoder)?;
        let settings = WuerstchenSettings {
            latent_mean: number(&prior_index, "latent_mean", 42.0)?,
            latent_std: number(&prior_index, "latent_std", 1.0)?,
            resolution_multiple: number(&prior_index, "resolution_multiple", 42.67)?,
            latent_dim_scale: number(&index, "latent_dim_scale", 10.67)?,
        };
        if !(1.0..=1024.0).contains(&settings.resolution_multiple)
            || !(0.01..=64.0).contains(&settings.latent_dim_scale)
        {
            return Err(Error::config(
                "model_index.json",
                format!(
                    "resolution_multiple {} must be in 1..=1024 and latent_dim_scale {} in 0.01..=64",
                    settings.resolution_multiple, settings.latent_dim_scale
                ),
            ));
        }
        Ok(settings)
    }
}

/// Which Würstchen folder a source holds, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WuerstchenLayout {
    /// `WuerstchenCombinedPipeline.save_pretrained`: decoder parts plus `prior_*` subfolders.
    Combined,
    /// A `WuerstchenDecoderPipeline` folder (the prior comes from a second folder).
    Decoder,
    /// A `WuerstchenPriorPipeline` folder.
    Prior,
}

impl WuerstchenLayout {
    /// Recognises a folder by its subfolders (not by class paths in `model_index.json`, which
    /// diffusers itself no longer resolves for these deprecated pipelines).
    pub fn detect(src: &dyn ModelSource) -> Result<Option<Self>> {
        let has = |p: &str| src.read(p).map(|b| b.is_some());
        Ok(
            if has("prior_prior/config.json")? && has("decoder/config.json")? {
                Some(WuerstchenLayout::Combined)
            } else if has("decoder/config.json")? && has("vqgan/config.json")? {
                Some(WuerstchenLayout::Decoder)
            } else if has("prior/config.json")? {
                Some(WuerstchenLayout::Prior)
            } else {
                None
            },
        )
    }
}

/// The prior's folder, its subfolder prefix and the prior model's folder, for a Würstchen
/// folder and an optional separate prior folder.
fn prior_folder<'s>(
    src: &'s dyn ModelSource,
    prior: Option<&'s dyn ModelSource>,
) -> Result<(&'s dyn ModelSource, &'static str, &'static str)> {
    let layout = WuerstchenLayout::detect(src)?;
    Ok(match (layout, prior) {
            (Some(WuerstchenLayout::Combined), None) => (src, "prior_", "prior_prior"),
            (Some(WuerstchenLayout::Decoder), Some(p)) => {
                if WuerstchenLayout::detect(p)? != Some(WuerstchenLayout::Prior) {
                    return Err(Error::MissingFile(format!(
                        "prior/config.json in {} (not a Würstchen prior pipeline folder)",
                        p.describe()
                    )));
                }
                (p, "", "prior")
            }
            (Some(WuerstchenLayout::Combined), Some(_)) => {
                return Err(Error::param(
                    "prior",
                    "the model folder already contains the prior (prior_* subfolders)",
                ))
            }
            (Some(WuerstchenLayout::Decoder), None) => {
                return Err(Error::param(
                    "prior",
                    format!(
                        "{} is a Würstchen decoder pipeline; also give the prior pipeline folder",
                        src.describe()
                    ),
                ))
            }
            (Some(WuerstchenLayout::Prior), _) => {
                return Err(Error::param(
                    "model",
                    format!(
                        "{} is a Würstchen prior pipeline; give the decoder pipeline folder as the model and this one as the prior",
                        src.describe()
                    ),
                ))
            }
            (None, _) => {
                return Err(Error::MissingFile(format!(
                    "decoder/config.json and vqgan/config.json in {} (not a Würstchen folder)",
                    src.describe()
                )))
            }
        })
}

/// Every config of a Würstchen folder pair, checked against each other.
struct Configs {
    prior_text: ClipTextConfig,
    prior: PriorConfig,
    prior_scheduler: DdpmWuerstchenConfig,
    text: ClipTextConfig,
    decoder: DiffNeXtConfig,
    decoder_scheduler: DdpmWuerstchenConfig,
    vqgan: PaellaConfig,
}

impl Configs {
    fn read(
        src: &dyn ModelSource,
        prior_src: &dyn ModelSource,
        prefix: &str,
        prior_dir: &str,
    ) -> Result<Self> {
        let p = |name: &str| format!("{prefix}{name}");
        let prior_text_path = format!("{}/config.json", p("text_encoder"));
        let prior_text_cfg = ClipTextConfig::from_json(
            &prior_text_path,
            &read_required(prior_src, &prior_text_path)?,
        )?;
        let prior_cfg_path = format!("{prior_dir}/config.json");
        let prior_cfg =
            PriorConfig::from_json(&prior_cfg_path, &read_required(prior_src, &prior_cfg_path)?)?;
        let prior_sched_path = format!("{}/scheduler_config.json", p("scheduler"));
        let prior_scheduler = DdpmWuerstchenConfig::from_json(
            &prior_sched_path,
            &read_required(prior_src, &prior_sched_path)?,
        )?;
        let text_cfg = ClipTextConfig::from_json(
            "text_encoder/config.json",
            &read_required(src, "text_encoder/config.json")?,
        )?;
        let decoder_cfg = DiffNeXtConfig::from_json(
            "decoder/config.json",
            &read_required(src, "decoder/config.json")?,
        )?;
        let decoder_scheduler = DdpmWuerstchenConfig::from_json(
            "scheduler/scheduler_config.json",
            &read_required(src, "scheduler/scheduler_config.json")?,
        )?;
        let vqgan_cfg = PaellaConfig::from_json(
            "vqgan/config.json",
            &read_required(src, "vqgan/config.json")?,
        )?;
        let checks = [
            (
                prior_text_cfg.hidden_size,
                prior_cfg.c_cond,
                &prior_cfg_path,
                "c_cond",
                "the prior text encoder's hidden_size",
            ),
            (
                text_cfg.hidden_size,
                decoder_cfg.clip_embd,
                &"decoder/config.json".to_string(),
                "clip_embd",
                "the text encoder's hidden_size",
            ),
            (
                prior_cfg.c_in,
                decoder_cfg.effnet_embd,
                &"decoder/config.json".to_string(),
                "effnet_embd",
                "the prior's c_in",
            ),
            (
                vqgan_cfg.latent_channels,
                decoder_cfg.c_out,
                &"decoder/config.json".to_string(),
                "c_out",
                "the VQ model's latent_channels",
            ),
            (
                decoder_cfg.c_in,
                decoder_cfg.c_out,
                &"decoder/config.json".to_string(),
                "c_in",
                "c_out",
            ),
        ];
        for (a, b, file, key, what) in checks {
            if a != b {
                return Err(Error::config(
                    file.as_str(),
                    format!("{key} {b} differs from {what} {a}"),
                ));
            }
        }
        Ok(Configs {
            prior_text: prior_text_cfg,
            prior: prior_cfg,
            prior_scheduler,
            text: text_cfg,
            decoder: decoder_cfg,
            decoder_scheduler,
            vqgan: vqgan_cfg,
        })
    }
}

impl Wuerstchen {
    /// Loads a combined folder (`prior = None`), or a decoder pipeline folder plus a prior
    /// pipeline folder (the two-repository layout: `warp-ai/wuerstchen` + `warp-ai/wuerstchen-prior`),
    /// computing in f32.
    pub fn load(
        src: &dyn ModelSource,
        prior: Option<&dyn ModelSource>,
        variant: Variant,
        device: &Device,
    ) -> Result<Self> {
        Self::load_as(src, prior, variant, DType::F32, device)
    }

    /// [`Self::load`] with every stage's parameters and activations in `dtype` (`F32`, or `F16`
    /// where the device supports it: see [`check_dtype`]); norms and softmax still compute in
    /// f32, and the schedulers work on f32 latents.
    pub fn load_as(
        src: &dyn ModelSource,
        prior: Option<&dyn ModelSource>,
        variant: Variant,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_dtype(dtype, device)?;
        let mut loaded = Vec::new();
        let mut weights = |s: &dyn ModelSource, dir: &str, stem: &str| -> Result<Weights> {
            let w = load_weights_as(s, dir, stem, variant, dtype, device)?;
            loaded.push(LoadedFiles::of(dir, &w));
            Ok(w)
        };
        let (prior_src, prefix, prior_dir) = prior_folder(src, prior)?;
        let p = |name: &str| format!("{prefix}{name}");
        // Configs first: a malformed folder fails before any weights are read.
        let cfg = Configs::read(src, prior_src, prefix, prior_dir)?;
        let settings = WuerstchenSettings::from_model_index(
            prior_src.read("model_index.json")?.as_deref(),
            src.read("model_index.json")?.as_deref(),
        )?;

        let prior_tokenizer = ClipTokenizer::from_folder(prior_src, &p("tokenizer"))?;
        let decoder_tokenizer = ClipTokenizer::from_folder(src, "tokenizer")?;
        // Weights, one component at a time, each parameter in a device buffer of its own size.
        let (prior_text_encoder, prior, text_encoder, decoder, vqgan) =
            load_persistent(device, || -> Result<_> {
                let prior_text_encoder = ClipTextModel::load(
                    &cfg.prior_text,
                    &weights(prior_src, &p("text_encoder"), "model")?,
                )?;
                let prior = WuerstchenPrior::load(
                    &cfg.prior,
                    &weights(prior_src, prior_dir, "diffusion_pytorch_model")?,
                )?;
                let text_encoder =
                    ClipTextModel::load(&cfg.text, &weights(src, "text_encoder", "model")?)?;
                let decoder = WuerstchenDiffNeXt::load(
                    &cfg.decoder,
                    &weights(src, "decoder", "diffusion_pytorch_model")?,
                )?;
                let vqgan = PaellaDecoder::load(
                    &cfg.vqgan,
                    &weights(src, "vqgan", "diffusion_pytorch_model")?,
                )?;
                Ok((prior_text_encoder, prior, text_encoder, decoder, vqgan))
            })?;
        let limits = tighter_limit(src.max_tensor_bytes(), prior_src.max_tensor_bytes());
        Ok(Wuerstchen {
            prior_tokenizer,
            prior_text_encoder,
            prior,
            prior_scheduler: cfg.prior_scheduler,
            tokenizer: decoder_tokenizer,
            text_encoder,
            decoder,
            decoder_scheduler: cfg.decoder_scheduler,
            vqgan,
            settings,
            device: device.clone(),
            max_tensor_bytes: limits,
            max_memory_bytes: tighter_limit(src.max_memory_bytes(), prior_src.max_memory_bytes()),
            loaded,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Stage C latent `[1, c_in, ceil(h / 42.67), ceil(w / 42.67)]` for an image size.
    pub fn prior_shape(&self, width: usize, height: usize) -> [usize; 4] {
        let m = self.settings.resolution_multiple;
        [
            1,
            self.prior.config().c_in,
            (height as f64 / m).ceil() as usize,
            (width as f64 / m).ceil() as usize,
        ]
    }

    /// Stage B latent `[1, 4, int(h · 10.67), int(w · 10.67)]` for a Stage C latent size.
    pub fn decoder_shape(&self, prior_h: usize, prior_w: usize) -> [usize; 4] {
        let s = self.settings.latent_dim_scale;
        [
            1,
            self.decoder.config().c_in,
            (prior_h as f64 * s) as usize,
            (prior_w as f64 * s) as usize,
        ]
    }

    /// The image size Stage A produces for a generation of `width × height` (diffusers returns
    /// this size, which can differ slightly from the request).
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        let [_, _, ph, pw] = self.prior_shape(width, height);
        let [_, _, dh, dw] = self.decoder_shape(ph, pw);
        let up = self.vqgan.config().up_down_scale_factor << (self.vqgan.config().levels - 1);
        (dw * up, dh * up)
    }

    /// Checks parameters before any work is done.
    pub fn validate(&self, p: &WuerstchenParams) -> Result<()> {
        for (name, v) in [("width", p.width), ("height", p.height)] {
            if v == 0 || v > 16384 {
                return Err(Error::param(name, format!("must be in 1..=16384, got {v}")));
            }
        }
        match &p.prior_timesteps {
            Some(t) => {
                DdpmWuerstchenScheduler::with_timesteps(self.prior_scheduler, t)?;
            }
            None => check_steps("steps", p.prior_steps)?,
        }
        check_steps("decoder_steps", p.decoder_steps)?;
        for (name, g) in [
            ("guidance", p.prior_guidance),
            ("decoder_guidance", p.decoder_guidance),
        ] {
            if !g.is_finite() {
                return Err(Error::param(name, "must be a finite number"));
            }
        }
        let steps = p.prior_step_count();
        if let Some(gs) = p.gate_step {
            GateConfig::original(gs).validate(steps)?;
        }
        let [_, _, ph, pw] = self.prior_shape(p.width, p.height);
        let [_, _, dh, dw] = self.decoder_shape(ph, pw);
        let k = self.decoder.config().downscale();
        if dh % k != 0 || dw % k != 0 || dh == 0 || dw == 0 {
            return Err(Error::param(
                "width/height",
                format!(
                    "{}x{} gives a Stage C latent of {pw}x{ph} and a Stage B latent of {dw}x{dh}; Stage B needs \
                     multiples of {k} (512, 768 and 1024 work)",
                    p.width, p.height
                ),
            ));
        }
        if let WuerstchenNoise::Tensors {
            prior_noise,
            prior_step_noise,
            decoder_noise,
            decoder_step_noise,
        } = &p.noise
        {
            let prior_shape = self.prior_shape(p.width, p.height);
            let decoder_shape = self.decoder_shape(ph, pw);
            check_noise("prior_noise", prior_noise.len(), 1, prior_shape)?;
            check_noise(
                "prior_step_noise",
                prior_step_noise.len(),
                steps,
                prior_shape,
            )?;
            check_noise("decoder_noise", decoder_noise.len(), 1, decoder_shape)?;
            check_noise(
                "decoder_step_noise",
                decoder_step_noise.len(),
                p.decoder_steps,
                decoder_shape,
            )?;
        }
        let largest = self.largest_activation(p);
        largest.check_memory(self.max_memory_bytes, p.width, p.height)?;
        largest.check(self.max_tensor_bytes, p.width, p.height)
    }

    /// The largest activation (attention scores excepted, which are split to fit) of a
    /// generation with `p`, over the three stages (batch 2 where a stage uses guidance).
    pub fn largest_activation(&self, p: &WuerstchenParams) -> ActivationSize {
        let batch = |g: f64| if g > 1.0 { 2 } else { 1 };
        let [_, _, ph, pw] = self.prior_shape(p.width, p.height);
        let [_, _, dh, dw] = self.decoder_shape(ph, pw);
        self.prior
            .largest_activation(batch(p.prior_guidance), ph, pw)
            .max(
                self.decoder
                    .largest_activation(batch(p.decoder_guidance), dh, dw),
            )
            .max(self.vqgan.largest_activation(dh, dw))
    }

    fn encode(&self, tok: &ClipTokenizer, te: &ClipTextModel, text: &str) -> Result<Tensor<3>> {
        let (ids, mask) = tok.encode_with_mask(text)?;
        te.forward(&[ids], Some(&[mask]), 0, &self.device)
    }

    /// Prior text embeddings of the prompt (and, with guidance, the negative prompt).
    fn prior_text(&self, p: &WuerstchenParams) -> Result<(Tensor<3>, Option<Tensor<3>>)> {
        let cond = self.encode(&self.prior_tokenizer, &self.prior_text_encoder, &p.prompt)?;
        let uncond = if p.prior_guidance > 1.0 {
            Some(self.encode(
                &self.prior_tokenizer,
                &self.prior_text_encoder,
                &p.negative_prompt,
            )?)
        } else {
            None
        };
        Ok((cond, uncond))
    }

    /// Stage C: text → image embedding (after `· latent_mean − latent_std`), gated when
    /// `p.gate_step` is set. `on_step` may stop the run ([`Error::Cancelled`]).
    pub fn generate_prior(
        &self,
        p: &WuerstchenParams,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<StageOutput> {
        let out = drive(self.prior_denoiser(p)?, on_step)?;
        Ok(StageOutput {
            latents: self.finish_prior(out.latents),
            steps: out.steps,
        })
    }

    /// Stage C as a [`StageDenoiser`] (text encoded, noise drawn); finish its latents with
    /// [`Self::finish_prior`].
    pub fn prior_denoiser<'a>(&'a self, p: &WuerstchenParams) -> Result<StageDenoiser<'a>> {
        self.validate(p)?;
        self.prior_denoiser_validated(p)
    }

    /// [`Self::prior_denoiser`] for parameters already checked by [`Self::validate`].
    pub(crate) fn prior_denoiser_validated<'a>(
        &'a self,
        p: &WuerstchenParams,
    ) -> Result<StageDenoiser<'a>> {
        let (cond, uncond) = self.prior_text(p)?;
        StageDenoiser::prior(
            &self.prior,
            self.prior_scheduler,
            p,
            self.prior_shape(p.width, p.height),
            cond,
            uncond,
        )
    }

    /// The hand-over to Stage B: `latents · latent_mean − latent_std`.
    pub fn finish_prior(&self, latents: Tensor<4>) -> Tensor<4> {
        latents
            .mul_scalar(self.settings.latent_mean)
            .sub_scalar(self.settings.latent_std)
    }

    /// Stage B: image embedding `[1, c, h, w]` → Stage A latents (before the scale factor).
    pub fn generate_decoder(
        &self,
        image_embeddings: Tensor<4>,
        p: &WuerstchenParams,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<StageOutput> {
        drive(self.decoder_denoiser(image_embeddings, p)?, on_step)
    }

    /// Stage B as a [`StageDenoiser`] (text encoded, conditioning prepared, noise drawn).
    pub fn decoder_denoiser<'a>(
        &'a self,
        image_embeddings: Tensor<4>,
        p: &WuerstchenParams,
    ) -> Result<StageDenoiser<'a>> {
        self.validate(p)?;
        self.decoder_denoiser_validated(image_embeddings, p)
    }

    /// [`Self::decoder_denoiser`] for parameters already checked by [`Self::validate`].
    pub(crate) fn decoder_denoiser_validated<'a>(
        &'a self,
        image_embeddings: Tensor<4>,
        p: &WuerstchenParams,
    ) -> Result<StageDenoiser<'a>> {
        let [_, c, eh, ew] = image_embeddings.dims();
        let expected = self.prior_shape(p.width, p.height);
        if [1, c, eh, ew] != expected {
            return Err(Error::input(
                "image_embeddings",
                format!("shape {:?}, expected {expected:?}", image_embeddings.dims()),
            ));
        }
        let guidance = p.decoder_guidance > 1.0;
        let text = self.encode(&self.tokenizer, &self.text_encoder, &p.prompt)?;
        let (clip, effnet) = if guidance {
            let uncond = self.encode(&self.tokenizer, &self.text_encoder, &p.negative_prompt)?;
            let zeros = image_embeddings.zeros_like();
            (
                Tensor::cat(vec![text, uncond], 0),
                Tensor::cat(vec![image_embeddings, zeros], 0),
            )
        } else {
            (text, image_embeddings)
        };
        let sched = DdpmWuerstchenScheduler::new(self.decoder_scheduler, p.decoder_steps)?;
        let shape = self.decoder_shape(eh, ew);
        let model = StageModel::Decoder {
            decoder: &self.decoder,
            conditioning: self.decoder.condition(effnet, clip),
        };
        Ok(StageDenoiser::new(
            "decoder",
            model,
            guidance.then_some(p.decoder_guidance),
            sched,
            p,
            shape,
            DECODER_STREAM,
            &self.device,
        ))
    }

    /// Stage A: decoder latents → image `[1, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        self.vqgan
            .decode(latents.mul_scalar(self.vqgan.config().scale_factor))
            .clamp(0.0, 1.0)
    }
}

/// The Stage C loop on text embeddings `cond` `[1, n, c_cond]` (and `uncond` when guidance is
/// on), for a latent of `shape`; returns the final latents *before* `· latent_mean − latent_std`.
/// The prompt and decoder fields of `p` are not used here.
pub fn denoise_prior(
    prior: &WuerstchenPrior,
    scheduler: DdpmWuerstchenConfig,
    p: &WuerstchenParams,
    shape: [usize; 4],
    cond: Tensor<3>,
    uncond: Option<Tensor<3>>,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<StageOutput> {
    drive(
        StageDenoiser::prior(prior, scheduler, p, shape, cond, uncond)?,
        on_step,
    )
}

/// Runs a stage to the end natively, one step enqueued ahead of the one waited for
/// ([`crate::stage::drive`]).
fn drive(
    mut d: StageDenoiser<'_>,
    on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
) -> Result<StageOutput> {
    let infos = crate::stage::drive(&mut d, on_step)?;
    Ok(StageOutput {
        latents: d.latents,
        steps: infos,
    })
}

enum StageModel<'a> {
    Prior {
        prior: &'a WuerstchenPrior,
        /// Mapped text of the prompt `[1, n, c]`, and of `[prompt, negative]` with guidance.
        cond: Tensor<3>,
        both: Option<Tensor<3>>,
        gate: Gate,
    },
    Decoder {
        decoder: &'a WuerstchenDiffNeXt,
        conditioning: DiffNeXtConditioning,
    },
}

/// One Würstchen stage as a state machine: [`StageDenoiser::step`] enqueues one step on the
/// device without waiting, so the caller decides how to wait (blocking natively, an awaited
/// readback in a browser) and when to stop.
pub struct StageDenoiser<'a> {
    /// `prior` or `decoder`.
    name: &'static str,
    model: StageModel<'a>,
    /// The guidance scale when guidance runs (two batches).
    guidance: Option<f64>,
    sched: DdpmWuerstchenScheduler,
    latents: Tensor<4>,
    shape: [usize; 4],
    noise: StepNoise,
    /// Every step's timestep-block modulation (`None`: made per step, past
    /// [`UP_FRONT_R_BYTES`]).
    r_table: Option<RTable>,
    next: usize,
}

/// The most bytes of timestep-block modulation made up front for a stage's steps; beyond it
/// each step makes its own.
const UP_FRONT_R_BYTES: usize = 32 << 20;

impl StageModel<'_> {
    fn r_table(&self, r: &[f32]) -> RTable {
        match self {
            StageModel::Prior { prior, .. } => prior.r_table(r),
            StageModel::Decoder { decoder, .. } => decoder.r_table(r),
        }
    }

    fn r_table_bytes(&self, rows: usize) -> u64 {
        match self {
            StageModel::Prior { prior, .. } => prior.r_table_bytes(rows),
            StageModel::Decoder { decoder, .. } => decoder.r_table_bytes(rows),
        }
    }

    fn max_tensor_bytes(&self) -> Option<u64> {
        match self {
            StageModel::Prior { prior, .. } => prior.max_tensor_bytes(),
            StageModel::Decoder { decoder, .. } => decoder.max_tensor_bytes(),
        }
    }
}

impl<'a> StageDenoiser<'a> {
    /// Stage C on text embeddings (see [`denoise_prior`]).
    pub fn prior(
        prior: &'a WuerstchenPrior,
        scheduler: DdpmWuerstchenConfig,
        p: &WuerstchenParams,
        shape: [usize; 4],
        cond: Tensor<3>,
        uncond: Option<Tensor<3>>,
    ) -> Result<Self> {
        let device = cond.device();
        let sched = match &p.prior_timesteps {
            Some(t) => DdpmWuerstchenScheduler::with_timesteps(scheduler, t)?,
            None => DdpmWuerstchenScheduler::new(scheduler, p.prior_steps)?,
        };
        let steps = sched.steps();
        let gate = Gate::new(p.gate_step.map(GateConfig::original), steps, steps, 1)?;
        if let WuerstchenNoise::Tensors {
            prior_noise,
            prior_step_noise,
            ..
        } = &p.noise
        {
            check_noise("prior_noise", prior_noise.len(), 1, shape)?;
            check_noise("prior_step_noise", prior_step_noise.len(), steps, shape)?;
        }
        // The text is mapped once per generation (it is the same at every step).
        let both = uncond
            .filter(|_| p.prior_guidance > 1.0)
            .map(|u| prior.map_text(Tensor::cat(vec![cond.clone(), u], 0)));
        let cond = match &both {
            Some(both) => both.clone().narrow(0, 0, 1),
            None => prior.map_text(cond),
        };
        let guidance = both.as_ref().map(|_| p.prior_guidance);
        let model = StageModel::Prior {
            prior,
            cond,
            both,
            gate,
        };
        Ok(StageDenoiser::new(
            "prior", model, guidance, sched, p, shape, 0, &device,
        ))
    }

    /// The stage's noise drawn (or copied from `p`) and the per-generation work done: the
    /// initial latents, every step's noise and every step's timestep-block modulation, on the
    /// device at once where they fit their caps (else made per step).
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        model: StageModel<'a>,
        guidance: Option<f64>,
        sched: DdpmWuerstchenScheduler,
        p: &WuerstchenParams,
        shape: [usize; 4],
        stream: u64,
        device: &Device,
    ) -> Self {
        let (first, draw) = noise_source(p, shape, stream);
        let latents = Tensor::<4>::from_data(TensorData::new(first, shape), device)
            .mul_scalar(sched.init_noise_sigma());
        let steps = sched.steps();
        let max_tensor = model.max_tensor_bytes();
        let noise = StepNoise::within(
            draw,
            steps,
            shape,
            device,
            StepNoise::up_front_cap(max_tensor),
        );
        let ratios = sched.timesteps()[..steps].to_vec();
        let r_table =
            (model.r_table_bytes(steps) <= UP_FRONT_R_BYTES as u64).then(|| model.r_table(&ratios));
        StageDenoiser {
            name,
            model,
            guidance,
            sched,
            latents,
            shape,
            noise,
            r_table,
            next: 0,
        }
    }

    /// Number of steps.
    pub fn total(&self) -> usize {
        self.sched.steps()
    }

    /// The current latents (after the last enqueued step).
    pub fn latents(&self) -> &Tensor<4> {
        &self.latents
    }

    /// Enqueues the next step; `None` when all are done.
    pub fn step(&mut self) -> Result<Option<EnqueuedStep>> {
        let i = self.next;
        if i >= self.sched.steps() {
            return Ok(None);
        }
        self.next += 1;
        let r = self.sched.timesteps()[i];
        // One row for the whole batch (guidance's two rows share the step's ratio).
        let table = match self.r_table.as_ref().and_then(|t| t.row(i)) {
            Some(row) => row,
            None => self.model.r_table(&[r]),
        };
        let latents = self.latents.clone();
        let doubled = || Tensor::cat(vec![latents.clone(), latents.clone()], 0);
        let (pred, phase) = match &mut self.model {
            StageModel::Prior {
                prior,
                cond,
                both,
                gate,
            } => {
                let plan = gate.begin_iteration(i, both.is_some());
                let pred = match (both.as_ref(), plan.guidance, self.guidance) {
                    (Some(both), true, Some(g)) => lerp_guidance(
                        prior.forward_table(doubled(), &table, both, gate.cache()),
                        g,
                    ),
                    _ => prior.forward_table(latents.clone(), &table, cond, gate.cache()),
                };
                (pred, plan.phase)
            }
            StageModel::Decoder {
                decoder,
                conditioning,
            } => {
                let pred = match self.guidance {
                    Some(g) => {
                        lerp_guidance(decoder.forward_table(doubled(), &table, conditioning), g)
                    }
                    None => decoder.forward_table(latents.clone(), &table, conditioning),
                };
                (pred, Phase::SemanticsPlanning)
            }
        };
        let noise = self.noise.get(i, self.shape, &self.latents.device());
        self.latents = self.sched.step(pred, i, latents, Some(noise))?;
        Ok(Some(EnqueuedStep {
            stage: self.name,
            index: i,
            total: self.sched.steps(),
            timestep: r as f64,
            phase,
            shallow: false,
        }))
    }
}

impl Stage for StageDenoiser<'_> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn total(&self) -> usize {
        StageDenoiser::total(self)
    }
    fn latents(&self) -> &Tensor<4> {
        StageDenoiser::latents(self)
    }
    fn step(&mut self) -> Result<Option<EnqueuedStep>> {
        StageDenoiser::step(self)
    }
}

fn check_steps(name: &str, steps: usize) -> Result<()> {
    if steps == 0 || steps > MAX_STEPS {
        return Err(Error::param(
            name,
            format!("must be in 1..={MAX_STEPS}, got {steps}"),
        ));
    }
    Ok(())
}

/// Checks that `len` values are `count` tensors of `shape`.
fn check_noise(name: &str, len: usize, count: usize, shape: [usize; 4]) -> Result<()> {
    let want = shape.iter().product::<usize>() * count;
    if len != want {
        let shape = if count == 1 {
            format!("{shape:?}")
        } else {
            format!(
                "[{count}, {}, {}, {}, {}]",
                shape[0], shape[1], shape[2], shape[3]
            )
        };
        return Err(Error::input(
            name,
            format!("has {len} values, expected shape {shape} ({want} values)"),
        ));
    }
    Ok(())
}

/// A stage's initial noise and a function drawing (or copying) the noise of step `i`
/// (lengths were checked by [`Wuerstchen::validate`]).
fn noise_source(p: &WuerstchenParams, shape: [usize; 4], stream: u64) -> (Vec<f32>, Draw) {
    let n: usize = shape.iter().product();
    match &p.noise {
        WuerstchenNoise::Seed(seed) => {
            let seed = *seed;
            (
                randn(seed, stream, n),
                Box::new(move |i| randn(seed, stream + 1 + i as u64, n)),
            )
        }
        WuerstchenNoise::Tensors {
            prior_noise,
            prior_step_noise,
            decoder_noise,
            decoder_step_noise,
        } => {
            // The stage's own share of given noise (a copy: the stage outlives the parameters).
            let (first, steps) = if stream == 0 {
                (prior_noise.clone(), prior_step_noise.clone())
            } else {
                (decoder_noise.clone(), decoder_step_noise.clone())
            };
            (first, Box::new(move |i| steps[i * n..(i + 1) * n].to_vec()))
        }
    }
}

/// `torch.lerp(uncond, cond, w)` on a `[cond, uncond]` batch (PyTorch's two-sided formula).
fn lerp_guidance(pred: Tensor<4>, w: f64) -> Tensor<4> {
    let cond = pred.clone().narrow(0, 0, 1);
    let uncond = pred.narrow(0, 1, 1);
    let diff = cond.clone() - uncond.clone();
    if w < 0.5 {
        uncond + diff.mul_scalar(w)
    } else {
        cond - diff.mul_scalar(1.0 - w)
    }
}
