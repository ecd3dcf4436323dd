//! Typed domain values: names, quantities and money, so a T can never be passed where an S is due.
//!
//! Every quantity is an exact [`Decimal`]: summing 0.1 ten times gives exactly 1, and no cost
//! is ever computed in binary floating point.

use std::fmt;
use std::ops::{Add, AddAssign};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The longest model name, hardware name or event id we accept (in characters).
pub const MAX_NAME_CHARS: usize = 128;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long, the limit is {MAX_NAME_CHARS}")]
    TooLong(usize),
}

fn check_name(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    // Byte length bounds char count from above, so the common short case skips the count.
    if s.len() > MAX_NAME_CHARS {
        let chars = s.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(NameError::TooLong(chars));
        }
    }
    Ok(())
}

macro_rules! bounded_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` (1 to 128 characters).
            pub fn parse(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                check_name(&s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

bounded_name!(
    /// A model's name as producers send it, e.g. `qwen2-7b-instruct`.
    ModelName
);
bounded_name!(
    /// A hardware target: a GPU type, a CPU pool or an edge device, e.g. `a100-80g`.
    HardwareName
);
bounded_name!(
    /// The producer's id of one request; duplicates of it are counted once.
    EventId
);

macro_rules! decimal_quantity {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Decimal);

        impl $name {
            pub const ZERO: Self = Self(Decimal::ZERO);

            pub fn value(self) -> Decimal {
                self.0
            }
        }

        impl Add for $name {
            type Output = Self;
            fn add(self, rhs: Self) -> Self {
                Self(self.0 + rhs.0)
            }
        }

        impl AddAssign for $name {
            fn add_assign(&mut self, rhs: Self) {
                self.0 += rhs.0;
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.normalize(), f)
            }
        }
    };
}

decimal_quantity!(
    /// T: compute used, in the unit the hardware's compute price is quoted in.
    ComputeUnits
);
decimal_quantity!(
    /// S: storage used, in the unit the hardware's storage price is quoted in.
    StorageUnits
);
decimal_quantity!(
    /// An amount of money in the price book's currency.
    Money
);
decimal_quantity!(
    /// C_C or C_S: the price of one compute or storage unit on a hardware target.
    UnitPrice
);
decimal_quantity!(
    /// k1 or k2: an empirical coefficient fitted against real bills.
    Coefficient
);

impl Coefficient {
    pub const ONE: Self = Self(Decimal::ONE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn ten_tenths_sum_to_exactly_one() {
        let tenth = ComputeUnits(Decimal::from_str("0.1").unwrap());
        let mut sum = ComputeUnits::ZERO;
        for _ in 0..10 {
            sum += tenth;
        }
        assert_eq!(sum, ComputeUnits(Decimal::ONE));
        assert_eq!(sum.to_string(), "1");
    }

    #[test]
    fn names_are_bounded() {
        assert_eq!(ModelName::parse(""), Err(NameError::Empty));
        assert!(ModelName::parse("a".repeat(128)).is_ok());
        assert_eq!(HardwareName::parse("é".repeat(129)), Err(NameError::TooLong(129)));
        // 128 two-byte characters are 256 bytes but still within the character limit.
        assert!(EventId::parse("é".repeat(128)).is_ok());
    }
}
