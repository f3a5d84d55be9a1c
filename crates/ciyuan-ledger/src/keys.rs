//! The checkpoint signing key and its verifier key, on disk.

use crate::LedgerError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ciyuan_tlog::{NoteSigner, NoteVerifier};
use ed25519_dalek::SigningKey;
use std::io::Write;
use std::path::Path;

/// Secret key file (Go `note` format: `PRIVATE+KEY+name+keyid+base64(0x01 ‖ seed)`).
pub const SIGNING_KEY_FILE: &str = "signing.key";
/// Verifier key file (`name+keyid+base64(0x01 ‖ public key)`).
pub const PUBLIC_KEY_FILE: &str = "public.key";

/// Creates a new key pair named `origin` in `dir`.
pub fn create(dir: &Path, origin: &str) -> Result<NoteSigner, LedgerError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| LedgerError::Corrupt(format!("no randomness for the signing key: {e}")))?;
    let signer = NoteSigner::new(origin, SigningKey::from_bytes(&seed))
        .map_err(|e| LedgerError::Invalid(format!("origin: {e}")))?;
    let mut raw = [0u8; 33];
    raw[0] = 1;
    raw[1..].copy_from_slice(&seed);
    let secret = format!(
        "PRIVATE+KEY+{}+{:08x}+{}\n",
        signer.name(),
        signer.key_id(),
        B64.encode(raw)
    );
    write_durably(&dir.join(SIGNING_KEY_FILE), secret.as_bytes(), true)?;
    write_durably(
        &dir.join(PUBLIC_KEY_FILE),
        format!("{}\n", signer.verifier_key()).as_bytes(),
        false,
    )?;
    Ok(signer)
}

fn write_durably(path: &Path, bytes: &[u8], secret: bool) -> Result<(), LedgerError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let ctx = format!("writing {}", path.display());
    let mut f = opts.open(path).map_err(LedgerError::io(ctx.clone()))?;
    f.write_all(bytes).map_err(LedgerError::io(ctx.clone()))?;
    f.sync_all().map_err(LedgerError::io(ctx))
}

/// Parses a signing key file; checks it against the verifier key when given.
pub fn parse_signing_key(text: &str) -> Result<NoteSigner, String> {
    let t = text.strip_suffix('\n').unwrap_or(text);
    let rest = t
        .strip_prefix("PRIVATE+KEY+")
        .ok_or("does not start with PRIVATE+KEY+")?;
    // The base64 key may itself contain '+': split at the first two only.
    let mut parts = rest.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected PRIVATE+KEY+name+keyid+key".into());
    };
    let raw = B64.decode(key).map_err(|_| "key is not base64")?;
    if raw.len() != 33 || raw[0] != 1 {
        return Err("not an Ed25519 key".into());
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&raw[1..]);
    let signer = NoteSigner::new(name, SigningKey::from_bytes(&seed)).map_err(|e| e.to_string())?;
    if format!("{:08x}", signer.key_id()) != id {
        return Err("key id does not match the key".into());
    }
    Ok(signer)
}

/// The signing key kept in `dir` (`signing.key` and `public.key`), created there
/// named `origin` (or a random `ciyuan-xxxxxxxx`) when there is none: how a node
/// whose log is in a database keeps the log's key. Every node of one log holds a copy
/// of the same key.
pub fn load_or_create(dir: &Path, origin: Option<&str>) -> Result<NoteSigner, LedgerError> {
    if dir.join(SIGNING_KEY_FILE).exists() || dir.join(PUBLIC_KEY_FILE).exists() {
        return Ok(load(dir)?.0);
    }
    std::fs::create_dir_all(dir).map_err(LedgerError::io(format!("creating {}", dir.display())))?;
    let origin = match origin {
        Some(o) => o.to_string(),
        None => {
            let mut r = [0u8; 4];
            getrandom::fill(&mut r)
                .map_err(|e| LedgerError::Corrupt(format!("no randomness for the origin: {e}")))?;
            format!("ciyuan-{}", hex::encode(r))
        }
    };
    create(dir, &origin)
}

/// Loads the key pair of an existing ledger and checks that the halves match.
pub fn load(dir: &Path) -> Result<(NoteSigner, NoteVerifier), LedgerError> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(LedgerError::io(format!(
            "reading {}",
            dir.join(name).display()
        )))
    };
    let secret = read(SIGNING_KEY_FILE)?;
    let public = read(PUBLIC_KEY_FILE)?;
    let signer = parse_signing_key(&secret)
        .map_err(|e| LedgerError::Corrupt(format!("{SIGNING_KEY_FILE}: {e}")))?;
    let verifier = NoteVerifier::from_vkey(public.strip_suffix('\n').unwrap_or(&public))
        .map_err(|e| LedgerError::Corrupt(format!("{PUBLIC_KEY_FILE}: {e}")))?;
    if signer.verifier_key() != public.trim_end_matches('\n') {
        return Err(LedgerError::Corrupt(format!(
            "{SIGNING_KEY_FILE} does not match {PUBLIC_KEY_FILE}"
        )));
    }
    Ok((signer, verifier))
}
