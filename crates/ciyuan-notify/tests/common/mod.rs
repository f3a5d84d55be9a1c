//! A scriptable webhook receiver on raw tokio TCP: verifies signatures with
//! `ciyuan_notify::verify`, records every request, de-duplicates on the event id, and
//! answers the first requests from a script (then 200).

#![allow(dead_code)]

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ciyuan_notify::jiff::Timestamp;
use ciyuan_notify::{Event, RetryPolicy, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How to answer one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, empty body.
    Status(u16),
    /// 429 with `retry-after: <seconds>`.
    TooMany(u64),
    /// Read the request, then close the connection without answering.
    Drop,
    /// Read the request and never answer.
    Hang,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub header_id: String,
    pub header_type: String,
    pub attempt: u32,
    pub content_type: String,
    pub signature: String,
    pub verified: bool,
    pub body: serde_json::Value,
}

impl Received {
    pub fn body_id(&self) -> &str {
        self.body["id"].as_str().unwrap_or("")
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    received: Vec<Received>,
    /// Event ids already processed (a receiver's de-duplication set).
    processed: HashSet<String>,
    /// Requests whose event id had been processed before.
    duplicates: usize,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const SECRET: &str = "whsec_test_secret";

impl Receiver {
    pub async fn start(script: Vec<Reply>) -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    pub async fn start_on(addr: SocketAddr, script: Vec<Reply>) -> Receiver {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = task_state.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        Receiver { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn target(&self, name: &str, events: &[&str]) -> Target {
        Target {
            name: name.into(),
            url: self.url(),
            secret: SECRET.into(),
            events: events.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.header_id.clone())
            .collect()
    }

    pub fn duplicates(&self) -> usize {
        self.state.lock().unwrap().duplicates
    }

    pub fn processed(&self) -> usize {
        self.state.lock().unwrap().processed.len()
    }

    /// Waits until at least `n` requests arrived (or `timeout`), returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut headers = std::collections::HashMap::new();
    for line in head.split("\r\n").skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..head_end + len];
    let header = |k: &str| headers.get(k).cloned().unwrap_or_default();
    let signature = header("x-ciyuan-signature");
    let verified = ciyuan_notify::verify(
        SECRET,
        &signature,
        body,
        Timestamp::now(),
        Duration::from_secs(300),
    );
    let received = Received {
        at: Instant::now(),
        header_id: header("x-ciyuan-event-id"),
        header_type: header("x-ciyuan-event-type"),
        attempt: header("x-ciyuan-delivery-attempt").parse().unwrap_or(0),
        content_type: header("content-type"),
        signature,
        verified,
        body: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
    };
    let reply = {
        let mut st = state.lock().unwrap();
        // Process (de-duplicating on the id) only what verifies.
        if verified && !st.processed.insert(received.header_id.clone()) {
            st.duplicates += 1;
        }
        st.received.push(received);
        st.script.pop_front().unwrap_or(Reply::Status(200))
    };
    let (code, extra) = match reply {
        Reply::Status(code) => (code, String::new()),
        Reply::TooMany(secs) => (429, format!("retry-after: {secs}\r\n")),
        Reply::Drop => return Ok(()),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            return Ok(());
        }
    };
    let code = if verified { code } else { 401 };
    let response =
        format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n{extra}\r\n");
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

pub fn event(id: &str, kind: &str) -> Event {
    Event {
        id: id.into(),
        kind: kind.into(),
        created: Timestamp::now(),
        data: serde_json::json!({"account": "acme/prod", "threshold": 0.8, "spent": "80.00", "limit": "100.00"}),
    }
}

pub fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 8,
        initial_backoff: Duration::from_millis(40),
        max_backoff: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
    }
}

/// A local address nothing listens on: a port below the kernel's ephemeral range,
/// checked free by binding it, then released.
///
/// Below the range, because a port bound to 0 and released could be handed by the
/// kernel to another test's listener (every receiver here binds port 0) before this
/// test means it to refuse connections; the kernel never picks a port outside the
/// range for `bind(0)` or an outgoing connection. Each call takes the next port
/// (tests of one binary run at once; binaries run one after another).
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (first, span) = (low.saturating_sub(8_000).max(1_024), 7_000u16);
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Runs of the tests one after another start in different places.
    let start = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = first + (start.wrapping_add(n)) % span;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
    panic!("no free port in {first}..{}", first + span);
}
