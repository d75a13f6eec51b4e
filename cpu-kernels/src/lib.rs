//! CPU kernels for hetmoe: functions over slices, one module per family
//! (`matmul`, `moe`, `norm`, `rope`, `softmax`, `activation`, `topk`, `attention`), plus a
//! memory-bandwidth probe (`bandwidth`) to compare them with, and huge-page weight buffers
//! (`memory`).
//!
//! The instruction set is detected once at run time ([`dispatch`]); per-ISA code lives in
//! files named after the ISA, and the scalar code is always compiled and is the oracle the
//! SIMD paths are tested against. Kernels know nothing of models, layers or tiers.
//!
//! Determinism contract: every output element is computed by one thread with a reduction
//! order that depends only on the ISA and the reduction length, never on the thread count
//! or on how many tokens are batched together. The engine relies on this to make
//! offloading, batching and threading leave logits bit-identical.

pub mod activation;
pub mod attention;
pub mod bandwidth;
pub mod dispatch;
mod error;
pub mod matmul;
pub mod memory;
pub mod moe;
pub mod norm;
pub mod parallel;
pub mod quant;
pub mod rope;
pub mod row_groups;
pub mod row_tiles;
pub mod softmax;
pub mod topk;

pub use dispatch::{active_isa, force_isa, force_streaming, streaming, Isa, Streaming};
pub use error::KernelError;
pub use matmul::{axpy_rows, matmul, MatRef, WeightsRef};
