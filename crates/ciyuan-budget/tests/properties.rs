//! Random trees, limits and interleavings of admit / settle / release / expire / record
//! against a naive model that replays the log of usage from scratch.
//!
//! 1. With usage only through admit + settle (actual ≤ reserved), no hard limit's
//!    `used + reserved` ever exceeds its amount.
//! 2. Every counter equals the model's replay of the log (settled usage at its admission
//!    time, recorded usage at its time) over the current window, and every counter's
//!    reserved equals the sum over live reservations; refusals name a limit that really
//!    does not fit; each threshold is reported exactly once per counter and window.
//! 3. Once every reservation is settled, released or expired, nothing is reserved.
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

fn op_strategy(with_record: bool) -> impl Strategy<Value = Op> {
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
    let record = (
        path_strategy(1, 5),
        0u8..3,
        prop::option::of(0u8..3),
        0i64..150,
        0i64..150,
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
    let record_weight = if with_record { 2 } else { 0 };
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

fn count(sel: &Selector, m: &TokenMap) -> u64 {
    m.iter()
        .filter(|t| {
            sel.modality.is_none_or(|x| x == t.modality)
                && sel.direction.is_none_or(|x| x == t.direction)
        })
        .map(|t| t.count.max(0) as u64)
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

fn need(s: &LimitSpec, input: &TokenMap, max_output: &TokenMap, cap: Option<u64>) -> u64 {
    match s.measure {
        Measure::Requests => 1,
        Measure::Tokens(sel) => {
            let out = count(&sel, max_output);
            count(&sel, input) + cap.map_or(out, |c| out.min(c))
        }
    }
}

fn actual(s: &LimitSpec, tokens: &TokenMap) -> u64 {
    match s.measure {
        Measure::Requests => 1,
        Measure::Tokens(sel) => count(&sel, tokens),
    }
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
    fn counters(&self, s: &LimitSpec) -> BTreeMap<Subject, (u64, u64)> {
        let mut out: BTreeMap<Subject, (u64, u64)> = BTreeMap::new();
        for u in &self.log {
            if let Some(sub) = subject_of(s, &u.account, &u.key, u.session.as_deref())
                && self.same_window(s, u.at)
            {
                out.entry(sub).or_default().0 += actual(s, &u.tokens);
            }
        }
        for r in &self.live {
            if let Some(sub) = subject_of(s, &r.account, &r.key, r.session.as_deref())
                && self.same_window(s, r.at)
            {
                out.entry(sub).or_default().1 += need(s, &r.input, &r.max_output, r.cap);
            }
        }
        out.retain(|_, v| *v != (0, 0));
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
            if i + o <= s.amount {
                continue;
            }
            if o > 0 && i < s.amount {
                let room = s.amount - i;
                cap = Some(cap.map_or(room, |c: u64| c.min(room)));
            } else {
                return Err(());
            }
        }
        Ok(cap)
    }
}

fn thresholds_reached(s: &LimitSpec, used: u64) -> BTreeSet<u8> {
    s.thresholds
        .iter()
        .copied()
        .filter(|&t| used > 0 && u128::from(used) * 100 >= u128::from(s.amount) * u128::from(t))
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
    let only_admitted = !ops.iter().any(|o| matches!(o, Op::Record { .. }));
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
                                Ok(cap) => need(&s, &input, &max_output, cap) <= s.amount,
                            };
                            prop_assert!(!fits, "{}", refusal.message);
                        } else {
                            let cap = cap.unwrap();
                            let sub = subject_of(&s, &account, &key, session.as_deref()).unwrap();
                            let (u, r) = model.counters(&s).get(&sub).copied().unwrap_or((0, 0));
                            prop_assert!(
                                u + r + need(&s, &input, &max_output, cap) > s.amount,
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
                        n = n.min(c as i64);
                    }
                    tokens.add(t.modality, t.direction, n).unwrap();
                }
                let s = engine.settle(r.id, &tokens, model.now).unwrap();
                note(&mut crossings, &s);
                if only_admitted {
                    prop_assert!(s.exceeded.is_empty(), "{:?}", s.exceeded);
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
            let got: BTreeMap<Subject, (u64, u64)> = rows
                .iter()
                .filter(|r| r.spec.name == s.name)
                .map(|r| (r.subject.clone(), (r.used, r.reserved)))
                .filter(|(_, v)| *v != (0, 0))
                .collect();
            let want = model.counters(s);
            prop_assert_eq!(&got, &want, "limit {} on {}", s.name, s.node);
            for (sub, (used, reserved)) in &want {
                if only_admitted && s.mode == Mode::Hard {
                    prop_assert!(
                        used + reserved <= s.amount,
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
                    thresholds_reached(s, *used),
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
        ops in prop::collection::vec(op_strategy(false), 1..150),
    ) {
        run(limits, ops)?;
    }

    #[test]
    fn counters_equal_a_replay_of_the_log(
        limits in prop::collection::vec(limit_strategy(), 1..8),
        ops in prop::collection::vec(op_strategy(true), 1..150),
    ) {
        run(limits, ops)?;
    }
}
