//! GGUF metadata to tokenizer and prompt format.
//!
//! llama.cpp's `tokenizer.ggml.model = gpt2` is a byte-level BPE: the vocabulary is
//! `tokenizer.ggml.tokens` (ids are positions), `tokenizer.ggml.merges` holds "a b" pairs in
//! rank order, and `tokenizer.ggml.token_type` marks control tokens (3) and user-defined ones
//! (4), which become special added tokens. `tokenizer.ggml.pre` names the pre-tokenizer:
//! `smollm` (and other llama.cpp presets that split digits one by one) put a digit splitter in
//! front of GPT-2's byte-level regex.

use crate::{ModelError, ModelFiles, WeightsSource};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::path::Path;
use tandem_protocols::card::PromptFormat;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Reads only the metadata (not the tensors) of a GGUF file.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, Value>, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = Content::read(&mut file).map_err(|e| ModelError::invalid(path, e))?;
    Ok(content.metadata)
}

pub fn load(path: &Path) -> Result<ModelFiles, ModelError> {
    let md = read_metadata(path)?;
    let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    let get_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let architecture = get_str("general.architecture").unwrap_or_else(|| "llama".into());
    let tokenizer = build_tokenizer(path, &md)?;
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let bos_id = get_u32("tokenizer.ggml.bos_token_id");
    let eos_id = get_u32("tokenizer.ggml.eos_token_id");
    let mut eos_token_ids: Vec<u32> = eos_id.into_iter().collect();
    if let Some(eot) = get_u32("tokenizer.ggml.eot_token_id")
        && !eos_token_ids.contains(&eot)
    {
        eos_token_ids.push(eot);
    }
    let context_length = get_u32(&format!("{architecture}.context_length")).unwrap_or(2048);
    // general.name is often a training-run label; the file name is what users recognise.
    let name = served_name(&file_stem(path));
    Ok(ModelFiles {
        name,
        architecture,
        context_length,
        prompt: PromptFormat {
            chat_template: get_str("tokenizer.chat_template"),
            bos_token: token(bos_id),
            eos_token: token(eos_id),
            eos_token_ids,
            add_bos_token: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
        },
        tokenizer,
        weights: WeightsSource::Gguf(path.to_path_buf()),
    })
}

/// `SmolLM2-135M-Instruct.Q4_1` → `SmolLM2-135M-Instruct`: drops a trailing quantisation tag.
fn served_name(stem: &str) -> String {
    match stem.rsplit_once('.') {
        Some((base, tag))
            if !base.is_empty()
                && tag.len() <= 8
                && tag
                    .chars()
                    .next()
                    .is_some_and(|c| matches!(c, 'Q' | 'q' | 'F' | 'f' | 'B' | 'b' | 'I')) =>
        {
            base.to_string()
        }
        _ => stem.to_string(),
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn strings(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, ModelError> {
    let values = md
        .get(key)
        .ok_or_else(|| ModelError::invalid(path, format!("no {key} in GGUF metadata")))?
        .to_vec()
        .map_err(|e| ModelError::invalid(path, e))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| ModelError::invalid(path, e))
        })
        .collect()
}

/// Rebuilds the byte-level BPE tokenizer described by `tokenizer.ggml.*`.
pub fn build_tokenizer(path: &Path, md: &HashMap<String, Value>) -> Result<Tokenizer, ModelError> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(ModelError::invalid(
            path,
            format!(
                "tokenizer.ggml.model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
            ),
        ));
    }
    let tokens = strings(path, md, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(path, md, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            let (a, b) = m.split_once(' ')?;
            Some((a.to_string(), b.to_string()))
        })
        .collect();
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| ModelError::invalid(path, e))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => Vec::new(),
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::invalid(path, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    if splits_digits(pre) {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])));
    } else {
        tokenizer.with_pre_tokenizer(Some(byte_level));
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
        .filter_map(|(i, t)| {
            tokens
                .get(i)
                .map(|s| AddedToken::from(s.clone(), *t == TOKEN_TYPE_CONTROL))
        })
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| ModelError::invalid(path, e))?;
    Ok(tokenizer)
}

/// llama.cpp pre-tokenizer presets whose regex isolates each digit.
fn splits_digits(pre: &str) -> bool {
    matches!(
        pre,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_names_drop_quantisation_tags() {
        assert_eq!(
            served_name("SmolLM2-135M-Instruct.Q4_1"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(served_name("model.f16"), "model");
        assert_eq!(served_name("Qwen2.5-0.5B"), "Qwen2.5-0.5B");
    }

    #[test]
    fn digit_splitting_presets() {
        assert!(splits_digits("smollm"));
        assert!(!splits_digits("gpt2"));
    }
}
