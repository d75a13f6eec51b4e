//! The one error type of the offload crate.

use std::sync::Arc;

use hetmoe_storage::ExpertKey;

/// Result alias of the offload crate.
pub type OffloadResult<T> = Result<T, OffloadError>;

/// Everything the expert cache can report.
///
/// Cloneable: one failed load is reported to every caller waiting for that expert.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OffloadError {
    /// The byte budget holds fewer slots than a step may need at once (top_k).
    #[error(
        "expert cache budget of {budget_bytes} bytes holds {slots} slot(s) of {slot_bytes} bytes, \
         fewer than the minimum of {min_slots} (top_k); the minimum budget is {min_mb} MB \
         ({min_bytes} bytes, MB = 2^20 bytes)"
    )]
    BudgetTooSmall {
        budget_bytes: u64,
        slot_bytes: usize,
        slots: usize,
        min_slots: usize,
        min_bytes: u64,
        min_mb: u64,
    },

    /// The source reports a slot size of zero.
    #[error("expert source reports a slot size of 0 bytes")]
    ZeroSlotSize,

    /// The source handed out a slot buffer smaller than the slot size it reports.
    #[error(
        "expert source allocated a slot buffer of {actual} bytes, smaller than its slot size {expected}"
    )]
    SlotBufferTooSmall { expected: usize, actual: usize },

    /// The source could not allocate a slot buffer.
    #[error("expert source could not allocate slot buffer {slot}: {source}")]
    SlotAlloc {
        slot: usize,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },

    /// Reading an expert failed (I/O error, checksum mismatch, short read, ...). The slot it
    /// was loading into is free again and the expert is not resident.
    #[error("loading layer {layer} expert {expert} failed: {source}")]
    Load {
        layer: u16,
        expert: u16,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },

    /// The source claimed to have read more bytes than the slot holds.
    #[error(
        "loading layer {layer} expert {expert}: source reported {len} bytes, but a slot holds {slot_bytes}"
    )]
    BadLength { layer: u16, expert: u16, len: usize, slot_bytes: usize },

    /// The source panicked while reading an expert.
    #[error("loading layer {layer} expert {expert}: the expert source panicked")]
    SourcePanicked { layer: u16, expert: u16 },

    /// Every slot is pinned by a live guard, so `acquire` could only wait forever (in a
    /// single compute thread). A caller must hold fewer guards than there are slots.
    #[error("cannot load layer {layer} expert {expert}: all {slots} slots are pinned by live guards (hold fewer guards than slots)")]
    AllSlotsPinned { layer: u16, expert: u16, slots: usize },

    /// Loader threads could not be started or have gone.
    #[error("expert loader threads unavailable: {0}")]
    Loader(String),
}

impl OffloadError {
    pub(crate) fn load(key: ExpertKey, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Load { layer: key.layer.0, expert: key.expert.0, source: Arc::new(source) }
    }
}
