//! Fault injection for tests of the readers and of their callers.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{extent_io, verify, ExpertReader, PositionalRead, ReadRequest, ReaderKind};
use crate::error::StorageResult;
use crate::expert_store::format::StoreLayout;
use crate::ids::ExpertKey;

/// A [`PositionalRead`] that fails reads touching given byte ranges of the file with an
/// I/O error (`EIO`), and otherwise reads through to `inner`.
pub struct FaultyFile<R: PositionalRead> {
    pub inner: R,
    pub fail: Vec<Range<u64>>,
}

impl<R: PositionalRead> std::fmt::Debug for FaultyFile<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyFile").field("fail", &self.fail).finish()
    }
}

impl<R: PositionalRead> PositionalRead for FaultyFile<R> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = offset + buf.len() as u64;
        if self.fail.iter().any(|r| r.start < end && offset < r.end) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }
}

/// What [`FaultInjectingReader`] does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with an `EIO` [`crate::StorageError::ExtentIo`] without touching the buffer.
    IoError,
    /// Read normally, then flip one bit of the first byte, as a bad disk would deliver
    /// it; the checksum check then reports [`crate::StorageError::ExtentChecksum`].
    Corrupt,
}

/// Wraps any reader and injects faults for chosen experts: what a cache's tests use to
/// show that a failed load surfaces as an error and corrupts nothing else.
pub struct FaultInjectingReader<R: ExpertReader> {
    inner: R,
    faults: Arc<Mutex<HashMap<ExpertKey, Fault>>>,
}

impl<R: ExpertReader> std::fmt::Debug for FaultInjectingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultInjectingReader").field("faults", &*self.faults.lock()).finish()
    }
}

impl<R: ExpertReader> FaultInjectingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, faults: Arc::default() }
    }

    /// The fault table, shared: change it while the reader is in use on another thread.
    pub fn faults(&self) -> Arc<Mutex<HashMap<ExpertKey, Fault>>> {
        self.faults.clone()
    }

    pub fn inject(&self, key: ExpertKey, fault: Fault) {
        self.faults.lock().insert(key, fault);
    }
}

impl<R: ExpertReader> ExpertReader for FaultInjectingReader<R> {
    fn read_batch(&mut self, reqs: &mut [ReadRequest<'_>]) -> Vec<StorageResult<()>> {
        let faults = self.faults.lock().clone();
        let mut results: Vec<Option<StorageResult<()>>> = Vec::with_capacity(reqs.len());
        let mut pass = Vec::new();
        for r in reqs.iter_mut() {
            match faults.get(&r.key) {
                Some(Fault::IoError) => {
                    let layout = self.inner.layout();
                    let res = match layout.extent_or_err(r.key) {
                        Ok(x) => Err(extent_io(layout, x, x.offset, io::Error::from_raw_os_error(libc::EIO))),
                        Err(e) => Err(e),
                    };
                    results.push(Some(res));
                }
                _ => {
                    results.push(None);
                    pass.push(ReadRequest { key: r.key, dst: &mut *r.dst });
                }
            }
        }
        let mut inner = self.inner.read_batch(&mut pass).into_iter();
        drop(pass);
        for slot in results.iter_mut() {
            if slot.is_none() {
                *slot = Some(inner.next().unwrap_or(Ok(())));
            }
        }
        let layout = self.inner.layout().clone();
        for (res, r) in results.iter_mut().zip(reqs.iter_mut()) {
            if matches!(res, Some(Ok(()))) && faults.get(&r.key) == Some(&Fault::Corrupt) {
                if let (Some(b), Ok(x)) = (r.dst.first_mut(), layout.extent_or_err(r.key)) {
                    *b ^= 1;
                    *res = Some(verify(&layout, x, r.dst));
                }
            }
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }

    fn kind(&self) -> ReaderKind {
        self.inner.kind()
    }

    fn layout(&self) -> &Arc<StoreLayout> {
        self.inner.layout()
    }
}
