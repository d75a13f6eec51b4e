//! Per-sequence state: the KV cache in host memory and the tokens fed so far.

use hetmoe_storage::ModelSpec;

use crate::scratch::Scratch;

/// Keys and values of one layer, `[positions, n_kv_heads * head_dim]` each, in f32.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// One sequence being generated: its KV cache and the tokens it holds. Created by
/// [`crate::Engine::new_sequence`]; independent of every other sequence.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) kv_dim: usize,
    /// Buffers reused by every step of this sequence (and of batches it leads).
    pub(crate) scratch: Scratch,
}

impl Sequence {
    pub(crate) fn new(spec: &ModelSpec) -> Self {
        Sequence {
            layers: vec![LayerCache::default(); spec.n_layers],
            tokens: Vec::new(),
            kv_dim: spec.attention.kv_dim(),
            scratch: Scratch::default(),
        }
    }

    /// Number of positions in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Every token fed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.len() + l.v.len()) * 4).sum()
    }

    /// Drops cached positions beyond the tokens fed (after a failed step).
    pub(crate) fn rollback(&mut self) {
        let keep = self.tokens.len() * self.kv_dim;
        for l in &mut self.layers {
            l.k.truncate(keep);
            l.v.truncate(keep);
        }
    }

    /// Reserves room for `positions` more positions in every layer.
    pub(crate) fn reserve(&mut self, positions: usize) {
        for l in &mut self.layers {
            l.k.reserve(positions * self.kv_dim);
            l.v.reserve(positions * self.kv_dim);
        }
    }
}
