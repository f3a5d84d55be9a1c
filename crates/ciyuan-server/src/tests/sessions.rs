//! Console sessions: a key exchanged for a cookie that acts exactly as the key, CSRF
//! tokens on changes, sign-out, expiry, revocation and the sign-in limit.

use super::*;
use crate::sessions::{CSRF_HEADER, SESSION_COOKIE, SIGN_INS_PER_WINDOW};
use sha2::Digest;

/// Sends a request with the given extra headers; answers status, headers and JSON.
async fn raw(
    h: &Harness,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = h.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    // The gateway answers in the providers' error shapes; the rest in problem+json.
    if status.is_client_error() && !uri.starts_with("/v1/") {
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/problem+json",
            "{status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Signs in with `key`; answers the cookie header to send and the CSRF token.
async fn sign_in(h: &Harness, key: &str) -> (String, String) {
    let (s, headers, v) = raw(
        h,
        "POST",
        "/api/v1/sessions",
        &[],
        Some(json!({ "key": key })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let set = headers.get("set-cookie").unwrap().to_str().unwrap();
    let pair = set.split(';').next().unwrap().to_string();
    assert!(pair.starts_with(&format!("{SESSION_COOKIE}=")));
    (pair, v["csrf_token"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn a_session_acts_exactly_as_its_key_and_changes_need_the_csrf_token() {
    let h = harness().await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme/cn"})))
        .await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "other"})))
        .await;
    let owner = h.key("acme", &["admin"]).await;
    let reader = h.key("acme/cn", &["read"]).await;

    // A wrong key is refused, and the answer does not repeat it.
    let bad = format!("cy_000000000000_{}", "0".repeat(64));
    let (s, headers, v) = raw(
        &h,
        "POST",
        "/api/v1/sessions",
        &[],
        Some(json!({"key": bad})),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(headers.get("set-cookie").is_none());
    assert!(!v.to_string().contains(&bad), "{v}");

    // The cookie: HttpOnly, SameSite=Strict, Path=/, an expiry; Secure behind https.
    let (s, headers, v) = raw(
        &h,
        "POST",
        "/api/v1/sessions",
        &[],
        Some(json!({"key": owner})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let set = headers.get("set-cookie").unwrap().to_str().unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(part), "{set}");
    }
    assert!(!set.contains("Secure"), "plain http: {set}");
    assert_eq!(headers.get("cache-control").unwrap(), "no-store");
    assert_eq!(v["account"], "acme");
    assert_eq!(v["scopes"], json!(["admin"]));
    assert!(v["expires_at"].is_string());
    assert!(
        !v.to_string().contains(&owner),
        "the key is not echoed: {v}"
    );
    let (_, headers, _) = raw(
        &h,
        "POST",
        "/api/v1/sessions",
        &[("x-forwarded-proto", "https")],
        Some(json!({"key": owner})),
    )
    .await;
    assert!(
        headers
            .get("set-cookie")
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("; Secure")
    );

    let (cookie, csrf) = sign_in(&h, &owner).await;
    let with = |extra: &'static [(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = vec![("cookie", cookie.as_str())];
        v.extend_from_slice(extra);
        v
    };
    // Reading within the key's subtree works; outside it is refused as for the key.
    let (s, _, v) = raw(&h, "GET", "/api/v1/accounts/acme/cn", &with(&[]), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = raw(&h, "GET", "/api/v1/accounts/other", &with(&[]), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _, v) = raw(&h, "GET", "/api/v1/sessions/current", &with(&[]), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["csrf_token"], csrf.as_str());
    assert_eq!(v["account"], "acme");

    // A change without the token, or with another, is refused; with it, made.
    let create = json!({"path": "acme/us"});
    let (s, _, v) = raw(
        &h,
        "POST",
        "/api/v1/accounts",
        &with(&[]),
        Some(create.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["type"].as_str().unwrap().ends_with("csrf"), "{v}");
    let wrong = "0".repeat(64);
    let mut hs = with(&[]);
    hs.push((CSRF_HEADER, wrong.as_str()));
    let (s, _, _) = raw(&h, "POST", "/api/v1/accounts", &hs, Some(create.clone())).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let mut hs = with(&[]);
    hs.push((CSRF_HEADER, csrf.as_str()));
    let (s, _, v) = raw(&h, "POST", "/api/v1/accounts", &hs, Some(create)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // The key's limits hold: an admin of acme cannot create outside it.
    let (s, _, _) = raw(
        &h,
        "POST",
        "/api/v1/accounts",
        &hs,
        Some(json!({"path": "other/x"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The cookie is for the admin API only: the gateway takes keys.
    let (s, _, _) = raw(&h, "GET", "/v1/models", &with(&[]), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A reader's session reads and cannot write, token or not.
    let (rc, rcsrf) = sign_in(&h, &reader).await;
    let hs = vec![("cookie", rc.as_str()), (CSRF_HEADER, rcsrf.as_str())];
    let (s, _, v) = raw(&h, "GET", "/api/v1/usage?account=acme/cn", &hs, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, _) = raw(
        &h,
        "POST",
        "/api/v1/accounts",
        &hs,
        Some(json!({"path": "acme/cn/x"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Sign-out needs the token, ends the session, and clears the cookie.
    let (s, _, _) = raw(&h, "DELETE", "/api/v1/sessions/current", &with(&[]), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let mut hs = with(&[]);
    hs.push((CSRF_HEADER, csrf.as_str()));
    let (s, headers, _) = raw(&h, "DELETE", "/api/v1/sessions/current", &hs, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        headers
            .get("set-cookie")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (s, _, v) = raw(&h, "GET", "/api/v1/accounts/acme", &with(&[]), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("signed out"), "{v}");

    // Revoking the key ends its sessions.
    let (rc2, _) = sign_in(&h, &reader).await;
    let reader_id = &reader[3..15];
    let (s, _) = h
        .admin("DELETE", &format!("/api/v1/keys/{reader_id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = raw(
        &h,
        "GET",
        "/api/v1/accounts/acme/cn",
        &[("cookie", rc2.as_str())],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("revoked"), "{v}");

    // A key in the headers decides over a cookie.
    let (s, _, v) = raw(
        &h,
        "GET",
        "/api/v1/accounts/other",
        &[
            ("cookie", rc2.as_str()),
            ("authorization", &format!("Bearer {}", h.admin)),
        ],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn expired_and_unknown_sessions_are_refused() {
    let h = harness().await;
    let (cookie, _) = sign_in(&h, &h.admin.clone()).await;
    let id = cookie.split('=').nth(1).unwrap();
    let hash: [u8; 32] = sha2::Sha256::digest(id.as_bytes()).into();
    let stored = h.app.store().session(&hash).unwrap().unwrap();
    assert_eq!(stored.expires_at - stored.created_at, 12 * 3600);
    // The store never sees the id itself: its hash finds it, the id does not.
    let mut as_id = [0u8; 32];
    as_id.copy_from_slice(&hex::decode(id).unwrap());
    assert!(h.app.store().session(&as_id).unwrap().is_none());

    let past = ciyuan_store::SessionRecord {
        expires_at: Timestamp::now().as_second() - 1,
        ..stored
    };
    let old = "ab".repeat(32);
    let old_hash: [u8; 32] = sha2::Sha256::digest(old.as_bytes()).into();
    h.app.store().insert_session(&old_hash, &past).unwrap();
    let c = format!("{SESSION_COOKIE}={old}");
    let (s, _, v) = raw(
        &h,
        "GET",
        "/api/v1/accounts",
        &[("cookie", c.as_str())],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["detail"].as_str().unwrap().contains("expired"), "{v}");
    let c = format!("{SESSION_COOKIE}={}", "cd".repeat(32));
    let (s, _, _) = raw(
        &h,
        "GET",
        "/api/v1/accounts",
        &[("cookie", c.as_str())],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = raw(
        &h,
        "GET",
        "/api/v1/accounts",
        &[("cookie", "ciyuan_session=not-a-session")],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Other cookies of the host leave a request to the usual key check.
    let (s, _, v) = raw(
        &h,
        "GET",
        "/api/v1/accounts",
        &[("cookie", "theme=dark")],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        v["detail"].as_str().unwrap().contains("missing API key"),
        "{v}"
    );
}

#[tokio::test]
async fn sign_in_attempts_are_limited() {
    let h = harness().await;
    let bad = format!("cy_000000000000_{}", "0".repeat(64));
    for _ in 0..SIGN_INS_PER_WINDOW {
        let (s, _, _) = raw(
            &h,
            "POST",
            "/api/v1/sessions",
            &[],
            Some(json!({"key": bad})),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // Even the right key waits now.
    let (s, headers, v) = raw(
        &h,
        "POST",
        "/api/v1/sessions",
        &[],
        Some(json!({"key": h.admin})),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(headers.get("retry-after").is_some());
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_browsers_are_sent_to_it() {
    let h = harness().await;
    for (path, ty) in [
        ("/console/", "text/html; charset=utf-8"),
        ("/console", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
        (
            "/console/vendor/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
        ),
    ] {
        let (s, headers, _) = raw(&h, "GET", path, &[], None).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert_eq!(headers.get("content-type").unwrap(), ty, "{path}");
        let csp = headers
            .get("content-security-policy")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"));
        assert_eq!(headers.get("x-content-type-options").unwrap(), "nosniff");
        assert_eq!(headers.get("cache-control").unwrap(), "no-cache");
    }
    let (s, _, _) = raw(&h, "GET", "/console/nope.js", &[], None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, headers, _) = raw(&h, "GET", "/", &[("accept", "text/html,*/*")], None).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(headers.get("location").unwrap(), "/console/");
    let (s, _, _) = raw(&h, "GET", "/", &[("accept", "application/json")], None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
