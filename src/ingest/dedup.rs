//! The in-memory dedup set of one partition: which event ids it has counted inside the dedup
//! horizon, with their event time for pruning.
//!
//! An id is kept as a 128-bit keyed digest, not as its text: 32 bytes with its event time and
//! content digest, and no allocation per id
//! where a `String` key cost about 110 bytes and an allocation. The set holds every id inside
//! the horizon (two million in the benchmark), so this is most of costwatch's memory under
//! load. PostgreSQL keeps the ids themselves (`seen_event_batch`); the set is rebuilt from
//! them at every assignment, so the digest never leaves the process and its key can be drawn
//! fresh at each start.
//!
//! Two different ids share a digest with probability about n²/2¹²⁹ for n ids in the set: for
//! a billion ids, 10⁻²¹. Such a collision would count the second event as a duplicate; the key
//! is random per process so that no producer can aim for one.

use xxhash_rust::xxh3::xxh3_128_with_seed;

/// The keyed 128-bit digest of an event id, as two words: the first picks the id's slot in its
/// table, the top bits of the second its table. Never `(0, 0)`, which marks a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdDigest(u64, u64);

impl IdDigest {
    const FREE: IdDigest = IdDigest(0, 0);
}

/// What is remembered of one counted event: its event time (for pruning) and the digest of its
/// content (to tell an identical re-send from a different event reusing the id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    time_ms: i64,
    /// [`content_digest`] of the counted event; [`UNKNOWN_CONTENT`] for ids stored before
    /// content digests were (such an id only ever makes silent duplicates).
    content: u64,
}

/// The content digest of ids stored before digests were kept.
pub const UNKNOWN_CONTENT: u64 = 0;

/// What [`SeenSet::insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Not seen before: count it.
    New,
    /// The same event again (same id, same content): a silent duplicate.
    Duplicate,
    /// The same id with different content: not counted, and not silent either.
    Conflict,
}

/// One remembered id: 32 bytes, two to a cache line.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: IdDigest,
    seen: Seen,
}

const FREE_SLOT: Slot = Slot {
    key: IdDigest::FREE,
    seen: Seen {
        time_ms: 0,
        content: UNKNOWN_CONTENT,
    },
};

/// One table of the set: open addressing with linear probing over a power-of-two array of
/// slots, at most [`MAX_LOAD_TENTHS`] tenths full. Hand-written rather than a `HashMap` for
/// one reason: the slot an id will probe first is known as soon as the id is, so it can be
/// prefetched while the rest of the event is validated ([`SeenSet::prefetch`]). The set is
/// far larger than the caches (it holds every id inside the horizon), and without that each
/// insert waited for memory: `SeenSet::insert` was 7% of costwatch's CPU in a profile for
/// about 200 instructions per event.
#[derive(Debug, Default)]
struct Table {
    slots: Vec<Slot>,
    len: usize,
}

/// A table grows (doubles) before an insert would make it fuller than this many tenths.
/// Linear probing stays short up to about 0.7: most inserts are of new ids, whose probe runs
/// to the first free slot.
const MAX_LOAD_TENTHS: usize = 7;
/// The first size of a table that holds anything.
const MIN_SLOTS: usize = 16;

impl Table {
    /// Where `key`'s probe starts (the table must have slots).
    #[inline]
    fn home(&self, key: IdDigest) -> usize {
        key.0 as usize & (self.slots.len() - 1)
    }

    /// The slot holding `key`, or the free slot where it would go (the table must have
    /// slots, and at least one free).
    #[inline]
    fn slot_of(&self, key: IdDigest) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        while self.slots[i].key != key && self.slots[i].key != IdDigest::FREE {
            i = (i + 1) & mask;
        }
        i
    }

    /// Inserts `key` unless present; the entry already kept when it is.
    #[inline]
    fn insert(&mut self, key: IdDigest, seen: Seen) -> Option<Seen> {
        if (self.len + 1) * 10 > self.slots.len() * MAX_LOAD_TENTHS {
            self.resize((self.slots.len() * 2).max(MIN_SLOTS), i64::MIN);
        }
        let i = self.slot_of(key);
        let slot = &mut self.slots[i];
        if slot.key == key {
            return Some(slot.seen);
        }
        *slot = Slot { key, seen };
        self.len += 1;
        None
    }

    /// Only tests look without inserting.
    #[cfg(test)]
    fn get(&self, key: IdDigest) -> Option<Seen> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = &self.slots[self.slot_of(key)];
        (slot.key == key).then_some(slot.seen)
    }

    /// Rebuilds the table with room for `at_least` slots (or what its kept entries need),
    /// keeping only the entries from `cutoff_ms` on. Linear probing has no cheap delete, and
    /// pruning drops a horizon's worth of ids at once: one pass that re-places the survivors
    /// costs the same as the `retain` of a `HashMap`.
    fn resize(&mut self, at_least: usize, cutoff_ms: i64) {
        let kept = self
            .slots
            .iter()
            .filter(|s| s.key != IdDigest::FREE && s.seen.time_ms >= cutoff_ms)
            .count();
        let needed = (kept * 10).div_ceil(MAX_LOAD_TENTHS).next_power_of_two().max(MIN_SLOTS);
        let size = if kept == 0 && at_least == 0 {
            0
        } else {
            needed.max(at_least)
        };
        let old = std::mem::replace(&mut self.slots, vec![FREE_SLOT; size]);
        self.len = 0;
        for slot in old {
            if slot.key != IdDigest::FREE && slot.seen.time_ms >= cutoff_ms {
                // Keys are distinct: this finds a free slot.
                let i = self.slot_of(slot.key);
                self.slots[i] = slot;
                self.len += 1;
            }
        }
    }

    /// Forgets the entries before `cutoff_ms`; gives memory back when the table emptied out
    /// (all of it when nothing is left).
    fn retain_from(&mut self, cutoff_ms: i64) {
        let kept = self
            .slots
            .iter()
            .filter(|s| s.key != IdDigest::FREE && s.seen.time_ms >= cutoff_ms)
            .count();
        // Nothing to forget: the table stays as it is.
        if kept == self.len {
            return;
        }
        let keep_size = if kept == 0 || self.slots.len() > 4 * (kept * 10 / MAX_LOAD_TENTHS).max(64) {
            0
        } else {
            self.slots.len()
        };
        self.resize(keep_size, cutoff_ms);
    }
}

/// Event ids seen by one partition, each with its event time in Unix milliseconds.
///
/// Kept in [`SHARDS`] tables chosen by the digest's second word rather than one: a table grows
/// by re-placing every entry into one twice its size, and for one table of a partition's
/// half-million ids that meant writes scattered over tens of megabytes, each a cache miss. A
/// shard is a few hundred kilobytes at most of the benchmark's size, so its growth stays in
/// cache, and the set as a whole grows in small steps instead of doubling at once.
#[derive(Debug)]
pub struct SeenSet {
    seed: u64,
    shards: Box<[Table]>,
}

/// How many tables a set spreads its ids over (a power of two).
const SHARDS: usize = 256;

impl Default for SeenSet {
    fn default() -> Self {
        Self::new()
    }
}

impl SeenSet {
    /// An empty set with a digest key of its own, drawn at random.
    pub fn new() -> Self {
        // A fresh random key per set: ahash draws its keys from the operating system.
        let seed = ahash::RandomState::new().hash_one(0u64);
        Self {
            seed,
            shards: (0..SHARDS).map(|_| Table::default()).collect(),
        }
    }

    /// The index of `digest`'s table: the top bits of the word the tables do not probe with.
    fn shard(digest: IdDigest) -> usize {
        (digest.1 >> (64 - SHARDS.trailing_zeros())) as usize
    }

    /// The keyed digest of `id`, as this set files it.
    #[inline]
    pub fn digest(&self, id: &str) -> IdDigest {
        let d = xxh3_128_with_seed(id.as_bytes(), self.seed);
        // (0, 0) marks a free slot; the one id in 2^128 that digests to it is filed as (0, 1).
        IdDigest(d as u64, ((d >> 64) as u64) | u64::from(d == 0))
    }

    /// Asks the CPU to bring the slot `digest` will probe first into cache, so that the
    /// [`SeenSet::insert_digest`] that follows a little later finds it there. A hint only:
    /// nothing changes, and it costs nothing where the CPU has no such instruction.
    #[inline]
    pub fn prefetch(&self, digest: IdDigest) {
        let table = &self.shards[Self::shard(digest)];
        if table.slots.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let slot: *const Slot = &table.slots[table.home(digest)];
            // SAFETY: a prefetch never faults and reads nothing into the program's state;
            // the pointer is to a live slot of this table besides.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(slot.cast()) };
        }
    }

    /// Records `id` at `event_time_ms` with its content digest unless the id is already in the
    /// set, in which case the stored entry stays as it was and the content decides between a
    /// duplicate and a conflict.
    pub fn insert(&mut self, id: &str, event_time_ms: i64, content: u64) -> Insert {
        self.insert_digest(self.digest(id), event_time_ms, content)
    }

    /// [`SeenSet::insert`] of an id already digested (and perhaps prefetched).
    #[inline]
    pub fn insert_digest(&mut self, digest: IdDigest, event_time_ms: i64, content: u64) -> Insert {
        let seen = Seen {
            time_ms: event_time_ms,
            content,
        };
        match self.shards[Self::shard(digest)].insert(digest, seen) {
            None => Insert::New,
            Some(kept) => {
                let kept = kept.content;
                if kept == content || kept == UNKNOWN_CONTENT || content == UNKNOWN_CONTENT {
                    Insert::Duplicate
                } else {
                    Insert::Conflict
                }
            }
        }
    }

    /// Only tests look without inserting; ingestion asks [`SeenSet::insert`].
    #[cfg(test)]
    pub fn contains(&self, id: &str) -> bool {
        let digest = self.digest(id);
        self.shards[Self::shard(digest)].get(digest).is_some()
    }

    /// Forgets the ids whose event time is before `cutoff_ms`.
    pub fn retain_from(&mut self, cutoff_ms: i64) {
        for table in self.shards.iter_mut() {
            table.retain_from(cutoff_ms);
        }
    }

    /// How many ids are remembered (the `costwatch_dedup_ids` gauge sums this).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|t| t.len).sum()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|t| t.len == 0)
    }
}

/// A stable 64-bit digest of an event's content, everything but its id: model, hardware, the
/// exact timestamp, compute, storage and labels. Unkeyed and fixed, since it is stored with the
/// id (`seen_event_batch`) and compared after restarts. Quantities arrive with trailing zeros
/// stripped (`event::exact_quantity`), so `1.5` and `1.50` are one content. Never
/// [`UNKNOWN_CONTENT`].
pub fn content_digest(event: &crate::ingest::event::UsageEventRef<'_>) -> u64 {
    use xxhash_rust::xxh3::xxh3_64_with_seed as hash;
    // Each part hashed on its own, seeded with the digest so far: parts keep their boundaries,
    // and nothing is copied (building one buffer to hash cost more than the hashing, 5% of
    // the consumer's CPU in a profile).
    let mut h = hash(event.model.as_bytes(), 0);
    h = hash(event.hardware.as_bytes(), h);
    let mut ts = [0u8; 12];
    ts[..8].copy_from_slice(&event.timestamp.timestamp().to_le_bytes());
    ts[8..].copy_from_slice(&event.timestamp.timestamp_subsec_nanos().to_le_bytes());
    h = hash(&ts, h);
    h = hash(&event.compute.value().serialize(), h);
    h = hash(&event.storage.value().serialize(), h);
    for (k, v) in &event.labels {
        h = hash(k.as_bytes(), h);
        h = hash(v.as_bytes(), h);
    }
    // Only when there are tokens, so that the digests stored for events without them (all
    // before sources existed) stay what they were.
    if !event.tokens.is_zero() {
        h = hash(&event.tokens.input.normalize().serialize(), h);
        h = hash(&event.tokens.output.normalize().serialize(), h);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_seen_once_and_pruned_by_its_time() {
        let mut set = SeenSet::new();
        assert_eq!(set.insert("req-1", 1_000, 7), Insert::New);
        assert_eq!(
            set.insert("req-1", 5_000, 7),
            Insert::Duplicate,
            "the second copy is a duplicate"
        );
        assert_eq!(set.insert("req-2", 2_000, 8), Insert::New);
        assert!(set.contains("req-1") && set.contains("req-2") && !set.contains("req-3"));
        // The duplicate did not move req-1's time: it goes with the cut-off at 1,500.
        set.retain_from(1_500);
        assert!(!set.contains("req-1"));
        assert!(set.contains("req-2"));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn ids_that_differ_in_one_byte_or_only_in_length_are_distinct() {
        let mut set = SeenSet::new();
        let ids: Vec<String> = (0..100_000).map(|i| format!("9f1c2d3e-{i:08}")).collect();
        for id in &ids {
            assert_eq!(set.insert(id, 0, 1), Insert::New, "{id} collided");
        }
        for id in ["", "9f1c2d3e-", "9f1c2d3e-0000000", "9f1c2d3e-000000000"] {
            assert_eq!(set.insert(id, 0, 1), Insert::New, "{id:?} collided");
        }
        assert_eq!(set.len(), ids.len() + 4);
    }

    #[test]
    fn two_sets_use_different_keys() {
        // Not a property anyone observes through the set; it is what keeps digests unguessable.
        let (a, b) = (SeenSet::new(), SeenSet::new());
        assert_ne!(a.digest("req-1"), b.digest("req-1"));
    }

    #[test]
    fn the_same_id_with_other_content_is_a_conflict_unless_the_content_is_unknown() {
        let mut set = SeenSet::new();
        assert_eq!(set.insert("req-1", 1_000, 7), Insert::New);
        assert_eq!(set.insert("req-1", 1_000, 9), Insert::Conflict);
        // The first stays what was counted: the conflict replaced nothing.
        assert_eq!(set.insert("req-1", 1_000, 7), Insert::Duplicate);
        // Ids stored before content digests were kept can only make silent duplicates.
        assert_eq!(set.insert("old", 1_000, UNKNOWN_CONTENT), Insert::New);
        assert_eq!(set.insert("old", 1_000, 9), Insert::Duplicate);
    }

    #[test]
    fn ids_spread_over_the_shards_and_prune_from_each() {
        let mut set = SeenSet::new();
        for i in 0..20_000 {
            assert_eq!(set.insert(&format!("req-{i}"), i, 1), Insert::New);
        }
        // 20,000 ids over 256 tables: about 78 each; a skewed choice would leave some empty.
        assert!(set.shards.iter().all(|t| t.len > 0), "every shard holds ids");
        set.retain_from(15_000);
        assert_eq!(set.len(), 5_000);
        assert!(set.contains("req-15000") && !set.contains("req-14999"));
        assert_eq!(set.insert("req-19999", 19_999, 1), Insert::Duplicate);
    }

    #[test]
    fn the_table_answers_as_a_map_would_through_growth_and_pruning() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        use std::collections::HashMap;
        // A reference model of what the set must answer: id -> (time, content).
        let mut rng = StdRng::seed_from_u64(18);
        let mut set = SeenSet::new();
        let mut model: HashMap<String, (i64, u64)> = HashMap::new();
        let mut clock = 0i64;
        for step in 0..200_000u32 {
            clock += rng.gen_range(0..3);
            if step % 9_973 == 9_972 {
                // Prune a random share of what is held, as the horizon moving would.
                let cutoff = clock - rng.gen_range(0..20_000);
                set.retain_from(cutoff);
                model.retain(|_, (t, _)| *t >= cutoff);
                assert_eq!(set.len(), model.len(), "after pruning at step {step}");
                continue;
            }
            // A pool small enough that ids repeat, large enough that tables grow many times.
            let id = format!("req-{}", rng.gen_range(0..60_000));
            let content = rng.gen_range(1..4u64);
            let expected = match model.get(&id) {
                None => {
                    model.insert(id.clone(), (clock, content));
                    Insert::New
                }
                Some(&(_, kept)) if kept == content => Insert::Duplicate,
                Some(_) => Insert::Conflict,
            };
            let digest = set.digest(&id);
            set.prefetch(digest);
            assert_eq!(
                set.insert_digest(digest, clock, content),
                expected,
                "{id} at step {step}"
            );
        }
        assert_eq!(set.len(), model.len());
        for id in model.keys() {
            assert!(set.contains(id), "{id} was forgotten");
        }
        // Every shard stays within its load limit, and one that was emptied gives memory back.
        for table in set.shards.iter() {
            assert!(
                table.len * 10 <= table.slots.len() * MAX_LOAD_TENTHS,
                "{} in {}",
                table.len,
                table.slots.len()
            );
        }
        set.retain_from(i64::MAX);
        assert!(set.is_empty());
        assert!(
            set.shards.iter().all(|t| t.slots.is_empty()),
            "an empty set holds no slots"
        );
        assert_eq!(set.insert("req-1", 0, 1), Insert::New, "and fills again");
    }

    #[test]
    fn an_entry_is_32_bytes() {
        // Two to a cache line; the content digest costs 8 bytes per id over the 24 of digest
        // and time alone.
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }
}
