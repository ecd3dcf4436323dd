//! Shorthands for unit tests: literals as typed values.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::domain::{HardwareName, ModelName};

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
