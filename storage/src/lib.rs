//! Model files for hetmoe.
//!
//! This crate owns everything that is read from disk: a Hugging Face model folder
//! (`config.json` parsed once into a validated [`ModelSpec`], single-file or sharded
//! safetensors memory-mapped zero-copy, one tensor-name table per architecture) and the
//! on-disk expert store with its readers ([`expert_store`]).
//!
//! It knows nothing of model math, caching policy or devices: it hands out typed,
//! shape-checked views of bytes and says precisely what is wrong when a file is bad.

mod arch;
mod checkpoint;
mod config;
mod dtype;
mod error;
pub mod expert_store;
mod ids;
mod spec;
mod tensor;

pub use arch::WeightKey;
pub use checkpoint::Checkpoint;
pub use config::parse_config;
pub use dtype::DType;
pub use error::{StorageError, StorageResult};
pub use expert_store::{
    repack, AlignedBuf, Encoding, ExpertReader, ExpertStore, ReadRequest, ReaderChoice, ReaderKind,
    ReaderOptions, RepackControl, RepackProgress, RepackSummary,
};
pub use ids::{ExpertId, ExpertKey, LayerId};
pub use spec::{
    Architecture, AttentionSpec, FfnKind, LayerSpec, ModelSpec, MoeSpec, QkNorm, RopeSpec, SharedExpertSpec,
};
pub use tensor::{Tensor, TensorData};

/// Opens a Hugging Face model folder: parses `config.json` and maps the safetensors.
///
/// This only reads headers; tensor data is paged in on first use.
pub fn open_model_dir(dir: impl AsRef<std::path::Path>) -> StorageResult<(ModelSpec, Checkpoint)> {
    let dir = dir.as_ref();
    let spec = config::read_config(dir)?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok((spec, checkpoint))
}
