//! Duration keys (`"500ms"`, `"10s"`, `"1m"`, `"7d"`): humantime's syntax, except months.
//!
//! In humantime `M` is a month (30.44 days) and `m` a minute, so `dedup_horizon = "1M"` keeps
//! a month of ids where a minute was meant, and nothing says so. No costwatch duration is
//! naturally counted in months, so every month unit (`M`, `month`, `months`) is refused with
//! the fix; a long period is written in days (`30d`).
//!
//! `config.rs` imports this module under the name `humantime_serde`, so every
//! `#[serde(with = "humantime_serde")]` field there, present and future, is read through it.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Reads a duration key; see the module documentation.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Parses `text` as humantime does, refusing month units with a message that says what to
/// write instead.
pub fn parse(text: &str) -> Result<Duration, String> {
    let units = text.split(|c: char| !c.is_ascii_alphabetic()).filter(|u| !u.is_empty());
    for unit in units {
        if unit == "M" {
            return Err(format!(
                "{text:?} means months (M is a month, m a minute); write {:?} for minutes, or days such as \"30d\"",
                text.replace('M', "m")
            ));
        }
        if unit.starts_with("month") {
            return Err(format!(
                "{text:?} counts in months, which costwatch refuses (M and m are easily swapped); write days such as \"30d\""
            ));
        }
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as \"10s\", \"5m\" or \"7d\": {e}"))
}

/// The same for an optional key (`with = "humantime_serde::option"`).
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Reads an optional duration key; absent or `null` is `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| super::parse(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_hours_and_days_parse_and_months_are_refused_with_the_fix() {
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(
            parse("1M").unwrap_err(),
            "\"1M\" means months (M is a month, m a minute); write \"1m\" for minutes, or days such as \"30d\""
        );
        assert!(parse("2months").unwrap_err().contains("write days such as \"30d\""));
        assert!(parse("1month 2d").is_err());
        assert!(parse("5 minutes").is_ok());
        assert!(parse("soon").unwrap_err().starts_with("\"soon\" is not a duration"));
    }
}
