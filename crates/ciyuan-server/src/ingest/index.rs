//! The idempotency index of ingested events: the claims of batches appended but not
//! yet projected, and the sharded table of every ingested key hash with its entry.

use super::*;

/// The `(source, id)` of an ingested event's entry.
pub(super) fn event_key(entry: &Entry) -> (&str, &str) {
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
pub(super) fn no_key(kind: &str) -> ! {
    unreachable!("an ingested {kind} entry without (source, id)")
}

/// Events one request claimed and appends together.
pub(crate) struct Claim {
    /// Their usage entries, in append order.
    pub(super) entries: Vec<Entry>,
    /// [`ingest_key_hash`] of each entry's event.
    pub(super) hashes: Vec<u64>,
    /// The index of the first once the append is durable; `Err` if it failed.
    pub(super) appended: watch::Sender<Option<Result<u64, ()>>>,
}

impl Claim {
    pub(super) fn new(
        entries: Vec<Entry>,
        hashes: Vec<u64>,
        appended: Option<Result<u64, ()>>,
    ) -> Claim {
        Claim {
            entries,
            hashes,
            appended: watch::channel(appended).0,
        }
    }

    pub(super) fn state(&self) -> Option<Result<u64, ()>> {
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
pub(super) struct Settle<'a>(pub(super) &'a Claim);

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
    pub(super) seen: Seen,
    /// Unprojected claims, oldest first.
    pub(super) claims: VecDeque<Arc<Claim>>,
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
    pub(super) fn find_many(
        &self,
        wanted: &[(u64, (&str, &str))],
    ) -> Vec<Option<(Arc<Claim>, usize)>> {
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
    pub(super) fn claim(&mut self, claim: Claim) -> Arc<Claim> {
        let claim = Arc::new(claim);
        self.claims.push_back(claim.clone());
        claim
    }

    /// Takes out the oldest claims the projections have indexed, and failed ones;
    /// bounds the index. They come back to be dropped once the ingest lock is
    /// released: dropping a claim frees every string and rating of its entries, by
    /// then out of the cache, and no other request need wait for that.
    pub(super) fn prune(&mut self, projected: u64) -> Vec<Arc<Claim>> {
        let Recent { seen, claims } = self;
        let mut pruned = Vec::new();
        while let Some(front) = claims.front() {
            match front.state() {
                Some(Ok(start)) if start + front.entries.len() as u64 <= projected => {
                    // The claim's slots are cold by now, as a new batch's are.
                    seen.warm(front.hashes.iter().copied());
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
pub(super) fn free(pruned: Vec<Arc<Claim>>) {
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
pub(super) const PENDING: u64 = u64::MAX;

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
pub(super) struct Seen {
    pub(super) shards: Vec<Shard>,
    /// Where a hash lands depends on this per-process random value too: the hashes are
    /// fixed and anyone can compute them, where they land is not, so nobody can choose
    /// ids that pile up in one run of slots.
    pub(super) seed: u64,
}

/// One table of [`Seen`].
#[derive(Default)]
pub(super) struct Shard {
    /// Slots; hash 0 marks an empty one. The length is 0 or a power of two.
    pub(super) slots: Vec<(u64, u64)>,
    pub(super) len: usize,
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
    pub(super) fn nonzero(hash: u64) -> u64 {
        hash.max(1)
    }

    /// The table of `hash`: the top 8 bits of its mixed value (the slot comes from bits
    /// 32 up, see [`Shard::home`]; tables stay far below 2^24 slots).
    pub(super) fn shard(&self, hash: u64) -> usize {
        (mix(hash, self.seed) >> 56) as usize
    }

    /// Adds `hash` as pending and answers true if no slot held it; false (adding
    /// nothing) if one did: the event may be known, and goes to the exact checks.
    pub(super) fn claim(&mut self, hash: u64) -> bool {
        let hash = Self::nonzero(hash);
        let shard = self.shard(hash);
        self.shards[shard].claim(hash, self.seed)
    }

    /// Makes sure `hash` has a pending slot, for an event found new by the exact checks
    /// although its hash was known.
    pub(super) fn add_pending(&mut self, hash: u64) {
        self.put(hash, PENDING);
    }

    /// Records that `entry` holds an event of `hash`: in a pending slot of that hash if
    /// there is one, else in a new slot.
    pub(super) fn index(&mut self, hash: u64, entry: u64) {
        self.put(hash, entry);
    }

    pub(super) fn put(&mut self, hash: u64, entry: u64) {
        let hash = Self::nonzero(hash);
        let shard = self.shard(hash);
        self.shards[shard].put(hash, self.seed, entry);
    }

    /// The entries recorded for `hash`, oldest first.
    pub(super) fn entries(&self, hash: u64) -> Vec<u64> {
        let hash = Self::nonzero(hash);
        self.shards[self.shard(hash)].entries(hash, self.seed)
    }

    /// Reads the home slot of every hash before they are inserted one by one. Past a
    /// few million keys nearly every probe misses the cache; these loads do not depend
    /// on each other, so the processor has many of them in flight at once, and the
    /// inserts that follow find their slots cached instead of waiting for each in turn.
    pub(super) fn warm(&self, hashes: impl Iterator<Item = u64>) {
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
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len).sum()
    }
}

impl Shard {
    /// Slots of a new table: small, since there are many tables and a server that
    /// ingests nothing should not pay for them.
    const MIN_SLOTS: usize = 64;

    /// The first slot to probe for `hash` (the table must have slots).
    pub(super) fn home(&self, hash: u64, seed: u64) -> usize {
        mix(hash, seed).rotate_left(32) as usize & (self.slots.len() - 1)
    }

    pub(super) fn claim(&mut self, hash: u64, seed: u64) -> bool {
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

    pub(super) fn put(&mut self, hash: u64, seed: u64, entry: u64) {
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

    pub(super) fn entries(&self, hash: u64, seed: u64) -> Vec<u64> {
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
    pub(super) fn reserve_one(&mut self, seed: u64) {
        if 4 * (self.len + 1) <= 3 * self.slots.len() {
            return;
        }
        let size = (2 * self.slots.len()).max(Self::MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, empty_slots(size));
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

/// A table of `size` empty slots, every page of it written once.
///
/// A zeroed allocation this large is mapped lazily: the first probe that reads a page
/// maps the shared zero page, and the first insert into it faults again to copy it,
/// flushing the old mapping from every core's TLB (an interrupt to the other core).
/// With tables grown during a long ingest that was 4% of the server's CPU (`perf`,
/// `bench ingest --events 10000000`: `reserve_one` → `do_wp_page` →
/// `flush_tlb_mm_range`). Writing each page first costs one plain fault per page and
/// no flush.
fn empty_slots(size: usize) -> Vec<(u64, u64)> {
    let mut slots = vec![(0, 0); size];
    // 4 KiB pages hold 256 slots. The zero comes through `black_box` so that the
    // compiler cannot drop a store of the value the memory already holds.
    for i in (0..size).step_by(256) {
        slots[i] = std::hint::black_box((0, 0));
    }
    slots
}

/// A hash mixed with the per-process seed; Fx-like multiplication spreads every bit of
/// the input over the high bits, which pick the table and the slot.
pub(super) fn mix(hash: u64, seed: u64) -> u64 {
    (hash ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
