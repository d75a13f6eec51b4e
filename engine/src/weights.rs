//! The model's weights as kernel-ready views, built once at load from the checkpoint.
//!
//! Matrices stay zero-copy in the memory map when their bytes are aligned for their dtype
//! (the usual case); small vectors (norms, biases) are converted to f32.

use half::{bf16, f16};
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
    /// A copy made because the mapped bytes were not aligned for the dtype.
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Linear {
    fn from_tensor(t: Tensor, rows: usize, cols: usize) -> Self {
        let aligned = t.bytes().as_ptr().align_offset(t.dtype.size_bytes()) == 0;
        let store = if aligned {
            Store::Mapped(t)
        } else {
            let b = t.bytes();
            match t.dtype {
                DType::F32 => Store::F32(bytemuck::pod_collect_to_vec(b)),
                DType::BF16 => Store::Bf16(bytemuck::pod_collect_to_vec(b)),
                DType::F16 => Store::F16(bytemuck::pod_collect_to_vec(b)),
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
            Store::F32(v) => WeightsRef::F32(v),
            Store::Bf16(v) => WeightsRef::Bf16(v),
            Store::F16(v) => WeightsRef::F16(v),
        };
        MatRef::new(data, self.rows, self.cols).expect("shape checked at load")
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }
}

/// gate `[ffn, hidden]`, up `[ffn, hidden]`, down `[hidden, ffn]`: one SwiGLU MLP, the unit
/// in which an expert is computed.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
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
pub(crate) enum FfnWeights {
    Dense(Mlp),
    Moe(MoeWeights),
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

impl ModelWeights {
    pub(crate) fn lm_head(&self) -> &Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

struct Loader<'a> {
    spec: &'a ModelSpec,
    ckpt: &'a Checkpoint,
}

impl Loader<'_> {
    fn tensor(&self, key: WeightKey, shape: &[usize]) -> EngineResult<Tensor> {
        Ok(self
            .ckpt
            .tensor_with_shape(&key.name(self.spec.arch), shape)?)
    }
    fn linear(&self, key: WeightKey, rows: usize, cols: usize) -> EngineResult<Linear> {
        Ok(Linear::from_tensor(
            self.tensor(key, &[rows, cols])?,
            rows,
            cols,
        ))
    }
    fn vector(&self, key: WeightKey, len: usize) -> EngineResult<Vec<f32>> {
        Ok(self.tensor(key, &[len])?.to_f32_vec())
    }
    fn mlp(&self, keys: [WeightKey; 3], ffn: usize) -> EngineResult<Mlp> {
        let h = self.spec.hidden;
        Ok(Mlp {
            gate: self.linear(keys[0], ffn, h)?,
            up: self.linear(keys[1], ffn, h)?,
            down: self.linear(keys[2], h, ffn)?,
        })
    }
}

/// Reads and shape-checks every weight the forward pass of `spec` uses.
pub(crate) fn load(spec: &ModelSpec, ckpt: &Checkpoint) -> EngineResult<ModelWeights> {
    use WeightKey::*;
    let ld = Loader { spec, ckpt };
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
            q: ld.linear(Q(l), qd, h)?,
            k: ld.linear(K(l), kvd, h)?,
            v: ld.linear(V(l), kvd, h)?,
            o: ld.linear(O(l), h, qd)?,
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
                let experts = (0..m.n_experts)
                    .map(|e| {
                        ld.mlp(
                            [ExpertGate(l, e), ExpertUp(l, e), ExpertDown(l, e)],
                            m.expert_ffn,
                        )
                    })
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
                FfnWeights::Moe(MoeWeights {
                    router: ld.linear(Router(l), m.n_experts, h)?,
                    experts,
                    shared,
                    shared_gate,
                })
            }
        };
        layers.push(LayerWeights {
            attn_norm: ld.vector(AttnNorm(l), h)?,
            ffn_norm: ld.vector(FfnNorm(l), h)?,
            attn,
            ffn,
        });
    }
    let lm_head = if spec.tie_word_embeddings {
        None
    } else {
        Some(ld.linear(LmHead, v, h)?)
    };
    Ok(ModelWeights {
        embed: ld.linear(Embed, v, h)?,
        final_norm: ld.vector(FinalNorm, h)?,
        lm_head,
        layers,
    })
}
