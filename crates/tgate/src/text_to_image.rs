//! The one request → result entry point for every model family, as diffusers'
//! `AutoPipelineForText2Image`: [`Pipeline::load`] recognises the folder (Stable Diffusion or
//! Würstchen), [`Pipeline::plan`] turns a front end's [`Request`] into checked parameters
//! (defaults, noise file, gate, every size check: once), and a [`Generation`] runs the stages
//! (text encoding, each denoising [`Stage`], the decoder) as a sequence of enqueued pieces of
//! work, so every caller waits its own way: [`Generation::run`] blocks natively, the browser
//! awaits a one-value readback between pieces and can cancel at each.
//!
//! The CLI (`tgate generate`) and the wasm bindings are thin adapters over this module.

use std::ops::ControlFlow;

use burn::tensor::{DType, Device, Tensor};

use crate::deepcache::DeepCacheConfig;
use crate::error::{Error, Result};
use crate::loader::{LoadedFiles, ModelSource, Placeholders, Variant};
use crate::nn::ActivationSize;
use crate::pipeline::{classifier_free_guidance, GenerateParams, Noise, StableDiffusion};
use crate::pipeline_wuerstchen::{Wuerstchen, WuerstchenLayout, WuerstchenNoise, WuerstchenParams};
use crate::safetensors::SafeTensors;
use crate::schedulers::ddpm_wuerstchen::default_stage_c_timesteps;
use crate::schedulers::SchedulerKind;
use crate::stage::{probe_of, EnqueuedStep, Stage, StepInfo};
use crate::tgate::GateConfig;

/// The model families a folder can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`).
    StableDiffusion,
    /// Würstchen v2 (`WuerstchenCombinedPipeline`, or the decoder + prior folder pair).
    Wuerstchen,
}

impl ModelKind {
    /// `sd` or `wuerstchen`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sd" => Ok(ModelKind::StableDiffusion),
            "wuerstchen" => Ok(ModelKind::Wuerstchen),
            other => Err(Error::param(
                "kind",
                format!("must be 'sd' or 'wuerstchen', got '{other}'"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::StableDiffusion => "sd",
            ModelKind::Wuerstchen => "wuerstchen",
        }
    }
}

/// Where a generation's noise comes from.
#[derive(Clone, Debug)]
pub enum NoiseSource {
    /// Seeded noise ([`crate::noise`]), the same on every backend.
    Seed(u64),
    /// A safetensors file (`name` is used in messages): Stable Diffusion's `noise`
    /// `[1, 4, H/8, W/8]` and, for ancestral schedulers, `step_noise` `[steps, 1, 4, H/8, W/8]`;
    /// Würstchen's `prior_noise`, `prior_step_noise`, `decoder_noise`, `decoder_step_noise`.
    File { name: String, bytes: Vec<u8> },
}

/// The gate's knobs; `None` takes the default (gate step `round(0.4 × steps)`, self-attention
/// always computed). Würstchen's Stage C gate takes only `step`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateKnobs {
    pub step: Option<usize>,
    pub sp_interval: Option<usize>,
    pub fi_interval: Option<usize>,
    pub warm_up: Option<usize>,
}

/// What a front end asks for, with diffusers' names; unset fields take the model family's
/// defaults (Stable Diffusion: 25 steps, guidance 7.5, the folder's scheduler, `sample_size × 8`
/// pixels, and for latent-consistency UNets 4 steps at guidance 8.5; Würstchen: 512×512, prior
/// 60 steps at guidance 4, decoder 12 steps without guidance).
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    /// Stable Diffusion: denoising steps; Würstchen: prior steps.
    pub steps: Option<usize>,
    /// Würstchen: run the prior on diffusers' `DEFAULT_STAGE_C_TIMESTEPS` (29 steps).
    pub default_timesteps: bool,
    /// Classifier-free guidance scale (Würstchen: the prior's), on above 1; a latent-consistency
    /// UNet takes it through its guidance embedding instead (one batch).
    pub guidance: Option<f64>,
    /// Würstchen: Stage B steps.
    pub decoder_steps: Option<usize>,
    /// Würstchen: Stage B guidance.
    pub decoder_guidance: Option<f64>,
    /// Stable Diffusion: a scheduler name (`ddim`, `pndm`, `euler`, `euler-a`, `dpm++2m`, `lcm`, or
    /// diffusers' class name).
    pub scheduler: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// `None`: no gate (plain diffusers).
    pub gate: Option<GateKnobs>,
    /// Stable Diffusion: DeepCache (`None`: off); with the gate, as tgate's
    /// `TgateSDDeepCacheLoader`.
    pub deep_cache: Option<DeepCacheConfig>,
    pub noise: NoiseSource,
    /// Stable Diffusion: skip the last `clip_skip` text-encoder layers.
    pub clip_skip: usize,
}

impl Request {
    /// A request with every default, T-GATE on.
    pub fn new(prompt: impl Into<String>, noise: NoiseSource) -> Self {
        Request {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: None,
            default_timesteps: false,
            guidance: None,
            decoder_steps: None,
            decoder_guidance: None,
            scheduler: None,
            width: None,
            height: None,
            gate: Some(GateKnobs::default()),
            deep_cache: None,
            noise,
            clip_skip: 0,
        }
    }
}

/// A checked request: the model family's own parameters. Made only by [`Pipeline::plan`].
#[derive(Clone, Debug)]
pub enum Plan {
    StableDiffusion(GenerateParams),
    Wuerstchen(WuerstchenParams),
}

/// A loaded model of either family.
pub enum Pipeline {
    StableDiffusion(StableDiffusion),
    Wuerstchen(Wuerstchen),
}

/// Default image size of Würstchen (diffusers' `WuerstchenCombinedPipeline`).
const WUERSTCHEN_SIZE: usize = 512;

impl Pipeline {
    /// Which family a folder holds: a Würstchen layout, else a Stable Diffusion folder
    /// (`unet/config.json`).
    pub fn detect(src: &dyn ModelSource) -> Result<ModelKind> {
        if WuerstchenLayout::detect(src)?.is_some() {
            return Ok(ModelKind::Wuerstchen);
        }
        if src.read("unet/config.json")?.is_some() {
            return Ok(ModelKind::StableDiffusion);
        }
        Err(Error::MissingFile(format!(
            "{}/unet/config.json (neither a Stable Diffusion nor a Würstchen pipeline folder)",
            src.describe()
        )))
    }

    /// Loads a diffusers folder of the given kind (detected when `None`). `prior` is the second
    /// folder of Würstchen's two-repository layout. See [`StableDiffusion::load_as`] and
    /// [`Wuerstchen::load_as`] for `variant` and `dtype`.
    pub fn load(
        src: &dyn ModelSource,
        prior: Option<&dyn ModelSource>,
        kind: Option<ModelKind>,
        variant: Variant,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let kind = match kind {
            Some(k) => k,
            None => Self::detect(src)?,
        };
        match kind {
            ModelKind::StableDiffusion => {
                if prior.is_some() {
                    return Err(Error::param(
                        "prior",
                        "only Würstchen models take a separate prior folder",
                    ));
                }
                StableDiffusion::load_as(src, variant, dtype, device).map(Pipeline::StableDiffusion)
            }
            ModelKind::Wuerstchen => {
                Wuerstchen::load_as(src, prior, variant, dtype, device).map(Pipeline::Wuerstchen)
            }
        }
    }

    /// The pipeline of `src`'s configs and tokenizers with zero placeholder weights, made on the
    /// device without reading any weight file ([`Placeholders`]): the same kernels as the real
    /// model, to compile them early with [`Pipeline::warm_up_request`].
    pub fn placeholder(
        src: &dyn ModelSource,
        prior: Option<&dyn ModelSource>,
        kind: Option<ModelKind>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let prior = prior.map(Placeholders);
        let prior = prior.as_ref().map(|p| p as &dyn ModelSource);
        Self::load(
            &Placeholders(src),
            prior,
            kind,
            Variant::Auto,
            dtype,
            device,
        )
    }

    /// A short request that launches the kernels of a default generation at `width`×`height`
    /// (`None`: the model's default size): planning steps with guidance, the gate step, gated
    /// steps and the decoder (Würstchen: both stages), with the folder's scheduler.
    pub fn warm_up_request(&self, width: Option<usize>, height: Option<usize>) -> Request {
        let mut r = Request::new("", NoiseSource::Seed(0));
        r.steps = Some(4);
        if self.kind() == ModelKind::Wuerstchen {
            r.decoder_steps = Some(2);
        }
        r.width = width;
        r.height = height;
        r.gate = Some(GateKnobs {
            step: Some(2),
            ..GateKnobs::default()
        });
        r
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            Pipeline::StableDiffusion(_) => ModelKind::StableDiffusion,
            Pipeline::Wuerstchen(_) => ModelKind::Wuerstchen,
        }
    }

    /// Which weight files each part was read from, and why.
    pub fn loaded(&self) -> &[LoadedFiles] {
        match self {
            Pipeline::StableDiffusion(m) => &m.loaded,
            Pipeline::Wuerstchen(m) => &m.loaded,
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Pipeline::StableDiffusion(m) => m.device(),
            Pipeline::Wuerstchen(m) => m.device(),
        }
    }

    /// The image size a request without width and height gets: `(width, height)`.
    pub fn default_size(&self) -> (usize, usize) {
        match self {
            Pipeline::StableDiffusion(m) => (m.default_size(), m.default_size()),
            Pipeline::Wuerstchen(_) => (WUERSTCHEN_SIZE, WUERSTCHEN_SIZE),
        }
    }

    /// Fills in the defaults, reads the noise file and checks everything (parameters, noise
    /// shapes, every feature map against the device's buffer limit) before any work is done.
    pub fn plan(&self, r: &Request) -> Result<Plan> {
        match self {
            Pipeline::StableDiffusion(m) => plan_sd(m, r).map(Plan::StableDiffusion),
            Pipeline::Wuerstchen(m) => plan_wuerstchen(m, r).map(Plan::Wuerstchen),
        }
    }

    /// The largest activation of a generation of `plan` (see [`ActivationSize`]); a
    /// generation sizes the device's memory pages for it before its first piece of work.
    pub fn largest_activation(&self, plan: &Plan) -> ActivationSize {
        match (self, plan) {
            (Pipeline::StableDiffusion(m), Plan::StableDiffusion(p)) => m.largest_activation(p),
            (Pipeline::Wuerstchen(w), Plan::Wuerstchen(p)) => w.largest_activation(p),
            // A generation refuses the mismatch before any work.
            _ => ActivationSize::new("nothing", &[0], 0),
        }
    }

    /// A generation of a checked plan; nothing is enqueued until [`Generation::advance`].
    pub fn start(&self, plan: Plan) -> Generation<'_> {
        Generation {
            pipeline: self,
            plan,
            state: State::Start,
            steps: Vec::new(),
            latents: Vec::new(),
        }
    }

    /// Plans and runs a request to its image, blocking; `on_step` sees every denoising step
    /// and may stop the run ([`Error::Cancelled`]).
    pub fn generate(
        &self,
        r: &Request,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<Output> {
        let plan = self.plan(r)?;
        self.start(plan).run(on_step)
    }
}

impl Plan {
    /// One line for logs: size, steps, guidance, scheduler, gate and noise.
    pub fn describe(&self, pipeline: &Pipeline) -> String {
        match (self, pipeline) {
            (Plan::StableDiffusion(p), _) => format!(
                "{}x{}, {} steps, guidance {}, scheduler {}, {}, {}",
                p.width,
                p.height,
                p.steps,
                p.guidance,
                p.scheduler.map_or("?", |k| k.name()),
                match p.gate {
                    Some(g) => format!(
                        "T-GATE gate_step {} (sp_interval {}, fi_interval {}, warm_up {})",
                        g.gate_step, g.sp_interval, g.fi_interval, g.warm_up
                    ),
                    None => "no gate".into(),
                } + &match p.deep_cache {
                    Some(d) => format!(", DeepCache interval {} branch {}", d.interval, d.branch),
                    None => String::new(),
                },
                match &p.noise {
                    Noise::Seed(s) => format!("seed {s}"),
                    Noise::Tensors { .. } => "noise from a file".into(),
                }
            ),
            (Plan::Wuerstchen(p), Pipeline::Wuerstchen(w)) => {
                let (ow, oh) = w.output_size(p.width, p.height);
                format!(
                    "{}x{} (output {ow}x{oh}), prior {} steps guidance {}, decoder {} steps guidance {}, {}, {}",
                    p.width,
                    p.height,
                    p.prior_step_count(),
                    p.prior_guidance,
                    p.decoder_steps,
                    p.decoder_guidance,
                    match p.gate_step {
                        Some(g) => format!("Stage C T-GATE gate_step {g}"),
                        None => "no gate".into(),
                    },
                    match &p.noise {
                        WuerstchenNoise::Seed(s) => format!("seed {s}"),
                        WuerstchenNoise::Tensors { .. } => "noise from a file".into(),
                    }
                )
            }
            (Plan::Wuerstchen(_), _) => "a Würstchen plan".into(),
        }
    }
}

/// Refuses fields another model family uses.
fn refuse_fields(fields: &[(&str, bool)], why: &str) -> Result<()> {
    match fields.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(Error::param(*name, why)),
        None => Ok(()),
    }
}

fn plan_sd(m: &StableDiffusion, r: &Request) -> Result<GenerateParams> {
    refuse_fields(
        &[
            ("default_timesteps", r.default_timesteps),
            ("decoder_steps", r.decoder_steps.is_some()),
            ("decoder_guidance", r.decoder_guidance.is_some()),
        ],
        "only for Würstchen models",
    )?;
    // A latent-consistency UNet (a guidance embedding) takes diffusers' LCM pipeline defaults.
    let lcm = m.unet.config().time_cond_proj_dim.is_some();
    let steps = r.steps.unwrap_or(if lcm { 4 } else { 25 });
    let scheduler = match r.scheduler.as_deref() {
        Some(name) => name.parse::<SchedulerKind>()?,
        None => m.default_scheduler()?,
    };
    let channels = m.unet.config().in_channels;
    let (noise, noise_size) = match &r.noise {
        NoiseSource::Seed(seed) => (Noise::Seed(*seed), None),
        NoiseSource::File { name, bytes } => {
            let (noise, size) = read_sd_noise(name, bytes, channels)?;
            (noise, Some(size))
        }
    };
    // Without width and height, a noise file decides the size.
    let size = m.default_size();
    let width = r.width.or(noise_size.map(|s| s.0)).unwrap_or(size);
    let height = r.height.or(noise_size.map(|s| s.1)).unwrap_or(size);
    if let Some((nw, nh)) = noise_size {
        if (nw, nh) != (width, height) {
            return Err(Error::input(
                "noise",
                format!(
                    "shape [1, {channels}, {}, {}], expected [1, {channels}, {}, {}] for {width}x{height}",
                    nh / 8,
                    nw / 8,
                    height / 8,
                    width / 8
                ),
            ));
        }
    }
    let gate = r.gate.map(|k| GateConfig {
        gate_step: k
            .step
            .unwrap_or_else(|| GateConfig::default_gate_step(steps)),
        sp_interval: k.sp_interval.unwrap_or(1),
        fi_interval: k.fi_interval.unwrap_or(1),
        warm_up: k.warm_up.unwrap_or(0),
    });
    let p = GenerateParams {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone(),
        steps,
        guidance: r.guidance.unwrap_or(if lcm { 8.5 } else { 7.5 }),
        scheduler: Some(scheduler),
        width,
        height,
        gate,
        deep_cache: r.deep_cache,
        noise,
        clip_skip: r.clip_skip,
    };
    m.validate(&p)?;
    Ok(p)
}

/// Reads Stable Diffusion's noise file: `noise` `[1, c, h, w]` and the optional `step_noise`
/// `[n, 1, c, h, w]` (its count is checked against the schedule later). Returns the noise and
/// the image size it is for.
fn read_sd_noise(name: &str, bytes: &[u8], channels: usize) -> Result<(Noise, (usize, usize))> {
    let st = SafeTensors::parse(name, bytes.to_vec())?;
    let noise = read_noise_tensor(&st, name, "noise")?;
    if noise.shape.len() != 4 || noise.shape[0] != 1 || noise.shape[1] != channels {
        return Err(Error::input(
            "noise",
            format!(
                "shape {:?}, expected [1, {channels}, H/8, W/8]",
                noise.shape
            ),
        ));
    }
    let step_noise = if st.contains("step_noise") {
        let s = st.read_f32_any("step_noise")?;
        if s.shape.len() != 5 || s.shape[1..] != noise.shape[..] {
            return Err(Error::input(
                "step_noise",
                format!("shape {:?}, expected [steps, {:?}]", s.shape, noise.shape),
            ));
        }
        Some(s.data)
    } else {
        None
    };
    let size = (noise.shape[3] * 8, noise.shape[2] * 8);
    Ok((
        Noise::Tensors {
            noise: noise.data,
            step_noise,
        },
        size,
    ))
}

fn read_noise_tensor(
    st: &SafeTensors,
    file: &str,
    name: &str,
) -> Result<crate::safetensors::HostTensor> {
    if !st.contains(name) {
        return Err(Error::input(name, format!("{file} has no tensor `{name}`")));
    }
    st.read_f32_any(name)
}

fn plan_wuerstchen(w: &Wuerstchen, r: &Request) -> Result<WuerstchenParams> {
    let knobs = r.gate.unwrap_or_default();
    refuse_fields(
        &[
            ("scheduler", r.scheduler.is_some()),
            ("sp_interval", knobs.sp_interval.is_some()),
            ("fi_interval", knobs.fi_interval.is_some()),
            ("warm_up", knobs.warm_up.is_some()),
            ("clip_skip", r.clip_skip != 0),
            ("deep_cache", r.deep_cache.is_some()),
        ],
        "not available for Würstchen (one scheduler, DDPMWuerstchenScheduler; the Stage C gate \
         takes only its step)",
    )?;
    let mut p = WuerstchenParams::new(r.prompt.clone(), WuerstchenNoise::Seed(0));
    p.negative_prompt = r.negative_prompt.clone();
    p.width = r.width.unwrap_or(WUERSTCHEN_SIZE);
    p.height = r.height.unwrap_or(WUERSTCHEN_SIZE);
    if r.default_timesteps {
        if r.steps.is_some() {
            return Err(Error::param(
                "default_timesteps",
                "takes the place of steps; give one of them",
            ));
        }
        p.prior_timesteps = Some(default_stage_c_timesteps());
    } else if let Some(steps) = r.steps {
        p.prior_steps = steps;
    }
    p.prior_guidance = r.guidance.unwrap_or(p.prior_guidance);
    p.decoder_steps = r.decoder_steps.unwrap_or(p.decoder_steps);
    p.decoder_guidance = r.decoder_guidance.unwrap_or(p.decoder_guidance);
    p.gate_step = r.gate.map(|k| {
        k.step
            .unwrap_or_else(|| GateConfig::default_gate_step(p.prior_step_count()))
    });
    p.noise = match &r.noise {
        NoiseSource::Seed(seed) => WuerstchenNoise::Seed(*seed),
        NoiseSource::File { name, bytes } => read_wuerstchen_noise(w, &p, name, bytes)?,
    };
    w.validate(&p)?;
    Ok(p)
}

/// Reads Würstchen's noise file, checking each tensor's shape against what `p` needs.
fn read_wuerstchen_noise(
    w: &Wuerstchen,
    p: &WuerstchenParams,
    file: &str,
    bytes: &[u8],
) -> Result<WuerstchenNoise> {
    let st = SafeTensors::parse(file, bytes.to_vec())?;
    let prior = w.prior_shape(p.width, p.height);
    let decoder = w.decoder_shape(prior[2], prior[3]);
    let with_steps = |n: usize, s: [usize; 4]| vec![n, s[0], s[1], s[2], s[3]];
    let get = |name: &str, shape: Vec<usize>| {
        let t = read_noise_tensor(&st, file, name)?;
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

/// A piece of work [`Generation::advance`] enqueued.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// A stage's text was encoded and its loop prepared (noise drawn).
    TextEncoded { stage: &'static str },
    /// One denoising step.
    Step(EnqueuedStep),
    /// The final latents were decoded to the image.
    Decoded,
}

/// What [`Generation::advance`] returns.
pub struct Advance {
    pub work: Work,
    /// One value that is ready once the enqueued work is (the device runs work in order):
    /// read it back to wait without blocking.
    pub probe: Tensor<1>,
}

enum State<'m> {
    /// Nothing enqueued yet.
    Start,
    Denoising(Box<dyn Stage + 'm>),
    /// The image, enqueued.
    Done(Tensor<4>),
    /// A piece of work failed (or the state was taken); the generation cannot go on.
    Broken,
}

/// One generation as a sequence of enqueued pieces of work (see [`Generation::advance`]).
pub struct Generation<'m> {
    pipeline: &'m Pipeline,
    plan: Plan,
    state: State<'m>,
    steps: Vec<StepInfo>,
    latents: Vec<(&'static str, Tensor<4>)>,
}

/// The result of a generation.
pub struct Output {
    /// Final latents by name, as the CLI's `--save-latents` file: `latents` (Stable Diffusion,
    /// before the VAE), or `prior_latents` (after `· 42 − 1`) and `decoder_latents` (before
    /// Stage A).
    pub latents: Vec<(&'static str, Tensor<4>)>,
    /// The image `[1, 3, H, W]` in `[0, 1]`.
    pub image: Tensor<4>,
    /// Every denoising step, in order.
    pub steps: Vec<StepInfo>,
}

impl Output {
    /// Whether every final latent value is finite (a host readback of the latents). An f16
    /// generation that overflowed gives NaN or infinity here, and a black image: front ends
    /// then run it again in f32.
    pub fn latents_finite(&self) -> Result<bool> {
        for (name, t) in &self.latents {
            if read_f32(t.clone(), name)?.iter().any(|v| !v.is_finite()) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl<'m> Generation<'m> {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The latents of the running stage (after its last enqueued step), e.g. for previews.
    pub fn latents(&self) -> Option<&Tensor<4>> {
        match &self.state {
            State::Denoising(stage) => Some(stage.latents()),
            _ => None,
        }
    }

    /// Enqueues every remaining piece of work without waiting; the probe of the last one
    /// (`None` when nothing was left). A warm-up reads it back to know its kernels ran.
    pub fn enqueue_all(&mut self) -> Result<Option<Tensor<1>>> {
        let mut last = None;
        while let Some(advance) = self.advance()? {
            last = Some(advance.probe);
        }
        Ok(last)
    }

    /// Enqueues the next piece of work on the device without waiting for it; `None` when the
    /// image is enqueued. After an error the generation cannot go on.
    pub fn advance(&mut self) -> Result<Option<Advance>> {
        let state = std::mem::replace(&mut self.state, State::Broken);
        let (state, advance) = self.next(state)?;
        self.state = state;
        Ok(advance)
    }

    fn next(&mut self, state: State<'m>) -> Result<(State<'m>, Option<Advance>)> {
        let mut stage = match state {
            State::Start => {
                self.pipeline
                    .largest_activation(&self.plan)
                    .size_device_pages(self.pipeline.device())?;
                let stage = self.first_stage()?;
                return Ok(Self::encoded(stage));
            }
            State::Denoising(stage) => stage,
            State::Done(image) => return Ok((State::Done(image), None)),
            State::Broken => {
                return Err(Error::param(
                    "generation",
                    "an earlier piece of work failed; start a new generation",
                ))
            }
        };
        if let Some(step) = stage.step()? {
            let probe = probe_of(stage.latents());
            let work = Work::Step(step);
            return Ok((State::Denoising(stage), Some(Advance { work, probe })));
        }
        // The stage is done: on to the next stage or to the decoder.
        let latents = stage.latents().clone();
        let name = stage.name();
        drop(stage);
        // The stage's working memory (its maps, the gate's cache) is free now, but the device's
        // pools keep the pages it sat on until a cleanup, while the next stage or the decoder,
        // whose largest maps are larger, grows pages of its own: give them back first (SD 1.5 at
        // 256² in f16, lavapipe: 2189.6 MiB reserved after a generation without this, 2152.0
        // with it; a no-op on the CPU).
        latents.device().memory_cleanup();
        match (self.pipeline, &self.plan, name) {
            (Pipeline::Wuerstchen(w), Plan::Wuerstchen(p), "prior") => {
                let embeddings = w.finish_prior(latents);
                self.latents.push(("prior_latents", embeddings.clone()));
                let stage = w.decoder_denoiser_validated(embeddings, p)?;
                Ok(Self::encoded(Box::new(stage)))
            }
            (Pipeline::Wuerstchen(w), _, _) => {
                self.latents.push(("decoder_latents", latents.clone()));
                Ok(Self::decoded(w.decode(latents)))
            }
            (Pipeline::StableDiffusion(m), _, _) => {
                self.latents.push(("latents", latents.clone()));
                Ok(Self::decoded(m.decode(latents)))
            }
        }
    }

    fn encoded(stage: Box<dyn Stage + 'm>) -> (State<'m>, Option<Advance>) {
        let work = Work::TextEncoded {
            stage: stage.name(),
        };
        let probe = probe_of(stage.latents());
        (State::Denoising(stage), Some(Advance { work, probe }))
    }

    fn decoded(image: Tensor<4>) -> (State<'m>, Option<Advance>) {
        let probe = probe_of(&image);
        let advance = Advance {
            work: Work::Decoded,
            probe,
        };
        (State::Done(image), Some(advance))
    }

    /// Encodes the text of the first stage and prepares its loop.
    fn first_stage(&self) -> Result<Box<dyn Stage + 'm>> {
        match (self.pipeline, &self.plan) {
            (Pipeline::StableDiffusion(m), Plan::StableDiffusion(p)) => {
                let cond = m.encode_prompt(&p.prompt, p.clip_skip)?;
                let uncond = if classifier_free_guidance(&m.unet, p.guidance) {
                    Some(m.encode_prompt(&p.negative_prompt, p.clip_skip)?)
                } else {
                    None
                };
                let d = crate::pipeline::Denoiser::new_validated(
                    &m.unet,
                    &m.scheduler_config,
                    p,
                    cond,
                    uncond,
                )?;
                Ok(Box::new(d))
            }
            (Pipeline::Wuerstchen(w), Plan::Wuerstchen(p)) => {
                Ok(Box::new(w.prior_denoiser_validated(p)?))
            }
            _ => Err(Error::param("plan", "was made for the other model family")),
        }
    }

    /// Records a finished step (its time measured by the caller) and returns its report.
    pub fn record(&mut self, step: EnqueuedStep, seconds: f64) -> StepInfo {
        let info = step.finish(seconds);
        self.steps.push(info);
        info
    }

    /// The result, once [`Self::advance`] returned `None`.
    pub fn finish(self) -> Result<Output> {
        match self.state {
            State::Done(image) => Ok(Output {
                latents: self.latents,
                image,
                steps: self.steps,
            }),
            _ => Err(Error::param(
                "generation",
                "finish() before the last piece of work was enqueued",
            )),
        }
    }

    /// Runs the generation to its end natively, one piece of work enqueued ahead of the one
    /// waited for (see [`crate::stage::pipelined`]; a stage's last step is waited for before the
    /// next stage or the decoder is enqueued); `on_step` sees each step once the device finished
    /// it and may stop the run ([`Error::Cancelled`]).
    pub fn run(mut self, on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>) -> Result<Output> {
        let device = self.pipeline.device().clone();
        crate::stage::pipelined(
            &device,
            &mut self,
            |g| Ok(g.advance()?.map(|a| (a.work, a.probe))),
            |work| matches!(work, Work::Step(s) if s.index + 1 == s.total),
            |g, work, measured| match work {
                Work::Step(step) => {
                    let info = step.finish_measured(measured);
                    g.steps.push(info);
                    on_step(&info)
                }
                _ => ControlFlow::Continue(()),
            },
        )?;
        self.finish()
    }
}

/// Reads a tensor back to the host as f32 (`what` names it in the error).
pub fn read_f32<const D: usize>(t: Tensor<D>, what: &str) -> Result<Vec<f32>> {
    t.try_into_data()
        .map_err(|e| Error::Device(format!("reading {what} back failed: {e:?}")))?
        .try_to_vec::<f32>()
        .map_err(|e| Error::Device(format!("reading {what} back failed: {e:?}")))
}

/// Interleaves the first three planes of a `[3, h, w]` image in `[0, 1]` as 8-bit RGB, or RGBA
/// with opaque alpha.
pub fn interleave(pixels: &[f32], h: usize, w: usize, alpha: bool) -> Vec<u8> {
    let n = h * w;
    let k = if alpha { 4 } else { 3 };
    let mut out = vec![255u8; n * k];
    for c in 0..3 {
        let Some(plane) = pixels.get(c * n..(c + 1) * n) else {
            break;
        };
        for (i, v) in plane.iter().enumerate() {
            out[i * k + c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_orders_channels_and_rounds() {
        // A 1×2 image: R = [0, 1], G = [0.5, 0.2], B = [2 (clamped), -1 (clamped)].
        let px = [0.0, 1.0, 0.5, 0.2, 2.0, -1.0];
        assert_eq!(interleave(&px, 1, 2, false), vec![0, 128, 255, 255, 51, 0]);
        assert_eq!(
            interleave(&px, 1, 2, true),
            vec![0, 128, 255, 255, 255, 51, 0, 255]
        );
    }

    #[test]
    fn model_kinds_parse() {
        assert_eq!(
            ModelKind::parse("sd").ok(),
            Some(ModelKind::StableDiffusion)
        );
        assert_eq!(
            ModelKind::parse("wuerstchen").ok(),
            Some(ModelKind::Wuerstchen)
        );
        assert!(matches!(
            ModelKind::parse("sdxl"),
            Err(Error::InvalidParameter { .. })
        ));
    }
}
