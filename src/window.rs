//! Event-time tumbling windows: which window an event belongs to, and the per-window sums that
//! accumulate between two flushes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::domain::{ComputeUnits, HardwareName, ModelName, StorageUnits};
use crate::event::Labels;

/// Window width in whole milliseconds (validated at startup to be whole seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize(i64);

impl WindowSize {
    pub fn new(size: Duration) -> Self {
        Self((size.as_millis() as i64).max(1))
    }

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
    pub start_ms: i64,
    pub model: ModelName,
    pub hardware: HardwareName,
    /// Shared: every window of a label set refers to one copy (a map's node is about 500 bytes,
    /// and a flush can hold tens of thousands of keys).
    pub labels: Arc<Labels>,
}

/// Usage summed over a key since the last flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowSums {
    pub events: i64,
    pub late_events: i64,
    pub compute: ComputeUnits,
    pub storage: StorageUnits,
}

impl WindowSums {
    pub fn merge(&mut self, other: &WindowSums) {
        self.events += other.events;
        self.late_events += other.late_events;
        self.compute += other.compute;
        self.storage += other.storage;
    }
}

/// Pending sums keyed by window; drained at every flush. aHash rather than SipHash: SipHash
/// showed up at 7-15% of per-event CPU in profiles (BENCHMARKS.md), and aHash stays randomly
/// seeded, so crafted names cannot degrade the map.
pub type PendingWindows = ahash::HashMap<WindowKey, WindowSums>;

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
    fn pre_epoch_timestamps_floor_downwards() {
        let minute = WindowSize::new(Duration::from_secs(60));
        assert_eq!(minute.start_of(at("1969-12-31T23:59:30Z")), -60_000);
    }
}
