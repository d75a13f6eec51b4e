//! Generate text with a Hugging Face MoE checkpoint.
//!
//! `cargo run --release --example generate -- --prompt "The Rust programming language"`
//! streams the continuation to stdout and ends with one JSON summary line.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hetmoe::{
    CacheConfig, Engine, EngineOptions, GenerateOptions, KvCacheDtype, PolicyKind, Sampling, WeightFormat,
};

#[derive(Parser, Debug)]
#[command(about = "Generate text with a Mixture-of-Experts model (Hugging Face folder)")]
struct Args {
    /// Model folder (config.json, *.safetensors, tokenizer.json). Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text (tokenized with the folder's tokenizer.json).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no top-k filter.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Weights in memory: bf16 (as stored), q8 or q4 (quantized at load).
    #[arg(long, default_value = "bf16")]
    weights: WeightFormat,
    /// KV cache element type: f32 (exact) or bf16 (half the bytes).
    #[arg(long, default_value = "f32")]
    kv_cache: KvCacheDtype,
    /// With --offload disk: prefetch the experts the next layer will probably use
    /// (skip-gate guess: the next layer's router on this layer's output).
    #[arg(long)]
    prefetch: bool,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Where routed experts live: `ram` (memory-mapped with the model) or `disk` (read
    /// from the expert store `--store` through a cache of `--expert-cache-mb`).
    #[arg(long, default_value = "ram")]
    offload: String,
    /// Expert store made by the `repack` example (required with `--offload disk`).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Byte budget of the host expert cache, in MB (2^20 bytes).
    #[arg(long, default_value_t = 256)]
    expert_cache_mb: u64,
    /// Eviction policy of the expert cache: score, lru or lfu.
    #[arg(long, default_value = "score")]
    cache_policy: PolicyKind,
    /// Keep experts used by the last K tokens resident ("windowing"; 0 = off).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Threads reading experts from disk.
    #[arg(long, default_value_t = 2)]
    loader_threads: usize,
    /// Write f32 logits to this safetensors file: `prompt_logits` [n_prompt, vocab],
    /// `step_logits` [n_new, vocab].
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

fn bundled_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral-trained")
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let model = args.model.clone().unwrap_or_else(bundled_model);

    let t0 = Instant::now();
    let options = EngineOptions {
        threads: args.threads,
        weights: args.weights,
        kv_cache: args.kv_cache,
        prefetch: args.prefetch,
    };
    let engine = match args.offload.as_str() {
        "ram" => Engine::load(&model, options),
        "disk" => {
            let store =
                args.store.as_ref().context("--offload disk needs --store STORE (see the repack example)")?;
            let cache = CacheConfig::from_mb(args.expert_cache_mb, 1)
                .with_policy(args.cache_policy)
                .with_window(args.window)
                .with_loader_threads(args.loader_threads);
            Engine::load_with_store(&model, options, store, cache)
        }
        other => bail!("--offload {other}: expected ram or disk"),
    }
    .with_context(|| format!("loading {}", model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();

    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => engine.encode(text)?,
        (None, None) => engine.encode("The Rust programming language").context("no --prompt given")?,
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens: args.ignore_eos.then(Vec::new),
        keep_logits: args.logits_out.is_some(),
    };

    let mut out = std::io::stdout().lock();
    let tok = engine.tokenizer();
    if let Some(tok) = tok {
        write!(out, "{}", tok.decode(&prompt_ids)?)?;
    }
    out.flush()?;
    // Stream: decode the whole continuation each step and print what is new, so
    // multi-token characters come out whole.
    let mut shown = String::new();
    let mut ids = Vec::new();
    let mut stream_err = None;
    let gen = engine.generate(&prompt_ids, &opts, |id| {
        ids.push(id);
        let r = match tok {
            Some(tok) => tok.decode(&ids).map(|text| {
                if !text.ends_with('\u{FFFD}') && text.len() > shown.len() && text.starts_with(shown.as_str())
                {
                    let piece = text[shown.len()..].to_string();
                    shown = text;
                    piece
                } else {
                    String::new()
                }
            }),
            None => Ok(format!("{id} ")),
        };
        match r.map_err(anyhow::Error::from).and_then(|p| Ok(write!(out, "{p}").and_then(|_| out.flush())?)) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                stream_err = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    writeln!(out)?;

    if let Some(path) = &args.logits_out {
        write_logits(path, &gen, engine.spec().vocab)?;
    }
    let mut summary = serde_json::json!({
        "prompt_ids": gen.prompt_ids,
        "generated_ids": gen.generated_ids,
        "n_prompt": gen.prompt_ids.len(),
        "n_new": gen.generated_ids.len(),
        "load_s": load_s,
        "prefill_tok_s": gen.prefill_tok_s(),
        "decode_tok_s": gen.decode_tok_s(),
    });
    if let Some(m) = engine.expert_cache_metrics() {
        let per_layer: Vec<String> = (0..engine.spec().n_layers)
            .filter(|&l| engine.spec().is_moe_layer(l))
            .map(|l| format!("{:.1}%", 100.0 * m.layer_hit_rate(l)))
            .collect();
        eprintln!(
            "expert cache ({}): hit rate {:.1}% (per layer {}), {} loads, {:.1} MB read at {:.2} GB/s, \
             compute stalled {:.3} s",
            args.cache_policy,
            100.0 * m.hit_rate(),
            per_layer.join(" "),
            m.loads,
            m.bytes_loaded as f64 / 1e6,
            m.read_gbs(),
            m.stall_time.as_secs_f64()
        );
        summary["hit_rate"] = m.hit_rate().into();
        summary["disk_bytes"] = m.bytes_loaded.into();
        summary["disk_gbs"] = m.read_gbs().into();
        summary["stall_s"] = m.stall_time.as_secs_f64().into();
    }
    writeln!(out, "{summary}")?;
    Ok(())
}

fn write_logits(path: &std::path::Path, gen: &hetmoe::Generation, vocab: usize) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let prompt = bytes(gen.prompt_logits.as_deref().unwrap_or_default());
    let steps = bytes(gen.step_logits.as_deref().unwrap_or_default());
    let views = vec![
        ("prompt_logits", TensorView::new(Dtype::F32, vec![gen.prompt_ids.len(), vocab], &prompt)?),
        ("step_logits", TensorView::new(Dtype::F32, vec![gen.generated_ids.len(), vocab], &steps)?),
    ];
    safetensors::serialize_to_file(views, &None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
