//! Extractors whose rejections speak problem+json, so every bad input gets our error
//! shape and a message naming what was wrong.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, header, request::Parts};
use serde::de::DeserializeOwned;

/// A JSON body. Requires `Content-Type: application/json`, respects the body limit, and
/// reports serde's message (field, line, column) on bad input.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "expected a body with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        parse_json(&bytes).map(Json)
    }
}

/// The error for a body that could not be read: 413 over the limit, else 400.
pub fn body_error(e: axum::extract::rejection::BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "request body is larger than the configured limit (max_body_bytes)",
        )
    } else {
        ApiError::bad_request(format!("could not read the request body: {e}"))
    }
}

/// Parses a JSON body with a message that names the problem.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde_path_to_error names the field a data error is about (`period: unknown
    // variant ...`), which serde_json's own message does not.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        match e.classify() {
            serde_json::error::Category::Data if path != "." => {
                ApiError::bad_request(format!("invalid request body: {path}: {e}"))
            }
            serde_json::error::Category::Data => {
                ApiError::bad_request(format!("invalid request body: {e}"))
            }
            _ => ApiError::bad_request(format!("malformed JSON: {e}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// [`parse_json`] for types that borrow from the body (raw JSON slices).
///
/// Nesting needs no bound ahead of the parser here (the ingest API's reader used to scan
/// every byte for one: 3% of the server's CPU at 500,000 events/s). `serde_json` stops
/// at 128 levels wherever it builds something; what it does not build, a raw slice or
/// a value skipped as ignored, it passes over without recursion, keeping one byte per
/// open level on the heap (at most the body's size). So `T` must recurse only through
/// `serde_json`'s own maps and sequences, and anything later read from a raw slice is
/// parsed by `serde_json` again, bounded the same way.
pub fn parse_json_borrowed<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "invalid request body",
            _ => "malformed JSON",
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// Query parameters, rejected as problem+json.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded_like(query).map(Query)
    }
}

fn serde_urlencoded_like<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| ApiError::bad_request("malformed query string"))?,
    )
    .map(|q| q.0)
    .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

/// A path parameter, rejected as problem+json.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| PathParam(p.0))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
    }
}
