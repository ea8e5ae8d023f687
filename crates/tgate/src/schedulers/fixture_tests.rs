//! Checks every scheduler against diffusers' own trajectories.
//!
//! A reference folder holds `scheduler_config.json` (or `scheduler/scheduler_config.json`) and
//! `reference.safetensors` with, for each scheduler name `N`: `sched.N.timesteps` [n],
//! `sched.N.init_noise_sigma` [1], `sched.N.samples` [n+1, ...] (`samples[i + 1]` is diffusers'
//! step from `samples[i]`), `sched.N.scaled_inputs` [n, ...], `sched.N.model_outputs` [n, ...]
//! and, for `euler-a` and `lcm`, `sched.N.step_noise` [n, ...]. diffusers built each scheduler as
//! `Class.from_config(pipe.scheduler.config)` and called `set_timesteps(steps)`; the step count
//! is `reference.json`'s `scheduler_steps` (or `num_inference_steps`), 10 when absent; its optional
//! `expect_error` lists the kinds diffusers refused for that config.
//!
//! `tests/fixtures/{sd1,sd2,lcm}` are checked when present (`scheduler_kinds` in reference.json
//! names the kinds a folder covers; without it, all but `lcm`); `TGATE_SCHEDULER_REFERENCES` may name a
//! directory of further reference folders (run with `--ignored`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use super::{build_scheduler, SchedulerConfig, SchedulerKind};

/// One float tensor of a safetensors file.
struct Array {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Reads the F32 / F64 tensors of a safetensors file (the format is a length-prefixed JSON
/// header followed by raw little-endian data).
fn read_safetensors(path: &Path) -> HashMap<String, Array> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut arrays = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        let (Some(dtype), Some(shape), Some(offsets)) = (
            info["dtype"].as_str(),
            info["shape"].as_array(),
            info["data_offsets"].as_array(),
        ) else {
            continue; // __metadata__
        };
        let shape: Vec<usize> = shape.iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let raw =
            &data[offsets[0].as_u64().unwrap() as usize..offsets[1].as_u64().unwrap() as usize];
        let values = match dtype {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "F64" => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "I64" => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            _ => continue,
        };
        arrays.insert(name.clone(), Array { shape, values });
    }
    arrays
}

impl Array {
    /// Slice `i` along the first axis, as a 4-D tensor.
    fn item(&self, i: usize, device: &Device) -> Tensor<4> {
        let dims: [usize; 4] = self.shape[1..].try_into().unwrap();
        let size: usize = dims.iter().product();
        Tensor::<4>::from_data(
            TensorData::new(self.values[i * size..(i + 1) * size].to_vec(), dims),
            device,
        )
    }
}

/// The largest `|a - b|` and the largest `|b|`.
fn max_diff(got: Tensor<4>, want: Tensor<4>) -> (f32, f32) {
    let got = got.into_data().try_to_vec::<f32>().unwrap();
    let want = want.into_data().try_to_vec::<f32>().unwrap();
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    (diff, want.iter().map(|b| b.abs()).fold(0.0, f32::max))
}

/// Compares all five schedulers with the reference folder `dir`; returns the failures.
fn check_reference_folder(dir: &Path) -> Vec<String> {
    let device = Device::flex();
    let config_path = [
        dir.join("scheduler_config.json"),
        dir.join("scheduler/scheduler_config.json"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("no scheduler_config.json in {}", dir.display()));
    let config = SchedulerConfig::from_json(
        "scheduler_config.json",
        &std::fs::read(config_path).unwrap(),
    )
    .unwrap();
    let meta: Value = std::fs::read(dir.join("reference.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let steps = meta
        .get("scheduler_steps")
        .or_else(|| meta.get("num_inference_steps"))
        .and_then(Value::as_u64)
        .unwrap_or(10) as usize;
    // Kinds diffusers refused for this config (`expect_error`): the port must refuse them too.
    let refused: Vec<&str> = meta
        .get("expect_error")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    // The kinds the folder has trajectories for (`scheduler_kinds`); folders made before LCM
    // was ported hold the other five.
    let kinds: Vec<SchedulerKind> = match meta.get("scheduler_kinds").and_then(Value::as_array) {
        Some(names) => names
            .iter()
            .filter_map(|n| n.as_str()?.parse().ok())
            .collect(),
        None => SchedulerKind::ALL
            .into_iter()
            .filter(|&k| k != SchedulerKind::Lcm)
            .collect(),
    };
    let arrays = read_safetensors(&dir.join("reference.safetensors"));
    let mut failures = Vec::new();
    for kind in kinds {
        if refused.contains(&kind.name()) {
            if build_scheduler(&config, kind, steps).is_ok() {
                failures.push(format!(
                    "{kind}: diffusers refuses this config, the port accepts it"
                ));
            }
            continue;
        }
        failures.extend(check_kind(dir, &config, kind, steps, &arrays, &device));
    }
    failures
}

/// One scheduler kind against a reference folder's arrays: timesteps, the initial sigma, each
/// teacher-forced step and the free-running result.
fn check_kind(
    dir: &Path,
    config: &SchedulerConfig,
    kind: SchedulerKind,
    steps: usize,
    arrays: &HashMap<String, Array>,
    device: &Device,
) -> Vec<String> {
    let key = |what: &str| format!("sched.{}.{what}", kind.name());
    let mut failures = Vec::new();
    let Some(timesteps) = arrays.get(&key("timesteps")) else {
        failures.push(format!("{}: no {}", dir.display(), key("timesteps")));
        return failures;
    };
    let mut scheduler = build_scheduler(config, kind, steps).unwrap();
    let want_t: Vec<f32> = timesteps.values.clone();
    let got_t: Vec<f32> = scheduler.timesteps().iter().map(|&t| t as f32).collect();
    // Integer timesteps must match exactly; fractional ones (Euler with Karras or
    // exponential sigmas) go through `ln` of the sigma table and may move by an ulp.
    let close = got_t.len() == want_t.len()
        && got_t
            .iter()
            .zip(&want_t)
            .all(|(g, w)| g == w || (w.fract() != 0.0 && (g - w).abs() < 1e-3));
    if !close {
        failures.push(format!("{kind}: timesteps {got_t:?} != {want_t:?}"));
        return failures;
    }
    let sigma = arrays[&key("init_noise_sigma")].values[0];
    if (scheduler.init_noise_sigma() as f32 - sigma).abs() > 1e-6 * sigma.max(1.0) {
        failures.push(format!(
            "{kind}: init_noise_sigma {} != {sigma}",
            scheduler.init_noise_sigma()
        ));
    }
    let (samples, outputs, scaled) = (
        &arrays[&key("samples")],
        &arrays[&key("model_outputs")],
        &arrays[&key("scaled_inputs")],
    );
    let noise = arrays.get(&key("step_noise"));
    let mut free = samples.item(0, device);
    let mut worst = 0.0f32;
    for i in 0..got_t.len() {
        let sample = samples.item(i, device);
        let (d, m) = max_diff(
            scheduler.scale_model_input(sample.clone(), i),
            scaled.item(i, device),
        );
        if d > 2e-6 * m.max(1.0) {
            failures.push(format!("{kind}: scaled input {i} differs by {d} (max {m})"));
        }
        // Teacher-forced: each step starts from diffusers' own sample.
        let step_noise = noise.map(|n| n.item(i, device));
        let prev = scheduler
            .step(outputs.item(i, device), i, sample, step_noise)
            .unwrap();
        let (d, m) = max_diff(prev, samples.item(i + 1, device));
        worst = worst.max(d / m.max(1.0));
        if d > 1e-5 * m.max(1.0) {
            failures.push(format!("{kind}: step {i} differs by {d} (max {m})"));
        }
    }
    // Free-running from the first sample (the multistep history now holds our own outputs).
    let mut fresh = build_scheduler(config, kind, steps).unwrap();
    for i in 0..got_t.len() {
        free = fresh
            .step(
                outputs.item(i, device),
                i,
                free,
                noise.map(|n| n.item(i, device)),
            )
            .unwrap();
    }
    let (d, m) = max_diff(free, samples.item(got_t.len(), device));
    eprintln!(
        "{} {kind}: worst step error {worst:.2e}, free-running {:.2e}",
        dir.display(),
        d / m.max(1.0)
    );
    if d > 1e-4 * m.max(1.0) {
        failures.push(format!(
            "{kind}: free-running final sample differs by {d} (max {m})"
        ));
    }
    failures
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

#[test]
fn schedulers_match_fixtures() {
    let mut failures = Vec::new();
    for name in ["sd1", "sd2", "lcm"] {
        let dir = fixture_dir(name);
        if !dir.join("reference.safetensors").exists() {
            eprintln!("skipping {}: no reference.safetensors yet", dir.display());
            continue;
        }
        failures.extend(check_reference_folder(&dir));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs TGATE_SCHEDULER_REFERENCES (a directory of reference folders)"]
fn schedulers_match_extra_references() {
    let root = PathBuf::from(
        std::env::var("TGATE_SCHEDULER_REFERENCES").expect("TGATE_SCHEDULER_REFERENCES"),
    );
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    let mut failures = Vec::new();
    for dir in dirs
        .iter()
        .filter(|d| d.join("reference.safetensors").exists())
    {
        failures.extend(
            check_reference_folder(dir)
                .into_iter()
                .map(|f| format!("{}: {f}", dir.display())),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!dirs.is_empty());
}
