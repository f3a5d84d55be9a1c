//! Server-sent events, cut out of a byte stream as it arrives.
//!
//! Written by hand: the gateway needs each event's exact bytes (to forward them
//! untouched, or drop one) and its `data` field (to meter it), without copying the
//! stream. Event parsers in crates hand back decoded strings only.

use bytes::{Bytes, BytesMut};

/// The largest piece of an event held while it is incomplete. Providers send events of
/// a few kilobytes; one that never ends would otherwise grow without bound. Past it,
/// what is held goes on as it is (to the client, and to metering, which cannot read
/// it) and the stream is marked: see [`Splitter::overflowed`].
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// Splits a byte stream into whole events (each with its terminating blank line).
#[derive(Default)]
pub struct Splitter {
    pending: BytesMut,
    /// How much of `pending` holds no blank line: an event sent in small chunks is
    /// scanned once, not once per chunk.
    scanned: usize,
    overflowed: bool,
}

impl Splitter {
    /// Adds a chunk and returns the events it completes, as slices of the stream.
    pub fn push(&mut self, chunk: &Bytes) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.pending.is_empty() {
            // Fast path: the chunk holds whole events, as providers send them.
            let mut rest = chunk.clone();
            while let Some(end) = event_end(&rest) {
                out.push(rest.split_to(end));
            }
            if !rest.is_empty() {
                self.pending.extend_from_slice(&rest);
            }
            self.scanned = self.pending.len();
            self.bound(&mut out);
            return out;
        }
        self.pending.extend_from_slice(chunk);
        loop {
            // A blank line is at most 3 bytes long: one may begin in the last 2 bytes
            // already scanned, and end in the new ones.
            let from = self.scanned.saturating_sub(2);
            match event_end(&self.pending[from..]) {
                Some(end) => {
                    out.push(self.pending.split_to(from + end).freeze());
                    self.scanned = 0;
                }
                None => {
                    self.scanned = self.pending.len();
                    break;
                }
            }
        }
        self.bound(&mut out);
        out
    }

    /// Lets an incomplete event past [`MAX_EVENT_BYTES`] go on as it is.
    fn bound(&mut self, out: &mut Vec<Bytes>) {
        if self.pending.len() > MAX_EVENT_BYTES {
            out.push(self.pending.split().freeze());
            self.scanned = 0;
            self.overflowed = true;
        }
    }

    /// Whether an event outgrew [`MAX_EVENT_BYTES`] (its content was not metered).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// What is left when the stream ends: an event without its final blank line.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending).freeze())
    }
}

/// The end (exclusive) of the first whole event in `b`: after a blank line, which is
/// `\n\n`, `\r\n\r\n` or `\r\r` per the HTML standard's SSE grammar.
fn event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => {
                if b.get(i + 1) == Some(&b'\n') {
                    return Some(i + 2);
                }
                if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                    return Some(i + 3);
                }
            }
            b'\r' if b.get(i + 1) == Some(&b'\r') => return Some(i + 2),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The `data` of an event (its `data:` lines joined by `\n`), if it has any.
pub fn data(event: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let text = std::str::from_utf8(event).ok()?;
    let mut lines = text
        .split(['\n', '\r'])
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d));
    let first = lines.next()?;
    match lines.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut s = format!("{first}\n{second}");
            for l in lines {
                s.push('\n');
                s.push_str(l);
            }
            Some(std::borrow::Cow::Owned(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_wherever_chunks_end() {
        let stream = b"data: {\"a\":1}\n\nevent: x\ndata: y\n\ndata: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut s = Splitter::default();
            let mut got: Vec<Bytes> = s.push(&Bytes::copy_from_slice(&stream[..cut]));
            got.extend(s.push(&Bytes::copy_from_slice(&stream[cut..])));
            assert!(s.finish().is_none());
            assert_eq!(got.concat(), stream, "cut at {cut}");
            assert_eq!(got.len(), 3);
            assert_eq!(data(&got[0]).as_deref(), Some("{\"a\":1}"));
            assert_eq!(data(&got[1]).as_deref(), Some("y"));
            assert_eq!(data(&got[2]).as_deref(), Some("[DONE]"));
        }
    }

    #[test]
    fn regression_an_endless_event_is_passed_on_not_held_without_bound() {
        let mut s = Splitter::default();
        let piece = Bytes::from(vec![b'x'; 1 << 20]);
        let mut passed = 0;
        for _ in 0..10 {
            passed += s.push(&piece).iter().map(Bytes::len).sum::<usize>();
            assert!(s.pending.len() <= MAX_EVENT_BYTES);
        }
        assert!(s.overflowed());
        assert_eq!(passed + s.pending.len(), 10 << 20, "no byte lost");
    }

    #[test]
    fn crlf_multiline_and_unterminated_events() {
        let mut s = Splitter::default();
        let got = s.push(&Bytes::from_static(b"data: a\r\ndata: b\r\n\r\ndata: tail"));
        assert_eq!(got.len(), 1);
        assert_eq!(data(&got[0]).as_deref(), Some("a\nb"));
        assert_eq!(s.finish().as_deref(), Some(&b"data: tail"[..]));
        assert!(data(b": comment\n\n").is_none());
    }
}
