//! The MoE block: router (softmax, top-k, optional renormalisation), routed experts each
//! run once over the tokens sent to it, optional shared expert with its sigmoid gate.

use std::ops::Range;

use hetmoe_cpu_kernels::moe::{ExpertRef, EXPERTS_PER_LOOP};
use hetmoe_cpu_kernels::{matmul, softmax::sigmoid, softmax::softmax_inplace, topk::top_k};
use hetmoe_storage::{ExpertId, ExpertKey, ModelSpec};

use super::mlp::{run_expert, run_experts};
use crate::error::EngineResult;
use crate::experts::{ExpertAccess, ExpertRequest};
use crate::scratch::{zeroed, MoeScratch};
use crate::weights::MoeWeights;

/// Experts share a parallel loop while their rows (token, expert pairs) number at most
/// this: every decode step's experts, and small batches'. Bigger loops gain nothing and
/// would grow the activation scratch.
const ROWS_PER_SHARED_LOOP: usize = 64;

/// Routing decisions of one MoE layer for a batch of tokens.
#[derive(Debug, Clone, PartialEq, Default)]
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
pub(crate) fn route(spec: &ModelSpec, moe: &MoeWeights, x: &[f32], probs: &mut Vec<f32>, r: &mut Routing) {
    let (e, k) = (spec.moe.n_experts, spec.moe.top_k);
    let n = x.len() / spec.hidden;
    r.n_tokens = n;
    r.n_experts = e;
    r.top_k = k;
    matmul(x, moe.router.mat(), zeroed(&mut r.router_logits, n * e));
    r.expert_ids.clear();
    r.expert_ids.resize(n * k, 0);
    zeroed(&mut r.weights, n * k);
    // [n, n_experts] softmax probabilities, kept for the expert cache's policies.
    let probs = zeroed(probs, n * e);
    for t in 0..n {
        let p = &mut probs[t * e..(t + 1) * e];
        p.copy_from_slice(&r.router_logits[t * e..(t + 1) * e]);
        softmax_inplace(p);
        let ids = &mut r.expert_ids[t * k..(t + 1) * k];
        top_k(p, ids);
        let w = &mut r.weights[t * k..(t + 1) * k];
        for (wi, &id) in w.iter_mut().zip(ids.iter()) {
            *wi = p[id];
        }
        if spec.moe.norm_topk_prob {
            let sum: f32 = w.iter().sum();
            for wi in w.iter_mut() {
                *wi /= sum;
            }
        }
    }
}

/// `x`: `[n, hidden]` (after `post_attention_layernorm`) → `out`: `[n, hidden]`. The
/// routing is left in `sc.routing`.
pub(crate) fn forward(
    spec: &ModelSpec,
    layer: usize,
    moe: &MoeWeights,
    access: &dyn ExpertAccess,
    x: &[f32],
    sc: &mut MoeScratch,
    out: &mut [f32],
) -> EngineResult<()> {
    let h = spec.hidden;
    route(spec, moe, x, &mut sc.probs, &mut sc.routing);
    let MoeScratch {
        routing,
        probs,
        slots,
        order,
        offsets,
        fill,
        active,
        active_ids,
        active_keys,
        xe,
        ye,
        act,
        shared_y,
        gate,
    } = sc;
    let (n, k, n_experts) = (routing.n_tokens, routing.top_k, routing.n_experts);

    // Group (token, rank) slots by expert: counting sort over expert ids.
    offsets.clear();
    offsets.resize(n_experts + 1, 0);
    for &e in &routing.expert_ids {
        offsets[e + 1] += 1;
    }
    for e in 0..n_experts {
        offsets[e + 1] += offsets[e];
    }
    order.clear();
    order.resize(n * k, 0);
    fill.clear();
    fill.extend_from_slice(offsets);
    for (slot, &e) in routing.expert_ids.iter().enumerate() {
        order[fill[e]] = slot;
        fill[e] += 1;
    }

    // Each (token, rank) slot gets its weighted expert output; slots are summed in rank
    // order below, so the result is independent of the order experts run in.
    let slots = zeroed(slots, n * k * h); // [n, k, hidden]
    active.clear();
    active.extend((0..n_experts).filter(|&e| offsets[e + 1] > offsets[e]));
    active_ids.clear();
    active_ids.extend(active.iter().map(|&e| ExpertId(e as u16)));
    active_keys.clear();
    active_keys.extend(active.iter().map(|&e| ExpertKey::new(layer, e)));
    let request = ExpertRequest {
        layer,
        n_tokens: n,
        router_probs: probs,
        experts: active,
        ids: active_ids,
        keys: active_keys,
    };
    // The tokens in expert order: row p is slot order[p]'s token, so expert e's tokens are
    // rows offsets[e]..offsets[e + 1].
    let xe = zeroed(xe, n * k * h);
    for (row, &slot) in xe.chunks_exact_mut(h).zip(order.iter()) {
        let t = slot / k;
        row.copy_from_slice(&x[t * h..(t + 1) * h]);
    }
    let ye = zeroed(ye, n * k * h);
    access.with_experts(&request, &moe.experts, &mut |experts, weights| {
        // Consecutive experts share a loop while their rows are few (decode): the loop's
        // start and end are paid once. A loop's `act` scratch covers its rows only.
        let mut i = 0;
        while i < experts.len() {
            let lo = offsets[experts[i]];
            let mut j = i + 1;
            while j < experts.len()
                && j - i < EXPERTS_PER_LOOP
                && offsets[experts[j] + 1] - lo <= ROWS_PER_SHARED_LOOP
            {
                j += 1;
            }
            let hi = offsets[experts[j - 1] + 1];
            let jobs: [(ExpertRef<'_>, Range<usize>); EXPERTS_PER_LOOP] = std::array::from_fn(|q| {
                let b = (i + q).min(j - 1);
                (weights[b], offsets[experts[b]] - lo..offsets[experts[b] + 1] - lo)
            });
            run_experts(&xe[lo * h..hi * h], &jobs[..j - i], act, &mut ye[lo * h..hi * h]);
            i = j;
        }
    })?;
    for (row, &slot) in ye.chunks_exact(h).zip(order.iter()) {
        let w = routing.weights[slot];
        for (s, &v) in slots[slot * h..(slot + 1) * h].iter_mut().zip(row) {
            *s = v * w;
        }
    }
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
        let ys = zeroed(shared_y, n * h);
        run_expert(x, shared.expert(), act, ys);
        let gate = zeroed(gate, n);
        match &moe.shared_gate {
            Some(g) => {
                matmul(x, g.mat(), gate);
                gate.iter_mut().for_each(|v| *v = sigmoid(*v));
            }
            None => gate.fill(1.0),
        }
        for t in 0..n {
            for (a, &b) in out[t * h..(t + 1) * h].iter_mut().zip(&ys[t * h..(t + 1) * h]) {
                *a += gate[t] * b;
            }
        }
    }
    Ok(())
}
