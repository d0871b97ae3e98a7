//! What structured output costs the candle engine: decode tokens/s with and without a JSON
//! Schema mask, at batch 1 and 8, alternating plain and guided runs on one engine so that
//! both see the same machine.
//!
//! `cargo run --release -p tandem-engine --example guided_bench -- MODEL.gguf [TOKENS] [ROUNDS]`
//! Prints markdown table rows (batch, plain tok/s, guided tok/s, ratio, µs/token the guided
//! run spent beyond the plain one), then the mask's own cost: one guided document replayed
//! token by token through a fresh grammar, timing each step's mask (mean, p50, p99, max).
//! `scripts/bench-structured.sh` runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tandem_engine::{CandleArgs, CandleEngine, DtypeArg, Guides};
use tandem_engine_api::{BatchingArgs, Engine};
use tandem_model::{ModelFiles, WeightsSource};
use tandem_protocols::llm::{GuidedDecoding, PreprocessedRequest};
use tandem_sampling::Constraint;

/// A schema whose document cannot end before `TOKENS` tokens: a long required string after
/// an enum and a bounded integer, so the mask covers structure and free text.
fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "genre": {"enum": ["adventure", "mystery", "fable"]},
            "chapters": {"type": "integer", "minimum": 1, "maximum": 30},
            "story": {"type": "string", "minLength": 4000}
        },
        "required": ["genre", "chapters", "story"],
        "additionalProperties": false
    })
}

fn request(files: &ModelFiles, i: usize, tokens: usize, guided: bool) -> PreprocessedRequest {
    let text = format!(
        "<|im_start|>user\nAs JSON: a long story about traveller number {i} crossing a desert.<|im_end|>\n<|im_start|>assistant\n"
    );
    let mut r = PreprocessedRequest {
        model: "m".into(),
        token_ids: files
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec(),
        ..Default::default()
    };
    r.stop.max_tokens = Some(tokens as u32 + 1);
    r.stop.ignore_eos = true;
    if guided {
        r.sampling.guided_decoding = Some(GuidedDecoding::JsonSchema(schema()));
    }
    r
}

/// `batch` concurrent greedy requests; aggregate decode tokens/s from each stream's first
/// token to its last.
async fn run(
    engine: &CandleEngine,
    files: &ModelFiles,
    batch: usize,
    tokens: usize,
    guided: bool,
) -> f64 {
    let streams: Vec<_> = (0..batch)
        .map(|i| engine.generate(request(files, i, tokens, guided)).unwrap())
        .collect();
    let runs = streams.into_iter().map(|mut s| async move {
        let _ = s.next().await;
        let start = Instant::now();
        let mut n = 0;
        while let Some(o) = s.next().await {
            n += o.unwrap().token_ids.len();
        }
        (n, start.elapsed().as_secs_f64())
    });
    let done = futures::future::join_all(runs).await;
    let total: usize = done.iter().map(|d| d.0).sum();
    assert_eq!(total, batch * tokens, "every stream ran to its length");
    total as f64 / done.iter().map(|d| d.1).fold(0.0, f64::max)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = PathBuf::from(args.get(1).expect("MODEL.gguf"));
    let tokens: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let files = ModelFiles::load(&path).unwrap();
    let guides = Arc::new(Guides::new(
        files.tokenizer.clone(),
        files.prompt.eos_token_ids.clone(),
    ));
    // The grammar compiler is built on first use; build it before timing anything.
    let t = Instant::now();
    guides.check(&GuidedDecoding::JsonSchema(schema())).unwrap();
    eprintln!(
        "vocabulary and first grammar ready in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    // What the frontend's validation (and the engine, per choice) pays to compile it.
    let t = Instant::now();
    for _ in 0..20 {
        guides.check(&GuidedDecoding::JsonSchema(schema())).unwrap();
    }
    eprintln!(
        "compiling the schema: {:.0} µs",
        t.elapsed().as_secs_f64() * 1e6 / 20.0
    );
    let engine = CandleEngine::start_with(
        &WeightsSource::Gguf(path.clone()),
        &CandleArgs {
            dtype: DtypeArg::F32,
            ..Default::default()
        },
        &BatchingArgs {
            num_blocks: Some(1024),
            ..Default::default()
        },
        8192,
        Some(guides.clone()),
    )
    .unwrap();
    for batch in [1, 8] {
        let (mut plain, mut guided) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            plain.push(run(&engine, &files, batch, tokens, false).await);
            guided.push(run(&engine, &files, batch, tokens, true).await);
        }
        let (p, g) = (median(plain), median(guided));
        // Per generated token, what the guided run spent beyond the plain one (masks are
        // computed one sequence after another, so a step grows by batch × this).
        let mask_us = (1.0 / g - 1.0 / p) * 1e6;
        println!(
            "| {batch} | {p:.1} | {g:.1} | {:.3} | {mask_us:.0} |",
            g / p
        );
    }
    // The mask alone: replay one guided document's tokens through a fresh grammar.
    let mut s = engine.generate(request(&files, 0, tokens, true)).unwrap();
    let mut doc = Vec::new();
    while let Some(o) = s.next().await {
        doc.extend(o.unwrap().token_ids);
    }
    let mut guide = guides.guide(&GuidedDecoding::JsonSchema(schema())).unwrap();
    let mut logits = vec![0.0f32; files.tokenizer.get_vocab_size(true)];
    let mut us: Vec<f64> = Vec::new();
    for t in &doc {
        logits.fill(0.0);
        let start = Instant::now();
        guide.mask(&mut logits).unwrap();
        us.push(start.elapsed().as_secs_f64() * 1e6);
        guide.advance(*t).unwrap();
    }
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    println!(
        "\nmask per step over {} tokens of one document: mean {mean:.0} µs, p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        us.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
