//! `y = x · wᵀ` for many rows of `x` (prompt processing) on AVX-512F, where candle's GEMM
//! runs its AVX2 microkernel (8-lane FMAs on a CPU that has 16-lane ones).
//!
//! Data flow: `x` is packed once per call into panels of [`NR`] rows stored column by column
//! (`[k][32]`, the last panel zero-padded), so one column of a panel is two vectors. The weight
//! rows are split into tasks of [`TASK_ROWS`] (rayon); a task walks its rows in tiles of
//! [`MR`], and each tile meets every panel: per column, its twelve weights are broadcast and
//! multiplied into the panel's two vectors, so the 12 × 32 sums stay in 24 of the 32 vector
//! registers and no horizontal sum is ever needed (two loads and twelve broadcasts feed 24
//! FMAs). The weights are read in place, never repacked: only the activations (`m × k`,
//! small next to the weights) are. Columns are taken in equal blocks of at most [`KC`] so that a
//! tile's slice of weight rows stays in L1 while the panels stream from L2; a block's sums
//! are added to `y`. f16 weights are widened once per task into a per-thread scratch.
//!
//! Each output is summed in column order, block by block, whatever the other rows.

use crate::WeightRows;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
};
use rayon::prelude::*;

/// Weight rows per tile.
const MR: usize = 12;
/// `x` rows per panel: two 16-lane vectors.
const NR: usize = 32;
/// Weight rows per rayon task (four tiles).
const TASK_ROWS: usize = 4 * MR;
/// Most columns per block: a tile's twelve weight rows of 640 f32 columns are 30 KiB, within
/// a 48 KiB L1; at 576 columns (the bundled model's width) a product is one block.
const KC: usize = 640;

/// Whether this CPU runs [`matmul`] (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::avx512_allowed() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y` shared by the tasks, each of which writes only its own columns (weight rows).
struct Out {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (distinct columns of `y`); `y` outlives the tasks.
#[allow(unsafe_code)]
unsafe impl Sync for Out {}

/// `x`: `m × k` row-major; `w`: `n × k` row-major. Returns `y`: `m × n` row-major. `None`
/// when this CPU lacks AVX-512F (see [`available`]).
pub fn matmul(x: &[f32], w: WeightRows<'_>, m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    assert_eq!(x.len(), m * k, "x is not m × k");
    assert_eq!(w.len(), n * k, "w is not n × k");
    if !available() {
        return None;
    }
    if m == 0 || n == 0 || k == 0 {
        return Some(vec![0f32; m * n]);
    }
    let panels = pack(x, m, k);
    // Not zeroed: the first block of columns writes every element (zeroing 2.5 M of them per
    // layer was 6 % of a prefill).
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = Out {
        ptr: y.as_mut_ptr(),
        len: m * n,
    };
    (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each(|task| {
        let r0 = task * TASK_ROWS;
        let r1 = (r0 + TASK_ROWS).min(n);
        match w {
            WeightRows::F32(w) => run_task(&panels, &w[r0 * k..r1 * k], m, k, n, r0, &out),
            // Widened task by task.
            WeightRows::F16(w) => crate::widened(&w[r0 * k..r1 * k], |w| {
                run_task(&panels, w, m, k, n, r0, &out)
            }),
        }
    });
    #[allow(unsafe_code)]
    // SAFETY: the tasks together wrote all `m × n` elements (every weight row's column, for
    // every row of `x`, in the first block) before `for_each` returned.
    unsafe {
        y.set_len(m * n)
    };
    Some(y)
}

/// `x` as panels of [`NR`] rows, each `[k][NR]`, the last one zero-padded.
fn pack(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut panels = vec![0f32; m.div_ceil(NR) * k * NR];
    panels
        .par_chunks_mut(k * NR)
        .zip(x.par_chunks(k * NR))
        .for_each(|(p, rows)| {
            // Sixteen columns at a time, so the panel's lines being written stay in L1.
            for c0 in (0..k).step_by(16) {
                let c1 = (c0 + 16).min(k);
                for (i, row) in rows.chunks_exact(k).enumerate() {
                    for (c, v) in row[c0..c1].iter().enumerate() {
                        p[(c0 + c) * NR + i] = *v;
                    }
                }
            }
        });
    panels
}

/// The weight rows `r0..` (`w`, f32) against every panel, into columns `r0..` of `y`.
fn run_task(panels: &[f32], w: &[f32], m: usize, k: usize, n: usize, r0: usize, out: &Out) {
    let blocks = k.div_ceil(KC);
    let kc = k.div_ceil(blocks);
    for b in 0..blocks {
        let k0 = b * kc;
        let k1 = (k0 + kc).min(k);
        for (t, tile) in w.chunks(MR * k).enumerate() {
            let rows = tile.len() / k;
            for (p, panel) in panels.chunks_exact(k * NR).enumerate() {
                let mut sums = [[0f32; NR]; MR];
                products(tile, rows, k, &panel[k0 * NR..k1 * NR], k0, &mut sums);
                let first = p * NR;
                let valid = NR.min(m - first);
                let col = r0 + t * MR;
                assert!((first + valid - 1) * n + col + rows <= out.len);
                for i in 0..valid {
                    let row = (first + i) * n + col;
                    for (r, s) in sums[..rows].iter().enumerate() {
                        #[allow(unsafe_code)]
                        // SAFETY: inside `y` (asserted above for the last row of the tile),
                        // and in column `col + r`, which belongs to this task alone.
                        unsafe {
                            let y = out.ptr.add(row + r);
                            if b == 0 {
                                y.write(s[i]);
                            } else {
                                *y += s[i];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `sums[r][i] = Σ_{c in block} tile[r][k0 + c] · x_i[k0 + c]` for the `rows` rows of `tile`
/// (`rows × k`) and the panel slice `panel` (`[block][NR]`).
fn products(
    tile: &[f32],
    rows: usize,
    k: usize,
    panel: &[f32],
    k0: usize,
    sums: &mut [[f32; NR]; MR],
) {
    debug_assert!(available(), "tall::products without AVX-512F");
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: `matmul` runs only after `available()` found AVX-512F.
    unsafe {
        match rows {
            12 => kernel::<12>(tile, k, panel, k0, sums),
            11 => kernel::<11>(tile, k, panel, k0, sums),
            10 => kernel::<10>(tile, k, panel, k0, sums),
            9 => kernel::<9>(tile, k, panel, k0, sums),
            8 => kernel::<8>(tile, k, panel, k0, sums),
            7 => kernel::<7>(tile, k, panel, k0, sums),
            6 => kernel::<6>(tile, k, panel, k0, sums),
            5 => kernel::<5>(tile, k, panel, k0, sums),
            4 => kernel::<4>(tile, k, panel, k0, sums),
            3 => kernel::<3>(tile, k, panel, k0, sums),
            2 => kernel::<2>(tile, k, panel, k0, sums),
            1 => kernel::<1>(tile, k, panel, k0, sums),
            _ => unreachable!("a tile has 1 to {MR} rows"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (tile, rows, k, panel, k0, sums);
        unreachable!("matmul returns None without AVX-512F");
    }
}

/// [`products`] for `R` weight rows: `R × 2` vectors of sums in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn kernel<const R: usize>(
    tile: &[f32],
    k: usize,
    panel: &[f32],
    k0: usize,
    sums: &mut [[f32; NR]; MR],
) {
    let cols = panel.len() / NR;
    assert!(R <= MR && tile.len() >= R * k && k0 + cols <= k && panel.len() == cols * NR);
    let w = tile.as_ptr();
    let x = panel.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for c in 0..cols {
        #[allow(unsafe_code)]
        // SAFETY: `c < cols`, so the panel's two vectors at `c * NR` are inside `panel`, and
        // `r * k + k0 + c < R * k <= tile.len()` (asserted above).
        unsafe {
            crate::prefetch(x.wrapping_add(c * NR + 8 * NR));
            crate::prefetch(x.wrapping_add(c * NR + 8 * NR + 16));
            let lo = _mm512_loadu_ps(x.add(c * NR));
            let hi = _mm512_loadu_ps(x.add(c * NR + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*w.add(r * k + k0 + c));
                a[0] = _mm512_fmadd_ps(b, lo, a[0]);
                a[1] = _mm512_fmadd_ps(b, hi, a[1]);
            }
        }
    }
    for (s, a) in sums.iter_mut().zip(&acc) {
        #[allow(unsafe_code)]
        // SAFETY: `s` holds 32 f32 values: two vectors.
        unsafe {
            _mm512_storeu_ps(s.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(s.as_mut_ptr().add(16), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_a_plain_product_for_odd_shapes_and_f16_weights() {
        if !available() {
            eprintln!("no AVX-512F: nothing to test");
            return;
        }
        // Tails in every direction: rows not a multiple of a panel, weight rows not a
        // multiple of a tile or a task, columns over one block and not a multiple of it.
        for (m, k, n) in [
            (1, 16, 4),
            (7, 37, 9),
            (65, 64, 131),
            (100, 576, 60),
            (33, 1300, 13),
            // Several tasks (weight rows past 48), each over several blocks of columns.
            (40, 1300, 100),
            (13, 5, 3),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let w16: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
            let y = matmul(&x, WeightRows::F32(&w), m, k, n).unwrap();
            let y16 = matmul(&x, WeightRows::F16(&w16), m, k, n).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let xr = &x[i * k..(i + 1) * k];
                    let want: f64 = xr
                        .iter()
                        .zip(&w[j * k..(j + 1) * k])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let want16: f64 = xr
                        .iter()
                        .zip(&w16[j * k..(j + 1) * k])
                        .map(|(a, b)| f64::from(*a) * f64::from(b.to_f32()))
                        .sum();
                    let tol = 1e-5 * k as f64;
                    let (got, got16) = (f64::from(y[i * n + j]), f64::from(y16[i * n + j]));
                    assert!((got - want).abs() < tol, "{m}x{k}x{n} f32 ({i},{j})");
                    assert!((got16 - want16).abs() < tol, "{m}x{k}x{n} f16 ({i},{j})");
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        if !available() {
            return;
        }
        let (k, n) = (700, 21);
        let x = values(50 * k, 3);
        let w = values(n * k, 4);
        let all = matmul(&x, WeightRows::F32(&w), 50, k, n).unwrap();
        for i in [0, 5, 31, 32, 49] {
            let one = matmul(&x[i * k..(i + 1) * k], WeightRows::F32(&w), 1, k, n).unwrap();
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }
}
