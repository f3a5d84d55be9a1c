//! The delivery log: an append-only JSON-lines file that is also the durable outbox.
//!
//! One record per line:
//!
//! ```text
//! {"ts":"…","event":"evt-1","target":"ops","state":"queued","attempt":0,"type":"budget.threshold","created":"…","data":{…}}
//! {"ts":"…","event":"evt-1","target":"ops","state":"failed","attempt":1,"status":503,"next_retry":"…"}
//! {"ts":"…","event":"evt-1","target":"ops","state":"failed","attempt":2,"error":"connect: …","next_retry":"…"}
//! {"ts":"…","event":"evt-1","target":"ops","state":"delivered","attempt":3,"status":200}
//! ```
//!
//! A `queued` record carries the whole event, so the log alone is enough to deliver
//! it after a restart. A delivery is unfinished while its latest record is `queued`
//! or `failed`; `delivered` and `gave_up` finish it.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{DeliveryRecord, DeliveryState, Event};

/// One line of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LogLine {
    pub ts: Timestamp,
    pub event: String,
    pub target: String,
    pub state: DeliveryState,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<Timestamp>,
    /// The event's type (`queued` records only).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// When the event was created (`queued` records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Timestamp>,
    /// The event's data (`queued` records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl LogLine {
    pub(crate) fn queued(target: &str, event: &Event) -> LogLine {
        LogLine {
            ts: Timestamp::now(),
            event: event.id.clone(),
            target: target.to_owned(),
            state: DeliveryState::Queued,
            attempt: 0,
            status: None,
            error: None,
            next_retry: None,
            kind: Some(event.kind.clone()),
            created: Some(event.created),
            data: Some(event.data.clone()),
        }
    }

    pub(crate) fn record(&self) -> DeliveryRecord {
        DeliveryRecord {
            ts: self.ts,
            event_id: self.event.clone(),
            target: self.target.clone(),
            state: self.state,
            attempt: self.attempt,
            status: self.status,
            error: self.error.clone(),
            next_retry: self.next_retry,
        }
    }

    /// The event a `queued` line carries.
    pub(crate) fn to_event(&self) -> Option<Event> {
        Some(Event {
            id: self.event.clone(),
            kind: self.kind.clone()?,
            created: self.created?,
            data: self.data.clone().unwrap_or(serde_json::Value::Null),
        })
    }

    fn key(&self) -> (String, String) {
        (self.target.clone(), self.event.clone())
    }
}

/// An unfinished delivery: its `queued` line and its latest `failed` line, if any.
#[derive(Debug)]
pub(crate) struct Pending {
    pub seq: u64,
    pub queued: LogLine,
    pub last: Option<LogLine>,
}

/// The open log plus the in-memory views derived from it, all under one lock so the
/// file's order is the order of the views.
pub(crate) struct LogState {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    bytes: u64,
    /// Rotate when the file grows past this: `max_log_bytes` beyond what the last
    /// rotation carried over.
    rotate_at: u64,
    max_log_bytes: u64,
    /// Unfinished deliveries by (target, event id).
    pub pending: HashMap<(String, String), Pending>,
    next_seq: u64,
    /// The newest records, oldest first.
    recent: VecDeque<DeliveryRecord>,
    recent_cap: usize,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The previous generation of the log, kept by one rotation.
pub(crate) fn rotated_path(path: &Path) -> PathBuf {
    sibling(path, ".1")
}

impl LogState {
    /// Opens (creating if needed) the log at `path` and replays it. A torn last line
    /// (no newline: its writer died mid-append, so it was never acknowledged) is cut
    /// off; other unreadable lines are skipped with a warning.
    pub(crate) fn open(path: &Path, max_log_bytes: u64, recent_cap: usize) -> io::Result<LogState> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut reader = BufReader::new(&file);
        let mut pending: HashMap<(String, String), Pending> = HashMap::new();
        let mut recent = VecDeque::with_capacity(recent_cap.min(4096));
        let mut next_seq = 0u64;
        let mut good_bytes = 0u64;
        let mut line = Vec::new();
        let mut line_no = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                tracing::warn!(path = %path.display(), bytes = n, "delivery log: cutting a torn last line");
                break;
            }
            good_bytes += n as u64;
            line_no += 1;
            let parsed: LogLine = match serde_json::from_slice(&line) {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = line_no, error = %e, "delivery log: skipping an unreadable line");
                    continue;
                }
            };
            let key = parsed.key();
            match parsed.state {
                DeliveryState::Queued => {
                    if parsed.to_event().is_none() {
                        tracing::warn!(
                            line = line_no,
                            "delivery log: queued record without its event; skipped"
                        );
                    } else if let std::collections::hash_map::Entry::Vacant(slot) =
                        pending.entry(key)
                    {
                        slot.insert(Pending {
                            seq: next_seq,
                            queued: parsed.clone(),
                            last: None,
                        });
                        next_seq += 1;
                    }
                }
                DeliveryState::Failed => {
                    if let Some(p) = pending.get_mut(&key) {
                        p.last = Some(parsed.clone());
                    }
                }
                DeliveryState::Delivered | DeliveryState::GaveUp => {
                    pending.remove(&key);
                }
            }
            if recent_cap > 0 {
                if recent.len() == recent_cap {
                    recent.pop_front();
                }
                recent.push_back(parsed.record());
            }
        }
        drop(reader);
        let len = file.metadata()?.len();
        if len > good_bytes {
            file.set_len(good_bytes)?;
            file.sync_data()?;
        }
        let mut state = LogState {
            path: path.to_owned(),
            file,
            bytes: good_bytes,
            rotate_at: max_log_bytes,
            max_log_bytes,
            pending,
            next_seq,
            recent,
            recent_cap,
        };
        state.maybe_rotate();
        Ok(state)
    }

    /// Appends `lines` with one `write` (and, when `sync`, one `fdatasync`).
    pub(crate) fn append(&mut self, lines: &[LogLine], sync: bool) -> io::Result<()> {
        let mut buf = Vec::with_capacity(256 * lines.len());
        for line in lines {
            serde_json::to_writer(&mut buf, line).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        if sync {
            self.file.sync_data()?;
        }
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Registers a new unfinished delivery (its `queued` line is already in the file).
    pub(crate) fn add_pending(&mut self, queued: LogLine) {
        self.push_recent(queued.record());
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            queued.key(),
            Pending {
                seq,
                queued,
                last: None,
            },
        );
    }

    /// Applies an attempt's outcome (already in the file) to the views.
    pub(crate) fn apply(&mut self, line: LogLine) {
        self.push_recent(line.record());
        let key = line.key();
        match line.state {
            DeliveryState::Delivered | DeliveryState::GaveUp => {
                self.pending.remove(&key);
            }
            DeliveryState::Failed => {
                if let Some(p) = self.pending.get_mut(&key) {
                    p.last = Some(line);
                }
            }
            DeliveryState::Queued => {}
        }
    }

    fn push_recent(&mut self, record: DeliveryRecord) {
        if self.recent_cap == 0 {
            return;
        }
        if self.recent.len() == self.recent_cap {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }

    /// The newest `limit` records, newest first.
    pub(crate) fn recent(&self, limit: usize) -> Vec<DeliveryRecord> {
        self.recent.iter().rev().take(limit).cloned().collect()
    }

    /// Unfinished deliveries in enqueue order.
    pub(crate) fn pending_in_order(&self) -> Vec<&Pending> {
        let mut all: Vec<&Pending> = self.pending.values().collect();
        all.sort_by_key(|p| p.seq);
        all
    }

    /// Rotates when the file has grown past its bound; failures are logged and the
    /// current file kept (appending continues, rotation is retried later).
    pub(crate) fn maybe_rotate(&mut self) {
        if self.bytes <= self.rotate_at {
            return;
        }
        if let Err(e) = self.rotate() {
            tracing::error!(path = %self.path.display(), error = %e, "delivery log: rotation failed; keeping the current file");
            // Do not retry on every append.
            self.rotate_at = self.bytes.saturating_add(self.max_log_bytes);
        }
    }

    /// Keeps the current file as `<path>.1` (replacing the previous one) and starts a
    /// new file holding only the unfinished deliveries (their `queued` and latest
    /// `failed` records, in enqueue order). Crash-safe: the new file is written and
    /// synced under a temporary name, the old one hard-linked to `<path>.1`, and the
    /// new one renamed over `<path>`, so `<path>` is always a complete log.
    fn rotate(&mut self) -> io::Result<()> {
        let tmp_path = sibling(&self.path, ".tmp");
        let mut lines = Vec::new();
        for p in self.pending_in_order() {
            lines.push(p.queued.clone());
            if let Some(last) = &p.last {
                lines.push(last.clone());
            }
        }
        let mut buf = Vec::new();
        for line in &lines {
            serde_json::to_writer(&mut buf, line).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        {
            let mut tmp = File::create(&tmp_path)?;
            tmp.write_all(&buf)?;
            tmp.sync_all()?;
        }
        let old = rotated_path(&self.path);
        match std::fs::remove_file(&old) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if std::fs::hard_link(&self.path, &old).is_err() {
            std::fs::copy(&self.path, &old)?;
        }
        std::fs::rename(&tmp_path, &self.path)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                // Best effort: directory fsync is not supported everywhere.
                let _ = d.sync_all();
            }
        }
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)?;
        self.bytes = buf.len() as u64;
        // The carried-over unfinished deliveries do not count against the bound, so a
        // backlog near the bound does not make every append rotate.
        self.rotate_at = self.bytes.saturating_add(self.max_log_bytes);
        tracing::info!(path = %self.path.display(), kept = lines.len(), "delivery log rotated");
        Ok(())
    }
}
