//! The bundled trained model: tokenizer round trip and the greedy continuations that
//! transformers computed (`models/tiny-mixtral-trained/samples.json`).
#![allow(clippy::unwrap_used)]

mod common;

use hetmoe::{Engine, EngineOptions, GenerateOptions, LogitsMode, WeightFormat};

fn samples() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(common::bundled_model().join("samples.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["samples"].as_array().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn greedy_samples_match_transformers_token_for_token() {
    let engine = Engine::load(common::bundled_model(), EngineOptions::default()).unwrap();
    let samples = samples();
    assert_eq!(samples.len(), 8);
    let prompts: Vec<Vec<u32>> = samples.iter().map(|s| ids(&s["prompt_ids"])).collect();
    for (s, p) in samples.iter().zip(&prompts) {
        assert_eq!(&engine.encode(s["prompt"].as_str().unwrap()).unwrap(), p, "tokenizer on {}", s["prompt"]);
    }
    let opts = GenerateOptions { max_new_tokens: 48, stop_tokens: Some(vec![]), ..Default::default() };
    // All eight prompts in one batch: each must still give exactly its own continuation.
    let gens = engine.generate_batch(&prompts, &opts).unwrap();
    for (s, g) in samples.iter().zip(&gens) {
        assert_eq!(g.generated_ids, ids(&s["generated_ids"]), "continuation of {}", s["prompt"]);
        assert_eq!(engine.decode(&g.generated_ids).unwrap(), s["completion"].as_str().unwrap());
    }
}

#[test]
fn generate_text_streams_the_completion() {
    let engine = Engine::load(common::bundled_model(), EngineOptions::default()).unwrap();
    let s = &samples()[0];
    let opts = GenerateOptions { max_new_tokens: 48, stop_tokens: Some(vec![]), ..Default::default() };
    let mut streamed = String::new();
    let g =
        engine.generate_text(s["prompt"].as_str().unwrap(), &opts, |piece| streamed.push_str(piece)).unwrap();
    assert_eq!(streamed, s["completion"].as_str().unwrap());
    assert_eq!(g.generated_ids.len(), 48);
}

/// Quantized weights: teacher-forced on the bf16 continuation, q8's greedy choice agrees
/// with bf16's at (nearly) every position and q4's at most. Prints the measured figures.
#[test]
fn quantized_weights_stay_close_to_bf16() {
    use hetmoe::LogitsMode;
    let base = Engine::load(common::bundled_model(), EngineOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = samples().iter().map(|s| ids(&s["prompt_ids"])).collect();
    let opts = GenerateOptions { max_new_tokens: 32, stop_tokens: Some(vec![]), ..Default::default() };
    let texts: Vec<Vec<u32>> = base
        .generate_batch(&prompts, &opts)
        .unwrap()
        .into_iter()
        .map(|g| [g.prompt_ids, g.generated_ids].concat())
        .collect();
    let vocab = base.spec().vocab;
    let reference: Vec<Vec<f32>> =
        texts.iter().map(|t| base.forward(&mut base.new_sequence(), t, LogitsMode::All).unwrap()).collect();
    for (format, min_agree) in [(WeightFormat::Q8, 0.97), (WeightFormat::Q4, 0.85)] {
        let q =
            Engine::load(common::bundled_model(), EngineOptions { weights: format, ..Default::default() })
                .unwrap();
        let (mut agree, mut total, mut max_err, mut sum_err) = (0, 0, 0f32, 0f64);
        for (t, want) in texts.iter().zip(&reference) {
            let got = q.forward(&mut q.new_sequence(), t, LogitsMode::All).unwrap();
            agree += common::top1_agreement(&got, want, vocab);
            total += want.len() / vocab;
            max_err = max_err.max(common::max_abs_diff(want, &got));
            sum_err += want.iter().zip(&got).map(|(x, y)| (x - y).abs() as f64).sum::<f64>();
        }
        let mean_err = sum_err / (total * vocab) as f64;
        let frac = agree as f64 / total as f64;
        eprintln!("{format}: top-1 agreement with bf16 {frac:.3} over {total} positions; logit error max {max_err:.3}, mean {mean_err:.4}");
        assert!(frac >= min_agree, "{format}: only {frac:.3} of greedy choices agree with bf16");
    }
}

/// Phase profiling counts every step, splits its time between the phases (each of which
/// ran), and leaves the logits as they are.
#[test]
fn phase_times_cover_the_steps_and_change_nothing() {
    let options = EngineOptions { threads: Some(2), ..Default::default() };
    let engine = Engine::load(common::bundled_model(), options).unwrap();
    let prompt = [1u32, 417, 1142, 1217];
    let run = |profile: bool| {
        let mut seq = engine.new_sequence();
        seq.profile_phases(profile);
        let mut logits = vec![engine.forward(&mut seq, &prompt, LogitsMode::Last).unwrap()];
        for t in [5u32, 9, 300, 41, 7] {
            logits.push(engine.forward(&mut seq, &[t], LogitsMode::Last).unwrap());
        }
        (logits, seq.phase_times().cloned())
    };
    let (plain, none) = run(false);
    assert!(none.is_none(), "profiling is off by default");
    let (profiled, times) = run(true);
    assert_eq!(profiled, plain, "profiling changed the logits");
    let t = times.unwrap();
    assert_eq!(t.steps, 6);
    for (name, d) in [
        ("attention_projections", t.attention_projections),
        ("attention", t.attention),
        ("ffn", t.ffn),
        ("lm_head", t.lm_head),
    ] {
        assert!(d > std::time::Duration::ZERO, "{name} not timed: {t:?}");
    }
    assert!(t.attention_projections + t.attention + t.ffn + t.lm_head <= t.total, "{t:?}");
    assert_eq!(t.other(), t.total - (t.attention_projections + t.attention + t.ffn + t.lm_head));
}
