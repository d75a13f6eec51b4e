//! AVX-512 F/BW/VL kernels (16 f32 lanes), the same structure as `avx2.rs`.
//!
//! Reduction pattern of one dot product `Σ_c x[c]·w[c]` (the same whatever tile it is
//! computed in, so results never depend on how tokens or rows are grouped):
//! * dense weights (f32 / bf16 / f16): one 16-lane accumulator, `acc = fma(x[c..c+16],
//!   w[c..c+16], acc)` over the full chunks in column order, then the last `cols % 16`
//!   columns as one zero-padded chunk, then [`hsum`];
//! * quantized weights (q8 / q4, blocks of 32): per block `b = x0·q0`, `b = fma(x1, q1, b)`
//!   over its two 16-element halves, then `acc = fma(b, d, acc)`; [`hsum`] at the end.
//!
//! Multi-token tiles (up to [`NR`] rows × [`NT`] tokens) keep one accumulator per
//! (token, row) pair and load each weight vector once per tile.
//!
//! `axpy_rows` (one block of rows; the caller sums blocks in order): per output element
//! `y = fma(a[j], w[j], y)` for j ascending, with quantized weights dequantized as `d · q`
//! (one rounding, as the scalar oracle does).

use std::arch::x86_64::*;

use super::{prefetch, MatRef, WeightsRef};
use crate::dispatch::Isa;
use crate::quant::QK;

const LANES: usize = 16;
/// Rows per tile.
const NR: usize = 4;
/// Tokens per tile.
const NT: usize = 4;

/// Software prefetch distance in row tiles.
const PREFETCH_TILES: usize = 4;

const DT_F32: u8 = 0;
const DT_BF16: u8 = 1;
const DT_F16: u8 = 2;
const Q_8: u8 = 0;
const Q_4: u8 = 1;
const Q8_BYTES: usize = 2 + QK;
const Q4_BYTES: usize = 2 + QK / 2;

/// Horizontal sum in a fixed order: (lo256 + hi256), (lo128 + hi128), then pairs, then
/// the last two.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn hsum(v: __m512) -> f32 {
    let h = _mm256_add_ps(
        _mm512_castps512_ps256(v),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
    );
    let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// 16 weights of type `DT` at element `i` of `p`, as f32.
///
/// # Safety
/// `p` must point to at least `i + 16` readable elements of type `DT`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load_dense<const DT: u8>(p: *const u8, i: usize) -> __m512 {
    // SAFETY: the caller guarantees elements i..i+16 are readable; loads are unaligned.
    unsafe {
        match DT {
            DT_F32 => _mm512_loadu_ps((p as *const f32).add(i)),
            DT_BF16 => {
                let h = _mm256_loadu_si256((p as *const u16).add(i) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            _ => _mm512_cvtph_ps(_mm256_loadu_si256((p as *const u16).add(i) as *const __m256i)),
        }
    }
}

/// Bytes per element of dense type `DT`.
const fn elem_bytes<const DT: u8>() -> usize {
    if DT == DT_F32 {
        4
    } else {
        2
    }
}

/// One weight of type `DT` at element `i` of `p`, as f32 (exact for all three types).
///
/// # Safety
/// `p` must point to at least `i + 1` readable elements of type `DT`.
#[inline]
unsafe fn load_one<const DT: u8>(p: *const u8, i: usize) -> f32 {
    // SAFETY: the caller guarantees element i is readable.
    unsafe {
        match DT {
            DT_F32 => (p as *const f32).add(i).read_unaligned(),
            DT_BF16 => f32::from_bits(((p as *const u16).add(i).read_unaligned() as u32) << 16),
            _ => half::f16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
        }
    }
}

/// The block's scale broadcast, and its 32 values (`q`, or `q − 8` for q4) as 2 vectors.
///
/// # Safety
/// `p` points to one readable block of kind `Q`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load_block<const Q: u8>(p: *const u8) -> (__m512, [__m512; 2]) {
    // SAFETY: the block is readable (caller); all loads are unaligned and within it
    // (q8: 2 + 2·16 = 34 bytes; q4: 2 + 16 = 18 bytes).
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_set1_epi16((p as *const i16).read_unaligned()));
        let qs = p.add(2);
        if Q == Q_8 {
            let lo = _mm_loadu_si128(qs as *const __m128i);
            let hi = _mm_loadu_si128(qs.add(16) as *const __m128i);
            (d, [_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))])
        } else {
            // Each byte widened to a dword; vpermps looks only at the low 4 bits of each
            // index, so the low nibble indexes the table directly and the high nibble after a
            // shift by 4: no masking, no integer→float conversion.
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i));
            let table = nibble_table();
            (d, [_mm512_permutexvar_ps(b, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), table)])
        }
    }
}

/// `[q − 8 for q in 0..16]` as f32 (exact), the q4 nibble lookup table.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn nibble_table() -> __m512 {
    _mm512_setr_ps(-8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
}

/// The scale of the block at `p`, broadcast, through the f16→f32 table (a load that the
/// FMA can take as a broadcast operand; cheaper than a vector conversion per block).
///
/// # Safety
/// `p` points to a readable block; `lut` is [`super::f16_table`] (65536 entries).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn block_scale(p: *const u8, lut: *const f32) -> __m512 {
    // SAFETY: the scale is the block's first two bytes; every u16 indexes the table.
    unsafe { _mm512_set1_ps(*lut.add((p as *const u16).read_unaligned() as usize)) }
}

/// # Safety
/// As [`matmul_impl`]; `K` matches the weight type of `w`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tiles<const K: u8, const QUANT: bool>(
    x: &[f32],
    n_tokens: usize,
    w: MatRef<'_>,
    y: &mut [f32],
    y_stride: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    let (base, unit_bytes, unit_elems) = raw(&w);
    let row_bytes = w.stride / unit_elems * unit_bytes;
    let nb = cols / QK;
    let xp = x.as_ptr();
    // Software prefetch distance: the rows PREFETCH_TILES tiles ahead (rows are too short
    // for the hardware prefetchers to ramp up on four interleaved streams). Dense rows get
    // one prefetch per 64 bytes; quantized rows one per block (measured faster than a
    // branch on line crossings).
    let pf = PREFETCH_TILES * NR * row_bytes;
    let lut = super::f16_table().as_ptr();
    macro_rules! run {
        ($r:literal, $t:literal, $r0:expr, $t0:expr) => {{
            // SAFETY: rows r0 .. r0 + R <= rows start at base + r · row_bytes and hold cols
            // elements (MatRef invariant); tokens t0 .. t0 + T <= n_tokens have cols f32 in x.
            let out = unsafe {
                let mut wp = [base; $r];
                for i in 0..$r {
                    wp[i] = base.add(($r0 + i) * row_bytes);
                }
                let xt = xp.add($t0 * cols);
                if QUANT {
                    quant_tile::<K, $r, $t>(xt, cols, wp, nb, pf, lut)
                } else {
                    dense_tile::<K, $r, $t>(xt, cols, wp, cols, pf)
                }
            };
            for t in 0..$t {
                for r in 0..$r {
                    y[($t0 + t) * y_stride + $r0 + r] = out[t][r];
                }
            }
        }};
    }
    let rows_full = rows / NR * NR;
    let tok_full = n_tokens / NT * NT;
    let mut r0 = 0;
    while r0 < rows {
        let mut t0 = 0;
        if r0 < rows_full {
            while t0 < tok_full {
                run!(4, 4, r0, t0);
                t0 += NT;
            }
            while t0 < n_tokens {
                run!(4, 1, r0, t0);
                t0 += 1;
            }
            r0 += NR;
        } else {
            while t0 < tok_full {
                run!(1, 4, r0, t0);
                t0 += NT;
            }
            while t0 < n_tokens {
                run!(1, 1, r0, t0);
                t0 += 1;
            }
            r0 += 1;
        }
    }
}

super::common::simd_kernels! {
    feat: "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    isa: Isa::Avx512,
    isa_msg: "AVX-512 kernel called on a CPU without AVX-512 F/BW/VL",
    quant_vectors: 2,
    load: _mm512_loadu_ps,
    store: _mm512_storeu_ps,
    fma: _mm512_fmadd_ps,
    set1: _mm512_set1_ps,
    setzero: _mm512_setzero_ps,
    mul: _mm512_mul_ps,
}
