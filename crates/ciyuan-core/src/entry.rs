//! Ledger entries: what the tamper-evident log records.
//!
//! An entry is encoded as one line of compact JSON with a fixed field order:
//!
//! ```text
//! {"v":1,"ts":"2026-11-25T06:00:00Z","account":"acme/cn","kind":"usage","data":{...}}
//! ```
//!
//! Those bytes are the Merkle leaf: an auditor hashes exactly them, so they are never
//! re-serialized after the append. `v` is the entry format version; readers refuse
//! versions they do not know rather than guess.

use crate::budget::{AccessSet, BudgetCleared, BudgetSet, Incident};
use crate::definition::TokenDefinition;
use crate::posting::{Posting, WalletSet};
use crate::price::RatingCorrection;
use crate::price::{PriceBook, PriceContract, Rating};
use crate::{AccountPath, Scopes, tokens::TokenMap};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The entry format version this build writes and reads.
pub const ENTRY_VERSION: u16 = 1;

/// The `source` of the gateway's own usage records. Their ids are minted by the
/// gateway and never repeat, so they are not indexed for idempotency; the ingest API
/// refuses events that claim this source.
pub const GATEWAY_SOURCE: &str = "gateway";

/// One record of the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Format version, [`ENTRY_VERSION`] for new entries.
    pub v: u16,
    /// When it happened, UTC.
    pub ts: Timestamp,
    /// The account node it belongs to.
    pub account: AccountPath,
    /// What it records.
    pub body: EntryBody,
}

/// What an entry records.
// Usage is by far the most common entry and the largest; boxing it would add an
// allocation to nearly every entry to shrink the rare ones.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum EntryBody {
    /// Tokens consumed or produced by an AI service.
    Usage(Usage),
    /// A correction of earlier usage: signed deltas, naming the entry corrected.
    Adjustment(Adjustment),
    /// A node of the account tree was created.
    AccountCreated(AccountInfo),
    /// A node's attributes changed (the new attributes, whole).
    AccountUpdated(AccountInfo),
    /// An API key was created for the entry's account (the secret is never logged).
    KeyCreated(KeyCreated),
    /// An API key was revoked.
    KeyRevoked(KeyRevoked),
    /// A limit was set on the entry's node.
    BudgetSet(BudgetSet),
    /// A limit was removed from the entry's node.
    BudgetCleared(BudgetCleared),
    /// The entry's node's model access rules changed (the new rules, whole).
    AccessSet(AccessSet),
    /// A threshold was reached or a hard limit exceeded on the entry's node.
    Incident(Incident),
    /// A version of a service's token definition was declared (on the root node).
    DefinitionSet(TokenDefinition),
    /// A version of a price book was recorded (on the root node).
    PriceBook(PriceBook),
    /// The entry's node's price contract was set (the new contract, whole).
    PriceContract(PriceContract),
    /// A balanced double-entry wallet transaction (on the node whose wallet it
    /// concerns first).
    Posting(Posting),
    /// The entry's node's wallet settings in one currency.
    WalletSet(WalletSet),
    /// A usage entry re-rated under the prices now in force for its time (on the
    /// usage entry's node).
    RatingCorrection(RatingCorrection),
    /// A statement issued: its period closed for the entry's node.
    StatementClosed(crate::StatementClosed),
    /// A contract's service level evaluated for a period, with the credit it owes
    /// (on the contract's node).
    ServiceLevelEvaluated(Box<crate::ServiceLevelEvaluated>),
    /// A provider's usage export reconciled with the ledger (on the root node).
    Reconciled(crate::Reconciled),
    /// A scheduled report delivered for a period (on the report's node).
    ReportDelivered(crate::ReportDelivered),
}

/// Tokens of one call or event.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// The service: `llm.chat`, `llm.embeddings`, `face.match`, ...
    pub service: String,
    /// The model, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Tokens by modality and direction, never negative.
    pub tokens: TokenMap,
    /// Where the record came from (`gateway`, or an ingest event's `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The originating event or request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The token definition and version that produced the tokens, e.g. `doc.verify@2`.
    /// A door's own definitions (`llm.usage@1`, `gateway.openai@1`) are shared
    /// constants: every entry names one, and a copy each was an allocation per entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<std::borrow::Cow<'static, str>>,
    /// Whether the measurement is incomplete (a cut stream).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// The raw measures the definition turned into tokens (pages, seconds, ...), so a
    /// record explains its own count.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measures: BTreeMap<String, serde_json::Value>,
    /// How a gateway request went (latency, status, upstream); service-quality
    /// guarantees are computed from it.
    ///
    /// Boxed, as is `recount`: absent from ingested events, and an unboxed pair would
    /// make every entry 40% larger to move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<Box<Quality>>,
    /// Ciyuan's own count of the request's text, beside the provider's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recount: Option<Box<Recount>>,
    /// What it cost, priced as it was appended: the book and version, unit prices and
    /// amount, so a bill line is explained by its entry. Absent where no price book
    /// is in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<Box<Rating>>,
    /// The service tier the usage was served at (`batch`, `priority`, `flex`) where
    /// the event or request says; absent is standard. Prices follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<crate::price::ServiceTier>,
    /// The id of the API key the gateway request came with (its public id, never the
    /// secret), so other nodes count it on the key's limits. Absent on ingested
    /// events and in entries written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The session the budget engine counted the request on (`x-ciyuan-session`, else
    /// OpenAI's `user` or Anthropic's `metadata.user_id`), where the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Attribution tags (`feature` → `search`, `team` → `hr`), bounded by
    /// [`MAX_TAGS`], [`MAX_TAG_KEY_BYTES`] and [`MAX_TAG_VALUE_BYTES`], keys
    /// `[a-z0-9_.-]` ([`check_tags`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Most attribution tags on one usage entry.
pub const MAX_TAGS: usize = 16;
/// Longest tag key, in bytes.
pub const MAX_TAG_KEY_BYTES: usize = 64;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_BYTES: usize = 256;

/// Why a set of tags is refused: the message names the tag and the bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TagError(pub String);

/// Checks one tag against the bounds every door applies: a key of 1 to
/// [`MAX_TAG_KEY_BYTES`] bytes of `[a-z0-9_.-]` (so it can name a column of a
/// `group_by` and never needs quoting), a value of 1 to [`MAX_TAG_VALUE_BYTES`] bytes
/// with no control characters.
pub fn check_tag(key: &str, value: &str) -> Result<(), TagError> {
    if key.is_empty() || key.len() > MAX_TAG_KEY_BYTES {
        return Err(TagError(format!(
            "tag key {key:?} must be 1 to {MAX_TAG_KEY_BYTES} bytes"
        )));
    }
    // By byte: every allowed character is ASCII, so the first byte refused starts the
    // character named. (A request may carry sixteen tags: checked a character at a
    // time, they were a tenth of such a request's own work.)
    if let Some(at) = key
        .bytes()
        .position(|b| !matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
    {
        let Some(c) = key[at..].chars().next() else {
            unreachable!("a byte position found in the key starts a character of it")
        };
        return Err(TagError(format!(
            "tag key {key:?} holds {c:?}; keys are lowercase letters, digits, '_', '.' and '-'"
        )));
    }
    if value.is_empty() || value.len() > MAX_TAG_VALUE_BYTES {
        return Err(TagError(format!(
            "tag {key:?}'s value must be 1 to {MAX_TAG_VALUE_BYTES} bytes (it has {})",
            value.len()
        )));
    }
    // Control characters are C0, DEL and C1: in ASCII text, bytes below 0x20 and 0x7F
    // (checked a byte at a time, which the compiler does many at once).
    let control = if value.is_ascii() {
        value
            .bytes()
            .fold(false, |any, b| any | (b < 0x20) | (b == 0x7f))
    } else {
        value.chars().any(char::is_control)
    };
    if control {
        return Err(TagError(format!(
            "tag {key:?}'s value holds control characters"
        )));
    }
    Ok(())
}

/// Reads tags written `key=value,key=value` (the gateway's `x-ciyuan-tags`, an
/// ingested event's `ciyuantags`): spaces around keys and values are trimmed, a value
/// may hold `=`, a key given twice with different values is refused, and the set is
/// checked by [`check_tags`].
pub fn parse_tag_list(text: &str) -> Result<BTreeMap<String, String>, TagError> {
    let tags = read_tag_list(text)?;
    check_tags(&tags)?;
    Ok(tags)
}

/// [`parse_tag_list`] without [`check_tags`], for a reader that checks the set once
/// it has merged it with tags from elsewhere (the gateway's `metadata`).
pub fn read_tag_list(text: &str) -> Result<BTreeMap<String, String>, TagError> {
    let mut tags = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(TagError(format!(
                "{pair:?} is not key=value (e.g. feature=search,team=hr)"
            )));
        };
        let (k, v) = (k.trim(), v.trim());
        match tags.get(k) {
            Some(old) if old != v => {
                return Err(TagError(format!(
                    "tag {k:?} is given twice, as {old:?} and {v:?}"
                )));
            }
            Some(_) => {}
            None => {
                tags.insert(k.to_string(), v.to_string());
            }
        }
    }
    Ok(tags)
}

/// Checks a whole set of tags: each by [`check_tag`], at most [`MAX_TAGS`].
pub fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), TagError> {
    if tags.len() > MAX_TAGS {
        return Err(TagError(format!(
            "{} tags; at most {MAX_TAGS} are recorded",
            tags.len()
        )));
    }
    for (k, v) in tags {
        check_tag(k, v)?;
    }
    Ok(())
}

/// How one gateway request went. Durations are whole microseconds, so every figure is
/// exact; rates are derived from them when asked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Quality {
    /// The upstream provider's configured name.
    pub upstream: String,
    /// The HTTP status the client got.
    pub status: u16,
    /// Whether the answer was streamed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// From the request's arrival to the first byte of content (streams: the first
    /// token), if any came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_us: Option<u64>,
    /// From the request's arrival to the last byte sent to the client.
    pub latency_us: u64,
    /// Output tokens per second while the answer was generated (after the first
    /// token), rounded down; absent when there was no output or no time to measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_sec: Option<u64>,
    /// Why the measurement is partial or failed: `client_disconnected`,
    /// `upstream_cut`, `upstream_timeout`, `upstream_error`, `no_usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The tokens are Ciyuan's count of the prompt and of what was delivered (the
    /// provider's final count never came: a cut stream, no usage reported), made with
    /// the tokenizer `recount.encoding` names (`o200k_base` standing in for models whose
    /// own tokenizer Ciyuan does not have). Absent (false) in entries written before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
    /// What the recount could not count exactly, so the comparison with the provider
    /// allowed for it: `tools` (definitions, in a format providers do not publish),
    /// `tool_calls` (their framing), `media`, `redacted_thinking`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uncounted: Vec<String>,
    /// The model the provider says served the request (the answer's `model`, e.g.
    /// `gpt-4o-2024-08-06`); absent when the answer named none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    /// The answer's `system_fingerprint`, where the provider gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// The provider's id of the request (its `x-request-id` or `request-id` header,
    /// else the answer's `id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_request_id: Option<String>,
    /// The id under which the provider keeps the answer to be retrieved later (the
    /// Responses API's `resp_...`): the gateway serves `GET /v1/responses/{id}` and
    /// its kin to the account that made it, from the provider that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
}

/// Ciyuan's independent count of a request's text with the model's tokenizer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Recount {
    /// The encoding used, e.g. `o200k_base`.
    pub encoding: String,
    /// Prompt tokens as Ciyuan counts them (chat framing estimated per family).
    pub input: u64,
    /// Answer tokens as Ciyuan counts them (text actually delivered).
    pub output: u64,
    /// Whether the provider's count differs from this one beyond the configured
    /// tolerance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flagged: bool,
}

/// A correction of earlier usage.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Adjustment {
    /// The id (log index) of the entry corrected, if the correction targets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrects: Option<u64>,
    /// Why, in words.
    pub reason: String,
    /// The service whose usage is corrected.
    pub service: String,
    /// The model whose usage is corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Signed token deltas.
    pub tokens: TokenMap,
}

/// Attributes of an account node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AccountInfo {
    /// A name for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// IANA time zone in which the node's periods (days, months) are computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Free metadata for exports: cost center, GL account, ...
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A key was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCreated {
    /// The key's public id (the part of the key that is not secret).
    pub key_id: String,
    /// Its scopes.
    pub scopes: Scopes,
    /// A label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A key was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRevoked {
    /// The key's public id.
    pub key_id: String,
}

/// Why bytes are not a valid entry.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not the entry JSON shape.
    #[error("malformed entry: {0}")]
    Json(#[from] serde_json::Error),
    /// A version this build does not read.
    #[error("entry format version {0} is not supported (this build reads {ENTRY_VERSION})")]
    Version(u16),
    /// An unknown kind.
    #[error("unknown entry kind {0:?}")]
    Kind(String),
}

impl Usage {
    /// The `(source, id)` under which an ingested event is deduplicated: present for
    /// events that came through the ingest API, absent for the gateway's own records.
    pub fn ingest_key(&self) -> Option<(&str, &str)> {
        match (self.source.as_deref(), self.event_id.as_deref()) {
            (Some(source), Some(id)) if source != GATEWAY_SOURCE => Some((source, id)),
            _ => None,
        }
    }

    /// Whether the budgets count it: every ingested event, and every gateway request
    /// the provider accepted (a 2xx status). A request the provider refused consumed
    /// nothing, and its node counted nothing, not even the request.
    pub fn consumed(&self) -> bool {
        self.quality
            .as_ref()
            .is_none_or(|q| (200..300).contains(&q.status))
    }
}

/// The 64-bit hash of an ingested event's `(source, id)` under which the idempotency
/// index files it. It is stored, so it is defined here once and never changes: the
/// first 8 bytes (little-endian) of SHA-256 over the source's length (u32,
/// little-endian), the source and the id. A cryptographic hash because event ids are
/// chosen by clients: nobody can make many keys share a hash.
pub fn ingest_key_hash(source: &str, id: &str) -> u64 {
    let digest = ingest_key_digest(source, id);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The whole SHA-256 of which [`ingest_key_hash`] is the first 8 bytes: the key under
/// which a log shared by several nodes refuses a second entry of the same event (64
/// bits would let two of billions of events collide; 256 do not).
pub fn ingest_key_digest(source: &str, id: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // Ids are at most a few hundred bytes: the length always fits.
    h.update((source.len() as u32).to_le_bytes());
    h.update(source.as_bytes());
    h.update(id.as_bytes());
    h.finalize().into()
}

impl EntryBody {
    /// The kind as written in the entry.
    pub fn kind(&self) -> &'static str {
        match self {
            EntryBody::Usage(_) => "usage",
            EntryBody::Adjustment(_) => "adjustment",
            EntryBody::AccountCreated(_) => "account.created",
            EntryBody::AccountUpdated(_) => "account.updated",
            EntryBody::KeyCreated(_) => "key.created",
            EntryBody::KeyRevoked(_) => "key.revoked",
            EntryBody::BudgetSet(_) => "budget.set",
            EntryBody::BudgetCleared(_) => "budget.cleared",
            EntryBody::AccessSet(_) => "access.set",
            EntryBody::Incident(_) => "incident",
            EntryBody::DefinitionSet(_) => "definition.set",
            EntryBody::PriceBook(_) => "price.book",
            EntryBody::PriceContract(_) => "price.contract",
            EntryBody::Posting(_) => "posting",
            EntryBody::WalletSet(_) => "wallet.set",
            EntryBody::RatingCorrection(_) => "rating.correction",
            EntryBody::StatementClosed(_) => "statement.closed",
            EntryBody::ServiceLevelEvaluated(_) => "service_level.evaluated",
            EntryBody::Reconciled(_) => "reconciliation",
            EntryBody::ReportDelivered(_) => "report.delivered",
        }
    }
}

#[derive(Serialize)]
struct EntryOut<'a, T: Serialize> {
    v: u16,
    ts: &'a Timestamp,
    account: &'a AccountPath,
    kind: &'static str,
    data: &'a T,
}

#[derive(Deserialize)]
struct EntryIn<'a> {
    v: u16,
    ts: Timestamp,
    account: AccountPath,
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

impl Entry {
    /// A new entry of the current format version.
    pub fn new(ts: Timestamp, account: AccountPath, body: EntryBody) -> Entry {
        Entry {
            v: ENTRY_VERSION,
            ts,
            account,
            body,
        }
    }

    /// The ledger bytes: compact JSON, one line, no trailing newline.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(192);
        self.encode_into(&mut out);
        out
    }

    /// Appends the ledger bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        fn put<T: Serialize>(e: &Entry, data: &T, out: &mut Vec<u8>) {
            let wire = EntryOut {
                v: e.v,
                ts: &e.ts,
                account: &e.account,
                kind: e.body.kind(),
                data,
            };
            // These bytes become a Merkle leaf: a partial write would sign a truncated
            // entry forever. Writing plain structs into a Vec cannot fail (a map key
            // that is not a string could), so a failure is a bug and stops loudly.
            let written = serde_json::to_writer(out, &wire);
            assert!(
                written.is_ok(),
                "encoding a {} entry failed: {written:?}",
                e.body.kind()
            );
        }
        match &self.body {
            EntryBody::Usage(d) => {
                // Nearly every entry: the same bytes as `put`, written by hand.
                let written = crate::reuse::encode_usage(self, d, out);
                assert!(
                    written.is_ok(),
                    "encoding a usage entry failed: {written:?}"
                );
            }
            EntryBody::Adjustment(d) => put(self, d, out),
            EntryBody::AccountCreated(d) | EntryBody::AccountUpdated(d) => put(self, d, out),
            EntryBody::KeyCreated(d) => put(self, d, out),
            EntryBody::KeyRevoked(d) => put(self, d, out),
            EntryBody::BudgetSet(d) => put(self, d, out),
            EntryBody::BudgetCleared(d) => put(self, d, out),
            EntryBody::AccessSet(d) => put(self, d, out),
            EntryBody::Incident(d) => put(self, d, out),
            EntryBody::DefinitionSet(d) => put(self, d, out),
            EntryBody::PriceBook(d) => put(self, d, out),
            EntryBody::PriceContract(d) => put(self, d, out),
            EntryBody::Posting(d) => put(self, d, out),
            EntryBody::WalletSet(d) => put(self, d, out),
            EntryBody::RatingCorrection(d) => put(self, d, out),
            EntryBody::StatementClosed(d) => put(self, d, out),
            EntryBody::ServiceLevelEvaluated(d) => put(self, d, out),
            EntryBody::Reconciled(d) => put(self, d, out),
            EntryBody::ReportDelivered(d) => put(self, d, out),
        }
    }

    /// Decodes ledger bytes.
    pub fn decode(bytes: &[u8]) -> Result<Entry, DecodeError> {
        let raw: EntryIn<'_> = serde_json::from_slice(bytes)?;
        if raw.v != ENTRY_VERSION {
            return Err(DecodeError::Version(raw.v));
        }
        let data = raw.data.get();
        let body = match raw.kind.as_ref() {
            "usage" => EntryBody::Usage(serde_json::from_str(data)?),
            "adjustment" => EntryBody::Adjustment(serde_json::from_str(data)?),
            "account.created" => EntryBody::AccountCreated(serde_json::from_str(data)?),
            "account.updated" => EntryBody::AccountUpdated(serde_json::from_str(data)?),
            "key.created" => EntryBody::KeyCreated(serde_json::from_str(data)?),
            "key.revoked" => EntryBody::KeyRevoked(serde_json::from_str(data)?),
            "budget.set" => EntryBody::BudgetSet(serde_json::from_str(data)?),
            "budget.cleared" => EntryBody::BudgetCleared(serde_json::from_str(data)?),
            "access.set" => EntryBody::AccessSet(serde_json::from_str(data)?),
            "incident" => EntryBody::Incident(serde_json::from_str(data)?),
            "definition.set" => EntryBody::DefinitionSet(serde_json::from_str(data)?),
            "price.book" => EntryBody::PriceBook(serde_json::from_str(data)?),
            "price.contract" => EntryBody::PriceContract(serde_json::from_str(data)?),
            "posting" => EntryBody::Posting(serde_json::from_str(data)?),
            "wallet.set" => EntryBody::WalletSet(serde_json::from_str(data)?),
            "rating.correction" => EntryBody::RatingCorrection(serde_json::from_str(data)?),
            "statement.closed" => EntryBody::StatementClosed(serde_json::from_str(data)?),
            "service_level.evaluated" => {
                EntryBody::ServiceLevelEvaluated(serde_json::from_str(data)?)
            }
            "reconciliation" => EntryBody::Reconciled(serde_json::from_str(data)?),
            "report.delivered" => EntryBody::ReportDelivered(serde_json::from_str(data)?),
            other => return Err(DecodeError::Kind(other.to_string())),
        };
        Ok(Entry {
            v: raw.v,
            ts: raw.ts,
            account: raw.account,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tags_are_checked_by_byte_as_they_were_by_character() {
        use proptest::prelude::*;
        // The rule as first written, a character at a time.
        fn by_char(key: &str, value: &str) -> bool {
            !key.is_empty()
                && key.len() <= MAX_TAG_KEY_BYTES
                && key
                    .chars()
                    .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-'))
                && !value.is_empty()
                && value.len() <= MAX_TAG_VALUE_BYTES
                && !value.chars().any(char::is_control)
        }
        let text = "[a-z0-9_.\\-]{0,6}(\\PC|\\pC|[\u{0}-\u{a0}]){0,3}[a-z0-9]{0,3}";
        proptest!(ProptestConfig::with_cases(4000), |(k in text, v in text)| {
            prop_assert_eq!(check_tag(&k, &v).is_ok(), by_char(&k, &v), "{:?}={:?}", k, v);
        });
        let e = check_tag("teamÉ", "x").unwrap_err().0;
        assert!(e.contains("holds 'É'"), "{e}");
        for control in ["a\u{7f}", "\u{85}b", "c\u{9f}", "\u{0}"] {
            assert!(check_tag("k", control).is_err(), "{control:?}");
        }
        assert!(check_tag("k", "\u{a0}é中").is_ok());
    }

    use super::*;
    use crate::{Direction, Modality};

    #[test]
    fn ingest_key_hash_is_fixed_and_separates_source_from_id() {
        // Stored in the idempotency index: these values must never change (they were
        // computed with Python's hashlib from the definition).
        assert_eq!(ingest_key_hash("svc://bench", "ev-1"), 1397182355766145166);
        assert_eq!(ingest_key_hash("a", "bc"), 8921586255305438011);
        assert_eq!(ingest_key_hash("ab", "c"), 7098489739215425048);
    }

    fn usage() -> Entry {
        let mut tokens = TokenMap::new();
        tokens.add(Modality::Text, Direction::Input, 19).unwrap();
        tokens.add(Modality::Text, Direction::Output, 10).unwrap();
        Entry::new(
            "2026-11-25T06:00:00.123Z".parse().unwrap(),
            "acme/cn".parse().unwrap(),
            EntryBody::Usage(Usage {
                service: "llm.chat".into(),
                model: Some("gpt-4o".into()),
                tokens,
                source: Some("gateway".into()),
                ..Usage::default()
            }),
        )
    }

    #[test]
    fn encoding_is_pinned() {
        let bytes = usage().encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"v":1,"ts":"2026-11-25T06:00:00.123Z","account":"acme/cn","kind":"usage","data":{"service":"llm.chat","model":"gpt-4o","tokens":{"text.input":19,"text.output":10},"source":"gateway"}}"#
        );
        assert_eq!(Entry::decode(&bytes).unwrap(), usage());
    }

    #[test]
    fn every_kind_round_trips() {
        let at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let acct: AccountPath = "a/b".parse().unwrap();
        let bodies = [
            EntryBody::Adjustment(Adjustment {
                corrects: Some(7),
                reason: "double count".into(),
                service: "llm.chat".into(),
                model: None,
                tokens: TokenMap::new(),
            }),
            EntryBody::AccountCreated(AccountInfo {
                display_name: Some("HR 人力资源".into()),
                time_zone: Some("Asia/Shanghai".into()),
                metadata: [("gl".to_string(), "6001".to_string())].into(),
            }),
            EntryBody::AccountUpdated(AccountInfo::default()),
            EntryBody::KeyCreated(KeyCreated {
                key_id: "k1".into(),
                scopes: Scopes::parse_list("gateway,read").unwrap(),
                name: None,
            }),
            EntryBody::KeyRevoked(KeyRevoked {
                key_id: "k1".into(),
            }),
            EntryBody::BudgetSet(crate::BudgetSet {
                name: "monthly".into(),
                measure: crate::BudgetMeasure::Tokens,
                selector: crate::Selector::parse("text.output").unwrap(),
                amount: 1000,
                period: crate::BudgetPeriod::Month,
                mode: crate::BudgetMode::Hard,
                per: crate::BudgetPer::Session,
                thresholds: vec![80, 100],
                clamp: true,
                set_by: Some("a".parse().unwrap()),
                cost: None,
            }),
            EntryBody::BudgetCleared(crate::BudgetCleared {
                name: "monthly".into(),
                cleared_by: None,
            }),
            EntryBody::AccessSet(crate::AccessSet {
                allow: Some(vec!["gpt-4o*".into()]),
                deny: vec!["gpt-4o-audio*".into()],
                set_by: None,
            }),
            EntryBody::Incident(crate::Incident {
                kind: "budget.threshold".into(),
                limit: "monthly".into(),
                mode: crate::BudgetMode::Hard,
                window_start: Some(at),
                threshold: Some(80),
                used: 800,
                amount: 1000,
                subject: Some("session-1".into()),
                cause: Some(41),
                cost: None,
            }),
            EntryBody::DefinitionSet(crate::TokenDefinition {
                service: "doc.verify".into(),
                version: 2,
                effective_from: at,
                description: Some("pages × 500".into()),
                tokens: [("other.input".to_string(), "pages * 500".to_string())].into(),
                set_by: Some(AccountPath::root()),
            }),
            EntryBody::ReportDelivered(crate::ReportDelivered {
                name: "daily-usage".into(),
                period: "2026-11-05".into(),
                period_start: "2026-11-04T16:00:00Z".parse().unwrap(),
                period_end: "2026-11-05T16:00:00Z".parse().unwrap(),
                time_zone: "Asia/Shanghai".into(),
                format: "csv".into(),
                sha256: crate::ReportDelivered::hash(b"x"),
                bytes: 1,
                destination: "https://hooks.example.com/finance".into(),
                secret_sha256: Some("0123456789abcdef".into()),
                manual: true,
            }),
        ];
        for body in bodies {
            let e = Entry::new(at, acct.clone(), body);
            let bytes = e.encode();
            assert!(!bytes.contains(&b'\n'));
            assert_eq!(Entry::decode(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn refuses_unknown_versions_and_kinds() {
        let v2 = br#"{"v":2,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"usage","data":{}}"#;
        assert_eq!(
            Entry::decode(v2).unwrap_err().to_string(),
            "entry format version 2 is not supported (this build reads 1)"
        );
        let k = br#"{"v":1,"ts":"2026-01-01T00:00:00Z","account":"a","kind":"mystery","data":{}}"#;
        assert_eq!(
            Entry::decode(k).unwrap_err().to_string(),
            "unknown entry kind \"mystery\""
        );
    }

    #[test]
    fn entries_written_before_attribution_keep_their_bytes() {
        // An entry as the gateway wrote it before keys, sessions, tags and provenance
        // were recorded: it decodes with them absent and encodes to the same bytes, so
        // the leaf hashes of an existing log still verify.
        let old = br#"{"v":1,"ts":"2026-11-25T06:00:00Z","account":"acme/cn","kind":"usage","data":{"service":"llm.chat","model":"gpt-4o","tokens":{"text.input":12,"text.output":3},"source":"gateway","event_id":"req_1","quality":{"upstream":"openai","status":200,"latency_us":900}}}"#;
        let e = Entry::decode(old).unwrap();
        let EntryBody::Usage(u) = &e.body else {
            panic!("usage")
        };
        assert_eq!((u.key.as_deref(), u.session.as_deref()), (None, None));
        assert!(u.tags.is_empty());
        assert_eq!(u.quality.as_ref().unwrap().served_model, None);
        assert_eq!(e.encode(), old.to_vec());
        let mut slot = e.clone();
        slot.decode_into(old).unwrap();
        assert_eq!(slot, e);
        // With them: written after every older field, in the fixed order.
        let mut new = e.clone();
        let EntryBody::Usage(u) = &mut new.body else {
            panic!("usage")
        };
        u.key = Some("k_1".into());
        u.session = Some("alice".into());
        u.tags = [("feature".to_string(), "search".to_string())].into();
        u.quality.as_mut().unwrap().served_model = Some("gpt-4o-2024-08-06".into());
        let bytes = String::from_utf8(new.encode()).unwrap();
        assert!(
            bytes.ends_with(r#""served_model":"gpt-4o-2024-08-06"},"key":"k_1","session":"alice","tags":{"feature":"search"}}}"#),
            "{bytes}"
        );
        assert_eq!(Entry::decode(bytes.as_bytes()).unwrap(), new);
    }

    #[test]
    fn tags_are_bounded_and_each_bound_is_named() {
        let one = |k: &str, v: &str| check_tags(&[(k.to_string(), v.to_string())].into());
        assert!(one("feature", "search").is_ok());
        assert!(one("team.sub-1_x", "HR / 人事").is_ok());
        let err = |k: &str, v: &str| one(k, v).unwrap_err().to_string();
        assert!(
            err("Feature", "x").contains("lowercase letters"),
            "{}",
            err("Feature", "x")
        );
        assert!(err("a b", "x").contains("' '"));
        assert!(err("", "x").contains("1 to 64 bytes"));
        assert!(err(&"k".repeat(65), "x").contains("1 to 64 bytes"));
        assert!(one(&"k".repeat(64), &"v".repeat(256)).is_ok());
        assert!(err("k", &"v".repeat(257)).contains("1 to 256 bytes (it has 257)"));
        assert!(err("k", "").contains("1 to 256 bytes"));
        assert!(err("k", "a\nb").contains("control characters"));
        let many: BTreeMap<String, String> = (0..17)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert_eq!(
            check_tags(&many).unwrap_err().to_string(),
            "17 tags; at most 16 are recorded"
        );
        let sixteen: BTreeMap<String, String> = many.into_iter().take(16).collect();
        assert!(check_tags(&sixteen).is_ok());
        let list = parse_tag_list(" feature=search, team = hr,,q=a=b ").unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!((list["team"].as_str(), list["q"].as_str()), ("hr", "a=b"));
        assert!(parse_tag_list("").unwrap().is_empty());
        assert!(parse_tag_list("a=1,a=1").is_ok());
        assert_eq!(
            parse_tag_list("a=1,a=2").unwrap_err().to_string(),
            "tag \"a\" is given twice, as \"1\" and \"2\""
        );
        assert!(
            parse_tag_list("feature")
                .unwrap_err()
                .to_string()
                .contains("key=value")
        );
        assert!(parse_tag_list("A=1").is_err());
    }
}
