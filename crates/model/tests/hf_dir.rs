#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! An HF-style model directory loads to the same tokenizer and prompt format as the GGUF file
//! it was written from. Needs the bundled model (scripts/fetch-model.sh).

use serde_json::json;
use std::path::PathBuf;
use tandem_model::{ModelFiles, WeightsSource};

fn gguf() -> ModelFiles {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    ModelFiles::load(&p).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model.sh"))
}

#[test]
fn hf_directory_matches_the_gguf_it_came_from() {
    let g = gguf();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("SmolLM2-135M-Instruct");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("tokenizer.json"), g.tokenizer_json().unwrap()).unwrap();
    std::fs::write(
        d.join("tokenizer_config.json"),
        json!({
            "chat_template": g.prompt.chat_template,
            "bos_token": {"content": "<|im_start|>", "special": true},
            "eos_token": "<|im_end|>",
            "model_max_length": 1_000_000_000_000_000_000u64,
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("config.json"),
        json!({"model_type": "llama", "max_position_embeddings": 8192, "eos_token_id": 2})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("generation_config.json"),
        json!({"eos_token_id": [2, 0]}).to_string(),
    )
    .unwrap();

    let h = ModelFiles::load(&d).unwrap();
    assert_eq!(h.name, "SmolLM2-135M-Instruct");
    assert_eq!(h.context_length, 8192);
    assert_eq!(h.prompt.chat_template, g.prompt.chat_template);
    assert_eq!(h.prompt.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(h.prompt.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(
        h.prompt.eos_token_ids,
        vec![2, 0],
        "generation_config first, then config, deduplicated"
    );
    assert_eq!(h.weights, WeightsSource::HfDir(d.clone()));
    let text = "<|im_start|>user\nThe capital of France is Paris, 2024 🦀<|im_end|>";
    assert_eq!(
        h.tokenizer.encode(text, false).unwrap().get_ids(),
        g.tokenizer.encode(text, false).unwrap().get_ids()
    );
}

#[test]
fn missing_or_broken_model_paths_are_clear_errors() {
    let err = ModelFiles::load(std::path::Path::new("/nonexistent/model.gguf"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = ModelFiles::load(dir.path()).err().unwrap();
    assert!(err.to_string().contains("no tokenizer.json"), "{err}");
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"not a gguf file").unwrap();
    assert!(ModelFiles::load(&bogus).is_err());
}
