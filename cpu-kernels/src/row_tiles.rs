//! q8 / q4 matrices stored in tiles of four rows, for the matvec `y = W · x`.
//!
//! The same weights as [`BlockQ8`] / [`BlockQ4`] rows (blocks of 32 along a row, one f16
//! scale each), reordered so the AVX-512 kernel reads a tile of four rows as one sequential
//! stream with 64-byte loads: the row-major layout makes it walk four rows side by side
//! (four streams, 34- or 18-byte blocks that straddle cache lines, partial loads and inserts
//! per block, and a gather of scales per row). The products are the same, term by term and
//! in the same order, as the row-major kernel's, so both layouts give the same bits.
//!
//! Tile `t` (rows `4t .. 4t + R`, `R` = 4 except the last tile of a matrix whose row count
//! is not a multiple of 4) starts at byte `t · 4 · B · nb` (`nb = cols / 32`, `B` the block
//! size: 34 for q8, 18 for q4) and holds `R · B · nb` bytes: the blocks in *units*, in steps
//! of up to four blocks. Step `s` covers blocks `4s .. 4s + m` (`m = min(4, nb − 4s)`); in
//! it, row `r`'s block `4s + k` is unit `u = 4s · R + r · m + k`. The scale of unit `u` is
//! the LE f16 at byte `2u`; its weights are the `B − 2` bytes at `2 · R · nb + (B − 2) · u`:
//! q8 as `q + 128` (the unsigned bytes `vpdpbusd` takes; the kernel adds back
//! `−128 · Σ x̃` exactly, as the row-major kernel does), q4 as stored in [`BlockQ4`].

use half::f16;

use crate::quant::{BlockQ4, BlockQ8, QK};

/// Rows per tile.
pub const TILE_ROWS: usize = 4;
/// Blocks per step of a tile.
pub const STEP_BLOCKS: usize = 4;

/// The block format of a tiled matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TileKind {
    Q8,
    Q4,
}

impl TileKind {
    /// Bytes of one block (scale and weights), as in [`BlockQ8`] / [`BlockQ4`].
    pub const fn block_bytes(self) -> usize {
        2 + self.quant_bytes()
    }
    /// Bytes of one block's weights.
    pub const fn quant_bytes(self) -> usize {
        match self {
            TileKind::Q8 => QK,
            TileKind::Q4 => QK / 2,
        }
    }
    /// Bytes of a `rows × cols` tiled matrix (the same as its row-major blocks).
    pub const fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        rows * (cols / QK) * self.block_bytes()
    }
}

/// Whether the active ISA multiplies row tiles with a kernel of its own (AVX-512 VNNI);
/// elsewhere they are copied back to rows tile by tile, so an engine keeps rows there.
pub fn pays_off() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::dispatch::active_isa() == crate::dispatch::Isa::Avx512
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The unit index of row `r`'s block `b` in a tile of `rows_in_tile` rows of `nb` blocks.
#[inline]
pub(crate) fn unit(rows_in_tile: usize, nb: usize, r: usize, b: usize) -> usize {
    let s0 = b / STEP_BLOCKS * STEP_BLOCKS;
    let m = (nb - s0).min(STEP_BLOCKS);
    s0 * rows_in_tile + r * m + b % STEP_BLOCKS
}

/// Rows in the tile that holds row `r` of a matrix of `rows` rows, and that tile's first byte.
#[inline]
fn tile_of(kind: TileKind, rows: usize, nb: usize, r: usize) -> (usize, usize) {
    let t0 = r / TILE_ROWS * TILE_ROWS;
    ((rows - t0).min(TILE_ROWS), t0 * nb * kind.block_bytes())
}

/// Byte offsets of row `r`'s block `b` in a tiled matrix: its scale and its weights.
fn offsets(kind: TileKind, rows: usize, nb: usize, r: usize, b: usize) -> (usize, usize) {
    let (rt, base) = tile_of(kind, rows, nb, r);
    let u = unit(rt, nb, r % TILE_ROWS, b);
    (base + 2 * u, base + 2 * rt * nb + kind.quant_bytes() * u)
}

fn check(kind: TileKind, blocks: usize, rows: usize, cols: usize, bytes: usize) {
    assert!(cols.is_multiple_of(QK), "row tiles: cols {cols} is not a multiple of {QK}");
    assert_eq!(blocks, rows * (cols / QK), "row tiles: blocks is not [rows, cols / 32]");
    assert_eq!(bytes, kind.matrix_bytes(rows, cols), "row tiles: wrong byte count");
}

/// Writes the `rows × cols` row-major q8 matrix `blocks` in tiles to `out`
/// ([`TileKind::matrix_bytes`] long).
pub fn tile_q8_rows(blocks: &[BlockQ8], rows: usize, cols: usize, out: &mut [u8]) {
    let kind = TileKind::Q8;
    check(kind, blocks.len(), rows, cols, out.len());
    let nb = cols / QK;
    for (i, blk) in blocks.iter().enumerate() {
        let (sc, q) = offsets(kind, rows, nb, i / nb, i % nb);
        out[sc..sc + 2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
        for (o, &v) in out[q..q + QK].iter_mut().zip(&blk.qs) {
            *o = (v as u8) ^ 0x80;
        }
    }
}

/// Writes the `rows × cols` row-major q4 matrix `blocks` in tiles to `out`.
pub fn tile_q4_rows(blocks: &[BlockQ4], rows: usize, cols: usize, out: &mut [u8]) {
    let kind = TileKind::Q4;
    check(kind, blocks.len(), rows, cols, out.len());
    let nb = cols / QK;
    for (i, blk) in blocks.iter().enumerate() {
        let (sc, q) = offsets(kind, rows, nb, i / nb, i % nb);
        out[sc..sc + 2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
        out[q..q + QK / 2].copy_from_slice(&blk.qs);
    }
}

/// Row `r` of a tiled q8 `rows × cols` matrix back as row-major blocks (`cols / 32`).
pub fn untile_q8_row(tiles: &[u8], rows: usize, cols: usize, r: usize, out: &mut [BlockQ8]) {
    let kind = TileKind::Q8;
    check(kind, out.len() * rows, rows, cols, tiles.len());
    assert!(r < rows, "untile_q8_row: row {r} of {rows}");
    let nb = out.len();
    for (b, blk) in out.iter_mut().enumerate() {
        let (sc, q) = offsets(kind, rows, nb, r, b);
        blk.d = f16::from_bits(u16::from_le_bytes([tiles[sc], tiles[sc + 1]]));
        for (v, &o) in blk.qs.iter_mut().zip(&tiles[q..q + QK]) {
            *v = (o ^ 0x80) as i8;
        }
    }
}

/// Row `r` of a tiled q4 `rows × cols` matrix back as row-major blocks (`cols / 32`).
pub fn untile_q4_row(tiles: &[u8], rows: usize, cols: usize, r: usize, out: &mut [BlockQ4]) {
    let kind = TileKind::Q4;
    check(kind, out.len() * rows, rows, cols, tiles.len());
    assert!(r < rows, "untile_q4_row: row {r} of {rows}");
    let nb = out.len();
    for (b, blk) in out.iter_mut().enumerate() {
        let (sc, q) = offsets(kind, rows, nb, r, b);
        blk.d = f16::from_bits(u16::from_le_bytes([tiles[sc], tiles[sc + 1]]));
        blk.qs.copy_from_slice(&tiles[q..q + QK / 2]);
    }
}
