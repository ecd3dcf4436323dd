//! The stored history's shape over time: day partitions of the raw windows (created ahead and on
//! demand), the hourly and daily roll-ups kept exact by signed deltas in the writers' own
//! transactions, the totals of the roll-ups across keys (kept by triggers, migration 0012), and
//! retention, which drops whole partitions.
//!
//! Readers go through the SQL function `usage_between(from, to, finest)` (migration 0006), which
//! answers every range from the coarsest tier that covers each part of it; [`read`] cuts a range
//! into the parts that read the fewest raw rows that way, and reads whole hours and days from the
//! totals across keys for a reader that needs no key.

pub mod partitions;
pub mod read;
pub mod retention;
pub mod rollup;

/// Milliseconds in a UTC day: windows and partitions are cut at multiples of it.
pub const DAY_MS: i64 = 86_400_000;

/// The UTC day (days since the Unix epoch) a Unix-millisecond instant falls in.
pub fn day_of_ms(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}
