//! RFC 6962 Merkle trees and C2SP checkpoints, with no IO.
//!
//! Everything here is pure computation over bytes the caller already has, so the same
//! code serves the appender, the server answering proofs, and an offline auditor.
//!
//! - Hashing: [`leaf_hash`] is SHA-256(0x00 ‖ data) and [`node_hash`] is
//!   SHA-256(0x01 ‖ left ‖ right), the RFC 6962 domain separation that keeps a leaf from
//!   passing for an interior node.
//! - Proofs: [`inclusion_proof`] and [`consistency_proof`] are computed from any
//!   [`NodeSource`] of *perfect* subtree hashes, so a storage backend keeps only hashes
//!   that never change once written. [`verify_inclusion`] and [`verify_consistency`]
//!   follow RFC 9162 §2.1.3.2 and §2.1.4.2, and the proofs are in RFC 6962 order, so
//!   standard transparency-log tooling and this crate agree on every proof.
//! - Appending: [`Frontier`] keeps the right edge of the tree (one hash per set bit of
//!   the size), reports every perfect subtree as it completes, and gives the root in
//!   O(log n). [`MemoryTree`] keeps everything, for tests and small trees.
//! - Checkpoints: [`Checkpoint`] is the C2SP `tlog-checkpoint` text; [`NoteSigner`] and
//!   [`NoteVerifier`] make and check C2SP `signed-note`s with Ed25519, and
//!   [`open_checkpoint`] does both steps for a signed checkpoint.
//!
//! ```
//! use ciyuan_tlog::{
//!     Checkpoint, MemoryTree, NoteSigner, consistency_proof, inclusion_proof, leaf_hash,
//!     open_checkpoint, verify_consistency, verify_inclusion,
//! };
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut tree = MemoryTree::new();
//! for entry in [b"a".as_slice(), b"b", b"c"] {
//!     tree.push(leaf_hash(entry));
//! }
//!
//! // The log signs its tree head as a checkpoint...
//! let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
//! let signer = NoteSigner::new("example.com/log", key)?;
//! let checkpoint = Checkpoint {
//!     origin: "example.com/log".into(),
//!     size: tree.size(),
//!     root: tree.root(),
//!     extensions: vec![],
//! };
//! let note = signer.sign(&checkpoint.to_text())?;
//!
//! // ...and a client holding only the verifier key checks it and a proof against it.
//! let verifier = ciyuan_tlog::NoteVerifier::from_vkey(&signer.verifier_key())?;
//! let head = open_checkpoint(&verifier, &note, Some("example.com/log"))?;
//! let proof = inclusion_proof(&tree, 1, head.size)?;
//! verify_inclusion(&leaf_hash(b"b"), 1, head.size, &proof, &head.root)?;
//!
//! // Later, the log has grown; the client checks it only grew.
//! tree.push(leaf_hash(b"d"));
//! let proof = consistency_proof(&tree, head.size, tree.size())?;
//! verify_consistency(head.size, tree.size(), &head.root, &tree.root(), &proof)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod checkpoint;
mod frontier;
mod note;
mod proof;

pub use checkpoint::{Checkpoint, open_checkpoint};
pub use frontier::{Frontier, MemoryTree};
pub use note::{NoteError, NoteSigner, NoteVerifier};
pub use proof::{
    ProofError, VerifyError, consistency_proof, inclusion_proof, root, subtree_root,
    verify_consistency, verify_inclusion,
};

use sha2::{Digest, Sha256};

/// A SHA-256 hash: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// The root of the empty tree, which RFC 6962 defines as SHA-256 of the empty string.
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// The RFC 6962 hash of one entry: SHA-256(0x00 ‖ data).
#[inline]
pub fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0x00])
        .chain_update(data)
        .finalize()
        .into()
}

/// The RFC 6962 hash of an interior node: SHA-256(0x01 ‖ left ‖ right).
#[inline]
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new()
        .chain_update([0x01])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// Where proofs and roots get their hashes.
///
/// The perfect subtree at `level` (0 = leaves) with `index` covers leaves
/// `[index << level, (index + 1) << level)`. Backends store only such subtrees because
/// their hashes never change as the tree grows; every other hash a proof needs is
/// computed from them. Callers only ask for subtrees that lie wholly inside the tree
/// size they are proving against.
pub trait NodeSource {
    /// Why a node could not be read.
    type Error;
    /// The hash of the perfect subtree at `level` with `index`.
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}
