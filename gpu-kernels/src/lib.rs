//! GPU side of hetmoe (to be built): a cudarc context with streams and events, pinned
//! host buffers for expert uploads, cuBLAS GEMMs for attention projections and resident
//! experts, and NVRTC-compiled CUDA C kernels with the same family names as
//! `hetmoe-cpu-kernels` (`matmul`, `norm`, `rope`, `softmax`, `activation`, `moe`).
//!
//! CUDA is loaded dynamically, so the workspace builds and every CPU path runs on machines
//! without a GPU or a CUDA toolkit; asking for a device there yields
//! [`GpuError::Unavailable`] rather than a panic. No GPU code exists yet: the engine runs
//! on the CPU only, and [`probe`] says so.

#![forbid(unsafe_code)]

/// Why the GPU cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU available: {0}")]
    Unavailable(String),
}

/// Looks for a usable CUDA device. Until the CUDA backend lands this always reports
/// that hetmoe was built without one, so callers take their CPU path.
pub fn probe() -> Result<(), GpuError> {
    Err(GpuError::Unavailable("this build of hetmoe has no CUDA backend yet".into()))
}
