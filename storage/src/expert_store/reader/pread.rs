//! The portable reader: positional reads (`pread`), one after another.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::{
    check_dst, extent_io, open_store_file, short_read, verify, ExpertReader, ReadRequest, ReaderKind,
    ReaderOptions,
};
use crate::error::StorageResult;
use crate::expert_store::format::StoreLayout;

/// Raw positional reads: the seam through which tests inject I/O faults.
pub trait PositionalRead: Send {
    /// Like `pread(2)`: reads up to `buf.len()` bytes at `offset`; `Ok(0)` at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl PositionalRead for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

/// Reads extents with positional reads, chunk by chunk (`O_DIRECT` when possible).
pub struct PreadReader {
    layout: Arc<StoreLayout>,
    src: Box<dyn PositionalRead>,
    chunk: usize,
}

impl std::fmt::Debug for PreadReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreadReader").field("path", &self.layout.path).field("chunk", &self.chunk).finish()
    }
}

impl PreadReader {
    /// Opens the store file (with `O_DIRECT` when `opts.direct` and supported).
    pub fn open(layout: Arc<StoreLayout>, opts: &ReaderOptions) -> StorageResult<Self> {
        let (file, _direct) = open_store_file(&layout.path, opts.direct)?;
        Ok(Self::with_source(layout, Box::new(file), opts))
    }

    /// A reader over any positional source (e.g. [`super::FaultyFile`] in tests).
    pub fn with_source(layout: Arc<StoreLayout>, src: Box<dyn PositionalRead>, opts: &ReaderOptions) -> Self {
        PreadReader { layout, src, chunk: opts.chunk() }
    }

    fn read_one(&self, req: &mut ReadRequest<'_>) -> StorageResult<()> {
        let (x, len) = check_dst(&self.layout, req.key, req.dst)?;
        let dst = &mut req.dst[..len];
        let mut pos = 0usize;
        while pos < len {
            let end = (pos + self.chunk).min(len);
            let offset = x.offset + pos as u64;
            match self.src.read_at(&mut dst[pos..end], offset) {
                Ok(0) => return Err(short_read(&self.layout, &x, x.offset, len as u64, pos as u64)),
                Ok(n) => pos += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                Err(e) => return Err(extent_io(&self.layout, &x, offset, e)),
            }
        }
        verify(&self.layout, &x, dst)
    }
}

impl ExpertReader for PreadReader {
    fn read_batch(&mut self, reqs: &mut [ReadRequest<'_>]) -> Vec<StorageResult<()>> {
        reqs.iter_mut().map(|r| self.read_one(r)).collect()
    }

    fn kind(&self) -> ReaderKind {
        ReaderKind::Pread
    }

    fn layout(&self) -> &Arc<StoreLayout> {
        &self.layout
    }
}
