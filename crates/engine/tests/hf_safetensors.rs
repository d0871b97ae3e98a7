//! The HF safetensors path: the bundled GGUF rewritten as an HF Llama directory (f32
//! safetensors under HF names, q/k rows back in HF's rotate-half order, `config.json`) must
//! generate what the GGUF gives when both run in f32.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use common::*;
use std::collections::HashMap;
use tandem_engine::config::ModelConfig;
use tandem_engine::{CandleArgs, CandleEngine, DtypeArg};
use tandem_engine_api::BatchingArgs;
use tandem_model::WeightsSource;

/// llama.cpp interleaves each head's rotary pairs; HF keeps the two halves apart.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, out / heads / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn write_hf_dir(dir: &std::path::Path) {
    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = Content::read(&mut file).unwrap();
    let cfg = ModelConfig::from_gguf(&content).unwrap();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let mut out = HashMap::new();
    for name in names {
        let t = content
            .tensor(&mut file, &name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let hf = match name.as_str() {
            "token_embd.weight" => "model.embed_tokens.weight".to_string(),
            "output_norm.weight" => "model.norm.weight".to_string(),
            "output.weight" => "lm_head.weight".to_string(),
            n => {
                let rest = n.strip_prefix("blk.").unwrap();
                let (layer, part) = rest.split_once('.').unwrap();
                let part = match part {
                    "attn_q.weight" => "self_attn.q_proj.weight",
                    "attn_k.weight" => "self_attn.k_proj.weight",
                    "attn_v.weight" => "self_attn.v_proj.weight",
                    "attn_output.weight" => "self_attn.o_proj.weight",
                    "attn_norm.weight" => "input_layernorm.weight",
                    "ffn_norm.weight" => "post_attention_layernorm.weight",
                    "ffn_gate.weight" => "mlp.gate_proj.weight",
                    "ffn_up.weight" => "mlp.up_proj.weight",
                    "ffn_down.weight" => "mlp.down_proj.weight",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("model.layers.{layer}.{part}")
            }
        };
        let t = if name.ends_with("attn_q.weight") {
            unpermute(&t, cfg.num_heads)
        } else if name.ends_with("attn_k.weight") {
            unpermute(&t, cfg.num_kv_heads)
        } else {
            t
        };
        out.insert(hf, t.contiguous().unwrap());
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safetensors_directory_generates_what_the_gguf_does() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(dir.path());
    let batching = BatchingArgs {
        num_blocks: Some(256),
        ..Default::default()
    };
    let args = CandleArgs {
        dtype: DtypeArg::F32,
        ..Default::default()
    };
    let hf = CandleEngine::start(
        &WeightsSource::HfDir(dir.path().to_path_buf()),
        &args,
        &batching,
        8192,
    )
    .unwrap();
    let gguf = engine(DtypeArg::F32, 256, 8);
    let files = files();
    for p in prompts(&files).iter().take(3) {
        let (want, _) = generate(&gguf, p, 16).await;
        let (got, _) = generate(&hf, p, 16).await;
        assert_eq!(got, want, "{:?}", files.tokenizer.decode(&got, true));
    }
}
