//! Ciyuan's HTTP server: the admin, usage and audit API under `/api/v1/`, and
//! `/healthz`. This is the only crate that knows HTTP and the JSON shapes of the API;
//! everything below it speaks domain types.
//!
//! Every request is answered; bad input gets `application/problem+json` naming what was
//! wrong, and internal failures are logged once, here at the edge.
#![deny(missing_docs)]

mod accounts;
mod adjust;
mod audit;
pub mod auth;
pub mod budgets;
mod console;
mod controls;
pub mod error;
mod exports;
mod extract;
mod follow;
#[cfg(test)]
mod fuzz;
pub mod gateway;
mod holds;
mod ingest;
mod keys;
pub mod listen;
pub mod pipeline;
pub mod prices;
mod reconciliations;
mod records;
pub mod reports;
mod rerate;
pub mod service_levels;
pub mod sessions;
pub mod slices;
mod statements;
mod tiers;
mod usage;
mod usage_tags;
mod wallets;

use crate::auth::{Authenticator, Caller};
use crate::error::ApiError;
use crate::pipeline::Projector;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Entry, EntryBody, KeyCreated, Scope, Scopes};
use ciyuan_store::{KeyRecord, Log, Store};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How often a new checkpoint is signed when the log has grown.
    pub checkpoint_interval: Duration,
    /// How long a write waits for its projection before answering 503.
    pub projection_wait: Duration,
    /// Oldest event time the ingest API accepts, relative to now.
    pub ingest_max_age: Duration,
    /// How far in the future an event time may be (clock skew).
    pub ingest_max_future: Duration,
    /// Most events in one ingest batch.
    pub max_events_per_batch: usize,
    /// How services other than `llm.usage` turn measures into tokens, as declared in
    /// the configuration: on start, those the ledger does not hold are appended as
    /// `definition.set` entries (a conflicting one stops the start); the definitions
    /// in force are always the ledger's.
    pub definitions: Vec<ciyuan_core::TokenDefinition>,
    /// Providers and the gateway's settings.
    pub gateway: gateway::GatewayConfig,
    /// Where budget incidents are sent as signed webhooks, if anywhere.
    pub notifier: Option<ciyuan_notify::Notifier>,
    /// How long a gateway reservation may stay unsettled before it is released.
    pub reservation_ttl: Duration,
    /// Scheduled reports (checked with `reports::check_all`).
    pub reports: Vec<reports::ReportSpec>,
    /// How often the scheduled reports are checked for due periods.
    pub report_interval: Duration,
    /// How long an API key read from the store is trusted before it is read again:
    /// `None` when this node is the store's only writer (revocations here evict at
    /// once); with several nodes on one database, how soon a revocation on another
    /// node takes effect here.
    pub key_cache_ttl: Option<Duration>,
    /// With several nodes on one ledger, how often this node looks for entries the
    /// others appended and applies them to its in-memory state (limits, access rules,
    /// rules of counting and pricing, budget counters, wallets, the ingest index);
    /// `None` when this node is the ledger's only writer.
    pub follow: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 1 << 20,
            checkpoint_interval: Duration::from_secs(10),
            projection_wait: Duration::from_secs(10),
            ingest_max_age: Duration::from_secs(7 * 24 * 3600),
            ingest_max_future: Duration::from_secs(300),
            max_events_per_batch: 10_000,
            definitions: Vec::new(),
            gateway: gateway::GatewayConfig::default(),
            notifier: None,
            reservation_ttl: Duration::from_secs(3600),
            reports: Vec::new(),
            report_interval: Duration::from_secs(30),
            key_cache_ttl: None,
            follow: None,
        }
    }
}

/// How long a node leads (`App::leads`) without renewing: every background task
/// renews it at least every 5 s, so another node takes over within this much of a
/// leader's death.
const LEAD_TERM: Duration = Duration::from_secs(15);

/// Everything a request handler needs.
pub struct App {
    /// This process's name among the nodes sharing the ledger (random per start).
    node: String,
    /// Entries below this that other nodes appended are applied here (see
    /// `follow`); where this node is the only writer, unused.
    followed: Arc<std::sync::atomic::AtomicU64>,
    /// Gateway requests waiting to be held in the database nodes share.
    holder: holds::Holder,
    /// Slices of hard limits' and wallets' room this node holds in the database
    /// nodes share, its requests admitted from them (none where it writes alone).
    pub(crate) slices: Option<Arc<slices::Slices>>,
    store: Arc<dyn Store>,
    log: Arc<dyn Log>,
    auth: Authenticator,
    projector: Projector,
    config: ServerConfig,
    /// Serialises account and key creation so two racing requests cannot both create
    /// the same node.
    admin_lock: tokio::sync::Mutex<()>,
    /// Serialises the ingest idempotency check with the claim of new events; holds the
    /// events appended (or being appended) but not yet projected.
    ingest_lock: tokio::sync::Mutex<ingest::Recent>,
    /// Providers, their HTTP clients, and the gateway's metrics.
    gateway: gateway::Gateway,
    /// Limits, access rules, reservations and counters.
    budget: ciyuan_budget::Engine,
    /// Token definitions in force (the ledger's `definition.set` entries).
    definitions: controls::Definitions,
    /// Price books and contracts in force, and their raters.
    pricing: prices::Pricing,
    /// Tier counters (graduated and volume tiers' period-to-date units).
    tiers: tiers::Tiers,
    /// Wallet balances, grants and holds (rebuilt from the ledger's postings).
    wallets: ciyuan_budget::Wallets,
    /// Console sign-in attempts per client address.
    sign_ins: sessions::SignInLimiter,
    /// Orders usage against the rules that measure and price it: a usage entry is
    /// measured and rated under a read guard held until its append is submitted to
    /// the ledger; a definition, book or contract is appended and applied under the
    /// write guard. So every usage entry follows the rules recorded before it in the
    /// log, which is what `ciyuan audit verify` checks.
    pub(crate) rules_gate: Arc<tokio::sync::RwLock<()>>,
}

impl App {
    /// Wires the application together and starts the projector.
    pub fn new(
        store: Arc<dyn Store>,
        log: Arc<dyn Log>,
        config: ServerConfig,
    ) -> Result<Arc<App>, ApiError> {
        // With other writers, every append is noted, so the follower can tell this
        // node's entries from theirs.
        let (log, own): (Arc<dyn Log>, _) = match config.follow {
            Some(_) => {
                let (log, own) = follow::OwnLog::new(log);
                (log, Some(own))
            }
            None => (log, None),
        };
        // Catch the projections up with the log first: the budget engine is built from
        // them, and must know every limit before the first request.
        pipeline::project(store.as_ref(), log.as_ref(), log.size(), &mut |_| {})
            .map_err(ApiError::internal)?;
        // The configuration's definitions that the ledger lacks are recorded before
        // anything is served, so the first event is measured by the ledger's rules.
        let declared = controls::definition_entries(
            store.as_ref(),
            &config.definitions,
            &AccountPath::root(),
            Timestamp::now(),
        )
        .map_err(|e| ApiError::bad_request(format!("token_definitions: {e}")))?;
        if !declared.is_empty() {
            pipeline::append_blocking(log.as_ref(), &declared)?;
            pipeline::project(store.as_ref(), log.as_ref(), log.size(), &mut |_| {})
                .map_err(ApiError::internal)?;
        }
        // What other nodes append from here on is followed; what they projected while
        // the state below loads may be counted twice (a restart's counters err the
        // same way), never missed.
        let followed = store.projected_through()?;
        let node = node_name()?;
        // Said before the state loads: holds recorded from here on stay until this
        // node has applied their entries.
        store.heartbeat(&node, followed)?;
        let definitions = controls::Definitions::load(store.as_ref())?;
        let pricing = prices::Pricing::load(store.as_ref())?;
        let tiers = tiers::Tiers::load(store.as_ref())?;
        let wallets = wallets::load(store.as_ref())?;
        let budget = budgets::load(store.as_ref(), Timestamp::now())?;
        let projector = Projector::start(store.clone(), log.clone())?;
        let recent = ingest::Recent::load(store.as_ref(), log.as_ref())?;
        let gateway = gateway::Gateway::new(config.gateway.clone()).map_err(ApiError::internal)?;
        let slices = if store.shares_holds() {
            Some(
                slices::Slices::start(
                    Arc::new(slices::OfStore(store.clone())),
                    node.clone(),
                    config.reservation_ttl,
                )
                .map_err(ApiError::internal)?,
            )
        } else {
            None
        };
        let app = Arc::new(App {
            node,
            followed: Arc::new(std::sync::atomic::AtomicU64::new(followed)),
            holder: holds::Holder::default(),
            slices,
            gateway,
            budget,
            definitions,
            pricing,
            tiers,
            wallets,
            sign_ins: sessions::SignInLimiter::default(),
            rules_gate: Arc::default(),
            auth: Authenticator::new(store.clone(), config.key_cache_ttl),
            store,
            log,
            projector,
            config,
            admin_lock: tokio::sync::Mutex::new(()),
            ingest_lock: tokio::sync::Mutex::new(recent),
        });
        if let (Some(own), Some(poll)) = (own, app.config.follow) {
            follow::start(&app, own, followed, poll).map_err(ApiError::internal)?;
        }
        Ok(app)
    }

    /// Appends entries durably and lets the projector know.
    pub async fn append(&self, entries: &[Entry]) -> Result<Range<u64>, ApiError> {
        let range = pipeline::append(self.log.as_ref(), entries).await?;
        self.projector.kick();
        Ok(range)
    }

    /// Appends entries and waits until queries see them; control entries (limits,
    /// access rules, definitions) then take effect in the request path.
    pub async fn append_visible(
        self: &Arc<Self>,
        entries: &[Entry],
    ) -> Result<Range<u64>, ApiError> {
        let controls: Vec<Entry> = entries
            .iter()
            .filter(|e| controls::is_control(e))
            .cloned()
            .collect();
        // Rules of measuring and pricing wait for the usage already measured or rated
        // under the old ones to be submitted, and take effect before any more is.
        let _rules = if controls.iter().any(controls::is_rule) {
            Some(self.rules_gate.write().await)
        } else {
            None
        };
        // With several nodes, every node's rating pauses until the change is in the
        // log and applied there too.
        let barrier = match (&_rules, self.config.follow) {
            (Some(_), Some(_)) => Some(self.raise_rules_barrier().await?),
            _ => None,
        };
        let range = match self.append(entries).await {
            Ok(range) => range,
            Err(e) => {
                if let Some(id) = barrier {
                    self.lower_rules_barrier(id, None).await;
                }
                return Err(e);
            }
        };
        if let Some(id) = barrier {
            // In the log: the others rate again once they have followed past it (this
            // node's own rating waits on its write guard until it has applied it).
            self.lower_rules_barrier(id, Some(range.end)).await;
        }
        self.apply_appended(range.end, controls).await?;
        Ok(range)
    }

    /// Waits for the projection of the entries below `end` and applies `controls`.
    async fn apply_appended(
        self: &Arc<Self>,
        end: u64,
        controls: Vec<Entry>,
    ) -> Result<(), ApiError> {
        self.projector
            .wait_for(end, self.config.projection_wait)
            .await?;
        if !controls.is_empty() {
            self.blocking(move |app| app.apply_controls(&controls))
                .await?;
        }
        Ok(())
    }

    /// Runs a blocking store call off the async reactor.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&App) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || f(&app))
            .await
            .map_err(ApiError::internal)?
    }

    /// On a store with no key yet, creates the root admin key: `given` if set (from the
    /// configuration), else a new random one, which is returned so it can be printed
    /// once. Returns `None` when keys exist already.
    pub async fn bootstrap_admin_key(
        self: &Arc<Self>,
        given: Option<String>,
    ) -> Result<Option<String>, ApiError> {
        if self.blocking(|app| Ok(app.store.key_count()?)).await? > 0 {
            return Ok(None);
        }
        let key = match given {
            Some(secret) => {
                let Some(id) = auth::parse_key(&secret) else {
                    return Err(ApiError::bad_request(
                        "bootstrap admin key is not a Ciyuan key (cy_<12 hex>_<64 hex>)",
                    ));
                };
                auth::NewKey {
                    key_id: id.to_string(),
                    hash: auth::hash_key(&secret),
                    secret,
                }
            }
            None => auth::generate_key()?,
        };
        let record = KeyRecord {
            key_id: key.key_id.clone(),
            account: AccountPath::root(),
            scopes: Scope::ALL.into_iter().collect::<Scopes>(),
            name: Some("bootstrap admin".into()),
            created_at: Timestamp::now(),
            revoked_at: None,
        };
        self.create_key(&record, key.hash).await?;
        Ok(Some(key.secret))
    }

    async fn create_key(
        self: &Arc<Self>,
        record: &KeyRecord,
        hash: [u8; 32],
    ) -> Result<(), ApiError> {
        // The ledger records that the key exists (never its secret or hash) before the key
        // works, so no usable key is missing from the audit trail.
        self.append(&[Entry::new(
            record.created_at,
            record.account.clone(),
            EntryBody::KeyCreated(KeyCreated {
                key_id: record.key_id.clone(),
                scopes: record.scopes,
                name: record.name.clone(),
            }),
        )])
        .await?;
        let rec = record.clone();
        self.blocking(move |app| Ok(app.store.insert_key(&rec, &hash)?))
            .await
    }

    /// Fails with 404 unless account `path` exists (the root always does).
    pub(crate) async fn require_account(
        self: &Arc<Self>,
        path: &AccountPath,
    ) -> Result<(), ApiError> {
        if path.is_root() {
            return Ok(());
        }
        let p = path.clone();
        let exists = self
            .blocking(move |app| Ok(app.store.account(&p)?.is_some()))
            .await?;
        if exists {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "account {path} does not exist"
            )))
        }
    }

    /// Waits until queries see every entry acknowledged before this call: queries
    /// read their writes (and everyone's), at the cost of the projector's short linger.
    pub async fn caught_up(&self) -> Result<(), ApiError> {
        self.projector
            .wait_for(self.log.size(), self.config.projection_wait)
            .await
    }

    /// Whether this node is to run the work done once for the whole ledger
    /// (`Store::lead`); a store that cannot answer keeps the work from running here
    /// this time (it runs at a later tick, here or on the node that leads).
    pub async fn leads(self: &Arc<Self>) -> bool {
        match self
            .blocking(|app| Ok(app.store.lead(&app.node, LEAD_TERM)?))
            .await
        {
            Ok(leads) => leads,
            Err(e) => {
                tracing::warn!(detail = %e.detail, "cannot tell whether this node leads");
                false
            }
        }
    }

    /// Entries below this that other nodes appended are applied to this node's state.
    pub(crate) fn followed(&self) -> u64 {
        self.followed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The projection watermark: entries visible to queries.
    pub fn projected(&self) -> u64 {
        self.projector.watermark()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The log.
    pub fn log(&self) -> &Arc<dyn Log> {
        &self.log
    }

    /// Signs a checkpoint if the log grew since the last one.
    pub async fn checkpoint(&self) -> Result<ciyuan_store::SignedCheckpoint, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.log.checkpoint(Box::new(move |r| {
            let _ = tx.send(r);
        }))?;
        Ok(rx
            .await
            .map_err(|_| ApiError::unavailable("the ledger writer stopped"))??)
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    /// A key in the headers, else (on the admin API) a console session's cookie; both
    /// end in the key's record judged the same way (`auth::checked`).
    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        if sessions::by_cookie(parts) {
            return app.session_caller(parts).await;
        }
        app.caller(&parts.headers).await
    }
}

impl App {
    /// Who presents the request's key: from the key cache on the async thread when it
    /// can, else from the store on a blocking thread.
    pub(crate) async fn caller(
        self: &Arc<Self>,
        headers: &axum::http::HeaderMap,
    ) -> Result<Caller, ApiError> {
        let key = Authenticator::presented(headers)?;
        match self.auth.cached(key) {
            Some(answer) => answer,
            None => {
                let key = key.to_string();
                self.blocking(move |app| app.auth.authenticate(&key)).await
            }
        }
    }
}

/// The router of the whole HTTP API.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.config.max_body_bytes;
    // Prompts with images run to megabytes: the gateway has its own body limit.
    let gateway_routes = Router::new()
        .route("/v1/chat/completions", post(gateway::chat))
        .route("/v1/completions", post(gateway::completions))
        .route("/v1/embeddings", post(gateway::embeddings))
        .route("/v1/messages", post(gateway::messages))
        .route("/v1/messages/count_tokens", post(gateway::count_tokens))
        .route("/v1/responses", post(gateway::responses))
        .route(
            "/v1/responses/{id}",
            get(gateway::get_response).delete(gateway::delete_response),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(gateway::response_input_items),
        )
        .route("/v1/responses/{id}/cancel", post(gateway::cancel_response))
        .route("/v1/models", get(gateway::models))
        .layer(DefaultBodyLimit::max(app.gateway.config().max_body_bytes));
    // A price file (LiteLLM's table is ~3 MB) is larger than any other admin body.
    let price_files = Router::new()
        .route("/api/v1/prices", post(prices::import).get(prices::list))
        .route(
            "/api/v1/reconciliations",
            post(reconciliations::reconcile_export),
        )
        .layer(DefaultBodyLimit::max(prices::MAX_PRICE_FILE_BYTES));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/", get(console::root))
        .route("/console", get(console::index))
        .route("/console/", get(console::index))
        .route("/console/{*file}", get(console::asset))
        .route("/metrics", get(gateway::metrics_page))
        .route("/v1/events", post(ingest::events))
        .route(
            "/api/v1/accounts",
            post(accounts::create).get(accounts::list),
        )
        .route(
            "/api/v1/accounts/{*path}",
            get(accounts::show).patch(accounts::update),
        )
        .route("/api/v1/sessions", post(sessions::create))
        .route(
            "/api/v1/sessions/current",
            get(sessions::current).delete(sessions::delete),
        )
        .route("/api/v1/keys", post(keys::create).get(keys::list))
        .route(
            "/api/v1/keys/{key_id}",
            axum::routing::delete(keys::revoke).get(keys::show),
        )
        .route("/api/v1/usage", get(usage::query))
        .route(
            "/api/v1/budgets/{*path}",
            get(budgets::show).put(budgets::set).delete(budgets::clear),
        )
        .route(
            "/api/v1/access/{*path}",
            axum::routing::put(budgets::set_access),
        )
        .route("/api/v1/webhooks/deliveries", get(budgets::deliveries))
        .route("/api/v1/discrepancies", get(records::discrepancies))
        .route(
            "/api/v1/definitions",
            get(controls::list).post(controls::declare),
        )
        .route("/api/v1/prices/rerate", post(rerate::rerate))
        .route("/api/v1/prices/{name}", get(prices::show))
        .route("/api/v1/prices/{name}/diff", get(prices::diff))
        .route(
            "/api/v1/contracts/{*path}",
            get(prices::show_contract).put(prices::set_contract),
        )
        .route(
            "/api/v1/wallets/{*path}",
            get(wallets::show)
                .post(wallets::post)
                .put(wallets::settings),
        )
        .route(
            "/api/v1/statements/{*path}",
            get(statements::show).post(statements::close),
        )
        .route("/api/v1/exports/{kind}", get(exports::export))
        .route("/api/v1/reports", get(reports::list))
        .route("/api/v1/reports/{name}/run", post(reports::run))
        .route("/api/v1/incidents", get(records::incidents))
        .route("/api/v1/quality", get(service_levels::quality))
        .route(
            "/api/v1/service-levels/{*path}",
            get(service_levels::list).post(service_levels::evaluate),
        )
        .route("/api/v1/adjustments", post(adjust::create))
        .route(
            "/api/v1/audit/checkpoint",
            get(audit::checkpoint).post(audit::sign),
        )
        .route("/api/v1/audit/checkpoints", get(audit::checkpoints))
        .route("/api/v1/audit/entries", get(audit::entries))
        .route("/api/v1/audit/entries/{id}", get(audit::entry))
        .route("/api/v1/audit/entries/{id}/proof", get(audit::prove))
        .route("/api/v1/audit/consistency", get(audit::consistency))
        .layer(DefaultBodyLimit::max(limit))
        .merge(gateway_routes)
        .merge(price_files)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn healthz(State(app): State<Arc<App>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "status": "ok",
        "entries": app.log.size(),
        "projected": app.projected(),
    }))
}

/// The shape an error on an unknown route takes: under `/v1/` (but for the ingest
/// API, which is Ciyuan's own) the provider protocols' error object — Anthropic's when
/// the request speaks Anthropic (`anthropic-version`), else OpenAI's — so an SDK
/// calling an endpoint the gateway lacks raises its own not-found error instead of an
/// empty one; anywhere else problem+json.
fn route_error(headers: &axum::http::HeaderMap, uri: &axum::http::Uri, e: ApiError) -> Response {
    let path = uri.path();
    if path.starts_with("/v1/") && !path.starts_with("/v1/events") {
        let family = if headers.contains_key("anthropic-version") {
            gateway::protocol::Family::Anthropic
        } else {
            gateway::protocol::Family::OpenAi
        };
        return gateway::protocol::GatewayError::new(e.status, e.detail).into_response(family);
    }
    e.into_response()
}

async fn not_found(headers: axum::http::HeaderMap, uri: axum::http::Uri) -> Response {
    let e = ApiError::not_found(format!("no route for {}", uri.path()));
    route_error(&headers, &uri, e)
}

async fn method_not_allowed(
    headers: axum::http::HeaderMap,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let e = ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("{method} is not allowed on {}", uri.path()),
    );
    route_error(&headers, &uri, e)
}

/// Signs a checkpoint every `interval` while the log grows. Runs until the app is dropped.
pub async fn checkpoint_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.config.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let covered = app
            .log
            .latest_checkpoint()
            .map(|c| c.checkpoint.size)
            .unwrap_or(0);
        if (app.log.size() > covered || app.log.latest_checkpoint().is_none())
            && let Err(e) = app.checkpoint().await
        {
            tracing::warn!(detail = %e.detail, "periodic checkpoint failed");
        }
    }
}

/// A name for this process among the nodes: the host's name, the process id and 64
/// random bits (a restarted node is a new node).
fn node_name() -> Result<String, ApiError> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "node".into());
    Ok(format!(
        "{host}-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(r)
    ))
}

/// Parses an account path from user input, as a 400 naming the problem.
pub(crate) fn parse_path(s: &str, what: &str) -> Result<AccountPath, ApiError> {
    AccountPath::parse(s).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests;
