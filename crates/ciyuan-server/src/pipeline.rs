//! Appending entries to the ledger and keeping the projections up with it.
//!
//! Data flows one way: a handler encodes entries and appends them to the [`Log`]; once
//! they are durable the projector thread reads them back in order and applies them to
//! the [`Store`] in batches. A handler that must read its own write (an account just
//! created) waits for the projection watermark to pass its entries.

use crate::error::ApiError;
use ciyuan_core::Entry;
use ciyuan_store::{Log, LogError, Store, StoreError};
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;
use tokio::sync::watch;

/// Entries applied to the projections per transaction.
pub const PROJECT_BATCH_ENTRIES: u64 = 4096;
/// Below this many new entries, the projector waits [`PROJECT_LINGER`] for more
/// before committing them.
const PROJECT_LINGER_BELOW: u64 = 256;
/// How long a small batch waits for company (also the added delay before an admin
/// write becomes visible to queries).
const PROJECT_LINGER: Duration = Duration::from_millis(10);
/// How long the projector sleeps when nobody kicks it; catches appends by other writers.
const PROJECT_IDLE_POLL: Duration = Duration::from_millis(250);

/// Appends encoded entries and waits until they are durable.
pub async fn append(log: &dyn Log, entries: &[Entry]) -> Result<Range<u64>, ApiError> {
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
    log.append(
        bytes,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )?;
    let range = rx
        .await
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
    project_reusing(store, log, end, progress, &mut Vec::new())
}

/// [`project`], decoding into the entries of `pool` (kept between calls): consecutive
/// entries reuse each other's string buffers instead of allocating their own.
fn project_reusing(
    store: &dyn Store,
    log: &dyn Log,
    end: u64,
    progress: &mut dyn FnMut(u64),
    pool: &mut Vec<Entry>,
) -> Result<u64, ProjectError> {
    let mut at = store.projected_through().map_err(ProjectError::Store)?;
    while at < end {
        let stop = end.min(at + PROJECT_BATCH_ENTRIES);
        let mut len = 0;
        let mut bad = None;
        log.scan(at..stop, &mut |i, bytes| {
            let decoded = match pool.get_mut(len) {
                Some(slot) => slot.decode_into(bytes),
                None => Entry::decode(bytes).map(|e| pool.push(e)),
            };
            if let Err(e) = decoded {
                bad = Some((i, e.to_string()));
                return Err(LogError::Invalid(format!("entry {i} does not decode")));
            }
            len += 1;
            Ok(())
        })
        .map_err(|e| match bad.take() {
            Some((i, m)) => ProjectError::Decode(i, m),
            None => ProjectError::Log(e),
        })?;
        store.apply(at, &pool[..len]).map_err(ProjectError::Store)?;
        at = stop;
        progress(at);
    }
    Ok(at)
}

/// The projector thread's handle.
pub struct Projector {
    kick: SyncSender<()>,
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
        std::thread::Builder::new()
            .name("ciyuan-projector".into())
            .spawn(move || run(store, log, kicked, mark_tx, fail_tx))
            .map_err(ApiError::internal)?;
        Ok(Projector {
            kick,
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
) {
    let mut pool = Vec::with_capacity(PROJECT_BATCH_ENTRIES as usize);
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
        );
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
