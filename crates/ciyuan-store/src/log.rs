//! The ledger seen from the server: append, read, prove.

use ciyuan_tlog::{Checkpoint, Hash};
use std::ops::Range;

/// A checkpoint together with its signed note, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The parsed checkpoint.
    pub checkpoint: Checkpoint,
    /// The C2SP signed note text.
    pub note: String,
}

/// What went wrong in a log backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The caller asked for something that does not exist or cannot be (an index past
    /// the end, an entry that breaks the log's rules).
    #[error("{0}")]
    Invalid(String),
    /// The log cannot take or answer this now but may in a moment: it is shutting
    /// down, or its storage is out of reach (a lost or refused connection, a database
    /// restarting, a serialization race). A failed append with this error is certainly
    /// not in the log, so retrying it cannot record it twice.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// Storage failed, and would again (corrupt data, a broken disk, a bug).
    #[error("ledger storage: {0}")]
    Io(String),
    /// A log several nodes write refused the whole append: an entry's [`EntryKey`] is
    /// held already, by the entries named (position in the append, index of the entry
    /// holding the key). Nothing of the append was written.
    #[error("{} of the entries are in the ledger already", .0.len())]
    Duplicate(Vec<(usize, u64)>),
}

/// The unique key of an entry, where it has one (an ingested event's
/// `ciyuan_core::ingest_key_digest`): a log that several nodes write keeps them and
/// never holds two entries with one key.
pub type EntryKey = [u8; 32];

impl LogError {
    /// Whether the same call may succeed if tried again later (and took no effect).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LogError::Unavailable(_))
    }
}

/// Called once the appended entries are durable (or failed): their index range.
pub type AppendDone = Box<dyn FnOnce(Result<Range<u64>, LogError>) + Send>;
/// Called once a checkpoint is signed and stored.
pub type CheckpointDone = Box<dyn FnOnce(Result<SignedCheckpoint, LogError>) + Send>;

/// Visits one entry of a scan: its index and bytes.
pub type ScanFn<'a> = dyn FnMut(u64, &[u8]) -> Result<(), LogError> + 'a;

/// The tamper-evident log. Entries are opaque bytes here; their id is their index.
pub trait Log: Send + Sync + 'static {
    /// Queues entries for a durable append; `done` runs when they are durable.
    fn append(&self, entries: Vec<Vec<u8>>, done: AppendDone) -> Result<(), LogError>;
    /// [`Log::append`] of entries with their unique keys (`keys[i]` is `entries[i]`'s).
    /// A log that [`Log::keeps_keys`] fails the whole append with
    /// [`LogError::Duplicate`] when one of them is held, in the same transaction that
    /// would have written it: across nodes, an event is in the ledger at most once.
    /// The default (a log with one writer, whose callers keep their own exact index)
    /// ignores the keys.
    fn append_keyed(
        &self,
        entries: Vec<Vec<u8>>,
        keys: Vec<Option<EntryKey>>,
        done: AppendDone,
    ) -> Result<(), LogError> {
        debug_assert_eq!(entries.len(), keys.len());
        drop(keys);
        self.append(entries, done)
    }
    /// Whether this log keeps entry keys ([`Log::append_keyed`], [`Log::find_keys`]):
    /// true where several nodes append.
    fn keeps_keys(&self) -> bool {
        false
    }
    /// The index of the entry holding each key, where one does (a log that does not
    /// [`Log::keeps_keys`] answers none).
    fn find_keys(&self, keys: &[EntryKey]) -> Result<Vec<Option<u64>>, LogError> {
        Ok(vec![None; keys.len()])
    }
    /// Signs a checkpoint of the current tree (unless the latest already covers it).
    fn checkpoint(&self, done: CheckpointDone) -> Result<(), LogError>;
    /// Number of durable entries.
    fn size(&self) -> u64;
    /// One entry's bytes.
    fn entry(&self, index: u64) -> Result<Vec<u8>, LogError>;
    /// Streams entries `range` in order.
    fn scan(&self, range: Range<u64>, f: &mut ScanFn<'_>) -> Result<(), LogError>;
    /// RFC 6962 inclusion proof of entry `index` in the tree of `size` entries.
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LogError>;
    /// RFC 6962 consistency proof between tree sizes.
    fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, LogError>;
    /// Root hash of the tree of `size` entries.
    fn root_at(&self, size: u64) -> Result<Hash, LogError>;
    /// The newest signed checkpoint.
    fn latest_checkpoint(&self) -> Option<SignedCheckpoint>;
    /// Number of checkpoints signed so far.
    fn checkpoint_count(&self) -> u64;
    /// Up to `limit` signed checkpoints, oldest first, from the `from`-th on (0 is the
    /// first ever signed; past the end, none). A log signs millions of checkpoints
    /// over the years, so they are read a page at a time, never all at once, and a
    /// backend need not hold them in memory.
    fn checkpoints(&self, from: u64, limit: usize) -> Result<Vec<SignedCheckpoint>, LogError>;
    /// The C2SP verifier key of the checkpoint signer.
    fn verifier_key(&self) -> String;
    /// Whether appends can be recorded now: `Err` (retryable) while the log's storage
    /// is known to be out of reach, so a door that cannot afford to lose what it would
    /// append (the gateway's usage) refuses before doing anything. A log on local
    /// files is always available.
    fn available(&self) -> Result<(), LogError> {
        Ok(())
    }
}
