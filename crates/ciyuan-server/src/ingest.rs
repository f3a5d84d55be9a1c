//! `POST /v1/events`: the second door. Any AI service reports usage as CloudEvents 1.0
//! (structured mode, or the batch format); each accepted event becomes one usage entry.
//!
//! - Idempotent on `(source, id)`, across restarts: [`Recent`] holds, in memory, the
//!   hash of every ingested event's key with the entry that recorded it (loaded at start
//!   from the projections' index, which only appends) and the events appended but not
//!   yet projected. A repeat answers the original entry and is never counted twice.
//! - A batch answers per event; bad events are rejected alone, and the good ones are
//!   appended together in one durable group, so nothing is half-written.
//! - Late events are accepted within `ingest_max_age` and land in their own period.

use crate::App;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{
    AccountPath, Direction, Entry, EntryBody, GATEWAY_SOURCE, MAX_TOKENS_PER_KEY, Modality, Scope,
    ServiceTier, TokenMap, Usage, ingest_key_hash,
};
use ciyuan_store::{Log, Store};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::collections::hash_map::Entry as HashEntry;
use std::sync::Arc;
use tokio::sync::watch;

/// Longest `id`, `source`, `type` or model name accepted.
const MAX_ATTRIBUTE_BYTES: usize = 256;

/// The built-in definition of `llm.usage`: reported counts map one to one onto token
/// keys, as [`LLM_FIELDS`] lists.
const LLM_USAGE_DEFINITION: &str = "llm.usage@1";

/// Named usage fields of an `llm.usage` event and the token key each one feeds. They
/// are disjoint: their sum is the total.
const LLM_FIELDS: [(&str, Modality, Direction); 9] = [
    ("input_tokens", Modality::Text, Direction::Input),
    (
        "cached_input_tokens",
        Modality::Text,
        Direction::CachedInput,
    ),
    ("cache_write_tokens", Modality::Text, Direction::CacheWrite),
    (
        "cache_write_1h_tokens",
        Modality::Text,
        Direction::CacheWrite1h,
    ),
    ("output_tokens", Modality::Text, Direction::Output),
    ("reasoning_tokens", Modality::Text, Direction::Reasoning),
    ("audio_input_tokens", Modality::Audio, Direction::Input),
    ("audio_output_tokens", Modality::Audio, Direction::Output),
    ("image_input_tokens", Modality::Image, Direction::Input),
];

/// An event that passed validation: a usage entry with its source and event id.
struct Accepted {
    /// [`ingest_key_hash`] of the event's `(source, id)`.
    hash: u64,
    entry: Entry,
}

impl Accepted {
    fn key(&self) -> (&str, &str) {
        event_key(&self.entry)
    }

    /// The event's `(source, id)`, taken out of the entry.
    fn into_key(self) -> (String, String) {
        match self.entry.body {
            EntryBody::Usage(Usage {
                source: Some(source),
                event_id: Some(id),
                ..
            }) => (source, id),
            other => no_key(other.kind()),
        }
    }
}

/// The `(source, id)` of an ingested event's entry.
fn event_key(entry: &Entry) -> (&str, &str) {
    match &entry.body {
        EntryBody::Usage(Usage {
            source: Some(source),
            event_id: Some(id),
            ..
        }) => (source, id),
        other => no_key(other.kind()),
    }
}

/// Every entry the ingest door builds or indexes is usage with a source and an id
/// (`validate` makes them so; the index holds only such entries). Anything else
/// would be filed under an empty key and answer other events' repeats: stop.
#[cold]
fn no_key(kind: &str) -> ! {
    unreachable!("an ingested {kind} entry without (source, id)")
}

/// The answer for one event.
enum Outcome {
    /// Appended as entry `entry_id`: the event at `pos` of `claim`.
    Accepted {
        claim: Arc<Claim>,
        pos: usize,
        entry_id: u64,
        /// The usage pushed a hard limit over its amount (it is recorded: it happened).
        over_limit: bool,
    },
    Duplicate {
        source: String,
        id: String,
        entry_id: u64,
    },
    Rejected {
        source: Option<String>,
        id: Option<String>,
        error: ApiError,
    },
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        match self {
            Outcome::Accepted {
                claim,
                pos,
                entry_id,
                over_limit,
            } => {
                let (source, id) = event_key(&claim.entries[*pos]);
                m.serialize_entry("source", source)?;
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", "accepted")?;
                m.serialize_entry("entry_id", entry_id)?;
                if *over_limit {
                    m.serialize_entry("over_limit", &true)?;
                }
            }
            Outcome::Duplicate {
                source,
                id,
                entry_id,
            } => {
                m.serialize_entry("source", source)?;
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", "duplicate")?;
                m.serialize_entry("entry_id", entry_id)?;
            }
            Outcome::Rejected { source, id, error } => {
                m.serialize_entry("source", source)?;
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", "rejected")?;
                m.serialize_entry(
                    "error",
                    &json!({"status": error.status.as_u16(), "detail": error.detail}),
                )?;
            }
        }
        m.end()
    }
}

/// Events one request claimed and appends together.
pub(crate) struct Claim {
    /// Their usage entries, in append order.
    entries: Vec<Entry>,
    /// [`ingest_key_hash`] of each entry's event.
    hashes: Vec<u64>,
    /// The index of the first once the append is durable; `Err` if it failed.
    appended: watch::Sender<Option<Result<u64, ()>>>,
}

impl Claim {
    fn new(entries: Vec<Entry>, hashes: Vec<u64>, appended: Option<Result<u64, ()>>) -> Claim {
        Claim {
            entries,
            hashes,
            appended: watch::channel(appended).0,
        }
    }

    fn state(&self) -> Option<Result<u64, ()>> {
        *self.appended.borrow()
    }
}

/// A claim's entries are built from checked strings, integers and a timestamp, which
/// decode back exactly as they are; `measures` may hold numbers that do not, but the
/// projections never read them from usage that is not flagged, and ingested usage
/// carries no recount to flag.
impl crate::pipeline::Lent for Claim {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn ingest_hashes(&self) -> Option<&[u64]> {
        Some(&self.hashes)
    }
}

/// Settles a claim as failed if its request ends without settling it (a panic), so no
/// request waits on it forever and it can be pruned.
struct Settle<'a>(&'a Claim);

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.0.appended.send_if_modified(|v| {
            let unset = v.is_none();
            if unset {
                *v = Some(Err(()));
            }
            unset
        });
    }
}

/// The idempotency index, in memory, guarded by `App::ingest_lock`.
///
/// Invariant: every event in the log is in a claim held here (appended or being
/// appended, not yet projected) or has a slot `(hash, entry)` in `seen` (projected); and
/// every claimed event's hash is in `seen`. So a key whose hash is not in `seen` is new
/// without further work (at 500k events/s any lookup per event would cost more than
/// everything else together), and a known hash is settled by the claims or by reading
/// the few entries recorded under it back from the log and comparing keys: a shared
/// hash costs a read, never a wrong answer. `seen` costs 21 to 43 bytes per event ever
/// ingested. The store's index is appended in entry order (random ids do not scatter
/// writes over a B-tree) and read whole only at start.
///
/// Claims keep their entries (the keys are read from them, never copied) and are
/// dropped in claim order once the projections have indexed them (their entries then
/// go into `seen`), or once they failed. They are not indexed by key: only events whose
/// hash is in `seen` (repeats, and rare collisions) are looked for in them, with one
/// pass over the claims per request.
#[derive(Default)]
pub struct Recent {
    seen: Seen,
    /// Unprojected claims, oldest first.
    claims: VecDeque<Arc<Claim>>,
}

impl Recent {
    /// Loads the index from the store and the log's unprojected tail.
    pub(crate) fn load(store: &dyn Store, log: &dyn Log) -> Result<Recent, ApiError> {
        let mut recent = Recent::default();
        let projected = store.ingest_index(&mut |hash, entry| recent.seen.index(hash, entry))?;
        // Events of the tail already held: the first entry of an event is its answer.
        let mut held: FxHashSet<(String, String)> = FxHashSet::default();
        let mut bad = None;
        log.scan(projected..log.size(), &mut |i, bytes| {
            match Entry::decode(bytes) {
                Ok(entry) => {
                    let EntryBody::Usage(u) = &entry.body else {
                        return Ok(());
                    };
                    let Some((source, id)) = u.ingest_key() else {
                        return Ok(());
                    };
                    if held.insert((source.to_string(), id.to_string())) {
                        let hash = ingest_key_hash(source, id);
                        recent.seen.add_pending(hash);
                        recent.claim(Claim::new(vec![entry], vec![hash], Some(Ok(i))));
                    }
                }
                Err(e) => bad = Some(format!("entry {i} does not decode: {e}")),
            }
            Ok(())
        })?;
        match bad {
            Some(why) => Err(ApiError::internal(why)),
            None => Ok(recent),
        }
    }

    /// Files an event another node appended at `entry` (see `crate::follow`).
    pub(crate) fn index_elsewhere(&mut self, hash: u64, entry: u64) {
        self.seen.index(hash, entry);
    }

    /// For each event of `wanted` (its hash and key), the claim holding it and its
    /// position there, unless the claim failed.
    fn find_many(&self, wanted: &[(u64, (&str, &str))]) -> Vec<Option<(Arc<Claim>, usize)>> {
        let mut found = vec![None; wanted.len()];
        let mut by_hash: FxHashMap<u64, Vec<usize>> = FxHashMap::default();
        for (w, (hash, _)) in wanted.iter().enumerate() {
            by_hash.entry(*hash).or_default().push(w);
        }
        let mut open = wanted.len();
        // The newest first: a failed claim may be followed by a retry of the event, and
        // no two claims that did not fail hold the same event.
        for claim in self.claims.iter().rev() {
            if open == 0 {
                break;
            }
            if claim.state() == Some(Err(())) {
                continue;
            }
            for (pos, hash) in claim.hashes.iter().enumerate() {
                let Some(ws) = by_hash.get(hash) else {
                    continue;
                };
                let key = event_key(&claim.entries[pos]);
                for &w in ws {
                    if found[w].is_none() && wanted[w].1 == key {
                        found[w] = Some((claim.clone(), pos));
                        open -= 1;
                    }
                }
            }
        }
        found
    }

    /// Holds a new claim.
    fn claim(&mut self, claim: Claim) -> Arc<Claim> {
        let claim = Arc::new(claim);
        self.claims.push_back(claim.clone());
        claim
    }

    /// Takes out the oldest claims the projections have indexed, and failed ones;
    /// bounds the index. They come back to be dropped once the ingest lock is
    /// released: dropping a claim frees every string and rating of its entries, by
    /// then out of the cache, and no other request need wait for that.
    fn prune(&mut self, projected: u64) -> Vec<Arc<Claim>> {
        let Recent { seen, claims } = self;
        let mut pruned = Vec::new();
        while let Some(front) = claims.front() {
            match front.state() {
                Some(Ok(start)) if start + front.entries.len() as u64 <= projected => {
                    for (pos, &hash) in front.hashes.iter().enumerate() {
                        seen.index(hash, start + pos as u64);
                    }
                }
                Some(Err(())) => {}
                _ => break,
            }
            pruned.extend(claims.pop_front());
        }
        pruned
    }
}

/// Frees claims [`Recent::prune`] took out, each one's rated lines read ahead first.
///
/// By the time a claim is pruned its entries are long out of the cache, and dropping a
/// rating reads its lines (a line's key may own a string) at one cache miss per entry,
/// each waited for in turn between the frees: most of what a rated entry's drop cost
/// (`drop_in_place<Box<Rating>>`, ~0.13 µs per event in `perf` of `bench ingest
/// --prices`). The reads here do not depend on each other, so the processor has many
/// of them in flight at once, and the drop that follows finds the lines cached. A claim
/// of 1,000 entries reads ahead ~128 KiB, which the cache holds until its drop.
fn free(pruned: Vec<Arc<Claim>>) {
    for claim in pruned {
        let mut any = false;
        for e in &claim.entries {
            if let EntryBody::Usage(Usage {
                rating: Some(r), ..
            }) = &e.body
            {
                for line in r.lines.first().into_iter().chain(r.lines.last()) {
                    any |= matches!(line.key, ciyuan_core::PriceKey::Measure(_));
                }
            }
        }
        std::hint::black_box(any);
        drop(claim);
    }
}

/// The entry of a slot whose event is claimed but not yet indexed with its entry. A
/// pending slot whose claim failed stays until the next start: it only sends a retry
/// of that event to the exact checks, which find nothing and reuse the slot.
const PENDING: u64 = u64::MAX;

/// Key hashes and the entries that recorded them: open addressing with linear probing
/// in arrays of `(hash, entry)` pairs. A probe touches one cache line where a general
/// hash map touches two (control bytes, then keys); past a few million keys nearly
/// every probe misses the cache, so that is most of its cost. A hash may sit in several
/// slots (two keys sharing a hash, or a claim that failed and was claimed again), so a
/// lookup reads the whole run of slots it probes.
///
/// The keys are spread over [`Seen::SHARDS`] tables that grow on their own, so a growth
/// (done under the ingest lock, every request waiting) copies a 256th of the index: at
/// 100M events a 16 MiB table instead of a 4 GiB one.
struct Seen {
    shards: Vec<Shard>,
    /// Where a hash lands depends on this per-process random value too: the hashes are
    /// fixed and anyone can compute them, where they land is not, so nobody can choose
    /// ids that pile up in one run of slots.
    seed: u64,
}

/// One table of [`Seen`].
#[derive(Default)]
struct Shard {
    /// Slots; hash 0 marks an empty one. The length is 0 or a power of two.
    slots: Vec<(u64, u64)>,
    len: usize,
}

impl Default for Seen {
    fn default() -> Seen {
        use std::hash::BuildHasher;
        Seen {
            shards: (0..Self::SHARDS).map(|_| Shard::default()).collect(),
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl Seen {
    /// Tables; the top bits of a hash's position pick one.
    const SHARDS: usize = 256;

    /// 0 marks an empty slot, so the hash 0 is kept as 1: merging two hashes only sends
    /// their keys to the exact checks.
    fn nonzero(hash: u64) -> u64 {
        hash.max(1)
    }

    /// The table of `hash`: the top 8 bits of its mixed value (the slot comes from bits
    /// 32 up, see [`Shard::home`]; tables stay far below 2^24 slots).
    fn shard(&self, hash: u64) -> usize {
        (mix(hash, self.seed) >> 56) as usize
    }

    /// Adds `hash` as pending and answers true if no slot held it; false (adding
    /// nothing) if one did: the event may be known, and goes to the exact checks.
    fn claim(&mut self, hash: u64) -> bool {
        let hash = Self::nonzero(hash);
        let shard = self.shard(hash);
        self.shards[shard].claim(hash, self.seed)
    }

    /// Makes sure `hash` has a pending slot, for an event found new by the exact checks
    /// although its hash was known.
    fn add_pending(&mut self, hash: u64) {
        self.put(hash, PENDING);
    }

    /// Records that `entry` holds an event of `hash`: in a pending slot of that hash if
    /// there is one, else in a new slot.
    fn index(&mut self, hash: u64, entry: u64) {
        self.put(hash, entry);
    }

    fn put(&mut self, hash: u64, entry: u64) {
        let hash = Self::nonzero(hash);
        let shard = self.shard(hash);
        self.shards[shard].put(hash, self.seed, entry);
    }

    /// The entries recorded for `hash`, oldest first.
    fn entries(&self, hash: u64) -> Vec<u64> {
        let hash = Self::nonzero(hash);
        self.shards[self.shard(hash)].entries(hash, self.seed)
    }

    /// Reads the home slot of every hash before they are inserted one by one. Past a
    /// few million keys nearly every probe misses the cache; these loads do not depend
    /// on each other, so the processor has many of them in flight at once, and the
    /// inserts that follow find their slots cached instead of waiting for each in turn.
    fn warm(&self, hashes: impl Iterator<Item = u64>) {
        let mut any = 0u64;
        for hash in hashes {
            let hash = Self::nonzero(hash);
            let shard = &self.shards[self.shard(hash)];
            if !shard.slots.is_empty() {
                any |= shard.slots[shard.home(hash, self.seed)].0;
            }
        }
        std::hint::black_box(any);
    }

    /// Slots in use, over all tables.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len).sum()
    }
}

impl Shard {
    /// Slots of a new table: small, since there are many tables and a server that
    /// ingests nothing should not pay for them.
    const MIN_SLOTS: usize = 64;

    /// The first slot to probe for `hash` (the table must have slots).
    fn home(&self, hash: u64, seed: u64) -> usize {
        mix(hash, seed).rotate_left(32) as usize & (self.slots.len() - 1)
    }

    fn claim(&mut self, hash: u64, seed: u64) -> bool {
        self.reserve_one(seed);
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash, seed);
        loop {
            match self.slots[i].0 {
                0 => {
                    self.slots[i] = (hash, PENDING);
                    self.len += 1;
                    return true;
                }
                h if h == hash => return false,
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn put(&mut self, hash: u64, seed: u64, entry: u64) {
        self.reserve_one(seed);
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash, seed);
        loop {
            match self.slots[i] {
                (0, _) => {
                    self.slots[i] = (hash, entry);
                    self.len += 1;
                    return;
                }
                (h, PENDING) if h == hash => {
                    self.slots[i].1 = entry;
                    return;
                }
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn entries(&self, hash: u64, seed: u64) -> Vec<u64> {
        let mut found = Vec::new();
        if self.slots.is_empty() {
            return found;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash, seed);
        loop {
            match self.slots[i] {
                (0, _) => break,
                (h, e) if h == hash && e != PENDING => found.push(e),
                _ => {}
            }
            i = (i + 1) & mask;
        }
        found.sort_unstable();
        found
    }

    /// At most three quarters full after one more slot, so runs stay short.
    fn reserve_one(&mut self, seed: u64) {
        if 4 * (self.len + 1) <= 3 * self.slots.len() {
            return;
        }
        let size = (2 * self.slots.len()).max(Self::MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![(0, 0); size]);
        let mask = size - 1;
        for slot in old.into_iter().filter(|s| s.0 != 0) {
            let mut i = self.home(slot.0, seed);
            while self.slots[i].0 != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }
}

/// A hash mixed with the per-process seed; Fx-like multiplication spreads every bit of
/// the input over the high bits, which pick the table and the slot.
fn mix(hash: u64, seed: u64) -> u64 {
    (hash ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn unprocessable(msg: String) -> ApiError {
    ApiError::unprocessable(msg)
}

/// What a JSON value is, from its text, for messages.
fn kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

/// A string borrowed from the request body where it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The string a JSON value holds, borrowed where it has no escapes.
fn text(raw: &RawValue) -> Result<Text<'_>, serde_json::Error> {
    let json = raw.get();
    // The body was checked to be JSON already, so a quoted value without a backslash is
    // a string whose text is between the quotes.
    if let Some(inner) = json.strip_prefix('"').and_then(|j| j.strip_suffix('"'))
        && !inner.contains('\\')
    {
        return Ok(Text(Cow::Borrowed(inner)));
    }
    serde_json::from_str(json)
}

/// A JSON object's members in document order, values left unparsed.
struct Members<'a>(Vec<(Text<'a>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(k) = map.next_key::<Text<'de>>()? {
                    out.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The context attributes Ciyuan reads; others (extensions) are ignored, as CloudEvents
/// requires. An attribute that is `null` counts as absent.
#[derive(Default)]
struct Attributes<'a> {
    specversion: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    source: Option<&'a RawValue>,
    service: Option<&'a RawValue>,
    subject: Option<&'a RawValue>,
    time: Option<&'a RawValue>,
    datacontenttype: Option<&'a RawValue>,
    /// Attribution tags, `key=value,key=value` (Ciyuan's extension attribute).
    ciyuantags: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
}

/// One member of a request's events, read in the pass that checks the body is JSON:
/// an event's attributes, or why it is not one. (The body used to be split into raw
/// events first and each event read again: a second pass over every byte, ~0.2 µs an
/// event in `ciyuan bench ingest`.) Never an error for JSON that parses, so one bad
/// event is refused on its own and its neighbours go on.
enum Slot<'a> {
    Event(Attributes<'a>),
    /// Not an object: what it is instead (`a number`, ...).
    NotObject(&'static str),
    /// An object whose attributes cannot be read: why.
    Invalid(String),
}

impl<'de> Deserialize<'de> for Slot<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

        /// An attribute's name, escapes and all, as the member's key spells it.
        struct Name<'a>(Cow<'a, str>);
        impl<'de> Deserialize<'de> for Name<'de> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Text::deserialize(d).map(|Text(t)| Name(t))
            }
        }

        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Slot<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot<'de>, A::Error> {
                let mut a = Attributes::default();
                let mut duplicate = None;
                // Attributes met so far, one bit each (a `null` one counts as met).
                let mut seen = 0u16;
                while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                    let (bit, field) = match name.as_ref() {
                        "specversion" => (0, &mut a.specversion),
                        "id" => (1, &mut a.id),
                        "source" => (2, &mut a.source),
                        "type" => (3, &mut a.service),
                        "subject" => (4, &mut a.subject),
                        "time" => (5, &mut a.time),
                        "datacontenttype" => (6, &mut a.datacontenttype),
                        "data" => (7, &mut a.data),
                        "ciyuantags" => (8, &mut a.ciyuantags),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *field = map.next_value::<Option<&'de RawValue>>()?;
                    if seen & (1 << bit) != 0 {
                        duplicate.get_or_insert(name.into_owned());
                    }
                    seen |= 1 << bit;
                }
                Ok(match duplicate {
                    Some(name) => Slot::Invalid(format!("duplicate attribute `{name}`")),
                    None => Slot::Event(a),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Slot::NotObject("an array"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("a string"))
            }
            fn visit_unit<E>(self) -> Result<Slot<'de>, E> {
                Ok(Slot::NotObject("null"))
            }
        }
        d.deserialize_any(V)
    }
}

fn string_attr<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
    required: bool,
) -> Result<Option<Cow<'a, str>>, ApiError> {
    let Some(raw) = raw else {
        return match required {
            true => Err(ApiError::bad_request(format!(
                "{name}: required attribute is missing"
            ))),
            false => Ok(None),
        };
    };
    let Ok(Text(s)) = text(raw) else {
        return Err(ApiError::bad_request(format!(
            "{name}: must be a string, got {}",
            kind(raw)
        )));
    };
    if s.is_empty() {
        return Err(ApiError::bad_request(format!("{name}: must not be empty")));
    }
    if s.len() > MAX_ATTRIBUTE_BYTES {
        return Err(ApiError::bad_request(format!(
            "{name}: longer than {MAX_ATTRIBUTE_BYTES} bytes"
        )));
    }
    Ok(Some(s))
}

/// A required string attribute.
fn required_attr<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Cow<'a, str>, ApiError> {
    string_attr(raw, name, true)?
        .ok_or_else(|| ApiError::bad_request(format!("{name}: required attribute is missing")))
}

/// A required attribute that is kept and read back (in listings, exports, logs): no
/// control characters. (`subject` needs no such check: an account path admits only
/// letters, digits, `-`, `_`, `.` and `/`; `specversion` and `datacontenttype` are
/// compared with fixed values.)
fn kept_attr<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Cow<'a, str>, ApiError> {
    let s = required_attr(raw, name)?;
    ciyuan_core::check_text(name, &s, MAX_ATTRIBUTE_BYTES)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(s)
}

/// A token quantity: a non-negative integer that fits the ledger's counters. Read from
/// the number's text, so no precision is lost on the way.
fn quantity(raw: &RawValue, field: &dyn std::fmt::Display) -> Result<i64, ApiError> {
    let text = raw.get();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if !digits.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "{field}: must be an integer, got {}",
            kind(raw)
        )));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "{field}: must be a whole number of tokens, got {text}"
        )));
    }
    if negative {
        return Err(ApiError::bad_request(format!(
            "{field}: must not be negative, got {text}"
        )));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|u| i64::try_from(u).ok())
        .filter(|&n| n <= MAX_TOKENS_PER_KEY)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{field}: {text} is more than the largest accepted count, {MAX_TOKENS_PER_KEY}"
            ))
        })
}

fn members<'a>(raw: &'a RawValue, field: &str) -> Result<Members<'a>, ApiError> {
    if !raw.get().starts_with('{') {
        return Err(ApiError::bad_request(format!(
            "{field}: must be an object, got {}",
            kind(raw)
        )));
    }
    serde_json::from_str(raw.get()).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
}

/// Tokens of an `llm.usage` event's data.
fn llm_usage(data: &RawValue) -> Result<(String, TokenMap, Option<ServiceTier>), ApiError> {
    let data = members(data, "data")?;
    let mut model = None;
    let mut tier = None;
    let mut tokens = TokenMap::new();
    let mut seen = 0u16;
    let overflow = |f: &dyn std::fmt::Display| {
        ApiError::bad_request(format!("{f}: the token total overflows"))
    };
    for (Text(key), value) in &data.0 {
        let key = key.as_ref();
        // Bits 0..LLM_FIELDS.len() for LLM_FIELDS, then model, tokens and
        // service_tier: a repeated member would be counted twice, so it is refused.
        const FIELDS: usize = LLM_FIELDS.len();
        const _: () = assert!(FIELDS + 3 <= u16::BITS as usize);
        let (bit, known) = match key {
            "model" => (FIELDS, None),
            "tokens" => (FIELDS + 1, None),
            "service_tier" => (FIELDS + 2, None),
            _ => match LLM_FIELDS.iter().position(|(name, _, _)| *name == key) {
                Some(i) => (i, Some(LLM_FIELDS[i])),
                None => {
                    return Err(ApiError::bad_request(format!(
                        "data.{key}: unknown field for llm.usage (expected model, service_tier, tokens or one of {})",
                        LLM_FIELDS.map(|f| f.0).join(", ")
                    )));
                }
            },
        };
        if seen & (1 << bit) != 0 {
            return Err(ApiError::bad_request(format!(
                "data.{key}: appears more than once"
            )));
        }
        seen |= 1 << bit;
        if let Some((name, m, d)) = known {
            let field = format_args!("data.{name}");
            let n = quantity(value, &field)?;
            tokens.add(m, d, n).ok_or_else(|| overflow(&field))?;
        } else if key == "service_tier" {
            // OpenAI's names: `default` (and `auto`, resolved by the provider to what it
            // reports) are standard.
            tier = match text(value) {
                Ok(Text(t)) if t == "auto" => None,
                Ok(Text(t)) => Some(t.parse::<ServiceTier>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "data.service_tier: {t:?} is not standard, default, batch, priority or flex"
                    ))
                })?)
                .filter(|t| *t != ServiceTier::Standard),
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "data.service_tier: must be a string, got {}",
                        kind(value)
                    )));
                }
            };
        } else if key == "model" {
            model = Some(match text(value) {
                Ok(Text(m)) => {
                    ciyuan_core::check_text("data.model", &m, MAX_ATTRIBUTE_BYTES)
                        .map_err(|e| ApiError::bad_request(e.to_string()))?;
                    m.into_owned()
                }
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "data.model: must be a string, got {}",
                        kind(value)
                    )));
                }
            });
        } else {
            let map = members(value, "data.tokens")?;
            let mut keys = std::collections::HashSet::new();
            for (Text(k), v) in &map.0 {
                let field = format_args!("data.tokens.{k}");
                if !keys.insert(k.as_ref()) {
                    return Err(ApiError::bad_request(format!(
                        "{field}: appears more than once"
                    )));
                }
                let (m, d) = k
                    .split_once('.')
                    .and_then(|(m, d)| {
                        Some((m.parse::<Modality>().ok()?, d.parse::<Direction>().ok()?))
                    })
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "{field}: not a modality.direction key such as text.input"
                        ))
                    })?;
                let n = quantity(v, &field)?;
                tokens.add(m, d, n).ok_or_else(|| overflow(&field))?;
            }
        }
    }
    let Some(model) = model else {
        return Err(ApiError::bad_request("data.model: required for llm.usage"));
    };
    if tokens.is_empty() {
        return Err(ApiError::bad_request(
            "data: an llm.usage event must carry at least one token count",
        ));
    }
    Ok((model, tokens, tier))
}

/// Validates one event into an entry (without touching the store).
fn validate(
    app: &App,
    caller: &Caller,
    slot: Slot<'_>,
    now: Timestamp,
    last_account: &mut Option<AccountPath>,
) -> Result<Accepted, (Option<String>, Option<String>, ApiError)> {
    let ev = match slot {
        Slot::Event(ev) => ev,
        Slot::NotObject(kind) => {
            return Err((
                None,
                None,
                ApiError::bad_request(format!("an event must be a JSON object, got {kind}")),
            ));
        }
        Slot::Invalid(why) => {
            return Err((
                None,
                None,
                ApiError::bad_request(format!("invalid event: {why}")),
            ));
        }
    };
    let id = string_attr(ev.id, "id", true).ok().flatten();
    let source = string_attr(ev.source, "source", true).ok().flatten();
    let mut check = || -> Result<Accepted, ApiError> {
        let version = required_attr(ev.specversion, "specversion")?;
        if version != "1.0" {
            return Err(ApiError::bad_request(format!(
                "specversion: {version:?} is not supported (expected \"1.0\")"
            )));
        }
        let id = kept_attr(ev.id, "id")?;
        let source = kept_attr(ev.source, "source")?;
        if source == GATEWAY_SOURCE {
            return Err(ApiError::bad_request(format!(
                "source: {GATEWAY_SOURCE:?} is reserved for the gateway's own records"
            )));
        }
        let service = kept_attr(ev.service, "type")?;
        let subject = required_attr(ev.subject, "subject")?;
        let account = match last_account {
            // The previous event's subject passed the checks below.
            Some(last) if last.as_str() == subject => last.clone(),
            _ => {
                let account = AccountPath::parse(&subject)
                    .map_err(|e| ApiError::bad_request(format!("subject: {e}")))?;
                if account.is_root() {
                    return Err(ApiError::bad_request(
                        "subject: usage cannot land on the root account",
                    ));
                }
                caller.require_within(&account)?;
                *last_account = Some(account.clone());
                account
            }
        };
        if let Some(ct) = string_attr(ev.datacontenttype, "datacontenttype", false)?
            && !ct.eq_ignore_ascii_case("application/json")
        {
            return Err(ApiError::bad_request(format!(
                "datacontenttype: {ct:?} is not application/json"
            )));
        }
        let ts = match string_attr(ev.time, "time", false)? {
            Some(t) => t.parse::<Timestamp>().map_err(|e| {
                ApiError::bad_request(format!("time: {t:?} is not an RFC 3339 timestamp: {e}"))
            })?,
            None => now,
        };
        let age = now.duration_since(ts);
        let window = |d: std::time::Duration| {
            ciyuan_core::jiff::SignedDuration::try_from(d)
                .unwrap_or(ciyuan_core::jiff::SignedDuration::MAX)
        };
        if age > window(app.config.ingest_max_age) {
            return Err(unprocessable(format!(
                "time: {ts} is older than the accepted window of {}s",
                app.config.ingest_max_age.as_secs()
            )));
        }
        if -age > window(app.config.ingest_max_future) {
            return Err(unprocessable(format!(
                "time: {ts} is more than {}s in the future",
                app.config.ingest_max_future.as_secs()
            )));
        }
        let Some(data) = ev.data else {
            return Err(ApiError::bad_request("data: required attribute is missing"));
        };
        // Bounded by the tags' own bounds (16 of 64 + 256 bytes), not an attribute's.
        let tags = match ev.ciyuantags {
            None => Default::default(),
            Some(raw) => {
                let Ok(Text(t)) = text(raw) else {
                    return Err(ApiError::bad_request(format!(
                        "ciyuantags: must be a string of key=value pairs, got {}",
                        kind(raw)
                    )));
                };
                ciyuan_core::parse_tag_list(&t)
                    .map_err(|e| ApiError::bad_request(format!("ciyuantags: {e}")))?
            }
        };
        let mut tier = None;
        let (model, tokens, definition, measures) = match service.as_ref() {
            "llm.usage" => {
                let (m, t, served_at) = llm_usage(data)?;
                tier = served_at;
                (
                    Some(m),
                    t,
                    std::borrow::Cow::Borrowed(LLM_USAGE_DEFINITION),
                    Default::default(),
                )
            }
            other => {
                use ciyuan_measure::MeasureError as M;
                if !data.get().starts_with('{') {
                    return Err(ApiError::bad_request(format!(
                        "data: must be an object, got {}",
                        kind(data)
                    )));
                }
                let data: Map<String, Value> = serde_json::from_str(data.get())
                    .map_err(|e| ApiError::bad_request(format!("data: {e}")))?;
                let measured =
                    app.definitions()
                        .measure(other, ts, &data)
                        .map_err(|e| match e {
                            M::BadMeasure(..) => ApiError::bad_request(e.to_string()),
                            M::UnknownService(_) => unprocessable(format!("type: {e}")),
                            _ => unprocessable(e.to_string()),
                        })?;
                (
                    None,
                    measured.tokens,
                    std::borrow::Cow::Owned(measured.definition),
                    data.into_iter().collect(),
                )
            }
        };
        // Definitions compute counts from the event's own numbers: bound them as
        // the fields of llm.usage are bounded.
        if let Some(t) = tokens.out_of_bounds(false) {
            return Err(ApiError::bad_request(format!(
                "data: {definition} gives {}.{} = {}, outside 0 to {MAX_TOKENS_PER_KEY}",
                t.modality, t.direction, t.count
            )));
        }
        let hash = ingest_key_hash(&source, &id);
        let entry = Entry::new(
            ts,
            account,
            EntryBody::Usage(Usage {
                service: service.into_owned(),
                model,
                tokens,
                source: Some(source.into_owned()),
                event_id: Some(id.into_owned()),
                definition: Some(definition),
                partial: false,
                measures,
                tier,
                tags,
                ..Usage::default()
            }),
        );
        Ok(Accepted { hash, entry })
    };
    check().map_err(|e| (source.map(Cow::into_owned), id.map(Cow::into_owned), e))
}

/// What the body holds.
enum Mode {
    Single,
    Batch,
}

fn mode(headers: &HeaderMap, body: &[u8]) -> Result<Mode, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let array = first == Some(&b'[');
    let object = first == Some(&b'{');
    match ct.as_str() {
        "application/cloudevents-batch+json" if array => Ok(Mode::Batch),
        "application/cloudevents-batch+json" if object => Err(ApiError::bad_request(
            "a CloudEvents batch must be a JSON array",
        )),
        "application/json" if array => Ok(Mode::Batch),
        "application/cloudevents+json" | "application/json" if object => Ok(Mode::Single),
        "application/cloudevents+json"
        | "application/json"
        | "application/cloudevents-batch+json" => {
            // Not an object or array: say what is wrong with the JSON, or its shape.
            crate::extract::parse_json::<serde::de::IgnoredAny>(body)?;
            Err(ApiError::bad_request(
                "the body must be a CloudEvent object (or an array in batch mode)",
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "expected Content-Type application/cloudevents+json or application/cloudevents-batch+json",
        )),
    }
}

/// The batch answer.
#[derive(Serialize)]
struct BatchAnswer<'a> {
    accepted: usize,
    duplicates: usize,
    rejected: usize,
    results: &'a [Outcome],
}

impl BatchAnswer<'_> {
    /// The answer as serde writes it, accepted events written by hand: through serde's
    /// map machinery each of a batch's thousand results cost ~0.14 µs
    /// (`bench ingest`), a few percent of ingesting it. The test
    /// `batch_answers_are_written_as_serde_writes_them` holds the two to the same bytes.
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        use std::io::Write as _;
        let io = serde_json::Error::io;
        write!(
            out,
            r#"{{"accepted":{},"duplicates":{},"rejected":{},"results":["#,
            self.accepted, self.duplicates, self.rejected
        )
        .map_err(io)?;
        for (i, o) in self.results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match o {
                Outcome::Accepted {
                    claim,
                    pos,
                    entry_id,
                    over_limit,
                } => {
                    let (source, id) = event_key(&claim.entries[*pos]);
                    out.extend_from_slice(br#"{"source":"#);
                    serde_json::to_writer(&mut *out, source)?;
                    out.extend_from_slice(br#","id":"#);
                    serde_json::to_writer(&mut *out, id)?;
                    write!(out, r#","status":"accepted","entry_id":{entry_id}"#).map_err(io)?;
                    if *over_limit {
                        out.extend_from_slice(br#","over_limit":true"#);
                    }
                    out.push(b'}');
                }
                other => serde_json::to_writer(&mut *out, other)?,
            }
        }
        out.extend_from_slice(b"]}");
        Ok(())
    }
}

pub async fn events(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Ingest)?;
    let body = body.map_err(crate::extract::body_error)?;
    let mode = mode(&headers, &body)?;
    // One pass checks the whole body is JSON (syntax, UTF-8, depth) and reads each
    // event's attributes as slices of the body, without building a tree.
    let events: Vec<Slot<'_>> = match mode {
        Mode::Batch => crate::extract::parse_json_borrowed(&body)?,
        Mode::Single => vec![crate::extract::parse_json_borrowed(&body)?],
    };
    if events.is_empty() {
        return Err(ApiError::bad_request("the batch holds no event"));
    }
    if events.len() > app.config.max_events_per_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!(
                "a batch holds at most {} events",
                app.config.max_events_per_batch
            ),
        ));
    }
    // Measured and rated under the rules in force until the append is submitted (see
    // `App::rules_gate`).
    let rules = app.rules_gate.clone().read_owned().await;
    let now = Timestamp::now();
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(events.len());
    let mut candidates: Vec<(usize, Accepted)> = Vec::with_capacity(events.len());
    let mut last_account = None;
    for (i, ev) in events.into_iter().enumerate() {
        match validate(&app, &caller, ev, now, &mut last_account) {
            Ok(a) => {
                candidates.push((i, a));
                outcomes.push(None);
            }
            Err((source, id, error)) => {
                outcomes.push(Some(Outcome::Rejected { source, id, error }))
            }
        }
    }
    // Once events are checked, recording them runs to its end even if the client goes:
    // an append cut off between the ledger and the idempotency index could be counted
    // twice on a retry.
    let task = tokio::spawn(record(
        app,
        caller.key.key_id.clone(),
        candidates,
        outcomes,
        rules,
    ));
    let outcomes = task.await.map_err(ApiError::internal)??;
    match mode {
        Mode::Single => match outcomes.into_iter().next() {
            Some(Outcome::Rejected { error, .. }) => Err(error),
            Some(o @ Outcome::Accepted { .. }) => {
                Ok((StatusCode::CREATED, axum::Json(o)).into_response())
            }
            Some(o) => Ok((StatusCode::OK, axum::Json(o)).into_response()),
            None => Err(ApiError::internal("no outcome for the event")),
        },
        Mode::Batch => {
            let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
            let body = BatchAnswer {
                accepted: count(|o| matches!(o, Outcome::Accepted { .. })),
                duplicates: count(|o| matches!(o, Outcome::Duplicate { .. })),
                rejected: count(|o| matches!(o, Outcome::Rejected { .. })),
                results: &outcomes,
            };
            let mut json = Vec::with_capacity(64 + 96 * outcomes.len());
            body.write_json(&mut json).map_err(ApiError::internal)?;
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json,
            )
                .into_response())
        }
    }
}

/// Deduplicates the checked events and appends the new ones.
async fn record(
    app: Arc<App>,
    key_id: String,
    candidates: Vec<(usize, Accepted)>,
    mut outcomes: Vec<Option<Outcome>>,
    rules: tokio::sync::OwnedRwLockReadGuard<()>,
) -> Result<Vec<Outcome>, ApiError> {
    let mut rules = Some(rules);
    // Accounts must exist; checked once per distinct account.
    let accounts: Vec<AccountPath> = {
        let mut distinct = FxHashSet::default();
        candidates
            .iter()
            .filter(|(_, a)| distinct.insert(&a.entry.account))
            .map(|(_, a)| a.entry.account.clone())
            .collect()
    };
    let missing = app
        .blocking(move |app| {
            let mut missing = Vec::new();
            for a in accounts {
                if app.store.account(&a)?.is_none() {
                    missing.push(a);
                }
            }
            Ok(missing)
        })
        .await?;
    // The same event twice in one batch: the second is a duplicate of the first.
    let first_of: Vec<Option<usize>> = {
        let mut first: FxHashMap<(&str, &str), usize> =
            FxHashMap::with_capacity_and_hasher(candidates.len(), Default::default());
        candidates
            .iter()
            .map(|(i, a)| match first.entry(a.key()) {
                HashEntry::Occupied(o) => Some(*o.get()),
                HashEntry::Vacant(v) => {
                    v.insert(*i);
                    None
                }
            })
            .collect()
    };

    // Priced before the lock (pure work): each entry carries its amount, book and
    // unit prices into the ledger.
    let mut candidates = candidates;
    let prices = app.pricing.snapshot();
    let price_incidents =
        app.rate_entries(&prices, candidates.iter_mut().map(|(_, a)| &mut a.entry));
    app.raise_price_incidents(price_incidents).await;

    // Classify and claim under the lock, so two requests carrying the same event cannot
    // both append it; the lock is not held while appending, so concurrent requests
    // still share group commits.
    let mut tiers: Option<crate::tiers::TiersGuard> = None;
    // Tiered books place under the tier counters' lock, taken before the ingest lock:
    // with several nodes it may wait for the follower, which takes the ingest lock.
    let mut placing = if prices.tiered() {
        Some(app.lock_tiers().await?)
    } else {
        None
    };
    let mut slots = Vec::with_capacity(candidates.len());
    let mut waits = Vec::new();
    let pruned;
    let claim = {
        let mut recent = app.ingest_lock.lock().await;
        pruned = recent.prune(app.projected());
        recent.seen.warm(candidates.iter().map(|(_, a)| a.hash));
        let mut fresh: Vec<(usize, Accepted)> = Vec::with_capacity(candidates.len());
        let mut known = Vec::new();
        for ((i, a), first) in candidates.into_iter().zip(first_of) {
            let error = if missing.contains(&a.entry.account) {
                ApiError::unprocessable(format!(
                    "subject: account {} does not exist",
                    a.entry.account
                ))
            } else if let Some(first) = first {
                ApiError::conflict(format!("duplicate of event {first} in the same batch"))
            } else if recent.seen.claim(a.hash) {
                // A hash never seen: the event is new (and its hash now seen).
                fresh.push((i, a));
                continue;
            } else {
                // The hash is known: the exact answer is in memory or in the store.
                known.push((i, a));
                continue;
            };
            let (source, id) = a.into_key();
            outcomes[i] = Some(Outcome::Rejected {
                source: Some(source),
                id: Some(id),
                error,
            });
        }
        let held = {
            let wanted: Vec<_> = known.iter().map(|(_, a)| (a.hash, a.key())).collect();
            recent.find_many(&wanted)
        };
        let mut unknown = Vec::new();
        for ((i, a), held) in known.into_iter().zip(held) {
            match held {
                Some((claim, pos)) => match claim.state() {
                    Some(Ok(start)) => {
                        let (source, id) = a.into_key();
                        outcomes[i] = Some(Outcome::Duplicate {
                            source,
                            id,
                            entry_id: start + pos as u64,
                        });
                    }
                    _ => waits.push((i, a, claim, pos)),
                },
                None => unknown.push((i, a)),
            }
        }
        if !unknown.is_empty() {
            // Events whose hash is known but not held here: the entries recorded under
            // that hash are read back from the log and compared by exact key.
            let wanted: Vec<(String, String, Vec<u64>)> = unknown
                .iter()
                .map(|(_, a)| {
                    let (s, i) = a.key();
                    (s.to_string(), i.to_string(), recent.seen.entries(a.hash))
                })
                .collect();
            let stored = app
                .blocking(move |app| {
                    // Each entry read once, in log order (a retried batch names many).
                    let mut reads: Vec<u64> =
                        wanted.iter().flat_map(|w| w.2.iter().copied()).collect();
                    reads.sort_unstable();
                    reads.dedup();
                    let mut keys: FxHashMap<u64, Option<(String, String)>> =
                        FxHashMap::with_capacity_and_hasher(reads.len(), Default::default());
                    for e in reads {
                        let entry = Entry::decode(&app.log.entry(e)?).map_err(|err| {
                            ApiError::internal(format!("entry {e} does not decode: {err}"))
                        })?;
                        let key = match &entry.body {
                            EntryBody::Usage(u) => {
                                u.ingest_key().map(|(s, i)| (s.to_string(), i.to_string()))
                            }
                            _ => None,
                        };
                        keys.insert(e, key);
                    }
                    Ok(wanted
                        .iter()
                        .map(|(source, id, entries)| {
                            entries.iter().copied().find(|e| {
                                keys.get(e)
                                    .and_then(Option::as_ref)
                                    .is_some_and(|(s, i)| s == source && i == id)
                            })
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
            for ((i, a), prior) in unknown.into_iter().zip(stored) {
                match prior {
                    Some(entry_id) => {
                        let (source, id) = a.into_key();
                        outcomes[i] = Some(Outcome::Duplicate {
                            source,
                            id,
                            entry_id,
                        })
                    }
                    None => {
                        recent.seen.add_pending(a.hash);
                        fresh.push((i, a));
                    }
                }
            }
            // Entries go to the ledger in the batch's order.
            fresh.sort_unstable_by_key(|(i, _)| *i);
        }
        if fresh.is_empty() {
            None
        } else {
            let mut hashes = Vec::with_capacity(fresh.len());
            let mut entries = Vec::with_capacity(fresh.len());
            for (i, a) in fresh {
                slots.push(i);
                hashes.push(a.hash);
                entries.push(a.entry);
            }
            // New entries only (a duplicate takes no place), in the order they go to
            // the ledger, under the counters' lock until they hold their places there.
            if let Some(mut counters) = placing.take() {
                for e in &mut entries {
                    app.place_tiers(&prices, &mut counters, e)?;
                }
                tiers = Some(counters);
            }
            Some(recent.claim(Claim::new(entries, hashes, None)))
        }
    };

    if let Some(claim) = claim {
        let settle = Settle(&claim);
        let keys = app.log.keeps_keys().then(|| {
            claim
                .entries
                .iter()
                .map(|e| {
                    let (s, i) = event_key(e);
                    Some(ciyuan_core::ingest_key_digest(s, i))
                })
                .collect()
        });
        // With several nodes the counters' lock is kept until the places are committed,
        // not only ordered: once it goes, another node may take the tiers lease, and it
        // catches up to the log's size in the database, which holds committed entries
        // only.
        let committed_tiers = if app.config.follow.is_some() {
            tiers.take()
        } else {
            None
        };
        // Lent to the projector, which then applies these entries without reading them
        // back from the ledger.
        let appended = crate::pipeline::append_lent_keyed_then(
            app.log.as_ref(),
            &app.projector,
            claim.clone(),
            keys,
            || {
                drop(rules.take());
                drop(tiers.take());
                // While the ledger syncs this request's group.
                free(pruned);
            },
        )
        .await
        .inspect(|_| app.projector.kick());
        drop(committed_tiers);
        claim
            .appended
            .send_replace(Some(appended.as_ref().map(|r| r.start).map_err(|_| ())));
        drop(settle);
        let range = match appended {
            Ok(range) => range,
            Err(ciyuan_store::LogError::Duplicate(held)) => {
                // Another node recorded some of these events between the check above
                // and this append, which the log refused whole: those are answered
                // with the entries holding them, the rest must be sent again.
                let mut recent = app.ingest_lock.lock().await;
                for &(pos, entry_id) in &held {
                    recent.seen.index(claim.hashes[pos], entry_id);
                }
                drop(recent);
                for (pos, &i) in slots.iter().enumerate() {
                    let (source, id) = event_key(&claim.entries[pos]);
                    let (source, id) = (source.to_string(), id.to_string());
                    outcomes[i] = Some(match held.iter().find(|(p, _)| *p == pos) {
                        Some(&(_, entry_id)) => Outcome::Duplicate {
                            source,
                            id,
                            entry_id,
                        },
                        None => Outcome::Rejected {
                            source: Some(source),
                            id: Some(id),
                            error: ApiError::unavailable(
                                "not recorded: another node recorded events of this batch at the same moment; send this event again",
                            ),
                        },
                    });
                }
                return finish(outcomes, waits).await;
            }
            Err(e) => return Err(e.into()),
        };
        // Usage that already happened counts against budgets, never refused; a hard
        // limit it pushes over is flagged on its answer and by an incident naming it.
        let mut over = Vec::new();
        for (entry, entry_id) in claim.entries.iter().zip(range.clone()) {
            if let EntryBody::Usage(u) = &entry.body {
                let cost = u.rating.as_ref().map(|r| ciyuan_core::Money {
                    amount: r.amount,
                    currency: r.currency,
                });
                let settled = app.budget.record_cost(
                    &entry.account,
                    &key_id,
                    None,
                    &u.tokens,
                    cost,
                    entry.ts,
                );
                if !settled.crossings.is_empty() || !settled.exceeded.is_empty() {
                    over.push((entry_id, !settled.exceeded.is_empty(), settled));
                }
            }
        }
        for ((pos, i), entry_id) in slots.into_iter().enumerate().zip(range) {
            outcomes[i] = Some(Outcome::Accepted {
                claim: claim.clone(),
                pos,
                entry_id,
                over_limit: over.iter().any(|(e, x, _)| *e == entry_id && *x),
            });
        }
        for (entry_id, _, settled) in over {
            crate::budgets::incidents(&app, settled, Some(entry_id)).await;
        }
    }

    finish(outcomes, waits).await
}

/// Events held by a concurrent request's claim: answered once that request's append
/// ends.
type Waits = Vec<(usize, Accepted, Arc<Claim>, usize)>;

/// Answers the events that waited on other requests' claims, then every outcome.
async fn finish(
    mut outcomes: Vec<Option<Outcome>>,
    waits: Waits,
) -> Result<Vec<Outcome>, ApiError> {
    for (i, a, claim, pos) in waits {
        let mut rx = claim.appended.subscribe();
        let start = match rx.wait_for(Option::is_some).await {
            Ok(v) => *v,
            Err(_) => None,
        };
        let (source, id) = a.into_key();
        outcomes[i] = Some(match start {
            Some(Ok(start)) => Outcome::Duplicate {
                source,
                id,
                entry_id: start + pos as u64,
            },
            _ => Outcome::Rejected {
                source: Some(source),
                id: Some(id),
                error: ApiError::unavailable(
                    "a concurrent request carrying this event failed to record it; retry",
                ),
            },
        });
    }

    Ok(outcomes
        .into_iter()
        .map(|o| {
            // Lazily: building an internal error logs it.
            o.unwrap_or_else(|| Outcome::Rejected {
                source: None,
                id: None,
                error: ApiError::internal("event without outcome"),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Seen` against a plain model (hash -> entries), through growth, with hashes that
    /// share low bits, small values, 0 (kept as 1) and repeats.
    #[test]
    fn seen_agrees_with_a_model_across_growth() {
        use std::collections::{BTreeMap, HashMap};
        let mut seen = Seen::default();
        // Hashes held (pending or indexed), with their entries.
        let mut model: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next_entry = 0u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let h = match i % 5 {
                0 => x << 20,
                1 => i % 5000,
                _ => x,
            };
            let k = h.max(1);
            match x % 4 {
                0 | 1 => {
                    let new = !model.contains_key(&k);
                    assert_eq!(seen.claim(h), new, "claim {h}");
                    if new {
                        model.insert(k, vec![]);
                    }
                }
                2 => {
                    seen.add_pending(h);
                    model.entry(k).or_default();
                }
                _ => {
                    seen.index(h, next_entry);
                    model.entry(k).or_default().push(next_entry);
                    next_entry += 1;
                }
            }
            if i % 997 == 0 {
                assert_eq!(seen.entries(h), model[&k], "entries of {h}");
            }
        }
        let sorted: BTreeMap<_, _> = model.iter().collect();
        for (k, entries) in sorted {
            assert_eq!(&seen.entries(*k), entries);
        }
        assert!(seen.shards.iter().all(|s| 4 * s.len <= 3 * s.slots.len()));
        assert!(seen.len() >= model.len());
        assert_eq!(seen.entries(0), seen.entries(1), "0 is kept as 1");
    }

    #[test]
    fn a_hash_shared_by_two_keys_keeps_both_entries() {
        let mut seen = Seen::default();
        assert!(seen.claim(42));
        // A second key with the same hash, found new by the exact checks.
        assert!(!seen.claim(42));
        seen.add_pending(42);
        // Indexed in claim order: the first fills the pending slot, the second adds one.
        seen.index(42, 7);
        seen.index(42, 9);
        assert_eq!(seen.entries(42), vec![7, 9]);
        assert!(seen.entries(43).is_empty());
    }

    fn entry(source: &str, id: &str) -> Entry {
        Entry::new(
            Timestamp::UNIX_EPOCH,
            "a".parse().unwrap(),
            EntryBody::Usage(Usage {
                source: Some(source.into()),
                event_id: Some(id.into()),
                ..Usage::default()
            }),
        )
    }

    #[test]
    fn batch_answers_are_written_as_serde_writes_them() {
        let claim = Arc::new(Claim::new(
            vec![entry("svc://a", "e-1"), entry("s\"q\\\u{1}", "词元\n")],
            vec![1, 2],
            Some(Ok(40)),
        ));
        let accepted = |pos, over_limit| Outcome::Accepted {
            claim: claim.clone(),
            pos,
            entry_id: 40 + pos as u64,
            over_limit,
        };
        let results = [
            accepted(0, false),
            accepted(1, true),
            Outcome::Duplicate {
                source: "s".into(),
                id: "d\"".into(),
                entry_id: 7,
            },
            Outcome::Rejected {
                source: None,
                id: Some("r".into()),
                error: ApiError::bad_request("bad \"x\""),
            },
        ];
        for results in [&results[..], &results[..1], &[]] {
            let answer = BatchAnswer {
                accepted: 2,
                duplicates: 1,
                rejected: 1,
                results,
            };
            let mut by_hand = Vec::new();
            answer.write_json(&mut by_hand).unwrap();
            assert_eq!(
                String::from_utf8(by_hand).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
    }

    #[test]
    fn claims_answer_the_newest_claim_that_did_not_fail_by_exact_key() {
        let mut recent = Recent::default();
        let claim = |r: &mut Recent, ids: &[&str], hashes: &[u64], state| {
            let entries = ids.iter().map(|id| entry("s", id)).collect();
            r.claim(Claim::new(entries, hashes.to_vec(), state))
        };
        // "a" and "b" share a hash: only the exact key answers.
        let first = claim(&mut recent, &["x", "a"], &[9, 7], Some(Ok(10)));
        claim(&mut recent, &["c"], &[3], Some(Err(())));
        let retried = claim(&mut recent, &["c", "b"], &[3, 7], None);
        let found = recent.find_many(&[
            (7, ("s", "a")),
            (7, ("s", "b")),
            (3, ("s", "c")),
            (9, ("s", "x")),
            (9, ("t", "x")),
            (5, ("s", "nope")),
        ]);
        let at = |i: usize| found[i].as_ref().map(|(c, pos)| (Arc::as_ptr(c), *pos));
        assert_eq!(at(0), Some((Arc::as_ptr(&first), 1)));
        assert_eq!(at(1), Some((Arc::as_ptr(&retried), 1)));
        assert_eq!(
            at(2),
            Some((Arc::as_ptr(&retried), 0)),
            "not the failed claim"
        );
        assert_eq!(at(3), Some((Arc::as_ptr(&first), 0)));
        assert_eq!(at(4), None, "another source");
        assert_eq!(at(5), None);
        assert!(recent.find_many(&[]).is_empty());
        // Projected and failed claims go, in order; the pending one stays.
        recent.prune(12);
        assert_eq!(recent.claims.len(), 1);
        retried.appended.send_replace(Some(Ok(12)));
        recent.prune(13);
        assert_eq!(recent.claims.len(), 1);
        recent.prune(14);
        assert!(recent.claims.is_empty());
    }
}
