//! The io_uring reader: `O_DIRECT` reads of extent chunks, up to `queue_depth` in flight,
//! into caller buffers (registered ones use `READ_FIXED`).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};
use xxhash_rust::xxh3::Xxh3;

use super::{
    check_dst, checksum_err, extent_io, open_store_file, short_read, ExpertReader, ReadRequest, ReaderKind,
    ReaderOptions,
};
use crate::error::{StorageError, StorageResult};
use crate::expert_store::format::{Extent, StoreLayout};

/// io_uring reader of one store. See [`ExpertReader`].
pub struct UringReader {
    layout: Arc<StoreLayout>,
    file: File,
    direct: bool,
    ring: IoUring,
    queue_depth: usize,
    chunk: usize,
    /// Registered buffers, by index: `(start address, length)`.
    registered: Vec<(usize, usize)>,
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for UringReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringReader")
            .field("path", &self.layout.path)
            .field("direct", &self.direct)
            .field("queue_depth", &self.queue_depth)
            .field("chunk", &self.chunk)
            .field("registered", &self.registered.len())
            .finish()
    }
}

struct Chunk {
    req: usize,
    /// This chunk's bytes of the request's destination: `start..end`; `pos` is the next
    /// byte to fill (past `start` after a short read).
    start: usize,
    pos: usize,
    end: usize,
    done: bool,
}

struct ReqState {
    /// `None` when the request was rejected before any read.
    x: Option<Extent>,
    fixed: Option<u16>,
    /// Next chunk (index into the batch's chunk list) to feed to the checksum.
    next_hash: usize,
    hasher: Option<Xxh3>,
}

fn setup_err(source: io::Error) -> StorageError {
    StorageError::ReaderSetup { reader: "io_uring", source }
}

impl UringReader {
    /// Sets up a ring of `opts.queue_depth` entries and opens the store (with `O_DIRECT`
    /// when asked and supported). Fails when io_uring is unavailable or lacks `READ`.
    pub fn open(layout: Arc<StoreLayout>, opts: &ReaderOptions) -> StorageResult<Self> {
        let queue_depth = opts.queue_depth.clamp(1, 4096);
        let ring = IoUring::new(queue_depth.next_power_of_two()).map_err(setup_err)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(setup_err)?;
        if !probe.is_supported(opcode::Read::CODE) || !probe.is_supported(opcode::ReadFixed::CODE) {
            return Err(setup_err(io::Error::new(io::ErrorKind::Unsupported, "kernel lacks IORING_OP_READ")));
        }
        let (file, direct) = open_store_file(&layout.path, opts.direct)?;
        Ok(UringReader {
            layout,
            file,
            direct,
            ring,
            queue_depth: queue_depth as usize,
            chunk: opts.chunk(),
            registered: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// Whether the store is read with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Registers long-lived destination buffers (cache slots, or one arena holding them)
    /// with the kernel; reads whose destination lies inside one of them use `READ_FIXED`,
    /// which saves pinning pages on every read. Replaces any earlier registration.
    ///
    /// # Safety
    ///
    /// Every buffer must stay allocated at the same address (not freed, not moved, not
    /// unmapped) until [`Self::unregister_buffers`] is called, this function is called
    /// again, or the reader is dropped: the kernel keeps the pages pinned and `READ_FIXED`
    /// writes through that pinning, not through the caller's current mapping.
    pub unsafe fn register_buffers(&mut self, bufs: &[&[u8]]) -> StorageResult<()> {
        self.unregister_buffers()?;
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() })
            .collect();
        // SAFETY: the iovecs describe live buffers; the caller guarantees (this function's
        // contract) that they stay valid until unregistered or the ring is dropped.
        unsafe { self.ring.submitter().register_buffers(&iov) }.map_err(setup_err)?;
        self.registered = bufs.iter().map(|b| (b.as_ptr() as usize, b.len())).collect();
        Ok(())
    }

    /// Drops the registration made by [`Self::register_buffers`] (no-op without one).
    pub fn unregister_buffers(&mut self) -> StorageResult<()> {
        if !self.registered.is_empty() {
            self.ring.submitter().unregister_buffers().map_err(setup_err)?;
            self.registered.clear();
        }
        Ok(())
    }

    fn fixed_index(&self, addr: usize, len: usize) -> Option<u16> {
        self.registered
            .iter()
            .position(|&(start, n)| addr >= start && addr + len <= start + n)
            .and_then(|i| u16::try_from(i).ok())
    }
}

impl Drop for UringReader {
    fn drop(&mut self) {
        // Nothing is ever in flight between calls (read_batch reaps every completion).
        let _ = self.unregister_buffers();
    }
}

fn retryable(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN
}

impl ExpertReader for UringReader {
    fn read_batch(&mut self, reqs: &mut [ReadRequest<'_>]) -> Vec<StorageResult<()>> {
        let n = reqs.len();
        let mut st: Vec<ReqState> = Vec::with_capacity(n);
        let mut results: Vec<Option<StorageResult<()>>> = (0..n).map(|_| None).collect();
        let mut chunks = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match check_dst(&self.layout, r.key, r.dst) {
                Ok((x, len)) => {
                    let first = chunks.len();
                    for pos in (0..len).step_by(self.chunk) {
                        chunks.push(Chunk {
                            req: i,
                            start: pos,
                            pos,
                            end: (pos + self.chunk).min(len),
                            done: false,
                        });
                    }
                    let fixed = self.fixed_index(r.dst.as_ptr() as usize, len);
                    st.push(ReqState { x: Some(x), fixed, next_hash: first, hasher: None });
                }
                Err(e) => {
                    results[i] = Some(Err(e));
                    st.push(ReqState { x: None, fixed: None, next_hash: 0, hasher: None });
                }
            }
        }
        // Base pointers of the destinations, taken once: while reads are in flight the
        // buffers are only touched through these (no new references to them are made).
        let bases: Vec<*mut u8> = reqs.iter_mut().map(|r| r.dst.as_mut_ptr()).collect();
        let fd = types::Fd(self.file.as_raw_fd());
        let mut pending: VecDeque<usize> = (0..chunks.len()).collect();
        let mut inflight = 0usize;
        // Requests with newly completed chunks, to hash after the next submission.
        let mut to_hash: VecDeque<usize> = VecDeque::new();
        while !pending.is_empty() || inflight > 0 || !to_hash.is_empty() {
            {
                let mut sq = self.ring.submission();
                while inflight < self.queue_depth && !sq.is_full() {
                    let Some(ci) = pending.pop_front() else { break };
                    let c = &chunks[ci];
                    let s = &st[c.req];
                    let Some(x) = s.x else { continue };
                    if results[c.req].is_some() {
                        // The request already failed: do not read the rest of it.
                        continue;
                    }
                    // In bounds: c.end <= padded extent length <= dst length (check_dst).
                    let ptr = bases[c.req].wrapping_add(c.pos);
                    let len = (c.end - c.pos) as u32;
                    let offset = x.offset + c.pos as u64;
                    let entry = match s.fixed {
                        Some(idx) => opcode::ReadFixed::new(fd, ptr, len, idx).offset(offset).build(),
                        None => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                    }
                    .user_data(ci as u64);
                    // SAFETY: `ptr..ptr + len` lies inside `reqs[c.req].dst` (check_dst), which is
                    // exclusively borrowed for this whole call, and no other read in flight and
                    // no hashing covers the same bytes (a chunk is hashed only once it is done).
                    // Every pushed entry is reaped (its completion seen) before this function
                    // returns (the loop runs until `inflight` is zero, and unrecoverable
                    // submission errors abort), so the kernel never writes to the buffer after
                    // the borrow ends. With READ_FIXED, `fixed_index` checked that the range
                    // lies in registered buffer `idx`.
                    if unsafe { sq.push(&entry) }.is_err() {
                        pending.push_front(ci);
                        break;
                    }
                    inflight += 1;
                }
            }
            if inflight == 0 && to_hash.is_empty() {
                continue;
            }
            // With data to hash, submit without waiting and hash while the device works;
            // otherwise wait for a completion.
            let wait_for = if to_hash.is_empty() { 1 } else { 0 };
            if let Err(e) = self.ring.submit_and_wait(wait_for) {
                let errno = e.raw_os_error().unwrap_or(0);
                if !(retryable(errno) || errno == libc::EBUSY) {
                    // Entries may still be queued or in flight against borrowed buffers:
                    // returning now would let the kernel write to memory we no longer own.
                    eprintln!("hetmoe: io_uring_enter failed with reads in flight ({e}); aborting");
                    std::process::abort();
                }
            }
            self.cqes.clear();
            self.cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &self.cqes {
                inflight -= 1;
                let ci = ud as usize;
                let c = &mut chunks[ci];
                let r = c.req;
                let Some(x) = st[r].x else { continue };
                let want = (c.end - c.pos) as u64;
                let offset = x.offset + c.pos as u64;
                if res < 0 {
                    if retryable(-res) {
                        pending.push_front(ci);
                        continue;
                    }
                    if results[r].is_none() {
                        let e = io::Error::from_raw_os_error(-res);
                        results[r] = Some(Err(extent_io(&self.layout, &x, offset, e)));
                    }
                } else if res == 0 {
                    if results[r].is_none() {
                        results[r] = Some(Err(short_read(&self.layout, &x, offset, want, 0)));
                    }
                } else if (res as u64) < want {
                    // Short read: read the remainder.
                    c.pos += res as usize;
                    pending.push_front(ci);
                    continue;
                } else {
                    c.done = true;
                    to_hash.push_back(r);
                }
            }
            if wait_for == 0 {
                // Hash one completed chunk, then go back to keep the queue full: hashing in
                // small steps keeps the device busy even when this thread is slow.
                while let Some(&r) = to_hash.front() {
                    let s = &mut st[r];
                    let Some(x) = s.x else {
                        to_hash.pop_front();
                        continue;
                    };
                    let ready = s.next_hash < chunks.len()
                        && chunks[s.next_hash].req == r
                        && chunks[s.next_hash].done;
                    if results[r].is_some() || !ready {
                        to_hash.pop_front();
                        continue;
                    }
                    let data_len = x.len as usize;
                    let c = &chunks[s.next_hash];
                    let (a, b) = (c.start.min(data_len), c.end.min(data_len));
                    // SAFETY: `a..b` lies inside `reqs[r].dst` (b <= extent length <= dst
                    // length, check_dst); its read has completed and is never resubmitted,
                    // so nothing writes to these bytes while this shared view lives.
                    let bytes = unsafe { std::slice::from_raw_parts(bases[r].wrapping_add(a), b - a) };
                    s.hasher.get_or_insert_with(Xxh3::new).update(bytes);
                    s.next_hash += 1;
                    let last = s.next_hash == chunks.len() || chunks[s.next_hash].req != r;
                    if last {
                        let actual = s.hasher.as_ref().map_or(0, |h| h.digest());
                        results[r] = Some(if actual == x.xxh3 {
                            Ok(())
                        } else {
                            Err(checksum_err(&self.layout, &x, actual))
                        });
                        to_hash.pop_front();
                    }
                    break;
                }
            }
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }

    fn kind(&self) -> ReaderKind {
        ReaderKind::Uring
    }

    fn layout(&self) -> &Arc<StoreLayout> {
        &self.layout
    }
}
