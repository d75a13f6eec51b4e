//! Writes a random-weight Hugging Face checkpoint (bf16 safetensors + config.json) of a
//! realistic shape, for benchmarks: `make-model --preset mixtral-bench --out /tmp/mixtral-bench`.
//!
//! Weights are uniform in ±1/√fan_in (norms 1), so activations stay in a sane range and
//! routing is spread over the experts. The file is streamed to disk tensor by tensor.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Write a random-weight MoE checkpoint of a realistic shape")]
struct Args {
    /// mixtral-bench, qwen3-moe-bench, or tiny-mixtral (a few MB, for tests).
    #[arg(long)]
    preset: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn preset(name: &str) -> Result<serde_json::Value> {
    let common = json!({
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    });
    let mut c = match name {
        "mixtral-bench" => json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8,
            "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 16,
            "num_key_value_heads": 4, "vocab_size": 32000, "rope_theta": 1e6,
        }),
        "qwen3-moe-bench" => json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 768,
            "num_hidden_layers": 8, "num_experts": 32, "num_experts_per_tok": 4,
            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
            "vocab_size": 32000, "rope_theta": 1e6, "norm_topk_prob": true,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
        }),
        "tiny-mixtral" => json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_local_experts": 4, "num_experts_per_tok": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 1e6,
        }),
        other => bail!("unknown preset {other:?} (mixtral-bench, qwen3-moe-bench, tiny-mixtral)"),
    };
    for (k, v) in common.as_object().unwrap() {
        c[k] = v.clone();
    }
    Ok(c)
}

/// Name, shape and init scale (0 = ones) of every tensor, in file order.
fn tensors(spec: &hetmoe::ModelSpec) -> Vec<(String, Vec<usize>, f32)> {
    use hetmoe::storage::{FfnKind, WeightKey::*};
    let a = spec.arch;
    let (h, v) = (spec.hidden, spec.vocab);
    let at = &spec.attention;
    let (qd, kvd) = (at.q_dim(), at.kv_dim());
    let lin =
        |k: hetmoe::storage::WeightKey, r: usize, c: usize| (k.name(a), vec![r, c], 1.0 / (c as f32).sqrt());
    let ones = |k: hetmoe::storage::WeightKey, n: usize| (k.name(a), vec![n], 0.0);
    let mut t = vec![(Embed.name(a), vec![v, h], 1.0)];
    for l in 0..spec.n_layers {
        t.push(ones(AttnNorm(l), h));
        t.push(ones(FfnNorm(l), h));
        t.push(lin(Q(l), qd, h));
        t.push(lin(K(l), kvd, h));
        t.push(lin(V(l), kvd, h));
        t.push(lin(O(l), h, qd));
        if at.qk_norm == hetmoe::storage::QkNorm::PerHead {
            t.push(ones(QNorm(l), at.head_dim));
            t.push(ones(KNorm(l), at.head_dim));
        }
        match &spec.layers[l].ffn {
            FfnKind::Dense { ffn } => {
                t.push(lin(DenseGate(l), *ffn, h));
                t.push(lin(DenseUp(l), *ffn, h));
                t.push(lin(DenseDown(l), h, *ffn));
            }
            FfnKind::Moe => {
                let f = spec.moe.expert_ffn;
                t.push(lin(Router(l), spec.moe.n_experts, h));
                for e in 0..spec.moe.n_experts {
                    t.push(lin(ExpertGate(l, e), f, h));
                    t.push(lin(ExpertUp(l, e), f, h));
                    t.push(lin(ExpertDown(l, e), h, f));
                }
            }
        }
    }
    t.push(ones(FinalNorm, h));
    t.push(lin(LmHead, v, h));
    t
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = preset(&args.preset)?;
    let spec = hetmoe::storage::parse_config(&config.to_string())?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::write(
        args.out.join("generation_config.json"),
        serde_json::to_string_pretty(&json!({"bos_token_id": 1, "eos_token_id": 2}))?,
    )?;

    let list = tensors(&spec);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in &list {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string();
    while (8 + header.len()) % 8 != 0 {
        header.push(' ');
    }
    let path = args.out.join("model.safetensors");
    let mut w = BufWriter::with_capacity(1 << 22, File::create(&path)?);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let bar = indicatif::ProgressBar::new(offset as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap(),
    );
    bar.set_message(format!("writing {}", path.display()));
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut buf = Vec::with_capacity(1 << 22);
    for (_, shape, scale) in &list {
        let mut left = shape.iter().product::<usize>();
        while left > 0 {
            let n = left.min(1 << 20);
            buf.clear();
            for _ in 0..n {
                let x = if *scale == 0.0 { 1.0 } else { rng.gen_range(-*scale..*scale) };
                buf.extend_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
            w.write_all(&buf)?;
            bar.inc(buf.len() as u64);
            left -= n;
        }
    }
    w.flush()?;
    bar.finish();
    eprintln!("wrote {} ({:.2} GB)", args.out.display(), (offset + 8 + header.len()) as f64 / 1e9);
    Ok(())
}
