//! Weights left zero-copy in the checkpoint's memory map (`HETMOE_MMAP_WEIGHTS=1`: gate and
//! up stay separate matrices) give the same logits, bit for bit, as the default copies
//! (gate and up interleaved row by row). One test in its own binary, since it sets a
//! process-wide environment variable before each load.
#![allow(clippy::unwrap_used)]

mod common;

use hetmoe::{Engine, EngineOptions, LogitsMode};

fn logits(prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let engine = Engine::load(common::bundled_model(), EngineOptions::default()).unwrap();
    let mut seq = engine.new_sequence();
    let mut out = vec![engine.forward(&mut seq, prompt, LogitsMode::All).unwrap()];
    for _ in 0..steps {
        let last = out.last().unwrap();
        let v = engine.spec().vocab;
        let tail = &last[last.len() - v..];
        let next = tail.iter().enumerate().fold(0, |b, (i, &x)| if x > tail[b] { i } else { b }) as u32;
        out.push(engine.forward(&mut seq, &[next], LogitsMode::Last).unwrap());
    }
    out
}

#[test]
fn mapped_and_copied_weights_give_identical_logits() {
    let prompt = [1u32, 415, 3168, 1144, 2870, 13, 1014, 264];
    std::env::set_var("HETMOE_MMAP_WEIGHTS", "1");
    let mapped = logits(&prompt, 6);
    std::env::remove_var("HETMOE_MMAP_WEIGHTS");
    let copied = logits(&prompt, 6);
    assert_eq!(mapped.len(), copied.len());
    for (i, (m, c)) in mapped.iter().zip(&copied).enumerate() {
        assert!(m.iter().all(|x| x.is_finite()), "step {i}: non-finite logits");
        assert_eq!(m, c, "step {i}: mapped and copied weights differ");
    }
}
