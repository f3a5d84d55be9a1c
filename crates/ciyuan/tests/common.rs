//! Starting the real binary and talking to it.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ciyuan"))
}

/// A running `ciyuan serve`.
pub struct Server {
    pub child: Child,
    pub url: String,
    /// The bootstrap admin key, when this start printed one.
    pub bootstrap: Option<String>,
    /// The data directory the server reported.
    pub data_dir: PathBuf,
}

impl Server {
    pub fn start(data: &Path) -> Server {
        Self::start_with(data, &[])
    }

    pub fn start_with(data: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra);
        Self::spawn(cmd)
    }

    /// Starts a prepared `ciyuan serve` command and waits until it listens.
    pub fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
            .env("CIYUAN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ciyuan serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut bootstrap = None;
        let mut data_dir = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            assert!(Instant::now() < deadline, "server did not start");
            let line = lines
                .next()
                .expect("server exited before listening")
                .expect("read");
            if let Some(k) = line.strip_prefix("bootstrap admin key (shown once, store it now): ") {
                bootstrap = Some(k.to_string());
            }
            if let Some(d) = line.strip_prefix("data directory: ") {
                data_dir = Some(PathBuf::from(d));
            }
            if let Some(u) = line.strip_prefix("listening on ") {
                break u.to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            url,
            bootstrap,
            data_dir: data_dir.expect("the server names its data directory"),
        }
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "server exited with {status}");
    }

    /// Runs `ciyuan ARGS --url URL --key KEY`.
    pub fn cli(&self, key: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("CIYUAN_URL", &self.url)
            .env("CIYUAN_KEY", key)
            .env("CIYUAN_LOG", "warn")
            .output()
            .expect("run ciyuan")
    }

    /// A new key on `account` with `scopes` (comma-separated), made with `admin`.
    pub fn new_key(&self, admin: &str, account: &str, scopes: &str) -> String {
        let out = stdout(&self.cli(
            admin,
            &[
                "keys",
                "create",
                "--account",
                account,
                "--scopes",
                scopes,
                "--json",
            ],
        ));
        json(out.as_bytes())["key"]
            .as_str()
            .expect("the new key")
            .to_string()
    }

    /// A blocking HTTP call: (status, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<&Value>,
    ) -> (u16, Vec<u8>) {
        http(&self.url, method, path, key, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.1 client over a TCP stream: enough for tests, no extra dependency.
pub fn http(
    url: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> (u16, Vec<u8>) {
    try_http(url, method, path, key, body).expect("HTTP request")
}

/// The same, answering an error when the server goes away mid-request.
pub fn try_http(
    url: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::{Error, Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let cut = || Error::other("response cut short");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(cut)?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(cut)?;
    let mut payload = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload);
    }
    Ok((status, payload))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if len == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + len]);
        b = &b[nl + 2 + len + 2..];
    }
    out
}

pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

pub fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `ciyuan audit verify PATH`: (exit code, stdout + stderr).
pub fn verify(path: &Path) -> (i32, String) {
    let o = Command::new(bin())
        .args(["audit", "verify"])
        .arg(path)
        .env("CIYUAN_LOG", "warn")
        .output()
        .expect("run verify");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}
