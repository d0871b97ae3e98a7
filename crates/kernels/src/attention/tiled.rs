//! Prompt rows attended a tile at a time: one row per vector lane, sixteen with AVX-512
//! ([`super::wide`]), eight with AVX2 ([`super::wide8`]).
//!
//! The rows of one prompt attend over prefixes of one slot list, so their keys and values
//! are the same cache rows. Row by row (`vector_head!`) every row reads all of them again
//! from L2 for four to eight FMAs a row (a 480-token prompt reads each key 480 times), which
//! is what held prompt attention to a third of the FMA rate of the prompt's matmuls. A tile
//! reads each key and value once for all its rows:
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

/// Scratch reused across the tiles one rayon worker attends: the transposed queries and one
/// score vector per key.
#[derive(Default)]
pub(super) struct TileScratch {
    pub(super) qt: Vec<f32>,
    pub(super) scores: Vec<f32>,
}

/// What attends a run of rows: `Tile(first, rows)` for rows `first..first + rows` sharing one
/// slot list, or `Row(r)` alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    Tile(usize, usize),
    Row(usize),
}

/// Splits the rows into tiles of at most `width` rows and single rows. Rows sharing a slot
/// list start at the same slot (each is a prefix of the longest), which is how a prompt's
/// rows are told apart from other sequences' rows. A run shorter than `width / 4` rows
/// (any decode row) is cheaper row by row than as a tile of mostly idle lanes.
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
                units.push(Unit::Tile(start, rows));
            } else {
                units.extend((start..start + rows).map(Unit::Row));
            }
        }
        r += run;
    }
    units
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

        /// Rows `0..lens.len()` (`1..=TILE` of them) of one head: row `i`'s query is
        /// `q[i * q_stride..][..hd]`, its context the first `lens[i]` slots of `slots` (the
        /// longest row's list), its output goes to `out[i * hd..][..hd]`. Keys and values are
        /// rows of `k` / `v` of `kv_dim` values, this head's at `offset`.
        #[allow(clippy::too_many_arguments)]
        pub(super) fn tile(
            q: &[f32],
            q_stride: usize,
            lens: &[usize],
            slots: &[u32],
            k: &[f32],
            v: &[f32],
            kv_dim: usize,
            offset: usize,
            scale: f32,
            scratch: &mut super::tiled::TileScratch,
            out: &mut [f32],
        ) {
            let hd = out.len() / lens.len().max(1);
            debug_assert!(applies(hd), "tile without {} or for this head size", $feat);
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            // SAFETY: `applies` found the features before any call (the caller's contract).
            unsafe {
                match hd {
                    32 => tile_d::<32>(
                        q, q_stride, lens, slots, k, v, kv_dim, offset, scale, scratch, out,
                    ),
                    64 => tile_d::<64>(
                        q, q_stride, lens, slots, k, v, kv_dim, offset, scale, scratch, out,
                    ),
                    _ => tile_d::<128>(
                        q, q_stride, lens, slots, k, v, kv_dim, offset, scale, scratch, out,
                    ),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (
                    q, q_stride, lens, slots, k, v, kv_dim, offset, scale, scratch, out,
                );
                unreachable!("applies() is false off x86-64");
            }
        }

        /// [`tile`] for heads of `HD` values.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        fn tile_d<const HD: usize>(
            q: &[f32],
            q_stride: usize,
            lens: &[usize],
            slots: &[u32],
            k: &[f32],
            v: &[f32],
            kv_dim: usize,
            offset: usize,
            scale: f32,
            s: &mut super::tiled::TileScratch,
            out: &mut [f32],
        ) {
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
            // Lane `i` serves row `i`; spare lanes repeat row 0 (their sums are dropped).
            let lane = |i: usize| if i < rows { i } else { 0 };
            s.qt.resize(HD * $w, 0.0);
            for i in 0..$w {
                let src = &q[lane(i) * q_stride..][..HD];
                for (d, x) in src.iter().enumerate() {
                    s.qt[d * $w + i] = x * scale;
                }
            }
            s.scores.clear();
            s.scores.resize(n * $w, 0.0);
            let row = |slot: u32| slot as usize * kv_dim + offset;
            let (qt, sc) = (s.qt.as_ptr(), s.scores.as_mut_ptr());
            let mut j = 0;
            #[allow(unsafe_code)]
            // SAFETY: `qt` holds `HD` vectors; key `j`'s row `row(slots[j])..+HD` is inside `k`
            // (asserted for every slot); `scores` holds `n` vectors, of which keys
            // `j..j + $kb` (`j..j + 1`) write theirs.
            unsafe {
                while j + $kb <= n {
                    let keys = std::array::from_fn(|t| k.as_ptr().add(row(slots[j + t])));
                    scores_keys::<HD, $kb>(qt, keys, sc.add(j * $w));
                    j += $kb;
                }
                for j in j..n {
                    scores_keys::<HD, 1>(qt, [k.as_ptr().add(row(slots[j]))], sc.add(j * $w));
                }
            }
            // The causal mask: in each lane, the keys past its row's context.
            let shortest = lens.iter().copied().min().unwrap_or(n);
            for j in shortest..n {
                for i in 0..$w {
                    if j >= lens[lane(i)] {
                        s.scores[j * $w + i] = f32::NEG_INFINITY;
                    }
                }
            }
            let sc = s.scores.as_mut_ptr();
            #[allow(unsafe_code)]
            // SAFETY: `scores` holds `n` vectors; a value row's `d0..d0 + $db` is inside its
            // `HD` values (`$db` divides 32, 64 and 128), inside `v` (asserted); `lanes` and
            // `inv` hold one vector; row `i < rows` of `out` holds `HD` values (asserted).
            unsafe {
                let mut maxv = $set1(f32::NEG_INFINITY);
                for j in 0..n {
                    maxv = $max(maxv, $load(sc.add(j * $w)));
                }
                let mut sumv = $zero();
                for j in 0..n {
                    let p = $exp($sub($load(sc.add(j * $w)), maxv));
                    sumv = $add(sumv, p);
                    $store(sc.add(j * $w), p);
                }
                let mut inv = [0f32; $w];
                $store(inv.as_mut_ptr(), sumv);
                inv.iter_mut().for_each(|x| *x = 1.0 / *x);
                let invv = $load(inv.as_ptr());
                let mut lanes = [0f32; $w];
                for d0 in (0..HD).step_by($db) {
                    let mut acc = [$zero(); $db];
                    for j in 0..n {
                        let p = $load(sc.add(j * $w));
                        let vp = v.as_ptr().add(row(slots[j]) + d0);
                        for (t, a) in acc.iter_mut().enumerate() {
                            *a = $fma(p, $set1(*vp.add(t)), *a);
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
    };
}
