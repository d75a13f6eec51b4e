//! Bad input ends in a specific typed error, never a panic or a wrong answer.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use hetmoe::storage::StorageError;
use hetmoe::{EngineError, EngineOptions, GenerateOptions, LogitsMode};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

/// A copy of a fixture's model folder in a temp dir.
fn copy_model(arch: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("model");
    std::fs::create_dir(&dst).unwrap();
    for f in std::fs::read_dir(common::fixture(arch).join("model")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
    }
    (tmp, dst)
}

/// Rewrites `dir/model.safetensors` through `edit`.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<Entry>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut entries);
    let views: Vec<(String, TensorView<'_>)> =
        entries.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, &None, &path).unwrap();
}

fn rewrite_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> EngineError {
    hetmoe::Engine::load(dir, EngineOptions::default()).expect_err("loading must fail")
}

#[test]
fn truncated_safetensors_is_rejected() {
    let (_t, dir) = copy_model("qwen2_moe");
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, EngineError::Storage(StorageError::InvalidSafetensors { .. })), "{e}");
    f.set_len(5).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, EngineError::Storage(StorageError::InvalidSafetensors { .. })), "{e}");
}

#[test]
fn header_lying_about_offsets_is_rejected() {
    let (_t, dir) = copy_model("olmoe");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&header).unwrap();
    // Point the first tensor past the end of the file.
    let (name, _) = v.as_object().unwrap().iter().find(|(k, _)| *k != "__metadata__").unwrap();
    let name = name.clone();
    v[&name]["data_offsets"] = serde_json::json!([0, 1u64 << 40]);
    // Same data, new header: the file is well formed except for the lie.
    let new_header = serde_json::to_string(&v).unwrap();
    let data = bytes.split_off(8 + n);
    bytes = (new_header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(new_header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, EngineError::Storage(StorageError::InvalidSafetensors { .. })), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = copy_model("qwen3_moe");
    rewrite_weights(&dir, |e| e.retain(|(n, ..)| n != "model.layers.1.mlp.experts.3.up_proj.weight"));
    match load_err(&dir) {
        EngineError::Storage(StorageError::MissingTensor { name }) => {
            assert_eq!(name, "model.layers.1.mlp.experts.3.up_proj.weight")
        }
        e => panic!("wrong error {e}"),
    }
}

#[test]
fn wrong_shape_is_reported_with_both_shapes() {
    let (_t, dir) = copy_model("olmoe");
    rewrite_weights(&dir, |e| {
        let t = e.iter_mut().find(|(n, ..)| n == "model.layers.0.self_attn.q_proj.weight").unwrap();
        t.2 = vec![32, 128];
    });
    match load_err(&dir) {
        EngineError::Storage(StorageError::ShapeMismatch { name, expected, actual }) => {
            assert_eq!(name, "model.layers.0.self_attn.q_proj.weight");
            assert_eq!((expected, actual), (vec![64, 64], vec![32, 128]));
        }
        e => panic!("wrong error {e}"),
    }
}

#[test]
fn unsupported_dtype_is_rejected() {
    let (_t, dir) = copy_model("qwen2_moe");
    rewrite_weights(&dir, |e| {
        let t = e.iter_mut().find(|(n, ..)| n == "model.norm.weight").unwrap();
        t.1 = Dtype::I16; // same byte size as bf16
    });
    match load_err(&dir) {
        EngineError::Storage(StorageError::UnsupportedDtype { name, .. }) => {
            assert_eq!(name, "model.norm.weight")
        }
        e => panic!("wrong error {e}"),
    }
}

#[test]
fn unknown_architectures_are_rejected() {
    for arch in ["deepseek_v3", "gpt_oss"] {
        let text = std::fs::read_to_string(
            common::repo().join("tests/fixtures/unsupported").join(arch).join("config.json"),
        )
        .unwrap();
        let e = hetmoe::storage::parse_config(&text).unwrap_err();
        assert!(
            matches!(e, StorageError::UnsupportedArchitecture { ref model_type, .. } if model_type == arch),
            "{e}"
        );
    }
    let (_t, dir) = copy_model("mixtral");
    rewrite_config(&dir, |v| v["model_type"] = "llama_moe_9000".into());
    let e = load_err(&dir);
    assert!(matches!(e, EngineError::Storage(StorageError::UnsupportedArchitecture { .. })), "{e}");
}

#[test]
fn zero_or_inconsistent_sizes_are_rejected() {
    type Case = (&'static str, fn(&mut serde_json::Value), &'static str);
    let cases: [Case; 6] = [
        ("qwen3_moe", |v| v["hidden_size"] = 0.into(), "hidden_size"),
        ("qwen3_moe", |v| v["num_key_value_heads"] = 3.into(), "num_key_value_heads"),
        ("mixtral", |v| v["num_experts_per_tok"] = 9.into(), "num_experts_per_tok"),
        ("olmoe", |v| v["num_experts"] = (-4).into(), "num_experts"),
        ("qwen2_moe", |v| v["mlp_only_layers"] = serde_json::json!([7]), "mlp_only_layers"),
        ("mixtral", |v| v["eos_token_id"] = 100000.into(), "eos_token_id"),
    ];
    for (arch, edit, field) in cases {
        let (_t, dir) = copy_model(arch);
        rewrite_config(&dir, edit);
        match load_err(&dir) {
            EngineError::Storage(StorageError::InvalidConfig { field: f, .. }) => {
                assert_eq!(f, field, "{arch}")
            }
            e => panic!("{arch}/{field}: wrong error {e}"),
        }
    }
    let (_t, dir) = copy_model("olmoe");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(matches!(load_err(&dir), EngineError::Storage(StorageError::Json { .. })));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        std::fs::read(common::fixture("olmoe").join("model/config.json")).unwrap(),
    )
    .unwrap();
    assert!(matches!(load_err(&dir), EngineError::Storage(StorageError::NoWeights { .. })));
}

#[test]
fn token_ids_and_lengths_are_checked() {
    let engine =
        hetmoe::Engine::load(common::fixture("olmoe").join("model"), EngineOptions::default()).unwrap();
    let vocab = engine.spec().vocab as u32;
    let opts = GenerateOptions { max_new_tokens: 4, ..Default::default() };
    match engine.generate(&[5, vocab, 7], &opts, |_| std::ops::ControlFlow::Continue(())) {
        Err(EngineError::TokenOutOfRange { token, position: 1, .. }) => assert_eq!(token, vocab),
        other => panic!("wrong result {other:?}"),
    }
    let mut seq = engine.new_sequence();
    assert!(matches!(
        engine.forward(&mut seq, &[u32::MAX], LogitsMode::Last),
        Err(EngineError::TokenOutOfRange { .. })
    ));
    assert!(seq.is_empty(), "a rejected step must not change the sequence");
    let max = engine.spec().max_positions;
    let prompt = vec![3u32; max - 10];
    let long = GenerateOptions { max_new_tokens: 11, ..Default::default() };
    match engine.generate(&prompt, &long, |_| std::ops::ControlFlow::Continue(())) {
        Err(EngineError::ContextTooLong { needed, max: m }) => assert_eq!((needed, m), (max + 1, max)),
        other => panic!("wrong result {other:?}"),
    }
    assert!(matches!(
        engine.generate(&[], &opts, |_| std::ops::ControlFlow::Continue(())),
        Err(EngineError::EmptyPrompt)
    ));
    let bad = GenerateOptions {
        sampling: hetmoe::Sampling { temperature: f32::NAN, ..Default::default() },
        ..opts
    };
    assert!(matches!(
        engine.generate(&[1, 2], &bad, |_| std::ops::ControlFlow::Continue(())),
        Err(EngineError::InvalidOption { option: "temperature", .. })
    ));
    assert!(matches!(engine.encode("text"), Err(EngineError::NoTokenizer)));
}

#[test]
fn zero_threads_is_an_error() {
    let e = hetmoe::Engine::load(
        common::fixture("olmoe").join("model"),
        EngineOptions { threads: Some(0), ..Default::default() },
    )
    .unwrap_err();
    assert!(matches!(e, EngineError::InvalidOption { option: "threads", .. }));
}
