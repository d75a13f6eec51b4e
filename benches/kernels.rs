//! Kernel throughput in GB/s of weights read, beside a STREAM-like read-bandwidth probe
//! measured in the same run (so `matvec GB/s / probe GB/s` is the fraction of the roofline).
//!
//! Shapes follow the `mixtral-bench` preset (hidden 1024, intermediate 3584). Every kernel
//! cycles over enough copies of the expert matrices that one iteration reads
//! [`WORKING_SET`] bytes, far beyond the last-level cache, as decode does.
//!
//! `cargo bench --bench kernels -- --warm-up-time 1 --measurement-time 3`
//! (threads: the rayon global pool, `RAYON_NUM_THREADS`, default one per core).
//! On a machine shared with other work, criterion's sequential groups see different
//! bandwidths; `cargo run --release -p hetmoe-cpu-kernels --example kbench` interleaves the
//! probe with each kernel and reports per-round ratios (`KB_CPU=1`: normalised by CPU time).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::{bf16, f16};
use hetmoe_cpu_kernels::bandwidth::parallel_read_sum;
use hetmoe_cpu_kernels::matmul::{matmul, MatRef, WeightsRef};
use hetmoe_cpu_kernels::moe::{expert_swiglu, experts_swiglu, ExpertRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, GroupKind, GroupedRef};

const HIDDEN: usize = 1024;
const FFN: usize = 3584;
/// Bytes one iteration reads (the probe's buffer too): well above the L3 of the machine.
const WORKING_SET: usize = 512 << 20;

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    Bf16,
    F16,
    Q8,
    Q4,
}

impl Dt {
    fn name(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::Bf16 => "bf16",
            Dt::F16 => "f16",
            Dt::Q8 => "q8",
            Dt::Q4 => "q4",
        }
    }
}

enum Store {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Q8(Vec<BlockQ8>),
    Q4(Vec<BlockQ4>),
}

impl Store {
    fn new(dt: Dt, v: &[f32]) -> Store {
        match dt {
            Dt::F32 => Store::F32(v.to_vec()),
            Dt::Bf16 => Store::Bf16(v.iter().map(|&a| bf16::from_f32(a)).collect()),
            Dt::F16 => Store::F16(v.iter().map(|&a| f16::from_f32(a)).collect()),
            Dt::Q8 => {
                let mut b = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; v.len() / QK];
                quantize_q8(v, &mut b);
                Store::Q8(b)
            }
            Dt::Q4 => {
                let mut b = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; v.len() / QK];
                quantize_q4(v, &mut b);
                Store::Q4(b)
            }
        }
    }
    fn view(&self) -> WeightsRef<'_> {
        match self {
            Store::F32(v) => WeightsRef::F32(v),
            Store::Bf16(v) => WeightsRef::Bf16(v),
            Store::F16(v) => WeightsRef::F16(v),
            Store::Q8(v) => WeightsRef::Q8(v),
            Store::Q4(v) => WeightsRef::Q4(v),
        }
    }
    /// Enough distinct copies of this buffer to fill [`WORKING_SET`].
    fn copies(self) -> Vec<Store> {
        let n = WORKING_SET.div_ceil(self.view().size_bytes()).max(1);
        let mut v = Vec::with_capacity(n);
        for _ in 1..n {
            v.push(match &self {
                Store::F32(a) => Store::F32(a.clone()),
                Store::Bf16(a) => Store::Bf16(a.clone()),
                Store::F16(a) => Store::F16(a.clone()),
                Store::Q8(a) => Store::Q8(a.clone()),
                Store::Q4(a) => Store::Q4(a.clone()),
            });
        }
        v.push(self);
        v
    }
}

fn probe(c: &mut Criterion, name: &str) {
    let buf = vec![1f32; WORKING_SET / 4];
    let mut g = c.benchmark_group("bandwidth");
    g.throughput(Throughput::Bytes(WORKING_SET as u64));
    g.bench_function(name, |b| b.iter(|| black_box(parallel_read_sum(black_box(&buf)))));
    g.finish();
}

// The probe runs before, between and after the kernel groups: on a shared machine the
// available bandwidth drifts, so compare each kernel with the probe next to it.
fn probe_start(c: &mut Criterion) {
    probe(c, "read_probe_1_start");
}
fn probe_mid(c: &mut Criterion) {
    probe(c, "read_probe_2_mid");
}
fn probe_end(c: &mut Criterion) {
    probe(c, "read_probe_3_end");
}

fn matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec_3584x1024");
    g.sample_size(10);
    let w = pseudo_random(FFN * HIDDEN, 1);
    for dt in [Dt::Bf16, Dt::Q8, Dt::Q4, Dt::F16, Dt::F32] {
        let mats = Store::new(dt, &w).copies();
        let views: Vec<MatRef<'_>> =
            mats.iter().map(|m| MatRef::new(m.view(), FFN, HIDDEN).unwrap()).collect();
        let bytes: usize = views.iter().map(|m| m.size_bytes()).sum();
        for n in [1usize, 8, 32] {
            if n > 1 && !matches!(dt, Dt::Bf16 | Dt::Q8) {
                continue;
            }
            let x = pseudo_random(n * HIDDEN, 2);
            let mut y = vec![0f32; n * FFN];
            g.throughput(Throughput::Bytes(bytes as u64));
            g.bench_function(format!("{}_n{n}", dt.name()), |b| {
                b.iter(|| {
                    for m in &views {
                        matmul(&x, *m, &mut y);
                    }
                    black_box(&y);
                })
            });
        }
    }
    g.finish();
}

/// Times one pass over `views` for 1 and 8 tokens, as GB/s of weights read.
fn bench_experts(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dt: Dt,
    views: &[ExpertRef<'_>],
) {
    let bytes: usize = views.iter().map(|e| e.size_bytes()).sum();
    for n in [1usize, 8] {
        let x = pseudo_random(n * HIDDEN, 4);
        let mut act = vec![0f32; 2 * n * FFN];
        let mut out = vec![0f32; n * HIDDEN];
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("{}_n{n}", dt.name()), |b| {
            b.iter(|| {
                for e in views {
                    expert_swiglu(&x, *e, &mut act, &mut out);
                }
                black_box(&out);
            })
        });
    }
    // A decode step of a top-2 model: one token to each of two experts, both in one
    // parallel loop (`experts_swiglu`), as the engine runs them.
    let x = pseudo_random(2 * HIDDEN, 5);
    let mut act = vec![0f32; 2 * 2 * FFN];
    let mut out = vec![0f32; 2 * HIDDEN];
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(format!("{}_top2_one_loop", dt.name()), |b| {
        b.iter(|| {
            for pair in views.chunks(2) {
                let jobs: [(ExpertRef<'_>, std::ops::Range<usize>); 2] =
                    std::array::from_fn(|i| (pair[i.min(pair.len() - 1)], i..i + 1));
                experts_swiglu(
                    &x[..pair.len() * HIDDEN],
                    &jobs[..pair.len()],
                    &mut act,
                    &mut out[..pair.len() * HIDDEN],
                );
            }
            black_box(&out);
        })
    });
}

fn expert(c: &mut Criterion) {
    let mut g = c.benchmark_group("expert_swiglu_3584x1024");
    g.sample_size(10);
    let w = pseudo_random(3 * FFN * HIDDEN, 3);
    for dt in [Dt::Bf16, Dt::Q8, Dt::Q4] {
        let experts = Store::new(dt, &w).copies();
        let views: Vec<ExpertRef<'_>> =
            experts.iter().map(|e| ExpertRef::bundled(e.view(), FFN, HIDDEN).unwrap()).collect();
        bench_experts(&mut g, dt, &views);
    }
    g.finish();
}

/// Quantized experts as the engine holds them: gate and up as rows, `downᵀ` in groups of
/// four rows (the down projection on integer dot products).
fn expert_grouped(c: &mut Criterion) {
    let mut g = c.benchmark_group("expert_swiglu_grouped_down_3584x1024");
    g.sample_size(10);
    let w = pseudo_random(3 * FFN * HIDDEN, 3);
    for dt in [Dt::Q8, Dt::Q4] {
        let (kind, rows) = match dt {
            Dt::Q8 => (GroupKind::Q8, Store::new(dt, &w[..2 * FFN * HIDDEN])),
            _ => (GroupKind::Q4, Store::new(dt, &w[..2 * FFN * HIDDEN])),
        };
        let mut down = vec![0u8; kind.matrix_bytes(FFN, HIDDEN)];
        match Store::new(dt, &w[2 * FFN * HIDDEN..]) {
            Store::Q8(b) => group_q8_rows(&b, FFN, HIDDEN, &mut down),
            Store::Q4(b) => group_q4_rows(&b, FFN, HIDDEN, &mut down),
            _ => unreachable!("quantized formats only"),
        }
        let n_copies = WORKING_SET.div_ceil(rows.view().size_bytes() + down.len()).max(1);
        let copies: Vec<(Store, Vec<u8>)> =
            rows.copies().into_iter().take(n_copies).map(|r| (r, down.clone())).collect();
        let views: Vec<ExpertRef<'_>> = copies
            .iter()
            .map(|(r, d)| {
                let m = MatRef::new(r.view(), 2 * FFN, HIDDEN).unwrap();
                let down = GroupedRef::new(kind, d, FFN, HIDDEN).unwrap();
                ExpertRef::new(m.row_range(0, FFN), m.row_range(FFN, 2 * FFN), down).unwrap()
            })
            .collect();
        bench_experts(&mut g, dt, &views);
    }
    g.finish();
}

criterion_group!(benches, probe_start, matvec, probe_mid, expert, expert_grouped, probe_end);
criterion_main!(benches);
