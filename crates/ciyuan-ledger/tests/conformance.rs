//! The file ledger against the `Log` conformance suite every log backend passes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_ledger::{GroupCommitter, Ledger, LedgerOptions, verify_path};
use ciyuan_store::Log;
use ciyuan_store::conformance::log::{LogBackend, run_all};
use std::path::PathBuf;
use std::thread::JoinHandle;

/// Ledgers in a temporary directory, each run on its group committer as `serve` does.
struct FileLedgers {
    base: tempfile::TempDir,
    made: usize,
    /// The directory and writer thread of each open log, by its verifier key.
    open: Vec<(String, PathBuf, GroupCommitter, JoinHandle<()>)>,
}

fn opts() -> LedgerOptions {
    LedgerOptions {
        origin: Some("conformance.test/log".into()),
        // Small segments, so reads and proofs cross segment boundaries.
        segment_max_bytes: 2048,
        ..LedgerOptions::default()
    }
}

impl FileLedgers {
    fn start(&mut self, dir: PathBuf) -> Box<dyn Log> {
        let (c, writer) = GroupCommitter::start(Ledger::open(&dir, opts()).unwrap());
        let key = c.reader().verifier_key().to_string();
        self.open.push((key, dir, c.clone(), writer));
        Box::new(c)
    }
}

impl LogBackend for FileLedgers {
    fn fresh(&mut self) -> Box<dyn Log> {
        self.made += 1;
        let dir = self.base.path().join(format!("l{}", self.made));
        self.start(dir)
    }

    fn reopen(&mut self, log: Box<dyn Log>) -> Box<dyn Log> {
        let key = log.verifier_key();
        drop(log);
        let at = self.open.iter().position(|o| o.0 == key).unwrap();
        let (_, dir, c, writer) = self.open.remove(at);
        c.shutdown();
        writer.join().unwrap();
        drop(c);
        // What a restart finds must also pass the offline verifier.
        verify_path(&dir).unwrap();
        self.start(dir)
    }
}

#[test]
fn the_file_ledger_passes_the_log_conformance_suite() {
    let mut ledgers = FileLedgers {
        base: tempfile::tempdir().unwrap(),
        made: 0,
        open: Vec::new(),
    };
    run_all(&mut ledgers);
    for (_, dir, c, writer) in ledgers.open.drain(..) {
        c.shutdown();
        writer.join().unwrap();
        verify_path(&dir).unwrap();
    }
}
