//! Reading a diffusers pipeline folder through any byte source (a directory natively, fetched
//! files in the browser, a map in tests). The core never touches a filesystem.

use std::collections::HashMap;

use burn::tensor::{DType, Device};

use crate::error::{Error, Result};
use crate::safetensors::{ByteSource, SafeTensors};
use crate::weights::{Checkpoint, Weights};

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

    /// The memory, in bytes, a generation with models loaded from here may use at once (the
    /// device's, or the host's for the CPU); `None`: not known. Requests that cannot fit are
    /// refused before any work is done.
    fn max_memory_bytes(&self) -> Option<u64> {
        None
    }

    /// A name for the folder in messages.
    fn describe(&self) -> String {
        "model folder".into()
    }

    /// Whether models loaded from here get zero placeholder weights instead of reading any
    /// weight file (see [`Placeholders`]).
    fn placeholder_weights(&self) -> bool {
        false
    }
}

/// A folder whose configs and tokenizer are read as they are, but whose weights are zeros made
/// on the device ([`Weights::placeholder`]), nothing downloaded or read: the pipeline it loads
/// launches exactly the kernels the real one will, so a front end can compile them (a warm-up
/// generation at the size it expects) while the real weights are still on their way.
pub struct Placeholders<'a>(pub &'a dyn ModelSource);

impl ModelSource for Placeholders<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        self.0.read(path)
    }
    /// Weight files are never opened here (the loader makes placeholders instead).
    fn open(&self, path: &str) -> Result<Option<Box<dyn ByteSource>>> {
        Err(Error::param(
            "placeholders",
            format!("{path}: a placeholder pipeline reads no weight file"),
        ))
    }
    fn max_tensor_bytes(&self) -> Option<u64> {
        self.0.max_tensor_bytes()
    }
    fn max_memory_bytes(&self) -> Option<u64> {
        self.0.max_memory_bytes()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn placeholder_weights(&self) -> bool {
        true
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

/// Which weight variant to prefer when several are present (diffusers' `variant=`). Whatever is
/// preferred, the others are tried next, so a folder holding only one variant always loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Variant {
    /// By compute dtype: for f16 the `fp16` files first (half the download, no rounding at
    /// load), for f32 the full-precision ones; then the rest.
    #[default]
    Auto,
    /// The plain (usually f32) files first.
    Fp32,
    /// `*.fp16.safetensors` first.
    Fp16,
    /// `*.bf16.safetensors` first.
    Bf16,
}

impl Variant {
    /// Parses a variant name as diffusers writes it (`fp16`, `bf16`; `fp32` or `auto`).
    pub fn parse(name: &str) -> Result<Variant> {
        match name {
            "auto" => Ok(Variant::Auto),
            "fp32" | "f32" => Ok(Variant::Fp32),
            "fp16" | "f16" => Ok(Variant::Fp16),
            "bf16" => Ok(Variant::Bf16),
            other => Err(Error::param(
                "variant",
                format!("unknown variant `{other}`; use auto, fp32, fp16 or bf16"),
            )),
        }
    }

    /// The file-name suffixes to try, best first (`""`: the plain file), and why the first.
    pub fn order(self, dtype: DType) -> ([&'static str; 3], &'static str) {
        match (self, dtype) {
            (Variant::Auto, DType::F16) => (
                ["fp16", "", "bf16"],
                "f16 compute: the fp16 variant is preferred",
            ),
            (Variant::Auto, _) => (
                ["", "fp16", "bf16"],
                "f32 compute: the full-precision file is preferred",
            ),
            (Variant::Fp32, _) => (["", "fp16", "bf16"], "variant fp32 requested"),
            (Variant::Fp16, _) => (["fp16", "", "bf16"], "variant fp16 requested"),
            (Variant::Bf16, _) => (["bf16", "", "fp16"], "variant bf16 requested"),
        }
    }
}

/// The two file names of a checkpoint `stem` in a variant (`""`: none), as diffusers and
/// transformers name them: `{stem}.fp16.safetensors`, and for a sharded one the index
/// `{stem}.safetensors.index.fp16.json`.
pub fn checkpoint_names(dir: &str, stem: &str, variant: &str) -> (String, String) {
    if variant.is_empty() {
        (
            format!("{dir}/{stem}.safetensors"),
            format!("{dir}/{stem}.safetensors.index.json"),
        )
    } else {
        (
            format!("{dir}/{stem}.{variant}.safetensors"),
            format!("{dir}/{stem}.safetensors.index.{variant}.json"),
        )
    }
}

/// Loads the checkpoint `{dir}/{stem}` onto `device` in f32 (see [`load_weights_as`]).
pub fn load_weights(
    src: &dyn ModelSource,
    dir: &str,
    stem: &str,
    variant: Variant,
    device: &Device,
) -> Result<Weights> {
    load_weights_as(src, dir, stem, variant, DType::F32, device)
}

/// Loads the checkpoint `{dir}/{stem}` for computing in `dtype`: the first of its variants
/// ([`Variant::order`]) that exists, as one `.safetensors` file or as shards listed by a
/// `.safetensors.index.json`. [`Weights::checkpoint`] tells which files were read, and
/// [`Checkpoint::reason`] why.
pub fn load_weights_as(
    src: &dyn ModelSource,
    dir: &str,
    stem: &str,
    variant: Variant,
    dtype: DType,
    device: &Device,
) -> Result<Weights> {
    if src.placeholder_weights() {
        return Ok(Weights::placeholder(device)
            .with_dtype(dtype)
            .with_max_tensor_bytes(src.max_tensor_bytes()));
    }
    let (order, why) = variant.order(dtype);
    let mut tried = Vec::new();
    for (i, v) in order.iter().enumerate() {
        let reason = if i == 0 {
            why.to_string()
        } else {
            format!("{why}, but only this variant is present")
        };
        let (file, index) = checkpoint_names(dir, stem, v);
        let checkpoint = if let Some(data) = src.open(&file)? {
            Checkpoint::single(SafeTensors::open(file, data)?)
        } else if let Some(json) = src.read(&index)? {
            open_shards(src, dir, &index, &json)?
        } else {
            tried.push(file);
            tried.push(index);
            continue;
        };
        return Ok(
            Weights::from_checkpoint(checkpoint.with_reason(reason), device)
                .with_dtype(dtype)
                .with_max_tensor_bytes(src.max_tensor_bytes()),
        );
    }
    Err(Error::MissingFile(format!(
        "{} (also tried {}) in {}",
        tried[0],
        tried[1..].join(", "),
        src.describe()
    )))
}

/// The shard files a sharded checkpoint's index names, in order of first appearance. The index
/// is `{"metadata": {...}, "weight_map": {tensor: shard file}}`; shard files lie beside it.
fn shard_files(index: &str, json: &[u8]) -> Result<Vec<(String, Vec<String>)>> {
    let doc: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| Error::config(index, format!("invalid JSON: {e}")))?;
    let map = doc
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "no `weight_map` object"))?;
    let mut shards: Vec<(String, Vec<String>)> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::config(index, format!("`weight_map.{tensor}` is not a file name"))
        })?;
        // Shards lie beside the index: no paths, so an index cannot point outside the folder.
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(Error::config(
                index,
                format!("`weight_map.{tensor}`: `{file}` is not a file name beside the index"),
            ));
        }
        match shards.iter_mut().find(|(f, _)| f == file) {
            Some((_, tensors)) => tensors.push(tensor.clone()),
            None => shards.push((file.to_string(), vec![tensor.clone()])),
        }
    }
    if shards.is_empty() {
        return Err(Error::config(index, "`weight_map` is empty"));
    }
    Ok(shards)
}

/// Opens every shard an index names and checks each holds the tensors the index puts there.
fn open_shards(src: &dyn ModelSource, dir: &str, index: &str, json: &[u8]) -> Result<Checkpoint> {
    let mut files = Vec::new();
    for (file, tensors) in shard_files(index, json)? {
        let path = format!("{dir}/{file}");
        let data = src.open(&path)?.ok_or_else(|| {
            Error::MissingFile(format!(
                "{path} (a shard named by {index}) in {}",
                src.describe()
            ))
        })?;
        let shard = SafeTensors::open(path.clone(), data)?;
        if let Some(t) = tensors.iter().find(|t| !shard.contains(t)) {
            return Err(Error::CorruptWeights {
                file: path,
                message: format!("{index} puts tensor `{t}` in this shard, which lacks it"),
            });
        }
        files.push(shard);
    }
    Checkpoint::sharded(index.to_string(), files)
}

/// Which files a model part was read from, and why that variant (shown while loading and in
/// load results).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedFiles {
    /// The model part's folder (`unet`, `prior_text_encoder`, ...).
    pub part: String,
    /// The safetensors files read (several for a sharded checkpoint).
    pub files: Vec<String>,
    /// Bytes of tensor data in them.
    pub bytes: u64,
    /// Why this variant (e.g. "f16 compute: the fp16 variant is preferred").
    pub reason: String,
}

impl LoadedFiles {
    pub fn of(part: &str, w: &Weights) -> Self {
        let (files, bytes, reason) = match w.checkpoint() {
            Some(c) => (
                c.files().map(str::to_string).collect(),
                c.data_len(),
                c.reason().to_string(),
            ),
            None if w.is_placeholder() => (Vec::new(), 0, "placeholder parameters".to_string()),
            None => (Vec::new(), 0, "random parameters".to_string()),
        };
        LoadedFiles {
            part: part.to_string(),
            files,
            bytes,
            reason,
        }
    }
}

impl std::fmt::Display for LoadedFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ({:.1} MB; {})",
            self.part,
            self.files.join(" + "),
            self.bytes as f64 / 1e6,
            self.reason
        )
    }
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
    /// See [`ModelSource::max_memory_bytes`].
    pub max_memory_bytes: Option<u64>,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirSource {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        DirSource {
            root: root.into(),
            max_tensor_bytes: None,
            max_memory_bytes: None,
        }
    }

    /// A generation may use at most `budget` bytes at once (see
    /// [`ModelSource::max_memory_bytes`]).
    pub fn with_max_memory_bytes(mut self, budget: Option<u64>) -> Self {
        self.max_memory_bytes = budget;
        self
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
    fn max_memory_bytes(&self) -> Option<u64> {
        self.max_memory_bytes
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
