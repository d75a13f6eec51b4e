//! The on-disk layout of an expert store (see `docs/expert-store.md`): encoding and
//! parsing of the header, with every field checked before it is trusted.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::aligned::{round_up, ALIGN};
use crate::error::{StorageError, StorageResult};
use crate::ids::ExpertKey;

/// First 8 bytes of every store file.
pub const MAGIC: [u8; 8] = *b"HMOEXST\0";
/// Format version written and read by this build.
/// Version 2: q8/q4 extents hold `downᵀ` in groups of four rows after the gate/up bundles.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the fixed part of the header.
pub const FIXED_HEADER_LEN: usize = 120;
/// Bytes of one extent-table entry.
pub const TABLE_ENTRY_LEN: usize = 32;
/// Largest header this build accepts (a sanity bound against corrupt length fields).
pub const MAX_HEADER_LEN: u64 = 256 << 20;
const HEADER_CHECKSUM_AT: usize = 24;

/// How the weights of an extent are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Raw little-endian bf16 values.
    Bf16,
    /// Raw little-endian f32 values (for checkpoints whose values are not exact in bf16).
    F32,
    /// Each `hidden`-long row as `hidden / 32` `BlockQ8` (34 bytes: f16 scale LE, 32 × i8).
    Q8,
    /// Each `hidden`-long row as `hidden / 32` `BlockQ4` (18 bytes: f16 scale LE, 16 bytes).
    Q4,
}

impl Encoding {
    pub const ALL: [Encoding; 4] = [Encoding::Bf16, Encoding::F32, Encoding::Q8, Encoding::Q4];

    pub fn code(self) -> u32 {
        match self {
            Encoding::Bf16 => 1,
            Encoding::F32 => 2,
            Encoding::Q8 => 3,
            Encoding::Q4 => 4,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Bf16 => "bf16",
            Encoding::F32 => "f32",
            Encoding::Q8 => "q8",
            Encoding::Q4 => "q4",
        }
    }

    /// Bytes of one `hidden`-long row; errors if `hidden` does not suit the encoding.
    pub fn row_bytes(self, hidden: usize) -> StorageResult<usize> {
        use hetmoe_cpu_kernels::quant::QK;
        let bad = |reason: String| StorageError::StoreEncoding { encoding: self.name().into(), reason };
        let quant = |block: usize| {
            if hidden % QK != 0 {
                return Err(bad(format!("hidden size {hidden} is not a multiple of the block size {QK}")));
            }
            Ok(hidden / QK * block)
        };
        match self {
            Encoding::Bf16 => hidden.checked_mul(2).ok_or_else(|| bad("row size overflows".into())),
            Encoding::F32 => hidden.checked_mul(4).ok_or_else(|| bad("row size overflows".into())),
            Encoding::Q8 => quant(34),
            Encoding::Q4 => quant(18),
        }
    }

    /// The grouped layout of `downᵀ` for quantized encodings
    /// ([`hetmoe_cpu_kernels::row_groups`]); `None` where `downᵀ` stays in the bundles.
    pub fn down_groups(self) -> Option<hetmoe_cpu_kernels::row_groups::GroupKind> {
        use hetmoe_cpu_kernels::row_groups::GroupKind;
        match self {
            Encoding::Q8 => Some(GroupKind::Q8),
            Encoding::Q4 => Some(GroupKind::Q4),
            Encoding::Bf16 | Encoding::F32 => None,
        }
    }

    /// Bytes of one expert: `ffn` bundles of 3 rows (bf16, f32), or of 2 rows (gate, up)
    /// followed by `downᵀ` in groups of four rows (q8, q4; the last group zero-padded).
    pub fn extent_len(self, hidden: usize, ffn: usize) -> StorageResult<usize> {
        let row = self.row_bytes(hidden)?;
        let len = match self.down_groups() {
            None => row.checked_mul(3).and_then(|v| v.checked_mul(ffn)),
            Some(_) => row
                .checked_mul(2)
                .and_then(|v| v.checked_mul(ffn))
                .and_then(|v| v.checked_add(row.checked_mul(ffn.div_ceil(4).checked_mul(4)?)?)),
        };
        len.ok_or_else(|| StorageError::StoreEncoding {
            encoding: self.name().into(),
            reason: format!("extent size overflows for hidden {hidden}, ffn {ffn}"),
        })
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown encoding {s:?} (expected bf16, f32, q8 or q4)"))
    }
}

/// Identity of the checkpoint a store was built from, to detect a stale store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceId {
    /// xxh3-64 of `config.json`.
    pub config_xxh3: u64,
    /// xxh3-64 over, for each `*.safetensors` file in name order: its name, its length and
    /// its safetensors header (the JSON that lists every tensor's dtype, shape and offsets).
    pub weights_xxh3: u64,
    /// Total bytes of the `*.safetensors` files.
    pub weights_bytes: u64,
}

impl SourceId {
    /// Fingerprints a Hugging Face model folder (reads `config.json` and the safetensors headers only).
    pub fn of_model_dir(dir: &Path) -> StorageResult<Self> {
        let config_path = dir.join("config.json");
        let config = std::fs::read(&config_path).map_err(|e| StorageError::io(&config_path, e))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| StorageError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        let mut acc = Vec::new();
        let mut total = 0u64;
        for path in &files {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| StorageError::io(path, e))?;
            let len = f.metadata().map_err(|e| StorageError::io(path, e))?.len();
            let mut n = [0u8; 8];
            f.read_exact(&mut n).map_err(|e| StorageError::io(path, e))?;
            let hlen = u64::from_le_bytes(n).min(len.saturating_sub(8)).min(MAX_HEADER_LEN);
            let mut header = vec![0u8; hlen as usize];
            f.read_exact(&mut header).map_err(|e| StorageError::io(path, e))?;
            acc.extend_from_slice(path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            acc.push(0);
            acc.extend_from_slice(&len.to_le_bytes());
            acc.extend_from_slice(&xxh3_64(&header).to_le_bytes());
            total = total.saturating_add(len);
        }
        Ok(SourceId { config_xxh3: xxh3_64(&config), weights_xxh3: xxh3_64(&acc), weights_bytes: total })
    }
}

/// One row of the extent table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub key: ExpertKey,
    /// Byte offset in the file (multiple of 4096).
    pub offset: u64,
    /// Bytes of expert data (the extent occupies `round_up(len, 4096)` bytes on disk; the
    /// padding is zero).
    pub len: u64,
    /// xxh3-64 of the `len` data bytes.
    pub xxh3: u64,
}

impl Extent {
    /// Bytes on disk, padding included: what an `O_DIRECT` read of the whole extent reads.
    pub fn padded_len(&self) -> u64 {
        (self.len + ALIGN as u64 - 1) & !(ALIGN as u64 - 1)
    }
}

/// The parsed, validated header of a store: shapes, encoding, and where each expert lives.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreLayout {
    pub path: PathBuf,
    pub model_type: String,
    pub n_layers: usize,
    /// Layers with routed experts, increasing.
    pub moe_layers: Vec<usize>,
    pub n_experts: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub encoding: Encoding,
    /// Data bytes of every extent.
    pub extent_len: usize,
    pub source: SourceId,
    /// Offset of the first extent.
    pub data_offset: u64,
    /// Exact length of the file.
    pub file_len: u64,
    pub extents: Vec<Extent>,
    /// `index[layer]` = position of the layer's first extent in `extents`, if it is a MoE layer.
    index: Vec<Option<usize>>,
}

impl StoreLayout {
    /// Builds the layout of a new store: extents in (layer, expert) order, each at the next
    /// 4096-aligned offset after the header. Checksums are filled in by the writer.
    pub(crate) fn plan(
        path: PathBuf,
        model_type: String,
        n_layers: usize,
        moe_layers: Vec<usize>,
        n_experts: usize,
        hidden: usize,
        ffn: usize,
        encoding: Encoding,
        source: SourceId,
    ) -> StorageResult<Self> {
        let extent_len = encoding.extent_len(hidden, ffn)?;
        let overflow =
            || StorageError::StoreHeader { path: path.clone(), reason: "store size overflows".into() };
        let padded = round_up(extent_len).ok_or_else(overflow)? as u64;
        let header_len = header_len(model_type.len(), moe_layers.len(), moe_layers.len() * n_experts)
            .ok_or_else(overflow)?;
        let data_offset = round_up(header_len).ok_or_else(overflow)? as u64;
        let mut extents = Vec::with_capacity(moe_layers.len() * n_experts);
        let mut offset = data_offset;
        for &l in &moe_layers {
            for e in 0..n_experts {
                extents.push(Extent { key: ExpertKey::new(l, e), offset, len: extent_len as u64, xxh3: 0 });
                offset = offset.checked_add(padded).ok_or_else(overflow)?;
            }
        }
        let mut layout = StoreLayout {
            path,
            model_type,
            n_layers,
            moe_layers,
            n_experts,
            hidden,
            ffn,
            encoding,
            extent_len,
            source,
            data_offset,
            file_len: offset,
            extents,
            index: Vec::new(),
        };
        layout.build_index();
        Ok(layout)
    }

    fn build_index(&mut self) {
        self.index = vec![None; self.n_layers];
        for (i, &l) in self.moe_layers.iter().enumerate() {
            self.index[l] = Some(i * self.n_experts);
        }
    }

    /// The extent of `key`, if the store has it.
    pub fn extent(&self, key: ExpertKey) -> Option<&Extent> {
        let (l, e) = (key.layer.0 as usize, key.expert.0 as usize);
        if e >= self.n_experts {
            return None;
        }
        let first = (*self.index.get(l)?)?;
        self.extents.get(first + e)
    }

    /// Like [`Self::extent`], with a typed error.
    pub fn extent_or_err(&self, key: ExpertKey) -> StorageResult<&Extent> {
        self.extent(key)
            .ok_or(StorageError::UnknownExpert { layer: key.layer.0 as usize, expert: key.expert.0 as usize })
    }

    /// Bytes a destination buffer needs for one whole-extent read (padding included).
    pub fn padded_extent_len(&self) -> usize {
        round_up(self.extent_len).unwrap_or(usize::MAX)
    }

    /// Every expert in the store, in file order.
    pub fn keys(&self) -> impl Iterator<Item = ExpertKey> + '_ {
        self.extents.iter().map(|e| e.key)
    }

    /// Serializes the header (fixed part, model type, MoE layers, extent table) with its checksum.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.data_offset as usize);
        b.extend_from_slice(&MAGIC);
        put32(&mut b, FORMAT_VERSION);
        put32(&mut b, 0); // flags
        let hlen = header_len(self.model_type.len(), self.moe_layers.len(), self.extents.len()).unwrap_or(0);
        put64(&mut b, hlen as u64);
        put64(&mut b, 0); // header checksum, filled below
        put64(&mut b, self.data_offset);
        put64(&mut b, self.file_len);
        put32(&mut b, self.encoding.code());
        put32(&mut b, ALIGN as u32);
        for v in
            [self.n_layers, self.n_experts, self.hidden, self.ffn, self.moe_layers.len(), self.extents.len()]
        {
            put32(&mut b, v as u32);
        }
        put64(&mut b, self.extent_len as u64);
        put64(&mut b, self.source.config_xxh3);
        put64(&mut b, self.source.weights_xxh3);
        put64(&mut b, self.source.weights_bytes);
        put32(&mut b, self.model_type.len() as u32);
        put32(&mut b, 0);
        debug_assert_eq!(b.len(), FIXED_HEADER_LEN);
        b.extend_from_slice(self.model_type.as_bytes());
        pad8(&mut b);
        for &l in &self.moe_layers {
            put32(&mut b, l as u32);
        }
        pad8(&mut b);
        for x in &self.extents {
            put32(&mut b, x.key.layer.0 as u32);
            put32(&mut b, x.key.expert.0 as u32);
            put64(&mut b, x.offset);
            put64(&mut b, x.len);
            put64(&mut b, x.xxh3);
        }
        debug_assert_eq!(b.len(), hlen);
        let sum = xxh3_64(&b);
        b[HEADER_CHECKSUM_AT..HEADER_CHECKSUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Reads and validates the header of the store at `path` whose length is `actual_len`.
    /// `read_at(buf, offset)` fills `buf` from the file (exactly, or errors).
    pub(crate) fn decode(
        path: &Path,
        actual_len: u64,
        read_at: &mut dyn FnMut(&mut [u8], u64) -> std::io::Result<()>,
    ) -> StorageResult<Self> {
        let p = || path.to_path_buf();
        let bad = |reason: String| StorageError::StoreHeader { path: p(), reason };
        if actual_len < FIXED_HEADER_LEN as u64 {
            return Err(StorageError::StoreTruncated {
                path: p(),
                expected: FIXED_HEADER_LEN as u64,
                actual: actual_len,
            });
        }
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        read_at(&mut fixed, 0).map_err(|e| StorageError::io(path, e))?;
        if fixed[..8] != MAGIC {
            return Err(StorageError::StoreBadMagic { path: p(), found: fixed[..8].to_vec() });
        }
        let mut c = Cursor { b: &fixed, at: 8 };
        let version = c.u32();
        if version != FORMAT_VERSION {
            return Err(StorageError::StoreVersion { path: p(), found: version, supported: FORMAT_VERSION });
        }
        let _flags = c.u32();
        let hlen = c.u64();
        if hlen < FIXED_HEADER_LEN as u64 || hlen > MAX_HEADER_LEN {
            return Err(bad(format!("header length {hlen} is out of range")));
        }
        if hlen > actual_len {
            return Err(StorageError::StoreTruncated { path: p(), expected: hlen, actual: actual_len });
        }
        let mut header = vec![0u8; hlen as usize];
        read_at(&mut header, 0).map_err(|e| StorageError::io(path, e))?;
        let stored = u64::from_le_bytes(le8(&header[HEADER_CHECKSUM_AT..]));
        header[HEADER_CHECKSUM_AT..HEADER_CHECKSUM_AT + 8].fill(0);
        let computed = xxh3_64(&header);
        if stored != computed {
            return Err(StorageError::StoreHeaderChecksum { path: p(), expected: stored, actual: computed });
        }
        // From here on the header is as written by a writer; still check it all, since a
        // buggy writer must not make a reader index out of bounds.
        let mut c = Cursor { b: &header, at: 32 };
        let data_offset = c.u64();
        let file_len = c.u64();
        let enc_code = c.u32();
        let encoding =
            Encoding::from_code(enc_code).ok_or_else(|| bad(format!("unknown encoding {enc_code}")))?;
        let align = c.u32();
        if align as usize != ALIGN {
            return Err(bad(format!("extent alignment {align}, expected {ALIGN}")));
        }
        let n_layers = c.u32() as usize;
        let n_experts = c.u32() as usize;
        let hidden = c.u32() as usize;
        let ffn = c.u32() as usize;
        let n_moe = c.u32() as usize;
        let n_extents = c.u32() as usize;
        let extent_len = c.u64();
        let source = SourceId { config_xxh3: c.u64(), weights_xxh3: c.u64(), weights_bytes: c.u64() };
        let mt_len = c.u32() as usize;
        let _reserved = c.u32();
        if n_layers == 0 || n_experts == 0 || hidden == 0 || ffn == 0 {
            return Err(bad("zero layers, experts, hidden or ffn".into()));
        }
        if n_layers > u16::MAX as usize + 1 || n_experts > u16::MAX as usize + 1 {
            return Err(bad("layer or expert count exceeds u16 ids".into()));
        }
        let want_len = encoding.extent_len(hidden, ffn)?;
        if extent_len != want_len as u64 {
            return Err(bad(format!(
                "extent length {extent_len}, expected {want_len} for {encoding} {ffn}x3x{hidden}"
            )));
        }
        let want_n = n_moe.checked_mul(n_experts);
        if n_moe > n_layers || want_n != Some(n_extents) {
            return Err(bad(format!("{n_extents} extents for {n_moe} MoE layers × {n_experts} experts")));
        }
        let want_hlen = header_len(mt_len, n_moe, n_extents);
        if want_hlen != Some(hlen as usize) {
            return Err(bad(format!("header length {hlen} does not match its tables ({want_hlen:?})")));
        }
        if data_offset < hlen || data_offset % ALIGN as u64 != 0 || data_offset > file_len {
            return Err(bad(format!("data offset {data_offset} is misaligned or inside the header")));
        }
        if actual_len != file_len {
            if actual_len < file_len {
                return Err(StorageError::StoreTruncated {
                    path: p(),
                    expected: file_len,
                    actual: actual_len,
                });
            }
            return Err(bad(format!("file is {actual_len} bytes, header says {file_len}")));
        }
        let model_type = std::str::from_utf8(c.bytes(mt_len))
            .map_err(|_| bad("model_type is not UTF-8".into()))?
            .to_owned();
        c.align8();
        let mut moe_layers = Vec::with_capacity(n_moe);
        for _ in 0..n_moe {
            let l = c.u32() as usize;
            if l >= n_layers || moe_layers.last().is_some_and(|&prev| prev >= l) {
                return Err(bad(format!("MoE layer list is not increasing within 0..{n_layers}")));
            }
            moe_layers.push(l);
        }
        c.align8();
        let padded = round_up(want_len).unwrap_or(usize::MAX) as u64;
        let mut extents = Vec::with_capacity(n_extents);
        for i in 0..n_extents {
            let (layer, expert) = (c.u32() as usize, c.u32() as usize);
            let x =
                Extent { key: ExpertKey::new(layer, expert), offset: c.u64(), len: c.u64(), xxh3: c.u64() };
            let ext_err = |reason: String| StorageError::StoreExtent {
                path: p(),
                layer,
                expert,
                offset: x.offset,
                reason,
            };
            // Table order is fixed: MoE layer by MoE layer, expert by expert.
            let (want_l, want_e) = (moe_layers[i / n_experts], i % n_experts);
            if (layer, expert) != (want_l, want_e) {
                return Err(ext_err(format!("table entry {i} should be layer {want_l} expert {want_e}")));
            }
            if x.len != want_len as u64 {
                return Err(ext_err(format!("length {}, expected {want_len}", x.len)));
            }
            if x.offset % ALIGN as u64 != 0 {
                return Err(ext_err(format!("offset is not a multiple of {ALIGN}")));
            }
            let end = x.offset.checked_add(padded);
            if x.offset < data_offset || end.is_none_or(|end| end > file_len) {
                return Err(ext_err(format!("extent lies outside the data area {data_offset}..{file_len}")));
            }
            extents.push(x);
        }
        let mut by_offset: Vec<&Extent> = extents.iter().collect();
        by_offset.sort_by_key(|x| x.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + padded > w[1].offset {
                let x = w[1];
                return Err(StorageError::StoreExtent {
                    path: p(),
                    layer: x.key.layer.0 as usize,
                    expert: x.key.expert.0 as usize,
                    offset: x.offset,
                    reason: format!("overlaps {} at offset {}", w[0].key, w[0].offset),
                });
            }
        }
        let mut layout = StoreLayout {
            path: p(),
            model_type,
            n_layers,
            moe_layers,
            n_experts,
            hidden,
            ffn,
            encoding,
            extent_len: want_len,
            source,
            data_offset,
            file_len,
            extents,
            index: Vec::new(),
        };
        layout.build_index();
        Ok(layout)
    }

    /// Map from key to extent (for callers that prefer a map).
    pub fn extent_map(&self) -> HashMap<ExpertKey, Extent> {
        self.extents.iter().map(|x| (x.key, *x)).collect()
    }
}

fn header_len(model_type_len: usize, n_moe: usize, n_extents: usize) -> Option<usize> {
    let r8 = |v: usize| v.checked_add(7).map(|v| v & !7);
    let mut n = FIXED_HEADER_LEN.checked_add(r8(model_type_len)?)?;
    n = n.checked_add(r8(n_moe.checked_mul(4)?)?)?;
    n.checked_add(n_extents.checked_mul(TABLE_ENTRY_LEN)?)
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn pad8(b: &mut Vec<u8>) {
    while b.len() % 8 != 0 {
        b.push(0);
    }
}
fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// Reads little-endian fields from a buffer whose length was checked against the layout
/// before the reads (header_len == computed length), so indexing cannot go out of bounds.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u32(&mut self) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4));
        u32::from_le_bytes(a)
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(le8(self.bytes(8)))
    }
    fn align8(&mut self) {
        self.at = (self.at + 7) & !7;
    }
}
