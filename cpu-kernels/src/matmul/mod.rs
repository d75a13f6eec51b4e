//! `y = x · Wᵀ` for f32 activations and bf16 / f16 / f32 weights stored `[rows, cols]`
//! (`nn.Linear` layout), for one token (matvec) or a small batch.

mod scalar;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dispatch::{active_isa, Isa};
use crate::quant::{BlockQ4, BlockQ8, QK};
use crate::KernelError;

/// Borrowed weight elements, row-major. Quantized variants hold `QK`-element blocks.
#[derive(Debug, Clone, Copy)]
pub enum WeightsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    Q8(&'a [BlockQ8]),
    Q4(&'a [BlockQ4]),
}

impl<'a> WeightsRef<'a> {
    /// Number of weights (elements, not blocks).
    pub fn len(&self) -> usize {
        match self {
            WeightsRef::F32(w) => w.len(),
            WeightsRef::Bf16(w) => w.len(),
            WeightsRef::F16(w) => w.len(),
            WeightsRef::Q8(w) => w.len() * QK,
            WeightsRef::Q4(w) => w.len() * QK,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of weight data read by one pass over the whole buffer.
    pub fn size_bytes(&self) -> usize {
        match self {
            WeightsRef::F32(w) => std::mem::size_of_val(*w),
            WeightsRef::Bf16(w) => std::mem::size_of_val(*w),
            WeightsRef::F16(w) => std::mem::size_of_val(*w),
            WeightsRef::Q8(w) => std::mem::size_of_val(*w),
            WeightsRef::Q4(w) => std::mem::size_of_val(*w),
        }
    }

    /// Elements `start..end` (multiples of `QK` for quantized data).
    pub fn slice(&self, start: usize, end: usize) -> WeightsRef<'a> {
        match *self {
            WeightsRef::F32(w) => WeightsRef::F32(&w[start..end]),
            WeightsRef::Bf16(w) => WeightsRef::Bf16(&w[start..end]),
            WeightsRef::F16(w) => WeightsRef::F16(&w[start..end]),
            WeightsRef::Q8(w) => {
                assert!(start % QK == 0 && end % QK == 0, "quantized slice {start}..{end} not block aligned");
                WeightsRef::Q8(&w[start / QK..end / QK])
            }
            WeightsRef::Q4(w) => {
                assert!(start % QK == 0 && end % QK == 0, "quantized slice {start}..{end} not block aligned");
                WeightsRef::Q4(&w[start / QK..end / QK])
            }
        }
    }

    fn is_quantized(&self) -> bool {
        matches!(self, WeightsRef::Q8(_) | WeightsRef::Q4(_))
    }
}

/// A weight matrix `[rows, cols]` (`rows` is the output dimension) whose row `r` starts at
/// element `r * stride`. `stride > cols` views interleaved layouts (row-column bundles).
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: WeightsRef<'a>,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major matrix: `data` holds exactly `rows * cols` weights.
    pub fn new(data: WeightsRef<'a>, rows: usize, cols: usize) -> Result<Self, KernelError> {
        let expected = rows.saturating_mul(cols);
        if data.len() != expected {
            return Err(KernelError::WeightLength { rows, cols, expected, actual: data.len() });
        }
        Self::strided(data, rows, cols, cols)
    }

    /// Rows of `cols` weights starting every `stride` weights.
    pub fn strided(
        data: WeightsRef<'a>,
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<Self, KernelError> {
        let needed = if rows == 0 { 0 } else { (rows - 1).saturating_mul(stride).saturating_add(cols) };
        if stride < cols || data.len() < needed {
            return Err(KernelError::WeightLength { rows, cols, expected: needed, actual: data.len() });
        }
        if data.is_quantized() && (cols % QK != 0 || stride % QK != 0) {
            return Err(KernelError::QuantizedShape { cols, stride });
        }
        Ok(Self { data, rows, cols, stride })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn stride(&self) -> usize {
        self.stride
    }
    pub fn data(&self) -> WeightsRef<'a> {
        self.data
    }
    /// Bytes one pass over the matrix reads.
    pub fn size_bytes(&self) -> usize {
        if self.data.is_empty() {
            return 0;
        }
        self.data.size_bytes() / self.data.len() * self.rows * self.cols
    }

    /// Row `r`'s `cols` weights.
    pub fn row(&self, r: usize) -> WeightsRef<'a> {
        self.data.slice(r * self.stride, r * self.stride + self.cols)
    }

    /// Rows `start..end` as a matrix of their own.
    pub fn row_range(&self, start: usize, end: usize) -> MatRef<'a> {
        assert!(start <= end && end <= self.rows, "row range {start}..{end} of {}", self.rows);
        let data = if start == end {
            self.data.slice(0, 0)
        } else {
            self.data.slice(start * self.stride, (end - 1) * self.stride + self.cols)
        };
        MatRef { data, rows: end - start, cols: self.cols, stride: self.stride }
    }

    /// Row `r` converted to f32 (embedding lookup).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        match self.row(r) {
            WeightsRef::F32(w) => out.copy_from_slice(w),
            WeightsRef::Bf16(w) => out.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32()),
            WeightsRef::F16(w) => out.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32()),
            WeightsRef::Q8(w) => crate::quant::dequantize_q8(w, out),
            WeightsRef::Q4(w) => crate::quant::dequantize_q4(w, out),
        }
    }
}

/// Output rows handled by one task: big enough to amortise scheduling, small enough to
/// balance two to sixteen cores on the matrices of real models.
const ROWS_PER_TASK: usize = 64;

/// `y[t, r] = Σ_c x[t, c] · W[r, c]` for every token `t` of `x` (`[n_tokens, cols]`),
/// `y` is `[n_tokens, rows]`. Parallel over output rows on the current rayon pool.
pub fn matmul(x: &[f32], w: MatRef<'_>, y: &mut [f32]) {
    matmul_with(active_isa(), x, w, y)
}

/// [`matmul`] on a given ISA (tests compare ISAs through this).
pub fn matmul_with(isa: Isa, x: &[f32], w: MatRef<'_>, y: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    if rows == 0 {
        return;
    }
    let n_tokens = x.len().checked_div(cols).unwrap_or(y.len() / rows);
    assert_eq!(x.len(), n_tokens * cols, "x is not [n_tokens, cols]");
    assert_eq!(y.len(), n_tokens * rows, "y is not [n_tokens, rows]");
    if n_tokens == 0 {
        return;
    }
    let kernel = select(isa);
    if n_tokens == 1 {
        // One token: y is contiguous per row block.
        y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(i, yb)| {
            let r0 = i * ROWS_PER_TASK;
            kernel(x, 1, w.row_range(r0, r0 + yb.len()), yb, yb.len());
        });
    } else {
        // Several tokens: every task reads its block of W once for all tokens and writes a
        // strided block of y. Blocks are disjoint, so tasks write through a shared pointer.
        let out = SyncPtr(y.as_mut_ptr());
        let n_blocks = rows.div_ceil(ROWS_PER_TASK);
        (0..n_blocks).into_par_iter().for_each(|b| {
            let r0 = b * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(rows);
            let mut local = [0f32; ROWS_PER_TASK];
            for t in 0..n_tokens {
                let xt = &x[t * cols..(t + 1) * cols];
                kernel(xt, 1, w.row_range(r0, r1), &mut local[..r1 - r0], r1 - r0);
                let dst = out;
                // SAFETY: y has n_tokens * rows elements (asserted above); this task alone
                // writes y[t*rows + r0 .. t*rows + r1] because row blocks are disjoint.
                unsafe {
                    std::ptr::copy_nonoverlapping(local.as_ptr(), dst.0.add(t * rows + r0), r1 - r0);
                }
            }
        });
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only to write disjoint ranges from different tasks (see matmul_with).
unsafe impl Send for SyncPtr {}
// SAFETY: as above; no two tasks touch the same element.
unsafe impl Sync for SyncPtr {}

/// A kernel for `n_tokens` tokens with `y` of stride `y_stride` per token.
type Kernel = fn(&[f32], usize, MatRef<'_>, &mut [f32], usize);

fn select(isa: Isa) -> Kernel {
    match isa {
        Isa::Scalar | Isa::Avx2 | Isa::Avx512 => scalar::matmul,
    }
}

/// One dot product `Σ x[c] · w[c]` on the given ISA: the reduction every matmul output uses.
pub fn dot_row(isa: Isa, x: &[f32], w: MatRef<'_>, r: usize) -> f32 {
    let mut y = [0f32];
    select(isa)(x, 1, w.row_range(r, r + 1), &mut y, 1);
    y[0]
}

/// `y[t, :] += Σ_j a[t, j] · W[j, :]` (the transposed product `a · W`), with `a`:
/// `[n_tokens, rows]` and `y`: `[n_tokens, cols]`. Each output sums over j in ascending
/// order; parallel over column blocks, so the thread count does not change results.
pub fn axpy_rows_with(isa: Isa, a: &[f32], w: MatRef<'_>, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    if cols == 0 {
        return;
    }
    let n_tokens = y.len() / cols;
    assert_eq!(a.len(), n_tokens * rows, "a is not [n_tokens, rows]");
    let _ = isa;
    scalar::axpy_rows(a, n_tokens, w, y);
}
