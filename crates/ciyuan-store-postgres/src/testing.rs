//! A throwaway PostgreSQL cluster for tests: `initdb` into a temporary directory, then
//! `pg_ctl start` on a free loopback port, stopped and deleted when dropped.
//!
//! The machine's own PostgreSQL binaries are used (`$CIYUAN_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin`, else `PATH`). `initdb` refuses to run as root, so as
//! root the cluster is made and run as the `postgres` user (`runuser`). Set
//! `CIYUAN_TEST_DATABASE_URL` to use a server of your own instead (each test then
//! creates its own database on it).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster (or a server named by `CIYUAN_TEST_DATABASE_URL`).
pub struct TestCluster {
    /// `host=... port=... user=...` of the cluster, without a database name.
    base: String,
    /// The data directory and sockets; `None` for an outside server.
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    as_postgres: bool,
    /// The server's options (`pg_ctl -o`), to start it again on the same port.
    opts: String,
}

fn pg_bin() -> Result<PathBuf, String> {
    if let Ok(b) = std::env::var("CIYUAN_PG_BIN") {
        return Ok(PathBuf::from(b));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let which = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .map_err(|e| e.to_string())?;
    let path = String::from_utf8_lossy(&which.stdout).trim().to_string();
    match Path::new(&path).parent() {
        Some(dir) if which.status.success() => Ok(dir.to_path_buf()),
        _ => Err(
            "PostgreSQL's initdb is not on this machine (set CIYUAN_PG_BIN to its bin directory, \
             or CIYUAN_TEST_DATABASE_URL to a server)"
                .into(),
        ),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl TestCluster {
    /// Starts a cluster (or takes the outside server).
    pub fn start() -> Result<TestCluster, String> {
        if let Ok(url) = std::env::var("CIYUAN_TEST_DATABASE_URL") {
            return Ok(TestCluster {
                base: url,
                dir: None,
                bin: PathBuf::new(),
                as_postgres: false,
                opts: String::new(),
            });
        }
        let bin = pg_bin()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("ciyuan-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err("chown of the cluster's directory to postgres failed".into());
            }
        }
        let mut cluster = TestCluster {
            base: String::new(),
            dir: Some(dir),
            bin,
            as_postgres,
            opts: String::new(),
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "ciyuan",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        let port = free_port()?;
        let sockets = cluster.dir()?.to_path_buf();
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            sockets.display()
        );
        cluster.opts = opts;
        cluster.resume()?;
        cluster.base = format!("host=127.0.0.1 port={port} user=ciyuan");
        Ok(cluster)
    }

    /// Stops the server as an operator's restart does (`pg_ctl stop -m fast`: open
    /// transactions are rolled back, connections cut), keeping its data for
    /// [`TestCluster::resume`].
    pub fn halt(&self) -> Result<(), String> {
        let data = self.dir()?.join("data");
        self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
        )
    }

    /// Starts the server (again), on the same port, and waits until it accepts
    /// connections.
    pub fn resume(&self) -> Result<(), String> {
        let dir = self.dir()?;
        let data = dir.join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &self.opts,
                "-l",
                &dir.join("log").to_string_lossy(),
                "-w",
                "start",
            ],
        )
    }

    fn dir(&self) -> Result<&Path, String> {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .ok_or_else(|| "an outside server has no directory".into())
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Stops and deletes the cluster once the process `pid` has ended, for a cluster
    /// that is never dropped (one kept in a `static` for a whole test run: Rust runs
    /// no destructors of statics, and an `initdb`'d cluster left running would keep
    /// its port, its memory and its directory). A small shell process watches `pid`
    /// once a second; an outside server (`CIYUAN_TEST_DATABASE_URL`) is left alone.
    pub fn stop_when_process_ends(&self, pid: u32) -> Result<(), String> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let pg_ctl = self.bin.join("pg_ctl");
        let data = dir.path().join("data");
        let stop = if self.as_postgres {
            "runuser -u postgres -- \"$2\" -D \"$3\" -m immediate -w stop"
        } else {
            "\"$2\" -D \"$3\" -m immediate -w stop"
        };
        let script = format!(
            "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf \"$4\""
        );
        Command::new("sh")
            .args(["-c", &script, "ciyuan-pg-watch", &pid.to_string()])
            .arg(&pg_ctl)
            .arg(&data)
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| format!("starting the cluster's watcher: {e}"))
    }

    /// A new, empty database on the cluster; answers its connection string.
    pub fn database(&self, name: &str) -> Result<String, String> {
        let admin =
            if self.base.starts_with("postgres://") || self.base.starts_with("postgresql://") {
                self.base.clone()
            } else {
                format!("{} dbname=postgres", self.base)
            };
        let mut c =
            postgres::Client::connect(&admin, postgres::NoTls).map_err(|e| crate::describe(&e))?;
        // Each its own statement: CREATE DATABASE cannot run in a transaction block.
        c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .map_err(|e| crate::describe(&e))?;
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .map_err(|e| crate::describe(&e))?;
        if self.base.starts_with("postgres") {
            // A URL: replace its path (the database) with the new one.
            let cut = self.base.rfind('/').unwrap_or(self.base.len());
            let (head, tail) = self.base.split_at(cut);
            let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
            Ok(format!("{head}/{name}{query}"))
        } else {
            Ok(format!("{} dbname={name}", self.base))
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let data = dir.path().join("data");
            if let Err(e) = self.run(
                "pg_ctl",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            ) {
                eprintln!("stopping the test cluster: {e}");
            }
        }
    }
}
