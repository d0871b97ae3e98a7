//! HF-style model directories: `tokenizer.json`, `tokenizer_config.json` (chat template,
//! special tokens), `config.json` (context length, eos ids), `generation_config.json`.

use crate::{ModelError, ModelFiles, WeightsSource};
use serde_json::Value;
use std::path::Path;
use tandem_protocols::card::PromptFormat;
use tokenizers::Tokenizer;

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::invalid(path, e))
}

/// A special token in tokenizer_config.json is a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` is a number or a list of numbers.
fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

pub fn load_dir(dir: &Path) -> Result<ModelFiles, ModelError> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(ModelError::invalid(
            dir,
            "no tokenizer.json in model directory",
        ));
    }
    let tokenizer =
        Tokenizer::from_file(&tok_path).map_err(|e| ModelError::invalid(&tok_path, e))?;
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let gen_config = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);

    let mut chat_template = tok_config
        .get("chat_template")
        .and_then(Value::as_str)
        .map(str::to_string);
    // Newer checkpoints keep the template in its own file.
    let jinja = dir.join("chat_template.jinja");
    if chat_template.is_none() && jinja.exists() {
        chat_template = Some(
            std::fs::read_to_string(&jinja).map_err(|source| ModelError::Io {
                path: jinja.clone(),
                source,
            })?,
        );
    }
    let bos_token = tok_config.get("bos_token").and_then(token_text);
    let eos_token = tok_config.get("eos_token").and_then(token_text);
    let mut eos_token_ids = ids(gen_config.get("eos_token_id"));
    for id in ids(config.get("eos_token_id")) {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t))
        && !eos_token_ids.contains(&id)
    {
        eos_token_ids.push(id);
    }
    let context_length = config
        .get("max_position_embeddings")
        .and_then(Value::as_u64)
        .or_else(|| {
            tok_config
                .get("model_max_length")
                .and_then(Value::as_u64)
                .filter(|n| *n < 10_000_000)
        })
        .unwrap_or(2048) as u32;
    let architecture = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(ModelFiles {
        name,
        architecture,
        context_length,
        prompt: PromptFormat {
            chat_template,
            bos_token,
            eos_token,
            eos_token_ids,
            add_bos_token: tok_config
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        },
        tokenizer,
        weights: WeightsSource::HfDir(dir.to_path_buf()),
    })
}
