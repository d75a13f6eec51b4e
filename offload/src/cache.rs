//! The budgeted expert cache of one tier. See the crate docs for the design.

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard};

use hetmoe_storage::ExpertKey;

use crate::error::{OffloadError, OffloadResult};
use crate::metrics::CacheMetrics;
use crate::policy::{EvictionPolicy, PolicyKind, Step};
use crate::source::ExpertSource;

/// How to build an [`ExpertCache`].
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Hard budget of the tier: `budget_bytes / slot_bytes` slots are preallocated.
    pub budget_bytes: u64,
    /// Experts per token of the model: the fewest slots accepted (a smaller budget is
    /// rejected), and the score policy's default `p = 2 · top_k`.
    pub top_k: usize,
    /// Eviction policy (default: score, α = 0.5, p = 2 · top_k).
    pub policy: PolicyKind,
    /// Windowing: experts used by the previous `window_tokens` tokens are evicted only
    /// when nothing else can be (0 = off).
    pub window_tokens: usize,
    /// Loader threads (default 2); also the number of reads in flight.
    pub loader_threads: usize,
    /// Upper bound on the number of slots (e.g. the model's expert count), so that a budget
    /// larger than the whole model does not allocate useless slots.
    pub max_slots: Option<usize>,
}

impl CacheConfig {
    pub fn new(budget_bytes: u64, top_k: usize) -> Self {
        Self {
            budget_bytes,
            top_k,
            policy: PolicyKind::default(),
            window_tokens: 0,
            loader_threads: 2,
            max_slots: None,
        }
    }
    /// A budget given in MB (2^20 bytes), as `--expert-cache-mb` gives it.
    pub fn from_mb(mb: u64, top_k: usize) -> Self {
        Self::new(mb.saturating_mul(1 << 20), top_k)
    }
    pub fn with_policy(mut self, policy: PolicyKind) -> Self {
        self.policy = policy;
        self
    }
    pub fn with_window(mut self, tokens: usize) -> Self {
        self.window_tokens = tokens;
        self
    }
    pub fn with_loader_threads(mut self, n: usize) -> Self {
        self.loader_threads = n;
        self
    }
    pub fn with_max_slots(mut self, n: usize) -> Self {
        self.max_slots = Some(n);
        self
    }
}

enum SlotState {
    Free,
    /// A loader owns the buffer. `prefetch`: issued by a speculative prefetch.
    Loading {
        key: ExpertKey,
        seq: u64,
        prefetch: bool,
    },
    /// `buf[..len]` holds `key`. `prefetched`: loaded by a prefetch, not used since.
    Ready {
        key: ExpertKey,
        len: usize,
        prefetched: bool,
    },
    /// The load failed while callers waited (`pins` of them); each takes the error and
    /// unpins, the last one frees the slot.
    Failed {
        err: OffloadError,
    },
}

struct Slot<B> {
    state: SlotState,
    /// Guards alive plus callers waiting for this slot's load.
    pins: u32,
    /// `None` while a loader holds it.
    buf: Option<Arc<B>>,
}

struct Job<B> {
    slot: usize,
    seq: u64,
    key: ExpertKey,
    buf: Arc<B>,
}

/// Windowing: a token clock per layer and the clock at which each expert was last used.
struct Window {
    k: u64,
    clock: Vec<u64>,
    now: u64,
    marks: HashMap<ExpertKey, u64>,
}

impl Window {
    fn step(&mut self, step: &Step<'_>) {
        let l = step.layer.0 as usize;
        if self.clock.len() <= l {
            self.clock.resize(l + 1, 0);
        }
        self.clock[l] += step.n_tokens.max(1) as u64;
        self.now = self.now.max(self.clock[l]);
        if self.k > 0 {
            for &expert in step.used {
                self.marks.insert(ExpertKey { layer: step.layer, expert }, self.clock[l]);
            }
        }
    }
    /// Used by the current token or one of the `k` before it.
    fn contains(&self, key: ExpertKey) -> bool {
        self.k > 0 && self.marks.get(&key).is_some_and(|&m| self.now - m <= self.k)
    }
}

/// Which protection classes a new load may evict from (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Speculative prefetch: only unprotected experts.
    Speculative = 0,
    /// Loads for the current step ahead of use: also windowed / prefetched experts.
    Needed = 1,
    /// `acquire`: anything unpinned, the current step's other experts last.
    Demand = 2,
}

struct State<B> {
    slots: Vec<Slot<B>>,
    map: HashMap<ExpertKey, usize>,
    policy: Box<dyn EvictionPolicy>,
    window: Window,
    /// Experts of the current step not yet released by `for_each`.
    current: Vec<ExpertKey>,
    metrics: CacheMetrics,
    seq: u64,
    /// Reads in progress, and since when at least one has been (for device throughput).
    reading: u32,
    busy_since: Option<Instant>,
    cand: Vec<(u8, ExpertKey, usize)>,
    cand_keys: Vec<ExpertKey>,
}

impl<B> State<B> {
    fn count_access(&mut self, key: ExpertKey) {
        let layer = key.layer.0 as usize;
        let hit = match self.map.get(&key) {
            Some(&i) => {
                let prefetched = match self.slots[i].state {
                    SlotState::Loading { prefetch, .. } => prefetch,
                    SlotState::Ready { prefetched, .. } => prefetched,
                    _ => false,
                };
                if prefetched {
                    self.metrics.prefetch_hits += 1;
                }
                true
            }
            None => false,
        };
        if hit {
            self.metrics.hits += 1;
            self.metrics.layer_mut(layer).hits += 1;
        } else {
            self.metrics.misses += 1;
            self.metrics.layer_mut(layer).misses += 1;
        }
    }

    /// A slot a new load may use: a free one, else the policy's victim among unpinned
    /// loaded experts of the least protected class `purpose` allows.
    fn pick_slot(&mut self, purpose: Purpose) -> Option<usize> {
        if let Some(i) = self.slots.iter().position(|s| matches!(s.state, SlotState::Free)) {
            return Some(i);
        }
        let Self { slots, cand, cand_keys, current, window, policy, .. } = self;
        cand.clear();
        for (i, s) in slots.iter().enumerate() {
            if let (0, SlotState::Ready { key, prefetched, .. }) = (s.pins, &s.state) {
                let class = if current.contains(key) {
                    2
                } else if *prefetched || window.contains(*key) {
                    1
                } else {
                    0
                };
                cand.push((class, *key, i));
            }
        }
        let class = cand.iter().map(|c| c.0).min()?;
        if class > purpose as u8 {
            return None;
        }
        cand.retain(|c| c.0 == class);
        cand.sort_unstable_by_key(|c| c.1);
        cand_keys.clear();
        cand_keys.extend(cand.iter().map(|c| c.1));
        let v = policy.victim(cand_keys).min(cand.len() - 1);
        Some(cand[v].2)
    }

    /// Assigns `slot` to `key` (evicting what it held) and returns the loader's job.
    fn start_load(&mut self, slot: usize, key: ExpertKey, prefetch: bool) -> OffloadResult<Job<B>> {
        let s = &mut self.slots[slot];
        let buf = s.buf.take().ok_or_else(|| OffloadError::Loader("internal: slot buffer missing".into()))?;
        if let SlotState::Ready { key: old, .. } = s.state {
            self.map.remove(&old);
            self.policy.on_evict(old);
            self.metrics.evictions += 1;
        }
        self.seq += 1;
        s.state = SlotState::Loading { key, seq: self.seq, prefetch };
        self.map.insert(key, slot);
        self.policy.on_insert(key);
        Ok(Job { slot, seq: self.seq, key, buf })
    }

    /// Undoes `start_load` when the job could not be sent.
    fn abort_load(&mut self, job: Job<B>) {
        let s = &mut self.slots[job.slot];
        s.buf = Some(job.buf);
        s.state = SlotState::Free;
        self.map.remove(&job.key);
        self.policy.on_evict(job.key);
    }

    fn add_stall(&mut self, since: Option<Instant>) {
        if let Some(t) = since {
            self.metrics.stall_time += t.elapsed();
        }
    }
}

struct Shared<S: ExpertSource> {
    source: S,
    state: Mutex<State<S::Buf>>,
    cond: Condvar,
    shutdown: AtomicBool,
}

impl<S: ExpertSource> Shared<S> {
    /// A loader finished `job` with `res`.
    fn finish(&self, job: Job<S::Buf>, res: OffloadResult<usize>, took: Duration) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let s = &mut st.slots[job.slot];
        s.buf = Some(job.buf);
        let prefetch = match s.state {
            SlotState::Loading { seq, prefetch, .. } if seq == job.seq => prefetch,
            _ => {
                // Cannot happen: a loading slot is never reassigned.
                tracing::error!(slot = job.slot, "expert cache: load finished on a reassigned slot");
                return;
            }
        };
        st.metrics.load_time += took;
        st.reading = st.reading.saturating_sub(1);
        if st.reading == 0 {
            if let Some(t) = st.busy_since.take() {
                st.metrics.read_busy_time += t.elapsed();
            }
        }
        match res {
            Ok(len) => {
                s.state = SlotState::Ready { key: job.key, len, prefetched: prefetch };
                st.metrics.loads += 1;
                st.metrics.bytes_loaded += len as u64;
            }
            Err(err) => {
                tracing::warn!(%err, "expert load failed");
                st.metrics.load_errors += 1;
                s.state = if s.pins == 0 { SlotState::Free } else { SlotState::Failed { err } };
                st.map.remove(&job.key);
                st.policy.on_evict(job.key);
            }
        }
        drop(guard);
        self.cond.notify_all();
    }

    fn read(&self, job: &mut Job<S::Buf>) -> OffloadResult<usize> {
        let key = job.key;
        if self.shutdown.load(Ordering::Relaxed) {
            return Err(OffloadError::Loader("cache shut down".into()));
        }
        let buf = Arc::get_mut(&mut job.buf)
            .ok_or_else(|| OffloadError::Loader("internal: slot buffer shared during a load".into()))?;
        let cap = AsRef::<[u8]>::as_ref(buf).len();
        match catch_unwind(AssertUnwindSafe(|| self.source.read(key, buf))) {
            Ok(Ok(len)) if len <= cap => Ok(len),
            Ok(Ok(len)) => Err(OffloadError::BadLength {
                layer: key.layer.0,
                expert: key.expert.0,
                len,
                slot_bytes: cap,
            }),
            Ok(Err(e)) => Err(OffloadError::load(key, e)),
            Err(_) => Err(OffloadError::SourcePanicked { layer: key.layer.0, expert: key.expert.0 }),
        }
    }
}

fn loader<S: ExpertSource>(shared: Arc<Shared<S>>, jobs: Receiver<Job<S::Buf>>) {
    for mut job in jobs.iter() {
        let t0 = Instant::now();
        {
            let mut st = shared.state.lock();
            if st.reading == 0 {
                st.busy_since = Some(t0);
            }
            st.reading += 1;
        }
        let res = shared.read(&mut job);
        shared.finish(job, res, t0.elapsed());
    }
}

/// A byte-budgeted cache of experts for one tier, filled from an [`ExpertSource`].
pub struct ExpertCache<S: ExpertSource> {
    shared: Arc<Shared<S>>,
    jobs: Sender<Job<S::Buf>>,
    workers: Vec<JoinHandle<()>>,
    n_slots: usize,
    slot_bytes: usize,
    budget_bytes: u64,
    policy_name: &'static str,
}

impl<S: ExpertSource> fmt::Debug for ExpertCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertCache")
            .field("n_slots", &self.n_slots)
            .field("slot_bytes", &self.slot_bytes)
            .field("budget_bytes", &self.budget_bytes)
            .field("policy", &self.policy_name)
            .field("loaders", &self.workers.len())
            .finish()
    }
}

impl<S: ExpertSource> ExpertCache<S> {
    /// Builds the cache with the policy named in `config`: allocates every slot from the
    /// source and starts the loader threads.
    pub fn new(source: S, config: CacheConfig) -> OffloadResult<Self> {
        let policy = config.policy.build(config.top_k);
        Self::with_policy(source, config, policy)
    }

    /// Builds the cache with a custom policy (`config.policy` is ignored).
    pub fn with_policy(
        source: S,
        config: CacheConfig,
        policy: Box<dyn EvictionPolicy>,
    ) -> OffloadResult<Self> {
        let slot_bytes = source.slot_bytes();
        if slot_bytes == 0 {
            return Err(OffloadError::ZeroSlotSize);
        }
        let fit = usize::try_from(config.budget_bytes / slot_bytes as u64).unwrap_or(usize::MAX);
        let min_slots = config.top_k.max(1);
        if fit < min_slots {
            let min_bytes = min_slots as u64 * slot_bytes as u64;
            return Err(OffloadError::BudgetTooSmall {
                budget_bytes: config.budget_bytes,
                slot_bytes,
                slots: fit,
                min_slots,
                min_bytes,
                min_mb: min_bytes.div_ceil(1 << 20),
            });
        }
        let n_slots = config.max_slots.map_or(fit, |m| fit.min(m.max(min_slots)));
        let mut slots = Vec::with_capacity(n_slots);
        for i in 0..n_slots {
            let buf =
                source.alloc_slot().map_err(|e| OffloadError::SlotAlloc { slot: i, source: Arc::new(e) })?;
            let len = AsRef::<[u8]>::as_ref(&buf).len();
            if len < slot_bytes {
                return Err(OffloadError::SlotBufferTooSmall { expected: slot_bytes, actual: len });
            }
            slots.push(Slot { state: SlotState::Free, pins: 0, buf: Some(Arc::new(buf)) });
        }
        let policy_name = policy.name();
        let state = State {
            slots,
            map: HashMap::with_capacity(n_slots * 2),
            policy,
            window: Window {
                k: config.window_tokens as u64,
                clock: Vec::new(),
                now: 0,
                marks: HashMap::new(),
            },
            current: Vec::new(),
            metrics: CacheMetrics::default(),
            seq: 0,
            reading: 0,
            busy_since: None,
            cand: Vec::with_capacity(n_slots),
            cand_keys: Vec::with_capacity(n_slots),
        };
        let shared = Arc::new(Shared {
            source,
            state: Mutex::new(state),
            cond: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut cache = Self {
            shared,
            jobs: tx,
            workers: Vec::new(),
            n_slots,
            slot_bytes,
            budget_bytes: config.budget_bytes,
            policy_name,
        };
        for i in 0..config.loader_threads.max(1) {
            let (shared, rx) = (Arc::clone(&cache.shared), rx.clone());
            let h = std::thread::Builder::new()
                .name(format!("hetmoe-loader-{i}"))
                .spawn(move || loader(shared, rx))
                .map_err(|e| OffloadError::Loader(e.to_string()))?;
            cache.workers.push(h);
        }
        Ok(cache)
    }

    /// Number of preallocated slots.
    pub fn n_slots(&self) -> usize {
        self.n_slots
    }
    /// Bytes per slot (the source's largest expert extent).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    /// The configured budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }
    /// Name of the eviction policy.
    pub fn policy_name(&self) -> &'static str {
        self.policy_name
    }
    /// The source the cache loads from.
    pub fn source(&self) -> &S {
        &self.shared.source
    }

    /// Bytes of the slots that hold or are loading an expert (`≤ budget_bytes`).
    pub fn resident_bytes(&self) -> u64 {
        let st = self.shared.state.lock();
        st.slots.iter().filter(|s| !matches!(s.state, SlotState::Free)).count() as u64
            * self.slot_bytes as u64
    }

    /// Whether `key` is loaded (not merely loading).
    pub fn is_resident(&self, key: ExpertKey) -> bool {
        let st = self.shared.state.lock();
        st.map.get(&key).is_some_and(|&i| matches!(st.slots[i].state, SlotState::Ready { .. }))
    }

    /// The loaded experts, ascending.
    pub fn resident(&self) -> Vec<ExpertKey> {
        let st = self.shared.state.lock();
        let mut v: Vec<_> = st
            .slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Ready { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> CacheMetrics {
        self.shared.state.lock().metrics.clone()
    }

    /// Zeroes the counters (e.g. after warm-up).
    pub fn reset_metrics(&self) {
        self.shared.state.lock().metrics = CacheMetrics::default();
    }

    /// Tells the cache (policy and windowing) what one layer does for one step. Call it for
    /// every MoE layer step, after routing and before acquiring the step's experts: its
    /// `used` experts are then the step's *current* experts, evicted by other loads of
    /// the step only when nothing else can be.
    pub fn on_step(&self, step: &Step<'_>) {
        let mut st = self.shared.state.lock();
        st.window.step(step);
        st.current.clear();
        let layer = step.layer;
        st.current.extend(step.used.iter().map(|&expert| ExpertKey { layer, expert }));
        st.policy.on_step(step);
    }

    /// Returns `key`'s bytes, pinned until the guard drops; loads it first on a miss
    /// (evicting the policy's victim) and blocks until it is loaded.
    ///
    /// **Rule:** a thread never calls `acquire` while holding as many guards as there are
    /// slots. If every slot is pinned by a live guard, `acquire` returns
    /// [`OffloadError::AllSlotsPinned`] instead of blocking forever. A failed read is
    /// returned to every caller waiting for that expert; the cache stays consistent and a
    /// later `acquire` retries the read.
    pub fn acquire(&self, key: ExpertKey) -> OffloadResult<ExpertGuard<'_, S>> {
        let mut st = self.shared.state.lock();
        st.count_access(key);
        self.acquire_locked(st, key)
    }

    fn acquire_locked<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<S::Buf>>,
        key: ExpertKey,
    ) -> OffloadResult<ExpertGuard<'a, S>> {
        let sh = &*self.shared;
        let mut waited: Option<Instant> = None;
        let slot = loop {
            if let Some(&i) = st.map.get(&key) {
                break i;
            }
            if let Some(i) = st.pick_slot(Purpose::Demand) {
                self.issue(&mut st, i, key, false)?;
                break i;
            }
            if st.slots.iter().all(|s| s.pins > 0 && matches!(s.state, SlotState::Ready { .. })) {
                st.add_stall(waited);
                return Err(OffloadError::AllSlotsPinned {
                    layer: key.layer.0,
                    expert: key.expert.0,
                    slots: self.n_slots,
                });
            }
            waited.get_or_insert_with(Instant::now);
            sh.cond.wait(&mut st);
        };
        st.slots[slot].pins += 1;
        st.policy.on_access(key);
        loop {
            let s = &mut st.slots[slot];
            match &mut s.state {
                SlotState::Ready { len, prefetched, .. } => {
                    *prefetched = false;
                    let (len, buf) = (*len, s.buf.clone());
                    st.add_stall(waited);
                    return Ok(ExpertGuard { shared: sh, slot, key, len, buf });
                }
                SlotState::Loading { .. } => {
                    waited.get_or_insert_with(Instant::now);
                    sh.cond.wait(&mut st);
                }
                SlotState::Failed { err } => {
                    let err = err.clone();
                    s.pins -= 1;
                    if s.pins == 0 {
                        s.state = SlotState::Free;
                    }
                    st.add_stall(waited);
                    drop(st);
                    sh.cond.notify_all();
                    return Err(err);
                }
                SlotState::Free => {
                    s.pins -= 1;
                    return Err(OffloadError::Loader("internal: pinned slot became free".into()));
                }
            }
        }
    }

    /// Starts loading `key` into `slot` on a loader thread.
    fn issue(
        &self,
        st: &mut State<S::Buf>,
        slot: usize,
        key: ExpertKey,
        prefetch: bool,
    ) -> OffloadResult<()> {
        let job = st.start_load(slot, key, prefetch)?;
        self.jobs.send(job).map_err(|e| {
            st.abort_load(e.0);
            OffloadError::Loader("loader threads have stopped".into())
        })
    }

    /// Starts loading those of `keys` (in order) that are neither resident nor loading,
    /// as long as free slots or unprotected, unpinned victims exist (it never evicts a
    /// pinned expert, an expert of the current step, one in the window, or one that an
    /// earlier prefetch loaded and nothing has used yet). Never blocks on I/O. Returns the
    /// number of loads started; the rest are dropped (counted in `prefetch_dropped`).
    pub fn prefetch(&self, keys: &[ExpertKey]) -> usize {
        self.prefetch_with(keys, Purpose::Speculative)
    }

    fn prefetch_with(&self, keys: &[ExpertKey], purpose: Purpose) -> usize {
        let speculative = purpose == Purpose::Speculative;
        let mut st = self.shared.state.lock();
        let mut issued = 0;
        for (n, &key) in keys.iter().enumerate() {
            if st.map.contains_key(&key) {
                continue;
            }
            let Some(i) = st.pick_slot(purpose) else {
                if speculative {
                    let rest = keys[n..].iter().filter(|k| !st.map.contains_key(k)).count();
                    st.metrics.prefetch_dropped += rest as u64;
                }
                break;
            };
            if self.issue(&mut st, i, key, speculative).is_err() {
                break;
            }
            issued += 1;
            if speculative {
                st.metrics.prefetches += 1;
            }
        }
        issued
    }

    /// Runs `f` on each of `keys` (distinct experts, typically one layer step's) exactly
    /// once, streaming them through the slots: resident experts first while the others
    /// load, at most one guard held at a time, so any number of experts goes through any
    /// cache of at least one slot. The order of calls is unspecified (the MoE block sums
    /// per token in rank order, so it does not depend on it). Counts one access per key.
    pub fn for_each<E, F>(&self, keys: &[ExpertKey], mut f: F) -> Result<(), E>
    where
        E: From<OffloadError>,
        F: FnMut(ExpertKey, &[u8]) -> Result<(), E>,
    {
        let mut pending: Vec<ExpertKey> = keys.to_vec();
        {
            let mut st = self.shared.state.lock();
            for &k in keys {
                st.count_access(k);
                if !st.current.contains(&k) {
                    st.current.push(k);
                }
            }
        }
        let result = (|| {
            while !pending.is_empty() {
                self.prefetch_with(&pending, Purpose::Needed);
                let st = self.shared.state.lock();
                let state_of = |k: &ExpertKey| st.map.get(k).map(|&i| &st.slots[i].state);
                let next = pending
                    .iter()
                    .position(|k| matches!(state_of(k), Some(SlotState::Ready { .. })))
                    .or_else(|| {
                        pending.iter().position(|k| matches!(state_of(k), Some(SlotState::Loading { .. })))
                    })
                    .unwrap_or(0);
                let key = pending.swap_remove(next);
                let guard = self.acquire_locked(st, key)?;
                self.shared.state.lock().current.retain(|k| *k != key);
                f(key, guard.bytes())?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.shared.state.lock().current.retain(|k| !pending.contains(k));
        }
        result
    }

    /// Blocks until no load is in flight (for tests and deterministic replays).
    pub fn wait_idle(&self) {
        let mut st = self.shared.state.lock();
        while st.slots.iter().any(|s| matches!(s.state, SlotState::Loading { .. })) {
            self.shared.cond.wait(&mut st);
        }
    }

    /// Checks the bookkeeping (a test aid): every mapped key sits in a slot that holds or
    /// loads it, every such slot is mapped, loaded slots have their buffer, and the
    /// occupied bytes are within the budget.
    pub fn check_invariants(&self) -> Result<(), String> {
        let st = self.shared.state.lock();
        if self.n_slots as u64 * self.slot_bytes as u64 > self.budget_bytes {
            return Err("slots exceed the budget".into());
        }
        let mut mapped = 0;
        for (i, s) in st.slots.iter().enumerate() {
            let key = match s.state {
                SlotState::Loading { key, .. } => Some(key),
                SlotState::Ready { key, .. } => {
                    if s.buf.is_none() {
                        return Err(format!("slot {i} ({key}) is ready without its buffer"));
                    }
                    Some(key)
                }
                SlotState::Free => {
                    if s.pins != 0 {
                        return Err(format!("free slot {i} has {} pins", s.pins));
                    }
                    None
                }
                SlotState::Failed { .. } => {
                    if s.pins == 0 {
                        return Err(format!("failed slot {i} has no waiter"));
                    }
                    None
                }
            };
            if let Some(key) = key {
                mapped += 1;
                if st.map.get(&key) != Some(&i) {
                    return Err(format!("slot {i} holds {key} but the map says {:?}", st.map.get(&key)));
                }
            }
        }
        if mapped != st.map.len() {
            return Err(format!("map has {} keys, slots hold {mapped}", st.map.len()));
        }
        let occupied = st.slots.iter().filter(|s| !matches!(s.state, SlotState::Free)).count() as u64;
        if occupied * self.slot_bytes as u64 > self.budget_bytes {
            return Err("resident bytes exceed the budget".into());
        }
        Ok(())
    }
}

impl<S: ExpertSource> Drop for ExpertCache<S> {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        let (tx, _) = crossbeam_channel::unbounded();
        drop(std::mem::replace(&mut self.jobs, tx));
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// One expert pinned in its slot: its bytes stay valid and in place until the guard drops.
pub struct ExpertGuard<'a, S: ExpertSource> {
    shared: &'a Shared<S>,
    slot: usize,
    key: ExpertKey,
    len: usize,
    /// Always `Some` until `drop` (taken there before unpinning, so that the loader that
    /// reuses the slot next finds the buffer unshared).
    buf: Option<Arc<S::Buf>>,
}

impl<S: ExpertSource> ExpertGuard<'_, S> {
    pub fn key(&self) -> ExpertKey {
        self.key
    }
    /// The expert's bytes exactly as the source read them.
    pub fn bytes(&self) -> &[u8] {
        match &self.buf {
            Some(b) => AsRef::<[u8]>::as_ref(&**b).get(..self.len).unwrap_or(&[]),
            None => &[],
        }
    }
}

impl<S: ExpertSource> fmt::Debug for ExpertGuard<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertGuard")
            .field("key", &self.key)
            .field("slot", &self.slot)
            .field("len", &self.len)
            .finish()
    }
}

impl<S: ExpertSource> Drop for ExpertGuard<'_, S> {
    fn drop(&mut self) {
        self.buf = None;
        let mut st = self.shared.state.lock();
        let s = &mut st.slots[self.slot];
        s.pins = s.pins.saturating_sub(1);
        let unpinned = s.pins == 0;
        drop(st);
        if unpinned {
            self.shared.cond.notify_all();
        }
    }
}

#[cfg(test)]
mod tests;
