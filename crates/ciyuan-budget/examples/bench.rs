//! `cargo run --release -p ciyuan-budget --example bench [iterations] [threads]`: the
//! same run as `ciyuan bench budgets`, then the wallets' reserve + settle.
#![allow(clippy::print_stdout)]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let iterations = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let threads = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    print!("{}", ciyuan_budget::bench::bench(iterations, threads)?);
    print!(
        "{}",
        ciyuan_budget::bench::wallet_bench(iterations, threads)?
    );
    Ok(())
}
