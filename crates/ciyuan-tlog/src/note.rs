//! C2SP `signed-note`s with Ed25519 keys.
//!
//! A signed note is the text (ending in `\n`), a blank line, then one or more lines
//! `— <name> <base64(key id ‖ signature)>`. The key id is the first four bytes of
//! SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key), big-endian; the verifier key is written
//! `<name>+<key id as 8 hex digits>+<base64(0x01 ‖ public key)>`, the form the Go
//! reference implementation (the `sumdb/note` package of the Go x/mod module) reads and
//! writes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Signature type byte of Ed25519 keys in C2SP signed notes.
const ALG_ED25519: u8 = 0x01;
/// What opens a signature line: U+2014 EM DASH and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Largest note accepted. The spec asks verifiers to accept at least 16 signatures of up
/// to about 5 kB each; this leaves ample room while bounding the work per note.
const MAX_NOTE_BYTES: usize = 1 << 20;
/// Most signature lines accepted, as in the Go reference implementation.
const MAX_SIGNATURES: usize = 100;
/// Room left for signature lines when signing, so that what `sign` makes `verify`
/// accepts.
const SIGNATURE_ROOM: usize = 4 << 10;

/// Why a key, note or checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// A key name that is empty or has whitespace or `+`.
    #[error("invalid key name {0:?}: it must be non-empty, without spaces or '+'")]
    BadName(String),
    /// Text that a note cannot carry.
    #[error("cannot sign this text: it {0}")]
    BadText(&'static str),
    /// A verifier key that does not parse.
    #[error("malformed verifier key: {0}")]
    MalformedKey(String),
    /// A signed note that does not follow the format.
    #[error("malformed signed note: {0}")]
    MalformedNote(String),
    /// The note carries no signature by the verifier's key.
    #[error("the note has no signature by key {name}+{key_id:08x}")]
    NotSigned {
        /// Name of the key.
        name: String,
        /// Id of the key.
        key_id: u32,
    },
    /// The note carries a signature by the verifier's key that does not verify.
    #[error("the signature by key {name}+{key_id:08x} does not verify")]
    BadSignature {
        /// Name of the key.
        name: String,
        /// Id of the key.
        key_id: u32,
    },
    /// A checkpoint text that does not follow the format.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(String),
    /// A checkpoint of another log.
    #[error("checkpoint origin {found:?} is not the expected {expected:?}")]
    WrongOrigin {
        /// Origin expected.
        expected: String,
        /// Origin found.
        found: String,
    },
}

/// Key names must be non-empty and free of Unicode white space and `+`, so that the
/// signature line and the `+`-separated verifier key split unambiguously.
fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(NoteError::BadName(name.to_string()));
    }
    Ok(())
}

/// The spec forbids ASCII control characters other than newline anywhere in a note.
pub(crate) fn find_control(s: &str) -> Option<char> {
    s.chars().find(|&c| c < ' ' && c != '\n')
}

/// At most 64 characters of untrusted input, quoted, for error messages.
pub(crate) fn excerpt(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{:?}…", &s[..at]),
        None => format!("{s:?}"),
    }
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

fn encode_vkey(name: &str, id: u32, public: &VerifyingKey) -> String {
    let mut raw = [0u8; 33];
    raw[0] = ALG_ED25519;
    raw[1..].copy_from_slice(public.as_bytes());
    format!("{name}+{id:08x}+{}", B64.encode(raw))
}

/// Signs notes with one Ed25519 key under one name.
pub struct NoteSigner {
    name: String,
    key: SigningKey,
    id: u32,
}

impl std::fmt::Debug for NoteSigner {
    /// Names the key but never shows the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoteSigner({}+{:08x})", self.name, self.id)
    }
}

impl NoteSigner {
    /// A signer named `name`; for a log, by convention, its checkpoint origin.
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

    /// The key id: the first four bytes, big-endian, of
    /// SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key).
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The verifier key, `name+<8 hex key id>+<base64(0x01 ‖ public key)>`, to hand to
    /// whoever checks this signer's notes.
    pub fn verifier_key(&self) -> String {
        encode_vkey(&self.name, self.id, &self.key.verifying_key())
    }

    /// The verifier for this signer's notes.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// Signs `text`, giving the whole signed note: the text, a blank line, and the
    /// signature line `— <name> <base64(key id ‖ Ed25519 signature of the text)>`.
    ///
    /// The text must be non-empty, end in a newline and contain no ASCII control
    /// characters other than newline.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        if text.is_empty() {
            return Err(NoteError::BadText("is empty"));
        }
        if !text.ends_with('\n') {
            return Err(NoteError::BadText("does not end in a newline"));
        }
        if find_control(text).is_some() {
            return Err(NoteError::BadText(
                "contains an ASCII control character other than newline",
            ));
        }
        if text.len() > MAX_NOTE_BYTES - SIGNATURE_ROOM {
            return Err(NoteError::BadText("is too long for a note"));
        }
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

/// Checks notes against one Ed25519 verifier key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses a verifier key `name+<8 hex key id>+<base64(0x01 ‖ public key)>`, checking
    /// that the key id belongs to the name and key.
    pub fn from_vkey(vkey: &str) -> Result<NoteVerifier, NoteError> {
        let bad = |why: &str| NoteError::MalformedKey(why.to_string());
        // The key's base64 may itself contain '+': only the first two separate fields.
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected <name>+<key id>+<key>"));
        };
        check_name(name)?;
        if id_hex.len() != 8 || !id_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NoteError::MalformedKey(format!(
                "key id {} is not 8 hex digits",
                excerpt(id_hex)
            )));
        }
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| bad("key id is not hex"))?;
        let raw = B64
            .decode(key_b64)
            .map_err(|_| bad("the key is not canonical standard base64"))?;
        match raw.first() {
            None => return Err(bad("the key is empty")),
            Some(&ALG_ED25519) => {}
            Some(alg) => {
                return Err(NoteError::MalformedKey(format!(
                    "unsupported signature type {alg:#04x} (only Ed25519, 0x01, is)"
                )));
            }
        }
        let public: [u8; 32] = raw[1..].try_into().map_err(|_| {
            NoteError::MalformedKey(format!(
                "an Ed25519 key is 32 bytes, this one is {}",
                raw.len() - 1
            ))
        })?;
        let want = key_id(name, &public);
        if want != id {
            return Err(NoteError::MalformedKey(format!(
                "key id {id:08x} does not belong to this name and key (that would be {want:08x})"
            )));
        }
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| bad("the key is not a valid Ed25519 public key"))?;
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

    /// The verifier key this verifier was made from, in canonical form.
    pub fn verifier_key(&self) -> String {
        encode_vkey(&self.name, self.id, &self.key)
    }

    /// Parses a signed note strictly and answers its text when it carries a valid
    /// signature by this key.
    ///
    /// Signature lines by other keys (another name or another key id) are ignored, as the
    /// spec requires, but must still be well-formed. A signature by this key that does not
    /// verify rejects the whole note, even if another one by this key does.
    pub fn verify<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let malformed = |why: String| NoteError::MalformedNote(why);
        if note.len() > MAX_NOTE_BYTES {
            return Err(malformed(format!("it is over {MAX_NOTE_BYTES} bytes long")));
        }
        if let Some(c) = find_control(note) {
            return Err(malformed(format!(
                "it contains the control character {c:?}"
            )));
        }
        // The text may contain blank lines of its own: the last one separates it.
        let split = note.rfind("\n\n").ok_or_else(|| {
            malformed("no blank line separates the text from the signatures".into())
        })?;
        let (text, sigs) = (&note[..=split], &note[split + 2..]);
        let Some(sigs) = sigs.strip_suffix('\n') else {
            return Err(malformed(if sigs.is_empty() {
                "no signature lines follow the blank line".into()
            } else {
                "the last signature line does not end in a newline".into()
            }));
        };
        let mut found = false;
        for (i, line) in sigs.split('\n').enumerate() {
            let n = i + 1;
            if n > MAX_SIGNATURES {
                return Err(malformed(format!(
                    "it has more than {MAX_SIGNATURES} signatures"
                )));
            }
            let rest = line.strip_prefix(SIG_PREFIX).ok_or_else(|| {
                malformed(format!(
                    "signature line {n} does not start with an em dash and a space"
                ))
            })?;
            let (name, b64) = rest.split_once(' ').ok_or_else(|| {
                malformed(format!(
                    "signature line {n} is not '\u{2014} <name> <signature>'"
                ))
            })?;
            if check_name(name).is_err() {
                return Err(malformed(format!(
                    "signature line {n} has the invalid key name {}",
                    excerpt(name)
                )));
            }
            let raw = B64.decode(b64).map_err(|_| {
                malformed(format!(
                    "signature line {n}: the signature is not canonical standard base64"
                ))
            })?;
            if raw.len() < 5 {
                return Err(malformed(format!(
                    "signature line {n}: the signature is too short to hold a key id"
                )));
            }
            if name != self.name || raw[..4] != self.id.to_be_bytes() {
                continue;
            }
            let bad = || NoteError::BadSignature {
                name: self.name.clone(),
                key_id: self.id,
            };
            let sig = Signature::from_slice(&raw[4..]).map_err(|_| bad())?;
            // Strict verification also refuses small-order key and nonce points, with
            // which one signature can be made to hold for more than one message.
            self.key
                .verify_strict(text.as_bytes(), &sig)
                .map_err(|_| bad())?;
            found = true;
        }
        if !found {
            return Err(NoteError::NotSigned {
                name: self.name.clone(),
                key_id: self.id,
            });
        }
        Ok(text)
    }
}
