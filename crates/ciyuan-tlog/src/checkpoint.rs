//! C2SP `tlog-checkpoint`s: the signed statement of a log's size and root.

use crate::Hash;
use crate::note::{NoteError, NoteVerifier, excerpt, find_control};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// A C2SP `tlog-checkpoint`: origin, tree size, root hash, and optional extension lines.
///
/// [`Checkpoint::to_text`] writes the note text to sign; [`Checkpoint::parse`] reads it
/// back. Text from `to_text` parses back to the same checkpoint as long as the origin
/// and every extension line are non-empty and hold no newline or other control
/// character, which `parse` would refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity, by convention a schema-less URL such as `example.com/log`.
    pub origin: String,
    /// Number of leaves in the tree.
    pub size: u64,
    /// RFC 6962 root hash of those leaves.
    pub root: Hash,
    /// Lines after the root hash, opaque here.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The checkpoint text, ready to sign: origin, size in decimal and root in base64,
    /// then the extension lines, each line ending in a newline.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for e in &self.extensions {
            s.push_str(e);
            s.push('\n');
        }
        s
    }

    /// Parses a checkpoint text strictly: every line ends in a newline; a non-empty
    /// origin; the size in decimal without leading zeros (except `0` itself); the root in
    /// canonical, padded standard base64 of exactly 32 bytes; no empty extension lines;
    /// and no control characters but the newlines.
    ///
    /// Strictness makes the text canonical: one checkpoint has exactly one text, so two
    /// signed notes for the same tree head cannot differ in hidden ways.
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = |why: String| NoteError::MalformedCheckpoint(why);
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("the text does not end in a newline".into()))?;
        if let Some(c) = find_control(body) {
            return Err(bad(format!("it contains the control character {c:?}")));
        }
        let mut lines = body.split('\n');
        let origin = lines.next().unwrap_or_default();
        if origin.is_empty() {
            return Err(bad("the origin line is empty".into()));
        }
        let size_text = lines
            .next()
            .ok_or_else(|| bad("there is no tree size line".into()))?;
        if size_text.is_empty()
            || !size_text.bytes().all(|b| b.is_ascii_digit())
            || (size_text.len() > 1 && size_text.starts_with('0'))
        {
            return Err(bad(format!(
                "the tree size {} is not a decimal number without leading zeros",
                excerpt(size_text)
            )));
        }
        let size: u64 = size_text.parse().map_err(|_| {
            bad(format!(
                "the tree size {} does not fit in 64 bits",
                excerpt(size_text)
            ))
        })?;
        let root_text = lines
            .next()
            .ok_or_else(|| bad("there is no root hash line".into()))?;
        let raw = B64.decode(root_text).map_err(|_| {
            bad(format!(
                "the root hash {} is not canonical standard base64",
                excerpt(root_text)
            ))
        })?;
        let root: Hash = raw
            .try_into()
            .map_err(|raw: Vec<u8>| bad(format!("the root hash is {} bytes, not 32", raw.len())))?;
        let mut extensions = Vec::new();
        for (i, line) in lines.enumerate() {
            if line.is_empty() {
                return Err(bad(format!("extension line {} is empty", i + 1)));
            }
            extensions.push(line.to_string());
        }
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }
}

/// Verifies a signed checkpoint note with `verifier` and parses its text; when
/// `expected_origin` is given, also checks that the checkpoint is that log's.
pub fn open_checkpoint(
    verifier: &NoteVerifier,
    note: &str,
    expected_origin: Option<&str>,
) -> Result<Checkpoint, NoteError> {
    let text = verifier.verify(note)?;
    let checkpoint = Checkpoint::parse(text)?;
    match expected_origin {
        Some(expected) if checkpoint.origin != expected => Err(NoteError::WrongOrigin {
            expected: expected.to_string(),
            found: checkpoint.origin,
        }),
        _ => Ok(checkpoint),
    }
}
