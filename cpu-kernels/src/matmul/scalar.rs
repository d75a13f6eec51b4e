//! Scalar reference: one sequential f32 accumulation per output, in column order.

use super::{MatRef, WeightsRef};

pub(super) fn matmul(x: &[f32], n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
    let cols = w.cols();
    for t in 0..n_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..w.rows() {
            let row = r * cols..(r + 1) * cols;
            y[t * y_stride + r] = match w.data() {
                WeightsRef::F32(d) => xt.iter().zip(&d[row]).fold(0.0, |acc, (a, b)| acc + a * b),
                WeightsRef::Bf16(d) => xt
                    .iter()
                    .zip(&d[row])
                    .fold(0.0, |acc, (a, b)| acc + a * b.to_f32()),
                WeightsRef::F16(d) => xt
                    .iter()
                    .zip(&d[row])
                    .fold(0.0, |acc, (a, b)| acc + a * b.to_f32()),
            };
        }
    }
}
