//! Server-sent event streams: paced, rendered lazily, with faults.

use crate::answer::Rng;
use crate::common::{Ctx, Fault};
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::ops::Range;
use tokio::time::Instant;

/// Frames due at the same moment are sent together, up to this many bytes.
const COALESCE_BYTES: usize = 16 << 10;

/// How long a cut stream waits, after its last bytes, before breaking the connection.
const CUT_FLUSH_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// A stream to send: `head` at once, then one frame per piece of `text`
/// (`prefix` + the piece as a JSON string + `suffix`; with `numbered`, `prefix` + the
/// frame's number + its text + the piece + `suffix`) paced from the first token on,
/// then `tail`.
#[derive(Debug)]
pub(crate) struct Plan {
    pub head: Vec<u8>,
    pub text: String,
    pub pieces: Vec<Range<usize>>,
    pub prefix: String,
    pub suffix: String,
    pub tail: Vec<u8>,
    /// Frames numbered from the first figure on (the Responses API's
    /// `sequence_number`), and the text between the number and the piece.
    pub numbered: Option<(u64, String)>,
}

struct Driver {
    plan: Plan,
    start: Instant,
    ttft: std::time::Duration,
    interval: Option<std::time::Duration>,
    i: usize,
    head_sent: bool,
    done: bool,
    fail_next: bool,
    cut_at: Option<usize>,
    malformed_at: Option<usize>,
}

impl Driver {
    fn render(&self, i: usize, buf: &mut Vec<u8>) {
        let piece = &self.plan.text[self.plan.pieces[i].clone()];
        buf.extend_from_slice(self.plan.prefix.as_bytes());
        if let Some((first, between)) = &self.plan.numbered {
            buf.extend_from_slice((first + i as u64).to_string().as_bytes());
            buf.extend_from_slice(between.as_bytes());
        }
        buf.extend_from_slice(crate::common::json_str(piece).as_bytes());
        buf.extend_from_slice(self.plan.suffix.as_bytes());
    }

    fn malformed(&self, buf: &mut Vec<u8>) {
        let p = &self.plan.prefix;
        let mut half = p.len() / 2;
        while !p.is_char_boundary(half) {
            half -= 1;
        }
        buf.extend_from_slice(&p.as_bytes()[..half]);
        buf.extend_from_slice(b"\n\n");
    }

    /// The next bytes to send, after waiting for them to be due.
    async fn step(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.done {
            return None;
        }
        if self.fail_next {
            // Let what was sent reach the wire first: the body being pending makes the
            // server flush; an error right away would abort before it does.
            tokio::time::sleep(CUT_FLUSH_PAUSE).await;
            self.done = true;
            return Some(Err(std::io::Error::other("simulated cut")));
        }
        let mut buf = Vec::new();
        if !self.head_sent {
            buf.extend_from_slice(&self.plan.head);
            self.head_sent = true;
        }
        let n = self.plan.pieces.len();
        loop {
            if Some(self.i) == self.cut_at {
                self.fail_next = true;
                break;
            }
            if self.i == n {
                buf.extend_from_slice(&self.plan.tail);
                self.done = true;
                break;
            }
            let due = self.start
                + self.ttft
                + self.interval.map_or(std::time::Duration::ZERO, |d| {
                    d.saturating_mul(u32::try_from(self.i).unwrap_or(u32::MAX))
                });
            if Instant::now() < due {
                if !buf.is_empty() {
                    break;
                }
                tokio::time::sleep_until(due).await;
            }
            if Some(self.i) == self.malformed_at {
                self.malformed(&mut buf);
            }
            self.render(self.i, &mut buf);
            self.i += 1;
            if buf.len() >= COALESCE_BYTES {
                break;
            }
        }
        if buf.is_empty() && self.fail_next {
            tokio::time::sleep(CUT_FLUSH_PAUSE).await;
            self.done = true;
            return Some(Err(std::io::Error::other("simulated cut")));
        }
        Some(Ok(Bytes::from(buf)))
    }
}

/// Answers with the stream `plan`, paced and faulted as `ctx` says.
pub(crate) fn respond(ctx: &Ctx, plan: Plan, request_id: &str) -> Response {
    let fault = ctx.stream_fault();
    let n = plan.pieces.len();
    let body = if fault == Some(Fault::Timeout) {
        // Headers, then nothing until the stall limit, then a broken connection.
        Body::from_stream(futures_util::stream::once(async {
            tokio::time::sleep(crate::STALL_LIMIT).await;
            Err::<Bytes, _>(std::io::Error::other("simulated stall"))
        }))
    } else {
        let mut rng = Rng::new(ctx.seed ^ ctx.seq.rotate_left(17) ^ 0xC07);
        let cut_at = (fault == Some(Fault::Cut)).then(|| match ctx.cut_at_percent {
            Some(p) => n * p / 100,
            // Somewhere in the middle third.
            None => n / 3 + rng.below(n / 3 + 1),
        });
        let malformed_at = (fault == Some(Fault::Malformed)).then_some(n / 2);
        let driver = Box::new(Driver {
            plan,
            start: Instant::now(),
            ttft: ctx.ttft,
            interval: ctx.interval,
            i: 0,
            head_sent: false,
            done: false,
            fail_next: false,
            cut_at,
            malformed_at,
        });
        Body::from_stream(futures_util::stream::unfold(driver, |mut d| async move {
            let next = d.step().await?;
            Some((next, d))
        }))
    };
    let mut resp = (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-request-id", v.clone());
        resp.headers_mut().insert("request-id", v);
    }
    resp
}
