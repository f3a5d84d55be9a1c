//! The engine's benchmark (`ciyuan bench budgets`): admit + settle on a five-level tree
//! where every level has a node limit, plus a session and a key limit, on one thread
//! and then on several threads at once against the same engine; and the wallets'
//! ([`wallet_bench`]): reserve + settle against one wallet, the same way.

use std::fmt;
use std::time::Instant;

use ciyuan_core::jiff::{SignedDuration, Timestamp};
use ciyuan_core::{AccountPath, Direction, Modality, TokenMap};

use ciyuan_core::{Currency, Grant, LedgerAccount, Leg, Posting, PostingError, PostingKind};

use crate::{
    Admission, BudgetError, Engine, LimitScope, LimitSpec, Measure, Period, Selector, WalletError,
    Wallets,
};

/// What [`bench`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Admit + settle pairs per thread in each run.
    pub iterations: u64,
    /// Threads of the parallel run.
    pub threads: usize,
    /// Limits every request is checked against (node, session and key limits).
    pub limits_per_request: usize,
    /// Single thread: nanoseconds per admit + settle.
    pub single_ns: f64,
    /// Single thread: admit + settle pairs per second.
    pub single_per_sec: f64,
    /// Parallel run: wall-clock nanoseconds per admit + settle, all threads together.
    pub parallel_ns: f64,
    /// Parallel run: admit + settle pairs per second, all threads together.
    pub parallel_per_sec: f64,
    /// Parallel run: mean nanoseconds one thread spends per admit + settle.
    pub parallel_thread_ns: f64,
    /// `parallel_per_sec / single_per_sec`.
    pub scaling: f64,
    /// Requests refused (0 unless the limits are too small for the run).
    pub refused: u64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "budget engine: admit + settle, five-level tree, {} limits per request, {} iterations per thread",
            self.limits_per_request, self.iterations
        )?;
        writeln!(
            f,
            "  1 thread:   {:>8.0} ns per request, {:>10.0} requests/s",
            self.single_ns, self.single_per_sec
        )?;
        writeln!(
            f,
            "  {} threads: {:>8.0} ns per request (wall), {:>10.0} requests/s ({:.2}x), {:.0} ns per request per thread",
            self.threads,
            self.parallel_ns,
            self.parallel_per_sec,
            self.scaling,
            self.parallel_thread_ns
        )?;
        if self.refused > 0 {
            writeln!(f, "  refused: {}", self.refused)?;
        }
        Ok(())
    }
}

const LEVELS: [&str; 5] = [
    "org",
    "org/cn",
    "org/cn/hr",
    "org/cn/hr/team",
    "org/cn/hr/team/app",
];

fn setup() -> Result<(Engine, AccountPath, usize), BudgetError> {
    let engine = Engine::new();
    let mut n = 0;
    for (i, p) in LEVELS.iter().enumerate() {
        let path = AccountPath::parse(p).map_err(|e| BudgetError::InvalidLimit {
            name: p.to_string(),
            reason: e.to_string(),
        })?;
        let mut spec = LimitSpec::new(
            path,
            "monthly",
            Measure::Tokens(Selector::ALL),
            u64::MAX / 4,
            if i % 2 == 0 {
                Period::Month
            } else {
                Period::Day
            },
        );
        spec.thresholds = vec![50, 80, 100];
        engine.set_limit(spec)?;
        n += 1;
    }
    let top = AccountPath::parse(LEVELS[0]).map_err(|e| BudgetError::InvalidLimit {
        name: "org".into(),
        reason: e.to_string(),
    })?;
    let mut session = LimitSpec::new(
        top.clone(),
        "per-session",
        Measure::Tokens(Selector::ALL),
        u64::MAX / 4,
        Period::Day,
    );
    session.scope = LimitScope::Session;
    engine.set_limit(session)?;
    let mut key = LimitSpec::new(top, "rpm", Measure::Requests, u64::MAX / 4, Period::Minute);
    key.scope = LimitScope::Key;
    engine.set_limit(key)?;
    n += 2;
    let leaf = AccountPath::parse(LEVELS[4]).map_err(|e| BudgetError::InvalidLimit {
        name: "leaf".into(),
        reason: e.to_string(),
    })?;
    Ok((engine, leaf, n))
}

/// Runs `iterations` admit + settle pairs per thread: once on one thread, then on
/// `threads` threads at once (at least 1) sharing the engine. Sessions rotate among
/// 64 ids and keys among 8 per thread; time advances 1 ms per request.
pub fn bench(iterations: u64, threads: usize) -> Result<BenchReport, BudgetError> {
    let threads = threads.max(1);
    let (engine, leaf, limits_per_request) = setup()?;
    let start: Timestamp = Timestamp::from_second(1_795_000_000).unwrap_or(Timestamp::UNIX_EPOCH);

    let run = |thread: usize| -> Result<(u64, f64), BudgetError> {
        let sessions: Vec<String> = (0..64).map(|i| format!("t{thread}-s{i}")).collect();
        let keys: Vec<String> = (0..8).map(|i| format!("t{thread}-k{i}")).collect();
        let mut input = TokenMap::new();
        let mut max_output = TokenMap::new();
        let mut actual = TokenMap::new();
        let _ = input.add(Modality::Text, Direction::Input, 1200);
        let _ = max_output.add(Modality::Text, Direction::Output, 800);
        let _ = actual.add(Modality::Text, Direction::Input, 1200);
        let _ = actual.add(Modality::Text, Direction::Output, 350);
        let mut refused = 0;
        let t0 = Instant::now();
        for i in 0..iterations {
            let now = start
                .checked_add(SignedDuration::from_millis(i as i64))
                .unwrap_or(start);
            let a = Admission {
                account: &leaf,
                key_id: &keys[(i % 8) as usize],
                session: Some(&sessions[(i % 64) as usize]),
                model: "qwen-max",
                now,
                input: &input,
                max_output: &max_output,
                max_cost: None,
            };
            match engine.admit(&a) {
                Ok(r) => {
                    engine.settle(r.id, &actual, now)?;
                }
                Err(_) => refused += 1,
            }
        }
        Ok((refused, t0.elapsed().as_nanos() as f64))
    };

    let (mut refused, single) = run(0)?;
    let t0 = Instant::now();
    let mut thread_ns = 0.0;
    std::thread::scope(|s| -> Result<(), BudgetError> {
        let handles: Vec<_> = (0..threads).map(|t| s.spawn(move || run(t + 1))).collect();
        for h in handles {
            let (r, ns) = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?;
            refused += r;
            thread_ns += ns;
        }
        Ok(())
    })?;
    let wall = t0.elapsed().as_nanos() as f64;
    let n = iterations.max(1) as f64;
    let total = n * threads as f64;
    let single_per_sec = n / (single / 1e9);
    let parallel_per_sec = total / (wall / 1e9);
    Ok(BenchReport {
        iterations,
        threads,
        limits_per_request,
        single_ns: single / n,
        single_per_sec,
        parallel_ns: wall / total,
        parallel_per_sec,
        parallel_thread_ns: thread_ns / total,
        scaling: parallel_per_sec / single_per_sec,
        refused,
    })
}

/// What [`wallet_bench`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WalletBenchReport {
    /// Reserve + settle pairs per thread in each run.
    pub iterations: u64,
    /// Threads of the parallel run.
    pub threads: usize,
    /// Single thread: nanoseconds per reserve + settle.
    pub single_ns: f64,
    /// Parallel run: wall-clock nanoseconds per reserve + settle, all threads together.
    pub parallel_ns: f64,
    /// Parallel run: mean nanoseconds one thread spends per reserve + settle.
    pub parallel_thread_ns: f64,
    /// Requests refused (0 unless the wallet is too small for the run).
    pub refused: u64,
}

impl fmt::Display for WalletBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wallet admission (reserve + settle), paid from the top of a five-level tree, two grants and cash, {} iterations per thread",
            self.iterations
        )?;
        writeln!(f, "  1 thread:   {:>8.0} ns per request", self.single_ns)?;
        writeln!(
            f,
            "  {} threads: {:>8.0} ns per request (wall), {:.0} ns per request per thread",
            self.threads, self.parallel_ns, self.parallel_thread_ns
        )?;
        if self.refused > 0 {
            writeln!(f, "  refused: {}", self.refused)?;
        }
        Ok(())
    }
}

/// Runs `iterations` reserve + settle pairs per thread against one wallet on the top
/// node of a five-level tree (requests come from the leaf, so the paying wallet is
/// looked up four levels above), funded with cash and two grants (one spent across
/// the run, so holds split between a grant and cash): once on one thread, then on
/// `threads` threads at once (at least 1). Each settle builds its `consume` posting.
pub fn wallet_bench(iterations: u64, threads: usize) -> Result<WalletBenchReport, WalletError> {
    use rust_decimal::Decimal;
    let threads = threads.max(1);
    let wallets = Wallets::new();
    let path = |s: &str| {
        AccountPath::parse(s)
            .map_err(|e| WalletError::Posting(PostingError::Account(e.to_string())))
    };
    let top = path(LEVELS[0])?;
    let leaf = path(LEVELS[4])?;
    let cny: Currency = "CNY"
        .parse()
        .map_err(|_| WalletError::Posting(PostingError::Account("CNY".into())))?;
    let runs = iterations.saturating_mul(threads as u64 + 1);
    // Enough cash for every request at its maximum; a small grant spent early on.
    let cash = Decimal::new(5, 2) * Decimal::from(runs) + Decimal::ONE;
    let post = |kind, legs, grant| Posting {
        kind,
        currency: cny,
        legs,
        memo: String::new(),
        usage_entry: None,
        grant,
        set_by: None,
    };
    let at = Timestamp::from_second(1_795_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
    wallets.apply_posting(
        &top,
        &post(
            PostingKind::Topup,
            vec![
                Leg::debit(LedgerAccount::Payments, cash),
                Leg::credit(LedgerAccount::Cash(top.clone()), cash),
            ],
            None,
        ),
        at,
    )?;
    for (id, amount, priority) in [
        ("welcome", Decimal::new(25, 0), 1),
        ("later", Decimal::new(1, 3), 0),
    ] {
        wallets.apply_posting(
            &top,
            &post(
                PostingKind::Grant,
                vec![
                    Leg::debit(LedgerAccount::Promotions, amount),
                    Leg::credit(LedgerAccount::Grant(top.clone(), id.into()), amount),
                ],
                Some(Grant {
                    id: id.into(),
                    priority,
                    expires_at: None,
                }),
            ),
            at,
        )?;
    }
    let max_cost = Decimal::new(5, 2);
    let actual = Decimal::new(213, 4);
    let run = || -> Result<(u64, f64), WalletError> {
        let mut refused = 0;
        let t0 = Instant::now();
        for _ in 0..iterations {
            match wallets.reserve(&leaf, cny, max_cost, at) {
                Ok(Some(h)) => {
                    wallets.settle(&h, actual, at)?;
                }
                Ok(None) => refused += 1,
                Err(WalletError::Refused(_)) => refused += 1,
                Err(e) => return Err(e),
            }
        }
        Ok((refused, t0.elapsed().as_nanos() as f64))
    };
    let (mut refused, single) = run()?;
    let t0 = Instant::now();
    let mut thread_ns = 0.0;
    std::thread::scope(|s| -> Result<(), WalletError> {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(run)).collect();
        for h in handles {
            let (r, ns) = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?;
            refused += r;
            thread_ns += ns;
        }
        Ok(())
    })?;
    let wall = t0.elapsed().as_nanos() as f64;
    let n = iterations.max(1) as f64;
    let total = n * threads as f64;
    Ok(WalletBenchReport {
        iterations,
        threads,
        single_ns: single / n,
        parallel_ns: wall / total,
        parallel_thread_ns: thread_ns / total,
        refused,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_runs() {
        let r = super::bench(2000, 2).unwrap();
        assert_eq!(r.refused, 0);
        assert_eq!(r.limits_per_request, 7);
        assert!(r.single_ns > 0.0 && r.parallel_ns > 0.0);
    }

    #[test]
    fn wallet_bench_runs() {
        let r = super::wallet_bench(2000, 2).unwrap();
        assert_eq!(r.refused, 0);
        assert!(r.single_ns > 0.0 && r.parallel_ns > 0.0);
    }
}
