//! Errors of the admin API, answered as RFC 9457 `application/problem+json`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ciyuan_store::{LogError, StoreError};

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short stable identifier, the last part of the problem type URI.
    pub slug: &'static str,
    /// What went wrong, for a person.
    pub detail: String,
    /// Seconds after which a retry may succeed.
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            slug,
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// 401: no valid key.
    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    /// 403: the key may not do this.
    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    /// 404: no such thing.
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// 409: it exists already.
    pub fn conflict(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 422: well-formed but not acceptable.
    pub fn unprocessable(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", detail)
    }

    /// 503: try again later.
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail);
        e.retry_after_secs = Some(1);
        e
    }

    /// 500: our fault. The cause is logged once here; the client gets no internals.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(%cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the cause",
        )
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Conflict(m) => ApiError::conflict(m),
            // The database is restarting or out of reach, or the transaction lost a
            // race: nothing took effect and the same request may succeed in a moment.
            e @ StoreError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> ApiError {
        match e {
            LogError::Invalid(m) => ApiError::unprocessable(m),
            LogError::Unavailable(m) => ApiError::unavailable(m),
            LogError::Io(m) => ApiError::internal(m),
            // Only a keyed append is refused so, and the ingest door answers it
            // itself; anywhere else, the client sent what another node is recording.
            e @ LogError::Duplicate(_) => ApiError::conflict(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("urn:ciyuan:problem:{}", self.slug),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut resp = (self.status, body.to_string()).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
