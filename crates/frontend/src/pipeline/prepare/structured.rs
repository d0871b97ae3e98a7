//! Structured output fields → the grammar every choice follows.
//!
//! OpenAI's `response_format` (`text`, `json_object`, `json_schema`), vLLM's `guided_json`,
//! `guided_regex`, `guided_choice` and `guided_grammar` (Lark, llguidance's dialect), and
//! the same four inside Dynamo's `nvext`. At most one may be set. The grammar is compiled
//! here, against the model's vocabulary, so that a schema llguidance cannot compile is a 400
//! naming the field before any worker sees it; the engine compiles it again per choice.

use crate::error::ApiError;
use serde_json::Value;
use tandem_protocols::llm::GuidedDecoding;
use tandem_protocols::openai::{CommonParams, ResponseFormat};
use tandem_structured::{GuideError, Guides};

/// The request's grammar, if it asks for one, with the field that asked.
pub fn guided(p: &CommonParams) -> Result<Option<(GuidedDecoding, String)>, ApiError> {
    let ext = p.nvext.clone().unwrap_or_default();
    let mut found: Vec<(GuidedDecoding, String)> = Vec::new();
    if let Some(f) = &p.response_format
        && let Some(g) = response_format(f)?
    {
        let param = match g {
            GuidedDecoding::JsonSchema(_) => "response_format.json_schema.schema",
            _ => "response_format",
        };
        found.push((g, param.into()));
    }
    for (prefix, json, regex, choice, grammar) in [
        (
            "",
            &p.guided_json,
            &p.guided_regex,
            &p.guided_choice,
            &p.guided_grammar,
        ),
        (
            "nvext.",
            &ext.guided_json,
            &ext.guided_regex,
            &ext.guided_choice,
            &ext.guided_grammar,
        ),
    ] {
        if let Some(v) = json {
            let param = format!("{prefix}guided_json");
            found.push((GuidedDecoding::JsonSchema(schema_value(v, &param)?), param));
        }
        if let Some(r) = regex {
            found.push((
                GuidedDecoding::Regex(r.clone()),
                format!("{prefix}guided_regex"),
            ));
        }
        if let Some(c) = choice {
            found.push((
                GuidedDecoding::Choice(c.clone()),
                format!("{prefix}guided_choice"),
            ));
        }
        if let Some(g) = grammar {
            found.push((
                GuidedDecoding::Grammar(g.clone()),
                format!("{prefix}guided_grammar"),
            ));
        }
    }
    if found.len() > 1 {
        return Err(ApiError::invalid(
            format!(
                "only one structured-output field may be set; got `{}` and `{}`",
                found[0].1, found[1].1
            ),
            Some(&found[1].1),
        ));
    }
    Ok(found.pop())
}

/// `response_format`: its `type` and, for `json_schema`, the `json_schema` object with its
/// `name` and `schema` (OpenAI's shape; `strict` is always honoured: the grammar is exact).
fn response_format(f: &ResponseFormat) -> Result<Option<GuidedDecoding>, ApiError> {
    match f.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(GuidedDecoding::JsonObject)),
        "json_schema" => {
            let param = "response_format.json_schema";
            let js = f
                .rest
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| ApiError::invalid("`json_schema` must be an object", Some(param)))?;
            match js.get("name") {
                Some(Value::String(n)) if valid_name(n) => {}
                _ => {
                    return Err(ApiError::invalid(
                        "`json_schema.name` must be a string of a-z, A-Z, 0-9, '_' and '-', at most 64 characters",
                        Some("response_format.json_schema.name"),
                    ));
                }
            }
            if let Some(s) = js.get("strict")
                && !s.is_boolean()
                && !s.is_null()
            {
                return Err(ApiError::invalid(
                    "`json_schema.strict` must be a boolean",
                    Some("response_format.json_schema.strict"),
                ));
            }
            let schema = js.get("schema").cloned().unwrap_or(Value::Bool(true));
            Ok(Some(GuidedDecoding::JsonSchema(schema_value(
                &schema,
                "response_format.json_schema.schema",
            )?)))
        }
        other => Err(ApiError::invalid(
            format!(
                "`response_format.type` must be one of \"text\", \"json_object\", \"json_schema\"; got {other:?}"
            ),
            Some("response_format.type"),
        )),
    }
}

/// OpenAI's rule for schema and function names.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A schema given as an object (or `true`), or as JSON text (vLLM accepts both).
fn schema_value(v: &Value, param: &str) -> Result<Value, ApiError> {
    let v = match v {
        Value::String(text) => serde_json::from_str(text).map_err(|e| {
            ApiError::invalid(
                format!("the JSON Schema is not valid JSON: {e}"),
                Some(param),
            )
        })?,
        other => other.clone(),
    };
    if v.is_object() || v.is_boolean() {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            "a JSON Schema must be an object",
            Some(param),
        ))
    }
}

/// Compiles `g` against the model's vocabulary: a grammar that does not compile is the
/// client's 400 on `param`.
pub fn check(guides: &Guides, g: &GuidedDecoding, param: &str) -> Result<(), ApiError> {
    guides.check(g).map_err(|e| match e {
        GuideError::Invalid(msg) => ApiError::invalid(
            format!("`{param}` cannot be used for structured output: {msg}"),
            Some(param),
        ),
        GuideError::Vocabulary(_) => ApiError::unsupported(param, &format!("({e})")),
    })
}
