//! Event type patterns: literal text with `*` matching any run of characters
//! (including none and including dots).

/// True when `text` matches `pattern`, where `*` matches any sequence of characters.
pub(crate) fn matches(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where the last `*` was seen, and the text position it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the last star swallow one more character and retry.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches("budget.*", "budget.threshold"));
        assert!(matches("budget.*", "budget."));
        assert!(!matches("budget.*", "budget"));
        assert!(!matches("budget.*", "ledger.budget.x"));
        assert!(matches("*", ""));
        assert!(matches("*", "anything.at.all"));
        assert!(matches("budget.threshold", "budget.threshold"));
        assert!(!matches("budget.threshold", "budget.thresholds"));
        assert!(matches("*.threshold", "budget.threshold"));
        assert!(matches("b*t.*d", "budget.threshold"));
        assert!(!matches("b*t.*x", "budget.threshold"));
        assert!(matches("a*a*a", "aaaa"));
        assert!(!matches("a*a*a", "aa"));
        assert!(matches("**", "x"));
        assert!(!matches("", "x"));
        assert!(matches("", ""));
    }
}
