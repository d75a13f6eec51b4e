//! Cache metrics: a snapshot taken under the cache's lock (cheap: a few counters and one
//! small per-layer vector).

use std::time::Duration;

/// Hits and misses of one layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerMetrics {
    pub hits: u64,
    pub misses: u64,
}

impl LayerMetrics {
    /// `hits / (hits + misses)`, 0 when there were no accesses.
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hits, self.hits + self.misses)
    }
}

/// Counters of one cache since it was built (or since [`reset_metrics`]).
///
/// An access is one [`acquire`]. It is a **hit** when the expert was resident or already
/// loading (no new read was issued for it), a **miss** otherwise.
///
/// [`acquire`]: crate::ExpertCache::acquire
/// [`reset_metrics`]: crate::ExpertCache::reset_metrics
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheMetrics {
    pub hits: u64,
    pub misses: u64,
    /// Indexed by layer id; layers never accessed may be missing at the end.
    pub per_layer: Vec<LayerMetrics>,
    /// Completed successful loads and their bytes (the lengths the source returned).
    pub loads: u64,
    pub bytes_loaded: u64,
    /// Failed loads.
    pub load_errors: u64,
    /// Sum over loads of the time spent in [`ExpertSource::read`](crate::ExpertSource::read)
    /// (loads overlap, so this can exceed wall time).
    pub load_time: Duration,
    /// Wall time during which at least one read was in progress: bytes over this is what
    /// the source (the disk) delivered, whatever the number of loaders.
    pub read_busy_time: Duration,
    /// Time `acquire` spent waiting (for a load, or for a slot to free up).
    pub stall_time: Duration,
    /// Loads issued by `prefetch`.
    pub prefetches: u64,
    /// Accesses to an expert that a prefetch had loaded (or was loading) and that had
    /// not been used since.
    pub prefetch_hits: u64,
    /// Prefetch requests dropped for want of an evictable slot.
    pub prefetch_dropped: u64,
    /// Experts evicted to make room.
    pub evictions: u64,
}

impl CacheMetrics {
    /// `hits / (hits + misses)`, 0 when there were no accesses.
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hits, self.hits + self.misses)
    }

    /// Hit rate of one layer (0 if never accessed).
    pub fn layer_hit_rate(&self, layer: usize) -> f64 {
        self.per_layer.get(layer).map_or(0.0, LayerMetrics::hit_rate)
    }

    /// Bytes loaded per second of wall time with a read in progress, in GB/s (10^9 bytes):
    /// the throughput the source achieved.
    pub fn read_gbs(&self) -> f64 {
        let s = self.read_busy_time.as_secs_f64();
        if s > 0.0 {
            self.bytes_loaded as f64 / s / 1e9
        } else {
            0.0
        }
    }

    /// Bytes loaded per second of summed load time, in GB/s (10^9 bytes). With several
    /// loaders in flight this is per-loader throughput, not device throughput.
    pub fn load_gbs(&self) -> f64 {
        let s = self.load_time.as_secs_f64();
        if s > 0.0 {
            self.bytes_loaded as f64 / s / 1e9
        } else {
            0.0
        }
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerMetrics {
        if self.per_layer.len() <= layer {
            self.per_layer.resize(layer + 1, LayerMetrics::default());
        }
        &mut self.per_layer[layer]
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
