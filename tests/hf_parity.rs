#![allow(clippy::unwrap_used)]
//! The engine against Hugging Face transformers on the tiny fixtures of every supported
//! architecture: logits, hidden states, routing and greedy tokens.

mod common;

use common::*;
use hetmoe::{BatchItem, Engine, EngineOptions, ForwardObserver, GenerateOptions, LogitsMode, Routing};

/// Records the named activations of one forward pass.
#[derive(Default)]
struct Recorder {
    hidden: Vec<Vec<f32>>,
    final_hidden: Vec<f32>,
    moe_input: Vec<Vec<f32>>,
    moe_output: Vec<Vec<f32>>,
    routing: Vec<Routing>,
    moe_layers: Vec<usize>,
}

impl ForwardObserver for Recorder {
    fn hidden_state(&mut self, _index: usize, x: &[f32]) {
        self.hidden.push(x.to_vec());
    }
    fn moe_block(&mut self, layer: usize, input: &[f32], routing: &Routing, output: &[f32]) {
        self.moe_layers.push(layer);
        self.moe_input.push(input.to_vec());
        self.moe_output.push(output.to_vec());
        self.routing.push(routing.clone());
    }
    fn final_hidden(&mut self, x: &[f32]) {
        self.final_hidden = x.to_vec();
    }
}

fn load(arch: &str) -> Engine {
    Engine::load(fixture(arch).join("model"), EngineOptions::default()).unwrap()
}

/// Runs ids through a fresh sequence, recording everything.
fn run_recorded(engine: &Engine, ids: &[u32]) -> (Vec<f32>, Recorder) {
    let mut seq = engine.new_sequence();
    let mut rec = Recorder::default();
    let mut items = [BatchItem { seq: &mut seq, tokens: ids }];
    let logits = engine.forward_batch(&mut items, LogitsMode::All, &mut rec).unwrap().remove(0);
    (logits, rec)
}

fn check_routing(
    arch: &str,
    rec: &Recorder,
    r: &Reference,
    ids_name: &str,
    weights_name: &str,
    with_logits: bool,
) {
    let want_ids = r.get(ids_name).usize();
    let want_w = &r.get(weights_name).f32;
    assert_eq!(rec.moe_layers, r.get("moe_layers").usize(), "{arch}: MoE layers");
    let per_layer = want_ids.len() / rec.routing.len();
    for (m, routing) in rec.routing.iter().enumerate() {
        let span = m * per_layer..(m + 1) * per_layer;
        assert_eq!(routing.expert_ids, want_ids[span.clone()], "{arch}: {ids_name} of MoE layer {m}");
        assert_close(
            &format!("{arch}: {weights_name} layer {m}"),
            &routing.weights,
            &want_w[span],
            ROUTER_TOL,
        );
        if with_logits {
            let rl = &r.get("router_logits").f32;
            let n = routing.router_logits.len();
            assert_close(
                &format!("{arch}: router logits {m}"),
                &routing.router_logits,
                &rl[m * n..(m + 1) * n],
                ROUTER_TOL,
            );
        }
    }
}

#[test]
fn prefill_matches_reference_for_every_architecture() {
    for arch in ARCHS {
        let r = Reference::load(arch);
        let engine = load(arch);
        let (logits, rec) = run_recorded(&engine, &r.get("prompt_ids").ids());
        let d = assert_close(
            &format!("{arch}: prefill logits"),
            &logits,
            &r.get("prefill_logits").f32,
            LOGITS_TOL,
        );
        eprintln!("{arch}: prefill logits max abs diff {d:e}");
        let hs = r.get("hidden_states");
        let per = hs.f32.len() / hs.shape[0];
        assert_eq!(rec.hidden.len(), hs.shape[0], "{arch}: number of hidden states");
        for (i, h) in rec.hidden.iter().enumerate() {
            assert_close(
                &format!("{arch}: hidden state {i}"),
                h,
                &hs.f32[i * per..(i + 1) * per],
                HIDDEN_TOL,
            );
        }
        assert_close(
            &format!("{arch}: final norm"),
            &rec.final_hidden,
            &r.get("final_hidden").f32,
            HIDDEN_TOL,
        );
        let (mi, mo) = (&r.get("moe_input").f32, &r.get("moe_output").f32);
        for (m, (inp, out)) in rec.moe_input.iter().zip(&rec.moe_output).enumerate() {
            let n = inp.len();
            assert_close(&format!("{arch}: moe input {m}"), inp, &mi[m * n..(m + 1) * n], HIDDEN_TOL);
            assert_close(&format!("{arch}: moe output {m}"), out, &mo[m * n..(m + 1) * n], HIDDEN_TOL);
        }
        check_routing(arch, &rec, &r, "router_topk_ids", "router_topk_weights", true);
    }
}

#[test]
fn greedy_generation_matches_reference_for_every_architecture() {
    for arch in ARCHS {
        let r = Reference::load(arch);
        let engine = load(arch);
        let want = r.get("generated_ids").ids();
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            stop_tokens: Some(vec![]),
            keep_logits: true,
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let g = engine
            .generate(&r.get("prompt_ids").ids(), &opts, |id| {
                streamed.push(id);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(g.generated_ids, want, "{arch}: greedy tokens");
        assert_eq!(streamed, want, "{arch}: streamed tokens");
        let d = assert_close(
            &format!("{arch}: step logits"),
            g.step_logits.as_ref().unwrap(),
            &r.get("gen_step_logits").f32,
            LOGITS_TOL,
        );
        eprintln!("{arch}: step logits max abs diff {d:e}");
    }
}

#[test]
fn full_recompute_matches_reference_routing_at_every_position() {
    for arch in ARCHS {
        let r = Reference::load(arch);
        let engine = load(arch);
        let (logits, rec) = run_recorded(&engine, &r.get("full_ids").ids());
        let d = assert_close(&format!("{arch}: full logits"), &logits, &r.get("full_logits").f32, LOGITS_TOL);
        eprintln!("{arch}: full-recompute logits max abs diff {d:e}");
        check_routing(arch, &rec, &r, "full_router_topk_ids", "full_router_topk_weights", false);
    }
}

#[test]
fn decode_in_pieces_equals_one_prefill_bit_for_bit() {
    let r = Reference::load("qwen3_moe");
    let engine = load("qwen3_moe");
    let ids = r.get("full_ids").ids();
    let mut whole = engine.new_sequence();
    let all = engine.forward(&mut whole, &ids, LogitsMode::All).unwrap();
    let mut seq = engine.new_sequence();
    let mut pieces = engine.forward(&mut seq, &ids[..10], LogitsMode::All).unwrap();
    for chunk in ids[10..].chunks(7) {
        pieces.extend(engine.forward(&mut seq, chunk, LogitsMode::All).unwrap());
    }
    // Different query batching changes no reduction order: identical, not merely close.
    assert_eq!(pieces, all);
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let r = Reference::load("mixtral");
    let single = load("mixtral");
    let sharded = Engine::load(fixture("mixtral").join("model_sharded"), EngineOptions::default()).unwrap();
    let ids = r.get("prompt_ids").ids();
    let a = single.forward(&mut single.new_sequence(), &ids, LogitsMode::All).unwrap();
    let b = sharded.forward(&mut sharded.new_sequence(), &ids, LogitsMode::All).unwrap();
    assert_eq!(a, b, "sharded and single-file logits differ");
}

#[test]
fn batch_of_different_lengths_matches_reference_and_single_runs() {
    let r = Reference::load("mixtral");
    let engine = load("mixtral");
    let batch_ids = r.get("batch.input_ids");
    let mask = &r.get("batch.attention_mask").i64;
    let width = batch_ids.shape[1];
    let prompts: Vec<Vec<u32>> = (0..batch_ids.shape[0])
        .map(|row| {
            (0..width)
                .filter(|&c| mask[row * width + c] == 1)
                .map(|c| batch_ids.i64[row * width + c] as u32)
                .collect()
        })
        .collect();
    assert_eq!(prompts[1].len(), 13);
    let n_new = r.get("batch.generated_ids").shape[1];
    let opts = GenerateOptions {
        max_new_tokens: n_new,
        stop_tokens: Some(vec![]),
        keep_logits: true,
        ..Default::default()
    };
    let batched = engine.generate_batch(&prompts, &opts).unwrap();
    let want_ids = r.get("batch.generated_ids").ids();
    let want_steps = &r.get("batch.gen_step_logits").f32;
    let want_prefill = &r.get("batch.prefill_logits").f32;
    let vocab = engine.spec().vocab;
    for (row, g) in batched.iter().enumerate() {
        assert_eq!(g.generated_ids, want_ids[row * n_new..(row + 1) * n_new], "batch row {row} tokens");
        let steps = &want_steps[row * n_new * vocab..(row + 1) * n_new * vocab];
        assert_close(
            &format!("batch row {row} step logits"),
            g.step_logits.as_ref().unwrap(),
            steps,
            LOGITS_TOL,
        );
        let pad = width - prompts[row].len();
        let pre = &want_prefill[(row * width + pad) * vocab..(row + 1) * width * vocab];
        assert_close(
            &format!("batch row {row} prefill logits"),
            g.prompt_logits.as_ref().unwrap(),
            pre,
            LOGITS_TOL,
        );
        let alone = engine.generate_batch(&prompts[row..row + 1], &opts).unwrap().remove(0);
        assert_eq!(alone.generated_ids, g.generated_ids, "row {row}: batched vs alone tokens");
        assert_eq!(alone.step_logits, g.step_logits, "row {row}: batched vs alone logits must be identical");
        assert_eq!(alone.prompt_logits, g.prompt_logits, "row {row}: batched vs alone prefill logits");
    }
}

#[test]
fn thread_count_does_not_change_logits() {
    let r = Reference::load("olmoe");
    let ids = r.get("full_ids").ids();
    let run = |threads| {
        let e = Engine::load(
            fixture("olmoe").join("model"),
            EngineOptions { threads: Some(threads), ..Default::default() },
        )
        .unwrap();
        e.forward(&mut e.new_sequence(), &ids, LogitsMode::All).unwrap()
    };
    assert_eq!(run(1), run(3));
}

/// q8 weights on the fixtures: greedy tokens against the float32 reference (teacher-forced
/// top-1 agreement over the full sequence) and the logit error, printed for the notes.
#[test]
fn q8_weights_keep_fixture_greedy_choices() {
    use hetmoe::WeightFormat;
    for arch in ARCHS {
        let r = Reference::load(arch);
        let e = Engine::load(
            fixture(arch).join("model"),
            EngineOptions { weights: WeightFormat::Q8, ..Default::default() },
        )
        .unwrap();
        let ids = r.get("full_ids").ids();
        let got = e.forward(&mut e.new_sequence(), &ids, LogitsMode::All).unwrap();
        let want = &r.get("full_logits").f32;
        let n = ids.len();
        let agree = top1_agreement(&got, want, e.spec().vocab);
        let d = max_abs_diff(&got, want);
        eprintln!("{arch} q8: top-1 agreement {agree}/{n}, max logit error {d:.4}");
        assert!(agree * 10 >= n * 9, "{arch}: q8 top-1 agreement {agree}/{n}");
    }
}

/// Shapes the main fixtures do not cover (tied embeddings, top-1 and top-3 routing, no GQA
/// and 4:1 GQA, dense layers, a sliding window shorter than the sequence, clip_qkv,
/// attention bias), made by `tools/make_variant_fixtures.py` with transformers.
#[test]
fn variant_shapes_match_reference() {
    let dir = repo().join("tests/fixtures/variants");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4);
    for name in names {
        let root = dir.join(&name);
        let bytes = std::fs::read(root.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ints = |n: &str| -> Vec<u32> {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect()
        };
        let floats = |n: &str| -> Vec<f32> {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let engine = Engine::load(root.join("model"), EngineOptions::default()).unwrap();
        let (prompt, generated) = (ints("prompt_ids"), ints("generated_ids"));
        let full = [prompt.clone(), generated.clone()].concat();
        let logits = engine.forward(&mut engine.new_sequence(), &full, LogitsMode::All).unwrap();
        let d = assert_close(&format!("{name:?}: full logits"), &logits, &floats("full_logits"), LOGITS_TOL);
        let opts = GenerateOptions {
            max_new_tokens: generated.len(),
            stop_tokens: Some(vec![]),
            keep_logits: true,
            ..Default::default()
        };
        let g = engine.generate(&prompt, &opts, |_| std::ops::ControlFlow::Continue(())).unwrap();
        assert_eq!(g.generated_ids, generated, "{name:?}: greedy tokens");
        assert_close(
            &format!("{name:?}: step logits"),
            g.step_logits.as_ref().unwrap(),
            &floats("gen_step_logits"),
            LOGITS_TOL,
        );
        eprintln!("{name:?}: full logits max abs diff {d:e}");
    }
}

/// A bf16 KV cache rounds keys and values once: greedy choices of the float32 reference
/// are kept (teacher-forced over the full sequence), batching still changes nothing.
#[test]
fn bf16_kv_cache_keeps_greedy_choices() {
    use hetmoe::KvCacheDtype;
    for arch in ARCHS {
        let r = Reference::load(arch);
        let opts = EngineOptions { kv_cache: KvCacheDtype::Bf16, ..Default::default() };
        let e = Engine::load(fixture(arch).join("model"), opts).unwrap();
        let ids = r.get("full_ids").ids();
        let got = e.forward(&mut e.new_sequence(), &ids, LogitsMode::All).unwrap();
        let want = &r.get("full_logits").f32;
        let n = ids.len();
        let agree = top1_agreement(&got, want, e.spec().vocab);
        eprintln!(
            "{arch} bf16 KV: top-1 agreement {agree}/{n}, max logit error {:.2e}",
            max_abs_diff(&got, want)
        );
        assert!(agree * 20 >= n * 19, "{arch}: bf16 KV top-1 agreement {agree}/{n}");
        let p = r.get("prompt_ids").ids();
        let g = GenerateOptions {
            max_new_tokens: 5,
            stop_tokens: Some(vec![]),
            keep_logits: true,
            ..Default::default()
        };
        let batched = e.generate_batch(&[p.clone(), p[3..].to_vec()], &g).unwrap();
        let alone = e.generate_batch(&[p[3..].to_vec()], &g).unwrap();
        assert_eq!(batched[1].step_logits, alone[0].step_logits, "{arch}: bf16 KV batched vs alone");
    }
}
