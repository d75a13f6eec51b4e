//! Shape-checked views of checkpoint tensors.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::dtype::DType;

/// Where a tensor's bytes live: a range of a shared memory map (zero-copy) or an owned buffer.
#[derive(Debug, Clone)]
pub enum TensorData {
    Mapped { map: Arc<Mmap>, start: usize, end: usize },
    Owned(Arc<[u8]>),
}

/// One tensor: dtype, shape and its little-endian bytes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            // The range was bounds-checked against the map when the checkpoint was opened.
            TensorData::Mapped { map, start, end } => &map[*start..*end],
            TensorData::Owned(b) => b,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts every element to f32 (used for small tensors: norms, biases).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }
}
