//! OpenAI's encodings, `o200k_base` and `cl100k_base`: their split patterns and the
//! counter that runs them.

use super::bpe::piece_count;
use super::pretokenize::{CacheGuard, Pretokenizer};
use super::split_by_hand::{CL100K_SHAPE, O200K_SHAPE};
use super::vocab::{Vocab, Walk, vocabulary_gz};
use super::{Encoding, TextError};
use std::sync::{LazyLock, OnceLock};

/// Counts with an OpenAI encoding: the split pattern on `regex-automata` (see
/// [`Pretokenizer`]) and the byte-pair merge every encoding uses ([`piece_count`]).
/// No piece counts are remembered: on text that never repeats a table of them saved
/// nothing (cachegrind, Chinese, English and code alike), and only repeated text gained.
pub(super) struct OpenAiCounter {
    pub(super) vocab: &'static Vocab,
    pub(super) pre: &'static Pretokenizer,
    pub(super) cache: CacheGuard,
}

impl OpenAiCounter {
    /// A counter with `encoding`.
    pub(super) fn new(encoding: Encoding) -> Result<Self, TextError> {
        let pre = if encoding == Encoding::Cl100kBase {
            &*CL100K_PRE
        } else {
            &*O200K_PRE
        };
        Ok(OpenAiCounter {
            vocab: openai_vocab(encoding)?,
            pre,
            cache: pre.cache(),
        })
    }

    pub(super) fn count(&mut self, text: &str) -> usize {
        let (mut n, mut at) = (0, 0);
        while let Some((start, end)) = self.pre.next_piece(&mut self.cache, text, at) {
            at = end;
            n += piece_count(&text.as_bytes()[start..end], self.vocab);
        }
        n
    }
}

/// The OpenAI vocabularies, shipped gzipped as tiktoken writes them.
pub(super) fn openai_vocab(encoding: Encoding) -> Result<&'static Vocab, TextError> {
    static O200K: OnceLock<Result<Vocab, TextError>> = OnceLock::new();
    static CL100K: OnceLock<Result<Vocab, TextError>> = OnceLock::new();
    let cell = if encoding == Encoding::Cl100kBase {
        &CL100K
    } else {
        &O200K
    };
    cell.get_or_init(|| {
        Vocab::from_tiktoken_gz(encoding.name(), vocabulary_gz(encoding), Walk::Plain)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// OpenAI's `o200k_base` split pattern, as tiktoken writes it.
pub(super) const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// OpenAI's `cl100k_base` split pattern, as tiktoken writes it.
pub(super) const CL100K_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(super) static O200K_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(O200K_PATTERN).with_shape(O200K_SHAPE));

pub(super) static CL100K_PRE: LazyLock<Pretokenizer> =
    LazyLock::new(|| Pretokenizer::rewriting_lookahead(CL100K_PATTERN).with_shape(CL100K_SHAPE));
