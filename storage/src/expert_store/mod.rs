//! The on-disk expert store: every routed expert of a checkpoint as one 4 KiB-aligned,
//! checksummed, row-column-bundled extent (format: `docs/expert-store.md`), written by
//! [`repack`] and read by an [`ExpertReader`] (io_uring or pread).
//!
//! Non-expert weights are not in the store: they stay memory-mapped from the checkpoint.

mod aligned;
mod format;
pub mod probe;
mod reader;
mod repack;

use std::path::Path;
use std::sync::Arc;

use hetmoe_cpu_kernels::moe::ExpertRef;
use hetmoe_cpu_kernels::quant::{BlockQ4, BlockQ8};
use hetmoe_cpu_kernels::row_groups::GroupedRef;
use hetmoe_cpu_kernels::{MatRef, WeightsRef};
use parking_lot::Mutex;

pub use aligned::{round_up, AlignedBuf, ALIGN};
pub use format::{Encoding, Extent, SourceId, StoreLayout, FORMAT_VERSION, MAGIC};
pub use reader::{
    choice_from_env, open_reader, ExpertReader, Fault, FaultInjectingReader, FaultyFile, PositionalRead,
    PreadReader, ReadRequest, ReaderChoice, ReaderKind, ReaderOptions, UringReader,
};
pub use repack::{repack, RepackControl, RepackProgress, RepackSummary};

use crate::error::{StorageError, StorageResult};
use crate::ids::ExpertKey;

#[cfg(not(target_endian = "little"))]
compile_error!("the expert store views little-endian bytes in place; big-endian hosts are not supported");

// The quantized views below cast bytes to these structs: pin their layout.
const _: () = assert!(std::mem::size_of::<BlockQ8>() == 34 && std::mem::align_of::<BlockQ8>() == 2);
const _: () = assert!(std::mem::size_of::<BlockQ4>() == 18 && std::mem::align_of::<BlockQ4>() == 2);

// The cache shares one store between loader threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<ExpertStore>();
};

/// An opened, validated expert store, shareable between threads (`Send + Sync`).
///
/// Reads go through a small pool of readers (one per concurrent caller, created on
/// demand), so several loader threads can read at once.
pub struct ExpertStore {
    layout: Arc<StoreLayout>,
    opts: ReaderOptions,
    pool: Mutex<Vec<Box<dyn ExpertReader>>>,
}

impl std::fmt::Debug for ExpertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertStore").field("path", &self.layout.path).field("opts", &self.opts).finish()
    }
}

impl ExpertStore {
    /// Opens and validates the store at `path` with default reader options.
    pub fn open(path: impl AsRef<Path>) -> StorageResult<Self> {
        Self::open_with(path, ReaderOptions::default())
    }

    /// Opens and validates the store: magic, version, header checksum, every extent in
    /// bounds, aligned and disjoint, and the file exactly as long as the header says.
    pub fn open_with(path: impl AsRef<Path>, opts: ReaderOptions) -> StorageResult<Self> {
        let layout = Arc::new(read_layout(path.as_ref())?);
        Ok(ExpertStore { layout, opts, pool: Mutex::new(Vec::new()) })
    }

    pub fn layout(&self) -> &Arc<StoreLayout> {
        &self.layout
    }
    pub fn path(&self) -> &Path {
        &self.layout.path
    }
    pub fn encoding(&self) -> Encoding {
        self.layout.encoding
    }
    pub fn hidden(&self) -> usize {
        self.layout.hidden
    }
    pub fn ffn(&self) -> usize {
        self.layout.ffn
    }
    pub fn n_experts(&self) -> usize {
        self.layout.n_experts
    }
    pub fn moe_layers(&self) -> &[usize] {
        &self.layout.moe_layers
    }
    pub fn contains(&self, key: ExpertKey) -> bool {
        self.layout.extent(key).is_some()
    }
    /// Bytes of expert data in every extent (what [`Self::as_weights`] views).
    pub fn extent_len(&self) -> usize {
        self.layout.extent_len
    }
    /// Bytes a destination buffer needs (the extent rounded up to 4096).
    pub fn buf_len(&self) -> usize {
        self.layout.padded_extent_len()
    }
    /// A zeroed, aligned buffer that can receive any extent.
    pub fn alloc_buf(&self) -> AlignedBuf {
        AlignedBuf::zeroed(self.buf_len())
    }
    pub fn reader_options(&self) -> &ReaderOptions {
        &self.opts
    }

    /// A new reader of this store (for a loader thread that wants its own, e.g. to
    /// register its slots with [`UringReader::register_buffers`]).
    pub fn new_reader(&self) -> StorageResult<Box<dyn ExpertReader>> {
        open_reader(self.layout.clone(), &self.opts)
    }

    fn with_reader<T>(&self, f: impl FnOnce(&mut dyn ExpertReader) -> T) -> StorageResult<T> {
        let pooled = self.pool.lock().pop();
        let mut reader = match pooled {
            Some(r) => r,
            None => self.new_reader()?,
        };
        let out = f(reader.as_mut());
        self.pool.lock().push(reader);
        Ok(out)
    }

    /// Reads and verifies one extent into `dst` (4096-aligned, at least [`Self::buf_len`]
    /// bytes, e.g. an [`AlignedBuf`]); the expert's data is `dst[..extent_len()]`.
    pub fn read_expert(&self, key: ExpertKey, dst: &mut [u8]) -> StorageResult<()> {
        self.with_reader(|r| r.read(key, dst))?
    }

    /// Reads and verifies a batch with many reads in flight; one result per request.
    pub fn read_experts(&self, reqs: &mut [ReadRequest<'_>]) -> Vec<StorageResult<()>> {
        match self.with_reader(|r| r.read_batch(reqs)) {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string();
                (0..reqs.len())
                    .map(|_| {
                        Err(StorageError::ReaderSetup {
                            reader: "pool",
                            source: std::io::Error::other(msg.clone()),
                        })
                    })
                    .collect()
            }
        }
    }

    /// Reads one expert into any buffer of at least [`Self::extent_len`] bytes, through an
    /// aligned bounce buffer when `dst` cannot take a direct read.
    pub fn read_into(&self, key: ExpertKey, dst: &mut [u8]) -> StorageResult<()> {
        if dst.as_ptr() as usize % ALIGN == 0 && dst.len() >= self.buf_len() {
            return self.read_expert(key, dst);
        }
        let n = self.extent_len();
        if dst.len() < n {
            return Err(StorageError::BadDestination {
                layer: key.layer.0 as usize,
                expert: key.expert.0 as usize,
                needed: n,
                actual: dst.len(),
                align: 1,
                reason: "is too small",
            });
        }
        let mut bounce = self.alloc_buf();
        self.read_expert(key, &mut bounce)?;
        dst[..n].copy_from_slice(&bounce[..n]);
        Ok(())
    }

    /// Views the data of a read extent (`buf[..extent_len()]`) as compute-ready weights.
    pub fn as_weights<'a>(&self, buf: &'a [u8]) -> StorageResult<WeightsRef<'a>> {
        weights_view(self.encoding(), buf.get(..self.extent_len()).unwrap_or(buf), self.extent_len())
    }

    /// Views a read extent as an expert for `hetmoe_cpu_kernels::moe::expert_swiglu`.
    pub fn expert_ref<'a>(&self, buf: &'a [u8]) -> StorageResult<ExpertRef<'a>> {
        let (ffn, hidden) = (self.ffn(), self.hidden());
        let kernel_err = |e: hetmoe_cpu_kernels::KernelError| StorageError::StoreEncoding {
            encoding: self.encoding().name().into(),
            reason: e.to_string(),
        };
        let Some(kind) = self.encoding().down_groups() else {
            let w = self.as_weights(buf)?;
            return ExpertRef::bundled(w, ffn, hidden).map_err(kernel_err);
        };
        // [ffn][gate_j | up_j] bundles, then downᵀ in groups of four rows.
        let w = self.as_weights(buf)?;
        let bundles = 2 * ffn * self.encoding().row_bytes(hidden)?;
        let groups = &buf[bundles..self.extent_len()];
        let n = 2 * ffn * hidden;
        // Gate and up rows alternate: the fused kernel reads them as one matrix, as it does
        // the engine's in-memory experts (same numbers either way).
        let gate_up = MatRef::new(w.slice(0, n), 2 * ffn, hidden).map_err(kernel_err)?;
        let down = GroupedRef::new(kind, groups, ffn, hidden).map_err(kernel_err)?;
        ExpertRef::interleaved(gate_up, down).map_err(kernel_err)
    }

    /// Checks that the store was built from the checkpoint in `model_dir` (same
    /// `config.json`, same safetensors files and headers).
    pub fn check_source(&self, model_dir: impl AsRef<Path>) -> StorageResult<()> {
        let dir = model_dir.as_ref();
        let now = SourceId::of_model_dir(dir)?;
        let was = self.layout.source;
        let reason = if now.config_xxh3 != was.config_xxh3 {
            Some("config.json differs")
        } else if now.weights_xxh3 != was.weights_xxh3 || now.weights_bytes != was.weights_bytes {
            Some("safetensors files differ")
        } else {
            None
        };
        match reason {
            Some(r) => Err(StorageError::StoreStale {
                path: self.layout.path.clone(),
                model_dir: dir.to_path_buf(),
                reason: r.into(),
            }),
            None => Ok(()),
        }
    }
}

fn read_layout(path: &Path) -> StorageResult<StoreLayout> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|e| StorageError::io(path, e))?;
    let len = file.metadata().map_err(|e| StorageError::io(path, e))?.len();
    StoreLayout::decode(path, len, &mut |buf, off| file.read_exact_at(buf, off))
}

/// Views `bytes` (exactly one extent's data) in `encoding` as weights.
fn weights_view(encoding: Encoding, bytes: &[u8], extent_len: usize) -> StorageResult<WeightsRef<'_>> {
    let bad = |reason: String| StorageError::StoreEncoding { encoding: encoding.name().into(), reason };
    if bytes.len() != extent_len {
        return Err(bad(format!("buffer has {} bytes, an extent has {extent_len}", bytes.len())));
    }
    let cast_err = |e: bytemuck::PodCastError| bad(format!("buffer cannot be viewed as {encoding}: {e:?}"));
    match encoding {
        Encoding::Bf16 => Ok(WeightsRef::Bf16(bytemuck::try_cast_slice(bytes).map_err(cast_err)?)),
        Encoding::F32 => Ok(WeightsRef::F32(bytemuck::try_cast_slice(bytes).map_err(cast_err)?)),
        Encoding::Q8 | Encoding::Q4 => {
            let size = if encoding == Encoding::Q8 { 34 } else { 18 };
            if bytes.as_ptr() as usize % 2 != 0 || bytes.len() % size != 0 {
                return Err(bad("buffer is not 2-byte aligned or not a whole number of blocks".into()));
            }
            let n = bytes.len() / size;
            if encoding == Encoding::Q8 {
                // SAFETY: BlockQ8 is #[repr(C)] { d: f16, qs: [i8; 32] }: size 34, align 2
                // (const-asserted above), no padding, and every bit pattern is a valid f16
                // and i8. `bytes` is 2-aligned and holds exactly `n * 34` initialised bytes
                // (checked), and the result borrows `bytes`, so it cannot outlive them or
                // alias a `&mut`.
                Ok(WeightsRef::Q8(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<BlockQ8>(), n) }))
            } else {
                // SAFETY: as above for BlockQ4 { d: f16, qs: [u8; 16] }: size 18, align 2.
                Ok(WeightsRef::Q4(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<BlockQ4>(), n) }))
            }
        }
    }
}
