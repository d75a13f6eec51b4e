//! Where the time of forward passes goes, phase by phase ([`PhaseTimes`]): beside the
//! roofline, it says which part of a decode step is short of it.

use std::time::{Duration, Instant};

/// Time spent in each phase of the forward passes a sequence led since profiling was
/// turned on ([`crate::Sequence::profile_phases`]). Phases are timed on the calling
/// thread around each parallel loop and its serial work, so they add up to nearly `total`;
/// what is left (embedding, norms between phases, logits) is `total` minus their sum.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PhaseTimes {
    /// Forward passes timed.
    pub steps: u64,
    pub total: Duration,
    /// The q, k, v and output projections.
    pub attention_projections: Duration,
    /// q/k norms, RoPE, the KV-cache append and attention over the cache.
    pub attention: Duration,
    /// Routers, routed and shared experts, dense MLPs.
    pub ffn: Duration,
    /// The final norm and the output projection.
    pub lm_head: Duration,
}

impl PhaseTimes {
    /// Time in none of the phases above.
    pub fn other(&self) -> Duration {
        self.total.saturating_sub(self.attention_projections + self.attention + self.ffn + self.lm_head)
    }
}

/// Runs `f`, adding its duration to the phase `pick` chooses when profiling is on.
pub(crate) fn timed<R>(
    profile: &mut Option<PhaseTimes>,
    pick: fn(&mut PhaseTimes) -> &mut Duration,
    f: impl FnOnce() -> R,
) -> R {
    let Some(p) = profile else {
        return f();
    };
    let t = Instant::now();
    let r = f();
    *pick(p) += t.elapsed();
    r
}
