//! One (row, head) of [`super::paged_attention`] on AVX2 + FMA, for head sizes of 32, 64 or
//! 128: [`super::wide`]'s method with 8-lane vectors, for CPUs without AVX-512 (pulp's
//! portable path makes one horizontal sum per score and a scalar `exp` per score).
//!
//! Scores are made eight keys at a time and reduced by one transposing tree (`vhaddps` twice,
//! then the 128-bit halves); the softmax exponentials are a vector polynomial; the weighted
//! sum of values runs `D` FMAs a key.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{
    __m256, _CMP_EQ_OQ, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT, _mm256_add_epi32,
    _mm256_add_ps, _mm256_andnot_ps, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtps_epi32,
    _mm256_fmadd_ps, _mm256_hadd_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_mul_ps,
    _mm256_permute2f128_ps, _mm256_round_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps,
    _mm256_slli_epi32, _mm256_storeu_ps, _mm256_sub_ps,
};

/// Whether this CPU and head size take [`head`].
pub(super) fn applies(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(head_dim, 32 | 64 | 128)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// [`super::wide::head`] with 8-lane vectors.
#[allow(clippy::too_many_arguments)]
pub(super) fn head(
    q: &[f32],
    slots: &[u32],
    k: &[f32],
    v: &[f32],
    kv_dim: usize,
    offset: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    debug_assert!(
        applies(q.len()),
        "wide8::head without AVX2 or for this head size"
    );
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: `applies` found AVX2 and FMA before any call (the caller's contract).
    unsafe {
        match q.len() {
            32 => head_d::<4>(q, slots, k, v, kv_dim, offset, scale, scores, out),
            64 => head_d::<8>(q, slots, k, v, kv_dim, offset, scale, scores, out),
            _ => head_d::<16>(q, slots, k, v, kv_dim, offset, scale, scores, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, slots, k, v, kv_dim, offset, scale, scores, out);
        unreachable!("applies() is false off x86-64");
    }
}

/// [`head`] for a head of `D` vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn head_d<const D: usize>(
    q: &[f32],
    slots: &[u32],
    k: &[f32],
    v: &[f32],
    kv_dim: usize,
    offset: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = D * 8;
    assert!(q.len() == hd && out.len() == hd && offset + hd <= kv_dim);
    assert!(
        slots
            .iter()
            .all(|&s| (s as usize + 1) * kv_dim <= k.len().min(v.len())),
        "a slot outside the cache"
    );
    let n = slots.len();
    let row = |s: u32| s as usize * kv_dim + offset;
    #[allow(unsafe_code)]
    // SAFETY (every load and store below): `q` and `out` hold `D` vectors (asserted); a key or
    // value row starts at `row(s)` with `row(s) + hd <= (s + 1) * kv_dim <= len` (asserted
    // for every slot); `scores` is resized to whole groups of eight before it is written.
    unsafe {
        let sv = _mm256_set1_ps(scale);
        let qv: [__m256; D] =
            std::array::from_fn(|d| _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(8 * d)), sv));
        scores.clear();
        scores.resize(n.div_ceil(8) * 8, f32::NEG_INFINITY);
        for (g, group) in slots.chunks(8).enumerate() {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (a, &s) in acc.iter_mut().zip(group) {
                let kp = k.as_ptr().add(row(s));
                for (d, qd) in qv.iter().enumerate() {
                    *a = _mm256_fmadd_ps(*qd, _mm256_loadu_ps(kp.add(8 * d)), *a);
                }
            }
            let mut sums = [0f32; 8];
            _mm256_storeu_ps(sums.as_mut_ptr(), reduce8(&acc));
            // Lanes past the group's keys stay -inf (they were not keys).
            scores[8 * g..8 * g + group.len()].copy_from_slice(&sums[..group.len()]);
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let maxv = _mm256_set1_ps(max);
        let mut sumv = _mm256_setzero_ps();
        for chunk in scores.chunks_exact_mut(8) {
            let p = exp_le0(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), maxv));
            sumv = _mm256_add_ps(sumv, p);
            _mm256_storeu_ps(chunk.as_mut_ptr(), p);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sumv);
        let inv = 1.0 / lanes.iter().sum::<f32>();
        let mut o = [_mm256_setzero_ps(); D];
        for (&s, &p) in slots.iter().zip(scores.iter()) {
            let vp = v.as_ptr().add(row(s));
            let w = _mm256_set1_ps(p * inv);
            for (d, od) in o.iter_mut().enumerate() {
                *od = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp.add(8 * d)), *od);
            }
        }
        for (d, od) in o.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * d), *od);
        }
    }
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
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_145_75), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
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
        let xs: Vec<f32> = (0..170_000).map(|i| -(i as f32) * 0.0005).collect();
        for chunk in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            #[allow(unsafe_code)]
            // SAFETY: AVX2 and FMA were detected; `chunk` and `got` hold eight values.
            unsafe {
                _mm256_storeu_ps(got.as_mut_ptr(), exp_le0(_mm256_loadu_ps(chunk.as_ptr())))
            };
            for (x, g) in chunk.iter().zip(got) {
                let want = f64::from(*x).exp();
                assert!(
                    (f64::from(g) - want).abs() <= 3e-7 * want + 1e-37,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        let mut got = [1f32; 8];
        #[allow(unsafe_code)]
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_ps(got.as_mut_ptr(), exp_le0(_mm256_set1_ps(f32::NEG_INFINITY)))
        };
        assert_eq!(got, [0.0; 8], "exp(-inf) is 0");
    }
}
