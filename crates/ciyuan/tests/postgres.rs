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
    crate::common::export_database(&url, &bundle);
    let (code, from_bundle) = crate::common::verify(&bundle);
    assert_eq!(code, 0, "{from_bundle}");
    assert_eq!(root_of(&from_bundle), root_of(&out));
}

#[test]
fn two_nodes_append_to_one_verifiable_log_and_see_each_others_entries() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (_tmp, a, b, root, url) = two_nodes(&cluster, &unique("two"));
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

/// Two nodes on one fresh database (the second with a copy of the first's signing
/// key): the temporary directory, the nodes, the bootstrap key and the database's URL.
pub(crate) fn two_nodes(
    cluster: &TestCluster,
    name: &str,
) -> (tempfile::TempDir, Server, Server, String, String) {
    let url = cluster.database(name).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = Server::start_with(&a_dir, &["--database", &url]);
    let root = a.bootstrap.clone().unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    for f in ["signing.key", "public.key"] {
        std::fs::copy(a_dir.join(f), b_dir.join(f)).unwrap();
    }
    let b = Server::start_with(&b_dir, &["--database", &url]);
    (tmp, a, b, root, url)
}

/// Polls `f` every 20 ms until it holds; how long that took, or `None` after `limit`.
fn within(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> Option<std::time::Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

#[test]
fn a_limit_an_access_rule_and_an_event_id_set_on_one_node_hold_on_the_other() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (_tmp, a, b, root, url) = two_nodes(&cluster, "follow");
    stdout(&a.cli(&root, &["accounts", "create", "acme/cn"]));
    let key = a.new_key(&root, "acme/cn", "gateway,ingest,read");
    let chat = |model: &str| json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hello"}]});
    let (s, body) = b.http(
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&chat("gpt-4o-mini")),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));

    // An access rule set on A refuses the model on B within a second.
    let (s, _) = a.http(
        "PUT",
        "/api/v1/access/acme",
        &root,
        Some(&json!({"deny": ["gpt-4o-mini*"]})),
    );
    assert_eq!(s, 200);
    let took = within(std::time::Duration::from_secs(1), || {
        b.http(
            "POST",
            "/v1/chat/completions",
            &key,
            Some(&chat("gpt-4o-mini")),
        )
        .0 == 403
    });
    assert!(
        took.is_some(),
        "the access rule reached the other node within 1 s"
    );

    // A hard limit set on A refuses on B within a second: 10 tokens a day, and B's
    // usage so far (one call) is counted against it.
    let (s, body) = a.http(
        "PUT",
        "/api/v1/budgets/acme",
        &root,
        Some(&json!({"name": "tiny", "tokens": 10, "period": "day"})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let took = within(std::time::Duration::from_secs(1), || {
        b.http("POST", "/v1/chat/completions", &key, Some(&chat("gpt-4o")))
            .0
            == 429
    });
    assert!(
        took.is_some(),
        "the limit reached the other node within 1 s"
    );
    // And B's status of the limit counts what A's node recorded.
    let (s, body) = b.http("GET", "/api/v1/budgets/acme", &root, None);
    assert_eq!(s, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("\"tiny\""),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // An event recorded on A, sent again to B, is answered with A's entry.
    let ev = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "svc://follow", "type": "llm.usage",
        "subject": "acme/cn", "data": {"model": "qwen-max", "input_tokens": 100, "output_tokens": 1}})
    };
    let (s, body) = a.http("POST", "/v1/events", &key, Some(&ev("once")));
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&body));
    let first = json(&body)["entry_id"].as_u64().unwrap();
    let (s, body) = b.http("POST", "/v1/events", &key, Some(&ev("once")));
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        json(&body)["entry_id"].as_u64(),
        Some(first),
        "B answers with A's entry"
    );

    // The same 50 events sent to both nodes at the same moment: each is in the
    // ledger once; a node that lost the race answers it as a duplicate, or asks for
    // it again (then answers it as a duplicate).
    let batch: Vec<serde_json::Value> = (0..50).map(|i| ev(&format!("race-{i}"))).collect();
    let answers: Vec<serde_json::Value> = std::thread::scope(|s| {
        let runs: Vec<_> = [&a, &b]
            .into_iter()
            .map(|node| {
                let (key, batch) = (key.clone(), batch.clone());
                s.spawn(move || {
                    let mut pending = batch;
                    let mut done = Vec::new();
                    for _ in 0..5 {
                        let (st, body) =
                            node.http("POST", "/v1/events", &key, Some(&json!(pending)));
                        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
                        let mut again = Vec::new();
                        for (ev, r) in pending
                            .iter()
                            .zip(json(&body)["results"].as_array().unwrap())
                        {
                            if r["status"] == "rejected" {
                                again.push(ev.clone());
                            } else {
                                done.push(r.clone());
                            }
                        }
                        pending = again;
                        if pending.is_empty() {
                            break;
                        }
                    }
                    assert!(pending.is_empty(), "every event answered after retries");
                    done
                })
            })
            .collect();
        runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    let accepted = answers.iter().filter(|r| r["status"] == "accepted").count();
    let duplicates = answers
        .iter()
        .filter(|r| r["status"] == "duplicate")
        .count();
    assert_eq!((accepted, duplicates), (50, 50), "{answers:?}");
    // Both answers of an event name the same entry.
    let mut by_id: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for r in &answers {
        by_id
            .entry(r["id"].as_str().unwrap().to_string())
            .or_default()
            .push(r["entry_id"].as_u64().unwrap());
    }
    assert!(
        by_id.values().all(|e| e.len() == 2 && e[0] == e[1]),
        "{by_id:?}"
    );
    a.stop();
    b.stop();
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn three_nodes_racing_streams_keep_one_hard_limit_and_one_wallet() {
    // A request holds its prompt and 20 output tokens: some 35 tokens and 0.00024 USD.
    // The limit lets ~40 through, the wallet ~40: 180 streams race for them at once
    // (slices of a few requests at first, then, near the limit, one by one).
    race_three_nodes("race3", 1400, "0.0095", Load::Burst(60));
}

#[test]
fn three_nodes_admitting_from_slices_keep_one_hard_limit_and_one_wallet() {
    // A limit of ~115 requests and a wallet of ~200: each node's share of the room
    // is a slice of many requests, and 3 nodes x 4 clients x 40 requests one after
    // another (a steady flow, which keeps a node's slices in use) outrun the limit.
    let slices = race_three_nodes("slices3", 4000, "0.05", Load::Steady(4, 40));
    assert!(slices > 0, "no request was admitted from a slice");
}

/// How the requests of [`race_three_nodes`] come to each node.
#[derive(Clone, Copy)]
enum Load {
    /// This many streams fired at once.
    Burst(usize),
    /// This many clients, each sending this many requests one after another.
    Steady(usize, usize),
}

/// Three nodes on one database, one hard limit of `tokens` and one wallet of `wallet`
/// USD, and `load` at each node: usage ends within the limit and the wallet at or
/// above zero on every node's view, and the log verifies. Answers how many requests
/// the nodes admitted from slices.
fn race_three_nodes(name: &str, tokens: i64, wallet: &str, load: Load) -> u64 {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (tmp, a, b, root, url) = two_nodes(&cluster, name);
    let c_dir = tmp.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    for f in ["signing.key", "public.key"] {
        std::fs::copy(tmp.path().join("a").join(f), c_dir.join(f)).unwrap();
    }
    let c = Server::start_with(&c_dir, &["--database", &url]);
    let node = "acme/race";
    stdout(&a.cli(&root, &["accounts", "create", node]));
    let key = a.new_key(&root, node, "gateway,read");
    // Prices, so each request costs money its wallet holds.
    let book = tmp.path().join("book.toml");
    std::fs::write(
        &book,
        "name = \"list\"\ncurrency = \"USD\"\n[[rules]]\nmodel = \"gpt-4o*\"\n\
         unit_prices = { \"text.input\" = \"0.0000025\", \"text.output\" = \"0.00001\" }\n",
    )
    .unwrap();
    b.import_toml_book(&root, &book);
    let (s, body) = c.http(
        "PUT",
        "/api/v1/budgets/acme",
        &root,
        Some(&json!({"name": "race", "tokens": tokens, "period": "month"})),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    stdout(&a.cli(
        &root,
        &[
            "wallets",
            "topup",
            node,
            "--amount",
            wallet,
            "--currency",
            "USD",
        ],
    ));
    // Every node has followed the limit, the book and the top-up.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let runs: Vec<_> = [&a, &b, &c]
            .into_iter()
            .map(|server| {
                let key = key.clone();
                s.spawn(move || match load {
                    Load::Burst(streams) => crate::money::race(server, &key, streams),
                    Load::Steady(clients, requests) => std::thread::scope(|s| {
                        let each: Vec<_> = (0..clients)
                            .map(|_| {
                                s.spawn(|| {
                                    (0..requests)
                                        .map(|_| {
                                            let (st, body) = server.http(
                                                "POST",
                                                "/v1/chat/completions",
                                                &key,
                                                Some(&json!({"model": "gpt-4o",
                                                    "max_tokens": 20, "messages": [{"role":
                                                    "user", "content":
                                                    "Race for the last cent."}]})),
                                            );
                                            (st, String::from_utf8_lossy(&body).into_owned())
                                        })
                                        .collect::<Vec<_>>()
                                })
                            })
                            .collect();
                        each.into_iter().flat_map(|h| h.join().unwrap()).collect()
                    }),
                })
            })
            .collect();
        let per: Vec<Vec<(u16, String)>> = runs.into_iter().map(|r| r.join().unwrap()).collect();
        eprintln!(
            "answered per node: {:?}",
            per.iter()
                .map(|a| a.iter().filter(|(s, _)| *s == 200).count())
                .collect::<Vec<_>>()
        );
        per.into_iter().flatten().collect()
    });
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    let other: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s != 200 && *s != 429)
        .collect();
    assert!(other.is_empty(), "other answers: {other:?}");
    assert!(ok > 0 && refused > 0, "{ok} answered, {refused} refused");
    // Once the ledger has every request: the tokens used stay within the limit and
    // the wallet at or above zero, on every node's view.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for server in [&a, &b, &c] {
        let (s, body) = server.http("GET", &format!("/api/v1/usage?account={node}"), &root, None);
        assert_eq!(s, 200);
        let used: i64 = json(&body)["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["total"].as_i64().unwrap())
            .sum();
        assert!(
            used <= tokens,
            "{used} tokens used against a hard limit of {tokens} ({ok} answered)"
        );
        assert!(used > 0);
        let (s, body) = server.http("GET", &format!("/api/v1/wallets/{node}"), &root, None);
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let w = json(&body);
        let usd = w["wallets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["currency"] == "USD")
            .unwrap()
            .clone();
        let balance = usd["balance"].as_str().unwrap();
        assert!(
            !balance.starts_with('-'),
            "the wallet went below zero: {usd}"
        );
        eprintln!(
            "{}: {ok} answered, {refused} refused; {used} of {tokens} tokens, balance {balance} USD",
            server.url
        );
    }
    let from_slices: u64 = [&a, &b, &c]
        .iter()
        .map(|server| {
            let (s, body) = server.http("GET", "/metrics", &root, None);
            assert_eq!(s, 200);
            let text = String::from_utf8_lossy(&body).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("ciyuan_holds_admitted_total{by=\"slice\"} "))
                .unwrap_or_else(|| panic!("no slice count in /metrics:\n{text}"))
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    eprintln!("{from_slices} of {ok} answered requests admitted from slices");
    a.stop();
    b.stop();
    c.stop();
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
    from_slices
}

#[test]
fn prices_changed_on_one_node_while_another_rates_keep_every_rating_in_log_order() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (tmp, a, b, root, url) = two_nodes(&cluster, "rules");
    stdout(&a.cli(&root, &["accounts", "create", "acme/cn"]));
    let key = a.new_key(&root, "acme/cn", "gateway,ingest,read");
    let book = |price: &str| {
        let path = tmp.path().join(format!("book-{price}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"list\"\ncurrency = \"USD\"\n[[rules]]\nmodel = \"gpt-4o*\"\n\
                 unit_prices = {{ \"text.input\" = \"{price}\", \"text.output\" = \"0.00001\" }}\n"
            ),
        )
        .unwrap();
        path
    };
    a.import_toml_book(&root, &book("0.000001"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (rated, changes) = std::thread::scope(|s| {
        // B rates events and gateway calls without pause, from three clients...
        let rating: Vec<_> = (0..3).map(|t| { let (b, key, stop) = (&b, &key, &stop); s.spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let batch: Vec<serde_json::Value> = (0..5)
                    .map(|j| {
                        json!({"specversion": "1.0", "id": format!("r-{t}-{n}-{j}"), "source": "svc://rules",
                            "type": "llm.usage", "subject": "acme/cn",
                            "data": {"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 10}})
                    })
                    .collect();
                let (st, body) = b.http("POST", "/v1/events", key, Some(&json!(batch)));
                assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
                let (st, body) = b.http(
                    "POST",
                    "/v1/chat/completions",
                    key,
                    Some(&json!({"model": "gpt-4o", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "price me"}]})),
                );
                assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
                n += 1;
            }
            n
        })}).collect();
        // ...while A changes the book's prices again and again.
        let mut changes = 0;
        for (i, price) in ["0.000002", "0.000003", "0.000004", "0.000005", "0.000006"]
            .iter()
            .enumerate()
        {
            std::thread::sleep(std::time::Duration::from_millis(150 + 50 * i as u64));
            a.import_toml_book(&root, &book(price));
            changes += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Release);
        (
            rating.into_iter().map(|r| r.join().unwrap()).sum::<usize>(),
            changes,
        )
    });
    assert!(
        rated >= 3 && changes == 5,
        "{rated} rounds of rating, {changes} changes"
    );
    a.stop();
    b.stop();
    // Every rating follows the book version before it in the log.
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn two_nodes_placing_graduated_tiers_at_once_leave_no_gap_and_no_overlap() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (tmp, a, b, root, url) = two_nodes(&cluster, "tiers2");
    stdout(&a.cli(&root, &["accounts", "create", "acme/cn"]));
    let key = a.new_key(&root, "acme/cn", "gateway,ingest,read");
    let book = tmp.path().join("tiered.toml");
    std::fs::write(&book, crate::money::TIERED_BOOK).unwrap();
    a.import_toml_book(&root, &book);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Both nodes take tiered events and gateway calls at once, each event 40,000
    // input tokens: 2 x 3 clients x 8 rounds x 3 events cross the band at 1,500,000.
    std::thread::scope(|s| {
        for (node, tag) in [(&a, "a"), (&b, "b")] {
            for t in 0..3 {
                let key = key.clone();
                s.spawn(move || {
                    for i in 0..8 {
                        let batch: Vec<serde_json::Value> = (0..3)
                            .map(|j| {
                                json!({"specversion": "1.0", "id": format!("{tag}-{t}-{i}-{j}"),
                                    "source": "svc://tiers", "type": "llm.usage",
                                    "subject": "acme/cn",
                                    "data": {"model": "gpt-4o", "input_tokens": 40000,
                                             "output_tokens": 10}})
                            })
                            .collect();
                        let (st, body) = node.http("POST", "/v1/events", &key, Some(&json!(batch)));
                        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
                        let (st, body) = node.http(
                            "POST",
                            "/v1/chat/completions",
                            &key,
                            Some(&json!({"model": "gpt-4o", "max_tokens": 5,
                                "messages": [{"role": "user", "content": "tiers"}]})),
                        );
                        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
                    }
                });
            }
        }
    });
    // A gateway call is recorded after its answer, and a node may wait up to the
    // lease's wait for the other to let the tiers go: poll for every place rather
    // than sleep a fixed time (1.5 s once left three calls unplaced on a loaded CI).
    // Every place follows the one before it on the counter, whichever node made it.
    // Returns the usage entries recorded and how many of them hold a place.
    let placed = || {
        let usage = crate::money::usage_entries(&a, &root);
        let mut next = rust_decimal::Decimal::ZERO;
        let mut placed = 0;
        for e in &usage {
            let place = &e["data"]["rating"]["place"];
            if place.is_null() {
                continue;
            }
            let before: rust_decimal::Decimal = place["before"].as_str().unwrap().parse().unwrap();
            let units: rust_decimal::Decimal = place["units"].as_str().unwrap().parse().unwrap();
            assert_eq!(before, next, "a gap or an overlap at {e}");
            next = before + units;
            placed += 1;
        }
        (usage.len(), placed)
    };
    let all = 2 * 3 * 8 * 4;
    crate::common::wait_for("every event and call recorded", 60, || placed().0 >= all);
    let (usage, placed) = placed();
    assert_eq!(usage, all, "every event and call recorded once");
    assert_eq!(
        placed, all,
        "every event and call placed (none gave up waiting for the lease)"
    );
    a.stop();
    b.stop();
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
}

/// A node lets the tiers lease go only once its places are committed, not as soon as
/// they are ordered: every commit of the log is held back 2 s (a deferred trigger on
/// the head's update sleeps in the commit), node a places one tiered event and idles,
/// and node b, waiting for the lease meanwhile, must place after it. Letting the
/// counters' lock go at the order (as before 24ad77f), a's heartbeat drops the idle
/// lease within 1.5 s, b takes it, catches up to a log without a's place, and places
/// from the same point: an overlap.
#[test]
fn the_tiers_lease_goes_to_another_node_only_once_the_places_are_committed() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (tmp, a, b, root, url) = two_nodes(&cluster, "tiers_commit");
    stdout(&a.cli(&root, &["accounts", "create", "acme/cn"]));
    let key = a.new_key(&root, "acme/cn", "gateway,ingest,read");
    let book = tmp.path().join("tiered.toml");
    std::fs::write(&book, crate::money::TIERED_BOOK).unwrap();
    a.import_toml_book(&root, &book);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pool = ciyuan_store_postgres::Pool::connect(&url).unwrap();
    pool.get()
        .unwrap()
        .batch_execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON log_head
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
        )
        .unwrap();
    let event = |id: &str| {
        json!([{"specversion": "1.0", "id": id, "source": "svc://tiers", "type": "llm.usage",
                "subject": "acme/cn",
                "data": {"model": "gpt-4o", "input_tokens": 40000, "output_tokens": 10}}])
    };
    std::thread::scope(|s| {
        let first = s.spawn(|| a.http("POST", "/v1/events", &key, Some(&event("on-a"))));
        std::thread::sleep(std::time::Duration::from_millis(150));
        let (st, body) = b.http("POST", "/v1/events", &key, Some(&event("on-b")));
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        let (st, body) = first.join().unwrap();
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    });
    pool.get()
        .unwrap()
        .batch_execute("DROP TRIGGER slow_commit ON log_head")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let places: Vec<(String, String)> = crate::money::placed_entries(&a, &root)
        .into_iter()
        .map(|e| {
            let p = &e["data"]["rating"]["place"];
            (
                p["before"].as_str().unwrap().to_string(),
                p["units"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        places,
        [
            ("0".to_string(), "40000".to_string()),
            ("40000".to_string(), "40000".to_string())
        ],
        "each place follows the one before it"
    );
    a.stop();
    b.stop();
}

/// Fires `n` streamed chat requests at once at `server` with `key`, and `session` as
/// `x-ciyuan-session` when given; each answer's status and body.
fn race_as(server: &Server, key: &str, session: Option<&str>, n: usize) -> Vec<(u16, String)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", server.url);
    rt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let mut req = client
                    .post(&url)
                    .bearer_auth(key)
                    .header("x-sim-tokens-per-sec", "200")
                    .header("x-sim-output-tokens", "20")
                    .json(&json!({"model": "gpt-4o", "stream": true, "max_tokens": 20,
                        "messages": [{"role": "user", "content": "Race for the last token."}]}));
                if let Some(s) = session {
                    req = req.header("x-ciyuan-session", s);
                }
                tokio::spawn(async move {
                    match req.send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let body = r.text().await.unwrap_or_else(|e| format!("<cut: {e}>"));
                            (status, body)
                        }
                        Err(e) => (0, e.to_string()),
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

/// The tokens the ledger holds for `node`, as `server` sees them.
fn used_tokens(server: &Server, root: &str, node: &str) -> i64 {
    let (s, body) = server.http("GET", &format!("/api/v1/usage?account={node}"), root, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    json(&body)["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["total"].as_i64().unwrap())
        .sum()
}

#[test]
fn two_nodes_keep_one_hard_limit_per_key_and_per_session() {
    let cluster = TestCluster::start().expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let (_tmp, a, b, root, url) = two_nodes(&cluster, &unique("perkey"));
    // One node per limit, so its usage is the one key's or the one session's.
    stdout(&a.cli(&root, &["accounts", "create", "acme/keyed"]));
    stdout(&a.cli(&root, &["accounts", "create", "acme/sessions"]));
    let k1 = a.new_key(&root, "acme/keyed", "gateway,read");
    let k2 = a.new_key(&root, "acme/keyed", "gateway,read");
    let s1 = a.new_key(&root, "acme/sessions", "gateway,read");
    let s2 = a.new_key(&root, "acme/sessions", "gateway,read");
    // A request holds some 35 tokens: each limit lets ~25 through, and 2 x 50
    // streams race for them on each.
    let limit = 900;
    for (node, per) in [("acme/keyed", "key"), ("acme/sessions", "session")] {
        let (s, body) = b.http(
            "PUT",
            &format!("/api/v1/budgets/{node}"),
            &root,
            Some(
                &json!({"name": format!("per-{per}"), "tokens": limit, "period": "month",
                "per": per}),
            ),
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let runs = [
            s.spawn(|| race_as(&a, &k1, None, 50)),
            s.spawn(|| race_as(&b, &k1, None, 50)),
            // One session over two keys and two nodes.
            s.spawn(|| race_as(&a, &s1, Some("alice"), 50)),
            s.spawn(|| race_as(&b, &s2, Some("alice"), 50)),
        ];
        runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    let other: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s != 200 && *s != 429)
        .collect();
    assert!(other.is_empty(), "other answers: {other:?}");
    assert!(ok > 0 && refused > 0, "{ok} answered, {refused} refused");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for server in [&a, &b] {
        for node in ["acme/keyed", "acme/sessions"] {
            let used = used_tokens(server, &root, node);
            eprintln!("{}: {node} used {used} of {limit}", server.url);
            assert!(used > 0);
            assert!(
                used <= limit,
                "{node}: {used} tokens used against a hard limit of {limit} per {} ({ok} answered)",
                if node == "acme/keyed" {
                    "key"
                } else {
                    "session"
                }
            );
        }
    }
    // Sent on, one request at a time to each node in turn, until both refuse (what
    // the race left in flight, or a node's slice, may leave room for a few more): the
    // limits still hold.
    for (key, session) in [(&k1, None), (&s2, Some("alice"))] {
        let mut rounds = 0;
        loop {
            let a_says = race_as(&a, key, session, 1);
            let b_says = race_as(&b, key, session, 1);
            for (status, body) in a_says.iter().chain(&b_says) {
                assert!(*status == 200 || *status == 429, "{status} {body}");
            }
            if a_says[0].0 == 429 && b_says[0].0 == 429 {
                break;
            }
            rounds += 1;
            assert!(rounds < 40, "40 more rounds fit a spent limit");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for server in [&a, &b] {
        for node in ["acme/keyed", "acme/sessions"] {
            let used = used_tokens(server, &root, node);
            assert!(
                used <= limit,
                "{node}: {used} of {limit} after requests in turn"
            );
        }
    }
    // The limits are the key's and the session's: another key and another session
    // still pass, on either node.
    for (server, key, session) in [(&a, &k2, None), (&b, &s1, Some("bob"))] {
        let answers = race_as(server, key, session, 1);
        assert_eq!(answers[0].0, 200, "{}", answers[0].1);
    }
    a.stop();
    b.stop();
    let (code, out) = crate::common::verify(std::path::Path::new(&url));
    assert_eq!(code, 0, "{out}");
}
