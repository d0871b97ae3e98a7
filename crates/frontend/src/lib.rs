//! tandem's OpenAI-compatible frontend.
//!
//! - [`models`]: follows worker model cards in etcd; one preprocessor and worker client per
//!   model name.
//! - [`service`]: the axum routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//!   `/health`, `/live`, `/metrics`) and the request pipeline.
//! - [`error`]: the single mapping from failures to HTTP statuses and OpenAI error bodies.
//! - [`metrics`]: `dynamo_frontend_*` with Dynamo's labels and buckets.
//! - [`trace`]: the `http-request` span each generation request runs in.

pub mod error;
pub mod metrics;
pub mod models;
pub mod service;
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
