//! Scalar reference: one sequential f32 accumulation per output, in column order
//! (block by block, scale applied per block, for quantized weights).

use super::{MatRef, WeightsRef};
use crate::quant::QK;

/// `Σ x[c] · w[c]` for one row.
pub(crate) fn dot(x: &[f32], w: WeightsRef<'_>) -> f32 {
    match w {
        WeightsRef::F32(d) => x.iter().zip(d).fold(0.0, |acc, (a, b)| acc + a * b),
        WeightsRef::Bf16(d) => x.iter().zip(d).fold(0.0, |acc, (a, b)| acc + a * b.to_f32()),
        WeightsRef::F16(d) => x.iter().zip(d).fold(0.0, |acc, (a, b)| acc + a * b.to_f32()),
        WeightsRef::Q8(blocks) => blocks.iter().zip(x.chunks_exact(QK)).fold(0.0, |acc, (b, xs)| {
            let s = xs.iter().zip(&b.qs).fold(0.0f32, |s, (a, &q)| s + a * q as f32);
            acc + s * b.d.to_f32()
        }),
        WeightsRef::Q4(blocks) => blocks.iter().zip(x.chunks_exact(QK)).fold(0.0, |acc, (b, xs)| {
            let mut s = 0.0f32;
            for i in 0..QK / 2 {
                s += xs[i] * ((b.qs[i] & 0x0f) as i32 - 8) as f32;
            }
            for i in 0..QK / 2 {
                s += xs[i + QK / 2] * ((b.qs[i] >> 4) as i32 - 8) as f32;
            }
            acc + s * b.d.to_f32()
        }),
    }
}

/// `y[t * y_stride + r] = dot(x_t, W_r)`.
pub(super) fn matmul(x: &[f32], n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
    let cols = w.cols();
    for t in 0..n_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..w.rows() {
            y[t * y_stride + r] = dot(xt, w.row(r));
        }
    }
}

/// `y[t, :] += a[t, j] · W_j` for every row j in order (the transposed product).
pub(crate) fn axpy_rows(a: &[f32], n_tokens: usize, w: MatRef<'_>, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let mut buf = vec![0f32; cols];
    for j in 0..rows {
        w.row_to_f32(j, &mut buf);
        for t in 0..n_tokens {
            let aj = a[t * rows + j];
            for (yv, &wv) in y[t * cols..(t + 1) * cols].iter_mut().zip(&buf) {
                *yv += aj * wv;
            }
        }
    }
}
