//! q8 matrices stored in tiles of four rows, for the matvec `y = W · x`.
//!
//! The same weights as [`BlockQ8`] rows (blocks of 32 along a row, one f16 scale each),
//! reordered so the AVX-512 kernel reads a tile of four rows as one sequential stream with
//! 64-byte loads: the row-major layout makes it walk four rows side by side (four streams,
//! 34-byte blocks that straddle cache lines, two half-vector loads and an insert per two
//! blocks, and a gather of four scales per row). The products are the same, term by term
//! and in the same order, as the row-major kernel's, so both layouts give the same bits.
//!
//! Tile `t` (rows `4t .. 4t + R`, `R` = 4 except the last tile of a matrix whose row count
//! is not a multiple of 4) starts at byte `t · 4 · 34 · nb` (`nb = cols / 32`) and holds
//! `R · 34 · nb` bytes: the blocks in *units*, in steps of up to four blocks. Step `s`
//! covers blocks `4s .. 4s + m` (`m = min(4, nb − 4s)`); in it, row `r`'s block `4s + k` is
//! unit `u = 4s · R + r · m + k`. The scale of unit `u` is the LE f16 at byte `2u`, its 32
//! weights the bytes `2 · R · nb + 32u ..` as `q + 128` (the unsigned bytes `vpdpbusd`
//! takes; the kernel adds back `−128 · Σ x̃` exactly, as the row-major kernel does).

use half::f16;

use crate::quant::{BlockQ8, QK};

/// Rows per tile.
pub const TILE_ROWS: usize = 4;
/// Blocks per step of a tile.
pub const STEP_BLOCKS: usize = 4;
/// Bytes of one q8 block (scale and 32 weights), as in [`BlockQ8`].
pub const Q8_BLOCK_BYTES: usize = 2 + QK;

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

/// Bytes of a `rows × cols` tiled matrix (the same as its row-major blocks).
pub const fn matrix_bytes(rows: usize, cols: usize) -> usize {
    rows * (cols / QK) * Q8_BLOCK_BYTES
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
fn tile_of(rows: usize, nb: usize, r: usize) -> (usize, usize) {
    let t0 = r / TILE_ROWS * TILE_ROWS;
    ((rows - t0).min(TILE_ROWS), t0 * nb * Q8_BLOCK_BYTES)
}

/// Writes the `rows × cols` row-major q8 matrix `blocks` in tiles to `out`
/// ([`matrix_bytes`] long).
pub fn tile_q8_rows(blocks: &[BlockQ8], rows: usize, cols: usize, out: &mut [u8]) {
    assert!(cols.is_multiple_of(QK), "tile_q8_rows: cols {cols} is not a multiple of {QK}");
    let nb = cols / QK;
    assert_eq!(blocks.len(), rows * nb, "tile_q8_rows: blocks is not [rows, cols / 32]");
    assert_eq!(out.len(), matrix_bytes(rows, cols), "tile_q8_rows: out has the wrong size");
    for r in 0..rows {
        let (rt, base) = tile_of(rows, nb, r);
        for b in 0..nb {
            let u = unit(rt, nb, r % TILE_ROWS, b);
            let blk = &blocks[r * nb + b];
            out[base + 2 * u..base + 2 * u + 2].copy_from_slice(&blk.d.to_bits().to_le_bytes());
            let q = base + 2 * rt * nb + QK * u;
            for (o, &v) in out[q..q + QK].iter_mut().zip(&blk.qs) {
                *o = (v as u8) ^ 0x80;
            }
        }
    }
}

/// Row `r` of a tiled `rows × cols` matrix back as row-major blocks (`cols / 32` of them).
pub fn untile_q8_row(tiles: &[u8], rows: usize, cols: usize, r: usize, out: &mut [BlockQ8]) {
    let nb = cols / QK;
    assert!(
        r < rows && out.len() == nb && tiles.len() == matrix_bytes(rows, cols),
        "untile_q8_row: bad shape"
    );
    let (rt, base) = tile_of(rows, nb, r);
    for (b, blk) in out.iter_mut().enumerate() {
        let u = unit(rt, nb, r % TILE_ROWS, b);
        blk.d = f16::from_bits(u16::from_le_bytes([tiles[base + 2 * u], tiles[base + 2 * u + 1]]));
        let q = base + 2 * rt * nb + QK * u;
        for (v, &o) in blk.qs.iter_mut().zip(&tiles[q..q + QK]) {
            *v = (o ^ 0x80) as i8;
        }
    }
}
