//! q8 weights in row tiles ([`hetmoe_cpu_kernels::row_tiles`]): the matmul over them gives
//! the same bits as over the same weights row by row, on every ISA the CPU has, for awkward
//! shapes, batches, row ranges, thread counts and the fused expert; and the layout
//! round-trips.
#![allow(clippy::unwrap_used)]

use half::f16;
use hetmoe_cpu_kernels::matmul::{matmul_with, MatRef, WeightsRef};
use hetmoe_cpu_kernels::moe::{expert_swiglu_with, ExpertRef};
use hetmoe_cpu_kernels::quant::{quantize_q8, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q8_rows, GroupKind, GroupedRef};
use hetmoe_cpu_kernels::row_tiles::{matrix_bytes, tile_q8_rows, untile_q8_row};
use hetmoe_cpu_kernels::{Isa, KernelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// A random q8 matrix, row by row and in tiles.
fn q8_pair(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> (Vec<BlockQ8>, Vec<u8>) {
    let mut q8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; rows * cols / QK];
    quantize_q8(&rand_vec(rng, rows * cols), &mut q8);
    let mut tiles = vec![0u8; matrix_bytes(rows, cols)];
    tile_q8_rows(&q8, rows, cols, &mut tiles);
    (q8, tiles)
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.is_supported()).collect()
}

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn layout_round_trips() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (rows, cols) in [(1, 32), (3, 96), (4, 128), (5, 160), (7, 224), (9, 64), (13, 320)] {
        let (q8, tiles) = q8_pair(&mut rng, rows, cols);
        let nb = cols / QK;
        let mut row = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; nb];
        for r in 0..rows {
            untile_q8_row(&tiles, rows, cols, r, &mut row);
            assert_eq!(row, q8[r * nb..(r + 1) * nb], "row {r} of {rows}x{cols}");
        }
        // And row_to_f32 reads tiles like rows.
        let (a, b) = (
            MatRef::new(WeightsRef::Q8(&q8), rows, cols).unwrap(),
            MatRef::new(WeightsRef::Q8Tiles(&tiles), rows, cols).unwrap(),
        );
        let (mut fa, mut fb) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            a.row_to_f32(r, &mut fa);
            b.row_to_f32(r, &mut fb);
            assert_eq!(bits(&fa), bits(&fb));
        }
    }
}

#[test]
fn tiled_matmul_matches_rows_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // Block counts 1..9 cover every tail of a four-block step; row counts every tail tile.
    for (rows, cols) in
        [(1, 32), (2, 64), (3, 96), (4, 128), (5, 160), (6, 192), (7, 224), (8, 256), (11, 288)]
    {
        let (q8, tiles) = q8_pair(&mut rng, rows, cols);
        let a = MatRef::new(WeightsRef::Q8(&q8), rows, cols).unwrap();
        let b = MatRef::new(WeightsRef::Q8Tiles(&tiles), rows, cols).unwrap();
        for n in [1usize, 2, 3, 4, 5, 9] {
            let x = rand_vec(&mut rng, n * cols);
            for isa in isas() {
                let (mut ya, mut yb) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                matmul_with(isa, &x, a, &mut ya);
                matmul_with(isa, &x, b, &mut yb);
                assert_eq!(bits(&ya), bits(&yb), "{} {rows}x{cols} n{n}", isa.name());
            }
        }
    }
}

#[test]
fn tiled_matmul_is_thread_count_independent_on_big_matrices() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, cols) = (1030, 480);
    let (q8, tiles) = q8_pair(&mut rng, rows, cols);
    let a = MatRef::new(WeightsRef::Q8(&q8), rows, cols).unwrap();
    let b = MatRef::new(WeightsRef::Q8Tiles(&tiles), rows, cols).unwrap();
    for n in [1usize, 7] {
        let x = rand_vec(&mut rng, n * cols);
        for isa in isas() {
            let mut want = vec![0f32; n * rows];
            matmul_with(isa, &x, a, &mut want);
            for threads in [1, 2, 3] {
                let mut got = vec![0f32; n * rows];
                pool(threads).install(|| matmul_with(isa, &x, b, &mut got));
                assert_eq!(bits(&got), bits(&want), "{} n{n} threads {threads}", isa.name());
            }
        }
    }
}

#[test]
fn tiled_row_ranges_follow_tiles() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (rows, cols) = (10, 64);
    let (q8, tiles) = q8_pair(&mut rng, rows, cols);
    let a = MatRef::new(WeightsRef::Q8(&q8), rows, cols).unwrap();
    let b = MatRef::new(WeightsRef::Q8Tiles(&tiles), rows, cols).unwrap();
    let x = rand_vec(&mut rng, cols);
    for (s, e) in [(0, 4), (4, 8), (8, 10), (4, 10), (0, 10)] {
        for isa in isas() {
            let (mut ya, mut yb) = (vec![0f32; e - s], vec![0f32; e - s]);
            matmul_with(isa, &x, a.row_range(s, e), &mut ya);
            matmul_with(isa, &x, b.row_range(s, e), &mut yb);
            assert_eq!(bits(&ya), bits(&yb), "{} rows {s}..{e}", isa.name());
        }
    }
    let cut = std::panic::catch_unwind(|| b.row_range(2, 6));
    assert!(cut.is_err(), "a row range inside a tile must be refused");
}

#[test]
fn tiled_weights_take_no_stride() {
    let tiles = vec![0u8; matrix_bytes(4, 64)];
    assert!(matches!(
        MatRef::strided(WeightsRef::Q8Tiles(&tiles), 2, 64, 128),
        Err(KernelError::QuantizedShape { .. })
    ));
    assert!(matches!(
        MatRef::new(WeightsRef::Q8Tiles(&tiles[..100]), 4, 64),
        Err(KernelError::WeightLength { .. })
    ));
}

#[test]
fn expert_over_tiled_gate_up_matches_rows() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (ffn, hidden) = (200, 96);
    let (gu8, gu_tiles) = q8_pair(&mut rng, 2 * ffn, hidden);
    let mut d8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; ffn * hidden / QK];
    quantize_q8(&rand_vec(&mut rng, ffn * hidden), &mut d8);
    let mut g8 = vec![0u8; GroupKind::Q8.matrix_bytes(ffn, hidden)];
    group_q8_rows(&d8, ffn, hidden, &mut g8);
    let down_t = GroupedRef::new(GroupKind::Q8, &g8, ffn, hidden).unwrap();
    let rows = MatRef::new(WeightsRef::Q8(&gu8), 2 * ffn, hidden).unwrap();
    let tiled = MatRef::new(WeightsRef::Q8Tiles(&gu_tiles), 2 * ffn, hidden).unwrap();
    for n in [1usize, 3, 6] {
        let x = rand_vec(&mut rng, n * hidden);
        for isa in isas() {
            let mut act = vec![0f32; 2 * n * ffn];
            let (mut ya, mut yb) = (vec![0f32; n * hidden], vec![0f32; n * hidden]);
            expert_swiglu_with(isa, &x, ExpertRef::interleaved(rows, down_t).unwrap(), &mut act, &mut ya);
            for threads in [1, 2] {
                pool(threads).install(|| {
                    expert_swiglu_with(
                        isa,
                        &x,
                        ExpertRef::interleaved(tiled, down_t).unwrap(),
                        &mut act,
                        &mut yb,
                    )
                });
                assert_eq!(bits(&ya), bits(&yb), "{} n{n} threads {threads}", isa.name());
            }
        }
    }
}
