//! `tools`, `tool_choice`, `parallel_tool_calls` → what the template sees, how the output is
//! read, and the grammar that forces a call.
//!
//! - `none` (or no tools): the template sees no tools and the output is text.
//! - `auto` (the default with tools): the template sees the tools and the model's own format
//!   is parsed from its text — which needs the worker's `--dyn-tool-call-parser`; without one
//!   `auto` is refused (as vLLM does without `--tool-call-parser`), since the calls could not
//!   be read back.
//! - `required`: the output is forced by a grammar to be a JSON list of calls
//!   (`[{"name", "parameters"}]`, one unless `parallel_tool_calls`), each `parameters`
//!   following its function's schema.
//! - a named function: the output is forced to be that function's arguments object.
//!
//! Forced calls need no parser and no template support: even a model never trained on tools
//! returns well-formed calls.

use super::structured::valid_name;
use crate::error::ApiError;
use serde_json::{Map, Value, json};
use tandem_preprocessor::tools::{ToolCallParser, ToolMode};
use tandem_protocols::llm::GuidedDecoding;
use tandem_protocols::openai::ChatFields;

/// What the tool fields ask for.
#[derive(Debug, Default, PartialEq)]
pub struct ToolPlan {
    /// The tools as the chat template receives them, when the model should see them.
    pub template_tools: Option<Value>,
    pub mode: Option<ToolMode>,
    /// The grammar forcing the call (`required` and named choices).
    pub guide: Option<GuidedDecoding>,
}

/// One function a request offers.
struct Function {
    name: String,
    parameters: Value,
}

pub fn plan(chat: &ChatFields, parser: Option<ToolCallParser>) -> Result<ToolPlan, ApiError> {
    let tools = chat.tools.clone().unwrap_or_default();
    let functions = functions(&tools)?;
    let choice = choice(chat.tool_choice.as_ref(), &functions)?;
    let parallel = chat.parallel_tool_calls.unwrap_or(true);
    let offered = Some(Value::Array(tools));
    Ok(match choice {
        Choice::None => ToolPlan::default(),
        Choice::Auto => {
            let Some(parser) = parser else {
                return Err(ApiError::unsupported(
                    "tool_choice",
                    "\"auto\" (the default when `tools` are given) needs the model's tool-call parser (workers started with --dyn-tool-call-parser), so it",
                ));
            };
            ToolPlan {
                template_tools: offered,
                mode: Some(ToolMode::Auto { parser, parallel }),
                guide: None,
            }
        }
        Choice::Required => ToolPlan {
            template_tools: offered,
            mode: Some(ToolMode::Required),
            guide: Some(GuidedDecoding::JsonSchema(required_schema(
                &functions, parallel,
            ))),
        },
        Choice::Named(i) => ToolPlan {
            template_tools: offered,
            mode: Some(ToolMode::Named(functions[i].name.clone())),
            guide: Some(GuidedDecoding::JsonSchema(functions[i].parameters.clone())),
        },
    })
}

/// Checks each tool's shape; its parameters schema (an empty object schema when absent).
fn functions(tools: &[Value]) -> Result<Vec<Function>, ApiError> {
    let mut out: Vec<Function> = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        let kind = t.get("type").and_then(Value::as_str);
        if kind != Some("function") {
            return Err(match kind {
                Some(k) => ApiError::unsupported(&format!("{param}.type"), &format!("{k:?}")),
                None => ApiError::invalid("a tool needs `type: \"function\"`", Some(&param)),
            });
        }
        let f = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                ApiError::invalid(
                    "a tool needs a `function` object",
                    Some(&format!("{param}.function")),
                )
            })?;
        let name = match f.get("name") {
            Some(Value::String(n)) if valid_name(n) => n.clone(),
            _ => {
                return Err(ApiError::invalid(
                    "a function name must be a string of a-z, A-Z, 0-9, '_' and '-', at most 64 characters",
                    Some(&format!("{param}.function.name")),
                ));
            }
        };
        if out.iter().any(|o| o.name == name) {
            return Err(ApiError::invalid(
                format!("two tools are named {name:?}"),
                Some(&format!("{param}.function.name")),
            ));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    "`parameters` must be a JSON Schema object",
                    Some(&format!("{param}.function.parameters")),
                ));
            }
        };
        out.push(Function { name, parameters });
    }
    Ok(out)
}

enum Choice {
    None,
    Auto,
    Required,
    /// Index into the functions.
    Named(usize),
}

fn choice(v: Option<&Value>, functions: &[Function]) -> Result<Choice, ApiError> {
    let param = Some("tool_choice");
    let c = match v {
        None | Some(Value::Null) if functions.is_empty() => Choice::None,
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "`tool_choice` must be \"none\", \"auto\", \"required\" or a function; got {other:?}"
                    ),
                    param,
                ));
            }
        },
        Some(Value::Object(o)) => named(o, functions)?,
        Some(_) => {
            return Err(ApiError::invalid(
                "`tool_choice` must be a string or an object",
                param,
            ));
        }
    };
    if functions.is_empty() && !matches!(c, Choice::None) {
        return Err(ApiError::invalid("`tool_choice` needs `tools`", param));
    }
    Ok(c)
}

fn named(o: &Map<String, Value>, functions: &[Function]) -> Result<Choice, ApiError> {
    match o.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(ApiError::unsupported(
                "tool_choice.type",
                &format!("{other:?}"),
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "`tool_choice` needs `type: \"function\"`",
                Some("tool_choice.type"),
            ));
        }
    }
    let name = o
        .get("function")
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::invalid(
                "`tool_choice.function.name` must be a string",
                Some("tool_choice.function.name"),
            )
        })?;
    functions
        .iter()
        .position(|f| f.name == name)
        .map(Choice::Named)
        .ok_or_else(|| {
            ApiError::invalid(
                format!("`tool_choice` names {name:?}, which is not among `tools`"),
                Some("tool_choice.function.name"),
            )
        })
}

/// A list of calls to the offered functions, each with its own parameters schema.
fn required_schema(functions: &[Function], parallel: bool) -> Value {
    let calls: Vec<Value> = functions
        .iter()
        .map(|f| {
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                "required": ["name", "parameters"],
                "additionalProperties": false
            })
        })
        .collect();
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(tools: Value, choice: Option<Value>, parallel: Option<bool>) -> ChatFields {
        ChatFields {
            messages: vec![],
            logprobs: None,
            top_logprobs: None,
            tools: serde_json::from_value(tools).ok(),
            tool_choice: choice,
            parallel_tool_calls: parallel,
        }
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
               {"type": "function", "function": {"name": "now"}}])
    }

    #[test]
    fn each_choice_gets_its_mode_and_grammar() {
        let p = plan(&chat(weather(), None, None), Some(ToolCallParser::Hermes)).unwrap();
        assert_eq!(
            p.mode,
            Some(ToolMode::Auto {
                parser: ToolCallParser::Hermes,
                parallel: true
            })
        );
        assert!(p.guide.is_none() && p.template_tools.is_some());
        let p = plan(&chat(weather(), Some(json!("none")), None), None).unwrap();
        assert_eq!(p, ToolPlan::default());
        let p = plan(&chat(weather(), Some(json!("required")), Some(false)), None).unwrap();
        assert_eq!(p.mode, Some(ToolMode::Required));
        let Some(GuidedDecoding::JsonSchema(s)) = p.guide else {
            panic!()
        };
        assert_eq!(s["maxItems"], 1);
        assert_eq!(
            s["items"]["anyOf"][0]["properties"]["name"]["const"],
            "get_weather"
        );
        assert_eq!(
            s["items"]["anyOf"][1]["properties"]["parameters"]["type"],
            "object"
        );
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let p = plan(&chat(weather(), Some(named), None), None).unwrap();
        assert_eq!(p.mode, Some(ToolMode::Named("get_weather".into())));
        let Some(GuidedDecoding::JsonSchema(s)) = p.guide else {
            panic!()
        };
        assert_eq!(s["required"][0], "city");
    }

    #[test]
    fn bad_tool_fields_name_the_field() {
        let cases: Vec<(ChatFields, &str)> = vec![
            (chat(weather(), None, None), "tool_choice"),
            (
                chat(json!([]), Some(json!("required")), None),
                "tool_choice",
            ),
            (
                chat(weather(), Some(json!("sometimes")), None),
                "tool_choice",
            ),
            (
                chat(
                    weather(),
                    Some(json!({"type": "function", "function": {"name": "nope"}})),
                    None,
                ),
                "tool_choice.function.name",
            ),
            (
                chat(json!([{"type": "web_search"}]), None, None),
                "tools[0].type",
            ),
            (
                chat(
                    json!([{"type": "function", "function": {"name": "a b"}}]),
                    None,
                    None,
                ),
                "tools[0].function.name",
            ),
            (
                chat(
                    json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                    None,
                    None,
                ),
                "tools[0].function.parameters",
            ),
            (
                chat(
                    json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                    None,
                    None,
                ),
                "tools[1].function.name",
            ),
        ];
        for (c, param) in cases {
            let e = plan(&c, None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
            assert!(e.status.is_client_error());
        }
    }
}
