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

/// Values per lane of the integer dot products (`vpdpbusd` / `pmaddubsw`+`pmaddwd` sum
/// four adjacent byte products into one 32-bit lane).
pub const LANE: usize = 4;

/// Quantizes activations for the integer dot products of q8 / q4 weights, the way
/// llama.cpp pairs `Q8_0` activations with its weight formats: per block of [`QK`],
/// `x ≈ dx · q` with `q = round_ties_even(x / dx)` (computed as `x · (1 / dx)`),
/// `q ∈ [-127, 127]` and `dx = max|x| / 127` (an f32, not rounded to f16). For each group of
/// [`LANE`] values it also writes `-Σ q` to `neg_sums` (the kernels that feed weights as
/// unsigned bytes subtract their offset with it) and `dx` to `lane_scales` (so a kernel
/// multiplies lanes by a vector load instead of building a broadcast per block).
///
/// A block holding a NaN or an infinity gets a NaN scale, so the products it enters
/// come out NaN, as with f32 activations, never a silently finite number.
///
/// Every operation is exact or correctly rounded elementwise, so the compiled variants
/// (AVX-512, AVX2, baseline) give the same bits; the SIMD builds let the compiler
/// vectorize the rounding, which the baseline x86-64 target can only call from libm.
pub fn quantize_acts(x: &[f32], q: &mut [i8], neg_sums: &mut [i32], lane_scales: &mut [f32]) {
    assert!(
        x.len().is_multiple_of(QK)
            && q.len() == x.len()
            && neg_sums.len() == x.len() / LANE
            && lane_scales.len() == x.len() / LANE,
        "quantize_acts: bad lengths"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dispatch::Isa;
        if Isa::Avx512.is_supported() {
            // SAFETY: the CPU has the features (checked just above).
            return unsafe { quantize_acts_avx512(x, q, neg_sums, lane_scales) };
        }
        if Isa::Avx2.is_supported() {
            // SAFETY: as above.
            return unsafe { quantize_acts_avx2(x, q, neg_sums, lane_scales) };
        }
    }
    quantize_acts_impl(x, q, neg_sums, lane_scales)
}

/// Reorders one row of [`quantize_acts`] output for the q4 kernels that take `blocks`
/// blocks a step (4 on AVX-512 VNNI, 2 on AVX2). A q4 block stores weight `i` in the low
/// nibble of byte `i` and weight `i + 16` in its high nibble, so several blocks' bytes split
/// into all their low nibbles and all their high nibbles with one AND and one shift. Per
/// full group of `blocks` blocks, the values become `[values 0..16 of each block][values
/// 16..32 of each block]`, and the group's sums and scales become `4 · blocks` lanes: lane
/// `4k + j` holds, for block `k`, the sum of its groups `j` and `j + 4` (the values that lane
/// multiplies, low and high nibbles) and the block's scale; they are stored from lane
/// `4 · blocks · group` (the first half of the group's room). Blocks after the last full
/// group keep their layout.
pub(crate) fn group_q4_acts(blocks: usize, q: &mut [i8], neg_sums: &mut [i32], lane_scales: &mut [f32]) {
    const L: usize = QK / LANE;
    const MAX: usize = 4;
    assert!((1..=MAX).contains(&blocks), "group_q4_acts: 1 to {MAX} blocks");
    let size = blocks * QK;
    let mut tmp = [0i8; MAX * QK];
    for (gi, qs) in q.chunks_exact_mut(size).enumerate() {
        tmp[..size].copy_from_slice(qs);
        for (k, blk) in tmp[..size].chunks_exact(QK).enumerate() {
            qs[k * 16..k * 16 + 16].copy_from_slice(&blk[..16]);
            qs[size / 2 + k * 16..size / 2 + k * 16 + 16].copy_from_slice(&blk[16..]);
        }
        // In place, from the front: lane 4·blocks·gi + 4k + j reads entries
        // (blocks·gi + k)·8 + j and + 4 + j, never below itself, and no later lane reads
        // what an earlier one wrote.
        for k in 0..blocks {
            let src = (gi * blocks + k) * L;
            for j in 0..L / 2 {
                let dst = gi * 4 * blocks + 4 * k + j;
                neg_sums[dst] = neg_sums[src + j] + neg_sums[src + L / 2 + j];
                lane_scales[dst] = lane_scales[src];
            }
        }
    }
}

/// [`quantize_acts_impl`] in AVX-512 intrinsics, operation for operation (max of |x|, the
/// same scalar `d` and `1 / d`, multiply, round to nearest even, clamp, convert).
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL; lengths as asserted by [`quantize_acts`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn quantize_acts_avx512(x: &[f32], q: &mut [i8], neg_sums: &mut [i32], lane_scales: &mut [f32]) {
    use std::arch::x86_64::*;
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
    for b in 0..x.len() / QK {
        // SAFETY: block b lies inside x, q (QK values each), neg_sums and lane_scales
        // (QK / LANE each); all loads and stores are unaligned.
        unsafe {
            let p = x.as_ptr().add(b * QK);
            let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            // v − v is 0 exactly when v is finite.
            let zero = _mm512_setzero_ps();
            let fin = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v0, v0), zero)
                & _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v1, v1), zero);
            let (d, id) = act_scale(amax, fin == 0xFFFF);
            let qp = q.as_mut_ptr().add(b * QK);
            if fin != 0xFFFF {
                // The scalar code gets NaN · 0 or 0 for every value here: all zeros.
                _mm256_storeu_si256(qp as *mut __m256i, _mm256_setzero_si256());
            } else {
                let idv = _mm512_set1_ps(id);
                const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                let r0 = _mm512_roundscale_ps::<RNE>(_mm512_mul_ps(v0, idv));
                let r1 = _mm512_roundscale_ps::<RNE>(_mm512_mul_ps(v1, idv));
                let c0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r0, lo), hi));
                let c1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r1, lo), hi));
                _mm_storeu_si128(qp as *mut __m128i, _mm512_cvtepi32_epi8(c0));
                _mm_storeu_si128(qp.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(c1));
            }
            // Sums of four: byte pairs (ones · q), then pairs of pairs, in order.
            let qv = _mm256_loadu_si256(qp as *const __m256i);
            let s4 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, qv), ones16);
            let g = b * (QK / LANE);
            _mm256_storeu_si256(
                neg_sums.as_mut_ptr().add(g) as *mut __m256i,
                _mm256_sub_epi32(_mm256_setzero_si256(), s4),
            );
            _mm256_storeu_ps(lane_scales.as_mut_ptr().add(g), _mm256_set1_ps(d));
        }
    }
}

/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_acts_avx2(x: &[f32], q: &mut [i8], neg_sums: &mut [i32], lane_scales: &mut [f32]) {
    quantize_acts_impl(x, q, neg_sums, lane_scales)
}

/// A block's scale `d` and the multiplier `1 / d` its values are quantized with, from its
/// largest magnitude: NaN (and 0) for a block holding a NaN or an infinity, zeros for an
/// all-zero block. Shared by every build of [`quantize_acts`], which must agree bit for bit.
#[inline(always)]
pub(crate) fn act_scale(amax: f32, finite: bool) -> (f32, f32) {
    if !finite {
        (f32::NAN, 0.0)
    } else if amax == 0.0 {
        (0.0, 0.0)
    } else {
        let d = amax / 127.0;
        (d, 1.0 / d)
    }
}

#[inline(always)]
fn quantize_acts_impl(x: &[f32], q: &mut [i8], neg_sums: &mut [i32], lane_scales: &mut [f32]) {
    for (((xs, qs), ns), ls) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(neg_sums.chunks_exact_mut(QK / LANE))
        .zip(lane_scales.chunks_exact_mut(QK / LANE))
    {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let finite = xs.iter().fold(true, |f, v| f & v.is_finite());
        let (d, id) = act_scale(amax, finite);
        for (qv, &v) in qs.iter_mut().zip(xs) {
            *qv = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        for (n, g) in ns.iter_mut().zip(qs.chunks_exact(LANE)) {
            *n = -g.iter().map(|&v| v as i32).sum::<i32>();
        }
        ls.fill(d);
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

    #[test]
    fn activations_quantize_within_half_a_step_with_lane_sums() {
        let x: Vec<f32> = data(96).iter().map(|v| v * 3.0).collect();
        let (mut q, mut ns, mut ls) = (vec![0i8; 96], vec![0i32; 24], vec![0f32; 24]);
        quantize_acts(&x, &mut q, &mut ns, &mut ls);
        for b in 0..3 {
            let d = ls[b * 8];
            assert!(ls[b * 8..b * 8 + 8].iter().all(|&v| v == d));
            let amax = x[b * 32..b * 32 + 32].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(d, amax / 127.0);
            for i in b * 32..b * 32 + 32 {
                assert!((x[i] - d * q[i] as f32).abs() <= 0.5 * d * 1.0001, "{i}");
            }
        }
        for (g, &n) in q.chunks(4).zip(&ns) {
            assert_eq!(n, -g.iter().map(|&v| v as i32).sum::<i32>());
        }
    }

    #[test]
    fn grouped_q4_activations_pair_each_lane_with_its_eight_values() {
        for blocks in [2, 4] {
            // Full groups, then one block after them, which keeps its layout.
            let n = (8 / blocks * blocks + 1) * QK;
            let x: Vec<f32> = data(n).iter().enumerate().map(|(i, v)| v * (1 + i / 32) as f32).collect();
            let (mut q, mut ns, mut ls) = (vec![0i8; n], vec![0i32; n / 4], vec![0f32; n / 4]);
            quantize_acts(&x, &mut q, &mut ns, &mut ls);
            let (q0, ns0, ls0) = (q.clone(), ns.clone(), ls.clone());
            group_q4_acts(blocks, &mut q, &mut ns, &mut ls);
            let size = blocks * QK;
            for gi in 0..8 / blocks {
                let (qg, lanes) = (&q[gi * size..(gi + 1) * size], gi * 4 * blocks);
                for k in 0..blocks {
                    let blk = &q0[(gi * blocks + k) * QK..][..QK];
                    assert_eq!(qg[k * 16..k * 16 + 16], blk[..16], "{blocks}: low halves, {gi}/{k}");
                    assert_eq!(qg[size / 2 + k * 16..][..16], blk[16..], "{blocks}: high halves, {gi}/{k}");
                    for j in 0..4 {
                        let lane = lanes + 4 * k + j;
                        let vals =
                            qg[k * 16 + 4 * j..][..4].iter().chain(&qg[size / 2 + k * 16 + 4 * j..][..4]);
                        assert_eq!(ns[lane], -vals.map(|&v| v as i32).sum::<i32>(), "{blocks}: lane {lane}");
                        assert_eq!(ls[lane], ls0[(gi * blocks + k) * 8], "{blocks}: lane {lane}");
                    }
                }
            }
            assert_eq!(q[n - QK..], q0[n - QK..]);
            assert_eq!(ns[n / 4 - 8..], ns0[n / 4 - 8..]);
            assert_eq!(ls[n / 4 - 8..], ls0[n / 4 - 8..]);
        }
    }

    #[test]
    fn activations_with_nan_or_inf_give_a_nan_scale() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.25f32; 64];
            x[40] = bad;
            let (mut q, mut ns, mut ls) = (vec![0i8; 64], vec![0i32; 16], vec![0f32; 16]);
            quantize_acts(&x, &mut q, &mut ns, &mut ls);
            assert!(ls[..8].iter().all(|&v| v == 0.25 / 127.0), "{bad}: clean block");
            assert!(ls[8..].iter().all(|v| v.is_nan()), "{bad}");
        }
    }

    #[test]
    fn activation_quantization_is_the_same_on_every_build() {
        // Values on and near rounding ties (k + 0.5 steps), zeros, and a wide range.
        let mut x: Vec<f32> = (0..4096).map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 997.0).collect();
        for (i, v) in x.iter_mut().enumerate().step_by(7) {
            *v = ((i % 255) as f32 - 127.0) / 2.0 * (1.0 / 127.0) * 127.0 / 127.0;
        }
        x[64..96].fill(0.0);
        (x[200], x[300], x[400]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
        type Quantizer = fn(&[f32], &mut [i8], &mut [i32], &mut [f32]);
        let run = |f: Quantizer| {
            let (mut q, mut ns, mut ls) = (vec![0i8; 4096], vec![0i32; 1024], vec![0f32; 1024]);
            f(&x, &mut q, &mut ns, &mut ls);
            (q, ns, ls.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(run(quantize_acts), run(quantize_acts_impl));
    }
}
