//! Recommendations: what each model's observed usage would have cost on every hardware target
//! that can price it, cheapest first, against what it actually cost; pure.
//!
//! This is the "min over M" of the cost model: for a model with usage ΣT, ΣS over a period,
//! `cost(hw) = C_C(hw) × k1(model, hw) × ΣT + C_S(hw) × k2(model, hw) × ΣS`. Every priced
//! target is a candidate, with the coefficients a flush would price with: a calibrated version
//! for the pair, a calibrated hardware default, a configured entry, or else k1 = k2 = 1, the
//! one rule of the price book. A target priced with that last one is marked assumed
//! (`coefficients_assumed`), since nothing known says how the model runs there.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::Deployment;
use crate::domain::{Coefficient, ComputeUnits, HardwareName, ModelName, Money, StorageUnits, UnitPrice};
use crate::pricing::{CoefficientSource, PriceBook, PricingError};

/// Usage of one model over a range, summed over every hardware it ran on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelUsage {
    /// The model's name, as events carry it.
    pub model: ModelName,
    /// ΣT over the range, on every hardware.
    pub compute: ComputeUnits,
    /// ΣS over the range, on every hardware.
    pub storage: StorageUnits,
    /// What the usage cost as priced (`usage_costs.total_cost`); `None` when part of it ran on
    /// unpriced hardware, so that its cost is unknown.
    pub actual_cost: Option<Money>,
    /// Events on unpriced hardware.
    pub unpriced_events: i64,
}

/// The model's usage priced on one hardware target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetCost {
    /// The target the usage is priced on.
    pub hardware: HardwareName,
    /// Cloud or edge, when the `[[pricing.hardware]]` entry says; `None` otherwise.
    pub deployment: Option<Deployment>,
    /// C_C of the target in force at the ranking instant.
    pub compute_price: UnitPrice,
    /// C_S of the target in force at the ranking instant.
    pub storage_price: UnitPrice,
    /// The compute coefficient used; see `coefficients` for where it came from.
    pub k1: Coefficient,
    /// The storage coefficient used; see `coefficients` for where it came from.
    pub k2: Coefficient,
    /// `calibrated`, `calibrated_hardware_default`, `configured` or `default` (k1 = k2 = 1).
    pub coefficients: &'static str,
    /// True when nothing configured or calibrated is known for the model here, so that k1 and
    /// k2 are the assumed 1 and 1 and `cost` is only as good as that assumption.
    pub coefficients_assumed: bool,
    /// The `coefficient_version` id the coefficients come from; `None` when they are configured.
    pub coefficient_version: Option<i64>,
    /// The observed ΣT and ΣS priced here.
    pub cost: Money,
    /// Actual cost minus `cost`: positive is money saved by running here. `None` when the
    /// actual cost is unknown.
    pub saving: Option<Money>,
    /// `saving` as a per cent of the actual cost, to 2 decimals; `None` when the actual cost is
    /// unknown or 0.
    pub saving_percent: Option<Decimal>,
}

/// One model's ranking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recommendation {
    /// The model's name, as events carry it.
    pub model: ModelName,
    /// ΣT over the range, on every hardware.
    pub compute: ComputeUnits,
    /// ΣS over the range, on every hardware.
    pub storage: StorageUnits,
    /// What the usage cost as priced; `None` when part of it ran on unpriced hardware.
    pub actual_cost: Option<Money>,
    /// Events of this model on hardware without a price; their usage is in ΣT and ΣS but not in `actual_cost`.
    pub unpriced_events: i64,
    /// The saving of the cheapest target, never below 0; `None` when the actual cost is
    /// unknown or no target is priced.
    pub potential_saving: Option<Money>,
    /// Cheapest first; ties by hardware name.
    pub targets: Vec<TargetCost>,
}

/// The answer of `recommend --json` and `GET /api/v1/recommendations`.
#[derive(Debug, Clone, Serialize)]
pub struct Recommendations {
    /// The start of the usage range (window starts from here, inclusive).
    pub from: DateTime<Utc>,
    /// The end of the usage range (exclusive).
    pub to: DateTime<Utc>,
    /// The currency of every amount (`pricing.currency`).
    pub currency: String,
    /// One ranking per model with usage in the range.
    pub models: Vec<Recommendation>,
}

/// How the text marks a target priced with the assumed k1 = k2 = 1.
pub const ASSUMED: &str = "assumed: nothing configured or calibrated for this model here";

/// Ranks every priced target for each model, with coefficients in force at `at`.
pub fn recommend(
    book: &PriceBook,
    usage: &[ModelUsage],
    at: DateTime<Utc>,
) -> Result<Vec<Recommendation>, PricingError> {
    usage.iter().map(|u| recommend_one(book, u, at)).collect()
}

fn recommend_one(book: &PriceBook, usage: &ModelUsage, at: DateTime<Utc>) -> Result<Recommendation, PricingError> {
    let mut targets = Vec::new();
    for (hardware, pricing) in book.hardware_targets(at) {
        // Every target in hardware_targets has prices, so it is priced.
        let Some(priced) = book.priced(&usage.model, hardware, at) else {
            continue;
        };
        let (rates, source) = (priced.rates, priced.source);
        let cost = rates.price(usage.compute, usage.storage)?.total_cost;
        let saving = usage
            .actual_cost
            .map(|actual| actual.value().checked_sub(cost.value()).ok_or(PricingError::Overflow))
            .transpose()?;
        let saving_percent = match (usage.actual_cost, saving) {
            (Some(actual), Some(saving)) if !actual.value().is_zero() => {
                Some((saving / actual.value() * Decimal::ONE_HUNDRED).round_dp(2).normalize())
            }
            _ => None,
        };
        targets.push(TargetCost {
            hardware: hardware.clone(),
            deployment: pricing.deployment,
            compute_price: pricing.compute_price,
            storage_price: pricing.storage_price,
            k1: rates.k1,
            k2: rates.k2,
            coefficients: source.as_str(),
            coefficients_assumed: source == CoefficientSource::Unit,
            coefficient_version: source.version(),
            cost,
            saving: saving.map(|s| Money(s.normalize())),
            saving_percent,
        });
    }
    targets.sort_by(|a, b| a.cost.cmp(&b.cost).then_with(|| a.hardware.cmp(&b.hardware)));
    let potential_saving = match (targets.first(), &usage.actual_cost) {
        (Some(cheapest), Some(_)) => cheapest.saving.map(|s| Money(s.value().max(Decimal::ZERO))),
        _ => None,
    };
    Ok(Recommendation {
        model: usage.model.clone(),
        compute: usage.compute,
        storage: usage.storage,
        actual_cost: usage.actual_cost,
        unpriced_events: usage.unpriced_events,
        potential_saving,
        targets,
    })
}

/// The human-readable form of a set of recommendations.
pub fn to_text(recommendations: &[Recommendation], currency: &str) -> String {
    let mut out = String::new();
    for r in recommendations {
        let actual = r.actual_cost.map_or_else(
            || format!("unknown ({} events on unpriced hardware)", r.unpriced_events),
            |c| format!("{c} {currency}"),
        );
        out.push_str(&format!(
            "{}: T {}, S {}, actual cost {actual}\n",
            r.model, r.compute, r.storage
        ));
        for (rank, t) in r.targets.iter().enumerate() {
            let deployment = t.deployment.map(|d| format!(" ({})", d.as_str())).unwrap_or_default();
            let saving = match (t.saving, t.saving_percent) {
                (Some(s), Some(p)) => format!(", saving {s} {currency} ({p} %)"),
                (Some(s), None) => format!(", saving {s} {currency}"),
                _ => String::new(),
            };
            let source = match t.coefficient_version {
                Some(v) => format!("{}, version {v}", t.coefficients.replace('_', " ")),
                None if t.coefficients_assumed => ASSUMED.to_owned(),
                None => t.coefficients.to_owned(),
            };
            out.push_str(&format!(
                "  {}. {}{deployment}: {} {currency}{saving}; k1 {}, k2 {} ({source})\n",
                rank + 1,
                t.hardware,
                t.cost,
                t.k1,
                t.k2,
            ));
        }
    }
    if recommendations.is_empty() {
        out.push_str("no usage in this period\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::CoefficientVersion;
    use crate::test_support::{book, coefficient, d, hardware_price, hw, model, t};

    /// The hand-computed case of the README: llama with T = 1000, S = 200 that actually cost 100.
    ///
    /// | target | C_C | C_S | k1 | k2 | cost |
    /// |---|---|---|---|---|---|
    /// | a100 (cloud, configured) | 0.08 | 0.1 | 1 | 0.5 | 80 + 10 = 90 |
    /// | jetson (edge, hardware default version 7) | 0.02 | 0.05 | 2 | 1 | 40 + 10 = 50 |
    /// | cpu (cloud, own version 9) | 0.01 | 0.01 | 6 | 2 | 60 + 4 = 64 |
    /// | tpu (nothing known: k1 = k2 = 1, assumed) | 0.001 | 0.001 | 1 | 1 | 1 + 0.2 = 1.2 |
    #[test]
    fn targets_rank_cheapest_first_with_savings_against_the_actual_cost() {
        let book = book(
            vec![
                hardware_price("a100", "0.08", "0.1", Some(Deployment::Cloud)),
                hardware_price("jetson", "0.02", "0.05", Some(Deployment::Edge)),
                hardware_price("cpu", "0.01", "0.01", Some(Deployment::Cloud)),
                hardware_price("tpu", "0.001", "0.001", None),
            ],
            vec![
                coefficient("llama", "a100", "1", "0.5"),
                coefficient("llama", "cpu", "100", "100"),
            ],
        )
        .with_versions(vec![
            CoefficientVersion {
                id: 7,
                model: None,
                hardware: hw("jetson"),
                k1: Coefficient(d("2")),
                k2: Coefficient(d("1")),
                effective_from: t("2026-01-01T00:00:00Z"),
            },
            CoefficientVersion {
                id: 9,
                model: Some(model("llama")),
                hardware: hw("cpu"),
                k1: Coefficient(d("6")),
                k2: Coefficient(d("2")),
                effective_from: t("2026-01-01T00:00:00Z"),
            },
            // Not in force yet at the time asked about.
            CoefficientVersion {
                id: 10,
                model: Some(model("llama")),
                hardware: hw("cpu"),
                k1: Coefficient(d("0.001")),
                k2: Coefficient(d("0.001")),
                effective_from: t("2026-03-01T00:00:00Z"),
            },
        ]);
        let usage = ModelUsage {
            model: model("llama"),
            compute: ComputeUnits(d("1000")),
            storage: StorageUnits(d("200")),
            actual_cost: Some(Money(d("100"))),
            unpriced_events: 0,
        };
        let r = &recommend(&book, &[usage], t("2026-02-01T00:00:00Z")).unwrap()[0];
        let ranked: Vec<(&str, String, Option<String>, Option<String>)> = r
            .targets
            .iter()
            .map(|t| {
                (
                    t.hardware.as_str(),
                    t.cost.to_string(),
                    t.saving.map(|s| s.to_string()),
                    t.saving_percent.map(|p| p.to_string()),
                )
            })
            .collect();
        assert_eq!(
            ranked,
            [
                ("tpu", "1.2".into(), Some("98.8".into()), Some("98.8".into())),
                ("jetson", "50".into(), Some("50".into()), Some("50".into())),
                ("cpu", "64".into(), Some("36".into()), Some("36".into())),
                ("a100", "90".into(), Some("10".into()), Some("10".into())),
            ]
        );
        assert!(r.targets[0].coefficients_assumed);
        assert_eq!(
            (r.targets[0].coefficients, r.targets[0].k1),
            ("default", Coefficient::ONE)
        );
        assert_eq!(r.targets[1].deployment, Some(Deployment::Edge));
        assert_eq!(r.targets[1].coefficients, "calibrated_hardware_default");
        assert_eq!(r.targets[2].coefficient_version, Some(9));
        assert_eq!(r.targets[3].coefficients, "configured");
        assert!(r.targets[1..].iter().all(|t| !t.coefficients_assumed));
        assert_eq!(r.potential_saving, Some(Money(d("98.8"))));
        let text = to_text(std::slice::from_ref(r), "USD");
        assert!(
            text.contains("  1. tpu: 1.2 USD, saving 98.8 USD (98.8 %); k1 1, k2 1 (assumed: nothing configured or calibrated for this model here)\n"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_actual_cost_gives_costs_but_no_savings() {
        let book = book(
            vec![hardware_price("a100", "0.1", "0.2", None)],
            vec![coefficient("m", "a100", "0.5", "0.8")],
        );
        let usage = ModelUsage {
            model: model("m"),
            compute: ComputeUnits(d("1000")),
            storage: StorageUnits(d("500")),
            actual_cost: None,
            unpriced_events: 3,
        };
        let r = &recommend(&book, &[usage], Utc::now()).unwrap()[0];
        assert_eq!(r.targets[0].cost, Money(d("130")));
        assert_eq!((r.targets[0].saving, r.targets[0].saving_percent), (None, None));
        assert_eq!(r.potential_saving, None);
    }

    #[test]
    fn a_model_already_on_its_cheapest_target_has_no_potential_saving() {
        let book = book(
            vec![
                hardware_price("a100", "0.1", "0.2", None),
                hardware_price("h100", "1", "1", None),
            ],
            vec![
                coefficient("m", "a100", "0.5", "0.8"),
                coefficient("m", "h100", "1", "1"),
            ],
        );
        let usage = ModelUsage {
            model: model("m"),
            compute: ComputeUnits(d("1000")),
            storage: StorageUnits(d("500")),
            actual_cost: Some(Money(d("130"))),
            unpriced_events: 0,
        };
        let r = &recommend(&book, &[usage], Utc::now()).unwrap()[0];
        assert_eq!(r.targets[0].saving, Some(Money::ZERO));
        assert_eq!(r.targets[1].saving, Some(Money(d("-1370"))));
        assert_eq!(r.targets[1].saving_percent, Some(d("-1053.85")));
        assert_eq!(r.potential_saving, Some(Money::ZERO));
    }
}
