//! Finance exports, streamed: `GET /api/v1/exports/{usage|focus|journal}?account=PATH`
//! with `period=YYYY-MM` (in the node's time zone) or `from`/`to`.
//!
//! The billing lines are read a page at a time by key (`Store::cost_lines_page`) on a
//! blocking thread and written through the report crate's writers into a bounded
//! channel the response body drains: memory stays bounded by a page and the channel
//! whatever the export's size, and a client that goes away stops the reading.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{PathParam, Query};
use crate::statements::Period;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ciyuan_core::jiff::{SignedDuration, Timestamp};
use ciyuan_core::{AccountPath, ExactSum, Scope};
use ciyuan_report::{ChargeCategory, CostLine, CostLineRef};
use ciyuan_store::{HourFilter, LineRef, LineRow};
use serde::Deserialize;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Billing lines read per page.
const PAGE_LINES: usize = 4096;
/// Bytes gathered before a chunk is handed to the response.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks in flight between the reader and the response.
const CHUNKS_IN_FLIGHT: usize = 8;

/// `GET /api/v1/exports/{kind}` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// The node whose subtree is exported.
    account: String,
    /// A calendar month in the node's time zone.
    period: Option<String>,
    /// Or a range (RFC 3339, whole hours).
    from: Option<Timestamp>,
    /// End (exclusive).
    to: Option<Timestamp>,
    /// Journal: `generic` (default), `kingdee` or `u8`.
    profile: Option<String>,
    /// Journal: `utf8` (with a byte-order mark, the default) or `gbk`.
    encoding: Option<String>,
    /// Journal: the expense account debited (default `6602`, 管理费用).
    expense: Option<String>,
    /// Journal: the payable or prepaid account credited (default `2202`, 应付账款).
    counter: Option<String>,
    /// Journal: the book's own currency (default: CNY).
    base_currency: Option<String>,
    /// Journal: `node` (default), `service` or `model`: how finely expenses are broken
    /// down.
    detail: Option<String>,
    /// Journal, Kingdee: the account book (账簿) and organisation (核算组织) codes.
    book: Option<String>,
    /// See `book`.
    org: Option<String>,
    /// Journal, U8: who prepared the vouchers (制单人; default `ciyuan`).
    preparer: Option<String>,
}

impl ExportQuery {
    /// The journal's settings, checked; an error names a parameter given to an export
    /// that does not take it.
    fn journal(&self, kind: &str) -> Result<Option<JournalSettings>, ApiError> {
        if kind != "journal" {
            for (name, given) in [
                ("profile", self.profile.is_some()),
                ("encoding", self.encoding.is_some()),
                ("expense", self.expense.is_some()),
                ("counter", self.counter.is_some()),
                ("base_currency", self.base_currency.is_some()),
                ("detail", self.detail.is_some()),
                ("book", self.book.is_some()),
                ("org", self.org.is_some()),
                ("preparer", self.preparer.is_some()),
            ] {
                if given {
                    return Err(ApiError::bad_request(format!(
                        "{name}: only the journal export takes it"
                    )));
                }
            }
            return Ok(None);
        }
        let Some(month) = &self.period else {
            return Err(ApiError::bad_request(
                "period: a journal is for a calendar month (period=YYYY-MM)",
            ));
        };
        let first = crate::statements::month(month)?;
        let period = ciyuan_report::journal::JournalPeriod::month(first.year(), first.month())
            .map_err(|e| ApiError::bad_request(format!("period: {e}")))?;
        let base: ciyuan_core::Currency = self
            .base_currency
            .as_deref()
            .unwrap_or("CNY")
            .parse()
            .map_err(|e| ApiError::bad_request(format!("base_currency: {e}")))?;
        let mut config = ciyuan_report::journal::JournalConfig::new(
            self.expense.as_deref().unwrap_or("6602"),
            self.counter.as_deref().unwrap_or("2202"),
            base,
        );
        config.detail = match self.detail.as_deref().unwrap_or("node") {
            "node" => ciyuan_report::journal::LineDetail::Node,
            "service" => ciyuan_report::journal::LineDetail::Service,
            "model" => ciyuan_report::journal::LineDetail::ServiceModel,
            other => {
                return Err(ApiError::bad_request(format!(
                    "detail: {other:?} is not node, service or model"
                )));
            }
        };
        let encoding = match self.encoding.as_deref().unwrap_or("utf8") {
            "utf8" => ciyuan_report::journal::TextEncoding::Utf8Bom,
            "gbk" => ciyuan_report::journal::TextEncoding::Gbk,
            other => {
                return Err(ApiError::bad_request(format!(
                    "encoding: {other:?} is not utf8 or gbk"
                )));
            }
        };
        let profile = match self.profile.as_deref().unwrap_or("generic") {
            "generic" => Profile::Generic,
            "kingdee" => match (&self.book, &self.org) {
                (Some(b), Some(o)) => {
                    Profile::Kingdee(ciyuan_report::journal::KingdeeSettings::new(b, o))
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "book, org: Kingdee's voucher import names the account book and organisation codes",
                    ));
                }
            },
            "u8" => Profile::U8(self.preparer.clone().unwrap_or_else(|| "ciyuan".into())),
            other => {
                return Err(ApiError::bad_request(format!(
                    "profile: {other:?} is not generic, kingdee or u8"
                )));
            }
        };
        Ok(Some(JournalSettings {
            period,
            config,
            encoding,
            profile,
        }))
    }
}

/// The ERP layout of a journal.
enum Profile {
    Generic,
    Kingdee(ciyuan_report::journal::KingdeeSettings),
    /// With the preparer's name.
    U8(String),
}

/// A journal export's choices.
struct JournalSettings {
    period: ciyuan_report::journal::JournalPeriod,
    config: ciyuan_report::journal::JournalConfig,
    encoding: ciyuan_report::journal::TextEncoding,
    profile: Profile,
}

/// Node, service, model, adjustment, key, currency, book, version.
type JournalKey = (
    AccountPath,
    String,
    String,
    bool,
    String,
    ciyuan_core::Currency,
    String,
    u32,
);

/// The month's billing lines summed per node, service, model, category, key and
/// currency (a voucher needs no finer grain), and those nodes' attributes: bounded by the
/// tree and its models, not by the usage.
fn journal_lines(
    app: &App,
    node: &AccountPath,
    filter: &HourFilter,
) -> std::io::Result<(
    Vec<CostLine>,
    std::collections::BTreeMap<AccountPath, ciyuan_core::AccountInfo>,
)> {
    let mut sums: std::collections::BTreeMap<JournalKey, CostLine> =
        std::collections::BTreeMap::new();
    each_line(app, filter, |l| {
        let key = (
            l.account.clone(),
            l.service.to_string(),
            l.model.to_string(),
            l.category == ChargeCategory::Adjustment,
            l.key.to_string(),
            l.currency,
            l.book.to_string(),
            l.version,
        );
        match sums.get_mut(&key) {
            Some(s) => {
                s.quantity += l.quantity;
                s.list_cost += l.list_cost;
                s.contracted_cost += l.contracted_cost;
                s.billed_cost += l.billed_cost;
            }
            None => {
                sums.insert(key, l.to_owned_line());
            }
        }
        Ok(())
    })?;
    // The attributes (name, department) of the nodes with lines only: no more than the
    // lines summed per node, however large the subtree read a page at a time.
    let with_lines: std::collections::BTreeSet<&AccountPath> = sums.keys().map(|k| &k.0).collect();
    let mut nodes = std::collections::BTreeMap::new();
    ciyuan_store::each_account(app.store.as_ref(), node, &mut |a| {
        if with_lines.contains(&a.path) {
            nodes.insert(a.path, a.info);
        }
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    drop(with_lines);
    Ok((sums.into_values().collect(), nodes))
}

/// A response body fed by a channel.
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }
}

/// A `Write` that hands full chunks to the response (blocking when it is behind).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn decimal(d: ExactSum, what: &str) -> std::io::Result<rust_decimal::Decimal> {
    // Already normalized: `to_decimal` drops the fraction's trailing zeros.
    d.to_decimal()
        .ok_or_else(|| std::io::Error::other(format!("{what} ({d}) needs more than 28 digits")))
}

/// What a stored billing line charges for.
fn category(adjustment: bool, key: &str) -> ChargeCategory {
    if !adjustment {
        ChargeCategory::Usage
    } else if key == "refund" || key.starts_with("service_credit:") {
        ChargeCategory::Credit
    } else {
        ChargeCategory::Adjustment
    }
}

/// The charge period of the last hour seen: lines come in runs of one hour.
#[derive(Default)]
struct HourPeriod(Option<(i64, Timestamp, Timestamp)>);

impl HourPeriod {
    fn of(&mut self, hour: i64) -> std::io::Result<(Timestamp, Timestamp)> {
        match self.0 {
            Some((h, start, end)) if h == hour => Ok((start, end)),
            _ => {
                let start = Timestamp::from_second(hour).map_err(std::io::Error::other)?;
                let end = start
                    .checked_add(SignedDuration::from_hours(1))
                    .map_err(std::io::Error::other)?;
                self.0 = Some((hour, start, end));
                Ok((start, end))
            }
        }
    }
}

/// A page of billing lines copied out of the store's rows for the formatting thread:
/// texts in one buffer, lines as ranges of it, the buffers reused page after page.
#[derive(Default)]
struct Page {
    text: String,
    nodes: Vec<AccountPath>,
    lines: Vec<PackedLine>,
    count: usize,
    last: Option<LineRow>,
}

/// A line of a [`Page`]: its texts are ranges of the page's text, its node an index.
struct PackedLine {
    hour: i64,
    node: usize,
    adjustment: bool,
    service: (usize, usize),
    model: (usize, usize),
    key: (usize, usize),
    book: (usize, usize),
    unit_price: Option<rust_decimal::Decimal>,
    currency: ciyuan_core::Currency,
    version: u32,
    sums: [rust_decimal::Decimal; 4],
}

impl Page {
    fn clear(&mut self) {
        self.text.clear();
        self.nodes.clear();
        self.lines.clear();
        self.count = 0;
        self.last = None;
    }

    /// The range of `t` in the text, the previous line's `prev` when it is the same
    /// text (a node's lines repeat their service, book and model).
    fn text_of(&mut self, t: &str, prev: Option<(usize, usize)>) -> (usize, usize) {
        if let Some((a, b)) = prev
            && self.text.get(a..b) == Some(t)
        {
            return (a, b);
        }
        let a = self.text.len();
        self.text.push_str(t);
        (a, self.text.len())
    }

    fn push(&mut self, l: &LineRef<'_>) {
        if self.nodes.last() != Some(l.account) {
            self.nodes.push(l.account.clone());
        }
        let prev = self.lines.last().map(|p| (p.service, p.model, p.book));
        let service = self.text_of(l.service, prev.map(|p| p.0));
        let model = self.text_of(l.model, prev.map(|p| p.1));
        let book = self.text_of(l.book, prev.map(|p| p.2));
        let key = self.text_of(l.key, None);
        self.lines.push(PackedLine {
            hour: l.hour,
            node: self.nodes.len() - 1,
            adjustment: l.adjustment,
            service,
            model,
            key,
            book,
            unit_price: l.unit_price,
            currency: l.currency,
            version: l.version,
            sums: [l.quantity, l.list, l.contracted, l.billed],
        });
    }

    fn text(&self, (a, b): (usize, usize)) -> std::io::Result<&str> {
        self.text
            .get(a..b)
            .ok_or_else(|| std::io::Error::other("a packed billing line's text is out of its page"))
    }
}

/// Pages in flight between the reading and the formatting thread, besides the one
/// each holds.
const PAGES_AHEAD: usize = 1;

/// Reads every billing line of `filter` a page at a time and hands each to `write`
/// as the report crate takes it (its hour is its charge period).
///
/// Two threads: this one formats while another reads the next page from the store
/// (SQLite's stepping and decoding is about half of an export's CPU), for machines with
/// a core to spare. The pages are copied into buffers that go back and forth and are
/// reused, so nothing is allocated per line and no line is freed on a thread other
/// than the one that made it (a read-ahead of `LineRow`s, each with its `String`s, was
/// measured slower than one thread); at most `PAGES_AHEAD + 2` pages exist at once.
/// On the two shared cores of BENCHMARKS.md, busy with other builds, it measured as
/// fast as one thread, no faster.
fn each_line(
    app: &App,
    filter: &HourFilter,
    mut write: impl FnMut(&CostLineRef<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Page>(PAGES_AHEAD);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Page>();
    for _ in 0..PAGES_AHEAD + 1 {
        // Infallible: the receiver is alive here.
        let _ = empty_tx.send(Page::default());
    }
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("export-read".into())
            .spawn_scoped(scope, move || -> std::io::Result<()> {
                let mut after: Option<LineRow> = None;
                // A page comes back once formatted; none when the formatter stopped.
                while let Ok(mut page) = empty_rx.recv() {
                    page.clear();
                    let done = app
                        .store
                        .each_cost_line(filter, after.as_ref(), PAGE_LINES, &mut |l| {
                            page.push(l);
                            ControlFlow::Continue(())
                        })
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    page.count = done.count;
                    page.last = done.last;
                    let more = page.count == PAGE_LINES;
                    after = page.last.clone();
                    if full_tx.send(page).is_err() || !more {
                        break;
                    }
                }
                Ok(())
            })?;
        let mut hours = HourPeriod::default();
        let mut complete = false;
        let written = (|| -> std::io::Result<()> {
            for page in full_rx.iter() {
                for l in &page.lines {
                    let (start, end) = hours.of(l.hour)?;
                    let account = page.nodes.get(l.node).ok_or_else(|| {
                        std::io::Error::other("a packed line's node is out of its page")
                    })?;
                    let key = page.text(l.key)?;
                    write(&CostLineRef {
                        account,
                        charge_period_start: start,
                        charge_period_end: end,
                        category: category(l.adjustment, key),
                        service: page.text(l.service)?,
                        model: page.text(l.model)?,
                        key,
                        quantity: l.sums[0],
                        list_unit_price: l.unit_price,
                        list_cost: l.sums[1],
                        contracted_cost: l.sums[2],
                        billed_cost: l.sums[3],
                        currency: l.currency,
                        book: page.text(l.book)?,
                        version: l.version,
                    })?;
                }
                complete = page.count < PAGE_LINES;
                // The reader may have stopped; then the page is dropped here.
                let _ = empty_tx.send(page);
            }
            Ok(())
        })();
        // Unblocks a reader waiting for a page to fill or a place to put one.
        drop(full_rx);
        drop(empty_tx);
        let read = reader
            .join()
            .map_err(|_| std::io::Error::other("the export's reading thread panicked"))?;
        written?;
        read?;
        if complete {
            Ok(())
        } else {
            Err(std::io::Error::other(
                "the export's reading thread stopped early",
            ))
        }
    })
}

/// Usage and cost per node and day in the node's own time zone (the HR report): the
/// usage view, where a correction counts on the day of the usage it corrects. Bounded
/// by the subtree's nodes and the period's days.
fn hr_rows(app: &App, filter: &HourFilter) -> std::io::Result<Vec<ciyuan_report::hr::HrRow>> {
    use ciyuan_core::jiff::tz::TimeZone;
    use std::collections::BTreeMap;
    let io = |e: ciyuan_store::StoreError| std::io::Error::other(e.to_string());
    let usage = app.store.usage_hours(filter).map_err(io)?;
    let costs = app.store.cost_hours(filter).map_err(io)?;
    let mut zones: rustc_hash::FxHashMap<AccountPath, TimeZone> = Default::default();
    let mut day_of = |node: &AccountPath,
                      hour: i64|
     -> std::io::Result<ciyuan_core::jiff::civil::Date> {
        let zone = match zones.get(node) {
            Some(z) => z.clone(),
            None => {
                let z = ciyuan_store::effective_time_zone(app.store.as_ref(), node).map_err(io)?;
                zones.insert(node.clone(), z.clone());
                z
            }
        };
        let t = Timestamp::from_second(hour).map_err(std::io::Error::other)?;
        Ok(t.to_zoned(zone).date())
    };
    type Day = (i128, BTreeMap<ciyuan_core::Currency, ExactSum>);
    let mut days: BTreeMap<(AccountPath, ciyuan_core::jiff::civil::Date), Day> = BTreeMap::new();
    for u in usage {
        let d = day_of(&u.account, u.hour)?;
        let slot = days.entry((u.account, d)).or_default();
        slot.0 = slot
            .0
            .checked_add(u.tokens)
            .ok_or_else(|| std::io::Error::other("a day's tokens overflow"))?;
    }
    for c in costs {
        let d = day_of(&c.account, c.hour)?;
        let slot = days
            .entry((c.account, d))
            .or_default()
            .1
            .entry(c.currency)
            .or_insert(ExactSum::ZERO);
        *slot = slot
            .checked_add(c.amount)
            .ok_or_else(|| std::io::Error::other("a day's cost overflows"))?;
    }
    let mut infos: rustc_hash::FxHashMap<AccountPath, Option<ciyuan_core::AccountInfo>> =
        Default::default();
    let mut out = Vec::with_capacity(days.len());
    for ((account, day), (tokens, costs)) in days {
        if !infos.contains_key(&account) {
            let info = app.store.account(&account).map_err(io)?.map(|a| a.info);
            infos.insert(account.clone(), info);
        }
        let info = infos.get(&account).and_then(Option::as_ref);
        let mut money = BTreeMap::new();
        for (c, s) in costs {
            money.insert(c, decimal(s, "a day's cost")?);
        }
        out.push(ciyuan_report::hr::HrRow {
            day,
            display_name: info.and_then(|i| i.display_name.clone()),
            employee_id: info.and_then(|i| i.metadata.get("employee_id").cloned()),
            account,
            tokens,
            costs: money,
        });
    }
    Ok(out)
}

/// Display names of the nodes an export names, each read once.
#[derive(Default)]
struct NodeNames {
    names: rustc_hash::FxHashMap<AccountPath, Option<String>>,
    // The node of the previous line: lines come in runs of one node, so most lookups
    // are this one and need no hashing.
    last: Option<(AccountPath, Option<String>)>,
}

impl NodeNames {
    fn of(&mut self, app: &App, node: &AccountPath) -> std::io::Result<Option<&str>> {
        if self.last.as_ref().is_none_or(|(n, _)| n != node) {
            let name = match self.names.get(node) {
                Some(n) => n.clone(),
                None => {
                    let name = app
                        .store
                        .account(node)
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                        .and_then(|a| a.info.display_name);
                    self.names.insert(node.clone(), name.clone());
                    name
                }
            };
            self.last = Some((node.clone(), name));
        }
        Ok(self.last.as_ref().and_then(|(_, n)| n.as_deref()))
    }
}

/// `GET /api/v1/exports/{kind}?account=PATH&period=2026-11` (or `from`/`to`): `usage`
/// (Ciyuan's columns) or `focus` (FOCUS 1.2), streamed as CSV (a read key of the node
/// or above).
pub async fn export(
    State(app): State<Arc<App>>,
    caller: Caller,
    PathParam(kind): PathParam,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let node: AccountPath = crate::budgets::existing_node(&app, &caller, &q.account).await?;
    if !matches!(kind.as_str(), "usage" | "focus" | "journal" | "hr") {
        return Err(ApiError::not_found(format!(
            "export {kind:?}: the exports are usage, focus, journal and hr"
        )));
    }
    let journal = q.journal(&kind)?;
    app.caught_up().await?;
    let n = node.clone();
    let (period, name) = app
        .blocking(move |app| {
            let zone = ciyuan_store::effective_time_zone(app.store.as_ref(), &n)?;
            let name = app.store.account(&n)?.and_then(|a| a.info.display_name);
            Ok((
                Period::of_range(q.period.as_deref(), q.from, q.to, &zone)?,
                name,
            ))
        })
        .await?;
    let meta = ciyuan_report::focus::FocusMeta::new(node.clone(), name, period.from, period.to);
    let filter = period.filter(&node);
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let app2 = app.clone();
    let root = node.clone();
    let focus = kind == "focus";
    let hr = kind == "hr";
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK_BYTES),
        };
        let focus_error =
            |e: ciyuan_report::focus::FocusError| std::io::Error::other(e.to_string());
        let done = (|| {
            if let Some(j) = journal {
                let (lines, nodes) = journal_lines(&app2, &root, &filter)?;
                let built =
                    ciyuan_report::journal::build_journal(&lines, &nodes, &j.period, &j.config)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                let written = match &j.profile {
                    Profile::Generic => {
                        ciyuan_report::journal::write_generic(&built, j.encoding, &mut w)
                    }
                    Profile::Kingdee(k) => {
                        ciyuan_report::journal::write_kingdee(&built, k, j.encoding, &mut w)
                    }
                    Profile::U8(p) => {
                        ciyuan_report::journal::write_u8(&built, j.encoding, p, &mut w)
                    }
                };
                written.map_err(|e| std::io::Error::other(e.to_string()))?;
            } else if hr {
                let rows = hr_rows(&app2, &filter)?;
                ciyuan_report::hr::write_hr_csv(&mut w, rows)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            } else if focus {
                let mut names = NodeNames::default();
                let mut focus =
                    ciyuan_report::focus::FocusWriter::new(&mut w, meta).map_err(focus_error)?;
                each_line(&app2, &filter, |l| {
                    let name = names.of(&app2, l.account)?;
                    focus.write_ref(l, name).map_err(focus_error)
                })?;
                focus.finish().map_err(focus_error)?;
            } else {
                let mut usage = ciyuan_report::usage::UsageWriter::new(&mut w)?;
                each_line(&app2, &filter, |l| usage.write(&l.to_owned_line()))?;
                usage.finish()?;
            }
            w.send()
        })();
        if let Err(e) = done {
            // The headers are gone: the body ends with the error, and the client sees
            // a cut transfer, never a short file that looks whole.
            tracing::warn!(detail = %e, "export stopped");
            let _ = tx.blocking_send(Err(e));
        }
    });
    let name = format!(
        "attachment; filename=\"ciyuan-{kind}-{}-{}.csv\"",
        node.as_str().replace('/', "_"),
        period.label()
    );
    let mut resp = Body::new(ChannelBody(rx)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&name) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    proptest! {
        /// A stored sum reads back as the normalized decimal it was, digit for digit
        /// (what `normalize` would give, which is why `decimal` does not call it).
        #[test]
        fn stored_sums_read_back_normalized(m in any::<i64>(), scale in 0u32..=28) {
            let d = rust_decimal::Decimal::new(m, scale);
            let back = decimal(ExactSum::of(d), "a test amount").unwrap();
            prop_assert_eq!(back.to_string(), d.normalize().to_string());
            prop_assert_eq!(back.scale(), d.normalize().scale());
        }
    }
}
