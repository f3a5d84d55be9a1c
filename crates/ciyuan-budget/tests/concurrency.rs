//! Many threads racing for the last tokens of one hard limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};

use ciyuan_budget::{Admission, Engine, LimitScope, LimitSpec, Measure, Period, Selector};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Direction, Modality, TokenMap};

const AMOUNT: u64 = 5_000;
const THREADS: u64 = 8;

#[test]
fn racing_admits_never_grant_more_than_the_limit() {
    for round in 0..20 {
        race(round);
    }
}

fn race(round: u64) {
    let engine = Engine::new();
    let top: AccountPath = "org".parse().unwrap();
    engine
        .set_limit(LimitSpec::new(
            top.clone(),
            "total",
            Measure::Tokens(Selector::ALL),
            AMOUNT,
            Period::Lifetime,
        ))
        .unwrap();
    // A per-key limit too, so that admits touch several counters.
    let mut per_key = LimitSpec::new(
        top.clone(),
        "per-key",
        Measure::Requests,
        10_000,
        Period::Lifetime,
    );
    per_key.scope = LimitScope::Key;
    engine.set_limit(per_key).unwrap();
    let now: Timestamp = "2026-11-25T08:00:00Z".parse().unwrap();
    let granted = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (engine, granted, refused) = (&engine, &granted, &refused);
            s.spawn(move || {
                let account: AccountPath = format!("org/team{t}/app").parse().unwrap();
                let key = format!("k{t}");
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 100 * round);
                let mut misses = 0;
                while misses < 200 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let input_n = (seed >> 33) % 40 + 1;
                    let output_n = (seed >> 17) % 60 + 1;
                    let mut input = TokenMap::new();
                    input
                        .add(Modality::Text, Direction::Input, input_n as i64)
                        .unwrap();
                    let mut max_output = TokenMap::new();
                    max_output
                        .add(Modality::Text, Direction::Output, output_n as i64)
                        .unwrap();
                    match engine.admit(&Admission {
                        account: &account,
                        key_id: &key,
                        session: None,
                        model: "m",
                        now,
                        input: &input,
                        max_output: &max_output,
                        max_cost: None,
                    }) {
                        Ok(r) => {
                            if seed.is_multiple_of(7) {
                                engine.release(r.id);
                                continue;
                            }
                            // Use all that was reserved: the limit must still hold.
                            let mut actual = input.clone();
                            actual
                                .add(Modality::Text, Direction::Output, output_n as i64)
                                .unwrap();
                            let settled = engine.settle(r.id, &actual, now).unwrap();
                            assert!(settled.exceeded.is_empty());
                            granted.fetch_add(input_n + output_n, Ordering::Relaxed);
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            misses += 1;
                        }
                    }
                }
            });
        }
    });
    let granted = granted.load(Ordering::Relaxed);
    let status = engine.status(&top, now);
    let total = status.iter().find(|r| r.spec.name == "total").unwrap();
    assert_eq!(total.used, i128::from(granted));
    assert_eq!(total.reserved, 0);
    assert!(granted <= AMOUNT, "granted {granted} > {AMOUNT}");
    // Requests need at most 100 tokens and threads stop only after many refusals, so
    // the limit ends up (nearly) used up.
    assert!(granted > AMOUNT - 100 * THREADS, "granted only {granted}");
    assert!(refused.load(Ordering::Relaxed) >= 200 * THREADS);
    assert_eq!(engine.reservations(), 0);
}
