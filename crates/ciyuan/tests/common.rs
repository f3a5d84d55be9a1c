//! Starting the real binary and talking to it.

use ciyuan_store_postgres::testing::TestCluster;
use serde_json::Value;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ciyuan"))
}

/// The build directory the tests run from (`target/`), where their installs live.
pub fn target_dir() -> PathBuf {
    bin().parent().unwrap().parent().unwrap().to_path_buf()
}

/// The Python of a virtual environment `name` under the build directory with the
/// packages of `requirements` (a file under this crate), made once per build
/// directory. The suite runs a second time on PostgreSQL in a child process beside the
/// first: two installs into one directory break each other, so the install is made
/// under a file lock (released when `lock` drops).
pub fn venv_python(name: &str, requirements: &str) -> PathBuf {
    let reqs = Path::new(env!("CARGO_MANIFEST_DIR")).join(requirements);
    let wanted = std::fs::read_to_string(&reqs).unwrap();
    let target = target_dir();
    let venv = target.join(name);
    let python = venv.join("bin/python");
    let stamp = venv.join("installed-requirements.txt");
    let lock = std::fs::File::create(target.join(format!("{name}.lock"))).unwrap();
    lock.lock()
        .unwrap_or_else(|e| panic!("locking the virtual environment {name}: {e}"));
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .unwrap_or_else(|e| panic!("removing the half-made environment {name}: {e}"));
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(
        ok.success(),
        "creating the virtual environment {name} failed"
    );
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&reqs)
        .status()
        .expect("pip");
    assert!(
        ok.success(),
        "installing {} into {name} failed",
        reqs.display()
    );
    std::fs::write(&stamp, wanted).unwrap();
    python
}

/// Where the servers the tests start keep their log and projections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    /// The embedded default: ledger files and SQLite in the data directory.
    Sqlite,
    /// One database per server on a PostgreSQL cluster shared by the test process.
    Postgres,
}

/// The backend `CIYUAN_TEST_BACKEND` names (`sqlite` or `postgres`); `None` when it is
/// unset: then this process runs on SQLite and runs the suite again on PostgreSQL
/// (`every_test_again_on_postgres`). Any other value fails every test that starts a
/// server: a typo must not quietly test the default instead.
pub fn chosen_backend() -> Option<Backend> {
    match std::env::var("CIYUAN_TEST_BACKEND").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("") => None,
        Ok("sqlite") => Some(Backend::Sqlite),
        Ok("postgres") => Some(Backend::Postgres),
        Ok(other) => {
            panic!("CIYUAN_TEST_BACKEND={other:?}: expected `sqlite` or `postgres` (unset: both)")
        }
        Err(e) => panic!("CIYUAN_TEST_BACKEND: {e}"),
    }
}

/// The backend the servers of this process run on.
pub fn backend() -> Backend {
    chosen_backend().unwrap_or(Backend::Sqlite)
}

/// The one PostgreSQL cluster of this test process, started on first use and stopped
/// when the process ends. A missing PostgreSQL fails the test that asked, loudly.
fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let c = TestCluster::start().unwrap_or_else(|e| {
            panic!("CIYUAN_TEST_BACKEND=postgres needs PostgreSQL (initdb, pg_ctl): {e}")
        });
        c.stop_when_process_ends(std::process::id())
            .unwrap_or_else(|e| panic!("{e}"));
        c
    })
}

/// Each data directory's database (PostgreSQL backend): a restart of the same server
/// reuses it.
fn databases() -> &'static Mutex<HashMap<PathBuf, String>> {
    static DATABASES: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    DATABASES.get_or_init(Mutex::default)
}

/// The database of the server whose data directory is `data`, created on first use.
pub fn database_for(data: &Path) -> String {
    // Started before the map is locked: a cluster that cannot start fails each test
    // with its own reason, not with the lock poisoned by the first.
    let cluster = cluster();
    let mut map = databases().lock().unwrap();
    if let Some(url) = map.get(data) {
        return url.clone();
    }
    let name = format!("ciyuan_test_{}", map.len());
    let url = cluster
        .database(&name)
        .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
    map.insert(data.to_path_buf(), url.clone());
    url
}

/// The database a server on `data` used, if it ran on PostgreSQL.
pub fn database_of(data: &Path) -> Option<String> {
    databases().lock().unwrap().get(data).cloned()
}

/// What `ciyuan audit verify` and friends should read for the server that used `data`:
/// the directory itself, or its database on the PostgreSQL backend.
pub fn audit_target(data: &Path) -> OsString {
    match database_of(data) {
        Some(url) => OsString::from(url),
        None => data.as_os_str().to_owned(),
    }
}

/// Every row of every table of the database at `url`, as text, by table: to look for
/// what must never be stored (key secrets).
pub fn database_text(url: &str) -> Vec<(String, String)> {
    let pool = ciyuan_store_postgres::Pool::connect(url).unwrap();
    let mut c = pool.get().unwrap();
    let tables: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!tables.is_empty(), "no tables in {url}");
    tables
        .into_iter()
        .map(|t| {
            let text: Option<String> = c
                .query_one(
                    format!("SELECT string_agg(t::text, E'\\n') FROM \"{t}\" t").as_str(),
                    &[],
                )
                .unwrap()
                .get(0);
            (t, text.unwrap_or_default())
        })
        .collect()
}

/// `ciyuan rebuild` of the server that used `data`: its data directory, or its
/// database on the PostgreSQL backend.
pub fn rebuild(data: &Path) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["rebuild", "--data"]).arg(data);
    if let Some(url) = database_of(data) {
        cmd.args(["--database", &url]);
    }
    cmd.env("CIYUAN_LOG", "warn")
        .output()
        .expect("run ciyuan rebuild")
}

/// The data directory a prepared `ciyuan serve` command names (`--data DIR`, else
/// `CIYUAN_DATA`).
fn data_of(cmd: &Command) -> Option<PathBuf> {
    let args: Vec<_> = cmd.get_args().collect();
    if let Some(i) = args.iter().position(|a| *a == "--data") {
        return args.get(i + 1).map(PathBuf::from);
    }
    cmd.get_envs()
        .find(|(k, _)| *k == "CIYUAN_DATA")
        .and_then(|(_, v)| v.map(PathBuf::from))
}

/// On the PostgreSQL backend, points a `ciyuan serve` command at its data directory's
/// database, unless the command names a database of its own.
pub fn with_backend(mut cmd: Command) -> Command {
    if backend() == Backend::Sqlite {
        return cmd;
    }
    let args: Vec<_> = cmd.get_args().collect();
    let serve = args.iter().any(|a| *a == "serve");
    let own = args.iter().any(|a| *a == "--database")
        || cmd.get_envs().any(|(k, _)| k == "CIYUAN_DATABASE");
    if !serve || own {
        return cmd;
    }
    let data = data_of(&cmd).unwrap_or_else(|| {
        panic!("CIYUAN_TEST_BACKEND=postgres: this serve command names no data directory (--data or CIYUAN_DATA), so it cannot be given its database")
    });
    cmd.args(["--database", &database_for(&data)]);
    cmd
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

    /// `ciyuan serve` on the embedded backend whatever `CIYUAN_TEST_BACKEND` says, for
    /// tests whose subject is a data directory's files (`migrate --from`).
    pub fn start_embedded(data: &Path) -> Server {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data);
        Self::spawn_as_is(cmd)
    }

    /// Starts a prepared `ciyuan serve` command on the test backend and waits until
    /// it listens.
    pub fn spawn(cmd: Command) -> Server {
        Self::spawn_as_is(with_backend(cmd))
    }

    fn spawn_as_is(mut cmd: Command) -> Server {
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

    /// `ciyuan prices import --format toml FILE` by `key`: the CLI's answer.
    pub fn import_toml_book(&self, key: &str, file: &Path) -> String {
        stdout(&self.cli(
            key,
            &[
                "prices",
                "import",
                "--format",
                "toml",
                file.to_str().unwrap(),
            ],
        ))
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

/// Polls `done` every 200 ms until it holds, failing the test after `secs` seconds:
/// for what the servers finish after they answer (a gateway call's entry, a lease
/// handed between nodes), where a fixed sleep is a race on a loaded machine.
pub fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
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

/// `ciyuan audit export BUNDLE --database URL`, which must succeed.
pub fn export_database(url: &str, bundle: &Path) {
    let exported = Command::new(bin())
        .args(["audit", "export"])
        .arg(bundle)
        .args(["--database", url])
        .output()
        .expect("run audit export");
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
}

/// `ciyuan audit verify PATH`: (exit code, stdout + stderr). A data directory a
/// server used on the PostgreSQL backend is verified as its database.
pub fn verify(path: &Path) -> (i32, String) {
    let o = Command::new(bin())
        .args(["audit", "verify"])
        .arg(audit_target(path))
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

/// Fails the run when `CIYUAN_TEST_BACKEND` names no backend, or names PostgreSQL and
/// no cluster can start, even when no other test that runs starts a server.
#[test]
fn the_test_backend_is_known_and_ready() {
    let b = backend();
    if b == Backend::Postgres {
        let url = database_for(Path::new("/the-test-backend-is-ready"));
        let pool = ciyuan_store_postgres::Pool::connect(&url).unwrap();
        let one: i32 = pool
            .get()
            .unwrap()
            .query_one("SELECT 1", &[])
            .unwrap()
            .get(0);
        assert_eq!(one, 1);
    }
    println!("servers run on {b:?}");
}

/// With no backend chosen, `cargo test` runs the suite on both: this process on
/// SQLite, and this test the whole suite again in a child process on PostgreSQL, so
/// one command (the README's) covers both and a missing PostgreSQL fails it. The child
/// runs one test at a time, and this test holds one of this process's test threads
/// meanwhile: as many servers run at once as in a run on one backend.
#[test]
fn every_test_again_on_postgres() {
    if let Some(b) = chosen_backend() {
        println!("CIYUAN_TEST_BACKEND={b:?}: this run is on {b:?} only");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let o = Command::new(&exe)
        .args(["--test-threads", "1"])
        .env("CIYUAN_TEST_BACKEND", "postgres")
        .output()
        .unwrap_or_else(|e| panic!("running {} again: {e}", exe.display()));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the suite on PostgreSQL failed ({}; rerun one test with CIYUAN_TEST_BACKEND=postgres):\n{out}{err}",
        o.status
    );
    let summary = out
        .lines()
        .rfind(|l| l.starts_with("test result:"))
        .unwrap_or("no summary");
    // The suite on PostgreSQL must have run, not filtered itself away.
    assert!(
        summary.contains(" passed;") && !summary.contains(" 0 passed;"),
        "{out}"
    );
    println!("on PostgreSQL, in {:.0?}: {summary}", started.elapsed());
}
