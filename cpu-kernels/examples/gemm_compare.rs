//! Prefill-size GEMM: hetmoe's matmul (f32 and bf16 weights) against the `gemm` crate (f32),
//! and whether `gemm` keeps the batch-invariance contract (token t of a batch bit-identical
//! to token t alone). `cargo run --release -p hetmoe-cpu-kernels --example gemm_compare`
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use half::bf16;
use hetmoe_cpu_kernels::matmul::{matmul, MatRef, WeightsRef};

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn gemm_f32(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize, y: &mut [f32]) {
    let threads = rayon::current_num_threads();
    // SAFETY: y is [n, rows], x is [n, cols], w is [rows, cols] (rhs = Wᵀ via strides).
    unsafe {
        gemm::gemm(
            n,
            rows,
            cols,
            y.as_mut_ptr(),
            1,
            rows as isize,
            false,
            x.as_ptr(),
            1,
            cols as isize,
            w.as_ptr(),
            cols as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        )
    }
}

fn main() {
    let (rows, cols) = (3584usize, 1024usize);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let m32 = MatRef::new(WeightsRef::F32(&w), rows, cols).unwrap();
    let mb = MatRef::new(WeightsRef::Bf16(&wb), rows, cols).unwrap();
    for n in [64usize, 128] {
        let x: Vec<f32> = (0..n * cols).map(|i| (i * 31 % 97) as f32 / 48.0 - 1.0).collect();
        let mut y = vec![0f32; n * rows];
        let mut yg = vec![0f32; n * rows];
        let flops = 2.0 * (n * rows * cols) as f64;
        let t_ours = best(5, || matmul(&x, m32, &mut y));
        let t_ours_b = best(5, || matmul(&x, mb, &mut y));
        let t_gemm = best(5, || gemm_f32(&x, n, &w, rows, cols, &mut yg));
        matmul(&x, m32, &mut y);
        let max_diff = y.iter().zip(&yg).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Batch invariance of gemm: token t alone vs in the batch.
        let mut alone = vec![0f32; rows];
        let mut same = 0;
        for t in 0..n {
            gemm_f32(&x[t * cols..(t + 1) * cols], 1, &w, rows, cols, &mut alone);
            same += usize::from(alone[..] == yg[t * rows..(t + 1) * rows]);
        }
        println!(
            "n={n}: hetmoe f32 {:.1} GFLOP/s, hetmoe bf16 {:.1} GFLOP/s, gemm f32 {:.1} GFLOP/s; \
             max |diff| {max_diff:.2e}; gemm batch-invariant for {same}/{n} tokens",
            flops / t_ours / 1e9,
            flops / t_ours_b / 1e9,
            flops / t_gemm / 1e9
        );
    }
}
