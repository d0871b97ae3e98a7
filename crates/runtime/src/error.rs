//! The runtime's errors, and the one error-code space of the request plane.
//!
//! [`RuntimeError`] has a variant for each failure a caller can react to differently: "no
//! responders" and a stalled stream mean another instance may succeed, a remote error means
//! the handler itself refused or failed. What a handler reports crosses NATS as a
//! [`RemoteError`] — an [`ErrorCode`] plus a message — so the caller learns the class of the
//! failure, not just its text; [`RuntimeError::code`] gives every failure, local or remote,
//! its class, which is all a caller needs to map it (to an HTTP status, a metric label).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// The class of a failure, the same on both ends of the request plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or asks for something impossible.
    InvalidRequest,
    /// The prompt (plus what is to be generated) does not fit the model's context.
    ContextLength,
    /// What the request names does not exist here.
    NotFound,
    /// The handler is alive but will not take more work now.
    Overloaded,
    /// Nobody can serve the request now (no instance, instance gone, shutting down).
    Unavailable,
    /// The request was cancelled before it ended.
    Cancelled,
    /// The handler failed.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::ContextLength => "context_length",
            Self::NotFound => "not_found",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it crosses the wire: JSON `{"code":"…","message":"…"}` in an error frame or a
/// rejected acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn encode(&self) -> bytes::Bytes {
        // Two plain fields: serialisation cannot fail, but never panic on the wire path.
        serde_json::to_vec(self)
            .map(bytes::Bytes::from)
            .unwrap_or_else(|_| bytes::Bytes::copy_from_slice(self.message.as_bytes()))
    }

    /// Reads an error payload; a peer that sent plain text (an older or foreign handler) gets
    /// its text kept as an internal error.
    pub fn decode(payload: &[u8]) -> Self {
        serde_json::from_slice(payload)
            .unwrap_or_else(|_| Self::internal(String::from_utf8_lossy(payload).into_owned()))
    }
}

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
    Rejected(RemoteError),
    #[error("response stream gap: expected frame {expected}, got {got}")]
    StreamGap { expected: u64, got: u64 },
    #[error("response stream stalled: nothing received for {0:?}")]
    StreamStalled(Duration),
    #[error("handler error: {0}")]
    Remote(RemoteError),
    #[error("cannot decode a response: {0}")]
    Decode(String),
    #[error("response stream ended before its final frame")]
    Disconnected,
    #[error("instance {0:x} is gone: it no longer answers on NATS")]
    InstanceGone(u64),
    #[error("instance {0:x} no longer runs the request, and its last frames never arrived")]
    RequestLost(u64),
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
    /// The class of this failure: a handler's own code, or what a local failure means to the
    /// caller (an instance that vanished or never answered is `Unavailable`).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Remote(e) | Self::Rejected(e) => e.code,
            Self::NoInstances(_)
            | Self::InstanceNotFound(_)
            | Self::NoResponders(_)
            | Self::AckTimeout(_)
            | Self::StreamStalled(_)
            | Self::Disconnected
            | Self::InstanceGone(_)
            | Self::RequestLost(_)
            | Self::Shutdown => ErrorCode::Unavailable,
            Self::PayloadTooLarge { .. } => ErrorCode::InvalidRequest,
            _ => ErrorCode::Internal,
        }
    }

    /// True when the same request may succeed on another instance: nothing reached a handler
    /// that answered, the one that did vanished mid-stream or lost frames, or it said it
    /// cannot serve (shutting down, full). Never for a handler's own failure or a
    /// cancellation.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NoResponders(_)
            | Self::AckTimeout(_)
            | Self::StreamStalled(_)
            | Self::StreamGap { .. }
            | Self::Disconnected
            | Self::InstanceGone(_)
            | Self::RequestLost(_)
            | Self::InstanceNotFound(_) => true,
            Self::Remote(e) => e.code == ErrorCode::Unavailable,
            Self::Rejected(e) => matches!(e.code, ErrorCode::Unavailable | ErrorCode::Overloaded),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_round_trip_and_plain_text_is_internal() {
        let e = RemoteError::new(ErrorCode::ContextLength, "prompt of 9 tokens");
        assert_eq!(
            e.encode(),
            r#"{"code":"context_length","message":"prompt of 9 tokens"}"#
        );
        assert_eq!(RemoteError::decode(&e.encode()), e);
        assert_eq!(
            RemoteError::decode(b"something broke"),
            RemoteError::internal("something broke")
        );
        assert_eq!(RuntimeError::Remote(e).code(), ErrorCode::ContextLength);
        assert_eq!(RuntimeError::Disconnected.code(), ErrorCode::Unavailable);
        assert_eq!(RuntimeError::Decode("x".into()).code(), ErrorCode::Internal);
    }

    #[test]
    fn only_failures_another_instance_may_not_share_are_retryable() {
        let remote = |c| RuntimeError::Remote(RemoteError::new(c, "m"));
        let rejected = |c| RuntimeError::Rejected(RemoteError::new(c, "m"));
        assert!(RuntimeError::InstanceGone(7).is_retryable());
        assert!(
            RuntimeError::StreamGap {
                expected: 3,
                got: 5
            }
            .is_retryable()
        );
        assert!(
            remote(ErrorCode::Unavailable).is_retryable(),
            "a worker shutting down"
        );
        assert!(rejected(ErrorCode::Overloaded).is_retryable());
        for c in [
            ErrorCode::Internal,
            ErrorCode::Cancelled,
            ErrorCode::InvalidRequest,
            ErrorCode::ContextLength,
        ] {
            assert!(!remote(c).is_retryable(), "{c}");
            assert!(!rejected(c).is_retryable(), "{c}");
        }
        assert!(!RuntimeError::Decode("x".into()).is_retryable());
    }
}
