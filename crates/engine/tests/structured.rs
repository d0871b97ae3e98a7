#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Structured output in the candle engine on the bundled model: the grammar holds for every
//! choice of a batch, through preemption in a small pool, and across a migration (a request
//! resumed from tokens another worker produced continues the same document).

mod common;

use common::{files, model_path, prompts};
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tandem_engine::{CandleArgs, CandleEngine, DtypeArg, Guides};
use tandem_engine_api::{BatchingArgs, Engine};
use tandem_model::WeightsSource;
use tandem_protocols::llm::{FinishReason, GuidedDecoding, PreprocessedRequest};

fn engine(blocks: usize) -> Arc<CandleEngine> {
    let f = files();
    let guides = Arc::new(Guides::new(
        f.tokenizer.clone(),
        f.prompt.eos_token_ids.clone(),
    ));
    CandleEngine::start_with(
        &WeightsSource::Gguf(model_path()),
        &CandleArgs {
            dtype: DtypeArg::F32,
            ..Default::default()
        },
        &BatchingArgs {
            num_blocks: Some(blocks),
            ..Default::default()
        },
        8192,
        Some(guides),
    )
    .unwrap()
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["capital", "town"]},
            "rank": {"type": "integer", "minimum": 1, "maximum": 9}
        },
        "required": ["city", "kind", "rank"],
        "additionalProperties": false
    })
}

fn request(prompt: &[u32], n: u32, temperature: f32) -> PreprocessedRequest {
    let mut r = PreprocessedRequest {
        model: "m".into(),
        token_ids: prompt.to_vec(),
        ..Default::default()
    };
    r.sampling.n = n;
    r.sampling.temperature = Some(temperature);
    r.sampling.seed = Some(3);
    r.sampling.guided_decoding = Some(GuidedDecoding::JsonSchema(schema()));
    r.stop.max_tokens = Some(60);
    r.stop.stop_token_ids = files().prompt.eos_token_ids.clone();
    r.output_options.logprobs = Some(2);
    r
}

/// Each choice's tokens (end-of-sequence left out) and finish reason.
async fn run(engine: &CandleEngine, r: PreprocessedRequest) -> Vec<(Vec<u32>, FinishReason)> {
    let n = r.sampling.n as usize;
    let eos = r.stop.stop_token_ids.clone();
    let mut out = vec![(Vec::new(), FinishReason::Length); n];
    let mut s = engine.generate(r).unwrap();
    while let Some(o) = s.next().await {
        let o = o.unwrap();
        let lps = o.logprobs.as_ref().expect("logprobs asked for");
        assert_eq!(lps.len(), o.token_ids.len());
        for (t, lp) in o.token_ids.iter().zip(lps) {
            assert!(lp.logprob.is_finite() && lp.logprob <= 0.0);
            assert!(
                lp.top.iter().all(|(_, l)| l.is_finite()),
                "forbidden tokens are no alternatives"
            );
            if !eos.contains(t) {
                out[o.index as usize].0.push(*t);
            }
        }
        if let Some(f) = o.finish_reason {
            out[o.index as usize].1 = f;
        }
    }
    out
}

fn valid(tokens: &[u32]) -> Value {
    let text = files().tokenizer.decode(tokens, true).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(
        ["capital", "town"].contains(&v["kind"].as_str().unwrap()),
        "{text}"
    );
    assert!((1..=9).contains(&v["rank"].as_i64().unwrap()), "{text}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_choice_of_a_batch_follows_its_grammar_even_when_preempted() {
    let f = files();
    let prompts = prompts(&f);
    // 12 blocks of 16 tokens cannot hold three prompts and their outputs: preemption.
    let e = engine(12);
    let runs =
        futures::future::join_all(prompts[..3].iter().map(|p| run(&e, request(p, 2, 0.9)))).await;
    for choices in runs {
        assert_eq!(choices.len(), 2);
        for (tokens, finish) in choices {
            assert_eq!(
                finish,
                FinishReason::Stop,
                "the grammar's end is the choice's end"
            );
            valid(&tokens);
        }
    }
    assert!(
        e.stats().preemptions > 0,
        "the pool was small enough to preempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_continues_the_same_document() {
    let f = files();
    let prompt = &prompts(&f)[0];
    let e = engine(256);
    let whole = run(&e, request(prompt, 1, 0.0)).await.remove(0).0;
    valid(&whole);
    // Another worker made the first 5 tokens: they come back as part of the prompt.
    let mut r = request(prompt, 1, 0.0);
    r.token_ids.extend_from_slice(&whole[..5]);
    r.resumed_tokens = 5;
    let rest = run(&e, r).await.remove(0).0;
    assert_eq!(
        rest,
        whole[5..],
        "greedy: the same tokens, the grammar resumed"
    );
    // Resumed tokens the grammar refuses are the request's error.
    let mut bad = request(prompt, 1, 0.0);
    bad.token_ids.push(f.tokenizer.token_to_id("x").unwrap());
    bad.resumed_tokens = 1;
    assert!(e.generate(bad).is_err());
}
