//! The runtime's error type. Each failure a caller can react to differently has its own
//! variant: "no responders" and a stalled stream mean another instance may succeed, a remote
//! error means the handler itself refused.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot connect to NATS at {url}: {reason}")]
    NatsConnect { url: String, reason: String },
    #[error("nats: {0}")]
    Nats(String),
    #[error("invalid endpoint path {0:?}: expected dyn://namespace.component.endpoint")]
    InvalidEndpointPath(String),
    #[error("invalid router mode {0:?}: expected round-robin, random or direct")]
    InvalidRouterMode(String),
    #[error("no instances of {0}")]
    NoInstances(String),
    #[error("instance {0:x} is not serving this endpoint")]
    InstanceNotFound(u64),
    #[error("no responders on {0}: the instance is gone")]
    NoResponders(String),
    #[error("payload of {size} bytes exceeds the NATS max payload of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },
    #[error("instance did not acknowledge the request within {0:?}")]
    AckTimeout(Duration),
    #[error("instance rejected the request: {0}")]
    Rejected(String),
    #[error("response stream gap: expected frame {expected}, got {got}")]
    StreamGap { expected: u64, got: u64 },
    #[error("response stream stalled: nothing received for {0:?}")]
    StreamStalled(Duration),
    #[error("handler error: {0}")]
    Remote(String),
    #[error("response stream ended before its final frame")]
    Disconnected,
    #[error("key {0} already exists in etcd")]
    KeyExists(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("runtime is shutting down")]
    Shutdown,
}

impl RuntimeError {
    /// True when the same request may succeed on another instance: nothing reached a handler
    /// that answered, or the one that did vanished mid-stream.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NoResponders(_)
                | Self::AckTimeout(_)
                | Self::StreamStalled(_)
                | Self::Disconnected
                | Self::InstanceNotFound(_)
        )
    }
}
