//! The embedded tamper-evident log of Ciyuan.
//!
//! A ledger directory holds:
//!
//! - `segments/{first index:020}.seg`: a 16-byte header, then records framed as
//!   `u32 length ‖ u64 index ‖ u32 CRC32C(length ‖ index ‖ payload) ‖ payload`. The
//!   index in every record makes gaps and reordering visible even without the tree.
//! - `leaves`: the sidecar, 40 bytes per entry: the RFC 6962 leaf hash and the record's
//!   offset in its segment. It is derivable from the segments, so it is not synced per
//!   append; it is synced when a segment is sealed and on close, and recovery rebuilds
//!   the part belonging to the last segment.
//! - `checkpoints`: signed C2SP checkpoint notes, framed with length and CRC32C.
//! - `signing.key` / `public.key`: the Ed25519 checkpoint key (Go `note` private key
//!   format, mode 0600) and its C2SP verifier key. The key name is the log's origin.
//! - `LOCK`: held with an OS file lock so one process at a time owns the ledger.
//!
//! [`Ledger`] is the single writer; [`GroupCommitter`] runs it on a thread so that many
//! producers share one `fdatasync` per group; [`LedgerReader`] reads, proves and
//! serves checkpoints concurrently with appends. [`verify_path`] checks a ledger
//! directory or an exported bundle offline, from the bytes alone.
//!
//! ## What a crash may leave, and who judges it
//!
//! Only the writes after the last completed `fdatasync` can be torn, and none of them
//! was acknowledged. [`Ledger::open`] cuts a damaged tail of the **last** segment when
//! nothing valid follows it, rebuilds the sidecar from the start of that segment, and
//! checks the ends of every sealed segment against the sidecar. Damage followed by
//! valid records, or anywhere in a sealed segment, is an error naming the segment,
//! offset and entry; it is never cut.
//!
//! [`verify_path`] repairs nothing. On a ledger directory that has not been reopened
//! since a crash it accepts exactly the two leftovers nothing ever vouched for: a
//! sidecar that stops short of, or runs past, the records of the last segment (every
//! byte beside a record must match it), and a torn final write (reported in
//! [`VerifyReport::torn_tail_bytes`]). Whether a damaged tail is a torn write is a rule
//! of the format, applied alike by recovery and the verifier: nothing valid follows
//! it, no signed checkpoint covers it, and it is no longer than
//! `MAX_TORN_TAIL_BYTES` (256 MiB), which bounds what a writer may hold unsynced
//! whatever its options ([`LedgerOptions::check`]). A bundle must be exactly what
//! [`export_bundle`] wrote, up to its newest checkpoint.
#![deny(missing_docs)]

pub mod bench;
mod bundle;
mod entries;
mod format;
mod group;
mod keys;
mod ledger;
mod verify;

pub use bundle::{BundleSummary, BundleWriter, export_bundle, export_log, write_bundle};
pub use entries::for_each_entry;
pub use group::{GroupCommitter, OnAppended, OnCheckpoint};
pub use keys::load_or_create as signing_key;
pub use ledger::{Ledger, LedgerReader};
pub use verify::{VerifyFailure, VerifyReport, verify_path, verify_path_with_progress};

pub use ciyuan_store::SignedCheckpoint;

/// Tunables of a ledger. Every bound is named here.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Origin (and key name) of a new ledger; ignored when the ledger exists.
    pub origin: Option<String>,
    /// A segment is sealed and a new one begun once it reaches this size.
    pub segment_max_bytes: u64,
    /// Largest entry accepted; at most the format's limit (16 MiB).
    pub max_entry_bytes: usize,
    /// Most entries in one group commit, and in one append request.
    pub max_batch_entries: usize,
    /// Most payload bytes in one group commit, and in one append request.
    pub max_batch_bytes: usize,
    /// Append requests that may wait for the writer before producers block.
    pub queue_depth: usize,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            origin: None,
            segment_max_bytes: 128 << 20,
            max_entry_bytes: 1 << 20,
            max_batch_entries: 65_536,
            max_batch_bytes: 16 << 20,
            queue_depth: 1024,
        }
    }
}

impl LedgerOptions {
    /// The most bytes the writer can have written but not yet synced with these
    /// options: the groups in flight in the pipeline, each at most one request past
    /// the batch bounds (a request is never split), records framed. It must stay within
    /// the format's torn-tail bound, which recovery and the verifier rely on.
    pub fn max_unsynced_bytes(&self) -> u64 {
        let group = 2 * self.max_batch_bytes as u64
            + 2 * self.max_batch_entries as u64 * format::RECORD_HEADER_BYTES as u64;
        group::UNSYNCED_GROUPS as u64 * group
    }

    /// Refuses options the on-disk format cannot honour.
    pub fn check(&self) -> Result<(), LedgerError> {
        if self.max_entry_bytes > format::MAX_ENTRY_BYTES {
            return Err(LedgerError::Invalid(format!(
                "max_entry_bytes {} is over the format's limit of {}",
                self.max_entry_bytes,
                format::MAX_ENTRY_BYTES
            )));
        }
        if self.max_batch_bytes == 0 || self.max_batch_entries == 0 {
            return Err(LedgerError::Invalid(
                "max_batch_bytes and max_batch_entries must be at least 1".into(),
            ));
        }
        if self.max_unsynced_bytes() > format::MAX_TORN_TAIL_BYTES {
            return Err(LedgerError::Invalid(format!(
                "max_batch_bytes {} and max_batch_entries {} let {} bytes wait for a sync, \
                 more than the {} a crash may leave torn in the ledger format",
                self.max_batch_bytes,
                self.max_batch_entries,
                self.max_unsynced_bytes(),
                format::MAX_TORN_TAIL_BYTES
            )));
        }
        Ok(())
    }
}

/// What went wrong in the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// An entry that breaks the ledger's rules; nothing of its request was written.
    #[error("invalid entry: {0}")]
    Invalid(String),
    /// An index or size outside the log.
    #[error("{0}")]
    OutOfRange(String),
    /// Another process holds the ledger.
    #[error("the ledger in {0} is locked by another process (is a server running on it?)")]
    Locked(String),
    /// The stored data is damaged beyond a torn tail.
    #[error("ledger corrupt: {0}")]
    Corrupt(String),
    /// A previous write failed; the ledger refuses further appends until reopened.
    #[error("ledger failed earlier and must be reopened: {0}")]
    Failed(String),
    /// The writer thread is gone.
    #[error("the ledger is shut down")]
    ShutDown,
    /// An IO error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl LedgerError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LedgerError {
        let context = context.into();
        move |source| LedgerError::Io { context, source }
    }
}

impl From<LedgerError> for ciyuan_store::LogError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Invalid(m) | LedgerError::OutOfRange(m) => {
                ciyuan_store::LogError::Invalid(m)
            }
            LedgerError::ShutDown => ciyuan_store::LogError::Unavailable("shut down".into()),
            other => ciyuan_store::LogError::Io(other.to_string()),
        }
    }
}
