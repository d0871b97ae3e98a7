//! The paged attention (keys and values read in place from the cache blocks; decode and
//! prompt rows) against the gather path (contexts copied into tensors,
//! candle's ops): with f32 weights a prompt many blocks long and a batch of prompts of
//! different lengths decode the same greedy tokens either way. (`--dtype quantized` keeps the gather path by default: it quantizes every
//! activation to 8 bits, so another summation order in attention moves values across rounding
//! steps and its greedy tokens part from candle's reference within a few tokens.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use std::sync::Arc;
use tandem_engine::{AttentionBackend, CandleArgs, CandleEngine, DtypeArg};
use tandem_engine_api::BatchingArgs;
use tandem_model::WeightsSource;

fn engine(dtype: DtypeArg, attention_backend: AttentionBackend) -> Arc<CandleEngine> {
    let args = CandleArgs {
        dtype,
        attention_backend,
        ..Default::default()
    };
    let batching = BatchingArgs {
        num_blocks: Some(512),
        block_size: Some(16),
        max_num_seqs: 16,
        ..Default::default()
    };
    CandleEngine::start(
        &WeightsSource::Gguf(common::model_path()),
        &args,
        &batching,
        8192,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_and_gathered_attention_decode_the_same_tokens() {
    let files = common::files();
    let mut prompts = common::prompts(&files);
    // One prompt of well over ten 16-token blocks.
    let long: Vec<u32> = prompts
        .iter()
        .flatten()
        .copied()
        .cycle()
        .take(230)
        .collect();
    prompts.insert(0, long);
    assert!(prompts[0].len() > 10 * 16);
    let tokens = 32;
    let mut results = Vec::new();
    for backend in [AttentionBackend::Gather, AttentionBackend::Paged] {
        let e = engine(DtypeArg::F32, backend);
        let (long, _) = common::generate(&e, &prompts[0], tokens).await;
        common::wait_idle(&e).await;
        // All at once: decode rows of different context lengths in one step.
        let batch: Vec<Vec<u32>> =
            futures::future::join_all(prompts[1..].iter().map(|p| common::generate(&e, p, tokens)))
                .await
                .into_iter()
                .map(|(t, _)| t)
                .collect();
        results.push((long, batch));
    }
    assert_eq!(results[0].0.len(), tokens as usize);
    assert_eq!(results[0].0, results[1].0, "long prompt");
    for (i, (g, p)) in results[0].1.iter().zip(&results[1].1).enumerate() {
        assert_eq!(g, p, "prompt {i} of the batch");
    }
}
