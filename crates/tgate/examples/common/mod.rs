//! What the benchmarks share: the device by backend name and the dtype flag.

#![allow(dead_code)]

use burn::tensor::{DType, Device};

/// The device of `--backend cpu|wgpu`.
pub fn device(backend: &str) -> Result<Device, String> {
    match backend {
        "cpu" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu_options()
            .init()
            .map_err(|e| format!("wgpu: {e:?}")),
        other => Err(format!("backend {other} is not available in this build")),
    }
}

/// The value of `--dtype f32|f16`.
pub fn dtype(value: &str) -> Result<DType, String> {
    match value {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        other => Err(format!("--dtype: f32 or f16, not {other}")),
    }
}
