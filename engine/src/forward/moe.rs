//! The MoE block: router (softmax, top-k, optional renormalisation), routed experts each
//! run once over the tokens sent to it, optional shared expert with its sigmoid gate.

use hetmoe_cpu_kernels::{matmul, softmax::sigmoid, softmax::softmax_inplace, topk::top_k};
use hetmoe_storage::ModelSpec;

use super::mlp::{run_expert, swiglu};
use crate::error::EngineResult;
use crate::experts::ExpertAccess;
use crate::weights::MoeWeights;

/// Routing decisions of one MoE layer for a batch of tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub n_tokens: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// `[n_tokens, n_experts]`: `x · W_router^T`.
    pub router_logits: Vec<f32>,
    /// `[n_tokens, top_k]`: chosen experts, by descending weight (ties: lower id first).
    pub expert_ids: Vec<usize>,
    /// `[n_tokens, top_k]`: the weight that multiplies each chosen expert's output.
    pub weights: Vec<f32>,
}

impl Routing {
    /// The experts used by at least one token, ascending.
    pub fn active_experts(&self) -> Vec<usize> {
        let mut used = vec![false; self.n_experts];
        for &e in &self.expert_ids {
            used[e] = true;
        }
        (0..self.n_experts).filter(|&e| used[e]).collect()
    }
}

/// Softmax router with top-k, as Mixtral, Qwen2/3-MoE and OLMoE compute it.
pub(crate) fn route(spec: &ModelSpec, moe: &MoeWeights, x: &[f32]) -> Routing {
    let (e, k) = (spec.moe.n_experts, spec.moe.top_k);
    let n = x.len() / spec.hidden;
    let mut logits = vec![0f32; n * e];
    matmul(x, moe.router.mat(), &mut logits);
    let mut expert_ids = vec![0usize; n * k];
    let mut weights = vec![0f32; n * k];
    let mut probs = vec![0f32; e];
    for t in 0..n {
        probs.copy_from_slice(&logits[t * e..(t + 1) * e]);
        softmax_inplace(&mut probs);
        let ids = &mut expert_ids[t * k..(t + 1) * k];
        top_k(&probs, ids);
        let w = &mut weights[t * k..(t + 1) * k];
        for (wi, &id) in w.iter_mut().zip(ids.iter()) {
            *wi = probs[id];
        }
        if spec.moe.norm_topk_prob {
            let sum: f32 = w.iter().sum();
            for wi in w.iter_mut() {
                *wi /= sum;
            }
        }
    }
    Routing { n_tokens: n, n_experts: e, top_k: k, router_logits: logits, expert_ids, weights }
}

/// `x`: `[n, hidden]` (after `post_attention_layernorm`) → `out`: `[n, hidden]`.
pub(crate) fn forward(
    spec: &ModelSpec,
    layer: usize,
    moe: &MoeWeights,
    access: &dyn ExpertAccess,
    x: &[f32],
    out: &mut [f32],
) -> EngineResult<Routing> {
    let h = spec.hidden;
    let routing = route(spec, moe, x);
    let (n, k) = (routing.n_tokens, routing.top_k);

    // Each (token, rank) slot gets its weighted expert output; slots are summed in rank
    // order below, so the result is independent of the order experts run in.
    let mut slots = vec![0f32; n * k * h]; // [n, k, hidden]
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); routing.n_experts]; // slot indices
    for (slot, &e) in routing.expert_ids.iter().enumerate() {
        members[e].push(slot);
    }
    let active: Vec<usize> = (0..routing.n_experts).filter(|&e| !members[e].is_empty()).collect();
    access.with_experts(layer, &moe.experts, &active, &mut |e, weights| {
        let slots_of_e = &members[e];
        let m = slots_of_e.len();
        let mut xe = vec![0f32; m * h]; // [m, hidden]
        for (row, &slot) in xe.chunks_exact_mut(h).zip(slots_of_e) {
            let t = slot / k;
            row.copy_from_slice(&x[t * h..(t + 1) * h]);
        }
        let mut ye = vec![0f32; m * h];
        run_expert(&xe, weights, &mut ye);
        for (row, &slot) in ye.chunks_exact(h).zip(slots_of_e) {
            let w = routing.weights[slot];
            for (s, &v) in slots[slot * h..(slot + 1) * h].iter_mut().zip(row) {
                *s = v * w;
            }
        }
    })?;
    for t in 0..n {
        let o = &mut out[t * h..(t + 1) * h];
        o.copy_from_slice(&slots[t * k * h..(t * k + 1) * h]);
        for r in 1..k {
            let s = &slots[(t * k + r) * h..(t * k + r + 1) * h];
            for (a, &b) in o.iter_mut().zip(s) {
                *a += b;
            }
        }
    }

    if let Some(shared) = &moe.shared {
        let mut ys = vec![0f32; n * h];
        swiglu(x, shared, &mut ys);
        let mut gate = vec![1f32; n];
        if let Some(g) = &moe.shared_gate {
            matmul(x, g.mat(), &mut gate);
            for v in gate.iter_mut() {
                *v = sigmoid(*v);
            }
        }
        for t in 0..n {
            for (a, &b) in out[t * h..(t + 1) * h].iter_mut().zip(&ys[t * h..(t + 1) * h]) {
                *a += gate[t] * b;
            }
        }
    }
    Ok(routing)
}
