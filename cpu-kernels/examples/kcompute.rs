//! Kernel compute rate with the weights in L2 (one 256 × 1024 matrix per format, one
//! thread): how fast a kernel is when memory is not the limit, in weights per second and in
//! weight bytes per second (a call with n tokens counts each weight once). Where the byte rate is not well above one core's share of DRAM
//! bandwidth, the kernel, not memory, bounds decode (q4 `axpy` on this VM).
//! `cargo run --release -p hetmoe-cpu-kernels --example kcompute` (`HETMOE_ISA` forces a path).
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use half::bf16;
use hetmoe_cpu_kernels::matmul::{axpy_rows, matmul, MatRef, WeightsRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};

const ROWS: usize = 256;
const COLS: usize = 1024;
const CALLS: usize = 2000;

/// Best of five rounds of `CALLS` calls, in weights per second (G).
fn best(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..CALLS {
                f();
            }
            (CALLS * ROWS * COLS) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

fn main() {
    let w: Vec<f32> = (0..ROWS * COLS).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    let wb: Vec<bf16> = w.iter().map(|&a| bf16::from_f32(a)).collect();
    let mut q8 = vec![BlockQ8 { d: half::f16::ZERO, qs: [0; QK] }; w.len() / QK];
    quantize_q8(&w, &mut q8);
    let mut q4 = vec![BlockQ4 { d: half::f16::ZERO, qs: [0; QK / 2] }; w.len() / QK];
    quantize_q4(&w, &mut q4);
    let (x, a) = (vec![0.5f32; 8 * COLS], vec![0.5f32; 8 * ROWS]);
    let (mut y, mut o) = (vec![0f32; 8 * ROWS], vec![0f32; 8 * COLS]);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    println!("isa {:?}, one thread, {ROWS} x {COLS} weights", hetmoe_cpu_kernels::active_isa());
    pool.install(|| {
        for (name, data) in [("bf16", WeightsRef::Bf16(&wb)), ("q8", WeightsRef::Q8(&q8)), ("q4", WeightsRef::Q4(&q4))] {
            let m = MatRef::new(data, ROWS, COLS).unwrap();
            let bytes_per_weight = m.size_bytes() as f64 / (ROWS * COLS) as f64;
            for n in [1usize, 8] {
                let mv = best(|| matmul(&x[..n * COLS], m, &mut y[..n * ROWS]));
                let ax = best(|| axpy_rows(&a[..n * ROWS], m, &mut o[..n * COLS]));
                println!(
                    "{name:4} {n} token(s): matvec {mv:5.1} Gw/s ({:5.1} GB/s), axpy {ax:5.1} Gw/s ({:5.1} GB/s)",
                    mv * bytes_per_weight,
                    ax * bytes_per_weight
                );
            }
        }
    });
}
