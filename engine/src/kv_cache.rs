//! Per-sequence state: the KV cache in host memory and the tokens fed so far.

use half::bf16;
use hetmoe_cpu_kernels::attention::{KvLayout, KvRef};
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

/// Keys and values of one layer, head-major: `[n_kv_heads, capacity, head_dim]` each,
/// positions `0 .. len` filled. A decode step then reads each KV head's rows as one
/// sequential stream (token-major rows stride by all heads' width, which the hardware
/// prefetchers follow poorly: decode attention from DRAM took about twice as long). The
/// attention computes the same bits in either layout.
#[derive(Debug, Clone)]
pub(crate) struct LayerCache {
    data: KvData,
    /// Positions held.
    len: usize,
    /// Positions each head has room for.
    capacity: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
enum KvData {
    F32 { k: Vec<f32>, v: Vec<f32> },
    Bf16 { k: Vec<bf16>, v: Vec<bf16> },
}

/// An element type of the cache.
trait KvElem: Copy + Default {
    fn from_f32(x: f32) -> Self;
}
impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl KvElem for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Positions a cache grows to at least when it first needs room.
const MIN_CAPACITY: usize = 16;

impl LayerCache {
    fn new(dtype: KvCacheDtype, n_kv_heads: usize, head_dim: usize) -> Self {
        let data = match dtype {
            KvCacheDtype::F32 => KvData::F32 { k: Vec::new(), v: Vec::new() },
            KvCacheDtype::Bf16 => KvData::Bf16 { k: Vec::new(), v: Vec::new() },
        };
        LayerCache { data, len: 0, capacity: 0, n_kv_heads, head_dim }
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Appends `[m, n_kv_heads · head_dim]` keys and values (a projection's output layout).
    pub(crate) fn append(&mut self, k_new: &[f32], v_new: &[f32]) {
        let kvd = self.kv_dim();
        debug_assert_eq!(k_new.len(), v_new.len());
        let m = k_new.len().checked_div(kvd).unwrap_or(0);
        self.reserve(m);
        let (heads, hd, cap, at) = (self.n_kv_heads, self.head_dim, self.capacity, self.len);
        match &mut self.data {
            KvData::F32 { k, v } => {
                scatter(k, heads, hd, cap, at, k_new);
                scatter(v, heads, hd, cap, at, v_new);
            }
            KvData::Bf16 { k, v } => {
                scatter(k, heads, hd, cap, at, k_new);
                scatter(v, heads, hd, cap, at, v_new);
            }
        }
        self.len += m;
    }

    /// Keys, values and where their rows lie.
    pub(crate) fn views(&self) -> (KvRef<'_>, KvRef<'_>, KvLayout) {
        let layout = KvLayout::head_major(self.len, self.capacity, self.head_dim);
        match &self.data {
            KvData::F32 { k, v } => (KvRef::F32(k), KvRef::F32(v), layout),
            KvData::Bf16 { k, v } => (KvRef::Bf16(k), KvRef::Bf16(v), layout),
        }
    }

    /// Keeps the first `positions` positions.
    fn truncate(&mut self, positions: usize) {
        self.len = self.len.min(positions);
    }

    /// Room for `positions` more positions without reallocating; grows at least twofold
    /// (as `Vec::reserve`), so a step-by-step caller moves the cache O(log n) times.
    fn reserve(&mut self, positions: usize) {
        let need = self.len + positions;
        if need > self.capacity {
            self.grow(need.max(2 * self.capacity).max(MIN_CAPACITY));
        }
    }

    /// Moves the held positions into buffers with room for `capacity` per head.
    fn grow(&mut self, capacity: usize) {
        let (heads, hd, len, old) = (self.n_kv_heads, self.head_dim, self.len, self.capacity);
        match &mut self.data {
            KvData::F32 { k, v } => {
                regrow(k, heads, hd, len, old, capacity);
                regrow(v, heads, hd, len, old, capacity);
            }
            KvData::Bf16 { k, v } => {
                regrow(k, heads, hd, len, old, capacity);
                regrow(v, heads, hd, len, old, capacity);
            }
        }
        self.capacity = capacity;
    }

    /// Bytes of the cached positions' keys and values.
    fn bytes(&self) -> usize {
        let elem = match self.data {
            KvData::F32 { .. } => 4,
            KvData::Bf16 { .. } => 2,
        };
        2 * self.len * self.kv_dim() * elem
    }
}

/// Writes `src` (`[m, heads · hd]`) to positions `at .. at + m` of the head-major `buf`.
fn scatter<T: KvElem>(buf: &mut [T], heads: usize, hd: usize, capacity: usize, at: usize, src: &[f32]) {
    for (t, row) in src.chunks_exact(heads * hd).enumerate() {
        for (g, head) in row.chunks_exact(hd).enumerate() {
            let dst = &mut buf[(g * capacity + at + t) * hd..][..hd];
            dst.iter_mut().zip(head).for_each(|(d, &x)| *d = T::from_f32(x));
        }
    }
}

/// Turns `buf` (`[heads, old, hd]`, `len` positions held) into `[heads, capacity, hd]` with
/// the same positions, in place: the buffer grows (a `realloc`, which can extend the mapping
/// without copying), then each head's rows move up to their new start, last head first (a
/// head's new start is past every earlier head's old rows). Peak memory is the new size,
/// not old plus new.
fn regrow<T: KvElem>(buf: &mut Vec<T>, heads: usize, hd: usize, len: usize, old: usize, capacity: usize) {
    debug_assert!(capacity >= old && len <= old);
    buf.resize(heads * capacity * hd, T::default());
    for g in (1..heads).rev() {
        buf.copy_within(g * old * hd..(g * old + len) * hd, g * capacity * hd);
    }
}

/// One sequence being generated: its KV cache and the tokens it holds. Created by
/// [`crate::Engine::new_sequence`]; independent of every other sequence.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) tokens: Vec<u32>,
    /// Buffers reused by every step of this sequence (and of batches it leads).
    pub(crate) scratch: Scratch,
}

impl Sequence {
    pub(crate) fn new(spec: &ModelSpec, dtype: KvCacheDtype) -> Self {
        Sequence {
            layers: vec![
                LayerCache::new(dtype, spec.attention.n_kv_heads, spec.attention.head_dim);
                spec.n_layers
            ],
            tokens: Vec::new(),
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
        for l in &mut self.layers {
            l.truncate(self.tokens.len());
        }
    }

    /// Reserves room for `positions` more positions (KV cache of every layer and the token
    /// list), so that the next `positions` tokens allocate nothing: a caller that knows the
    /// length it will generate can make every decode step allocation-free (only the
    /// returned logits are allocated).
    pub fn reserve(&mut self, positions: usize) {
        self.tokens.reserve(positions);
        for l in &mut self.layers {
            l.reserve(positions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row of position `p`, head `g` in a head-major view.
    fn row(data: KvRef<'_>, layout: KvLayout, g: usize, p: usize, hd: usize) -> Vec<f32> {
        let at = g * layout.head_stride + p * layout.pos_stride;
        match data {
            KvRef::F32(v) => v[at..at + hd].to_vec(),
            KvRef::Bf16(v) => v[at..at + hd].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// `[m, heads · hd]` rows whose values name their position, head and element.
    fn tokens(p0: usize, m: usize, heads: usize, hd: usize, sign: f32) -> Vec<f32> {
        (0..m * heads * hd)
            .map(|i| sign * (((p0 + i / (heads * hd)) * 100 + i % (heads * hd)) as f32))
            .collect()
    }

    #[test]
    fn appends_land_head_major_and_survive_growth_and_rollback() {
        let (heads, hd) = (3, 4);
        for dtype in [KvCacheDtype::F32, KvCacheDtype::Bf16] {
            let mut c = LayerCache::new(dtype, heads, hd);
            // A prompt, then one position at a time past several growths.
            c.append(&tokens(0, 5, heads, hd, 1.0), &tokens(0, 5, heads, hd, -1.0));
            for p in 5..40 {
                c.reserve(1);
                c.append(&tokens(p, 1, heads, hd, 1.0), &tokens(p, 1, heads, hd, -1.0));
            }
            let check = |c: &LayerCache, n: usize| {
                let (k, v, layout) = c.views();
                assert_eq!(layout.positions, n);
                assert!(c.capacity >= n && layout.head_stride == c.capacity * hd);
                for p in 0..n {
                    for g in 0..heads {
                        let want: Vec<f32> = (0..hd).map(|e| (p * 100 + g * hd + e) as f32).collect();
                        let want = match dtype {
                            KvCacheDtype::F32 => want,
                            KvCacheDtype::Bf16 => want.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
                        };
                        assert_eq!(row(k, layout, g, p, hd), want, "{dtype:?} k position {p} head {g}");
                        let neg: Vec<f32> = want.iter().map(|x| -x).collect();
                        assert_eq!(row(v, layout, g, p, hd), neg, "{dtype:?} v position {p} head {g}");
                    }
                }
            };
            check(&c, 40);
            assert_eq!(c.bytes(), 2 * 40 * heads * hd * dtype.size_bytes());
            // A failed step's positions are dropped; the next append takes their place.
            c.truncate(30);
            check(&c, 30);
            c.append(&tokens(30, 2, heads, hd, 1.0), &tokens(30, 2, heads, hd, -1.0));
            check(&c, 32);
        }
    }
}
