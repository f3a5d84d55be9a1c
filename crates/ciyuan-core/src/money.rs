//! Exact money. Amounts are decimals; floats never touch money.

use rust_decimal::Decimal;
use std::fmt;
use std::str::FromStr;

/// An ISO 4217 currency code such as `USD` or `CNY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// Why a string is not a currency or amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not three upper-case ASCII letters.
    #[error("currency {0:?} is not a three-letter ISO 4217 code such as USD or CNY")]
    Currency(String),
    /// Not a decimal number.
    #[error("amount {0:?} is not a decimal number")]
    Amount(String),
    /// Two currencies mixed in one sum.
    #[error("cannot combine {0} with {1}")]
    Mismatch(Currency, Currency),
    /// The sum does not fit.
    #[error("amount overflow")]
    Overflow,
}

impl Currency {
    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// The ISO 4217 minor units (decimals of the smallest unit) of common currencies;
    /// `None` for others.
    pub fn minor_units(&self) -> Option<u32> {
        match self.as_str() {
            "JPY" | "KRW" | "VND" | "CLP" | "ISK" => Some(0),
            "CNY" | "USD" | "EUR" | "GBP" | "HKD" | "SGD" | "AUD" | "CAD" | "CHF" | "TWD"
            | "MOP" | "NZD" | "SEK" | "NOK" | "DKK" | "INR" | "MYR" | "THB" | "PHP" | "IDR"
            | "BRL" | "MXN" | "ZAR" | "RUB" | "AED" | "SAR" => Some(2),
            "KWD" | "BHD" | "OMR" | "JOD" | "TND" => Some(3),
            _ => None,
        }
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, MoneyError> {
        let b = s.as_bytes();
        if b.len() == 3 && b.iter().all(u8::is_ascii_uppercase) {
            Ok(Currency([b[0], b[1], b[2]]))
        } else {
            Err(MoneyError::Currency(s.to_string()))
        }
    }
}

impl serde::Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exact amount of one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    /// The amount, exact.
    pub amount: Decimal,
    /// Its currency.
    pub currency: Currency,
}

impl Money {
    /// Parses an amount written as a decimal string, e.g. `"250.00"`.
    pub fn parse(amount: &str, currency: &str) -> Result<Money, MoneyError> {
        Ok(Money {
            amount: Decimal::from_str_exact(amount)
                .map_err(|_| MoneyError::Amount(amount.to_string()))?,
            currency: currency.parse()?,
        })
    }

    /// Adds two amounts of the same currency.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::Mismatch(self.currency, other.currency));
        }
        Ok(Money {
            amount: self
                .amount
                .checked_add(other.amount)
                .ok_or(MoneyError::Overflow)?,
            currency: self.currency,
        })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_sums() {
        let a = Money::parse("0.1", "USD").unwrap();
        let b = Money::parse("0.2", "USD").unwrap();
        assert_eq!(
            a.checked_add(b).unwrap(),
            Money::parse("0.3", "USD").unwrap()
        );
        let c = Money::parse("1", "CNY").unwrap();
        assert_eq!(
            a.checked_add(c).unwrap_err().to_string(),
            "cannot combine USD with CNY"
        );
        assert!(Money::parse("1e3", "USD").is_err());
        assert!(Money::parse("1", "usd").is_err());
    }
}
