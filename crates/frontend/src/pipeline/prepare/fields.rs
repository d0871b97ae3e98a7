//! Which request fields exist, which tandem implements, and how a field's value is decoded so
//! that an error names it.
//!
//! Every field OpenAI documents for chat or completions, plus the extensions vLLM and Dynamo
//! users send, is known here. A known field tandem does not implement yet is refused by name
//! when it is used with a value that would need it ([`check_unimplemented`]); a field no API
//! defines is ignored with a debug line, as vLLM does.

use crate::error::ApiError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Fields both endpoints read (decoded as `CommonParams`).
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "stream",
    "stream_options",
    "ignore_eos",
    "min_tokens",
    "logit_bias",
    "user",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "nvext",
];

/// Chat-only fields tandem reads.
pub const CHAT: &[&str] = &[
    "messages",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// Completions-only fields tandem reads.
pub const COMPLETION: &[&str] = &["prompt", "logprobs", "best_of", "echo", "suffix"];

/// Known fields that change nothing tandem computes: accepted and not read.
const ACCEPTED: &[&str] = &[
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
];

/// Known fields whose feature tandem does not have: any value but the "off" one is refused.
/// (name, the values that mean "not used").
const UNIMPLEMENTED: &[(&str, &[&str])] = &[
    ("functions", &[]),
    ("function_call", &["\"none\""]),
    ("audio", &[]),
    ("modalities", &["[\"text\"]"]),
    ("prediction", &[]),
    ("web_search_options", &[]),
    ("reasoning_effort", &[]),
    ("verbosity", &[]),
    ("store", &["false"]),
    // vLLM's extensions tandem does not have yet.
    ("structured_outputs", &[]),
    ("use_beam_search", &["false"]),
    ("include_stop_str_in_output", &["false"]),
    ("skip_special_tokens", &["true"]),
    ("chat_template_kwargs", &["{}"]),
    ("prompt_logprobs", &[]),
    ("allowed_token_ids", &[]),
    ("bad_words", &["[]"]),
    ("stop_token_ids", &["[]"]),
];

/// Refuses known-but-unimplemented fields in use and logs unknown ones. `endpoint_fields` is
/// [`CHAT`] or [`COMPLETION`].
pub fn check_fields(body: &Map<String, Value>, endpoint_fields: &[&str]) -> Result<(), ApiError> {
    for (key, value) in body {
        let key = key.as_str();
        if value.is_null()
            || COMMON.contains(&key)
            || endpoint_fields.contains(&key)
            || ACCEPTED.contains(&key)
        {
            continue;
        }
        if let Some((_, off)) = UNIMPLEMENTED.iter().find(|(k, _)| *k == key) {
            if !off.contains(&value.to_string().as_str()) {
                return Err(ApiError::unsupported(key, "is set, but"));
            }
            continue;
        }
        tracing::debug!(field = key, "ignoring a request field no API defines");
    }
    Ok(())
}

/// Decodes `body` as `T`; a value of the wrong type is an error naming its path.
pub fn decode<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let root = path == "." || path.is_empty();
        let param = match (missing_field(&inner), root) {
            (Some(field), true) => Some(field),
            (Some(field), false) => Some(format!("{path}.{field}")),
            (None, true) => None,
            (None, false) => Some(path),
        };
        match param {
            Some(p) => ApiError::invalid(format!("invalid `{p}`: {inner}"), Some(&p)),
            None => ApiError::invalid(format!("invalid request body: {inner}"), None),
        }
    })
}

/// serde reports a missing field at the enclosing path; the field is named in the message.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}
