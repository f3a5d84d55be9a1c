//! Configuration: a TOML file, then `CIYUAN_*` environment variables, then flags, each
//! overriding the one before. See `ciyuan.example.toml` at the repository root.

use anyhow::{Context, bail};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default HTTP address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
/// Default data directory.
pub const DEFAULT_DATA: &str = "./ciyuan-data";

/// The configuration file as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data: Option<PathBuf>,
    /// A PostgreSQL database to keep the log and the projections in, instead of the
    /// data directory (which then holds only the signing key and the webhook outbox).
    pub database: Option<Secret>,
    /// HTTP listen address.
    pub listen: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: Option<usize>,
    /// Seconds a request's body may take to arrive, from its head (default 30).
    pub body_timeout_secs: Option<u64>,
    /// Seconds between automatic checkpoints while the log grows.
    pub checkpoint_interval_secs: Option<u64>,
    /// Admin key to install on first start instead of generating one.
    pub bootstrap_admin_key: Option<Secret>,
    /// Ledger settings.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// Ingest settings.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// How services other than `llm.usage` turn measures into tokens.
    #[serde(default)]
    pub token_definitions: Vec<ciyuan_measure::RawDefinition>,
    /// Model patterns mapped to encodings, consulted before the built-in table.
    #[serde(default)]
    pub tokenizers: Vec<TokenizerRule>,
    /// Gateway settings.
    #[serde(default)]
    pub gateway: GatewaySection,
    /// Upstream providers of the gateway, in routing order.
    #[serde(default)]
    pub providers: Vec<ProviderSection>,
    /// Where budget incidents are delivered.
    #[serde(default)]
    pub webhooks: Vec<WebhookSection>,
    /// `/metrics` settings.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Scheduled usage and cost reports.
    #[serde(default)]
    pub reports: Vec<ReportSection>,
    /// Seconds between checks of the scheduled reports for due periods (default 30).
    pub reports_check_secs: Option<u64>,
}

/// `[[reports]]`: an hourly or daily usage and cost report of a subtree, written to a
/// directory or POSTed to a signed webhook once per period.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ReportSection {
    /// Unique name (letters, digits, `.`, `_`, `-`): in file names and idempotency keys.
    pub name: String,
    /// The node whose subtree it covers, e.g. `acme`.
    pub account: String,
    /// `hour` (UTC hours) or `day` (days in the node's time zone).
    pub every: String,
    /// `csv` or `json` (default csv).
    pub format: Option<String>,
    /// Write files here...
    pub directory: Option<PathBuf>,
    /// ...or POST to this URL, signed.
    pub webhook: Option<String>,
    /// Environment variable holding the webhook's HMAC secret (at least 16 bytes).
    pub secret_env: Option<String>,
    /// The first period delivered: `2026-11-01` (day) or `2026-11-01T00` (hour, UTC).
    pub start: String,
    /// Seconds after a period's end before it is delivered, so late events land in
    /// it (default 60).
    pub delay_secs: Option<u64>,
}

impl ReportSection {
    /// Checks the section, naming the field at fault, and reads the webhook's secret
    /// from the environment.
    pub fn resolve(&self) -> anyhow::Result<ciyuan_server::reports::ReportSpec> {
        use ciyuan_server::reports::{Destination, Every, Format, ReportSpec};
        let at = format!("reports[{}]", self.name);
        let account = ciyuan_core::AccountPath::parse(&self.account)
            .map_err(|e| anyhow::anyhow!("{at}.account: {e}"))?;
        let every = Every::parse(&self.every).map_err(|e| anyhow::anyhow!("{at}.every: {e}"))?;
        let format = Format::parse(self.format.as_deref().unwrap_or("csv"))
            .map_err(|e| anyhow::anyhow!("{at}.format: {e}"))?;
        let destination = match (&self.directory, &self.webhook, &self.secret_env) {
            (Some(d), None, None) => Destination::Directory(d.clone()),
            (None, Some(url), Some(var)) => Destination::Webhook {
                url: url.clone(),
                secret: std::env::var(var).map_err(|_| {
                    anyhow::anyhow!("{at}.secret_env: environment variable {var} is not set")
                })?,
            },
            (None, Some(_), None) => bail!("{at}.secret_env: a webhook needs a signing secret"),
            (Some(_), None, Some(_)) => {
                bail!("{at}.secret_env: only a webhook is signed, not a directory")
            }
            (Some(_), Some(_), _) => bail!("{at}.directory, {at}.webhook: give one, not both"),
            (None, None, _) => bail!("{at}.directory, {at}.webhook: give one"),
        };
        let spec = ReportSpec {
            name: self.name.clone(),
            account,
            every,
            format,
            destination,
            start: self.start.clone(),
            delay: std::time::Duration::from_secs(self.delay_secs.unwrap_or(60)),
        };
        spec.check().map_err(anyhow::Error::msg)?;
        Ok(spec)
    }
}

/// `[metrics]` settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// A separate address serving `GET /metrics` without a key (for a scraper on a
    /// private network); on the main address `/metrics` always needs a read key at `/`.
    pub listen: Option<String>,
    /// Distinct model labels kept; requests for further models count as `other`
    /// (default 200).
    pub max_models: Option<usize>,
}

/// `[[webhooks]]`: a receiver of budget incidents (configured by whoever runs the
/// server: admins only).
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// Name in the delivery log.
    pub name: String,
    /// Where to POST.
    pub url: String,
    /// Environment variable holding the HMAC secret of the signature header.
    pub secret_env: String,
    /// Event types sent (`*` wildcards); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
}

impl WebhookSection {
    /// Checks the section and reads its secret from the environment.
    pub fn resolve(&self) -> anyhow::Result<ciyuan_notify::Target> {
        let at = format!("webhooks[{}]", self.name);
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            bail!("{at}.url: not an http(s) URL");
        }
        let secret = std::env::var(&self.secret_env).map_err(|_| {
            anyhow::anyhow!(
                "{at}.secret_env: environment variable {} is not set",
                self.secret_env
            )
        })?;
        if secret.len() < 16 {
            bail!(
                "{at}: the secret in {} must be at least 16 bytes",
                self.secret_env
            );
        }
        Ok(ciyuan_notify::Target {
            name: self.name.clone(),
            url: self.url.clone(),
            secret,
            events: self.events.clone(),
        })
    }
}

/// `[gateway]` settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Flag a recount that differs from the provider's count by more than this
    /// percentage (default 5)...
    pub recount_tolerance_percent: Option<u64>,
    /// ...and by more than this many tokens (default 3).
    pub recount_tolerance_tokens: Option<u64>,
    /// Largest gateway request body, in bytes (default 32 MiB).
    pub max_body_bytes: Option<usize>,
    /// Output tokens reserved against budgets for a request without `max_tokens`
    /// (default 4096).
    pub default_max_output_tokens: Option<u64>,
    /// Seconds after which an unsettled budget reservation is released (default 3600).
    pub reservation_ttl_secs: Option<u64>,
    /// Input tokens reserved for each image, audio or file part of a prompt (default
    /// 2048).
    pub media_reserve_tokens: Option<u64>,
    /// What admission does while the ledger's database is out of reach: `refuse`
    /// (the default, and the only setting; see `ciyuan_server::gateway::LedgerOutage`).
    pub ledger_outage: Option<String>,
}

/// `[[providers]]`: one upstream.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// Name recorded with each request it serves.
    pub name: String,
    /// `openai`, `anthropic` or `openai-compatible`.
    pub protocol: String,
    /// Base URL as the provider's SDK takes it (OpenAI: `https://api.openai.com/v1`;
    /// Anthropic: `https://api.anthropic.com`).
    pub base_url: String,
    /// Environment variable holding the provider's API key (none for local servers).
    pub api_key_env: Option<String>,
    /// Model names served, exact or with `*` wildcards.
    pub models: Vec<String>,
    /// Seconds to wait for a connection (default 10).
    pub connect_timeout_secs: Option<u64>,
    /// Seconds to wait for the answer's headers or a whole answer (default 600).
    pub timeout_secs: Option<u64>,
    /// Seconds of silence allowed between two chunks of a stream (default 300).
    pub idle_timeout_secs: Option<u64>,
    /// Extra request headers passed on to the provider (`x-foo`, or a prefix `x-foo-*`).
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// Which count is priced: `provider` (default), `recount` or `greater`.
    #[serde(default)]
    pub rate_basis: ciyuan_server::prices::Basis,
}

impl ProviderSection {
    /// Checks the section and reads its key from the environment.
    pub fn resolve(&self) -> anyhow::Result<ciyuan_server::gateway::Provider> {
        use ciyuan_server::gateway::{Protocol, Provider};
        let at = format!("providers[{}]", self.name);
        if self.name.is_empty() {
            bail!("providers: a provider needs a name");
        }
        let protocol = Protocol::parse(&self.protocol).ok_or_else(|| {
            anyhow::anyhow!(
                "{at}.protocol: {:?} is not openai, anthropic or openai-compatible",
                self.protocol
            )
        })?;
        let base_url = self.base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            bail!("{at}.base_url: {:?} is not an http(s) URL", self.base_url);
        }
        if self.models.is_empty() {
            bail!("{at}.models: list at least one model name or pattern");
        }
        let api_key = match &self.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow::anyhow!("{at}.api_key_env: environment variable {var} is not set")
            })?),
            None => None,
        };
        let secs =
            |v: Option<u64>, default: u64, what: &str| -> anyhow::Result<std::time::Duration> {
                match v.unwrap_or(default) {
                    0 => bail!("{at}.{what}: must be at least 1"),
                    n => Ok(std::time::Duration::from_secs(n)),
                }
            };
        Ok(Provider {
            name: self.name.clone(),
            protocol,
            base_url,
            api_key,
            models: self.models.clone(),
            connect_timeout: secs(self.connect_timeout_secs, 10, "connect_timeout_secs")?,
            timeout: secs(self.timeout_secs, 600, "timeout_secs")?,
            idle_timeout: secs(self.idle_timeout_secs, 300, "idle_timeout_secs")?,
            forward_headers: self
                .forward_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            rate_basis: self.rate_basis,
        })
    }
}

/// `[[tokenizers]]`: which encoding counts a model's text.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TokenizerRule {
    /// Model name pattern; `*` matches any run of characters.
    pub model: String,
    /// o200k_base, cl100k_base, qwen, qwen3_6 or deepseek_v4.
    pub encoding: String,
}

impl FileConfig {
    /// The `[[tokenizers]]` rules, checked, in file order.
    pub fn tokenizer_rules(&self) -> anyhow::Result<Vec<(String, ciyuan_measure::text::Encoding)>> {
        self.tokenizers
            .iter()
            .map(|r| {
                let e = ciyuan_measure::text::Encoding::from_name(&r.encoding).ok_or_else(|| {
                    anyhow::anyhow!(
                        "tokenizers: encoding {:?} for {:?} is not one of o200k_base, cl100k_base, qwen, qwen3_6, deepseek_v4",
                        r.encoding,
                        r.model
                    )
                })?;
                Ok((r.model.clone(), e))
            })
            .collect()
    }
}

/// `[ingest]` settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Oldest event time accepted, in seconds before now.
    pub max_age_secs: Option<u64>,
    /// Latest event time accepted, in seconds after now (clock skew).
    pub max_future_secs: Option<u64>,
    /// Most events in one batch.
    pub max_events_per_batch: Option<usize>,
}

/// `[ledger]` settings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Name of the log in its checkpoints (fixed when the ledger is created).
    pub origin: Option<String>,
    /// Size at which a segment file is sealed and a new one started.
    pub segment_max_bytes: Option<u64>,
}

/// A secret whose `Debug` never shows it.
#[derive(Deserialize, Clone)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FileConfig {
    /// Reads a config file; unknown keys are errors.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("in config file {}", path.display()))
    }
}

/// Settings of `ciyuan serve`, after merging.
#[derive(Debug)]
pub struct ServeConfig {
    /// Data directory.
    pub data: PathBuf,
    /// The PostgreSQL database, when the log and projections live there.
    pub database: Option<Secret>,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Seconds between automatic checkpoints.
    pub checkpoint_interval_secs: u64,
    /// Admin key to install on first start.
    pub bootstrap_admin_key: Option<Secret>,
    /// Log origin for a new ledger.
    pub origin: Option<String>,
    /// Segment size.
    pub segment_max_bytes: Option<u64>,
    /// Late-event window.
    pub ingest_max_age_secs: u64,
    /// Clock-skew allowance.
    pub ingest_max_future_secs: u64,
    /// Batch bound.
    pub max_events_per_batch: usize,
    /// Token definitions declared in the file (checked: they compile); recorded in the
    /// ledger on start where it lacks them.
    pub definitions: Vec<ciyuan_core::TokenDefinition>,
    /// The gateway's providers and settings (no providers: the simulated one).
    pub gateway: ciyuan_server::gateway::GatewayConfig,
    /// Webhook receivers of budget incidents.
    pub webhooks: Vec<ciyuan_notify::Target>,
    /// Unsettled reservations are released after this long.
    pub reservation_ttl_secs: u64,
    /// Seconds a request's body may take to arrive.
    pub body_timeout_secs: u64,
    /// The separate, keyless `/metrics` address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Scheduled reports, checked.
    pub reports: Vec<ciyuan_server::reports::ReportSpec>,
    /// Seconds between checks of the scheduled reports.
    pub reports_check_secs: u64,
}

impl ServeConfig {
    /// Merges file values under the flag/environment values clap already merged.
    pub fn resolve(
        file: FileConfig,
        data: Option<PathBuf>,
        listen: Option<String>,
        bootstrap_admin_key: Option<String>,
    ) -> anyhow::Result<ServeConfig> {
        let listen_text = listen
            .or(file.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text
            .parse()
            .with_context(|| format!("listen address {listen_text:?} is not HOST:PORT"))?;
        let max_body_bytes = file.max_body_bytes.unwrap_or(1 << 20);
        if max_body_bytes < 1024 {
            bail!("max_body_bytes must be at least 1024");
        }
        let checkpoint_interval_secs = file.checkpoint_interval_secs.unwrap_or(10);
        if checkpoint_interval_secs == 0 {
            bail!("checkpoint_interval_secs must be at least 1");
        }
        // Compiled here only to refuse a bad file early, naming the rule.
        ciyuan_measure::DefinitionSet::new(file.token_definitions.clone())?;
        let definitions = file.token_definitions.clone();
        let mut gateway = ciyuan_server::gateway::GatewayConfig {
            encodings: file.tokenizer_rules()?,
            providers: file
                .providers
                .iter()
                .map(ProviderSection::resolve)
                .collect::<anyhow::Result<_>>()?,
            ..Default::default()
        };
        let mut names = std::collections::HashSet::new();
        for p in &file.providers {
            if !names.insert((&p.name, &p.protocol)) {
                bail!(
                    "providers[{}]: two providers share this name and protocol",
                    p.name
                );
            }
        }
        if let Some(p) = file.gateway.recount_tolerance_percent {
            gateway.recount_tolerance_percent = p;
        }
        if let Some(t) = file.gateway.recount_tolerance_tokens {
            gateway.recount_tolerance_tokens = t;
        }
        if let Some(m) = file.gateway.default_max_output_tokens {
            gateway.default_max_output_tokens = m;
        }
        if let Some(m) = file.gateway.media_reserve_tokens {
            gateway.media_reserve_tokens = m;
        }
        if let Some(o) = &file.gateway.ledger_outage {
            gateway.ledger_outage = o
                .parse()
                .map_err(|e: String| anyhow::anyhow!("gateway.ledger_outage: {e}"))?;
        }
        let reservation_ttl_secs = file.gateway.reservation_ttl_secs.unwrap_or(3600).max(1);
        let webhooks = file
            .webhooks
            .iter()
            .map(WebhookSection::resolve)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(b) = file.gateway.max_body_bytes {
            if b < 1024 {
                bail!("gateway.max_body_bytes must be at least 1024");
            }
            gateway.max_body_bytes = b;
        }
        if let Some(m) = file.metrics.max_models {
            gateway.metrics_max_models = m;
        }
        let metrics_listen = match &file.metrics.listen {
            None => None,
            Some(text) => Some(
                text.parse::<SocketAddr>()
                    .with_context(|| format!("metrics.listen {text:?} is not HOST:PORT"))?,
            ),
        };
        let body_timeout_secs = file.body_timeout_secs.unwrap_or(30);
        if body_timeout_secs == 0 {
            bail!("body_timeout_secs must be at least 1");
        }
        let max_events_per_batch = file.ingest.max_events_per_batch.unwrap_or(10_000);
        if max_events_per_batch == 0 {
            bail!("ingest.max_events_per_batch must be at least 1");
        }
        let reports = file
            .reports
            .iter()
            .map(ReportSection::resolve)
            .collect::<anyhow::Result<Vec<_>>>()?;
        ciyuan_server::reports::check_all(&reports).map_err(anyhow::Error::msg)?;
        let reports_check_secs = file.reports_check_secs.unwrap_or(30);
        if reports_check_secs == 0 {
            bail!("reports_check_secs must be at least 1");
        }
        Ok(ServeConfig {
            reports,
            reports_check_secs,
            body_timeout_secs,
            metrics_listen,
            ingest_max_age_secs: file.ingest.max_age_secs.unwrap_or(7 * 24 * 3600),
            ingest_max_future_secs: file.ingest.max_future_secs.unwrap_or(300),
            max_events_per_batch,
            definitions,
            gateway,
            webhooks,
            reservation_ttl_secs,
            data: data.or(file.data).unwrap_or_else(|| DEFAULT_DATA.into()),
            database: match file.database {
                Some(Secret(url))
                    if !(url.starts_with("postgres://")
                        || url.starts_with("postgresql://")
                        || url.contains("host=")) =>
                {
                    bail!(
                        "database: not a PostgreSQL connection string (postgres://user@host:port/db, or host=... dbname=...)"
                    )
                }
                d => d,
            },
            listen,
            max_body_bytes,
            checkpoint_interval_secs,
            bootstrap_admin_key: bootstrap_admin_key.map(Secret).or(file.bootstrap_admin_key),
            origin: file.ledger.origin,
            segment_max_bytes: file.ledger.segment_max_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_fill_in() {
        let file: FileConfig = toml::from_str(
            r#"
            data = "/srv/ciyuan"
            listen = "0.0.0.0:9000"
            [ledger]
            origin = "example.com/ledger"
            "#,
        )
        .unwrap();
        let c = ServeConfig::resolve(file, None, Some("127.0.0.1:1".into()), None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:1");
        assert_eq!(c.data, PathBuf::from("/srv/ciyuan"));
        assert_eq!(c.origin.as_deref(), Some("example.com/ledger"));
        let c = ServeConfig::resolve(FileConfig::default(), None, None, None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data, PathBuf::from(DEFAULT_DATA));
    }

    #[test]
    fn unknown_keys_and_secrets() {
        let err = toml::from_str::<FileConfig>("lisen = \"x\"").err().unwrap();
        assert!(err.to_string().contains("unknown field `lisen`"), "{err}");
        let file: FileConfig = toml::from_str("bootstrap_admin_key = \"cy_secret\"").unwrap();
        assert_eq!(
            format!("{:?}", file.bootstrap_admin_key),
            "Some(Secret(<redacted>))"
        );
    }

    #[test]
    fn providers_are_checked_and_keys_read_from_the_environment() {
        let bad = |toml_text: &str, needle: &str| {
            let file: FileConfig = toml::from_str(toml_text).unwrap();
            let err = ServeConfig::resolve(file, None, None, None).err().unwrap();
            assert!(
                format!("{err:#}").contains(needle),
                "{err:#} lacks {needle}"
            );
        };
        bad(
            "[[providers]]\nname = \"x\"\nprotocol = \"grpc\"\nbase_url = \"http://h\"\nmodels = [\"m\"]",
            "providers[x].protocol",
        );
        bad(
            "[[providers]]\nname = \"x\"\nprotocol = \"openai\"\nbase_url = \"ftp://h\"\nmodels = [\"m\"]",
            "providers[x].base_url",
        );
        bad(
            "[[providers]]\nname = \"x\"\nprotocol = \"openai\"\nbase_url = \"http://h\"\nmodels = [\"m\"]\napi_key_env = \"CIYUAN_TEST_UNSET_VARIABLE\"",
            "CIYUAN_TEST_UNSET_VARIABLE is not set",
        );
        let file: FileConfig = toml::from_str(
            "[gateway]\nrecount_tolerance_percent = 2\n[[providers]]\nname = \"local\"\nprotocol = \"openai-compatible\"\nbase_url = \"http://127.0.0.1:11434/v1/\"\nmodels = [\"llama*\"]",
        )
        .unwrap();
        let c = ServeConfig::resolve(file, None, None, None).unwrap();
        assert_eq!(c.gateway.recount_tolerance_percent, 2);
        assert_eq!(c.gateway.providers[0].base_url, "http://127.0.0.1:11434/v1");
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ciyuan.example.toml");
        let c = ServeConfig::resolve(FileConfig::load(&path).unwrap(), None, None, None).unwrap();
        assert_eq!(c.body_timeout_secs, 30);
        assert_eq!(c.gateway.metrics_max_models, 200);
        assert_eq!(c.metrics_listen, None);
        assert_eq!(
            c.gateway.ledger_outage,
            ciyuan_server::gateway::LedgerOutage::Refuse
        );
    }

    #[test]
    fn the_ledger_outage_setting_is_refuse_and_nothing_else() {
        let file: FileConfig = toml::from_str(
            "[gateway]
ledger_outage = \"allow\"",
        )
        .unwrap();
        let err = ServeConfig::resolve(file, None, None, None).err().unwrap();
        let text = format!("{err:#}");
        assert!(text.contains("gateway.ledger_outage"), "{text}");
        assert!(text.contains("\"refuse\""), "{text}");
    }

    #[test]
    fn reports_are_checked_field_by_field() {
        let base = "[[reports]]\nname = \"daily\"\naccount = \"acme\"\nevery = \"day\"\nstart = \"2026-11-01\"\n";
        let ok = |extra: &str| {
            let file: FileConfig = toml::from_str(&format!("{base}{extra}")).unwrap();
            ServeConfig::resolve(file, None, None, None)
        };
        let c = ok("directory = \"/srv/reports\"\nformat = \"json\"").unwrap();
        assert_eq!(c.reports.len(), 1);
        assert_eq!(c.reports[0].delay.as_secs(), 60);
        assert_eq!(c.reports_check_secs, 30);
        for (extra, needle) in [
            (
                "directory = \"/d\"\nformat = \"xml\"",
                "reports[daily].format",
            ),
            (
                "",
                "reports[daily].directory, reports[daily].webhook: give one",
            ),
            (
                "directory = \"/d\"\nwebhook = \"https://h\"",
                "give one, not both",
            ),
            ("webhook = \"https://h/x\"", "reports[daily].secret_env"),
            (
                "webhook = \"https://h/x\"\nsecret_env = \"CIYUAN_TEST_UNSET_VARIABLE\"",
                "CIYUAN_TEST_UNSET_VARIABLE is not set",
            ),
            (
                "directory = \"/d\"\ndelay_secs = 99999999",
                "reports[daily].delay_secs",
            ),
        ] {
            let err = ok(extra).err().unwrap();
            assert!(
                format!("{err:#}").contains(needle),
                "{err:#} lacks {needle}"
            );
        }
        for (field, value, needle) in [
            ("every", "week", "reports[daily].every"),
            ("account", "a//b", "reports[daily].account"),
            ("start", "2026-11-01T00", "reports[daily].start"),
        ] {
            let text = base.replace(
                &format!("{field} = "),
                &format!("{field} = \"{value}\"\n# was "),
            );
            let file: FileConfig = toml::from_str(&format!("{text}directory = \"/d\"")).unwrap();
            let err = ServeConfig::resolve(file, None, None, None).err().unwrap();
            assert!(
                format!("{err:#}").contains(needle),
                "{err:#} lacks {needle}"
            );
        }
        let twice = format!("{base}directory = \"/d\"\n{base}directory = \"/e\"");
        let file: FileConfig = toml::from_str(&twice).unwrap();
        let err = ServeConfig::resolve(file, None, None, None).err().unwrap();
        assert!(format!("{err:#}").contains("share this name"), "{err:#}");
    }

    #[test]
    fn metrics_and_body_timeout_settings() {
        let file: FileConfig = toml::from_str(
            "body_timeout_secs = 5\n[metrics]\nlisten = \"127.0.0.1:9464\"\nmax_models = 7",
        )
        .unwrap();
        let c = ServeConfig::resolve(file, None, None, None).unwrap();
        assert_eq!(c.body_timeout_secs, 5);
        assert_eq!(c.gateway.metrics_max_models, 7);
        assert_eq!(c.metrics_listen.unwrap().port(), 9464);
        for bad in ["body_timeout_secs = 0", "[metrics]\nlisten = \"nowhere\""] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            assert!(
                ServeConfig::resolve(file, None, None, None).is_err(),
                "{bad}"
            );
        }
    }
}
