//! Token definitions as the ledger records them (`definition.set`).
//!
//! How a service's measures (pages, seconds, faces) become tokens is not standardized,
//! so each rule is declared, versioned and effective-dated, and recorded in the log:
//! anyone can see which rule produced a count (a usage entry names `service@version`)
//! and check that no rule was changed after it was used. `ciyuan-measure` compiles them.

use crate::AccountPath;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One version of a service's token definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenDefinition {
    /// The service (the CloudEvent `type`), e.g. `doc.verify`.
    pub service: String,
    /// Version, increasing with `effective_from`.
    pub version: u32,
    /// From when it applies (RFC 3339, UTC).
    pub effective_from: Timestamp,
    /// What it is, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Token key (`modality.direction`) → CEL expression over the event's data fields.
    pub tokens: BTreeMap<String, String>,
    /// The node of the key (or `/` for the configuration file) that declared it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<AccountPath>,
}

impl TokenDefinition {
    /// `service@version`, as usage entries name it.
    pub fn id(&self) -> String {
        format!("{}@{}", self.service, self.version)
    }

    /// Whether two declarations say the same thing (who declared it aside).
    pub fn same_rule(&self, other: &TokenDefinition) -> bool {
        self.service == other.service
            && self.version == other.version
            && self.effective_from == other.effective_from
            && self.description == other.description
            && self.tokens == other.tokens
    }
}
