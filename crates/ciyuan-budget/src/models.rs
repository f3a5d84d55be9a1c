//! Model access patterns: `*` matches any run of characters (including none and
//! including `/`); everything else matches itself, ignoring ASCII case — the same
//! matching as provider routing ([`ciyuan_core::wildcard_match`]), so a deny rule
//! catches every spelling the gateway would route.

/// Whether `name` matches `pattern`.
pub fn matches(pattern: &str, name: &str) -> bool {
    ciyuan_core::wildcard_match(pattern, name)
}

/// The access rules of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rules {
    pub allow: Option<Vec<String>>,
    pub deny: Vec<String>,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }

    /// `Err(reason)` when this node's rules do not let `model` through.
    pub fn check(&self, model: &str) -> Result<(), &'static str> {
        if self.deny.iter().any(|p| matches(p, model)) {
            return Err("denied");
        }
        match &self.allow {
            Some(allow) if !allow.iter().any(|p| matches(p, model)) => Err("not allowed"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn wildcards() {
        assert!(matches("gpt-4o", "gpt-4o"));
        assert!(!matches("gpt-4o", "gpt-4o-mini"));
        assert!(matches("gpt-4o*", "gpt-4o-mini"));
        assert!(matches("*", ""));
        assert!(matches("*", "anything/at/all"));
        assert!(matches("qwen*-max", "qwen2.5-max"));
        assert!(matches("qwen*-max", "qwen-max"));
        assert!(
            matches("gpt-4o-mini*", "GPT-4o-MINI"),
            "case cannot slip past a rule"
        );
        assert!(!matches("qwen*-max", "qwen-max-latest"));
        assert!(matches("*mini*", "o4-mini-high"));
        assert!(matches("a*b*c", "aXbYbZc"));
        assert!(!matches("a*b*c", "aXbYbZ"));
        assert!(matches("GPT-4o", "gpt-4o"));
        assert!(!matches("", "x"));
        assert!(matches("", ""));
    }
}
