//! The forward pass over a batch of sequences: embed → layers → final norm → lm_head.
//!
//! Tokens of every sequence in the batch are stacked into one `[n_tokens, hidden]` matrix
//! so each weight is streamed once per step; attention alone runs per sequence, against
//! that sequence's KV cache. Because every kernel computes each output independently of
//! the batch (see `hetmoe-cpu-kernels`), a sequence gets the same numbers batched or alone.

pub mod attention;
pub mod mlp;
pub mod moe;
mod phases;
mod prefetch;

use hetmoe_cpu_kernels::{matmul, norm::rms_norm};

use crate::engine::Model;
use crate::error::EngineResult;
use crate::kv_cache::Sequence;
use crate::scratch::{zeroed, Scratch};
use crate::weights::FfnWeights;

pub use moe::Routing;
pub use phases::PhaseTimes;

use phases::timed;

/// One sequence of a batch and the tokens to feed it in this step.
#[derive(Debug)]
pub struct BatchItem<'a> {
    pub seq: &'a mut Sequence,
    pub tokens: &'a [u32],
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Every fed position (`[n_tokens, vocab]` per sequence).
    All,
    /// The last fed position of each sequence (`[1, vocab]`).
    Last,
}

/// Sees the named intermediate activations of a forward pass, for parity debugging,
/// tests against the reference and routing traces. Every method has a no-op default.
/// Activations are `[n_tokens, hidden]` over the whole batch, in batch order.
pub trait ForwardObserver {
    /// `index` 0 is the embedding output; `index` i > 0 the output of decoder layer i-1.
    fn hidden_state(&mut self, _index: usize, _x: &[f32]) {}
    /// A MoE block's input (after `post_attention_layernorm`), routing and output.
    fn moe_block(&mut self, _layer: usize, _input: &[f32], _routing: &Routing, _output: &[f32]) {}
    /// Output of the final norm (input of `lm_head`).
    fn final_hidden(&mut self, _x: &[f32]) {}
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;
impl ForwardObserver for NoObserver {}

/// Row-wise RMSNorm of `[n, width]`.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        rms_norm(xr, w, eps, or);
    }
}

/// Runs the batch and returns each item's logits (see [`LogitsMode`]). Token ids and
/// lengths are validated by the caller. The items' KV caches grow by their tokens.
pub(crate) fn forward(
    model: &Model,
    items: &mut [BatchItem<'_>],
    mode: LogitsMode,
    obs: &mut (dyn ForwardObserver + Send),
    sc: &mut Scratch,
) -> EngineResult<Vec<Vec<f32>>> {
    let spec = &model.spec;
    let w = &model.weights;
    let h = spec.hidden;
    let n_tokens: usize = items.iter().map(|i| i.tokens.len()).sum();

    // [n_tokens, hidden]
    let step_start = sc.profile.is_some().then(std::time::Instant::now);
    let Scratch { x, xn, y, attn, moe: moe_sc, mlp_act, profile } = sc;
    let x = zeroed(x, n_tokens * h);
    let embed = w.embed.mat();
    for (row, &tok) in x.chunks_exact_mut(h).zip(items.iter().flat_map(|i| i.tokens.iter())) {
        embed.row_to_f32(tok as usize, row);
    }
    obs.hidden_state(0, x);

    let xn = zeroed(xn, n_tokens * h);
    let y = zeroed(y, n_tokens * h);
    for (l, layer) in w.layers.iter().enumerate() {
        rms_norm_rows(x, &layer.attn_norm, spec.rms_norm_eps, xn);
        attention::forward(model, l, &layer.attn, xn, items, attn, y, profile);
        add_into(x, y);

        rms_norm_rows(x, &layer.ffn_norm, spec.rms_norm_eps, xn);
        timed(
            profile,
            |p| &mut p.ffn,
            || -> EngineResult<()> {
                match &layer.ffn {
                    FfnWeights::Dense(m) => mlp::run_expert(xn, m.expert(), mlp_act, y),
                    FfnWeights::Moe(moe) => {
                        moe::forward(spec, l, moe, model.experts.as_ref(), xn, moe_sc, y)?
                    }
                }
                Ok(())
            },
        )?;
        if let FfnWeights::Moe(_) = &layer.ffn {
            obs.moe_block(l, xn, &moe_sc.routing, y);
        }
        add_into(x, y);
        obs.hidden_state(l + 1, x);
        if model.prefetch_next_layer && model.experts.wants_prefetch() {
            prefetch::next_layer(model, l, x, xn, &mut moe_sc.probs);
        }
    }
    for item in items.iter_mut() {
        item.seq.tokens.extend_from_slice(item.tokens);
    }

    let lm_start = profile.is_some().then(std::time::Instant::now);
    rms_norm_rows(x, &w.final_norm, spec.rms_norm_eps, xn);
    obs.final_hidden(xn);

    let lm_head = w.lm_head().mat();
    let vocab = lm_head.rows();
    let mut start = 0;
    let mut out = Vec::with_capacity(items.len());
    for item in items.iter() {
        let n = item.tokens.len();
        let rows = match mode {
            LogitsMode::All => &xn[start * h..(start + n) * h],
            LogitsMode::Last => &xn[(start + n - 1) * h..(start + n) * h],
        };
        let mut logits = vec![0f32; rows.len() / h * vocab];
        matmul(rows, lm_head, &mut logits);
        out.push(logits);
        start += n;
    }
    if let (Some(p), Some(lm_start), Some(step_start)) = (profile.as_mut(), lm_start, step_start) {
        p.lm_head += lm_start.elapsed();
        p.total += step_start.elapsed();
        p.steps += 1;
    }
    Ok(out)
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
