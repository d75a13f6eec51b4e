//! Every ISA the running CPU supports against the scalar oracle, and the determinism
//! contract (batch-, tiling-, layout- and thread-count invariance), on awkward shapes.
#![allow(clippy::unwrap_used)]

use half::{bf16, f16};
use hetmoe_cpu_kernels::matmul::{
    axpy_rows_with, dot_row, matmul_with, matmuls_with, MatRef, WeightsRef, MATMULS_PER_LOOP,
};
use hetmoe_cpu_kernels::moe::{
    expert_swiglu_unfused_with, expert_swiglu_with, experts_swiglu_with, ExpertRef, EXPERTS_PER_LOOP,
};
use hetmoe_cpu_kernels::parallel::Team;
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::Isa;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Max |simd − scalar| relative to Σ|x·w| of that output (reordered f32 sums of ≤ ~2k
/// terms, plus FMA vs separate rounding).
const DOT_REL_TOL: f64 = 2e-6;
/// Same for `axpy_rows` (same order over j; only FMA vs mul+add rounding differs).
const AXPY_REL_TOL: f64 = 2e-6;
/// Same for the whole expert, relative to Σ|a·w_down| (silu(g)·u amplifies gate/up errors).
const EXPERT_REL_TOL: f64 = 1e-5;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dt {
    F32,
    Bf16,
    F16,
    Q8,
    Q4,
}
const DTS: [Dt; 5] = [Dt::F32, Dt::Bf16, Dt::F16, Dt::Q8, Dt::Q4];

impl Dt {
    fn quant(self) -> bool {
        matches!(self, Dt::Q8 | Dt::Q4)
    }
}

/// Owned weights of one type, with `pad` leading elements (blocks for quantized types) so
/// the view starts misaligned.
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Q8(Vec<BlockQ8>),
    Q4(Vec<BlockQ4>),
}

impl Store {
    fn new(dt: Dt, v: &[f32], pad: usize) -> Store {
        let mut p = vec![0.5f32; pad * if dt.quant() { QK } else { 1 }];
        p.extend_from_slice(v);
        match dt {
            Dt::F32 => Store::F32(p),
            Dt::Bf16 => Store::Bf16(p.iter().map(|&a| bf16::from_f32(a)).collect()),
            Dt::F16 => Store::F16(p.iter().map(|&a| f16::from_f32(a)).collect()),
            Dt::Q8 => {
                let mut b = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; p.len() / QK];
                quantize_q8(&p, &mut b);
                Store::Q8(b)
            }
            Dt::Q4 => {
                let mut b = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; p.len() / QK];
                quantize_q4(&p, &mut b);
                Store::Q4(b)
            }
        }
    }
    /// The view without the padding.
    fn view(&self, pad: usize) -> WeightsRef<'_> {
        match self {
            Store::F32(v) => WeightsRef::F32(&v[pad..]),
            Store::Bf16(v) => WeightsRef::Bf16(&v[pad..]),
            Store::F16(v) => WeightsRef::F16(&v[pad..]),
            Store::Q8(v) => WeightsRef::Q8(&v[pad..]),
            Store::Q4(v) => WeightsRef::Q4(&v[pad..]),
        }
    }
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// Row `r` of `w` as f64 (for the Σ|x·w| scale).
fn row_f64(w: &MatRef<'_>, r: usize) -> Vec<f64> {
    let mut o = vec![0f32; w.cols()];
    w.row_to_f32(r, &mut o);
    o.into_iter().map(f64::from).collect()
}

fn simd_isas() -> Vec<Isa> {
    Isa::all_supported().into_iter().filter(|&i| i != Isa::Scalar).collect()
}

/// A test matrix: random weights of `dt`, `rows × cols` with row stride `stride`, viewed
/// from a misaligned start when `pad > 0`.
struct Mat {
    store: Store,
    pad: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Mat {
    fn new(rng: &mut ChaCha8Rng, dt: Dt, rows: usize, cols: usize, extra: usize, pad: usize) -> Mat {
        let stride = cols + extra;
        let n = if rows == 0 { 0 } else { (rows - 1) * stride + cols };
        let n = if dt.quant() { n.next_multiple_of(QK) } else { n };
        let v = rand_vec(rng, n);
        Mat { store: Store::new(dt, &v, pad), pad, rows, cols, stride }
    }
    fn mat(&self) -> MatRef<'_> {
        let v = self.store.view(self.pad);
        MatRef::strided(v, self.rows, self.cols, self.stride).unwrap()
    }
}

/// Shapes: (rows, cols, row stride extra) for dense and quantized weights.
fn shapes(dt: Dt) -> Vec<(usize, usize, usize)> {
    if dt.quant() {
        vec![
            (0, 32, 0),
            (1, 32, 0),
            (3, 64, 32),
            (4, 96, 0),
            (5, 32, 64),
            (17, 160, 0),
            (70, 1024, 32),
            (300, 64, 0),
        ]
    } else {
        let mut v = vec![(0, 8, 0), (1, 0, 0), (1, 1, 0), (3, 7, 0), (4, 8, 1), (5, 9, 3), (9, 15, 0)];
        v.extend([
            (2, 16, 0),
            (7, 17, 2),
            (13, 31, 0),
            (5, 33, 0),
            (67, 100, 5),
            (65, 1027, 0),
            (300, 41, 3),
        ]);
        v
    }
}

#[test]
fn matmul_matches_scalar_on_every_isa() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for dt in DTS {
        for (rows, cols, extra) in shapes(dt) {
            for pad in [0, 1] {
                let m = Mat::new(&mut rng, dt, rows, cols, extra, pad);
                let w = m.mat();
                for n in [1, 2, 3, 5, 18] {
                    let x = rand_vec(&mut rng, n * cols);
                    let mut want = vec![0f32; n * rows];
                    matmul_with(Isa::Scalar, &x, w, &mut want);
                    for isa in simd_isas() {
                        let mut got = vec![f32::NAN; n * rows];
                        matmul_with(isa, &x, w, &mut got);
                        for t in 0..n {
                            for r in 0..rows {
                                let wr = row_f64(&w, r);
                                let scale: f64 = x[t * cols..(t + 1) * cols]
                                    .iter()
                                    .zip(&wr)
                                    .map(|(&a, b)| (a as f64 * b).abs())
                                    .sum();
                                let (g, e) = (got[t * rows + r] as f64, want[t * rows + r] as f64);
                                assert!(
                                    (g - e).abs() <= DOT_REL_TOL * scale + 1e-30,
                                    "{isa:?} {dt:?} {rows}x{cols}+{extra} pad {pad} n {n} t {t} r {r}: {g} vs {e} (scale {scale})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_is_batch_and_tiling_invariant() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for isa in Isa::all_supported() {
        for dt in DTS {
            let (rows, cols) = if dt.quant() { (71, 224) } else { (71, 45) };
            let m = Mat::new(&mut rng, dt, rows, cols, 0, 1);
            let w = m.mat();
            let n = 21;
            let x = rand_vec(&mut rng, n * cols);
            let mut all = vec![0f32; n * rows];
            matmul_with(isa, &x, w, &mut all);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let mut one = vec![0f32; rows];
                matmul_with(isa, xt, w, &mut one);
                assert_eq!(one, all[t * rows..(t + 1) * rows], "{isa:?} {dt:?} token {t}");
                // Any sub-batch, and any single row (other row tiling), gives the same bits.
                let t1 = (t + 3).min(n);
                let mut some = vec![0f32; (t1 - t) * rows];
                matmul_with(isa, &x[t * cols..t1 * cols], w, &mut some);
                assert_eq!(some, all[t * rows..t1 * rows], "{isa:?} {dt:?} tokens {t}..{t1}");
                for r in [0, 3, rows - 1] {
                    assert_eq!(dot_row(isa, xt, w, r).to_bits(), one[r].to_bits(), "{isa:?} {dt:?} row {r}");
                    let sub = w.row_range(r, rows);
                    let mut tail = vec![0f32; rows - r];
                    matmul_with(isa, xt, sub, &mut tail);
                    assert_eq!(tail, one[r..], "{isa:?} {dt:?} rows {r}..");
                }
            }
        }
    }
}

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()
}

#[test]
fn matmul_and_axpy_are_thread_count_invariant() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for isa in Isa::all_supported() {
        for dt in DTS {
            // Large enough to be split into many tasks.
            let (rows, cols) = (333, 1024);
            let m = Mat::new(&mut rng, dt, rows, cols, 0, 0);
            let w = m.mat();
            for n in [1, 3] {
                let x = rand_vec(&mut rng, n * cols);
                let a = rand_vec(&mut rng, n * rows);
                let run = |threads: usize| {
                    pool(threads).install(|| {
                        let mut y = vec![0f32; n * rows];
                        matmul_with(isa, &x, w, &mut y);
                        let mut z = vec![0.25f32; n * cols];
                        axpy_rows_with(isa, &a, w, &mut z);
                        (y, z)
                    })
                };
                // The same on the engine's spinning team.
                let run_team = |threads: usize| {
                    Team::new(threads).unwrap().install(|| {
                        let mut y = vec![0f32; n * rows];
                        matmul_with(isa, &x, w, &mut y);
                        let mut z = vec![0.25f32; n * cols];
                        axpy_rows_with(isa, &a, w, &mut z);
                        (y, z)
                    })
                };
                let one = run(1);
                for threads in [2, 3] {
                    assert_eq!(run(threads), one, "{isa:?} {dt:?} n {n} threads {threads}");
                    assert_eq!(run_team(threads), one, "{isa:?} {dt:?} n {n} team of {threads}");
                }
            }
        }
    }
}

#[test]
fn axpy_rows_matches_scalar_and_is_batch_invariant() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for dt in DTS {
        for (rows, cols, extra) in shapes(dt) {
            for pad in [0, 1] {
                let m = Mat::new(&mut rng, dt, rows, cols, extra, pad);
                let w = m.mat();
                for n in [1, 2, 5] {
                    let a = rand_vec(&mut rng, n * rows);
                    let y0 = rand_vec(&mut rng, n * cols);
                    let mut want = y0.clone();
                    axpy_rows_with(Isa::Scalar, &a, w, &mut want);
                    for isa in Isa::all_supported() {
                        let mut got = y0.clone();
                        axpy_rows_with(isa, &a, w, &mut got);
                        let wrows: Vec<Vec<f64>> = (0..rows).map(|j| row_f64(&w, j)).collect();
                        for t in 0..n {
                            for c in 0..cols {
                                let scale: f64 = (0..rows)
                                    .map(|j| (a[t * rows + j] as f64 * wrows[j][c]).abs())
                                    .sum::<f64>()
                                    + (y0[t * cols + c] as f64).abs();
                                let (g, e) = (got[t * cols + c] as f64, want[t * cols + c] as f64);
                                assert!(
                                    (g - e).abs() <= AXPY_REL_TOL * scale + 1e-30,
                                    "{isa:?} {dt:?} {rows}x{cols}+{extra} pad {pad} n {n} t {t} c {c}: {g} vs {e}"
                                );
                            }
                            // Batch invariance: token t alone gives the same bits.
                            let mut alone = y0[t * cols..(t + 1) * cols].to_vec();
                            axpy_rows_with(isa, &a[t * rows..(t + 1) * rows], w, &mut alone);
                            assert_eq!(alone, got[t * cols..(t + 1) * cols], "{isa:?} {dt:?} batch t {t}");
                        }
                    }
                }
            }
        }
    }
}

/// An expert of `dt` as one row-column bundle, as three separate matrices, and as gate and
/// up interleaved row by row (viewed from a misaligned start) with `downᵀ` apart.
struct Expert {
    bundle: Store,
    parts: [Store; 3],
    gate_up: Store,
    ffn: usize,
    hidden: usize,
}

impl Expert {
    fn new(rng: &mut ChaCha8Rng, dt: Dt, ffn: usize, hidden: usize) -> Expert {
        let v: Vec<f32> = rand_vec(rng, 3 * ffn * hidden).into_iter().map(|a| a * 0.2).collect();
        let part = |i: usize| -> Vec<f32> {
            (0..ffn).flat_map(|j| v[(3 * j + i) * hidden..(3 * j + i + 1) * hidden].to_vec()).collect()
        };
        let gate_up: Vec<f32> =
            (0..ffn).flat_map(|j| v[3 * j * hidden..(3 * j + 2) * hidden].to_vec()).collect();
        Expert {
            bundle: Store::new(dt, &v, 0),
            parts: [Store::new(dt, &part(0), 0), Store::new(dt, &part(1), 0), Store::new(dt, &part(2), 0)],
            gate_up: Store::new(dt, &gate_up, 1),
            ffn,
            hidden,
        }
    }
    fn interleaved(&self) -> ExpertRef<'_> {
        let gu = MatRef::new(self.gate_up.view(1), 2 * self.ffn, self.hidden).unwrap();
        let down = MatRef::new(self.parts[2].view(0), self.ffn, self.hidden).unwrap();
        ExpertRef::interleaved(gu, down).unwrap()
    }
    fn bundled(&self) -> ExpertRef<'_> {
        ExpertRef::bundled(self.bundle.view(0), self.ffn, self.hidden).unwrap()
    }
    fn separate(&self) -> ExpertRef<'_> {
        let m = |i: usize| MatRef::new(self.parts[i].view(0), self.ffn, self.hidden).unwrap();
        ExpertRef::new(m(0), m(1), m(2)).unwrap()
    }
}

fn run_expert(isa: Isa, x: &[f32], e: ExpertRef<'_>, fused: bool) -> Vec<f32> {
    let n = x.len() / e.hidden();
    let mut act = vec![f32::NAN; 2 * n * e.ffn() + 3];
    let mut out = vec![f32::NAN; n * e.hidden()];
    if fused {
        expert_swiglu_with(isa, x, e, &mut act, &mut out);
    } else {
        expert_swiglu_unfused_with(isa, x, e, &mut act, &mut out);
    }
    out
}

#[test]
fn expert_swiglu_invariants() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for dt in DTS {
        for (ffn, hidden) in [(1, 32), (37, 64), (200, 96), (130, 256)] {
            let ex = Expert::new(&mut rng, dt, ffn, hidden);
            let n = 7;
            let x = rand_vec(&mut rng, n * hidden);
            let want = run_expert(Isa::Scalar, &x, ex.separate(), false);
            for isa in Isa::all_supported() {
                let fused = run_expert(isa, &x, ex.bundled(), true);
                assert_eq!(
                    fused,
                    run_expert(isa, &x, ex.separate(), true),
                    "{isa:?} {dt:?} bundled vs separate"
                );
                assert_eq!(
                    fused,
                    run_expert(isa, &x, ex.bundled(), false),
                    "{isa:?} {dt:?} fused vs unfused"
                );
                assert_eq!(
                    fused,
                    run_expert(isa, &x, ex.interleaved(), true),
                    "{isa:?} {dt:?} bundled vs gate/up interleaved"
                );
                assert_eq!(
                    fused,
                    run_expert(isa, &x, ex.interleaved(), false),
                    "{isa:?} {dt:?} interleaved unfused"
                );
                for t in 0..n {
                    let xt = &x[t * hidden..(t + 1) * hidden];
                    let one = run_expert(isa, xt, ex.bundled(), true);
                    assert_eq!(one, fused[t * hidden..(t + 1) * hidden], "{isa:?} {dt:?} batch t {t}");
                    let one = run_expert(isa, xt, ex.interleaved(), true);
                    assert_eq!(one, fused[t * hidden..(t + 1) * hidden], "{isa:?} {dt:?} interleaved t {t}");
                }
                for threads in [1, 2, 3] {
                    let got = pool(threads).install(|| run_expert(isa, &x, ex.bundled(), true));
                    assert_eq!(got, fused, "{isa:?} {dt:?} threads {threads}");
                    let got = pool(threads).install(|| run_expert(isa, &x, ex.interleaved(), true));
                    assert_eq!(got, fused, "{isa:?} {dt:?} interleaved threads {threads}");
                }
                // Against the scalar oracle: scale by Σ|act·w_down| + a margin for act errors.
                let mut act = vec![0f32; 2 * n * ffn];
                let mut tmp = vec![0f32; n * hidden];
                expert_swiglu_unfused_with(Isa::Scalar, &x, ex.separate(), &mut act, &mut tmp);
                let down = ex.separate().down_t();
                let down_row = |j: usize| {
                    let mut o = vec![0f32; hidden];
                    down.row_to_f32(j, &mut o);
                    o
                };
                for t in 0..n {
                    for c in 0..hidden {
                        let scale: f64 = (0..ffn)
                            .map(|j| (act[t * ffn + j] as f64 * down_row(j)[c] as f64).abs())
                            .sum::<f64>();
                        let (g, e) = (fused[t * hidden + c] as f64, want[t * hidden + c] as f64);
                        assert!(
                            (g - e).abs() <= EXPERT_REL_TOL * scale + 1e-30,
                            "{isa:?} {dt:?} {ffn}x{hidden} t {t} c {c}: {g} vs {e} (scale {scale})"
                        );
                    }
                }
            }
        }
    }
}

/// Several matrices over the same activations in one loop give the bits of one `matmul`
/// each, on every ISA, at 1–3 threads, with empty matrices, more matrices than a loop takes,
/// and formats whose activations differ (run apart).
#[test]
fn matmuls_in_one_loop_match_each_alone() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let cols = 96;
    for dt in DTS {
        let rows = [70, 0, 5, 300, 1, 64, 33];
        let mats: Vec<Mat> = rows.iter().map(|&r| Mat::new(&mut rng, dt, r, cols, 0, 1)).collect();
        // And one of another format (f32 beside the rest, q8 beside f32).
        let other = Mat::new(&mut rng, if dt == Dt::F32 { Dt::Q8 } else { Dt::F32 }, 9, cols, 0, 0);
        for n in [1usize, 5] {
            let x = rand_vec(&mut rng, n * cols);
            for isa in Isa::all_supported() {
                let one = |m: &Mat| {
                    let mut y = vec![0f32; n * m.rows];
                    matmul_with(isa, &x, m.mat(), &mut y);
                    y
                };
                let want: Vec<Vec<f32>> = mats.iter().chain([&other]).map(one).collect();
                let run = || {
                    let mut ys: Vec<Vec<f32>> =
                        mats.iter().chain([&other]).map(|m| vec![f32::NAN; n * m.rows]).collect();
                    let mut jobs: Vec<(MatRef<'_>, &mut [f32])> = mats
                        .iter()
                        .chain([&other])
                        .zip(ys.iter_mut())
                        .map(|(m, y)| (m.mat(), y.as_mut_slice()))
                        .collect();
                    // The first three alone (one loop), then all with the other format.
                    matmuls_with(isa, &x, &mut jobs[..3]);
                    matmuls_with(isa, &x, &mut jobs);
                    ys
                };
                assert!(mats.len() + 1 > MATMULS_PER_LOOP, "more matrices than one loop");
                for threads in [1, 2, 3] {
                    assert_eq!(pool(threads).install(run), want, "{isa:?} {dt:?} n{n} threads {threads}");
                    assert_eq!(
                        Team::new(threads).unwrap().install(run),
                        want,
                        "{isa:?} {dt:?} n{n} team {threads}"
                    );
                }
            }
        }
    }
}

/// Several experts in one call (one parallel loop) give each expert's rows the bits it
/// gives alone, in every layout, at 1–3 threads (rayon and a team), with empty ranges, rows
/// no expert covers (left as they were), and more experts than one loop takes.
#[test]
fn experts_in_one_loop_match_each_alone() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for dt in DTS {
        for (ffn, hidden, n_experts) in [(37, 64, 3), (200, 96, 4), (300, 64, EXPERTS_PER_LOOP + 3)] {
            let experts: Vec<Expert> =
                (0..n_experts).map(|_| Expert::new(&mut rng, dt, ffn, hidden)).collect();
            let layout = |i: usize| match i % 3 {
                0 => experts[i].bundled(),
                1 => experts[i].separate(),
                _ => experts[i].interleaved(),
            };
            // Expert i takes rows[i]: some of one row, one empty, row 2 nobody's.
            let mut starts = Vec::new();
            let mut r = 0;
            for i in 0..n_experts {
                if i == 1 {
                    r += 1; // row r is left out
                }
                let m = [1, 0, 2, 3][i % 4];
                starts.push(r..r + m);
                r += m;
            }
            let n = r;
            let x = rand_vec(&mut rng, n * hidden);
            for isa in Isa::all_supported() {
                let want: Vec<Vec<f32>> = (0..n_experts)
                    .map(|i| {
                        run_expert(isa, &x[starts[i].start * hidden..starts[i].end * hidden], layout(i), true)
                    })
                    .collect();
                let jobs: Vec<(ExpertRef<'_>, std::ops::Range<usize>)> =
                    (0..n_experts).map(|i| (layout(i), starts[i].clone())).collect();
                let run = || {
                    let mut act = vec![f32::NAN; 2 * n * ffn];
                    let mut out = vec![7.0f32; n * hidden];
                    experts_swiglu_with(isa, &x, &jobs, &mut act, &mut out);
                    out
                };
                let mut results = vec![run()];
                for threads in [1, 2, 3] {
                    results.push(pool(threads).install(run));
                    results.push(Team::new(threads).unwrap().install(run));
                }
                for got in results {
                    for (i, rows) in starts.iter().enumerate() {
                        assert_eq!(
                            got[rows.start * hidden..rows.end * hidden],
                            want[i][..],
                            "{isa:?} {dt:?} {ffn}x{hidden} expert {i}"
                        );
                    }
                    assert!(
                        got[hidden..2 * hidden].iter().all(|&v| v == 7.0),
                        "{isa:?} {dt:?}: row 1 touched"
                    );
                }
            }
        }
    }
}

#[test]
fn experts_in_one_loop_check_their_rows_and_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (a, b) = (Expert::new(&mut rng, Dt::F32, 8, 32), Expert::new(&mut rng, Dt::F32, 9, 32));
    let x = rand_vec(&mut rng, 4 * 32);
    let call = |jobs: Vec<(ExpertRef<'_>, std::ops::Range<usize>)>| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (mut act, mut out) = (vec![0f32; 2 * 4 * 9], vec![0f32; 4 * 32]);
            experts_swiglu_with(Isa::Scalar, &x, &jobs, &mut act, &mut out);
        }))
        .is_ok()
    };
    assert!(call(vec![(a.separate(), 0..2), (a.bundled(), 2..4)]));
    assert!(!call(vec![(a.separate(), 0..3), (a.bundled(), 2..4)]), "overlapping rows");
    assert!(!call(vec![(a.separate(), 2..4), (a.bundled(), 0..2)]), "descending rows");
    assert!(!call(vec![(a.separate(), 0..5)]), "rows past x");
    assert!(!call(vec![(a.separate(), 0..2), (b.separate(), 2..4)]), "two shapes");
}

/// A NaN or infinite activation makes every output it enters NaN (or ±inf) on every ISA and
/// format: quantizing activations for q8/q4 must not turn it into a finite number.
#[test]
fn non_finite_activations_are_not_hidden() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for dt in DTS {
        let m = Mat::new(&mut rng, dt, 7, 96, 0, 0);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = rand_vec(&mut rng, 2 * 96);
            x[96 + 40] = bad; // token 1 only
            for isa in Isa::all_supported() {
                let mut y = vec![0f32; 2 * 7];
                matmul_with(isa, &x, m.mat(), &mut y);
                assert!(y[..7].iter().all(|v| v.is_finite()), "{isa:?} {dt:?} {bad}: clean token");
                assert!(y[7..].iter().all(|v| !v.is_finite()), "{isa:?} {dt:?} {bad}: {:?}", &y[7..]);
            }
        }
    }
}

#[test]
fn unsupported_isa_is_refused() {
    for isa in [Isa::Avx2, Isa::Avx512] {
        if !isa.is_supported() {
            let w = [0f32; 4];
            let m = MatRef::new(WeightsRef::F32(&w), 2, 2).unwrap();
            let r = std::panic::catch_unwind(|| {
                let mut y = [0f32; 2];
                matmul_with(isa, &[1.0, 2.0], m, &mut y);
            });
            assert!(r.is_err(), "{isa:?} must panic, not run");
        }
    }
}

#[test]
fn interleaved_expert_shapes_are_checked() {
    let w = vec![0.5f32; 3 * 64];
    let odd = MatRef::new(WeightsRef::F32(&w), 3, 64).unwrap();
    let down = MatRef::new(WeightsRef::F32(&w[..64]), 1, 64).unwrap();
    assert!(ExpertRef::interleaved(odd, down).is_err(), "odd gate/up row count");
    let gu = MatRef::new(WeightsRef::F32(&w[..128]), 2, 64).unwrap();
    let e = ExpertRef::interleaved(gu, down).unwrap();
    assert_eq!((e.ffn(), e.hidden()), (1, 64));
    let wrong_down = MatRef::new(WeightsRef::F32(&w[..128]), 2, 64).unwrap();
    assert!(ExpertRef::interleaved(gu, wrong_down).is_err(), "downᵀ rows != ffn");
}
