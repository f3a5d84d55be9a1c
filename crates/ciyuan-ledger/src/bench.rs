//! Benchmarks behind `ciyuan bench ledger` and `ciyuan bench verify`.

use crate::{GroupCommitter, Ledger, LedgerError, LedgerOptions, verify_path};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What to append.
#[derive(Debug, Clone)]
pub struct BenchAppendOptions {
    /// Entries in all.
    pub total_entries: u64,
    /// Entries per append call.
    pub batch_entries: usize,
    /// Producer threads.
    pub producers: usize,
    /// Bytes per entry.
    pub entry_bytes: usize,
}

/// Append figures.
#[derive(Debug, Clone)]
pub struct AppendReport {
    /// Durable entries per second.
    pub entries_per_sec: f64,
    /// Append calls (batches) per second.
    pub appends_per_sec: f64,
    /// Median time from enqueueing a batch to its durable acknowledgement.
    pub p50_append_us: u64,
    /// 99th percentile of the same.
    pub p99_append_us: u64,
    /// `fdatasync` calls made (group commits).
    pub fsyncs: u64,
    /// Entries made durable per `fdatasync`.
    pub entries_per_fsync: f64,
    /// Payload bytes per second.
    pub bytes_per_sec: f64,
    /// Seconds of the run.
    pub seconds: f64,
}

/// Verification figures.
#[derive(Debug, Clone)]
pub struct VerifyBenchReport {
    /// Entries verified.
    pub entries: u64,
    /// Seconds taken.
    pub seconds: f64,
    /// Entries per second.
    pub entries_per_sec: f64,
}

/// An entry of about `len` bytes shaped like a Ciyuan usage entry, unique per `n`.
pub fn sample_entry(n: u64, len: usize) -> Vec<u8> {
    let mut e = format!(
        r#"{{"v":1,"ts":"2026-11-25T06:00:00.{:06}Z","account":"acme/cn/hr","kind":"usage","data":{{"service":"llm.chat","model":"gpt-4o","tokens":{{"text.input":{},"text.output":{}}},"event_id":"{n:016x}""#,
        n % 1_000_000,
        n % 4096,
        n % 1024
    )
    .into_bytes();
    while e.len() + 2 < len {
        e.push(b' ');
    }
    e.extend_from_slice(b"}}");
    e
}

/// Appends `total_entries` through group commit from several producers, each waiting
/// for its batch to be durable before sending the next (as request handlers do).
pub fn bench_append(dir: &Path, o: BenchAppendOptions) -> Result<AppendReport, LedgerError> {
    let ledger = Ledger::open(dir, LedgerOptions::default())?;
    let (committer, writer) = GroupCommitter::start(ledger);
    let per_producer = o.total_entries / o.producers.max(1) as u64;
    let batches_done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut latencies: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..o.producers.max(1))
            .map(|p| {
                let committer = committer.clone();
                let batches_done = batches_done.clone();
                s.spawn(move || -> Result<Vec<u64>, LedgerError> {
                    let mut lat = Vec::new();
                    let mut n = p as u64 * per_producer;
                    let end = n + per_producer;
                    while n < end {
                        let k = (o.batch_entries as u64).min(end - n);
                        let batch: Vec<Vec<u8>> =
                            (n..n + k).map(|i| sample_entry(i, o.entry_bytes)).collect();
                        let t = Instant::now();
                        committer.append_blocking(batch)?;
                        lat.push(t.elapsed().as_micros() as u64);
                        batches_done.fetch_add(1, Ordering::Relaxed);
                        n += k;
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            match h.join() {
                Ok(Ok(l)) => all.extend(l),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(LedgerError::Invalid("a producer panicked".into())),
            }
        }
        Ok(all)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let entries = committer.reader().size();
    let groups = committer.group_commits();
    // Sign the result, so `bench verify` on this ledger checks a signature too.
    committer.checkpoint_blocking()?;
    committer.shutdown();
    writer
        .join()
        .map_err(|_| LedgerError::Invalid("the ledger writer panicked".into()))?;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let fsyncs = groups;
    Ok(AppendReport {
        entries_per_sec: entries as f64 / seconds,
        appends_per_sec: batches_done.load(Ordering::Relaxed) as f64 / seconds,
        p50_append_us: pct(0.50),
        p99_append_us: pct(0.99),
        fsyncs,
        entries_per_fsync: entries as f64 / fsyncs.max(1) as f64,
        bytes_per_sec: (entries as f64 * o.entry_bytes as f64) / seconds,
        seconds,
    })
}

/// Verifies a ledger directory or bundle and reports the speed.
pub fn bench_verify(path: &Path) -> Result<VerifyBenchReport, LedgerError> {
    let report = verify_path(path).map_err(|e| LedgerError::Corrupt(e.0))?;
    Ok(VerifyBenchReport {
        entries: report.entries,
        seconds: report.seconds,
        entries_per_sec: report.entries as f64 / report.seconds.max(1e-9),
    })
}
