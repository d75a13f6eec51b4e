//! `y = x · Wᵀ` for f32 activations and bf16 / f16 / f32 weights stored `[rows, cols]`
//! (`nn.Linear` layout), for one token (matvec) or a small batch.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod common;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::hsum as avx2_hsum;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod groups;
#[cfg(target_arch = "x86_64")]
mod groups_avx2;
#[cfg(target_arch = "x86_64")]
mod groups_avx512;
mod matmuls;
mod scalar;
mod swiglu;

pub use matmuls::{matmuls, matmuls_with, MATMULS_PER_LOOP};
pub(crate) use swiglu::swiglu_experts_with;

use half::{bf16, f16};

use crate::dispatch::{active_isa, Isa};
use crate::parallel::SyncPtr;
use crate::quant::{BlockQ4, BlockQ8, QK};
use crate::row_groups::GroupedRef;
use crate::row_tiles::{TileKind, TILE_ROWS};
use crate::KernelError;

/// Borrowed weight elements, row-major. Quantized variants hold `QK`-element blocks.
#[derive(Debug, Clone, Copy)]
pub enum WeightsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    Q8(&'a [BlockQ8]),
    Q4(&'a [BlockQ4]),
    /// q8 blocks in tiles of four rows ([`crate::row_tiles`]); a [`MatRef`] of it has
    /// `stride == cols` and is cut into row ranges only at tile boundaries.
    Q8Tiles(&'a [u8]),
    /// q4 blocks in tiles of four rows, as [`WeightsRef::Q8Tiles`].
    Q4Tiles(&'a [u8]),
}

impl<'a> WeightsRef<'a> {
    /// Number of weights (elements, not blocks).
    pub fn len(&self) -> usize {
        match self {
            WeightsRef::F32(w) => w.len(),
            WeightsRef::Bf16(w) => w.len(),
            WeightsRef::F16(w) => w.len(),
            WeightsRef::Q8(w) => w.len() * QK,
            WeightsRef::Q4(w) => w.len() * QK,
            WeightsRef::Q8Tiles(w) => w.len() / TileKind::Q8.block_bytes() * QK,
            WeightsRef::Q4Tiles(w) => w.len() / TileKind::Q4.block_bytes() * QK,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of weight data read by one pass over the whole buffer.
    pub fn size_bytes(&self) -> usize {
        match self {
            WeightsRef::F32(w) => std::mem::size_of_val(*w),
            WeightsRef::Bf16(w) => std::mem::size_of_val(*w),
            WeightsRef::F16(w) => std::mem::size_of_val(*w),
            WeightsRef::Q8(w) => std::mem::size_of_val(*w),
            WeightsRef::Q4(w) => std::mem::size_of_val(*w),
            WeightsRef::Q8Tiles(w) | WeightsRef::Q4Tiles(w) => w.len(),
        }
    }

    /// Elements `start..end` (multiples of `QK` for quantized data).
    pub fn slice(&self, start: usize, end: usize) -> WeightsRef<'a> {
        match *self {
            WeightsRef::F32(w) => WeightsRef::F32(&w[start..end]),
            WeightsRef::Bf16(w) => WeightsRef::Bf16(&w[start..end]),
            WeightsRef::F16(w) => WeightsRef::F16(&w[start..end]),
            WeightsRef::Q8(w) => {
                assert!(
                    start.is_multiple_of(QK) && end.is_multiple_of(QK),
                    "quantized slice {start}..{end} not block aligned"
                );
                WeightsRef::Q8(&w[start / QK..end / QK])
            }
            WeightsRef::Q4(w) => {
                assert!(
                    start.is_multiple_of(QK) && end.is_multiple_of(QK),
                    "quantized slice {start}..{end} not block aligned"
                );
                WeightsRef::Q4(&w[start / QK..end / QK])
            }
            WeightsRef::Q8Tiles(w) | WeightsRef::Q4Tiles(w) => {
                assert!(
                    start.is_multiple_of(QK) && end.is_multiple_of(QK),
                    "quantized slice {start}..{end} not block aligned"
                );
                let (kind, wrap): (_, fn(&'a [u8]) -> WeightsRef<'a>) = match self {
                    WeightsRef::Q8Tiles(_) => (TileKind::Q8, WeightsRef::Q8Tiles),
                    _ => (TileKind::Q4, WeightsRef::Q4Tiles),
                };
                let b = kind.block_bytes();
                wrap(&w[start / QK * b..end / QK * b])
            }
        }
    }

    pub(crate) fn is_quantized(&self) -> bool {
        matches!(
            self,
            WeightsRef::Q8(_) | WeightsRef::Q4(_) | WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_)
        )
    }
}

/// A weight matrix `[rows, cols]` (`rows` is the output dimension) whose row `r` starts at
/// element `r * stride`. `stride > cols` views interleaved layouts (row-column bundles).
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: WeightsRef<'a>,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major matrix: `data` holds exactly `rows * cols` weights.
    pub fn new(data: WeightsRef<'a>, rows: usize, cols: usize) -> Result<Self, KernelError> {
        let expected = rows.saturating_mul(cols);
        if data.len() != expected {
            return Err(KernelError::WeightLength { rows, cols, expected, actual: data.len() });
        }
        Self::strided(data, rows, cols, cols)
    }

    /// Rows of `cols` weights starting every `stride` weights.
    pub fn strided(
        data: WeightsRef<'a>,
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<Self, KernelError> {
        let needed = if rows == 0 { 0 } else { (rows - 1).saturating_mul(stride).saturating_add(cols) };
        if stride < cols || data.len() < needed {
            return Err(KernelError::WeightLength { rows, cols, expected: needed, actual: data.len() });
        }
        if data.is_quantized() && (!cols.is_multiple_of(QK) || !stride.is_multiple_of(QK)) {
            return Err(KernelError::QuantizedShape { cols, stride });
        }
        if matches!(data, WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_)) && stride != cols {
            return Err(KernelError::QuantizedShape { cols, stride });
        }
        Ok(Self { data, rows, cols, stride })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn stride(&self) -> usize {
        self.stride
    }
    pub fn data(&self) -> WeightsRef<'a> {
        self.data
    }
    /// Bytes one pass over the matrix reads.
    pub fn size_bytes(&self) -> usize {
        let n = self.rows * self.cols;
        match self.data {
            WeightsRef::F32(_) => n * 4,
            WeightsRef::Bf16(_) | WeightsRef::F16(_) => n * 2,
            WeightsRef::Q8(_) => n / QK * std::mem::size_of::<BlockQ8>(),
            WeightsRef::Q4(_) => n / QK * std::mem::size_of::<BlockQ4>(),
            WeightsRef::Q8Tiles(_) => n / QK * TileKind::Q8.block_bytes(),
            WeightsRef::Q4Tiles(_) => n / QK * TileKind::Q4.block_bytes(),
        }
    }

    /// Row `r`'s `cols` weights. Panics for tiled weights, whose rows are not contiguous
    /// (see [`MatRef::row_to_f32`]).
    pub fn row(&self, r: usize) -> WeightsRef<'a> {
        assert!(!self.is_tiled(), "a row of tiled weights is not contiguous");
        self.data.slice(r * self.stride, r * self.stride + self.cols)
    }

    /// Whether the weights are stored in row tiles ([`crate::row_tiles`]).
    pub fn is_tiled(&self) -> bool {
        matches!(self.data, WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_))
    }

    /// Rows `start..end` as a matrix of their own. For tiled weights `start` must start a
    /// tile and `end` end one (or be the last row).
    pub fn row_range(&self, start: usize, end: usize) -> MatRef<'a> {
        assert!(start <= end && end <= self.rows, "row range {start}..{end} of {}", self.rows);
        if self.is_tiled() {
            assert!(
                start.is_multiple_of(TILE_ROWS) && (end.is_multiple_of(TILE_ROWS) || end == self.rows),
                "row range {start}..{end} of tiled weights does not follow tile boundaries"
            );
        }
        let data = if start == end {
            self.data.slice(0, 0)
        } else {
            self.data.slice(start * self.stride, (end - 1) * self.stride + self.cols)
        };
        MatRef { data, rows: end - start, cols: self.cols, stride: self.stride }
    }

    /// Row `r` converted to f32 (embedding lookup).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        match self.data {
            WeightsRef::Q8Tiles(t) => {
                let mut blocks = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; self.cols / QK];
                crate::row_tiles::untile_q8_row(t, self.rows, self.cols, r, &mut blocks);
                return crate::quant::dequantize_q8(&blocks, out);
            }
            WeightsRef::Q4Tiles(t) => {
                let mut blocks = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; self.cols / QK];
                crate::row_tiles::untile_q4_row(t, self.rows, self.cols, r, &mut blocks);
                return crate::quant::dequantize_q4(&blocks, out);
            }
            _ => {}
        }
        match self.row(r) {
            WeightsRef::F32(w) => out.copy_from_slice(w),
            WeightsRef::Bf16(w) => out.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32()),
            WeightsRef::F16(w) => out.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32()),
            WeightsRef::Q8(w) => crate::quant::dequantize_q8(w, out),
            WeightsRef::Q4(w) => crate::quant::dequantize_q4(w, out),
            WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_) => unreachable!("handled above"),
        }
    }
}

/// A matrix read row by row as the terms of `y += Σ_j a[j] · W[j, :]` ([`axpy_rows_with`]):
/// rows as [`MatRef`] views them, or quantized rows in groups of four ([`GroupedRef`], whose
/// `axpy` runs on integer dot products; the engine stores quantized `downᵀ` that way).
#[derive(Debug, Clone, Copy)]
pub enum AxpyRef<'a> {
    Rows(MatRef<'a>),
    Groups(GroupedRef<'a>),
}

impl<'a> AxpyRef<'a> {
    pub fn rows(&self) -> usize {
        match self {
            AxpyRef::Rows(m) => m.rows(),
            AxpyRef::Groups(m) => m.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            AxpyRef::Rows(m) => m.cols(),
            AxpyRef::Groups(m) => m.cols(),
        }
    }
    /// Bytes one pass over the matrix reads.
    pub fn size_bytes(&self) -> usize {
        match self {
            AxpyRef::Rows(m) => m.size_bytes(),
            AxpyRef::Groups(m) => m.size_bytes(),
        }
    }
    /// Rows `start..end` (for groups: whole groups, see [`GroupedRef::row_range`]).
    pub fn row_range(&self, start: usize, end: usize) -> AxpyRef<'a> {
        match self {
            AxpyRef::Rows(m) => AxpyRef::Rows(m.row_range(start, end)),
            AxpyRef::Groups(m) => AxpyRef::Groups(m.row_range(start, end)),
        }
    }
    /// Row `r` as f32 weights.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            AxpyRef::Rows(m) => m.row_to_f32(r, out),
            AxpyRef::Groups(m) => m.row_to_f32(r, out),
        }
    }
}

impl<'a> From<MatRef<'a>> for AxpyRef<'a> {
    fn from(m: MatRef<'a>) -> Self {
        AxpyRef::Rows(m)
    }
}

impl<'a> From<GroupedRef<'a>> for AxpyRef<'a> {
    fn from(m: GroupedRef<'a>) -> Self {
        AxpyRef::Groups(m)
    }
}

/// Output rows handled by one task: big enough to amortise scheduling, small enough to
/// balance two to sixteen cores on the matrices of real models. Row blocking never changes
/// results (each output is one dot product computed by one kernel call).
const ROWS_PER_TASK: usize = 64;
/// Rows per task for one token (no output buffering, so any size works): at most this many
/// (long contiguous reads per thread, few forks), at least [`ROWS_PER_TASK`], and about
/// four tasks per thread in between.
const MAX_ROWS_PER_TASK_DECODE: usize = 256;

/// Rows per task of a matmul of `rows` outputs for `n_tokens` tokens. Never changes results.
fn rows_per_task(rows: usize, n_tokens: usize) -> usize {
    if n_tokens > 1 {
        return ROWS_PER_TASK;
    }
    let threads = crate::parallel::current_threads();
    rows.div_ceil(4 * threads).next_multiple_of(16).clamp(ROWS_PER_TASK, MAX_ROWS_PER_TASK_DECODE)
}
/// Tokens whose outputs a task buffers at once (its weight block is re-read from cache for
/// each chunk of this many tokens).
const TOK_CHUNK: usize = 16;
/// Below this many multiply-adds a call runs on the calling thread (no rayon fork).
const MIN_PARALLEL_WORK: usize = 1 << 15;

/// The activations a kernel reads: `n` rows of `cols`, prepared once per call for the
/// weights' format and the ISA ([`with_acts`]).
///
/// * bf16 weights (SIMD): `x` with each chunk of `2 · lanes` columns reordered as its odd
///   columns, then its even ones: the kernels split a chunk of bf16 weights into odd and
///   even halves with one AND and one shift (the high half of each 32-bit word already is
///   an f32), instead of widening every element. Columns after the last full chunk stay in
///   place.
/// * q8 / q4 weights: `x` and its 8-bit quantization ([`crate::quant::quantize_acts`]): the
///   kernels multiply the weights with 8-bit activations in integers, as llama.cpp does,
///   which spends a fraction of the instructions per weight byte of dequantizing to f32
///   (q4 with SIMD: in groups of blocks, [`crate::quant::group_q4_acts`]);
/// * otherwise `x` as given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Acts<'a> {
    pub(crate) x: &'a [f32],
    /// `[n, cols]` quantized values (quantized weights only; for q4 with SIMD, grouped as
    /// [`crate::quant::group_q4_acts`] describes, as are the two fields below).
    pub(crate) q: &'a [i8],
    /// `[n, cols / 4]`: `-Σ q` per group of four.
    pub(crate) neg_sums: &'a [i32],
    /// `[n, cols / 4]`: the block scale of each group of four.
    pub(crate) scales: &'a [f32],
    pub(crate) cols: usize,
}

impl<'a> Acts<'a> {
    /// No activations (a placeholder).
    pub(crate) const EMPTY: Acts<'static> = Acts { x: &[], q: &[], neg_sums: &[], scales: &[], cols: 0 };

    /// Tokens `t0..t1`.
    fn tokens(self, t0: usize, t1: usize) -> Acts<'a> {
        let (c, g) = (self.cols, self.cols / crate::quant::LANE);
        fn part<T>(v: &[T], per: usize, t0: usize, t1: usize) -> &[T] {
            if v.is_empty() {
                v
            } else {
                &v[t0 * per..t1 * per]
            }
        }
        Acts {
            x: part(self.x, c, t0, t1),
            q: part(self.q, c, t0, t1),
            neg_sums: part(self.neg_sums, g, t0, t1),
            scales: part(self.scales, g, t0, t1),
            cols: c,
        }
    }
}

/// Buffers for the prepared activations of one call (per thread, reused across calls).
#[derive(Default)]
struct ActScratch {
    x: Vec<f32>,
    q: Vec<i8>,
    neg_sums: Vec<i32>,
    scales: Vec<f32>,
}

thread_local! {
    static ACT_SCRATCH: std::cell::RefCell<ActScratch> = std::cell::RefCell::new(ActScratch::default());
}

/// How [`with_acts`] prepares activations.
#[derive(Clone, Copy, PartialEq)]
enum Prep {
    /// Odd/even order in chunks of this many columns.
    OddEven(usize),
    /// Quantized ([`crate::quant::quantize_acts`]); with a block count, then put in groups
    /// of that many blocks ([`crate::quant::group_q4_acts`]) for the q4 SIMD kernels.
    Quantize(Option<usize>),
}

/// Blocks per step of `isa`'s q4 kernel, which reads activations grouped that way
/// ([`crate::quant::group_q4_acts`]); `None` for the scalar kernel (natural order).
fn q4_blocks_per_step(isa: Isa) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            Isa::Avx512 if avx512::has_vnni() => Some(avx512::Q4_GROUP),
            // AVX-512 without VNNI multiplies quantized weights with the AVX2 kernel.
            Isa::Avx512 | Isa::Avx2 => Some(avx2::Q4_GROUP),
            Isa::Scalar => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        None
    }
}

/// How `isa`'s kernels for `w`'s format read activations (`None`: as given).
fn prep_for(isa: Isa, cols: usize, w: &MatRef<'_>) -> Option<Prep> {
    match (w.data, isa.bf16_chunk()) {
        (WeightsRef::Q8(_) | WeightsRef::Q8Tiles(_), _) => Some(Prep::Quantize(None)),
        (WeightsRef::Q4(_) | WeightsRef::Q4Tiles(_), _) => Some(Prep::Quantize(q4_blocks_per_step(isa))),
        (WeightsRef::Bf16(_), Some(chunk)) if cols >= chunk => Some(Prep::OddEven(chunk)),
        _ => None,
    }
}

/// Runs `f` on `x` (`n_tokens` rows of `cols`) as the `isa` kernels of `w`'s format read it
/// ([`Acts`]), prepared here in this thread's scratch (a fresh buffer if that is in use).
fn with_acts<R>(isa: Isa, x: &[f32], cols: usize, w: &MatRef<'_>, f: impl FnOnce(Acts<'_>) -> R) -> R {
    let prep = prep_for(isa, cols, w);
    let mut f = Some(f);
    let mut out = None;
    ACT_SCRATCH.with(|cell| {
        if let Ok(mut s) = cell.try_borrow_mut() {
            out = f.take().map(|f| f(prepare_acts(x, cols, prep, &mut s)));
        }
    });
    match f {
        // Re-entered on this thread (an inner call from a task of an outer one).
        Some(f) => f(prepare_acts(x, cols, prep, &mut ActScratch::default())),
        None => out.expect("the scratch closure ran"),
    }
}

/// Prepares `x` (`[n_tokens, cols]`) for `prep` in `s` and returns the view of it. Tokens
/// are prepared in parallel when there are many (prefill), since every other thread waits
/// for this: with a serial, scalar quantization, q8 prefill at 16 threads (lent H100 host)
/// ran at half the speed of the float kernels it replaced.
fn prepare_acts<'s>(x: &'s [f32], cols: usize, prep: Option<Prep>, s: &'s mut ActScratch) -> Acts<'s> {
    let Some(prep) = prep.filter(|_| !x.is_empty()) else {
        return Acts { x, q: &[], neg_sums: &[], scales: &[], cols };
    };
    let n = x.len();
    let n_tokens = n / cols;
    let g = cols / crate::quant::LANE;
    match prep {
        Prep::OddEven(_) => s.x.resize(n, 0.0),
        Prep::Quantize(_) => {
            s.q.resize(n, 0);
            s.neg_sums.resize(n_tokens * g, 0);
            s.scales.resize(n_tokens * g, 0.0);
        }
    }
    let (xo, qo, no, so) = (
        SyncPtr(s.x.as_mut_ptr()),
        SyncPtr(s.q.as_mut_ptr()),
        SyncPtr(s.neg_sums.as_mut_ptr()),
        SyncPtr(s.scales.as_mut_ptr()),
    );
    let token = |t: usize| {
        let xt = &x[t * cols..(t + 1) * cols];
        // SAFETY: each token writes only its own row of the buffers, which were sized above
        // for n_tokens rows and are exclusively borrowed (through `s`) for this call.
        unsafe {
            match prep {
                Prep::OddEven(chunk) => {
                    let o = std::slice::from_raw_parts_mut(xo.ptr().add(t * cols), cols);
                    let full = cols / chunk * chunk;
                    for (oc, xc) in o[..full].chunks_exact_mut(chunk).zip(xt[..full].chunks_exact(chunk)) {
                        let (odd, even) = oc.split_at_mut(chunk / 2);
                        for i in 0..chunk / 2 {
                            (odd[i], even[i]) = (xc[2 * i + 1], xc[2 * i]);
                        }
                    }
                    o[full..].copy_from_slice(&xt[full..]);
                }
                Prep::Quantize(grouped) => {
                    let q = std::slice::from_raw_parts_mut(qo.ptr().add(t * cols), cols);
                    let ns = std::slice::from_raw_parts_mut(no.ptr().add(t * g), g);
                    let ls = std::slice::from_raw_parts_mut(so.ptr().add(t * g), g);
                    crate::quant::quantize_acts(xt, q, ns, ls);
                    if let Some(blocks) = grouped {
                        crate::quant::group_q4_acts(blocks, q, ns, ls);
                    }
                }
            }
        }
    };
    if n_tokens > 1 && n >= MIN_PARALLEL_WORK / 2 {
        crate::parallel::for_each(n_tokens, token);
    } else {
        (0..n_tokens).for_each(token);
    }
    match prep {
        Prep::OddEven(_) => Acts { x: &s.x[..n], q: &[], neg_sums: &[], scales: &[], cols },
        Prep::Quantize(_) => Acts {
            x,
            q: &s.q[..n],
            neg_sums: &s.neg_sums[..n_tokens * g],
            scales: &s.scales[..n_tokens * g],
            cols,
        },
    }
}

/// `y[t, r] = Σ_c x[t, c] · W[r, c]` for every token `t` of `x` (`[n_tokens, cols]`),
/// `y` is `[n_tokens, rows]`. Parallel over output rows on the current rayon pool.
pub fn matmul(x: &[f32], w: MatRef<'_>, y: &mut [f32]) {
    matmul_with(active_isa(), x, w, y)
}

/// `x.len() / cols`, checked against `y` (`[n_tokens, rows]`).
fn token_count(x: &[f32], w: &MatRef<'_>, y: &[f32]) -> usize {
    let n_tokens = x.len().checked_div(w.cols).unwrap_or(y.len() / w.rows.max(1));
    assert_eq!(x.len(), n_tokens * w.cols, "x is not [n_tokens, cols]");
    assert_eq!(y.len(), n_tokens * w.rows, "y is not [n_tokens, rows]");
    n_tokens
}

/// [`matmul`] on a given ISA (tests compare ISAs through this). Panics if the CPU cannot
/// run `isa`.
pub fn matmul_with(isa: Isa, x: &[f32], w: MatRef<'_>, y: &mut [f32]) {
    if w.rows == 0 {
        return;
    }
    let n_tokens = token_count(x, &w, y);
    if n_tokens == 0 {
        return;
    }
    let kernel = select(isa);
    let rows = w.rows;
    let out = SyncPtr(y.as_mut_ptr());
    let rpt = rows_per_task(rows, n_tokens);
    let n_blocks = rows.div_ceil(rpt);
    with_acts(isa, x, w.cols, &w, |acts| {
        let block = |b: usize| {
            let r0 = b * rpt;
            let r1 = (r0 + rpt).min(rows);
            // SAFETY: y is [n_tokens, rows] (asserted) and row blocks are disjoint.
            unsafe { row_block(kernel, acts, n_tokens, w, r0, r1, out, rows) };
        };
        if n_blocks == 1 || rows * w.cols * n_tokens < MIN_PARALLEL_WORK {
            (0..n_blocks).for_each(block);
        } else {
            crate::parallel::for_each(n_blocks, block);
        }
    })
}

/// Computes rows `r0..r1` (at most [`ROWS_PER_TASK`] when `n_tokens > 1`) of `y = x · Wᵀ` for all tokens into
/// `out[t * out_stride + r]`.
///
/// # Safety
/// `out` is valid for writes at `t * out_stride + r` for `t < n_tokens`, `r` in `r0..r1`,
/// and no one else accesses those elements during the call.
unsafe fn row_block(
    kernel: Kernel,
    x: Acts<'_>,
    n_tokens: usize,
    w: MatRef<'_>,
    r0: usize,
    r1: usize,
    out: SyncPtr,
    out_stride: usize,
) {
    let wb = w.row_range(r0, r1);
    if n_tokens == 1 {
        // SAFETY: one token: out[r0..r1] is ours (caller contract).
        let yb = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(r0), r1 - r0) };
        kernel(x, 1, wb, yb, r1 - r0);
        return;
    }
    debug_assert!(r1 - r0 <= ROWS_PER_TASK);
    let mut local = [0f32; ROWS_PER_TASK * TOK_CHUNK];
    let mut t0 = 0;
    while t0 < n_tokens {
        let nt = TOK_CHUNK.min(n_tokens - t0);
        kernel(x.tokens(t0, t0 + nt), nt, wb, &mut local, ROWS_PER_TASK);
        for t in 0..nt {
            // SAFETY: out[(t0 + t) * out_stride + r0 .. + (r1 - r0)] is ours (caller
            // contract); `local` is a distinct stack buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    local.as_ptr().add(t * ROWS_PER_TASK),
                    out.ptr().add((t0 + t) * out_stride + r0),
                    r1 - r0,
                );
            }
        }
        t0 += nt;
    }
}

/// Hints the cache line holding `p` into L2 (T1 measured slightly better than T0 here). Never faults: `p` need not point to
/// valid memory (callers compute it with `wrapping_add`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: a prefetch is only a hint; it never dereferences or faults, whatever `p`.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p as *const i8) }
}

/// Every f16 bit pattern converted to f32 (exact), built on first use: quantized kernels
/// read block scales through it.
#[cfg(target_arch = "x86_64")]
fn f16_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Box<[f32]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect())
}

thread_local! {
    /// Row-major copies of one tile and its outputs for [`untiled`] (grow, never shrink).
    static UNTILE_SCRATCH: std::cell::RefCell<UntileScratch> = std::cell::RefCell::new(UntileScratch::default());
}

#[derive(Default)]
struct UntileScratch {
    q8: Vec<BlockQ8>,
    q4: Vec<BlockQ4>,
    y: Vec<f32>,
}

/// `kernel` over row tiles ([`crate::row_tiles`]) for the ISAs without a tiled kernel: each
/// tile copied back to row-major blocks, then the row-major kernel (so the same products
/// as the row-major weights).
fn untiled(kernel: Kernel, x: Acts<'_>, n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
    let (t, kind) = match w.data {
        WeightsRef::Q8Tiles(t) => (t, TileKind::Q8),
        WeightsRef::Q4Tiles(t) => (t, TileKind::Q4),
        _ => unreachable!("untiled takes tiled weights"),
    };
    let (rows, cols) = (w.rows, w.cols);
    let nb = cols / QK;
    let mut run = |s: &mut UntileScratch| {
        s.y.resize(n_tokens * TILE_ROWS, 0.0);
        let mut r0 = 0;
        while r0 < rows {
            let rt = TILE_ROWS.min(rows - r0);
            let tile = &t[r0 * nb * kind.block_bytes()..(r0 + rt) * nb * kind.block_bytes()];
            let data = match kind {
                TileKind::Q8 => {
                    s.q8.resize(TILE_ROWS * nb, BlockQ8 { d: f16::ZERO, qs: [0; QK] });
                    for r in 0..rt {
                        crate::row_tiles::untile_q8_row(tile, rt, cols, r, &mut s.q8[r * nb..(r + 1) * nb]);
                    }
                    WeightsRef::Q8(&s.q8[..rt * nb])
                }
                TileKind::Q4 => {
                    s.q4.resize(TILE_ROWS * nb, BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] });
                    for r in 0..rt {
                        crate::row_tiles::untile_q4_row(tile, rt, cols, r, &mut s.q4[r * nb..(r + 1) * nb]);
                    }
                    WeightsRef::Q4(&s.q4[..rt * nb])
                }
            };
            let m = MatRef { data, rows: rt, cols, stride: cols };
            kernel(x, n_tokens, m, &mut s.y, rt);
            for tk in 0..n_tokens {
                y[tk * y_stride + r0..tk * y_stride + r0 + rt].copy_from_slice(&s.y[tk * rt..(tk + 1) * rt]);
            }
            r0 += rt;
        }
    };
    UNTILE_SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => run(&mut s),
        Err(_) => run(&mut UntileScratch::default()),
    });
}

/// A kernel for `n_tokens` tokens with `y` of stride `y_stride` per token.
type Kernel = fn(Acts<'_>, usize, MatRef<'_>, &mut [f32], usize);

fn select(isa: Isa) -> Kernel {
    assert!(isa.is_supported(), "ISA {} is not supported by this CPU", isa.name());
    match isa {
        Isa::Scalar => scalar::matmul,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::matmul,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::matmul,
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::matmul,
    }
}

/// One dot product `Σ x[c] · w[c]` on the given ISA: the reduction every matmul output uses.
pub fn dot_row(isa: Isa, x: &[f32], w: MatRef<'_>, r: usize) -> f32 {
    if w.is_tiled() {
        // The tile holding row r (a row of a tile cannot be cut out; its dot product is
        // the same computed with its tile's).
        let (t0, t1) = (r / TILE_ROWS * TILE_ROWS, (r / TILE_ROWS * TILE_ROWS + TILE_ROWS).min(w.rows));
        let tile = w.row_range(t0, t1);
        let mut y = [0f32; TILE_ROWS];
        with_acts(isa, x, w.cols, &tile, |acts| select(isa)(acts, 1, tile, &mut y[..t1 - t0], t1 - t0));
        return y[r - t0];
    }
    let mut y = [0f32];
    let row = w.row_range(r, r + 1);
    with_acts(isa, x, w.cols, &row, |acts| select(isa)(acts, 1, row, &mut y, 1));
    y[0]
}

/// [`axpy_rows_with`] on the active ISA.
pub fn axpy_rows<'a>(a: &[f32], w: impl Into<AxpyRef<'a>>, y: &mut [f32]) {
    axpy_rows_with(active_isa(), a, w, y)
}

/// Rows of `W` (terms of the sum over j) per task of [`axpy_rows_with`]. A constant: the
/// SIMD reduction order is "each block of this many rows from zero in ascending j, then the
/// block sums added to y in block order", which must not depend on the thread count.
/// Blocks of whole rows keep each thread's reads long and contiguous (splitting columns
/// instead makes every core's prefetchers pull whole rows, doubling DRAM traffic).
const AXPY_ROWS_PER_TASK: usize = 128;
// Row blocks of grouped matrices must hold whole groups.
const _: () = assert!(AXPY_ROWS_PER_TASK.is_multiple_of(crate::row_groups::GROUP_ROWS));

thread_local! {
    /// Per-thread buffer for the block sums of [`axpy_rows_with`] (grows, never shrinks).
    static AXPY_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y[t, :] += Σ_j a[t, j] · W[j, :]` (the transposed product `a · W`), with `a`:
/// `[n_tokens, rows]` and `y`: `[n_tokens, cols]`.
///
/// Scalar: one `y += a·w` pass per row j in ascending order (the oracle). SIMD: blocks of
/// `AXPY_ROWS_PER_TASK` (128) rows are summed from zero (FMA, j ascending) in parallel, then
/// added to `y` in block order; the order depends only on the ISA and `rows`, never on the
/// batch or the thread count. Block sums live in a per-thread scratch buffer reused across
/// calls (allocated on first use only).
pub fn axpy_rows_with<'a>(isa: Isa, a: &[f32], w: impl Into<AxpyRef<'a>>, y: &mut [f32]) {
    let w = w.into();
    assert!(isa.is_supported(), "ISA {} is not supported by this CPU", isa.name());
    let (rows, cols) = (w.rows(), w.cols());
    if cols == 0 {
        return;
    }
    let n_tokens = y.len() / cols;
    assert_eq!(y.len(), n_tokens * cols, "y is not [n_tokens, cols]");
    assert_eq!(a.len(), n_tokens * rows, "a is not [n_tokens, rows]");
    if n_tokens == 0 || rows == 0 {
        return;
    }
    let Some(kernel) = axpy_kernel(isa) else {
        scalar_axpy(a, n_tokens, w, y);
        return;
    };
    let n_blocks = rows.div_ceil(AXPY_ROWS_PER_TASK);
    let part = n_tokens * cols;
    with_block_sums(n_blocks * part, |sums| {
        let block = |b: usize, p: &mut [f32]| {
            let r0 = b * AXPY_ROWS_PER_TASK;
            let r1 = (r0 + AXPY_ROWS_PER_TASK).min(rows);
            p.fill(0.0);
            kernel.run(&a[r0..], rows, n_tokens, w.row_range(r0, r1), p);
        };
        for_each_part(sums, part, rows * cols * n_tokens >= MIN_PARALLEL_WORK, block);
        add_block_sums(sums, part, y);
    });
}

/// The SIMD `axpy` kernel of `isa`, or `None` for the scalar oracle (which sums row by row
/// straight into `y`, without blocks).
fn axpy_kernel(isa: Isa) -> Option<AxpyKernel> {
    assert!(isa.is_supported(), "ISA {} is not supported by this CPU", isa.name());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Some(AxpyKernel { rows: avx2::axpy_rows, groups: groups_avx2::axpy_groups }),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(AxpyKernel { rows: avx512::axpy_rows, groups: groups_avx512::axpy_groups }),
        _ => None,
    }
}

/// The scalar oracle of [`axpy_rows_with`]: row by row (groups: group by group) straight
/// into `y`, without blocks.
fn scalar_axpy(a: &[f32], n_tokens: usize, w: AxpyRef<'_>, y: &mut [f32]) {
    match w {
        AxpyRef::Rows(m) => scalar::axpy_rows(a, n_tokens, m, y),
        AxpyRef::Groups(m) => crate::row_groups::axpy_scalar(a, m.rows(), n_tokens, m, y),
    }
}

/// `f(b, part b of sums)` for every part of `part` values, in parallel when `parallel`.
fn for_each_part(sums: &mut [f32], part: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    let n = sums.len() / part;
    if !parallel {
        sums.chunks_mut(part).enumerate().for_each(|(b, p)| f(b, p));
        return;
    }
    let base = SyncPtr(sums.as_mut_ptr());
    crate::parallel::for_each(n, |b| {
        // SAFETY: parts b·part .. (b+1)·part are disjoint and inside `sums`, which is
        // exclusively borrowed for the whole loop; each b runs once.
        let p = unsafe { std::slice::from_raw_parts_mut(base.ptr().add(b * part), part) };
        f(b, p)
    });
}

/// `y += Σ_b sums[b]` over the blocks of `part` values, in block order.
fn add_block_sums(sums: &[f32], part: usize, y: &mut [f32]) {
    for p in sums.chunks(part) {
        for (yv, &pv) in y.iter_mut().zip(p) {
            *yv += pv;
        }
    }
}

/// Runs `f` on `need` floats of this thread's block-sum scratch (reused across calls;
/// allocated on first use), or on a fresh buffer if the scratch is already in use.
fn with_block_sums(need: usize, f: impl FnOnce(&mut [f32])) {
    let mut f = Some(f);
    AXPY_SCRATCH.with(|s| {
        if let Ok(mut buf) = s.try_borrow_mut() {
            if let Some(f) = f.take() {
                f(aligned_part(&mut buf, need));
            }
        }
    });
    if let Some(f) = f {
        // Re-entered on this thread (a rayon task of an outer call): a fresh buffer.
        f(&mut vec![0f32; need]);
    }
}

/// `need` floats of `buf` starting on a 64-byte boundary (grown as needed): the kernels
/// load and store whole cache lines of it, and a vector that straddles two lines costs two
/// accesses.
fn aligned_part(buf: &mut Vec<f32>, need: usize) -> &mut [f32] {
    const LINE_FLOATS: usize = 16;
    if buf.len() < need + LINE_FLOATS {
        buf.resize(need + LINE_FLOATS, 0.0);
    }
    let off = buf.as_ptr().align_offset(64).min(LINE_FLOATS);
    &mut buf[off..off + need]
}

/// A SIMD `axpy` kernel (see `avx2::axpy_rows`) over `(a, a_stride, n_tokens, w, y)`.
#[derive(Clone, Copy)]
struct AxpyKernel {
    rows: fn(&[f32], usize, usize, MatRef<'_>, &mut [f32]),
    groups: fn(&[f32], usize, usize, GroupedRef<'_>, &mut [f32]),
}

impl AxpyKernel {
    fn run(&self, a: &[f32], a_stride: usize, n_tokens: usize, w: AxpyRef<'_>, y: &mut [f32]) {
        match w {
            AxpyRef::Rows(m) => (self.rows)(a, a_stride, n_tokens, m, y),
            AxpyRef::Groups(m) => (self.groups)(a, a_stride, n_tokens, m, y),
        }
    }
}
