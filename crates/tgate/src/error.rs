//! The one error type of the crate. Every fallible public function returns [`Result`].

use thiserror::Error;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, Error)]
pub enum Error {
    /// A `config.json` (or another JSON file) is missing a key, has a wrong type, or an unsupported value.
    #[error("config `{file}`: {message}")]
    Config { file: String, message: String },

    /// A file the model folder must contain is not there.
    #[error("missing file `{0}`")]
    MissingFile(String),

    /// A safetensors file is corrupt or truncated.
    #[error("weights `{file}`: corrupt safetensors file: {message}")]
    CorruptWeights { file: String, message: String },

    /// A tensor the model needs is not in the weights.
    #[error("weights `{file}`: missing tensor `{tensor}` (expected shape {expected:?})")]
    MissingTensor {
        file: String,
        tensor: String,
        expected: Vec<usize>,
    },

    /// A tensor has the wrong shape.
    #[error("weights `{file}`: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor has a dtype the loader cannot use.
    #[error("weights `{file}`: tensor `{tensor}` has dtype {found}, expected {expected}")]
    DtypeMismatch {
        file: String,
        tensor: String,
        expected: String,
        found: String,
    },

    /// A tensor is bigger than the device can bind as one buffer (WebGPU's
    /// `maxStorageBufferBindingSize`, or a caller's cap).
    #[error("weights `{file}`: tensor `{tensor}` needs {bytes} bytes on the device, over its limit of {limit} bytes per buffer")]
    TensorTooLarge {
        file: String,
        tensor: String,
        bytes: u64,
        limit: u64,
    },

    /// An activation of a generation at the requested size would be bigger than the device can
    /// bind as one buffer (attention scores are split to fit; feature maps are not).
    #[error("a {width}×{height} image needs {what} of {bytes} bytes, over this device's limit of {limit} bytes per buffer: choose a smaller width/height")]
    ActivationTooLarge {
        width: usize,
        height: usize,
        what: String,
        bytes: u64,
        limit: u64,
    },

    /// A generation at the requested size would need more memory at once than the device has
    /// (a lower bound from the configs: the largest feature map three times over, for a layer's
    /// input, its output and the residual kept beside them).
    #[error("a {width}×{height} image needs at least {bytes} bytes of memory at once (three times {what}), over the {limit} bytes available: choose a smaller width/height")]
    MemoryTooLarge {
        width: usize,
        height: usize,
        what: String,
        bytes: u64,
        limit: u64,
    },

    /// The tokenizer files could not be read or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A parameter given by the caller is impossible (steps 0, gate step past the end, ...).
    #[error("invalid parameter `{name}`: {message}")]
    InvalidParameter { name: String, message: String },

    /// An input tensor (noise, latents) has the wrong shape or content.
    #[error("input `{name}`: {message}")]
    Input { name: String, message: String },

    /// The compute device failed (lost device, failed readback, out of memory).
    #[error("device: {0}")]
    Device(String),

    /// Generation was cancelled by the caller between steps.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            message: message.into(),
        }
    }
    pub fn param(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name: name.into(),
            message: message.into(),
        }
    }
    pub fn input(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Input {
            name: name.into(),
            message: message.into(),
        }
    }
}
