//! Ancestral Euler sampling (k-diffusion's `sample_euler_ancestral`): diffusers'
//! `EulerAncestralDiscreteScheduler`. Each step goes down to `sigma_down` deterministically and
//! adds fresh noise of scale `sigma_up`, so `step` needs standard-normal `noise`.

use burn::tensor::Tensor;

use crate::error::Result;

use super::euler::{
    derivative_weights, euler_init_noise_sigma, euler_timesteps, interpolated_sigmas,
    scale_by_sigma,
};
use super::tables::{TimestepSpacing, TrainSchedule};
use super::{
    step_index_error, step_noise, weighted_sum, PredictionType, Scheduler, SchedulerConfig,
};

/// `EulerAncestralDiscreteScheduler`, set up for a number of steps.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    prediction: PredictionType,
    timesteps: Vec<f64>,
    /// One sigma per timestep, then 0 (float32 values, as diffusers stores them).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
}

impl EulerAncestralScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)` then `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let n = num_inference_steps;
        let train = TrainSchedule::read(config, TimestepSpacing::Linspace, true, n)?;
        if train.prediction == PredictionType::Sample {
            return Err(config.error(
                "Euler ancestral supports prediction_type epsilon or v_prediction, not sample",
            ));
        }
        let spaced = euler_timesteps(&train, n);
        let sigmas: Vec<f64> = interpolated_sigmas(&train.sigmas_f32(), &spaced)
            .into_iter()
            .chain([0.0])
            .map(|s| f64::from(s as f32))
            .collect();
        Ok(EulerAncestralScheduler {
            prediction: train.prediction,
            init_noise_sigma: euler_init_noise_sigma(&sigmas, train.spacing),
            timesteps: spaced.into_iter().map(f64::from).collect(),
            sigmas,
            num_inference_steps: n,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn order(&self) -> usize {
        1
    }

    fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    /// Divides by `sqrt(sigma_i^2 + 1)`; an out-of-range `i` leaves the sample as it is.
    fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        scale_by_sigma(
            sample,
            self.sigmas.get(i).filter(|_| i < self.timesteps.len()),
        )
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
        if i >= self.timesteps.len() {
            return Err(step_index_error(i, self.timesteps.len()));
        }
        let noise = step_noise(noise, &sample, "the Euler ancestral step")?;
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let (ds, dm) = derivative_weights(self.prediction, from);
        let dt = sigma_down - from;
        Ok(weighted_sum(
            (sample, 1.0 + ds * dt),
            [(model_output, dm * dt), (noise, sigma_up)],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values printed by `EulerAncestralDiscreteScheduler.from_config(cfg);
    /// s.set_timesteps(n)` then `s.timesteps`, `s.init_noise_sigma` (diffusers 0.42.1, float32).
    #[test]
    fn tables_match_diffusers() {
        let cfg = SchedulerConfig::from_json(
            "t.json",
            br#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "timestep_spacing": "trailing"}"#,
        )
        .unwrap();
        let s = EulerAncestralScheduler::new(&cfg, 3).unwrap();
        assert_eq!(s.timesteps, [999.0, 666.0, 332.0]);
        assert_eq!(s.init_noise_sigma as f32, 14.614647);
        let cfg =
            SchedulerConfig::from_json("t.json", br#"{"prediction_type": "sample"}"#).unwrap();
        assert!(EulerAncestralScheduler::new(&cfg, 3).is_err());
    }
}
