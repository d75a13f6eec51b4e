//! Disk bandwidth probes: the raw `O_DIRECT` sequential read rate of a file with io_uring
//! (the `fio --direct=1 --ioengine=io_uring --rw=read` equivalent), and the rate at which
//! an [`ExpertReader`] reads every extent of a store.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use super::aligned::{AlignedBuf, ALIGN};
use super::reader::{open_store_file, ExpertReader, ReadRequest};
use crate::error::{StorageError, StorageResult};

/// Bytes moved and the time it took.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub bytes: u64,
    pub elapsed: Duration,
    /// CPU time (user + system) the calling thread used meanwhile.
    pub cpu: Duration,
}

/// CPU time (user + system) used so far by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer it is given, which points to
    // properly sized, writable memory; on failure it writes nothing and the zeroed value
    // (a valid rusage) is read.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl Throughput {
    /// Decimal gigabytes per second.
    pub fn gbs(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// Reads `path` sequentially from offset 0 with `O_DIRECT`, `queue_depth` reads of
/// `block` bytes in flight (registered buffers, `READ_FIXED`), up to `max_bytes` (rounded
/// down to whole blocks and to the file). Fails if `O_DIRECT` is not available.
pub fn direct_read(path: &Path, queue_depth: u32, block: usize, max_bytes: u64) -> StorageResult<Throughput> {
    let io = |e| StorageError::io(path, e);
    let (file, direct) = open_store_file(path, true)?;
    if !direct {
        return Err(io(std::io::Error::other("O_DIRECT is not supported on this file system")));
    }
    let block = (block.max(ALIGN) / ALIGN) * ALIGN;
    let len = file.metadata().map_err(io)?.len().min(max_bytes);
    let n_blocks = len / block as u64;
    let qd = queue_depth.clamp(1, 1024) as usize;
    let mut ring = IoUring::new(qd.next_power_of_two() as u32).map_err(io)?;
    let mut bufs: Vec<AlignedBuf> = (0..qd).map(|_| AlignedBuf::zeroed(block)).collect();
    let iov: Vec<libc::iovec> =
        bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
    // SAFETY: `bufs` outlives the ring's use of them: the ring is dropped (and every read
    // reaped) before `bufs` at the end of this function (declared after it, dropped first).
    unsafe { ring.submitter().register_buffers(&iov) }.map_err(io)?;
    let fd = types::Fd(file.as_raw_fd());
    let (start, cpu0) = (Instant::now(), thread_cpu_time());
    let (mut next, mut inflight, mut done) = (0u64, 0usize, 0u64);
    let mut free: Vec<usize> = (0..qd).collect();
    let mut err = None;
    while done < n_blocks && err.is_none() || inflight > 0 {
        {
            let mut sq = ring.submission();
            while next < n_blocks && err.is_none() {
                let Some(slot) = free.pop() else { break };
                let entry = opcode::ReadFixed::new(fd, iov[slot].iov_base.cast(), block as u32, slot as u16)
                    .offset(next * block as u64)
                    .build()
                    .user_data(slot as u64);
                // SAFETY: the entry targets registered buffer `slot`, which no other read in
                // flight uses (taken from `free`) and which lives until every read is reaped.
                if unsafe { sq.push(&entry) }.is_err() {
                    free.push(slot);
                    break;
                }
                next += 1;
                inflight += 1;
            }
        }
        if inflight == 0 {
            break;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                eprintln!("hetmoe probe: io_uring_enter failed with reads in flight ({e}); aborting");
                std::process::abort();
            }
        }
        for c in ring.completion() {
            inflight -= 1;
            free.push(c.user_data() as usize);
            if c.result() != block as i32 && err.is_none() {
                err = Some(std::io::Error::other(format!("read returned {}", c.result())));
            }
            done += 1;
        }
    }
    let (elapsed, cpu) = (start.elapsed(), thread_cpu_time() - cpu0);
    drop(ring);
    drop(bufs);
    if let Some(e) = err {
        return Err(io(e));
    }
    Ok(Throughput { bytes: n_blocks * block as u64, elapsed, cpu })
}

/// Reads every extent of the reader's store once, `bufs.len()` experts per
/// [`ExpertReader::read_batch`] call, into the given (reused, preallocated) buffers, each at
/// least [`crate::expert_store::StoreLayout::padded_extent_len`] bytes; checksums verified
/// as usual.
pub fn read_all_extents(reader: &mut dyn ExpertReader, bufs: &mut [AlignedBuf]) -> StorageResult<Throughput> {
    let layout = reader.layout().clone();
    let keys: Vec<_> = layout.keys().collect();
    let (start, cpu0) = (Instant::now(), thread_cpu_time());
    let mut bytes = 0u64;
    for group in keys.chunks(bufs.len().max(1)) {
        let mut reqs: Vec<ReadRequest<'_>> =
            group.iter().zip(bufs.iter_mut()).map(|(&k, b)| ReadRequest::new(k, b)).collect();
        for r in reader.read_batch(&mut reqs) {
            r?;
        }
        bytes += (group.len() * layout.padded_extent_len()) as u64;
    }
    Ok(Throughput { bytes, elapsed: start.elapsed(), cpu: thread_cpu_time() - cpu0 })
}

/// `n` buffers for [`read_all_extents`], with every page touched (faulted in), as a
/// cache's preallocated slots would be.
pub fn prefaulted_bufs(n: usize, len: usize) -> Vec<AlignedBuf> {
    (0..n)
        .map(|_| {
            let mut b = AlignedBuf::zeroed(len);
            b.iter_mut().step_by(4096).for_each(|v| *v = 1);
            b
        })
        .collect()
}
