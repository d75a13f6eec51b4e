//! The on-disk expert store as the cache's source: slots are 4096-aligned buffers, so every
//! load is one verified `O_DIRECT` read of a whole extent (io_uring, or pread as fallback).

use hetmoe_storage::{AlignedBuf, ExpertKey, ExpertStore, StorageError};

use crate::source::ExpertSource;

/// An [`ExpertStore`] feeding an [`crate::ExpertCache`].
#[derive(Debug)]
pub struct StoreSource {
    store: ExpertStore,
}

impl StoreSource {
    pub fn new(store: ExpertStore) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &ExpertStore {
        &self.store
    }
}

impl ExpertSource for StoreSource {
    type Buf = AlignedBuf;
    type Error = StorageError;

    fn slot_bytes(&self) -> usize {
        self.store.buf_len()
    }

    fn alloc_slot(&self) -> Result<AlignedBuf, StorageError> {
        Ok(self.store.alloc_buf())
    }

    fn read(&self, key: ExpertKey, buf: &mut AlignedBuf) -> Result<usize, StorageError> {
        self.store.read_expert(key, buf)?;
        Ok(self.store.extent_len())
    }
}
