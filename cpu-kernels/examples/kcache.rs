//! In-cache single-thread kernel speed per ISA (compute efficiency, not bandwidth).
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use half::bf16;
use hetmoe_cpu_kernels::matmul::{axpy_rows_with, matmul_with, AxpyRef, MatRef, WeightsRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, pair_groups, GroupKind, GroupedRef};
use hetmoe_cpu_kernels::row_tiles::{self, TileKind};
use hetmoe_cpu_kernels::Isa;

fn main() {
    let (rows, cols) = (256usize, 1024usize);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    let wb: Vec<bf16> = w.iter().map(|&a| bf16::from_f32(a)).collect();
    let mut q8 = vec![BlockQ8 { d: half::f16::ZERO, qs: [0; QK] }; w.len() / QK];
    quantize_q8(&w, &mut q8);
    let mut q4 = vec![BlockQ4 { d: half::f16::ZERO, qs: [0; QK / 2] }; w.len() / QK];
    quantize_q4(&w, &mut q4);
    let mut g8 = vec![0u8; GroupKind::Q8.matrix_bytes(rows, cols)];
    group_q8_rows(&q8, rows, cols, &mut g8);
    let mut g4 = vec![0u8; GroupKind::Q4.matrix_bytes(rows, cols)];
    group_q4_rows(&q4, rows, cols, &mut g4);
    let mut t8 = vec![0u8; TileKind::Q8.matrix_bytes(rows, cols)];
    row_tiles::tile_q8_rows(&q8, rows, cols, &mut t8);
    let mut t4 = vec![0u8; TileKind::Q4.matrix_bytes(rows, cols)];
    row_tiles::tile_q4_rows(&q4, rows, cols, &mut t4);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let x = vec![0.5f32; 64 * cols];
    let mut y = vec![0f32; 64 * rows];
    let mut o = vec![0f32; 64 * cols];
    pool.install(|| {
        for isa in Isa::all_supported().into_iter().skip(1) {
            for (name, d) in [
                ("f32", WeightsRef::F32(&w)),
                ("bf16", WeightsRef::Bf16(&wb)),
                ("q8", WeightsRef::Q8(&q8)),
                ("q4", WeightsRef::Q4(&q4)),
                ("q8t", WeightsRef::Q8Tiles(&t8)),
                ("q4t", WeightsRef::Q4Tiles(&t4)),
            ] {
                let m = MatRef::new(d, rows, cols).unwrap();
                let mut line = format!("{isa:?} {name:5}");
                for n in [1usize, 2, 4, 8, 32] {
                    let reps = 2000 / n;
                    let t = Instant::now();
                    for _ in 0..reps {
                        matmul_with(isa, &x[..n * cols], m, &mut y[..n * rows]);
                    }
                    let s = t.elapsed().as_secs_f64();
                    line += &format!(" n{n}: {:6.1} GFMA/s", (reps * n * rows * cols) as f64 / s / 1e9);
                }
                if name.ends_with('t') {
                    // Row tiles are a matvec layout (no axpy over them).
                    println!("{line}");
                    continue;
                }
                // G weights/s of the `axpy` over `w` for 1, 8 and 32 tokens.
                let mut axpy = |label: &str, w: AxpyRef<'_>| {
                    for n in [1usize, 8, 32] {
                        let reps = 2000 / n;
                        let t = Instant::now();
                        for _ in 0..reps {
                            axpy_rows_with(isa, &y[..n * rows], w, &mut o[..n * cols]);
                        }
                        let s = t.elapsed().as_secs_f64();
                        let head = if n == 1 { format!(" {label} n1") } else { format!(" n{n}") };
                        line += &format!("{head}: {:6.1}", (reps * n * rows * cols) as f64 / s / 1e9);
                    }
                };
                axpy("axpy", m.into());
                let grouped = match name {
                    "q8" => Some(GroupedRef::new(GroupKind::Q8, &g8, rows, cols).unwrap()),
                    "q4" => Some(GroupedRef::new(GroupKind::Q4, &g4, rows, cols).unwrap()),
                    _ => None,
                };
                if let Some(g) = grouped {
                    // Quantized downᵀ (integer dot products): plain groups (the expert store's
                    // layout), then in pairs (the engine's).
                    let mut paired = vec![0u8; g.data().len()];
                    pair_groups(g.kind(), rows, cols, g.data(), &mut paired);
                    let p = GroupedRef::paired(g.kind(), &paired, rows, cols).unwrap();
                    axpy("grouped axpy", g.into());
                    axpy("paired axpy", p.into());
                }
                println!("{line}");
            }
        }
    });
}
