//! Scalar reference: one sequential f32 accumulation per output, in column order; for
//! quantized weights an exact integer dot per block with the quantized activations, scaled
//! and summed block by block.

use super::{Acts, MatRef, WeightsRef};
use crate::quant::{LANE, QK};

/// `Σ x[c] · w[c]` for one row of dense weights.
fn dot(x: &[f32], w: WeightsRef<'_>) -> f32 {
    match w {
        WeightsRef::F32(d) => x.iter().zip(d).fold(0.0, |acc, (a, b)| acc + a * b),
        WeightsRef::Bf16(d) => x.iter().zip(d).fold(0.0, |acc, (a, b)| acc + a * b.to_f32()),
        WeightsRef::F16(d) => x.iter().zip(d).fold(0.0, |acc, (a, b)| acc + a * b.to_f32()),
        WeightsRef::Q8(_) | WeightsRef::Q4(_) | WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_) => {
            unreachable!("quantized rows take qdot")
        }
    }
}

/// `Σ_b (dw_b · dx_b) · Σ_{c in b} qw[c] · qx[c]` for one row of quantized weights and
/// quantized activations `q` with per-group scales `scales` (see `Acts`): the integer dot
/// of each block is exact, then scaled and summed in block order.
fn qdot(q: &[i8], scales: &[f32], w: WeightsRef<'_>) -> f32 {
    let block = |b: usize, qs: &[i8], f: &dyn Fn(usize) -> i32, d: f32| {
        let idot: i32 = qs.iter().enumerate().map(|(i, &v)| v as i32 * f(i)).sum();
        idot as f32 * (d * scales[b * (QK / LANE)])
    };
    match w {
        WeightsRef::Q8(blocks) => blocks.iter().enumerate().fold(0.0, |acc, (b, bl)| {
            acc + block(b, &q[b * QK..(b + 1) * QK], &|i| bl.qs[i] as i32, bl.d.to_f32())
        }),
        WeightsRef::Q4(blocks) => blocks.iter().enumerate().fold(0.0, |acc, (b, bl)| {
            let nib = |i: usize| {
                let v = if i < QK / 2 { bl.qs[i] & 0x0f } else { bl.qs[i - QK / 2] >> 4 };
                v as i32 - 8
            };
            acc + block(b, &q[b * QK..(b + 1) * QK], &nib, bl.d.to_f32())
        }),
        _ => unreachable!("dense rows take dot"),
    }
}

/// `y[t * y_stride + r] = dot(x_t, W_r)`.
pub(super) fn matmul(x: Acts<'_>, n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
    if w.is_tiled() {
        return super::untiled(matmul, x, n_tokens, w, y, y_stride);
    }
    let cols = w.cols();
    let g = cols / LANE;
    for t in 0..n_tokens {
        for r in 0..w.rows() {
            y[t * y_stride + r] = if w.data().is_quantized() {
                qdot(&x.q[t * cols..(t + 1) * cols], &x.scales[t * g..(t + 1) * g], w.row(r))
            } else {
                dot(&x.x[t * cols..(t + 1) * cols], w.row(r))
            };
        }
    }
}

thread_local! {
    /// The calling thread's row buffer of [`axpy_rows`] (grown to the widest row seen), so
    /// the scalar path, where it is the one that runs (CPUs without AVX2), allocates nothing
    /// per decode step either.
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y[t, :] += a[t, j] · W_j` for every row j in order (the transposed product).
pub(crate) fn axpy_rows(a: &[f32], n_tokens: usize, w: MatRef<'_>, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let run = |buf: &mut [f32]| {
        for j in 0..rows {
            w.row_to_f32(j, buf);
            for t in 0..n_tokens {
                let aj = a[t * rows + j];
                for (yv, &wv) in y[t * cols..(t + 1) * cols].iter_mut().zip(&*buf) {
                    *yv += aj * wv;
                }
            }
        }
    };
    let mut run = Some(run);
    ROW.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if b.len() < cols {
                b.resize(cols, 0.0);
            }
            if let Some(mut run) = run.take() {
                run(&mut b[..cols]);
            }
        }
    });
    if let Some(mut run) = run {
        // Re-entered on this thread: a buffer of its own.
        run(&mut vec![0f32; cols]);
    }
}
