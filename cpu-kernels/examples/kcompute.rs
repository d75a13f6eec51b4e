//! The compute ceiling of each one-token kernel: one thread, weights small enough to stay in
//! L2 (256 × 1024 weights), so no DRAM in the way. It prints weights per nanosecond, the
//! GB/s that speed would read, and weights per clock cycle (the clock measured with a chain
//! of dependent adds). A kernel whose GB/s here is not well above the machine's per-core
//! DRAM bandwidth is compute-bound in decode.
//!
//! `cargo run --release -p hetmoe-cpu-kernels --example kcompute [rounds]`
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use half::bf16;
use hetmoe_cpu_kernels::matmul::{axpy_rows, matmul, MatRef, WeightsRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, pair_groups, GroupKind, GroupedRef};
use hetmoe_cpu_kernels::row_tiles::{self, TileKind};

const H: usize = 1024;
const ROWS: usize = 256;

/// Clock cycles per second, from a chain of dependent adds (one a cycle on x86; elsewhere
/// the loop's own rate, so the cycle column is only indicative there).
fn clock_hz() -> f64 {
    let n = 500_000_000u64;
    let t = Instant::now();
    let mut x = 0u64;
    for _ in 0..n {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: one register add; no memory, stack or flags another instruction relies on.
        unsafe {
            std::arch::asm!("add {0}, 1", inout(reg) x, options(nomem, nostack));
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            x = std::hint::black_box(x + 1);
        }
    }
    std::hint::black_box(x);
    n as f64 / t.elapsed().as_secs_f64()
}

/// Nanoseconds per call of `f`, the best of several 50 ms batches.
fn ns_per_call(mut f: impl FnMut()) -> f64 {
    for _ in 0..50 {
        f();
    }
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < 0.05 {
            for _ in 0..16 {
                f();
            }
            n += 16;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    best
}

fn main() {
    let rounds: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let w: Vec<f32> = (0..ROWS * H).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    let wb: Vec<bf16> = w.iter().map(|&a| bf16::from_f32(a)).collect();
    let mut q8 = vec![BlockQ8 { d: half::f16::ZERO, qs: [0; QK] }; w.len() / QK];
    quantize_q8(&w, &mut q8);
    let mut q4 = vec![BlockQ4 { d: half::f16::ZERO, qs: [0; QK / 2] }; w.len() / QK];
    quantize_q4(&w, &mut q4);
    let mut t8 = vec![0u8; TileKind::Q8.matrix_bytes(ROWS, H)];
    row_tiles::tile_q8_rows(&q8, ROWS, H, &mut t8);
    let mut t4 = vec![0u8; TileKind::Q4.matrix_bytes(ROWS, H)];
    row_tiles::tile_q4_rows(&q4, ROWS, H, &mut t4);
    let mut g8 = vec![0u8; GroupKind::Q8.matrix_bytes(ROWS, H)];
    group_q8_rows(&q8, ROWS, H, &mut g8);
    let mut g4 = vec![0u8; GroupKind::Q4.matrix_bytes(ROWS, H)];
    group_q4_rows(&q4, ROWS, H, &mut g4);
    let mut p8 = vec![0u8; g8.len()];
    pair_groups(GroupKind::Q8, ROWS, H, &g8, &mut p8);
    let mut p4 = vec![0u8; g4.len()];
    pair_groups(GroupKind::Q4, ROWS, H, &g4, &mut p4);

    let mats: Vec<(&str, MatRef<'_>)> = vec![
        ("matvec bf16", MatRef::new(WeightsRef::Bf16(&wb), ROWS, H).unwrap()),
        ("matvec q8 rows", MatRef::new(WeightsRef::Q8(&q8), ROWS, H).unwrap()),
        ("matvec q8 tiles", MatRef::new(WeightsRef::Q8Tiles(&t8), ROWS, H).unwrap()),
        ("matvec q4 rows", MatRef::new(WeightsRef::Q4(&q4), ROWS, H).unwrap()),
        ("matvec q4 tiles", MatRef::new(WeightsRef::Q4Tiles(&t4), ROWS, H).unwrap()),
    ];
    let axpys: Vec<(&str, GroupedRef<'_>)> = vec![
        ("axpy q8 groups", GroupedRef::new(GroupKind::Q8, &g8, ROWS, H).unwrap()),
        ("axpy q8 paired", GroupedRef::paired(GroupKind::Q8, &p8, ROWS, H).unwrap()),
        ("axpy q4 groups", GroupedRef::new(GroupKind::Q4, &g4, ROWS, H).unwrap()),
        ("axpy q4 paired", GroupedRef::paired(GroupKind::Q4, &p4, ROWS, H).unwrap()),
    ];
    let axpy_bf16 = MatRef::new(WeightsRef::Bf16(&wb), ROWS, H).unwrap();
    let x = vec![0.5f32; H];
    let a = vec![0.25f32; ROWS];
    let mut y = vec![0f32; ROWS];
    let mut out = vec![0f32; H];
    let hz = clock_hz();
    println!("clock {:.2} GHz, one thread, {ROWS} x {H} weights (in L2)", hz / 1e9);
    let report = |name: &str, bytes: usize, ns: f64| {
        let wpn = (ROWS * H) as f64 / ns;
        println!(
            "{name:16} {ns:8.0} ns  {wpn:5.2} weights/ns  {:6.1} GB/s  {:5.2} weights/cycle",
            bytes as f64 / ns,
            wpn * 1e9 / hz
        );
    };
    pool.install(|| {
        for r in 0..rounds {
            println!("round {r}");
            for (name, m) in &mats {
                report(name, m.size_bytes(), ns_per_call(|| matmul(&x, *m, &mut y)));
            }
            report("axpy bf16", axpy_bf16.size_bytes(), ns_per_call(|| axpy_rows(&a, axpy_bf16, &mut out)));
            for (name, g) in &axpys {
                report(name, g.size_bytes(), ns_per_call(|| axpy_rows(&a, *g, &mut out)));
            }
        }
    });
}
