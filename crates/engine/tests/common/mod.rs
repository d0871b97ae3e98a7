//! Shared by the reference tests: the bundled model, a greedy reference decoder on
//! candle-transformers' own quantized Llama, and greedy requests to tandem's engine.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use futures::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;
use tandem_engine::{CandleArgs, CandleEngine, CpuKernels, DtypeArg};
use tandem_engine_api::{BatchingArgs, Engine};
use tandem_model::{ModelFiles, WeightsSource};
use tandem_protocols::llm::{PreprocessedRequest, SamplingOptions, StopConditions};

pub fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn files() -> ModelFiles {
    ModelFiles::load(&model_path()).expect("bundled model (scripts/fetch-model.sh)")
}

/// Makes the reference below dequantize every weight to f32 (candle reads
/// CANDLE_DEQUANTIZE_ALL when the model loads). Call first in a test binary's only test.
pub fn reference_in_f32() {
    #[allow(unsafe_code)]
    // SAFETY: called before the binary's only test starts anything that reads the environment.
    unsafe {
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1")
    };
}

/// Chat-formatted prompts of different lengths. No two share a full block (their system
/// prompts differ early), so each one's cached blocks are its own.
pub fn prompts(files: &ModelFiles) -> Vec<Vec<u32>> {
    [
        ("You are a helpful AI assistant named SmolLM, trained by Hugging Face", "What is the capital of France?"),
        ("Poems only.", "Write a haiku about the sea."),
        ("Math tutor: precise and brief.", "List three prime numbers and explain why each one is prime, briefly."),
        ("Be friendly.", "Hi"),
        ("Physics teacher for teenagers.", "Explain in one paragraph how a bicycle stays upright while moving forward at speed."),
    ]
    .iter()
    .map(|(system, q)| {
        let text = format!(
            "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        );
        files.tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    })
    .collect()
}

/// The three comparisons every weight format must pass: one request at a time, all at
/// once (prefills of different lengths in one step, then decodes of different context
/// lengths), and all at once again when each prompt's leading full blocks are in the prefix
/// cache. For the last, the reference is fed the same cached prefix first and the rest on
/// top of its own KV cache: splitting a prefill changes the float summation order, so that,
/// not the unsplit run, is the bit-exact baseline for a cache hit.
pub async fn check_against_reference(dtype: DtypeArg, tokens: usize) {
    let files = files();
    let prompts = prompts(&files);
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| reference_greedy(p, tokens))
        .collect();
    let n = tokens as u32;

    let solo = engine(dtype, 512, 64);
    for (p, want) in prompts.iter().zip(&expected) {
        let (got, cached) = generate(&solo, p, n).await;
        assert_eq!(&got, want, "solo: {:?}", files.tokenizer.decode(&got, true));
        assert_eq!(cached, 0);
    }
    wait_idle(&solo).await;

    let batched = engine(dtype, 512, 64);
    let results = futures::future::join_all(prompts.iter().map(|p| generate(&batched, p, n))).await;
    for ((got, _), want) in results.iter().zip(&expected) {
        assert_eq!(
            got,
            want,
            "batched: {:?}",
            files.tokenizer.decode(got, true)
        );
    }
    wait_idle(&batched).await;

    let cached = engine(dtype, 512, 64);
    let prefixes: Vec<usize> = prompts.iter().map(|p| (p.len() - 1) / 16 * 16).collect();
    let warm = prompts
        .iter()
        .zip(&prefixes)
        .map(|(p, &k)| generate(&cached, &p[..k.max(1)], 1));
    futures::future::join_all(warm).await;
    let results = futures::future::join_all(prompts.iter().map(|p| generate(&cached, p, n))).await;
    for (((got, hit), p), &k) in results.iter().zip(&prompts).zip(&prefixes) {
        assert_eq!(*hit as usize, k, "cached prefix");
        let want = reference_greedy_from_cache(p, k, tokens);
        assert_eq!(
            got,
            &want,
            "cached: {:?}",
            files.tokenizer.decode(got, true)
        );
    }
    wait_idle(&cached).await;
}

/// Greedy tokens from candle-transformers' quantized Llama (the same loop as candle's
/// quantized example: whole prompt, then one token at a time, argmax).
pub fn reference_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    reference_greedy_from_cache(prompt, 0, n)
}

/// The same, with the first `cached` prompt tokens fed first and the rest on top of the
/// reference's own KV cache: what a prefix-cache hit means for it.
pub fn reference_greedy_from_cache(prompt: &[u32], cached: usize, n: usize) -> Vec<u32> {
    static MODEL: std::sync::OnceLock<ModelWeights> = std::sync::OnceLock::new();
    let mut model = MODEL
        .get_or_init(|| {
            let mut file = std::fs::File::open(model_path()).unwrap();
            let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
            ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap()
        })
        .clone();
    model.clear_kv_cache();
    let mut out = Vec::new();
    if cached > 0 {
        let input = Tensor::new(&prompt[..cached], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model.forward(&input, 0).unwrap();
    }
    let input = Tensor::new(&prompt[cached..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits = model.forward(&input, cached).unwrap();
    for i in 0..n {
        let next = tandem_sampling::argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        out.push(next);
        if i + 1 == n {
            break;
        }
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = model.forward(&input, prompt.len() + i).unwrap();
    }
    out
}

pub fn engine(dtype: DtypeArg, blocks: usize, max_num_seqs: usize) -> Arc<CandleEngine> {
    let batching = BatchingArgs {
        num_blocks: Some(blocks),
        max_num_seqs,
        ..Default::default()
    };
    // `TANDEM_CPU_KERNELS=avx2` (as the worker reads it) runs the kernels' AVX2 forms on an
    // AVX-512 CPU: `reference_avx2.rs` sets it.
    let args = CandleArgs {
        dtype,
        cpu_kernels: CpuKernels::from_env().unwrap(),
        ..Default::default()
    };
    CandleEngine::start(&WeightsSource::Gguf(model_path()), &args, &batching, 8192).unwrap()
}

pub fn greedy_request(prompt: &[u32], n: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        model: "m".into(),
        token_ids: prompt.to_vec(),
        sampling: SamplingOptions {
            n: 1,
            ..Default::default()
        },
        stop: StopConditions {
            max_tokens: Some(n),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Runs one greedy request to completion; returns its tokens and reported cached tokens.
pub async fn generate(engine: &CandleEngine, prompt: &[u32], n: u32) -> (Vec<u32>, u32) {
    let outs: Vec<_> = engine
        .generate(greedy_request(prompt, n))
        .unwrap()
        .map(|o| o.unwrap())
        .collect()
        .await;
    let cached = outs.iter().find_map(|o| o.cached_tokens).unwrap_or(0);
    (outs.into_iter().flat_map(|o| o.token_ids).collect(), cached)
}

pub async fn wait_idle(engine: &CandleEngine) {
    for _ in 0..500 {
        let s = engine.stats();
        if s.active_blocks == 0 && s.running == 0 && s.waiting == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("engine did not go idle: {:?}", engine.stats());
}
