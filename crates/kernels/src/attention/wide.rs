//! One (row, head), or a tile of up to sixteen prompt rows of one head ([`super::tiled`]), of
//! [`super::paged_attention`] on AVX-512F, for head sizes of 32, 64 or 128 (the portable path,
//! pulp's AVX2 at best, serves the rest).
//!
//! The kernels are `vector_head!` and `vector_tile!` (shared with the AVX2 form); here are
//! their 16-lane parts: the transposing reduction of sixteen score vectors (unpacks and 128-bit
//! shuffles, 45 operations, instead of sixteen horizontal sums), the vector `exp`, and the
//! tile's blocking (12 keys scored at once, 16 output values summed at once: `attention_bench`
//! measured 12 keys ~5 % ahead of 8 and 16, whose pointers spill).

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_max_ps, _mm512_mul_ps,
    _mm512_reduce_add_ps, _mm512_roundscale_ps, _mm512_scalef_ps, _mm512_set1_ps,
    _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps, _mm512_storeu_ps, _mm512_sub_ps,
    _mm512_unpackhi_ps, _mm512_unpacklo_ps,
};

vector_head!(
    "avx512f",
    16,
    crate::avx512_allowed() && std::arch::is_x86_feature_detected!("avx512f"),
    __m512,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_mul_ps,
    _mm512_sub_ps,
    _mm512_add_ps,
    _mm512_fmadd_ps,
    reduce16,
    exp_le0,
    hsum16,
    _mm512_max_ps,
    12,
    16
);

/// The sum of a vector's sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn hsum16(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

/// Lane `j` of the result is the sum of the lanes of `a[j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce16(a: &[__m512; 16]) -> __m512 {
    // Pairs: within each 128-bit quarter, [x0+x2, y0+y2, x1+x3, y1+y3].
    let t: [__m512; 8] = std::array::from_fn(|i| {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
    });
    // Fours: within each quarter, the quarter's sums of four vectors.
    let u: [__m512; 4] = std::array::from_fn(|i| {
        let (x, y) = (t[2 * i], t[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b0100_0100>(x, y),
            _mm512_shuffle_ps::<0b1110_1110>(x, y),
        )
    });
    // Quarters: add quarters pairwise, twice, so quarter `i` holds vectors 4i..4i+3 whole.
    let half = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b1000_1000>(x, y),
            _mm512_shuffle_f32x4::<0b1101_1101>(x, y),
        )
    };
    half(half(u[0], u[1]), half(u[2], u[3]))
}

/// `eˣ` for `x ≤ 0` (and -inf → 0) to within ~2 ulp: `x = n·ln2 + r`, |r| ≤ ln2/2, then a
/// degree-7 polynomial for `eʳ` scaled by `2ⁿ`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp_le0(x: __m512) -> __m512 {
    // NaN stays NaN (maxps returns its second operand when either is NaN), as in libm.
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
    let n = _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-super::LN2_HI), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-super::LN2_LO), r);
    let mut p = _mm512_set1_ps(super::EXP_POLY[0]);
    for c in &super::EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    _mm512_scalef_ps(p, n)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_softmax_range() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        super::super::check_exp_le0::<16>(200_000, 1e-40, |x| {
            let mut got = [0f32; 16];
            #[allow(unsafe_code)]
            // SAFETY: AVX-512F was detected; `x` and `got` hold sixteen values.
            unsafe {
                _mm512_storeu_ps(got.as_mut_ptr(), exp_le0(_mm512_loadu_ps(x.as_ptr())))
            };
            got
        });
    }
}
