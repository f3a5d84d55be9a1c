//! `cargo bench -p ciyuan-ledger`: the append and verify benchmarks on a temporary ledger.
//!
//! Sizes come from the environment so a quick run and a long one use the same code:
//! `CIYUAN_BENCH_ENTRIES` (default 2,000,000), `CIYUAN_BENCH_BATCH` (1000),
//! `CIYUAN_BENCH_PRODUCERS` (4), `CIYUAN_BENCH_ENTRY_BYTES` (200). `append` or `verify`
//! as an argument runs one half; verify covers the ledger and an exported bundle.

use ciyuan_ledger::bench::{BenchAppendOptions, bench_append, bench_verify};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; a filter argument selects one of the two.
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let dir = tempfile::tempdir()?;
    let opts = BenchAppendOptions {
        total_entries: env("CIYUAN_BENCH_ENTRIES", 2_000_000),
        batch_entries: env("CIYUAN_BENCH_BATCH", 1000) as usize,
        producers: env("CIYUAN_BENCH_PRODUCERS", 4) as usize,
        entry_bytes: env("CIYUAN_BENCH_ENTRY_BYTES", 200) as usize,
    };
    let a = bench_append(dir.path(), opts.clone())?;
    if only.as_deref() != Some("verify") {
        println!(
            "append: {} entries of {} bytes, batches of {}, {} producers",
            opts.total_entries, opts.entry_bytes, opts.batch_entries, opts.producers
        );
        println!("{a:#?}");
    }
    if only.as_deref() != Some("append") {
        let v = bench_verify(dir.path())?;
        println!("verify ledger: {v:#?}");
        // The same entries as an audit bundle: line splitting and hex instead of
        // framing and the sidecar.
        let out = tempfile::tempdir()?;
        let bundle = out.path().join("bundle");
        let reader = ciyuan_ledger::Ledger::open(dir.path(), Default::default())?.reader();
        ciyuan_ledger::export_bundle(&reader, &bundle)?;
        drop(reader);
        let v = bench_verify(&bundle)?;
        println!("verify bundle: {v:#?}");
    }
    Ok(())
}
