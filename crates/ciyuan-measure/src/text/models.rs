//! Which encoding a model uses.

use super::Encoding;

/// Which encoding a model uses: a built-in table of wildcard patterns, first match
/// wins. Configuration can add patterns in front of it.
pub const MODEL_ENCODINGS: &[(&str, Encoding)] = &[
    ("gpt-4o*", Encoding::O200kBase),
    ("gpt-4.1*", Encoding::O200kBase),
    ("gpt-4.5*", Encoding::O200kBase),
    ("gpt-5*", Encoding::O200kBase),
    ("chatgpt-4o*", Encoding::O200kBase),
    ("o1*", Encoding::O200kBase),
    ("o3*", Encoding::O200kBase),
    ("o4*", Encoding::O200kBase),
    ("gpt-oss*", Encoding::O200kBase),
    ("gpt-4*", Encoding::Cl100kBase),
    ("gpt-3.5*", Encoding::Cl100kBase),
    ("text-embedding-3*", Encoding::Cl100kBase),
    ("text-embedding-ada-002", Encoding::Cl100kBase),
    ("qwen3.5*", Encoding::Qwen3_6),
    ("qwen3.6*", Encoding::Qwen3_6),
    ("qwen*", Encoding::Qwen),
    ("qwq*", Encoding::Qwen),
    ("deepseek*", Encoding::DeepSeekV4),
];

pub use ciyuan_core::wildcard_match;

/// The encoding of `model`, looking at `extra` (pattern, encoding) pairs first, then
/// [`MODEL_ENCODINGS`]. A provider prefix such as `openai/` or `deepseek-ai/` is ignored.
pub fn encoding_for_model(model: &str, extra: &[(String, Encoding)]) -> Option<Encoding> {
    let bare = model.rsplit('/').next().unwrap_or(model);
    extra
        .iter()
        .map(|(p, e)| (p.as_str(), *e))
        .chain(MODEL_ENCODINGS.iter().copied())
        .find(|(p, _)| wildcard_match(p, model) || wildcard_match(p, bare))
        .map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_map_to_their_family() {
        for (model, enc) in [
            ("gpt-4o-2024-08-06", Encoding::O200kBase),
            ("openai/gpt-4.1-mini", Encoding::O200kBase),
            ("o4-mini", Encoding::O200kBase),
            ("gpt-4-turbo", Encoding::Cl100kBase),
            ("text-embedding-3-small", Encoding::Cl100kBase),
            ("qwen-max", Encoding::Qwen),
            ("Qwen2.5-72B-Instruct", Encoding::Qwen),
            ("qwen3.6-plus", Encoding::Qwen3_6),
            ("deepseek-chat", Encoding::DeepSeekV4),
            ("deepseek-ai/DeepSeek-V4", Encoding::DeepSeekV4),
        ] {
            assert_eq!(encoding_for_model(model, &[]), Some(enc), "{model}");
        }
        assert_eq!(encoding_for_model("claude-sonnet-4", &[]), None);
        let extra = vec![("claude-*".to_string(), Encoding::Cl100kBase)];
        assert_eq!(
            encoding_for_model("claude-sonnet-4", &extra),
            Some(Encoding::Cl100kBase)
        );
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b", "ab-c"));
    }
}
