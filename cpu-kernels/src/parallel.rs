//! Fork-join for the kernels: [`for_each`] runs `f(0..n)` across the threads of the
//! current [`Team`] (or of the current rayon pool when no team is installed).
//!
//! Why a team of its own: one decode step of a MoE model is ~60 short parallel loops
//! (each matvec, each expert) separated by microseconds of serial work. Rayon's idle
//! workers go to sleep after a few dozen yields, so nearly every loop paid a futex wake-up
//! (tens of microseconds in a VM; measured ~50 context switches per token). A team's
//! workers spin between loops for `SPIN` before parking, and the calling thread takes
//! part in the work. Which thread runs an item never changes its result (kernels compute
//! each output in one item). A loop publishes its job through atomics (no lock, no
//! allocation); workers only take a mutex to park.
//!
//! Items are split into one contiguous range per thread, claimed from the front in order,
//! and a thread that runs out steals the back half of the largest range left. Kernel items
//! are consecutive pieces of a weight matrix, so each thread streams one long run of memory
//! (its prefetches run on into its own next item) instead of hopping between pieces handed
//! out alternately from one counter; measured on this 2-core VM with 128-row `axpy` items:
//! 6–12 % more bandwidth.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins before parking. Long enough to bridge the serial work
/// between two loops of a forward pass, short enough not to steal a core for long from
/// I/O threads once the pass is over.
const SPIN: Duration = Duration::from_micros(300);

thread_local! {
    /// The team installed on this thread by [`Team::install`] (null when none).
    static CURRENT: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
    /// Set while this thread runs items of a loop: nested loops run serially.
    static IN_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// Threads available to [`for_each`] on this thread: the installed team's size, else the
/// current rayon pool's.
pub fn current_threads() -> usize {
    let team = CURRENT.with(Cell::get);
    if team.is_null() {
        rayon::current_num_threads().max(1)
    } else {
        // SAFETY: CURRENT is non-null only inside Team::install, which keeps the team alive.
        unsafe { (*team).workers + 1 }
    }
}

/// Runs `f(i)` for every `i` in `0..n`, in parallel, and returns when all have finished.
/// Panics in `f` are propagated (after every item has stopped running).
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || n > u32::MAX as usize || IN_LOOP.with(Cell::get) {
        (0..n).for_each(f);
        return;
    }
    let team = CURRENT.with(Cell::get);
    if team.is_null() {
        (0..n).into_par_iter().for_each(&f);
    } else {
        // SAFETY: as in current_threads.
        unsafe { (*team).run(n, &f) };
    }
}

/// A buffer's base pointer, shared by the items of one loop that each write their own
/// disjoint part of the buffer (every use states which part is its item's).
pub(crate) struct SyncPtr<T = f32>(pub(crate) *mut T);
impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}
// SAFETY: items only write disjoint ranges through it, while the buffer is exclusively
// borrowed by the loop's caller.
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above; no two items touch the same element.
unsafe impl<T> Sync for SyncPtr<T> {}

/// One thread's items `lo..hi`, packed by [`pack`], on a cache line of its own (owners
/// update theirs on every item).
#[derive(Default)]
#[repr(align(128))]
struct Range(AtomicU64);

impl Range {
    /// The first item left, if any, removed from the range.
    fn take_front(&self) -> Option<usize> {
        let mut cur = self.0.load(Acquire);
        loop {
            let (lo, hi) = unpack(cur);
            if lo >= hi {
                return None;
            }
            match self.0.compare_exchange_weak(cur, pack(lo + 1, hi), AcqRel, Acquire) {
                Ok(_) => return Some(lo as usize),
                Err(now) => cur = now,
            }
        }
    }
}

fn pack(lo: u32, hi: u32) -> u64 {
    lo as u64 | (hi as u64) << 32
}
/// [`pack`] of bounds known to fit in 32 bits ([`for_each`] runs larger loops serially).
fn pack_u64(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo <= hi && hi <= u32::MAX as u64);
    lo | hi << 32
}
fn unpack(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

/// A fixed set of worker threads that [`for_each`] uses while [`Team::install`]ed.
pub struct Team {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// One caller drives the team at a time (a flag, not a lock: a second caller does not
    /// wait, it runs on rayon).
    busy: AtomicBool,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &self.threads()).finish()
    }
}

/// The job of the current epoch: `f` erased to a raw pointer (valid until every worker has
/// checked out of the epoch, which the caller waits for).
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

struct Shared {
    workers: usize,
    /// Bumped by the caller to publish a job; workers run each epoch exactly once.
    epoch: AtomicU64,
    /// The current epoch's job, on the caller's stack (null before the first): written
    /// before the epoch is bumped, read by workers after they see it. No lock per loop.
    job: AtomicPtr<Job>,
    /// Per thread (the caller is 0, worker i is i + 1): the items `lo..hi` it has yet to
    /// claim, packed as `lo | hi << 32` so the owner (from the front) and thieves (the back
    /// half) update it with one compare-and-swap.
    ranges: Box<[Range]>,
    /// Workers that have not checked out of the current epoch.
    pending: AtomicUsize,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    /// Set with `panic` when an item panicked on a worker (checked without locking).
    panicked: AtomicBool,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: the raw job pointer is only dereferenced while the caller keeps `f` alive (it
// waits for every worker to check out); everything else is atomics and mutexes.
unsafe impl Send for Shared {}
// SAFETY: as above; `f` is Sync, so calling it from several threads is allowed.
unsafe impl Sync for Shared {}

impl Team {
    /// A team of `threads` threads in all: the caller of [`Team::install`] plus
    /// `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            workers,
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            ranges: (0..=workers).map(|_| Range::default()).collect(),
            pending: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            panicked: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("hetmoe-compute-{}", i + 1))
                .spawn(move || s.work(i + 1));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Stop the workers already started; the team cannot be built.
                    drop(Team { shared, handles, busy: AtomicBool::new(false) });
                    return Err(e);
                }
            }
        }
        Ok(Team { shared, handles, busy: AtomicBool::new(false) })
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.shared.workers + 1
    }

    /// Runs `f` on this thread with the team installed: [`for_each`] calls inside it (on
    /// this thread) use the team. If another thread is using the team, `f` runs without it
    /// (on the current rayon pool) rather than waiting.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        self.try_install(f).unwrap_or_else(|f| f())
    }

    /// [`Team::install`], or `Err(f)` (not run) if another thread is using the team.
    pub fn try_install<R, F: FnOnce() -> R>(&self, f: F) -> Result<R, F> {
        if self.busy.compare_exchange(false, true, Acquire, Relaxed).is_err() {
            return Err(f);
        }
        struct Free<'a>(&'a AtomicBool);
        impl Drop for Free<'_> {
            fn drop(&mut self) {
                self.0.store(false, Release);
            }
        }
        let _busy = Free(&self.busy);
        let prev = CURRENT.with(|c| c.replace(Arc::as_ptr(&self.shared)));
        struct Restore(*const Shared);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(prev);
        Ok(f())
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        {
            let _g = self.shared.park.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Shared {
    /// Claims and runs items until none are left: this thread's range from the front, then
    /// the back halves of others'.
    fn claim(&self, me: usize, job: Job) {
        IN_LOOP.with(|c| c.set(true));
        loop {
            let i = match self.ranges[me].take_front() {
                Some(i) => i,
                None => match self.steal(me) {
                    Some(i) => i,
                    None => break,
                },
            };
            debug_assert!(i < job.n);
            // SAFETY: the caller of `run` keeps `f` alive until every worker has checked
            // out of this epoch, and this runs before the check-out.
            unsafe { (*job.f)(i) };
        }
        IN_LOOP.with(|c| c.set(false));
    }

    /// Moves the back half of the largest other range (rounded up: a last item too) into
    /// this thread's own (empty) range and returns its first item; `None` when no items are
    /// left to take.
    fn steal(&self, me: usize) -> Option<usize> {
        loop {
            let (mut victim, mut most) = (None, 0);
            for (v, r) in self.ranges.iter().enumerate() {
                let (lo, hi) = unpack(r.0.load(Acquire));
                if v != me && hi - lo > most {
                    (victim, most) = (Some(v), hi - lo);
                }
            }
            let v = victim?;
            let cur = self.ranges[v].0.load(Acquire);
            let (lo, hi) = unpack(cur);
            if hi <= lo {
                continue;
            }
            let mid = lo + (hi - lo) / 2;
            if self.ranges[v].0.compare_exchange(cur, pack(lo, mid), AcqRel, Acquire).is_ok() {
                // Our range is empty, so no thief can change it under us (their
                // compare-and-swap expects a non-empty value; an empty one never becomes
                // non-empty except here, by its owner).
                self.ranges[me].0.store(pack(mid + 1, hi), Release);
                return Some(mid as usize);
            }
        }
    }

    /// The caller's side: publish, work, wait for every worker to check out.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased; `wait_all` below (also run on unwind, by the
        // guard) keeps `f` borrowed until no worker can touch it.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let mut job = Job { f, n };
        // Workers read `job` through this pointer until they check out, which `WaitAll`
        // waits for before this frame can end.
        self.job.store(&mut job, Relaxed);
        let parts = self.ranges.len() as u64;
        let n32 = n as u64;
        for (p, r) in self.ranges.iter().enumerate() {
            let p = p as u64;
            r.0.store(pack_u64(n32 * p / parts, n32 * (p + 1) / parts), Relaxed);
        }
        self.pending.store(self.workers, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _g = self.park.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
        struct WaitAll<'a>(&'a Shared);
        impl Drop for WaitAll<'_> {
            fn drop(&mut self) {
                let mut spins = 0u32;
                while self.0.pending.load(Acquire) != 0 {
                    spins += 1;
                    if spins < 1 << 16 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
                IN_LOOP.with(|c| c.set(false));
            }
        }
        let wait = WaitAll(self);
        self.claim(0, job);
        drop(wait);
        if self.panicked.swap(false, Acquire) {
            if let Some(p) = self.panic.lock().unwrap_or_else(|p| p.into_inner()).take() {
                resume_unwind(p);
            }
        }
    }

    /// A worker's loop: wait for an epoch (spin, then park), run its items, check out.
    fn work(&self, me: usize) {
        // Epoch 0 is the team's initial state: a job published before this thread started
        // is epoch 1, which it must not skip.
        let mut seen = 0;
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            while self.epoch.load(Acquire) == seen {
                std::hint::spin_loop();
                spins += 1;
                if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                    let mut g = self.park.lock().unwrap_or_else(|p| p.into_inner());
                    self.sleepers.fetch_add(1, SeqCst);
                    while self.epoch.load(SeqCst) == seen {
                        g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                }
            }
            seen = self.epoch.load(Acquire);
            if self.stop.load(SeqCst) {
                return;
            }
            let job = self.job.load(Relaxed);
            if !job.is_null() {
                // SAFETY: the epoch's job was stored before the epoch was bumped (SeqCst
                // store, seen by the Acquire load above) and stays alive until this worker
                // checks out below.
                let job = unsafe { *job };
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| self.claim(me, job))) {
                    IN_LOOP.with(|c| c.set(false));
                    self.panic.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(p);
                    self.panicked.store(true, Release);
                }
            }
            self.pending.fetch_sub(1, Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_with_and_without_a_team() {
        for threads in [1, 2, 3] {
            let team = Team::new(threads).unwrap();
            assert_eq!(team.threads(), threads);
            for n in [0usize, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                team.install(|| {
                    assert_eq!(current_threads(), threads);
                    for_each(n, |i| {
                        // Nested loops run serially inside an item.
                        for_each(2, |_| {});
                        hits[i].fetch_add(1, Relaxed);
                    })
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "threads {threads} n {n}");
            }
        }
        let hits = AtomicUsize::new(0);
        for_each(100, |_| {
            hits.fetch_add(1, Relaxed);
        });
        assert_eq!(hits.load(Relaxed), 100);
    }

    #[test]
    fn slow_items_are_stolen_and_every_item_still_runs_once() {
        // The first items (the caller's range) are slow, so the workers finish theirs and
        // steal from it, and from each other, down to single items.
        for threads in [2, 4] {
            let team = Team::new(threads).unwrap();
            for n in [2usize, 3, 17, 64] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                team.install(|| {
                    for_each(n, |i| {
                        if i < n / 2 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        hits[i].fetch_add(1, Relaxed);
                    })
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "threads {threads} n {n}");
            }
        }
    }

    #[test]
    fn ranges_pack_and_split() {
        assert_eq!(unpack(pack(3, 9)), (3, 9));
        assert_eq!(unpack(pack_u64(0, u32::MAX as u64)), (0, u32::MAX));
        let r = Range::default();
        r.0.store(pack(5, 7), Relaxed);
        assert_eq!(r.take_front(), Some(5));
        assert_eq!(r.take_front(), Some(6));
        assert_eq!(r.take_front(), None);
    }

    #[test]
    fn a_panicking_item_reaches_the_caller_and_the_team_survives() {
        let team = Team::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.install(|| {
                for_each(64, |i| {
                    if i == 40 {
                        panic!("item 40");
                    }
                })
            })
        }));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        team.install(|| {
            for_each(64, |_| {
                hits.fetch_add(1, Relaxed);
            })
        });
        assert_eq!(hits.load(Relaxed), 64);
    }

    #[test]
    fn a_job_published_before_the_workers_start_is_not_missed() {
        for _ in 0..200 {
            let team = Team::new(3).unwrap();
            let hits = AtomicUsize::new(0);
            team.install(|| {
                for_each(16, |_| {
                    hits.fetch_add(1, Relaxed);
                })
            });
            assert_eq!(hits.load(Relaxed), 16);
        }
    }

    #[test]
    fn concurrent_callers_each_finish_their_loops() {
        let team = Team::new(2).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        let hits = AtomicUsize::new(0);
                        team.install(|| {
                            for_each(16, |_| {
                                hits.fetch_add(1, Relaxed);
                            })
                        });
                        assert_eq!(hits.load(Relaxed), 16);
                    }
                });
            }
        });
    }

    #[test]
    fn workers_park_and_wake() {
        let team = Team::new(2).unwrap();
        for _ in 0..3 {
            std::thread::sleep(SPIN * 4);
            let hits = AtomicUsize::new(0);
            team.install(|| {
                for_each(8, |_| {
                    hits.fetch_add(1, Relaxed);
                })
            });
            assert_eq!(hits.load(Relaxed), 8);
        }
    }
}
