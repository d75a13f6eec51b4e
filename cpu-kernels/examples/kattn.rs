//! Decode attention of one layer (one query, `mixtral-bench`'s shape: 16 heads, 4 KV heads,
//! head_dim 64, f32 cache) at several context lengths, with the cache warm (read just
//! before) and cold (a 256 MiB buffer read in between, as a decode step's weight stream
//! does), and its KV bytes' DRAM time at the measured read bandwidth beside it.
//!
//! `cargo run --release -p hetmoe-cpu-kernels --example kattn` (`THREADS=2` by default).
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use hetmoe_cpu_kernels::attention::{causal_attention, AttentionShape};
use hetmoe_cpu_kernels::bandwidth::{parallel_read_sum, ReadProbe};
use hetmoe_cpu_kernels::parallel::Team;

fn main() {
    let threads: usize = std::env::var("THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let s = AttentionShape { n_heads: 16, n_kv_heads: 4, head_dim: 64, scale: 0.125, window: None };
    let kvd = s.n_kv_heads * s.head_dim;
    let flush: Vec<f32> = vec![1.0; 64 << 20];
    let gbs = ReadProbe::new(1 << 30).measure(threads);
    println!("{threads} threads, read probe {gbs:.1} GB/s");
    let team = Team::new(threads).unwrap();
    team.install(|| {
        for ctx in [64usize, 160, 512, 1088, 4096] {
            let k: Vec<f32> = (0..ctx * kvd).map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0).collect();
            let v: Vec<f32> = (0..ctx * kvd).map(|i| ((i * 17 % 89) as f32 - 44.0) / 89.0).collect();
            let q: Vec<f32> = (0..s.n_heads * s.head_dim).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
            let mut out = vec![0f32; q.len()];
            let mut time = |cold: bool| {
                let mut best = f64::INFINITY;
                for _ in 0..20 {
                    if cold {
                        std::hint::black_box(parallel_read_sum(&flush));
                    }
                    let t = Instant::now();
                    causal_attention(s, &q, &k, &v, ctx - 1, &mut out);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best * 1e6
            };
            let (warm, cold) = (time(false), time(true));
            let dram = (2 * ctx * kvd * 4) as f64 / gbs / 1e3;
            println!(
                "ctx {ctx:5}: warm {warm:7.1} µs  cold {cold:7.1} µs  KV bytes at the probe {dram:6.1} µs"
            );
        }
    });
}
