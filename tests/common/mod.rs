//! Shared helpers of the integration tests: fixture paths and the reference tensors that
//! Hugging Face transformers computed for them (see `tests/fixtures/README.md`).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// Max |logit − reference| for float32 math over bf16 weights (fixtures README,
/// `suggested_tolerances`: 25× the reference's own float32 noise). Do not loosen.
pub const LOGITS_TOL: f32 = 1e-4;
/// Same bound for hidden states, the final norm and MoE block outputs.
pub const HIDDEN_TOL: f32 = 1e-4;
/// Router logits and top-k combine weights.
pub const ROUTER_TOL: f32 = 5e-5;

pub const ARCHS: [&str; 4] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(arch: &str) -> PathBuf {
    repo().join("tests/fixtures").join(arch)
}

pub fn bundled_model() -> PathBuf {
    repo().join("models/tiny-mixtral-trained")
}

/// A tensor of the reference file, as f32 or i64 values plus its shape.
#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

impl RefTensor {
    pub fn ids(&self) -> Vec<u32> {
        self.i64.iter().map(|&v| v as u32).collect()
    }
    pub fn usize(&self) -> Vec<usize> {
        self.i64.iter().map(|&v| v as usize).collect()
    }
}

pub struct Reference {
    pub tensors: HashMap<String, RefTensor>,
}

impl Reference {
    pub fn load(arch: &str) -> Reference {
        let bytes = std::fs::read(fixture(arch).join("reference/reference.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let mut t = RefTensor { shape: view.shape().to_vec(), f32: vec![], i64: vec![] };
            match view.dtype() {
                Dtype::F32 => {
                    t.f32 = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
                }
                Dtype::I64 => {
                    t.i64 = data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
                }
                other => panic!("unexpected dtype {other:?} in reference"),
            }
            tensors.insert(name, t);
        }
        Reference { tensors }
    }

    pub fn get(&self, name: &str) -> &RefTensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference has no {name}"))
    }
}

/// Max |a − b|, asserting equal lengths.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    let d = max_abs_diff(got, want);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
    d
}

/// Positions (rows of `[n, vocab]` logits) where both sides pick the same top-1 token
/// (lowest id on ties, as `torch.argmax`).
pub fn top1_agreement(got: &[f32], want: &[f32], vocab: usize) -> usize {
    let argmax = |row: &[f32]| row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
    got.chunks_exact(vocab).zip(want.chunks_exact(vocab)).filter(|(g, w)| argmax(g) == argmax(w)).count()
}
