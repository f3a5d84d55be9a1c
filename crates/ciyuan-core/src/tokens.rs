//! Tokens by modality and direction.

use smallvec::SmallVec;
use std::fmt;
use std::str::FromStr;

/// What kind of content a token measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modality {
    /// Text and code.
    Text,
    /// Images.
    Image,
    /// Audio.
    Audio,
    /// Video.
    Video,
    /// Units of non-LLM services turned into tokens by a token definition.
    Other,
}

/// Which way a token went, and how the provider treats it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Fresh input (prompt) tokens.
    Input,
    /// Input served from the provider's prompt cache.
    CachedInput,
    /// Input written to the provider's prompt cache (for its default lifetime, five
    /// minutes at Anthropic).
    CacheWrite,
    /// Input written to the provider's prompt cache for an hour (priced apart).
    CacheWrite1h,
    /// Output (completion) tokens, reasoning excluded.
    Output,
    /// Reasoning tokens the provider bills as output but does not return.
    Reasoning,
}

/// Why a string is not a modality, direction or token key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Unknown modality name.
    #[error("unknown modality {0:?} (expected text, image, audio, video or other)")]
    Modality(String),
    /// Unknown direction name.
    #[error(
        "unknown direction {0:?} (expected input, cached_input, cache_write, cache_write_1h, output or reasoning)"
    )]
    Direction(String),
    /// A token key not of the form `modality.direction`.
    #[error("token key {0:?} is not of the form modality.direction, e.g. text.input")]
    Key(String),
}

macro_rules! names {
    ($ty:ident, $err:ident, $($variant:ident => $name:literal),+ $(,)?) => {
        impl $ty {
            /// Every value, in order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];
            /// The name used in APIs and the ledger.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
        impl FromStr for $ty {
            type Err = TokenError;
            fn from_str(s: &str) -> Result<Self, TokenError> {
                match s { $($name => Ok($ty::$variant),)+ _ => Err(TokenError::$err(s.to_string())) }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

names!(Modality, Modality, Text => "text", Image => "image", Audio => "audio", Video => "video", Other => "other");
names!(Direction, Direction, Input => "input", CachedInput => "cached_input", CacheWrite => "cache_write", CacheWrite1h => "cache_write_1h", Output => "output", Reasoning => "reasoning");

/// The largest count of one token key that one entry may carry: a usage event, a
/// gateway record or a correction (in either sign). The longest context windows hold
/// about 10^7 tokens; 10^12 leaves five orders of magnitude for events that report
/// a service's aggregated usage, and keeps every sum the ledger can hold exact in
/// `i128`: 10^12 × 30 keys × 2^64 entries < 2^127. The doors (ingest, the gateway,
/// adjustments, token definitions) refuse larger counts, naming the field.
pub const MAX_TOKENS_PER_KEY: i64 = 1_000_000_000_000;

/// A signed number of tokens of one modality and direction. Usage is never negative;
/// corrections carry negative deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCount {
    /// What the tokens measure.
    pub modality: Modality,
    /// Which way they went.
    pub direction: Direction,
    /// How many.
    pub count: i64,
}

/// Tokens keyed by `modality.direction`, kept sorted so an entry's bytes are
/// deterministic. Serialized as a JSON object such as `{"text.input":19,"text.output":10}`:
/// compact in the log and readable by an auditor.
///
/// Held as a sorted array of at most a few counts inline (most usage has two to four
/// keys), not a tree: every usage entry holds one, and a tree's node was one heap
/// allocation per entry on the ingest path. Keys are unique.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenMap(SmallVec<[TokenCount; INLINE_KEYS]>);

/// Counts a token map holds without a heap allocation.
const INLINE_KEYS: usize = 4;

impl TokenMap {
    /// An empty map.
    pub fn new() -> Self {
        TokenMap::default()
    }

    /// Where `key` is, or where it would go to keep the keys sorted.
    fn find(&self, key: (Modality, Direction)) -> Result<usize, usize> {
        self.0
            .binary_search_by(|t| (t.modality, t.direction).cmp(&key))
    }

    /// Adds `count` to a key, failing on overflow.
    pub fn add(&mut self, modality: Modality, direction: Direction, count: i64) -> Option<()> {
        match self.find((modality, direction)) {
            Ok(i) => {
                let slot = &mut self.0[i].count;
                *slot = slot.checked_add(count)?;
            }
            Err(i) => self.0.insert(
                i,
                TokenCount {
                    modality,
                    direction,
                    count,
                },
            ),
        }
        Some(())
    }

    /// The counts, in key order.
    pub fn iter(&self) -> impl Iterator<Item = TokenCount> + '_ {
        self.0.iter().copied()
    }

    /// Whether no key is present.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sum over all keys, or `None` on overflow.
    pub fn total(&self) -> Option<i64> {
        self.0
            .iter()
            .try_fold(0i64, |acc, t| acc.checked_add(t.count))
    }

    /// The first count outside the bounds a door accepts: above
    /// [`MAX_TOKENS_PER_KEY`], or below zero unless `signed` (corrections), or below
    /// `-MAX_TOKENS_PER_KEY`.
    pub fn out_of_bounds(&self, signed: bool) -> Option<TokenCount> {
        let low = if signed { -MAX_TOKENS_PER_KEY } else { 0 };
        self.iter()
            .find(|t| t.count > MAX_TOKENS_PER_KEY || t.count < low)
    }
}

fn parse_key(key: &str) -> Result<(Modality, Direction), TokenError> {
    let (m, d) = key
        .split_once('.')
        .ok_or_else(|| TokenError::Key(key.to_string()))?;
    Ok((m.parse()?, d.parse()?))
}

impl serde::Serialize for TokenMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        let mut key = String::with_capacity(24);
        for t in &self.0 {
            key.clear();
            key.push_str(t.modality.as_str());
            key.push('.');
            key.push_str(t.direction.as_str());
            map.serialize_entry(&key, &t.count)?;
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for TokenMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TokenMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of token counts keyed by modality.direction")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<TokenMap, A::Error> {
                let mut m = TokenMap::new();
                while let Some((k, v)) = a.next_entry::<std::borrow::Cow<'de, str>, i64>()? {
                    let (modality, direction) = parse_key(&k).map_err(serde::de::Error::custom)?;
                    match m.find((modality, direction)) {
                        Ok(_) => {
                            return Err(serde::de::Error::custom(format!(
                                "duplicate token key {k:?}"
                            )));
                        }
                        Err(i) => m.0.insert(
                            i,
                            TokenCount {
                                modality,
                                direction,
                                count: v,
                            },
                        ),
                    }
                }
                Ok(m)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_map_round_trip() {
        let mut m = TokenMap::new();
        m.add(Modality::Text, Direction::Output, 10).unwrap();
        m.add(Modality::Text, Direction::Input, 19).unwrap();
        m.add(Modality::Image, Direction::Input, 85).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"text.input":19,"text.output":10,"image.input":85}"#
        );
        assert_eq!(serde_json::from_str::<TokenMap>(&json).unwrap(), m);
        assert_eq!(m.total(), Some(114));
    }

    proptest::proptest! {
        /// The map answers as a tree of the same additions would: counts summed per
        /// key, keys in order, overflow refused and nothing changed by it, and the
        /// same JSON in and out.
        #[test]
        fn token_map_is_a_sorted_map(
            adds in proptest::collection::vec((0usize..5, 0usize..6, proptest::prelude::any::<i64>()), 0..24)
        ) {
            let mut m = TokenMap::new();
            let mut model: std::collections::BTreeMap<(Modality, Direction), i64> =
                std::collections::BTreeMap::new();
            for (mi, di, n) in adds {
                let (md, dr) = (Modality::ALL[mi], Direction::ALL[di]);
                let slot = model.entry((md, dr)).or_insert(0);
                match slot.checked_add(n) {
                    Some(sum) => {
                        proptest::prop_assert_eq!(m.add(md, dr, n), Some(()));
                        *slot = sum;
                    }
                    None => {
                        let before = m.clone();
                        proptest::prop_assert_eq!(m.add(md, dr, n), None);
                        proptest::prop_assert_eq!(&m, &before);
                    }
                }
            }
            let got: Vec<(Modality, Direction, i64)> =
                m.iter().map(|t| (t.modality, t.direction, t.count)).collect();
            let want: Vec<(Modality, Direction, i64)> =
                model.iter().map(|(&(md, dr), &n)| (md, dr, n)).collect();
            proptest::prop_assert_eq!(&got, &want);
            let json = serde_json::to_string(&m).unwrap();
            proptest::prop_assert_eq!(serde_json::from_str::<TokenMap>(&json).unwrap(), m);
        }
    }

    #[test]
    fn token_map_rejects_bad_keys() {
        let err = serde_json::from_str::<TokenMap>(r#"{"text":1}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("not of the form modality.direction"),
            "{err}"
        );
        let err = serde_json::from_str::<TokenMap>(r#"{"smell.input":1}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown modality \"smell\""),
            "{err}"
        );
        let err =
            serde_json::from_str::<TokenMap>(r#"{"text.input":1,"text.input":2}"#).unwrap_err();
        assert!(err.to_string().contains("duplicate token key"), "{err}");
    }

    #[test]
    fn bounds_name_the_first_count_outside_them() {
        let mut m = TokenMap::new();
        m.add(Modality::Text, Direction::Input, MAX_TOKENS_PER_KEY)
            .unwrap();
        assert_eq!(m.out_of_bounds(false), None);
        m.add(Modality::Text, Direction::Output, -1).unwrap();
        let bad = m.out_of_bounds(false).unwrap();
        assert_eq!((bad.direction, bad.count), (Direction::Output, -1));
        assert_eq!(m.out_of_bounds(true), None);
        m.add(Modality::Text, Direction::Input, 1).unwrap();
        let bad = m.out_of_bounds(true).unwrap();
        assert_eq!(
            (bad.direction, bad.count),
            (Direction::Input, MAX_TOKENS_PER_KEY + 1)
        );
    }

    #[test]
    fn overflow_is_refused() {
        let mut m = TokenMap::new();
        m.add(Modality::Text, Direction::Input, i64::MAX).unwrap();
        assert!(m.add(Modality::Text, Direction::Input, 1).is_none());
    }
}
