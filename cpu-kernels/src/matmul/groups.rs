//! The walk shared by the SIMD kernels of the grouped quantized `axpy`
//! ([`crate::row_groups`]): one group at a time for one token, two for several
//! ([`pass_groups`]), every token, blocks in chunks whose activations are prepared together.

use crate::quant::QK;
use crate::row_groups::{GroupedRef, GROUP_ROWS};

/// Groups per pass. Two share each `y` load and store (faster with the weights in cache:
/// `kcache` q8 36 vs 28 G weights/s, prefill q4 +12–15%, q8 +7–15%); from plain groups they
/// read two streams, and one read faster from DRAM, where one token's experts come from
/// (`kbench` `ag`, q8 27.0/27.8 → 29.6/28.5 GB/s); paired groups are one stream, so two.
/// Either way every output sees the groups in the same order.
fn pass_groups(n_tokens: usize, paired: bool) -> usize {
    if n_tokens == 1 && !paired {
        1
    } else {
        2
    }
}

/// Software prefetch distance in groups (1, 2, 3 and 4 measured level).
const PREFETCH_GROUPS: usize = 2;

/// Blocks prepared per pass (stack buffers; any `cols` works in several passes).
pub(super) const CHUNK: usize = 64;

/// One group's prepared activations for a chunk of blocks ([`crate::row_groups::prep_block`]):
/// the four `ã` as the bytes of one i32 (byte k: row k), the offset correction
/// `−offset · Σ ã` for kernels that read weights as unsigned bytes, and the scale `s`.
#[derive(Clone, Copy)]
pub(super) struct Prepared {
    pub qa: [i32; CHUNK],
    pub corr: [i32; CHUNK],
    pub s: [f32; CHUNK],
}

impl Prepared {
    pub const ZERO: Prepared = Prepared { qa: [0; CHUNK], corr: [0; CHUNK], s: [0.0; CHUNK] };
}

/// One pass: one or two consecutive groups, one token, one chunk of blocks.
pub(super) struct Pass {
    /// 1 or 2.
    pub groups: usize,
    /// The groups' units of block 0 (the second equals the first when `groups == 1`); block
    /// `b`'s are `b · unit_stride` further.
    pub units: [*const u8; 2],
    pub unit_stride: usize,
    /// The activations of the groups' rows for this token (zero for missing rows).
    pub act: [[f32; GROUP_ROWS]; 2],
    /// The groups' scales, row by row: row k's block b at `scales[gi] + 2 · (k · nb + b)`.
    pub scales: [*const u8; 2],
    /// Blocks `b0 .. b0 + n` of every row.
    pub b0: usize,
    pub n: usize,
    /// This token's row of `y` (`cols` values).
    pub y: *mut f32,
    /// Bytes from a unit to the one read [`PREFETCH_GROUPS`] groups later (a prefetch
    /// distance), or 0: no software prefetches ([`crate::dispatch::Streaming::Sequential`]).
    pub prefetch: usize,
}

/// Panics unless `a` holds `n_tokens` rows (stride `a_stride`) of `w.rows()` values and `y`
/// `n_tokens` rows of `w.cols()`.
pub(super) fn check(a: &[f32], a_stride: usize, n_tokens: usize, w: &GroupedRef<'_>, y: &[f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    if n_tokens > 0 && rows > 0 {
        assert!(a_stride >= rows && a.len() >= (n_tokens - 1) * a_stride + rows, "a too short");
    }
    assert!(y.len() >= n_tokens * cols, "y too short");
}

/// The passes of one call, in order: for each pair of groups, for each token, for each
/// chunk. Each output element sees its groups in ascending order.
pub(super) struct Passes<'a> {
    a: &'a [f32],
    a_stride: usize,
    n_tokens: usize,
    w: GroupedRef<'a>,
    y: *mut f32,
    g: usize,
    t: usize,
    b0: usize,
    pass_groups: usize,
    /// Whether the passes issue software prefetches ([`crate::dispatch::Streaming`]).
    prefetch: bool,
}

impl<'a> Passes<'a> {
    /// `a`, `y` as [`check`] asserts (the caller has called it); `y` is exclusively ours.
    pub(super) fn new(
        a: &'a [f32],
        a_stride: usize,
        n_tokens: usize,
        w: GroupedRef<'a>,
        y: &'a mut [f32],
    ) -> Self {
        let empty = n_tokens == 0 || w.rows() == 0 || w.cols() == 0;
        Passes {
            a,
            a_stride,
            n_tokens,
            w,
            y: y.as_mut_ptr(),
            g: if empty { usize::MAX } else { 0 },
            t: 0,
            b0: 0,
            pass_groups: pass_groups(n_tokens, w.is_paired()),
            prefetch: n_tokens != 1 || crate::dispatch::streaming() == crate::dispatch::Streaming::Prefetched,
        }
    }

    pub(super) fn next_pass(&mut self) -> Option<Pass> {
        let (rows, cols) = (self.w.rows(), self.w.cols());
        let (ng, nb) = (rows.div_ceil(GROUP_ROWS), cols / QK);
        if self.g >= ng {
            return None;
        }
        let (g, t, b0) = (self.g, self.t, self.b0);
        let groups = if self.pass_groups == 2 && g + 1 < ng { 2 } else { 1 };
        let n = CHUNK.min(nb - b0);
        let mut act = [[0f32; GROUP_ROWS]; 2];
        for (gi, act) in act.iter_mut().enumerate().take(groups) {
            for (k, v) in act.iter_mut().enumerate() {
                let r = (g + gi) * GROUP_ROWS + k;
                if r < rows {
                    *v = self.a[t * self.a_stride + r];
                }
            }
        }
        let (w, data) = (&self.w, self.w.data().as_ptr());
        let gb = w.kind().group_bytes(cols);
        // Advance: chunk, then token, then pair.
        self.b0 += CHUNK;
        if self.b0 >= nb {
            self.b0 = 0;
            self.t += 1;
            if self.t == self.n_tokens {
                self.t = 0;
                self.g += groups;
            }
        }
        // In bounds: groups g and g + groups - 1 exist.
        let last = g + groups - 1;
        Some(Pass {
            groups,
            units: [data.wrapping_add(w.unit_at(g)), data.wrapping_add(w.unit_at(last))],
            unit_stride: w.unit_stride(g),
            act,
            scales: [data.wrapping_add(w.scales_at(g)), data.wrapping_add(w.scales_at(last))],
            b0,
            n,
            y: self.y.wrapping_add(t * cols),
            prefetch: if self.prefetch { PREFETCH_GROUPS * gb } else { 0 },
        })
    }
}

/// Defines, in the invoking ISA module (which has `prep` and `unit`), `run_checked`: the
/// grouped `axpy` of one block of rows after [`check`], and `run`, its walk over [`Passes`].
macro_rules! grouped_axpy {
    (feat: $feat:literal) => {
        /// [`super::groups::check`]s the shapes, then runs the kernel for `w`'s format.
        ///
        /// # Safety
        /// The CPU has the features of this module.
        unsafe fn run_checked(a: &[f32], a_stride: usize, n_tokens: usize, w: GroupedRef<'_>, y: &mut [f32]) {
            super::groups::check(a, a_stride, n_tokens, &w, y);
            // SAFETY: features present (caller); shapes checked just above.
            unsafe {
                match w.kind() {
                    GroupKind::Q8 => run::<0>(a, a_stride, n_tokens, w, y),
                    GroupKind::Q4 => run::<1>(a, a_stride, n_tokens, w, y),
                }
            }
        }

        /// # Safety
        /// The features of this module present; shapes as [`super::groups::check`] asserts.
        #[target_feature(enable = $feat)]
        unsafe fn run<const Q: u8>(
            a: &[f32],
            a_stride: usize,
            n_tokens: usize,
            w: GroupedRef<'_>,
            y: &mut [f32],
        ) {
            let nb = w.cols() / QK;
            // Bytes of a group's scales.
            let scale_bytes = 2 * GROUP_ROWS * nb;
            let offset = w.kind().offset();
            let mut prepared = [Prepared::ZERO; 2];
            let mut passes = Passes::new(a, a_stride, n_tokens, w, y);
            while let Some(pass) = passes.next_pass() {
                // SAFETY: the pass's groups hold nb blocks each and its y row cols = nb · 32
                // values (Passes); the CPU features hold (caller).
                unsafe {
                    for gi in 0..pass.groups {
                        prep(pass.scales[gi], nb, pass.b0, pass.n, pass.act[gi], offset, &mut prepared[gi]);
                        // The scales of the group the unit prefetches aim at.
                        let mut off = 0;
                        while pass.prefetch != 0 && off < scale_bytes {
                            prefetch(pass.scales[gi].wrapping_add(pass.prefetch + off));
                            off += 64;
                        }
                    }
                    for i in 0..pass.n {
                        let b = pass.b0 + i;
                        let yb = pass.y.add(b * QK);
                        let off = b * pass.unit_stride;
                        let u = [pass.units[0].add(off), pass.units[1].add(off)];
                        if pass.groups == 2 {
                            unit::<Q, 2>(u, &prepared, i, yb, pass.prefetch);
                        } else {
                            unit::<Q, 1>([u[0]], &prepared, i, yb, pass.prefetch);
                        }
                    }
                }
            }
        }
    };
}

pub(super) use grouped_axpy;
