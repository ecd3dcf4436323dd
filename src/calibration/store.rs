//! PostgreSQL side of calibration, re-rating and recommendations: bills, coefficient versions,
//! the usage behind each bill, window rows to re-price, and usage per model.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

use crate::calibration::bills::{bill_key, Bill};
use crate::calibration::recommend::ModelUsage;
use crate::domain::{Coefficient, ComputeUnits, HardwareName, ModelName, Money, StorageUnits};
use crate::history::rollup;
use crate::pricing::{CoefficientVersion, Rates};
use crate::store::StoreError;

/// One stored window row, as `rerate` reads it: its key, sums and identity (what priced it),
/// which are also what its roll-up deltas need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// The row's key.
    pub key: rollup::RowKey,
    /// Its sums.
    pub sums: rollup::Sums,
    /// How it is priced now (`rates` is `None` when it was written unpriced).
    pub identity: rollup::Identity,
    /// Its `finalizes_at`.
    pub finalizes_at: DateTime<Utc>,
}

impl StoredRow {
    /// ΣT of the row.
    pub fn compute(&self) -> ComputeUnits {
        ComputeUnits(self.sums.compute)
    }

    /// ΣS of the row.
    pub fn storage(&self) -> StorageUnits {
        StorageUnits(self.sums.storage)
    }
}

/// A row whose rates change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repriced {
    /// The index of the row in the slice [`lock_windows`] returned.
    pub row: usize,
    /// The new rates; `None` when the row's hardware has no price any more.
    pub rates: Option<Rates>,
    /// The coefficient version of the new rates; `None` for configured or default coefficients.
    pub coefficient_version: Option<i64>,
    /// The price entry of the new rates, as hex; `None` when unpriced.
    pub price_id: Option<String>,
    /// The new rates' coefficients are the assumed k1 = k2 = 1.
    pub coefficients_assumed: bool,
    /// For a row whose T and S come from tokens: T, S and profile derived anew from its tokens
    /// with the usage profiles in force.
    pub rederived: Option<Rederived>,
}

/// T and S of a token row derived again from its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rederived {
    /// ΣT from the tokens (0 without a profile).
    pub compute: ComputeUnits,
    /// ΣS from the tokens (0 without a profile).
    pub storage: StorageUnits,
    /// The profile's name; `None` when none matches (the row is unpriced).
    pub profile: Option<String>,
}

/// What an import did, bill by bill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Bills not stored before.
    pub inserted: usize,
    /// Bills stored before with another amount or currency, now replaced.
    pub updated: usize,
    /// Bills stored before exactly so; left alone.
    pub unchanged: usize,
}

/// Stores `bills` in one transaction. A bill already stored under the same key keeps its row;
/// its amount is replaced only when it differs (numerically: `1.50` is `1.5`), so importing a
/// file twice changes nothing.
pub async fn import_bills(pool: &PgPool, bills: &[Bill]) -> Result<ImportOutcome, sqlx::Error> {
    let keys: Vec<String> = bills.iter().map(bill_key).collect();
    let rows = sqlx::query(
        "INSERT INTO bill AS b (bill_key, period_start, period_end, hardware, model, amount, currency)
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::text[],
                              $6::numeric[], $7::text[])
         ON CONFLICT (bill_key) DO UPDATE
             SET amount = excluded.amount, currency = excluded.currency, updated_at = now()
             WHERE b.amount <> excluded.amount OR b.currency <> excluded.currency
         RETURNING (xmax = 0) AS inserted",
    )
    .bind(&keys)
    .bind(bills.iter().map(|b| b.period_start).collect::<Vec<_>>())
    .bind(bills.iter().map(|b| b.period_end).collect::<Vec<_>>())
    .bind(bills.iter().map(|b| b.hardware.as_str()).collect::<Vec<_>>())
    .bind(
        bills
            .iter()
            .map(|b| b.model.as_ref().map(ModelName::as_str))
            .collect::<Vec<_>>(),
    )
    .bind(bills.iter().map(|b| b.amount.value()).collect::<Vec<_>>())
    .bind(bills.iter().map(|b| b.currency.as_str()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let inserted = rows.iter().filter(|r| r.get::<bool, _>("inserted")).count();
    let updated = rows.len() - inserted;
    Ok(ImportOutcome {
        inserted,
        updated,
        unchanged: bills.len() - rows.len(),
    })
}

/// A stored bill with the usage recorded for its hardware (and model) over its period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BilledUsage {
    /// The first instant billed.
    pub period_start: DateTime<Utc>,
    /// The end of the billed period (exclusive).
    pub period_end: DateTime<Utc>,
    /// The billed hardware.
    pub hardware: HardwareName,
    /// The billed model; `None` when the bill covers every model on the hardware.
    pub model: Option<ModelName>,
    /// The billed amount.
    pub amount: Money,
    /// The bill's currency, as the file gave it.
    pub currency: String,
    /// ΣT over the windows that start inside the period.
    pub compute: ComputeUnits,
    /// ΣS over the same windows.
    pub storage: StorageUnits,
    /// Σ(T × C_C) over the windows priced when written, with the price they were written with.
    pub compute_money: Decimal,
    /// Σ(S × C_S) likewise.
    pub storage_money: Decimal,
    /// ΣT and ΣS of the windows written while the hardware had no price.
    pub unpriced_compute: ComputeUnits,
    /// ΣS of the windows written while the hardware had no price.
    pub unpriced_storage: StorageUnits,
}

/// Every bill whose whole period lies inside `[from, to)` (unbounded where `None`), with the
/// usage of its hardware (and model, or all models) in the windows starting inside the period.
pub async fn billed_usage(
    pool: &PgPool,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Vec<BilledUsage>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT b.period_start, b.period_end, b.hardware, b.model, b.amount, b.currency,
                COALESCE(sum(w.compute), 0) AS compute,
                COALESCE(sum(w.storage), 0) AS storage,
                COALESCE(sum(w.compute * w.compute_price), 0) AS compute_money,
                COALESCE(sum(w.storage * w.storage_price), 0) AS storage_money,
                COALESCE(sum(w.compute) FILTER (WHERE w.compute_price IS NULL), 0) AS unpriced_compute,
                COALESCE(sum(w.storage) FILTER (WHERE w.storage_price IS NULL), 0) AS unpriced_storage
         FROM bill b
         LEFT JOIN LATERAL usage_between(b.period_start, b.period_end) w
                ON w.hardware = b.hardware AND (b.model IS NULL OR w.model = b.model)
         WHERE ($1::timestamptz IS NULL OR b.period_start >= $1)
           AND ($2::timestamptz IS NULL OR b.period_end <= $2)
         GROUP BY b.id
         ORDER BY b.hardware, b.model NULLS FIRST, b.period_start",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(BilledUsage {
                period_start: r.get("period_start"),
                period_end: r.get("period_end"),
                hardware: stored_name(r.get("hardware"), HardwareName::parse)?,
                model: r
                    .get::<Option<String>, _>("model")
                    .map(|m| stored_name(m, ModelName::parse))
                    .transpose()?,
                amount: Money(r.get("amount")),
                currency: r.get("currency"),
                compute: ComputeUnits(r.get("compute")),
                storage: StorageUnits(r.get("storage")),
                compute_money: r.get("compute_money"),
                storage_money: r.get("storage_money"),
                unpriced_compute: ComputeUnits(r.get("unpriced_compute")),
                unpriced_storage: StorageUnits(r.get("unpriced_storage")),
            })
        })
        .collect()
}

/// Names in the database were validated on the way in; one that is not valid now is corrupt.
fn stored_name<T, E: std::fmt::Display>(s: String, parse: impl Fn(String) -> Result<T, E>) -> Result<T, sqlx::Error> {
    let shown = s.clone();
    parse(s).map_err(|e| sqlx::Error::Decode(format!("stored name {shown:?} is invalid: {e}").into()))
}

/// A fitted version to store, with the statistics `calibrate` printed for it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVersion {
    /// The model the version is for; `None` for the hardware default.
    pub model: Option<ModelName>,
    /// The hardware the version is for.
    pub hardware: HardwareName,
    /// The fitted (or kept) compute coefficient.
    pub k1: Coefficient,
    /// The fitted (or kept) storage coefficient.
    pub k2: Coefficient,
    /// Windows starting at or after this are priced with the version.
    pub effective_from: DateTime<Utc>,
    /// How many bill periods the fit used.
    pub periods: usize,
    /// R² of the fit, for the record.
    pub r_squared: Option<Decimal>,
    /// Mean absolute percentage error, in per cent, for the record.
    pub mape: Option<Decimal>,
    /// The largest residual of the fit, exact.
    pub max_residual: Money,
    /// The fit's warnings, stored as a JSON array.
    pub warnings: Vec<String>,
    /// The `--from` the bills were selected with; `None` when unbounded.
    pub fitted_from: Option<DateTime<Utc>>,
    /// The `--to` the bills were selected with; `None` when unbounded.
    pub fitted_to: Option<DateTime<Utc>>,
}

/// Stores `versions` in one transaction and returns their ids, in order. The daemon's next
/// poll picks them up.
pub async fn insert_versions(pool: &PgPool, versions: &[NewVersion]) -> Result<Vec<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut ids = Vec::with_capacity(versions.len());
    for v in versions {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO coefficient_version (model, hardware, k1, k2, effective_from, periods, r_squared, mape,
                                              max_residual, warnings, fitted_from, fitted_to)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             RETURNING id",
        )
        .bind(v.model.as_ref().map(ModelName::as_str))
        .bind(v.hardware.as_str())
        .bind(v.k1.value())
        .bind(v.k2.value())
        .bind(v.effective_from)
        .bind(i32::try_from(v.periods).unwrap_or(i32::MAX))
        .bind(v.r_squared)
        .bind(v.mape)
        .bind(v.max_residual.value())
        .bind(sqlx::types::Json(&v.warnings))
        .bind(v.fitted_from)
        .bind(v.fitted_to)
        .fetch_one(&mut *tx)
        .await?;
        ids.push(id);
    }
    tx.commit().await?;
    Ok(ids)
}

/// Every stored coefficient version; there are a handful per hardware target, so loading all
/// of them is cheaper than being clever.
pub async fn load_versions(pool: &PgPool) -> Result<Vec<CoefficientVersion>, sqlx::Error> {
    let rows = sqlx::query("SELECT id, model, hardware, k1, k2, effective_from FROM coefficient_version ORDER BY id")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(CoefficientVersion {
                id: r.get("id"),
                model: r
                    .get::<Option<String>, _>("model")
                    .map(|m| stored_name(m, ModelName::parse))
                    .transpose()?,
                hardware: stored_name(r.get("hardware"), HardwareName::parse)?,
                k1: Coefficient(r.get("k1")),
                k2: Coefficient(r.get("k2")),
                effective_from: r.get("effective_from"),
            })
        })
        .collect()
}

/// The highest version id and the number of versions: what the daemon polls to notice a change
/// (the count too, in case a version was deleted by hand).
pub async fn version_marker(pool: &PgPool) -> Result<(Option<i64>, i64), sqlx::Error> {
    let row = sqlx::query("SELECT max(id) AS newest, count(*) AS n FROM coefficient_version")
        .fetch_one(pool)
        .await?;
    Ok((row.get("newest"), row.get("n")))
}

/// Per model with usage in windows starting inside `[from, to)`.
pub async fn usage_by_model(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<ModelUsage>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT model, sum(compute) AS compute, sum(storage) AS storage,
                CASE WHEN bool_and(compute_price IS NOT NULL AND storage_price IS NOT NULL)
                     THEN sum(compute * compute_price * k1 + storage * storage_price * k2) END AS actual_cost,
                COALESCE(sum(events) FILTER (WHERE compute_price IS NULL OR storage_price IS NULL), 0)::int8
                    AS unpriced_events
         FROM usage_between($1, $2)
         GROUP BY model ORDER BY model",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ModelUsage {
                model: stored_name(r.get("model"), ModelName::parse)?,
                compute: ComputeUnits(r.get("compute")),
                storage: StorageUnits(r.get("storage")),
                actual_cost: r.get::<Option<Decimal>, _>("actual_cost").map(|c| Money(c.normalize())),
                unpriced_events: r.get("unpriced_events"),
            })
        })
        .collect()
}

/// Locks and reads the window rows starting in `[from, to)`, in key order, for `rerate`. A
/// flush adding to one of these rows waits for the transaction's COMMIT. Should the two lock
/// orders cross, PostgreSQL aborts one as a deadlock: the flush retries by itself, and rerate
/// reports the error and can simply be run again.
pub async fn lock_windows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<StoredRow>, sqlx::Error> {
    Ok(sqlx::query(
        "SELECT window_start, topic, source, model, hardware, labels::text AS labels, usage_from_tokens, profile,
                events, late_events, compute, storage, input_tokens, output_tokens, compute_price, storage_price,
                k1, k2, coefficients_assumed, coefficient_version, price_id, currency, finalizes_at
         FROM window_usage
         WHERE window_start >= $1 AND window_start < $2
         ORDER BY model, hardware, labels, topic, source, usage_from_tokens, window_start
         FOR UPDATE",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&mut **tx)
    .await?
    .iter()
    .map(stored_row)
    .collect())
}

/// Writes the new rates of the `changes` among `rows` (read by [`lock_windows`]), and moves
/// each changed row's content to its new identity in the roll-ups. Call with the rows' days
/// locked ([`rollup::lock_days`]).
pub async fn update_rates(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[StoredRow],
    changes: &[Repriced],
    currency: &str,
) -> Result<(), StoreError> {
    let rate = |pick: fn(&Rates) -> Decimal| -> Vec<Option<Decimal>> {
        changes.iter().map(|c| c.rates.as_ref().map(pick)).collect()
    };
    let key = |c: &Repriced| &rows[c.row].key;
    sqlx::query(
        "UPDATE window_usage AS w
            SET compute_price = u.cp, storage_price = u.sp, k1 = u.k1, k2 = u.k2, coefficient_version = u.cv,
                price_id = u.pi, coefficients_assumed = u.ass, currency = $15, updated_at = now(),
                compute = CASE WHEN u.rd THEN u.c ELSE w.compute END,
                storage = CASE WHEN u.rd THEN u.st ELSE w.storage END,
                profile = CASE WHEN u.rd THEN u.prof ELSE w.profile END
         FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[],
                     $8::numeric[], $9::numeric[], $10::numeric[], $11::numeric[], $12::int8[], $13::text[],
                     $14::bool[], $16::bool[], $17::numeric[], $18::numeric[], $19::text[])
              AS u(s, t, src, m, h, l, uft, cp, sp, k1, k2, cv, pi, ass, rd, c, st, prof)
         WHERE w.window_start = u.s AND w.topic = u.t AND w.source = u.src AND w.model = u.m AND w.hardware = u.h
           AND w.labels = u.l::jsonb AND w.usage_from_tokens = u.uft",
    )
    .bind(changes.iter().map(|c| key(c).window_start).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| key(c).topic.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| key(c).source.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| key(c).model.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| key(c).hardware.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| key(c).labels.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| key(c).usage_from_tokens).collect::<Vec<_>>())
    .bind(rate(|r| r.compute_price.value()))
    .bind(rate(|r| r.storage_price.value()))
    .bind(rate(|r| r.k1.value()))
    .bind(rate(|r| r.k2.value()))
    .bind(changes.iter().map(|c| c.coefficient_version).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.price_id.as_deref()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.coefficients_assumed).collect::<Vec<_>>())
    .bind(currency)
    .bind(changes.iter().map(|c| c.rederived.is_some()).collect::<Vec<_>>())
    .bind(
        changes
            .iter()
            .map(|c| c.rederived.as_ref().map(|d| d.compute.value()))
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .iter()
            .map(|c| c.rederived.as_ref().map(|d| d.storage.value()))
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .iter()
            .map(|c| c.rederived.as_ref().and_then(|d| d.profile.clone()))
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    rollup::apply(tx, &repriced_deltas(rows, changes, currency)).await
}

/// The roll-up deltas of re-pricing `changes` among `rows`: each row's content moves to its new
/// identity, and T and S derived anew change by their difference.
fn repriced_deltas(rows: &[StoredRow], changes: &[Repriced], currency: &str) -> Vec<rollup::Delta> {
    changes
        .iter()
        .flat_map(|c| {
            let stored = &rows[c.row];
            let new = rollup::Identity {
                profile: match &c.rederived {
                    Some(d) => d.profile.clone(),
                    None => stored.identity.profile.clone(),
                },
                currency: currency.to_owned(),
                price_id: c.price_id.clone(),
                coefficient_version: c.coefficient_version,
                rates: c.rates,
                coefficients_assumed: c.coefficients_assumed,
            };
            // T and S derived anew change by the difference; everything else stays.
            let change = match &c.rederived {
                Some(d) => rollup::Sums {
                    compute: d.compute.value() - stored.sums.compute,
                    storage: d.storage.value() - stored.sums.storage,
                    ..rollup::Sums::default()
                },
                None => rollup::Sums::default(),
            };
            rollup::row_change(
                &stored.key,
                Some((&stored.identity, &stored.sums)),
                &change,
                &new,
                stored.finalizes_at,
            )
        })
        .collect()
}

fn stored_row(r: &sqlx::postgres::PgRow) -> StoredRow {
    StoredRow {
        key: rollup::RowKey {
            window_start: r.get("window_start"),
            topic: r.get("topic"),
            source: r.get("source"),
            model: r.get("model"),
            hardware: r.get("hardware"),
            labels: r.get("labels"),
            usage_from_tokens: r.get("usage_from_tokens"),
        },
        sums: rollup::Sums::from_row(r),
        identity: rollup::Identity::from_row(r),
        finalizes_at: r.get("finalizes_at"),
    }
}
