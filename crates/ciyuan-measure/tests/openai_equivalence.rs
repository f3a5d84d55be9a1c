//! The OpenAI counters (the split patterns on `regex-automata`, our byte-pair merge
//! over the compact vocabulary table and its small tables) give the same counts as
//! `tiktoken-rs`, a port of tiktoken's own Rust core, on random texts built from the
//! characters where the split patterns are subtle:
//! whitespace before letters and at the end, `\r\n`, apostrophe suffixes, case
//! changes, combining marks, title-case and modifier letters, non-ASCII digits and
//! spaces, `/` after punctuation, CJK and emoji.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_measure::corpus::{self, Kind};
use ciyuan_measure::text::Encoding;
use proptest::prelude::*;

const ATOMS: &[&str] = &[
    "a",
    "e",
    "Z",
    "Hello",
    "WORLD",
    "iPhone",
    "x",
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
    "'S",
    "'ll",
    "'re",
    "'",
    "\"",
    "0",
    "7",
    "123",
    "4567",
    ".",
    ",",
    "!?",
    "//",
    "/",
    "...",
    "-",
    "é",
    "e\u{301}",
    "ǅ",
    "ʰ",
    "ß",
    "Ω",
    "ω",
    "中",
    "文字",
    "の",
    "한",
    "٣",
    "²",
    "\u{a0}",
    "\u{3000}",
    "\u{2028}",
    "\u{85}",
    "🦀",
    "👍🏽",
    "\u{200d}",
    "<|endoftext|>",
    "ÀB",
    "Ǆa",
    "ab'd",
    "Ab'VE",
    "$1,234.50",
    "_",
    "#",
    "x\n ",
    "\u{b}",
];

fn text(max_atoms: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ATOMS), 0..max_atoms).prop_map(|v| v.concat())
}

fn reference(enc: Encoding, s: &str) -> usize {
    match enc {
        Encoding::O200kBase => tiktoken_rs::o200k_base_singleton().count_ordinary(s),
        Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton().count_ordinary(s),
        _ => unreachable!(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn short_texts_count_as_tiktoken(s in text(40)) {
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            prop_assert_eq!(enc.count(&s).unwrap(), reference(enc, &s), "{} {:?}", enc.name(), s);
        }
    }

    #[test]
    fn long_texts_count_as_tiktoken(s in text(6000)) {
        // Thousands of pieces, words and runs of whitespace among them.
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            prop_assert_eq!(enc.count(&s).unwrap(), reference(enc, &s), "{}", enc.name());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Text that never repeats (the benchmark's): Chinese, English and code.
    #[test]
    fn non_repeating_texts_count_as_tiktoken(seed in any::<u64>()) {
        for kind in Kind::ALL {
            let s = corpus::generate(kind, 40_000, seed).unwrap();
            for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
                prop_assert_eq!(
                    enc.count_on_one_thread(&s).unwrap(),
                    reference(enc, &s),
                    "{} {} seed {}",
                    enc.name(),
                    kind.name(),
                    seed
                );
            }
        }
    }
}
