//! Shared helpers of the reference tests.
//!
//! The references in `tests/fixtures/` were produced by `tests/make_fixtures.py` with torch
//! 2.15.0, diffusers 0.42.1, transformers 5.23.0 and tgate 1.0.0 (see `reference.json`).
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{DType, Device, Tensor, TensorData};
use tgate::loader::{DirSource, MemorySource, ModelSource, Variant};
use tgate::pipeline::StepInfo;
use tgate::pipeline::{GenerateParams, Noise};
use tgate::pipeline_wuerstchen::{WuerstchenNoise, WuerstchenParams};
use tgate::safetensors::{HostTensor, SafeTensors};
use tgate::text_to_image::Pipeline;
use tgate::tgate::GateConfig;

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn source(name: &str) -> DirSource {
    DirSource::new(fixture_dir(name))
}

pub fn reference(name: &str) -> SafeTensors {
    let path = fixture_dir(name).join("reference.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    SafeTensors::parse(path.display().to_string(), bytes).expect("reference file parses")
}

pub fn reference_json(name: &str) -> serde_json::Value {
    let path = fixture_dir(name).join("reference.json");
    serde_json::from_slice(&std::fs::read(path).expect("reference.json")).expect("valid json")
}

pub fn host(r: &SafeTensors, key: &str) -> HostTensor {
    r.read_f32_any(key).unwrap_or_else(|e| panic!("{e}"))
}

pub fn tensor<const D: usize>(r: &SafeTensors, key: &str, device: &Device) -> Tensor<D> {
    let h = host(r, key);
    let shape: [usize; D] = h.shape.clone().try_into().expect("rank");
    Tensor::from_data(TensorData::new(h.data, shape), device)
}

/// The f16 path against the f32 references: within 1% of max(1, max |reference|) after a whole
/// pipeline (f16 keeps 11 significant bits; measured 1.7e-3 to 3.2e-3 on the tiny models, where
/// the f32 path agrees to 1e-5).
pub const HALF: f32 = 1e-2;

/// The f16 path on wgpu: within 3% (measured on lavapipe: SD 7.6e-3 to 1.1e-2, prior 1.1e-2;
/// the GPU kernels round more often in f16 than the CPU backend, whose matmuls and convolutions
/// accumulate in f32, and classifier-free guidance multiplies the difference).
pub const HALF_GPU: f32 = 3e-2;

/// Würstchen's Stage A image in f16: its pre-clamp activations reach ~20, so the image (scale 1)
/// carries ~20× f16's relative error (measured 3.0e-2).
pub const HALF_IMAGE: f32 = 6e-2;

/// The CPU device all reference tests run on.
/// Loads a diffusers folder with the defaults (kind detected, variant auto, f32) on `device`.
pub fn load_pipeline(src: &dyn ModelSource, device: &Device) -> Pipeline {
    Pipeline::load(src, None, None, Variant::Auto, DType::F32, device)
        .unwrap_or_else(|e| panic!("loads: {e}"))
}

pub fn cpu() -> Device {
    Device::flex()
}

/// Max |a - b| and the scale max(1, max |reference|).
pub fn compare(actual: &[f32], expected: &[f32]) -> (f32, f32) {
    assert_eq!(actual.len(), expected.len(), "length");
    let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
    let err = actual.iter().zip(expected).fold(0f32, |m, (a, b)| {
        if a.is_nan() || b.is_nan() {
            f32::INFINITY
        } else {
            m.max((a - b).abs())
        }
    });
    (err, scale)
}

/// Asserts `actual` matches the reference `key` within `rel × max(1, max |ref|)`.
pub fn assert_close<const D: usize>(actual: Tensor<D>, r: &SafeTensors, key: &str, rel: f32) {
    let expected = host(r, key);
    assert_eq!(actual.dims().to_vec(), expected.shape, "{key}: shape");
    let a = actual.into_data().try_to_vec::<f32>().expect("f32 data");
    let (err, scale) = compare(&a, &expected.data);
    eprintln!(
        "{key}: max abs err {err:.3e} (scale {scale:.3}, allowed {:.3e})",
        rel * scale
    );
    assert!(
        err <= rel * scale,
        "{key}: max abs err {err} > {rel} × {scale}"
    );
}

/// Asserts two of our own outputs agree within `rel × max |b|` (no reference file involved).
pub fn assert_agree<const D: usize>(a: Tensor<D>, b: Tensor<D>, rel: f32, label: &str) {
    let (a, b) = (
        a.into_data().try_to_vec::<f32>().expect("f32 data"),
        b.into_data().try_to_vec::<f32>().expect("f32 data"),
    );
    assert_eq!(a.len(), b.len(), "{label}: length");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= rel * scale,
        "{label}: max abs err {err} (scale {scale})"
    );
}

/// The gate settings of the reference run `run` (`tgate`, `tgate_sa`, `tgate_sp`).
pub fn gate_of(json: &serde_json::Value, run: &str) -> GateConfig {
    let g = &json["gate_runs"][run];
    let n = |k: &str| g[k].as_u64().expect(k) as usize;
    GateConfig {
        gate_step: n("gate_step"),
        sp_interval: n("sp_interval"),
        fi_interval: n("fi_interval"),
        warm_up: n("warm_up"),
    }
}

/// The SD reference run's parameters (prompts, steps, size, noise), ungated, default scheduler.
pub fn sd_params(json: &serde_json::Value, r: &tgate::safetensors::SafeTensors) -> GenerateParams {
    GenerateParams {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: json["steps"].as_u64().unwrap() as usize,
        guidance: json["guidance"].as_f64().unwrap(),
        scheduler: None,
        width: json["width"].as_u64().unwrap() as usize,
        height: json["height"].as_u64().unwrap() as usize,
        gate: None,
        deep_cache: None,
        noise: Noise::Tensors {
            noise: host(r, "pipe.noise").data,
            step_noise: Some(host(r, "pipe.step_noise").data),
        },
        clip_skip: 0,
    }
}

/// The Würstchen fixture's reference noise.
pub fn wuerstchen_noise() -> WuerstchenNoise {
    let r = reference("wuerstchen");
    WuerstchenNoise::Tensors {
        prior_noise: host(&r, "pipe.prior_noise").data,
        prior_step_noise: host(&r, "pipe.prior_step_noise").data,
        decoder_noise: host(&r, "pipe.decoder_noise").data,
        decoder_step_noise: host(&r, "pipe.decoder_step_noise").data,
    }
}

/// The Würstchen reference run's parameters (prompts, size, steps, guidance, noise), ungated.
pub fn wuerstchen_params() -> WuerstchenParams {
    let json = reference_json("wuerstchen");
    let mut p = WuerstchenParams::new(json["prompt"].as_str().unwrap(), wuerstchen_noise());
    p.negative_prompt = json["negative_prompt"].as_str().unwrap().into();
    p.width = json["width"].as_u64().unwrap() as usize;
    p.height = json["height"].as_u64().unwrap() as usize;
    p.prior_steps = json["prior_steps"].as_u64().unwrap() as usize;
    p.prior_guidance = json["prior_guidance"].as_f64().unwrap();
    p.decoder_steps = json["decoder_steps"].as_u64().unwrap() as usize;
    p.decoder_guidance = json["decoder_guidance"].as_f64().unwrap();
    p
}

/// A folder whose device binds at most `limit` bytes per buffer.
pub struct Capped(pub MemorySource, pub u64);

impl ModelSource for Capped {
    fn read(&self, path: &str) -> tgate::Result<Option<Vec<u8>>> {
        self.0.read(path)
    }
    fn max_tensor_bytes(&self) -> Option<u64> {
        Some(self.1)
    }
}

/// Runs a generation that must be refused before its first step, and returns the error.
pub fn refused_before_any_step<T>(
    run: impl FnOnce(&mut dyn FnMut(&StepInfo) -> std::ops::ControlFlow<()>) -> tgate::Result<T>,
) -> tgate::Error {
    let mut steps = 0;
    let result = run(&mut |_| {
        steps += 1;
        std::ops::ControlFlow::Continue(())
    });
    assert_eq!(steps, 0, "a step ran before the refusal");
    match result {
        Ok(_) => panic!("expected a refusal"),
        Err(e) => e,
    }
}

/// Every file below `root`, in memory under its `/`-separated relative path.
pub fn memory_of(root: &std::path::Path) -> MemorySource {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut MemorySource) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                let rel = rel.to_string_lossy().replace('\\', "/");
                out.files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut m = MemorySource::default();
    walk(root, root, &mut m);
    m
}

/// A model folder made of two: files of `top` first, the rest from `base` (the small-model
/// fixtures hold only their UNet and share sd1's other parts).
pub struct Overlay {
    pub top: DirSource,
    pub base: DirSource,
}

impl ModelSource for Overlay {
    fn read(&self, path: &str) -> tgate::Result<Option<Vec<u8>>> {
        match self.top.read(path)? {
            Some(bytes) => Ok(Some(bytes)),
            None => self.base.read(path),
        }
    }
}

/// A small-model fixture (`tests/fixtures/<name>/unet`) on sd1's text encoder, VAE, tokenizer
/// and scheduler.
pub fn small_model(name: &str) -> Overlay {
    Overlay {
        top: source(name),
        base: source("sd1"),
    }
}
