//! Replays a routing trace through the expert cache under each eviction policy and prints
//! hit rates side by side.
//!
//! ```text
//! cargo run --release --example replay -- TRACE.safetensors [--budget-frac 0.25] [--window K]
//! ```
//!
//! The trace is a safetensors file with `topk_ids` (u8 `[N, L, K]`, the experts each token
//! chose per layer) and `router_probs` (f16 or f32 `[N, L, E]`), as in the bundled model's
//! `traces/trace.safetensors`. Each token is one decode step per layer: `on_step` with its
//! router probabilities, then the token's K experts are acquired (held together, as a decode
//! step would) and released. The cache persists across sequences; the source is in memory
//! (tiny experts), so only residency is measured, not time.

use anyhow::{bail, Context, Result};
use clap::Parser;
use hetmoe_offload::{CacheConfig, ExpertCache, ExpertId, ExpertKey, LayerId, MemSource, PolicyKind, Step};
use safetensors::{Dtype, SafeTensors};

#[derive(Parser, Debug)]
#[command(about = "Replay a routing trace through the expert cache's eviction policies")]
struct Args {
    /// Trace file (safetensors with topk_ids and router_probs).
    trace: std::path::PathBuf,
    /// Cache budget as a fraction of all routed experts (rounded down to whole slots).
    #[arg(long, default_value_t = 0.25)]
    budget_frac: f64,
    /// Cache budget in expert slots (overrides --budget-frac).
    #[arg(long)]
    slots: Option<usize>,
    /// Windowing: keep experts used by the previous K tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Score policy α.
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// Score policy p (default 2·top_k).
    #[arg(long)]
    top_p: Option<usize>,
    /// Replay only the first N tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
}

struct Trace {
    n_tokens: usize,
    n_layers: usize,
    top_k: usize,
    n_experts: usize,
    topk: Vec<u8>,
    probs: Vec<f32>,
}

fn load(path: &std::path::Path) -> Result<Trace> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).context("parsing the trace")?;
    let ids = st.tensor("topk_ids").context("trace has no topk_ids")?;
    let probs = st.tensor("router_probs").context("trace has no router_probs")?;
    let (&[n, l, k], &[n2, l2, e]) = (ids.shape(), probs.shape()) else {
        bail!("topk_ids {:?} / router_probs {:?} are not [N, L, K] / [N, L, E]", ids.shape(), probs.shape());
    };
    if (n, l) != (n2, l2) || ids.dtype() != Dtype::U8 {
        bail!("topk_ids ({:?} {:?}) and router_probs {:?} disagree", ids.dtype(), ids.shape(), probs.shape());
    }
    let p: Vec<f32> = match probs.dtype() {
        Dtype::F16 => {
            probs.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        Dtype::F32 => {
            probs.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        d => bail!("router_probs dtype {d:?} (expected F16 or F32)"),
    };
    Ok(Trace { n_tokens: n, n_layers: l, top_k: k, n_experts: e, topk: ids.data().to_vec(), probs: p })
}

struct Outcome {
    hit_rate: f64,
    per_layer: Vec<f64>,
    loads: u64,
    evictions: u64,
}

fn replay(t: &Trace, n_tokens: usize, slots: usize, policy: PolicyKind, window: usize) -> Result<Outcome> {
    const BYTES: usize = 64;
    let src = MemSource::synthetic(t.n_layers, t.n_experts, BYTES);
    let cfg = CacheConfig::new((slots * BYTES) as u64, t.top_k).with_policy(policy).with_window(window);
    let cache = ExpertCache::new(src, cfg)?;
    let (l_n, k, e) = (t.n_layers, t.top_k, t.n_experts);
    let mut used = vec![ExpertId(0); k];
    let mut guards = Vec::with_capacity(k);
    for tok in 0..n_tokens {
        for layer in 0..l_n {
            let row = (tok * l_n + layer) * k;
            for (u, &id) in used.iter_mut().zip(&t.topk[row..row + k]) {
                *u = ExpertId(id as u16);
            }
            let p = &t.probs[(tok * l_n + layer) * e..(tok * l_n + layer + 1) * e];
            cache.on_step(&Step { layer: LayerId(layer as u16), n_tokens: 1, router_probs: p, used: &used });
            for u in &used {
                guards.push(cache.acquire(ExpertKey { layer: LayerId(layer as u16), expert: *u })?);
            }
            guards.clear();
        }
    }
    let m = cache.metrics();
    Ok(Outcome {
        hit_rate: m.hit_rate(),
        per_layer: (0..l_n).map(|l| m.layer_hit_rate(l)).collect(),
        loads: m.loads,
        evictions: m.evictions,
    })
}

/// Belady's MIN over the same accesses (evict the resident expert whose next use is
/// farthest, never one of the current step's): the best hit rate any eviction policy
/// could reach without prefetching, for reference.
fn oracle(t: &Trace, n_tokens: usize, slots: usize) -> Outcome {
    let (l_n, k) = (t.n_layers, t.top_k);
    let n = n_tokens * l_n * k;
    let key = |i: usize| (i / k % l_n, t.topk[i] as usize);
    // next[i]: index of the next access of the same expert after access i.
    let mut next = vec![usize::MAX; n];
    let mut seen = std::collections::HashMap::new();
    for i in (0..n).rev() {
        next[i] = seen.insert(key(i), i).unwrap_or(usize::MAX);
    }
    let mut resident: Vec<((usize, usize), usize)> = Vec::with_capacity(slots); // (key, next use)
    let (mut hits, mut layer_hits, mut loads) = (0u64, vec![0u64; l_n], 0u64);
    for i in 0..n {
        let kk = key(i);
        let step_start = i - i % k;
        if let Some(r) = resident.iter_mut().find(|r| r.0 == kk) {
            r.1 = next[i];
            hits += 1;
            layer_hits[kk.0] += 1;
            continue;
        }
        loads += 1;
        if resident.len() == slots {
            let step: Vec<_> = (step_start..i).map(key).collect();
            let victim = (0..resident.len())
                .filter(|&j| !step.contains(&resident[j].0))
                .max_by_key(|&j| resident[j].1)
                .unwrap_or(0);
            resident.swap_remove(victim);
        }
        resident.push((kk, next[i]));
    }
    let per_layer_total = (n / l_n) as f64;
    Outcome {
        hit_rate: hits as f64 / n as f64,
        per_layer: layer_hits.iter().map(|&h| h as f64 / per_layer_total).collect(),
        loads,
        evictions: loads.saturating_sub(slots as u64),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let t = load(&args.trace)?;
    let total = t.n_layers * t.n_experts;
    let slots = args.slots.unwrap_or((total as f64 * args.budget_frac).floor() as usize);
    let n_tokens = args.max_tokens.map_or(t.n_tokens, |m| m.min(t.n_tokens));
    println!(
        "trace: {} tokens (replaying {n_tokens}), {} layers x {} experts, top-{}; budget {slots} of {total} expert slots ({:.1}%), window {}",
        t.n_tokens,
        t.n_layers,
        t.n_experts,
        t.top_k,
        100.0 * slots as f64 / total as f64,
        args.window
    );
    let policies = [
        ("score", PolicyKind::Score { alpha: args.alpha, top_p: args.top_p }),
        ("lru", PolicyKind::Lru),
        ("lfu", PolicyKind::Lfu),
    ];
    print!("{:<7} {:>9}", "policy", "hit rate");
    for l in 0..t.n_layers {
        print!(" {:>8}", format!("layer {l}"));
    }
    println!(" {:>10} {:>10}", "loads", "evictions");
    for (name, policy) in policies {
        let o = replay(&t, n_tokens, slots, policy, args.window)?;
        print!("{name:<7} {:>8.2}%", 100.0 * o.hit_rate);
        for h in &o.per_layer {
            print!(" {:>7.2}%", 100.0 * h);
        }
        println!(" {:>10} {:>10}", o.loads, o.evictions);
    }
    let o = oracle(&t, n_tokens, slots);
    print!("{:<7} {:>8.2}%", "oracle", 100.0 * o.hit_rate);
    for h in &o.per_layer {
        print!(" {:>7.2}%", 100.0 * h);
    }
    println!(" {:>10} {:>10}   (Belady MIN: bound for any policy without prefetch)", o.loads, o.evictions);
    Ok(())
}
