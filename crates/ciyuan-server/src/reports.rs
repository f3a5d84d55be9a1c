//! Scheduled reports: hourly or daily usage and cost of a subtree, written to a
//! directory or POSTed to a signed webhook, once per period, progress kept in the
//! ledger.
//!
//! A period is delivered once it is over (plus the report's `delay`, for late events)
//! and the projector has caught up with everything appended before: the content is
//! read from the projections alone (hourly usage rollups and billing lines), rendered
//! by `ciyuan_report::reports` (the same period gives the same bytes), delivered, and
//! then recorded as a `report.delivered` entry on the report's node. The schedule's
//! progress is the latest period so recorded (the `report_progress` projection), so a
//! restarted server resumes after it and catches up every missed period in order, at
//! most [`MAX_PERIODS_PER_PASS`] per report and pass. A crash between a delivery and
//! its entry delivers that period once more on restart: the same bytes, the same
//! idempotency key, so a receiver drops the repeat.
//!
//! A failed delivery is logged (never with a secret: URLs are shown without
//! credentials or query), raised as a `report.failed` incident once until the report
//! delivers again, and retried at the next pass; the period is never skipped.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{PathParam, Query};
use axum::extract::State;
use axum::http::StatusCode;
use ciyuan_core::jiff::tz::TimeZone;
use ciyuan_core::jiff::{SignedDuration, Timestamp};
use ciyuan_core::{AccountPath, Entry, EntryBody, ExactSum, Incident, ReportDelivered, Scope};
use ciyuan_report::reports::{CostRow, Period, Report, ReportHeader, UsageRow};
pub use ciyuan_report::reports::{Every, Format};
use ciyuan_store::HourFilter;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most periods one report delivers in one pass: a year of missed hours is caught up
/// over many passes, never in one that holds the others back.
pub const MAX_PERIODS_PER_PASS: usize = 24;

/// Attempts of one webhook delivery within a pass (then the pass gives up and the
/// next one retries).
pub const WEBHOOK_ATTEMPTS: u32 = 4;

/// Time limit of one webhook attempt (connect, send, answer's head): all attempts
/// and their backoff stay within a minute, so `ciyuan reports run` sees the outcome.
pub const WEBHOOK_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest report name: it is part of file names and idempotency keys.
pub const MAX_REPORT_NAME_BYTES: usize = 64;

/// Header carrying `<report>/<period>`: the same for every delivery of a period, so a
/// receiver drops a repeat.
pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Where a report goes.
#[derive(Clone)]
pub enum Destination {
    /// Files `<name>_<period>.<csv|json>` in this directory, written atomically.
    Directory(PathBuf),
    /// A signed POST (`x-ciyuan-signature`, as `ciyuan-notify` signs incidents).
    Webhook {
        /// The URL; shown and recorded without credentials or query.
        url: String,
        /// The HMAC-SHA256 key. Never logged or recorded; only a prefix of its hash.
        secret: String,
    },
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl Destination {
    /// As shown and recorded: the directory, or the URL without user, password or
    /// query (webhook URLs often carry a token there).
    pub fn shown(&self) -> String {
        match self {
            Destination::Directory(d) => d.display().to_string(),
            Destination::Webhook { url, .. } => public_url(url),
        }
    }

    fn secret_sha256(&self) -> Option<String> {
        match self {
            Destination::Directory(_) => None,
            Destination::Webhook { secret, .. } => {
                Some(ReportDelivered::hash(secret.as_bytes())[..16].to_string())
            }
        }
    }
}

/// `scheme://host[:port]/path` of `url`, or `<invalid URL>`.
fn public_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.path()
            )
        }
        Err(_) => "<invalid URL>".into(),
    }
}

/// One scheduled report, as configured.
#[derive(Debug, Clone)]
pub struct ReportSpec {
    /// Unique name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// The node whose subtree it covers.
    pub account: AccountPath,
    /// Hourly (UTC hours) or daily (days in the node's time zone).
    pub every: Every,
    /// CSV or JSON.
    pub format: Format,
    /// Where it goes.
    pub destination: Destination,
    /// The first period delivered (`2026-11-05` or `2026-11-05T10`).
    pub start: String,
    /// How long after a period's end it is delivered (late events land before).
    pub delay: Duration,
}

impl ReportSpec {
    /// Checks every field, naming the one that is wrong (`reports[NAME].FIELD: ...`).
    pub fn check(&self) -> Result<(), String> {
        let at = format!("reports[{}]", self.name);
        if self.name.is_empty()
            || self.name.len() > MAX_REPORT_NAME_BYTES
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
            || self.name.starts_with('.')
        {
            return Err(format!(
                "{at}.name: 1 to {MAX_REPORT_NAME_BYTES} letters, digits, '.', '_' or '-', not starting with '.'"
            ));
        }
        // The label's shape; its instants depend on the node's zone, known at run time.
        self.every
            .period(&self.start, &TimeZone::UTC)
            .map_err(|e| format!("{at}.start: {e}"))?;
        match &self.destination {
            Destination::Directory(d) => {
                if d.as_os_str().is_empty() {
                    return Err(format!("{at}.directory: empty path"));
                }
            }
            Destination::Webhook { url, secret } => {
                match reqwest::Url::parse(url) {
                    Ok(u)
                        if (u.scheme() == "http" || u.scheme() == "https")
                            && u.host_str().is_some() => {}
                    _ => return Err(format!("{at}.webhook: not an absolute http(s) URL")),
                }
                if secret.len() < 16 {
                    return Err(format!(
                        "{at}.secret_env: the secret must be at least 16 bytes"
                    ));
                }
            }
        }
        if self.delay > Duration::from_secs(7 * 24 * 3600) {
            return Err(format!("{at}.delay_secs: at most a week"));
        }
        Ok(())
    }

    fn file_name(&self, period: &Period) -> String {
        format!("{}_{}.{}", self.name, period.label, self.format.as_str())
    }

    fn due(&self, period: &Period) -> Timestamp {
        let delay =
            SignedDuration::from_secs(i64::try_from(self.delay.as_secs()).unwrap_or(i64::MAX));
        period.end.checked_add(delay).unwrap_or(Timestamp::MAX)
    }
}

/// Checks a list of reports: each valid, names unique.
pub fn check_all(reports: &[ReportSpec]) -> Result<(), String> {
    for (i, r) in reports.iter().enumerate() {
        r.check()?;
        if reports[..i].iter().any(|o| o.name == r.name) {
            return Err(format!(
                "reports[{}].name: two reports share this name",
                r.name
            ));
        }
    }
    Ok(())
}

/// The report's content for `period`, from the projections: usage per node, service,
/// model and token key; billed cost per node, service, model and currency.
fn content(
    app: &App,
    spec: &ReportSpec,
    period: &Period,
    zone: &TimeZone,
) -> Result<Report, ApiError> {
    let filter = HourFilter {
        account: spec.account.clone(),
        from_hour: Some(period.start.as_second()),
        to_hour: Some(period.end.as_second()),
    };
    let mut usage: BTreeMap<(AccountPath, String, String, String), i128> = BTreeMap::new();
    for r in app.store.usage_hours(&filter)? {
        let key = format!("{}.{}", r.modality, r.direction);
        let slot = usage
            .entry((r.account, r.service, r.model, key))
            .or_insert(0);
        *slot = slot
            .checked_add(r.tokens)
            .ok_or_else(|| ApiError::internal("a report's token sum overflows"))?;
    }
    let mut cost: BTreeMap<(AccountPath, String, String, ciyuan_core::Currency), ExactSum> =
        BTreeMap::new();
    for l in app.store.cost_lines(&filter)? {
        let slot = cost
            .entry((l.account, l.service, l.model, l.currency))
            .or_insert(ExactSum::ZERO);
        *slot = slot
            .checked_add(l.billed)
            .ok_or_else(|| ApiError::internal("a report's cost sum overflows"))?;
    }
    let cost = cost
        .into_iter()
        .map(|((node, service, model, currency), amount)| {
            Ok(CostRow {
                node,
                service,
                model,
                currency,
                amount: amount.to_decimal().ok_or_else(|| {
                    ApiError::internal(format!(
                        "a report's cost ({amount}) needs more than 28 digits"
                    ))
                })?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Report {
        header: ReportHeader {
            name: spec.name.clone(),
            account: spec.account.clone(),
            every: spec.every,
            period: period.clone(),
            time_zone: ciyuan_report::reports::zone_name(zone),
        },
        usage: usage
            .into_iter()
            .map(|((node, service, model, key), tokens)| UsageRow {
                node,
                service,
                model,
                key,
                tokens,
            })
            .collect(),
        cost,
    })
}

/// Writes `bytes` to `dir/file` atomically: a temporary file in the same directory,
/// synced, renamed over the name, and the directory synced, so a reader never sees a
/// part and a crash leaves the old file or the new one.
fn write_atomically(dir: &Path, file: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    // Two writers of one period (the schedule and a run by hand) never share a
    // temporary file: each rename installs one whole file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::fs::create_dir_all(dir)?;
    let target = dir.join(file);
    let temp = dir.join(format!(".{file}.{}-{n}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&temp, &target)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(target)
}

/// Removes the temporary files of `report` that an earlier process left in `dir` when
/// it stopped mid-write (this process's own are in use); answers how many.
fn remove_stale_temps(dir: &Path, report: &str) -> std::io::Result<usize> {
    let prefix = format!(".{report}_");
    let own = format!(".{}-", std::process::id());
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".tmp") && !name.contains(&own) {
            std::fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// POSTs `bytes`, signed, retrying connection errors, timeouts, 408, 429 and 5xx with
/// backoff up to [`WEBHOOK_ATTEMPTS`] times. Errors never show the URL's credentials.
async fn post(
    client: &reqwest::Client,
    spec: &ReportSpec,
    url: &str,
    secret: &str,
    period: &Period,
    bytes: &[u8],
) -> Result<(), String> {
    let policy = ciyuan_notify::RetryPolicy {
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(10),
        ..ciyuan_notify::RetryPolicy::default()
    };
    let key = format!("{}/{}", spec.name, period.label);
    let mut last = String::new();
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let signature = ciyuan_notify::sign(secret, Timestamp::now(), bytes);
        let sent = client
            .post(url)
            .timeout(WEBHOOK_ATTEMPT_TIMEOUT)
            .header("content-type", spec.format.content_type())
            .header(ciyuan_notify::HEADER_SIGNATURE, signature)
            .header(HEADER_IDEMPOTENCY_KEY, &key)
            .header("x-ciyuan-report", &spec.name)
            .header("x-ciyuan-period", &period.label)
            .header("x-ciyuan-period-start", period.start.to_string())
            .header("x-ciyuan-period-end", period.end.to_string())
            .header(ciyuan_notify::HEADER_ATTEMPT, attempt.to_string())
            .body(bytes.to_vec())
            .send()
            .await;
        let retry = match sent {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => {
                let s = r.status();
                last = format!("the receiver answered {s}");
                s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429
            }
            Err(e) => {
                last = format!("POST failed: {}", e.without_url());
                true
            }
        };
        if !retry {
            break;
        }
        if attempt < WEBHOOK_ATTEMPTS {
            tokio::time::sleep(policy.backoff(attempt)).await;
        }
    }
    Err(format!("webhook {}: {last}", public_url(url)))
}

/// Generates, delivers and records one period; answers the recorded delivery and its
/// entry. Waits for the projections to catch up with the log first, so everything
/// appended before the call (and so before the period's end) is counted.
async fn deliver(
    app: &Arc<App>,
    client: &reqwest::Client,
    spec: &ReportSpec,
    period: &Period,
    manual: bool,
) -> Result<(u64, ReportDelivered), ApiError> {
    app.caught_up().await?;
    let (s, p) = (spec.clone(), period.clone());
    let (bytes, zone) = app
        .blocking(move |app| {
            // A node not created yet would be reported in UTC days, shifted once it
            // gets its zone: refused until it exists.
            if !s.account.is_root() && app.store.account(&s.account)?.is_none() {
                return Err(ApiError::unprocessable(format!(
                    "reports[{}].account: {} does not exist",
                    s.name, s.account
                )));
            }
            let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &s.account)?;
            let report = content(app, &s, &p, &zone)?;
            let bytes = report.render(s.format).map_err(ApiError::internal)?;
            Ok((bytes, ciyuan_report::reports::zone_name(&zone)))
        })
        .await?;
    let failed =
        |detail: String| ApiError::new(StatusCode::BAD_GATEWAY, "report-delivery-failed", detail);
    let destination = match &spec.destination {
        Destination::Directory(dir) => {
            let (dir, file, b) = (dir.clone(), spec.file_name(period), bytes.clone());
            let path = tokio::task::spawn_blocking(move || write_atomically(&dir, &file, &b))
                .await
                .map_err(ApiError::internal)?
                .map_err(|e| failed(format!("writing into {}: {e}", spec.destination.shown())))?;
            path.display().to_string()
        }
        Destination::Webhook { url, secret } => {
            post(client, spec, url, secret, period, &bytes)
                .await
                .map_err(failed)?;
            public_url(url)
        }
    };
    let delivered = ReportDelivered {
        name: spec.name.clone(),
        period: period.label.clone(),
        period_start: period.start,
        period_end: period.end,
        time_zone: zone,
        format: spec.format.as_str().to_string(),
        sha256: ReportDelivered::hash(&bytes),
        bytes: bytes.len() as u64,
        destination,
        secret_sha256: spec.destination.secret_sha256(),
        manual,
    };
    let range = app
        .append(&[Entry::new(
            Timestamp::now(),
            spec.account.clone(),
            EntryBody::ReportDelivered(delivered.clone()),
        )])
        .await?;
    Ok((range.start, delivered))
}

fn client() -> Result<reqwest::Client, ApiError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("ciyuan-reports/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ApiError::internal(format!("HTTP client: {}", e.without_url())))
}

/// A report's place in its schedule, kept by the loop between passes.
struct Schedule {
    /// The next period to deliver (its label); `None` until loaded.
    next: Option<String>,
    /// Whether its last attempt failed and an incident was raised for it.
    failing: bool,
}

/// The next period of `spec` after its progress (the latest period its schedule
/// delivered, from the projections), or its `start`, whichever is later.
fn first_due(app: &App, spec: &ReportSpec) -> Result<String, ApiError> {
    let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &spec.account)?;
    let start = spec
        .every
        .period(&spec.start, &zone)
        .map_err(|e| ApiError::internal(format!("reports[{}].start: {e}", spec.name)))?;
    let progress = app.store.report_progress()?;
    let Some(last) = progress.iter().find(|r| r.body.name == spec.name) else {
        return Ok(start.label);
    };
    // A day is named by its date: re-read in today's zone, the next date follows.
    let done = spec.every.period(&last.body.period, &zone).map_err(|e| {
        ApiError::internal(format!(
            "report {}: its schedule delivered up to {:?}, not a period of every = {:?} ({e}); a report whose `every` changes needs a new name",
            spec.name,
            last.body.period,
            spec.every.as_str()
        ))
    })?;
    let next = spec
        .every
        .next(&done, &zone)
        .map_err(|e| ApiError::internal(format!("report {} progress: {e}", spec.name)))?;
    Ok(if next.start >= start.start {
        next.label
    } else {
        start.label
    })
}

/// One step of a report's schedule: delivers its next period if it is due. Answers
/// whether it delivered one; an error names the period it was at, if known.
async fn step(
    app: &Arc<App>,
    client: &reqwest::Client,
    spec: &ReportSpec,
    s: &mut Schedule,
) -> Result<bool, (Option<Period>, ApiError)> {
    let label = match &s.next {
        Some(l) => l.clone(),
        None => {
            app.caught_up().await.map_err(|e| (None, e))?;
            let sp = spec.clone();
            let l = app
                .blocking(move |app| first_due(app, &sp))
                .await
                .map_err(|e| (None, e))?;
            s.next = Some(l.clone());
            l
        }
    };
    let sp = spec.clone();
    let (period, after) = app
        .blocking(move |app| {
            let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &sp.account)?;
            let bad = |e: String| ApiError::internal(format!("report {}: {e}", sp.name));
            let p = sp.every.period(&label, &zone).map_err(bad)?;
            let n = sp.every.next(&p, &zone).map_err(bad)?;
            Ok((p, n.label))
        })
        .await
        .map_err(|e| (None, e))?;
    if Timestamp::now() < spec.due(&period) {
        return Ok(false);
    }
    deliver(app, client, spec, &period, false)
        .await
        .map_err(|e| (Some(period.clone()), e))?;
    s.next = Some(after);
    Ok(true)
}

/// Delivers what is due of one report, at most [`MAX_PERIODS_PER_PASS`] periods, in
/// order; stops at the first failure (the period is retried at the next pass).
async fn pass(app: &Arc<App>, client: &reqwest::Client, spec: &ReportSpec, s: &mut Schedule) {
    for _ in 0..MAX_PERIODS_PER_PASS {
        match step(app, client, spec, s).await {
            Ok(true) => {
                if s.failing {
                    tracing::info!(report = %spec.name, "scheduled report delivered again");
                }
                s.failing = false;
            }
            Ok(false) => return,
            Err((period, e)) => {
                tracing::warn!(
                    report = %spec.name,
                    period = period.as_ref().map(|p| p.label.as_str()).unwrap_or("?"),
                    detail = %e.detail,
                    "scheduled report not delivered; retried at the next pass"
                );
                if !s.failing {
                    s.failing = true;
                    raise(app, spec, period.as_ref(), &e.detail).await;
                }
                return;
            }
        }
    }
}

/// Records a `report.failed` incident on the report's node (and sends it to the
/// incident webhooks, if any).
async fn raise(app: &Arc<App>, spec: &ReportSpec, period: Option<&Period>, why: &str) {
    // Incident text is read back: no control characters, and bounded.
    let mut text: String = why
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect();
    if let Some(p) = period {
        text = format!("{}: {text}", p.label);
    }
    let incident = Incident {
        kind: "report.failed".into(),
        limit: spec.name.clone(),
        mode: ciyuan_core::BudgetMode::Soft,
        window_start: period.map(|p| p.start),
        threshold: None,
        used: 0,
        amount: 0,
        subject: Some(text),
        cause: None,
        cost: None,
    };
    let entry = Entry::new(
        Timestamp::now(),
        spec.account.clone(),
        EntryBody::Incident(incident.clone()),
    );
    let index = match app.append(std::slice::from_ref(&entry)).await {
        Ok(r) => r.start,
        Err(e) => {
            tracing::error!(report = %spec.name, detail = %e.detail, "report incident not recorded");
            return;
        }
    };
    if let Some(n) = &app.config.notifier {
        let event = ciyuan_notify::Event {
            id: format!("incident-{index}"),
            kind: incident.kind.clone(),
            created: entry.ts,
            data: serde_json::json!({
                "entry": index,
                "account": entry.account.as_str(),
                "incident": incident,
            }),
        };
        if let Err(e) = n.notify(event) {
            tracing::error!(error = %e, "webhook not queued");
        }
    }
}

/// Delivers the configured reports' due periods every `ServerConfig::report_interval`,
/// until the app is dropped (the task is aborted on shutdown, like the checkpoints).
pub async fn report_loop(app: Arc<App>) {
    let reports = app.config.reports.clone();
    if reports.is_empty() {
        return;
    }
    let client = match client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(detail = %e.detail, "scheduled reports stopped");
            return;
        }
    };
    let mut schedules: HashMap<String, Schedule> = reports
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                Schedule {
                    next: None,
                    failing: false,
                },
            )
        })
        .collect();
    for spec in &reports {
        if let Destination::Directory(dir) = &spec.destination {
            let (dir, name) = (dir.clone(), spec.name.clone());
            match tokio::task::spawn_blocking(move || remove_stale_temps(&dir, &name)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    tracing::info!(report = %spec.name, removed = n, "removed temporary files of an interrupted write")
                }
                Ok(Err(e)) => {
                    tracing::warn!(report = %spec.name, error = %e, "cannot clear temporary files")
                }
                Err(e) => {
                    tracing::warn!(report = %spec.name, error = %e, "cannot clear temporary files")
                }
            }
        }
    }
    let mut tick = tokio::time::interval(app.config.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Delivered once for the whole ledger: by the node that leads.
        if !app.leads().await {
            continue;
        }
        for spec in &reports {
            if let Some(s) = schedules.get_mut(&spec.name) {
                pass(&app, &client, spec, s).await;
            }
        }
    }
}

fn find<'a>(app: &'a App, name: &str) -> Result<&'a ReportSpec, ApiError> {
    app.config
        .reports
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no report named {name:?} is configured")))
}

/// `GET /api/v1/reports`: the configured reports within the caller's subtree, each with
/// its last delivered period and the next due (read scope).
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    app.caught_up().await?;
    let under = caller.key.account.clone();
    let answer = app
        .blocking(move |app| {
            let progress = app.store.report_progress()?;
            let mut out = Vec::new();
            for spec in app
                .config
                .reports
                .iter()
                .filter(|r| r.account.is_within(&under))
            {
                let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &spec.account)?;
                let last = progress.iter().find(|r| r.body.name == spec.name);
                let next_label = first_due(app, spec)?;
                let next = spec
                    .every
                    .period(&next_label, &zone)
                    .map_err(ApiError::internal)?;
                out.push(serde_json::json!({
                    "name": spec.name,
                    "account": spec.account.as_str(),
                    "every": spec.every.as_str(),
                    "format": spec.format.as_str(),
                    "destination": spec.destination.shown(),
                    "start": spec.start,
                    "delay_secs": spec.delay.as_secs(),
                    "time_zone": ciyuan_report::reports::zone_name(&zone),
                    "last_delivered": last.map(|l| serde_json::json!({
                        "period": l.body.period,
                        "period_start": l.body.period_start.to_string(),
                        "period_end": l.body.period_end.to_string(),
                        "entry": l.entry,
                        "delivered_at": l.ts.to_string(),
                        "sha256": l.body.sha256,
                        "bytes": l.body.bytes,
                    })),
                    "next_due": {
                        "period": next.label,
                        "period_start": next.start.to_string(),
                        "period_end": next.end.to_string(),
                        "due_at": spec.due(&next).to_string(),
                    },
                }));
            }
            Ok(serde_json::json!({ "reports": out }))
        })
        .await?;
    Ok(axum::Json(answer))
}

/// `POST /api/v1/reports/{name}/run` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    /// The period: `2026-11-05` (daily) or `2026-11-05T10` (hourly, UTC).
    period: String,
}

/// `POST /api/v1/reports/{name}/run?period=...`: delivers that period now and records
/// it with `manual: true`; the schedule's progress does not move (root admin key).
pub async fn run(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(name): PathParam,
    Query(q): Query<RunQuery>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if !caller.key.account.is_root() {
        return Err(ApiError::forbidden(
            "reports are the server's configuration: only a root admin key runs one",
        ));
    }
    let spec = find(&app, &name)?.clone();
    let s = spec.clone();
    let label = q.period.clone();
    let period = app
        .blocking(move |app| {
            let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &s.account)?;
            s.every
                .period(&label, &zone)
                .map_err(|e| ApiError::bad_request(format!("period: {e}")))
        })
        .await?;
    if Timestamp::now() < period.end {
        return Err(ApiError::conflict(format!(
            "period: {} is not over until {}",
            period.label, period.end
        )));
    }
    let client = client()?;
    let (entry, d) = deliver(&app, &client, &spec, &period, true).await?;
    Ok(axum::Json(serde_json::json!({
        "report": d.name,
        "period": d.period,
        "period_start": d.period_start.to_string(),
        "period_end": d.period_end.to_string(),
        "time_zone": d.time_zone,
        "format": d.format,
        "destination": d.destination,
        "sha256": d.sha256,
        "bytes": d.bytes,
        "manual": d.manual,
        "entry": entry,
    })))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> ReportSpec {
        ReportSpec {
            name: "daily-usage".into(),
            account: "acme".parse().unwrap(),
            every: Every::Day,
            format: Format::Csv,
            destination: Destination::Webhook {
                url: "https://user:pw@hooks.example.com:8443/in?token=abc".into(),
                secret: "0123456789abcdef-secret".into(),
            },
            start: "2026-11-01".into(),
            delay: Duration::from_secs(60),
        }
    }

    #[test]
    fn urls_are_shown_without_credentials_and_secrets_never() {
        let s = spec();
        assert_eq!(s.destination.shown(), "https://hooks.example.com:8443/in");
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("secret") && !debug.contains("pw") && !debug.contains("abc"),
            "{debug}"
        );
        assert_eq!(s.destination.secret_sha256().unwrap().len(), 16);
    }

    #[test]
    fn every_field_is_checked_by_name() {
        assert!(spec().check().is_ok());
        let bad = |f: &dyn Fn(&mut ReportSpec), needle: &str| {
            let mut s = spec();
            f(&mut s);
            let e = s.check().unwrap_err();
            assert!(e.contains(needle), "{e} lacks {needle}");
        };
        bad(&|s| s.name = "../x".into(), ".name");
        bad(&|s| s.name = String::new(), ".name");
        bad(
            &|s| s.start = "2026-11-01T00".into(),
            "reports[daily-usage].start",
        );
        bad(
            &|s| {
                s.every = Every::Hour;
                s.start = "2026-11-01".into()
            },
            ".start",
        );
        bad(
            &|s| {
                s.destination = Destination::Webhook {
                    url: "ftp://x".into(),
                    secret: "0123456789abcdef".into(),
                }
            },
            ".webhook",
        );
        bad(
            &|s| {
                s.destination = Destination::Webhook {
                    url: "https://x".into(),
                    secret: "short".into(),
                }
            },
            ".secret_env",
        );
        bad(
            &|s| s.delay = Duration::from_secs(30 * 24 * 3600),
            ".delay_secs",
        );
        let two = [spec(), spec()];
        assert!(check_all(&two).unwrap_err().contains("share this name"));
    }

    fn count_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    /// The `report.delivered` entries of the log: (period, manual).
    fn delivered(app: &App) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        app.log
            .scan(0..app.log.size(), &mut |_, bytes| {
                if let EntryBody::ReportDelivered(d) = Entry::decode(bytes).unwrap().body {
                    out.push((d.period, d.manual));
                }
                Ok(())
            })
            .unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_outage_is_caught_up_in_bounded_passes_in_order_and_resumed_from_the_ledger() {
        let dir =
            std::env::temp_dir().join(format!("ciyuan-reports-outage-{}", std::process::id()));
        let now = Timestamp::now();
        let this_hour = Timestamp::from_second(now.as_second().div_euclid(3600) * 3600).unwrap();
        let first = this_hour
            .checked_sub(SignedDuration::from_hours(30))
            .unwrap();
        let label = |t: Timestamp| {
            let z = t.to_zoned(TimeZone::UTC);
            format!("{}T{:02}", z.date(), z.hour())
        };
        let spec = ReportSpec {
            name: "hourly".into(),
            account: AccountPath::root(),
            every: Every::Hour,
            format: Format::Json,
            destination: Destination::Directory(dir.clone()),
            start: label(first),
            delay: Duration::ZERO,
        };
        let store: Arc<dyn ciyuan_store::Store> =
            Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
        let log: Arc<dyn ciyuan_store::Log> = Arc::new(crate::tests::MemLog::new());
        let config = crate::ServerConfig {
            reports: vec![spec.clone()],
            ..crate::ServerConfig::default()
        };
        let app = App::new(store, log, config).unwrap();
        let http = client().unwrap();

        // Thirty hours missed: 24 in the first pass, the other 6 in the next, in order.
        let mut s = Schedule {
            next: None,
            failing: false,
        };
        pass(&app, &http, &spec, &mut s).await;
        assert_eq!(count_files(&dir), MAX_PERIODS_PER_PASS);
        pass(&app, &http, &spec, &mut s).await;
        assert_eq!(count_files(&dir), 30);
        let expected: Vec<(String, bool)> = (0..30)
            .map(|i| {
                (
                    label(first.checked_add(SignedDuration::from_hours(i)).unwrap()),
                    false,
                )
            })
            .collect();
        assert_eq!(delivered(&app), expected);
        // This hour is not over: nothing more.
        pass(&app, &http, &spec, &mut s).await;
        assert_eq!(delivered(&app).len(), 30);

        // By hand: recorded as manual, the schedule's progress unmoved.
        let p = Every::Hour.period(&expected[3].0, &TimeZone::UTC).unwrap();
        let (_, d) = deliver(&app, &http, &spec, &p, true).await.unwrap();
        assert!(d.manual);
        app.caught_up().await.unwrap();
        let progress = app.store.report_progress().unwrap();
        assert_eq!(progress.len(), 1);
        assert_eq!(progress[0].body.period, expected[29].0);

        // As after a restart: the schedule is read back from the projections and
        // delivers nothing again.
        let mut fresh = Schedule {
            next: None,
            failing: false,
        };
        pass(&app, &http, &spec, &mut fresh).await;
        assert_eq!(fresh.next.as_deref(), Some(label(this_hour).as_str()));
        assert_eq!(delivered(&app).len(), 31);
        assert_eq!(
            count_files(&dir),
            30,
            "the run by hand rewrote its period's file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_written_whole_under_its_report_and_period() {
        let dir = std::env::temp_dir().join(format!("ciyuan-reports-{}", std::process::id()));
        let mut s = spec();
        s.destination = Destination::Directory(dir.clone());
        let p = Every::Day.period("2026-11-05", &TimeZone::UTC).unwrap();
        let name = s.file_name(&p);
        assert_eq!(name, "daily-usage_2026-11-05.csv");
        let path = write_atomically(&dir, &name, b"a,b\r\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a,b\r\n");
        let path = write_atomically(&dir, &name, b"c\r\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"c\r\n");
        // A temporary file of an earlier process is cleared; this one's are kept.
        let stale = dir.join(".daily-usage_2026-11-04.csv.1-0.tmp");
        let own = dir.join(format!(
            ".daily-usage_2026-11-06.csv.{}-9.tmp",
            std::process::id()
        ));
        let other = dir.join(".weekly_2026-11-04.csv.1-0.tmp");
        for f in [&stale, &own, &other] {
            std::fs::write(f, b"part").unwrap();
        }
        assert_eq!(remove_stale_temps(&dir, "daily-usage").unwrap(), 1);
        assert!(!stale.exists() && own.exists() && other.exists());
        for f in [&own, &other] {
            std::fs::remove_file(f).unwrap();
        }
        assert_eq!(
            remove_stale_temps(&dir.join("absent"), "daily-usage").unwrap(),
            0
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file is left: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
