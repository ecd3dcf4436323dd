//! The core cost model and the price book it reads from:
//! `cost = C_C(hw) * k1(model, hw) * T + C_S(hw) * k2(model, hw) * S`.

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::PricingSettings;
use crate::domain::{Coefficient, ComputeUnits, HardwareName, ModelName, Money, StorageUnits, UnitPrice};

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
