//! `cargo run --release -p ciyuan-budget --example bench [iterations] [threads]`: the
//! same run as `ciyuan bench budgets`.
#![allow(clippy::print_stdout)]

fn main() -> Result<(), ciyuan_budget::BudgetError> {
    let mut args = std::env::args().skip(1);
    let iterations = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let threads = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    print!("{}", ciyuan_budget::bench::bench(iterations, threads)?);
    Ok(())
}
