//! Quantized rows stored in groups of four, for the row-wise product `y += Σ_j a[j] · W[j, :]`
//! over an expert's `downᵀ` (the `axpy`).
//!
//! The same weights as [`BlockQ8`] / [`BlockQ4`] rows (blocks of 32 along a row, one f16
//! scale each), laid out so the product runs on integer dot products: per group of
//! [`GROUP_ROWS`] rows and block of 32 columns, the four activations times their rows' block
//! scales are quantized together to 8 bits (`a[j]·d[j, b] ≈ s · ã[j]`, `prep_block`), and
//! each column's four weights sit in four adjacent bytes, so one `vpdpbusd` lane (AVX2:
//! `pmaddubsw` + `pmaddwd`) sums `Σ_k ã[k] · q[k, c]` exactly; then `y[c] = fma(s, sum, y[c])`.
//! Dequantizing every weight to f32 instead made the quantized `axpy` instruction-bound
//! (below one thread's share of DRAM bandwidth for q4).
//!
//! Group `g` (rows `4g .. 4g + 4`; missing rows of the last group are zero) is
//! `group_bytes(cols)` bytes: the scales, row by row (`d[k, b]` as LE f16 at byte
//! `2 · (k · nb + b)`, `nb = cols / 32`), then one unit per block `b` at
//! `8 · nb + b · unit_bytes`: q8 byte `4c + k` holds `q[k, 32b + c]` (i8), `c < 32`; q4 byte
//! `4c + k` (`c < 16`) holds the stored nibble (`q + 8`) of `q[k, 32b + c]` low and of
//! `q[k, 32b + 16 + c]` high. A group is the size of four rows of blocks.
//!
//! **Paired** ([`GroupedRef::paired`], [`pair_groups`]; the engine's in-memory layout where
//! [`pairing_pays_off`]): the same groups, two at a time (groups `2p`, `2p + 1`, the last
//! one alone when their count is odd) as both groups' scales, then their units alternating,
//! block by block. One token then walks two groups at once (each `y` load and store serves
//! both) in one read stream, with the same sums in the same order as one group at a time,
//! so the same bits as the plain layout (the expert store's).

use half::f16;

use crate::quant::{BlockQ4, BlockQ8, QK};
use crate::KernelError;

/// Rows per group.
pub const GROUP_ROWS: usize = 4;

/// The block format of a grouped matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKind {
    Q8,
    Q4,
}

impl GroupKind {
    /// Bytes of the quants of one block of a group (four rows × 32 weights).
    pub const fn unit_bytes(self) -> usize {
        match self {
            GroupKind::Q8 => GROUP_ROWS * QK,
            GroupKind::Q4 => GROUP_ROWS * QK / 2,
        }
    }

    /// Bytes of one group of rows of `cols` weights (`cols` a multiple of 32).
    pub const fn group_bytes(self, cols: usize) -> usize {
        cols / QK * (2 * GROUP_ROWS + self.unit_bytes())
    }

    /// Bytes of a `rows × cols` matrix.
    pub const fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        rows.div_ceil(GROUP_ROWS) * self.group_bytes(cols)
    }

    /// The offset the kernels that take weights as unsigned bytes add (q8 `q + 128`, q4 the
    /// stored nibble `q + 8`).
    pub(crate) const fn offset(self) -> i32 {
        match self {
            GroupKind::Q8 => 128,
            GroupKind::Q4 => 8,
        }
    }
}

/// A grouped quantized matrix `[rows, cols]` (rows are the terms of the `axpy` sum).
#[derive(Debug, Clone, Copy)]
pub struct GroupedRef<'a> {
    kind: GroupKind,
    data: &'a [u8],
    rows: usize,
    cols: usize,
    /// Groups stored in pairs (see the module docs).
    paired: bool,
}

impl<'a> GroupedRef<'a> {
    /// `data` holds exactly [`GroupKind::matrix_bytes`] bytes; `cols` is a multiple of 32.
    pub fn new(kind: GroupKind, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(QK) {
            return Err(KernelError::QuantizedShape { cols, stride: cols });
        }
        let expected = kind.matrix_bytes(rows, cols);
        if data.len() != expected {
            return Err(KernelError::GroupedLength { rows, cols, expected, actual: data.len() });
        }
        Ok(Self { kind, data, rows, cols, paired: false })
    }

    /// As [`GroupedRef::new`], for groups stored in pairs ([`pair_groups`]).
    pub fn paired(kind: GroupKind, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        Ok(Self { paired: true, ..Self::new(kind, data, rows, cols)? })
    }

    pub fn is_paired(&self) -> bool {
        self.paired
    }

    pub fn kind(&self) -> GroupKind {
        self.kind
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    /// Bytes one pass over the matrix reads.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// Rows `start..end` (`start` a multiple of [`GROUP_ROWS`], `end` too unless it is
    /// `rows`; for paired groups multiples of two groups).
    pub fn row_range(&self, start: usize, end: usize) -> GroupedRef<'a> {
        assert!(start <= end && end <= self.rows, "row range {start}..{end} of {}", self.rows);
        let step = if self.paired { 2 * GROUP_ROWS } else { GROUP_ROWS };
        assert!(
            start.is_multiple_of(step) && (end.is_multiple_of(step) || end == self.rows),
            "row range {start}..{end} splits a group (or a pair of groups)"
        );
        let gb = self.kind.group_bytes(self.cols);
        let (g0, g1) = (start / GROUP_ROWS, end.div_ceil(GROUP_ROWS));
        GroupedRef { data: &self.data[g0 * gb..g1 * gb], rows: end - start, ..*self }
    }

    /// Byte offset of group `g`'s scales (`d[k, b]` as LE f16 at `2 · (k · nb + b)` from it).
    pub(crate) fn scales_at(&self, g: usize) -> usize {
        let gb = self.kind.group_bytes(self.cols);
        if self.in_pair(g) {
            g / 2 * 2 * gb + g % 2 * 2 * GROUP_ROWS * (self.cols / QK)
        } else {
            g * gb
        }
    }

    /// Byte offset of group `g`'s unit of block 0; block `b`'s is `b ·`
    /// [`GroupedRef::unit_stride`] further.
    pub(crate) fn unit_at(&self, g: usize) -> usize {
        let nb = self.cols / QK;
        if self.in_pair(g) {
            g / 2 * 2 * self.kind.group_bytes(self.cols)
                + 4 * GROUP_ROWS * nb
                + g % 2 * self.kind.unit_bytes()
        } else {
            self.scales_at(g) + 2 * GROUP_ROWS * nb
        }
    }

    /// Bytes from a group's unit of block `b` to its unit of block `b + 1` (for a group
    /// in a pair, twice a unit).
    pub(crate) fn unit_stride(&self, g: usize) -> usize {
        self.kind.unit_bytes() * if self.in_pair(g) { 2 } else { 1 }
    }

    /// Whether group `g` is stored in a pair (paired layout, and not a last odd group).
    pub(crate) fn in_pair(&self, g: usize) -> bool {
        self.paired && (g | 1) < self.rows.div_ceil(GROUP_ROWS)
    }

    /// Row `r`'s block scale `d[r, b]`.
    fn scale(&self, r: usize, b: usize) -> f32 {
        scale_of(&self.data[self.scales_at(r / GROUP_ROWS)..], self.cols / QK, r % GROUP_ROWS, b)
    }

    /// Row `r`'s quantized value at column `c` (q4: `nibble − 8`).
    fn quant(&self, r: usize, c: usize) -> i32 {
        let g = r / GROUP_ROWS;
        let unit = &self.data[self.unit_at(g) + c / QK * self.unit_stride(g)..];
        quant_of(self.kind, unit, r % GROUP_ROWS, c % QK)
    }

    /// Row `r` dequantized (`d · q`, as the row-major blocks give it).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {}x{}", self.rows, self.cols);
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.scale(r, c / QK) * self.quant(r, c) as f32;
        }
    }
}

/// `d[k, b]` from a group's scales.
#[inline(always)]
fn scale_of(scales: &[u8], nb: usize, k: usize, b: usize) -> f32 {
    let i = 2 * (k * nb + b);
    f16::from_bits(u16::from_le_bytes([scales[i], scales[i + 1]])).to_f32()
}

/// `q[k, c]` (column `c` of the unit's block; q4: the nibble minus 8) from a unit.
#[inline(always)]
fn quant_of(kind: GroupKind, unit: &[u8], k: usize, c: usize) -> i32 {
    match kind {
        GroupKind::Q8 => unit[4 * c + k] as i8 as i32,
        GroupKind::Q4 if c < QK / 2 => (unit[4 * c + k] & 0x0f) as i32 - 8,
        GroupKind::Q4 => (unit[4 * (c - QK / 2) + k] >> 4) as i32 - 8,
    }
}

/// Writes `rows` q8 rows (`rows · cols / 32` blocks, row-major) in the grouped layout
/// (`out`: [`GroupKind::matrix_bytes`]). The same weights, moved.
pub fn group_q8_rows(blocks: &[BlockQ8], rows: usize, cols: usize, out: &mut [u8]) {
    group_rows(GroupKind::Q8, blocks.len(), rows, cols, out, |r, b| {
        let bl = &blocks[r * (cols / QK) + b];
        (bl.d, std::array::from_fn(|c| bl.qs[c] as u8))
    })
}

/// Writes `rows` q4 rows in the grouped layout, as [`group_q8_rows`].
pub fn group_q4_rows(blocks: &[BlockQ4], rows: usize, cols: usize, out: &mut [u8]) {
    group_rows(GroupKind::Q4, blocks.len(), rows, cols, out, |r, b| {
        let bl = &blocks[r * (cols / QK) + b];
        // Stored nibbles in column order.
        (bl.d, std::array::from_fn(|c| if c < QK / 2 { bl.qs[c] & 0x0f } else { bl.qs[c - QK / 2] >> 4 }))
    })
}

/// Whether an engine should store its grouped matrices in pairs on this machine: where the
/// active ISA has no row-tile kernel ([`crate::row_tiles::pays_off`]: AVX2, AVX-512 without
/// VNNI), and with [`Streaming::Sequential`] (AMD). Pairs cut the `axpy`'s work per weight
/// (`kcache`, one thread, L2: AVX2 +11–27%, AVX-512 +14–22%) and lift forced-AVX2 prefill on
/// the 2-core Intel VM (q8 +7–14%, q4 +2–9%, decode level); they are also one stream where
/// plain groups read two (units and scales). With AVX-512 VNNI on the Intel VM the plain walk
/// kept up with DRAM at 2 threads and the paired one measured 1–4% slower for q8 decode, so
/// groups stay plain there; on the AMD Zen 4 VM the expert with paired `downᵀ` read 3–4%
/// more per second than with plain groups (`kbench` `ep` / `et`, five alternating rounds, q4
/// 30.1 / 28.8 GB/s, q8 33.3 / 32.2).
///
/// [`Streaming::Sequential`]: crate::dispatch::Streaming::Sequential
pub fn pairing_pays_off() -> bool {
    !crate::row_tiles::pays_off() || crate::dispatch::streaming() == crate::dispatch::Streaming::Sequential
}

/// The plain grouped matrix `grouped` (`rows × cols`, kind `kind`) with its groups in pairs
/// ([`GroupedRef::paired`]), into `out` (the same size). The same bytes, moved.
pub fn pair_groups(kind: GroupKind, rows: usize, cols: usize, grouped: &[u8], out: &mut [u8]) {
    let bytes = kind.matrix_bytes(rows, cols);
    assert!(
        cols.is_multiple_of(QK) && grouped.len() == bytes && out.len() == bytes,
        "pair_groups: bad lengths"
    );
    let plain = GroupedRef { kind, data: grouped, rows, cols, paired: false };
    let paired = GroupedRef { kind, data: &[], rows, cols, paired: true };
    let (nb, ub, sb) = (cols / QK, kind.unit_bytes(), 2 * GROUP_ROWS * cols / QK);
    for g in 0..rows.div_ceil(GROUP_ROWS) {
        let (from, to) = (plain.scales_at(g), paired.scales_at(g));
        out[to..to + sb].copy_from_slice(&grouped[from..from + sb]);
        for b in 0..nb {
            let (from, to) = (plain.unit_at(g) + b * ub, paired.unit_at(g) + b * paired.unit_stride(g));
            out[to..to + ub].copy_from_slice(&grouped[from..from + ub]);
        }
    }
}

/// `block(r, b)` gives row r's block b as (scale, 32 bytes: q8 values or q4 nibbles).
fn group_rows(
    kind: GroupKind,
    n_blocks: usize,
    rows: usize,
    cols: usize,
    out: &mut [u8],
    block: impl Fn(usize, usize) -> (f16, [u8; QK]),
) {
    let nb = cols / QK;
    assert!(
        cols.is_multiple_of(QK) && n_blocks == rows * nb && out.len() == kind.matrix_bytes(rows, cols),
        "group_rows: bad lengths"
    );
    let gb = kind.group_bytes(cols);
    // Missing rows of the last group: zero scales and zero weights (q4 nibble 8).
    let pad: (f16, [u8; QK]) = (f16::ZERO, [if kind == GroupKind::Q4 { 8 } else { 0 }; QK]);
    for (g, grp) in out.chunks_exact_mut(gb.max(1)).enumerate().take(rows.div_ceil(GROUP_ROWS)) {
        let (scales, units) = grp.split_at_mut(2 * GROUP_ROWS * nb);
        for k in 0..GROUP_ROWS {
            let r = g * GROUP_ROWS + k;
            for b in 0..nb {
                let (d, q) = if r < rows { block(r, b) } else { pad };
                scales[2 * (k * nb + b)..][..2].copy_from_slice(&d.to_bits().to_le_bytes());
                let unit = &mut units[b * kind.unit_bytes()..][..kind.unit_bytes()];
                for c in 0..QK {
                    match kind {
                        GroupKind::Q8 => unit[4 * c + k] = q[c],
                        GroupKind::Q4 if c < QK / 2 => unit[4 * c + k] = q[c],
                        GroupKind::Q4 => unit[4 * (c - QK / 2) + k] |= q[c] << 4,
                    }
                }
            }
        }
    }
}

/// One group's four activations for one block, scaled by their rows' block scales and
/// quantized together: `v[k] = a[k] · d[k]`, `s = max|v| / 127`, `ã[k] = round_ties_even(v[k] /
/// s)` (computed as `v · (1 / s)`, clamped to ±127), so `a[k] · d[k] · q ≈ s · ã[k] · q`. A
/// NaN or an infinity gives `s = NaN` (and `ã = 0`), so the outputs it enters come out NaN;
/// all-zero values give `s = 0`. Every SIMD build computes exactly these bits.
#[inline(always)]
pub(crate) fn prep_block(a: [f32; GROUP_ROWS], d: [f32; GROUP_ROWS]) -> ([i8; GROUP_ROWS], f32) {
    let v: [f32; GROUP_ROWS] = std::array::from_fn(|k| a[k] * d[k]);
    let m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let finite = v.iter().all(|x| x.is_finite());
    let (s, id) = crate::quant::act_scale(m, finite);
    (std::array::from_fn(|k| (v[k] * id).round_ties_even().clamp(-127.0, 127.0) as i8), s)
}

/// The scalar oracle: `y[t, :] += Σ_j a[t * a_stride + j] · W[j, :]`, group by group, each
/// block `y[c] = fma(s, Σ_k ã[k] · q[k, c], y[c])` ([`prep_block`]), straight into `y`
/// (`[n_tokens, cols]`).
pub(crate) fn axpy_scalar(a: &[f32], a_stride: usize, n_tokens: usize, w: GroupedRef<'_>, y: &mut [f32]) {
    let (rows, cols, nb) = (w.rows, w.cols, w.cols / QK);
    for t in 0..n_tokens {
        let yt = &mut y[t * cols..(t + 1) * cols];
        for g in 0..rows.div_ceil(GROUP_ROWS) {
            let (scales, units, stride) =
                (&w.data[w.scales_at(g)..], &w.data[w.unit_at(g)..], w.unit_stride(g));
            let act: [f32; GROUP_ROWS] = std::array::from_fn(|k| {
                let r = g * GROUP_ROWS + k;
                if r < rows {
                    a[t * a_stride + r]
                } else {
                    0.0
                }
            });
            for b in 0..nb {
                let d = std::array::from_fn(|k| scale_of(scales, nb, k, b));
                let (qa, s) = prep_block(act, d);
                let unit = &units[b * stride..];
                for c in 0..QK {
                    let sum: i32 = (0..GROUP_ROWS).map(|k| qa[k] as i32 * quant_of(w.kind, unit, k, c)).sum();
                    let yc = &mut yt[b * QK + c];
                    *yc = s.mul_add(sum as f32, *yc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_q4, dequantize_q8, quantize_q4, quantize_q8};

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i % 7) as f32).collect()
    }

    #[test]
    fn grouped_rows_hold_the_same_weights() {
        for (rows, cols) in [(1, 32), (4, 64), (5, 96), (7, 32), (8, 128)] {
            let x = data(rows * cols);
            let nb = cols / QK;
            let mut q8 = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; rows * nb];
            let mut q4 = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; rows * nb];
            quantize_q8(&x, &mut q8);
            quantize_q4(&x, &mut q4);
            let mut g8 = vec![0u8; GroupKind::Q8.matrix_bytes(rows, cols)];
            let mut g4 = vec![0u8; GroupKind::Q4.matrix_bytes(rows, cols)];
            group_q8_rows(&q8, rows, cols, &mut g8);
            group_q4_rows(&q4, rows, cols, &mut g4);
            assert_eq!(g8.len(), rows.div_ceil(4) * 4 * nb * 34);
            assert_eq!(g4.len(), rows.div_ceil(4) * 4 * nb * 18);
            let m8 = GroupedRef::new(GroupKind::Q8, &g8, rows, cols).unwrap();
            let m4 = GroupedRef::new(GroupKind::Q4, &g4, rows, cols).unwrap();
            let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                dequantize_q8(&q8[r * nb..(r + 1) * nb], &mut want);
                m8.row_to_f32(r, &mut got);
                assert_eq!(want, got, "q8 {rows}x{cols} row {r}");
                dequantize_q4(&q4[r * nb..(r + 1) * nb], &mut want);
                m4.row_to_f32(r, &mut got);
                assert_eq!(want, got, "q4 {rows}x{cols} row {r}");
            }
            if rows > 4 {
                let tail = m8.row_range(4, rows);
                tail.row_to_f32(0, &mut got);
                m8.row_to_f32(4, &mut want);
                assert_eq!(want, got);
            }
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert!(matches!(
            GroupedRef::new(GroupKind::Q8, &[0u8; 100], 4, 32),
            Err(KernelError::GroupedLength { expected: 136, .. })
        ));
        assert!(matches!(
            GroupedRef::new(GroupKind::Q4, &[], 4, 33),
            Err(KernelError::QuantizedShape { .. })
        ));
    }

    #[test]
    fn block_prep_is_within_half_a_step_and_flags_non_finite() {
        let (qa, s) = prep_block([1.0, -2.0, 0.5, 0.0], [0.5, 0.25, 1.0, 3.0]);
        assert_eq!(s, 0.5 / 127.0);
        let v = [0.5f32, -0.5, 0.5, 0.0];
        for k in 0..4 {
            assert!((v[k] - s * qa[k] as f32).abs() <= 0.5 * s);
        }
        assert_eq!(prep_block([0.0; 4], [1.0; 4]), ([0; 4], 0.0));
        for bad in [f32::NAN, f32::INFINITY] {
            let (qa, s) = prep_block([1.0, bad, 0.5, 0.0], [1.0; 4]);
            assert!(s.is_nan() && qa == [0; 4], "{bad}");
        }
    }
}
