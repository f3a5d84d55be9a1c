//! Flipping bytes anywhere in a ledger or a bundle makes `audit verify` fail and say where.

use crate::common::*;
use crate::e2e::walk;
use serde_json::json;

const FLIPS: usize = 40;

fn populated(tmp: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = tmp.join("data");
    let server = Server::start(&data);
    let admin = server.bootstrap.clone().unwrap();
    for i in 0..30 {
        let (s, _) = server.http(
            "POST",
            "/api/v1/accounts",
            &admin,
            Some(&json!({"path": format!("t/n{i}")})),
        );
        assert_eq!(s, 201);
        if i % 10 == 0 {
            let (s, _) = server.http("POST", "/api/v1/audit/checkpoint", &admin, None);
            assert_eq!(s, 200);
        }
    }
    let bundle = tmp.join("bundle");
    stdout(&server.cli(&admin, &["audit", "export", bundle.to_str().unwrap()]));
    server.stop();
    (data, bundle)
}

fn flip_and_verify(root: &std::path::Path, verify_at: &std::path::Path, seed: &mut u64) {
    let files: Vec<_> = walk(root)
        .into_iter()
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        // The bundle's README is prose for people, not evidence.
        .filter(|p| !p.ends_with("README.txt"))
        .collect();
    for _ in 0..FLIPS {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let file = &files[(*seed % files.len() as u64) as usize];
        let mut bytes = std::fs::read(file).unwrap();
        let at = ((*seed >> 16) % bytes.len() as u64) as usize;
        let bit = 1u8 << ((*seed >> 8) % 8);
        bytes[at] ^= bit;
        std::fs::write(file, &bytes).unwrap();
        let (code, msg) = verify(verify_at);
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            code,
            1,
            "flip of bit {bit:#x} at {at} in {} went unnoticed: {msg}",
            file.display()
        );
        assert!(msg.contains(&name), "failure does not name {name}: {msg}");
        bytes[at] ^= bit;
        std::fs::write(file, &bytes).unwrap();
    }
    let (code, msg) = verify(verify_at);
    assert_eq!(code, 0, "restored copy must verify: {msg}");
}

#[test]
fn flipped_bytes_are_found_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, bundle) = populated(tmp.path());
    let mut seed = 0x2545_F491_4F6C_DD1D;
    flip_and_verify(&data.join("ledger"), &data, &mut seed);
    flip_and_verify(&bundle, &bundle, &mut seed);
}
