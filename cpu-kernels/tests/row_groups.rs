//! The grouped quantized `axpy` (quantized `downᵀ` in groups of four rows, integer dot
//! products): every ISA against the scalar oracle, the determinism contract, its accuracy
//! against the float `axpy` over the same weights, and the fused expert over it.
#![allow(clippy::unwrap_used)]

use half::f16;
use hetmoe_cpu_kernels::matmul::{axpy_rows_with, MatRef, WeightsRef};
use hetmoe_cpu_kernels::moe::{expert_swiglu_unfused_with, expert_swiglu_with, ExpertRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, pair_groups, GroupKind, GroupedRef};
use hetmoe_cpu_kernels::Isa;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// One quantized matrix as rows of blocks and in groups (the same weights).
struct Quant {
    q8: Vec<BlockQ8>,
    q4: Vec<BlockQ4>,
    g8: Vec<u8>,
    g4: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Quant {
    fn new(v: &[f32], rows: usize, cols: usize) -> Quant {
        let nb = rows * cols / QK;
        let mut q8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; nb];
        let mut q4 = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; nb];
        quantize_q8(v, &mut q8);
        quantize_q4(v, &mut q4);
        let mut g8 = vec![0u8; GroupKind::Q8.matrix_bytes(rows, cols)];
        let mut g4 = vec![0u8; GroupKind::Q4.matrix_bytes(rows, cols)];
        group_q8_rows(&q8, rows, cols, &mut g8);
        group_q4_rows(&q4, rows, cols, &mut g4);
        Quant { q8, q4, g8, g4, rows, cols }
    }
    fn grouped(&self, kind: GroupKind) -> GroupedRef<'_> {
        let data = if kind == GroupKind::Q8 { &self.g8 } else { &self.g4 };
        GroupedRef::new(kind, data, self.rows, self.cols).unwrap()
    }
    fn rows_of(&self, kind: GroupKind) -> MatRef<'_> {
        let w = if kind == GroupKind::Q8 { WeightsRef::Q8(&self.q8) } else { WeightsRef::Q4(&self.q4) };
        MatRef::new(w, self.rows, self.cols).unwrap()
    }
}

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()
}

const KINDS: [GroupKind; 2] = [GroupKind::Q8, GroupKind::Q4];

/// Relative error norm `‖got − want‖ / ‖want‖`.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut e, mut n) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        e += (g as f64 - w as f64).powi(2);
        n += (w as f64).powi(2);
    }
    (e / n.max(1e-30)).sqrt()
}

#[test]
fn grouped_axpy_matches_scalar_and_is_batch_and_thread_invariant() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Rows: under a group, one group, odd, several 128-row blocks; columns: one block, a
    // chunk of 64 blocks plus one (2080), and a real hidden size.
    let shapes =
        [(0, 32), (5, 0), (1, 32), (3, 64), (4, 32), (9, 96), (37, 64), (128, 2080), (133, 256), (333, 1024)];
    for (rows, cols) in shapes {
        let m = Quant::new(&rand_vec(&mut rng, rows * cols), rows, cols);
        for kind in KINDS {
            // From an odd address: the kernels' loads are unaligned.
            let bytes = if kind == GroupKind::Q8 { &m.g8 } else { &m.g4 };
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(bytes);
            let w = GroupedRef::new(kind, &shifted[1..], rows, cols).unwrap();
            for n in [1, 2, 5] {
                let a = rand_vec(&mut rng, n * rows);
                let mut want = vec![0f32; n * cols];
                axpy_rows_with(Isa::Scalar, &a, w, &mut want);
                // The float axpy over the same weights: only the activation rounding differs.
                let mut float = vec![0f32; n * cols];
                axpy_rows_with(Isa::Scalar, &a, m.rows_of(kind), &mut float);
                let e = rel_err(&want, &float);
                assert!(e < 0.01, "{kind:?} {rows}x{cols} n {n}: {e} against the float axpy");
                for isa in Isa::all_supported() {
                    let mut got = vec![0f32; n * cols];
                    axpy_rows_with(isa, &a, w, &mut got);
                    if rows <= 128 {
                        // One block of rows: the same sums in the same order as the oracle.
                        assert_eq!(got, want, "{isa:?} {kind:?} {rows}x{cols} n {n}");
                    } else {
                        let e = rel_err(&got, &want);
                        assert!(e < 1e-6, "{isa:?} {kind:?} {rows}x{cols} n {n}: {e}");
                    }
                    for t in 0..n {
                        let mut alone = vec![0f32; cols];
                        axpy_rows_with(isa, &a[t * rows..(t + 1) * rows], w, &mut alone);
                        assert_eq!(alone, got[t * cols..(t + 1) * cols], "{isa:?} {kind:?} batch t {t}");
                    }
                    for threads in [2, 3] {
                        let again = pool(threads).install(|| {
                            let mut y = vec![0f32; n * cols];
                            axpy_rows_with(isa, &a, w, &mut y);
                            y
                        });
                        assert_eq!(again, got, "{isa:?} {kind:?} threads {threads}");
                    }
                }
            }
        }
    }
}

#[test]
fn grouped_axpy_keeps_non_finite_activations() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (rows, cols) = (9, 64);
    let m = Quant::new(&rand_vec(&mut rng, rows * cols), rows, cols);
    for kind in KINDS {
        for bad in [f32::NAN, f32::INFINITY] {
            let mut a = rand_vec(&mut rng, 2 * rows);
            a[rows + 5] = bad; // token 1 only
            for isa in Isa::all_supported() {
                let mut y = vec![0f32; 2 * cols];
                axpy_rows_with(isa, &a, m.grouped(kind), &mut y);
                assert!(y[..cols].iter().all(|v| v.is_finite()), "{isa:?} {kind:?} {bad}: clean token");
                assert!(y[cols..].iter().all(|v| v.is_nan()), "{isa:?} {kind:?} {bad}");
            }
        }
    }
}

#[test]
fn fused_expert_over_grouped_down_is_deterministic() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for (ffn, hidden) in [(1, 32), (37, 64), (200, 96), (130, 256)] {
        let parts: Vec<Quant> = (0..3)
            .map(|_| {
                let v: Vec<f32> = rand_vec(&mut rng, ffn * hidden).iter().map(|a| a * 0.2).collect();
                Quant::new(&v, ffn, hidden)
            })
            .collect();
        for kind in KINDS {
            let e = ExpertRef::new(parts[0].rows_of(kind), parts[1].rows_of(kind), parts[2].grouped(kind))
                .unwrap();
            let n = 7;
            let x = rand_vec(&mut rng, n * hidden);
            let run = |isa: Isa, x: &[f32], fused: bool| {
                let nt = x.len() / hidden;
                let (mut act, mut out) = (vec![f32::NAN; 2 * nt * ffn], vec![f32::NAN; nt * hidden]);
                if fused {
                    expert_swiglu_with(isa, x, e, &mut act, &mut out);
                } else {
                    expert_swiglu_unfused_with(isa, x, e, &mut act, &mut out);
                }
                out
            };
            let oracle = run(Isa::Scalar, &x, false);
            for isa in Isa::all_supported() {
                let fused = run(isa, &x, true);
                assert_eq!(fused, run(isa, &x, false), "{isa:?} {kind:?} fused vs unfused");
                for t in 0..n {
                    let one = run(isa, &x[t * hidden..(t + 1) * hidden], true);
                    assert_eq!(one, fused[t * hidden..(t + 1) * hidden], "{isa:?} {kind:?} batch t {t}");
                }
                for threads in [1, 2, 3] {
                    assert_eq!(
                        pool(threads).install(|| run(isa, &x, true)),
                        fused,
                        "{isa:?} {kind:?} {threads}"
                    );
                }
                // SIMD gate/up round differently from scalar, which can move an activation's
                // 8-bit rounding by a step; the outputs stay within that.
                let err = rel_err(&fused, &oracle);
                assert!(err < 2e-3, "{isa:?} {kind:?} {ffn}x{hidden}: {err}");
            }
        }
    }
}

/// Paired groups (the engine's in-memory `downᵀ`) hold the same weights as plain groups and
/// give the same bits on every ISA, for one token and several, odd group counts included,
/// whole and cut at pairs, at any thread count; the expert over them too.
#[test]
fn paired_groups_match_plain_groups_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for (rows, cols) in [(1, 32), (4, 64), (7, 96), (8, 32), (12, 64), (37, 64), (133, 256), (264, 1024)] {
        let m = Quant::new(&rand_vec(&mut rng, rows * cols), rows, cols);
        for kind in KINDS {
            let plain = m.grouped(kind);
            let mut bytes = vec![0u8; plain.data().len()];
            pair_groups(kind, rows, cols, plain.data(), &mut bytes);
            let paired = GroupedRef::paired(kind, &bytes, rows, cols).unwrap();
            assert!(paired.is_paired() && !plain.is_paired());
            let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                plain.row_to_f32(r, &mut want);
                paired.row_to_f32(r, &mut got);
                assert_eq!(want, got, "{kind:?} {rows}x{cols} row {r}");
            }
            let cuts: Vec<(usize, usize)> = [(0, rows), (0, rows.min(8)), (8.min(rows), rows)]
                .into_iter()
                .filter(|(s, e)| s < e)
                .collect();
            for n in [1, 3] {
                let a = rand_vec(&mut rng, n * rows);
                for isa in Isa::all_supported() {
                    for &(s, e) in &cuts {
                        let a_part: Vec<f32> =
                            (0..n).flat_map(|t| a[t * rows + s..t * rows + e].to_vec()).collect();
                        let (mut yw, mut yg) = (vec![0f32; n * cols], vec![0f32; n * cols]);
                        axpy_rows_with(isa, &a_part, plain.row_range(s, e), &mut yw);
                        for threads in [1, 2] {
                            pool(threads).install(|| {
                                yg.fill(0.0);
                                axpy_rows_with(isa, &a_part, paired.row_range(s, e), &mut yg)
                            });
                            assert_eq!(
                                yw, yg,
                                "{isa:?} {kind:?} {rows}x{cols} rows {s}..{e} n {n} threads {threads}"
                            );
                        }
                    }
                }
            }
            if rows > 8 {
                let cut = std::panic::catch_unwind(|| paired.row_range(4, rows));
                assert!(cut.is_err(), "a row range inside a pair must be refused");
            }
        }
    }
}

#[test]
fn fused_expert_over_paired_down_matches_plain() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let (ffn, hidden) = (200, 96);
    let parts: Vec<Quant> =
        (0..3).map(|_| Quant::new(&rand_vec(&mut rng, ffn * hidden), ffn, hidden)).collect();
    for kind in KINDS {
        let plain = parts[2].grouped(kind);
        let mut bytes = vec![0u8; plain.data().len()];
        pair_groups(kind, ffn, hidden, plain.data(), &mut bytes);
        let paired = GroupedRef::paired(kind, &bytes, ffn, hidden).unwrap();
        let (g, u) = (parts[0].rows_of(kind), parts[1].rows_of(kind));
        for n in [1, 4] {
            let x = rand_vec(&mut rng, n * hidden);
            for isa in Isa::all_supported() {
                let mut act = vec![0f32; 2 * n * ffn];
                let (mut ya, mut yb) = (vec![0f32; n * hidden], vec![0f32; n * hidden]);
                expert_swiglu_with(isa, &x, ExpertRef::new(g, u, plain).unwrap(), &mut act, &mut ya);
                expert_swiglu_with(isa, &x, ExpertRef::new(g, u, paired).unwrap(), &mut act, &mut yb);
                assert_eq!(ya, yb, "{isa:?} {kind:?} n {n}");
            }
        }
    }
}

/// A long expert (gate/up interleaved, as the engine holds them; nine 128-neuron blocks):
/// the fused kernel gives the unfused composition's bits at any thread count and batch.
#[test]
fn long_interleaved_expert_fused_matches_unfused() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let (ffn, hidden) = (1100, 64);
    let gu: Vec<f32> = rand_vec(&mut rng, 2 * ffn * hidden).iter().map(|a| a * 0.2).collect();
    let gu = Quant::new(&gu, 2 * ffn, hidden);
    let down = Quant::new(&rand_vec(&mut rng, ffn * hidden), ffn, hidden);
    for kind in KINDS {
        let e = ExpertRef::interleaved(gu.rows_of(kind), down.grouped(kind)).unwrap();
        for n in [1, 3] {
            let x = rand_vec(&mut rng, n * hidden);
            for isa in Isa::all_supported() {
                let mut act = vec![0f32; 2 * n * ffn];
                let mut want = vec![0f32; n * hidden];
                expert_swiglu_unfused_with(isa, &x, e, &mut act, &mut want);
                for threads in [1, 2, 3] {
                    let mut got = vec![0f32; n * hidden];
                    pool(threads).install(|| expert_swiglu_with(isa, &x, e, &mut act, &mut got));
                    assert_eq!(got, want, "{isa:?} {kind:?} n {n} threads {threads}");
                }
            }
        }
    }
}
