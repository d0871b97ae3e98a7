//! CPU kernels candle lacks.
//!
//! [`matmul_small_m`]: `y = x · wᵀ` for the rows of a decode step. candle's f32 matmul goes
//! through `gemm`, which packs the whole weight matrix on every call and is tuned for large
//! products; at 1–64 rows it runs slower than reading the weights once should allow. Here
//! rayon splits the weight rows across cores, and on AVX2 or AVX-512 CPUs `tiles` keeps a
//! tile of 3 weight rows × 4 batch rows of sums in registers, so each weight vector loaded
//! serves four rows and each `x` vector three, and the next tile's weights are prefetched
//! while one is computed (see there); elsewhere a portable kernel
//! (`pulp`, picked at run time) dots each weight row with up to four rows at a time.
//!
//! [`matmul_small_m_f16`]: the same with f16 weights (half the bytes read from memory), widened
//! to f32 in registers (F16C) once for the four rows that use them; without F16C, into an f32
//! scratch buffer per task that stays in cache.
//!
//! [`tall::matmul`]: `y = x · wᵀ` for the many rows of a prompt on AVX-512F CPUs, where
//! candle's GEMM runs its AVX2 microkernel: `x` packed into panels of 32 rows, tiles of 12
//! weight rows × 32 rows of sums in registers, rayon tasks of 48 weight rows (see [`tall`]).
//!
//! [`attention::paged_attention`]: decode and prompt rows attend over keys and values read in
//! place from the paged cache (no gather, no repeated KV heads).
//!
//! [`Q4_1Weights`]: GGUF's Q4_1 blocks × f32 activations, bit-identical to candle's (scalar)
//! quantized matmul, with AVX2 (or AVX-512 VNNI) integer dot products on
//! row-interleaved panels and each unpacked weight block reused by every row of the batch
//! (see [`q4_1`]); [`Q8_0Weights`] likewise for Q8_0, bit-identical to
//! candle's AVX2 path.

pub mod attention;
pub mod q4_1;
pub mod q8_0;
pub mod tall;
mod tiles;

pub use q4_1::Q4_1Weights;
pub use q8_0::Q8_0Weights;

/// Set when the kernels must keep off their AVX-512 forms.
static AVX2_AT_MOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps every kernel to its AVX2 form (or narrower) even on an AVX-512 CPU, as on a CPU
/// without AVX-512: to compare the paths on one machine, or to check the AVX2 ones there
/// (the worker's `--cpu-kernels avx2`). Process-wide; meant to be set once at start-up.
pub fn limit_to_avx2(on: bool) {
    AVX2_AT_MOST.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the AVX-512 forms may run (the CPU must still have the features).
pub(crate) fn avx512_allowed() -> bool {
    !AVX2_AT_MOST.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the Q4_1 and Q8_0 kernels' AVX-512 VNNI forms may run here: allowed, and the CPU
/// has every feature they enable.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_vnni() -> bool {
    avx512_allowed()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

/// Asks the CPU to bring the cache line holding `p` into L1 before it is read. A hint only:
/// it never faults, so `p` may point past its allocation (the kernels prefetch a fixed
/// distance ahead without checking where their data ends).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a prefetch reads nothing architecturally and never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] for every cache line of the `bytes` bytes from `p` (a line per 64 bytes, from
/// `p` on).
#[inline(always)]
pub(crate) fn prefetch_bytes<T>(p: *const T, bytes: usize) {
    let p = p.cast::<u8>();
    for line in (0..bytes).step_by(64) {
        prefetch(p.wrapping_add(line));
    }
}

use half::f16;
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// Weight rows per parallel task: enough work to amortise scheduling, small enough to
/// balance across cores.
const ROWS_PER_TASK: usize = 32;

/// Values per block in ggml's Q4_1, Q8_0 and Q8_1 formats.
pub const BLOCK: usize = 32;

/// Why a ggml block matrix cannot be taken by one of the quantized kernels.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{format} needs k divisible by {BLOCK}, got {k}")]
    Columns { format: &'static str, k: usize },
    #[error("{format} matrix of {n} × {k} takes {want} bytes, got {got}")]
    Size {
        format: &'static str,
        n: usize,
        k: usize,
        want: usize,
        got: usize,
    },
    #[error("this CPU has no AVX2/FMA: the Q8_0 kernel only reproduces candle's AVX2 arithmetic")]
    NoAvx2,
}

/// The blocks of an `n × k` ggml matrix of `block_bytes`-byte blocks, once its shape and size
/// are checked.
fn ggml_blocks<'a>(
    format: &'static str,
    bytes: &'a [u8],
    n: usize,
    k: usize,
    block_bytes: usize,
) -> Result<std::slice::ChunksExact<'a, u8>, BlockError> {
    if !k.is_multiple_of(BLOCK) {
        return Err(BlockError::Columns { format, k });
    }
    let want = n * k / BLOCK * block_bytes;
    if bytes.len() != want {
        return Err(BlockError::Size {
            format,
            n,
            k,
            want,
            got: bytes.len(),
        });
    }
    Ok(bytes.chunks_exact(block_bytes))
}

/// One block of activations quantized to 8 bits as ggml's `quantize_row_q8_0` and
/// `quantize_row_q8_1` (candle's `from_float`) do: the f16 scale `amax / 127` and the quants
/// `round(x / scale)`.
fn quantize_block(xs: &[f32]) -> (f16, [i8; BLOCK]) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (
        f16::from_f32(d),
        std::array::from_fn(|i| (xs[i] * id).round() as i8),
    )
}

/// Whether this CPU runs the register-tiled kernels ([`tiles`]: AVX2, FMA and F16C) rather
/// than the portable ones; callers choosing between these kernels and a GEMM ask.
pub fn tiled() -> bool {
    tiles::level().is_some()
}

/// `x`: `m × k` row-major; `w`: `n × k` row-major. Returns `y`: `m × n` row-major.
pub fn matmul_small_m(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "w is not n × k");
    matmul_rows(x, WeightRows::F32(w), m, k, n)
}

/// [`matmul_small_m`] with f16 weights (half the bytes to read); products and sums are f32.
pub fn matmul_small_m_f16(x: &[f32], w: &[f16], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "w is not n × k");
    matmul_rows(x, WeightRows::F16(w), m, k, n)
}

/// Weights of a product, `n × k` row-major: f32, or f16 widened to f32 as the kernels read
/// them.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> WeightRows<'a> {
    pub fn len(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in `span` (whole rows).
    fn slice(self, span: std::ops::Range<usize>) -> Self {
        match self {
            Self::F32(w) => Self::F32(&w[span]),
            Self::F16(w) => Self::F16(&w[span]),
        }
    }
}

thread_local! {
    /// Weight rows widened to f32, per rayon worker (see [`widened`]).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on `w` widened to f32 in this worker's scratch buffer (reused, so a task allocates
/// nothing once the buffer has grown).
fn widened<R>(w: &[f16], f: impl FnOnce(&[f32]) -> R) -> R {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.resize(w.len(), 0.0);
        f16_to_f32(w, &mut buf);
        f(&buf)
    })
}

fn matmul_rows(x: &[f32], w: WeightRows<'_>, m: usize, k: usize, n: usize) -> Vec<f32> {
    matmul_rows_at(x, w, m, k, n, tiles::level())
}

/// [`matmul_rows`] with the tiled kernels of `tiled` (`None`: the portable ones, as on CPUs
/// without AVX2).
fn matmul_rows_at(
    x: &[f32],
    w: WeightRows<'_>,
    m: usize,
    k: usize,
    n: usize,
    tiled: Option<tiles::Level>,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not m × k");
    let mut yt = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return yt;
    }
    let arch = Arch::new();
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * ROWS_PER_TASK;
            let rows = out.len() / m;
            let span = first * k..(first + rows) * k;
            match (w, tiled) {
                #[cfg(target_arch = "x86_64")]
                (w, Some(level)) => tiles::run(level, x, w.slice(span), m, k, out),
                (WeightRows::F32(w), _) => arch.dispatch(Rows {
                    x,
                    w: &w[span],
                    m,
                    k,
                    out,
                }),
                (WeightRows::F16(w), _) => {
                    widened(&w[span], |w| arch.dispatch(Rows { x, w, m, k, out }))
                }
            }
        });
    // yt is n × m (each task wrote whole rows of it); callers want m × n.
    transpose(&yt, n, m)
}

/// f16 → f32, exact. With F16C (every AVX2 CPU has it) eight at a time with `vcvtph2ps`,
/// inlined into the loop: `half`'s slice conversion makes a call per eight values, which took
/// more time than the dot products, and pulp exposes no F16C.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        #[allow(unsafe_code)]
        // SAFETY: a `#[target_feature]` function's one requirement is that the CPU has the
        // features it enables; AVX and F16C were detected just above.
        return unsafe { f16_to_f32_f16c(src, dst) };
    }
    for (s, d) in src.iter().zip(dst) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use core::arch::x86_64::{__m128i, _mm256_cvtph_ps};
    let mut s8 = src.chunks_exact(8);
    let mut d8 = dst.chunks_exact_mut(8);
    for (s, d) in (&mut s8).zip(&mut d8) {
        let (Ok(s), Ok(d)) = (<&[f16; 8]>::try_from(s), <&mut [f32; 8]>::try_from(d)) else {
            continue;
        };
        *d = bytemuck::cast(_mm256_cvtph_ps(bytemuck::cast::<_, __m128i>(*s)));
    }
    for (s, d) in s8.remainder().iter().zip(d8.into_remainder()) {
        *d = s.to_f32();
    }
}

/// `rows × cols` row-major to `cols × rows` row-major.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    if cols == 1 {
        return a.to_vec();
    }
    let mut t = vec![0f32; rows * cols];
    for (r, row) in a.chunks_exact(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            t[c * rows + r] = *v;
        }
    }
    t
}

struct Rows<'a> {
    x: &'a [f32],
    w: &'a [f32],
    m: usize,
    k: usize,
    out: &'a mut [f32],
}

impl WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Rows { x, w, m, k, out } = self;
        let xs: Vec<(&[S::f32s], &[f32])> = x.chunks_exact(k).map(S::as_simd_f32s).collect();
        let tail_dot =
            |wt: &[f32], xt: &[f32]| -> f32 { wt.iter().zip(xt).map(|(p, q)| p * q).sum() };
        for (wrow, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
            let (wh, wt) = S::as_simd_f32s(wrow);
            let mut groups = xs.chunks_exact(4);
            let mut outs = o.chunks_exact_mut(4);
            for (g, og) in (&mut groups).zip(&mut outs) {
                let z = simd.splat_f32s(0.0);
                let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
                for ((((wv, p0), p1), p2), p3) in
                    wh.iter().zip(g[0].0).zip(g[1].0).zip(g[2].0).zip(g[3].0)
                {
                    a0 = simd.mul_add_f32s(*p0, *wv, a0);
                    a1 = simd.mul_add_f32s(*p1, *wv, a1);
                    a2 = simd.mul_add_f32s(*p2, *wv, a2);
                    a3 = simd.mul_add_f32s(*p3, *wv, a3);
                }
                for ((a, (_, xt)), y) in [a0, a1, a2, a3].iter().zip(g).zip(og.iter_mut()) {
                    *y = simd.reduce_sum_f32s(*a) + tail_dot(wt, xt);
                }
            }
            for ((xh, xt), y) in groups.remainder().iter().zip(outs.into_remainder()) {
                // Two accumulators so consecutive FMAs do not wait on each other.
                let z = simd.splat_f32s(0.0);
                let (mut a0, mut a1) = (z, z);
                let mut pairs_w = wh.chunks_exact(2);
                let mut pairs_x = xh.chunks_exact(2);
                for (pw, px) in (&mut pairs_w).zip(&mut pairs_x) {
                    a0 = simd.mul_add_f32s(px[0], pw[0], a0);
                    a1 = simd.mul_add_f32s(px[1], pw[1], a1);
                }
                for (pw, px) in pairs_w.remainder().iter().zip(pairs_x.remainder()) {
                    a0 = simd.mul_add_f32s(*px, *pw, a0);
                }
                *y = simd.reduce_sum_f32s(simd.add_f32s(a0, a1)) + tail_dot(wt, xt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_for_every_finite_half() {
        let all: Vec<f16> = (0..=u16::MAX)
            .map(f16::from_bits)
            .filter(|h| h.is_finite())
            .collect();
        let mut got = vec![0f32; all.len()];
        f16_to_f32(&all, &mut got);
        for (h, g) in all.iter().zip(&got) {
            assert_eq!(g.to_bits(), h.to_f32().to_bits(), "{h:?}");
        }
    }

    /// Odd shapes, and every tile shape of [`tiles`] with and without a column tail, on
    /// each kernel this CPU runs: 16- and 8-lane tiles where it has them, and the portable
    /// kernels every CPU runs.
    #[test]
    fn matches_a_plain_product_for_odd_shapes() {
        let mut levels = vec![None];
        if let Some(best) = tiles::level() {
            levels.push(Some(tiles::Level::Avx2));
            if best == tiles::Level::Avx512 {
                levels.push(Some(best));
            }
        }
        let tile_shapes = (1..=9).flat_map(|m| (1..=7).map(move |n| (m, 16 + 8 * n + m, n)));
        let odd = [
            (1, 3, 5),
            (2, 17, 33),
            (9, 64, 70),
            (16, 576, 100),
            (3, 1, 1),
            (3, 7, 2),
        ];
        for (m, k, n) in odd.into_iter().chain(tile_shapes) {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let w16: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
            for &tiled in &levels {
                let y = matmul_rows_at(&x, WeightRows::F32(&w), m, k, n, tiled);
                let y16 = matmul_rows_at(&x, WeightRows::F16(&w16), m, k, n, tiled);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| x[i * k + c] as f64 * w16[j * k + c].to_f64())
                            .sum();
                        let got = y16[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "f16 ({m},{k},{n}) [{i},{j}] {got} vs {want}"
                        );
                    }
                }
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                            .sum();
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "({m},{k},{n}) [{i},{j}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
