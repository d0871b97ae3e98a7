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
//! - repacks the weights once, at load ([`Q4_1Weights::from_ggml`]), into panels of eight rows
//!   interleaved four bytes at a time: per block, chunk `c` (nibble bytes `4c..4c + 4`, that is
//!   elements `4c..4c + 4` in the low nibbles and `16 + 4c..` in the high ones) holds the eight
//!   rows' four bytes side by side, so 32-bit lane `r` of a vector is row `r`; the rows' f16
//!   scales are kept as f32;
//! - multiplies each chunk, low and high nibbles apart, by its four activations broadcast to
//!   every lane: lane `r` accumulates row `r`'s block dot product directly — no per-block
//!   reduction across lanes. On AVX2 that is `vpmaddubsw` (pairs into i16; eight chunks' sums
//!   stay below 2¹⁵: 8 · 2 · 15 · 128) then one `vpmaddwd`; on AVX-512 VNNI, `vpdpbusd` on 256-bit
//!   vectors. Integer sums are exact, and the scales and the running sum are applied per lane
//!   with the same IEEE operations in the same order as candle's scalar loop, so the result is
//!   bit-identical while eight rows advance at once;
//! - unpacks a panel's block once and reuses it for every row of the batch;
//! - prefetches the blocks [`PREFETCH_BLOCKS`] ahead: a decode step at one stream is bound by
//!   how many cache misses a core keeps in flight, and the hardware prefetcher alone keeps
//!   too few for the three arrays a panel streams through;
//! - splits the panels across cores with rayon.
//!
//! Before (2026-12-07) the panels held each row's sixteen bytes contiguous and every block's
//! eight row sums were reduced across lanes (`vphaddd` tree or a transposing shuffle): most of
//! the work at batch 1, and why the AVX2 form trailed llama.cpp's.

use half::f16;
use rayon::prelude::*;

use crate::{BLOCK, BlockError};

/// Bytes per block in ggml's layout: f16 d, f16 m, 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;
/// Rows per panel: one AVX2 lane each.
const PANEL: usize = 8;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 4;
/// How many blocks ahead of the one being multiplied the kernels prefetch (16 blocks: 3 KiB
/// of nibbles and scales). Measured at batch 1, alternating: none 116 / 134 tok/s (AVX2 /
/// AVX-512 VNNI), 4 blocks 128–134 / 138–139, 8 blocks 133–141 / 143–147, 16 blocks
/// 136–137 / 145–161; at batch 8 each +3 % (docs/benchmarks.md, change 25).
const PREFETCH_BLOCKS: usize = 16;
/// Four-byte chunks per block's sixteen nibble bytes.
const CHUNKS: usize = 4;

/// Where nibble byte `j` of panel row `lane` sits in a block's interleaved bytes.
#[inline(always)]
fn interleaved(lane: usize, j: usize) -> usize {
    (j / 4) * 4 * PANEL + lane * 4 + j % 4
}

/// An `n × k` Q4_1 matrix laid out for [`Self::matmul`]: panels of [`PANEL`] rows (the last
/// padded with zero rows), each stored block by block.
pub struct Q4_1Weights {
    n: usize,
    k: usize,
    /// Per panel and block: the rows' scales and minimums as f32 (exact conversions of the
    /// f16s), and their nibbles interleaved ([`CHUNKS`] chunks of the [`PANEL`] rows' four
    /// bytes each).
    d: Vec<[f32; PANEL]>,
    m: Vec<[f32; PANEL]>,
    qs: Vec<[u8; 16 * PANEL]>,
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
            qs: vec![[0; 16 * PANEL]; slots],
        };
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        for (i, b) in blocks.enumerate() {
            let (row, block) = (i / nb, i % nb);
            let (slot, lane) = ((row / PANEL) * nb + block, row % PANEL);
            w.d[slot][lane] = half(b, 0);
            w.m[slot][lane] = half(b, 2);
            for (j, &byte) in b[4..20].iter().enumerate() {
                w.qs[slot][interleaved(lane, j)] = byte;
            }
        }
        Ok(w)
    }

    /// The matrices stacked (rows of the first, then of the second, …), all `k` wide: one
    /// product for projections that read the same input (q, k and v; gate and up), so the
    /// activations are quantized once and the cores meet once. Each output's arithmetic is
    /// unchanged. `None` when the widths differ or nothing is given.
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let nb = k / BLOCK;
        let n: usize = parts.iter().map(|p| p.n).sum();
        let slots = n.div_ceil(PANEL) * nb;
        let mut w = Self {
            n,
            k,
            d: vec![[0.0; PANEL]; slots],
            m: vec![[0.0; PANEL]; slots],
            qs: vec![[0; 16 * PANEL]; slots],
        };
        let mut row = 0;
        for p in parts {
            for r in 0..p.n {
                let (to, from) = ((row / PANEL) * nb, (r / PANEL) * nb);
                let (to_lane, from_lane) = (row % PANEL, r % PANEL);
                for b in 0..nb {
                    w.d[to + b][to_lane] = p.d[from + b][from_lane];
                    w.m[to + b][to_lane] = p.m[from + b][from_lane];
                    for j in 0..16 {
                        w.qs[to + b][interleaved(to_lane, j)] =
                            p.qs[from + b][interleaved(from_lane, j)];
                    }
                }
                row += 1;
            }
        }
        Some(w)
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
        if let Some(simd) = pulp::x86::V3::try_new() {
            if crate::avx512_vnni() {
                #[allow(unsafe_code)]
                // SAFETY: the CPU has the features `avx512::panels` enables (checked just
                // above).
                return unsafe { avx512::panels(simd, self, x, first, out) };
            }
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
                    let (qw, qx) = (&w.qs[wb + b], &x.qs[xb + b]);
                    let mut sumi = 0i32;
                    for i in 0..BLOCK / 2 {
                        let byte = qw[interleaved(lane, i)];
                        sumi += (byte & 0x0F) as i32 * qx[i] as i32
                            + (byte >> 4) as i32 * qx[i + BLOCK / 2] as i32;
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
    use super::{CHUNKS, PANEL, Q4_1Weights, Q8_1Rows};
    use core::arch::x86_64::{__m256, __m256i};
    use pulp::x86::V3;

    /// A block's chunks as bytes: `[c]` the low nibbles (elements `4c..`), `[CHUNKS + c]` the
    /// high ones (elements `16 + 4c..`), lane `r` panel row `r`.
    #[inline(always)]
    fn unpack(simd: V3, qs: &[u8; 16 * PANEL]) -> [__m256i; 2 * CHUNKS] {
        let (a, nibble) = (simd.avx2, simd.avx._mm256_set1_epi8(0x0F));
        let raw: [__m256i; CHUNKS] = bytemuck::cast(*qs);
        std::array::from_fn(|i| {
            let r = raw[i % CHUNKS];
            let r = if i < CHUNKS {
                r
            } else {
                a._mm256_srli_epi16::<4>(r)
            };
            a._mm256_and_si256(r, nibble)
        })
    }

    /// The activation bytes `4c..4c + 4` of a block in every lane, in [`unpack`]'s order.
    #[inline(always)]
    pub(super) fn broadcast(simd: V3, xq: &[i8; 32], i: usize) -> __m256i {
        let at = if i < CHUNKS {
            4 * i
        } else {
            16 + 4 * (i - CHUNKS)
        };
        let word = i32::from_le_bytes([
            xq[at] as u8,
            xq[at + 1] as u8,
            xq[at + 2] as u8,
            xq[at + 3] as u8,
        ]);
        simd.avx._mm256_set1_epi32(word)
    }

    /// Lane `r`: panel row `r`'s `Σ q_w · q_x` over the block. Each `vpmaddubsw` pair is at
    /// most 2 · 15 · 128 in size, so the eight chunks' i16 sums cannot overflow.
    #[inline(always)]
    fn dot(simd: V3, w: &[__m256i; 2 * CHUNKS], xq: &[i8; 32]) -> __m256i {
        let a = simd.avx2;
        let p: [__m256i; 2 * CHUNKS] =
            std::array::from_fn(|i| a._mm256_maddubs_epi16(w[i], broadcast(simd, xq, i)));
        let s01 = a._mm256_add_epi16(
            a._mm256_add_epi16(p[0], p[1]),
            a._mm256_add_epi16(p[2], p[3]),
        );
        let s23 = a._mm256_add_epi16(
            a._mm256_add_epi16(p[4], p[5]),
            a._mm256_add_epi16(p[6], p[7]),
        );
        a._mm256_madd_epi16(a._mm256_add_epi16(s01, s23), simd.avx._mm256_set1_epi16(1))
    }

    /// `acc + ((sumi · d_w) · d_x + m_w · s_x)` per lane: candle's order.
    #[inline(always)]
    fn scale(
        simd: V3,
        acc: __m256,
        sumi: __m256i,
        dw: __m256,
        mw: __m256,
        dx: f32,
        sx: f32,
    ) -> __m256 {
        let v = simd.avx;
        let t = v._mm256_mul_ps(
            v._mm256_mul_ps(v._mm256_cvtepi32_ps(sumi), dw),
            v._mm256_set1_ps(dx),
        );
        let u = v._mm256_mul_ps(mw, v._mm256_set1_ps(sx));
        v._mm256_add_ps(acc, v._mm256_add_ps(t, u))
    }

    #[inline(always)]
    pub(super) fn panels(
        simd: V3,
        w: &Q4_1Weights,
        x: &Q8_1Rows,
        first: usize,
        out: &mut [[f32; PANEL]],
    ) {
        panels_with(simd, w, x, first, out, |wv, xq| dot(simd, wv, xq));
    }

    /// The panels' loop around a block dot product: AVX2's [`dot`] or AVX-512 VNNI's.
    #[inline(always)]
    pub(super) fn panels_with(
        simd: V3,
        w: &Q4_1Weights,
        x: &Q8_1Rows,
        first: usize,
        out: &mut [[f32; PANEL]],
        dot: impl Fn(&[__m256i; 2 * CHUNKS], &[i8; 32]) -> __m256i,
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
                // The panel's blocks stream from memory through three arrays; asking for
                // them a few blocks ahead keeps more misses in flight than the hardware
                // prefetcher does (module docs).
                let ahead = slot + super::PREFETCH_BLOCKS;
                crate::prefetch_bytes(w.qs.as_ptr().wrapping_add(ahead), 16 * PANEL);
                if b % 2 == 0 {
                    crate::prefetch(w.d.as_ptr().wrapping_add(ahead));
                    crate::prefetch(w.m.as_ptr().wrapping_add(ahead));
                }
                let wv = unpack(simd, &w.qs[slot]);
                let dw: __m256 = bytemuck::cast(w.d[slot]);
                let mw: __m256 = bytemuck::cast(w.m[slot]);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = r * nb + b;
                    let sumi = dot(&wv, &x.qs[xb]);
                    *a = scale(simd, *a, sumi, dw, mw, x.d[xb], x.s[xb]);
                }
            }
            for (lanes, a) in per_row.iter_mut().zip(&acc) {
                *lanes = bytemuck::cast(*a);
            }
        }
    }
}

/// The AVX-512 VNNI form of [`avx2::panels`]: `vpdpbusd` on 256-bit vectors (AVX-512VL) takes
/// a chunk's four products and adds them to the lane's i32 in one instruction; two
/// accumulators (low and high nibbles) keep the dependency chains short. Same sums, same float
/// operations per lane.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::{broadcast, panels_with};
    use super::{CHUNKS, PANEL, Q4_1Weights, Q8_1Rows};
    use core::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_dpbusd_epi32, _mm256_setzero_si256,
    };
    use pulp::x86::V3;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    #[inline]
    fn dot(simd: V3, w: &[__m256i; 2 * CHUNKS], xq: &[i8; 32]) -> __m256i {
        let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for c in 0..CHUNKS {
            lo = _mm256_dpbusd_epi32(lo, w[c], broadcast(simd, xq, c));
            hi = _mm256_dpbusd_epi32(hi, w[CHUNKS + c], broadcast(simd, xq, CHUNKS + c));
        }
        _mm256_add_epi32(lo, hi)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) fn panels(
        simd: V3,
        w: &Q4_1Weights,
        x: &Q8_1Rows,
        first: usize,
        out: &mut [[f32; PANEL]],
    ) {
        panels_with(simd, w, x, first, out, |wv, xq| dot(simd, wv, xq));
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
    fn a_stack_computes_what_its_parts_compute() {
        let k = 96;
        let sizes = [5, 8, 11];
        let parts: Vec<Q4_1Weights> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Q4_1Weights::from_ggml(&blocks(n, k, 40 + i as u32), n, k).unwrap())
            .collect();
        let refs: Vec<&Q4_1Weights> = parts.iter().collect();
        let all = Q4_1Weights::stack(&refs).unwrap();
        assert_eq!((all.rows(), all.cols()), (24, k));
        for m in [1, 3] {
            let x = activations(m, k);
            let y = all.matmul(&x, m);
            let mut col = 0;
            for p in &parts {
                let yp = p.matmul(&x, m);
                for i in 0..m {
                    for j in 0..p.rows() {
                        assert_eq!(
                            y[i * 24 + col + j].to_bits(),
                            yp[i * p.rows() + j].to_bits()
                        );
                    }
                }
                col += p.rows();
            }
        }
        let narrow = Q4_1Weights::from_ggml(&blocks(2, 64, 1), 2, 64).unwrap();
        assert!(Q4_1Weights::stack(&[&parts[0], &narrow]).is_none());
        assert!(Q4_1Weights::stack(&[]).is_none());
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        assert!(Q4_1Weights::from_ggml(&[0; 20], 1, 31).is_err());
        assert!(Q4_1Weights::from_ggml(&[0; 19], 1, 32).is_err());
    }
}
