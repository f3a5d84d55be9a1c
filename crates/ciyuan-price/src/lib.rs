//! Rating: turning a usage entry's tokens into money by a versioned price book.
//!
//! - [`Rater`]: a book version (and the contract of the entry's node) compiled for the
//!   hot path; [`Rater::rate`] gives the [`Rating`] a usage entry carries, and
//!   [`Rater::max_cost`] the most a request can cost, for reserving money.
//! - [`verify_rating`]: the auditor's independent, naive recomputation
//!   ([`rate_naive`]), used by `ciyuan audit verify`.
//! - [`import_litellm`], [`import_toml`]: books from LiteLLM's price table and from
//!   the native TOML format, numbers read from their text, never through a float.
//! - [`diff`]: what changed between two versions.
//!
//! The data (books, rules, contracts, ratings) is ledger data and lives in
//! `ciyuan-core` ([`ciyuan_core::PriceBook`]); rule precedence is documented on
//! [`ciyuan_core::PriceRule`]. This crate does no IO.
//!
//! # The native TOML format
//!
//! ```toml
//! name = "list"                       # the book; versions are counted by the ledger
//! currency = "CNY"                    # ISO 4217
//! effective_from = 2027-01-01T00:00:00Z   # optional; else the import's time
//!
//! [rounding]                          # optional; default: 10 places, half_even
//! to = 6                              # decimal places of each entry's total
//! mode = "half_up"                    # half_even | half_up | down | up
//!
//! [[rules]]                           # the first matching rule prices an entry
//! model = "qwen-max*"                 # `*` matches any run; case ignored
//! unit_prices = { "text.input" = "0.0000024", "text.output" = 0.0000096 }
//!
//! [[rules.above_input_tokens]]        # context threshold: input above 128k
//! input_tokens = 128000
//! unit_prices = { "text.input" = "0.0000048" }
//!
//! [[rules.windows]]                   # off-peak, local time, past midnight
//! from = "00:30"
//! to = "08:30"
//! time_zone = "Asia/Shanghai"
//! unit_prices = { "text.input" = "0.0000012" }
//!
//! [[rules]]
//! model = "qwen-max*"
//! tier = "batch"                      # standard | batch | priority | flex
//! unit_prices = { "text.input" = "0.0000012" }
//!
//! [[rules]]
//! service = "doc.verify"              # a service's own measures
//! per_request = "0.01"
//! unit_prices = { "measure.pages" = "0.002" }
//!
//! [rules.tiers]                       # graduated (or volume) over a period
//! kind = "graduated"
//! period = "month"
//! key = "measure.pages"               # or "all" (every token key) or a token key
//! bands = [
//!   { up_to = 10000, unit_prices = { "measure.pages" = "0.002" } },
//!   { unit_prices = { "measure.pages" = "0.001" } },
//! ]
//! ```
//!
//! Unit prices are strings or TOML numbers; `0.0000096` and `9.6e-06` both mean the
//! exact decimal. Keys are the ledger's token keys (`text.input`,
//! `text.cached_input`, `text.cache_write`, `text.output`, `text.reasoning`,
//! `audio.input`, `image.output`, ...) and `measure.<name>` for a service's measures.
//!
//! ```
//! use ciyuan_core::{ServiceTier, TokenMap, Modality, Direction};
//! use ciyuan_price::{Rater, RateInput, import_toml};
//! let import = import_toml(r#"
//!     name = "list"
//!     currency = "USD"
//!     [rounding]
//!     to = 2
//!     mode = "half_up"
//!     [[rules]]
//!     model = "gpt-4o"
//!     unit_prices = { "text.input" = 2.5e-06, "text.output" = "0.00001" }
//! "#).unwrap();
//! let book = import.into_book(None, 1, "2027-01-01T00:00:00Z".parse().unwrap(), None).unwrap();
//! let rater = Rater::new(&book, None).unwrap();
//! let mut tokens = TokenMap::new();
//! tokens.add(Modality::Text, Direction::Input, 1_000_000).unwrap();
//! tokens.add(Modality::Text, Direction::Output, 200_000).unwrap();
//! let rating = rater.rate(&RateInput {
//!     model: Some("gpt-4o"),
//!     service: "llm.chat",
//!     tier: ServiceTier::Standard,
//!     tokens: &tokens,
//!     measures: &Default::default(),
//!     at: "2027-02-01T00:00:00Z".parse().unwrap(),
//!     period_to_date: Default::default(),
//! }).unwrap();
//! assert_eq!(rating.amount.to_string(), "4.50");
//! ```
#![deny(missing_docs)]

mod diff;
mod import;
mod rate;
mod verify;

pub use ciyuan_core::{RatedLine, Rating};
pub use diff::{Change, diff};
pub use import::{Import, MAX_IMPORT_BYTES, import_litellm, import_toml};
pub use rate::{
    MAX_CACHED_MODELS, MAX_CACHED_PER_MODEL, RateError, RateInput, Rater, TierCounter,
    measure_quantity, period_start,
};
pub use verify::{Mismatch, rate_naive, round_naive, tier_counter_naive, verify_rating};

/// Rates `input` `n` times and returns the time taken: a micro benchmark without
/// `cargo bench` (the figure divided by `n` is the cost of one entry).
pub fn bench_rating(
    rater: &Rater,
    input: &RateInput<'_>,
    n: u32,
) -> Result<std::time::Duration, RateError> {
    let start = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(rater.rate(std::hint::black_box(input))?);
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests;
