//! Decode and prefill throughput against the roofline, measured in one run.
//!
//! In memory: `bench-decode --model /tmp/mixtral-bench --weights bf16 --threads 2` compares
//! decode tokens/s with (bytes read per token / memory bandwidth measured by the same run).
//!
//! Offloaded: `bench-decode --model /tmp/mixtral-bench --offload disk --store STORE
//! --expert-cache-frac 0.25` also runs the same prompt with experts read from the store
//! through the cache, and compares decode tokens/s with the ceiling
//! `1 / (bytes missed per token / disk bandwidth + in-memory time per token)`, where the
//! disk bandwidth is measured on the store file with O_DIRECT by the same run.
//!
//! Make the model with `make-model --preset mixtral-bench --out /tmp/mixtral-bench` and the
//! store with `repack --model /tmp/mixtral-bench --out STORE`. Prints a summary on stderr
//! and one JSON line on stdout; the in-memory figures are medians of `--repeat` runs (3),
//! each run's figures in `prefill_tok_s_runs` / `decode_tok_s_runs`. `--phases` also times
//! each phase of the decode steps (`Sequence::profile_phases`): which part of a step is
//! short of the roofline.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hetmoe::{
    CacheConfig, Engine, EngineOptions, KvCacheDtype, LogitsMode, PhaseTimes, PolicyKind, WeightFormat,
};
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Measure prefill and decode throughput against the roofline")]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "bf16")]
    weights: WeightFormat,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV cache element type: f32 (exact) or bf16 (half the bytes).
    #[arg(long, default_value = "f32")]
    kv_cache: KvCacheDtype,
    /// With --offload disk: prefetch the experts the next layer will probably use
    /// (skip-gate guess: the next layer's router on this layer's output).
    #[arg(long)]
    prefetch: bool,
    /// Bytes streamed by the memory-bandwidth probe.
    #[arg(long, default_value_t = 1 << 30)]
    probe_bytes: usize,
    /// `ram` (default) or `disk` (also run with experts from `--store`).
    #[arg(long, default_value = "ram")]
    offload: String,
    #[arg(long)]
    store: Option<PathBuf>,
    /// Cache budget as a fraction of all experts' bytes.
    #[arg(long, default_value_t = 0.25)]
    expert_cache_frac: f64,
    #[arg(long, default_value = "score")]
    cache_policy: PolicyKind,
    #[arg(long, default_value_t = 0)]
    window: usize,
    #[arg(long, default_value_t = 2)]
    loader_threads: usize,
    /// Timed in-memory runs (prefill + decode each); the medians are reported. These
    /// machines drift by ±10% within minutes, so one run says little.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also time each phase of the decode steps (attention projections, attention, FFN,
    /// lm_head): printed per step and added to the JSON line as `decode_phases_us`.
    #[arg(long)]
    phases: bool,
}

/// The median of `v` (the upper one of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

struct Run {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_steps: usize,
    /// The decode steps' phase times, when asked for.
    phases: Option<PhaseTimes>,
}

/// Prefill `prompt`, then `gen_len - 1` greedy decode steps, timed separately. The expert
/// cache metrics are reset after the prefill, so they cover decode alone.
fn run(engine: &Engine, prompt: &[u32], gen_len: usize, phases: bool) -> Result<Run> {
    let mut seq = engine.new_sequence();
    let t0 = Instant::now();
    let logits = engine.forward(&mut seq, prompt, LogitsMode::Last)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    engine.reset_expert_cache_metrics();
    let argmax = |l: &[f32]| l.iter().enumerate().fold(0, |b, (i, &v)| if v > l[b] { i } else { b }) as u32;
    let mut next = argmax(&logits);
    let steps = gen_len.saturating_sub(1).max(1);
    seq.profile_phases(phases);
    let t1 = Instant::now();
    for _ in 0..steps {
        let l = engine.forward(&mut seq, &[next], LogitsMode::Last)?;
        next = argmax(&l);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(Run {
        prefill_tok_s: prompt.len() as f64 / prefill_s,
        decode_tok_s: steps as f64 / decode_s,
        decode_steps: steps,
        phases: seq.phase_times().cloned(),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let options = EngineOptions {
        threads: Some(args.threads),
        weights: args.weights,
        kv_cache: args.kv_cache,
        prefetch: args.prefetch,
    };
    let engine = Engine::load(&args.model, options.clone())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let spec = engine.spec().clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let prompt: Vec<u32> = (0..args.prompt_len).map(|_| rng.gen_range(3..spec.vocab as u32)).collect();

    // One probe buffer for both measurements, freed only at the end: freeing it before the
    // timed runs slowed the second of them (see `ReadProbe`).
    let read_probe = hetmoe::cpu_kernels::bandwidth::ReadProbe::new(args.probe_bytes);
    let probe = || read_probe.measure(args.threads);
    let bw_before = probe();
    // Warm up with the same prompt length (as llama-bench does): page the weights in and
    // grow every buffer (scratch, block sums, KV cache) to its steady-state size, so the
    // timed prefill measures compute rather than first-touch page faults.
    run(&engine, &prompt, 2, false)?;
    let runs = (0..args.repeat.max(1))
        .map(|_| run(&engine, &prompt, args.gen_len, args.phases))
        .collect::<Result<Vec<_>>>()?;
    let bw_after = probe();
    let mem_bw_gbs = bw_before.max(bw_after);
    let decode_all: Vec<f64> = runs.iter().map(|r| r.decode_tok_s).collect();
    let prefill_all: Vec<f64> = runs.iter().map(|r| r.prefill_tok_s).collect();
    let ram = Run {
        prefill_tok_s: median(&prefill_all),
        decode_tok_s: median(&decode_all),
        decode_steps: runs[0].decode_steps,
        phases: None,
    };
    let bytes_per_token =
        (0..ram.decode_steps).map(|i| engine.decode_bytes_per_token(args.prompt_len + i) as f64).sum::<f64>()
            / ram.decode_steps as f64;
    let roofline_tok_s = mem_bw_gbs * 1e9 / bytes_per_token;
    let fraction = ram.decode_tok_s / roofline_tok_s;
    let range = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        format!("{lo:.1}–{hi:.1}")
    };
    eprintln!(
        "{}: weights {}, {} threads | prefill {:.1} tok/s | decode {:.2} tok/s (medians of {} runs; \
         prefill {}, decode {}) | {:.1} MB/token | bandwidth {:.2} GB/s (probes {:.2} / {:.2}) | \
         roofline {:.2} tok/s | {:.1}% of roofline",
        args.model.display(),
        args.weights,
        args.threads,
        ram.prefill_tok_s,
        ram.decode_tok_s,
        runs.len(),
        range(&prefill_all),
        range(&decode_all),
        bytes_per_token / 1e6,
        mem_bw_gbs,
        bw_before,
        bw_after,
        roofline_tok_s,
        100.0 * fraction
    );
    let mut summary = serde_json::json!({
        "model": args.model.display().to_string(),
        "weights": args.weights.to_string(),
        "threads": args.threads,
        "prefill_tok_s": ram.prefill_tok_s,
        "decode_tok_s": ram.decode_tok_s,
        "bytes_per_token": bytes_per_token.round() as u64,
        "mem_bw_gbs": mem_bw_gbs,
        "roofline_fraction": fraction,
        "runs": runs.len(),
        "prefill_tok_s_runs": prefill_all,
        "decode_tok_s_runs": decode_all,
    });
    if args.phases {
        // Every timed run's decode steps together, per step.
        let (mut sum, mut steps) = ([0f64; 6], 0u64);
        for p in runs.iter().filter_map(|r| r.phases.as_ref()) {
            let parts = [p.attention_projections, p.attention, p.ffn, p.lm_head, p.other(), p.total];
            for (s, d) in sum.iter_mut().zip(parts) {
                *s += d.as_secs_f64();
            }
            steps += p.steps;
        }
        let us = sum.map(|s| s * 1e6 / steps.max(1) as f64);
        eprintln!(
            "decode step {:.0} µs: attention projections {:.0}, attention {:.0}, FFN {:.0}, lm_head {:.0}, other {:.0}",
            us[5], us[0], us[1], us[2], us[3], us[4]
        );
        summary["decode_phases_us"] = serde_json::json!({
            "attention_projections": us[0], "attention": us[1], "ffn": us[2],
            "lm_head": us[3], "other": us[4], "total": us[5],
        });
    }

    match args.offload.as_str() {
        "ram" => {}
        "disk" => {
            drop(engine);
            let store_path = args.store.as_ref().context("--offload disk needs --store")?;
            let store = hetmoe::storage::ExpertStore::open(store_path)?;
            let total = spec.moe.n_experts * spec.moe_layers().len();
            let slots = ((total as f64 * args.expert_cache_frac).round() as usize).max(spec.moe.top_k);
            let budget = (slots * store.buf_len()) as u64;
            let disk = hetmoe::storage::expert_store::probe::direct_read(store_path, 8, 1 << 20, 1 << 30)?;
            drop(store);
            let cache = CacheConfig::new(budget, spec.moe.top_k)
                .with_policy(args.cache_policy)
                .with_window(args.window)
                .with_loader_threads(args.loader_threads);
            let off = Engine::load_with_store(&args.model, options, store_path, cache)?;
            run(&off, &prompt[..8.min(prompt.len())], 2, false)?;
            let r = run(&off, &prompt, args.gen_len, false)?;
            let m = off.expert_cache_metrics().context("no cache metrics")?;
            let missed_per_token = m.bytes_loaded as f64 / r.decode_steps as f64;
            let disk_gbs = disk.gbs();
            let ceiling_s = missed_per_token / (disk_gbs * 1e9) + 1.0 / ram.decode_tok_s;
            let ceiling_tok_s = 1.0 / ceiling_s;
            let off_fraction = r.decode_tok_s / ceiling_tok_s;
            eprintln!(
                "offloaded ({} of {} experts' slots, {} MB, policy {}, window {}): decode {:.2} tok/s | \
                 hit rate {:.1}% | {:.1} MB missed/token | disk {:.2} GB/s (O_DIRECT probe), reads {:.2} GB/s | \
                 stall {:.2} s | ceiling {:.2} tok/s | {:.1}% of ceiling",
                slots,
                total,
                budget >> 20,
                args.cache_policy,
                args.window,
                r.decode_tok_s,
                100.0 * m.hit_rate(),
                missed_per_token / 1e6,
                disk_gbs,
                m.read_gbs(),
                m.stall_time.as_secs_f64(),
                ceiling_tok_s,
                100.0 * off_fraction
            );
            summary["offload"] = serde_json::json!({
                "policy": args.cache_policy.to_string(),
                "cache_slots": slots,
                "cache_bytes": budget,
                "decode_tok_s": r.decode_tok_s,
                "hit_rate": m.hit_rate(),
                "missed_bytes_per_token": missed_per_token.round() as u64,
                "disk_probe_gbs": disk_gbs,
                "disk_gbs": m.read_gbs(),
                "stall_s": m.stall_time.as_secs_f64(),
                "ceiling_tok_s": ceiling_tok_s,
                "ceiling_fraction": off_fraction,
            });
        }
        other => bail!("--offload {other}: expected ram or disk"),
    }
    println!("{summary}");
    Ok(())
}
