//! Scheduled reports with the real binary: an hourly CSV report into a directory and a
//! daily JSON report POSTed to a signed webhook (a local receiver checking the
//! signature), usage ingested for past hours and days before the reports existed, the
//! missed periods delivered once each and in order after a start, a failing receiver
//! raising one incident and retried, nothing delivered twice after another restart,
//! one `report.delivered` entry per period, a period delivered by hand, a bad field
//! refused by name, and `ciyuan audit verify` passing after it all.

use crate::common::{Server, bin, json, stdout, verify, wait_for};
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::jiff::{Timestamp, ToSpan};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "report-secret-0123456789";

const BOOK: &str = r#"name = "list"
currency = "CNY"
[rounding]
to = 6
mode = "half_up"
[[rules]]
model = "qwen-max*"
unit_prices = { "text.input" = "0.000002", "text.output" = "0.00001" }
"#;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    signed: bool,
}

/// A webhook receiver on a local port: records every POST, checks its signature,
/// answers 500 to the first `fail_first` requests and 200 after.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/hooks/finance?token=do-not-record",
            listener.local_addr().unwrap()
        );
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = got.clone();
        std::thread::spawn(move || {
            let mut n = 0usize;
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let Some((headers, body)) = read_request(&mut s) else {
                    continue;
                };
                let signed = headers.get("x-ciyuan-signature").is_some_and(|h| {
                    ciyuan_notify::verify(
                        SECRET,
                        h,
                        &body,
                        Timestamp::now(),
                        Duration::from_secs(300),
                    )
                });
                n += 1;
                let status = if n <= fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                if n > fail_first {
                    seen.lock().unwrap().push(Received {
                        headers,
                        body,
                        signed,
                    });
                }
                let _ = s.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Receiver { url, got }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn read_request(s: &mut std::net::TcpStream) -> Option<(BTreeMap<String, String>, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = raw[split + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some((headers, body))
}

fn serve(dir: &Path, config: &str) -> Server {
    let path = dir.join("ciyuan.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"))
        .env("CIYUAN_TEST_REPORT_SECRET", SECRET);
    Server::spawn(cmd)
}

/// Every `report.delivered` entry of the ledger, in order.
fn deliveries(server: &Server, key: &str) -> Vec<Value> {
    let (status, body) = server.http("GET", "/api/v1/audit/entries", key, None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(json)
        .filter(|e| e["kind"] == "report.delivered")
        .collect()
}

fn hour_label(t: Timestamp) -> String {
    let z = t.to_zoned(TimeZone::UTC);
    format!("{}T{:02}", z.date(), z.hour())
}

#[test]
fn missed_periods_are_delivered_once_each_in_order_to_a_directory_and_a_signed_webhook() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("reports-out");
    let now = Timestamp::now();
    let this_hour = Timestamp::from_second(now.as_second().div_euclid(3600) * 3600).unwrap();
    let first_hour = this_hour.checked_sub(5.hours()).unwrap();
    let shanghai = TimeZone::get("Asia/Shanghai").unwrap();
    let today = now.to_zoned(shanghai.clone()).date();
    let first_day = today.checked_sub(2.days()).unwrap();

    // 1. Usage for past hours and days, before any report is configured.
    let base = "[ingest]\nmax_age_secs = 7776000\n";
    let server = serve(dir, base);
    let root = server.bootstrap.clone().unwrap();
    let book = dir.join("list.toml");
    std::fs::write(&book, BOOK).unwrap();
    stdout(&server.cli(
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
    stdout(&server.cli(
        &root,
        &["accounts", "create", "acme", "--time-zone", "Asia/Shanghai"],
    ));
    for p in ["acme/cn", "acme/us"] {
        stdout(&server.cli(&root, &["accounts", "create", p]));
    }
    let usage_hour = first_hour.checked_add(1.hour()).unwrap();
    let events = [
        (
            "e1",
            "acme/cn",
            usage_hour.checked_add(10.minutes()).unwrap(),
            1000,
            100,
        ),
        (
            "e2",
            "acme/us",
            usage_hour.checked_add(20.minutes()).unwrap(),
            500,
            0,
        ),
        (
            "e3",
            "acme/cn",
            first_hour.checked_add(3.hours()).unwrap(),
            7,
            3,
        ),
    ];
    let mut batch = String::new();
    for (id, subject, time, input, output) in events {
        let ev = json!({"specversion": "1.0", "id": id, "source": "svc://reports-test",
            "type": "llm.usage", "subject": subject, "time": time.to_string(),
            "data": {"model": "qwen-max", "input_tokens": input, "output_tokens": output}});
        batch.push_str(&format!("{ev}\n"));
    }
    let file = dir.join("events.jsonl");
    std::fs::write(&file, batch).unwrap();
    let o = stdout(&server.cli(&root, &["ingest", file.to_str().unwrap()]));
    assert_eq!(o.trim(), "3 accepted, 0 duplicates, 0 rejected");
    server.stop();

    // 2. A bad field is refused, by name.
    let bad = format!(
        "{base}[[reports]]\nname = \"x\"\naccount = \"acme\"\nevery = \"week\"\nstart = \"2026-11-01\"\ndirectory = \"{}\"\n",
        out.display()
    );
    std::fs::write(dir.join("bad.toml"), bad).unwrap();
    let o = Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.join("bad.toml"))
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("reports[x].every"), "{err}");

    // 3. The reports: their periods since `start` are all over, so all are due.
    let receiver = Receiver::start(WEBHOOK_FAILURES);
    let config = format!(
        "reports_check_secs = 1\n{base}\
         [[reports]]\nname = \"hourly-usage\"\naccount = \"acme\"\nevery = \"hour\"\nformat = \"csv\"\n\
         directory = \"{}\"\nstart = \"{}\"\ndelay_secs = 0\n\
         [[reports]]\nname = \"daily-finance\"\naccount = \"acme\"\nevery = \"day\"\nformat = \"json\"\n\
         webhook = \"{}\"\nsecret_env = \"CIYUAN_TEST_REPORT_SECRET\"\nstart = \"{first_day}\"\ndelay_secs = 0\n",
        out.display(),
        hour_label(first_hour),
        receiver.url,
    );
    let server = serve(dir, &config);
    let hours: Vec<String> = (0..5)
        .map(|i| hour_label(first_hour.checked_add((i as i64).hours()).unwrap()))
        .collect();
    let days = [
        first_day.to_string(),
        first_day.tomorrow().unwrap().to_string(),
    ];
    wait_for("the hourly files", 60, || {
        hours
            .iter()
            .all(|h| out.join(format!("hourly-usage_{h}.csv")).exists())
    });
    wait_for("the daily webhooks", 60, || receiver.received().len() >= 2);

    // The files: one per hour, the usage of its hour, cost from the billing lines.
    let csv = std::fs::read_to_string(out.join(format!("hourly-usage_{}.csv", hours[1]))).unwrap();
    let p = format!(
        "hourly-usage,acme,hour,{},{},{},Asia/Shanghai",
        hours[1],
        usage_hour,
        usage_hour.checked_add(1.hour()).unwrap()
    );
    assert!(csv.contains(&format!("{p},usage,acme/cn,")), "{csv}");
    assert!(csv.contains(",qwen-max,text.input,,1000\r\n"), "{csv}");
    assert!(
        csv.contains(&format!("{p},usage_total,,,,text.input,,1500\r\n")),
        "{csv}"
    );
    assert!(
        csv.contains(&format!("{p},cost_total,,,,,CNY,0.004\r\n")),
        "{csv}"
    );
    assert!(
        csv.lines()
            .last()
            .unwrap()
            .starts_with(&format!("{p},end,,,,,,")),
        "{csv}"
    );
    let empty =
        std::fs::read_to_string(out.join(format!("hourly-usage_{}.csv", hours[0]))).unwrap();
    assert!(empty.ends_with(",end,,,,,,0\r\n"), "{empty}");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The webhooks: signed, in order, keyed by report and period, the JSON whole.
    let got = receiver.received();
    let keys: Vec<&str> = got
        .iter()
        .map(|r| r.headers["idempotency-key"].as_str())
        .collect();
    assert_eq!(
        keys[..2],
        [
            format!("daily-finance/{}", days[0]),
            format!("daily-finance/{}", days[1])
        ]
    );
    assert!(got.iter().all(|r| r.signed), "every delivery is signed");
    assert_eq!(got[0].headers["content-type"], "application/json");
    let total_tokens: i64 = got
        .iter()
        .map(|r| {
            let v = json(&r.body);
            assert_eq!(v["report"], "daily-finance");
            assert_eq!(v["time_zone"], "Asia/Shanghai");
            v["totals"]["tokens"]
                .as_object()
                .unwrap()
                .values()
                .map(|t| t.as_i64().unwrap())
                .sum::<i64>()
        })
        .sum();
    // Every event falls in one of the two days or today (not yet due).
    assert!(total_tokens <= 1610, "{total_tokens}");

    // One incident for the failing receiver, however many attempts failed.
    let (_, body) = server.http("GET", "/api/v1/incidents?account=acme", &root, None);
    let failed: Vec<Value> = json(&body)["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "report.failed")
        .cloned()
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let text = failed[0].to_string();
    assert!(
        !text.contains("do-not-record") && !text.contains(SECRET),
        "{text}"
    );

    // The ledger: one scheduled entry per period, in period order, no secret.
    let entries = deliveries(&server, &root);
    let hourly: Vec<String> = entries
        .iter()
        .filter(|e| e["data"]["name"] == "hourly-usage")
        .map(|e| e["data"]["period"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hourly[..5], hours[..], "{hourly:?}");
    let daily = entries
        .iter()
        .find(|e| e["data"]["name"] == "daily-finance")
        .unwrap();
    assert!(!daily.to_string().contains("do-not-record"), "{daily}");
    assert!(!daily.to_string().contains(SECRET), "{daily}");
    assert_eq!(daily["account"], "acme");
    assert_eq!(daily["data"]["secret_sha256"].as_str().unwrap().len(), 16);
    let sha_of_hour1 = entries
        .iter()
        .find(|e| e["data"]["period"] == hours[1].as_str())
        .map(|e| e["data"]["sha256"].clone())
        .unwrap();
    server.stop();

    // 4. Another restart: nothing delivered twice.
    let before = receiver.received().len();
    let server = serve(dir, &config);
    std::thread::sleep(Duration::from_secs(4));
    let entries = deliveries(&server, &root);
    let mut per_period: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in &entries {
        *per_period
            .entry((
                e["data"]["name"].as_str().unwrap().to_string(),
                e["data"]["period"].as_str().unwrap().to_string(),
            ))
            .or_default() += 1;
    }
    assert!(per_period.values().all(|n| *n == 1), "{per_period:?}");
    let webhook_keys: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    let unique: std::collections::BTreeSet<&String> = webhook_keys.iter().collect();
    assert_eq!(unique.len(), webhook_keys.len(), "{webhook_keys:?}");
    // Only a day that ended meanwhile may have been added.
    assert!(receiver.received().len() <= before + 1);

    // 5. By hand: the same bytes again, recorded as manual; the schedule unmoved.
    let o = stdout(&server.cli(
        &root,
        &["reports", "run", "hourly-usage", "--period", &hours[1]],
    ));
    assert!(
        o.starts_with(&format!("delivered hourly-usage {}", hours[1])),
        "{o}"
    );
    assert!(
        o.contains(sha_of_hour1.as_str().unwrap()),
        "{o} vs {sha_of_hour1}"
    );
    let entries = deliveries(&server, &root);
    let last = entries.last().unwrap();
    assert_eq!(last["data"]["manual"], true);
    assert_eq!(last["data"]["sha256"], sha_of_hour1);
    let (status, body) = server.http(
        "POST",
        "/api/v1/reports/hourly-usage/run?period=2026-11-05",
        &root,
        None,
    );
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("period"));
    let (status, _) = server.http(
        "POST",
        "/api/v1/reports/nope/run?period=2026-11-05",
        &root,
        None,
    );
    assert_eq!(status, 404);
    let list = stdout(&server.cli(&root, &["reports", "list"]));
    assert!(
        list.contains("hourly-usage") && list.contains("daily-finance"),
        "{list}"
    );
    assert!(!list.contains("do-not-record"), "{list}");
    let (_, body) = server.http("GET", "/api/v1/reports", &root, None);
    let v = json(&body);
    let h = v["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "hourly-usage")
        .unwrap();
    assert!(
        h["last_delivered"]["period"].as_str().unwrap() >= hours[4].as_str(),
        "{h}"
    );
    // Tenants below the root neither run a report (its own node's or another's) nor
    // see reports of a tree beside theirs.
    stdout(&server.cli(&root, &["accounts", "create", "beta"]));
    for account in ["acme", "beta"] {
        let key = server.new_key(&root, account, "admin,read");
        let (status, body) = server.http(
            "POST",
            &format!("/api/v1/reports/hourly-usage/run?period={}", hours[1]),
            &key,
            None,
        );
        assert_eq!(status, 403, "{account}: {}", String::from_utf8_lossy(&body));
        if account == "beta" {
            let (_, body) = server.http("GET", "/api/v1/reports", &key, None);
            assert_eq!(
                json(&body)["reports"].as_array().map(Vec::len),
                Some(0),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    server.stop();

    let (code, report) = verify(&dir.join("data"));
    assert_eq!(code, 0, "{report}");
}

/// The receiver fails a whole pass (every attempt), then accepts.
const WEBHOOK_FAILURES: usize = 4;
