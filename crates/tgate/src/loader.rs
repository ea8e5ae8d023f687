//! Reading a diffusers pipeline folder through any byte source (a directory natively, fetched
//! files in the browser, a map in tests). The core never touches a filesystem.

use std::collections::HashMap;

use burn::tensor::{DType, Device};

use crate::error::{Error, Result};
use crate::safetensors::{ByteSource, SafeTensors};
use crate::weights::Weights;

/// Where the files of a model folder come from. Paths are `/`-separated and relative to the
/// folder (`unet/config.json`).
pub trait ModelSource {
    /// The bytes of `path`, or `None` when the file does not exist.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>>;

    /// `path` for reading in parts (weights are read tensor by tensor through this), or `None`
    /// when it does not exist. By default the whole file is read into memory.
    fn open(&self, path: &str) -> Result<Option<Box<dyn ByteSource>>> {
        Ok(self.read(path)?.map(|b| Box::new(b) as Box<dyn ByteSource>))
    }

    /// The largest tensor, in bytes on the device, that models loaded from here may hold
    /// (a WebGPU adapter's `maxStorageBufferBindingSize`); `None`: no limit.
    fn max_tensor_bytes(&self) -> Option<u64> {
        None
    }

    /// A name for the folder in messages.
    fn describe(&self) -> String {
        "model folder".into()
    }
}

/// Files held in memory, keyed by relative path.
#[derive(Default, Debug, Clone)]
pub struct MemorySource {
    pub files: HashMap<String, Vec<u8>>,
}

impl ModelSource for MemorySource {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.files.get(path).cloned())
    }
}

/// Reads a file the model cannot do without.
pub fn read_required(src: &dyn ModelSource, path: &str) -> Result<Vec<u8>> {
    src.read(path)?
        .ok_or_else(|| Error::MissingFile(format!("{} ({})", path, src.describe())))
}

/// Which weight variant to prefer when several are present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Variant {
    /// The plain file if present, else `fp16`, else `bf16`.
    #[default]
    Auto,
    /// `*.fp16.safetensors` first.
    Fp16,
}

/// Loads `{dir}/{stem}.safetensors` (or its `.fp16` / `.bf16` variant) onto `device`.
pub fn load_weights(
    src: &dyn ModelSource,
    dir: &str,
    stem: &str,
    variant: Variant,
    device: &Device,
) -> Result<Weights> {
    let plain = format!("{dir}/{stem}.safetensors");
    let fp16 = format!("{dir}/{stem}.fp16.safetensors");
    let bf16 = format!("{dir}/{stem}.bf16.safetensors");
    let order = match variant {
        Variant::Auto => [plain, fp16, bf16],
        Variant::Fp16 => [fp16, plain, bf16],
    };
    for path in &order {
        if let Some(data) = src.open(path)? {
            return Ok(Weights::new(SafeTensors::open(path.clone(), data)?, device)
                .with_max_tensor_bytes(src.max_tensor_bytes()));
        }
    }
    let sharded = format!("{dir}/{stem}.safetensors.index.json");
    if src.read(&sharded)?.is_some() {
        return Err(Error::config(
            sharded,
            "sharded checkpoints are not supported; merge the shards into one file",
        ));
    }
    Err(Error::MissingFile(format!(
        "{} (also tried {} and {}) in {}",
        order[0],
        order[1],
        order[2],
        src.describe()
    )))
}

/// Refuses a compute dtype the models cannot use on `device`: `F32` always works, `F16` needs
/// the device's support (on WebGPU, the adapter's `shader-f16` feature).
pub fn check_dtype(dtype: DType, device: &Device) -> Result<()> {
    match dtype {
        DType::F32 => Ok(()),
        DType::F16 if device.supports_dtype(DType::F16) => Ok(()),
        DType::F16 => Err(Error::param(
            "dtype",
            "this device cannot compute in f16 (on WebGPU the adapter lacks `shader-f16`); use f32",
        )),
        other => Err(Error::param(
            "dtype",
            format!("{other:?} is not supported; use f32 or f16"),
        )),
    }
}

/// The tighter of two buffer limits (`None`: no limit).
pub fn tighter_limit(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A model folder on the local filesystem (native builds only).
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Clone)]
pub struct DirSource {
    pub root: std::path::PathBuf,
    /// See [`ModelSource::max_tensor_bytes`].
    pub max_tensor_bytes: Option<u64>,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirSource {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        DirSource {
            root: root.into(),
            max_tensor_bytes: None,
        }
    }

    /// The device binds at most `limit` bytes per buffer (see [`ModelSource::max_tensor_bytes`]).
    pub fn with_max_tensor_bytes(mut self, limit: Option<u64>) -> Self {
        self.max_tensor_bytes = limit;
        self
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl ModelSource for DirSource {
    fn max_tensor_bytes(&self) -> Option<u64> {
        self.max_tensor_bytes
    }
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let full = self.root.join(path);
        match std::fs::read(&full) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::MissingFile(format!("{}: {e}", full.display()))),
        }
    }

    /// Weights are read tensor by tensor from the open file, never whole.
    fn open(&self, path: &str) -> Result<Option<Box<dyn ByteSource>>> {
        let full = self.root.join(path);
        let file = match std::fs::File::open(&full) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::MissingFile(format!("{}: {e}", full.display()))),
        };
        let len = file
            .metadata()
            .map_err(|e| Error::MissingFile(format!("{}: {e}", full.display())))?
            .len();
        Ok(Some(Box::new(FileBytes {
            file: std::cell::RefCell::new(file),
            len,
        })))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// An open file read in ranges.
#[cfg(not(target_arch = "wasm32"))]
struct FileBytes {
    file: std::cell::RefCell<std::fs::File>,
    len: u64,
}

#[cfg(not(target_arch = "wasm32"))]
impl ByteSource for FileBytes {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_range(&self, start: u64, end: u64) -> std::result::Result<Vec<u8>, String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = self.file.borrow_mut();
        let n = usize::try_from(end - start).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; n];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }
}
