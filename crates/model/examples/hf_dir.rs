//! Writes an HF-style model directory holding a model's tokenizer — `tokenizer.json`,
//! `tokenizer_config.json` (chat template, BOS/EOS), `config.json` (architecture, vocabulary,
//! context length) — so that tools that load tokenizers the Hugging Face way (aiperf, Dynamo's
//! mocker and frontend) see the same tokenizer and template as tandem, offline.
//!
//! `cargo run -p tandem-model --example hf_dir -- MODEL.gguf|DIR OUT_DIR`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use std::path::PathBuf;
use tandem_model::ModelFiles;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (src, out) = match (args.get(1), args.get(2)) {
        (Some(s), Some(o)) => (PathBuf::from(s), PathBuf::from(o)),
        _ => {
            eprintln!("usage: hf_dir MODEL.gguf|DIR OUT_DIR");
            std::process::exit(2);
        }
    };
    let m = ModelFiles::load(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), m.tokenizer_json().unwrap()).unwrap();
    let p = &m.prompt;
    let config = json!({
        "chat_template": p.chat_template,
        "bos_token": p.bos_token,
        "eos_token": p.eos_token,
        "add_bos_token": p.add_bos_token,
        "model_max_length": m.context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let model_type = if m.architecture.is_empty() {
        "llama"
    } else {
        m.architecture.as_str()
    };
    let eos = p.eos_token_ids.first().copied();
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": m.tokenizer.get_vocab_size(true),
        "max_position_embeddings": m.context_length,
        "eos_token_id": eos,
        "bos_token_id": p.bos_token.as_deref().and_then(|t| m.tokenizer.token_to_id(t)),
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    println!("{}", out.display());
}
