//! Offline verification of a ledger directory or an audit bundle, from the bytes alone.
//!
//! Strict by design: every byte must be accounted for. A ledger left by a crash is
//! repaired by opening it once (`ciyuan serve` or `ciyuan rebuild`), never by the
//! verifier, which only judges.

use crate::bundle::{
    CHECKPOINTS_DIR, ENTRIES_FILE, LEAF_HASHES_FILE, PUBLIC_KEY_FILE, README_FILE,
};
use crate::format::*;
use crate::keys;
use ciyuan_tlog::{Checkpoint, Frontier, Hash, NoteVerifier, leaf_hash};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Instant;

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints whose signature and root were checked.
    pub checkpoints: u64,
    /// Tree size of the newest checkpoint (or of all entries if none).
    pub size: u64,
    /// Root of all entries.
    pub root: Hash,
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
    let started = Instant::now();
    let mut report = if path.join("segments").is_dir() {
        verify_ledger(path)?
    } else if path.join(ENTRIES_FILE).is_file() {
        verify_bundle(path)?
    } else {
        return fail(format!(
            "{} is neither a ledger directory (segments/) nor an audit bundle ({ENTRIES_FILE})",
            path.display()
        ));
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Fails on any file in `dir` that is not in `allowed`: nothing unaccounted for.
fn only_expected(dir: &Path, allowed: &[&str], what: &str) -> Result<(), VerifyFailure> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| VerifyFailure(format!("{}: {e}", dir.display())))?;
    for e in entries {
        let name = e
            .map_err(|e| VerifyFailure(e.to_string()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if !allowed.contains(&name.as_str()) {
            return fail(format!("{name}: unexpected file in {what}"));
        }
    }
    Ok(())
}

fn read_verifier(path: &Path) -> Result<(NoteVerifier, String), VerifyFailure> {
    let text = std::fs::read_to_string(path.join(PUBLIC_KEY_FILE))
        .map_err(|e| VerifyFailure(format!("{PUBLIC_KEY_FILE}: {e}")))?;
    let Some(line) = text.strip_suffix('\n') else {
        return fail(format!(
            "{PUBLIC_KEY_FILE}: must be one line ending in a newline"
        ));
    };
    let v = NoteVerifier::from_vkey(line)
        .map_err(|e| VerifyFailure(format!("{PUBLIC_KEY_FILE}: {e}")))?;
    Ok((v, line.to_string()))
}

/// Roots recorded while leaves stream past, at the sizes checkpoints claim.
struct Roots {
    frontier: Frontier,
    wanted: Vec<u64>,
    next: usize,
    found: BTreeMap<u64, Hash>,
}

impl Roots {
    fn new(mut wanted: Vec<u64>) -> Roots {
        wanted.sort_unstable();
        wanted.dedup();
        let mut r = Roots {
            frontier: Frontier::new(),
            wanted,
            next: 0,
            found: BTreeMap::new(),
        };
        r.record();
        r
    }

    fn record(&mut self) {
        while self.next < self.wanted.len() && self.wanted[self.next] == self.frontier.size() {
            self.found
                .insert(self.frontier.size(), self.frontier.root());
            self.next += 1;
        }
    }

    #[inline]
    fn push(&mut self, leaf: Hash) {
        self.frontier.push(leaf, |_, _, _| {});
        if self.next < self.wanted.len() && self.wanted[self.next] == self.frontier.size() {
            self.record();
        }
    }
}

/// Checks signed checkpoints against the roots found; returns the newest size.
fn check_checkpoints(
    cps: &[(String, Checkpoint)],
    roots: &Roots,
    entries: u64,
) -> Result<u64, VerifyFailure> {
    let mut newest = 0;
    for (name, c) in cps {
        if c.size > entries {
            return fail(format!(
                "{name}: covers {} entries but only {entries} are present",
                c.size
            ));
        }
        match roots.found.get(&c.size) {
            Some(r) if *r == c.root => {}
            _ => {
                return fail(format!(
                    "{name}: the root of the first {} entries does not match the signed root",
                    c.size
                ));
            }
        }
        newest = newest.max(c.size);
    }
    // Equal roots recomputed from one sequence of leaves make every checkpoint's tree a
    // prefix of the next: that is what a consistency proof between them would show.
    Ok(newest)
}

fn open_note(verifier: &NoteVerifier, name: &str, note: &str) -> Result<Checkpoint, VerifyFailure> {
    ciyuan_tlog::open_checkpoint(verifier, note, Some(verifier.name()))
        .map_err(|e| VerifyFailure(format!("{name}: {e} (checked with {PUBLIC_KEY_FILE})")))
}

fn verify_ledger(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
    // A ledger a server is appending to changes under the verifier's feet; say so
    // rather than report a half-written tail as damage.
    if let Ok(lock) = File::open(dir.join("LOCK")) {
        if let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock() {
            return fail(
                "LOCK: the ledger is open in a running server; stop it, or verify an export \
                 (ciyuan audit export DIR)",
            );
        }
    }
    let (verifier, vkey) = read_verifier(dir)?;
    let secret_path = dir.join(keys::SIGNING_KEY_FILE);
    if secret_path.exists() {
        let text = std::fs::read_to_string(&secret_path)
            .map_err(|e| VerifyFailure(format!("{}: {e}", keys::SIGNING_KEY_FILE)))?;
        let signer = keys::parse_signing_key(&text)
            .map_err(|e| VerifyFailure(format!("{}: {e}", keys::SIGNING_KEY_FILE)))?;
        if signer.verifier_key() != vkey || !text.ends_with('\n') || text.matches('\n').count() != 1
        {
            return fail(format!(
                "{} does not match {PUBLIC_KEY_FILE}",
                keys::SIGNING_KEY_FILE
            ));
        }
    }
    only_expected(
        dir,
        &[
            "segments",
            "leaves",
            "checkpoints",
            "signing.key",
            "public.key",
            "LOCK",
        ],
        "the ledger directory",
    )?;

    // Checkpoints first, so the roots to look for are known while leaves stream past.
    let cp_bytes = std::fs::read(dir.join("checkpoints")).unwrap_or_default();
    let (notes, bad) = parse_checkpoints(&cp_bytes);
    if let Some((at, why)) = bad {
        return fail(format!("checkpoints offset {at}: {why}"));
    }
    let mut cps = Vec::with_capacity(notes.len());
    let mut last_size = 0;
    for (at, note) in &notes {
        let name = format!("checkpoints offset {at}");
        let c = open_note(&verifier, &name, note)?;
        if c.size < last_size {
            return fail(format!(
                "{name}: size {} is smaller than an earlier checkpoint's",
                c.size
            ));
        }
        last_size = c.size;
        cps.push((name, c));
    }
    let mut roots = Roots::new(cps.iter().map(|(_, c)| c.size).collect());

    let seg_dir = dir.join("segments");
    let mut firsts = Vec::new();
    for e in std::fs::read_dir(&seg_dir).map_err(|e| VerifyFailure(format!("segments: {e}")))? {
        let name = e
            .map_err(|e| VerifyFailure(e.to_string()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        match parse_segment_name(&name) {
            Some(f) => firsts.push(f),
            None => return fail(format!("segments/{name}: not a segment file")),
        }
    }
    firsts.sort_unstable();

    let side_file =
        File::open(dir.join("leaves")).map_err(|e| VerifyFailure(format!("leaves: {e}")))?;
    let side_len = side_file.metadata().map(|m| m.len()).unwrap_or(0);
    if side_len % SIDECAR_ENTRY_BYTES as u64 != 0 {
        return fail(format!(
            "leaves: {} trailing bytes",
            side_len % SIDECAR_ENTRY_BYTES as u64
        ));
    }
    let side_entries = side_len / SIDECAR_ENTRY_BYTES as u64;
    let mut side = BufReader::with_capacity(1 << 20, side_file);

    let mut index = 0u64;
    let mut seg_bytes = Vec::new();
    for first in firsts {
        let name = format!("segments/{}", segment_name(first));
        if first != index {
            return fail(format!(
                "{name}: starts at entry {first}, but the previous segments end at {index}"
            ));
        }
        seg_bytes.clear();
        File::open(dir.join(&name))
            .and_then(|mut f| f.read_to_end(&mut seg_bytes))
            .map_err(|e| VerifyFailure(format!("{name}: {e}")))?;
        if !check_segment_header(&seg_bytes) {
            return fail(format!("{name}: bad segment header"));
        }
        let mut at = SEGMENT_HEADER_BYTES;
        let mut side_entry = [0u8; SIDECAR_ENTRY_BYTES];
        while at < seg_bytes.len() {
            let (payload, total) =
                parse_record(&seg_bytes[at..], index, usize::MAX >> 1).map_err(|why| {
                    VerifyFailure(format!("{name} offset {at} (entry {index}): {why}"))
                })?;
            let leaf = leaf_hash(payload);
            if index >= side_entries {
                return fail(format!(
                    "leaves: has {side_entries} entries but {name} holds entry {index}"
                ));
            }
            side.read_exact(&mut side_entry)
                .map_err(|e| VerifyFailure(format!("leaves: {e}")))?;
            let (side_leaf, side_off) = parse_sidecar(&side_entry);
            if side_leaf != leaf || side_off != at as u64 {
                return fail(format!(
                    "leaves entry {index}: does not match {name} offset {at} (entry {index})"
                ));
            }
            roots.push(leaf);
            at += total;
            index += 1;
        }
    }
    if side_entries != index {
        return fail(format!(
            "leaves: has {side_entries} entries, the segments hold {index}"
        ));
    }
    let root = roots.frontier.root();
    let newest = check_checkpoints(&cps, &roots, index)?;
    Ok(VerifyReport {
        entries: index,
        checkpoints: cps.len() as u64,
        size: newest.max(index),
        root,
        seconds: 0.0,
    })
}

fn verify_bundle(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
    let (verifier, _) = read_verifier(dir)?;
    only_expected(
        dir,
        &[
            ENTRIES_FILE,
            LEAF_HASHES_FILE,
            CHECKPOINTS_DIR,
            PUBLIC_KEY_FILE,
            README_FILE,
        ],
        "the bundle",
    )?;
    let mut cps = Vec::new();
    let cp_dir = dir.join(CHECKPOINTS_DIR);
    if cp_dir.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(&cp_dir)
            .map_err(|e| VerifyFailure(format!("{CHECKPOINTS_DIR}: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        for n in names {
            let name = format!("{CHECKPOINTS_DIR}/{n}");
            let note = std::fs::read_to_string(cp_dir.join(&n))
                .map_err(|e| VerifyFailure(format!("{name}: {e}")))?;
            let c = open_note(&verifier, &name, &note)?;
            if n != format!("{:020}.note", c.size) {
                return fail(format!(
                    "{name}: the file name does not match the checkpoint's size {}",
                    c.size
                ));
            }
            cps.push((name, c));
        }
    }
    let mut roots = Roots::new(cps.iter().map(|(_, c)| c.size).collect());
    let open = |name: &str| {
        File::open(dir.join(name))
            .map(|f| BufReader::with_capacity(1 << 20, f))
            .map_err(|e| VerifyFailure(format!("{name}: {e}")))
    };
    let mut entries = open(ENTRIES_FILE)?;
    let mut leaves = open(LEAF_HASHES_FILE)?;
    let (mut line, mut hex_line) = (Vec::with_capacity(512), Vec::with_capacity(66));
    let mut index = 0u64;
    loop {
        line.clear();
        hex_line.clear();
        let n = entries
            .read_until(b'\n', &mut line)
            .map_err(|e| VerifyFailure(format!("{ENTRIES_FILE}: {e}")))?;
        let m = leaves
            .read_until(b'\n', &mut hex_line)
            .map_err(|e| VerifyFailure(format!("{LEAF_HASHES_FILE}: {e}")))?;
        if n == 0 && m == 0 {
            break;
        }
        let lineno = index + 1;
        if n == 0 || m == 0 {
            return fail(format!(
                "entry {index}: {ENTRIES_FILE} and {LEAF_HASHES_FILE} have different numbers of lines (line {lineno})"
            ));
        }
        if line.last() != Some(&b'\n') || line.len() == 1 {
            return fail(format!(
                "{ENTRIES_FILE} line {lineno} (entry {index}): empty or without a final newline"
            ));
        }
        let mut want = [0u8; 32];
        if hex_line.len() != 65
            || hex_line[64] != b'\n'
            || hex::decode_to_slice(&hex_line[..64], &mut want).is_err()
            || hex_line[..64].iter().any(u8::is_ascii_uppercase)
        {
            return fail(format!(
                "{LEAF_HASHES_FILE} line {lineno}: not a lower-case hex SHA-256"
            ));
        }
        let leaf = leaf_hash(&line[..line.len() - 1]);
        if leaf != want {
            return fail(format!(
                "entry {index}: {ENTRIES_FILE} line {lineno} does not hash to {LEAF_HASHES_FILE} line {lineno}"
            ));
        }
        roots.push(leaf);
        index += 1;
    }
    let root = roots.frontier.root();
    let newest = check_checkpoints(&cps, &roots, index)?;
    if cps.is_empty() {
        return fail(format!(
            "{CHECKPOINTS_DIR}: no signed checkpoint: nothing vouches for the entries"
        ));
    }
    if newest != index {
        return fail(format!(
            "{ENTRIES_FILE}: entries {newest} to {} are not covered by any signed checkpoint",
            index - 1
        ));
    }
    Ok(VerifyReport {
        entries: index,
        checkpoints: cps.len() as u64,
        size: newest,
        root,
        seconds: 0.0,
    })
}
