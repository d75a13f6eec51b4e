//! One table per architecture: which `config.json` keys mean what, and what each weight
//! is called in the checkpoint. Nothing outside this module matches on tensor names.

mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;

use crate::config::RawConfig;
use crate::error::StorageResult;
use crate::spec::{Architecture, ModelSpec};

/// Typed name of every weight the forward pass reads. Layer and expert are indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKey {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    FfnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    OBias(usize),
    QNorm(usize),
    KNorm(usize),
    Router(usize),
    ExpertGate(usize, usize),
    ExpertUp(usize, usize),
    ExpertDown(usize, usize),
    SharedGate(usize),
    SharedUp(usize),
    SharedDown(usize),
    /// Qwen2-MoE's `shared_expert_gate`: `[1, hidden]`.
    SharedExpertGate(usize),
    DenseGate(usize),
    DenseUp(usize),
    DenseDown(usize),
}

impl WeightKey {
    /// The checkpoint tensor name of this weight for `arch`.
    pub fn name(self, arch: Architecture) -> String {
        use WeightKey::*;
        let l = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
        match self {
            Embed => "model.embed_tokens.weight".into(),
            FinalNorm => "model.norm.weight".into(),
            LmHead => "lm_head.weight".into(),
            AttnNorm(i) => l(i, "input_layernorm.weight"),
            FfnNorm(i) => l(i, "post_attention_layernorm.weight"),
            Q(i) => l(i, "self_attn.q_proj.weight"),
            K(i) => l(i, "self_attn.k_proj.weight"),
            V(i) => l(i, "self_attn.v_proj.weight"),
            O(i) => l(i, "self_attn.o_proj.weight"),
            QBias(i) => l(i, "self_attn.q_proj.bias"),
            KBias(i) => l(i, "self_attn.k_proj.bias"),
            VBias(i) => l(i, "self_attn.v_proj.bias"),
            OBias(i) => l(i, "self_attn.o_proj.bias"),
            QNorm(i) => l(i, "self_attn.q_norm.weight"),
            KNorm(i) => l(i, "self_attn.k_norm.weight"),
            DenseGate(i) => l(i, "mlp.gate_proj.weight"),
            DenseUp(i) => l(i, "mlp.up_proj.weight"),
            DenseDown(i) => l(i, "mlp.down_proj.weight"),
            Router(_) | ExpertGate(..) | ExpertUp(..) | ExpertDown(..) | SharedGate(_) | SharedUp(_)
            | SharedDown(_) | SharedExpertGate(_) => match arch {
                Architecture::Mixtral => mixtral::moe_name(self),
                Architecture::Qwen2Moe | Architecture::Qwen3Moe | Architecture::Olmoe => {
                    qwen2_moe::moe_name(self)
                }
            },
        }
    }
}

pub(crate) fn build_spec(arch: Architecture, raw: &RawConfig) -> StorageResult<ModelSpec> {
    match arch {
        Architecture::Mixtral => mixtral::spec(raw),
        Architecture::Qwen2Moe => qwen2_moe::spec(raw),
        Architecture::Qwen3Moe => qwen3_moe::spec(raw),
        Architecture::Olmoe => olmoe::spec(raw),
    }
}

/// Fields read the same way by every architecture.
pub(crate) struct Common {
    pub vocab: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
    pub rms_norm_eps: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

pub(crate) fn common(raw: &RawConfig) -> StorageResult<Common> {
    use crate::config::{eos_ids, positive, required, token_id};
    use crate::error::StorageError;
    if let Some(act) = &raw.hidden_act {
        if act != "silu" {
            return Err(StorageError::InvalidConfig {
                field: "hidden_act",
                reason: format!("{act:?} is not supported (only silu)"),
            });
        }
    }
    let hidden = required("hidden_size", raw.hidden_size)?;
    let n_heads = required("num_attention_heads", raw.num_attention_heads)?;
    let n_kv_heads = match raw.num_key_value_heads {
        Some(v) => positive("num_key_value_heads", v)?,
        None => n_heads,
    };
    let head_dim = match raw.head_dim {
        Some(v) => positive("head_dim", v)?,
        None => {
            if hidden % n_heads != 0 {
                return Err(StorageError::InvalidConfig {
                    field: "num_attention_heads",
                    reason: format!("{n_heads} does not divide hidden_size {hidden}"),
                });
            }
            hidden / n_heads
        }
    };
    let eps = raw.rms_norm_eps.unwrap_or(1e-6) as f32;
    Ok(Common {
        vocab: required("vocab_size", raw.vocab_size)?,
        hidden,
        n_layers: required("num_hidden_layers", raw.num_hidden_layers)?,
        n_heads,
        n_kv_heads,
        head_dim,
        max_positions: required("max_position_embeddings", raw.max_position_embeddings)?,
        rms_norm_eps: eps,
        bos_token_id: raw.bos_token_id.map(|v| token_id("bos_token_id", v)).transpose()?,
        eos_token_ids: eos_ids(raw)?,
    })
}

/// `clip_qkv` must be a positive finite number when present.
pub(crate) fn clip_qkv(raw: &RawConfig) -> StorageResult<Option<f32>> {
    match raw.clip_qkv {
        None => Ok(None),
        Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c as f32)),
        Some(c) => Err(crate::error::StorageError::InvalidConfig {
            field: "clip_qkv",
            reason: format!("must be > 0, got {c}"),
        }),
    }
}

/// A sliding window from the config, honouring Qwen's `use_sliding_window` switch.
pub(crate) fn sliding_window(raw: &RawConfig, switch_required: bool) -> StorageResult<Option<usize>> {
    if switch_required && raw.use_sliding_window != Some(true) {
        return Ok(None);
    }
    raw.sliding_window.map(|w| crate::config::positive("sliding_window", w)).transpose()
}
