//! Console sessions: a Ciyuan key exchanged for a cookie, so the browser never keeps
//! the key itself.
//!
//! `POST /api/v1/sessions` takes a key in its body and answers with a session cookie
//! (`ciyuan_session`: 256 random bits, `HttpOnly; SameSite=Strict; Path=/`, `Secure`
//! when the request came over https through a proxy) and a CSRF token. The store keeps
//! only the SHA-256 of the session id, the key it acts as and its absolute expiry
//! ([`SESSION_LIFETIME`]), through the `Store` trait, so every node on one database
//! knows every session and a sign-out on one ends it on all.
//!
//! A session acts exactly as its key: the caller is the key's record, read from the
//! store on every request and judged by the same `auth::checked` as a bearer key's, so
//! its scopes and subtree are the key's and revoking the key ends its sessions. A
//! request authenticated by the cookie that changes anything (any method but GET and
//! HEAD) must carry the session's CSRF token in `x-csrf-token`; a page of another site
//! cannot read it (the token is derived from the HttpOnly session id and handed out
//! only in same-origin answers), so it cannot forge one.
//!
//! Sign-in attempts are limited per client address ([`SIGN_INS_PER_WINDOW`] per
//! [`SIGN_IN_WINDOW`]); the key is never logged, and no answer repeats it.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Json;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ciyuan_core::jiff::Timestamp;
use ciyuan_store::SessionRecord;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "ciyuan_session";
/// Header carrying the CSRF token on state-changing requests made with the cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts from sign-in, whatever its use (absolute, not sliding).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sign-in attempts allowed per client address in one window.
pub const SIGN_INS_PER_WINDOW: u32 = 10;
/// The window over which sign-in attempts are counted.
pub const SIGN_IN_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses tracked by the limiter before windows that ended are dropped.
const MAX_TRACKED_ADDRESSES: usize = 10_000;
/// Hex digits of a session id (256 bits).
const SESSION_HEX: usize = 64;

/// Counts sign-in attempts per client address in fixed windows.
#[derive(Default)]
pub struct SignInLimiter {
    windows: Mutex<HashMap<Option<IpAddr>, (Instant, u32)>>,
}

impl SignInLimiter {
    /// Counts one attempt from `addr` (`None`: an address the listener did not give,
    /// one bucket for all such); refuses with 429 and the seconds to wait once the
    /// window's attempts are spent.
    pub fn attempt(&self, addr: Option<IpAddr>, now: Instant) -> Result<(), ApiError> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_TRACKED_ADDRESSES && !windows.contains_key(&addr) {
            windows.retain(|_, (start, _)| now.duration_since(*start) < SIGN_IN_WINDOW);
            // Still full of live windows: a flood from that many addresses. Forgetting
            // them all lets each try again sooner, which is better than refusing
            // every new address (a lockout anyone could cause).
            if windows.len() >= MAX_TRACKED_ADDRESSES {
                windows.clear();
            }
        }
        let (start, count) = windows.entry(addr).or_insert((now, 0));
        let elapsed = now.duration_since(*start);
        if elapsed >= SIGN_IN_WINDOW {
            *start = now;
            *count = 0;
        }
        if *count >= SIGN_INS_PER_WINDOW {
            let wait = SIGN_IN_WINDOW.saturating_sub(now.duration_since(*start));
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-sign-ins",
                format!(
                    "too many sign-in attempts from this address: at most {SIGN_INS_PER_WINDOW} a minute"
                ),
            );
            e.retry_after_secs = Some(wait.as_secs().max(1));
            return Err(e);
        }
        *count += 1;
        Ok(())
    }
}

/// A fresh random session id (64 hex digits).
fn new_session_id() -> Result<String, ApiError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(ApiError::internal)?;
    Ok(hex::encode(raw))
}

/// What the store keeps of a session id.
fn id_hash(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// The CSRF token of a session: derived from its secret id, so it needs no storage and
/// only someone who holds the id (or was told the token by a same-origin answer) has it.
pub fn csrf_token(id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"ciyuan console csrf\0");
    h.update(id.as_bytes());
    hex::encode(h.finalize())
}

/// Compares two strings in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of the session cookie, whatever its shape.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
}

/// The session id in the request's cookies, if it has the session's shape.
fn session_id(headers: &HeaderMap) -> Option<&str> {
    session_cookie(headers)
        .filter(|v| v.len() == SESSION_HEX && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether a request is to be authenticated by its session cookie: it names no key
/// (a key, when given, always decides), it is for the admin API (the gateway and the
/// ingest API take keys only), and it carries the session cookie (other cookies of
/// the host are not ours to judge).
pub(crate) fn by_cookie(parts: &Parts) -> bool {
    parts.uri.path().starts_with("/api/v1/")
        && !parts.headers.contains_key(header::AUTHORIZATION)
        && !parts.headers.contains_key("x-api-key")
        && session_cookie(&parts.headers).is_some()
}

/// Whether a method changes state (and so needs the CSRF token with a cookie).
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

impl App {
    /// The caller a session cookie stands for: its key, judged as a bearer key is.
    pub(crate) async fn session_caller(
        self: &Arc<Self>,
        parts: &Parts,
    ) -> Result<Caller, ApiError> {
        let Some(id) = session_id(&parts.headers) else {
            return Err(ApiError::unauthorized(format!(
                "the {SESSION_COOKIE} cookie is not a session id; sign in again"
            )));
        };
        if changes_state(&parts.method) {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same(sent, &csrf_token(id)) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    format!(
                        "a {} made with a session cookie needs the session's CSRF token in {CSRF_HEADER}",
                        parts.method
                    ),
                ));
            }
        }
        let hash = id_hash(id);
        let now = Timestamp::now().as_second();
        self.blocking(move |app| {
            let session = app
                .store
                .session(&hash)?
                .ok_or_else(|| ApiError::unauthorized("unknown session; sign in again"))?;
            if session.revoked_at.is_some() {
                return Err(ApiError::unauthorized(
                    "the session was signed out; sign in again",
                ));
            }
            if now >= session.expires_at {
                return Err(ApiError::unauthorized(
                    "the session has expired; sign in again",
                ));
            }
            app.auth.by_id(&session.key_id)
        })
        .await
    }
}

/// `POST /api/v1/sessions`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    key: String,
}

/// Who a session (or a key) acts as.
#[derive(Serialize)]
struct Current {
    key_id: String,
    account: String,
    scopes: ciyuan_core::Scopes,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// Present for a session: the token to send in `x-csrf-token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    csrf_token: Option<String>,
    /// Present for a session: when it ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<Timestamp>,
}

impl Current {
    fn of(caller: &Caller) -> Current {
        Current {
            key_id: caller.key.key_id.clone(),
            account: caller.key.account.to_string(),
            scopes: caller.key.scopes,
            name: caller.key.name.clone(),
            csrf_token: None,
            expires_at: None,
        }
    }
}

/// The client's address, as the listener recorded it.
fn client(parts_ext: &axum::http::Extensions) -> Option<IpAddr> {
    parts_ext
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Whether the request reached us over https: this server speaks plain HTTP, so only
/// a proxy in front of it that terminates TLS can say so.
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn cookie(value: &str, max_age: u64, secure: bool) -> Result<HeaderValue, ApiError> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}"
    ))
    .map_err(ApiError::internal)
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST /api/v1/sessions`: signs in with a key.
pub async fn create(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    app.sign_ins
        .attempt(client(&parts.extensions), Instant::now())?;
    let req = axum::extract::Request::from_parts(parts.clone(), body);
    let Json(SignIn { key }) =
        <Json<SignIn> as axum::extract::FromRequest<Arc<App>>>::from_request(req, &app).await?;
    let caller = {
        let key = key.clone();
        app.blocking(move |app| app.auth.authenticate(&key)).await?
    };
    drop(key);
    let id = new_session_id()?;
    let now = Timestamp::now();
    let lifetime = SESSION_LIFETIME.as_secs();
    let record = SessionRecord {
        key_id: caller.key.key_id.clone(),
        created_at: now.as_second(),
        expires_at: now.as_second() + lifetime as i64,
        revoked_at: None,
    };
    let hash = id_hash(&id);
    app.blocking(move |app| {
        // Expired sessions are dropped as new ones come: the table holds about a
        // lifetime's sign-ins.
        app.store.purge_sessions(now.as_second())?;
        Ok(app.store.insert_session(&hash, &record)?)
    })
    .await?;
    let mut current = Current::of(&caller);
    current.csrf_token = Some(csrf_token(&id));
    current.expires_at = Some(
        Timestamp::from_second(now.as_second() + lifetime as i64).map_err(ApiError::internal)?,
    );
    let mut resp = (StatusCode::CREATED, axum::Json(current)).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        cookie(&id, lifetime, over_https(&parts.headers))?,
    );
    tracing::info!(key_id = %caller.key.key_id, "console session opened");
    Ok(no_store(resp))
}

/// `GET /api/v1/sessions/current`: who the cookie (or key) acts as, and for a session
/// its CSRF token (a reloaded page learns it here).
pub async fn current(State(app): State<Arc<App>>, parts: Parts) -> Result<Response, ApiError> {
    let mut parts = parts;
    let caller =
        <Caller as axum::extract::FromRequestParts<Arc<App>>>::from_request_parts(&mut parts, &app)
            .await?;
    let mut current = Current::of(&caller);
    if by_cookie(&parts)
        && let Some(id) = session_id(&parts.headers)
    {
        current.csrf_token = Some(csrf_token(id));
        let hash = id_hash(id);
        let session = app
            .blocking(move |app| Ok(app.store.session(&hash)?))
            .await?;
        current.expires_at = session
            .map(|s| Timestamp::from_second(s.expires_at))
            .transpose()
            .map_err(ApiError::internal)?;
    }
    Ok(no_store(axum::Json(current).into_response()))
}

/// `DELETE /api/v1/sessions/current`: signs out (the session ends on every node).
pub async fn delete(State(app): State<Arc<App>>, parts: Parts) -> Result<Response, ApiError> {
    if !by_cookie(&parts) {
        return Err(ApiError::bad_request(
            "no session to sign out of: this request names a key, or carries no session cookie",
        ));
    }
    let mut p = parts;
    // The same checks as any request with the cookie: a live session and its token.
    <Caller as axum::extract::FromRequestParts<Arc<App>>>::from_request_parts(&mut p, &app).await?;
    let Some(id) = session_id(&p.headers) else {
        return Err(ApiError::unauthorized("no session id in the cookie"));
    };
    let hash = id_hash(id);
    let at = Timestamp::now().as_second();
    app.blocking(move |app| Ok(app.store.revoke_session(&hash, at)?))
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0, over_https(&p.headers))?);
    Ok(no_store(resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_ins_are_limited_per_address_and_window() {
        let limiter = SignInLimiter::default();
        let t0 = Instant::now();
        let a: Option<IpAddr> = Some([10, 0, 0, 1].into());
        let b: Option<IpAddr> = Some([10, 0, 0, 2].into());
        for _ in 0..SIGN_INS_PER_WINDOW {
            limiter.attempt(a, t0).unwrap();
        }
        let refused = limiter.attempt(a, t0 + Duration::from_secs(1)).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.retry_after_secs, Some(59));
        // Another address has its own count.
        limiter.attempt(b, t0).unwrap();
        // The next window starts afresh.
        limiter.attempt(a, t0 + SIGN_IN_WINDOW).unwrap();
    }

    #[test]
    fn the_session_cookie_is_read_only_in_its_shape() {
        let id = new_session_id().unwrap();
        assert_eq!(id.len(), SESSION_HEX);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {SESSION_COOKIE}={id}; c=d")).unwrap(),
        );
        assert_eq!(session_id(&h), Some(id.as_str()));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("ciyuan_session=short"),
        );
        assert_eq!(session_id(&h), None);
        h.insert(header::COOKIE, HeaderValue::from_static("other=1"));
        assert_eq!(session_id(&h), None);
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_compare_exactly() {
        let (a, b) = (new_session_id().unwrap(), new_session_id().unwrap());
        assert_ne!(csrf_token(&a), csrf_token(&b));
        assert_ne!(csrf_token(&a), a, "the token is not the id");
        assert!(same(&csrf_token(&a), &csrf_token(&a)));
        assert!(!same(&csrf_token(&a), &csrf_token(&b)));
        assert!(!same("", &csrf_token(&a)));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_behind_https() {
        let c = cookie("ab", 60, false).unwrap();
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
        assert!(!c.contains("Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(over_https(&h));
        assert!(
            cookie("ab", 60, true)
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with("; Secure")
        );
    }
}
