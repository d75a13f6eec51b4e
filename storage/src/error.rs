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

    // ---- expert store: format ----
    #[error("{path}: not an expert store (bad magic {found:02x?})")]
    StoreBadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: expert store format version {found} is not supported (this build reads {supported})")]
    StoreVersion { path: PathBuf, found: u32, supported: u32 },
    #[error(
        "{path}: expert store header checksum mismatch (stored {expected:#018x}, computed {actual:#018x})"
    )]
    StoreHeaderChecksum { path: PathBuf, expected: u64, actual: u64 },
    #[error(
        "{path}: expert store is truncated or was not finished: {expected} bytes expected, file has {actual}"
    )]
    StoreTruncated { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: invalid expert store header: {reason}")]
    StoreHeader { path: PathBuf, reason: String },
    #[error("{path}: extent of layer {layer} expert {expert} at offset {offset}: {reason}")]
    StoreExtent { path: PathBuf, layer: usize, expert: usize, offset: u64, reason: String },
    #[error("{path}: expert store was built from a different checkpoint than {model_dir}: {reason}")]
    StoreStale { path: PathBuf, model_dir: PathBuf, reason: String },
    #[error("expert store encoding {encoding}: {reason}")]
    StoreEncoding { encoding: String, reason: String },
    #[error("layer {layer} expert {expert}: tensor {name} is not exactly representable in bf16 (value {value}); repack with f32")]
    InexactBf16 { layer: usize, expert: usize, name: String, value: f32 },
    #[error("repack of {path} was cancelled")]
    RepackCancelled { path: PathBuf },

    // ---- expert store: reads ----
    #[error("layer {layer} expert {expert} is not in the expert store")]
    UnknownExpert { layer: usize, expert: usize },
    #[error("layer {layer} expert {expert}: destination buffer {reason} (needs {needed} bytes, 4096-aligned; got {actual} bytes at address alignment {align})")]
    BadDestination {
        layer: usize,
        expert: usize,
        needed: usize,
        actual: usize,
        align: usize,
        reason: &'static str,
    },
    #[error("layer {layer} expert {expert}: I/O error reading {path} at offset {offset}: {source}")]
    ExtentIo {
        layer: usize,
        expert: usize,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer} expert {expert}: short read of {path} at offset {offset}: {actual} of {expected} bytes (end of file)")]
    ExtentShortRead { layer: usize, expert: usize, path: PathBuf, offset: u64, expected: u64, actual: u64 },
    #[error("layer {layer} expert {expert}: checksum mismatch in {path} extent at offset {offset} (stored {expected:#018x}, read {actual:#018x})")]
    ExtentChecksum { layer: usize, expert: usize, path: PathBuf, offset: u64, expected: u64, actual: u64 },
    #[error("expert reader setup failed ({reader}): {source}")]
    ReaderSetup {
        reader: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io { path: path.into(), source }
    }
}
