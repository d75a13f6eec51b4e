//! Hugging Face MoE checkpoint → hetmoe expert store (format: `docs/expert-store.md`).
//!
//! ```text
//! cargo run --release --example repack -- --model models/tiny-mixtral-trained --out /tmp/tiny.hmstore --weights q8
//! ```

use std::path::PathBuf;

use clap::Parser;
use hetmoe_storage::expert_store::{repack, Encoding, ExpertStore, RepackControl};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(about = "Repack the routed experts of a checkpoint into an expert store")]
struct Args {
    /// Hugging Face model folder (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Store file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Weight encoding: bf16, f32, q8 or q4.
    #[arg(long, default_value = "bf16")]
    weights: Encoding,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} · {msg}",
    )?);
    let start = std::time::Instant::now();
    let summary = repack(&args.model, &args.out, args.weights, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("expert {}/{}", p.experts_done, p.experts_total));
        RepackControl::Continue
    })?;
    bar.finish();
    let store = ExpertStore::open(&summary.path)?;
    store.check_source(&args.model)?;
    println!(
        "{}",
        serde_json::json!({
            "store": summary.path,
            "weights": summary.encoding.name(),
            "experts": summary.experts,
            "bytes": summary.file_bytes,
            "extent_bytes": store.extent_len(),
            "seconds": start.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
