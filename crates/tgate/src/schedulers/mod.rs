//! Noise schedulers, read from a diffusers `scheduler/scheduler_config.json`.
//!
//! Host-side maths is f64; tensors are touched only in `scale_model_input` and `step`,
//! with scalar coefficients, so nothing is read back from the device.
//!
//! The six schedulers port diffusers 0.42.1 (`DDIMScheduler`, `PNDMScheduler`,
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`, `LCMScheduler`).
//! Their training tables (betas, `alphas_cumprod`, sigmas) are computed with the same float32
//! rounding torch and numpy apply, so timesteps and coefficients match diffusers to the last bit
//! of the tables (see [`tables`]).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Tensor;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

mod ddim;
pub mod ddpm_wuerstchen;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lcm;
mod pndm;
mod tables;

#[cfg(test)]
mod fixture_tests;

pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use lcm::LcmScheduler;
pub use pndm::PndmScheduler;

/// The schedulers selectable by name (`ddim`, `pndm`, `euler`, `euler-a`, `dpm++2m`, `lcm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    Lcm,
}

/// One denoising scheduler, set up for a fixed number of inference steps.
///
/// The pipeline iterates `i` over `0..timesteps().len()` and passes `i` in (no searching by value).
pub trait Scheduler {
    /// The model timestep of each iteration, in order (may be longer than the number of
    /// inference steps: PNDM repeats one).
    fn timesteps(&self) -> &[f64];
    /// The standard deviation the initial noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;
    /// diffusers' `scheduler.order` (used by T-GATE to count steps).
    fn order(&self) -> usize;
    /// The number of inference steps requested.
    fn num_inference_steps(&self) -> usize;
    /// Scales the model input for iteration `i` (identity except for the Euler family).
    fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4>;
    /// True when `step` consumes fresh standard-normal noise (ancestral samplers).
    fn needs_noise(&self) -> bool {
        false
    }
    /// One step from `sample` at iteration `i` to the previous sample.
    /// `noise` is standard normal with the sample's shape; required when `needs_noise()`.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Result<Tensor<4>>;
}

impl SchedulerKind {
    /// Every kind, in the order the names are listed in messages.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Lcm,
    ];

    /// The short name used on the command line (`ddim`, `pndm`, `euler`, `euler-a`, `dpm++2m`,
    /// `lcm`).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpm++2m",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// The diffusers class this kind ports.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
        }
    }

    /// The kind of a diffusers `_class_name`, if it is one of the six ported classes.
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.class_name() == class_name)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::ALL.iter().map(|kind| kind.name()).collect();
                Error::param(
                    "scheduler",
                    format!(
                        "unknown scheduler `{name}`; valid names: {}",
                        valid.join(", ")
                    ),
                )
            })
    }
}

/// What the denoising model predicts (`prediction_type` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise that was added (`epsilon`).
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (`v_prediction`).
    VPrediction,
    /// The clean sample itself (`sample`; Euler also accepts `original_sample`).
    Sample,
}

/// A `scheduler_config.json`, kept as the raw key/value map.
///
/// diffusers builds the pipeline's scheduler from this file (as the class `_class_name` names)
/// and then switches with `NewClass.from_config(old.config)`. In diffusers 0.42.1 the old
/// config remembers which keys it filled with its own defaults (`_use_default_values`) and
/// `from_config` drops them, so every scheduler reads a key from the *file* when the file has
/// it and otherwise takes its *own* default, whatever the original class was (checked with
/// `EulerDiscreteScheduler.from_config(PNDMScheduler.from_config(sd15_json).config)`: its
/// `timestep_spacing` is Euler's default `linspace`, not PNDM's `leading`). Keys the file has
/// but the original class does not know (SD 1.5's PNDM file has `clip_sample`) are carried over
/// too. [`SchedulerConfig`] implements exactly that rule.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    file_name: String,
    values: Map<String, Value>,
}

impl SchedulerConfig {
    /// Parses the JSON bytes of `file_name` (used in error messages).
    pub fn from_json(file_name: &str, bytes: &[u8]) -> Result<SchedulerConfig> {
        let value: Value = serde_json::from_slice(&quote_non_finite(bytes))
            .map_err(|e| Error::config(file_name, format!("invalid JSON: {e}")))?;
        let Value::Object(mut values) = value else {
            return Err(Error::config(file_name, "expected a JSON object"));
        };
        // Keys a saved config marks as defaulted are treated as absent, as diffusers does.
        if let Some(Value::Array(defaulted)) = values.remove("_use_default_values") {
            for key in defaulted.iter().filter_map(Value::as_str) {
                values.remove(key);
            }
        }
        Ok(SchedulerConfig {
            file_name: file_name.to_owned(),
            values,
        })
    }

    /// The file name given to [`SchedulerConfig::from_json`].
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// The `_class_name` of the file, if present.
    pub fn class_name(&self) -> Option<&str> {
        self.values.get("_class_name").and_then(Value::as_str)
    }

    /// The kind the file names in `_class_name`, if it is one of the six ported classes.
    pub fn class_kind(&self) -> Option<SchedulerKind> {
        self.class_name().and_then(SchedulerKind::from_class_name)
    }

    /// The file's `prediction_type` (`epsilon` when absent, the default of all six classes).
    pub fn prediction_type(&self) -> Result<PredictionType> {
        match self.string_or("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" | "original_sample" => Ok(PredictionType::Sample),
            other => Err(self.error(format!(
                "unsupported prediction_type `{other}` (expected epsilon, v_prediction or sample)"
            ))),
        }
    }

    /// An error about this file.
    pub(crate) fn error(&self, message: impl Into<String>) -> Error {
        Error::config(&self.file_name, message)
    }

    /// The value of `key`; `None` when absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// A boolean; `null` counts as false (Python truthiness).
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.error(format!("`{key}` must be a boolean, found {other}"))),
        }
    }

    /// A number, or `None` when absent or `null`. Python's `Infinity`, `-Infinity` and `NaN`
    /// are accepted (see [`quote_non_finite`]).
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if s == NON_FINITE[0] => Ok(Some(f64::NEG_INFINITY)),
            Some(Value::String(s)) if s == NON_FINITE[1] => Ok(Some(f64::INFINITY)),
            Some(Value::String(s)) if s == NON_FINITE[2] => Ok(Some(f64::NAN)),
            Some(other) => Err(self.error(format!("`{key}` must be a number, found {other}"))),
        }
    }

    /// A number with a default.
    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// An integer with a default.
    pub(crate) fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| self.error(format!("`{key}` must be an integer, found {n}"))),
            Some(other) => Err(self.error(format!("`{key}` must be an integer, found {other}"))),
        }
    }

    /// A string with a default.
    pub(crate) fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.error(format!("`{key}` must be a string, found {other}"))),
        }
    }

    /// A string that may be `null` (no default).
    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.error(format!("`{key}` must be a string, found {other}"))),
        }
    }

    /// A list of numbers, or `None` when absent or `null`.
    pub(crate) fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| self.error(format!("`{key}` must hold numbers only")))
                })
                .collect::<Result<Vec<f64>>>()
                .map(Some),
            Some(other) => {
                Err(self.error(format!("`{key}` must be a list of numbers, found {other}")))
            }
        }
    }
}

/// The non-finite literals Python's `json.dumps` writes (diffusers saves DPM-Solver's default
/// `lambda_min_clipped` as `-Infinity`), longest first.
const NON_FINITE: [&str; 3] = ["-Infinity", "Infinity", "NaN"];

/// Puts quotes around the bare [`NON_FINITE`] literals outside strings, so that strict JSON
/// parsers accept the file; the number getters turn them back into floats.
fn quote_non_finite(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let (mut in_string, mut escaped, mut i) = (false, false, 0);
    while i < bytes.len() {
        let byte = bytes[i];
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if byte == b'"' {
            in_string = true;
        } else if let Some(word) = NON_FINITE
            .iter()
            .find(|w| bytes[i..].starts_with(w.as_bytes()))
        {
            out.push(b'"');
            out.extend_from_slice(word.as_bytes());
            out.push(b'"');
            i += word.len();
            continue;
        }
        out.push(byte);
        i += 1;
    }
    out
}

/// Builds the scheduler `kind` from `config` (as diffusers' `Kind.from_config(config)`) and sets
/// it up for `num_inference_steps` (as `set_timesteps(num_inference_steps)`).
///
/// Errors: `num_inference_steps` is 0 or above `num_train_timesteps` (`Error::InvalidParameter`);
/// the config has a wrong type or a setting this port does not support (`Error::Config`).
pub fn build_scheduler(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Pndm => Box::new(PndmScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(EulerAncestralScheduler::new(config, num_inference_steps)?)
        }
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::new(
            config,
            num_inference_steps,
        )?),
        SchedulerKind::Lcm => Box::new(LcmScheduler::new(config, num_inference_steps)?),
    })
}

/// `first.0 * first.1 + sum(tensor_k * weight_k)`: the only tensor maths the schedulers need.
fn weighted_sum(
    first: (Tensor<4>, f64),
    rest: impl IntoIterator<Item = (Tensor<4>, f64)>,
) -> Tensor<4> {
    let scale = |(tensor, weight): (Tensor<4>, f64)| {
        if weight == 1.0 {
            tensor
        } else {
            tensor.mul_scalar(weight)
        }
    };
    rest.into_iter()
        .fold(scale(first), |sum, term| sum + scale(term))
}

/// The step noise an ancestral step (`who`) was given: present and of the sample's shape.
fn step_noise(noise: Option<Tensor<4>>, sample: &Tensor<4>, who: &str) -> Result<Tensor<4>> {
    let noise =
        noise.ok_or_else(|| Error::input("noise", format!("{who} needs standard-normal noise")))?;
    if noise.dims() != sample.dims() {
        return Err(Error::input(
            "noise",
            format!(
                "shape {:?} differs from the sample's {:?}",
                noise.dims(),
                sample.dims()
            ),
        ));
    }
    Ok(noise)
}

/// The error for a step index past the end of the schedule.
fn step_index_error(i: usize, len: usize) -> Error {
    Error::param(
        "step",
        format!("step index {i} is past the end of the {len} timesteps"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(
                SchedulerKind::from_class_name(kind.class_name()),
                Some(kind)
            );
        }
        let err = "lms".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(
            err.contains("ddim, pndm, euler, euler-a, dpm++2m, lcm"),
            "{err}"
        );
        assert_eq!(SchedulerKind::from_class_name("LMSDiscreteScheduler"), None);
    }

    #[test]
    fn config_reads_class_and_prediction() {
        let cfg = SchedulerConfig::from_json(
            "scheduler_config.json",
            br#"{"_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                 "_use_default_values": ["clip_sample"], "clip_sample": true}"#,
        )
        .unwrap();
        assert_eq!(cfg.class_kind(), Some(SchedulerKind::Ddim));
        assert_eq!(cfg.prediction_type().unwrap(), PredictionType::VPrediction);
        // A key marked as defaulted is absent: the reading scheduler's default applies.
        assert!(!cfg.bool_or("clip_sample", false).unwrap());
        let inf = SchedulerConfig::from_json(
            "x.json",
            br#"{"lambda_min_clipped": -Infinity, "name": "NaN \" Infinity", "x": NaN}"#,
        )
        .unwrap();
        assert_eq!(
            inf.opt_f64("lambda_min_clipped").unwrap(),
            Some(f64::NEG_INFINITY)
        );
        assert_eq!(inf.string_or("name", "").unwrap(), "NaN \" Infinity");
        assert!(inf.opt_f64("x").unwrap().unwrap().is_nan());
        assert!(SchedulerConfig::from_json("x.json", b"[1]").is_err());
        assert!(SchedulerConfig::from_json("x.json", b"{").is_err());
        let bad = SchedulerConfig::from_json("x.json", br#"{"steps_offset": "one"}"#).unwrap();
        assert!(build_scheduler(&bad, SchedulerKind::Ddim, 10).is_err());
    }

    #[test]
    fn step_count_is_checked() {
        let cfg = SchedulerConfig::from_json("c.json", b"{}").unwrap();
        for kind in SchedulerKind::ALL {
            assert!(matches!(
                build_scheduler(&cfg, kind, 0),
                Err(Error::InvalidParameter { .. })
            ));
            assert!(matches!(
                build_scheduler(&cfg, kind, 1001),
                Err(Error::InvalidParameter { .. })
            ));
            // LCM takes at most its `original_inference_steps` (50 by default).
            let most = if kind == SchedulerKind::Lcm { 50 } else { 1000 };
            assert!(build_scheduler(&cfg, kind, most).is_ok(), "{kind}");
            assert!(build_scheduler(&cfg, kind, most + 1).is_err(), "{kind}");
        }
        // PNDM's default Runge-Kutta warm-up needs 4 steps (diffusers fails below that too).
        assert!(build_scheduler(&cfg, SchedulerKind::Pndm, 3).is_err());
        let plms = SchedulerConfig::from_json("c.json", br#"{"skip_prk_steps": true}"#).unwrap();
        for kind in SchedulerKind::ALL {
            assert!(build_scheduler(&plms, kind, 1).is_ok(), "{kind}");
        }
    }
}
