//! Routed experts served from a byte-budgeted cache instead of memory: each MoE step tells
//! the cache its routing (for the eviction policy), then streams the step's experts through
//! the cache's slots. The bytes of a slot are a row-column bundle, viewed for compute with
//! [`ExpertRef::bundled`]-style layouts by the [`ExpertLayout`] of the source.

use std::fmt;

use hetmoe_cpu_kernels::moe::ExpertRef;
use hetmoe_offload::{CacheMetrics, ExpertCache, ExpertSource, Step};
use hetmoe_storage::{ExpertKey, LayerId};

use crate::error::{EngineError, EngineResult};
use crate::experts::{ExpertAccess, ExpertRequest};
use crate::weights::Mlp;

/// How the bytes a source delivers are laid out for compute.
pub trait ExpertLayout {
    /// `(ffn, hidden)` of the experts this source holds.
    fn dims(&self) -> (usize, usize);
    /// Bytes of one expert as read (for bandwidth accounting).
    fn expert_bytes(&self) -> usize;

    /// Views one expert's bytes (as read into a cache slot) as kernel-ready rows.
    fn expert_ref<'a>(&self, bytes: &'a [u8]) -> EngineResult<ExpertRef<'a>>;
}

/// An [`ExpertAccess`] backed by an [`ExpertCache`].
pub(crate) struct CachedExperts<S: ExpertSource + ExpertLayout> {
    pub cache: ExpertCache<S>,
}

impl<S: ExpertSource + ExpertLayout> fmt::Debug for CachedExperts<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedExperts").field("cache", &self.cache).finish()
    }
}

impl<S: ExpertSource + ExpertLayout> ExpertAccess for CachedExperts<S> {
    fn with_experts(
        &self,
        req: &ExpertRequest<'_>,
        _resident: &[Mlp],
        run: &mut dyn FnMut(&[usize], &[ExpertRef<'_>]),
    ) -> EngineResult<()> {
        self.cache.on_step(&Step {
            layer: LayerId(req.layer as u16),
            n_tokens: req.n_tokens,
            router_probs: req.router_probs,
            used: req.ids,
        });
        let source = self.cache.source();
        self.cache.for_each(req.keys, |key, bytes| -> Result<(), EngineError> {
            // One at a time: each is held in the cache only while it runs.
            run(&[key.expert.0 as usize], &[source.expert_ref(bytes)?]);
            Ok(())
        })
    }

    fn expert_bytes(&self) -> usize {
        self.cache.source().expert_bytes()
    }

    fn metrics(&self) -> Option<CacheMetrics> {
        Some(self.cache.metrics())
    }

    fn reset_metrics(&self) {
        self.cache.reset_metrics()
    }

    fn wants_prefetch(&self) -> bool {
        true
    }

    fn prefetch(&self, layer: usize, experts: &[usize]) {
        let keys: Vec<ExpertKey> = experts.iter().map(|&e| ExpertKey::new(layer, e)).collect();
        self.cache.prefetch(&keys);
    }
}

impl ExpertLayout for hetmoe_offload::StoreSource {
    fn dims(&self) -> (usize, usize) {
        (self.store().ffn(), self.store().hidden())
    }
    fn expert_bytes(&self) -> usize {
        self.store().extent_len()
    }
    fn expert_ref<'a>(&self, bytes: &'a [u8]) -> EngineResult<ExpertRef<'a>> {
        Ok(self.store().expert_ref(bytes)?)
    }
}
