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
    /// The name is the empty string.
    #[error("must not be empty")]
    Empty,
    /// The name has more than [`MAX_NAME_CHARS`] characters (the count is given).
    #[error("is {0} characters long, the limit is {MAX_NAME_CHARS}")]
    TooLong(usize),
    /// The name contains a NUL character, which PostgreSQL text cannot hold.
    #[error("must not contain NUL characters")]
    Nul,
}

/// The rule every bounded name follows (1 to 128 characters, no NUL), for callers that check a
/// borrowed name before deciding whether to keep it.
pub fn check_name(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    // PostgreSQL text cannot hold NUL: such a name would fail every flush it is part of.
    if s.contains('\0') {
        return Err(NameError::Nul);
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

            /// The name as given.
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
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Decimal);

        /// A decimal string without trailing zeros ("50", not "50.000"): exact, and JSON-safe.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0.normalize())
            }
        }

        impl $name {
            /// Zero, e.g. to start a sum.
            pub const ZERO: Self = Self(Decimal::ZERO);

            /// The exact decimal, for arithmetic and SQL binds.
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

        impl From<Decimal> for $name {
            fn from(d: Decimal) -> Self {
                Self(d)
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
    /// 1: the coefficient when nothing is known about a pair.
    pub const ONE: Self = Self(Decimal::ONE);
}

/// Deserializes an exact decimal from `"0.1"` or `1`, and refuses `0.1`: a float has already
/// lost exactness by the time we see it, so asking for a string beats pricing with a rounded
/// number. Used for prices in config and for API inputs.
pub fn exact_decimal<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<Decimal>,
{
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Decimal;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a decimal number written as a string, e.g. \"0.1\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Decimal, E> {
            let t = v.trim();
            Decimal::from_str_exact(t)
                .or_else(|_| Decimal::from_scientific(t))
                .map_err(|_| E::custom(format!("{v:?} is not a decimal number")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Decimal, E> {
            Err(E::custom(format!(
                "write {v} as a string (\"{v}\") so that it stays an exact decimal"
            )))
        }
    }
    d.deserialize_any(Visitor).map(T::from)
}

/// The same, for optional fields (`null` or absent is `None`).
pub fn exact_decimal_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<Decimal>,
{
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "exact_decimal")] Decimal);
    Ok(Option::<Wrap>::deserialize(d)?.map(|w| T::from(w.0)))
}

/// Deserializes a ratio such as a budget threshold (`0.8`) or a drift factor (`3`). Unlike
/// money, a ratio may be written as a TOML float: it is read back through its shortest decimal
/// form, so `0.8` becomes exactly 0.8.
pub fn fraction<'de, D>(d: D) -> Result<Decimal, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Decimal;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number such as 0.8")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Decimal, E> {
            Decimal::from_str_exact(v.trim()).map_err(|_| E::custom(format!("{v:?} is not a number")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Decimal, E> {
            Decimal::from_str_exact(&v.to_string()).map_err(|_| E::custom(format!("{v} is out of range")))
        }
    }
    d.deserialize_any(Visitor)
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
        assert_eq!(ModelName::parse("a\0b"), Err(NameError::Nul));
    }
}
