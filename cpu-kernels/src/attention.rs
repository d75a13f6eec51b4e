//! Causal (optionally sliding-window) grouped-query attention over a KV cache held in f32
//! or bf16, token-major or head-major ([`KvLayout`]).
//!
//! Each (query, head) output is computed by one task: scores `q·k_j` for the visible keys
//! in ascending j (one dot product each, with the ISA's fixed reduction pattern), a
//! softmax, then `o = Σ_j p_j · v_j` in ascending j. With several queries (prefill) a task
//! takes a block of 8 queries × the heads sharing one KV head and walks the keys once for
//! all of them (each key and value row read from L1), with the same operations per output.
//! Nothing depends on how many queries are in the call, on the thread count or on the
//! cache's layout, so prefill and decode give the same bits for a position. On AVX2 and
//! AVX-512 CPUs the dot products use AVX2 (8 lanes, fixed horizontal sum) and the `v`
//! accumulation one FMA per key and element (AVX-512: four heads at a time, the same
//! bits); the scalar path is the oracle.

use half::bf16;

use crate::dispatch::{active_isa, Isa};
use crate::parallel::SyncPtr;
use crate::softmax::softmax_inplace;

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q · k` before the softmax (`head_dim^-0.5`).
    pub scale: f32,
    /// Query at position p sees keys `p - w < j <= p` when set.
    pub window: Option<usize>,
}

/// A KV cache tensor `[n_positions, n_kv_heads * head_dim]`.
#[derive(Debug, Clone, Copy)]
pub enum KvRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl KvRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvRef::F32(v) => v.len(),
            KvRef::Bf16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `q`: `[n_q, n_heads * head_dim]` for queries at absolute positions `pos0 .. pos0 + n_q`;
/// `k`, `v`: `[n_kv, n_kv_heads * head_dim]` for positions `0 .. n_kv` (`n_kv ≥ pos0 + n_q`);
/// `out`: `[n_q, n_heads * head_dim]`. Parallel over (query, head); each output is computed
/// by one task in a fixed order.
pub fn causal_attention(s: AttentionShape, q: &[f32], k: &[f32], v: &[f32], pos0: usize, out: &mut [f32]) {
    causal_attention_with(active_isa(), s, q, KvRef::F32(k), KvRef::F32(v), pos0, out)
}

/// [`causal_attention`] over a bf16 KV cache.
pub fn causal_attention_bf16(
    s: AttentionShape,
    q: &[f32],
    k: &[bf16],
    v: &[bf16],
    pos0: usize,
    out: &mut [f32],
) {
    causal_attention_with(active_isa(), s, q, KvRef::Bf16(k), KvRef::Bf16(v), pos0, out)
}

/// [`causal_attention`] on a given ISA with an f32 or bf16 cache (`k` and `v` of the same
/// type, `[n_kv, n_kv_heads * head_dim]`). Panics if the CPU cannot run `isa`.
pub fn causal_attention_with(
    isa: Isa,
    s: AttentionShape,
    q: &[f32],
    k: KvRef<'_>,
    v: KvRef<'_>,
    pos0: usize,
    out: &mut [f32],
) {
    let kv_dim = s.n_kv_heads * s.head_dim;
    let positions = k.len().checked_div(kv_dim).unwrap_or(0);
    let layout = KvLayout::token_major(positions, s.n_kv_heads, s.head_dim);
    causal_attention_in(isa, s, q, k, v, layout, pos0, out)
}

/// Where the rows of a KV cache tensor lie: KV head g's row for position j starts at
/// element `g · head_stride + j · pos_stride` and holds `head_dim` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Positions held (`0 .. positions`).
    pub positions: usize,
    pub pos_stride: usize,
    pub head_stride: usize,
}

impl KvLayout {
    /// `[positions, n_kv_heads · head_dim]`: a position's heads side by side (the layout of
    /// a `k_proj` output).
    pub fn token_major(positions: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        KvLayout { positions, pos_stride: n_kv_heads * head_dim, head_stride: head_dim }
    }

    /// `[n_kv_heads, capacity, head_dim]` holding positions `0 .. positions ≤ capacity`:
    /// each head's rows contiguous, so a decode step reads each head as one sequential
    /// stream (the token-major cache strides by all heads' width, which the hardware
    /// prefetchers, stopping at 4 KiB pages, follow poorly: `kattn`, one thread from DRAM,
    /// 1088 keys 244 → 134 µs).
    pub fn head_major(positions: usize, capacity: usize, head_dim: usize) -> Self {
        KvLayout { positions, pos_stride: head_dim, head_stride: capacity * head_dim }
    }

    /// Elements a tensor of this layout spans for `n_kv_heads` heads of `head_dim`.
    fn span(&self, n_kv_heads: usize, head_dim: usize) -> usize {
        if self.positions == 0 || n_kv_heads == 0 {
            return 0;
        }
        (n_kv_heads - 1) * self.head_stride + (self.positions - 1) * self.pos_stride + head_dim
    }

    /// Rows never overlap: heads side by side within a position, or positions within a head.
    fn is_disjoint(&self, n_kv_heads: usize, head_dim: usize) -> bool {
        let token_major = self.head_stride >= head_dim && self.pos_stride >= n_kv_heads * self.head_stride;
        let head_major =
            self.pos_stride >= head_dim && self.head_stride >= self.positions.max(1) * self.pos_stride;
        (n_kv_heads <= 1 && self.pos_stride >= head_dim) || token_major || head_major
    }
}

/// [`causal_attention_with`] over a cache of any [`KvLayout`] (`k` and `v` share it): the
/// same operations per output whatever the layout, so the same bits.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_in(
    isa: Isa,
    s: AttentionShape,
    q: &[f32],
    k: KvRef<'_>,
    v: KvRef<'_>,
    layout: KvLayout,
    pos0: usize,
    out: &mut [f32],
) {
    assert!(isa.is_supported(), "ISA {} is not supported by this CPU", isa.name());
    let hd = s.head_dim;
    let q_stride = s.n_heads * hd;
    if q_stride == 0 {
        return;
    }
    assert!(
        s.n_kv_heads > 0 && s.n_heads.is_multiple_of(s.n_kv_heads),
        "n_heads must be a multiple of n_kv_heads"
    );
    assert_eq!(q.len() % q_stride, 0, "q is not [n_q, n_heads * head_dim]");
    let n_q = q.len() / q_stride;
    assert_eq!(k.len(), v.len(), "k and v lengths differ");
    assert!(
        matches!((k, v), (KvRef::F32(_), KvRef::F32(_)) | (KvRef::Bf16(_), KvRef::Bf16(_))),
        "k, v types"
    );
    assert!(layout.is_disjoint(s.n_kv_heads, hd), "KV rows overlap: {layout:?}");
    assert!(k.len() >= layout.span(s.n_kv_heads, hd), "KV tensor shorter than its layout {layout:?}");
    let n_kv = layout.positions;
    assert!(n_kv >= pos0 + n_q, "KV cache holds {n_kv} positions, queries reach {}", pos0 + n_q);
    assert_eq!(out.len(), q.len());
    let simd = matches!(isa, Isa::Avx2 | Isa::Avx512);
    let group = s.n_heads / s.n_kv_heads;
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let (pos_stride, head_stride) = (layout.pos_stride, layout.head_stride);
    let shape = Layout { s, avx512: isa == Isa::Avx512, q_stride, pos_stride, head_stride, group, pos0 };
    if n_q == 1 {
        // Decode: one score row per head, in a buffer of the calling thread sized for
        // contexts up to MIN_DECODE_SPAN at first use, so steps do not allocate as the
        // context grows (beyond that it doubles).
        let (lo, p) = shape.visible(0);
        let span = p + 1 - lo;
        let need = s.n_heads * span;
        let run = |buf: &mut [f32]| {
            let rows = SyncPtr(buf.as_mut_ptr());
            if s.n_kv_heads >= crate::parallel::current_threads() {
                // A KV head per thread or more: one item per KV head takes its query heads
                // together ([`block`]: each key and value row read once for all of them,
                // four dot products per key load; the same bits as a head at a time).
                crate::parallel::for_each(s.n_kv_heads, |g| {
                    // SAFETY: `buf` holds n_heads rows of span and KV head g's query heads
                    // are rows g·group .. (g + 1)·group, this item's alone; the item writes
                    // only those heads' rows of `out` (asserted shape, exclusive borrow).
                    unsafe {
                        let scores =
                            std::slice::from_raw_parts_mut(rows.ptr().add(g * group * span), group * span);
                        block(simd, &shape, q, k, v, 0, 1, g, scores, out_ptr)
                    }
                });
                return;
            }
            crate::parallel::for_each(s.n_heads, |h| {
                // SAFETY: `out` has n_heads rows of hd (asserted) and `buf` n_heads rows of
                // span; both are exclusively borrowed for the loop and each head runs once,
                // so every row is touched by one item.
                let (o, scores) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(out_ptr.ptr().add(h * hd), hd),
                        std::slice::from_raw_parts_mut(rows.ptr().add(h * span), span),
                    )
                };
                head(simd, &shape, q, k, v, 0, h, scores, o);
            });
        };
        let done = DECODE_SCORES.with(|buf| match buf.try_borrow_mut() {
            Ok(mut buf) => {
                if buf.len() < need {
                    let size = need.next_power_of_two().max(s.n_heads * MIN_DECODE_SPAN);
                    buf.resize(size, 0.0);
                }
                run(&mut buf[..need]);
                true
            }
            Err(_) => false,
        });
        if !done {
            run(&mut vec![0f32; need]);
        }
        return;
    }
    // Several queries (prefill): blocks of QUERY_BLOCK queries × the heads sharing one KV
    // head, so each key and value row is read once per block from L1 instead of once per
    // (query, head) from L2 or beyond.
    let n_blocks = n_q.div_ceil(QUERY_BLOCK);
    crate::parallel::for_each(n_blocks * s.n_kv_heads, |item| {
        let (b, g) = (item / s.n_kv_heads, item % s.n_kv_heads);
        let i0 = b * QUERY_BLOCK;
        let i1 = (i0 + QUERY_BLOCK).min(n_q);
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            scores.clear();
            scores.resize((i1 - i0) * group * shape.span(i0, i1), 0.0);
            // SAFETY: this item alone writes the rows of queries i0..i1, heads of group g
            // (disjoint across items), inside `out` (asserted shape, exclusive borrow).
            unsafe { block(simd, &shape, q, k, v, i0, i1, g, &mut scores, out_ptr) }
        });
    });
}

/// Keys ahead whose rows the SIMD key and value loops ask the hardware for: the cache's rows
/// are a stride of all KV heads apart, which the stream prefetchers follow poorly.
const KV_PREFETCH: usize = 8;

/// Software prefetch of the `n` values at `at` of `kv` (a hint: never faults, even past the
/// end).
#[cfg(target_arch = "x86_64")]
fn prefetch_row(kv: KvRef<'_>, at: usize, n: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let (p, bytes) = match kv {
        KvRef::F32(v) => (v.as_ptr().wrapping_add(at) as *const i8, 4 * n),
        KvRef::Bf16(v) => (v.as_ptr().wrapping_add(at) as *const i8, 2 * n),
    };
    let mut b = 0;
    while b < bytes {
        // SAFETY: a prefetch is only a hint; it never dereferences or faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(b)) };
        b += 64;
    }
}

/// Query rows of a [`block`] whose offsets it looks up instead of computing per key (a
/// decode step has `group` rows; a prefill block `QUERY_BLOCK · group`).
const ROW_OFFSETS: usize = 64;

/// Queries per block of the several-query path.
const QUERY_BLOCK: usize = 8;

/// Strides and positions shared by every item of one call.
struct Layout {
    s: AttentionShape,
    /// The ISA is AVX-512 (joint value sums, [`x86::weighted_sums`]).
    avx512: bool,
    q_stride: usize,
    /// Elements from one position's row of a KV head to the next ([`KvLayout`]).
    pos_stride: usize,
    /// Elements from KV head g's rows to head g + 1's.
    head_stride: usize,
    group: usize,
    pos0: usize,
}

impl Layout {
    /// Keys visible to query `i` of the call: `lo..=p`.
    fn visible(&self, i: usize) -> (usize, usize) {
        let p = self.pos0 + i;
        (self.s.window.map_or(0, |w| (p + 1).saturating_sub(w)), p)
    }

    /// Keys visible to any of queries `i0..i1`: how many score columns their rows need.
    fn span(&self, i0: usize, i1: usize) -> usize {
        self.visible(i1 - 1).1 + 1 - self.visible(i0).0
    }
}

/// Queries `i0..i1` × the heads of KV head `g`: the same dot products, softmax and value
/// sums, in the same order per output, as [`head`] (so bit-identical to it), looping over
/// keys outside and rows inside.
///
/// `scores` is scratch of at least `(i1 − i0) · group · span` floats ([`Layout::span`]).
///
/// # Safety
/// `out` points to `[n_q, n_heads · head_dim]` floats of which this call alone writes the
/// rows of queries `i0..i1`, heads `g · group .. (g + 1) · group`.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    simd: bool,
    l: &Layout,
    q: &[f32],
    k: KvRef<'_>,
    v: KvRef<'_>,
    i0: usize,
    i1: usize,
    g: usize,
    scores: &mut [f32],
    out: SyncPtr,
) {
    let hd = l.s.head_dim;
    let off = g * l.head_stride;
    let (lo_min, _) = l.visible(i0);
    let (_, p_max) = l.visible(i1 - 1);
    let span = p_max + 1 - lo_min;
    let rows = (i1 - i0) * l.group;
    let scores = &mut scores[..rows * span];
    // Row r = (i - i0) · group + (h - g · group). Its offset in `q`, looked up for up to
    // ROW_OFFSETS rows: computed per key, the two divisions cost more than the dot products.
    let q_off = |r: usize| {
        let (i, h) = (i0 + r / l.group, g * l.group + r % l.group);
        i * l.q_stride + h * hd
    };
    let mut offsets = [0usize; ROW_OFFSETS];
    let looked_up = rows <= ROW_OFFSETS;
    if looked_up {
        for (r, o) in offsets[..rows].iter_mut().enumerate() {
            *o = q_off(r);
        }
    }
    let q_row = |r: usize| {
        let at = if looked_up { offsets[r] } else { q_off(r) };
        &q[at..at + hd]
    };
    // Keys every row sees: from the last query's first key to the first query's last.
    let (all_lo, all_hi) = (l.visible(i1 - 1).0, l.visible(i0).1);
    let mut j = lo_min;
    while j <= p_max {
        let at = j * l.pos_stride + off;
        // Two keys every row sees at once: each row's load shared by both, twice the
        // independent FMA chains; each dot product keeps its own order (same bits).
        #[cfg(target_arch = "x86_64")]
        if simd && rows >= 4 && j < p_max && j >= all_lo && j < all_hi {
            let at1 = at + l.pos_stride;
            prefetch_row(k, at + KV_PREFETCH * l.pos_stride, hd);
            prefetch_row(k, at1 + KV_PREFETCH * l.pos_stride, hd);
            let mut r = 0;
            while r + 4 <= rows {
                let qs = [q_row(r), q_row(r + 1), q_row(r + 2), q_row(r + 3)];
                // SAFETY: simd implies AVX2 + FMA (checked by the caller); rows and the key
                // rows hold head_dim elements.
                let d = unsafe {
                    match k {
                        KvRef::F32(kv) => x86::dot4x2(
                            qs,
                            [&kv[at..at + hd], &kv[at1..at1 + hd]],
                            |p: &[f32]| x86::f32x8(p),
                            |a| a,
                        ),
                        KvRef::Bf16(kv) => x86::dot4x2(
                            qs,
                            [&kv[at..at + hd], &kv[at1..at1 + hd]],
                            |p: &[bf16]| x86::bf16x8(p),
                            |a| a.to_f32(),
                        ),
                    }
                };
                let at_s = r * span + j - lo_min;
                let s = &mut scores[at_s..=at_s + 3 * span + 1];
                for (m, (d0, d1)) in d[0].into_iter().zip(d[1]).enumerate() {
                    s[m * span] = d0 * l.s.scale;
                    s[m * span + 1] = d1 * l.s.scale;
                }
                r += 4;
            }
            for r in r..rows {
                scores[r * span + j - lo_min] = dot(simd, q_row(r), k, at) * l.s.scale;
                scores[r * span + j + 1 - lo_min] = dot(simd, q_row(r), k, at1) * l.s.scale;
            }
            j += 2;
            continue;
        }
        // Rows are in query order, so the rows that see key j are one run r_lo..r_hi.
        let (r_lo, r_hi) = if (all_lo..=all_hi).contains(&j) {
            (0, rows)
        } else {
            let r_lo = (0..rows).find(|&r| l.visible(i0 + r / l.group).1 >= j).unwrap_or(rows);
            (r_lo, (r_lo..rows).find(|&r| l.visible(i0 + r / l.group).0 > j).unwrap_or(rows))
        };
        let mut r = r_lo;
        #[cfg(target_arch = "x86_64")]
        if simd {
            prefetch_row(k, at + KV_PREFETCH * l.pos_stride, hd);
            while r + 4 <= r_hi {
                let qs = [q_row(r), q_row(r + 1), q_row(r + 2), q_row(r + 3)];
                // SAFETY: simd implies AVX2 + FMA (checked by the caller); rows and the key
                // row hold head_dim elements.
                let d = unsafe {
                    match k {
                        KvRef::F32(kv) => x86::dot4(qs, &kv[at..at + hd], |p: &[f32]| x86::f32x8(p), |a| a),
                        KvRef::Bf16(kv) => {
                            x86::dot4(qs, &kv[at..at + hd], |p: &[bf16]| x86::bf16x8(p), |a| a.to_f32())
                        }
                    }
                };
                let at = r * span + j - lo_min;
                let s = &mut scores[at..=at + 3 * span];
                for (m, dm) in d.into_iter().enumerate() {
                    s[m * span] = dm * l.s.scale;
                }
                r += 4;
            }
        }
        for r in r..r_hi {
            scores[r * span + j - lo_min] = dot(simd, q_row(r), k, at) * l.s.scale;
        }
        j += 1;
    }
    let out_row = |r: usize| {
        let (i, h) = (i0 + r / l.group, g * l.group + r % l.group);
        // SAFETY: row (i, h) is ours (caller contract) and lies inside `out`.
        unsafe { std::slice::from_raw_parts_mut(out.ptr().add(i * l.q_stride + h * hd), hd) }
    };
    let weights = |r: usize| {
        let (lo, p) = l.visible(i0 + r / l.group);
        r * span + lo - lo_min..r * span + p + 1 - lo_min
    };
    // The heads of one query (consecutive rows) see the same keys: their softmaxes run
    // four at a time.
    let mut r = 0;
    while r < rows {
        let (lo, p) = l.visible(i0 + r / l.group);
        let (off, len) = (lo - lo_min, p + 1 - lo);
        let n = (l.group - r % l.group).min(4);
        let buf = &mut scores[r * span..(r + n) * span];
        match n {
            4 => softmax_rows::<4>(simd, rows_mut(buf, span, off, len)),
            3 => softmax_rows::<3>(simd, rows_mut(buf, span, off, len)),
            2 => softmax_rows::<2>(simd, rows_mut(buf, span, off, len)),
            _ => softmax(simd, &mut buf[off..off + len]),
        }
        r += n;
    }
    let mut r = 0;
    while r < rows {
        let at = l.visible(i0 + r / l.group).0 * l.pos_stride + off;
        // The heads of one query see the same keys: with AVX-512 up to four of them sum
        // each value row together (one load for all; the same bits as one at a time).
        #[cfg(target_arch = "x86_64")]
        if l.avx512 {
            let n = (l.group - r % l.group).min(4);
            let w = |i: usize| &scores[weights(r + i)];
            // SAFETY: AVX-512 checked by the caller (`avx512` is only set for that ISA); the
            // rows' weights have one length (same visible keys) and the output rows are
            // distinct heads of this item.
            unsafe {
                match n {
                    4 => x86_weighted_sums(
                        [w(0), w(1), w(2), w(3)],
                        v,
                        at,
                        l.pos_stride,
                        [out_row(r), out_row(r + 1), out_row(r + 2), out_row(r + 3)],
                    ),
                    3 => x86_weighted_sums(
                        [w(0), w(1), w(2)],
                        v,
                        at,
                        l.pos_stride,
                        [out_row(r), out_row(r + 1), out_row(r + 2)],
                    ),
                    2 => x86_weighted_sums([w(0), w(1)], v, at, l.pos_stride, [out_row(r), out_row(r + 1)]),
                    _ => x86_weighted_sums([w(0)], v, at, l.pos_stride, [out_row(r)]),
                }
            }
            r += n;
            continue;
        }
        weighted_sum(simd, &scores[weights(r)], v, at, l.pos_stride, out_row(r));
        r += 1;
    }
}

/// [`x86::weighted_sums`] over rows of `kv` from `at`.
///
/// # Safety
/// AVX-512 F, AVX2 and FMA present; as [`x86::weighted_sums`] with `kv[at..]`.
#[cfg(target_arch = "x86_64")]
unsafe fn x86_weighted_sums<const R: usize>(
    ws: [&[f32]; R],
    kv: KvRef<'_>,
    at: usize,
    stride: usize,
    os: [&mut [f32]; R],
) {
    let (m, n) = (ws[0].len(), os[0].len());
    if m == 0 {
        os.into_iter().for_each(|o| o.fill(0.0));
        return;
    }
    let end = at + (m - 1) * stride + n;
    // SAFETY: forwarded contract; `end` bounds every row read.
    unsafe {
        match kv {
            KvRef::F32(kv) => x86::weighted_sums(ws, &kv[at..end], stride, os, |p: *const f32| {
                x86::f32x8(std::slice::from_raw_parts(p, 8))
            }),
            KvRef::Bf16(kv) => x86::weighted_sums(ws, &kv[at..end], stride, os, |p: *const bf16| {
                x86::bf16x8(std::slice::from_raw_parts(p, 8))
            }),
        }
    }
}

/// Decode contexts the calling thread's score buffer holds from its first use.
const MIN_DECODE_SPAN: usize = 4096;

thread_local! {
    /// Per-thread score rows of the prefill blocks (grow to the largest block seen).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's decode score rows, `n_heads × span` (see MIN_DECODE_SPAN).
    static DECODE_SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One query position and head: scores over the visible keys, softmax, weighted values.
#[allow(clippy::too_many_arguments)]
fn head(
    simd: bool,
    l: &Layout,
    q: &[f32],
    k: KvRef<'_>,
    v: KvRef<'_>,
    i: usize,
    h: usize,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let hd = l.s.head_dim;
    let (lo, p) = l.visible(i);
    let qh = &q[i * l.q_stride + h * hd..][..hd];
    let off = (h / l.group) * l.head_stride;
    debug_assert_eq!(scores.len(), p + 1 - lo);
    for (j, sc) in (lo..=p).zip(scores.iter_mut()) {
        let at = j * l.pos_stride + off;
        *sc = dot(simd, qh, k, at) * l.s.scale;
    }
    softmax(simd, scores);
    weighted_sum(simd, scores, v, lo * l.pos_stride + off, l.pos_stride, o);
}

/// [`softmax_inplace`] over a row of scores, with SIMD the exponentials eight at a time
/// ([`x86::exp`], within 2 ulp of `f32::exp`); the max, the sum (in order) and the division
/// are the scalar function's. Decode and prefill both use this, so they give the same bits.
fn softmax(simd: bool, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return;
        }
        // SAFETY: simd is only set for AVX2/AVX-512 ISAs, checked supported by the caller.
        unsafe { x86::exp_shifted(x, max) };
        let sum: f32 = x.iter().sum();
        for v in x.iter_mut() {
            *v /= sum;
        }
        return;
    }
    let _ = simd;
    softmax_inplace(x);
}

/// [`softmax`] of `R` rows of one length (the heads of one query), each with the same
/// bits as [`softmax`] alone: the rows' sums run side by side (each row's in its order,
/// `R` dependent chains in flight instead of one), and the divisions are vectorised.
fn softmax_rows<const R: usize>(simd: bool, mut rows: [&mut [f32]; R]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        let n = rows[0].len();
        debug_assert!(rows.iter().all(|r| r.len() == n));
        let max = rows.each_ref().map(|x| x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        for (x, &m) in rows.iter_mut().zip(&max) {
            if m.is_finite() {
                // SAFETY: simd is only set for AVX2/AVX-512 ISAs, checked supported by the caller.
                unsafe { x86::exp_shifted(x, m) };
            }
        }
        let mut sum = [0f32; R];
        for j in 0..n {
            for (s, x) in sum.iter_mut().zip(&rows) {
                *s += x[j];
            }
        }
        for ((x, &m), &s) in rows.iter_mut().zip(&max).zip(&sum) {
            if m.is_finite() {
                // SAFETY: as above.
                unsafe { x86::div_all(x, s) };
            }
        }
        return;
    }
    rows.into_iter().for_each(|x| softmax(simd, x));
}

/// `R` rows of `len` values from `off` in consecutive rows of `span` of `buf` (`R · span`
/// values).
fn rows_mut<const R: usize>(buf: &mut [f32], span: usize, off: usize, len: usize) -> [&mut [f32]; R] {
    let mut rest = buf;
    std::array::from_fn(|_| {
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(span);
        rest = tail;
        &mut row[off..off + len]
    })
}

/// `o = Σ_j w[j] · kv[at + j · stride ..][..o.len()]`: from zero, `o[c] += w[j] · kv[c]`
/// for j ascending, one FMA per term with SIMD (the scalar path multiplies and adds). The
/// SIMD path holds `o` in registers across the keys, 64 columns at a time.
fn weighted_sum(simd: bool, w: &[f32], kv: KvRef<'_>, at: usize, stride: usize, o: &mut [f32]) {
    let n = o.len();
    if w.is_empty() {
        o.fill(0.0);
        return;
    }
    let end = at + (w.len() - 1) * stride + n;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is only set for AVX2/AVX-512 ISAs, checked supported by the caller;
        // the slices hold every row read (`end` above).
        unsafe {
            match kv {
                KvRef::F32(kv) => x86::weighted_sum(w, &kv[at..end], stride, o, |p: *const f32| {
                    x86::f32x8(std::slice::from_raw_parts(p, 8))
                }),
                KvRef::Bf16(kv) => x86::weighted_sum(w, &kv[at..end], stride, o, |p: *const bf16| {
                    x86::bf16x8(std::slice::from_raw_parts(p, 8))
                }),
            }
        }
        return;
    }
    o.fill(0.0);
    for (j, &pj) in w.iter().enumerate() {
        axpy(false, pj, kv, at + j * stride, o);
    }
}

/// `Σ q[c] · kv[at + c]`.
fn dot(simd: bool, q: &[f32], kv: KvRef<'_>, at: usize) -> f32 {
    let n = q.len();
    match kv {
        KvRef::F32(kv) => {
            let kr = &kv[at..at + n];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: simd is only set for AVX2/AVX-512 ISAs, checked supported by the
                // caller; both slices hold n elements.
                return unsafe { x86::dot_f32(q, kr) };
            }
            let _ = simd;
            q.iter().zip(kr).fold(0.0f32, |a, (x, y)| a + x * y)
        }
        KvRef::Bf16(kv) => {
            let kr = &kv[at..at + n];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: as above.
                return unsafe { x86::dot_bf16(q, kr) };
            }
            q.iter().zip(kr).fold(0.0f32, |a, (x, y)| a + x * y.to_f32())
        }
    }
}

/// `o[c] += p · kv[at + c]`.
fn axpy(simd: bool, p: f32, kv: KvRef<'_>, at: usize, o: &mut [f32]) {
    let n = o.len();
    match kv {
        KvRef::F32(kv) => {
            let vr = &kv[at..at + n];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 present (caller); both slices hold n elements.
                return unsafe { x86::axpy_f32(p, vr, o) };
            }
            let _ = simd;
            o.iter_mut().zip(vr).for_each(|(a, &b)| *a += p * b);
        }
        KvRef::Bf16(kv) => {
            let vr = &kv[at..at + n];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: as above.
                return unsafe { x86::axpy_bf16(p, vr, o) };
            }
            o.iter_mut().zip(vr).for_each(|(a, &b)| *a += p * b.to_f32());
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use crate::matmul::avx2_hsum as hsum;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn bf16x8(p: &[bf16]) -> __m256 {
        debug_assert!(p.len() >= 8);
        // SAFETY: the caller passes at least 8 elements; unaligned load.
        let h = unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    /// 8-lane FMA over full chunks, fixed horizontal sum, then the tail in order.
    ///
    /// # Safety
    /// AVX2 and FMA present; `k.len() == q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(q: &[f32], k: &[f32]) -> f32 {
        assert_eq!(q.len(), k.len());
        let mut acc = _mm256_setzero_ps();
        let full = q.len() / 8 * 8;
        for c in (0..full).step_by(8) {
            // SAFETY: c + 8 <= len for both slices.
            let (a, b) = unsafe { (_mm256_loadu_ps(q.as_ptr().add(c)), _mm256_loadu_ps(k.as_ptr().add(c))) };
            acc = _mm256_fmadd_ps(a, b, acc);
        }
        let mut s = hsum(acc);
        for c in full..q.len() {
            s = q[c].mul_add(k[c], s);
        }
        s
    }

    /// As [`dot_f32`] with bf16 keys.
    ///
    /// # Safety
    /// AVX2 and FMA present; `k.len() == q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16(q: &[f32], k: &[bf16]) -> f32 {
        assert_eq!(q.len(), k.len());
        let mut acc = _mm256_setzero_ps();
        let full = q.len() / 8 * 8;
        for c in (0..full).step_by(8) {
            // SAFETY: c + 8 <= len.
            let a = unsafe { _mm256_loadu_ps(q.as_ptr().add(c)) };
            acc = _mm256_fmadd_ps(a, bf16x8(&k[c..c + 8]), acc);
        }
        let mut s = hsum(acc);
        for c in full..q.len() {
            s = q[c].mul_add(k[c].to_f32(), s);
        }
        s
    }

    /// [`dot_f32`] / [`dot_bf16`] of four query rows with the same key row, each with its
    /// own accumulator in the same order (bit-identical to four single calls); the key row
    /// is loaded once.
    ///
    /// # Safety
    /// AVX2 and FMA present; every `q[r].len() == n` and `k` holds `n` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot4<K: Copy>(
        q: [&[f32]; 4],
        k: &[K],
        load: impl Fn(&[K]) -> __m256,
        one: impl Fn(K) -> f32,
    ) -> [f32; 4] {
        let n = k.len();
        for r in q {
            assert_eq!(r.len(), n);
        }
        let mut acc = [_mm256_setzero_ps(); 4];
        let full = n / 8 * 8;
        for c in (0..full).step_by(8) {
            let kv = load(&k[c..c + 8]);
            for r in 0..4 {
                // SAFETY: c + 8 <= n for every row.
                let a = unsafe { _mm256_loadu_ps(q[r].as_ptr().add(c)) };
                acc[r] = _mm256_fmadd_ps(a, kv, acc[r]);
            }
        }
        let mut out = hsum4(acc);
        for r in 0..4 {
            for c in full..n {
                out[r] = q[r][c].mul_add(one(k[c]), out[r]);
            }
        }
        out
    }

    /// [`dot4`] for two keys at once: each query chunk loaded once for both, eight
    /// independent FMA chains; every dot product is [`dot4`]'s, term by term (same bits).
    ///
    /// # Safety
    /// AVX2 and FMA present; every row and both keys hold the same number of elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot4x2<K: Copy>(
        q: [&[f32]; 4],
        k: [&[K]; 2],
        load: impl Fn(&[K]) -> __m256,
        one: impl Fn(K) -> f32,
    ) -> [[f32; 4]; 2] {
        let n = k[0].len();
        assert_eq!(k[1].len(), n);
        for r in q {
            assert_eq!(r.len(), n);
        }
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let full = n / 8 * 8;
        let mut c = 0;
        while c < full {
            let kv = [load(&k[0][c..c + 8]), load(&k[1][c..c + 8])];
            for r in 0..4 {
                // SAFETY: c + 8 <= n for every row.
                let a = unsafe { _mm256_loadu_ps(q[r].as_ptr().add(c)) };
                acc[0][r] = _mm256_fmadd_ps(a, kv[0], acc[0][r]);
                acc[1][r] = _mm256_fmadd_ps(a, kv[1], acc[1][r]);
            }
            c += 8;
        }
        let mut out = [hsum4(acc[0]), hsum4(acc[1])];
        for (o, kk) in out.iter_mut().zip(k) {
            for r in 0..4 {
                for c in full..n {
                    o[r] = q[r][c].mul_add(one(kk[c]), o[r]);
                }
            }
        }
        out
    }

    /// `[hsum(v[0]), …, hsum(v[3])]`, the same additions in the same order as [`hsum`]
    /// (so the same bits), done for the four vectors together: their halves added in two
    /// 256-bit adds, the second step in one, the last in one `hadd`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn hsum4(v: [__m256; 4]) -> [f32; 4] {
        // [lo r | lo r+1] + [hi r | hi r+1]: lanes r·4 + i hold v[r][i] + v[r][i + 4].
        let s01 = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
            _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
        );
        let s23 = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
            _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
        );
        // Per 128-bit lane (0: rows 0 and 2; 1: rows 1 and 3): [s0 + s2, s1 + s3] of each.
        let t = _mm256_add_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(s01, s23),
            _mm256_shuffle_ps::<0b11_10_11_10>(s01, s23),
        );
        // [r0, r2, r0, r2 | r1, r3, r1, r3].
        let h = _mm256_hadd_ps(t, t);
        let (lo, hi) = (_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut a = [0f32; 4];
        let mut b = [0f32; 4];
        // SAFETY: a and b hold four f32 each.
        unsafe {
            _mm_storeu_ps(a.as_mut_ptr(), lo);
            _mm_storeu_ps(b.as_mut_ptr(), hi);
        }
        [a[0], b[0], a[1], b[1]]
    }

    /// Eight f32 values as a vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn f32x8(p: &[f32]) -> __m256 {
        debug_assert!(p.len() >= 8);
        // SAFETY: the caller passes at least 8 elements; unaligned load.
        unsafe { _mm256_loadu_ps(p.as_ptr()) }
    }

    /// `o = fma(p, v, o)` elementwise.
    ///
    /// # Safety
    /// AVX2 and FMA present; `v.len() == o.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_f32(p: f32, v: &[f32], o: &mut [f32]) {
        assert_eq!(v.len(), o.len());
        let pv = _mm256_set1_ps(p);
        let full = o.len() / 8 * 8;
        for c in (0..full).step_by(8) {
            // SAFETY: c + 8 <= len for both slices.
            unsafe {
                let r = _mm256_fmadd_ps(
                    pv,
                    _mm256_loadu_ps(v.as_ptr().add(c)),
                    _mm256_loadu_ps(o.as_ptr().add(c)),
                );
                _mm256_storeu_ps(o.as_mut_ptr().add(c), r);
            }
        }
        for c in full..o.len() {
            o[c] = p.mul_add(v[c], o[c]);
        }
    }

    /// `e^x` for 8 lanes (Cephes' single-precision polynomial: `x = n·ln 2 + r`, `e^r` of
    /// degree 7 on |r| ≤ ln 2 / 2, times `2^n`), within 2 ulp of `f32::exp` for −87 ≤ x ≤ 88;
    /// NaN stays NaN; x < −87.3 gives a tiny positive number or 0 instead of a denormal.
    ///
    /// # Safety
    /// AVX2 and FMA present.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp(x: __m256) -> __m256 {
        // max(lo, x) and min(hi, x) return x when x is NaN (the second operand).
        let x = _mm256_min_ps(_mm256_set1_ps(88.0), _mm256_max_ps(_mm256_set1_ps(-87.336_55), x));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2^n through the exponent bits (n in −126 ..= 127 after the clamp).
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(y, pow2)
    }

    /// `x[i] /= d` (vector divisions: the same correctly rounded quotients).
    ///
    /// # Safety
    /// AVX2 present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn div_all(x: &mut [f32], d: f32) {
        x.iter_mut().for_each(|v| *v /= d);
    }

    /// `x[i] = e^(x[i] − max)` ([`exp`], eight at a time; the tail through a zero-padded
    /// vector).
    ///
    /// # Safety
    /// AVX2 and FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted(x: &mut [f32], max: f32) {
        let m = _mm256_set1_ps(max);
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c holds 8 floats.
            unsafe {
                let v = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = [0f32; 8];
            buf[..rest.len()].copy_from_slice(rest);
            // SAFETY: buf holds 8 floats.
            unsafe {
                let v = exp(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), m));
                _mm256_storeu_ps(buf.as_mut_ptr(), v);
            }
            rest.copy_from_slice(&buf[..rest.len()]);
        }
    }

    /// `o[c] = Σ_j w[j] · kv[j · stride + c]`, j ascending, one FMA per term from zero:
    /// the sums of [`axpy_f32`] over the keys, bit for bit, with `o` in registers (eight
    /// vectors, 64 columns, at a time); `load` reads 8 values as f32.
    ///
    /// # Safety
    /// AVX2 and FMA present; `kv` holds `(w.len() − 1) · stride + o.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum<T: Copy + Into<f32>>(
        w: &[f32],
        kv: &[T],
        stride: usize,
        o: &mut [f32],
        load: impl Fn(*const T) -> __m256,
    ) {
        let n = o.len();
        assert!(!w.is_empty() && kv.len() >= (w.len() - 1) * stride + n);
        let full = n / 8 * 8;
        let mut c0 = 0;
        while c0 < full {
            // SAFETY: columns c0 .. c0 + 8·V are inside every row (c0 + 8·V <= full <= n).
            unsafe {
                match (full - c0) / 8 {
                    1 => columns::<T, 1>(w, kv, stride, o, c0, &load),
                    2 => columns::<T, 2>(w, kv, stride, o, c0, &load),
                    3 => columns::<T, 3>(w, kv, stride, o, c0, &load),
                    4 => columns::<T, 4>(w, kv, stride, o, c0, &load),
                    5 => columns::<T, 5>(w, kv, stride, o, c0, &load),
                    6 => columns::<T, 6>(w, kv, stride, o, c0, &load),
                    7 => columns::<T, 7>(w, kv, stride, o, c0, &load),
                    _ => columns::<T, 8>(w, kv, stride, o, c0, &load),
                }
            }
            c0 += 8 * ((full - c0) / 8).min(8);
        }
        for (c, oc) in o.iter_mut().enumerate().skip(full) {
            let mut acc = 0f32;
            for (j, &p) in w.iter().enumerate() {
                acc = p.mul_add(kv[j * stride + c].into(), acc);
            }
            *oc = acc;
        }
    }

    /// Columns `c0 .. c0 + 8·V` of [`weighted_sum`].
    ///
    /// # Safety
    /// As [`weighted_sum`], and those columns lie inside `o` and every row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns<T: Copy, const V: usize>(
        w: &[f32],
        kv: &[T],
        stride: usize,
        o: &mut [f32],
        c0: usize,
        load: &impl Fn(*const T) -> __m256,
    ) {
        let mut acc = [_mm256_setzero_ps(); V];
        for (j, &p) in w.iter().enumerate() {
            let pv = _mm256_set1_ps(p);
            // SAFETY: row j's columns c0 .. c0 + 8·V are inside `kv` (caller).
            let row = unsafe { kv.as_ptr().add(j * stride + c0) };
            // A hint only (never faults): the row KV_PREFETCH keys ahead.
            let ahead = row.wrapping_add(super::KV_PREFETCH * stride) as *const i8;
            let mut b = 0;
            while b < 8 * V * std::mem::size_of::<T>() {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(b));
                b += 64;
            }
            for (a, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                *acc = _mm256_fmadd_ps(pv, load(unsafe { row.add(8 * a) }), *acc);
            }
        }
        for (a, acc) in acc.iter().enumerate() {
            // SAFETY: o holds columns c0 .. c0 + 8·V (caller).
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * a), *acc) };
        }
    }

    /// Sixteen values as f32 (AVX-512).
    pub(super) trait Load16: Copy {
        /// # Safety
        /// AVX-512 F present; `p` points to 16 readable values.
        unsafe fn load16(p: *const Self) -> __m512;
    }
    impl Load16 for f32 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: caller contract; unaligned load.
            unsafe { _mm512_loadu_ps(p) }
        }
    }
    impl Load16 for bf16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const bf16) -> __m512 {
            // SAFETY: caller contract; unaligned load.
            let h = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    /// [`weighted_sum`] for `R` rows of weights over the same value rows: `os[r][c] =
    /// Σ_j ws[r][j] · kv[j · stride + c]`, each output from zero with one FMA per key in
    /// ascending j, as [`weighted_sum`] does (the same bits: the sums are elementwise, so the
    /// vector width does not matter). Each value row is loaded once for the `R` rows,
    /// 64 columns at a time (`R · 4` accumulators); columns past the last 16 go through
    /// [`weighted_sum`].
    ///
    /// # Safety
    /// AVX-512 F, AVX2 and FMA present; every `ws[r]` has the same length `m ≥ 1`, every
    /// `os[r]` the same length `n`, and `kv` holds `(m − 1) · stride + n` values.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn weighted_sums<T: Load16 + Into<f32>, const R: usize>(
        ws: [&[f32]; R],
        kv: &[T],
        stride: usize,
        mut os: [&mut [f32]; R],
        load8: impl Fn(*const T) -> __m256,
    ) {
        let (m, n) = (ws[0].len(), os[0].len());
        assert!(m >= 1 && kv.len() >= (m - 1) * stride + n);
        assert!(ws.iter().all(|w| w.len() == m) && os.iter().all(|o| o.len() == n));
        let full = n / 16 * 16;
        let mut c0 = 0;
        while c0 < full {
            // SAFETY: columns c0 .. c0 + 16·V lie inside every row and output (<= full).
            unsafe {
                match (full - c0) / 16 {
                    1 => columns16::<T, R, 1>(&ws, kv, stride, &mut os, c0),
                    2 => columns16::<T, R, 2>(&ws, kv, stride, &mut os, c0),
                    3 => columns16::<T, R, 3>(&ws, kv, stride, &mut os, c0),
                    _ => columns16::<T, R, 4>(&ws, kv, stride, &mut os, c0),
                }
            }
            c0 += 16 * ((full - c0) / 16).min(4);
        }
        if full < n {
            for (w, o) in ws.into_iter().zip(os) {
                // SAFETY: as above, for the columns from `full` on.
                unsafe { weighted_sum(w, &kv[full..], stride, &mut o[full..], &load8) };
            }
        }
    }

    /// Columns `c0 .. c0 + 16·V` of [`weighted_sums`].
    ///
    /// # Safety
    /// As [`weighted_sums`], and those columns lie inside every row and output.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn columns16<T: Load16, const R: usize, const V: usize>(
        ws: &[&[f32]; R],
        kv: &[T],
        stride: usize,
        os: &mut [&mut [f32]; R],
        c0: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for j in 0..ws[0].len() {
            // SAFETY: row j's columns c0 .. c0 + 16·V are inside `kv` (caller).
            let row = unsafe { kv.as_ptr().add(j * stride + c0) };
            // A hint only (never faults): the row KV_PREFETCH keys ahead.
            let ahead = row.wrapping_add(super::KV_PREFETCH * stride) as *const i8;
            let mut b = 0;
            while b < 16 * V * std::mem::size_of::<T>() {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(b));
                b += 64;
            }
            let mut vv = [_mm512_setzero_ps(); V];
            for (a, v) in vv.iter_mut().enumerate() {
                // SAFETY: as above.
                *v = unsafe { T::load16(row.add(16 * a)) };
            }
            for r in 0..R {
                let pv = _mm512_set1_ps(ws[r][j]);
                for a in 0..V {
                    acc[r][a] = _mm512_fmadd_ps(pv, vv[a], acc[r][a]);
                }
            }
        }
        for r in 0..R {
            for a in 0..V {
                // SAFETY: os[r] holds columns c0 .. c0 + 16·V (caller).
                unsafe { _mm512_storeu_ps(os[r].as_mut_ptr().add(c0 + 16 * a), acc[r][a]) };
            }
        }
    }

    /// As [`axpy_f32`] with bf16 values.
    ///
    /// # Safety
    /// AVX2 and FMA present; `v.len() == o.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_bf16(p: f32, v: &[bf16], o: &mut [f32]) {
        assert_eq!(v.len(), o.len());
        let pv = _mm256_set1_ps(p);
        let full = o.len() / 8 * 8;
        for c in (0..full).step_by(8) {
            let w = bf16x8(&v[c..c + 8]);
            // SAFETY: c + 8 <= len.
            unsafe {
                let r = _mm256_fmadd_ps(pv, w, _mm256_loadu_ps(o.as_ptr().add(c)));
                _mm256_storeu_ps(o.as_mut_ptr().add(c), r);
            }
        }
        for c in full..o.len() {
            o[c] = p.mul_add(v[c].to_f32(), o[c]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Max |simd − scalar| relative to max |v| (softmax weights sum to one; score errors of
    /// a few ulps of Σ|q·k| move the weights by about that much).
    const ATTN_REL_TOL: f32 = 1e-5;

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// The four horizontal sums of `dot4` done together give the bits of one `hsum` each,
    /// for values of mixed signs and magnitudes (where the order of additions shows).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn joint_horizontal_sums_are_the_single_ones() {
        use std::arch::x86_64::*;
        if !Isa::Avx2.is_supported() {
            eprintln!("skipped: no AVX2");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..2000 {
            let lanes: [[f32; 8]; 4] = std::array::from_fn(|_| {
                std::array::from_fn(|_| rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-6..7)))
            });
            // SAFETY: AVX2 checked above; each array holds eight f32.
            let (joint, single) = unsafe {
                let v: [__m256; 4] = std::array::from_fn(|r| _mm256_loadu_ps(lanes[r].as_ptr()));
                (x86::hsum4(v), v.map(|x| crate::matmul::avx2_hsum(x)))
            };
            assert_eq!(joint.map(f32::to_bits), single.map(f32::to_bits), "{lanes:?}");
        }
    }

    /// The SIMD exponential is within 2 ulp of `f32::exp` where softmax uses it, and keeps NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_exp_matches_f32_exp() {
        use std::arch::x86_64::*;
        if !Isa::Avx2.is_supported() {
            eprintln!("skipped: no AVX2");
            return;
        }
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.001_37);
            let mut got = [0f32; 8];
            // SAFETY: AVX2 checked above; the arrays hold 8 floats.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), x86::exp(_mm256_loadu_ps(xs.as_ptr()))) };
            for (g, &xi) in got.iter().zip(&xs) {
                let want = xi.exp();
                let ulps = (g.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32;
                assert!(ulps <= 2, "exp({xi}) = {g}, want {want} ({ulps} ulp)");
                worst = worst.max(ulps);
            }
            x += 0.0137 * 8.0 + 0.000_9;
        }
        let mut nan = [f32::NAN, 0.0, -1.0, 1.0, f32::NAN, 0.5, -0.5, 2.0];
        // SAFETY: as above.
        unsafe { x86::exp_shifted(&mut nan, 0.0) };
        assert!(nan[0].is_nan() && nan[4].is_nan() && nan[1] == 1.0, "{nan:?}");
        eprintln!("worst error {worst} ulp");
    }

    /// The register-held weighted sum gives the bits of one `axpy` per key from zero.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn weighted_sum_is_the_axpy_sequence() {
        if !Isa::Avx2.is_supported() {
            eprintln!("skipped: no AVX2");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (keys, n, extra) in [(1, 8, 0), (5, 7, 3), (9, 17, 0), (33, 64, 8), (4, 72, 0), (3, 130, 5)] {
            let stride = n + extra;
            let w = rand_vec(&mut rng, keys);
            let kv = rand_vec(&mut rng, (keys - 1) * stride + n);
            let kb: Vec<bf16> = kv.iter().map(|&a| bf16::from_f32(a)).collect();
            for (kr, name) in [(KvRef::F32(&kv), "f32"), (KvRef::Bf16(&kb), "bf16")] {
                let mut want = vec![0f32; n];
                for (j, &p) in w.iter().enumerate() {
                    axpy(true, p, kr, j * stride, &mut want);
                }
                let mut got = vec![f32::NAN; n];
                weighted_sum(true, &w, kr, 0, stride, &mut got);
                assert_eq!(got, want, "{name} keys {keys} n {n} stride {stride}");
            }
        }
    }

    #[test]
    fn simd_matches_scalar_and_prefill_matches_decode() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (n_heads, n_kv_heads, hd, window) in [
            (4, 2, 8, None),
            (4, 1, 17, None),
            (6, 3, 64, Some(5)),
            (2, 2, 7, None),
            (8, 4, 31, Some(3)),
            (12, 2, 16, None),
        ] {
            let s =
                AttentionShape { n_heads, n_kv_heads, head_dim: hd, scale: (hd as f32).powf(-0.5), window };
            let n_kv = 23;
            let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
            let q = rand_vec(&mut rng, n_kv * qd);
            let k = rand_vec(&mut rng, n_kv * kvd);
            let v = rand_vec(&mut rng, n_kv * kvd);
            let kb: Vec<bf16> = k.iter().map(|&a| bf16::from_f32(a)).collect();
            let vb: Vec<bf16> = v.iter().map(|&a| bf16::from_f32(a)).collect();
            for (kr, vr) in [(KvRef::F32(&k), KvRef::F32(&v)), (KvRef::Bf16(&kb), KvRef::Bf16(&vb))] {
                let mut want = vec![0f32; q.len()];
                causal_attention_with(Isa::Scalar, s, &q, kr, vr, 0, &mut want);
                for isa in Isa::all_supported() {
                    let mut all = vec![0f32; q.len()];
                    causal_attention_with(isa, s, &q, kr, vr, 0, &mut all);
                    for (a, b) in all.iter().zip(&want) {
                        assert!((a - b).abs() <= ATTN_REL_TOL, "{isa:?}: {a} vs {b}");
                    }
                    // Decode one position at a time gives the same bits as prefill, with
                    // the KV heads' query heads together (as many threads as KV heads or
                    // fewer) or a head at a time (more threads).
                    for threads in [1, 8] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        for p in 0..n_kv {
                            let mut one = vec![0f32; qd];
                            pool.install(|| {
                                causal_attention_with(isa, s, &q[p * qd..(p + 1) * qd], kr, vr, p, &mut one)
                            });
                            assert_eq!(
                                one,
                                all[p * qd..(p + 1) * qd],
                                "{isa:?} position {p} threads {threads}"
                            );
                        }
                    }
                    // So does a later chunk of queries (a prompt continued after a prefill).
                    let p0 = 10;
                    let mut rest = vec![0f32; (n_kv - p0) * qd];
                    causal_attention_with(isa, s, &q[p0 * qd..], kr, vr, p0, &mut rest);
                    assert_eq!(rest, all[p0 * qd..], "{isa:?} chunk from {p0}");
                }
            }
        }
    }

    /// `[n_kv_heads, capacity, head_dim]` copy of a token-major `[positions, kv_dim]`
    /// tensor, the rows past `positions` NaN (any read of them would show in the outputs).
    fn to_head_major(x: &[f32], positions: usize, n_kv_heads: usize, hd: usize, capacity: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n_kv_heads * capacity * hd];
        for p in 0..positions {
            for g in 0..n_kv_heads {
                let src = &x[p * n_kv_heads * hd + g * hd..][..hd];
                out[(g * capacity + p) * hd..][..hd].copy_from_slice(src);
            }
        }
        out
    }

    #[test]
    fn joint_softmax_is_each_rows_softmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for n in [1, 7, 8, 9, 100] {
            for isa in Isa::all_supported() {
                let simd = matches!(isa, Isa::Avx2 | Isa::Avx512);
                let mut rows: Vec<Vec<f32>> = (0..4).map(|_| rand_vec(&mut rng, n)).collect();
                rows[2][0] = f32::NEG_INFINITY;
                if n > 1 {
                    rows[3].fill(f32::NEG_INFINITY);
                }
                let mut want = rows.clone();
                want.iter_mut().for_each(|r| softmax(simd, r));
                let [a, b, c, d] = &mut rows[..] else { unreachable!() };
                softmax_rows::<4>(simd, [a, b, c, d]);
                assert_eq!(rows, want, "{isa:?} n {n}");
            }
        }
    }

    #[test]
    fn head_major_cache_gives_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (n_heads, n_kv_heads, hd, window) in
            [(4, 2, 8, None), (4, 1, 17, None), (6, 3, 64, Some(5)), (12, 2, 16, None), (8, 4, 31, Some(3))]
        {
            let s =
                AttentionShape { n_heads, n_kv_heads, head_dim: hd, scale: (hd as f32).powf(-0.5), window };
            let (n_kv, capacity) = (19, 24);
            let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
            let q = rand_vec(&mut rng, n_kv * qd);
            let k = rand_vec(&mut rng, n_kv * kvd);
            let v = rand_vec(&mut rng, n_kv * kvd);
            let (kh, vh) = (
                to_head_major(&k, n_kv, n_kv_heads, hd, capacity),
                to_head_major(&v, n_kv, n_kv_heads, hd, capacity),
            );
            let to_bf16 = |x: &[f32]| x.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<bf16>>();
            let (kb, vb, khb, vhb) = (to_bf16(&k), to_bf16(&v), to_bf16(&kh), to_bf16(&vh));
            let layout = KvLayout::head_major(n_kv, capacity, hd);
            for ((kr, vr), (khr, vhr)) in [
                ((KvRef::F32(&k), KvRef::F32(&v)), (KvRef::F32(&kh), KvRef::F32(&vh))),
                ((KvRef::Bf16(&kb), KvRef::Bf16(&vb)), (KvRef::Bf16(&khb), KvRef::Bf16(&vhb))),
            ] {
                for isa in Isa::all_supported() {
                    let mut want = vec![0f32; q.len()];
                    causal_attention_with(isa, s, &q, kr, vr, 0, &mut want);
                    let mut got = vec![0f32; q.len()];
                    causal_attention_in(isa, s, &q, khr, vhr, layout, 0, &mut got);
                    assert_eq!(got, want, "{isa:?} prefill {n_heads}/{n_kv_heads}/{hd}");
                    for p in [0, 7, n_kv - 1] {
                        let mut one = vec![0f32; qd];
                        let at = KvLayout { positions: p + 1, ..layout };
                        causal_attention_in(isa, s, &q[p * qd..(p + 1) * qd], khr, vhr, at, p, &mut one);
                        assert_eq!(one, want[p * qd..(p + 1) * qd], "{isa:?} decode at {p}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "KV rows overlap")]
    fn overlapping_layout_is_refused() {
        let s = AttentionShape { n_heads: 2, n_kv_heads: 2, head_dim: 4, scale: 0.5, window: None };
        let kv = vec![0f32; 64];
        let mut out = vec![0f32; 8];
        let layout = KvLayout { positions: 4, pos_stride: 4, head_stride: 4 };
        causal_attention_in(Isa::Scalar, s, &[0.0; 8], KvRef::F32(&kv), KvRef::F32(&kv), layout, 3, &mut out);
    }
}
