//! The request pipeline, one stage per file, between the HTTP layer and the request plane:
//!
//! ```text
//! JSON body ─▶ prepare ─▶ prefill ─▶ route ─▶ execute (request plane ⇄ worker) ─▶ postprocess ─▶ GenEvents
//! ```
//!
//! - [`prepare`]: OpenAI request → validated engine request (fields, ranges, template,
//!   tokens, context length). Pure.
//! - [`prefill`]: with prefill workers, the prefill leg on one of them (span
//!   `prefill_routing`); its transfer parameters go on the decode request.
//! - [`route`]: the worker: the client's pick, the session's, the KV router's, the least
//!   loaded ([`balance`]), or round-robin / random.
//! - [`execute`]: the typed call to the worker and the request's metrics; errors keep their
//!   class from the worker to here. A worker that fails a request another could finish
//!   hands it over ([`migrate`]); the request's streams are its [`legs`].
//! - [`postprocess`]: per-choice detokenization and stop strings; a choice a stop string ends
//!   is stopped on the worker. Pure.
//!
//! The HTTP layer (`crate::http`) renders the [`GenEvent`]s as SSE chunks or one JSON body.

pub mod balance;
pub mod execute;
pub mod legs;
pub mod migrate;
pub mod postprocess;
pub mod prefill;
pub mod prepare;
pub mod route;
#[cfg(test)]
pub(crate) mod test_model;

use crate::error::ApiError;
use crate::metrics::FrontendMetrics;
use crate::models::{Lookup, ModelManager, ServedModel};
use crate::trace::RequestIds;
use futures::Stream;
pub use postprocess::{GenEvent, TokenLogprobs};
use serde_json::Value;
use std::sync::Arc;

/// The two generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    /// The Responses API, prepared as the chat request it stands for.
    Responses,
}

impl Endpoint {
    /// Dynamo's `endpoint` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Chat => "chat_completions",
            Self::Responses => "responses",
            Self::Completions => "completions",
        }
    }
}

/// A request under way: how to answer, and the events to answer with.
pub struct Generation<S> {
    pub request_id: String,
    /// The model as the client named it.
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub n: u32,
    /// The request asked for logprobs.
    pub logprobs: bool,
    pub events: S,
}

fn find_model(models: &ModelManager, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    match models.lookup(name) {
        Lookup::Ready(m) => Ok(m),
        Lookup::Gone => Err(ApiError::unavailable(format!(
            "no worker is serving model `{name}` right now"
        ))),
        Lookup::Unknown => Err(ApiError::model_not_found(name)),
    }
}

/// Runs `prepare` and starts the rest; an error here is the client's answer and nothing
/// reached a worker.
pub fn start(
    models: &ModelManager,
    metrics: Arc<FrontendMetrics>,
    endpoint: Endpoint,
    body: &Value,
    ids: RequestIds,
) -> Result<Generation<impl Stream<Item = Result<GenEvent, ApiError>> + Send + use<>>, ApiError> {
    let translated;
    let body = match endpoint {
        Endpoint::Responses => {
            translated = prepare::responses::to_chat(body)?;
            &translated
        }
        _ => body,
    };
    let common = prepare::common(body)?;
    let model = find_model(models, &common.model)?;
    let view = prepare::ModelView {
        name: &model.name,
        preprocessor: &model.preprocessor,
        context_length: model.card.context_length,
        guides: model.guides.as_ref(),
        tool_parser: model.tool_call_parser(),
    };
    let mut p = match endpoint {
        Endpoint::Chat | Endpoint::Responses => prepare::chat(&view, body, &common)?,
        Endpoint::Completions => prepare::completion(&view, body, &common)?,
    };
    p.session = ids.session_id.clone();
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    Ok(Generation {
        request_id: request_id.clone(),
        model: common.model,
        stream: p.stream,
        include_usage: p.include_usage,
        n: p.n(),
        logprobs: p.request.output_options.logprobs.is_some(),
        events: execute::generate(
            metrics,
            model,
            models.exec.clone(),
            p,
            endpoint.label(),
            ids,
            request_id,
        ),
    })
}
