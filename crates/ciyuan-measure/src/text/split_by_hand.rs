//! The split patterns of OpenAI's and Qwen's encodings by hand, on every character of
//! the Basic Multilingual Plane.
//!
//! Every class these patterns use is a set of characters (letters, upper and lower
//! case, marks, digits, white space, the rest), and wherever a greedy loop would give a
//! character back, which one follows from the classes of the characters it took (see
//! [`Shape::piece`]). So the piece a pattern matches at a point follows from the
//! classes of a few characters, read from a table ([`Classes`]) made from the regex
//! crate's own Unicode tables. The regex engine's lazy DFA takes 5 to 10 instructions
//! a byte and a few hundred a search: a third of counting English and code, a tenth of
//! counting Chinese, and three quarters of recounting a short gateway prompt. This
//! answers `None` wherever a character of four bytes is involved (the table holds the
//! plane's 65,536 only), and where a contraction's `'` is followed by a character
//! beyond ASCII (`ſ` folds to `s` under `(?i)`): there the regex decides. A property
//! test holds it to the regex on random text of characters from every class.

use super::vocab::bmp_char;
use std::sync::LazyLock;

/// `\p{L}`.
const LETTER: u8 = 1;
/// `\p{M}`.
const MARK: u8 = 1 << 1;
/// `\p{N}`.
const NUMBER: u8 = 1 << 2;
/// `\s`.
const SPACE: u8 = 1 << 3;
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`: `o200k_base`'s letters that may begin a word.
const UPPER: u8 = 1 << 4;
/// `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`: `o200k_base`'s letters that may end a word.
const LOWER: u8 = 1 << 5;
/// `[\r\n]`.
const NEWLINE: u8 = 1 << 6;

/// Each class bit and the class it stands for, as the patterns write it: the table is
/// made from these, and its test matches every character against them with the regex.
const CLASS_PATTERNS: [(&str, u8); 7] = [
    (r"\p{L}", LETTER),
    (r"\p{M}", MARK),
    (r"\p{N}", NUMBER),
    (r"\s", SPACE),
    (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", UPPER),
    (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", LOWER),
    (r"[\r\n]", NEWLINE),
];

/// ASCII's class bits, read before [`Classes`] is: a constant's address, not a load
/// through the table (the test of every character holds the two equal).
const ASCII: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_uppercase() {
            LETTER | UPPER
        } else if c.is_ascii_lowercase() {
            LETTER | LOWER
        } else if c.is_ascii_digit() {
            NUMBER
        } else if c == b'\r' || c == b'\n' {
            SPACE | NEWLINE
        } else if c == b' ' || (c >= b'\t' && c <= b'\r') {
            SPACE
        } else {
            0
        };
        b += 1;
    }
    t
};

/// The class bits of every character of the Basic Multilingual Plane, in blocks of 256
/// characters, equal blocks shared (56 distinct, 14 KiB; made in about 0.3 ms): the
/// CJK ideographs' 81 blocks are one, so counting Chinese reads a few hundred bytes of
/// this, not 64 KiB.
pub(super) struct Classes {
    /// Per block (the character's code point divided by 256), its block in `blocks`.
    top: [u16; 256],
    blocks: Vec<[u8; 256]>,
}

/// The table, made on first use from the Unicode tables the regex engine itself
/// matches with (`regex-syntax`'s), so the two cannot disagree.
static CLASSES: LazyLock<Classes> = LazyLock::new(Classes::new);

impl Classes {
    fn new() -> Classes {
        let mut flat = vec![0u8; 1 << 16];
        for (class, bit) in CLASS_PATTERNS {
            // The classes are constants, checked by every test that counts.
            #[allow(clippy::expect_used)]
            let hir = regex_syntax::parse(class).expect("a valid class");
            let regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(set)) =
                hir.kind()
            else {
                unreachable!("{class} is a Unicode class");
            };
            for range in set.ranges() {
                let (lo, hi) = (u32::from(range.start()), u32::from(range.end()));
                for c in lo..=hi.min(0xffff) {
                    flat[c as usize] |= bit;
                }
            }
        }
        let mut top = [0u16; 256];
        let mut blocks: Vec<[u8; 256]> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (b, chunk) in flat.chunks_exact(256).enumerate() {
            let mut block = [0u8; 256];
            block.copy_from_slice(chunk);
            let next = blocks.len() as u16;
            let at = *seen.entry(block).or_insert(next);
            if at == next {
                blocks.push(block);
            }
            top[b] = at;
        }
        Classes { top, blocks }
    }

    #[inline]
    fn of(&self, c: u32) -> u8 {
        self.blocks[usize::from(self.top[(c >> 8) as usize & 0xff])][c as usize & 0xff]
    }
}

/// Makes the table now, not on the first text beyond ASCII (a gateway's first Chinese
/// prompt would wait for it).
pub(super) fn prepare() {
    LazyLock::force(&CLASSES);
}

/// The shape of a split pattern: what tells its alternatives apart.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// `o200k_base`: words are `P?U*L+C?|P?U+L*C?` (case-aware, the contraction a
    /// suffix); the others' are a contraction on its own first, then `P?L+`.
    pub(super) cased_words: bool,
    /// Digits in one piece: 3 (`\p{N}{1,3}`) or 1 (`\p{N}`).
    pub(super) max_digits: usize,
    /// Whether a run of punctuation takes trailing `/` as well as `\r` and `\n`
    /// (`o200k_base`).
    pub(super) punct_tail_slash: bool,
    /// Whether marks count as letters, in words and not as punctuation (`qwen3_6`:
    /// `[\p{L}\p{M}]+`).
    pub(super) marks_are_letters: bool,
}

/// `o200k_base`'s pattern.
pub(super) const O200K_SHAPE: Shape = Shape {
    cased_words: true,
    max_digits: 3,
    punct_tail_slash: true,
    marks_are_letters: false,
};

/// `cl100k_base`'s pattern.
pub(super) const CL100K_SHAPE: Shape = Shape {
    cased_words: false,
    max_digits: 3,
    punct_tail_slash: false,
    marks_are_letters: false,
};

/// `qwen`'s pattern: `cl100k_base`'s with one digit to a piece (`\p{N}`).
pub(super) const QWEN_SHAPE: Shape = Shape {
    max_digits: 1,
    ..CL100K_SHAPE
};

/// `qwen3_6`'s pattern: `qwen`'s with marks among the letters (`[\p{L}\p{M}]+`).
pub(super) const QWEN3_6_SHAPE: Shape = Shape {
    marks_are_letters: true,
    ..QWEN_SHAPE
};

/// The text's characters, read only as far as the table answers for them.
struct Chars<'a> {
    text: &'a [u8],
}

impl Chars<'_> {
    /// The class bits and length of the character at `i` (`Some(None)` past the end),
    /// or `None` for a character of four bytes (or bytes that are not UTF-8, which a
    /// `str` never holds).
    #[inline(always)]
    fn at(&self, i: usize) -> Option<Option<(u8, usize)>> {
        match self.text.get(i) {
            None => Some(None),
            Some(&b) if b < 0x80 => Some(Some((ASCII[usize::from(b)], 1))),
            Some(_) => {
                let (c, len) = bmp_char(self.text, i)?;
                Some(Some((CLASSES.of(c), len)))
            }
        }
    }

    /// Where a run of characters whose class bits meet `mask` (or, with `meet`
    /// false, do not), from `i`, ends; `None` if it takes a character the table does
    /// not answer for to tell.
    #[inline(always)]
    fn run(&self, mut i: usize, mask: u8, meet: bool) -> Option<usize> {
        while let Some((c, len)) = self.at(i)? {
            if (c & mask != 0) != meet {
                break;
            }
            i += len;
        }
        Some(i)
    }

    /// The length of `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`, 0 if it does not match
    /// there; `None` if a character beyond ASCII follows the `'` (it might fold to one
    /// of these letters).
    #[inline(always)]
    fn contraction(&self, i: usize) -> Option<usize> {
        let ascii = |i: usize| match self.text.get(i) {
            None => Some(None),
            Some(&c) if c < 0x80 => Some(Some(c)),
            Some(_) => None,
        };
        if self.text.get(i) != Some(&b'\'') {
            return Some(0);
        }
        let Some(c) = ascii(i + 1)? else {
            return Some(0);
        };
        let second = match c.to_ascii_lowercase() {
            b's' | b't' | b'm' | b'd' => return Some(2),
            b'r' | b'v' => b'e',
            b'l' => b'l',
            _ => return Some(0),
        };
        Some(match ascii(i + 2)? {
            Some(c) if c.to_ascii_lowercase() == second => 3,
            _ => 0,
        })
    }

    /// `o200k_base`'s words without their prefix at `from`: where `U*L+` ends if it
    /// matches there, and where the run of `U` ends (`U+L*` ends there if the run is
    /// not empty and `U*L+` does not match: then `L*` takes nothing).
    #[inline(always)]
    fn cased(&self, from: usize) -> Option<(Option<usize>, usize)> {
        let mut i = from;
        // Where the last character of the run of `U` that is also an `L` (`Lm`, `Lo`,
        // `M`) ends: if no `L` follows the run, `U*` gives characters back until `L+`
        // can take that one.
        let mut last_lower = None;
        while let Some((c, len)) = self.at(i)? {
            if c & UPPER == 0 {
                break;
            }
            i += len;
            if c & LOWER != 0 {
                last_lower = Some(i);
            }
        }
        let lower = self.run(i, LOWER, true)?;
        Some((if lower > i { Some(lower) } else { last_lower }, i))
    }
}

impl Shape {
    /// Where the piece the pattern matches at `at` (a point inside `text`, at the end
    /// of the piece before) ends, or `None` if that takes a character the table does
    /// not answer for to tell.
    pub(super) fn piece(self, text: &[u8], at: usize) -> Option<usize> {
        let t = Chars { text };
        let (c, len) = t.at(at)??;
        let letter = if self.marks_are_letters {
            LETTER | MARK
        } else {
            LETTER
        };
        // `[^\r\n\p{L}\p{N}]`: the one character a word may start with.
        let prefix = c & (NEWLINE | LETTER | NUMBER) == 0;
        if self.cased_words {
            // Leftmost first: `U*L+` with the prefix, then without it (a mark is a
            // prefix and both kinds of letter), then `U+L*` likewise.
            let (with, upper_with) = if prefix {
                t.cased(at + len)?
            } else {
                (None, at)
            };
            let (without, upper) = if !prefix || c & (UPPER | LOWER) != 0 {
                t.cased(at)?
            } else {
                (None, at)
            };
            let end = with.or(without).or(if upper_with > at + len {
                Some(upper_with)
            } else if upper > at {
                Some(upper)
            } else {
                None
            });
            if let Some(end) = end {
                return Some(end + t.contraction(end)?);
            }
        } else {
            let n = t.contraction(at)?;
            if n > 0 {
                return Some(at + n);
            }
            if prefix {
                let end = t.run(at + len, letter, true)?;
                if end > at + len {
                    return Some(end);
                }
                // Without the prefix, a word of the one character (a mark, in `qwen3_6`).
                if c & letter != 0 {
                    return Some(at + len);
                }
            } else {
                let end = t.run(at, letter, true)?;
                if end > at {
                    return Some(end);
                }
            }
        }
        if c & NUMBER != 0 {
            let mut end = at + len;
            let mut digits = 1;
            while digits < self.max_digits {
                match t.at(end)? {
                    Some((d, n)) if d & NUMBER != 0 => {
                        end += n;
                        digits += 1;
                    }
                    _ => break,
                }
            }
            return Some(end);
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*` (`[\r\n/]*` for `o200k_base`).
        let first = at + usize::from(text[at] == b' ');
        let end = t.run(first, SPACE | letter | NUMBER, false)?;
        if end > first {
            let tail = self.punct_tail_slash;
            return Some(
                end + text[end..]
                    .iter()
                    .take_while(|&&c| c == b'\r' || c == b'\n' || (tail && c == b'/'))
                    .count(),
            );
        }
        // White space: the character here is nothing else now, and the run is all of
        // it up to a character that is not.
        let end = t.run(at, SPACE, true)?;
        if end == at {
            // Not white space either: no alternative matched; the regex decides.
            return None;
        }
        // `\s*[\r\n]+`: up to the run's last line break.
        if let Some(last) = text[at..end]
            .iter()
            .rposition(|&c| c == b'\r' || c == b'\n')
        {
            return Some(at + last + 1);
        }
        // `\s+$`, then `\s+(?!\S)` (all but the run's last character), then `\s+`.
        if end == text.len() || end == at + len {
            Some(end)
        } else {
            let mut last = end - 1;
            while text[last] & 0xc0 == 0x80 {
                last -= 1;
            }
            Some(last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::openai::{CL100K_PRE, O200K_PRE};
    use super::super::pretokenize::Pretokenizer;
    use super::super::qwen::{QWEN_PRE, QWEN3_6_PRE};
    use super::*;
    use proptest::prelude::*;

    /// Characters where the classes meet: both cases, the letters of contractions,
    /// digits, every ASCII white space byte and some that are not (`\x1c` is not
    /// `\s`), punctuation and control bytes; beyond ASCII, letters of every kind (`Lu`,
    /// `Ll`, `Lt` `ǅ`, `Lm` `ʰ` and `々`, `Lo`), marks (`Mn`, `Mc`), numbers (`Nd`
    /// `٣` and `３`, `Nl` `Ⅻ`, `No` `½`), white space (`\u{3000}`, no-break space,
    /// next line, line separator), Chinese punctuation, characters of four bytes
    /// (left to the regex), and `ſ` and the Kelvin sign, which fold to `s` and `k`
    /// under `(?i)`.
    const ALPHABET: &[char] = &[
        'a', 'b', 'z', 'A', 'Z', 's', 'S', 't', 'T', 'r', 'e', 'E', 'v', 'l', 'L', 'm', 'd', 'k',
        'K', '\'', '\'', '0', '1', '9', ' ', ' ', ' ', '\t', '\n', '\r', '\x0b', '\x0c', '\x1c',
        '\x00', '\x7f', '/', '.', ',', '(', '!', '_', 'é', 'É', 'ǅ', 'ʰ', '々', 'Σ', 'σ', 'Ж',
        '中', '文', '字', '\u{3000}', '\u{a0}', '\u{85}', '\u{2028}', '٣', '３', 'Ⅻ', '½', '，',
        '。', '“', '、', '😀', '𠀀', 'ſ', '\u{212a}', '\u{301}', '\u{903}', '\u{20dd}',
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

    /// Text of characters from [`ALPHABET`], or any at all.
    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![3 => prop::sample::select(ALPHABET), 1 => any::<char>()],
            0..48,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6000))]
        #[test]
        fn pieces_by_hand_are_the_regex_pieces(text in text()) {
            for (name, pre) in all() {
                prop_assert_eq!(
                    pieces(pre, &text, true),
                    pieces(pre, &text, false),
                    "{} {:?}", name, text
                );
            }
        }
    }

    /// Every character of the plane, read from text as the split reads it, has the
    /// classes the regex gives it.
    #[test]
    fn the_table_holds_the_regex_classes_of_every_character() {
        let classes = CLASS_PATTERNS.map(|(class, bit)| {
            let re = regex_automata::meta::Regex::new(&format!("^{class}$")).unwrap();
            (re, bit)
        });
        let mut buf = [0u8; 4];
        for c in (0..=0xffff).filter_map(char::from_u32) {
            let s = format!("x{}y", c.encode_utf8(&mut buf));
            let chars = Chars { text: s.as_bytes() };
            let (bits, len) = chars.at(1).unwrap().unwrap();
            assert_eq!(len, c.len_utf8(), "{c:?}");
            for (re, bit) in &classes {
                let want = re.is_match(&*c.encode_utf8(&mut buf));
                assert_eq!(bits & bit != 0, want, "{c:?} {bit}");
            }
        }
        // Equal blocks are shared: 56 distinct of 256 with regex-syntax 0.8's tables (14 KiB).
        assert!(
            CLASSES.blocks.len() <= 64,
            "{} blocks",
            CLASSES.blocks.len()
        );
        // Beyond the plane the table is not asked.
        assert_eq!(
            Chars {
                text: "😀".as_bytes()
            }
            .at(0),
            None
        );
    }

    #[test]
    fn text_is_split_by_hand_but_for_characters_of_four_bytes() {
        for (name, pre) in all() {
            let shape = pre
                .shape
                .expect("every OpenAI and Qwen pattern has a shape");
            for text in [
                "Hello, world! It's 2026:\n\n  x = foo(12345);  ",
                "词元是人工智能服务中最小的计量单位，可以定价、交易。\u{3000}“你好”，Ⅻ½３",
                "Café déjà vu, Straße ǅemal ʰa\u{301}b  \u{a0}\u{2028}x",
            ] {
                let mut at = 0;
                while at < text.len() {
                    let end = shape.piece(text.as_bytes(), at);
                    assert!(end.is_some_and(|e| e > at), "{name} {text:?} {at}");
                    at = end.unwrap_or(text.len());
                }
            }
            // A word that ends at a character of four bytes, white space before one,
            // and a `'` before a character beyond ASCII are left to the regex.
            assert_eq!(shape.piece("ab😀".as_bytes(), 0), None, "{name}");
            assert_eq!(shape.piece(" 𠀀".as_bytes(), 0), None, "{name}");
            // (`o200k_base` takes a contraction only at the end of a word.)
            let (text, at) = if shape.cased_words {
                ("a'ſ", 0)
            } else {
                ("'ſ", 0)
            };
            assert_eq!(shape.piece(text.as_bytes(), at), None, "{name}");
        }
    }
}
