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
    match database_of(&data) {
        None => flip_and_verify(&data.join("ledger"), &data, &mut seed),
        Some(url) => flip_in_database_and_verify(&url, &mut seed),
    }
    flip_and_verify(&bundle, &bundle, &mut seed);
}

/// The PostgreSQL form of a flipped bit: one bit of a stored entry's bytes, or of a
/// stored checkpoint's note, changed with SQL behind the server's back. `audit verify`
/// of the database must fail and name the entry (or the checkpoint) changed.
fn flip_in_database_and_verify(url: &str, seed: &mut u64) {
    let pool = ciyuan_store_postgres::Pool::connect(url).unwrap();
    let mut c = pool.get().unwrap();
    let entries: i64 = c
        .query_one("SELECT count(*) FROM log_entries", &[])
        .unwrap()
        .get(0);
    // (seq, size) of every checkpoint, in order.
    let checkpoints: Vec<(i64, i64)> = c
        .query("SELECT seq, size FROM log_checkpoints ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        entries > 30 && checkpoints.len() >= 3,
        "{entries} entries, {checkpoints:?}"
    );
    for _ in 0..FLIPS {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let bit = 1i32 << ((*seed >> 8) % 8);
        // Entries most of the time: they are the evidence; a note now and then.
        let (table, key, column, len) = if !seed.is_multiple_of(4) {
            let idx = ((*seed >> 20) % entries as u64) as i64;
            let len: i32 = c
                .query_one(
                    "SELECT length(bytes) FROM log_entries WHERE idx = $1",
                    &[&idx],
                )
                .unwrap()
                .get(0);
            ("log_entries", ("idx", idx), "bytes", len)
        } else {
            let (seq, _) = checkpoints[((*seed >> 20) % checkpoints.len() as u64) as usize];
            let len: i32 = c
                .query_one(
                    "SELECT octet_length(note) FROM log_checkpoints WHERE seq = $1",
                    &[&seq],
                )
                .unwrap()
                .get(0);
            ("log_checkpoints", ("seq", seq), "note", len)
        };
        let at = ((*seed >> 32) % len as u64) as i32;
        let flip = |c: &mut ciyuan_store_postgres::Conn<'_>| {
            let sql = if column == "bytes" {
                format!(
                    "UPDATE {table} SET bytes = set_byte(bytes, $2, get_byte(bytes, $2) # $3) WHERE {} = $1",
                    key.0
                )
            } else {
                // A note is text: flip the bit in its UTF-8 bytes and store them back,
                // as long as they still decode (else the row could not be stored).
                format!(
                    "UPDATE {table} SET note = convert_from(set_byte(convert_to(note, 'UTF8'), $2, get_byte(convert_to(note, 'UTF8'), $2) # $3), 'UTF8') WHERE {} = $1",
                    key.0
                )
            };
            c.execute(sql.as_str(), &[&key.1, &at, &bit])
        };
        if flip(&mut c).is_err() {
            // The flipped note is not UTF-8: PostgreSQL refuses to store it at all.
            continue;
        }
        let (code, msg) = verify(std::path::Path::new(url));
        assert_eq!(
            code, 1,
            "flip of bit {bit:#x} at {at} in {table} {}={} went unnoticed: {msg}",
            key.0, key.1
        );
        // A changed entry: that entry (its bytes no longer hash to the leaf stored
        // with them). A changed note: that checkpoint.
        let (_, covering) = if table == "log_entries" {
            *checkpoints.iter().find(|(_, size)| *size > key.1).unwrap()
        } else {
            *checkpoints.iter().find(|(seq, _)| *seq == key.1).unwrap()
        };
        let checkpoint = format!("checkpoints/{covering:020}.note");
        let entry = format!("entry {} ", key.1);
        // A note that no longer verifies is refused as the log is read out of the
        // database, before any file is written; that message does not say which one.
        let refused_note =
            table == "log_checkpoints" && msg.contains("a stored checkpoint does not verify");
        if table == "log_entries" {
            assert!(msg.contains(&entry), "failure does not name {entry}: {msg}");
        } else {
            assert!(
                msg.contains(&checkpoint) || refused_note,
                "failure does not name {checkpoint}: {msg}"
            );
        }
        flip(&mut c).unwrap();
    }
    let (code, msg) = verify(std::path::Path::new(url));
    assert_eq!(code, 0, "restored database must verify: {msg}");
}

/// What the server itself writes (a book, a contract, a definition, rated gateway and
/// ingested usage) passes the money and counting rules, and the counts say so.
#[test]
fn the_servers_own_ratings_and_definitions_keep_the_rules() {
    let gw = crate::gateway::gateway_with("", &[]);
    let s = &gw.server;
    let admin = gw.admin.clone();
    // LiteLLM's shape: the prices are JSON numbers, read from their text.
    let table = json!({
        "gpt-4o-mini": {"litellm_provider": "openai", "mode": "chat",
                        "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07},
    });
    let (st, b) = s.http(
        "POST",
        "/api/v1/prices?format=litellm&name=list&effective_from=2020-01-01T00:00:00Z",
        &admin,
        Some(&table),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let (st, b) = s.http(
        "PUT",
        "/api/v1/contracts/acme",
        &admin,
        Some(&json!({"book": "list", "discount_percent": "12.5"})),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let (st, b) = s.http(
        "POST",
        "/api/v1/definitions",
        &admin,
        Some(&json!({"service": "doc.verify", "version": 1,
                     "effective_from": "2020-01-01T00:00:00Z",
                     "tokens": {"other.input": "pages * 500"}})),
    );
    assert!(
        st == 200 || st == 201,
        "{st} {}",
        String::from_utf8_lossy(&b)
    );

    // A prepaid wallet, where this build has them: the gateway request below then
    // settles its rated amount as a consume posting.
    let (st, b) = s.http(
        "POST",
        "/api/v1/wallets/acme/app",
        &admin,
        Some(&json!({"kind": "topup", "amount": "10", "currency": "USD"})),
    );
    let wallets = st != 404;
    assert!(!wallets || st < 300, "{st} {}", String::from_utf8_lossy(&b));

    let ingest = gw.key_for("acme/app", &["ingest"]);
    for (i, (kind, data)) in [
        (
            "llm.usage",
            // Served at the batch tier: rated with the batch prices, and so verified.
            json!({"model": "gpt-4o-mini", "input_tokens": 1234, "output_tokens": 56,
                   "service_tier": "batch"}),
        ),
        ("doc.verify", json!({"pages": 3})),
    ]
    .into_iter()
    .enumerate()
    {
        let (st, b) = s.http(
            "POST",
            "/v1/events",
            &ingest,
            Some(
                &json!({"specversion": "1.0", "id": format!("ev-{i}"), "source": "svc://audit",
                         "type": kind, "subject": "acme/app", "data": data}),
            ),
        );
        assert!(st < 300, "{st} {}", String::from_utf8_lossy(&b));
    }
    let (st, b) = s.http(
        "POST",
        "/v1/chat/completions",
        &gw.key,
        Some(&json!({"model": "gpt-4o-mini", "service_tier": "priority",
                     "messages": [{"role": "user", "content": "hello"}]})),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));

    // The gateway appends its entry just after answering: wait for the three rated
    // entries, then stop the server (the verifier reads a ledger nobody holds).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (st, body) = s.http("GET", "/api/v1/audit/entries?start=0", &admin, None);
        assert_eq!(st, 200);
        let rated = String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.contains(r#""rating":{"#))
            .count();
        if rated == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rated} rated entries"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let data = s.data_dir.clone();
    gw.server.stop();
    let o = std::process::Command::new(bin())
        .args(["audit", "verify", "--json"])
        .arg(audit_target(&data))
        .env("CIYUAN_LOG", "warn")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert_eq!(o.status.code(), Some(0), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["rated"], 3, "{report}");
    assert_eq!(report["rated_basis_as_recorded"], 0, "{report}");
    assert_eq!(report["defined"], 1, "{report}");
    // The top-up and the gateway request's consumption.
    let postings = if wallets { 2 } else { 0 };
    assert_eq!(report["postings"], postings, "{report}");
}

/// Usage rated while a contract changes must still verify: the audit judges each
/// rating by the contract in force at its place in the log. Before the server's rules
/// gate, entries rated by the old terms landed after the new contract (every run:
/// at entry 20 to 30 of a few thousand).
#[test]
fn race_usage_rated_while_a_contract_changes() {
    let gw = crate::gateway::gateway_with("", &[]);
    let s = &gw.server;
    let admin = gw.admin.clone();
    let table = json!({"gpt-4o-mini": {"litellm_provider": "openai", "mode": "chat",
        "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}});
    let (st, _) = s.http(
        "POST",
        "/api/v1/prices?format=litellm&name=list&effective_from=2020-01-01T00:00:00Z",
        &admin,
        Some(&table),
    );
    assert_eq!(st, 200);
    let ingest = gw.key_for("acme/app", &["ingest"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (url, key, stop) = (s.url.clone(), ingest.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ev = json!({"specversion": "1.0", "id": format!("t{t}-{i}"),
                        "source": "svc://race", "type": "llm.usage", "subject": "acme/app",
                        "data": {"model": "gpt-4o-mini", "input_tokens": 1000, "output_tokens": 10}});
                    let (st, _) = http(&url, "POST", "/v1/events", &key, Some(&ev));
                    assert!(st < 300, "{st}");
                    i += 1;
                }
                i
            })
        })
        .collect();
    for k in 0..30 {
        let discount = if k % 2 == 0 { "10" } else { "20" };
        let (st, _) = s.http(
            "PUT",
            "/api/v1/contracts/acme",
            &admin,
            Some(&json!({"book": "list", "discount_percent": discount})),
        );
        assert_eq!(st, 200);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: usize = senders.into_iter().map(|h| h.join().unwrap()).sum();
    let data = s.data_dir.clone();
    gw.server.stop();
    let o = std::process::Command::new(bin())
        .args(["audit", "verify", "--json"])
        .arg(audit_target(&data))
        .env("CIYUAN_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{sent} events: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
