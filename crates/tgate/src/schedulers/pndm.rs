//! Pseudo numerical methods (Liu et al. 2022): diffusers' `PNDMScheduler`.
//!
//! With `skip_prk_steps` (Stable Diffusion's setting) it is the linear multistep PLMS sampler:
//! the first update is a plain step, the second re-evaluates the model at the same timestep
//! (so the timestep list repeats one value) and averages, then Adams-Bashforth of order 2, 3
//! and 4 over the stored model outputs. Without it, 12 Runge-Kutta (PRK) iterations warm up
//! the history first.

use burn::tensor::Tensor;

use crate::error::{Error, Result};

use super::tables::{np_arange, np_linspace, np_round, TimestepSpacing, TrainSchedule};
use super::{step_index_error, weighted_sum, PredictionType, Scheduler, SchedulerConfig};

/// `PNDMScheduler`, set up for a number of steps.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    train: TrainSchedule,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    /// The 12 PRK timesteps (3 steps of 4 model evaluations; empty with `skip_prk_steps`);
    /// they start `timesteps`.
    prk_timesteps: Vec<f64>,
    final_alpha_cumprod: f64,
    /// Runge-Kutta warm-up instead of a PLMS start.
    use_prk: bool,
    /// diffusers' `counter`: the number of steps taken.
    counter: usize,
    /// The last (up to 4) model outputs the multistep formulas combine (`ets`).
    ets: Vec<Tensor<4>>,
    /// The sample a two-stage update started from (`cur_sample`).
    cur_sample: Option<Tensor<4>>,
    /// The weighted sum of a PRK step's model outputs so far (`cur_model_output`).
    cur_model_output: Option<Tensor<4>>,
}

impl PndmScheduler {
    /// `PNDMScheduler.from_config(config)` then `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let n = num_inference_steps;
        let train = TrainSchedule::read(config, TimestepSpacing::Leading, false, n)?;
        if train.prediction == PredictionType::Sample {
            return Err(
                config.error("PNDM supports prediction_type epsilon or v_prediction, not sample")
            );
        }
        let use_prk = !config.bool_or("skip_prk_steps", false)?;
        let final_alpha_cumprod = if config.bool_or("set_alpha_to_one", false)? {
            1.0
        } else {
            f64::from(train.alphas_cumprod[0])
        };

        let base = base_timesteps(&train, n);
        let (prk_timesteps, plms_timesteps) = if use_prk {
            if n < 4 {
                return Err(Error::param(
                    "steps",
                    format!(
                        "PNDM's Runge-Kutta warm-up needs at least 4 steps, got {n} (or set skip_prk_steps)"
                    ),
                ));
            }
            let half = (train.num_train_timesteps / n / 2) as f64;
            (
                prk_schedule(&base[n - 4..], half),
                base[..n - 3].iter().rev().copied().collect(),
            )
        } else {
            (Vec::new(), plms_schedule(&base))
        };
        let timesteps: Vec<f64> = prk_timesteps
            .iter()
            .chain(&plms_timesteps)
            .copied()
            .collect();
        train.check_timesteps(&timesteps)?;
        Ok(PndmScheduler {
            train,
            timesteps,
            num_inference_steps: n,
            prk_timesteps,
            final_alpha_cumprod,
            use_prk,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// Forgets the history (diffusers does this in `set_timesteps`).
    fn reset(&mut self) {
        self.counter = 0;
        self.ets.clear();
        self.cur_sample = None;
        self.cur_model_output = None;
    }

    /// `alphas_cumprod[t]`, or the final value for a negative `t`.
    fn alpha(&self, t: f64) -> Result<f64> {
        if t < 0.0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.train.alpha_cumprod(t).ok_or_else(|| {
            Error::param(
                "steps",
                format!("timestep {t} is outside the training table"),
            )
        })
    }

    /// One PNDM transfer from `sample` at `t` to `prev_t` (formula (9) of the paper).
    fn prev_sample(
        &self,
        sample: Tensor<4>,
        t: f64,
        prev_t: f64,
        model_output: Tensor<4>,
    ) -> Result<Tensor<4>> {
        let alpha_t = self.alpha(t)?;
        let alpha_prev = self.alpha(prev_t)?;
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let eps_coeff = -(alpha_prev - alpha_t) / denom;
        // v-prediction: eps = sqrt(a) v + sqrt(b) sample, folded into the coefficients on the
        // host (near a zero terminal SNR the two sample terms nearly cancel).
        let (sample_coeff, output_coeff) = match self.train.prediction {
            PredictionType::VPrediction => (
                sample_coeff + eps_coeff * beta_t.sqrt(),
                eps_coeff * alpha_t.sqrt(),
            ),
            _ => (sample_coeff, eps_coeff),
        };
        Ok(weighted_sum(
            (sample, sample_coeff),
            [(model_output, output_coeff)],
        ))
    }

    /// A Runge-Kutta warm-up iteration (diffusers' `step_prk`).
    fn step_prk(
        &mut self,
        model_output: Tensor<4>,
        t: f64,
        sample: Tensor<4>,
    ) -> Result<Tensor<4>> {
        let half = (self.train.num_train_timesteps / self.num_inference_steps / 2) as f64;
        let prev_t = if self.counter % 2 == 1 { t } else { t - half };
        let start_t = self.prk_timesteps[self.counter / 4 * 4];
        let accumulate = |acc: Option<Tensor<4>>, weight: f64, output: Tensor<4>| match acc {
            Some(acc) => weighted_sum((acc, 1.0), [(output, weight)]),
            None => output.mul_scalar(weight),
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(accumulate(
                    self.cur_model_output.take(),
                    1.0 / 6.0,
                    model_output.clone(),
                ));
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                self.cur_model_output = Some(accumulate(
                    self.cur_model_output.take(),
                    1.0 / 3.0,
                    model_output.clone(),
                ));
                model_output
            }
            _ => accumulate(self.cur_model_output.take(), 1.0 / 6.0, model_output),
        };
        let from = self.cur_sample.clone().unwrap_or(sample);
        self.prev_sample(from, start_t, prev_t, model_output)
    }

    /// A linear multistep iteration (diffusers' `step_plms`).
    fn step_plms(
        &mut self,
        model_output: Tensor<4>,
        t: f64,
        sample: Tensor<4>,
    ) -> Result<Tensor<4>> {
        if self.use_prk && self.ets.len() < 3 {
            return Err(Error::param(
                "step",
                "PNDM's multistep phase needs the 12 Runge-Kutta iterations first",
            ));
        }
        let stride = (self.train.num_train_timesteps / self.num_inference_steps) as f64;
        let (mut t, mut prev_t) = (t, t - stride);
        if self.counter == 1 {
            // The repeated timestep: redo the first step from its start with averaged outputs.
            prev_t = t;
            t += stride;
        } else {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        }
        let mut sample = sample;
        let e = &self.ets;
        let n = e.len();
        let model_output = match (n, self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.clone());
                model_output
            }
            (1, 1) => {
                if let Some(start) = self.cur_sample.take() {
                    sample = start;
                }
                weighted_sum((model_output, 0.5), [(e[0].clone(), 0.5)])
            }
            (2, _) => weighted_sum((e[1].clone(), 1.5), [(e[0].clone(), -0.5)]),
            (3, _) => weighted_sum(
                (e[2].clone(), 23.0 / 12.0),
                [(e[1].clone(), -16.0 / 12.0), (e[0].clone(), 5.0 / 12.0)],
            ),
            _ => weighted_sum(
                (e[n - 1].clone(), 55.0 / 24.0),
                [
                    (e[n - 2].clone(), -59.0 / 24.0),
                    (e[n - 3].clone(), 37.0 / 24.0),
                    (e[n - 4].clone(), -9.0 / 24.0),
                ],
            ),
        };
        self.prev_sample(sample, t, prev_t, model_output)
    }
}

/// The ascending timesteps PNDM derives its schedule from (`_timesteps`).
fn base_timesteps(train: &TrainSchedule, n: usize) -> Vec<f64> {
    let t_count = train.num_train_timesteps;
    match train.spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t_count - 1) as f64, n)
            .into_iter()
            .map(np_round)
            .collect(),
        TimestepSpacing::Leading => (0..n)
            .map(|i| (i * (t_count / n)) as f64 + train.steps_offset as f64)
            .collect(),
        TimestepSpacing::Trailing => np_arange(t_count as f64, 0.0, -(t_count as f64 / n as f64))
            .into_iter()
            .rev()
            .map(|t| np_round(t) - 1.0)
            .collect(),
    }
}

/// PLMS order: descending, with the second-largest timestep repeated.
fn plms_schedule(base: &[f64]) -> Vec<f64> {
    let n = base.len();
    let mut ascending: Vec<f64> = base[..n - 1].to_vec();
    if n >= 2 {
        ascending.push(base[n - 2]);
    }
    ascending.push(base[n - 1]);
    ascending.reverse();
    ascending
}

/// PRK order for the 4 largest timesteps `last4` (ascending) and half a stride `half`:
/// each step at `s` evaluates `s`, `s - half` twice, then the next step's start.
fn prk_schedule(last4: &[f64], half: f64) -> Vec<f64> {
    // Ascending points a, a+h, b, b+h, c, c+h, d; each doubled; the outer two dropped.
    let points: Vec<f64> = last4.iter().flat_map(|&s| [s, s + half]).take(7).collect();
    let doubled: Vec<f64> = points.iter().flat_map(|&p| [p, p]).collect();
    doubled[1..doubled.len() - 1]
        .iter()
        .rev()
        .copied()
        .collect()
}

impl Scheduler for PndmScheduler {
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
        let t = *self
            .timesteps
            .get(i)
            .ok_or_else(|| step_index_error(i, self.timesteps.len()))?;
        if i == 0 {
            self.reset();
        } else if i != self.counter {
            return Err(Error::param(
                "step",
                format!(
                    "PNDM steps must run in order: expected {}, got {i}",
                    self.counter
                ),
            ));
        }
        let prev = if self.counter < self.prk_timesteps.len() {
            self.step_prk(model_output, t, sample)?
        } else {
            self.step_plms(model_output, t, sample)?
        };
        self.counter += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timesteps(json: &str, n: usize) -> Vec<f64> {
        let cfg = SchedulerConfig::from_json("t.json", json.as_bytes()).unwrap();
        PndmScheduler::new(&cfg, n).unwrap().timesteps().to_vec()
    }

    /// Expected values printed by `PNDMScheduler.from_config(cfg); s.set_timesteps(n); s.timesteps`
    /// (diffusers 0.42.1).
    #[test]
    fn timesteps_match_diffusers() {
        assert_eq!(
            timesteps(r#"{"skip_prk_steps": true, "steps_offset": 1}"#, 10),
            [901., 801., 801., 701., 601., 501., 401., 301., 201., 101., 1.]
        );
        assert_eq!(timesteps(r#"{"skip_prk_steps": true}"#, 1), [0.]);
        assert_eq!(
            timesteps(
                r#"{"skip_prk_steps": true, "timestep_spacing": "trailing"}"#,
                4
            ),
            [999., 749., 749., 499., 249.]
        );
        assert_eq!(
            timesteps("{}", 5),
            [800., 700., 700., 600., 600., 500., 500., 400., 400., 300., 300., 200., 200., 0.]
        );
    }
}
