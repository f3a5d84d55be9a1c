//! Slices of a counter's room, held in the database the nodes share by one node and
//! spent by its requests without a database call each.
//!
//! Holding every request in the database (`holds.rs`) puts a round trip and a
//! counter's advisory lock in every admission: on one hot counter the requests of all
//! nodes queue on that lock (`ciyuan bench admission`: p99 8–14 ms under load). A node
//! instead holds a slice of the counter's room — at most the room left divided by
//! twice the live nodes, at most what it admitted in the last two seconds — and admits
//! its requests from it in memory. The database counts the slice as one request in
//! flight of its whole size, so every other node's admission sees it, and the
//! accounting of `Store::reserve` stays exact: a request is admitted from a slice only
//! while the needs admitted from it fit in it.
//!
//! A slice admits for `LIFE` after it is granted (or until it is spent, or no request
//! came for an eighth of that), then drains:
//! it is trimmed to what its requests still hold (their usage where recorded, their
//! needs where not), and once the last of them ended it counts what they recorded,
//! with the last entry that holds it — as a settled hold does — until every node has
//! followed past that entry. A new slice is asked for in the background when the
//! active one is half spent, so requests rarely wait. When the room left is too small
//! to slice (near the limit, or a wallet near zero), requests are held one by one
//! again, exactly as before.
//!
//! The slice's life is far below the 60 s after which the other nodes take a silent
//! node for dead and drop its holds, so a node cut off from the database stops
//! admitting from its slices long before the others count them gone.

pub use crate::holds::Counted;
use ciyuan_store::{HoldTerm, Seen, SliceAsk, SliceSize, Store, StoreError};
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a slice admits requests after it is granted.
pub const LIFE: Duration = Duration::from_secs(2);

/// A slice no request was admitted from for this part of its life goes before its
/// life ends: its room is the other nodes' again (a burst that ended, or a node near
/// a limit whose requests stopped coming). 250 ms of the 2 s.
const IDLE_PART: u32 = 8;

/// How often the slices past their life or idle are looked for.
const SWEEP: Duration = Duration::from_millis(100);

/// How long a counter asks for no slice after one was refused (its room is small:
/// its requests are held one by one meanwhile).
const QUIET: Duration = Duration::from_millis(250);

/// A slice is at least this many of the asking request's needs, or not worth holding.
const LEAST_REQUESTS: u32 = 4;

/// A slice asks for at least this many of the asking request's needs.
const WANT_REQUESTS: u32 = 64;

/// One of a request's terms, as the slices see it.
pub struct Want<'a> {
    /// The term, as the database would hold it for the request alone.
    pub term: &'a HoldTerm,
    /// Whether a lower `amount` than the slice was granted under means the counter's
    /// amount was lowered (a limit); a wallet's amount falls with every payment the
    /// slice itself covers, so it is not compared.
    pub fixed_amount: bool,
}

/// Where slices are held: the store's two calls (a trait of its own so the slices'
/// accounting is tested without a database).
pub trait Backend: Send + Sync + 'static {
    /// `Store::reserve_slices`.
    fn reserve_slices(
        &self,
        node: &str,
        seen: Seen,
        counted: &[i64],
        asks: &[SliceAsk],
        ttl: Duration,
    ) -> Result<Vec<Option<Decimal>>, StoreError>;
    /// `Store::resize_slices`.
    fn resize_slices(&self, sizes: &[SliceSize]) -> Result<(), StoreError>;
}

/// A store as the slices' backend.
pub struct OfStore(pub Arc<dyn Store>);

impl Backend for OfStore {
    fn reserve_slices(
        &self,
        node: &str,
        seen: Seen,
        counted: &[i64],
        asks: &[SliceAsk],
        ttl: Duration,
    ) -> Result<Vec<Option<Decimal>>, StoreError> {
        self.0.reserve_slices(node, seen, counted, asks, ttl)
    }
    fn resize_slices(&self, sizes: &[SliceSize]) -> Result<(), StoreError> {
        self.0.resize_slices(sizes)
    }
}

/// The slices of one node.
pub struct Slices {
    node: String,
    store: Arc<dyn Backend>,
    ttl: Duration,
    life: Duration,
    state: Mutex<HashMap<String, Counter>>,
    work: Mutex<mpsc::Sender<Work>>,
    /// Requests admitted from slices, and not (held alone).
    from_slices: AtomicU64,
    alone: AtomicU64,
    /// Slices granted and refused.
    granted: AtomicU64,
    refused: AtomicU64,
}

/// A counter's slices on this node.
struct Counter {
    /// The slice admitting requests.
    active: Option<Slice>,
    /// Slices that admit no more, until their requests end.
    draining: Vec<Slice>,
    /// A slice is being asked for.
    asking: bool,
    /// No slice is asked for before this (one was just refused).
    quiet_until: Option<Instant>,
    /// Needs admitted on this counter since `window` began, and in the window before.
    demand: Decimal,
    demand_before: Decimal,
    window: Instant,
}

/// One slice.
struct Slice {
    id: i64,
    /// What the database holds for it.
    size: Decimal,
    /// Needs admitted from it, plus what its requests used beyond their needs.
    used: Decimal,
    /// Requests admitted from it that have not ended.
    open: u32,
    /// Their needs.
    open_need: Decimal,
    /// What the ended requests recorded.
    recorded: Decimal,
    /// The last entry recording one of them.
    last: Option<u64>,
    /// The counter's amount when it was granted.
    amount: Decimal,
    /// It admits nothing after this.
    until: Instant,
    /// When a request was last admitted from it (or it was granted).
    last_used: Instant,
}

impl Slice {
    /// What it must still hold while it drains: its ended requests' usage and its
    /// open requests' needs.
    fn trimmed(&self, counter: &str) -> SliceSize {
        SliceSize {
            id: self.id,
            counter: counter.to_string(),
            amount: self.recorded + self.open_need,
            recorded: None,
        }
    }

    /// What it counts once every request under it ended.
    fn closed(&self, counter: &str) -> SliceSize {
        match self.last {
            Some(last) if !self.recorded.is_zero() => SliceSize {
                id: self.id,
                counter: counter.to_string(),
                amount: self.recorded,
                recorded: Some(last),
            },
            // Nothing recorded: it goes.
            _ => SliceSize {
                id: self.id,
                counter: counter.to_string(),
                amount: Decimal::ZERO,
                recorded: None,
            },
        }
    }
}

/// Work for the slices' thread, which makes their database calls in order.
enum Work {
    Ask(Seen, Counted, SliceAsk),
    Resize(SliceSize),
}

/// A request admitted from slices: ended by [`Slices::settle`], or, dropped
/// unsettled, released (its needs go back to the slices).
pub struct Ticket {
    slices: Arc<Slices>,
    /// (counter, slice id, need).
    parts: Vec<(String, i64, Decimal)>,
    ended: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("parts", &self.parts)
            .finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.ended {
            self.slices.end(&self.parts, None);
        }
    }
}

impl Slices {
    /// The slices of `node` in `store`, holding for `ttl` at most; starts the thread
    /// that asks for and resizes them.
    pub fn start(
        store: Arc<dyn Backend>,
        node: String,
        ttl: Duration,
    ) -> std::io::Result<Arc<Self>> {
        Self::start_with(store, node, ttl, LIFE)
    }

    /// [`Slices::start`] with slices admitting for `life`.
    pub fn start_with(
        store: Arc<dyn Backend>,
        node: String,
        ttl: Duration,
        life: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        let slices = Arc::new(Slices {
            node,
            store,
            ttl,
            life,
            state: Mutex::new(HashMap::new()),
            work: Mutex::new(tx),
            from_slices: AtomicU64::new(0),
            alone: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&slices);
        std::thread::Builder::new()
            .name("ciyuan-slices".into())
            .spawn(move || work(weak, rx))?;
        Ok(slices)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Counter>> {
        // A panic while holding it left counts half-updated: nothing can be trusted.
        #[allow(clippy::expect_used)]
        self.state.lock().expect("the slices' state is poisoned")
    }

    fn send(&self, work: Vec<Work>) {
        if work.is_empty() {
            return;
        }
        #[allow(clippy::expect_used)]
        let tx = self.work.lock().expect("the slices' queue is poisoned");
        for w in work {
            // The thread ends only with the last `Arc`, which the caller holds.
            if tx.send(w).is_err() {
                tracing::error!("the slices' thread is gone; slices lapse with their ttl");
                return;
            }
        }
    }

    /// Admits a request whose terms are `wants` from this node's slices, or answers
    /// `None` (the caller holds it in the database alone). Either way, asks in the
    /// background for slices where a counter has none or its slice is half spent.
    pub fn admit(
        self: &Arc<Self>,
        seen: Seen,
        counted: &Counted,
        wants: &[Want<'_>],
    ) -> Option<Ticket> {
        let now = Instant::now();
        let mut work = Vec::new();
        let mut state = self.lock();
        let mut fits = true;
        for w in wants {
            let t = w.term;
            let c = state.entry(t.counter.clone()).or_insert_with(|| Counter {
                active: None,
                draining: Vec::new(),
                asking: false,
                quiet_until: None,
                demand: Decimal::ZERO,
                demand_before: Decimal::ZERO,
                window: now,
            });
            if now.duration_since(c.window) >= self.life {
                c.demand_before = c.demand;
                c.demand = Decimal::ZERO;
                c.window = now;
            }
            c.demand += t.need;
            // An active slice past its life, or granted under a higher limit, drains.
            let stale = c
                .active
                .as_ref()
                .is_some_and(|s| s.until <= now || (w.fixed_amount && t.amount < s.amount));
            if stale {
                retire(c, &t.counter, &mut work);
            }
            let room = c.active.as_ref().map(|s| s.size - s.used);
            if room.is_none_or(|r| t.need > r) {
                fits = false;
            }
            let half_spent = c
                .active
                .as_ref()
                .is_none_or(|s| s.used * Decimal::TWO >= s.size);
            let quiet = c.quiet_until.is_some_and(|q| now < q);
            if half_spent && !c.asking && !quiet && t.need > Decimal::ZERO {
                c.asking = true;
                let want = (t.need * Decimal::from(WANT_REQUESTS)).max(c.demand + c.demand_before);
                work.push(Work::Ask(
                    seen,
                    counted.clone(),
                    SliceAsk {
                        id: hold_id(),
                        term: HoldTerm {
                            counter: t.counter.clone(),
                            local: t.local,
                            need: want,
                            amount: t.amount,
                        },
                        least: t.need * Decimal::from(LEAST_REQUESTS),
                    },
                ));
            }
        }
        let ticket = if fits {
            let mut parts = Vec::with_capacity(wants.len());
            for w in wants {
                let t = w.term;
                let Some(s) = state.get_mut(&t.counter).and_then(|c| c.active.as_mut()) else {
                    continue;
                };
                s.used += t.need;
                s.last_used = now;
                s.open += 1;
                s.open_need += t.need;
                parts.push((t.counter.clone(), s.id, t.need));
            }
            assert_eq!(parts.len(), wants.len(), "a fitting request lost a slice");
            self.from_slices.fetch_add(1, Ordering::Relaxed);
            Some(Ticket {
                slices: self.clone(),
                parts,
                ended: false,
            })
        } else {
            self.alone.fetch_add(1, Ordering::Relaxed);
            None
        };
        drop(state);
        self.send(work);
        ticket
    }

    /// The slices' counters in Prometheus' text format.
    pub fn render_metrics(&self, out: &mut String) {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# HELP ciyuan_holds_admitted_total Gateway requests held across nodes: from this node's slices of the room, or alone in the database.\n\
             # TYPE ciyuan_holds_admitted_total counter\n\
             ciyuan_holds_admitted_total{{by=\"slice\"}} {}\n\
             ciyuan_holds_admitted_total{{by=\"database\"}} {}\n\
             # HELP ciyuan_slices_total Slices of hard limits' and wallets' room this node asked for.\n\
             # TYPE ciyuan_slices_total counter\n\
             ciyuan_slices_total{{outcome=\"granted\"}} {}\n\
             ciyuan_slices_total{{outcome=\"refused\"}} {}\n",
            n(&self.from_slices),
            n(&self.alone),
            n(&self.granted),
            n(&self.refused),
        ));
    }

    /// Ends a request admitted from slices whose usage `entry` records: `actual` is
    /// what it counts on each counter.
    pub fn settle(&self, mut ticket: Ticket, actual: &[(String, Decimal)], entry: u64) {
        ticket.ended = true;
        let parts = std::mem::take(&mut ticket.parts);
        let used: Vec<Decimal> = parts
            .iter()
            .map(|(counter, _, _)| {
                actual
                    .iter()
                    .find(|(c, _)| c == counter)
                    .map_or(Decimal::ZERO, |(_, a)| *a)
            })
            .collect();
        self.end(&parts, Some((&used, entry)));
    }

    /// Ends the requests' parts: with their usage and entry, or released.
    fn end(&self, parts: &[(String, i64, Decimal)], usage: Option<(&[Decimal], u64)>) {
        let mut work = Vec::new();
        let mut state = self.lock();
        for (i, (counter, id, need)) in parts.iter().enumerate() {
            let Some(c) = state.get_mut(counter) else {
                tracing::error!(counter, "a request's slice counter is gone");
                continue;
            };
            let active = c.active.as_mut().filter(|s| s.id == *id);
            let is_active = active.is_some();
            let slice = match active {
                Some(s) => s,
                None => match c.draining.iter_mut().find(|s| s.id == *id) {
                    Some(s) => s,
                    None => {
                        tracing::error!(counter, "a request's slice is gone");
                        continue;
                    }
                },
            };
            assert!(
                slice.open > 0,
                "a slice ended more requests than it admitted"
            );
            slice.open -= 1;
            slice.open_need -= *need;
            match usage {
                Some((used, entry)) => {
                    let used = used[i];
                    slice.recorded += used;
                    slice.last = Some(slice.last.map_or(entry, |l| l.max(entry)));
                    if used > *need {
                        // Beyond what it held: the slice counts it, and if that
                        // overspends it, it admits no more; a draining slice says
                        // so to the database at once.
                        slice.used += used - *need;
                        if slice.used > slice.size {
                            slice.until = Instant::now();
                        }
                        if !is_active {
                            work.push(Work::Resize(slice.trimmed(counter)));
                        }
                    }
                }
                None if is_active => slice.used -= *need,
                None => {}
            }
            if !is_active && slice.open == 0 {
                let done = slice.closed(counter);
                c.draining.retain(|s| s.id != *id);
                work.push(Work::Resize(done));
            }
        }
        drop(state);
        self.send(work);
    }

    /// Retires active slices past their life or idle (a counter no request comes to
    /// any more would keep its room otherwise).
    fn sweep(&self) {
        let now = Instant::now();
        let mut work = Vec::new();
        let mut state = self.lock();
        for (counter, c) in state.iter_mut() {
            if c.active.as_ref().is_some_and(|s| {
                s.until <= now || now.duration_since(s.last_used) >= self.life / IDLE_PART
            }) {
                retire(c, counter, &mut work);
            }
        }
        state.retain(|_, c| c.active.is_some() || !c.draining.is_empty() || c.asking);
        drop(state);
        self.send(work);
    }

    /// A slice asked for was granted (`Some(size)`) or refused.
    fn granted(&self, ask: &SliceAsk, size: Option<Decimal>) {
        let mut work = Vec::new();
        let mut state = self.lock();
        let counter = &ask.term.counter;
        let Some(c) = state.get_mut(counter) else {
            // Swept meanwhile: the slice is not used and goes.
            if size.is_some() {
                work.push(Work::Resize(SliceSize {
                    id: ask.id,
                    counter: counter.clone(),
                    amount: Decimal::ZERO,
                    recorded: None,
                }));
            }
            drop(state);
            self.send(work);
            return;
        };
        c.asking = false;
        match size {
            Some(_) => self.granted.fetch_add(1, Ordering::Relaxed),
            None => self.refused.fetch_add(1, Ordering::Relaxed),
        };
        match size {
            Some(size) => {
                if c.active.is_some() {
                    retire(c, counter, &mut work);
                }
                c.active = Some(Slice {
                    id: ask.id,
                    size,
                    used: Decimal::ZERO,
                    open: 0,
                    open_need: Decimal::ZERO,
                    recorded: Decimal::ZERO,
                    last: None,
                    amount: ask.term.amount,
                    until: Instant::now() + self.life,
                    last_used: Instant::now(),
                });
            }
            None => c.quiet_until = Some(Instant::now() + QUIET),
        }
        drop(state);
        self.send(work);
    }

    /// An ask failed (the database): the counter asks again later.
    fn failed(&self, ask: &SliceAsk) {
        if let Some(c) = self.lock().get_mut(&ask.term.counter) {
            c.asking = false;
            c.quiet_until = Some(Instant::now() + Duration::from_secs(1));
        }
    }
}

/// Moves the counter's active slice to draining: trimmed, or closed if it has no
/// request open.
fn retire(c: &mut Counter, counter: &str, work: &mut Vec<Work>) {
    let Some(s) = c.active.take() else { return };
    if s.open == 0 {
        work.push(Work::Resize(s.closed(counter)));
    } else {
        work.push(Work::Resize(s.trimmed(counter)));
        c.draining.push(s);
    }
}

/// A new hold id: random, positive (it reads the same as a BIGINT everywhere).
fn hold_id() -> i64 {
    let mut raw = [0u8; 8];
    // Without the OS's randomness nothing else here works either.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut raw).expect("the OS's random numbers");
    (u64::from_le_bytes(raw) >> 1) as i64
}

/// The slices' thread: makes the database calls, resizes before asks (what is trimmed
/// is room for the asks), each batch in one call; sweeps between.
fn work(slices: std::sync::Weak<Slices>, rx: mpsc::Receiver<Work>) {
    // Resizes not yet made (the database failed): made first, in order, next time.
    let mut sizes: Vec<SliceSize> = Vec::new();
    loop {
        let Some(life) = slices.upgrade().map(|s| s.life) else {
            return;
        };
        let first = match rx.recv_timeout((life / 4).min(SWEEP)) {
            Ok(w) => Some(w),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(slices) = slices.upgrade() else {
            return;
        };
        let mut asks: Vec<(Seen, Counted, SliceAsk)> = Vec::new();
        for w in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            match w {
                Work::Ask(seen, counted, ask) => asks.push((seen, counted, ask)),
                Work::Resize(size) => sizes.push(size),
            }
        }
        // Until made, slices keep holding what they held (the limit errs on the safe
        // side); tried again with the next work, or at the next sweep.
        if !sizes.is_empty() {
            match slices.store.resize_slices(&sizes) {
                Ok(()) => sizes.clear(),
                Err(e) => {
                    tracing::warn!(error = %e, slices = sizes.len(), "resizing slices failed; trying again");
                }
            }
        }
        if !asks.is_empty() {
            let seen = Seen::least(asks.iter().map(|(s, _, _)| s));
            let counted = Counted::common(asks.iter().map(|(_, c, _)| c));
            let list: Vec<SliceAsk> = asks.into_iter().map(|(_, _, a)| a).collect();
            match slices
                .store
                .reserve_slices(&slices.node, seen, &counted, &list, slices.ttl)
            {
                Ok(granted) => {
                    for (ask, size) in list.iter().zip(granted) {
                        slices.granted(ask, size);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "asking for slices failed; requests are held one by one");
                    for ask in &list {
                        slices.failed(ask);
                    }
                }
            }
        }
        slices.sweep();
    }
}

#[cfg(test)]
impl Slices {
    /// The active slice of `counter`: (size, used, open).
    fn active(&self, counter: &str) -> Option<(Decimal, Decimal, u32)> {
        self.lock()
            .get(counter)
            .and_then(|c| c.active.as_ref())
            .map(|s| (s.size, s.used, s.open))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::collections::VecDeque;

    /// Answers asks as scripted (refusing once the script is out) and keeps every
    /// resize.
    #[derive(Default)]
    struct Scripted {
        grants: Mutex<VecDeque<Option<Decimal>>>,
        asked: Mutex<Vec<SliceAsk>>,
        resized: Mutex<Vec<SliceSize>>,
    }

    impl Backend for Scripted {
        fn reserve_slices(
            &self,
            _node: &str,
            _seen: Seen,
            _counted: &[i64],
            asks: &[SliceAsk],
            _ttl: Duration,
        ) -> Result<Vec<Option<Decimal>>, StoreError> {
            self.asked.lock().unwrap().extend(asks.iter().cloned());
            let mut g = self.grants.lock().unwrap();
            Ok(asks.iter().map(|_| g.pop_front().flatten()).collect())
        }
        fn resize_slices(&self, sizes: &[SliceSize]) -> Result<(), StoreError> {
            self.resized.lock().unwrap().extend(sizes.iter().cloned());
            Ok(())
        }
    }

    const SEEN: Seen = Seen {
        followed: 0,
        own_from: 0,
    };

    fn term(need: i64, amount: i64) -> HoldTerm {
        HoldTerm {
            counter: "limit".into(),
            local: Decimal::ZERO,
            need: Decimal::from(need),
            amount: Decimal::from(amount),
        }
    }

    fn admit(s: &Arc<Slices>, t: &HoldTerm) -> Option<Ticket> {
        s.admit(
            SEEN,
            &Counted::default(),
            &[Want {
                term: t,
                fixed_amount: true,
            }],
        )
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "waited 10 s for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start(backend: &Arc<Scripted>, life: Duration) -> Arc<Slices> {
        Slices::start_with(backend.clone(), "n".into(), Duration::from_secs(60), life).unwrap()
    }

    #[test]
    fn requests_are_admitted_from_a_slice_until_it_is_spent_and_asked_for_once() {
        let backend = Arc::new(Scripted::default());
        backend
            .grants
            .lock()
            .unwrap()
            .push_back(Some(Decimal::from(100)));
        let slices = start(&backend, Duration::from_secs(600));
        let t = term(10, 1000);
        // No slice yet: held alone, and one slice asked for, of 64 requests.
        assert!(admit(&slices, &t).is_none());
        wait_for("the slice", || slices.active("limit").is_some());
        let asked = backend.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].term.need, Decimal::from(640));
        assert_eq!(asked[0].least, Decimal::from(40));
        // Ten requests of 10 fit in 100; the eleventh does not.
        let tickets: Vec<Ticket> = (0..10).map(|_| admit(&slices, &t).unwrap()).collect();
        assert_eq!(
            slices.active("limit"),
            Some((Decimal::from(100), Decimal::from(100), 10))
        );
        assert!(admit(&slices, &t).is_none());
        // Half spent, it asked again once (refused: the script is out), then stays quiet.
        wait_for("the second ask", || {
            backend.asked.lock().unwrap().len() == 2
        });
        // A request dropped unsettled gives its need back.
        drop(tickets);
        assert_eq!(
            slices.active("limit"),
            Some((Decimal::from(100), Decimal::ZERO, 0))
        );
        assert!(admit(&slices, &t).is_some());
    }

    #[test]
    fn a_slice_past_its_life_is_trimmed_then_closed_with_what_its_requests_recorded() {
        let backend = Arc::new(Scripted::default());
        backend
            .grants
            .lock()
            .unwrap()
            .push_back(Some(Decimal::from(100)));
        let slices = start(&backend, Duration::from_millis(200));
        let t = term(10, 1000);
        assert!(admit(&slices, &t).is_none());
        wait_for("the slice", || slices.active("limit").is_some());
        let id = backend.asked.lock().unwrap()[0].id;
        let a = admit(&slices, &t).unwrap();
        let b = admit(&slices, &t).unwrap();
        let c = admit(&slices, &t).unwrap();
        slices.settle(a, &[("limit".into(), Decimal::from(7))], 5);
        slices.settle(b, &[("limit".into(), Decimal::from(8))], 9);
        // Past its life the sweep retires it: trimmed to 7 + 8 recorded and 10 open.
        wait_for("the trim", || !backend.resized.lock().unwrap().is_empty());
        assert_eq!(
            backend.resized.lock().unwrap()[0],
            SliceSize {
                id,
                counter: "limit".into(),
                amount: Decimal::from(25),
                recorded: None
            }
        );
        assert!(slices.active("limit").is_none());
        // The last used 12 where it held 10: said at once, then closed at its entry.
        slices.settle(c, &[("limit".into(), Decimal::from(12))], 11);
        wait_for("the close", || backend.resized.lock().unwrap().len() == 3);
        let resized = backend.resized.lock().unwrap().clone();
        assert_eq!(resized[1].amount, Decimal::from(27));
        assert_eq!(resized[1].recorded, None);
        assert_eq!(
            resized[2],
            SliceSize {
                id,
                counter: "limit".into(),
                amount: Decimal::from(27),
                recorded: Some(11)
            }
        );
    }

    #[test]
    fn an_idle_slice_goes_and_a_lowered_limit_retires_one() {
        let backend = Arc::new(Scripted::default());
        backend
            .grants
            .lock()
            .unwrap()
            .extend([Some(Decimal::from(100)), Some(Decimal::from(50))]);
        let slices = start(&backend, Duration::from_secs(600));
        assert!(admit(&slices, &term(10, 1000)).is_none());
        wait_for("the slice", || slices.active("limit").is_some());
        let first = backend.asked.lock().unwrap()[0].id;
        // The limit is now 900: the slice granted under 1000 admits no more, and
        // with no request open it goes at once.
        assert!(admit(&slices, &term(10, 900)).is_none());
        wait_for("its removal", || {
            !backend.resized.lock().unwrap().is_empty()
        });
        assert_eq!(
            backend.resized.lock().unwrap()[0],
            SliceSize {
                id: first,
                counter: "limit".into(),
                amount: Decimal::ZERO,
                recorded: None
            }
        );
        wait_for("the new slice", || {
            slices
                .active("limit")
                .is_some_and(|a| a.0 == Decimal::from(50))
        });
        assert!(admit(&slices, &term(10, 900)).is_some());
    }

    proptest::proptest! {
        /// Whatever requests come, end and go, what the open requests of a slice
        /// hold never exceeds it, and nothing is closed before its last request ends.
        #[test]
        fn a_slice_never_admits_beyond_its_size(
            ops in proptest::collection::vec((0u8..3, 1i64..30, 0i64..40), 1..200)
        ) {
            let backend = Arc::new(Scripted::default());
            backend.grants.lock().unwrap().push_back(Some(Decimal::from(200)));
            let slices = start(&backend, Duration::from_secs(600));
            let first = admit(&slices, &term(1, 10_000));
            proptest::prop_assert!(first.is_none());
            wait_for("the slice", || slices.active("limit").is_some());
            let mut open: Vec<(Ticket, i64)> = Vec::new();
            let mut entry = 0u64;
            // Once its requests used more than it, a slice admits no more.
            let mut overspent = false;
            for (op, need, used) in ops {
                match op {
                    0 => {
                        let before = slices.active("limit").map(|a| a.1);
                        match admit(&slices, &term(need, 10_000)) {
                            Some(t) => open.push((t, need)),
                            // Refused only when it does not fit, or the slice
                            // is gone (overspent: its requests used more than it).
                            None => {
                                if let Some(used) = before.filter(|_| !overspent) {
                                    proptest::prop_assert!(
                                        used + Decimal::from(need) > Decimal::from(200)
                                    );
                                }
                            }
                        }
                    }
                    1 if !open.is_empty() => {
                        let (t, _) = open.remove(0);
                        entry += 1;
                        slices.settle(t, &[("limit".into(), Decimal::from(used))], entry);
                    }
                    _ if !open.is_empty() => drop(open.pop()),
                    _ => {}
                }
                let holding: i64 = open.iter().map(|(_, n)| n).sum();
                if let Some((size, used, n)) = slices.active("limit") {
                    overspent |= used > size;
                    proptest::prop_assert_eq!(n as usize, open.len());
                    proptest::prop_assert!(Decimal::from(holding) <= used);
                    proptest::prop_assert!(Decimal::from(holding) <= size);
                }
            }
        }
    }
}
