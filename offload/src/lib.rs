//! Expert residency for hetmoe: a byte-budgeted cache of experts for one tier (host DRAM
//! now, GPU memory later), filled from a slower tier through the [`ExpertSource`] trait.
//! It moves bytes and keeps books; it knows nothing of model math, and never changes a
//! byte: compute reads exactly what the source read.
//!
//! # Slots and budget
//! [`ExpertCache::new`] preallocates `budget_bytes / slot_bytes` slots (capped by
//! [`CacheConfig::max_slots`]), each a buffer from [`ExpertSource::alloc_slot`] of the
//! source's largest expert extent; nothing is allocated for experts afterwards, so the
//! tier never holds more than the budget. Fewer than `top_k` slots is
//! [`OffloadError::BudgetTooSmall`], whose message gives the minimum budget in MB.
//!
//! # Using it (the engine's side)
//! Per MoE layer step: [`ExpertCache::on_step`] with the router probabilities and the
//! experts the step uses (drives the score policy and windowing); optionally
//! [`ExpertCache::prefetch`] for experts a predictor expects soon (never blocks, never
//! evicts anything pinned or protected); then either [`ExpertCache::for_each`] over the
//! step's experts, which streams any number of them through the slots (prefill with a
//! budget of `top_k` slots works), or [`ExpertCache::acquire`] per expert, which returns an
//! [`ExpertGuard`] (`guard.bytes()`) that pins the expert until dropped. The rule that
//! keeps `acquire` deadlock-free: never call it while holding as many guards as there are
//! slots (`for_each` holds one at a time); instead of blocking forever, it then fails
//! with [`OffloadError::AllSlotsPinned`].
//!
//! ```
//! use hetmoe_offload::{CacheConfig, ExpertCache, ExpertId, ExpertKey, LayerId, MemSource, OffloadError, PolicyKind, Step};
//!
//! // 2 layers × 8 experts of 1 KiB; a budget of 4 slots; top_k = 2.
//! let source = MemSource::synthetic(2, 8, 1024);
//! let config = CacheConfig::new(4 * 1024, 2).with_policy(PolicyKind::Lru).with_window(1);
//! let cache = ExpertCache::new(source, config)?;
//!
//! // One layer step: the router chose experts 3 and 5 for this token.
//! let (layer, probs, used) = (LayerId(0), [0.0f32, 0.0, 0.1, 0.5, 0.0, 0.3, 0.1, 0.0], [ExpertId(3), ExpertId(5)]);
//! cache.on_step(&Step { layer, n_tokens: 1, router_probs: &probs, used: &used });
//! cache.prefetch(&[ExpertKey::new(1, 2)]); // a predictor's guess for the next layer
//! let keys: Vec<ExpertKey> = used.iter().map(|&expert| ExpertKey { layer, expert }).collect();
//! // Streams through the slots however many experts there are.
//! cache.for_each(&keys, |key, bytes| -> Result<(), OffloadError> {
//!     assert_eq!(bytes, MemSource::pattern(key, 1024).as_slice()); // run expert `key` on `bytes`
//!     Ok(())
//! })?;
//! // Or pin explicitly (never more guards than slots):
//! let g = cache.acquire(keys[0])?;
//! assert_eq!(g.bytes().len(), 1024);
//! drop(g);
//! let m = cache.metrics();
//! assert_eq!((m.hits, m.misses), (1, 2));
//! # Ok::<(), OffloadError>(())
//! ```
//!
//! # Eviction
//! A load takes a free slot, else evicts an unpinned, loaded expert. Candidates fall in
//! three protection classes, and the victim comes from the lowest non-empty class:
//! 0. the rest;
//! 1. experts in the window (used by the current token or the previous
//!    [`CacheConfig::window_tokens`] tokens of their layer's token clock, "LLM in a flash"
//!    windowing), and experts a prefetch loaded that nothing has used yet;
//! 2. experts of the current step (`on_step`'s `used`) not yet run.
//!
//! `acquire` may evict from any class; `for_each`'s read-ahead from classes 0–1;
//! `prefetch` from class 0 only. Within a class the [`EvictionPolicy`] picks
//! ([`Lru`], [`Lfu`], [`ScorePolicy`] from HybriMoE), candidates sorted by key so ties are
//! deterministic. Experts being loaded are never evicted.
//!
//! # Concurrency
//! One `parking_lot::Mutex` guards all bookkeeping (slot states, key → slot map,
//! policy, window, metrics); one `Condvar` is signalled whenever a load finishes or a slot
//! is unpinned. Loads run on `loader_threads` worker threads fed by an unbounded
//! crossbeam channel; the lock is never held during I/O: a miss assigns a slot under the
//! lock (state `Loading`, key mapped, so a second request for the key waits on the same
//! load), moves the slot's buffer (an `Arc`) into the job, and a worker reads into it
//! with no lock held (`Arc::get_mut`, which succeeds because a slot is reassigned only
//! when no guard holds it, and guards drop their `Arc` before unpinning), then under the
//! lock puts it back, marks the slot `Ready` (or frees it on error) and notifies. A caller
//! waiting for a load pins the slot while it waits, so a finished load cannot be evicted
//! before its waiter wakes; a failed load is handed to every waiter (the slot is freed by
//! the last one) and the key is unmapped, so the next `acquire` retries. `acquire` waits
//! only for the expert it asks for (or for a slot to come free). A panicking source read
//! is caught and reported as an error. Dropping the cache stops the loaders (queued
//! jobs are skipped) and joins them; guards borrow the cache, so none outlives it.

#![forbid(unsafe_code)]

mod cache;
mod error;
mod metrics;
mod policy;
mod source;
mod store_source;

pub use cache::{CacheConfig, ExpertCache, ExpertGuard};
pub use error::{OffloadError, OffloadResult};
pub use hetmoe_storage::{ExpertId, ExpertKey, LayerId};
pub use metrics::{CacheMetrics, LayerMetrics};
pub use policy::{EvictionPolicy, Lfu, Lru, PolicyKind, ScorePolicy, Step};
pub use source::{ExpertSource, MemSource, MemSourceError};
pub use store_source::StoreSource;
