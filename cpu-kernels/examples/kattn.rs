//! Decode attention of one layer (one query, `mixtral-bench`'s shape: 16 heads, 4 KV heads,
//! head_dim 64, f32 cache) at several context lengths, with the cache warm (read just
//! before) and cold (a 256 MiB buffer read in between, as a decode step's weight stream
//! does), for the cache token-major (`[positions, kv_dim]`) and head-major (`[kv_heads,
//! capacity, head_dim]`, the engine's), and its KV bytes' DRAM time at the measured read
//! bandwidth beside them. Both layouts give the same bits (asserted).
//!
//! `cargo run --release -p hetmoe-cpu-kernels --example kattn` (`THREADS=2` by default).
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use hetmoe_cpu_kernels::attention::{causal_attention_in, AttentionShape, KvLayout, KvRef};
use hetmoe_cpu_kernels::bandwidth::{parallel_read_sum, ReadProbe};
use hetmoe_cpu_kernels::parallel::Team;
use hetmoe_cpu_kernels::{active_isa, Isa};

fn main() {
    let threads: usize = std::env::var("THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let s = AttentionShape { n_heads: 16, n_kv_heads: 4, head_dim: 64, scale: 0.125, window: None };
    let (hd, kvd) = (s.head_dim, s.n_kv_heads * s.head_dim);
    let flush: Vec<f32> = vec![1.0; 64 << 20];
    let gbs = ReadProbe::new(1 << 30).measure(threads);
    println!("{threads} threads, read probe {gbs:.1} GB/s");
    let isa: Isa = active_isa();

    let team = Team::new(threads).unwrap();
    team.install(|| {
        for ctx in [64usize, 160, 512, 1088, 4096] {
            let k: Vec<f32> = (0..ctx * kvd).map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0).collect();
            let v: Vec<f32> = (0..ctx * kvd).map(|i| ((i * 17 % 89) as f32 - 44.0) / 89.0).collect();
            // The same rows head-major, with room for more positions as the engine's cache.
            let capacity = ctx.next_power_of_two();
            let head_major = |x: &[f32]| {
                let mut out = vec![0f32; s.n_kv_heads * capacity * hd];
                for p in 0..ctx {
                    for g in 0..s.n_kv_heads {
                        out[(g * capacity + p) * hd..][..hd].copy_from_slice(&x[p * kvd + g * hd..][..hd]);
                    }
                }
                out
            };
            let (kh, vh) = (head_major(&k), head_major(&v));
            let q: Vec<f32> = (0..s.n_heads * hd).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
            let layouts = [
                (KvRef::F32(&k), KvRef::F32(&v), KvLayout::token_major(ctx, s.n_kv_heads, hd)),
                (KvRef::F32(&kh), KvRef::F32(&vh), KvLayout::head_major(ctx, capacity, hd)),
            ];
            let mut outs = [vec![0f32; q.len()], vec![0f32; q.len()]];
            let mut line = format!("ctx {ctx:5}:");
            for (i, name) in ["token-major", "head-major"].into_iter().enumerate() {
                let (kr, vr, layout) = layouts[i];
                let out = &mut outs[i];
                let mut time = |cold: bool| {
                    let mut best = f64::INFINITY;
                    for _ in 0..20 {
                        if cold {
                            std::hint::black_box(parallel_read_sum(&flush));
                        }
                        let t = Instant::now();
                        causal_attention_in(isa, s, &q, kr, vr, layout, ctx - 1, out);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    best * 1e6
                };
                let (warm, cold) = (time(false), time(true));
                line += &format!("  {name} warm {warm:6.1} cold {cold:6.1} µs");
            }
            assert_eq!(outs[0], outs[1], "the layouts gave different bits");
            let dram = (2 * ctx * kvd * 4) as f64 / gbs / 1e3;
            println!("{line}  (KV bytes at the probe {dram:6.1} µs)");
        }
    });
}
