//! The SwiGLU MLP `down(silu(gate(x)) · up(x))`: dense layers, shared experts, and each
//! routed expert (the unit that later tiers place on GPU, host or disk).

use hetmoe_cpu_kernels::moe::{expert_swiglu, ExpertRef};

use crate::weights::Mlp;

/// `x`: `[n, hidden]` → `out`: `[n, hidden]`.
pub(crate) fn swiglu(x: &[f32], mlp: &Mlp, out: &mut [f32]) {
    run_expert(x, mlp.expert(), out)
}

/// Runs one expert (any layout, any tier) over `x`: `[n, hidden]` into `out`.
pub(crate) fn run_expert(x: &[f32], e: ExpertRef<'_>, out: &mut [f32]) {
    let n = x.len() / e.hidden();
    let mut act = vec![0f32; 2 * n * e.ffn()];
    expert_swiglu(x, e, &mut act, out);
}
