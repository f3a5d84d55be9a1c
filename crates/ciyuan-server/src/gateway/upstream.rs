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
