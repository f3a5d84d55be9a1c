//! `ciyuan ingest FILE.jsonl`: sends CloudEvents to `POST /v1/events` in batches.

use crate::Remote;
use crate::client::Client;
use anyhow::Context;
use clap::Args;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;

/// Rejections printed in the summary; the rest are counted.
const MAX_REJECTIONS_SHOWN: usize = 20;

#[derive(Args)]
pub struct IngestArgs {
    /// A file of CloudEvents, one JSON object per line (`-` for standard input).
    file: PathBuf,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    #[command(flatten)]
    remote: Remote,
}

pub fn run(a: IngestArgs) -> anyhow::Result<ExitCode> {
    if a.batch == 0 || a.batch > 10_000 {
        anyhow::bail!("--batch must be 1 to 10000");
    }
    let client = Client::new(&a.remote)?;
    let (reader, total): (Box<dyn BufRead>, Option<u64>) = if a.file.as_os_str() == "-" {
        (Box::new(BufReader::new(std::io::stdin())), None)
    } else {
        let f = std::fs::File::open(&a.file)
            .with_context(|| format!("opening {}", a.file.display()))?;
        let len = f.metadata().map(|m| m.len()).ok();
        (Box::new(BufReader::new(f)), len)
    };
    let bar = match total {
        Some(bytes) => indicatif::ProgressBar::new(bytes),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut accepted, mut duplicates, mut rejected) = (0u64, 0u64, 0u64);
    let mut shown = Vec::new();
    let mut batch: Vec<(u64, Value)> = Vec::with_capacity(a.batch);
    let send = |batch: &mut Vec<(u64, Value)>,
                shown: &mut Vec<String>|
     -> anyhow::Result<(u64, u64, u64)> {
        if batch.is_empty() {
            return Ok((0, 0, 0));
        }
        let body = Value::Array(batch.iter().map(|(_, v)| v.clone()).collect());
        let answer = client.events(&body)?;
        let results = answer["results"].as_array().cloned().unwrap_or_default();
        let (mut acc, mut dup, mut rej) = (0, 0, 0);
        for ((line, _), r) in batch.iter().zip(results) {
            match r["status"].as_str() {
                Some("accepted") => acc += 1,
                Some("duplicate") => dup += 1,
                _ => {
                    rej += 1;
                    if shown.len() < MAX_REJECTIONS_SHOWN {
                        shown.push(format!(
                            "line {line}: {}",
                            r["error"]["detail"].as_str().unwrap_or("rejected")
                        ));
                    }
                }
            }
        }
        batch.clear();
        Ok((acc, dup, rej))
    };
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", n + 1))?;
        bar.inc(line.len() as u64 + 1);
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) => batch.push((n as u64 + 1, v)),
            Err(e) => {
                rejected += 1;
                if shown.len() < MAX_REJECTIONS_SHOWN {
                    shown.push(format!("line {}: not JSON: {e}", n + 1));
                }
            }
        }
        if batch.len() >= a.batch {
            let (x, y, z) = send(&mut batch, &mut shown)?;
            accepted += x;
            duplicates += y;
            rejected += z;
            bar.set_message(format!(
                "{accepted} accepted, {duplicates} duplicates, {rejected} rejected"
            ));
        }
    }
    let (x, y, z) = send(&mut batch, &mut shown)?;
    accepted += x;
    duplicates += y;
    rejected += z;
    bar.finish_and_clear();
    println!("{accepted} accepted, {duplicates} duplicates, {rejected} rejected");
    for s in &shown {
        eprintln!("  {s}");
    }
    if rejected as usize > shown.len() {
        eprintln!(
            "  ... and {} more rejections",
            rejected as usize - shown.len()
        );
    }
    Ok(if rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
