//! The system status server (`DYN_SYSTEM_PORT`): `/health` and `/live` with Dynamo's JSON,
//! `/metrics` in Prometheus text format.
//!
//! Readiness comes from [`HealthState`]: an endpoint is declared with the starting status
//! (`DYN_SYSTEM_STARTING_HEALTH_STATUS`, default not ready) when the process starts serving it
//! and flips to ready once its subscription is live and it is registered. The routes'
//! paths are `DYN_SYSTEM_HEALTH_PATH` and `DYN_SYSTEM_LIVE_PATH`.
//! The process is ready when every endpoint named in `DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS`
//! is, or, without that list, when it serves at least one endpoint and all are ready.

use crate::lock;
use crate::metrics::RuntimeMetrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct HealthState {
    endpoints: Mutex<BTreeMap<String, bool>>,
    required: Option<Vec<String>>,
    /// `DYN_SYSTEM_STARTING_HEALTH_STATUS=ready`: declared endpoints (and a process with none)
    /// count as ready before they serve.
    starting_ready: bool,
}

impl HealthState {
    pub fn new(required: Option<Vec<String>>, starting_ready: bool) -> Self {
        Self {
            endpoints: Mutex::new(BTreeMap::new()),
            required,
            starting_ready,
        }
    }

    /// An endpoint the process is about to serve: it reports the starting status.
    pub fn declare(&self, endpoint: &str) {
        self.set(endpoint, self.starting_ready);
    }

    pub fn set(&self, endpoint: &str, ready: bool) {
        lock(&self.endpoints).insert(endpoint.to_string(), ready);
    }

    pub fn set_all(&self, ready: bool) {
        for v in lock(&self.endpoints).values_mut() {
            *v = ready;
        }
    }

    pub fn is_ready(&self) -> bool {
        let eps = lock(&self.endpoints);
        match &self.required {
            Some(names) => names.iter().all(|n| eps.get(n).copied().unwrap_or(false)),
            None if eps.is_empty() => self.starting_ready,
            None => eps.values().all(|r| *r),
        }
    }

    /// Dynamo's body: `{"status":"ready|notready","uptime":{"secs","nanos"},"endpoints":{..}}`.
    pub fn body(&self, uptime: std::time::Duration) -> serde_json::Value {
        let ready = self.is_ready();
        let endpoints: serde_json::Map<String, serde_json::Value> = lock(&self.endpoints)
            .iter()
            .map(|(k, v)| (k.clone(), json!(if *v { "ready" } else { "notready" })))
            .collect();
        json!({
            "status": if ready { "ready" } else { "notready" },
            "uptime": {"secs": uptime.as_secs(), "nanos": uptime.subsec_nanos()},
            "endpoints": endpoints,
        })
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<HealthState>,
    metrics: Arc<RuntimeMetrics>,
    nats: async_nats::Client,
}

async fn health(State(s): State<AppState>) -> Response {
    let status = if s.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(s.health.body(s.metrics.uptime()))).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(Some(&s.nats)),
    )
        .into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "Route not found").into_response()
}

/// Binds `host:port` and serves until `shutdown`; returns the bound address. Readiness is
/// served at `paths.0` and liveness (the same answer) at `paths.1`.
pub async fn start(
    host: &str,
    port: u16,
    paths: (&str, &str),
    health_state: Arc<HealthState>,
    runtime_metrics: Arc<RuntimeMetrics>,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((host, port)).await?;
    let addr = listener.local_addr()?;
    let mut app = Router::new().route(paths.0, get(health));
    if paths.1 != paths.0 {
        app = app.route(paths.1, get(health));
    }
    let app = app
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(AppState {
            health: health_state,
            metrics: runtime_metrics,
            nats,
        });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "system status server stopped");
        }
    });
    tracing::info!(%addr, "system status server listening");
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_endpoints() {
        let h = HealthState::new(None, false);
        assert!(!h.is_ready(), "no endpoints yet");
        h.set("generate", false);
        assert!(!h.is_ready());
        h.set("generate", true);
        assert!(h.is_ready());
        h.set("clear_kv_blocks", false);
        assert!(!h.is_ready());
        assert_eq!(
            h.body(Default::default())["endpoints"]["clear_kv_blocks"],
            "notready"
        );

        let only_generate = HealthState::new(Some(vec!["generate".into()]), false);
        only_generate.set("generate", true);
        only_generate.set("load_metrics", false);
        assert!(only_generate.is_ready());
        assert_eq!(only_generate.body(Default::default())["status"], "ready");
    }

    #[test]
    fn a_starting_status_of_ready_holds_until_an_endpoint_says_otherwise() {
        let h = HealthState::new(None, true);
        assert!(h.is_ready(), "nothing declared yet");
        h.declare("generate");
        assert!(h.is_ready());
        h.set("generate", false);
        assert!(!h.is_ready());
        let strict = HealthState::new(None, false);
        strict.declare("generate");
        assert!(!strict.is_ready());
    }
}
