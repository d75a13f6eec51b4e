//! The fused SwiGLU expert `out = downᵀᵀ · (silu(gate · x) ⊙ (up · x))`, for one expert or
//! for the several experts of a MoE layer in one parallel loop.
//!
//! Fused per block of [`AXPY_ROWS_PER_TASK`] neurons: one task computes the gate and up rows
//! of its block for every token of its expert, applies SiLU·mul, and adds its block's rows
//! of `downᵀ` into its own block sum, so it reads its part of the expert once, start to end,
//! with no barrier between the projections. Block sums are then added to the expert's
//! output rows in block order: bit-identical to [`super::matmul_with`] (gate, up),
//! `silu_mul` and [`super::axpy_rows_with`] in sequence, whatever the thread count, and
//! whether an expert runs alone or in a loop with others.
//!
//! Why several experts per loop: a decode step's experts are a few hundred microseconds
//! each (a `qwen3-moe-bench` q4 expert ~40 µs), and every loop pays its start (each thread's
//! stream ramping up from DRAM) and its end (the first thread done waits for the last).
//! Measured with `matmul` on one 1.5 GB q4 matrix cut into calls of N rows (2 threads):
//! 1536-row calls reach 85% of the speed of one call over all of it, 7168-row calls 93%.

use std::ops::Range;

use super::{
    add_block_sums, axpy_kernel, prep_for, prepare_acts, row_block, scalar_axpy, select, with_block_sums,
    ActScratch, Acts, AxpyKernel, Kernel, AXPY_ROWS_PER_TASK, MIN_PARALLEL_WORK, ROWS_PER_TASK,
};
use crate::dispatch::Isa;
use crate::moe::{ExpertRef, GateUpRef, EXPERTS_PER_LOOP};
use crate::parallel::SyncPtr;

/// Rows of gate, then the same rows of up, computed in turn by a task (separate matrices).
const GATE_UP_RUN: usize = 16;
// A run of interleaved gate/up rows (2 · GATE_UP_RUN) must fit one multi-token row block.
const _: () = assert!(2 * GATE_UP_RUN <= ROWS_PER_TASK);

thread_local! {
    /// Per-thread buffers for the prepared activations of each expert of a loop.
    static EXPERT_ACTS: std::cell::RefCell<Vec<ActScratch>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Expert `i` of `experts` computes rows `experts[i].1` of `out` (`[n, hidden]`) from the
/// same rows of `x`, with the same rows of `act` (`[n, 2 · ffn]`, scratch). Ranges are
/// ascending and disjoint, the experts all `[ffn, hidden]`; rows no expert covers are left
/// as they are. See the module doc.
pub(crate) fn swiglu_experts_with(
    isa: Isa,
    x: &[f32],
    experts: &[(ExpertRef<'_>, Range<usize>)],
    act: &mut [f32],
    out: &mut [f32],
) {
    assert!(isa.is_supported(), "ISA {} is not supported by this CPU", isa.name());
    let Some((first, _)) = experts.first() else {
        return;
    };
    let (ffn, hidden) = (first.ffn(), first.hidden());
    let n = x.len().checked_div(hidden).unwrap_or(0);
    assert_eq!(x.len(), n * hidden, "x is not [n, hidden]");
    assert_eq!(out.len(), n * hidden, "out is not [n, hidden]");
    assert!(act.len() >= 2 * n * ffn, "act scratch too small");
    let mut end = 0;
    for (e, rows) in experts {
        assert_eq!((e.ffn(), e.hidden()), (ffn, hidden), "the experts of one call differ in shape");
        assert!(
            end <= rows.start && rows.start <= rows.end && rows.end <= n,
            "expert rows overlap or exceed x"
        );
        end = rows.end;
        out[rows.start * hidden..rows.end * hidden].fill(0.0);
    }
    if ffn == 0 || hidden == 0 {
        return;
    }
    let Some(axpy) = axpy_kernel(isa) else {
        // The scalar oracle: unfused, one pass per row of downᵀ.
        for (e, rows) in experts {
            let m = rows.len();
            let a = &mut act[2 * rows.start * ffn..2 * rows.end * ffn];
            let g =
                crate::moe::gate_up_act(isa, &x[rows.start * hidden..rows.end * hidden], m, e.gate_up(), a);
            scalar_axpy(g, m, e.down_t(), &mut out[rows.start * hidden..rows.end * hidden]);
        }
        return;
    };
    for group in experts.chunks(EXPERTS_PER_LOOP) {
        fused_loop(isa, axpy, x, group, act, out);
    }
}

/// One parallel loop over the blocks of every expert of `group` (at most
/// [`EXPERTS_PER_LOOP`]).
fn fused_loop(
    isa: Isa,
    axpy: AxpyKernel,
    x: &[f32],
    group: &[(ExpertRef<'_>, Range<usize>)],
    act: &mut [f32],
    out: &mut [f32],
) {
    let (ffn, hidden) = (group[0].0.ffn(), group[0].0.hidden());
    let n_blocks = ffn.div_ceil(AXPY_ROWS_PER_TASK);
    let kernel = select(isa);
    let act_base = SyncPtr(act.as_mut_ptr());
    with_expert_acts(isa, x, group, |acts| {
        // Experts with no rows have no blocks.
        let mut jobs = [None; EXPERTS_PER_LOOP];
        let (mut n_jobs, mut sums_len) = (0, 0);
        for ((e, rows), acts) in group.iter().zip(acts).filter(|((_, rows), _)| !rows.is_empty()) {
            let m = rows.len();
            // This expert's rows of act: [m, ffn] for gate and [m, ffn] for up, or
            // [m, 2 · ffn] interleaved (the same floats).
            let g = act_base.ptr().wrapping_add(2 * rows.start * ffn);
            jobs[n_jobs] = Some(Job {
                expert: *e,
                acts: *acts,
                rows: (rows.start, rows.end),
                ffn,
                g: SyncPtr(g),
                u: SyncPtr(g.wrapping_add(m * ffn)),
                part: m * hidden,
                sums: sums_len,
            });
            n_jobs += 1;
            sums_len += n_blocks * m * hidden;
        }
        let jobs = &jobs[..n_jobs];
        let tokens: usize = group.iter().map(|(_, r)| r.len()).sum();
        with_block_sums(sums_len, |sums| {
            let base = SyncPtr(sums.as_mut_ptr());
            let task = |i: usize| {
                let Some(job) = &jobs[i / n_blocks] else { return };
                let b = i % n_blocks;
                // SAFETY: job j's block sums are `n_blocks` disjoint parts of `part` floats at
                // `job.sums` (laid out above, inside `sums`, exclusively borrowed for the
                // loop); task i alone writes part b. act rows: see Job::block.
                unsafe {
                    let p = std::slice::from_raw_parts_mut(base.ptr().add(job.sums + b * job.part), job.part);
                    job.block(kernel, axpy, b, p);
                }
            };
            let n_tasks = jobs.len() * n_blocks;
            if 3 * ffn * hidden * tokens >= MIN_PARALLEL_WORK {
                crate::parallel::for_each(n_tasks, task);
            } else {
                (0..n_tasks).for_each(task);
            }
            for job in jobs.iter().flatten() {
                let s = &sums[job.sums..job.sums + n_blocks * job.part];
                add_block_sums(s, job.part, &mut out[job.rows.0 * hidden..job.rows.1 * hidden]);
            }
        });
    });
}

/// Runs `f` on each expert's rows of `x` prepared for its kernels ([`Acts`]), in this
/// thread's scratch (fresh buffers if that is in use).
fn with_expert_acts<R>(
    isa: Isa,
    x: &[f32],
    group: &[(ExpertRef<'_>, Range<usize>)],
    f: impl FnOnce(&[Acts<'_>]) -> R,
) -> R {
    let mut f = Some(f);
    let mut out = None;
    EXPERT_ACTS.with(|cell| {
        if let Ok(mut s) = cell.try_borrow_mut() {
            out = f.take().map(|f| prepared(isa, x, group, &mut s, f));
        }
    });
    match f {
        // Re-entered on this thread (an inner call from a task of an outer one).
        Some(f) => prepared(isa, x, group, &mut Vec::new(), f),
        None => out.expect("the scratch closure ran"),
    }
}

fn prepared<R>(
    isa: Isa,
    x: &[f32],
    group: &[(ExpertRef<'_>, Range<usize>)],
    scratch: &mut Vec<ActScratch>,
    f: impl FnOnce(&[Acts<'_>]) -> R,
) -> R {
    let hidden = group[0].0.hidden();
    if scratch.len() < group.len() {
        scratch.resize_with(group.len(), ActScratch::default);
    }
    let mut acts = [Acts::EMPTY; EXPERTS_PER_LOOP];
    for ((a, s), (e, rows)) in acts.iter_mut().zip(scratch.iter_mut()).zip(group) {
        let w = match e.gate_up() {
            GateUpRef::Separate { gate, .. } => gate,
            GateUpRef::Interleaved(gu) => gu,
        };
        *a = prepare_acts(&x[rows.start * hidden..rows.end * hidden], hidden, prep_for(isa, hidden, &w), s);
    }
    f(&acts[..group.len()])
}

/// One expert of a loop: its weights, prepared activations, rows of `act`, and where its
/// block sums start.
#[derive(Clone, Copy)]
struct Job<'a> {
    expert: ExpertRef<'a>,
    acts: Acts<'a>,
    /// Its rows of `x`, `act` and `out` (a copyable range; not empty).
    rows: (usize, usize),
    ffn: usize,
    /// Its `[n_tokens, ffn]` gate and up halves of `act` (together `[n_tokens, 2 · ffn]`
    /// when gate and up are interleaved).
    g: SyncPtr,
    u: SyncPtr,
    /// Floats per block sum (`n_tokens · hidden`), and the offset of its first.
    part: usize,
    sums: usize,
}

impl Job<'_> {
    /// Block `b`: neurons `j0..j1`, summed into `p` (`[n_tokens, hidden]`).
    ///
    /// # Safety
    /// `g` and `u` point to this job's two `[n_tokens, ffn]` halves of `act`, which no one
    /// but this job's tasks touches during the loop; each block runs once.
    unsafe fn block(&self, kernel: Kernel, axpy: AxpyKernel, b: usize, p: &mut [f32]) {
        let (ffn, n_tokens, x) = (self.ffn, self.rows.1 - self.rows.0, self.acts);
        let j0 = b * AXPY_ROWS_PER_TASK;
        let j1 = (j0 + AXPY_ROWS_PER_TASK).min(ffn);
        let down_t = self.expert.down_t();
        // SAFETY: g and u are [n_tokens, ffn] (caller), distinct, and blocks are disjoint,
        // so this task alone writes and then reads columns j0..j1 of each; seen as one
        // [n_tokens, 2 · ffn] buffer (the interleaved path), columns 2·j0 .. 2·j1 of each
        // token row are this task's alone.
        unsafe {
            match self.expert.gate_up() {
                GateUpRef::Interleaved(gu) => {
                    // Gate and up rows interleaved ([gate_j | up_j]): one matvec over the
                    // block's 2 · (j1 − j0) rows, one stream, into g and u seen as one
                    // [n_tokens, 2 · ffn] buffer (row 2j: gate_j, 2j + 1: up_j); SiLU·mul
                    // then leaves token t's block activations at 2·j0 .. 2·j0 + (j1 − j0).
                    let mut r0 = 2 * j0;
                    while r0 < 2 * j1 {
                        let r1 = (r0 + 2 * GATE_UP_RUN).min(2 * j1);
                        row_block(kernel, x, n_tokens, gu, r0, r1, self.g, 2 * ffn);
                        r0 = r1;
                    }
                    for t in 0..n_tokens {
                        let r = self.g.ptr().add(t * 2 * ffn + 2 * j0);
                        crate::activation::silu_mul_pairs(std::slice::from_raw_parts_mut(r, 2 * (j1 - j0)));
                    }
                    let gb = std::slice::from_raw_parts(
                        self.g.ptr().add(2 * j0),
                        (n_tokens - 1) * 2 * ffn + (j1 - j0),
                    );
                    p.fill(0.0);
                    axpy.run(gb, 2 * ffn, n_tokens, down_t.row_range(j0, j1), p);
                }
                GateUpRef::Separate { gate, up } => {
                    // Alternate gate and up in short runs: in a row-column bundle gate row j
                    // and up row j are neighbours, so this walks the bundle nearly
                    // sequentially.
                    let mut s0 = j0;
                    while s0 < j1 {
                        let s1 = (s0 + GATE_UP_RUN).min(j1);
                        row_block(kernel, x, n_tokens, gate, s0, s1, self.g, ffn);
                        row_block(kernel, x, n_tokens, up, s0, s1, self.u, ffn);
                        s0 = s1;
                    }
                    for t in 0..n_tokens {
                        let gs = std::slice::from_raw_parts_mut(self.g.ptr().add(t * ffn + j0), j1 - j0);
                        let us = std::slice::from_raw_parts(self.u.ptr().add(t * ffn + j0), j1 - j0);
                        crate::activation::silu_mul(gs, us);
                    }
                    let gb =
                        std::slice::from_raw_parts(self.g.ptr().add(j0), (n_tokens - 1) * ffn + (j1 - j0));
                    p.fill(0.0);
                    axpy.run(gb, ffn, n_tokens, down_t.row_range(j0, j1), p);
                }
            }
        }
    }
}
