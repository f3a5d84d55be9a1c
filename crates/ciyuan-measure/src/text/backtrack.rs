//! Byte-pair merging by backtracking: the longest token first, kept only if byte-pair
//! merging would leave it next to the token before it, as in GitHub's `bpe` crate
//! (its README sets out why this gives exactly the merge's tokens).
//!
//! The merge's tokens are the one sequence in which every two neighbours are
//! *compatible*: merging the bytes of the two alone leaves the two. So a piece is
//! counted by walking it left to right, taking at each point the longest token that
//! starts there and, if it is not compatible with the token before it, the next
//! shorter one ([`Backtrack::shorter`]); where no token fits, the point is marked dead
//! and the token before it is shortened in turn. Whether two tokens are compatible is
//! decided from how each was merged ([`Backtrack::split`]): only a merge across their
//! boundary could join them, and it can happen only while both sides' parts at the
//! boundary exist, which their ranks bound ([`Backtrack::compatible`]).
//!
//! Only tokens that merging makes are walked: a token that byte-pair merging of its
//! own bytes does not give back ("unreachable") is never a part of a longer piece's
//! merge (a piece that *is* such a token counts one, as tiktoken counts it, before
//! this is asked).

use super::Rank;
#[cfg(test)]
use super::vocab::Walk;
use super::vocab::{Vocab, bmp_char, char3_index, has_bit, home, set_bit};

/// No token.
const NONE: Rank = Rank::MAX;

/// A trie of the tokens merging can make, each token's merge, and the merges by the
/// pair of tokens they join.
pub(super) struct Backtrack {
    /// Per rank, packed: the token's left half (20 bits), its right half (20 bits),
    /// its length (8 bits), and two signatures of 8 bits ([`SIG_LEFT_SHIFT`],
    /// [`SIG_RIGHT_SHIFT`]); halves all ones for single bytes and for tokens merging
    /// does not make, 0 where no token has the rank.
    tree: Box<[u64]>,
    /// Per rank, the longest token merging makes that is a proper prefix of it.
    shorter: Box<[Rank]>,
    /// Per trie node, packed: the token that ends there (20 bits, all ones for none),
    /// how many children it has (9 bits), where they start (24 bits) and the byte of
    /// the edge that leads to it (8 bits). A node's children are consecutive and in
    /// byte order, and each carries its own byte, so finding the child along a byte
    /// reads one stretch of this table, whose entry found is the child itself (with
    /// the bytes in a table of their own, each step cost two cache misses: 60% of the
    /// time of finding the longest token was those loads).
    nodes: Box<[u64]>,
    /// Per character of three bytes (by [`char3_index`]), the trie node it leads to
    /// when it is a token, else 0: Chinese is walked from there, not byte by byte
    /// through nodes of 64 children each.
    chars3: Box<[u32]>,
    /// The trie's edges of one whole character of three bytes, below any node but the
    /// root (which [`Backtrack::chars3`] covers), by the node and the character (by
    /// [`char3_index`]): `child << 40 | node << 16 | character` and a copy of the
    /// child's entry in [`Backtrack::nodes`] (so a step reads one cache line, not that
    /// and the child's node), 0 where empty (open addressing, linear probing). Walking
    /// Chinese down the trie a character at a time reads one entry here instead of
    /// three nodes' children, each a cache miss (together half of the time of finding
    /// the longest token). A node marked [`NODE_PART_BELOW`] is walked byte by byte
    /// instead.
    char_steps: Box<[[u64; 2]]>,
    /// One bit per [`CHAR_STEP_FILTER_BITS`]-bit stretch of a step's hash, set where a
    /// step's falls (128 KiB, which stays in the cache): about two in three steps the
    /// walk asks for are not there (a token ends and the next character does not carry
    /// it on), and most of those are turned away here without a miss in the table.
    char_step_filter: Box<[u64]>,
    /// Every token's merge by its two halves (open addressing, linear probing):
    /// `1 << 63 | token << 40 | right << 20 | left`, 0 where empty. Two tokens next to
    /// each other merge only into the token they are the halves of (merging that
    /// token's bytes alone would join them too), so [`Backtrack::compatible`] asks
    /// this, by ranks, not the vocabulary by bytes.
    merges: Box<[u64]>,
    /// One bit per [`MERGE_FILTER_BITS`]-bit stretch of a pair's hash, set where a
    /// merge's falls (256 KiB): most pairs asked about merge into nothing.
    merge_filter: Box<[u64]>,
    /// The tokens made from a half ranked after them (`qwen3_6` has 27), if any. A
    /// piece that holds none of them merges as if they were not in the vocabulary,
    /// where every token is made after its halves, as the walk assumes; a piece that
    /// holds one is merged instead.
    screen: Option<aho_corasick::AhoCorasick>,
    /// One bit per character of the Basic Multilingual Plane (8 KiB): set for one
    /// character of each screened token (its last). A piece that starts beyond ASCII
    /// and holds none of these characters holds none of the tokens, and is not
    /// searched: on Chinese the search cost 9% of counting, and only `人力资源`'s and
    /// `いっぱい`'s characters are here. Pieces that start with ASCII are searched (the
    /// search's own prefilter does well on them).
    screen_chars: Box<[u64]>,
    /// The tokens merging does not make (none in most encodings, 201 in `qwen3_6`): a
    /// piece that is one counts one, as tiktoken counts it, but the trie does not hold
    /// it (a piece that is a token the trie holds is counted one by the walk's first
    /// step). Small, so asking it costs no miss in the vocabulary's table.
    unmade: rustc_hash::FxHashSet<Box<[u8]>>,
    /// Bit `min(len, 63)` set for each length of an [`Backtrack::unmade`] token: most
    /// pieces are turned away without hashing.
    unmade_lengths: u64,
}

const HALF: u64 = (1 << 20) - 1;
const LEN_SHIFT: u32 = 40;
/// Bit [`sig_bit`] of a right half is set here in the left half's `tree` entry for
/// each merge it is the left half of, and the converse at [`SIG_RIGHT_SHIFT`]: most
/// pairs [`Backtrack::compatible`] asks about are turned away by the two entries it
/// has already loaded, before the merge filter (a cache miss each time) is read.
const SIG_LEFT_SHIFT: u32 = 48;
const SIG_RIGHT_SHIFT: u32 = 56;

/// Which of a signature's 8 bits stands for `r`.
#[inline]
fn sig_bit(r: Rank) -> u32 {
    (u64::from(r).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 61) as u32
}

const MERGE_FILTER_BITS: u32 = 21;

/// The bits of a [`Backtrack::char_steps`] entry that are its key (node and character).
const CHAR_STEP_KEY: u64 = (1 << 40) - 1;

const CHAR_STEP_FILTER_BITS: u32 = 20;

/// The bit of [`Backtrack::char_step_filter`] for a step's hash.
#[inline]
fn char_step_bit(h: u64) -> usize {
    (h >> (64 - CHAR_STEP_FILTER_BITS)) as usize
}

#[inline]
fn char_step_hash(key: u64) -> u64 {
    key.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

const NODE_RANK_BITS: u32 = 20;
const NODE_NO_RANK: u64 = (1 << NODE_RANK_BITS) - 1;
const NODE_COUNT_SHIFT: u32 = NODE_RANK_BITS;
const NODE_FIRST_SHIFT: u32 = NODE_RANK_BITS + 9;
const NODE_FIRST_BITS: u32 = 24;
const NODE_LABEL_SHIFT: u32 = NODE_FIRST_SHIFT + NODE_FIRST_BITS;
/// Set on a node where a token ends one or two bytes down a path shaped like the start
/// of a character of three bytes (a lead byte 0xe0 to 0xef, then a continuation byte):
/// a step of a whole character would pass over that token, so the walk goes byte by
/// byte there.
const NODE_PART_BELOW: u64 = 1 << (NODE_LABEL_SHIFT + 8);

/// Where the children of the node whose entry is `n` sit in [`Backtrack::nodes`].
#[inline]
fn node_children(n: u64) -> std::ops::Range<usize> {
    let first = ((n >> NODE_FIRST_SHIFT) & ((1 << NODE_FIRST_BITS) - 1)) as usize;
    first..first + ((n >> NODE_COUNT_SHIFT) & 0x1ff) as usize
}

/// The byte of the edge that leads to node entry `n`.
#[inline]
fn node_label(n: u64) -> u8 {
    (n >> NODE_LABEL_SHIFT) as u8
}

/// Pieces at most this long are counted on the stack; longer ones are merged with a
/// heap (they are rare: runs of one character, long words of code).
pub(super) const BACKTRACK_MAX_BYTES: usize = 256;

/// The hash of a pair of ranks.
#[inline]
fn pair_hash(left: Rank, right: Rank) -> u64 {
    ((u64::from(left) << 20) | u64::from(right)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[inline]
fn left_half(t: u64) -> Rank {
    (t & HALF) as Rank
}

#[inline]
fn right_half(t: u64) -> Rank {
    ((t >> 20) & HALF) as Rank
}

#[inline]
fn token_len(t: u64) -> usize {
    (t >> LEN_SHIFT) as usize & 0xff
}

/// The two tokens whose merge ends byte-pair merging of `token` alone, or `None`
/// if that leaves more than one part: tiktoken's merge, slowly (asked only of tokens
/// that could be made from a half ranked after them).
fn merge_alone(token: &[u8], vocab: &Vocab) -> Option<(Rank, Rank)> {
    let mut cuts: Vec<usize> = (0..=token.len()).collect();
    let mut last = None;
    while let Some((_, i)) = (0..cuts.len() - 2)
        .filter_map(|i| vocab.get(&token[cuts[i]..cuts[i + 2]]).map(|r| (r, i)))
        .min()
    {
        last = Some((cuts[i], cuts[i + 1], cuts[i + 2]));
        cuts.remove(i + 1);
    }
    let (a, b, c) = last.filter(|_| cuts.len() == 2)?;
    Some((vocab.get(&token[a..b])?, vocab.get(&token[b..c])?))
}

impl Backtrack {
    /// Nothing yet: the table is built once the vocabulary answers look-ups.
    pub(super) fn empty() -> Backtrack {
        Backtrack {
            tree: Box::new([]),
            shorter: Box::new([]),
            nodes: Box::new([]),
            chars3: Box::new([]),
            char_steps: Box::new([]),
            char_step_filter: Box::new([]),
            merges: Box::new([]),
            merge_filter: Box::new([]),
            screen: None,
            screen_chars: Box::new([]),
            unmade: rustc_hash::FxHashSet::default(),
            unmade_lengths: 0,
        }
    }

    /// Whether [`Backtrack::new`] built this (else it is [`Backtrack::empty`]).
    pub(super) fn is_built(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Builds the trie and the merges of the tokens `tokens` (each a token's place in
    /// `arena`, its length and rank, in any order), whose ranks `vocab` answers; with
    /// `screen`, looks for tokens made from a half ranked after them and screens out
    /// the pieces that hold one.
    pub(super) fn new(
        arena: &[u8],
        tokens: &[(u32, u8, Rank)],
        vocab: &Vocab,
        screen: bool,
    ) -> Backtrack {
        let ranks = tokens
            .iter()
            .map(|&(_, _, r)| r as usize + 1)
            .max()
            .unwrap_or(0);
        let bytes = |at: u32, len: u8| &arena[at as usize..at as usize + usize::from(len)];
        // Where several entries share bytes the table keeps one rank; the others are
        // not tokens as counting sees them.
        let mut by_rank: Vec<Option<(u32, u8)>> = vec![None; ranks];
        for &(at, len, r) in tokens {
            if vocab.get(bytes(at, len)) == Some(r) {
                by_rank[r as usize] = Some((at, len));
            }
        }
        let mut bt = Backtrack {
            tree: vec![0; ranks].into_boxed_slice(),
            shorter: vec![NONE; ranks].into_boxed_slice(),
            nodes: Box::new([]),
            chars3: vec![0; 1 << 16].into_boxed_slice(),
            char_steps: Box::new([]),
            char_step_filter: Box::new([]),
            merges: vec![0; ranks * 5 / 3 + 1].into_boxed_slice(),
            merge_filter: vec![0; 1 << (MERGE_FILTER_BITS - 6)].into_boxed_slice(),
            screen: None,
            screen_chars: Box::new([]),
            unmade: rustc_hash::FxHashSet::default(),
            unmade_lengths: 0,
        };
        // In rank order, so that the halves of a token are known before it: a token
        // is made by merging a prefix and a suffix made before it that stay as they
        // are until its own rank (then nothing else can merge first, and they merge).
        let mut reachable = vec![false; ranks];
        let mut banned: Vec<&[u8]> = Vec::new();
        for r in 0..ranks {
            let Some((at, len)) = by_rank[r] else {
                continue;
            };
            let unmade = (HALF << 20) | HALF | (u64::from(len) << LEN_SHIFT);
            bt.tree[r] = unmade;
            if len == 1 {
                reachable[r] = true;
                continue;
            }
            let t = bytes(at, len);
            let rank = r as Rank;
            let later = screen
                && (1..t.len()).any(|k| {
                    matches!(vocab.get(&t[..k]), Some(x) if k > 1 && x > rank)
                        || matches!(vocab.get(&t[k..]), Some(y) if t.len() - k > 1 && y > rank)
                });
            if later
                && let Some((x, y)) = merge_alone(t, vocab)
                && ((x > rank && by_rank[x as usize].is_some_and(|(_, l)| l > 1))
                    || (y > rank && by_rank[y as usize].is_some_and(|(_, l)| l > 1)))
            {
                // Made from a half made after it: the walk cannot tell when, so no piece
                // that holds these bytes is walked (see `screen`).
                banned.push(t);
                continue;
            }
            for k in 1..t.len() {
                let (Some(x), Some(y)) = (vocab.get(&t[..k]), vocab.get(&t[k..])) else {
                    continue;
                };
                if x < rank
                    && y < rank
                    && reachable[x as usize]
                    && reachable[y as usize]
                    && bt.compatible(x, y, rank + 1, rank)
                {
                    bt.tree[r] =
                        (unmade & !((HALF << 20) | HALF)) | (u64::from(y) << 20) | u64::from(x);
                    bt.add_merge(x, y, rank);
                    reachable[r] = true;
                    break;
                }
            }
        }
        for (t, _) in by_rank.iter().zip(&reachable).filter(|(_, made)| !**made) {
            if let Some((at, len)) = *t {
                bt.unmade_lengths |= 1 << len.min(63);
                bt.unmade.insert(bytes(at, len).into());
            }
        }
        let mut made: Vec<(u32, u8, Rank)> = by_rank
            .iter()
            .enumerate()
            .filter(|&(r, _)| reachable[r])
            .filter_map(|(r, t)| t.map(|(at, len)| (at, len, r as Rank)))
            .collect();
        made.sort_unstable_by(|a, b| bytes(a.0, a.1).cmp(bytes(b.0, b.1)));
        bt.build_trie(arena, &made);
        if !banned.is_empty() {
            let mut chars = vec![0u64; 1 << 10];
            for t in &banned {
                match std::str::from_utf8(t)
                    .ok()
                    .and_then(|t| t.chars().next_back())
                {
                    Some(c) if u32::from(c) <= 0xffff => set_bit(&mut chars, c as usize),
                    // Not a whole character, or beyond the plane: every piece is searched.
                    _ => chars.fill(!0),
                }
            }
            bt.screen_chars = chars.into_boxed_slice();
            bt.screen = aho_corasick::AhoCorasick::new(banned).ok();
            if bt.screen.is_none() {
                // Without a screen no piece can be walked safely: merge them all.
                return Backtrack::empty();
            }
        }
        bt
    }

    /// Records that `left` and `right` merge into `token`.
    fn add_merge(&mut self, left: Rank, right: Rank, token: Rank) {
        self.tree[left as usize] |= 1 << (SIG_LEFT_SHIFT + sig_bit(right));
        self.tree[right as usize] |= 1 << (SIG_RIGHT_SHIFT + sig_bit(left));
        let h = pair_hash(left, right);
        set_bit(
            &mut self.merge_filter,
            (h >> (64 - MERGE_FILTER_BITS)) as usize,
        );
        let mut i = home(self.merges.len(), h.rotate_left(32));
        while self.merges[i] != 0 {
            i = if i + 1 == self.merges.len() { 0 } else { i + 1 };
        }
        self.merges[i] =
            (1 << 63) | (u64::from(token) << 40) | (u64::from(right) << 20) | u64::from(left);
    }

    /// The token `left` and `right` (whose `tree` entries are `tl` and `tr`) merge
    /// into, if any.
    #[inline]
    fn merged(&self, left: Rank, right: Rank, tl: u64, tr: u64) -> Option<Rank> {
        if (tl >> (SIG_LEFT_SHIFT + sig_bit(right))) & (tr >> (SIG_RIGHT_SHIFT + sig_bit(left))) & 1
            == 0
        {
            return None;
        }
        let h = pair_hash(left, right);
        if !has_bit(&self.merge_filter, (h >> (64 - MERGE_FILTER_BITS)) as usize) {
            return None;
        }
        let want = (1 << 63) | (u64::from(right) << 20) | u64::from(left);
        let mut i = home(self.merges.len(), h.rotate_left(32));
        loop {
            let m = self.merges[i];
            if m == 0 {
                return None;
            }
            if m & !(HALF << 40) == want {
                return Some(((m >> 40) & HALF) as Rank);
            }
            i = if i + 1 == self.merges.len() { 0 } else { i + 1 };
        }
    }

    /// The trie of `sorted` (tokens in byte order), each node's children together and
    /// laid out depth first: the nodes below a node follow its children, so the walk
    /// down one Chinese character's tokens stays within a few cache lines instead of
    /// visiting a level of the whole trie at each step (breadth first, counting Chinese
    /// was 2-6% slower); and every token's next shorter prefix.
    fn build_trie(&mut self, arena: &[u8], sorted: &[(u32, u8, Rank)]) {
        let bytes = |i: usize| {
            let (at, len, _) = sorted[i];
            &arena[at as usize..at as usize + usize::from(len)]
        };
        // Stack entries: the node, its depth, the tokens below it (a range of `sorted`),
        // the deepest token above it.
        let mut nodes: Vec<u64> = vec![0];
        let mut stack = vec![(0usize, 0usize, 0, sorted.len(), NONE)];
        while let Some((node, depth, mut lo, hi, above)) = stack.pop() {
            let mut here = NONE;
            if lo < hi && bytes(lo).len() == depth {
                here = sorted[lo].2;
                if let Some(c) = char3_index(bytes(lo)) {
                    self.chars3[c] = node as u32;
                }
                self.shorter[here as usize] = above;
                lo += 1;
            }
            let first = nodes.len();
            let mut i = lo;
            while i < hi {
                let b = bytes(i)[depth];
                let mut j = i + 1;
                while j < hi && bytes(j)[depth] == b {
                    j += 1;
                }
                let child = nodes.len();
                nodes.push(u64::from(b) << NODE_LABEL_SHIFT);
                let deepest = if here == NONE { above } else { here };
                stack.push((child, depth + 1, i, j, deepest));
                i = j;
            }
            let count = (nodes.len() - first) as u64;
            let rank = if here == NONE {
                NODE_NO_RANK
            } else {
                u64::from(here)
            };
            nodes[node] |=
                ((first as u64) << NODE_FIRST_SHIFT) | (count << NODE_COUNT_SHIFT) | rank;
        }
        if nodes.len() > 1 << NODE_FIRST_BITS {
            // More nodes than an entry can point at (2^24; no supported vocabulary
            // comes near): no walk, every piece merges, which counts the same, only
            // slower.
            return;
        }
        self.nodes = nodes.into_boxed_slice();
        self.build_char_steps();
    }

    /// Fills [`Backtrack::char_steps`] and marks [`NODE_PART_BELOW`] from the trie.
    fn build_char_steps(&mut self) {
        let children = |nodes: &[u64], n: usize| node_children(nodes[n]);
        let holds_token = |e: u64| e & NODE_NO_RANK != NODE_NO_RANK;
        // Every node's mark first: the steps copy the entries of the nodes they reach.
        for p in 0..self.nodes.len() {
            let mut part_below = p == 0;
            for b in children(&self.nodes, p) {
                if (0xe0..=0xef).contains(&node_label(self.nodes[b])) {
                    part_below |= holds_token(self.nodes[b])
                        || children(&self.nodes, b).any(|c| {
                            (0x80..=0xbf).contains(&node_label(self.nodes[c]))
                                && holds_token(self.nodes[c])
                        });
                }
            }
            if part_below {
                self.nodes[p] |= NODE_PART_BELOW;
            }
        }
        let mut steps = Vec::new();
        for p in 0..self.nodes.len() {
            if self.nodes[p] & NODE_PART_BELOW != 0 {
                continue;
            }
            for b in children(&self.nodes, p) {
                let lead = node_label(self.nodes[b]);
                if !(0xe0..=0xef).contains(&lead) {
                    continue;
                }
                for c in children(&self.nodes, b) {
                    let second = node_label(self.nodes[c]);
                    if !(0x80..=0xbf).contains(&second) {
                        continue;
                    }
                    for x in children(&self.nodes, c) {
                        let third = node_label(self.nodes[x]);
                        if let Some(ch) = char3_index(&[lead, second, third]) {
                            let key = ((x as u64) << 40) | ((p as u64) << 16) | ch as u64;
                            steps.push([key, self.nodes[x]]);
                        }
                    }
                }
            }
        }
        // At most about 70% full: 16 bytes an entry, four to a cache line.
        let mut table = vec![[0u64; 2]; (steps.len() * 10 / 7 + 1).next_power_of_two()];
        let mut filter = vec![0u64; 1 << (CHAR_STEP_FILTER_BITS - 6)];
        for step in steps {
            let h = char_step_hash(step[0] & CHAR_STEP_KEY);
            set_bit(&mut filter, char_step_bit(h));
            let mut i = home(table.len(), h);
            while table[i][0] != 0 {
                i = (i + 1) & (table.len() - 1);
            }
            table[i] = step;
        }
        self.char_steps = table.into_boxed_slice();
        self.char_step_filter = filter.into_boxed_slice();
    }

    /// The node one whole character of three bytes (`ch`, by [`char3_index`]) below
    /// `node` (not the root, not marked [`NODE_PART_BELOW`]), if any, and its entry.
    #[inline]
    fn char_step(&self, node: usize, ch: usize) -> Option<(usize, u64)> {
        let key = ((node as u64) << 16) | ch as u64;
        let h = char_step_hash(key);
        if !has_bit(&self.char_step_filter, char_step_bit(h)) {
            return None;
        }
        let mask = self.char_steps.len() - 1;
        let mut i = home(self.char_steps.len(), h);
        loop {
            let [e, entry] = self.char_steps[i];
            if e == 0 {
                return None;
            }
            if e & CHAR_STEP_KEY == key {
                return Some(((e >> 40) as usize, entry));
            }
            i = (i + 1) & mask;
        }
    }

    /// The child along byte `b` of the node whose entry is `n`, if any, and its entry.
    #[inline]
    fn child(&self, n: u64, b: u8) -> Option<(usize, u64)> {
        let range = node_children(n);
        let first = range.start;
        let children = &self.nodes[range];
        let i = if children.len() <= 8 {
            children.iter().position(|&c| node_label(c) == b)
        } else {
            children.binary_search_by_key(&b, |&c| node_label(c)).ok()
        }?;
        Some((first + i, children[i]))
    }

    /// The longest token merging makes that `b` starts with (every byte is one).
    #[inline]
    fn longest(&self, b: &[u8]) -> Rank {
        let mut best = NONE;
        let (mut node, mut entry) = (0, self.nodes[0]);
        let mut i = 0;
        if let Some(c) = b.get(..3).and_then(char3_index) {
            let at = self.chars3[c] as usize;
            if at != 0 {
                (node, entry) = (at, self.nodes[at]);
                best = (entry & NODE_NO_RANK) as Rank;
                i = 3;
            }
        }
        while i < b.len() {
            let whole = if entry & NODE_PART_BELOW == 0 {
                b.get(i..i + 3).and_then(char3_index)
            } else {
                None
            };
            if let Some(ch) = whole {
                // No token ends inside this character: step over it whole.
                match self.char_step(node, ch) {
                    Some(next) => (node, entry) = next,
                    None => break,
                }
                i += 3;
            } else {
                match self.child(entry, b[i]) {
                    Some(next) => (node, entry) = next,
                    None => break,
                }
                i += 1;
            }
            let r = entry & NODE_NO_RANK;
            if r != NODE_NO_RANK {
                best = r as Rank;
            }
        }
        best
    }

    /// When the token of packed entry `t` and rank `r` is made: its rank, one more so
    /// that bytes (there from the start, whatever their rank) come first at 0.
    #[inline]
    fn birth(r: Rank, t: u64) -> u32 {
        if token_len(t) == 1 { 0 } else { r + 1 }
    }

    /// Whether merging the bytes of token `left` and token `right` alone leaves the
    /// two, before the part at the boundary on the left meets a merge of rank
    /// `hi_left - 1` or more, or the one on the right a merge above `hi_right - 1`;
    /// `u32::MAX` for both asks whether the two stay as they are.
    ///
    /// Before any merge crosses the boundary, each side merges as it would alone, so
    /// the part that ends the left side is, going back in time, `left`, its right half,
    /// that one's right half, and so on down to a byte (and likewise with left halves
    /// on the right). A merge across the boundary of those two parts happens, first,
    /// exactly when they are the halves of a token ranked after both were made and
    /// before either merges on: before the left part's next merge (which, being further
    /// left, goes first among equals) and no later than the right part's. The walk
    /// visits every pair of parts that are at the boundary together, newest first.
    #[inline]
    fn compatible(
        &self,
        mut left: Rank,
        mut right: Rank,
        mut hi_left: u32,
        mut hi_right: u32,
    ) -> bool {
        let (mut tl, mut tr) = (self.tree[left as usize], self.tree[right as usize]);
        loop {
            let (bl, br) = (Self::birth(left, tl), Self::birth(right, tr));
            if let Some(c) = self.merged(left, right, tl, tr) {
                let at = c + 1;
                if at > bl && at > br && at < hi_left && at <= hi_right {
                    return false;
                }
            }
            if bl == 0 && br == 0 {
                return true;
            }
            if bl > br {
                hi_left = bl;
                left = right_half(tl);
                tl = self.tree[left as usize];
            } else {
                hi_right = br;
                right = left_half(tr);
                tr = self.tree[right as usize];
            }
        }
    }

    /// Whether `piece` is a token the trie does not hold (one merging does not make).
    #[inline]
    pub(super) fn is_unmade(&self, piece: &[u8]) -> bool {
        self.unmade_lengths & (1 << piece.len().min(63)) != 0 && self.unmade.contains(piece)
    }

    /// How many tokens byte-pair merging leaves of `piece` (at most
    /// [`BACKTRACK_MAX_BYTES`] long), or `None` if the walk went wrong, which the
    /// argument above rules out (the caller then merges the piece the slow way).
    pub(super) fn count(&self, piece: &[u8]) -> Option<usize> {
        if let Some(screen) = &self.screen
            && self.may_hold_screened(piece)
            && screen.is_match(piece)
        {
            return None;
        }
        match piece.len() {
            0..=64 => self.count_in::<64>(piece),
            65..=BACKTRACK_MAX_BYTES => self.count_in::<BACKTRACK_MAX_BYTES>(piece),
            _ => None,
        }
    }

    /// Whether `piece` may hold a screened token: `false` only for a piece that starts
    /// beyond ASCII, is UTF-8 and holds none of [`Backtrack::screen_chars`].
    #[inline]
    fn may_hold_screened(&self, piece: &[u8]) -> bool {
        if piece.first().is_none_or(|&b| b < 0x80) {
            return true;
        }
        let mut i = 0;
        while i < piece.len() {
            // Beyond the plane, or not UTF-8 (the tests count byte strings): searched.
            let Some((c, len)) = bmp_char(piece, i) else {
                return true;
            };
            if has_bit(&self.screen_chars, c as usize) {
                return true;
            }
            i += len;
        }
        false
    }

    /// [`Backtrack::count`] of a piece of at most `N` bytes.
    #[inline]
    fn count_in<const N: usize>(&self, piece: &[u8]) -> Option<usize> {
        let n = piece.len();
        // The tokens taken so far, and the points known to lead nowhere: wherever the
        // walk arrives at a point, the token before it is the same (the merge of what
        // lies before is), so a point that led nowhere once always does.
        let mut stack = [0 as Rank; N];
        let mut depth = 0;
        let mut dead = [0u64; BACKTRACK_MAX_BYTES / 64 + 1];
        let mut pos = 0;
        let mut next = self.longest(piece);
        loop {
            let end = pos + token_len(self.tree[next as usize]);
            let fits = dead[end / 64] & (1 << (end % 64)) == 0
                && (depth == 0 || self.compatible(stack[depth - 1], next, u32::MAX, u32::MAX));
            if fits {
                stack[depth] = next;
                depth += 1;
                pos = end;
                if pos == n {
                    return Some(depth);
                }
                next = self.longest(&piece[pos..]);
                continue;
            }
            let mut shorter = self.shorter[next as usize];
            while shorter == NONE {
                // Nothing starting here fits after what is taken: no token starts here.
                dead[pos / 64] |= 1 << (pos % 64);
                if depth == 0 {
                    return None;
                }
                depth -= 1;
                let last = stack[depth];
                pos -= token_len(self.tree[last as usize]);
                shorter = self.shorter[last as usize];
            }
            next = shorter;
        }
    }

    /// Bytes this takes.
    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        self.tree.len() * 8
            + self.shorter.len() * 4
            + self.nodes.len() * 8
            + self.chars3.len() * 4
            + self.char_steps.len() * 16
            + self.char_step_filter.len() * 8
            + self.merges.len() * 8
            + self.merge_filter.len() * 8
            + self.screen_chars.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{Kind, generate};
    use crate::text::Encoding;
    use crate::text::testing::{gz, random_pieces, rank_map};

    /// Pieces cut from generated text that never repeats, at any byte (inside
    /// characters too), up to the longest piece the walk takes.
    fn text_pieces(kind: Kind, count: usize) -> Vec<Vec<u8>> {
        let text = generate(kind, 1 << 20, 7).unwrap().into_bytes();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        (0..count)
            .map(|_| {
                let len = 2 + rand(BACKTRACK_MAX_BYTES - 1);
                let at = rand(text.len() - len);
                text[at..at + len].to_vec()
            })
            .collect()
    }

    #[test]
    fn backtracking_equals_tiktoken_merge() {
        for e in Encoding::ALL {
            let name = e.name();
            let map = rank_map(gz(name));
            let walk = if e == Encoding::Qwen3_6 {
                Walk::Screened
            } else {
                Walk::Plain
            };
            let vocab = Vocab::from_tiktoken_gz("test", gz(name), walk).unwrap();
            vocab.prepare_walk();
            let mut pieces = random_pieces(&map, 20_000, BACKTRACK_MAX_BYTES);
            pieces.extend(text_pieces(Kind::Chinese, 3_000));
            pieces.extend(text_pieces(Kind::English, 1_000));
            pieces.extend(text_pieces(Kind::Code, 1_000));
            for run in ["a", " ", "中", "1", "ab", "-", "\n", "的的", "\u{3000}"] {
                pieces.push(run.repeat(BACKTRACK_MAX_BYTES / run.len()).into_bytes());
            }
            let walk = vocab.walk().unwrap();
            let mut screened = 0;
            for p in pieces {
                let merged = tiktoken_rs::byte_pair_split(&p, &map).len();
                match walk.count(&p) {
                    Some(n) => assert_eq!(n, merged, "{name} {p:?}"),
                    None => {
                        // Only pieces that hold a token made from a later half are
                        // left to the merge.
                        assert!(walk.screen.as_ref().unwrap().is_match(&p), "{name} {p:?}");
                        screened += 1;
                    }
                }
            }
            eprintln!("{name}: {screened} pieces screened out");
            assert_eq!(
                vocab
                    .walk()
                    .unwrap()
                    .count(&[b'x'; BACKTRACK_MAX_BYTES + 1]),
                None
            );
        }
    }

    /// The screen's characters pass over no piece that holds a screened token, and
    /// spare most Chinese pieces the search.
    #[test]
    fn pieces_the_screen_characters_pass_over_hold_no_screened_token() {
        let vocab = Vocab::from_tiktoken_gz("test", gz("qwen3_6"), Walk::Screened).unwrap();
        vocab.prepare_walk();
        let walk = vocab.walk().unwrap();
        let screen = walk.screen.as_ref().unwrap();
        let map = rank_map(gz("qwen3_6"));
        // Every token that holds a screened one, inside text of several scripts.
        let holding: Vec<&Vec<u8>> = map.keys().filter(|t| screen.is_match(t)).collect();
        assert!(holding.len() >= 27, "{}", holding.len());
        // Stretches of Chinese from one character to another, as pieces are.
        let text = generate(Kind::Chinese, 1 << 20, 7).unwrap();
        let starts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        let mut pieces: Vec<Vec<u8>> = (0..3_000)
            .map(|k| {
                let at = k * 7_919 % (starts.len() - 40);
                text.as_bytes()[starts[at]..starts[at + 1 + k % 30]].to_vec()
            })
            .collect();
        let chinese = pieces.len();
        pieces.extend(text_pieces(Kind::Chinese, 3_000));
        for t in &holding {
            for (before, after) in [
                ("", ""),
                ("中", "的"),
                ("，", "文"),
                ("é", ""),
                ("\u{3000}", "x"),
            ] {
                let mut p = before.as_bytes().to_vec();
                p.extend_from_slice(t);
                p.extend_from_slice(after.as_bytes());
                pieces.push(p);
            }
        }
        let mut passed_over = 0;
        for p in &pieces {
            if !walk.may_hold_screened(p) {
                passed_over += 1;
                assert!(!screen.is_match(p), "{p:?}");
            }
        }
        assert!(passed_over > chinese / 2, "{passed_over} of {chinese}");
    }

    /// The two parts whose merge gives `token` back when its bytes are merged alone,
    /// or `None` if merging them leaves more than one part: tiktoken's merge, slowly.
    fn last_merge<'a>(
        token: &'a [u8],
        map: &rustc_hash::FxHashMap<Vec<u8>, Rank>,
    ) -> Option<(&'a [u8], &'a [u8])> {
        let mut cuts: Vec<usize> = (0..=token.len()).collect();
        let mut last = None;
        loop {
            let best = (0..cuts.len() - 2)
                .filter_map(|i| map.get(&token[cuts[i]..cuts[i + 2]]).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else {
                return if cuts.len() == 2 { last } else { None };
            };
            last = Some((
                &token[cuts[i]..cuts[i + 1]],
                &token[cuts[i + 1]..cuts[i + 2]],
            ));
            cuts.remove(i + 1);
        }
    }

    /// Each token's merge is the one byte-pair merging of its bytes makes, and a token
    /// counts as made exactly when merging its bytes gives it back, for the encodings
    /// that backtrack; for the others (tokens made from a half ranked after them) the
    /// premise fails, which is why they merge.
    #[test]
    fn splits_are_the_merges() {
        for e in Encoding::ALL {
            let name = e.name();
            let map = rank_map(gz(name));
            let walk = if e == Encoding::Qwen3_6 {
                Walk::Screened
            } else {
                Walk::Plain
            };
            let vocab = Vocab::from_tiktoken_gz("test", gz(name), walk).unwrap();
            vocab.prepare_walk();
            let bt = vocab.walk().unwrap();
            let (mut unmade, mut wrong, mut later_half) = (0, 0, 0);
            let (mut screened_wrong, mut screened_later) = (0, 0);
            let screened = |t: &[u8]| bt.screen.as_ref().is_some_and(|s| s.is_match(t));
            for (token, &rank) in &map {
                if token.len() < 2 || vocab.get(token) != Some(rank) {
                    continue;
                }
                // A piece that is a token counts one, whether the walk holds it or
                // the vocabulary is asked.
                assert_eq!(
                    crate::text::bpe::piece_count(token, &vocab),
                    1,
                    "{name} {token:?}"
                );
                let t = bt.tree[rank as usize];
                let found = (left_half(t), right_half(t));
                match last_merge(token, &map) {
                    Some((a, b)) => {
                        let (x, y) = (map[a], map[b]);
                        let later = (a.len() > 1 && x > rank) || (b.len() > 1 && y > rank);
                        later_half += usize::from(later);
                        screened_later += usize::from(later && screened(token));
                        let w = (x, y) != found || bt.longest(token) != rank;
                        wrong += usize::from(w);
                        screened_wrong += usize::from(w && screened(token));
                    }
                    None => {
                        unmade += 1;
                        assert!(bt.is_unmade(token), "{name} {token:?}");
                        let w = found != (HALF as Rank, HALF as Rank) || bt.longest(token) == rank;
                        wrong += usize::from(w);
                        screened_wrong += usize::from(w && screened(token));
                    }
                }
            }
            eprintln!(
                "{name}: {unmade} tokens not made ({} held apart), {later_half} made from a later half, {wrong} wrong",
                bt.unmade.len()
            );
            // What the walk adds to the vocabulary's memory stays small next to the
            // gateway's (tens of MiB).
            let bytes = bt.heap_bytes();
            eprintln!("{name}: {:.1} MiB", bytes as f64 / (1 << 20) as f64);
            assert!(bytes < 16 << 20, "{name} {bytes}");
            if e != Encoding::Qwen3_6 {
                assert_eq!((later_half, wrong), (0, 0), "{name}");
                assert!(bt.screen.is_none(), "{name}");
            } else {
                // Every token made from a later half is screened, and every token the
                // walk got wrong holds one.
                assert!(later_half > 0 && wrong > 0, "{name}");
                assert_eq!(screened_wrong, wrong, "{name}");
                assert_eq!(screened_later, later_half, "{name}");
            }
        }
    }
}
