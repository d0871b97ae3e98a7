//! Attention that reads keys and values where the paged cache keeps them.
//!
//! A row is one query: a decode row (one new token of a sequence) attends over its whole
//! context, a prompt row over the context up to its own position (the causal mask is the
//! length of its slot list; a prompt's rows share one list, each taking a prefix). For each
//! (row, head) the scores against every cached position are `q · k / √d`, softmaxed, and the
//! output is the probability-weighted sum of the values. Position `t` of a row lives at cache
//! slot `slots[t]` (block id × block size + offset), so keys and values are read in place: no
//! gather into a contiguous copy, no copy per repeated KV head for grouped-query attention
//! (query head `h` reads KV head `h / (heads / kv_heads)`), and no batching by context length.
//! (row, head) pairs run in parallel on rayon; with heads of 32, 64 or 128 values through
//! [`wide`] on AVX-512 CPUs (sixteen scores per reduction, vector exponentials) or [`wide8`] on
//! AVX2 ones (the same with eight lanes; both from one macro, `vector_head!`), elsewhere
//! through pulp's SIMD. On those two vector paths a prompt's rows go a tile at a time instead
//! ([`tiled`]: one row per lane, so each key and value is read once per tile, not once per
//! row); decode rows, and any step without a run of prompt rows, stay row by row.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;
use tiled::{TileRows, TileScratch, Unit};

/// Defines `applies(head_dim)` and `head(...)` for one vector width (and, through
/// `vector_tile!` with `$max`, `$kb` and `$db`, `tile(...)`): one (row, head) with the
/// query's `D` vectors in registers (pre-scaled by `1/√d`), scores made `$w` keys at a time and
/// left in one vector by `$reduce` (a transposing reduction instead of one horizontal sum per
/// score), the softmax exponentials by `$exp` (a vector polynomial for `x ≤ 0`, -inf → 0, NaN
/// kept), their sum by `$hsum`, and the weighted sum of values at `D` FMAs a key. `wide` and
/// `wide8` instantiate it; `$detect` says whether the CPU runs `$feat`.
macro_rules! vector_head {
    ($feat:literal, $w:literal, $detect:expr, $vec:ty, $zero:ident, $set1:ident, $load:ident,
     $store:ident, $mul:ident, $sub:ident, $add:ident, $fma:ident, $reduce:ident, $exp:ident,
     $hsum:ident, $max:ident, $kb:literal, $db:literal) => {
        vector_tile!(
            $feat, $w, $kb, $db, $vec, $zero, $set1, $load, $store, $mul, $sub, $add, $fma, $max,
            $exp
        );

        /// Whether this CPU and head size take [`head`].
        pub(super) fn applies(head_dim: usize) -> bool {
            #[cfg(target_arch = "x86_64")]
            {
                matches!(head_dim, 32 | 64 | 128) && $detect
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = head_dim;
                false
            }
        }

        /// One head: `out = softmax(q · kᵀ · scale) · v` over the keys and values at `slots`
        /// (rows of `k` / `v` of `kv_dim` values, this head's at `offset`). `scores`: scratch.
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
                "head without {} or for this head size",
                $feat
            );
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            // SAFETY: `applies` found the features before any call (the caller's contract).
            unsafe {
                match q.len() {
                    32 => head_d::<{ 32 / $w }>(q, slots, k, v, kv_dim, offset, scale, scores, out),
                    64 => head_d::<{ 64 / $w }>(q, slots, k, v, kv_dim, offset, scale, scores, out),
                    _ => head_d::<{ 128 / $w }>(q, slots, k, v, kv_dim, offset, scale, scores, out),
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
        #[target_feature(enable = $feat)]
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
            let hd = D * $w;
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
            // SAFETY (every load and store below): `q` and `out` hold `D` vectors (asserted); a
            // key or value row starts at `row(s)` with `row(s) + hd <= (s + 1) * kv_dim <= len`
            // (asserted for every slot); `scores` is resized to whole groups before it is
            // written.
            unsafe {
                let sv = $set1(scale);
                let qv: [$vec; D] =
                    std::array::from_fn(|d| $mul($load(q.as_ptr().add($w * d)), sv));
                scores.clear();
                scores.resize(n.div_ceil($w) * $w, f32::NEG_INFINITY);
                for (g, group) in slots.chunks($w).enumerate() {
                    let mut acc = [$zero(); $w];
                    for (a, &s) in acc.iter_mut().zip(group) {
                        let kp = k.as_ptr().add(row(s));
                        for (d, qd) in qv.iter().enumerate() {
                            *a = $fma(*qd, $load(kp.add($w * d)), *a);
                        }
                    }
                    let mut sums = [0f32; $w];
                    $store(sums.as_mut_ptr(), $reduce(&acc));
                    // Lanes past the group's keys stay -inf (they were not keys).
                    scores[$w * g..$w * g + group.len()].copy_from_slice(&sums[..group.len()]);
                }
                let max = $set1(scores.iter().copied().fold(f32::NEG_INFINITY, f32::max));
                let mut sumv = $zero();
                for chunk in scores.chunks_exact_mut($w) {
                    let p = $exp($sub($load(chunk.as_ptr()), max));
                    sumv = $add(sumv, p);
                    $store(chunk.as_mut_ptr(), p);
                }
                let inv = 1.0 / $hsum(sumv);
                let mut o = [$zero(); D];
                for (&s, &p) in slots.iter().zip(scores.iter()) {
                    let vp = v.as_ptr().add(row(s));
                    let w = $set1(p * inv);
                    for (d, od) in o.iter_mut().enumerate() {
                        *od = $fma(w, $load(vp.add($w * d)), *od);
                    }
                }
                for (d, od) in o.iter().enumerate() {
                    $store(out.as_mut_ptr().add($w * d), *od);
                }
            }
        }
    };
}

#[macro_use]
mod tiled;
mod wide;
mod wide8;

/// The vector `exp` of [`wide`] and [`wide8`] (`x ≤ 0`): `x = n·ln2 + r` with ln2 split in a
/// high and a low part (so `r` is exact to f32), then `eʳ` by Horner's rule from
/// [`EXP_POLY`]`[0]` (the degree-7 Taylor coefficients, highest first), scaled by `2ⁿ`.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// A vector `exp` for `x ≤ 0` (`exp` on `W` lanes) against libm over `0, -0.0005, …` for
/// `points` values, within 3e-7 relative (plus `floor` for the denormal tail), and `-inf → 0`
/// in every lane: the test each of [`wide`] and [`wide8`] runs on its own form.
#[cfg(all(test, target_arch = "x86_64"))]
fn check_exp_le0<const W: usize>(points: usize, floor: f64, exp: impl Fn([f32; W]) -> [f32; W]) {
    let xs: Vec<f32> = (0..points).map(|i| -(i as f32) * 0.0005).collect();
    for chunk in xs.chunks_exact(W) {
        let got = exp(std::array::from_fn(|i| chunk[i]));
        for (x, g) in chunk.iter().zip(got) {
            let want = f64::from(*x).exp();
            assert!(
                (f64::from(g) - want).abs() <= 3e-7 * want + floor,
                "exp({x}) = {g}, want {want}"
            );
        }
    }
    assert_eq!(exp([f32::NEG_INFINITY; W]), [0.0; W], "exp(-inf) is 0");
}

/// Which kernel attends one (row, head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// 16-lane AVX-512 ([`wide`]).
    Wide,
    /// 8-lane AVX2 + FMA ([`wide8`]).
    Wide8,
    /// pulp's SIMD, any head size.
    Portable,
}

/// The fastest path this CPU has for heads of `head_dim` values.
fn best_path(head_dim: usize) -> Path {
    if wide::applies(head_dim) {
        Path::Wide
    } else if wide8::applies(head_dim) {
        Path::Wide8
    } else {
        Path::Portable
    }
}

/// Whether rows with heads of `head_dim` values take the 16-lane AVX-512 path on this CPU.
pub fn wide(head_dim: usize) -> bool {
    wide::applies(head_dim)
}

/// One layer's cache: `[slots, kv_heads × head_dim]` row-major keys and values.
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
}

#[derive(Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: rows × heads × head_dim. `slots[r]`: the cache slots of row `r`'s context, in
/// position order (its new key and value already written). Returns rows × heads × head_dim.
pub fn paged_attention(q: &[f32], slots: &[&[u32]], kv: PagedKv<'_>, h: Heads) -> Vec<f32> {
    attend(q, slots, kv, h, best_path(h.head_dim))
}

/// [`paged_attention`] on `path`, which this CPU must run.
fn attend(q: &[f32], slots: &[&[u32]], kv: PagedKv<'_>, h: Heads, path: Path) -> Vec<f32> {
    let hd = h.head_dim;
    assert_eq!(
        q.len(),
        slots.len() * h.heads * hd,
        "q is not rows × heads × head_dim"
    );
    let vector: Option<(usize, HeadFn, TileFn)> = match path {
        Path::Wide => Some((wide::TILE, wide::head, wide::tile)),
        Path::Wide8 => Some((wide8::TILE, wide8::head, wide8::tile)),
        Path::Portable => None,
    };
    if let Some((width, head_fn, tile_fn)) = vector {
        let units = tiled::plan(slots, width);
        if units.iter().any(|u| matches!(u, Unit::Tile { .. })) {
            return attend_units(q, slots, kv, h, &units, head_fn, tile_fn);
        }
    }
    let kv_dim = h.kv_heads * hd;
    let group = h.heads / h.kv_heads.max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    let arch = Arch::new();
    out.par_chunks_mut(hd)
        .zip(q.par_chunks(hd))
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, (o, qh))| {
            let (row, head) = (i / h.heads, i % h.heads);
            let offset = (head / group) * hd;
            let (k, v) = (kv.k, kv.v);
            match path {
                Path::Wide => {
                    return wide::head(qh, slots[row], k, v, kv_dim, offset, scale, scores, o);
                }
                Path::Wide8 => {
                    return wide8::head(qh, slots[row], k, v, kv_dim, offset, scale, scores, o);
                }
                Path::Portable => {}
            }
            arch.dispatch(Head {
                q: qh,
                slots: slots[row],
                kv,
                kv_dim,
                offset,
                scale,
                scores,
                out: o,
            });
        });
    out
}

/// [`attend`] for a step with tiles ([`tiled::plan`]'s `units`, through one vector path's
/// `head_fn` and `tile_fn`): each (unit, head) in parallel into its own buffer, then copied to
/// its rows.
fn attend_units(
    q: &[f32],
    slots: &[&[u32]],
    kv: PagedKv<'_>,
    h: Heads,
    units: &[Unit],
    head_fn: HeadFn,
    tile_fn: TileFn,
) -> Vec<f32> {
    let (hd, heads) = (h.head_dim, h.heads);
    let kv_dim = h.kv_heads * hd;
    let group = heads / h.kv_heads.max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    let stride = heads * hd;
    let tasks: Vec<(Unit, usize)> = units
        .iter()
        .flat_map(|u| (0..heads).map(move |head| (*u, head)))
        .collect();
    let first_row = |u: Unit| match u {
        Unit::Tile { first, .. } | Unit::Row(first) => first,
    };
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            || (Vec::new(), TileScratch::default()),
            |(scores, scratch), &(unit, head)| {
                let (offset, (k, v)) = ((head / group) * hd, (kv.k, kv.v));
                let qh = &q[first_row(unit) * stride + head * hd..];
                match unit {
                    Unit::Row(r) => {
                        let mut o = vec![0f32; hd];
                        head_fn(
                            &qh[..hd],
                            slots[r],
                            k,
                            v,
                            kv_dim,
                            offset,
                            scale,
                            scores,
                            &mut o,
                        );
                        o
                    }
                    Unit::Tile { first, rows } => {
                        let own = &slots[first..first + rows];
                        let mut lens = [0usize; wide::TILE];
                        own.iter().zip(&mut lens).for_each(|(s, l)| *l = s.len());
                        // Every row's list is a prefix of the longest (the plan's rule).
                        let longest = own.iter().max_by_key(|s| s.len()).map_or(&[][..], |s| *s);
                        let rows_of = TileRows {
                            q: qh,
                            q_stride: stride,
                            lens: &lens[..rows],
                            slots: longest,
                            kv,
                            kv_dim,
                            offset,
                            scale,
                        };
                        let mut o = vec![0f32; rows * hd];
                        tile_fn(&rows_of, scratch, &mut o);
                        o
                    }
                }
            },
        )
        .collect();
    let mut out = vec![0f32; q.len()];
    for (&(unit, head), part) in tasks.iter().zip(&parts) {
        for (i, row) in part.chunks_exact(hd).enumerate() {
            out[(first_row(unit) + i) * stride + head * hd..][..hd].copy_from_slice(row);
        }
    }
    out
}

/// `vector_head!`'s `head` and `vector_tile!`'s `tile` of one vector path.
type HeadFn = fn(&[f32], &[u32], &[f32], &[f32], usize, usize, f32, &mut Vec<f32>, &mut [f32]);
type TileFn = fn(&TileRows<'_>, &mut TileScratch, &mut [f32]);

struct Head<'a> {
    q: &'a [f32],
    slots: &'a [u32],
    kv: PagedKv<'a>,
    kv_dim: usize,
    offset: usize,
    scale: f32,
    scores: &'a mut Vec<f32>,
    out: &'a mut [f32],
}

impl WithSimd for Head<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Head {
            q,
            slots,
            kv,
            kv_dim,
            offset,
            scale,
            scores,
            out,
        } = self;
        let hd = q.len();
        let at = |s: u32| s as usize * kv_dim + offset;
        let (qh, qt) = S::as_simd_f32s(q);
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for &s in slots {
            let (kh, kt) = S::as_simd_f32s(&kv.k[at(s)..at(s) + hd]);
            let mut acc = simd.splat_f32s(0.0);
            for (a, b) in qh.iter().zip(kh) {
                acc = simd.mul_add_f32s(*a, *b, acc);
            }
            let tail: f32 = qt.iter().zip(kt).map(|(a, b)| a * b).sum();
            let score = (simd.reduce_sum_f32s(acc) + tail) * scale;
            max = max.max(score);
            scores.push(score);
        }
        let mut sum = 0f32;
        for p in scores.iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        let inv = 1.0 / sum;
        out.fill(0.0);
        let (oh, ot) = S::as_mut_simd_f32s(out);
        for (&s, p) in slots.iter().zip(scores.iter()) {
            let w = p * inv;
            let (vh, vt) = S::as_simd_f32s(&kv.v[at(s)..at(s) + hd]);
            let wv = simd.splat_f32s(w);
            for (o, v) in oh.iter_mut().zip(vh) {
                *o = simd.mul_add_f32s(wv, *v, *o);
            }
            for (o, v) in ot.iter_mut().zip(vt) {
                *o += w * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention over gathered rows, in f64.
    fn reference(q: &[f32], slots: &[Vec<u32>], k: &[f32], v: &[f32], h: Heads) -> Vec<f64> {
        let (hd, kv_dim) = (h.head_dim, h.kv_heads * h.head_dim);
        let group = h.heads / h.kv_heads;
        let mut out = Vec::new();
        for (r, sl) in slots.iter().enumerate() {
            for head in 0..h.heads {
                let qh = &q[(r * h.heads + head) * hd..][..hd];
                let off = (head / group) * hd;
                let scores: Vec<f64> = sl
                    .iter()
                    .map(|&s| {
                        let kk = &k[s as usize * kv_dim + off..][..hd];
                        qh.iter()
                            .zip(kk)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out.push(
                        sl.iter()
                            .zip(&e)
                            .map(|(&s, p)| p / z * v[s as usize * kv_dim + off + d] as f64)
                            .sum(),
                    );
                }
            }
        }
        out
    }

    /// `rows` (contexts as slot lists into a cache of `n_slots`; 6 heads over 2 KV heads of
    /// `head_dim`) through every path this CPU has, not only the fastest, against
    /// [`reference`].
    fn check_every_path(head_dim: usize, n_slots: usize, rows: &[&[u32]]) {
        let h = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim,
        };
        let kv_dim = h.kv_heads * h.head_dim;
        let val = |i: usize, m: usize| ((i * m % 97) as f32 - 48.0) / 50.0;
        let k: Vec<f32> = (0..n_slots * kv_dim).map(|i| val(i, 31)).collect();
        let v: Vec<f32> = (0..n_slots * kv_dim).map(|i| val(i, 17)).collect();
        let q: Vec<f32> = (0..rows.len() * h.heads * h.head_dim)
            .map(|i| val(i, 13))
            .collect();
        let owned: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
        let want = reference(&q, &owned, &k, &v, h);
        let paths = [Path::Wide, Path::Wide8, Path::Portable]
            .into_iter()
            .filter(|p| match p {
                Path::Wide => wide::applies(head_dim),
                Path::Wide8 => wide8::applies(head_dim),
                Path::Portable => true,
            });
        for path in paths {
            let got = attend(&q, rows, PagedKv { k: &k, v: &v }, h, path);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() < 1e-5,
                    "{path:?} head_dim {head_dim} [{i}] {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn prompt_rows_sharing_a_slot_list_attend_in_tiles_like_row_by_row() {
        // A prompt of 37 rows after 33 cached positions in scattered slots (tiles of 16, 16
        // and 5 rows with AVX-512), a decode row of another sequence, a run of three rows in
        // no order of length (a tile with AVX2, rows alone with AVX-512) and a run of one.
        let prompt: Vec<u32> = (0..70).map(|t| ((t * 7) % 96) as u32).collect();
        let other: Vec<u32> = (20..60).rev().collect();
        let decode: Vec<u32> = (0..50).map(|t| t + 40).collect();
        let mut rows: Vec<&[u32]> = (34..=70).map(|n| &prompt[..n]).collect();
        rows.push(&decode);
        rows.extend([&other[..40], &other[..3], &other[..17]]);
        rows.push(&prompt[..9]);
        for head_dim in [32, 64, 128] {
            check_every_path(head_dim, 96, &rows);
        }
    }

    #[test]
    fn a_plan_tiles_runs_of_rows_sharing_a_slot_list_and_leaves_the_rest_alone() {
        let a: Vec<u32> = (0..40).collect();
        let b: Vec<u32> = (0..40).collect();
        let mut rows: Vec<&[u32]> = (1..=20).map(|n| &a[..n]).collect();
        rows.push(&b[..5]);
        rows.extend([&a[..3], &a[..4], &a[..2]]);
        rows.push(&b);
        // Empty lists, even of one list, are rows alone.
        rows.extend([&a[..0], &a[..0], &[][..]]);
        let tile = |first, rows| Unit::Tile { first, rows };
        use Unit::Row;
        assert_eq!(
            tiled::plan(&rows, 16),
            [
                tile(0, 16),
                tile(16, 4),
                Row(20),
                Row(21),
                Row(22),
                Row(23),
                Row(24),
                Row(25),
                Row(26),
                Row(27)
            ],
            "16 lanes: a run of 20 is a full tile and one of 4; shorter runs go row by row"
        );
        assert_eq!(
            tiled::plan(&rows, 8),
            [
                tile(0, 8),
                tile(8, 8),
                tile(16, 4),
                Row(20),
                tile(21, 3),
                Row(24),
                Row(25),
                Row(26),
                Row(27)
            ]
        );
    }

    #[test]
    fn matches_gathered_attention_with_grouped_heads_and_scattered_slots() {
        // Rows with contexts of different lengths (one key, under and over a group of
        // sixteen, several groups) in non-contiguous slots.
        let slots: Vec<Vec<u32>> = vec![
            vec![5u32],
            (0..37).map(|t| ((t * 7) % 64) as u32).collect(),
            (10..29).rev().collect(),
            (0..64).rev().collect(),
            (0..16).map(|t| t * 4).collect(),
        ];
        let rows: Vec<&[u32]> = slots.iter().map(Vec::as_slice).collect();
        // 20: not a multiple of the SIMD width (the portable path's tails); 32, 64 and 128:
        // the vector paths where the CPU has them.
        for head_dim in [20, 32, 64, 128] {
            check_every_path(head_dim, 64, &rows);
        }
    }
}
