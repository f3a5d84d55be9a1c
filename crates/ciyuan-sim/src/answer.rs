//! Deterministic answers whose token counts are exact.
//!
//! Answers are drawn from fixed sentence pools (English and Chinese) by a seeded
//! generator. The reported count is always the tokenizer's count of the exact text
//! returned; when a length is forced or capped, the text is cut (mid-word if need be)
//! where the count is exactly the limit, as a real model stops.

use ciyuan_measure::text::{Encoding, TextError};
use std::ops::Range;
use std::sync::OnceLock;

/// Sentences an English answer is made of.
const EN: &[&str] = &[
    "Token accounting works best when every request is measured at the point where it crosses the boundary.",
    "The short answer is that it depends on how the workload is shaped and what you need to optimise for.",
    "A good first step is to write down the assumptions, because most disagreements come from different ones.",
    "In practice, the cache hit rate matters more than the raw price per million tokens.",
    "Let me walk through the main trade-offs one at a time.",
    "The ledger keeps an append-only record, so corrections are new entries rather than edits.",
    "Latency is usually dominated by the time to the first token, not by the streaming rate.",
    "If the prompt is long and mostly repeated, prompt caching can cut the bill by more than half.",
    "There are three common approaches, and each fits a different stage of a project.",
    "The simplest option is to start with a single model and add routing only when the data justifies it.",
    "Batching requests improves throughput, but it also raises the tail latency for interactive users.",
    "You can verify the numbers independently by counting the tokens of the returned text.",
    "Rate limits are applied per key and per model, so spreading traffic across keys rarely helps.",
    "For most teams, a weekly review of usage by project is enough to catch surprises early.",
    "The key insight is that every token has an owner, and the owner should be known before the request is sent.",
    "Streaming responses let the user read while the model is still writing.",
    "When a stream is cut off, the partial output still consumed compute and should still be counted.",
    "It is worth keeping the raw provider response, since it is the evidence if a bill is ever disputed.",
    "A budget that is checked only after the fact is a report, not a control.",
    "Here is a concrete example to make this less abstract.",
    "Suppose a support assistant answers ten thousand questions a day with an average prompt of two thousand tokens.",
    "At that scale, a ten percent improvement in cache reuse saves more than switching to a cheaper model.",
    "Embeddings are cheap per token, but reindexing a large corpus can still add up quickly.",
    "The tokenizer differs between model families, so the same text can have noticeably different counts.",
    "Chinese text usually takes fewer tokens per character with newer vocabularies than with older ones.",
    "To summarise, measure first, then set limits, and only then optimise.",
    "Retries should use exponential backoff and respect the retry-after header when it is present.",
    "An idempotency key makes it safe to retry a request without charging for it twice.",
    "The reasoning models spend hidden tokens thinking, and those tokens are billed as output.",
    "Keeping system prompts stable across requests is the easiest way to benefit from caching.",
    "Monitoring should alert on sudden changes in tokens per request, not just on total spend.",
    "A tamper-evident log lets an auditor confirm that nothing was removed after the fact.",
    "Most of the cost in a retrieval pipeline comes from the context that is stuffed into the prompt.",
    "Trimming that context to the passages that actually answer the question helps both cost and quality.",
    "I hope this helps, and I am happy to go deeper into any of these points.",
    "One caveat is that provider prices change, so any estimate should be dated.",
    "The gateway can enforce quotas in real time because it sees each request before the provider does.",
    "Counting tokens locally is fast enough to do on every request without adding noticeable latency.",
    "Finally, remember that output tokens are usually several times more expensive than input tokens.",
    "This approach scales from a single developer to an organisation with hundreds of projects.",
];

/// Sentences a Chinese answer is made of.
const ZH: &[&str] = &[
    "词元是大模型计量的基本单位，输入和输出都按词元计费。",
    "简单来说，这取决于业务的调用方式和你最关心的指标。",
    "第一步是把各项假设写清楚，因为大多数分歧都来自不同的假设。",
    "在实际使用中，缓存命中率往往比每百万词元的单价更重要。",
    "下面我分几点说明其中的权衡。",
    "账本只追加不修改，所以更正也是一条新的记录。",
    "首个词元的延迟通常决定了用户的体感速度。",
    "如果提示词很长而且大部分内容重复，提示缓存可以把费用降低一半以上。",
    "常见的做法有三种，分别适合项目的不同阶段。",
    "最简单的办法是先用一个模型，等数据证明有必要时再引入路由。",
    "批量处理可以提高吞吐量，但也会增加交互场景下的尾部延迟。",
    "你可以自己数一遍返回文本的词元，来独立核对这些数字。",
    "限流是按密钥和模型分别计算的。",
    "对大多数团队来说，每周按项目回顾一次用量就足以及早发现异常。",
    "关键在于每一个词元都有归属，而且在请求发出之前就应当确定。",
    "流式输出让用户在模型生成的同时就能开始阅读。",
    "即使流在中途被切断，已经生成的部分同样消耗了算力，也应当计入用量。",
    "保留服务商的原始响应很有必要，一旦账单有争议，它就是证据。",
    "只在事后检查的预算只是报表，而不是控制手段。",
    "举一个具体的例子会更直观。",
    "假设一个客服助手每天回答一万个问题，平均每个提示词有两千个词元。",
    "在这种规模下，缓存复用率提高百分之十，比换用更便宜的模型还要省钱。",
    "向量嵌入按词元计价很便宜，但重建一个大型语料库的索引仍然会产生可观的费用。",
    "不同模型家族的分词器不同，同一段文字的词元数可能相差很多。",
    "总结一下：先计量，再设限，最后才是优化。",
    "重试时应当使用指数退避，并遵守响应中的重试等待时间。",
    "幂等键可以保证同一个请求重试时不会被重复计费。",
    "推理模型会消耗看不见的思考词元，这部分按输出计费。",
    "保持系统提示词稳定，是利用缓存最简单的方法。",
    "监控应当关注单次请求词元数的突变，而不仅仅是总花费。",
    "防篡改的日志能让审计人员确认没有任何记录被事后删除。",
    "希望这些内容对你有帮助，如果需要可以继续展开任何一点。",
];

/// A small, fast, seedable generator (SplitMix64).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A number in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A 64-bit hash of byte strings (FxHash-style, eight bytes at a time), stable across
/// runs and platforms.
#[derive(Debug, Clone)]
pub(crate) struct Hasher(u64);

impl Hasher {
    const K: u64 = 0x517C_C1B7_2722_0A95;

    /// A hasher started from `seed`.
    pub(crate) fn new(seed: u64) -> Hasher {
        Hasher(seed ^ 0xCBF2_9CE4_8422_2325)
    }

    fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(Self::K);
    }

    /// Adds bytes (their length too, so concatenations differ).
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let mut w = [0u8; 8];
        let rest = chunks.remainder();
        w[..rest.len()].copy_from_slice(rest);
        self.word(u64::from_le_bytes(w));
        self.word(b.len() as u64);
    }

    /// The hash so far, mixed.
    pub(crate) fn finish(&self) -> u64 {
        Rng::new(self.0).next_u64()
    }
}

/// Whether `c` is a Chinese or Japanese character (the prompt then gets a Chinese
/// answer).
pub(crate) fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F)
}

/// Per-encoding token counts of the pool sentences (English ones with the leading
/// space they get mid-paragraph), computed on first use. Only an estimate guide: the
/// final text is always counted whole.
fn pool_counts(enc: Encoding, zh: bool) -> &'static [usize] {
    static CELLS: [OnceLock<Vec<usize>>; 2 * Encoding::ALL.len()] =
        [const { OnceLock::new() }; 2 * Encoding::ALL.len()];
    let e = Encoding::ALL.iter().position(|x| *x == enc).unwrap_or(0);
    CELLS[2 * e + usize::from(zh)].get_or_init(|| {
        let pool = if zh { ZH } else { EN };
        pool.iter()
            .map(|s| {
                let counted = if zh {
                    enc.count(s)
                } else {
                    enc.count(&format!(" {s}"))
                };
                counted.unwrap_or(s.len() / 3).max(1)
            })
            .collect()
    })
}

/// Composes sentences until the estimated count reaches `target`.
fn compose(enc: Encoding, zh: bool, rng: &mut Rng, target: usize, out: &mut String) {
    let pool = if zh { ZH } else { EN };
    let counts = pool_counts(enc, zh);
    let mut est = 0usize;
    let mut in_para = 0usize;
    let mut para_len = 2 + rng.below(3);
    let mut last = usize::MAX;
    while est < target {
        let mut i = rng.below(pool.len());
        if i == last {
            i = (i + 1) % pool.len();
        }
        last = i;
        if !out.is_empty() {
            if in_para >= para_len {
                out.push_str("\n\n");
                est += 1;
                in_para = 0;
                para_len = 2 + rng.below(3);
            } else if !zh {
                out.push(' ');
            }
        }
        out.push_str(pool[i]);
        est += counts[i];
        in_para += 1;
    }
}

/// Where the streamed text is cut into chunks of roughly one token: a word with its
/// leading space, a run of punctuation, a newline run, or one CJK character.
pub(crate) fn pieces(text: &str) -> Vec<Range<usize>> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Word,
        Space,
        Newline,
        Punct,
        Cjk,
    }
    let class = |c: char| {
        if c == '\n' || c == '\r' {
            Class::Newline
        } else if c.is_whitespace() {
            Class::Space
        } else if is_cjk(c) {
            Class::Cjk
        } else if c.is_alphanumeric() || c == '\'' || c == '-' {
            Class::Word
        } else {
            Class::Punct
        }
    };
    let mut out = Vec::with_capacity(text.len() / 4 + 1);
    let mut start = 0;
    let mut prev: Option<Class> = None;
    for (i, c) in text.char_indices() {
        let k = class(c);
        let cut = match prev {
            None => false,
            Some(p) => match (p, k) {
                (Class::Cjk, _) | (_, Class::Cjk) => true,
                (Class::Space, Class::Word) => false,
                (Class::Space, Class::Space) => false,
                (Class::Newline, Class::Newline) => false,
                (Class::Punct, Class::Punct) => false,
                (Class::Word, Class::Word) => {
                    // Long words go out in pieces of at most 8 bytes.
                    i - start >= 8
                }
                _ => true,
            },
        };
        if cut && i > start {
            out.push(start..i);
            start = i;
        }
        prev = Some(k);
    }
    if start < text.len() {
        out.push(start..text.len());
    }
    out
}

/// The longest prefix of `text` found with exactly `k` tokens (or the closest below):
/// a binary search over chunk boundaries, then character by character into the next
/// chunk, so a cut can fall mid-word as a real model's does. Returns the prefix's
/// length in bytes and its count.
fn prefix_with(enc: Encoding, text: &str, k: usize) -> Result<(usize, usize), TextError> {
    if k == 0 {
        return Ok((0, 0));
    }
    let mut bounds: Vec<usize> = pieces(text).iter().map(|r| r.end).collect();
    bounds.insert(0, 0);
    // Largest boundary index whose prefix count is <= k (counts grow with the prefix).
    let (mut lo, mut hi) = (0usize, bounds.len() - 1);
    let mut lo_count = 0usize;
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let c = enc.count(&text[..bounds[mid]])?;
        if c <= k {
            lo = mid;
            lo_count = c;
        } else {
            hi = mid - 1;
        }
    }
    let (mut best, mut best_count) = (bounds[lo], lo_count);
    if best_count == k {
        return Ok((best, best_count));
    }
    let start = best;
    for (steps, (i, _)) in text[start..].char_indices().skip(1).enumerate() {
        let end = start + i;
        let n = enc.count(&text[..end])?;
        if n == k {
            return Ok((end, n));
        }
        if n > k + 1 || steps > 48 {
            break;
        }
        if n < k && end > best {
            (best, best_count) = (end, n);
        }
    }
    // The rest of the text, when it is short.
    if best_count < k && enc.count(text)? == k {
        return Ok((text.len(), k));
    }
    Ok((best, best_count))
}

/// A generated answer.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    /// The text.
    pub text: String,
    /// The tokenizer's count of `text`.
    pub tokens: usize,
    /// Whether the answer stopped at the token limit (`length` / `max_tokens`).
    pub hit_limit: bool,
}

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want {
    /// The request's limit on output tokens, if any.
    pub cap: Option<usize>,
    /// `x-sim-output-tokens`: exactly this many, if the cap allows.
    pub forced: Option<usize>,
    /// Answer in Chinese.
    pub zh: bool,
}

/// Generates an answer with `rng`; `tokens` is always `enc.count(text)`.
pub(crate) fn generate(enc: Encoding, rng: &mut Rng, want: Want) -> Result<Output, TextError> {
    let natural = 60 + rng.below(141);
    let exact = match (want.forced, want.cap) {
        (Some(n), Some(m)) if n >= m => Some((m, true)),
        (Some(n), _) => Some((n, false)),
        (None, _) => None,
    };
    let mut text = String::new();
    match exact {
        Some((k, hit_limit)) => {
            if k == 0 {
                return Ok(Output {
                    text,
                    tokens: 0,
                    hit_limit,
                });
            }
            let mut target = k + 8;
            compose(enc, want.zh, rng, target, &mut text);
            let mut n = enc.count(&text)?;
            while n <= k {
                target = k - n + 16;
                compose(enc, want.zh, rng, target, &mut text);
                n = enc.count(&text)?;
            }
            let (end, tokens) = prefix_with(enc, &text, k)?;
            text.truncate(end);
            Ok(Output {
                text,
                tokens,
                hit_limit,
            })
        }
        None => {
            compose(enc, want.zh, rng, natural, &mut text);
            let n = enc.count(&text)?;
            match want.cap {
                Some(m) if n > m => {
                    let (end, tokens) = prefix_with(enc, &text, m)?;
                    text.truncate(end);
                    Ok(Output {
                        text,
                        tokens,
                        hit_limit: true,
                    })
                }
                _ => Ok(Output {
                    text,
                    tokens: n,
                    hit_limit: false,
                }),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn forced_lengths_are_exact_in_every_family() {
        for enc in Encoding::ALL {
            for zh in [false, true] {
                for k in [1, 2, 7, 33, 100, 257] {
                    let mut rng = Rng::new(k as u64 * 31 + u64::from(zh));
                    let want = Want {
                        cap: None,
                        forced: Some(k),
                        zh,
                    };
                    let out = generate(enc, &mut rng, want).unwrap();
                    assert_eq!(out.tokens, enc.count(&out.text).unwrap());
                    assert_eq!(out.tokens, k, "{} zh={zh} k={k}", enc.name());
                }
            }
        }
    }

    #[test]
    fn natural_answers_respect_the_cap_and_are_deterministic() {
        let enc = Encoding::O200kBase;
        let want = Want {
            cap: Some(40),
            forced: None,
            zh: false,
        };
        let a = generate(enc, &mut Rng::new(9), want).unwrap();
        let b = generate(enc, &mut Rng::new(9), want).unwrap();
        assert_eq!(a.text, b.text);
        assert_eq!(a.tokens, 40);
        assert!(a.hit_limit);
        let free = Want { cap: None, ..want };
        let c = generate(enc, &mut Rng::new(10), free).unwrap();
        assert!((60..=260).contains(&c.tokens), "{}", c.tokens);
        assert!(c.text.ends_with('.'));
        assert!(!c.hit_limit);
    }

    #[test]
    fn pieces_cover_the_text() {
        let t = "Hello, world.\n\nThe ledger's entries — 词元是单位。 ok";
        let p = pieces(t);
        let joined: String = p.iter().map(|r| &t[r.clone()]).collect();
        assert_eq!(joined, t);
        assert!(p.iter().any(|r| &t[r.clone()] == " world"));
        assert!(p.iter().any(|r| &t[r.clone()] == "词"));
    }
}
