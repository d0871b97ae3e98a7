#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The bundled SmolLM2 GGUF: its tokenizer rebuilt from GGUF metadata, and its chat template.
//! Needs `scripts/fetch-model.sh` (run by `scripts/test.sh`).

use serde_json::json;
use std::path::PathBuf;
use tandem_model::ModelFiles;
use tandem_preprocessor::Preprocessor;

fn model() -> ModelFiles {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    ModelFiles::load(&path).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model.sh"))
}

fn preprocessor() -> Preprocessor {
    let m = model();
    // Through JSON, as a frontend on another machine receives it.
    Preprocessor::from_json(&m.tokenizer_json().unwrap(), m.prompt.clone()).unwrap()
}

#[test]
fn gguf_metadata_gives_limits_and_special_tokens() {
    let m = model();
    assert_eq!(m.architecture, "llama");
    assert_eq!(m.context_length, 8192);
    assert_eq!(m.prompt.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(m.prompt.eos_token_ids, vec![2]);
    assert_eq!(m.tokenizer.get_vocab_size(true), 49152);
    assert!(
        m.prompt
            .chat_template
            .as_deref()
            .unwrap_or("")
            .contains("<|im_start|>")
    );
}

#[test]
fn known_words_and_chatml_tokens_map_to_vocabulary_ids() {
    let p = preprocessor();
    let t = p.tokenizer();
    assert_eq!(p.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(p.encode("<|im_end|>").unwrap(), vec![2]);
    assert_eq!(p.encode("<|endoftext|>").unwrap(), vec![0]);
    // Words map to single vocabulary entries; a leading space is the byte-level 'Ġ'.
    for word in ["Hello", " world", " Paris", " France"] {
        let ids = p.encode(word).unwrap();
        assert_eq!(ids.len(), 1, "{word:?} -> {ids:?}");
        assert_eq!(t.id_to_token(ids[0]).unwrap(), word.replace(' ', "Ġ"));
    }
    // Digits are split one by one (llama.cpp's "smollm" pre-tokenizer).
    assert_eq!(p.encode("2024").unwrap().len(), 4);
    let ids = p.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
}

#[test]
fn decode_of_encode_round_trips_varied_text() {
    let p = preprocessor();
    for text in [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "numbers 3.14159 and 1,000,000",
        "unicode: café, naïve, Zürich, 東京, Привет, 🦀🚀",
        "code: fn main() { println!(\"{}\", x); }",
        "",
    ] {
        let ids = p.encode(text).unwrap();
        assert_eq!(p.decode(&ids).unwrap(), text);
        // Incremental decoding, one token at a time, gives the same text and never a
        // broken character.
        let mut dec = p.decoder();
        let mut out = String::new();
        for id in &ids {
            let delta = dec.push(&[*id]);
            assert!(!delta.contains('\u{FFFD}'), "{text:?}");
            out.push_str(&delta);
        }
        out.push_str(&dec.finish());
        assert_eq!(out, text);
    }
}

#[test]
fn chatml_prompt_for_system_and_user_renders_exactly() {
    let p = preprocessor();
    let prompt = p
        .render_chat(
            &[
                json!({"role": "system", "content": "You are terse."}),
                json!({"role": "user", "content": "What is the capital of France?"}),
            ],
            None,
            true,
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without a system message the template adds its default one.
    let prompt = p
        .render_chat(&[json!({"role": "user", "content": "Hi"})], None, true)
        .unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{prompt}"
    );
}
