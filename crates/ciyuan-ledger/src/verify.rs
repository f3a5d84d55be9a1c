//! Offline verification of a ledger directory or an audit bundle, from the bytes alone.
//!
//! Strict by design: every byte must be accounted for, and the first thing that is
//! wrong is named with its file (and entry and offset where there is one). A ledger
//! left by a crash is repaired by opening it once (`ciyuan serve` or `ciyuan rebuild`),
//! never by the verifier, which only judges. Two leftovers of a crash are *not* damage
//! and are accepted in a ledger directory, because nothing ever vouched for them:
//!
//! - the sidecar (`leaves`) may lack entries of the **last** segment (it is synced only
//!   when a segment is sealed and on clean close), even a final partial entry, or run
//!   past its records (a group's sidecar entries are written before the group is
//!   synced); every sidecar byte that lies beside a record must still match it;
//! - the last segment may end in a torn write, as judged by the format's rule that
//!   recovery applies too (`format::judge_torn_tail`): a record cut short or
//!   failing its checksum, no valid record after it, no more bytes than a writer can
//!   have unsynced, and no signed checkpoint covering it. It is reported in
//!   [`VerifyReport::torn_tail_bytes`].
//!
//! Speed: SHA-256 is most of the work, so the leaves of each chunk of records are
//! hashed on two threads (the target machine has two cores), and the tree (one node
//! hash per leaf, in order) is built on a third thread while the next chunk is read,
//! framed and hashed. Framing, checksums and the sidecar or hex comparison are cheap
//! and stay in order. Checkpoint roots and the nodes of the consistency proofs between
//! consecutive checkpoints are captured as the leaves stream past, so nothing is read
//! twice and memory stays small.

use crate::bundle::{
    CHECKPOINTS_DIR, ENTRIES_FILE, LEAF_HASHES_FILE, PUBLIC_KEY_FILE, README, README_FILE,
};
use crate::format::*;
use crate::keys;
use ciyuan_tlog::{Checkpoint, Frontier, Hash, NodeSource, NoteVerifier, leaf_hash};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints whose signature, root and consistency with the previous one were
    /// checked.
    pub checkpoints: u64,
    /// Tree size of [`VerifyReport::root`]: all entries.
    pub size: u64,
    /// Root of all entries.
    pub root: Hash,
    /// Tree size of the newest signed checkpoint (0 without one).
    pub signed_size: u64,
    /// Entries of the last segment the sidecar does not hold yet (a ledger directory
    /// after a crash, before it was opened again); 0 for a bundle.
    pub sidecar_missing: u64,
    /// Bytes of a torn final write at the end of the last segment; 0 for a bundle.
    pub torn_tail_bytes: u64,
    /// Seconds taken.
    pub seconds: f64,
}

/// The first thing that failed, naming the file and, where it applies, the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VerifyFailure(pub String);

fn fail<T>(msg: impl Into<String>) -> Result<T, VerifyFailure> {
    Err(VerifyFailure(msg.into()))
}

/// Verifies a ledger directory (it has `segments/`) or a bundle (it has
/// `entries.jsonl`).
pub fn verify_path(path: &Path) -> Result<VerifyReport, VerifyFailure> {
    verify_path_with_progress(path, &mut |_| {})
}

/// [`verify_path`], calling `progress` with the number of entries checked so far after
/// every chunk of entries (a few thousand at a time).
pub fn verify_path_with_progress(
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, VerifyFailure> {
    let started = Instant::now();
    let mut report = if path.join("segments").is_dir() {
        verify_ledger(path, progress)?
    } else if path.join(ENTRIES_FILE).is_file() {
        verify_bundle(path, progress)?
    } else {
        return fail(format!(
            "{} is neither a ledger directory (segments/) nor an audit bundle ({ENTRIES_FILE})",
            path.display()
        ));
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

// ---------------------------------------------------------------------------------
// Keys and checkpoints

/// Reads `public.key`: exactly one canonical verifier key line and a newline.
fn read_verifier(path: &Path) -> Result<(NoteVerifier, String), VerifyFailure> {
    let text = std::fs::read_to_string(path.join(PUBLIC_KEY_FILE))
        .map_err(|e| VerifyFailure(format!("{PUBLIC_KEY_FILE}: {e}")))?;
    let Some(line) = text.strip_suffix('\n') else {
        return fail(format!(
            "{PUBLIC_KEY_FILE}: must be one line ending in a newline"
        ));
    };
    if line.contains('\n') {
        return fail(format!("{PUBLIC_KEY_FILE}: more than one line"));
    }
    let v = NoteVerifier::from_vkey(line)
        .map_err(|e| VerifyFailure(format!("{PUBLIC_KEY_FILE}: {e}")))?;
    // The parser accepts upper-case hex in the key id; only the canonical spelling is
    // what this ledger writes, so any other byte is a change to the file.
    let id = line.split('+').nth(1).unwrap_or_default();
    if id != format!("{:08x}", v.key_id()) {
        return fail(format!(
            "{PUBLIC_KEY_FILE}: key id is not in canonical lower-case hex"
        ));
    }
    Ok((v, line.to_string()))
}

/// Checks `signing.key`, when present, against the verifier key.
fn check_signing_key(dir: &Path, vkey: &str) -> Result<(), VerifyFailure> {
    let name = keys::SIGNING_KEY_FILE;
    let path = dir.join(name);
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| VerifyFailure(format!("{name}: {e}")))?;
    let signer =
        keys::parse_signing_key(&text).map_err(|e| VerifyFailure(format!("{name}: {e}")))?;
    if !text.ends_with('\n') || text.matches('\n').count() != 1 {
        return fail(format!("{name}: must be one line ending in a newline"));
    }
    if signer.verifier_key() != vkey {
        return fail(format!("{name} does not match {PUBLIC_KEY_FILE}"));
    }
    Ok(())
}

fn open_note(verifier: &NoteVerifier, name: &str, note: &str) -> Result<Checkpoint, VerifyFailure> {
    ciyuan_tlog::open_checkpoint(verifier, note, Some(verifier.name()))
        .map_err(|e| VerifyFailure(format!("{name}: {e} (checked with {PUBLIC_KEY_FILE})")))
}

/// A signed checkpoint and where it came from, for messages.
struct Signed {
    name: String,
    checkpoint: Checkpoint,
}

/// Records which nodes a proof asks for, without knowing any hash.
struct Recorder(RefCell<Vec<(u32, u64)>>);

impl NodeSource for Recorder {
    type Error = std::convert::Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        self.0.borrow_mut().push((level, index));
        Ok([0; 32])
    }
}

/// Nodes captured while the leaves streamed past.
struct Captured<'a>(&'a HashMap<(u32, u64), Hash>);

impl NodeSource for Captured<'_> {
    type Error = String;
    fn node(&self, level: u32, index: u64) -> Result<Hash, String> {
        self.0
            .get(&(level, index))
            .copied()
            .ok_or_else(|| format!("node at level {level}, index {index} was not captured"))
    }
}

/// Where the checkpoints come from, oldest first: read a batch at a time, so memory
/// does not grow with their number (millions, after a few years).
trait CheckpointSource: Send {
    /// Appends the next few checkpoints to `out`, strictly growing in size; none at the
    /// end.
    fn next_batch(&mut self, out: &mut VecDeque<Signed>) -> Result<(), VerifyFailure>;
}

/// Checkpoints read per batch.
const CHECKPOINT_BATCH: usize = 1024;

/// Builds the tree from leaves in order and checks each checkpoint as the tree reaches
/// its size: its root, and a consistency proof from the previous one, made of nodes
/// taken from the frontier (the old tree's part, see `Frontier::nodes`) or captured as
/// the leaves stream past. Memory holds one batch of checkpoints and one proof's nodes.
struct TreeCheck {
    frontier: Frontier,
    source: Box<dyn CheckpointSource>,
    /// Checkpoints read and not yet reached, oldest first.
    pending: VecDeque<Signed>,
    source_done: bool,
    /// The last checkpoint checked.
    prev: Option<Signed>,
    checked: u64,
    /// Nodes of the proof from `prev` to `pending[0]` that complete after `prev`, by
    /// the tree size at which each is complete.
    needed: Vec<(u64, u32, u64)>,
    next_need: usize,
    nodes: HashMap<(u32, u64), Hash>,
    /// The first failure; the leaves after it are not looked at.
    failure: Option<VerifyFailure>,
}

impl TreeCheck {
    fn new(source: Box<dyn CheckpointSource>) -> TreeCheck {
        let mut t = TreeCheck {
            frontier: Frontier::new(),
            source,
            pending: VecDeque::new(),
            source_done: false,
            prev: None,
            checked: 0,
            needed: Vec::new(),
            next_need: 0,
            nodes: HashMap::new(),
            failure: None,
        };
        if let Err(e) = t.arrive() {
            t.failure = Some(e);
        }
        t
    }

    /// The oldest checkpoint not yet reached, reading the next batch if needed.
    fn front(&mut self) -> Result<Option<&Signed>, VerifyFailure> {
        if self.pending.is_empty() && !self.source_done {
            self.source.next_batch(&mut self.pending)?;
            self.source_done = self.pending.is_empty();
        }
        Ok(self.pending.front())
    }

    /// Checks the checkpoints of the current size, then prepares the next proof.
    fn arrive(&mut self) -> Result<(), VerifyFailure> {
        let size = self.frontier.size();
        while let Some(c) = self.front()?
            && c.checkpoint.size <= size
        {
            let Some(c) = self.pending.pop_front() else {
                break;
            };
            let cp = &c.checkpoint;
            if cp.size < size {
                // Sources hand out growing sizes, and every size is visited.
                return fail(format!("{}: checkpoints out of order", c.name));
            }
            if self.frontier.root() != cp.root {
                return fail(format!(
                    "{}: the root of the first {} entries is not the signed root",
                    c.name, cp.size
                ));
            }
            // Roots recomputed from one sequence of leaves already make each tree a
            // prefix of the next; the proofs show it the way an outside client would.
            if let Some(p) = &self.prev {
                let a = &p.checkpoint;
                let proof = if a.size == 0 {
                    Vec::new()
                } else {
                    ciyuan_tlog::consistency_proof(&Captured(&self.nodes), a.size, cp.size)
                        .map_err(|e| VerifyFailure(format!("{}: {e}", c.name)))?
                };
                if let Err(e) =
                    ciyuan_tlog::verify_consistency(a.size, cp.size, &a.root, &cp.root, &proof)
                {
                    return fail(format!("{}: not consistent with {} ({e})", c.name, p.name));
                }
            }
            self.checked += 1;
            self.prev = Some(c);
        }
        self.prepare()
    }

    /// Lists the nodes of the proof from `prev` to the next checkpoint: those of the
    /// old tree come from the frontier now, the others are captured as they complete.
    fn prepare(&mut self) -> Result<(), VerifyFailure> {
        self.needed.clear();
        self.next_need = 0;
        self.nodes.clear();
        let a = self.frontier.size();
        let b = match self.pending.front() {
            Some(c) => c.checkpoint.size,
            None => return Ok(()),
        };
        if a == 0 || self.prev.is_none() {
            return Ok(());
        }
        let rec = Recorder(RefCell::new(Vec::new()));
        // The proof's shape depends on the sizes only, so asking with dummy hashes
        // lists exactly the nodes the real proof is made of. It cannot fail for sizes
        // 0 < a < b; if it did, `arrive` builds the same proof and reports the error.
        let _ = ciyuan_tlog::consistency_proof(&rec, a, b);
        for (level, index) in rec.0.into_inner() {
            let complete = (index + 1) << level;
            if complete <= a {
                let Some((_, _, h)) = self.frontier.nodes().find(|n| (n.0, n.1) == (level, index))
                else {
                    return fail(format!(
                        "the proof from {a} to {b} entries needs node {level}/{index}, \
                         which is not on the frontier"
                    ));
                };
                self.nodes.insert((level, index), h);
            } else {
                self.needed.push((complete, level, index));
            }
        }
        self.needed.sort_unstable();
        self.needed.dedup();
        Ok(())
    }

    #[inline]
    fn push(&mut self, leaf: Hash) {
        if self.failure.is_some() {
            return;
        }
        let after = self.frontier.size() + 1;
        if self
            .needed
            .get(self.next_need)
            .is_some_and(|n| n.0 == after)
        {
            let start = self.next_need;
            let mut end = start;
            while self.needed.get(end).is_some_and(|n| n.0 == after) {
                end += 1;
            }
            let wanted = &self.needed[start..end];
            let nodes = &mut self.nodes;
            self.frontier.push(leaf, |level, index, h| {
                if wanted.iter().any(|n| n.1 == level && n.2 == index) {
                    nodes.insert((level, index), *h);
                }
            });
            self.next_need = end;
        } else {
            self.frontier.push(leaf, |_, _, _| {});
        }
        if self
            .pending
            .front()
            .is_some_and(|c| c.checkpoint.size == after)
            && let Err(e) = self.arrive()
        {
            self.failure = Some(e);
        }
    }

    /// A checkpoint covering more than `entries`, if any is left: it signs entries
    /// that are not there.
    fn beyond(&mut self, entries: u64) -> Result<Option<(String, u64)>, VerifyFailure> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        Ok(self
            .front()?
            .filter(|c| c.checkpoint.size > entries)
            .map(|c| (c.name.clone(), c.checkpoint.size)))
    }

    /// After the last leaf: every checkpoint must have been reached. Returns how many
    /// were checked and the newest size (0 without any).
    fn finish(&mut self, entries: u64) -> Result<(u64, u64), VerifyFailure> {
        if let Some((name, size)) = self.beyond(entries)? {
            return fail(format!(
                "{name}: signs {size} entries but only {entries} are present"
            ));
        }
        let newest = self.prev.as_ref().map_or(0, |p| p.checkpoint.size);
        Ok((self.checked, newest))
    }
}

/// Hands chunks of leaves to the thread that builds the tree, so that building it
/// (one node hash per leaf, in order) overlaps reading and hashing the next chunk.
struct TreeFeed {
    tx: SyncSender<Vec<Hash>>,
    spare: Receiver<Vec<Hash>>,
}

impl TreeFeed {
    /// Sends `leaves` to the tree and leaves an empty (recycled) vector in its place.
    fn feed(&mut self, leaves: &mut Vec<Hash>) {
        let next = self.spare.try_recv().unwrap_or_default();
        let full = std::mem::replace(leaves, next);
        // The tree thread only stops when this side is dropped, or by panicking; the
        // join in `with_tree` turns that into a failure, so a lost chunk is never
        // mistaken for a verified one.
        let _ = self.tx.send(full);
    }
}

/// Runs `f` with a feed into `tree` built on its own thread; returns what `f` returned
/// and the tree with every leaf fed.
fn with_tree<R>(
    tree: TreeCheck,
    f: impl FnOnce(&mut TreeFeed) -> Result<R, VerifyFailure>,
) -> Result<(R, TreeCheck), VerifyFailure> {
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Vec<Hash>>(4);
        let (spare_tx, spare) = sync_channel::<Vec<Hash>>(8);
        let builder = s.spawn(move || {
            let mut tree = tree;
            for mut leaves in rx {
                for leaf in &leaves {
                    tree.push(*leaf);
                }
                leaves.clear();
                // Recycling only: a full spare queue drops the vector, nothing else.
                let _ = spare_tx.try_send(leaves);
            }
            tree
        });
        let mut feed = TreeFeed { tx, spare };
        let result = f(&mut feed);
        drop(feed);
        let tree = builder
            .join()
            .map_err(|_| VerifyFailure("the tree-building thread failed".into()))?;
        result.map(|r| (r, tree))
    })
}

// ---------------------------------------------------------------------------------
// Parallel leaf hashing

/// Below this many entries a chunk is hashed on one thread: a thread start costs more.
const PARALLEL_MIN: usize = 512;
/// Bytes read at a time from an entries file.
const CHUNK_BYTES: usize = 4 << 20;

/// Hashes `ranges` of `data` into `out`, on two threads when it pays. `check(i, leaf)`
/// runs on the hashing thread for entry `i` of the chunk and may refuse it; the first
/// refusal (lowest `i`) is returned.
fn hash_chunk<C>(
    data: &[u8],
    ranges: &[(usize, usize)],
    out: &mut Vec<Hash>,
    check: C,
) -> Option<(usize, String)>
where
    C: Fn(usize, &Hash) -> Result<(), String> + Sync,
{
    out.clear();
    out.resize(ranges.len(), [0; 32]);
    let work = |first: usize, rs: &[(usize, usize)], dst: &mut [Hash]| {
        for (k, (&(s, e), d)) in rs.iter().zip(dst.iter_mut()).enumerate() {
            *d = leaf_hash(&data[s..e]);
            if let Err(why) = check(first + k, d) {
                return Some((first + k, why));
            }
        }
        None
    };
    if ranges.len() < PARALLEL_MIN {
        return work(0, ranges, out);
    }
    let mid = ranges.len() / 2;
    let (lo_out, hi_out) = out.split_at_mut(mid);
    let (lo_r, hi_r) = ranges.split_at(mid);
    std::thread::scope(|s| {
        let hi = s.spawn(|| work(mid, hi_r, hi_out));
        let lo = work(0, lo_r, lo_out);
        // A panic in the helper cannot happen (no indexing outside the ranges given);
        // if it did, report it as a failure rather than unwinding further.
        let hi = hi
            .join()
            .unwrap_or_else(|_| Some((mid, "hashing thread failed".to_string())));
        lo.or(hi)
    })
}

// ---------------------------------------------------------------------------------
// Ledger directory

const SEGMENTS: &str = "segments";
const SIDECAR: &str = "leaves";
const CHECKPOINTS: &str = "checkpoints";
const LOCK: &str = "LOCK";

fn list_dir(dir: &Path, label: &str) -> Result<Vec<String>, VerifyFailure> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| VerifyFailure(format!("{label}: {e}")))? {
        let e = e.map_err(|e| VerifyFailure(format!("{label}: {e}")))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The checkpoints file of a ledger directory, streamed a batch at a time: every frame
/// whole and checked, every note signed by the key in `public.key`, sizes growing.
struct LedgerSource {
    /// `None` when the ledger has no checkpoints file.
    file: Option<File>,
    len: u64,
    offset: u64,
    verifier: NoteVerifier,
    last_size: Option<u64>,
}

impl LedgerSource {
    fn open(dir: &Path, verifier: NoteVerifier) -> Result<LedgerSource, VerifyFailure> {
        let file = match File::open(dir.join(CHECKPOINTS)) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return fail(format!("{CHECKPOINTS}: {e}")),
        };
        let len = match &file {
            Some(f) => f
                .metadata()
                .map_err(|e| VerifyFailure(format!("{CHECKPOINTS}: {e}")))?
                .len(),
            None => 0,
        };
        Ok(LedgerSource {
            file,
            len,
            offset: 0,
            verifier,
            last_size: None,
        })
    }
}

impl CheckpointSource for LedgerSource {
    fn next_batch(&mut self, out: &mut VecDeque<Signed>) -> Result<(), VerifyFailure> {
        let LedgerSource {
            file,
            len,
            offset,
            verifier,
            last_size,
        } = self;
        let Some(file) = file else {
            return Ok(());
        };
        let mut got = 0;
        let mut next = *offset;
        let bad = scan_checkpoints(
            file,
            *offset,
            *len,
            |at, note| {
                let name = format!("{CHECKPOINTS} offset {at}");
                let checkpoint = open_note(verifier, &name, note)?;
                if let Some(prev) = *last_size
                    && checkpoint.size <= prev
                {
                    return fail(format!(
                        "{name}: size {} does not grow from the previous checkpoint's {prev}",
                        checkpoint.size
                    ));
                }
                *last_size = Some(checkpoint.size);
                next = at + (CHECKPOINT_HEADER_BYTES + note.len()) as u64;
                out.push_back(Signed { name, checkpoint });
                got += 1;
                Ok(got < CHECKPOINT_BATCH)
            },
            |e| VerifyFailure(format!("{CHECKPOINTS}: {e}")),
        )?;
        if let Some((at, why)) = bad {
            return fail(format!("{CHECKPOINTS} offset {at}: {why}"));
        }
        *offset = next;
        Ok(())
    }
}

/// The sidecar as far as it goes: whole entries, and the bytes of a final partial one.
struct Sidecar {
    file: File,
    entries: u64,
    partial: usize,
    buf: Vec<u8>,
}

fn verify_ledger(dir: &Path, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, VerifyFailure> {
    // A ledger a server is appending to changes under the verifier's feet; say so
    // rather than report a half-written tail as damage.
    if let Ok(lock) = File::open(dir.join(LOCK))
        && let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock()
    {
        return fail(
            "LOCK: the ledger is open in a running server; stop it, or verify an export \
             (ciyuan audit export DIR)",
        );
    }
    let (verifier, vkey) = read_verifier(dir)?;
    check_signing_key(dir, &vkey)?;
    for name in list_dir(dir, &dir.display().to_string())? {
        if !matches!(
            name.as_str(),
            SEGMENTS | SIDECAR | CHECKPOINTS | keys::SIGNING_KEY_FILE | PUBLIC_KEY_FILE | LOCK
        ) {
            return fail(format!("{name}: unexpected file in the ledger directory"));
        }
    }
    if std::fs::metadata(dir.join(LOCK)).is_ok_and(|m| m.len() != 0) {
        return fail(format!("{LOCK}: the lock file must be empty"));
    }

    // Checkpoints are checked as the leaves stream past, read from the file a batch at
    // a time.
    let tree = TreeCheck::new(Box::new(LedgerSource::open(dir, verifier)?));

    let mut firsts = Vec::new();
    for name in list_dir(&dir.join(SEGMENTS), SEGMENTS)? {
        match parse_segment_name(&name) {
            Some(f) => firsts.push(f),
            None => return fail(format!("{SEGMENTS}/{name}: not a segment file")),
        }
    }
    firsts.sort_unstable();
    if firsts.is_empty() {
        return fail(format!("{SEGMENTS}: no segment"));
    }

    let side_file =
        File::open(dir.join(SIDECAR)).map_err(|e| VerifyFailure(format!("{SIDECAR}: {e}")))?;
    let side_len = side_file
        .metadata()
        .map_err(|e| VerifyFailure(format!("{SIDECAR}: {e}")))?
        .len();
    let mut side = Sidecar {
        file: side_file,
        entries: side_len / SIDECAR_ENTRY_BYTES as u64,
        partial: (side_len % SIDECAR_ENTRY_BYTES as u64) as usize,
        buf: Vec::new(),
    };
    let last_first = *firsts.last().unwrap_or(&0);
    if side.entries < last_first {
        return fail(format!(
            "{SIDECAR}: holds {} entries, but the sealed segments hold {last_first}",
            side.entries
        ));
    }
    let ((index, torn), mut tree) = with_tree(tree, |tree| {
        scan_segments(dir, &firsts, &mut side, tree, progress)
    })?;
    let mut torn_tail_bytes = 0;
    if let Some(tail) = torn {
        // The last part of the format's rule (`judge_torn_tail`): the scan judged the
        // bytes; whether a checkpoint signs the damaged entry is known only now that
        // the checkpoints have streamed past.
        if let Some((_, signed_size)) = tree.beyond(index)? {
            return fail(format!(
                "{}, and it is not a torn write: {}",
                tail.message,
                NotTorn::Signed { signed_size }
            ));
        }
        torn_tail_bytes = tail.bytes;
    }
    // Sidecar entries past the records are leftovers of a crash, not damage: a group's
    // sidecar entries are written before its records are synced, and recovery rebuilds
    // that part from the segment. Only a signed checkpoint vouches for entries, and
    // `finish` holds each to the entries present.
    let (checkpoints, newest) = tree.finish(index)?;
    Ok(VerifyReport {
        entries: index,
        checkpoints,
        size: index,
        root: tree.frontier.root(),
        signed_size: newest,
        // The sidecar may also run past the records (see above): then none is missing,
        // so zero here is the answer, not an underflow hidden.
        sidecar_missing: index.saturating_sub(side.entries),
        torn_tail_bytes,
        seconds: 0.0,
    })
}

/// Streams every segment in order into the tree; returns the number of entries and
/// the torn tail the bytes allow, if there is one.
fn scan_segments(
    dir: &Path,
    firsts: &[u64],
    side: &mut Sidecar,
    tree: &mut TreeFeed,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, Option<TornTail>), VerifyFailure> {
    let mut index = 0u64;
    let mut torn_tail = None;
    let mut scan = SegmentScan::default();
    for (k, &first) in firsts.iter().enumerate() {
        let name = format!("{SEGMENTS}/{}", segment_name(first));
        if first != index {
            return fail(format!(
                "{name}: starts at entry {first}, but the segments before it end at entry {index}"
            ));
        }
        let last = k + 1 == firsts.len();
        let file =
            File::open(dir.join(&name)).map_err(|e| VerifyFailure(format!("{name}: {e}")))?;
        let outcome = scan.run(&file, &name, index, last, side, tree, progress)?;
        index = outcome.end;
        // Judged by the format's rule in `run`, as recovery judges it (but for the
        // checkpoints, which the caller checks once they have all been read).
        torn_tail = outcome.torn;
    }
    Ok((index, torn_tail))
}

/// A damaged end of the last segment that may be a torn write.
struct TornTail {
    bytes: u64,
    message: String,
}

struct SegmentOutcome {
    end: u64,
    torn: Option<TornTail>,
}

/// Buffers reused from segment to segment.
#[derive(Default)]
struct SegmentScan {
    buf: Vec<u8>,
    ranges: Vec<(usize, usize)>,
    offsets: Vec<u64>,
    leaves: Vec<Hash>,
}

impl SegmentScan {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        file: &File,
        name: &str,
        first: u64,
        last: bool,
        side: &mut Sidecar,
        tree: &mut TreeFeed,
        progress: &mut dyn FnMut(u64),
    ) -> Result<SegmentOutcome, VerifyFailure> {
        let io = |e: std::io::Error| VerifyFailure(format!("{name}: {e}"));
        let len = file.metadata().map_err(io)?.len();
        let mut head = [0u8; SEGMENT_HEADER_BYTES];
        let n = crate::ledger::read_some_at(file, &mut head, 0).map_err(io)?;
        if n < SEGMENT_HEADER_BYTES {
            // A segment created just before a crash may lack its header; it holds
            // nothing, so it is a torn write like any other.
            if last && head[..n] == segment_header()[..n] {
                return Ok(SegmentOutcome {
                    end: first,
                    torn: (n > 0).then(|| TornTail {
                        bytes: n as u64,
                        message: format!("{name}: segment header cut short"),
                    }),
                });
            }
            return fail(format!("{name}: segment header cut short"));
        }
        if !check_segment_header(&head) {
            return fail(format!("{name}: bad segment header"));
        }

        let mut index = first;
        // `buf[..filled]` holds the file from `base` on.
        let mut base = SEGMENT_HEADER_BYTES as u64;
        let mut filled = 0usize;
        let mut carry = 0usize;
        loop {
            // Keep the unparsed rest, then read more behind it.
            if carry > 0 {
                self.buf.copy_within(filled - carry..filled, 0);
            }
            base += (filled - carry) as u64;
            let want = CHUNK_BYTES.max(carry * 2);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let got =
                crate::ledger::read_some_at(file, &mut self.buf[carry..], base + carry as u64)
                    .map_err(io)?;
            filled = carry + got;
            let at_eof = base + filled as u64 >= len;
            let data = &self.buf[..filled];

            // Framing and checksums, in order.
            self.ranges.clear();
            self.offsets.clear();
            let mut at = 0usize;
            let mut bad: Option<(u64, RecordError)> = None;
            while at < filled {
                match parse_record(
                    &data[at..],
                    index + self.ranges.len() as u64,
                    MAX_ENTRY_BYTES,
                ) {
                    Ok((payload, total)) => {
                        let s = at + RECORD_HEADER_BYTES;
                        self.ranges.push((s, s + payload.len()));
                        self.offsets.push(base + at as u64);
                        at += total;
                    }
                    // A record that runs past the chunk but not past the file: read on.
                    Err(RecordError::Truncated)
                        if !at_eof && record_end(&data[at..], base + at as u64) <= len =>
                    {
                        break;
                    }
                    Err(why) => {
                        bad = Some((base + at as u64, why));
                        break;
                    }
                }
            }
            carry = filled - at;

            // Leaves, compared with the sidecar where it has them.
            let n = self.ranges.len();
            let want_side = side.entries.saturating_sub(index).min(n as u64) as usize;
            side.buf.resize(want_side * SIDECAR_ENTRY_BYTES, 0);
            if want_side > 0 {
                side.file
                    .read_exact_at(&mut side.buf, index * SIDECAR_ENTRY_BYTES as u64)
                    .map_err(|e| VerifyFailure(format!("{SIDECAR}: {e}")))?;
            }
            let side_bytes = &side.buf;
            let offsets = &self.offsets;
            let mismatch = hash_chunk(data, &self.ranges, &mut self.leaves, |i, leaf| {
                if i >= want_side {
                    return Ok(());
                }
                let (h, off) = parse_sidecar(&side_bytes[i * SIDECAR_ENTRY_BYTES..]);
                if h != *leaf {
                    return Err("leaf hash differs from the one in the sidecar".to_string());
                }
                if off != offsets[i] {
                    return Err(format!("the sidecar says offset {off}"));
                }
                Ok(())
            });
            if let Some((i, why)) = mismatch {
                return fail(format!(
                    "entry {} ({name} offset {}): {why} ({SIDECAR} entry {})",
                    index + i as u64,
                    self.offsets[i],
                    index + i as u64
                ));
            }
            // A final partial sidecar entry must be the start of the next one.
            if side.partial > 0 && side.entries >= index && side.entries < index + n as u64 {
                let i = (side.entries - index) as usize;
                let mut expect = Vec::with_capacity(SIDECAR_ENTRY_BYTES);
                put_sidecar(&mut expect, &self.leaves[i], self.offsets[i]);
                let mut got = vec![0u8; side.partial];
                side.file
                    .read_exact_at(&mut got, side.entries * SIDECAR_ENTRY_BYTES as u64)
                    .map_err(|e| VerifyFailure(format!("{SIDECAR}: {e}")))?;
                if got[..] != expect[..side.partial] {
                    return fail(format!(
                        "{SIDECAR} entry {}: its partial bytes do not match entry {} ({name} offset {})",
                        side.entries, side.entries, self.offsets[i]
                    ));
                }
                if !last {
                    return fail(format!("{SIDECAR}: cut short inside sealed segment {name}"));
                }
            }
            tree.feed(&mut self.leaves);
            index += n as u64;
            progress(index);

            if let Some((offset, why)) = bad {
                let message = format!("entry {index} ({name} offset {offset}): {why}");
                if !last {
                    return fail(message);
                }
                // The format's rule, the one recovery applies to the same bytes. The
                // length is judged before the tail is read, so a long damaged tail is
                // never read into memory.
                let not_torn = |n: NotTorn| {
                    VerifyFailure(format!("{message}, and it is not a torn write: {n}"))
                };
                // (Checkpoints are judged by the caller once all are read: 0 here.)
                judge_torn_tail_len(len - offset, index, 0).map_err(not_torn)?;
                let rest_start = (offset - base) as usize;
                let tail =
                    read_tail(file, len, offset, &self.buf[rest_start..filled]).map_err(io)?;
                judge_torn_tail(&tail, index, 0).map_err(not_torn)?;
                return Ok(SegmentOutcome {
                    end: index,
                    torn: Some(TornTail {
                        bytes: len - offset,
                        message,
                    }),
                });
            }
            if at_eof {
                if carry > 0 {
                    // Cannot happen: at the end of the file a short record is an error.
                    return fail(format!("{name}: {carry} unparsed bytes at the end"));
                }
                return Ok(SegmentOutcome {
                    end: index,
                    torn: None,
                });
            }
        }
    }
}

/// Where a record starting with `head` at file offset `offset` would end, as far as
/// its header tells (a header cut short ends at the header).
fn record_end(head: &[u8], offset: u64) -> u64 {
    if head.len() < 4 {
        return offset + RECORD_HEADER_BYTES as u64;
    }
    let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    offset + RECORD_HEADER_BYTES as u64 + u64::from(n)
}

/// The bytes of `file` from `offset` (the damaged record) to its end `len`, the first
/// of which are already in `in_buf`.
fn read_tail(file: &File, len: u64, offset: u64, in_buf: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tail = in_buf.to_vec();
    let have = offset + tail.len() as u64;
    if have < len {
        let mut more = vec![0u8; (len - have) as usize];
        let n = crate::ledger::read_some_at(file, &mut more, have)?;
        more.truncate(n);
        tail.extend_from_slice(&more);
    }
    Ok(tail)
}

// ---------------------------------------------------------------------------------
// Bundle

/// Bytes per line of `leaf-hashes.txt`: 64 hex digits and a newline.
const HEX_LINE: usize = 65;

/// The `checkpoints/` directory of a bundle: only the sizes (from the file names) are
/// held, and the notes are read a batch at a time as the tree reaches them.
struct BundleSource {
    dir: std::path::PathBuf,
    /// Sizes named by the files, ascending.
    sizes: Vec<u64>,
    next: usize,
    verifier: NoteVerifier,
}

impl BundleSource {
    fn open(dir: &Path, verifier: NoteVerifier) -> Result<BundleSource, VerifyFailure> {
        let cp_dir = dir.join(CHECKPOINTS_DIR);
        if !cp_dir.is_dir() {
            return fail(format!(
                "{CHECKPOINTS_DIR}: missing: nothing vouches for the entries"
            ));
        }
        let mut sizes = Vec::new();
        let read = std::fs::read_dir(&cp_dir)
            .map_err(|e| VerifyFailure(format!("{CHECKPOINTS_DIR}: {e}")))?;
        for e in read {
            let e = e.map_err(|e| VerifyFailure(format!("{CHECKPOINTS_DIR}: {e}")))?;
            let n = e.file_name().to_string_lossy().into_owned();
            let size = n
                .strip_suffix(".note")
                .filter(|d| d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u64>().ok());
            match size {
                Some(size) => sizes.push(size),
                None => {
                    return fail(format!(
                        "{CHECKPOINTS_DIR}/{n}: the file name is not a tree size (20 digits, .note)"
                    ));
                }
            }
        }
        if sizes.is_empty() {
            return fail(format!(
                "{CHECKPOINTS_DIR}: no signed checkpoint: nothing vouches for the entries"
            ));
        }
        // Twenty digits name each size once, so sorted they grow strictly.
        sizes.sort_unstable();
        Ok(BundleSource {
            dir: dir.to_path_buf(),
            sizes,
            next: 0,
            verifier,
        })
    }
}

impl CheckpointSource for BundleSource {
    fn next_batch(&mut self, out: &mut VecDeque<Signed>) -> Result<(), VerifyFailure> {
        let end = (self.next + CHECKPOINT_BATCH).min(self.sizes.len());
        for &size in &self.sizes[self.next..end] {
            let file = format!("{size:020}.note");
            let name = format!("{CHECKPOINTS_DIR}/{file}");
            let note = std::fs::read(self.dir.join(CHECKPOINTS_DIR).join(&file))
                .map_err(|e| VerifyFailure(format!("{name}: {e}")))?;
            let note = String::from_utf8(note)
                .map_err(|_| VerifyFailure(format!("{name}: not UTF-8 text")))?;
            let checkpoint = open_note(&self.verifier, &name, &note)?;
            if checkpoint.size != size {
                return fail(format!(
                    "{name}: the file name does not match the checkpoint's size {}",
                    checkpoint.size
                ));
            }
            out.push_back(Signed { name, checkpoint });
        }
        self.next = end;
        Ok(())
    }
}

/// Streams `entries.jsonl` into the tree, checking each line against
/// `leaf-hashes.txt`; returns the number of entries.
fn scan_bundle(
    entries_file: &File,
    hashes_file: &File,
    hashes_len: u64,
    tree: &mut TreeFeed,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, VerifyFailure> {
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut hex = Vec::new();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut leaves = Vec::new();
    let mut pos = 0u64; // file offset of buf[0]
    let mut carry = 0usize;
    let mut index = 0u64;
    loop {
        if buf.len() < carry * 2 {
            buf.resize(carry * 2, 0);
        }
        let got = crate::ledger::read_some_at(entries_file, &mut buf[carry..], pos + carry as u64)
            .map_err(|e| VerifyFailure(format!("{ENTRIES_FILE}: {e}")))?;
        let filled = carry + got;
        let eof = got == 0 || filled < buf.len();
        ranges.clear();
        let mut at = 0usize;
        let mut line_fault: Option<String> = None;
        while at < filled {
            match find_newline(&buf[at..filled]) {
                Some(0) => {
                    line_fault = Some("empty line".into());
                    break;
                }
                Some(k) => {
                    ranges.push((at, at + k));
                    at += k + 1;
                }
                None => {
                    if eof {
                        line_fault = Some("no newline at the end of the file".into());
                    }
                    break;
                }
            }
        }
        let n = ranges.len();
        // The leaf hashes of these entries, as far as the file has them.
        let hex_start = index * HEX_LINE as u64;
        let hex_have =
            (hashes_len.saturating_sub(hex_start) / HEX_LINE as u64).min(n as u64) as usize;
        hex.resize(hex_have * HEX_LINE, 0);
        hashes_file
            .read_exact_at(&mut hex, hex_start)
            .map_err(|e| VerifyFailure(format!("{LEAF_HASHES_FILE}: {e}")))?;
        let hex_ref = &hex;
        let fault = hash_chunk(&buf[..filled], &ranges, &mut leaves, |i, leaf| {
            if i >= hex_have {
                return Err(format!(
                    "{LEAF_HASHES_FILE} has no line {}",
                    index + i as u64 + 1
                ));
            }
            let line = &hex_ref[i * HEX_LINE..(i + 1) * HEX_LINE];
            // Encoding the computed leaf and comparing bytes is cheaper than decoding,
            // and only the canonical lower-case spelling matches. Why a line differs is
            // worked out only when it does.
            let mut want = [0u8; HEX_LINE];
            want[64] = b'\n';
            if hex::encode_to_slice(leaf, &mut want[..64]).is_ok() && line == want {
                return Ok(());
            }
            let mut parsed = [0u8; 32];
            if line[64] != b'\n'
                || line[..64].iter().any(u8::is_ascii_uppercase)
                || hex::decode_to_slice(&line[..64], &mut parsed).is_err()
            {
                return Err(format!(
                    "{LEAF_HASHES_FILE} line {}: not a lower-case hex SHA-256 and a newline",
                    index + i as u64 + 1
                ));
            }
            Err(format!(
                "{ENTRIES_FILE} line {0} does not hash to {LEAF_HASHES_FILE} line {0}",
                index + i as u64 + 1
            ))
        });
        if let Some((i, why)) = fault {
            return fail(format!("entry {}: {why}", index + i as u64));
        }
        tree.feed(&mut leaves);
        index += n as u64;
        progress(index);
        if let Some(why) = line_fault {
            return fail(format!(
                "{ENTRIES_FILE} line {} (entry {index}): {why}",
                index + 1
            ));
        }
        carry = filled - at;
        buf.copy_within(at..filled, 0);
        pos += at as u64;
        if eof && carry == 0 {
            break;
        }
    }
    Ok(index)
}

/// The first newline in `b`, eight bytes at a time: line splitting is on the
/// sequential path of bundle verification, and a byte loop costs a cycle per byte.
fn find_newline(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const NEWLINES: u64 = ONES * b'\n' as u64;
    let mut chunks = b.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        // A zero byte of `x` is a newline of `c`; the lowest flagged byte is exact
        // (a borrow can only flag bytes above a true zero).
        let x = u64::from_le_bytes(w) ^ NEWLINES;
        let zero = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == b'\n')
        .map(|p| at + p)
}

fn verify_bundle(dir: &Path, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, VerifyFailure> {
    let (verifier, _) = read_verifier(dir)?;
    for name in list_dir(dir, &dir.display().to_string())? {
        if ![
            ENTRIES_FILE,
            LEAF_HASHES_FILE,
            CHECKPOINTS_DIR,
            PUBLIC_KEY_FILE,
            README_FILE,
        ]
        .contains(&name.as_str())
        {
            return fail(format!("{name}: unexpected file in the bundle"));
        }
    }
    // The README is part of what the exporter wrote: a changed one is a changed bundle.
    match std::fs::read(dir.join(README_FILE)) {
        Ok(b) if b == README.as_bytes() => {}
        Ok(_) => {
            return fail(format!(
                "{README_FILE}: differs from the text the exporter writes"
            ));
        }
        Err(e) => return fail(format!("{README_FILE}: {e}")),
    }
    let tree = TreeCheck::new(Box::new(BundleSource::open(dir, verifier)?));

    let open =
        |name: &str| File::open(dir.join(name)).map_err(|e| VerifyFailure(format!("{name}: {e}")));
    let entries_file = open(ENTRIES_FILE)?;
    let hashes_file = open(LEAF_HASHES_FILE)?;
    let hashes_len = hashes_file
        .metadata()
        .map_err(|e| VerifyFailure(format!("{LEAF_HASHES_FILE}: {e}")))?
        .len();
    let (index, mut tree) = with_tree(tree, |tree| {
        scan_bundle(&entries_file, &hashes_file, hashes_len, tree, progress)
    })?;
    if hashes_len != index * HEX_LINE as u64 {
        return fail(format!(
            "{LEAF_HASHES_FILE}: {hashes_len} bytes, but {index} entries need {}",
            index * HEX_LINE as u64
        ));
    }
    let (checkpoints, newest) = tree.finish(index)?;
    if newest != index {
        return fail(format!(
            "{ENTRIES_FILE}: entries {newest} to {} are not covered by any signed checkpoint",
            index.saturating_sub(1)
        ));
    }
    Ok(VerifyReport {
        entries: index,
        checkpoints,
        size: index,
        root: tree.frontier.root(),
        signed_size: newest,
        sidecar_missing: 0,
        torn_tail_bytes: 0,
        seconds: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::find_newline;

    #[test]
    fn newline_search_agrees_with_a_byte_loop() {
        // Newlines and bytes that trip naive word tricks (0x0b, 0x8a, 0x0a-adjacent).
        let alphabet = [b'a', b'\n', 0x0b, 0x8a, 0x09, 0xff, 0x00, 0x01];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..80 {
            for _ in 0..200 {
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        alphabet[(seed % 8) as usize]
                    })
                    .collect();
                assert_eq!(
                    find_newline(&b),
                    b.iter().position(|&c| c == b'\n'),
                    "{b:?}"
                );
            }
        }
    }
}
