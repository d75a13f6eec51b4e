use std::time::Duration;

use super::*;
use crate::{ExpertId, LayerId, MemSource};

const BYTES: usize = 100;

fn k(l: usize, e: usize) -> ExpertKey {
    ExpertKey::new(l, e)
}

/// A cache of `slots` slots over 4 layers × 8 experts of `BYTES` bytes, top_k = 2.
fn cache(slots: usize, policy: PolicyKind, window: usize) -> ExpertCache<MemSource> {
    let src = MemSource::synthetic(4, 8, BYTES);
    let cfg = CacheConfig::new((slots * BYTES + BYTES / 2) as u64, 2).with_policy(policy).with_window(window);
    ExpertCache::new(src, cfg).unwrap()
}

/// Acquires `key`, checks its bytes, releases it.
fn get(c: &ExpertCache<MemSource>, key: ExpertKey) {
    let g = c.acquire(key).unwrap();
    assert_eq!(g.key(), key);
    assert_eq!(g.bytes(), MemSource::pattern(key, BYTES).as_slice(), "{key}");
}

fn step(c: &ExpertCache<MemSource>, layer: u16, probs: &[f32], used: &[u16]) {
    let used: Vec<ExpertId> = used.iter().map(|&e| ExpertId(e)).collect();
    c.on_step(&Step { layer: LayerId(layer), n_tokens: 1, router_probs: probs, used: &used });
}

fn keys(l: usize, es: &[usize]) -> Vec<ExpertKey> {
    es.iter().map(|&e| k(l, e)).collect()
}

#[test]
fn budget_below_top_k_slots_is_rejected_with_the_minimum_in_mb() {
    let slot = (3 << 20) + 1;
    let src = || MemSource::new([(k(0, 0), vec![1u8; slot])]);
    let err = ExpertCache::new(src(), CacheConfig::from_mb(6, 2)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OffloadError::BudgetTooSmall { slots: 1, min_slots: 2, min_mb: 7, .. }), "{msg}");
    assert!(msg.contains("minimum budget is 7 MB"), "{msg}");
    let c = ExpertCache::new(src(), CacheConfig::from_mb(7, 2)).unwrap();
    assert_eq!(c.n_slots(), 2);
    // max_slots caps the allocation, but never below top_k.
    let c = ExpertCache::new(src(), CacheConfig::from_mb(100, 2).with_max_slots(1)).unwrap();
    assert_eq!(c.n_slots(), 2);
}

#[test]
fn hits_misses_and_bytes() {
    let c = cache(2, PolicyKind::Lru, 0);
    assert_eq!(c.n_slots(), 2);
    get(&c, k(0, 0));
    get(&c, k(1, 1));
    get(&c, k(0, 0));
    let m = c.metrics();
    assert_eq!((m.hits, m.misses, m.loads, m.bytes_loaded, m.evictions), (1, 2, 2, 2 * BYTES as u64, 0));
    assert_eq!(m.per_layer[0].hits, 1);
    assert_eq!(m.per_layer[0].misses, 1);
    assert_eq!(m.per_layer[1].misses, 1);
    assert!((m.hit_rate() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(c.resident_bytes(), 2 * BYTES as u64);
    assert_eq!(c.source().reads(), 2);
    c.reset_metrics();
    assert_eq!(c.metrics(), CacheMetrics::default());
}

#[test]
fn lru_eviction_order() {
    let c = cache(2, PolicyKind::Lru, 0);
    for e in [0, 1, 0, 2] {
        get(&c, k(0, e));
    }
    // 0,1,0 → recency 1 < 0; loading 2 evicts 1.
    assert_eq!(c.resident(), keys(0, &[0, 2]));
    get(&c, k(0, 3)); // 0 (used 3rd) is older than 2 (4th)
    assert_eq!(c.resident(), keys(0, &[2, 3]));
    assert_eq!(c.metrics().evictions, 2);
}

#[test]
fn lfu_eviction_order() {
    let c = cache(3, PolicyKind::Lfu, 0);
    for e in [0, 0, 0, 1, 1, 2] {
        get(&c, k(0, e));
    }
    get(&c, k(0, 3)); // counts 0:3 1:2 2:1 → evict 2
    assert_eq!(c.resident(), keys(0, &[0, 1, 3]));
    get(&c, k(0, 4)); // 0:3 1:2 3:1 → evict 3
    assert_eq!(c.resident(), keys(0, &[0, 1, 4]));
    get(&c, k(0, 1));
    get(&c, k(0, 1)); // 1:4 now
    get(&c, k(0, 2)); // 0:3 1:4 4:1 → evict 4 (2's count survives: 2)
    assert_eq!(c.resident(), keys(0, &[0, 1, 2]));
    get(&c, k(0, 5)); // 0:3 1:4 2:2 → evict 2
    assert_eq!(c.resident(), keys(0, &[0, 1, 5]));
}

#[test]
fn score_eviction_order() {
    let c = cache(2, PolicyKind::Score { alpha: 0.5, top_p: Some(2) }, 0);
    // Step 1: S = [0, .25, .15, 0]; both used experts loaded.
    step(&c, 0, &[0.1, 0.5, 0.3, 0.1], &[1, 2]);
    get(&c, k(0, 1));
    get(&c, k(0, 2));
    // Step 2: S = [.3, .275, .075, 0]: loading 0 evicts 2 (LRU would evict 1).
    step(&c, 0, &[0.6, 0.3, 0.05, 0.05], &[0]);
    get(&c, k(0, 0));
    assert_eq!(c.resident(), keys(0, &[0, 1]));
    // Step 3: S = [.15, .1375, .0875, .4]: loading 3 evicts 1.
    step(&c, 0, &[0.05, 0.05, 0.1, 0.8], &[3]);
    get(&c, k(0, 3));
    assert_eq!(c.resident(), keys(0, &[0, 3]));
}

#[test]
fn window_protects_recent_tokens() {
    // LFU, 3 slots. Tokens: [0,1], [0,1], [2], then [3]. Counts 0:2 1:2 2:1.
    let run = |window: usize| {
        let c = cache(3, PolicyKind::Lfu, window);
        for used in [&[0u16, 1][..], &[0, 1], &[2], &[3]] {
            step(&c, 0, &[], used);
            for &e in used {
                get(&c, k(0, e as usize));
            }
        }
        c.resident()
    };
    // Without a window LFU evicts 2 (count 1); with window 1, 2 (used by the previous
    // token) is protected and LFU picks among 0 and 1 (tie 2:2 → least recent: 0).
    assert_eq!(run(0), keys(0, &[0, 1, 3]));
    assert_eq!(run(1), keys(0, &[1, 2, 3]));
    // Window 2 protects 0, 1 and 2 (tokens 2 and 3): LFU falls back to all of them → 2.
    assert_eq!(run(2), keys(0, &[0, 1, 3]));
}

#[test]
fn current_step_experts_are_evicted_last() {
    // LRU, 2 slots: 0 and 1 resident, 0 the older. The step uses 0 and 2: loading 2 must
    // evict 1 (not current) even though LRU prefers 0.
    let c = cache(2, PolicyKind::Lru, 0);
    get(&c, k(0, 0));
    get(&c, k(0, 1));
    step(&c, 0, &[], &[0, 2]);
    get(&c, k(0, 2));
    assert_eq!(c.resident(), keys(0, &[0, 2]));
}

#[test]
fn streaming_more_experts_than_slots() {
    let c = cache(2, PolicyKind::SCORE, 0);
    c.source().set_delay(Duration::from_millis(1));
    let all = keys(2, &[0, 1, 2, 3, 4, 5, 6, 7]);
    step(&c, 2, &[0.125; 8], &(0..8).collect::<Vec<_>>());
    let mut seen = Vec::new();
    c.for_each(&all, |key, bytes| -> OffloadResult<()> {
        assert_eq!(bytes, MemSource::pattern(key, BYTES).as_slice());
        seen.push(key);
        c.check_invariants().unwrap();
        Ok(())
    })
    .unwrap();
    seen.sort();
    assert_eq!(seen, all);
    let m = c.metrics();
    assert_eq!((m.hits, m.misses, m.loads), (0, 8, 8));
    // Again: the 2 resident ones are hits and run first.
    let mut first = Vec::new();
    let resident = c.resident();
    c.for_each(&all, |key, _| -> OffloadResult<()> {
        first.push(key);
        Ok(())
    })
    .unwrap();
    assert_eq!(c.metrics().hits, 2);
    let mut head = first[..2].to_vec();
    head.sort();
    assert_eq!(head, resident);
    // Plain acquire/release streaming works too, with one guard at a time.
    for &key in &all {
        get(&c, key);
    }
    c.check_invariants().unwrap();
}

#[test]
fn all_slots_pinned_is_an_error_not_a_deadlock() {
    let c = cache(2, PolicyKind::Lru, 0);
    let g0 = c.acquire(k(0, 0)).unwrap();
    let g1 = c.acquire(k(0, 1)).unwrap();
    let err = c.acquire(k(0, 2)).unwrap_err();
    assert!(matches!(err, OffloadError::AllSlotsPinned { layer: 0, expert: 2, slots: 2 }), "{err}");
    // Prefetch never evicts pinned experts.
    assert_eq!(c.prefetch(&[k(0, 3)]), 0);
    assert_eq!(c.metrics().prefetch_dropped, 1);
    drop(g0);
    get(&c, k(0, 2));
    assert_eq!(g1.bytes(), MemSource::pattern(k(0, 1), BYTES).as_slice());
    assert_eq!(c.resident(), keys(0, &[1, 2]));
    c.check_invariants().unwrap();
}

#[test]
fn failed_read_is_reported_and_leaves_the_cache_consistent() {
    let c = cache(2, PolicyKind::Lru, 0);
    get(&c, k(0, 0));
    get(&c, k(0, 1));
    c.source().fail(k(1, 3), true);
    let err = c.acquire(k(1, 3)).unwrap_err();
    assert!(matches!(err, OffloadError::Load { layer: 1, expert: 3, .. }), "{err}");
    assert!(err.to_string().contains("layer 1 expert 3"), "{err}");
    c.check_invariants().unwrap();
    // The victim (0) is gone, its slot is free, 1 is untouched.
    assert_eq!(c.resident(), keys(0, &[1]));
    assert_eq!(c.resident_bytes(), BYTES as u64);
    get(&c, k(0, 1));
    // A waiter on a failing prefetch gets the error too.
    c.source().set_delay(Duration::from_millis(20));
    assert_eq!(c.prefetch(&[k(1, 3)]), 1);
    let err = c.acquire(k(1, 3)).unwrap_err();
    assert!(matches!(err, OffloadError::Load { layer: 1, expert: 3, .. }), "{err}");
    c.check_invariants().unwrap();
    assert_eq!(c.resident_bytes(), BYTES as u64);
    // Reads work again once the failure clears, and nothing corrupt was ever served.
    c.source().fail(k(1, 3), false);
    get(&c, k(1, 3));
    get(&c, k(0, 2));
    let m = c.metrics();
    assert_eq!(m.load_errors, 2);
    c.check_invariants().unwrap();
}

#[test]
fn prefetch_uses_free_slots_and_unprotected_victims_only() {
    let c = cache(3, PolicyKind::Lru, 0);
    let g0 = c.acquire(k(0, 0)).unwrap();
    assert_eq!(c.prefetch(&keys(1, &[1, 2, 3, 4])), 2);
    assert_eq!(c.metrics().prefetch_dropped, 2);
    c.wait_idle();
    get(&c, k(1, 1)); // prefetch hit; 1.1 now used, so unprotected
    let m = c.metrics();
    assert_eq!((m.hits, m.prefetch_hits, m.prefetches), (1, 1, 2));
    // 0.0 pinned, 1.2 prefetched and unused: only 1.1 may go.
    assert_eq!(c.prefetch(&keys(1, &[5, 6])), 1);
    c.wait_idle();
    assert_eq!(c.resident(), vec![k(0, 0), k(1, 2), k(1, 5)]);
    assert_eq!(g0.bytes(), MemSource::pattern(k(0, 0), BYTES).as_slice());
}

#[test]
fn stall_and_load_time_are_measured() {
    let c = cache(2, PolicyKind::Lru, 0);
    c.source().set_delay(Duration::from_millis(20));
    get(&c, k(0, 0));
    let m = c.metrics();
    assert!(m.stall_time >= Duration::from_millis(15), "{m:?}");
    assert!(m.load_time >= Duration::from_millis(15), "{m:?}");
    // A prefetch that finished before use costs no stall.
    c.prefetch(&[k(0, 1)]);
    c.wait_idle();
    c.reset_metrics();
    get(&c, k(0, 1));
    assert_eq!(c.metrics().stall_time, Duration::ZERO);
    assert_eq!(c.metrics().prefetch_hits, 1);
}

#[test]
fn dropping_with_loads_in_flight_does_not_hang() {
    let c = cache(4, PolicyKind::Lru, 0);
    c.source().set_delay(Duration::from_millis(30));
    assert_eq!(c.prefetch(&keys(0, &[0, 1, 2, 3])), 4);
    drop(c);
}

/// A source whose expert 1 panics and expert 2 claims an impossible length.
#[derive(Debug)]
struct Weird;

impl ExpertSource for Weird {
    type Buf = Vec<u8>;
    type Error = std::io::Error;
    fn slot_bytes(&self) -> usize {
        16
    }
    fn alloc_slot(&self) -> Result<Vec<u8>, std::io::Error> {
        Ok(vec![0; 16])
    }
    fn read(&self, key: ExpertKey, buf: &mut Vec<u8>) -> Result<usize, std::io::Error> {
        match key.expert.0 {
            1 => panic!("injected panic"),
            2 => Ok(17),
            3 => Err(std::io::Error::other("disk on fire")),
            e => {
                buf.fill(e as u8);
                Ok(8)
            }
        }
    }
}

#[test]
fn panics_and_bad_lengths_are_errors() {
    let c = ExpertCache::new(Weird, CacheConfig::new(32, 2)).unwrap();
    let e = c.acquire(k(0, 1)).unwrap_err();
    assert!(matches!(e, OffloadError::SourcePanicked { layer: 0, expert: 1 }), "{e}");
    let e = c.acquire(k(0, 2)).unwrap_err();
    assert!(matches!(e, OffloadError::BadLength { len: 17, slot_bytes: 16, .. }), "{e}");
    let e = c.acquire(k(0, 3)).unwrap_err();
    assert!(e.to_string().contains("layer 0 expert 3") && e.to_string().contains("disk on fire"), "{e}");
    let g = c.acquire(k(0, 5)).unwrap();
    assert_eq!(g.bytes(), &[5u8; 8]);
    c.check_invariants().unwrap();
}

/// A small deterministic generator (no rand dependency in this crate).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random decode/prefill steps through every policy, with windowing, prefetches,
/// streaming and an always-failing expert; the budget and bookkeeping are checked after
/// every step and every byte served is checked.
fn random_workload(policy: PolicyKind, window: usize, slots: usize, delay: Duration, seed: u64) {
    let c = cache(slots, policy, window);
    c.source().set_delay(delay);
    let bad = k(3, 7);
    c.source().fail(bad, true);
    let mut rng = Lcg(seed);
    let budget = c.budget_bytes();
    for token in 0..150 {
        for layer in 0..4u16 {
            let n_tokens = if token % 50 == 0 { 4 } else { 1 };
            let probs: Vec<f32> = (0..8 * n_tokens).map(|_| rng.below(1000) as f32 / 1000.0).collect();
            let mut used: Vec<u16> = Vec::new();
            for t in 0..n_tokens {
                let row = &probs[t * 8..(t + 1) * 8];
                let mut order: Vec<u16> = (0..8).collect();
                order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                for &e in &order[..2] {
                    if !used.contains(&e) {
                        used.push(e);
                    }
                }
            }
            let used_ids: Vec<ExpertId> = used.iter().map(|&e| ExpertId(e)).collect();
            c.on_step(&Step { layer: LayerId(layer), n_tokens, router_probs: &probs, used: &used_ids });
            let next = (layer as usize + 1) % 4;
            c.prefetch(&[k(next, rng.below(8)), k(next, rng.below(8))]);
            let step_keys: Vec<ExpertKey> = used.iter().map(|&e| k(layer as usize, e as usize)).collect();
            let check = |key: ExpertKey, r: OffloadResult<Vec<u8>>| match r {
                Ok(b) => assert_eq!(b, MemSource::pattern(key, BYTES), "{key}"),
                Err(e) => {
                    assert_eq!(key, bad, "unexpected error {e}");
                    assert!(matches!(e, OffloadError::Load { layer: 3, expert: 7, .. }), "{e}");
                }
            };
            if step_keys.len() > 2 || rng.below(2) == 0 {
                // Streaming path (prefill steps always).
                for &key in &step_keys {
                    let r = c.for_each(&[key], |_, b| -> OffloadResult<()> {
                        assert!(c.resident_bytes() <= budget);
                        check(key, Ok(b.to_vec()));
                        Ok(())
                    });
                    if let Err(e) = r {
                        check(key, Err(e));
                    }
                }
            } else {
                // Hold both guards at once (2 ≤ slots), as a decode step may.
                let guards: Vec<_> = step_keys.iter().map(|&key| (key, c.acquire(key))).collect();
                for (key, g) in &guards {
                    check(*key, g.as_ref().map(|g| g.bytes().to_vec()).map_err(Clone::clone));
                }
                assert!(c.resident_bytes() <= budget);
            }
            assert!(c.resident_bytes() <= budget);
            c.check_invariants().unwrap();
        }
    }
    let m = c.metrics();
    assert!(m.hits + m.misses > 0 && m.load_errors > 0, "{m:?}");
    assert_eq!(m.per_layer.iter().map(|l| l.hits + l.misses).sum::<u64>(), m.hits + m.misses);
}

#[test]
fn random_workloads_respect_the_budget() {
    let policies = [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::SCORE];
    for (i, policy) in policies.into_iter().enumerate() {
        for window in [0, 2] {
            for slots in [2, 5, 13] {
                random_workload(policy, window, slots, Duration::ZERO, 1 + i as u64 * 7 + slots as u64);
            }
        }
    }
    random_workload(PolicyKind::SCORE, 1, 3, Duration::from_micros(50), 99);
}

#[test]
fn concurrent_acquirers_and_prefetchers() {
    let c = cache(4, PolicyKind::Lru, 0);
    c.source().set_delay(Duration::from_micros(20));
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let c = &c;
            s.spawn(move || {
                let mut rng = Lcg(t + 10);
                for _ in 0..300 {
                    let key = k(rng.below(4), rng.below(8));
                    if t == 2 && rng.below(2) == 0 {
                        c.prefetch(&[key]);
                    } else {
                        get(c, key);
                    }
                }
            });
        }
    });
    c.wait_idle();
    c.check_invariants().unwrap();
    assert!(c.resident_bytes() <= c.budget_bytes());
}

#[test]
fn every_waiter_of_a_failed_load_gets_the_error() {
    let c = cache(2, PolicyKind::Lru, 0);
    c.source().fail(k(1, 3), true);
    c.source().set_delay(Duration::from_millis(30));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| c.acquire(k(1, 3)).map(|g| g.key()))).collect();
        for h in hs {
            let r = h.join().unwrap();
            assert!(matches!(r, Err(OffloadError::Load { layer: 1, expert: 3, .. })), "{r:?}");
        }
    });
    c.wait_idle();
    c.check_invariants().unwrap();
    assert_eq!(c.resident_bytes(), 0);
    // One read served all three waiters (unless a waiter arrived after the failure).
    assert!(c.source().reads_of(k(1, 3)) <= 3);
    c.source().set_delay(Duration::ZERO);
    get(&c, k(0, 0));
    get(&c, k(0, 1));
}
