//! Delivery against a local receiver: signatures, retries and backoff, permanent
//! failures, filtering, ordering, isolation, bounds, restart replay and the log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use ciyuan_notify::{DeliveryState, Limits, Notifier, NotifyError, RetryPolicy, Target};
use common::{Receiver, Reply, event, fast_policy, free_addr};

const WAIT: Duration = Duration::from_secs(10);

fn gaps(received: &[common::Received]) -> Vec<Duration> {
    received.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test]
async fn retries_500_429_drop_then_delivers_same_id_signed() {
    let rx = Receiver::start(vec![Reply::Status(500), Reply::TooMany(1), Reply::Drop]).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = RetryPolicy {
        initial_backoff: Duration::from_millis(100),
        ..fast_policy()
    };
    let n = Notifier::start(
        vec![rx.target("ops", &[])],
        dir.path().join("deliveries.jsonl"),
        policy,
    )
    .await
    .unwrap();

    n.notify(event("evt-1", "budget.threshold")).unwrap();
    assert!(n.drain(WAIT).await, "not drained: {:?}", n.deliveries(10));

    let got = rx.received();
    assert_eq!(got.len(), 4, "{got:?}");
    for (i, r) in got.iter().enumerate() {
        assert!(
            r.verified,
            "attempt {i} signature did not verify: {}",
            r.signature
        );
        assert_eq!(r.header_id, "evt-1");
        assert_eq!(r.body_id(), "evt-1");
        assert_eq!(r.header_type, "budget.threshold");
        assert_eq!(r.body["type"], "budget.threshold");
        assert_eq!(r.body["data"]["account"], "acme/prod");
        assert!(r.body["created"].is_string());
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.attempt as usize, i + 1);
    }
    // The receiver processed the event on every attempt (it could not tell the first
    // three were not answered as it wished); its de-duplication set caught the repeats.
    assert_eq!(rx.processed(), 1);
    assert_eq!(rx.duplicates(), 3);

    let g = gaps(&got);
    // After the 500: backoff 100 ms jittered into [50, 100].
    assert!(
        g[0] >= Duration::from_millis(50) && g[0] < Duration::from_millis(600),
        "{g:?}"
    );
    // After the 429: Retry-After 1 s beats the 200 ms backoff.
    assert!(g[1] >= Duration::from_secs(1), "{g:?}");
    // After the dropped connection: backoff 400 ms jittered into [200, 400].
    assert!(g[2] >= Duration::from_millis(200) && g[2] > g[0], "{g:?}");

    let records = n.deliveries(10);
    let summary: Vec<_> = records
        .iter()
        .map(|r| (r.state, r.attempt, r.status))
        .collect();
    assert_eq!(
        summary,
        vec![
            (DeliveryState::Delivered, 4, Some(200)),
            (DeliveryState::Failed, 3, None),
            (DeliveryState::Failed, 2, Some(429)),
            (DeliveryState::Failed, 1, Some(500)),
            (DeliveryState::Queued, 0, None),
        ]
    );
    assert!(
        records
            .iter()
            .all(|r| r.event_id == "evt-1" && r.target == "ops")
    );
    assert!(
        records[1].error.is_some(),
        "a dropped connection is described: {:?}",
        records[1]
    );
    assert!(
        records[1..4]
            .iter()
            .all(|r| r.next_retry.is_some_and(|t| t > r.ts))
    );
    assert!(records[0].next_retry.is_none());
    assert_eq!(n.deliveries(2).len(), 2);
}

#[tokio::test]
async fn backoff_grows_between_5xx_attempts() {
    let rx = Receiver::start(vec![
        Reply::Status(500),
        Reply::Status(502),
        Reply::Status(503),
        Reply::Status(504),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let n = Notifier::start(
        vec![rx.target("ops", &[])],
        dir.path().join("log.jsonl"),
        fast_policy(),
    )
    .await
    .unwrap();
    n.notify(event("evt-grow", "budget.threshold")).unwrap();
    assert!(n.drain(WAIT).await);
    let got = rx.received();
    assert_eq!(got.len(), 5);
    let g = gaps(&got);
    // Backoffs 40, 80, 160, 320 ms, each jittered into [b/2, b]: the lower bounds hold
    // and the waits do not shrink (beyond scheduling noise).
    for (i, gap) in g.iter().enumerate() {
        let floor = Duration::from_millis(20 << i);
        assert!(*gap >= floor, "gap {i} = {gap:?} < {floor:?}; {g:?}");
    }
    for w in g.windows(2) {
        assert!(w[1] + Duration::from_millis(25) >= w[0], "{g:?}");
    }
    assert!(g[3] > g[0] * 2, "{g:?}");
}

#[tokio::test]
async fn permanent_400_gives_up_after_one_attempt() {
    let rx = Receiver::start(vec![Reply::Status(400)]).await;
    let dir = tempfile::tempdir().unwrap();
    let n = Notifier::start(
        vec![rx.target("ops", &[])],
        dir.path().join("log.jsonl"),
        fast_policy(),
    )
    .await
    .unwrap();
    n.notify(event("evt-400", "budget.threshold")).unwrap();
    assert!(n.drain(WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1);
    let last = &n.deliveries(1)[0];
    assert_eq!(
        (last.state, last.attempt, last.status),
        (DeliveryState::GaveUp, 1, Some(400))
    );
    assert_eq!(last.next_retry, None);
}

#[tokio::test]
async fn attempts_exhausted_gives_up() {
    let rx = Receiver::start(vec![Reply::Status(503); 10]).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = RetryPolicy {
        max_attempts: 3,
        ..fast_policy()
    };
    let n = Notifier::start(
        vec![rx.target("ops", &[])],
        dir.path().join("log.jsonl"),
        policy,
    )
    .await
    .unwrap();
    n.notify(event("evt-503", "budget.threshold")).unwrap();
    assert!(n.drain(WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 3);
    let states: Vec<_> = n
        .deliveries(10)
        .iter()
        .map(|r| (r.state, r.attempt))
        .collect();
    assert_eq!(
        states,
        vec![
            (DeliveryState::GaveUp, 3),
            (DeliveryState::Failed, 2),
            (DeliveryState::Failed, 1),
            (DeliveryState::Queued, 0)
        ]
    );
}

#[tokio::test]
async fn patterns_filter_per_target() {
    let budget = Receiver::start(vec![]).await;
    let exhausted = Receiver::start(vec![]).await;
    let all = Receiver::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let targets = vec![
        budget.target("budget", &["budget.*"]),
        exhausted.target("exhausted", &["budget.exhausted", "key.*"]),
        all.target("all", &[]),
    ];
    let n = Notifier::start(targets, dir.path().join("log.jsonl"), fast_policy())
        .await
        .unwrap();
    n.notify(event("e1", "budget.threshold")).unwrap();
    n.notify(event("e2", "budget.exhausted")).unwrap();
    n.notify(event("e3", "ledger.sealed")).unwrap();
    n.notify(event("e4", "key.revoked")).unwrap();
    assert!(n.drain(WAIT).await);
    assert_eq!(budget.ids(), ["e1", "e2"]);
    assert_eq!(exhausted.ids(), ["e2", "e4"]);
    assert_eq!(all.ids(), ["e1", "e2", "e3", "e4"]);
    // 2 + 2 + 4 queued and as many delivered.
    let records = n.deliveries(100);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.state == DeliveryState::Queued)
            .count(),
        8
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r.state == DeliveryState::Delivered)
            .count(),
        8
    );
}

#[tokio::test]
async fn order_kept_per_target_across_retries() {
    let rx = Receiver::start(vec![Reply::Status(500), Reply::Status(500)]).await;
    let dir = tempfile::tempdir().unwrap();
    let n = Notifier::start(
        vec![rx.target("ops", &[])],
        dir.path().join("log.jsonl"),
        fast_policy(),
    )
    .await
    .unwrap();
    for id in ["e1", "e2", "e3"] {
        n.notify(event(id, "budget.threshold")).unwrap();
    }
    assert!(n.drain(WAIT).await);
    assert_eq!(rx.ids(), ["e1", "e1", "e1", "e2", "e3"]);
}

#[tokio::test]
async fn slow_target_does_not_hold_back_others() {
    let slow = Receiver::start(vec![Reply::Hang; 3]).await;
    let fast = Receiver::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = RetryPolicy {
        timeout: Duration::from_secs(5),
        ..fast_policy()
    };
    let n = Notifier::start(
        vec![slow.target("slow", &[]), fast.target("fast", &[])],
        dir.path().join("log.jsonl"),
        policy,
    )
    .await
    .unwrap();
    for id in ["e1", "e2", "e3"] {
        n.notify(event(id, "budget.threshold")).unwrap();
    }
    let got = fast.wait_for(3, Duration::from_secs(2)).await;
    assert_eq!(
        got.iter().map(|r| r.header_id.as_str()).collect::<Vec<_>>(),
        ["e1", "e2", "e3"]
    );
    // The slow target is still on its first event, and it is not drained.
    assert_eq!(slow.ids(), ["e1"]);
    assert!(!n.drain(Duration::from_millis(100)).await);
}

#[tokio::test]
async fn attempt_timeout_is_retried() {
    let rx = Receiver::start(vec![Reply::Hang]).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = RetryPolicy {
        timeout: Duration::from_millis(300),
        ..fast_policy()
    };
    let n = Notifier::start(
        vec![rx.target("ops", &[])],
        dir.path().join("log.jsonl"),
        policy,
    )
    .await
    .unwrap();
    n.notify(event("evt-t", "budget.threshold")).unwrap();
    assert!(n.drain(WAIT).await);
    let got = rx.received();
    assert_eq!(got.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(gaps(&got)[0] >= Duration::from_millis(300));
    let failed = n
        .deliveries(10)
        .into_iter()
        .find(|r| r.state == DeliveryState::Failed)
        .unwrap();
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("timeout")),
        "{failed:?}"
    );
    assert!(
        !failed.error.as_deref().unwrap_or("").contains("/hook"),
        "URLs stay out of records: {failed:?}"
    );
}

#[tokio::test]
async fn restart_replays_unfinished_deliveries() {
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("deliveries.jsonl");
    let target = Target {
        name: "ops".into(),
        url: format!("http://{addr}/hook"),
        secret: common::SECRET.into(),
        events: vec![],
    };

    // First run: the receiver is down; the retry is scheduled far away.
    {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
            ..fast_policy()
        };
        let n = Notifier::start(vec![target.clone()], log.clone(), policy)
            .await
            .unwrap();
        n.notify(event("evt-replay", "budget.exhausted")).unwrap();
        n.notify(event("evt-replay-2", "budget.exhausted")).unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !n
            .deliveries(10)
            .iter()
            .any(|r| r.state == DeliveryState::Failed)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no failed attempt recorded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!n.drain(Duration::from_millis(50)).await);
    }
    // Let the first run's tasks see the drop.
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Second run: the receiver is up; both events arrive, in order, with their ids, and
    // the attempt count continues from the log. The scheduled retry (60 s away) is
    // honoured, so shorten it: a fresh policy does not move a logged `next_retry`;
    // rewrite that one field the way an operator could.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut rewritten = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["state"] == "failed" {
            assert_eq!(v["event"], "evt-replay");
            assert!(v["error"].as_str().unwrap().starts_with("connect"), "{v}");
            assert!(v["next_retry"].is_string());
            v["next_retry"] = serde_json::json!(ciyuan_notify::jiff::Timestamp::now().to_string());
        }
        rewritten.push_str(&v.to_string());
        rewritten.push('\n');
    }
    std::fs::write(&log, rewritten).unwrap();

    let rx = Receiver::start_on(addr, vec![]).await;
    let n = Notifier::start(vec![target.clone()], log.clone(), fast_policy())
        .await
        .unwrap();
    // Records from the first run are visible.
    assert!(
        n.deliveries(10)
            .iter()
            .any(|r| r.event_id == "evt-replay" && r.state == DeliveryState::Failed)
    );
    assert!(n.drain(WAIT).await, "{:?}", n.deliveries(10));
    let got = rx.received();
    assert_eq!(
        got.iter()
            .map(|r| (r.header_id.as_str(), r.attempt))
            .collect::<Vec<_>>(),
        [("evt-replay", 2), ("evt-replay-2", 1)]
    );
    assert!(got.iter().all(|r| r.verified));
    assert_eq!(got[0].body["type"], "budget.exhausted");
    drop(n);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Third run: nothing left to replay.
    let n = Notifier::start(vec![target], log.clone(), fast_policy())
        .await
        .unwrap();
    assert!(n.drain(Duration::from_millis(10)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.received().len(), 2);
}

#[tokio::test]
async fn restart_replays_without_touching_the_log() {
    // The plain case: enqueue while the receiver is down, drop, restart, it arrives.
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("deliveries.jsonl");
    let target = Target {
        name: "ops".into(),
        url: format!("http://{addr}/hook"),
        secret: common::SECRET.into(),
        events: vec!["budget.*".into()],
    };
    {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(50),
            ..fast_policy()
        };
        let n = Notifier::start(vec![target.clone()], log.clone(), policy)
            .await
            .unwrap();
        n.notify(event("evt-down", "budget.threshold")).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!n.drain(Duration::from_millis(10)).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rx = Receiver::start_on(addr, vec![]).await;
    let n = Notifier::start(vec![target], log.clone(), fast_policy())
        .await
        .unwrap();
    assert!(n.drain(WAIT).await);
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header_id, "evt-down");
    assert!(
        got[0].attempt >= 2,
        "attempts continue across restarts: {}",
        got[0].attempt
    );
    assert_eq!(n.deliveries(1)[0].state, DeliveryState::Delivered);
}

#[tokio::test]
async fn replay_for_removed_target_is_given_up() {
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let gone = Target {
        name: "gone".into(),
        url: format!("http://{addr}/hook"),
        secret: "s".into(),
        events: vec![],
    };
    {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_secs(60),
            ..fast_policy()
        };
        let n = Notifier::start(vec![gone], log.clone(), policy)
            .await
            .unwrap();
        n.notify(event("evt-orphan", "budget.threshold")).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rx = Receiver::start(vec![]).await;
    let n = Notifier::start(vec![rx.target("ops", &[])], log.clone(), fast_policy())
        .await
        .unwrap();
    assert!(n.drain(Duration::from_secs(1)).await);
    let last = &n.deliveries(1)[0];
    assert_eq!(
        (last.state, last.target.as_str(), last.event_id.as_str()),
        (DeliveryState::GaveUp, "gone", "evt-orphan")
    );
    assert_eq!(last.error.as_deref(), Some("target no longer configured"));
    assert!(rx.received().is_empty());
}

#[tokio::test]
async fn queue_full_is_a_clear_error_and_all_or_nothing() {
    let down = free_addr();
    let healthy = Receiver::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let stuck = Target {
        name: "stuck".into(),
        url: format!("http://{down}/hook"),
        secret: "s".into(),
        events: vec![],
    };
    let limits = Limits {
        queue_capacity: 2,
        ..Limits::default()
    };
    let policy = RetryPolicy {
        initial_backoff: Duration::from_secs(60),
        ..fast_policy()
    };
    let n = Notifier::start_with_limits(
        vec![stuck, healthy.target("healthy", &[])],
        dir.path().join("log.jsonl"),
        policy,
        limits,
    )
    .await
    .unwrap();

    n.notify(event("e1", "budget.threshold")).unwrap();
    // Wait until the stuck target's task holds e1 (its first attempt failed).
    let deadline = tokio::time::Instant::now() + WAIT;
    while !n
        .deliveries(10)
        .iter()
        .any(|r| r.target == "stuck" && r.state == DeliveryState::Failed)
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    n.notify(event("e2", "budget.threshold")).unwrap();
    n.notify(event("e3", "budget.threshold")).unwrap();
    // Same id again while unfinished: harmless, not queued twice.
    n.notify(event("e2", "budget.threshold")).unwrap();
    match n.notify(event("e4", "budget.threshold")) {
        Err(NotifyError::QueueFull { target, capacity }) => {
            assert_eq!((target.as_str(), capacity), ("stuck", 2))
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    let err = n
        .notify(event("e4", "budget.threshold"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("stuck") && err.contains("queue full"), "{err}");

    let got = healthy.wait_for(3, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(got.len(), 3);
    // All or nothing: e4 reached no target.
    assert_eq!(healthy.ids(), ["e1", "e2", "e3"]);
    let records = n.deliveries(100);
    assert!(!records.iter().any(|r| r.event_id == "e4"));
    assert_eq!(
        records
            .iter()
            .filter(|r| r.event_id == "e2" && r.state == DeliveryState::Queued)
            .count(),
        2,
        "one per target"
    );
}

#[tokio::test]
async fn rejects_bad_targets_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let ok = Target {
        name: "a".into(),
        url: "https://example.com/hook".into(),
        secret: "s".into(),
        events: vec![],
    };
    let cases = [
        Target {
            url: "ftp://example.com".into(),
            ..ok.clone()
        },
        Target {
            url: "not a url".into(),
            ..ok.clone()
        },
        Target {
            secret: String::new(),
            ..ok.clone()
        },
        Target {
            name: String::new(),
            ..ok.clone()
        },
    ];
    for bad in cases {
        let err = Notifier::start(vec![bad], log.clone(), fast_policy())
            .await
            .unwrap_err();
        assert!(matches!(err, NotifyError::InvalidTarget { .. }), "{err}");
        assert!(!err.to_string().contains("\"s\""));
    }
    let err = Notifier::start(vec![ok.clone(), ok.clone()], log.clone(), fast_policy())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");

    let limits = Limits {
        max_event_bytes: 1024,
        ..Limits::default()
    };
    let n = Notifier::start_with_limits(vec![ok], log.clone(), fast_policy(), limits)
        .await
        .unwrap();
    for (id, kind) in [
        ("", "budget.x"),
        ("has space", "budget.x"),
        ("line\nbreak", "budget.x"),
        ("ok", ""),
    ] {
        assert!(
            matches!(
                n.notify(event(id, kind)),
                Err(NotifyError::InvalidEvent { .. })
            ),
            "{id:?} {kind:?}"
        );
    }
    let mut big = event("big", "budget.x");
    big.data = serde_json::json!("x".repeat(2000));
    let err = n.notify(big).unwrap_err();
    assert!(err.to_string().contains("more than the limit"), "{err}");
    assert!(n.deliveries(10).is_empty());
}
