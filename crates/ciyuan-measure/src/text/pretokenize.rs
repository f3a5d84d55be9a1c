//! Splitting text into pieces with a family's pattern, on `regex-automata`.

use super::split_by_hand::Shape;
use std::sync::Mutex;

/// tiktoken's split patterns as `regex-automata` runs them: the look-ahead alternative
/// `\s+(?!\S)` becomes `\s+\s` whose last character is given back, with `\s+$` for the
/// end of the text — the rewrite GitHub's `bpe-openai` crate makes (our tests check it
/// against tiktoken). Each counting call takes one scratch space for the whole text,
/// not one from a shared pool per piece.
pub(super) struct Pretokenizer {
    pub(super) re: regex_automata::meta::Regex,
    // Boxed: a cache is a large struct, and counting a short prompt moved it out of the
    // pool, into the counter and back: a quarter of the time of a short recount.
    #[allow(clippy::vec_box)]
    pub(super) caches: Mutex<Vec<Box<regex_automata::meta::Cache>>>,
    /// The pattern's shape, by which pieces are found by hand
    /// ([`super::split_by_hand`]) before the regex is asked.
    pub(super) shape: Option<Shape>,
}

/// The alternative whose last character is a look-ahead (pattern index); patterns with
/// fewer alternatives have none.
pub(super) const LOOKAHEAD_PATTERN: usize = 1;

/// A scratch space for a [`Pretokenizer`]'s regex, taken from its pool the first
/// time the regex runs and given back when dropped. Most texts are split by hand and
/// never run it: a gateway's prompt then costs no lock of the pool (two a count, and
/// a request counts its prompt and its answer).
pub(super) struct CacheGuard {
    pub(super) pre: &'static Pretokenizer,
    cache: Option<Box<regex_automata::meta::Cache>>,
}

impl CacheGuard {
    /// The scratch space, from the pool (or made) on first use.
    fn get(&mut self) -> &mut regex_automata::meta::Cache {
        let pre = self.pre;
        self.cache.get_or_insert_with(|| {
            let pooled = pre.caches.lock().ok().and_then(|mut p| p.pop());
            pooled.unwrap_or_else(|| Box::new(pre.re.create_cache()))
        })
    }
}

impl Drop for CacheGuard {
    fn drop(&mut self) {
        if let (Some(c), Ok(mut pool)) = (self.cache.take(), self.pre.caches.lock()) {
            pool.push(c);
        }
    }
}

impl Pretokenizer {
    pub(super) fn new(patterns: &[&str]) -> Self {
        // The patterns are constants, checked by every test that counts.
        #[allow(clippy::expect_used)]
        let re = regex_automata::meta::Regex::new_many(patterns).expect("valid split patterns");
        Pretokenizer {
            re,
            caches: Mutex::new(Vec::new()),
            shape: None,
        }
    }

    /// The pretokenizer of a tiktoken-style `pattern` that ends in
    /// `|\s+(?!\S)|\s+`, rewritten as above.
    pub(super) fn rewriting_lookahead(pattern: &str) -> Self {
        const TAIL: &str = r"|\s+(?!\S)|\s+";
        // The patterns are constants, checked by every test that counts.
        #[allow(clippy::expect_used)]
        let head = pattern
            .strip_suffix(TAIL)
            .expect("the pattern ends in the look-ahead alternatives");
        Pretokenizer::new(&[&format!(r"{head}|\s+$"), r"\s+\s", r"\s+"])
    }

    /// This pretokenizer, its pieces found by hand as `shape` says where it can tell
    /// them (the caller vouches that `shape` is its pattern's; the tests check every
    /// one).
    pub(super) fn with_shape(mut self, shape: Shape) -> Self {
        super::split_by_hand::prepare();
        self.shape = Some(shape);
        self
    }

    /// Hugging Face `Split` with behaviour `Isolated`: every match and every gap between
    /// matches becomes a piece (as `find_iter` would give them, the look-ahead's character
    /// given back as in [`Pretokenizer::next_piece`]).
    pub(super) fn split_isolated<'a>(
        &self,
        guard: &mut CacheGuard,
        s: &'a str,
        out: &mut Vec<&'a str>,
    ) {
        use regex_automata::Input;
        let cache = guard.get();
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

    pub(super) fn cache(&'static self) -> CacheGuard {
        CacheGuard {
            pre: self,
            cache: None,
        }
    }

    /// The next piece of `text` at or after `at`, as a byte range. Like tiktoken's
    /// `find_iter`, text that no alternative matches is skipped (these patterns match
    /// everywhere, so none is).
    pub(super) fn next_piece(
        &self,
        guard: &mut CacheGuard,
        text: &str,
        at: usize,
    ) -> Option<(usize, usize)> {
        if at >= text.len() {
            return None;
        }
        if let Some(shape) = self.shape
            && let Some(end) = shape.piece(text.as_bytes(), at)
            // An empty piece would never advance: the regex decides instead.
            && end > at
        {
            return Some((at, end));
        }
        self.next_piece_by_regex(guard, text, at)
    }

    /// [`Pretokenizer::next_piece`] by the regex alone.
    pub(super) fn next_piece_by_regex(
        &self,
        guard: &mut CacheGuard,
        text: &str,
        at: usize,
    ) -> Option<(usize, usize)> {
        use regex_automata::{Anchored, Input};
        if at >= text.len() {
            return None;
        }
        let cache = guard.get();
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
