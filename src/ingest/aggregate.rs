//! Per-partition aggregation: turns the messages of the partitions this instance owns into
//! pending window sums, rejections and dedup entries, and hands them out as one [`FlushBatch`].
//!
//! Everything here is deterministic given (the state restored from PostgreSQL, the messages
//! after the stored offset): that is what makes replay after a crash produce the same rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use ahash::{HashMap, HashMapExt};
use std::time::Duration;

use chrono::{DateTime, Utc};
use smallvec::SmallVec;

use crate::domain::{HardwareName, ModelName};
use crate::ingest::dedup::{self, IdDigest, Insert, SeenSet, UNKNOWN_CONTENT};
use crate::ingest::event::{self, Basis, Labels, Limits, RejectCode, Rejection, UsageEventRef};
use crate::ingest::source::Source;
use crate::ingest::window::{from_millis, PendingWindows, WindowKey, WindowSize, WindowSums};

/// The fixed rules ingestion applies, derived from settings once.
#[derive(Debug, Clone, Copy)]
pub struct IngestRules {
    /// The byte and precision limits an event must meet to be accepted.
    pub limits: Limits,
    /// At most this much of a rejected message is kept (its full size and SHA-256 are kept too).
    pub max_rejected_payload_bytes: usize,
    /// The window size events are summed in.
    pub window: WindowSize,
    /// `windows.allowed_lateness` in milliseconds: an accepted event older than the watermark minus this is counted as late.
    pub allowed_lateness_ms: i64,
    /// `ingest.dedup_horizon` in milliseconds: ids are remembered until the watermark is this far past their event time.
    pub dedup_horizon_ms: i64,
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Added to its window's sums.
    Accepted {
        /// Older than the watermark minus the allowed lateness; still counted, in `late_events`.
        late: bool,
    },
    /// The `event_id` was counted before with the same content; skipped silently.
    Duplicate,
    /// Refused, for this reason; kept in `rejected_events`.
    Rejected(RejectCode),
    /// The message held no usage (only non-GenAI spans, a CloudEvent of another type).
    Skipped,
    /// Below the offset already stored in PostgreSQL: counted before, so skipped now.
    AlreadyCounted,
    /// The partition is not (or no longer) assigned here.
    NotOwned,
    /// The first message after assignment came from past the stored offset: seek back to `to`
    /// and read again (nothing was counted).
    Rewind {
        /// The offset to read the partition again from.
        to: i64,
    },
}

/// How far before its stored offset a partition is assigned, in messages. tansu 0.6 serves only
/// record batches whose *base* offset is at or after the fetch offset, so fetching from the
/// middle of a batch would skip the rest of it; starting this far back (librdkafka's largest
/// default batch) lands on a batch boundary at or before the stored offset, and the messages in
/// between are skipped as already counted. Against Kafka it costs a re-read of at most this many
/// messages per assignment.
pub const START_MARGIN: i64 = 10_000;

/// The offset to assign a partition at, given the first offset not yet counted.
pub fn start_offset(next: i64) -> i64 {
    (next - START_MARGIN).max(0)
}

/// Tracks whether a partition really started at or before its stored offset.
#[derive(Debug, Clone, Copy)]
struct StartCheck {
    next: i64,
    from: i64,
    step: i64,
}

impl StartCheck {
    /// Reading starts at [`start_offset`] of `next`; the first message tells whether it did.
    fn before(next: i64) -> Self {
        Self {
            next,
            from: start_offset(next),
            step: START_MARGIN,
        }
    }
}

/// What PostgreSQL knows of a partition when this instance takes it over.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The partition taken over.
    pub partition: i32,
    /// Fencing token: a flush is accepted only while this is still the partition's epoch.
    pub epoch: i64,
    /// The first offset not yet counted; `None` when nothing was ever counted.
    pub next_offset: Option<i64>,
    /// The largest accepted event time stored for the partition (never ahead of the clock); `None` before any event.
    pub watermark: Option<DateTime<Utc>>,
    /// Event ids stored for this partition (in PostgreSQL's packed form), with their event time;
    /// those inside the dedup horizon are remembered. Not loaded for a continued claim.
    pub seen: SeenIds,
    /// This instance held the partition at exactly the previous epoch and offset (see
    /// [`Aggregator::park`]): nobody else claimed it in between, so the state it parked is what
    /// PostgreSQL holds, and the dedup ids were not loaded again.
    pub continued: bool,
}

/// A message that was refused, as it goes into `rejected_events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedMessage {
    /// The Kafka partition it came from.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Why it was refused.
    pub rejection: Rejection,
    /// The message's first bytes, at most `ingest.max_rejected_payload_bytes`; cut at a
    /// character boundary when the message is UTF-8 text.
    pub payload: Vec<u8>,
    /// The whole message's size in bytes.
    pub payload_size: i64,
    /// SHA-256 of the whole message, so a kept prefix can be matched with the producer's copy.
    pub payload_sha256: [u8; 32],
}

impl RejectedMessage {
    /// Keeps at most `max_bytes` of `payload`: a backlog of 10 MiB rejects was once held whole,
    /// twice, and timed every flush out.
    pub fn new(partition: i32, offset: i64, rejection: Rejection, payload: &[u8], max_bytes: usize) -> Self {
        use sha2::Digest;
        let mut keep = payload.len().min(max_bytes);
        if keep < payload.len() {
            // Do not split a UTF-8 character: the kept text stays readable as text.
            if let Err(e) = std::str::from_utf8(&payload[..keep]) {
                if e.error_len().is_none() {
                    keep = e.valid_up_to();
                }
            }
        }
        Self {
            partition,
            offset,
            rejection,
            payload: payload[..keep].to_vec(),
            payload_size: payload.len() as i64,
            payload_sha256: sha2::Sha256::digest(payload).into(),
        }
    }

    /// Whether the kept bytes are shown as text: valid UTF-8 without NUL (PostgreSQL text
    /// cannot hold NUL).
    pub fn is_text(&self) -> bool {
        std::str::from_utf8(&self.payload).is_ok_and(|t| !t.contains('\0'))
    }
}

/// The dedup ids a partition took in since its last flush, already in the form they are stored
/// in (one `seen_event_batch` row per partition per flush): per id a big-endian u16 byte length
/// with its top bit set (the UTF-8 id is at most 128 characters, 512 bytes, so the bit is free),
/// the UTF-8 id, a big-endian i64 of Unix milliseconds and a big-endian u64 content digest
/// ([`crate::ingest::dedup::content_digest`]). Rows written before content digests were kept lack the
/// top bit and the digest; they read back as [`UNKNOWN_CONTENT`]. Appending to one buffer costs
/// no allocation per event, where an `EventId` per event cost one, and the flush has nothing
/// left to encode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenIds {
    bytes: Vec<u8>,
    newest_ms: Option<i64>,
    len: usize,
}

/// The top bit of an id's length in [`SeenIds`]: a content digest follows the time.
const WITH_CONTENT: u16 = 0x8000;

impl SeenIds {
    /// Appends one id with its event time (Unix milliseconds) and content digest.
    pub fn push(&mut self, id: &str, event_time_ms: i64, content: u64) {
        let id = id.as_bytes();
        // A validated id is at most 128 characters, 512 bytes: the length fits in 15 bits.
        self.bytes
            .extend_from_slice(&(id.len() as u16 | WITH_CONTENT).to_be_bytes());
        self.bytes.extend_from_slice(id);
        self.bytes.extend_from_slice(&event_time_ms.to_be_bytes());
        self.bytes.extend_from_slice(&content.to_be_bytes());
        self.newest_ms = Some(self.newest_ms.map_or(event_time_ms, |n| n.max(event_time_ms)));
        self.len += 1;
    }

    /// Appends ids in the packed form (a `seen_event_batch.ids` value read back).
    pub fn extend_packed(&mut self, bytes: &[u8]) {
        for (id, t, content) in decode_ids(bytes) {
            self.push(id, t.timestamp_millis(), content);
        }
    }

    /// Whether no id was taken in.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// How many ids, without unpacking them.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The packed form, as stored in `seen_event_batch.ids`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The latest event time among the ids.
    pub fn newest(&self) -> Option<DateTime<Utc>> {
        self.newest_ms.map(from_millis)
    }

    /// Each id with its event time, in the order they were taken in.
    pub fn iter(&self) -> impl Iterator<Item = (&str, DateTime<Utc>)> + '_ {
        decode_ids(&self.bytes).map(|(id, t, _)| (id, t))
    }

    /// Each id with its event time and content digest, in the order they were taken in.
    pub fn entries(&self) -> impl Iterator<Item = (&str, DateTime<Utc>, u64)> + '_ {
        decode_ids(&self.bytes)
    }
}

/// Unpacks the [`SeenIds`] form, old rows without content digests included; a truncated tail
/// (which this code never writes) is ignored.
pub fn decode_ids(mut bytes: &[u8]) -> impl Iterator<Item = (&str, DateTime<Utc>, u64)> + '_ {
    std::iter::from_fn(move || loop {
        let head = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
        let len = (head & !WITH_CONTENT) as usize;
        let digest_len = if head & WITH_CONTENT != 0 { 8 } else { 0 };
        let record = bytes.get(2..2 + len + 8 + digest_len)?;
        bytes = &bytes[2 + len + 8 + digest_len..];
        let (id, rest) = record.split_at(len);
        let ms = i64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
        let content = match rest.get(8..16) {
            Some(d) => u64::from_be_bytes(d.try_into().expect("8 bytes")),
            None => UNKNOWN_CONTENT,
        };
        if let (Ok(id), Some(t)) = (std::str::from_utf8(id), DateTime::<Utc>::from_timestamp_millis(ms)) {
            return Some((id, t, content));
        }
    })
}

/// Where a partition stands after a flush: what the `partition_progress` row becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The partition the row is for.
    pub partition: i32,
    /// The epoch this instance claimed it at; the flush is fenced when PostgreSQL holds another.
    pub epoch: i64,
    /// The offset PostgreSQL holds before this batch: the batch applies only on top of it, which
    /// makes retrying a batch whose COMMIT outcome was unknown safe.
    pub prev_offset: Option<i64>,
    /// The first offset not yet counted once the batch is written.
    pub next_offset: i64,
    /// The partition's watermark once the batch is written; `None` while no event was accepted.
    pub watermark: Option<DateTime<Utc>>,
    /// Dedup entries older than this may be deleted.
    pub forget_before: Option<DateTime<Utc>>,
}

pub use crate::telemetry::OutcomeCounts;

/// One partition's share of a flush.
#[derive(Debug, Clone)]
pub struct PartitionBatch {
    /// The offset, watermark and epoch to store.
    pub progress: Progress,
    /// Window sums taken in since the last flush, by full key.
    pub windows: PendingWindows,
    /// Messages refused since the last flush.
    pub rejected: Vec<RejectedMessage>,
    /// Dedup ids taken in since the last flush, in their stored form.
    pub seen: SeenIds,
    /// Accepted, late, duplicate and rejected messages since the last flush, for the metrics.
    pub counts: OutcomeCounts,
    /// Rejections since the last flush by [`RejectCode::as_str`], for `costwatch_rejected_events_total`.
    pub rejected_by_code: BTreeMap<&'static str, u64>,
}

/// Everything one flush writes, in one transaction. Kept per partition until written, so that
/// a fenced partition's share can be taken out and the rest written.
#[derive(Debug, Clone, Default)]
pub struct FlushBatch {
    /// One share per partition with anything new.
    pub parts: Vec<PartitionBatch>,
    /// Set after this batch's write failed with a permanent error: it is written again
    /// isolating the rows PostgreSQL refuses (see `Store::write`) instead of failing forever.
    pub isolate: bool,
}

impl FlushBatch {
    /// Whether no partition has anything to write.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Each partition's progress, in share order.
    pub fn progress(&self) -> impl Iterator<Item = &Progress> {
        self.parts.iter().map(|p| &p.progress)
    }

    /// The partitions the batch has a share of.
    pub fn partitions(&self) -> Vec<i32> {
        self.progress().map(|p| p.partition).collect()
    }

    /// Every rejected message of the batch, partition by partition.
    pub fn rejected(&self) -> impl Iterator<Item = &RejectedMessage> {
        self.parts.iter().flat_map(|p| &p.rejected)
    }

    /// Window sums merged over partitions and sorted by key, so concurrent writers lock rows in
    /// the same order and cannot deadlock.
    /// The keys are borrowed from the batch: a large batch's keys are not held twice.
    pub fn windows(&self) -> Vec<(&WindowKey, WindowSums)> {
        let mut merged: HashMap<&WindowKey, WindowSums> = HashMap::new();
        // Sums that cannot be merged exactly stay rows of their own (see `WindowSums::try_add`).
        let mut apart: Vec<(&WindowKey, WindowSums)> = Vec::new();
        for part in &self.parts {
            for (key, sums) in &part.windows {
                match merged.entry(key) {
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(*sums);
                    }
                    std::collections::hash_map::Entry::Occupied(mut kept) => {
                        if !kept.get_mut().try_merge(sums) {
                            apart.push((key, *sums));
                        }
                    }
                }
            }
        }
        let mut windows: Vec<(&WindowKey, WindowSums)> = merged.into_iter().chain(apart).collect();
        windows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        windows
    }

    /// The outcome counts summed over partitions.
    pub fn counts(&self) -> OutcomeCounts {
        let mut total = OutcomeCounts::default();
        for part in &self.parts {
            total.add(&part.counts);
        }
        total
    }

    /// Rejections by reason code, summed over partitions.
    pub fn rejected_by_code(&self) -> BTreeMap<&'static str, u64> {
        let mut total = BTreeMap::new();
        for part in &self.parts {
            for (code, n) in &part.rejected_by_code {
                *total.entry(*code).or_default() += n;
            }
        }
        total
    }

    /// Takes the given partitions' shares out; returns them as a batch of their own.
    pub fn split_off(&mut self, partitions: &[i32]) -> FlushBatch {
        let (taken, kept) = std::mem::take(&mut self.parts)
            .into_iter()
            .partition(|p| partitions.contains(&p.progress.partition));
        self.parts = kept;
        FlushBatch {
            parts: taken,
            isolate: self.isolate,
        }
    }
}

/// A pending window by number: its start and the number of its series (model, hardware and
/// label set) in the partition's [`Names`]. Hashing and comparing it costs no string work, and
/// adding an event to a window that already exists allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PendingKey {
    start_ms: i64,
    series: u32,
}

/// One (model, hardware, label set, basis) of a partition's pending windows.
#[derive(Debug)]
struct Series {
    model: ModelName,
    hardware: HardwareName,
    labels: Arc<Labels>,
    usage_from_tokens: bool,
    profile: Option<Arc<str>>,
}

/// The distinct series of a partition's pending windows, each kept once. Emptied at every flush
/// together with the windows that refer to it, so it never outgrows them.
#[derive(Debug, Default)]
struct Names {
    /// Looked up once per event, by the series' text.
    series: Table<Series>,
    /// Consulted only for a new series: windows with the same label set share one copy of it.
    labels: Table<Arc<Labels>>,
    /// Reused buffer for the lookup texts.
    scratch: String,
}

impl Names {
    fn key(&mut self, start_ms: i64, event: &UsageEventRef<'_>, profile: Option<&str>) -> PendingKey {
        // Names, label keys and values hold no NUL (validated), so NUL-separated parts (label
        // pairs sorted by key) name a series unambiguously; the labels come last, so their text
        // is the tail of the series' text. A series from tokens starts with NUL and its basis
        // (a model name never does), so measured series read as before.
        self.scratch.clear();
        match event.basis {
            Basis::Measured => {}
            Basis::NoProfile => self.scratch.push_str("\0-\0"),
            Basis::Profile(i) => {
                // The index in decimal, by hand: no formatting machinery per token event.
                let mut digits = [0u8; 5];
                let (mut n, mut at) = (i, digits.len());
                loop {
                    at -= 1;
                    digits[at] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                self.scratch.push('\0');
                self.scratch
                    .push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
                self.scratch.push('\0');
            }
        }
        for part in [&event.model, &event.hardware] {
            self.scratch.push_str(part);
            self.scratch.push('\0');
        }
        let labels_from = self.scratch.len();
        for (k, v) in &event.labels {
            for part in [k, v] {
                self.scratch.push_str(part);
                self.scratch.push('\0');
            }
        }
        let (series_text, labels_text) = (&self.scratch[..], &self.scratch[labels_from..]);
        let labels = &mut self.labels;
        let series = self.series.number(series_text, || {
            let valid = "validated by decode_ref";
            let shared = labels.number(labels_text, || {
                Arc::new(
                    event
                        .labels
                        .iter()
                        .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
                        .collect(),
                )
            });
            Series {
                model: ModelName::parse(event.model.as_ref()).expect(valid),
                hardware: HardwareName::parse(event.hardware.as_ref()).expect(valid),
                labels: labels.values[shared as usize].clone(),
                usage_from_tokens: event.basis.from_tokens(),
                profile: profile.map(Arc::from),
            }
        });
        PendingKey { start_ms, series }
    }

    fn window_key(&self, key: &PendingKey) -> WindowKey {
        let series = &self.series.values[key.series as usize];
        WindowKey {
            start_ms: key.start_ms,
            model: series.model.clone(),
            hardware: series.hardware.clone(),
            labels: series.labels.clone(),
            usage_from_tokens: series.usage_from_tokens,
            profile: series.profile.clone(),
        }
    }
}

#[derive(Debug)]
struct Table<T> {
    numbers: HashMap<Box<str>, u32>,
    values: Vec<T>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            numbers: HashMap::new(),
            values: Vec::new(),
        }
    }
}

impl<T> Table<T> {
    fn number(&mut self, text: &str, value: impl FnOnce() -> T) -> u32 {
        if let Some(&n) = self.numbers.get(text) {
            return n;
        }
        // At most one entry per pending window: far below u32::MAX.
        let n = self.values.len() as u32;
        self.values.push(value());
        self.numbers.insert(text.into(), n);
        n
    }
}

#[derive(Debug)]
struct PartitionState {
    epoch: i64,
    next_offset: Option<i64>,
    /// What PostgreSQL holds for this partition once the batch in flight (if any) lands: the
    /// offset the next batch applies on top of.
    stored_offset: Option<i64>,
    /// What PostgreSQL is known to hold: the offset of the last committed batch. Stays put
    /// while writes fail, which is what stall detection watches.
    committed_offset: Option<i64>,
    watermark_ms: Option<i64>,
    /// Event ids counted, with their event time; pruned once older than watermark minus the
    /// dedup horizon.
    seen: SeenSet,
    pending: HashMap<PendingKey, WindowSums>,
    /// Sums of a pending window that could not take another event exactly (more than 28
    /// digits): written as rows of their own, which PostgreSQL adds up exactly. Almost always
    /// empty.
    overflowed: Vec<(PendingKey, WindowSums)>,
    names: Names,
    rejected: Vec<RejectedMessage>,
    new_seen: SeenIds,
    counts: OutcomeCounts,
    rejected_by_code: BTreeMap<&'static str, u64>,
    /// Offsets advanced since the last flush (a rejected-only batch still moves the offset).
    dirty: bool,
    messages_since_flush: usize,
    /// Payload bytes read since the last flush, for `ingest.max_pending_bytes`.
    bytes_since_flush: usize,
    forget_before_ms: Option<i64>,
    /// Set until the first message shows the broker started where we asked.
    unverified_start: Option<StartCheck>,
}

impl PartitionState {
    fn from_claim(claim: Claim, rules: &IngestRules) -> Self {
        let watermark_ms = claim.watermark.map(|w| w.timestamp_millis());
        let horizon_start = watermark_ms.map(|w| w - rules.dedup_horizon_ms);
        let mut seen = SeenSet::new();
        for (id, t, content) in claim.seen.entries() {
            let ms = t.timestamp_millis();
            if horizon_start.is_none_or(|h| ms >= h) {
                seen.insert(id, ms, content);
            }
        }
        Self {
            epoch: claim.epoch,
            next_offset: claim.next_offset,
            stored_offset: claim.next_offset,
            committed_offset: claim.next_offset,
            watermark_ms,
            seen,
            pending: HashMap::new(),
            overflowed: Vec::new(),
            names: Names::default(),
            rejected: Vec::new(),
            new_seen: SeenIds::default(),
            counts: OutcomeCounts::default(),
            rejected_by_code: BTreeMap::new(),
            dirty: false,
            messages_since_flush: 0,
            bytes_since_flush: 0,
            forget_before_ms: None,
            unverified_start: claim.next_offset.filter(|n| *n > 0).map(StartCheck::before),
        }
    }

    /// Nothing of this partition is only in memory: every offset it read is in PostgreSQL.
    fn all_stored(&self) -> bool {
        !self.dirty && self.next_offset.is_some() && self.next_offset == self.stored_offset
    }

    /// This parked state, taken over again under a new epoch. Like a fresh claim, the
    /// partition is assigned a little before its offset and checked (see [`START_MARGIN`]).
    fn continued(mut self, epoch: i64) -> Self {
        self.epoch = epoch;
        self.unverified_start = self.next_offset.filter(|n| *n > 0).map(StartCheck::before);
        self
    }

    fn ingest(
        &mut self,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        rules: &IngestRules,
        source: Option<&Source>,
        now: DateTime<Utc>,
    ) -> Outcome {
        if let Some(rewind) = self.check_start(offset) {
            return rewind;
        }
        if self.next_offset.is_some_and(|next| offset < next) {
            return Outcome::AlreadyCounted;
        }
        self.next_offset = Some(offset + 1);
        self.dirty = true;
        self.messages_since_flush += 1;
        self.bytes_since_flush += payload.map_or(0, <[u8]>::len);

        if let Some(source) = source {
            return self.ingest_decoded(partition, offset, payload, rules, source, now);
        }
        // The id's dedup slot is fetched from memory while the rest of the event is validated.
        let mut digest = None;
        let seen = &self.seen;
        let decoded = event::decode_ref_with(payload, &rules.limits, now, |id| {
            let d = seen.digest(id);
            seen.prefetch(d);
            digest = Some(d);
        });
        let event = match decoded {
            Ok(event) => event,
            Err(rejection) => return self.reject(partition, offset, rejection, payload, rules),
        };
        self.accept(partition, offset, &event, digest, None, payload, rules, now)
    }

    /// A message of a mapped format: any number of events, each deduplicated and counted on its
    /// own (an OTLP export carries many spans); parts without usage are skipped and counted.
    /// The outcome is the first event's, or `Skipped` when there was none.
    fn ingest_decoded(
        &mut self,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        rules: &IngestRules,
        source: &Source,
        now: DateTime<Utc>,
    ) -> Outcome {
        let decoded = match source.decode(payload, &rules.limits, now) {
            Ok(decoded) => decoded,
            Err(rejection) => return self.reject(partition, offset, rejection, payload, rules),
        };
        self.counts.skipped += decoded.skipped;
        // Every event's dedup slot is fetched from memory at once, before the first is
        // counted: an OTLP export's spans wait for memory together rather than one by one.
        // (An early hook as native has was tried for the mapped formats: their decode after
        // the id is short next to the rest, and it measured no gain; BENCHMARKS, session 9.)
        let digests: SmallVec<[IdDigest; 4]> = decoded
            .events
            .iter()
            .flatten()
            .map(|event| {
                let d = self.seen.digest(&event.event_id);
                self.seen.prefetch(d);
                d
            })
            .collect();
        let mut digests = digests.into_iter();
        let mut first = None;
        for result in &decoded.events {
            let outcome = match result {
                Ok(event) => {
                    let profile = decoded.profile_name(event.basis);
                    self.accept(partition, offset, event, digests.next(), profile, payload, rules, now)
                }
                Err(rejection) => self.reject(partition, offset, rejection.clone(), payload, rules),
            };
            first.get_or_insert(outcome);
        }
        first.unwrap_or(Outcome::Skipped)
    }

    /// Dedups a valid event and adds it to its window.
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        partition: i32,
        offset: i64,
        event: &UsageEventRef<'_>,
        digest: Option<IdDigest>,
        profile: Option<&str>,
        payload: Option<&[u8]>,
        rules: &IngestRules,
        now: DateTime<Utc>,
    ) -> Outcome {
        let ts_ms = event.timestamp.timestamp_millis();
        // An event older than the dedup horizon cannot be checked against ids we have already
        // forgotten; it is still accepted (dedup is best effort beyond the horizon, by contract).
        let content = dedup::content_digest(event);
        let digest = digest.unwrap_or_else(|| self.seen.digest(&event.event_id));
        match self.seen.insert_digest(digest, ts_ms, content) {
            Insert::New => {}
            Insert::Duplicate => {
                self.counts.duplicate += 1;
                return Outcome::Duplicate;
            }
            Insert::Conflict => {
                let rejection = Rejection::new(
                    RejectCode::ConflictingDuplicate,
                    format!(
                        "event_id {} was already counted with different content; the first stays counted",
                        event::abbreviate(&event.event_id)
                    ),
                );
                return self.reject(partition, offset, rejection, payload, rules);
            }
        }
        self.new_seen.push(&event.event_id, ts_ms, content);

        let late = self.watermark_ms.is_some_and(|w| ts_ms < w - rules.allowed_lateness_ms);
        // The watermark never runs ahead of this host's clock: one producer stamping minutes
        // ahead (within `max_future_skew`) would otherwise finalise windows early and make
        // everyone else's on-time events late. Its event still counts in its own window.
        let advance = ts_ms.min(now.timestamp_millis());
        self.watermark_ms = Some(self.watermark_ms.map_or(advance, |w| w.max(advance)));

        let key = self.names.key(rules.window.start_of(event.timestamp), event, profile);
        let sums = self
            .pending
            .entry(key)
            .or_insert_with(|| WindowSums::starting_at(partition, offset));
        if !sums.try_add_with_tokens(event.compute, event.storage, event.tokens) {
            // The window's pending sum would need more than 28 digits: keep it as a row of its
            // own and start afresh; one event always fits (the precision contract).
            let full = std::mem::replace(sums, WindowSums::starting_at(partition, offset));
            self.overflowed.push((key, full));
            let added = sums.try_add_with_tokens(event.compute, event.storage, event.tokens);
            debug_assert!(added, "one validated event always fits");
        }
        self.counts.accepted += 1;
        if late {
            sums.late_events += 1;
            self.counts.late += 1;
        }
        Outcome::Accepted { late }
    }

    /// The first message after an assignment: a rewind if the broker started past the offset
    /// we asked for. Some brokers (tansu 0.6) serve only batches whose *base* offset is at or
    /// after the fetch offset, silently skipping the rest of the batch that holds it. Ask again
    /// from further back and skip what is already counted; a gap that survives a rewind to 0 is
    /// a real one (compaction, transaction markers).
    fn check_start(&mut self, offset: i64) -> Option<Outcome> {
        let rewind = self.unverified_start.as_mut()?;
        if offset > rewind.next && rewind.from > 0 {
            rewind.step = rewind.step.saturating_mul(10);
            rewind.from = (rewind.next - rewind.step).max(0);
            return Some(Outcome::Rewind { to: rewind.from });
        }
        self.unverified_start = None;
        None
    }

    /// Keeps a rejected message (bounded, see [`RejectedMessage::new`]) for `rejected_events`.
    fn reject(
        &mut self,
        partition: i32,
        offset: i64,
        rejection: Rejection,
        payload: Option<&[u8]>,
        rules: &IngestRules,
    ) -> Outcome {
        let code = rejection.code;
        self.counts.rejected += 1;
        *self.rejected_by_code.entry(code.as_str()).or_default() += 1;
        self.rejected.push(RejectedMessage::new(
            partition,
            offset,
            rejection,
            payload.unwrap_or_default(),
            rules.max_rejected_payload_bytes,
        ));
        Outcome::Rejected(code)
    }

    /// Forgets dedup entries that fell out of the horizon, and notes the cut-off for the flush
    /// (`forget_before`), so their stored rows go too.
    fn prune_seen(&mut self, rules: &IngestRules) {
        let Some(w) = self.watermark_ms else { return };
        let cutoff = w - rules.dedup_horizon_ms;
        self.seen.retain_from(cutoff);
        self.forget_before_ms = Some(cutoff);
    }

    /// The pending windows under their full keys; empties them and the names they used.
    fn take_windows(&mut self) -> PendingWindows {
        let names = &self.names;
        let windows = self
            .pending
            .drain()
            .chain(self.overflowed.drain(..))
            .map(|(key, sums)| (names.window_key(&key), sums))
            .collect();
        self.names = Names::default();
        windows
    }

    /// Moves the pending state out into a batch share (None when nothing moved).
    fn take_part(&mut self, partition: i32, prune: bool, rules: &IngestRules) -> Option<PartitionBatch> {
        if !self.dirty {
            return None;
        }
        let next_offset = self.next_offset?;
        if prune {
            self.prune_seen(rules);
        }
        let part = PartitionBatch {
            progress: Progress {
                partition,
                epoch: self.epoch,
                prev_offset: self.stored_offset,
                next_offset,
                watermark: self.watermark_ms.map(from_millis),
                forget_before: self.forget_before_ms.take().map(from_millis),
            },
            windows: self.take_windows(),
            rejected: std::mem::take(&mut self.rejected),
            seen: std::mem::take(&mut self.new_seen),
            counts: std::mem::take(&mut self.counts),
            rejected_by_code: std::mem::take(&mut self.rejected_by_code),
        };
        self.dirty = false;
        self.messages_since_flush = 0;
        self.bytes_since_flush = 0;
        // The next batch applies on top of this one: batches are written strictly in order.
        self.stored_offset = Some(next_offset);
        Some(part)
    }
}

/// The partitions this instance owns and their unflushed state.
#[derive(Debug)]
pub struct Aggregator {
    rules: IngestRules,
    /// How messages are read when not in costwatch's own format (`None`: the native decoder).
    source: Option<Arc<Source>>,
    partitions: BTreeMap<i32, PartitionState>,
    flushes_since_prune: u32,
    /// A batch whose write failed (or whose COMMIT outcome is unknown): written again, as it
    /// is, before anything newer.
    in_flight: Option<FlushBatch>,
    /// Revoked partitions with nothing unflushed, until the next assignment ([`Aggregator::park`]).
    parked: BTreeMap<i32, PartitionState>,
}

/// Dedup entries are pruned every this many flushes; pruning is O(entries), flushing is frequent.
const PRUNE_EVERY_FLUSHES: u32 = 30;

impl Aggregator {
    /// An aggregator that owns no partition yet.
    pub fn new(rules: IngestRules) -> Self {
        Self::for_source(rules, None)
    }

    /// An aggregator for a source's messages; a costwatch-format source (or `None`) is decoded
    /// by the native decoder.
    pub fn for_source(rules: IngestRules, source: Option<Arc<Source>>) -> Self {
        Self {
            rules,
            source: source.filter(|s| !s.is_native()),
            partitions: BTreeMap::new(),
            flushes_since_prune: 0,
            in_flight: None,
            parked: BTreeMap::new(),
        }
    }

    /// The rules it applies.
    pub fn rules(&self) -> &IngestRules {
        &self.rules
    }

    /// Takes over partitions as PostgreSQL described them; any older state for them is dropped.
    /// A continued claim picks up the partition's parked state (its dedup set above all); parked
    /// partitions that were not assigned again are forgotten.
    pub fn assign(&mut self, claims: Vec<Claim>) {
        for claim in claims {
            let partition = claim.partition;
            let state = match self.parked.remove(&partition) {
                Some(parked) if claim.continued => parked.continued(claim.epoch),
                _ => PartitionState::from_claim(claim, &self.rules),
            };
            self.partitions.insert(partition, state);
        }
        self.parked.clear();
    }

    /// Revoked partitions whose state is all in PostgreSQL (their flush committed) are kept
    /// aside rather than dropped: an eager rebalance revokes every partition and usually hands
    /// most of them straight back, and a partition's dedup set is the costly part to load again
    /// (in proportion to the ids inside the horizon). Partitions with anything unflushed are
    /// dropped as by [`Aggregator::drop_partitions`].
    pub fn park(&mut self, partitions: &[i32]) {
        for (p, state) in self.remove_partitions(partitions) {
            if state.all_stored() {
                self.parked.insert(p, state);
            }
        }
    }

    /// The parked partitions with the epoch and offset they were parked at, for the next claim.
    pub fn parked(&self) -> Vec<(i32, i64, i64)> {
        self.parked
            .iter()
            .filter_map(|(&p, s)| Some((p, s.epoch, s.next_offset?)))
            .collect()
    }

    /// Drops partitions and their unflushed state (their offsets were not stored either, so the
    /// next owner counts those messages again: nothing is lost or doubled).
    pub fn drop_partitions(&mut self, partitions: &[i32]) {
        self.remove_partitions(partitions);
    }

    /// Takes `partitions` out of this instance, their share of a batch in flight included.
    fn remove_partitions(&mut self, partitions: &[i32]) -> Vec<(i32, PartitionState)> {
        if let Some(batch) = self.in_flight.as_mut() {
            batch.split_off(partitions);
        }
        partitions
            .iter()
            .filter_map(|&p| Some((p, self.partitions.remove(&p)?)))
            .collect()
    }

    /// How many partitions this instance owns now (parked ones not included).
    pub fn owned_count(&self) -> usize {
        self.partitions.len()
    }

    /// Event ids remembered for dedup, over owned partitions.
    pub fn dedup_ids(&self) -> usize {
        self.partitions.values().map(|p| p.seen.len()).sum()
    }

    /// Decodes, validates, dedups and adds one message of `partition` at `offset`. `now` is the validation clock (future skew, maximum age, the watermark's ceiling); A `None` payload (tombstone) is rejected as `empty_payload`.
    pub fn ingest(&mut self, partition: i32, offset: i64, payload: Option<&[u8]>, now: DateTime<Utc>) -> Outcome {
        match self.partitions.get_mut(&partition) {
            Some(state) => state.ingest(partition, offset, payload, &self.rules, self.source.as_deref(), now),
            None => Outcome::NotOwned,
        }
    }

    /// Each owned partition with the next offset it will count.
    pub fn positions(&self) -> Vec<(i32, Option<i64>)> {
        self.partitions.iter().map(|(p, s)| (*p, s.next_offset)).collect()
    }

    /// Where to read each partition again from after consumption was paused: a little before
    /// the next offset to count, checked like a fresh assignment. librdkafka resumes a paused
    /// partition at the message after the last one it delivered, which is usually inside a
    /// record batch, and tansu 0.6 answers a fetch from inside a batch with the *next* batch:
    /// the rest of the batch would be skipped (see [`START_MARGIN`]).
    pub fn resume_points(&mut self) -> Vec<(i32, i64)> {
        self.partitions
            .iter_mut()
            .filter_map(|(&p, state)| {
                let next = state.next_offset.filter(|n| *n > 0)?;
                let check = StartCheck::before(next);
                state.unverified_start = Some(check);
                Some((p, check.from))
            })
            .collect()
    }

    /// Messages taken in since the last flush, over all partitions.
    pub fn pending_messages(&self) -> usize {
        self.partitions.values().map(|p| p.messages_since_flush).sum()
    }

    /// Payload bytes taken in since the last flush, over all partitions.
    pub fn pending_bytes(&self) -> usize {
        self.partitions.values().map(|p| p.bytes_since_flush).sum()
    }

    /// The smallest watermark over owned partitions that have one.
    pub fn watermark(&self) -> Option<DateTime<Utc>> {
        self.partitions
            .values()
            .filter_map(|p| p.watermark_ms)
            .min()
            .map(from_millis)
    }

    /// The next batch to write: the one in flight if a write failed, else the pending state
    /// of `only` those partitions (all when `None`), moved out of the partitions. Hand it back
    /// with [`Aggregator::failed`] or [`Aggregator::flushed`].
    pub fn batch(&mut self, only: Option<&[i32]>) -> FlushBatch {
        if let Some(batch) = self.in_flight.take() {
            return batch;
        }
        let prune = self.flushes_since_prune >= PRUNE_EVERY_FLUSHES;
        let rules = self.rules;
        let parts = self
            .partitions
            .iter_mut()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .filter_map(|(&p, state)| state.take_part(p, prune, &rules))
            .collect();
        FlushBatch { parts, isolate: false }
    }

    /// A write failed: keep the batch to write again, unchanged, before anything newer.
    pub fn failed(&mut self, batch: FlushBatch) {
        self.in_flight = Some(batch);
    }

    /// Each owned partition with the offset PostgreSQL is known to hold for it.
    pub fn committed_positions(&self) -> Vec<(i32, Option<i64>)> {
        self.partitions.iter().map(|(p, s)| (*p, s.committed_offset)).collect()
    }

    /// A batch was committed.
    pub fn flushed(&mut self, batch: &FlushBatch) {
        for p in batch.progress() {
            if let Some(state) = self.partitions.get_mut(&p.partition) {
                if state.epoch == p.epoch {
                    state.committed_offset = Some(p.next_offset);
                }
            }
        }
        self.flushes_since_prune = if batch.progress().any(|p| p.forget_before.is_some()) {
            0
        } else {
            self.flushes_since_prune + 1
        };
    }
}

/// Converts a std duration to whole milliseconds for the rules.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> IngestRules {
        IngestRules {
            max_rejected_payload_bytes: 4096,
            limits: Limits {
                max_event_bytes: 4096,
                max_future_skew: Duration::from_secs(300),
                max_event_age: Duration::from_secs(7 * 86400),
            },
            window: WindowSize::new(Duration::from_secs(60)),
            allowed_lateness_ms: 5 * 60_000,
            dedup_horizon_ms: 3_600_000,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-29T04:00:00Z".parse().unwrap()
    }

    fn event(id: &str, ts: &str, compute: &str) -> Vec<u8> {
        format!(
            r#"{{"event_id":"{id}","timestamp":"{ts}","model":"m","hardware":"h","compute":{compute},"storage":1}}"#
        )
        .into_bytes()
    }

    /// A partition that was never counted, claimed for the first time.
    fn new_claim(partition: i32) -> Claim {
        Claim {
            partition,
            epoch: 1,
            next_offset: None,
            watermark: None,
            seen: SeenIds::default(),
            continued: false,
        }
    }

    fn fresh(partition: i32) -> Aggregator {
        let mut a = Aggregator::new(rules());
        a.assign(vec![new_claim(partition)]);
        a
    }

    #[test]
    fn packed_ids_round_trip() {
        let ids = ["a", "req-7f3a", &"é".repeat(128)];
        let first_ms = 1_764_385_200_123;
        let mut seen = SeenIds::default();
        for (i, id) in ids.iter().enumerate() {
            seen.push(id, first_ms + i as i64, 1);
        }
        let want: Vec<(&str, DateTime<Utc>)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, from_millis(first_ms + i as i64)))
            .collect();
        assert_eq!(seen.iter().collect::<Vec<_>>(), want);
        assert_eq!(seen.newest(), Some(from_millis(first_ms + 2)));
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn a_label_set_is_one_window_whatever_the_order_and_names_start_over_after_a_flush() {
        let mut a = fresh(0);
        let with_labels = |id: &str, labels: &str| {
            format!(
                r#"{{"event_id":"{id}","timestamp":"2026-11-29T03:00:00Z","model":"m","hardware":"h","compute":1,"storage":1,"labels":{labels}}}"#
            )
            .into_bytes()
        };
        a.ingest(0, 0, Some(&with_labels("a", r#"{"team":"x","env":"prod"}"#)), now());
        a.ingest(0, 1, Some(&with_labels("b", r#"{"env":"prod","team":"x"}"#)), now());
        a.ingest(0, 2, Some(&with_labels("c", r#"{"env":"prod"}"#)), now());
        a.ingest(0, 3, Some(&event("d", "2026-11-29T03:00:00Z", "1")), now());
        let batch = a.batch(None);
        let windows = batch.windows();
        let events: Vec<(Vec<(&str, &str)>, i64)> = windows
            .iter()
            .map(|(k, s)| {
                (
                    k.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
                    s.events,
                )
            })
            .collect();
        assert_eq!(
            events,
            vec![
                (vec![], 1),
                (vec![("env", "prod")], 1),
                (vec![("env", "prod"), ("team", "x")], 2)
            ]
        );
        a.ingest(0, 4, Some(&with_labels("e", r#"{"team":"y"}"#)), now());
        let batch = a.batch(None);
        let next = batch.windows();
        assert_eq!(next.len(), 1);
        assert_eq!(*next[0].0.labels, Labels::from([("team".to_owned(), "y".to_owned())]));
        assert_eq!((next[0].0.model.as_str(), next[0].0.hardware.as_str()), ("m", "h"));
    }

    #[test]
    fn duplicates_are_counted_once() {
        let mut a = fresh(0);
        let e = event("a", "2026-11-29T03:00:00Z", "1.5");
        assert_eq!(a.ingest(0, 0, Some(&e), now()), Outcome::Accepted { late: false });
        assert_eq!(a.ingest(0, 1, Some(&e), now()), Outcome::Duplicate);
        let batch = a.batch(None);
        assert_eq!(batch.windows().len(), 1);
        assert_eq!(batch.windows()[0].1.events, 1);
        assert_eq!(batch.windows()[0].1.compute.to_string(), "1.5");
        assert_eq!(batch.parts[0].progress.next_offset, 2);
    }

    #[test]
    fn ids_stored_before_content_digests_read_back_with_unknown_content() {
        // The packed form of earlier versions: u16 length (no flag bit), the id, i64 millis.
        let mut old = Vec::new();
        for (id, ms) in [("a", 1_000i64), ("bc", 2_000)] {
            old.extend_from_slice(&(id.len() as u16).to_be_bytes());
            old.extend_from_slice(id.as_bytes());
            old.extend_from_slice(&ms.to_be_bytes());
        }
        let mut now = SeenIds::default();
        now.push("d", 3_000, 42);
        old.extend_from_slice(now.as_bytes());
        let read: Vec<(String, i64, u64)> = decode_ids(&old)
            .map(|(id, t, c)| (id.to_owned(), t.timestamp_millis(), c))
            .collect();
        assert_eq!(
            read,
            vec![
                ("a".into(), 1_000, UNKNOWN_CONTENT),
                ("bc".into(), 2_000, UNKNOWN_CONTENT),
                ("d".into(), 3_000, 42)
            ]
        );
    }

    #[test]
    fn pending_bytes_count_every_payload_read_until_the_batch_is_taken() {
        let mut a = fresh(0);
        let good = event("a", "2026-11-29T03:00:00Z", "1");
        let bad = vec![b'x'; 10_000];
        a.ingest(0, 0, Some(&good), now());
        a.ingest(0, 1, Some(&bad), now());
        assert_eq!(a.pending_bytes(), good.len() + 10_000);
        let batch = a.batch(None);
        assert_eq!(a.pending_bytes(), 0);
        // The rejected message keeps its first 4096 bytes, its size and its digest.
        let kept = &batch.parts[0].rejected[0];
        assert_eq!((kept.payload.len(), kept.payload_size), (4096, 10_000));
    }

    #[test]
    fn a_truncated_text_payload_is_cut_at_a_character_boundary() {
        let text = "é".repeat(10);
        let r = RejectedMessage::new(0, 0, Rejection::new(RejectCode::Oversized, "x"), text.as_bytes(), 5);
        assert_eq!(r.payload, "éé".as_bytes());
        assert!(r.is_text());
        assert_eq!(r.payload_size, 20);
    }

    #[test]
    fn the_watermark_stops_at_the_clock_for_an_event_stamped_ahead() {
        let mut a = fresh(0);
        // now() is 04:00; an event at 04:04 is inside the 5 minute skew.
        a.ingest(0, 0, Some(&event("ahead", "2026-11-29T04:04:00Z", "1")), now());
        assert_eq!(a.watermark(), Some(now()));
        // An on-time event is not late because of it.
        assert_eq!(
            a.ingest(0, 1, Some(&event("on-time", "2026-11-29T03:59:30Z", "1")), now()),
            Outcome::Accepted { late: false }
        );
    }

    #[test]
    fn a_restart_remembers_ids_inside_the_horizon() {
        let mut a = Aggregator::new(rules());
        a.assign(vec![Claim {
            epoch: 2,
            next_offset: Some(10),
            watermark: Some("2026-11-29T03:30:00Z".parse().unwrap()),
            seen: {
                let mut seen = SeenIds::default();
                // Stored by a version without content digests: duplicates only, never conflicts.
                seen.push("inside", 1_795_921_200_000, UNKNOWN_CONTENT); // 03:00
                seen.push("outside", 1_795_917_600_000, UNKNOWN_CONTENT); // 02:00
                seen
            },
            ..new_claim(3)
        }]);
        assert_eq!(
            a.ingest(3, 9, Some(&event("x", "2026-11-29T03:00:00Z", "1")), now()),
            Outcome::AlreadyCounted
        );
        assert_eq!(
            a.ingest(3, 10, Some(&event("inside", "2026-11-29T03:00:00Z", "1")), now()),
            Outcome::Duplicate
        );
        assert_eq!(
            a.ingest(3, 11, Some(&event("outside", "2026-11-29T03:00:00Z", "1")), now()),
            Outcome::Accepted { late: true }
        );
    }

    /// The claim PostgreSQL would return for a partition this instance parked at `epoch`.
    fn continued_claim(partition: i32, epoch: i64, next_offset: i64) -> Claim {
        Claim {
            next_offset: Some(next_offset),
            epoch,
            continued: true,
            ..new_claim(partition)
        }
    }

    #[test]
    fn a_partition_handed_straight_back_keeps_its_dedup_set_without_reloading_it() {
        let mut a = fresh(0);
        a.ingest(0, 0, Some(&event("a", "2026-11-29T03:00:00Z", "1")), now());
        let batch = a.batch(None);
        a.flushed(&batch);
        a.park(&[0]);
        assert_eq!(a.owned_count(), 0);
        assert_eq!(a.parked(), vec![(0, 1, 1)]);
        // Back at the next epoch, its ids not loaded: "a" is still known, the offset is kept and
        // checked like any assignment.
        a.assign(vec![continued_claim(0, 2, 1)]);
        assert_eq!(a.parked(), vec![]);
        assert_eq!(
            a.ingest(0, 0, Some(&event("a", "2026-11-29T03:00:00Z", "1")), now()),
            Outcome::AlreadyCounted
        );
        assert_eq!(
            a.ingest(0, 1, Some(&event("a", "2026-11-29T03:00:00Z", "1")), now()),
            Outcome::Duplicate
        );
        let batch = a.batch(None);
        assert_eq!(batch.parts[0].progress.epoch, 2);
        assert_eq!(batch.parts[0].progress.prev_offset, Some(1));
    }

    #[test]
    fn a_partition_with_unflushed_state_or_claimed_elsewhere_meanwhile_starts_from_postgres() {
        let mut a = fresh(0);
        a.ingest(0, 0, Some(&event("a", "2026-11-29T03:00:00Z", "1")), now());
        // Revoked with its event not flushed: nothing is parked.
        a.park(&[0]);
        assert_eq!(a.parked(), vec![]);

        let mut a = fresh(0);
        a.ingest(0, 0, Some(&event("a", "2026-11-29T03:00:00Z", "1")), now());
        let batch = a.batch(None);
        a.flushed(&batch);
        a.park(&[0]);
        // Someone else held it in between (the claim is not continued): the parked state is
        // forgotten and the claim's ids (here: none) are what counts.
        a.assign(vec![Claim {
            epoch: 3,
            next_offset: Some(1),
            ..new_claim(0)
        }]);
        assert_eq!(
            a.ingest(0, 1, Some(&event("a", "2026-11-29T03:00:00Z", "1")), now()),
            Outcome::Accepted { late: false }
        );
        // A parked partition not assigned again is forgotten at the next assignment.
        let mut b = fresh(1);
        let batch = {
            b.ingest(1, 0, Some(&event("x", "2026-11-29T03:00:00Z", "1")), now());
            b.batch(None)
        };
        b.flushed(&batch);
        b.park(&[1]);
        b.assign(vec![new_claim(2)]);
        assert_eq!(b.parked(), vec![]);
    }

    #[test]
    fn late_event_is_accounted_into_its_own_window() {
        let mut a = fresh(0);
        a.ingest(0, 0, Some(&event("new", "2026-11-29T03:50:00Z", "1")), now());
        let late = a.ingest(0, 1, Some(&event("old", "2026-11-29T03:40:00Z", "2")), now());
        assert_eq!(late, Outcome::Accepted { late: true });
        let batch = a.batch(None);
        let windows = batch.windows();
        let old = windows
            .iter()
            .find(|(k, _)| from_millis(k.start_ms) == "2026-11-29T03:40:00Z".parse::<DateTime<Utc>>().unwrap())
            .unwrap();
        assert_eq!((old.1.events, old.1.late_events), (1, 1));
        assert_eq!(batch.counts().late, 1);
    }

    #[test]
    fn a_start_past_the_stored_offset_rewinds_until_it_is_covered() {
        let mut a = Aggregator::new(rules());
        a.assign(vec![Claim {
            next_offset: Some(50_000),
            ..new_claim(0)
        }]);
        // Assigned at 40 000 (START_MARGIN before), yet the broker answered from past 50 000.
        let e = event("a", "2026-11-29T03:00:00Z", "1");
        assert_eq!(start_offset(50_000), 40_000);
        assert_eq!(a.ingest(0, 50_004, Some(&e), now()), Outcome::Rewind { to: 0 });
        assert_eq!(a.ingest(0, 30_000, Some(&e), now()), Outcome::AlreadyCounted);
        assert_eq!(a.ingest(0, 50_000, Some(&e), now()), Outcome::Accepted { late: false });
        assert_eq!(a.batch(None).parts[0].progress.next_offset, 50_001);
    }

    #[test]
    fn a_gap_that_survives_a_start_at_zero_is_real() {
        let mut a = Aggregator::new(rules());
        a.assign(vec![Claim {
            next_offset: Some(50),
            ..new_claim(0)
        }]);
        // Assigned at 0 already (50 is within the margin): a later first message is a real gap.
        let e = event("a", "2026-11-29T03:00:00Z", "1");
        assert_eq!(a.ingest(0, 60, Some(&e), now()), Outcome::Accepted { late: false });
    }

    #[test]
    fn a_failed_batch_is_written_again_unchanged_before_anything_newer() {
        let mut a = fresh(0);
        a.ingest(0, 0, Some(&event("a", "2026-11-29T03:00:01Z", "1")), now());
        let first = a.batch(None);
        assert_eq!(first.parts[0].progress.prev_offset, None);
        a.failed(first.clone());
        a.ingest(0, 1, Some(&event("b", "2026-11-29T03:00:02Z", "2")), now());
        let again = a.batch(None);
        assert_eq!(again.parts[0].progress, first.parts[0].progress);
        assert_eq!(again.windows(), first.windows());
        a.flushed(&again);
        let next = a.batch(None);
        assert_eq!(next.parts[0].progress.prev_offset, Some(1));
        assert_eq!(next.parts[0].progress.next_offset, 2);
        assert_eq!(next.windows()[0].1.compute.to_string(), "2");
    }

    #[test]
    fn dropping_a_partition_takes_its_share_out_of_the_batch_in_flight() {
        let mut a = fresh(0);
        a.assign(vec![new_claim(1)]);
        a.ingest(0, 0, Some(&event("a", "2026-11-29T03:00:01Z", "1")), now());
        a.ingest(1, 0, Some(&event("b", "2026-11-29T03:00:01Z", "2")), now());
        let batch = a.batch(None);
        a.failed(batch);
        a.drop_partitions(&[1]);
        let again = a.batch(None);
        assert_eq!(again.partitions(), vec![0]);
        assert_eq!(again.windows()[0].1.compute.to_string(), "1");
    }

    #[test]
    fn rejections_move_the_offset_and_keep_the_payload() {
        let mut a = fresh(1);
        assert_eq!(
            a.ingest(1, 5, Some(b"nope"), now()),
            Outcome::Rejected(RejectCode::MalformedJson)
        );
        let batch = a.batch(None);
        assert_eq!(batch.parts[0].progress.next_offset, 6);
        assert_eq!(batch.parts[0].rejected[0].payload, b"nope");
        assert!(batch.windows().is_empty());
    }

    #[test]
    fn windows_merge_across_partitions_and_clear_after_flush() {
        let mut a = fresh(0);
        a.assign(vec![new_claim(1)]);
        a.ingest(0, 0, Some(&event("a", "2026-11-29T03:00:01Z", "0.1")), now());
        a.ingest(1, 0, Some(&event("b", "2026-11-29T03:00:02Z", "0.2")), now());
        let batch = a.batch(None);
        assert_eq!(batch.windows().len(), 1);
        assert_eq!(batch.windows()[0].1.compute.to_string(), "0.3");
        a.flushed(&batch);
        assert!(a.batch(None).is_empty());
        assert_eq!(a.pending_messages(), 0);
    }
}
