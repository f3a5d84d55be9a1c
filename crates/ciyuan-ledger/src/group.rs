//! Group commit: one writer thread, many producers, one `fdatasync` per group.

use crate::ledger::{Ledger, LedgerReader, Staged, check_request, validate_entry};
use crate::{LedgerError, SignedCheckpoint};
use ciyuan_store::{AppendDone, CheckpointDone, Log, LogError};
use ciyuan_tlog::{Hash, leaf_hash};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;

/// Called once appended entries are durable.
pub type OnAppended = Box<dyn FnOnce(Result<Range<u64>, LedgerError>) + Send>;
/// Called once a checkpoint is signed and stored.
pub type OnCheckpoint = Box<dyn FnOnce(Result<SignedCheckpoint, LedgerError>) + Send>;

enum Request {
    Append {
        entries: Vec<Vec<u8>>,
        /// The entries' leaf hashes, or why the entries were refused.
        leaves: Result<Vec<Hash>, LedgerError>,
        done: OnAppended,
    },
    Checkpoint {
        done: OnCheckpoint,
    },
    Shutdown,
}

/// A handle to the writer thread. Clone it freely; producers block when the bounded
/// queue is full, which is the back-pressure the ingest path relies on.
#[derive(Clone)]
pub struct GroupCommitter {
    tx: SyncSender<Request>,
    groups: Arc<AtomicU64>,
    reader: LedgerReader,
    max_entry_bytes: usize,
    opts: crate::LedgerOptions,
}

impl GroupCommitter {
    /// Moves the ledger onto its writer thread.
    pub fn start(ledger: Ledger) -> (GroupCommitter, JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(ledger.options().queue_depth);
        let reader = ledger.reader();
        let max_entry_bytes = ledger.options().max_entry_bytes;
        let opts = ledger.options().clone();
        let groups = Arc::new(AtomicU64::new(0));
        let counter = groups.clone();
        let handle = std::thread::Builder::new()
            .name("ciyuan-ledger-writer".into())
            .spawn(move || writer(ledger, rx, counter));
        let handle = match handle {
            Ok(h) => h,
            // Without a writer thread nothing can be appended; requests fail at once.
            Err(_) => std::thread::spawn(|| {}),
        };
        (
            GroupCommitter {
                tx,
                groups,
                reader,
                max_entry_bytes,
                opts,
            },
            handle,
        )
    }

    /// Queues entries; `done` runs on the writer thread once they are durable, or with
    /// the reason they were refused (a bad entry fails its whole request and nothing
    /// else). Returns an error at once only if the writer is gone.
    ///
    /// The entries are validated and their leaves hashed here, on the caller's thread:
    /// hashing is most of the CPU an append costs, and spread over the producers it no
    /// longer queues behind the one writer thread.
    pub fn append(&self, entries: Vec<Vec<u8>>, done: OnAppended) -> Result<(), LedgerError> {
        let leaves = check_request(&entries, &self.opts).and_then(|()| {
            entries
                .iter()
                .map(|e| validate_entry(e, self.max_entry_bytes).map(|()| leaf_hash(e)))
                .collect()
        });
        self.tx
            .send(Request::Append {
                entries,
                leaves,
                done,
            })
            .map_err(|_| LedgerError::ShutDown)
    }

    /// Appends and waits.
    pub fn append_blocking(&self, entries: Vec<Vec<u8>>) -> Result<Range<u64>, LedgerError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.append(
            entries,
            Box::new(move |r| {
                // The receiver is below, waiting; the send fails only if this caller's
                // thread is gone, and then nobody is left to tell.
                let _ = tx.send(r);
            }),
        )?;
        rx.recv().map_err(|_| LedgerError::ShutDown)?
    }

    /// Queues a checkpoint after everything queued before it.
    pub fn checkpoint_with(&self, done: OnCheckpoint) -> Result<(), LedgerError> {
        self.tx
            .send(Request::Checkpoint { done })
            .map_err(|_| LedgerError::ShutDown)
    }

    /// Signs a checkpoint and waits.
    pub fn checkpoint_blocking(&self) -> Result<SignedCheckpoint, LedgerError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.checkpoint_with(Box::new(move |r| {
            // As in `append_blocking`: only a vanished waiter makes this fail.
            let _ = tx.send(r);
        }))?;
        rx.recv().map_err(|_| LedgerError::ShutDown)?
    }

    /// Group commits (each one `fdatasync`) made so far.
    pub fn group_commits(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// The reader.
    pub fn reader(&self) -> &LedgerReader {
        &self.reader
    }

    /// Asks the writer to finish what is queued, sync the sidecar and stop. Join the
    /// handle returned by [`GroupCommitter::start`] to wait for it.
    pub fn shutdown(&self) {
        // The send fails only when the writer has stopped already, which is what was
        // asked for.
        let _ = self.tx.send(Request::Shutdown);
    }
}

/// What the writer hands the syncer, in order.
enum Synced {
    Group(Staged, Vec<(u64, OnAppended)>),
    Failed(String, Vec<OnAppended>),
    Checkpoint(OnCheckpoint),
}

/// Groups staged ahead of the one being synced. Two keep the disk busy (one syncing,
/// one being written) without letting acknowledged work pile up.
const PIPELINE_DEPTH: usize = 2;

/// Groups that can be written but not yet synced at once: the one syncing, those
/// queued for the syncer, and the one the writer has written and waits to hand over.
/// `LedgerOptions::check` keeps this many groups within the format's torn-tail bound
/// (recovery and the verifier know nothing of the pipeline).
pub(crate) const UNSYNCED_GROUPS: usize = PIPELINE_DEPTH + 2;

/// The writer: gathers a group, writes it, and hands it to the syncer, so that framing
/// and writing the next group overlap the `fdatasync` of the previous one.
fn writer(mut ledger: Ledger, rx: Receiver<Request>, groups: Arc<AtomicU64>) {
    let max_entries = ledger.options().max_batch_entries;
    let max_bytes = ledger.options().max_batch_bytes;
    let handle = ledger.handle();
    let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<Synced>(PIPELINE_DEPTH);
    let syncer = std::thread::Builder::new()
        .name("ciyuan-ledger-sync".into())
        .spawn(move || {
            for msg in sync_rx {
                match msg {
                    Synced::Group(staged, dones) => match handle.commit(staged) {
                        Ok(range) => {
                            groups.fetch_add(1, Ordering::Relaxed);
                            let mut at = range.start;
                            for (n, done) in dones {
                                done(Ok(at..at + n));
                                at += n;
                            }
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            for (_, done) in dones {
                                done(Err(LedgerError::Failed(msg.clone())));
                            }
                        }
                    },
                    Synced::Failed(msg, dones) => {
                        for done in dones {
                            done(Err(LedgerError::Failed(msg.clone())));
                        }
                    }
                    Synced::Checkpoint(done) => done(handle.checkpoint()),
                }
            }
        });
    let Ok(syncer) = syncer else {
        // No syncer thread: nothing can become durable; fail every request.
        for req in rx {
            match req {
                Request::Append { done, .. } => done(Err(LedgerError::ShutDown)),
                Request::Checkpoint { done } => done(Err(LedgerError::ShutDown)),
                Request::Shutdown => break,
            }
        }
        return;
    };
    let mut group: Vec<(Vec<Vec<u8>>, OnAppended)> = Vec::new();
    let mut leaves: Vec<Hash> = Vec::new();
    let mut stop = false;
    while !stop {
        let Ok(first) = rx.recv() else { break };
        let mut pending = Some(first);
        let (mut entries, mut bytes) = (0usize, 0usize);
        let mut checkpoints = Vec::new();
        // Take what is already queued, up to the group bounds.
        loop {
            let req = match pending.take() {
                Some(r) => r,
                None => {
                    if entries >= max_entries || bytes >= max_bytes || !checkpoints.is_empty() {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(r) => r,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
            };
            match req {
                Request::Append {
                    entries: e,
                    leaves: l,
                    done,
                } => {
                    // A bad entry fails its own request only.
                    let l = match l {
                        Ok(l) => l,
                        Err(err) => {
                            done(Err(err));
                            continue;
                        }
                    };
                    leaves.extend_from_slice(&l);
                    entries += e.len();
                    bytes += e.iter().map(Vec::len).sum::<usize>();
                    group.push((e, done));
                }
                Request::Checkpoint { done } => checkpoints.push(done),
                Request::Shutdown => {
                    stop = true;
                    break;
                }
            }
        }
        if !group.is_empty() {
            let slices: Vec<&[u8]> = group
                .iter()
                .flat_map(|(e, _)| e.iter().map(Vec::as_slice))
                .collect();
            let staged = ledger.stage_prepared(&slices, &leaves);
            drop(slices);
            leaves.clear();
            let msg = match staged {
                Ok(staged) => Synced::Group(
                    staged,
                    group
                        .drain(..)
                        .map(|(e, done)| (e.len() as u64, done))
                        .collect(),
                ),
                Err(e) => Synced::Failed(e.to_string(), group.drain(..).map(|(_, d)| d).collect()),
            };
            if sync_tx.send(msg).is_err() {
                break;
            }
        }
        for done in checkpoints {
            if sync_tx.send(Synced::Checkpoint(done)).is_err() {
                break;
            }
        }
    }
    drop(sync_tx);
    if syncer.join().is_err() {
        // The syncer died mid-group: what it had not published is not acknowledged,
        // and the next open judges the files. Syncing the sidecar now would only
        // make durable what recovery rebuilds anyway.
        tracing::error!("ledger: the sync thread panicked; the ledger must be reopened");
        return;
    }
    // Answer whatever is still queued so no producer waits forever.
    while let Ok(req) = rx.try_recv() {
        match req {
            Request::Append { done, .. } => done(Err(LedgerError::ShutDown)),
            Request::Checkpoint { done } => done(Err(LedgerError::ShutDown)),
            Request::Shutdown => {}
        }
    }
    if let Err(e) = ledger.sync() {
        // Everything acknowledged was synced group by group; this sync only saves the
        // next open some rebuilding, so its failure is reported, not fatal.
        tracing::warn!("ledger: final sync on shutdown failed: {e}");
    }
}

impl Log for GroupCommitter {
    fn append(&self, entries: Vec<Vec<u8>>, done: AppendDone) -> Result<(), LogError> {
        if let Some(big) = entries.iter().find(|e| e.len() > self.max_entry_bytes) {
            return Err(LogError::Invalid(format!(
                "entry of {} bytes is over the limit of {}",
                big.len(),
                self.max_entry_bytes
            )));
        }
        GroupCommitter::append(
            self,
            entries,
            Box::new(move |r| done(r.map_err(LogError::from))),
        )
        .map_err(LogError::from)
    }

    fn checkpoint(&self, done: CheckpointDone) -> Result<(), LogError> {
        self.checkpoint_with(Box::new(move |r| done(r.map_err(LogError::from))))
            .map_err(LogError::from)
    }

    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn entry(&self, index: u64) -> Result<Vec<u8>, LogError> {
        Ok(self.reader.entry(index)?)
    }

    fn scan(&self, range: Range<u64>, f: &mut ciyuan_store::ScanFn<'_>) -> Result<(), LogError> {
        self.reader.scan(range, |i, b| f(i, b))
    }

    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LogError> {
        Ok(self.reader.inclusion_proof(index, size)?)
    }

    fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LogError> {
        Ok(self.reader.consistency_proof(old, new)?)
    }

    fn root_at(&self, size: u64) -> Result<Hash, LogError> {
        Ok(self.reader.root_at(size)?)
    }

    fn latest_checkpoint(&self) -> Option<SignedCheckpoint> {
        self.reader.latest_checkpoint()
    }

    fn checkpoint_count(&self) -> u64 {
        self.reader.checkpoint_count()
    }

    fn checkpoints(&self, from: u64, limit: usize) -> Result<Vec<SignedCheckpoint>, LogError> {
        Ok(self.reader.checkpoints(from, limit)?)
    }

    fn verifier_key(&self) -> String {
        self.reader.verifier_key().to_string()
    }
}
