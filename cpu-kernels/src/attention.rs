//! Causal (optionally sliding-window) grouped-query attention over a KV cache.

use rayon::prelude::*;

use crate::softmax::softmax_inplace;

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q · k` before the softmax (`head_dim^-0.5`).
    pub scale: f32,
    /// Query at position p sees keys `p - w < j <= p` when set.
    pub window: Option<usize>,
}

/// `q`: `[n_q, n_heads * head_dim]` for queries at absolute positions `pos0 .. pos0 + n_q`;
/// `k`, `v`: `[n_kv, n_kv_heads * head_dim]` for positions `0 .. n_kv` (`n_kv ≥ pos0 + n_q`);
/// `out`: `[n_q, n_heads * head_dim]`. Parallel over (query, head); each output is computed
/// by one task in a fixed order.
pub fn causal_attention(s: AttentionShape, q: &[f32], k: &[f32], v: &[f32], pos0: usize, out: &mut [f32]) {
    let hd = s.head_dim;
    let q_stride = s.n_heads * hd;
    let kv_stride = s.n_kv_heads * hd;
    if q_stride == 0 {
        return;
    }
    let n_q = q.len() / q_stride;
    let n_kv = k.len() / kv_stride.max(1);
    assert!(n_kv >= pos0 + n_q, "KV cache holds {n_kv} positions, queries reach {}", pos0 + n_q);
    assert_eq!(out.len(), q.len());
    let group = s.n_heads / s.n_kv_heads;
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (i, h) = (idx / s.n_heads, idx % s.n_heads);
        let p = pos0 + i;
        let lo = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let qh = &q[i * q_stride + h * hd..][..hd];
        let kvh = h / group;
        let mut scores: Vec<f32> = (lo..=p)
            .map(|j| {
                let kj = &k[j * kv_stride + kvh * hd..][..hd];
                qh.iter().zip(kj).fold(0.0f32, |a, (x, y)| a + x * y) * s.scale
            })
            .collect();
        softmax_inplace(&mut scores);
        o.fill(0.0);
        for (j, &pj) in (lo..=p).zip(&scores) {
            let vj = &v[j * kv_stride + kvh * hd..][..hd];
            for (ov, &vv) in o.iter_mut().zip(vj) {
                *ov += pj * vv;
            }
        }
    });
}
