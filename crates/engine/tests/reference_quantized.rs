//! Greedy equality with candle-transformers' reference model, weights kept quantized
//! (`--dtype quantized`: Q4_1 blocks and candle's quantized matmul, as the reference runs
//! when CANDLE_DEQUANTIZE_ALL is unset).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use tandem_engine::DtypeArg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_engine_matches_reference_solo_batched_and_cached() {
    common::check_against_reference(DtypeArg::Quantized, 24).await;
}
