//! Stage 1, `prepare`: an OpenAI request body → a validated engine request.
//!
//! Pure: it reads the JSON body and the model's preprocessor and context length, nothing on
//! the network. In order: field inventory ([`fields`]: unimplemented fields refused by name,
//! unknown ones logged), typed decoding (a wrongly typed value names its path), the
//! endpoint's own fields, sampling and length ranges ([`params`]), tools ([`tools`]) and
//! structured output ([`structured`]: the grammar compiled here, so a bad schema is a 400),
//! chat messages through the template ([`messages`]) or the completions prompt ([`prompt`])
//! into token ids, and the context-length arithmetic. Every refusal is an [`ApiError`] with
//! OpenAI's `param`.

pub mod fields;
#[cfg(test)]
mod fuzz;
pub mod messages;
pub mod params;
pub mod prompt;
pub mod responses;
pub mod structured;
#[cfg(test)]
mod tests;
pub mod tools;

use crate::error::ApiError;
use serde_json::Value;
use tandem_preprocessor::Preprocessor;
use tandem_preprocessor::tools::{ToolCallParser, ToolMode};
use tandem_protocols::llm::{GuidedDecoding, OutputOptions, PreprocessedRequest, StopConditions};
use tandem_protocols::openai::{ChatFields, CommonParams, CompletionFields};
use tandem_structured::Guides;

/// What `prepare` needs to know of the model.
pub struct ModelView<'a> {
    pub name: &'a str,
    pub preprocessor: &'a Preprocessor,
    pub context_length: u32,
    /// Compiles structured-output grammars against the model's vocabulary.
    pub guides: &'a Guides,
    /// The workers' `--dyn-tool-call-parser`.
    pub tool_parser: Option<ToolCallParser>,
}

/// A request ready for routing and the request plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub request: PreprocessedRequest,
    /// Stop strings, applied by `postprocess` (the engine sees only stop token ids).
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// A worker the client asked for (`nvext.backend_instance_id`).
    pub worker: Option<u64>,
    /// How the output is read for tool calls (chat with `tools`).
    pub tools: Option<ToolMode>,
    /// The client's session (`X-Dynamo-Session-ID`), for session affinity.
    pub session: Option<String>,
}

impl Prepared {
    pub fn n(&self) -> u32 {
        self.request.sampling.n
    }
}

/// The body must be a JSON object; its common fields (with `model`) decoded.
pub fn common(body: &Value) -> Result<CommonParams, ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    fields::decode(body)
}

/// `POST /v1/chat/completions`.
pub fn chat(model: &ModelView, body: &Value, common: &CommonParams) -> Result<Prepared, ApiError> {
    if let Some(obj) = body.as_object() {
        fields::check_fields(obj, fields::CHAT)?;
    }
    let chat: ChatFields = fields::decode(body)?;
    let tools = tools::plan(&chat, model.tool_parser)?;
    let logprobs = params::chat_logprobs(chat.logprobs, chat.top_logprobs)?;
    let p = params::params(common)?;
    let guide = match (structured::guided(common)?, tools.guide) {
        (Some((_, field)), Some(_)) => {
            let field = field
                .split('.')
                .next()
                .unwrap_or("response_format")
                .to_string();
            return Err(ApiError::invalid(
                format!("`{field}` cannot be combined with a forced tool call (`tool_choice`)"),
                Some(&field),
            ));
        }
        (Some((g, field)), None) => Some((g, field)),
        (None, Some(g)) => Some((g, "tools".to_string())),
        (None, None) => None,
    };
    let messages = messages::template_messages(&chat.messages)?;
    let invalid = |e: tandem_preprocessor::PreprocessError| {
        ApiError::invalid(e.to_string(), Some("messages"))
    };
    let text = model
        .preprocessor
        .render_chat(&messages, tools.template_tools.as_ref(), true)
        .map_err(invalid)?;
    let ids = model.preprocessor.encode(&text).map_err(invalid)?;
    let mut prepared = finish(model, p, ids, "messages")?;
    prepared.tools = tools.mode;
    outputs(model, &mut prepared, logprobs, guide)?;
    Ok(prepared)
}

/// Logprobs and the grammar, on the engine request; the grammar compiled first.
fn outputs(
    model: &ModelView,
    p: &mut Prepared,
    logprobs: Option<u32>,
    guide: Option<(GuidedDecoding, String)>,
) -> Result<(), ApiError> {
    p.request.output_options = OutputOptions { logprobs };
    if let Some((g, field)) = guide {
        // The grammar's end must end the choice: past it only end-of-sequence may follow.
        if p.request.stop.ignore_eos {
            return Err(ApiError::invalid(
                format!(
                    "`ignore_eos` cannot be combined with structured output (`{field}`): the grammar's end is the choice's end"
                ),
                Some("ignore_eos"),
            ));
        }
        if p.request.stop.min_tokens.is_some_and(|m| m > 0) {
            return Err(ApiError::invalid(
                format!(
                    "`min_tokens` cannot be combined with structured output (`{field}`): the grammar decides the length"
                ),
                Some("min_tokens"),
            ));
        }
        structured::check(model.guides, &g, &field)?;
        p.request.sampling.guided_decoding = Some(g);
    }
    Ok(())
}

/// `POST /v1/completions`.
pub fn completion(
    model: &ModelView,
    body: &Value,
    common: &CommonParams,
) -> Result<Prepared, ApiError> {
    if let Some(obj) = body.as_object() {
        fields::check_fields(obj, fields::COMPLETION)?;
    }
    let c: CompletionFields = fields::decode(body)?;
    completion_fields(&c, common.n.unwrap_or(1))?;
    let p = params::params(common)?;
    let guide = structured::guided(common)?;
    let ids = prompt::prompt_ids(&c.prompt, model.preprocessor)?;
    let mut prepared = finish(model, p, ids, "prompt")?;
    outputs(model, &mut prepared, c.logprobs, guide)?;
    Ok(prepared)
}

/// Completions' own fields: checked against OpenAI's ranges; those not implemented refused.
fn completion_fields(c: &CompletionFields, n: u32) -> Result<(), ApiError> {
    if let Some(l) = c.logprobs
        && l > 5
    {
        return Err(ApiError::invalid(
            format!("`logprobs` must be between 0 and 5, got {l}"),
            Some("logprobs"),
        ));
    }
    if let Some(b) = c.best_of {
        if b > 20 || b < n {
            return Err(ApiError::invalid(
                format!("`best_of` must be between `n` ({n}) and 20, got {b}"),
                Some("best_of"),
            ));
        }
        if b > 1 {
            return Err(ApiError::unsupported("best_of", "above 1"));
        }
    }
    if c.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "is true, but"));
    }
    if c.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "is set, but"));
    }
    Ok(())
}

/// Context-length arithmetic and the engine request. `param` names the prompt's field.
fn finish(
    model: &ModelView,
    p: params::Params,
    token_ids: Vec<u32>,
    param: &str,
) -> Result<Prepared, ApiError> {
    let context = model.context_length as usize;
    if token_ids.len() >= context {
        return Err(ApiError::context_too_long(
            format!(
                "This model's maximum context length is {context} tokens. However, your prompt has {} tokens.",
                token_ids.len()
            ),
            param,
        ));
    }
    let room = (context - token_ids.len()) as u32;
    if let Some(m) = p.max_tokens
        && m > room
    {
        return Err(ApiError::context_too_long(
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the prompt, {m} for the completion).",
                token_ids.len() + m as usize,
                token_ids.len()
            ),
            param,
        ));
    }
    let mut stop_token_ids = if p.ignore_eos {
        Vec::new()
    } else {
        model.preprocessor.eos_token_ids().to_vec()
    };
    stop_token_ids.dedup();
    Ok(Prepared {
        request: PreprocessedRequest {
            model: model.name.to_string(),
            token_ids,
            sampling: p.sampling,
            stop: StopConditions {
                max_tokens: Some(p.max_tokens.unwrap_or(room)),
                stop_token_ids,
                ignore_eos: p.ignore_eos,
                min_tokens: p.min_tokens,
            },
            ..Default::default()
        },
        stops: p.stops,
        stream: p.stream,
        include_usage: p.include_usage,
        worker: p.worker,
        tools: None,
        session: None,
    })
}
