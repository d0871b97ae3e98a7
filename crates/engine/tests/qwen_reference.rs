//! Qwen2 (q/k/v bias, tied output) and Qwen3 (per-head q/k RMS norm, head_dim apart from
//! hidden/heads, separate output) configs: small random-weight HF directories, greedy tokens
//! from tandem's engine against candle-transformers' own qwen2 / qwen3 models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor};
use futures::StreamExt;
use std::collections::HashMap;
use std::path::Path;
use tandem_engine::{CandleArgs, CandleEngine, DtypeArg};
use tandem_engine_api::{BatchingArgs, Engine};
use tandem_model::WeightsSource;
use tandem_protocols::llm::{PreprocessedRequest, StopConditions};

const VOCAB: usize = 300;
const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTER: usize = 128;

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).unwrap()
}

/// Writes `config.json` and `model.safetensors`; returns the config.
fn write_model(dir: &Path, qwen3: bool) -> serde_json::Value {
    let head_dim = if qwen3 { 32 } else { HIDDEN / HEADS };
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&[VOCAB, HIDDEN], 1.0),
    );
    t.insert(
        "model.norm.weight".to_string(),
        (randn(&[HIDDEN], 0.1) + 1.0).unwrap(),
    );
    if qwen3 {
        t.insert("lm_head.weight".to_string(), randn(&[VOCAB, HIDDEN], 0.2));
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let mut put = |name: &str, shape: &[usize], std: f64| {
            t.insert(format!("{p}.{name}"), randn(shape, std));
        };
        put("self_attn.q_proj.weight", &[HEADS * head_dim, HIDDEN], 0.2);
        put(
            "self_attn.k_proj.weight",
            &[KV_HEADS * head_dim, HIDDEN],
            0.2,
        );
        put(
            "self_attn.v_proj.weight",
            &[KV_HEADS * head_dim, HIDDEN],
            0.2,
        );
        put("self_attn.o_proj.weight", &[HIDDEN, HEADS * head_dim], 0.2);
        put("mlp.gate_proj.weight", &[INTER, HIDDEN], 0.2);
        put("mlp.up_proj.weight", &[INTER, HIDDEN], 0.2);
        put("mlp.down_proj.weight", &[HIDDEN, INTER], 0.2);
        if qwen3 {
            put("self_attn.q_norm.weight", &[head_dim], 0.1);
            put("self_attn.k_norm.weight", &[head_dim], 0.1);
        } else {
            put("self_attn.q_proj.bias", &[HEADS * head_dim], 0.5);
            put("self_attn.k_proj.bias", &[KV_HEADS * head_dim], 0.5);
            put("self_attn.v_proj.bias", &[KV_HEADS * head_dim], 0.5);
        }
        put("input_layernorm.weight", &[HIDDEN], 0.1);
        put("post_attention_layernorm.weight", &[HIDDEN], 0.1);
    }
    // Norm weights around 1, not 0.
    for (name, w) in t.iter_mut() {
        if name.ends_with("norm.weight") && !name.starts_with("model.norm") {
            *w = (&*w + 1.0).unwrap();
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": if qwen3 { "qwen3" } else { "qwen2" },
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": head_dim, "attention_bias": false,
        "max_position_embeddings": 2048, "sliding_window": 2048, "max_window_layers": LAYERS,
        "use_sliding_window": false, "tie_word_embeddings": !qwen3,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    config
}

/// One forward of the reference model: tokens and their first position to logits.
type Step = Box<dyn FnMut(&Tensor, usize) -> Tensor>;

fn reference(
    dir: &Path,
    config: &serde_json::Value,
    qwen3: bool,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut forward: Step = if qwen3 {
        let cfg: candle_transformers::models::qwen3::Config =
            serde_json::from_value(config.clone()).unwrap();
        let mut m = candle_transformers::models::qwen3::ModelForCausalLM::new(&cfg, vb).unwrap();
        Box::new(move |x, pos| m.forward(x, pos).unwrap())
    } else {
        let cfg: candle_transformers::models::qwen2::Config =
            serde_json::from_value(config.clone()).unwrap();
        let mut m = candle_transformers::models::qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
        Box::new(move |x, pos| m.forward(x, pos).unwrap())
    };
    let argmax =
        |t: Tensor| tandem_sampling::argmax(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let mut out = vec![argmax(forward(
        &Tensor::new(prompt, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        0,
    ))];
    while out.len() < n {
        let last = *out.last().unwrap();
        let pos = prompt.len() + out.len() - 1;
        out.push(argmax(forward(
            &Tensor::new(&[last], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            pos,
        )));
    }
    out
}

async fn check(qwen3: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_model(dir.path(), qwen3);
    let engine = CandleEngine::start(
        &WeightsSource::HfDir(dir.path().to_path_buf()),
        &CandleArgs {
            dtype: DtypeArg::F32,
            ..Default::default()
        },
        &BatchingArgs {
            num_blocks: Some(64),
            ..Default::default()
        },
        512,
    )
    .unwrap();
    for prompt in [
        vec![5u32, 17, 42, 99, 7],
        (1..40).map(|i| (i * 37 % 290) as u32 + 3).collect(),
    ] {
        let want = reference(dir.path(), &config, qwen3, &prompt, 12);
        let request = PreprocessedRequest {
            model: "m".into(),
            token_ids: prompt.clone(),
            sampling: Default::default(),
            stop: StopConditions {
                max_tokens: Some(12),
                ..Default::default()
            },
            ..Default::default()
        };
        let got: Vec<u32> = engine
            .generate(request)
            .unwrap()
            .flat_map(|o| futures::stream::iter(o.unwrap().token_ids))
            .collect()
            .await;
        assert_eq!(got, want, "qwen3={qwen3} prompt of {}", prompt.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_bias_and_tied_output_match_candle_transformers() {
    check(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen3_qk_norm_and_separate_output_match_candle_transformers() {
    check(true).await;
}
