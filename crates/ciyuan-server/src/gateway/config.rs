//! The gateway's configuration: the providers, what each speaks and serves, and the
//! settings of the request path; and the vocabularies loaded before the first request.

use super::*;

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OpenAI's API.
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// An OpenAI-compatible API: DeepSeek, Qwen's compatible mode, Moonshot, vLLM,
    /// Ollama, ...
    OpenAiCompatible,
}

impl Protocol {
    /// Parses `openai`, `anthropic` or `openai-compatible`.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "openai" => Some(Protocol::OpenAi),
            "anthropic" => Some(Protocol::Anthropic),
            "openai-compatible" => Some(Protocol::OpenAiCompatible),
            _ => None,
        }
    }

    pub(super) fn family(self) -> Family {
        match self {
            Protocol::Anthropic => Family::Anthropic,
            _ => Family::OpenAi,
        }
    }
}

/// One upstream provider.
#[derive(Clone)]
pub struct Provider {
    /// Its name, recorded with every request it serves.
    pub name: String,
    /// What it speaks.
    pub protocol: Protocol,
    /// Base URL as its SDK takes it (OpenAI: ending in `/v1`; Anthropic: without).
    pub base_url: String,
    /// The API key sent upstream (read from the environment at start; never logged).
    pub api_key: Option<String>,
    /// Model names it serves, exact or with `*` wildcards; first matching provider wins.
    pub models: Vec<String>,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for the answer's headers (and a whole non-streamed answer).
    pub timeout: Duration,
    /// Longest silence between two chunks of a stream.
    pub idle_timeout: Duration,
    /// Request headers passed on to the provider (lower case; `*` ends a prefix).
    pub forward_headers: Vec<String>,
    /// Which count is priced: the provider's (default), Ciyuan's recount, or the
    /// greater of the two per key.
    pub rate_basis: crate::prices::Basis,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

/// Request headers always passed on: tracing, and the providers' own versioning.
pub const DEFAULT_FORWARD_HEADERS: [&str; 6] = [
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "traceparent",
    "tracestate",
    "x-request-id",
];

/// Settings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Providers, in routing order.
    pub providers: Vec<Provider>,
    /// A recount differing from the provider's by more than this percentage (and
    /// more than `recount_tolerance_tokens`) is flagged.
    pub recount_tolerance_percent: u64,
    /// Differences up to this many tokens are never flagged.
    pub recount_tolerance_tokens: u64,
    /// Model → encoding rules in front of the built-in table.
    pub encodings: Vec<(String, Encoding)>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Output reserved against budgets for a request that sets no `max_tokens`.
    pub default_max_output_tokens: u64,
    /// Input reserved against budgets for each image, audio or file part of a prompt
    /// (their tokens are known only from the provider's count).
    pub media_reserve_tokens: u64,
    /// Distinct model labels `/metrics` keeps; further models count as `other`.
    pub metrics_max_models: usize,
    /// What admission does while the ledger cannot record (its database is out of
    /// reach).
    pub ledger_outage: LedgerOutage,
}

/// What admission does while the ledger cannot record usage (`[gateway]
/// ledger_outage`).
///
/// Only refusing is offered. A request admitted during an outage would have its usage
/// entry held in the node's memory until the database returns: a node that stops or
/// dies meanwhile loses it (the tenant was served and never billed, against the
/// invariant that every byte sent is metered), and budgets and wallets on other nodes
/// would not see it. Allowing "up to an amount" would bound the loss, not prevent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LedgerOutage {
    /// Answer 503 in the provider's error shape, with `retry-after`, before the
    /// request reaches a provider.
    #[default]
    Refuse,
}

impl std::str::FromStr for LedgerOutage {
    type Err = String;
    fn from_str(s: &str) -> Result<LedgerOutage, String> {
        match s {
            "refuse" => Ok(LedgerOutage::Refuse),
            "allow" => Err(
                "\"allow\" is not offered: usage served while the ledger cannot record would live only in the node's memory and be lost if the node stopped; the only setting is \"refuse\"".into(),
            ),
            other => Err(format!("{other:?} is not a setting; the only one is \"refuse\"")),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            providers: Vec::new(),
            recount_tolerance_percent: 5,
            recount_tolerance_tokens: 3,
            encodings: Vec::new(),
            max_body_bytes: 32 << 20,
            default_max_output_tokens: 4096,
            media_reserve_tokens: 2048,
            metrics_max_models: metrics::DEFAULT_MAX_MODELS,
            ledger_outage: LedgerOutage::Refuse,
        }
    }
}

impl GatewayConfig {
    /// The encodings requests to the configured providers may be counted with: the
    /// estimator (admission's count for every model without a tokenizer of its own),
    /// those `[[tokenizers]]` rules name, and those of the built-in table whose
    /// patterns a provider's model names or patterns may meet (`*` alone meets all).
    pub fn encodings_in_use(&self) -> Vec<Encoding> {
        let mut out = vec![ESTIMATOR];
        let mut add = |e: Encoding| {
            if !out.contains(&e) {
                out.push(e);
            }
        };
        for (_, e) in &self.encodings {
            add(*e);
        }
        // What a pattern fixes before its first `*`: two patterns may meet when one
        // such prefix begins the other.
        let fixed = |p: &str| {
            let bare = p.rsplit('/').next().unwrap_or(p);
            bare.split('*').next().unwrap_or(bare).to_ascii_lowercase()
        };
        for m in self.providers.iter().flat_map(|p| &p.models) {
            if !m.contains('*') {
                if let Some(e) = encoding_for_model(m, &self.encodings) {
                    add(e);
                }
                continue;
            }
            let m = fixed(m);
            for (t, e) in ciyuan_measure::text::MODEL_ENCODINGS {
                let t = fixed(t);
                if m.starts_with(&t) || t.starts_with(&m) {
                    add(*e);
                }
            }
        }
        out
    }
}

/// Loads the vocabularies of [`GatewayConfig::encodings_in_use`], each on a thread of
/// its own, and answers how long it took. Called before the listener accepts, so no
/// request waits for a vocabulary to load (the first requests did, up to 68 ms at p99
/// for `o200k_base`); a vocabulary that does not load stops the start, where it would
/// otherwise leave admission without its count.
pub fn load_vocabularies(config: &GatewayConfig) -> Result<Duration, String> {
    let started = Instant::now();
    let encodings = config.encodings_in_use();
    std::thread::scope(|s| {
        let loading: Vec<_> = encodings
            .iter()
            .map(|e| (*e, s.spawn(move || e.count("load"))))
            .collect();
        for (e, thread) in loading {
            match thread.join() {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(format!("the {} vocabulary: {err}", e.name())),
                Err(_) => return Err(format!("the {} vocabulary: its loading failed", e.name())),
            }
        }
        Ok(())
    })?;
    Ok(started.elapsed())
}
