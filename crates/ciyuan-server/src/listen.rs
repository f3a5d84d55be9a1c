//! Accepting connections and serving HTTP/1.1 on them, with hyper's connection
//! settings in reach: how long a client may take to send a request's head (slow
//! clients must not hold connections open), how large a connection's read buffer may
//! grow, and a stop that lets requests in flight finish (streams included).

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;

/// Longest wait for a request's head once a connection has started one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `stop` completes, then stops accepting and waits
/// for the requests in flight to finish (idle connections are closed at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()>,
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
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
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
        let conn =
            http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
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
