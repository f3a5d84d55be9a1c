//! The delivery log on disk: its format, a torn tail, rotation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::time::Duration;

use ciyuan_notify::{DeliveryState, Limits, Notifier};
use common::{Receiver, Reply, event, fast_policy};

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn log_is_json_lines_with_the_documented_fields() {
    let rx = Receiver::start(vec![Reply::Status(503)]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deliveries.jsonl");
    let n = Notifier::start(vec![rx.target("ops", &[])], path.clone(), fast_policy())
        .await
        .unwrap();
    n.notify(event("evt-log", "budget.threshold")).unwrap();
    assert!(n.drain(Duration::from_secs(10)).await);

    let log = lines(&path);
    assert_eq!(log.len(), 3, "{log:?}");
    for l in &log {
        assert_eq!(l["event"], "evt-log");
        assert_eq!(l["target"], "ops");
        assert!(
            l["ts"]
                .as_str()
                .unwrap()
                .parse::<ciyuan_notify::jiff::Timestamp>()
                .is_ok()
        );
        assert!(!l.to_string().contains(common::SECRET));
        assert!(!l.to_string().contains("/hook"));
    }
    // queued: carries the whole event, so it can be replayed from the log alone.
    assert_eq!(log[0]["state"], "queued");
    assert_eq!(log[0]["attempt"], 0);
    assert_eq!(log[0]["type"], "budget.threshold");
    assert!(log[0]["created"].is_string());
    assert_eq!(log[0]["data"]["threshold"], 0.8);
    // failed: status and when the next attempt is due.
    assert_eq!(log[1]["state"], "failed");
    assert_eq!(log[1]["attempt"], 1);
    assert_eq!(log[1]["status"], 503);
    assert!(log[1]["next_retry"].is_string());
    assert!(log[1].get("data").is_none());
    // delivered.
    assert_eq!(log[2]["state"], "delivered");
    assert_eq!(log[2]["attempt"], 2);
    assert_eq!(log[2]["status"], 200);
    assert!(log[2].get("next_retry").is_none());
}

#[tokio::test]
async fn torn_last_line_is_cut_and_the_rest_replayed() {
    let rx = Receiver::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deliveries.jsonl");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, r#"{{"ts":"2025-01-01T00:00:00Z","event":"a","target":"ops","state":"queued","attempt":0,"type":"budget.threshold","created":"2025-01-01T00:00:00Z","data":{{"n":1}}}}"#).unwrap();
        writeln!(f, r#"{{"ts":"2025-01-01T00:00:00Z","event":"b","target":"ops","state":"queued","attempt":0,"type":"budget.threshold","created":"2025-01-01T00:00:00Z","data":{{"n":2}}}}"#).unwrap();
        writeln!(f, r#"{{"ts":"2025-01-01T00:00:01Z","event":"a","target":"ops","state":"delivered","attempt":1,"status":200}}"#).unwrap();
        writeln!(f, "not json at all").unwrap();
        write!(
            f,
            r#"{{"ts":"2025-01-01T00:00:02Z","event":"c","target":"ops","state":"que"#
        )
        .unwrap();
    }
    let n = Notifier::start(vec![rx.target("ops", &[])], path.clone(), fast_policy())
        .await
        .unwrap();
    assert!(n.drain(Duration::from_secs(10)).await);
    // Only b was unfinished; c's record was torn (never acknowledged).
    assert_eq!(rx.ids(), ["b"]);
    assert_eq!(rx.received()[0].body["data"]["n"], 2);
    assert_eq!(rx.received()[0].body["created"], "2025-01-01T00:00:00Z");
    drop(n);
    // The torn bytes are gone; the garbage middle line stays (append-only) but
    // everything after it is a well-formed record.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("\"que\n") && !text.contains("\"event\":\"c\""));
    let tail: Vec<serde_json::Value> = text
        .lines()
        .skip(4)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tail.last().unwrap()["state"], "delivered");
    assert_eq!(tail.last().unwrap()["event"], "b");
}

#[tokio::test]
async fn log_rotates_keeping_unfinished_deliveries() {
    let ok = Receiver::start(vec![]).await;
    let down = common::free_addr();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deliveries.jsonl");
    let stuck = ciyuan_notify::Target {
        name: "stuck".into(),
        url: format!("http://{down}/hook"),
        secret: "s".into(),
        events: vec!["stuck.*".into()],
    };
    let limits = Limits {
        max_log_bytes: 8 * 1024,
        ..Limits::default()
    };
    let policy = ciyuan_notify::RetryPolicy {
        initial_backoff: Duration::from_secs(60),
        ..fast_policy()
    };
    let targets = vec![ok.target("ok", &["budget.*"]), stuck];
    let n = Notifier::start_with_limits(
        targets.clone(),
        path.clone(),
        policy.clone(),
        limits.clone(),
    )
    .await
    .unwrap();

    // One delivery that stays unfinished through every rotation.
    n.notify(event("pinned", "stuck.event")).unwrap();
    // A burst: many deliveries are unfinished at some rotations, which carry them over.
    for i in 0..60 {
        n.notify(event(&format!("e{i}"), "budget.threshold"))
            .unwrap();
    }
    assert_eq!(ok.wait_for(60, Duration::from_secs(10)).await.len(), 60);
    // Then paced.
    for i in 60..80 {
        n.notify(event(&format!("e{i}"), "budget.threshold"))
            .unwrap();
        assert_eq!(
            ok.wait_for(i + 1, Duration::from_secs(5)).await.len(),
            i + 1
        );
    }
    // Let the last outcomes land in the log.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let size = std::fs::metadata(&path).unwrap().len();
    let old = dir.path().join("deliveries.jsonl.1");
    assert!(old.exists(), "rotated generation kept");
    assert!(size <= 8 * 1024 + 1024, "log bounded: {size}");
    assert!(std::fs::metadata(&old).unwrap().len() > 8 * 1024);
    // Every rotation carried the unfinished delivery forward, first.
    let current = lines(&path);
    assert_eq!(current[0]["event"], "pinned");
    assert_eq!(current[0]["state"], "queued");
    assert_eq!(current[0]["type"], "stuck.event");
    assert!(
        current
            .iter()
            .all(|l| l["ts"].is_string() && l["state"].is_string())
    );
    assert!(n.deliveries(1000).len() <= limits.recent_records);
    drop(n);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // After a restart the pinned delivery is still unfinished, the others are not.
    let n = Notifier::start_with_limits(targets, path.clone(), policy, limits)
        .await
        .unwrap();
    assert!(!n.drain(Duration::from_millis(200)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ok.received().len(), 80, "delivered events are not replayed");
    let pinned: Vec<_> = n
        .deliveries(1000)
        .into_iter()
        .filter(|r| r.event_id == "pinned")
        .collect();
    // Its records survived the rotations; its retry is still scheduled a minute out.
    let states: Vec<_> = pinned.iter().map(|r| (r.state, r.attempt)).collect();
    assert_eq!(
        states,
        [(DeliveryState::Failed, 1), (DeliveryState::Queued, 0)]
    );
}
