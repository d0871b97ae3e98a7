//! Greedy equality with candle-transformers' reference model, weights dequantized to f32
//! (the reference dequantizes when CANDLE_DEQUANTIZE_ALL is set).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use tandem_engine::DtypeArg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_engine_matches_reference_solo_batched_and_cached() {
    common::reference_in_f32();
    let files = common::files();
    let paris = common::reference_greedy(&common::prompts(&files)[0], 12);
    let text = files.tokenizer.decode(&paris, true).unwrap();
    assert!(text.contains("Paris"), "reference answer: {text}");
    common::check_against_reference(DtypeArg::F32, 24).await;
}
