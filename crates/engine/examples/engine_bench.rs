//! Prompt processing and decode throughput of tandem's candle engine on one GGUF file: one
//! prompt of PROMPT_TOKENS tokens (time to its first token, best of three), then greedy decode
//! of TOKENS tokens at batch 1, 4, 8 and 16 (~30-token prompts, time from each stream's first
//! token to its last). With ENGINE_BENCH_REFERENCE=1 also candle-transformers' quantized Llama
//! run the way candle's `quantized` example runs it (batch 1). ENGINE_BENCH_BATCHES=1,8 picks the
//! batch sizes.
//!
//! `cargo run --release -p tandem-engine --example engine_bench -- MODEL.gguf [f32|f16|quantized] [TOKENS] [PROMPT_TOKENS]`
//! Prints one JSON object per measurement; `scripts/bench-engine.sh` runs every dtype beside
//! llama.cpp and writes the table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The worker's allocator (`bins/worker`), so the numbers are what it serves at: with glibc's
/// malloc every large activation tensor is a fresh mmap, faulted in page by page (~20 % of a
/// 480-token prefill).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use futures::StreamExt;
use std::path::PathBuf;
use std::time::Instant;
use tandem_engine::{CandleArgs, CandleEngine, DtypeArg};
use tandem_engine_api::{BatchingArgs, Engine};
use tandem_model::{ModelFiles, WeightsSource};
use tandem_protocols::llm::{PreprocessedRequest, StopConditions};

/// The chat prompt of stream `i` (scripts/bench-llamacpp.py uses the same text).
fn prompt_text(i: usize) -> String {
    format!(
        "<|im_start|>user\nWrite a long story about traveller number {i} crossing a desert.<|im_end|>\n<|im_start|>assistant\n"
    )
}

fn prompt(files: &ModelFiles, i: usize) -> Vec<u32> {
    files
        .tokenizer
        .encode(prompt_text(i), false)
        .unwrap()
        .get_ids()
        .to_vec()
}

/// A greedy request for `max_tokens` tokens that ignores end-of-sequence.
fn request(token_ids: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        model: "m".into(),
        token_ids,
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// candle's example loop; returns decode tokens/s (prompt excluded).
fn reference(path: &PathBuf, prompt: &[u32], tokens: usize) -> f64 {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, 0).unwrap();
    let mut next = tandem_sampling::argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
    let start = Instant::now();
    for i in 0..tokens {
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, prompt.len() + i).unwrap();
        next = tandem_sampling::argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// `batch` concurrent greedy requests; returns (aggregate decode tokens/s, per-stream tokens/s).
async fn tandem(
    engine: &CandleEngine,
    files: &ModelFiles,
    batch: usize,
    tokens: usize,
) -> (f64, f64) {
    let requests: Vec<_> = (0..batch)
        .map(|i| request(prompt(files, i), tokens as u32 + 1))
        .collect();
    let streams: Vec<_> = requests
        .into_iter()
        .map(|r| engine.generate(r).unwrap())
        .collect();
    // Time from every stream's first token (prefill done) to its last.
    let runs = streams.into_iter().map(|mut s| async move {
        let _ = s.next().await;
        let start = Instant::now();
        let mut n = 0;
        while let Some(o) = s.next().await {
            n += o.map(|o| o.token_ids.len()).unwrap_or(0);
        }
        (n, start.elapsed().as_secs_f64())
    });
    let done = futures::future::join_all(runs).await;
    let total: usize = done.iter().map(|d| d.0).sum();
    let longest = done.iter().map(|d| d.1).fold(0.0, f64::max);
    let per_stream = done.iter().map(|d| d.0 as f64 / d.1).sum::<f64>() / batch as f64;
    (total as f64 / longest, per_stream)
}

/// Prompt processing: one prompt of `n` tokens (prefix caching off), time to its first token,
/// best of three.
async fn prompt_processing(engine: &CandleEngine, files: &ModelFiles, n: usize) -> f64 {
    let text: Vec<String> = (0..64).map(prompt_text).collect();
    let ids = files.tokenizer.encode(text.join(" "), false).unwrap();
    let prompt = ids.get_ids()[..n].to_vec();
    let mut best = 0f64;
    for _ in 0..3 {
        let r = request(prompt.clone(), 1);
        let start = Instant::now();
        let mut s = engine.generate(r).unwrap();
        while s.next().await.is_some() {}
        best = best.max(n as f64 / start.elapsed().as_secs_f64());
    }
    best
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = PathBuf::from(args.get(1).expect("MODEL.gguf"));
    let dtype = match args.get(2).map(String::as_str) {
        Some("quantized") => DtypeArg::Quantized,
        Some("f16") => DtypeArg::F16,
        Some("f32") | None => DtypeArg::F32,
        Some(other) => panic!("dtype {other}: f32, f16 or quantized"),
    };
    let tokens: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let prompt_tokens: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(480);
    let with_reference = std::env::var("ENGINE_BENCH_REFERENCE").is_ok_and(|v| v == "1");
    let files = ModelFiles::load(&path).unwrap();

    if with_reference && dtype != DtypeArg::F16 {
        if dtype == DtypeArg::F32 {
            // candle dequantizes every matmul weight when this is set before the model loads.
            #[allow(unsafe_code)]
            // SAFETY: single-threaded at this point; nothing else reads the environment yet.
            unsafe {
                std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1")
            };
        }
        let p = prompt(&files, 0);
        let path = path.clone();
        let tps = tokio::task::spawn_blocking(move || reference(&path, &p, tokens))
            .await
            .unwrap();
        println!(
            "{{\"engine\": \"candle-transformers\", \"kind\": \"decode\", \"batch\": 1, \"tok_s\": {tps:.1}}}"
        );
    }

    let engine = CandleEngine::start(
        &WeightsSource::Gguf(path.clone()),
        &CandleArgs {
            dtype,
            // As the worker reads it: `avx2` keeps the kernels off their AVX-512 forms.
            cpu_kernels: tandem_engine::CpuKernels::from_env().unwrap(),
            ..Default::default()
        },
        &BatchingArgs {
            num_blocks: Some(1024),
            enable_prefix_caching: false,
            ..Default::default()
        },
        8192,
    )
    .unwrap();
    let pp = prompt_processing(&engine, &files, prompt_tokens).await;
    println!(
        "{{\"engine\": \"tandem\", \"kind\": \"prompt\", \"tokens\": {prompt_tokens}, \"tok_s\": {pp:.1}}}"
    );
    let batches: Vec<usize> = std::env::var("ENGINE_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,4,8,16".into())
        .split(',')
        .map(|b| {
            b.parse()
                .expect("ENGINE_BENCH_BATCHES: comma-separated numbers")
        })
        .collect();
    for batch in batches {
        let (agg, per) = tandem(&engine, &files, batch, tokens).await;
        println!(
            "{{\"engine\": \"tandem\", \"kind\": \"decode\", \"batch\": {batch}, \"tok_s\": {agg:.1}, \"per_stream\": {per:.1}}}"
        );
    }
}
