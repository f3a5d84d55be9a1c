//! Routing: which provider serves a model (configured names and patterns, and the
//! models providers list behind wildcard patterns), each provider's URLs and
//! credential made once, and the gateway's running state.

use super::*;

/// The gateway's running state: configuration, one HTTP client per provider, metrics.
pub struct Gateway {
    pub(super) config: GatewayConfig,
    pub(super) clients: upstream::Clients,
    /// Each provider's URL per endpoint (in [`Endpoint::ALL`] order), parsed once.
    pub(super) urls: Vec<Vec<Uri>>,
    /// Each Anthropic provider's `/v1/messages/count_tokens`, parsed once.
    pub(super) count_tokens_urls: Vec<Option<Uri>>,
    /// Each provider's credential header, made once (marked sensitive: never logged).
    pub(super) auth: Vec<Option<(HeaderName, HeaderValue)>>,
    /// Models the providers listed behind wildcard patterns, and when they were asked.
    pub(super) listed: tokio::sync::Mutex<Option<(Instant, ModelList)>>,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// The recorder task's inbox, started with the first request.
    pub(super) recorder: std::sync::OnceLock<tokio::sync::mpsc::Sender<Record>>,
    /// Requests whose entry is not yet handed to the recorder.
    pub(super) finishing: std::sync::atomic::AtomicUsize,
    /// Stored Responses whose requests ended here lately (see `retrieve`).
    pub(super) recent_responses: std::sync::Mutex<retrieve::Recent>,
}

/// (model, provider) pairs.
type ModelList = Vec<(String, String)>;

/// Largest model list read from a provider.
const MAX_MODEL_LIST_BYTES: usize = 4 << 20;

/// How long the providers' model lists are remembered.
const MODEL_LIST_TTL: Duration = Duration::from_secs(60);
/// Longest wait for a provider's model list.
const MODEL_LIST_TIMEOUT: Duration = Duration::from_secs(3);

impl Gateway {
    /// The models each provider with wildcard patterns lists itself (`GET /models`),
    /// kept to those its patterns route here: (model, provider). Asked at most once a
    /// minute; a provider that does not answer in time lists nothing.
    pub(super) async fn listed_upstream(&self) -> Vec<(String, String)> {
        let mut cached = self.listed.lock().await;
        if let Some((at, list)) = cached.as_ref()
            && at.elapsed() < MODEL_LIST_TTL
        {
            return list.clone();
        }
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, p) in self.config.providers.iter().enumerate() {
            if !p.models.iter().any(|m| m.contains('*')) {
                continue;
            }
            let url = match p.protocol.family() {
                Family::OpenAi => format!("{}/models", p.base_url),
                Family::Anthropic => format!("{}/v1/models", p.base_url),
            };
            let Ok(uri) = url.parse::<Uri>() else {
                continue;
            };
            let mut req = hyper::Request::new(Full::new(Bytes::new()));
            *req.uri_mut() = uri;
            if p.protocol == Protocol::Anthropic {
                req.headers_mut().insert(
                    HeaderName::from_static("anthropic-version"),
                    HeaderValue::from_static(ANTHROPIC_VERSION),
                );
            }
            if let Some((name, value)) = &self.auth[i] {
                req.headers_mut().insert(name.clone(), value.clone());
            }
            let answer = tokio::time::timeout(MODEL_LIST_TIMEOUT, async {
                let resp = self.clients.request(i, req).await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let body = http_body_util::Limited::new(resp.into_body(), MAX_MODEL_LIST_BYTES)
                    .collect()
                    .await
                    .ok()?
                    .to_bytes();
                serde_json::from_slice::<Value>(&body).ok()
            })
            .await;
            let Ok(Some(v)) = answer else {
                tracing::warn!(provider = %p.name, "provider did not list its models");
                continue;
            };
            for id in v["data"].as_array().into_iter().flatten() {
                let Some(id) = id["id"].as_str() else {
                    continue;
                };
                if p.models.iter().any(|m| wildcard_match(m, id))
                    && !out.iter().any(|(n, _)| n == id)
                {
                    out.push((id.to_string(), p.name.clone()));
                }
            }
        }
        *cached = Some((Instant::now(), out.clone()));
        out
    }

    /// Builds the clients.
    pub fn new(config: GatewayConfig) -> Result<Gateway, String> {
        let clients = config
            .providers
            .iter()
            .map(|p| {
                upstream::client(p.connect_timeout).map_err(|e| format!("provider {}: {e}", p.name))
            })
            .collect::<Result<_, _>>()?;
        let clients = upstream::Clients::new(
            clients,
            config.providers.iter().map(|p| p.connect_timeout).collect(),
        );
        let urls = config
            .providers
            .iter()
            .map(|p| {
                let url = |e: Endpoint| {
                    let url = format!("{}{}", p.base_url, e.upstream_path());
                    match url.parse::<Uri>() {
                        Ok(u) if u.scheme().is_some() && u.host().is_some() => Ok(u),
                        Ok(_) => Err(format!(
                            "provider {}: base_url {:?} is not an absolute http(s) URL",
                            p.name, p.base_url
                        )),
                        Err(err) => Err(format!(
                            "provider {}: base_url {:?}: {err}",
                            p.name, p.base_url
                        )),
                    }
                };
                Endpoint::ALL.iter().map(|e| url(*e)).collect()
            })
            .collect::<Result<Vec<_>, String>>()?;
        let count_tokens_urls = config
            .providers
            .iter()
            .map(|p| {
                (p.protocol == Protocol::Anthropic)
                    .then(|| format!("{}/v1/messages/count_tokens", p.base_url).parse::<Uri>())
                    .transpose()
                    .map_err(|e| format!("provider {}: base_url {:?}: {e}", p.name, p.base_url))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let auth = config
            .providers
            .iter()
            .map(|p| {
                let Some(key) = &p.api_key else {
                    return Ok(None);
                };
                let (name, value) = match p.protocol {
                    Protocol::Anthropic => (HeaderName::from_static("x-api-key"), key.clone()),
                    _ => (header::AUTHORIZATION, format!("Bearer {key}")),
                };
                let mut value = HeaderValue::try_from(value).map_err(|_| {
                    format!(
                        "provider {}: the API key holds characters an HTTP header cannot carry",
                        p.name
                    )
                })?;
                value.set_sensitive(true);
                Ok(Some((name, value)))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let max_models = config.metrics_max_models;
        Ok(Gateway {
            config,
            clients,
            urls,
            count_tokens_urls,
            auth,
            listed: tokio::sync::Mutex::new(None),
            metrics: metrics::Metrics::new(max_models),
            recorder: std::sync::OnceLock::new(),
            finishing: std::sync::atomic::AtomicUsize::new(0),
            recent_responses: std::sync::Mutex::new(retrieve::Recent::default()),
        })
    }

    /// The settings.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The provider for `model` on an endpoint of `family`.
    pub(super) fn route(&self, family: Family, model: &str) -> Result<usize, GatewayError> {
        let serves = |p: &Provider| p.models.iter().any(|m| wildcard_match(m, model));
        if let Some(i) = self
            .config
            .providers
            .iter()
            .position(|p| p.protocol.family() == family && serves(p))
        {
            return Ok(i);
        }
        if let Some(p) = self.config.providers.iter().find(|p| serves(p)) {
            let endpoint = match p.protocol.family() {
                Family::OpenAi => "/v1/chat/completions",
                Family::Anthropic => "/v1/messages",
            };
            return Err(GatewayError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "model {model:?} is served by provider {} over the {} protocol; call {endpoint}",
                    p.name,
                    match p.protocol.family() {
                        Family::OpenAi => "OpenAI",
                        Family::Anthropic => "Anthropic",
                    }
                ),
            ));
        }
        Err(GatewayError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .code("model_not_found"))
    }
}
