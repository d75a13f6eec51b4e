//! AVX-512 F/BW/VL kernels (16 f32 lanes), the same structure as `avx2.rs`.
//!
//! Reduction pattern of one dot product `Σ_c x[c]·w[c]` (the same whatever tile it is
//! computed in, so results never depend on how tokens or rows are grouped):
//! * dense weights (f32 / bf16 / f16): one 16-lane accumulator, `acc = fma(x[c..c+16],
//!   w[c..c+16], acc)` over the full chunks in column order, then the last `cols % 16`
//!   columns as one zero-padded chunk, then [`hsum`];
//! * quantized weights (q8 / q4, blocks of 32): integer dot products with the activations
//!   quantized to 8 bits ([`qdot_tile`], AVX-512 VNNI; the AVX2 kernel where VNNI is
//!   missing), one 16-lane f32 accumulator over pairs of blocks; [`hsum`] at the end.
//!
//! Multi-token tiles (up to [`NR`] rows × [`NT`] tokens) keep one accumulator per
//! (token, row) pair and load each weight vector once per tile.
//!
//! `axpy_rows` (one block of rows; the caller sums blocks in order): per output element
//! `y = fma(a[j], w[j], y)` for j ascending, with quantized weights dequantized as `d · q`
//! (one rounding, as the scalar oracle does).

use std::arch::x86_64::*;

use super::{prefetch, Acts, MatRef, WeightsRef};
use crate::dispatch::Isa;
use crate::quant::{LANE, QK};

const LANES: usize = 16;
/// Rows per tile.
const NR: usize = 4;
/// Tokens per tile.
const NT: usize = 4;

/// Tokens × vectors of `y` the several-token `axpy` keeps in registers (16 accumulators,
/// 4 weight vectors and a broadcast of the 32 registers).
const AXPY_TG: usize = 4;
const AXPY_CV: usize = 4;

/// Software prefetch distance in row tiles: the next tile's rows, at the column being read
/// (measured with `kbench` on the Intel dev VM, 1.5 GB sets: one tile ahead beat 2, 3 and 4
/// by 2–5% for the one-token matvec and ~15% for 8-token q8; no prefetch lost 15–20%). One
/// token over q8 / q4 row tiles goes without with [`crate::dispatch::Streaming::Sequential`]
/// (AMD).
const PREFETCH_TILES: usize = 1;

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

/// bf16 weights `i .. i + 32` of `p` as f32: the odd elements, then the even ones (a
/// bf16 is the high half of an f32, so the odd ones only need their low half cleared).
///
/// # Safety
/// `p` must point to at least `i + 32` readable bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load_bf16_halves(p: *const u8, i: usize) -> (__m512, __m512) {
    // SAFETY: the caller guarantees elements i..i+32 are readable; the load is unaligned.
    unsafe {
        let v = _mm512_loadu_si512((p as *const u16).add(i) as *const __m512i);
        let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000_u32 as i32));
        (_mm512_castsi512_ps(odd), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)))
    }
}

/// Puts each full chunk of 32 values of `y[..n]` (`n` a multiple of 32) into odd/even order:
/// its odd elements, then its even ones (the order [`load_bf16_halves`] gives weights in).
///
/// # Safety
/// `y` points to `n` readable and writable f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn to_odd_even(y: *mut f32, n: usize) {
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mut c = 0;
    while c < n {
        // SAFETY: c + 32 <= n.
        unsafe {
            let (lo, hi) = (_mm512_loadu_ps(y.add(c)), _mm512_loadu_ps(y.add(c + 16)));
            _mm512_storeu_ps(y.add(c), _mm512_permutex2var_ps(lo, odd, hi));
            _mm512_storeu_ps(y.add(c + 16), _mm512_permutex2var_ps(lo, even, hi));
        }
        c += 32;
    }
}

/// Undoes [`to_odd_even`].
///
/// # Safety
/// As [`to_odd_even`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn from_odd_even(y: *mut f32, n: usize) {
    // Natural element 2i is even[i] (index 16 + i of the pair), 2i + 1 is odd[i] (index i).
    let lo = _mm512_setr_epi32(16, 0, 17, 1, 18, 2, 19, 3, 20, 4, 21, 5, 22, 6, 23, 7);
    let hi = _mm512_setr_epi32(24, 8, 25, 9, 26, 10, 27, 11, 28, 12, 29, 13, 30, 14, 31, 15);
    let mut c = 0;
    while c < n {
        // SAFETY: c + 32 <= n.
        unsafe {
            let (o, e) = (_mm512_loadu_ps(y.add(c)), _mm512_loadu_ps(y.add(c + 16)));
            _mm512_storeu_ps(y.add(c), _mm512_permutex2var_ps(o, lo, e));
            _mm512_storeu_ps(y.add(c + 16), _mm512_permutex2var_ps(o, hi, e));
        }
        c += 32;
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

/// The block's 32 weights dequantized, `d · q` (q4: `d · (q − 8)`), each rounded once, as
/// 2 vectors.
///
/// # Safety
/// `p` points to one readable block of kind `Q`; `lut` is [`super::f16_table`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dequant_block<const Q: u8>(p: *const u8, lut: *const f32) -> [__m512; 2] {
    // SAFETY: the block is readable (caller); all loads are unaligned and within it
    // (q8: 2 + 2·16 = 34 bytes; q4: 2 + 16 = 18 bytes).
    unsafe {
        let d = block_scale(p, lut);
        let qs = p.add(2);
        if Q == Q_8 {
            let lo = _mm_loadu_si128(qs as *const __m128i);
            let hi = _mm_loadu_si128(qs.add(16) as *const __m128i);
            [
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo))),
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))),
            ]
        } else {
            // The table scaled once per block (the same products d · (q − 8)), then looked up:
            // each byte widened to a dword; vpermps looks only at the low 4 bits of each
            // index, so the low nibble indexes the table directly and the high nibble after a
            // shift by 4: no masking, no integer→float conversion, one multiply per block.
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i));
            let table = _mm512_mul_ps(d, nibble_table());
            [_mm512_permutexvar_ps(b, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), table)]
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

/// Blocks per step of the VNNI q4 kernel ([`crate::quant::group_q4_acts`]).
pub(super) const Q4_GROUP: usize = 4;

/// Whether the CPU has AVX-512 VNNI (`vpdpbusd`). Without it the AVX-512 path multiplies
/// quantized weights with the AVX2 integer kernel (same integer lanes, 8-lane sums).
pub(super) fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512vnni")
}

/// The 64 weights of blocks `pa` and `pb` (a pair, or the same block twice for an odd last
/// one) as unsigned bytes: q8 `q + 128`, q4 the stored nibble `q + 8`.
///
/// # Safety
/// `pa` and `pb` point to readable blocks of kind `Q`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn weight_bytes<const Q: u8>(pa: *const u8, pb: *const u8) -> __m512i {
    // SAFETY: unaligned loads inside the two blocks (q8: bytes 2..34, q4: bytes 2..18).
    unsafe {
        if Q == Q_8 {
            let lo = _mm256_loadu_si256(pa.add(2) as *const __m256i);
            let hi = _mm256_loadu_si256(pb.add(2) as *const __m256i);
            let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            _mm512_xor_si512(v, _mm512_set1_epi8(i8::MIN))
        } else {
            q4_pair_bytes(pa.add(2), pb.add(2))
        }
    }
}

/// The nibbles of two q4 blocks' weights (16 bytes each at `qa` and `qb`) as 64 unsigned
/// bytes in element order: 128-bit lanes [a, a, b, b], lanes 1 and 3 shifted right by 4
/// (the high nibbles, elements 16..32 of their block), then every byte masked to 4 bits.
///
/// # Safety
/// `qa` and `qb` point to 16 readable bytes each.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q4_pair_bytes(qa: *const u8, qb: *const u8) -> __m512i {
    // SAFETY: two 16-byte unaligned loads (caller).
    unsafe {
        let a = _mm_loadu_si128(qa as *const __m128i);
        let b = _mm_loadu_si128(qb as *const __m128i);
        let v =
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_set_m128i(a, a)), _mm256_set_m128i(b, b));
        let v = _mm512_mask_srli_epi16::<4>(v, 0xFF00_FF00, v);
        _mm512_and_si512(v, _mm512_set1_epi8(0x0f))
    }
}

/// Four q4 blocks at `p` (72 bytes): their stored nibbles, low ones (weights 0..16 of each
/// block, 16 bytes a block in block order) and high ones (weights 16..32), and each block's
/// scale in its four lanes (lanes 4k..4k + 4: block k).
///
/// # Safety
/// `p` points to four readable q4 blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q4_group(p: *const u8) -> (__m512i, __m512i, __m512) {
    // SAFETY: the loads stay inside the 72 bytes: quants at 2 + 18k .. 18 + 18k, and the
    // 64 bytes from p, which hold the scales at 18k (words 0, 9, 18, 27).
    unsafe {
        let v = _mm512_castsi128_si512(_mm_loadu_si128(p.add(2) as *const __m128i));
        let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(p.add(2 + Q4_BYTES) as *const __m128i));
        let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(p.add(2 + 2 * Q4_BYTES) as *const __m128i));
        let v = _mm512_inserti32x4::<3>(v, _mm_loadu_si128(p.add(2 + 3 * Q4_BYTES) as *const __m128i));
        let m = _mm512_set1_epi8(0x0f);
        let idx =
            _mm512_castsi256_si512(_mm256_setr_epi16(0, 0, 0, 0, 9, 9, 9, 9, 18, 18, 18, 18, 27, 27, 27, 27));
        let words = _mm512_permutexvar_epi16(idx, _mm512_loadu_epi8(p as *const i8));
        (
            _mm512_and_si512(v, m),
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), m),
            _mm512_cvtph_ps(_mm512_castsi512_si256(words)),
        )
    }
}

/// The scales of blocks `pa` (lanes 0..8) and `pb` (lanes 8..16) as f32.
///
/// # Safety
/// `pa` and `pb` point to readable blocks (the scale is their first two bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn pair_scales(pa: *const u8, pb: *const u8) -> __m512 {
    // SAFETY: two-byte unaligned reads at the start of readable blocks.
    unsafe {
        let a = _mm256_set1_epi16((pa as *const i16).read_unaligned());
        let b = _mm256_set1_epi16((pb as *const i16).read_unaligned());
        _mm512_cvtph_ps(_mm256_blend_epi32::<0xF0>(a, b))
    }
}

/// Integer dot products of `R` quantized rows with `T` tokens' quantized activations, two
/// blocks (64 weights) a step: weights as unsigned bytes ([`weight_bytes`]); per 32-bit lane
/// (four weights) `v = vpdpbusd(off, w, xq)` starting from the offset correction
/// `off = −128·Σxq` (q8) or `−8·Σxq` (q4), which is exact; then
/// `acc = fma(f32(v), dw · dx, acc)` with lanes 0..8 from the first block, 8..16 from the
/// second. An odd last block runs with the second half of the activations masked to zero.
///
/// # Safety
/// Each `w[r]` points to `nb` readable blocks of kind `Q`; `q` to `T` rows of `cols = nb · 32`
/// values, `ns` and `ls` to `T` rows of `cols / 4` (all at those strides).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
unsafe fn qdot_tile<const Q: u8, const R: usize, const T: usize>(
    q: *const i8,
    ns: *const i32,
    ls: *const f32,
    cols: usize,
    w: [*const u8; R],
    nb: usize,
    pf: usize,
) -> [[f32; R]; T] {
    let bytes = if Q == Q_8 { Q8_BYTES } else { Q4_BYTES };
    let g = cols / LANE;
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let mut b = 0;
    if Q == Q_4 {
        // Full groups of four blocks (activations grouped by `quant::group_q4_acts`): per
        // 32-bit lane the four low-nibble and four high-nibble products of one block, both
        // `vpdpbusd` into one sum, so one conversion and one FMA per 128 weights.
        let g16 = QK / 2;
        while b + Q4_GROUP <= nb {
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            let mut sc = [_mm512_setzero_ps(); R];
            // SAFETY: blocks b .. b + 4 of every row; prefetches never fault.
            unsafe {
                for r in 0..R {
                    let p = w[r].add(b * Q4_BYTES);
                    (lo[r], hi[r], sc[r]) = q4_group(p);
                    prefetch(w[r].wrapping_add(b * Q4_BYTES + pf));
                    prefetch(w[r].wrapping_add(b * Q4_BYTES + pf + 64));
                }
            }
            let lane = b / Q4_GROUP * g16;
            for t in 0..T {
                // SAFETY: values b·32 .. b·32 + 128 of token t, and its 16 grouped sums and
                // scales at lane b / 4 · 16 (inside the group's own 32).
                let (xl, xh, off, dx) = unsafe {
                    let xq = q.add(t * cols + b * QK);
                    (
                        _mm512_loadu_epi8(xq),
                        _mm512_loadu_epi8(xq.add(64)),
                        _mm512_slli_epi32::<3>(_mm512_loadu_epi32(ns.add(t * g + lane))),
                        _mm512_loadu_ps(ls.add(t * g + lane)),
                    )
                };
                for r in 0..R {
                    let v = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo[r], xl), hi[r], xh);
                    acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sc[r], dx), acc[t][r]);
                }
            }
            b += Q4_GROUP;
        }
    }
    if Q == Q_8 {
        // Four blocks (128 weights) a step: two vectors of two blocks' bytes, the four
        // scales from two 64-byte loads (one word permute, one conversion, two lane
        // spreads), so the per-block scale work is shared by four blocks instead of two.
        let idx = _mm512_castsi128_si512(_mm_setr_epi16(0, 17, 34, 51, 0, 0, 0, 0));
        let (lo2, hi2) = (
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
            _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        );
        let x80 = _mm512_set1_epi8(i8::MIN);
        while b + 4 <= nb {
            let mut wa = [_mm512_setzero_si512(); R];
            let mut wb = [_mm512_setzero_si512(); R];
            let mut sa = [_mm512_setzero_ps(); R];
            let mut sb = [_mm512_setzero_ps(); R];
            // SAFETY: blocks b .. b + 4 of every row (136 bytes from p; the two 64-byte
            // scale loads end at p + 128); prefetches never fault.
            unsafe {
                for r in 0..R {
                    let p = w[r].add(b * Q8_BYTES);
                    let a = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(p.add(2) as *const __m256i)),
                        _mm256_loadu_si256(p.add(2 + Q8_BYTES) as *const __m256i),
                    );
                    let c = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(p.add(2 + 2 * Q8_BYTES) as *const __m256i)),
                        _mm256_loadu_si256(p.add(2 + 3 * Q8_BYTES) as *const __m256i),
                    );
                    wa[r] = _mm512_xor_si512(a, x80);
                    wb[r] = _mm512_xor_si512(c, x80);
                    let words = _mm512_permutex2var_epi16(
                        _mm512_loadu_si512(p as *const __m512i),
                        idx,
                        _mm512_loadu_si512(p.add(64) as *const __m512i),
                    );
                    let d4 = _mm512_castps128_ps512(_mm_cvtph_ps(_mm512_castsi512_si128(words)));
                    sa[r] = _mm512_permutexvar_ps(lo2, d4);
                    sb[r] = _mm512_permutexvar_ps(hi2, d4);
                    prefetch(p.wrapping_add(pf));
                    prefetch(p.wrapping_add(pf + 64));
                    prefetch(p.wrapping_add(pf + 128));
                }
            }
            for t in 0..T {
                // SAFETY: values b·32 .. b·32 + 128 of token t, and its groups b·8 .. b·8 + 32.
                let (xa, xb, oa, ob, da, db) = unsafe {
                    let xq = q.add(t * cols + b * QK);
                    let n = ns.add(t * g + b * (QK / LANE));
                    let l = ls.add(t * g + b * (QK / LANE));
                    (
                        _mm512_loadu_epi8(xq),
                        _mm512_loadu_epi8(xq.add(64)),
                        _mm512_slli_epi32::<7>(_mm512_loadu_epi32(n)),
                        _mm512_slli_epi32::<7>(_mm512_loadu_epi32(n.add(16))),
                        _mm512_loadu_ps(l),
                        _mm512_loadu_ps(l.add(16)),
                    )
                };
                for r in 0..R {
                    let va = _mm512_dpbusd_epi32(oa, wa[r], xa);
                    let vb = _mm512_dpbusd_epi32(ob, wb[r], xb);
                    acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(va), _mm512_mul_ps(sa[r], da), acc[t][r]);
                    acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(vb), _mm512_mul_ps(sb[r], db), acc[t][r]);
                }
            }
            b += 4;
        }
    }
    while b < nb {
        let pair = b + 1 < nb;
        let mut wv = [_mm512_setzero_si512(); R];
        let mut sc = [_mm512_setzero_ps(); R];
        // SAFETY: blocks b (and b + 1 when `pair`) of every row; prefetches never fault.
        unsafe {
            for r in 0..R {
                let pa = w[r].add(b * bytes);
                let pb = if pair { pa.add(bytes) } else { pa };
                wv[r] = weight_bytes::<Q>(pa, pb);
                sc[r] = pair_scales(pa, pb);
                prefetch(w[r].wrapping_add(b * bytes + pf));
                prefetch(w[r].wrapping_add((b + 1) * bytes + pf));
            }
        }
        // An odd last block: only its 32 values, 8 sums and 8 scales (the rest zero).
        let (m8, m16): (u64, u16) = if pair { (!0, !0) } else { (0xFFFF_FFFF, 0x00FF) };
        for t in 0..T {
            // SAFETY: values b·32 .. b·32 + 64 (or + 32, masked) of token t, and groups
            // b·8 .. b·8 + 16 (or + 8) of its sums and scales; masked-off lanes are not read.
            let (xq, off, dx) = unsafe {
                let xq = _mm512_maskz_loadu_epi8(m8, q.add(t * cols + b * QK));
                let n = _mm512_maskz_loadu_epi32(m16, ns.add(t * g + b * (QK / LANE)));
                let off = if Q == Q_8 { _mm512_slli_epi32::<7>(n) } else { _mm512_slli_epi32::<3>(n) };
                (xq, off, _mm512_maskz_loadu_ps(m16, ls.add(t * g + b * (QK / LANE))))
            };
            for r in 0..R {
                let v = _mm512_dpbusd_epi32(off, wv[r], xq);
                acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sc[r], dx), acc[t][r]);
            }
        }
        b += 2;
    }
    let mut out = [[0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            out[t][r] = hsum(acc[t][r]);
        }
    }
    out
}

/// Integer dot products of the `R` rows of one q8 row tile ([`crate::row_tiles`]; `R` is
/// its row count) with `T` tokens: term by term and in order the products and sums of
/// [`qdot_tile`] over q8 rows (steps of four blocks, then pairs, then an odd last block),
/// so the same bits. Only the loads differ: a row's four blocks of a step are two 64-byte
/// loads of bytes stored already offset, and a step's scales, for all its rows, are one
/// load and one conversion.
///
/// # Safety
/// `tile` points to a readable tile of `R` rows of `nb` blocks; `q`, `ns`, `ls` as
/// [`qdot_tile`] takes them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
unsafe fn qdot_q8_row_tile<const R: usize, const T: usize>(
    q: *const i8,
    ns: *const i32,
    ls: *const f32,
    cols: usize,
    tile: *const u8,
    nb: usize,
    pf: usize,
) -> [[f32; R]; T] {
    let g = cols / LANE;
    let quants = tile.wrapping_add(2 * R * nb);
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let mut b = 0;
    // A step's scales in lanes 4r + k (row r, block k); row r's pairs of blocks spread to
    // eight lanes each.
    let scale_mask = ((1u32 << (4 * R)) - 1) as u16;
    let spread = |k0: i32, r: usize| {
        let k = k0 + 4 * r as i32;
        _mm512_setr_epi32(k, k, k, k, k, k, k, k, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1)
    };
    let mut lo2 = [_mm512_setzero_si512(); R];
    let mut hi2 = [_mm512_setzero_si512(); R];
    for r in 0..R {
        (lo2[r], hi2[r]) = (spread(0, r), spread(2, r));
    }
    while b + 4 <= nb {
        // The step's first unit (row 0, block b).
        let u0 = b * R;
        let mut wa = [_mm512_setzero_si512(); R];
        let mut wb = [_mm512_setzero_si512(); R];
        let mut sa = [_mm512_setzero_ps(); R];
        let mut sb = [_mm512_setzero_ps(); R];
        // SAFETY: the step's 4R scales at byte 2·u0 and its 4R units at quants + 32·u0 lie
        // inside the tile (caller); prefetches never fault.
        unsafe {
            let d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(scale_mask, tile.add(2 * u0) as *const i16));
            if pf != 0 {
                prefetch(tile.wrapping_add(2 * u0 + pf));
            }
            for r in 0..R {
                let p = quants.add(QK * (u0 + 4 * r));
                wa[r] = _mm512_loadu_si512(p as *const __m512i);
                wb[r] = _mm512_loadu_si512(p.add(64) as *const __m512i);
                sa[r] = _mm512_permutexvar_ps(lo2[r], d);
                sb[r] = _mm512_permutexvar_ps(hi2[r], d);
                if pf != 0 {
                    prefetch(p.wrapping_add(pf));
                    prefetch(p.wrapping_add(pf + 64));
                }
            }
        }
        for t in 0..T {
            // SAFETY: values b·32 .. b·32 + 128 of token t, and its groups b·8 .. b·8 + 32.
            let (xa, xb, oa, ob, da, db) = unsafe {
                let xq = q.add(t * cols + b * QK);
                let n = ns.add(t * g + b * (QK / LANE));
                let l = ls.add(t * g + b * (QK / LANE));
                (
                    _mm512_loadu_epi8(xq),
                    _mm512_loadu_epi8(xq.add(64)),
                    _mm512_slli_epi32::<7>(_mm512_loadu_epi32(n)),
                    _mm512_slli_epi32::<7>(_mm512_loadu_epi32(n.add(16))),
                    _mm512_loadu_ps(l),
                    _mm512_loadu_ps(l.add(16)),
                )
            };
            for r in 0..R {
                let va = _mm512_dpbusd_epi32(oa, wa[r], xa);
                let vb = _mm512_dpbusd_epi32(ob, wb[r], xb);
                acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(va), _mm512_mul_ps(sa[r], da), acc[t][r]);
                acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(vb), _mm512_mul_ps(sb[r], db), acc[t][r]);
            }
        }
        b += 4;
    }
    // The last step's m < 4 blocks: row r's block b + k is unit b·R + r·m + k.
    let m = nb - b;
    let mut k = 0;
    while k < m {
        let pair = k + 1 < m;
        let mut wv = [_mm512_setzero_si512(); R];
        let mut sc = [_mm512_setzero_ps(); R];
        // SAFETY: units of the last step, inside the tile (caller).
        unsafe {
            for r in 0..R {
                let u = b * R + r * m + k;
                let pa = quants.add(QK * u);
                wv[r] = if pair {
                    _mm512_loadu_si512(pa as *const __m512i)
                } else {
                    let lo = _mm256_loadu_si256(pa as *const __m256i);
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), lo)
                };
                sc[r] = pair_scales(tile.add(2 * u), tile.add(2 * (u + pair as usize)));
            }
        }
        let bk = b + k;
        let (m8, m16): (u64, u16) = if pair { (!0, !0) } else { (0xFFFF_FFFF, 0x00FF) };
        for t in 0..T {
            // SAFETY: as in qdot_tile's pair loop, for block bk.
            let (xq, off, dx) = unsafe {
                let xq = _mm512_maskz_loadu_epi8(m8, q.add(t * cols + bk * QK));
                let n = _mm512_maskz_loadu_epi32(m16, ns.add(t * g + bk * (QK / LANE)));
                (xq, _mm512_slli_epi32::<7>(n), _mm512_maskz_loadu_ps(m16, ls.add(t * g + bk * (QK / LANE))))
            };
            for r in 0..R {
                let v = _mm512_dpbusd_epi32(off, wv[r], xq);
                acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sc[r], dx), acc[t][r]);
            }
        }
        k += 2;
    }
    let mut out = [[0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            out[t][r] = hsum(acc[t][r]);
        }
    }
    out
}

/// [`qdot_q8_row_tile`] for a q4 row tile: term by term and in order the products and sums
/// of [`qdot_tile`] over q4 rows (groups of four blocks against activations grouped by
/// `quant::group_q4_acts`, then pairs, then an odd last block). A row's four blocks of a
/// step are one 64-byte load; the step's scales, for all its rows, one load and one
/// conversion, spread per row by one permute.
///
/// # Safety
/// As [`qdot_q8_row_tile`], for a q4 tile.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
unsafe fn qdot_q4_row_tile<const R: usize, const T: usize>(
    q: *const i8,
    ns: *const i32,
    ls: *const f32,
    cols: usize,
    tile: *const u8,
    nb: usize,
    pf: usize,
) -> [[f32; R]; T] {
    let g = cols / LANE;
    let g16 = QK / 2;
    let qb = QK / 2;
    let quants = tile.wrapping_add(2 * R * nb);
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let scale_mask = ((1u32 << (4 * R)) - 1) as u16;
    let nib = _mm512_set1_epi8(0x0f);
    // Row r's four scales of a step, each in four lanes (lanes 4k..4k + 4: block k).
    let mut spread = [_mm512_setzero_si512(); R];
    for (r, s) in spread.iter_mut().enumerate() {
        let k = 4 * r as i32;
        *s = _mm512_setr_epi32(
            k,
            k,
            k,
            k,
            k + 1,
            k + 1,
            k + 1,
            k + 1,
            k + 2,
            k + 2,
            k + 2,
            k + 2,
            k + 3,
            k + 3,
            k + 3,
            k + 3,
        );
    }
    let mut b = 0;
    while b + Q4_GROUP <= nb {
        let u0 = b * R;
        let mut lo = [_mm512_setzero_si512(); R];
        let mut hi = [_mm512_setzero_si512(); R];
        let mut sc = [_mm512_setzero_ps(); R];
        // SAFETY: the step's 4R scales at byte 2·u0 and its 4R units at quants + 16·u0 lie
        // inside the tile (caller); prefetches never fault.
        unsafe {
            let d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(scale_mask, tile.add(2 * u0) as *const i16));
            if pf != 0 {
                prefetch(tile.wrapping_add(2 * u0 + pf));
            }
            for r in 0..R {
                let p = quants.add(qb * (u0 + 4 * r));
                let v = _mm512_loadu_si512(p as *const __m512i);
                lo[r] = _mm512_and_si512(v, nib);
                hi[r] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                sc[r] = _mm512_permutexvar_ps(spread[r], d);
                if pf != 0 {
                    prefetch(p.wrapping_add(pf));
                }
            }
        }
        let lane = b / Q4_GROUP * g16;
        for t in 0..T {
            // SAFETY: as in qdot_tile's q4 groups.
            let (xl, xh, off, dx) = unsafe {
                let xq = q.add(t * cols + b * QK);
                (
                    _mm512_loadu_epi8(xq),
                    _mm512_loadu_epi8(xq.add(64)),
                    _mm512_slli_epi32::<3>(_mm512_loadu_epi32(ns.add(t * g + lane))),
                    _mm512_loadu_ps(ls.add(t * g + lane)),
                )
            };
            for r in 0..R {
                let v = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo[r], xl), hi[r], xh);
                acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sc[r], dx), acc[t][r]);
            }
        }
        b += Q4_GROUP;
    }
    // The last step's m < 4 blocks: row r's block b + k is unit b·R + r·m + k.
    let m = nb - b;
    let mut k = 0;
    while k < m {
        let pair = k + 1 < m;
        let mut wv = [_mm512_setzero_si512(); R];
        let mut sc = [_mm512_setzero_ps(); R];
        // SAFETY: units of the last step, inside the tile (caller).
        unsafe {
            for r in 0..R {
                let u = b * R + r * m + k;
                let ub = u + pair as usize;
                wv[r] = q4_pair_bytes(quants.add(qb * u), quants.add(qb * ub));
                sc[r] = pair_scales(tile.add(2 * u), tile.add(2 * ub));
            }
        }
        let bk = b + k;
        let (m8, m16): (u64, u16) = if pair { (!0, !0) } else { (0xFFFF_FFFF, 0x00FF) };
        for t in 0..T {
            // SAFETY: as in qdot_tile's pair loop, for block bk.
            let (xq, off, dx) = unsafe {
                let xq = _mm512_maskz_loadu_epi8(m8, q.add(t * cols + bk * QK));
                let n = _mm512_maskz_loadu_epi32(m16, ns.add(t * g + bk * (QK / LANE)));
                (xq, _mm512_slli_epi32::<3>(n), _mm512_maskz_loadu_ps(m16, ls.add(t * g + bk * (QK / LANE))))
            };
            for r in 0..R {
                let v = _mm512_dpbusd_epi32(off, wv[r], xq);
                acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sc[r], dx), acc[t][r]);
            }
        }
        k += 2;
    }
    let mut out = [[0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            out[t][r] = hsum(acc[t][r]);
        }
    }
    out
}

/// Row tiles ([`crate::row_tiles`]): [`qdot_q8_row_tile`] / [`qdot_q4_row_tile`] with VNNI,
/// otherwise each tile copied back to rows ([`super::untiled`]).
fn row_tiles(x: Acts<'_>, n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
    if !has_vnni() {
        return super::untiled(matmul, x, n_tokens, w, y, y_stride);
    }
    // SAFETY: VNNI checked just above, the other features by `matmul`; shapes as `matmul`
    // asserted them.
    unsafe {
        match w.data {
            WeightsRef::Q8Tiles(_) => row_tiles_vnni::<Q_8>(x, n_tokens, w, y, y_stride),
            _ => row_tiles_vnni::<Q_4>(x, n_tokens, w, y, y_stride),
        }
    }
}

/// The walk of [`row_tiles`]: tile by tile, four tokens at a time, then one.
///
/// # Safety
/// As [`matmul_impl`], with VNNI; `w` holds row tiles of kind `Q`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,avx512vnni")]
unsafe fn row_tiles_vnni<const Q: u8>(
    x: Acts<'_>,
    n_tokens: usize,
    w: MatRef<'_>,
    y: &mut [f32],
    y_stride: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    let (base, block_bytes, _) = raw(&w);
    let nb = cols / QK;
    let g = cols / LANE;
    // 0: no software prefetches (one token on a CPU whose stream prefetcher does better).
    let pf = if n_tokens == 1 && crate::dispatch::streaming() == crate::dispatch::Streaming::Sequential {
        0
    } else {
        PREFETCH_TILES * NR * nb * block_bytes
    };
    let (q, ns, ls) = (x.q.as_ptr(), x.neg_sums.as_ptr(), x.scales.as_ptr());
    macro_rules! run {
        ($r:literal, $t:literal, $r0:expr, $t0:expr) => {{
            // SAFETY: the tile of rows r0 .. r0 + R starts at byte r0 · nb · B (row tiles;
            // R is its row count); tokens t0 .. t0 + T have their quantized activations
            // (matmul asserted them).
            let out = unsafe {
                let (qt, nt, lt, tile) =
                    (q.add($t0 * cols), ns.add($t0 * g), ls.add($t0 * g), base.add($r0 * nb * block_bytes));
                if Q == Q_8 {
                    qdot_q8_row_tile::<$r, $t>(qt, nt, lt, cols, tile, nb, pf)
                } else {
                    qdot_q4_row_tile::<$r, $t>(qt, nt, lt, cols, tile, nb, pf)
                }
            };
            for t in 0..$t {
                for r in 0..$r {
                    y[($t0 + t) * y_stride + $r0 + r] = out[t][r];
                }
            }
        }};
    }
    let tok_full = n_tokens / NT * NT;
    let mut r0 = 0;
    while r0 < rows {
        let rt = NR.min(rows - r0);
        let mut t0 = 0;
        if rt == NR {
            while t0 < tok_full {
                run!(4, 4, r0, t0);
                t0 += NT;
            }
            // The last two or three tokens as one tile (same bits: each dot product alone).
            match n_tokens - t0 {
                3 => run!(4, 3, r0, t0),
                2 => run!(4, 2, r0, t0),
                _ => {}
            }
            if n_tokens - t0 >= 2 {
                t0 = n_tokens;
            }
        }
        while t0 < n_tokens {
            match rt {
                4 => run!(4, 1, r0, t0),
                3 => run!(3, 1, r0, t0),
                2 => run!(2, 1, r0, t0),
                _ => run!(1, 1, r0, t0),
            }
            t0 += 1;
        }
        r0 += rt;
    }
}

/// # Safety
/// As [`matmul_impl`]; `K` matches the weight type of `w`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tiles<const K: u8, const QUANT: bool>(
    x: Acts<'_>,
    n_tokens: usize,
    w: MatRef<'_>,
    y: &mut [f32],
    y_stride: usize,
) {
    if QUANT && !has_vnni() {
        // SAFETY: AVX-512 implies AVX2/FMA/F16C (dispatch checks both); same contract.
        return unsafe { super::avx2::tiles::<K, true>(x, n_tokens, w, y, y_stride) };
    }
    let (rows, cols) = (w.rows, w.cols);
    let (base, unit_bytes, unit_elems) = raw(&w);
    let row_bytes = w.stride / unit_elems * unit_bytes;
    let nb = cols / QK;
    let g = cols / LANE;
    let xp = x.x.as_ptr();
    // Software prefetch distance: the rows PREFETCH_TILES tiles ahead (rows are too short
    // for the hardware prefetchers to ramp up on four interleaved streams). Dense rows get
    // one prefetch per 64 bytes; quantized rows one per block (measured faster than a
    // branch on line crossings).
    let one_token = super::common::one_token_rows(n_tokens, QUANT, K == Q_8);
    let pf = if one_token.is_some() {
        super::common::one_token_prefetch(row_bytes)
    } else {
        PREFETCH_TILES * NR * row_bytes
    };
    macro_rules! run {
        ($r:literal, $t:literal, $r0:expr, $t0:expr) => {{
            // SAFETY: rows r0 .. r0 + R <= rows start at base + r · row_bytes and hold cols
            // elements (MatRef invariant); tokens t0 .. t0 + T <= n_tokens have cols f32 in x
            // and, for quantized weights, cols values and cols / 4 sums and scales (matmul
            // asserts it).
            let out = unsafe {
                let mut wp = [base; $r];
                for i in 0..$r {
                    wp[i] = base.add(($r0 + i) * row_bytes);
                }
                let xt = xp.add($t0 * cols);
                if QUANT {
                    let (q, ns, ls) = (x.q.as_ptr(), x.neg_sums.as_ptr(), x.scales.as_ptr());
                    qdot_tile::<K, $r, $t>(
                        q.add($t0 * cols),
                        ns.add($t0 * g),
                        ls.add($t0 * g),
                        cols,
                        wp,
                        nb,
                        pf,
                    )
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
    if let Some(per) = one_token {
        super::common::one_token_walk!(run, rows, per);
        return;
    }
    // The last two or three tokens as one tile: a prefill's experts get any number of
    // tokens, and single-token tiles ran at under half the FMA rate.
    super::common::tile_walk!(run, rows, n_tokens, 4, 4, [3, 2]);
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
