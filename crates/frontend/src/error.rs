//! The one place errors become HTTP statuses and OpenAI error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tandem_protocols::openai::{ErrorBody, ErrorResponse};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, message);
        e.param = param.map(str::to_string);
        e
    }

    pub fn context_too_long(message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message, Some("messages"));
        e.code = Some("context_length_exceeded".into());
        e
    }

    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found".into());
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {limit} bytes"),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// OpenAI's `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 | 415 => "invalid_request_error",
            404 => "not_found_error",
            503 => "service_unavailable",
            _ => "internal_error",
        }
    }

    /// Dynamo's `error_type` label of `dynamo_frontend_requests_total`.
    pub fn metric_error_type(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 | 415 | 422 => "validation",
            404 => "not_found",
            503 => "unavailable",
            429 => "overload",
            _ => "internal",
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

impl From<tandem_runtime::RuntimeError> for ApiError {
    fn from(e: tandem_runtime::RuntimeError) -> Self {
        use tandem_runtime::RuntimeError as R;
        match e {
            R::NoInstances(_) | R::NoResponders(_) | R::InstanceNotFound(_) => {
                Self::unavailable(format!("no worker available: {e}"))
            }
            other => Self::internal(other.to_string()),
        }
    }
}
