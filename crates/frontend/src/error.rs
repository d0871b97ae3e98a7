//! The one place failures become HTTP statuses, OpenAI error bodies and metric labels.
//!
//! Every failure has a class ([`ErrorCode`], the request plane's own, so a worker's error keeps
//! its class on the way here). The class decides the status, OpenAI's `type` and the
//! `error_type` label of `dynamo_frontend_requests_total`; a few statuses that only HTTP has
//! (405, 413, 415) are set by their constructors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tandem_protocols::openai::{ErrorBody, ErrorResponse};
use tandem_runtime::{ErrorCode, RuntimeError};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub class: ErrorCode,
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Dynamo's status for an overloaded service.
const OVERLOADED: u16 = 529;
/// "Client closed request", the status Dynamo classifies cancelled requests under.
const CLIENT_CLOSED: u16 = 499;

fn status_of(class: ErrorCode) -> StatusCode {
    let code = match class {
        ErrorCode::InvalidRequest | ErrorCode::ContextLength => 400,
        ErrorCode::NotFound => 404,
        ErrorCode::Overloaded => OVERLOADED,
        ErrorCode::Unavailable => 503,
        ErrorCode::Cancelled => CLIENT_CLOSED,
        ErrorCode::Internal => 500,
    };
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl ApiError {
    pub fn new(class: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            class,
            status: status_of(class),
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message).with_param(param)
    }

    pub fn with_param(mut self, param: Option<&str>) -> Self {
        self.param = param.map(str::to_string);
        self
    }

    /// A field tandem does not implement yet, used with a value that would need it.
    pub fn unsupported(param: &str, what: &str) -> Self {
        let mut e = Self::invalid(
            format!("`{param}` {what} is not supported by this server"),
            Some(param),
        );
        e.code = Some("unsupported_parameter".into());
        e
    }

    pub fn context_too_long(message: impl Into<String>, param: &str) -> Self {
        let mut e = Self::new(ErrorCode::ContextLength, message).with_param(Some(param));
        e.code = Some("context_length_exceeded".into());
        e
    }

    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            ErrorCode::NotFound,
            format!("The model `{model}` does not exist."),
        )
        .with_param(Some("model"));
        e.code = Some("model_not_found".into());
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// The frontend's own limits refused the request (admission): 503, for clients and load
    /// balancers that retry on it, with `Retry-After` added by the HTTP layer.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Overloaded, message).with_status(StatusCode::SERVICE_UNAVAILABLE)
    }

    /// `--request-timeout-secs` passed: 504, counted as `unavailable`.
    pub fn timeout(limit: std::time::Duration) -> Self {
        let mut e = Self::new(
            ErrorCode::Unavailable,
            format!("the request did not finish within {limit:?}"),
        )
        .with_status(StatusCode::GATEWAY_TIMEOUT);
        e.code = Some("timeout".into());
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn route_not_found() -> Self {
        Self::new(ErrorCode::NotFound, "Route not found")
    }

    fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn too_large(limit: usize) -> Self {
        Self::invalid(format!("request body exceeds {limit} bytes"), None)
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    }

    pub fn unsupported_media_type() -> Self {
        Self::invalid("Content-Type must be application/json", None)
            .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
    }

    pub fn method_not_allowed() -> Self {
        Self::invalid("Method not allowed for this route", None)
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
    }

    /// OpenAI's `type`.
    pub fn kind(&self) -> &'static str {
        match self.class {
            ErrorCode::InvalidRequest | ErrorCode::ContextLength => "invalid_request_error",
            ErrorCode::NotFound => "not_found_error",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "service_unavailable",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal_error",
        }
    }

    /// Dynamo's `error_type` label of `dynamo_frontend_requests_total`.
    pub fn metric_error_type(&self) -> &'static str {
        match self.class {
            ErrorCode::InvalidRequest | ErrorCode::ContextLength => "validation",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Overloaded => "overload",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind().to_string(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A request-plane failure keeps its class; a worker's own message is passed on.
impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        let class = e.code();
        let message = match &e {
            RuntimeError::Remote(r) | RuntimeError::Rejected(r) => r.message.clone(),
            other if class == ErrorCode::Unavailable => format!("no worker available: {other}"),
            other => other.to_string(),
        };
        let mut api = Self::new(class, message);
        if class == ErrorCode::ContextLength {
            api.code = Some("context_length_exceeded".into());
        }
        api
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_runtime::RemoteError;

    #[test]
    fn classes_map_once_to_status_type_and_label() {
        let table = [
            (
                ErrorCode::InvalidRequest,
                400,
                "invalid_request_error",
                "validation",
            ),
            (
                ErrorCode::ContextLength,
                400,
                "invalid_request_error",
                "validation",
            ),
            (ErrorCode::NotFound, 404, "not_found_error", "not_found"),
            (ErrorCode::Overloaded, 529, "overloaded", "overload"),
            (
                ErrorCode::Unavailable,
                503,
                "service_unavailable",
                "unavailable",
            ),
            (ErrorCode::Cancelled, 499, "cancelled", "cancelled"),
            (ErrorCode::Internal, 500, "internal_error", "internal"),
        ];
        for (class, status, kind, label) in table {
            let e = ApiError::from(RuntimeError::Remote(RemoteError::new(class, "m")));
            assert_eq!(e.status.as_u16(), status, "{class}");
            assert_eq!(e.kind(), kind);
            assert_eq!(e.metric_error_type(), label);
            assert_eq!(e.message, "m");
        }
        let gone = ApiError::from(RuntimeError::Disconnected);
        assert_eq!(gone.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            ApiError::method_not_allowed().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
