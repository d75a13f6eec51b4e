//! The grouped quantized `axpy` ([`crate::row_groups`]) on AVX2 (and AVX-512 without VNNI):
//! per 8 columns of a block of a group of four rows, `pmaddubsw` + `pmaddwd` sum each column's
//! four products in one 32-bit lane, then one conversion and one FMA.

use std::arch::x86_64::*;

use super::groups::{Passes, Prepared};
use super::prefetch;
use crate::quant::QK;
use crate::row_groups::{GroupKind, GroupedRef, GROUP_ROWS};

/// [`Prepared`] for blocks `b0 .. b0 + n` of a group (`scales`: its scales, row by row,
/// `nb` per row), 8 blocks a step (the last through a zero-padded copy): exactly
/// [`crate::row_groups::prep_block`] per block.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `scales` points to `4 · nb` readable f16; `b0 + n <= nb`,
/// `n <= CHUNK`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prep(
    scales: *const u8,
    nb: usize,
    b0: usize,
    n: usize,
    act: [f32; GROUP_ROWS],
    offset: i32,
    out: &mut Prepared,
) {
    let zero = _mm256_setzero_ps();
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    // Per 128-bit lane the packed bytes are [ã0 of 4 blocks, ã1 …, ã2 …, ã3 …]; make them
    // [block 0: ã0 ã1 ã2 ã3, block 1: …].
    let transpose =
        _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    let mut i = 0;
    while i < n {
        let full = n - i >= 8;
        let mut tail = [[0u16; 8]; GROUP_ROWS];
        // SAFETY: full steps read blocks b0 + i .. b0 + i + 8 <= b0 + n of each row, the last
        // one copies only blocks up to b0 + n (caller); stores reach at most CHUNK (a
        // multiple of 8) entries of the output arrays.
        unsafe {
            let mut v = [zero; GROUP_ROWS];
            let mut fin = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
            for k in 0..GROUP_ROWS {
                let p = scales.add(2 * (k * nb + b0 + i));
                let p = if full {
                    p
                } else {
                    std::ptr::copy_nonoverlapping(p, tail[k].as_mut_ptr() as *mut u8, 2 * (n - i));
                    tail[k].as_ptr() as *const u8
                };
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                v[k] = _mm256_mul_ps(d, _mm256_set1_ps(act[k]));
                // v − v is 0 exactly when v is finite.
                fin = _mm256_and_ps(fin, _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_sub_ps(v[k], v[k]), zero));
            }
            let amax = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
            );
            let nz = _mm256_cmp_ps::<_CMP_NEQ_UQ>(amax, zero);
            let d = _mm256_div_ps(amax, _mm256_set1_ps(127.0));
            let id = _mm256_and_ps(_mm256_and_ps(fin, nz), _mm256_div_ps(_mm256_set1_ps(1.0), d));
            let s = _mm256_blendv_ps(_mm256_set1_ps(f32::NAN), _mm256_and_ps(nz, d), fin);
            let mut c = [_mm256_setzero_si256(); GROUP_ROWS];
            for k in 0..GROUP_ROWS {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                    v[k], id,
                ));
                let ck = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
                c[k] = _mm256_and_si256(ck, _mm256_castps_si256(fin));
            }
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
            _mm256_storeu_si256(
                out.qa.as_mut_ptr().add(i) as *mut __m256i,
                _mm256_shuffle_epi8(bytes, transpose),
            );
            let sum = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
            let corr = _mm256_mullo_epi32(sum, _mm256_set1_epi32(-offset));
            _mm256_storeu_si256(out.corr.as_mut_ptr().add(i) as *mut __m256i, corr);
            _mm256_storeu_ps(out.s.as_mut_ptr().add(i), s);
        }
        i += 8;
    }
}

/// One token's `y[b·32 .. b·32 + 32] += Σ` over the units `units` of `G` groups for one
/// block (`i`: its index in the prepared chunk), groups in order.
///
/// # Safety
/// Each `units[gi]` points to a readable unit of kind `Q`; `y` to 32 writable f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unit<const Q: u8, const G: usize>(
    units: [*const u8; G],
    p: &[Prepared; 2],
    i: usize,
    y: *mut f32,
    pf: usize,
) {
    let ones = _mm256_set1_epi16(1);
    // SAFETY: the unit's bytes lie inside the group (caller); prefetches never fault.
    unsafe {
        let mut yv = [_mm256_setzero_ps(); 4];
        for (v, yv) in yv.iter_mut().enumerate() {
            *yv = _mm256_loadu_ps(y.add(8 * v));
        }
        for gi in 0..G {
            let u = units[gi];
            if pf != 0 {
                prefetch(u.wrapping_add(pf));
            }
            let qa = _mm256_set1_epi32(p[gi].qa[i]);
            let s = _mm256_set1_ps(p[gi].s[i]);
            // Per 32-bit lane (one column) the exact Σ_k ã[k] · q[k, c].
            let sums: [__m256i; 4] = if Q == 0 {
                if pf != 0 {
                    prefetch(u.wrapping_add(pf + 64));
                }
                // Signed weights: |q| · (ã · sign q), pairs at most 2 · 128 · 127 (no saturation).
                std::array::from_fn(|v| {
                    let w = _mm256_loadu_si256(u.add(32 * v) as *const __m256i);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(qa, w)), ones)
                })
            } else {
                // Nibbles q + 8 as unsigned bytes (pairs at most 2 · 15 · 127), minus 8 · Σ ã.
                let corr = _mm256_set1_epi32(p[gi].corr[i]);
                let m = _mm256_set1_epi8(0x0f);
                let v0 = _mm256_loadu_si256(u as *const __m256i);
                let v1 = _mm256_loadu_si256(u.add(32) as *const __m256i);
                let w = [
                    _mm256_and_si256(v0, m),
                    _mm256_and_si256(v1, m),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v0), m),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v1), m),
                ];
                std::array::from_fn(|v| {
                    _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w[v], qa), ones), corr)
                })
            };
            for v in 0..4 {
                yv[v] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums[v]), yv[v]);
            }
        }
        for (v, yv) in yv.iter().enumerate() {
            _mm256_storeu_ps(y.add(8 * v), *yv);
        }
    }
}

/// `y[t, :] += Σ_j a[t * a_stride + j] · W[j, :]` for one block of rows (the caller sums
/// blocks in order), groups in order.
pub(super) fn axpy_groups(a: &[f32], a_stride: usize, n_tokens: usize, w: GroupedRef<'_>, y: &mut [f32]) {
    assert!(crate::dispatch::Isa::Avx2.is_supported(), "AVX2 kernel called on a CPU without AVX2/FMA/F16C");
    // SAFETY: AVX2, FMA and F16C checked above.
    unsafe { run_checked(a, a_stride, n_tokens, w, y) }
}

super::groups::grouped_axpy!(feat: "avx2,fma,f16c");
