//! The `http-request` span: one per OpenAI request, the root of the request's trace.
//!
//! [`http_request_span`] (an axum middleware on the `/v1` routes) opens it with Dynamo's
//! fields, makes an inbound W3C `traceparent` its parent (a malformed one is ignored), settles
//! the request's `x-request-id` (the client's, or a new UUID) and echoes it on the response.
//! The call to the worker runs inside the span, so the runtime's `client_request` and, through
//! NATS headers, the worker's `handle_payload` join the same trace; `RequestGuard` records
//! tokens, TTFT and the outcome on it when the request ends.
//!
//! Request log lines, at info under target [`REQUEST_LOG`] so that the default `DYN_LOG=info`
//! shows them and `DYN_LOG=info,tandem_frontend::request=off` hides them: "request accepted"
//! when the request arrives and "request completed" when it ends, both inside the span (so a
//! JSONL line carries `trace_id`, `span_id`, `x_request_id`, method and uri). A generation
//! request's completion line comes from its `RequestGuard` (tokens, TTFT, outcome) when the
//! response marks itself [`GuardLogs`]; every other request's comes from here.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing::field::Empty;

/// The ids a request is known by, settled by the middleware and read by the handlers.
#[derive(Debug, Clone)]
pub struct RequestIds {
    /// The client's `x-request-id`, or a new UUID; echoed on the response and sent to workers.
    pub x_request_id: String,
    /// The client's `x-dynamo-request-id`, kept only when it is a UUID (as Dynamo does).
    pub x_dynamo_request_id: Option<String>,
    /// The client's `x-dynamo-session-id`: requests of one session go to one worker while
    /// it lives (`--router-session-affinity-ttl-secs`).
    pub session_id: Option<String>,
}

impl RequestIds {
    fn from_headers(headers: &HeaderMap) -> Self {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            x_request_id: get("x-request-id")
                .filter(|v| !v.is_empty() && v.len() <= 256)
                .map(str::to_string)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            x_dynamo_request_id: get("x-dynamo-request-id")
                .and_then(|v| uuid::Uuid::parse_str(v).ok())
                .map(|u| u.to_string()),
            session_id: get("x-dynamo-session-id")
                .filter(|v| !v.is_empty() && v.len() <= 256)
                .map(str::to_string),
        }
    }

    /// The headers that carry these ids to the worker.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![("x-request-id".to_string(), self.x_request_id.clone())];
        if let Some(d) = &self.x_dynamo_request_id {
            h.push(("x-dynamo-request-id".to_string(), d.clone()));
        }
        h
    }
}

/// The target of the request log lines.
pub const REQUEST_LOG: &str = "tandem_frontend::request";

/// Response extension: this request's `RequestGuard` writes its completion line.
#[derive(Debug, Clone, Copy)]
pub struct GuardLogs;

/// Wraps a request in its `http-request` span.
pub async fn http_request_span(mut req: Request, next: Next) -> Response {
    let ids = RequestIds::from_headers(req.headers());
    let span = tracing::info_span!(
        "http-request",
        otel.kind = "server",
        method = %req.method(),
        uri = %req.uri(),
        version = ?req.version(),
        x_request_id = %ids.x_request_id,
        x_dynamo_request_id = Empty,
        trace_id = Empty,
        parent_id = Empty,
        request_id = Empty,
        model = Empty,
        input_tokens = Empty,
        output_tokens = Empty,
        ttft_ms = Empty,
        avg_itl_ms = Empty,
        request.outcome = Empty,
        // OpenTelemetry's GenAI semantic conventions, for trace UIs that know them.
        gen_ai.operation.name = Empty,
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.temperature = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gen_ai.response.finish_reasons = Empty,
        gen_ai.server.time_to_first_token = Empty,
    );
    let headers = req.headers();
    if let Some(parent) = tandem_telemetry::propagation::set_remote_parent(&span, |k| {
        headers.get(k).and_then(|v| v.to_str().ok())
    }) {
        span.record("parent_id", parent);
    }
    if let Some(t) = tandem_telemetry::propagation::trace_id(&span) {
        span.record("trace_id", t);
    }
    if let Some(d) = &ids.x_dynamo_request_id {
        span.record("x_dynamo_request_id", d.as_str());
    }
    let x_request_id = ids.x_request_id.clone();
    req.extensions_mut().insert(ids);
    let started = std::time::Instant::now();
    tracing::info!(target: REQUEST_LOG, parent: &span, "request accepted");
    let mut resp = next.run(req).instrument(span.clone()).await;
    // Refused before generation (bad input, unknown model, no worker): the request's
    // `RequestGuard` never existed to record the outcome.
    if !resp.status().is_success() {
        span.record("request.outcome", "error");
    }
    if resp.extensions().get::<GuardLogs>().is_none() {
        let status = resp.status();
        let outcome = if status.is_success() {
            "success"
        } else {
            "error"
        };
        tracing::info!(
            target: REQUEST_LOG,
            parent: &span,
            status = status.as_u16(),
            outcome,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request completed"
        );
    }
    if let Ok(v) = HeaderValue::from_str(&x_request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
