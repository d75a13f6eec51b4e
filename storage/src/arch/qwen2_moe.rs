//! Qwen2-MoE (`Qwen2MoeForCausalLM`): q/k/v biases, a shared expert scaled by
//! `sigmoid(shared_expert_gate(x))`, sparse layers chosen by `decoder_sparse_step` and
//! `mlp_only_layers` (the others are dense MLPs of `intermediate_size`).
//! The `mlp.*` expert names here are shared by Qwen3-MoE and OLMoE.

use super::{common, sliding_window, WeightKey};
use crate::config::{non_negative, positive, required, rope_theta, RawConfig};
use crate::error::{StorageError, StorageResult};
use crate::spec::*;

pub(super) fn moe_name(key: WeightKey) -> String {
    let p = |i: usize, rest: String| format!("model.layers.{i}.mlp.{rest}");
    match key {
        WeightKey::Router(i) => p(i, "gate.weight".into()),
        WeightKey::ExpertGate(i, e) => p(i, format!("experts.{e}.gate_proj.weight")),
        WeightKey::ExpertUp(i, e) => p(i, format!("experts.{e}.up_proj.weight")),
        WeightKey::ExpertDown(i, e) => p(i, format!("experts.{e}.down_proj.weight")),
        WeightKey::SharedGate(i) => p(i, "shared_expert.gate_proj.weight".into()),
        WeightKey::SharedUp(i) => p(i, "shared_expert.up_proj.weight".into()),
        WeightKey::SharedDown(i) => p(i, "shared_expert.down_proj.weight".into()),
        WeightKey::SharedExpertGate(i) => p(i, "shared_expert_gate.weight".into()),
        other => format!("<no moe name for {other:?}>"),
    }
}

/// Qwen's rule: layer i is sparse unless listed in `mlp_only_layers`, and only every
/// `decoder_sparse_step`-th layer (1-based) is.
pub(super) fn layer_table(raw: &RawConfig, n_layers: usize) -> StorageResult<Vec<LayerSpec>> {
    let step = positive("decoder_sparse_step", raw.decoder_sparse_step.unwrap_or(1))?;
    let mlp_only = raw.mlp_only_layers.clone().unwrap_or_default();
    for &l in &mlp_only {
        if l < 0 || l as usize >= n_layers {
            return Err(StorageError::InvalidConfig {
                field: "mlp_only_layers",
                reason: format!("layer {l} is outside 0..{n_layers}"),
            });
        }
    }
    let mut dense_ffn = None;
    (0..n_layers)
        .map(|i| {
            let sparse = !mlp_only.contains(&(i as i64)) && (i + 1) % step == 0;
            let ffn = if sparse {
                FfnKind::Moe
            } else {
                let ffn = match dense_ffn {
                    Some(f) => f,
                    None => *dense_ffn.insert(required("intermediate_size", raw.intermediate_size)?),
                };
                FfnKind::Dense { ffn }
            };
            Ok(LayerSpec { ffn })
        })
        .collect()
}

pub(super) fn spec(raw: &RawConfig) -> StorageResult<ModelSpec> {
    let c = common(raw)?;
    let shared_ffn =
        non_negative("shared_expert_intermediate_size", raw.shared_expert_intermediate_size.unwrap_or(0))?;
    Ok(ModelSpec {
        arch: Architecture::Qwen2Moe,
        vocab: c.vocab,
        hidden: c.hidden,
        n_layers: c.n_layers,
        attention: AttentionSpec {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            // Qwen2MoeAttention hard-codes bias=True on q/k/v and False on o.
            qkv_bias: raw.qkv_bias.unwrap_or(true),
            o_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: sliding_window(raw, true)?,
        },
        rope: RopeSpec { theta: rope_theta(raw, 10000.0)?, rotary_dim: c.head_dim },
        rms_norm_eps: c.rms_norm_eps,
        max_positions: c.max_positions,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        moe: MoeSpec {
            n_experts: required("num_experts", raw.num_experts)?,
            top_k: required("num_experts_per_tok", raw.num_experts_per_tok)?,
            expert_ffn: required("moe_intermediate_size", raw.moe_intermediate_size)?,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
            shared_expert: (shared_ffn > 0)
                .then_some(SharedExpertSpec { ffn: shared_ffn, sigmoid_gate: true }),
        },
        layers: layer_table(raw, c.n_layers)?,
        bos_token_id: c.bos_token_id,
        eos_token_ids: c.eos_token_ids,
    })
}
