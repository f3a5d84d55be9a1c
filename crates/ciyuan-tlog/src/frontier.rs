//! Appending: the right edge of a growing tree, and a whole tree in memory.

use crate::{EMPTY_ROOT, Hash, NodeSource, node_hash, root};
use std::convert::Infallible;

/// Compact range of the right edge: lets an appender compute the root in O(log n) and
/// learn each perfect subtree as it completes, so a backend can store those it keeps.
///
/// It holds the roots of the maximal perfect subtrees that make up the tree, largest
/// (leftmost) first: one hash per set bit of the size, so at most 64.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    edge: Vec<Hash>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// Number of leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; calls `on_node(level, index, hash)` for every perfect subtree
    /// completed by this leaf, level 0 (the leaf itself) included, in increasing level.
    ///
    /// Amortised cost is one node hash per leaf, and nothing is allocated once the edge
    /// has grown to the height of the tree.
    #[inline]
    pub fn push(&mut self, leaf: Hash, mut on_node: impl FnMut(u32, u64, &Hash)) {
        on_node(0, self.size, &leaf);
        let mut hash = leaf;
        let mut level = 0;
        let mut index = self.size;
        // Each trailing one bit of the old size is a perfect subtree, on the edge, of the
        // same height as the one the new leaf just completed: the two merge.
        while index & 1 == 1 {
            let Some(left) = self.edge.pop() else { break };
            hash = node_hash(&left, &hash);
            level += 1;
            index >>= 1;
            on_node(level, index, &hash);
        }
        self.edge.push(hash);
        self.size += 1;
    }

    /// The maximal perfect subtrees the tree is made of, largest (leftmost) first, as
    /// `(level, index, hash)`: the nodes a consistency proof from this size takes from
    /// the old tree are among them, so a verifier streaming the leaves can take them
    /// here instead of remembering every node.
    pub fn nodes(&self) -> impl Iterator<Item = (u32, u64, Hash)> + '_ {
        let size = self.size;
        let mut start = 0u64;
        (0..u64::BITS)
            .rev()
            .filter(move |level| size & (1u64 << level) != 0)
            .zip(self.edge.iter())
            .map(move |(level, hash)| {
                let index = start >> level;
                start += 1u64 << level;
                (level, index, *hash)
            })
    }

    /// The root hash of the tree so far; [`EMPTY_ROOT`] when there are no leaves.
    pub fn root(&self) -> Hash {
        let mut it = self.edge.iter().rev();
        let Some(last) = it.next() else {
            return EMPTY_ROOT;
        };
        // RFC 6962 splits at the largest power of two, so the tree is the edge's
        // subtrees joined right to left.
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }

    /// Rebuilds the frontier of a tree of `size` leaves from its stored perfect nodes:
    /// one read per set bit of `size`.
    pub fn from_source<S: NodeSource>(src: &S, size: u64) -> Result<Frontier, S::Error> {
        let mut edge = Vec::with_capacity(size.count_ones() as usize);
        let mut start = 0u64;
        for level in (0..u64::BITS).rev() {
            let width = 1u64 << level;
            if size & width != 0 {
                edge.push(src.node(level, start >> level)?);
                start += width;
            }
        }
        Ok(Frontier { size, edge })
    }
}

/// All leaf hashes in memory plus every completed perfect node; for tests, bundles and
/// small trees.
///
/// As a [`NodeSource`] it cannot fail. Asking it for a subtree that is not complete
/// breaks the [`NodeSource`] contract; the answer is then the all-zero hash, so a proof
/// made from it fails to verify instead of the program stopping.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    frontier: Frontier,
    /// `levels[l][i]` is the perfect subtree at level `l`, index `i`.
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    /// The empty tree.
    pub fn new() -> MemoryTree {
        MemoryTree::default()
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let levels = &mut self.levels;
        self.frontier.push(leaf, |level, _, hash| {
            let l = level as usize;
            if levels.len() <= l {
                levels.push(Vec::new());
            }
            levels[l].push(*hash);
        });
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    /// The current root.
    pub fn root(&self) -> Hash {
        self.frontier.root()
    }

    /// The root of the tree of the first `size` leaves, or `None` when the tree is
    /// smaller than that.
    pub fn root_at(&self, size: u64) -> Option<Hash> {
        if size > self.size() {
            return None;
        }
        match root(self, size) {
            Ok(h) => Some(h),
            Err(never) => match never {},
        }
    }

    /// The leaf hash at `index`, if there is one.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.get(0, index)
    }

    fn get(&self, level: u32, index: u64) -> Option<Hash> {
        let level = self.levels.get(usize::try_from(level).ok()?)?;
        level.get(usize::try_from(index).ok()?).copied()
    }
}

impl NodeSource for MemoryTree {
    type Error = Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Infallible> {
        Ok(self.get(level, index).unwrap_or([0; 32]))
    }
}
