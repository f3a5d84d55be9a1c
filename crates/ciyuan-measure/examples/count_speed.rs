//! Counting speed of one encoding, for profiling and for comparisons that
//! `ciyuan bench tokens` does not make:
//!
//! ```text
//! cargo build --release -p ciyuan-measure --example count_speed
//! target/release/examples/count_speed ENCODING [BYTES [REPEATS]]
//! ```
//!
//! - `BYTES` (default 4 MiB): the parity corpus joined and repeated to about this size,
//!   counted `REPEATS` times (default 3); the best time is reported. Run under
//!   `taskset -c 0` for one core (the core count is read from the affinity mask).
//! - `BYTES` = 0: every corpus text counted on its own (short texts), 20 times over.
//!   With `MODE=tiktoken` the `o200k_base` short texts are counted by `tiktoken-rs`
//!   instead, to compare.
//! - `TEXT_FILE=PATH`: count that file as it is instead of the repeated corpus.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_measure::text::Encoding;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let enc = Encoding::from_name(args.get(1).map_or("o200k_base", String::as_str))
        .expect("an encoding name");
    let bytes: usize = args.get(2).map_or(4 << 20, |s| s.parse().unwrap());
    let reps: usize = args.get(3).map_or(3, |s| s.parse().unwrap());
    let corpus = include_str!("../tests/parity/corpus.json");
    let texts = serde_json::from_str::<Vec<String>>(corpus).unwrap();
    enc.count("warm up").unwrap();

    if bytes == 0 {
        let mode = std::env::var("MODE").unwrap_or_default();
        tiktoken_rs::o200k_base_singleton().count_ordinary("warm up");
        let total: usize = texts.iter().map(String::len).sum();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..20 {
                for x in &texts {
                    std::hint::black_box(match mode.as_str() {
                        "tiktoken" => tiktoken_rs::o200k_base_singleton().count_ordinary(x),
                        _ => enc.count(x).unwrap(),
                    });
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{} short texts {:.1} MB/s",
            enc.name(),
            (total * 20) as f64 / 1e6 / best
        );
        return;
    }

    let text = match std::env::var("TEXT_FILE") {
        Ok(f) => std::fs::read_to_string(f).unwrap(),
        Err(_) => {
            let base = texts.join("\n");
            let mut text = String::new();
            while text.len() < bytes {
                text.push_str(&base);
                text.push('\n');
            }
            text
        }
    };
    let mut best = f64::MAX;
    let mut n = 0;
    for _ in 0..reps {
        let t = Instant::now();
        n = enc.count(&text).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{} {} tokens {:.1} MB/s (best of {reps})",
        enc.name(),
        n,
        text.len() as f64 / 1e6 / best
    );
}
