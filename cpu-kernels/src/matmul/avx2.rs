//! AVX2 + FMA + F16C kernels (8 f32 lanes).
//!
//! Reduction pattern of one dot product `Σ_c x[c]·w[c]` (the same whatever tile it is
//! computed in, so results never depend on how tokens or rows are grouped):
//! * dense weights (f32 / bf16 / f16): one 8-lane accumulator, `acc = fma(x[c..c+8],
//!   w[c..c+8], acc)` over the full chunks in column order, then the last `cols % 8`
//!   columns as one zero-padded chunk, then [`hsum`];
//! * quantized weights (q8 / q4, blocks of 32): integer dot products with the activations
//!   quantized to 8 bits ([`qdot_tile`]), one 8-lane f32 accumulator over the blocks in
//!   order; [`hsum`] at the end.
//!
//! Multi-token tiles (4 rows × 2 tokens; bf16 rows 2 × 4, see `tiles`) keep one
//! accumulator per (token, row) pair and load each weight vector once per tile.
//!
//! `axpy_rows` (one block of rows; the caller sums blocks in order): per output element
//! `y = fma(a[j], w[j], y)` for j ascending, with quantized weights dequantized as `d · q`
//! (one rounding, as the scalar oracle does).

use std::arch::x86_64::*;

use super::{prefetch, Acts, MatRef, WeightsRef};
use crate::dispatch::Isa;
use crate::quant::{LANE as LANE_GROUP, QK};

const LANES: usize = 8;
/// Rows per tile (the several-token walk in `tiles` spells its tile sizes out: they are
/// const generic arguments).
const NR: usize = 4;

/// Tokens × vectors of `y` the several-token `axpy` keeps in registers (8 accumulators,
/// 2 weight vectors and a broadcast of the 16 registers).
const AXPY_TG: usize = 4;
const AXPY_CV: usize = 2;

/// Software prefetch distance in row tiles: the next tile's rows, at the column being read
/// (measured with `kbench`, 1.5 GB sets: one tile ahead beat 2, 3 and 4 by 2–5% for the
/// one-token matvec and ~15% for 8-token q8; no prefetch lost 15–20%).
const PREFETCH_TILES: usize = 1;

const DT_F32: u8 = 0;
const DT_BF16: u8 = 1;
const DT_F16: u8 = 2;
const Q_8: u8 = 0;
const Q_4: u8 = 1;
const Q8_BYTES: usize = 2 + QK;
const Q4_BYTES: usize = 2 + QK / 2;

/// Horizontal sum in a fixed order: (lo128 + hi128), then pairs, then the last two.
/// Shared with the AVX2 attention kernel.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// 8 weights of type `DT` at element `i` of `p`, as f32.
///
/// # Safety
/// `p` must point to at least `i + 8` readable elements of type `DT`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_dense<const DT: u8>(p: *const u8, i: usize) -> __m256 {
    // SAFETY: the caller guarantees elements i..i+8 are readable; loads are unaligned.
    unsafe {
        match DT {
            DT_F32 => _mm256_loadu_ps((p as *const f32).add(i)),
            DT_BF16 => {
                let h = _mm_loadu_si128((p as *const u16).add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(i) as *const __m128i)),
        }
    }
}

/// bf16 weights `i .. i + 16` of `p` as f32: the odd elements, then the even ones (a
/// bf16 is the high half of an f32, so the odd ones only need their low half cleared).
///
/// # Safety
/// `p` must point to at least `i + 16` readable bf16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_bf16_halves(p: *const u8, i: usize) -> (__m256, __m256) {
    // SAFETY: the caller guarantees elements i..i+16 are readable; the load is unaligned.
    unsafe {
        let v = _mm256_loadu_si256((p as *const u16).add(i) as *const __m256i);
        let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
        (_mm256_castsi256_ps(odd), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)))
    }
}

/// Puts each full chunk of 16 values of `y[..n]` (`n` a multiple of 16) into odd/even order:
/// its odd elements, then its even ones (the order [`load_bf16_halves`] gives weights in).
///
/// # Safety
/// `y` points to `n` readable and writable f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn to_odd_even(y: *mut f32, n: usize) {
    let mut c = 0;
    while c < n {
        // SAFETY: c + 16 <= n.
        unsafe {
            let (lo, hi) = (_mm256_loadu_ps(y.add(c)), _mm256_loadu_ps(y.add(c + 8)));
            // Within 128-bit lanes: [lo1 lo3 hi1 hi3 | lo5 lo7 hi5 hi7]; then 64-bit order 0 2 1 3.
            let odd = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi),
            )));
            let even = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi),
            )));
            _mm256_storeu_ps(y.add(c), odd);
            _mm256_storeu_ps(y.add(c + 8), even);
        }
        c += 16;
    }
}

/// Undoes [`to_odd_even`].
///
/// # Safety
/// As [`to_odd_even`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn from_odd_even(y: *mut f32, n: usize) {
    let mut c = 0;
    while c < n {
        // SAFETY: c + 16 <= n.
        unsafe {
            let (o, e) = (_mm256_loadu_ps(y.add(c)), _mm256_loadu_ps(y.add(c + 8)));
            let (l, h) = (_mm256_unpacklo_ps(e, o), _mm256_unpackhi_ps(e, o));
            _mm256_storeu_ps(y.add(c), _mm256_permute2f128_ps::<0x20>(l, h));
            _mm256_storeu_ps(y.add(c + 8), _mm256_permute2f128_ps::<0x31>(l, h));
        }
        c += 16;
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
/// 4 vectors.
///
/// # Safety
/// `p` points to one readable block of kind `Q`; `lut` is [`super::f16_table`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_block<const Q: u8>(p: *const u8, lut: *const f32) -> [__m256; 4] {
    // SAFETY: the block is readable (caller); all loads are unaligned and within it
    // (q8: 2 + 4·8 = 34 bytes; q4: 2 + 16 = 18 bytes).
    unsafe {
        let d = block_scale(p, lut);
        let qs = p.add(2);
        let q = if Q == Q_8 {
            let mut v = [_mm256_setzero_ps(); 4];
            for k in 0..4 {
                v[k] = i8x8(_mm_loadl_epi64(qs.add(8 * k) as *const __m128i));
            }
            v
        } else {
            // Minus 8 as signed bytes (two subtractions per block, not four on wide lanes).
            let (lo, hi) = q4_signed(_mm_loadu_si128(qs as *const __m128i));
            [i8x8(lo), i8x8(_mm_srli_si128::<8>(lo)), i8x8(hi), i8x8(_mm_srli_si128::<8>(hi))]
        };
        q.map(|v| _mm256_mul_ps(d, v))
    }
}

/// A q4 block's 16 quant bytes as signed weights `nibble − 8`: weights 0..16 (low
/// nibbles) and 16..32 (high nibbles).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_signed(b: __m128i) -> (__m128i, __m128i) {
    let (m, eight) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
    (_mm_sub_epi8(_mm_and_si128(b, m), eight), _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(b), m), eight))
}

/// The low 8 bytes of `h` (signed) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8x8(h: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h))
}

/// The scale of the block at `p`, broadcast, through the f16→f32 table (a load that the
/// FMA can take as a broadcast operand; cheaper than a vector conversion per block).
///
/// # Safety
/// `p` points to a readable block; `lut` is [`super::f16_table`] (65536 entries).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_scale(p: *const u8, lut: *const f32) -> __m256 {
    // SAFETY: the scale is the block's first two bytes; every u16 indexes the table.
    unsafe { _mm256_set1_ps(*lut.add((p as *const u16).read_unaligned() as usize)) }
}

/// The block's 32 weights as signed bytes: q8 `q`, q4 `nibble − 8`.
///
/// # Safety
/// `p` points to one readable block of kind `Q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weight_bytes<const Q: u8>(p: *const u8) -> __m256i {
    // SAFETY: unaligned loads inside the block (q8: bytes 2..34, q4: bytes 2..18).
    unsafe {
        if Q == Q_8 {
            _mm256_loadu_si256(p.add(2) as *const __m256i)
        } else {
            let (lo, hi) = q4_signed(_mm_loadu_si128(p.add(2) as *const __m128i));
            _mm256_set_m128i(hi, lo)
        }
    }
}

/// Blocks per step of the q4 kernel ([`crate::quant::group_q4_acts`]).
pub(super) const Q4_GROUP: usize = 2;

/// Two q4 blocks at `p` (36 bytes) as their unsigned nibbles (`q + 8`, 0..16): the low
/// nibbles (weights 0..16 of each block, block order) and the high ones (weights 16..32),
/// and each block's scale in its four lanes (lanes 4k..4k + 4: block k).
///
/// # Safety
/// `p` points to two readable q4 blocks; `lut` is [`super::f16_table`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_pair(p: *const u8, lut: *const f32) -> (__m256i, __m256i, __m256) {
    // SAFETY: quants at 2..18 and 20..36, scales at 0 and 18, all inside the two blocks.
    unsafe {
        let v = _mm256_loadu2_m128i(p.add(2 + Q4_BYTES) as *const __m128i, p.add(2) as *const __m128i);
        let m = _mm256_set1_epi8(0x0f);
        let sa = _mm_set1_ps(*lut.add((p as *const u16).read_unaligned() as usize));
        let sb = _mm_set1_ps(*lut.add((p.add(Q4_BYTES) as *const u16).read_unaligned() as usize));
        (_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16::<4>(v), m), _mm256_set_m128(sb, sa))
    }
}

/// Integer dot products of `R` quantized rows with `T` tokens' quantized activations, a
/// block at a time: per 32-bit lane (four weights) `v = Σ w·xq` exactly, through the sign
/// trick (`pmaddubsw(|xq|, sign(w, xq))`, which cannot saturate as `|w|, |xq| ≤ 127`,
/// then `pmaddwd` with ones), then `acc = fma(f32(v), dw · dx, acc)`; [`hsum`] at the end.
/// q8 lanes hold the same integers as the AVX-512 VNNI kernel's; q4 takes pairs of blocks
/// first ([`Q4_GROUP`]), eight products per lane.
///
/// # Safety
/// Each `w[r]` points to `nb` readable blocks of kind `Q`; `q` to `T` rows of
/// `cols = nb · 32` values, `ns` and `ls` to `T` rows of `cols / 4` sums and scales (at
/// those strides); `lut` is [`super::f16_table`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn qdot_tile<const Q: u8, const R: usize, const T: usize>(
    q: *const i8,
    ns: *const i32,
    ls: *const f32,
    cols: usize,
    w: [*const u8; R],
    nb: usize,
    pf: usize,
    lut: *const f32,
) -> [[f32; R]; T] {
    let bytes = if Q == Q_8 { Q8_BYTES } else { Q4_BYTES };
    let g = cols / LANE_GROUP;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); R]; T];
    let mut b = 0;
    if Q == Q_4 {
        // Pairs of blocks (activations grouped by `quant::group_q4_acts`): per 32-bit lane
        // the four low-nibble and four high-nibble products of one block. The nibbles enter
        // `pmaddubsw` as they are stored, unsigned (`q + 8`), against the signed activations
        // (pair sums at most 2 · 15 · 127, two of them added before `pmaddwd`: no
        // saturation); the lane's `8 · Σ xq` comes off as `8 · neg_sums`, so the integer sum
        // is exactly `Σ q · xq` without the sign trick's two `abs` and two `sign` per row
        // and token. One `pmaddwd`, one conversion and one FMA serve 64 weights.
        while b + Q4_GROUP <= nb {
            let lane = b / Q4_GROUP * (Q4_GROUP * LANE_GROUP);
            // SAFETY: token t's 8 grouped sums at lane b / 2 · 8 (inside the pair's own 16).
            let off: [__m256i; T] = std::array::from_fn(|t| unsafe {
                _mm256_slli_epi32::<3>(_mm256_loadu_si256(ns.add(t * g + lane) as *const __m256i))
            });
            // Row by row (16 registers do not hold every row's weights and every token's
            // activations at once); the activations are L1 loads.
            for r in 0..R {
                // SAFETY: blocks b, b + 1 of row r; prefetches never fault.
                let (lo, hi, sc) = unsafe {
                    let p = w[r].add(b * Q4_BYTES);
                    prefetch(w[r].wrapping_add(b * Q4_BYTES + pf));
                    q4_pair(p, lut)
                };
                for t in 0..T {
                    // SAFETY: values b·32 .. b·32 + 64 of token t and its 8 grouped scales
                    // at lane b / 2 · 8 (inside the pair's own 16).
                    let (xl, xh, dx) = unsafe {
                        let xq = q.add(t * cols + b * QK);
                        (
                            _mm256_loadu_si256(xq as *const __m256i),
                            _mm256_loadu_si256(xq.add(32) as *const __m256i),
                            _mm256_loadu_ps(ls.add(t * g + lane)),
                        )
                    };
                    let s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                    let v = _mm256_add_epi32(_mm256_madd_epi16(s, ones), off[t]);
                    acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(sc, dx), acc[t][r]);
                }
            }
            b += Q4_GROUP;
        }
    }
    for b in b..nb {
        let mut wv = [_mm256_setzero_si256(); R];
        let mut sc = [_mm256_setzero_ps(); R];
        // SAFETY: block b of every row; prefetches never fault.
        unsafe {
            for r in 0..R {
                let p = w[r].add(b * bytes);
                wv[r] = weight_bytes::<Q>(p);
                sc[r] = block_scale(p, lut);
                prefetch(w[r].wrapping_add(b * bytes + pf));
            }
        }
        for t in 0..T {
            // SAFETY: values b·32 .. b·32 + 32 of token t and scales b·8 .. b·8 + 8.
            let (xq, dx) = unsafe {
                (
                    _mm256_loadu_si256(q.add(t * cols + b * QK) as *const __m256i),
                    _mm256_loadu_ps(ls.add(t * g + b * (QK / LANE_GROUP))),
                )
            };
            let ax = _mm256_abs_epi8(xq);
            for r in 0..R {
                let v = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], xq)), ones);
                acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(sc[r], dx), acc[t][r]);
            }
        }
    }
    let mut out = [[0f32; R]; T];
    for t in 0..T {
        for r in 0..R {
            out[t][r] = hsum(acc[t][r]);
        }
    }
    out
}

/// Row tiles: no tiled kernel here; each tile is copied back to rows
/// ([`super::untiled`]).
fn row_tiles(x: Acts<'_>, n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
    super::untiled(matmul, x, n_tokens, w, y, y_stride)
}

/// # Safety
/// As [`matmul_impl`]; `K` matches the weight type of `w`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiles<const K: u8, const QUANT: bool>(
    x: Acts<'_>,
    n_tokens: usize,
    w: MatRef<'_>,
    y: &mut [f32],
    y_stride: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    let (base, unit_bytes, unit_elems) = raw(&w);
    let row_bytes = w.stride / unit_elems * unit_bytes;
    let nb = cols / QK;
    let g = cols / LANE_GROUP;
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
    let lut = super::f16_table().as_ptr();
    macro_rules! run {
        ($r:literal, $t:literal, $r0:expr, $t0:expr) => {{
            // SAFETY: rows r0 .. r0 + R <= rows start at base + r · row_bytes and hold cols
            // elements (MatRef invariant); tokens t0 .. t0 + T <= n_tokens have cols f32 in x
            // and, for quantized weights, cols values and cols / 4 scales (matmul asserts it).
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
                        lut,
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
    if !QUANT && K == DT_BF16 {
        // bf16 splits each chunk into odd and even halves: a 4 × 2 tile would need 18 of
        // the 16 registers (8 sums, 8 weight halves, 2 activations) and spill; 2 × 4 needs
        // 14 (each dot product is computed alone either way: same bits).
        super::common::tile_walk!(run, rows, n_tokens, 2, 4, [3, 2]);
    } else {
        super::common::tile_walk!(run, rows, n_tokens, 4, 2, []);
    }
}

super::common::simd_kernels! {
    feat: "avx2,fma,f16c",
    isa: Isa::Avx2,
    isa_msg: "AVX2 kernel called on a CPU without AVX2/FMA/F16C",
    quant_vectors: 4,
    load: _mm256_loadu_ps,
    store: _mm256_storeu_ps,
    fma: _mm256_fmadd_ps,
    set1: _mm256_set1_ps,
    setzero: _mm256_setzero_ps,
    mul: _mm256_mul_ps,
}
