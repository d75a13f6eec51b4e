//! `config.json` → validated [`ModelSpec`].
//!
//! The raw file is deserialized once into [`RawConfig`] (every key any supported
//! architecture reads), then the architecture's table in [`crate::arch`] turns it into
//! the normalized spec and [`validate`] checks every size.

use std::path::Path;

use serde::Deserialize;

use crate::arch;
use crate::error::{StorageError, StorageResult};
use crate::spec::{Architecture, ModelSpec};

/// `eos_token_id` is an int or a list of ints in hub configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

/// Transformers 5 writes rope settings as `rope_parameters`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RawRopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// Every `config.json` key read by a supported architecture, all optional here;
/// [`crate::arch`] decides which are required.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RawConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<i64>,
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub moe_intermediate_size: Option<i64>,
    pub shared_expert_intermediate_size: Option<i64>,
    pub num_hidden_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub num_local_experts: Option<i64>,
    pub num_experts: Option<i64>,
    pub num_experts_per_tok: Option<i64>,
    pub norm_topk_prob: Option<bool>,
    pub decoder_sparse_step: Option<i64>,
    pub mlp_only_layers: Option<Vec<i64>>,
    pub max_position_embeddings: Option<i64>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RawRopeParameters>,
    pub rope_parameters: Option<RawRopeParameters>,
    pub sliding_window: Option<i64>,
    pub use_sliding_window: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub qkv_bias: Option<bool>,
    pub clip_qkv: Option<f64>,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<OneOrMany>,
}

/// Reads and validates `dir/config.json`.
pub(crate) fn read_config(dir: &Path) -> StorageResult<ModelSpec> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| StorageError::io(&path, e))?;
    parse_config(&text).map_err(|e| match e {
        StorageError::Json { source, .. } => StorageError::Json { path, source },
        other => other,
    })
}

/// Parses the text of a `config.json` into a validated [`ModelSpec`].
pub fn parse_config(text: &str) -> StorageResult<ModelSpec> {
    let raw: RawConfig = serde_json::from_str(text)
        .map_err(|source| StorageError::Json { path: "config.json".into(), source })?;
    let model_type = raw
        .model_type
        .clone()
        .ok_or(StorageError::InvalidConfig { field: "model_type", reason: "missing".into() })?;
    let arch = Architecture::from_model_type(&model_type)
        .ok_or(StorageError::UnsupportedArchitecture { model_type, supported: Architecture::SUPPORTED })?;
    let spec = arch::build_spec(arch, &raw)?;
    validate(&spec)?;
    Ok(spec)
}

fn invalid(field: &'static str, reason: impl Into<String>) -> StorageError {
    StorageError::InvalidConfig { field, reason: reason.into() }
}

/// A required positive size.
pub(crate) fn required(field: &'static str, v: Option<i64>) -> StorageResult<usize> {
    let v = v.ok_or_else(|| invalid(field, "missing"))?;
    positive(field, v)
}

pub(crate) fn positive(field: &'static str, v: i64) -> StorageResult<usize> {
    if v <= 0 {
        return Err(invalid(field, format!("must be > 0, got {v}")));
    }
    usize::try_from(v).map_err(|_| invalid(field, format!("{v} does not fit in usize")))
}

pub(crate) fn non_negative(field: &'static str, v: i64) -> StorageResult<usize> {
    usize::try_from(v).map_err(|_| invalid(field, format!("must be >= 0, got {v}")))
}

pub(crate) fn token_id(field: &'static str, v: i64) -> StorageResult<u32> {
    u32::try_from(v).map_err(|_| invalid(field, format!("{v} is not a valid token id")))
}

/// The rope base from either config form; errors on scaling types hetmoe does not implement.
pub(crate) fn rope_theta(raw: &RawConfig, default: f64) -> StorageResult<f32> {
    for params in [raw.rope_scaling.as_ref(), raw.rope_parameters.as_ref()].into_iter().flatten() {
        let kind = params.rope_type.as_deref().or(params.kind.as_deref()).unwrap_or("default");
        if kind != "default" {
            return Err(invalid("rope_scaling", format!("rope type {kind:?} is not supported yet")));
        }
    }
    let theta =
        raw.rope_theta.or_else(|| raw.rope_parameters.as_ref().and_then(|p| p.rope_theta)).unwrap_or(default);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(invalid("rope_theta", format!("must be a positive number, got {theta}")));
    }
    Ok(theta as f32)
}

pub(crate) fn eos_ids(raw: &RawConfig) -> StorageResult<Vec<u32>> {
    match &raw.eos_token_id {
        None => Ok(Vec::new()),
        Some(OneOrMany::One(v)) => Ok(vec![token_id("eos_token_id", *v)?]),
        Some(OneOrMany::Many(vs)) => vs.iter().map(|&v| token_id("eos_token_id", v)).collect(),
    }
}

/// Cross-field checks on the normalized spec. Sizes are already positive.
fn validate(spec: &ModelSpec) -> StorageResult<()> {
    let a = &spec.attention;
    if a.n_heads % a.n_kv_heads != 0 {
        return Err(invalid(
            "num_key_value_heads",
            format!("{} does not divide num_attention_heads {}", a.n_kv_heads, a.n_heads),
        ));
    }
    if spec.rope.rotary_dim % 2 != 0 || spec.rope.rotary_dim > a.head_dim {
        return Err(invalid("head_dim", format!("rotary dim {} must be even", a.head_dim)));
    }
    let m = &spec.moe;
    if m.top_k > m.n_experts {
        return Err(invalid(
            "num_experts_per_tok",
            format!("top-k {} exceeds the number of experts {}", m.top_k, m.n_experts),
        ));
    }
    if spec.n_layers > u16::MAX as usize || m.n_experts > u16::MAX as usize {
        return Err(invalid("num_hidden_layers", "layer or expert count above 65535"));
    }
    if spec.layers.len() != spec.n_layers {
        return Err(invalid("num_hidden_layers", "layer table size mismatch"));
    }
    if !(spec.rms_norm_eps.is_finite() && spec.rms_norm_eps > 0.0) {
        return Err(invalid("rms_norm_eps", format!("must be > 0, got {}", spec.rms_norm_eps)));
    }
    for (field, id) in spec
        .bos_token_id
        .iter()
        .map(|&b| ("bos_token_id", b))
        .chain(spec.eos_token_ids.iter().map(|&e| ("eos_token_id", e)))
    {
        if id as usize >= spec.vocab {
            return Err(invalid(field, format!("{id} is outside the vocabulary {}", spec.vocab)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FfnKind, QkNorm};

    const QWEN2: &str = r#"{"model_type":"qwen2_moe","vocab_size":100,"hidden_size":64,"intermediate_size":96,
        "moe_intermediate_size":32,"shared_expert_intermediate_size":48,"num_hidden_layers":4,
        "num_attention_heads":4,"num_key_value_heads":2,"num_experts":8,"num_experts_per_tok":2,
        "decoder_sparse_step":2,"mlp_only_layers":[3],"max_position_embeddings":128,
        "rope_parameters":{"rope_theta":5e5,"rope_type":"default"},"eos_token_id":[1,2]}"#;

    #[test]
    fn qwen_sparse_layer_rule_and_rope_parameters() {
        let s = parse_config(QWEN2).unwrap();
        let kinds: Vec<bool> = s.layers.iter().map(|l| matches!(l.ffn, FfnKind::Moe)).collect();
        // (i + 1) % 2 == 0 → layers 1 and 3 sparse, but 3 is in mlp_only_layers.
        assert_eq!(kinds, [false, true, false, false]);
        assert_eq!(s.layers[0].ffn, FfnKind::Dense { ffn: 96 });
        assert_eq!(s.rope.theta, 5e5);
        assert_eq!(s.eos_token_ids, [1, 2]);
        assert_eq!(s.attention.head_dim, 16);
        assert!(s.attention.qkv_bias && !s.attention.o_bias);
        assert_eq!(s.moe.shared_expert.as_ref().map(|x| x.ffn), Some(48));
        assert_eq!(s.attention.qk_norm, QkNorm::None);
    }

    #[test]
    fn unsupported_rope_scaling_is_an_error() {
        let text = QWEN2.replace(r#""rope_type":"default""#, r#""rope_type":"yarn""#);
        assert!(matches!(
            parse_config(&text),
            Err(StorageError::InvalidConfig { field: "rope_scaling", .. })
        ));
    }

    #[test]
    fn missing_required_size_is_named() {
        let text = QWEN2.replace(r#""num_experts":8,"#, "");
        assert!(matches!(parse_config(&text), Err(StorageError::InvalidConfig { field: "num_experts", .. })));
    }

    #[test]
    fn non_silu_activation_is_rejected() {
        let text = QWEN2.replace(r#""vocab_size":100"#, r#""vocab_size":100,"hidden_act":"gelu""#);
        assert!(matches!(parse_config(&text), Err(StorageError::InvalidConfig { field: "hidden_act", .. })));
    }
}
