//! Per-sequence state: the KV cache in host memory and the tokens fed so far.

use hetmoe_storage::ModelSpec;

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
}

impl Sequence {
    pub(crate) fn new(spec: &ModelSpec) -> Self {
        Sequence {
            layers: vec![LayerCache::default(); spec.n_layers],
            tokens: Vec::new(),
            kv_dim: spec.attention.kv_dim(),
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

    /// Reserves room for `positions` more positions in every layer.
    pub(crate) fn reserve(&mut self, positions: usize) {
        for l in &mut self.layers {
            l.k.reserve(positions * self.kv_dim);
            l.v.reserve(positions * self.kv_dim);
        }
    }
}
