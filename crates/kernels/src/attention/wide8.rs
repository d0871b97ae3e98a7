//! One (row, head), or a tile of up to eight prompt rows of one head ([`super::tiled`]), of
//! [`super::paged_attention`] on AVX2 + FMA, for head sizes of 32, 64 or 128:
//! [`super::wide`]'s method with 8-lane vectors, for CPUs without AVX-512 (pulp's portable
//! path makes one horizontal sum per score and a scalar `exp` per score).
//!
//! The kernels are `vector_head!` and `vector_tile!` (shared with the AVX-512 form); here are
//! their 8-lane parts: the transposing reduction of eight score vectors (`vhaddps` twice, then
//! the 128-bit halves), the vector `exp`, which builds `2ⁿ` in the exponent bits, and the
//! tile's blocking (12 keys scored at once, 8 output values summed at once: 14 of the 16
//! registers).

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{
    __m256, _CMP_EQ_OQ, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT, _mm256_add_epi32,
    _mm256_add_ps, _mm256_andnot_ps, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtps_epi32,
    _mm256_fmadd_ps, _mm256_hadd_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_mul_ps,
    _mm256_permute2f128_ps, _mm256_round_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps,
    _mm256_slli_epi32, _mm256_storeu_ps, _mm256_sub_ps,
};

vector_head!(
    "avx2,fma",
    8,
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
    __m256,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_mul_ps,
    _mm256_sub_ps,
    _mm256_add_ps,
    _mm256_fmadd_ps,
    reduce8,
    exp_le0,
    hsum8,
    _mm256_max_ps,
    12,
    8
);

/// The sum of a vector's eight lanes, in lane order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum8(v: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    #[allow(unsafe_code)]
    // SAFETY: `lanes` holds eight f32 values.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), v)
    };
    lanes.iter().sum()
}

/// Lane `j` of the result is the sum of the lanes of `a[j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn reduce8(a: &[__m256; 8]) -> __m256 {
    // Per 128-bit half: pairs, then fours; then the two halves added.
    let t: [__m256; 4] = std::array::from_fn(|i| _mm256_hadd_ps(a[2 * i], a[2 * i + 1]));
    let u0 = _mm256_hadd_ps(t[0], t[1]);
    let u1 = _mm256_hadd_ps(t[2], t[3]);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

/// `eˣ` for `x ≤ 0`, -inf → 0: as [`super::wide`]'s, with `2ⁿ` made in the exponent bits
/// (`x` is first raised to -87, where `n` ≥ -126 keeps `2ⁿ` a normal float).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp_le0(x: __m256) -> __m256 {
    let gone = _mm256_cmp_ps::<_CMP_EQ_OQ>(x, _mm256_set1_ps(f32::NEG_INFINITY));
    // NaN stays NaN (maxps returns its second operand when either is NaN), as in libm.
    let x = _mm256_max_ps(_mm256_set1_ps(-87.0), x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-super::LN2_HI), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-super::LN2_LO), r);
    let mut p = _mm256_set1_ps(super::EXP_POLY[0]);
    for c in &super::EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_andnot_ps(gone, _mm256_mul_ps(p, two_n))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_softmax_range() {
        if !applies(64) {
            return;
        }
        super::super::check_exp_le0::<8>(170_000, 1e-37, |x| {
            let mut got = [0f32; 8];
            #[allow(unsafe_code)]
            // SAFETY: AVX2 and FMA were detected; `x` and `got` hold eight values.
            unsafe {
                _mm256_storeu_ps(got.as_mut_ptr(), exp_le0(_mm256_loadu_ps(x.as_ptr())))
            };
            got
        });
    }
}
