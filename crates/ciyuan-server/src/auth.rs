//! API keys: their format, their hashing, and who is calling.
//!
//! A key reads `cy_<12 hex id>_<64 hex secret>`. The `cy_` prefix lets secret scanners
//! find leaked keys; the id is public (it names the key in lists and the ledger). Only
//! the SHA-256 of the whole key is stored: keys carry 256 random bits, so a slow
//! password hash would add latency to every gateway call and no security.

use crate::error::ApiError;
use axum::http::HeaderMap;
use ciyuan_core::{AccountPath, Scope};
use ciyuan_store::{KeyRecord, Store};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Prefix of every Ciyuan key.
pub const KEY_PREFIX: &str = "cy_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;
/// Length of a key string.
pub const KEY_LEN: usize = KEY_PREFIX.len() + ID_HEX + 1 + SECRET_HEX;
/// Keys kept in the lookup cache before it is emptied; bounds memory under a flood of
/// distinct valid keys.
const CACHE_MAX_KEYS: usize = 100_000;

/// A freshly generated key: the string to show once, its id, and its hash to store.
pub struct NewKey {
    /// The key, shown once and never stored.
    pub secret: String,
    /// Its public id.
    pub key_id: String,
    /// SHA-256 of `secret`.
    pub hash: [u8; 32],
}

/// Makes a new random key.
pub fn generate_key() -> Result<NewKey, ApiError> {
    let mut raw = [0u8; 6 + 32];
    getrandom::fill(&mut raw).map_err(ApiError::internal)?;
    let key_id = hex::encode(&raw[..6]);
    let secret = format!("{KEY_PREFIX}{key_id}_{}", hex::encode(&raw[6..]));
    let hash = hash_key(&secret);
    Ok(NewKey {
        secret,
        key_id,
        hash,
    })
}

/// Checks a key's shape without looking it up; returns its id.
pub fn parse_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    if key.len() != KEY_LEN || rest.as_bytes().get(ID_HEX) != Some(&b'_') {
        return None;
    }
    let (id, secret) = (&rest[..ID_HEX], &rest[ID_HEX + 1..]);
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (hex(id) && hex(secret)).then_some(id)
}

/// Whether `id` has the shape of a key id (the 12 hex digits after `cy_`).
pub fn is_key_id(id: &str) -> bool {
    id.len() == ID_HEX && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// SHA-256 of a key string.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its key, without the secret.
    pub key: KeyRecord,
}

impl Caller {
    /// Fails unless the key has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.key.scopes.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "key {} lacks the {scope} scope (it has: {})",
                self.key.key_id, self.key.scopes
            )))
        }
    }

    /// Fails unless `path` lies in the key's subtree.
    pub fn require_within(&self, path: &AccountPath) -> Result<(), ApiError> {
        if path.is_within(&self.key.account) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "account {path} is outside the subtree of key {} ({})",
                self.key.key_id, self.key.account
            )))
        }
    }
}

/// The caller a key record makes, unless the key is revoked.
pub(crate) fn checked(record: &KeyRecord) -> Result<Caller, ApiError> {
    if record.revoked_at.is_some() {
        return Err(ApiError::unauthorized(format!(
            "API key {} has been revoked",
            record.key_id
        )));
    }
    Ok(Caller {
        key: record.clone(),
    })
}

/// Looks keys up, with a cache so the gateway's hot path does not touch the database.
/// Revocation goes through [`Authenticator::revoked`] and takes effect at once on this
/// node; with a store shared by several nodes, a cached key is read again once it is
/// older than the cache's time to live, so a revocation on another node takes effect
/// here within that time.
pub struct Authenticator {
    store: Arc<dyn Store>,
    cache: RwLock<HashMap<[u8; 32], (KeyRecord, std::time::Instant)>>,
    ttl: Option<std::time::Duration>,
}

impl Authenticator {
    /// A new authenticator over `store`; `ttl` bounds how long a cached key is trusted
    /// (`None`: until this node revokes it, for a store no other node writes).
    pub fn new(store: Arc<dyn Store>, ttl: Option<std::time::Duration>) -> Authenticator {
        Authenticator {
            store,
            cache: RwLock::new(HashMap::new()),
            ttl,
        }
    }

    /// The key presented in `Authorization: Bearer …` or `x-api-key: …`.
    pub fn presented(headers: &HeaderMap) -> Result<&str, ApiError> {
        if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
            let v = v
                .to_str()
                .map_err(|_| ApiError::unauthorized("Authorization header is not ASCII"))?;
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .ok_or_else(|| {
                    ApiError::unauthorized("Authorization header must be 'Bearer <key>'")
                })?;
            return Ok(token.trim());
        }
        if let Some(v) = headers.get("x-api-key") {
            return v
                .to_str()
                .map(str::trim)
                .map_err(|_| ApiError::unauthorized("x-api-key header is not ASCII"));
        }
        Err(ApiError::unauthorized(
            "missing API key: send 'Authorization: Bearer cy_…' or 'x-api-key: cy_…'",
        ))
    }

    /// Authenticates a request. Blocking: call from a blocking context.
    pub fn authenticate(&self, key: &str) -> Result<Caller, ApiError> {
        if let Some(answer) = self.cached(key) {
            return answer;
        }
        if parse_key(key).is_none() {
            return Err(ApiError::unauthorized(
                "Incorrect API key provided: not a Ciyuan key (cy_…)",
            ));
        }
        let hash = hash_key(key);
        let Some(record) = self.store.key_by_hash(&hash)? else {
            return Err(ApiError::unauthorized(
                "Incorrect API key provided: unknown key",
            ));
        };
        {
            let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_MAX_KEYS {
                cache.clear();
            }
            cache.insert(hash, (record.clone(), std::time::Instant::now()));
        }
        checked(&record)
    }

    /// [`Authenticator::authenticate`] from the cache alone, without blocking: `None`
    /// when the key is not cached (look it up with `authenticate` then).
    pub fn cached(&self, key: &str) -> Option<Result<Caller, ApiError>> {
        parse_key(key)?;
        let hash = hash_key(key);
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let (record, at) = cache.get(&hash)?;
        if self.ttl.is_some_and(|ttl| at.elapsed() > ttl) {
            return None;
        }
        Some(checked(record))
    }

    /// The caller key `key_id` makes, judged as [`Authenticator::authenticate`] judges
    /// a key presented by its secret (a revoked key refused): how a console session
    /// acts as its key. Read from the store each time, so a revocation on any node
    /// ends the key's sessions at once. Blocking.
    pub fn by_id(&self, key_id: &str) -> Result<Caller, ApiError> {
        let record = self
            .store
            .key(key_id)?
            .ok_or_else(|| ApiError::unauthorized("the session's key no longer exists"))?;
        checked(&record)
    }

    /// Forgets a revoked key so its next use reads the revocation.
    pub fn revoked(&self, key_id: &str) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (r, _)| r.key_id != key_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_a_checkable_shape() {
        let k = generate_key().unwrap();
        assert!(k.secret.starts_with("cy_"));
        assert_eq!(k.secret.len(), KEY_LEN);
        assert_eq!(parse_key(&k.secret), Some(k.key_id.as_str()));
        assert!(is_key_id(&k.key_id));
        for not_an_id in [
            "0123456789a",
            "0123456789abc",
            "0123456789AB",
            "0123456789ag",
            "",
        ] {
            assert!(!is_key_id(not_an_id), "{not_an_id}");
        }
        assert_eq!(k.hash, hash_key(&k.secret));
        assert!(parse_key("cy_short").is_none());
        assert!(parse_key(&k.secret.replace("cy_", "sk_")).is_none());
        assert!(parse_key(&k.secret.to_uppercase()).is_none());
    }
}
