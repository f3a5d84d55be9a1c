//! Statements through the CLI and the API: a month in the node's time zone, list
//! lines, the contract and rounding adjustments, a tax the book declares, one
//! subtotal per child, byte-identical reissues, the close, and a late event billed in
//! the next open month.

use crate::common::{Server, bin, json, stdout, verify};
use serde_json::{Value, json};
use std::process::Command;

/// Starts a server that accepts events up to 90 days old (the test bills last month).
fn start(dir: &std::path::Path) -> Server {
    let config = dir.join("ciyuan.toml");
    std::fs::write(&config, "[ingest]\nmax_age_secs = 7776000\n").unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"));
    Server::spawn(cmd)
}

const BOOK: &str = r#"name = "list"
currency = "CNY"
[rounding]
to = 2
mode = "half_up"
[tax]
name = "VAT"
rate_percent = "6"
[[rules]]
model = "qwen-max*"
unit_prices = { "text.input" = "0.0000024", "text.output" = "0.0000096" }
"#;

fn ingest(
    server: &Server,
    key: &str,
    dir: &std::path::Path,
    id: &str,
    subject: &str,
    time: &str,
    (input, output): (u64, u64),
) {
    let ev = json!({"specversion": "1.0", "id": id, "source": "svc://finance-test",
        "type": "llm.usage", "subject": subject, "time": time,
        "data": {"model": "qwen-max", "input_tokens": input, "output_tokens": output}});
    let file = dir.join(format!("{id}.jsonl"));
    std::fs::write(&file, format!("{ev}\n")).unwrap();
    let out = stdout(&server.cli(key, &["ingest", file.to_str().unwrap()]));
    assert_eq!(out.trim(), "1 accepted, 0 duplicates, 0 rejected", "{id}");
}

fn statement(server: &Server, key: &str, path: &str, period: &str) -> (u16, Vec<u8>) {
    server.http(
        "GET",
        &format!("/api/v1/statements/{path}?period={period}"),
        key,
        None,
    )
}

fn amount_of(lines: &Value, key: &str) -> String {
    lines
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == key)
        .map(|l| l["amount"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {key} in {lines}"))
}

#[test]
fn a_month_is_billed_in_the_nodes_zone_closed_once_and_late_usage_lands_in_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    let root = server.bootstrap.clone().unwrap();
    let book = tmp.path().join("list.toml");
    std::fs::write(&book, BOOK).unwrap();
    let out = stdout(&server.cli(
        &root,
        &[
            "prices",
            "import",
            "--format",
            "toml",
            book.to_str().unwrap(),
            "--effective-from",
            "2026-01-01T00:00:00Z",
        ],
    ));
    assert!(out.contains("recorded book list version 1"), "{out}");
    stdout(&server.cli(
        &root,
        &[
            "accounts",
            "create",
            "acme",
            "--time-zone",
            "Asia/Shanghai",
            "--display-name",
            "ACME <Group>",
        ],
    ));
    for p in ["acme/cn", "acme/us"] {
        stdout(&server.cli(&root, &["accounts", "create", p]));
    }
    stdout(&server.cli(
        &root,
        &[
            "contracts",
            "set",
            "acme/us",
            "--book",
            "list",
            "--discount",
            "10",
        ],
    ));
    stdout(&server.cli(
        &root,
        &[
            "accounts",
            "create",
            "globex",
            "--time-zone",
            "America/New_York",
        ],
    ));

    let d = tmp.path();
    // 00:30 on 1 November in Shanghai: November's.
    ingest(
        &server,
        &root,
        d,
        "e1",
        "acme/cn",
        "2026-10-31T16:30:00Z",
        (1_000_000, 100_000),
    );
    // 333,333 input tokens, 10% off: 0.71999928, rounded to 0.72.
    ingest(
        &server,
        &root,
        d,
        "e2",
        "acme/us",
        "2026-11-15T00:00:00Z",
        (333_333, 0),
    );
    // 23:59 on 30 November: 0.0000024, rounded to 0.00.
    ingest(
        &server,
        &root,
        d,
        "e3",
        "acme/cn",
        "2026-11-30T15:59:00Z",
        (1, 0),
    );
    // 00:00 on 1 December in Shanghai: December's.
    ingest(
        &server,
        &root,
        d,
        "e4",
        "acme/cn",
        "2026-11-30T16:00:00Z",
        (1_000_000, 0),
    );
    // 00:30 on 1 November in New York (still daylight time, UTC-4): November's.
    ingest(
        &server,
        &root,
        d,
        "g1",
        "globex",
        "2026-11-01T04:30:00Z",
        (1_000_000, 0),
    );

    let (s, first) = statement(&server, &root, "acme", "2026-11");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&first));
    let (_, again) = statement(&server, &root, "acme", "2026-11");
    assert_eq!(first, again, "the same statement twice is byte-identical");
    let st = json(&first);
    assert_eq!(st["from"], "2026-10-31T16:00:00Z");
    assert_eq!(st["to"], "2026-11-30T16:00:00Z");
    assert_eq!(st["time_zone"], "Asia/Shanghai");
    assert_eq!(st["display_name"], "ACME <Group>");
    let lines = st["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2, "{st}");
    assert_eq!(amount_of(&st["lines"], "text.input"), "3.2000016");
    assert_eq!(lines[0]["quantity"], "1333334");
    assert_eq!(amount_of(&st["lines"], "text.output"), "0.96");
    assert_eq!(amount_of(&st["adjustments"], "contract"), "-0.07999992");
    assert_eq!(amount_of(&st["adjustments"], "rounding"), "-0.00000168");
    let total = &st["totals"][0];
    assert_eq!(
        (
            total["currency"].as_str(),
            total["subtotal"].as_str(),
            total["tax"].as_str(),
            total["total"].as_str()
        ),
        (Some("CNY"), Some("4.08"), Some("0.24"), Some("4.32")),
        "{st}"
    );
    assert_eq!(st["taxes"][0]["name"], "VAT");
    let children: Vec<(String, String)> = st["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["account"].as_str().unwrap().to_string(),
                c["totals"][0]["subtotal"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        children,
        vec![
            ("acme/cn".into(), "3.36".into()),
            ("acme/us".into(), "0.72".into())
        ]
    );

    // The totals are the ledger's: the usage entries of the month, summed.
    let (_, entries) = server.http(
        "GET",
        "/api/v1/audit/entries?start=0&limit=1000",
        &root,
        None,
    );
    let sum: rust_decimal::Decimal = entries
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(json)
        .filter(|e| e["kind"] == "usage" && e["account"].as_str().unwrap().starts_with("acme"))
        .filter(|e| {
            let ts = e["ts"].as_str().unwrap();
            ("2026-10-31T16:00:00Z"..="2026-11-30T15:59:59Z").contains(&ts)
        })
        .map(|e| {
            e["data"]["rating"]["amount"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    assert_eq!(sum.normalize().to_string(), "4.08");

    // New York's November starts at 04:00 UTC and ends at 05:00 UTC (standard time).
    let (_, g) = statement(&server, &root, "globex", "2026-11");
    let g = json(&g);
    assert_eq!(
        (g["from"].as_str(), g["to"].as_str()),
        (Some("2026-11-01T04:00:00Z"), Some("2026-12-01T05:00:00Z"))
    );
    assert_eq!(g["totals"][0]["subtotal"], "2.4");

    // CSV and printable HTML (Chinese), from the same statement; names are escaped.
    let (s, csv) = server.http(
        "GET",
        "/api/v1/statements/acme?period=2026-11&format=csv",
        &root,
        None,
    );
    assert_eq!(s, 200);
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.starts_with("section,"), "{csv}");
    assert!(csv.contains("4.32"), "{csv}");
    let (s, html) = server.http(
        "GET",
        "/api/v1/statements/acme?period=2026-11&format=html&lang=zh-CN",
        &root,
        None,
    );
    assert_eq!(s, 200);
    let html = String::from_utf8(html).unwrap();
    assert!(
        html.contains("ACME &lt;Group&gt;") && !html.contains("<Group>"),
        "{html}"
    );
    assert!(html.contains("lang=\"zh-CN\""), "{html}");
    let (s, _) = server.http(
        "GET",
        "/api/v1/statements/acme?period=2026-11&format=html&lang=fr",
        &root,
        None,
    );
    assert_eq!(s, 400);

    // The usage export bills the same, line by line.
    let file = tmp.path().join("usage.csv");
    let out = server.cli(
        &root,
        &[
            "export",
            "usage",
            "--account",
            "acme",
            "--period",
            "2026-11",
            "-o",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(&file).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let billed = header.iter().position(|c| *c == "billed_cost").unwrap();
    let sum: rust_decimal::Decimal = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(billed)
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    assert_eq!(sum.normalize().to_string(), "4.08", "{csv}");
    // FOCUS: the same total, and the Foundation's validator accepts the file.
    let focus = tmp.path().join("focus.csv");
    let out = server.cli(
        &root,
        &[
            "export",
            "focus",
            "--account",
            "acme",
            "--period",
            "2026-11",
            "-o",
            focus.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&focus).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    for col in [
        "BilledCost",
        "ChargePeriodStart",
        "ServiceCategory",
        "SkuId",
        "ConsumedQuantity",
        "ListUnitPrice",
    ] {
        assert!(header.contains(&col), "{col} in {header:?}");
    }
    let billed = header.iter().position(|c| *c == "BilledCost").unwrap();
    let sum: rust_decimal::Decimal = text
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(billed)
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    assert_eq!(sum.normalize().to_string(), "4.08", "{text}");
    assert!(text.contains("AI and Machine Learning") && text.contains("Generative AI"));
    if std::env::var("CIYUAN_SKIP_FOCUS_VALIDATOR").as_deref() != Ok("1") {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/focus_validate.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(&focus);
        if std::env::var_os("CARGO_TARGET_DIR").is_none() {
            cmd.env(
                "CARGO_TARGET_DIR",
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
            );
        }
        let v = cmd.output().unwrap();
        assert!(
            v.status.success(),
            "the FOCUS validator refused the export (CIYUAN_SKIP_FOCUS_VALIDATOR=1 skips it knowingly):\n{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // The ERP journal: one balanced voucher per node; U8's layout in GBK.
    let journal = tmp.path().join("journal.csv");
    let out = server.cli(
        &root,
        &[
            "export",
            "journal",
            "--account",
            "acme",
            "--period",
            "2026-11",
            "-o",
            journal.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&journal).unwrap();
    assert!(
        bytes.starts_with(b"\xEF\xBB\xBF"),
        "UTF-8 with a byte-order mark"
    );
    let text = String::from_utf8(bytes[3..].to_vec()).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let col = |n: &str| {
        header
            .iter()
            .position(|c| *c == n)
            .unwrap_or_else(|| panic!("{n} in {header:?}"))
    };
    let (debit, credit) = (col("debit"), col("credit"));
    let total = |i: usize| -> rust_decimal::Decimal {
        text.lines()
            .skip(1)
            .filter_map(|l| l.split(',').nth(i))
            .filter(|v| !v.is_empty())
            .map(|v| v.parse::<rust_decimal::Decimal>().unwrap())
            .sum()
    };
    assert_eq!(total(debit), total(credit), "{text}");
    assert_eq!(total(debit).normalize().to_string(), "4.08", "{text}");
    let u8 = server.cli(
        &root,
        &[
            "export",
            "journal",
            "--account",
            "acme",
            "--period",
            "2026-11",
            "--profile",
            "u8",
            "--encoding",
            "gbk",
        ],
    );
    assert!(
        u8.status.success(),
        "{}",
        String::from_utf8_lossy(&u8.stderr)
    );
    assert!(
        String::from_utf8(u8.stdout.clone()).is_err(),
        "GBK, not UTF-8"
    );
    let kingdee = server.cli(
        &root,
        &[
            "export",
            "journal",
            "--account",
            "acme",
            "--period",
            "2026-11",
            "--profile",
            "kingdee",
        ],
    );
    assert!(String::from_utf8_lossy(&kingdee.stderr).contains("book, org"));

    // The HR report: per node and Shanghai day; e1 is 1 November's.
    let hr = server.cli(
        &root,
        &["export", "hr", "--account", "acme", "--period", "2026-11"],
    );
    assert!(
        hr.status.success(),
        "{}",
        String::from_utf8_lossy(&hr.stderr)
    );
    let hr = String::from_utf8(hr.stdout).unwrap();
    assert!(
        hr.starts_with("date,account,display_name,employee_id,tokens,currency,cost"),
        "{hr}"
    );
    assert!(hr.contains("2026-11-01,acme/cn,,,1100000,CNY,3.36"), "{hr}");
    assert!(hr.contains("2026-11-30,acme/cn,,,1,CNY,0"), "{hr}");

    // A key below reads its own subtree's export, never its parent's or a sibling's.
    let cn_reader = server.new_key(&root, "acme/cn", "read");
    for (account, want) in [("acme", 403), ("acme/us", 403), ("acme/cn", 200)] {
        let (s, _) = server.http(
            "GET",
            &format!("/api/v1/exports/usage?account={account}&period=2026-11"),
            &cn_reader,
            None,
        );
        assert_eq!(s, want, "{account}");
    }
    let (s, _) = server.http(
        "GET",
        "/api/v1/statements/acme?period=2026-11",
        &cn_reader,
        None,
    );
    assert_eq!(s, 403);
    let (s, _) = server.http(
        "GET",
        "/api/v1/exports/nope?account=acme&period=2026-11",
        &root,
        None,
    );
    assert_eq!(s, 404);

    // The human form, and a tenant below cannot close its parent's month.
    let human = stdout(&server.cli(&root, &["statement", "acme", "--period", "2026-11"]));
    assert!(
        human.contains("total CNY: subtotal 4.08, tax 0.24, total 4.32"),
        "{human}"
    );
    assert!(
        human.contains("acme/us") && human.contains("0.72 CNY"),
        "{human}"
    );
    let cn_admin = server.new_key(&root, "acme/cn", "admin");
    let denied = server.cli(
        &cn_admin,
        &["statement", "acme", "--period", "2026-11", "--close"],
    );
    assert!(!denied.status.success());

    // Issue it: the answer is the statement as it was, and so is every read after.
    let issued = server.cli(
        &root,
        &[
            "statement",
            "acme",
            "--period",
            "2026-11",
            "--close",
            "--format",
            "json",
        ],
    );
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    assert_eq!(
        issued.stdout.strip_suffix(b"\n").unwrap_or(&issued.stdout),
        &first[..]
    );
    let twice = server.cli(
        &root,
        &["statement", "acme", "--period", "2026-11", "--close"],
    );
    assert!(!twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stderr).contains("was closed by entry"));
    let dec_not_over = server.cli(
        &root,
        &["statement", "acme", "--period", "2026-12", "--close"],
    );
    assert!(String::from_utf8_lossy(&dec_not_over.stderr).contains("is not over"));

    // A late November event: November stays as issued; December bills it.
    ingest(
        &server,
        &root,
        d,
        "late",
        "acme/cn",
        "2026-11-20T00:00:00Z",
        (1_000_000, 0),
    );
    let (_, nov) = statement(&server, &root, "acme", "2026-11");
    assert_eq!(nov, first, "a closed month is answered as issued");
    let (_, dec) = statement(&server, &root, "acme", "2026-12");
    let dec = json(&dec);
    assert_eq!(
        amount_of(&dec["adjustments"], "late:2026-11"),
        "2.4",
        "{dec}"
    );
    assert_eq!(
        dec["totals"][0]["subtotal"], "4.8",
        "e4 (2.40) and the late 2.40: {dec}"
    );

    server.stop();
    let (code, report) = verify(&tmp.path().join("data"));
    assert_eq!(code, 0, "{report}");
}

#[test]
fn a_nodes_own_cost_is_allocated_to_its_children_to_the_cent() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    let root = server.bootstrap.clone().unwrap();
    let book = tmp.path().join("list.toml");
    std::fs::write(&book, BOOK).unwrap();
    let out = server.cli(
        &root,
        &[
            "prices",
            "import",
            "--format",
            "toml",
            book.to_str().unwrap(),
            "--effective-from",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert!(out.status.success());
    // A rule that does not parse is refused with its name.
    let bad = server.cli(
        &root,
        &[
            "accounts",
            "create",
            "grp",
            "--meta",
            "allocation=shares:a=50,b=40",
        ],
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("sum to 90, not 100"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    stdout(&server.cli(
        &root,
        &["accounts", "create", "grp", "--meta", "allocation=cost"],
    ));
    for p in ["grp/a", "grp/b", "grp/c"] {
        stdout(&server.cli(&root, &["accounts", "create", p]));
    }
    let d = tmp.path();
    // The platform's own 1.00, and its children's 2.40 and 4.80 (grp/c used nothing).
    ingest(
        &server,
        &root,
        d,
        "own",
        "grp",
        "2026-11-02T00:00:00Z",
        (416_667, 0),
    );
    ingest(
        &server,
        &root,
        d,
        "a",
        "grp/a",
        "2026-11-03T00:00:00Z",
        (1_000_000, 0),
    );
    ingest(
        &server,
        &root,
        d,
        "b",
        "grp/b",
        "2026-11-04T00:00:00Z",
        (2_000_000, 0),
    );
    let (s, body) = statement(&server, &root, "grp", "2026-11");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let st = json(&body);
    let a = &st["allocations"][0];
    assert_eq!(
        (
            a["currency"].as_str(),
            a["shared"].as_str(),
            a["rule"].as_str()
        ),
        (Some("CNY"), Some("1"), Some("cost")),
        "{st}"
    );
    let parts: Vec<(String, String)> = a["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["account"].as_str().unwrap().to_string(),
                p["amount"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // 1/3 and 2/3 of a yuan: 0.33 and 0.67 (the last cent to the larger remainder).
    assert_eq!(
        parts,
        vec![
            ("grp/a".into(), "0.33".into()),
            ("grp/b".into(), "0.67".into()),
            ("grp/c".into(), "0".into())
        ]
    );
    assert_eq!(a["unallocated"], "0");

    // A minimum commitment of 10 CNY a month on grp's own contract tops it up.
    let contract = tmp.path().join("contract.json");
    std::fs::write(
        &contract,
        r#"{"book": "list", "minimum_commitment": {"amount": "10", "period": "month"}}"#,
    )
    .unwrap();
    let set = server.cli(
        &root,
        &[
            "contracts",
            "set",
            "grp",
            "--file",
            contract.to_str().unwrap(),
        ],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let (_, body) = statement(&server, &root, "grp", "2026-11");
    let st = json(&body);
    assert_eq!(
        amount_of(&st["adjustments"], "commitment"),
        "1.8",
        "8.20 billed: {st}"
    );
    assert_eq!(st["totals"][0]["subtotal"], "10", "{st}");
    // Its children's statements are not topped up: the commitment is grp's.
    let (_, body) = statement(&server, &root, "grp/a", "2026-11");
    assert!(!String::from_utf8_lossy(&body).contains("commitment"));
}

#[test]
fn a_provider_export_is_reconciled_with_the_gateways_records() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    let root = server.bootstrap.clone().unwrap();
    stdout(&server.cli(&root, &["accounts", "create", "acme/gw"]));
    let key = server.new_key(&root, "acme/gw", "gateway");
    for text in [
        "What is a token?",
        "And a ledger?",
        "Count these words, please.",
    ] {
        let (s, b) = server.http(
            "POST",
            "/v1/chat/completions",
            &key,
            Some(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})),
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    // What the gateway recorded for the built-in simulated upstream, from the ledger.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (input, output) = loop {
        let (_, entries) = server.http(
            "GET",
            "/api/v1/audit/entries?start=0&limit=1000",
            &root,
            None,
        );
        let usage: Vec<Value> = entries
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .map(json)
            .filter(|e| e["kind"] == "usage")
            .collect();
        if usage.len() == 3 || std::time::Instant::now() > deadline {
            let sum = |k: &str| {
                usage
                    .iter()
                    .map(|e| e["data"]["tokens"][k].as_i64().unwrap_or(0))
                    .sum::<i64>()
            };
            break (
                sum("text.input"),
                sum("text.output") + sum("text.reasoning"),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(input > 0 && output > 0);
    let today = ciyuan_core::jiff::Timestamp::now()
        .to_zoned(ciyuan_core::jiff::tz::TimeZone::UTC)
        .date();
    let export = |out: i64| {
        let f = tmp.path().join(format!("export-{out}.csv"));
        std::fs::write(
            &f,
            format!("day,model,input_tokens,output_tokens\n{today},gpt-4o,{input},{out}\n"),
        )
        .unwrap();
        f
    };
    let clean = export(output);
    let ok = server.cli(
        &root,
        &[
            "reconcile",
            clean.to_str().unwrap(),
            "--format",
            "csv",
            "--upstream",
            "sim",
        ],
    );
    assert!(
        ok.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains(": 0 beyond tolerance"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    // The provider bills 50 more output tokens than were recorded: found, named,
    // recorded in the ledger with the file's hash, and raised as an incident.
    let off = export(output + 50);
    let found = server.cli(
        &root,
        &[
            "reconcile",
            off.to_str().unwrap(),
            "--format",
            "csv",
            "--upstream",
            "sim",
        ],
    );
    assert_eq!(found.status.code(), Some(1));
    let text = String::from_utf8_lossy(&found.stdout).into_owned();
    assert!(
        text.contains("1 beyond tolerance") && text.contains("gpt-4o text.output"),
        "{text}"
    );
    let (_, entries) = server.http(
        "GET",
        "/api/v1/audit/entries?start=0&limit=1000",
        &root,
        None,
    );
    let log: Vec<Value> = entries
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(json)
        .collect();
    assert_eq!(
        log.iter().filter(|e| e["kind"] == "reconciliation").count(),
        2
    );
    assert!(
        log.iter()
            .any(|e| e["kind"] == "incident" && e["data"]["kind"] == "reconciliation.difference")
    );
    // A tenant's admin key cannot reconcile a provider's export, which covers everyone.
    let tenant = server.new_key(&root, "acme", "admin");
    let denied = server.cli(
        &tenant,
        &[
            "reconcile",
            clean.to_str().unwrap(),
            "--format",
            "csv",
            "--upstream",
            "sim",
        ],
    );
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("root admin"));
    // Bad input is named.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(
        &bad,
        "day,model,input_tokens,output_tokens\n2026-13-01,gpt-4o,1,1\n",
    )
    .unwrap();
    let refused = server.cli(
        &root,
        &[
            "reconcile",
            bad.to_str().unwrap(),
            "--format",
            "csv",
            "--upstream",
            "sim",
        ],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("row"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    server.stop();
}

#[test]
fn service_levels_are_declared_in_contracts_and_quality_is_reported_per_upstream_and_model() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    let root = server.bootstrap.clone().unwrap();
    let book = tmp.path().join("book.toml");
    std::fs::write(
        &book,
        BOOK.replace("qwen-max*", "gpt-4o*")
            .replace("0.0000024", "0.0025"),
    )
    .unwrap();
    stdout(&server.cli(
        &root,
        &[
            "prices",
            "import",
            "--format",
            "toml",
            book.to_str().unwrap(),
        ],
    ));
    stdout(&server.cli(&root, &["accounts", "create", "acme/gw"]));
    let contract = tmp.path().join("contract.json");
    std::fs::write(
        &contract,
        json!({"book": "list", "service_levels": [{
        "name": "sim-gpt", "upstream": "sim", "model": "gpt-4o*",
        "objectives": [
            {"metric": "availability", "target": "99.9",
             "credits": [{"worse_than": "99.9", "percent": "10"}]},
            {"metric": "count_accuracy", "target": "99"}
        ]}]})
        .to_string(),
    )
    .unwrap();
    stdout(&server.cli(
        &root,
        &[
            "contracts",
            "set",
            "acme/gw",
            "--file",
            contract.to_str().unwrap(),
        ],
    ));
    let shown = stdout(&server.cli(&root, &["contracts", "show", "acme/gw", "--json"]));
    assert!(shown.contains("sim-gpt"), "{shown}");
    let key = server.new_key(&root, "acme/gw", "gateway,read");
    for text in ["What is a service level?", "And a credit?"] {
        let (s, b) = server.http(
            "POST",
            "/v1/chat/completions",
            &key,
            Some(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})),
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    // This hour's quality, as CSV and as the terminal table; the tenant's own key.
    let now = ciyuan_core::jiff::Timestamp::now().as_second();
    let hour = |s: i64| ciyuan_core::jiff::Timestamp::from_second(s - s.rem_euclid(3600)).unwrap();
    let (from, to) = (hour(now).to_string(), hour(now + 3600).to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let csv = loop {
        let csv = stdout(&server.cli(
            &key,
            &["quality", "--from", &from, "--to", &to, "--format", "csv"],
        ));
        if csv.contains("sim,gpt-4o,2,") || std::time::Instant::now() > deadline {
            break csv;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(csv.starts_with("upstream,model,requests,"), "{csv}");
    assert!(csv.contains("sim,gpt-4o,2,0,0,0,0,"), "{csv}");
    let table = stdout(&server.cli(&key, &["quality", "--from", &from, "--to", &to]));
    assert!(table.contains("sim") && table.contains("gpt-4o"), "{table}");
    let html = stdout(&server.cli(
        &root,
        &[
            "quality",
            "--account",
            "acme",
            "--from",
            &from,
            "--to",
            &to,
            "--format",
            "html",
        ],
    ));
    assert!(
        html.contains("<table>") && html.contains("gpt-4o"),
        "{html}"
    );
    // This month is not over: nothing to evaluate yet, and nothing was.
    let month = ciyuan_core::jiff::Timestamp::now()
        .to_zoned(ciyuan_core::jiff::tz::TimeZone::UTC)
        .strftime("%Y-%m")
        .to_string();
    let early = server.cli(
        &root,
        &["service-levels", "evaluate", "acme/gw", "--period", &month],
    );
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("is not over"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    let list = stdout(&server.cli(&root, &["service-levels", "list", "acme"]));
    assert!(list.contains("no service level evaluated"), "{list}");
    // A level that promises nothing is refused with the field's name.
    std::fs::write(
        &contract,
        json!({"book": "list", "service_levels": [{"name": "x", "upstream": "sim", "objectives": []}]})
            .to_string(),
    )
    .unwrap();
    let bad = server.cli(
        &root,
        &[
            "contracts",
            "set",
            "acme/gw",
            "--file",
            contract.to_str().unwrap(),
        ],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("service_levels[0].objectives"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    server.stop();
    let (code, out) = verify(&tmp.path().join("data"));
    assert_eq!(code, 0, "{out}");
}
