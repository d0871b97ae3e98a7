//! Chat messages: each checked against what OpenAI requires of its role, then flattened into
//! the JSON values chat templates expect (`role`, string `content`, and `name`,
//! `tool_calls`, `tool_call_id` when present).

use crate::error::ApiError;
use serde_json::{Map, Value};
use tandem_protocols::openai::{ChatMessage, Role};

/// A message's content as the string templates expect; only text parts are supported.
fn content_text(content: &Value, param: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, part) in parts.iter().enumerate() {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some(kind), _) if kind != "text" => {
                        return Err(ApiError::unsupported(
                            &format!("{param}[{i}]"),
                            &format!("of type {kind:?}"),
                        ));
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            "a text content part needs a string `text`",
                            Some(&format!("{param}[{i}]")),
                        ));
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            "message content must be a string or a list of content parts",
            Some(param),
        )),
    }
}

/// What OpenAI requires of each role: content everywhere but on an assistant message that
/// calls tools, and a `tool_call_id` on tool results.
fn check(m: &ChatMessage, i: usize) -> Result<(), ApiError> {
    let has_content = m.content.as_ref().is_some_and(|c| !c.is_null());
    let needs_content = match m.role {
        Role::Assistant => m.tool_calls.is_none(),
        Role::Function => false,
        _ => true,
    };
    if needs_content && !has_content {
        return Err(ApiError::invalid(
            format!("a {} message needs `content`", m.role.as_str()),
            Some(&format!("messages[{i}].content")),
        ));
    }
    if m.role == Role::Tool && m.tool_call_id.is_none() {
        return Err(ApiError::invalid(
            "a tool message needs `tool_call_id`",
            Some(&format!("messages[{i}].tool_call_id")),
        ));
    }
    Ok(())
}

/// Checks every message and renders them as template input.
pub fn template_messages(messages: &[ChatMessage]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            check(m, i)?;
            let content = match &m.content {
                Some(c) if !c.is_null() => content_text(c, &format!("messages[{i}].content"))?,
                _ => String::new(),
            };
            let mut v = Map::new();
            v.insert("role".into(), m.role.as_str().into());
            v.insert("content".into(), content.into());
            if let Some(name) = &m.name {
                v.insert("name".into(), name.clone().into());
            }
            if let Some(calls) = &m.tool_calls {
                v.insert("tool_calls".into(), calls.clone());
            }
            if let Some(id) = &m.tool_call_id {
                v.insert("tool_call_id".into(), id.clone().into());
            }
            Ok(Value::Object(v))
        })
        .collect()
}
