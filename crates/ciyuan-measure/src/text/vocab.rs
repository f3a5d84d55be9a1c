//! The vocabulary table: every token's bytes in one arena, an open-addressing table
//! of packed slots, and the small tables looked up first (bytes, pairs of bytes,
//! characters of three bytes, a filter of hashes).

use super::backtrack::Backtrack;
use super::{Encoding, Rank, TextError};
use base64::Engine;
use std::io::BufRead;
use std::sync::OnceLock;

/// Whether a vocabulary is counted by backtracking on long texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Walk {
    /// Never: pieces are merged.
    Never,
    /// Every token is made after its two halves (so `o200k_base`, `cl100k_base`, `qwen`
    /// and `deepseek_v4`, checked by `backtrack`'s tests): the walk is exact.
    Plain,
    /// Some tokens are made from a half ranked after them (27 in `qwen3_6`): they are
    /// found when the walk's tables are built (a few hundred milliseconds more), and
    /// pieces holding one are merged. Exact (tested on `qwen3_6`).
    Screened,
}

/// The vocabulary file an encoding counts with, gzipped as shipped (tiktoken's rank
/// format: one `base64 rank` line per token). The benchmark hands these very bytes to
/// Python tiktoken.
pub fn vocabulary_gz(encoding: Encoding) -> &'static [u8] {
    match encoding {
        Encoding::O200kBase => include_bytes!("../../vocab/o200k_base.tiktoken.gz"),
        Encoding::Cl100kBase => include_bytes!("../../vocab/cl100k_base.tiktoken.gz"),
        Encoding::Qwen => include_bytes!("../../vocab/qwen.tiktoken.gz"),
        Encoding::Qwen3_6 => include_bytes!("../../vocab/qwen3_6.tiktoken.gz"),
        Encoding::DeepSeekV4 => include_bytes!("../../vocab/deepseek_v4.tiktoken.gz"),
    }
}

/// A byte-pair vocabulary, token bytes to rank, kept small: every token's bytes one
/// after another in one arena, and an open-addressing table (linear probing, about
/// 60 % full) of one `u64` per slot that packs a token's offset in the arena, its
/// length, its rank and 12 bits of its hash. o200k_base takes about 1.4 MB of bytes
/// and 2.6 MB of slots this way, where a `HashMap<Vec<u8>, Rank>` with one allocation
/// per token took well over 10 MB. Looking a piece up reads one slot and, when length
/// and hash bits agree, the token's bytes.
pub(super) struct Vocab {
    pub(super) bytes: Box<[u8]>,
    /// 0 for an empty slot; a token's length is never 0, so no token packs to 0.
    pub(super) slots: Box<[u64]>,
    /// The longest token's length: longer pieces are never one token.
    pub(super) longest: usize,
    /// The rank of every two-byte token, indexed by its bytes (`Rank::MAX` where there
    /// is none): merging starts by looking up every adjacent pair (256 KiB).
    pub(super) pairs: Box<[Rank]>,
    /// The rank of every byte (each is a token).
    pub(super) single: [Rank; 256],
    /// The rank of every character of three bytes in UTF-8 (U+0800 to U+FFFF, most of
    /// Chinese; 256 KiB, indexed by [`char3_index`]), `Rank::MAX` where it is not a token: merging Chinese looks
    /// up each character as it completes, and this table is dense where text is.
    pub(super) chars3: Box<[Rank]>,
    /// One bit per [`FILTER_BITS`]-bit stretch of hash, set where a token's hash falls:
    /// most pieces merging looks up are not tokens, and this small table (256 KiB,
    /// which stays in the cache) turns most of them away without touching `slots`
    /// (megabytes, a cache miss per look-up: most of the time of counting Chinese).
    pub(super) filter: Box<[u64]>,
    /// The trie and merges the backtracking count walks, built the first time a
    /// long text is counted ([`Vocab::prepare_walk`]).
    pub(super) backtrack: OnceLock<Backtrack>,
    /// The rank file, kept to build [`Vocab::backtrack`] from, for encodings that walk.
    pub(super) walk_source: Option<&'static [u8]>,
    /// Whether the walk looks for tokens made from a half ranked after them (see
    /// [`Walk::Screened`]).
    pub(super) screen: bool,
}

/// Bits of hash that pick a bit of [`Vocab::filter`]: 2^21 bits, about one in ten set
/// for 200,000 tokens.
pub(super) const FILTER_BITS: u32 = 21;

/// Where a piece of three bytes shaped like a character of three bytes in UTF-8 (a
/// lead byte 0xe0 to 0xef, two continuation bytes) sits in [`Vocab::chars3`]: its 16
/// payload bits, one index per such piece. Loading and looking up both ask this
/// function, so the table answers exactly for the pieces it covers, whatever they are.
#[inline]
pub(super) fn char3_index(b: &[u8]) -> Option<usize> {
    match *b {
        [a @ 0xe0..=0xef, b @ 0x80..=0xbf, c @ 0x80..=0xbf] => Some(
            (usize::from(a & 0x0f) << 12) | (usize::from(b & 0x3f) << 6) | usize::from(c & 0x3f),
        ),
        _ => None,
    }
}

/// The character of the Basic Multilingual Plane that starts at `i` in `b` (its code
/// point and length: one to three bytes of UTF-8), or `None` at the end, at a character
/// of four bytes, or at bytes that are not UTF-8 there (a continuation byte, a lead
/// byte without its continuations, an overlong lead byte).
#[inline]
pub(super) fn bmp_char(b: &[u8], i: usize) -> Option<(u32, usize)> {
    let cont = |i: usize| {
        b.get(i)
            .filter(|&&c| c & 0xc0 == 0x80)
            .map(|&c| u32::from(c & 0x3f))
    };
    match *b.get(i)? {
        c @ 0..0x80 => Some((u32::from(c), 1)),
        c @ 0xc2..0xe0 => Some(((u32::from(c & 0x1f) << 6) | cont(i + 1)?, 2)),
        c @ 0xe0..0xf0 => Some((
            (u32::from(c & 0x0f) << 12) | (cont(i + 1)? << 6) | cont(i + 2)?,
            3,
        )),
        _ => None,
    }
}

/// Sets bit `i` of a bit set kept in words (the filters in front of hash tables, the
/// screen's characters).
#[inline]
pub(super) fn set_bit(bits: &mut [u64], i: usize) {
    bits[i >> 6] |= 1 << (i & 63);
}

/// Whether bit `i` of a bit set kept in words is set.
#[inline]
pub(super) fn has_bit(bits: &[u64], i: usize) -> bool {
    bits[i >> 6] & (1 << (i & 63)) != 0
}

/// The bit of [`Vocab::filter`] for hash `h`: bits above the tag's, which `home` (the
/// high bits) and the tag (the low bits) do not use alike.
#[inline]
pub(super) fn filter_bit(h: u64) -> usize {
    ((h >> TAG_BITS) & ((1 << FILTER_BITS) - 1)) as usize
}

pub(super) const TAG_BITS: u32 = 12;

pub(super) const RANK_BITS: u32 = 20;

pub(super) const LEN_BITS: u32 = 8;

pub(super) const OFFSET_BITS: u32 = 64 - TAG_BITS - RANK_BITS - LEN_BITS;

pub(super) const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

/// The bits of a slot that hold a token's length and hash tag.
pub(super) const LEN_TAG_MASK: u64 = ((1 << LEN_BITS) - 1) << (TAG_BITS + RANK_BITS) | TAG_MASK;

/// A hash of a piece of bytes: words of it multiplied and folded (the way `foldhash`
/// and `wyhash` mix), short pieces read as overlapping words.
#[inline]
pub(super) fn piece_hash(b: &[u8]) -> u64 {
    const K0: u64 = 0x9e37_79b9_7f4a_7c15;
    const K1: u64 = 0xa076_1d64_78bd_642f;
    #[inline]
    fn fold(a: u64, b: u64) -> u64 {
        let m = u128::from(a) * u128::from(b);
        (m as u64) ^ ((m >> 64) as u64)
    }
    let word = |i: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let half = |i: usize| {
        let mut w = [0; 4];
        w.copy_from_slice(&b[i..i + 4]);
        u64::from(u32::from_le_bytes(w))
    };
    let n = b.len();
    let seed = (n as u64).wrapping_mul(K0);
    if n <= 8 {
        let w = if n >= 4 {
            (half(0) << 32) | half(n - 4)
        } else if n > 0 {
            (u64::from(b[0]) << 16) | (u64::from(b[n / 2]) << 8) | u64::from(b[n - 1])
        } else {
            0
        };
        return fold(w ^ K1, seed ^ K0);
    }
    let mut h = seed;
    let mut i = 0;
    while i + 8 < n {
        h = fold(h ^ word(i), K1);
        i += 8;
    }
    fold(h ^ word(n - 8), K0)
}

/// Whether two pieces of bytes are equal, compared in overlapping words (as
/// [`piece_hash`] reads them) rather than by a call to `memcmp`: tokens are short.
#[inline]
pub(super) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], i: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let half = |s: &[u8], i: usize| {
        let mut w = [0; 4];
        w.copy_from_slice(&s[i..i + 4]);
        u32::from_le_bytes(w)
    };
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=8 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        _ => {
            let mut i = 0;
            while i + 8 < n {
                if word(a, i) != word(b, i) {
                    return false;
                }
                i += 8;
            }
            word(a, n - 8) == word(b, n - 8)
        }
    }
}

/// Tokens up to this long are kept in their slot, in place of an offset into the
/// arena, so that finding one reads no more memory than its slot (Chinese characters
/// are three bytes in UTF-8).
pub(super) const INLINE_BYTES: usize = 3;

/// A token of up to [`INLINE_BYTES`] as it is kept in its slot's offset field.
#[inline]
pub(super) fn inline(token: &[u8]) -> u64 {
    token.iter().rev().fold(0, |w, &b| (w << 8) | u64::from(b))
}

/// Whether `slot`, whose length (and tag) agree with `b`'s, holds the bytes of `b`.
#[inline]
pub(super) fn slot_holds(arena: &[u8], slot: u64, b: &[u8]) -> bool {
    let at = slot >> (64 - OFFSET_BITS);
    if b.len() <= INLINE_BYTES {
        at == inline(b)
    } else {
        let at = at as usize;
        same_bytes(&arena[at..at + b.len()], b)
    }
}

/// The slot of a table of `slots` slots where a token of hash `h` is looked for first.
#[inline]
pub(super) fn home(slots: usize, h: u64) -> usize {
    ((u128::from(h) * slots as u128) >> 64) as usize
}

/// Calls `f` with the bytes and rank of every token of a gzipped tiktoken rank file,
/// read line by line.
pub(crate) fn for_each_token(
    gz: &[u8],
    mut f: impl FnMut(&[u8], Rank) -> Result<(), String>,
) -> Result<(), String> {
    let mut reader = std::io::BufReader::new(flate2::read::GzDecoder::new(gz));
    let mut line = Vec::new();
    // A token takes at most 255 bytes, 340 in base64.
    let mut token = [0; 342];
    for n in 1.. {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .map_err(|e| e.to_string())?
            == 0
        {
            return Ok(());
        }
        let text = line.trim_ascii_end();
        if text.is_empty() {
            continue;
        }
        let (b64, rank) = text
            .iter()
            .position(|&c| c == b' ')
            .map(|i| (&text[..i], &text[i + 1..]))
            .ok_or_else(|| format!("line {n} is not 'base64 rank'"))?;
        if b64.len() > 340 {
            return Err(format!("line {n}: the token is longer than 255 bytes"));
        }
        let len = base64::engine::general_purpose::STANDARD
            .decode_slice(b64, &mut token)
            .map_err(|e| format!("line {n}: {e}"))?;
        let rank: Rank = std::str::from_utf8(rank)
            .ok()
            .and_then(|r| r.parse().ok())
            .filter(|&r: &Rank| r < 1 << RANK_BITS)
            .ok_or_else(|| format!("line {n}: the rank is not a number below 2^20"))?;
        if len == 0 {
            return Err(format!("line {n}: an empty token"));
        }
        f(&token[..len], rank)?;
    }
    Ok(())
}

impl Vocab {
    /// The rank of the token `b`, if it is one. Bytes and pairs of bytes are read from
    /// their own small tables; longer pieces are looked up in `slots`.
    #[inline]
    pub(super) fn get(&self, b: &[u8]) -> Option<Rank> {
        match b.len() {
            0 => None,
            1 => Some(self.single[usize::from(b[0])]),
            2 => Some(self.pair(b[0], b[1])).filter(|&r| r != Rank::MAX),
            3 => match char3_index(b) {
                Some(i) => Some(self.chars3[i]).filter(|&r| r != Rank::MAX),
                None => self.lookup(b),
            },
            _ => self.lookup(b),
        }
    }

    /// The rank of the token `b` from the hash table, if it is one.
    #[inline]
    pub(super) fn lookup(&self, b: &[u8]) -> Option<Rank> {
        if b.len() > self.longest || b.is_empty() {
            return None;
        }
        let h = piece_hash(b);
        let bit = filter_bit(h);
        if !has_bit(&self.filter, bit) {
            return None;
        }
        let want = ((b.len() as u64) << (TAG_BITS + RANK_BITS)) | (h & TAG_MASK);
        let mut i = home(self.slots.len(), h);
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if slot & LEN_TAG_MASK == want && slot_holds(&self.bytes, slot, b) {
                return Some(((slot >> TAG_BITS) & ((1 << RANK_BITS) - 1)) as Rank);
            }
            i += 1;
            if i == self.slots.len() {
                i = 0;
            }
        }
    }

    pub(super) fn contains(&self, b: &[u8]) -> bool {
        self.get(b).is_some()
    }

    /// The rank of the two-byte token `a b`, `Rank::MAX` if there is none.
    #[inline]
    pub(super) fn pair(&self, a: u8, b: u8) -> Rank {
        self.pairs[usize::from(a) << 8 | usize::from(b)]
    }

    /// Reads a gzipped tiktoken rank file (`base64 rank` lines). It is read twice, line
    /// by line, so that neither the text nor a list of tokens is ever held whole: once
    /// to size the arena and the table exactly, once to fill them. Every byte must be a
    /// token: unmerged bytes count one token each. With `walk`, the tables for
    /// counting by backtracking can be built later ([`Vocab::prepare_walk`]).
    pub(super) fn from_tiktoken_gz(
        name: &'static str,
        gz: &'static [u8],
        walk: Walk,
    ) -> Result<Vocab, TextError> {
        let bad = |why: String| TextError::Vocabulary(name, why);
        let (mut tokens, mut total) = (0usize, 0usize);
        for_each_token(gz, |token, _| {
            tokens += 1;
            total += token.len();
            Ok(())
        })
        .map_err(bad)?;
        if total > 1 << OFFSET_BITS {
            return Err(bad("the tokens take more bytes than fit".into()));
        }
        let mut bytes = Vec::with_capacity(total);
        let mut slots = vec![0; tokens * 5 / 3 + 1].into_boxed_slice();
        let mut longest = 0;
        let mut filter = vec![0u64; 1 << (FILTER_BITS - 6)].into_boxed_slice();
        let mut chars3 = vec![Rank::MAX; 1 << 16].into_boxed_slice();
        for_each_token(gz, |token, rank| {
            set_bit(&mut filter, filter_bit(piece_hash(token)));
            if let Some(i) = char3_index(token) {
                chars3[i] = rank;
            }
            if bytes.len() + token.len() > total {
                return Err("the file read differently the second time".into());
            }
            let at = bytes.len();
            bytes.extend_from_slice(token);
            Vocab::insert(&bytes, &mut slots, at, token.len(), rank);
            longest = longest.max(token.len());
            Ok(())
        })
        .map_err(bad)?;
        let mut vocab = Vocab {
            bytes: bytes.into_boxed_slice(),
            slots,
            longest,
            pairs: vec![Rank::MAX; 1 << 16].into_boxed_slice(),
            single: [0; 256],
            chars3,
            filter,
            backtrack: OnceLock::new(),
            walk_source: (walk != Walk::Never).then_some(gz),
            screen: walk == Walk::Screened,
        };
        for a in 0..=255 {
            for b in 0..=255 {
                if let Some(r) = vocab.lookup(&[a, b]) {
                    vocab.pairs[usize::from(a) << 8 | usize::from(b)] = r;
                }
            }
            vocab.single[usize::from(a)] = vocab
                .lookup(&[a])
                .ok_or_else(|| bad(format!("byte {a:#04x} is not a token")))?;
        }
        Ok(vocab)
    }

    /// Builds the tables for counting by backtracking, once, if this vocabulary walks:
    /// 5 to 13 MiB and a few hundred milliseconds, which is why short texts (the
    /// gateway's prompts) never ask for them.
    pub(super) fn prepare_walk(&self) {
        if let Some(gz) = self.walk_source {
            self.backtrack.get_or_init(|| {
                // The tokens as the arena holds them: one after another, in file order.
                let mut order = Vec::new();
                let mut at = 0u32;
                let read = for_each_token(gz, |token, rank| {
                    order.push((at, token.len() as u8, rank));
                    at += token.len() as u32;
                    Ok(())
                });
                if read.is_err() || at as usize != self.bytes.len() {
                    // The file read once already; if it reads differently now, pieces
                    // are merged, which counts the same, only slower.
                    return Backtrack::empty();
                }
                Backtrack::new(&self.bytes, &order, self, self.screen)
            });
        }
    }

    /// The tables for counting by backtracking, if they are built.
    #[inline]
    pub(super) fn walk(&self) -> Option<&Backtrack> {
        self.backtrack.get().filter(|b| b.is_built())
    }

    /// Puts the token at `at..at + len` of `bytes`, of rank `rank`, in its slot of
    /// `slots` (a token of up to [`INLINE_BYTES`] in the slot itself); a token seen
    /// before keeps its later rank.
    pub(super) fn insert(bytes: &[u8], slots: &mut [u64], at: usize, len: usize, rank: Rank) {
        let token = &bytes[at..at + len];
        let h = piece_hash(token);
        let at = if len <= INLINE_BYTES {
            inline(token)
        } else {
            at as u64
        };
        let entry = (at << (64 - OFFSET_BITS))
            | ((len as u64) << (TAG_BITS + RANK_BITS))
            | (u64::from(rank) << TAG_BITS)
            | (h & TAG_MASK);
        let mut i = home(slots.len(), h);
        loop {
            let slot = slots[i];
            if slot == 0 {
                slots[i] = entry;
                return;
            }
            if slot & LEN_TAG_MASK == entry & LEN_TAG_MASK && slot_holds(bytes, slot, token) {
                slots[i] = entry;
                return;
            }
            i += 1;
            if i == slots.len() {
                i = 0;
            }
        }
    }

    /// How many tokens there are.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots.iter().filter(|&&s| s != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::testing::{gz, random_pieces, rank_map};

    #[test]
    fn vocab_holds_every_token_of_its_file() {
        for name in [
            "o200k_base",
            "cl100k_base",
            "qwen",
            "qwen3_6",
            "deepseek_v4",
        ] {
            let map = rank_map(gz(name));
            let vocab = Vocab::from_tiktoken_gz("test", gz(name), Walk::Never).unwrap();
            assert_eq!(vocab.len(), map.len(), "{name}");
            for (token, &rank) in &map {
                assert_eq!(vocab.get(token), Some(rank), "{name} {token:?}");
            }
            for p in random_pieces(&map, 20_000, 24) {
                assert_eq!(vocab.get(&p), map.get(&p).copied(), "{name} {p:?}");
            }
            assert_eq!(vocab.get(b""), None);
        }
        let bad = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let bad: &'static [u8] = {
            use std::io::Write;
            let mut bad = bad;
            bad.write_all(b"YQ== 0\n").unwrap();
            bad.finish().unwrap().leak()
        };
        assert!(
            Vocab::from_tiktoken_gz("test", bad, Walk::Never).is_err(),
            "bytes missing"
        );
    }
}
