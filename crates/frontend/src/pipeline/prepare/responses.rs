//! `POST /v1/responses` (OpenAI's Responses API) → the chat request it stands for, so that a
//! response runs the same stages as a chat completion (template, tools, structured output,
//! reasoning split) and only its rendering differs (`crate::http::responses`).
//!
//! Text and function tools: `input` as a string or a list of messages (`input_text` /
//! `output_text` parts), `function_call` and `function_call_output` items; `instructions` as
//! a system message; `tools` of type `function`; `text.format` as `response_format`. What a
//! stateless server cannot do — `previous_response_id`, `store: true`, `background`,
//! `conversation` — and what tandem does not have (built-in tools, `reasoning` effort,
//! `include`) is refused by name.

use crate::error::ApiError;
use serde_json::{Map, Value, json};

/// Fields the translation reads.
const READ: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "user",
];

/// Accepted and not read: they change nothing a stateless server computes.
const ACCEPTED: &[&str] = &[
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "truncation",
];

/// Refused unless off: (name, the values that mean "not used").
const REFUSED: &[(&str, &[&str])] = &[
    ("previous_response_id", &[]),
    ("conversation", &[]),
    ("store", &["false"]),
    ("background", &["false"]),
    ("reasoning", &[]),
    ("include", &["[]"]),
    ("top_logprobs", &["0"]),
    ("prompt", &[]),
    ("max_tool_calls", &[]),
    ("stream_options", &[]),
];

/// The chat body for a Responses body.
pub fn to_chat(body: &Value) -> Result<Value, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("the request body must be a JSON object", None))?;
    for (key, value) in obj {
        let key = key.as_str();
        if value.is_null() || READ.contains(&key) || ACCEPTED.contains(&key) {
            continue;
        }
        match REFUSED.iter().find(|(k, _)| *k == key) {
            Some((_, off)) if off.contains(&value.to_string().as_str()) => {}
            Some(_) => return Err(ApiError::unsupported(key, "is set, but")),
            None => tracing::debug!(field = key, "ignoring a request field no API defines"),
        }
    }
    let mut chat = Map::new();
    for (from, to) in [
        ("model", "model"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("user", "user"),
        ("max_output_tokens", "max_completion_tokens"),
    ] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    let mut messages = Vec::new();
    if let Some(i) = obj.get("instructions").filter(|v| !v.is_null()) {
        let text = i.as_str().ok_or_else(|| {
            ApiError::invalid("`instructions` must be a string", Some("instructions"))
        })?;
        messages.push(json!({"role": "system", "content": text}));
    }
    messages.extend(input(obj.get("input"))?);
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = obj.get("tools").filter(|v| !v.is_null()) {
        chat.insert("tools".into(), self::tools(tools)?);
    }
    if let Some(c) = obj.get("tool_choice").filter(|v| !v.is_null()) {
        chat.insert("tool_choice".into(), tool_choice(c)?);
    }
    if let Some(f) = obj
        .get("text")
        .and_then(|t| t.get("format"))
        .filter(|v| !v.is_null())
    {
        chat.insert("response_format".into(), format(f)?);
    }
    Ok(Value::Object(chat))
}

/// `input`: a string (one user message) or a list of items.
fn input(v: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(vec![json!({"role": "user", "content": s})]),
        // A `reasoning` item (an earlier response's output, sent back as a stateless client
        // does) is not part of the prompt: chat templates drop past thinking too.
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter(|(_, item)| item.get("type").and_then(Value::as_str) != Some("reasoning"))
            .map(|(i, item)| input_item(item, &format!("input[{i}]")))
            .collect(),
        None | Some(Value::Null) => Err(ApiError::invalid("`input` is required", Some("input"))),
        Some(_) => Err(ApiError::invalid(
            "`input` must be a string or a list of items",
            Some("input"),
        )),
    }
}

fn input_item(item: &Value, param: &str) -> Result<Value, ApiError> {
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    let field = |name: &str| -> Result<&str, ApiError> {
        item.get(name).and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(
                format!("a {kind} item needs a string `{name}`"),
                Some(&format!("{param}.{name}")),
            )
        })
    };
    match kind {
        "message" => {
            let role = field("role")?;
            let content = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts_text(parts, &format!("{param}.content"))?,
                _ => {
                    return Err(ApiError::invalid(
                        "a message needs `content`",
                        Some(&format!("{param}.content")),
                    ));
                }
            };
            Ok(json!({"role": role, "content": content}))
        }
        "function_call" => Ok(json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": field("call_id")?,
                "type": "function",
                "function": {"name": field("name")?, "arguments": field("arguments")?}
            }]
        })),
        "function_call_output" => Ok(json!({
            "role": "tool",
            "tool_call_id": field("call_id")?,
            "content": field("output")?,
        })),
        other => Err(ApiError::unsupported(
            &format!("{param}.type"),
            &format!("{other:?}"),
        )),
    }
}

/// A message's content parts: text ones joined.
fn parts_text(parts: &[Value], param: &str) -> Result<String, ApiError> {
    let mut out = String::new();
    for (i, p) in parts.iter().enumerate() {
        match (
            p.get("type").and_then(Value::as_str),
            p.get("text").and_then(Value::as_str),
        ) {
            (Some("input_text" | "output_text" | "text"), Some(t)) => out.push_str(t),
            (Some(kind), _) => {
                return Err(ApiError::unsupported(
                    &format!("{param}[{i}]"),
                    &format!("of type {kind:?}"),
                ));
            }
            _ => {
                return Err(ApiError::invalid(
                    "a content part needs `type` and `text`",
                    Some(&format!("{param}[{i}]")),
                ));
            }
        }
    }
    Ok(out)
}

/// Responses tools (`{type: "function", name, parameters, …}`) as chat tools.
fn tools(v: &Value) -> Result<Value, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| ApiError::invalid("`tools` must be a list", Some("tools")))?;
    let out = list
        .iter()
        .enumerate()
        .map(|(i, t)| match t.get("type").and_then(Value::as_str) {
            Some("function") => {
                let mut f = t.as_object().cloned().unwrap_or_default();
                f.remove("type");
                Ok(json!({"type": "function", "function": f}))
            }
            Some(other) => Err(ApiError::unsupported(
                &format!("tools[{i}].type"),
                &format!("{other:?}"),
            )),
            None => Err(ApiError::invalid(
                "a tool needs `type`",
                Some(&format!("tools[{i}]")),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(out))
}

/// `{type: "function", name}` → chat's `{type: "function", function: {name}}`.
fn tool_choice(v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::String(_) => Ok(v.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o.get("name").cloned().unwrap_or(Value::Null);
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(ApiError::unsupported("tool_choice", &format!("{v}"))),
    }
}

/// `text.format` → `response_format`: `json_schema`'s name, schema and strict sit on the
/// format itself here.
fn format(f: &Value) -> Result<Value, ApiError> {
    match f.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let mut js = f.as_object().cloned().unwrap_or_default();
            js.remove("type");
            Ok(json!({"type": "json_schema", "json_schema": js}))
        }
        Some(_) => Ok(f.clone()),
        None => Err(ApiError::invalid(
            "`text.format` needs `type`",
            Some("text.format"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_responses_body_becomes_its_chat_body() {
        let body = json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "20C"}
            ],
            "max_output_tokens": 20,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "metadata": {"k": "v"},
            "store": false
        });
        let chat = to_chat(&body).unwrap();
        assert!(
            super::super::fields::decode::<tandem_protocols::openai::ChatFields>(&chat).is_ok()
        );
        assert_eq!(chat["max_completion_tokens"], 20);
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(chat["messages"][1]["content"], "Weather in Paris?");
        assert_eq!(
            chat["messages"][2]["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        assert_eq!(chat["messages"][3]["role"], "tool");
        assert_eq!(chat["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(chat["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(chat["response_format"]["json_schema"]["name"], "w");
        assert_eq!(
            to_chat(&json!({"model": "m", "input": "Hi"})).unwrap()["messages"],
            json!([{"role": "user", "content": "Hi"}])
        );
    }

    #[test]
    fn what_a_stateless_server_cannot_do_is_refused_by_name() {
        for (field, value) in [
            ("previous_response_id", json!("resp_1")),
            ("store", json!(true)),
            ("background", json!(true)),
            ("reasoning", json!({"effort": "low"})),
            ("include", json!(["reasoning.encrypted_content"])),
        ] {
            let mut body = json!({"model": "m", "input": "Hi"});
            body[field] = value;
            let e = to_chat(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field));
        }
        let e = to_chat(&json!({"model": "m"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
        let back = json!({"model": "m", "input": [
            {"role": "user", "content": "Hi"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
            {"role": "user", "content": "Again"}]});
        let chat = to_chat(&back).unwrap();
        assert_eq!(
            chat["messages"].as_array().unwrap().len(),
            3,
            "reasoning items dropped"
        );
        assert_eq!(
            chat["messages"][1],
            json!({"role": "assistant", "content": "Hello"})
        );
        let e =
            to_chat(&json!({"model": "m", "input": [{"type": "web_search_call"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].type"));
        let e = to_chat(&json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].type"));
    }
}
