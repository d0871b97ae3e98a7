//! Radix index throughput and lookup latency, single thread:
//! `cargo bench -p tandem-kv-router --bench indexer`.
//!
//! 8 workers × 10 000 blocks (block size 16): per worker 100 conversations of 100 blocks, the
//! first 20 blocks of each conversation a system prompt shared by every worker. Events carry
//! one block each (the worst case for per-event cost). Then `find_matches` for requests that
//! follow a cached conversation for a random length and diverge, and finally every block is
//! removed again.

use std::time::Instant;
use tandem_kv::sequence_hashes;
use tandem_kv_router::indexer::RadixTree;
use tandem_protocols::kv_events::{
    KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlock,
};

const WORKERS: u64 = 8;
const CONVERSATIONS: u32 = 100;
const BLOCKS: u32 = 100;
const SHARED: u32 = 20;
const BS: usize = 16;

/// Token ids of conversation `c` of worker `w` (the first SHARED blocks are common).
fn conversation(w: u64, c: u32) -> Vec<u32> {
    (0..BLOCKS * BS as u32)
        .map(|i| {
            if i < SHARED * BS as u32 {
                c * 1_000_003 + i
            } else {
                (w as u32 + 1) * 7_919_993 + c * 104_729 + i
            }
        })
        .collect()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    // Build every event first: the timing covers applying them only.
    let mut stored: Vec<(u64, KvCacheEventData)> = Vec::new();
    let mut removed: Vec<(u64, KvCacheEventData)> = Vec::new();
    let mut queries: Vec<Vec<u64>> = Vec::new();
    for w in 0..WORKERS {
        for c in 0..CONVERSATIONS {
            let toks = conversation(w, c);
            let h = sequence_hashes(&toks, BS);
            for (i, b) in h.iter().enumerate() {
                stored.push((
                    w,
                    KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: i.checked_sub(1).map(|p| h[p].sequence),
                        blocks: vec![KvCacheStoredBlock {
                            block_hash: b.sequence,
                            tokens_hash: b.local,
                        }],
                    }),
                ));
            }
            for b in h.iter().rev() {
                removed.push((
                    w,
                    KvCacheEventData::Removed(KvCacheRemoveData {
                        block_hashes: vec![b.sequence],
                    }),
                ));
            }
            if w == c as u64 % WORKERS {
                // A request following this conversation for `keep` blocks, then new text.
                let keep = (c * 37 % BLOCKS) as usize;
                let mut q: Vec<u64> = h[..keep].iter().map(|b| b.local).collect();
                q.extend((0..(BLOCKS as usize - keep)).map(|i| 0xdead_0000 + i as u64));
                queries.push(q);
            }
        }
    }
    let total_blocks = stored.len();
    println!(
        "index: {WORKERS} workers x {} blocks (block size {BS}), one block per event",
        total_blocks as u64 / WORKERS
    );

    let mut best_store = f64::MAX;
    let mut best_remove = f64::MAX;
    let mut lat: Vec<f64> = Vec::new();
    for round in 0..5 {
        let mut t = RadixTree::new();
        let start = Instant::now();
        for (w, e) in &stored {
            t.apply(*w, e);
        }
        best_store = best_store.min(start.elapsed().as_secs_f64());
        assert_eq!(t.tree_size(0), (CONVERSATIONS * BLOCKS) as usize);

        if round == 4 {
            // Repeat the query set so percentiles rest on enough samples.
            for _ in 0..100 {
                for q in &queries {
                    let s = Instant::now();
                    let m = t.find_matches(q);
                    lat.push(s.elapsed().as_secs_f64() * 1e6);
                    std::hint::black_box(m);
                }
            }
        }

        let start = Instant::now();
        for (w, e) in &removed {
            t.apply(*w, e);
        }
        best_remove = best_remove.min(start.elapsed().as_secs_f64());
        assert_eq!(t.node_count(), 0);
    }
    println!(
        "stored events applied: {:.2} M events/s ({:.0} ns each, best of 5)",
        total_blocks as f64 / best_store / 1e6,
        best_store * 1e9 / total_blocks as f64
    );
    println!(
        "removed events applied: {:.2} M events/s ({:.0} ns each, best of 5)",
        total_blocks as f64 / best_remove / 1e6,
        best_remove * 1e9 / total_blocks as f64
    );
    let n = lat.len();
    let p50 = percentile(&mut lat, 0.50);
    let p99 = percentile(&mut lat, 0.99);
    let max = percentile(&mut lat, 1.0);
    println!(
        "find_matches over {BLOCKS}-block requests: p50 {p50:.2} us, p99 {p99:.2} us, max {max:.2} us ({n} lookups)"
    );
}
