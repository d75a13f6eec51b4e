//! Kernel drivers written once for both SIMD widths: `avx2.rs` and `avx512.rs` instantiate
//! [`simd_kernels`] with their target features and intrinsics. The generated code uses each
//! module's own `LANES`, `NR`, `PREFETCH_TILES`, `hsum`, `load_dense`, `load_one`,
//! `dequant_block`, `prefetch`, `elem_bytes` and `tiles` (the loop over tiles,
//! whose tile sizes differ, calling the module's own integer tile kernel `qdot_tile` for
//! quantized weights).

/// Defines, in the invoking ISA module: the dense tile kernel `dense_tile`,
/// `raw`, `matmul` (with `matmul_impl`), `axpy_rows` (with `axpy_impl`, `axpy_dense`,
/// `axpy_quant`) and the several-token `axpy` tiles.
macro_rules! simd_kernels {
    (
        feat: $feat:literal,
        isa: $isa:path,
        isa_msg: $isa_msg:literal,
        quant_vectors: $nq:literal,
        load: $load:ident,
        store: $store:ident,
        fma: $fma:ident,
        set1: $set1:ident,
        setzero: $setzero:ident,
        mul: $mul:ident $(,)?
    ) => {
        /// Dot products of `R` dense rows with `T` tokens.
        ///
        /// # Safety
        /// Each `w[r]` points to `cols` readable elements of type `DT`; `x` points to `T` rows of
        /// `cols` readable f32 at stride `xs`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn dense_tile<const DT: u8, const R: usize, const T: usize>(
            x: *const f32,
            xs: usize,
            w: [*const u8; R],
            cols: usize,
            pf: usize,
        ) -> [[f32; R]; T] {
            let mut acc = [[$setzero(); R]; T];
            let full = cols / LANES * LANES;
            let mut c = 0;
            if DT == DT_BF16 {
                // Chunks of 2 · LANES columns split into odd and even halves (`x` arrives in
                // that order, see `Acts`): one load, one AND and one shift per chunk and row.
                let full2 = cols / (2 * LANES) * (2 * LANES);
                // SAFETY: c + 2 · LANES <= full2 <= cols, within every row and token.
                unsafe {
                    while c < full2 {
                        let line = (2 * c).is_multiple_of(64);
                        let mut wo = [$setzero(); R];
                        let mut we = [$setzero(); R];
                        for r in 0..R {
                            (wo[r], we[r]) = load_bf16_halves(w[r], c);
                            if line {
                                prefetch(w[r].wrapping_add(2 * c + pf));
                            }
                        }
                        for t in 0..T {
                            let xo = $load(x.add(t * xs + c));
                            let xe = $load(x.add(t * xs + c + LANES));
                            for r in 0..R {
                                acc[t][r] = $fma(xo, wo[r], acc[t][r]);
                                acc[t][r] = $fma(xe, we[r], acc[t][r]);
                            }
                        }
                        c += 2 * LANES;
                    }
                }
            }
            // SAFETY: c + LANES <= full <= cols, within every row and every token (caller contract).
            unsafe {
                while c < full {
                    let line = (c * elem_bytes::<DT>()).is_multiple_of(64);
                    let mut wv = [$setzero(); R];
                    for r in 0..R {
                        wv[r] = load_dense::<DT>(w[r], c);
                        if line {
                            prefetch(w[r].wrapping_add(c * elem_bytes::<DT>() + pf));
                        }
                    }
                    for t in 0..T {
                        let xv = $load(x.add(t * xs + c));
                        for r in 0..R {
                            acc[t][r] = $fma(xv, wv[r], acc[t][r]);
                        }
                    }
                    c += LANES;
                }
            }
            if c < cols {
                let m = cols - c;
                let mut wb = [[0f32; LANES]; R];
                for r in 0..R {
                    for i in 0..m {
                        // SAFETY: c + i < cols.
                        wb[r][i] = unsafe { load_one::<DT>(w[r], c + i) };
                    }
                }
                for t in 0..T {
                    let mut xb = [0f32; LANES];
                    for i in 0..m {
                        // SAFETY: c + i < cols, token t < T.
                        xb[i] = unsafe { x.add(t * xs + c + i).read() };
                    }
                    // SAFETY: the buffers hold LANES f32 each.
                    let xv = unsafe { $load(xb.as_ptr()) };
                    for r in 0..R {
                        // SAFETY: as above.
                        let wv = unsafe { $load(wb[r].as_ptr()) };
                        acc[t][r] = $fma(xv, wv, acc[t][r]);
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

        /// Base pointer of the weights as bytes, and bytes per "unit" (element, or block for
        /// quantized data) together with elements per unit.
        fn raw(w: &MatRef<'_>) -> (*const u8, usize, usize) {
            match w.data {
                WeightsRef::F32(s) => (s.as_ptr() as *const u8, 4, 1),
                WeightsRef::Bf16(s) => (s.as_ptr() as *const u8, 2, 1),
                WeightsRef::F16(s) => (s.as_ptr() as *const u8, 2, 1),
                WeightsRef::Q8(s) => (s.as_ptr() as *const u8, Q8_BYTES, QK),
                WeightsRef::Q4(s) => (s.as_ptr() as *const u8, Q4_BYTES, QK),
                WeightsRef::Q8Tiles(s) => (s.as_ptr(), Q8_BYTES, QK),
                WeightsRef::Q4Tiles(s) => (s.as_ptr(), Q4_BYTES, QK),
            }
        }

        /// `y[t * y_stride + r] = x_t · W_r` for all `n_tokens` tokens and rows of `w`.
        pub(super) fn matmul(x: Acts<'_>, n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
            assert!($isa.is_supported(), $isa_msg);
            let (rows, cols) = (w.rows, w.cols);
            if rows == 0 || n_tokens == 0 {
                return;
            }
            assert!(x.cols == cols && x.x.len() >= n_tokens * cols, "x is not [n_tokens, cols]");
            if w.data.is_quantized() {
                let g = n_tokens * cols / crate::quant::LANE;
                assert!(
                    x.q.len() >= n_tokens * cols && x.neg_sums.len() >= g && x.scales.len() >= g,
                    "quantized activations missing"
                );
            }
            assert!(y_stride >= rows && y.len() >= (n_tokens - 1) * y_stride + rows, "y too short");
            // SAFETY: the CPU supports the features (asserted); shapes were asserted above and
            // MatRef guarantees (rows - 1) * stride + cols elements of data.
            unsafe { matmul_impl(x, n_tokens, w, y, y_stride) }
        }

        /// # Safety
        /// The CPU features of this module are available; `x`, `y` sized as asserted in [`matmul`].
        #[target_feature(enable = $feat)]
        unsafe fn matmul_impl(x: Acts<'_>, n_tokens: usize, w: MatRef<'_>, y: &mut [f32], y_stride: usize) {
            // SAFETY: forwarded contract.
            unsafe {
                match w.data {
                    WeightsRef::F32(_) => tiles::<DT_F32, false>(x, n_tokens, w, y, y_stride),
                    WeightsRef::Bf16(_) => tiles::<DT_BF16, false>(x, n_tokens, w, y, y_stride),
                    WeightsRef::F16(_) => tiles::<DT_F16, false>(x, n_tokens, w, y, y_stride),
                    WeightsRef::Q8(_) => tiles::<Q_8, true>(x, n_tokens, w, y, y_stride),
                    WeightsRef::Q4(_) => tiles::<Q_4, true>(x, n_tokens, w, y, y_stride),
                    WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_) => row_tiles(x, n_tokens, w, y, y_stride),
                }
            }
        }

        /// `y[t * cols + c] += Σ_j a[t * a_stride + j] · W[j, c]` for every row j of `w` (in
        /// ascending order) and every column c, for `n_tokens` tokens (`y`: `[n_tokens, cols]`).
        pub(super) fn axpy_rows(a: &[f32], a_stride: usize, n_tokens: usize, w: MatRef<'_>, y: &mut [f32]) {
            assert!($isa.is_supported(), $isa_msg);
            let (rows, cols) = (w.rows, w.cols);
            if n_tokens == 0 || rows == 0 || cols == 0 {
                return;
            }
            assert!(a_stride >= rows && a.len() >= (n_tokens - 1) * a_stride + rows, "a too short");
            assert!(y.len() >= n_tokens * cols, "y too short");
            let (yp, a) = (y.as_mut_ptr(), &a[..(n_tokens - 1) * a_stride + rows]);
            // SAFETY: features present (asserted); `y` holds n_tokens rows of cols (asserted) and is
            // exclusively borrowed; quantized cols are multiples of 32 (MatRef invariant).
            unsafe {
                if n_tokens == 1 && matches!(w.data, WeightsRef::Bf16(_)) && cols >= 2 * LANES {
                    return axpy_bf16_one(a, w, yp);
                }
                match w.data {
                    WeightsRef::F32(_) => {
                        axpy_impl::<DT_F32, false>(a, a_stride, n_tokens, w, 0, cols, yp, cols)
                    }
                    WeightsRef::Bf16(_) => {
                        axpy_impl::<DT_BF16, false>(a, a_stride, n_tokens, w, 0, cols, yp, cols)
                    }
                    WeightsRef::F16(_) => {
                        axpy_impl::<DT_F16, false>(a, a_stride, n_tokens, w, 0, cols, yp, cols)
                    }
                    WeightsRef::Q8(_) => axpy_impl::<Q_8, true>(a, a_stride, n_tokens, w, 0, cols, yp, cols),
                    WeightsRef::Q4(_) => axpy_impl::<Q_4, true>(a, a_stride, n_tokens, w, 0, cols, yp, cols),
                    WeightsRef::Q8Tiles(_) | WeightsRef::Q4Tiles(_) => {
                        panic!("axpy over row tiles (a matvec layout)")
                    }
                }
            }
        }

        /// One token's `axpy` over bf16 rows: `y` is put in odd/even order per chunk of
        /// 2 · LANES columns ([`to_odd_even`]), each row group's chunk split into odd and even
        /// halves with one load, one AND and one shift ([`load_bf16_halves`]), then `y` is
        /// put back. Per output element the same `fma(a[j], w[j], y)` for j ascending as
        /// [`axpy_dense`] (bit-identical; only the lanes differ); the columns after the last
        /// full chunk go through [`axpy_dense`].
        ///
        /// # Safety
        /// CPU features present; `y` holds `w.cols` f32, exclusively ours; `a` holds `w.rows`
        /// values; `w` is bf16.
        #[target_feature(enable = $feat)]
        unsafe fn axpy_bf16_one(a: &[f32], w: MatRef<'_>, y: *mut f32) {
            let (rows, cols) = (w.rows, w.cols);
            let (base, _, _) = raw(&w);
            let row_bytes = 2 * w.stride;
            let pf = super::common::one_token_prefetch(row_bytes);
            let full2 = cols / (2 * LANES) * (2 * LANES);
            // SAFETY: y holds cols >= full2 values (caller).
            unsafe { to_odd_even(y, full2) };
            let mut j = 0;
            while j < rows {
                let nj = BF16_ONE_ROWS.min(rows - j);
                let mut wp = [base; BF16_ONE_ROWS];
                for i in 0..nj {
                    // SAFETY: row j + i < rows lies inside the data (MatRef invariant).
                    wp[i] = unsafe { base.add((j + i) * row_bytes) };
                }
                let at = &a[j..j + nj];
                let mut c = 0;
                // SAFETY: c + 2 · LANES <= full2 <= cols, inside every row and inside y.
                unsafe {
                    while c < full2 {
                        let (mut yo, mut ye) = ($load(y.add(c)), $load(y.add(c + LANES)));
                        let line = (2 * c).is_multiple_of(64);
                        for (i, &p) in wp[..nj].iter().enumerate() {
                            let (wo, we) = load_bf16_halves(p, c);
                            let av = $set1(at[i]);
                            yo = $fma(av, wo, yo);
                            ye = $fma(av, we, ye);
                            if line {
                                prefetch(p.wrapping_add(2 * c + pf));
                            }
                        }
                        $store(y.add(c), yo);
                        $store(y.add(c + LANES), ye);
                        c += 2 * LANES;
                    }
                    axpy_dense::<DT_BF16>(at, &wp[..nj], full2, cols, y, pf);
                }
                j += nj;
            }
            // SAFETY: as above.
            unsafe { from_odd_even(y, full2) };
        }

        /// Rows of W processed together (each output still sums j in ascending order).
        const AXPY_ROWS: usize = 4;

        /// [`axpy_bf16_one`] reads one row at a time (one stream per thread), prefetching
        /// `ONE_TOKEN_PREFETCH_BYTES` ahead: `kbench` `ax` bf16 +9–11 % over four rows
        /// prefetched eight rows ahead (`y` then goes through L1 once per row, which L1
        /// sustains). The order of every sum is unchanged.
        const BF16_ONE_ROWS: usize = 1;

        /// # Safety
        /// CPU features present; `y` valid for reads and writes at `t * y_stride + c` for
        /// `t < n_tokens`, `c` in `c0..c1` (block aligned for quantized weights), exclusively ours;
        /// `a` holds `(n_tokens - 1) * a_stride + rows` values.
        #[target_feature(enable = $feat)]
        unsafe fn axpy_impl<const K: u8, const QUANT: bool>(
            a: &[f32],
            a_stride: usize,
            n_tokens: usize,
            w: MatRef<'_>,
            c0: usize,
            c1: usize,
            y: *mut f32,
            y_stride: usize,
        ) {
            let rows = w.rows;
            let (base, unit_bytes, unit_elems) = raw(&w);
            let row_bytes = w.stride / unit_elems * unit_bytes;
            // Several tokens take the rows in tiles of AXPY_TOKEN_ROWS (register-blocked over
            // them, `apply_tile`), one token in groups of AXPY_ROWS.
            let per = if n_tokens == 1 { AXPY_ROWS } else { AXPY_TOKEN_ROWS };
            // Prefetch: two row groups ahead for one token (rows are short; bundled rows are not
            // contiguous), the next row tile at the same columns for several.
            let pf = if n_tokens == 1 { 2 * AXPY_ROWS } else { AXPY_TOKEN_ROWS } * row_bytes;
            let lut = super::f16_table().as_ptr();
            let mut j = 0;
            while j < rows {
                let nj = per.min(rows - j);
                let mut wp = [base; AXPY_TOKEN_ROWS];
                for i in 0..nj {
                    // SAFETY: row j + i < rows lies inside the data (MatRef invariant).
                    wp[i] = unsafe { base.add((j + i) * row_bytes) };
                }
                // Several tokens: convert or dequantize each chunk of the rows once for all of them
                // (the one-token functions below then only finish a dense tail).
                let c_done = if n_tokens == 1 {
                    c0
                } else {
                    // SAFETY: as for the one-token calls below, for every token.
                    unsafe {
                        axpy_tokens::<K, QUANT>(
                            a,
                            a_stride,
                            j,
                            n_tokens,
                            &wp[..nj],
                            c0,
                            c1,
                            y,
                            y_stride,
                            pf,
                            lut,
                        )
                    }
                };
                if c_done == c1 {
                    j += nj;
                    continue;
                }
                for t in 0..n_tokens {
                    let at = &a[t * a_stride + j..t * a_stride + j + nj];
                    // SAFETY: y row t, columns c0..c1 (caller); rows j..j+nj (above).
                    let yt = unsafe { y.add(t * y_stride) };
                    // SAFETY: as above.
                    unsafe {
                        if QUANT {
                            axpy_quant::<K>(at, &wp[..nj], c_done, c1, yt, pf, lut)
                        } else {
                            axpy_dense::<K>(at, &wp[..nj], c_done, c1, yt, pf)
                        }
                    }
                }
                j += nj;
            }
        }

        /// `y[c] = fma(a[i], w_i[c], y[c])` for each row i in order, `c` in `c0..c1`.
        ///
        /// # Safety
        /// Rows hold at least `c1` elements of type `DT`; `y[c0..c1]` is exclusively ours.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn axpy_dense<const DT: u8>(
            a: &[f32],
            wp: &[*const u8],
            c0: usize,
            c1: usize,
            y: *mut f32,
            pf: usize,
        ) {
            let mut c = c0;
            // SAFETY: c + LANES <= c1 inside the loop; tail elements c < c1.
            unsafe {
                while c + LANES <= c1 {
                    let mut yv = $load(y.add(c));
                    for (i, &p) in wp.iter().enumerate() {
                        yv = $fma($set1(a[i]), load_dense::<DT>(p, c), yv);
                        prefetch(p.wrapping_add(c * elem_bytes::<DT>() + pf));
                    }
                    $store(y.add(c), yv);
                    c += LANES;
                }
                while c < c1 {
                    let mut v = y.add(c).read();
                    for (i, &p) in wp.iter().enumerate() {
                        v = a[i].mul_add(load_one::<DT>(p, c), v);
                    }
                    y.add(c).write(v);
                    c += 1;
                }
            }
        }

        /// Quantized [`axpy_dense`]: `w = d · q` (rounded) then `y = fma(a, w, y)`.
        ///
        /// # Safety
        /// Rows hold at least `c1 / 32` blocks of kind `Q`; `c0`, `c1` multiples of 32; `lut` is
        /// [`super::f16_table`];
        /// `y[c0..c1]` is exclusively ours.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn axpy_quant<const Q: u8>(
            a: &[f32],
            wp: &[*const u8],
            c0: usize,
            c1: usize,
            y: *mut f32,
            pf: usize,
            lut: *const f32,
        ) {
            let bytes = if Q == Q_8 { Q8_BYTES } else { Q4_BYTES };
            let mut c = c0;
            // SAFETY: block c / 32 < c1 / 32 of every row; y[c..c+32] within c0..c1.
            unsafe {
                while c < c1 {
                    let mut yv = [$setzero(); $nq];
                    for k in 0..$nq {
                        yv[k] = $load(y.add(c + LANES * k));
                    }
                    for (i, &p) in wp.iter().enumerate() {
                        let w = dequant_block::<Q>(p.add(c / QK * bytes), lut);
                        prefetch(p.wrapping_add(c / QK * bytes + pf));
                        let av = $set1(a[i]);
                        for k in 0..$nq {
                            yv[k] = $fma(av, w[k], yv[k]);
                        }
                    }
                    for k in 0..$nq {
                        $store(y.add(c + LANES * k), yv[k]);
                    }
                    c += QK;
                }
            }
        }

        /// Rows per tile of the several-token `axpy`: each output vector of a token stays in a
        /// register over this many rows (one load and one store of `y` per tile, not per four
        /// rows: `kcache` bf16 `axpy` n32 went from ~27 to ~45 GFMA/s, one Zen 4 core).
        const AXPY_TOKEN_ROWS: usize = 32;

        /// Columns per tile of the several-token `axpy`: the tile's weights, as f32
        /// (`AXPY_TOKEN_ROWS` × this × 4 bytes = 8 KB), stay in L1 while every token's `y`
        /// columns pass through registers.
        const AXPY_TILE: usize = 64;

        /// Applies `w_tile` (`rows` rows of `n` f32 at stride [`AXPY_TILE`], columns `c..c + n`,
        /// `n` a multiple of `LANES`) to every token: `y = fma(a_i, w_i, y)` for rows i in order,
        /// [`AXPY_TG`] tokens × [`AXPY_CV`] vectors of `y` at a time in registers.
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
            w_tile: &[f32; AXPY_TOKEN_ROWS * AXPY_TILE],
            c: usize,
            n: usize,
            y: *mut f32,
            y_stride: usize,
        ) {
            debug_assert!(rows <= AXPY_TOKEN_ROWS && n <= AXPY_TILE && n.is_multiple_of(LANES));
            let ap = a.as_ptr();
            let wt = w_tile.as_ptr();
            let mut t0 = 0;
            // SAFETY: tokens t0.. < n_tokens, rows j..j + rows of `a`, columns c..c + n of `y`
            // and of the tile (caller contract), for every call below.
            unsafe {
                while t0 + AXPY_TG <= n_tokens {
                    let (at, yt) = (ap.add(t0 * a_stride + j), y.add(t0 * y_stride + c));
                    axpy_cols::<AXPY_TG>(at, a_stride, rows, wt, n, yt, y_stride);
                    t0 += AXPY_TG;
                }
                while t0 < n_tokens {
                    let (at, yt) = (ap.add(t0 * a_stride + j), y.add(t0 * y_stride + c));
                    axpy_cols::<1>(at, a_stride, rows, wt, n, yt, y_stride);
                    t0 += 1;
                }
            }
        }

        /// [`axpy_block`] of `TG` tokens over `n` columns (a multiple of `LANES`), [`AXPY_CV`]
        /// vectors at a time.
        ///
        /// # Safety
        /// As [`axpy_block`], for `n` columns.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn axpy_cols<const TG: usize>(
            a: *const f32,
            a_stride: usize,
            rows: usize,
            w: *const f32,
            n: usize,
            y: *mut f32,
            y_stride: usize,
        ) {
            let mut k = 0;
            // SAFETY: columns k.. < n (caller contract).
            unsafe {
                while k + AXPY_CV * LANES <= n {
                    axpy_block::<TG, AXPY_CV>(a, a_stride, rows, w.add(k), y.add(k), y_stride);
                    k += AXPY_CV * LANES;
                }
                while k < n {
                    axpy_block::<TG, 1>(a, a_stride, rows, w.add(k), y.add(k), y_stride);
                    k += LANES;
                }
            }
        }

        /// `TG` tokens × `CV` vectors of `y` (at `y`, rows `y_stride` apart) in registers:
        /// `y = fma(a[g, i], w[i], y)` for rows `i < rows` in order (`a` row g at
        /// `a + g · a_stride`, `w` row i at `w + i · AXPY_TILE`).
        ///
        /// # Safety
        /// `a` rows hold `rows` values; `w` rows hold `CV · LANES` values; `y` rows hold
        /// `CV · LANES` values, exclusively ours.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn axpy_block<const TG: usize, const CV: usize>(
            a: *const f32,
            a_stride: usize,
            rows: usize,
            w: *const f32,
            y: *mut f32,
            y_stride: usize,
        ) {
            // SAFETY: within the rows and columns of the contract.
            unsafe {
                let mut acc = [[$setzero(); CV]; TG];
                for g in 0..TG {
                    for v in 0..CV {
                        acc[g][v] = $load(y.add(g * y_stride + v * LANES));
                    }
                }
                for i in 0..rows {
                    let mut wv = [$setzero(); CV];
                    for v in 0..CV {
                        wv[v] = $load(w.add(i * AXPY_TILE + v * LANES));
                    }
                    for g in 0..TG {
                        let b = $set1(*a.add(g * a_stride + i));
                        for v in 0..CV {
                            acc[g][v] = $fma(b, wv[v], acc[g][v]);
                        }
                    }
                }
                for g in 0..TG {
                    for v in 0..CV {
                        $store(y.add(g * y_stride + v * LANES), acc[g][v]);
                    }
                }
            }
        }

        /// [`axpy_dense`] / [`axpy_quant`] for `n_tokens` tokens (`a` row t at `t * a_stride`,
        /// rows `j..` of it; `y` row t at `t * y_stride`): each tile of the rows is converted or
        /// dequantized to f32 once (`w = d · q`, rounded, as in [`axpy_quant`]), then applied to
        /// every token with the same operations per output element (bit-identical). Returns
        /// where the full vectors end (`c1` for quantized rows); the caller finishes the tail.
        ///
        /// # Safety
        /// As [`axpy_dense`] / [`axpy_quant`] for every token's `y` row; `a` as in [`apply_tile`].
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn axpy_tokens<const K: u8, const QUANT: bool>(
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
            let bytes = if K == Q_8 { Q8_BYTES } else { Q4_BYTES };
            // Columns converted per step: a block of quantized weights, a vector of dense ones.
            let step = if QUANT { QK } else { LANES };
            let end = c0 + (c1 - c0) / step * step;
            let mut tile = [0f32; AXPY_TOKEN_ROWS * AXPY_TILE];
            let mut c = c0;
            while c < end {
                let n = AXPY_TILE.min(end - c);
                for (i, &p) in wp.iter().enumerate() {
                    let mut k = 0;
                    while k < n {
                        let t = tile[i * AXPY_TILE + k..].as_mut_ptr();
                        // SAFETY: c + k + step <= end <= c1, inside row i (caller; quantized c0, c1
                        // are block aligned); the tile row holds AXPY_TILE >= n >= k + step values.
                        unsafe {
                            if QUANT {
                                let b = p.add((c + k) / QK * bytes);
                                let w = dequant_block::<K>(b, lut);
                                prefetch(p.wrapping_add((c + k) / QK * bytes + pf));
                                for m in 0..$nq {
                                    $store(t.add(LANES * m), w[m]);
                                }
                            } else {
                                $store(t, load_dense::<K>(p, c + k));
                                prefetch(p.wrapping_add((c + k) * elem_bytes::<K>() + pf));
                            }
                        }
                        k += step;
                    }
                }
                // SAFETY: forwarded caller contract; n is a multiple of LANES.
                unsafe { apply_tile(a, a_stride, j, wp.len(), n_tokens, &tile, c, n, y, y_stride) };
                c += n;
            }
            end
        }
    };
}

pub(super) use simd_kernels;

/// One token's bf16 / f16 / f32 / q4 rows go two to a tile (fewer concurrent read streams
/// per thread; one with [`crate::dispatch::Streaming::Sequential`]), prefetched this many bytes ahead (rounded up to whole rows). `kbench` (1.5 GB
/// sets, 2 threads) against four-row tiles one tile ahead: AVX-512 matvec bf16 +5–8 %, q4
/// +8–10 %, q8 −2–5 % (so q8 keeps four rows: twice bf16's arithmetic per byte, and four rows
/// share each activation load); AVX2 bf16 +13–16 %, q4 level. Same sums either way: a tile
/// only groups rows, each dot product is computed alone.
pub(super) const ONE_TOKEN_PREFETCH_BYTES: usize = 8192;

/// Rows per tile of a matmul of `n_tokens` tokens that walks its rows with
/// [`one_token_walk`] (one token): two, or for dense rows one with
/// [`Streaming::Sequential`]; `None`: the four-row tiles (several tokens, or q8).
/// Quantized rows keep two (q4) or four (q8) rows either way: without VNNI, where the engine
/// multiplies them, they are arithmetic-bound at 2 threads, and rows side by side share
/// each activation load (one q4 row at a time measured about 7% slower in decode, forced AVX2 on
/// the Zen 4 VM).
///
/// [`Streaming::Sequential`]: crate::dispatch::Streaming::Sequential
pub(super) fn one_token_rows(n_tokens: usize, quant: bool, q8: bool) -> Option<usize> {
    use crate::dispatch::{streaming, Streaming};
    match (n_tokens, quant, q8) {
        (1, false, _) if streaming() == Streaming::Sequential => Some(1),
        (1, _, false) => Some(2),
        _ => None,
    }
}

/// The prefetch distance of one-token walks (the two-row matvec, the one-row bf16 `axpy`):
/// [`ONE_TOKEN_PREFETCH_BYTES`] in whole rows.
pub(super) fn one_token_prefetch(row_bytes: usize) -> usize {
    ONE_TOKEN_PREFETCH_BYTES.div_ceil(row_bytes.max(1)) * row_bytes
}

/// The one-token walk of an ISA's `tiles`: with `$per == 2`, `$run!(2, 1, r0, 0)` over rows
/// two at a time, then `$run!(1, 1, r0, 0)` for an odd last row; with 1, every row alone.
macro_rules! one_token_walk {
    ($run:ident, $rows:expr, $per:expr) => {{
        let rows = $rows;
        let mut r0 = 0;
        while $per == 2 && r0 + 2 <= rows {
            $run!(2, 1, r0, 0);
            r0 += 2;
        }
        while r0 < rows {
            $run!(1, 1, r0, 0);
            r0 += 1;
        }
    }};
}
pub(super) use one_token_walk;

/// The several-token walk of an ISA's `tiles`: rows `$r` at a time (the last `rows % $r`
/// one at a time), and for each, tokens `$t` at a time; the tokens left after the full
/// tiles go as one tile where their count is one of `$tail` (a narrower tile), else one at
/// a time. Each dot product is computed alone, so any tiling gives the same bits.
macro_rules! tile_walk {
    ($run:ident, $rows:expr, $n_tokens:expr, $r:literal, $t:literal, [$($tail:literal),*]) => {{
        let (rows, n_tokens) = ($rows, $n_tokens);
        let (rows_full, tok_full) = (rows / $r * $r, n_tokens / $t * $t);
        let mut r0 = 0;
        while r0 < rows_full {
            let mut t0 = 0;
            while t0 < tok_full {
                $run!($r, $t, r0, t0);
                t0 += $t;
            }
            $(
                if n_tokens - t0 == $tail {
                    $run!($r, $tail, r0, t0);
                    t0 = n_tokens;
                }
            )*
            while t0 < n_tokens {
                $run!($r, 1, r0, t0);
                t0 += 1;
            }
            r0 += $r;
        }
        while r0 < rows {
            let mut t0 = 0;
            while t0 < tok_full {
                $run!(1, $t, r0, t0);
                t0 += $t;
            }
            while t0 < n_tokens {
                $run!(1, 1, r0, t0);
                t0 += 1;
            }
            r0 += 1;
        }
    }};
}
pub(super) use tile_walk;
