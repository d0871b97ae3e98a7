//! API keys: with `--api-key` (or `DYN_API_KEY`), every `/v1/*` request must carry
//! `Authorization: Bearer <key>`; anything else gets 401 with the OpenAI error envelope
//! (`invalid_request_error`, code `invalid_api_key`), as OpenAI answers a wrong key.
//! `/health`, `/live` and `/metrics` stay open, unless `--protect-metrics` puts `/metrics`
//! behind the key too (probes must reach the health paths).
//!
//! The comparison takes the same time wherever the keys differ, so response times do not leak
//! how much of a guess was right; the key is never logged (its `Debug` is redacted).

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::fmt;
use std::sync::Arc;
use tandem_runtime::ErrorCode;

/// The key clients must present. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: &str) -> Result<Self, String> {
        if key.trim().is_empty() {
            return Err("the API key must not be empty".into());
        }
        Ok(Self(key.to_string()))
    }

    /// Constant-time: every byte of the longer of the two is looked at.
    fn matches(&self, presented: &[u8]) -> bool {
        let want = self.0.as_bytes();
        let len = want.len().max(presented.len());
        let mut diff = want.len() ^ presented.len();
        for i in 0..len {
            let a = want.get(i).copied().unwrap_or(0);
            let b = presented.get(i).copied().unwrap_or(0);
            diff |= usize::from(a ^ b);
        }
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::new(s)
    }
}

fn unauthorized(message: &str) -> Response {
    let mut e = ApiError::new(ErrorCode::InvalidRequest, message);
    e.status = StatusCode::UNAUTHORIZED;
    e.code = Some("invalid_api_key".into());
    let mut resp = e.into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// Middleware: lets a request through only with the right bearer token.
pub async fn require_key(State(key): State<Arc<ApiKey>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => {
            unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        }
        Some(k) if !key.matches(k.trim().as_bytes()) => unauthorized("Incorrect API key provided."),
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly_and_never_show() {
        let k = ApiKey::new("sk-secret").unwrap();
        assert!(k.matches(b"sk-secret"));
        for bad in [
            &b"sk-secreT"[..],
            b"sk-secret ",
            b"sk-secre",
            b"",
            b"sk-secretsk-secret",
        ] {
            assert!(!k.matches(bad), "{bad:?}");
        }
        assert!(!format!("{k:?}").contains("secret"));
        assert!(ApiKey::new("  ").is_err());
    }
}
