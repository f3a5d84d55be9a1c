//! C2SP `tlog-checkpoint` texts inside C2SP `signed-note`s, signed with Ed25519.
//!
//! A signed note is the text (non-empty, every line ending in `\n`), a blank line, then
//! one or more lines `— <name> <base64(key id ‖ signature)>`. The key id is the first
//! four bytes of SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key); the verifier key is written
//! `<name>+<key id hex>+<base64(0x01 ‖ public key)>`.

use crate::Hash;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// Algorithm byte of Ed25519 keys in C2SP signed notes.
const ALG_ED25519: u8 = 0x01;
/// The dash that opens a signature line: U+2014 EM DASH and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Longest note accepted; checkpoints are a few hundred bytes.
const MAX_NOTE_BYTES: usize = 64 * 1024;

/// Why a note, key or checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// A key name with whitespace, `+`, or nothing.
    #[error("key name {0:?} must be non-empty without spaces or '+'")]
    BadName(String),
    /// Text that a note cannot carry.
    #[error("note text {0}")]
    BadText(&'static str),
    /// A malformed signed note.
    #[error("malformed signed note: {0}")]
    Malformed(&'static str),
    /// A malformed verifier key.
    #[error("malformed verifier key: {0}")]
    BadKey(&'static str),
    /// No signature by this key, or one that does not verify.
    #[error("no valid signature by key {0}")]
    NotSigned(String),
    /// A malformed checkpoint text.
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(&'static str),
    /// A checkpoint of another log.
    #[error("checkpoint origin {found:?} is not the expected {expected:?}")]
    WrongOrigin {
        /// Origin expected.
        expected: String,
        /// Origin found.
        found: String,
    },
}

fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(NoteError::BadName(name.to_string()));
    }
    Ok(())
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if text.is_empty() || !text.ends_with('\n') {
        return Err(NoteError::BadText(
            "must be non-empty and end with a newline",
        ));
    }
    if text.contains("\n\n") || text.starts_with('\n') {
        return Err(NoteError::BadText("must not contain blank lines"));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::BadText("must not contain control characters"));
    }
    Ok(())
}

fn key_id(name: &str, public: &[u8; 32]) -> u32 {
    let h = Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update(b"\n")
        .chain_update([ALG_ED25519])
        .chain_update(public)
        .finalize();
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// Signs notes with one Ed25519 key under one name.
pub struct NoteSigner {
    name: String,
    key: SigningKey,
    id: u32,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoteSigner({}+{:08x})", self.name, self.id)
    }
}

impl NoteSigner {
    /// A signer named `name` (by convention the log's origin).
    pub fn new(name: &str, key: SigningKey) -> Result<NoteSigner, NoteError> {
        check_name(name)?;
        let id = key_id(name, key.verifying_key().as_bytes());
        Ok(NoteSigner {
            name: name.to_string(),
            key,
            id,
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The verifier key, `name+keyid+base64(0x01 ‖ public key)`.
    pub fn verifier_key(&self) -> String {
        let mut raw = [0u8; 33];
        raw[0] = ALG_ED25519;
        raw[1..].copy_from_slice(self.key.verifying_key().as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }

    /// Signs `text`, giving the whole signed note.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        let sig = self.key.sign(text.as_bytes());
        let mut raw = [0u8; 68];
        raw[..4].copy_from_slice(&self.id.to_be_bytes());
        raw[4..].copy_from_slice(&sig.to_bytes());
        Ok(format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.name,
            B64.encode(raw)
        ))
    }
}

/// Checks notes against one verifier key.
#[derive(Debug, Clone)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses a verifier key `name+keyid+base64(0x01 ‖ public key)`.
    pub fn from_vkey(vkey: &str) -> Result<NoteVerifier, NoteError> {
        let vkey = vkey.trim_end_matches('\n');
        // The base64 key may itself contain '+': split at the first two only.
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::BadKey("expected name+keyid+key"));
        };
        check_name(name)?;
        if id_hex.len() != 8 || !id_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NoteError::BadKey("key id is not 8 hex digits"));
        }
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| NoteError::BadKey("key id"))?;
        let raw = B64
            .decode(key_b64)
            .map_err(|_| NoteError::BadKey("key is not base64"))?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(NoteError::BadKey("not an Ed25519 key"));
        }
        let mut public = [0u8; 32];
        public.copy_from_slice(&raw[1..]);
        if key_id(name, &public) != id {
            return Err(NoteError::BadKey("key id does not match the key"));
        }
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| NoteError::BadKey("not a valid Ed25519 point"))?;
        Ok(NoteVerifier {
            name: name.to_string(),
            id,
            key,
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// Checks a signed note; answers its text when a signature by this key verifies.
    /// Signatures by other keys are ignored, as the spec asks.
    pub fn verify<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        if note.len() > MAX_NOTE_BYTES {
            return Err(NoteError::Malformed("too long"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
        check_text(text).map_err(|_| NoteError::Malformed("bad text"))?;
        if sigs.is_empty() || !sigs.ends_with('\n') {
            return Err(NoteError::Malformed(
                "signature block must end with a newline",
            ));
        }
        let mut found = false;
        for line in sigs[..sigs.len() - 1].split('\n') {
            let rest = line.strip_prefix(SIG_PREFIX).ok_or(NoteError::Malformed(
                "signature line must start with an em dash",
            ))?;
            let (name, b64) = rest.split_once(' ').ok_or(NoteError::Malformed(
                "signature line must be '— name signature'",
            ))?;
            check_name(name).map_err(|_| NoteError::Malformed("bad signer name"))?;
            let raw = B64
                .decode(b64)
                .map_err(|_| NoteError::Malformed("signature is not base64"))?;
            if raw.len() < 5 {
                return Err(NoteError::Malformed("signature too short"));
            }
            if name != self.name || raw[..4] != self.id.to_be_bytes() {
                continue;
            }
            let sig = Signature::from_slice(&raw[4..])
                .map_err(|_| NoteError::NotSigned(self.name.clone()))?;
            if self.key.verify(text.as_bytes(), &sig).is_err() {
                return Err(NoteError::NotSigned(self.name.clone()));
            }
            found = true;
        }
        if !found {
            return Err(NoteError::NotSigned(self.name.clone()));
        }
        Ok(text)
    }
}

/// A C2SP `tlog-checkpoint`: origin, tree size, root hash, optional extension lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name.
    pub origin: String,
    /// Number of entries.
    pub size: u64,
    /// RFC 6962 root of those entries.
    pub root: Hash,
    /// Extra lines, opaque here.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The checkpoint text, ready to sign.
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

    /// Parses a checkpoint text strictly.
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(NoteError::BadCheckpoint("must end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines.next().unwrap_or("");
        if origin.is_empty() {
            return Err(NoteError::BadCheckpoint("empty origin"));
        }
        let size_text = lines
            .next()
            .ok_or(NoteError::BadCheckpoint("no size line"))?;
        if size_text.is_empty()
            || !size_text.bytes().all(|b| b.is_ascii_digit())
            || (size_text.len() > 1 && size_text.starts_with('0'))
        {
            return Err(NoteError::BadCheckpoint("size is not a decimal number"));
        }
        let size: u64 = size_text
            .parse()
            .map_err(|_| NoteError::BadCheckpoint("size overflows"))?;
        let root_text = lines
            .next()
            .ok_or(NoteError::BadCheckpoint("no root line"))?;
        let raw = B64
            .decode(root_text)
            .map_err(|_| NoteError::BadCheckpoint("root is not canonical base64"))?;
        let root: Hash = raw
            .try_into()
            .map_err(|_| NoteError::BadCheckpoint("root is not 32 bytes"))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(NoteError::BadCheckpoint("empty extension line"));
        }
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }
}

/// Verifies a signed checkpoint note and parses it; checks the origin when given.
pub fn open_checkpoint(
    verifier: &NoteVerifier,
    note: &str,
    expected_origin: Option<&str>,
) -> Result<Checkpoint, NoteError> {
    let text = verifier.verify(note)?;
    let c = Checkpoint::parse(text)?;
    if let Some(o) = expected_origin
        && c.origin != o
    {
        return Err(NoteError::WrongOrigin {
            expected: o.to_string(),
            found: c.origin,
        });
    }
    Ok(c)
}
