use std::path::PathBuf;

pub type StorageResult<T> = Result<T, StorageError>;

/// Everything that can be wrong with a model folder or an expert store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown or unsupported model_type {model_type:?} (supported: {supported})")]
    UnsupportedArchitecture { model_type: String, supported: &'static str },
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("{path}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { path: PathBuf },
    #[error("{path}: invalid safetensors file: {reason}")]
    InvalidSafetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor {name} ({dtype}) is out of the file's bounds")]
    TensorOutOfBounds { path: PathBuf, name: String, dtype: String },
    #[error("tensor {name}: dtype {dtype} is not supported (expected F32, F16 or BF16)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name}: shape {actual:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("tensor {name} appears in both {first} and {second}")]
    DuplicateTensor { name: String, first: PathBuf, second: PathBuf },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io { path: path.into(), source }
    }
}
