//! The floor: the least a Rust reverse proxy shaped like Ciyuan's gateway does per
//! request, to measure beside nginx and the gateway on one machine. One
//! current-thread tokio runtime per core, each with its own `SO_REUSEPORT` listener
//! and its own pool of provider connections (as the gateway's request threads);
//! request and answer heads read with `httparse`, bodies by `Content-Length` only;
//! the request passed on as it came, the answer passed back whole. No routing, no
//! metering, no ledger, and no care for what a product must handle (chunked bodies,
//! timeouts, errors shaped for the client): a yardstick, not a proxy to deploy.
//! With `--hyper` it does the same through hyper's HTTP/1 server and client
//! connections (as the gateway does), bodies collected whole: what hyper itself costs.
//!
//!     cargo build --release --manifest-path bench/floor/Cargo.toml
//!     bench/floor/target/release/ciyuan-floor 127.0.0.1:18090 127.0.0.1:PROVIDER_PORT [--hyper]
//!
//! then point wrk at `http://127.0.0.1:18090/v1/chat/completions`.

use std::cell::RefCell;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

thread_local! {
    /// This thread's idle provider connections.
    static POOL: RefCell<Vec<TcpStream>> = const { RefCell::new(Vec::new()) };
}

/// The length of a whole message's head and of its body, once its head has arrived.
fn lengths(buf: &[u8], request: bool) -> Option<(usize, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let (head, found) = if request {
        let mut r = httparse::Request::new(&mut headers);
        match r.parse(buf).ok()? {
            httparse::Status::Complete(n) => (n, r.headers),
            httparse::Status::Partial => return None,
        }
    } else {
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(buf).ok()? {
            httparse::Status::Complete(n) => (n, r.headers),
            httparse::Status::Partial => return None,
        }
    };
    let body = found
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    Some((head, body))
}

/// Reads one whole message into `buf`; `None` at the end of the stream or an error.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, request: bool) -> Option<()> {
    buf.clear();
    let mut want = None;
    loop {
        if want.is_none() {
            want = lengths(buf, request).map(|(h, b)| h + b);
        }
        if want.is_some_and(|w| buf.len() >= w) {
            return Some(());
        }
        buf.reserve(16 * 1024);
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn serve(mut client: TcpStream, provider: SocketAddr) -> Option<()> {
    client.set_nodelay(true).ok()?;
    let (mut request, mut answer) = (Vec::with_capacity(4096), Vec::with_capacity(4096));
    loop {
        read_message(&mut client, &mut request, true).await?;
        let mut up = match POOL.with(|p| p.borrow_mut().pop()) {
            Some(up) => up,
            None => {
                let up = TcpStream::connect(provider).await.ok()?;
                up.set_nodelay(true).ok()?;
                up
            }
        };
        up.write_all(&request).await.ok()?;
        read_message(&mut up, &mut answer, false).await?;
        POOL.with(|p| p.borrow_mut().push(up));
        client.write_all(&answer).await.ok()?;
    }
}

thread_local! {
    /// This thread's idle hyper client connections (`--hyper`).
    static HYPER_POOL: RefCell<Vec<hyper::client::conn::http1::SendRequest<Full<Bytes>>>> =
        const { RefCell::new(Vec::new()) };
}

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// One request through a pooled hyper client connection, its answer collected whole.
async fn forward(
    provider: SocketAddr,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut send = match HYPER_POOL.with(|p| p.borrow_mut().pop()) {
        Some(s) => s,
        None => {
            let tcp = TcpStream::connect(provider).await?;
            tcp.set_nodelay(true)?;
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            send
        }
    };
    let answer = send
        .send_request(hyper::Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = answer.into_parts();
    let body = body.collect().await?.to_bytes();
    HYPER_POOL.with(|p| p.borrow_mut().push(send));
    Ok(hyper::Response::from_parts(parts, Full::new(body)))
}

async fn serve_hyper(client: TcpStream, provider: SocketAddr) {
    if client.set_nodelay(true).is_err() {
        return;
    }
    let service = hyper::service::service_fn(move |req| forward(provider, req));
    let _closed = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(client), service)
        .await;
}

fn listen(at: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(at),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&at.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: ciyuan-floor LISTEN_ADDR PROVIDER_ADDR [--hyper]";
    let at: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let provider: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let hyper = args.next().as_deref() == Some("--hyper");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = listen(at)?;
                    loop {
                        let (c, _) = listener.accept().await?;
                        if hyper {
                            tokio::spawn(serve_hyper(c, provider));
                        } else {
                            tokio::spawn(serve(c, provider));
                        }
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "a thread panicked")??;
    }
    Ok(())
}
