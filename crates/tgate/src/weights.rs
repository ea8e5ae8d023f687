//! Binds checkpoint tensors to model parts by their diffusers key names.
//!
//! A [`Weights`] is a view of one safetensors file under a key prefix. Every read names the
//! expected shape, so a missing tensor, a wrong shape or an unusable dtype is a typed error
//! naming the file, the tensor and what was expected. Reads are recorded, so tests can check
//! that a model consumed every tensor of its checkpoint.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::error::Result;
use crate::safetensors::SafeTensors;

/// A prefix-scoped view of one checkpoint file.
#[derive(Clone)]
pub struct Weights {
    file: Rc<SafeTensors>,
    prefix: String,
    device: Device,
    dtype: DType,
    used: Rc<RefCell<BTreeSet<String>>>,
}

impl Weights {
    /// All tensors of `file`, placed on `device` as f32.
    pub fn new(file: SafeTensors, device: &Device) -> Self {
        Weights {
            file: Rc::new(file),
            prefix: String::new(),
            device: device.clone(),
            dtype: DType::F32,
            used: Rc::new(RefCell::new(BTreeSet::new())),
        }
    }

    /// Stores parameters in `dtype` on the device (F32 by default; F16 where the device supports it).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The view one level down: `pp("down_blocks").pp(0)` reads `down_blocks.0.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights {
        let mut w = self.clone();
        w.prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        w
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.file.contains(&self.key(name))
    }

    /// Shape of `name` under this prefix, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.file.shape(&self.key(name)).map(|s| s.to_vec())
    }

    /// Reads `name` and checks it has shape `shape`.
    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let host = self.get_host(name, &shape)?;
        Ok(self.upload(host, shape))
    }

    /// Reads `name` with shape `shape` to the host as f32 (e.g. to transpose before upload).
    pub fn get_host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let key = self.key(name);
        let host = self.file.read_f32(&key, shape)?;
        self.used.borrow_mut().insert(key);
        Ok(host.data)
    }

    /// Uploads host data to the device in the parameter dtype.
    pub fn upload<const D: usize>(&self, data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        let t = Tensor::<D>::from_data(TensorData::new(data, shape), &self.device);
        if self.dtype == DType::F32 {
            t
        } else {
            t.cast(self.dtype)
        }
    }

    /// Keys of the file that no part of the model has read (for completeness checks).
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.file.names().filter(|k| !used.contains(*k)).map(|k| k.to_string()).collect()
    }
}
