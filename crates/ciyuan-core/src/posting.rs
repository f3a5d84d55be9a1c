//! Wallet postings: balanced double-entry transactions, as the ledger records them.
//!
//! Every movement of prepaid money (a top-up, a grant of free credits, consumption,
//! a refund, a transfer, a grant's expiry, a reversal) is one [`Posting`] in one
//! currency whose legs move amounts between [`LedgerAccount`]s. Its debits equal its
//! credits exactly ([`Posting::check`]), so money is never created or lost, and an
//! auditor re-checks that from the log alone.
//!
//! # Sign convention
//!
//! The balance of an account is its credits minus its debits. A node's wallet
//! (its `cash` account and its `grant:<id>` accounts) is money the platform owes the
//! tenant, so a top-up credits the wallet and debits `@payments`, and consumption
//! debits the wallet and credits `@revenue`. The outside accounts' balances are
//! therefore the mirror images: `@payments` is minus everything paid in.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{AccountPath, Currency, TextError, check_text};

/// Most legs one posting may have.
pub const MAX_LEGS: usize = 64;
/// Longest memo, in bytes.
pub const MAX_MEMO_BYTES: usize = 256;
/// Longest grant id, in bytes.
pub const MAX_GRANT_ID_BYTES: usize = 64;
/// Most significant digits of an amount in a posting: 28 always fit a `Decimal`
/// (whose mantissa tops out at 79228162514264337593543950335, 29 digits, of which
/// only some 29-digit values fit).
pub const MAX_SIGNIFICANT_DIGITS: u32 = 28;

/// What a posting does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostingKind {
    /// Money paid in: `@payments` → a node's cash.
    Topup,
    /// Free credits: `@promotions` → a node's `grant:<id>`.
    Grant,
    /// Usage paid from a wallet: grants and cash → `@revenue`.
    Consume,
    /// Money given back (to a wallet, from `@refunds`, or out of one).
    Refund,
    /// Money moved between the wallets of two nodes.
    Transfer,
    /// The unused rest of a grant at its expiry: `grant:<id>` → `@promotions`.
    Expire,
    /// The mirror image of an earlier posting.
    Reverse,
    /// A service credit a contract's service level owes: `@refunds` → a node's cash;
    /// its memo names the `service_level.evaluated` entry that computed it.
    ServiceCredit,
}

impl fmt::Display for PostingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PostingKind::Topup => "topup",
            PostingKind::Grant => "grant",
            PostingKind::Consume => "consume",
            PostingKind::Refund => "refund",
            PostingKind::Transfer => "transfer",
            PostingKind::Expire => "expire",
            PostingKind::Reverse => "reverse",
            PostingKind::ServiceCredit => "service_credit",
        })
    }
}

/// An account of the wallet ledger. Written as a stable string:
/// `acme/cn:cash`, `acme/cn:grant:g1` (the root's are `/:cash`, `/:grant:g1`),
/// `@payments`, `@promotions`, `@revenue`, `@refunds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LedgerAccount {
    /// A node's paid balance.
    Cash(AccountPath),
    /// A node's balance of one grant of free credits, by the grant's id.
    Grant(AccountPath, String),
    /// Outside: money paid in by the tenant.
    Payments,
    /// Outside: free credits given (and taken back at expiry).
    Promotions,
    /// Outside: what usage consumed.
    Revenue,
    /// Outside: money refunded.
    Refunds,
}

impl LedgerAccount {
    /// The node whose wallet this account belongs to; `None` for outside accounts.
    pub fn node(&self) -> Option<&AccountPath> {
        match self {
            LedgerAccount::Cash(p) | LedgerAccount::Grant(p, _) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Display for LedgerAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerAccount::Cash(p) => write!(f, "{p}:cash"),
            LedgerAccount::Grant(p, id) => write!(f, "{p}:grant:{id}"),
            LedgerAccount::Payments => f.write_str("@payments"),
            LedgerAccount::Promotions => f.write_str("@promotions"),
            LedgerAccount::Revenue => f.write_str("@revenue"),
            LedgerAccount::Refunds => f.write_str("@refunds"),
        }
    }
}

/// Why a string or a posting is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostingError {
    /// Not a ledger account.
    #[error(
        "account {0:?} is not a ledger account (PATH:cash, PATH:grant:ID, @payments, @promotions, @revenue or @refunds)"
    )]
    Account(String),
    /// A grant id that is empty, too long, or has a character other than ASCII
    /// letters, digits, `-`, `_` or `.`.
    #[error("grant id {0:?} must be 1 to 64 ASCII letters, digits, '-', '_' or '.'")]
    GrantId(String),
    /// Not an exact decimal amount.
    #[error("{field}: {value:?} is not an exact decimal amount ({why})")]
    Amount {
        /// The field.
        field: String,
        /// The text.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// No legs.
    #[error("legs: a posting needs at least one leg")]
    NoLegs,
    /// More than [`MAX_LEGS`] legs.
    #[error("legs: {0} legs, at most {MAX_LEGS}")]
    TooManyLegs(usize),
    /// A leg with both sides, or neither, non-zero.
    #[error(
        "legs[{leg}]: exactly one of debit and credit must be non-zero (debit {debit}, credit {credit})"
    )]
    OneSide {
        /// The leg's index.
        leg: usize,
        /// Its debit.
        debit: Decimal,
        /// Its credit.
        credit: Decimal,
    },
    /// A negative amount.
    #[error("legs[{leg}].{side}: {amount} is negative")]
    Negative {
        /// The leg's index.
        leg: usize,
        /// `debit` or `credit`.
        side: &'static str,
        /// The amount.
        amount: Decimal,
    },
    /// An amount with more than [`MAX_SIGNIFICANT_DIGITS`] significant digits.
    #[error("{field}: {amount} has more than {MAX_SIGNIFICANT_DIGITS} significant digits")]
    TooPrecise {
        /// The field, e.g. `legs[2].credit`.
        field: String,
        /// The amount.
        amount: Decimal,
    },
    /// Debits differ from credits.
    #[error("legs: debits {debits} differ from credits {credits}")]
    Unbalanced {
        /// The sum of the debits, exactly.
        debits: String,
        /// The sum of the credits, exactly.
        credits: String,
    },
    /// A grant posting without its grant, or another posting with one.
    #[error("grant: {0}")]
    Grant(String),
    /// A leg's account that this kind of posting cannot move.
    #[error("legs[{leg}].account: {account} cannot be moved by a {kind} posting")]
    WrongAccount {
        /// The leg's index.
        leg: usize,
        /// The account.
        account: String,
        /// The posting's kind.
        kind: PostingKind,
    },
    /// A negative or malformed overdraft.
    #[error("overdraft: {0} must be zero or more, with at most 28 significant digits")]
    Overdraft(Decimal),
    /// A memo that is too long or has a control character.
    #[error(transparent)]
    Text(#[from] TextError),
}

fn check_grant_id(id: &str) -> Result<(), PostingError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_GRANT_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(PostingError::GrantId(id.to_string()))
    }
}

impl FromStr for LedgerAccount {
    type Err = PostingError;
    fn from_str(s: &str) -> Result<Self, PostingError> {
        let bad = || PostingError::Account(s.to_string());
        match s {
            "@payments" => return Ok(LedgerAccount::Payments),
            "@promotions" => return Ok(LedgerAccount::Promotions),
            "@revenue" => return Ok(LedgerAccount::Revenue),
            "@refunds" => return Ok(LedgerAccount::Refunds),
            _ => {}
        }
        // Paths never hold ':', so the first one ends the path.
        let (path, rest) = s.split_once(':').ok_or_else(bad)?;
        let path = AccountPath::parse(path).map_err(|_| bad())?;
        if rest == "cash" {
            return Ok(LedgerAccount::Cash(path));
        }
        let id = rest.strip_prefix("grant:").ok_or_else(bad)?;
        check_grant_id(id)?;
        Ok(LedgerAccount::Grant(path, id.to_string()))
    }
}

impl Serialize for LedgerAccount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LedgerAccount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a decimal amount exactly: `[+-]digits[.digits][(e|E)[+-]digits]`, the
/// exponent applied without rounding (`2.5e-06` is `0.0000025`). Refuses text that
/// a `Decimal` cannot hold exactly (more than 28 decimal places once the exponent
/// is applied and trailing zeros dropped, or a mantissa beyond 96 bits), so JSON
/// numbers read as their literal text (`serde_json::value::RawValue`,
/// `Number::to_string`) convert without ever touching a float.
pub fn parse_amount(field: &str, text: &str) -> Result<Decimal, PostingError> {
    let bad = |why| PostingError::Amount {
        field: field.to_string(),
        value: text.to_string(),
        why,
    };
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (number, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(bad("no digits"));
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad(
            "a character other than digits, one '.', a sign and an exponent",
        ));
    }
    let exp: i64 = match exponent {
        None => 0,
        Some(e) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("a malformed exponent"));
            }
            // Any exponent beyond ±10^6 cannot give a value a Decimal holds.
            if digits.len() > 6 {
                return Err(bad("the exponent is out of range"));
            }
            let mut v: i64 = 0;
            for b in digits.bytes() {
                v = v * 10 + i64::from(b - b'0');
            }
            if e.starts_with('-') { -v } else { v }
        }
    };
    // The digits without leading zeros, and the scale they are written at.
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
    let lead = digits.iter().take_while(|&&b| b == b'0').count();
    digits.drain(..lead);
    let mut scale = frac.len() as i64 - exp;
    // Trailing zeros beyond what a Decimal's scale can hold carry no value.
    while scale > 28 && digits.last() == Some(&b'0') {
        digits.pop();
        scale -= 1;
    }
    if digits.is_empty() {
        // Zero keeps the scale it is written at (`0.00`), so text round-trips.
        return Ok(Decimal::new(0, scale.clamp(0, 28) as u32));
    }
    if scale > 28 {
        return Err(bad("more than 28 decimal places"));
    }
    if scale < 0 {
        // Bounded: more than 29 digits never fit below.
        if digits.len() as i64 - scale > 29 {
            return Err(bad("too large"));
        }
        digits.extend(std::iter::repeat_n(b'0', (-scale) as usize));
        scale = 0;
    }
    if digits.len() > 29 {
        return Err(bad("more than 29 significant digits"));
    }
    let mut mantissa: i128 = 0;
    for b in &digits {
        mantissa = mantissa * 10 + i128::from(b - b'0');
    }
    if negative {
        mantissa = -mantissa;
    }
    Decimal::try_from_i128_with_scale(mantissa, scale as u32).map_err(|_| bad("too large"))
}

/// Whether `d` has at most [`MAX_SIGNIFICANT_DIGITS`] significant digits.
pub fn fits_digits(d: Decimal) -> bool {
    d.mantissa().unsigned_abs() < 10u128.pow(MAX_SIGNIFICANT_DIGITS)
}

/// Serde for amounts in postings: a string in, a string out, parsed by
/// [`parse_amount`] (never through a float, never rounded).
pub(crate) mod amount_serde {
    use rust_decimal::Decimal;
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        crate::price::exact::serialize(d, s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        named("amount", d)
    }

    /// Reads an amount, naming `field` in the error.
    pub fn named<'de, D: serde::Deserializer<'de>>(field: &str, d: D) -> Result<Decimal, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse_amount(field, &s).map_err(serde::de::Error::custom)
    }
}

/// Field-named variants of [`amount_serde`], so an error says which amount.
macro_rules! named_amount {
    ($module:ident, $field:literal) => {
        pub(crate) mod $module {
            pub use super::amount_serde::serialize;
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(
                d: D,
            ) -> Result<rust_decimal::Decimal, D::Error> {
                super::amount_serde::named($field, d)
            }
        }
    };
}
named_amount!(debit_serde, "debit");
named_amount!(credit_serde, "credit");
named_amount!(overdraft_serde, "overdraft");

/// Serde for a [`Currency`] as its three-letter code (money.rs gives `Currency` no
/// serde of its own).
pub(crate) mod currency_serde {
    use crate::Currency;
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(c: &Currency, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_str())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Currency, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_zero(d: &Decimal) -> bool {
    d.is_zero()
}

/// One leg of a posting: an amount debited or credited to one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    /// The account moved.
    pub account: LedgerAccount,
    /// Taken from the account (zero when this is a credit).
    #[serde(with = "debit_serde", default, skip_serializing_if = "is_zero")]
    pub debit: Decimal,
    /// Given to the account (zero when this is a debit).
    #[serde(with = "credit_serde", default, skip_serializing_if = "is_zero")]
    pub credit: Decimal,
}

impl Leg {
    /// A debit of `amount` to `account`.
    pub fn debit(account: LedgerAccount, amount: Decimal) -> Leg {
        Leg {
            account,
            debit: amount,
            credit: Decimal::ZERO,
        }
    }

    /// A credit of `amount` to `account`.
    pub fn credit(account: LedgerAccount, amount: Decimal) -> Leg {
        Leg {
            account,
            debit: Decimal::ZERO,
            credit: amount,
        }
    }
}

/// The grant a `grant` posting creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Unique on its node and currency; names the `grant:<id>` account.
    pub id: String,
    /// Higher is spent first.
    #[serde(default)]
    pub priority: i32,
    /// When its unused rest expires; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// One balanced double-entry transaction in one currency (the body of a wallet
/// posting entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    /// What it does.
    pub kind: PostingKind,
    /// Its one currency.
    #[serde(with = "currency_serde")]
    pub currency: Currency,
    /// The legs; debits equal credits.
    pub legs: Vec<Leg>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub memo: String,
    /// The usage entry a consumption settles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_entry: Option<u64>,
    /// The grant a `grant` posting creates (only there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Grant>,
    /// The account node of the key that wrote it; `None` when the server wrote it
    /// itself (consumption, expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<AccountPath>,
}

impl Posting {
    fn new(kind: PostingKind, currency: Currency, legs: Vec<Leg>) -> Posting {
        Posting {
            kind,
            currency,
            legs,
            memo: String::new(),
            usage_entry: None,
            grant: None,
            set_by: None,
        }
    }

    /// Money paid in: `@payments` → `node:cash`.
    pub fn topup(node: &AccountPath, currency: Currency, amount: Decimal) -> Posting {
        Posting::new(
            PostingKind::Topup,
            currency,
            vec![
                Leg::debit(LedgerAccount::Payments, amount),
                Leg::credit(LedgerAccount::Cash(node.clone()), amount),
            ],
        )
    }

    /// Free credits: `@promotions` → `node:grant:<id>`.
    pub fn grant(node: &AccountPath, currency: Currency, amount: Decimal, grant: Grant) -> Posting {
        let mut p = Posting::new(
            PostingKind::Grant,
            currency,
            vec![
                Leg::debit(LedgerAccount::Promotions, amount),
                Leg::credit(LedgerAccount::Grant(node.clone(), grant.id.clone()), amount),
            ],
        );
        p.grant = Some(grant);
        p
    }

    /// Cash moved from one node's wallet to another's (written on a common
    /// ancestor of both).
    pub fn transfer(
        from: &AccountPath,
        to: &AccountPath,
        currency: Currency,
        amount: Decimal,
    ) -> Posting {
        Posting::new(
            PostingKind::Transfer,
            currency,
            vec![
                Leg::debit(LedgerAccount::Cash(from.clone()), amount),
                Leg::credit(LedgerAccount::Cash(to.clone()), amount),
            ],
        )
    }

    /// Money given back to a node's wallet: `@refunds` → `node:cash`.
    pub fn refund(node: &AccountPath, currency: Currency, amount: Decimal) -> Posting {
        Posting::new(
            PostingKind::Refund,
            currency,
            vec![
                Leg::debit(LedgerAccount::Refunds, amount),
                Leg::credit(LedgerAccount::Cash(node.clone()), amount),
            ],
        )
    }

    /// A service credit paid into a node's wallet: `@refunds` → `node:cash`.
    pub fn service_credit(node: &AccountPath, currency: Currency, amount: Decimal) -> Posting {
        Posting::new(
            PostingKind::ServiceCredit,
            currency,
            vec![
                Leg::debit(LedgerAccount::Refunds, amount),
                Leg::credit(LedgerAccount::Cash(node.clone()), amount),
            ],
        )
    }

    /// The mirror image of this posting (every debit a credit and back), as a
    /// `reverse` posting; name the reversed entry in its memo.
    pub fn reversal(&self) -> Posting {
        let legs = self
            .legs
            .iter()
            .map(|l| Leg {
                account: l.account.clone(),
                debit: l.credit,
                credit: l.debit,
            })
            .collect();
        Posting::new(PostingKind::Reverse, self.currency, legs)
    }

    /// Checks what every posting must satisfy, naming the leg or field at fault:
    /// 1 to [`MAX_LEGS`] legs; on each leg exactly one side non-zero, positive, with
    /// at most 28 significant digits; debits equal to credits, exactly; a grant
    /// exactly on `grant` postings, whose wallet legs are that grant's accounts; no
    /// grant account credited by anything but a `grant` (or `reverse`) posting; a
    /// memo without control characters.
    pub fn check(&self) -> Result<(), PostingError> {
        if self.legs.is_empty() {
            return Err(PostingError::NoLegs);
        }
        if self.legs.len() > MAX_LEGS {
            return Err(PostingError::TooManyLegs(self.legs.len()));
        }
        if !self.memo.is_empty() {
            check_text("memo", &self.memo, MAX_MEMO_BYTES)?;
        }
        let mut debits = ExactSum::ZERO;
        let mut credits = ExactSum::ZERO;
        for (i, leg) in self.legs.iter().enumerate() {
            for (side, amount) in [("debit", leg.debit), ("credit", leg.credit)] {
                if amount.is_sign_negative() && !amount.is_zero() {
                    return Err(PostingError::Negative {
                        leg: i,
                        side,
                        amount,
                    });
                }
                if !fits_digits(amount) {
                    return Err(PostingError::TooPrecise {
                        field: format!("legs[{i}].{side}"),
                        amount,
                    });
                }
            }
            if leg.debit.is_zero() == leg.credit.is_zero() {
                return Err(PostingError::OneSide {
                    leg: i,
                    debit: leg.debit,
                    credit: leg.credit,
                });
            }
            // At most 64 legs of at most 2^96 each: far inside ExactSum's 2^127.
            debits = debits.plus(leg.debit);
            credits = credits.plus(leg.credit);
            if let LedgerAccount::Grant(_, id) = &leg.account {
                check_grant_id(id)?;
                let wrong = match (&self.grant, self.kind) {
                    (Some(g), PostingKind::Grant) => g.id != *id,
                    (_, PostingKind::Grant) => false,
                    // Only a grant (or the reversal of one, or consumption given back)
                    // puts money on a grant account.
                    (_, PostingKind::Reverse | PostingKind::Refund) => false,
                    _ => !leg.credit.is_zero(),
                };
                if wrong {
                    return Err(PostingError::WrongAccount {
                        leg: i,
                        account: leg.account.to_string(),
                        kind: self.kind,
                    });
                }
            }
        }
        if debits != credits {
            return Err(PostingError::Unbalanced {
                debits: debits.to_string(),
                credits: credits.to_string(),
            });
        }
        match (&self.grant, self.kind) {
            (Some(g), PostingKind::Grant) => check_grant_id(&g.id)?,
            (None, PostingKind::Grant) => {
                return Err(PostingError::Grant(
                    "a grant posting names its grant".into(),
                ));
            }
            (Some(_), kind) => {
                return Err(PostingError::Grant(format!(
                    "only grant postings name a grant, not {kind}"
                )));
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// What the posting does to `account`'s balance (credits minus debits), exactly.
    pub fn effect_on(&self, account: &LedgerAccount) -> ExactSum {
        let mut out = ExactSum::ZERO;
        for leg in self.legs.iter().filter(|l| &l.account == account) {
            out = out.plus(leg.credit).minus(leg.debit);
        }
        out
    }
}

/// Whether a key at `set_by` (the root when unknown) may top up or grant to the
/// wallet of `node`: only from strictly above it, so a tenant cannot mint its own
/// money. (Compare [`crate::may_change_control`], which also allows the same node.)
pub fn may_post(set_by: Option<&AccountPath>, node: &AccountPath) -> bool {
    match set_by {
        Some(setter) => setter != node && node.is_within(setter),
        None => !node.is_root(),
    }
}

/// A wallet's settings on the entry's node, in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletSet {
    /// The wallet's currency.
    #[serde(with = "currency_serde")]
    pub currency: Currency,
    /// How far below zero the wallet may be spent; zero by default.
    #[serde(with = "overdraft_serde", default, skip_serializing_if = "is_zero")]
    pub overdraft: Decimal,
    /// The account node of the key that set them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<AccountPath>,
}

impl WalletSet {
    /// The overdraft is zero or more, with at most 28 significant digits.
    pub fn check(&self) -> Result<(), PostingError> {
        if (self.overdraft.is_sign_negative() && !self.overdraft.is_zero())
            || !fits_digits(self.overdraft)
        {
            return Err(PostingError::Overdraft(self.overdraft));
        }
        Ok(())
    }
}

/// 10^28: one unit in [`ExactSum`]'s fractional part.
const ONE: u128 = 10u128.pow(28);

/// 10^0 to 10^28, looked up rather than computed on every conversion.
const POW10: [u128; 29] = {
    let mut t = [1u128; 29];
    let mut i = 1;
    while i < 29 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

/// An exact signed sum of decimal amounts: `units + frac / 10^28` with
/// `0 <= frac < 10^28`.
///
/// Every `Decimal` converts exactly (its scale is at most 28 and its mantissa below
/// 2^96), and sums stay exact while the units fit `i128` (±1.7 × 10^38): adding a
/// `Decimal` moves the units by less than 2^96 + 1, so leaving `i128` takes more
/// than 2^30 additions of the largest `Decimal` there is. A plain `Decimal` sum, by
/// contrast, silently rounds when the result needs more than 28 digits (`10^27 +
/// 10^-27`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ExactSum {
    // Field order matters: the derived order compares units first, then frac, which
    // is the numeric order because frac is always in 0..10^28.
    units: i128,
    frac: u128,
}

impl ExactSum {
    /// Zero.
    pub const ZERO: ExactSum = ExactSum { units: 0, frac: 0 };

    /// `d`, exactly.
    pub fn of(d: Decimal) -> ExactSum {
        let scale = d.scale();
        let m = d.mantissa();
        if scale == 0 {
            return ExactSum { units: m, frac: 0 };
        }
        // |m| < 2^96: split it into whole units and the fraction's digits, with one
        // 64-bit division when both fit (the usual case: prices and costs have small
        // mantissas), else one 128-bit one.
        let a = m.unsigned_abs();
        let p = POW10[scale as usize];
        let (q, r) = match (u64::try_from(a), scale <= 19) {
            (Ok(a64), true) => {
                let p = p as u64;
                (u128::from(a64 / p), u128::from(a64 % p))
            }
            _ => {
                let q = a / p;
                (q, a - q * p)
            }
        };
        // 0 <= r < 10^scale, so r × 10^(28 - scale) < 10^28; q < 2^96.
        let positive = ExactSum {
            units: q as i128,
            frac: r * POW10[(28 - scale) as usize],
        };
        if m < 0 {
            // A Decimal's mantissa is far from i128::MIN: negation cannot fail.
            let neg = positive.checked_neg();
            assert!(neg.is_some(), "negating {positive}");
            neg.unwrap_or(positive)
        } else {
            positive
        }
    }

    /// `self + other`; `None` beyond ±1.7 × 10^38.
    pub fn checked_add(self, other: ExactSum) -> Option<ExactSum> {
        let f = self.frac + other.frac; // < 2 × 10^28
        let (frac, carry) = if f >= ONE { (f - ONE, 1) } else { (f, 0) };
        Some(ExactSum {
            units: self.units.checked_add(other.units)?.checked_add(carry)?,
            frac,
        })
    }

    /// `-self`; `None` only for the most negative value.
    pub fn checked_neg(self) -> Option<ExactSum> {
        if self.frac == 0 {
            Some(ExactSum {
                units: self.units.checked_neg()?,
                frac: 0,
            })
        } else {
            Some(ExactSum {
                units: self.units.checked_neg()?.checked_sub(1)?,
                frac: ONE - self.frac,
            })
        }
    }

    /// `self - other`; `None` beyond ±1.7 × 10^38.
    pub fn checked_sub(self, other: ExactSum) -> Option<ExactSum> {
        self.checked_add(other.checked_neg()?)
    }

    /// `self + d`. Panics beyond ±1.7 × 10^38 units, which sums of money never
    /// reach (see the type's documentation): an overflow is a broken invariant, not
    /// a value to carry on with.
    pub fn plus(self, d: Decimal) -> ExactSum {
        let sum = self.checked_add(ExactSum::of(d));
        assert!(
            sum.is_some(),
            "an exact sum of money left ±1.7e38: {self} + {d}"
        );
        sum.unwrap_or(self)
    }

    /// `self - d`; panics as [`ExactSum::plus`].
    pub fn minus(self, d: Decimal) -> ExactSum {
        self.plus(-d)
    }

    /// `self × k`; `None` beyond ±1.7 × 10^38.
    pub fn checked_mul_small(self, k: u32) -> Option<ExactSum> {
        let f = self.frac * u128::from(k); // < 10^28 × 2^32 < 2^126
        Some(ExactSum {
            units: self
                .units
                .checked_mul(i128::from(k))?
                .checked_add((f / ONE) as i128)?,
            frac: f % ONE,
        })
    }

    /// Whether it is zero.
    pub fn is_zero(self) -> bool {
        self == ExactSum::ZERO
    }

    /// Whether it is below zero.
    pub fn is_negative(self) -> bool {
        self.units < 0
    }

    /// Whether it is above zero.
    pub fn is_positive(self) -> bool {
        self > ExactSum::ZERO
    }

    /// The same value as a `Decimal`, when one holds it exactly.
    pub fn to_decimal(self) -> Option<Decimal> {
        let (frac, scale) = self.fraction_digits();
        let m = self
            .units
            .checked_mul(POW10[scale as usize] as i128)?
            .checked_add(frac as i128)?;
        Decimal::try_from_i128_with_scale(m, scale).ok()
    }

    /// The fraction without its trailing zeros, and how many digits are left: `frac
    /// / 10^(28 - scale)` and `scale`. One 128-bit division (into two 14-digit
    /// halves), then 64-bit arithmetic.
    fn fraction_digits(self) -> (u128, u32) {
        if self.frac == 0 {
            return (0, 0);
        }
        const HALF: u128 = 10u128.pow(14);
        let (hi, lo) = ((self.frac / HALF) as u64, (self.frac % HALF) as u64);
        let zeros = |mut x: u64| {
            let mut z = 0u32;
            while x != 0 && x.is_multiple_of(10) {
                x /= 10;
                z += 1;
            }
            (x, z)
        };
        if lo == 0 {
            // At least 14 trailing zeros; hi is not zero (frac is not).
            let (x, z) = zeros(hi);
            (u128::from(x), 28 - 14 - z)
        } else {
            let (x, z) = zeros(lo);
            // frac / 10^z = hi × 10^(14 - z) + lo / 10^z, below 10^28.
            (
                u128::from(hi) * POW10[(14 - z) as usize] + u128::from(x),
                28 - z,
            )
        }
    }

    /// The largest `Decimal` at or below this value (itself, when one holds it
    /// exactly); `None` beyond a `Decimal`'s range.
    pub fn to_decimal_floor(self) -> Option<Decimal> {
        if let Some(d) = self.to_decimal() {
            return Some(d);
        }
        // Drop fractional digits (towards minus infinity, as frac is the part above
        // the floor) until the value fits. Rare (values of more than 28 digits), so
        // plainly.
        for scale in (0..28u32).rev() {
            let frac = self.frac / 10u128.pow(28 - scale);
            let m = self
                .units
                .checked_mul(10i128.pow(scale))
                .and_then(|u| u.checked_add(frac as i128));
            if let Some(d) = m.and_then(|m| Decimal::try_from_i128_with_scale(m, scale).ok()) {
                return Some(d);
            }
        }
        None
    }
}

impl From<Decimal> for ExactSum {
    fn from(d: Decimal) -> ExactSum {
        ExactSum::of(d)
    }
}

impl fmt::Display for ExactSum {
    /// The exact value in plain decimal notation, without trailing zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (neg, v) = if self.is_negative() {
            // Only i128::MIN units have no negation: print it by hand.
            match self.checked_neg() {
                Some(n) => (true, n),
                None => return write!(f, "{}", self.units),
            }
        } else {
            (false, *self)
        };
        if neg {
            f.write_str("-")?;
        }
        write!(f, "{}", v.units)?;
        if v.frac != 0 {
            let digits = format!("{:028}", v.frac);
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }
    fn p(s: &str) -> AccountPath {
        s.parse().unwrap()
    }

    fn topup(node: &str, amount: &str) -> Posting {
        Posting {
            kind: PostingKind::Topup,
            currency: "CNY".parse().unwrap(),
            legs: vec![
                Leg::debit(LedgerAccount::Payments, d(amount)),
                Leg::credit(LedgerAccount::Cash(p(node)), d(amount)),
            ],
            memo: String::new(),
            usage_entry: None,
            grant: None,
            set_by: Some(p("acme")),
        }
    }

    #[test]
    fn accounts_round_trip_as_strings() {
        for s in [
            "acme/cn:cash",
            "acme/cn:grant:g1",
            "/:cash",
            "/:grant:spring-2026",
            "@payments",
            "@promotions",
            "@revenue",
            "@refunds",
        ] {
            let a: LedgerAccount = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        for bad in [
            "acme",
            "acme:cashx",
            "acme:grant:",
            "acme:grant:a:b",
            "@other",
            "a//b:cash",
            "",
        ] {
            assert!(bad.parse::<LedgerAccount>().is_err(), "{bad}");
        }
        assert_eq!(
            "acme:grant:"
                .parse::<LedgerAccount>()
                .unwrap_err()
                .to_string(),
            "grant id \"\" must be 1 to 64 ASCII letters, digits, '-', '_' or '.'"
        );
    }

    #[test]
    fn a_topup_serializes_compactly_and_round_trips() {
        let t = topup("acme/cn", "100.00");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"topup","currency":"CNY","legs":[{"account":"@payments","debit":"100.00"},{"account":"acme/cn:cash","credit":"100.00"}],"set_by":"acme"}"#
        );
        let back: Posting = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        back.check().unwrap();
    }

    #[test]
    fn amounts_must_be_exact_strings() {
        let json =
            r#"{"kind":"topup","currency":"CNY","legs":[{"account":"@payments","debit":100}]}"#;
        assert!(serde_json::from_str::<Posting>(json).is_err());
        // 29 decimal places: a Decimal would round it; the ledger refuses it.
        let json = r#"{"kind":"topup","currency":"CNY","legs":[{"account":"@payments","debit":"0.00000000000000000000000000001"}]}"#;
        let err = serde_json::from_str::<Posting>(json)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("debit: \"0.00000000000000000000000000001\" is not an exact decimal amount (more than 28 decimal places)"),
            "{err}"
        );
        let json = r#"{"kind":"topup","currency":"cny","legs":[]}"#;
        assert!(serde_json::from_str::<Posting>(json).is_err());
    }

    #[test]
    fn check_names_what_is_wrong() {
        let mut t = topup("acme/cn", "100");
        t.legs[1].credit = d("99.99");
        assert_eq!(
            t.check().unwrap_err().to_string(),
            "legs: debits 100 differ from credits 99.99"
        );
        let mut t = topup("acme/cn", "100");
        t.legs[0].credit = d("1");
        assert!(
            t.check()
                .unwrap_err()
                .to_string()
                .starts_with("legs[0]: exactly one")
        );
        let mut t = topup("acme/cn", "100");
        t.legs[1].credit = d("-100");
        assert_eq!(
            t.check().unwrap_err().to_string(),
            "legs[1].credit: -100 is negative"
        );
        let mut t = topup("acme/cn", "100");
        t.legs.clear();
        assert_eq!(t.check().unwrap_err(), PostingError::NoLegs);
        let mut t = topup("acme/cn", "1");
        t.legs[0].debit = Decimal::MAX;
        t.legs[1].credit = Decimal::MAX;
        assert!(matches!(t.check(), Err(PostingError::TooPrecise { .. })));
        let mut t = topup("acme/cn", "1");
        t.memo = "a\nb".into();
        assert!(t.check().unwrap_err().to_string().starts_with("memo:"));
        let mut t = topup("acme/cn", "1");
        t.legs[1].account = LedgerAccount::Grant(p("acme/cn"), "g".into());
        assert_eq!(
            t.check().unwrap_err().to_string(),
            "legs[1].account: acme/cn:grant:g cannot be moved by a topup posting"
        );
        t.kind = PostingKind::Grant;
        assert_eq!(
            t.check().unwrap_err().to_string(),
            "grant: a grant posting names its grant"
        );
        t.grant = Some(Grant {
            id: "g".into(),
            priority: 1,
            expires_at: None,
        });
        t.check().unwrap();
        t.grant = Some(Grant {
            id: "other".into(),
            priority: 1,
            expires_at: None,
        });
        assert!(matches!(
            t.check(),
            Err(PostingError::WrongAccount { leg: 1, .. })
        ));
    }

    #[test]
    fn a_sum_that_decimal_would_round_stays_exact() {
        // 10^27 + 10^-27 needs 55 digits: a Decimal sum rounds it, check() must not.
        let big = d("1000000000000000000000000000");
        let tiny = d("0.000000000000000000000000001");
        assert_eq!(
            big + tiny,
            big,
            "Decimal rounds (else this test proves nothing)"
        );
        let t = Posting {
            kind: PostingKind::Transfer,
            currency: "USD".parse().unwrap(),
            legs: vec![
                Leg::debit(LedgerAccount::Cash(p("a")), big),
                Leg::debit(LedgerAccount::Cash(p("b")), tiny),
                Leg::credit(LedgerAccount::Cash(p("c")), big),
            ],
            memo: String::new(),
            usage_entry: None,
            grant: None,
            set_by: None,
        };
        assert!(matches!(t.check(), Err(PostingError::Unbalanced { .. })));
        assert_eq!(
            ExactSum::of(big).plus(tiny).to_string(),
            "1000000000000000000000000000.000000000000000000000000001"
        );
    }

    #[test]
    fn constructors_build_balanced_postings() {
        let cny: Currency = "CNY".parse().unwrap();
        let g = Grant {
            id: "spring".into(),
            priority: 2,
            expires_at: None,
        };
        let all = [
            Posting::topup(&p("acme"), cny, d("100")),
            Posting::grant(&p("acme"), cny, d("5"), g),
            Posting::transfer(&p("acme/a"), &p("acme/b"), cny, d("1.5")),
            Posting::refund(&p("acme"), cny, d("0.25")),
        ];
        for x in &all {
            x.check().unwrap();
            x.reversal().check().unwrap();
            assert_eq!(x.reversal().reversal().legs, x.legs);
        }
        assert_eq!(
            serde_json::to_string(&all[1]).unwrap(),
            r#"{"kind":"grant","currency":"CNY","legs":[{"account":"@promotions","debit":"5"},{"account":"acme:grant:spring","credit":"5"}],"grant":{"id":"spring","priority":2}}"#
        );
        let acme_cash = LedgerAccount::Cash(p("acme"));
        assert_eq!(all[0].effect_on(&acme_cash).to_string(), "100");
        assert_eq!(all[0].reversal().effect_on(&acme_cash).to_string(), "-100");
    }

    #[test]
    fn only_keys_strictly_above_may_post() {
        assert!(may_post(Some(&p("acme")), &p("acme/cn")));
        assert!(may_post(Some(&AccountPath::root()), &p("acme")));
        assert!(!may_post(Some(&p("acme/cn")), &p("acme/cn")));
        assert!(!may_post(Some(&p("acme/cn")), &p("acme")));
        assert!(!may_post(Some(&p("other")), &p("acme/cn")));
        assert!(may_post(None, &p("acme")));
        assert!(!may_post(None, &AccountPath::root()));
    }

    #[test]
    fn wallet_settings() {
        let w: WalletSet = serde_json::from_str(r#"{"currency":"CNY","overdraft":"50"}"#).unwrap();
        assert_eq!(w.overdraft, d("50"));
        w.check().unwrap();
        let w = WalletSet {
            overdraft: d("-1"),
            ..w
        };
        assert_eq!(
            w.check().unwrap_err().to_string(),
            "overdraft: -1 must be zero or more, with at most 28 significant digits"
        );
        let w: WalletSet = serde_json::from_str(r#"{"currency":"USD"}"#).unwrap();
        assert!(w.overdraft.is_zero());
        assert_eq!(serde_json::to_string(&w).unwrap(), r#"{"currency":"USD"}"#);
    }

    #[test]
    fn amounts_parse_exactly_with_exponents() {
        let ok = [
            ("2.5e-06", "0.0000025"),
            ("2.5E-6", "0.0000025"),
            ("1e3", "1000"),
            ("-1.5e+2", "-150"),
            ("0.000", "0.000"),
            ("000123.4500", "123.4500"),
            (".5", "0.5"),
            ("5.", "5"),
            ("1e-28", "0.0000000000000000000000000001"),
            ("100e-30", "0.0000000000000000000000000001"),
            (
                "79228162514264337593543950335",
                "79228162514264337593543950335",
            ),
            ("0e999999", "0"),
        ];
        for (text, want) in ok {
            let got = parse_amount("x", text).unwrap();
            assert_eq!(got, d(want), "{text}");
        }
        for bad in [
            "",
            "-",
            ".",
            "e5",
            "1e",
            "1e+",
            "1.2.3",
            "1,5",
            "0x10",
            "1e-29",
            "79228162514264337593543950336",
            "1e29",
            "1e9999999",
            " 1",
            "nan",
            "inf",
        ] {
            let err = parse_amount("price", bad).unwrap_err().to_string();
            assert!(err.starts_with("price: "), "{bad}: {err}");
        }
    }

    #[test]
    fn conversions_at_the_edges() {
        for s in [
            "0",
            "-0.5",
            "0.0000000000000000000000000001",
            "-0.0000000000000000000000000001",
            "12345678901234.56789012345678",
            "79228162514264337593543950335",
            "-79228162514264337593543950335",
            "7.9228162514264337593543950335",
            "0.00000000000001",
            "0.10000000000001",
            "18446744073709551616.5",
        ] {
            let x = d(s);
            assert_eq!(ExactSum::of(x).to_decimal().unwrap(), x, "{s}");
            assert_eq!(
                ExactSum::of(x).to_string(),
                x.normalize().to_string(),
                "{s}"
            );
        }
        // Beyond a Decimal: exact as a sum, floored when converted.
        let big = ExactSum::of(Decimal::MAX).plus(d("0.5"));
        assert_eq!(big.to_decimal(), None);
        assert_eq!(big.to_decimal_floor(), Some(Decimal::MAX));
        let neg = ExactSum::ZERO
            .minus(d("10000000000000000000000000000"))
            .minus(d("0.1"));
        assert_eq!(neg.to_decimal(), None);
        assert_eq!(
            neg.to_decimal_floor(),
            Some(d("-10000000000000000000000000001"))
        );
    }

    proptest! {
        #[test]
        fn exact_sums_match_integer_arithmetic(
            xs in proptest::collection::vec((any::<i32>(), 0u32..=12), 1..40)
        ) {
            // With scales of at most 12, scaling by 10^12 is exact in i128, and 40
            // i32 mantissas so scaled stay within a Decimal.
            let mut sum = ExactSum::ZERO;
            let mut want: i128 = 0;
            for &(m, s) in &xs {
                let x = Decimal::new(i64::from(m), s);
                sum = sum.plus(x);
                want += i128::from(m) * 10i128.pow(12 - s);
            }
            let expect = Decimal::try_from_i128_with_scale(want, 12).unwrap();
            prop_assert_eq!(sum.to_decimal().unwrap(), expect);
            prop_assert_eq!(sum, ExactSum::of(expect));
            prop_assert_eq!(sum.is_negative(), want < 0);
            let back = xs.iter().fold(sum, |acc, &(m, s)| acc.minus(Decimal::new(i64::from(m), s)));
            prop_assert!(back.is_zero());
        }

        #[test]
        fn decimal_round_trips(m in any::<i64>(), hi in any::<u32>(), s in 0u32..=28) {
            let x = Decimal::from_i128_with_scale((i128::from(hi) << 63) | i128::from(m.unsigned_abs() as i64 & i64::MAX), s);
            let x = if m < 0 { -x } else { x };
            prop_assert_eq!(ExactSum::of(x).to_decimal().unwrap(), x);
            prop_assert_eq!(ExactSum::of(x).to_decimal_floor().unwrap(), x);
            prop_assert_eq!(parse_amount("x", &x.to_string()).unwrap(), x);
            prop_assert_eq!(ExactSum::of(x).to_string(), x.normalize().to_string());
        }
    }
}
