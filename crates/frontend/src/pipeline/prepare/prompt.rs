//! The completions `prompt`: a string, a list of one string, a list of token ids, or a list
//! of one list of token ids. Token ids must be integers inside the model's vocabulary, so a
//! bad id is the client's 400 here, never an engine failure.

use crate::error::ApiError;
use serde_json::Value;
use tandem_preprocessor::Preprocessor;

const PARAM: &str = "prompt";

fn token_ids(items: &[Value], vocab: usize) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::invalid(
                format!("token id {id} is outside the model's vocabulary of {vocab} tokens"),
                Some(PARAM),
            )),
            None => Err(ApiError::invalid(
                format!("token ids must be non-negative integers, got {v}"),
                Some(PARAM),
            )),
        })
        .collect()
}

fn one_only() -> ApiError {
    ApiError::unsupported(PARAM, "with more than one prompt (a batch)")
}

/// Token ids of the prompt.
pub fn prompt_ids(prompt: &Value, pre: &Preprocessor) -> Result<Vec<u32>, ApiError> {
    let vocab = pre.tokenizer().get_vocab_size(true);
    let text = |t: &str| {
        pre.encode_prompt(t)
            .map_err(|e| ApiError::invalid(e.to_string(), Some(PARAM)))
    };
    let ids = match prompt {
        Value::String(t) => text(t)?,
        Value::Array(items) => match items.first() {
            None => Vec::new(),
            Some(Value::String(t)) if items.len() == 1 => text(t)?,
            Some(Value::String(_)) if items.iter().all(Value::is_string) => {
                return Err(one_only());
            }
            Some(Value::Array(inner)) if items.len() == 1 => token_ids(inner, vocab)?,
            Some(Value::Array(_)) if items.iter().all(Value::is_array) => {
                return Err(one_only());
            }
            Some(_) => token_ids(items, vocab)?,
        },
        _ => {
            return Err(ApiError::invalid(
                "`prompt` must be a string, a list of strings or a list of token ids",
                Some(PARAM),
            ));
        }
    };
    if ids.is_empty() {
        return Err(ApiError::invalid("`prompt` must not be empty", Some(PARAM)));
    }
    Ok(ids)
}
