//! Routing prediction for hetmoe (to be built): guesses which experts layers l+1..l+d will
//! need before they run (skip-gate: layer l+1's router applied to layer l's hidden state;
//! transition statistics between consecutive layers' choices; a frequency prior), scores
//! its own accuracy, and records and replays routing traces.
//!
//! It knows routing decisions ([`hetmoe_storage::ExpertKey`]) but nothing of tiers or I/O:
//! the offload crate turns its guesses into prefetches.

#![forbid(unsafe_code)]

pub use hetmoe_storage::ExpertKey;
