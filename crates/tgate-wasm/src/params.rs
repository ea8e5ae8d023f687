//! Generation parameters as the JS API names them, turned into the model crate's [`Request`]
//! (every default and check lives there).

use serde::Deserialize;
use tgate::deepcache::DeepCacheConfig;
use tgate::text_to_image::{GateKnobs, NoiseSource, Request};
use wasm_bindgen::prelude::*;

use crate::errors::js_error;

/// `generate(params)`: camelCase names of [`Request`]'s fields.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Params {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    /// SD: denoising steps; Würstchen: prior steps.
    steps: Option<usize>,
    /// Würstchen: the prior on diffusers' DEFAULT_STAGE_C_TIMESTEPS.
    #[serde(default)]
    default_timesteps: bool,
    /// SD: guidance scale; Würstchen: prior guidance.
    guidance: Option<f64>,
    scheduler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    seed: Option<f64>,
    /// Würstchen only.
    decoder_steps: Option<usize>,
    decoder_guidance: Option<f64>,
    /// `false` (no gate) or the knobs; absent or `true`: the default gate.
    gate: Option<GateParam>,
    /// SD: DeepCache. Absent or `false`: off; `true`: tgate's defaults (interval 3, branch 0);
    /// `{ interval, branch }` (either may be left out).
    deep_cache: Option<DeepCacheParam>,
    /// Send a small RGBA preview of the latents with every step report.
    #[serde(default)]
    pub preview: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum GateParam {
    Enabled(bool),
    Knobs(JsGateKnobs),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DeepCacheParam {
    Enabled(bool),
    Knobs(JsDeepCache),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsDeepCache {
    interval: Option<usize>,
    branch: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsGateKnobs {
    step: Option<usize>,
    sp_interval: Option<usize>,
    fi_interval: Option<usize>,
    warm_up: Option<usize>,
}

impl Params {
    pub fn from_js(value: JsValue) -> Result<Self, JsValue> {
        serde_wasm_bindgen::from_value(value).map_err(|e| js_error("invalid_parameter", e))
    }

    /// The request; `noise` is the CLI's `--noise` file (safetensors bytes), else the seed (a
    /// random one when absent).
    pub fn request(&self, noise: Option<Vec<u8>>) -> Result<Request, JsValue> {
        let noise = match noise {
            Some(bytes) => NoiseSource::File {
                name: "the noise file".into(),
                bytes,
            },
            None => NoiseSource::Seed(self.seed()?),
        };
        let mut r = Request::new(self.prompt.clone(), noise);
        r.negative_prompt = self.negative_prompt.clone();
        r.steps = self.steps;
        r.default_timesteps = self.default_timesteps;
        r.guidance = self.guidance;
        r.decoder_steps = self.decoder_steps;
        r.decoder_guidance = self.decoder_guidance;
        r.scheduler = self.scheduler.clone();
        r.width = self.width;
        r.height = self.height;
        r.gate = match &self.gate {
            Some(GateParam::Enabled(false)) => None,
            Some(GateParam::Enabled(true)) | None => Some(GateKnobs::default()),
            Some(GateParam::Knobs(k)) => Some(GateKnobs {
                step: k.step,
                sp_interval: k.sp_interval,
                fi_interval: k.fi_interval,
                warm_up: k.warm_up,
            }),
        };
        let d = DeepCacheConfig::tgate_default();
        r.deep_cache = match &self.deep_cache {
            None | Some(DeepCacheParam::Enabled(false)) => None,
            Some(DeepCacheParam::Enabled(true)) => Some(d),
            Some(DeepCacheParam::Knobs(k)) => Some(DeepCacheConfig {
                interval: k.interval.unwrap_or(d.interval),
                branch: k.branch.unwrap_or(d.branch),
            }),
        };
        Ok(r)
    }

    fn seed(&self) -> Result<u64, JsValue> {
        match self.seed {
            Some(s) if s >= 0.0 && s.fract() == 0.0 && s <= 9007199254740991.0 => Ok(s as u64),
            Some(s) => Err(js_error(
                "invalid_parameter",
                format!("seed must be a non-negative integer, got {s}"),
            )),
            None => Ok((js_sys::Math::random() * 4294967296.0) as u64),
        }
    }
}
