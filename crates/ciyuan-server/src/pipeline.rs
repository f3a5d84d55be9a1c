//! Appending entries to the ledger and keeping the projections up with it.
//!
//! Data flows one way: a handler encodes entries and appends them to the [`Log`]; once
//! they are durable the projector thread reads them back in order and applies them to
//! the [`Store`] in batches. A handler that must read its own write (an account just
//! created) waits for the projection watermark to pass its entries.

use crate::error::ApiError;
use ciyuan_core::Entry;
use ciyuan_store::{Log, LogError, Store, StoreError};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Most entries applied to the projections per transaction (a projector that keeps
/// up applies what is new, far fewer). A backlog is worked off in large transactions:
/// each commit writes every page it dirtied to the WAL, and the rollups of many
/// nodes' hours dirty pages all over their tables; more entries per commit sum more
/// events into each rollup row and write each page fewer times (`ciyuan bench
/// finance`, BENCHMARKS.md). The store is locked for the whole transaction.
pub const PROJECT_BATCH_ENTRIES: u64 = 16_384;
/// Below this many new entries, the projector waits [`PROJECT_LINGER`] for more
/// before committing them.
const PROJECT_LINGER_BELOW: u64 = 256;
/// How long a small batch waits for company (also the added delay before an admin
/// write becomes visible to queries).
const PROJECT_LINGER: Duration = Duration::from_millis(10);
/// How long the projector sleeps when nobody kicks it; catches appends by other writers.
const PROJECT_IDLE_POLL: Duration = Duration::from_millis(250);

/// First wait of the projector after a retryable storage failure; doubled up to
/// [`PROJECT_RETRY_MAX`] while it lasts.
const PROJECT_RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest wait between the projector's attempts while its storage is out of reach.
const PROJECT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Most lent entries held for the projector; past it, loans are refused and the
/// projector reads those entries back from the log (a projector far behind, or stopped,
/// does not make the server hold every entry since).
const MAX_LENT_ENTRIES: usize = 1 << 20;

/// Entries a writer appended and lends to the projector, which then applies them as
/// they are instead of reading their bytes back from the log and decoding them.
///
/// The lender promises that [`Lent::entries`] are the very entries whose encoding it
/// appended, and that every field the projections read (account, time, kind, service,
/// model, tokens, source, event id, recount) decodes back to what it holds: then the
/// projections are the same as if read from the log, and stay a function of it.
pub trait Lent: Send + Sync + 'static {
    /// The entries, in append order.
    fn entries(&self) -> &[Entry];

    /// [`ciyuan_core::ingest_key_hash`] of each entry's event, where the appender
    /// computed them already: the projector then does not hash the keys again.
    fn ingest_hashes(&self) -> Option<&[u64]> {
        None
    }
}

/// Entries lent and not yet applied, by the log index of the first of each loan.
#[derive(Default)]
struct Loans {
    by_start: BTreeMap<u64, Arc<dyn Lent>>,
    entries: usize,
}

/// The loans, shared by the appenders' completions and the projector thread.
#[derive(Default, Clone)]
struct Shelf(Arc<Mutex<Loans>>);

impl Shelf {
    fn lock(&self) -> std::sync::MutexGuard<'_, Loans> {
        // Loans are plain data, consistent after any panic; a poisoned lock is usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `lent`, the entries at `start..`, unless the shelf is full.
    fn lend(&self, start: u64, lent: Arc<dyn Lent>) {
        let n = lent.entries().len();
        let mut loans = self.lock();
        if n > 0 && loans.entries + n <= MAX_LENT_ENTRIES {
            loans.entries += n;
            if let Some(old) = loans.by_start.insert(start, lent) {
                loans.entries -= old.entries().len();
            }
        }
    }

    /// Loans holding any entry of `range`, in log order.
    fn overlapping(&self, range: &Range<u64>) -> Vec<(u64, Arc<dyn Lent>)> {
        self.lock()
            .by_start
            .range(..range.end)
            .filter(|(start, l)| **start + l.entries().len() as u64 > range.start)
            .map(|(start, l)| (*start, l.clone()))
            .collect()
    }

    /// Returns loans wholly before `at`: applied, or read back from the log instead.
    fn release(&self, at: u64) {
        let mut loans = self.lock();
        while let Some(entry) = loans.by_start.first_entry() {
            let n = entry.get().entries().len();
            if *entry.key() + n as u64 > at {
                break;
            }
            entry.remove();
            loans.entries -= n;
        }
    }
}

/// Appends encoded entries and waits until they are durable.
pub async fn append(log: &dyn Log, entries: &[Entry]) -> Result<Range<u64>, ApiError> {
    append_then(log, entries, |_| {}).await
}

/// [`append`], then lends the entries to `projector`'s thread.
pub async fn append_lent(
    log: &dyn Log,
    projector: &Projector,
    lent: Arc<dyn Lent>,
) -> Result<Range<u64>, ApiError> {
    let shelf = projector.shelf.clone();
    let entries = lent.clone();
    // Lent on the ledger's completion, before the appender is woken: the projector,
    // kicked by the appender, finds the loan in place.
    append_then(log, entries.entries(), move |r| shelf.lend(r.start, lent)).await
}

/// [`append_lent`], running `submitted` once the entries hold their place in the
/// ledger's order (before they are durable): what must come after them may go.
pub async fn append_lent_then(
    log: &dyn Log,
    projector: &Projector,
    lent: Arc<dyn Lent>,
    submitted: impl FnOnce(),
) -> Result<Range<u64>, ApiError> {
    Ok(append_lent_keyed_then(log, projector, lent, None, submitted).await?)
}

/// [`append_lent_then`] with each entry's unique key (see [`Log::append_keyed`]):
/// `keys[i]` is entry `i`'s.
pub async fn append_lent_keyed_then(
    log: &dyn Log,
    projector: &Projector,
    lent: Arc<dyn Lent>,
    keys: Option<Vec<Option<ciyuan_store::EntryKey>>>,
    submitted: impl FnOnce(),
) -> Result<Range<u64>, LogError> {
    let shelf = projector.shelf.clone();
    let entries = lent.clone();
    append_submitted(
        log,
        entries.entries(),
        keys,
        move |r| shelf.lend(r.start, lent),
        submitted,
    )
    .await
}

/// [`append`], running `durable` with the range as soon as the entries are durable.
async fn append_then(
    log: &dyn Log,
    entries: &[Entry],
    durable: impl FnOnce(&Range<u64>) + Send + 'static,
) -> Result<Range<u64>, ApiError> {
    Ok(append_submitted(log, entries, None, durable, || {}).await?)
}

/// [`append_then`], running `submitted` as soon as the ledger has taken the entries
/// (their order is then fixed), before waiting for them to be durable.
async fn append_submitted(
    log: &dyn Log,
    entries: &[Entry],
    keys: Option<Vec<Option<ciyuan_store::EntryKey>>>,
    durable: impl FnOnce(&Range<u64>) + Send + 'static,
    submitted: impl FnOnce(),
) -> Result<Range<u64>, LogError> {
    // Sized from the entries before: most batches hold entries of similar length, and a
    // buffer that has to grow is copied.
    let mut cap = 256;
    let bytes: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| {
            let mut out = Vec::with_capacity(cap);
            e.encode_into(&mut out);
            cap = cap.max(out.len());
            out
        })
        .collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done: ciyuan_store::AppendDone = Box::new(move |r| {
        if let Ok(range) = &r {
            durable(range);
        }
        let _ = tx.send(r);
    });
    match keys {
        Some(keys) => log.append_keyed(bytes, keys, done)?,
        None => log.append(bytes, done)?,
    }
    submitted();
    rx.await
        .map_err(|_| LogError::Unavailable("the ledger writer stopped".into()))?
}

/// [`append`] from a thread that may block (start-up, before the server serves):
/// waits for the entries to be durable.
pub fn append_blocking(log: &dyn Log, entries: &[Entry]) -> Result<Range<u64>, ApiError> {
    let bytes: Vec<Vec<u8>> = entries.iter().map(Entry::encode).collect();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    log.append(
        bytes,
        Box::new(move |r| {
            // The receiver waits below until this is sent; it cannot be gone.
            let sent = tx.send(r);
            debug_assert!(sent.is_ok());
        }),
    )?;
    let range = rx
        .recv()
        .map_err(|_| ApiError::unavailable("the ledger writer stopped"))??;
    Ok(range)
}

/// Why projecting stopped.
#[derive(Debug)]
pub enum ProjectError {
    /// Reading the log failed.
    Log(LogError),
    /// The store failed.
    Store(StoreError),
    /// An entry in the log does not decode: the log is not what this build wrote.
    Decode(u64, String),
}

impl std::error::Error for ProjectError {}

impl ProjectError {
    /// Whether projecting may go on after a wait (the database is restarting or out
    /// of reach): nothing was applied, and the same batch can be tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProjectError::Log(e) => e.is_retryable(),
            ProjectError::Store(e) => e.is_retryable(),
            ProjectError::Decode(..) => false,
        }
    }
}

impl std::fmt::Display for ProjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProjectError::Log(e) => write!(f, "reading the ledger: {e}"),
            ProjectError::Store(e) => write!(f, "writing projections: {e}"),
            ProjectError::Decode(i, e) => write!(f, "entry {i} does not decode: {e}"),
        }
    }
}

/// Applies log entries `[store.projected_through(), end)` to the store, in batches;
/// `progress` is told each new watermark. Used by the projector and by `ciyuan rebuild`.
pub fn project(
    store: &dyn Store,
    log: &dyn Log,
    end: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, ProjectError> {
    project_reusing(
        store,
        log,
        end,
        progress,
        &mut Vec::new(),
        &Shelf::default(),
    )
}

/// Where a run of a batch's entries is.
enum Part {
    /// Entries `.1` of the batch's `.0`th loan.
    Lent(usize, Range<usize>),
    /// Entries read back from the log into the pool.
    Read(Range<usize>),
}

/// [`project`], applying lent entries as they are and decoding the others into the
/// entries of `pool` (kept between calls): consecutive entries reuse each other's
/// string buffers instead of allocating their own.
fn project_reusing(
    store: &dyn Store,
    log: &dyn Log,
    end: u64,
    progress: &mut dyn FnMut(u64),
    pool: &mut Vec<Entry>,
    shelf: &Shelf,
) -> Result<u64, ProjectError> {
    let mut at = store.projected_through().map_err(ProjectError::Store)?;
    // Another node sharing the store may have applied entries this one has not
    // (PostgreSQL): they are visible to queries all the same.
    progress(at);
    while at < end {
        let stop = end.min(at + PROJECT_BATCH_ENTRIES);
        let lent = shelf.overlapping(&(at..stop));
        let mut parts = Vec::with_capacity(2 * lent.len() + 1);
        let mut loans = lent.iter().enumerate().peekable();
        let (mut i, mut len) = (at, 0);
        while i < stop {
            // Loans wholly before `i` were lent too late for this batch's start.
            while loans
                .next_if(|(_, (s, l))| s + l.entries().len() as u64 <= i)
                .is_some()
            {}
            match loans.peek() {
                Some(&(k, (s, l))) if *s <= i => {
                    let hi = stop.min(s + l.entries().len() as u64);
                    parts.push(Part::Lent(k, (i - s) as usize..(hi - s) as usize));
                    i = hi;
                }
                next => {
                    let hi = next.map_or(stop, |(_, (s, _))| stop.min(*s));
                    let from = len;
                    read_into(log, i..hi, pool, &mut len)?;
                    parts.push(Part::Read(from..len));
                    i = hi;
                }
            }
        }
        let slices: Vec<ciyuan_store::Part<'_>> = parts
            .iter()
            .map(|p| match p {
                Part::Lent(k, r) => {
                    let loan = &lent[*k].1;
                    ciyuan_store::Part {
                        entries: &loan.entries()[r.clone()],
                        ingest_hashes: loan.ingest_hashes().map(|h| &h[r.clone()]),
                    }
                }
                Part::Read(r) => ciyuan_store::Part {
                    entries: &pool[r.clone()],
                    ingest_hashes: None,
                },
            })
            .collect();
        match store.apply_keyed(at, &slices) {
            Ok(()) => at = stop,
            // Another node sharing the store (PostgreSQL) applied these entries first:
            // go on from where the store is.
            Err(StoreError::OutOfOrder { at: there, .. }) if there > at => at = there,
            Err(e) => return Err(ProjectError::Store(e)),
        }
        shelf.release(at);
        progress(at);
    }
    Ok(at)
}

/// Decodes log entries `range` into `pool[*len..]`, advancing `len`.
fn read_into(
    log: &dyn Log,
    range: Range<u64>,
    pool: &mut Vec<Entry>,
    len: &mut usize,
) -> Result<(), ProjectError> {
    let mut bad = None;
    log.scan(range, &mut |i, bytes| {
        let decoded = match pool.get_mut(*len) {
            Some(slot) => slot.decode_into(bytes),
            None => Entry::decode(bytes).map(|e| pool.push(e)),
        };
        if let Err(e) = decoded {
            bad = Some((i, e.to_string()));
            return Err(LogError::Invalid(format!("entry {i} does not decode")));
        }
        *len += 1;
        Ok(())
    })
    .map_err(|e| match bad.take() {
        Some((i, m)) => ProjectError::Decode(i, m),
        None => ProjectError::Log(e),
    })
}

/// The projector thread's handle.
pub struct Projector {
    kick: SyncSender<()>,
    shelf: Shelf,
    watermark: watch::Receiver<u64>,
    failed: watch::Receiver<Option<String>>,
}

impl Projector {
    /// Starts the thread; it catches up with the log at once.
    pub fn start(store: Arc<dyn Store>, log: Arc<dyn Log>) -> Result<Projector, ApiError> {
        let start = store.projected_through()?;
        let (kick, kicked) = std::sync::mpsc::sync_channel(1);
        let (mark_tx, watermark) = watch::channel(start);
        let (fail_tx, failed) = watch::channel(None);
        let shelf = Shelf::default();
        let lent = shelf.clone();
        std::thread::Builder::new()
            .name("ciyuan-projector".into())
            .spawn(move || run(store, log, kicked, mark_tx, fail_tx, lent))
            .map_err(ApiError::internal)?;
        Ok(Projector {
            kick,
            shelf,
            watermark,
            failed,
        })
    }

    /// Tells the projector there is something new.
    pub fn kick(&self) {
        match self.kick.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }

    /// Entries applied so far.
    pub fn watermark(&self) -> u64 {
        *self.watermark.borrow()
    }

    /// Waits until entries up to `end` are applied.
    pub async fn wait_for(&self, end: u64, timeout: Duration) -> Result<(), ApiError> {
        self.kick();
        let mut rx = self.watermark.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|&m| m >= end)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => match self.failed.borrow().clone() {
                Some(why) => Err(ApiError::internal(format!("projector stopped: {why}"))),
                None => Err(ApiError::unavailable(
                    "the entry is recorded in the ledger but not yet visible in queries",
                )),
            },
        }
    }
}

fn run(
    store: Arc<dyn Store>,
    log: Arc<dyn Log>,
    kicked: Receiver<()>,
    mark: watch::Sender<u64>,
    failed: watch::Sender<Option<String>>,
    shelf: Shelf,
) {
    let mut pool = Vec::with_capacity(PROJECT_BATCH_ENTRIES as usize);
    let mut backoff = PROJECT_RETRY_MIN;
    loop {
        let end = log.size();
        let result = project_reusing(
            store.as_ref(),
            log.as_ref(),
            end,
            &mut |m| {
                mark.send_replace(m);
            },
            &mut pool,
            &shelf,
        );
        match &result {
            Err(e) if e.is_retryable() => {
                // The database is out of reach: it comes back by itself, and the
                // projector with it, without spinning meanwhile.
                tracing::warn!(error = %e, "projector waiting for its storage");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(PROJECT_RETRY_MAX);
                continue;
            }
            Err(_) => {}
            Ok(_) => backoff = PROJECT_RETRY_MIN,
        }
        if let Err(e) = result {
            // Retrying cannot fix a corrupt log or a failing disk by itself; stop and
            // make every waiter see why, instead of spinning.
            tracing::error!(error = %e, "projector stopped");
            failed.send_replace(Some(e.to_string()));
            return;
        }
        match kicked.recv_timeout(PROJECT_IDLE_POLL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // A trickle of small appends (a gateway under steady load) would cost one
        // SQLite commit each: let a few milliseconds of them gather into one.
        let backlog = log.size().saturating_sub(*mark.borrow());
        if backlog > 0 && backlog < PROJECT_LINGER_BELOW {
            std::thread::sleep(PROJECT_LINGER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::MemLog;
    use ciyuan_core::{AccountInfo, Direction, EntryBody, Modality, TokenMap, Usage};
    use ciyuan_store::HourFilter;
    use ciyuan_store_sqlite::SqliteStore;

    struct Loan(Vec<Entry>);

    impl Lent for Loan {
        fn entries(&self) -> &[Entry] {
            &self.0
        }
    }

    fn entry(i: u64) -> Entry {
        let at = "2026-11-25T06:00:00Z".parse().unwrap();
        if i < 2 {
            let account = ["acme", "acme/cn"][i as usize].parse().unwrap();
            return Entry::new(
                at,
                account,
                EntryBody::AccountCreated(AccountInfo::default()),
            );
        }
        let mut tokens = TokenMap::new();
        tokens
            .add(Modality::Text, Direction::Input, i as i64)
            .unwrap();
        Entry::new(
            at,
            ["acme", "acme/cn"][i as usize % 2].parse().unwrap(),
            EntryBody::Usage(Usage {
                service: "llm.usage".into(),
                model: Some(format!("m{}", i % 3)),
                tokens,
                source: Some("svc".into()),
                // Every 7th event repeats an earlier one: the first entry must win.
                event_id: Some(format!(
                    "ev-{}",
                    if i.is_multiple_of(7) { i / 2 } else { i }
                )),
                ..Usage::default()
            }),
        )
    }

    fn state(store: &SqliteStore) -> (u64, Vec<ciyuan_store::HourRow>, Vec<String>) {
        let mut keys = Vec::new();
        store
            .ingest_index(&mut |hash, entry| keys.push(format!("{hash:016x} {entry}")))
            .unwrap();
        let rows = store
            .usage_hours(&HourFilter {
                account: Default::default(),
                from_hour: None,
                to_hour: None,
            })
            .unwrap();
        (store.projected_through().unwrap(), rows, keys)
    }

    #[test]
    fn lent_entries_project_as_read_ones() {
        let n = 2 * PROJECT_BATCH_ENTRIES + 300;
        let entries: Vec<Entry> = (0..n).map(entry).collect();
        let log = MemLog::new();
        let bytes = entries.iter().map(Entry::encode).collect();
        log.append(bytes, Box::new(|r| assert!(r.is_ok()))).unwrap();

        let read = SqliteStore::open_in_memory().unwrap();
        project(&read, &log, n, &mut |_| {}).unwrap();

        // Loans across batch boundaries, gaps between them, one lent too late (before
        // the watermark) and one past the end of the projection.
        let lent = SqliteStore::open_in_memory().unwrap();
        let shelf = Shelf::default();
        let lend = |r: Range<u64>| {
            let loan = Loan(entries[r.start as usize..r.end as usize].to_vec());
            shelf.lend(r.start, Arc::new(loan));
        };
        project_reusing(&lent, &log, 5, &mut |_| {}, &mut Vec::new(), &shelf).unwrap();
        lend(3..4);
        lend(10..1010);
        lend(1500..PROJECT_BATCH_ENTRIES + 10);
        lend(PROJECT_BATCH_ENTRIES + 10..PROJECT_BATCH_ENTRIES + 20);
        lend(2 * PROJECT_BATCH_ENTRIES - 1..n);
        let mut marks = Vec::new();
        let mut pool = Vec::new();
        project_reusing(
            &lent,
            &log,
            n - 100,
            &mut |m| marks.push(m),
            &mut pool,
            &shelf,
        )
        .unwrap();
        // The store's watermark first (another node may have moved it), then each batch.
        assert_eq!(
            marks,
            [
                5,
                PROJECT_BATCH_ENTRIES + 5,
                2 * PROJECT_BATCH_ENTRIES + 5,
                n - 100
            ]
        );
        // Only the loan still holding unapplied entries is kept.
        assert_eq!(shelf.lock().by_start.len(), 1);
        assert_eq!(shelf.lock().entries, 301);
        project_reusing(&lent, &log, n, &mut |_| {}, &mut pool, &shelf).unwrap();
        assert_eq!(shelf.lock().entries, 0);
        assert_eq!(state(&lent), state(&read));
        assert_eq!(state(&read).0, n);
    }
}
