//! Q4_1 weights × f32 activations, with the exact arithmetic of ggml's `q4_1 · q8_1` dot product
//! as candle runs it (so greedy tokens stay identical to candle-transformers' reference model),
//! but fast.
//!
//! A Q4_1 block holds 32 weights as `d · q + m` with `q` in 0..16 (f16 `d`, f16 `m`, 16 bytes of
//! nibbles: element `j` in the low nibble of byte `j`, element `j + 16` in its high nibble). The
//! activations of each row are quantized once per call to ggml's Q8_1 (32 `i8` per block, f16
//! scale `d` and f16 `s = d · Σq`), then each output is
//! `Σ_blocks (Σ q_w · q_x) · d_w · d_x + m_w · s_x`, summed block by block in order.
//!
//! Where candle computes that one block at a time in scalar code, [`Q4_1Weights::matmul`]
//! - repacks the weights once, at load ([`Q4_1Weights::from_ggml`]), into panels of eight rows:
//!   per block, the eight rows' nibbles side by side and their f16 scales as f32;
//! - on AVX2, unpacks a panel's eight blocks into bytes once and reuses them for every row of
//!   the batch, takes the integer dot products with `vpmaddubsw` / `vpmaddwd` (exact), reduces
//!   them so that lane `r` holds panel row `r`'s block sum, and applies the scales and the
//!   running sum as vectors — each lane sees the same IEEE operations in the same order as
//!   candle's scalar loop, so the result is bit-identical, while eight rows' sums advance at
//!   once instead of one dependent scalar chain;
//! - on AVX-512 with VNNI, does the same with `vpdpbusd` on four rows' nibbles per vector
//!   (each 128-bit quarter one row: low nibbles against the block's first sixteen activations,
//!   high nibbles against the last sixteen), one transposing reduction per block for the
//!   panel's eight rows, and the same per-lane float operations — bit-identical again;
//! - splits the panels across cores with rayon.

use half::f16;
use rayon::prelude::*;

use crate::{BLOCK, BlockError};

/// Bytes per block in ggml's layout: f16 d, f16 m, 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;
/// Rows per panel: one AVX2 lane each.
const PANEL: usize = 8;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 4;

/// An `n × k` Q4_1 matrix laid out for [`Self::matmul`]: panels of [`PANEL`] rows (the last
/// padded with zero rows), each stored block by block.
pub struct Q4_1Weights {
    n: usize,
    k: usize,
    /// Per panel and block: the rows' scales and minimums as f32 (exact conversions of the
    /// f16s), and their nibbles.
    d: Vec<[f32; PANEL]>,
    m: Vec<[f32; PANEL]>,
    qs: Vec<[[u8; 16]; PANEL]>,
}

impl Q4_1Weights {
    /// From ggml's block bytes (a GGUF tensor's data), `n` rows of `k` weights.
    pub fn from_ggml(bytes: &[u8], n: usize, k: usize) -> Result<Self, BlockError> {
        let blocks = crate::ggml_blocks("Q4_1", bytes, n, k, BLOCK_BYTES)?;
        let nb = k / BLOCK;
        let slots = n.div_ceil(PANEL) * nb;
        let mut w = Self {
            n,
            k,
            d: vec![[0.0; PANEL]; slots],
            m: vec![[0.0; PANEL]; slots],
            qs: vec![[[0; 16]; PANEL]; slots],
        };
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        for (i, b) in blocks.enumerate() {
            let (row, block) = (i / nb, i % nb);
            let (slot, lane) = ((row / PANEL) * nb + block, row % PANEL);
            w.d[slot][lane] = half(b, 0);
            w.m[slot][lane] = half(b, 2);
            w.qs[slot][lane].copy_from_slice(&b[4..20]);
        }
        Ok(w)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// `y = x · wᵀ`; `x` is `m × k` row-major, `y` is `m × n` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "x is not m × k");
        let panels = self.n.div_ceil(PANEL);
        if m == 0 || self.n == 0 {
            return vec![0f32; m * self.n];
        }
        let xq = Q8_1Rows::quantize(x, m, self.k);
        // Panel-major: per panel, per row of x, the panel's PANEL outputs.
        let mut yp = vec![[0f32; PANEL]; panels * m];
        yp.par_chunks_mut(PANELS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| self.task(&xq, task * PANELS_PER_TASK, out));
        let mut y = vec![0f32; m * self.n];
        for (p, per_row) in yp.chunks_exact(m).enumerate() {
            let cols = p * PANEL..((p + 1) * PANEL).min(self.n);
            for (r, lanes) in per_row.iter().enumerate() {
                y[r * self.n + cols.start..r * self.n + cols.end]
                    .copy_from_slice(&lanes[..cols.len()]);
            }
        }
        y
    }

    /// Panels `first..` against every row of `x`; `out` is panels × m.
    fn task(&self, x: &Q8_1Rows, first: usize, out: &mut [[f32; PANEL]]) {
        #[cfg(target_arch = "x86_64")]
        if crate::avx512_vnni() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has the features `avx512::panels` enables (checked just above).
            return unsafe { avx512::panels(self, x, first, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            return simd.vectorize(|| avx2::panels(simd, self, x, first, out));
        }
        scalar_panels(self, x, first, out);
    }

    fn blocks_per_row(&self) -> usize {
        self.k / BLOCK
    }
}

/// Activations quantized per block as ggml's `quantize_row_q8_1` does (candle's
/// `BlockQ8_1::from_float`), the f16 scale and sum kept as their f32 values.
struct Q8_1Rows {
    blocks_per_row: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; BLOCK]>,
}

impl Q8_1Rows {
    fn rows(&self) -> usize {
        self.d.len() / self.blocks_per_row.max(1)
    }

    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let blocks = m * k / BLOCK;
        let mut q = Self {
            blocks_per_row: k / BLOCK,
            d: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
            qs: Vec::with_capacity(blocks),
        };
        for xs in x.chunks_exact(BLOCK) {
            let (d16, qs) = crate::quantize_block(xs);
            let sum: i32 = qs.iter().map(|&q| q as i32).sum();
            q.d.push(d16.to_f32());
            q.s.push((f16::from_f32(sum as f32) * d16).to_f32());
            q.qs.push(qs);
        }
        q
    }
}

/// Candle's loop, block by block: the reference the SIMD path must equal bit for bit.
fn scalar_panels(w: &Q4_1Weights, x: &Q8_1Rows, first: usize, out: &mut [[f32; PANEL]]) {
    let nb = w.blocks_per_row();
    let m = x.rows();
    for (p, per_row) in out.chunks_exact_mut(m).enumerate() {
        let wb = (first + p) * nb;
        for (r, lanes) in per_row.iter_mut().enumerate() {
            let xb = r * nb;
            for (lane, y) in lanes.iter_mut().enumerate() {
                let mut sumf = 0f32;
                for b in 0..nb {
                    let (qw, qx) = (&w.qs[wb + b][lane], &x.qs[xb + b]);
                    let mut sumi = 0i32;
                    for i in 0..BLOCK / 2 {
                        sumi += (qw[i] & 0x0F) as i32 * qx[i] as i32
                            + (qw[i] >> 4) as i32 * qx[i + BLOCK / 2] as i32;
                    }
                    sumf += sumi as f32 * w.d[wb + b][lane] * x.d[xb + b]
                        + w.m[wb + b][lane] * x.s[xb + b];
                }
                *y = sumf;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PANEL, Q4_1Weights, Q8_1Rows};
    use core::arch::x86_64::{__m128i, __m256, __m256i};
    use pulp::x86::V3;

    /// A block's 32 weights as unsigned bytes, in element order.
    #[inline(always)]
    fn unpack(simd: V3, qs: &[u8; 16]) -> __m256i {
        let lo: __m128i = bytemuck::cast(*qs);
        let hi = simd.sse2._mm_srli_epi16::<4>(lo);
        let both = simd.avx._mm256_set_m128i(hi, lo);
        simd.avx2
            ._mm256_and_si256(both, simd.avx._mm256_set1_epi8(0x0F))
    }

    /// Eight i32 partial sums of `Σ q_w · q_x` over one block.
    #[inline(always)]
    fn dot(simd: V3, w: __m256i, x: __m256i) -> __m256i {
        let pairs = simd.avx2._mm256_maddubs_epi16(w, x);
        simd.avx2
            ._mm256_madd_epi16(pairs, simd.avx._mm256_set1_epi16(1))
    }

    /// Lane `i` of the result: the sum of `v[i]`'s eight lanes (integer sums are exact in any
    /// order).
    #[inline(always)]
    fn reduce8(simd: V3, v: &[__m256i; PANEL]) -> __m256i {
        let a = simd.avx2;
        let h01 = a._mm256_hadd_epi32(v[0], v[1]);
        let h23 = a._mm256_hadd_epi32(v[2], v[3]);
        let h45 = a._mm256_hadd_epi32(v[4], v[5]);
        let h67 = a._mm256_hadd_epi32(v[6], v[7]);
        let h0123 = a._mm256_hadd_epi32(h01, h23);
        let h4567 = a._mm256_hadd_epi32(h45, h67);
        let lo = a._mm256_permute2x128_si256::<0x20>(h0123, h4567);
        let hi = a._mm256_permute2x128_si256::<0x31>(h0123, h4567);
        a._mm256_add_epi32(lo, hi)
    }

    #[inline(always)]
    pub(super) fn panels(
        simd: V3,
        w: &Q4_1Weights,
        x: &Q8_1Rows,
        first: usize,
        out: &mut [[f32; PANEL]],
    ) {
        let nb = w.blocks_per_row();
        let m = x.rows();
        let v = simd.avx;
        let mut acc: Vec<__m256> = vec![v._mm256_setzero_ps(); m];
        for (p, per_row) in out.chunks_exact_mut(m).enumerate() {
            let wb = (first + p) * nb;
            acc.fill(v._mm256_setzero_ps());
            for b in 0..nb {
                let slot = wb + b;
                let qs = &w.qs[slot];
                let wv: [__m256i; PANEL] = std::array::from_fn(|lane| unpack(simd, &qs[lane]));
                let dw: __m256 = bytemuck::cast(w.d[slot]);
                let mw: __m256 = bytemuck::cast(w.m[slot]);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = r * nb + b;
                    let xv: __m256i = bytemuck::cast(x.qs[xb]);
                    let sums: [__m256i; PANEL] =
                        std::array::from_fn(|lane| dot(simd, wv[lane], xv));
                    let sumi = v._mm256_cvtepi32_ps(reduce8(simd, &sums));
                    // (sumi · d_w) · d_x + m_w · s_x, then the running sum: candle's order.
                    let t = v._mm256_mul_ps(v._mm256_mul_ps(sumi, dw), v._mm256_set1_ps(x.d[xb]));
                    let u = v._mm256_mul_ps(mw, v._mm256_set1_ps(x.s[xb]));
                    *a = v._mm256_add_ps(*a, v._mm256_add_ps(t, u));
                }
            }
            for (lanes, a) in per_row.iter_mut().zip(&acc) {
                *lanes = bytemuck::cast(*a);
            }
        }
    }
}

/// The AVX-512 VNNI form of [`avx2::panels`]: same sums, same float operations per lane.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PANEL, Q4_1Weights, Q8_1Rows};
    use core::arch::x86_64::{
        __m256, __m512i, _MM_PERM_BADC, _mm_loadu_si128, _mm256_add_ps, _mm256_cvtepi32_ps,
        _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
        _mm512_add_epi32, _mm512_and_si512, _mm512_broadcast_i32x4, _mm512_castsi512_si256,
        _mm512_dpbusd_epi32, _mm512_loadu_si512, _mm512_permutexvar_epi32, _mm512_set1_epi8,
        _mm512_setr_epi32, _mm512_setzero_si512, _mm512_shuffle_epi32, _mm512_srli_epi16,
        _mm512_unpackhi_epi32, _mm512_unpacklo_epi32,
    };

    /// Lane `r` of the result: the sum of row `r`'s four partial sums, rows 0–3 one per
    /// 128-bit quarter of `a`, rows 4–7 of `b` (integer sums: exact in any order).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[inline]
    fn reduce(a: __m512i, b: __m512i) -> core::arch::x86_64::__m256i {
        // Per quarter q: [a0+a2, b0+b2, a1+a3, b1+b3], then [Σa, Σb, Σa, Σb].
        let s = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let s = _mm512_add_epi32(s, _mm512_shuffle_epi32::<_MM_PERM_BADC>(s));
        // Rows 0–3 are element 0 of quarters 0–3, rows 4–7 element 1.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, s))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) fn panels(w: &Q4_1Weights, x: &Q8_1Rows, first: usize, out: &mut [[f32; PANEL]]) {
        let nb = w.blocks_per_row();
        let m = x.rows();
        let nibble = _mm512_set1_epi8(0x0F);
        let mut acc: Vec<__m256> = vec![_mm256_setzero_ps(); m];
        for (p, per_row) in out.chunks_exact_mut(m).enumerate() {
            let wb = (first + p) * nb;
            acc.fill(_mm256_setzero_ps());
            for b in 0..nb {
                let slot = wb + b;
                let qs: &[[u8; 16]; PANEL] = &w.qs[slot];
                #[allow(unsafe_code)]
                // SAFETY: `qs` is 8 × 16 contiguous bytes: two 64-byte loads; each `x.qs`
                // block is 32 bytes: two 16-byte loads; `w.d`/`w.m` slots are 8 f32s.
                unsafe {
                    let raw0 = _mm512_loadu_si512(qs.as_ptr().cast());
                    let raw1 = _mm512_loadu_si512(qs.as_ptr().add(4).cast());
                    let lo0 = _mm512_and_si512(raw0, nibble);
                    let hi0 = _mm512_and_si512(_mm512_srli_epi16::<4>(raw0), nibble);
                    let lo1 = _mm512_and_si512(raw1, nibble);
                    let hi1 = _mm512_and_si512(_mm512_srli_epi16::<4>(raw1), nibble);
                    let dw = _mm256_loadu_ps(w.d[slot].as_ptr());
                    let mw = _mm256_loadu_ps(w.m[slot].as_ptr());
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xb = r * nb + b;
                        let xq = x.qs[xb].as_ptr();
                        let xlo = _mm512_broadcast_i32x4(_mm_loadu_si128(xq.cast()));
                        let xhi = _mm512_broadcast_i32x4(_mm_loadu_si128(xq.add(16).cast()));
                        let z = _mm512_setzero_si512();
                        let s0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo0, xlo), hi0, xhi);
                        let s1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo1, xlo), hi1, xhi);
                        let sumi = _mm256_cvtepi32_ps(reduce(s0, s1));
                        // (sumi · d_w) · d_x + m_w · s_x, then the running sum: candle's order.
                        let t = _mm256_mul_ps(_mm256_mul_ps(sumi, dw), _mm256_set1_ps(x.d[xb]));
                        let u = _mm256_mul_ps(mw, _mm256_set1_ps(x.s[xb]));
                        *a = _mm256_add_ps(*a, _mm256_add_ps(t, u));
                    }
                }
            }
            for (lanes, a) in per_row.iter_mut().zip(&acc) {
                #[allow(unsafe_code)]
                // SAFETY: `lanes` holds eight f32s.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *a)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random ggml Q4_1 bytes with realistic scales.
    fn blocks(n: usize, k: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            s
        };
        let mut out = Vec::new();
        for _ in 0..n * k / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 40000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
            out.extend_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&m.to_le_bytes());
            out.extend((0..16).map(|_| (next() >> 8) as u8));
        }
        out
    }

    fn activations(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect()
    }

    #[test]
    fn simd_rows_equal_candles_scalar_loop_bit_for_bit() {
        for (m, k, n) in [
            (1, 32, 3),
            (1, 576, 40),
            (3, 1536, 17),
            (8, 576, 33),
            (16, 64, 5),
        ] {
            let w = Q4_1Weights::from_ggml(&blocks(n, k, (m * k + n) as u32), n, k).unwrap();
            let x = activations(m, k);
            let xq = Q8_1Rows::quantize(&x, m, k);
            let panels = n.div_ceil(PANEL);
            let mut want = vec![[0f32; PANEL]; panels * m];
            scalar_panels(&w, &xq, 0, &mut want);
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V3::try_new() {
                let mut got = vec![[0f32; PANEL]; panels * m];
                simd.vectorize(|| avx2::panels(simd, &w, &xq, 0, &mut got));
                let bits = |v: &[[f32; PANEL]]| {
                    v.iter().flatten().map(|f| f.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(bits(&got), bits(&want), "AVX2 ({m},{k},{n})");
            }
            let got = w.matmul(&x, m);
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(
                        got[i * n + j].to_bits(),
                        want[(j / PANEL) * m + i][j % PANEL].to_bits(),
                        "({m},{k},{n}) [{i},{j}]"
                    );
                }
            }
        }
    }

    #[test]
    fn approximates_the_dequantized_product() {
        let (m, k, n) = (2, 256, 9);
        let bytes = blocks(n, k, 7);
        let w = Q4_1Weights::from_ggml(&bytes, n, k).unwrap();
        let x = activations(m, k);
        let y = w.matmul(&x, m);
        for i in 0..m {
            for j in 0..n {
                let mut want = 0f64;
                for b in 0..k / BLOCK {
                    let blk = &bytes[(j * k / BLOCK + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f64();
                    let mn = f16::from_le_bytes([blk[2], blk[3]]).to_f64();
                    for e in 0..BLOCK {
                        let q = if e < 16 {
                            blk[4 + e] & 15
                        } else {
                            blk[4 + e - 16] >> 4
                        };
                        want += (d * q as f64 + mn) * x[i * k + b * BLOCK + e] as f64;
                    }
                }
                let got = y[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 0.02 * (1.0 + want.abs()),
                    "[{i},{j}] {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        assert!(Q4_1Weights::from_ggml(&[0; 20], 1, 31).is_err());
        assert!(Q4_1Weights::from_ggml(&[0; 19], 1, 32).is_err());
    }
}
