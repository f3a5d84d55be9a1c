use super::*;
use ciyuan_core::{
    AccountPath, Band, ClockTime, Direction, Modality, PriceBook, PriceContract, PriceKey,
    PriceRule, Rounding, RoundingAt, RoundingMode, ServiceTier, Threshold, TierKey, TierKind,
    TierPeriod, Tiers, TimeWindow, TokenMap, UnitPrices,
};
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::OnceLock;

const LITELLM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/fixtures/litellm_model_prices.json"
);

fn d(s: &str) -> Decimal {
    Decimal::from_str_exact(s).unwrap()
}

fn key(s: &str) -> PriceKey {
    s.parse().unwrap()
}

fn prices(p: &[(&str, &str)]) -> UnitPrices {
    p.iter().map(|(k, v)| (key(k), d(v))).collect()
}

fn tokens(t: &[(&str, i64)]) -> TokenMap {
    let mut m = TokenMap::new();
    for (k, n) in t {
        let (a, b) = k.split_once('.').unwrap();
        m.add(a.parse().unwrap(), b.parse().unwrap(), *n).unwrap();
    }
    m
}

fn litellm_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(LITELLM).unwrap())
}

fn litellm_book() -> &'static PriceBook {
    static BOOK: OnceLock<PriceBook> = OnceLock::new();
    BOOK.get_or_init(|| {
        import_litellm(litellm_bytes())
            .unwrap()
            .into_book(
                Some("litellm"),
                1,
                "2026-01-01T00:00:00Z".parse().unwrap(),
                None,
            )
            .unwrap()
    })
}

fn input<'a>(
    model: &'a str,
    tier: ServiceTier,
    tokens: &'a TokenMap,
    measures: &'a BTreeMap<String, serde_json::Value>,
) -> RateInput<'a> {
    RateInput {
        model: Some(model),
        service: "llm.chat",
        tier,
        tokens,
        measures,
        at: "2027-03-03T12:00:00Z".parse().unwrap(),
        period_to_date: Decimal::ZERO,
    }
}

fn no_measures() -> &'static BTreeMap<String, serde_json::Value> {
    static EMPTY: OnceLock<BTreeMap<String, serde_json::Value>> = OnceLock::new();
    EMPTY.get_or_init(BTreeMap::new)
}

/// Rates with the rater, checks the naive path agrees and the verifier accepts.
fn rate_both(
    book: &PriceBook,
    contract: Option<(&AccountPath, &PriceContract)>,
    i: &RateInput<'_>,
) -> Rating {
    let rater = Rater::new(book, contract).unwrap();
    let fast = rater.rate(i).unwrap();
    let slow = rate_naive(book, contract, i).unwrap();
    assert_eq!(fast, slow);
    verify_rating(book, contract, i, &fast).unwrap();
    fast
}

#[test]
fn gpt_4o_million_in_200k_out_costs_4_50() {
    let book = litellm_book();
    let t = tokens(&[("text.input", 1_000_000), ("text.output", 200_000)]);
    let r = rate_both(
        book,
        None,
        &input("gpt-4o", ServiceTier::Standard, &t, no_measures()),
    );
    assert_eq!(r.amount, d("4.50"));
    assert_eq!(r.currency.as_str(), "USD");
    assert_eq!(r.lines.len(), 2);
    assert_eq!(r.lines[0].unit_price.to_string(), "0.0000025");
    assert_eq!(r.lines[1].unit_price.to_string(), "0.00001");
    assert!(!r.unpriced && r.missing.is_empty());
    // The batch tier is half; the priority tier has its own prices.
    let b = rate_both(
        book,
        None,
        &input("gpt-4o", ServiceTier::Batch, &t, no_measures()),
    );
    assert_eq!(b.amount, d("2.25"));
    let p = rate_both(
        book,
        None,
        &input("gpt-4o", ServiceTier::Priority, &t, no_measures()),
    );
    assert_eq!(p.amount, d("7.65"));
}

/// Ten models' prices against the file's own text, parsed by rust_decimal's own
/// scientific parser (not the importer's).
#[test]
fn ten_models_match_the_file() {
    let top: BTreeMap<String, &RawValue> = serde_json::from_slice(litellm_bytes()).unwrap();
    let book = litellm_book();
    let models = [
        "gpt-4o",
        "gpt-4o-mini",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "gemini/gemini-2.5-pro",
        "deepseek/deepseek-chat",
        "o3",
        "gemini-2.5-flash",
        "dashscope/qwen-max",
        "mistral/mistral-large-latest",
    ];
    let keys = [
        ("input_cost_per_token", "text.input", ServiceTier::Standard),
        (
            "output_cost_per_token",
            "text.output",
            ServiceTier::Standard,
        ),
        (
            "cache_read_input_token_cost",
            "text.cached_input",
            ServiceTier::Standard,
        ),
        (
            "cache_creation_input_token_cost",
            "text.cache_write",
            ServiceTier::Standard,
        ),
        (
            "input_cost_per_audio_token",
            "audio.input",
            ServiceTier::Standard,
        ),
        (
            "output_cost_per_audio_token",
            "audio.output",
            ServiceTier::Standard,
        ),
        (
            "input_cost_per_token_batches",
            "text.input",
            ServiceTier::Batch,
        ),
        (
            "output_cost_per_token_batches",
            "text.output",
            ServiceTier::Batch,
        ),
        (
            "input_cost_per_token_priority",
            "text.input",
            ServiceTier::Priority,
        ),
    ];
    let mut checked = 0;
    for m in models {
        let fields: BTreeMap<String, &RawValue> = serde_json::from_str(
            top.get(m)
                .unwrap_or_else(|| panic!("{m} not in the file"))
                .get(),
        )
        .unwrap();
        let mut seen = 0;
        for (file_key, ledger_key, tier) in keys {
            let Some(raw) = fields.get(file_key) else {
                continue;
            };
            let want = Decimal::from_scientific(raw.get())
                .or_else(|_| Decimal::from_str_exact(raw.get()))
                .unwrap();
            let rule = book
                .rules
                .iter()
                .find(|r| r.model.as_deref() == Some(m) && r.tier == tier)
                .unwrap_or_else(|| panic!("no {tier} rule for {m}"));
            assert_eq!(
                rule.unit_prices.get(&key(ledger_key)),
                Some(&want),
                "{m} {file_key}"
            );
            seen += 1;
        }
        assert!(seen >= 2, "{m}: only {seen} prices checked");
        checked += seen;
    }
    assert!(checked >= 30, "{checked}");
}

#[test]
fn unmapped_keys_are_listed_with_counts() {
    let import = import_litellm(litellm_bytes()).unwrap();
    let text = std::str::from_utf8(litellm_bytes()).unwrap();
    let un = &import.source.unmapped;
    assert!(!un.is_empty());
    assert!(
        un.contains(&"output_cost_per_image (342 models)".to_string()),
        "{un:?}"
    );
    assert!(
        !un.iter()
            .any(|k| k.starts_with("cache_creation_input_token_cost_above_1hr ")),
        "one-hour cache writes have their own key: {un:?}"
    );
    let sonnet = import
        .rules
        .iter()
        .find(|r| {
            r.model.as_deref() == Some("claude-sonnet-4-5") && r.tier == ServiceTier::Standard
        })
        .unwrap();
    assert_eq!(
        sonnet.unit_prices[&key("text.cache_write")],
        d("0.00000375")
    );
    assert_eq!(
        sonnet.unit_prices[&key("text.cache_write_1h")],
        d("0.000006")
    );
    for entry in un {
        let name = entry.split(" (").next().unwrap();
        let name = name.strip_prefix("tiered_pricing.").unwrap_or(name);
        let name = name.strip_prefix("off_peak_pricing.").unwrap_or(name);
        assert!(
            text.contains(&format!("\"{name}\"")),
            "{entry} is not a key of the file"
        );
    }
    assert_eq!(import.source.sha256.len(), 64);
    assert_eq!(import.currency.as_str(), "USD");
    // Every mapped key of gpt-4o made it: nothing of it is unmapped.
    assert!(!un.iter().any(|u| u.starts_with("input_cost_per_token ")));
}

#[test]
fn litellm_thresholds_tiers_and_off_peak() {
    let book = litellm_book();
    let rule = |m: &str| {
        book.rules
            .iter()
            .find(|r| r.model.as_deref() == Some(m) && r.tier == ServiceTier::Standard)
            .unwrap()
    };
    // `tiered_pricing` by range: the range from 0 is the base, the others thresholds.
    let q = rule("dashscope/qwen-flash");
    assert_eq!(q.unit_prices[&key("text.input")], d("0.00000005"));
    assert_eq!(q.above_input_tokens[0].input_tokens, 256_000);
    assert_eq!(
        q.above_input_tokens[0].unit_prices[&key("text.input")],
        d("0.00000025")
    );
    let small = tokens(&[("text.input", 256_000), ("text.output", 1000)]);
    let big = tokens(&[("text.input", 256_001), ("text.output", 1000)]);
    let m = no_measures();
    let a = rate_both(
        book,
        None,
        &input("dashscope/qwen-flash", ServiceTier::Standard, &small, m),
    );
    assert_eq!(a.lines[0].unit_price, d("0.00000005"));
    let b = rate_both(
        book,
        None,
        &input("dashscope/qwen-flash", ServiceTier::Standard, &big, m),
    );
    assert_eq!(b.lines[0].unit_price, d("0.00000025"));
    assert_eq!(b.lines[1].unit_price, d("0.000002"));
    // `_above_Nk_tokens`: a model with a 200k threshold.
    let above = book
        .rules
        .iter()
        .find(|r| {
            r.above_input_tokens
                .iter()
                .any(|t| t.input_tokens == 200_000)
        })
        .unwrap();
    assert!(
        above.above_input_tokens[0].unit_prices[&key("text.input")]
            > above.unit_prices[&key("text.input")]
    );
    // Reasoning is priced as output where the file names no reasoning price.
    assert_eq!(
        rule("gpt-4o").unit_prices[&key("text.reasoning")],
        d("0.00001")
    );
    // Off-peak windows in UTC: 16:00 UTC on a Wednesday is inside 10:00-00:00.
    let f = rule("deepseek-flash");
    assert!(!f.windows.is_empty());
    let t = tokens(&[("text.input", 1_000_000)]);
    let mut i = input("deepseek-flash", ServiceTier::Standard, &t, m);
    i.at = "2027-03-03T16:00:00Z".parse().unwrap();
    assert_eq!(rate_both(book, None, &i).amount, d("0.15"));
    i.at = "2027-03-03T02:00:00Z".parse().unwrap();
    assert_eq!(rate_both(book, None, &i).amount, d("0.3"));
}

#[test]
fn an_unknown_model_is_unpriced_and_a_key_without_price_is_missing() {
    let book = litellm_book();
    let t = tokens(&[("text.input", 10), ("video.output", 5)]);
    let r = rate_both(
        book,
        None,
        &input("no-such-model", ServiceTier::Standard, &t, no_measures()),
    );
    assert!(r.unpriced);
    assert_eq!(r.amount, Decimal::ZERO);
    assert!(r.lines.is_empty());
    let r = rate_both(
        book,
        None,
        &input("gpt-4o", ServiceTier::Standard, &t, no_measures()),
    );
    assert!(!r.unpriced);
    assert_eq!(r.missing, vec![key("video.output")]);
    assert_eq!(r.lines.len(), 1);
}

fn small_book(rules: Vec<PriceRule>, rounding: Rounding) -> PriceBook {
    PriceBook {
        tax: None,
        name: "b".into(),
        version: 3,
        currency: "CNY".parse().unwrap(),
        effective_from: "2027-01-01T00:00:00Z".parse().unwrap(),
        rounding,
        source: None,
        set_by: None,
        rules,
    }
}

fn exact_rounding() -> Rounding {
    Rounding {
        at: RoundingAt::Entry,
        to: 18,
        mode: RoundingMode::HalfEven,
    }
}

/// Window beats threshold beats tiers beats base, key by key.
#[test]
fn precedence_window_threshold_tiers_base() {
    let rule = PriceRule {
        model: Some("m*".into()),
        unit_prices: prices(&[
            ("text.input", "1"),
            ("text.output", "10"),
            ("text.cached_input", "0.5"),
        ]),
        above_input_tokens: vec![Threshold {
            input_tokens: 100,
            unit_prices: prices(&[("text.input", "2"), ("text.output", "20")]),
        }],
        tiers: Some(Tiers {
            kind: TierKind::Graduated,
            period: TierPeriod::Month,
            key: TierKey::Key(key("text.input")),
            bands: vec![
                Band {
                    up_to: Some(50),
                    unit_prices: prices(&[("text.input", "0.9")]),
                },
                Band {
                    up_to: None,
                    unit_prices: prices(&[("text.input", "0.8")]),
                },
            ],
        }),
        windows: vec![TimeWindow {
            from: "22:00".parse().unwrap(),
            to: "06:00".parse().unwrap(),
            time_zone: "Asia/Shanghai".into(),
            weekdays: vec![],
            unit_prices: prices(&[("text.output", "5")]),
        }],
        ..PriceRule::default()
    };
    let book = small_book(vec![rule], exact_rounding());
    let m = no_measures();
    // Below the threshold, in the day: input by the graduated bands (40 already used
    // this month: 10 at 0.9, 30 at 0.8), output at base.
    let t = tokens(&[("text.input", 40), ("text.output", 10)]);
    let mut i = input("m1", ServiceTier::Standard, &t, m);
    i.period_to_date = d("40");
    let r = rate_both(&book, None, &i);
    let got: Vec<(String, String, String)> = r
        .lines
        .iter()
        .map(|l| {
            (
                l.key.to_string(),
                l.quantity.to_string(),
                l.unit_price.to_string(),
            )
        })
        .collect();
    let want = [
        ("text.input", "10", "0.9"),
        ("text.input", "30", "0.8"),
        ("text.output", "10", "10"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    assert_eq!(r.amount, d("133"));
    // Above the threshold (cached input counts as input): threshold beats tiers.
    let t = tokens(&[
        ("text.input", 60),
        ("text.cached_input", 41),
        ("text.output", 10),
    ]);
    let mut i = input("m1", ServiceTier::Standard, &t, m);
    let r = rate_both(&book, None, &i);
    assert_eq!(r.lines[0].unit_price, d("2"));
    assert_eq!(r.lines[1].unit_price, d("0.5")); // cached: only the base names it
    assert_eq!(r.lines[2].unit_price, d("20"));
    // At 23:00 in Shanghai (15:00 UTC) the window beats the threshold for output.
    i.at = "2027-03-03T15:00:00Z".parse().unwrap();
    let r = rate_both(&book, None, &i);
    assert_eq!(r.lines[2].unit_price, d("5"));
    assert_eq!(r.lines[0].unit_price, d("2"));
}

#[test]
fn volume_tiers_price_the_whole_quantity_at_the_band_reached() {
    let rule = PriceRule {
        service: Some("doc.*".into()),
        per_request: Some(d("0.01")),
        tiers: Some(Tiers {
            kind: TierKind::Volume,
            period: TierPeriod::Day,
            key: TierKey::Key(key("measure.pages")),
            bands: vec![
                Band {
                    up_to: Some(100),
                    unit_prices: prices(&[("measure.pages", "0.2")]),
                },
                Band {
                    up_to: None,
                    unit_prices: prices(&[("measure.pages", "0.1")]),
                },
            ],
        }),
        ..PriceRule::default()
    };
    let book = small_book(vec![rule], exact_rounding());
    let t = TokenMap::new();
    let measures: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(r#"{"pages": 12.5, "dpi": 300}"#).unwrap();
    let mut i = RateInput {
        model: None,
        service: "doc.verify",
        tier: ServiceTier::Standard,
        tokens: &t,
        measures: &measures,
        at: "2027-03-03T12:00:00Z".parse().unwrap(),
        period_to_date: d("87.5"),
    };
    let r = rate_both(&book, None, &i);
    // 87.5 + 12.5 = 100: still the first band; the dpi measure is not priced.
    assert_eq!(r.amount, d("2.51"));
    i.period_to_date = d("88");
    assert_eq!(rate_both(&book, None, &i).amount, d("1.26"));
    let rater = Rater::new(&book, None).unwrap();
    let counter = rater.tier_counter(&i).unwrap().unwrap();
    assert_eq!(counter.period, TierPeriod::Day);
    assert_eq!(
        counter.rule, "|doc.*|standard",
        "the rule's patterns as written"
    );
    assert_eq!(counter.units, d("12.5"), "the pages the tiers count");
    let bad: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(r#"{"pages": "many"}"#).unwrap();
    i.measures = &bad;
    assert_eq!(
        rater.rate(&i).unwrap_err().to_string(),
        "measures.pages: \"many\" is not a number"
    );
}

#[test]
fn tier_rules_fall_back_to_standard_key_by_key() {
    let book = small_book(
        vec![
            PriceRule {
                model: Some("x".into()),
                tier: ServiceTier::Flex,
                unit_prices: prices(&[("text.input", "1")]),
                ..PriceRule::default()
            },
            PriceRule {
                model: Some("x".into()),
                unit_prices: prices(&[("text.input", "2"), ("text.output", "4")]),
                per_request: Some(d("0.5")),
                ..PriceRule::default()
            },
        ],
        exact_rounding(),
    );
    let t = tokens(&[("text.input", 1), ("text.output", 1)]);
    let m = no_measures();
    let r = rate_both(&book, None, &input("X", ServiceTier::Flex, &t, m));
    assert_eq!(r.amount, d("5.5")); // 1 flex + 4 standard + 0.5 per request
    let r = rate_both(&book, None, &input("x", ServiceTier::Batch, &t, m));
    assert_eq!(r.amount, d("6.5")); // no batch rule: all standard
}

#[test]
fn contracts_override_then_discount_then_markup() {
    let book = small_book(
        vec![PriceRule {
            model: Some("*".into()),
            unit_prices: prices(&[("text.input", "0.003"), ("text.output", "0.007")]),
            ..PriceRule::default()
        }],
        Rounding {
            at: RoundingAt::Entry,
            to: 2,
            mode: RoundingMode::HalfUp,
        },
    );
    let node: AccountPath = "acme/cn".parse().unwrap();
    let contract = PriceContract {
        book: "b".into(),
        overrides: vec![PriceRule {
            model: Some("special".into()),
            unit_prices: prices(&[("text.input", "0.001")]),
            ..PriceRule::default()
        }],
        discount_percent: Some(d("10")),
        markup_percent: Some(d("20")),
        minimum_commitment: None,
        service_levels: Vec::new(),
        set_by: Some("acme".parse().unwrap()),
    };
    let t = tokens(&[("text.input", 5), ("text.output", 5)]);
    let m = no_measures();
    // 5×0.003 + 5×0.007 = 0.05; ×0.9 = 0.045; ×1.2 = 0.054 → 0.05.
    let r = rate_both(
        &book,
        Some((&node, &contract)),
        &input("any", ServiceTier::Standard, &t, m),
    );
    assert_eq!(r.amount, d("0.05"));
    assert_eq!(r.contract, Some(node.clone()));
    // The override names no output price: output is missing, not taken from the book.
    let r = rate_both(
        &book,
        Some((&node, &contract)),
        &input("special", ServiceTier::Standard, &t, m),
    );
    assert_eq!(r.missing, vec![key("text.output")]);
    assert_eq!(r.amount, d("0.01")); // 0.005 × 0.9 × 1.2 = 0.0054
    let mut other = contract.clone();
    other.book = "other".into();
    assert!(
        Rater::new(&book, Some((&node, &other)))
            .unwrap_err()
            .to_string()
            .starts_with("book: the contract of acme/cn prices with book \"other\"")
    );
}

#[test]
fn a_flipped_price_or_amount_is_caught() {
    let book = litellm_book();
    let t = tokens(&[
        ("text.input", 1234),
        ("text.cached_input", 100),
        ("text.output", 567),
    ]);
    let i = input("gpt-4o-mini", ServiceTier::Standard, &t, no_measures());
    let rater = Rater::new(book, None).unwrap();
    let good = rater.rate(&i).unwrap();
    verify_rating(book, None, &i, &good).unwrap();
    let mut r = good.clone();
    r.lines[0].unit_price += d("0.0000001");
    let e = verify_rating(book, None, &i, &r).unwrap_err();
    assert_eq!(e.field, "lines[0].unit_price");
    let mut r = good.clone();
    r.amount += d("0.0000000001");
    assert_eq!(
        verify_rating(book, None, &i, &r).unwrap_err().field,
        "amount"
    );
    let mut r = good.clone();
    r.version = 2;
    assert_eq!(
        verify_rating(book, None, &i, &r).unwrap_err().to_string(),
        "version: the book gives 1, the entry has 2"
    );
    // A book whose price was flipped no longer verifies the entry.
    let mut flipped = book.clone();
    let rule = flipped
        .rules
        .iter_mut()
        .find(|r| r.model.as_deref() == Some("gpt-4o-mini"))
        .unwrap();
    *rule.unit_prices.get_mut(&key("text.output")).unwrap() = d("0.0000006001");
    assert_eq!(
        verify_rating(&flipped, None, &i, &good).unwrap_err().field,
        "lines[2].unit_price"
    );
}

#[test]
fn max_cost_bounds_the_request_before_it_runs() {
    let book = small_book(
        vec![PriceRule {
            model: Some("r1".into()),
            unit_prices: prices(&[
                ("text.input", "1"),
                ("text.output", "2"),
                ("text.reasoning", "3"),
            ]),
            ..PriceRule::default()
        }],
        exact_rounding(),
    );
    let rater = Rater::new(&book, None).unwrap();
    let prompt = tokens(&[("text.input", 10)]);
    let i = input("r1", ServiceTier::Standard, &prompt, no_measures());
    let max = rater.max_cost(&i, 100).unwrap().unwrap();
    assert_eq!(max.amount, d("310")); // all 100 as reasoning, the dearer
    // Any split of the output costs no more.
    for reasoning in [0, 1, 50, 99, 100] {
        let t = tokens(&[
            ("text.input", 10),
            ("text.output", 100 - reasoning),
            ("text.reasoning", reasoning),
        ]);
        let r = rater
            .rate(&input("r1", ServiceTier::Standard, &t, no_measures()))
            .unwrap();
        assert!(r.amount <= max.amount);
    }
    assert_eq!(
        rater
            .max_cost(
                &input("other", ServiceTier::Standard, &prompt, no_measures()),
                100
            )
            .unwrap(),
        None
    );
    // gpt-4o: 1,000 prompt tokens and up to 500 out.
    let t = tokens(&[("text.input", 1000)]);
    let m = litellm_rater()
        .max_cost(
            &input("gpt-4o", ServiceTier::Standard, &t, no_measures()),
            500,
        )
        .unwrap()
        .unwrap();
    assert_eq!(m.amount, d("0.0075"));
}

#[test]
fn negative_counts_are_refused() {
    let book = litellm_book();
    let t = tokens(&[("text.input", -1)]);
    let i = input("gpt-4o", ServiceTier::Standard, &t, no_measures());
    let e = Rater::new(book, None).unwrap().rate(&i).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tokens.text.input: -1 is negative; only usage is rated"
    );
    assert_eq!(rate_naive(book, None, &i).unwrap_err(), e);
}

const TOML_BOOK: &str = r#"
name = "list"
currency = "CNY"
effective_from = 2027-01-01T00:00:00Z
[rounding]
to = 6
mode = "half_up"
[[rules]]
model = "qwen-max*"
unit_prices = { "text.input" = "0.0000024", "text.output" = 9.6e-06, "text.cached_input" = 0.00000048 }
[[rules.above_input_tokens]]
input_tokens = 128_000
unit_prices = { "text.input" = "0.0000048" }
[[rules.windows]]
from = "00:30"
to = "08:30"
time_zone = "Asia/Shanghai"
unit_prices = { "text.input" = "0.0000012" }
[[rules]]
model = "qwen-max*"
tier = "batch"
unit_prices = { "text.input" = 1.2e-6 }
[[rules]]
service = "doc.verify"
per_request = 1
[rules.tiers]
kind = "graduated"
period = "month"
key = "measure.pages"
bands = [
  { up_to = 10000, unit_prices = { "measure.pages" = "0.002" } },
  { unit_prices = { "measure.pages" = 0.001 } },
]
"#;

#[test]
fn toml_books_import_exactly() {
    let import = import_toml(TOML_BOOK).unwrap();
    assert_eq!(import.name.as_deref(), Some("list"));
    assert_eq!(import.source.format, "toml");
    let book = import
        .into_book(
            None,
            4,
            "2030-01-01T00:00:00Z".parse().unwrap(),
            Some("acme".parse().unwrap()),
        )
        .unwrap();
    assert_eq!(book.effective_from.to_string(), "2027-01-01T00:00:00Z");
    assert_eq!(book.version, 4);
    assert_eq!(book.rounding.mode, RoundingMode::HalfUp);
    let r = &book.rules[0];
    assert_eq!(r.unit_prices[&key("text.output")].to_string(), "0.0000096");
    assert_eq!(
        r.unit_prices[&key("text.cached_input")].to_string(),
        "0.00000048"
    );
    assert_eq!(r.above_input_tokens[0].input_tokens, 128_000);
    assert_eq!(r.windows[0].from, "00:30".parse::<ClockTime>().unwrap());
    assert_eq!(book.rules[1].tier, ServiceTier::Batch);
    assert_eq!(
        book.rules[1].unit_prices[&key("text.input")].to_string(),
        "0.0000012"
    );
    assert_eq!(book.rules[2].per_request, Some(d("1")));
    // The book round-trips through the ledger's JSON.
    let json = serde_json::to_string(&book).unwrap();
    assert_eq!(serde_json::from_str::<PriceBook>(&json).unwrap(), book);
    // Rated: 1M input tokens at 1.2e-6 × 0.5 hours... at 03:00 Shanghai (window).
    let t = tokens(&[("text.input", 1_000_000)]);
    let mut i = input("qwen-max-latest", ServiceTier::Standard, &t, no_measures());
    i.at = "2027-03-02T19:00:00Z".parse().unwrap();
    assert_eq!(rate_both(&book, None, &i).amount, d("1.2"));
}

#[test]
fn toml_errors_name_the_field() {
    let err = |text: &str| import_toml(text).unwrap_err().to_string();
    let base = "name = \"x\"\ncurrency = \"USD\"\n";
    assert!(
        err(&format!(
            "{base}[[rules]]\nmodel = \"a\"\nunit_price = {{}}\n"
        ))
        .contains("unknown field `unit_price`")
    );
    assert!(
        err(&format!(
            "{base}[[rules]]\nmodel = \"a\"\nunit_prices = {{ \"text.input\" = -1.5 }}\n"
        ))
        .starts_with("rules[0].unit_prices.text.input: price -1.5 is negative")
    );
    let inf = err(&format!(
        "{base}[[rules]]\nmodel = \"a\"\nunit_prices = {{ \"text.input\" = inf }}\n"
    ));
    assert!(
        inf.starts_with("rules[0].unit_prices.text.input: "),
        "{inf}"
    );
    assert!(
        err(&format!(
            "{base}[[rules]]\nmodel = \"a\"\nunit_prices = {{ \"text.inptu\" = 1 }}\n"
        ))
        .contains("text.inptu")
    );
    assert!(err("name = \"x\"\ncurrency = \"usd\"\n").contains("\"usd\" is not a three-letter"));
    assert!(err("name = \n").starts_with("toml: "));
}

#[test]
fn imports_are_bounded() {
    let big = " ".repeat(MAX_IMPORT_BYTES + 1);
    let e = import_toml(&big).unwrap_err().to_string();
    assert!(e.starts_with("file: 16777217 bytes is more than"), "{e}");
    assert!(import_litellm(big.as_bytes()).is_err());
}

#[test]
fn diff_lists_rules_and_prices() {
    let old = import_toml(TOML_BOOK)
        .unwrap()
        .into_book(None, 1, "2027-01-01T00:00:00Z".parse().unwrap(), None)
        .unwrap();
    let mut new = old.clone();
    new.version = 2;
    new.rules[0]
        .unit_prices
        .insert(key("text.output"), d("0.00001"));
    new.rules[0].above_input_tokens[0]
        .unit_prices
        .insert(key("text.output"), d("0.00002"));
    new.rules.remove(1);
    new.rules.push(PriceRule {
        model: Some("glm-4*".into()),
        unit_prices: prices(&[("text.input", "1")]),
        ..PriceRule::default()
    });
    new.rounding.to = 2;
    let changes: Vec<String> = diff(&old, &new).iter().map(|c| c.to_string()).collect();
    assert_eq!(
        changes,
        [
            "~ rounding: HalfUp to 6 places -> HalfUp to 2 places",
            "- model=qwen-max* tier=batch",
            "~ model=qwen-max* tier=standard above 128000: text.output: - -> 0.00002",
            "~ model=qwen-max* tier=standard text.output: 0.0000096 -> 0.00001",
            "+ model=glm-4* tier=standard",
        ]
    );
    assert!(diff(&old, &old).is_empty());
}

// ---- property tests: the rater and the naive recomputation agree ----

/// Quantities, thresholds and band bounds from one small set, and neighbours, so
/// inputs land on the edges where `>` and `>=` part.
fn edge() -> impl Strategy<Value = u64> {
    (
        prop::sample::select(vec![10u64, 50, 100, 200, 1000]),
        -1i64..=1,
    )
        .prop_map(|(e, d)| (e as i64 + d) as u64)
}

/// Times of day on the hour, where windows start and end.
fn clock() -> impl Strategy<Value = u16> {
    prop_oneof![3 => (0u16..24).prop_map(|h| h * 60), 1 => 0u16..1440]
}

fn arb_price() -> impl Strategy<Value = Decimal> {
    (0u64..1_000_000, 0u32..10).prop_map(|(m, s)| Decimal::new(m as i64, s))
}

fn arb_key() -> impl Strategy<Value = PriceKey> {
    prop_oneof![
        Just(key("text.input")),
        Just(key("text.cached_input")),
        Just(key("text.cache_write")),
        Just(key("text.output")),
        Just(key("text.reasoning")),
        Just(key("audio.input")),
        Just(key("measure.pages")),
    ]
}

fn arb_prices() -> impl Strategy<Value = UnitPrices> {
    prop::collection::btree_map(arb_key(), arb_price(), 0..6)
}

fn arb_tiers() -> impl Strategy<Value = Tiers> {
    (
        prop_oneof![Just(TierKind::Graduated), Just(TierKind::Volume)],
        prop_oneof![Just(TierKey::All), arb_key().prop_map(TierKey::Key)],
        prop::collection::btree_set(edge(), 0..3),
        prop::collection::btree_set(arb_key(), 1..3),
        prop::collection::vec(arb_price(), 8),
    )
        .prop_map(|(kind, key, ups, keys, ps)| {
            let mut ups: Vec<Option<u64>> = ups.into_iter().map(Some).collect();
            ups.push(None);
            let bands = ups
                .into_iter()
                .enumerate()
                .map(|(i, up_to)| Band {
                    up_to,
                    unit_prices: keys
                        .iter()
                        .enumerate()
                        .map(|(j, k)| (k.clone(), ps[(i * 2 + j) % ps.len()]))
                        .collect(),
                })
                .collect();
            Tiers {
                kind,
                period: TierPeriod::Month,
                key,
                bands,
            }
        })
}

fn arb_window() -> impl Strategy<Value = TimeWindow> {
    (
        clock(),
        clock(),
        prop::sample::select(vec!["UTC", "Asia/Shanghai", "America/New_York"]),
        prop::collection::vec(1u8..=7, 0..3),
        arb_prices(),
    )
        .prop_map(|(a, b, tz, weekdays, unit_prices)| TimeWindow {
            from: format!("{:02}:{:02}", a / 60, a % 60).parse().unwrap(),
            to: format!("{:02}:{:02}", b / 60, b % 60).parse().unwrap(),
            time_zone: tz.to_string(),
            weekdays,
            unit_prices,
        })
}

fn arb_rule() -> impl Strategy<Value = PriceRule> {
    (
        prop::option::of(prop::sample::select(vec!["gpt-4o", "gpt-4o*", "*mini", "claude*", "GPT-4O-MINI", "*"])),
        prop::option::of(prop::sample::select(vec!["llm.chat", "llm.*", "doc.verify"])),
        prop_oneof![3 => Just(ServiceTier::Standard), 1 => Just(ServiceTier::Batch), 1 => Just(ServiceTier::Flex)],
        arb_prices(),
        prop::option::of(arb_price()),
        prop::collection::btree_map(edge(), arb_prices(), 0..3),
        prop::option::of(arb_tiers()),
        prop::collection::vec(arb_window(), 0..2),
    )
        .prop_map(|(model, service, tier, unit_prices, per_request, th, tiers, windows)| PriceRule {
            model: model.map(str::to_string).or_else(|| service.is_none().then(|| "*".to_string())),
            service: service.map(str::to_string),
            tier,
            unit_prices,
            per_request,
            above_input_tokens: th.into_iter().map(|(input_tokens, unit_prices)| Threshold { input_tokens, unit_prices }).collect(),
            tiers,
            windows,
        })
}

fn arb_rounding() -> impl Strategy<Value = Rounding> {
    (
        0u32..=12,
        prop_oneof![
            Just(RoundingMode::HalfEven),
            Just(RoundingMode::HalfUp),
            Just(RoundingMode::Down),
            Just(RoundingMode::Up)
        ],
    )
        .prop_map(|(to, mode)| Rounding {
            at: RoundingAt::Entry,
            to,
            mode,
        })
}

fn arb_tokens() -> impl Strategy<Value = TokenMap> {
    let keys = vec![
        (Modality::Text, Direction::Input),
        (Modality::Text, Direction::CachedInput),
        (Modality::Text, Direction::CacheWrite),
        (Modality::Text, Direction::Output),
        (Modality::Text, Direction::Reasoning),
        (Modality::Audio, Direction::Input),
        (Modality::Video, Direction::Output),
    ];
    prop::collection::btree_map(
        prop::sample::select(keys),
        prop_oneof![
            4 => edge().prop_map(|e| e as i64),
            4 => edge().prop_map(|e| e as i64 / 2),
            1 => Just(0i64),
            1 => 1i64..2_000_000_000,
        ],
        1..6,
    )
    .prop_map(|m| {
        let mut t = TokenMap::new();
        for ((a, b), n) in m {
            t.add(a, b, n).unwrap();
        }
        t
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn rater_and_naive_recomputation_agree(
        rules in prop::collection::vec(arb_rule(), 0..6),
        overrides in prop::collection::vec(arb_rule(), 0..2),
        with_contract in any::<bool>(),
        discount in prop::option::of((0u32..=10000).prop_map(|p| Decimal::new(p.into(), 2))),
        markup in prop::option::of((0u32..=5000).prop_map(|p| Decimal::new(p.into(), 1))),
        rounding in arb_rounding(),
        model in prop_oneof![
            1 => Just(None),
            6 => prop::sample::select(vec!["gpt-4o", "gpt-4o-mini", "claude-3", "llama"]).prop_map(Some),
        ],
        service in prop::sample::select(vec!["llm.chat", "doc.verify"]),
        tier in prop_oneof![Just(ServiceTier::Standard), Just(ServiceTier::Batch), Just(ServiceTier::Flex), Just(ServiceTier::Priority)],
        tokens in arb_tokens(),
        pages in prop::option::of((0u64..100_000, 0u32..3)),
        secs in prop_oneof![
            // On the hour (the windows' edges in UTC, Shanghai and New York), a
            // second before, or anywhere.
            3 => (0i64..24 * 14, prop_oneof![Just(0i64), Just(-1)]).prop_map(|(h, s)| 1_804_032_000 + h * 3600 + s),
            1 => 1_700_000_000i64..1_900_000_000,
        ],
        ptd in prop_oneof![edge(), edge().prop_map(|e| e / 2), Just(0), 0u64..5000],
    ) {
        let book = small_book(rules, rounding);
        prop_assume!(book.check().is_ok());
        let node: AccountPath = "acme/a".parse().unwrap();
        let contract = PriceContract {
            book: "b".into(),
            overrides,
            discount_percent: discount,
            markup_percent: markup,
            minimum_commitment: None,
            service_levels: Vec::new(),
            set_by: None,
        };
        let contract = with_contract.then_some((&node, &contract));
        let mut measures = BTreeMap::new();
        if let Some((m, s)) = pages {
            measures.insert("pages".to_string(), serde_json::from_str(&Decimal::new(m as i64, s).to_string()).unwrap());
        }
        let i = RateInput {
            model,
            service,
            tier,
            tokens: &tokens,
            measures: &measures,
            at: ciyuan_core::jiff::Timestamp::from_second(secs).unwrap(),
            period_to_date: Decimal::from(ptd),
        };
        let rater = Rater::new(&book, contract).unwrap();
        let fast = rater.rate(&i).unwrap();
        let slow = rate_naive(&book, contract, &i).unwrap();
        prop_assert_eq!(&fast, &slow);
        // Rated twice (the second from the cache): the same.
        prop_assert_eq!(&rater.rate(&i).unwrap(), &fast);
        // Built in its box (as ingest rates): the same.
        prop_assert_eq!(&*rater.rate_boxed(&i).unwrap(), &fast);
        prop_assert!(verify_rating(&book, contract, &i, &fast).is_ok());
        // Each line is exact; the total is the book's rounding of the adjusted sum.
        let mut sum = Decimal::ZERO;
        for l in &fast.lines {
            prop_assert_eq!(l.amount, l.quantity * l.unit_price);
            sum += l.amount;
        }
        let adjusted = Rating::adjust(sum, fast.discount_percent, fast.markup_percent).unwrap();
        prop_assert_eq!(fast.amount, rounding.apply(adjusted));
        prop_assert!(fast.amount.scale() <= rounding.to);
        // Changing any line's price is caught.
        if let Some(l) = fast.lines.first() {
            let mut bad = fast.clone();
            bad.lines[0].unit_price = l.unit_price + Decimal::new(1, 12);
            prop_assert!(verify_rating(&book, contract, &i, &bad).is_err());
        }
    }

    #[test]
    fn rounding_follows_the_rule_exactly(
        m in any::<i64>(),
        scale in 0u32..=20,
        rounding in arb_rounding(),
    ) {
        let v = Decimal::new(m, scale);
        let got = rounding.apply(v);
        prop_assert_eq!(Some(got), round_naive(v, &rounding));
        prop_assert!(got.scale() <= rounding.to.max(v.scale()));
        // Within one unit of the last place kept, on the side the mode says.
        let unit = Decimal::new(1, rounding.to);
        let diff = got - v;
        prop_assert!(diff.abs() < unit);
        match rounding.mode {
            RoundingMode::Down => prop_assert!(got.abs() <= v.abs()),
            RoundingMode::Up => prop_assert!(got.abs() >= v.abs()),
            RoundingMode::HalfUp | RoundingMode::HalfEven => prop_assert!(diff.abs() * Decimal::TWO <= unit),
        }
    }

    /// Imports read untrusted uploads (`POST /api/v1/prices`): any bytes give a book
    /// or an error, never a panic. Mutations of real documents reach deeper than
    /// random text.
    #[test]
    fn imports_never_panic(
        text in ".{0,200}",
        cut in 0usize..2000,
        flip in 0usize..2000,
        byte in any::<u8>(),
    ) {
        let _ = import_toml(&text);
        let _ = import_litellm(text.as_bytes());
        let _ = ciyuan_core::decimal_from_text(&text);
        let mut toml = TOML_BOOK.as_bytes().to_vec();
        if !toml.is_empty() {
            let i = flip % toml.len();
            toml[i] = byte;
            toml.truncate(cut.max(i));
        }
        let _ = import_toml(&String::from_utf8_lossy(&toml));
        let sample = br#"{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token_above_200k_tokens_batches": 2.5e-06,
            "tiered_pricing": [{"input_cost_per_token": 1e-07, "range": [0, 1000.0]}, {"input_cost_per_token": 2e-07, "range": [1000.0, 5000]}],
            "off_peak_pricing": {"input_cost_per_token": 5e-08, "windows": [{"hours_utc": ["00:00-08:00"], "weekdays": [1, 2]}]}}}"#;
        let unmutated = import_litellm(sample).unwrap();
        prop_assert_eq!(unmutated.rules.len(), 2);
        prop_assert!(import_toml(TOML_BOOK).is_ok());
        let mut json = sample.to_vec();
        let i = flip % json.len();
        json[i] = byte;
        json.truncate(cut.max(i + 1));
        let _ = import_litellm(&json);
    }

    #[test]
    fn decimal_text_round_trips(m in any::<i64>(), scale in 0u32..=18, exp in -6i32..6) {
        let v = Decimal::new(m, scale);
        prop_assert_eq!(ciyuan_core::decimal_from_text(&v.to_string()).unwrap(), v);
        // The same number in scientific notation.
        let sci = format!("{}e{}", v, exp);
        let back = ciyuan_core::decimal_from_text(&sci).unwrap();
        let want = if exp >= 0 {
            v * Decimal::from(10i64.pow(exp.unsigned_abs()))
        } else {
            v / Decimal::from(10i64.pow(exp.unsigned_abs()))
        };
        prop_assert_eq!(back, want);
    }
}

fn litellm_rater() -> &'static Rater {
    static RATER: OnceLock<Rater> = OnceLock::new();
    RATER.get_or_init(|| Rater::new(litellm_book(), None).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Real prices (thresholds, tiers, off-peak windows, per-request prices): the
    /// rater, its cache and the naive recomputation agree model by model.
    #[test]
    fn litellm_book_rated_two_ways_agrees(
        pick in any::<prop::sample::Index>(),
        upper in any::<bool>(),
        tier in prop_oneof![Just(ServiceTier::Standard), Just(ServiceTier::Batch), Just(ServiceTier::Flex), Just(ServiceTier::Priority)],
        tokens in arb_tokens(),
        big in prop::sample::select(vec![0i64, 128_000, 200_000, 256_000, 272_000, 1_000_000]),
        secs in 1_800_000_000i64..1_800_700_000,
    ) {
        let book = litellm_book();
        let rule = &book.rules[pick.index(book.rules.len())];
        let model = rule.model.clone().unwrap();
        let model = if upper { model.to_uppercase() } else { model };
        let mut tokens = tokens;
        tokens.add(Modality::Text, Direction::Input, big).unwrap();
        let i = RateInput {
            model: Some(&model),
            service: "llm.chat",
            tier,
            tokens: &tokens,
            measures: no_measures(),
            at: ciyuan_core::jiff::Timestamp::from_second(secs).unwrap(),
            period_to_date: Decimal::ZERO,
        };
        let fast = litellm_rater().rate(&i).unwrap();
        // Unpriced only where the table has no price of that tier and none standard
        // (fireworks_ai/.../minimax-m2p7 has priority prices alone).
        let priced_tier = book.rules.iter().any(|r| {
            r.model == rule.model && (r.tier == ServiceTier::Standard || r.tier == tier)
        });
        prop_assert_eq!(fast.unpriced, !priced_tier, "{}", model);
        prop_assert_eq!(&fast, &rate_naive(book, None, &i).unwrap());
        prop_assert!(verify_rating(book, None, &i, &fast).is_ok());
    }
}

/// `cargo test -p ciyuan-price --release -- --ignored --nocapture bench`
#[test]
#[ignore]
fn bench_rating_litellm_gpt_4o() {
    let book = litellm_book();
    let rater = Rater::new(book, None).unwrap();
    let t = tokens(&[
        ("text.input", 1200),
        ("text.cached_input", 800),
        ("text.output", 350),
        ("text.reasoning", 120),
    ]);
    let i = input("gpt-4o", ServiceTier::Standard, &t, no_measures());
    bench_rating(&rater, &i, 10_000).unwrap();
    // The machine is shared: the best of rounds is the cost, the median the noise.
    let n = 200_000;
    let mut rounds: Vec<f64> = (0..9)
        .map(|_| bench_rating(&rater, &i, n).unwrap().as_nanos() as f64 / f64::from(n))
        .collect();
    rounds.sort_by(f64::total_cmp);
    println!(
        "rating: {:.1} ns/entry best, {:.1} median, of 9 rounds of {n} gpt-4o entries (4 token keys) on the LiteLLM book ({} rules)",
        rounds[0],
        rounds[4],
        book.rules.len()
    );
}

/// Where the time goes: the fixed cost (an unpriced entry), one key, four keys.
#[test]
#[ignore]
fn bench_rating_parts() {
    let book = litellm_book();
    let rater = Rater::new(book, None).unwrap();
    let run = |label: &str, t: &TokenMap, model: &str| {
        let i = input(model, ServiceTier::Standard, t, no_measures());
        let n = 200_000;
        let mut rounds: Vec<f64> = (0..9)
            .map(|_| bench_rating(&rater, &i, n).unwrap().as_nanos() as f64 / f64::from(n))
            .collect();
        rounds.sort_by(f64::total_cmp);
        println!("{label}: {:.1} best {:.1} median", rounds[0], rounds[4]);
    };
    let t0 = tokens(&[("text.input", 1200)]);
    let t4 = tokens(&[
        ("text.input", 1200),
        ("text.cached_input", 800),
        ("text.output", 350),
        ("text.reasoning", 120),
    ]);
    run("unpriced 4 keys", &t4, "nope");
    run("gpt-4o 1 key", &t0, "gpt-4o");
    run("gpt-4o 4 keys", &t4, "gpt-4o");
}

/// The TOML example of the crate documentation imports and checks.
#[test]
fn the_documented_toml_example_imports() {
    let doc = include_str!("lib.rs");
    let start = doc.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
    let end = start + doc[start..].find("//! ```\n").unwrap();
    let text: String = doc[start..end]
        .lines()
        .map(|l| {
            l.strip_prefix("//!")
                .unwrap()
                .strip_prefix(' ')
                .unwrap_or("")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let import = import_toml(&text).unwrap();
    assert_eq!(import.rules.len(), 3);
    let book = import
        .into_book(None, 1, "2027-01-01T00:00:00Z".parse().unwrap(), None)
        .unwrap();
    assert_eq!(
        book.rules[0].unit_prices[&key("text.output")],
        d("0.0000096")
    );
    assert_eq!(book.rules[2].tiers.as_ref().unwrap().bands.len(), 2);
}

/// Rates `CIYUAN_BENCH_N` gpt-4o entries, nothing else: for counting instructions
/// with `perf stat -e instructions:u` at two values of N, a figure a loaded machine
/// does not blur.
#[test]
#[ignore]
fn bench_rating_loop() {
    let n: u32 = std::env::var("CIYUAN_BENCH_N").map_or(0, |v| v.parse().unwrap());
    let rater = litellm_rater();
    let t = tokens(&[
        ("text.input", 1200),
        ("text.cached_input", 800),
        ("text.output", 350),
        ("text.reasoning", 120),
    ]);
    let i = input("gpt-4o", ServiceTier::Standard, &t, no_measures());
    bench_rating(rater, &i, n).unwrap();
}

/// A model the table prices only at the priority tier is unpriced at the others (and
/// so raises an incident), never silently priced by another tier's numbers.
#[test]
fn a_model_priced_only_at_priority_is_unpriced_at_standard() {
    let model = "fireworks_ai/accounts/fireworks/models/minimax-m2p7";
    let t = tokens(&[("text.input", 10)]);
    let standard = litellm_rater()
        .rate(&input(model, ServiceTier::Standard, &t, no_measures()))
        .unwrap();
    assert!(standard.unpriced, "{standard:?}");
    let priority = litellm_rater()
        .rate(&input(model, ServiceTier::Priority, &t, no_measures()))
        .unwrap();
    assert!(!priority.unpriced);
    assert_eq!(
        priority.amount,
        Decimal::from_str_exact("0.000012").unwrap()
    );
}

#[test]
fn tier_periods_start_at_local_midnight_and_the_first_of_the_month() {
    use ciyuan_core::jiff::tz::TimeZone;
    let shanghai = TimeZone::get("Asia/Shanghai").unwrap();
    let at: ciyuan_core::jiff::Timestamp = "2026-11-30T17:30:00Z".parse().unwrap();
    // 01:30 on 1 December in Shanghai.
    assert_eq!(
        crate::period_start(TierPeriod::Month, &shanghai, at).unwrap(),
        "2026-11-30T16:00:00Z".parse().unwrap()
    );
    assert_eq!(
        crate::period_start(TierPeriod::Day, &shanghai, at).unwrap(),
        "2026-11-30T16:00:00Z".parse().unwrap()
    );
    assert_eq!(
        crate::period_start(TierPeriod::Month, &TimeZone::UTC, at).unwrap(),
        "2026-11-01T00:00:00Z".parse().unwrap()
    );
}
