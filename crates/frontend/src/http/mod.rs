//! The HTTP layer: routes, extractors, response rendering and error mapping.
//!
//! `POST /v1/chat/completions`, `POST /v1/completions` and `POST /v1/responses` read the body
//! ([`body`]), run the request [`crate::pipeline`] once [`crate::admission`] gives it a turn
//! and render its events ([`render`]; [`responses`] for the Responses API); with an API key, `/v1/*` is behind [`auth`]; `GET /v1/models`, `/health`,
//! `/live` and `/metrics` answer from the model list and the registries. Every error leaves
//! as OpenAI's envelope through [`ApiError`], including 404 for unknown routes and 405 for a
//! method a route does not serve; a refused request is counted in
//! `dynamo_frontend_requests_total` with its `error_type`.

pub mod auth;
pub mod body;
pub mod logprobs;
pub mod render;
pub mod responses;

use crate::admission::Admission;
use crate::error::ApiError;
use crate::metrics::FrontendMetrics;
use crate::models::ModelManager;
use crate::pipeline::{self, Endpoint};
use crate::trace::{GuardLogs, RequestIds, http_request_span};
use auth::ApiKey;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
pub use body::BODY_LIMIT;
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tandem_protocols::openai::{ModelList, ModelObject};

#[derive(Clone)]
pub struct AppState {
    pub models: ModelManager,
    pub metrics: Arc<FrontendMetrics>,
    pub runtime_registry: Option<prometheus::Registry>,
    pub admission: Arc<Admission>,
}

/// Who may call what: `api_key` guards `/v1/*` (and `/metrics` with `protect_metrics`).
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub api_key: Option<ApiKey>,
    pub protect_metrics: bool,
}

pub fn router(state: AppState, access: Access) -> Router<()> {
    // Only generation requests get an `http-request` span: scrapes and health probes would
    // bury them in the trace store.
    let traced = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses_api))
        .route_layer(axum::middleware::from_fn(http_request_span));
    let mut v1 = traced.route("/v1/models", get(list_models));
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if let Some(key) = access.api_key.map(Arc::new) {
        let guard = axum::middleware::from_fn_with_state(key, auth::require_key);
        v1 = v1.route_layer(guard.clone());
        if access.protect_metrics {
            metrics_route = metrics_route.route_layer(guard);
        }
    }
    Router::new()
        .merge(v1)
        .merge(metrics_route)
        .route("/health", get(health))
        .route("/live", get(live))
        .fallback(|| async { ApiError::route_not_found() })
        // Last, so that it reaches every route above.
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn chat(
    State(s): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generation(&s, Endpoint::Chat, ids, &headers, body).await
}

async fn completions(
    State(s): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generation(&s, Endpoint::Completions, ids, &headers, body).await
}

async fn responses_api(
    State(s): State<AppState>,
    Extension(ids): Extension<RequestIds>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generation(&s, Endpoint::Responses, ids, &headers, body).await
}

async fn generation(
    s: &AppState,
    endpoint: Endpoint,
    ids: RequestIds,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body::json_body(headers, body) {
        Ok(b) => b,
        Err(e) => return rejected(s, e, endpoint),
    };
    let g = match pipeline::start(&s.models, s.metrics.clone(), endpoint, &body, ids) {
        Ok(g) => g,
        Err(e) => return rejected(s, e, endpoint),
    };
    // Validated first (so a bad request never takes a turn), then admitted.
    let queued = s.metrics.queued.with_label_values(&[g.model.as_str()]);
    let permit = match s.admission.admit(&queued).await {
        Ok(p) => p,
        Err(e) => return rejected(s, e, endpoint),
    };
    // The turn is held until the response has been sent, stream included.
    let g = pipeline::Generation {
        events: g.events.inspect(move |_| {
            let _turn = &permit;
        }),
        request_id: g.request_id,
        model: g.model,
        stream: g.stream,
        include_usage: g.include_usage,
        n: g.n,
        logprobs: g.logprobs,
    };
    // Failures after this point were counted (and logged) by the request's own guard.
    let result = match endpoint {
        Endpoint::Responses => responses::respond(g, body).await,
        _ => render::respond(endpoint, g).await,
    };
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(GuardLogs);
    resp
}

/// Counts a request refused before generation and renders its error.
fn rejected(s: &AppState, e: ApiError, endpoint: Endpoint) -> Response {
    s.metrics
        .requests
        .with_label_values(&[
            "",
            endpoint.label(),
            "unary",
            "error",
            e.metric_error_type(),
        ])
        .inc();
    let overloaded = e.class == tandem_runtime::ErrorCode::Overloaded;
    let mut resp = e.into_response();
    if overloaded {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(crate::admission::RETRY_AFTER_SECS),
        );
    }
    resp
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
    // Ready once some model can be routed to (a worker serves its generate endpoint), so
    // that a load balancer does not send requests that can only fail.
    let routable = models.iter().any(|m| !m.client.instance_ids().is_empty());
    let (code, status, message) = if routable {
        (StatusCode::OK, "healthy", "Service is healthy")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "No model is routable yet",
        )
    };
    let body = json!({"status": status, "message": message, "endpoints": endpoints, "instances": instances});
    (code, axum::Json(body)).into_response()
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
