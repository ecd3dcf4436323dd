//! Event-time tumbling windows: which window an event belongs to, and the per-window sums that
//! accumulate between two flushes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::domain::{ComputeUnits, HardwareName, ModelName, StorageUnits};
use crate::ingest::event::{Labels, Tokens};

/// Window width in whole milliseconds (validated at startup to be whole seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize(i64);

impl WindowSize {
    /// A window size from the configured duration, at least 1 ms (sub-millisecond parts are dropped).
    pub fn new(size: Duration) -> Self {
        Self((size.as_millis() as i64).max(1))
    }

    /// The width in milliseconds.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// The start of the window `ts` falls in. Windows are aligned to the Unix epoch, so every
    /// instance (and every restart) assigns an event to the same window.
    pub fn start_of(self, ts: DateTime<Utc>) -> i64 {
        let ms = ts.timestamp_millis();
        // rem_euclid keeps pre-1970 timestamps in the window before, not after, their instant.
        ms - ms.rem_euclid(self.0)
    }
}

/// Converts epoch milliseconds back to a timestamp (always in range for validated events).
pub fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// One row of `usage_costs` before pricing: a window, a pair, and a label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    /// The window's start, in Unix milliseconds (a multiple of the window size).
    pub start_ms: i64,
    /// The model the usage is for.
    pub model: ModelName,
    /// The hardware the usage ran on.
    pub hardware: HardwareName,
    /// Shared: every window of a label set refers to one copy (a map's node is about 500 bytes,
    /// and a flush can hold tens of thousands of keys).
    pub labels: Arc<Labels>,
    /// T and S were derived from tokens (`window_usage.usage_from_tokens`): by `profile`, or
    /// unknown when it is `None`.
    pub usage_from_tokens: bool,
    /// The usage profile that derived T and S (`window_usage.profile`).
    pub profile: Option<Arc<str>>,
}

/// Usage summed over a key since the last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSums {
    /// Accepted events summed in.
    pub events: i64,
    /// How many of them were late (older than the watermark minus the allowed lateness).
    pub late_events: i64,
    /// ΣT; exact.
    pub compute: ComputeUnits,
    /// ΣS; exact.
    pub storage: StorageUnits,
    /// Σ input tokens; exact (zero for events without tokens).
    pub input_tokens: rust_decimal::Decimal,
    /// Σ output tokens; exact.
    pub output_tokens: rust_decimal::Decimal,
    /// The earliest (partition, offset) that contributed: names these sums in `rejected_events`
    /// should PostgreSQL ever refuse to store them (see `Store::write`). Distinct per sums of one
    /// batch, since every message adds to exactly one window.
    pub origin: (i32, i64),
}

impl Default for WindowSums {
    fn default() -> Self {
        Self {
            events: 0,
            late_events: 0,
            compute: ComputeUnits::default(),
            storage: StorageUnits::default(),
            input_tokens: rust_decimal::Decimal::ZERO,
            output_tokens: rust_decimal::Decimal::ZERO,
            origin: (i32::MAX, i64::MAX),
        }
    }
}

impl WindowSums {
    /// Empty sums that the message at `offset` of `partition` is the first to add to.
    pub fn starting_at(partition: i32, offset: i64) -> Self {
        Self {
            origin: (partition, offset),
            ..Self::default()
        }
    }

    /// Adds one event's usage if both sums stay exact; false (and nothing changed) when either
    /// would need more digits than a 96-bit decimal holds.
    pub fn try_add(&mut self, compute: ComputeUnits, storage: StorageUnits) -> bool {
        self.try_add_with_tokens(compute, storage, Tokens::default())
    }

    /// [`WindowSums::try_add`] with the event's tokens: all four sums exact, or nothing changed.
    pub fn try_add_with_tokens(&mut self, compute: ComputeUnits, storage: StorageUnits, tokens: Tokens) -> bool {
        let (Some(c), Some(s)) = (
            exact_sum(self.compute.value(), compute.value()),
            exact_sum(self.storage.value(), storage.value()),
        ) else {
            return false;
        };
        if !tokens.is_zero() {
            let (Some(i), Some(o)) = (
                exact_sum(self.input_tokens, tokens.input),
                exact_sum(self.output_tokens, tokens.output),
            ) else {
                return false;
            };
            self.input_tokens = i;
            self.output_tokens = o;
        }
        self.compute = ComputeUnits(c);
        self.storage = StorageUnits(s);
        self.events += 1;
        true
    }

    /// Merges `other` in if every sum stays exact; false (and nothing changed) otherwise.
    pub fn try_merge(&mut self, other: &WindowSums) -> bool {
        let (Some(c), Some(s), Some(i), Some(o)) = (
            exact_sum(self.compute.value(), other.compute.value()),
            exact_sum(self.storage.value(), other.storage.value()),
            exact_sum(self.input_tokens, other.input_tokens),
            exact_sum(self.output_tokens, other.output_tokens),
        ) else {
            return false;
        };
        self.compute = ComputeUnits(c);
        self.storage = StorageUnits(s);
        self.input_tokens = i;
        self.output_tokens = o;
        self.events += other.events;
        self.late_events += other.late_events;
        self.origin = self.origin.min(other.origin);
        true
    }
}

/// `a + b` when it is exact. rust_decimal rounds a sum that needs more than 96 bits of mantissa
/// by lowering its scale (`1e18 + 1e-10` twice over would lose digits silently); a result whose
/// scale is below either operand's may have been rounded, so it is refused rather than trusted.
pub fn exact_sum(a: rust_decimal::Decimal, b: rust_decimal::Decimal) -> Option<rust_decimal::Decimal> {
    let sum = a.checked_add(b)?;
    (sum.scale() >= a.scale().max(b.scale())).then_some(sum)
}

/// Pending sums of one partition's flush, under their full keys. A key appears more than once
/// only when its sums could not be added exactly in memory (see [`WindowSums::try_add`]);
/// PostgreSQL adds such rows up exactly (numeric).
pub type PendingWindows = Vec<(WindowKey, WindowSums)>;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let minute = WindowSize::new(Duration::from_secs(60));
        let start = minute.start_of(at("2026-11-29T03:00:59.999Z"));
        assert_eq!(from_millis(start), at("2026-11-29T03:00:00Z"));
        assert_eq!(minute.start_of(at("2026-11-29T03:01:00Z")), start + 60_000);
    }

    #[test]
    fn sums_that_would_be_rounded_are_refused_not_rounded() {
        let d = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap();
        let mut sums = WindowSums::starting_at(0, 7);
        assert!(sums.try_add(ComputeUnits(d("1000000000000000000")), StorageUnits(d("1"))));
        assert!(sums.try_add(ComputeUnits(d("0.0000000001")), StorageUnits(d("1"))));
        assert_eq!(sums.compute.to_string(), "1000000000000000000.0000000001");
        // 7.9e28 units of 1e-10 is all a 96-bit mantissa holds: the eighth 1e18 would round.
        for _ in 0..6 {
            assert!(sums.try_add(ComputeUnits(d("1000000000000000000")), StorageUnits(d("0"))));
        }
        let before = sums;
        assert!(!sums.try_add(ComputeUnits(d("1000000000000000000")), StorageUnits(d("0"))));
        assert_eq!(sums, before, "a refused add changes nothing");
        assert_eq!(sums.events, 8);
        assert_eq!(sums.origin, (0, 7));
    }

    #[test]
    fn pre_epoch_timestamps_floor_downwards() {
        let minute = WindowSize::new(Duration::from_secs(60));
        assert_eq!(minute.start_of(at("1969-12-31T23:59:30Z")), -60_000);
    }
}
