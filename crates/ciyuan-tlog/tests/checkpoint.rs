//! C2SP tlog-checkpoint texts: the exact format, strict parsing, and signed checkpoints.

// Helpers outside #[test] functions are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_tlog::{Checkpoint, EMPTY_ROOT, Hash, NoteError, NoteSigner, open_checkpoint};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

/// The 8-leaf root of the RFC 6962 reference data set (see tests/vectors.rs), in base64.
const ROOT_B64: &str = "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=";

fn root8() -> Hash {
    hex::decode("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
        .unwrap()
        .try_into()
        .unwrap()
}

fn checkpoint() -> Checkpoint {
    Checkpoint {
        origin: "example.com/log".into(),
        size: 8,
        root: root8(),
        extensions: vec![],
    }
}

fn signer(name: &str) -> NoteSigner {
    NoteSigner::new(name, SigningKey::from_bytes(&[9; 32])).unwrap()
}

#[test]
fn text_format() {
    let mut c = checkpoint();
    assert_eq!(c.to_text(), format!("example.com/log\n8\n{ROOT_B64}\n"));
    c.extensions = vec!["ext one".into(), "— two".into()];
    let text = format!("example.com/log\n8\n{ROOT_B64}\next one\n— two\n");
    assert_eq!(c.to_text(), text);
    assert_eq!(Checkpoint::parse(&text).unwrap(), c);

    let empty = Checkpoint {
        origin: "o".into(),
        size: 0,
        root: EMPTY_ROOT,
        extensions: vec![],
    };
    let text = "o\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n";
    assert_eq!(empty.to_text(), text);
    assert_eq!(Checkpoint::parse(text).unwrap(), empty);
    // Clients must not assume anything of the origin beyond its being non-empty.
    let odd = "a log with spaces+plus\n18446744073709551615\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n";
    let c = Checkpoint::parse(odd).unwrap();
    assert_eq!(
        (c.origin.as_str(), c.size),
        ("a log with spaces+plus", u64::MAX)
    );
}

#[test]
fn parse_errors() {
    let with_size = |s: &str| format!("example.com/log\n{s}\n{ROOT_B64}\n");
    let with_root = |r: &str| format!("example.com/log\n8\n{r}\n");
    let cases = [
        (
            format!("example.com/log\n8\n{ROOT_B64}"),
            "the text does not end in a newline",
        ),
        (String::new(), "the text does not end in a newline"),
        (format!("\n8\n{ROOT_B64}\n"), "the origin line is empty"),
        ("example.com/log\n".into(), "there is no tree size line"),
        ("example.com/log\n8\n".into(), "there is no root hash line"),
        (
            with_size("08"),
            "the tree size \"08\" is not a decimal number without leading zeros",
        ),
        (
            with_size("00"),
            "the tree size \"00\" is not a decimal number without leading zeros",
        ),
        (
            with_size(""),
            "the tree size \"\" is not a decimal number without leading zeros",
        ),
        (
            with_size("+8"),
            "the tree size \"+8\" is not a decimal number without leading zeros",
        ),
        (
            with_size("-1"),
            "the tree size \"-1\" is not a decimal number without leading zeros",
        ),
        (
            with_size(" 8"),
            "the tree size \" 8\" is not a decimal number without leading zeros",
        ),
        (
            with_size("0x8"),
            "the tree size \"0x8\" is not a decimal number without leading zeros",
        ),
        (
            with_size("８"),
            "the tree size \"８\" is not a decimal number without leading zeros",
        ),
        (
            with_size("18446744073709551616"),
            "the tree size \"18446744073709551616\" does not fit in 64 bits",
        ),
        (
            with_root("XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg"),
            "the root hash \"XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg\" is not canonical standard base64",
        ),
        (
            with_root("XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyh="),
            "the root hash \"XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyh=\" is not canonical standard base64",
        ),
        (
            with_root("XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz-Nw7_RgQyg="),
            "the root hash \"XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz-Nw7_RgQyg=\" is not canonical standard base64",
        ),
        (
            with_root(&format!(" {ROOT_B64}")),
            "the root hash \" XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\" is not canonical standard base64",
        ),
        (
            with_root(&"A".repeat(101)),
            "the root hash \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"… is not canonical standard base64",
        ),
        (
            with_root("XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQw=="),
            "the root hash is 31 bytes, not 32",
        ),
        (
            with_root("XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQygA"),
            "the root hash is 33 bytes, not 32",
        ),
        (with_root(""), "the root hash is 0 bytes, not 32"),
        (
            format!("example.com/log\n8\n{ROOT_B64}\n\nx\n"),
            "extension line 1 is empty",
        ),
        (
            format!("example.com/log\n8\n{ROOT_B64}\nx\n\n"),
            "extension line 2 is empty",
        ),
        (
            format!("example.com/log\r\n8\n{ROOT_B64}\n"),
            "it contains the control character '\\r'",
        ),
        (
            format!("example.com/log\n8\n{ROOT_B64}\na\tb\n"),
            "it contains the control character '\\t'",
        ),
    ];
    for (text, why) in cases {
        assert_eq!(
            Checkpoint::parse(&text),
            Err(NoteError::MalformedCheckpoint(why.into())),
            "{text:?}"
        );
        assert_eq!(
            Checkpoint::parse(&text).unwrap_err().to_string(),
            format!("malformed checkpoint: {why}")
        );
    }
}

#[test]
fn signed_checkpoints() {
    let c = checkpoint();
    let s = signer("example.com/log");
    let note = s.sign(&c.to_text()).unwrap();
    let v = s.verifier();
    assert_eq!(open_checkpoint(&v, &note, None).unwrap(), c);
    assert_eq!(
        open_checkpoint(&v, &note, Some("example.com/log")).unwrap(),
        c
    );
    let wrong = open_checkpoint(&v, &note, Some("example.com/other")).unwrap_err();
    assert_eq!(
        wrong,
        NoteError::WrongOrigin {
            expected: "example.com/other".into(),
            found: "example.com/log".into()
        }
    );
    assert_eq!(
        wrong.to_string(),
        "checkpoint origin \"example.com/log\" is not the expected \"example.com/other\""
    );

    // Signed by another key.
    let other = signer("example.com/other").verifier();
    assert!(matches!(
        open_checkpoint(&other, &note, None),
        Err(NoteError::NotSigned { .. })
    ));
    // A validly signed note whose text is no checkpoint.
    let not_a_checkpoint = s.sign("hello\n").unwrap();
    assert_eq!(
        open_checkpoint(&v, &not_a_checkpoint, None),
        Err(NoteError::MalformedCheckpoint(
            "there is no tree size line".into()
        ))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn text_round_trips(
        origin in "[^\\x00-\\x1f]{1,40}",
        size in any::<u64>(),
        root in any::<[u8; 32]>(),
        extensions in prop::collection::vec("[^\\x00-\\x1f]{1,20}", 0..4),
    ) {
        let c = Checkpoint { origin, size, root, extensions };
        let text = c.to_text();
        prop_assert_eq!(Checkpoint::parse(&text).unwrap(), c.clone());
        let s = signer("log.example");
        let note = s.sign(&text).unwrap();
        prop_assert_eq!(open_checkpoint(&s.verifier(), &note, Some(&c.origin)).unwrap(), c);
    }

    /// Strictness makes the text canonical: a checkpoint text with any one character
    /// replaced or inserted either fails to parse or prints back exactly as it was.
    #[test]
    fn parsed_text_is_canonical(
        size in any::<u64>(),
        root in any::<[u8; 32]>(),
        at in any::<prop::sample::Index>(),
        ch in "[0-9a-zA-Z+/=\n ]",
        insert in any::<bool>(),
    ) {
        let text = Checkpoint { origin: "o".into(), size, root, extensions: vec![] }.to_text();
        let i = at.index(text.len());
        let rest = if insert { &text[i..] } else { &text[i + 1..] };
        let edited = format!("{}{ch}{rest}", &text[..i]);
        if let Ok(c) = Checkpoint::parse(&edited) {
            prop_assert_eq!(c.to_text(), edited);
        }
    }
}
