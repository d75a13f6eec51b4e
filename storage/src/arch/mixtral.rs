//! Mixtral (`MixtralForCausalLM`): every layer is sparse; experts `w1` (gate), `w3` (up),
//! `w2` (down); softmax router with top-k renormalisation.

use super::{common, sliding_window, WeightKey};
use crate::config::{required, rope_theta, RawConfig};
use crate::error::StorageResult;
use crate::spec::*;

pub(super) fn moe_name(key: WeightKey) -> String {
    let p = |i: usize, rest: String| format!("model.layers.{i}.block_sparse_moe.{rest}");
    match key {
        WeightKey::Router(i) => p(i, "gate.weight".into()),
        WeightKey::ExpertGate(i, e) => p(i, format!("experts.{e}.w1.weight")),
        WeightKey::ExpertDown(i, e) => p(i, format!("experts.{e}.w2.weight")),
        WeightKey::ExpertUp(i, e) => p(i, format!("experts.{e}.w3.weight")),
        // Mixtral has no shared expert; these names never resolve.
        other => format!("<mixtral has no {other:?}>"),
    }
}

pub(super) fn spec(raw: &RawConfig) -> StorageResult<ModelSpec> {
    let c = common(raw)?;
    let n_experts = required("num_local_experts", raw.num_local_experts)?;
    Ok(ModelSpec {
        arch: Architecture::Mixtral,
        vocab: c.vocab,
        hidden: c.hidden,
        n_layers: c.n_layers,
        attention: AttentionSpec {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: sliding_window(raw, false)?,
        },
        rope: RopeSpec { theta: rope_theta(raw, 1e6)?, rotary_dim: c.head_dim },
        rms_norm_eps: c.rms_norm_eps,
        max_positions: c.max_positions,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        moe: MoeSpec {
            n_experts,
            top_k: required("num_experts_per_tok", raw.num_experts_per_tok)?,
            expert_ffn: required("intermediate_size", raw.intermediate_size)?,
            norm_topk_prob: true,
            shared_expert: None,
        },
        layers: vec![LayerSpec { ffn: FfnKind::Moe }; c.n_layers],
        bos_token_id: c.bos_token_id,
        eos_token_ids: c.eos_token_ids,
    })
}
