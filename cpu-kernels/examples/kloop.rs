//! Experts one loop each against several per loop ([`experts_swiglu`]), weights streamed
//! from DRAM (a 1.5 GB set on huge pages), one token per expert (decode), 2 threads.
//! `F=768 K=4 Q=q4 cargo run --release -p hetmoe-cpu-kernels --example kloop`
//! (`qwen3-moe-bench`: ffn 768, top-4; `mixtral-bench`: `F=3584 K=2`; `Q=q8`, `Q=bf16`;
//! `THREADS=16`). The layout is
//! the engine's with AVX-512 VNNI: gate/up interleaved (q8 / q4 in row tiles), `downᵀ`
//! (q8 / q4 in groups).
#![allow(clippy::unwrap_used)]
use half::bf16;
use hetmoe_cpu_kernels::bandwidth::parallel_read_sum;
use hetmoe_cpu_kernels::matmul::{MatRef, WeightsRef};
use hetmoe_cpu_kernels::memory::HugeBuf;
use hetmoe_cpu_kernels::moe::{expert_swiglu, experts_swiglu, ExpertRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, GroupKind, GroupedRef};
use hetmoe_cpu_kernels::row_tiles::{self, TileKind};
use std::time::Instant;

fn main() {
    let h = 1024;
    let f: usize = std::env::var("F").ok().and_then(|v| v.parse().ok()).unwrap_or(768);
    let k: usize = std::env::var("K").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let kind = std::env::var("Q").unwrap_or("q4".into());
    let threads: usize = std::env::var("THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let team = hetmoe_cpu_kernels::parallel::Team::new(threads).unwrap();
    let mut probe = HugeBuf::<f32>::zeroed((1 << 30) / 4);
    probe.fill(1.0);
    let w: Vec<f32> = (0..3 * f * h).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    // Per expert: gate/up interleaved ([2f, h]) and downᵀ ([f, h]), as the engine holds
    // them: q8 / q4 gate/up in row tiles and downᵀ in groups; bf16 both as rows.
    let nb = h / QK;
    let (t, g): (Vec<u8>, Vec<u8>) = match kind.as_str() {
        // bf16: held in `bsets` below; these are only its size.
        "bf16" => (vec![0u8; 4 * f * h], vec![0u8; 2 * f * h]),
        "q4" => {
            let mut q = vec![BlockQ4 { d: half::f16::ZERO, qs: [0; QK / 2] }; w.len() / QK];
            quantize_q4(&w, &mut q);
            let mut t = vec![0u8; TileKind::Q4.matrix_bytes(2 * f, h)];
            let mut g = vec![0u8; GroupKind::Q4.matrix_bytes(f, h)];
            row_tiles::tile_q4_rows(&q[..2 * f * nb], 2 * f, h, &mut t);
            group_q4_rows(&q[2 * f * nb..], f, h, &mut g);
            (t, g)
        }
        _ => {
            let mut q = vec![BlockQ8 { d: half::f16::ZERO, qs: [0; QK] }; w.len() / QK];
            quantize_q8(&w, &mut q);
            let mut t = vec![0u8; TileKind::Q8.matrix_bytes(2 * f, h)];
            let mut g = vec![0u8; GroupKind::Q8.matrix_bytes(f, h)];
            row_tiles::tile_q8_rows(&q[..2 * f * nb], 2 * f, h, &mut t);
            group_q8_rows(&q[2 * f * nb..], f, h, &mut g);
            (t, g)
        }
    };
    let per = t.len() + g.len();
    let n = (1536usize << 20) / per / k * k;
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let is_bf16 = kind == "bf16";
    let ts: Vec<HugeBuf<u8>> = (0..if is_bf16 { 0 } else { n }).map(|_| HugeBuf::from_slice(&t)).collect();
    let gs: Vec<HugeBuf<u8>> = (0..if is_bf16 { 0 } else { n }).map(|_| HugeBuf::from_slice(&g)).collect();
    let bsets: Vec<HugeBuf<bf16>> =
        (0..if is_bf16 { n } else { 0 }).map(|_| HugeBuf::from_slice(&wb)).collect();
    let es: Vec<ExpertRef<'_>> = (0..n)
        .map(|i| {
            if is_bf16 {
                let (gu, down) = bsets[i].split_at(2 * f * h);
                let gu = MatRef::new(WeightsRef::Bf16(gu), 2 * f, h).unwrap();
                return ExpertRef::interleaved(gu, MatRef::new(WeightsRef::Bf16(down), f, h).unwrap())
                    .unwrap();
            }
            let (gu, down) = (&ts[i][..], &gs[i][..]);
            match kind.as_str() {
                "q4" => {
                    let gu = MatRef::new(WeightsRef::Q4Tiles(gu), 2 * f, h).unwrap();
                    ExpertRef::interleaved(gu, GroupedRef::new(GroupKind::Q4, down, f, h).unwrap()).unwrap()
                }
                _ => {
                    let gu = MatRef::new(WeightsRef::Q8Tiles(gu), 2 * f, h).unwrap();
                    ExpertRef::interleaved(gu, GroupedRef::new(GroupKind::Q8, down, f, h).unwrap()).unwrap()
                }
            }
        })
        .collect();
    let x = vec![0.5f32; k * h];
    let mut act = vec![0f32; 2 * k * f];
    let mut out = vec![0f32; k * h];
    team.install(|| {
        for round in 0..4 {
            let t0 = Instant::now();
            std::hint::black_box(parallel_read_sum(&probe));
            let bw = (1usize << 30) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            let t0 = Instant::now();
            for e in &es {
                expert_swiglu(&x[..h], *e, &mut act, &mut out[..h]);
            }
            let one = (n * per) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            let t0 = Instant::now();
            for c in es.chunks(k) {
                let jobs: Vec<_> = c.iter().enumerate().map(|(i, e)| (*e, i..i + 1)).collect();
                experts_swiglu(&x, &jobs, &mut act, &mut out);
            }
            let many = (n * per) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            println!("{kind} F {f} K {k} round {round}: probe {bw:5.1} one-by-one {one:5.1} ({:3.0}%) {k}-per-loop {many:5.1} ({:3.0}%)", 100.0 * one / bw, 100.0 * many / bw);
        }
    });
}
