//! The split patterns of OpenAI's and Qwen's encodings on ASCII text, by hand.
//!
//! On ASCII every class of these patterns is a plain byte class (letters, upper and
//! lower case, digits, white space, the rest) and every alternative's greedy loops
//! never need to give a byte back, so the piece a pattern matches at a point follows
//! from a few bytes. The regex engine's lazy DFA takes 5 to 10 instructions a byte
//! and a few hundred a search: on English and code a third of counting, and three
//! quarters of recounting a short gateway prompt. This answers a piece only when
//! every byte it looked at, the one that ends the piece included, is ASCII; anywhere
//! else it answers `None` and the regex decides (a byte beyond ASCII may be a
//! letter, a digit, white space, or fold to `s` or `k` under `(?i)`). A property test
//! holds it to the regex on random text.

/// The shape of a split pattern, as far as ASCII text can tell them apart.
#[derive(Debug, Clone, Copy)]
pub(super) struct AsciiShape {
    /// `o200k_base`: words are `P?U*L+C?|P?U+L*C?` (case-aware, the contraction a
    /// suffix); the others' are a contraction on its own first, then `P?L+`.
    pub(super) cased_words: bool,
    /// Digits in one piece: 3 (`\p{N}{1,3}`) or 1 (`\p{N}`).
    pub(super) max_digits: usize,
    /// Whether a run of punctuation takes trailing `/` as well as `\r` and `\n`
    /// (`o200k_base`).
    pub(super) punct_tail_slash: bool,
}

/// `o200k_base`'s pattern.
pub(super) const O200K_SHAPE: AsciiShape = AsciiShape {
    cased_words: true,
    max_digits: 3,
    punct_tail_slash: true,
};

/// `cl100k_base`'s pattern.
pub(super) const CL100K_SHAPE: AsciiShape = AsciiShape {
    cased_words: false,
    max_digits: 3,
    punct_tail_slash: false,
};

/// Qwen's patterns (`qwen` and `qwen3_6` differ only beyond ASCII).
pub(super) const QWEN_SHAPE: AsciiShape = AsciiShape {
    cased_words: false,
    max_digits: 1,
    punct_tail_slash: false,
};

/// `\s` on ASCII: tab, line feed, vertical tab, form feed, carriage return, space.
#[inline]
fn space(c: u8) -> bool {
    c == b' ' || (b'\t'..=b'\r').contains(&c)
}

#[inline]
fn newline(c: u8) -> bool {
    c == b'\r' || c == b'\n'
}

/// `[^\r\n\p{L}\p{N}]`: the one byte a word may start with.
#[inline]
fn word_prefix(c: u8) -> bool {
    !newline(c) && !c.is_ascii_alphanumeric()
}

/// `[^\s\p{L}\p{N}]`: punctuation, symbols and control bytes.
#[inline]
fn punct(c: u8) -> bool {
    !space(c) && !c.is_ascii_alphanumeric()
}

/// The text's bytes, read only as far as they are ASCII.
struct Ascii<'a>(&'a [u8]);

impl Ascii<'_> {
    /// The byte at `i` (`Some(None)` past the end), or `None` if it is not ASCII.
    #[inline]
    fn at(&self, i: usize) -> Option<Option<u8>> {
        match self.0.get(i) {
            None => Some(None),
            Some(&c) if c < 0x80 => Some(Some(c)),
            Some(_) => None,
        }
    }

    /// Where a run of bytes for which `class` holds, from `i`, ends; `None` if it ends
    /// at a byte that is not ASCII.
    #[inline]
    fn run(&self, mut i: usize, class: impl Fn(u8) -> bool) -> Option<usize> {
        while let Some(c) = self.at(i)? {
            if !class(c) {
                break;
            }
            i += 1;
        }
        Some(i)
    }

    /// The length of `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`, 0 if it does not match
    /// there.
    #[inline]
    fn contraction(&self, i: usize) -> Option<usize> {
        if self.at(i)? != Some(b'\'') {
            return Some(0);
        }
        let Some(c) = self.at(i + 1)? else {
            return Some(0);
        };
        let second = match c.to_ascii_lowercase() {
            b's' | b't' | b'm' | b'd' => return Some(2),
            b'r' | b'v' => b'e',
            b'l' => b'l',
            _ => return Some(0),
        };
        Some(match self.at(i + 2)? {
            Some(c) if c.to_ascii_lowercase() == second => 3,
            _ => 0,
        })
    }
}

impl AsciiShape {
    /// Where the piece the pattern matches at `at` (a point inside `text`, at the end
    /// of the piece before) ends, or `None` if that takes a byte beyond ASCII to tell.
    pub(super) fn piece(self, text: &[u8], at: usize) -> Option<usize> {
        let t = Ascii(text);
        let c = t.at(at)??;
        if !self.cased_words {
            let n = t.contraction(at)?;
            if n > 0 {
                return Some(at + n);
            }
        }
        // A word: one prefix byte if there is one (a word never starts at a byte that
        // is one, so not taking it would not match either).
        let start = at + usize::from(word_prefix(c));
        if self.cased_words {
            let upper = t.run(start, |c| c.is_ascii_uppercase())?;
            let lower = t.run(upper, |c| c.is_ascii_lowercase())?;
            // `P?U*L+C?`, else `P?U+L*C?`: either way the word is the upper case run
            // and the lower case run after it, if there is a letter at all.
            if lower > start {
                return Some(lower + t.contraction(lower)?);
            }
        } else {
            let end = t.run(start, |c| c.is_ascii_alphabetic())?;
            if end > start {
                return Some(end);
            }
        }
        if c.is_ascii_digit() {
            let mut end = at + 1;
            while end - at < self.max_digits {
                match t.at(end)? {
                    Some(d) if d.is_ascii_digit() => end += 1,
                    _ => break,
                }
            }
            return Some(end);
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*` (`[\r\n/]*` for `o200k_base`).
        let first = at + usize::from(c == b' ');
        let end = t.run(first, punct)?;
        if end > first {
            let tail = self.punct_tail_slash;
            return t.run(end, |c| newline(c) || (tail && c == b'/'));
        }
        // White space: every byte left here is (`c` is neither a letter, a digit nor
        // punctuation), and the run is all of it up to a byte that is not.
        let end = t.run(at, space)?;
        // `\s*[\r\n]+`: up to the run's last line break.
        if let Some(last) = text[at..end].iter().rposition(|&c| newline(c)) {
            return Some(at + last + 1);
        }
        // `\s+$`, then `\s+(?!\S)` (all but the run's last byte), then `\s+`.
        if end == text.len() || end - at == 1 {
            Some(end)
        } else {
            Some(end - 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::openai::{CL100K_PRE, O200K_PRE};
    use super::super::pretokenize::Pretokenizer;
    use super::super::qwen::{QWEN_PRE, QWEN3_6_PRE};
    use proptest::prelude::*;

    /// Characters where the classes meet: both cases, the letters of contractions,
    /// digits, every ASCII white space byte and some that are not (`\x1c` is not
    /// `\s`), punctuation and control bytes, and beyond ASCII letters, a combining
    /// mark, white space (`\u{3000}`, no-break space, next line), a digit (`٣`), and
    /// `ſ` and the Kelvin sign, which fold to `s` and `k` under `(?i)`.
    const ALPHABET: &[char] = &[
        'a', 'b', 'z', 'A', 'Z', 's', 'S', 't', 'T', 'r', 'e', 'E', 'v', 'l', 'L', 'm', 'd', 'k',
        'K', '\'', '\'', '0', '1', '9', ' ', ' ', ' ', '\t', '\n', '\r', '\x0b', '\x0c', '\x1c',
        '\x00', '\x7f', '/', '.', ',', '(', '!', '_', 'é', 'É', '中', '\u{3000}', '\u{a0}',
        '\u{85}', '٣', 'ſ', '\u{212a}', '\u{301}',
    ];

    fn pieces(pre: &'static Pretokenizer, text: &str, by_hand: bool) -> Vec<(usize, usize)> {
        let mut cache = pre.cache();
        let (mut out, mut at) = (Vec::new(), 0);
        loop {
            let next = if by_hand {
                pre.next_piece(&mut cache, text, at)
            } else {
                pre.next_piece_by_regex(&mut cache, text, at)
            };
            let Some((start, end)) = next else { break };
            out.push((start, end));
            at = end;
        }
        out
    }

    fn all() -> [(&'static str, &'static Pretokenizer); 4] {
        [
            ("o200k_base", &O200K_PRE),
            ("cl100k_base", &CL100K_PRE),
            ("qwen", &QWEN_PRE),
            ("qwen3_6", &QWEN3_6_PRE),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn pieces_by_hand_are_the_regex_pieces(
            chars in prop::collection::vec(prop::sample::select(ALPHABET), 0..48)
        ) {
            let text: String = chars.into_iter().collect();
            for (name, pre) in all() {
                prop_assert_eq!(
                    pieces(pre, &text, true),
                    pieces(pre, &text, false),
                    "{} {:?}", name, text
                );
            }
        }
    }

    #[test]
    fn ascii_text_is_split_by_hand_and_the_rest_by_the_regex() {
        for (name, pre) in all() {
            let shape = pre
                .ascii
                .expect("every OpenAI and Qwen pattern has a shape");
            let text = "Hello, world! It's 2026:\n\n  x = foo(12345);  ";
            let mut at = 0;
            while at < text.len() {
                let end = shape.piece(text.as_bytes(), at);
                assert!(end.is_some(), "{name} {at}");
                at = end.unwrap_or(text.len());
            }
            // A letter run that ends at a character beyond ASCII, and white space
            // before one, are left to the regex.
            assert_eq!(shape.piece("café".as_bytes(), 0), None, "{name}");
            assert_eq!(shape.piece(" \u{3000}".as_bytes(), 0), None, "{name}");
            assert_eq!(shape.piece("'ſ".as_bytes(), 0), None, "{name}");
        }
    }
}
