//! The HTTP client the gateway forwards with: hyper's pooled client over TCP, or TLS
//! (rustls, the webpki roots) for `https` providers; one per provider.
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

/// The answer's body as it arrives from the provider.
pub type UpstreamBody = hyper::body::Incoming;

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

    /// Sends `req` to provider `i` on this thread's pool.
    pub fn request(
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
                            if tcp.write_all(answer).await.is_err() {
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
    /// runtime, whose worker keeps driving the connections opened on it (so another
    /// thread sharing the pool would find them alive and idle).
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
                // hyper puts the connection back in the pool from a task of its own:
                // on a loaded machine the next request could start before it is back
                // and open a second one (seen once in a whole-suite run).
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        // hyper returns a connection to its pool from a task of its own: give it time,
        // so that a shared pool would offer it to the next thread.
        std::thread::sleep(Duration::from_millis(100));
        rt
    }

    #[test]
    fn each_thread_keeps_its_own_pool_and_reuses_it() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, accepted) = provider(&rt);
        let timeout = Duration::from_secs(5);
        let clients = Clients::new(vec![client(timeout).unwrap()], vec![timeout]);
        let first = std::thread::scope(|s| s.spawn(|| two_requests(&clients, &url)).join());
        let first = first.unwrap();
        // Kept alive and reused on the same thread: one connection.
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Another thread does not take the first thread's idle connection.
        let second = std::thread::scope(|s| s.spawn(|| two_requests(&clients, &url)).join());
        let second = second.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Another gateway's clients on a thread that has some: a pool of their own.
        let other = Clients::new(vec![client(timeout).unwrap()], vec![timeout]);
        let third = std::thread::scope(|s| {
            s.spawn(|| (two_requests(&clients, &url), two_requests(&other, &url)))
                .join()
        });
        let third = third.unwrap();
        drop((first, second, third));
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }
}
