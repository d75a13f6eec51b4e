//! The grouped quantized `axpy` ([`crate::row_groups`]) on AVX-512 VNNI: per block of a group
//! of four rows, two `vpdpbusd` (16 columns each, the four rows' bytes of a column in one
//! 32-bit lane), two conversions and two FMAs for 128 weights.

use std::arch::x86_64::*;

use super::groups::{Passes, Prepared};
use super::prefetch;
use crate::quant::QK;
use crate::row_groups::{GroupKind, GroupedRef, GROUP_ROWS};

/// [`Prepared`] for blocks `b0 .. b0 + n` of a group (`scales`: its scales, row by row,
/// `nb` per row), 16 blocks a step (the last masked): exactly
/// [`crate::row_groups::prep_block`] per block.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `scales` points to `4 · nb` readable f16; `b0 + n <= nb`,
/// `n <= CHUNK`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn prep(
    scales: *const u8,
    nb: usize,
    b0: usize,
    n: usize,
    act: [f32; GROUP_ROWS],
    offset: i32,
    out: &mut Prepared,
) {
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let zero = _mm512_setzero_ps();
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    // Per 128-bit lane the packed bytes are [ã0 of 4 blocks, ã1 …, ã2 …, ã3 …]; make them
    // [block 0: ã0 ã1 ã2 ã3, block 1: …].
    let transpose =
        _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    let mut i = 0;
    while i < n {
        let m: u16 = if n - i >= 16 { 0xFFFF } else { (1 << (n - i)) - 1 };
        // SAFETY: masked loads read only blocks b0 + i .. b0 + n of each row (caller); stores
        // reach at most CHUNK (a multiple of 16) entries of the output arrays.
        unsafe {
            let mut v = [zero; GROUP_ROWS];
            let mut fin = 0xFFFFu16;
            for k in 0..GROUP_ROWS {
                let p = scales.add(2 * (k * nb + b0 + i)) as *const i16;
                let d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
                v[k] = _mm512_mul_ps(d, _mm512_set1_ps(act[k]));
                // v − v is 0 exactly when v is finite.
                fin &= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v[k], v[k]), zero);
            }
            let amax = _mm512_max_ps(
                _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3])),
            );
            let nz = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(amax, zero);
            let d = _mm512_div_ps(amax, _mm512_set1_ps(127.0));
            let id = _mm512_maskz_mov_ps(fin & nz, _mm512_div_ps(_mm512_set1_ps(1.0), d));
            let s = _mm512_mask_blend_ps(fin, _mm512_set1_ps(f32::NAN), _mm512_maskz_mov_ps(nz, d));
            let mut c = [_mm512_setzero_si512(); GROUP_ROWS];
            for k in 0..GROUP_ROWS {
                let r = _mm512_roundscale_ps::<RNE>(_mm512_mul_ps(v[k], id));
                c[k] =
                    _mm512_maskz_mov_epi32(fin, _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi)));
            }
            let bytes = _mm512_packs_epi16(_mm512_packs_epi32(c[0], c[1]), _mm512_packs_epi32(c[2], c[3]));
            _mm512_storeu_si512(
                out.qa.as_mut_ptr().add(i) as *mut __m512i,
                _mm512_shuffle_epi8(bytes, transpose),
            );
            let sum = _mm512_add_epi32(_mm512_add_epi32(c[0], c[1]), _mm512_add_epi32(c[2], c[3]));
            let corr = _mm512_mullo_epi32(sum, _mm512_set1_epi32(-offset));
            _mm512_storeu_si512(out.corr.as_mut_ptr().add(i) as *mut __m512i, corr);
            _mm512_storeu_ps(out.s.as_mut_ptr().add(i), s);
        }
        i += 16;
    }
}

/// One token's `y[b·32 .. b·32 + 32] += Σ` over the units `units` of `G` groups for one
/// block (`i`: its index in the prepared chunk), groups in order.
///
/// # Safety
/// Each `units[gi]` points to a readable unit of kind `Q`; `y` to 32 writable f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
unsafe fn unit<const Q: u8, const G: usize>(
    units: [*const u8; G],
    p: &[Prepared; 2],
    i: usize,
    y: *mut f32,
    pf: usize,
) {
    // SAFETY: the unit's bytes lie inside the group (caller); prefetches never fault.
    unsafe {
        let (mut y0, mut y1) = (_mm512_loadu_ps(y), _mm512_loadu_ps(y.add(16)));
        for gi in 0..G {
            let u = units[gi];
            if pf != 0 {
                prefetch(u.wrapping_add(pf));
            }
            let (w0, w1) = if Q == 0 {
                if pf != 0 {
                    prefetch(u.wrapping_add(pf + 64));
                }
                let x80 = _mm512_set1_epi8(i8::MIN);
                (
                    _mm512_xor_si512(_mm512_loadu_si512(u as *const __m512i), x80),
                    _mm512_xor_si512(_mm512_loadu_si512(u.add(64) as *const __m512i), x80),
                )
            } else {
                let v = _mm512_loadu_si512(u as *const __m512i);
                let m = _mm512_set1_epi8(0x0f);
                (_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16::<4>(v), m))
            };
            let qa = _mm512_set1_epi32(p[gi].qa[i]);
            let corr = _mm512_set1_epi32(p[gi].corr[i]);
            let s = _mm512_set1_ps(p[gi].s[i]);
            y0 = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, w0, qa)), y0);
            y1 = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, w1, qa)), y1);
        }
        _mm512_storeu_ps(y, y0);
        _mm512_storeu_ps(y.add(16), y1);
    }
}

/// `y[t, :] += Σ_j a[t * a_stride + j] · W[j, :]` for one block of rows (the caller sums
/// blocks in order), groups in order.
pub(super) fn axpy_groups(a: &[f32], a_stride: usize, n_tokens: usize, w: GroupedRef<'_>, y: &mut [f32]) {
    if !super::avx512::has_vnni() {
        return super::groups_avx2::axpy_groups(a, a_stride, n_tokens, w, y);
    }
    assert!(crate::dispatch::Isa::Avx512.is_supported(), "AVX-512 kernel called on a CPU without AVX-512");
    // SAFETY: AVX-512 F/BW/VL and VNNI checked above.
    unsafe { run_checked(a, a_stride, n_tokens, w, y) }
}

super::groups::grouped_axpy!(feat: "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni");
