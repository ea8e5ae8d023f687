//! DDIM (Song et al. 2020), deterministic (`eta = 0`): diffusers' `DDIMScheduler`.

use burn::tensor::Tensor;

use crate::error::Result;

use super::tables::{np_arange, np_linspace, np_round, TimestepSpacing, TrainSchedule};
use super::{step_index_error, weighted_sum, PredictionType, Scheduler, SchedulerConfig};

/// `DDIMScheduler` with `eta = 0` (no noise), set up for a number of steps.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    train: TrainSchedule,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    /// `alphas_cumprod` used past the last step: 1, or `alphas_cumprod[0]`.
    final_alpha_cumprod: f64,
    /// `Some(range)` when the predicted clean sample is clipped to `[-range, range]`.
    clip: Option<f64>,
}

impl DdimScheduler {
    /// `DDIMScheduler.from_config(config)` then `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let train =
            TrainSchedule::read(config, TimestepSpacing::Leading, true, num_inference_steps)?;
        if config.bool_or("thresholding", false)? {
            return Err(
                config.error("DDIM dynamic thresholding (`thresholding: true`) is not supported")
            );
        }
        let clip = if config.bool_or("clip_sample", true)? {
            Some(config.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        let final_alpha_cumprod = if config.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            f64::from(train.alphas_cumprod[0])
        };
        let timesteps = ddim_timesteps(&train, num_inference_steps);
        train.check_timesteps(&timesteps)?;
        Ok(DdimScheduler {
            train,
            timesteps,
            num_inference_steps,
            final_alpha_cumprod,
            clip,
        })
    }
}

/// The descending integer timesteps of `DDIMScheduler.set_timesteps`.
fn ddim_timesteps(train: &TrainSchedule, n: usize) -> Vec<f64> {
    let t_count = train.num_train_timesteps;
    match train.spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t_count - 1) as f64, n)
            .into_iter()
            .rev()
            .map(np_round)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t_count / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f64 + train.steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t_count as f64, 0.0, -(t_count as f64 / n as f64))
            .into_iter()
            .map(|t| np_round(t) - 1.0)
            .collect(),
    }
}

impl Scheduler for DdimScheduler {
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

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        _noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>> {
        let t = *self
            .timesteps
            .get(i)
            .ok_or_else(|| step_index_error(i, self.timesteps.len()))?;
        // diffusers steps back by the leading stride whatever the spacing.
        let prev_t = t - (self.train.num_train_timesteps / self.num_inference_steps) as f64;
        let alpha_t = self
            .train
            .alpha_cumprod(t)
            .ok_or_else(|| step_index_error(i, self.timesteps.len()))?;
        let alpha_prev = self
            .train
            .alpha_cumprod(prev_t)
            .unwrap_or(self.final_alpha_cumprod);
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());

        // The predicted clean sample x0 and noise eps, as combinations of (sample, output).
        let (x0, eps) = match self.train.prediction {
            PredictionType::Epsilon => (
                weighted_sum(
                    (sample.clone(), 1.0 / sqrt_a),
                    [(model_output.clone(), -sqrt_b / sqrt_a)],
                ),
                model_output,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                weighted_sum((sample, 1.0 / sqrt_b), [(model_output, -sqrt_a / sqrt_b)]),
            ),
            PredictionType::VPrediction => (
                weighted_sum((sample.clone(), sqrt_a), [(model_output.clone(), -sqrt_b)]),
                weighted_sum((model_output, sqrt_a), [(sample, sqrt_b)]),
            ),
        };
        let x0 = match self.clip {
            Some(range) => x0.clamp(-range, range),
            None => x0,
        };
        // eta = 0: no variance term; the direction keeps the whole 1 - alpha_prev.
        Ok(weighted_sum(
            (x0, alpha_prev.sqrt()),
            [(eps, (1.0 - alpha_prev).sqrt())],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timesteps(json: &str, n: usize) -> Vec<f64> {
        let cfg = SchedulerConfig::from_json("t.json", json.as_bytes()).unwrap();
        DdimScheduler::new(&cfg, n).unwrap().timesteps().to_vec()
    }

    /// Expected values printed by `DDIMScheduler.from_config(cfg); s.set_timesteps(n); s.timesteps`
    /// (diffusers 0.42.1).
    #[test]
    fn timesteps_match_diffusers() {
        assert_eq!(
            timesteps(r#"{"steps_offset": 1}"#, 10),
            [901., 801., 701., 601., 501., 401., 301., 201., 101., 1.]
        );
        assert_eq!(
            timesteps(r#"{"timestep_spacing": "trailing"}"#, 7),
            [999., 856., 713., 570., 428., 285., 142.]
        );
        assert_eq!(
            timesteps(r#"{"timestep_spacing": "linspace"}"#, 7),
            [999., 832., 666., 500., 333., 166., 0.]
        );
        assert_eq!(timesteps(r#"{"timestep_spacing": "linspace"}"#, 1), [0.]);
        // steps_offset pushes the first timestep out of the table: an error, not a panic.
        let cfg = SchedulerConfig::from_json("t.json", br#"{"steps_offset": 1}"#).unwrap();
        assert!(DdimScheduler::new(&cfg, 1000).is_err());
    }
}
