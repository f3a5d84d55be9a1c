//! Benchmark text that never repeats: Chinese, English and code of any length, the same
//! for the same seed.
//!
//! A repeated corpus flatters any counter that remembers pieces it has seen, and real
//! text does not repeat. So the words come from the vocabularies this crate already
//! ships (Chinese words of two to four characters from `qwen`, English words from
//! `o200k_base`), drawn at random with a skew towards low ranks — a token's rank
//! follows how often its training text had it, so common words come up often, as in
//! prose — and strung into clauses, sentences, paragraphs and code by a seeded
//! generator. No window of 64 bytes occurs twice (checked by the tests), while short
//! pieces (words, punctuation, indentation) repeat as they do in real text.

use crate::text::{Encoding, TextError, for_each_token, vocabulary_gz};
use std::sync::OnceLock;

/// What kind of text to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Chinese prose: Han words, Chinese punctuation, some Latin words and numbers.
    Chinese,
    /// English prose.
    English,
    /// Rust-like source code: indentation, identifiers, literals, comments.
    Code,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Chinese, Kind::English, Kind::Code];

    /// The kind's name: `chinese`, `english` or `code`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Chinese => "chinese",
            Kind::English => "english",
            Kind::Code => "code",
        }
    }

    /// The kind of a name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Generates `kind` text of at least `bytes` bytes (it ends at the end of a sentence
/// or line), the same text for the same `seed`.
pub fn generate(kind: Kind, bytes: usize, seed: u64) -> Result<String, TextError> {
    let words = words()?;
    let mut g = Gen {
        out: String::with_capacity(bytes + 256),
        rng: Rng(seed ^ 0x6a09_e667_f3bc_c909),
        words,
    };
    match kind {
        Kind::Chinese => {
            while g.out.len() < bytes {
                g.chinese_paragraph();
            }
        }
        Kind::English => {
            while g.out.len() < bytes {
                g.english_paragraph();
            }
        }
        Kind::Code => {
            while g.out.len() < bytes {
                g.code_function();
            }
        }
    }
    Ok(g.out)
}

/// The word lists, in rank order (most common first).
struct Words {
    /// Han words of two to four characters, and single Han characters.
    han: Vec<String>,
    han_chars: Vec<String>,
    /// Lower-case English words of two to twelve letters, without their space.
    english: Vec<String>,
}

fn words() -> Result<&'static Words, TextError> {
    static WORDS: OnceLock<Result<Words, TextError>> = OnceLock::new();
    WORDS
        .get_or_init(|| {
            let mut han = Vec::new();
            let mut han_chars = Vec::new();
            let is_han = |c: char| ('\u{4e00}'..='\u{9fa5}').contains(&c);
            let mut qwen: Vec<(u32, String)> = Vec::new();
            for_each_token(vocabulary_gz(Encoding::Qwen), |token, rank| {
                if let Ok(s) = std::str::from_utf8(token)
                    && s.chars().all(is_han)
                {
                    qwen.push((rank, s.to_owned()));
                }
                Ok(())
            })
            .map_err(|e| TextError::Vocabulary("qwen", e))?;
            qwen.sort();
            for (_, s) in qwen {
                match s.chars().count() {
                    1 => han_chars.push(s),
                    2..=4 => han.push(s),
                    _ => {}
                }
            }
            let mut english: Vec<(u32, String)> = Vec::new();
            for_each_token(vocabulary_gz(Encoding::O200kBase), |token, rank| {
                if let Some(w) = token.strip_prefix(b" ")
                    && (2..=12).contains(&w.len())
                    && w.iter().all(u8::is_ascii_lowercase)
                {
                    english.push((rank, String::from_utf8_lossy(w).into_owned()));
                }
                Ok(())
            })
            .map_err(|e| TextError::Vocabulary("o200k_base", e))?;
            english.sort();
            let english: Vec<String> = english.into_iter().map(|(_, w)| w).collect();
            if han.len() < 1000 || han_chars.len() < 1000 || english.len() < 1000 {
                return Err(TextError::Vocabulary(
                    "qwen",
                    "too few words for the benchmark text".into(),
                ));
            }
            Ok(Words {
                han,
                han_chars,
                english,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// xorshift64*: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// An index into a list of `n` in rank order, skewed towards the front as word
    /// frequencies are: the first 1% of the list is drawn about a third of the time.
    fn skewed(&mut self, n: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((u * u * u * u * n as f64) as usize).min(n - 1)
    }

    fn pick<'a>(&mut self, list: &'a [&'a str]) -> &'a str {
        list[self.below(list.len())]
    }
}

struct Gen {
    out: String,
    rng: Rng,
    words: &'static Words,
}

impl Gen {
    fn english_word(&mut self) -> &'static str {
        let words: &'static Words = self.words;
        &words.english[self.rng.skewed(words.english.len())]
    }

    fn push_capitalized(&mut self, w: &str) {
        let mut c = w.chars();
        if let Some(first) = c.next() {
            self.out.extend(first.to_uppercase());
            self.out.push_str(c.as_str());
        }
    }

    fn number(&mut self) {
        let n = match self.rng.below(4) {
            0 => self.rng.below(10),
            1 => self.rng.below(1000),
            2 => 1900 + self.rng.below(130),
            _ => self.rng.below(1_000_000),
        };
        self.out.push_str(&n.to_string());
    }

    fn chinese_paragraph(&mut self) {
        for _ in 0..self.rng.between(2, 7) {
            let clauses = self.rng.between(1, 4);
            if self.rng.chance(5) {
                self.out.push('“');
            }
            for c in 0..clauses {
                for _ in 0..self.rng.between(2, 8) {
                    match self.rng.below(100) {
                        0..=69 => {
                            let w = &self.words.han;
                            let i = self.rng.skewed(w.len());
                            self.out.push_str(&w[i]);
                        }
                        70..=93 => {
                            let w = &self.words.han_chars;
                            let i = self.rng.skewed(w.len());
                            self.out.push_str(&w[i]);
                        }
                        94..=96 => {
                            self.number();
                            self.out
                                .push_str(self.rng.pick(&["年", "个", "元", "%", "月"]));
                        }
                        _ => {
                            let w = self.english_word();
                            if self.rng.chance(50) {
                                self.out.push_str(&w.to_uppercase());
                            } else {
                                self.push_capitalized(w);
                            }
                        }
                    }
                }
                if c + 1 < clauses {
                    self.out
                        .push_str(self.rng.pick(&["，", "，", "，", "、", "；", "："]));
                }
            }
            let end = self.rng.pick(&["。", "。", "。", "。", "？", "！"]);
            self.out.push_str(end);
            if self.out.ends_with(end) && self.rng.chance(5) {
                self.out.push('”');
            }
        }
        self.out
            .push_str(if self.rng.chance(70) { "\n\n" } else { "\n" });
    }

    fn english_sentence(&mut self) {
        let words = self.rng.between(4, 24);
        for i in 0..words {
            if i > 0 {
                self.out.push(' ');
            }
            match self.rng.below(100) {
                0..=3 => self.number(),
                4..=6 => {
                    let w = self.english_word();
                    self.push_capitalized(w);
                }
                7 => {
                    self.out.push('(');
                    let w = self.english_word();
                    self.out.push_str(w);
                    self.out.push(')');
                }
                _ => {
                    let w = self.english_word();
                    if i == 0 {
                        self.push_capitalized(w);
                    } else {
                        self.out.push_str(w);
                    }
                    if self.rng.chance(2) {
                        self.out
                            .push_str(self.rng.pick(&["'s", "'t", "'re", "'ll"]));
                    }
                }
            }
            if i + 1 < words && self.rng.chance(8) {
                self.out
                    .push_str(self.rng.pick(&[",", ",", ",", ";", ":", " -"]));
            }
        }
        self.out
            .push_str(self.rng.pick(&[".", ".", ".", ".", "?", "!"]));
    }

    fn english_paragraph(&mut self) {
        for i in 0..self.rng.between(2, 8) {
            if i > 0 {
                self.out.push(' ');
            }
            self.english_sentence();
        }
        self.out
            .push_str(if self.rng.chance(80) { "\n\n" } else { "\n" });
    }

    fn ident(&mut self) {
        for i in 0..self.rng.between(1, 3) {
            if i > 0 {
                self.out.push('_');
            }
            let w = self.english_word();
            self.out.push_str(w);
        }
    }

    fn type_name(&mut self) {
        for _ in 0..self.rng.between(1, 2) {
            let w = self.english_word();
            self.push_capitalized(w);
        }
    }

    fn indent(&mut self, depth: usize) {
        for _ in 0..depth {
            self.out.push_str("    ");
        }
    }

    fn expr(&mut self) {
        match self.rng.below(8) {
            0 => self.number(),
            1 => {
                self.out.push('"');
                for i in 0..self.rng.between(1, 6) {
                    if i > 0 {
                        self.out.push(' ');
                    }
                    let w = self.english_word();
                    self.out.push_str(w);
                }
                self.out.push('"');
            }
            2 => {
                self.ident();
                self.out.push('.');
                self.ident();
                self.out.push_str("()");
            }
            3 => {
                self.type_name();
                self.out.push_str("::");
                self.ident();
                self.out.push('(');
                self.ident();
                self.out.push(')');
            }
            4 => {
                self.ident();
                self.out
                    .push_str(self.rng.pick(&[" + ", " - ", " * ", " / ", " % "]));
                self.number();
            }
            5 => {
                self.out.push('&');
                self.ident();
                self.out.push('[');
                self.number();
                self.out.push_str("..]");
            }
            _ => self.ident(),
        }
    }

    fn statement(&mut self, depth: usize) {
        self.indent(depth);
        match self.rng.below(10) {
            0..=3 => {
                self.out.push_str(if self.rng.chance(30) {
                    "let mut "
                } else {
                    "let "
                });
                self.ident();
                self.out.push_str(" = ");
                self.expr();
                self.out.push_str(";\n");
            }
            4 => {
                self.out.push_str("// ");
                let w = self.english_word();
                self.push_capitalized(w);
                for _ in 0..self.rng.between(3, 12) {
                    self.out.push(' ');
                    let w = self.english_word();
                    self.out.push_str(w);
                }
                self.out.push_str(".\n");
            }
            5 | 6 => {
                self.ident();
                self.out.push('.');
                self.ident();
                self.out.push('(');
                self.expr();
                self.out.push_str(", ");
                self.expr();
                self.out.push_str(")?;\n");
            }
            7 => {
                self.ident();
                self.out
                    .push_str(self.rng.pick(&[" += ", " -= ", " = ", " |= "]));
                self.expr();
                self.out.push_str(";\n");
            }
            _ => {
                self.out.push_str("return ");
                self.expr();
                self.out.push_str(";\n");
            }
        }
    }

    fn block(&mut self, depth: usize) {
        for _ in 0..self.rng.between(1, 6) {
            if depth < 4 && self.rng.chance(20) {
                self.indent(depth);
                match self.rng.below(3) {
                    0 => {
                        self.out.push_str("if ");
                        self.ident();
                        self.out
                            .push_str(self.rng.pick(&[" > ", " == ", " < ", " != "]));
                        self.expr();
                    }
                    1 => {
                        self.out.push_str("for ");
                        self.ident();
                        self.out.push_str(" in ");
                        self.ident();
                        self.out.push_str(".iter()");
                    }
                    _ => {
                        self.out.push_str("while let Some(");
                        self.ident();
                        self.out.push_str(") = ");
                        self.ident();
                        self.out.push_str(".next()");
                    }
                }
                self.out.push_str(" {\n");
                self.block(depth + 1);
                self.indent(depth);
                self.out.push_str("}\n");
            } else {
                self.statement(depth);
            }
        }
    }

    fn code_function(&mut self) {
        self.out.push_str("/// ");
        let w = self.english_word();
        self.push_capitalized(w);
        for _ in 0..self.rng.between(4, 14) {
            self.out.push(' ');
            let w = self.english_word();
            self.out.push_str(w);
        }
        self.out.push_str(".\n");
        self.out.push_str(if self.rng.chance(50) {
            "pub fn "
        } else {
            "fn "
        });
        self.ident();
        self.out.push('(');
        for i in 0..self.rng.below(4) {
            if i > 0 {
                self.out.push_str(", ");
            }
            self.ident();
            self.out.push_str(": ");
            if self.rng.chance(30) {
                self.out.push('&');
            }
            self.type_name();
        }
        self.out.push_str(") -> ");
        self.type_name();
        self.out.push_str(" {\n");
        self.block(1);
        self.out.push_str("}\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No window of `w` bytes occurs twice in `text`.
    fn longest_repeat_below(text: &str, w: usize) -> Result<(), String> {
        let b = text.as_bytes();
        let mut seen = rustc_hash::FxHashMap::default();
        for i in 0..b.len().saturating_sub(w) {
            if let Some(j) = seen.insert(&b[i..i + w], i) {
                return Err(format!(
                    "{:?} at {j} and {i}",
                    String::from_utf8_lossy(&b[i..i + w])
                ));
            }
        }
        Ok(())
    }

    #[test]
    fn text_never_repeats_and_is_the_same_for_a_seed() {
        for kind in Kind::ALL {
            let a = generate(kind, 300_000, 1).unwrap();
            assert!(a.len() >= 300_000, "{}", kind.name());
            assert_eq!(a, generate(kind, 300_000, 1).unwrap(), "{}", kind.name());
            assert_ne!(a, generate(kind, 300_000, 2).unwrap(), "{}", kind.name());
            if let Err(e) = longest_repeat_below(&a, 64) {
                panic!("{}: {e}", kind.name());
            }
        }
        let zh = generate(Kind::Chinese, 100_000, 3).unwrap();
        let han = zh
            .chars()
            .filter(|c| ('\u{4e00}'..='\u{9fa5}').contains(c))
            .count();
        assert!(han * 3 > zh.len() * 8 / 10, "mostly Han: {han}");
        // The check itself catches a repeat.
        assert!(longest_repeat_below(&format!("{zh}{}", &zh[..300]), 64).is_err());
    }
}
