//! Expert residency for hetmoe (to be built): which experts sit in which tier (GPU memory,
//! host DRAM, disk), under a hard byte budget per tier with preallocated slots; eviction
//! policies behind one trait (LRU, LFU, HybriMoE's score-based policy); windowing (keep
//! what the last k tokens used); a prefetch queue ordered by expected impact; asynchronous
//! loaders; residency metrics (hit rate, bytes moved, stall time).
//!
//! It moves bytes and keeps books; it knows nothing of model math.

#![forbid(unsafe_code)]

pub use hetmoe_storage::ExpertKey;
