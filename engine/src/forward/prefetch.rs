//! Skip-gate prefetch: as soon as layer l is done, layer l+1's router is applied to layer
//! l's output (normalized by l+1's `post_attention_layernorm`, skipping l+1's attention)
//! to guess l+1's experts, and the expert cache starts loading them while l+1's attention
//! runs. A guess only moves bytes: it never changes what is computed.

use hetmoe_cpu_kernels::{matmul, topk::top_k};

use super::rms_norm_rows;
use crate::engine::Model;
use crate::scratch::zeroed;
use crate::weights::FfnWeights;

/// Asks the expert access to prefetch the experts layer `l + 1` is likely to use, given
/// `x` (`[n, hidden]`, the output of layer `l`). `xn` and `logits` are scratch.
pub(crate) fn next_layer(model: &Model, l: usize, x: &[f32], xn: &mut [f32], logits: &mut Vec<f32>) {
    let spec = &model.spec;
    let Some(next) = model.weights.layers.get(l + 1) else { return };
    let FfnWeights::Moe(moe) = &next.ffn else { return };
    let (e, k) = (spec.moe.n_experts, spec.moe.top_k);
    let n = x.len() / spec.hidden;
    rms_norm_rows(x, &next.ffn_norm, spec.rms_norm_eps, xn);
    let logits = zeroed(logits, n * e);
    matmul(xn, moe.router.mat(), logits);
    let mut wanted = vec![false; e];
    let mut ids = vec![0usize; k];
    for t in 0..n {
        // Softmax is monotonic: the top-k of the logits is the top-k of the probabilities.
        top_k(&logits[t * e..(t + 1) * e], &mut ids);
        for &i in &ids {
            wanted[i] = true;
        }
    }
    let experts: Vec<usize> = (0..e).filter(|&i| wanted[i]).collect();
    model.experts.prefetch(l + 1, &experts);
}
