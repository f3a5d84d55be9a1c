//! The HTTP client the gateway forwards with: HTTP/1.1 connections of each thread's
//! own for plain-`http` providers, driven by the request that uses them; hyper's
//! pooled client with TLS (rustls, the webpki roots) for `https` ones.
//!
//! A pooled connection is driven by a task of its own: the request goes to it through
//! a channel and the answer comes back through another, a wake-up of that task and of
//! the request's each way. Driven inline, a request costs neither (BENCHMARKS.md,
//! issue 18: about 10% more throughput, 4% less added latency at one connection). A
//! provider over TLS is far enough that the hop does not show.
//!
//! hyper directly rather than a higher-level client: the gateway builds each request
//! from parts it already holds (a parsed URL, prepared credential headers, the body as
//! received), and relays the answer's body frame by frame; a convenience layer in
//! between cost CPU on every request (URL and header re-parsing, boxing, retry and
//! redirect machinery) and memory on every open stream.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

/// A pooled client to one provider.
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The answer's body as it arrives from the provider: from hyper's pooled client, or
/// from a connection of this thread's that the body drives itself ([`Inline`]).
pub enum UpstreamBody {
    /// From hyper's pooled client (`https` providers).
    Pooled(hyper::body::Incoming),
    /// From an inline connection, which goes back to this thread's idle list when the
    /// body ends (and is closed if the body is dropped before).
    Inline {
        body: hyper::body::Incoming,
        conn: Option<Inline>,
        home: (u64, usize),
    },
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        match self.get_mut() {
            UpstreamBody::Pooled(b) => std::pin::Pin::new(b).poll_frame(cx),
            UpstreamBody::Inline { body, conn, home } => {
                // The connection reads the socket and feeds the body: driven here, by
                // the task that reads the body, not by a task of its own.
                if let Some(c) = conn
                    && c.conn.as_mut().poll(cx).is_ready()
                {
                    *conn = None;
                }
                let polled = std::pin::Pin::new(&mut *body).poll_frame(cx);
                // Back to the idle list once the body has ended, whether its reader
                // saw the end (`None`) or stopped at `is_end_stream` (as hyper's
                // server does): a body dropped before its end closes the connection.
                let ended = matches!(polled, Poll::Ready(None))
                    || (matches!(polled, Poll::Ready(Some(Ok(_)))) && body.is_end_stream());
                if ended && let Some(c) = conn.take() {
                    idle_put(*home, c);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Pooled(b) | UpstreamBody::Inline { body: b, .. } => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpstreamBody::Pooled(b) | UpstreamBody::Inline { body: b, .. } => b.size_hint(),
        }
    }
}

/// A plain-`http` connection to a provider with no task of its own: whoever waits on
/// it polls it (the request's task until the head, then the answer's body). hyper's
/// pooled client drives each connection from a task of its own, so every request and
/// answer passed through a channel and woke that task: a hop per direction.
pub struct Inline {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: std::pin::Pin<
        Box<
            hyper::client::conn::http1::Connection<
                hyper_util::rt::TokioIo<tokio::net::TcpStream>,
                Full<Bytes>,
            >,
        >,
    >,
    idle_since: std::time::Instant,
}

/// How long an idle inline connection is kept (as the pooled client's idle timeout).
const INLINE_IDLE: Duration = Duration::from_secs(90);

/// Most idle inline connections a thread keeps.
const INLINE_IDLE_MAX: usize = 1024;

thread_local! {
    /// This thread's idle inline connections, by `(clients id, provider)`.
    static IDLE: std::cell::RefCell<Vec<((u64, usize), Inline)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn idle_put(home: (u64, usize), mut c: Inline) {
    c.idle_since = std::time::Instant::now();
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        // Oldest first: what has idled too long, or is one too many, is at the front.
        close_idle_since(&mut idle, INLINE_IDLE);
        let over = (idle.len() + 1).saturating_sub(INLINE_IDLE_MAX);
        idle.drain(..over);
        idle.push((home, c));
    });
}

/// Closes this thread's inline connections that have idled for [`INLINE_IDLE`]: each
/// request thread calls it on its periodic tick, so a thread that goes quiet does not
/// keep its providers' sockets open (hyper's pool closes its own from a timer).
pub fn close_expired_idle() {
    IDLE.with(|idle| close_idle_since(&mut idle.borrow_mut(), INLINE_IDLE));
}

/// Closes the connections of `idle` (oldest first) that have idled for `age`.
fn close_idle_since(idle: &mut Vec<((u64, usize), Inline)>, age: Duration) {
    let expired = idle
        .iter()
        .take_while(|(_, c)| c.idle_since.elapsed() >= age)
        .count();
    idle.drain(..expired);
}

/// This thread's most recently idled connection to `home`, if it is still open: polled
/// once, a connection the provider closed is done (and dropped), an open one ready.
async fn idle_take(home: (u64, usize)) -> Option<Inline> {
    use std::future::Future;
    use std::task::Poll;
    loop {
        let mut c = IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let at = idle.iter().rposition(|(h, _)| *h == home)?;
            Some(idle.remove(at).1)
        })?;
        if c.idle_since.elapsed() >= INLINE_IDLE {
            continue;
        }
        let live = std::future::poll_fn(|cx| {
            if c.conn.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            match c.send.poll_ready(cx) {
                Poll::Ready(r) => Poll::Ready(r.is_ok()),
                Poll::Pending => Poll::Ready(false),
            }
        })
        .await;
        if live {
            return Some(c);
        }
    }
}

/// Why a request to a provider failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// hyper's pooled client.
    Pooled(hyper_util::client::legacy::Error),
    /// An inline connection.
    Inline(hyper::Error),
    /// Connecting.
    Connect(std::io::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Pooled(e) => e.fmt(f),
            UpstreamError::Inline(e) => e.fmt(f),
            UpstreamError::Connect(e) => write!(f, "connect: {e}"),
        }
    }
}

impl std::error::Error for UpstreamError {
    // Each variant shows its own message; the causes below it are its source's.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Pooled(e) => e.source(),
            UpstreamError::Inline(e) => e.source(),
            UpstreamError::Connect(e) => e.source(),
        }
    }
}

impl From<hyper_util::client::legacy::Error> for UpstreamError {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        UpstreamError::Pooled(e)
    }
}

impl From<hyper::Error> for UpstreamError {
    fn from(e: hyper::Error) -> Self {
        UpstreamError::Inline(e)
    }
}

/// Builds a client that connects within `connect_timeout` and keeps idle connections
/// for reuse (TCP_NODELAY: streamed requests must not wait for Nagle).
pub fn client(connect_timeout: Duration) -> Result<UpstreamClient, String> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    // The crypto provider is named, not taken from the process default: which default
    // exists depends on the features other crates turn on.
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("TLS set-up: {e}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(tls))
}

/// Most gateways whose clients one thread keeps (a process runs one; tests run many,
/// each `App` with its own).
const THREAD_GATEWAYS: usize = 8;

thread_local! {
    /// This thread's clients, by [`Clients::id`]: a request and the provider's
    /// connection it is sent on are served by the same thread, with no wake-up of
    /// another in between (see [`Clients`]).
    static LOCAL: std::cell::RefCell<Vec<(u64, Vec<UpstreamClient>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The gateway's clients, one per provider, and a pool of connections per thread.
///
/// A pooled connection is driven by a task on the runtime that opened it. Shared by
/// every thread, a request on one thread would often be sent on a connection another
/// thread drives: its bytes written there, the answer read there and handed back, two
/// wake-ups of another thread per request (on a thread-per-core server, where each
/// request thread is a runtime of its own, on every request that picks another's
/// connection). Kept per thread, the request, its connection and its answer stay on
/// one thread. Each thread builds its clients on its first request; if that failed
/// (it did not at start, with the same settings), the shared ones serve it.
pub struct Clients {
    /// Which gateway these are, for the thread-local table.
    id: u64,
    connect_timeouts: Vec<Duration>,
    /// Built at start (so a bad setting stops the start), and the fallback.
    shared: Vec<UpstreamClient>,
}

impl Clients {
    /// The clients built at start for each provider, with their connect timeouts
    /// (each thread builds its own alike).
    pub fn new(shared: Vec<UpstreamClient>, connect_timeouts: Vec<Duration>) -> Clients {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        assert_eq!(
            shared.len(),
            connect_timeouts.len(),
            "one client per provider"
        );
        Clients {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connect_timeouts,
            shared,
        }
    }

    /// Sends `req` to provider `i`: over a plain-`http` connection of this thread's
    /// driven inline, else on this thread's pool of hyper's client.
    pub async fn request(
        &self,
        i: usize,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<UpstreamBody>, UpstreamError> {
        if req.uri().scheme() == Some(&hyper::http::uri::Scheme::HTTP) {
            return self.request_inline(i, req).await;
        }
        let resp = self.pooled(i, req).await?;
        Ok(resp.map(UpstreamBody::Pooled))
    }

    async fn request_inline(
        &self,
        i: usize,
        mut req: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<UpstreamBody>, UpstreamError> {
        use std::future::Future;
        let home = (self.id, i);
        let uri = req.uri().clone();
        if let Some(a) = uri.authority()
            && !req.headers().contains_key(hyper::header::HOST)
            && let Ok(v) = hyper::header::HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
        // hyper's connection sends the target as given: the origin form, made from
        // the parsed path (shared, not copied or parsed again for every request).
        *req.uri_mut() = match uri.path_and_query() {
            Some(p) => {
                let mut origin = hyper::http::uri::Parts::default();
                origin.path_and_query = Some(p.clone());
                hyper::Uri::from_parts(origin).map_err(|e| {
                    UpstreamError::Connect(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                })?
            }
            None => hyper::Uri::from_static("/"),
        };
        loop {
            let (mut c, reused) = match idle_take(home).await {
                Some(c) => (c, true),
                None => (self.connect(i, &uri).await?, false),
            };
            // The connection is driven here until the answer's head has come; a
            // finished connection future must not be polled again.
            let mut closed = false;
            let mut sent = std::pin::pin!(c.send.try_send_request(req));
            let answered = std::future::poll_fn(|cx| {
                if !closed {
                    closed = c.conn.as_mut().poll(cx).is_ready();
                }
                sent.as_mut().poll(cx)
            })
            .await;
            match answered {
                Ok(resp) => {
                    let conn = (!closed).then_some(c);
                    return Ok(resp.map(|body| UpstreamBody::Inline { body, conn, home }));
                }
                // An idle connection the provider closed as the request was handed
                // to it, before a byte of it was written: sent again on another, as
                // hyper's pooled client does. A request that was written is not: a
                // provider may have acted on it.
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(UpstreamError::Inline(e.into_error())),
                },
            }
        }
    }

    /// A new plain-`http` connection to provider `i` at `uri`, within its connect
    /// timeout, with TCP_NODELAY as the pooled client's.
    async fn connect(&self, i: usize, uri: &hyper::Uri) -> Result<Inline, UpstreamError> {
        // An IPv6 literal's brackets are the URL's, not the address's.
        let host = uri
            .host()
            .unwrap_or("localhost")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let tcp = tokio::time::timeout(
            self.connect_timeouts[i],
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| {
            UpstreamError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "connect to {host}:{port} timed out after {}s",
                    self.connect_timeouts[i].as_secs_f64()
                ),
            ))
        })?
        .map_err(UpstreamError::Connect)?;
        tcp.set_nodelay(true).map_err(UpstreamError::Connect)?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        Ok(Inline {
            send,
            conn: Box::pin(conn),
            idle_since: std::time::Instant::now(),
        })
    }

    fn pooled(
        &self,
        i: usize,
        req: hyper::Request<Full<Bytes>>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            if let Some((_, clients)) = local.iter().find(|(id, _)| *id == self.id) {
                return clients[i].request(req);
            }
            let built: Result<Vec<UpstreamClient>, String> =
                self.connect_timeouts.iter().map(|t| client(*t)).collect();
            match built {
                Ok(clients) => {
                    let sent = clients[i].request(req);
                    if local.len() >= THREAD_GATEWAYS {
                        local.remove(0);
                    }
                    local.push((self.id, clients));
                    sent
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a thread's upstream clients failed to build; using the shared ones");
                    self.shared[i].request(req)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A provider that answers every request on a connection with a tiny keep-alive
    /// answer, counting the connections it accepted.
    fn provider(rt: &tokio::runtime::Runtime) -> (String, Arc<AtomicUsize>) {
        serve(rt, false)
    }

    /// As [`provider`], but it closes each connection after its first answer (as a
    /// provider whose keep-alive timeout ran out), without saying so in the answer.
    fn provider_closing(rt: &tokio::runtime::Runtime) -> (String, Arc<AtomicUsize>) {
        serve(rt, true)
    }

    fn serve(rt: &tokio::runtime::Runtime, close: bool) -> (String, Arc<AtomicUsize>) {
        let accepted = Arc::new(AtomicUsize::new(0));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let counted = accepted.clone();
        rt.spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        // Bodiless requests: one answer per head.
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(answer).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    /// Two requests one after the other from this thread, on `clients`; answers the
    /// runtime, kept alive so that the connections opened on it stay open.
    fn two_requests(clients: &Clients, url: &str) -> tokio::runtime::Runtime {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..2 {
                let mut req = hyper::Request::new(Full::new(Bytes::new()));
                *req.uri_mut() = url.parse().unwrap();
                let resp = clients.request(0, req).await.unwrap();
                assert_eq!(resp.status(), 200);
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap();
            }
        });
        rt
    }

    /// Sends `n` requests one after the other on this thread, reading each answer's
    /// body with `read`; panics if one fails.
    fn requests<F, R>(clients: &Clients, url: &str, n: usize, read: F)
    where
        F: Fn(hyper::Response<UpstreamBody>) -> R,
        R: std::future::Future<Output = ()>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for k in 0..n {
                let mut req = hyper::Request::new(Full::new(Bytes::new()));
                *req.uri_mut() = url.parse().unwrap();
                let resp = clients
                    .request(0, req)
                    .await
                    .unwrap_or_else(|e| panic!("request {k}: {e}"));
                assert_eq!(resp.status(), 200);
                read(resp).await;
                // Time for a closing provider's FIN to arrive before the next request.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    fn clients() -> Clients {
        let timeout = Duration::from_secs(5);
        Clients::new(vec![client(timeout).unwrap()], vec![timeout])
    }

    /// Runs `f` on a thread of its own, whose idle list (thread-local) starts empty.
    fn on_a_new_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| s.spawn(f).join().unwrap())
    }

    /// Reads an answer to its end.
    async fn read_whole(resp: hyper::Response<UpstreamBody>) {
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
    }

    #[test]
    fn an_idle_connection_the_provider_closed_is_not_used() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, accepted) = provider_closing(&rt);
        let clients = clients();
        on_a_new_thread(|| requests(&clients, &url, 5, read_whole));
        // Each answer's connection went idle and was closed by the provider: every
        // request found that out and opened a new one, none failed.
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn a_body_read_until_it_says_it_ended_gives_its_connection_back() {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, accepted) = provider(&rt);
        let clients = clients();
        on_a_new_thread(|| {
            // As hyper's server relays a body: frames until `is_end_stream`, then the
            // body is dropped without being polled for its end.
            requests(&clients, &url, 3, |resp| async {
                let mut body = resp.into_body();
                while !hyper::body::Body::is_end_stream(&body) {
                    body.frame().await.unwrap().unwrap();
                }
            })
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn connections_idle_too_long_are_closed() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, accepted) = provider(&rt);
        let clients = clients();
        on_a_new_thread(|| {
            requests(&clients, &url, 1, read_whole);
            // The periodic sweep keeps what is younger than its age...
            close_expired_idle();
            assert_eq!(IDLE.with(|i| i.borrow().len()), 1);
            // ...and closes what is older.
            IDLE.with(|i| close_idle_since(&mut i.borrow_mut(), Duration::ZERO));
            assert_eq!(IDLE.with(|i| i.borrow().len()), 0);
            requests(&clients, &url, 1, read_whole);
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_body_dropped_before_its_end_closes_its_connection() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, accepted) = provider(&rt);
        let clients = clients();
        on_a_new_thread(|| requests(&clients, &url, 3, |resp| async { drop(resp) }));
        // What is left of an answer on the wire would be read as the next one's.
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn each_thread_keeps_its_own_pool_and_reuses_it() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, accepted) = provider(&rt);
        // Another gateway's clients too, for the end.
        let (clients, other) = (clients(), clients());
        let first = on_a_new_thread(|| two_requests(&clients, &url));
        // Kept alive and reused on the same thread: one connection.
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Another thread does not take the first thread's idle connection.
        let second = on_a_new_thread(|| two_requests(&clients, &url));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Another gateway's clients on a thread that has some: a pool of their own.
        let third = on_a_new_thread(|| (two_requests(&clients, &url), two_requests(&other, &url)));
        drop((first, second, third));
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }
}
