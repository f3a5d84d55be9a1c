//! Money end to end, through the CLI: LiteLLM's real table imported, usage rated at
//! list price and under a contract, and a prepaid wallet that holds at zero against
//! a race of streamed gateway requests, its postings summing exactly and the ledger
//! verifying afterwards.

use crate::common::{Server, json, stdout, verify};
use ciyuan_core::{ExactSum, parse_amount};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// LiteLLM's price table, as the issue ships it beside the repository.
fn litellm_table() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/litellm_model_prices.json");
    assert!(
        p.is_file(),
        "LiteLLM's table is expected at {} (../shared/fixtures beside the repository)",
        p.display()
    );
    p
}

/// An amount as an exact sum, from the decimal text the API answers.
fn exact(field: &str, v: &Value) -> ExactSum {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a decimal string: {v}"));
    ExactSum::of(parse_amount(field, text).unwrap_or_else(|e| panic!("{e}")))
}

fn amount(text: &str) -> ExactSum {
    ExactSum::of(parse_amount("expected", text).unwrap())
}

/// `ciyuan ARGS --json`, parsed.
fn cli_json(server: &Server, key: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    json(stdout(&server.cli(key, &all)).as_bytes())
}

fn import_litellm(server: &Server, key: &str) -> Value {
    let table = litellm_table();
    cli_json(
        server,
        key,
        &[
            "prices",
            "import",
            "--format",
            "litellm",
            table.to_str().unwrap(),
        ],
    )
}

/// One CloudEvent of `gpt-4o` usage on `subject`, through `ciyuan ingest`.
fn ingest_gpt_4o(server: &Server, key: &str, dir: &std::path::Path, id: &str, subject: &str) {
    let ev = json!({"specversion": "1.0", "id": id, "source": "svc://billing-test",
        "type": "llm.usage", "subject": subject,
        "data": {"model": "gpt-4o", "input_tokens": 1_000_000, "output_tokens": 200_000}});
    let file = dir.join(format!("{id}.jsonl"));
    std::fs::write(&file, format!("{ev}\n")).unwrap();
    let out = stdout(&server.cli(key, &["ingest", file.to_str().unwrap()]));
    assert_eq!(out.trim(), "1 accepted, 0 duplicates, 0 rejected");
}

/// The usage entries of `account` in the ledger, read back through the audit API.
fn usage_entries_of(server: &Server, key: &str, account: &str) -> Vec<Value> {
    usage_entries(server, key)
        .into_iter()
        .filter(|e| e["account"] == account)
        .collect()
}

#[test]
fn litellm_prices_rate_gpt_4o_at_list_and_a_contract_discounts_a_child() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"));
    let root = server.bootstrap.clone().unwrap();

    let book = import_litellm(&server, &root);
    assert_eq!(book["name"], "list");
    assert_eq!(book["version"], 1);
    assert_eq!(book["currency"], "USD");
    assert!(book["rules"].as_u64().unwrap() > 4000, "{book}");
    let sha = book["source"]["sha256"].as_str().unwrap();
    assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
    let unmapped = book["source"]["unmapped"].as_array().unwrap();
    assert!(
        unmapped
            .iter()
            .any(|k| k.as_str().unwrap().starts_with("output_cost_per_image")),
        "keys that cannot be mapped are listed: {unmapped:?}"
    );
    // The human forms name what a user checks: the rules that price a model.
    let listed = stdout(&server.cli(&root, &["prices", "list"]));
    assert!(
        listed.contains("list") && listed.contains("USD"),
        "{listed}"
    );
    let shown = stdout(&server.cli(&root, &["prices", "show", "list", "--model", "gpt-4o"]));
    assert!(
        shown.contains("text.input=0.0000025") && shown.contains("text.output=0.00001"),
        "{shown}"
    );

    // A hand-written book, its next version from a later date, and what changed.
    let cn = tmp.path().join("cn.toml");
    let book_text = "name = \"cn\"\ncurrency = \"CNY\"\n[[rules]]\nmodel = \"qwen-max*\"\n\
        unit_prices = { \"text.input\" = \"0.0000024\", \"text.output\" = 9.6e-06 }\n";
    std::fs::write(&cn, book_text).unwrap();
    let out = stdout(&server.cli(
        &root,
        &["prices", "import", "--format", "toml", cn.to_str().unwrap()],
    ));
    assert!(
        out.contains("recorded book cn version 1 (CNY, 1 rule,"),
        "{out}"
    );
    std::fs::write(&cn, book_text.replace("0.0000024", "0.0000020")).unwrap();
    let later = [
        "prices",
        "import",
        "--format",
        "toml",
        cn.to_str().unwrap(),
        "--effective-from",
        "2099-01-01T00:00:00Z",
    ];
    stdout(&server.cli(&root, &later));
    let diff = stdout(&server.cli(&root, &["prices", "diff", "cn", "--from", "1"]));
    assert!(
        diff.contains("from version 1 to 2: 1 change") && diff.contains("0.0000024 -> 0.0000020"),
        "{diff}"
    );
    let shown = stdout(&server.cli(&root, &["prices", "show", "cn", "--version", "1"]));
    assert!(
        shown.contains("text.output=0.0000096"),
        "exact from 9.6e-06: {shown}"
    );
    let wrong = server.cli(
        &root,
        &[
            "prices",
            "import",
            "--format",
            "litellm",
            cn.to_str().unwrap(),
        ],
    );
    assert!(!wrong.status.success(), "a TOML file is not LiteLLM's JSON");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("400"));

    for path in ["acme/list", "acme/deal/child"] {
        stdout(&server.cli(&root, &["accounts", "create", path]));
    }
    let set = stdout(&server.cli(
        &root,
        &[
            "contracts",
            "set",
            "acme/deal",
            "--book",
            "list",
            "--discount",
            "10",
        ],
    ));
    assert!(set.contains("10% off"), "{set}");
    let shown = stdout(&server.cli(&root, &["contracts", "show", "acme/deal/child"]));
    assert!(
        shown.contains("contract of acme/deal") && shown.contains("10% off"),
        "the child inherits its parent's contract: {shown}"
    );
    let bad = server.cli(
        &root,
        &[
            "contracts",
            "set",
            "acme/deal",
            "--book",
            "list",
            "--discount",
            "ten",
        ],
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--discount") && err.contains("ten"),
        "a bad figure is named: {err}"
    );

    ingest_gpt_4o(&server, &root, tmp.path(), "at-list", "acme/list");
    ingest_gpt_4o(
        &server,
        &root,
        tmp.path(),
        "under-contract",
        "acme/deal/child",
    );

    // The entry explains its amount: book, version, the unit prices used.
    let listed = usage_entries_of(&server, &root, "acme/list");
    assert_eq!(listed.len(), 1);
    let rating = &listed[0]["data"]["rating"];
    assert_eq!(rating["book"], "list");
    assert_eq!(rating["version"], 1);
    assert_eq!(exact("rating.amount", &rating["amount"]), amount("4.50"));
    let discounted = usage_entries_of(&server, &root, "acme/deal/child");
    let rating = &discounted[0]["data"]["rating"];
    assert_eq!(exact("rating.amount", &rating["amount"]), amount("4.05"));

    let usage = cli_json(
        &server,
        &root,
        &["usage", "--group-by", "account", "--with", "cost"],
    );
    let cost_of = |account: &str| {
        let row = usage["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["account"] == account)
            .unwrap_or_else(|| panic!("no row for {account}: {usage}"));
        exact("cost.USD", &row["cost"]["USD"])
    };
    assert_eq!(cost_of("acme/list"), amount("4.50"));
    assert_eq!(cost_of("acme/deal/child"), amount("4.05"));
    assert_eq!(
        exact("cost_totals.USD", &usage["cost_totals"]["USD"]),
        amount("8.55")
    );
    let human = stdout(&server.cli(&root, &["usage", "--group-by", "account", "--with", "cost"]));
    assert!(human.contains("USD"), "{human}");
}

/// Fires `n` streamed chat requests at once; answers each status and body.
pub(crate) fn race(server: &Server, key: &str, n: usize) -> Vec<(u16, String)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", server.url);
    rt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let req = client
                    .post(&url)
                    .bearer_auth(key)
                    .header("x-sim-tokens-per-sec", "200")
                    .header("x-sim-output-tokens", "20")
                    .json(&json!({"model": "gpt-4o", "stream": true, "max_tokens": 20,
                        "messages": [{"role": "user", "content": "Race for the last cent."}]}));
                tokio::spawn(async move {
                    match req.send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            // Read to the end: the stream settles when it is done.
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

/// The node's USD wallet once nothing is reserved any more.
fn settled_wallet(server: &Server, key: &str, node: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = cli_json(server, key, &["wallets", "show", node]);
        let w = v["wallets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["currency"] == "USD")
            .unwrap_or_else(|| panic!("no USD wallet on {node}: {v}"))
            .clone();
        if exact("reserved", &w["reserved"]).is_zero() {
            return w;
        }
        assert!(Instant::now() < deadline, "reservations left behind: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every movement of the node's wallets, page by page through `wallets history`.
fn history(server: &Server, key: &str, node: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let mut args = vec!["wallets", "history", node, "--limit", "100"];
        let a = after.map(|a| a.to_string());
        if let Some(a) = &a {
            args.extend(["--after", a]);
        }
        let page = cli_json(server, key, &args);
        all.extend(page["movements"].as_array().unwrap().iter().cloned());
        match page["next"].as_u64() {
            Some(n) => after = Some(n),
            None => return all,
        }
    }
}

#[test]
fn a_wallet_holds_at_zero_against_500_streams_and_its_postings_sum_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let root = server.bootstrap.clone().unwrap();
    import_litellm(&server, &root);
    let node = "acme/wallet";
    stdout(&server.cli(&root, &["accounts", "create", node]));
    let key = cli_json(
        &server,
        &root,
        &["keys", "create", "--account", node, "--scopes", "gateway"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();

    // A request holds its prompt plus 20 output tokens of gpt-4o (some 0.00024 USD):
    // the top-up pays for a few dozen of the 500.
    let topup = "0.01";
    let out = stdout(&server.cli(
        &root,
        &[
            "wallets",
            "topup",
            node,
            "--amount",
            topup,
            "--currency",
            "USD",
            "--memo",
            "INV-1",
        ],
    ));
    assert!(out.contains("recorded topup of 0.01 USD"), "{out}");
    let bad = server.cli(
        &root,
        &[
            "wallets",
            "topup",
            node,
            "--amount",
            "1e",
            "--currency",
            "USD",
        ],
    );
    assert!(!bad.status.success(), "a malformed amount is refused");

    let answers = race(&server, &key, 500);
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert!(ok >= 1, "nothing got through");
    assert!(
        !refused.is_empty(),
        "the wallet refused nothing: {ok} answered"
    );
    assert!(
        refused[0].contains("insufficient_quota"),
        "refused as the SDKs expect: {}",
        refused[0]
    );
    let other: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s != 200 && *s != 429)
        .collect();
    assert!(other.is_empty(), "other answers: {other:?}");

    let wallet = settled_wallet(&server, &root, node);
    let balance = exact("balance", &wallet["balance"]);
    assert!(
        !balance.is_negative(),
        "the wallet went below zero: {wallet}"
    );

    // The engine settles a request before its `consume` posting is appended (the
    // gateway groups its records for a few milliseconds): wait until the ledger has
    // caught up with the balance.
    let deadline = Instant::now() + Duration::from_secs(30);
    let movements = loop {
        let movements = history(&server, &root, node);
        let sum = movements.iter().fold(ExactSum::ZERO, |s, m| {
            s.checked_add(ciyuan_effect(node, m)).unwrap()
        });
        if sum == balance {
            break movements;
        }
        assert!(
            Instant::now() < deadline,
            "the postings sum to {sum}, the wallet shows {balance}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut topups = ExactSum::ZERO;
    let mut consumed = ExactSum::ZERO;
    let mut consumes = 0;
    // The balance after each posting, in entry order: never below zero at any point.
    let mut running = ExactSum::ZERO;
    for m in &movements {
        let effect = ciyuan_effect(node, m);
        running = running.checked_add(effect).unwrap();
        assert!(
            !running.is_negative(),
            "the wallet was at {running} after entry {}",
            m["entry"]
        );
        match m["kind"].as_str().unwrap() {
            "topup" => topups = topups.checked_add(effect).unwrap(),
            "consume" => {
                consumes += 1;
                consumed = consumed.checked_add(effect).unwrap();
            }
            other => panic!("unexpected {other} posting: {m}"),
        }
    }
    assert_eq!(topups, amount(topup));
    assert_eq!(running, balance, "the postings sum to the balance shown");
    assert!(
        consumes >= 1 && consumes <= ok,
        "{consumes} consume postings for {ok} answers"
    );
    // Consumption took exactly what the balance lost.
    assert_eq!(
        consumed.checked_neg().unwrap(),
        amount(topup).checked_sub(balance).unwrap(),
        "consumed {consumed}, balance {balance}"
    );
    eprintln!(
        "wallet of {topup} USD against 500 streams: {ok} answered, {} refused, {consumes} consume postings, {consumed} consumed, final balance {balance}",
        refused.len()
    );
    let human = stdout(&server.cli(&root, &["wallets", "history", node, "--limit", "3"]));
    assert!(
        human.contains("topup") && human.contains("INV-1"),
        "{human}"
    );

    server.stop();
    let (code, report) = verify(&data);
    assert_eq!(code, 0, "{report}");
}

/// What a movement did to the node's own wallet accounts: credits less debits.
fn ciyuan_effect(node: &str, m: &Value) -> ExactSum {
    let prefix = format!("{node}:");
    let mut sum = ExactSum::ZERO;
    for leg in m["legs"].as_array().unwrap() {
        if !leg["account"].as_str().unwrap().starts_with(&prefix) {
            continue;
        }
        for (side, negate) in [("credit", false), ("debit", true)] {
            if let Some(v) = leg.get(side).filter(|v| !v.is_null()) {
                let d = exact(side, v);
                let d = if negate { d.checked_neg().unwrap() } else { d };
                sum = sum.checked_add(d).unwrap();
            }
        }
    }
    sum
}

/// A book of one `gpt-4o` rule, as TOML.
fn gpt_4o_book(input: &str) -> String {
    format!(
        "name = \"list\"\ncurrency = \"USD\"\n[[rules]]\nmodel = \"gpt-4o*\"\n\
         unit_prices = {{ \"text.input\" = \"{input}\", \"text.output\" = \"0.00001\" }}\n"
    )
}

#[test]
fn a_price_correction_rerates_a_period_by_appending_corrections_that_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let root = server.bootstrap.clone().unwrap();
    let file = tmp.path().join("list.toml");
    std::fs::write(&file, gpt_4o_book("0.0000025")).unwrap();
    let from = "2026-01-01T00:00:00Z";
    let import = |extra: &[&str]| {
        let mut args = vec![
            "prices",
            "import",
            "--format",
            "toml",
            file.to_str().unwrap(),
            "--effective-from",
            from,
        ];
        args.extend_from_slice(extra);
        server.cli(&root, &args)
    };
    assert!(import(&[]).status.success());
    for path in ["acme/a", "acme/b"] {
        stdout(&server.cli(&root, &["accounts", "create", path]));
    }
    for (id, subject) in [("a1", "acme/a"), ("a2", "acme/a"), ("b1", "acme/b")] {
        ingest_gpt_4o(&server, &root, tmp.path(), id, subject);
    }

    // The input price was wrong from the start: version 2 corrects version 1 from
    // the same moment. Without --correct a version may not start in the past.
    std::fs::write(&file, gpt_4o_book("0.000002")).unwrap();
    let refused = import(&[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("in the past") && err.contains("correct"),
        "{err}"
    );
    assert!(import(&["--correct"]).status.success());
    // The entries keep the rating they were appended with.
    let cost = |account: &str| {
        let usage = cli_json(
            &server,
            &root,
            &["usage", "--group-by", "account", "--with", "cost"],
        );
        let row = usage["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["account"] == account)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {account}: {usage}"));
        exact("cost.USD", &row["cost"]["USD"])
    };
    assert_eq!(cost("acme/a"), amount("9.00"));

    let dry = cli_json(
        &server,
        &root,
        &[
            "prices",
            "rerate",
            "--from",
            from,
            "--account",
            "acme/a",
            "--dry-run",
        ],
    );
    assert_eq!(dry["examined"], 2, "{dry}");
    assert_eq!(dry["corrected"], 2, "{dry}");
    assert_eq!(
        exact("change", &dry["currencies"][0]["change"]),
        amount("-1.0")
    );
    assert_eq!(cost("acme/a"), amount("9.00"), "a dry run appends nothing");

    let human = stdout(&server.cli(&root, &["prices", "rerate", "--from", from]));
    assert!(
        human.contains("3 rated entries read, corrected 3")
            && human.contains("USD: 13.5 before, 12 now, change -1.5"),
        "{human}"
    );
    assert_eq!(cost("acme/a"), amount("8.00"));
    assert_eq!(cost("acme/b"), amount("4.00"));
    // Nothing changed since: a second run corrects nothing.
    let again = cli_json(&server, &root, &["prices", "rerate", "--from", from]);
    assert_eq!(again["examined"], 3, "{again}");
    assert_eq!(again["corrected"], 0, "{again}");

    // Each correction explains itself: the entry it re-rates, both ratings.
    let (s, b) = server.http(
        "GET",
        "/api/v1/audit/entries?start=0&limit=1000",
        &root,
        None,
    );
    assert_eq!(s, 200);
    let corrections: Vec<Value> = b
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(json)
        .filter(|e| e["kind"] == "rating.correction")
        .collect();
    assert_eq!(corrections.len(), 3);
    for c in &corrections {
        assert_eq!(c["data"]["rating"]["version"], 2, "{c}");
        assert_eq!(c["data"]["previous"]["version"], 1, "{c}");
        assert_eq!(
            exact("amount", &c["data"]["rating"]["amount"]),
            amount("4.00")
        );
    }

    // Only a root admin re-rates.
    let tenant = cli_json(
        &server,
        &root,
        &["keys", "create", "--account", "acme", "--scopes", "admin"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let denied = server.cli(&tenant, &["prices", "rerate", "--from", from]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("root admin"));

    server.stop();
    let (code, report) = verify(&data);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("3 of them by corrections"), "{report}");
}

/// A `list` book pricing `gpt-4o` input in graduated monthly tiers: the first
/// 1,500,000 input tokens of a month at 0.000002, the rest at 0.000001.
pub(crate) const TIERED_BOOK: &str = r#"name = "list"
currency = "USD"
[[rules]]
model = "gpt-4o*"
unit_prices = { "text.output" = "0.00001" }
[rules.tiers]
kind = "graduated"
period = "month"
key = "text.input"
bands = [
  { up_to = 1500000, unit_prices = { "text.input" = "0.000002" } },
  { unit_prices = { "text.input" = "0.000001" } },
]
"#;

/// The usage entries of the log (its first 10,000 entries), read back through the
/// audit API, in log order.
pub(crate) fn usage_entries(server: &Server, key: &str) -> Vec<Value> {
    let (s, b) = server.http(
        "GET",
        "/api/v1/audit/entries?start=0&limit=10000",
        key,
        None,
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    b.split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(json)
        .filter(|e| e["kind"] == "usage")
        .collect()
}

/// The usage entries that hold a place on a tier counter, in log order.
pub(crate) fn placed_entries(server: &Server, key: &str) -> Vec<Value> {
    usage_entries(server, key)
        .into_iter()
        .filter(|e| !e["data"]["rating"]["place"].is_null())
        .collect()
}

#[test]
fn graduated_tiers_count_the_month_to_date_across_nodes_restarts_and_concurrent_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let root = server.bootstrap.clone().unwrap();
    let book = tmp.path().join("tiered.toml");
    std::fs::write(&book, TIERED_BOOK).unwrap();
    let out = stdout(&server.cli(
        &root,
        &[
            "prices",
            "import",
            "--format",
            "toml",
            book.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("recorded book list version 1"), "{out}");
    stdout(&server.cli(
        &root,
        &["accounts", "create", "acme", "--time-zone", "Asia/Shanghai"],
    ));
    for path in ["acme/cn", "acme/us"] {
        stdout(&server.cli(&root, &["accounts", "create", path]));
    }

    // 1,000,000 input tokens in the first band; the next 1,000,000 straddle it: the
    // nodes of one tenant share its counter.
    ingest_gpt_4o(&server, &root, tmp.path(), "t1", "acme/cn");
    ingest_gpt_4o(&server, &root, tmp.path(), "t2", "acme/us");
    // A duplicate takes no place.
    let again = tmp.path().join("t2.jsonl");
    let out = stdout(&server.cli(&root, &["ingest", again.to_str().unwrap()]));
    assert!(out.contains("1 duplicates"), "{out}");
    let placed = placed_entries(&server, &root);
    assert_eq!(placed.len(), 2);
    let place = |e: &Value| e["data"]["rating"]["place"].clone();
    assert_eq!(place(&placed[0])["node"], "acme");
    assert_eq!(exact("before", &place(&placed[0])["before"]), amount("0"));
    assert_eq!(
        exact("before", &place(&placed[1])["before"]),
        amount("1000000")
    );
    assert_eq!(
        exact("amount", &placed[0]["data"]["rating"]["amount"]),
        amount("4.00")
    );
    // 500,000 at 0.000002, 500,000 at 0.000001, and the output: 3.50.
    assert_eq!(
        exact("amount", &placed[1]["data"]["rating"]["amount"]),
        amount("3.50")
    );
    // The month is Shanghai's.
    let period = place(&placed[0])["period"].as_str().unwrap().to_string();
    assert!(period.ends_with("T16:00:00Z"), "{period}");

    // After a restart the counter goes on from the projection.
    server.stop();
    let server = Server::start(&data);
    ingest_gpt_4o(&server, &root, tmp.path(), "t3", "acme/cn");
    let placed = placed_entries(&server, &root);
    assert_eq!(
        exact("before", &place(&placed[2])["before"]),
        amount("2000000")
    );
    assert_eq!(
        exact("amount", &placed[2]["data"]["rating"]["amount"]),
        amount("3.00")
    );

    // Concurrent gateway calls of one tenant take disjoint places, in log order.
    let key = cli_json(
        &server,
        &root,
        &[
            "keys",
            "create",
            "--account",
            "acme/cn",
            "--scopes",
            "gateway",
        ],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let answers = race(&server, &key, 20);
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let placed = loop {
        let p = placed_entries(&server, &root);
        if p.len() == 23 || Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(placed.len(), 23);
    let mut next = amount("0");
    for e in &placed {
        let p = place(e);
        assert_eq!(exact("before", &p["before"]), next, "{e}");
        next = next.checked_add(exact("units", &p["units"])).unwrap();
    }

    // A correction that takes the tiers away cannot keep the entries' places: the
    // re-rating leaves them and says so, and the ledger still verifies.
    let books = cli_json(&server, &root, &["prices", "list"]);
    let from = books["books"][0]["effective_from"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&book, gpt_4o_book("0.000002")).unwrap();
    let corrected = server.cli(
        &root,
        &[
            "prices",
            "import",
            "--format",
            "toml",
            book.to_str().unwrap(),
            "--effective-from",
            &from,
            "--correct",
        ],
    );
    assert!(
        corrected.status.success(),
        "{}",
        String::from_utf8_lossy(&corrected.stderr)
    );
    let r = cli_json(&server, &root, &["prices", "rerate", "--from", &from]);
    assert_eq!(
        (
            r["examined"].as_u64(),
            r["corrected"].as_u64(),
            r["not_rerated"].as_u64()
        ),
        (Some(23), Some(0), Some(23)),
        "{r}"
    );

    server.stop();
    let (code, report) = verify(&data);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("23 placed on their tier counters"),
        "{report}"
    );
}
