//! Activations of the expert MLPs.

use crate::softmax::sigmoid;

/// SwiGLU's middle step: `gate ← silu(gate) · up`, with `silu(x) = x · sigmoid(x)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul length mismatch");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu_times(*g, u);
    }
}

/// [`silu_mul`] over interleaved pairs: `v[k] ← silu(v[2k]) · v[2k + 1]` for every pair
/// (`v` = `[gate_0, up_0, gate_1, up_1, …]`), the results packed at the front. In place:
/// `v[k]` is written after `v[2k]` and `v[2k + 1]` are read, and `k ≤ 2k`.
pub fn silu_mul_pairs(v: &mut [f32]) {
    for k in 0..v.len() / 2 {
        v[k] = silu_times(v[2 * k], v[2 * k + 1]);
    }
}

#[inline]
fn silu_times(g: f32, u: f32) -> f32 {
    g * sigmoid(g) * u
}
