//! Shared helpers of the reference tests.
//!
//! The references in `tests/fixtures/` were produced by `tests/make_fixtures.py` with torch
//! 2.15.0, diffusers 0.42.1, transformers 5.23.0 and tgate 1.0.0 (see `reference.json`).
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use tgate::loader::DirSource;
use tgate::safetensors::{HostTensor, SafeTensors};

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

/// The CPU device all reference tests run on.
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
