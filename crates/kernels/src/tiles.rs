//! Register-tiled `y = x · wᵀ` for a batch of rows (AVX2 + FMA, F16C for f16 weights).
//!
//! The row-at-a-time kernel (`crate::matmul_small_m`'s portable path) dots one weight row
//! with four `x` rows per pass: five vector loads feed four FMAs, so from four rows on it
//! waits on loads, not on arithmetic. Here a tile of [`TILE_W`] weight rows × [`TILE_X`] `x`
//! rows keeps its `TILE_W × TILE_X` sums in registers: each step of eight columns loads
//! `TILE_W + TILE_X` vectors for `TILE_W × TILE_X` FMAs, and an f16 weight vector is widened
//! once (`vcvtph2ps`) for the `TILE_X` rows that use it. The `x` rows (a decode batch: at most a
//! few tens of KiB) stay in L1/L2 while the weights stream through once per tile column.
//!
//! Sums run over columns in the same order for every tile shape, so a row's result does not
//! depend on which other rows share its batch.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{
    __m128i, __m256, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_loadu_si128, _mm_movehl_ps,
    _mm_shuffle_ps, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_extractf128_ps,
    _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
};
use half::f16;

/// Weight rows per tile.
pub(crate) const TILE_W: usize = 3;
/// `x` rows per tile.
pub(crate) const TILE_X: usize = 4;

/// Whether this CPU runs the tiled kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn available() -> bool {
    false
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

/// Defines the tiled kernel for one weight type: `$rows(x, w, m, k, out)` writes
/// `out[r * m + i] = w_r · x_i` for every weight row `r` of `w` and row `i` of `x` (the
/// transposed layout the caller's tasks write), through `$tile::<R, C>` on each tile.
macro_rules! tiled {
    ($rows:ident, $tile:ident, $t:ty, $load:ident, $scalar:expr) => {
        /// One tile: `R` weight rows × `C` rows of `x`, each sum over the first `lanes`
        /// columns (a multiple of eight) in registers, then the remaining columns in scalar.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $tile<const R: usize, const C: usize>(
            ws: &[&[$t]],
            xs: &[&[f32]],
            lanes: usize,
            out: &mut [f32],
            m: usize,
        ) {
            let ws: [&[$t]; R] = std::array::from_fn(|r| ws[r]);
            let xs: [&[f32]; C] = std::array::from_fn(|c| xs[c]);
            assert!(ws.iter().all(|w| w.len() >= lanes) && xs.iter().all(|x| x.len() >= lanes));
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut wv = [_mm256_setzero_ps(); R];
            let mut at = 0;
            while at < lanes {
                #[allow(unsafe_code)]
                // SAFETY: `at + 8 <= lanes` (a multiple of eight) and every row holds at
                // least `lanes` values (asserted above).
                unsafe {
                    for r in 0..R {
                        wv[r] = $load(ws[r], at);
                    }
                    for c in 0..C {
                        let xv = load_f32(xs[c], at);
                        for r in 0..R {
                            acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                        }
                    }
                }
                at += 8;
            }
            for r in 0..R {
                for c in 0..C {
                    let tail: f32 = ws[r][lanes..]
                        .iter()
                        .zip(&xs[c][lanes..])
                        .map(|(w, x)| $scalar(*w) * x)
                        .sum();
                    out[r * m + c] = hsum(acc[r][c]) + tail;
                }
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) fn $rows(x: &[f32], w: &[$t], m: usize, k: usize, out: &mut [f32]) {
            let lanes = k / 8 * 8;
            let xs: Vec<&[f32]> = x.chunks_exact(k).collect();
            let ws: Vec<&[$t]> = w.chunks_exact(k).collect();
            for (wt, ot) in ws.chunks(TILE_W).zip(out.chunks_mut(TILE_W * m)) {
                for (c0, xt) in xs.chunks(TILE_X).enumerate() {
                    let o = &mut ot[c0 * TILE_X..];
                    match (wt.len(), xt.len()) {
                        (3, 4) => $tile::<3, 4>(wt, xt, lanes, o, m),
                        (3, 3) => $tile::<3, 3>(wt, xt, lanes, o, m),
                        (3, 2) => $tile::<3, 2>(wt, xt, lanes, o, m),
                        (3, _) => $tile::<3, 1>(wt, xt, lanes, o, m),
                        (2, 4) => $tile::<2, 4>(wt, xt, lanes, o, m),
                        (2, 3) => $tile::<2, 3>(wt, xt, lanes, o, m),
                        (2, 2) => $tile::<2, 2>(wt, xt, lanes, o, m),
                        (2, _) => $tile::<2, 1>(wt, xt, lanes, o, m),
                        (_, 4) => $tile::<1, 4>(wt, xt, lanes, o, m),
                        (_, 3) => $tile::<1, 3>(wt, xt, lanes, o, m),
                        (_, 2) => $tile::<1, 2>(wt, xt, lanes, o, m),
                        (_, _) => $tile::<1, 1>(wt, xt, lanes, o, m),
                    }
                }
            }
        }
    };
}

tiled!(rows_f32, tile_f32, f32, load_f32, |w: f32| w);
tiled!(rows_f16, tile_f16, f16, load_f16, |w: f16| w.to_f32());

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every tile shape and a column tail, against f64 sums.
    #[test]
    fn tiles_match_plain_sums_at_every_shape() {
        if !available() {
            return;
        }
        for (m, n, k) in [(1, 1, 8), (5, 7, 37), (4, 3, 64), (9, 10, 19), (16, 6, 576)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
                .collect();
            let wh: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
            let (mut a, mut b) = (vec![0f32; n * m], vec![0f32; n * m]);
            #[allow(unsafe_code)]
            // SAFETY: AVX2, FMA and F16C were detected by `available`.
            unsafe {
                rows_f32(&x, &w, m, k, &mut a);
                rows_f16(&x, &wh, m, k, &mut b);
            }
            for r in 0..n {
                for i in 0..m {
                    let want: f64 = (0..k)
                        .map(|j| f64::from(w[r * k + j]) * f64::from(x[i * k + j]))
                        .sum();
                    for got in [a[r * m + i], b[r * m + i]] {
                        assert!((f64::from(got) - want).abs() < 1e-3, "{m}×{n}×{k} {r},{i}");
                    }
                }
            }
        }
    }
}
