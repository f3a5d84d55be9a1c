//! The single writer ([`Ledger`]) and the concurrent readers ([`LedgerReader`]).

use crate::format::*;
use crate::keys;
use crate::{LedgerError, LedgerOptions, SignedCheckpoint};
use ciyuan_tlog::{
    Checkpoint, Frontier, Hash, NodeSource, NoteSigner, NoteVerifier, leaf_hash, node_hash,
};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Perfect subtrees at this level and above are kept in memory (one hash per 256
/// leaves); lower ones are recomputed from at most 256 sidecar hashes.
const UPPER_LEVEL: u32 = 8;
/// Bytes read per call when streaming segments or the sidecar.
const READ_CHUNK_BYTES: usize = 4 << 20;
const SEGMENTS_DIR: &str = "segments";
const SIDECAR_FILE: &str = "leaves";
const CHECKPOINTS_FILE: &str = "checkpoints";
const LOCK_FILE: &str = "LOCK";
/// The offset of every this-many-th checkpoint is kept in memory; a page of older
/// checkpoints is read from the file, starting at the nearest indexed one. At the
/// default interval of 10 s that is some 100 KB a year instead of every note.
const CHECKPOINT_INDEX_STRIDE: u64 = 256;

/// What is kept in memory of the checkpoints file: the newest checkpoint, and where
/// to find the others.
#[derive(Default)]
struct CheckpointIndex {
    /// Checkpoints signed so far.
    count: u64,
    /// Bytes of whole frames in the file: where the next one is written.
    end: u64,
    /// `sparse[k]` is the offset of checkpoint `k * CHECKPOINT_INDEX_STRIDE`.
    sparse: Vec<u64>,
    latest: Option<SignedCheckpoint>,
}

impl CheckpointIndex {
    /// Records the frame of `frame_bytes` at `offset`, which must be the end so far.
    fn push_frame(&mut self, offset: u64, frame_bytes: u64) {
        assert_eq!(offset, self.end, "checkpoint frames are appended in order");
        if self.count.is_multiple_of(CHECKPOINT_INDEX_STRIDE) {
            self.sparse.push(offset);
        }
        self.count += 1;
        self.end = offset + frame_bytes;
    }

    /// Records a newly signed checkpoint, written at `offset`.
    fn push(&mut self, offset: u64, frame_bytes: u64, signed: SignedCheckpoint) {
        self.push_frame(offset, frame_bytes);
        self.latest = Some(signed);
    }
}

struct Segment {
    first: u64,
    file: Arc<File>,
    name: String,
}

struct State {
    size: u64,
    root: Hash,
    /// `upper[k]` holds the perfect subtrees of level `UPPER_LEVEL + k`, in order.
    upper: Vec<Vec<Hash>>,
    segments: Vec<Segment>,
}

struct Shared {
    origin: String,
    vkey: String,
    verifier: NoteVerifier,
    sidecar: File,
    state: RwLock<State>,
    checkpoints: RwLock<CheckpointIndex>,
    /// The checkpoints file, for reading older checkpoints by offset.
    checkpoints_file: File,
    /// Set when a write or sync failed: the file's state is then unknown (the kernel may
    /// have dropped dirty pages), so everything is refused until recovery reopens it.
    failed: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail(&self, why: String) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }

    /// Makes a synced group visible to readers.
    fn publish(&self, staged: Staged) {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        for (level, h) in staged.upper {
            keep_upper(&mut st.upper, level, &h);
        }
        st.size = staged.range.end;
        st.root = staged.root;
    }
}

/// A group written to its segment but not yet synced, nor visible to readers.
pub(crate) struct Staged {
    /// Indices of the group.
    pub range: Range<u64>,
    /// The segment to `fdatasync` before publishing.
    pub file: Arc<File>,
    /// Where the group's records lie in the segment.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    bytes: Range<u64>,
    upper: Vec<(u32, Hash)>,
    root: Hash,
}

/// What the sync side of a pipelined writer needs: the shared state and the
/// checkpointer.
pub(crate) struct SharedHandle {
    shared: Arc<Shared>,
    checkpointer: std::sync::Mutex<Checkpointer>,
}

impl SharedHandle {
    pub(crate) fn commit(&self, staged: Staged) -> Result<Range<u64>, LedgerError> {
        if let Some(why) = self.shared.failure() {
            return Err(LedgerError::Failed(why));
        }
        if let Err(e) = staged.file.sync_data() {
            self.shared.fail(format!("syncing the segment: {e}"));
            return Err(LedgerError::io("syncing the segment")(e));
        }
        // The group is durable and rarely read again soon (the projector is lent the
        // entries it applies), so its pages leave the page cache now: the next groups
        // are written into the pages just freed instead of pages the kernel has not
        // touched for a while, which on a virtual machine cost a trip to the host each
        // (over half of the ledger writer's time in slow runs, see BENCHMARKS.md), and
        // a write-once log does not push the projections' pages out of the cache. The
        // range ends at a 64 KiB boundary (a multiple of every usual page size), so the
        // page the next group goes on filling stays; Linux drops a partial last page
        // when the range reaches the end of the file. Advice only: a failure changes
        // nothing but speed.
        #[cfg(target_os = "linux")]
        {
            const ALIGN: u64 = 64 << 10;
            let end = staged.bytes.end & !(ALIGN - 1);
            if let Some(len) = end
                .checked_sub(staged.bytes.start)
                .and_then(std::num::NonZeroU64::new)
            {
                let _ = rustix::fs::fadvise(
                    &*staged.file,
                    staged.bytes.start,
                    Some(len),
                    rustix::fs::Advice::DontNeed,
                );
            }
        }
        let range = staged.range.clone();
        self.shared.publish(staged);
        Ok(range)
    }

    pub(crate) fn checkpoint(&self) -> Result<SignedCheckpoint, LedgerError> {
        self.checkpointer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .checkpoint(&self.shared)
    }
}

/// Signs and stores checkpoints of the *published* tree, so a checkpoint never covers
/// an entry that is not yet durable.
pub(crate) struct Checkpointer {
    signer: NoteSigner,
    file: File,
}

impl Checkpointer {
    fn checkpoint(&mut self, shared: &Shared) -> Result<SignedCheckpoint, LedgerError> {
        if let Some(why) = shared.failure() {
            return Err(LedgerError::Failed(why));
        }
        let (size, root) = {
            let st = read_lock(&shared.state);
            (st.size, st.root)
        };
        if let Some(latest) = &read_lock(&shared.checkpoints).latest
            && latest.checkpoint.size == size
        {
            return Ok(latest.clone());
        }
        let checkpoint = Checkpoint {
            origin: self.signer.name().to_string(),
            size,
            root,
            extensions: Vec::new(),
        };
        let note = self
            .signer
            .sign(&checkpoint.to_text())
            .map_err(|e| corrupt(format!("signing a checkpoint: {e}")))?;
        let frame = put_checkpoint(&note);
        // Only this checkpointer (one per ledger, behind a mutex) writes the file, so
        // the end the index knows is where the frame goes.
        let at = read_lock(&shared.checkpoints).end;
        let write = self
            .file
            .write_all_at(&frame, at)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = write {
            shared.fail(format!("writing a checkpoint: {e}"));
            return Err(LedgerError::io("writing a checkpoint")(e));
        }
        let signed = SignedCheckpoint { checkpoint, note };
        shared
            .checkpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(at, frame.len() as u64, signed.clone());
        Ok(signed)
    }
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic while holding the lock leaves the state as the last complete update.
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// The writer of a ledger directory. Owns the lock; one per directory.
pub struct Ledger {
    shared: Arc<Shared>,
    handle: Arc<SharedHandle>,
    opts: LedgerOptions,
    dir: PathBuf,
    frontier: Frontier,
    active: Arc<File>,
    active_len: u64,
    sidecar_w: File,
    buf: Vec<u8>,
    side_buf: Vec<u8>,
    _lock: File,
}

/// Reads entries, proofs and checkpoints while the writer appends. Cheap to clone.
#[derive(Clone)]
pub struct LedgerReader {
    shared: Arc<Shared>,
}

fn corrupt(msg: String) -> LedgerError {
    LedgerError::Corrupt(msg)
}

fn sync_dir(dir: &Path) -> Result<(), LedgerError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(LedgerError::io(format!(
            "syncing directory {}",
            dir.display()
        )))
}

fn read_at_exact(file: &File, buf: &mut [u8], offset: u64, what: &str) -> Result<(), LedgerError> {
    file.read_exact_at(buf, offset)
        .map_err(LedgerError::io(format!("reading {what} at {offset}")))
}

/// Entries of the last segment, where its valid records end, and their leaf hashes
/// with offsets.
type LastSegment = (u64, usize, Vec<(Hash, u64)>);

/// Where the last segment's valid records end, with the count; a damaged tail is
/// accepted only if the format's rule ([`judge_torn_tail`]) calls it a torn final write,
/// the same rule the verifier applies. `signed_size` is the newest checkpoint's size.
fn scan_last_segment(
    bytes: &[u8],
    first: u64,
    name: &str,
    signed_size: u64,
) -> Result<LastSegment, LedgerError> {
    let mut at = SEGMENT_HEADER_BYTES;
    let mut index = first;
    let mut leaves = Vec::new();
    while at < bytes.len() {
        match parse_record(&bytes[at..], index, MAX_ENTRY_BYTES) {
            Ok((payload, total)) => {
                leaves.push((leaf_hash(payload), at as u64));
                at += total;
                index += 1;
            }
            Err(why) => {
                if let Err(not_torn) = judge_torn_tail(&bytes[at..], index, signed_size) {
                    return Err(corrupt(format!(
                        "{SEGMENTS_DIR}/{name} offset {at} (entry {index}): {why}, and it is not a torn write: {not_torn}"
                    )));
                }
                break;
            }
        }
    }
    Ok((index - first, at, leaves))
}

impl Ledger {
    /// Opens the ledger in `dir`, creating it if needed, and recovers from a crash:
    /// a torn tail of the last segment is cut off, the sidecar is rebuilt where it may
    /// lag, and the latest checkpoint must match the recovered tree.
    pub fn open(dir: &Path, opts: LedgerOptions) -> Result<Ledger, LedgerError> {
        opts.check()?;
        let seg_dir = dir.join(SEGMENTS_DIR);
        std::fs::create_dir_all(&seg_dir)
            .map_err(LedgerError::io(format!("creating {}", seg_dir.display())))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(LedgerError::io("opening the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Locked(dir.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LedgerError::io("locking the ledger")(e));
            }
        }

        let has_keys =
            dir.join(keys::PUBLIC_KEY_FILE).exists() || dir.join(keys::SIGNING_KEY_FILE).exists();
        let (signer, verifier) = if has_keys {
            keys::load(dir)?
        } else {
            let origin = match &opts.origin {
                Some(o) => o.clone(),
                None => {
                    let mut r = [0u8; 4];
                    getrandom::fill(&mut r)
                        .map_err(|e| corrupt(format!("no randomness for the origin: {e}")))?;
                    format!("ciyuan-{}", hex::encode(r))
                }
            };
            let signer = keys::create(dir, &origin)?;
            sync_dir(dir)?;
            let verifier = NoteVerifier::from_vkey(&signer.verifier_key())
                .map_err(|e| corrupt(format!("new verifier key: {e}")))?;
            (signer, verifier)
        };

        // Segments, in order.
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(&seg_dir).map_err(LedgerError::io("listing segments"))? {
            let e = e.map_err(LedgerError::io("listing segments"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let first = parse_segment_name(&name)
                .ok_or_else(|| corrupt(format!("{SEGMENTS_DIR}/{name}: not a segment file")))?;
            firsts.push(first);
        }
        firsts.sort_unstable();
        if firsts.is_empty() {
            create_segment(&seg_dir, 0)?;
            firsts.push(0);
        }
        if firsts[0] != 0 {
            return Err(corrupt(format!(
                "{SEGMENTS_DIR}: the first segment starts at entry {}, not 0",
                firsts[0]
            )));
        }
        let mut segments = Vec::with_capacity(firsts.len());
        for &first in &firsts {
            let name = segment_name(first);
            let file = File::open(seg_dir.join(&name))
                .map_err(LedgerError::io(format!("opening {SEGMENTS_DIR}/{name}")))?;
            segments.push(Segment {
                first,
                file: Arc::new(file),
                name,
            });
        }

        // Checkpoints first: a torn tail of the segments may not cut what one signed.
        // A torn final frame is cut; the newest is checked against the tree below.
        let cp_path = dir.join(CHECKPOINTS_FILE);
        let checkpoints_w = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&cp_path)
            .map_err(LedgerError::io("opening the checkpoints file"))?;
        let cp_len = checkpoints_w
            .metadata()
            .map_err(LedgerError::io("reading checkpoints"))?
            .len();
        // Streamed: a year of checkpoints is millions of notes, and only the newest
        // and an offset every `CHECKPOINT_INDEX_STRIDE` stay in memory. Every frame's
        // checksum is checked here, but only the newest note's signature (and root,
        // below): checking millions of signatures made each start take minutes. Older
        // notes are checked again whenever they are read (`checkpoints`), and all of
        // them by `ciyuan audit verify`.
        let mut checkpoints = CheckpointIndex::default();
        let mut newest = (0u64, String::new());
        let bad = scan_checkpoints(
            &checkpoints_w,
            0,
            cp_len,
            |at, note| {
                checkpoints.push_frame(at, (CHECKPOINT_HEADER_BYTES + note.len()) as u64);
                newest.0 = at;
                newest.1.clear();
                newest.1.push_str(note);
                Ok(true)
            },
            LedgerError::io("reading checkpoints"),
        )?;
        if checkpoints.count > 0 {
            let (at, note) = newest;
            let checkpoint = ciyuan_tlog::open_checkpoint(&verifier, &note, Some(signer.name()))
                .map_err(|e| corrupt(format!("{CHECKPOINTS_FILE} offset {at}: {e}")))?;
            checkpoints.latest = Some(SignedCheckpoint { checkpoint, note });
        }
        if let Some((at, why)) = bad {
            let tail = cp_len - at;
            if tail > (MAX_CHECKPOINT_NOTE_BYTES + CHECKPOINT_HEADER_BYTES) as u64 {
                return Err(corrupt(format!("{CHECKPOINTS_FILE} offset {at}: {why}")));
            }
            checkpoints_w
                .set_len(at)
                .and_then(|_| checkpoints_w.sync_all())
                .map_err(LedgerError::io("truncating a torn checkpoint"))?;
        }
        let checkpoints_file =
            File::open(&cp_path).map_err(LedgerError::io("opening the checkpoints file"))?;
        let signed_size = checkpoints.latest.as_ref().map_or(0, |c| c.checkpoint.size);

        // The last segment: scan, cut a torn tail.
        let last_first = *firsts.last().unwrap_or(&0);
        let last_name = segment_name(last_first);
        let last_path = seg_dir.join(&last_name);
        let mut bytes = std::fs::read(&last_path).map_err(LedgerError::io(format!(
            "reading {SEGMENTS_DIR}/{last_name}"
        )))?;
        if bytes.len() >= SEGMENT_HEADER_BYTES && !check_segment_header(&bytes) {
            return Err(corrupt(format!(
                "{SEGMENTS_DIR}/{last_name}: bad segment header"
            )));
        }
        if bytes.len() < SEGMENT_HEADER_BYTES {
            // Created but its header never became durable: write it again.
            bytes = segment_header().to_vec();
            std::fs::write(&last_path, &bytes)
                .and_then(|_| File::open(&last_path)?.sync_all())
                .map_err(LedgerError::io(format!(
                    "rewriting {SEGMENTS_DIR}/{last_name}"
                )))?;
        }
        let (count, valid_len, last_leaves) =
            scan_last_segment(&bytes, last_first, &last_name, signed_size)?;
        drop(bytes);
        let active = OpenOptions::new()
            .write(true)
            .open(&last_path)
            .map_err(LedgerError::io(format!(
                "opening {SEGMENTS_DIR}/{last_name}"
            )))?;
        let on_disk = active
            .metadata()
            .map_err(LedgerError::io("segment metadata"))?
            .len();
        if on_disk != valid_len as u64 {
            active
                .set_len(valid_len as u64)
                .and_then(|_| active.sync_all())
                .map_err(LedgerError::io(format!(
                    "truncating the torn tail of {SEGMENTS_DIR}/{last_name}"
                )))?;
        }
        let size = last_first + count;

        // The sidecar: trusted for sealed segments, rebuilt for the last one.
        let sidecar_path = dir.join(SIDECAR_FILE);
        let sidecar_w = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&sidecar_path)
            .map_err(LedgerError::io("opening the sidecar"))?;
        let side_len = sidecar_w
            .metadata()
            .map_err(LedgerError::io("sidecar metadata"))?
            .len();
        let have = side_len / SIDECAR_ENTRY_BYTES as u64;
        let keep = have.min(last_first);
        sidecar_w
            .set_len(keep * SIDECAR_ENTRY_BYTES as u64)
            .map_err(LedgerError::io("truncating the sidecar"))?;
        let mut side_buf = Vec::new();
        // Sealed segments the sidecar does not cover (it was lost or cut): rebuild them.
        for (i, seg) in segments.iter().enumerate().take(segments.len() - 1) {
            let end = segments[i + 1].first;
            if end <= keep {
                // Trusted, not rescanned (that is the verifier's job), but its ends must
                // line up with the sidecar: this catches a sealed segment that was cut,
                // grown or swapped, for the price of three small reads.
                check_sealed_ends(seg, end, &sidecar_w)?;
                continue;
            }
            let data = std::fs::read(seg_dir.join(&seg.name)).map_err(LedgerError::io(format!(
                "reading {SEGMENTS_DIR}/{}",
                seg.name
            )))?;
            if !check_segment_header(&data) {
                return Err(corrupt(format!(
                    "{SEGMENTS_DIR}/{}: bad segment header",
                    seg.name
                )));
            }
            let mut at = SEGMENT_HEADER_BYTES;
            for index in seg.first..end {
                let (payload, total) =
                    parse_record(&data[at..], index, MAX_ENTRY_BYTES).map_err(|why| {
                        corrupt(format!(
                            "{SEGMENTS_DIR}/{} offset {at} (entry {index}): {why}",
                            seg.name
                        ))
                    })?;
                if index >= keep {
                    put_sidecar(&mut side_buf, &leaf_hash(payload), at as u64);
                }
                at += total;
            }
            if at != data.len() {
                return Err(corrupt(format!(
                    "{SEGMENTS_DIR}/{} offset {at}: data after the last entry of a sealed segment",
                    seg.name
                )));
            }
        }
        for (leaf, off) in &last_leaves {
            put_sidecar(&mut side_buf, leaf, *off);
        }
        sidecar_w
            .write_all_at(&side_buf, keep * SIDECAR_ENTRY_BYTES as u64)
            .and_then(|_| sidecar_w.sync_data())
            .map_err(LedgerError::io("rebuilding the sidecar"))?;
        side_buf.clear();
        let sidecar = File::open(&sidecar_path).map_err(LedgerError::io("opening the sidecar"))?;

        // The tree: stream the sidecar through a frontier, keeping the upper levels.
        let mut frontier = Frontier::new();
        let mut upper: Vec<Vec<Hash>> = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK_BYTES / SIDECAR_ENTRY_BYTES * SIDECAR_ENTRY_BYTES];
        let mut done = 0u64;
        while done < size {
            let n = ((size - done) as usize).min(chunk.len() / SIDECAR_ENTRY_BYTES);
            let buf = &mut chunk[..n * SIDECAR_ENTRY_BYTES];
            read_at_exact(
                &sidecar,
                buf,
                done * SIDECAR_ENTRY_BYTES as u64,
                "the sidecar",
            )?;
            for e in buf.chunks_exact(SIDECAR_ENTRY_BYTES) {
                let (leaf, _) = parse_sidecar(e);
                frontier.push(leaf, |level, _, h| keep_upper(&mut upper, level, h));
            }
            done += n as u64;
        }
        let root = frontier.root();

        let shared = Arc::new(Shared {
            origin: signer.name().to_string(),
            vkey: signer.verifier_key(),
            verifier,
            sidecar,
            state: RwLock::new(State {
                size,
                root,
                upper,
                segments,
            }),
            checkpoints: RwLock::new(checkpoints),
            checkpoints_file,
            failed: std::sync::Mutex::new(None),
        });
        let reader = LedgerReader {
            shared: shared.clone(),
        };
        if let Some(latest) = reader.latest_checkpoint() {
            let c = &latest.checkpoint;
            if c.size > size {
                return Err(corrupt(format!(
                    "the latest checkpoint covers {} entries but the log holds {size}: signed entries are missing",
                    c.size
                )));
            }
            if reader.root_at(c.size)? != c.root {
                return Err(corrupt(format!(
                    "the log's first {} entries do not match the latest signed checkpoint",
                    c.size
                )));
            }
        }

        let handle = Arc::new(SharedHandle {
            shared: shared.clone(),
            checkpointer: std::sync::Mutex::new(Checkpointer {
                signer,
                file: checkpoints_w,
            }),
        });
        Ok(Ledger {
            shared,
            handle,
            dir: dir.to_path_buf(),
            frontier,
            active: Arc::new(active),
            active_len: valid_len as u64,
            sidecar_w,
            buf: Vec::with_capacity(1 << 20),
            side_buf: Vec::with_capacity(64 << 10),
            _lock: lock,
            opts,
        })
    }

    /// Number of durable entries.
    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    /// Current root.
    pub fn root(&self) -> Hash {
        self.frontier.root()
    }

    /// The options in force.
    pub fn options(&self) -> &LedgerOptions {
        &self.opts
    }

    /// A reader sharing this ledger's state.
    pub fn reader(&self) -> LedgerReader {
        LedgerReader {
            shared: self.shared.clone(),
        }
    }

    /// Checks one entry against the ledger's rules.
    pub fn validate(&self, entry: &[u8]) -> Result<(), LedgerError> {
        validate_entry(entry, self.opts.max_entry_bytes)
    }

    /// Appends entries with one write and one `fdatasync`; they are durable when this
    /// returns. All entries are validated first, so a bad one writes nothing.
    pub fn append_batch<E: AsRef<[u8]>>(
        &mut self,
        entries: &[E],
    ) -> Result<Range<u64>, LedgerError> {
        check_request(entries, &self.opts)?;
        let staged = self.stage(entries)?;
        self.handle.commit(staged)
    }

    /// The sync side of this ledger, for a pipelined writer.
    pub(crate) fn handle(&self) -> Arc<SharedHandle> {
        self.handle.clone()
    }

    /// Validates and writes a group to the active segment and the sidecar, without
    /// syncing or publishing it. Groups must be committed in the order staged.
    pub(crate) fn stage<E: AsRef<[u8]>>(&mut self, entries: &[E]) -> Result<Staged, LedgerError> {
        for e in entries {
            self.validate(e.as_ref())?;
        }
        self.stage_checked(entries, None)
    }

    /// [`Ledger::stage`] for entries already validated, with their leaf hashes already
    /// computed (by the producers, in parallel, so the single writer thread only frames
    /// and writes).
    pub(crate) fn stage_prepared(
        &mut self,
        entries: &[&[u8]],
        leaves: &[Hash],
    ) -> Result<Staged, LedgerError> {
        if leaves.len() != entries.len() {
            return Err(LedgerError::Invalid(format!(
                "{} leaf hashes for {} entries",
                leaves.len(),
                entries.len()
            )));
        }
        self.stage_checked(entries, Some(leaves))
    }

    fn stage_checked<E: AsRef<[u8]>>(
        &mut self,
        entries: &[E],
        leaves: Option<&[Hash]>,
    ) -> Result<Staged, LedgerError> {
        if let Some(why) = self.shared.failure() {
            return Err(LedgerError::Failed(why));
        }
        if self.active_len >= self.opts.segment_max_bytes && !entries.is_empty() {
            self.roll()?;
        }
        let result = self.write_group(entries, leaves);
        if let Err(e) = &result {
            self.shared.fail(e.to_string());
        }
        result
    }

    fn write_group<E: AsRef<[u8]>>(
        &mut self,
        entries: &[E],
        leaves: Option<&[Hash]>,
    ) -> Result<Staged, LedgerError> {
        let start = self.size();
        self.buf.clear();
        self.side_buf.clear();
        let mut offset = self.active_len;
        let mut upper: Vec<(u32, Hash)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let payload = e.as_ref();
            let leaf = match leaves {
                Some(l) => l[i],
                None => leaf_hash(payload),
            };
            put_record(&mut self.buf, start + i as u64, payload);
            put_sidecar(&mut self.side_buf, &leaf, offset);
            offset += (RECORD_HEADER_BYTES + payload.len()) as u64;
            self.frontier.push(leaf, |level, _, h| {
                if level >= UPPER_LEVEL {
                    upper.push((level, *h));
                }
            });
        }
        self.active
            .write_all_at(&self.buf, self.active_len)
            .map_err(LedgerError::io("appending to the segment"))?;
        let bytes = self.active_len..offset;
        self.active_len = offset;
        self.sidecar_w
            .write_all_at(&self.side_buf, start * SIDECAR_ENTRY_BYTES as u64)
            .map_err(LedgerError::io("writing the sidecar"))?;
        Ok(Staged {
            range: start..self.size(),
            file: self.active.clone(),
            bytes,
            upper,
            root: self.frontier.root(),
        })
    }

    /// Seals the active segment and starts the next.
    fn roll(&mut self) -> Result<(), LedgerError> {
        // The sealed segment and its sidecar must be durable: recovery trusts both.
        self.active
            .sync_data()
            .map_err(LedgerError::io("syncing the sealed segment"))?;
        self.sidecar_w
            .sync_data()
            .map_err(LedgerError::io("syncing the sidecar"))?;
        let first = self.size();
        let seg_dir = self.dir.join(SEGMENTS_DIR);
        let (file, name) = create_segment(&seg_dir, first)?;
        let reader =
            File::open(seg_dir.join(&name)).map_err(LedgerError::io("opening the new segment"))?;
        self.active = Arc::new(file);
        self.active_len = SEGMENT_HEADER_BYTES as u64;
        let mut st = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
        st.segments.push(Segment {
            first,
            file: Arc::new(reader),
            name,
        });
        Ok(())
    }

    /// Signs a checkpoint of the current tree unless the newest one already covers it,
    /// and stores it durably.
    pub fn checkpoint(&mut self) -> Result<SignedCheckpoint, LedgerError> {
        self.handle.checkpoint()
    }

    /// Makes the sidecar durable and flushes the active segment (on clean shutdown).
    /// Nothing depends on it for correctness: every open rebuilds the sidecar entries of
    /// the last segment from the segment.
    pub fn sync(&mut self) -> Result<(), LedgerError> {
        self.sidecar_w
            .sync_data()
            .map_err(LedgerError::io("syncing the sidecar"))?;
        self.active
            .flush()
            .map_err(LedgerError::io("flushing the segment"))
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Best effort, and provably harmless when it fails: the sidecar entries of sealed
        // segments were synced when each was sealed (`roll`), and every open rebuilds
        // the last segment's entries from the segment itself, so no unsynced sidecar
        // byte is ever trusted. The failure is still worth a line in the log.
        if let Err(e) = self.sidecar_w.sync_data() {
            tracing::warn!(
                "ledger: syncing the sidecar on close failed (recovery rebuilds it): {e}"
            );
        }
    }
}

/// Checks that one append request fits in a group: the writer never splits a request,
/// and the bytes it may hold unsynced are bounded by the format.
pub(crate) fn check_request<E: AsRef<[u8]>>(
    entries: &[E],
    opts: &LedgerOptions,
) -> Result<(), LedgerError> {
    let bytes: usize = entries.iter().map(|e| e.as_ref().len()).sum();
    if entries.len() > opts.max_batch_entries || bytes > opts.max_batch_bytes {
        return Err(LedgerError::Invalid(format!(
            "a request of {} entries and {bytes} bytes is over the limit of {} entries and {} bytes",
            entries.len(),
            opts.max_batch_entries,
            opts.max_batch_bytes
        )));
    }
    Ok(())
}

/// Checks one entry against the ledger's rules: not empty, at most `max_bytes`, and no
/// newline byte (a bundle holds one entry per line).
pub(crate) fn validate_entry(entry: &[u8], max_bytes: usize) -> Result<(), LedgerError> {
    if entry.is_empty() {
        return Err(LedgerError::Invalid("entry is empty".into()));
    }
    if entry.len() > max_bytes {
        return Err(LedgerError::Invalid(format!(
            "entry of {} bytes is over the limit of {max_bytes}",
            entry.len(),
        )));
    }
    if entry.contains(&b'\n') {
        return Err(LedgerError::Invalid("entry contains a newline".into()));
    }
    Ok(())
}

/// Checks that sealed segment `seg`, which the sidecar covers, holds exactly the
/// entries `seg.first..end`: its first record starts right after the header, and its
/// last record, where the sidecar puts it, has index `end - 1`, a valid checksum, and
/// ends at the end of the file.
fn check_sealed_ends(seg: &Segment, end: u64, sidecar: &File) -> Result<(), LedgerError> {
    let name = &seg.name;
    let offset_of = |index: u64| -> Result<u64, LedgerError> {
        let mut e = [0u8; SIDECAR_ENTRY_BYTES];
        read_at_exact(
            sidecar,
            &mut e,
            index * SIDECAR_ENTRY_BYTES as u64,
            "the sidecar",
        )?;
        Ok(parse_sidecar(&e).1)
    };
    let first_at = offset_of(seg.first)?;
    if first_at != SEGMENT_HEADER_BYTES as u64 {
        return Err(corrupt(format!(
            "{SIDECAR_FILE} entry {}: offset {first_at} is not the start of {SEGMENTS_DIR}/{name}",
            seg.first
        )));
    }
    let last = end - 1;
    let at = offset_of(last)?;
    let file_len = seg
        .file
        .metadata()
        .map_err(LedgerError::io(format!("reading {SEGMENTS_DIR}/{name}")))?
        .len();
    let mut head = [0u8; RECORD_HEADER_BYTES];
    let whole = at
        .checked_add(RECORD_HEADER_BYTES as u64)
        .is_some_and(|e| e <= file_len);
    if !whole {
        return Err(corrupt(format!(
            "{SEGMENTS_DIR}/{name} offset {at} (entry {last}): the sealed segment is cut short"
        )));
    }
    read_at_exact(&seg.file, &mut head, at, name)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
    let record_end = at + RECORD_HEADER_BYTES as u64 + len;
    if record_end > file_len {
        return Err(corrupt(format!(
            "{SEGMENTS_DIR}/{name} offset {at} (entry {last}): the sealed segment is cut short"
        )));
    }
    let mut rec = vec![0u8; record_end as usize - at as usize];
    read_at_exact(&seg.file, &mut rec, at, name)?;
    parse_record(&rec, last, rec.len()).map_err(|why| {
        corrupt(format!(
            "{SEGMENTS_DIR}/{name} offset {at} (entry {last}): {why}"
        ))
    })?;
    if record_end != file_len {
        return Err(corrupt(format!(
            "{SEGMENTS_DIR}/{name} offset {record_end}: {} bytes after the last entry of a sealed segment",
            file_len - record_end
        )));
    }
    Ok(())
}

fn keep_upper(upper: &mut Vec<Vec<Hash>>, level: u32, h: &Hash) {
    if level < UPPER_LEVEL {
        return;
    }
    let k = (level - UPPER_LEVEL) as usize;
    while upper.len() <= k {
        upper.push(Vec::new());
    }
    upper[k].push(*h);
}

fn create_segment(seg_dir: &Path, first: u64) -> Result<(File, String), LedgerError> {
    let name = segment_name(first);
    let path = seg_dir.join(&name);
    let ctx = format!("creating {SEGMENTS_DIR}/{name}");
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(LedgerError::io(ctx.clone()))?;
    f.write_all(&segment_header())
        .and_then(|_| f.sync_all())
        .map_err(LedgerError::io(ctx))?;
    sync_dir(seg_dir)?;
    Ok((f, name))
}

/// Perfect-subtree hashes of one consistent snapshot of the tree.
struct Nodes<'a> {
    shared: &'a Shared,
    upper: &'a [Vec<Hash>],
}

impl NodeSource for Nodes<'_> {
    type Error = LedgerError;
    fn node(&self, level: u32, index: u64) -> Result<Hash, LedgerError> {
        if level >= UPPER_LEVEL {
            return self
                .upper
                .get((level - UPPER_LEVEL) as usize)
                .and_then(|l| l.get(index as usize))
                .copied()
                .ok_or_else(|| {
                    LedgerError::OutOfRange(format!("no tree node at level {level}, index {index}"))
                });
        }
        let count = 1usize << level;
        let mut buf = vec![0u8; count * SIDECAR_ENTRY_BYTES];
        read_at_exact(
            &self.shared.sidecar,
            &mut buf,
            (index << level) * SIDECAR_ENTRY_BYTES as u64,
            "the sidecar",
        )?;
        let mut hashes: Vec<Hash> = buf
            .chunks_exact(SIDECAR_ENTRY_BYTES)
            .map(|e| parse_sidecar(e).0)
            .collect();
        while hashes.len() > 1 {
            hashes = hashes
                .chunks_exact(2)
                .map(|p| node_hash(&p[0], &p[1]))
                .collect();
        }
        // 2^level leaves pair down to exactly one node; an empty list would be a bug
        // here, never the empty tree's root.
        assert_eq!(
            hashes.len(),
            1,
            "a perfect subtree of level {level} has one root"
        );
        Ok(hashes[0])
    }
}

impl LedgerReader {
    /// Number of durable entries.
    pub fn size(&self) -> u64 {
        read_lock(&self.shared.state).size
    }

    /// Current root.
    pub fn root(&self) -> Hash {
        read_lock(&self.shared.state).root
    }

    /// The log's origin (its checkpoint key's name).
    pub fn origin(&self) -> &str {
        &self.shared.origin
    }

    /// The C2SP verifier key.
    pub fn verifier_key(&self) -> &str {
        &self.shared.vkey
    }

    /// The verifier of this log's checkpoints.
    pub fn verifier(&self) -> &NoteVerifier {
        &self.shared.verifier
    }

    fn check_size(&self, size: u64) -> Result<RwLockReadGuard<'_, State>, LedgerError> {
        let st = read_lock(&self.shared.state);
        if size > st.size {
            return Err(LedgerError::OutOfRange(format!(
                "tree size {size} is beyond the log's {} entries",
                st.size
            )));
        }
        Ok(st)
    }

    /// Root of the tree of the first `size` entries.
    pub fn root_at(&self, size: u64) -> Result<Hash, LedgerError> {
        let st = self.check_size(size)?;
        ciyuan_tlog::root(
            &Nodes {
                shared: &self.shared,
                upper: &st.upper,
            },
            size,
        )
    }

    /// Inclusion proof of entry `index` in the tree of `size` entries.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LedgerError> {
        let st = self.check_size(size)?;
        ciyuan_tlog::inclusion_proof(
            &Nodes {
                shared: &self.shared,
                upper: &st.upper,
            },
            index,
            size,
        )
        .map_err(proof_error)
    }

    /// Consistency proof between two tree sizes.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LedgerError> {
        let st = self.check_size(new)?;
        ciyuan_tlog::consistency_proof(
            &Nodes {
                shared: &self.shared,
                upper: &st.upper,
            },
            old,
            new,
        )
        .map_err(proof_error)
    }

    /// The newest signed checkpoint.
    pub fn latest_checkpoint(&self) -> Option<SignedCheckpoint> {
        read_lock(&self.shared.checkpoints).latest.clone()
    }

    /// Number of checkpoints signed so far.
    pub fn checkpoint_count(&self) -> u64 {
        read_lock(&self.shared.checkpoints).count
    }

    /// Up to `limit` signed checkpoints, oldest first, from the `from`-th on (0 is the
    /// first ever signed). Read from the checkpoints file, each note's signature
    /// checked again on the way out: only the newest is held in memory.
    pub fn checkpoints(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<SignedCheckpoint>, LedgerError> {
        let (start, end, count) = {
            let ix = read_lock(&self.shared.checkpoints);
            if from >= ix.count || limit == 0 {
                return Ok(Vec::new());
            }
            let k = (from / CHECKPOINT_INDEX_STRIDE) as usize;
            (ix.sparse[k], ix.end, ix.count)
        };
        let mut skip = from % CHECKPOINT_INDEX_STRIDE;
        let mut out = Vec::with_capacity(limit.min((count - from) as usize));
        let verifier = &self.shared.verifier;
        let bad = scan_checkpoints(
            &self.shared.checkpoints_file,
            start,
            end,
            |at, note| {
                if skip > 0 {
                    skip -= 1;
                    return Ok(true);
                }
                let checkpoint =
                    ciyuan_tlog::open_checkpoint(verifier, note, Some(verifier.name()))
                        .map_err(|e| corrupt(format!("{CHECKPOINTS_FILE} offset {at}: {e}")))?;
                out.push(SignedCheckpoint {
                    checkpoint,
                    note: note.to_string(),
                });
                Ok(out.len() < limit)
            },
            LedgerError::io("reading checkpoints"),
        )?;
        if let Some((at, why)) = bad {
            // The frames up to `end` were whole and checked when they were written or
            // opened: a bad one now is damage done since.
            return Err(corrupt(format!("{CHECKPOINTS_FILE} offset {at}: {why}")));
        }
        Ok(out)
    }

    /// The segment holding `index` and the offset of its record.
    fn locate(&self, index: u64) -> Result<(Arc<File>, String, u64), LedgerError> {
        let (file, name) = {
            let st = read_lock(&self.shared.state);
            if index >= st.size {
                return Err(LedgerError::OutOfRange(format!(
                    "entry {index} does not exist (the log holds {})",
                    st.size
                )));
            }
            let i = st.segments.partition_point(|s| s.first <= index) - 1;
            (st.segments[i].file.clone(), st.segments[i].name.clone())
        };
        let mut side = [0u8; SIDECAR_ENTRY_BYTES];
        read_at_exact(
            &self.shared.sidecar,
            &mut side,
            index * SIDECAR_ENTRY_BYTES as u64,
            "the sidecar",
        )?;
        Ok((file, name, parse_sidecar(&side).1))
    }

    /// One entry's bytes, checked against its record checksum.
    pub fn entry(&self, index: u64) -> Result<Vec<u8>, LedgerError> {
        let (file, name, offset) = self.locate(index)?;
        let mut head = [0u8; RECORD_HEADER_BYTES];
        read_at_exact(&file, &mut head, offset, &name)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_ENTRY_BYTES {
            return Err(corrupt(format!(
                "{SEGMENTS_DIR}/{name} offset {offset} (entry {index}): bad length"
            )));
        }
        let mut rec = vec![0u8; RECORD_HEADER_BYTES + len];
        read_at_exact(&file, &mut rec, offset, &name)?;
        let (payload, _) = parse_record(&rec, index, MAX_ENTRY_BYTES).map_err(|why| {
            corrupt(format!(
                "{SEGMENTS_DIR}/{name} offset {offset} (entry {index}): {why}"
            ))
        })?;
        Ok(payload.to_vec())
    }

    /// Streams entries `range` in order, reading segments in large chunks.
    pub fn scan<E: From<LedgerError>>(
        &self,
        range: Range<u64>,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if range.start >= range.end {
            return Ok(());
        }
        drop(self.check_size(range.end).map_err(E::from)?);
        let mut index = range.start;
        while index < range.end {
            let (file, name, offset) = self.locate(index).map_err(E::from)?;
            let seg_end = {
                let st = read_lock(&self.shared.state);
                let i = st.segments.partition_point(|s| s.first <= index);
                st.segments.get(i).map(|s| s.first).unwrap_or(u64::MAX)
            };
            let stop = range.end.min(seg_end);
            // Where the range's bytes end in this segment, when the entry after it is
            // in the same segment: reads stop there, so scanning a few entries (the
            // projector behind a busy gateway) reads a few records, not a whole chunk.
            // At the log's end (the projector catching up, every few milliseconds behind a
            // busy gateway) there is no next entry: the file's length bounds the read
            // instead of a whole chunk being zeroed and read.
            let end_pos = (stop < seg_end)
                .then(|| self.locate(stop).ok().map(|(_, _, o)| o))
                .flatten()
                .or_else(|| file.metadata().ok().map(|m| m.len()));
            let mut pos = offset;
            let mut buf: Vec<u8> = Vec::new();
            let mut at = 0usize;
            while index < stop {
                if buf.len() - at < RECORD_HEADER_BYTES
                    || buf.len() - at
                        < RECORD_HEADER_BYTES
                            + u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
                                as usize
                {
                    // Refill from the current record on, with room for the whole record:
                    // its header says how long it is (up to the format's limit, whatever
                    // the options were when it was written).
                    pos += at as u64;
                    let mut head = [0u8; RECORD_HEADER_BYTES];
                    let got = read_some_at(&file, &mut head, pos)
                        .map_err(|e| E::from(LedgerError::io(format!("reading {name}"))(e)))?;
                    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
                    if got < RECORD_HEADER_BYTES || len > MAX_ENTRY_BYTES {
                        return Err(E::from(corrupt(format!(
                            "{SEGMENTS_DIR}/{name} offset {pos} (entry {index}): record cut short or too long"
                        ))));
                    }
                    let whole = RECORD_HEADER_BYTES + len;
                    let mut want = READ_CHUNK_BYTES.max(whole);
                    if let Some(end) = end_pos {
                        want = want.min(end.saturating_sub(pos) as usize).max(whole);
                    }
                    buf.resize(want, 0);
                    let n = read_some_at(&file, &mut buf, pos)
                        .map_err(|e| E::from(LedgerError::io(format!("reading {name}"))(e)))?;
                    buf.truncate(n);
                    at = 0;
                    if n < RECORD_HEADER_BYTES {
                        return Err(E::from(corrupt(format!(
                            "{SEGMENTS_DIR}/{name} offset {pos} (entry {index}): record cut short"
                        ))));
                    }
                }
                let (payload, total) =
                    parse_record(&buf[at..], index, MAX_ENTRY_BYTES).map_err(|why| {
                        E::from(corrupt(format!(
                            "{SEGMENTS_DIR}/{name} offset {} (entry {index}): {why}",
                            pos + at as u64
                        )))
                    })?;
                f(index, payload)?;
                at += total;
                index += 1;
            }
        }
        Ok(())
    }
}

/// Reads from `offset` until `buf` is full or the file ends; answers the bytes read.
pub(crate) fn read_some_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn proof_error(e: ciyuan_tlog::ProofError<LedgerError>) -> LedgerError {
    match e {
        ciyuan_tlog::ProofError::Source(e) => e,
        other => LedgerError::OutOfRange(other.to_string()),
    }
}
