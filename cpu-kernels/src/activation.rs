//! Activations of the expert MLPs.

use crate::softmax::sigmoid;

/// SwiGLU's middle step: `gate ← silu(gate) · up`, with `silu(x) = x · sigmoid(x)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul length mismatch");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g * sigmoid(*g) * u;
    }
}
