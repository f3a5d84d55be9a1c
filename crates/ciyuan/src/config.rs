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
    /// HTTP listen address.
    pub listen: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: Option<usize>,
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
    /// Compiled token definitions.
    pub definitions: ciyuan_measure::DefinitionSet,
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
            .or(file.listen)
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
        let definitions = ciyuan_measure::DefinitionSet::new(file.token_definitions)?;
        let max_events_per_batch = file.ingest.max_events_per_batch.unwrap_or(10_000);
        if max_events_per_batch == 0 {
            bail!("ingest.max_events_per_batch must be at least 1");
        }
        Ok(ServeConfig {
            ingest_max_age_secs: file.ingest.max_age_secs.unwrap_or(7 * 24 * 3600),
            ingest_max_future_secs: file.ingest.max_future_secs.unwrap_or(300),
            max_events_per_batch,
            definitions,
            data: data.or(file.data).unwrap_or_else(|| DEFAULT_DATA.into()),
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
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ciyuan.example.toml");
        FileConfig::load(&path).unwrap();
    }
}
