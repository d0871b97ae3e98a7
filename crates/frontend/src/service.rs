//! The HTTP service: OpenAI routes, health, metrics.
//!
//! A completion request goes: body checks (content type, size, JSON) → model lookup →
//! parameter validation → chat template and tokenization → context-length check → one
//! runtime request to a worker → engine outputs turned into text per choice (incremental
//! detokenizer, stop strings) → SSE chunks or one JSON response. Every client mistake is
//! answered here, before a worker sees anything.

use crate::error::ApiError;
use crate::metrics::{FrontendMetrics, RequestGuard};
use crate::models::{Lookup, ModelManager, ServedModel};
use crate::trace::{RequestIds, http_request_span};
use async_stream::stream;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use tandem_preprocessor::stop::StopMatcher;
use tandem_protocols::llm::{EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions};
use tandem_protocols::openai::*;
use tandem_runtime::{RequestOptions, RouterMode};
use tracing::Instrument;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;
const MAX_N: u32 = 128;

#[derive(Clone)]
pub struct AppState {
    pub models: ModelManager,
    pub metrics: Arc<FrontendMetrics>,
    pub runtime_registry: Option<prometheus::Registry>,
}

pub fn router(state: AppState) -> Router {
    // Only generation requests get an `http-request` span: scrapes and health probes would
    // bury them in the trace store.
    let traced = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route_layer(axum::middleware::from_fn(http_request_span));
    Router::new()
        .merge(traced)
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("Route not found") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn list_models(State(s): State<AppState>) -> Response {
    let data = s
        .models
        .list()
        .iter()
        .map(|m| ModelObject {
            id: m.name.clone(),
            object: "model".into(),
            created: m.created,
            owned_by: "tandem".into(),
        })
        .collect();
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

async fn live() -> Response {
    axum::Json(json!({"status": "live", "message": "Service is live"})).into_response()
}

async fn health(State(s): State<AppState>) -> Response {
    let models = s.models.list();
    let mut endpoints: Vec<String> = models
        .iter()
        .map(|m| m.client.endpoint().to_string())
        .collect();
    endpoints.sort();
    endpoints.dedup();
    let instances: Vec<Value> = models
        .iter()
        .flat_map(|m| m.client.instances())
        .filter_map(|i| serde_json::to_value(i).ok())
        .collect();
    if instances.is_empty() {
        axum::Json(json!({"status": "unhealthy", "message": "No endpoints available", "endpoints": endpoints, "instances": []}))
            .into_response()
    } else {
        axum::Json(json!({"status": "healthy", "message": "Service is healthy", "endpoints": endpoints, "instances": instances}))
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut text = tandem_runtime::metrics::encode(&s.metrics.registry);
    if let Some(r) = &s.runtime_registry {
        text.push_str(&tandem_runtime::metrics::encode(r));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Content type, size and JSON checks shared by the POST routes.
fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !json_type {
        return Err(ApiError::unsupported_media_type());
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(BODY_LIMIT)
        } else {
            ApiError::invalid(e.body_text(), None)
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

fn check_range(v: Option<f32>, name: &str, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::invalid(
            format!("{name} must be between {lo} and {hi}, got {x}"),
            Some(name),
        )),
        _ => Ok(()),
    }
}

/// Validates sampling and length parameters and turns them into engine settings.
fn engine_params(
    p: &CommonParams,
) -> Result<(SamplingOptions, Option<u32>, Vec<String>), ApiError> {
    check_range(p.temperature, "temperature", 0.0, 2.0)?;
    check_range(p.top_p, "top_p", 0.0, 1.0)?;
    if p.top_p == Some(0.0) {
        return Err(ApiError::invalid(
            "top_p must be greater than 0",
            Some("top_p"),
        ));
    }
    check_range(p.min_p, "min_p", 0.0, 1.0)?;
    check_range(p.frequency_penalty, "frequency_penalty", -2.0, 2.0)?;
    check_range(p.presence_penalty, "presence_penalty", -2.0, 2.0)?;
    if let Some(r) = p.repetition_penalty
        && !(r > 0.0 && r <= 10.0)
    {
        return Err(ApiError::invalid(
            format!("repetition_penalty must be in (0, 10], got {r}"),
            Some("repetition_penalty"),
        ));
    }
    let top_k = match p.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as u32),
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be -1 or positive, got {k}"),
                Some("top_k"),
            ));
        }
    };
    let n = p.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::invalid(
            format!("n must be between 1 and {MAX_N}, got {n}"),
            Some("n"),
        ));
    }
    let max_tokens = p.max_completion_tokens.or(p.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let stops = p
        .stop
        .clone()
        .map(StopSequences::into_vec)
        .unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::invalid(
            "at most 4 stop sequences are allowed",
            Some("stop"),
        ));
    }
    Ok((
        SamplingOptions {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k,
            min_p: p.min_p,
            seed: p.seed,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            repetition_penalty: p.repetition_penalty,
            n,
        },
        max_tokens,
        stops,
    ))
}

fn find_model(s: &AppState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    match s.models.lookup(name) {
        Lookup::Ready(m) => Ok(m),
        Lookup::Gone => Err(ApiError::unavailable(format!(
            "no worker is serving model `{name}` right now"
        ))),
        Lookup::Unknown => Err(ApiError::model_not_found(name)),
    }
}

/// A chat message's content as the string templates expect.
fn content_text(v: &Option<Value>) -> Result<Value, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Value::String(String::new())),
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            "only text content parts are supported",
                            Some("messages"),
                        ));
                    }
                }
            }
            Ok(Value::String(out))
        }
        Some(_) => Err(ApiError::invalid(
            "message content must be a string or a list of parts",
            Some("messages"),
        )),
    }
}

struct Prepared {
    model: Arc<ServedModel>,
    request: PreprocessedRequest,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    n: u32,
    request_id: String,
}

fn prepare(
    model: Arc<ServedModel>,
    params: &CommonParams,
    token_ids: Vec<u32>,
) -> Result<Prepared, ApiError> {
    let (sampling, max_tokens, stops) = engine_params(params)?;
    let context = model.card.context_length as usize;
    if token_ids.len() >= context {
        return Err(ApiError::context_too_long(format!(
            "This model's maximum context length is {context} tokens. However, your prompt has {} tokens.",
            token_ids.len()
        )));
    }
    let room = (context - token_ids.len()) as u32;
    if let Some(m) = max_tokens
        && m > room
    {
        return Err(ApiError::context_too_long(format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the prompt, {m} for the completion).",
            token_ids.len() + m as usize,
            token_ids.len()
        )));
    }
    let mut stop_ids = if params.ignore_eos {
        Vec::new()
    } else {
        model.preprocessor.eos_token_ids().to_vec()
    };
    stop_ids.dedup();
    Ok(Prepared {
        request: PreprocessedRequest {
            model: model.name.clone(),
            token_ids,
            sampling: sampling.clone(),
            stop: StopConditions {
                max_tokens: Some(max_tokens.unwrap_or(room)),
                stop_token_ids: stop_ids,
                ignore_eos: params.ignore_eos,
                min_tokens: params.min_tokens,
            },
        },
        stops,
        stream: params.stream,
        include_usage: params
            .stream_options
            .as_ref()
            .map(|o| o.include_usage)
            .unwrap_or(false),
        n: sampling.n,
        request_id: uuid::Uuid::new_v4().simple().to_string(),
        model,
    })
}

/// What generation produces, whatever the response format.
enum GenEvent {
    Text { index: u32, text: String },
    Finish { index: u32, reason: &'static str },
    Usage(Usage),
}

/// Runs one request on a worker; yields text per choice, finishes, then usage. Called inside
/// the request's `http-request` span; the call to the worker runs in it (so the worker's spans
/// join the trace) and the request's end is recorded on it. The per-token loop does not enter
/// it: entering a span costs time on every token and the loop logs nothing.
fn generate(
    metrics: Arc<FrontendMetrics>,
    p: Prepared,
    endpoint: &'static str,
    ids: RequestIds,
) -> impl Stream<Item = Result<GenEvent, ApiError>> + Send + 'static {
    let span = tracing::Span::current();
    span.record("request_id", p.request_id.as_str());
    span.record("model", p.model.name.as_str());
    stream! {
        let mut guard = RequestGuard::new(&metrics, &p.model.name, endpoint, p.stream, span.clone());
        guard.input_tokens(p.request.token_ids.len());
        let mut disconnect = DisconnectGuard { metrics: &metrics, done: false };
        let body = match serde_json::to_vec(&p.request) {
            Ok(b) => Bytes::from(b),
            Err(e) => { yield Err(ApiError::internal(e.to_string())); return; }
        };
        let opts = RequestOptions { id: Some(p.request_id.clone()), headers: ids.headers() };
        // KV routing: the decision registers the request's load on the chosen worker before
        // it is sent; the guard takes it off however this stream ends.
        let (mode, mut load) = match route_kv(&p, &span) {
            Some((worker, guard)) => (RouterMode::Direct(worker), Some(guard)),
            None => (p.model.router_mode, None),
        };
        let mut upstream = match p.model.client.generate(mode, body, opts).instrument(span.clone()).await {
            Ok(s) => s,
            Err(e) => {
                let e = ApiError::from(e);
                guard.fail(e.metric_error_type());
                disconnect.done = true;
                yield Err(e);
                return;
            }
        };
        let prompt_tokens = p.request.token_ids.len();
        let n = p.n as usize;
        let mut decoders: Vec<_> = (0..n).map(|_| p.model.preprocessor.decoder()).collect();
        let mut stops: Vec<StopMatcher> = (0..n).map(|_| StopMatcher::new(p.stops.clone())).collect();
        let mut finished = vec![false; n];
        let mut completion_tokens = 0u32;
        let mut cached = None;
        while let Some(item) = upstream.next().await {
            let out: EngineOutput = match item.map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
                Ok(o) => o,
                Err(e) => {
                    guard.fail("internal");
                    disconnect.done = true;
                    yield Err(ApiError::internal(format!("worker error: {e}")));
                    return;
                }
            };
            let i = out.index as usize;
            if i >= n || finished[i] { continue; }
            if cached.is_none() { cached = out.cached_tokens; }
            if let Some(g) = load.as_mut() { g.prefill_done(); }
            completion_tokens += out.token_ids.len() as u32;
            guard.tokens(out.token_ids.len(), prompt_tokens);
            let mut text = decoders[i].push(&out.token_ids);
            if out.finish_reason.is_some() { text.push_str(&decoders[i].finish()); }
            let step = stops[i].push(&text);
            let mut text = step.text;
            let reason = if step.stopped {
                Some("stop")
            } else if let Some(r) = out.finish_reason {
                text.push_str(&stops[i].finish());
                Some(r.as_openai())
            } else { None };
            if !text.is_empty() { yield Ok(GenEvent::Text { index: out.index, text }); }
            if let Some(reason) = reason {
                finished[i] = true;
                yield Ok(GenEvent::Finish { index: out.index, reason });
                if finished.iter().all(|f| *f) { break; }
            }
        }
        if !finished.iter().all(|f| *f) {
            guard.fail("internal");
            disconnect.done = true;
            yield Err(ApiError::internal("worker stream ended before every choice finished"));
            return;
        }
        guard.ok();
        disconnect.done = true;
        yield Ok(GenEvent::Usage(Usage {
            prompt_tokens: prompt_tokens as u32,
            completion_tokens,
            total_tokens: prompt_tokens as u32 + completion_tokens,
            prompt_tokens_details: cached.map(|c| PromptTokensDetails { cached_tokens: c }),
        }));
    }
}

/// Picks the worker for a KV-routed model; `None` for other routing modes or when no worker
/// is known (the runtime client then reports that).
fn route_kv(p: &Prepared, parent: &tracing::Span) -> Option<(u64, tandem_kv_router::LoadGuard)> {
    let kv = p.model.kv.as_ref()?;
    let span = tracing::info_span!(
        parent: parent,
        "kv_router.route_request",
        worker_id = tracing::field::Empty,
        overlap_blocks = tracing::field::Empty,
        cost = tracing::field::Empty,
    );
    let _entered = span.enter();
    let total_blocks = p.model.card.runtime_config.total_kv_blocks;
    let candidates: Vec<tandem_kv_router::Candidate> = p
        .model
        .client
        .instance_ids()
        .into_iter()
        .map(|worker_id| tandem_kv_router::Candidate {
            worker_id,
            total_blocks,
        })
        .collect();
    let d = kv.route(&p.request.token_ids, &candidates)?;
    span.record("worker_id", d.worker_id);
    span.record("overlap_blocks", d.overlap_blocks);
    span.record("cost", d.cost);
    Some((d.worker_id, d.guard))
}

/// Gathers a whole generation for a unary response: text and finish reason per choice, usage.
async fn collect_choices(
    events: impl Stream<Item = Result<GenEvent, ApiError>>,
    n: u32,
) -> Result<(Vec<String>, Vec<Option<String>>, Usage), ApiError> {
    let mut texts = vec![String::new(); n as usize];
    let mut reasons: Vec<Option<String>> = vec![None; n as usize];
    let mut usage = Usage::default();
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

fn sse_event(v: &impl serde::Serialize) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(v).unwrap_or_default()
    ))
}

/// The SSE body of a streamed response: each event rendered by `render` (which may skip it),
/// an error as an OpenAI error event, and the closing `data: [DONE]`.
fn sse_body(
    events: impl Stream<Item = Result<GenEvent, ApiError>> + Send + 'static,
    mut render: impl FnMut(GenEvent) -> Option<Bytes> + Send + 'static,
) -> impl Stream<Item = Bytes> + Send + 'static {
    stream! {
        let mut events = std::pin::pin!(events);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => if let Some(b) = render(ev) { yield b },
                Err(e) => { yield sse_event(&e.body()); break; }
            }
        }
        yield Bytes::from_static(b"data: [DONE]\n\n");
    }
}

fn sse_response(body: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let body = Body::from_stream(body.map(Ok::<_, Infallible>));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn chat(
    State(s): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_inner(&s, body, &headers, ids).await {
        Ok(r) => r,
        Err(e) => rejected(&s, e, "chat_completions"),
    }
}

/// Counts a request refused before generation and renders its error.
fn rejected(s: &AppState, e: ApiError, endpoint: &str) -> Response {
    s.metrics
        .requests
        .with_label_values(&["", endpoint, "unary", "error", e.metric_error_type()])
        .inc();
    e.into_response()
}

async fn chat_inner(
    s: &AppState,
    body: Result<Bytes, BytesRejection>,
    headers: &HeaderMap,
    request_ids: RequestIds,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(headers, body)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let model = find_model(s, &req.model)?;
    let messages = req
        .messages
        .iter()
        .map(|m| {
            let mut v = serde_json::Map::new();
            v.insert("role".into(), Value::String(m.role.clone()));
            v.insert("content".into(), content_text(&m.content)?);
            for (k, x) in &m.extra {
                v.insert(k.clone(), x.clone());
            }
            Ok(Value::Object(v))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let prompt = model
        .preprocessor
        .render_chat(&messages, req.tools.as_ref(), true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let ids = model
        .preprocessor
        .encode(&prompt)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let p = prepare(model, &req.params, ids)?;
    let id = format!("chatcmpl-{}", p.request_id);
    let created = now();
    let name = req.model.clone();
    let (stream_mode, include_usage, n) = (p.stream, p.include_usage, p.n);
    let events = generate(s.metrics.clone(), p, "chat_completions", request_ids);
    if stream_mode {
        let chunk =
            move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk".into(),
                created,
                model: name.clone(),
                choices,
                usage,
                system_fingerprint: None,
            };
        let mut started = vec![false; n as usize];
        let body = sse_body(events, move |ev| match ev {
            GenEvent::Text { index, text } => {
                let role = (!std::mem::replace(&mut started[index as usize], true))
                    .then(|| "assistant".to_string());
                Some(sse_event(&chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta: Delta {
                            role,
                            content: Some(text),
                        },
                        finish_reason: None,
                        logprobs: None,
                    }],
                    None,
                )))
            }
            GenEvent::Finish { index, reason } => {
                let role = (!std::mem::replace(&mut started[index as usize], true))
                    .then(|| "assistant".to_string());
                Some(sse_event(&chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta: Delta {
                            role,
                            content: None,
                        },
                        finish_reason: Some(reason.into()),
                        logprobs: None,
                    }],
                    None,
                )))
            }
            GenEvent::Usage(u) => include_usage.then(|| sse_event(&chunk(vec![], Some(u)))),
        });
        return Ok(sse_response(body));
    }
    let (texts, reasons, usage) = collect_choices(events, n).await?;
    let choices = texts
        .into_iter()
        .zip(reasons)
        .enumerate()
        .map(|(i, (content, finish_reason))| ChatChoice {
            index: i as u32,
            message: AssistantMessage {
                role: "assistant".into(),
                content,
            },
            finish_reason,
            logprobs: None,
        })
        .collect();
    Ok(axum::Json(ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created,
        model: name,
        choices,
        usage,
        system_fingerprint: None,
    })
    .into_response())
}

async fn completions(
    State(s): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completions_inner(&s, body, &headers, ids).await {
        Ok(r) => r,
        Err(e) => rejected(&s, e, "completions"),
    }
}

async fn completions_inner(
    s: &AppState,
    body: Result<Bytes, BytesRejection>,
    headers: &HeaderMap,
    request_ids: RequestIds,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(headers, body)?;
    let model = find_model(s, &req.model)?;
    let ids = match &req.prompt {
        Prompt::Text(t) => model
            .preprocessor
            .encode_prompt(t)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?,
        Prompt::Texts(v) if v.len() == 1 => model
            .preprocessor
            .encode_prompt(&v[0])
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?,
        Prompt::Texts(_) => {
            return Err(ApiError::invalid(
                "batched prompts are not supported; send one prompt per request",
                Some("prompt"),
            ));
        }
        Prompt::Tokens(t) => t.clone(),
    };
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let p = prepare(model, &req.params, ids)?;
    let id = format!("cmpl-{}", p.request_id);
    let created = now();
    let name = req.model.clone();
    let (stream_mode, include_usage, n) = (p.stream, p.include_usage, p.n);
    let events = generate(s.metrics.clone(), p, "completions", request_ids);
    let make = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion".into(),
        created,
        model: name.clone(),
        choices,
        usage,
        system_fingerprint: None,
    };
    if stream_mode {
        let body = sse_body(events, move |ev| match ev {
            GenEvent::Text { index, text } => Some(sse_event(&make(
                vec![CompletionChoice {
                    index,
                    text,
                    finish_reason: None,
                    logprobs: None,
                }],
                None,
            ))),
            GenEvent::Finish { index, reason } => Some(sse_event(&make(
                vec![CompletionChoice {
                    index,
                    text: String::new(),
                    finish_reason: Some(reason.into()),
                    logprobs: None,
                }],
                None,
            ))),
            GenEvent::Usage(u) => include_usage.then(|| sse_event(&make(vec![], Some(u)))),
        });
        return Ok(sse_response(body));
    }
    let (texts, reasons, usage) = collect_choices(events, n).await?;
    let choices = texts
        .into_iter()
        .zip(reasons)
        .enumerate()
        .map(|(i, (text, finish_reason))| CompletionChoice {
            index: i as u32,
            text,
            finish_reason,
            logprobs: None,
        })
        .collect();
    Ok(axum::Json(make(choices, Some(usage))).into_response())
}
