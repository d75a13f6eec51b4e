//! Where expert bytes come from: the trait the storage reader implements, and an in-memory
//! source for tests and all-in-RAM runs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use hetmoe_storage::ExpertKey;

/// A slower tier that the cache loads experts from (the on-disk expert store, or the host
/// tier when the cache is the GPU tier).
///
/// The cache calls [`alloc_slot`](Self::alloc_slot) once per slot at construction and
/// reuses those buffers for every load, so a source that needs special memory (4096-byte
/// aligned for `O_DIRECT`, registered with io_uring, pinned host memory for DMA) hands it
/// out here; `Buf` may carry whatever the source needs to find it again (e.g. the index of
/// a registered io_uring buffer).
///
/// [`read`](Self::read) is called from the cache's loader threads, several at a time
/// (one per loader thread), never twice at once on the same buffer, and never while any
/// reader can see that buffer. It must fill `buf` with the expert's bytes, verified (checksum)
/// as the source requires, and return the expert's length `len`: the cache exposes exactly
/// `buf.as_ref()[..len]` to compute. `len` may be less than the slot size (smaller experts,
/// padding for alignment) but not more. An error is reported to the callers waiting for
/// that expert as [`OffloadError::Load`](crate::OffloadError::Load), naming layer and
/// expert; the buffer may then hold garbage, it is never shown to anyone.
pub trait ExpertSource: Send + Sync + 'static {
    /// One slot's buffer.
    type Buf: AsRef<[u8]> + AsMut<[u8]> + Send + Sync + 'static;
    /// What a failed allocation or read reports.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Bytes one slot must hold: the largest expert extent (with any alignment padding
    /// the reader needs). Constant for the life of the source.
    fn slot_bytes(&self) -> usize;

    /// A buffer of at least [`slot_bytes`](Self::slot_bytes) bytes.
    fn alloc_slot(&self) -> Result<Self::Buf, Self::Error>;

    /// Reads expert `key` into `buf`; returns the expert's length in bytes (`≤ slot_bytes`).
    fn read(&self, key: ExpertKey, buf: &mut Self::Buf) -> Result<usize, Self::Error>;
}

/// Error of [`MemSource`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemSourceError {
    #[error("{0} is not in the source")]
    Missing(ExpertKey),
    #[error("injected read failure for {0}")]
    Injected(ExpertKey),
}

/// An [`ExpertSource`] over experts held in memory: for tests, replays and all-in-RAM runs
/// through the cache. Reads can be slowed down ([`set_delay`](Self::set_delay)) and made to
/// fail for chosen experts ([`fail`](Self::fail)).
pub struct MemSource {
    experts: HashMap<ExpertKey, Vec<u8>>,
    slot_bytes: usize,
    delay: Mutex<Duration>,
    failing: Mutex<HashSet<ExpertKey>>,
    reads: AtomicU64,
    per_key_reads: Mutex<HashMap<ExpertKey, u64>>,
}

impl fmt::Debug for MemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemSource")
            .field("experts", &self.experts.len())
            .field("slot_bytes", &self.slot_bytes)
            .field("reads", &self.reads.load(Ordering::Relaxed))
            .finish()
    }
}

impl MemSource {
    /// A source over the given experts; the slot size is the largest of them (at least 1).
    pub fn new(experts: impl IntoIterator<Item = (ExpertKey, Vec<u8>)>) -> Self {
        let experts: HashMap<_, _> = experts.into_iter().collect();
        let slot_bytes = experts.values().map(Vec::len).max().unwrap_or(0).max(1);
        Self {
            experts,
            slot_bytes,
            delay: Mutex::new(Duration::ZERO),
            failing: Mutex::new(HashSet::new()),
            reads: AtomicU64::new(0),
            per_key_reads: Mutex::new(HashMap::new()),
        }
    }

    /// `n_layers × n_experts` experts of `bytes` bytes each, every byte a function of
    /// (layer, expert, offset), so a test can check that a slot holds the right expert.
    pub fn synthetic(n_layers: usize, n_experts: usize, bytes: usize) -> Self {
        Self::new((0..n_layers).flat_map(|l| {
            (0..n_experts).map(move |e| (ExpertKey::new(l, e), Self::pattern(ExpertKey::new(l, e), bytes)))
        }))
    }

    /// The bytes [`synthetic`](Self::synthetic) gives expert `key`.
    pub fn pattern(key: ExpertKey, bytes: usize) -> Vec<u8> {
        let seed = (key.layer.0 as usize) * 131 + (key.expert.0 as usize) * 7 + 1;
        (0..bytes).map(|i| (seed.wrapping_mul(i + 3) % 251) as u8).collect()
    }

    /// Every read sleeps this long first.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock() = delay;
    }

    /// Reads of `key` fail from now on (`failing = true`) or succeed again.
    pub fn fail(&self, key: ExpertKey, failing: bool) {
        let mut f = self.failing.lock();
        if failing {
            f.insert(key);
        } else {
            f.remove(&key);
        }
    }

    /// Number of reads so far (successful or not).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Number of reads of `key` so far.
    pub fn reads_of(&self, key: ExpertKey) -> u64 {
        self.per_key_reads.lock().get(&key).copied().unwrap_or(0)
    }

    /// The bytes of `key`, if present.
    pub fn expert(&self, key: ExpertKey) -> Option<&[u8]> {
        self.experts.get(&key).map(Vec::as_slice)
    }
}

impl ExpertSource for MemSource {
    type Buf = Box<[u8]>;
    type Error = MemSourceError;

    fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn alloc_slot(&self) -> Result<Self::Buf, Self::Error> {
        Ok(vec![0u8; self.slot_bytes].into_boxed_slice())
    }

    fn read(&self, key: ExpertKey, buf: &mut Self::Buf) -> Result<usize, Self::Error> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        *self.per_key_reads.lock().entry(key).or_insert(0) += 1;
        let delay = *self.delay.lock();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if self.failing.lock().contains(&key) {
            // Scribble over the buffer so a test would notice if it were ever exposed.
            buf.fill(0xEE);
            return Err(MemSourceError::Injected(key));
        }
        let data = self.experts.get(&key).ok_or(MemSourceError::Missing(key))?;
        buf[..data.len()].copy_from_slice(data);
        Ok(data.len())
    }
}
