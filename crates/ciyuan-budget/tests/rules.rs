//! One test per rule of the engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use ciyuan_budget::{
    Admission, BudgetError, Crossing, Engine, LimitScope, LimitSpec, Measure, Mode, Period,
    RefusalKind, Reservation, Selector, Subject,
};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::{AccountPath, Direction, Modality, TokenMap};

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

fn all_tokens() -> Measure {
    Measure::Tokens(Selector::ALL)
}

fn limit(node: &str, name: &str, measure: Measure, amount: u64, period: Period) -> LimitSpec {
    LimitSpec::new(p(node), name, measure, amount, period)
}

struct Req<'a> {
    account: &'a str,
    key: &'a str,
    session: Option<&'a str>,
    model: &'a str,
    now: Timestamp,
    input: TokenMap,
    max_output: TokenMap,
}

impl<'a> Req<'a> {
    fn new(account: &'a str, now: &str, input: i64, output: i64) -> Req<'a> {
        Req {
            account,
            key: "k1",
            session: None,
            model: "qwen-max",
            now: t(now),
            input: toks(&[("text.input", input)]),
            max_output: toks(&[("text.output", output)]),
        }
    }

    fn admit(&self, e: &Engine) -> Result<Reservation, ciyuan_budget::Refusal> {
        let account = p(self.account);
        e.admit(&Admission {
            account: &account,
            key_id: self.key,
            session: self.session,
            model: self.model,
            now: self.now,
            input: &self.input,
            max_output: &self.max_output,
            max_cost: None,
        })
    }
}

fn used(e: &Engine, node: &str, name: &str, now: Timestamp) -> (i128, u64) {
    let rows = e.status(&p(node), now);
    let r = rows.iter().find(|r| r.spec.name == name).unwrap();
    (r.used, r.reserved)
}

#[test]
fn limits_are_inherited_by_the_subtree() {
    let e = Engine::new();
    e.set_limit(limit("acme", "monthly", all_tokens(), 1000, Period::Month))
        .unwrap();
    let now = "2026-11-25T08:00:00Z";
    let r = Req::new("acme/cn/hr", now, 300, 500).admit(&e).unwrap();
    assert_eq!(used(&e, "acme", "monthly", t(now)), (0, 800));
    let refusal = Req::new("acme/us", now, 100, 200).admit(&e).unwrap_err();
    assert_eq!(refusal.node, p("acme"));
    assert_eq!(refusal.limit.as_deref(), Some("monthly"));
    assert_eq!(refusal.kind, RefusalKind::Quota);
    assert_eq!(
        refusal.message,
        "hard limit 'monthly' on acme: 1000 tokens per month, 0 used, 800 reserved, this request needs 300"
    );
    // Other trees are not affected.
    Req::new("other", now, 10_000, 10_000).admit(&e).unwrap();
    let s = e
        .settle(
            r.id,
            &toks(&[("text.input", 300), ("text.output", 50)]),
            t(now),
        )
        .unwrap();
    assert!(s.exceeded.is_empty());
    assert_eq!(used(&e, "acme", "monthly", t(now)), (350, 0));
    Req::new("acme/us", now, 100, 200).admit(&e).unwrap();
    // The nearest refusing node is named.
    e.set_limit(limit("acme/cn", "cn", all_tokens(), 10, Period::Month))
        .unwrap();
    let refusal = Req::new("acme/cn/hr", now, 100, 200).admit(&e).unwrap_err();
    assert_eq!(refusal.node, p("acme/cn"));
    // A limit on the root applies to everything.
    e.set_limit(limit("/", "all", Measure::Requests, 0, Period::Lifetime))
        .unwrap();
    let refusal = Req::new("zeta", now, 1, 1).admit(&e).unwrap_err();
    assert_eq!(refusal.node, AccountPath::root());
    assert_eq!(refusal.kind, RefusalKind::Rate);
    assert_eq!(refusal.retry_after, None);
}

#[test]
fn admit_is_all_or_nothing() {
    let e = Engine::new();
    e.set_limit(limit("a", "big", all_tokens(), 1000, Period::Day))
        .unwrap();
    e.set_limit(limit("a/b", "small", all_tokens(), 100, Period::Day))
        .unwrap();
    let now = "2026-11-25T08:00:00Z";
    Req::new("a/b", now, 100, 1).admit(&e).unwrap_err();
    assert_eq!(used(&e, "a", "big", t(now)), (0, 0));
    assert_eq!(used(&e, "a/b", "small", t(now)), (0, 0));
    assert_eq!(e.reservations(), 0);
}

#[test]
fn selectors_count_only_their_tokens() {
    let e = Engine::new();
    let out = Selector {
        modality: Some(Modality::Text),
        direction: Some(Direction::Output),
    };
    let images = Selector {
        modality: Some(Modality::Image),
        direction: None,
    };
    e.set_limit(limit("a", "out", Measure::Tokens(out), 100, Period::Day))
        .unwrap();
    e.set_limit(limit("a", "img", Measure::Tokens(images), 50, Period::Day))
        .unwrap();
    let now = "2026-11-25T08:00:00Z";
    // Lots of input is fine for an output limit.
    let r = Req::new("a", now, 10_000, 100).admit(&e).unwrap();
    assert_eq!(used(&e, "a", "out", t(now)), (0, 100));
    assert_eq!(used(&e, "a", "img", t(now)), (0, 0));
    let actual = toks(&[
        ("text.input", 10_000),
        ("text.output", 60),
        ("image.input", 40),
        ("text.reasoning", 7),
    ]);
    let s = e.settle(r.id, &actual, t(now)).unwrap();
    assert_eq!(used(&e, "a", "out", t(now)), (60, 0));
    assert_eq!(used(&e, "a", "img", t(now)), (40, 0));
    // The image limit was not reserved against but the actual usage still fits.
    assert!(s.exceeded.is_empty());
    let refusal = Req::new("a", now, 0, 41).admit(&e).unwrap_err();
    assert_eq!(
        refusal.message,
        "hard limit 'out' on a: 100 text.output tokens per day, 60 used, 0 reserved, this request needs 41"
    );
    let mut req = Req::new("a", now, 0, 0);
    req.input = toks(&[("image.input", 11)]);
    let refusal = req.admit(&e).unwrap_err();
    assert!(
        refusal.message.contains("50 image tokens per day"),
        "{}",
        refusal.message
    );
}

#[test]
fn minute_and_hour_windows_are_utc_aligned_with_retry_after() {
    let e = Engine::new();
    e.set_limit(limit("a", "tpm", all_tokens(), 100, Period::Minute))
        .unwrap();
    e.set_limit(limit("a", "tph", all_tokens(), 150, Period::Hour))
        .unwrap();
    let r = Req::new("a", "2026-11-25T08:00:50Z", 50, 50)
        .admit(&e)
        .unwrap();
    e.settle(
        r.id,
        &toks(&[("text.input", 90)]),
        t("2026-11-25T08:00:51Z"),
    )
    .unwrap();
    let refusal = Req::new("a", "2026-11-25T08:00:55Z", 10, 10)
        .admit(&e)
        .unwrap_err();
    assert_eq!(refusal.kind, RefusalKind::Rate);
    assert_eq!(refusal.retry_after, Some(Duration::from_secs(5)));
    // Next minute: the minute counter is fresh, the hour one is not.
    let refusal = Req::new("a", "2026-11-25T08:01:00Z", 40, 40)
        .admit(&e)
        .unwrap_err();
    assert_eq!(refusal.limit.as_deref(), Some("tph"));
    assert_eq!(refusal.kind, RefusalKind::Quota);
    assert_eq!(refusal.retry_after, Some(Duration::from_secs(59 * 60)));
    Req::new("a", "2026-11-25T08:01:00Z", 30, 30)
        .admit(&e)
        .unwrap();
    let st = e.status(&p("a"), t("2026-11-25T08:01:30Z"));
    assert_eq!(st[0].window_start, Some(t("2026-11-25T08:01:00Z")));
    assert_eq!(st[0].window_end, Some(t("2026-11-25T08:02:00Z")));
    assert_eq!(st[1].window_start, Some(t("2026-11-25T08:00:00Z")));
    // A request bigger than the whole limit: waiting does not help.
    let refusal = Req::new("a", "2026-11-25T09:00:00Z", 100, 1)
        .admit(&e)
        .unwrap_err();
    assert_eq!(refusal.retry_after, None);
}

#[test]
fn month_boundary_in_asia_shanghai() {
    let e = Engine::new();
    let mut spec = limit("cn", "monthly", all_tokens(), 100, Period::Month);
    spec.time_zone = TimeZone::get("Asia/Shanghai").unwrap();
    e.set_limit(spec.clone()).unwrap();
    // 2026-11-30T15:59:59Z is 23:59:59 on 30 November in Shanghai.
    let r = Req::new("cn", "2026-11-30T15:59:59Z", 90, 0)
        .admit(&e)
        .unwrap();
    e.settle(
        r.id,
        &toks(&[("text.input", 90)]),
        t("2026-11-30T15:59:59Z"),
    )
    .unwrap();
    let refusal = Req::new("cn", "2026-11-30T15:59:59Z", 20, 0)
        .admit(&e)
        .unwrap_err();
    // One second to December in Shanghai.
    assert_eq!(refusal.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(
        spec.window(t("2026-11-30T16:00:00Z")),
        Some((t("2026-11-30T16:00:00Z"), t("2026-12-31T16:00:00Z")))
    );
    // Midnight in Shanghai, still 30 November in UTC: a new month.
    let r = Req::new("cn", "2026-11-30T16:00:00Z", 20, 0)
        .admit(&e)
        .unwrap();
    let st = e.status(&p("cn"), t("2026-11-30T16:00:00Z"));
    assert_eq!(st[0].window_start, Some(t("2026-11-30T16:00:00Z")));
    assert_eq!((st[0].used, st[0].reserved), (0, 20));
    e.release(r.id);
    // The same instant in UTC is still November.
    let mut utc = limit("cn", "utc", all_tokens(), 100, Period::Month);
    utc.time_zone = TimeZone::UTC;
    assert_eq!(
        utc.window(t("2026-11-30T16:00:00Z")).unwrap().0,
        t("2026-11-01T00:00:00Z")
    );
}

#[test]
fn dst_days_in_new_york_are_23_and_25_hours() {
    let ny = TimeZone::get("America/New_York").unwrap();
    let mut spec = limit("us", "daily", all_tokens(), 100, Period::Day);
    spec.time_zone = ny;
    // 2026-03-08: clocks go from 02:00 EST to 03:00 EDT.
    let (start, end) = spec.window(t("2026-03-08T12:00:00Z")).unwrap();
    assert_eq!(start, t("2026-03-08T05:00:00Z"));
    assert_eq!(end, t("2026-03-09T04:00:00Z"));
    assert_eq!(end.duration_since(start).as_secs(), 23 * 3600);
    // 2026-11-01: back from 02:00 EDT to 01:00 EST.
    let (start, end) = spec.window(t("2026-11-01T12:00:00Z")).unwrap();
    assert_eq!(start, t("2026-11-01T04:00:00Z"));
    assert_eq!(end, t("2026-11-02T05:00:00Z"));
    assert_eq!(end.duration_since(start).as_secs(), 25 * 3600);

    let e = Engine::new();
    e.set_limit(spec).unwrap();
    // 23:30 EDT on 8 March is 03:30 UTC on 9 March: still the short day.
    let r = Req::new("us", "2026-03-09T03:30:00Z", 100, 0)
        .admit(&e)
        .unwrap();
    e.settle(
        r.id,
        &toks(&[("text.input", 100)]),
        t("2026-03-09T03:30:00Z"),
    )
    .unwrap();
    let refusal = Req::new("us", "2026-03-09T03:30:00Z", 1, 0)
        .admit(&e)
        .unwrap_err();
    assert_eq!(refusal.retry_after, Some(Duration::from_secs(30 * 60)));
    Req::new("us", "2026-03-09T04:00:00Z", 1, 0)
        .admit(&e)
        .unwrap();
}

#[test]
fn sessions_have_their_own_counters_and_no_session_is_not_limited() {
    let e = Engine::new();
    let mut spec = limit("a", "per-session", all_tokens(), 100, Period::Lifetime);
    spec.scope = LimitScope::Session;
    e.set_limit(spec).unwrap();
    let now = "2026-11-25T08:00:00Z";
    let mut req = Req::new("a/b", now, 60, 0);
    req.session = Some("s1");
    let r = req.admit(&e).unwrap();
    e.settle(r.id, &toks(&[("text.input", 60)]), t(now))
        .unwrap();
    let refusal = req.admit(&e).unwrap_err();
    assert_eq!(
        refusal.message,
        "hard limit 'per-session' on a: 100 tokens in total per session (session s1), 60 used, 0 reserved, this request needs 60"
    );
    assert_eq!(refusal.retry_after, None);
    req.session = Some("s2");
    req.admit(&e).unwrap();
    req.session = None;
    for _ in 0..5 {
        req.admit(&e).unwrap();
    }
    let st = e.status(&p("a"), t(now));
    assert_eq!(st.len(), 2);
    assert_eq!(st[0].subject, Subject::Session("s1".into()));
    assert_eq!((st[0].used, st[0].reserved, st[0].remaining), (60, 0, 40));
    assert_eq!(st[1].subject, Subject::Session("s2".into()));
    assert_eq!(st[1].window_start, None);
}

#[test]
fn keys_have_their_own_rate_limits() {
    let e = Engine::new();
    let mut spec = limit("a", "rpm", Measure::Requests, 2, Period::Minute);
    spec.scope = LimitScope::Key;
    e.set_limit(spec).unwrap();
    let now = "2026-11-25T08:00:30Z";
    let mut req = Req::new("a", now, 1_000_000, 1_000_000);
    let r1 = req.admit(&e).unwrap();
    req.admit(&e).unwrap();
    let refusal = req.admit(&e).unwrap_err();
    assert_eq!(refusal.kind, RefusalKind::Rate);
    assert_eq!(refusal.retry_after, Some(Duration::from_secs(30)));
    assert!(
        refusal
            .message
            .contains("2 requests per minute per key (key k1), 0 used, 2 reserved")
    );
    req.key = "k2";
    req.admit(&e).unwrap();
    // A released request does not count.
    assert!(e.release(r1.id));
    assert!(!e.release(r1.id));
    req.key = "k1";
    req.admit(&e).unwrap();
    req.now = t("2026-11-25T08:01:00Z");
    req.admit(&e).unwrap();
}

#[test]
fn request_scope_refuses_or_clamps() {
    let e = Engine::new();
    let mut spec = limit("a", "max-request", all_tokens(), 1000, Period::Lifetime);
    spec.scope = LimitScope::Request;
    e.set_limit(spec.clone()).unwrap();
    let now = "2026-11-25T08:00:00Z";
    let refusal = Req::new("a/b", now, 600, 500).admit(&e).unwrap_err();
    assert_eq!(
        refusal.message,
        "hard limit 'max-request' on a: 1000 tokens per request, this request needs 1100"
    );
    assert_eq!(refusal.kind, RefusalKind::Quota);
    assert_eq!(refusal.retry_after, None);
    let r = Req::new("a/b", now, 600, 400).admit(&e).unwrap();
    assert_eq!(r.output_cap, None);

    spec.clamp = true;
    e.set_limit(spec).unwrap();
    let mut budget = limit("a", "daily", all_tokens(), 10_000, Period::Day);
    budget.thresholds = vec![50];
    e.set_limit(budget).unwrap();
    let r = Req::new("a/b", now, 600, 4000).admit(&e).unwrap();
    assert_eq!(r.output_cap, Some(400));
    // The other limits reserve the clamped amount.
    assert_eq!(used(&e, "a", "daily", t(now)), (0, 1000));
    // Input alone too big: refused even with clamp.
    let refusal = Req::new("a/b", now, 1000, 10).admit(&e).unwrap_err();
    assert_eq!(
        refusal.message,
        "hard limit 'max-request' on a: 1000 tokens per request, this request's input alone needs 1000"
    );
    // An actual request over its own limit is reported.
    let s = e
        .settle(
            r.id,
            &toks(&[("text.input", 600), ("text.output", 401)]),
            t(now),
        )
        .unwrap();
    assert_eq!(s.exceeded, vec![(p("a"), "max-request".to_string())]);
    assert_eq!(s.crossings.len(), 0);

    // Clamp is only for hard request-scope token limits.
    let mut bad = limit("a", "x", all_tokens(), 1, Period::Day);
    bad.clamp = true;
    assert!(matches!(
        e.set_limit(bad),
        Err(BudgetError::InvalidLimit { .. })
    ));
}

#[test]
fn soft_limits_never_refuse_and_alert() {
    let e = Engine::new();
    let mut spec = limit("a", "soft", all_tokens(), 100, Period::Day);
    spec.mode = Mode::Soft;
    spec.thresholds = vec![100, 50, 80];
    e.set_limit(spec).unwrap();
    assert_eq!(e.limits(&p("a"))[0].thresholds, vec![50, 80, 100]);
    let now = "2026-11-25T08:00:00Z";
    let r = Req::new("a", now, 500, 500).admit(&e).unwrap();
    let s = e
        .settle(r.id, &toks(&[("text.input", 150)]), t(now))
        .unwrap();
    assert!(s.exceeded.is_empty(), "soft limits are never 'exceeded'");
    let th: Vec<u8> = s.crossings.iter().map(|c| c.threshold).collect();
    assert_eq!(th, vec![50, 80, 100]);
    assert_eq!(
        s.crossings[2],
        Crossing {
            node: p("a"),
            limit: "soft".into(),
            subject: Subject::Node,
            window_start: Some(t("2026-11-25T00:00:00Z")),
            threshold: 100,
            used: 150,
            amount: 100,
            mode: Mode::Soft,
            cost: None,
        }
    );
}

#[test]
fn thresholds_are_reported_once_per_window() {
    let e = Engine::new();
    let mut spec = limit("a", "daily", all_tokens(), 100, Period::Day);
    spec.thresholds = vec![50, 80];
    e.set_limit(spec).unwrap();
    let now = "2026-11-25T08:00:00Z";
    let acc = p("a/b");
    let rec = |n: i64, at: &str| {
        e.record(&acc, "k", None, &toks(&[("text.input", n)]), t(at))
            .crossings
            .iter()
            .map(|c| c.threshold)
            .collect::<Vec<_>>()
    };
    assert_eq!(rec(49, now), Vec::<u8>::new());
    assert_eq!(rec(1, now), vec![50]);
    assert_eq!(rec(10, now), Vec::<u8>::new());
    assert_eq!(rec(20, now), vec![80]);
    assert_eq!(rec(20, now), Vec::<u8>::new());
    // Next day, again.
    assert_eq!(rec(90, "2026-11-26T08:00:00Z"), vec![50, 80]);
    // Usage of a past window is not counted in memory.
    assert_eq!(rec(90, now), Vec::<u8>::new());
    assert_eq!(used(&e, "a", "daily", t("2026-11-26T09:00:00Z")), (90, 0));
    // Raising the amount keeps the counter and what was reported.
    let mut spec = limit("a", "daily", all_tokens(), 1000, Period::Day);
    spec.thresholds = vec![5, 50, 80];
    e.set_limit(spec).unwrap();
    assert_eq!(used(&e, "a", "daily", t("2026-11-26T09:00:00Z")), (90, 0));
    assert_eq!(rec(1, "2026-11-26T09:00:00Z"), vec![5]);
}

#[test]
fn record_is_never_refused_and_reports_exceeded() {
    let e = Engine::new();
    e.set_limit(limit("a", "daily", all_tokens(), 100, Period::Day))
        .unwrap();
    e.set_limit(limit("a/b", "rpd", Measure::Requests, 1, Period::Day))
        .unwrap();
    let now = t("2026-11-25T08:00:00Z");
    let s = e.record(&p("a/b"), "k", None, &toks(&[("text.input", 80)]), now);
    assert!(s.exceeded.is_empty());
    let s = e.record(&p("a/b"), "k", None, &toks(&[("text.input", 80)]), now);
    assert_eq!(
        s.exceeded,
        vec![(p("a"), "daily".to_string()), (p("a/b"), "rpd".to_string())]
    );
    assert_eq!(used(&e, "a", "daily", now), (160, 0));
    assert_eq!(used(&e, "a/b", "rpd", now), (2, 0));
}

#[test]
fn settle_past_the_reservation_reports_exceeded() {
    let e = Engine::new();
    e.set_limit(limit("a", "daily", all_tokens(), 100, Period::Day))
        .unwrap();
    let now = "2026-11-25T08:00:00Z";
    let r = Req::new("a", now, 50, 40).admit(&e).unwrap();
    let s = e
        .settle(
            r.id,
            &toks(&[("text.input", 50), ("text.output", 60)]),
            t(now),
        )
        .unwrap();
    assert_eq!(s.exceeded, vec![(p("a"), "daily".to_string())]);
    assert_eq!(
        e.settle(r.id, &TokenMap::new(), t(now)),
        Err(BudgetError::UnknownReservation(r.id))
    );
}

#[test]
fn settle_counts_in_the_window_of_admission() {
    let e = Engine::new();
    e.set_limit(limit("a", "tpm", all_tokens(), 100, Period::Minute))
        .unwrap();
    let r1 = Req::new("a", "2026-11-25T08:00:59Z", 50, 50)
        .admit(&e)
        .unwrap();
    // Another request in the next minute moves the counter on.
    let r2 = Req::new("a", "2026-11-25T08:01:00Z", 50, 50)
        .admit(&e)
        .unwrap();
    e.settle(
        r1.id,
        &toks(&[("text.input", 100)]),
        t("2026-11-25T08:01:05Z"),
    )
    .unwrap();
    assert_eq!(used(&e, "a", "tpm", t("2026-11-25T08:01:05Z")), (0, 100));
    e.settle(
        r2.id,
        &toks(&[("text.input", 30)]),
        t("2026-11-25T08:01:05Z"),
    )
    .unwrap();
    assert_eq!(used(&e, "a", "tpm", t("2026-11-25T08:01:05Z")), (30, 0));
}

#[test]
fn expire_releases_old_reservations() {
    let e = Engine::new();
    e.set_limit(limit("a", "daily", all_tokens(), 100, Period::Day))
        .unwrap();
    let r1 = Req::new("a", "2026-11-25T08:00:00Z", 30, 0)
        .admit(&e)
        .unwrap();
    let _r2 = Req::new("a", "2026-11-25T08:05:00Z", 30, 0)
        .admit(&e)
        .unwrap();
    assert_eq!(
        e.expire(t("2026-11-25T08:10:00Z"), Duration::from_secs(600)),
        1
    );
    assert_eq!(used(&e, "a", "daily", t("2026-11-25T08:10:00Z")), (0, 30));
    assert!(
        e.settle(r1.id, &TokenMap::new(), t("2026-11-25T08:10:00Z"))
            .is_err()
    );
    assert_eq!(
        e.expire(t("2026-11-25T08:15:00Z"), Duration::from_secs(600)),
        1
    );
    assert_eq!(used(&e, "a", "daily", t("2026-11-25T08:15:00Z")), (0, 0));
    assert_eq!(e.reservations(), 0);
}

#[test]
fn model_rules_allow_and_deny_with_wildcards() {
    let e = Engine::new();
    e.set_models(
        &p("acme"),
        Some(vec!["qwen*".into(), "gpt-4o*".into()]),
        vec![],
    );
    e.set_models(&p("acme/cn"), None, vec!["*-preview".into()]);
    e.set_models(
        &p("acme/cn/hr"),
        Some(vec!["qwen-max".into(), "gpt-4o-mini".into()]),
        vec![],
    );
    let check = |acc: &str, model: &str| e.check_model(&p(acc), model);
    assert!(check("acme", "qwen-plus").is_ok());
    assert!(check("acme", "gpt-4o-preview").is_ok());
    assert!(check("acme/cn", "qwen-plus").is_ok());
    let r = check("acme/cn", "gpt-4o-preview").unwrap_err();
    assert_eq!(r.kind, RefusalKind::Model);
    assert_eq!(r.node, p("acme/cn"));
    assert_eq!(r.message, "model 'gpt-4o-preview' is denied on acme/cn");
    let r = check("acme/us", "deepseek-chat").unwrap_err();
    assert_eq!(r.message, "model 'deepseek-chat' is not allowed on acme");
    assert!(check("acme/cn/hr/x", "qwen-max").is_ok());
    let r = check("acme/cn/hr", "qwen-plus").unwrap_err();
    assert_eq!(r.node, p("acme/cn/hr"));
    assert!(check("other", "anything").is_ok());
    // Through admit, and nothing reserved.
    let mut req = Req::new("acme/us", "2026-11-25T08:00:00Z", 1, 1);
    req.model = "deepseek-chat";
    assert_eq!(req.admit(&e).unwrap_err().kind, RefusalKind::Model);
    assert_eq!(e.reservations(), 0);
    assert_eq!(
        e.models(&p("acme/cn")),
        (None, vec!["*-preview".to_string()])
    );
}

#[test]
fn load_used_restores_counters_silently() {
    let e = Engine::new();
    let mut spec = limit("a", "monthly", all_tokens(), 100, Period::Month);
    spec.thresholds = vec![50, 90];
    e.set_limit(spec).unwrap();
    let mut per_key = limit("a", "key-daily", all_tokens(), 10, Period::Day);
    per_key.scope = LimitScope::Key;
    e.set_limit(per_key).unwrap();
    let now = t("2026-11-25T08:00:00Z");
    e.load_used(
        &p("a"),
        "monthly",
        None,
        Some(t("2026-11-01T00:00:00Z")),
        60,
    )
    .unwrap();
    e.load_used(
        &p("a"),
        "key-daily",
        Some("k1"),
        Some(t("2026-11-25T00:00:00Z")),
        10,
    )
    .unwrap();
    assert!(matches!(
        e.load_used(&p("a"), "monthly", None, Some(t("2026-11-02T00:00:00Z")), 1),
        Err(BudgetError::BadLoad { .. })
    ));
    assert!(matches!(
        e.load_used(
            &p("a"),
            "key-daily",
            None,
            Some(t("2026-11-25T00:00:00Z")),
            1
        ),
        Err(BudgetError::BadLoad { .. })
    ));
    assert!(matches!(
        e.load_used(&p("a"), "nope", None, None, 1),
        Err(BudgetError::UnknownLimit { .. })
    ));
    assert_eq!(used(&e, "a", "monthly", now), (60, 0));
    let s = e.record(&p("a"), "k2", None, &toks(&[("text.input", 30)]), now);
    assert_eq!(s.crossings.len(), 1);
    assert_eq!(s.crossings[0].threshold, 90);
    let refusal = Req::new("a", "2026-11-25T08:00:00Z", 1, 0)
        .admit(&e)
        .unwrap_err();
    assert_eq!(refusal.limit.as_deref(), Some("key-daily"));
    // A window older than the current one is ignored.
    e.load_used(
        &p("a"),
        "monthly",
        None,
        Some(t("2026-10-01T00:00:00Z")),
        99,
    )
    .unwrap();
    assert_eq!(used(&e, "a", "monthly", now), (90, 0));
}

#[test]
fn replacing_a_limit_with_another_period_starts_over() {
    let e = Engine::new();
    e.set_limit(limit("a", "x", all_tokens(), 100, Period::Day))
        .unwrap();
    let now = "2026-11-25T08:00:00Z";
    let r = Req::new("a", now, 50, 0).admit(&e).unwrap();
    e.set_limit(limit("a", "x", all_tokens(), 100, Period::Month))
        .unwrap();
    assert_eq!(used(&e, "a", "x", t(now)), (0, 0));
    // The old reservation no longer applies to the new counter.
    e.settle(r.id, &toks(&[("text.input", 50)]), t(now))
        .unwrap();
    assert_eq!(used(&e, "a", "x", t(now)), (0, 0));
    assert!(e.clear_limit(&p("a"), "x"));
    assert!(!e.clear_limit(&p("a"), "x"));
    assert!(e.limits(&p("a")).is_empty());
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
}
