//! `ciyuan serve --database postgres://...`: the log and the projections in a
//! throwaway PostgreSQL 15 cluster (started by the test; a missing PostgreSQL fails the
//! test, never skips it).

use crate::common::{Server, json, stdout};
use ciyuan_store_postgres::testing::TestCluster;
use serde_json::json;

/// A database name the run on the other backend does not use: with
/// `CIYUAN_TEST_DATABASE_URL` both runs share one server, at the same time
/// (`every_test_again_on_postgres`). Fixed names, so a server of one's own does not
/// collect a database per run.
fn unique(name: &str) -> String {
    format!("{name}_{:?}", crate::common::backend()).to_lowercase()
}

fn usage_input(server: &Server, key: &str) -> i64 {
    let (s, b) = server.http("GET", "/api/v1/usage?account=acme", key, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    json(&b)["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tokens"]["text.input"].as_i64().unwrap_or(0))
        .sum()
}

#[test]
fn serve_keeps_the_log_and_projections_in_postgres_across_restarts() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let url = cluster.database(&unique("serve")).unwrap();
    // The schema, applied by hand before the first start, and once only.
    for applied in [ciyuan_store_postgres::SCHEMA_VERSION, 0] {
        let o = std::process::Command::new(crate::common::bin())
            .args(["migrate", "--database", &url])
            .output()
            .unwrap();
        assert!(
            stdout(&o).starts_with(&format!("database schema: {applied} migrations applied")),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    let server = Server::start_with(&node, &["--database", &url]);
    let root = server
        .bootstrap
        .clone()
        .expect("a bootstrap key on first start");
    stdout(&server.cli(&root, &["accounts", "create", "acme/cn"]));
    let key = server.new_key(&root, "acme/cn", "gateway,ingest,read");
    let (s, b) = server.http(
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Where is the ledger?"}]})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let ev = json!({"specversion": "1.0", "id": "e1", "source": "svc://pg", "type": "llm.usage",
        "subject": "acme/cn", "data": {"model": "qwen-max", "input_tokens": 1000, "output_tokens": 10}});
    let (s, b) = server.http("POST", "/v1/events", &key, Some(&ev));
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut input = usage_input(&server, &root);
    while input <= 1000 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        input = usage_input(&server, &root);
    }
    assert!(
        input > 1000,
        "the gateway call and the event are both counted: {input}"
    );
    // A repeated event is answered with the original entry.
    let (s, again) = server.http("POST", "/v1/events", &key, Some(&ev));
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&again));
    assert_eq!(json(&again)["entry_id"], json(&b)["entry_id"]);
    // Proofs come from the database's tree.
    let (s, cp) = server.http("POST", "/api/v1/audit/checkpoint", &root, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&cp));
    let size = json(&cp)["size"].as_u64().unwrap_or_else(|| {
        json(&cp)["checkpoint"]["size"]
            .as_u64()
            .expect("a checkpoint size")
    });
    assert!(size >= 4, "{}", String::from_utf8_lossy(&cp));
    let (s, proof) = server.http("GET", "/api/v1/audit/entries/1/proof", &root, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&proof));
    server.stop();

    // The same data after a restart: nothing lives in the data directory but the key.
    let names: Vec<String> = std::fs::read_dir(&node)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n == "ledger" || n == "ciyuan.db"),
        "{names:?}"
    );
    let server = Server::start_with(&node, &["--database", &url]);
    assert!(server.bootstrap.is_none(), "bootstrapped once");
    assert_eq!(usage_input(&server, &root), input);
    let (s, b) = server.http("POST", "/v1/events", &key, Some(&ev));
    assert_eq!(
        s,
        200,
        "still a repeat after the restart: {}",
        String::from_utf8_lossy(&b)
    );
    server.stop();

    // A node with another signing key is refused: one log, one key.
    let stranger = std::process::Command::new(crate::common::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("stranger"))
        .args(["--database", &url])
        .env("CIYUAN_LOG", "warn")
        .output()
        .unwrap();
    assert!(!stranger.status.success());
    let err = String::from_utf8_lossy(&stranger.stderr);
    assert!(err.contains("signed by"), "{err}");
}

fn root_of(verify_output: &str) -> String {
    verify_output
        .split("root ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no root in {verify_output}"))
        .to_string()
}

#[test]
fn an_embedded_data_directory_moves_into_postgres_with_the_same_roots() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let url = cluster.database(&unique("moved")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start_embedded(&data);
    let root = server.bootstrap.clone().unwrap();
    stdout(&server.cli(&root, &["accounts", "create", "acme/cn"]));
    let key = server.new_key(&root, "acme/cn", "gateway,read");
    for text in ["one", "two", "three"] {
        let (s, b) = server.http(
            "POST",
            "/v1/chat/completions",
            &key,
            Some(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})),
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    let (s, _) = server.http("POST", "/api/v1/audit/checkpoint", &root, None);
    assert_eq!(s, 200);
    // A call's entry is recorded just after its answer: wait until all three are.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut before = usage_input(&server, &root);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = usage_input(&server, &root);
        if now == before || std::time::Instant::now() > deadline {
            break;
        }
        before = now;
    }
    server.stop();
    let embedded = crate::common::verify(&data);
    assert_eq!(embedded.0, 0, "{}", embedded.1);

    let moved = std::process::Command::new(crate::common::bin())
        .args(["migrate", "--from"])
        .arg(&data)
        .args(["--to", &url])
        .env("CIYUAN_LOG", "warn")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&moved.stdout);
    assert!(
        moved.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(said.contains("unchanged"), "{said}");
    // The database verifies on its own, with the same root as the directory.
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
    assert_eq!(root_of(&out), root_of(&embedded.1), "{out}\n{}", embedded.1);
    // A second copy into the same database is refused.
    let again = std::process::Command::new(crate::common::bin())
        .args(["migrate", "--from"])
        .arg(&data)
        .args(["--to", &url])
        .output()
        .unwrap();
    assert!(!again.status.success());

    // Served from the database, with the same keys and figures.
    let server = Server::start_with(&data, &["--database", &url]);
    assert_eq!(usage_input(&server, &root), before);
    let (s, b) = server.http(
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "four"}]})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (s, _) = server.http("POST", "/api/v1/audit/checkpoint", &root, None);
    assert_eq!(s, 200);
    server.stop();
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
    // And an export of the database is a bundle like any other.
    let bundle = tmp.path().join("bundle");
    let exported = std::process::Command::new(crate::common::bin())
        .args(["audit", "export"])
        .arg(&bundle)
        .args(["--database", &url])
        .output()
        .unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let (code, from_bundle) = crate::common::verify(&bundle);
    assert_eq!(code, 0, "{from_bundle}");
    assert_eq!(root_of(&from_bundle), root_of(&out));
}

#[test]
fn two_nodes_append_to_one_verifiable_log_and_see_each_others_entries() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let url = cluster.database(&unique("two")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = Server::start_with(&a_dir, &["--database", &url]);
    let root = a.bootstrap.clone().unwrap();
    // The second node holds a copy of the log's key.
    std::fs::create_dir_all(&b_dir).unwrap();
    for f in ["signing.key", "public.key"] {
        std::fs::copy(a_dir.join(f), b_dir.join(f)).unwrap();
    }
    let b = Server::start_with(&b_dir, &["--database", &url]);
    assert!(b.bootstrap.is_none(), "one bootstrap for the shared store");
    stdout(&a.cli(&root, &["accounts", "create", "acme/cn"]));
    let key = a.new_key(&root, "acme/cn", "ingest,read");
    // Both nodes take events at once; each event is 100 input tokens.
    std::thread::scope(|s| {
        for (node, tag) in [(&a, "a"), (&b, "b")] {
            let key = key.clone();
            s.spawn(move || {
                for i in 0..20 {
                    let batch: Vec<serde_json::Value> = (0..5)
                        .map(|j| {
                            json!({"specversion": "1.0", "id": format!("{tag}-{i}-{j}"),
                            "source": "svc://two", "type": "llm.usage", "subject": "acme/cn",
                            "data": {"model": "m", "input_tokens": 100, "output_tokens": 1}})
                        })
                        .collect();
                    let (st, body) = node.http("POST", "/v1/events", &key, Some(&json!(batch)));
                    assert!(
                        st == 201 || st == 207 || st == 200,
                        "{st} {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            });
        }
    });
    // Each node sees all 200 events, whichever node took them.
    for node in [&a, &b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let mut seen = usage_input(node, &root);
        while seen < 20_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            seen = usage_input(node, &root);
        }
        assert_eq!(seen, 20_000, "every event once, seen from {}", node.url);
    }
    // A key revoked on one node stops working on the other within a second or so.
    let (s, _) = b.http("GET", "/api/v1/usage?account=acme/cn", &key, None);
    assert_eq!(s, 200);
    let id = key[3..15].to_string();
    stdout(&a.cli(&root, &["keys", "revoke", &id]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut status = 200;
    while status == 200 && std::time::Instant::now() < deadline {
        status = b.http("GET", "/api/v1/usage?account=acme/cn", &key, None).0;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(status, 401, "the revocation reached the other node");
    let (s, _) = b.http("POST", "/api/v1/audit/checkpoint", &root, None);
    assert_eq!(s, 200);
    a.stop();
    b.stop();
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
}
