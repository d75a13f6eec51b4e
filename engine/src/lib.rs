//! The hetmoe engine: loads a model folder, runs the forward pass of each supported
//! architecture over a normalized [`ModelSpec`], keeps per-sequence KV caches, samples,
//! and exposes generation (streaming, batched) through [`Engine`].
//!
//! One token's path: [`forward`] embeds it, then every layer runs attention
//! ([`forward::attention`]) and its feed-forward block: a dense SwiGLU MLP or the MoE
//! block ([`forward::moe`]), where the router picks experts and each expert runs as a
//! separate unit over the tokens routed to it; expert outputs are summed per token in
//! top-k rank order, so the result never depends on where or when an expert ran.
//!
//! It knows nothing of file formats (that is `hetmoe-storage`) nor of SIMD (that is
//! `hetmoe-cpu-kernels`).

#![forbid(unsafe_code)]

mod engine;
mod error;
mod experts;
pub mod forward;
mod generate;
mod kv_cache;
mod offload;
mod sampling;
mod scratch;
mod tokenizer;
mod weights;

pub use engine::{Engine, EngineOptions};
pub use error::{EngineError, EngineResult};
pub use forward::{BatchItem, ForwardObserver, LogitsMode, PhaseTimes, Routing};
pub use generate::{FinishReason, GenerateOptions, Generation};
pub use hetmoe_offload::{CacheConfig, CacheMetrics, PolicyKind};
pub use hetmoe_storage::{Architecture, ModelSpec};
pub use kv_cache::{KvCacheDtype, Sequence};
pub use offload::ExpertLayout;
pub use sampling::Sampling;
pub use tokenizer::TextTokenizer;
pub use weights::WeightFormat;
