//! A streamed answer on its way to the client: the response body polls the provider's
//! body directly, meters each event as it passes and hands the chunk on at once.
//!
//! No task and no channel per stream: the client's connection drives the relay, so an
//! open stream costs one body in memory, and a client that goes away drops the relay,
//! which records the request then (as `client_disconnected`).

use super::upstream::UpstreamBody;
use super::{Call, Meter, error_chain, finish};
use crate::App;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The body of a relayed stream.
pub struct Relay {
    upstream: UpstreamBody,
    /// Fires when the provider has been silent for `idle_for`.
    idle: Pin<Box<Sleep>>,
    idle_for: Duration,
    /// What is needed to record the request; taken when it is recorded.
    metering: Option<Metering>,
}

struct Metering {
    app: Arc<App>,
    call: Call,
    meter: Meter,
    splitter: super::sse::Splitter,
    /// Take out the usage-only chunk the gateway asked for and the client did not.
    strip_usage: bool,
    status: u16,
}

impl Relay {
    /// Relays `upstream`, recording the request when the stream ends (or is dropped).
    pub(super) fn new(
        app: Arc<App>,
        call: Call,
        upstream: UpstreamBody,
        status: u16,
        idle_for: Duration,
    ) -> Relay {
        // The usage-only chunk the gateway asked for, where the client did not.
        let strip_usage = call.endpoint.dialect().usage_on_request() && !call.info.include_usage;
        let mut meter = Meter::new(call.endpoint, None);
        meter.billable = true;
        Relay {
            upstream,
            idle: Box::pin(tokio::time::sleep(idle_for)),
            idle_for,
            metering: Some(Metering {
                app,
                call,
                meter,
                splitter: super::sse::Splitter::default(),
                strip_usage,
                status,
            }),
        }
    }

    /// Records the request (once): `failure` unless an earlier one was noted.
    fn end(&mut self, failure: Option<&'static str>) {
        let Some(mut m) = self.metering.take() else {
            return;
        };
        if m.meter.failure.is_none() {
            m.meter.failure = failure;
        }
        if m.meter.failure.is_none() && !m.meter.counted() {
            m.meter.failure = Some("no_usage");
        }
        let ttft = m.meter.ttft;
        finish(&m.app, m.call, m.meter, m.status, ttft);
    }
}

impl Metering {
    /// Meters a chunk; returns what goes to the client (nothing when every event in
    /// it was left out).
    fn pass(&mut self, chunk: Bytes) -> Option<Bytes> {
        let started = self.call.started;
        let events = self.splitter.push(&chunk);
        if self.splitter.overflowed() && self.meter.failure.is_none() {
            self.meter.failure = Some("upstream_event_too_large");
        }
        if !self.strip_usage {
            for e in &events {
                self.meter.event(e, false, started);
            }
            return Some(chunk);
        }
        // Only whole events go out, so an event can be left out whole.
        let mut kept: Vec<Bytes> = Vec::with_capacity(events.len());
        for e in events {
            if self.meter.event(&e, true, started) {
                kept.push(e);
            }
        }
        match kept.len() {
            0 => None,
            1 => kept.pop(),
            _ => Some(Bytes::from(kept.concat())),
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(m) = this.metering.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.end(Some("upstream_timeout"));
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream stream went silent",
                        ))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not passed on (the answer's framing is the gateway's).
                    let Ok(chunk) = frame.into_data() else {
                        continue;
                    };
                    let deadline = Instant::now() + this.idle_for;
                    this.idle.as_mut().reset(deadline);
                    if let Some(out) = m.pass(chunk) {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(Some("upstream_cut"));
                    return Poll::Ready(Some(Err(std::io::Error::other(error_chain(&e)))));
                }
                Poll::Ready(None) => {
                    // An event without its final blank line still goes out, metered.
                    let rest = m.splitter.finish();
                    if let Some(rest) = &rest {
                        m.meter.event(rest, false, m.call.started);
                    }
                    let failure = (!m.meter.complete).then_some("upstream_cut");
                    this.end(failure);
                    return Poll::Ready(rest.map(|r| Ok(Frame::data(r))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.metering.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the server is stopping).
        self.end(Some("client_disconnected"));
    }
}
