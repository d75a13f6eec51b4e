//! q8 / q4 weights in row tiles ([`hetmoe_cpu_kernels::row_tiles`]): the matmul over them gives
//! the same bits as over the same weights row by row, on every ISA the CPU has, for awkward
//! shapes, batches, row ranges, thread counts and the fused expert; and the layout
//! round-trips.
#![allow(clippy::unwrap_used)]

use half::f16;
use hetmoe_cpu_kernels::matmul::{dot_row, matmul_with, MatRef, WeightsRef};
use hetmoe_cpu_kernels::moe::{expert_swiglu_with, ExpertRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, GroupKind, GroupedRef};
use hetmoe_cpu_kernels::row_tiles::{tile_q4_rows, tile_q8_rows, untile_q4_row, untile_q8_row, TileKind};
use hetmoe_cpu_kernels::{Isa, KernelError, Streaming};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// A random matrix quantized to q8 and q4, each row by row and in tiles.
struct Quant {
    q8: Vec<BlockQ8>,
    q4: Vec<BlockQ4>,
    t8: Vec<u8>,
    t4: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Quant {
    fn new(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Quant {
        let v = rand_vec(rng, rows * cols);
        let mut q8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; rows * cols / QK];
        let mut q4 = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; rows * cols / QK];
        quantize_q8(&v, &mut q8);
        quantize_q4(&v, &mut q4);
        let mut t8 = vec![0u8; TileKind::Q8.matrix_bytes(rows, cols)];
        let mut t4 = vec![0u8; TileKind::Q4.matrix_bytes(rows, cols)];
        tile_q8_rows(&q8, rows, cols, &mut t8);
        tile_q4_rows(&q4, rows, cols, &mut t4);
        Quant { q8, q4, t8, t4, rows, cols }
    }
    /// (row-major, tiled) views of one kind.
    fn pair(&self, kind: TileKind) -> (MatRef<'_>, MatRef<'_>) {
        let (a, b) = match kind {
            TileKind::Q8 => (WeightsRef::Q8(&self.q8), WeightsRef::Q8Tiles(&self.t8)),
            TileKind::Q4 => (WeightsRef::Q4(&self.q4), WeightsRef::Q4Tiles(&self.t4)),
        };
        (MatRef::new(a, self.rows, self.cols).unwrap(), MatRef::new(b, self.rows, self.cols).unwrap())
    }
}

const KINDS: [TileKind; 2] = [TileKind::Q8, TileKind::Q4];

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
        let m = Quant::new(&mut rng, rows, cols);
        let nb = cols / QK;
        let mut r8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; nb];
        let mut r4 = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; nb];
        for r in 0..rows {
            untile_q8_row(&m.t8, rows, cols, r, &mut r8);
            assert_eq!(r8, m.q8[r * nb..(r + 1) * nb], "q8 row {r} of {rows}x{cols}");
            untile_q4_row(&m.t4, rows, cols, r, &mut r4);
            assert_eq!(r4, m.q4[r * nb..(r + 1) * nb], "q4 row {r} of {rows}x{cols}");
        }
        // And row_to_f32 reads tiles like rows.
        for kind in KINDS {
            let (a, b) = m.pair(kind);
            let (mut fa, mut fb) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                a.row_to_f32(r, &mut fa);
                b.row_to_f32(r, &mut fb);
                assert_eq!(bits(&fa), bits(&fb));
            }
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
        let m = Quant::new(&mut rng, rows, cols);
        for n in [1usize, 2, 3, 4, 5, 9] {
            let x = rand_vec(&mut rng, n * cols);
            for (kind, isa) in KINDS.into_iter().flat_map(|k| isas().into_iter().map(move |i| (k, i))) {
                let (a, b) = m.pair(kind);
                let (mut ya, mut yb) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                matmul_with(isa, &x, a, &mut ya);
                matmul_with(isa, &x, b, &mut yb);
                assert_eq!(bits(&ya), bits(&yb), "{kind:?} {} {rows}x{cols} n{n}", isa.name());
            }
        }
    }
}

#[test]
fn tiled_matmul_is_thread_count_independent_on_big_matrices() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, cols) = (1030, 480);
    let m = Quant::new(&mut rng, rows, cols);
    for n in [1usize, 7] {
        let x = rand_vec(&mut rng, n * cols);
        for (kind, isa) in KINDS.into_iter().flat_map(|k| isas().into_iter().map(move |i| (k, i))) {
            let (a, b) = m.pair(kind);
            let mut want = vec![0f32; n * rows];
            matmul_with(isa, &x, a, &mut want);
            for threads in [1, 2, 3] {
                let mut got = vec![0f32; n * rows];
                pool(threads).install(|| matmul_with(isa, &x, b, &mut got));
                assert_eq!(bits(&got), bits(&want), "{kind:?} {} n{n} threads {threads}", isa.name());
            }
        }
    }
}

#[test]
fn tiled_row_ranges_follow_tiles() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (rows, cols) = (10, 160);
    let m = Quant::new(&mut rng, rows, cols);
    let x = rand_vec(&mut rng, cols);
    for kind in KINDS {
        let (a, b) = m.pair(kind);
        for (s, e) in [(0, 4), (4, 8), (8, 10), (4, 10), (0, 10)] {
            for isa in isas() {
                let (mut ya, mut yb) = (vec![0f32; e - s], vec![0f32; e - s]);
                matmul_with(isa, &x, a.row_range(s, e), &mut ya);
                matmul_with(isa, &x, b.row_range(s, e), &mut yb);
                assert_eq!(bits(&ya), bits(&yb), "{kind:?} {} rows {s}..{e}", isa.name());
                for r in 0..e - s {
                    let one = dot_row(isa, &x, b.row_range(s, e), r);
                    assert_eq!(
                        one.to_bits(),
                        ya[r].to_bits(),
                        "{kind:?} {} dot_row {r} of {s}..{e}",
                        isa.name()
                    );
                }
            }
        }
        let cut = std::panic::catch_unwind(|| b.row_range(2, 6));
        assert!(cut.is_err(), "a row range inside a tile must be refused");
    }
}

#[test]
fn tiled_weights_take_no_stride() {
    let tiles = vec![0u8; TileKind::Q8.matrix_bytes(4, 64)];
    for w in [WeightsRef::Q8Tiles(&tiles), WeightsRef::Q4Tiles(&tiles[..TileKind::Q4.matrix_bytes(4, 64)])] {
        assert!(matches!(MatRef::strided(w, 2, 64, 128), Err(KernelError::QuantizedShape { .. })));
    }
    assert!(matches!(
        MatRef::new(WeightsRef::Q8Tiles(&tiles[..100]), 4, 64),
        Err(KernelError::WeightLength { .. })
    ));
}

#[test]
fn expert_over_tiled_gate_up_matches_rows() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (ffn, hidden) = (200, 160);
    let gu = Quant::new(&mut rng, 2 * ffn, hidden);
    let v = rand_vec(&mut rng, ffn * hidden);
    let mut d8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; ffn * hidden / QK];
    let mut d4 = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; ffn * hidden / QK];
    quantize_q8(&v, &mut d8);
    quantize_q4(&v, &mut d4);
    let mut g8 = vec![0u8; GroupKind::Q8.matrix_bytes(ffn, hidden)];
    let mut g4 = vec![0u8; GroupKind::Q4.matrix_bytes(ffn, hidden)];
    group_q8_rows(&d8, ffn, hidden, &mut g8);
    group_q4_rows(&d4, ffn, hidden, &mut g4);
    for kind in KINDS {
        let down_t = match kind {
            TileKind::Q8 => GroupedRef::new(GroupKind::Q8, &g8, ffn, hidden).unwrap(),
            TileKind::Q4 => GroupedRef::new(GroupKind::Q4, &g4, ffn, hidden).unwrap(),
        };
        let (rows, tiled) = gu.pair(kind);
        for n in [1usize, 3, 6] {
            let x = rand_vec(&mut rng, n * hidden);
            for isa in isas() {
                let mut act = vec![0f32; 2 * n * ffn];
                let (mut ya, mut yb) = (vec![0f32; n * hidden], vec![0f32; n * hidden]);
                expert_swiglu_with(isa, &x, ExpertRef::interleaved(rows, down_t).unwrap(), &mut act, &mut ya);
                for threads in [1, 2] {
                    let e = ExpertRef::interleaved(tiled, down_t).unwrap();
                    pool(threads).install(|| expert_swiglu_with(isa, &x, e, &mut act, &mut yb));
                    assert_eq!(bits(&ya), bits(&yb), "{kind:?} {} n{n} threads {threads}", isa.name());
                }
            }
        }
    }
}

/// Both [`Streaming`] modes give the same bits: the one-token matmul over row-major rows
/// (two rows or one at a time), over row tiles (with or without software prefetches), and
/// the grouped `axpy`. (Forcing the process-wide mode cannot disturb tests running beside
/// this one: it changes only their speed.)
#[test]
fn streaming_changes_no_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (rows, cols) = (71, 352);
    let m = Quant::new(&mut rng, rows, cols);
    let x = rand_vec(&mut rng, cols);
    let a = rand_vec(&mut rng, rows);
    let wb: Vec<half::bf16> = rand_vec(&mut rng, rows * cols).into_iter().map(half::bf16::from_f32).collect();
    let bf16 = MatRef::new(WeightsRef::Bf16(&wb), rows, cols).unwrap();
    let mut g8 = vec![0u8; GroupKind::Q8.matrix_bytes(rows, cols)];
    let mut g4 = vec![0u8; GroupKind::Q4.matrix_bytes(rows, cols)];
    group_q8_rows(&m.q8, rows, cols, &mut g8);
    group_q4_rows(&m.q4, rows, cols, &mut g4);
    let grouped = [
        GroupedRef::new(GroupKind::Q8, &g8, rows, cols).unwrap(),
        GroupedRef::new(GroupKind::Q4, &g4, rows, cols).unwrap(),
    ];
    let run = |isa: Isa| {
        let mut out = Vec::new();
        let mats = KINDS.into_iter().flat_map(|k| {
            let (a, b) = m.pair(k);
            [a, b]
        });
        for w in mats.chain([bf16]) {
            let mut y = vec![0f32; rows];
            matmul_with(isa, &x, w, &mut y);
            out.extend(bits(&y));
        }
        for g in grouped {
            let mut y = vec![0.5f32; cols];
            hetmoe_cpu_kernels::matmul::axpy_rows_with(isa, &a, g, &mut y);
            out.extend(bits(&y));
        }
        out
    };
    let before = hetmoe_cpu_kernels::streaming();
    for isa in isas() {
        hetmoe_cpu_kernels::force_streaming(Streaming::Prefetched);
        let prefetched = run(isa);
        hetmoe_cpu_kernels::force_streaming(Streaming::Sequential);
        let sequential = run(isa);
        assert_eq!(prefetched, sequential, "{}", isa.name());
    }
    hetmoe_cpu_kernels::force_streaming(before);
}
