//! A new user's walk through the README, with the real binary.

use crate::common::*;
use serde_json::json;
use std::process::Command;

#[test]
fn admin_cli_audit_and_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let admin = server
        .bootstrap
        .clone()
        .expect("first start prints the bootstrap admin key");
    assert!(admin.starts_with("cy_"));

    let out = stdout(&server.cli(
        &admin,
        &[
            "accounts",
            "create",
            "acme/cn/hr",
            "--time-zone",
            "Asia/Shanghai",
            "--meta",
            "cost_center=CC-42",
        ],
    ));
    assert!(out.contains("created acme/cn/hr"), "{out}");
    let out = stdout(&server.cli(&admin, &["accounts", "list", "--under", "acme"]));
    for p in ["acme ", "acme/cn ", "acme/cn/hr "] {
        assert!(out.contains(p), "{out}");
    }
    let out = stdout(&server.cli(&admin, &["accounts", "show", "acme/cn/hr"]));
    assert!(
        out.contains("CC-42") && out.contains("Asia/Shanghai"),
        "{out}"
    );

    // A key is printed once and works; its secret is nowhere in the data directory.
    let key = stdout(&server.cli(
        &admin,
        &[
            "keys",
            "create",
            "--account",
            "acme/cn",
            "--scopes",
            "read,admin",
        ],
    ));
    let key = key.trim().to_string();
    assert!(key.starts_with("cy_"), "{key}");
    let out = stdout(&server.cli(&key, &["accounts", "list"]));
    assert!(out.contains("acme/cn/hr"), "{out}");
    let out = stdout(&server.cli(&admin, &["keys", "list", "--account", "acme"]));
    assert!(out.contains(&key[3..15]) && !out.contains(&key), "{out}");

    // Bad input to CLI commands fails with a clear message and exit code 2.
    for (args, needle) in [
        (vec!["accounts", "create", "a//b"], "empty segment"),
        (vec!["accounts", "create", "../x"], "is not allowed"),
        (
            vec!["keys", "create", "--account", "acme", "--scopes", "root"],
            "unknown scope",
        ),
        (vec!["accounts", "create", "other"], "outside the subtree"),
    ] {
        let k = if args[2] == "other" { &key } else { &admin };
        let o = server.cli(k, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }

    // Usage and corrections.
    for (tokens, reason) in [
        ("text.input=120,text.output=40", "backfill"),
        ("text.input=-20", "duplicate"),
    ] {
        let out = stdout(&server.cli(
            &admin,
            &[
                "adjust",
                "--account",
                "acme/cn/hr",
                "--service",
                "llm.chat",
                "--model",
                "qwen-max",
                "--reason",
                reason,
                "--tokens",
                tokens,
            ],
        ));
        assert!(out.contains("recorded adjustment as entry"), "{out}");
    }
    let usage_args = [
        "usage",
        "--account",
        "acme",
        "--group-by",
        "model,account",
        "--bucket",
        "day",
        "--json",
    ];
    let before = stdout(&server.cli(&admin, &usage_args));
    let v: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_eq!(v["tz"], "UTC");
    assert_eq!(v["rows"][0]["tokens"]["text.input"], 100);
    assert_eq!(v["rows"][0]["account"], "acme/cn/hr");

    // Revocation takes effect at once.
    let o = server.cli(&admin, &["keys", "revoke", &key[3..15]]);
    stdout(&o);
    let o = server.cli(&key, &["accounts", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("revoked"));

    // Audit: checkpoint, proof, export, verify.
    let out = stdout(&server.cli(&admin, &["audit", "checkpoint"]));
    assert!(
        out.contains("\n\u{2014} ") && out.contains("public key: "),
        "{out}"
    );
    let proof = stdout(&server.cli(&admin, &["audit", "prove", "3"]));
    let p: serde_json::Value = serde_json::from_str(&proof).unwrap();
    assert_eq!(p["entry_id"], 3);
    assert!(p["proof"].is_array() && p["checkpoint"].is_string());
    // A third party checks the proof with its own code (Python standard library only).
    let proof_file = tmp.path().join("proof.json");
    std::fs::write(&proof_file, &proof).unwrap();
    let checker =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/check_proof.py");
    let o = Command::new("python3")
        .arg(&checker)
        .arg(&proof_file)
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok: entry 3"));
    let mut forged = p.clone();
    forged["entry"] =
        serde_json::Value::String(p["entry"].as_str().unwrap().replace("acme", "acmf"));
    // With a leaf hash that matches the forged entry, so it is the Merkle path that fails.
    use base64::Engine;
    let forged_leaf = ciyuan_tlog::leaf_hash(forged["entry"].as_str().unwrap().as_bytes());
    forged["leaf_hash"] =
        serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(forged_leaf));
    std::fs::write(&proof_file, forged.to_string()).unwrap();
    let o = Command::new("python3")
        .arg(&checker)
        .arg(&proof_file)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "a forged entry passed the third-party check"
    );
    let bundle = tmp.path().join("bundle");
    let out = stdout(&server.cli(&admin, &["audit", "export", bundle.to_str().unwrap()]));
    assert!(out.contains("exported"), "{out}");
    let (code, msg) = verify(&bundle);
    assert_eq!(code, 0, "{msg}");

    // The same over HTTP for auditors: an audit-scoped key, and a read key refused.
    let (s, body) = server.http(
        "POST",
        "/api/v1/keys",
        &admin,
        Some(&json!({"account": "/", "scopes": ["audit"]})),
    );
    assert_eq!(s, 201);
    let auditor = json(&body)["key"].as_str().unwrap().to_string();
    let (s, body) = server.http("GET", "/api/v1/audit/checkpoint", &auditor, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let (s, body) = server.http(
        "POST",
        "/api/v1/keys",
        &admin,
        Some(&json!({"account": "acme", "scopes": ["read"]})),
    );
    assert_eq!(s, 201);
    let reader = json(&body)["key"].as_str().unwrap().to_string();
    let (s, _) = server.http("GET", "/api/v1/audit/checkpoint", &reader, None);
    assert_eq!(s, 403);

    server.stop();
    let (code, msg) = verify(&data);
    assert_eq!(code, 0, "{msg}");
    assert!(msg.starts_with("ok: "), "{msg}");

    // No key secret is stored anywhere in the data directory, nor in the database.
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap();
        let hay = String::from_utf8_lossy(&bytes);
        assert!(
            !hay.contains(&admin[16..]) && !hay.contains(&key[16..]),
            "secret in {}",
            entry.display()
        );
    }
    if let Some(url) = database_of(&data) {
        for (table, hay) in database_text(&url) {
            assert!(
                !hay.contains(&admin[16..]) && !hay.contains(&key[16..]),
                "secret in table {table}"
            );
        }
    }

    // Rebuild from the log alone gives byte-identical answers.
    assert!(stdout(&rebuild(&data)).contains("rebuilt projections"));
    let server = Server::start(&data);
    assert!(
        server.bootstrap.is_none(),
        "the bootstrap key is printed only on the first start"
    );
    let after = stdout(&server.cli(&admin, &usage_args));
    assert_eq!(before, after);
    let out = stdout(&server.cli(&admin, &["accounts", "show", "acme/cn/hr"]));
    assert!(out.contains("CC-42"), "{out}");
    server.stop();
}

#[test]
fn ingest_a_file_twice_across_a_restart_counts_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let admin = server.bootstrap.clone().unwrap();
    stdout(&server.cli(&admin, &["accounts", "create", "acme/cn"]));
    let key = stdout(&server.cli(
        &admin,
        &["keys", "create", "--account", "acme", "--scopes", "ingest"],
    ));
    let key = key.trim().to_string();
    let mut lines = String::new();
    for i in 0..2500 {
        let ev = json!({"specversion": "1.0", "id": format!("e{i}"), "source": "svc://app", "type": "llm.usage",
            "subject": "acme/cn", "data": {"model": "deepseek-chat", "input_tokens": 3, "output_tokens": 1}});
        lines.push_str(&ev.to_string());
        lines.push('\n');
        if i == 1200 {
            lines.push_str("{not json\n");
            let bad = json!({"specversion": "1.0", "id": "bad", "source": "svc://app", "type": "llm.usage",
                "subject": "acme/cn", "data": {"model": "m", "input_tokens": -3}});
            lines.push_str(&bad.to_string());
            lines.push('\n');
        }
    }
    let file = tmp.path().join("events.jsonl");
    std::fs::write(&file, lines).unwrap();
    let o = server.cli(&key, &["ingest", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "rejections make the exit code 1");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "2500 accepted, 0 duplicates, 2 rejected"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 1202: not JSON")
            && err.contains("line 1203: data.input_tokens: must not be negative"),
        "{err}"
    );
    server.stop();

    let server = Server::start(&data);
    let o = server.cli(&key, &["ingest", file.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "0 accepted, 2500 duplicates, 2 rejected"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(
        &server.cli(&admin, &["usage", "--account", "acme", "--json"]),
    ))
    .unwrap();
    assert_eq!(
        v["rows"][0]["tokens"],
        json!({"text.input": 7500, "text.output": 2500})
    );
    server.stop();
}

#[test]
fn config_file_then_environment_then_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ciyuan.toml");
    std::fs::write(
        &config,
        format!(
            "data = \"{}\"\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 2048\n[ledger]\norigin = \"example.test/ledger\"\n",
            tmp.path().join("from-file").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"]) // the flag beats the file's unusable port
        .env("CIYUAN_DATA", tmp.path().join("from-env")); // the environment beats the file
    let server = Server::spawn(cmd);
    assert_eq!(server.data_dir, tmp.path().join("from-env"));
    let admin = server.bootstrap.clone().unwrap();
    // max_body_bytes from the file holds.
    let big = json!({"path": "a", "display_name": "x".repeat(3000)});
    let (s, body) = server.http("POST", "/api/v1/accounts", &admin, Some(&big));
    assert_eq!(s, 413, "{}", String::from_utf8_lossy(&body));
    // The origin from the file names the log.
    let out = stdout(&server.cli(&admin, &["audit", "checkpoint"]));
    assert!(out.starts_with("example.test/ledger\n"), "{out}");
    server.stop();
    // An unknown key in the file is refused with its name.
    std::fs::write(&config, "lisen = \"x\"\n").unwrap();
    let o = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown field `lisen`"));
}

#[test]
fn rebuild_and_verify_refuse_while_the_server_runs() {
    if backend() == Backend::Postgres {
        return rebuild_refuses_while_a_node_is_connected();
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path());
    let (code, msg) = verify(tmp.path());
    assert_eq!(code, 1);
    assert!(msg.contains("open in a running server"), "{msg}");
    for cmd in ["rebuild", "migrate"] {
        let o = Command::new(bin())
            .args([cmd, "--data"])
            .arg(tmp.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.to_lowercase().contains("lock"), "{cmd}: {err}");
    }
    server.stop();
    // Stopped, the data directory migrates (and its ledger recovers) offline.
    let o = Command::new(bin())
        .args(["migrate", "--data"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let out = stdout(&o);
    let mut lines = out.lines();
    let version = ciyuan_store_sqlite::SqliteStore::SCHEMA_VERSION;
    assert_eq!(
        lines.next(),
        Some(
            format!("ledger: 1 entries; database schema version {version} (this build: {version})")
                .as_str()
        ),
        "{out}"
    );
    // And the projections are caught up with the ledger.
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("projections: ") && l.contains(" entries applied in ")),
        "{out}"
    );
}

/// The PostgreSQL form: a database is shared by design (several nodes, and `audit
/// verify` reads it while they run), but its projections are not rebuilt under a
/// running node.
fn rebuild_refuses_while_a_node_is_connected() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let o = rebuild(&data);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stop every node"), "{err}");
    server.stop();
    assert!(stdout(&rebuild(&data)).contains("rebuilt projections from 1 ledger entries"));
}

pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn count_prints_the_count_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("t.txt");
    std::fs::write(
        &file,
        "词元是人工智能服务中最小的可计量单位。Tokens are the unit.",
    )
    .unwrap();
    for (model, want) in [
        ("gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("qwen-max", "qwen"),
        ("deepseek-chat", "deepseek_v4"),
    ] {
        let by_model = Command::new(bin())
            .args(["count", "--model", model])
            .arg(&file)
            .output()
            .unwrap();
        let by_encoding = Command::new(bin())
            .args(["count", "--encoding", want])
            .arg(&file)
            .output()
            .unwrap();
        let n = stdout(&by_model);
        assert_eq!(n, stdout(&by_encoding));
        assert!(n.trim().parse::<u64>().unwrap() > 10, "{model}: {n}");
    }
    // Standard input, and a clear error for a model without a known tokenizer.
    let mut child = Command::new(bin())
        .args(["count", "--model", "gpt-4o", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello world")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "2\n");
    let o = Command::new(bin())
        .args(["count", "--model", "claude-3"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no tokenizer is known for model"));
}
