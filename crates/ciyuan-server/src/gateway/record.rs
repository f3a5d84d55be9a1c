//! Recording: the task that appends gateway entries in groups (one fsync for many
//! requests), appending again what the ledger refused while it was out of reach, and
//! the flush a clean stop waits for.

use super::*;

/// Entries wait this long for company before they are appended together: the answer
/// is already out, and one append (one fsync, one projection batch) for many requests
/// is what lets the ledger keep up with a busy gateway.
pub(super) const RECORD_LINGER: Duration = Duration::from_millis(5);

/// Most entries appended at once by the recorder.
pub(super) const RECORD_BATCH_MAX: usize = 1024;

/// How long the recorder keeps trying to append a group the ledger refused as
/// unavailable (its database restarting) before it gives the usage up.
pub(super) const RECORD_RETRY_FOR: Duration = Duration::from_secs(300);

/// Entries queued for the recorder before `finish` appends on its own instead.
pub(super) const RECORD_QUEUE: usize = 16 * 1024;

/// What the recorder task receives.
// Nearly every message is an entry; boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Record {
    /// An entry, with its payment (boxed: only a priced request paid from a wallet
    /// has one, and a message is copied into the channel and out of it), the rules
    /// guard it was rated under (released once the entry is durable in the ledger, or
    /// given up; see `App::rules_gate`), and the holds across nodes its usage settles
    /// once it is appended.
    Entry(
        Entry,
        Option<Box<Entry>>,
        Option<RulesGuard>,
        Option<crate::holds::Settling>,
    ),
    /// Append what is queued now and say when it is durable.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A read guard of `App::rules_gate`.
pub(super) type RulesGuard = tokio::sync::OwnedRwLockReadGuard<()>;

/// A group of gateway entries as appended. They are built from strings, integers and a
/// timestamp, which decode back exactly as they are, so the projector may apply them
/// as held.
pub(super) struct Recorded(Vec<Entry>);

impl crate::pipeline::Lent for Recorded {
    fn entries(&self) -> &[Entry] {
        &self.0
    }
}

/// Appends gateway entries in groups.
pub(super) async fn recorder(
    app: std::sync::Weak<App>,
    mut rx: tokio::sync::mpsc::Receiver<Record>,
) {
    let mut batch: Vec<Entry> = Vec::with_capacity(RECORD_BATCH_MAX);
    let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut guards: Vec<RulesGuard> = Vec::new();
    // Holds settled by the batch's entries, by position.
    let mut settling: Vec<(usize, crate::holds::Settling)> = Vec::new();
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + RECORD_LINGER;
        let mut next = Some(first);
        let mut lingered = false;
        while let Some(msg) = next.take() {
            match msg {
                Record::Entry(e, posting, guard, settles) => {
                    // Side by side in one append: the payment never lands apart from
                    // its usage, and the holds settle with the last of them.
                    batch.push(e);
                    batch.extend(posting.map(|p| *p));
                    if let Some(s) = settles {
                        settling.push((batch.len() - 1, s));
                    }
                    guards.extend(guard);
                }
                Record::Flush(done) => {
                    waiting.push(done);
                    break;
                }
            }
            if batch.len() >= RECORD_BATCH_MAX {
                break;
            }
            // The linger is slept, not spent waiting in `recv`: the channel wakes its
            // receiver (often on another thread) for every message sent while it
            // waits there, so a busy gateway woke the recorder once per request; now
            // once per group.
            next = match rx.try_recv() {
                Ok(msg) => Some(msg),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) if !lingered => {
                    lingered = true;
                    tokio::time::sleep_until(deadline).await;
                    rx.try_recv().ok()
                }
                Err(_) => None,
            };
        }
        let Some(app) = app.upgrade() else { return };
        if !batch.is_empty() {
            let n = batch.len();
            // Lent to the projector, which applies them as they are instead of reading
            // them back from the ledger and decoding them.
            let lent = Arc::new(Recorded(std::mem::replace(
                &mut batch,
                Vec::with_capacity(n.next_power_of_two()),
            )));
            // The rules guards are held until the outcome, not only until the ledger
            // takes the entries: an append refused as unavailable is tried again
            // under them, so no rule can have come into force in between.
            let appended = match crate::pipeline::append_lent_then(
                app.log.as_ref(),
                &app.projector,
                lent.clone(),
                || {},
            )
            .await
            {
                Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                    record_again(&app, lent, &e.detail).await
                }
                other => other,
            };
            app.recorded(appended, std::mem::take(&mut settling), n);
            guards.clear();
        }
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Appends again a group of gateway entries the ledger refused as unavailable (so
/// certainly not recorded: its database is restarting or out of reach), once it is
/// back, for up to [`RECORD_RETRY_FOR`]. These requests were served before the outage
/// was known; without this their usage would be lost. The caller holds the entries'
/// rules guards throughout.
pub(super) async fn record_again(
    app: &Arc<App>,
    lent: Arc<Recorded>,
    first: &str,
) -> Result<std::ops::Range<u64>, crate::error::ApiError> {
    let n = lent.0.len();
    tracing::warn!(entries = n, detail = %first, "gateway usage waits for the ledger");
    let until = tokio::time::Instant::now() + RECORD_RETRY_FOR;
    let mut wait = Duration::from_millis(50);
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
        if app.log.available().is_err() && tokio::time::Instant::now() < until {
            continue;
        }
        match crate::pipeline::append_lent_then(
            app.log.as_ref(),
            &app.projector,
            lent.clone(),
            || {},
        )
        .await
        {
            Ok(range) => {
                tracing::info!(
                    entries = n,
                    "gateway usage recorded after the ledger came back"
                );
                return Ok(range);
            }
            Err(e)
                if e.status == StatusCode::SERVICE_UNAVAILABLE
                    && tokio::time::Instant::now() < until => {}
            Err(e) => return Err(e),
        }
    }
}

impl App {
    /// Waits until every gateway request that has finished has its entry durable in
    /// the ledger (for a clean stop), at most `timeout`.
    pub async fn flush_gateway(self: &Arc<Self>, timeout: Duration) {
        let until = tokio::time::Instant::now() + timeout;
        while self
            .gateway
            .finishing
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if let Some(tx) = self.gateway.recorder.get() {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(Record::Flush(done)).await.is_ok() {
                let _ = tokio::time::timeout_at(until, wait).await;
            }
        }
    }

    /// Appends a gateway entry (and its wallet posting) at once, releasing the rules
    /// and tier guards once they hold their places in the ledger.
    pub(super) async fn record_gateway_now(
        self: &Arc<Self>,
        entry: Entry,
        posting: Option<Entry>,
        rules: RulesGuard,
        tiers: crate::tiers::TiersGuard,
        settles: Option<crate::holds::Settling>,
    ) {
        let mut entries = vec![entry];
        entries.extend(posting);
        let n = entries.len();
        // With several nodes the tier counters' lock goes once the places are committed
        // (another node taking the tiers lease catches up to the committed log); alone,
        // once they are ordered.
        let (ordered_tiers, committed_tiers) = if self.config.follow.is_some() {
            (None, Some(tiers))
        } else {
            (Some(tiers), None)
        };
        let appended = crate::pipeline::append_lent_then(
            self.log.as_ref(),
            &self.projector,
            Arc::new(Recorded(entries)),
            || {
                drop(rules);
                drop(ordered_tiers);
            },
        )
        .await;
        drop(committed_tiers);
        // Settled with the last entry (the payment, where there is one).
        self.recorded(
            appended,
            settles.map(|s| (n - 1, s)).into_iter().collect(),
            n,
        );
    }

    /// After gateway entries' append: lets the projector know, and settles the holds
    /// across nodes of the requests whose entries they are (by position); on a
    /// failure, says so (the holds lapse).
    pub(super) fn recorded(
        self: &Arc<Self>,
        appended: Result<std::ops::Range<u64>, crate::error::ApiError>,
        settling: Vec<(usize, crate::holds::Settling)>,
        n: usize,
    ) {
        match appended {
            Ok(range) => {
                self.projector.kick();
                self.settle_across_nodes(
                    settling
                        .into_iter()
                        .map(|(pos, s)| (s, range.start + pos as u64))
                        .collect(),
                );
            }
            Err(e) => {
                tracing::error!(entries = n, detail = %e.detail, "gateway usage not recorded")
            }
        }
    }

    /// Hands a gateway entry to the recorder (started on first use).
    pub(super) fn record_gateway(
        self: &Arc<Self>,
        entry: Entry,
        posting: Option<Entry>,
        guard: Option<RulesGuard>,
        settles: Option<crate::holds::Settling>,
    ) {
        let tx = self.gateway.recorder.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(RECORD_QUEUE);
            tokio::spawn(recorder(Arc::downgrade(self), rx));
            tx
        });
        let posting = posting.map(Box::new);
        if let Err(e) = tx.try_send(Record::Entry(entry, posting, guard, settles)) {
            // The recorder is behind: append this one alone rather than drop it.
            let (entry, posting, guard, settles) = match e {
                tokio::sync::mpsc::error::TrySendError::Full(Record::Entry(e, p, g, s))
                | tokio::sync::mpsc::error::TrySendError::Closed(Record::Entry(e, p, g, s)) => {
                    (e, p, g, s)
                }
                _ => return,
            };
            let mut entries = vec![entry];
            entries.extend(posting.map(|p| *p));
            let n = entries.len();
            let app = self.clone();
            tokio::spawn(async move {
                let mut guard = guard;
                let appended = crate::pipeline::append_lent_then(
                    app.log.as_ref(),
                    &app.projector,
                    Arc::new(Recorded(entries)),
                    || drop(guard.take()),
                )
                .await;
                app.recorded(
                    appended,
                    settles.map(|s| (n - 1, s)).into_iter().collect(),
                    n,
                );
            });
        }
    }
}
