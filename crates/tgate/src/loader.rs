//! Reading a diffusers pipeline folder through any byte source (a directory natively, fetched
//! files in the browser, a map in tests). The core never touches a filesystem.

use std::collections::HashMap;

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::safetensors::SafeTensors;
use crate::weights::Weights;

/// Where the files of a model folder come from. Paths are `/`-separated and relative to the
/// folder (`unet/config.json`).
pub trait ModelSource {
    /// The bytes of `path`, or `None` when the file does not exist.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>>;

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
        if let Some(bytes) = src.read(path)? {
            return Ok(Weights::new(
                SafeTensors::parse(path.clone(), bytes)?,
                device,
            ));
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

/// A model folder on the local filesystem (native builds only).
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Clone)]
pub struct DirSource {
    pub root: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirSource {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        DirSource { root: root.into() }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl ModelSource for DirSource {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let full = self.root.join(path);
        match std::fs::read(&full) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::MissingFile(format!("{}: {e}", full.display()))),
        }
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}
