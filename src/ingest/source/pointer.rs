//! RFC 6901 JSON Pointers over raw JSON text: each step finds one member or element and hands
//! back its raw text, so a number at the end is read as the exact decimal it is written as
//! (`serde_json::Value` would have made it an f64). Pure.

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::de::{self, DeserializeSeed, Visitor};
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

    /// The JSON text of the value the pointer refers to in `root`; `None` when a step is
    /// absent (or `null`).
    pub fn find<'a>(&self, root: &'a RawValue) -> Option<&'a str> {
        self.find_in(&Doc::new(root))
    }

    /// [`Pointer::find`] in a message several pointers are looked up in.
    pub fn find_in<'a>(&self, doc: &Doc<'a>) -> Option<&'a str> {
        let mut at = match (self.tokens.split_first(), &doc.top) {
            (Some((first, _)), Some(top)) => member(top, first)?,
            (Some((first, _)), None) => doc.step(doc.root()?, first)?,
            (None, _) => doc.root()?,
        };
        for token in self.tokens.iter().skip(1) {
            at = doc.step(at, token)?;
        }
        (at != "null").then_some(at)
    }
}

/// The member `key` of an object's members: the last one of that name, as when an object is
/// read into a map.
fn member<'a>(members: &Members<'a>, key: &str) -> Option<&'a str> {
    members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// One message's JSON, with the members of each object a pointer stepped into read once.
/// A mapped format looks up six to nine pointers per message, mostly in the same one or two
/// objects; reading the object's members afresh for each (to the end: the last of repeated
/// keys wins) was most of the decoding cost.
pub struct Doc<'a> {
    text: &'a str,
    /// The whole message as one value; read from `text` when a pointer needs it.
    root: OnceCell<Option<&'a str>>,
    /// The top-level members, when the message was read as an object at once ([`Doc::parse`]).
    top: Option<Members<'a>>,
    /// Per object stepped into (by the address of its text): its members in message order.
    objects: RefCell<Vec<(usize, Members<'a>)>>,
}

/// An object's members in message order: keys unescaped, values as their JSON text.
type Members<'a> = Vec<(Cow<'a, str>, &'a str)>;

/// An object's members by the one-pass reader (which leaves keys with escapes, among other
/// things, to serde_json), else by serde_json; `None` when the text is not a JSON object.
fn members(text: &str) -> Option<Members<'_>> {
    if let Some(found) = event::object_members(text) {
        return Some(found);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let found = AllMembers.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(found)
}

impl<'a> Doc<'a> {
    /// `root`, with nothing read yet.
    pub fn new(root: &'a RawValue) -> Self {
        Self {
            text: root.get(),
            root: OnceCell::from(Some(root.get())),
            top: None,
            objects: RefCell::new(Vec::new()),
        }
    }

    /// A message that is a JSON object, its top-level members read in the same pass that
    /// checks the whole text is JSON (one pass instead of two); `None` when it is not that,
    /// and the caller reads it as [`Doc::new`] does, for the same outcome and message as
    /// always.
    pub fn parse(text: &'a str) -> Option<Self> {
        let top = members(text)?;
        Some(Self {
            text,
            root: OnceCell::new(),
            top: Some(top),
            objects: RefCell::new(Vec::new()),
        })
    }

    fn root(&self) -> Option<&'a str> {
        *self
            .root
            .get_or_init(|| serde_json::from_str::<&RawValue>(self.text).ok().map(RawValue::get))
    }

    /// One step down: the member `token` of an object (the last one of that name, as when an
    /// object is read into a map) or the element `token` of an array.
    fn step(&self, at: &'a str, token: &str) -> Option<&'a str> {
        if !at.starts_with('{') {
            return step(at, token);
        }
        let address = at.as_ptr() as usize;
        let mut objects = self.objects.borrow_mut();
        let members = match objects.iter().position(|(a, _)| *a == address) {
            Some(i) => &objects[i].1,
            None => {
                objects.push((address, members(at).unwrap_or_default()));
                &objects.last().expect("just pushed").1
            }
        };
        member(members, token)
    }
}

/// One step down into an array: its element `token`.
fn step<'a>(at: &'a str, token: &str) -> Option<&'a str> {
    let mut de = serde_json::Deserializer::from_str(at);
    match at.as_bytes().first()? {
        b'[' => {
            let index: usize = token.parse().ok()?;
            Element(index).deserialize(&mut de).ok().flatten().map(RawValue::get)
        }
        _ => None,
    }
}

/// Every member of an object, keys unescaped, values raw.
struct AllMembers;

impl<'de> DeserializeSeed<'de> for AllMembers {
    type Value = Members<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for AllMembers {
    type Value = Members<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some((Text(key), value)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
            members.push((key, value.get()));
        }
        Ok(members)
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
pub fn required<'a>(doc: &Doc<'a>, field: &str, pointer: &Pointer) -> Result<&'a str, Rejection> {
    pointer.find_in(doc).ok_or_else(|| {
        Rejection::new(
            RejectCode::MissingField,
            format!("missing field `{field}` (at {})", pointer.as_str()),
        )
    })
}

/// A string value, or the text of a number or boolean (ids and labels are often numbers).
pub fn text<'a>(field: &str, json: &'a str) -> Result<Cow<'a, str>, Rejection> {
    // Checked JSON: a string without escapes is its text between the quotes.
    if let Some(plain) = json
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .filter(|s| !s.contains('\\'))
    {
        return Ok(Cow::Borrowed(plain));
    }
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
    raw: &str,
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
            format!("timestamp {} {why}", event::abbreviate(raw)),
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
    event::time_in_range(&raw, ts, limits, now)
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
        assert_eq!(Pointer::new("/usage/prompt_tokens").find(&doc).unwrap(), "12.50");
        assert_eq!(Pointer::new("/a~1b/m~0n").find(&doc).unwrap(), "1");
        assert_eq!(Pointer::new("/list/0/x").find(&doc).unwrap(), "\"y\"");
        assert_eq!(Pointer::new("/list/1").find(&doc).unwrap(), "7");
        assert_eq!(Pointer::new("").find(&doc).unwrap(), doc.get());
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
        let at = |json: &str, f| timestamp(json, f, &limits, now).map(|t| t.to_rfc3339());
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
