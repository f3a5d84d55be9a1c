//! The HTTP client behind the admin subcommands.

use crate::Remote;
use anyhow::{Context, anyhow, bail};
use reqwest::Method;
use serde_json::Value;

/// Most time one admin request may take.
const REQUEST_TIMEOUT_SECS: u64 = 60;

/// A request body.
enum Payload<'a> {
    /// Serialized as JSON.
    Json(&'a Value),
    /// Sent as it is, with its content type.
    Raw(&'a str, Vec<u8>),
}

/// A client of one Ciyuan server.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client from `--url`/`--key`.
    pub fn new(remote: &Remote) -> anyhow::Result<Client> {
        let key = remote.key.clone().ok_or_else(|| {
            anyhow!("no API key: pass --key or set CIYUAN_KEY (the bootstrap admin key is printed on the server's first start)")
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(REQUEST_TIMEOUT_SECS))
            .build()?;
        Ok(Client {
            http,
            base: remote.url.trim_end_matches('/').to_string(),
            key,
            rt,
        })
    }

    /// Sends a request; answers the body of a 2xx, or an error carrying the problem's
    /// detail.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Vec<u8>> {
        self.send(method, path, body.map(Payload::Json))
    }

    /// [`Client::call`] with a body that is not JSON (a file sent as it is).
    pub fn call_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let bytes = self.send(method, path, Some(Payload::Raw(content_type, body)))?;
        serde_json::from_slice(&bytes).context("the server's answer is not JSON")
    }

    fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Payload<'_>>,
    ) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.key);
            match body {
                Some(Payload::Json(b)) => req = req.json(b),
                Some(Payload::Raw(ct, bytes)) => {
                    req = req.header(reqwest::header::CONTENT_TYPE, ct).body(bytes)
                }
                None => {}
            }
            let resp = req
                .send()
                .await
                .with_context(|| format!("cannot reach the Ciyuan server at {}", self.base))?;
            let status = resp.status();
            let bytes = resp.bytes().await.context("reading the server's answer")?;
            if status.is_success() {
                return Ok(bytes.to_vec());
            }
            let detail = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{method} {path}: {status}: {detail}")
        })
    }

    /// A GET whose answer is streamed into `out` as it arrives (exports of any
    /// size); a transfer the server cuts is an error, never a short file taken whole.
    pub fn download(&self, path: &str, out: &mut dyn std::io::Write) -> anyhow::Result<u64> {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let mut resp = self
                .http
                .get(&url)
                .bearer_auth(&self.key)
                // An export runs as long as it has lines; the usual bound is for calls.
                .timeout(std::time::Duration::from_secs(24 * 3600))
                .send()
                .await
                .with_context(|| format!("cannot reach the Ciyuan server at {}", self.base))?;
            let status = resp.status();
            if !status.is_success() {
                let bytes = resp.bytes().await.context("reading the server's answer")?;
                let detail = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                bail!("GET {path}: {status}: {detail}");
            }
            let mut n = 0u64;
            while let Some(chunk) = resp
                .chunk()
                .await
                .with_context(|| format!("GET {path}: the transfer was cut after {n} bytes"))?
            {
                out.write_all(&chunk)?;
                n += chunk.len() as u64;
            }
            out.flush()?;
            Ok(n)
        })
    }

    /// Sends a batch of CloudEvents; answers the per-event results.
    pub fn events(&self, batch: &Value) -> anyhow::Result<Value> {
        let url = format!("{}/v1/events", self.base);
        self.rt.block_on(async {
            let resp = self
                .http
                .post(&url)
                .bearer_auth(&self.key)
                .header("content-type", "application/cloudevents-batch+json")
                .body(batch.to_string())
                .send()
                .await
                .with_context(|| format!("cannot reach the Ciyuan server at {}", self.base))?;
            let status = resp.status();
            let bytes = resp.bytes().await.context("reading the server's answer")?;
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if !status.is_success() {
                bail!(
                    "POST /v1/events: {status}: {}",
                    v["detail"].as_str().unwrap_or("error")
                );
            }
            Ok(v)
        })
    }

    /// A JSON call.
    pub fn json(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let bytes = self.call(method, path, body)?;
        serde_json::from_slice(&bytes).context("the server's answer is not JSON")
    }
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
