//! The worker's request log lines, at info under target [`REQUEST_LOG`] (so the default
//! `DYN_LOG=info` shows them; `DYN_LOG=info,tandem_worker::request=off` hides them): "request
//! accepted" when a generate request starts and "request completed" when its output stream
//! ends — endpoint, model, prompt and output tokens, finish reasons, duration, outcome
//! (`success`, `error`, `cancelled`). Both are written in the request's `handle_payload`
//! span, so a JSONL line carries the request's `trace_id`, `span_id` and `x_request_id`,
//! joinable with the frontend's lines. When the trace is exported, the same numbers also go
//! on the span as OpenTelemetry's GenAI attributes (`gen_ai.usage.*`,
//! `gen_ai.response.finish_reasons`).

use futures::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tandem_engine_api::EngineError;
use tandem_protocols::llm::EngineOutput;

/// The target of the request log lines.
pub const REQUEST_LOG: &str = "tandem_worker::request";

/// The line of a request that arrived; `leg` is `prefill`, `decode` or `aggregated`.
pub fn accepted(endpoint: &str, leg: &'static str, model: &str, prompt_tokens: usize) {
    tracing::info!(
        target: REQUEST_LOG,
        endpoint,
        leg,
        model,
        prompt_tokens,
        "request accepted"
    );
}

/// An output stream that writes the completion line when it ends or is dropped.
pub struct Logged<S> {
    inner: S,
    span: tracing::Span,
    endpoint: String,
    model: String,
    leg: &'static str,
    started: Instant,
    prompt_tokens: usize,
    output_tokens: usize,
    finish_reasons: Vec<String>,
    outcome: Option<&'static str>,
}

impl<S> Logged<S> {
    /// Wraps the request's outputs; call in the request's span.
    pub fn new(
        inner: S,
        endpoint: &str,
        leg: &'static str,
        model: String,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            inner,
            span: tracing::Span::current(),
            endpoint: endpoint.to_string(),
            model,
            leg,
            started: Instant::now(),
            prompt_tokens,
            output_tokens: 0,
            finish_reasons: Vec::new(),
            outcome: None,
        }
    }
}

/// The completion line of a request refused before it produced anything.
pub fn refused(
    endpoint: &str,
    leg: &'static str,
    model: &str,
    prompt_tokens: usize,
    error: &EngineError,
) {
    tracing::info!(
        target: REQUEST_LOG,
        endpoint,
        leg,
        model,
        prompt_tokens,
        output_tokens = 0u64,
        outcome = "error",
        error = %error,
        "request completed"
    );
}

impl<S> Stream for Logged<S>
where
    S: Stream<Item = Result<EngineOutput, EngineError>> + Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = Pin::new(&mut self.inner).poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(out))) => {
                self.output_tokens += out.token_ids.len();
                if let Some(r) = out.finish_reason {
                    self.finish_reasons.push(r.as_openai().to_string());
                }
            }
            Poll::Ready(Some(Err(_))) => self.outcome = Some("error"),
            Poll::Ready(None) => {
                self.outcome.get_or_insert("success");
            }
            Poll::Pending => {}
        }
        item
    }
}

impl<S> Drop for Logged<S> {
    fn drop(&mut self) {
        let span = &self.span;
        let reasons = serde_json::to_string(&self.finish_reasons).unwrap_or_default();
        if tandem_telemetry::propagation::is_exported(span) {
            span.record("gen_ai.usage.output_tokens", self.output_tokens as u64);
            span.record("gen_ai.response.finish_reasons", reasons.as_str());
        }
        tracing::info!(
            target: REQUEST_LOG,
            parent: &self.span,
            endpoint = %self.endpoint,
            leg = self.leg,
            model = %self.model,
            finish_reasons = %reasons,
            prompt_tokens = self.prompt_tokens,
            output_tokens = self.output_tokens,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            outcome = self.outcome.unwrap_or("cancelled"),
            "request completed"
        );
    }
}
