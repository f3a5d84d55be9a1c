//! Ciyuan's real-time budget engine: what the gateway asks before a request ("may this
//! run, and with how much output?") and tells after it ("this is what it used"), and
//! what the ingest API tells about usage that already happened.
//!
//! - [`LimitSpec`]: a limit on an account node, inherited by its whole subtree —
//!   tokens (any, or by [`Selector`]), requests, or money in one currency
//!   ([`Measure::Cost`], counted exactly; [`Engine::settle_cost`]), per minute, hour, calendar day or
//!   month (in the limit's time zone) or lifetime; hard (refuse) or soft (alert);
//!   counted for the node, per session, per API key, or per single request.
//! - Model access rules per node ([`Engine::set_models`]), `*` wildcards.
//! - [`Engine::admit`] → [`Reservation`] or [`Refusal`]; [`Engine::settle`],
//!   [`Engine::release`], [`Engine::expire`]; [`Engine::record`] for ingested usage;
//!   [`Crossing`]s of alert thresholds, once per window.
//! - [`Engine::status`] for what is used, reserved and left; [`Engine::load_used`] to
//!   restore counters from the projections after a restart (reservations are never
//!   persisted: a restart releases them).
//! - [`Wallets`]: prepaid balances rebuilt from the ledger's postings, and wallet
//!   admission ([`Wallets::reserve`] → [`Hold`], [`Wallets::settle`] → the `consume`
//!   posting) that never lets admitted requests spend past zero (or the overdraft).
//!
//! No IO and no async: time is always passed in.
//!
//! ```
//! use ciyuan_budget::{Admission, Engine, LimitSpec, Measure, Period, Selector};
//! use ciyuan_core::{AccountPath, Direction, Modality, TokenMap};
//!
//! let engine = Engine::new();
//! let acme: AccountPath = "acme".parse().unwrap();
//! engine
//!     .set_limit(LimitSpec::new(acme.clone(), "monthly", Measure::Tokens(Selector::ALL), 1000, Period::Month))
//!     .unwrap();
//! let hr: AccountPath = "acme/cn/hr".parse().unwrap();
//! let mut input = TokenMap::new();
//! input.add(Modality::Text, Direction::Input, 300).unwrap();
//! let mut max_output = TokenMap::new();
//! max_output.add(Modality::Text, Direction::Output, 500).unwrap();
//! let now: jiff::Timestamp = "2026-11-25T08:00:00Z".parse().unwrap();
//! let admission = Admission {
//!     account: &hr, key_id: "k1", session: None, model: "qwen-max", now,
//!     input: &input, max_output: &max_output, max_cost: None,
//! };
//! let r = engine.admit(&admission).unwrap();
//! // 800 reserved: a second identical request does not fit in 1000.
//! let refusal = engine.admit(&admission).unwrap_err();
//! assert_eq!(
//!     refusal.message,
//!     "hard limit 'monthly' on acme: 1000 tokens per month, 0 used, 800 reserved, this request needs 800"
//! );
//! let mut actual = input.clone();
//! actual.add(Modality::Text, Direction::Output, 120).unwrap();
//! engine.settle(r.id, &actual, now).unwrap();
//! assert_eq!(engine.status(&acme, now)[0].used, 420);
//! # use ciyuan_core::jiff;
//! ```
#![deny(missing_docs)]

pub mod bench;
mod engine;
mod models;
mod spec;
mod wallet;

pub use engine::{
    Admission, CostCrossing, CostStatus, Crossing, Engine, LimitStatus, Refusal, RefusalKind,
    Reservation, Settled, SharedTerm, Subject,
};
pub use models::matches as model_matches;
pub use spec::{
    LimitScope, LimitSpec, MAX_NAME_BYTES, MAX_THRESHOLDS, Measure, Mode, Period, Selector,
};
pub use wallet::{Charge, GrantView, Hold, WalletError, WalletRefusal, WalletView, Wallets};

use ciyuan_core::AccountPath;

/// Why a call to the engine failed (refusals of requests are [`Refusal`]s, not errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The limit is not well-formed.
    #[error("limit {name:?} is invalid: {reason}")]
    InvalidLimit {
        /// The limit's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// No limit of that name on that node.
    #[error("no limit {name:?} on {node}")]
    UnknownLimit {
        /// The node.
        node: AccountPath,
        /// The name.
        name: String,
    },
    /// A counter cannot be restored as asked.
    #[error("cannot restore limit {name:?}: {reason}")]
    BadLoad {
        /// The limit's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The reservation was already settled, released or expired (or never existed).
    #[error("no reservation {0} (already settled, released or expired)")]
    UnknownReservation(u64),
    /// An actual cost given to [`Engine::settle_cost`] is negative; the reservation
    /// is left as it was.
    #[error("actual cost cannot be negative: {0}")]
    NegativeCost(ciyuan_core::Money),
    /// An actual cost in another currency than the admission's maximum cost; the
    /// reservation is left as it was.
    #[error(
        "actual cost is in {settled}, the request was admitted with a maximum cost in {admitted}"
    )]
    CostCurrency {
        /// The admission's currency.
        admitted: ciyuan_core::Currency,
        /// The settlement's.
        settled: ciyuan_core::Currency,
    },
    /// Actual usage given to [`Engine::settle`] has a negative count. What a request
    /// used is never negative; a correction is usage of its own, for
    /// [`Engine::record`]. The reservation is left as it was.
    #[error("actual usage cannot be negative: {modality}.{direction} is {count}")]
    NegativeUsage {
        /// The modality of the negative count.
        modality: ciyuan_core::Modality,
        /// The direction of the negative count.
        direction: ciyuan_core::Direction,
        /// The count.
        count: i64,
    },
}
