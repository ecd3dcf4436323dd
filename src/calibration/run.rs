//! `costwatch calibrate`: turns stored bills and the usage history behind them into fitted
//! coefficient versions, one per (model, hardware) billed per model and one hardware default per
//! hardware billed for all models.
//!
//! Each bill is one observation of [`crate::calibration::fit::fit`]: its period's ΣT and ΣS of the
//! billed hardware (and model), the prices the usage was priced with, and the billed amount.
//! The maths lives in `fit.rs`; this module groups, checks and stores.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::calibration::fit::{self, Observation};
use crate::calibration::store::{self, BilledUsage, NewVersion};
use crate::domain::{Coefficient, HardwareName, ModelName, Money, UnitPrice};
use crate::pricing::PriceBook;

/// What one fit is for: a (model, hardware) pair, or a hardware default (`model` = `None`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FitTarget {
    /// The billed hardware.
    pub hardware: HardwareName,
    /// The billed model; `None` for bills covering every model on the hardware (a hardware default).
    pub model: Option<ModelName>,
}

impl fmt::Display for FitTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            Some(model) => write!(f, "{} on {}", model, self.hardware),
            None => write!(f, "{} (all models)", self.hardware),
        }
    }
}

/// A successful fit, with the coefficients a version stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FitReport {
    /// The coefficient k1 to store: fitted, or the value in force when the bills cannot determine it (with a warning).
    #[serde(flatten)]
    pub target: FitTarget,
    /// The coefficient k2 to store: fitted, or the value in force when the bills cannot determine it (with a warning).
    pub k1: Coefficient,
    /// How many bill periods the fit used.
    pub k2: Coefficient,
    /// R² of the stored coefficients; see [`Fit::r_squared`](crate::calibration::fit::Fit::r_squared).
    pub periods: usize,
    /// Mean absolute percentage error of the stored coefficients over the bills.
    pub r_squared: Option<Decimal>,
    /// In per cent.
    pub mape: Option<Decimal>,
    /// The largest `|billed - predicted|` over the bills, exact.
    pub max_residual: Money,
    /// Why the fit may be less trustworthy than its statistics suggest; empty when all is well.
    pub warnings: Vec<String>,
    /// The stored version; `None` with `--dry-run`.
    pub version: Option<i64>,
}

/// A target that could not be fitted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FitFailure {
    /// The target that failed.
    #[serde(flatten)]
    pub target: FitTarget,
    /// Why, for a person: too few periods, a currency mismatch, no usage, ...
    pub error: String,
}

/// Everything `calibrate` prints (as text, or as one JSON document with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// Only bills whose whole period starts at or after this were used; `None`: no lower bound.
    pub from: Option<DateTime<Utc>>,
    /// Only bills whose whole period ends at or before this were used; `None`: no upper bound.
    pub to: Option<DateTime<Utc>>,
    /// The instant the stored versions take effect (window starts at or after it).
    pub effective_from: DateTime<Utc>,
    /// Whether `--dry-run` was given: nothing was stored, and each fit's `version` is `None`.
    pub dry_run: bool,
    /// The currency of prices and bills (`pricing.currency`); bills in another one fail.
    pub currency: String,
    /// The targets fitted, in target order.
    pub fits: Vec<FitReport>,
    /// The targets that could not be fitted, in target order.
    pub errors: Vec<FitFailure>,
}

/// Why `calibrate` produced no report at all (failures of single targets are in [`CalibrationReport::errors`]).
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// No bill lies in the requested range; the text names the range.
    #[error("no bills {0}; import some with `costwatch bills import FILE`")]
    NoBills(String),
    /// Reading bills or usage, or storing versions, failed.
    #[error("PostgreSQL error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What to fit and how to store it.
#[derive(Debug, Clone, Copy)]
pub struct CalibrationRequest {
    /// Use only bills whose whole period starts at or after this; `None`: no lower bound.
    pub from: Option<DateTime<Utc>>,
    /// Use only bills whose whole period ends at or before this; `None`: no upper bound.
    pub to: Option<DateTime<Utc>>,
    /// Stored versions price windows starting at or after this.
    pub effective_from: DateTime<Utc>,
    /// Fit and report, but store no version.
    pub dry_run: bool,
}

/// Fits every billed target in the range and, unless it is a dry run, stores each successful
/// fit as a new coefficient version (in one transaction). Targets that fail are reported and
/// store nothing; the others are stored regardless, since each fit stands on its own bills.
pub async fn calibrate(
    pool: &PgPool,
    configured: &PriceBook,
    request: CalibrationRequest,
) -> Result<CalibrationReport, CalibrationError> {
    let book = configured.clone().with_versions(store::load_versions(pool).await?);
    let bills = store::billed_usage(pool, request.from, request.to).await?;
    if bills.is_empty() {
        return Err(CalibrationError::NoBills(describe_range(request.from, request.to)));
    }
    let (mut fits, errors) = fit_all(&book, &bills, request.effective_from);
    if !request.dry_run && !fits.is_empty() {
        let versions: Vec<NewVersion> = fits
            .iter()
            .map(|f| NewVersion {
                model: f.target.model.clone(),
                hardware: f.target.hardware.clone(),
                k1: f.k1,
                k2: f.k2,
                effective_from: request.effective_from,
                periods: f.periods,
                r_squared: f.r_squared,
                mape: f.mape,
                max_residual: f.max_residual,
                warnings: f.warnings.clone(),
                fitted_from: request.from,
                fitted_to: request.to,
            })
            .collect();
        let ids = store::insert_versions(pool, &versions).await?;
        for (fit, id) in fits.iter_mut().zip(ids) {
            fit.version = Some(id);
        }
    }
    Ok(CalibrationReport {
        from: request.from,
        to: request.to,
        effective_from: request.effective_from,
        dry_run: request.dry_run,
        currency: book.currency().to_owned(),
        fits,
        errors,
    })
}

fn describe_range(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> String {
    let show = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    match (from, to) {
        (None, None) => "are stored".to_owned(),
        (Some(from), None) => format!("with a period starting at or after {}", show(from)),
        (None, Some(to)) => format!("with a period ending at or before {}", show(to)),
        (Some(from), Some(to)) => format!("with a period inside {} .. {}", show(from), show(to)),
    }
}

/// Groups bills by target and fits each group; pure. `book` holds the configured prices and
/// coefficients and every stored version, for the coefficients a fit cannot determine.
pub fn fit_all(
    book: &PriceBook,
    bills: &[BilledUsage],
    effective_from: DateTime<Utc>,
) -> (Vec<FitReport>, Vec<FitFailure>) {
    let mut groups: BTreeMap<FitTarget, Vec<&BilledUsage>> = BTreeMap::new();
    for bill in bills {
        let target = FitTarget {
            hardware: bill.hardware.clone(),
            model: bill.model.clone(),
        };
        groups.entry(target).or_default().push(bill);
    }
    let mut fits = Vec::new();
    let mut errors = Vec::new();
    for (target, bills) in groups {
        match fit_target(book, &target, &bills, effective_from) {
            Ok(fit) => fits.push(fit),
            Err(error) => errors.push(FitFailure { target, error }),
        }
    }
    (fits, errors)
}

fn fit_target(
    book: &PriceBook,
    target: &FitTarget,
    bills: &[&BilledUsage],
    effective_from: DateTime<Utc>,
) -> Result<FitReport, String> {
    let mut warnings = Vec::new();
    if let Some(bill) = bills.iter().find(|b| b.currency != book.currency()) {
        return Err(format!(
            "the bill for {} .. {} is in {}, but prices are in {} (pricing.currency)",
            bill.period_start.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            bill.period_end.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            bill.currency,
            book.currency()
        ));
    }
    // Today's price stands in for usage recorded while the hardware had none.
    let current = book.hardware(&target.hardware, Utc::now());
    let (observations, left_out) = observations(bills, current);
    if left_out {
        warnings.push(format!(
            "part of the usage was recorded while {} had no price, and it has none now (pricing.hardware); that \
             usage is left out of the fit",
            target.hardware
        ));
    }
    let empty = bills
        .iter()
        .filter(|b| b.compute.value().is_zero() && b.storage.value().is_zero())
        .count();
    if empty > 0 {
        warnings.push(format!(
            "{empty} of {} bill periods have no recorded usage; is usage for them in window_usage?",
            bills.len()
        ));
    }

    let fit = fit::fit(&observations).map_err(|e| e.to_string())?;
    warnings.extend(fit.warnings);
    let (fallback_k1, fallback_k2) = in_force(book, target, effective_from);
    let k1 = fit.k1.unwrap_or_else(|| {
        warnings.push(format!(
            "k1 is not determined by these bills; the version keeps k1 = {fallback_k1}, the value in force"
        ));
        fallback_k1
    });
    let k2 = fit.k2.unwrap_or_else(|| {
        warnings.push(format!(
            "k2 is not determined by these bills; the version keeps k2 = {fallback_k2}, the value in force"
        ));
        fallback_k2
    });
    Ok(FitReport {
        target: target.clone(),
        k1,
        k2,
        periods: fit.periods,
        r_squared: fit.r_squared,
        mape: fit.mape,
        max_residual: fit.max_residual,
        warnings,
        version: None,
    })
}

/// One observation per bill, and whether usage recorded while the hardware was unpriced had
/// to be left out (it has no price today either).
fn observations(bills: &[&BilledUsage], current: Option<&crate::pricing::HardwarePricing>) -> (Vec<Observation>, bool) {
    let mut left_out = false;
    let observations = bills
        .iter()
        .map(|bill| {
            // Usage written while the hardware was unpriced is priced at today's price; without
            // one it cannot enter the fit.
            let (compute_money, storage_money) = match current {
                Some(p) => (
                    bill.compute_money + bill.unpriced_compute.value() * p.compute_price.value(),
                    bill.storage_money + bill.unpriced_storage.value() * p.storage_price.value(),
                ),
                None => {
                    left_out |= !bill.unpriced_compute.value().is_zero() || !bill.unpriced_storage.value().is_zero();
                    (bill.compute_money, bill.storage_money)
                }
            };
            // The usage-weighted price: exactly the price when it did not change in the
            // period, and what makes C_C × ΣT equal Σ(C_C × T) when it did.
            let average = |money: Decimal, quantity: Decimal, today: Option<UnitPrice>| {
                if quantity.is_zero() {
                    today.unwrap_or_default()
                } else {
                    UnitPrice(money.checked_div(quantity).unwrap_or_default().normalize())
                }
            };
            Observation {
                compute: bill.compute,
                storage: bill.storage,
                compute_price: average(compute_money, bill.compute.value(), current.map(|p| p.compute_price)),
                storage_price: average(storage_money, bill.storage.value(), current.map(|p| p.storage_price)),
                billed: bill.amount,
            }
        })
        .collect();
    (observations, left_out)
}

/// The coefficients in force for `target` at `at`: what a version keeps for a coefficient its
/// bills cannot determine.
fn in_force(book: &PriceBook, target: &FitTarget, at: DateTime<Utc>) -> (Coefficient, Coefficient) {
    let known = match &target.model {
        Some(model) => book
            .known_coefficients(model, &target.hardware, at)
            .map(|(k1, k2, _)| (k1, k2)),
        None => book.hardware_default(&target.hardware, at).map(|v| (v.k1, v.k2)),
    };
    known.unwrap_or((Coefficient::ONE, Coefficient::ONE))
}

impl CalibrationReport {
    /// The human-readable form: one block per fit, then the failures.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let show = |d: Option<Decimal>| d.map_or_else(|| "undefined".to_owned(), |d| d.normalize().to_string());
        for fit in &self.fits {
            out.push_str(&format!(
                "{}: k1 {}, k2 {} from {} bill periods; R² {}, MAPE {} %, largest residual {} {}\n",
                fit.target,
                fit.k1,
                fit.k2,
                fit.periods,
                show(fit.r_squared),
                show(fit.mape),
                fit.max_residual,
                self.currency
            ));
            for warning in &fit.warnings {
                out.push_str(&format!("  warning: {warning}\n"));
            }
            match fit.version {
                Some(id) => out.push_str(&format!(
                    "  stored as coefficient version {id}, in force from {}\n",
                    self.effective_from.to_rfc3339_opts(SecondsFormat::AutoSi, true)
                )),
                None => out.push_str("  not stored (--dry-run)\n"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ComputeUnits, StorageUnits};
    use crate::pricing::CoefficientVersion;
    use crate::test_support::{book as book_of, coefficient, d, hardware_price, hw, model, t};

    fn book() -> PriceBook {
        book_of(
            vec![hardware_price("gpu", "0.1", "0", None)],
            vec![coefficient("m", "gpu", "0.5", "0.7")],
        )
    }

    /// A bill of `amount` over day `day` with usage `compute`, priced at 0.1 when written.
    fn bill(day: u32, model_name: Option<&str>, compute: &str, amount: &str) -> BilledUsage {
        BilledUsage {
            period_start: t(&format!("2026-01-{day:02}T00:00:00Z")),
            period_end: t(&format!("2026-01-{:02}T00:00:00Z", day + 1)),
            hardware: hw("gpu"),
            model: model_name.map(model),
            amount: Money(d(amount)),
            currency: "USD".into(),
            compute: ComputeUnits(d(compute)),
            storage: StorageUnits(d("10")),
            compute_money: d(compute) * d("0.1"),
            storage_money: Decimal::ZERO,
            unpriced_compute: ComputeUnits::ZERO,
            unpriced_storage: StorageUnits::ZERO,
        }
    }

    #[test]
    fn bills_are_grouped_per_model_and_per_hardware_and_an_undetermined_k2_keeps_the_value_in_force() {
        // Storage is free on this hardware, so its bills say nothing about k2.
        let bills = [
            bill(1, Some("m"), "1000", "80"),
            bill(2, Some("m"), "2000", "160"),
            bill(3, Some("m"), "500", "40"),
            bill(1, None, "3000", "300"),
            bill(2, None, "1000", "100"),
        ];
        let (fits, errors) = fit_all(&book(), &bills, t("2026-02-01T00:00:00Z"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fits.len(), 2);
        assert_eq!(fits[0].target.to_string(), "gpu (all models)");
        assert_eq!((fits[0].k1, fits[0].k2), (Coefficient(d("1")), Coefficient::ONE));
        assert_eq!(fits[1].target.to_string(), "m on gpu");
        // 0.1 × k1 × T = 0.08 × T: k1 = 0.8; k2 keeps the configured 0.7.
        assert_eq!((fits[1].k1, fits[1].k2), (Coefficient(d("0.8")), Coefficient(d("0.7"))));
        assert!(fits[1]
            .warnings
            .iter()
            .any(|w| w == "k2 is not determined by these bills; the version keeps k2 = 0.7, the value in force"));
        assert_eq!(fits[1].periods, 3);
    }

    #[test]
    fn a_hardware_default_keeps_the_previous_default_version_for_what_it_cannot_determine() {
        let book = book().with_versions(vec![CoefficientVersion {
            id: 4,
            model: None,
            hardware: hw("gpu"),
            k1: Coefficient(d("2")),
            k2: Coefficient(d("3")),
            effective_from: t("2026-01-15T00:00:00Z"),
        }]);
        let bills = [bill(1, None, "3000", "300"), bill(2, None, "1000", "100")];
        let (fits, _) = fit_all(&book, &bills, t("2026-02-01T00:00:00Z"));
        assert_eq!((fits[0].k1, fits[0].k2), (Coefficient::ONE, Coefficient(d("3"))));
    }

    #[test]
    fn a_target_with_one_bill_fails_with_the_fit_error_and_the_others_still_fit() {
        let bills = [
            bill(1, Some("m"), "1000", "80"),
            bill(1, None, "3000", "300"),
            bill(2, None, "1000", "100"),
        ];
        let (fits, errors) = fit_all(&book(), &bills, t("2026-02-01T00:00:00Z"));
        assert_eq!(fits.len(), 1);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].target.to_string(), "m on gpu");
        assert_eq!(
            errors[0].error,
            "need at least 2 bill periods to fit two coefficients, got 1"
        );
    }

    #[test]
    fn a_bill_in_another_currency_is_refused() {
        let mut euro = bill(2, None, "1000", "100");
        euro.currency = "EUR".into();
        let bills = [bill(1, None, "3000", "300"), euro];
        let (_, errors) = fit_all(&book(), &bills, t("2026-02-01T00:00:00Z"));
        assert_eq!(
            errors[0].error,
            "the bill for 2026-01-02T00:00:00Z .. 2026-01-03T00:00:00Z is in EUR, but prices are in USD \
             (pricing.currency)"
        );
    }

    #[test]
    fn a_price_change_inside_a_period_is_weighted_by_usage() {
        // Half the compute at 0.1, half at 0.3: Σ(C_C × T) = 200 for T = 1000, as if C_C = 0.2.
        let mut first = bill(1, None, "1000", "200");
        first.compute_money = d("200");
        let second = bill(2, None, "1000", "100");
        let (fits, errors) = fit_all(&book(), &[first, second], t("2026-02-01T00:00:00Z"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fits[0].k1, Coefficient::ONE);
        assert_eq!(fits[0].max_residual, Money::ZERO);
    }
}
