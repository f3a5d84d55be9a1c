//! Audit bundles: the log as plain files a third party can check by hand.

use crate::LedgerError;
use crate::ledger::LedgerReader;
use ciyuan_tlog::{Checkpoint, NoteVerifier, leaf_hash};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Entries, one per line, exactly the hashed bytes.
pub const ENTRIES_FILE: &str = "entries.jsonl";
/// Leaf hashes in hex, one per line: a locator that lets a verifier name the first bad
/// entry instead of only saying that a root differs.
pub const LEAF_HASHES_FILE: &str = "leaf-hashes.txt";
/// Signed checkpoints, one file each, named by tree size.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The verifier key.
pub const PUBLIC_KEY_FILE: &str = "public.key";
/// How to check by hand.
pub const README_FILE: &str = "README.txt";

/// The README written into every bundle. The verifier compares it byte for byte, so a
/// bundle is exactly what the exporter wrote.
pub(crate) const README: &str = "Ciyuan audit bundle

entries.jsonl     one ledger entry per line; entry N (from 0) is on line N+1
leaf-hashes.txt   hex SHA-256(0x00 || entry bytes without the newline), one per line:
                  a locator that names the first entry that changed
checkpoints/      C2SP signed notes of tlog-checkpoints, named by tree size
public.key        the C2SP Ed25519 verifier key (name+keyid+base64) that signed them

To check by hand:
1. leaf = SHA-256(0x00 || line bytes without the newline), for every line.
2. The RFC 6962 Merkle tree hash of n leaves: the leaf itself when n = 1; otherwise
   node = SHA-256(0x01 || left || right), where left is the tree of the first k
   leaves, k the largest power of two below n, and right the tree of the rest.
3. Each checkpoint note is: origin line, tree size line, base64 root line, a blank
   line, then signature lines '\u{2014} name base64(keyid || Ed25519 signature)'. The
   signature covers the text before the blank line, newlines included. Check it with
   the key in public.key, and compare the root with that of the first SIZE leaves.
4. The newest checkpoint must cover every line of entries.jsonl.
`ciyuan audit verify DIR` does all of this, and proves each checkpoint consistent
with the next.
";

/// What a bundle holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    /// Entries written.
    pub entries: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
}

/// Writes a bundle as a stream: every entry in log order, then the checkpoints, then
/// [`BundleWriter::finish`]. Memory stays small however long the log is.
pub struct BundleWriter {
    out: std::path::PathBuf,
    entries: BufWriter<File>,
    leaves: BufWriter<File>,
    verifier: NoteVerifier,
    vkey: String,
    count: u64,
    checkpoints: u64,
}

fn create(path: &Path) -> Result<BufWriter<File>, LedgerError> {
    File::create(path)
        .map(|f| BufWriter::with_capacity(1 << 20, f))
        .map_err(LedgerError::io(format!("creating {}", path.display())))
}

/// Checkpoints read per page while exporting.
const EXPORT_CHECKPOINTS_PER_PAGE: usize = 1024;

impl BundleWriter {
    /// Starts a bundle in `out`, which must not exist or be empty; `vkey` is the
    /// verifier key of the log's checkpoints.
    pub fn create(out: &Path, vkey: &str) -> Result<BundleWriter, LedgerError> {
        let verifier = NoteVerifier::from_vkey(vkey)
            .map_err(|e| LedgerError::Invalid(format!("public key: {e}")))?;
        if out.exists() {
            let mut it = std::fs::read_dir(out)
                .map_err(LedgerError::io(format!("reading {}", out.display())))?;
            if it.next().is_some() {
                return Err(LedgerError::Invalid(format!(
                    "{} exists and is not empty",
                    out.display()
                )));
            }
        }
        std::fs::create_dir_all(out.join(CHECKPOINTS_DIR))
            .map_err(LedgerError::io(format!("creating {}", out.display())))?;
        Ok(BundleWriter {
            out: out.to_path_buf(),
            entries: create(&out.join(ENTRIES_FILE))?,
            leaves: create(&out.join(LEAF_HASHES_FILE))?,
            verifier,
            vkey: vkey.trim_end_matches('\n').to_string(),
            count: 0,
            checkpoints: 0,
        })
    }

    /// Adds the next entry.
    pub fn entry(&mut self, entry: &[u8]) -> Result<(), LedgerError> {
        if self.checkpoints > 0 {
            return Err(LedgerError::Invalid(
                "entries go into a bundle before its checkpoints".into(),
            ));
        }
        if entry.contains(&b'\n') || entry.is_empty() {
            return Err(LedgerError::Invalid(format!(
                "entry {} is empty or has a newline",
                self.count
            )));
        }
        let mut hex_buf = [0u8; 65];
        hex::encode_to_slice(leaf_hash(entry), &mut hex_buf[..64])
            .map_err(|e| LedgerError::Invalid(e.to_string()))?;
        hex_buf[64] = b'\n';
        let w = self
            .entries
            .write_all(entry)
            .and_then(|_| self.entries.write_all(b"\n"))
            .and_then(|_| self.leaves.write_all(&hex_buf));
        w.map_err(LedgerError::io("writing the bundle"))?;
        self.count += 1;
        Ok(())
    }

    /// Adds a signed checkpoint note, after all the entries; one that covers more
    /// entries than the bundle holds is left out. Answers whether it was written.
    pub fn checkpoint(&mut self, note: &str) -> Result<bool, LedgerError> {
        let text = self
            .verifier
            .verify(note)
            .map_err(|e| LedgerError::Invalid(format!("checkpoint: {e}")))?;
        let c = Checkpoint::parse(text).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        if c.size > self.count {
            return Ok(false);
        }
        let path = self
            .out
            .join(CHECKPOINTS_DIR)
            .join(format!("{:020}.note", c.size));
        std::fs::write(&path, note)
            .map_err(LedgerError::io(format!("writing {}", path.display())))?;
        self.checkpoints += 1;
        Ok(true)
    }

    /// Entries added so far.
    pub fn entries(&self) -> u64 {
        self.count
    }

    /// Writes the key and the README, and flushes everything.
    pub fn finish(mut self) -> Result<BundleSummary, LedgerError> {
        self.entries
            .flush()
            .map_err(LedgerError::io("writing the bundle"))?;
        self.leaves
            .flush()
            .map_err(LedgerError::io("writing the bundle"))?;
        let out = &self.out;
        let write = |name: &str, body: &str| {
            std::fs::write(out.join(name), body).map_err(LedgerError::io(format!("writing {name}")))
        };
        write(PUBLIC_KEY_FILE, &format!("{}\n", self.vkey))?;
        write(README_FILE, README)?;
        Ok(BundleSummary {
            entries: self.count,
            checkpoints: self.checkpoints,
        })
    }
}

/// Writes a bundle from entries given in log order, the signed checkpoint notes, and
/// the verifier key. `out` must not exist or be empty. Checkpoints beyond the entries
/// given are left out.
pub fn write_bundle<'a>(
    out: &Path,
    entries: impl Iterator<Item = &'a [u8]>,
    notes: &[String],
    vkey: &str,
) -> Result<BundleSummary, LedgerError> {
    let mut w = BundleWriter::create(out, vkey)?;
    for e in entries {
        w.entry(e)?;
    }
    for note in notes {
        w.checkpoint(note)?;
    }
    w.finish()
}

/// [`export_bundle`] of any [`ciyuan_store::Log`] (the PostgreSQL log, say): the
/// entries up to its newest signed checkpoint and every checkpoint signed by then.
pub fn export_log(log: &dyn ciyuan_store::Log, out: &Path) -> Result<BundleSummary, LedgerError> {
    let Some(latest) = log.latest_checkpoint() else {
        return Err(LedgerError::Invalid(
            "the log has no signed checkpoint yet: sign one before exporting".into(),
        ));
    };
    let size = latest.checkpoint.size;
    let mut w = BundleWriter::create(out, &log.verifier_key())?;
    let mut failed = None;
    log.scan(0..size, &mut |_, bytes| {
        w.entry(bytes).map_err(|e| {
            let m = e.to_string();
            failed = Some(e);
            ciyuan_store::LogError::Io(m)
        })
    })
    .map_err(|e| {
        failed
            .take()
            .unwrap_or_else(|| LedgerError::Invalid(e.to_string()))
    })?;
    let mut from = 0;
    loop {
        let page = log
            .checkpoints(from, EXPORT_CHECKPOINTS_PER_PAGE)
            .map_err(|e| LedgerError::Invalid(e.to_string()))?;
        for c in page.iter().filter(|c| c.checkpoint.size <= size) {
            w.checkpoint(&c.note)?;
        }
        if page.len() < EXPORT_CHECKPOINTS_PER_PAGE {
            break;
        }
        from += page.len() as u64;
    }
    w.finish()
}

/// Writes the log as a bundle, up to its newest signed checkpoint, streaming entries
/// and checkpoints (a page at a time) so memory stays small.
///
/// The bundle ends at the newest signed checkpoint: entries appended after it are not
/// vouched for by any signature, so a verifier could not tell them from forgeries. With
/// no checkpoint yet there is nothing to export and this fails.
pub fn export_bundle(reader: &LedgerReader, out: &Path) -> Result<BundleSummary, LedgerError> {
    let Some(latest) = reader.latest_checkpoint() else {
        return Err(LedgerError::Invalid(
            "the ledger has no signed checkpoint yet: sign one before exporting".into(),
        ));
    };
    let size = latest.checkpoint.size;
    let mut w = BundleWriter::create(out, reader.verifier_key())?;
    reader.scan(0..size, |_, bytes| w.entry(bytes))?;
    // Checkpoints signed while exporting cover more than `size`, and are left out.
    let mut from = 0;
    loop {
        let page = reader.checkpoints(from, EXPORT_CHECKPOINTS_PER_PAGE)?;
        for c in &page {
            w.checkpoint(&c.note)?;
        }
        if page.len() < EXPORT_CHECKPOINTS_PER_PAGE {
            break;
        }
        from += page.len() as u64;
    }
    w.finish()
}
