//! Text that people and other systems read back: names, ids, metadata.
//!
//! Control characters in such text are never meant: ESC starts terminal escape
//! sequences in a `ciyuan` listing, CR/LF split a CSV row or a log line, NUL ends a C
//! string in an ERP import. Every door refuses them, naming the field.

/// Why a text field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Empty where a value is required.
    #[error("{field}: must not be empty")]
    Empty {
        /// The field's name as the client wrote it.
        field: String,
    },
    /// Longer than its bound.
    #[error("{field}: longer than {max} bytes")]
    TooLong {
        /// The field's name.
        field: String,
        /// The bound, in bytes.
        max: usize,
    },
    /// Holds a control character.
    #[error("{field}: control character U+{code:04X} at byte {at} is not allowed")]
    Control {
        /// The field's name.
        field: String,
        /// The character's code point.
        code: u32,
        /// Its byte offset.
        at: usize,
    },
}

/// Checks that `s` is 1 to `max_bytes` bytes with no control character (Unicode
/// category Cc: C0, DEL and C1, so also tab and newline).
pub fn check_text(field: &str, s: &str, max_bytes: usize) -> Result<(), TextError> {
    if s.is_empty() {
        return Err(TextError::Empty {
            field: field.to_string(),
        });
    }
    if s.len() > max_bytes {
        return Err(TextError::TooLong {
            field: field.to_string(),
            max: max_bytes,
        });
    }
    // Ids, sources and subjects are printable ASCII nearly always: one pass over the
    // bytes (on the ingest path, per event) settles them.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    if let Some((at, c)) = s.char_indices().find(|(_, c)| c.is_control()) {
        return Err(TextError::Control {
            field: field.to_string(),
            code: u32::from(c),
            at,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused_with_their_place() {
        for (s, code, at) in [
            ("a\u{1b}[31m", 0x1b, 1),
            ("x\0", 0, 1),
            ("line\r\nnext", 0x0d, 4),
            ("tab\there", 9, 3),
            ("c1\u{85}", 0x85, 2),
            ("del\u{7f}", 0x7f, 3),
        ] {
            assert_eq!(
                check_text("name", s, 100),
                Err(TextError::Control {
                    field: "name".into(),
                    code,
                    at
                }),
                "{s:?}"
            );
        }
        assert_eq!(
            check_text("name", "x\u{1b}", 100).unwrap_err().to_string(),
            "name: control character U+001B at byte 1 is not allowed"
        );
    }

    #[test]
    fn ordinary_text_passes_and_bounds_hold() {
        check_text("name", "人力资源 HR — ok ✓", 100).unwrap();
        assert!(matches!(
            check_text("id", "", 10),
            Err(TextError::Empty { .. })
        ));
        assert!(matches!(
            check_text("id", "12345678901", 10),
            Err(TextError::TooLong { max: 10, .. })
        ));
    }
}
