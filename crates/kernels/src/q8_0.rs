//! Q8_0 weights × f32 activations with the exact arithmetic of candle's AVX2 `q8_0 · q8_0`
//! dot product (the bundled model's tied output head is Q8_0), so outputs are bit-identical.
//!
//! A Q8_0 block is 32 `i8` with an f16 scale; activations are quantized to Q8_0 per row
//! (`d = amax / 127`, `q = round(x / d)`). Per output, candle keeps eight f32 lanes: each block
//! adds `d_w · d_x` times the eight 4-product partial sums (`vpmaddubsw` on |w| and sign-moved
//! x, `vpmaddwd` with ones) by FMA, and the lanes are summed at the end in a fixed order. This
//! kernel does the same per output, but converts the weight scales at load, takes |w| once per
//! weight block for every row of the batch, and runs without candle's second thread pool
//! (rayon over weight rows). On AVX-512 with VNNI, two blocks per vector: `vpdpbusd` makes
//! the same eight 4-product sums per block (no saturation either way: |w| ≤ 128, |x| ≤ 127),
//! and the blocks' FMAs still run one after the other into the same eight lanes. Both forms
//! prefetch the weight rows [`PREFETCH_ROWS`] ahead.

use half::f16;
use rayon::prelude::*;

use crate::{BLOCK, BlockError};

/// Bytes per block in ggml's layout: f16 d, 32 × i8.
pub const BLOCK_BYTES: usize = 34;
const ROWS_PER_TASK: usize = 16;
/// How many weight rows ahead of the one being multiplied the kernels prefetch (four rows of
/// the bundled model's output head: 2.3 KiB). One stream of rows, yet the hardware prefetcher
/// alone left the loads waiting: with the Q4_1 file (whose tied output head is Q8_0) at batch
/// 1, alternating, none 129–130 / 142–144 tok/s (AVX2 / AVX-512 VNNI), two rows 150–157 /
/// 159–162, four 154–155 / 159–166, eight 152–163 / 162–175 (docs/benchmarks.md, change 26).
const PREFETCH_ROWS: usize = 4;

/// An `n × k` Q8_0 matrix: per block, the scale as f32 and the 32 quants.
pub struct Q8_0Weights {
    n: usize,
    k: usize,
    d: Vec<f32>,
    qs: Vec<[i8; BLOCK]>,
}

impl Q8_0Weights {
    /// From ggml's block bytes. Needs AVX2 and FMA (what candle's own path uses); elsewhere
    /// callers keep candle's matmul.
    pub fn from_ggml(bytes: &[u8], n: usize, k: usize) -> Result<Self, BlockError> {
        if !avx2() {
            return Err(BlockError::NoAvx2);
        }
        let blocks = crate::ggml_blocks("Q8_0", bytes, n, k, BLOCK_BYTES)?;
        let mut w = Self {
            n,
            k,
            d: Vec::with_capacity(n * k / BLOCK),
            qs: Vec::with_capacity(n * k / BLOCK),
        };
        for b in blocks {
            w.d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            w.qs.push(std::array::from_fn(|i| b[2 + i] as i8));
        }
        Ok(w)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    /// `y = x · wᵀ`; `x` is `m × k` row-major, `y` is `m × n` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "x is not m × k");
        let mut yt = vec![0f32; self.n * m];
        if m == 0 || self.n == 0 {
            return yt;
        }
        let (xd, xq) = quantize(x);
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            let wide = crate::avx512_vnni();
            yt.par_chunks_mut(ROWS_PER_TASK * m)
                .enumerate()
                .for_each(|(task, out)| {
                    let first = task * ROWS_PER_TASK;
                    if wide {
                        #[allow(unsafe_code)]
                        // SAFETY: the CPU has the features `avx512::rows` enables (checked
                        // by `avx512_vnni`).
                        unsafe {
                            avx512::rows(simd, self, &xd, &xq, first, out)
                        }
                    } else {
                        simd.vectorize(|| avx2::rows(simd, self, &xd, &xq, first, out))
                    }
                });
        }
        crate::transpose(&yt, self.n, m)
    }
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return pulp::x86::V3::try_new().is_some();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Rows of `x` as candle's `BlockQ8_0::from_float` quantizes them (scale kept as its f32 value).
fn quantize(x: &[f32]) -> (Vec<f32>, Vec<[i8; BLOCK]>) {
    x.chunks_exact(BLOCK)
        .map(|xs| {
            let (d, q) = crate::quantize_block(xs);
            (d.to_f32(), q)
        })
        .unzip()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, Q8_0Weights};
    use core::arch::x86_64::{__m256, __m256i};
    use pulp::x86::V3;

    /// candle's `hsum_float_8`, operation for operation.
    #[inline(always)]
    pub(super) fn hsum(simd: V3, x: __m256) -> f32 {
        let (a, s, s3) = (simd.avx, simd.sse, simd.sse3);
        let r = a._mm256_extractf128_ps::<1>(x);
        let r = s._mm_add_ps(r, a._mm256_castps256_ps128(x));
        let r = s._mm_add_ps(r, s._mm_movehl_ps(r, r));
        let r = s._mm_add_ss(r, s3._mm_movehdup_ps(r));
        s._mm_cvtss_f32(r)
    }

    #[inline(always)]
    pub(super) fn rows(
        simd: V3,
        w: &Q8_0Weights,
        xd: &[f32],
        xq: &[[i8; BLOCK]],
        first: usize,
        out: &mut [f32],
    ) {
        let nb = w.k / BLOCK;
        rows_with(simd, w, xd, first, out, |wb, acc| {
            for b in 0..nb {
                block(simd, w, wb, xd, xq, b, acc);
            }
        });
    }

    /// The loop over weight rows `first..` around `blocks(wb, acc)`, which adds weight row
    /// `wb / nb`'s blocks into every row of `x`'s eight lanes (AVX2's [`block`]s or AVX-512
    /// VNNI's pairs); each output is the lanes' candle sum.
    #[inline(always)]
    pub(super) fn rows_with(
        simd: V3,
        w: &Q8_0Weights,
        xd: &[f32],
        first: usize,
        out: &mut [f32],
        blocks: impl Fn(usize, &mut [__m256]),
    ) {
        let nb = w.k / BLOCK;
        let m = xd.len() / nb;
        let mut acc: Vec<__m256> = vec![simd.avx._mm256_setzero_ps(); m];
        for (j, o) in out.chunks_exact_mut(m).enumerate() {
            acc.fill(simd.avx._mm256_setzero_ps());
            prefetch_row(w, first + j + super::PREFETCH_ROWS);
            blocks((first + j) * nb, &mut acc);
            for (y, a) in o.iter_mut().zip(&acc) {
                *y = hsum(simd, *a);
            }
        }
    }

    /// Asks for weight row `row`'s quants and scales (every line; past the matrix, a
    /// harmless hint).
    #[inline(always)]
    fn prefetch_row(w: &Q8_0Weights, row: usize) {
        let nb = w.k / BLOCK;
        crate::prefetch_bytes(w.qs.as_ptr().wrapping_add(row * nb), nb * BLOCK);
        crate::prefetch_bytes(w.d.as_ptr().wrapping_add(row * nb), nb * size_of::<f32>());
    }

    /// Weight block `wb + b` against block `b` of every row of `x`: each row's eight lanes
    /// gain `d_w · d_x` times the block's eight 4-product sums (`vpmaddubsw` on |w| and x
    /// with w's sign, `vpmaddwd` with ones), by FMA, as candle adds a block.
    #[inline(always)]
    pub(super) fn block(
        simd: V3,
        w: &Q8_0Weights,
        wb: usize,
        xd: &[f32],
        xq: &[[i8; BLOCK]],
        b: usize,
        acc: &mut [__m256],
    ) {
        let nb = w.k / BLOCK;
        let (v, v2) = (simd.avx, simd.avx2);
        let ones = v._mm256_set1_epi16(1);
        let wq: __m256i = bytemuck::cast(w.qs[wb + b]);
        let aw = v2._mm256_sign_epi8(wq, wq);
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = r * nb + b;
            let d = v._mm256_set1_ps(w.d[wb + b] * xd[xb]);
            let sx = v2._mm256_sign_epi8(bytemuck::cast(xq[xb]), wq);
            let pairs = v2._mm256_maddubs_epi16(aw, sx);
            let q = v._mm256_cvtepi32_ps(v2._mm256_madd_epi16(ones, pairs));
            *a = simd.fma._mm256_fmadd_ps(d, q, *a);
        }
    }
}

/// The AVX-512 VNNI form of [`avx2::rows`]: the same lanes, the same FMA order.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BLOCK, Q8_0Weights, avx2};
    use core::arch::x86_64::{
        _mm256_fmadd_ps, _mm256_set1_ps, _mm512_abs_epi8, _mm512_castps512_ps256,
        _mm512_cvtepi32_ps, _mm512_dpbusd_epi32, _mm512_extractf32x8_ps, _mm512_loadu_si512,
        _mm512_mask_sub_epi8, _mm512_movepi8_mask, _mm512_setzero_si512,
    };
    use pulp::x86::V3;

    /// `simd`: the AVX2 path's, whose loop over weight rows (with the final sum) and block
    /// step (for an odd last block) are reused here.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
    pub(super) fn rows(
        simd: V3,
        w: &Q8_0Weights,
        xd: &[f32],
        xq: &[[i8; BLOCK]],
        first: usize,
        out: &mut [f32],
    ) {
        let nb = w.k / BLOCK;
        let pairs = nb / 2;
        avx2::rows_with(simd, w, xd, first, out, |wb, acc| {
            #[allow(unsafe_code)]
            // SAFETY: blocks `wb + 2p` and `wb + 2p + 1` (and `xb`, `xb + 1`) are adjacent
            // 32-byte arrays of one row, so each 64-byte load stays inside its `Vec`.
            unsafe {
                for p in 0..pairs {
                    let b = 2 * p;
                    let wq = _mm512_loadu_si512(w.qs[wb + b].as_ptr().cast());
                    let aw = _mm512_abs_epi8(wq);
                    let neg = _mm512_movepi8_mask(wq);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xb = r * nb + b;
                        let x = _mm512_loadu_si512(xq[xb].as_ptr().cast());
                        // x with w's sign (where w is 0, |w| is 0: the sign does not matter).
                        let sx = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
                        let q =
                            _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx));
                        let d0 = _mm256_set1_ps(w.d[wb + b] * xd[xb]);
                        let d1 = _mm256_set1_ps(w.d[wb + b + 1] * xd[xb + 1]);
                        *a = _mm256_fmadd_ps(d0, _mm512_castps512_ps256(q), *a);
                        *a = _mm256_fmadd_ps(d1, _mm512_extractf32x8_ps::<1>(q), *a);
                    }
                }
            }
            if nb % 2 == 1 {
                // The odd last block as the AVX2 path computes it.
                avx2::block(simd, w, wb, xd, xq, nb - 1, acc);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_rows_equal_the_avx2_rows_bit_for_bit() {
        let Some(simd) = pulp::x86::V3::try_new() else {
            return;
        };
        if !crate::avx512_vnni() {
            eprintln!("no AVX-512 VNNI: nothing to compare");
            return;
        }
        // An even and an odd number of blocks per row (two at a time, then the tail).
        for (m, k, n) in [(1, 256, 7), (3, 96, 5), (8, 288, 4)] {
            let bytes: Vec<u8> = (0..n * k / BLOCK)
                .flat_map(|i| {
                    let d = f16::from_f32(0.002 + (i % 5) as f32 * 0.001).to_le_bytes();
                    let q = (0..BLOCK).map(move |e| ((i * 37 + e * 11) % 256) as u8);
                    d.into_iter().chain(q)
                })
                .collect();
            let w = Q8_0Weights::from_ggml(&bytes, n, k).unwrap();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 23) as f32 - 11.0) / 3.0)
                .collect();
            let (xd, xq) = quantize(&x);
            let mut wide = vec![0f32; n * m];
            let mut narrow = vec![0f32; n * m];
            #[allow(unsafe_code)]
            // SAFETY: AVX-512 VNNI was detected just above.
            unsafe {
                avx512::rows(simd, &w, &xd, &xq, 0, &mut wide)
            };
            simd.vectorize(|| avx2::rows(simd, &w, &xd, &xq, 0, &mut narrow));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&wide), bits(&narrow), "{m}x{k}x{n}");
        }
    }

    #[test]
    fn approximates_the_dequantized_product() {
        let (m, k, n) = (3, 96, 21);
        let mut bytes = Vec::new();
        let mut want_w = Vec::new();
        for i in 0..n * k / BLOCK {
            let d = f16::from_f32(0.01 + (i % 7) as f32 * 0.003);
            bytes.extend_from_slice(&d.to_le_bytes());
            for e in 0..BLOCK {
                let q = ((i * 31 + e * 17) % 255) as i32 - 127;
                bytes.push(q as i8 as u8);
                want_w.push(d.to_f32() * q as f32);
            }
        }
        let Ok(w) = Q8_0Weights::from_ggml(&bytes, n, k) else {
            return; // no AVX2 here: the engine keeps candle's matmul
        };
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
            .collect();
        let y = w.matmul(&x, m);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|c| x[i * k + c] * want_w[j * k + c]).sum();
                // Quantizing x moves each element by at most half a step (amax / 127 / 2).
                let bound: f32 = (0..k)
                    .map(|c| {
                        let blk = &x[i * k + c / BLOCK * BLOCK..][..BLOCK];
                        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                        want_w[j * k + c].abs() * amax / 127.0 * 0.51
                    })
                    .sum();
                let got = y[i * n + j];
                assert!(
                    (got - want).abs() <= bound + 1e-4,
                    "[{i},{j}] {got} vs {want} (±{bound})"
                );
            }
        }
    }
}
