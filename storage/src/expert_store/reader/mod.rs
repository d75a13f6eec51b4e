//! Readers of store extents: io_uring (`O_DIRECT`, registered buffers, many reads in
//! flight) and a portable `pread` fallback, behind one trait.

mod fault;
mod pread;
mod uring;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

pub use fault::{Fault, FaultInjectingReader, FaultyFile};
pub use pread::{PositionalRead, PreadReader};
pub use uring::UringReader;

use super::aligned::ALIGN;
use super::format::{Extent, StoreLayout};
use crate::error::{StorageError, StorageResult};
use crate::ids::ExpertKey;

/// One extent to read: the whole extent of `key` (padding included) goes to the start of
/// `dst`, which must be 4096-aligned and at least [`StoreLayout::padded_extent_len`] long
/// (an [`super::AlignedBuf`] from [`super::ExpertStore::alloc_buf`] is).
#[derive(Debug)]
pub struct ReadRequest<'a> {
    pub key: ExpertKey,
    pub dst: &'a mut [u8],
}

impl<'a> ReadRequest<'a> {
    pub fn new(key: ExpertKey, dst: &'a mut [u8]) -> Self {
        Self { key, dst }
    }
}

/// Which implementation a reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderKind {
    Uring,
    Pread,
}

/// Which reader to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReaderChoice {
    /// io_uring when it can be set up, else pread (logged). `HETMOE_READER=uring|pread`
    /// overrides this.
    #[default]
    Auto,
    Uring,
    Pread,
}

/// Reader settings.
#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    pub choice: ReaderChoice,
    /// Reads in flight at once (io_uring queue depth).
    pub queue_depth: u32,
    /// Extents are split into reads of at most this many bytes (a multiple of 4096).
    pub chunk_bytes: usize,
    /// Open the store with `O_DIRECT` (bypass the page cache); falls back to buffered
    /// reads, with a warning, where the file system refuses it.
    pub direct: bool,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions { choice: ReaderChoice::Auto, queue_depth: 32, chunk_bytes: 1 << 20, direct: true }
    }
}

impl ReaderOptions {
    /// The choice after applying `HETMOE_READER` (only when the choice is `Auto`).
    pub fn effective_choice(&self) -> ReaderChoice {
        if self.choice != ReaderChoice::Auto {
            return self.choice;
        }
        choice_from_env(std::env::var("HETMOE_READER").ok().as_deref())
    }

    fn chunk(&self) -> usize {
        let c = self.chunk_bytes.clamp(ALIGN, 1 << 30);
        c & !(ALIGN - 1)
    }
}

/// Reads whole extents of one store into caller buffers and verifies their checksums.
///
/// Driven from one thread at a time (loader threads each own a reader). Every call
/// returns only after the device has finished writing into every destination of the
/// batch, so buffers may be used (or dropped) as soon as it returns.
pub trait ExpertReader: Send {
    /// Reads every request, keeping many reads in flight; one result per request, in
    /// order. A failed request (I/O error, short read, checksum mismatch, bad
    /// destination) leaves the other requests' buffers correct.
    fn read_batch(&mut self, reqs: &mut [ReadRequest<'_>]) -> Vec<StorageResult<()>>;

    /// Reads one extent.
    fn read(&mut self, key: ExpertKey, dst: &mut [u8]) -> StorageResult<()> {
        let mut r = [ReadRequest { key, dst }];
        self.read_batch(&mut r).pop().unwrap_or(Ok(()))
    }

    fn kind(&self) -> ReaderKind;

    /// The layout this reader reads.
    fn layout(&self) -> &Arc<StoreLayout>;
}

/// Interprets a `HETMOE_READER` value: `uring` (or `io_uring`), `pread`, else automatic.
pub fn choice_from_env(value: Option<&str>) -> ReaderChoice {
    match value.map(str::to_ascii_lowercase).as_deref() {
        Some("uring") | Some("io_uring") => ReaderChoice::Uring,
        Some("pread") => ReaderChoice::Pread,
        Some(other) if !other.is_empty() => {
            tracing::warn!("HETMOE_READER={other:?} is not uring or pread; choosing automatically");
            ReaderChoice::Auto
        }
        _ => ReaderChoice::Auto,
    }
}

/// Builds a reader for `layout` as `opts` asks.
pub fn open_reader(layout: Arc<StoreLayout>, opts: &ReaderOptions) -> StorageResult<Box<dyn ExpertReader>> {
    match opts.effective_choice() {
        ReaderChoice::Uring => Ok(Box::new(UringReader::open(layout, opts)?)),
        ReaderChoice::Pread => Ok(Box::new(PreadReader::open(layout, opts)?)),
        ReaderChoice::Auto => match UringReader::open(layout.clone(), opts) {
            Ok(r) => Ok(Box::new(r)),
            Err(e) => {
                tracing::warn!("io_uring reader unavailable ({e}); falling back to pread");
                Ok(Box::new(PreadReader::open(layout, opts)?))
            }
        },
    }
}

/// Opens `path` for reading, with `O_DIRECT` when asked and supported. Returns whether
/// the file is in direct mode.
pub(crate) fn open_store_file(path: &Path, direct: bool) -> StorageResult<(File, bool)> {
    if direct {
        match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "O_DIRECT not supported here; using buffered reads");
            }
            Err(e) => return Err(StorageError::io(path, e)),
        }
    }
    let f = File::open(path).map_err(|e| StorageError::io(path, e))?;
    Ok((f, false))
}

/// Checks that `dst` can receive a whole-extent read of `x`; returns the bytes to read.
pub(crate) fn check_dst(layout: &StoreLayout, key: ExpertKey, dst: &[u8]) -> StorageResult<(Extent, usize)> {
    let x = *layout.extent_or_err(key)?;
    let needed = layout.padded_extent_len();
    let addr = dst.as_ptr() as usize;
    let align = if addr == 0 { 0 } else { 1usize << addr.trailing_zeros().min(20) };
    let err = |reason| StorageError::BadDestination {
        layer: key.layer.0 as usize,
        expert: key.expert.0 as usize,
        needed,
        actual: dst.len(),
        align,
        reason,
    };
    if dst.len() < needed {
        return Err(err("is too small"));
    }
    if addr % ALIGN != 0 {
        return Err(err("is not 4096-aligned"));
    }
    Ok((x, needed))
}

/// Verifies the data bytes of a read extent against the table's checksum.
pub(crate) fn verify(layout: &StoreLayout, x: &Extent, dst: &[u8]) -> StorageResult<()> {
    let actual = xxh3_64(&dst[..x.len as usize]);
    if actual != x.xxh3 {
        return Err(checksum_err(layout, x, actual));
    }
    Ok(())
}

pub(crate) fn checksum_err(layout: &StoreLayout, x: &Extent, actual: u64) -> StorageError {
    StorageError::ExtentChecksum {
        layer: x.key.layer.0 as usize,
        expert: x.key.expert.0 as usize,
        path: layout.path.clone(),
        offset: x.offset,
        expected: x.xxh3,
        actual,
    }
}

pub(crate) fn extent_io(
    layout: &StoreLayout,
    x: &Extent,
    offset: u64,
    source: std::io::Error,
) -> StorageError {
    StorageError::ExtentIo {
        layer: x.key.layer.0 as usize,
        expert: x.key.expert.0 as usize,
        path: layout.path.clone(),
        offset,
        source,
    }
}

pub(crate) fn short_read(
    layout: &StoreLayout,
    x: &Extent,
    offset: u64,
    expected: u64,
    actual: u64,
) -> StorageError {
    StorageError::ExtentShortRead {
        layer: x.key.layer.0 as usize,
        expert: x.key.expert.0 as usize,
        path: layout.path.clone(),
        offset,
        expected,
        actual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_override_parsing() {
        assert_eq!(choice_from_env(Some("uring")), ReaderChoice::Uring);
        assert_eq!(choice_from_env(Some("IO_URING")), ReaderChoice::Uring);
        assert_eq!(choice_from_env(Some("pread")), ReaderChoice::Pread);
        assert_eq!(choice_from_env(Some("mmap")), ReaderChoice::Auto);
        assert_eq!(choice_from_env(None), ReaderChoice::Auto);
        let forced = ReaderOptions { choice: ReaderChoice::Pread, ..Default::default() };
        assert_eq!(forced.effective_choice(), ReaderChoice::Pread);
    }
}
