//! The normalized, validated description of a model that every other crate reads.
//!
//! Built once from `config.json` by [`crate::parse_config`]; architecture quirks become
//! plain fields here so that the forward pass never looks at `model_type` strings.

/// Architectures hetmoe can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "mixtral, qwen2_moe, qwen3_moe, olmoe";

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "mixtral" => Some(Self::Mixtral),
            "qwen2_moe" => Some(Self::Qwen2Moe),
            "qwen3_moe" => Some(Self::Qwen3Moe),
            "olmoe" => Some(Self::Olmoe),
            _ => None,
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Olmoe => "olmoe",
        }
    }
}

/// Where q/k RMSNorm is applied, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Qwen3: one RMSNorm of size `head_dim`, applied to every head (before RoPE).
    PerHead,
    /// OLMoE: RMSNorm over the whole projection (`n_heads * head_dim`, `n_kv_heads * head_dim`).
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// OLMoE's `clip_qkv`: q, k, v are clamped to `[-c, c]` after projection (and norm).
    pub clip_qkv: Option<f32>,
    /// Keys visible to query i are `i - w < j <= i` when set.
    pub sliding_window: Option<usize>,
}

impl AttentionSpec {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Rotary position embedding, rotate-half pairing (dimension i with i + d/2).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f32,
    /// Leading dimensions of each head that are rotated (`head_dim` for all current archs).
    pub rotary_dim: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpertSpec {
    pub ffn: usize,
    /// Qwen2-MoE: the shared expert's output is scaled by `sigmoid(x · w_gate)`.
    pub sigmoid_gate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub n_experts: usize,
    pub top_k: usize,
    /// Intermediate size of each routed expert.
    pub expert_ffn: usize,
    /// Renormalize the top-k softmax probabilities to sum to one.
    pub norm_topk_prob: bool,
    pub shared_expert: Option<SharedExpertSpec>,
}

/// The feed-forward block of one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub enum FfnKind {
    /// A plain SwiGLU MLP of this intermediate size.
    Dense { ffn: usize },
    /// Routed experts (shape in [`ModelSpec::moe`]).
    Moe,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub ffn: FfnKind,
}

/// A validated model description. Every size is non-zero and consistent.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub arch: Architecture,
    pub vocab: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub attention: AttentionSpec,
    pub rope: RopeSpec,
    pub rms_norm_eps: f32,
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
    pub moe: MoeSpec,
    pub layers: Vec<LayerSpec>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelSpec {
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        matches!(self.layers.get(layer).map(|l| &l.ffn), Some(FfnKind::Moe))
    }

    /// Indices of the layers with routed experts.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.n_layers).filter(|&l| self.is_moe_layer(l)).collect()
    }

    /// Number of weight elements of one routed expert (gate + up + down).
    pub fn expert_params(&self) -> usize {
        3 * self.hidden * self.moe.expert_ffn
    }
}
