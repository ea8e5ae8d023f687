//! Binds checkpoint tensors to model parts by their diffusers key names.
//!
//! A [`Weights`] is a view of one checkpoint (a safetensors file, or the shards of a sharded one)
//! under a key prefix. Every read names the
//! expected shape, so a missing tensor, a wrong shape or an unusable dtype is a typed error
//! naming the file, the tensor and what was expected. Reads are recorded, so tests can check
//! that a model consumed every tensor of its checkpoint.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::safetensors::SafeTensors;

/// One checkpoint: a single safetensors file, or the shards named by a
/// `*.safetensors.index.json` (each tensor in exactly one shard).
pub struct Checkpoint {
    /// What messages call the checkpoint: the file, or the index file of a sharded one.
    name: String,
    shards: Vec<SafeTensors>,
    /// Tensor name -> shard holding it.
    index: HashMap<String, usize>,
    /// Why this variant of the checkpoint was chosen (see [`crate::loader::load_weights_as`]).
    reason: String,
}

impl Checkpoint {
    /// A checkpoint in one file.
    pub fn single(file: SafeTensors) -> Self {
        Checkpoint {
            name: file.file().to_string(),
            index: file.names().map(|n| (n.to_string(), 0)).collect(),
            shards: vec![file],
            reason: String::new(),
        }
    }

    /// A checkpoint split over `shards`, called `name` (its index file) in messages. A tensor
    /// found in two shards is refused: which copy the model would read would be arbitrary.
    pub fn sharded(name: String, shards: Vec<SafeTensors>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for tensor in shard.names() {
                if let Some(j) = index.insert(tensor.to_string(), i) {
                    return Err(Error::CorruptWeights {
                        file: name.clone(),
                        message: format!(
                            "tensor `{tensor}` is in both `{}` and `{}`",
                            shards[j].file(),
                            shard.file()
                        ),
                    });
                }
            }
        }
        Ok(Checkpoint {
            name,
            shards,
            index,
            reason: String::new(),
        })
    }

    /// Records why this file (variant) was chosen.
    pub fn with_reason(mut self, reason: String) -> Self {
        self.reason = reason;
        self
    }

    /// Why this file (variant) was chosen; empty when it was given directly.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The shard holding `tensor`.
    fn find(&self, tensor: &str) -> Option<&SafeTensors> {
        self.index.get(tensor).map(|&i| &self.shards[i])
    }

    /// What messages call it: the file, or the index of a sharded checkpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file names of its shards (one for a single file).
    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.shards.iter().map(|s| s.file())
    }

    /// Bytes of tensor data in all shards.
    pub fn data_len(&self) -> u64 {
        self.shards.iter().map(|s| s.data_len()).sum()
    }
}

/// Where parameters come from.
#[derive(Clone)]
enum Store {
    File(Rc<Checkpoint>),
    /// Seeded random values for benchmarks: N(0, 1/fan_in) for weights, 1 ± 0.1 for norm scales.
    Random(u64),
    /// Zeros made on the device, nothing read: a model of the right shapes to compile its kernels
    /// with (a warm-up while the real weights download).
    Placeholder,
}

/// A prefix-scoped view of one checkpoint file (or of seeded random parameters).
#[derive(Clone)]
pub struct Weights {
    store: Store,
    prefix: String,
    device: Device,
    dtype: DType,
    max_tensor_bytes: Option<u64>,
    used: Rc<RefCell<BTreeSet<String>>>,
}

impl Weights {
    /// All tensors of `file`, placed on `device` as f32.
    pub fn new(file: SafeTensors, device: &Device) -> Self {
        Self::from_checkpoint(Checkpoint::single(file), device)
    }

    /// All tensors of a (possibly sharded) checkpoint, placed on `device` as f32.
    pub fn from_checkpoint(checkpoint: Checkpoint, device: &Device) -> Self {
        Weights {
            store: Store::File(Rc::new(checkpoint)),
            prefix: String::new(),
            device: device.clone(),
            dtype: DType::F32,
            max_tensor_bytes: None,
            used: Rc::new(RefCell::new(BTreeSet::new())),
        }
    }

    /// Random parameters of whatever shape the model asks for (benchmarks of real-sized models
    /// without their weights). Nothing is read, so every shape is accepted.
    pub fn random(seed: u64, device: &Device) -> Self {
        Weights {
            store: Store::Random(seed),
            prefix: String::new(),
            device: device.clone(),
            dtype: DType::F32,
            max_tensor_bytes: None,
            used: Rc::new(RefCell::new(BTreeSet::new())),
        }
    }

    /// Zero parameters of whatever shape the model asks for, filled on the device (no host
    /// copy): a model that launches exactly the kernels the real one will, to compile them
    /// before its weights arrive. Nothing is read, so every shape is accepted.
    pub fn placeholder(device: &Device) -> Self {
        Weights {
            store: Store::Placeholder,
            ..Self::random(0, device)
        }
    }

    /// Whether these are [`Weights::placeholder`] parameters.
    pub fn is_placeholder(&self) -> bool {
        matches!(self.store, Store::Placeholder)
    }

    /// Stores parameters in `dtype` on the device (F32 by default; F16 where the device supports it).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Refuses tensors that would take more than `limit` bytes on the device (in the parameter
    /// dtype), before reading them: WebGPU cannot bind a buffer over the adapter's
    /// `maxStorageBufferBindingSize`, and a clear error beats a lost device.
    pub fn with_max_tensor_bytes(mut self, limit: Option<u64>) -> Self {
        self.max_tensor_bytes = limit;
        self
    }

    /// The checkpoint these weights are read from (`None` for random parameters).
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        match &self.store {
            Store::File(f) => Some(f),
            Store::Random(_) | Store::Placeholder => None,
        }
    }

    /// The dtype parameters are stored in (and models compute in).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The largest buffer, in bytes, one tensor may take on the device (see
    /// [`Weights::with_max_tensor_bytes`]); attention layers split their score matrices to fit.
    pub fn max_tensor_bytes(&self) -> Option<u64> {
        self.max_tensor_bytes
    }

    /// The view one level down: `pp("down_blocks").pp(0)` reads `down_blocks.0.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights {
        let mut w = self.clone();
        w.prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
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
        match &self.store {
            Store::File(f) => f.find(&self.key(name)).is_some(),
            // Random parameters exist under every name; loaders then pick the current key names.
            Store::Random(_) | Store::Placeholder => true,
        }
    }

    /// Shape of `name` under this prefix, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::File(f) => {
                let key = self.key(name);
                f.find(&key).and_then(|s| s.shape(&key)).map(|s| s.to_vec())
            }
            Store::Random(_) | Store::Placeholder => None,
        }
    }

    /// Reads `name` and checks it has shape `shape`.
    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        self.get_arranged(name, &shape, shape, |host| host)
    }

    /// Reads `name` (shape `shape`), rearranges its values on the host with `arrange` (a
    /// transpose, say) and uploads them as `out`. Placeholder parameters skip the host: zeros of
    /// shape `out` are made on the device.
    pub fn get_arranged<const D: usize>(
        &self,
        name: &str,
        shape: &[usize],
        out: [usize; D],
        arrange: impl FnOnce(Vec<f32>) -> Vec<f32>,
    ) -> Result<Tensor<D>> {
        if self.is_placeholder() {
            self.check_size(&self.key(name), shape)?;
            return Ok(self.zeros(out));
        }
        let host = self.get_host(name, shape)?;
        Ok(self.upload(arrange(host), out))
    }

    /// Zeros of `shape` on the device, in the parameter dtype.
    pub fn zeros<const D: usize>(&self, shape: [usize; D]) -> Tensor<D> {
        Tensor::<D>::zeros(shape, (&self.device, self.dtype))
    }

    /// Refuses a tensor of `shape` bigger than the device's largest buffer.
    fn check_size(&self, key: &str, shape: &[usize]) -> Result<()> {
        let Some(limit) = self.max_tensor_bytes else {
            return Ok(());
        };
        let bytes = shape.iter().product::<usize>() as u64 * self.dtype.size() as u64;
        if bytes <= limit {
            return Ok(());
        }
        let file = match &self.store {
            Store::File(f) => f.find(key).map_or(f.name(), |s| s.file()).to_string(),
            Store::Random(_) => "random parameters".to_string(),
            Store::Placeholder => "placeholder parameters".to_string(),
        };
        Err(crate::Error::TensorTooLarge {
            file,
            tensor: key.to_string(),
            bytes,
            limit,
        })
    }

    /// Reads `name` with shape `shape` to the host as f32 (e.g. to transpose before upload).
    pub fn get_host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let key = self.key(name);
        self.check_size(&key, shape)?;
        match &self.store {
            Store::File(f) => {
                let shard = f.find(&key).ok_or_else(|| Error::MissingTensor {
                    file: f.name().to_string(),
                    tensor: key.clone(),
                    expected: shape.to_vec(),
                })?;
                let host = shard.read_f32(&key, shape)?;
                self.used.borrow_mut().insert(key);
                Ok(host.data)
            }
            Store::Random(seed) => Ok(random_parameter(*seed, &key, shape)),
            Store::Placeholder => Ok(vec![0.0; shape.iter().product()]),
        }
    }

    /// Uploads host data to the device in the parameter dtype.
    pub fn upload<const D: usize>(&self, data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        // Converted on the host: an f16 model never holds an f32 copy on the device.
        Tensor::<D>::from_data(TensorData::new(data, shape), (&self.device, self.dtype))
    }

    /// Keys of the file that no part of the model has read (for completeness checks).
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.borrow();
        match &self.store {
            Store::File(f) => {
                let mut keys: Vec<String> = f
                    .index
                    .keys()
                    .filter(|k| !used.contains(*k))
                    .cloned()
                    .collect();
                keys.sort();
                keys
            }
            Store::Random(_) | Store::Placeholder => Vec::new(),
        }
    }
}

/// Runs `load`, which makes a model's parameters, with every device allocation it makes placed in
/// the device's persistent memory: a buffer of its exact size each, apart from the pools that
/// serve activations. Otherwise parameters land on pool pages sized to the largest allocation
/// seen so far and hold them, unused room included, for the model's life (SD 1.5 in f16: 72 MiB
/// of such room). What the load freed (temporaries) goes back to the device at the end. A no-op
/// on the CPU.
pub fn load_persistent<T>(device: &Device, load: impl FnOnce() -> T) -> T {
    /// burn's window asks its closure, input and output to be `Send` in case a backend ran the
    /// closure on another thread. Every backend of burn 0.22 runs it in place, on the calling
    /// thread (cubecl's allocation window, the fusion backend's, the default), so nothing is
    /// ever sent: the load keeps its non-`Send` captures (`&dyn ModelSource`, `Rc`s).
    struct InPlace<T>(T);
    // SAFETY: the wrapped value never leaves this thread (see above).
    unsafe impl<T> Send for InPlace<T> {}
    let InPlace(out) =
        device.memory_persistent_allocations(InPlace(load), |InPlace(f)| InPlace(f()));
    device.memory_cleanup();
    out
}

/// Seeded values for one parameter: 1-D tensors named `weight` (norm scales) are 1 ± 0.1,
/// other 1-D tensors 0.1·N, and matrices / kernels N(0, 1/fan_in).
fn random_parameter(seed: u64, key: &str, shape: &[usize]) -> Vec<f32> {
    let stream = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let n: usize = shape.iter().product();
    let z = crate::noise::randn(seed, stream, n);
    if shape.len() == 1 {
        let is_scale = key.ends_with("weight") || key.ends_with("gamma");
        z.into_iter()
            .map(|v| if is_scale { 1.0 + 0.1 * v } else { 0.1 * v })
            .collect()
    } else {
        let fan_in: usize = shape[1..].iter().product();
        let s = 1.0 / (fan_in.max(1) as f32).sqrt();
        z.into_iter().map(|v| v * s).collect()
    }
}
