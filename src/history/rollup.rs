//! The hourly and daily roll-ups, kept exact by signed deltas.
//!
//! A raw window row changes in two ways: a flush adds usage to it, and a flush or `rerate`
//! prices it anew (its whole content moves to another price). Both are written to the roll-ups
//! as deltas in the same transaction as the raw change: `+added` at the row's price, or
//! `-old` at the old price and `+(old + added)` at the new one. Roll-up rows are keyed by the
//! raw key, the bucket and the row's *identity* (profile, prices, coefficients), so every roll-up
//! cost is still exactly sum x price x coefficient, equal to the raw rows' to the last digit.
//! Deltas never read the raw rows back, so roll-ups stay whole after retention drops raw days.
//! The roll-ups' totals across keys (`usage_totals`) follow every write here by statement
//! triggers in the same transaction (migration 0012): nothing in this module writes them.
//!
//! Every writer of a day's rows holds that day's advisory lock (see [`lock_days`]) from before
//! it reads a row's old content until it commits: the old content it read is then still the
//! content it changes, whoever else writes the same keys.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use sqlx::Row;

use crate::domain::{Coefficient, UnitPrice};
use crate::pricing::Rates;
use crate::store::StoreError;

/// The advisory-lock class of "writing the rows of a UTC day" (the second key is the day).
const DAY_LOCK_CLASS: i32 = 7_170_018;

/// The key of a raw window row (the primary key of `window_usage`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    /// The window's start.
    pub window_start: DateTime<Utc>,
    /// The Kafka topic the row's events came from.
    pub topic: String,
    /// The configured source (the topic's name for the native source).
    pub source: String,
    /// The model, as stored.
    pub model: String,
    /// The hardware, as stored.
    pub hardware: String,
    /// The label set as JSON text (compared as `jsonb`).
    pub labels: String,
    /// T and S were derived from tokens.
    pub usage_from_tokens: bool,
}

/// How a row's numbers were derived and priced: rows of one bucket and key with the same
/// identity share a roll-up row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The usage profile that derived T and S from tokens, if one did.
    pub profile: Option<String>,
    /// The currency of the prices.
    pub currency: String,
    /// The configured price entry, as hex; `None` when unpriced.
    pub price_id: Option<String>,
    /// The calibrated coefficient version; `None` for configured or assumed coefficients.
    pub coefficient_version: Option<i64>,
    /// The four rates; `None` when unpriced.
    pub rates: Option<Rates>,
    /// k1 = k2 = 1 because nothing was configured or calibrated.
    pub coefficients_assumed: bool,
}

/// A row's sums (or a signed change of them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sums {
    /// Accepted events.
    pub events: i64,
    /// Of which late.
    pub late_events: i64,
    /// ΣT.
    pub compute: Decimal,
    /// ΣS.
    pub storage: Decimal,
    /// Σ input tokens.
    pub input_tokens: Decimal,
    /// Σ output tokens.
    pub output_tokens: Decimal,
}

impl Sums {
    /// `self + other`, exactly (PostgreSQL adds the stored sums; these only travel).
    pub fn plus(&self, other: &Sums) -> Sums {
        Sums {
            events: self.events + other.events,
            late_events: self.late_events + other.late_events,
            compute: self.compute + other.compute,
            storage: self.storage + other.storage,
            input_tokens: self.input_tokens + other.input_tokens,
            output_tokens: self.output_tokens + other.output_tokens,
        }
    }

    /// `-self`.
    pub fn negated(&self) -> Sums {
        Sums {
            events: -self.events,
            late_events: -self.late_events,
            compute: -self.compute,
            storage: -self.storage,
            input_tokens: -self.input_tokens,
            output_tokens: -self.output_tokens,
        }
    }
}

impl Identity {
    /// A stored row's identity (the columns of `window_usage` and the roll-ups alike).
    pub fn from_row(r: &sqlx::postgres::PgRow) -> Identity {
        let rates = match (
            r.get::<Option<Decimal>, _>("compute_price"),
            r.get::<Option<Decimal>, _>("storage_price"),
            r.get::<Option<Decimal>, _>("k1"),
            r.get::<Option<Decimal>, _>("k2"),
        ) {
            (Some(cp), Some(sp), Some(k1), Some(k2)) => Some(Rates {
                compute_price: UnitPrice(cp),
                storage_price: UnitPrice(sp),
                k1: Coefficient(k1),
                k2: Coefficient(k2),
            }),
            _ => None,
        };
        Identity {
            profile: r.get("profile"),
            currency: r.get("currency"),
            price_id: r.get("price_id"),
            coefficient_version: r.get("coefficient_version"),
            rates,
            coefficients_assumed: r.get("coefficients_assumed"),
        }
    }
}

impl Sums {
    /// A stored row's sums.
    pub fn from_row(r: &sqlx::postgres::PgRow) -> Sums {
        Sums {
            events: r.get("events"),
            late_events: r.get("late_events"),
            compute: r.get("compute"),
            storage: r.get("storage"),
            input_tokens: r.get("input_tokens"),
            output_tokens: r.get("output_tokens"),
        }
    }
}

/// One signed change to the roll-ups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The raw row changed.
    pub key: RowKey,
    /// The identity the change is counted under.
    pub identity: Identity,
    /// The change.
    pub sums: Sums,
    /// The raw row's `finalizes_at`.
    pub finalizes_at: DateTime<Utc>,
}

/// The deltas that take the roll-ups from a raw row's `old` content (`None`: a new row) to
/// `old + added`, priced by `new`. With an unchanged identity (the usual case) that is one
/// delta, `+added`; otherwise the old content moves to the new identity as well.
pub fn row_change(
    key: &RowKey,
    old: Option<(&Identity, &Sums)>,
    added: &Sums,
    new: &Identity,
    finalizes_at: DateTime<Utc>,
) -> Vec<Delta> {
    let delta = |identity: &Identity, sums: Sums| Delta {
        key: key.clone(),
        identity: identity.clone(),
        sums,
        finalizes_at,
    };
    match old {
        Some((old_identity, old_sums)) if old_identity != new => vec![
            delta(old_identity, old_sums.negated()),
            delta(new, old_sums.plus(added)),
        ],
        _ => vec![delta(new, *added)],
    }
}

/// Takes the advisory locks of `days` (UTC days since the epoch) for the rest of the
/// transaction, in ascending order so that two writers never wait for each other in a circle.
pub async fn lock_days(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, days: &[i64]) -> Result<(), StoreError> {
    let mut days: Vec<i32> = days
        .iter()
        .map(|&d| i32::try_from(d).unwrap_or(if d < 0 { i32::MIN } else { i32::MAX }))
        .collect();
    days.sort_unstable();
    days.dedup();
    for day in days {
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(DAY_LOCK_CLASS)
            .bind(day)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The roll-up tables, the unit of their buckets and its length in milliseconds.
const TIERS: [(&str, &str, i64); 2] = [
    ("usage_hourly", "hour", 3_600_000),
    ("usage_daily", "day", super::DAY_MS),
];

/// A roll-up row's key: bucket start (Unix ms), topic, source, model, hardware, labels, T and
/// S from tokens, identity.
type BucketKey<'a> = (i64, &'a str, &'a str, &'a str, &'a str, &'a str, bool, &'a Identity);

/// `deltas` summed per roll-up row of `bucket_ms`-long buckets, each with its bucket's start as
/// `window_start`. A flush's rows are minutes of a few hours: the statement then carries one row
/// per roll-up row it changes, not one per raw row (sending every raw row's delta and grouping
/// in SQL cost as much as writing the raw rows).
fn per_bucket(deltas: &[Delta], bucket_ms: i64) -> Vec<Bucketed<'_>> {
    let mut index: ahash::HashMap<BucketKey<'_>, usize> = ahash::HashMap::default();
    let mut summed: Vec<Bucketed<'_>> = Vec::new();
    for d in deltas {
        let bucket = d.key.window_start.timestamp_millis().div_euclid(bucket_ms) * bucket_ms;
        let k = &d.key;
        let key = (
            bucket,
            k.topic.as_str(),
            k.source.as_str(),
            k.model.as_str(),
            k.hardware.as_str(),
            k.labels.as_str(),
            k.usage_from_tokens,
            &d.identity,
        );
        match index.get(&key) {
            Some(&i) => {
                let row = &mut summed[i];
                row.sums = row.sums.plus(&d.sums);
                row.finalizes_at = row.finalizes_at.max(d.finalizes_at);
            }
            None => {
                index.insert(key, summed.len());
                summed.push(Bucketed {
                    first: d,
                    start: DateTime::from_timestamp_millis(bucket).unwrap_or(d.key.window_start),
                    sums: d.sums,
                    finalizes_at: d.finalizes_at,
                });
            }
        }
    }
    summed
}

/// One roll-up row's change: the key and identity of the first delta summed into it (every
/// other has the same), its bucket's start, and the sums. Borrowed, not a cloned [`Delta`]: a
/// delta holds eight strings, and cloning them per roll-up row and tier was a third of the
/// roll-up's CPU.
#[derive(Debug)]
struct Bucketed<'a> {
    first: &'a Delta,
    start: DateTime<Utc>,
    sums: Sums,
    finalizes_at: DateTime<Utc>,
}

/// Adds `deltas` to the hourly and daily roll-ups, then deletes roll-up rows left empty (an
/// identity whose content moved away). Call with the days of the deltas locked.
pub async fn apply(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, deltas: &[Delta]) -> Result<(), StoreError> {
    if deltas.is_empty() {
        return Ok(());
    }
    for (table, _, bucket_ms) in TIERS {
        let rows = per_bucket(deltas, bucket_ms);
        DeltaColumns::of(&rows)
            .bind(sqlx::query(&upsert_sql(table)))
            .execute(&mut **tx)
            .await?;
    }
    if deltas.iter().any(|d| d.sums.events < 0) {
        let starts: Vec<DateTime<Utc>> = deltas.iter().map(|d| d.key.window_start).collect();
        for (table, unit, _) in TIERS {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE events = 0
                   AND bucket_start IN (SELECT DISTINCT costwatch_floor(s, '{unit}') FROM unnest($1::timestamptz[]) s)"
            ))
            .bind(&starts)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// Rebuilds the roll-ups of UTC `days` from the raw windows, each day in a transaction under
/// its lock: for repairs (a partition retention kept because the tiers disagreed) and for rows
/// written by hand. Days whose raw partition is gone are left alone (their roll-ups are all
/// that remains). Returns the days rebuilt.
pub async fn rebuild_days(pool: &sqlx::PgPool, days: &[i64]) -> Result<Vec<i64>, StoreError> {
    let mut rebuilt = Vec::new();
    for &day in days {
        let mut tx = pool.begin().await?;
        lock_days(&mut tx, &[day]).await?;
        let from = crate::history::partitions::day_start(day);
        let to = crate::history::partitions::day_start(day + 1);
        let raw_partition = format!("window_usage_d{}", from.format("%Y%m%d"));
        let present: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&raw_partition)
            .fetch_one(&mut *tx)
            .await?;
        if !present {
            continue;
        }
        for (table, source, column) in [
            ("usage_hourly", "window_usage", "window_start"),
            ("usage_daily", "usage_hourly", "bucket_start"),
        ] {
            let unit = if table == "usage_hourly" { "hour" } else { "day" };
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE bucket_start >= $1 AND bucket_start < $2"
            ))
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "INSERT INTO {table} (bucket_start, topic, source, model, hardware, labels, usage_from_tokens, profile,
                        currency, price_id, coefficient_version, compute_price, storage_price, k1, k2,
                        coefficients_assumed, events, late_events, compute, storage, input_tokens, output_tokens,
                        finalizes_at)
                 SELECT costwatch_floor({column}, '{unit}'), topic, source, model, hardware, labels, usage_from_tokens,
                        profile, currency, price_id, coefficient_version, compute_price, storage_price, k1, k2,
                        coefficients_assumed, sum(events), sum(late_events), sum(compute), sum(storage),
                        sum(input_tokens), sum(output_tokens), max(finalizes_at)
                 FROM {source} WHERE {column} >= $1 AND {column} < $2
                 GROUP BY 1, topic, source, model, hardware, labels, usage_from_tokens, profile, currency, price_id,
                          coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed"
            ))
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        rebuilt.push(day);
    }
    Ok(rebuilt)
}

/// The upsert of deltas summed per roll-up row ([`per_bucket`]) into one roll-up table. The
/// statement groups them again: two label texts of one `jsonb` value are one roll-up row, and
/// one statement may not touch a row twice.
fn upsert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS x (bucket_start, topic, source, model, hardware, labels, usage_from_tokens, profile,
                currency, price_id, coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed,
                events, late_events, compute, storage, input_tokens, output_tokens, finalizes_at)
         SELECT s, tp, src, m, h, l::jsonb, uft, prof, cur, pid, cv, cp, sp, a, b, ass,
                sum(ev), sum(le), sum(c), sum(st), sum(it), sum(ot), max(f)
         FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[],
                     $8::text[], $9::text[], $10::text[], $11::int8[], $12::numeric[], $13::numeric[],
                     $14::numeric[], $15::numeric[], $16::bool[], $17::int8[], $18::int8[], $19::numeric[],
                     $20::numeric[], $21::numeric[], $22::numeric[], $23::timestamptz[])
              AS t(s, tp, src, m, h, l, uft, prof, cur, pid, cv, cp, sp, a, b, ass, ev, le, c, st, it, ot, f)
         GROUP BY s, tp, src, m, h, l::jsonb, uft, prof, cur, pid, cv, cp, sp, a, b, ass
         ON CONFLICT (model, hardware, labels, topic, source, usage_from_tokens, profile, currency, price_id,
                      coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed, bucket_start)
         DO UPDATE SET events = x.events + excluded.events,
                       late_events = x.late_events + excluded.late_events,
                       compute = x.compute + excluded.compute,
                       storage = x.storage + excluded.storage,
                       input_tokens = x.input_tokens + excluded.input_tokens,
                       output_tokens = x.output_tokens + excluded.output_tokens,
                       finalizes_at = GREATEST(x.finalizes_at, excluded.finalizes_at),
                       updated_at = now()"
    )
}

/// The deltas as one array per bound column.
struct DeltaColumns<'a> {
    starts: Vec<DateTime<Utc>>,
    topics: Vec<&'a str>,
    sources: Vec<&'a str>,
    models: Vec<&'a str>,
    hardware: Vec<&'a str>,
    labels: Vec<&'a str>,
    from_tokens: Vec<bool>,
    profiles: Vec<Option<&'a str>>,
    currencies: Vec<&'a str>,
    price_ids: Vec<Option<&'a str>>,
    versions: Vec<Option<i64>>,
    rates: [Vec<Option<Decimal>>; 4],
    assumed: Vec<bool>,
    events: Vec<i64>,
    late: Vec<i64>,
    quantities: [Vec<Decimal>; 4],
    finals: Vec<DateTime<Utc>>,
}

impl<'a> DeltaColumns<'a> {
    fn of(rows: &[Bucketed<'a>]) -> Self {
        let rate = |pick: fn(&Rates) -> Decimal| -> Vec<Option<Decimal>> {
            rows.iter().map(|r| r.first.identity.rates.as_ref().map(pick)).collect()
        };
        let sum = |pick: fn(&Sums) -> Decimal| -> Vec<Decimal> { rows.iter().map(|r| pick(&r.sums)).collect() };
        let key =
            |pick: fn(&'a RowKey) -> &'a str| -> Vec<&'a str> { rows.iter().map(|r| pick(&r.first.key)).collect() };
        DeltaColumns {
            starts: rows.iter().map(|r| r.start).collect(),
            topics: key(|k| &k.topic),
            sources: key(|k| &k.source),
            models: key(|k| &k.model),
            hardware: key(|k| &k.hardware),
            labels: key(|k| &k.labels),
            from_tokens: rows.iter().map(|r| r.first.key.usage_from_tokens).collect(),
            profiles: rows.iter().map(|r| r.first.identity.profile.as_deref()).collect(),
            currencies: rows.iter().map(|r| r.first.identity.currency.as_str()).collect(),
            price_ids: rows.iter().map(|r| r.first.identity.price_id.as_deref()).collect(),
            versions: rows.iter().map(|r| r.first.identity.coefficient_version).collect(),
            rates: [
                rate(|r| r.compute_price.value()),
                rate(|r| r.storage_price.value()),
                rate(|r| r.k1.value()),
                rate(|r| r.k2.value()),
            ],
            assumed: rows.iter().map(|r| r.first.identity.coefficients_assumed).collect(),
            events: rows.iter().map(|r| r.sums.events).collect(),
            late: rows.iter().map(|r| r.sums.late_events).collect(),
            quantities: [
                sum(|s| s.compute),
                sum(|s| s.storage),
                sum(|s| s.input_tokens),
                sum(|s| s.output_tokens),
            ],
            finals: rows.iter().map(|r| r.finalizes_at).collect(),
        }
    }

    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let [cp, sp, k1, k2] = &self.rates;
        let [c, st, it, ot] = &self.quantities;
        query
            .bind(&self.starts)
            .bind(&self.topics)
            .bind(&self.sources)
            .bind(&self.models)
            .bind(&self.hardware)
            .bind(&self.labels)
            .bind(&self.from_tokens)
            .bind(&self.profiles)
            .bind(&self.currencies)
            .bind(&self.price_ids)
            .bind(&self.versions)
            .bind(cp)
            .bind(sp)
            .bind(k1)
            .bind(k2)
            .bind(&self.assumed)
            .bind(&self.events)
            .bind(&self.late)
            .bind(c)
            .bind(st)
            .bind(it)
            .bind(ot)
            .bind(&self.finals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(price: &str) -> Identity {
        Identity {
            profile: None,
            currency: "USD".into(),
            price_id: Some(price.into()),
            coefficient_version: None,
            rates: None,
            coefficients_assumed: false,
        }
    }

    fn key() -> RowKey {
        RowKey {
            window_start: DateTime::from_timestamp(0, 0).unwrap(),
            topic: "usage".into(),
            source: "usage".into(),
            model: "m".into(),
            hardware: "h".into(),
            labels: "{}".into(),
            usage_from_tokens: false,
        }
    }

    fn sums(events: i64, compute: i64) -> Sums {
        Sums {
            events,
            compute: Decimal::from(compute),
            ..Sums::default()
        }
    }

    #[test]
    fn deltas_are_summed_per_roll_up_row_before_they_travel() {
        let at = |minute: i64| DateTime::from_timestamp(minute * 60, 0).unwrap();
        let delta = |minute: i64, price: &str, events: i64| Delta {
            key: RowKey {
                window_start: at(minute),
                ..key()
            },
            identity: identity(price),
            sums: sums(events, events * 10),
            finalizes_at: at(minute + 6),
        };
        // Three minutes of hour 0 at price a (one of them moved away: negative), one at price b,
        // one minute of hour 1 at price a.
        let deltas = [
            delta(1, "a", 2),
            delta(2, "a", 3),
            delta(3, "a", -1),
            delta(4, "b", 7),
            delta(61, "a", 5),
        ];
        let hourly = per_bucket(&deltas, 3_600_000);
        let seen: Vec<_> = hourly
            .iter()
            .map(|d| (d.start, d.first.identity.price_id.as_deref(), d.sums, d.finalizes_at))
            .collect();
        assert_eq!(
            seen,
            vec![
                (at(0), Some("a"), sums(4, 40), at(9)),
                (at(0), Some("b"), sums(7, 70), at(10)),
                (at(60), Some("a"), sums(5, 50), at(67)),
            ]
        );
        let daily = per_bucket(&deltas, crate::history::DAY_MS);
        assert_eq!(daily.len(), 2);
        assert_eq!((daily[0].start, daily[0].sums), (at(0), sums(9, 90)));
    }

    #[test]
    fn an_unchanged_price_adds_only_the_new_usage() {
        let at = DateTime::from_timestamp(60, 0).unwrap();
        let same = identity("a");
        let deltas = row_change(&key(), Some((&same, &sums(5, 50))), &sums(2, 20), &same, at);
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].sums, sums(2, 20));
    }

    #[test]
    fn a_new_price_moves_the_old_content_and_adds_the_new() {
        let at = DateTime::from_timestamp(60, 0).unwrap();
        let deltas = row_change(
            &key(),
            Some((&identity("a"), &sums(5, 50))),
            &sums(2, 20),
            &identity("b"),
            at,
        );
        assert_eq!(deltas.len(), 2);
        assert_eq!(
            (deltas[0].identity.price_id.as_deref(), deltas[0].sums),
            (Some("a"), sums(-5, -50))
        );
        assert_eq!(
            (deltas[1].identity.price_id.as_deref(), deltas[1].sums),
            (Some("b"), sums(7, 70))
        );
        let new_row = row_change(&key(), None, &sums(2, 20), &identity("b"), at);
        assert_eq!(new_row.len(), 1);
        assert_eq!(new_row[0].sums, sums(2, 20));
    }
}
