//! Webhook delivery for Ciyuan's incidents (budget thresholds and the like).
//!
//! A [`Notifier`] holds a list of [`Target`]s. [`Notifier::notify`] writes a `queued`
//! record per matching target to an append-only JSON-lines **delivery log** (synced
//! before it returns) and hands the event to that target's delivery task; the task
//! `POST`s it, signed (see [`sign`] / [`verify`]), retrying transient failures with
//! capped, jittered exponential backoff, and logs every attempt. The log is the
//! durable outbox: [`Notifier::start`] re-enqueues every delivery it shows unfinished,
//! with the same event id, so delivery is *at least once* and receivers de-duplicate
//! on the id (also sent as `x-ciyuan-event-id`).
//!
//! # Request
//!
//! `POST <url>` with body `{"id":…,"type":…,"created":"<RFC 3339>","data":…}` and the
//! headers `content-type: application/json`, `x-ciyuan-event-id`,
//! `x-ciyuan-event-type`, `x-ciyuan-delivery-attempt` (1, 2, …; counted across
//! restarts) and `x-ciyuan-signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`. Redirects
//! are not followed.
//!
//! # Outcomes
//!
//! 2xx is delivered. Connection errors, timeouts, 408, 429 and 5xx are retried (a
//! `Retry-After` in seconds or as an HTTP date is honoured, up to
//! [`RetryPolicy::max_backoff`]) until [`RetryPolicy::max_attempts`]; any other status
//! (other 4xx, 3xx) gives up at once.
//!
//! # Order and isolation
//!
//! Each target has its own task and bounded queue ([`Limits::queue_capacity`]): events
//! reach a target in the order they were enqueued, one at a time (the next waits until
//! the previous is delivered or given up), and a slow or failing target holds back
//! nobody else.
//!
//! # Bounds
//!
//! Memory: per target, the queue plus the one delivery in flight, plus the
//! [`Limits::recent_records`] kept for [`Notifier::deliveries`]; events larger than
//! [`Limits::max_event_bytes`] are refused. Disk: the log rotates once it has grown
//! [`Limits::max_log_bytes`] past what the previous rotation carried over: the old
//! file becomes `<log>.1` (replacing the previous one) and the new file starts with
//! the unfinished deliveries only (their `queued` and latest `failed` records). So the
//! log directory holds at most about two generations of `max_log_bytes` each, plus the
//! unfinished deliveries, which the queue bounds.
//!
//! One notifier per log file: two processes appending to the same log would both
//! replay it.
//!
//! # Cost
//!
//! The log is written synchronously under one mutex: `notify` waits for its
//! `fdatasync`, and delivery tasks append their (unsynced) outcomes under the same
//! lock, so they may wait for a concurrent `notify`'s sync. Meant for incidents (a
//! few per second at most), not for a stream of usage events.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), ciyuan_notify::NotifyError> {
//! use ciyuan_notify::{Event, Notifier, RetryPolicy, Target, jiff::Timestamp};
//!
//! let ops = Target {
//!     name: "ops".into(),
//!     url: "https://ops.example.com/hooks/ciyuan".into(),
//!     secret: "whsec_…".into(),
//!     events: vec!["budget.*".into()],
//! };
//! let notifier = Notifier::start(vec![ops], "data/webhooks.jsonl".into(), RetryPolicy::default()).await?;
//! notifier.notify(Event {
//!     id: "budget-acme-2025-06-80".into(),
//!     kind: "budget.threshold".into(),
//!     created: Timestamp::now(),
//!     data: serde_json::json!({"account": "acme", "threshold": 0.8}),
//! })?;
//! notifier.drain(std::time::Duration::from_secs(30)).await;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod log;
mod pattern;
mod signature;

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use jiff;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::log::{LogLine, LogState};
pub use crate::signature::{sign, verify};

/// Header carrying the event id (receivers de-duplicate on it).
pub const HEADER_EVENT_ID: &str = "x-ciyuan-event-id";
/// Header carrying the event type.
pub const HEADER_EVENT_TYPE: &str = "x-ciyuan-event-type";
/// Header carrying the attempt number, from 1.
pub const HEADER_ATTEMPT: &str = "x-ciyuan-delivery-attempt";
/// Header carrying the signature (`t=…,v1=…`, see [`sign`]).
pub const HEADER_SIGNATURE: &str = "x-ciyuan-signature";

/// The longest event id or event type accepted, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 256;

/// A webhook receiver.
#[derive(Clone)]
pub struct Target {
    /// Unique name; the delivery log and [`DeliveryRecord`]s identify the target by it.
    pub name: String,
    /// `http` or `https` URL the events are `POST`ed to. Treated as a secret (many
    /// webhook URLs embed a token): never logged, only its scheme and host are shown
    /// by `Debug`.
    pub url: String,
    /// HMAC-SHA256 key for [`sign`]. Never logged; `Debug` redacts it.
    pub secret: String,
    /// Event type patterns this target receives (`*` matches any run of characters,
    /// e.g. `budget.*`); empty receives every event.
    pub events: Vec<String>,
}

impl Target {
    /// True when this target receives events of type `kind`.
    pub fn matches(&self, kind: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|p| pattern::matches(p, kind))
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match reqwest::Url::parse(&self.url) {
            Ok(u) => format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or("")),
            Err(_) => "<invalid>".to_owned(),
        };
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("url", &url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .finish()
    }
}

/// How deliveries are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per delivery, the first included (0 is taken as 1). Default 8.
    pub max_attempts: u32,
    /// Backoff after the first failed attempt; doubles after each further one. Each
    /// wait is drawn uniformly from `[b/2, b]` for that attempt's backoff `b`, so waits
    /// never shrink. Default 1 s.
    pub initial_backoff: Duration,
    /// Cap on a wait between attempts, `Retry-After` included. Default 5 min.
    pub max_backoff: Duration,
    /// Time limit for one attempt (connect, send, response head). Default 10 s.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
            timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The un-jittered backoff after failed attempt `attempt` (from 1):
    /// `initial_backoff × 2^(attempt-1)`, capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The wait after failed attempt `attempt`: jittered backoff, raised to the
    /// receiver's `Retry-After` if that is longer, never above `max_backoff`.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let b = self.backoff(attempt);
        let half = b / 2;
        let span = u64::try_from((b - half).as_nanos()).unwrap_or(u64::MAX);
        let extra = if span == 0 {
            0
        } else {
            random_u64() % span.saturating_add(1)
        };
        let jittered = half + Duration::from_nanos(extra);
        jittered
            .max(retry_after.unwrap_or_default())
            .min(self.max_backoff)
    }
}

fn random_u64() -> u64 {
    // Jitter only spreads retries out; if the OS source fails, the clock will do.
    getrandom::u64().unwrap_or_else(|_| Timestamp::now().subsec_nanosecond().unsigned_abs().into())
}

/// Bounds on memory and disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Events waiting per target (besides the one in flight); [`Notifier::notify`]
    /// answers [`NotifyError::QueueFull`] beyond it. Default 1024.
    pub queue_capacity: usize,
    /// Largest serialized event body accepted. Default 64 KiB.
    pub max_event_bytes: usize,
    /// The log rotates once this many bytes have been appended beyond the unfinished
    /// deliveries the last rotation carried over (see the crate docs). Default 64 MiB.
    pub max_log_bytes: u64,
    /// Records kept in memory for [`Notifier::deliveries`]. Default 1000.
    pub recent_records: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue_capacity: 1024,
            max_event_bytes: 64 * 1024,
            max_log_bytes: 64 * 1024 * 1024,
            recent_records: 1000,
        }
    }
}

/// Something that happened, to be sent to the targets that want its type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id; every attempt, including replays after a restart, carries the same
    /// one, so receivers de-duplicate on it. Visible ASCII, at most
    /// [`MAX_EVENT_ID_BYTES`].
    pub id: String,
    /// Event type, e.g. `budget.threshold` (serialized as `type`). Visible ASCII, at
    /// most [`MAX_EVENT_ID_BYTES`].
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened.
    pub created: Timestamp,
    /// Event-specific payload.
    pub data: serde_json::Value,
}

/// Where a delivery stands after a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Accepted by [`Notifier::notify`] (or replayed at start), not yet tried.
    Queued,
    /// An attempt failed and another is scheduled (`next_retry`).
    Failed,
    /// The receiver answered 2xx.
    Delivered,
    /// Permanent failure or attempts exhausted; no more attempts.
    GaveUp,
}

/// One line of the delivery log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// When the record was written.
    pub ts: Timestamp,
    /// The event's id.
    pub event_id: String,
    /// The target's name.
    pub target: String,
    /// The delivery's state after this record.
    pub state: DeliveryState,
    /// The attempt this record reports (0 for `queued`).
    pub attempt: u32,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// What went wrong, when no status explains it (connection error, timeout, …).
    pub error: Option<String>,
    /// When the next attempt is due (`failed` records).
    pub next_retry: Option<Timestamp>,
}

/// Why the notifier could not start or accept an event.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// A target's configuration is unusable.
    #[error("webhook target {name:?}: {reason}")]
    InvalidTarget {
        /// The target's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The event cannot be sent.
    #[error("event {id:?}: {reason}")]
    InvalidEvent {
        /// The event's id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A matching target's queue holds [`Limits::queue_capacity`] events already; the
    /// event was enqueued for no target. Retry later, or raise the limit if the target
    /// is healthy but the rate is high.
    #[error(
        "webhook target {target:?}: delivery queue full ({capacity} events waiting); event not enqueued"
    )]
    QueueFull {
        /// The target whose queue is full.
        target: String,
        /// Its capacity.
        capacity: usize,
    },
    /// Reading or writing the delivery log failed.
    #[error("delivery log {path}: {source}")]
    Log {
        /// The log's path.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
    /// A delivery task has stopped (the runtime is shutting down).
    #[error("webhook target {0:?}: delivery task stopped")]
    Stopped(String),
}

/// One delivery handed to a target's task.
struct Job {
    event: Arc<Event>,
    body: Arc<[u8]>,
    /// Attempts made before (in an earlier run).
    attempts_before: u32,
    /// Not before this time (a retry scheduled by an earlier run).
    not_before: Option<Timestamp>,
}

/// State shared by the handle and the delivery tasks.
struct Shared {
    policy: RetryPolicy,
    client: reqwest::Client,
    log_path: PathBuf,
    log: Mutex<LogState>,
    /// Number of unfinished deliveries.
    outstanding: watch::Sender<usize>,
    /// Set when the last [`Notifier`] clone is dropped: tasks stop at their next wait.
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an attempt's outcome and applies it to the views.
    fn record(&self, line: LogLine) {
        let mut log = self.log();
        // Outcomes are not fsynced: losing one in a power cut means one more delivery
        // of the same event id after restart, which receivers de-duplicate.
        if let Err(e) = log.append(std::slice::from_ref(&line), false) {
            tracing::error!(path = %self.log_path.display(), error = %e, "delivery log: cannot append an attempt's outcome");
        }
        log.apply(line);
        self.outstanding.send_replace(log.pending.len());
        log.maybe_rotate();
    }
}

struct Handle {
    shared: Arc<Shared>,
    targets: Vec<(Arc<Target>, mpsc::Sender<Job>)>,
    limits: Limits,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// Delivers events to webhook targets. Cheap to clone; delivery stops when the last
/// clone is dropped (unfinished deliveries stay in the log for the next start).
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Handle>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field(
                "targets",
                &self
                    .inner
                    .targets
                    .iter()
                    .map(|(t, _)| &t.name)
                    .collect::<Vec<_>>(),
            )
            .field("log", &self.inner.shared.log_path)
            .finish()
    }
}

fn validate_targets(targets: &[Target]) -> Result<(), NotifyError> {
    let invalid = |name: &str, reason: &str| NotifyError::InvalidTarget {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    for (i, t) in targets.iter().enumerate() {
        if t.name.is_empty() || t.name.len() > 128 || t.name.chars().any(char::is_control) {
            return Err(invalid(
                &t.name,
                "name must be 1 to 128 characters, none of them control characters",
            ));
        }
        if targets[..i].iter().any(|o| o.name == t.name) {
            return Err(invalid(&t.name, "duplicate name"));
        }
        match reqwest::Url::parse(&t.url) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host_str().is_some() => {}
            _ => {
                return Err(invalid(
                    &t.name,
                    "url must be an absolute http or https URL",
                ));
            }
        }
        if t.secret.is_empty() {
            return Err(invalid(&t.name, "secret must not be empty"));
        }
    }
    Ok(())
}

fn validate_event(event: &Event) -> Result<(), NotifyError> {
    let token_ok = |s: &str| {
        !s.is_empty() && s.len() <= MAX_EVENT_ID_BYTES && s.bytes().all(|b| b.is_ascii_graphic())
    };
    if !token_ok(&event.id) {
        return Err(NotifyError::InvalidEvent {
            id: event.id.clone(),
            reason: format!("id must be 1 to {MAX_EVENT_ID_BYTES} visible ASCII characters"),
        });
    }
    if !token_ok(&event.kind) {
        return Err(NotifyError::InvalidEvent {
            id: event.id.clone(),
            reason: format!("type must be 1 to {MAX_EVENT_ID_BYTES} visible ASCII characters"),
        });
    }
    Ok(())
}

impl Notifier {
    /// Starts delivery tasks on the current tokio runtime with [`Limits::default`];
    /// replays deliveries the log shows unfinished (queued but neither delivered nor
    /// given up) from an earlier run. See [`Notifier::start_with_limits`].
    pub async fn start(
        targets: Vec<Target>,
        log_path: PathBuf,
        policy: RetryPolicy,
    ) -> Result<Notifier, NotifyError> {
        Notifier::start_with_limits(targets, log_path, policy, Limits::default()).await
    }

    /// [`Notifier::start`] with explicit bounds.
    ///
    /// Opens (or creates) the log at `log_path`, whose directory must exist. Unfinished
    /// deliveries are re-enqueued in their original order, resuming the attempt count
    /// and any scheduled retry time; those whose target is no longer configured are
    /// recorded as given up.
    pub async fn start_with_limits(
        targets: Vec<Target>,
        log_path: PathBuf,
        policy: RetryPolicy,
        limits: Limits,
    ) -> Result<Notifier, NotifyError> {
        validate_targets(&targets)?;
        let log_err = |path: &PathBuf| {
            let path = path.clone();
            move |source| NotifyError::Log { path, source }
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(policy.timeout)
            .user_agent(concat!("ciyuan-notify/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Client(e.without_url().to_string()))?;

        let open_path = log_path.clone();
        let (max_log, recent) = (limits.max_log_bytes, limits.recent_records);
        let log = tokio::task::spawn_blocking(move || LogState::open(&open_path, max_log, recent))
            .await
            .map_err(|e| NotifyError::Log {
                path: log_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(log_err(&log_path))?;

        // Replay: unfinished deliveries, oldest first, per target.
        let mut backlogs: Vec<VecDeque<Job>> = targets.iter().map(|_| VecDeque::new()).collect();
        let mut orphans = Vec::new();
        for p in log.pending_in_order() {
            let Some(event) = p.queued.to_event() else {
                continue;
            };
            let Some(index) = targets.iter().position(|t| t.name == p.queued.target) else {
                orphans.push(p.queued.clone());
                continue;
            };
            let body: Arc<[u8]> = serde_json::to_vec(&event)
                .map_err(|e| log_err(&log_path)(std::io::Error::other(e)))?
                .into();
            backlogs[index].push_back(Job {
                event: Arc::new(event),
                body,
                attempts_before: p.last.as_ref().map_or(0, |l| l.attempt),
                not_before: p.last.as_ref().and_then(|l| l.next_retry),
            });
        }
        let replayed: usize = backlogs.iter().map(VecDeque::len).sum();
        if replayed > 0 {
            tracing::info!(
                deliveries = replayed,
                "webhooks: replaying unfinished deliveries from the log"
            );
        }

        let (outstanding, _) = watch::channel(log.pending.len());
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            policy,
            client,
            log_path: log_path.clone(),
            log: Mutex::new(log),
            outstanding,
            shutdown,
        });

        for queued in orphans {
            tracing::warn!(target_name = %queued.target, event = %queued.event, "webhooks: unfinished delivery for a target no longer configured; giving up");
            shared.record(LogLine {
                ts: Timestamp::now(),
                state: DeliveryState::GaveUp,
                error: Some("target no longer configured".to_owned()),
                kind: None,
                created: None,
                data: None,
                ..queued
            });
        }

        let mut handles = Vec::with_capacity(targets.len());
        for (target, backlog) in targets.into_iter().zip(backlogs) {
            let target = Arc::new(target);
            let (tx, rx) = mpsc::channel(limits.queue_capacity.max(1));
            let stop = shared.shutdown.subscribe();
            tokio::spawn(run_target(
                shared.clone(),
                target.clone(),
                backlog,
                rx,
                stop,
            ));
            handles.push((target, tx));
        }
        Ok(Notifier {
            inner: Arc::new(Handle {
                shared,
                targets: handles,
                limits,
            }),
        })
    }

    /// Enqueues the event for every matching target. Durable: the `queued` records are
    /// written to the log and synced before this returns. Never waits on the network
    /// (only on that local write and `fdatasync`).
    ///
    /// All or nothing: if any matching target's queue is full, the event is enqueued
    /// for none ([`NotifyError::QueueFull`]). A target for which an event with the same
    /// id is still unfinished is skipped (so retrying a `notify` is harmless). No
    /// matching target is not an error.
    pub fn notify(&self, event: Event) -> Result<(), NotifyError> {
        validate_event(&event)?;
        let inner = &*self.inner;
        let body = serde_json::to_vec(&event).map_err(|e| NotifyError::InvalidEvent {
            id: event.id.clone(),
            reason: e.to_string(),
        })?;
        if body.len() > inner.limits.max_event_bytes {
            return Err(NotifyError::InvalidEvent {
                id: event.id.clone(),
                reason: format!(
                    "{} bytes serialized, more than the limit of {}",
                    body.len(),
                    inner.limits.max_event_bytes
                ),
            });
        }
        let body: Arc<[u8]> = body.into();
        let shared = &inner.shared;
        let mut log = shared.log();
        let mut permits = Vec::new();
        for (target, tx) in &inner.targets {
            if !target.matches(&event.kind)
                || log
                    .pending
                    .contains_key(&(target.name.clone(), event.id.clone()))
            {
                continue;
            }
            match tx.try_reserve() {
                Ok(permit) => permits.push((target, permit)),
                Err(mpsc::error::TrySendError::Full(())) => {
                    return Err(NotifyError::QueueFull {
                        target: target.name.clone(),
                        capacity: inner.limits.queue_capacity.max(1),
                    });
                }
                Err(mpsc::error::TrySendError::Closed(())) => {
                    return Err(NotifyError::Stopped(target.name.clone()));
                }
            }
        }
        if permits.is_empty() {
            return Ok(());
        }
        let lines: Vec<LogLine> = permits
            .iter()
            .map(|(t, _)| LogLine::queued(&t.name, &event))
            .collect();
        log.append(&lines, true)
            .map_err(|source| NotifyError::Log {
                path: shared.log_path.clone(),
                source,
            })?;
        let event = Arc::new(event);
        for ((_, permit), line) in permits.into_iter().zip(lines) {
            log.add_pending(line);
            permit.send(Job {
                event: event.clone(),
                body: body.clone(),
                attempts_before: 0,
                not_before: None,
            });
        }
        shared.outstanding.send_replace(log.pending.len());
        log.maybe_rotate();
        Ok(())
    }

    /// The newest `limit` delivery records (queued / attempt failed with status or
    /// error / delivered / gave up), newest first. Records from before a restart are
    /// included (read back from the log); at most [`Limits::recent_records`] are kept.
    pub fn deliveries(&self, limit: usize) -> Vec<DeliveryRecord> {
        self.inner.shared.log().recent(limit)
    }

    /// Waits until nothing is queued or being retried (for tests and clean shutdown),
    /// up to `timeout`; true when that happened.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.shared.outstanding.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await,
            Ok(Ok(_))
        )
    }
}

/// Resolves when the notifier is dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which is also a stop.
    let _ = stop.wait_for(|s| *s).await;
}

async fn run_target(
    shared: Arc<Shared>,
    target: Arc<Target>,
    mut backlog: VecDeque<Job>,
    mut rx: mpsc::Receiver<Job>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let job = match backlog.pop_front() {
            Some(job) => job,
            None => tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
                () = stopped(&mut stop) => return,
            },
        };
        if !deliver(&shared, &target, job, &mut stop).await {
            return;
        }
    }
}

/// Sleeps `d` unless the notifier stops first; false when it stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stopped(stop) => false,
    }
}

fn until(t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(Timestamp::now())).unwrap_or_default()
}

/// What one attempt came to.
enum Outcome {
    Delivered(u16),
    Retry {
        status: Option<u16>,
        error: Option<String>,
        retry_after: Option<Duration>,
    },
    Permanent {
        status: Option<u16>,
        error: Option<String>,
    },
}

/// Delivers one job to completion (delivered or given up); false when the notifier
/// stopped first (the delivery stays unfinished in the log).
async fn deliver(
    shared: &Shared,
    target: &Target,
    job: Job,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let policy = &shared.policy;
    if let Some(t) = job.not_before
        && !sleep_or_stop(until(t), stop).await
    {
        return false;
    }
    let mut attempt = job.attempts_before;
    loop {
        attempt = attempt.saturating_add(1);
        let outcome = tokio::select! {
            o = attempt_once(shared, target, &job, attempt) => o,
            () = stopped(stop) => return false,
        };
        let line = |state, status, error, next_retry| LogLine {
            ts: Timestamp::now(),
            event: job.event.id.clone(),
            target: target.name.clone(),
            state,
            attempt,
            status,
            error,
            next_retry,
            kind: None,
            created: None,
            data: None,
        };
        match outcome {
            Outcome::Delivered(status) => {
                tracing::debug!(target_name = %target.name, event = %job.event.id, attempt, status, "webhook delivered");
                shared.record(line(DeliveryState::Delivered, Some(status), None, None));
                return true;
            }
            Outcome::Retry {
                status,
                error,
                retry_after,
            } if attempt < policy.max_attempts.max(1) => {
                let wait = policy.delay(attempt, retry_after);
                let next = Timestamp::now().checked_add(wait).ok();
                tracing::warn!(target_name = %target.name, event = %job.event.id, attempt, ?status, error = error.as_deref().unwrap_or(""), retry_in_ms = wait.as_millis() as u64, "webhook attempt failed; will retry");
                shared.record(line(DeliveryState::Failed, status, error, next));
                if !sleep_or_stop(wait, stop).await {
                    return false;
                }
            }
            Outcome::Retry { status, error, .. } | Outcome::Permanent { status, error } => {
                tracing::warn!(target_name = %target.name, event = %job.event.id, attempt, ?status, error = error.as_deref().unwrap_or(""), "webhook delivery gave up");
                shared.record(line(DeliveryState::GaveUp, status, error, None));
                return true;
            }
        }
    }
}

/// Describes a transport error without its URL (which may embed a token).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_request() {
        "request"
    } else {
        "error"
    };
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    static HTTP_DATE: jiff::fmt::rfc2822::DateTimeParser =
        jiff::fmt::rfc2822::DateTimeParser::new();
    HTTP_DATE.parse_timestamp(value).ok().map(until)
}

async fn attempt_once(shared: &Shared, target: &Target, job: &Job, attempt: u32) -> Outcome {
    let signature = sign(&target.secret, Timestamp::now(), &job.body);
    let request = shared
        .client
        .post(&target.url)
        .timeout(shared.policy.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(HEADER_EVENT_ID, job.event.id.as_str())
        .header(HEADER_EVENT_TYPE, job.event.kind.as_str())
        .header(HEADER_ATTEMPT, attempt.to_string())
        .header(HEADER_SIGNATURE, signature)
        .body(job.body.to_vec());
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) if e.is_builder() => {
            return Outcome::Permanent {
                status: None,
                error: Some(describe(e)),
            };
        }
        Err(e) => {
            return Outcome::Retry {
                status: None,
                error: Some(describe(e)),
                retry_after: None,
            };
        }
    };
    let status = response.status();
    let code = status.as_u16();
    if status.is_success() {
        return Outcome::Delivered(code);
    }
    let reason = status.canonical_reason().map(str::to_owned);
    if code == 408 || code == 429 || status.is_server_error() {
        Outcome::Retry {
            status: Some(code),
            error: reason,
            retry_after: retry_after(response.headers()),
        }
    } else {
        Outcome::Permanent {
            status: Some(code),
            error: reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        assert_eq!(p.backoff(1000), Duration::from_secs(1));
        for attempt in 1..8 {
            for _ in 0..50 {
                let d = p.delay(attempt, None);
                assert!(
                    d >= p.backoff(attempt) / 2 && d <= p.backoff(attempt),
                    "{attempt} {d:?}"
                );
            }
        }
        // Retry-After raises the wait, up to max_backoff.
        assert_eq!(
            p.delay(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn debug_redacts_secret_and_url_path() {
        let t = Target {
            name: "ops".into(),
            url: "https://hooks.example.com/services/T000/B000/XXXXtoken".into(),
            secret: "whsec_supersecret".into(),
            events: vec!["budget.*".into()],
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("supersecret"), "{shown}");
        assert!(!shown.contains("XXXXtoken"), "{shown}");
        assert!(shown.contains("hooks.example.com"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn target_matching() {
        let mut t = Target {
            name: "a".into(),
            url: "http://x".into(),
            secret: "s".into(),
            events: vec![],
        };
        assert!(t.matches("anything"));
        t.events = vec!["budget.*".into(), "ledger.sealed".into()];
        assert!(t.matches("budget.threshold"));
        assert!(t.matches("ledger.sealed"));
        assert!(!t.matches("ledger.checkpoint"));
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(30))
            .unwrap();
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&later)
            .unwrap();
        h.insert(reqwest::header::RETRY_AFTER, date.parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Thu, 01 Jan 1970 00:00:01 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
