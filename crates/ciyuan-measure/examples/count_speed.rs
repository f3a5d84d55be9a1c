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
//! - `KIND=chinese|english|code`: count `BYTES` of generated text that never repeats
//!   (`ciyuan_measure::corpus`) instead; `SHOW=1` prints its first 600 bytes,
//!   `DUMP=PATH` writes it there.

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

    let kind = std::env::var("KIND").ok();
    let text = match (std::env::var("TEXT_FILE"), kind) {
        (Ok(f), _) => std::fs::read_to_string(f).unwrap(),
        (_, Some(k)) => {
            let kind = ciyuan_measure::corpus::Kind::from_name(&k).expect("a kind");
            let text = ciyuan_measure::corpus::generate(kind, bytes, 1).unwrap();
            if let Ok(path) = std::env::var("DUMP") {
                std::fs::write(path, &text).unwrap();
            }
            if std::env::var("SHOW").is_ok() {
                let end = (0..=text.len().min(600))
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                println!("{}", &text[..end]);
            }
            text
        }
        _ => {
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
    let mut best_cpu = f64::MAX;
    let mut n = 0;
    for _ in 0..reps {
        let t = Instant::now();
        let c = thread_cpu_seconds();
        n = enc.count(&text).unwrap();
        best_cpu = best_cpu.min(thread_cpu_seconds() - c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{} {} tokens {:.1} MB/s (best of {reps}; {:.1} MB/s of this thread's CPU time)",
        enc.name(),
        n,
        text.len() as f64 / 1e6 / best,
        text.len() as f64 / 1e6 / best_cpu
    );
}

/// The CPU time of the calling thread (on a loaded machine, steadier than the wall
/// clock; meaningful for one thread, under `taskset -c N`).
fn thread_cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    s.split_whitespace()
        .next()
        .and_then(|ns| ns.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e9)
}
