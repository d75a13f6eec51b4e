//! Hugging Face checkpoint → expert store, one expert at a time.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, GroupKind};
use xxhash_rust::xxh3::xxh3_64;

use super::aligned::ALIGN;
use super::format::{Encoding, SourceId, StoreLayout};
use crate::arch::WeightKey;
use crate::dtype::DType;
use crate::error::{StorageError, StorageResult};
use crate::tensor::Tensor;

/// Progress of a running [`repack`], reported after every expert.
#[derive(Debug, Clone, Copy)]
pub struct RepackProgress {
    pub experts_done: usize,
    pub experts_total: usize,
    /// Bytes of the store written so far (header area included) and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What [`repack`] wrote.
#[derive(Debug, Clone)]
pub struct RepackSummary {
    pub path: PathBuf,
    pub encoding: Encoding,
    pub experts: usize,
    pub file_bytes: u64,
}

/// Whether [`repack`] goes on after a progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepackControl {
    Continue,
    /// Stop, delete the partial file and return [`StorageError::RepackCancelled`].
    Cancel,
}

/// Writes the routed experts of the model in `model_dir` to a new store at `out`.
///
/// Streams expert by expert (memory: a few copies of one expert), writes to a temporary
/// file in `out`'s folder, writes the header last, fsyncs, then renames it over `out` and
/// fsyncs the folder. An interrupted repack leaves either no file at `out` or the previous
/// one, never a partial store (and a partial temporary file has a zero header, which
/// [`super::ExpertStore::open`] rejects).
pub fn repack(
    model_dir: &Path,
    out: &Path,
    encoding: Encoding,
    progress: &mut dyn FnMut(&RepackProgress) -> RepackControl,
) -> StorageResult<RepackSummary> {
    let (spec, ckpt) = crate::open_model_dir(model_dir)?;
    let source = SourceId::of_model_dir(model_dir)?;
    let (hidden, ffn, n_experts) = (spec.hidden, spec.moe.expert_ffn, spec.moe.n_experts);
    let mut layout = StoreLayout::plan(
        out.to_path_buf(),
        spec.arch.model_type().to_owned(),
        spec.n_layers,
        spec.moe_layers(),
        n_experts,
        hidden,
        ffn,
        encoding,
        source,
    )?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(&dir)
        .map_err(|e| StorageError::io(&dir, e))?;
    let tmp_path = tmp.path().to_path_buf();
    let io = |e| StorageError::io(&tmp_path, e);

    let padded = layout.padded_extent_len();
    let mut w = BufWriter::with_capacity(8 << 20, tmp.as_file());
    w.seek(SeekFrom::Start(layout.data_offset)).map_err(io)?;
    let mut bundle = Vec::with_capacity(padded);
    let total = layout.extents.len();
    for i in 0..total {
        let key = layout.extents[i].key;
        let (l, e) = (key.layer.0 as usize, key.expert.0 as usize);
        let t = |k: WeightKey, shape: [usize; 2]| ckpt.tensor_with_shape(&k.name(spec.arch), &shape);
        let gate = t(WeightKey::ExpertGate(l, e), [ffn, hidden])?;
        let up = t(WeightKey::ExpertUp(l, e), [ffn, hidden])?;
        let down = t(WeightKey::ExpertDown(l, e), [hidden, ffn])?;
        bundle.clear();
        build_bundle(l, e, &gate, &up, &down, hidden, ffn, encoding, &mut bundle)?;
        debug_assert_eq!(bundle.len(), layout.extent_len);
        layout.extents[i].xxh3 = xxh3_64(&bundle);
        bundle.resize(padded, 0);
        w.write_all(&bundle).map_err(io)?;
        let report = RepackProgress {
            experts_done: i + 1,
            experts_total: total,
            bytes_done: layout.extents[i].offset + padded as u64,
            bytes_total: layout.file_len,
        };
        if progress(&report) == RepackControl::Cancel {
            drop(w);
            drop(tmp); // deletes the partial file
            return Err(StorageError::RepackCancelled { path: out.to_path_buf() });
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    let file: &File = tmp.as_file();
    file.set_len(layout.file_len).map_err(io)?;
    // Extents first, made durable, then the header: a store never has a valid header
    // in front of data that is not on disk.
    file.sync_data().map_err(io)?;
    let header = layout.encode();
    debug_assert!(header.len() as u64 <= layout.data_offset && layout.data_offset % ALIGN as u64 == 0);
    file.write_all_at(&header, 0).map_err(io)?;
    file.sync_all().map_err(io)?;
    tmp.persist(out).map_err(|e| StorageError::io(out, e.error))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| StorageError::io(&dir, e))?;
    tracing::info!(path = %out.display(), %encoding, experts = total, bytes = layout.file_len, "expert store written");
    Ok(RepackSummary { path: out.to_path_buf(), encoding, experts: total, file_bytes: layout.file_len })
}

/// Appends one expert's extent in `encoding` to `out`: the row-column bundles
/// `[ffn][gate_j | up_j | down[:, j]][hidden]` (bf16, f32), or `[ffn][gate_j | up_j][hidden]`
/// then `downᵀ` in groups of four rows (q8, q4; `docs/expert-store.md`).
pub(crate) fn build_bundle(
    layer: usize,
    expert: usize,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
    hidden: usize,
    ffn: usize,
    encoding: Encoding,
    out: &mut Vec<u8>,
) -> StorageResult<()> {
    match encoding {
        Encoding::Bf16 => {
            let g = to_bf16_bits(layer, expert, gate)?;
            let u = to_bf16_bits(layer, expert, up)?;
            let d = transpose(&to_bf16_bits(layer, expert, down)?, hidden, ffn);
            for j in 0..ffn {
                for m in [&g, &u, &d] {
                    for &v in &m[j * hidden..(j + 1) * hidden] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        Encoding::F32 => {
            let (g, u) = (gate.to_f32_vec(), up.to_f32_vec());
            let d = transpose(&down.to_f32_vec(), hidden, ffn);
            for j in 0..ffn {
                for m in [&g, &u, &d] {
                    for &v in &m[j * hidden..(j + 1) * hidden] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        Encoding::Q8 | Encoding::Q4 => {
            encoding.row_bytes(hidden)?; // hidden % QK check, typed error
            let (g, u) = (gate.to_f32_vec(), up.to_f32_vec());
            let d = transpose(&down.to_f32_vec(), hidden, ffn);
            let nb = hidden / QK;
            let mut q8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; nb];
            let mut q4 = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; nb];
            for j in 0..ffn {
                for m in [&g, &u] {
                    let row = &m[j * hidden..(j + 1) * hidden];
                    if encoding == Encoding::Q8 {
                        quantize_q8(row, &mut q8);
                        for b in &q8 {
                            out.extend_from_slice(&b.d.to_le_bytes());
                            out.extend(b.qs.iter().map(|&q| q as u8));
                        }
                    } else {
                        quantize_q4(row, &mut q4);
                        for b in &q4 {
                            out.extend_from_slice(&b.d.to_le_bytes());
                            out.extend_from_slice(&b.qs);
                        }
                    }
                }
            }
            // Then downᵀ, its rows quantized the same way (blocks never cross a row, as
            // hidden % 32 == 0), in groups of four rows.
            let start = out.len();
            if encoding == Encoding::Q8 {
                let mut blocks = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; ffn * nb];
                quantize_q8(&d, &mut blocks);
                out.resize(start + GroupKind::Q8.matrix_bytes(ffn, hidden), 0);
                group_q8_rows(&blocks, ffn, hidden, &mut out[start..]);
            } else {
                let mut blocks = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; ffn * nb];
                quantize_q4(&d, &mut blocks);
                out.resize(start + GroupKind::Q4.matrix_bytes(ffn, hidden), 0);
                group_q4_rows(&blocks, ffn, hidden, &mut out[start..]);
            }
        }
    }
    Ok(())
}

/// The tensor's values as bf16 bit patterns; F16/F32 values must be exactly representable.
fn to_bf16_bits(layer: usize, expert: usize, t: &Tensor) -> StorageResult<Vec<u16>> {
    let b = t.bytes();
    if t.dtype == DType::BF16 {
        return Ok(b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect());
    }
    t.to_f32_vec()
        .into_iter()
        .map(|v| {
            let h = bf16::from_f32(v);
            if h.to_f32() == v || (v.is_nan() && h.is_nan()) {
                Ok(h.to_bits())
            } else {
                Err(StorageError::InexactBf16 { layer, expert, name: t.name.clone(), value: v })
            }
        })
        .collect()
}

/// `[rows, cols]` → `[cols, rows]`, in tiles to stay cache friendly.
fn transpose<T: Copy + Default>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 32;
    let mut t = vec![T::default(); m.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    t[c * rows + r] = m[r * cols + c];
                }
            }
        }
    }
    t
}
