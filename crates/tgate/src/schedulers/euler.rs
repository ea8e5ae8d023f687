//! Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without
//! churn): diffusers' `EulerDiscreteScheduler`. The helpers for timesteps, sigmas and input
//! scaling are shared with the ancestral variant.

use burn::tensor::Tensor;

use crate::error::Result;

use super::tables::{
    exponential_sigmas, karras_sigmas, np_arange, np_interp, np_linspace, np_round, sigma_to_t,
    TimestepSpacing, TrainSchedule,
};
use super::{step_index_error, weighted_sum, PredictionType, Scheduler, SchedulerConfig};

/// `EulerDiscreteScheduler` (deterministic: `s_churn = 0`), set up for a number of steps.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    prediction: PredictionType,
    timesteps: Vec<f64>,
    /// One sigma per timestep, then the final one (float32 values, as diffusers stores them).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
}

/// How the inference sigmas are spread (`use_karras_sigmas`, `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    /// Interpolated from the training table at the spaced timesteps.
    Interpolated,
    Karras,
    Exponential,
}

impl SigmaSpacing {
    /// Reads the three `use_*_sigmas` flags (beta sigmas need scipy's beta quantile: unsupported).
    pub(crate) fn read(config: &SchedulerConfig) -> Result<Self> {
        let karras = config.bool_or("use_karras_sigmas", false)?;
        let exponential = config.bool_or("use_exponential_sigmas", false)?;
        let beta = config.bool_or("use_beta_sigmas", false)?;
        match (karras, exponential, beta) {
            (_, _, true) if karras || exponential => Err(config.error(
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be set",
            )),
            (true, true, _) => Err(config.error(
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be set",
            )),
            (_, _, true) => Err(config.error("use_beta_sigmas is not supported")),
            (true, _, _) => Ok(SigmaSpacing::Karras),
            (_, true, _) => Ok(SigmaSpacing::Exponential),
            _ => Ok(SigmaSpacing::Interpolated),
        }
    }
}

/// The float32 timesteps of the Euler family's `set_timesteps` (descending, maybe fractional).
pub(crate) fn euler_timesteps(train: &TrainSchedule, n: usize) -> Vec<f32> {
    let t_count = train.num_train_timesteps;
    match train.spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t_count - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => (0..n)
            .rev()
            .map(|i| (i * (t_count / n)) as f32 + train.steps_offset as f32)
            .collect(),
        TimestepSpacing::Trailing => np_arange(t_count as f64, 0.0, -(t_count as f64 / n as f64))
            .into_iter()
            .map(|t| np_round(t) as f32 - 1.0)
            .collect(),
    }
}

/// The training sigmas at `timesteps`, linearly interpolated (`np.interp`), in float64.
pub(crate) fn interpolated_sigmas(table: &[f32], timesteps: &[f32]) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| np_interp(f64::from(t), table))
        .collect()
}

/// `init_noise_sigma` of the Euler family: the largest sigma, or `sqrt(max^2 + 1)` for
/// `leading` spacing (float32 maths, as the torch scalar).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().fold(0.0f32, |m, &s| m.max(s as f32));
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
        TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
    }
}

/// `sample / sqrt(sigma^2 + 1)` with the divisor rounded as torch's float32 scalar.
pub(crate) fn scale_by_sigma(sample: Tensor<4>, sigma: Option<&f64>) -> Tensor<4> {
    match sigma {
        Some(&sigma) => {
            let sigma = sigma as f32;
            sample.div_scalar((sigma * sigma + 1.0).sqrt())
        }
        None => sample,
    }
}

/// The ODE derivative `(sample - x0) / sigma` as weights on (sample, model output).
pub(crate) fn derivative_weights(prediction: PredictionType, sigma: f64) -> (f64, f64) {
    match prediction {
        // x0 = sample - sigma * eps
        PredictionType::Epsilon => (0.0, 1.0),
        // x0 = -sigma / sqrt(sigma^2 + 1) * v + sample / (sigma^2 + 1)
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (sigma / s2, 1.0 / s2.sqrt())
        }
        // x0 = model output
        PredictionType::Sample => (1.0 / sigma, -1.0 / sigma),
    }
}

impl EulerDiscreteScheduler {
    /// `EulerDiscreteScheduler.from_config(config)` then `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let n = num_inference_steps;
        let train = TrainSchedule::read(config, TimestepSpacing::Linspace, true, n)?;
        let interpolation = config.string_or("interpolation_type", "linear")?;
        if interpolation != "linear" {
            return Err(config.error(format!(
                "interpolation_type `{interpolation}` is not supported (only linear)"
            )));
        }
        let continuous = match config.string_or("timestep_type", "discrete")?.as_str() {
            "discrete" => false,
            "continuous" => true,
            other => return Err(config.error(format!("unsupported timestep_type `{other}`"))),
        };
        let spacing = SigmaSpacing::read(config)?;

        let table = train.sigmas_f32();
        let spaced = euler_timesteps(&train, n);
        let mut sigmas = interpolated_sigmas(&table, &spaced);
        let mut timesteps: Vec<f64> = spaced.into_iter().map(f64::from).collect();
        if spacing != SigmaSpacing::Interpolated {
            // Both ends come from the interpolated sigmas unless the config pins them.
            let sigma_min = config
                .opt_f64("sigma_min")?
                .unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.opt_f64("sigma_max")?.unwrap_or(sigmas[0]);
            sigmas = match spacing {
                SigmaSpacing::Karras => karras_sigmas(sigma_min, sigma_max, n),
                _ => exponential_sigmas(sigma_min, sigma_max, n),
            };
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigma_to_t(s, &log_sigmas) as f32))
                .collect();
        }
        sigmas.push(final_sigma(config, &train)?);
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();

        if continuous && train.prediction == PredictionType::VPrediction {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| f64::from(0.25 * (s as f32).ln()))
                .collect();
        }
        Ok(EulerDiscreteScheduler {
            prediction: train.prediction,
            init_noise_sigma: euler_init_noise_sigma(&sigmas, train.spacing),
            timesteps,
            sigmas,
            num_inference_steps: n,
        })
    }
}

/// The sigma after the last step (`final_sigmas_type`): 0, or the smallest training sigma.
pub(crate) fn final_sigma(config: &SchedulerConfig, train: &TrainSchedule) -> Result<f64> {
    match config.string_or("final_sigmas_type", "zero")?.as_str() {
        "zero" => Ok(0.0),
        "sigma_min" => {
            let a = train.alphas_cumprod[0];
            Ok(f64::from(((1.0 - a) / a).sqrt()))
        }
        other => Err(config.error(format!("unsupported final_sigmas_type `{other}`"))),
    }
}

impl Scheduler for EulerDiscreteScheduler {
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

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        _noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>> {
        if i >= self.timesteps.len() {
            return Err(step_index_error(i, self.timesteps.len()));
        }
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (ds, dm) = derivative_weights(self.prediction, sigma);
        let dt = next - sigma;
        Ok(weighted_sum(
            (sample, 1.0 + ds * dt),
            [(model_output, dm * dt)],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(json: &str, n: usize) -> EulerDiscreteScheduler {
        let cfg = SchedulerConfig::from_json("t.json", json.as_bytes()).unwrap();
        EulerDiscreteScheduler::new(&cfg, n).unwrap()
    }

    const SD: &str =
        r#""beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012"#;

    /// Expected values printed by `EulerDiscreteScheduler.from_config(cfg); s.set_timesteps(n)`
    /// then `s.timesteps`, `s.sigmas`, `s.init_noise_sigma` (diffusers 0.42.1, float32).
    #[test]
    fn tables_match_diffusers() {
        let s = build(&format!("{{{SD}}}"), 4);
        assert_eq!(s.timesteps, [999.0, 666.0, 333.0, 0.0]);
        // torch's float32 sqrt is not correctly rounded (off by up to an ulp); ours is.
        let want = [14.614647, 2.9183085, 0.9323584, 0.029167535, 0.0];
        for (got, want) in s.sigmas.iter().zip(want) {
            assert!((got - want).abs() <= 1e-7 * want, "{got} vs {want}");
        }
        assert_eq!(s.init_noise_sigma as f32, 14.614647);

        let s = build(
            &format!(r#"{{{SD}, "timestep_spacing": "leading", "steps_offset": 1}}"#),
            3,
        );
        assert_eq!(s.timesteps, [667.0, 334.0, 1.0]);
        assert_eq!(s.init_noise_sigma as f32, 3.095523);

        let s = build(&format!(r#"{{{SD}, "use_karras_sigmas": true}}"#), 4);
        // Derived from `ln` of the sigma table, whose square roots may differ by an ulp.
        for (got, want) in s.timesteps.iter().zip([999.0, 687.15326, 145.93906, 0.0]) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }
}
