//! Shorthands for unit tests: literals as typed values.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::config::{CoefficientEntry, Deployment, HardwarePrice, PricingSettings};
use crate::domain::{Coefficient, HardwareName, ModelName, UnitPrice};
use crate::pricing::PriceBook;

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub fn t(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).unwrap().with_timezone(&Utc)
}

pub fn hw(s: &str) -> HardwareName {
    HardwareName::parse(s).unwrap()
}

pub fn model(s: &str) -> ModelName {
    ModelName::parse(s).unwrap()
}

/// C_C and C_S of one hardware target, as a configuration entry.
pub fn hardware_price(name: &str, cc: &str, cs: &str, deployment: Option<Deployment>) -> HardwarePrice {
    HardwarePrice {
        name: hw(name),
        compute_price: UnitPrice(d(cc)),
        storage_price: UnitPrice(d(cs)),
        deployment,
        effective_from: None,
    }
}

/// k1 and k2 of one (model, hardware) pair, as a configuration entry.
pub fn coefficient(m: &str, h: &str, k1: &str, k2: &str) -> CoefficientEntry {
    CoefficientEntry {
        model: model(m),
        hardware: hw(h),
        k1: Coefficient(d(k1)),
        k2: Coefficient(d(k2)),
    }
}

/// A price book in USD from configuration entries.
pub fn book(hardware: Vec<HardwarePrice>, coefficients: Vec<CoefficientEntry>) -> PriceBook {
    PriceBook::from_settings(&PricingSettings {
        currency: "USD".into(),
        hardware,
        coefficients,
    })
}
