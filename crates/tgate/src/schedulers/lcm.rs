//! Latent consistency sampling (Luo et al. 2023): diffusers' `LCMScheduler`.
//!
//! The timesteps are `n` evenly spaced picks (by index) from the `original_inference_steps`
//! schedule the model was distilled on (`k·j − 1`, `k = num_train_timesteps / original`). Each
//! step maps the sample to a clean estimate with the consistency boundary condition
//! (`denoised = c_out · x0 + c_skip · sample`) and, except at the last step, noises it again to
//! the next timestep with fresh standard-normal noise; the last step returns `denoised`, which
//! is what the pipeline decodes.

use burn::tensor::Tensor;

use crate::error::{Error, Result};

use super::tables::{TimestepSpacing, TrainSchedule};
use super::{
    step_index_error, step_noise, weighted_sum, PredictionType, Scheduler, SchedulerConfig,
};

/// `LCMScheduler`, set up for a number of steps.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    train: TrainSchedule,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    /// `alphas_cumprod` past the end of the table: 1, or `alphas_cumprod[0]`.
    final_alpha_cumprod: f32,
    /// `timestep_scaling` of the boundary condition (10 by default).
    timestep_scaling: f32,
    /// `Some(range)` when the predicted clean sample is clipped to `[-range, range]`.
    clip: Option<f64>,
}

impl LcmScheduler {
    /// `LCMScheduler.from_config(config)` then `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let n = num_inference_steps;
        let train = TrainSchedule::read(config, TimestepSpacing::Leading, true, n)?;
        if config.bool_or("thresholding", false)? {
            return Err(
                config.error("LCM dynamic thresholding (`thresholding: true`) is not supported")
            );
        }
        let total = train.num_train_timesteps;
        let original = config.i64_or("original_inference_steps", 50)?;
        let original = usize::try_from(original)
            .ok()
            .filter(|&o| (1..=total).contains(&o))
            .ok_or_else(|| {
                config.error(format!(
                    "`original_inference_steps` must be 1 to {total}, found {original}"
                ))
            })?;
        if n > original {
            return Err(Error::param(
                "steps",
                format!(
                    "{n} steps: an LCM model takes at most its original_inference_steps ({original})"
                ),
            ));
        }
        let clip = if config.bool_or("clip_sample", false)? {
            Some(config.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        let final_alpha_cumprod = if config.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        let timesteps = lcm_timesteps(total, original, n);
        train.check_timesteps(&timesteps)?;
        Ok(LcmScheduler {
            timestep_scaling: config.f64_or("timestep_scaling", 10.0)? as f32,
            train,
            timesteps,
            num_inference_steps: n,
            final_alpha_cumprod,
            clip,
        })
    }

    /// `alphas_cumprod[t]` as float32, or the final value for a negative `t`.
    fn alpha(&self, t: f64) -> f32 {
        if t < 0.0 {
            return self.final_alpha_cumprod;
        }
        self.train
            .alphas_cumprod
            .get(t as usize)
            .copied()
            .unwrap_or(self.final_alpha_cumprod)
    }

    /// `(c_skip, c_out)` of the consistency boundary condition at timestep `t` (float32, as
    /// diffusers computes them from the integer timestep tensor).
    fn boundary_scalings(&self, t: f64) -> (f32, f32) {
        let sigma_data2 = 0.25f32;
        let scaled = t as f32 * self.timestep_scaling;
        let denom = scaled * scaled + sigma_data2;
        (sigma_data2 / denom, scaled / denom.sqrt())
    }
}

/// `set_timesteps(n)` without custom timesteps: the origin schedule `k·j − 1` (`j = 1..=original`)
/// reversed, at the indices `floor(linspace(0, original, n, endpoint=False))`.
fn lcm_timesteps(total: usize, original: usize, n: usize) -> Vec<f64> {
    let k = total / original;
    let origin: Vec<usize> = (1..=original).rev().map(|j| j * k - 1).collect();
    let stride = original as f64 / n as f64;
    (0..n)
        .map(|i| origin[(i as f64 * stride).floor() as usize] as f64)
        .collect()
}

impl Scheduler for LcmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn order(&self) -> usize {
        1
    }

    fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    fn scale_model_input(&self, sample: Tensor<4>, _i: usize) -> Tensor<4> {
        sample
    }

    fn needs_noise(&self) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>> {
        let t = *self
            .timesteps
            .get(i)
            .ok_or_else(|| step_index_error(i, self.timesteps.len()))?;
        let last = i + 1 == self.timesteps.len();
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(t);
        let (alpha_t, alpha_prev) = (self.alpha(t), self.alpha(prev_t));
        let (sqrt_a, sqrt_b) = (f64::from(alpha_t.sqrt()), f64::from((1.0 - alpha_t).sqrt()));
        let x0 = match self.train.prediction {
            PredictionType::Epsilon => weighted_sum(
                (sample.clone(), 1.0 / sqrt_a),
                [(model_output, -sqrt_b / sqrt_a)],
            ),
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => {
                weighted_sum((sample.clone(), sqrt_a), [(model_output, -sqrt_b)])
            }
        };
        let x0 = match self.clip {
            Some(range) => x0.clamp(-range, range),
            None => x0,
        };
        let (c_skip, c_out) = self.boundary_scalings(t);
        let denoised = weighted_sum(
            (x0, f64::from(c_out)),
            [(sample.clone(), f64::from(c_skip))],
        );
        if last {
            return Ok(denoised);
        }
        let noise = step_noise(noise, &sample, "the LCM step")?;
        Ok(weighted_sum(
            (denoised, f64::from(alpha_prev.sqrt())),
            [(noise, f64::from((1.0 - alpha_prev).sqrt()))],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timesteps(json: &str, n: usize) -> Result<Vec<f64>> {
        let cfg = SchedulerConfig::from_json("t.json", json.as_bytes()).unwrap();
        Ok(LcmScheduler::new(&cfg, n)?.timesteps().to_vec())
    }

    /// Expected values printed by `LCMScheduler.from_config(cfg); s.set_timesteps(n);
    /// s.timesteps` (diffusers 0.42.1).
    #[test]
    fn timesteps_match_diffusers() {
        assert_eq!(timesteps("{}", 4).unwrap(), [999., 759., 499., 259.]);
        assert_eq!(
            timesteps("{}", 8).unwrap(),
            [999., 879., 759., 639., 499., 379., 259., 139.]
        );
        assert_eq!(timesteps("{}", 1).unwrap(), [999.]);
        assert_eq!(
            timesteps(r#"{"original_inference_steps": 7}"#, 3).unwrap(),
            [993., 709., 425.]
        );
        assert!(matches!(
            timesteps("{}", 51),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(timesteps(r#"{"original_inference_steps": 0}"#, 1).is_err());
        assert!(timesteps(r#"{"thresholding": true}"#, 4).is_err());
    }

    #[test]
    fn boundary_condition() {
        let cfg = SchedulerConfig::from_json("t.json", b"{}").unwrap();
        let s = LcmScheduler::new(&cfg, 4).unwrap();
        let (skip, out) = s.boundary_scalings(999.0);
        // 0.25 / (9990² + 0.25) and 9990 / sqrt(9990² + 0.25).
        assert!((skip - 2.505e-9).abs() < 1e-11, "{skip}");
        assert!((out - 1.0).abs() < 1e-6, "{out}");
        let (skip, out) = s.boundary_scalings(0.0);
        assert_eq!((skip, out), (1.0, 0.0));
    }
}
