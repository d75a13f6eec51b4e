//! The several-token `axpy` over rows of `downᵀ` (prefill), written once for both SIMD
//! widths: `avx2.rs` and `avx512.rs` instantiate [`axpy_token_tiles`] with their
//! intrinsics, and it uses their `LANES`, `AXPY_ROWS`, `load_dense`, `load_block`,
//! `block_scale`, `prefetch` and `elem_bytes`.

/// Defines `AXPY_TILE`, `apply_tile`, `axpy_dense_tokens` and `axpy_quant_tokens` in the
/// invoking ISA module.
macro_rules! axpy_token_tiles {
    (
        feat: $feat:literal,
        quant_vectors: $nq:literal,
        load: $load:ident,
        store: $store:ident,
        fma: $fma:ident,
        set1: $set1:ident,
        setzero: $setzero:ident,
        mul: $mul:ident $(,)?
    ) => {
        /// Columns per tile of the several-token `axpy`: the rows' weights for one tile, as f32, stay
        /// in L1 (`AXPY_ROWS` × this × 4 bytes) while every token's `y` row streams past them.
        const AXPY_TILE: usize = 256;

        /// Applies `w_tile` (`wp.len()` rows of `n` f32 at stride [`AXPY_TILE`], columns `c..c + n`,
        /// `n` a multiple of `LANES`) to every token: `y = fma(a_i, w_i, y)` for rows i in order.
        ///
        /// # Safety
        /// `y` row t (at `t * y_stride`) holds columns `c..c + n`, exclusively ours; `a` holds
        /// `(n_tokens - 1) * a_stride + j + rows` values.
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn apply_tile(
            a: &[f32],
            a_stride: usize,
            j: usize,
            rows: usize,
            n_tokens: usize,
            w_tile: &[f32; AXPY_ROWS * AXPY_TILE],
            c: usize,
            n: usize,
            y: *mut f32,
            y_stride: usize,
        ) {
            // Four tokens at a time: each tile vector is loaded once for four `y` rows.
            const TG: usize = 4;
            let mut t0 = 0;
            while t0 < n_tokens {
                let tg = TG.min(n_tokens - t0);
                let mut av = [[0f32; AXPY_ROWS]; TG];
                for (g, row) in av.iter_mut().enumerate().take(tg) {
                    let t = t0 + g;
                    row[..rows].copy_from_slice(&a[t * a_stride + j..t * a_stride + j + rows]);
                }
                // SAFETY: columns c..c + n of rows t0..t0 + tg (caller); tile reads stay below n
                // per tile row.
                unsafe {
                    let mut k = 0;
                    while k < n {
                        let mut wv = [$setzero(); AXPY_ROWS];
                        for (i, w) in wv.iter_mut().enumerate().take(rows) {
                            *w = $load(w_tile.as_ptr().add(i * AXPY_TILE + k));
                        }
                        for (g, ag) in av.iter().enumerate().take(tg) {
                            let yp = y.add((t0 + g) * y_stride + c + k);
                            let mut yv = $load(yp);
                            for i in 0..rows {
                                yv = $fma($set1(ag[i]), wv[i], yv);
                            }
                            $store(yp, yv);
                        }
                        k += LANES;
                    }
                }
                t0 += tg;
            }
        }

        /// [`axpy_dense`] for `n_tokens` tokens (`a` row t at `t * a_stride`, rows `j..` of it; `y`
        /// row t at `t * y_stride`): each tile of the rows is converted to f32 once, then applied to
        /// every token with the same operations per output element (bit-identical). Returns where
        /// the full vectors end; the caller finishes the tail.
        ///
        /// # Safety
        /// As [`axpy_dense`] for every token's `y` row; `a` as in [`apply_tile`].
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn axpy_dense_tokens<const DT: u8>(
            a: &[f32],
            a_stride: usize,
            j: usize,
            n_tokens: usize,
            wp: &[*const u8],
            c0: usize,
            c1: usize,
            y: *mut f32,
            y_stride: usize,
            pf: usize,
        ) -> usize {
            let mut tile = [0f32; AXPY_ROWS * AXPY_TILE];
            let end = c0 + (c1 - c0) / LANES * LANES;
            let mut c = c0;
            while c < end {
                let n = AXPY_TILE.min(end - c);
                for (i, &p) in wp.iter().enumerate() {
                    let mut k = 0;
                    while k < n {
                        // SAFETY: c + k + LANES <= end <= c1, inside row i (caller); the tile row
                        // holds AXPY_TILE >= n values.
                        unsafe {
                            $store(tile.as_mut_ptr().add(i * AXPY_TILE + k), load_dense::<DT>(p, c + k));
                            prefetch(p.wrapping_add((c + k) * elem_bytes::<DT>() + pf));
                        }
                        k += LANES;
                    }
                }
                // SAFETY: forwarded caller contract; n is a multiple of LANES.
                unsafe { apply_tile(a, a_stride, j, wp.len(), n_tokens, &tile, c, n, y, y_stride) };
                c += n;
            }
            end
        }

        /// [`axpy_quant`] for `n_tokens` tokens (layout as [`axpy_dense_tokens`]): each tile of the
        /// rows is dequantized once (`w = d · q`, rounded, as in [`axpy_quant`]) and applied to
        /// every token. Returns `c1`.
        ///
        /// # Safety
        /// As [`axpy_quant`] for every token's `y` row; `a` as in [`apply_tile`].
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn axpy_quant_tokens<const Q: u8>(
            a: &[f32],
            a_stride: usize,
            j: usize,
            n_tokens: usize,
            wp: &[*const u8],
            c0: usize,
            c1: usize,
            y: *mut f32,
            y_stride: usize,
            pf: usize,
            lut: *const f32,
        ) -> usize {
            let bytes = if Q == Q_8 { Q8_BYTES } else { Q4_BYTES };
            let mut tile = [0f32; AXPY_ROWS * AXPY_TILE];
            let mut c = c0;
            while c < c1 {
                let n = AXPY_TILE.min(c1 - c);
                for (i, &p) in wp.iter().enumerate() {
                    let mut k = 0;
                    while k < n {
                        // SAFETY: block (c + k) / 32 < c1 / 32 of row i (caller); the tile row holds
                        // AXPY_TILE >= n values and k + 32 <= n (multiples of 32).
                        unsafe {
                            let b = p.add((c + k) / QK * bytes);
                            let (_, q) = load_block::<Q>(b);
                            let d = block_scale(b, lut);
                            prefetch(p.wrapping_add((c + k) / QK * bytes + pf));
                            for m in 0..$nq {
                                $store(tile.as_mut_ptr().add(i * AXPY_TILE + k + LANES * m), $mul(d, q[m]));
                            }
                        }
                        k += QK;
                    }
                }
                // SAFETY: forwarded caller contract; n is a multiple of 32.
                unsafe { apply_tile(a, a_stride, j, wp.len(), n_tokens, &tile, c, n, y, y_stride) };
                c += n;
            }
            c1
        }
    };
}

pub(super) use axpy_token_tiles;
