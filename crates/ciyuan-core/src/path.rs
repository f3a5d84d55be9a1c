//! Account paths: the names of the nodes of the account tree.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest accepted path, in bytes. Paths end up in every ledger entry and index key.
pub const MAX_PATH_BYTES: usize = 512;
/// Deepest accepted tree.
pub const MAX_PATH_DEPTH: usize = 16;
/// Longest accepted segment, in bytes.
pub const MAX_SEGMENT_BYTES: usize = 64;

/// A node of the account tree, named by its path from the top: `acme/cn/hr`.
///
/// The root of the tree, above every organisation, is written `/` and has the empty
/// internal form; only operators' bootstrap keys live there. Segments are 1 to 64 ASCII
/// letters, digits, `-`, `_` or `.`, and are never `.` or `..`, so a path can never
/// escape its subtree or be confused with a file path trick.
///
/// Shared, not copied, when cloned: every entry of a batch names its node, and a
/// path's text was one heap allocation per entry on the ingest path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountPath(Arc<str>);

impl Default for AccountPath {
    fn default() -> Self {
        AccountPath::root()
    }
}

/// The root's (empty) text, shared by every root path.
static ROOT: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

/// Why a string is not an account path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path was empty.
    #[error("account path is empty (the root is written \"/\")")]
    Empty,
    /// Longer than [`MAX_PATH_BYTES`].
    #[error("account path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    /// Deeper than [`MAX_PATH_DEPTH`].
    #[error("account path has more than {MAX_PATH_DEPTH} segments")]
    TooDeep,
    /// Leading, trailing or doubled `/`.
    #[error("account path {0:?} has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment(String),
    /// A segment that is `.` or `..`.
    #[error("account path segment {0:?} is not allowed")]
    DotSegment(String),
    /// A segment longer than [`MAX_SEGMENT_BYTES`].
    #[error("account path segment {0:?} is longer than {MAX_SEGMENT_BYTES} bytes")]
    SegmentTooLong(String),
    /// A character outside the allowed set.
    #[error(
        "account path segment {0:?} has a character other than ASCII letters, digits, '-', '_' or '.'"
    )]
    BadCharacter(String),
}

impl AccountPath {
    /// The root of the tree, written `/`.
    pub fn root() -> AccountPath {
        AccountPath(ROOT.clone())
    }

    /// Parses and validates a path. `/` is the root.
    pub fn parse(s: &str) -> Result<AccountPath, PathError> {
        if s == "/" {
            return Ok(AccountPath::root());
        }
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        let mut depth = 0;
        for seg in s.split('/') {
            depth += 1;
            if depth > MAX_PATH_DEPTH {
                return Err(PathError::TooDeep);
            }
            if seg.is_empty() {
                return Err(PathError::EmptySegment(s.to_string()));
            }
            if seg == "." || seg == ".." {
                return Err(PathError::DotSegment(seg.to_string()));
            }
            if seg.len() > MAX_SEGMENT_BYTES {
                return Err(PathError::SegmentTooLong(seg.to_string()));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(PathError::BadCharacter(seg.to_string()));
            }
        }
        Ok(AccountPath(Arc::from(s)))
    }

    /// Whether this is the root `/`.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The internal form: empty for the root, else `a/b/c`. Use [`fmt::Display`] to show
    /// a path to a person.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments from the top; none for the root.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// Number of segments; 0 for the root.
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// The top-level node holding this one (itself at depth 1; the root for the root).
    pub fn top_level(&self) -> AccountPath {
        match self.segments().next() {
            Some(top) => AccountPath(Arc::from(top)),
            None => AccountPath::root(),
        }
    }

    /// The parent node; `None` for the root. A top-level node's parent is the root.
    pub fn parent(&self) -> Option<AccountPath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => AccountPath(Arc::from(&self.0[..i])),
            None => AccountPath::root(),
        })
    }

    /// The child named `segment`.
    pub fn child(&self, segment: &str) -> Result<AccountPath, PathError> {
        if self.is_root() {
            AccountPath::parse(segment)
        } else {
            AccountPath::parse(&format!("{}/{segment}", self.0))
        }
    }

    /// Every node from the top-level node down to this one, excluding the root: for
    /// `a/b/c`, `a`, `a/b`, `a/b/c`.
    pub fn lineage(&self) -> Vec<AccountPath> {
        let mut out = Vec::with_capacity(self.depth());
        for (i, b) in self.0.bytes().enumerate() {
            if b == b'/' {
                out.push(AccountPath(Arc::from(&self.0[..i])));
            }
        }
        if !self.is_root() {
            out.push(self.clone());
        }
        out
    }

    /// Whether `self` is `ancestor` or lies below it. Everything is within the root.
    pub fn is_within(&self, ancestor: &AccountPath) -> bool {
        if ancestor.is_root() {
            return true;
        }
        match self.0.strip_prefix(ancestor.as_str()) {
            Some("") => true,
            Some(rest) => rest.starts_with('/'),
            None => false,
        }
    }
}

impl fmt::Display for AccountPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("/")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Debug for AccountPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountPath({self})")
    }
}

impl FromStr for AccountPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AccountPath::parse(s)
    }
}

impl serde::Serialize for AccountPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AccountPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        AccountPath::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_paths() {
        for p in ["acme", "acme/cn/hr/onboarding", "a-b_c.d/E9", "/"] {
            let parsed = AccountPath::parse(p).unwrap();
            assert_eq!(parsed.to_string(), p);
        }
    }

    #[test]
    fn rejects_invalid_paths() {
        let cases = [
            ("", "account path is empty (the root is written \"/\")"),
            (
                "a//b",
                "account path \"a//b\" has an empty segment (leading, trailing or doubled '/')",
            ),
            (
                "/a",
                "account path \"/a\" has an empty segment (leading, trailing or doubled '/')",
            ),
            (
                "a/",
                "account path \"a/\" has an empty segment (leading, trailing or doubled '/')",
            ),
            ("../x", "account path segment \"..\" is not allowed"),
            ("a/./b", "account path segment \".\" is not allowed"),
            (
                "a b",
                "account path segment \"a b\" has a character other than ASCII letters, digits, '-', '_' or '.'",
            ),
            (
                "公司",
                "account path segment \"公司\" has a character other than ASCII letters, digits, '-', '_' or '.'",
            ),
        ];
        for (input, msg) in cases {
            assert_eq!(
                AccountPath::parse(input).unwrap_err().to_string(),
                msg,
                "{input}"
            );
        }
        assert_eq!(
            AccountPath::parse("a/".repeat(17).trim_end_matches('/')).unwrap_err(),
            PathError::TooDeep
        );
        assert!(matches!(
            AccountPath::parse(&"x".repeat(65)),
            Err(PathError::SegmentTooLong(_))
        ));
    }

    #[test]
    fn tree_relations() {
        let p = AccountPath::parse("a/b/c").unwrap();
        let names: Vec<String> = p.lineage().iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["a", "a/b", "a/b/c"]);
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(
            AccountPath::parse("a").unwrap().parent().unwrap(),
            AccountPath::root()
        );
        assert!(AccountPath::root().parent().is_none());
        assert!(p.is_within(&AccountPath::parse("a/b").unwrap()));
        assert!(p.is_within(&p));
        assert!(p.is_within(&AccountPath::root()));
        assert!(
            !AccountPath::parse("a/bc")
                .unwrap()
                .is_within(&AccountPath::parse("a/b").unwrap())
        );
        assert!(!AccountPath::parse("a").unwrap().is_within(&p));
    }
}
