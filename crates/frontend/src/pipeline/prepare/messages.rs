//! Chat messages: each checked against what OpenAI requires of its role, then flattened into
//! the JSON values chat templates expect (`role`, string `content`, and `name`,
//! `tool_calls`, `tool_call_id` when present). An assistant message's calls reach the
//! template with their `arguments` as an object, as HF templates (Qwen, Llama, Mistral)
//! expect: OpenAI sends them as JSON text.

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
                v.insert("tool_calls".into(), template_calls(calls, i)?);
            }
            if let Some(id) = &m.tool_call_id {
                v.insert("tool_call_id".into(), id.clone().into());
            }
            Ok(Value::Object(v))
        })
        .collect()
}

/// An assistant message's `tool_calls`, checked (a list of function calls whose
/// `arguments` is a JSON object or its text), with `arguments` as an object.
fn template_calls(calls: &Value, i: usize) -> Result<Value, ApiError> {
    let param = format!("messages[{i}].tool_calls");
    let list = calls
        .as_array()
        .ok_or_else(|| ApiError::invalid("`tool_calls` must be a list", Some(&param)))?;
    let mut out = Vec::new();
    for (j, call) in list.iter().enumerate() {
        let bad = |what: &str| {
            ApiError::invalid(
                format!("a tool call needs {what}"),
                Some(&format!("{param}[{j}]")),
            )
        };
        let mut call = call
            .as_object()
            .cloned()
            .ok_or_else(|| bad("to be an object"))?;
        let function = call
            .get_mut("function")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| bad("a `function` object"))?;
        if !function.get("name").is_some_and(Value::is_string) {
            return Err(bad("a `function.name` string"));
        }
        let args = match function.get("arguments") {
            Some(Value::String(text)) => serde_json::from_str::<Value>(text)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| bad("`function.arguments` holding a JSON object"))?,
            Some(v @ Value::Object(_)) => v.clone(),
            _ => return Err(bad("`function.arguments`")),
        };
        function.insert("arguments".into(), args);
        out.push(Value::Object(call));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(v: Value) -> ChatMessage {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn tool_call_arguments_reach_the_template_as_objects() {
        let m = msg(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"city\": \"Paris\"}"}}]}));
        let t = msg(json!({"role": "tool", "tool_call_id": "call_1", "content": "20C"}));
        let out = template_messages(&[m, t]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            out[0]["tool_calls"][0]["function"]["arguments"]["city"],
            "Paris"
        );
        assert_eq!(out[0]["content"], "");
        assert_eq!(out[1]["tool_call_id"], "call_1");
        let bad = msg(
            json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}),
        );
        let e = template_messages(&[bad]).err().map(|e| e.param);
        assert_eq!(e, Some(Some("messages[0].tool_calls[0]".to_string())));
    }
}
