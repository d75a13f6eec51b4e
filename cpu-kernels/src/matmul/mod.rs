//! `y = x · Wᵀ` for f32 activations and bf16 / f16 / f32 weights stored `[rows, cols]`
//! (`nn.Linear` layout), for one token (matvec) or a small batch.

mod scalar;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dispatch::{active_isa, Isa};
use crate::KernelError;

/// Borrowed weight elements, row-major `[rows, cols]`.
#[derive(Debug, Clone, Copy)]
pub enum WeightsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl WeightsRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightsRef::F32(w) => w.len(),
            WeightsRef::Bf16(w) => w.len(),
            WeightsRef::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of weight data read by one pass over the whole buffer.
    pub fn size_bytes(&self) -> usize {
        match self {
            WeightsRef::F32(w) => w.len() * 4,
            WeightsRef::Bf16(w) => w.len() * 2,
            WeightsRef::F16(w) => w.len() * 2,
        }
    }
}

/// A weight matrix `[rows, cols]`; `rows` is the output dimension.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: WeightsRef<'a>,
    rows: usize,
    cols: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: WeightsRef<'a>, rows: usize, cols: usize) -> Result<Self, KernelError> {
        let expected = rows.checked_mul(cols).unwrap_or(usize::MAX);
        if data.len() != expected {
            return Err(KernelError::WeightLength {
                rows,
                cols,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> WeightsRef<'a> {
        self.data
    }
    pub fn size_bytes(&self) -> usize {
        self.data.size_bytes()
    }

    /// Rows `start..end` as a matrix of their own.
    pub fn row_range(&self, start: usize, end: usize) -> MatRef<'a> {
        assert!(
            start <= end && end <= self.rows,
            "row range {start}..{end} of {}",
            self.rows
        );
        let (a, b) = (start * self.cols, end * self.cols);
        let data = match self.data {
            WeightsRef::F32(w) => WeightsRef::F32(&w[a..b]),
            WeightsRef::Bf16(w) => WeightsRef::Bf16(&w[a..b]),
            WeightsRef::F16(w) => WeightsRef::F16(&w[a..b]),
        };
        MatRef {
            data,
            rows: end - start,
            cols: self.cols,
        }
    }

    /// Row `r` converted to f32 (embedding lookup).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let a = r * self.cols;
        match self.data {
            WeightsRef::F32(w) => out.copy_from_slice(&w[a..a + self.cols]),
            WeightsRef::Bf16(w) => {
                for (o, v) in out.iter_mut().zip(&w[a..a + self.cols]) {
                    *o = v.to_f32();
                }
            }
            WeightsRef::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w[a..a + self.cols]) {
                    *o = v.to_f32();
                }
            }
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
    let n_tokens = if cols == 0 {
        y.len() / rows
    } else {
        x.len() / cols
    };
    assert_eq!(x.len(), n_tokens * cols, "x is not [n_tokens, cols]");
    assert_eq!(y.len(), n_tokens * rows, "y is not [n_tokens, rows]");
    if n_tokens == 0 {
        return;
    }
    let kernel = select(isa);
    if n_tokens == 1 {
        // One token: y is contiguous per row block.
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(i, yb)| {
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
                    std::ptr::copy_nonoverlapping(
                        local.as_ptr(),
                        dst.0.add(t * rows + r0),
                        r1 - r0,
                    );
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
