//! The SwiGLU MLP `down(silu(gate(x)) · up(x))`: dense layers, shared experts, and each
//! routed expert (the unit that later tiers place on GPU, host or disk).

use std::ops::Range;

use hetmoe_cpu_kernels::moe::{expert_swiglu, experts_swiglu, ExpertRef};

use crate::scratch::zeroed;

/// Runs one expert (any layout, any tier) over `x`: `[n, hidden]` into `out`, with `act`
/// as the `[2, n, ffn]` activation scratch.
pub(crate) fn run_expert(x: &[f32], e: ExpertRef<'_>, act: &mut Vec<f32>, out: &mut [f32]) {
    let n = x.len() / e.hidden();
    expert_swiglu(x, e, zeroed(act, 2 * n * e.ffn()), out);
}

/// Runs experts of one shape in one parallel loop: expert `i` over rows `jobs[i].1` of `x`
/// (`[n, hidden]`) into the same rows of `out` (ascending, disjoint ranges), with `act` as
/// the `[n, 2 · ffn]` scratch.
pub(crate) fn run_experts(
    x: &[f32],
    jobs: &[(ExpertRef<'_>, Range<usize>)],
    act: &mut Vec<f32>,
    out: &mut [f32],
) {
    let Some((e, _)) = jobs.first() else {
        return;
    };
    let n = x.len() / e.hidden();
    experts_swiglu(x, jobs, zeroed(act, 2 * n * e.ffn()), out);
}
