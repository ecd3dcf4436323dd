//! Partitions of `window_usage` (one per UTC day), `usage_hourly` (per month) and `usage_daily`
//! (per year). Created at `migrate` for the days around now, by the retention task a week ahead,
//! and by a flush for any other day it writes (late or backfilled events): a row for a day
//! without a partition would otherwise be refused by PostgreSQL.

use chrono::{DateTime, Utc};

use crate::history::{day_of_ms, DAY_MS};
use crate::store::{Store, StoreError};

/// The partitioned history tables, finest first.
pub const TABLES: [&str; 3] = ["window_usage", "usage_hourly", "usage_daily"];

/// Makes sure every table has the partition holding each of `days` (UTC days since the epoch).
/// Days this process already made sure of are skipped without a query.
pub async fn ensure_days(store: &Store, days: &[i64]) -> Result<(), StoreError> {
    let missing: Vec<i64> = {
        let known = store.known_days().lock().unwrap_or_else(|e| e.into_inner());
        let mut missing: Vec<i64> = days.iter().copied().filter(|d| !known.contains(d)).collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    };
    if missing.is_empty() {
        return Ok(());
    }
    let starts: Vec<DateTime<Utc>> = missing.iter().map(|&d| day_start(d)).collect();
    // Outside any flush transaction: CREATE TABLE ... PARTITION OF locks the parent, which a
    // long transaction should not hold.
    sqlx::query("SELECT costwatch_ensure_partition(t, d) FROM unnest($1::text[]) t, unnest($2::timestamptz[]) d")
        .bind(&TABLES[..])
        .bind(&starts)
        .execute(store.pool())
        .await?;
    store
        .known_days()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(missing);
    Ok(())
}

/// Makes sure the partitions from yesterday to `days_ahead` days after `now` exist.
pub async fn ensure_ahead(store: &Store, now: DateTime<Utc>, days_ahead: i64) -> Result<(), StoreError> {
    let today = day_of_ms(now.timestamp_millis());
    let days: Vec<i64> = (today - 1..=today + days_ahead).collect();
    ensure_days(store, &days).await
}

/// Forgets which partitions exist: after this process dropped some, or after PostgreSQL said
/// one was missing (another instance's retention dropped it).
pub fn forget(store: &Store) {
    store.known_days().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Whether `error` is PostgreSQL refusing a row because no partition holds it (SQLSTATE 23514,
/// "no partition of relation ... found for row").
pub fn is_missing_partition(error: &StoreError) -> bool {
    match error {
        StoreError::Database(sqlx::Error::Database(db)) => {
            db.code().as_deref() == Some("23514") && db.message().starts_with("no partition of relation")
        }
        _ => false,
    }
}

/// The start of UTC day `day`.
pub fn day_start(day: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(day.saturating_mul(DAY_MS)).unwrap_or(DateTime::<Utc>::MIN_UTC)
}
