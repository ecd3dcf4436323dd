//! `costwatch rerate`: re-prices stored window rows with the prices and coefficient versions in
//! force for each window's start, and reports what that changed.
//!
//! Window rows keep ΣT and ΣS, and their costs are derived from them in the `usage_costs` view,
//! so re-pricing only rewrites the four rates and the version columns: it is exact, and costs
//! one UPDATE of the affected rows per day of history.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::calibration::store;
pub use crate::calibration::store::{Rederived, Repriced, StoredRow};
use crate::domain::{HardwareName, ModelName, Money};
use crate::history::{day_of_ms, rollup};
use crate::pricing::profiles::UsageProfiles;
use crate::pricing::{CoefficientSource, PriceBook, PricingError, Rates};

/// The difference re-rating made for one (model, hardware) pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairDifference {
    /// The model's name, as stored.
    pub model: String,
    /// The hardware's name, as stored.
    pub hardware: String,
    /// How many window rows of the pair were read.
    pub rows: usize,
    /// How many of them got new rates (or version, price entry or currency).
    pub changed: usize,
    /// Total cost before; `None` when a row of the pair was unpriced.
    pub before: Option<Money>,
    /// Total cost after; `None` when a row of the pair has no price now.
    pub after: Option<Money>,
    /// `after - before`; `None` when either is unknown.
    pub difference: Option<Money>,
}

/// What `rerate` did (or, with `--dry-run`, would do): the text and the `--json` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RerateReport {
    /// The start of the range of window starts re-priced (inclusive).
    pub from: DateTime<Utc>,
    /// The end of the range (exclusive).
    pub to: DateTime<Utc>,
    /// Whether `--dry-run` was given: nothing was written.
    pub dry_run: bool,
    /// The currency of every amount (`pricing.currency`).
    pub currency: String,
    /// How many window rows were read.
    pub rows: usize,
    /// How many of them got new rates.
    pub changed: usize,
    /// Total cost before over all pairs; `None` when any row was unpriced.
    pub before: Option<Money>,
    /// Total cost after over all pairs; `None` when any row has no price now.
    pub after: Option<Money>,
    /// `after - before`; `None` when either is unknown.
    pub difference: Option<Money>,
    /// One entry per (model, hardware), in name order.
    pub pairs: Vec<PairDifference>,
}

/// Why `rerate` stopped; slices committed before it stay re-priced, and running it again finishes the job.
#[derive(Debug, thiserror::Error)]
pub enum RerateError {
    /// A row's cost overflowed a 96-bit decimal, with either its stored rates or its new ones.
    #[error("a window of {model} on {hardware} at {window_start}: {source}")]
    Pricing {
        /// The model of the row.
        model: String,
        /// The hardware of the row.
        hardware: String,
        /// The start of the row's window.
        window_start: DateTime<Utc>,
        /// The overflow.
        source: PricingError,
    },
    /// Reading or updating window rows failed (a deadlock with a flush included); run it again.
    #[error("PostgreSQL error: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<crate::store::StoreError> for RerateError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Database(e) => RerateError::Database(e),
            other => RerateError::Database(sqlx::Error::Protocol(other.to_string())),
        }
    }
}

/// The pairs seen so far, by (model, hardware), before their differences are taken.
pub type PairTotals = BTreeMap<(String, String), PairDifference>;

/// Re-prices `rows` with `book`, adding what they cost before and after to `pairs`, and
/// returns the rows whose stored rates change; pure.
pub fn reprice(
    book: &PriceBook,
    profiles: &UsageProfiles,
    rows: &[StoredRow],
    pairs: &mut PairTotals,
) -> Result<Vec<Repriced>, RerateError> {
    let mut changes = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let fail = |source| RerateError::Pricing {
            model: row.key.model.clone(),
            hardware: row.key.hardware.clone(),
            window_start: row.key.window_start,
            source,
        };
        let rederived = rederive(profiles, row).map_err(fail)?;
        let (compute, storage) = rederived
            .as_ref()
            .map_or((row.compute(), row.storage()), |d| (d.compute, d.storage));
        // Tokens no profile turns into T and S stay unpriced, as the daemon writes them.
        let unknown = rederived.as_ref().is_some_and(|d| d.profile.is_none());
        // Names the daemon stored are valid; a row whose are not cannot be priced at all.
        let priced = match (
            ModelName::parse(row.key.model.as_str()),
            HardwareName::parse(row.key.hardware.as_str()),
        ) {
            (Ok(model), Ok(hardware)) if !unknown => book.priced(&model, &hardware, row.key.window_start),
            _ => None,
        };
        let new_rates = priced.map(|p| p.rates);
        let new_version = priced.and_then(|p| p.source.version());
        let new_price_id = priced.map(|p| p.price_id.to_string());
        let cost = |rates: Option<Rates>, t, s| -> Result<Option<Money>, RerateError> {
            rates
                .map(|r| r.price(t, s).map(|c| c.total_cost))
                .transpose()
                .map_err(fail)
        };
        let before = cost(row.identity.rates, row.compute(), row.storage())?;
        let after = cost(new_rates, compute, storage)?;
        let rederived = rederived
            .filter(|d| (d.compute, d.storage) != (row.compute(), row.storage()) || d.profile != row.identity.profile);
        // Rates compare as numbers (0.50 is 0.5), so a row priced the same is left alone.
        let assumed = priced.is_some_and(|p| p.source == CoefficientSource::Unit);
        let changed = new_rates != row.identity.rates
            || new_version != row.identity.coefficient_version
            || new_price_id != row.identity.price_id
            || assumed != row.identity.coefficients_assumed
            || rederived.is_some()
            || row.identity.currency != book.currency();
        if changed {
            changes.push(Repriced {
                row: i,
                rates: new_rates,
                coefficient_version: new_version,
                price_id: new_price_id,
                coefficients_assumed: assumed,
                rederived,
            });
        }
        let pair = pairs
            .entry((row.key.model.clone(), row.key.hardware.clone()))
            .or_insert_with(|| PairDifference {
                model: row.key.model.clone(),
                hardware: row.key.hardware.clone(),
                rows: 0,
                changed: 0,
                before: Some(Money::ZERO),
                after: Some(Money::ZERO),
                difference: None,
            });
        pair.rows += 1;
        pair.changed += usize::from(changed);
        pair.before = add(pair.before, before);
        pair.after = add(pair.after, after);
    }
    Ok(changes)
}

/// For a row whose T and S come from tokens, T, S and profile from its tokens with `profiles`
/// (the first matching one; none: 0, 0 and no profile). `None` for a row with measured T and S.
fn rederive(profiles: &UsageProfiles, row: &StoredRow) -> Result<Option<Rederived>, PricingError> {
    if !row.key.usage_from_tokens {
        return Ok(None);
    }
    let Some(profile) = profiles
        .find(&row.key.model, &row.key.hardware)
        .and_then(|i| profiles.get(i))
    else {
        return Ok(Some(Rederived {
            compute: Default::default(),
            storage: Default::default(),
            profile: None,
        }));
    };
    let (compute, storage) = profile
        .derive(row.sums.input_tokens, row.sums.output_tokens)
        .map_err(|_| PricingError::Overflow)?;
    Ok(Some(Rederived {
        compute,
        storage,
        profile: Some(profile.name.clone()),
    }))
}

/// The report of everything added to `pairs`.
pub fn report(
    pairs: PairTotals,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    dry_run: bool,
    currency: &str,
) -> RerateReport {
    let mut pairs: Vec<PairDifference> = pairs.into_values().collect();
    for pair in &mut pairs {
        pair.difference = difference(pair.before, pair.after);
    }
    let total = |pick: fn(&PairDifference) -> Option<Money>| {
        pairs
            .iter()
            .map(pick)
            .try_fold(Money::ZERO, |sum, m| m.map(|m| normalized(sum + m)))
    };
    let (before, after) = (total(|p| p.before), total(|p| p.after));
    RerateReport {
        from,
        to,
        dry_run,
        currency: currency.to_owned(),
        rows: pairs.iter().map(|p| p.rows).sum(),
        changed: pairs.iter().map(|p| p.changed).sum(),
        before,
        after,
        difference: difference(before, after),
        pairs,
    }
}

fn add(sum: Option<Money>, cost: Option<Money>) -> Option<Money> {
    Some(normalized(sum? + cost?))
}

fn difference(before: Option<Money>, after: Option<Money>) -> Option<Money> {
    Some(Money((after?.value() - before?.value()).normalize()))
}

fn normalized(m: Money) -> Money {
    Money(m.value().normalize())
}

/// How much history one transaction re-prices: a day of one-minute windows is 1 440 rows per
/// (model, hardware, label set), so memory stays bounded however long the range.
pub const SLICE: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// Re-prices every window row starting inside `[from, to)`, one day of window starts per
/// transaction (nothing is written with `dry_run`). Each slice's rows are locked while they
/// are re-priced, so a concurrent flush into them waits. Re-rating is idempotent: a run that
/// stops half way is finished by running it again.
pub async fn rerate(
    pool: &PgPool,
    book: &PriceBook,
    profiles: &UsageProfiles,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    dry_run: bool,
) -> Result<RerateReport, RerateError> {
    let mut pairs = PairTotals::new();
    let mut start = from;
    while start < to {
        let end = start.checked_add_signed(SLICE).map_or(to, |e| e.min(to));
        rerate_slice(pool, (book, profiles), start, end, dry_run, &mut pairs).await?;
        start = end;
    }
    Ok(report(pairs, from, to, dry_run, book.currency()))
}

async fn rerate_slice(
    pool: &PgPool,
    (book, profiles): (&PriceBook, &UsageProfiles),
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    dry_run: bool,
    pairs: &mut PairTotals,
) -> Result<(), RerateError> {
    let mut tx = pool.begin().await?;
    // The slice's days first, as every flush takes them: a flush into these rows waits for our
    // COMMIT, and the roll-up deltas see the rows as they are.
    let last_ms = to.timestamp_millis() - 1;
    let days: Vec<i64> =
        (day_of_ms(from.timestamp_millis())..=day_of_ms(last_ms.max(from.timestamp_millis()))).collect();
    rollup::lock_days(&mut tx, &days).await?;
    let rows = store::lock_windows(&mut tx, from, to).await?;
    let changes = reprice(book, profiles, &rows, pairs)?;
    if dry_run || changes.is_empty() {
        tx.rollback().await?;
        return Ok(());
    }
    store::update_rates(&mut tx, &rows, &changes, book.currency()).await?;
    tx.commit().await?;
    Ok(())
}

impl RerateReport {
    /// The report for people: totals, then one line per pair.
    pub fn to_text(&self) -> String {
        let show = |m: Option<Money>| m.map_or_else(|| "unpriced".to_owned(), |m| m.to_string());
        let signed = |m: Option<Money>| {
            m.map_or_else(
                || "n/a".to_owned(),
                |m| {
                    if m.value() > Decimal::ZERO {
                        format!("+{m}")
                    } else {
                        m.to_string()
                    }
                },
            )
        };
        let instant = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut out = format!(
            "{} window rows from {} to {}: {} {}\n",
            self.rows,
            instant(self.from),
            instant(self.to),
            self.changed,
            if self.dry_run {
                "would change (--dry-run, nothing written)"
            } else {
                "re-priced"
            }
        );
        for p in &self.pairs {
            out.push_str(&format!(
                "{} on {}: {} rows, {} changed, {} -> {} {} ({})\n",
                p.model,
                p.hardware,
                p.rows,
                p.changed,
                show(p.before),
                show(p.after),
                self.currency,
                signed(p.difference)
            ));
        }
        out.push_str(&format!(
            "total: {} -> {} {} ({})\n",
            show(self.before),
            show(self.after),
            self.currency,
            signed(self.difference)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Coefficient, UnitPrice};
    use crate::test_support::{book as book_of, coefficient, d, hardware_price, t};

    fn book() -> PriceBook {
        book_of(
            vec![hardware_price("a100", "0.1", "0.2", None)],
            vec![coefficient("m", "a100", "0.5", "0.8")],
        )
    }

    fn row(hardware: &str, rates: Option<(&str, &str, &str, &str)>) -> StoredRow {
        let book = book();
        let price_id = book
            .hardware(&HardwareName::parse(hardware).unwrap(), t("2026-01-01T00:00:00Z"))
            .map(|p| p.price_id.to_string());
        let rates = rates.map(|(cp, sp, k1, k2)| Rates {
            compute_price: UnitPrice(d(cp)),
            storage_price: UnitPrice(d(sp)),
            k1: Coefficient(d(k1)),
            k2: Coefficient(d(k2)),
        });
        StoredRow {
            key: rollup::RowKey {
                window_start: t("2026-01-01T00:00:00Z"),
                topic: "usage".into(),
                source: "usage".into(),
                model: "m".into(),
                hardware: hardware.into(),
                labels: "{}".into(),
                usage_from_tokens: false,
            },
            sums: rollup::Sums {
                events: 1,
                compute: d("1000"),
                storage: d("500"),
                ..rollup::Sums::default()
            },
            identity: rollup::Identity {
                profile: None,
                currency: "USD".into(),
                price_id,
                coefficient_version: None,
                rates,
                coefficients_assumed: false,
            },
            finalizes_at: t("2026-01-01T00:02:00Z"),
        }
    }

    /// A token row written before any profile matched: T and S unknown, unpriced.
    fn token_row() -> StoredRow {
        let mut r = row("a100", None);
        r.key.usage_from_tokens = true;
        r.identity.price_id = None;
        r.sums = rollup::Sums {
            events: 2,
            input_tokens: d("1240"),
            output_tokens: d("310"),
            ..rollup::Sums::default()
        };
        r
    }

    #[test]
    fn a_profile_added_later_derives_t_and_s_of_token_rows_from_their_tokens() {
        let profiles = UsageProfiles::new(&[crate::config::UsageProfileSettings {
            name: Some("m-a100".into()),
            model: "m".into(),
            hardware: "a1*".into(),
            compute_per_input_token: d("0.5"),
            compute_per_output_token: d("2"),
            storage_per_token: d("0.001"),
        }]);
        let mut pairs = PairTotals::new();
        let changes = reprice(&book(), &profiles, &[token_row()], &mut pairs).unwrap();
        let d_ = changes[0].rederived.as_ref().unwrap();
        // T = 1240 x 0.5 + 310 x 2 = 1240, S = 1550 x 0.001 = 1.55.
        assert_eq!(
            (d_.compute.to_string(), d_.storage.to_string()),
            ("1240".into(), "1.55".into())
        );
        assert_eq!(d_.profile.as_deref(), Some("m-a100"));
        // 0.1 x 0.5 x 1240 + 0.2 x 0.8 x 1.55 = 62 + 0.248.
        let r = report(
            pairs,
            t("2026-01-01T00:00:00Z"),
            t("2026-01-02T00:00:00Z"),
            false,
            "USD",
        );
        assert_eq!((r.before, r.after), (None, Some(Money(d("62.248")))));
        // Without a profile the row stays as it is: nothing to change.
        let mut pairs = PairTotals::new();
        let unchanged = reprice(&book(), &UsageProfiles::default(), &[token_row()], &mut pairs).unwrap();
        assert!(unchanged.is_empty(), "{unchanged:?}");
    }

    #[test]
    fn only_rows_priced_differently_change_and_the_difference_is_exact() {
        let rows = [
            // Priced as the book prices it (written with trailing zeros): unchanged, 130.
            row("a100", Some(("0.10", "0.2", "0.50", "0.8"))),
            // Priced with k = 1 before the configured entry existed: 200 becomes 130.
            row("a100", Some(("0.1", "0.2", "1", "1"))),
            // Unpriced hardware stays unpriced.
            row("tpu", None),
        ];
        let mut pairs = PairTotals::new();
        let changes = reprice(&book(), &UsageProfiles::default(), &rows, &mut pairs).unwrap();
        assert_eq!(changes.iter().map(|c| c.row).collect::<Vec<_>>(), [1]);
        let report = report(
            pairs,
            t("2026-01-01T00:00:00Z"),
            t("2026-01-02T00:00:00Z"),
            false,
            "USD",
        );
        assert_eq!((report.rows, report.changed), (3, 1));
        let a100 = &report.pairs[0];
        assert_eq!((a100.rows, a100.changed), (2, 1));
        assert_eq!(
            (a100.before, a100.after, a100.difference),
            (Some(Money(d("330"))), Some(Money(d("260"))), Some(Money(d("-70"))))
        );
        let tpu = &report.pairs[1];
        assert_eq!((tpu.before, tpu.after, tpu.difference), (None, None, None));
        assert_eq!(
            (report.before, report.difference),
            (None, None),
            "a total with unpriced rows is unknown"
        );
        assert_eq!(
            report.to_text(),
            "3 window rows from 2026-01-01T00:00:00Z to 2026-01-02T00:00:00Z: 1 re-priced\n\
             m on a100: 2 rows, 1 changed, 330 -> 260 USD (-70)\n\
             m on tpu: 1 rows, 0 changed, unpriced -> unpriced USD (n/a)\n\
             total: unpriced -> unpriced USD (n/a)\n"
        );
    }
}
