//! What a cost query may ask for, checked before any SQL is built: the dimensions to group by
//! (columns of `window_usage` or label names), label filters and the calendar month of a report;
//! pure.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

use crate::domain::check_name;

/// The columns of `window_usage` (and its roll-ups) a cost table can be grouped by; every other
/// name is a label. `source` is issue 18's source name (the topic until sources exist).
pub const GROUP_COLUMNS: [&str; 3] = ["model", "hardware", "source"];

/// The prefix that names a label in query parameters (`label.tenant=search`) and, in a
/// `group_by`/`--by` list, forces a name to be read as a label (`label.model`).
pub const LABEL_PREFIX: &str = "label.";

/// Why a query's dimensions or label filters were refused; the text is the API's 400 message and
/// the command line's usage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A label name no event can carry (empty, NUL, over 128 characters).
    #[error("label name {name:?} {reason}; label names are 1 to 128 characters without NUL")]
    LabelName {
        /// The name as given (cut to 40 characters).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A label value no event can carry (NUL, over 128 characters).
    #[error("the value of label.{name} {reason}; label values are at most 128 characters without NUL")]
    LabelValue {
        /// The label's name.
        name: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// One label filtered twice: a window row has one value per label, so this matches nothing.
    #[error("label.{0} is given twice; a label has one value per event, filter on it once")]
    Repeated(String),
    /// One dimension listed twice in a group-by list.
    #[error("{0} is listed twice in the group-by list")]
    RepeatedDimension(String),
    /// `month` is not `YYYY-MM`.
    #[error("month must be YYYY-MM (2026-11), got {0:?}")]
    Month(String),
}

fn abbreviate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Checks a label name as events are checked (1 to 128 characters, no NUL).
pub fn check_label_name(name: &str) -> Result<(), QueryError> {
    check_name(name).map_err(|e| QueryError::LabelName {
        name: abbreviate(name),
        reason: e.to_string(),
    })
}

/// What a cost table can be grouped by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dimension {
    /// A column of `window_usage`, one of [`GROUP_COLUMNS`].
    Column(&'static str),
    /// The value of one label (rows without the label form a group of their own).
    Label(String),
}

impl Dimension {
    /// Reads one entry of a group-by list: a name in [`GROUP_COLUMNS`] is that column, anything
    /// else (or anything after `label.`) is a label name.
    pub fn parse(name: &str) -> Result<Self, QueryError> {
        if let Some(label) = name.strip_prefix(LABEL_PREFIX) {
            check_label_name(label)?;
            return Ok(Dimension::Label(label.to_owned()));
        }
        if let Some(column) = GROUP_COLUMNS.iter().find(|c| **c == name) {
            return Ok(Dimension::Column(column));
        }
        check_label_name(name)?;
        Ok(Dimension::Label(name.to_owned()))
    }

    /// Parses a whole group-by list, refusing a dimension named twice.
    pub fn parse_list<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Vec<Self>, QueryError> {
        let mut dimensions: Vec<Dimension> = Vec::new();
        for name in names {
            let dimension = Dimension::parse(name)?;
            if dimensions.contains(&dimension) {
                return Err(QueryError::RepeatedDimension(dimension.name()));
            }
            dimensions.push(dimension);
        }
        Ok(dimensions)
    }

    /// The dimension's name in output (a JSON key, a column header): the column's or the label's
    /// name, or `label.<name>` for a label named like a column.
    pub fn name(&self) -> String {
        match self {
            Dimension::Column(column) => (*column).to_owned(),
            Dimension::Label(label) if GROUP_COLUMNS.contains(&label.as_str()) => format!("{LABEL_PREFIX}{label}"),
            Dimension::Label(label) => label.clone(),
        }
    }
}

/// Label filters, ANDed: a window row matches when it carries every one of these labels with
/// exactly this value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelFilter(BTreeMap<String, String>);

impl LabelFilter {
    /// Adds `name = value`, checked as events' labels are; a name given twice is refused.
    pub fn insert(&mut self, name: &str, value: &str) -> Result<(), QueryError> {
        check_label_name(name)?;
        // Values may be empty in events, so only NUL and length are checked here.
        if !value.is_empty() {
            check_name(value).map_err(|e| QueryError::LabelValue {
                name: abbreviate(name),
                reason: e.to_string(),
            })?;
        }
        if self.0.contains_key(name) {
            return Err(QueryError::Repeated(abbreviate(name)));
        }
        self.0.insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    /// No filter at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The filters as a JSON object: `labels @> this` is the SQL test.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!(self.0)
    }
}

/// A calendar month (`2026-11`) for a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    first: NaiveDate,
}

impl Month {
    /// Parses `YYYY-MM`.
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        let bad = || QueryError::Month(abbreviate(text));
        let (year, month) = text.trim().split_once('-').ok_or_else(bad)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(bad());
        }
        let (year, month) = (year.parse().map_err(|_| bad())?, month.parse().map_err(|_| bad())?);
        let first = NaiveDate::from_ymd_opt(year, month, 1).ok_or_else(bad)?;
        Ok(Month { first })
    }

    /// An instant inside the month in every time zone (the 15th, noon UTC; offsets stay within
    /// ±14 h), for calendar code that finds the period containing an instant.
    pub fn inside(self) -> DateTime<Utc> {
        let noon = self.first.with_day0(14).expect("every month has a 15th");
        Utc.from_utc_datetime(&noon.and_hms_opt(12, 0, 0).expect("noon"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_columns_and_other_names_are_labels() {
        assert_eq!(Dimension::parse("model").unwrap(), Dimension::Column("model"));
        assert_eq!(Dimension::parse("source").unwrap(), Dimension::Column("source"));
        assert_eq!(Dimension::parse("tenant").unwrap(), Dimension::Label("tenant".into()));
        let forced = Dimension::parse("label.model").unwrap();
        assert_eq!(forced, Dimension::Label("model".into()));
        assert_eq!(forced.name(), "label.model");
        assert_eq!(
            Dimension::parse_list(["tenant", "model", "tenant"])
                .unwrap_err()
                .to_string(),
            "tenant is listed twice in the group-by list"
        );
    }

    #[test]
    fn bad_label_names_and_values_are_refused_with_the_rule() {
        assert_eq!(
            Dimension::parse("").unwrap_err().to_string(),
            "label name \"\" must not be empty; label names are 1 to 128 characters without NUL"
        );
        let long = "x".repeat(129);
        assert_eq!(
            Dimension::parse(&long).unwrap_err().to_string(),
            format!(
                "label name {:?} is 129 characters long, the limit is 128; label names are 1 to 128 characters without NUL",
                "x".repeat(40)
            )
        );
        let mut filter = LabelFilter::default();
        assert_eq!(
            filter.insert("a\0b", "x").unwrap_err().to_string(),
            "label name \"a\\0b\" must not contain NUL characters; label names are 1 to 128 characters without NUL"
        );
        assert_eq!(
            filter.insert("tenant", "x\0").unwrap_err().to_string(),
            "the value of label.tenant must not contain NUL characters; label values are at most 128 characters without NUL"
        );
        filter.insert("tenant", "search").unwrap();
        filter.insert("region", "").unwrap();
        assert_eq!(
            filter.insert("tenant", "ads").unwrap_err().to_string(),
            "label.tenant is given twice; a label has one value per event, filter on it once"
        );
        assert_eq!(filter.to_json(), serde_json::json!({"region": "", "tenant": "search"}));
    }

    #[test]
    fn months_are_year_dash_month() {
        let m = Month::parse("2026-11").unwrap();
        assert_eq!(m.inside().to_rfc3339(), "2026-11-15T12:00:00+00:00");
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "november"] {
            assert_eq!(
                Month::parse(bad).unwrap_err().to_string(),
                format!("month must be YYYY-MM (2026-11), got {bad:?}")
            );
        }
    }
}
