//! Several matrices applied to the same activations in one parallel loop ([`matmuls_with`]).
//!
//! Why: in decode an attention layer's q, k and v projections are separate matvecs of
//! 150–600 KB each (q4, `mixtral-bench`), short enough that each loop's start (every thread's
//! stream ramping up from DRAM) and end (the first thread done waits for the last) cost a
//! sizeable part of its time; one loop over all their row blocks pays that once.

use super::{
    active_isa, prep_for, row_block, rows_per_task, select, token_count, with_acts, Isa, MatRef, SyncPtr,
    MIN_PARALLEL_WORK,
};

/// Matrices one loop of [`matmuls`] takes at most (more run in groups of this many).
pub const MATMULS_PER_LOOP: usize = 4;

/// `y_i = x · W_iᵀ` for each `(W_i, y_i)` of `jobs` ([`super::matmul`] on each), in one
/// parallel loop: every output bit-identical to [`super::matmul`]. The matrices share `x`
/// (`[n_tokens, cols]`), so they all have `cols` columns.
pub fn matmuls(x: &[f32], jobs: &mut [(MatRef<'_>, &mut [f32])]) {
    matmuls_with(active_isa(), x, jobs)
}

/// [`matmuls`] on a given ISA.
pub fn matmuls_with(isa: Isa, x: &[f32], jobs: &mut [(MatRef<'_>, &mut [f32])]) {
    for group in jobs.chunks_mut(MATMULS_PER_LOOP) {
        one_loop(isa, x, group);
    }
}

fn one_loop(isa: Isa, x: &[f32], jobs: &mut [(MatRef<'_>, &mut [f32])]) {
    let Some(&(w0, _)) = jobs.first() else {
        return;
    };
    let (cols, prep) = (w0.cols, prep_for(isa, w0.cols, &w0));
    // Activations are prepared once for all: matrices whose kernels read them differently
    // (another format) run alone.
    if jobs.iter().any(|(w, _)| w.cols != cols || prep_for(isa, cols, w) != prep) {
        for (w, y) in jobs.iter_mut() {
            super::matmul_with(isa, x, *w, y);
        }
        return;
    }
    let kernel = select(isa);
    // (matrix, rows per task, first task, output)
    let mut plan = [None; MATMULS_PER_LOOP];
    let (mut n_tasks, mut n_tokens, mut work) = (0, 0, 0);
    for (slot, (w, y)) in plan.iter_mut().zip(jobs.iter_mut()) {
        n_tokens = token_count(x, w, y);
        if w.rows == 0 || n_tokens == 0 {
            continue;
        }
        let rpt = rows_per_task(w.rows, n_tokens);
        *slot = Some((*w, rpt, n_tasks, SyncPtr(y.as_mut_ptr())));
        n_tasks += w.rows.div_ceil(rpt);
        work += w.rows * cols * n_tokens;
    }
    if n_tasks == 0 {
        return;
    }
    with_acts(isa, x, cols, &w0, |acts| {
        let task = |i: usize| {
            // The last matrix whose first task is at or before i.
            let Some((w, rpt, first, out)) = plan.iter().flatten().take_while(|p| p.2 <= i).last().copied()
            else {
                return;
            };
            let r0 = (i - first) * rpt;
            let r1 = (r0 + rpt).min(w.rows);
            // SAFETY: y is [n_tokens, rows] of w (token_count asserted it), row blocks of one
            // matrix are disjoint and each task runs once; the outputs are distinct slices.
            unsafe { row_block(kernel, acts, n_tokens, w, r0, r1, out, w.rows) };
        };
        if n_tasks == 1 || work < MIN_PARALLEL_WORK {
            (0..n_tasks).for_each(task);
        } else {
            crate::parallel::for_each(n_tasks, task);
        }
    })
}
