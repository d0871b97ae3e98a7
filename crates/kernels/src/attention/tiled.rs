//! Prompt rows attended a tile at a time: one row per vector lane, sixteen with AVX-512
//! ([`super::wide`]), eight with AVX2 ([`super::wide8`]).
//!
//! The rows of one prompt attend over prefixes of one slot list, so their keys and values
//! are the same cache rows. Row by row (`vector_head!`) every row reads all of them again
//! from L2 for `head_dim / lanes` FMAs a key (four for heads of 64 on AVX-512; a 480-token
//! prompt reads a key 240 times on average), which is what held prompt attention to a third
//! of the FMA rate of the prompt's matmuls. A tile reads each key and value once for all its
//! rows:
//! - the tile's queries are transposed and pre-scaled (`qt[d]`: lane `i` = row `i`'s `d`-th
//!   value), so a key's scores for every row are one vector, `Σ_d qt[d] · k[d]`, built from
//!   broadcasts of the key's values, `$kb` keys at a time;
//! - a key past a row's own length is -inf in that row's lane (the causal mask), and the
//!   softmax runs per lane;
//! - the output, `Σ_j p[j] · v_j[d]`, is again one vector per `d` (`$db` of them at a time),
//!   scaled by each lane's `1 / Σ p`, and written back row by row.
//!
//! [`plan`] splits a step's rows into tiles (runs of rows sharing one slot list) and single
//! rows (decode rows, short runs), which keep the one-row kernel.
//!
//! Two things differ from row by row beyond the summation order. A masked key still enters a
//! shorter row's value sum with probability 0, so an infinite or NaN value at a later
//! position (a model already diverging) reaches the rows before it too. And a row's
//! arithmetic depends on whether it lands in a tile or alone (the last `width / 4 - 1` rows of
//! a run can be alone), so the same position may round differently when a prompt is split
//! into other chunks; the engine's tests hold tiles to candle's greedy tokens.

/// Scratch reused across the tiles one rayon worker attends: the transposed queries, one
/// score vector per key, and where each key's row of this head starts in the cache.
#[derive(Default)]
pub(super) struct TileScratch {
    pub(super) qt: Vec<f32>,
    pub(super) scores: Vec<f32>,
    pub(super) rows_at: Vec<usize>,
}

/// One tile's inputs: rows `0..lens.len()` (`1..=TILE` of them) of one head; row `i`'s query
/// is `q[i * q_stride..][..hd]`, its context the first `lens[i]` slots of `slots` (the longest
/// row's list). Keys and values are rows of `kv` of `kv_dim` values, this head's at `offset`.
#[derive(Clone, Copy)]
pub(super) struct TileRows<'a> {
    pub(super) q: &'a [f32],
    pub(super) q_stride: usize,
    pub(super) lens: &'a [usize],
    pub(super) slots: &'a [u32],
    pub(super) kv: super::PagedKv<'a>,
    pub(super) kv_dim: usize,
    pub(super) offset: usize,
    pub(super) scale: f32,
}

/// What attends a run of rows: a tile of rows `first..first + rows` sharing one slot list,
/// or one row alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    Tile { first: usize, rows: usize },
    Row(usize),
}

/// Splits the rows into tiles of at most `width` rows and single rows. Rows sharing a slot
/// list start at the same address (slices of one list, so each is a prefix of the longest),
/// which is how a prompt's rows are told from other sequences' rows, even ones whose slots
/// hold the same values (a shared prefix). A run shorter than `width / 4` rows (at least 2;
/// any decode row) is cheaper row by row than as a tile of mostly idle lanes; an empty list
/// is a row alone.
pub(super) fn plan(slots: &[&[u32]], width: usize) -> Vec<Unit> {
    let min = (width / 4).max(2);
    let mut units = Vec::new();
    let mut r = 0;
    while r < slots.len() {
        let base = slots[r].as_ptr();
        let run = slots[r..]
            .iter()
            .take_while(|s| s.as_ptr() == base && !s.is_empty())
            .count()
            .max(1);
        for start in (r..r + run).step_by(width) {
            let rows = width.min(r + run - start);
            if rows >= min {
                units.push(Unit::Tile { first: start, rows });
            } else {
                units.extend((start..start + rows).map(Unit::Row));
            }
        }
        r += run;
    }
    units
}

/// `qt[d · W + i]` = row `i`'s `d`-th query value × `scale` for the `rows` rows at
/// `q[i · q_stride..][..hd]`; lanes past `rows` repeat row 0 (their sums are dropped, and a
/// real row keeps them finite).
pub(super) fn transpose_queries<const W: usize>(
    q: &[f32],
    q_stride: usize,
    rows: usize,
    hd: usize,
    scale: f32,
    qt: &mut Vec<f32>,
) {
    qt.resize(hd * W, 0.0);
    for i in 0..W {
        let src = &q[if i < rows { i } else { 0 } * q_stride..][..hd];
        for (d, x) in src.iter().enumerate() {
            qt[d * W + i] = x * scale;
        }
    }
}

/// The causal mask: in `scores` (one `W`-lane vector per key), -inf in each lane for the keys
/// past its row's length (`lens[i]`; lanes past the rows follow row 0).
pub(super) fn mask_past_lengths<const W: usize>(lens: &[usize], scores: &mut [f32]) {
    let len = |i: usize| lens[if i < lens.len() { i } else { 0 }];
    let shortest = lens.iter().copied().min().unwrap_or(0);
    for (j, key) in scores.chunks_exact_mut(W).enumerate().skip(shortest) {
        for (i, x) in key.iter_mut().enumerate() {
            if j >= len(i) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Defines `tile(...)` for one vector width, next to `vector_head!`'s `applies` and `head`
/// (see the module doc). `$kb`: keys scored at once; `$db`: output values summed at once (each
/// an accumulator register, with the query or probability vector and a broadcast beside).
macro_rules! vector_tile {
    ($feat:literal, $w:literal, $kb:literal, $db:literal, $vec:ty, $zero:ident, $set1:ident,
     $load:ident, $store:ident, $mul:ident, $sub:ident, $add:ident, $fma:ident, $max:ident,
     $exp:ident) => {
        /// Rows in a full tile: one per lane.
        pub(super) const TILE: usize = $w;

        /// The attention of `t`'s rows; row `i`'s output goes to `out[i * hd..][..hd]`.
        pub(super) fn tile(
            t: &super::tiled::TileRows<'_>,
            scratch: &mut super::tiled::TileScratch,
            out: &mut [f32],
        ) {
            let hd = out.len() / t.lens.len().max(1);
            debug_assert!(applies(hd), "tile without {} or for this head size", $feat);
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            // SAFETY: `applies` found the features before any call (the caller's contract).
            unsafe {
                match hd {
                    32 => tile_d::<32>(t, scratch, out),
                    64 => tile_d::<64>(t, scratch, out),
                    _ => tile_d::<128>(t, scratch, out),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (t, scratch, out);
                unreachable!("applies() is false off x86-64");
            }
        }

        /// [`tile`] for heads of `HD` values.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        fn tile_d<const HD: usize>(
            t: &super::tiled::TileRows<'_>,
            s: &mut super::tiled::TileScratch,
            out: &mut [f32],
        ) {
            let super::tiled::TileRows {
                q,
                q_stride,
                lens,
                slots,
                kv: super::PagedKv { k, v },
                kv_dim,
                offset,
                scale,
            } = *t;
            const {
                assert!(
                    32 % $db == 0,
                    "a block of output values splits every head size"
                )
            };
            let (rows, n) = (lens.len(), slots.len());
            assert!((1..=$w).contains(&rows) && out.len() == rows * HD);
            assert!(offset + HD <= kv_dim && (rows - 1) * q_stride + HD <= q.len());
            assert!(
                lens.iter().all(|&l| (1..=n).contains(&l)),
                "a row's context is not a prefix of the slots"
            );
            assert!(
                slots
                    .iter()
                    .all(|&s| (s as usize + 1) * kv_dim <= k.len().min(v.len())),
                "a slot outside the cache"
            );
            s.rows_at.clear();
            s.rows_at
                .extend(slots.iter().map(|&slot| slot as usize * kv_dim + offset));
            let rows_at = &s.rows_at;
            super::tiled::transpose_queries::<$w>(q, q_stride, rows, HD, scale, &mut s.qt);
            s.scores.clear();
            s.scores.resize(n * $w, 0.0);
            let mut j = 0;
            #[allow(unsafe_code)]
            // SAFETY: `qt` holds `HD` vectors; key `j`'s `rows_at[j]..+HD` is inside `k`
            // (asserted for every slot); `scores` holds `n` vectors, of which keys
            // `j..j + $kb` (`j..j + 1`) write theirs.
            unsafe {
                let (qt, sc, kp) = (s.qt.as_ptr(), s.scores.as_mut_ptr(), k.as_ptr());
                while j + $kb <= n {
                    let keys = std::array::from_fn(|t| kp.add(rows_at[j + t]));
                    scores_keys::<HD, $kb>(qt, keys, sc.add(j * $w));
                    j += $kb;
                }
                for j in j..n {
                    scores_keys::<HD, 1>(qt, [kp.add(rows_at[j])], sc.add(j * $w));
                }
            }
            super::tiled::mask_past_lengths::<$w>(lens, &mut s.scores);
            let inv = softmax_lanes(&mut s.scores);
            weighted_values::<HD>(&s.scores, v, rows_at, inv, out);
        }

        /// The score vectors of `KB` keys (`keys[t]`: the key's `HD` values) against the
        /// transposed queries `qt` (`HD` vectors), to `dst` (`KB` vectors). The caller
        /// guarantees those extents.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(unsafe_code)]
        unsafe fn scores_keys<const HD: usize, const KB: usize>(
            qt: *const f32,
            keys: [*const f32; KB],
            dst: *mut f32,
        ) {
            // SAFETY: the extents above (the caller's contract).
            unsafe {
                let mut acc = [$zero(); KB];
                for d in 0..HD {
                    let qd = $load(qt.add(d * $w));
                    for (a, kp) in acc.iter_mut().zip(&keys) {
                        *a = $fma(qd, $set1(*kp.add(d)), *a);
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    $store(dst.add(t * $w), *a);
                }
            }
        }

        /// Each lane's softmax over the score vectors in `scores` (one per key), in place;
        /// returns each lane's `1 / Σ p`, which [`weighted_values`] applies at the end.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        fn softmax_lanes(scores: &mut [f32]) -> [f32; $w] {
            let mut inv = [0f32; $w];
            #[allow(unsafe_code)]
            // SAFETY: every chunk and `inv` hold one vector.
            unsafe {
                let mut maxv = $set1(f32::NEG_INFINITY);
                for chunk in scores.chunks_exact($w) {
                    maxv = $max(maxv, $load(chunk.as_ptr()));
                }
                let mut sumv = $zero();
                for chunk in scores.chunks_exact_mut($w) {
                    let p = $exp($sub($load(chunk.as_ptr()), maxv));
                    sumv = $add(sumv, p);
                    $store(chunk.as_mut_ptr(), p);
                }
                $store(inv.as_mut_ptr(), sumv);
            }
            inv.map(|sum| 1.0 / sum)
        }

        /// `out[i][d] = inv[i] · Σ_j p[j][i] · v_j[d]` for the tile's rows `i` (`out`: rows ×
        /// `HD`), with `p` the probability vectors (one per key) and `v_j` the value row at
        /// `rows_at[j]`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        fn weighted_values<const HD: usize>(
            p: &[f32],
            v: &[f32],
            rows_at: &[usize],
            inv: [f32; $w],
            out: &mut [f32],
        ) {
            assert!(p.len() == rows_at.len() * $w && rows_at.iter().all(|r| r + HD <= v.len()));
            let rows = out.len() / HD;
            let mut lanes = [0f32; $w];
            #[allow(unsafe_code)]
            // SAFETY: `p` holds a vector per value row (asserted); a value row's `d0..d0 +
            // $db` is inside its `HD` values (`$db` divides `HD`), inside `v` (asserted);
            // `inv` and `lanes` hold one vector.
            unsafe {
                let invv = $load(inv.as_ptr());
                for d0 in (0..HD).step_by($db) {
                    let mut acc = [$zero(); $db];
                    for (pj, &at) in p.chunks_exact($w).zip(rows_at) {
                        let pv = $load(pj.as_ptr());
                        let vp = v.as_ptr().add(at + d0);
                        for (t, a) in acc.iter_mut().enumerate() {
                            *a = $fma(pv, $set1(*vp.add(t)), *a);
                        }
                    }
                    for (t, a) in acc.iter().enumerate() {
                        $store(lanes.as_mut_ptr(), $mul(*a, invv));
                        for (i, x) in lanes[..rows].iter().enumerate() {
                            out[i * HD + d0 + t] = *x;
                        }
                    }
                }
            }
        }
    };
}
