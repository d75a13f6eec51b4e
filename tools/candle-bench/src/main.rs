//! candle 0.9.2 baseline on a HF Mixtral or Qwen3-MoE checkpoint: prefill N random tokens,
//! then greedy decode.
//! usage: candle-bench DIR f32 PROMPT_LEN GEN_LEN (candle 0.9 has no bf16 matmul on the CPU)
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::{mixtral, qwen3_moe};
use std::time::Instant;

enum Model {
    Mixtral(mixtral::Model),
    Qwen3Moe(qwen3_moe::ModelForCausalLM),
}

impl Model {
    fn load(cfg: &serde_json::Value, vb: VarBuilder) -> Result<Model> {
        let mut cfg = cfg.clone();
        Ok(match cfg["model_type"].as_str() {
            Some("mixtral") => {
                if cfg["sliding_window"].is_null() {
                    cfg["sliding_window"] = serde_json::json!(4096);
                }
                cfg["use_flash_attn"] = serde_json::json!(false);
                Model::Mixtral(mixtral::Model::new(&serde_json::from_value(cfg)?, vb)?)
            }
            Some("qwen3_moe") => {
                // Fields candle's config requires that the checkpoint leaves at their defaults.
                for (k, v) in [
                    ("attention_bias", serde_json::json!(false)),
                    ("use_sliding_window", serde_json::json!(false)),
                    ("max_window_layers", cfg["num_hidden_layers"].clone()),
                ] {
                    if cfg[k].is_null() {
                        cfg[k] = v;
                    }
                }
                Model::Qwen3Moe(qwen3_moe::ModelForCausalLM::new(&serde_json::from_value(cfg)?, vb)?)
            }
            other => anyhow::bail!("unsupported model_type {other:?} (mixtral, qwen3_moe)"),
        })
    }

    /// Logits of the last position.
    fn forward(&mut self, x: &Tensor, offset: usize) -> Result<Tensor> {
        Ok(match self {
            Model::Mixtral(m) => m.forward(x, offset)?,
            Model::Qwen3Moe(m) => m.forward(x, offset)?,
        })
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&a[1]);
    let dtype = if a[2] == "bf16" { DType::BF16 } else { DType::F32 };
    let (plen, glen): (usize, usize) = (a[3].parse()?, a[4].parse()?);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let dev = Device::Cpu;
    let t = Instant::now();
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], dtype, &dev)? };
    let mut model = Model::load(&cfg, vb.clone())?;
    eprintln!("load {:.1} s", t.elapsed().as_secs_f64());
    let prompt: Vec<u32> = (0..plen as u32).map(|i| 3 + (i * 7919) % 31000).collect();
    let run = |model: &mut Model, n_gen: usize| -> Result<(f64, f64)> {
        let t = Instant::now();
        let x = Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?;
        let logits = model.forward(&x, 0)?;
        let mut next = logits.flatten_all()?.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n_gen {
            let x = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
            let logits = model.forward(&x, plen + i)?;
            next = logits.flatten_all()?.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        }
        Ok((plen as f64 / prefill, n_gen as f64 / t.elapsed().as_secs_f64()))
    };
    run(&mut model, 2)?; // warm-up with the same prompt length (then a fresh KV cache)
    let mut model = Model::load(&cfg, vb)?;
    let (p, d) = run(&mut model, glen - 1)?;
    println!("candle {} prefill {p:.1} tok/s decode {d:.2} tok/s", a[2]);
    Ok(())
}
