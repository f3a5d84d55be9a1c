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

/// Deepest nesting of arrays and objects accepted, as `serde_json` allows when it builds
/// values.
pub const MAX_JSON_DEPTH: usize = 128;

/// Whether JSON text nests arrays and objects deeper than `limit`. Brackets inside
/// strings do not count. The text need not be valid: this only bounds the work done on
/// it.
pub fn nests_deeper_than(bytes: &[u8], limit: usize) -> bool {
    // This scan reads every byte of every ingest batch, ahead of the parser, so runs of
    // bytes that need no decision are skipped eight at a time (see `skip`).
    const fn table(special: &[u8]) -> [bool; 256] {
        let mut t = [false; 256];
        let mut i = 0;
        while i < special.len() {
            t[special[i] as usize] = true;
            i += 1;
        }
        t
    }
    static OUTSIDE: [bool; 256] = table(b"\"[]{}");
    static INSIDE: [bool; 256] = table(b"\"\\");
    let mut depth = 0usize;
    let mut i = 0;
    loop {
        i = skip(bytes, i, &OUTSIDE, |w| {
            eq(w, b'"') | eq(w & splat(!0x26), 0x59)
        });
        let Some(&b) = bytes.get(i) else {
            return false;
        };
        i += 1;
        match b {
            b'"' => {
                // Skip the string, honouring escapes.
                loop {
                    i = skip(bytes, i, &INSIDE, |w| eq(w, b'"') | eq(w, b'\\'));
                    match bytes.get(i) {
                        Some(b'\\') => i += 2,
                        Some(_) => {
                            i += 1;
                            break;
                        }
                        None => return false,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            _ => depth = depth.saturating_sub(1),
        }
    }
}

/// `byte` in each of a word's eight bytes.
const fn splat(byte: u8) -> u64 {
    u64::from_ne_bytes([byte; 8])
}

/// A word with the high bit set in the lowest byte of `word` equal to `byte` (bits above
/// that one may be set too, wrongly, by the borrow; bits below are exact), and zero if
/// no byte is equal.
#[inline(always)]
fn eq(word: u64, byte: u8) -> u64 {
    let v = word ^ splat(byte);
    v.wrapping_sub(splat(1)) & !v & splat(0x80)
}

/// The index of the first byte at or after `i` that `special` marks, or `bytes.len()`.
/// `candidates` flags, within a little-endian word, the lowest byte that may be special
/// (a superset is fine: each flagged byte is checked in the table). Eight bytes a step
/// instead of one: the scan's strings and gaps are mostly longer than a word. Written
/// by hand because `memchr` finds at most three distinct bytes and its vector set-up
/// does not pay for runs this short.
#[inline(always)]
fn skip(
    bytes: &[u8],
    mut i: usize,
    special: &[bool; 256],
    candidates: impl Fn(u64) -> u64,
) -> usize {
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let flagged = candidates(u64::from_le_bytes(word));
        if flagged == 0 {
            i += 8;
            continue;
        }
        let at = i + (flagged.trailing_zeros() / 8) as usize;
        if special[bytes[at] as usize] {
            return at;
        }
        i = at + 1;
    }
    while i < bytes.len() && !special[bytes[i] as usize] {
        i += 1;
    }
    i
}

/// [`parse_json`] for types that borrow from the body (raw JSON slices). Raw slices are
/// not parsed into values, so nesting is bounded here, as [`parse_json`] bounds it.
pub fn parse_json_borrowed<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    if nests_deeper_than(bytes, MAX_JSON_DEPTH) {
        return Err(ApiError::bad_request(format!(
            "malformed JSON: recursion limit exceeded (nesting deeper than {MAX_JSON_DEPTH})"
        )));
    }
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

#[cfg(test)]
mod depth_tests {
    use super::nests_deeper_than;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        assert!(!nests_deeper_than(br#"[{"a": [1, 2]}]"#, 3));
        assert!(nests_deeper_than(br#"[{"a": [[1]]}]"#, 3));
        // Brackets and escaped quotes inside strings are text.
        assert!(!nests_deeper_than(br#"[{"a": "[[[[\"[[[["}]"#, 2));
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert!(nests_deeper_than(deep.as_bytes(), 128));
        assert!(!nests_deeper_than(&deep.as_bytes()[1..deep.len() - 1], 128));
    }

    /// The plain byte-by-byte scan the table-driven one must agree with.
    fn reference(bytes: &[u8], limit: usize) -> bool {
        let (mut depth, mut i) = (0usize, 0);
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    i += 1;
                    while i < bytes.len() {
                        match bytes[i] {
                            b'\\' => i += 2,
                            b'"' => break,
                            _ => i += 1,
                        }
                    }
                }
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            i += 1;
        }
        false
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_plain_scan(
            text in proptest::collection::vec(
                // Y _ y and DEL share the brackets' bits under the word scan's mask;
                // bytes above 0x7f test its borrow.
                proptest::sample::select(b"\"\\[]{}a: Y_y\x7f\xff\x80".to_vec()), 0..200),
            limit in 0usize..6,
        ) {
            proptest::prop_assert_eq!(nests_deeper_than(&text, limit), reference(&text, limit));
        }

        #[test]
        fn agrees_with_the_plain_scan_over_long_runs(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "\"", "\\", "[", "]", "{", "}", "abcdefghijklmnopq", "Y_y\x7f", "词元词元",
                    "0123456", ": ", "[[[[[[[[", "]]]]]]]]",
                ]),
                0..40,
            ),
            limit in 0usize..12,
        ) {
            let text = pieces.concat();
            proptest::prop_assert_eq!(
                nests_deeper_than(text.as_bytes(), limit),
                reference(text.as_bytes(), limit)
            );
        }
    }
}
