//! The decode path allocates nothing per token beyond the logits it returns: every buffer
//! (scratch, KV cache, block sums, attention scores, the compute team) is reused from step to
//! step. Its own test binary, so that no other test allocates while it counts.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use hetmoe::cpu_kernels::{force_isa, Isa};
use hetmoe::{Engine, EngineOptions, LogitsMode, WeightFormat};

mod common;

/// The system allocator, counting allocations (all threads) while `COUNTING` is set.
struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCS.fetch_add(1, Relaxed);
        }
        // SAFETY: the caller's contract is forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCS.fetch_add(1, Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// On every kernel path this CPU has (the scalar one is what CPUs without AVX2 run).
#[test]
fn decode_steps_allocate_only_their_logits() {
    for isa in Isa::all_supported() {
        force_isa(isa).unwrap();
        for weights in [WeightFormat::AsStored, WeightFormat::Q8] {
            decode_allocations(isa, weights);
        }
    }
}

fn decode_allocations(isa: Isa, weights: WeightFormat) {
    let options = EngineOptions { threads: Some(2), weights, ..Default::default() };
    let engine = Engine::load(common::bundled_model(), options).unwrap();
    let mut seq = engine.new_sequence();
    let steps = 24;
    let logits = engine.forward(&mut seq, &[1, 417, 1142, 1217], LogitsMode::Last).unwrap();
    let mut next = argmax(&logits);
    // Warm-up: buffers reach their steady-state size.
    for _ in 0..4 {
        next = argmax(&engine.forward(&mut seq, &[next], LogitsMode::Last).unwrap());
    }
    // Room for every counted step, so the KV cache and token list do not grow.
    seq.reserve(steps);
    let mut per_step = Vec::with_capacity(steps);
    for _ in 0..steps {
        ALLOCS.store(0, Relaxed);
        COUNTING.store(true, Relaxed);
        let logits = engine.forward(&mut seq, &[next], LogitsMode::Last).unwrap();
        COUNTING.store(false, Relaxed);
        per_step.push(ALLOCS.load(Relaxed));
        next = argmax(&logits);
    }
    // The returned logits (one vector) and the batch's list of them.
    assert!(
        per_step.iter().all(|&n| n <= 2),
        "{isa:?} {weights:?}: allocations per decode step {per_step:?}"
    );
}

fn argmax(l: &[f32]) -> u32 {
    l.iter().enumerate().fold(0, |b, (i, &v)| if v > l[b] { i } else { b }) as u32
}
