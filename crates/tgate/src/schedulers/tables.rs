//! Training tables and the numpy/torch helpers the schedulers share.
//!
//! diffusers builds its tables with float32 torch tensors (`betas`, `alphas_cumprod`, sigmas)
//! and picks timesteps with float64 numpy. To match it to the last bit these functions round
//! exactly where torch and numpy do:
//! - `torch.linspace(.., dtype=float32)` on the CPU returns `start + step * i` (or
//!   `end - step * (n - 1 - i)` for the second half) with a single rounding: a fused multiply-add
//!   with `step = (end - start) / (n - 1)` in float32;
//! - `torch.cumprod` on a float32 CPU tensor accumulates in float64 and rounds each output;
//! - `np.round` rounds half to even; `np.arange` with a float step writes `start + i * delta`
//!   with `delta = (start + step) - start`;
//! - `np.linspace` writes `start + i * step` and puts `stop` exactly at the end.
//!
//! The bit-exactness was checked against torch 2.15 / numpy 2.4.6 / diffusers 0.42.1 on
//! x86-64 (see the tests). One thing is not mirrored: torch's float32 `sqrt` (and `** 0.5`)
//! on the CPU is not correctly rounded (off by up to an ulp, depending on the build), so the
//! sigma tables and zero-SNR betas, which take square roots, can differ from diffusers by an
//! ulp; Rust's correctly rounded `sqrt` is used.

use crate::error::{Error, Result};

use super::{PredictionType, SchedulerConfig};

/// How the training betas are laid out (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

/// How inference timesteps are spread over the training range (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The settings all five schedulers read, with the training `betas` already built.
#[derive(Debug, Clone)]
pub(crate) struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    pub prediction: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// Whether `rescale_betas_zero_snr` was applied.
    pub zero_snr: bool,
    /// `1 - betas`, cumulative product, float32 as in torch.
    pub alphas_cumprod: Vec<f32>,
}

impl TrainSchedule {
    /// Reads the shared keys. `default_spacing` is the reading class's default;
    /// `knows_zero_snr` is false for PNDM, which has no `rescale_betas_zero_snr`.
    pub fn read(
        cfg: &SchedulerConfig,
        default_spacing: TimestepSpacing,
        knows_zero_snr: bool,
        num_inference_steps: usize,
    ) -> Result<Self> {
        let num_train_timesteps = usize::try_from(cfg.i64_or("num_train_timesteps", 1000)?)
            .ok()
            .filter(|&n| n >= 2)
            .ok_or_else(|| cfg.error("`num_train_timesteps` must be at least 2"))?;
        if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
            return Err(Error::param(
                "steps",
                format!(
                    "{num_inference_steps} inference steps: expected 1 to {num_train_timesteps}"
                ),
            ));
        }
        let beta_schedule = match cfg.string_or("beta_schedule", "linear")?.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => return Err(cfg.error(format!("unsupported beta_schedule `{other}`"))),
        };
        let spacing = match cfg.opt_string("timestep_spacing")?.as_deref() {
            None => default_spacing,
            Some("linspace") => TimestepSpacing::Linspace,
            Some("leading") => TimestepSpacing::Leading,
            Some("trailing") => TimestepSpacing::Trailing,
            Some(other) => return Err(cfg.error(format!("unsupported timestep_spacing `{other}`"))),
        };
        let beta_start = cfg.f64_or("beta_start", 0.0001)?;
        let beta_end = cfg.f64_or("beta_end", 0.02)?;
        let mut betas = match cfg.opt_f64_list("trained_betas")? {
            Some(list) if list.len() != num_train_timesteps => {
                return Err(cfg.error(format!(
                "`trained_betas` has {} values but num_train_timesteps is {num_train_timesteps}",
                list.len()
            )))
            }
            Some(list) => list.into_iter().map(|b| b as f32).collect(),
            None => match beta_schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
                }
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredCosCapV2 => cosine_betas(num_train_timesteps),
            },
        };
        let zero_snr = knows_zero_snr && cfg.bool_or("rescale_betas_zero_snr", false)?;
        if zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        Ok(TrainSchedule {
            num_train_timesteps,
            beta_schedule,
            prediction: cfg.prediction_type()?,
            spacing,
            steps_offset: cfg.i64_or("steps_offset", 0)?,
            zero_snr,
            alphas_cumprod: cumprod(&alphas),
        })
    }

    /// `alphas_cumprod[t]` for a timestep known to be in range (checked by the callers).
    pub fn alpha_cumprod(&self, t: f64) -> Option<f64> {
        if t < 0.0 {
            return None;
        }
        self.alphas_cumprod.get(t as usize).map(|&a| f64::from(a))
    }

    /// The sigma table `sqrt((1 - a) / a)` of the Euler and DPM families (float32), with
    /// diffusers' zero-SNR fix `alphas_cumprod[-1] = 2^-24` applied first.
    pub fn sigmas_f32(&self) -> Vec<f32> {
        let mut alphas_cumprod = self.alphas_cumprod.clone();
        if self.zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// The error for an inference timestep outside the training table (diffusers would index
    /// out of bounds there).
    pub fn check_timesteps(&self, timesteps: &[f64]) -> Result<()> {
        match timesteps
            .iter()
            .find(|&&t| t < 0.0 || t >= self.num_train_timesteps as f64)
        {
            Some(t) => Err(Error::param(
                "steps",
                format!(
                    "timestep {t} falls outside 0..{} (check steps_offset)",
                    self.num_train_timesteps
                ),
            )),
            None => Ok(()),
        }
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` as the CPU kernel computes it.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// The `squaredcos_cap_v2` betas (float64 maths, stored as float32).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Cumulative product, float64 accumulator, float32 outputs (torch's CPU `cumprod`).
pub(crate) fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// Rescales betas to a zero terminal SNR (arXiv 2305.08891, Algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt_bar: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|s| {
            let shifted = (s - last) * scale;
            shifted * shifted
        })
        .collect();
    std::iter::once(bar[0])
        .chain(bar.windows(2).map(|w| w[1] / w[0]))
        .map(|a| 1.0 - a)
        .collect()
}

/// `np.round`: half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// `np.arange(start, stop, step)` with a float step.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 1 {
                start + step
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation over integer abscissae,
/// clamped to the end values.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = y1 - y0;
    slope * (x - j as f64) + y0
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolated in
/// log-sigma. `log_sigmas` is `np.log` of the float32 sigma table (ascending).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    // numpy: f32 - f64 promotes, f32 - f32 stays float32.
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Karras et al. (2022) sigmas, `rho = 7`, from `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space, from `sigma_max` down to `sigma_min`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(json: &str) -> TrainSchedule {
        let cfg = SchedulerConfig::from_json("t.json", json.as_bytes()).unwrap();
        TrainSchedule::read(&cfg, TimestepSpacing::Leading, true, 10).unwrap()
    }

    /// Float32 bit patterns printed by
    /// `DDIMScheduler(...).alphas_cumprod[[0, 1, 500, 998, 999]].numpy().view('uint32')`
    /// (torch 2.15, diffusers 0.42.1).
    #[test]
    fn alphas_cumprod_bits_match_torch() {
        // The zero-SNR rescale takes square roots, and torch's float32 sqrt is not correctly
        // rounded (off by up to an ulp), so that case is compared to 1e-6 instead of bitwise.
        let cases: [(&str, [u32; 5]); 4] = [
            (
                "{}",
                [0x3f7ff972, 0x3f7ff196, 0x3d9f53da, 0x382cbac6, 0x38294666],
            ),
            (
                r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
                [0x3f7fc84b, 0x3f7f9054, 0x3e8d7b73, 0x3b9a8e83, 0x3b98b3b6],
            ),
            (
                r#"{"beta_schedule": "squaredcos_cap_v2"}"#,
                [0x3f7ffd4b, 0x3f7ffa45, 0x3efc0cc9, 0x3622fde3, 0x3126e6c2],
            ),
            (
                r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                    "rescale_betas_zero_snr": true}"#,
                [0x3f7fc84b, 0x3f7f8c3b, 0x3e76cd97, 0x34534ef7, 0x00000000],
            ),
        ];
        for (json, bits) in cases {
            let ac = schedule(json).alphas_cumprod;
            let got: Vec<u32> = [0, 1, 500, 998, 999]
                .iter()
                .map(|&i| ac[i].to_bits())
                .collect();
            if json.contains("rescale") {
                for (g, w) in got.iter().zip(bits) {
                    let (g, w) = (f32::from_bits(*g), f32::from_bits(w));
                    assert!((g - w).abs() <= 1e-6 * w, "{g} vs {w}");
                }
            } else {
                assert_eq!(got, bits, "{json}");
            }
        }
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        // np.arange(1000, 0, -1000 / 7).round() == [1000, 857, 714, 571, 429, 286, 143]
        let r: Vec<f64> = np_arange(1000.0, 0.0, -1000.0 / 7.0)
            .into_iter()
            .map(np_round)
            .collect();
        assert_eq!(r, vec![1000.0, 857.0, 714.0, 571.0, 429.0, 286.0, 143.0]);
        assert_eq!(np_interp(-1.0, &[1.0, 2.0]), 1.0);
        assert_eq!(np_interp(0.25, &[1.0, 2.0, 4.0]), 1.25);
        assert_eq!(np_interp(7.0, &[1.0, 2.0, 4.0]), 4.0);
    }
}
