//! Retention: whole partitions of history older than their tier's retention are dropped,
//! never rows deleted one by one. A raw day is dropped only when its hourly roll-up holds exactly
//! what it holds (and an hourly month only when the daily roll-up does), so what leaves the finer
//! tier is still answered, to the last digit, by the coarser one. A tier's totals across keys
//! (`usage_totals`) go with its partitions.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sqlx::Row;

use crate::history::partitions;
use crate::store::{Store, StoreError};

/// How long each tier is kept (`[retention]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Raw minute windows (`retention.windows`).
    pub windows: Duration,
    /// Hourly roll-ups (`retention.hourly`).
    pub hourly: Duration,
    /// Daily roll-ups (`retention.daily`); `None`: kept forever.
    pub daily: Option<Duration>,
}

/// One partition of a history table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The partitioned table: `window_usage`, `usage_hourly` or `usage_daily`.
    pub table: &'static str,
    /// The partition's own name, e.g. `window_usage_d20261130`.
    pub name: String,
    /// The first instant it holds.
    pub from: DateTime<Utc>,
    /// The first instant after it.
    pub to: DateTime<Utc>,
}

/// What a retention run dropped (or, dry, would drop), and what it kept although it was due.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Partitions dropped (or due, in a dry run), with the rows they held.
    pub dropped: Vec<(Partition, i64)>,
    /// Partitions due but kept because the coarser tier does not hold exactly what they hold;
    /// with the reason.
    pub kept: Vec<(Partition, String)>,
}

/// The advisory lock one retention run holds: two instances never drop at once.
const RETENTION_LOCK: i64 = 7_170_019;

/// Every partition of the history tables whose name costwatch gave it, oldest first per table.
pub async fn partitions(store: &Store) -> Result<Vec<Partition>, StoreError> {
    let rows = sqlx::query(
        "SELECT p.relname::text AS parent, c.relname::text AS name
         FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_class p ON p.oid = i.inhparent
         WHERE p.relname = ANY($1) AND pg_table_is_visible(p.oid)
         ORDER BY p.relname, c.relname",
    )
    .bind(&partitions::TABLES[..])
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let parent: String = r.get("parent");
            let table = partitions::TABLES.into_iter().find(|t| *t == parent)?;
            parse_partition(table, r.get("name"))
        })
        .collect())
}

/// A partition's bounds from its name (`_dYYYYMMDD`, `_mYYYYMM`, `_yYYYY`); `None` for a name
/// costwatch did not give (such partitions are left alone).
pub fn parse_partition(table: &'static str, name: String) -> Option<Partition> {
    let suffix = name.strip_prefix(table)?.strip_prefix('_')?;
    let (kind, digits) = suffix.split_at(1);
    let number = |range: std::ops::Range<usize>| digits.get(range)?.parse::<u32>().ok();
    let (from, to) = match (kind, digits.len()) {
        ("d", 8) => {
            let day = NaiveDate::from_ymd_opt(number(0..4)? as i32, number(4..6)?, number(6..8)?)?;
            (day, day.succ_opt()?)
        }
        ("m", 6) => {
            let month = NaiveDate::from_ymd_opt(number(0..4)? as i32, number(4..6)?, 1)?;
            (month, month.checked_add_months(chrono::Months::new(1))?)
        }
        ("y", 4) => {
            let year = NaiveDate::from_ymd_opt(number(0..4)? as i32, 1, 1)?;
            (year, NaiveDate::from_ymd_opt(year.year() + 1, 1, 1)?)
        }
        _ => return None,
    };
    let at = |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"));
    Some(Partition {
        table,
        name,
        from: at(from),
        to: at(to),
    })
}

/// The partitions of `all` that `policy` says are due at `now`: those whose every instant is
/// older than their tier's retention.
pub fn due(all: &[Partition], policy: &Policy, now: DateTime<Utc>) -> Vec<Partition> {
    all.iter()
        .filter(|p| {
            let keep = match p.table {
                "window_usage" => Some(policy.windows),
                "usage_hourly" => Some(policy.hourly),
                _ => policy.daily,
            };
            keep.and_then(|k| chrono::TimeDelta::from_std(k).ok())
                .and_then(|k| now.checked_sub_signed(k))
                .is_some_and(|cutoff| p.to <= cutoff)
        })
        .cloned()
        .collect()
}

/// Drops the partitions due at `now` (with `dry_run`, only says which), each after checking
/// that the next tier holds exactly what it holds. `None` when another instance is running
/// retention right now.
pub async fn run(
    store: &Store,
    policy: &Policy,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<Option<Outcome>, StoreError> {
    let mut outcome = Outcome::default();
    let mut lock = store.pool().acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RETENTION_LOCK)
        .fetch_one(&mut *lock)
        .await?;
    if !locked {
        return Ok(None);
    }
    let result = drop_due(store, policy, now, dry_run, &mut outcome).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut *lock)
        .await;
    result?;
    unlocked?;
    if !dry_run && !outcome.dropped.is_empty() {
        partitions::forget(store);
    }
    Ok(Some(outcome))
}

async fn drop_due(
    store: &Store,
    policy: &Policy,
    now: DateTime<Utc>,
    dry_run: bool,
    outcome: &mut Outcome,
) -> Result<(), StoreError> {
    for partition in due(&partitions(store).await?, policy, now) {
        let mut tx = store.pool().begin().await?;
        // Dropping a partition locks its parent; wait for a flush, never for long.
        sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut *tx).await?;
        if partition.table != "usage_daily" {
            let days: Vec<i64> = (day(partition.from)..day(partition.to)).collect();
            crate::history::rollup::lock_days(&mut tx, &days).await?;
        }
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", quoted(&partition.name)))
            .fetch_one(&mut *tx)
            .await?;
        if let Some(reason) = coarser_disagrees(&mut tx, &partition).await? {
            outcome.kept.push((partition, reason));
            continue;
        }
        if !dry_run {
            sqlx::query(&format!("DROP TABLE {}", quoted(&partition.name)))
                .execute(&mut *tx)
                .await?;
            // Dropping fires no trigger: the totals across keys of the range leave with it (a
            // few rows per window, hour or day of the range, never a large delete).
            let unit = match partition.table {
                "window_usage" => "window",
                "usage_hourly" => "hour",
                _ => "day",
            };
            sqlx::query("DELETE FROM usage_totals WHERE bucket_unit = $1 AND bucket_start >= $2 AND bucket_start < $3")
                .bind(unit)
                .bind(partition.from)
                .bind(partition.to)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        outcome.dropped.push((partition, rows));
    }
    Ok(())
}

fn day(at: DateTime<Utc>) -> i64 {
    crate::history::day_of_ms(at.timestamp_millis())
}

fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Compares a partition's totals with the next tier's over the same range; `Some(why)` when
/// they differ (or the next tier no longer holds the range).
async fn coarser_disagrees(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    partition: &Partition,
) -> Result<Option<String>, StoreError> {
    let (coarser, column) = match partition.table {
        "window_usage" => ("usage_hourly", "window_start"),
        "usage_hourly" => ("usage_daily", "bucket_start"),
        _ => return Ok(None),
    };
    let totals =
        "count(*) > 0 AS present, COALESCE(sum(events), 0)::int8 AS events, COALESCE(sum(compute), 0) AS compute,
                  COALESCE(sum(storage), 0) AS storage, COALESCE(sum(input_tokens) + sum(output_tokens), 0) AS tokens,
                  COALESCE(sum(compute * compute_price * k1 + storage * storage_price * k2), 0) AS cost";
    let row = sqlx::query(&format!(
        "SELECT f.events = c.events AND f.compute = c.compute AND f.storage = c.storage AND f.tokens = c.tokens
                AND f.cost = c.cost AS equal,
                f.events AS fine_events, c.events AS coarse_events, f.present
         FROM (SELECT {totals} FROM {p} WHERE {column} >= $1 AND {column} < $2) f,
              (SELECT {totals} FROM {coarser} WHERE bucket_start >= $1 AND bucket_start < $2) c",
        p = quoted(&partition.name),
    ))
    .bind(partition.from)
    .bind(partition.to)
    .fetch_one(&mut **tx)
    .await?;
    if row.get::<bool, _>("equal") {
        return Ok(None);
    }
    Ok(Some(format!(
        "{coarser} does not hold exactly what {} holds ({} events there, {} here); kept",
        partition.name,
        row.get::<i64, _>("coarse_events"),
        row.get::<i64, _>("fine_events"),
    )))
}

impl Outcome {
    /// What a person reads: one line per partition dropped or kept.
    pub fn to_text(&self, dry_run: bool) -> String {
        let verb = if dry_run { "would drop" } else { "dropped" };
        let mut text = String::new();
        for (p, rows) in &self.dropped {
            text.push_str(&format!(
                "{verb} {} ({} rows of {} from {} to {})\n",
                p.name,
                rows,
                p.table,
                p.from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                p.to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
        for (p, reason) in &self.kept {
            text.push_str(&format!("kept {}: {reason}\n", p.name));
        }
        if self.dropped.is_empty() && self.kept.is_empty() {
            text.push_str("no history partition is past its retention\n");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn partition_names_give_their_bounds_and_foreign_names_are_ignored() {
        let d = parse_partition("window_usage", "window_usage_d20261130".into()).unwrap();
        assert_eq!((d.from, d.to), (at("2026-11-30T00:00:00Z"), at("2026-12-01T00:00:00Z")));
        let m = parse_partition("usage_hourly", "usage_hourly_m202612".into()).unwrap();
        assert_eq!((m.from, m.to), (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z")));
        let y = parse_partition("usage_daily", "usage_daily_y2026".into()).unwrap();
        assert_eq!((y.from, y.to), (at("2026-01-01T00:00:00Z"), at("2027-01-01T00:00:00Z")));
        assert_eq!(parse_partition("window_usage", "window_usage_old".into()), None);
        assert_eq!(parse_partition("window_usage", "window_usage_d20261331".into()), None);
    }

    #[test]
    fn only_partitions_wholly_past_their_tiers_retention_are_due() {
        let day = Duration::from_secs(86_400);
        let policy = Policy {
            windows: 35 * day,
            hourly: 400 * day,
            daily: None,
        };
        let all: Vec<Partition> = [
            ("window_usage", "window_usage_d20261025"),
            ("window_usage", "window_usage_d20261026"),
            ("usage_hourly", "usage_hourly_m202509"),
            ("usage_hourly", "usage_hourly_m202510"),
            ("usage_daily", "usage_daily_y2020"),
        ]
        .into_iter()
        .map(|(t, n)| parse_partition(t, n.into()).unwrap())
        .collect();
        // 35 days before 2026-11-30T12:00 is 2026-10-26T12:00: the 25th ended before, the 26th did not.
        let names: Vec<String> = due(&all, &policy, at("2026-11-30T12:00:00Z"))
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["window_usage_d20261025", "usage_hourly_m202509"]);
    }
}
