//! The model's weights as kernel-ready views, built once at load from the checkpoint.
//!
//! Matrices are copied out of the checkpoint's memory map into anonymous buffers on
//! transparent huge pages ([`hetmoe_cpu_kernels::memory`]): decode streams them about 7%
//! faster than it streams the map (measurement in `docs/design.md`). `HETMOE_MMAP_WEIGHTS=1`
//! keeps aligned bf16/f16/f32 matrices zero-copy in the map instead (half the resident
//! memory while the file is cached, slower decode). Small vectors (norms, biases) are
//! converted to f32.

use half::{bf16, f16};
use hetmoe_cpu_kernels::matmul::AxpyRef;
use hetmoe_cpu_kernels::memory::{HugeBuf, ZeroValid};
use hetmoe_cpu_kernels::moe::ExpertRef;
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{
    group_q4_rows, group_q8_rows, pair_groups, pairing_pays_off, GroupKind, GroupedRef,
};
use hetmoe_cpu_kernels::row_tiles::{self, TileKind};
use hetmoe_cpu_kernels::{MatRef, WeightsRef};
use hetmoe_storage::{Checkpoint, DType, FfnKind, ModelSpec, Tensor, WeightKey};

use crate::error::EngineResult;

/// A matrix `[rows, cols]` in its stored dtype.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    store: Store,
    rows: usize,
    cols: usize,
}

#[derive(Debug, Clone)]
enum Store {
    /// Aligned bytes in the checkpoint's memory map.
    Mapped(Tensor),
    /// Owned copies (on huge pages when large): copied out of the map, transposed or
    /// quantized at load.
    F32(HugeBuf<f32>),
    Bf16(HugeBuf<bf16>),
    F16(HugeBuf<f16>),
    Q8(HugeBuf<BlockQ8>),
    Q4(HugeBuf<BlockQ4>),
    /// q8 / q4 in row tiles ([`row_tiles`]): the matvec layout where the CPU has a kernel
    /// for it.
    Q8Tiles(HugeBuf<u8>),
    Q4Tiles(HugeBuf<u8>),
}

/// A matrix read only as the terms of an `axpy` (an MLP's `downᵀ`): rows, or for quantized
/// weights rows in groups of four, plain or in pairs ([`hetmoe_cpu_kernels::row_groups`]).
#[derive(Debug, Clone)]
pub(crate) enum AxpyLinear {
    Rows(Linear),
    Groups { kind: GroupKind, data: HugeBuf<u8>, rows: usize, cols: usize, paired: bool },
}

impl AxpyLinear {
    /// The view the `axpy` kernels read.
    pub(crate) fn view(&self) -> AxpyRef<'_> {
        match self {
            AxpyLinear::Rows(m) => m.mat().into(),
            AxpyLinear::Groups { kind, data, rows, cols, paired } => {
                let view = if *paired { GroupedRef::paired } else { GroupedRef::new };
                view(*kind, data, *rows, *cols).expect("shape checked at load").into()
            }
        }
    }
}

/// How matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As stored in the checkpoint (bf16, f16 or f32), zero-copy where possible.
    #[default]
    AsStored,
    /// 8-bit, blocks of 32 with an f16 scale, quantized at load.
    Q8,
    /// 4-bit, blocks of 32 with an f16 scale, quantized at load.
    Q4,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::AsStored => "bf16",
            WeightFormat::Q8 => "q8",
            WeightFormat::Q4 => "q4",
        })
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" | "f16" | "f32" | "stored" => Ok(WeightFormat::AsStored),
            "q8" => Ok(WeightFormat::Q8),
            "q4" => Ok(WeightFormat::Q4),
            other => Err(format!("unknown weight format {other:?} (bf16, q8, q4)")),
        }
    }
}

impl Linear {
    /// Large matrices are copied onto huge pages when `copy` (see
    /// [`hetmoe_cpu_kernels::memory`]); misaligned ones are always copied.
    fn from_tensor(t: Tensor, rows: usize, cols: usize, copy: bool) -> Self {
        let aligned = t.bytes().as_ptr().align_offset(t.dtype.size_bytes()) == 0;
        let store = if aligned && !copy {
            Store::Mapped(t)
        } else {
            let b = t.bytes();
            match t.dtype {
                DType::F32 => Store::F32(copy_to_huge(b)),
                DType::BF16 => Store::Bf16(copy_to_huge(b)),
                DType::F16 => Store::F16(copy_to_huge(b)),
            }
        };
        Linear { store, rows, cols }
    }

    pub(crate) fn mat(&self) -> MatRef<'_> {
        let data = match &self.store {
            Store::Mapped(t) => {
                let b = t.bytes();
                // Alignment was checked in from_tensor and the length is rows * cols
                // elements (shape-checked), so these casts cannot fail.
                match t.dtype {
                    DType::F32 => WeightsRef::F32(bytemuck::cast_slice(b)),
                    DType::BF16 => WeightsRef::Bf16(bytemuck::cast_slice(b)),
                    DType::F16 => WeightsRef::F16(bytemuck::cast_slice(b)),
                }
            }
            Store::F32(v) => WeightsRef::F32(&v[..]),
            Store::Bf16(v) => WeightsRef::Bf16(&v[..]),
            Store::F16(v) => WeightsRef::F16(&v[..]),
            Store::Q8(v) => WeightsRef::Q8(&v[..]),
            Store::Q4(v) => WeightsRef::Q4(&v[..]),
            Store::Q8Tiles(v) => WeightsRef::Q8Tiles(&v[..]),
            Store::Q4Tiles(v) => WeightsRef::Q4Tiles(&v[..]),
        };
        MatRef::new(data, self.rows, self.cols).expect("shape checked at load")
    }

    /// [`Linear::quantized`], then (q8, q4) in groups of four rows for the `axpy`, the groups
    /// in pairs where that pays off ([`pairing_pays_off`]; the same bits as the store's plain
    /// groups either way).
    fn quantized_for_axpy(self, format: WeightFormat) -> AxpyLinear {
        let q = self.quantized(format);
        let (rows, cols) = (q.rows, q.cols);
        let zeroed = |kind: GroupKind| HugeBuf::<u8>::zeroed(kind.matrix_bytes(rows, cols));
        let (kind, data) = match &q.store {
            Store::Q8(b) => {
                let mut data = zeroed(GroupKind::Q8);
                group_q8_rows(b, rows, cols, &mut data);
                (GroupKind::Q8, data)
            }
            Store::Q4(b) => {
                let mut data = zeroed(GroupKind::Q4);
                group_q4_rows(b, rows, cols, &mut data);
                (GroupKind::Q4, data)
            }
            _ => return AxpyLinear::Rows(q),
        };
        if !pairing_pays_off() {
            return AxpyLinear::Groups { kind, data, rows, cols, paired: false };
        }
        let mut paired = zeroed(kind);
        pair_groups(kind, rows, cols, &data, &mut paired);
        AxpyLinear::Groups { kind, data: paired, rows, cols, paired: true }
    }

    /// `a`'s and `b`'s rows alternated, `[2 · rows, cols]` (row `2r`: `a`'s row `r`, `2r + 1`:
    /// `b`'s), same dtype, owned; `None` unless both are dense of one dtype and shape.
    fn interleaved(a: &Linear, b: &Linear) -> Option<Linear> {
        if (a.rows, a.cols) != (b.rows, b.cols) || a.cols == 0 {
            return None;
        }
        let cols = a.cols;
        let store = match (a.mat().data(), b.mat().data()) {
            (WeightsRef::Bf16(x), WeightsRef::Bf16(y)) => Store::Bf16(interleave_rows(x, y, cols)),
            (WeightsRef::F16(x), WeightsRef::F16(y)) => Store::F16(interleave_rows(x, y, cols)),
            (WeightsRef::F32(x), WeightsRef::F32(y)) => Store::F32(interleave_rows(x, y, cols)),
            _ => return None,
        };
        Some(Linear { store, rows: 2 * a.rows, cols })
    }

    /// `[cols, rows]`, same dtype, owned (down projections are kept transposed so that
    /// row j holds what intermediate neuron j contributes).
    fn transposed(&self) -> Linear {
        let (r, c) = (self.rows, self.cols);
        let store = match self.mat().data() {
            WeightsRef::Bf16(w) => Store::Bf16(transpose(w, r, c)),
            WeightsRef::F16(w) => Store::F16(transpose(w, r, c)),
            WeightsRef::F32(w) => Store::F32(transpose(w, r, c)),
            // Quantization happens after transposition, never before.
            WeightsRef::Q8(_) | WeightsRef::Q4(_) | WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_) => {
                unreachable!("transposing quantized weights")
            }
        };
        Linear { store, rows: c, cols: r }
    }

    /// For matvecs: quantized rows put in row tiles where the active ISA has a kernel for
    /// them ([`row_tiles::pays_off`]); the same products, so the same logits either way.
    fn for_matvec(self) -> Linear {
        if !row_tiles::pays_off() {
            return self;
        }
        let (rows, cols) = (self.rows, self.cols);
        let tiles = |kind: TileKind| HugeBuf::<u8>::zeroed(kind.matrix_bytes(rows, cols));
        let store = match &self.store {
            Store::Q8(b) => {
                let mut t = tiles(TileKind::Q8);
                row_tiles::tile_q8_rows(b, rows, cols, &mut t);
                Store::Q8Tiles(t)
            }
            Store::Q4(b) => {
                let mut t = tiles(TileKind::Q4);
                row_tiles::tile_q4_rows(b, rows, cols, &mut t);
                Store::Q4Tiles(t)
            }
            _ => return self,
        };
        Linear { store, rows, cols }
    }

    /// The matrix quantized row by row into `format` (rows whose length is not a multiple
    /// of 32 stay as they are).
    fn quantized(self, format: WeightFormat) -> Linear {
        if format == WeightFormat::AsStored || self.cols % QK != 0 {
            return self;
        }
        let m = self.mat();
        let nb = self.cols / QK;
        let mut row = vec![0f32; self.cols];
        let store = match format {
            WeightFormat::Q8 => {
                let mut blocks = HugeBuf::<BlockQ8>::zeroed(self.rows * nb);
                for (r, b) in blocks.chunks_exact_mut(nb).enumerate() {
                    m.row_to_f32(r, &mut row);
                    quantize_q8(&row, b);
                }
                Store::Q8(blocks)
            }
            _ => {
                let mut blocks = HugeBuf::<BlockQ4>::zeroed(self.rows * nb);
                for (r, b) in blocks.chunks_exact_mut(nb).enumerate() {
                    m.row_to_f32(r, &mut row);
                    quantize_q4(&row, b);
                }
                Store::Q4(blocks)
            }
        };
        Linear { store, rows: self.rows, cols: self.cols }
    }
}

/// The little-endian elements in `b` (any alignment) in a fresh buffer.
fn copy_to_huge<T: ZeroValid + bytemuck::Pod>(b: &[u8]) -> HugeBuf<T> {
    let mut out = HugeBuf::<T>::zeroed(b.len() / std::mem::size_of::<T>());
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(b);
    out
}

/// Rows of `a` and `b` (`cols > 0` each) alternated in a fresh buffer.
fn interleave_rows<T: ZeroValid + Copy>(a: &[T], b: &[T], cols: usize) -> HugeBuf<T> {
    let mut out = HugeBuf::zeroed(a.len() + b.len());
    for ((o, ra), rb) in out.chunks_exact_mut(2 * cols).zip(a.chunks_exact(cols)).zip(b.chunks_exact(cols)) {
        o[..cols].copy_from_slice(ra);
        o[cols..].copy_from_slice(rb);
    }
    out
}

/// `[rows, cols]` → `[cols, rows]`, in tiles that stay in L1.
fn transpose<T: ZeroValid>(src: &[T], rows: usize, cols: usize) -> HugeBuf<T> {
    const TILE: usize = 32;
    let mut dst = HugeBuf::zeroed(rows * cols);
    for i0 in (0..rows).step_by(TILE) {
        for j0 in (0..cols).step_by(TILE) {
            for i in i0..(i0 + TILE).min(rows) {
                for j in j0..(j0 + TILE).min(cols) {
                    dst[j * rows + i] = src[i * cols + j];
                }
            }
        }
    }
    dst
}

/// One SwiGLU MLP as the expert kernel reads it: gate and up `[ffn, hidden]` (interleaved
/// row by row when the weights are copied at load), and down transposed, `[ffn, hidden]`.
/// The unit in which an expert is computed.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    gate_up: GateUp,
    pub down_t: AxpyLinear,
}

#[derive(Debug, Clone)]
enum GateUp {
    /// `[2 · ffn, hidden]`: row `2j` gate row `j`, row `2j + 1` up row `j`. The fused expert
    /// kernel reads it as one stream (one-token expert +4–11 % in `kbench`, `ei` vs `es`/`eg`);
    /// the dot products are the same as over separate matrices.
    Interleaved(Linear),
    /// Zero-copy from the memory map (`HETMOE_MMAP_WEIGHTS=1`).
    Separate { gate: Linear, up: Linear },
}

impl Mlp {
    pub(crate) fn expert(&self) -> ExpertRef<'_> {
        let down_t = self.down_t.view();
        match &self.gate_up {
            GateUp::Interleaved(gu) => ExpertRef::interleaved(gu.mat(), down_t),
            GateUp::Separate { gate, up } => ExpertRef::new(gate.mat(), up.mat(), down_t),
        }
        .expect("shapes checked at load")
    }
}

#[derive(Debug)]
pub(crate) struct MoeWeights {
    pub router: Linear,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
    /// Qwen2-MoE's `[1, hidden]` gate of the shared expert.
    pub shared_gate: Option<Linear>,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer; size is irrelevant
pub(crate) enum FfnWeights {
    Dense(Mlp),
    Moe(Box<MoeWeights>),
}

#[derive(Debug)]
pub(crate) struct AttentionWeights {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub o_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

#[derive(Debug)]
pub(crate) struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub attn: AttentionWeights,
    pub ffn: FfnWeights,
}

#[derive(Debug)]
pub(crate) struct ModelWeights {
    pub embed: Linear,
    pub final_norm: Vec<f32>,
    /// `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    pub layers: Vec<LayerWeights>,
}

impl Mlp {
    fn size_bytes(&self) -> usize {
        self.expert().size_bytes()
    }
}

impl ModelWeights {
    /// See [`crate::Engine::decode_bytes_per_token`].
    /// `expert_bytes` is used for experts that are not in memory.
    pub(crate) fn decode_bytes(
        &self,
        spec: &ModelSpec,
        context: usize,
        expert_bytes: usize,
        kv_elem_bytes: usize,
    ) -> u64 {
        let vec_bytes = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| v.len() * 4);
        let mut total = self.final_norm.len() * 4 + self.lm_head().mat().size_bytes();
        total += self.embed.mat().size_bytes() / spec.vocab;
        for l in &self.layers {
            let a = &l.attn;
            total += (l.attn_norm.len() + l.ffn_norm.len()) * 4;
            total += [&a.q, &a.k, &a.v, &a.o].iter().map(|m| m.mat().size_bytes()).sum::<usize>();
            total += [&a.q_bias, &a.k_bias, &a.v_bias, &a.o_bias, &a.q_norm, &a.k_norm]
                .iter()
                .map(|v| vec_bytes(v))
                .sum::<usize>();
            // K and V of every cached position.
            total += 2 * spec.attention.kv_dim() * kv_elem_bytes * (context + 1);
            total += match &l.ffn {
                FfnWeights::Dense(m) => m.size_bytes(),
                FfnWeights::Moe(m) => {
                    let expert = m.experts.first().map_or(expert_bytes, Mlp::size_bytes);
                    m.router.mat().size_bytes()
                        + spec.moe.top_k * expert
                        + m.shared.as_ref().map_or(0, Mlp::size_bytes)
                        + m.shared_gate.as_ref().map_or(0, |g| g.mat().size_bytes())
                }
            };
        }
        total as u64
    }

    pub(crate) fn lm_head(&self) -> &Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

struct Loader<'a> {
    spec: &'a ModelSpec,
    ckpt: &'a Checkpoint,
    format: WeightFormat,
    /// Copy matrices out of the memory map onto huge pages.
    copy: bool,
}

impl Loader<'_> {
    fn tensor(&self, key: WeightKey, shape: &[usize]) -> EngineResult<Tensor> {
        Ok(self.ckpt.tensor_with_shape(&key.name(self.spec.arch), shape)?)
    }
    /// A projection, in the requested weight format.
    fn proj(&self, key: WeightKey, rows: usize, cols: usize) -> EngineResult<Linear> {
        Ok(self.linear(key, rows, cols)?.quantized(self.format).for_matvec())
    }
    /// A matrix kept exactly as stored (embeddings, routers, gates).
    fn linear(&self, key: WeightKey, rows: usize, cols: usize) -> EngineResult<Linear> {
        Ok(Linear::from_tensor(self.tensor(key, &[rows, cols])?, rows, cols, self.copy))
    }
    fn vector(&self, key: WeightKey, len: usize) -> EngineResult<Vec<f32>> {
        Ok(self.tensor(key, &[len])?.to_f32_vec())
    }
    fn mlp(&self, keys: [WeightKey; 3], ffn: usize) -> EngineResult<Mlp> {
        let h = self.spec.hidden;
        let (gate, up) = (self.linear(keys[0], ffn, h)?, self.linear(keys[1], ffn, h)?);
        let zero_copy = !self.copy && self.format == WeightFormat::AsStored;
        let gate_up = match (!zero_copy).then(|| Linear::interleaved(&gate, &up)).flatten() {
            Some(gu) => GateUp::Interleaved(gu.quantized(self.format).for_matvec()),
            None => GateUp::Separate {
                gate: gate.quantized(self.format).for_matvec(),
                up: up.quantized(self.format).for_matvec(),
            },
        };
        let down_t = self.linear(keys[2], h, ffn)?.transposed().quantized_for_axpy(self.format);
        Ok(Mlp { gate_up, down_t })
    }
}

/// Reads and shape-checks every weight; routed experts only when `with_experts` (offloaded
/// experts live in the expert store instead).
pub(crate) fn load(
    spec: &ModelSpec,
    ckpt: &Checkpoint,
    format: WeightFormat,
    with_experts: bool,
) -> EngineResult<ModelWeights> {
    use WeightKey::*;
    let copy = std::env::var_os("HETMOE_MMAP_WEIGHTS").is_none_or(|v| v == "0");
    let ld = Loader { spec, ckpt, format, copy };
    let (h, v) = (spec.hidden, spec.vocab);
    let a = &spec.attention;
    let (qd, kvd) = (a.q_dim(), a.kv_dim());
    let mut layers = Vec::with_capacity(spec.n_layers);
    for l in 0..spec.n_layers {
        let opt = |cond: bool, key: WeightKey, len: usize| -> EngineResult<Option<Vec<f32>>> {
            if cond {
                ld.vector(key, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let attn = AttentionWeights {
            q: ld.proj(Q(l), qd, h)?,
            k: ld.proj(K(l), kvd, h)?,
            v: ld.proj(V(l), kvd, h)?,
            o: ld.proj(O(l), h, qd)?,
            q_bias: opt(a.qkv_bias, QBias(l), qd)?,
            k_bias: opt(a.qkv_bias, KBias(l), kvd)?,
            v_bias: opt(a.qkv_bias, VBias(l), kvd)?,
            o_bias: opt(a.o_bias, OBias(l), h)?,
            q_norm: match a.qk_norm {
                hetmoe_storage::QkNorm::None => None,
                hetmoe_storage::QkNorm::PerHead => Some(ld.vector(QNorm(l), a.head_dim)?),
                hetmoe_storage::QkNorm::Full => Some(ld.vector(QNorm(l), qd)?),
            },
            k_norm: match a.qk_norm {
                hetmoe_storage::QkNorm::None => None,
                hetmoe_storage::QkNorm::PerHead => Some(ld.vector(KNorm(l), a.head_dim)?),
                hetmoe_storage::QkNorm::Full => Some(ld.vector(KNorm(l), kvd)?),
            },
        };
        let ffn = match &spec.layers[l].ffn {
            FfnKind::Dense { ffn } => {
                FfnWeights::Dense(ld.mlp([DenseGate(l), DenseUp(l), DenseDown(l)], *ffn)?)
            }
            FfnKind::Moe => {
                let m = &spec.moe;
                let experts = (0..if with_experts { m.n_experts } else { 0 })
                    .map(|e| ld.mlp([ExpertGate(l, e), ExpertUp(l, e), ExpertDown(l, e)], m.expert_ffn))
                    .collect::<EngineResult<Vec<_>>>()?;
                let shared = m
                    .shared_expert
                    .as_ref()
                    .map(|s| ld.mlp([SharedGate(l), SharedUp(l), SharedDown(l)], s.ffn))
                    .transpose()?;
                let shared_gate = match &m.shared_expert {
                    Some(s) if s.sigmoid_gate => Some(ld.linear(SharedExpertGate(l), 1, h)?),
                    _ => None,
                };
                FfnWeights::Moe(Box::new(MoeWeights {
                    router: ld.linear(Router(l), m.n_experts, h)?,
                    experts,
                    shared,
                    shared_gate,
                }))
            }
        };
        layers.push(LayerWeights {
            attn_norm: ld.vector(AttnNorm(l), h)?,
            ffn_norm: ld.vector(FfnNorm(l), h)?,
            attn,
            ffn,
        });
    }
    let lm_head = if spec.tie_word_embeddings { None } else { Some(ld.proj(LmHead, v, h)?) };
    Ok(ModelWeights { embed: ld.linear(Embed, v, h)?, final_norm: ld.vector(FinalNorm, h)?, lm_head, layers })
}
