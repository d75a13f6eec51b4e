//! Where routed experts' weights come from when the MoE block needs them.
//!
//! The block asks for the experts its tokens were routed to; an [`ExpertAccess`] hands their
//! weights to the block's callback, in batches (all at once when resident, so the block can
//! run them in one parallel loop; one by one as they arrive from a cache), in whatever order
//! they become available. Expert outputs are summed per token in rank order, so neither
//! the order nor the batching ever changes the result.

use std::fmt::Debug;

use hetmoe_cpu_kernels::moe::{ExpertRef, EXPERTS_PER_LOOP};
use hetmoe_storage::{ExpertId, ExpertKey};

use crate::error::EngineResult;
use crate::weights::Mlp;

/// What one MoE layer step needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExpertRequest<'a> {
    pub layer: usize,
    pub n_tokens: usize,
    /// `[n_tokens, n_experts]` router softmax probabilities.
    pub router_probs: &'a [f32],
    /// Experts used by at least one token, ascending.
    pub experts: &'a [usize],
    /// The same experts as ids and as keys of `layer`.
    pub ids: &'a [ExpertId],
    pub keys: &'a [ExpertKey],
}

pub(crate) trait ExpertAccess: Send + Sync + Debug {
    /// Calls `run(experts, weights)` on batches of `req.experts` (`weights[i]`: expert
    /// `experts[i]`), each expert in exactly one batch, a batch ascending and at most
    /// [`EXPERTS_PER_LOOP`] long. `resident` holds the layer's in-memory experts (empty when
    /// experts are offloaded).
    fn with_experts(
        &self,
        req: &ExpertRequest<'_>,
        resident: &[Mlp],
        run: &mut dyn FnMut(&[usize], &[ExpertRef<'_>]),
    ) -> EngineResult<()>;

    /// Whether the experts are the checkpoint's, in memory.
    fn is_resident(&self) -> bool {
        false
    }

    /// Bytes one routed expert occupies where it is read from (0 when unknown).
    fn expert_bytes(&self) -> usize {
        0
    }

    /// Cache metrics, when experts come through a cache.
    fn metrics(&self) -> Option<hetmoe_offload::CacheMetrics> {
        None
    }

    /// Zeroes the cache metrics (e.g. between prefill and decode).
    fn reset_metrics(&self) {}

    /// Whether [`ExpertAccess::prefetch`] does anything (worth computing a guess for).
    fn wants_prefetch(&self) -> bool {
        false
    }

    /// Starts loading experts that layer `layer` will probably need; never blocks.
    fn prefetch(&self, _layer: usize, _experts: &[usize]) {}
}

/// Every expert in memory (memory-mapped or quantized at load).
#[derive(Debug)]
pub(crate) struct Resident;

impl ExpertAccess for Resident {
    fn is_resident(&self) -> bool {
        true
    }

    fn with_experts(
        &self,
        req: &ExpertRequest<'_>,
        resident: &[Mlp],
        run: &mut dyn FnMut(&[usize], &[ExpertRef<'_>]),
    ) -> EngineResult<()> {
        for batch in req.experts.chunks(EXPERTS_PER_LOOP) {
            // A fixed array (no allocation per step); the entries past the batch repeat its
            // last expert and are not passed on.
            let refs: [ExpertRef<'_>; EXPERTS_PER_LOOP] =
                std::array::from_fn(|i| resident[batch[i.min(batch.len() - 1)]].expert());
            run(batch, &refs[..batch.len()]);
        }
        Ok(())
    }
}
