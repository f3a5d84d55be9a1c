//! Stripe-style webhook signatures: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use jiff::Timestamp;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The most `v1=` signatures [`verify`] looks at in one header (receivers rotating
/// secrets may see more than one; more than this is not a real header).
const MAX_SIGNATURES_PER_HEADER: usize = 8;

fn mac(secret: &str, unix_seconds: i64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this never fails; the fallback keeps the
    // function total without a panic path.
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()),
    };
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `x-ciyuan-signature` header value for `body` sent at `timestamp`:
/// `t=<unix seconds>,v1=<lowercase hex of HMAC-SHA256(secret, "<t>.<body>")>`.
///
/// The timestamp is inside the signed message, so a receiver that checks its age
/// (see [`verify`]) rejects replays of old deliveries.
pub fn sign(secret: &str, timestamp: Timestamp, body: &[u8]) -> String {
    let t = timestamp.as_second();
    let tag = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(tag))
}

/// Checks an `x-ciyuan-signature` header against `body`: true when the header's `t` is
/// within `tolerance` of `now` (either side) and one of its `v1` signatures is the
/// HMAC-SHA256 of `"<t>.<body>"` under `secret`. The comparison is constant-time.
///
/// Unknown `key=value` parts are ignored (room for future schemes); a header without a
/// `t` or without any well-formed `v1` is rejected.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: Timestamp,
    tolerance: Duration,
) -> bool {
    let mut timestamp: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" => match value.parse::<i64>() {
                Ok(t) if timestamp.is_none() => timestamp = Some(t),
                _ => return false,
            },
            "v1" => {
                if signatures.len() >= MAX_SIGNATURES_PER_HEADER {
                    return false;
                }
                if let Ok(bytes) = hex::decode(value) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let Some(t) = timestamp else {
        return false;
    };
    let age = now.as_second().abs_diff(t);
    if age > tolerance.as_secs() {
        return false;
    }
    // Check every candidate (no early exit), each comparison constant-time.
    let mut ok = false;
    for signature in &signatures {
        ok |= mac(secret, t, body).verify_slice(signature).is_ok();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256(key="secret", "1700000000.{}") computed independently.
        let header = sign("secret", ts(1_700_000_000), b"{}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(header.len(), "t=1700000000,v1=".len() + 64);
        let expected = {
            let mut m = HmacSha256::new_from_slice(b"secret").unwrap();
            m.update(b"1700000000.{}");
            hex::encode(m.finalize().into_bytes())
        };
        assert_eq!(header, format!("t=1700000000,v1={expected}"));
    }

    #[test]
    fn round_trip_and_rejections() {
        let now = ts(1_700_000_000);
        let body = br#"{"id":"e1"}"#;
        let header = sign("k1", now, body);
        let tol = Duration::from_secs(300);
        assert!(verify("k1", &header, body, now, tol));
        assert!(verify("k1", &header, body, ts(1_700_000_299), tol));
        assert!(verify("k1", &header, body, ts(1_699_999_800), tol));
        // Too old, or too far in the future.
        assert!(!verify("k1", &header, body, ts(1_700_000_301), tol));
        assert!(!verify("k1", &header, body, ts(1_699_999_699), tol));
        // Wrong secret, tampered body.
        assert!(!verify("k2", &header, body, now, tol));
        assert!(!verify("k1", &header, br#"{"id":"e2"}"#, now, tol));
        // Timestamp changed without re-signing.
        let moved = header.replace("t=1700000000", "t=1700000001");
        assert!(!verify("k1", &moved, body, now, tol));
        // Garbage and partial headers.
        for bad in [
            "",
            "t=",
            "v1=abcd",
            "t=1700000000",
            "t=x,v1=00",
            "t=1700000000,v1=zz",
        ] {
            assert!(!verify("k1", bad, body, now, tol), "{bad:?}");
        }
        // Two timestamps are ambiguous: rejected.
        let twice = format!("t=1700000000,{header}");
        assert!(!verify("k1", &twice, body, now, tol));
    }

    #[test]
    fn rotation_several_v1_and_unknown_parts() {
        let now = ts(1_800_000_000);
        let body = b"payload";
        let old = sign("old", now, body);
        let new = sign("new", now, body);
        let new_sig = new.split_once(",v1=").map(|(_, s)| s).unwrap_or_default();
        let both = format!("{old},v1={new_sig},v0=ignored");
        assert!(verify("old", &both, body, now, Duration::from_secs(1)));
        assert!(verify("new", &both, body, now, Duration::from_secs(1)));
        assert!(!verify("other", &both, body, now, Duration::from_secs(1)));
    }
}
