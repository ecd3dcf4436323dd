//! RFC 6901 JSON Pointers over raw JSON text: each step finds one member or element and hands
//! back its raw text, so a number at the end is read as the exact decimal it is written as
//! (`serde_json::Value` would have made it an f64). Pure.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::de::{self, DeserializeSeed, IgnoredAny, Visitor};
use serde_json::value::RawValue;

use crate::config::TimestampFormat;
use crate::ingest::event::{self, Limits, RejectCode, Rejection, Text};

/// A parsed pointer: its reference tokens, unescaped (`~1` is `/`, `~0` is `~`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// Parses a pointer that configuration validation has already checked.
    pub fn new(text: &str) -> Self {
        let tokens = text
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        Self {
            text: text.to_owned(),
            tokens,
        }
    }

    /// The pointer as configured, for messages.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The raw value the pointer refers to in `root`; `None` when a step is absent (or `null`).
    pub fn find<'a>(&self, root: &'a RawValue) -> Option<&'a RawValue> {
        let mut at = root;
        for token in &self.tokens {
            at = step(at, token)?;
        }
        (at.get() != "null").then_some(at)
    }
}

/// One step down: the member `token` of an object or the element `token` of an array.
fn step<'a>(at: &'a RawValue, token: &str) -> Option<&'a RawValue> {
    let mut de = serde_json::Deserializer::from_str(at.get());
    match at.get().as_bytes().first()? {
        b'{' => Member(token).deserialize(&mut de).ok().flatten(),
        b'[' => {
            let index: usize = token.parse().ok()?;
            Element(index).deserialize(&mut de).ok().flatten()
        }
        _ => None,
    }
}

struct Member<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(Text(key)) = map.next_key()? {
            if key == self.0 {
                // The last of repeated keys wins, as when an object is read into a map.
                found = Some(map.next_value::<&RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

struct Element(usize);

impl<'de> DeserializeSeed<'de> for Element {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Element {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        let mut i = 0;
        while let Some(raw) = seq.next_element::<&RawValue>()? {
            if i == self.0 {
                found = Some(raw);
            }
            i += 1;
        }
        Ok(found)
    }
}

/// The value at `pointer`, or `missing_field` naming the field and the pointer.
pub fn required<'a>(root: &'a RawValue, field: &str, pointer: &Pointer) -> Result<&'a RawValue, Rejection> {
    pointer.find(root).ok_or_else(|| {
        Rejection::new(
            RejectCode::MissingField,
            format!("missing field `{field}` (at {})", pointer.as_str()),
        )
    })
}

/// A string value, or the text of a number or boolean (ids and labels are often numbers).
pub fn text<'a>(field: &str, raw: &'a RawValue) -> Result<Cow<'a, str>, Rejection> {
    let json = raw.get();
    if json.starts_with('"') {
        let Text(s) = serde_json::from_str(json).map_err(event::classify_json_error)?;
        return Ok(s);
    }
    let scalar = json.starts_with(|c: char| c == '-' || c.is_ascii_digit()) || json == "true" || json == "false";
    if scalar {
        return Ok(Cow::Borrowed(json));
    }
    Err(Rejection::new(
        RejectCode::InvalidField,
        format!("{field} must be a string, got {}", event::abbreviate(json)),
    ))
}

/// A timestamp written as `format`, checked against the limits.
pub fn timestamp(
    raw: &RawValue,
    format: TimestampFormat,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, Rejection> {
    if format == TimestampFormat::Rfc3339 {
        let text = text("timestamp", raw)?;
        return event::timestamp(&text, limits, now);
    }
    let invalid = |why: &str| {
        Rejection::new(
            RejectCode::InvalidTimestamp,
            format!("timestamp {} {why}", event::abbreviate(raw.get())),
        )
    };
    // Not a quantity: Unix nanoseconds are past the 1e18 bound of the precision contract.
    let written = text("timestamp", raw)?;
    let value = Decimal::from_str_exact(written.trim())
        .ok()
        .filter(|v| !v.is_sign_negative())
        .ok_or_else(|| invalid("is not a Unix time"))?;
    let per_second: i64 = match format {
        TimestampFormat::UnixS => 1_000_000_000,
        TimestampFormat::UnixMs => 1_000_000,
        TimestampFormat::UnixNs | TimestampFormat::Rfc3339 => 1,
    };
    let nanos = value
        .checked_mul(Decimal::from(per_second))
        .map(|n| n.trunc())
        .and_then(|n| i64::try_from(n).ok())
        .ok_or_else(|| invalid("is out of range"))?;
    let ts = DateTime::from_timestamp_nanos(nanos);
    event::time_in_range(raw.get(), ts, limits, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn pointers_walk_objects_and_arrays_and_keep_numbers_exact() {
        let doc = raw(r#"{"usage": {"prompt_tokens": 12.50}, "a/b": {"m~n": 1}, "list": [{"x": "y"}, 7], "n": null}"#);
        assert_eq!(Pointer::new("/usage/prompt_tokens").find(&doc).unwrap().get(), "12.50");
        assert_eq!(Pointer::new("/a~1b/m~0n").find(&doc).unwrap().get(), "1");
        assert_eq!(Pointer::new("/list/0/x").find(&doc).unwrap().get(), "\"y\"");
        assert_eq!(Pointer::new("/list/1").find(&doc).unwrap().get(), "7");
        assert_eq!(Pointer::new("").find(&doc).unwrap().get(), doc.get());
        for absent in ["/list/2", "/usage/x", "/n", "/usage/prompt_tokens/deeper", "/list/-"] {
            assert!(Pointer::new(absent).find(&doc).is_none(), "{absent}");
        }
    }

    #[test]
    fn unix_times_in_every_unit_are_exact() {
        let limits = Limits {
            max_event_bytes: 4096,
            max_future_skew: std::time::Duration::from_secs(300),
            max_event_age: std::time::Duration::from_secs(86400),
        };
        let now: DateTime<Utc> = "2026-11-29T03:05:00Z".parse().unwrap();
        let at = |json: &str, f| timestamp(&raw(json), f, &limits, now).map(|t| t.to_rfc3339());
        let want = "2026-11-29T03:00:00.250+00:00";
        assert_eq!(at("1795921200.25", TimestampFormat::UnixS).unwrap(), want);
        assert_eq!(at("\"1795921200250\"", TimestampFormat::UnixMs).unwrap(), want);
        assert_eq!(at("1795921200250000000", TimestampFormat::UnixNs).unwrap(), want);
        assert_eq!(
            at("\"2026-11-29T03:00:00.25Z\"", TimestampFormat::Rfc3339).unwrap(),
            want
        );
        assert_eq!(
            at("\"soon\"", TimestampFormat::UnixS).unwrap_err().code,
            RejectCode::InvalidTimestamp
        );
        assert_eq!(
            at("1795000000", TimestampFormat::UnixS).unwrap_err().code,
            RejectCode::TooOld
        );
    }
}
