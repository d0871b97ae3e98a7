//! One (row, head) of [`super::paged_attention`] on AVX-512F, for head sizes of 32, 64 or 128
//! (the portable path, pulp's AVX2 at best, serves the rest).
//!
//! The query's `D` vectors stay in registers, pre-scaled by `1/√d`. Scores are made sixteen
//! keys at a time: sixteen vectors of products, then one transposing reduction (unpacks and
//! 128-bit shuffles, 45 operations) leaves the sixteen scores in one vector instead of sixteen
//! horizontal sums. The softmax exponentials are a vector polynomial (`exp_le0`), and the
//! weighted sum of values runs `D` FMAs a key.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_blend_ps, _mm512_max_ps,
    _mm512_mul_ps, _mm512_reduce_add_ps, _mm512_reduce_max_ps, _mm512_roundscale_ps,
    _mm512_scalef_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps,
    _mm512_storeu_ps, _mm512_sub_ps, _mm512_unpackhi_ps, _mm512_unpacklo_ps,
};

/// Whether this CPU and head size take [`head`].
pub(super) fn applies(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(head_dim, 32 | 64 | 128)
            && crate::avx512_allowed()
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// One head: `out = softmax(q · kᵀ · scale) · v` over the keys and values at `slots` (rows of
/// `k` / `v` of `kv_dim` values, this head's at `offset`). `scores`: scratch.
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
        "wide::head without AVX-512F or for this head size"
    );
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: `applies` found AVX-512F before any call (the caller's contract).
    unsafe {
        match q.len() {
            32 => head_d::<2>(q, slots, k, v, kv_dim, offset, scale, scores, out),
            64 => head_d::<4>(q, slots, k, v, kv_dim, offset, scale, scores, out),
            _ => head_d::<8>(q, slots, k, v, kv_dim, offset, scale, scores, out),
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
#[target_feature(enable = "avx512f")]
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
    let hd = D * 16;
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
    // for every slot); `scores` is resized to whole groups of sixteen before it is written.
    unsafe {
        let sv = _mm512_set1_ps(scale);
        let qv: [__m512; D] =
            std::array::from_fn(|d| _mm512_mul_ps(_mm512_loadu_ps(q.as_ptr().add(16 * d)), sv));
        scores.clear();
        scores.resize(n.div_ceil(16) * 16, f32::NEG_INFINITY);
        let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
        for (g, group) in slots.chunks(16).enumerate() {
            let mut acc = [_mm512_setzero_ps(); 16];
            for (a, &s) in acc.iter_mut().zip(group) {
                let kp = k.as_ptr().add(row(s));
                for (d, qd) in qv.iter().enumerate() {
                    *a = _mm512_fmadd_ps(*qd, _mm512_loadu_ps(kp.add(16 * d)), *a);
                }
            }
            let sums = reduce16(&acc);
            // Lanes past the group's keys stay -inf (they were not keys).
            let valid = if group.len() == 16 {
                u16::MAX
            } else {
                (1u16 << group.len()) - 1
            };
            let sums = _mm512_mask_blend_ps(valid, _mm512_set1_ps(f32::NEG_INFINITY), sums);
            maxv = _mm512_max_ps(maxv, sums);
            _mm512_storeu_ps(scores.as_mut_ptr().add(16 * g), sums);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
        let mut sumv = _mm512_setzero_ps();
        for chunk in scores.chunks_exact_mut(16) {
            let p = exp_le0(_mm512_sub_ps(_mm512_loadu_ps(chunk.as_ptr()), max));
            sumv = _mm512_add_ps(sumv, p);
            _mm512_storeu_ps(chunk.as_mut_ptr(), p);
        }
        let inv = 1.0 / _mm512_reduce_add_ps(sumv);
        let mut o = [_mm512_setzero_ps(); D];
        for (&s, &p) in slots.iter().zip(scores.iter()) {
            let vp = v.as_ptr().add(row(s));
            let w = _mm512_set1_ps(p * inv);
            for (d, od) in o.iter_mut().enumerate() {
                *od = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp.add(16 * d)), *od);
            }
        }
        for (d, od) in o.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * d), *od);
        }
    }
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
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_145_75), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
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
        let xs: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 0.0005).collect();
        for chunk in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            #[allow(unsafe_code)]
            // SAFETY: AVX-512F was detected; `chunk` and `got` hold sixteen values.
            unsafe {
                _mm512_storeu_ps(got.as_mut_ptr(), exp_le0(_mm512_loadu_ps(chunk.as_ptr())))
            };
            for (x, g) in chunk.iter().zip(got) {
                let want = f64::from(*x).exp();
                assert!(
                    (f64::from(g) - want).abs() <= 3e-7 * want + 1e-40,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        #[allow(unsafe_code)]
        // SAFETY: as above.
        let zero = unsafe { _mm512_reduce_add_ps(exp_le0(_mm512_set1_ps(f32::NEG_INFINITY))) };
        assert_eq!(zero, 0.0, "exp(-inf) is 0");
    }
}
