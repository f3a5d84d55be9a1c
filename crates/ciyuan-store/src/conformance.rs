//! The behaviour every backend must show, as one suite each backend runs against itself
//! (`cargo test -p ciyuan-store-sqlite`, and the PostgreSQL backend the same way). The
//! [`Store`] suite is [`run_all`]; the [`crate::Log`] suite is [`log::run_all`].

pub mod log;
mod pages;

use crate::{HourFilter, KeyRecord, Store, StoreError};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountInfo, AccountPath, Adjustment, Direction, Entry, EntryBody, Modality, Scopes, TokenMap,
    Usage,
};

/// The value of a call that must succeed. A check that swallowed the error (into an
/// empty list, the root account, the epoch) would pass against a backend that fails,
/// so a failure fails the suite, naming the call.
#[track_caller]
#[allow(clippy::panic)] // a conformance check fails the way a test does
pub(crate) fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, call: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{call} failed: {e:?}"),
    }
}

#[track_caller]
fn path(s: &str) -> AccountPath {
    ok(
        AccountPath::parse(s),
        &format!("parsing account path {s:?}"),
    )
}

#[track_caller]
fn ts(s: &str) -> Timestamp {
    ok(s.parse(), &format!("parsing timestamp {s:?}"))
}

fn usage(account: &str, at: &str, model: &str, input: i64) -> Entry {
    let mut tokens = TokenMap::new();
    let added = tokens.add(Modality::Text, Direction::Input, input);
    ok(added.ok_or("overflow"), "TokenMap::add");
    Entry::new(
        ts(at),
        path(account),
        EntryBody::Usage(Usage {
            service: "llm.chat".into(),
            model: Some(model.into()),
            tokens,
            ..Usage::default()
        }),
    )
}

fn created(account: &str) -> Entry {
    Entry::new(
        ts("2026-01-01T00:00:00Z"),
        path(account),
        EntryBody::AccountCreated(AccountInfo::default()),
    )
}

/// Every billing line of `filter`, read a page of `limit` at a time.
fn all_pages(s: &dyn Store, filter: &HourFilter, limit: usize) -> Vec<crate::LineRow> {
    let mut paged = Vec::new();
    let mut after: Option<crate::LineRow> = None;
    loop {
        let page = ok(
            s.cost_lines_page(filter, after.as_ref(), limit),
            "cost_lines_page()",
        );
        match page.last() {
            Some(last) => after = Some(last.clone()),
            None => break,
        }
        paged.extend(page);
    }
    paged
}

/// A billing line's place in the order the `Store` contract lists lines: node, hour,
/// service and model, then usage before adjustments, then key, price, currency, book
/// and version.
type LinePlace = (
    (String, i64, String, String),
    (bool, String, String),
    (String, String, u32),
);

fn line_place(l: &crate::LineRow) -> LinePlace {
    (
        (
            l.account.as_str().to_string(),
            l.hour,
            l.service.clone(),
            l.model.clone(),
        ),
        (
            l.adjustment,
            l.key.clone(),
            l.unit_price.map(|p| p.to_string()).unwrap_or_default(),
        ),
        (l.currency.as_str().to_string(), l.book.clone(), l.version),
    )
}

/// Runs every check against fresh stores made by `make`.
pub fn run_all(make: &dyn Fn() -> Box<dyn Store>) {
    projections_apply_in_order(make().as_ref());
    projections_apply_in_parts(make().as_ref());
    accounts_and_subtrees(make().as_ref());
    keys_lifecycle(make().as_ref());
    sessions_lifecycle(make().as_ref());
    pages::accounts_page_by_cursor(make().as_ref());
    pages::keys_page_by_cursor(make().as_ref());
    usage_rollups_and_reset(make().as_ref());
    ingest_index(make().as_ref());
    budgets_access_flags_and_incidents(make().as_ref());
    regression_token_sums_past_i64_stay_exact(make().as_ref());
    definitions_keep_the_first_word_on_a_version(make().as_ref());
    money_books_contracts_postings_and_exact_costs(make().as_ref());
    service_levels_quality_hours_and_credit_lines(make().as_ref());
    report_progress_is_the_latest_scheduled_period(make().as_ref());
    subtree_rollups_equal_the_exact_rows(make().as_ref());
    tag_rollups_by_tag_set(make().as_ref());
    subject_rollups_by_key_and_session(make().as_ref());
    responses_by_id_first_kept(make().as_ref());
}

/// Answers kept by providers are found by id with the account and upstream of the
/// entry that first named them; usage without one (or with quality but no id) names
/// none; a reset clears them and the log brings them back.
fn responses_by_id_first_kept(s: &dyn Store) {
    let answered = |account: &str, at: &str, upstream: &str, id: Option<&str>| {
        let mut e = usage(account, at, "gpt-4o", 3);
        if let EntryBody::Usage(u) = &mut e.body {
            u.quality = Some(Box::new(ciyuan_core::Quality {
                upstream: upstream.into(),
                status: 200,
                response_id: id.map(Into::into),
                ..Default::default()
            }));
        }
        e
    };
    let entries = [
        created("acme"),
        answered("acme/cn", "2026-11-24T15:10:00Z", "openai", Some("resp_1")),
        usage("acme/cn", "2026-11-24T15:11:00Z", "gpt-4o", 1),
        answered("acme/us", "2026-11-24T15:12:00Z", "azure", None),
        // The same id again (a provider's mistake, or a replayed log): the first stays.
        answered("acme/us", "2026-11-24T15:13:00Z", "azure", Some("resp_1")),
        answered(
            "acme/us",
            "2026-11-24T15:14:00Z",
            "azure",
            Some("resp_'2\""),
        ),
    ];
    ok(s.apply(0, &entries[..3]), "apply");
    ok(s.apply(3, &entries[3..]), "apply");
    let check = |s: &dyn Store| {
        let one = ok(
            ok(s.response("resp_1"), "response").ok_or("none"),
            "resp_1 projected",
        );
        assert_eq!(
            (one.entry, one.account.as_str(), one.body.as_str()),
            (1, "acme/cn", "openai")
        );
        assert_eq!(one.ts, ts("2026-11-24T15:10:00Z"));
        let two = ok(
            ok(s.response("resp_'2\""), "response").ok_or("none"),
            "an id with quotes projected",
        );
        assert_eq!(
            (two.entry, two.account.as_str(), two.body.as_str()),
            (5, "acme/us", "azure")
        );
        assert!(ok(s.response("resp_3"), "response").is_none());
        assert!(ok(s.response(""), "response").is_none());
    };
    check(s);
    ok(s.reset_projections(), "reset_projections");
    assert!(ok(s.response("resp_1"), "response").is_none());
    ok(s.apply(0, &entries), "apply");
    check(s);
}

/// What each API key and session consumed, summed over a subtree and range: a session
/// spanning nodes, requests the provider refused and usage naming neither left out,
/// re-ratings not counted (the budget engine counts none live), a session holding the
/// rows' separator, and the same sums after the projections are rebuilt.
fn subject_rollups_by_key_and_session(s: &dyn Store) {
    use crate::subjects::Subject;
    use ciyuan_core::{Currency, Rating};
    use std::collections::BTreeMap;
    let cny: Currency = ok("CNY".parse(), "currency");
    let rating = |amount: i64| Rating::new(rust_decimal::Decimal::new(amount, 4), cny, "list", 1);
    let request = |account: &str,
                   at: &str,
                   input: i64,
                   key: Option<&str>,
                   session: Option<&str>,
                   status: u16| {
        let mut e = usage(account, at, "gpt-4o", input);
        if let EntryBody::Usage(u) = &mut e.body {
            u.key = key.map(String::from);
            u.session = session.map(String::from);
            u.rating = Some(Box::new(rating(input)));
            u.quality = Some(Box::new(ciyuan_core::Quality {
                upstream: "sim".into(),
                status,
                latency_us: 5,
                ..Default::default()
            }));
        }
        e
    };
    let odd = "a\u{1f}b";
    let entries = [
        created("acme"),
        request(
            "acme/cn",
            "2026-11-24T15:10:00Z",
            10,
            Some("k1"),
            Some("s1"),
            200,
        ),
        request("acme/cn", "2026-11-24T15:50:00Z", 5, Some("k1"), None, 200),
        request(
            "acme/cn/x",
            "2026-11-24T15:20:00Z",
            7,
            Some("k2"),
            Some("s1"),
            201,
        ),
        request(
            "acme/us",
            "2026-11-24T16:05:00Z",
            3,
            Some("k3"),
            Some(odd),
            200,
        ),
        // Refused by the provider: consumed nothing.
        request(
            "acme/cn",
            "2026-11-24T15:30:00Z",
            900,
            Some("k1"),
            Some("s1"),
            429,
        ),
        // Neither key nor session (an ingested event).
        usage("acme/cn", "2026-11-24T15:40:00Z", "gpt-4o", 1000),
        // Outside the subtree asked about.
        request(
            "beta",
            "2026-11-24T15:00:00Z",
            99,
            Some("k9"),
            Some("s1"),
            200,
        ),
    ];
    ok(s.apply(0, &entries), "apply");
    let EntryBody::Usage(first) = &entries[1].body else {
        unreachable!("entry 1 is a usage entry")
    };
    let correction = Entry::new(
        ts("2026-11-30T00:00:00Z"),
        path("acme/cn"),
        EntryBody::RatingCorrection(ciyuan_core::RatingCorrection {
            entry: 1,
            at: ts("2026-11-24T15:10:00Z"),
            usage: Box::new(first.clone()),
            previous: Box::new(rating(10)),
            rating: Box::new(rating(1010)),
        }),
    );
    ok(
        s.apply(entries.len() as u64, &[correction]),
        "apply (re-rating)",
    );
    type Sums = BTreeMap<Subject, (i128, ciyuan_core::ExactSum)>;
    let read = |s: &dyn Store, account: &str, from: Option<&str>| -> Sums {
        let filter = HourFilter {
            account: path(account),
            from_hour: from.map(|t| ts(t).as_second()),
            to_hour: None,
        };
        let mut sums = Sums::new();
        for (who, r) in ok(s.subject_usage(&filter), "subject_usage") {
            assert_eq!(
                (r.service.as_str(), r.model.as_str()),
                ("llm.chat", "gpt-4o")
            );
            sums.entry(who).or_default().0 += r.tokens;
        }
        for (who, r) in ok(s.subject_cost(&filter), "subject_cost") {
            assert_eq!(r.currency, cny);
            let slot = &mut sums.entry(who).or_default().1;
            *slot = ok(slot.checked_add(r.amount).ok_or("overflow"), "cost sum");
        }
        sums
    };
    let want = |rows: &[(Subject, i128)]| -> Sums {
        rows.iter()
            .map(|(w, n)| {
                (
                    w.clone(),
                    (
                        *n,
                        ciyuan_core::ExactSum::of(rust_decimal::Decimal::new(*n as i64, 4)),
                    ),
                )
            })
            .collect()
    };
    let key = |k: &str| Subject::Key(k.into());
    let session = |k: &str| Subject::Session(k.into());
    let all = want(&[
        (key("k1"), 15),
        (key("k2"), 7),
        (key("k3"), 3),
        (session("s1"), 17),
        (session(odd), 3),
    ]);
    assert_eq!(read(s, "acme", None), all);
    assert_eq!(
        read(s, "acme/cn", None),
        want(&[(key("k1"), 15), (key("k2"), 7), (session("s1"), 17)])
    );
    assert_eq!(
        read(s, "acme", Some("2026-11-24T16:00:00Z")),
        want(&[(key("k3"), 3), (session(odd), 3)])
    );
    // A session spanning nodes is one row per node.
    let filter = HourFilter {
        account: path("acme"),
        from_hour: None,
        to_hour: None,
    };
    let s1_rows = ok(s.subject_usage(&filter), "subject_usage")
        .into_iter()
        .filter(|(w, _)| *w == session("s1"))
        .count();
    assert_eq!(s1_rows, 2);
    // Rebuilt from the log: the same sums.
    ok(s.reset_projections(), "reset_projections");
    assert!(read(s, "acme", None).is_empty());
    ok(s.apply(0, &entries), "apply");
    assert_eq!(read(s, "acme", None), all);
}

/// Tagged usage is kept by whole tag set, exactly: tokens and costs of a subtree and
/// range, re-ratings moving a tagged entry's cost, untagged usage absent, and the
/// same rows after the projections are rebuilt.
fn tag_rollups_by_tag_set(s: &dyn Store) {
    use ciyuan_core::{Currency, Rating};
    use std::collections::BTreeMap;
    let cny: Currency = ok("CNY".parse(), "currency");
    let rating = |amount: i64| Rating::new(rust_decimal::Decimal::new(amount, 4), cny, "list", 1);
    let tagged = |account: &str, at: &str, input: i64, tags: &[(&str, &str)], cost: i64| {
        let mut e = usage(account, at, "gpt-4o", input);
        if let EntryBody::Usage(u) = &mut e.body {
            u.tags = tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            u.rating = Some(Box::new(rating(cost)));
        }
        e
    };
    let hr_search = [("feature", "search"), ("team", "hr")];
    let entries = [
        created("acme"),
        tagged("acme/cn", "2026-11-24T15:10:00Z", 10, &hr_search, 1),
        tagged("acme/cn", "2026-11-24T15:50:00Z", 5, &hr_search, 2),
        tagged(
            "acme/cn/x",
            "2026-11-24T15:20:00Z",
            7,
            &[("feature", "chat")],
            4,
        ),
        // Another hour, and a value needing escapes.
        tagged(
            "acme/us",
            "2026-11-24T16:05:00Z",
            3,
            &[("team", "r&d \"q\"")],
            8,
        ),
        // Untagged: no tag rows.
        usage("acme/cn", "2026-11-24T15:30:00Z", "gpt-4o", 1000),
        // Outside the subtree asked about.
        tagged("beta", "2026-11-24T15:00:00Z", 99, &hr_search, 16),
    ];
    ok(s.apply(0, &entries), "apply");
    // The first tagged entry re-rated from 0.0001 to 0.0101 CNY.
    let EntryBody::Usage(first) = &entries[1].body else {
        unreachable!("entry 1 is a usage entry")
    };
    let correction = Entry::new(
        ts("2026-11-30T00:00:00Z"),
        path("acme/cn"),
        EntryBody::RatingCorrection(ciyuan_core::RatingCorrection {
            entry: 1,
            at: ts("2026-11-24T15:10:00Z"),
            usage: Box::new(first.clone()),
            previous: Box::new(rating(1)),
            rating: Box::new(rating(101)),
        }),
    );
    ok(
        s.apply(entries.len() as u64, &[correction]),
        "apply (re-rating)",
    );
    let filter = HourFilter {
        account: path("acme"),
        from_hour: None,
        to_hour: None,
    };
    type Got = BTreeMap<(String, String, i64, BTreeMap<String, String>), String>;
    let read = |s: &dyn Store, filter: &HourFilter| -> (Got, Got) {
        let mut tokens = Got::new();
        for (tags, r) in ok(s.tag_usage_hours(filter, false), "tag_usage_hours") {
            assert_eq!(
                (r.service.as_str(), r.model.as_str()),
                ("llm.chat", "gpt-4o")
            );
            let k = (
                r.account.to_string(),
                format!("{}.{}", r.modality, r.direction),
                r.hour,
                (*tags).clone(),
            );
            assert!(
                tokens.insert(k, r.tokens.to_string()).is_none(),
                "one row per key"
            );
        }
        let mut cost = Got::new();
        for (tags, r) in ok(s.tag_cost_hours(filter, false), "tag_cost_hours") {
            let k = (
                r.account.to_string(),
                r.currency.to_string(),
                r.hour,
                (*tags).clone(),
            );
            assert!(
                cost.insert(k, r.amount.to_string()).is_none(),
                "one row per key"
            );
        }
        (tokens, cost)
    };
    let set = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let h15 = ts("2026-11-24T15:00:00Z").as_second();
    let h16 = ts("2026-11-24T16:00:00Z").as_second();
    let (tokens, cost) = read(s, &filter);
    let want_tokens: Got = [
        (("acme/cn", "text.input", h15, set(&hr_search)), "15"),
        (
            ("acme/cn/x", "text.input", h15, set(&[("feature", "chat")])),
            "7",
        ),
        (
            ("acme/us", "text.input", h16, set(&[("team", "r&d \"q\"")])),
            "3",
        ),
    ]
    .into_iter()
    .map(|((a, k, h, t), n)| ((a.to_string(), k.to_string(), h, t), n.to_string()))
    .collect();
    assert_eq!(tokens, want_tokens);
    let want_cost: Got = [
        // 0.0001 + 0.0002, re-rated by +0.0100.
        (("acme/cn", "CNY", h15, set(&hr_search)), "0.0103"),
        (
            ("acme/cn/x", "CNY", h15, set(&[("feature", "chat")])),
            "0.0004",
        ),
        (
            ("acme/us", "CNY", h16, set(&[("team", "r&d \"q\"")])),
            "0.0008",
        ),
    ]
    .into_iter()
    .map(|((a, c, h, t), n)| ((a.to_string(), c.to_string(), h, t), n.to_string()))
    .collect();
    assert_eq!(cost, want_cost);
    // Summed over the range: one row per node, tag set and key, at its first hour.
    let whole = ok(s.tag_usage_hours(&filter, true), "tag_usage_hours (whole)");
    let mut sums: BTreeMap<(String, BTreeMap<String, String>), (i64, i128)> = BTreeMap::new();
    for (tags, r) in &whole {
        let slot = sums
            .entry((r.account.to_string(), (**tags).clone()))
            .or_insert((r.hour, 0));
        slot.1 += r.tokens;
    }
    assert_eq!(whole.len(), 3, "{whole:?}");
    assert_eq!(sums[&("acme/cn".to_string(), set(&hr_search))], (h15, 15));
    assert_eq!(
        sums[&("acme/us".to_string(), set(&[("team", "r&d \"q\"")]))],
        (h16, 3)
    );
    let whole_cost = ok(s.tag_cost_hours(&filter, true), "tag_cost_hours (whole)");
    assert_eq!(whole_cost.len(), 3, "{whole_cost:?}");
    // A node's own subtree and an hour range.
    let (tokens, _) = read(
        s,
        &HourFilter {
            account: path("acme/cn"),
            from_hour: Some(h15),
            to_hour: Some(h16),
        },
    );
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    let (tokens, _) = read(
        s,
        &HourFilter {
            account: path("acme"),
            from_hour: Some(h16),
            to_hour: None,
        },
    );
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    // Rebuilt from the log: the same rows.
    ok(s.reset_projections(), "reset_projections");
    assert!(ok(s.tag_usage_hours(&filter, false), "tag_usage_hours").is_empty());
    ok(s.apply(0, &entries), "apply");
    let (tokens, _) = read(s, &filter);
    assert_eq!(tokens, want_tokens);
}

/// The subtree rollups answer as summing the exact rows would, for every node, range
/// and cut into days: tokens and costs, each node's subtree, each child's and the
/// node's own, hour by hour, across applies that add to rows already written.
fn subtree_rollups_equal_the_exact_rows(s: &dyn Store) {
    use crate::tree::{Subtrees, TreeFilter};
    use crate::{CostRow, HourRow};
    use ciyuan_core::{Currency, ExactSum, Rating};
    use std::collections::BTreeMap;
    let nodes = ["acme", "acme/cn", "acme/cn/hr", "acme/us", "beta", "beta/x"];
    ok(s.apply(0, &nodes.map(created)), "apply (accounts)");
    let start = ts("2026-11-01T22:00:00Z").as_second();
    let cny: Currency = ok("CNY".parse(), "currency");
    // A fixed pseudo-random spread over four days, six nodes and two models.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut entries = Vec::new();
    for i in 0..400u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let node = nodes[(x % nodes.len() as u64) as usize];
        let at = start + ((x >> 8) % (4 * 86_400)) as i64;
        let at = ok(Timestamp::from_second(at), "timestamp").to_string();
        let model = if (x >> 40).is_multiple_of(2) {
            "m1"
        } else {
            "m2"
        };
        let mut e = usage(node, &at, model, 1 + ((x >> 20) % 1000) as i64);
        if i % 3 != 0
            && let EntryBody::Usage(u) = &mut e.body
        {
            // Some priced, so an hour has usage lines beside its rounding.
            let quantity = rust_decimal::Decimal::from(1 + ((x >> 20) % 1000) as i64);
            let unit_price = rust_decimal::Decimal::new(25, 7);
            let lines = if i % 3 == 1 {
                vec![ciyuan_core::RatedLine {
                    key: ciyuan_core::PriceKey::Tokens(Modality::Text, Direction::Input),
                    quantity,
                    unit_price,
                    amount: quantity * unit_price,
                }]
            } else {
                vec![]
            };
            u.rating = Some(Box::new(Rating {
                amount: rust_decimal::Decimal::new(((x >> 30) % 100_000) as i64 - 20_000, 6),
                currency: cny,
                book: "list".into(),
                version: 1,
                lines,
                contract: None,
                discount_percent: None,
                markup_percent: None,
                unpriced: false,
                missing: vec![],
                basis: None,
                place: None,
            }));
        }
        entries.push(e);
    }
    let at = nodes.len() as u64;
    ok(s.apply(at, &entries[..150]), "apply");
    ok(s.apply(at + 150, &entries[150..]), "apply");

    type Key = (String, Option<i64>, String, String, String);
    fn tokens(
        rows: &[HourRow],
        by_hour: bool,
        name: impl Fn(&AccountPath) -> Option<String>,
    ) -> BTreeMap<Key, i128> {
        let mut out = BTreeMap::new();
        for r in rows {
            let Some(n) = name(&r.account) else { continue };
            let key = (
                n,
                by_hour.then_some(r.hour),
                r.model.clone(),
                r.modality.to_string(),
                r.direction.to_string(),
            );
            *out.entry(key).or_insert(0) += r.tokens;
        }
        out.retain(|_, v| *v != 0);
        out
    }
    fn costs(
        rows: &[CostRow],
        by_hour: bool,
        name: impl Fn(&AccountPath) -> Option<String>,
    ) -> BTreeMap<Key, ExactSum> {
        let mut out: BTreeMap<Key, ExactSum> = BTreeMap::new();
        for r in rows {
            let Some(n) = name(&r.account) else { continue };
            let key = (
                n,
                by_hour.then_some(r.hour),
                r.model.clone(),
                r.currency.to_string(),
                String::new(),
            );
            let slot = out.entry(key).or_insert(ExactSum::ZERO);
            *slot = ok(slot.checked_add(r.amount).ok_or("overflow"), "cost sum");
        }
        out.retain(|_, v| !v.is_zero());
        out
    }
    let hour = |t: &str| ts(t).as_second();
    let ranges = [
        (None, None),
        (
            Some(hour("2026-11-02T05:00:00Z")),
            Some(hour("2026-11-04T07:00:00Z")),
        ),
        (
            Some(hour("2026-11-02T00:00:00Z")),
            Some(hour("2026-11-04T00:00:00Z")),
        ),
        (Some(hour("2026-11-03T13:00:00Z")), None),
        (None, Some(hour("2026-11-03T01:00:00Z"))),
        (
            Some(hour("2026-11-03T01:00:00Z")),
            Some(hour("2026-11-03T04:00:00Z")),
        ),
    ];
    let mut compared = 0;
    for node in ["/", "acme", "acme/cn", "acme/cn/hr", "beta"] {
        let node = path(node);
        for (from_hour, to_hour) in ranges {
            let exact = HourFilter {
                account: node.clone(),
                from_hour,
                to_hour,
            };
            let rows = ok(s.usage_hours(&exact), "usage_hours()");
            let cost_rows = ok(s.cost_hours(&exact), "cost_hours()");
            for days in [false, true] {
                let by_hour = !days;
                let of = TreeFilter {
                    subtrees: Subtrees::Of(node.clone()),
                    from_hour,
                    to_hour,
                    days,
                };
                let got = ok(s.usage_tree(&of), "usage_tree()");
                assert!(
                    got.iter().all(|r| r.account == node),
                    "usage_tree({of:?}) names another node"
                );
                let whole = |_: &AccountPath| Some(node.to_string());
                assert_eq!(
                    tokens(&got, by_hour, whole),
                    tokens(&rows, by_hour, whole),
                    "usage_tree({of:?})"
                );
                let got = ok(s.cost_tree(&of), "cost_tree()");
                assert_eq!(
                    costs(&got, by_hour, whole),
                    costs(&cost_rows, by_hour, whole),
                    "cost_tree({of:?})"
                );

                // Each child's subtree under the child's name, the node's own under its.
                let share = |a: &AccountPath| {
                    if *a == node {
                        return Some(node.to_string());
                    }
                    let depth = node.depth() + 1;
                    let child: Vec<&str> = a.segments().take(depth).collect();
                    (a.depth() >= depth).then(|| child.join("/"))
                };
                let children = TreeFilter {
                    subtrees: Subtrees::ChildrenOf(node.clone()),
                    from_hour,
                    to_hour,
                    days,
                };
                let got = ok(s.usage_tree(&children), "usage_tree()");
                let want = tokens(&rows, by_hour, share);
                assert_eq!(
                    tokens(&got, by_hour, |a| Some(a.to_string())),
                    want,
                    "usage_tree({children:?})"
                );
                let got = ok(s.cost_tree(&children), "cost_tree()");
                assert_eq!(
                    costs(&got, by_hour, |a| Some(a.to_string())),
                    costs(&cost_rows, by_hour, share),
                    "cost_tree({children:?})"
                );
                compared += want.len();
            }
        }
    }
    // The checks compared something: a store answering nothing would pass otherwise.
    assert!(compared > 500, "only {compared} sums compared");

    // Billing lines a page at a time come in the contract's order: an hour's usage
    // lines, then its adjustments, per service and model.
    let all = HourFilter {
        account: AccountPath::root(),
        from_hour: None,
        to_hour: None,
    };
    let paged = all_pages(s, &all, 7);
    let order = line_place;
    assert!(
        paged.windows(2).all(|w| order(&w[0]) < order(&w[1])),
        "pages in key order"
    );
    let mixed = paged
        .windows(2)
        .filter(|w| order(&w[0]).0 == order(&w[1]).0 && !w[0].adjustment && w[1].adjustment)
        .count();
    assert!(
        mixed > 10,
        "only {mixed} hours hold usage and adjustment lines"
    );
    assert_eq!(paged.len(), ok(s.cost_lines(&all), "cost_lines()").len());
}

/// Where each hour's gateway requests lie in the log (merged across applies), service
/// level evaluations kept once per node, level and month, and credits (a service
/// credit in the month's last hour, a refund into a wallet) billed as negative lines.
fn service_levels_quality_hours_and_credit_lines(s: &dyn Store) {
    let gateway = |at: &str| {
        let mut e = usage("acme/cn", at, "gpt-4o", 10);
        if let EntryBody::Usage(u) = &mut e.body {
            u.quality = Some(Box::new(ciyuan_core::Quality {
                upstream: "sim".into(),
                status: 200,
                latency_us: 5,
                ..Default::default()
            }));
        }
        e
    };
    let hour = |t: &str| ts(t).as_second();
    ok(
        s.apply(
            0,
            &[
                gateway("2026-11-02T01:10:00Z"),
                gateway("2026-11-02T01:20:00Z"),
            ],
        ),
        "apply",
    );
    ok(
        s.apply(
            2,
            &[
                gateway("2026-11-02T01:59:59Z"),
                gateway("2026-11-03T05:00:00Z"),
                usage("acme/cn", "2026-11-02T01:30:00Z", "gpt-4o", 1),
            ],
        ),
        "apply",
    );
    assert_eq!(
        ok(
            s.quality_range(hour("2026-11-02T01:00:00Z"), hour("2026-11-02T02:00:00Z")),
            "quality_range"
        ),
        Some((0, 2))
    );
    assert_eq!(
        ok(
            s.quality_range(hour("2026-11-01T00:00:00Z"), hour("2026-12-01T00:00:00Z")),
            "quality_range"
        ),
        Some((0, 3))
    );
    assert_eq!(
        ok(
            s.quality_range(hour("2026-10-01T00:00:00Z"), hour("2026-11-01T00:00:00Z")),
            "quality_range"
        ),
        None
    );
    let usd: ciyuan_core::Currency = ok("USD".parse(), "currency");
    let level = ciyuan_core::ServiceLevel {
        name: "sim-gpt".into(),
        upstream: "sim".into(),
        model: None,
        period: ciyuan_core::LevelPeriod::Month,
        objectives: vec![ciyuan_core::Objective {
            metric: ciyuan_core::Metric::Availability,
            target: rust_decimal::Decimal::from(99),
            credits: vec![],
        }],
        max_credit_percent: None,
    };
    let evaluated = |credit: &str| ciyuan_core::ServiceLevelEvaluated {
        level: level.clone(),
        period: "2026-11".into(),
        from: ts("2026-11-01T00:00:00Z"),
        to: ts("2026-12-01T00:00:00Z"),
        time_zone: "UTC".into(),
        scanned: (0, 5),
        entries: Some((0, 3)),
        figures: ciyuan_core::Figures::default(),
        objectives: vec![],
        credit_percent: rust_decimal::Decimal::from(10),
        credits: vec![ciyuan_core::CreditLine {
            currency: usd,
            book: "list".into(),
            version: 1,
            base: rust_decimal::Decimal::from(6),
            amount: ok(credit.parse(), "credit"),
        }],
    };
    let at = |t: &str, body: EntryBody| Entry::new(ts(t), path("acme/cn"), body);
    ok(
        s.apply(
            5,
            &[
                at(
                    "2026-12-01T00:20:00Z",
                    EntryBody::ServiceLevelEvaluated(Box::new(evaluated("0.6"))),
                ),
                // A second word on the same node, level and month changes nothing.
                at(
                    "2026-12-01T00:30:00Z",
                    EntryBody::ServiceLevelEvaluated(Box::new(evaluated("9"))),
                ),
                at(
                    "2026-11-10T08:30:00Z",
                    EntryBody::Posting(ciyuan_core::Posting::refund(
                        &path("acme/cn"),
                        usd,
                        rust_decimal::Decimal::from(5),
                    )),
                ),
            ],
        ),
        "apply",
    );
    let listed = ok(s.service_levels(&path("acme")), "service_levels");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].entry, listed[0].account.as_str()),
        (5, "acme/cn")
    );
    assert_eq!(listed[0].body, evaluated("0.6"));
    assert!(ok(s.service_levels(&path("beta")), "service_levels").is_empty());
    let lines = ok(
        s.cost_lines(&HourFilter {
            account: path("acme"),
            from_hour: Some(hour("2026-11-01T00:00:00Z")),
            to_hour: Some(hour("2026-12-01T00:00:00Z")),
        }),
        "cost_lines",
    );
    // Whole days may come back as one line dated the day's start: the day is what
    // is checked.
    let billed = |key: &str| -> Vec<(i64, String)> {
        lines
            .iter()
            .filter(|l| l.key == key && l.adjustment && l.unit_price.is_none())
            .map(|l| (l.hour - l.hour.rem_euclid(86_400), l.billed.to_string()))
            .collect()
    };
    // The two evaluations of one month are two lines of the same key: the projection
    // bills what the log says, and the server never appends the second.
    assert_eq!(
        billed("service_credit:sim-gpt"),
        vec![(hour("2026-11-30T00:00:00Z"), "-9.6".to_string())]
    );
    assert_eq!(
        billed("refund"),
        vec![(hour("2026-11-10T00:00:00Z"), "-5".to_string())]
    );
    let last_hour = ok(
        s.cost_lines(&HourFilter {
            account: path("acme/cn"),
            from_hour: Some(hour("2026-11-30T23:00:00Z")),
            to_hour: Some(hour("2026-12-01T00:00:00Z")),
        }),
        "cost_lines",
    );
    assert!(
        last_hour
            .iter()
            .any(|l| l.key == "service_credit:sim-gpt" && l.hour == hour("2026-11-30T23:00:00Z")),
        "a service credit is billed in the month's last hour"
    );
    ok(s.reset_projections(), "reset_projections");
    assert!(ok(s.service_levels(&path("acme")), "service_levels").is_empty());
    assert_eq!(
        ok(
            s.quality_range(hour("2026-11-01T00:00:00Z"), hour("2026-12-01T00:00:00Z")),
            "quality_range"
        ),
        None
    );
}

/// A report's progress is the latest period its schedule delivered: an earlier period
/// delivered later (a replay) and deliveries by hand never move it back or forward;
/// a reset forgets it.
fn report_progress_is_the_latest_scheduled_period(s: &dyn Store) {
    let on = |node: AccountPath, name: &str, day: u32, manual: bool| {
        Entry::new(
            ts("2026-11-10T00:00:00Z"),
            node,
            EntryBody::ReportDelivered(ciyuan_core::ReportDelivered {
                name: name.into(),
                period: format!("2026-11-{day:02}"),
                period_start: ts(&format!("2026-11-{day:02}T00:00:00Z")),
                period_end: ts(&format!("2026-11-{:02}T00:00:00Z", day + 1)),
                time_zone: "UTC".into(),
                format: "csv".into(),
                sha256: ciyuan_core::ReportDelivered::hash(name.as_bytes()),
                bytes: 10,
                destination: "/srv/reports".into(),
                secret_sha256: None,
                manual,
            }),
        )
    };
    let delivered = |name: &str, day: u32, manual: bool| on(path("acme"), name, day, manual);
    assert!(ok(s.report_progress(), "report_progress() when empty").is_empty());
    let entries = [
        created("acme"),
        delivered("daily", 3, false),
        delivered("daily", 4, false),
        delivered("daily", 2, false),
        delivered("daily", 9, true),
        delivered("hourly", 1, true),
        delivered("costs", 5, false),
        // A report of the whole tree, on the root.
        on(AccountPath::root(), "all", 1, false),
    ];
    ok(s.apply(0, &entries), "apply()");
    let progress = ok(s.report_progress(), "report_progress()");
    let seen: Vec<(&str, &str, u64)> = progress
        .iter()
        .map(|r| (r.body.name.as_str(), r.body.period.as_str(), r.entry))
        .collect();
    assert_eq!(
        seen,
        [
            ("all", "2026-11-01", 7),
            ("costs", "2026-11-05", 6),
            ("daily", "2026-11-04", 2)
        ]
    );
    assert!(progress[0].account.is_root(), "{:?}", progress[0].account);
    assert_eq!(progress[2].account, path("acme"));
    assert_eq!(
        progress[2].body,
        match &entries[2].body {
            EntryBody::ReportDelivered(d) => d.clone(),
            _ => unreachable!("entry 2 is a delivery"),
        }
    );
    ok(s.reset_projections(), "reset_projections()");
    assert!(ok(s.report_progress(), "report_progress() after a reset").is_empty());
}

/// Price books keep the first word on `name@version`, contracts are replaced whole,
/// postings are listed under every node whose wallet they move (paged by entry), and
/// hourly costs of rated usage add exactly (ten times 0.1 is 1, never 0.9999...).
fn money_books_contracts_postings_and_exact_costs(s: &dyn Store) {
    use ciyuan_core::{Currency, LedgerAccount, Leg, Posting, PostingKind, PriceBook, Rating};
    let d = |t: &str| ok(ciyuan_core::decimal_from_text(t), "decimal");
    let cny: Currency = ok("CNY".parse(), "currency");
    let book = |version: u32, name: &str| PriceBook {
        tax: None,
        name: name.into(),
        version,
        currency: cny,
        effective_from: ts("2026-01-01T00:00:00Z"),
        rounding: ciyuan_core::Rounding::default(),
        source: None,
        set_by: None,
        rules: vec![],
    };
    let contract = |b: &str| ciyuan_core::PriceContract {
        book: b.into(),
        overrides: vec![],
        discount_percent: None,
        markup_percent: None,
        minimum_commitment: None,
        service_levels: Vec::new(),
        set_by: Some(AccountPath::root()),
    };
    let transfer = Posting {
        kind: PostingKind::Transfer,
        currency: cny,
        legs: vec![
            Leg::debit(LedgerAccount::Cash(path("acme/a")), d("5")),
            Leg::credit(LedgerAccount::Cash(path("acme/b")), d("5")),
        ],
        memo: "move".into(),
        usage_entry: None,
        grant: None,
        set_by: Some(path("acme")),
    };
    let topup = Posting {
        kind: PostingKind::Topup,
        legs: vec![
            Leg::debit(LedgerAccount::Payments, d("100")),
            Leg::credit(LedgerAccount::Cash(path("acme/a")), d("100")),
        ],
        ..transfer.clone()
    };
    let at = "2026-11-24T15:10:00Z";
    let rated = |amount: &str| {
        let mut e = usage("acme/a", at, "gpt-4o", 1);
        if let EntryBody::Usage(u) = &mut e.body {
            u.rating = Some(Box::new(Rating::new(d(amount), cny, "list", 1)));
        }
        e
    };
    let on = |account: &str, body: EntryBody| Entry::new(ts(at), path(account), body);
    let mut entries = vec![
        on("/", EntryBody::PriceBook(book(1, "list"))),
        on("/", EntryBody::PriceBook(book(2, "list"))),
        on("/", EntryBody::PriceBook(book(1, "list"))),
        on("acme", EntryBody::PriceContract(contract("list"))),
        on("acme", EntryBody::PriceContract(contract("resale"))),
        on("acme/a", EntryBody::Posting(topup.clone())),
        on("acme/a", EntryBody::Posting(transfer.clone())),
    ];
    entries.extend((0..10).map(|_| rated("0.1")));
    ok(s.apply(0, &entries[..9]), "apply()");
    ok(s.apply(9, &entries[9..]), "apply()");
    let books = ok(s.price_books(), "price_books()");
    assert_eq!(
        books
            .iter()
            .map(|(e, b)| (*e, b.version))
            .collect::<Vec<_>>(),
        vec![(0, 1), (1, 2)],
        "by name and version, the first word on a version kept"
    );
    let contracts = ok(s.contracts(), "contracts()");
    assert_eq!(contracts, vec![(path("acme"), 4, contract("resale"))]);
    let all = ok(s.postings(None, None, 10), "postings()");
    assert_eq!(all.iter().map(|p| p.entry).collect::<Vec<_>>(), vec![5, 6]);
    assert_eq!(all[1].body, transfer);
    let b = ok(
        s.postings(Some(&path("acme/b")), None, 10),
        "postings(acme/b)",
    );
    assert_eq!(
        b.iter().map(|p| p.entry).collect::<Vec<_>>(),
        vec![6],
        "a transfer is listed under both nodes"
    );
    let a = ok(
        s.postings(Some(&path("acme/a")), Some(5), 10),
        "postings(acme/a, after 5)",
    );
    assert_eq!(
        a.iter().map(|p| p.entry).collect::<Vec<_>>(),
        vec![6],
        "paged by entry"
    );
    let costs = ok(
        s.cost_hours(&HourFilter {
            account: path("acme"),
            from_hour: None,
            to_hour: None,
        }),
        "cost_hours()",
    );
    assert_eq!(costs.len(), 1);
    assert_eq!(
        costs[0].amount,
        ciyuan_core::ExactSum::of(d("1")),
        "exact: ten times 0.1"
    );
    assert_eq!(
        (costs[0].currency, costs[0].model.as_str()),
        (cny, "gpt-4o")
    );

    // Tiered entries add their units to their counter; a correction moves the cost of
    // the entry it names, at that entry's hour.
    let placed = |before: &str| {
        let mut e = rated("0.1");
        if let EntryBody::Usage(u) = &mut e.body
            && let Some(r) = &mut u.rating
        {
            r.place = Some(ciyuan_core::TierPlace {
                node: path("acme"),
                rule: "gpt-4o|llm.chat|standard".into(),
                period: ts("2026-11-01T00:00:00Z"),
                before: d(before),
                units: d("2.5"),
            });
        }
        e
    };
    let first = placed("0");
    let EntryBody::Usage(usage) = first.body.clone() else {
        unreachable!()
    };
    let rating = ok(
        usage.rating.clone().ok_or("no rating"),
        "the placed entry's rating",
    );
    let mut corrected = (*rating).clone();
    corrected.amount = d("0.35");
    let correction = on(
        "acme/a",
        EntryBody::RatingCorrection(ciyuan_core::RatingCorrection {
            entry: 17,
            at: ts(at),
            usage: Box::new(usage),
            previous: rating,
            rating: Box::new(corrected),
        }),
    );
    ok(s.apply(17, &[first, placed("2.5")]), "apply()");
    ok(s.apply(19, &[placed("5"), correction]), "apply()");
    let tiers = ok(s.tier_units(), "tier_units()");
    assert_eq!(tiers.len(), 1, "{tiers:?}");
    assert_eq!(
        (
            tiers[0].node.as_str(),
            tiers[0].rule.as_str(),
            tiers[0].book.as_str()
        ),
        ("acme", "gpt-4o|llm.chat|standard", "list")
    );
    assert_eq!(tiers[0].period, ts("2026-11-01T00:00:00Z"));
    assert_eq!(tiers[0].units, ciyuan_core::ExactSum::of(d("7.5")));
    let costs = ok(
        s.cost_hours(&HourFilter {
            account: path("acme"),
            from_hour: None,
            to_hour: None,
        }),
        "cost_hours()",
    );
    assert_eq!(
        costs[0].amount,
        ciyuan_core::ExactSum::of(d("1.55")),
        "1 + 3 x 0.1 + the correction's 0.25"
    );
    // The billing lines bill the same, exactly: these ratings have no priced lines,
    // so all of it is the rounding of their totals, and the correction's is an
    // adjustment that withdraws 0.1 and bills 0.35.
    let lines = ok(
        s.cost_lines(&HourFilter {
            account: path("acme"),
            from_hour: None,
            to_hour: None,
        }),
        "cost_lines()",
    );
    let billed = lines.iter().fold(ciyuan_core::ExactSum::ZERO, |a, l| {
        ok(a.checked_add(l.billed).ok_or("overflow"), "summing billed")
    });
    assert_eq!(billed, ciyuan_core::ExactSum::of(d("1.55")), "{lines:?}");
    assert!(lines.iter().all(|l| l.key == "rounding" && l.adjustment));
    let none = ok(
        s.cost_lines(&HourFilter {
            account: path("acme/b"),
            from_hour: None,
            to_hour: None,
        }),
        "cost_lines(acme/b)",
    );
    assert!(none.is_empty(), "only the subtree asked for: {none:?}");
    // Paged by key, the pages hold every line once, in the order the contract names,
    // an hour's adjustments after its usage of the same service and model, whatever
    // the backend stores.
    let all = HourFilter {
        account: path("acme"),
        from_hour: None,
        to_hour: None,
    };
    let paged = all_pages(s, &all, 1);
    assert_eq!(paged.len(), lines.len());
    for l in &lines {
        assert!(paged.contains(l), "{l:?} is in a page");
    }
    assert!(
        paged
            .windows(2)
            .all(|w| line_place(&w[0]) < line_place(&w[1])),
        "pages in key order: {paged:?}"
    );
    // Visited in place, a page at a time, the same lines in the same order, their
    // sums the decimals of the stored ones; a visitor that stops is obeyed.
    for limit in [1, 2, 1000] {
        let mut visited = Vec::new();
        let mut after: Option<crate::LineRow> = None;
        loop {
            let done = ok(
                s.each_cost_line(&all, after.as_ref(), limit, &mut |l| {
                    visited.push(l.to_row());
                    std::ops::ControlFlow::Continue(())
                }),
                "each_cost_line()",
            );
            assert!(!done.stopped && done.count <= limit, "{done:?}");
            assert_eq!(
                done.last.as_ref(),
                visited.last().filter(|_| done.count > 0)
            );
            if done.count < limit {
                break;
            }
            after = done.last;
        }
        assert_eq!(visited, paged, "each_cost_line(limit {limit})");
    }
    let mut seen = 0;
    let done = ok(
        s.each_cost_line(&all, None, 1000, &mut |_| {
            seen += 1;
            std::ops::ControlFlow::Break(())
        }),
        "each_cost_line(stopping)",
    );
    assert_eq!((seen, done.count, done.stopped), (1, 1, true));
    assert_eq!(done.last.as_ref(), paged.first());

    // A range over whole days and edge hours sums as its hourly lines do.
    let at_time = |t: &str| {
        let mut e = rated("0.01");
        e.ts = ts(t);
        e
    };
    let spread: Vec<Entry> = [
        "2026-12-01T04:59:59Z",
        "2026-12-01T05:00:00Z",
        "2026-12-01T23:30:00Z",
        "2026-12-02T00:00:00Z",
        "2026-12-02T13:00:00Z",
        "2026-12-03T06:59:00Z",
        "2026-12-03T07:00:00Z",
    ]
    .iter()
    .map(|t| at_time(t))
    .collect();
    ok(s.apply(21, &spread), "apply()");
    let range = HourFilter {
        account: path("acme"),
        from_hour: Some(ts("2026-12-01T05:00:00Z").as_second()),
        to_hour: Some(ts("2026-12-03T07:00:00Z").as_second()),
    };
    let sum = |rows: &[crate::LineRow]| {
        rows.iter().fold(ciyuan_core::ExactSum::ZERO, |a, l| {
            ok(a.checked_add(l.billed).ok_or("overflow"), "summing billed")
        })
    };
    let whole = ok(s.cost_lines(&range), "cost_lines(range)");
    let hourly = ok(
        s.cost_lines_page(&range, None, 1000),
        "cost_lines_page(range)",
    );
    assert_eq!(
        sum(&whole),
        ciyuan_core::ExactSum::of(d("0.05")),
        "{whole:?}"
    );
    assert_eq!(sum(&whole), sum(&hourly));
    let mut visited = Vec::new();
    ok(
        s.each_cost_line(&range, None, 1000, &mut |l| {
            visited.push(l.to_row());
            std::ops::ControlFlow::Continue(())
        }),
        "each_cost_line(range)",
    );
    assert_eq!(visited, hourly, "each_cost_line(range)");

    // A period is closed once: the first statement issued for it is kept.
    let close = |doc: &str| {
        on(
            "acme",
            EntryBody::StatementClosed(ciyuan_core::StatementClosed::new(
                "2026-11".into(),
                ts("2026-11-01T00:00:00Z"),
                ts("2026-12-01T00:00:00Z"),
                "UTC".into(),
                doc.into(),
            )),
        )
    };
    ok(
        s.apply(28, &[close("{\"first\":1}"), close("{\"second\":2}")]),
        "apply()",
    );
    let issued = ok(s.statements(&path("acme")), "statements()");
    assert_eq!(issued.len(), 1);
    assert_eq!(
        (issued[0].entry, issued[0].body.document.as_str()),
        (28, "{\"first\":1}")
    );
    assert!(ok(s.statements(&path("acme/a")), "statements(acme/a)").is_empty());

    ok(s.reset_projections(), "reset_projections()");
    assert!(ok(s.statements(&path("acme")), "statements() after a reset").is_empty());
    assert!(ok(s.tier_units(), "tier_units() after a reset").is_empty());
    let after = HourFilter {
        account: path("acme"),
        from_hour: None,
        to_hour: None,
    };
    assert!(ok(s.cost_lines(&after), "cost_lines() after a reset").is_empty());
    assert!(ok(s.price_books(), "price_books() after a reset").is_empty());
    assert!(ok(s.postings(None, None, 10), "postings() after a reset").is_empty());
}

/// `definition.set` entries project into the definitions in force; a repeated
/// `service@version` keeps the ledger's first declaration, and a reset forgets them.
fn definitions_keep_the_first_word_on_a_version(s: &dyn Store) {
    let def = |version: u32, expr: &str| ciyuan_core::TokenDefinition {
        service: "doc.verify".into(),
        version,
        effective_from: ts(&format!("2026-0{version}-01T00:00:00Z")),
        description: None,
        tokens: [("other.input".to_string(), expr.to_string())].into(),
        set_by: Some(AccountPath::root()),
    };
    let on_root = |d| {
        Entry::new(
            ts("2026-01-01T00:00:00Z"),
            AccountPath::root(),
            EntryBody::DefinitionSet(d),
        )
    };
    let entries = [
        on_root(def(2, "pages * 600")),
        on_root(def(1, "pages * 500")),
        on_root(def(1, "pages * 9")),
    ];
    ok(s.apply(0, &entries), "apply()");
    assert_eq!(
        ok(s.definitions(), "definitions()"),
        vec![(1, def(1, "pages * 500")), (0, def(2, "pages * 600"))],
        "by service and version, the first declaration of a version kept"
    );
    ok(s.reset_projections(), "reset_projections()");
    assert!(ok(s.definitions(), "definitions() after a reset").is_empty());
}

/// Issue 13: two events of 9223372036854775807 input tokens and one of 1 in the same
/// hour made SQLite store a float, and usage answered 500. Whatever the ledger holds,
/// the projected sums stay exact, in both signs.
fn regression_token_sums_past_i64_stay_exact(s: &dyn Store) {
    let at = "2026-11-24T15:10:00Z";
    let mut entries = vec![
        usage("acme/cn", at, "gpt-4o", i64::MAX),
        usage("acme/cn", at, "gpt-4o", 1),
    ];
    ok(s.apply(0, &entries), "apply()");
    entries = vec![usage("acme/cn", at, "gpt-4o", i64::MAX)];
    ok(s.apply(2, &entries), "apply()");
    let filter = HourFilter {
        account: path("acme"),
        from_hour: None,
        to_hour: None,
    };
    let sums = |s: &dyn Store| -> Vec<i128> {
        let rows = ok(s.usage_hours(&filter), "usage_hours()");
        rows.iter().map(|r| r.tokens).collect()
    };
    assert_eq!(sums(s), [2 * i128::from(i64::MAX) + 1]);
    // Corrections bring it back below i64 exactly.
    let mut fix = TokenMap::new();
    assert!(
        fix.add(Modality::Text, Direction::Input, -i64::MAX)
            .is_some()
    );
    let correction = Entry::new(
        ts(at),
        path("acme/cn"),
        EntryBody::Adjustment(Adjustment {
            corrects: Some(0),
            reason: "overflow test".into(),
            service: "llm.chat".into(),
            model: Some("gpt-4o".into()),
            tokens: fix,
        }),
    );
    for (i, e) in [correction.clone(), correction].iter().enumerate() {
        ok(s.apply(3 + i as u64, std::slice::from_ref(e)), "apply()");
    }
    assert_eq!(sums(s), [1]);
}

fn budgets_access_flags_and_incidents(s: &dyn Store) {
    use ciyuan_core::{
        AccessSet, BudgetCleared, BudgetMeasure, BudgetMode, BudgetPer, BudgetPeriod, BudgetSet,
        Incident, Recount, Selector,
    };
    let at = "2026-11-24T15:00:00Z";
    let budget = |name: &str, amount: u64| BudgetSet {
        name: name.into(),
        measure: BudgetMeasure::Tokens,
        selector: Selector::default(),
        amount,
        period: BudgetPeriod::Month,
        mode: BudgetMode::Hard,
        per: BudgetPer::Node,
        thresholds: vec![80],
        clamp: false,
        set_by: None,
        cost: None,
    };
    let on = |account: &str, body: EntryBody| Entry::new(ts(at), path(account), body);
    let mut flagged = usage("acme/cn", at, "gpt-4o", 100);
    if let EntryBody::Usage(u) = &mut flagged.body {
        u.recount = Some(Box::new(Recount {
            encoding: "o200k_base".into(),
            input: 60,
            output: 0,
            flagged: true,
        }));
    }
    let incident = Incident {
        kind: "budget.threshold".into(),
        limit: "monthly".into(),
        mode: BudgetMode::Hard,
        window_start: None,
        threshold: Some(80),
        used: 800,
        amount: 1000,
        subject: None,
        cause: Some(5),
        cost: None,
    };
    let entries = [
        on("acme", EntryBody::BudgetSet(budget("monthly", 1000))),
        on("acme/cn", EntryBody::BudgetSet(budget("daily", 10))),
        on("acme", EntryBody::BudgetSet(budget("monthly", 2000))),
        on(
            "acme/cn",
            EntryBody::BudgetCleared(BudgetCleared {
                name: "daily".into(),
                cleared_by: None,
            }),
        ),
        on(
            "acme/cn",
            EntryBody::AccessSet(AccessSet {
                allow: Some(vec!["gpt-*".into()]),
                deny: vec![],
                set_by: None,
            }),
        ),
        flagged,
        usage("acme/us", at, "gpt-4o", 5),
        on("acme", EntryBody::Incident(incident.clone())),
    ];
    assert!(s.apply(0, &entries).is_ok());
    let budgets = ok(s.budgets(), "budgets()");
    assert_eq!(
        budgets,
        vec![(path("acme"), budget("monthly", 2000))],
        "set replaces, clear removes"
    );
    let rules = ok(s.access_rules(), "access_rules()");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].1.allow, Some(vec!["gpt-*".to_string()]));
    let f = ok(s.flagged(&path("acme"), 10), "flagged(acme)");
    assert_eq!(f.len(), 1, "only the flagged usage");
    assert_eq!((f[0].entry, f[0].account.as_str()), (5, "acme/cn"));
    assert!(ok(s.flagged(&path("acme/us"), 10), "flagged(acme/us)").is_empty());
    let i = ok(s.incidents(&path("acme"), 10), "incidents(acme)");
    assert_eq!(i.len(), 1);
    assert_eq!((i[0].entry, &i[0].body), (7, &incident));
    assert!(s.reset_projections().is_ok());
    assert!(ok(s.budgets(), "budgets() after a reset").is_empty());
    assert!(ok(s.incidents(&path("acme"), 10), "incidents() after a reset").is_empty());
}

fn ingest_index(s: &dyn Store) {
    let event = |source: &str, id: &str, n: i64| {
        let mut e = usage("acme", "2026-11-24T15:00:00Z", "m", n);
        if let EntryBody::Usage(u) = &mut e.body {
            u.source = Some(source.into());
            u.event_id = Some(id.into());
        }
        e
    };
    let entries = [
        event("svc-a", "1", 1),
        event("svc-b", "1", 2),
        usage("acme", "2026-11-24T15:00:00Z", "m", 3),
        event("svc-a", "2", 4),
        event(ciyuan_core::GATEWAY_SOURCE, "req-1", 5),
    ];
    // In parts: one transaction, in order, as if one slice.
    assert!(
        s.apply_parts(0, &[&entries[..1], &[], &entries[1..3], &entries[3..]])
            .is_ok()
    );
    assert_eq!(s.projected_through().ok(), Some(5));
    let read = |s: &dyn Store| {
        let mut rows = Vec::new();
        let through = s.ingest_index(&mut |hash, entry| rows.push((hash, entry)));
        (through.ok(), rows)
    };
    let h = ciyuan_core::ingest_key_hash;
    assert_eq!(
        read(s),
        (
            Some(5),
            vec![
                (h("svc-a", "1"), 0),
                (h("svc-b", "1"), 1),
                (h("svc-a", "2"), 3)
            ]
        ),
        "ingested events only (not the gateway's own records), in entry order, with the \
         watermark of the same snapshot"
    );
    // Appending goes on where it stopped.
    assert!(s.apply(5, &[event("svc-c", "9", 6)]).is_ok());
    assert_eq!(read(s).1.last(), Some(&(h("svc-c", "9"), 5)));
    assert!(s.reset_projections().is_ok());
    assert_eq!(read(s), (Some(0), vec![]));
}

fn projections_apply_in_order(s: &dyn Store) {
    assert_eq!(s.projected_through().ok(), Some(0));
    assert!(s.apply(0, &[created("a"), created("a/b")]).is_ok());
    assert_eq!(s.projected_through().ok(), Some(2));
    // A replay of entries already applied, or a gap, is refused, so nothing is counted
    // twice or skipped.
    assert!(matches!(
        s.apply(0, &[created("a")]),
        Err(StoreError::OutOfOrder { at: 2, from: 0 })
    ));
    assert!(matches!(
        s.apply(3, &[created("c")]),
        Err(StoreError::OutOfOrder { at: 2, from: 3 })
    ));
    assert_eq!(s.projected_through().ok(), Some(2));
}

fn projections_apply_in_parts(s: &dyn Store) {
    assert!(s.apply_parts(0, &[&[created("a")]]).is_ok());
    assert!(matches!(
        s.apply_parts(0, &[&[created("c")], &[created("d")]]),
        Err(StoreError::OutOfOrder { at: 1, from: 0 })
    ));
    assert!(
        s.apply_parts(1, &[&[created("c")], &[], &[created("d"), created("d/e")]])
            .is_ok()
    );
    assert!(s.apply_parts(4, &[]).is_ok());
    assert_eq!(s.projected_through().ok(), Some(4));
    let paths = pages::all_accounts(s, &AccountPath::root(), 100);
    assert_eq!(paths, ["a", "c", "d", "d/e"]);
}

fn accounts_and_subtrees(s: &dyn Store) {
    let entries = [
        created("acme"),
        created("acme/cn"),
        created("acme/cn/hr"),
        created("acme-x"),
        created("acme/us"),
    ];
    assert!(s.apply(0, &entries).is_ok());
    let names = |under: &str| pages::all_accounts(s, &path(under), 2);
    assert_eq!(names("acme"), ["acme", "acme/cn", "acme/cn/hr", "acme/us"]);
    assert_eq!(names("acme/cn"), ["acme/cn", "acme/cn/hr"]);
    assert_eq!(names("/").len(), 5);
    let cn = s.account(&path("acme/cn")).ok().flatten();
    assert_eq!(cn.map(|a| a.created_entry), Some(1));
    // An update replaces the attributes; a duplicate creation keeps the first.
    let info = AccountInfo {
        display_name: Some("China".into()),
        time_zone: Some("Asia/Shanghai".into()),
        ..AccountInfo::default()
    };
    let update = Entry::new(
        ts("2026-01-02T00:00:00Z"),
        path("acme/cn"),
        EntryBody::AccountUpdated(info.clone()),
    );
    assert!(s.apply(5, &[update, created("acme/cn")]).is_ok());
    let cn = s.account(&path("acme/cn")).ok().flatten();
    assert_eq!(cn.as_ref().map(|a| &a.info), Some(&info));
    assert_eq!(cn.map(|a| a.created_entry), Some(1));
    assert!(ok(s.account(&path("nope")), "account(nope)").is_none());
}

/// Sessions are found by the hash of their id, signed out once, kept by a reset of the
/// projections, and purged only once expired.
fn sessions_lifecycle(s: &dyn Store) {
    let session = |key: &str, expires_at: i64| crate::SessionRecord {
        key_id: key.into(),
        created_at: 1_000,
        expires_at,
        revoked_at: None,
    };
    ok(
        s.insert_session(&[7; 32], &session("k1", 2_000)),
        "insert_session",
    );
    ok(
        s.insert_session(&[8; 32], &session("k2", 5_000)),
        "insert_session",
    );
    assert!(
        matches!(
            s.insert_session(&[7; 32], &session("k3", 9_000)),
            Err(StoreError::Conflict(_))
        ),
        "a session id's hash is taken once"
    );
    assert_eq!(
        ok(s.session(&[7; 32]), "session"),
        Some(session("k1", 2_000))
    );
    assert_eq!(ok(s.session(&[9; 32]), "session"), None);
    assert!(ok(s.revoke_session(&[7; 32], 1_500), "revoke_session"));
    assert!(
        !ok(s.revoke_session(&[7; 32], 1_600), "revoke_session"),
        "signed out once"
    );
    assert!(!ok(s.revoke_session(&[9; 32], 1_600), "revoke_session"));
    assert_eq!(
        ok(s.session(&[7; 32]), "session").and_then(|r| r.revoked_at),
        Some(1_500)
    );
    ok(s.reset_projections(), "reset_projections");
    assert!(
        ok(s.session(&[8; 32]), "session").is_some(),
        "a reset keeps sessions"
    );
    assert_eq!(ok(s.purge_sessions(2_000), "purge_sessions"), 0);
    assert_eq!(ok(s.purge_sessions(3_000), "purge_sessions"), 1);
    assert_eq!(ok(s.session(&[7; 32]), "session"), None);
    assert!(ok(s.session(&[8; 32]), "session").is_some());
}

fn keys_lifecycle(s: &dyn Store) {
    let key = |id: &str, account: &str| KeyRecord {
        key_id: id.into(),
        account: path(account),
        scopes: ok(Scopes::parse_list("gateway,read"), "Scopes::parse_list"),
        name: Some("ci".into()),
        created_at: ts("2026-01-01T00:00:00Z"),
        revoked_at: None,
    };
    assert!(s.insert_key(&key("k1", "acme/cn"), &[1; 32]).is_ok());
    assert!(s.insert_key(&key("k2", "acme/us"), &[2; 32]).is_ok());
    assert!(s.insert_key(&key("k3", "/"), &[3; 32]).is_ok());
    assert!(matches!(
        s.insert_key(&key("k1", "acme"), &[4; 32]),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.insert_key(&key("k4", "acme"), &[1; 32]),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.key_count().ok(), Some(3));
    assert_eq!(
        s.key_by_hash(&[1; 32]).ok().flatten(),
        Some(key("k1", "acme/cn"))
    );
    assert_eq!(
        s.key_by_hash(&[3; 32]).ok().flatten().map(|k| k.account),
        Some(AccountPath::root())
    );
    assert!(ok(s.key_by_hash(&[9; 32]), "key_by_hash(unknown)").is_none());
    let ids: Vec<String> = pages::all_keys(s, &path("acme"), 1)
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, ["k1", "k2"]);
    assert_eq!(pages::all_keys(s, &AccountPath::root(), 2).len(), 3);
    let at = ts("2026-02-01T00:00:00Z");
    let revoked = s.revoke_key("k1", at).ok().flatten();
    assert_eq!(revoked.and_then(|k| k.revoked_at), Some(at));
    // Revoking twice keeps the first revocation time.
    let again = s
        .revoke_key("k1", ts("2026-03-01T00:00:00Z"))
        .ok()
        .flatten();
    assert_eq!(again.and_then(|k| k.revoked_at), Some(at));
    assert!(ok(s.revoke_key("missing", at), "revoke_key(missing)").is_none());
}

fn usage_rollups_and_reset(s: &dyn Store) {
    let mut fix = TokenMap::new();
    ok(
        fix.add(Modality::Text, Direction::Input, -3)
            .ok_or("overflow"),
        "TokenMap::add",
    );
    let entries = [
        created("acme"),
        usage("acme/cn", "2026-11-24T15:10:00Z", "gpt-4o", 10),
        usage("acme/cn", "2026-11-24T15:50:00Z", "gpt-4o", 5),
        usage("acme/cn", "2026-11-24T16:00:00Z", "gpt-4o", 1),
        usage("acme/us", "2026-11-24T15:00:00Z", "qwen-max", 7),
        usage("acme-x", "2026-11-24T15:00:00Z", "gpt-4o", 100),
        Entry::new(
            ts("2026-11-24T15:20:00Z"),
            path("acme/cn"),
            EntryBody::Adjustment(Adjustment {
                corrects: Some(1),
                reason: "duplicate".into(),
                service: "llm.chat".into(),
                model: Some("gpt-4o".into()),
                tokens: fix,
            }),
        ),
    ];
    // Applied in two transactions, as the projector does.
    assert!(s.apply(0, &entries[..3]).is_ok());
    assert!(s.apply(3, &entries[3..]).is_ok());
    let filter = HourFilter {
        account: path("acme"),
        from_hour: None,
        to_hour: None,
    };
    let rows = ok(s.usage_hours(&filter), "usage_hours()");
    let summary: Vec<(String, i64, String, i128)> = rows
        .iter()
        .map(|r| (r.account.to_string(), r.hour, r.model.clone(), r.tokens))
        .collect();
    let h15 = ts("2026-11-24T15:00:00Z").as_second();
    assert_eq!(
        summary,
        [
            ("acme/cn".to_string(), h15, "gpt-4o".to_string(), 12),
            ("acme/cn".to_string(), h15 + 3600, "gpt-4o".to_string(), 1),
            ("acme/us".to_string(), h15, "qwen-max".to_string(), 7),
        ]
    );
    let windowed = HourFilter {
        account: path("acme"),
        from_hour: Some(h15 + 3600),
        to_hour: Some(h15 + 7200),
    };
    assert_eq!(s.usage_hours(&windowed).map(|r| r.len()).ok(), Some(1));
    assert!(s.reset_projections().is_ok());
    assert_eq!(s.projected_through().ok(), Some(0));
    assert_eq!(s.usage_hours(&filter).map(|r| r.len()).ok(), Some(0));
    assert!(
        ok(
            s.accounts_page(&AccountPath::root(), None, 10),
            "accounts_page() after a reset"
        )
        .is_empty()
    );
}

/// A month of one tag, grouped and filtered as `/api/v1/usage` asks, over the rows 10
/// million tagged events leave, timed on `s` (an empty store; printed, not asserted:
/// a benchmark run by hand with `--ignored --nocapture`). The answer reads rows (node,
/// hour, tag set, service, model, token key), not events: 10 M events over 720 hours,
/// 32 tag sets (8 features x 4 teams), 3 models and 2 token keys leave at most
/// 138,240 rows, made here by one entry per key carrying that key's share of the
/// events' counts.
#[allow(clippy::panic)] // a benchmark fails the way a test does
pub fn bench_tag_month(s: &dyn Store) {
    use crate::{GroupBy, HourRow, UsageQuery, aggregate};
    let start = ts("2026-11-01T00:00:00Z").as_second();
    let events_per_key: i64 = 10_000_000 / (720 * 32 * 3);
    let mut entries = Vec::new();
    for h in 0..720i64 {
        for f in 0..8 {
            for t in 0..4 {
                for m in 0..3 {
                    let mut tokens = TokenMap::new();
                    let added = tokens
                        .add(Modality::Text, Direction::Input, 500 * events_per_key)
                        .and_then(|()| {
                            tokens.add(Modality::Text, Direction::Output, 80 * events_per_key)
                        });
                    ok(added.ok_or("overflow"), "TokenMap::add");
                    entries.push(Entry::new(
                        ok(Timestamp::from_second(start + h * 3600 + 60), "timestamp"),
                        path("acme/app"),
                        EntryBody::Usage(Usage {
                            service: "llm.chat".into(),
                            model: Some(format!("model-{m}")),
                            tokens,
                            tags: [
                                ("feature".to_string(), format!("feature-{f}")),
                                ("team".to_string(), format!("team-{t}")),
                            ]
                            .into(),
                            ..Usage::default()
                        }),
                    ));
                }
            }
        }
    }
    let t = std::time::Instant::now();
    for (i, chunk) in entries.chunks(16_384).enumerate() {
        ok(s.apply((i * 16_384) as u64, chunk), "apply");
    }
    eprintln!(
        "applied {} entries (the rows of 10 M events) in {:?}",
        entries.len(),
        t.elapsed()
    );
    let filter = HourFilter {
        account: path("acme"),
        from_hour: Some(start),
        to_hour: Some(start + 720 * 3600),
    };
    let q = UsageQuery {
        account: path("acme"),
        group_by: vec![GroupBy::Model],
        bucket: None,
        tz: ciyuan_core::jiff::tz::TimeZone::UTC,
    };
    for round in 0..3 {
        let hourly = std::time::Instant::now();
        let by_hour = ok(s.tag_usage_hours(&filter, false), "tag_usage_hours").len();
        let hourly = hourly.elapsed();
        let t = std::time::Instant::now();
        let rows = ok(s.tag_usage_hours(&filter, true), "tag_usage_hours");
        let read = t.elapsed();
        eprintln!("round {round}: {by_hour} hourly rows read in {hourly:?}");
        // group_by=tag:feature,model with tag=team:team-1, as the handler groups.
        let mut parts: std::collections::BTreeMap<Option<String>, Vec<HourRow>> =
            Default::default();
        for (tags, row) in &rows {
            if tags.get("team").map(String::as_str) == Some("team-1") {
                parts
                    .entry(tags.get("feature").cloned())
                    .or_default()
                    .push(row.clone());
            }
        }
        let mut answer = 0;
        for part in parts.values() {
            answer += ok(aggregate(part, &q), "aggregate").len();
        }
        eprintln!(
            "round {round}: {} summed rows read in {read:?}; a month of feature by model for team-1 ({answer} answer rows) in {:?}",
            rows.len(),
            t.elapsed()
        );
    }
}
