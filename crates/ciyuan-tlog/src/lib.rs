//! RFC 6962 Merkle trees and C2SP checkpoints, with no IO.
//!
//! - Hashing: [`leaf_hash`] = SHA-256(0x00 ‖ data), [`node_hash`] = SHA-256(0x01 ‖ l ‖ r).
//! - Proofs: [`inclusion_proof`] and [`consistency_proof`] are computed from any
//!   [`NodeSource`] of *perfect* subtree hashes, so a backend keeps only what it can serve
//!   cheaply; [`verify_inclusion`] and [`verify_consistency`] follow RFC 9162 §2.1.3.2 and
//!   §2.1.4.2, so standard transparency-log tooling agrees with them.
//! - Appending: [`Frontier`] keeps the right edge of the tree (one hash per set bit of
//!   the size), reports every perfect subtree as it completes, and gives the root.
//! - Checkpoints: [`Checkpoint`] is the C2SP `tlog-checkpoint` text; [`NoteSigner`] and
//!   [`NoteVerifier`] make and check C2SP `signed-note`s with Ed25519.
//!
//! ```
//! use ciyuan_tlog::{MemoryTree, leaf_hash, inclusion_proof, verify_inclusion};
//! let mut tree = MemoryTree::new();
//! for e in [b"a".as_slice(), b"b", b"c"] {
//!     tree.push(leaf_hash(e));
//! }
//! let proof = inclusion_proof(&tree, 1, 3).unwrap();
//! verify_inclusion(&leaf_hash(b"b"), 1, 3, &proof, &tree.root()).unwrap();
//! ```
#![deny(missing_docs)]

mod note;
mod proof;

pub use note::{Checkpoint, NoteError, NoteSigner, NoteVerifier, open_checkpoint};
pub use proof::{
    ProofError, VerifyError, consistency_proof, inclusion_proof, root, subtree_root,
    verify_consistency, verify_inclusion,
};

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of the empty string.
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// RFC 6962 leaf hash: SHA-256(0x00 ‖ data).
#[inline]
pub fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(data)
        .finalize()
        .into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 ‖ left ‖ right).
#[inline]
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 65];
    buf[0] = 1;
    buf[1..33].copy_from_slice(left);
    buf[33..].copy_from_slice(right);
    Sha256::digest(buf).into()
}

/// Where proofs get their hashes: the perfect subtree at `level` (0 = leaves) with
/// `index` covers leaves `[index << level, (index + 1) << level)`. Callers only ask for
/// subtrees that lie wholly inside the tree they prove against.
pub trait NodeSource {
    /// Why a node could not be read.
    type Error;
    /// The hash of one perfect subtree.
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// The right edge of an append-only tree: the roots of its maximal perfect subtrees,
/// largest first, one per set bit of the size.
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

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash. `on_node(level, index, hash)` is called for the leaf (level 0)
    /// and then for every perfect subtree this leaf completes, in increasing level.
    #[inline]
    pub fn push(&mut self, leaf: Hash, mut on_node: impl FnMut(u32, u64, &Hash)) {
        on_node(0, self.size, &leaf);
        let mut hash = leaf;
        let mut level = 0;
        let mut index = self.size;
        // Each trailing one bit of the old size is a perfect subtree of that level that the
        // new leaf's subtree now pairs with.
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

    /// The root hash of the tree so far.
    pub fn root(&self) -> Hash {
        let mut it = self.edge.iter().rev();
        let Some(last) = it.next() else {
            return EMPTY_ROOT;
        };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }

    /// Rebuilds the frontier of a tree of `size` leaves from its stored perfect nodes.
    pub fn from_source<S: NodeSource>(src: &S, size: u64) -> Result<Frontier, S::Error> {
        let mut edge = Vec::with_capacity(size.count_ones() as usize);
        let mut start = 0u64;
        for level in (0..64u32).rev() {
            if size & (1u64 << level) != 0 {
                edge.push(src.node(level, start >> level)?);
                start += 1u64 << level;
            }
        }
        Ok(Frontier { size, edge })
    }
}

/// A node a [`MemoryTree`] does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no perfect subtree at level {level}, index {index}")]
pub struct MissingNode {
    /// Level asked for.
    pub level: u32,
    /// Index asked for.
    pub index: u64,
}

/// A tree kept wholly in memory, every perfect subtree included: for tests, bundles and
/// small logs.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    frontier: Frontier,
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
}

impl NodeSource for MemoryTree {
    type Error = MissingNode;
    fn node(&self, level: u32, index: u64) -> Result<Hash, MissingNode> {
        self.levels
            .get(level as usize)
            .and_then(|l| l.get(usize::try_from(index).ok()?))
            .copied()
            .ok_or(MissingNode { level, index })
    }
}

#[cfg(test)]
mod tests;
