//! # hetmoe
//!
//! Runs Mixture-of-Experts language models from standard Hugging Face checkpoints on
//! one workstation, across GPU memory, host DRAM and SSD. This crate re-exports the
//! public API of the workspace's crates; see the README for an overview and
//! `docs/design.md` for the architecture.
#![doc = include_str!("../README.md")]

pub use hetmoe_engine::*;

/// Model files: config parsing, safetensors checkpoints, the expert store.
pub use hetmoe_storage as storage;

/// CPU kernels and their ISA dispatch.
pub use hetmoe_cpu_kernels as cpu_kernels;

/// GPU kernels (CUDA through cudarc).
pub use hetmoe_gpu_kernels as gpu_kernels;

/// Routing predictors and traces.
pub use hetmoe_predictor as predictor;

/// Expert residency across tiers.
pub use hetmoe_offload as offload;
