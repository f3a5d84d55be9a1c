//! The log on PostgreSQL: one verifiable sequence however many nodes append.
//!
//! Entries, their leaf hashes and the completed perfect subtrees of the RFC 6962 tree
//! from level [`STORED_FROM_LEVEL`] up are rows (lower ones are computed from the
//! leaves); `log_head` holds the size and the tree's right edge (its frontier). An
//! append is one transaction that locks the head row (`SELECT ... FOR UPDATE`), so
//! appends from every node are ordered by the database: each takes the next indices,
//! extends the frontier, writes the entries and the subtrees they complete, and
//! commits; an entry is acknowledged only after its commit. Each node sends its appends
//! through one writer thread that groups the requests waiting into one transaction
//! (group commit), as the file ledger does with `fdatasync`.
//!
//! Checkpoints are signed by any node holding the log's signing key (the same key on
//! every node, its verifier key recorded in `log_head` at creation: a node with another
//! key refuses to open the log), under the same head lock, over the committed head
//! only: a checkpoint never names an entry that is not durable.
//!
//! Entry keys (an ingested event once across nodes) are claimed before the append, out
//! of the head lock: a claimer thread takes the keys of every request waiting into one
//! transaction of its own (`log_claims`, `log_keys`), which runs while the writer
//! appends the group before. A claim is pending until the append that takes its
//! indices sets its start in the head-locked transaction; a pending claim expires
//! ([`CLAIM_LIFE`]), after which another node may take its keys, and an append whose
//! claim was taken is refused (retryable). Every request passes the claimer in the
//! order it was sent, so the log keeps that order as before.

use crate::Pool;
use ciyuan_store::{AppendDone, CheckpointDone, EntryKey, Log, LogError, ScanFn, SignedCheckpoint};
use ciyuan_tlog::{Checkpoint, Frontier, Hash, NodeSource, NoteSigner};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// The log's claims on entry keys (schema version 13): an append's keys are held by
/// a claim, pending until the append sets its start. Keys recorded before keep their
/// index as their position under claim 0, which starts at 0.
pub(crate) const MIGRATION_CLAIMS: &str = r#"
CREATE SEQUENCE log_claim_ids START 1;
CREATE TABLE log_claims (
    id      BIGINT PRIMARY KEY,
    start   BIGINT,
    expires TIMESTAMPTZ NOT NULL
);
INSERT INTO log_claims (id, start, expires) VALUES (0, 0, now());
ALTER TABLE log_keys RENAME COLUMN idx TO pos;
ALTER TABLE log_keys ADD COLUMN claim BIGINT NOT NULL DEFAULT 0;
ALTER TABLE log_keys ALTER COLUMN claim DROP DEFAULT;
"#;

/// Most requests one group commit takes.
const MAX_GROUP_REQUESTS: usize = 1024;
/// Entries read per query while scanning.
const SCAN_CHUNK: i64 = 4096;

/// Entries to append and, for a keyed append, each entry's key.
type Keys = Option<Vec<Option<EntryKey>>>;

/// How long a claim on entry keys holds them without its append: past it, another
/// node may take the keys (a node that died between its claim and its append loses
/// none of them for longer), and the append, should it still come, is refused.
pub const CLAIM_LIFE: std::time::Duration = std::time::Duration::from_secs(10);

/// Each request's outcome in a group commit.
type Ranges = Vec<Result<Range<u64>, LogError>>;

/// A request as the log receives it.
enum Job {
    Append(Vec<Vec<u8>>, Keys, AppendDone),
    Checkpoint(CheckpointDone),
}

/// A request as the writer receives it: a keyed append's keys already claimed.
enum Ready {
    Append(Vec<Vec<u8>>, Option<Claimed>, AppendDone),
    Checkpoint(CheckpointDone),
}

/// A claim holding an append's keys (as stored) until the append sets its start.
#[derive(Clone)]
struct Claimed {
    id: i64,
    keys: Vec<[u8; 16]>,
}

/// What claiming a request's keys came to.
enum Claim {
    /// Every key is held by this claim.
    Held(Claimed),
    /// Keys held by entries already in the log: (position in the request, index).
    Taken(Vec<(usize, u64)>),
    /// Some keys are claimed by another append, not yet in the log: wait for it.
    Pending,
    /// The keys were held by claims that expired, now taken from them: claim again.
    Again,
}

/// A keyed request waiting for another append's pending claim on its keys: it ends
/// as a duplicate of that append's entries, or refused (retryable) when that append
/// did not happen; never appended, so no request is appended out of its order.
struct Waiting {
    keys: Vec<Option<EntryKey>>,
    done: AppendDone,
    next: std::time::Instant,
    pause: std::time::Duration,
    until: std::time::Instant,
}

/// What every handle of the log shares with the writer thread.
struct Shared {
    pool: Pool,
    /// The log's signing key; `None` for a reader (an auditor), which cannot sign.
    signer: Option<NoteSigner>,
    verifier: ciyuan_tlog::NoteVerifier,
    /// Durable entries as this node last saw them.
    size: AtomicU64,
    latest: Mutex<Option<SignedCheckpoint>>,
    checkpoints: AtomicU64,
    /// Set while PostgreSQL is known to be out of reach (a commit or the follower
    /// failed to reach it, and neither has since), with why.
    down: AtomicBool,
    down_why: Mutex<String>,
    /// A group whose COMMIT was sent on a connection that broke before the answer
    /// came: set by [`Shared::commit`], settled by the writer.
    doubt: Mutex<Option<Doubt>>,
    /// Set while the writer settles a doubt: the log stays unavailable (appends are
    /// refused) whatever the follower reads meanwhile.
    settling: AtomicBool,
    /// How long this node's claims on entry keys hold ([`CLAIM_LIFE`]; shorter in
    /// tests), in milliseconds.
    claim_life_ms: AtomicU64,
    /// Claims whose appends will not happen that could not be given up when they
    /// failed (PostgreSQL out of reach, most often): the claimer gives them up before
    /// it claims again, so a request sent again after an outage does not wait for its
    /// own first claim to expire.
    unreleased: Mutex<Vec<Claimed>>,
}

/// What a group commit that may or may not have happened would have made the log.
struct Doubt {
    /// The size before it and the size it would have reached.
    from: u64,
    to: u64,
    /// The root of the tree of `to` entries it would have made.
    root: Hash,
    /// Each request's outcome, had it committed.
    ranges: Vec<Result<Range<u64>, LogError>>,
}

/// The log on PostgreSQL (see the module documentation).
pub struct PgLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    /// The claimer, then the writer: each ends once the one before it has.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Set to stop the follower.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// How often the follower reads the head when no notification came.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Keeps this node's view of the log current with what other nodes append and sign:
/// waits for the `ciyuan_log` notification every commit sends (or polls), then reads
/// the committed size and the newest checkpoint. A lost connection is replaced, after
/// a backoff while the database stays out of reach, and the log is marked unavailable
/// until the follower reads it again; notifications sent meanwhile are lost, so it
/// catches up as soon as it listens again.
fn follow(shared: Arc<Shared>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut backoff = Backoff::default();
    while !stop.load(Ordering::Acquire) {
        let mut listener = match shared.pool.get() {
            Ok(c) => c,
            Err(e) => {
                shared.mark_down(&e.text);
                tracing::warn!(error = %e, "the log's follower cannot connect; retrying");
                backoff.sleep();
                continue;
            }
        };
        let listening = listener
            .batch_execute("LISTEN ciyuan_log")
            .map_err(io)
            .and_then(|()| shared.catch_up(&mut listener));
        if let Err(e) = listening {
            shared.mark_down(&e.to_string());
            tracing::warn!(error = %e, "the log's follower cannot listen");
            drop(listener);
            shared.pool.flush();
            backoff.sleep();
            continue;
        }
        if shared.mark_up() {
            tracing::info!("the log's follower reached PostgreSQL again");
        }
        backoff = Backoff::default();
        while !stop.load(Ordering::Acquire) {
            // Wake on the first notification (or the poll), then take all that queued.
            let woke = {
                use postgres::fallible_iterator::FallibleIterator;
                let mut n = listener.notifications();
                let first = n.timeout_iter(FOLLOW_POLL).next();
                match first {
                    Ok(_) => {
                        let mut pending = n.iter();
                        while let Ok(Some(_)) = pending.next() {}
                        true
                    }
                    Err(_) => false,
                }
            };
            if woke && shared.catch_up(&mut listener).is_ok() {
                // The database answers: whatever marked the log down (a writer's
                // failure on a connection from before a restart) is over.
                if shared.mark_up() {
                    tracing::info!("PostgreSQL answers the log's follower again");
                }
            } else {
                // The connection broke (the server restarted, most often): so did the
                // pool's idle ones. Listen again on a new one.
                shared.mark_down("the log's follower lost its connection");
                tracing::warn!("the log's follower lost its connection to PostgreSQL");
                drop(listener);
                shared.pool.flush();
                break;
            }
        }
    }
}

/// Waits between attempts to reach a database that is out of reach: doubling from
/// 50 ms to [`crate::MAX_BACKOFF`], so an outage costs a few attempts a second.
struct Backoff(std::time::Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(std::time::Duration::from_millis(50))
    }
}

impl Backoff {
    /// The next wait (and doubles the one after).
    fn next(&mut self) -> std::time::Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(crate::MAX_BACKOFF);
        d
    }

    fn sleep(&mut self) {
        std::thread::sleep(self.next());
    }
}

/// A log error from anything that failed: PostgreSQL's errors classified by
/// [`crate::Fault::of`] (retryable ones become [`LogError::Unavailable`]), everything
/// else permanent.
fn io(e: impl Into<Described>) -> LogError {
    let Described(text, retryable) = e.into();
    if retryable {
        LogError::Unavailable(text)
    } else {
        LogError::Io(text)
    }
}

/// An error's text, with what the server said for database errors, and whether it
/// may heal.
struct Described(String, bool);

impl From<postgres::Error> for Described {
    fn from(e: postgres::Error) -> Described {
        crate::Fault::of(&e).into()
    }
}

impl From<crate::Fault> for Described {
    fn from(e: crate::Fault) -> Described {
        Described(e.text, e.retryable)
    }
}

impl From<String> for Described {
    fn from(e: String) -> Described {
        Described(e, false)
    }
}

impl From<std::io::Error> for Described {
    fn from(e: std::io::Error) -> Described {
        Described(e.to_string(), false)
    }
}

impl From<ciyuan_tlog::NoteError> for Described {
    fn from(e: ciyuan_tlog::NoteError) -> Described {
        Described(e.to_string(), false)
    }
}

fn hash_of(bytes: &[u8], what: &str) -> Result<Hash, LogError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| LogError::Io(format!("{what} is not 32 bytes")))
}

/// The frontier of `size` leaves from the edge hashes stored beside it.
fn frontier_of(size: u64, edge: &[u8]) -> Result<Frontier, LogError> {
    if edge.len() != 32 * size.count_ones() as usize {
        return Err(LogError::Io(format!(
            "the stored frontier of {size} entries has {} bytes",
            edge.len()
        )));
    }
    let mut nodes = HashMap::new();
    let mut start = 0u64;
    let mut chunks = edge.chunks_exact(32);
    for level in (0..u64::BITS).rev() {
        if size & (1u64 << level) != 0 {
            let h = hash_of(chunks.next().unwrap_or_default(), "a frontier hash")?;
            nodes.insert((level, start >> level), h);
            start += 1u64 << level;
        }
    }
    struct Edge(HashMap<(u32, u64), Hash>);
    impl NodeSource for Edge {
        type Error = LogError;
        fn node(&self, level: u32, index: u64) -> Result<Hash, LogError> {
            self.0
                .get(&(level, index))
                .copied()
                .ok_or_else(|| LogError::Io(format!("no frontier node {level}/{index}")))
        }
    }
    Frontier::from_source(&Edge(nodes), size)
}

fn edge_bytes(f: &Frontier) -> Vec<u8> {
    f.nodes().flat_map(|(_, _, h)| h).collect()
}

/// Why an entry cannot be in the log: empty, or holding a newline (a bundle holds one
/// entry per line), as the file ledger judges.
fn invalid(entry: &[u8]) -> Option<&'static str> {
    if entry.is_empty() {
        Some("entry is empty")
    } else if entry.contains(&b'\n') {
        Some("entry contains a newline")
    } else {
        None
    }
}

/// The lowest level of the tree whose nodes are stored: the levels below are
/// computed from the leaves when a proof or a root needs them (at most 2^3 leaves
/// read, and a proof needs at most three such nodes). Storing every level wrote one
/// node row per entry in the head-locked append; from level 4 on, one per 16.
const STORED_FROM_LEVEL: u32 = 4;

/// Reads perfect subtrees with one connection (or transaction).
struct Nodes<'a, C: postgres::GenericClient>(std::cell::RefCell<&'a mut C>);

impl<C: postgres::GenericClient> NodeSource for Nodes<'_, C> {
    type Error = LogError;
    fn node(&self, level: u32, index: u64) -> Result<Hash, LogError> {
        let mut c = self.0.borrow_mut();
        if level > 0 && level < STORED_FROM_LEVEL {
            let (from, n) = (index << level, 1u64 << level);
            let rows = c
                .query(
                    "SELECT leaf FROM log_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                    &[&(from as i64), &((from + n) as i64)],
                )
                .map_err(io)?;
            if rows.len() as u64 != n {
                return Err(LogError::Io(format!(
                    "tree node {level}/{index} is missing: {} of its {n} leaves are stored",
                    rows.len()
                )));
            }
            let mut hashes = rows
                .iter()
                .map(|r| hash_of(r.get::<_, &[u8]>(0), "a leaf hash"))
                .collect::<Result<Vec<_>, _>>()?;
            while hashes.len() > 1 {
                hashes = hashes
                    .chunks_exact(2)
                    .map(|p| ciyuan_tlog::node_hash(&p[0], &p[1]))
                    .collect();
            }
            return hashes
                .pop()
                .ok_or_else(|| LogError::Io(format!("tree node {level}/{index} has no leaves")));
        }
        let row = if level == 0 {
            c.query_opt(
                "SELECT leaf FROM log_entries WHERE idx = $1",
                &[&(index as i64)],
            )
        } else {
            c.query_opt(
                "SELECT hash FROM log_nodes WHERE level = $1 AND idx = $2",
                &[&(level as i16), &(index as i64)],
            )
        }
        .map_err(io)?
        .ok_or_else(|| LogError::Io(format!("tree node {level}/{index} is missing")))?;
        hash_of(row.get::<_, &[u8]>(0), "a tree node")
    }
}

/// The part of an entry key the log stores: 128 bits (two of billions of events
/// collide with odds near 10^-20), half the index's bytes to write and search in the
/// append's transaction, which holds every node's appends.
fn stored(key: &EntryKey) -> &[u8] {
    &key[..16]
}

fn stored_array(key: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&key[..16]);
    a
}

/// Who holds a key a request wanted.
enum Holder {
    /// An entry in the log, at this index.
    Entry(u64),
    /// A pending claim, still alive.
    Pending,
    /// A claim that expired unconfirmed, or is gone: its keys are free to take.
    Free(i64),
}

/// Reads who holds each of `keys` (stored form): the claim holding it and what that
/// claim is now. Keys nobody holds are absent.
fn holders(
    c: &mut impl postgres::GenericClient,
    keys: &[&[u8]],
) -> Result<HashMap<Vec<u8>, (i64, Holder)>, LogError> {
    let rows = c
        .query(
            "SELECT k.key, k.claim, c.start + k.pos,
                    c.id IS NOT NULL AND c.start IS NULL AND c.expires >= now()
             FROM log_keys k LEFT JOIN log_claims c ON c.id = k.claim
             WHERE k.key = ANY($1)",
            &[&keys],
        )
        .map_err(io)?;
    let mut held = HashMap::with_capacity(rows.len());
    for r in rows {
        let claim: i64 = r.get(1);
        let holder = match (r.get::<_, Option<i64>>(2), r.get::<_, bool>(3)) {
            (Some(idx), _) => Holder::Entry(idx as u64),
            (None, true) => Holder::Pending,
            (None, false) => Holder::Free(claim),
        };
        held.insert(r.get::<_, Vec<u8>>(0), (claim, holder));
    }
    Ok(held)
}

/// The keyed entries of a request: (position, stored key).
fn keyed(keys: &[Option<EntryKey>]) -> impl Iterator<Item = (usize, &[u8])> {
    keys.iter()
        .enumerate()
        .filter_map(|(i, k)| Some((i, stored(k.as_ref()?))))
}

impl Shared {
    /// Claims the keys of `requests` in one transaction of its own, outside the head
    /// lock: a request whose every key is free holds them all under a new pending
    /// claim; one whose keys another holds keeps none of them. Keys of expired claims
    /// are taken from them (the request then claims again). The keys go in sorted, so
    /// two nodes claiming overlapping sets lock them in one order (no deadlock) and
    /// each group writes the index's pages in one pass.
    fn claim(&self, requests: &[&[Option<EntryKey>]]) -> Result<Vec<Claim>, LogError> {
        let mut made = Vec::new();
        let claimed = self.claim_made(requests, &mut made);
        if claimed.is_err() {
            // The claims may have been committed (the answer to the COMMIT lost) or
            // not: given up later either way.
            self.unreleased
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(made);
        }
        claimed
    }

    /// [`Shared::claim`], noting in `made` every claim made before a failure.
    fn claim_made(
        &self,
        requests: &[&[Option<EntryKey>]],
        made: &mut Vec<Claimed>,
    ) -> Result<Vec<Claim>, LogError> {
        let mut c = self.pool.get().map_err(io)?;
        let mut tx = c.transaction().map_err(io)?;
        // The claim may be lost in a crash only with every later commit: the append
        // confirming it waits for the WAL flush, which covers it. Until then it only
        // holds keys, which the crash frees anyway.
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .map_err(io)?;
        let life = self.claim_life_ms.load(Ordering::Acquire) as i64;
        let ids: Vec<i64> = tx
            .query_one(
                "WITH c AS (
                     INSERT INTO log_claims (id, expires)
                     SELECT nextval('log_claim_ids'), now() + $2::bigint * interval '1 millisecond'
                     FROM generate_series(1, $1::bigint) RETURNING id)
                 SELECT array_agg(id) FROM c",
                &[&(requests.len() as i64), &life],
            )
            .map_err(io)?
            .get::<_, Option<Vec<i64>>>(0)
            .unwrap_or_default();
        if ids.len() != requests.len() {
            return Err(LogError::Io(format!(
                "{} claims made for {} requests",
                ids.len(),
                requests.len()
            )));
        }
        made.extend(requests.iter().zip(&ids).map(|(keys, &id)| Claimed {
            id,
            keys: keyed(keys).map(|(_, k)| stored_array(k)).collect(),
        }));
        let mut rows: Vec<(&[u8], i64, i64)> = Vec::new();
        for (r, keys) in requests.iter().enumerate() {
            rows.extend(keyed(keys).map(|(pos, k)| (k, ids[r], pos as i64)));
        }
        rows.sort_unstable();
        let (key, claim, pos): (Vec<&[u8]>, Vec<i64>, Vec<i64>) = (
            rows.iter().map(|r| r.0).collect(),
            rows.iter().map(|r| r.1).collect(),
            rows.iter().map(|r| r.2).collect(),
        );
        // Nearly always no key is held: a plain insert then costs less than one that
        // looks for a conflict first, row by row. Only when one is held (the insert
        // fails whole) is the batch claimed again key by key.
        let mut plain = tx.savepoint("plain").map_err(io)?;
        match plain.execute(
            "INSERT INTO log_keys (key, claim, pos)
             SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[])",
            &[&key, &claim, &pos],
        ) {
            Ok(_) => {
                plain.commit().map_err(io)?;
                tx.commit().map_err(io)?;
                return Ok(requests
                    .iter()
                    .zip(&ids)
                    .map(|(keys, &id)| {
                        Claim::Held(Claimed {
                            id,
                            keys: keyed(keys).map(|(_, k)| stored_array(k)).collect(),
                        })
                    })
                    .collect());
            }
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                plain.rollback().map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        // Counts per claim only come back: a thousand keys are 16 KB on the wire for
        // nothing when none is held.
        let counts: HashMap<i64, i64> = tx
            .query(
                "WITH ins AS (
                     INSERT INTO log_keys (key, claim, pos)
                     SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[])
                     ON CONFLICT DO NOTHING RETURNING claim)
                 SELECT claim, count(*) FROM ins GROUP BY claim",
                &[&key, &claim, &pos],
            )
            .map_err(io)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut out = Vec::with_capacity(requests.len());
        let (mut lost, mut lost_keys): (Vec<i64>, Vec<&[u8]>) = (Vec::new(), Vec::new());
        for (r, keys) in requests.iter().enumerate() {
            let wanted = keyed(keys).count() as i64;
            if counts.get(&ids[r]).copied().unwrap_or(0) == wanted {
                out.push(Some(Claimed {
                    id: ids[r],
                    keys: keyed(keys).map(|(_, k)| stored_array(k)).collect(),
                }));
            } else {
                lost.push(ids[r]);
                lost_keys.extend(keyed(keys).map(|(_, k)| k));
                out.push(None);
            }
        }
        if lost.is_empty() {
            tx.commit().map_err(io)?;
            return Ok(out.into_iter().flatten().map(Claim::Held).collect());
        }
        // Some keys are held: the requests that found one keep none of theirs, so
        // nothing they hold is waited on while they wait.
        tx.execute(
            "DELETE FROM log_keys WHERE key = ANY($1) AND claim = ANY($2)",
            &[&lost_keys, &lost],
        )
        .map_err(io)?;
        tx.execute("DELETE FROM log_claims WHERE id = ANY($1)", &[&lost])
            .map_err(io)?;
        let held = holders(&mut tx, &lost_keys)?;
        let mut free: Vec<i64> = Vec::new();
        let mut claims = Vec::with_capacity(requests.len());
        for (r, o) in out.into_iter().enumerate() {
            if let Some(claimed) = o {
                claims.push(Claim::Held(claimed));
                continue;
            }
            let (mut taken, mut pending) = (Vec::new(), false);
            for (pos, k) in keyed(requests[r]) {
                match held.get(k) {
                    Some((_, Holder::Entry(idx))) => taken.push((pos, *idx)),
                    Some((_, Holder::Pending)) => pending = true,
                    Some((_, Holder::Free(claim))) => free.push(*claim),
                    None => {}
                }
            }
            claims.push(if pending {
                Claim::Pending
            } else if !taken.is_empty() {
                Claim::Taken(taken)
            } else {
                Claim::Again
            });
        }
        if !free.is_empty() {
            // Taken from expired claims only if still unconfirmed: an append that
            // confirmed one meanwhile holds its row locked until its commit, and then
            // the condition no longer holds. Keys whose claim is gone go with them.
            free.sort_unstable();
            free.dedup();
            tx.execute(
                "DELETE FROM log_claims
                 WHERE id = ANY($1) AND start IS NULL AND expires < now()",
                &[&free],
            )
            .map_err(io)?;
            tx.execute(
                "DELETE FROM log_keys k WHERE k.key = ANY($1) AND k.claim = ANY($2)
                 AND NOT EXISTS (SELECT 1 FROM log_claims c WHERE c.id = k.claim)",
                &[&lost_keys, &free],
            )
            .map_err(io)?;
        }
        tx.commit().map_err(io)?;
        Ok(claims)
    }

    /// Gives up claims whose appends will not happen, so their keys are free at once
    /// rather than when the claims expire. Best effort: a claim left behind expires.
    fn release(&self, claims: &[&Claimed]) {
        if claims.is_empty() {
            return;
        }
        let ids: Vec<i64> = claims.iter().map(|c| c.id).collect();
        let keys: Vec<&[u8]> = claims
            .iter()
            .flat_map(|c| c.keys.iter().map(|k| k.as_slice()))
            .collect();
        let released = self.pool.get().map_err(io).and_then(|mut c| {
            let mut tx = c.transaction().map_err(io)?;
            let gone: Vec<i64> = tx
                .query(
                    "DELETE FROM log_claims WHERE id = ANY($1) AND start IS NULL RETURNING id",
                    &[&ids],
                )
                .map_err(io)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            tx.execute(
                "DELETE FROM log_keys WHERE key = ANY($1) AND claim = ANY($2)",
                &[&keys, &gone],
            )
            .map_err(io)?;
            tx.commit().map_err(io)
        });
        if let Err(e) = released {
            tracing::warn!(error = %e, claims = ids.len(), "claims on entry keys not yet given up");
            self.unreleased
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(claims.iter().map(|&c| c.clone()));
        }
    }

    /// Gives up the claims that could not be given up before; answers whether some
    /// are still left.
    fn release_left(&self) -> bool {
        let left = std::mem::take(&mut *self.unreleased.lock().unwrap_or_else(|p| p.into_inner()));
        self.release(&left.iter().collect::<Vec<_>>());
        !self
            .unreleased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// What became of the keys a waiting request found claimed: `None` while a claim
    /// on one is still pending, else the entries holding them.
    fn awaited(&self, keys: &[Option<EntryKey>]) -> Result<Option<Vec<(usize, u64)>>, LogError> {
        let mut c = self.pool.get().map_err(io)?;
        let wanted: Vec<&[u8]> = keyed(keys).map(|(_, k)| k).collect();
        let held = holders(&mut *c, &wanted)?;
        let mut taken = Vec::new();
        for (pos, k) in keyed(keys) {
            match held.get(k) {
                Some((_, Holder::Entry(idx))) => taken.push((pos, *idx)),
                Some((_, Holder::Pending)) => return Ok(None),
                Some((_, Holder::Free(_))) | None => {}
            }
        }
        Ok(Some(taken))
    }

    /// Reads the committed size and the newest checkpoint signed by any node.
    fn catch_up(&self, c: &mut postgres::Client) -> Result<(), LogError> {
        self.head_size(c)?;
        if let Some(row) = c
            .query_opt(
                "SELECT seq, note FROM log_checkpoints ORDER BY seq DESC LIMIT 1",
                &[],
            )
            .map_err(io)?
        {
            let signed = self.open(row.get(1))?;
            self.remember(row.get::<_, i64>(0) as u64 + 1, signed);
        }
        Ok(())
    }

    /// The committed size, read from the database (and remembered).
    fn head_size(&self, c: &mut postgres::Client) -> Result<u64, LogError> {
        let size: i64 = c
            .query_one("SELECT size FROM log_head", &[])
            .map_err(io)?
            .get(0);
        let size = size as u64;
        self.size.fetch_max(size, Ordering::AcqRel);
        Ok(size)
    }

    /// One group commit of `appends`; answers each request's result. A keyed request
    /// whose claim was taken (it expired before this append, and another node took its
    /// keys) is refused, retryable, and takes no index; the rest of the group goes on.
    fn commit(&self, appends: &[(&Vec<Vec<u8>>, Option<&Claimed>)]) -> Result<Ranges, LogError> {
        let mut lost = std::collections::HashSet::new();
        loop {
            match self.commit_without(appends, &lost)? {
                Ok(ranges) => return Ok(ranges),
                // Rolled back; at most once more, as claims taken stay taken.
                Err(taken) => lost.extend(taken),
            }
        }
    }

    /// [`Shared::commit`] of the appends whose claims are not in `lost`; rolls back
    /// and answers the claims found taken when there are any.
    fn commit_without(
        &self,
        appends: &[(&Vec<Vec<u8>>, Option<&Claimed>)],
        lost: &std::collections::HashSet<i64>,
    ) -> Result<Result<Ranges, Vec<i64>>, LogError> {
        let mut c = self.pool.get().map_err(io)?;
        let mut tx = c.transaction().map_err(io)?;
        let head = tx
            .query_one("SELECT size, frontier FROM log_head FOR UPDATE", &[])
            .map_err(io)?;
        let size = head.get::<_, i64>(0) as u64;
        let mut frontier = frontier_of(size, head.get::<_, &[u8]>(1))?;
        let mut idx: Vec<i64> = Vec::new();
        let mut leaves: Vec<Vec<u8>> = Vec::new();
        let mut bytes: Vec<&[u8]> = Vec::new();
        let (mut n_level, mut n_idx, mut n_hash) = (Vec::new(), Vec::new(), Vec::new());
        let (mut claim_id, mut claim_start): (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        let mut ranges = Vec::with_capacity(appends.len());
        for (entries, claim) in appends {
            if let Some(why) = entries.iter().find_map(|e| invalid(e)) {
                ranges.push(Err(LogError::Invalid(why.to_string())));
                continue;
            }
            if entries.is_empty() {
                ranges.push(Err(LogError::Invalid("no entries".into())));
                continue;
            }
            if let Some(claim) = claim {
                if lost.contains(&claim.id) {
                    ranges.push(Err(LogError::Unavailable(format!(
                        "the claim on these entries' keys expired before they could be \
                         appended ({} s) and another node took the keys; nothing was \
                         recorded, retry",
                        self.claim_life_ms.load(Ordering::Acquire) / 1000
                    ))));
                    continue;
                }
                claim_id.push(claim.id);
                claim_start.push(frontier.size() as i64);
            }
            let start = frontier.size();
            for e in entries.iter() {
                let leaf = ciyuan_tlog::leaf_hash(e);
                idx.push(frontier.size() as i64);
                leaves.push(leaf.to_vec());
                bytes.push(e);
                frontier.push(leaf, |level, index, hash| {
                    if level >= STORED_FROM_LEVEL {
                        n_level.push(level as i16);
                        n_idx.push(index as i64);
                        n_hash.push(hash.to_vec());
                    }
                });
            }
            ranges.push(Ok(start..frontier.size()));
        }
        if !claim_id.is_empty() {
            // Confirms each claim: its keys' entries are at `start` plus their
            // position. A claim taken from this node (expired, then deleted by another
            // node's claim) is not found; one another node is about to take is locked
            // by this update until the commit, and then no longer pending.
            let confirmed: std::collections::HashSet<i64> = tx
                .query(
                    "UPDATE log_claims SET start = v.start
                     FROM unnest($1::bigint[], $2::bigint[]) AS v(id, start)
                     WHERE log_claims.id = v.id AND log_claims.start IS NULL
                     RETURNING log_claims.id",
                    &[&claim_id, &claim_start],
                )
                .map_err(io)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if confirmed.len() != claim_id.len() {
                tx.rollback().map_err(io)?;
                let taken = claim_id
                    .into_iter()
                    .filter(|id| !confirmed.contains(id))
                    .collect();
                return Ok(Err(taken));
            }
        }
        if !idx.is_empty() {
            tx.execute(
                "INSERT INTO log_entries (idx, leaf, bytes)
                 SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[])",
                &[&idx, &leaves, &bytes],
            )
            .map_err(io)?;
            if !n_level.is_empty() {
                tx.execute(
                    "INSERT INTO log_nodes (level, idx, hash)
                     SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[])",
                    &[&n_level, &n_idx, &n_hash],
                )
                .map_err(io)?;
            }
            tx.execute(
                "UPDATE log_head SET size = $1, frontier = $2",
                &[&(frontier.size() as i64), &edge_bytes(&frontier)],
            )
            .map_err(io)?;
            tx.execute(
                "SELECT pg_notify('ciyuan_log', $1)",
                &[&frontier.size().to_string()],
            )
            .map_err(io)?;
        }
        if let Err(e) = tx.commit() {
            // Only a transaction rollback (class 40) or a constraint (23) answered to
            // the COMMIT itself says it did not happen. Anything else (the connection
            // broke before the answer, the server shut down around it) may follow a
            // commit: the writer finds out before answering anyone.
            let rolled_back = e
                .as_db_error()
                .is_some_and(|db| matches!(db.code().code().get(..2), Some("40" | "23")));
            if !rolled_back && !idx.is_empty() {
                *self.doubt.lock().unwrap_or_else(|p| p.into_inner()) = Some(Doubt {
                    from: size,
                    to: frontier.size(),
                    root: frontier.root(),
                    ranges,
                });
            }
            return Err(io(e));
        }
        self.size.fetch_max(frontier.size(), Ordering::AcqRel);
        Ok(Ok(ranges))
    }

    /// Marks the log out of reach (appends are refused by [`Log::available`]).
    fn mark_down(&self, why: &str) {
        if let Ok(mut w) = self.down_why.lock() {
            why.clone_into(&mut w);
        }
        self.down.store(true, Ordering::Release);
    }

    /// Marks the log reachable again, unless the writer is settling a doubt; answers
    /// whether it was down.
    fn mark_up(&self) -> bool {
        !self.settling.load(Ordering::Acquire) && self.down.swap(false, Ordering::AcqRel)
    }

    /// Whether the group of `doubt` committed, read under the head lock, so the
    /// interrupted transaction (if the server still runs it) has finished first: the
    /// head only grows, so below `doubt.to` it did not; at or past it, it did exactly
    /// when the tree of `doubt.to` entries has the root it would have made (another
    /// node's entries at those indices make another root).
    fn settled(&self, doubt: &Doubt) -> Result<bool, LogError> {
        let mut c = self.pool.get().map_err(io)?;
        let mut tx = c.transaction().map_err(io)?;
        // A transaction cut off by a network fault keeps the head locked until the
        // server notices; ask again rather than wait on it.
        tx.batch_execute("SET LOCAL lock_timeout = '2s'")
            .map_err(io)?;
        let size = tx
            .query_one("SELECT size FROM log_head FOR UPDATE", &[])
            .map_err(io)?
            .get::<_, i64>(0) as u64;
        if size < doubt.to {
            return Ok(false);
        }
        let src = Nodes(std::cell::RefCell::new(&mut tx));
        let root = ciyuan_tlog::root(&src, doubt.to)?;
        tx.commit().map_err(io)?;
        Ok(root == doubt.root)
    }

    /// Signs a checkpoint of the committed head unless the latest covers it.
    fn checkpoint(&self) -> Result<SignedCheckpoint, LogError> {
        let mut c = self.pool.get().map_err(io)?;
        let mut tx = c.transaction().map_err(io)?;
        let head = tx
            .query_one("SELECT size, frontier FROM log_head FOR UPDATE", &[])
            .map_err(io)?;
        let size = head.get::<_, i64>(0) as u64;
        let frontier = frontier_of(size, head.get::<_, &[u8]>(1))?;
        let last = tx
            .query_opt(
                "SELECT seq, note FROM log_checkpoints ORDER BY seq DESC LIMIT 1",
                &[],
            )
            .map_err(io)?;
        let seq = match &last {
            Some(row) => {
                let note: String = row.get(1);
                let signed = self.open(note)?;
                if signed.checkpoint.size == size {
                    tx.commit().map_err(io)?;
                    self.remember(row.get::<_, i64>(0) as u64 + 1, signed.clone());
                    return Ok(signed);
                }
                row.get::<_, i64>(0) + 1
            }
            None => 0,
        };
        let signer = self.signer.as_ref().ok_or_else(|| {
            LogError::Unavailable("this node reads the log only: it holds no signing key".into())
        })?;
        let checkpoint = Checkpoint {
            origin: signer.name().to_string(),
            size,
            root: frontier.root(),
            extensions: vec![],
        };
        let note = signer.sign(&checkpoint.to_text()).map_err(io)?;
        tx.execute(
            "INSERT INTO log_checkpoints (seq, size, note) VALUES ($1, $2, $3)",
            &[&seq, &(size as i64), &note],
        )
        .map_err(io)?;
        tx.commit().map_err(io)?;
        let signed = SignedCheckpoint { checkpoint, note };
        self.remember(seq as u64 + 1, signed.clone());
        Ok(signed)
    }

    fn remember(&self, count: u64, latest: SignedCheckpoint) {
        if let Ok(mut l) = self.latest.lock()
            && l.as_ref()
                .is_none_or(|old| old.checkpoint.size <= latest.checkpoint.size)
        {
            *l = Some(latest);
        }
        self.checkpoints.fetch_max(count, Ordering::AcqRel);
    }

    /// A stored note, checked against this log's signer.
    fn open(&self, note: String) -> Result<SignedCheckpoint, LogError> {
        let checkpoint =
            ciyuan_tlog::open_checkpoint(&self.verifier, &note, Some(self.verifier.name()))
                .map_err(|e| LogError::Io(format!("a stored checkpoint does not verify: {e}")))?;
        Ok(SignedCheckpoint { checkpoint, note })
    }
}

/// Answers each request of a group committed as `ranges`.
fn answer(
    appends: Vec<(Vec<Vec<u8>>, Option<Claimed>, AppendDone)>,
    ranges: Vec<Result<Range<u64>, LogError>>,
) {
    for ((_, _, done), range) in appends.into_iter().zip(ranges) {
        done(range);
    }
}

/// Answers each request of a group that was not committed with the error `e`, after
/// giving up its claims.
fn fail(
    shared: &Shared,
    appends: Vec<(Vec<Vec<u8>>, Option<Claimed>, AppendDone)>,
    e: impl Fn() -> LogError,
) {
    shared.release(
        &appends
            .iter()
            .filter_map(|a| a.1.as_ref())
            .collect::<Vec<_>>(),
    );
    for (_, _, done) in appends {
        done(Err(e()));
    }
}

/// Refuses a job that arrived while the writer cannot reach PostgreSQL: it was never
/// tried, so it is certainly not in the log and its caller may retry it.
fn refuse(shared: &Shared, job: Ready, why: &str) {
    let e = || {
        LogError::Unavailable(format!(
            "PostgreSQL is out of reach ({why}); nothing was recorded, retry"
        ))
    };
    match job {
        Ready::Append(entries, claim, done) => fail(shared, vec![(entries, claim, done)], e),
        Ready::Checkpoint(done) => done(Err(e())),
    }
}

/// Finds out whether the group of `doubt` committed, however long PostgreSQL stays
/// out of reach: nobody may be told an entry failed while it may be in the log (a
/// retry would record it twice), nor that it is in when it may not be. Jobs that
/// arrive meanwhile are refused at once (retryable), not kept waiting. `None` when
/// the log is closing before the answer could be found.
fn settle(
    shared: &Shared,
    doubt: &Doubt,
    jobs: &mpsc::Receiver<Ready>,
    stop: &AtomicBool,
) -> Option<bool> {
    let mut backoff = Backoff::default();
    loop {
        match shared.settled(doubt) {
            Ok(committed) => {
                tracing::warn!(
                    entries = doubt.to - doubt.from,
                    committed,
                    "the outcome of an interrupted commit to PostgreSQL is known"
                );
                return Some(committed);
            }
            Err(e) => {
                shared.mark_down(&e.to_string());
                tracing::warn!(error = %e, "cannot yet learn whether an interrupted commit happened");
            }
        }
        if stop.load(Ordering::Acquire) {
            return None;
        }
        let until = std::time::Instant::now() + backoff.next();
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match jobs.recv_timeout(left) {
                Ok(job) => refuse(shared, job, "a commit's outcome is being settled"),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                // Closing: settle what is in doubt all the same (bounded by `stop`).
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(left),
            }
        }
    }
}

/// How soon a request waiting on another append's claim first looks again, and the
/// longest pause between looks.
const WAIT_FIRST: std::time::Duration = std::time::Duration::from_millis(2);
const WAIT_MOST: std::time::Duration = std::time::Duration::from_millis(100);
/// How soon the claimer tries again to give up claims it could not.
const RELEASE_AGAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// Claims the keys of keyed appends, a group of waiting requests at a time, and hands
/// every request to the writer in the order it came: while the writer appends one
/// group, the next group's keys are claimed.
fn claimer(shared: Arc<Shared>, jobs: mpsc::Receiver<Job>, ready: mpsc::Sender<Ready>) {
    let mut waiting: Vec<Waiting> = Vec::new();
    let mut left = false;
    loop {
        let retry_release = left.then(|| std::time::Instant::now() + RELEASE_AGAIN);
        let first = match waiting.iter().map(|w| w.next).chain(retry_release).min() {
            None => match jobs.recv() {
                Ok(j) => Some(j),
                Err(_) => break,
            },
            Some(next) => {
                let left = next.saturating_duration_since(std::time::Instant::now());
                match jobs.recv_timeout(left) {
                    Ok(j) => Some(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let mut group: Vec<Job> = first.into_iter().collect();
        while !group.is_empty() && group.len() < MAX_GROUP_REQUESTS {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        if left || !group.is_empty() {
            left = shared.release_left();
        }
        if !group.is_empty() {
            claim_group(&shared, group, &ready, &mut waiting);
        }
        look_again(&shared, &mut waiting);
        left = left
            || !shared
                .unreleased
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
    }
    for w in waiting {
        (w.done)(Err(LogError::Unavailable(
            "the log closed while these entries' keys were being recorded by another \
             append; nothing was recorded here, retry"
                .into(),
        )));
    }
}

/// Why a keyed append's keys cannot be claimed, before any is: a key twice.
fn twice(keys: &[Option<EntryKey>]) -> Option<LogError> {
    let mut seen = std::collections::HashSet::new();
    keyed(keys)
        .find(|(_, k)| !seen.insert(*k))
        .map(|(pos, _)| LogError::Invalid(format!("entry {pos} repeats an earlier entry's key")))
}

/// Claims the keys of the keyed appends of `group` and passes the group on in order.
fn claim_group(
    shared: &Shared,
    group: Vec<Job>,
    ready: &mpsc::Sender<Ready>,
    waiting: &mut Vec<Waiting>,
) {
    // Refused before claiming: nothing to give up.
    let mut group: Vec<Option<Job>> = group
        .into_iter()
        .filter_map(|j| match j {
            Job::Append(entries, Some(keys), done) => {
                let why = entries
                    .iter()
                    .find_map(|e| invalid(e).map(|w| LogError::Invalid(w.to_string())))
                    .or_else(|| {
                        entries
                            .is_empty()
                            .then(|| LogError::Invalid("no entries".into()))
                    })
                    .or_else(|| twice(&keys));
                match why {
                    Some(e) => {
                        done(Err(e));
                        None
                    }
                    None => Some(Some(Job::Append(entries, Some(keys), done))),
                }
            }
            j => Some(Some(j)),
        })
        .collect();
    let mut outcomes: HashMap<usize, Claim> = HashMap::new();
    for _round in 0..3 {
        let asked: Vec<(usize, &[Option<EntryKey>])> = group
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(outcomes.get(i), None | Some(Claim::Again)))
            .filter_map(|(i, j)| match j {
                Some(Job::Append(_, Some(keys), _)) if keys.iter().any(Option::is_some) => {
                    Some((i, keys.as_slice()))
                }
                _ => None,
            })
            .collect();
        if asked.is_empty() {
            break;
        }
        let keys: Vec<&[Option<EntryKey>]> = asked.iter().map(|a| a.1).collect();
        let claimed = shared.claim(&keys);
        let asked: Vec<usize> = asked.into_iter().map(|a| a.0).collect();
        match claimed {
            Ok(claims) => {
                for (i, claim) in asked.into_iter().zip(claims) {
                    outcomes.insert(i, claim);
                }
            }
            Err(e) => {
                if e.is_retryable() {
                    shared.pool.flush();
                }
                tracing::warn!(error = %e, "claiming entry keys in PostgreSQL failed");
                for i in asked {
                    if let Some(Job::Append(_, _, done)) = group[i].take() {
                        done(Err(e.clone()));
                    }
                }
                break;
            }
        }
    }
    for (i, job) in group.into_iter().enumerate() {
        let Some(job) = job else { continue };
        let next = match job {
            Job::Checkpoint(done) => Ready::Checkpoint(done),
            Job::Append(entries, None, done) => Ready::Append(entries, None, done),
            Job::Append(entries, Some(keys), done) => match outcomes.remove(&i) {
                // No key at all among them: nothing to claim.
                None => Ready::Append(entries, None, done),
                Some(Claim::Held(claimed)) => Ready::Append(entries, Some(claimed), done),
                Some(Claim::Taken(taken)) => {
                    done(Err(LogError::Duplicate(taken)));
                    continue;
                }
                Some(Claim::Pending) => {
                    let now = std::time::Instant::now();
                    let life = shared.claim_life_ms.load(Ordering::Acquire);
                    waiting.push(Waiting {
                        keys,
                        done,
                        next: now + WAIT_FIRST,
                        pause: WAIT_FIRST,
                        until: now + std::time::Duration::from_millis(life) * 2,
                    });
                    continue;
                }
                Some(Claim::Again) => {
                    done(Err(LogError::Unavailable(
                        "these entries' keys were held by claims that expired, and could \
                         not be claimed in three tries; nothing was recorded, retry"
                            .into(),
                    )));
                    continue;
                }
            },
        };
        if let Err(mpsc::SendError(job)) = ready.send(next) {
            let e = || LogError::Unavailable("the log's writer stopped".into());
            match job {
                Ready::Append(entries, claim, done) => {
                    fail(shared, vec![(entries, claim, done)], e)
                }
                Ready::Checkpoint(done) => done(Err(e())),
            }
        }
    }
}

/// Looks again at the requests waiting whose time came: a request whose keys another
/// append confirmed is answered with its entries; one whose keys nobody holds any more
/// (that append failed, or its node died and its claim expired) is refused, to be sent
/// again: appended now it would land after requests sent after it.
fn look_again(shared: &Shared, waiting: &mut Vec<Waiting>) {
    let now = std::time::Instant::now();
    let mut i = 0;
    while i < waiting.len() {
        if waiting[i].next > now {
            i += 1;
            continue;
        }
        let w = &mut waiting[i];
        let outcome = match shared.awaited(&w.keys) {
            Ok(Some(taken)) if !taken.is_empty() => Some(Err(LogError::Duplicate(taken))),
            Ok(Some(_)) => Some(Err(LogError::Unavailable(
                "another append was recording these entries' keys and did not; nothing \
                 was recorded, retry"
                    .into(),
            ))),
            Ok(None) if now >= w.until => Some(Err(LogError::Unavailable(
                "another append has held these entries' keys for too long; nothing was \
                 recorded, retry"
                    .into(),
            ))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
        match outcome {
            Some(result) => {
                let w = waiting.swap_remove(i);
                (w.done)(result);
            }
            None => {
                w.pause = (w.pause * 2).min(WAIT_MOST);
                w.next = now + w.pause;
                i += 1;
            }
        }
    }
}

fn writer(shared: Arc<Shared>, jobs: mpsc::Receiver<Ready>, stop: Arc<AtomicBool>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP_REQUESTS {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let mut appends = Vec::new();
        let mut checkpoints = Vec::new();
        for j in group {
            match j {
                Ready::Append(entries, claim, done) => appends.push((entries, claim, done)),
                Ready::Checkpoint(done) => checkpoints.push(done),
            }
        }
        if !appends.is_empty() {
            let refs: Vec<(&Vec<Vec<u8>>, Option<&Claimed>)> =
                appends.iter().map(|(e, c, _)| (e, c.as_ref())).collect();
            let committed = shared.commit(&refs);
            // A poisoned lock still holds a valid doubt (one assignment, nothing else).
            let doubt = shared
                .doubt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match (committed, doubt) {
                (Ok(ranges), _) => {
                    shared.mark_up();
                    // A request refused in the group (an invalid entry) gives up its
                    // claim; one whose claim was taken has none left.
                    let unused: Vec<&Claimed> = appends
                        .iter()
                        .zip(&ranges)
                        .filter(|(_, r)| matches!(r, Err(LogError::Invalid(_))))
                        .filter_map(|(a, _)| a.1.as_ref())
                        .collect();
                    shared.release(&unused);
                    answer(appends, ranges);
                }
                (Err(e), Some(doubt)) => {
                    shared.mark_down(&e.to_string());
                    shared.pool.flush();
                    tracing::warn!(error = %e, "the answer to a commit to PostgreSQL was lost");
                    shared.settling.store(true, Ordering::Release);
                    let settled = settle(&shared, &doubt, &jobs, &stop);
                    shared.settling.store(false, Ordering::Release);
                    match settled {
                        Some(true) => {
                            shared.size.fetch_max(doubt.to, Ordering::AcqRel);
                            shared.mark_up();
                            answer(appends, doubt.ranges);
                        }
                        Some(false) => {
                            shared.mark_up();
                            fail(&shared, appends, || {
                                LogError::Unavailable(format!(
                                    "the answer to an append's commit was lost ({e}) and PostgreSQL did not commit it; nothing was recorded, retry"
                                ))
                            });
                        }
                        None => {
                            // Not known whether they committed: their claims stay, to
                            // be confirmed or to expire.
                            for (_, _, done) in appends {
                                done(Err(LogError::Io(format!(
                                    "the node stopped before it could learn whether an interrupted append to PostgreSQL committed ({e}); look the entries up before sending them again"
                                ))));
                            }
                        }
                    }
                }
                (Err(e), None) => {
                    if e.is_retryable() {
                        shared.mark_down(&e.to_string());
                        shared.pool.flush();
                    }
                    tracing::warn!(error = %e, "an append to PostgreSQL failed");
                    fail(&shared, appends, || e.clone());
                }
            }
        }
        // After the appends of the same group: a checkpoint asked after an append
        // covers it.
        for done in checkpoints {
            done(shared.checkpoint());
        }
    }
}

impl PgLog {
    /// Opens the log of the database `pool` connects to, creating it (empty, signed by
    /// `signer`) when it is new. A log signed by another key is refused.
    pub fn open(pool: Pool, signer: NoteSigner) -> Result<PgLog, LogError> {
        crate::off_runtime(|| PgLog::open_here(pool, Some(signer)))
    }

    /// Opens an existing log to read and verify it (an auditor's view): no signing
    /// key, checkpoints checked against the verifier key the log recorded at its
    /// creation; appends and signing are refused.
    pub fn open_reader(pool: Pool) -> Result<PgLog, LogError> {
        crate::off_runtime(|| PgLog::open_here(pool, None))
    }

    fn open_here(pool: Pool, signer: Option<NoteSigner>) -> Result<PgLog, LogError> {
        let mut c = pool.get().map_err(io)?;
        if let Some(signer) = &signer {
            crate::migrate(&mut c).map_err(io)?;
            c.execute(
                "INSERT INTO log_head (size, frontier, signer) VALUES (0, '', $1)
                 ON CONFLICT DO NOTHING",
                &[&signer.verifier_key()],
            )
            .map_err(io)?;
        }
        let row = c
            .query_opt("SELECT size, signer FROM log_head", &[])
            .map_err(io)?
            .ok_or_else(|| LogError::Invalid("this database holds no Ciyuan log".into()))?;
        let recorded: String = row.get(1);
        if let Some(signer) = &signer
            && recorded != signer.verifier_key()
        {
            return Err(LogError::Invalid(format!(
                "the log in this database is signed by {recorded}, not by this node's key {}",
                signer.verifier_key()
            )));
        }
        let verifier = ciyuan_tlog::NoteVerifier::from_vkey(&recorded)
            .map_err(|e| LogError::Io(format!("the log's recorded verifier key: {e}")))?;
        let size = row.get::<_, i64>(0) as u64;
        let shared = Arc::new(Shared {
            pool: pool.clone(),
            signer,
            verifier,
            size: AtomicU64::new(size),
            latest: Mutex::new(None),
            checkpoints: AtomicU64::new(0),
            down: AtomicBool::new(false),
            down_why: Mutex::new(String::new()),
            doubt: Mutex::new(None),
            settling: AtomicBool::new(false),
            claim_life_ms: AtomicU64::new(CLAIM_LIFE.as_millis() as u64),
            unreleased: Mutex::new(Vec::new()),
        });
        shared.catch_up(&mut c)?;
        drop(c);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if shared.signer.is_none() {
            // A reader: nothing to write with, nobody to follow.
            return Ok(PgLog {
                shared,
                writer: Mutex::new(None),
                threads: Mutex::new(Vec::new()),
                stop,
            });
        }
        let (tx, rx) = mpsc::channel();
        let (ready, ready_rx) = mpsc::channel();
        let (s, halt) = (shared.clone(), stop.clone());
        let writer_thread = std::thread::Builder::new()
            .name("ciyuan-pg-log".into())
            .spawn(move || writer(s, ready_rx, halt))
            .map_err(io)?;
        let s = shared.clone();
        let claimer_thread = std::thread::Builder::new()
            .name("ciyuan-pg-claim".into())
            .spawn(move || claimer(s, rx, ready))
            .map_err(io)?;
        let thread = vec![claimer_thread, writer_thread];
        let (s, halt) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("ciyuan-pg-follow".into())
            .spawn(move || follow(s, halt))
            .map_err(io)?;
        Ok(PgLog {
            shared,
            writer: Mutex::new(Some(tx)),
            threads: Mutex::new(thread),
            stop,
        })
    }

    fn send(&self, job: Job) -> Result<(), LogError> {
        let w = self
            .writer
            .lock()
            .map_err(|_| LogError::Unavailable("the writer's lock is poisoned".into()))?;
        w.as_ref()
            .ok_or_else(|| LogError::Unavailable("the log is closed".into()))?
            .send(job)
            .map_err(|_| LogError::Unavailable("the log's writer stopped".into()))
    }

    /// Records checkpoints signed elsewhere over this log's entries (a log copied in
    /// from an embedded ledger keeps its history of signatures): each must verify with
    /// the log's key, name a size the log has, with the root the log has there, and
    /// come after the last one recorded. Answers how many were recorded.
    pub fn import_checkpoints(&self, notes: &[String]) -> Result<u64, LogError> {
        crate::off_runtime(|| {
            let mut c = self.shared.pool.get().map_err(io)?;
            let mut tx = c.transaction().map_err(io)?;
            let head = tx
                .query_one("SELECT size FROM log_head FOR UPDATE", &[])
                .map_err(io)?;
            let size = head.get::<_, i64>(0) as u64;
            let last = tx
                .query_opt(
                    "SELECT seq, size FROM log_checkpoints ORDER BY seq DESC LIMIT 1",
                    &[],
                )
                .map_err(io)?;
            let (mut seq, mut at) = match last {
                Some(r) => (r.get::<_, i64>(0) + 1, r.get::<_, i64>(1) as u64),
                None => (0, 0),
            };
            let mut recorded = None;
            for note in notes {
                let signed = self.shared.open(note.clone())?;
                let cp = &signed.checkpoint;
                if cp.size > size || (seq > 0 && cp.size < at) {
                    return Err(LogError::Invalid(format!(
                        "a checkpoint of size {} does not fit a log of {size} entries after one of {at}",
                        cp.size
                    )));
                }
                let src = Nodes(std::cell::RefCell::new(&mut tx));
                let root = ciyuan_tlog::root(&src, cp.size)?;
                if root != cp.root {
                    return Err(LogError::Invalid(format!(
                        "the checkpoint of size {} signs another root than the log's",
                        cp.size
                    )));
                }
                tx.execute(
                    "INSERT INTO log_checkpoints (seq, size, note) VALUES ($1, $2, $3)",
                    &[&seq, &(cp.size as i64), note],
                )
                .map_err(io)?;
                recorded = Some((seq as u64 + 1, signed.clone()));
                seq += 1;
                at = cp.size;
            }
            tx.commit().map_err(io)?;
            if let Some((count, latest)) = recorded {
                self.shared.remember(count, latest);
            }
            Ok(notes.len() as u64)
        })
    }

    /// Reads the committed size from the database: entries other nodes appended
    /// become visible to `size()`.
    pub fn refresh(&self) -> Result<u64, LogError> {
        crate::off_runtime(|| {
            let mut c = self.shared.pool.get().map_err(io)?;
            self.shared.head_size(&mut c)
        })
    }

    /// Sets how long this node's claims on entry keys hold ([`CLAIM_LIFE`] unless
    /// set): tests shorten it to see a claim expire.
    #[cfg(feature = "testing")]
    pub fn set_claim_life(&self, life: std::time::Duration) {
        self.shared
            .claim_life_ms
            .store(life.as_millis() as u64, Ordering::Release);
    }

    /// Stops the writer after the requests already queued.
    pub fn close(&self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Ok(mut t) = self.threads.lock() {
            for t in t.drain(..) {
                if t.join().is_err() {
                    tracing::error!("the PostgreSQL log's claimer or writer panicked");
                }
            }
        }
    }

    fn check_size(&self, c: &mut postgres::Client, size: u64) -> Result<(), LogError> {
        let durable = self.shared.head_size(c)?;
        if size > durable {
            return Err(LogError::Invalid(format!(
                "tree size {size} is past the log's {durable} entries"
            )));
        }
        Ok(())
    }
}

impl Drop for PgLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl Log for PgLog {
    fn append(&self, entries: Vec<Vec<u8>>, done: AppendDone) -> Result<(), LogError> {
        self.send(Job::Append(entries, None, done))
    }

    fn append_keyed(
        &self,
        entries: Vec<Vec<u8>>,
        keys: Vec<Option<EntryKey>>,
        done: AppendDone,
    ) -> Result<(), LogError> {
        if keys.len() != entries.len() {
            return Err(LogError::Invalid(format!(
                "{} keys for {} entries",
                keys.len(),
                entries.len()
            )));
        }
        self.send(Job::Append(entries, Some(keys), done))
    }

    fn keeps_keys(&self) -> bool {
        true
    }

    fn find_keys(&self, keys: &[EntryKey]) -> Result<Vec<Option<u64>>, LogError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        crate::off_runtime(|| {
            let mut c = self.shared.pool.get().map_err(io)?;
            let wanted: Vec<&[u8]> = keys.iter().map(stored).collect();
            // Only keys whose entries are in the log: a pending claim holds none yet.
            let held = holders(&mut *c, &wanted)?;
            Ok(keys
                .iter()
                .map(|k| match held.get(stored(k)) {
                    Some((_, Holder::Entry(idx))) => Some(*idx),
                    _ => None,
                })
                .collect())
        })
    }

    fn checkpoint(&self, done: CheckpointDone) -> Result<(), LogError> {
        self.send(Job::Checkpoint(done))
    }

    fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    fn entry(&self, index: u64) -> Result<Vec<u8>, LogError> {
        crate::off_runtime(|| {
            let i =
                i64::try_from(index).map_err(|_| LogError::Invalid(format!("no entry {index}")))?;
            let mut c = self.shared.pool.get().map_err(io)?;
            c.query_opt("SELECT bytes FROM log_entries WHERE idx = $1", &[&i])
                .map_err(io)?
                .map(|r| r.get::<_, Vec<u8>>(0))
                .ok_or_else(|| LogError::Invalid(format!("no entry {index}")))
        })
    }

    fn scan(&self, range: Range<u64>, f: &mut ScanFn<'_>) -> Result<(), LogError> {
        crate::off_runtime(|| {
            if range.start >= range.end {
                return Ok(());
            }
            let mut c = self.shared.pool.get().map_err(io)?;
            let durable = self.shared.head_size(&mut c)?;
            if range.end > durable {
                return Err(LogError::Invalid(format!(
                    "scan to {} is past the log's {durable} entries",
                    range.end
                )));
            }
            let mut at = range.start as i64;
            let end = range.end as i64;
            while at < end {
                let upto = (at + SCAN_CHUNK).min(end);
                let rows = c
                    .query(
                        "SELECT idx, leaf, bytes FROM log_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                        &[&at, &upto],
                    )
                    .map_err(io)?;
                if rows.len() as i64 != upto - at {
                    return Err(LogError::Io(format!(
                        "entries {at}..{upto} are not all stored ({} found)",
                        rows.len()
                    )));
                }
                for r in rows {
                    let (idx, bytes) = (r.get::<_, i64>(0) as u64, r.get::<_, &[u8]>(2));
                    // Every read checks the entry against the leaf hash stored with it
                    // when it was appended (as the file ledger checks each record's
                    // CRC): bytes changed behind the server's back are named here, at
                    // the entry, not later as a checkpoint whose root no longer holds.
                    if ciyuan_tlog::leaf_hash(bytes).as_slice() != r.get::<_, &[u8]>(1) {
                        return Err(LogError::Invalid(format!(
                            "entry {idx} does not hash to the leaf stored with it: its bytes \
                             were changed after it was appended"
                        )));
                    }
                    f(idx, bytes)?;
                }
                at = upto;
            }
            Ok(())
        })
    }

    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LogError> {
        crate::off_runtime(|| {
            if index >= size {
                return Err(LogError::Invalid(format!(
                    "entry {index} is not in a tree of {size}"
                )));
            }
            let mut c = self.shared.pool.get().map_err(io)?;
            self.check_size(&mut c, size)?;
            let src = Nodes(std::cell::RefCell::new(&mut *c));
            ciyuan_tlog::inclusion_proof(&src, index, size)
                .map_err(|e| LogError::Invalid(format!("{e:?}")))
        })
    }

    fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, LogError> {
        crate::off_runtime(|| {
            if old_size > new_size {
                return Err(LogError::Invalid(format!(
                    "old size {old_size} is above the new {new_size}"
                )));
            }
            let mut c = self.shared.pool.get().map_err(io)?;
            self.check_size(&mut c, new_size)?;
            let src = Nodes(std::cell::RefCell::new(&mut *c));
            ciyuan_tlog::consistency_proof(&src, old_size, new_size)
                .map_err(|e| LogError::Invalid(format!("{e:?}")))
        })
    }

    fn root_at(&self, size: u64) -> Result<Hash, LogError> {
        crate::off_runtime(|| {
            let mut c = self.shared.pool.get().map_err(io)?;
            self.check_size(&mut c, size)?;
            let src = Nodes(std::cell::RefCell::new(&mut *c));
            ciyuan_tlog::root(&src, size)
        })
    }

    fn latest_checkpoint(&self) -> Option<SignedCheckpoint> {
        self.shared.latest.lock().ok().and_then(|l| l.clone())
    }

    fn checkpoint_count(&self) -> u64 {
        self.shared.checkpoints.load(Ordering::Acquire)
    }

    fn checkpoints(&self, from: u64, limit: usize) -> Result<Vec<SignedCheckpoint>, LogError> {
        crate::off_runtime(|| {
            let (Ok(from), Ok(limit)) = (i64::try_from(from), i64::try_from(limit)) else {
                return Ok(Vec::new());
            };
            let mut c = self.shared.pool.get().map_err(io)?;
            c.query(
                "SELECT note FROM log_checkpoints WHERE seq >= $1 ORDER BY seq LIMIT $2",
                &[&from, &limit],
            )
            .map_err(io)?
            .into_iter()
            .map(|r| self.shared.open(r.get(0)))
            .collect()
        })
    }

    fn verifier_key(&self) -> String {
        self.shared.verifier.verifier_key()
    }

    fn available(&self) -> Result<(), LogError> {
        if !self.shared.down.load(Ordering::Acquire) {
            return Ok(());
        }
        let why = self
            .shared
            .down_why
            .lock()
            .map_or_else(|_| "the reason's lock is poisoned".into(), |w| w.clone());
        Err(LogError::Unavailable(format!(
            "the ledger's database is out of reach ({why})"
        )))
    }
}
