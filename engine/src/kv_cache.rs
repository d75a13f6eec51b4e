//! Per-sequence state: the KV cache in host memory and the tokens fed so far.

use half::bf16;
use hetmoe_cpu_kernels::attention::KvRef;
use hetmoe_storage::ModelSpec;

use crate::forward::PhaseTimes;
use crate::scratch::Scratch;

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// Exact: what the reference computes.
    #[default]
    F32,
    /// Half the memory and the bytes read per decode step; keys and values are rounded to
    /// bf16 when appended (logits move by ~1e-3 relative).
    Bf16,
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvCacheDtype::F32),
            "bf16" => Ok(KvCacheDtype::Bf16),
            other => Err(format!("unknown KV cache type {other:?} (f32, bf16)")),
        }
    }
}

impl KvCacheDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            KvCacheDtype::F32 => 4,
            KvCacheDtype::Bf16 => 2,
        }
    }
}

/// Keys and values of one layer, `[positions, n_kv_heads * head_dim]` each.
#[derive(Debug, Clone)]
pub(crate) enum LayerCache {
    F32 { k: Vec<f32>, v: Vec<f32> },
    Bf16 { k: Vec<bf16>, v: Vec<bf16> },
}

impl LayerCache {
    fn new(dtype: KvCacheDtype) -> Self {
        match dtype {
            KvCacheDtype::F32 => LayerCache::F32 { k: Vec::new(), v: Vec::new() },
            KvCacheDtype::Bf16 => LayerCache::Bf16 { k: Vec::new(), v: Vec::new() },
        }
    }

    /// Appends `[m, kv_dim]` keys and values.
    pub(crate) fn append(&mut self, k_new: &[f32], v_new: &[f32]) {
        match self {
            LayerCache::F32 { k, v } => {
                k.extend_from_slice(k_new);
                v.extend_from_slice(v_new);
            }
            LayerCache::Bf16 { k, v } => {
                k.extend(k_new.iter().map(|&x| bf16::from_f32(x)));
                v.extend(v_new.iter().map(|&x| bf16::from_f32(x)));
            }
        }
    }

    pub(crate) fn views(&self) -> (KvRef<'_>, KvRef<'_>) {
        match self {
            LayerCache::F32 { k, v } => (KvRef::F32(k), KvRef::F32(v)),
            LayerCache::Bf16 { k, v } => (KvRef::Bf16(k), KvRef::Bf16(v)),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            LayerCache::F32 { k, v } => {
                k.truncate(n);
                v.truncate(n);
            }
            LayerCache::Bf16 { k, v } => {
                k.truncate(n);
                v.truncate(n);
            }
        }
    }

    fn reserve(&mut self, n: usize) {
        match self {
            LayerCache::F32 { k, v } => {
                k.reserve(n);
                v.reserve(n);
            }
            LayerCache::Bf16 { k, v } => {
                k.reserve(n);
                v.reserve(n);
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            LayerCache::F32 { k, v } => (k.len() + v.len()) * 4,
            LayerCache::Bf16 { k, v } => (k.len() + v.len()) * 2,
        }
    }
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
    pub(crate) fn new(spec: &ModelSpec, dtype: KvCacheDtype) -> Self {
        Sequence {
            layers: vec![LayerCache::new(dtype); spec.n_layers],
            tokens: Vec::new(),
            kv_dim: spec.attention.kv_dim(),
            scratch: Scratch::default(),
        }
    }

    /// Starts timing each phase of the forward passes this sequence leads (from zero), or
    /// stops it. A few clock reads per layer; off by default.
    pub fn profile_phases(&mut self, on: bool) {
        self.scratch.profile = on.then(PhaseTimes::default);
    }

    /// The phase times since [`Sequence::profile_phases`] turned profiling on.
    pub fn phase_times(&self) -> Option<&PhaseTimes> {
        self.scratch.profile.as_ref()
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
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Drops cached positions beyond the tokens fed (after a failed step).
    pub(crate) fn rollback(&mut self) {
        let keep = self.tokens.len() * self.kv_dim;
        for l in &mut self.layers {
            l.truncate(keep);
        }
    }

    /// Reserves room for `positions` more positions (KV cache of every layer and the token
    /// list), so that the next `positions` tokens allocate nothing: a caller that knows the
    /// length it will generate can make every decode step allocation-free (only the
    /// returned logits are allocated).
    pub fn reserve(&mut self, positions: usize) {
        self.tokens.reserve(positions);
        for l in &mut self.layers {
            l.reserve(positions * self.kv_dim);
        }
    }
}
