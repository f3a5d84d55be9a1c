//! Name patterns: `*` matches any run of characters (none, and `/` too); everything
//! else matches itself, ignoring ASCII case. One definition serves provider routing,
//! tokenizer rules and access rules, so a rule can never be narrower than the routing
//! it guards (`GPT-4O` is routed as `gpt-4o*` and denied as `gpt-4o*` alike).

/// Whether `name` matches `pattern`. Greedy, backtracking to the last star: linear in
/// practice, at most O(|pattern| · |name|).
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::wildcard_match as m;

    #[test]
    fn stars_runs_and_case() {
        assert!(m("gpt-4o", "gpt-4o"));
        assert!(!m("gpt-4o", "gpt-4o-mini"));
        assert!(m("gpt-4o*", "gpt-4o-mini"));
        assert!(m("gpt-4o*", "GPT-4O-Mini"));
        assert!(m("*", ""));
        assert!(m("*", "Qwen/Qwen2.5-72B"));
        assert!(m("qwen*-max", "qwen2.5-max"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b", "ab-c"));
        assert!(!m("", "x"));
    }
}
