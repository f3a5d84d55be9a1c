//! C2SP signed notes: known-answer vectors from the Go reference implementation, round
//! trips with random keys, and tampering.

// Helpers outside #[test] functions are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ciyuan_tlog::{NoteError, NoteSigner, NoteVerifier, open_checkpoint};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

// The example keys and notes of the Go reference implementation: repository golang/mod,
// sumdb/note/note.go (package documentation) and note_test.go (TestSign, TestOpen,
// TestNewVerifier). The signer key there is "PRIVATE+KEY+PeterNeumann+c74f20a3+"
// followed by GO_SKEY, the base64 of the algorithm byte and the Ed25519 seed.
const GO_SKEY: &str = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
const TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                    then you don't know what your problem is.\n";
const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

// The Go checksum database's verifier key, as golang/go hard-codes it in
// src/cmd/go/internal/modfetch/key.go; its base64 contains '+', which the parser must
// not take for a separator. The note is a signed tree head that database published, a
// checkpoint with origin "go.sum database tree"; only the key's holder could have made
// a signature that verifies under that key.
const SUMDB_VKEY: &str = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8";
const SUMDB_NOTE: &str = "go.sum database tree\n63512409\nF7eHRPqN/cqPtqti14NKdGGaI1Giw8coWP3KxihFZbg=\n\n\u{2014} sum.golang.org Az3gri1OBHKT87Xj8UXU8zjoHGy/X+7Nl94f8TZkELVaasolmGApUsWqwVG9vE6hgqYb/ph/w2vdkLIVRH7bMB/FPQ4=\n";

fn peter_signer() -> NoteSigner {
    let raw = B64.decode(GO_SKEY).unwrap();
    assert_eq!(raw[0], 1, "Ed25519");
    let seed: [u8; 32] = raw[1..].try_into().unwrap();
    NoteSigner::new("PeterNeumann", SigningKey::from_bytes(&seed)).unwrap()
}

fn note(sigs: &[&str]) -> String {
    format!("{TEXT}\n{}", sigs.concat())
}

fn malformed(r: Result<&str, NoteError>) -> String {
    match r {
        Err(NoteError::MalformedNote(why)) => why,
        other => panic!("expected a malformed note, got {other:?}"),
    }
}

#[test]
fn signing_reproduces_the_go_example() {
    let s = peter_signer();
    assert_eq!(s.name(), "PeterNeumann");
    assert_eq!(s.key_id(), 0xc74f20a3);
    assert_eq!(s.verifier_key(), PETER_VKEY);
    // Ed25519 signatures are deterministic, so the note must match byte for byte.
    assert_eq!(s.sign(TEXT).unwrap(), note(&[PETER_SIG]));
    assert_eq!(format!("{s:?}"), "NoteSigner(PeterNeumann+c74f20a3)");
}

#[test]
fn verifying_the_go_examples() {
    let peter = NoteVerifier::from_vkey(PETER_VKEY).unwrap();
    let enoch = NoteVerifier::from_vkey(ENOCH_VKEY).unwrap();
    assert_eq!(peter, peter_signer().verifier());
    assert_eq!((peter.name(), peter.key_id()), ("PeterNeumann", 0xc74f20a3));
    assert_eq!((enoch.name(), enoch.key_id()), ("EnochRoot", 0xaf0cfe78));
    assert_eq!(peter.verifier_key(), PETER_VKEY);
    assert_eq!(enoch.verifier_key(), ENOCH_VKEY);

    // Each key finds its own signature and ignores the other's.
    let both = note(&[PETER_SIG, ENOCH_SIG]);
    assert_eq!(peter.verify(&both).unwrap(), TEXT);
    assert_eq!(enoch.verify(&both).unwrap(), TEXT);
    assert_eq!(enoch.verify(&note(&[ENOCH_SIG])).unwrap(), TEXT);
    assert_eq!(
        enoch.verify(&note(&[PETER_SIG])),
        Err(NoteError::NotSigned {
            name: "EnochRoot".into(),
            key_id: 0xaf0cfe78
        })
    );
    // Repeated signatures are fine.
    let twice = note(&[PETER_SIG, PETER_SIG, ENOCH_SIG, ENOCH_SIG]);
    assert_eq!(peter.verify(&twice).unwrap(), TEXT);
}

#[test]
fn verifying_a_published_checkpoint() {
    let v = NoteVerifier::from_vkey(SUMDB_VKEY).unwrap();
    assert_eq!(v.name(), "sum.golang.org");
    assert_eq!(v.key_id(), 0x033de0ae);
    assert_eq!(v.verifier_key(), SUMDB_VKEY);
    let c = open_checkpoint(&v, SUMDB_NOTE, Some("go.sum database tree")).unwrap();
    assert_eq!(c.size, 63512409);
    assert!(c.extensions.is_empty());
    let tampered = SUMDB_NOTE.replace("63512409", "63512408");
    assert!(matches!(
        open_checkpoint(&v, &tampered, None),
        Err(NoteError::BadSignature { .. })
    ));
}

#[test]
fn malformed_notes_as_in_go() {
    let peter = NoteVerifier::from_vkey(PETER_VKEY).unwrap();
    let cases = [
        (
            TEXT.to_string(),
            "no blank line separates the text from the signatures",
        ),
        (
            format!("{TEXT}\n"),
            "no signature lines follow the blank line",
        ),
        (
            format!("{TEXT}\n\n"),
            "no signature lines follow the blank line",
        ),
        (
            format!("{TEXT}\n{}", PETER_SIG.trim_end()),
            "the last signature line does not end in a newline",
        ),
        (
            format!("\u{1}{TEXT}\n{PETER_SIG}"),
            "it contains the control character '\\u{1}'",
        ),
        (
            format!("{TEXT}\r\n{PETER_SIG}"),
            "it contains the control character '\\r'",
        ),
        (
            format!("{TEXT}\n{}", PETER_SIG.replace("PeterNeumann", "Bad Name")),
            "signature line 1: the signature is not canonical standard base64",
        ),
        (
            format!("{TEXT}\n\u{2014} PeterNeumann\n"),
            "signature line 1 is not '\u{2014} <name> <signature>'",
        ),
        (
            format!("{TEXT}\n{PETER_SIG}Unexpected line.\n"),
            "signature line 2 does not start with an em dash and a space",
        ),
        (
            format!("{TEXT}\n{}", PETER_SIG.replace("\u{2014}", "-")),
            "signature line 1 does not start with an em dash and a space",
        ),
        (
            format!(
                "{TEXT}\n{}",
                PETER_SIG.replace("PeterNeumann", "Peter+Neumann")
            ),
            "signature line 1 has the invalid key name \"Peter+Neumann\"",
        ),
        (
            format!("{TEXT}\n{}", PETER_SIG.replace("AM=", "AM")),
            "signature line 1: the signature is not canonical standard base64",
        ),
        (
            format!("{TEXT}\n{}", PETER_SIG.replace("AM=", "AN=")),
            "signature line 1: the signature is not canonical standard base64",
        ),
        (
            format!("{TEXT}\n\u{2014} PeterNeumann x08g\n"),
            "signature line 1: the signature is too short to hold a key id",
        ),
        (
            format!("{TEXT}\n\u{2014} PeterNeumann \n"),
            "signature line 1: the signature is too short to hold a key id",
        ),
        (
            format!("{TEXT}\n{}", PETER_SIG.repeat(101)),
            "it has more than 100 signatures",
        ),
    ];
    for (msg, why) in cases {
        assert_eq!(malformed(peter.verify(&msg)), why, "{msg:?}");
        assert_eq!(
            peter.verify(&msg).unwrap_err().to_string(),
            format!("malformed signed note: {why}")
        );
    }
    let huge = format!("{}\n{PETER_SIG}", "a".repeat(1 << 20));
    assert_eq!(
        malformed(peter.verify(&huge)),
        "it is over 1048576 bytes long"
    );
}

#[test]
fn bad_signatures() {
    let peter = NoteVerifier::from_vkey(PETER_VKEY).unwrap();
    let bad_signature = NoteError::BadSignature {
        name: "PeterNeumann".into(),
        key_id: 0xc74f20a3,
    };
    let bad = Err(bad_signature.clone());
    // Go's TestOpen: four more base64 characters inside the signature.
    let longer = format!("{}ABCD{}", &PETER_SIG[..60], &PETER_SIG[60..]);
    assert_eq!(peter.verify(&note(&[&longer])), bad);
    // A valid signature does not excuse a bad one by the same key.
    assert_eq!(peter.verify(&note(&[PETER_SIG, &longer])), bad);
    // The right signature over other text.
    let other = format!("{}{PETER_SIG}", TEXT.replace("answer", "Answer") + "\n");
    assert_eq!(peter.verify(&other), bad);
    assert_eq!(
        bad_signature.to_string(),
        "the signature by key PeterNeumann+c74f20a3 does not verify"
    );

    // A signature with the same name and another key id, or the same key id and another
    // name, is by an unknown key: ignored.
    let unsigned = NoteError::NotSigned {
        name: "PeterNeumann".into(),
        key_id: 0xc74f20a3,
    };
    let not_signed = Err(unsigned.clone());
    let other_id = PETER_SIG.replace("x08go", "x08gp");
    assert_eq!(peter.verify(&note(&[&other_id])), not_signed);
    let other_name = PETER_SIG.replace("PeterNeumann", "PeterNeuman");
    assert_eq!(peter.verify(&note(&[&other_name])), not_signed);
    assert_eq!(
        unsigned.to_string(),
        "the note has no signature by key PeterNeumann+c74f20a3"
    );
}

#[test]
fn verifier_keys_are_parsed_strictly() {
    // Go's TestNewVerifier: every proper substring, and every single byte changed.
    let b = PETER_VKEY.as_bytes();
    for i in 0..=b.len() {
        for j in i + 1..=b.len() {
            if i != 0 || j != b.len() {
                let k = std::str::from_utf8(&b[i..j]).unwrap();
                assert!(NoteVerifier::from_vkey(k).is_err(), "{k:?}");
            }
        }
    }
    for i in 0..b.len() {
        let mut c = b.to_vec();
        c[i] += 1;
        let k = std::str::from_utf8(&c).unwrap();
        assert!(NoteVerifier::from_vkey(k).is_err(), "{k:?}");
    }

    let cases = [
        // From Go's TestNewVerifier: wrong key length and unknown algorithm, each with
        // the key id adjusted to match. (Go's decoder takes the first one's non-zero
        // trailing bits; a canonical decoder already refuses it there.)
        (
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "malformed verifier key: the key is not canonical standard base64",
        ),
        (
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "malformed verifier key: unsupported signature type 0x65 (only Ed25519, 0x01, is)",
        ),
        (
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "malformed verifier key: key id c74f20a4 does not belong to this name and key (that would be c74f20a3)",
        ),
        (
            "PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "malformed verifier key: key id \"c74f20a\" is not 8 hex digits",
        ),
        (
            "PeterNeumann+c74f20ag+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "malformed verifier key: key id \"c74f20ag\" is not 8 hex digits",
        ),
        (
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW\n",
            "malformed verifier key: the key is not canonical standard base64",
        ),
        (
            "PeterNeumann+c74f20a3+",
            "malformed verifier key: the key is empty",
        ),
        (
            "PeterNeumann+c74f20a3",
            "malformed verifier key: expected <name>+<key id>+<key>",
        ),
        (
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "invalid key name \"Peter Neumann\": it must be non-empty, without spaces or '+'",
        ),
        (
            "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "invalid key name \"\": it must be non-empty, without spaces or '+'",
        ),
    ];
    let short = format!("PeterNeumann+c74f20a3+{}", B64.encode([1; 32]));
    let cases = cases.into_iter().chain([(
        short.as_str(),
        "malformed verifier key: an Ed25519 key is 32 bytes, this one is 31",
    )]);
    for (vkey, message) in cases {
        assert_eq!(
            NoteVerifier::from_vkey(vkey).unwrap_err().to_string(),
            message,
            "{vkey:?}"
        );
    }
    // Hex digits in either case, as Go's parser takes them.
    assert!(
        NoteVerifier::from_vkey(
            "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
        )
        .is_ok()
    );
}

#[test]
fn names_and_texts_that_cannot_be_signed() {
    let key = || SigningKey::from_bytes(&[1; 32]);
    for name in ["", "a b", "a+b", "a\tb", "a\u{3000}b", "a\u{a0}b", "a\nb"] {
        assert_eq!(
            NoteSigner::new(name, key()).unwrap_err(),
            NoteError::BadName(name.into())
        );
    }
    let s = NoteSigner::new("example.com/log", key()).unwrap();
    let cases = [
        ("", "cannot sign this text: it is empty"),
        (
            "no newline",
            "cannot sign this text: it does not end in a newline",
        ),
        (
            "tab\there\n",
            "cannot sign this text: it contains an ASCII control character other than newline",
        ),
        (
            "crlf\r\n",
            "cannot sign this text: it contains an ASCII control character other than newline",
        ),
    ];
    for (text, message) in cases {
        assert_eq!(s.sign(text).unwrap_err().to_string(), message, "{text:?}");
    }
    assert_eq!(
        s.sign(&("a".repeat(1 << 20) + "\n"))
            .unwrap_err()
            .to_string(),
        "cannot sign this text: it is too long for a note"
    );
    // The spec lets the text hold blank lines, and even be a lone newline.
    let v = s.verifier();
    for text in ["a\n\nb\n", "a\n\n", "\n", "\n\n\n"] {
        assert_eq!(v.verify(&s.sign(text).unwrap()).unwrap(), text);
    }
}

#[test]
fn every_single_byte_change_of_the_go_note_is_caught() {
    let v = NoteVerifier::from_vkey(PETER_VKEY).unwrap();
    let good = note(&[PETER_SIG]).into_bytes();
    let mut tried = 0;
    for i in 0..good.len() {
        for mask in 1..=255u8 {
            let mut b = good.clone();
            b[i] ^= mask;
            if let Ok(s) = std::str::from_utf8(&b) {
                tried += 1;
                assert!(v.verify(s).is_err(), "byte {i} ^ {mask:#x} accepted");
            }
        }
    }
    assert!(tried > 10_000);
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9./_:-]{1,24}"
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec("[^\\x00-\\x1f]{0,30}", 1..6).prop_map(|lines| {
        let mut s = lines.join("\n");
        s.push('\n');
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sign_then_verify(seed in any::<[u8; 32]>(), other in any::<[u8; 32]>(), name in name(), text in text()) {
        let s = NoteSigner::new(&name, SigningKey::from_bytes(&seed)).unwrap();
        let v = NoteVerifier::from_vkey(&s.verifier_key()).unwrap();
        prop_assert_eq!(&v, &s.verifier());
        prop_assert_eq!(v.key_id(), s.key_id());
        let signed = s.sign(&text).unwrap();
        prop_assert_eq!(v.verify(&signed).unwrap(), text.as_str());

        // A second signer appends its line; both still verify, and a stranger is refused.
        let t = NoteSigner::new("witness.example", SigningKey::from_bytes(&other)).unwrap();
        let cosigned = format!("{signed}{}", t.sign(&text).unwrap().strip_prefix(&format!("{text}\n")).unwrap());
        prop_assert_eq!(v.verify(&cosigned).unwrap(), text.as_str());
        prop_assert_eq!(t.verifier().verify(&cosigned).unwrap(), text.as_str());
        prop_assume!(seed != other);
        let stranger = NoteSigner::new(&name, SigningKey::from_bytes(&other)).unwrap().verifier();
        let refused = matches!(stranger.verify(&signed), Err(NoteError::NotSigned { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn any_flipped_byte_is_caught(
        seed in any::<[u8; 32]>(),
        name in name(),
        text in text(),
        at in any::<prop::sample::Index>(),
        mask in 1..=255u8,
    ) {
        let s = NoteSigner::new(&name, SigningKey::from_bytes(&seed)).unwrap();
        let mut b = s.sign(&text).unwrap().into_bytes();
        let i = at.index(b.len());
        b[i] ^= mask;
        // A note is a &str, so byte strings that are not UTF-8 cannot even be presented.
        if let Ok(tampered) = String::from_utf8(b) {
            prop_assert!(s.verifier().verify(&tampered).is_err(), "byte {} ^ {:#x}", i, mask);
        }
    }
}
