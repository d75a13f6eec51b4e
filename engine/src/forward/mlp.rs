//! The SwiGLU MLP `down(silu(gate(x)) · up(x))`: dense layers, shared experts, and each
//! routed expert (the unit that later tiers place on GPU, host or disk).

use hetmoe_cpu_kernels::{activation::silu_mul, matmul};

use crate::weights::Mlp;

/// `x`: `[n, hidden]` → `out`: `[n, hidden]`.
pub(crate) fn swiglu(x: &[f32], mlp: &Mlp, out: &mut [f32]) {
    let ffn = mlp.gate.rows();
    let n = x.len() / mlp.gate.mat().cols();
    let mut g = vec![0f32; n * ffn]; // [n, ffn]
    let mut u = vec![0f32; n * ffn]; // [n, ffn]
    matmul(x, mlp.gate.mat(), &mut g);
    matmul(x, mlp.up.mat(), &mut u);
    silu_mul(&mut g, &u);
    matmul(&g, mlp.down.mat(), out);
}
