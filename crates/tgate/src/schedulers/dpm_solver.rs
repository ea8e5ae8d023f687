//! DPM-Solver multistep (Lu et al. 2022): diffusers' `DPMSolverMultistepScheduler`.
//!
//! With the defaults (`algorithm_type: dpmsolver++`, `solver_order: 2`, `solver_type:
//! midpoint`) this is "DPM++ 2M": the model output is turned into a clean-sample prediction
//! `x0`, the first step is first order and later steps extrapolate from the last two `x0`s in
//! log-SNR time `lambda = ln(alpha / sigma)`. Also supported: `solver_type: heun`, orders 1
//! and 3, the deprecated noise-predicting `dpmsolver`, Karras / exponential / Lu sigmas.
//! Not supported (an error): the SDE variants, flow sigmas, beta sigmas, thresholding, learned
//! variance.

use burn::tensor::Tensor;

use crate::error::{Error, Result};

use super::euler::{final_sigma, SigmaSpacing};
use super::tables::{
    exponential_sigmas, karras_sigmas, np_arange, np_interp, np_linspace, np_round, sigma_to_t,
    BetaSchedule, TimestepSpacing, TrainSchedule,
};
use super::{step_index_error, weighted_sum, PredictionType, Scheduler, SchedulerConfig};

/// `DPMSolverMultistepScheduler`, set up for a number of steps.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    prediction: PredictionType,
    /// `dpmsolver++` (data prediction) rather than `dpmsolver` (noise prediction).
    data_prediction: bool,
    heun: bool,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    timesteps: Vec<f64>,
    /// One sigma per timestep, then the final one (float32 values).
    sigmas: Vec<f64>,
    num_inference_steps: usize,
    /// Converted model outputs of the last `solver_order` steps, oldest first.
    history: Vec<Tensor<4>>,
    /// diffusers' `lower_order_nums`: steps taken so far, capped at `solver_order`.
    lower_order_nums: usize,
    /// The step index expected next.
    next_step: usize,
}

/// `(alpha_t, sigma_t, lambda_t)` of a sigma: `alpha = 1 / sqrt(sigma^2 + 1)`.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config)` then `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let n = num_inference_steps;
        let train = TrainSchedule::read(config, TimestepSpacing::Linspace, true, n)?;
        let solver_order = usize::try_from(config.i64_or("solver_order", 2)?)
            .ok()
            .filter(|o| (1..=3).contains(o))
            .ok_or_else(|| config.error("solver_order must be 1, 2 or 3"))?;
        let data_prediction = match config.string_or("algorithm_type", "dpmsolver++")?.as_str() {
            "dpmsolver++" | "deis" => true,
            "dpmsolver" => false,
            other => return Err(config.error(format!("algorithm_type `{other}` is not supported"))),
        };
        let heun = match config.string_or("solver_type", "midpoint")?.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => return Err(config.error(format!("unsupported solver_type `{other}`"))),
        };
        let final_sigma_zero = config.string_or("final_sigmas_type", "zero")? == "zero";
        if !data_prediction && final_sigma_zero {
            return Err(config.error("final_sigmas_type zero needs algorithm_type dpmsolver++"));
        }
        for flag in ["thresholding", "use_flow_sigmas"] {
            if config.bool_or(flag, false)? {
                return Err(config.error(format!("`{flag}: true` is not supported")));
            }
        }
        if let Some(kind @ ("learned" | "learned_range")) =
            config.opt_string("variance_type")?.as_deref()
        {
            return Err(config.error(format!("variance_type `{kind}` is not supported")));
        }
        let sigma_spacing = SigmaSpacing::read(config)?;
        let lu_lambdas = config.bool_or("use_lu_lambdas", false)?;

        let (timesteps, sigmas) = dpm_schedule(config, &train, n, sigma_spacing, lu_lambdas)?;

        Ok(DpmSolverMultistepScheduler {
            prediction: train.prediction,
            data_prediction,
            heun,
            solver_order,
            lower_order_final: config.bool_or("lower_order_final", true)?,
            euler_at_final: config.bool_or("euler_at_final", false)?,
            final_sigma_zero,
            timesteps,
            sigmas,
            num_inference_steps: n,
            history: Vec::with_capacity(solver_order),
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// The model output as the solver's variable: `x0` for dpmsolver++, noise for dpmsolver.
    fn convert(&self, model_output: Tensor<4>, sample: Tensor<4>, sigma: f64) -> Tensor<4> {
        let (alpha, sigma_t, _) = alpha_sigma_lambda(sigma);
        match (self.data_prediction, self.prediction) {
            (true, PredictionType::Epsilon) => {
                weighted_sum((sample, 1.0 / alpha), [(model_output, -sigma_t / alpha)])
            }
            (true, PredictionType::Sample) | (false, PredictionType::Epsilon) => model_output,
            (true, PredictionType::VPrediction) => {
                weighted_sum((sample, alpha), [(model_output, -sigma_t)])
            }
            (false, PredictionType::Sample) => {
                weighted_sum((sample, 1.0 / sigma_t), [(model_output, -alpha / sigma_t)])
            }
            (false, PredictionType::VPrediction) => {
                weighted_sum((model_output, alpha), [(sample, sigma_t)])
            }
        }
    }

    /// The multistep update of `order` from `sample` at step `i` to step `i + 1`.
    fn update(&self, order: usize, i: usize, sample: Tensor<4>) -> Tensor<4> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (alpha_0, sigma_0, lambda_0) = alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_0;
        // x_t = c_s * sample + c0 * D0 + c1 * D1 + c2 * D2 (D1, D2: divided differences).
        let (c_s, c0, phi) = if self.data_prediction {
            (sigma_t / sigma_0, -alpha_t * (-h).exp_m1(), alpha_t)
        } else {
            (alpha_t / alpha_0, -sigma_t * h.exp_m1(), sigma_t)
        };
        let m = &self.history;
        let m0 = m[m.len() - 1].clone();
        if order == 1 {
            return weighted_sum((sample, c_s), [(m0, c0)]);
        }
        let lambda_1 = alpha_sigma_lambda(self.sigmas[i - 1]).2;
        let r0 = (lambda_0 - lambda_1) / h;
        // The first-order correction, on D1 = (m0 - m1) / r0.
        let c1 = if self.data_prediction {
            if self.heun || order == 3 {
                phi * ((-h).exp_m1() / h + 1.0)
            } else {
                0.5 * c0
            }
        } else if self.heun || order == 3 {
            -phi * (h.exp_m1() / h - 1.0)
        } else {
            0.5 * c0
        };
        let d10 = m0.clone() - m[m.len() - 2].clone();
        if order == 2 {
            return weighted_sum((sample, c_s), [(m0, c0), (d10, c1 / r0)]);
        }
        let lambda_2 = alpha_sigma_lambda(self.sigmas[i - 2]).2;
        let r1 = (lambda_1 - lambda_2) / h;
        let c2 = if self.data_prediction {
            -phi * (((-h).exp_m1() + h) / (h * h) - 0.5)
        } else {
            -phi * ((h.exp_m1() - h) / (h * h) - 0.5)
        };
        // D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1),
        // with D1_0 = d10 / r0 and D1_1 = d21 / r1.
        let d21 = m[m.len() - 2].clone() - m[m.len() - 3].clone();
        let k = r0 / (r0 + r1);
        let w10 = (c1 * (1.0 + k) + c2 / (r0 + r1)) / r0;
        let w21 = -(c1 * k + c2 / (r0 + r1)) / r1;
        weighted_sum((sample, c_s), [(m0, c0), (d10, w10), (d21, w21)])
    }
}

/// How many of the largest timesteps `lambda_min_clipped` cuts off
/// (`searchsorted(flip(lambda_t), lambda_min_clipped)`).
fn clipped_count(train: &TrainSchedule, lambda_min_clipped: f64) -> usize {
    let mut alphas_cumprod = train.alphas_cumprod.clone();
    if train.zero_snr {
        if let Some(last) = alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    alphas_cumprod
        .iter()
        .rev()
        .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
        .take_while(|&lambda| f64::from(lambda) < lambda_min_clipped)
        .count()
        .min(train.num_train_timesteps - 1)
}

/// The integer timesteps of `DPMSolverMultistepScheduler.set_timesteps` (descending).
fn dpm_timesteps(train: &TrainSchedule, last_t: usize, n: usize) -> Vec<f64> {
    match train.spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (last_t - 1) as f64, n + 1)
            .into_iter()
            .rev()
            .take(n)
            .map(np_round)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = last_t / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio) as f64 + train.steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let step = train.num_train_timesteps as f64 / n as f64;
            np_arange(last_t as f64, 0.0, -step)
                .into_iter()
                .map(|t| np_round(t) - 1.0)
                .collect()
        }
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
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

    /// Steps must come in order; `i == 0` starts over.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        _noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>> {
        let len = self.timesteps.len();
        if i >= len {
            return Err(step_index_error(i, len));
        }
        if i == 0 {
            self.history.clear();
            self.lower_order_nums = 0;
        } else if i != self.next_step {
            return Err(Error::param(
                "step",
                format!(
                    "DPM-Solver steps must run in order: expected {}, got {i}",
                    self.next_step
                ),
            ));
        }
        let short = self.lower_order_final && len < 15;
        let lower_final = i == len - 1 && (self.euler_at_final || short || self.final_sigma_zero);
        let lower_second = i + 2 == len && short;

        let converted = self.convert(model_output, sample.clone(), self.sigmas[i]);
        if self.history.len() == self.solver_order {
            self.history.remove(0);
        }
        self.history.push(converted);

        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_second {
            2
        } else {
            3
        };
        let prev = self.update(order, i, sample);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.next_step = i + 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timesteps(json: &str, n: usize) -> Vec<f64> {
        let cfg = SchedulerConfig::from_json("t.json", json.as_bytes()).unwrap();
        DpmSolverMultistepScheduler::new(&cfg, n)
            .unwrap()
            .timesteps()
            .to_vec()
    }

    /// Expected values printed by `DPMSolverMultistepScheduler.from_config(cfg);
    /// s.set_timesteps(n); s.timesteps` (diffusers 0.42.1).
    #[test]
    fn timesteps_match_diffusers() {
        let sd = r#""beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012"#;
        assert_eq!(
            timesteps(&format!("{{{sd}}}"), 5),
            [999., 799., 599., 400., 200.]
        );
        assert_eq!(
            timesteps(
                &format!(r#"{{{sd}, "timestep_spacing": "leading", "steps_offset": 1}}"#),
                5
            ),
            [831., 665., 499., 333., 167.]
        );
        assert_eq!(
            timesteps(&format!(r#"{{{sd}, "use_karras_sigmas": true}}"#), 5),
            [999., 786., 427., 59., 0.]
        );
    }
}

/// The inference timesteps and sigmas (with the final sigma) of a DPM-Solver schedule, as
/// diffusers' `set_timesteps` derives them.
fn dpm_schedule(
    config: &SchedulerConfig,
    train: &TrainSchedule,
    n: usize,
    sigma_spacing: SigmaSpacing,
    lu_lambdas: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let table = train.sigmas_f32();
    let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
    let last_t = train.num_train_timesteps
        - clipped_count(
            train,
            config.f64_or("lambda_min_clipped", f64::NEG_INFINITY)?,
        );
    let spaced = dpm_timesteps(train, last_t, n);
    // Derived timesteps are rounded, except for the cosine schedule; all become integers.
    let to_timestep = |sigma: f64, round: bool| {
        let t = sigma_to_t(sigma, &log_sigmas);
        let t = if round && train.beta_schedule != BetaSchedule::SquaredCosCapV2 {
            np_round(t)
        } else {
            t
        };
        t.trunc()
    };
    // DPM has no sigma_min / sigma_max parameters, but diffusers reads them from the config
    // when the file has them; otherwise the ends of the training table.
    let sigma_min = config.opt_f64("sigma_min")?.unwrap_or(f64::from(table[0]));
    let sigma_max = config
        .opt_f64("sigma_max")?
        .unwrap_or(f64::from(table[table.len() - 1]));
    let (timesteps, mut sigmas): (Vec<f64>, Vec<f64>) = if sigma_spacing == SigmaSpacing::Karras {
        let sigmas = karras_sigmas(sigma_min, sigma_max, n);
        (
            sigmas.iter().map(|&s| to_timestep(s, true)).collect(),
            sigmas,
        )
    } else if lu_lambdas {
        let (low, high) = (
            f64::from(log_sigmas[0]),
            f64::from(log_sigmas[log_sigmas.len() - 1]),
        );
        let sigmas: Vec<f64> = np_linspace(0.0, 1.0, n)
            .into_iter()
            .map(|r| (high + r * (low - high)).exp())
            .collect();
        (
            sigmas.iter().map(|&s| to_timestep(s, true)).collect(),
            sigmas,
        )
    } else if sigma_spacing == SigmaSpacing::Exponential {
        let sigmas = exponential_sigmas(sigma_min, sigma_max, n);
        (
            sigmas.iter().map(|&s| to_timestep(s, false)).collect(),
            sigmas,
        )
    } else {
        (
            spaced.clone(),
            spaced.iter().map(|&t| np_interp(t, &table)).collect(),
        )
    };
    sigmas.push(final_sigma(config, train)?);
    let sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
    Ok((timesteps, sigmas))
}
