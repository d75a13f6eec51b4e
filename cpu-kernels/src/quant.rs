//! Group-wise quantized weight formats (block of 32 along a row, one f16 scale per block),
//! in the spirit of llama.cpp's Q8_0 / Q4_0:
//!
//! * [`BlockQ8`]: `x ≈ d · q`, `q ∈ [-127, 127]`, `d = max|x| / 127`. 34 bytes per 32 weights.
//! * [`BlockQ4`]: `x ≈ d · (q − 8)`, `q ∈ [0, 15]`, `d = −m / 8` where `m` is the value of
//!   largest magnitude (sign kept, so it maps exactly to −8). 18 bytes per 32 weights.
//!   Byte `i` holds element `i` in its low nibble and element `i + 16` in its high nibble.
//!
//! A row's length must be a multiple of [`QK`]; rows are quantized independently, so any
//! row (or set of rows) of a quantized matrix is itself a valid quantized matrix.

use half::f16;

/// Elements per quantization block.
pub const QK: usize = 32;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8 {
    pub d: f16,
    pub qs: [i8; QK],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// Quantizes `x` (length a multiple of [`QK`]) into `out` (`x.len() / QK` blocks).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    assert!(x.len().is_multiple_of(QK) && out.len() == x.len() / QK, "quantize_q8: bad lengths");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Quantize against the scale as stored (f16), so the error bound is half a step.
        b.d = f16::from_f32(amax / 127.0);
        let d = b.d.to_f32();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Quantizes `x` (length a multiple of [`QK`]) into `out` (`x.len() / QK` blocks).
pub fn quantize_q4(x: &[f32], out: &mut [BlockQ4]) {
    assert!(x.len().is_multiple_of(QK) && out.len() == x.len() / QK, "quantize_q4: bad lengths");
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let m = xs.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        b.d = f16::from_f32(m / -8.0);
        let d = b.d.to_f32();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for i in 0..QK / 2 {
            let lo = ((xs[i] * id + 8.5) as i32).clamp(0, 15) as u8;
            let hi = ((xs[i + QK / 2] * id + 8.5) as i32).clamp(0, 15) as u8;
            b.qs[i] = lo | (hi << 4);
        }
    }
}

/// Expands blocks back to f32 (`out.len() == blocks.len() * QK`).
pub fn dequantize_q8(blocks: &[BlockQ8], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (v, &q) in o.iter_mut().zip(&b.qs) {
            *v = d * q as f32;
        }
    }
}

/// Expands blocks back to f32 (`out.len() == blocks.len() * QK`).
pub fn dequantize_q4(blocks: &[BlockQ4], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for i in 0..QK / 2 {
            o[i] = d * ((b.qs[i] & 0x0f) as i32 - 8) as f32;
            o[i + QK / 2] = d * ((b.qs[i] >> 4) as i32 - 8) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect()
    }

    #[test]
    fn q8_round_trip_error_is_within_half_a_step() {
        let x = data(256);
        let mut b = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; 8];
        quantize_q8(&x, &mut b);
        let mut y = vec![0f32; 256];
        dequantize_q8(&b, &mut y);
        for (blk, (xs, ys)) in b.iter().zip(x.chunks(QK).zip(y.chunks(QK))) {
            let step = blk.d.to_f32();
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= 0.501 * step + 1e-7, "{a} vs {c}, step {step}");
            }
        }
    }

    #[test]
    fn q4_round_trip_error_is_within_one_step() {
        let x = data(128);
        let mut b = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; 4];
        quantize_q4(&x, &mut b);
        let mut y = vec![0f32; 128];
        dequantize_q4(&b, &mut y);
        for (blk, (xs, ys)) in b.iter().zip(x.chunks(QK).zip(y.chunks(QK))) {
            let step = blk.d.to_f32().abs();
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= step + 1e-6, "{a} vs {c}, step {step}");
            }
        }
    }

    #[test]
    fn zero_block_stays_zero() {
        let x = [0f32; QK];
        let mut b = [BlockQ4 { d: f16::ONE, qs: [0xff; QK / 2] }];
        quantize_q4(&x, &mut b);
        let mut y = [1f32; QK];
        dequantize_q4(&b, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
