//! Key scopes: what an API key may do.

use std::fmt;
use std::str::FromStr;

/// One permission an API key can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Call the LLM gateway.
    Gateway,
    /// Report usage through the ingest API.
    Ingest,
    /// Read accounts and usage.
    Read,
    /// Manage accounts, keys, budgets and corrections (implies `read`).
    Admin,
    /// Read checkpoints, proofs and audit bundles.
    Audit,
}

/// Why a string is not a scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (expected one of gateway, ingest, read, admin, audit)")]
pub struct ScopeError(pub String);

impl Scope {
    /// Every scope, in display order.
    pub const ALL: [Scope; 5] = [
        Scope::Gateway,
        Scope::Ingest,
        Scope::Read,
        Scope::Admin,
        Scope::Audit,
    ];

    /// The scope's name as written in APIs and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Gateway => "gateway",
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
            Scope::Audit => "audit",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| ScopeError(s.to_string()))
    }
}

/// A set of scopes, small enough to copy.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// No scope at all.
    pub const NONE: Scopes = Scopes(0);

    /// Whether the set grants `scope`. `admin` grants `read` too.
    pub fn allows(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0 || (scope == Scope::Read && self.0 & Scope::Admin.bit() != 0)
    }

    /// Whether `scope` is literally in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Adds a scope.
    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every scope of `other` is in `self` (literally, without implications).
    pub fn is_superset(self, other: Scopes) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether a key with these scopes may hand out every scope of `other`: each
    /// one is allowed by these ([`Scopes::allows`], so admin grants read).
    pub fn grants(self, other: Scopes) -> bool {
        other.iter().all(|s| self.allows(s))
    }

    /// The scopes in display order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// Parses a comma-separated list such as `gateway,read`.
    pub fn parse_list(s: &str) -> Result<Scopes, ScopeError> {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Scope::from_str)
            .collect()
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut s = Scopes::NONE;
        for scope in iter {
            s.insert(scope);
        }
        s
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(s.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({self})")
    }
}

impl serde::Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(Scope::as_str))
    }
}

impl<'de> serde::Deserialize<'de> for Scopes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        names
            .iter()
            .map(|n| Scope::from_str(n).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let s = Scopes::parse_list("read, gateway").unwrap();
        assert_eq!(s.to_string(), "gateway,read");
        assert_eq!(
            Scopes::parse_list("gateway,root").unwrap_err().to_string(),
            "unknown scope \"root\" (expected one of gateway, ingest, read, admin, audit)"
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"["gateway","read"]"#);
        assert_eq!(serde_json::from_str::<Scopes>(&json).unwrap(), s);
    }

    #[test]
    fn admin_implies_read_only() {
        let s: Scopes = [Scope::Admin].into_iter().collect();
        assert!(s.allows(Scope::Read));
        assert!(!s.allows(Scope::Audit));
        assert!(!s.allows(Scope::Gateway));
    }
}
