//! Self-attention of one layer: projections (with optional bias), q/k RMSNorm, RoPE,
//! append to each sequence's KV cache, causal GQA attention, output projection.

use hetmoe_cpu_kernels::active_isa;
use hetmoe_cpu_kernels::attention::{causal_attention_in, AttentionShape};
use hetmoe_cpu_kernels::matmul::matmuls;
use hetmoe_cpu_kernels::norm::rms_norm_inplace;
use hetmoe_cpu_kernels::{matmul, rope};
use hetmoe_storage::QkNorm;

use super::phases::{timed, PhaseTimes};
use super::BatchItem;
use crate::engine::Model;
use crate::scratch::{zeroed, AttnScratch};
use crate::weights::AttentionWeights;

fn add_bias(y: &mut [f32], bias: Option<&Vec<f32>>) {
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
}

/// `xn`: `[n_tokens, hidden]` over the batch → `out`: `[n_tokens, hidden]`.
pub(crate) fn forward(
    model: &Model,
    layer: usize,
    w: &AttentionWeights,
    xn: &[f32],
    items: &mut [BatchItem<'_>],
    sc: &mut AttnScratch,
    out: &mut [f32],
    profile: &mut Option<PhaseTimes>,
) {
    let spec = &model.spec;
    let a = &spec.attention;
    let (hd, qd, kvd) = (a.head_dim, a.q_dim(), a.kv_dim());
    let n = xn.len() / spec.hidden;

    let q = zeroed(&mut sc.q, n * qd); // [n, n_heads * head_dim]
    let k = zeroed(&mut sc.k, n * kvd); // [n, n_kv_heads * head_dim]
    let v = zeroed(&mut sc.v, n * kvd);
    // One parallel loop for the three (short matvecs in decode).
    timed(
        profile,
        |p| &mut p.attention_projections,
        || matmuls(xn, &mut [(w.q.mat(), &mut *q), (w.k.mat(), &mut *k), (w.v.mat(), &mut *v)]),
    );
    let core = profile.is_some().then(std::time::Instant::now);
    add_bias(q, w.q_bias.as_ref());
    add_bias(k, w.k_bias.as_ref());
    add_bias(v, w.v_bias.as_ref());

    match (a.qk_norm, &w.q_norm, &w.k_norm) {
        (QkNorm::PerHead, Some(qn), Some(kn)) => {
            q.chunks_exact_mut(hd).for_each(|h| rms_norm_inplace(h, qn, spec.rms_norm_eps));
            k.chunks_exact_mut(hd).for_each(|h| rms_norm_inplace(h, kn, spec.rms_norm_eps));
        }
        (QkNorm::Full, Some(qn), Some(kn)) => {
            q.chunks_exact_mut(qd).for_each(|r| rms_norm_inplace(r, qn, spec.rms_norm_eps));
            k.chunks_exact_mut(kvd).for_each(|r| rms_norm_inplace(r, kn, spec.rms_norm_eps));
        }
        _ => {}
    }
    if let Some(c) = a.clip_qkv {
        for t in [&mut *q, &mut *k, &mut *v] {
            t.iter_mut().for_each(|x| *x = x.clamp(-c, c));
        }
    }

    // RoPE at each token's absolute position in its own sequence.
    let half = spec.rope.rotary_dim / 2;
    let (cos, sin) = (zeroed(&mut sc.cos, half), zeroed(&mut sc.sin, half));
    let mut t = 0;
    for item in items.iter() {
        for i in 0..item.tokens.len() {
            rope::cos_sin(item.seq.len() + i, &model.inv_freq, cos, sin);
            q[t * qd..(t + 1) * qd].chunks_exact_mut(hd).for_each(|h| rope::apply_rotate_half(h, cos, sin));
            k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd).for_each(|h| rope::apply_rotate_half(h, cos, sin));
            t += 1;
        }
    }

    let shape = AttentionShape {
        n_heads: a.n_heads,
        n_kv_heads: a.n_kv_heads,
        head_dim: hd,
        scale: (hd as f64).powf(-0.5) as f32,
        window: a.sliding_window,
    };
    let ctx = zeroed(&mut sc.ctx, n * qd); // [n, n_heads * head_dim]
    let mut t0 = 0;
    for item in items.iter_mut() {
        let m = item.tokens.len();
        let pos0 = item.seq.len();
        let cache = &mut item.seq.layers[layer];
        cache.append(&k[t0 * kvd..(t0 + m) * kvd], &v[t0 * kvd..(t0 + m) * kvd]);
        let (kc, vc, layout) = cache.views();
        causal_attention_in(
            active_isa(),
            shape,
            &q[t0 * qd..(t0 + m) * qd],
            kc,
            vc,
            layout,
            pos0,
            &mut ctx[t0 * qd..(t0 + m) * qd],
        );
        t0 += m;
    }

    if let (Some(p), Some(core)) = (profile.as_mut(), core) {
        p.attention += core.elapsed();
    }
    timed(profile, |p| &mut p.attention_projections, || matmul(ctx, w.o.mat(), out));
    add_bias(out, w.o_bias.as_ref());
}
