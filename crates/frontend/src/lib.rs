//! tandem's OpenAI-compatible frontend.
//!
//! A request crosses it as: [`http`] (routes, body, rendering, error mapping) →
//! [`pipeline`] (`prepare` → `route` → `execute` over the request plane → `postprocess`) →
//! [`http`] again as SSE chunks or one JSON body. `docs/architecture.md` draws the whole path.
//!
//! - [`admission`]: `--max-concurrent-requests` and its queue; 503 + `Retry-After` beyond.
//! - [`models`]: follows worker model cards in etcd; one preprocessor, worker client and
//!   router per model name.
//! - [`error`]: the single mapping from failure classes to HTTP statuses, OpenAI error bodies
//!   and metric labels.
//! - [`config`]: the frontend's flags, checked at start-up.
//! - [`metrics`]: `dynamo_frontend_*` with Dynamo's labels and buckets.
//! - [`trace`]: the `http-request` span each generation request runs in.

pub mod admission;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod trace;

use axum::serve::ListenerExt;

/// Serves `router` on `addr` until `shutdown` resolves. Accepted sockets get TCP_NODELAY so
/// small SSE frames are not held back by Nagle's algorithm.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
