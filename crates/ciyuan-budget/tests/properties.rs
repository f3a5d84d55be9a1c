//! Random trees, limits and interleavings of admit / settle / release / expire / record
//! against a naive model that replays the log of usage from scratch.
//!
//! 1. With usage only through admit + settle (actual ≤ reserved), and corrections
//!    (negative counts) recorded in between, no hard limit's `used + reserved` ever
//!    exceeds its amount: a credit may give room, never more than it took away.
//! 2. Every counter equals the model's replay of the log (settled usage at its admission
//!    time, recorded usage and corrections at their time, signed) over the current
//!    window, and every counter's reserved equals the sum over live reservations;
//!    refusals name a limit that really does not fit; each threshold is reported
//!    exactly once per counter and window, once the counter has reached it.
//! 3. Once every reservation is settled, released or expired, nothing is reserved.
//! 4. An engine restored from each counter's net usage in its window (as after a
//!    restart) shows the same usage as the live one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ciyuan_budget::{
    Admission, Crossing, Engine, LimitScope, LimitSpec, Measure, Mode, Period, Selector, Settled,
    Subject,
};
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::jiff::{SignedDuration, Timestamp};
use ciyuan_core::{AccountPath, Direction, Modality, TokenMap};
use proptest::prelude::*;

// ---- generated inputs -------------------------------------------------------------

#[derive(Debug, Clone)]
struct GenLimit {
    node: Vec<u8>,
    measure: u8,
    amount: u64,
    period: u8,
    hard: bool,
    scope: u8,
    thresholds: Vec<u8>,
    tz: u8,
    clamp: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Admit {
        account: Vec<u8>,
        key: u8,
        session: Option<u8>,
        text_in: i64,
        image_in: i64,
        out: i64,
    },
    /// Settle the `which`-th live reservation using a fraction of what it reserved.
    Settle {
        which: usize,
        frac_in: i64,
        frac_out: i64,
    },
    Release {
        which: usize,
    },
    Expire {
        ttl: u64,
    },
    Record {
        account: Vec<u8>,
        key: u8,
        session: Option<u8>,
        text_in: i64,
        text_out: i64,
    },
    Advance {
        secs: i64,
    },
}

fn path_strategy(min: usize, max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..2, min..=max)
}

fn limit_strategy() -> impl Strategy<Value = GenLimit> {
    (
        path_strategy(0, 4),
        0u8..5,
        prop_oneof![0u64..5, 0u64..400, 100u64..3000],
        0u8..5,
        any::<bool>(),
        0u8..4,
        prop::collection::vec(
            prop_oneof![Just(50u8), Just(80u8), Just(100u8), 1u8..=150],
            0..4,
        ),
        0u8..3,
        any::<bool>(),
    )
        .prop_map(
            |(node, measure, amount, period, hard, scope, thresholds, tz, clamp)| GenLimit {
                node,
                measure,
                amount,
                period,
                hard,
                scope,
                thresholds,
                tz,
                clamp,
            },
        )
}

/// What `Op::Record` may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Records {
    /// No records: usage only through admit + settle.
    None,
    /// Corrections only: counts of zero or below.
    Corrections,
    /// Usage and corrections.
    Signed,
}

fn op_strategy(records: Records) -> impl Strategy<Value = Op> {
    let admit = (
        path_strategy(1, 5),
        0u8..3,
        prop::option::of(0u8..3),
        0i64..120,
        prop_oneof![Just(0i64), 0i64..40],
        0i64..200,
    )
        .prop_map(
            |(account, key, session, text_in, image_in, out)| Op::Admit {
                account,
                key,
                session,
                text_in,
                image_in,
                out,
            },
        );
    let settle = (any::<usize>(), 0i64..=100, 0i64..=100).prop_map(|(which, frac_in, frac_out)| {
        Op::Settle {
            which,
            frac_in,
            frac_out,
        }
    });
    let release = any::<usize>().prop_map(|which| Op::Release { which });
    let expire = prop_oneof![0u64..120, 0u64..20_000].prop_map(|ttl| Op::Expire { ttl });
    let (low, high) = match records {
        Records::Corrections => (-150i64, 1i64),
        _ => (-150i64, 150i64),
    };
    let record = (
        path_strategy(1, 5),
        0u8..3,
        prop::option::of(0u8..3),
        prop_oneof![2 => 0i64..150, 1 => low..high].prop_map(move |n| n.min(high - 1)),
        prop_oneof![2 => 0i64..150, 1 => low..high].prop_map(move |n| n.min(high - 1)),
    )
        .prop_map(|(account, key, session, text_in, text_out)| Op::Record {
            account,
            key,
            session,
            text_in,
            text_out,
        });
    let advance =
        prop_oneof![0i64..90, 0i64..4000, 20_000i64..200_000].prop_map(|secs| Op::Advance { secs });
    let record_weight = if records == Records::None { 0 } else { 2 };
    prop_oneof![
        6 => admit,
        4 => settle,
        1 => release,
        1 => expire,
        record_weight => record,
        3 => advance,
    ]
}

// ---- building specs ---------------------------------------------------------------

fn path(segs: &[u8]) -> AccountPath {
    if segs.is_empty() {
        return AccountPath::root();
    }
    let s: Vec<&str> = segs
        .iter()
        .map(|&b| if b == 0 { "a" } else { "b" })
        .collect();
    s.join("/").parse().unwrap()
}

fn tz(i: u8) -> TimeZone {
    match i {
        0 => TimeZone::UTC,
        1 => TimeZone::get("Asia/Shanghai").unwrap(),
        _ => TimeZone::get("America/New_York").unwrap(),
    }
}

fn spec(i: usize, g: &GenLimit) -> LimitSpec {
    let measure = match g.measure {
        0 => Measure::Tokens(Selector::ALL),
        1 => Measure::Tokens(Selector {
            modality: Some(Modality::Text),
            direction: Some(Direction::Output),
        }),
        2 => Measure::Tokens(Selector {
            modality: None,
            direction: Some(Direction::Input),
        }),
        3 => Measure::Tokens(Selector {
            modality: Some(Modality::Image),
            direction: None,
        }),
        _ => Measure::Requests,
    };
    let period = match g.period {
        0 => Period::Minute,
        1 => Period::Hour,
        2 => Period::Day,
        3 => Period::Month,
        _ => Period::Lifetime,
    };
    let scope = match g.scope {
        0 => LimitScope::Node,
        1 => LimitScope::Session,
        2 => LimitScope::Key,
        _ => LimitScope::Request,
    };
    let mut s = LimitSpec::new(path(&g.node), format!("l{i}"), measure, g.amount, period);
    s.scope = scope;
    if scope == LimitScope::Request && measure == Measure::Requests {
        s.measure = Measure::Tokens(Selector::ALL);
    }
    s.mode = if g.hard { Mode::Hard } else { Mode::Soft };
    s.thresholds = g.thresholds.clone();
    s.time_zone = tz(g.tz);
    s.clamp = g.clamp && scope == LimitScope::Request && g.hard;
    s
}

// ---- the naive model ---------------------------------------------------------------

/// Window start of `period` at `at`, computed independently of the engine.
fn window_start(s: &LimitSpec, at: Timestamp) -> Option<Timestamp> {
    match s.period {
        Period::Lifetime => None,
        Period::Minute => Some(Timestamp::from_second(at.as_second().div_euclid(60) * 60).unwrap()),
        Period::Hour => {
            Some(Timestamp::from_second(at.as_second().div_euclid(3600) * 3600).unwrap())
        }
        Period::Day => Some(
            at.to_zoned(s.time_zone.clone())
                .start_of_day()
                .unwrap()
                .timestamp(),
        ),
        Period::Month => Some(
            at.to_zoned(s.time_zone.clone())
                .first_of_month()
                .unwrap()
                .start_of_day()
                .unwrap()
                .timestamp(),
        ),
    }
}

/// Selected tokens, signed: a correction counts negatively.
fn count(sel: &Selector, m: &TokenMap) -> i128 {
    m.iter()
        .filter(|t| {
            sel.modality.is_none_or(|x| x == t.modality)
                && sel.direction.is_none_or(|x| x == t.direction)
        })
        .map(|t| i128::from(t.count))
        .sum()
}

#[derive(Debug, Clone)]
struct Usage {
    account: AccountPath,
    key: String,
    session: Option<String>,
    tokens: TokenMap,
    at: Timestamp,
}

#[derive(Debug, Clone)]
struct Live {
    id: u64,
    account: AccountPath,
    key: String,
    session: Option<String>,
    at: Timestamp,
    input: TokenMap,
    max_output: TokenMap,
    cap: Option<u64>,
}

/// The subject of `s` for a request, or `None` if `s` does not apply to it.
fn subject_of(
    s: &LimitSpec,
    account: &AccountPath,
    key: &str,
    session: Option<&str>,
) -> Option<Subject> {
    if !account.is_within(&s.node) {
        return None;
    }
    match s.scope {
        LimitScope::Node => Some(Subject::Node),
        LimitScope::Session => session.map(|x| Subject::Session(x.to_string())),
        LimitScope::Key => Some(Subject::Key(key.to_string())),
        LimitScope::Request => Some(Subject::Request),
    }
}

fn need(s: &LimitSpec, input: &TokenMap, max_output: &TokenMap, cap: Option<u64>) -> i128 {
    match s.measure {
        Measure::Requests => 1,
        Measure::Tokens(sel) => {
            let out = count(&sel, max_output);
            count(&sel, input) + cap.map_or(out, |c| out.min(i128::from(c)))
        }
        Measure::Cost(_) => unreachable!("these properties generate no cost limits"),
    }
}

fn actual(s: &LimitSpec, tokens: &TokenMap) -> i128 {
    match s.measure {
        Measure::Requests => 1,
        Measure::Tokens(sel) => count(&sel, tokens),
        Measure::Cost(_) => unreachable!("these properties generate no cost limits"),
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Replayed {
    used: i128,
    reserved: u64,
    peak: i128,
}

struct Model {
    limits: Vec<LimitSpec>,
    log: Vec<Usage>,
    live: Vec<Live>,
    now: Timestamp,
}

impl Model {
    fn same_window(&self, s: &LimitSpec, at: Timestamp) -> bool {
        window_start(s, at) == window_start(s, self.now)
    }

    /// (used, reserved) per subject of a counter limit, over the current window.
    fn counters(&self, s: &LimitSpec) -> BTreeMap<Subject, (i128, u64)> {
        self.replay(s)
            .into_iter()
            .map(|(sub, c)| (sub, (c.used, c.reserved)))
            .filter(|(_, v)| *v != (0, 0))
            .collect()
    }

    /// Each subject's counter of a counter limit over the current window: usage in
    /// log order, so `peak` is the highest the counter has been.
    fn replay(&self, s: &LimitSpec) -> BTreeMap<Subject, Replayed> {
        let mut out: BTreeMap<Subject, Replayed> = BTreeMap::new();
        for u in &self.log {
            if let Some(sub) = subject_of(s, &u.account, &u.key, u.session.as_deref())
                && self.same_window(s, u.at)
            {
                let c = out.entry(sub).or_default();
                c.used += actual(s, &u.tokens);
                c.peak = c.peak.max(c.used);
            }
        }
        for r in &self.live {
            if let Some(sub) = subject_of(s, &r.account, &r.key, r.session.as_deref())
                && self.same_window(s, r.at)
            {
                let n = need(s, &r.input, &r.max_output, r.cap);
                out.entry(sub).or_default().reserved += u64::try_from(n).unwrap();
            }
        }
        out
    }

    /// The output cap clamp limits give this request, or `Err` if one refuses outright.
    fn cap(
        &self,
        account: &AccountPath,
        input: &TokenMap,
        max_output: &TokenMap,
    ) -> Result<Option<u64>, ()> {
        let mut cap = None;
        for s in &self.limits {
            if !(s.clamp && account.is_within(&s.node)) {
                continue;
            }
            let Measure::Tokens(sel) = s.measure else {
                continue;
            };
            let (i, o) = (count(&sel, input), count(&sel, max_output));
            let amount = i128::from(s.amount);
            if i + o <= amount {
                continue;
            }
            if o > 0 && i < amount {
                let room = u64::try_from(amount - i).unwrap();
                cap = Some(cap.map_or(room, |c: u64| c.min(room)));
            } else {
                return Err(());
            }
        }
        Ok(cap)
    }
}

fn thresholds_reached(s: &LimitSpec, used: i128) -> BTreeSet<u8> {
    s.thresholds
        .iter()
        .copied()
        .filter(|&t| used > 0 && used * 100 >= i128::from(s.amount) * i128::from(t))
        .collect()
}

type CrossingKey = (AccountPath, String, Subject, Option<Timestamp>, u8);

fn note(crossings: &mut BTreeMap<CrossingKey, u32>, s: &Settled) {
    for c in &s.crossings {
        let Crossing {
            node,
            limit,
            subject,
            window_start,
            threshold,
            ..
        } = c.clone();
        if subject != Subject::Request {
            *crossings
                .entry((node, limit, subject, window_start, threshold))
                .or_default() += 1;
        }
    }
}

fn run(limits: Vec<GenLimit>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let engine = Engine::new();
    let start: Timestamp = "2026-11-30T14:00:00Z".parse().unwrap();
    let mut model = Model {
        limits: Vec::new(),
        log: Vec::new(),
        live: Vec::new(),
        now: start,
    };
    for (i, g) in limits.iter().enumerate() {
        let s = spec(i, g);
        engine.set_limit(s.clone()).unwrap();
        model.limits.push(
            engine
                .limits(&s.node)
                .into_iter()
                .find(|x| x.name == s.name)
                .unwrap(),
        );
    }
    // Usage only through admit + settle; corrections may lower the counters. A
    // record, even a correction, still counts one request.
    let only_admitted = !ops.iter().any(
        |o| matches!(o, Op::Record { text_in, text_out, .. } if *text_in > 0 || *text_out > 0),
    );
    let records = ops.iter().any(|o| matches!(o, Op::Record { .. }));
    let admitted_only =
        |s: &LimitSpec| only_admitted && !(records && s.measure == Measure::Requests);
    let mut crossings: BTreeMap<CrossingKey, u32> = BTreeMap::new();

    for op in ops {
        match op {
            Op::Admit {
                account,
                key,
                session,
                text_in,
                image_in,
                out,
            } => {
                let account = path(&account);
                let key = format!("k{key}");
                let session = session.map(|s| format!("s{s}"));
                let mut input = TokenMap::new();
                input
                    .add(Modality::Text, Direction::Input, text_in)
                    .unwrap();
                if image_in > 0 {
                    input
                        .add(Modality::Image, Direction::Input, image_in)
                        .unwrap();
                }
                let mut max_output = TokenMap::new();
                max_output
                    .add(Modality::Text, Direction::Output, out)
                    .unwrap();
                let res = engine.admit(&Admission {
                    account: &account,
                    key_id: &key,
                    session: session.as_deref(),
                    model: "m",
                    now: model.now,
                    input: &input,
                    max_output: &max_output,
                    max_cost: None,
                });
                let cap = model.cap(&account, &input, &max_output);
                match res {
                    Ok(r) => {
                        prop_assert_eq!(Ok(r.output_cap), cap);
                        model.live.push(Live {
                            id: r.id,
                            account,
                            key,
                            session,
                            at: model.now,
                            input,
                            max_output,
                            cap: r.output_cap,
                        });
                    }
                    Err(refusal) => {
                        // The refusing limit really does not fit.
                        let name = refusal.limit.clone().unwrap();
                        let s = model
                            .limits
                            .iter()
                            .find(|s| s.node == refusal.node && s.name == name)
                            .unwrap()
                            .clone();
                        prop_assert_eq!(s.mode, Mode::Hard);
                        if s.scope == LimitScope::Request {
                            let fits = match cap {
                                Err(()) => false,
                                Ok(cap) => {
                                    need(&s, &input, &max_output, cap) <= i128::from(s.amount)
                                }
                            };
                            prop_assert!(!fits, "{}", refusal.message);
                        } else {
                            let cap = cap.unwrap();
                            let sub = subject_of(&s, &account, &key, session.as_deref()).unwrap();
                            let (u, r) = model.counters(&s).get(&sub).copied().unwrap_or((0, 0));
                            prop_assert!(
                                u + i128::from(r) + need(&s, &input, &max_output, cap)
                                    > i128::from(s.amount),
                                "{}",
                                refusal.message
                            );
                        }
                    }
                }
            }
            Op::Settle {
                which,
                frac_in,
                frac_out,
            } => {
                if model.live.is_empty() {
                    continue;
                }
                let r = model.live.remove(which % model.live.len());
                let mut tokens = TokenMap::new();
                for t in r.input.iter() {
                    tokens
                        .add(t.modality, t.direction, t.count * frac_in / 100)
                        .unwrap();
                }
                for t in r.max_output.iter() {
                    let mut n = t.count * frac_out / 100;
                    if let Some(c) = r.cap {
                        n = n.min(i64::try_from(c).unwrap());
                    }
                    tokens.add(t.modality, t.direction, n).unwrap();
                }
                let s = engine.settle(r.id, &tokens, model.now).unwrap();
                note(&mut crossings, &s);
                for (node, name) in &s.exceeded {
                    let spec = model
                        .limits
                        .iter()
                        .find(|l| &l.node == node && &l.name == name);
                    prop_assert!(!admitted_only(spec.unwrap()), "{} on {}", name, node);
                }
                model.log.push(Usage {
                    account: r.account,
                    key: r.key,
                    session: r.session,
                    tokens,
                    at: r.at,
                });
            }
            Op::Release { which } => {
                if model.live.is_empty() {
                    prop_assert!(!engine.release(u64::MAX));
                    continue;
                }
                let r = model.live.remove(which % model.live.len());
                prop_assert!(engine.release(r.id));
            }
            Op::Expire { ttl } => {
                let ttl_d = SignedDuration::from_secs(ttl as i64);
                let now = model.now;
                let before = model.live.len();
                model.live.retain(|r| now.duration_since(r.at) < ttl_d);
                let n = engine.expire(now, Duration::from_secs(ttl));
                prop_assert_eq!(n, before - model.live.len());
            }
            Op::Record {
                account,
                key,
                session,
                text_in,
                text_out,
            } => {
                let account = path(&account);
                let key = format!("k{key}");
                let session = session.map(|s| format!("s{s}"));
                let mut tokens = TokenMap::new();
                tokens
                    .add(Modality::Text, Direction::Input, text_in)
                    .unwrap();
                tokens
                    .add(Modality::Text, Direction::Output, text_out)
                    .unwrap();
                let s = engine.record(&account, &key, session.as_deref(), &tokens, model.now);
                note(&mut crossings, &s);
                model.log.push(Usage {
                    account,
                    key,
                    session,
                    tokens,
                    at: model.now,
                });
            }
            Op::Advance { secs } => {
                model.now = model
                    .now
                    .checked_add(SignedDuration::from_secs(secs))
                    .unwrap();
            }
        }

        // Compare every counter with the model.
        for s in &model.limits {
            if s.scope == LimitScope::Request {
                continue;
            }
            let rows = engine.status(&s.node, model.now);
            let got: BTreeMap<Subject, (i128, u64)> = rows
                .iter()
                .filter(|r| r.spec.name == s.name)
                .map(|r| (r.subject.clone(), (r.used, r.reserved)))
                .filter(|(_, v)| *v != (0, 0))
                .collect();
            let want = model.counters(s);
            prop_assert_eq!(&got, &want, "limit {} on {}", s.name, s.node);
            for (sub, c) in &model.replay(s) {
                let (used, reserved) = (c.used, c.reserved);
                if admitted_only(s) && s.mode == Mode::Hard {
                    prop_assert!(
                        used + i128::from(reserved) <= i128::from(s.amount),
                        "{} {:?}: {} + {} > {}",
                        s.name,
                        sub,
                        used,
                        reserved,
                        s.amount
                    );
                }
                let ws = window_start(s, model.now);
                let reported: BTreeSet<u8> = crossings
                    .iter()
                    .filter(|((n, l, su, w, _), _)| {
                        n == &s.node && l == &s.name && su == sub && *w == ws
                    })
                    .map(|((.., t), _)| *t)
                    .collect();
                prop_assert_eq!(
                    reported,
                    thresholds_reached(s, c.peak),
                    "{} {:?}",
                    s.name,
                    sub
                );
            }
        }
        prop_assert_eq!(engine.reservations(), model.live.len());
    }

    for (k, n) in &crossings {
        prop_assert_eq!(*n, 1, "crossing reported more than once: {:?}", k);
    }

    // A restart restores the same counters: each counter's net usage over its window,
    // as the model replays it, loaded into a fresh engine.
    let restored = Engine::new();
    for s in &model.limits {
        restored.set_limit(s.clone()).unwrap();
        if s.scope == LimitScope::Request {
            continue;
        }
        for (sub, c) in model.replay(s) {
            let subject = match &sub {
                Subject::Session(x) | Subject::Key(x) => Some(x.as_str()),
                _ => None,
            };
            let window = window_start(s, model.now);
            restored
                .load_used(&s.node, &s.name, subject, window, c.used)
                .unwrap();
        }
    }
    for s in &model.limits {
        let used = |e: &Engine| -> BTreeMap<Subject, i128> {
            e.status(&s.node, model.now)
                .into_iter()
                .filter(|r| r.spec.name == s.name && r.used != 0)
                .map(|r| (r.subject, r.used))
                .collect()
        };
        prop_assert_eq!(
            used(&engine),
            used(&restored),
            "limit {} on {}",
            s.name,
            s.node
        );
    }

    // Everything settled or released: nothing reserved anywhere.
    for (i, r) in model.live.drain(..).enumerate() {
        if i % 2 == 0 {
            prop_assert!(engine.release(r.id));
        } else {
            engine.settle(r.id, &TokenMap::new(), model.now).unwrap();
        }
    }
    prop_assert_eq!(engine.reservations(), 0);
    for s in &model.limits {
        for row in engine.status(&s.node, model.now) {
            prop_assert_eq!(row.reserved, 0);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn admitted_usage_never_exceeds_hard_limits(
        limits in prop::collection::vec(limit_strategy(), 1..8),
        ops in prop::collection::vec(op_strategy(Records::None), 1..150),
    ) {
        run(limits, ops)?;
    }

    #[test]
    fn corrections_never_let_admitted_usage_exceed_hard_limits(
        limits in prop::collection::vec(limit_strategy(), 1..8),
        ops in prop::collection::vec(op_strategy(Records::Corrections), 1..150),
    ) {
        run(limits, ops)?;
    }

    #[test]
    fn counters_equal_a_replay_of_the_log(
        limits in prop::collection::vec(limit_strategy(), 1..8),
        ops in prop::collection::vec(op_strategy(Records::Signed), 1..150),
    ) {
        run(limits, ops)?;
    }
}
