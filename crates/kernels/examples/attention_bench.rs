//! Prompt attention of SmolLM2-135M's shape (9 heads, 3 KV heads of 64) over a paged cache,
//! one layer, in GFLOP/s: the prompt's rows sharing one slot list (as the engine passes them:
//! attended in tiles) against each row with its own copy (attended row by row):
//! `cargo run --release -p tandem-kernels --example attention_bench [PROMPT_TOKENS]`
//! (`TANDEM_CPU_KERNELS=avx2`: the AVX2 forms, as the worker's `--cpu-kernels avx2`).
#![allow(clippy::unwrap_used)]
use std::time::Instant;
use tandem_kernels::attention::{Heads, PagedKv, paged_attention};

fn main() {
    tandem_kernels::limit_to_avx2(std::env::var("TANDEM_CPU_KERNELS").is_ok_and(|v| v == "avx2"));
    let m: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(480);
    let h = Heads {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let kv_dim = h.kv_heads * h.head_dim;
    // Blocks of 16 slots, in a scattered order, as a block table hands them out.
    let blocks = m.div_ceil(16);
    let slots: Vec<u32> = (0..m)
        .map(|t| (((t / 16) * 7 % blocks) * 16 + t % 16) as u32)
        .collect();
    let n_slots = blocks * 16;
    let k: Vec<f32> = (0..n_slots * kv_dim)
        .map(|i| (i % 13) as f32 * 0.01)
        .collect();
    let v: Vec<f32> = (0..n_slots * kv_dim)
        .map(|i| (i % 7) as f32 * 0.01)
        .collect();
    let q: Vec<f32> = (0..m * h.heads * h.head_dim)
        .map(|i| (i % 11) as f32 * 0.01)
        .collect();
    let shared: Vec<&[u32]> = (1..=m).map(|n| &slots[..n]).collect();
    let copies: Vec<Vec<u32>> = shared.iter().map(|s| s.to_vec()).collect();
    let own: Vec<&[u32]> = copies.iter().map(Vec::as_slice).collect();
    // Two FMAs' worth (q·k and p·v) per (row, head, key, value).
    let flops = 4.0 * (h.heads * h.head_dim) as f64 * (m * (m + 1) / 2) as f64;
    for (name, rows) in [("tiles (shared list)", &shared), ("row by row", &own)] {
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            let y = paged_attention(&q, rows, PagedKv { k: &k, v: &v }, h);
            std::hint::black_box(y);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{m} rows, {name}: {:.2} ms, {:.1} GFLOP/s",
            best * 1e3,
            flops / best / 1e9
        );
    }
}
