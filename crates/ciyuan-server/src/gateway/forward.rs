//! Forwarding: a request to its provider (the headers that go and that come back),
//! the answer relayed or read whole, and the unmetered token count.

use super::*;

/// Largest whole (not streamed) answer read from a provider: embeddings of a large
/// batch run to a hundred megabytes; a provider sending more is broken.
pub(super) const MAX_ANSWER_BYTES: usize = 256 << 20;

/// Largest answer read from `count_tokens` (a provider's is a few dozen bytes).
pub(super) const MAX_COUNT_ANSWER_BYTES: usize = 1 << 20;

/// `POST /v1/messages/count_tokens`: Anthropic's count of a prompt, asked of the
/// provider that serves its model. Authenticated and held to the key's access rules
/// like a request (a model the key may not use is refused), but it consumes no tokens:
/// never admitted against budgets or wallets, never recorded.
pub async fn count_tokens(
    State(app): State<Arc<App>>,
    headers: TakenHeaders,
    req: Request,
) -> Response {
    let family = Family::Anthropic;
    let headers = headers.0;
    let caller = match caller(&app, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(family),
    };
    let body = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(e) => return GatewayError::from(crate::extract::body_error(e)).into_response(family),
    };
    let bad = |m: String| GatewayError::new(StatusCode::BAD_REQUEST, m).into_response(family);
    let model = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(o)) => match o.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(_) => return bad("model: must be a non-empty string".into()),
            None => return bad("model: required".into()),
        },
        Ok(_) => return bad("the request body must be a JSON object".into()),
        Err(e) => return bad(format!("the request body is not valid JSON: {e}")),
    };
    if let Err((field, problem)) = bounded("model", &model) {
        return bad(format!("{field}: {problem}"));
    }
    if let Err(refusal) = app.budget.check_model(&caller.key.account, &model) {
        return refused(family, refusal);
    }
    let gw = &app.gateway;
    let i = match gw.route(family, &model) {
        Ok(i) => i,
        Err(e) => return e.into_response(family),
    };
    let provider = &gw.config.providers[i];
    let Some(uri) = gw.count_tokens_urls[i].clone() else {
        return GatewayError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("provider {} has no count_tokens endpoint", provider.name),
        )
        .into_response(family);
    };
    let mut up = hyper::Request::new(Full::new(body));
    *up.method_mut() = Method::POST;
    *up.uri_mut() = uri;
    let out = up.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    provider_headers(gw, i, &headers, out);
    if !out.contains_key("anthropic-version") {
        out.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
    }
    let answered = tokio::time::timeout(provider.timeout, async {
        let resp = gw
            .clients
            .request(i, up)
            .await
            .map_err(|e| error_chain(&e))?;
        let (parts, incoming) = resp.into_parts();
        let bytes = http_body_util::Limited::new(incoming, MAX_COUNT_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| error_chain(e.as_ref()))?
            .to_bytes();
        Ok::<_, String>((parts, bytes))
    })
    .await;
    let resp = match answered {
        Ok(Ok((parts, bytes))) => {
            let mut resp = (parts.status, bytes).into_response();
            *resp.headers_mut() = passed_back_headers(&parts.headers);
            resp
        }
        Ok(Err(e)) => upstream_failed(provider, &e).into_response(family),
        Err(_) => upstream_timed_out(provider).into_response(family),
    };
    gw.metrics
        .observe_count_tokens(&provider.name, resp.status().as_u16());
    resp
}

/// A provider that failed before its answer's head came (connection refused, reset,
/// TLS): 502 naming it and why.
pub(super) fn upstream_failed(provider: &Provider, why: &str) -> GatewayError {
    GatewayError::new(
        StatusCode::BAD_GATEWAY,
        format!("upstream {} failed: {why}", provider.name),
    )
}

/// A provider whose answer's head did not come within its timeout: 504.
pub(super) fn upstream_timed_out(provider: &Provider) -> GatewayError {
    GatewayError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "upstream {} did not answer within {}s",
            provider.name,
            provider.timeout.as_secs_f64()
        ),
    )
}

/// Puts on a request to provider `i` the client's headers the provider may see
/// ([`forwarded`]) and the provider's own credential, which replaces any the client
/// sent: every call to a provider (forwarding, `count_tokens`, stored Responses).
pub(super) fn provider_headers(gw: &Gateway, i: usize, client: &HeaderMap, out: &mut HeaderMap) {
    let allowed = &gw.config.providers[i].forward_headers;
    for (name, value) in client {
        if forwarded(name.as_str(), allowed) {
            out.append(name.clone(), value.clone());
        }
    }
    if let Some((name, value)) = &gw.auth[i] {
        out.insert(name.clone(), value.clone());
    }
}

/// Whether a client's request header goes on to the provider: the defaults and the
/// provider's `forward_headers`, never a credential, Ciyuan's own headers, or what
/// frames the request (which the gateway sets for the body it sends).
pub(super) fn forwarded(name: &str, allowed: &[String]) -> bool {
    if NEVER_FORWARDED.contains(&name)
        || name.starts_with("x-ciyuan-")
        || name.starts_with("proxy-")
    {
        return false;
    }
    DEFAULT_FORWARD_HEADERS.contains(&name)
        || allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => a == name,
        })
}

/// Request headers no `forward_headers` pattern passes on: the tenant's key (the
/// provider gets the gateway's own), cookies, and hop-by-hop and framing headers.
pub(super) const NEVER_FORWARDED: [&str; 14] = [
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Whether a provider's response header reaches the tenant. An allow-list: providers
/// answer with their organisation and project ids, cookies, server details and the
/// remaining capacity of the shared upstream account (`x-ratelimit-*`, which would
/// show one tenant the others' traffic); the client needs only the body's type, when
/// and whether to retry (the SDKs obey `x-should-retry`), and the provider's request
/// id to quote to its support.
pub(super) fn passed_back(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "cache-control"
            | "retry-after"
            | "retry-after-ms"
            | "x-should-retry"
            | "x-request-id"
            | "request-id"
    )
}

/// The provider's response headers that reach the tenant.
pub(super) fn passed_back_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(4);
    for (name, value) in from {
        if passed_back(name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The `anthropic-version` sent when the client sent none.
pub(super) const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Sends `call` to its provider and returns the answer to pass on, with, for a whole
/// answer, its metering, which the caller runs once the answer is handed over (every
/// other ending is metered here, in a task of its own).
pub(super) async fn forward(
    app: Arc<App>,
    mut call: Call,
    headers: &HeaderMap,
    body: Bytes,
) -> (Response, Option<Box<Finishing>>) {
    let family = call.endpoint.family();
    let gw = &app.gateway;
    let provider = &gw.config.providers[call.provider];
    let mut req = hyper::Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = gw.urls[call.provider][call.endpoint.index()].clone();
    let out = req.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("ciyuan/", env!("CARGO_PKG_VERSION"))),
    );
    provider_headers(gw, call.provider, headers, out);
    if provider.protocol == Protocol::Anthropic && !out.contains_key("anthropic-version") {
        out.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
    }
    let sent = tokio::time::timeout(provider.timeout, gw.clients.request(call.provider, req)).await;
    let resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let failed = upstream_failed(provider, &error_chain(&e));
            finish_failed(&app, call, failed.status, "upstream_error");
            return (failed.into_response(family), None);
        }
        Err(_) => {
            let timed_out = upstream_timed_out(provider);
            finish_failed(&app, call, timed_out.status, "upstream_timeout");
            return (timed_out.into_response(family), None);
        }
    };
    let (parts, incoming) = resp.into_parts();
    // Provenance: the provider's id of the request, recorded on its entry.
    call.upstream_request_id = super::meter::provider_request_id(&parts.headers);
    let status = parts.status;
    let out_headers = passed_back_headers(&parts.headers);
    let is_stream = call.info.stream
        && status.is_success()
        && out_headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_stream {
        let idle = provider.idle_timeout;
        let relay = relay::Relay::new(app.clone(), call, incoming, status.as_u16(), idle);
        let mut r = Response::new(Body::new(relay));
        *r.status_mut() = status;
        *r.headers_mut() = out_headers;
        return (r, None);
    }
    // A whole answer: read it (within the provider's timeout and size bound), pass it
    // on unchanged.
    let limited = http_body_util::Limited::new(incoming, MAX_ANSWER_BYTES);
    let whole = tokio::time::timeout(provider.timeout, limited.collect()).await;
    let bytes = match whole {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let msg = format!(
                "upstream {} answered with more than {} MiB",
                provider.name,
                MAX_ANSWER_BYTES >> 20
            );
            finish_failed(&app, call, StatusCode::BAD_GATEWAY, "upstream_too_large");
            return (
                GatewayError::new(StatusCode::BAD_GATEWAY, msg).into_response(family),
                None,
            );
        }
        Ok(Err(e)) => {
            let msg = format!(
                "upstream {} broke off its answer: {}",
                provider.name,
                error_chain(e.as_ref())
            );
            finish_failed(&app, call, StatusCode::BAD_GATEWAY, "upstream_cut");
            return (
                GatewayError::new(StatusCode::BAD_GATEWAY, msg).into_response(family),
                None,
            );
        }
        Err(_) => {
            let msg = format!(
                "upstream {} did not finish its answer within {}s",
                provider.name,
                provider.timeout.as_secs_f64()
            );
            finish_failed(&app, call, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
            return (
                GatewayError::new(StatusCode::GATEWAY_TIMEOUT, msg).into_response(family),
                None,
            );
        }
    };
    if !status.is_success() {
        // The provider's own error, in its own shape, reaches the client as it is.
        finish_failed(&app, call, status, "upstream_error");
        let mut resp = (status, bytes).into_response();
        *resp.headers_mut() = out_headers;
        return (resp, None);
    }
    let Some(shown) = protocol::read_answer(call.endpoint, &bytes) else {
        let msg = format!("upstream {} answered with malformed JSON", provider.name);
        // The tenant got no answer it can use: it is charged nothing (the entry still
        // records the failure, and the reservation is released).
        finish_failed(&app, call, StatusCode::BAD_GATEWAY, "upstream_malformed");
        return (
            GatewayError::new(StatusCode::BAD_GATEWAY, msg).into_response(family),
            None,
        );
    };
    let ttft = call.started.elapsed();
    let mut meter = Meter::new(call.endpoint, None);
    meter.billable = true;
    meter.complete = true;
    if shown.reported.is_none() {
        meter.failure = Some("no_usage");
    }
    meter.shown = shown;
    // Metered by the request's own task once the answer is handed over (`handle`).
    let after = Finishing::new(&app, call, meter, status.as_u16(), Some(ttft));
    let mut resp = (status, bytes).into_response();
    *resp.headers_mut() = out_headers;
    (resp, Some(after))
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
