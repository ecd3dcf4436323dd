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

use std::collections::hash_map::{Entry, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use xxhash_rust::xxh3::xxh3_128_with_seed;

/// The keyed 128-bit digest of an event id, as two words (8-byte aligned: an entry of the set
/// is 24 bytes, where a `u128` key would pad it to 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest(u64, u64);

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a uniformly distributed keyed hash: the table uses one word as it is.
        state.write_u64(self.0);
    }
}

/// Passes a [`Digest`]'s first word through as the table hash.
#[derive(Debug, Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `Digest`; fold anything else in rather than panic.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
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

/// Event ids seen by one partition, each with its event time in Unix milliseconds.
///
/// Kept in [`SHARDS`] tables chosen by the digest's second word rather than one: a table grows
/// by rehashing every entry into one twice its size, and for one table of a partition's
/// half-million ids that meant writes scattered over tens of megabytes, each a cache miss
/// (`reserve_rehash` was 5% of the consumer's CPU in a profile). A shard is a few hundred
/// kilobytes at most of the benchmark's size, so its rehash stays in cache; lookups cost the
/// same, and the set as a whole grows in small steps instead of doubling at once.
#[derive(Debug)]
pub struct SeenSet {
    seed: u64,
    shards: Box<[Table]>,
}

type Table = HashMap<Digest, Seen, BuildHasherDefault<PassThrough>>;

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

    /// The index of `digest`'s table: the top bits of the word the tables do not hash with.
    fn shard(digest: Digest) -> usize {
        (digest.1 >> (64 - SHARDS.trailing_zeros())) as usize
    }

    fn digest(&self, id: &str) -> Digest {
        let d = xxh3_128_with_seed(id.as_bytes(), self.seed);
        Digest(d as u64, (d >> 64) as u64)
    }

    /// Records `id` at `event_time_ms` with its content digest unless the id is already in the
    /// set, in which case the stored entry stays as it was and the content decides between a
    /// duplicate and a conflict.
    pub fn insert(&mut self, id: &str, event_time_ms: i64, content: u64) -> Insert {
        let digest = self.digest(id);
        match self.shards[Self::shard(digest)].entry(digest) {
            Entry::Occupied(kept) => {
                let kept = kept.get().content;
                if kept == content || kept == UNKNOWN_CONTENT || content == UNKNOWN_CONTENT {
                    Insert::Duplicate
                } else {
                    Insert::Conflict
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(Seen {
                    time_ms: event_time_ms,
                    content,
                });
                Insert::New
            }
        }
    }

    /// Only tests look without inserting; ingestion asks [`SeenSet::insert`].
    #[cfg(test)]
    pub fn contains(&self, id: &str) -> bool {
        let digest = self.digest(id);
        self.shards[Self::shard(digest)].contains_key(&digest)
    }

    /// Forgets the ids whose event time is before `cutoff_ms`.
    pub fn retain_from(&mut self, cutoff_ms: i64) {
        for table in self.shards.iter_mut() {
            table.retain(|_, seen| seen.time_ms >= cutoff_ms);
            // Give memory back after a burst: a table that emptied out keeps its buckets
            // otherwise.
            if table.capacity() > 4 * table.len().max(64) {
                table.shrink_to_fit();
            }
        }
    }

    /// How many ids are remembered (the `costwatch_dedup_ids` gauge sums this).
    pub fn len(&self) -> usize {
        self.shards.iter().map(Table::len).sum()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(Table::is_empty)
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
        assert!(set.shards.iter().all(|t| !t.is_empty()), "every shard holds ids");
        set.retain_from(15_000);
        assert_eq!(set.len(), 5_000);
        assert!(set.contains("req-15000") && !set.contains("req-14999"));
        assert_eq!(set.insert("req-19999", 19_999, 1), Insert::Duplicate);
    }

    #[test]
    fn an_entry_is_32_bytes() {
        // The content digest costs 8 bytes per id over the 24 of digest and time alone.
        assert_eq!(std::mem::size_of::<(Digest, Seen)>(), 32);
    }
}
