//! Error types. One enum per layer: [`WeightError`] for files and tensors on disk,
//! [`Error`] for everything above (configs, inputs, models). Every variant names the
//! file, tensor or argument at fault so that a user can act on the message alone.

use std::path::PathBuf;

/// Errors from reading safetensors files and component folders.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: no tensor named `{name}`")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor `{name}` (not a weight of {model})")]
    Unexpected {
        path: PathBuf,
        name: String,
        model: String,
    },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {got}, expected {expected}")]
    Dtype {
        path: PathBuf,
        name: String,
        got: String,
        expected: String,
    },
    #[error("{path}: no safetensors weights found ({detail})")]
    NoWeights { path: PathBuf, detail: String },
    #[error("{path}: invalid shard index: {reason}")]
    Index { path: PathBuf, reason: String },
}

/// Errors of the engine above the weight files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad input from the user (a tensor of the wrong shape, a bad argument).
    #[error("{0}")]
    Invalid(String),
    /// A kernel device failed: a driver error, or a fault the emulator caught (its message
    /// names the kernel, block and thread).
    #[error("{0}")]
    Device(String),
    /// Stopped by the user (Ctrl-C) or a cancellation.
    #[error("interrupted")]
    Interrupted,
    /// A large host allocation failed ([`crate::tensor::zeroed`]): what it was for and
    /// how many bytes it asked for.
    #[error("out of memory: {what} needs {bytes} bytes ({:.2} GB) and the allocation failed; try a smaller size or fewer frames", *bytes as f64 / 1e9)]
    OutOfMemory { what: &'static str, bytes: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
