//! Stored Responses: `GET` and `DELETE /v1/responses/{id}`, `GET .../input_items` and
//! `POST .../cancel`, forwarded to the provider that made the response, with its
//! credential, for the account that made it (or an ancestor's key). Never admitted
//! against budgets and never recorded: retrieving an answer consumes no tokens.
//!
//! Which provider and account made a response is read from the ledger's projection
//! (`Store::response`, fed by each entry's `quality.response_id`), and, for answers
//! that ended moments ago, from [`Recent`]: the entry of a request is appended after
//! its answer went out (the recorder groups entries), so a client that retrieves right
//! after creating would otherwise find nothing.

use super::*;
use crate::error::ApiError;
use axum::extract::Path;
use ciyuan_core::AccountPath;
use std::collections::{HashMap, VecDeque};

/// Responses remembered in memory until their entries are surely projected (far more
/// than the recorder's linger lets pile up).
const RECENT_MAX: usize = 16 * 1024;

/// Longest response id forwarded (OpenAI's are about 50 bytes).
const MAX_ID_BYTES: usize = 128;

/// Responses whose requests ended on this node lately: id → (account, upstream).
#[derive(Default)]
pub struct Recent {
    by_id: HashMap<String, (AccountPath, String)>,
    order: VecDeque<String>,
}

impl Recent {
    /// Remembers that `account`'s request made response `id` at `upstream`, forgetting
    /// the oldest past [`RECENT_MAX`].
    pub(super) fn keep(&mut self, id: &str, account: &AccountPath, upstream: &str) {
        if self.by_id.contains_key(id) {
            return;
        }
        self.by_id
            .insert(id.to_string(), (account.clone(), upstream.to_string()));
        self.order.push_back(id.to_string());
        while self.order.len() > RECENT_MAX {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    fn get(&self, id: &str) -> Option<(AccountPath, String)> {
        self.by_id.get(id).cloned()
    }
}

/// What a retrieval asks of the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    Get,
    Delete,
    InputItems,
    Cancel,
}

impl Ask {
    fn method(self) -> Method {
        match self {
            Ask::Get | Ask::InputItems => Method::GET,
            Ask::Delete => Method::DELETE,
            Ask::Cancel => Method::POST,
        }
    }

    /// The call's name on `/metrics`.
    fn name(self) -> &'static str {
        match self {
            Ask::Get => "get",
            Ask::Delete => "delete",
            Ask::InputItems => "input_items",
            Ask::Cancel => "cancel",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Ask::Get | Ask::Delete => "",
            Ask::InputItems => "/input_items",
            Ask::Cancel => "/cancel",
        }
    }
}

/// `GET /v1/responses/{id}`
pub async fn get_response(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: TakenHeaders,
    uri: Uri,
) -> Response {
    retrieve(app, Ask::Get, id, headers.0, uri).await
}

/// `DELETE /v1/responses/{id}`
pub async fn delete_response(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: TakenHeaders,
    uri: Uri,
) -> Response {
    retrieve(app, Ask::Delete, id, headers.0, uri).await
}

/// `GET /v1/responses/{id}/input_items`
pub async fn response_input_items(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: TakenHeaders,
    uri: Uri,
) -> Response {
    retrieve(app, Ask::InputItems, id, headers.0, uri).await
}

/// `POST /v1/responses/{id}/cancel`
pub async fn cancel_response(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: TakenHeaders,
    uri: Uri,
) -> Response {
    retrieve(app, Ask::Cancel, id, headers.0, uri).await
}

/// A response id as providers make them: what can go into a URL path as it is.
fn plausible(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

async fn retrieve(app: Arc<App>, ask: Ask, id: String, headers: HeaderMap, uri: Uri) -> Response {
    let family = Family::OpenAi;
    let caller = match caller(&app, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(family),
    };
    // The same answer whether the id was never made, made by another account's
    // request, or is not an id at all: another tenant learns nothing from it.
    let not_found = || {
        GatewayError::new(
            StatusCode::NOT_FOUND,
            format!("Response with id '{}' not found.", id.escape_debug()),
        )
        .into_response(family)
    };
    if !plausible(&id) {
        return not_found();
    }
    let made = match made_by(&app, &id).await {
        Ok(Some(made)) => made,
        Ok(None) => return not_found(),
        Err(e) => return GatewayError::from(e).into_response(family),
    };
    let (account, upstream) = made;
    if !account.is_within(&caller.key.account) {
        return not_found();
    }
    let gw = &app.gateway;
    let Some(i) = gw.config.providers.iter().position(|p| p.name == upstream) else {
        return GatewayError::new(
            StatusCode::NOT_FOUND,
            format!(
                "response '{id}' was made by provider {upstream}, which this gateway no longer has"
            ),
        )
        .into_response(family);
    };
    let provider = &gw.config.providers[i];
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let target = format!(
        "{}/responses/{id}{}{query}",
        provider.base_url,
        ask.suffix()
    );
    let Ok(target) = target.parse::<Uri>() else {
        return GatewayError::new(
            StatusCode::BAD_REQUEST,
            "the query string cannot be passed on to the provider",
        )
        .into_response(family);
    };
    let mut up = hyper::Request::new(Full::new(Bytes::new()));
    *up.method_mut() = ask.method();
    *up.uri_mut() = target;
    forward::provider_headers(gw, i, &headers, up.headers_mut());
    // The answer's head within the provider's timeout; its body (a stream, with
    // `?stream=true` on a background response) is passed through as it comes.
    let resp = match tokio::time::timeout(provider.timeout, gw.clients.request(i, up)).await {
        Ok(Ok(resp)) => {
            let (parts, incoming) = resp.into_parts();
            let mut resp = Response::new(Body::new(incoming));
            *resp.status_mut() = parts.status;
            *resp.headers_mut() = forward::passed_back_headers(&parts.headers);
            resp
        }
        Ok(Err(e)) => forward::upstream_failed(provider, &error_chain(&e)).into_response(family),
        Err(_) => forward::upstream_timed_out(provider).into_response(family),
    };
    gw.metrics
        .observe_retrieval(&provider.name, ask.name(), resp.status().as_u16());
    resp
}

/// The account and upstream of the request that made response `id`: from the requests
/// that ended here lately, else from the ledger's projection once it has caught up
/// with what was appended before this call.
async fn made_by(app: &Arc<App>, id: &str) -> Result<Option<(AccountPath, String)>, ApiError> {
    let recent = |app: &Arc<App>| match app.gateway.recent_responses.lock() {
        Ok(r) => r.get(id),
        // A panic while holding it left a map of plain values, still true.
        Err(poisoned) => poisoned.into_inner().get(id),
    };
    if let Some(made) = recent(app) {
        return Ok(Some(made));
    }
    if let Some(made) = stored(app, id).await? {
        return Ok(Some(made));
    }
    // Made on another node (or before a restart) and not yet projected here.
    app.caught_up().await?;
    stored(app, id).await
}

/// [`made_by`] from the ledger's projection.
async fn stored(app: &Arc<App>, id: &str) -> Result<Option<(AccountPath, String)>, ApiError> {
    let id = id.to_string();
    let found = app
        .blocking(move |app| Ok(app.store.response(&id)?))
        .await?;
    Ok(found.map(|r| (r.account, r.body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ids_that_fit_a_path_as_they_are_are_plausible() {
        assert!(plausible(
            "resp_68af4030592c81938ec0a5fbab4a3e9f05438e46b5f69a3b"
        ));
        assert!(plausible("resp-1_A"));
        for bad in [
            "",
            "../models",
            "resp_1/cancel",
            "resp 1",
            "resp_1?x=1",
            "resp%2F",
            "ré",
        ] {
            assert!(!plausible(bad), "{bad:?}");
        }
        assert!(!plausible(&"r".repeat(MAX_ID_BYTES + 1)));
    }

    #[test]
    fn recent_keeps_the_first_maker_and_forgets_the_oldest() {
        let a: AccountPath = "acme/a".parse().unwrap();
        let b: AccountPath = "acme/b".parse().unwrap();
        let mut r = Recent::default();
        r.keep("resp_1", &a, "openai");
        r.keep("resp_1", &b, "azure");
        assert_eq!(r.get("resp_1"), Some((a.clone(), "openai".to_string())));
        for i in 0..RECENT_MAX {
            r.keep(&format!("x{i}"), &b, "openai");
        }
        assert_eq!(r.get("resp_1"), None);
        assert_eq!(r.get("x0"), Some((b, "openai".to_string())));
        assert_eq!(r.by_id.len(), RECENT_MAX);
        assert_eq!(r.order.len(), RECENT_MAX);
    }
}
