//! Exact counters: signed usage (corrections count negatively, live as after a
//! restart), sums beyond `u64` and near `i64::MAX` per key that neither saturate nor
//! wrap, and the named bounds where a number cannot be represented.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_budget::{
    Admission, BudgetError, Engine, LimitScope, LimitSpec, LimitStatus, Measure, Mode, Period,
    Selector, Subject,
};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Direction, Modality, TokenMap};

const MODALITIES: &[Modality] = Modality::ALL;
const DIRECTIONS: &[Direction] = Direction::ALL;
/// Every token key of the ledger.
const KEYS: i128 = (Modality::ALL.len() * Direction::ALL.len()) as i128;

fn p(s: &str) -> AccountPath {
    s.parse().unwrap()
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn toks(pairs: &[(&str, i64)]) -> TokenMap {
    let mut m = TokenMap::new();
    for (k, v) in pairs {
        let (a, b) = k.split_once('.').unwrap();
        m.add(a.parse().unwrap(), b.parse().unwrap(), *v).unwrap();
    }
    m
}

/// Every one of the 30 keys at `n`.
fn every_key(n: i64) -> TokenMap {
    let mut m = TokenMap::new();
    for &modality in MODALITIES {
        for &direction in DIRECTIONS {
            m.add(modality, direction, n).unwrap();
        }
    }
    m
}

fn admit(
    e: &Engine,
    account: &str,
    now: Timestamp,
    input: &TokenMap,
    max_output: &TokenMap,
) -> Result<ciyuan_budget::Reservation, ciyuan_budget::Refusal> {
    e.admit(&Admission {
        account: &p(account),
        key_id: "k1",
        session: Some("s1"),
        model: "m",
        now,
        input,
        max_output,
        max_cost: None,
    })
}

fn row(e: &Engine, node: &str, name: &str, now: Timestamp) -> LimitStatus {
    e.status(&p(node), now)
        .into_iter()
        .find(|r| r.spec.name == name)
        .unwrap()
}

/// The limits of the restore test: node limits of every period a restart restores,
/// on several selectors, with thresholds.
fn restored_limits() -> Vec<LimitSpec> {
    let sel = |m, d| {
        Measure::Tokens(Selector {
            modality: m,
            direction: d,
        })
    };
    let mut out = vec![
        LimitSpec::new(p("acme"), "hourly", sel(None, None), 1000, Period::Hour),
        LimitSpec::new(
            p("acme"),
            "daily-out",
            sel(Some(Modality::Text), Some(Direction::Output)),
            800,
            Period::Day,
        ),
        LimitSpec::new(p("acme/a"), "monthly", sel(None, None), 5000, Period::Month),
        LimitSpec::new(
            p("acme"),
            "lifetime-in",
            sel(None, Some(Direction::Input)),
            1_000_000,
            Period::Lifetime,
        ),
    ];
    for l in &mut out {
        l.thresholds = vec![10, 50, 100];
    }
    out[1].mode = Mode::Soft;
    out
}

#[test]
fn regression_corrections_count_live_as_restored() {
    let now = t("2026-11-25T08:30:00Z");
    // Usage and corrections, some in earlier windows: a correction in this hour of
    // usage from an earlier hour takes the hourly counter below zero.
    let log: Vec<(&str, Timestamp, TokenMap)> = vec![
        (
            "acme/a",
            t("2026-10-31T23:00:00Z"),
            toks(&[("text.input", 900)]),
        ),
        (
            "acme/a",
            t("2026-11-25T07:10:00Z"),
            toks(&[("text.input", 400), ("text.output", 300)]),
        ),
        (
            "acme/a",
            t("2026-11-25T08:00:00Z"),
            toks(&[("text.input", 120), ("text.output", 80)]),
        ),
        (
            "acme/a",
            t("2026-11-25T08:05:00Z"),
            toks(&[("text.input", -400), ("text.output", -300)]),
        ),
        (
            "acme/b",
            t("2026-11-25T08:10:00Z"),
            toks(&[("text.input", 60), ("image.input", 40), ("text.output", -5)]),
        ),
        (
            "acme/a",
            t("2026-11-25T08:20:00Z"),
            toks(&[("text.input", -20), ("text.output", 15)]),
        ),
    ];

    // Live: every entry recorded as it happens.
    let live = Engine::new();
    for l in restored_limits() {
        live.set_limit(l).unwrap();
    }
    for (account, at, tokens) in &log {
        live.record(&p(account), "k1", None, tokens, *at);
    }

    // Restored: the same entries summed over each limit's current window, as the
    // server sums the projections on start.
    let restored = Engine::new();
    for l in restored_limits() {
        restored.set_limit(l.clone()).unwrap();
        let window = l.window(now);
        let used: i128 = log
            .iter()
            .filter(|(account, at, _)| {
                p(account).is_within(&l.node)
                    && window.is_none_or(|(start, end)| start <= *at && *at < end)
            })
            .map(|(_, _, tokens)| l.measure.amount(tokens))
            .sum();
        restored
            .load_used(&l.node, &l.name, None, window.map(|w| w.0), used)
            .unwrap();
    }

    for node in ["acme", "acme/a"] {
        assert_eq!(live.status(&p(node), now), restored.status(&p(node), now));
    }
    let hourly = row(&live, "acme", "hourly", now);
    assert_eq!(
        (hourly.used, hourly.remaining),
        (-400 + 120 + 80 + 60 + 40 - 5 - 20 + 15 - 300, 1000)
    );
    assert_eq!(
        row(&live, "acme/a", "monthly", now).used,
        400 + 300 + 200 - 700 - 5
    );
    // The same request gets the same answer from both.
    let big = toks(&[("text.input", 1300)]);
    let none = TokenMap::new();
    assert_eq!(
        admit(&live, "acme/a", now, &big, &none).map(|_| ()),
        admit(&restored, "acme/a", now, &big, &none).map(|_| ())
    );
    assert_eq!(
        live.status(&p("acme"), now),
        restored.status(&p("acme"), now)
    );
}

#[test]
fn regression_a_credit_leaves_room_and_remaining_is_exact() {
    let e = Engine::new();
    e.set_limit(LimitSpec::new(
        p("a"),
        "hourly",
        Measure::Tokens(Selector::ALL),
        100,
        Period::Hour,
    ))
    .unwrap();
    let now = t("2026-11-25T08:30:00Z");
    // A correction this hour of usage from the last one: a credit of 50.
    e.record(&p("a"), "k1", None, &toks(&[("text.input", -50)]), now);
    let r = row(&e, "a", "hourly", now);
    assert_eq!((r.used, r.reserved, r.remaining), (-50, 0, 100));
    // 150 fits: -50 + 0 + 150 <= 100.
    let res = admit(
        &e,
        "a",
        now,
        &toks(&[("text.input", 150)]),
        &TokenMap::new(),
    )
    .unwrap();
    let r = row(&e, "a", "hourly", now);
    assert_eq!((r.used, r.reserved, r.remaining), (-50, 150, 0));
    let refusal = admit(&e, "a", now, &toks(&[("text.input", 1)]), &TokenMap::new()).unwrap_err();
    assert_eq!(
        refusal.message,
        "hard limit 'hourly' on a: 100 tokens per hour, -50 used, 150 reserved, this request needs 1"
    );
    e.settle(res.id, &toks(&[("text.input", 150)]), now)
        .unwrap();
    let r = row(&e, "a", "hourly", now);
    assert_eq!((r.used, r.reserved, r.remaining), (100, 0, 0));
}

#[test]
fn regression_sums_near_i64_max_are_exact() {
    let e = Engine::new();
    let mut hard = LimitSpec::new(
        p("a"),
        "hard",
        Measure::Tokens(Selector::ALL),
        u64::MAX,
        Period::Lifetime,
    );
    hard.thresholds = vec![100];
    e.set_limit(hard).unwrap();
    let now = t("2026-11-25T08:00:00Z");
    let max = i128::from(i64::MAX);

    // Two events of i64::MAX: 2^64 - 2, one below the limit, no saturation.
    for _ in 0..2 {
        let s = e.record(&p("a"), "k1", None, &toks(&[("text.input", i64::MAX)]), now);
        assert!(s.exceeded.is_empty() && s.crossings.is_empty());
    }
    let r = row(&e, "a", "hard", now);
    assert_eq!((r.used, r.remaining), (2 * max, 1));
    // Needing 2 goes over by one; a saturating sum said it fit.
    let two = toks(&[("text.input", 2)]);
    let refusal = admit(&e, "a", now, &two, &TokenMap::new()).unwrap_err();
    assert_eq!(
        refusal.message,
        format!(
            "hard limit 'hard' on a: {} tokens in total, {} used, 0 reserved, this request needs 2",
            u64::MAX,
            2 * max
        )
    );
    let one = admit(&e, "a", now, &toks(&[("text.input", 1)]), &TokenMap::new()).unwrap();
    assert_eq!(row(&e, "a", "hard", now).remaining, 0);
    let s = e.settle(one.id, &toks(&[("text.input", 1)]), now).unwrap();
    assert!(s.exceeded.is_empty());
    assert_eq!(s.crossings.len(), 1);
    assert_eq!(
        (s.crossings[0].used, s.crossings[0].amount),
        (u64::MAX, u64::MAX)
    );

    // Far past u64: 1000 events of all 30 keys at i64::MAX, then as many corrections.
    for _ in 0..1000 {
        let s = e.record(&p("a"), "k1", None, &every_key(i64::MAX), now);
        assert_eq!(s.exceeded.len(), 1);
    }
    let r = row(&e, "a", "hard", now);
    assert_eq!(r.used, 2 * max + 1 + 1000 * KEYS * max);
    assert_eq!(r.remaining, 0);
    // Over the amount, even a request needing nothing does not fit.
    assert!(admit(&e, "a", now, &TokenMap::new(), &TokenMap::new()).is_err());
    for _ in 0..1000 {
        e.record(&p("a"), "k1", None, &every_key(-i64::MAX), now);
    }
    let r = row(&e, "a", "hard", now);
    assert_eq!((r.used, r.remaining), (2 * max + 1, 0));
    // One more correction of i64::MAX: i64::MAX + 1 used, u64::MAX - (i64::MAX + 1)
    // = i64::MAX left.
    e.record(
        &p("a"),
        "k1",
        None,
        &toks(&[("text.input", -i64::MAX)]),
        now,
    );
    let r = row(&e, "a", "hard", now);
    assert_eq!((r.used, r.remaining), (max + 1, i64::MAX as u64));

    // Many events of 10^12 on every key (the doors' bound per key and event):
    // past u64::MAX after about 740,000 of them.
    let e = Engine::new();
    let mut soft = LimitSpec::new(
        p("a"),
        "soft",
        Measure::Tokens(Selector::ALL),
        1_000_000,
        Period::Lifetime,
    );
    soft.mode = Mode::Soft;
    e.set_limit(soft).unwrap();
    // A threshold crossed beyond u64::MAX reports u64::MAX, the documented bound.
    let e2 = Engine::new();
    let mut soft2 = LimitSpec::new(
        p("a"),
        "soft",
        Measure::Tokens(Selector::ALL),
        100,
        Period::Lifetime,
    );
    soft2.mode = Mode::Soft;
    soft2.thresholds = vec![80];
    e2.set_limit(soft2).unwrap();
    let s = e2.record(&p("a"), "k1", None, &every_key(i64::MAX), now);
    assert_eq!((s.crossings.len(), s.crossings[0].used), (1, u64::MAX));
    assert_eq!(row(&e2, "a", "soft", now).used, KEYS * max);

    let event = every_key(1_000_000_000_000);
    let n = 750_000i128;
    for _ in 0..n {
        e.record(&p("a"), "k1", None, &event, now);
    }
    let r = row(&e, "a", "soft", now);
    assert_eq!(r.used, n * KEYS * 1_000_000_000_000);
    assert!(r.used > i128::from(u64::MAX));
    assert_eq!(r.remaining, 0);
}

#[test]
fn regression_reservations_beyond_u64_are_refused_not_wrapped() {
    let e = Engine::new();
    let mut soft = LimitSpec::new(
        p("a"),
        "soft",
        Measure::Tokens(Selector::ALL),
        10,
        Period::Lifetime,
    );
    soft.mode = Mode::Soft;
    e.set_limit(soft).unwrap();
    let now = t("2026-11-25T08:00:00Z");
    let max = toks(&[("text.output", i64::MAX)]);
    let first = admit(&e, "a", now, &max, &max).unwrap();
    assert_eq!(row(&e, "a", "soft", now).reserved, u64::MAX - 1);
    // Soft limits never refuse, except where their counter cannot hold the request:
    // more than u64::MAX reserved at once.
    let refusal = admit(&e, "a", now, &toks(&[("text.input", 2)]), &TokenMap::new()).unwrap_err();
    assert_eq!(
        refusal.message,
        format!(
            "soft limit 'soft' on a: 10 tokens in total, {} reserved, this request needs 2: \
             no counter holds more than {} at once",
            u64::MAX - 1,
            u64::MAX
        )
    );
    assert_eq!(row(&e, "a", "soft", now).reserved, u64::MAX - 1);
    assert!(admit(&e, "a", now, &toks(&[("text.input", 1)]), &TokenMap::new()).is_ok());
    assert_eq!(row(&e, "a", "soft", now).reserved, u64::MAX);
    e.release(first.id);
    assert_eq!(row(&e, "a", "soft", now).reserved, 1);
    // One request needing more than u64::MAX on its own.
    let huge = every_key(i64::MAX);
    let refusal = admit(&e, "a", now, &huge, &TokenMap::new()).unwrap_err();
    assert!(
        refusal.message.contains(&format!(
            "this request needs {}",
            KEYS * i128::from(i64::MAX)
        )),
        "{}",
        refusal.message
    );
    assert_eq!(row(&e, "a", "soft", now).reserved, 1);
}

#[test]
fn regression_settle_refuses_negative_usage_and_keeps_the_hold() {
    let e = Engine::new();
    e.set_limit(LimitSpec::new(
        p("a"),
        "daily",
        Measure::Tokens(Selector::ALL),
        1000,
        Period::Day,
    ))
    .unwrap();
    let now = t("2026-11-25T08:00:00Z");
    let r = admit(
        &e,
        "a",
        now,
        &toks(&[("text.input", 100)]),
        &toks(&[("text.output", 100)]),
    )
    .unwrap();
    let err = e
        .settle(
            r.id,
            &toks(&[("text.input", 100), ("text.output", -30)]),
            now,
        )
        .unwrap_err();
    assert_eq!(
        err,
        BudgetError::NegativeUsage {
            modality: Modality::Text,
            direction: Direction::Output,
            count: -30
        }
    );
    assert_eq!(
        err.to_string(),
        "actual usage cannot be negative: text.output is -30"
    );
    let st = row(&e, "a", "daily", now);
    assert_eq!((st.used, st.reserved), (0, 200));
    e.settle(
        r.id,
        &toks(&[("text.input", 100), ("text.output", 30)]),
        now,
    )
    .unwrap();
    let st = row(&e, "a", "daily", now);
    assert_eq!((st.used, st.reserved), (130, 0));
}

#[test]
#[should_panic(expected = "an admission with a negative count")]
fn regression_admission_of_a_negative_count_is_a_caller_bug() {
    let e = Engine::new();
    let now = t("2026-11-25T08:00:00Z");
    let _ = admit(&e, "a", now, &toks(&[("text.input", -5)]), &TokenMap::new());
}

#[test]
fn regression_load_used_is_signed_and_bounded() {
    let e = Engine::new();
    let mut spec = LimitSpec::new(
        p("a"),
        "monthly",
        Measure::Tokens(Selector::ALL),
        100,
        Period::Month,
    );
    spec.thresholds = vec![50];
    e.set_limit(spec).unwrap();
    let now = t("2026-11-25T08:00:00Z");
    let month = Some(t("2026-11-01T00:00:00Z"));
    for bad in [
        (1i128 << 100) + 1,
        -(1i128 << 100) - 1,
        i128::MAX,
        i128::MIN,
    ] {
        assert!(matches!(
            e.load_used(&p("a"), "monthly", None, month, bad),
            Err(BudgetError::BadLoad { .. })
        ));
    }
    e.load_used(&p("a"), "monthly", None, month, -(1i128 << 100))
        .unwrap();
    assert_eq!(row(&e, "a", "monthly", now).remaining, 100);
    e.load_used(&p("a"), "monthly", None, month, -40).unwrap();
    let r = row(&e, "a", "monthly", now);
    assert_eq!((r.used, r.remaining), (-40, 100));
    // A threshold is reached only above zero, when used × 100 ≥ amount × pct.
    let s = e.record(&p("a"), "k1", None, &toks(&[("text.input", 89)]), now);
    assert!(s.crossings.is_empty(), "{s:?}");
    let s = e.record(&p("a"), "k1", None, &toks(&[("text.input", 1)]), now);
    assert_eq!((s.crossings.len(), s.crossings[0].used), (1, 50));
}

#[test]
fn regression_session_and_key_counters_keep_their_subject() {
    let e = Engine::new();
    for (name, scope) in [
        ("per-session", LimitScope::Session),
        ("per-key", LimitScope::Key),
    ] {
        let mut spec = LimitSpec::new(
            p("a"),
            name,
            Measure::Tokens(Selector::ALL),
            100,
            Period::Day,
        );
        spec.scope = scope;
        spec.thresholds = vec![50];
        e.set_limit(spec).unwrap();
    }
    let now = t("2026-11-25T08:00:00Z");
    let r = admit(
        &e,
        "a/b",
        now,
        &toks(&[("text.input", 60)]),
        &TokenMap::new(),
    )
    .unwrap();
    let s = e.settle(r.id, &toks(&[("text.input", 60)]), now).unwrap();
    let subjects: Vec<Subject> = s.crossings.iter().map(|c| c.subject.clone()).collect();
    assert_eq!(
        subjects,
        vec![Subject::Session("s1".into()), Subject::Key("k1".into())]
    );
    // A correction below zero still shows its subject's row.
    e.record(
        &p("a/b"),
        "k2",
        Some("s2"),
        &toks(&[("text.input", -7)]),
        now,
    );
    let rows: Vec<(Subject, i128)> = e
        .status(&p("a"), now)
        .into_iter()
        .map(|r| (r.subject, r.used))
        .collect();
    assert_eq!(
        rows,
        vec![
            (Subject::Session("s1".into()), 60),
            (Subject::Session("s2".into()), -7),
            (Subject::Key("k1".into()), 60),
            (Subject::Key("k2".into()), -7),
        ]
    );
}

#[test]
fn corrections_count_on_node_token_counters_only() {
    let now = t("2026-11-25T08:30:00Z");
    let e = Engine::new();
    let tokens = Measure::Tokens(Selector::ALL);
    let mut per_key = LimitSpec::new(p("acme"), "per-key", tokens, 1000, Period::Day);
    per_key.scope = LimitScope::Key;
    for spec in [
        LimitSpec::new(p("acme"), "daily", tokens, 1000, Period::Day),
        LimitSpec::new(p("acme"), "requests", Measure::Requests, 10, Period::Day),
        per_key,
    ] {
        e.set_limit(spec).unwrap();
    }
    e.record(&p("acme/a"), "k1", None, &toks(&[("text.input", 100)]), now);
    let settled = e.record_correction(&p("acme/a"), &toks(&[("text.input", -40)]), now);
    assert!(settled.crossings.is_empty() && settled.exceeded.is_empty());
    assert_eq!(row(&e, "acme", "daily", now).used, 60);
    // A correction is no request and no key's usage.
    assert_eq!(row(&e, "acme", "requests", now).used, 1);
    let key = e
        .status(&p("acme"), now)
        .into_iter()
        .find(|r| r.spec.name == "per-key" && r.subject == Subject::Key("k1".into()))
        .unwrap();
    assert_eq!(key.used, 100);
    // A credit larger than the window's usage leaves room, as after a restart.
    e.record_correction(&p("acme/a"), &toks(&[("text.input", -100)]), now);
    assert_eq!(row(&e, "acme", "daily", now).used, -40);
    assert_eq!(row(&e, "acme", "daily", now).remaining, 1000);
}
