//! The nodes a consistency proof takes from the old tree are the old tree's frontier:
//! a verifier that streams leaves keeps only those, not every node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_tlog::{Frontier, Hash, MemoryTree, NodeSource, consistency_proof, leaf_hash};
use std::cell::RefCell;

struct Recorder(RefCell<Vec<(u32, u64)>>);

impl NodeSource for Recorder {
    type Error = std::convert::Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        self.0.borrow_mut().push((level, index));
        Ok([0; 32])
    }
}

#[test]
fn old_tree_nodes_of_consistency_proofs_are_frontier_nodes() {
    let leaves: Vec<Hash> = (0..140u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
    let mut tree = MemoryTree::new();
    for l in &leaves {
        tree.push(*l);
    }
    let mut frontier = Frontier::new();
    for m in 1..=100u64 {
        frontier.push(leaves[m as usize - 1], |_, _, _| {});
        let edge: Vec<(u32, u64, Hash)> = frontier.nodes().collect();
        assert_eq!(edge.len() as u32, m.count_ones());
        for &(level, index, hash) in &edge {
            assert_eq!(
                tree.node(level, index).unwrap(),
                hash,
                "node {level}/{index} at {m}"
            );
        }
        for n in m + 1..=140 {
            let rec = Recorder(RefCell::new(Vec::new()));
            consistency_proof(&rec, m, n).unwrap();
            for (level, index) in rec.0.into_inner() {
                if (index + 1) << level <= m {
                    assert!(
                        edge.iter().any(|e| (e.0, e.1) == (level, index)),
                        "proof {m}->{n} takes {level}/{index}, not on the frontier of {m}"
                    );
                }
            }
        }
    }
}
