//! DeepSeek V4's encoding: added tokens, three split stages, byte-level BPE.

use super::bpe::piece_count;
use super::pretokenize::{CacheGuard, Pretokenizer};
use super::vocab::{Vocab, Walk, vocabulary_gz};
use super::{Encoding, TextError};
use aho_corasick::{AhoCorasick, MatchKind};
use std::sync::OnceLock;

/// DeepSeek V4's three `Split` pre-tokenizer stages (tokenizer.json, behaviour
/// `Isolated`): digits in runs of at most three; CJK and kana runs; then a GPT-style
/// pattern. They apply one after another, each to the pieces the previous one left.
pub(super) const DEEPSEEK_STAGES: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

/// DeepSeek's byte-level BPE, run with tiktoken's merge. Its merges are in id order
/// (checked when the rank file was made), so rank = id is the same BPE; the
/// `tokenizers` crate would do too, at an eighth of the speed and 85 more crates.
pub(super) struct DeepSeek {
    /// [`DEEPSEEK_STAGES`] on `regex-automata`, the last with its look-ahead rewritten.
    pub(super) stages: [Pretokenizer; 3],
    pub(super) ranks: Vocab,
    pub(super) added: AhoCorasick,
}

impl DeepSeek {
    pub(super) fn count(&'static self, text: &str) -> usize {
        let mut caches = self.stages.each_ref().map(|p| p.cache());
        let mut pieces = Vec::new();
        let mut next = Vec::new();
        // Added tokens (`<｜User｜>`, `<think>`, ...) are split out first and count one each.
        let (mut n, mut last) = (0, 0);
        for m in self.added.find_iter(text) {
            pieces.clear();
            pieces.push(&text[last..m.start()]);
            n += 1;
            last = m.end();
            n += self.count_plain(&mut caches, &mut pieces, &mut next);
        }
        pieces.clear();
        pieces.push(&text[last..]);
        n + self.count_plain(&mut caches, &mut pieces, &mut next)
    }

    /// Counts the text in `pieces` (one piece, without added tokens).
    pub(super) fn count_plain<'a>(
        &'static self,
        caches: &mut [CacheGuard; 3],
        pieces: &mut Vec<&'a str>,
        next: &mut Vec<&'a str>,
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
            .map(|p| piece_count(p.as_bytes(), &self.ranks))
            .sum()
    }
}

pub(super) fn deepseek() -> Result<&'static DeepSeek, TextError> {
    static CELL: OnceLock<Result<DeepSeek, TextError>> = OnceLock::new();
    CELL.get_or_init(|| {
        let bad = |e: String| TextError::Vocabulary("deepseek_v4", e);
        let ranks = Vocab::from_tiktoken_gz(
            "deepseek_v4",
            vocabulary_gz(Encoding::DeepSeekV4),
            Walk::Plain,
        )?;
        let stages = [
            Pretokenizer::new(&[DEEPSEEK_STAGES[0]]),
            Pretokenizer::new(&[DEEPSEEK_STAGES[1]]),
            Pretokenizer::rewriting_lookahead(DEEPSEEK_STAGES[2]),
        ];
        let added: Vec<&str> = include_str!("../../vocab/deepseek_v4_added.txt")
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
    use crate::text::Rank;
    use crate::text::testing::{gz, rank_map};
    use rustc_hash::FxHashMap;

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
}
