//! Memory and time with years of checkpoints: run by hand (ignored by default).
//!
//! ```sh
//! CIYUAN_MANY_DIR=/tmp/many CIYUAN_MANY_CHECKPOINTS=200000 \
//!   cargo test --release -p ciyuan-ledger --test many_checkpoints -- --ignored make --nocapture
//! CIYUAN_MANY_DIR=/tmp/many cargo test --release -p ciyuan-ledger --test many_checkpoints \
//!   -- --ignored open --nocapture       # and `verify`
//! ```
//! Each prints its peak resident memory (`VmHWM`) and time; `make` signs one
//! checkpoint per entry straight into the file (the key is the ledger's own), as a
//! server signing every 10 s would after that many intervals with traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ciyuan_ledger::{Ledger, LedgerOptions, verify_path};
use ciyuan_tlog::{Checkpoint, Frontier, NoteSigner, leaf_hash};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

fn dir() -> PathBuf {
    PathBuf::from(std::env::var("CIYUAN_MANY_DIR").expect("CIYUAN_MANY_DIR"))
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn entry(i: u64) -> Vec<u8> {
    format!("{{\"n\":{i},\"kind\":\"usage\",\"account\":\"acme/cn\"}}").into_bytes()
}

#[test]
#[ignore]
fn make() {
    let n: u64 = std::env::var("CIYUAN_MANY_CHECKPOINTS")
        .unwrap()
        .parse()
        .unwrap();
    let dir = dir();
    {
        let mut l = Ledger::open(&dir, LedgerOptions::default()).unwrap();
        let mut i = 0;
        while i < n {
            let batch: Vec<Vec<u8>> = (i..(i + 10_000).min(n)).map(entry).collect();
            l.append_batch(&batch).unwrap();
            i += batch.len() as u64;
        }
    }
    let text = std::fs::read_to_string(dir.join("signing.key")).unwrap();
    let rest = text.trim_end().strip_prefix("PRIVATE+KEY+").unwrap();
    let mut parts = rest.splitn(3, '+');
    let name = parts.next().unwrap().to_string();
    let _id = parts.next().unwrap();
    let raw = B64.decode(parts.next().unwrap()).unwrap();
    let seed: [u8; 32] = raw[1..].try_into().unwrap();
    let signer = NoteSigner::new(&name, ed25519_dalek::SigningKey::from_bytes(&seed)).unwrap();
    let mut out = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("checkpoints"))
            .unwrap(),
    );
    let mut frontier = Frontier::new();
    for i in 0..n {
        frontier.push(leaf_hash(&entry(i)), |_, _, _| {});
        let c = Checkpoint {
            origin: name.clone(),
            size: i + 1,
            root: frontier.root(),
            extensions: Vec::new(),
        };
        let note = signer.sign(&c.to_text()).unwrap();
        out.write_all(&(note.len() as u32).to_le_bytes()).unwrap();
        out.write_all(&crc32c::crc32c(note.as_bytes()).to_le_bytes())
            .unwrap();
        out.write_all(note.as_bytes()).unwrap();
    }
    out.flush().unwrap();
    println!("made {n} entries and {n} checkpoints in {}", dir.display());
}

#[test]
#[ignore]
fn open() {
    let started = Instant::now();
    let l = Ledger::open(&dir(), LedgerOptions::default()).unwrap();
    let latest = l.reader().latest_checkpoint().unwrap();
    println!(
        "open: {} entries, latest checkpoint {}, {:.2} s, peak RSS {} KiB",
        l.size(),
        latest.checkpoint.size,
        started.elapsed().as_secs_f64(),
        peak_rss_kib()
    );
}

#[test]
#[ignore]
fn verify() {
    let started = Instant::now();
    let r = verify_path(&dir()).unwrap();
    println!(
        "verify: {} entries, {} checkpoints, {:.2} s, peak RSS {} KiB",
        r.entries,
        r.checkpoints,
        started.elapsed().as_secs_f64(),
        peak_rss_kib()
    );
}
