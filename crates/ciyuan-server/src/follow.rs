//! Several nodes on one ledger: each node applies the entries the others append to the
//! in-memory state its request path reads, as it applies its own.
//!
//! A node knows which entries are its own ([`OwnLog`] notes the range of every append
//! it makes); the follower thread reads the rest in log order, once the shared
//! projections hold them (a limit's counters and the definitions are read from there),
//! and applies them: limits, access rules, definitions, books and contracts
//! ([`App::apply_controls`], as for its own), usage and corrections on the budget
//! counters, postings and settings on the wallets, ingested events' keys in the
//! idempotency index, revoked keys out of the key cache. A change made on one node so
//! takes effect on the others within the projector's and the follower's polls (well
//! under a second), not at their restart.
//!
//! What is counted from another node's entries is counted as a restart restores it:
//! on node counters (the key's and session's counters, and the incidents, are the
//! appending node's).

use crate::App;
use crate::controls;
use ciyuan_core::{Entry, EntryBody, Money};
use ciyuan_store::{AppendDone, CheckpointDone, EntryKey, Log, LogError, ScanFn};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// The appends this node made, so the follower can tell its own entries from others'.
#[derive(Default)]
pub(crate) struct Own {
    state: Mutex<OwnState>,
    ended: Condvar,
}

#[derive(Default)]
struct OwnState {
    /// The next append's ticket.
    next: u64,
    /// Tickets of appends submitted and not ended.
    pending: BTreeSet<u64>,
    /// Ranges this node appended, by start, not yet passed by the follower.
    ranges: BTreeMap<u64, u64>,
}

impl Own {
    fn lock(&self) -> MutexGuard<'_, OwnState> {
        // Plain data, consistent between statements: a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self) -> u64 {
        let mut s = self.lock();
        let t = s.next;
        s.next += 1;
        s.pending.insert(t);
        t
    }

    fn end(&self, ticket: u64, range: Option<&Range<u64>>) {
        let mut s = self.lock();
        s.pending.remove(&ticket);
        if let Some(r) = range
            && !r.is_empty()
        {
            s.ranges.insert(r.start, r.end);
        }
        drop(s);
        self.ended.notify_all();
    }

    /// Waits until every append submitted before this call has ended, so each of
    /// this node's entries below a size read before the call is in `ranges`.
    fn settle(&self) {
        let mut s = self.lock();
        let before = s.next;
        while s.pending.first().is_some_and(|&t| t < before) {
            s = self
                .ended
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The parts of `range` other nodes appended.
    fn foreign(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let s = self.lock();
        let mut out = Vec::new();
        let mut at = range.start;
        for (&start, &end) in s.ranges.range(..range.end) {
            if end <= at {
                continue;
            }
            if start > at {
                out.push(at..start);
            }
            at = at.max(end);
        }
        if at < range.end {
            out.push(at..range.end);
        }
        out
    }

    /// Forgets this node's ranges that end at or before `at` (the follower is past).
    fn forget(&self, at: u64) {
        self.lock().ranges.retain(|_, end| *end > at);
    }
}

/// The log, noting the range of every append this node makes (see [`Own`]).
pub(crate) struct OwnLog {
    inner: Arc<dyn Log>,
    own: Arc<Own>,
}

impl OwnLog {
    pub(crate) fn new(inner: Arc<dyn Log>) -> (Arc<OwnLog>, Arc<Own>) {
        let own = Arc::new(Own::default());
        (
            Arc::new(OwnLog {
                inner,
                own: own.clone(),
            }),
            own,
        )
    }

    fn noted(&self, done: AppendDone) -> (u64, AppendDone) {
        let ticket = self.own.submit();
        let own = self.own.clone();
        (
            ticket,
            Box::new(move |r| {
                own.end(ticket, r.as_ref().ok());
                done(r)
            }),
        )
    }
}

impl Log for OwnLog {
    fn append(&self, entries: Vec<Vec<u8>>, done: AppendDone) -> Result<(), LogError> {
        let (ticket, done) = self.noted(done);
        self.inner
            .append(entries, done)
            .inspect_err(|_| self.own.end(ticket, None))
    }
    fn append_keyed(
        &self,
        entries: Vec<Vec<u8>>,
        keys: Vec<Option<EntryKey>>,
        done: AppendDone,
    ) -> Result<(), LogError> {
        let (ticket, done) = self.noted(done);
        self.inner
            .append_keyed(entries, keys, done)
            .inspect_err(|_| self.own.end(ticket, None))
    }
    fn keeps_keys(&self) -> bool {
        self.inner.keeps_keys()
    }
    fn find_keys(&self, keys: &[EntryKey]) -> Result<Vec<Option<u64>>, LogError> {
        self.inner.find_keys(keys)
    }
    fn checkpoint(&self, done: CheckpointDone) -> Result<(), LogError> {
        self.inner.checkpoint(done)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn entry(&self, index: u64) -> Result<Vec<u8>, LogError> {
        self.inner.entry(index)
    }
    fn scan(&self, range: Range<u64>, f: &mut ScanFn<'_>) -> Result<(), LogError> {
        self.inner.scan(range, f)
    }
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<ciyuan_tlog::Hash>, LogError> {
        self.inner.inclusion_proof(index, size)
    }
    fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<ciyuan_tlog::Hash>, LogError> {
        self.inner.consistency_proof(old_size, new_size)
    }
    fn root_at(&self, size: u64) -> Result<ciyuan_tlog::Hash, LogError> {
        self.inner.root_at(size)
    }
    fn latest_checkpoint(&self) -> Option<ciyuan_store::SignedCheckpoint> {
        self.inner.latest_checkpoint()
    }
    fn checkpoint_count(&self) -> u64 {
        self.inner.checkpoint_count()
    }
    fn checkpoints(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<ciyuan_store::SignedCheckpoint>, LogError> {
        self.inner.checkpoints(from, limit)
    }
    fn verifier_key(&self) -> String {
        self.inner.verifier_key()
    }
}

/// Most entries the follower reads and applies at once.
const FOLLOW_CHUNK: u64 = 4096;

/// Starts the follower thread of `app`, from entry `from` (the projections' watermark
/// the in-memory state was built at). It stops when the app is dropped.
pub(crate) fn start(
    app: &Arc<App>,
    own: Arc<Own>,
    from: u64,
    poll: Duration,
) -> Result<(), std::io::Error> {
    let weak = Arc::downgrade(app);
    std::thread::Builder::new()
        .name("ciyuan-heartbeat".into())
        .spawn(move || beat(weak))?;
    let weak = Arc::downgrade(app);
    std::thread::Builder::new()
        .name("ciyuan-follow".into())
        .spawn(move || run(weak, own, from, poll))
        .map(drop)
}

/// How often a node tells the others how far it has followed (and that it lives).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest a node stays paused for another node's change of the rules (that node
/// died mid-change if it never lowers its barrier).
const MOST_PAUSED: Duration = Duration::from_secs(30);

/// The follower thread's state.
struct Follower {
    app: Weak<App>,
    own: Arc<Own>,
    followed: u64,
}

/// A node that could not heartbeat for this long stops rating (takes its rules gate's
/// write guard) until it can again: the others take it for dead after 10 s
/// (`QUIET` in the store) and change the rules without waiting for it, so by then it
/// must rate nothing.
const FENCE_AFTER: Duration = Duration::from_secs(5);

/// Milliseconds since `epoch` (the heartbeat's clock).
fn millis(epoch: std::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Tells the other nodes, every [`HEARTBEAT`], that this node lives and how far it
/// has followed. Its own thread: the follower may wait (for appends, for a pause)
/// longer than a heartbeat. A watchdog of its own fences the rating (see
/// [`FENCE_AFTER`]) on a clock the heartbeat's calls cannot hold up: a call hung on a
/// dead connection can take as long as the TCP timeout.
fn beat(app: Weak<App>) {
    let epoch = std::time::Instant::now();
    // When the last heartbeat that got through was sent (the database's `seen_at`
    // is no later than that).
    let last_ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (app, last_ok) = (app.clone(), last_ok.clone());
        let spawned = std::thread::Builder::new()
            .name("ciyuan-fence".into())
            .spawn(move || fence(app, epoch, last_ok));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no fence thread: a node cut off from the database would go on rating");
        }
    }
    loop {
        let Some(a) = app.upgrade() else { return };
        let sent = millis(epoch);
        match a.store.heartbeat(&a.node, a.followed()) {
            Ok(()) => last_ok.store(sent, std::sync::atomic::Ordering::Release),
            Err(e) => tracing::warn!(error = %e, "the heartbeat to the other nodes failed"),
        }
        a.release_idle_tiers();
        drop(a);
        std::thread::sleep(HEARTBEAT);
    }
}

/// Pauses this node's rating (the rules gate's write guard) while no heartbeat sent
/// in the last [`FENCE_AFTER`] got through.
pub(crate) fn fence(
    app: Weak<App>,
    epoch: std::time::Instant,
    last_ok: Arc<std::sync::atomic::AtomicU64>,
) {
    let stale = || {
        millis(epoch).saturating_sub(last_ok.load(std::sync::atomic::Ordering::Acquire))
            >= FENCE_AFTER.as_millis() as u64
    };
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let Some(a) = app.upgrade() else { return };
        if !stale() {
            continue;
        }
        tracing::warn!("no heartbeat reached the database for 5 s: rating paused until one does");
        let gate = a.rules_gate.clone();
        let _fenced = gate.blocking_write();
        while stale() {
            std::thread::sleep(Duration::from_millis(250));
        }
        tracing::info!("heartbeat back: rating again");
    }
}

fn run(app: Weak<App>, own: Arc<Own>, followed: u64, poll: Duration) {
    let mut f = Follower { app, own, followed };
    loop {
        let Some(app) = f.app.upgrade() else { return };
        f.step(&app);
        if let Some(id) = f.barrier_raised(&app) {
            f.paused(&app, id, poll);
        }
        drop(app);
        std::thread::sleep(poll);
    }
}

impl Follower {
    /// Heartbeats when due and applies what other nodes appended since the last step.
    fn step(&mut self, app: &App) {
        // The size first, then the tickets: an own append below it was submitted
        // before, and `settle` waits for it to be noted.
        let target = app.log.size().min(app.projected());
        if target <= self.followed {
            return;
        }
        self.own.settle();
        let target = target.min(self.followed + FOLLOW_CHUNK);
        let mut failed = None;
        for range in self.own.foreign(self.followed..target) {
            if let Err((at, e)) = app.follow_range(range) {
                failed = Some(at);
                // The entries before `at` are applied; `at` and on are retried from
                // there on the next poll: never skipped, never applied twice.
                tracing::error!(error = %e, at, "applying another node's entry failed; retrying");
                break;
            }
        }
        self.followed = failed.unwrap_or(target);
        self.own.forget(self.followed);
        app.followed
            .store(self.followed, std::sync::atomic::Ordering::Release);
    }

    /// Follows until every entry below `size` is applied here (for at most
    /// [`MOST_PAUSED`]).
    fn follow_to(&mut self, app: &App, size: u64, poll: Duration) {
        let until = std::time::Instant::now() + MOST_PAUSED;
        while self.followed < size && std::time::Instant::now() < until {
            std::thread::sleep(poll.min(Duration::from_millis(20)));
            self.step(app);
        }
    }

    /// Another node's rules barrier that is up, if any.
    fn barrier_raised(&self, app: &App) -> Option<i64> {
        match app.store.barrier() {
            Ok(Some(b)) if b.lowered.is_none() && b.node != app.node => Some(b.id),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the rules barrier");
                None
            }
        }
    }

    /// Pauses this node's rating for barrier `id` (another node is about to change the
    /// rules of measuring or pricing): takes the rules gate's write guard, so nothing
    /// more is rated here; waits until what was rated before is in the log; says so;
    /// then follows on until the change is in the log and applied here, or the
    /// barrier is lowered without it, or it outlived [`MOST_PAUSED`].
    fn paused(&mut self, app: &App, id: i64, poll: Duration) {
        let gate = app.rules_gate.clone();
        let _paused = gate.blocking_write();
        self.own.settle();
        if let Err(e) = app.store.pause(&app.node, id) {
            tracing::warn!(error = %e, "cannot say this node paused for a change of the rules");
            return;
        }
        let since = std::time::Instant::now();
        loop {
            std::thread::sleep(poll.min(Duration::from_millis(20)));
            self.step(app);
            let done = match app.store.barrier() {
                Ok(Some(b)) if b.id == id => match b.lowered {
                    None => false,
                    Some(None) => true,
                    // Applied here once followed past it.
                    Some(Some(size)) => self.followed >= size,
                },
                // Replaced (its node lowered it, then it or another raised the
                // next) or gone: its change, if made, is in the log below the size
                // now. Applied here before rating again, or the next change's barrier
                // could free this node's rating before it has this one.
                Ok(_) => {
                    self.follow_to(app, app.log.size(), poll);
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the rules barrier");
                    false
                }
            };
            if done {
                return;
            }
            if since.elapsed() > MOST_PAUSED {
                // The change may be in the log already and its barrier never lowered
                // (its node died after the append): follow past what the log holds
                // now before rating again (for at most as long again).
                self.follow_to(app, app.log.size(), poll);
                tracing::warn!(
                    barrier = id,
                    "a change of the rules never came: rating again"
                );
                return;
            }
        }
    }
}

/// How long a node changing the rules waits for the others to pause: longer than the
/// store's `QUIET` (10 s), after which a node that neither paused nor heartbeated is
/// taken for dead (and has fenced itself, see [`FENCE_AFTER`]).
const PAUSE_WAIT: Duration = Duration::from_secs(12);

impl App {
    /// Before this node appends a change of the rules of measuring or pricing (under
    /// the rules gate's write guard): raises the barrier that pauses every other live
    /// node's rating, and waits until each has paused with what it rated before in the
    /// log. Answers the barrier's id, to lower once the change is in the log
    /// ([`App::lower_rules_barrier`]).
    pub(crate) async fn raise_rules_barrier(
        self: &Arc<Self>,
    ) -> Result<i64, crate::error::ApiError> {
        use crate::error::ApiError;
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(ApiError::internal)?;
        let id = (u64::from_le_bytes(raw) >> 1) as i64;
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        loop {
            let raised = self
                .blocking(move |app| Ok(app.store.raise_barrier(&app.node, id)?))
                .await?;
            if raised {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ApiError::unavailable(
                    "another node is changing the rules of measuring or pricing; try again",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            let waiting = self
                .blocking(move |app| Ok(app.store.unpaused(&app.node, id)?))
                .await?;
            if waiting.is_empty() {
                return Ok(id);
            }
            if tokio::time::Instant::now() > deadline {
                self.lower_rules_barrier(id, None).await;
                return Err(ApiError::unavailable(format!(
                    "nodes {} did not pause their rating for this change of the rules; try again",
                    waiting.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Leaves the nodes sharing the ledger (a clean stop): the others stop waiting for
    /// this one, and its holds go.
    pub async fn leave(self: &Arc<Self>) {
        if self.config.follow.is_none() {
            return;
        }
        if let Err(e) = self.blocking(|app| Ok(app.store.leave(&app.node)?)).await {
            tracing::warn!(detail = %e.detail, "cannot say this node leaves; the others take it for dead in 10 s");
        }
    }

    /// Lowers barrier `id`: the change is in the log below `size` (`None`: not made).
    pub(crate) async fn lower_rules_barrier(self: &Arc<Self>, id: i64, size: Option<u64>) {
        if let Err(e) = self
            .blocking(move |app| Ok(app.store.lower_barrier(id, size)?))
            .await
        {
            // The other nodes rate again once it is 30 s old.
            tracing::warn!(detail = %e.detail, "cannot lower the rules barrier");
        }
    }

    /// Reads entries `range` (all appended by other nodes) and applies them; on a
    /// failure, the index of the first entry not applied, and why.
    fn follow_range(&self, range: Range<u64>) -> Result<(), (u64, String)> {
        let start = range.start;
        let mut entries = Vec::with_capacity((range.end - range.start) as usize);
        self.log
            .scan(range, &mut |i, bytes| {
                let e = Entry::decode(bytes)
                    .map_err(|e| LogError::Io(format!("entry {i} does not decode: {e}")))?;
                entries.push((i, e));
                Ok(())
            })
            .map_err(|e| (start, e.to_string()))?;
        self.apply_elsewhere(&entries)
    }

    /// Applies entries another node appended (with their indices, in log order) to
    /// this node's in-memory state, one after another; on a failure, the index of the
    /// entry that failed (those before it are applied, it and those after are not).
    pub(crate) fn apply_elsewhere(&self, entries: &[(u64, Entry)]) -> Result<(), (u64, String)> {
        let mut keys = Vec::new();
        let applied = self.apply_each(entries, &mut keys);
        if !keys.is_empty() {
            let mut recent = self.ingest_lock.blocking_lock();
            for (hash, i) in keys {
                recent.index_elsewhere(hash, i);
            }
        }
        applied
    }

    fn apply_each(
        &self,
        entries: &[(u64, Entry)],
        keys: &mut Vec<(u64, u64)>,
    ) -> Result<(), (u64, String)> {
        for (i, e) in entries {
            let i = *i;
            match &e.body {
                EntryBody::Usage(u) => {
                    let cost = u.rating.as_ref().map(|r| Money {
                        amount: r.amount,
                        currency: r.currency,
                    });
                    if u.consumed() {
                        // On the key's and session's counters too, where the entry
                        // names them: per-key and per-session limits span nodes.
                        self.budget.record_elsewhere(
                            &e.account,
                            u.key.as_deref(),
                            u.session.as_deref(),
                            &u.tokens,
                            cost,
                            e.ts,
                        );
                    }
                    if let Some((source, id)) = u.ingest_key() {
                        keys.push((ciyuan_core::ingest_key_hash(source, id), i));
                    }
                    if let Some(r) = u.rating.as_deref()
                        && let Some(place) = &r.place
                    {
                        self.tiers
                            .placed_elsewhere(place, &r.book)
                            .map_err(|err| (i, format!("tier place at entry {i}: {err}")))?;
                    }
                }
                EntryBody::Adjustment(a) => {
                    self.budget.record_correction(&e.account, &a.tokens, e.ts);
                }
                EntryBody::Posting(p) => self
                    .wallets
                    .apply_posting(&e.account, p, e.ts)
                    .map_err(|err| (i, format!("posting at entry {i}: {err}")))?,
                EntryBody::WalletSet(w) => self
                    .wallets
                    .apply_settings(&e.account, w)
                    .map_err(|err| (i, format!("wallet settings at entry {i}: {err}")))?,
                EntryBody::KeyRevoked(k) => self.auth.revoked(&k.key_id),
                EntryBody::AccountUpdated(_) => self.tiers.forget_zones(),
                _ if controls::is_control(e) => self
                    .apply_controls(std::slice::from_ref(e))
                    .map_err(|err| (i, format!("entry {i}: {}", err.detail)))?,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_ranges_are_the_gaps_between_own_appends() {
        let own = Own::default();
        for r in [2..4, 6..7, 9..12] {
            let t = own.submit();
            own.end(t, Some(&r));
        }
        // A failed append notes nothing.
        let t = own.submit();
        own.end(t, None);
        own.settle();
        assert_eq!(own.foreign(0..10), vec![0..2, 4..6, 7..9]);
        own.forget(10);
        // 9..12 reaches past 10: still known for the next range.
        assert_eq!(own.foreign(10..14), vec![12..14]);
        own.forget(14);
        assert!(own.lock().ranges.is_empty());
        assert_eq!(own.foreign(14..15), vec![14..15]);
    }

    #[test]
    fn settle_waits_for_appends_submitted_before_it() {
        let own = Arc::new(Own::default());
        let t = own.submit();
        let o = own.clone();
        let ender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            o.end(t, Some(&(5..8)));
        });
        own.settle();
        // Settled only once the append ended and its range was noted.
        assert_eq!(own.foreign(0..10), vec![0..5, 8..10]);
        ender.join().unwrap();
    }
}
