//! The SwiGLU expert `down(silu(gate(x)) · up(x))` over the tokens routed to it.
//!
//! An expert is read row-wise: gate row j, up row j and down *column* j (row j of `downᵀ`)
//! are what intermediate neuron j needs. [`ExpertRef`] views those rows in any layout:
//! separate matrices (in-memory weights, with `downᵀ` made at load) or one row-column
//! bundle `[ffn][gate | up | downᵀ][hidden]` (the on-disk expert store), with the same
//! arithmetic, so a model gives the same numbers whichever tier its experts come from.

use std::ops::Range;

use crate::dispatch::{active_isa, Isa};
use crate::matmul::{matmul_with, AxpyRef, MatRef, WeightsRef};
use crate::KernelError;

/// An expert's gate and up projections, each `[ffn, hidden]`.
#[derive(Debug, Clone, Copy)]
pub enum GateUpRef<'a> {
    /// Two matrices (or two strided views of one bundle).
    Separate { gate: MatRef<'a>, up: MatRef<'a> },
    /// One `[2 · ffn, hidden]` matrix, row `2j` = gate row `j`, row `2j + 1` = up row `j`
    /// (any layout, row tiles included: [`crate::row_tiles`]).
    Interleaved(MatRef<'a>),
}

impl<'a> GateUpRef<'a> {
    /// `(ffn, hidden)`.
    fn shape(&self) -> (usize, usize) {
        match self {
            GateUpRef::Separate { gate, .. } => (gate.rows(), gate.cols()),
            GateUpRef::Interleaved(m) => (m.rows() / 2, m.cols()),
        }
    }
    fn size_bytes(&self) -> usize {
        match self {
            GateUpRef::Separate { gate, up } => gate.size_bytes() + up.size_bytes(),
            GateUpRef::Interleaved(m) => m.size_bytes(),
        }
    }
}

/// Rows of one expert: gate and up ([`GateUpRef`]) and `down_t`, each `[ffn, hidden]`
/// (`down_t` as rows, or for quantized weights in groups of four rows,
/// [`crate::row_groups`]).
#[derive(Debug, Clone, Copy)]
pub struct ExpertRef<'a> {
    gate_up: GateUpRef<'a>,
    down_t: AxpyRef<'a>,
}

impl<'a> ExpertRef<'a> {
    pub fn new(
        gate: MatRef<'a>,
        up: MatRef<'a>,
        down_t: impl Into<AxpyRef<'a>>,
    ) -> Result<Self, KernelError> {
        if (up.rows(), up.cols()) != (gate.rows(), gate.cols()) {
            return Err(shape_err(gate.rows(), gate.cols(), up.rows() * up.cols()));
        }
        Self::checked(GateUpRef::Separate { gate, up }, down_t.into())
    }

    /// Gate and up rows interleaved in one matrix `gate_up` (`[2 · ffn, hidden]`: row `2j`
    /// gate row `j`, row `2j + 1` up row `j`), `downᵀ` apart: the fused kernel reads gate and
    /// up as one stream. Same numbers as [`ExpertRef::new`] on the same rows.
    pub fn interleaved(gate_up: MatRef<'a>, down_t: impl Into<AxpyRef<'a>>) -> Result<Self, KernelError> {
        let (rows, hidden) = (gate_up.rows(), gate_up.cols());
        if !rows.is_multiple_of(2) {
            return Err(KernelError::WeightLength {
                rows,
                cols: hidden,
                expected: (rows + 1) * hidden,
                actual: rows * hidden,
            });
        }
        Self::checked(GateUpRef::Interleaved(gate_up), down_t.into())
    }

    fn checked(gate_up: GateUpRef<'a>, down_t: AxpyRef<'a>) -> Result<Self, KernelError> {
        let (ffn, hidden) = gate_up.shape();
        if (down_t.rows(), down_t.cols()) != (ffn, hidden) {
            return Err(shape_err(ffn, hidden, down_t.rows() * down_t.cols()));
        }
        Ok(Self { gate_up, down_t })
    }

    /// Views a row-column bundle: for each neuron j, `hidden` gate weights, `hidden` up
    /// weights, then `hidden` weights of down column j.
    pub fn bundled(data: WeightsRef<'a>, ffn: usize, hidden: usize) -> Result<Self, KernelError> {
        let n = 3 * ffn * hidden;
        if data.len() != n {
            return Err(KernelError::WeightLength {
                rows: 3 * ffn,
                cols: hidden,
                expected: n,
                actual: data.len(),
            });
        }
        let part = |i: usize| MatRef::strided(data.slice(i * hidden, n), ffn, hidden, 3 * hidden);
        Self::new(part(0)?, part(1)?, part(2)?)
    }

    pub fn gate_up(&self) -> GateUpRef<'a> {
        self.gate_up
    }
    pub fn down_t(&self) -> AxpyRef<'a> {
        self.down_t
    }
    pub fn ffn(&self) -> usize {
        self.gate_up.shape().0
    }
    pub fn hidden(&self) -> usize {
        self.gate_up.shape().1
    }
    /// Bytes one pass over the expert reads.
    pub fn size_bytes(&self) -> usize {
        self.gate_up.size_bytes() + self.down_t.size_bytes()
    }
}

fn shape_err(ffn: usize, hidden: usize, actual: usize) -> KernelError {
    KernelError::WeightLength { rows: ffn, cols: hidden, expected: ffn * hidden, actual }
}

/// `out = down(silu(gate(x)) · up(x))` for `x`: `[n, hidden]`; `act`: scratch of at least
/// `2 * n * ffn` floats; `out`: `[n, hidden]`, overwritten.
///
/// Fused per block of 128 neurons: one task computes the block's gate and up rows for all
/// `n` tokens, applies SiLU·mul, and adds the block's rows of `downᵀ` into its own block sum
/// (no barrier between the projections; each task reads its part of the expert once). The
/// block sums are added in block order (see [`crate::matmul::axpy_rows_with`]), so the
/// result is bit-identical to [`expert_swiglu_unfused_with`], whatever the thread count,
/// the number of tokens or the layout ([`ExpertRef::bundled`] or separate matrices).
pub fn expert_swiglu(x: &[f32], e: ExpertRef<'_>, act: &mut [f32], out: &mut [f32]) {
    expert_swiglu_with(active_isa(), x, e, act, out)
}

fn split_act(act: &mut [f32], n: usize, ffn: usize) -> (&mut [f32], &mut [f32]) {
    assert!(act.len() >= 2 * n * ffn, "act scratch too small");
    let (g, rest) = act.split_at_mut(n * ffn);
    (g, &mut rest[..n * ffn])
}

fn tokens(x: &[f32], e: &ExpertRef<'_>, out: &[f32]) -> usize {
    let n = x.len().checked_div(e.hidden()).unwrap_or(0);
    assert_eq!(x.len(), n * e.hidden(), "x is not [n, hidden]");
    assert_eq!(out.len(), n * e.hidden(), "out is not [n, hidden]");
    n
}

/// [`expert_swiglu`] on a given ISA.
pub fn expert_swiglu_with(isa: Isa, x: &[f32], e: ExpertRef<'_>, act: &mut [f32], out: &mut [f32]) {
    let n = tokens(x, &e, out);
    crate::matmul::swiglu_experts_with(isa, x, &[(e, 0..n)], act, out);
}

/// Experts one call of [`experts_swiglu`] runs in one parallel loop at most (more run in
/// groups of this many). Enough for a decode step's top-k of today's models.
pub const EXPERTS_PER_LOOP: usize = 8;

/// [`expert_swiglu`] for several experts at once, each over its own rows: expert `i`
/// computes rows `experts[i].1` of `out` (`[n, hidden]`) from the same rows of `x`
/// (`[n, hidden]`), with the same rows of `act` (`[n, 2 · ffn]` floats at least) as
/// scratch. The ranges must be ascending and disjoint, and the experts of one shape; rows
/// that no range covers are left unchanged.
///
/// Every expert's blocks run in one parallel loop (up to [`EXPERTS_PER_LOOP`] experts), so
/// a decode step's small experts pay one loop's start and end instead of one each. The
/// results are bit-identical to [`expert_swiglu`] on each expert alone.
pub fn experts_swiglu(
    x: &[f32],
    experts: &[(ExpertRef<'_>, Range<usize>)],
    act: &mut [f32],
    out: &mut [f32],
) {
    experts_swiglu_with(active_isa(), x, experts, act, out)
}

/// [`experts_swiglu`] on a given ISA.
pub fn experts_swiglu_with(
    isa: Isa,
    x: &[f32],
    experts: &[(ExpertRef<'_>, Range<usize>)],
    act: &mut [f32],
    out: &mut [f32],
) {
    crate::matmul::swiglu_experts_with(isa, x, experts, act, out);
}

/// The unfused composition (matmul gate, matmul up, silu·mul, axpy with `downᵀ`): the
/// reference the fused kernel is tested against.
pub fn expert_swiglu_unfused_with(isa: Isa, x: &[f32], e: ExpertRef<'_>, act: &mut [f32], out: &mut [f32]) {
    let n = tokens(x, &e, out);
    let g = gate_up_act(isa, x, n, e.gate_up, act);
    out.fill(0.0);
    crate::matmul::axpy_rows_with(isa, g, e.down_t, out);
}

/// `silu(gate · x) ⊙ (up · x)` for `n` tokens, unfused, in `act` (at least `2 · n · ffn`
/// floats); returns its first `n · ffn` values, `[n, ffn]`. Interleaved rows are computed as
/// one matmul (the same dot products), paired, then packed.
pub(crate) fn gate_up_act<'s>(
    isa: Isa,
    x: &[f32],
    n: usize,
    gate_up: GateUpRef<'_>,
    act: &'s mut [f32],
) -> &'s mut [f32] {
    let ffn = gate_up.shape().0;
    match gate_up {
        GateUpRef::Separate { gate, up } => {
            let (g, u) = split_act(act, n, ffn);
            matmul_with(isa, x, gate, g);
            matmul_with(isa, x, up, u);
            crate::activation::silu_mul(g, u);
        }
        GateUpRef::Interleaved(gu) => {
            assert!(act.len() >= 2 * n * ffn, "act scratch too small");
            matmul_with(isa, x, gu, &mut act[..2 * n * ffn]);
            for t in 0..n {
                crate::activation::silu_mul_pairs(&mut act[2 * t * ffn..2 * (t + 1) * ffn]);
                act.copy_within(2 * t * ffn..2 * t * ffn + ffn, t * ffn);
            }
        }
    }
    &mut act[..n * ffn]
}
