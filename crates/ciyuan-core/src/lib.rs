//! Ciyuan's domain core: the vocabulary every other crate speaks.
//!
//! - [`AccountPath`]: a node of the account tree (`acme/cn/hr/onboarding`).
//! - [`Scope`]: what an API key may do.
//! - [`Entry`]: one record of the tamper-evident ledger, with its typed [`EntryBody`].
//! - [`TokenCount`], [`Modality`], [`Direction`]: tokens by modality and direction.
//! - [`Money`]: exact decimal amounts, never floats.
//! - [`PriceBook`], [`PriceContract`], [`Rating`]: prices and what an entry cost.
//! - [`Posting`]: a balanced double-entry wallet transaction; [`ExactSum`] sums money
//!   without rounding.
//!
//! This crate does no IO. The ledger's bytes for an entry are produced here
//! ([`Entry::encode`]) because the entry format is part of the domain: an auditor reads
//! exactly these bytes.
//!
//! ```
//! use ciyuan_core::{AccountPath, Entry, EntryBody, AccountInfo};
//! let path: AccountPath = "acme/cn".parse().unwrap();
//! assert_eq!(path.parent().unwrap().as_str(), "acme");
//! let entry = Entry::new(
//!     jiff::Timestamp::UNIX_EPOCH,
//!     path,
//!     EntryBody::AccountCreated(AccountInfo::default()),
//! );
//! let bytes = entry.encode();
//! assert_eq!(Entry::decode(&bytes).unwrap(), entry);
//! ```
#![deny(missing_docs)]

mod budget;
mod definition;
mod entry;
mod money;
mod path;
mod posting;
mod price;
mod reuse;
mod scope;
mod service_level;
mod statement;
mod text;
mod tokens;
mod wildcard;

pub use budget::{
    AccessSet, BudgetCleared, BudgetMeasure, BudgetMode, BudgetPer, BudgetPeriod, BudgetSet,
    CostAmount, Incident, IncidentCost, Selector, may_change_control,
};
pub use definition::TokenDefinition;
pub use entry::{
    AccountInfo, Adjustment, DecodeError, ENTRY_VERSION, Entry, EntryBody, GATEWAY_SOURCE,
    KeyCreated, KeyRevoked, MAX_TAG_KEY_BYTES, MAX_TAG_VALUE_BYTES, MAX_TAGS, Quality, Recount,
    TagError, Usage, check_tag, check_tags, ingest_key_digest, ingest_key_hash, parse_tag_list,
    read_tag_list,
};
/// Re-exported so every crate names time with the same version.
pub use jiff;
pub use money::{Currency, Money, MoneyError};
pub use path::{AccountPath, PathError};
pub use posting::{
    ExactSum, Grant, LedgerAccount, Leg, MAX_GRANT_ID_BYTES, MAX_LEGS, MAX_MEMO_BYTES,
    MAX_SIGNIFICANT_DIGITS, Posting, PostingError, PostingKind, WalletSet, fits_digits, may_post,
    parse_amount,
};
pub use price::{
    Band, BookTax, ClockTime, CommitmentPeriod, MAX_MARKUP_PERCENT, MAX_PARTS_PER_RULE,
    MAX_PRICE_NAME_BYTES, MAX_PRICE_SCALE, MAX_ROUNDING_PLACES, MAX_RULES_PER_BOOK, MAX_UNIT_PRICE,
    MinimumCommitment, PriceBook, PriceContract, PriceError, PriceKey, PriceRule, PriceSource,
    RatedLine, Rating, RatingBasis, RatingCorrection, Rounding, RoundingAt, RoundingMode,
    ServiceTier, Threshold, TierKey, TierKind, TierPeriod, TierPlace, Tiers, TimeWindow,
    UnitPrices, book_in_force, decimal_from_text, exact, may_set_contract, nearest_contract,
};
pub use scope::{Scope, ScopeError, Scopes};
pub use service_level::{
    CreditLine, CreditStep, Evaluation, Figures, LevelPeriod, MAX_CREDIT_STEPS, MAX_SERVICE_LEVELS,
    Metric, Objective, ObjectiveResult, Sample, ServiceLevel, ServiceLevelEvaluated, covered,
    credit_memo, evaluate, nearest_rank, upstream_failed,
};
pub use statement::{Reconciled, ReportDelivered, StatementClosed};
pub use text::{TextError, check_text};
pub use tokens::{Direction, MAX_TOKENS_PER_KEY, Modality, TokenCount, TokenError, TokenMap};
pub use wildcard::wildcard_match;
