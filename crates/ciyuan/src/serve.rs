//! `ciyuan serve` and `ciyuan rebuild`: the embedded default, one data directory.
//!
//! Layout of the data directory: `ledger/` (the tamper-evident log: segments, sidecar,
//! checkpoints, signing key) and `ciyuan.db` (SQLite: projections and hashed keys).

use crate::config::{FileConfig, ServeConfig};
use anyhow::Context;
use ciyuan_ledger::{GroupCommitter, Ledger, LedgerOptions};
use ciyuan_server::{App, ServerConfig};
use ciyuan_store::{Log, Store};
use ciyuan_store_sqlite::SqliteStore;
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// Data directory.
    #[arg(long, env = "CIYUAN_DATA")]
    data: Option<PathBuf>,
    /// Keep the log and the projections in this PostgreSQL database
    /// (postgres://user@host:port/db) instead of the data directory, which then holds
    /// only the log's signing key and the webhook outbox.
    #[arg(long, env = "CIYUAN_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// HTTP listen address, HOST:PORT (port 0 picks a free one).
    #[arg(long, env = "CIYUAN_LISTEN")]
    listen: Option<String>,
    /// Admin key to install on first start instead of generating one.
    #[arg(long, env = "CIYUAN_BOOTSTRAP_ADMIN_KEY", hide_env_values = true)]
    bootstrap_admin_key: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "CIYUAN_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Seconds between automatic checkpoints while the log grows.
    #[arg(long, env = "CIYUAN_CHECKPOINT_INTERVAL_SECS")]
    checkpoint_interval_secs: Option<u64>,
    /// After starting, send a few calls through the gateway and print what the ledger
    /// recorded (needs the admin key: printed on first start, else from CIYUAN_KEY).
    #[arg(long)]
    demo: bool,
    /// Threads serving HTTP, each its own single-threaded runtime with its own
    /// listening socket on the address (SO_REUSEPORT: the kernel spreads connections)
    /// and its own connections to providers, so a request is served on one thread from
    /// its first byte to its answer. Default: one per core with the data directory;
    /// 0 serves every connection on the shared multi-threaded runtime (the only way
    /// with PostgreSQL, whose client blocks in place).
    #[arg(long, env = "CIYUAN_REQUEST_THREADS")]
    request_threads: Option<usize>,
}

#[derive(Args)]
pub struct RebuildArgs {
    /// Data directory.
    #[arg(long, env = "CIYUAN_DATA")]
    data: Option<PathBuf>,
    /// Rebuild the projections of this PostgreSQL database from its log instead
    /// (every node stopped: refused while other clients are connected to it).
    #[arg(long, env = "CIYUAN_DATABASE", hide_env_values = true)]
    database: Option<String>,
}

fn ledger_options(cfg: &ServeConfig) -> LedgerOptions {
    let mut opts = LedgerOptions::default();
    if let Some(o) = &cfg.origin {
        opts.origin = Some(o.clone());
    }
    if let Some(s) = cfg.segment_max_bytes {
        opts.segment_max_bytes = s;
    }
    opts
}

/// Opens the ledger and the store of a data directory.
fn open(data: &Path, opts: LedgerOptions) -> anyhow::Result<(Ledger, SqliteStore)> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating data directory {}", data.display()))?;
    let ledger = Ledger::open(&data.join("ledger"), opts)
        .with_context(|| format!("opening the ledger in {}", data.join("ledger").display()))?;
    let store = SqliteStore::open(&data.join("ciyuan.db"))
        .with_context(|| format!("opening {}", data.join("ciyuan.db").display()))?;
    Ok((ledger, store))
}

pub fn serve(config: Option<&Path>, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut file = match config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    // Flags and environment variables override the file.
    if args.max_body_bytes.is_some() {
        file.max_body_bytes = args.max_body_bytes;
    }
    if args.checkpoint_interval_secs.is_some() {
        file.checkpoint_interval_secs = args.checkpoint_interval_secs;
    }
    if let Some(url) = args.database {
        file.database = Some(crate::config::Secret(url));
    }
    let demo = args.demo;
    let cfg = ServeConfig::resolve(file, args.data, args.listen, args.bootstrap_admin_key)?;
    let request_threads = match (args.request_threads, &cfg.database) {
        (Some(n), Some(_)) if n > 0 => anyhow::bail!(
            "--request-threads {n}: with PostgreSQL every connection is served on the shared runtime (its client blocks in place, which a single-threaded runtime cannot host); leave it unset or 0"
        ),
        (_, Some(_)) => 0,
        (Some(n), None) => n,
        (None, None) if cfg!(unix) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        (None, None) => 0,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(url) = &cfg.database {
        let (log, store) = open_postgres(&cfg, &url.0)?;
        let shared: Arc<dyn Log> = log.clone();
        let result = rt.block_on(run(cfg, store, shared, demo, 0));
        // Appends already queued are committed before the process ends.
        log.close();
        return result;
    }
    let (ledger, store) = open(&cfg.data, ledger_options(&cfg))?;
    let (committer, writer) = GroupCommitter::start(ledger);
    let log: Arc<dyn Log> = Arc::new(committer.clone());
    let store: Arc<dyn Store> = Arc::new(store);
    let result = rt.block_on(run(cfg, store, log, demo, request_threads));
    // Whatever happened, let the writer finish what it acknowledged and seal the sidecar.
    committer.shutdown();
    let _ = writer.join();
    result
}

/// Opens the log and the store in PostgreSQL, with the log's signing key from the
/// data directory (created there on the first node's first start).
fn open_postgres(
    cfg: &ServeConfig,
    url: &str,
) -> anyhow::Result<(Arc<ciyuan_store_postgres::PgLog>, Arc<dyn Store>)> {
    // A data directory migrated from the embedded default keeps its key in `ledger/`.
    let key_dir = if cfg.data.join("ledger").join("signing.key").exists() {
        cfg.data.join("ledger")
    } else {
        cfg.data.clone()
    };
    let signer = ciyuan_ledger::signing_key(&key_dir, cfg.origin.as_deref())
        .with_context(|| format!("the log's signing key in {}", key_dir.display()))?;
    let pool = ciyuan_store_postgres::Pool::connect(url)
        .map_err(|e| anyhow::anyhow!("the database: {e}"))?;
    let log = ciyuan_store_postgres::PgLog::open(pool.clone(), signer)
        .map_err(|e| anyhow::anyhow!("the log in the database: {e}"))?;
    let store = ciyuan_store_postgres::PgStore::open(pool)
        .map_err(|e| anyhow::anyhow!("the projections in the database: {e}"))?;
    Ok((Arc::new(log), Arc::new(store)))
}

async fn run(
    mut cfg: ServeConfig,
    store: Arc<dyn Store>,
    log: Arc<dyn Log>,
    demo: bool,
    request_threads: usize,
) -> anyhow::Result<ExitCode> {
    let server_cfg = ServerConfig {
        max_body_bytes: cfg.max_body_bytes,
        checkpoint_interval: Duration::from_secs(cfg.checkpoint_interval_secs),
        ingest_max_age: Duration::from_secs(cfg.ingest_max_age_secs),
        ingest_max_future: Duration::from_secs(cfg.ingest_max_future_secs),
        max_events_per_batch: cfg.max_events_per_batch,
        definitions: std::mem::take(&mut cfg.definitions),
        gateway: std::mem::take(&mut cfg.gateway),
        ..ServerConfig::default()
    };
    let mut server_cfg = server_cfg;
    // No provider configured: every model goes to the simulated provider, in this
    // process, so the gateway meters tokens from the first minute.
    let sim_addr = if server_cfg.gateway.providers.is_empty() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("starting the simulated provider")?;
        let addr = listener.local_addr()?;
        let sim = ciyuan_sim::SimConfig {
            ttft: Duration::from_millis(150),
            tokens_per_sec: 200.0,
            ..ciyuan_sim::SimConfig::default()
        };
        tokio::spawn(ciyuan_sim::serve(listener, sim));
        server_cfg.gateway.providers = sim_providers(&format!("http://{addr}"));
        Some(addr)
    } else {
        None
    };
    server_cfg.reservation_ttl = Duration::from_secs(cfg.reservation_ttl_secs);
    // Other nodes may revoke keys in a shared database: trust a cached key for a
    // second at most; and apply what they append to this node's state.
    if cfg.database.is_some() {
        server_cfg.key_cache_ttl = Some(Duration::from_secs(1));
        server_cfg.follow = Some(Duration::from_millis(100));
    }
    server_cfg.reports = std::mem::take(&mut cfg.reports);
    server_cfg.report_interval = Duration::from_secs(cfg.reports_check_secs);
    if !cfg.webhooks.is_empty() {
        let notifier = ciyuan_notify::Notifier::start(
            std::mem::take(&mut cfg.webhooks),
            cfg.data.join("webhooks.jsonl"),
            ciyuan_notify::RetryPolicy::default(),
        )
        .await
        .context("starting webhook delivery")?;
        server_cfg.notifier = Some(notifier);
    }
    // The vocabularies the configured models are counted with, loaded before the
    // listener accepts, so no request waits for one.
    let gateway_cfg = server_cfg.gateway.clone();
    let took = tokio::task::spawn_blocking(move || {
        ciyuan_server::gateway::load_vocabularies(&gateway_cfg)
    })
    .await
    .context("loading the tokenizers' vocabularies")?
    .map_err(|e| anyhow::anyhow!("loading the tokenizers' vocabularies: {e}"))?;
    tracing::info!(ms = took.as_millis() as u64, "vocabularies loaded");
    let ttl = server_cfg.reservation_ttl;
    let app = App::new(store, log, server_cfg).map_err(|e| anyhow::anyhow!(e.detail))?;
    let expiry = tokio::spawn(ciyuan_server::budgets::expiry_loop(app.clone(), ttl));
    let given = cfg.bootstrap_admin_key.as_ref().map(|s| s.0.clone());
    let bootstrap = app
        .bootstrap_admin_key(given)
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap admin key: {}", e.detail))?;
    let listener = if request_threads > 0 {
        per_core::bind(cfg.listen)
    } else {
        tokio::net::TcpListener::bind(cfg.listen).await
    }
    .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    // The request threads' sockets, on the port the first one took.
    let mut listeners = vec![listener];
    for _ in 1..request_threads {
        listeners.push(per_core::bind(addr).with_context(|| format!("listening on {addr}"))?);
    }
    let demo_key = match (demo, &bootstrap) {
        (false, _) => None,
        (true, Some(k)) => Some(k.clone()),
        (true, None) => Some(std::env::var("CIYUAN_KEY").map_err(|_| {
            anyhow::anyhow!(
                "--demo on an existing data directory needs the admin key in CIYUAN_KEY"
            )
        })?),
    };
    {
        let mut out = std::io::stdout().lock();
        if let Some(key) = bootstrap {
            writeln!(out, "bootstrap admin key (shown once, store it now): {key}")?;
        }
        writeln!(out, "data directory: {}", cfg.data.display())?;
        if let Some(sim) = sim_addr {
            writeln!(
                out,
                "gateway: no [[providers]] configured; every model goes to the simulated provider at http://{sim}"
            )?;
        }
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    tracing::info!(%addr, data = %cfg.data.display(), "ciyuan serving");
    let checkpoints = tokio::spawn(ciyuan_server::checkpoint_loop(app.clone()));
    // Contracts' service levels, evaluated once each month is over (and caught up
    // after a stop): a minute's delay on a monthly figure is nothing.
    let service_levels = tokio::spawn(ciyuan_server::service_levels::service_level_loop(
        app.clone(),
        Duration::from_secs(60),
    ));
    let reports = tokio::spawn(ciyuan_server::reports::report_loop(app.clone()));
    if let Some(key) = demo_key {
        let url = format!("http://{addr}");
        tokio::spawn(async move {
            if let Err(e) = crate::demo::run(url, key).await {
                eprintln!("demo failed: {e:#}");
            }
        });
    }
    let listen = ciyuan_server::listen::ListenConfig {
        body_timeout: Duration::from_secs(cfg.body_timeout_secs),
    };
    // `/metrics` without a key, on its own address, when configured.
    let metrics = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for /metrics on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving /metrics");
            let router = ciyuan_server::gateway::metrics_router(app.clone()).with_state(());
            Some(tokio::spawn(ciyuan_server::listen::serve_with(
                listener,
                router,
                std::future::pending(),
                listen,
            )))
        }
    };
    // Routes are resolved once here, not for every connection.
    let router = ciyuan_server::router(app.clone()).with_state(());
    let request_threads = if request_threads > 0 {
        Some(per_core::serve(listeners, router, listen).await?)
    } else {
        let listener = listeners.remove(0);
        ciyuan_server::listen::serve_with(listener, router, shutdown_signal(), listen)
            .await
            .context("serving HTTP")?;
        None
    };
    if let Some(m) = metrics {
        m.abort();
    }
    checkpoints.abort();
    service_levels.abort();
    // A report cut off mid-delivery has no entry yet: it is delivered again on start.
    reports.abort();
    expiry.abort();
    // Gateway entries of answered requests are appended in groups: append the last.
    app.flush_gateway(Duration::from_secs(10)).await;
    // A last checkpoint so a clean stop leaves everything signed.
    if let Err(e) = app.checkpoint().await {
        tracing::warn!(detail = %e.detail, "final checkpoint failed");
    }
    app.leave().await;
    if let Some(threads) = request_threads {
        threads.end().await?;
    }
    tracing::info!("ciyuan stopped");
    Ok(ExitCode::SUCCESS)
}

/// Serving HTTP on a thread per core: each thread a single-threaded runtime with its
/// own listening socket on the one address (`SO_REUSEPORT`), owning the connections
/// it accepts; the gateway's connections to providers are kept per thread too
/// (`gateway::upstream::Clients`). A request is read, admitted, forwarded, answered
/// and metered on one thread, with no hand-off between threads: on the shared
/// multi-threaded runtime each request woke other threads several times (its task,
/// the provider connection's task, its metering task), and the wake-ups, not the
/// work, were most of what the gateway added to a request's latency. What a request
/// thread gives up is stealing: a handler that blocks holds up that thread's
/// connections only (the gateway's handlers do not block; exports and other long work
/// run on threads of their own).
mod per_core {
    use super::shutdown_signal;
    use anyhow::Context;
    use ciyuan_server::listen::ListenConfig;
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    /// A listening socket on `addr` that other sockets of this process may share.
    pub(super) fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As TcpListener::bind does: a restart may bind while old connections linger.
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    }

    /// The request threads, once they stopped accepting: their runtimes still run what
    /// they started (requests' metering, the recorder, streams being relayed) until
    /// [`Threads::end`].
    pub(super) struct Threads {
        end: watch::Sender<bool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Threads {
        /// Ends the request threads' runtimes and waits for the threads.
        pub(super) async fn end(self) -> anyhow::Result<()> {
            self.end.send_replace(true);
            let threads = self.threads;
            tokio::task::spawn_blocking(move || {
                for t in threads {
                    if t.join().is_err() {
                        anyhow::bail!("a request thread panicked");
                    }
                }
                Ok(())
            })
            .await
            .context("waiting for the request threads")?
        }
    }

    /// Serves `router` on each listener from a thread of its own until the process is
    /// told to stop (or a thread's serving fails), then waits for the requests in
    /// flight (each thread's graceful stop).
    pub(super) async fn serve(
        listeners: Vec<TcpListener>,
        router: axum::Router,
        config: ListenConfig,
    ) -> anyhow::Result<Threads> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (end_tx, end_rx) = watch::channel(false);
        let (served_tx, mut served_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut threads = Vec::with_capacity(listeners.len());
        for (i, listener) in listeners.into_iter().enumerate() {
            let listener = listener.into_std()?;
            let (router, mut stop, mut end) = (router.clone(), stop_rx.clone(), end_rx.clone());
            let served = served_tx.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a request thread's runtime")?;
            let thread = std::thread::Builder::new()
                .name(format!("ciyuan-http-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        // tokio wakes its driver (a write to an eventfd and one more
                        // round of epoll) whenever a timer is set sooner than the
                        // driver's next wake-up. Each request sets hyper's 30 s timer
                        // for the next request's head, and the soonest other timer was
                        // the provider pool's 90 s sweep: every request paid it. A
                        // timer every 10 s keeps the next wake-up sooner than those.
                        // It also closes this thread's provider connections that have
                        // idled too long.
                        tokio::spawn(async {
                            let mut tick =
                                tokio::time::interval(std::time::Duration::from_secs(10));
                            loop {
                                tick.tick().await;
                                ciyuan_server::gateway::close_expired_idle();
                            }
                        });
                        let result = match TcpListener::from_std(listener) {
                            Ok(l) => {
                                let stopped = async move {
                                    // A dropped sender (the process ending) stops too.
                                    let _ = stop.wait_for(|s| *s).await;
                                };
                                ciyuan_server::listen::serve_with(l, router, stopped, config).await
                            }
                            Err(e) => Err(e),
                        };
                        if served.send(result).is_err() {
                            return;
                        }
                        let _ = end.wait_for(|e| *e).await;
                    });
                })
                .context("starting a request thread")?;
            threads.push(thread);
        }
        drop(served_tx);
        let n = threads.len();
        let mut results = Vec::with_capacity(n);
        tokio::select! {
            () = shutdown_signal() => {}
            Some(early) = served_rx.recv() => results.push(early),
        }
        stop_tx.send_replace(true);
        while results.len() < n {
            match served_rx.recv().await {
                Some(r) => results.push(r),
                None => anyhow::bail!("a request thread ended without a word"),
            }
        }
        let threads = Threads {
            end: end_tx,
            threads,
        };
        for r in results {
            if let Err(e) = r {
                threads.end().await?;
                return Err(e).context("serving HTTP");
            }
        }
        Ok(threads)
    }
}

/// The simulated provider as the gateway's providers: both protocols, every model, its
/// fault and pacing headers passed through.
pub fn sim_providers(base: &str) -> Vec<ciyuan_server::gateway::Provider> {
    use ciyuan_server::gateway::{Protocol, Provider};
    [
        (Protocol::OpenAi, format!("{base}/v1")),
        (Protocol::Anthropic, base.to_string()),
    ]
    .into_iter()
    .map(|(protocol, base_url)| Provider {
        name: "sim".into(),
        protocol,
        base_url,
        api_key: None,
        models: vec!["*".into()],
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(120),
        idle_timeout: Duration::from_secs(60),
        forward_headers: vec!["x-sim-*".into()],
        rate_basis: Default::default(),
    })
    .collect()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

pub fn rebuild(config: Option<&Path>, args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let mut file = match config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    if let Some(url) = args.database {
        file.database = Some(crate::config::Secret(url));
    }
    let cfg = ServeConfig::resolve(file, args.data, None, None)?;
    if let Some(url) = &cfg.database {
        return rebuild_database(&url.0);
    }
    let (ledger, store) = open(&cfg.data, ledger_options(&cfg))?;
    let started = std::time::Instant::now();
    store.reset_projections()?;
    let applied = catch_up(ledger, &store)?;
    println!(
        "rebuilt projections from {applied} ledger entries in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `ciyuan migrate` arguments.
#[derive(Args)]
pub struct MigrateArgs {
    /// Data directory (to bring up to this build).
    #[arg(long, env = "CIYUAN_DATA")]
    data: Option<PathBuf>,
    /// Copy this embedded data directory (server stopped) into the database `--to`.
    #[arg(long, requires = "to", conflicts_with = "data")]
    from: Option<PathBuf>,
    /// The PostgreSQL database to copy into (postgres://...; its log must be empty).
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// Apply the schema migrations a PostgreSQL database lacks (as `serve --database`
    /// does on start), and nothing else.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    database: Option<String>,
}

/// `ciyuan migrate --from DIR --to postgres://...`: copies an embedded data directory
/// into PostgreSQL — the log entry by entry (the same bytes, so the same tree and
/// roots), its signed checkpoints (checked against the copied tree), the keys (their
/// hashes), then the projections built from the copied log — and checks the roots.
fn migrate_to_postgres(from: &Path, url: &str) -> anyhow::Result<ExitCode> {
    let ledger_dir = from.join("ledger");
    let ledger = Ledger::open(&ledger_dir, LedgerOptions::default())
        .with_context(|| format!("opening the ledger in {}", ledger_dir.display()))?;
    let sqlite = SqliteStore::open(&from.join("ciyuan.db"))
        .with_context(|| format!("opening {}", from.join("ciyuan.db").display()))?;
    let signer = ciyuan_ledger::signing_key(&ledger_dir, None)
        .with_context(|| format!("the ledger's signing key in {}", ledger_dir.display()))?;
    let pool = ciyuan_store_postgres::Pool::connect(url)
        .map_err(|e| anyhow::anyhow!("the database: {e}"))?;
    let log = ciyuan_store_postgres::PgLog::open(pool.clone(), signer)
        .map_err(|e| anyhow::anyhow!("the log in the database: {e}"))?;
    let store = ciyuan_store_postgres::PgStore::open(pool)
        .map_err(|e| anyhow::anyhow!("the projections in the database: {e}"))?;
    if log.refresh()? != 0 {
        anyhow::bail!("the database's log is not empty: migrate into a new database");
    }
    let reader = ledger.reader();
    let size = reader.size();
    let started = std::time::Instant::now();
    // Each entry with its ingested event's key: the database refuses a second entry
    // of an event from any node from then on (see `Log::append_keyed`).
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut keys: Vec<Option<ciyuan_store::EntryKey>> = Vec::new();
    let flush = |batch: &mut Vec<Vec<u8>>,
                 keys: &mut Vec<Option<ciyuan_store::EntryKey>>|
     -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        log.append_keyed(
            std::mem::take(batch),
            std::mem::take(keys),
            Box::new(move |r| {
                // The receiver waits below.
                let _ = tx.send(r);
            }),
        )?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the database's writer stopped"))??;
        Ok(())
    };
    let mut failed = None;
    reader
        .scan(
            0..size,
            |i, bytes| -> Result<(), ciyuan_ledger::LedgerError> {
                let entry = ciyuan_core::Entry::decode(bytes).map_err(|e| {
                    ciyuan_ledger::LedgerError::Invalid(format!("entry {i} does not decode: {e}"))
                })?;
                keys.push(match &entry.body {
                    ciyuan_core::EntryBody::Usage(u) => u
                        .ingest_key()
                        .map(|(s, id)| ciyuan_core::ingest_key_digest(s, id)),
                    _ => None,
                });
                batch.push(bytes.to_vec());
                if batch.len() == 10_000
                    && let Err(e) = flush(&mut batch, &mut keys)
                {
                    failed = Some(e);
                    return Err(ciyuan_ledger::LedgerError::Invalid("copy failed".into()));
                }
                Ok(())
            },
        )
        .map_err(|e| failed.take().unwrap_or_else(|| anyhow::anyhow!("{e}")))?;
    flush(&mut batch, &mut keys)?;
    let (ours, theirs) = (reader.root_at(size)?, log.root_at(size)?);
    if ours != theirs || log.size() != size {
        anyhow::bail!(
            "the copied log's root differs from the ledger's: nothing is trustworthy here"
        );
    }
    let mut notes = Vec::new();
    let mut at = 0;
    loop {
        let page = reader.checkpoints(at, 1024)?;
        notes.extend(page.iter().map(|c| c.note.clone()));
        if page.len() < 1024 {
            break;
        }
        at += page.len() as u64;
    }
    let checkpoints = log.import_checkpoints(&notes)?;
    let keys = sqlite.keys_with_hashes()?;
    for (k, hash) in &keys {
        store.insert_key(k, hash)?;
    }
    let applied = ciyuan_server::pipeline::project(&store, &log, size, &mut |_| {})
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    log.close();
    println!(
        "copied {size} entries (root {} unchanged), {checkpoints} checkpoints and {} keys into the database, and projected {applied} entries, in {:.2}s",
        crate::admin::base64_hash(&ours),
        keys.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "serve it with: ciyuan serve --database <url> --data {} (the log's signing key stays in {})",
        from.display(),
        ledger_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `ciyuan migrate`: brings a stopped server's data directory up to this build —
/// database schema migrations, the ledger's crash recovery, and the projections caught
/// up with the ledger (a migration may have reset them) — without serving.
pub fn migrate(config: Option<&Path>, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    if let (Some(from), Some(to)) = (&args.from, &args.to) {
        return migrate_to_postgres(from, to);
    }
    if let Some(url) = &args.database {
        let pool = ciyuan_store_postgres::Pool::connect(url)
            .map_err(|e| anyhow::anyhow!("the database: {e}"))?;
        let applied = {
            let mut c = pool.get().map_err(|e| anyhow::anyhow!("{e}"))?;
            ciyuan_store_postgres::migrate(&mut c).map_err(|e| anyhow::anyhow!("{e}"))?
        };
        println!(
            "database schema: {applied} migrations applied; version {} (this build)",
            ciyuan_store_postgres::SCHEMA_VERSION
        );
        return Ok(ExitCode::SUCCESS);
    }
    let args = RebuildArgs {
        data: args.data,
        database: None,
    };
    let file = match config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let cfg = ServeConfig::resolve(file, args.data, None, None)?;
    let (ledger, store) = open(&cfg.data, ledger_options(&cfg))?;
    println!(
        "ledger: {} entries; database schema version {} (this build: {})",
        ledger.size(),
        store.schema_version()?,
        SqliteStore::SCHEMA_VERSION
    );
    let started = std::time::Instant::now();
    let applied = catch_up(ledger, &store)?;
    println!(
        "projections: {applied} entries applied in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `rebuild` of a PostgreSQL database: its projections emptied and applied again from
/// its log, read with the verifier key it recorded (no signing key needed).
fn rebuild_database(url: &str) -> anyhow::Result<ExitCode> {
    let pool = ciyuan_store_postgres::Pool::connect(url)
        .map_err(|e| anyhow::anyhow!("the database: {e}"))?;
    // A running node keeps in memory what it built from the projections (the ingest
    // index, budget counters) and projects on from its own watermark: emptying the
    // tables under it would leave it answering from state that no longer matches. The
    // data directory's lock guards the embedded rebuild; here, the database's sessions.
    let others: i64 = {
        let mut c = pool
            .get()
            .map_err(|e| anyhow::anyhow!("the database: {e}"))?;
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .map_err(|e| anyhow::anyhow!("the database: {}", ciyuan_store_postgres::describe(&e)))?
        .get(0)
    };
    if others > 0 {
        anyhow::bail!(
            "{others} other clients are connected to the database: stop every node before a rebuild"
        );
    }
    let log = ciyuan_store_postgres::PgLog::open_reader(pool.clone())
        .map_err(|e| anyhow::anyhow!("the log in the database: {e}"))?;
    let store = ciyuan_store_postgres::PgStore::open(pool)
        .map_err(|e| anyhow::anyhow!("the projections in the database: {e}"))?;
    let started = std::time::Instant::now();
    store.reset_projections()?;
    let applied = ciyuan_server::pipeline::project(&store, &log, log.size(), &mut |_| {})
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "rebuilt projections from {applied} ledger entries in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Applies the ledger's entries the projections lack, offline; returns how many.
fn catch_up(ledger: Ledger, store: &SqliteStore) -> anyhow::Result<u64> {
    let (committer, writer) = GroupCommitter::start(ledger);
    let applied =
        ciyuan_server::pipeline::project(store, &committer, committer.size(), &mut |_| {})
            .map_err(|e| anyhow::anyhow!("{e}"));
    committer.shutdown();
    let _ = writer.join();
    applied
}
