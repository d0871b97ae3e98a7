//! Throughput of `tall::matmul` on prompt-sized products (GFLOP/s):
//! `cargo run --release -p tandem-kernels --example tall_bench [M]`.
#![allow(clippy::unwrap_used)]
use std::time::Instant;
use tandem_kernels::WeightRows;
use tandem_kernels::tall::matmul;

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(480);
    for (k, n) in [(576, 576), (576, 1536), (1536, 576)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.01).collect();
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            let y = matmul(&x, WeightRows::F32(&w), m, k, n).unwrap();
            std::hint::black_box(y);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "m {m} k {k} n {n}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / best / 1e9
        );
    }
}
