//! Experts read from the on-disk expert store (real io_uring or pread reads of a repacked
//! store) through the byte-budgeted cache: logits bit-identical to the all-in-memory run
//! for every policy, at the minimum budget and at 25%; corrupted and stale stores are
//! errors, not garbage.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use hetmoe::storage::{repack, Encoding, RepackControl, StorageError};
use hetmoe::{CacheConfig, Engine, EngineError, EngineOptions, GenerateOptions, PolicyKind, WeightFormat};

fn make_store(model: &Path, encoding: Encoding, dir: &Path) -> PathBuf {
    let out = dir.join(format!("experts.{}.hmstore", encoding.name()));
    repack(model, &out, encoding, &mut |_| RepackControl::Continue).unwrap();
    out
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, stop_tokens: Some(vec![]), keep_logits: true, ..Default::default() }
}

fn check(model: &Path, prompts: &[Vec<u32>], encoding: Encoding, weights: WeightFormat) {
    let tmp = tempfile::tempdir().unwrap();
    let store = make_store(model, encoding, tmp.path());
    let opts = EngineOptions { weights, ..Default::default() };
    let resident = Engine::load(model, opts.clone()).unwrap();
    let want = resident.generate_batch(prompts, &greedy(6)).unwrap();
    let spec = resident.spec().clone();
    let total = spec.moe.n_experts * spec.moe_layers().len();
    let slot = hetmoe::storage::ExpertStore::open(&store).unwrap().buf_len() as u64;
    for policy in ["score", "lru", "lfu"] {
        for slots in [spec.moe.top_k, total / 4] {
            let cfg = CacheConfig::new(slots.max(spec.moe.top_k) as u64 * slot, spec.moe.top_k)
                .with_policy(policy.parse::<PolicyKind>().unwrap());
            let e = Engine::load_with_store(model, opts.clone(), &store, cfg).unwrap();
            let got = e.generate_batch(prompts, &greedy(6)).unwrap();
            for (g, w) in got.iter().zip(&want) {
                let what = format!("{} {} {policy} slots={slots}", model.display(), encoding.name());
                assert_eq!(g.generated_ids, w.generated_ids, "{what}");
                assert_eq!(g.prompt_logits, w.prompt_logits, "{what}: prompt logits not bit-identical");
                assert_eq!(g.step_logits, w.step_logits, "{what}: step logits not bit-identical");
            }
            let m = e.expert_cache_metrics().unwrap();
            assert!(m.bytes_loaded > 0 && m.misses > 0, "{policy}: nothing was read from disk");
        }
    }
}

#[test]
fn store_backed_runs_are_bit_identical_bf16() {
    let r = common::Reference::load("mixtral");
    let p = r.get("prompt_ids").ids();
    check(
        &common::fixture("mixtral").join("model"),
        &[p.clone(), p[5..].to_vec()],
        Encoding::Bf16,
        WeightFormat::AsStored,
    );
    let model = common::bundled_model();
    let e = Engine::load(&model, EngineOptions::default()).unwrap();
    check(&model, &[e.encode("PostgreSQL is").unwrap()], Encoding::Bf16, WeightFormat::AsStored);
}

#[test]
fn store_backed_runs_are_bit_identical_quantized() {
    let r = common::Reference::load("olmoe");
    let p = r.get("prompt_ids").ids();
    let model = common::fixture("olmoe").join("model");
    check(&model, std::slice::from_ref(&p), Encoding::Q8, WeightFormat::Q8);
    check(&model, &[p], Encoding::Q4, WeightFormat::Q4);
}

#[test]
fn corrupted_extent_is_an_error_naming_the_expert_and_the_sequence_survives() {
    let model = common::fixture("mixtral").join("model");
    let tmp = tempfile::tempdir().unwrap();
    let store = make_store(&model, Encoding::Bf16, tmp.path());
    // Flip one byte inside the first extent (layer 0, expert 0).
    let layout = hetmoe::storage::ExpertStore::open(&store).unwrap();
    let ext = *layout.layout().extent(hetmoe::storage::ExpertKey::new(0, 0)).unwrap();
    drop(layout);
    let mut bytes = std::fs::read(&store).unwrap();
    bytes[ext.offset as usize + 100] ^= 0x40;
    std::fs::write(&store, &bytes).unwrap();

    let e = Engine::load_with_store(&model, EngineOptions::default(), &store, CacheConfig::new(64 << 20, 2))
        .unwrap();
    // Layer 0 routes every token of a long prompt to some experts; make sure expert 0 is hit.
    let prompt: Vec<u32> = (3..200).collect();
    let mut seq = e.new_sequence();
    match e.forward(&mut seq, &prompt, hetmoe::LogitsMode::Last) {
        Err(EngineError::Offload(err)) => {
            let msg = err.to_string();
            assert!(msg.contains("layer 0 expert 0"), "{msg}");
            assert!(msg.contains("checksum"), "{msg}");
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert!(seq.is_empty(), "a failed step leaves the sequence unchanged");
    assert_eq!(seq.kv_bytes(), 0, "a failed step leaves no KV behind");
}

#[test]
fn stale_or_mismatched_store_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = make_store(&common::fixture("mixtral").join("model"), Encoding::Bf16, tmp.path());
    // A store of another checkpoint.
    let other = common::fixture("qwen2_moe").join("model");
    match Engine::load_with_store(&other, EngineOptions::default(), &store, CacheConfig::new(1 << 30, 4)) {
        Err(EngineError::Storage(StorageError::StoreStale { .. })) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a store of another model was accepted"),
    }
    // Truncated store.
    let len = std::fs::metadata(&store).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&store).unwrap().set_len(len - 4096).unwrap();
    let model = common::fixture("mixtral").join("model");
    assert!(matches!(
        Engine::load_with_store(&model, EngineOptions::default(), &store, CacheConfig::new(1 << 30, 2)),
        Err(EngineError::Storage(_))
    ));
}
