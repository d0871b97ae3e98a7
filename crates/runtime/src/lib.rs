//! tandem's distributed runtime: how processes find and call each other.
//!
//! Follows the classic NVIDIA Dynamo design (etcd + NATS):
//! - [`DistributedRuntime`] is one per process. It holds a NATS connection, an etcd client and
//!   one primary etcd lease whose id is the process's instance id (printed as lowercase hex in
//!   keys and subjects).
//! - Endpoints are addressed `dyn://{namespace}.{component}.{endpoint}` ([`EndpointId`]).
//!   Serving one ([`Endpoint::serve`]) subscribes to the NATS subject
//!   `{namespace}_{component}.{endpoint}-{instance_hex}` in queue group `q` and writes
//!   `instances/{ns}/{component}/{endpoint}:{instance_hex}` under the lease ([`discovery`]).
//! - Callers watch that prefix ([`Client`]), pick an instance (round-robin, random, direct) and
//!   send the request over NATS; the handler's responses come back as an ordered stream of
//!   numbered frames ([`transport`]) ending in a final or error frame. [`typed`] puts request
//!   and response types on both ends; errors cross as a class plus message ([`RemoteError`]).
//! - Cancellation flows back from the caller; a vanished caller is noticed by the handler's
//!   liveness probes.
//! - Every process with `DYN_SYSTEM_PORT` set serves `/health`, `/live` and `/metrics`
//!   ([`system_status`]) with Dynamo's `dynamo_component_*` metrics ([`metrics`]).

pub mod client;
pub mod config;
pub mod discovery;
pub mod distributed;
pub mod endpoint;
pub mod error;
pub mod metrics;
pub mod system_status;
pub mod transport;
pub mod typed;

pub use client::{Client, RequestOptions, ResponseStream, RouterMode};
pub use config::RuntimeConfig;
pub use discovery::{Discovery, Instance, Transport};
pub use distributed::{Component, DistributedRuntime, Endpoint, Namespace};
pub use endpoint::{EndpointId, Handler, HandlerStream, RequestContext};
pub use error::{ErrorCode, RemoteError, RuntimeError};
pub use system_status::HealthState;
pub use typed::{TypedHandlerStream, TypedStream};

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every lock in this
/// crate guards plain bookkeeping that stays consistent between statements.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for Ctrl-C or SIGTERM, the signals a process supervisor sends to stop a process.
/// The handlers are installed when this is called, not when the future is first polled: call
/// it before the process announces itself, or a SIGTERM right after registration would kill
/// it with the default action instead of shutting it down.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async move {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
