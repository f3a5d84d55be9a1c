//! Byte-pair merging: how many tokens a piece leaves (tiktoken's merge, on the
//! stack for short pieces, with a heap for long ones).

use super::Rank;
use super::vocab::{RANK_BITS, Vocab};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Tokens of one piece: one if it is a token, else what byte-pair merging leaves (as
/// tiktoken's `encode`).
pub(super) fn piece_count(b: &[u8], ranks: &Vocab) -> usize {
    match ranks.walk() {
        // A piece that is a token the walk holds is counted one by the walk's first
        // step, one it leaves out by its own small set: the vocabulary is not asked (a
        // look-up of a long Chinese clause that is never a token was 6% of counting
        // Chinese). The walk cannot go wrong (see `backtrack`); if it did, the merge
        // still counts.
        Some(walk) if backtracks(b) => {
            if walk.is_unmade(b) {
                1
            } else {
                walk.count(b).unwrap_or_else(|| whole_or_merged(b, ranks))
            }
        }
        _ => whole_or_merged(b, ranks),
    }
}

/// One if `b` is a token, else how many its merge leaves.
fn whole_or_merged(b: &[u8], ranks: &Vocab) -> usize {
    if ranks.contains(b) {
        1
    } else {
        merge_count(b, ranks)
    }
}

/// Whether `piece` is counted by backtracking ([`super::backtrack`]) rather than by
/// merging: long pieces, and shorter ones that end outside ASCII (Chinese words of
/// two to five characters). Short ASCII pieces (most of English and code) merge in
/// fewer instructions than the walk takes (cachegrind, `o200k_base`, per MiB of text
/// that never repeats, pieces from 16 bytes on walked: code 223 M as before, Chinese
/// 200 M; from 8 bytes on: code 231 M, Chinese 193 M).
#[inline]
pub(super) fn backtracks(piece: &[u8]) -> bool {
    piece.len() >= 16 || (piece.len() >= 6 && piece[piece.len() - 1] >= 0x80)
}

/// Pieces shorter than this are merged by rescanning after every merge, longer ones
/// with a heap. tiktoken cuts over at 100 bytes; measured on Chinese that never
/// repeats (clauses of 10 to 40 characters, 30 to 120 bytes, one piece each), the heap
/// already costs fewer instructions from about 24 bytes on (cachegrind: 13% fewer for
/// the whole count).
pub(super) const HEAP_MERGE_MIN_BYTES: usize = 24;

/// How many tokens byte-pair merging leaves of `piece`: the lowest-ranked adjacent pair
/// first, the leftmost among equals, until no pair is a token.
///
/// Short pieces are merged as tiktoken's `_byte_pair_merge` does (every part's rank of
/// merging with the next kept in a list that is rescanned after each merge), on the
/// stack. Rescanning is quadratic in the piece's length (DeepSeek's pre-tokenizer
/// leaves runs of one character of thousands of bytes as one piece), so long pieces
/// are merged with a heap of candidate merges, as tiktoken's `_byte_pair_merge_large`
/// does. Both give tiktoken's merge sequence, checked against `tiktoken-rs`'s
/// `byte_pair_split` by `merge_equals_tiktoken_merge` and
/// `heap_merge_equals_tiktoken_merge`.
pub(super) fn merge_count(piece: &[u8], ranks: &Vocab) -> usize {
    let n = piece.len();
    if n < 2 {
        return n;
    }
    if n >= HEAP_MERGE_MIN_BYTES {
        return heap_merge_count(piece, ranks);
    }
    let rank = |from: u8, to: u8| {
        ranks
            .get(&piece[usize::from(from)..usize::from(to)])
            .unwrap_or(Rank::MAX)
    };
    // parts[i]: where part i starts and the rank of merging it with part i + 1; the
    // last entry only marks the end.
    let mut parts = [(0u8, Rank::MAX); HEAP_MERGE_MIN_BYTES];
    for i in 0..n - 1 {
        parts[i] = (i as u8, ranks.pair(piece[i], piece[i + 1]));
    }
    parts[n - 1] = (n as u8 - 1, Rank::MAX);
    parts[n] = (n as u8, Rank::MAX);
    let mut len = n + 1;
    loop {
        let (mut min, mut at) = (Rank::MAX, 0);
        for (i, &(_, r)) in parts[..len - 1].iter().enumerate() {
            if r < min {
                (min, at) = (r, i);
            }
        }
        if min == Rank::MAX {
            return len - 1;
        }
        // Part at + 1 joins part at.
        parts.copy_within(at + 2..len, at + 1);
        len -= 1;
        parts[at].1 = if at + 2 < len {
            rank(parts[at].0, parts[at + 2].0)
        } else {
            Rank::MAX
        };
        if at > 0 {
            parts[at - 1].1 = rank(parts[at - 1].0, parts[at + 1].0);
        }
    }
}

/// [`merge_count`] for long pieces, with a heap of candidate merges.
pub(super) fn heap_merge_count(piece: &[u8], ranks: &Vocab) -> usize {
    let n = piece.len();

    // For the part that starts at byte i: where it ends, where the part before it
    // starts, and the rank of merging it with the part after it.
    let mut end: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut next_rank = vec![Rank::MAX; n];
    // Candidate merges as one integer each, rank above position, so that the least is
    // the lowest rank and, among equals, the leftmost; ranks take at most RANK_BITS,
    // positions the other 44 (pieces of up to 16 TiB).
    const AT_BITS: u32 = 64 - RANK_BITS;
    let key = |r: Rank, at: usize| Reverse((u64::from(r) << AT_BITS) | at as u64);
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        let r = ranks.pair(piece[i], piece[i + 1]);
        if r != Rank::MAX {
            next_rank[i] = r;
            heap.push(key(r, i));
        }
    }
    let mut parts = n;
    while let Some(Reverse(k)) = heap.pop() {
        let (r, left) = ((k >> AT_BITS) as Rank, (k & ((1 << AT_BITS) - 1)) as usize);
        if r != next_rank[left] {
            continue; // outdated: one of the two parts has merged since
        }
        let right = end[left];
        let right_end = end[right];
        end[left] = right_end;
        next_rank[right] = Rank::MAX;
        parts -= 1;
        next_rank[left] = Rank::MAX;
        if right_end < n {
            prev[right_end] = left;
            if let Some(r) = ranks.get(&piece[left..end[right_end]]) {
                next_rank[left] = r;
                heap.push(key(r, left));
            }
        }
        if left > 0 {
            let p = prev[left];
            next_rank[p] = Rank::MAX;
            if let Some(r) = ranks.get(&piece[p..right_end]) {
                next_rank[p] = r;
                heap.push(key(r, p));
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::deepseek::deepseek;
    use crate::text::testing::{gz, random_pieces, rank_map};

    #[test]
    fn merge_equals_tiktoken_merge() {
        for name in ["o200k_base", "cl100k_base", "qwen"] {
            let map = rank_map(gz(name));
            let vocab =
                Vocab::from_tiktoken_gz("test", gz(name), crate::text::vocab::Walk::Never).unwrap();
            for p in random_pieces(&map, 20_000, 2 * HEAP_MERGE_MIN_BYTES) {
                assert_eq!(
                    merge_count(&p, &vocab),
                    tiktoken_rs::byte_pair_split(&p, &map).len(),
                    "{name} {p:?}"
                );
            }
        }
    }

    #[test]
    fn heap_merge_equals_tiktoken_merge() {
        let ranks = &deepseek().unwrap().ranks;
        let map = rank_map(gz("deepseek_v4"));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let alphabets: [&[&str]; 4] = [
            &["a", "b", "ab", " "],
            &["中", "文", "a", "1"],
            &["e", "r", "t", "h", " ", "\n", "th", "er"],
            &["x", "y", "z", "é", "!", "-", "="],
        ];
        for round in 0..200 {
            let alphabet = alphabets[round % alphabets.len()];
            let len = HEAP_MERGE_MIN_BYTES + rand(1500);
            let mut s = String::new();
            while s.len() < len {
                s.push_str(alphabet[rand(alphabet.len())]);
            }
            let b = s.as_bytes();
            assert_eq!(
                merge_count(b, ranks),
                tiktoken_rs::byte_pair_split(b, &map).len(),
                "{s:?}"
            );
        }
        for run in ["a", " ", "中", "1", "ab", "-", "\n"] {
            let s = run.repeat(3000 / run.len());
            let b = s.as_bytes();
            assert_eq!(
                merge_count(b, ranks),
                tiktoken_rs::byte_pair_split(b, &map).len(),
                "{run:?}"
            );
        }
    }
}
