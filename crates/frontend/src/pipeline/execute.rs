//! Stage 3, the request plane: the prepared request goes to the routed worker and its outputs
//! come back through `postprocess` as [`GenEvent`]s.
//!
//! The stream runs inside the request's `http-request` span (the worker call joins the trace)
//! and keeps the request's metrics ([`RequestGuard`]): every way it can end — all choices
//! finished, a worker error (with its class), the client gone — is counted once. A choice that
//! a stop string ended is stopped on the worker at once with a `stop_choice` control message.

use super::postprocess::{GenEvent, Postprocessor};
use super::prefill::prefill;
use super::prepare::Prepared;
use super::route::route;
use crate::config::DisaggConfig;
use crate::error::ApiError;
use crate::metrics::{FrontendMetrics, RequestGuard};
use crate::models::ServedModel;
use crate::trace::RequestIds;
use async_stream::stream;
use futures::{Stream, StreamExt};
use std::sync::Arc;
use tandem_protocols::llm::{EngineOutput, GenerateControl};
use tandem_runtime::{RequestOptions, TypedStream};
use tracing::Instrument;

/// Counts a client that went away before its response was complete.
struct DisconnectGuard<'a> {
    metrics: &'a FrontendMetrics,
    done: bool,
}

impl Drop for DisconnectGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.disconnected.inc();
        }
    }
}

/// One request to one worker. Call it inside the request's `http-request` span; the per-token
/// loop does not enter the span (entering costs time on every token and the loop logs nothing).
pub fn generate(
    metrics: Arc<FrontendMetrics>,
    model: Arc<ServedModel>,
    disagg: DisaggConfig,
    mut p: Prepared,
    endpoint: &'static str,
    ids: RequestIds,
    request_id: String,
) -> impl Stream<Item = Result<GenEvent, ApiError>> + Send + 'static {
    let span = tracing::Span::current();
    span.record("request_id", request_id.as_str());
    span.record("model", model.name.as_str());
    record_gen_ai_request(&span, &model.name, endpoint, &p);
    stream! {
        let mut guard = RequestGuard::new(&metrics, &model.name, endpoint, p.stream, span.clone());
        let prompt_tokens = p.request.token_ids.len();
        guard.input_tokens(prompt_tokens);
        let mut disconnect = DisconnectGuard { metrics: &metrics, done: false };
        let mut post = Postprocessor::new(&model.preprocessor, p.n(), &p.stops, prompt_tokens);
        let mut finish_reasons: Vec<String> = Vec::new();
        let opts = RequestOptions { id: Some(request_id), headers: ids.headers() };
        let prefilled = prefill(&model, disagg, &p, opts.clone(), &span, &metrics).await;
        let upstream = match prefilled.and_then(|r| {
            let (result, held) = r.unzip();
            p.request.prefill_result = result;
            route(&model, &p, &span).map(|route| (route, held))
        }) {
            Ok((route, held)) => {
                let call = model.client.call(route.mode(), &p.request, opts);
                let called = call.instrument(span.clone()).await;
                // The decode worker has it: the held blocks are its to fetch. Otherwise
                // `held` drops here and frees them on the prefill worker.
                if let (Ok(_), Some(held)) = (&called, held) {
                    held.handed_over();
                }
                called.map(|s| (s, route)).map_err(ApiError::from)
            }
            Err(e) => Err(e),
        };
        let (mut upstream, mut route): (TypedStream<EngineOutput>, _) = match upstream {
            Ok(u) => u,
            Err(e) => {
                guard.fail(&e);
                disconnect.done = true;
                yield Err(e);
                return;
            }
        };
        while let Some(item) = upstream.next().await {
            let out = match item {
                Ok(out) => out,
                Err(e) => {
                    let e = ApiError::from(e);
                    guard.fail(&e);
                    disconnect.done = true;
                    yield Err(e);
                    return;
                }
            };
            route.prefill_done();
            let step = post.push(out);
            guard.tokens(step.tokens, prompt_tokens);
            // When it was the last open choice, ending the stream below cancels the request.
            if let Some(index) = step.stop_choice.filter(|_| !post.all_finished())
                && !upstream.control(&GenerateControl::StopChoice { index }).await
            {
                tracing::debug!(index, "stop_choice not sent: the request has ended");
            }
            for ev in step.events {
                if let GenEvent::Finish { reason, .. } = &ev {
                    finish_reasons.push(reason.to_string());
                }
                yield Ok(ev);
            }
            if post.all_finished() {
                break;
            }
        }
        if !post.all_finished() {
            let e = ApiError::internal("worker stream ended before every choice finished");
            guard.fail(&e);
            disconnect.done = true;
            yield Err(e);
            return;
        }
        span.record(
            "gen_ai.response.finish_reasons",
            serde_json::to_string(&finish_reasons).unwrap_or_default().as_str(),
        );
        guard.ok();
        disconnect.done = true;
        yield Ok(GenEvent::Usage(post.usage()));
    }
}

/// The GenAI semantic-convention attributes known before the worker is called.
fn record_gen_ai_request(span: &tracing::Span, model: &str, endpoint: &str, p: &Prepared) {
    let operation = if endpoint == "chat_completions" {
        "chat"
    } else {
        "text_completion"
    };
    span.record("gen_ai.operation.name", operation);
    span.record("gen_ai.request.model", model);
    if let Some(m) = p.request.stop.max_tokens {
        span.record("gen_ai.request.max_tokens", u64::from(m));
    }
    if let Some(t) = p.request.sampling.temperature {
        span.record("gen_ai.request.temperature", f64::from(t));
    }
}

/// Gathers a whole generation for a unary response: text and finish reason per choice, usage.
pub async fn collect(
    events: impl Stream<Item = Result<GenEvent, ApiError>>,
    n: u32,
) -> Result<
    (
        Vec<String>,
        Vec<Option<String>>,
        tandem_protocols::openai::Usage,
    ),
    ApiError,
> {
    let mut texts = vec![String::new(); n as usize];
    let mut reasons: Vec<Option<String>> = vec![None; n as usize];
    let mut usage = Default::default();
    let mut events = std::pin::pin!(events);
    while let Some(ev) = events.next().await {
        match ev? {
            GenEvent::Text { index, text } => texts[index as usize].push_str(&text),
            GenEvent::Finish { index, reason } => reasons[index as usize] = Some(reason.into()),
            GenEvent::Usage(u) => usage = u,
        }
    }
    Ok((texts, reasons, usage))
}
