//! OLMoE (`OlmoeForCausalLM`): q/k RMSNorm over the whole projection, optional
//! `clip_qkv`, every layer sparse, no shared expert, experts of `intermediate_size`.

use super::{clip_qkv, common};
use crate::config::{required, rope_theta, RawConfig};
use crate::error::StorageResult;
use crate::spec::*;

pub(super) fn spec(raw: &RawConfig) -> StorageResult<ModelSpec> {
    let c = common(raw)?;
    let bias = raw.attention_bias.unwrap_or(false);
    Ok(ModelSpec {
        arch: Architecture::Olmoe,
        vocab: c.vocab,
        hidden: c.hidden,
        n_layers: c.n_layers,
        attention: AttentionSpec {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: QkNorm::Full,
            clip_qkv: clip_qkv(raw)?,
            sliding_window: None,
        },
        rope: RopeSpec { theta: rope_theta(raw, 10000.0)?, rotary_dim: c.head_dim },
        rms_norm_eps: c.rms_norm_eps,
        max_positions: c.max_positions,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        moe: MoeSpec {
            n_experts: required("num_experts", raw.num_experts)?,
            top_k: required("num_experts_per_tok", raw.num_experts_per_tok)?,
            expert_ffn: required("intermediate_size", raw.intermediate_size)?,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
            shared_expert: None,
        },
        layers: vec![LayerSpec { ffn: FfnKind::Moe }; c.n_layers],
        bos_token_id: c.bos_token_id,
        eos_token_ids: c.eos_token_ids,
    })
}
