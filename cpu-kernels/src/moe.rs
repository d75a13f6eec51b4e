//! The SwiGLU expert `down(silu(gate(x)) · up(x))` over the tokens routed to it.
//!
//! An expert is read row-wise: gate row j, up row j and down *column* j (row j of `downᵀ`)
//! are what intermediate neuron j needs. [`ExpertRef`] views those rows in any layout:
//! separate matrices (in-memory weights, with `downᵀ` made at load) or one row-column
//! bundle `[ffn][gate | up | downᵀ][hidden]` (the on-disk expert store), with the same
//! arithmetic, so a model gives the same numbers whichever tier its experts come from.

use crate::dispatch::{active_isa, Isa};
use crate::matmul::{matmul_with, AxpyRef, MatRef, WeightsRef};
use crate::KernelError;

/// Rows of one expert: `gate`, `up` and `down_t` are each `[ffn, hidden]` (`down_t` as rows,
/// or for quantized weights in groups of four rows, [`crate::row_groups`]).
#[derive(Debug, Clone, Copy)]
pub struct ExpertRef<'a> {
    gate: MatRef<'a>,
    up: MatRef<'a>,
    down_t: AxpyRef<'a>,
    /// `[2 · ffn, hidden]` with row `2j` = gate row `j`, `2j + 1` = up row `j`, when the
    /// expert was made by [`ExpertRef::interleaved`] (`gate` and `up` then view its rows).
    gate_up: Option<MatRef<'a>>,
}

impl<'a> ExpertRef<'a> {
    pub fn new(
        gate: MatRef<'a>,
        up: MatRef<'a>,
        down_t: impl Into<AxpyRef<'a>>,
    ) -> Result<Self, KernelError> {
        let down_t = down_t.into();
        let shape = (gate.rows(), gate.cols());
        for m in [(up.rows(), up.cols()), (down_t.rows(), down_t.cols())] {
            if m != shape {
                return Err(KernelError::WeightLength {
                    rows: shape.0,
                    cols: shape.1,
                    expected: shape.0 * shape.1,
                    actual: m.0 * m.1,
                });
            }
        }
        Ok(Self { gate, up, down_t, gate_up: None })
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
        let (ffn, s) = (rows / 2, gate_up.stride());
        let data = gate_up.data();
        let gate = MatRef::strided(data, ffn, hidden, 2 * s)?;
        let up = MatRef::strided(data.slice(s.min(data.len()), data.len()), ffn, hidden, 2 * s)?;
        let mut e = Self::new(gate, up, down_t)?;
        e.gate_up = Some(gate_up);
        Ok(e)
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
        Ok(Self { gate: part(0)?, up: part(1)?, down_t: part(2)?.into(), gate_up: None })
    }

    pub fn gate(&self) -> MatRef<'a> {
        self.gate
    }
    pub fn up(&self) -> MatRef<'a> {
        self.up
    }
    pub fn down_t(&self) -> AxpyRef<'a> {
        self.down_t
    }
    pub fn ffn(&self) -> usize {
        self.gate.rows()
    }
    pub fn hidden(&self) -> usize {
        self.gate.cols()
    }
    /// Bytes one pass over the expert reads.
    pub fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down_t.size_bytes()
    }
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
    tokens(x, &e, out);
    crate::matmul::swiglu_with(isa, x, e.gate, e.up, e.gate_up, e.down_t, act, out);
}

/// The unfused composition (matmul gate, matmul up, silu·mul, axpy with `downᵀ`): the
/// reference the fused kernel is tested against.
pub fn expert_swiglu_unfused_with(isa: Isa, x: &[f32], e: ExpertRef<'_>, act: &mut [f32], out: &mut [f32]) {
    let n = tokens(x, &e, out);
    let (g, u) = split_act(act, n, e.ffn());
    matmul_with(isa, x, e.gate, g);
    matmul_with(isa, x, e.up, u);
    crate::activation::silu_mul(g, u);
    out.fill(0.0);
    crate::matmul::axpy_rows_with(isa, g, e.down_t, out);
}
