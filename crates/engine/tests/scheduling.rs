//! The scheduler on the bundled model: preemption under a small pool, prefix reuse,
//! n > 1, seeds, stop tokens and cancellation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use futures::StreamExt;
use tandem_engine::DtypeArg;
use tandem_engine_api::Engine;
use tandem_protocols::llm::FinishReason;

fn question(files: &tandem_model::ModelFiles, q: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    files
        .tokenizer
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_pool_preempts_and_every_output_equals_its_solo_run() {
    const TOKENS: u32 = 20;
    let files = files();
    let prompts: Vec<Vec<u32>> = (0..32)
        .map(|k| question(&files, &format!("Count from {k} to {}.", k + 5)))
        .collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap() + TOKENS as usize;
    // 16-token blocks: each sequence ends needing ceil(longest / 16) blocks; 32 of them
    // need well over twice the pool.
    const POOL: usize = 20;
    let per_seq = longest.div_ceil(16);
    assert!(32 * per_seq > 2 * POOL, "pool must be too small");
    let solo_engine = engine(DtypeArg::F32, 64, 1);
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(generate(&solo_engine, p, TOKENS).await.0);
    }
    let engine = engine(DtypeArg::F32, POOL, 256);
    let runs = prompts.iter().map(|p| generate(&engine, p, TOKENS));
    let results = futures::future::join_all(runs).await;
    for (k, ((got, _), want)) in results.iter().zip(&solo).enumerate() {
        assert_eq!(got, want, "request {k}");
    }
    wait_idle(&engine).await;
    let s = engine.stats();
    assert!(s.preemptions > 0, "no preemption happened: {s:?}");
    assert_eq!(s.active_blocks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_computes_only_the_new_blocks() {
    let files = files();
    let system: String = "You answer questions about the solar system with short facts. ".repeat(8);
    let a = question(&files, &format!("{system}How many planets are there?"));
    let b = question(&files, &format!("{system}Which planet is the largest?"));
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared >= 64, "prefix of {shared} tokens");
    let engine = engine(DtypeArg::F32, 128, 8);
    let (_, cached_a) = generate(&engine, &a, 4).await;
    assert_eq!(cached_a, 0);
    wait_idle(&engine).await;
    let before = engine.stats();
    let (_, cached_b) = generate(&engine, &b, 4).await;
    wait_idle(&engine).await;
    let after = engine.stats();
    // Every full block of the shared prefix is reused; only the rest of b is computed.
    let reusable = (shared / 16) * 16;
    assert_eq!(cached_b as usize, reusable);
    assert_eq!(
        (after.prefill_tokens - before.prefill_tokens) as usize,
        b.len() - reusable
    );
    assert!(after.prefix_hit_rate > before.prefix_hit_rate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_seeds_stop_tokens_and_cancellation() {
    let files = files();
    let prompt = question(&files, "Tell me a story about a dragon.");
    let engine = engine(DtypeArg::F32, 128, 8);
    let mut req = greedy_request(&prompt, 10);
    req.sampling.n = 3;
    req.sampling.temperature = Some(1.0);
    req.sampling.seed = Some(42);
    let run = |req| {
        let engine = engine.clone();
        async move {
            let outs: Vec<_> = engine
                .generate(req)
                .unwrap()
                .map(|o| o.unwrap())
                .collect()
                .await;
            let mut by_choice = vec![Vec::new(); 3];
            for o in outs {
                by_choice[o.index as usize].extend(o.token_ids);
            }
            by_choice
        }
    };
    let first = run(req.clone()).await;
    let second = run(req.clone()).await;
    assert_eq!(first, second, "same seed, same tokens");
    assert!(first.iter().all(|c| c.len() == 10));
    assert!(
        first[0] != first[1] || first[1] != first[2],
        "choices differ"
    );
    wait_idle(&engine).await;

    // A stop token ends the choice with finish reason stop.
    let (greedy, _) = generate(&engine, &prompt, 6).await;
    let mut req = greedy_request(&prompt, 20);
    req.stop.stop_token_ids = vec![greedy[3]];
    let outs: Vec<_> = engine
        .generate(req)
        .unwrap()
        .map(|o| o.unwrap())
        .collect()
        .await;
    let stop_at = greedy.iter().position(|&t| t == greedy[3]).unwrap();
    assert_eq!(outs.len(), stop_at + 1);
    assert_eq!(outs.last().unwrap().finish_reason, Some(FinishReason::Stop));

    // Dropping the stream frees the blocks.
    let mut s = engine.generate(greedy_request(&prompt, 10_000)).unwrap();
    s.next().await.unwrap().unwrap();
    // Stats are published after each step; the first token can arrive just before.
    for _ in 0..500 {
        if engine.stats().active_blocks > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(engine.stats().active_blocks > 0);
    drop(s);
    wait_idle(&engine).await;
}
