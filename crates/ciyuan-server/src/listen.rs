//! Accepting connections and serving HTTP/1.1 on them, with hyper's connection
//! settings in reach: how long a client may take to send a request's head and its body
//! (slow clients must not hold connections open), how large a connection's read buffer
//! may grow, and a stop that lets requests in flight finish (streams included).
//!
//! Two things hyper does not do are done here. Request bodies get a deadline: a body
//! still arriving when it passes is cut, and the request answered `408` in the
//! client's shape (OpenAI's or Anthropic's error object on the gateway's routes,
//! problem+json elsewhere). And the answers hyper writes itself, to requests it could
//! not parse (a head over 8 KiB: `431`; a bad `Transfer-Encoding`, request line or
//! header: `400`; a URI too long: `414`; ...), leave with a problem+json body naming
//! the problem instead of an empty one: hyper offers no hook for them, so the
//! connection's writes are watched, and a response head written while no request was
//! handed to the router (only hyper's own errors are) is completed with a body.

use crate::gateway::protocol::{Family, GatewayError};
use axum::Router;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::Write as _;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;

/// Longest wait for a request's head once a connection has started one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenConfig {
    /// Longest time from a request's head to the end of its body.
    pub body_timeout: Duration,
}

impl Default for ListenConfig {
    /// 30 s for a body: a 32 MiB prompt at 8 Mbit/s.
    fn default() -> Self {
        ListenConfig {
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` until `stop` completes, then stops accepting and waits
/// for the requests in flight to finish (idle connections are closed at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, router, stop, ListenConfig::default()).await
}

/// [`serve`] with settings.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()>,
    config: ListenConfig,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Request heads and bodies arrive in one read buffer each connection keeps; the
        // smallest hyper allows keeps a thousand open streams cheap, and bodies larger
        // than it are read in pieces anyway.
        .max_buf_size(8192);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if transient(&e) => {
                    tracing::warn!(error = %e, "accepting a connection failed; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
            () = &mut stop => break,
        };
        // Streamed answers go out chunk by chunk: Nagle's algorithm must not hold them.
        let _ = tcp.set_nodelay(true);
        let dispatched = Arc::new(AtomicU64::new(0));
        let io = Answering {
            inner: TokioIo::new(tcp),
            dispatched: dispatched.clone(),
            heads: 0,
            pending: Bytes::new(),
        };
        let conn = http.serve_connection(io, Service::new(&router, dispatched, config, peer));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that goes away mid-request is not the server's error.
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Errors after which accepting goes on: the one connection failed, or descriptors or
/// memory ran out for a moment.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted
            | ConnectionReset
            | ConnectionRefused
            | Interrupted
            | WouldBlock
            | TimedOut
    ) || matches!(e.raw_os_error(), Some(12 | 23 | 24 | 105))
}

/// The error shape a path's clients parse.
fn shape(path: &str) -> Option<Family> {
    match path {
        "/v1/messages" => Some(Family::Anthropic),
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models" => {
            Some(Family::OpenAi)
        }
        _ => None,
    }
}

/// The answer to a request whose body did not arrive within the deadline.
fn body_timeout_response(family: Option<Family>, limit: Duration) -> Response {
    let msg = format!(
        "the request body did not arrive within {}s; send it faster or in a smaller request",
        limit.as_secs_f64()
    );
    let mut resp = match family {
        Some(f) => GatewayError::new(StatusCode::REQUEST_TIMEOUT, msg).into_response(f),
        None => crate::error::ApiError::new(StatusCode::REQUEST_TIMEOUT, "request-timeout", msg)
            .into_response(),
    };
    // The rest of the body may still be on its way: the connection is not reused.
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

/// The router behind a body deadline; counts the requests handed to it.
#[derive(Clone)]
struct Service {
    router: TowerToHyperService<Router>,
    dispatched: Arc<AtomicU64>,
    config: ListenConfig,
    /// The client's address, given to handlers (sign-in attempts are limited by it).
    peer: std::net::SocketAddr,
}

impl Service {
    fn new(
        router: &Router,
        dispatched: Arc<AtomicU64>,
        config: ListenConfig,
        peer: std::net::SocketAddr,
    ) -> Service {
        Service {
            router: TowerToHyperService::new(router.clone()),
            dispatched,
            config,
            peer,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.dispatched.fetch_add(1, Ordering::AcqRel);
        let (mut parts, body) = req.into_parts();
        let family = shape(parts.uri.path());
        // The peer's address is read by the admin API's sign-in alone (attempts are
        // limited by it); the doors under `/v1/` are spared the map it goes into.
        if !parts.uri.path().starts_with("/v1/") {
            parts
                .extensions
                .insert(axum::extract::ConnectInfo(self.peer));
        }
        let expired = Arc::new(AtomicBool::new(false));
        let limit = self.config.body_timeout;
        let body = Deadline {
            inner: body,
            limit,
            timer: None,
            expired: expired.clone(),
        };
        let answer = hyper::service::Service::call(&self.router, Request::from_parts(parts, body));
        Box::pin(async move {
            let resp = answer.await?;
            if expired.load(Ordering::Acquire) {
                return Ok(body_timeout_response(family, limit));
            }
            Ok(resp)
        })
    }
}

/// A request body that fails once its deadline has passed before its end. The
/// deadline runs from the first read that has to wait: a body that has arrived with
/// its head (nearly every request) never sets a timer, which cost a clock read, an
/// allocation and a timer wheel entry on every request.
struct Deadline {
    inner: Incoming,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: Arc<AtomicBool>,
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request body deadline passed",
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's IO, completing hyper's own error answers with a problem+json body.
struct Answering {
    inner: TokioIo<tokio::net::TcpStream>,
    /// Requests handed to the router on this connection.
    dispatched: Arc<AtomicU64>,
    /// Response heads written on this connection.
    heads: u64,
    /// A completed answer still to be written.
    pending: Bytes,
}

/// hyper's answers to what it cannot parse, as their status lines start.
const HYPER_ERRORS: [(&[u8], &str); 6] = [
    (
        b"HTTP/1.1 400 ",
        "the request could not be parsed as HTTP/1.1 (request line, a header, or Transfer-Encoding: only chunked, last, is accepted)",
    ),
    (b"HTTP/1.1 414 ", "the request URI is too long"),
    (
        b"HTTP/1.1 431 ",
        "the request head (request line and headers) is larger than 8 KiB",
    ),
    (
        b"HTTP/1.1 501 ",
        "the request uses a method or feature this server does not implement",
    ),
    (b"HTTP/1.1 505 ", "only HTTP/1.1 and HTTP/1.0 are served"),
    (
        b"HTTP/1.1 413 ",
        "the request is larger than this server accepts",
    ),
];

/// hyper's own answer, completed with a problem+json body: `None` if `head` is not one.
fn complete_hyper_error(head: &[u8]) -> Option<Bytes> {
    let (_, detail) = HYPER_ERRORS.iter().find(|(p, _)| head.starts_with(p))?;
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&head[..end]).ok()?;
    // Only an answer without a body is hyper's (every answer of the router has one).
    if !text.contains("\r\ncontent-length: 0\r\n") || end != head.len() {
        return None;
    }
    let status: u16 = text.get(9..12)?.parse().ok()?;
    let status = StatusCode::from_u16(status).ok()?;
    let body = serde_json::json!({
        "type": "urn:ciyuan:problem:bad-http",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    })
    .to_string();
    let mut out = String::with_capacity(end + body.len() + 80);
    // hyper closes the connection after these; it says so in most of them.
    let closes = text.contains("\r\nconnection: close\r\n");
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        if line == "content-length: 0" {
            out.push_str("content-type: application/problem+json\r\n");
            out.push_str(&format!("content-length: {}\r\n", body.len()));
            if !closes {
                out.push_str("connection: close\r\n");
            }
        } else {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(Bytes::from(out))
}

impl Answering {
    /// Writes what is pending; ready once nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.pending.is_empty() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let _ = self.pending.split_to(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Looks at the start of a write: true when it was taken as hyper's own answer,
    /// completed, and is now pending.
    fn watch(&mut self, buf: &[u8]) -> bool {
        // `100 Continue` is an interim answer: the request's own follows.
        if !buf.starts_with(b"HTTP/1.") || buf.get(9..13) == Some(b"100 ") {
            return false;
        }
        self.heads += 1;
        // Every request handed to the router has its answer written after it was
        // handed on: a head beyond those is hyper's.
        if self.heads <= self.dispatched.load(Ordering::Acquire) {
            return false;
        }
        match complete_hyper_error(buf) {
            Some(done) => {
                self.pending = done;
                true
            }
            None => false,
        }
    }
}

impl hyper::rt::Read for Answering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Answering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if this.watch(buf) {
            // Taken whole; it goes out with the next write, flush or shutdown.
            let _ = this.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && first.starts_with(b"HTTP/1.")
        {
            // A head hyper completed for its own error is taken alone (a shorter
            // write than offered is allowed); any other goes out with what follows it
            // in one write: written alone, every answer cost a second system call and
            // woke the client twice.
            if this.watch(first) {
                let _ = this.drain(cx)?;
                return Poll::Ready(Ok(first.len()));
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_own_answers_get_a_problem_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 03:00:00 GMT\r\n\r\n";
        let done = complete_hyper_error(head).unwrap();
        let text = std::str::from_utf8(&done).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains("\r\ncontent-type: application/problem+json\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(head.contains("\r\ndate: "));
        assert_eq!(head.matches("connection: close").count(), 1, "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], 431);
        assert!(v["detail"].as_str().unwrap().contains("8 KiB"));
        // Answers with a body, or of other statuses, are left alone.
        assert!(complete_hyper_error(b"HTTP/1.1 431 X\r\ncontent-length: 5\r\n\r\n").is_none());
        assert!(complete_hyper_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(
            complete_hyper_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nxx")
                .is_none()
        );
    }
}
