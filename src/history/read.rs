//! How a range of window starts is read with the fewest raw rows.
//!
//! `usage_between(from, to)` answers whole UTC days and hours from the roll-ups and only the
//! ragged ends from raw minute windows. A range that ends `now`, mid-hour, and starts mid-hour
//! costs up to an hour of minute rows per key that way: 12,000 rows at 200 keys, more than a
//! month of daily roll-ups. An end can instead be widened to its whole hour (one roll-up row per
//! key) and the minutes outside the range subtracted: past `now` there are none but events
//! stamped ahead of the clock; before the start, as many as the start is into its hour. The
//! roll-ups equal the raw windows exactly (see [`super::rollup`]), so every way of reading a
//! range gives the same totals; `now` only decides which is cheapest. Readers sum `sign` x each
//! part's rows, so this is for totals and buckets no finer than an hour, never for row listings.
//!
//! [`Slice`]s then say which tier answers which part of each part, with the bounds the SQL
//! function `usage_between` would compute, so that a reader with many parts (a budget has up to
//! seven) queries the tables with constant bounds: inlining `usage_between` and its helper
//! functions costs about a millisecond of planning per call.

use chrono::{DateTime, Duration, DurationRound, Utc};

/// A part of a range as it is read: `sign` x the usage of windows starting in `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// +1, or -1 for minutes taken back out of a widened hour.
    pub sign: i32,
    /// Start, inclusive.
    pub from: DateTime<Utc>,
    /// End, exclusive.
    pub to: DateTime<Utc>,
}

/// `[from, to)` as the parts that read the fewest raw minute windows, as of `now`; their
/// signed sum is exactly the range.
pub fn parts(from: DateTime<Utc>, to: DateTime<Utc>, now: DateTime<Utc>) -> Vec<Part> {
    let part = |sign, from, to| Part { sign, from, to };
    if from >= to {
        return vec![part(1, from, to)];
    }
    // Raw time stored in [a, b): none past now.
    let stored = |a: DateTime<Utc>, b: DateTime<Utc>| (b.min(now) - a).max(Duration::zero());
    // Raw time `usage_between(a, b)` reads: the ragged ends, or all of it within an hour.
    let raw_read = |a: DateTime<Utc>, b: DateTime<Utc>| {
        if ceil_hour(a) >= floor_hour(b) {
            stored(a, b)
        } else {
            stored(a, ceil_hour(a)) + stored(floor_hour(b), b)
        }
    };
    let mut best: Option<(Duration, Vec<Part>)> = None;
    // In order of how many parts each adds, so that fewer parts win a tie.
    for (widen_start, widen_end) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = if widen_start { floor_hour(from) } else { from };
        let b = if widen_end { ceil_hour(to) } else { to };
        let mut parts = vec![part(1, a, b)];
        let mut cost = raw_read(a, b);
        if a < from {
            parts.push(part(-1, a, from));
            cost += stored(a, from);
        }
        if to < b {
            parts.push(part(-1, to, b));
            cost += stored(to, b);
        }
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            best = Some((cost, parts));
        }
    }
    best.map(|(_, parts)| parts).unwrap_or_default()
}

/// The finest tier a reader accepts (`usage_between`'s third argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finest {
    /// Raw windows only.
    Window,
    /// Whole UTC hours from the hourly roll-ups, the rest raw.
    Hour,
    /// Whole UTC days from the daily roll-ups, whole hours hourly, the rest raw.
    Day,
}

impl Finest {
    /// The name `usage_between` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Finest::Window => "window",
            Finest::Hour => "hour",
            Finest::Day => "day",
        }
    }
}

/// Where each tier's part of `[from, to)` begins and ends, as `usage_between` computes them
/// (`costwatch_h_from` .. `costwatch_d_to`, migration 0006): raw windows for `[from, h_from)`
/// and `[h_to, to)`, hourly for `[h_from, d_from)` and `[d_to, h_to)`, daily for `[d_from,
/// d_to)`; `from <= h_from <= d_from <= d_to <= h_to <= to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierBounds {
    /// End of the leading raw part.
    pub h_from: DateTime<Utc>,
    /// Start of the trailing raw part.
    pub h_to: DateTime<Utc>,
    /// Start of the daily part.
    pub d_from: DateTime<Utc>,
    /// End of the daily part.
    pub d_to: DateTime<Utc>,
}

/// The tier bounds of `[from, to)` (see [`TierBounds`]).
pub fn tier_bounds(from: DateTime<Utc>, to: DateTime<Utc>, finest: Finest) -> TierBounds {
    let h_from = match finest {
        Finest::Window => to,
        _ => ceil_hour(from).min(to),
    };
    let h_to = match finest {
        Finest::Window => to,
        _ => floor_hour(to),
    }
    .max(h_from);
    let (d_from, d_to) = match finest {
        Finest::Day => {
            let d_from = ceil_day(from).min(h_to).max(h_from);
            (d_from, floor_day(to).max(d_from))
        }
        _ => (h_to, h_to),
    };
    TierBounds {
        h_from,
        h_to,
        d_from,
        d_to,
    }
}

/// A table of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// `window_usage`.
    Raw,
    /// `usage_hourly`.
    Hourly,
    /// `usage_daily`.
    Daily,
    /// `usage_totals` of unit `window`: `window_usage` summed across keys per window start.
    WindowTotals,
    /// `usage_totals` of unit `hour`: `usage_hourly` summed across keys.
    HourlyTotals,
    /// `usage_totals` of unit `day`: `usage_daily` summed across keys.
    DailyTotals,
}

/// What a reader needs of each row: its key, or only the totals across keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Rows per (model, hardware, labels, topic, source): the reader filters or groups by them.
    Keys,
    /// Only sums per bucket, currency and pricedness: windows, whole hours and whole days come
    /// from `usage_totals` (migration 0012), about 1/keys of the rows of the tier each totals.
    /// Its rows carry NULL keys, so a reader asks for this only when it reads no key.
    Totals,
}

/// `sign` x the rows of `tier` whose start is in `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// The table.
    pub tier: Tier,
    /// +1, or -1 for minutes taken back out of a widened hour.
    pub sign: i32,
    /// Start, inclusive.
    pub from: DateTime<Utc>,
    /// End, exclusive.
    pub to: DateTime<Utc>,
}

/// The non-empty slices `usage_between(part.from, part.to, finest)` reads, with the part's sign;
/// with [`Detail::Totals`], from the totals across keys of the same tiers instead.
pub fn slices(part: Part, finest: Finest, detail: Detail) -> Vec<Slice> {
    let b = tier_bounds(part.from, part.to, finest);
    let slice = |tier, from, to| Slice {
        tier,
        sign: part.sign,
        from,
        to,
    };
    let (raw, hourly, daily) = match detail {
        Detail::Keys => (Tier::Raw, Tier::Hourly, Tier::Daily),
        Detail::Totals => (Tier::WindowTotals, Tier::HourlyTotals, Tier::DailyTotals),
    };
    [
        slice(daily, b.d_from, b.d_to),
        slice(hourly, b.h_from, b.d_from),
        slice(hourly, b.d_to, b.h_to),
        slice(raw, part.from, b.h_from),
        slice(raw, b.h_to, part.to),
    ]
    .into_iter()
    .filter(|s| s.from < s.to)
    .collect()
}

/// The columns every [`slice_sql`] returns: a row's start (the bucket's for roll-ups), key,
/// whether it is priced (both prices known) and signed quantities and costs (NULL costs when
/// unpriced in the raw windows and roll-ups, 0 in the totals: sum costs of priced rows only).
/// Rows of the totals have NULL keys.
pub const SLICE_COLUMNS: &str = "window_start, topic, source, model, hardware, labels, currency, priced, \
    events, compute, storage, compute_cost, storage_cost";

/// A `SELECT` of [`SLICE_COLUMNS`] with no rows, for a union of no slices (an empty range).
pub const NO_SLICE: &str = "SELECT window_start, topic, source, model, hardware, labels, currency,
    compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced, events, compute, storage,
    compute * compute_price * k1 AS compute_cost, storage * storage_price * k2 AS storage_cost
    FROM window_usage WHERE false";

/// `UNION ALL` of [`slice_sql`] of `slices`, their bounds the parameters from `$first` on in
/// order; [`NO_SLICE`] when there are none.
pub fn union_sql(slices: &[Slice], first: usize) -> String {
    if slices.is_empty() {
        return NO_SLICE.to_owned();
    }
    let arms: Vec<String> = slices
        .iter()
        .enumerate()
        .map(|(i, slice)| slice_sql(slice, first + 2 * i, first + 2 * i + 1))
        .collect();
    arms.join(" UNION ALL ")
}

/// A `SELECT` of [`SLICE_COLUMNS`] from `slice`'s table between the parameters `$from` and `$to`
/// (bind the slice's bounds there), quantities negated for a negative slice.
pub fn slice_sql(slice: &Slice, from: usize, to: usize) -> String {
    let neg = if slice.sign < 0 { "-" } else { "" };
    let (table, start, rows) = match slice.tier {
        Tier::Raw => ("window_usage", "window_start", ""),
        Tier::Hourly => ("usage_hourly", "bucket_start", ""),
        Tier::Daily => ("usage_daily", "bucket_start", ""),
        Tier::WindowTotals => ("usage_totals", "bucket_start", "bucket_unit = 'window' AND "),
        Tier::HourlyTotals => ("usage_totals", "bucket_start", "bucket_unit = 'hour' AND "),
        Tier::DailyTotals => ("usage_totals", "bucket_start", "bucket_unit = 'day' AND "),
    };
    let (keys, priced) = match slice.tier {
        Tier::WindowTotals | Tier::HourlyTotals | Tier::DailyTotals => (
            "NULL::text AS topic, NULL::text AS source, NULL::text AS model, NULL::text AS hardware, \
             NULL::jsonb AS labels",
            "priced",
        ),
        _ => (
            "topic, source, model, hardware, labels",
            "compute_price IS NOT NULL AND storage_price IS NOT NULL",
        ),
    };
    // Raw windows are read only at a range's ragged ends (or at step=window): their costs are
    // computed. The roll-ups and totals store theirs.
    let (compute_cost, storage_cost) = match slice.tier {
        Tier::Raw => ("compute * compute_price * k1", "storage * storage_price * k2"),
        _ => ("compute_cost", "storage_cost"),
    };
    format!(
        "SELECT {start} AS window_start, {keys}, currency, {priced} AS priced,
                {neg}events AS events, {neg}compute AS compute, {neg}storage AS storage,
                {neg}({compute_cost}) AS compute_cost, {neg}({storage_cost}) AS storage_cost
         FROM {table} WHERE {rows}{start} >= ${from} AND {start} < ${to}"
    )
}

fn floor_day(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::days(1)).unwrap_or(t)
}

fn ceil_day(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = floor_day(t);
    if floor == t {
        t
    } else {
        floor + Duration::days(1)
    }
}

fn floor_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

fn ceil_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = floor_hour(t);
    if floor == t {
        t
    } else {
        floor + Duration::hours(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::t;

    fn part(sign: i32, from: &str, to: &str) -> Part {
        Part {
            sign,
            from: t(from),
            to: t(to),
        }
    }

    #[test]
    fn a_range_ending_now_reads_whole_hours_and_takes_back_the_fewest_minutes() {
        // 17 minutes into the hour: both ends widened, 17 raw minutes taken back (not 60 read).
        let now = t("2026-11-16T10:17:00Z");
        assert_eq!(
            parts(t("2026-11-16T09:17:00Z"), now, now),
            vec![
                part(1, "2026-11-16T09:00:00Z", "2026-11-16T11:00:00Z"),
                part(-1, "2026-11-16T09:00:00Z", "2026-11-16T09:17:00Z"),
                part(-1, "2026-11-16T10:17:00Z", "2026-11-16T11:00:00Z"),
            ]
        );
        // 47 minutes in: the start's 13 raw minutes are read as they are.
        let now = t("2026-11-16T10:47:00Z");
        assert_eq!(
            parts(t("2026-11-16T04:47:00Z"), now, now),
            vec![
                part(1, "2026-11-16T04:47:00Z", "2026-11-16T11:00:00Z"),
                part(-1, "2026-11-16T10:47:00Z", "2026-11-16T11:00:00Z"),
            ]
        );
        // Inside one past hour, widening only adds minutes: read as is.
        assert_eq!(
            parts(t("2026-11-16T08:20:00Z"), t("2026-11-16T08:40:00Z"), now),
            vec![part(1, "2026-11-16T08:20:00Z", "2026-11-16T08:40:00Z")]
        );
    }

    #[test]
    fn the_slices_of_a_part_cover_it_once_from_the_coarsest_tier_allowed() {
        let base = t("2026-11-15T00:00:00Z");
        let minute = |m: i64| base + Duration::minutes(m);
        // Two days and a bit: ends on and off hours and days.
        for (from, to) in [(0, 2880), (17, 2899), (60, 1500), (1439, 1441), (5, 50), (1380, 1500)] {
            for (finest, detail) in [Finest::Window, Finest::Hour, Finest::Day]
                .into_iter()
                .flat_map(|f| [(f, Detail::Keys), (f, Detail::Totals)])
            {
                let part = Part {
                    sign: -1,
                    from: minute(from),
                    to: minute(to),
                };
                let slices = slices(part, finest, detail);
                for m in -10..3000 {
                    let at = minute(m);
                    let covering: Vec<&Slice> = slices.iter().filter(|s| s.from <= at && at < s.to).collect();
                    let inside = minute(from) <= at && at < minute(to);
                    assert_eq!(
                        covering.len(),
                        usize::from(inside),
                        "{finest:?} [{from}, {to}) minute {m}: {slices:?}"
                    );
                    if let Some(s) = covering.first() {
                        assert_eq!(s.sign, -1);
                        // A roll-up row is only read when the whole bucket is inside the part.
                        // Keys come from the roll-ups, totals from the totals, never mixed.
                        let (bucket, allowed) = match s.tier {
                            Tier::Raw => (Duration::minutes(1), detail == Detail::Keys),
                            Tier::WindowTotals => (Duration::minutes(1), detail == Detail::Totals),
                            Tier::Hourly => (Duration::hours(1), finest != Finest::Window && detail == Detail::Keys),
                            Tier::Daily => (Duration::days(1), finest == Finest::Day && detail == Detail::Keys),
                            Tier::HourlyTotals => {
                                (Duration::hours(1), finest != Finest::Window && detail == Detail::Totals)
                            }
                            Tier::DailyTotals => (Duration::days(1), finest == Finest::Day && detail == Detail::Totals),
                        };
                        let start = at.duration_trunc(bucket).unwrap();
                        assert!(
                            allowed && start >= part.from && start + bucket <= part.to,
                            "{s:?} at {m}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_parts_of_a_range_add_up_to_exactly_the_range() {
        // Every minute of a day and a half, for ranges with ends on and off the hour, before,
        // around and after now: the signed parts cover each minute of the range once and no
        // other minute.
        let base = t("2026-11-16T00:00:00Z");
        let minute = |m: i64| base + Duration::minutes(m);
        let cases = [
            (17, 77, 77),
            (0, 120, 95),
            (59, 61, 600),
            (30, 2000, 700),
            (610, 611, 611),
            (5, 5, 9),
        ];
        for (from, to, now) in cases {
            let parts = parts(minute(from), minute(to), minute(now));
            for m in 0..2200 {
                let at = minute(m);
                let covered: i32 = parts.iter().filter(|p| p.from <= at && at < p.to).map(|p| p.sign).sum();
                let inside = i32::from(minute(from) <= at && at < minute(to));
                assert_eq!(covered, inside, "minute {m} of [{from}, {to}) at {now}: {parts:?}");
            }
        }
    }
}
