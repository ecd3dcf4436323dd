//! The core cost model and the price book it reads from:
//! `cost = C_C(hw) * k1(model, hw) * T + C_S(hw) * k2(model, hw) * S`.

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::config::PricingSettings;
use crate::domain::{
    exact_decimal, exact_decimal_opt, Coefficient, ComputeUnits, HardwareName, ModelName, Money, StorageUnits,
    UnitPrice,
};

/// The four numbers that price one (model, hardware) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rates {
    pub compute_price: UnitPrice,
    pub storage_price: UnitPrice,
    pub k1: Coefficient,
    pub k2: Coefficient,
}

/// What a quantity of usage costs, split by component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CostBreakdown {
    // Serialized normalized ("50", not "50.000") by `Money`'s serde impl.
    pub compute_cost: Money,
    pub storage_cost: Money,
    pub total_cost: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("the cost does not fit in a 96-bit decimal; check the prices and quantities for typos")]
    Overflow,
}

impl Rates {
    /// Prices `compute` and `storage` exactly; no rounding happens anywhere.
    pub fn price(&self, compute: ComputeUnits, storage: StorageUnits) -> Result<CostBreakdown, PricingError> {
        let component = |price: Decimal, k: Decimal, quantity: Decimal| {
            price
                .checked_mul(k)
                .and_then(|rate| rate.checked_mul(quantity))
                .ok_or(PricingError::Overflow)
        };
        let compute_cost = component(self.compute_price.0, self.k1.0, compute.0)?;
        let storage_cost = component(self.storage_price.0, self.k2.0, storage.0)?;
        let total_cost = compute_cost.checked_add(storage_cost).ok_or(PricingError::Overflow)?;
        Ok(CostBreakdown {
            compute_cost: Money(compute_cost.normalize()),
            storage_cost: Money(storage_cost.normalize()),
            total_cost: Money(total_cost.normalize()),
        })
    }
}

/// Prices per hardware target and coefficients per (model, hardware), as loaded from config.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    currency: String,
    hardware: HashMap<HardwareName, (UnitPrice, UnitPrice)>,
    coefficients: HashMap<(ModelName, HardwareName), (Coefficient, Coefficient)>,
}

impl PriceBook {
    /// Builds the book from validated settings.
    pub fn from_settings(settings: &PricingSettings) -> Self {
        let hardware = settings
            .hardware
            .iter()
            .map(|h| (h.name.clone(), (h.compute_price, h.storage_price)))
            .collect();
        let coefficients = settings
            .coefficients
            .iter()
            .map(|c| ((c.model.clone(), c.hardware.clone()), (c.k1, c.k2)))
            .collect();
        Self {
            currency: settings.currency.clone(),
            hardware,
            coefficients,
        }
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The rates for a pair, or `None` when the hardware has no price (the pair is *unpriced*).
    /// A priced hardware with no coefficient entry for the model uses k1 = k2 = 1.
    pub fn rates(&self, model: &ModelName, hardware: &HardwareName) -> Option<Rates> {
        let (compute_price, storage_price) = *self.hardware.get(hardware)?;
        let (k1, k2) = self
            .coefficients
            .get(&(model.clone(), hardware.clone()))
            .copied()
            .unwrap_or((Coefficient::ONE, Coefficient::ONE));
        Some(Rates {
            compute_price,
            storage_price,
            k1,
            k2,
        })
    }
}

/// What to price in an estimate: explicit prices, or a (model, hardware) from the price book;
/// explicit k1/k2 override either.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstimateRequest {
    #[serde(deserialize_with = "exact_decimal")]
    pub compute: ComputeUnits,
    #[serde(deserialize_with = "exact_decimal")]
    pub storage: StorageUnits,
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub compute_price: Option<UnitPrice>,
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub storage_price: Option<UnitPrice>,
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub k1: Option<Coefficient>,
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub k2: Option<Coefficient>,
    #[serde(default)]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub hardware: Option<HardwareName>,
}

/// A priced estimate, with everything that went into it.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub compute: ComputeUnits,
    pub storage: StorageUnits,
    #[serde(flatten)]
    pub rates: Rates,
    #[serde(flatten)]
    pub cost: CostBreakdown,
    pub currency: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    #[error("give either compute_price and storage_price, or model and hardware")]
    NoRates,
    #[error("give both compute_price and storage_price")]
    HalfPrices,
    #[error("give both model and hardware")]
    HalfPair,
    #[error("model and hardware read the price book, which is not loaded (pass --config)")]
    NoPriceBook,
    #[error("hardware {0} has no price in the price book (pricing.hardware), so its usage is unpriced")]
    Unpriced(HardwareName),
    #[error("{0} must not be negative, got {1}")]
    Negative(&'static str, Decimal),
    #[error(transparent)]
    Pricing(#[from] PricingError),
}

impl EstimateRequest {
    /// Resolves the rates (explicit, or from `book`) and prices the request.
    pub fn price(&self, book: Option<&PriceBook>) -> Result<Estimate, EstimateError> {
        let (mut rates, currency) = match (&self.model, &self.hardware, self.compute_price, self.storage_price) {
            (Some(model), Some(hardware), None, None) => {
                let book = book.ok_or(EstimateError::NoPriceBook)?;
                let rates = book
                    .rates(model, hardware)
                    .ok_or_else(|| EstimateError::Unpriced(hardware.clone()))?;
                (rates, Some(book.currency().to_owned()))
            }
            (None, None, Some(compute_price), Some(storage_price)) => (
                Rates {
                    compute_price,
                    storage_price,
                    k1: Coefficient::ONE,
                    k2: Coefficient::ONE,
                },
                book.map(|b| b.currency().to_owned()),
            ),
            (Some(_), None, _, _) | (None, Some(_), _, _) => return Err(EstimateError::HalfPair),
            (None, None, Some(_), None) | (None, None, None, Some(_)) => return Err(EstimateError::HalfPrices),
            _ => return Err(EstimateError::NoRates),
        };
        if let Some(k1) = self.k1 {
            rates.k1 = k1;
        }
        if let Some(k2) = self.k2 {
            rates.k2 = k2;
        }
        for (name, v) in [
            ("compute", self.compute.0),
            ("storage", self.storage.0),
            ("compute_price", rates.compute_price.0),
            ("storage_price", rates.storage_price.0),
            ("k1", rates.k1.0),
            ("k2", rates.k2.0),
        ] {
            if v < Decimal::ZERO {
                return Err(EstimateError::Negative(name, v));
            }
        }
        let cost = rates.price(self.compute, self.storage)?;
        Ok(Estimate {
            compute: self.compute,
            storage: self.storage,
            rates,
            cost,
            currency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn worked_example_costs_130() {
        let rates = Rates {
            compute_price: UnitPrice(d("0.1")),
            storage_price: UnitPrice(d("0.2")),
            k1: Coefficient(d("0.5")),
            k2: Coefficient(d("0.8")),
        };
        let cost = rates.price(ComputeUnits(d("1000")), StorageUnits(d("500"))).unwrap();
        assert_eq!(cost.compute_cost.to_string(), "50");
        assert_eq!(cost.storage_cost.to_string(), "80");
        assert_eq!(cost.total_cost.to_string(), "130");
    }

    #[test]
    fn overflow_is_an_error_not_a_wrong_number() {
        let rates = Rates {
            compute_price: UnitPrice(Decimal::MAX),
            storage_price: UnitPrice(Decimal::ZERO),
            k1: Coefficient(d("2")),
            k2: Coefficient::ONE,
        };
        assert_eq!(
            rates.price(ComputeUnits(Decimal::ONE), StorageUnits::ZERO),
            Err(PricingError::Overflow)
        );
    }
}

#[cfg(test)]
mod estimate_tests {
    use super::*;

    #[test]
    fn json_numbers_and_strings_both_work_but_floats_are_refused() {
        let r: EstimateRequest = serde_json::from_str(
            r#"{"compute": 1000, "storage": "500", "compute_price": "0.1", "storage_price": "0.2", "k1": "0.5", "k2": "0.8"}"#,
        )
        .unwrap();
        let e = r.price(None).unwrap();
        assert_eq!(e.cost.total_cost.to_string(), "130");
        let err = serde_json::from_str::<EstimateRequest>(r#"{"compute": 0.1, "storage": 1}"#).unwrap_err();
        assert!(err.to_string().contains("write 0.1 as a string"), "{err}");
    }

    #[test]
    fn incomplete_requests_say_what_is_missing() {
        let r: EstimateRequest = serde_json::from_str(r#"{"compute": 1, "storage": 1, "compute_price": "1"}"#).unwrap();
        assert_eq!(r.price(None).unwrap_err(), EstimateError::HalfPrices);
        let r: EstimateRequest = serde_json::from_str(r#"{"compute": 1, "storage": 1, "model": "m"}"#).unwrap();
        assert_eq!(r.price(None).unwrap_err(), EstimateError::HalfPair);
        let r: EstimateRequest =
            serde_json::from_str(r#"{"compute": "-1", "storage": 1, "compute_price": "1", "storage_price": "1"}"#)
                .unwrap();
        assert_eq!(
            r.price(None).unwrap_err().to_string(),
            "compute must not be negative, got -1"
        );
    }
}
