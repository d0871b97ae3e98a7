//! Register-tiled `y = x · wᵀ` for a batch of rows: 8-lane (AVX2 + FMA, F16C for f16 weights)
//! and 16-lane (AVX-512F) versions of the same tiles, one macro instantiated for each.
//!
//! The row-at-a-time kernel (`crate::matmul_small_m`'s portable path) dots one weight row
//! with four `x` rows per pass: five vector loads feed four FMAs, so from four rows on it
//! waits on loads, not on arithmetic. Here a tile of [`TILE_W`] weight rows × [`TILE_X`] `x`
//! rows keeps its `TILE_W × TILE_X` sums in registers: each step of eight (sixteen) columns loads
//! `TILE_W + TILE_X` vectors for `TILE_W × TILE_X` FMAs, and an f16 weight vector is widened
//! once (`vcvtph2ps`) for the `TILE_X` rows that use it. The `x` rows (a decode batch: at most a
//! few tens of KiB) stay in L1/L2 while the weights stream through once per tile column.
//!
//! Sums run over columns in the same order for every tile shape, so a row's result does not
//! depend on which other rows share its batch.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{
    __m128i, __m256, __m256i, __m512, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_loadu_si128,
    _mm_movehl_ps, _mm_shuffle_ps, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_extractf128_ps,
    _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_setzero_ps, _mm512_cvtph_ps,
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps, _mm512_setzero_ps,
};
use half::f16;

/// Weight rows per tile.
pub(crate) const TILE_W: usize = 3;
/// `x` rows per tile.
pub(crate) const TILE_X: usize = 4;

/// The widest tiled kernel this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// 16-lane vectors (AVX-512F, on a CPU that also has everything `Avx2` needs).
    Avx512,
    /// 8-lane vectors (AVX2, FMA, F16C).
    Avx2,
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn level() -> Option<Level> {
    let avx2 = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    match (
        avx2,
        crate::avx512_allowed() && std::arch::is_x86_feature_detected!("avx512f"),
    ) {
        (true, true) => Some(Level::Avx512),
        (true, false) => Some(Level::Avx2),
        _ => None,
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn level() -> Option<Level> {
    None
}

/// `out[r * m + i] = w_r · x_i` on the kernels of `level`, which must come from [`level`]
/// (this CPU has its features).
#[cfg(target_arch = "x86_64")]
pub(crate) fn run(
    level: Level,
    x: &[f32],
    w: crate::WeightRows<'_>,
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    use crate::WeightRows::{F16, F32};
    #[allow(unsafe_code)]
    // SAFETY: each kernel's one requirement is a CPU with the features of its level, which
    // `level()` detected.
    unsafe {
        match (level, w) {
            (Level::Avx512, F32(w)) => rows_f32_x16(x, w, m, k, out),
            (Level::Avx512, F16(w)) => rows_f16_x16(x, w, m, k, out),
            (Level::Avx2, F32(w)) => rows_f32(x, w, m, k, out),
            (Level::Avx2, F16(w)) => rows_f16(x, w, m, k, out),
        }
    }
}

/// The sum of a vector's eight lanes, in a fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// Eight f32 values from `row[at..]`. The caller guarantees `at + 8 <= row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(unsafe_code)]
unsafe fn load_f32(row: &[f32], at: usize) -> __m256 {
    // SAFETY: `at + 8 <= row.len()` (the caller's contract), so the eight values are in `row`.
    unsafe { _mm256_loadu_ps(row.as_ptr().add(at)) }
}

/// Eight f16 values from `row[at..]`, widened. The caller guarantees `at + 8 <= row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(unsafe_code)]
unsafe fn load_f16(row: &[f16], at: usize) -> __m256 {
    // SAFETY: `at + 8 <= row.len()` (the caller's contract): sixteen bytes inside `row`.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(at).cast::<__m128i>())) }
}

/// Sixteen f32 values from `row[at..]`. The caller guarantees `at + 16 <= row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(unsafe_code)]
unsafe fn load_f32x16(row: &[f32], at: usize) -> __m512 {
    // SAFETY: `at + 16 <= row.len()` (the caller's contract).
    unsafe { _mm512_loadu_ps(row.as_ptr().add(at)) }
}

/// Sixteen f16 values from `row[at..]`, widened. The caller guarantees `at + 16 <= row.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(unsafe_code)]
unsafe fn load_f16x16(row: &[f16], at: usize) -> __m512 {
    // SAFETY: `at + 16 <= row.len()` (the caller's contract): 32 bytes inside `row`.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(at).cast::<__m256i>())) }
}

/// Asks for the cache line of `row[at..]` one tile further on: the same column [`TILE_W`]
/// (`R`) rows later, which is the next tile's row (rows are contiguous; past the matrix, or
/// into rows another task reads, it is a harmless hint). The hardware prefetcher follows each
/// of a tile's row streams only after a few lines, and a tile's rows are short (k = 576 f16
/// values: 18 lines) — at one stream a decode step is bound by how many misses a core keeps
/// in flight, not by the memory's bandwidth; one tile ahead hides the next tile's misses
/// behind this one's arithmetic (measured: f16 single-stream 56–60 → 79–87 tok/s with the
/// AVX2 tiles, 65–69 → 86–90 with AVX-512; docs/benchmarks.md, change 25).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_next_tile<const R: usize, T>(row: &[T], at: usize) {
    crate::prefetch(row.as_ptr().wrapping_add(at + R * row.len()));
}

/// The sum of a vector's sixteen lanes (a fixed tree).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn hsum16(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

/// Defines the tiled kernel for one weight type: `$rows(x, w, m, k, out)` writes
/// `out[r * m + i] = w_r · x_i` for every weight row `r` of `w` and row `i` of `x` (the
/// transposed layout the caller's tasks write), through `$tile::<R, C>` on each tile.
macro_rules! tiled {
    ($rows:ident, $pass:ident, $tile:ident, $t:ty, $load:ident, $scalar:expr, $feat:literal, $width:literal,
     $zero:ident, $fma:ident, $xload:ident, $hsum:ident) => {
        /// One tile: `R` weight rows × `C` rows of `x`, each sum over the first `lanes`
        /// columns (a multiple of the vector width) in registers, then the remaining columns
        /// in scalar.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        fn $tile<const R: usize, const C: usize, const P: bool>(
            ws: &[&[$t]],
            xs: &[&[f32]],
            lanes: usize,
            out: &mut [f32],
            m: usize,
        ) {
            let ws: [&[$t]; R] = std::array::from_fn(|r| ws[r]);
            let xs: [&[f32]; C] = std::array::from_fn(|c| xs[c]);
            assert!(
                lanes % $width == 0
                    && ws.iter().all(|w| w.len() >= lanes)
                    && xs.iter().all(|x| x.len() >= lanes)
            );
            let mut acc = [[$zero(); C]; R];
            let mut wv = [$zero(); R];
            let mut at = 0;
            while at < lanes {
                #[allow(unsafe_code)]
                // SAFETY: `at + $width <= lanes` (a multiple of the width) and every row
                // holds at least `lanes` values (asserted above).
                unsafe {
                    if P && at % (64 / std::mem::size_of::<$t>()) == 0 {
                        for w in &ws {
                            prefetch_next_tile::<R, $t>(w, at);
                        }
                    }
                    for r in 0..R {
                        wv[r] = $load(ws[r], at);
                    }
                    for c in 0..C {
                        let xv = $xload(xs[c], at);
                        for r in 0..R {
                            acc[r][c] = $fma(wv[r], xv, acc[r][c]);
                        }
                    }
                }
                at += $width;
            }
            for r in 0..R {
                for c in 0..C {
                    let tail: f32 = ws[r][lanes..]
                        .iter()
                        .zip(&xs[c][lanes..])
                        .map(|(w, x)| $scalar(*w) * x)
                        .sum();
                    out[r * m + c] = $hsum(acc[r][c]) + tail;
                }
            }
        }

        /// One pass of a tile's weight rows over up to [`TILE_X`] rows of `x`, through the
        /// tile shape that fits; `P`: prefetch the next tile's weights meanwhile.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        fn $pass<const P: bool>(
            wt: &[&[$t]],
            xt: &[&[f32]],
            lanes: usize,
            o: &mut [f32],
            m: usize,
        ) {
            match (wt.len(), xt.len()) {
                (3, 4) => $tile::<3, 4, P>(wt, xt, lanes, o, m),
                (3, 3) => $tile::<3, 3, P>(wt, xt, lanes, o, m),
                (3, 2) => $tile::<3, 2, P>(wt, xt, lanes, o, m),
                (3, _) => $tile::<3, 1, P>(wt, xt, lanes, o, m),
                (2, 4) => $tile::<2, 4, P>(wt, xt, lanes, o, m),
                (2, 3) => $tile::<2, 3, P>(wt, xt, lanes, o, m),
                (2, 2) => $tile::<2, 2, P>(wt, xt, lanes, o, m),
                (2, _) => $tile::<2, 1, P>(wt, xt, lanes, o, m),
                (_, 4) => $tile::<1, 4, P>(wt, xt, lanes, o, m),
                (_, 3) => $tile::<1, 3, P>(wt, xt, lanes, o, m),
                (_, 2) => $tile::<1, 2, P>(wt, xt, lanes, o, m),
                (_, _) => $tile::<1, 1, P>(wt, xt, lanes, o, m),
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        pub(crate) fn $rows(x: &[f32], w: &[$t], m: usize, k: usize, out: &mut [f32]) {
            let lanes = k / $width * $width;
            let xs: Vec<&[f32]> = x.chunks_exact(k).collect();
            let ws: Vec<&[$t]> = w.chunks_exact(k).collect();
            for (wt, ot) in ws.chunks(TILE_W).zip(out.chunks_mut(TILE_W * m)) {
                for (c0, xt) in xs.chunks(TILE_X).enumerate() {
                    let o = &mut ot[c0 * TILE_X..];
                    // Only the first pass over a tile's weight rows reads them from memory:
                    // the batch's other rows find them in L1.
                    if c0 == 0 {
                        $pass::<true>(wt, xt, lanes, o, m)
                    } else {
                        $pass::<false>(wt, xt, lanes, o, m)
                    }
                }
            }
        }
    };
}

tiled!(
    rows_f32,
    pass_f32,
    tile_f32,
    f32,
    load_f32,
    |w: f32| w,
    "avx2,fma,f16c",
    8,
    _mm256_setzero_ps,
    _mm256_fmadd_ps,
    load_f32,
    hsum
);
tiled!(
    rows_f16,
    pass_f16,
    tile_f16,
    f16,
    load_f16,
    |w: f16| w.to_f32(),
    "avx2,fma,f16c",
    8,
    _mm256_setzero_ps,
    _mm256_fmadd_ps,
    load_f32,
    hsum
);
tiled!(
    rows_f32_x16,
    pass_f32_x16,
    tile_f32_x16,
    f32,
    load_f32x16,
    |w: f32| w,
    "avx512f",
    16,
    _mm512_setzero_ps,
    _mm512_fmadd_ps,
    load_f32x16,
    hsum16
);
tiled!(
    rows_f16_x16,
    pass_f16_x16,
    tile_f16_x16,
    f16,
    load_f16x16,
    |w: f16| w.to_f32(),
    "avx512f",
    16,
    _mm512_setzero_ps,
    _mm512_fmadd_ps,
    load_f32x16,
    hsum16
);
