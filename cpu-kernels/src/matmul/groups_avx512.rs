//! The grouped quantized `axpy` ([`crate::row_groups`]) on AVX-512 VNNI: per block of a group
//! of four rows, two `vpdpbusd` (16 columns each, the four rows' bytes of a column in one
//! 32-bit lane), two conversions and two FMAs for 128 weights.

use std::arch::x86_64::*;

use super::groups::{Passes, Prepared, CHUNK};
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
                if Q == 0 {
                    prefetch(u.wrapping_add(pf + 64));
                }
            }
            [y0, y1] = add_unit(&p[gi], i, weights::<Q>(u), [y0, y1]);
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
    if n_tokens >= 2 {
        super::groups::check(a, a_stride, n_tokens, &w, y);
        // SAFETY: AVX-512 F/BW/VL and VNNI checked above; shapes checked just above.
        return unsafe {
            match w.kind() {
                GroupKind::Q8 => run_tokens::<0>(a, a_stride, n_tokens, w, y),
                GroupKind::Q4 => run_tokens::<1>(a, a_stride, n_tokens, w, y),
            }
        };
    }
    // SAFETY: AVX-512 F/BW/VL and VNNI checked above.
    unsafe { run_checked(a, a_stride, n_tokens, w, y) }
}

/// Groups whose prepared activations the several-token walk keeps at once (for
/// [`TOKENS`] tokens: 24 KB, in L1).
const SUBSET: usize = 8;
/// Tokens whose `y` vectors the several-token walk keeps in registers.
const TOKENS: usize = 4;

/// Several tokens ([`axpy_groups`] with `n_tokens ≥ 2`): per chunk of blocks, tile of
/// [`TOKENS`] tokens and subset of [`SUBSET`] groups, the activations are prepared, then
/// per block each token's two `y` vectors stay in registers across the subset's groups,
/// and each unit's weights are unpacked once for all the tokens. Per output the same
/// operations, groups in order, as [`unit`] (the same bits: `tests/row_groups.rs`); one
/// `y` load and store per eight groups instead of per two, one unpack per four tokens
/// instead of per token.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI; shapes as [`super::groups::check`] asserts.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
unsafe fn run_tokens<const Q: u8>(
    a: &[f32],
    a_stride: usize,
    n_tokens: usize,
    w: GroupedRef<'_>,
    y: &mut [f32],
) {
    let (rows, cols) = (w.rows(), w.cols());
    let (ng, nb) = (rows.div_ceil(GROUP_ROWS), cols / QK);
    let offset = w.kind().offset();
    let data = w.data().as_ptr();
    let yp = y.as_mut_ptr();
    let mut prepared = [[Prepared::ZERO; TOKENS]; SUBSET];
    let mut b0 = 0;
    while b0 < nb {
        let n = CHUNK.min(nb - b0);
        let mut t0 = 0;
        while t0 < n_tokens {
            let tt = TOKENS.min(n_tokens - t0);
            let mut g0 = 0;
            while g0 < ng {
                let gs = SUBSET.min(ng - g0);
                let mut units = [data; SUBSET];
                let mut strides = [0usize; SUBSET];
                for gi in 0..gs {
                    let g = g0 + gi;
                    units[gi] = data.wrapping_add(w.unit_at(g));
                    strides[gi] = w.unit_stride(g);
                    for (ti, p) in prepared[gi].iter_mut().enumerate().take(tt) {
                        let act: [f32; GROUP_ROWS] = std::array::from_fn(|k| {
                            let r = g * GROUP_ROWS + k;
                            if r < rows {
                                a[(t0 + ti) * a_stride + r]
                            } else {
                                0.0
                            }
                        });
                        // SAFETY: group g's scales hold nb blocks per row; b0 + n <= nb, n <= CHUNK.
                        unsafe { prep(data.add(w.scales_at(g)), nb, b0, n, act, offset, p) };
                    }
                }
                // The first tile of tokens reads the weights from memory: it asks for the next
                // subset's units as it goes (later tiles find them in cache).
                let mut ahead = [std::ptr::null(); SUBSET];
                let next = if t0 == 0 { SUBSET.min(ng.saturating_sub(g0 + gs)) } else { 0 };
                for (gi, p) in ahead.iter_mut().enumerate().take(next) {
                    let g = g0 + gs + gi;
                    *p = data.wrapping_add(w.unit_at(g));
                    let sc = data.wrapping_add(w.scales_at(g));
                    let mut off = 0;
                    while off < 2 * GROUP_ROWS * nb {
                        prefetch(sc.wrapping_add(off));
                        off += 64;
                    }
                }
                let walk = Walk {
                    units,
                    strides,
                    groups: gs,
                    ahead,
                    ahead_groups: next,
                    b0,
                    n,
                    y: yp.wrapping_add(t0 * cols),
                    cols,
                };
                // SAFETY: the groups' units hold nb blocks each; tokens t0 .. t0 + tt have rows
                // of cols values in y (checked shapes).
                unsafe {
                    match tt {
                        4 => walk.blocks::<Q, 4>(&prepared),
                        3 => walk.blocks::<Q, 3>(&prepared),
                        2 => walk.blocks::<Q, 2>(&prepared),
                        _ => walk.blocks::<Q, 1>(&prepared),
                    }
                }
                g0 += gs;
            }
            t0 += tt;
        }
        b0 += CHUNK;
    }
}

/// One subset of groups over one chunk of blocks for a tile of tokens ([`run_tokens`]).
struct Walk {
    /// Each group's unit of block 0; block b's is `b · strides[gi]` further.
    units: [*const u8; SUBSET],
    strides: [usize; SUBSET],
    groups: usize,
    /// The next subset's units of block 0 (same strides), prefetched block by block.
    ahead: [*const u8; SUBSET],
    ahead_groups: usize,
    b0: usize,
    n: usize,
    /// The tile's first token's row of `y`; token t's is `t · cols` further.
    y: *mut f32,
    cols: usize,
}

impl Walk {
    /// # Safety
    /// As [`run_tokens`]; `prepared[gi][t]` holds blocks `b0 .. b0 + n` of group gi for
    /// token t of the tile.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
    unsafe fn blocks<const Q: u8, const T: usize>(&self, prepared: &[[Prepared; TOKENS]; SUBSET]) {
        // SAFETY: blocks b0 .. b0 + n of every group and of every token's y row (caller).
        unsafe {
            for i in 0..self.n {
                let b = self.b0 + i;
                let mut acc = [[_mm512_setzero_ps(); 2]; T];
                for (t, acc) in acc.iter_mut().enumerate() {
                    let yb = self.y.add(t * self.cols + b * QK);
                    *acc = [_mm512_loadu_ps(yb), _mm512_loadu_ps(yb.add(16))];
                }
                for gi in 0..self.ahead_groups {
                    let off = b * self.strides[gi];
                    prefetch(self.ahead[gi].wrapping_add(off));
                    if Q == 0 {
                        prefetch(self.ahead[gi].wrapping_add(off + 64));
                    }
                }
                for gi in 0..self.groups {
                    let u = self.units[gi].add(b * self.strides[gi]);
                    let (w0, w1) = weights::<Q>(u);
                    for (t, acc) in acc.iter_mut().enumerate() {
                        *acc = add_unit(&prepared[gi][t], i, (w0, w1), *acc);
                    }
                }
                for (t, acc) in acc.iter().enumerate() {
                    let yb = self.y.add(t * self.cols + b * QK);
                    _mm512_storeu_ps(yb, acc[0]);
                    _mm512_storeu_ps(yb.add(16), acc[1]);
                }
            }
        }
    }
}

/// `y += s · Σ_k ã_k q_kc` for the 32 columns of one unit (`w`: its weights, [`weights`]) with
/// block `i` of the prepared activations `p`: the offset correction starts the integer sum,
/// one conversion and one FMA per 16 columns.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
fn add_unit(p: &Prepared, i: usize, w: (__m512i, __m512i), y: [__m512; 2]) -> [__m512; 2] {
    let qa = _mm512_set1_epi32(p.qa[i]);
    let corr = _mm512_set1_epi32(p.corr[i]);
    let s = _mm512_set1_ps(p.s[i]);
    [
        _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, w.0, qa)), y[0]),
        _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, w.1, qa)), y[1]),
    ]
}

/// A unit's 128 weights as unsigned bytes (q8 `q + 128`, q4 the stored nibble `q + 8`):
/// columns 0..16 and 16..32 of the block.
///
/// # Safety
/// `u` points to a readable unit of kind `Q`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
unsafe fn weights<const Q: u8>(u: *const u8) -> (__m512i, __m512i) {
    // SAFETY: caller contract.
    unsafe {
        if Q == 0 {
            let x80 = _mm512_set1_epi8(i8::MIN);
            (
                _mm512_xor_si512(_mm512_loadu_si512(u as *const __m512i), x80),
                _mm512_xor_si512(_mm512_loadu_si512(u.add(64) as *const __m512i), x80),
            )
        } else {
            let v = _mm512_loadu_si512(u as *const __m512i);
            let m = _mm512_set1_epi8(0x0f);
            (_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16::<4>(v), m))
        }
    }
}

super::groups::grouped_axpy!(feat: "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni");
