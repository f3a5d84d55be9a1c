//! Usage by API key and by session: hourly rollups of what each key and each session
//! consumed on each node, so per-key and per-session limits count their window so far
//! after a restart, and from the moment such a limit is set, as node limits do.
//!
//! Counted exactly as the budget engine counts a key's and a session's limits live:
//! usage entries the provider accepted ([`ciyuan_core::Usage::consumed`]), their tokens
//! and rated amount, at their own hour. Corrections name no key or session and are not
//! counted here.
//!
//! Kept in tables of the exact hourly rollups' shape ([`crate::keyed`]), `service`
//! holding `key:ID` or `session:ID`, U+001F and the service. A key belongs to one node,
//! a session may span several: a limit on a node counts the rows of its subtree.

use crate::keyed;
use crate::{CostRow, HourRow, StoreError};

/// Whose usage a row is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    /// An API key's, by its public id.
    Key(String),
    /// A session's.
    Session(String),
}

/// The stored text of a key's rows is this and the key's id.
pub const KEY_PREFIX: &str = "key:";
/// The stored text of a session's rows is this and the session.
pub const SESSION_PREFIX: &str = "session:";

impl Subject {
    fn parse(text: &str) -> Result<Subject, StoreError> {
        if let Some(id) = text.strip_prefix(KEY_PREFIX) {
            Ok(Subject::Key(id.to_string()))
        } else if let Some(id) = text.strip_prefix(SESSION_PREFIX) {
            Ok(Subject::Session(id.to_string()))
        } else {
            Err(StoreError::Corrupt(format!(
                "a subject rollup's key {text:?} names neither a key nor a session"
            )))
        }
    }
}

/// A subject's token row read back: whose, and the row (its own service).
pub type SubjectHourRow = (Subject, HourRow);
/// A subject's cost row read back.
pub type SubjectCostRow = (Subject, CostRow);

/// Rows of a subject table read as exact rollup rows, split into subject and row.
pub fn split_usage(rows: Vec<HourRow>) -> Result<Vec<SubjectHourRow>, StoreError> {
    keyed::split_rows(rows, Subject::parse)
}

/// [`split_usage`] for cost rows.
pub fn split_cost(rows: Vec<CostRow>) -> Result<Vec<SubjectCostRow>, StoreError> {
    keyed::split_rows(rows, Subject::parse)
}
