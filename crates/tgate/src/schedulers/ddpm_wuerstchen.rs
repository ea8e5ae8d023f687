//! diffusers' `DDPMWuerstchenScheduler`: continuous time `t ∈ [1, 0]`, cosine ᾱ with offset `s`,
//! ancestral noise at every step but the last. Used by both Würstchen stages.
//!
//! The scalars are computed on the host in f32, in PyTorch's order of operations, so that a
//! schedule matches diffusers' to the last bit where the maths allows.

use burn::tensor::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};

/// `scheduler_config.json` of a Würstchen stage.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct DdpmWuerstchenConfig {
    #[serde(default = "one")]
    pub scaler: f32,
    #[serde(default = "default_s")]
    pub s: f32,
}

fn one() -> f32 {
    1.0
}
fn default_s() -> f32 {
    0.008
}

impl Default for DdpmWuerstchenConfig {
    fn default() -> Self {
        DdpmWuerstchenConfig {
            scaler: 1.0,
            s: 0.008,
        }
    }
}

impl DdpmWuerstchenConfig {
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let cfg: DdpmWuerstchenConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        if !(cfg.scaler.is_finite() && cfg.scaler > 0.0 && cfg.s.is_finite() && cfg.s >= 0.0) {
            return Err(Error::config(
                file,
                format!(
                    "scaler ({}) must be positive and s ({}) non-negative",
                    cfg.scaler, cfg.s
                ),
            ));
        }
        Ok(cfg)
    }
}

/// The prior pipeline's `DEFAULT_STAGE_C_TIMESTEPS`: 20 steps from 1 to 2/3, then 10 to 0
/// (30 values, 29 steps).
pub fn default_stage_c_timesteps() -> Vec<f64> {
    let linspace = |a: f64, b: f64, n: usize| -> Vec<f64> {
        let step = (b - a) / (n - 1) as f64;
        (0..n)
            .map(|i| if i + 1 == n { b } else { a + i as f64 * step })
            .collect()
    };
    let mut t = linspace(1.0, 2.0 / 3.0, 20);
    t.extend(linspace(2.0 / 3.0, 0.0, 11).into_iter().skip(1));
    t
}

/// The scheduler of one run.
#[derive(Debug, Clone)]
pub struct DdpmWuerstchenScheduler {
    config: DdpmWuerstchenConfig,
    timesteps: Vec<f32>,
    init_alpha_cumprod: f32,
}

impl DdpmWuerstchenScheduler {
    /// `set_timesteps(steps)`: `steps + 1` equally spaced values from 1 to 0 (f32 `torch.linspace`).
    pub fn new(config: DdpmWuerstchenConfig, steps: usize) -> Result<Self> {
        if steps == 0 || steps > 100_000 {
            return Err(Error::param(
                "steps",
                format!("must be in 1..=100000, got {steps}"),
            ));
        }
        let n = steps + 1;
        let step = (0.0f32 - 1.0) / steps as f32;
        let half = n / 2;
        let timesteps = (0..n)
            .map(|i| {
                if i < half {
                    1.0 + step * i as f32
                } else {
                    0.0 - step * (n - 1 - i) as f32
                }
            })
            .collect();
        Ok(Self::build(config, timesteps))
    }

    /// `set_timesteps(timesteps=...)`: explicit values, strictly decreasing, ending at 0 or above.
    pub fn with_timesteps(config: DdpmWuerstchenConfig, timesteps: &[f64]) -> Result<Self> {
        if timesteps.len() < 2 || timesteps.len() > 100_001 {
            return Err(Error::param(
                "timesteps",
                "need 2..=100001 values (1 to 100000 steps)",
            ));
        }
        let ok = timesteps.iter().all(|t| (0.0..=1.0).contains(t))
            && timesteps.windows(2).all(|w| w[0] > w[1]);
        if !ok {
            return Err(Error::param(
                "timesteps",
                "must be strictly decreasing values in [0, 1]",
            ));
        }
        Ok(Self::build(
            config,
            timesteps.iter().map(|&t| t as f32).collect(),
        ))
    }

    fn build(config: DdpmWuerstchenConfig, timesteps: Vec<f32>) -> Self {
        let s = config.s;
        let c = (s / (1.0 + s) * std::f32::consts::PI * 0.5).cos();
        DdpmWuerstchenScheduler {
            config,
            timesteps,
            init_alpha_cumprod: c * c,
        }
    }

    /// All timesteps, including the final one that is never a model input.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Number of denoising steps (model evaluations).
    pub fn steps(&self) -> usize {
        self.timesteps.len() - 1
    }

    /// `init_noise_sigma`.
    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn alpha_cumprod(&self, t: f32) -> f32 {
        let scaler = self.config.scaler;
        let t = if scaler > 1.0 {
            1.0 - (1.0 - t).powf(scaler)
        } else if scaler < 1.0 {
            t.powf(scaler)
        } else {
            t
        };
        let s = self.config.s;
        let c = ((t + s) / (1.0 + s) * std::f32::consts::PI * 0.5).cos();
        (c * c / self.init_alpha_cumprod).clamp(0.0001, 0.9999)
    }

    /// Step `i` (from `timesteps[i]` to `timesteps[i + 1]`). `noise` (shaped like `sample`) is
    /// required for every step but the last, where diffusers multiplies it by zero.
    pub fn step(
        &self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>> {
        if i + 1 >= self.timesteps.len() {
            return Err(Error::param("step", format!("{i} is past the last step")));
        }
        let (t, prev) = (self.timesteps[i], self.timesteps[i + 1]);
        let ac = self.alpha_cumprod(t);
        let ac_prev = self.alpha_cumprod(prev);
        let alpha = ac / ac_prev;
        let mu = (sample
            - model_output
                .mul_scalar(1.0 - alpha)
                .div_scalar((1.0 - ac).sqrt()))
        .mul_scalar((1.0 / alpha).sqrt());
        if prev == 0.0 {
            return Ok(mu);
        }
        let noise =
            noise.ok_or_else(|| Error::input("step_noise", format!("missing for step {i}")))?;
        let std = ((1.0 - alpha) * (1.0 - ac_prev) / (1.0 - ac)).sqrt();
        Ok(mu + noise.mul_scalar(std))
    }
}
