//! Decoding and validation of one usage event: raw Kafka payload in, a typed [`UsageEvent`] or a
//! [`Rejection`] with a machine-readable code and a message a human can act on.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::de::{self, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::domain::{check_name, ComputeUnits, EventId, HardwareName, ModelName, NameError, StorageUnits};

mod scan;

pub(crate) use scan::{is_number, object_members, once, Cursor};

/// Largest T or S one event may carry. Far above any real request, low enough that a window's
/// sums can never overflow the 96-bit decimal they are kept in.
pub const MAX_QUANTITY: Decimal = Decimal::from_parts(0xA764_0000, 0x0DE0_B6B3, 0, false, 0); // 10^18
/// At most this many labels per event, each key and value at most [`crate::domain::MAX_NAME_CHARS`].
pub const MAX_LABELS: usize = 16;
/// At most this many bytes of UTF-8 in a label set's keys and values together. With model and
/// hardware (at most 128 characters, 512 bytes each) and jsonb's own overhead (about 180 bytes
/// for 16 pairs), the key of a `window_usage` row stays under PostgreSQL's btree limit of 2704
/// bytes: an accepted event can always be stored. 16 labels of 128 ASCII characters (4 KB) once
/// made a valid event fail every flush of its partition.
pub const MAX_LABEL_BYTES: usize = 1024;
/// Significant digits a quantity may carry: what a 96-bit decimal holds exactly.
pub const MAX_SIGNIFICANT_DIGITS: usize = 28;
/// Digits after the decimal point a quantity may carry. With [`MAX_QUANTITY`] this keeps any
/// sum below 7.9e18 exact in a 96-bit decimal (2^96 / 10^10); PostgreSQL's numeric holds every
/// window's sum exactly whatever its size.
pub const MAX_FRACTION_DIGITS: u32 = 10;

/// Labels as sorted pairs, so equal label sets compare and serialize identically.
pub type Labels = BTreeMap<String, String>;

/// One accepted request's usage.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    /// The producer's id for the request; copies with the same id inside the dedup horizon count once.
    pub event_id: EventId,
    /// When the request happened (event time): decides the window, never the arrival time.
    pub timestamp: DateTime<Utc>,
    /// The model that served the request.
    pub model: ModelName,
    /// The hardware it ran on; its prices come from `[[pricing.hardware]]`.
    pub hardware: HardwareName,
    /// T, the compute units the request used; exact, not negative, within the precision contract.
    pub compute: ComputeUnits,
    /// S, the storage units the request used; exact, not negative, within the precision contract.
    pub storage: StorageUnits,
    /// Free-form dimensions (tenant, region, ...); each label set is a row of its own in `window_usage`.
    pub labels: Labels,
    /// Input and output tokens, when the producer sent them (zero otherwise).
    pub tokens: Tokens,
    /// Where T and S came from: measured by the producer, or derived from the tokens.
    pub basis: Basis,
}

/// A request's token counts; exact, not negative, within the precision contract.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Input (prompt) tokens.
    pub input: Decimal,
    /// Output (completion) tokens.
    pub output: Decimal,
}

impl Tokens {
    /// Whether both counts are zero (or were not sent).
    pub fn is_zero(&self) -> bool {
        self.input.is_zero() && self.output.is_zero()
    }
}

/// Where an event's T and S came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Basis {
    /// Sent by the producer (the costwatch format, or a `json` source with compute and storage).
    #[default]
    Measured,
    /// Derived from the tokens by the usage profile at this index of `[[usage_profiles]]`.
    Profile(u16),
    /// Only tokens were sent and no usage profile matches: T and S are unknown (recorded as 0,
    /// and the row is unpriced until a profile and `rerate` derive them).
    NoProfile,
}

impl Basis {
    /// Whether T and S come from tokens (`window_usage.usage_from_tokens`).
    pub fn from_tokens(self) -> bool {
        !matches!(self, Basis::Measured)
    }
}

/// A valid event as [`decode_ref`] returns it: names and labels are borrowed from the payload
/// (unless JSON escapes had to be undone), so that the aggregator allocates only for what it
/// keeps. Every field is validated exactly as in [`UsageEvent`].
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEventRef<'a> {
    /// The producer's id for the request, validated as [`EventId`].
    pub event_id: Cow<'a, str>,
    /// When the request happened (event time).
    pub timestamp: DateTime<Utc>,
    /// The model's name, validated as [`ModelName`].
    pub model: Cow<'a, str>,
    /// The hardware's name, validated as [`HardwareName`].
    pub hardware: Cow<'a, str>,
    /// T, the compute units the request used.
    pub compute: ComputeUnits,
    /// S, the storage units the request used.
    pub storage: StorageUnits,
    /// The labels, sorted by key, one pair per key.
    pub labels: RawLabels<'a>,
    /// Input and output tokens, when sent (zero otherwise).
    pub tokens: Tokens,
    /// Where T and S came from.
    pub basis: Basis,
}

impl UsageEventRef<'_> {
    /// Copies the borrowed names and labels into a [`UsageEvent`].
    pub fn into_owned(self) -> UsageEvent {
        let valid = "validated by decode_ref";
        UsageEvent {
            event_id: EventId::parse(self.event_id).expect(valid),
            timestamp: self.timestamp,
            model: ModelName::parse(self.model).expect(valid),
            hardware: HardwareName::parse(self.hardware).expect(valid),
            compute: self.compute,
            storage: self.storage,
            labels: self
                .labels
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            tokens: self.tokens,
            basis: self.basis,
        }
    }
}

/// The machine-readable part of a rejection; stored as its `as_str()` in `rejected_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The message has no payload (a tombstone or an empty message).
    EmptyPayload,
    /// The payload is larger than `ingest.max_event_bytes`.
    Oversized,
    /// The payload is not UTF-8.
    InvalidUtf8,
    /// Not a JSON object, or not JSON at all (a bare `NaN` number included).
    MalformedJson,
    /// A required field (`event_id`, `timestamp`, `model`, `hardware`, `compute`, `storage`) is absent.
    MissingField,
    /// A field has the wrong type, or a name is empty or holds NUL.
    InvalidField,
    /// A name or label is longer than 128 characters, or the label set has too many entries or bytes.
    FieldTooLong,
    /// `compute` or `storage` is below zero.
    NegativeValue,
    /// `compute` or `storage` is above 1e18 per event or has more digits than a 96-bit decimal keeps exactly (the precision contract).
    OutOfRange,
    /// `timestamp` is not RFC 3339.
    InvalidTimestamp,
    /// `timestamp` is further ahead of this host's clock than `ingest.max_future_skew`.
    FutureTimestamp,
    /// `timestamp` is older than `ingest.max_event_age`.
    TooOld,
    /// The same `event_id` as a counted event inside the dedup horizon, with different content.
    ConflictingDuplicate,
    /// Valid, but PostgreSQL refused to store it (the database's message says why).
    Unstorable,
}

impl RejectCode {
    /// Every code; e.g. to start each `reason` series of `costwatch_rejected_events_total` at 0.
    pub const ALL: [RejectCode; 14] = [
        Self::EmptyPayload,
        Self::Oversized,
        Self::InvalidUtf8,
        Self::MalformedJson,
        Self::MissingField,
        Self::InvalidField,
        Self::FieldTooLong,
        Self::NegativeValue,
        Self::OutOfRange,
        Self::InvalidTimestamp,
        Self::FutureTimestamp,
        Self::TooOld,
        Self::ConflictingDuplicate,
        Self::Unstorable,
    ];

    /// The code as stored in `rejected_events.reason_code` and used as the metric's `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyPayload => "empty_payload",
            Self::Oversized => "oversized",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::MalformedJson => "malformed_json",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::FieldTooLong => "field_too_long",
            Self::NegativeValue => "negative_value",
            Self::OutOfRange => "out_of_range",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::FutureTimestamp => "future_timestamp",
            Self::TooOld => "too_old",
            Self::ConflictingDuplicate => "conflicting_duplicate",
            Self::Unstorable => "unstorable",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an event was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What kind of problem; stable, for queries and alerts.
    pub code: RejectCode,
    /// What exactly is wrong, for a person fixing the producer.
    pub message: String,
}

impl Rejection {
    /// A rejection with `code` and a message saying what is wrong.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The limits an event is checked against; `now` comes from the caller so this stays pure.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `ingest.max_event_bytes`: larger payloads are `oversized`.
    pub max_event_bytes: usize,
    /// `ingest.max_future_skew`: how far ahead of the clock a timestamp may be.
    pub max_future_skew: Duration,
    /// `ingest.max_event_age`: how far behind the clock a timestamp may be.
    pub max_event_age: Duration,
}

/// The wire form, borrowed from the payload so that a valid event costs few allocations.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    hardware: Cow<'a, str>,
    // Numbers are taken as raw JSON text and parsed as decimals, never through f64.
    #[serde(borrow)]
    compute: &'a RawValue,
    #[serde(borrow)]
    storage: &'a RawValue,
    #[serde(default, borrow, deserialize_with = "label_list")]
    labels: Option<RawLabels<'a>>,
    #[serde(default, borrow)]
    input_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    output_tokens: Option<&'a RawValue>,
}

/// The fields of an event as read, before validation: from [`scan::scan`] (the common shape) or
/// from [`Wire`] (anything else). Numbers are their JSON text.
struct Fields<'a> {
    event_id: Cow<'a, str>,
    timestamp: Cow<'a, str>,
    model: Cow<'a, str>,
    hardware: Cow<'a, str>,
    compute: &'a str,
    storage: &'a str,
    labels: Option<RawLabels<'a>>,
    input_tokens: Option<&'a str>,
    output_tokens: Option<&'a str>,
}

impl<'a> From<Wire<'a>> for Fields<'a> {
    fn from(w: Wire<'a>) -> Self {
        Self {
            event_id: w.event_id,
            timestamp: w.timestamp,
            model: w.model,
            hardware: w.hardware,
            compute: w.compute.get(),
            storage: w.storage.get(),
            labels: w.labels,
            input_tokens: w.input_tokens.map(RawValue::get),
            output_tokens: w.output_tokens.map(RawValue::get),
        }
    }
}

/// A label set as decoded: sorted by key, one pair per key (the last one wins, as when a JSON
/// object is read into a map), borrowed from the payload unless JSON escapes had to be undone.
/// Up to four labels cost no allocation; a map cost one per key, one per value and a node.
pub type RawLabels<'a> = SmallVec<[(Cow<'a, str>, Cow<'a, str>); 4]>;

/// A string borrowed from the payload where it can be. (`Cow<str>`'s own `Deserialize` always
/// copies; serde borrows only for a `Cow` that is a struct field of its own.)
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// `labels`: absent or null is no labels; otherwise an object of strings to strings. Generic in
/// the output lifetime because `SmallVec` is invariant: the derive needs `RawLabels<'a>` for
/// some `'a` that `'de` outlives.
fn label_list<'de: 'a, 'a, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<RawLabels<'a>>, D::Error> {
    struct LabelsVisitor<'a>(std::marker::PhantomData<Cow<'a, str>>);
    impl<'de: 'a, 'a> Visitor<'de> for LabelsVisitor<'a> {
        type Value = Option<RawLabels<'a>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut labels = RawLabels::new();
            while let Some((Text(k), Text(v))) = map.next_entry()? {
                labels.push((k, v));
            }
            sort_labels(&mut labels);
            Ok(Some(labels))
        }
    }
    deserializer.deserialize_option(LabelsVisitor(std::marker::PhantomData))
}

/// Sorts label pairs by key, keeping one pair per key: the last one, as when a JSON object is
/// read into a map. In place: a label set is a few hundred bytes inline, and every move of it
/// was a `memcpy` on the hot path.
fn sort_labels(labels: &mut RawLabels<'_>) {
    // Stable: pairs with the same key stay in payload order, and the last one is kept.
    labels.sort_by(|a, b| a.0.cmp(&b.0));
    labels.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
}

/// Decodes and validates one Kafka payload (`None` is a tombstone or empty message).
pub fn decode(payload: Option<&[u8]>, limits: &Limits, now: DateTime<Utc>) -> Result<UsageEvent, Rejection> {
    decode_ref(payload, limits, now).map(UsageEventRef::into_owned)
}

/// [`decode`] without copying the names and labels out of the payload.
pub fn decode_ref<'a>(
    payload: Option<&'a [u8]>,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<UsageEventRef<'a>, Rejection> {
    decode_ref_with(payload, limits, now, |_| {})
}

/// [`decode_ref`], telling `on_id` the event's id as soon as it is read, before the rest is
/// validated: the dedup set prefetches the id's slot meanwhile. Not called when the payload
/// is not an event at all.
#[inline]
pub fn decode_ref_with<'a>(
    payload: Option<&'a [u8]>,
    limits: &Limits,
    now: DateTime<Utc>,
    on_id: impl FnOnce(&str),
) -> Result<UsageEventRef<'a>, Rejection> {
    let text = std::str::from_utf8(checked_payload(payload, limits)?)
        .map_err(|e| Rejection::new(RejectCode::InvalidUtf8, format!("the payload is not valid UTF-8: {e}")))?;
    // Only an object is an event: serde would also read a JSON array into the struct, by position.
    if !text.trim_start().starts_with('{') {
        return Err(Rejection::new(
            RejectCode::MalformedJson,
            format!("an event must be a JSON object, got {}", abbreviate(text)),
        ));
    }
    let wire = match scan::scan(text) {
        Some(fields) => fields,
        None => Fields::from(serde_json::from_str::<Wire<'_>>(text).map_err(classify_json_error)?),
    };

    on_id(&wire.event_id);
    let event_id = name("event_id", wire.event_id)?;
    let model = name("model", wire.model)?;
    let hardware = name("hardware", wire.hardware)?;
    let compute = ComputeUnits(quantity("compute", wire.compute)?);
    let storage = StorageUnits(quantity("storage", wire.storage)?);
    let timestamp = timestamp(&wire.timestamp, limits, now)?;
    let labels = wire.labels.unwrap_or_default();
    check_labels(&labels)?;
    let tokens = Tokens {
        input: optional_quantity("input_tokens", wire.input_tokens)?,
        output: optional_quantity("output_tokens", wire.output_tokens)?,
    };

    Ok(UsageEventRef {
        event_id,
        timestamp,
        model,
        hardware,
        compute,
        storage,
        labels,
        tokens,
        basis: Basis::Measured,
    })
}

/// The payload, unless it is empty or larger than `ingest.max_event_bytes`.
#[inline]
pub(crate) fn checked_payload<'a>(payload: Option<&'a [u8]>, limits: &Limits) -> Result<&'a [u8], Rejection> {
    let bytes = match payload {
        Some(b) if !b.is_empty() => b,
        _ => return Err(Rejection::new(RejectCode::EmptyPayload, "the message has no payload")),
    };
    if bytes.len() > limits.max_event_bytes {
        return Err(Rejection::new(
            RejectCode::Oversized,
            format!(
                "the message is {} bytes, the limit is {} (ingest.max_event_bytes)",
                bytes.len(),
                limits.max_event_bytes
            ),
        ));
    }
    Ok(bytes)
}

/// A JSON parse error as a rejection (`missing_field`, `invalid_field` or `malformed_json`).
pub(crate) fn classify_json_error(e: serde_json::Error) -> Rejection {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data if e.to_string().starts_with("missing field") => {
            Rejection::new(RejectCode::MissingField, e.to_string())
        }
        Category::Data => Rejection::new(RejectCode::InvalidField, e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => {
            Rejection::new(RejectCode::MalformedJson, format!("not a JSON object: {e}"))
        }
    }
}

/// An optional quantity: absent or `null` is zero.
fn optional_quantity(field: &str, raw: Option<&str>) -> Result<Decimal, Rejection> {
    match raw {
        Some(raw) if raw != "null" => quantity(field, raw),
        _ => Ok(Decimal::ZERO),
    }
}

/// A quantity given as a JSON number or as a string holding a decimal number (`"12"`,
/// `"1.5e3"`), read exactly under the precision contract; for the mapped formats.
pub(crate) fn quantity_or_text(field: &str, text: &str) -> Result<Decimal, Rejection> {
    if !text.starts_with('"') {
        return quantity(field, text);
    }
    // A string without escapes holding a plain JSON number (`"12"`, the usual case) is read
    // without serde_json, which the general reading below costs twice.
    let plain = text.strip_prefix('"').and_then(|s| s.strip_suffix('"'));
    if let Some(inner) = plain.filter(|s| !s.contains('\\')) {
        let trimmed = inner.trim();
        if scan::is_number(trimmed) {
            return quantity(field, trimmed);
        }
    }
    let inner: Cow<'_, str> = serde_json::from_str(text)
        .map_err(|e| Rejection::new(RejectCode::InvalidField, format!("{field} is not a string: {e}")))?;
    let trimmed = inner.trim();
    // Only the JSON number grammar is accepted inside the string, so "0x10" or "1,5" are refused.
    let valid: Result<Box<RawValue>, _> = serde_json::from_str(trimmed);
    match valid {
        Ok(number) if trimmed.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => quantity(field, number.get()),
        _ => Err(Rejection::new(
            RejectCode::InvalidField,
            format!("{field} must be a number or a decimal string, got {}", abbreviate(text)),
        )),
    }
}

/// Checks a label set (count, bytes, lengths, NUL) as the costwatch format does; sorts it by key.
pub(crate) fn checked_labels(mut raw: RawLabels<'_>) -> Result<RawLabels<'_>, Rejection> {
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    check_labels(&raw)?;
    Ok(raw)
}

/// Checks a name (`event_id`, `model`, `hardware`): not empty, no NUL, at most 128 characters.
pub(crate) fn name<'a>(field: &str, value: Cow<'a, str>) -> Result<Cow<'a, str>, Rejection> {
    check_name(&value).map(|()| value).map_err(|e| {
        let code = match e {
            NameError::Empty | NameError::Nul => RejectCode::InvalidField,
            NameError::TooLong(_) => RejectCode::FieldTooLong,
        };
        Rejection::new(code, format!("{field} {e}"))
    })
}

/// A quantity given as JSON number text, read exactly under the precision contract.
fn quantity(field: &str, text: &str) -> Result<Decimal, Rejection> {
    let is_number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    if !is_number {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            format!("{field} must be a JSON number, got {}", abbreviate(text)),
        ));
    }
    exact_quantity(text).map_err(|problem| {
        let (code, why) = match problem {
            QuantityProblem::Negative => (RejectCode::NegativeValue, "must be >= 0".to_owned()),
            QuantityProblem::TooManyDigits => (
                RejectCode::OutOfRange,
                format!("has more than {MAX_SIGNIFICANT_DIGITS} significant digits and cannot be represented exactly"),
            ),
            QuantityProblem::TooManyFractionDigits => (
                RejectCode::OutOfRange,
                format!("has more than {MAX_FRACTION_DIGITS} digits after the decimal point (the precision contract)"),
            ),
            QuantityProblem::TooLarge => (RejectCode::OutOfRange, "exceeds the limit of 1e18 per event".to_owned()),
        };
        let shown = abbreviate_raw(text);
        match problem {
            QuantityProblem::Negative => Rejection::new(code, format!("{field} {why}, got {shown}")),
            _ => Rejection::new(code, format!("{field} {shown} {why}")),
        }
    })
}

/// Why a JSON number is not an acceptable quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuantityProblem {
    Negative,
    TooManyDigits,
    TooManyFractionDigits,
    TooLarge,
}

/// Reads a JSON number token as an exact decimal under the precision contract: at most
/// [`MAX_SIGNIFICANT_DIGITS`] significant digits and [`MAX_FRACTION_DIGITS`] digits after the
/// point in any notation (`1.5e3`, `0.15e4` and `1500` are one value), at most [`MAX_QUANTITY`].
/// Written by hand because rust_decimal's scientific parser rounds what it cannot hold (a 37-digit
/// mantissa in exponent form was silently rounded while the same digits written out were refused).
fn exact_quantity(text: &str) -> Result<Decimal, QuantityProblem> {
    match plain_quantity(text) {
        Some(value) => Ok(value),
        None => general_quantity(text),
    }
}

/// [`exact_quantity`] in any notation.
fn general_quantity(text: &str) -> Result<Decimal, QuantityProblem> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(at) => (&body[..at], &body[at + 1..]),
        None => (body, ""),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    // serde_json already checked the JSON number grammar; this only guards the arithmetic below.
    if int_part.is_empty() || !digits(int_part) || !digits(frac_part) {
        return Err(QuantityProblem::TooLarge);
    }
    // The significant digits, without leading and trailing zeros; `power` is the exponent of
    // ten of the last one kept: value = digits * 10^power.
    let all = int_part.bytes().chain(frac_part.bytes());
    let mut significant: SmallVec<[u8; 32]> = all.skip_while(|&b| b == b'0').collect();
    let trailing = significant.iter().rev().take_while(|&&b| b == b'0').count();
    significant.truncate(significant.len() - trailing);
    if significant.is_empty() {
        // Any zero, "-0" and "0e999" included, is 0.
        return Ok(Decimal::ZERO);
    }
    if negative {
        return Err(QuantityProblem::Negative);
    }
    if significant.len() > MAX_SIGNIFICANT_DIGITS {
        return Err(QuantityProblem::TooManyDigits);
    }
    // An exponent too long for an i64 is far outside every bound either way.
    let exponent: i64 = match exponent {
        "" => 0,
        e => e.strip_prefix('+').unwrap_or(e).parse().map_err(|_| {
            if e.starts_with('-') {
                QuantityProblem::TooManyFractionDigits
            } else {
                QuantityProblem::TooLarge
            }
        })?,
    };
    let power = exponent
        .saturating_sub(frac_part.len() as i64)
        .saturating_add(trailing as i64);
    if power < -i64::from(MAX_FRACTION_DIGITS) {
        return Err(QuantityProblem::TooManyFractionDigits);
    }
    // Digits before the point; 10^18 has 19 of them, anything with more is too large.
    if significant.len() as i64 + power > 19 {
        return Err(QuantityProblem::TooLarge);
    }
    let mut units: i128 = significant.iter().fold(0, |n, d| n * 10 + i128::from(d - b'0'));
    if power > 0 {
        units *= 10i128.pow(power as u32);
    }
    let scale = power.min(0).unsigned_abs() as u32;
    let value = Decimal::from_i128_with_scale(units, scale);
    if value > MAX_QUANTITY {
        return Err(QuantityProblem::TooLarge);
    }
    Ok(value)
}

/// [`exact_quantity`] of the numbers producers usually write (`1234.5`, `16`: no sign, no
/// exponent, at most 18 digits, at most 10 of them after the point), in one pass; `None` for
/// any other, which the general reading handles. The result is the same value at the same scale
/// (trailing zeros after the point dropped, those before it kept), so sums and content digests
/// do not depend on which path read a number.
fn plain_quantity(text: &str) -> Option<Decimal> {
    let bytes = text.as_bytes();
    let (mut units, mut scale, mut point, mut digits) = (0u64, 0u32, false, 0usize);
    for &b in bytes {
        match b {
            b'0'..=b'9' => {
                units = units * 10 + u64::from(b - b'0');
                scale += u32::from(point);
                digits += 1;
                // 18 digits stay below 10^18 (MAX_QUANTITY) and within a u64.
                if digits > 18 {
                    return None;
                }
            }
            b'.' if !point => point = true,
            _ => return None,
        }
    }
    if digits == 0 || scale > MAX_FRACTION_DIGITS {
        return None;
    }
    if units == 0 {
        return Some(Decimal::ZERO);
    }
    while scale > 0 && units % 10 == 0 {
        units /= 10;
        scale -= 1;
    }
    Some(Decimal::from_i128_with_scale(i128::from(units), scale))
}

/// Parses an RFC 3339 timestamp and checks it against the limits.
pub(crate) fn timestamp(text: &str, limits: &Limits, now: DateTime<Utc>) -> Result<DateTime<Utc>, Rejection> {
    if let Some(ts) = utc_timestamp(text) {
        return time_in_range(&text, ts, limits, now);
    }
    let ts = DateTime::parse_from_rfc3339(text)
        .map_err(|e| {
            Rejection::new(
                RejectCode::InvalidTimestamp,
                format!("timestamp {} is not RFC 3339 ({e})", abbreviate(text)),
            )
        })?
        .with_timezone(&Utc);
    time_in_range(&text, ts, limits, now)
}

/// The timestamps producers usually write, `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, read directly;
/// `None` for anything else (offsets, lower case, leap seconds, more than 9 fraction digits,
/// invalid dates), which chrono's RFC 3339 parser reads and words the errors of. Where both
/// read a text they agree: the same calendar checks (`NaiveDate`, `NaiveTime`) build the value.
fn utc_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() < 20 || b.len() > 30 || b[b.len() - 1] != b'Z' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u32> {
        b[from..to]
            .iter()
            .try_fold(0u32, |n, &d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, c)| b[at] != c) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    // 60 is a leap second, which chrono represents its own way.
    if second > 59 {
        return None;
    }
    let nano = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', digits @ ..] if !digits.is_empty() && digits.len() <= 9 => {
            num(20, 20 + digits.len())? * 10u32.pow(9 - digits.len() as u32)
        }
        _ => return None,
    };
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, month, day)?;
    Some(date.and_hms_nano_opt(hour, minute, second, nano)?.and_utc())
}

/// Checks a timestamp (written as `text`) against the future-skew and age limits.
pub(crate) fn time_in_range(
    text: &dyn fmt::Display,
    ts: DateTime<Utc>,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, Rejection> {
    let (too_new, too_old) = out_of_range(ts, limits, now);
    if too_new {
        return Err(Rejection::new(
            RejectCode::FutureTimestamp,
            format!(
                "timestamp {text} is more than {} ahead of this host's clock ({})",
                humantime::format_duration(limits.max_future_skew),
                now.to_rfc3339()
            ),
        ));
    }
    if too_old {
        return Err(Rejection::new(
            RejectCode::TooOld,
            format!(
                "timestamp {text} is older than {} (ingest.max_event_age)",
                humantime::format_duration(limits.max_event_age)
            ),
        ));
    }
    Ok(ts)
}

/// Whether `ts` is more than `max_future_skew` ahead of `now`, and whether it is more than
/// `max_event_age` behind it. In nanoseconds since the epoch (i128: no overflow), which orders
/// instants as chrono does except within a leap second; chrono's own date arithmetic for
/// `now + skew` and `now - age` was a third of the cost of reading a timestamp, and is kept for
/// leap seconds only.
fn out_of_range(ts: DateTime<Utc>, limits: &Limits, now: DateTime<Utc>) -> (bool, bool) {
    const NANOS: i128 = 1_000_000_000;
    let leap = |t: DateTime<Utc>| i128::from(t.timestamp_subsec_nanos()) >= NANOS;
    if leap(ts) || leap(now) {
        // chrono durations cannot overflow here: both limits were validated to be sane at startup.
        let skew = chrono::Duration::from_std(limits.max_future_skew).unwrap_or(chrono::Duration::MAX);
        let age = chrono::Duration::from_std(limits.max_event_age).unwrap_or(chrono::Duration::MAX);
        return (ts > now + skew, ts < now - age);
    }
    let instant = |t: DateTime<Utc>| i128::from(t.timestamp()) * NANOS + i128::from(t.timestamp_subsec_nanos());
    let span = |d: Duration| i128::from(d.as_secs()) * NANOS + i128::from(d.subsec_nanos());
    let (at, now_at) = (instant(ts), instant(now));
    (
        at > now_at + span(limits.max_future_skew),
        at < now_at - span(limits.max_event_age),
    )
}

/// Checks a label set against the limits (count, bytes, lengths, NUL).
fn check_labels(raw: &RawLabels<'_>) -> Result<(), Rejection> {
    if raw.len() > MAX_LABELS {
        return Err(Rejection::new(
            RejectCode::FieldTooLong,
            format!("labels has {} entries, the limit is {MAX_LABELS}", raw.len()),
        ));
    }
    let bytes: usize = raw.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_LABEL_BYTES {
        return Err(Rejection::new(
            RejectCode::FieldTooLong,
            format!("labels are {bytes} bytes of UTF-8 in keys and values together, the limit is {MAX_LABEL_BYTES}"),
        ));
    }
    for (k, v) in raw {
        for (what, s) in [("key", k), ("value", v)] {
            if s.contains('\0') {
                return Err(Rejection::new(
                    RejectCode::InvalidField,
                    format!("label {what} {} must not contain NUL characters", abbreviate(s)),
                ));
            }
            // Bytes bound characters from above: the common short label skips the count.
            let chars = if s.len() > crate::domain::MAX_NAME_CHARS {
                s.chars().count()
            } else {
                s.len()
            };
            if chars > crate::domain::MAX_NAME_CHARS {
                return Err(Rejection::new(
                    RejectCode::FieldTooLong,
                    format!(
                        "label {what} {} is {chars} characters long, the limit is 128",
                        abbreviate(s)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Keeps quoted input short in messages: a rejected 60 KB field should not become a 60 KB reason.
pub(crate) fn abbreviate(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}...")
    }
}

/// A raw number shortened for a message (a 5,000-digit number should not become the reason).
fn abbreviate_raw(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        s.to_owned()
    } else {
        format!("{}...", &s[..MAX])
    }
}

/// Parses a decimal from user input (CLI flags), with the same exactness rules as events.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    Decimal::from_str_exact(s)
        .or_else(|_| Decimal::from_str(s))
        .or_else(|_| Decimal::from_scientific(s))
        .map_err(|_| format!("{s:?} is not a decimal number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_event_bytes: 4096,
            max_future_skew: Duration::from_secs(300),
            max_event_age: Duration::from_secs(7 * 86400),
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-29T03:05:00Z".parse().unwrap()
    }

    fn decode_str(s: &str) -> Result<UsageEvent, Rejection> {
        decode(Some(s.as_bytes()), &limits(), now())
    }

    fn code_of(s: &str) -> RejectCode {
        decode_str(s).unwrap_err().code
    }

    const GOOD: &str = r#"{"event_id": "req-7f3a", "timestamp": "2026-11-29T03:00:00.123Z", "model": "qwen2-7b-instruct",
        "hardware": "a100-80g", "compute": 1234.5, "storage": 16.25, "labels": {"tenant": "search"}}"#;

    #[test]
    fn the_documented_event_decodes_exactly() {
        let e = decode_str(GOOD).unwrap();
        assert_eq!(e.event_id.as_str(), "req-7f3a");
        assert_eq!(e.compute.to_string(), "1234.5");
        assert_eq!(e.storage.to_string(), "16.25");
        assert_eq!(e.timestamp.to_rfc3339(), "2026-11-29T03:00:00.123+00:00");
        assert_eq!(e.labels.get("tenant").map(String::as_str), Some("search"));
    }

    #[test]
    fn offsets_and_exponents_are_understood() {
        let e = decode_str(
            &GOOD
                .replace("2026-11-29T03:00:00.123Z", "2026-11-29T04:00:00+01:00")
                .replace("1234.5", "1.5e3"),
        )
        .unwrap();
        assert_eq!(e.timestamp, "2026-11-29T03:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(e.compute.to_string(), "1500");
    }

    #[test]
    fn every_kind_of_bad_input_has_its_code() {
        assert_eq!(
            decode(None, &limits(), now()).unwrap_err().code,
            RejectCode::EmptyPayload
        );
        assert_eq!(
            decode(Some(&[b'{', 0xff, b'}']), &limits(), now()).unwrap_err().code,
            RejectCode::InvalidUtf8
        );
        assert_eq!(
            decode(Some("x".repeat(5000).as_bytes()), &limits(), now())
                .unwrap_err()
                .code,
            RejectCode::Oversized
        );
        assert_eq!(code_of("{not json"), RejectCode::MalformedJson);
        assert_eq!(
            code_of(&GOOD.replace(r#""model": "qwen2-7b-instruct","#, "")),
            RejectCode::MissingField
        );
        assert_eq!(code_of(&GOOD.replace("1234.5", "\"1234.5\"")), RejectCode::InvalidField);
        assert_eq!(code_of(&GOOD.replace("\"req-7f3a\"", "42")), RejectCode::InvalidField);
        assert_eq!(code_of(&GOOD.replace("1234.5", "-1")), RejectCode::NegativeValue);
        assert_eq!(code_of(&GOOD.replace("1234.5", "1e30")), RejectCode::OutOfRange);
        assert_eq!(code_of(&GOOD.replace("1234.5", "NaN")), RejectCode::MalformedJson);
        assert_eq!(
            code_of(&GOOD.replace("qwen2-7b-instruct", &"m".repeat(129))),
            RejectCode::FieldTooLong
        );
        assert_eq!(
            code_of(&GOOD.replace("qwen2-7b-instruct", "")),
            RejectCode::InvalidField
        );
        // PostgreSQL text cannot hold NUL: accepting one would fail every later flush.
        assert_eq!(
            code_of(&GOOD.replace("qwen2-7b-instruct", "qwen\\u0000")),
            RejectCode::InvalidField
        );
        assert_eq!(
            code_of(&GOOD.replace("\"search\"", "\"a\\u0000\"")),
            RejectCode::InvalidField
        );
        assert_eq!(
            code_of(&GOOD.replace("2026-11-29T03:00:00.123Z", "yesterday")),
            RejectCode::InvalidTimestamp
        );
        assert_eq!(
            code_of(&GOOD.replace("2026-11-29T03:00:00.123Z", "2026-11-29T03:11:00Z")),
            RejectCode::FutureTimestamp
        );
        assert_eq!(
            code_of(&GOOD.replace("2026-11-29T03:00:00.123Z", "2026-11-01T00:00:00Z")),
            RejectCode::TooOld
        );
    }

    #[test]
    fn messages_name_the_field_and_the_fix() {
        let r = decode_str(&GOOD.replace("1234.5", "-1")).unwrap_err();
        assert_eq!(r.to_string(), "negative_value: compute must be >= 0, got -1");
        let r = decode_str(&GOOD.replace(r#""model": "qwen2-7b-instruct","#, "")).unwrap_err();
        assert!(r.message.starts_with("missing field `model`"), "{r}");
    }

    #[test]
    fn labels_come_sorted_once_per_key_and_borrowed_unless_escaped() {
        let with = |labels: &str| GOOD.replace(r#"{"tenant": "search"}"#, labels);
        let decoded = |labels: &str| {
            let payload = with(labels);
            let e = decode_ref(Some(payload.as_bytes()), &limits(), now()).unwrap();
            e.labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string(), matches!(v, Cow::Borrowed(_))))
                .collect::<Vec<_>>()
        };
        let owned = |k: &str, v: &str, borrowed| (k.to_owned(), v.to_owned(), borrowed);
        assert_eq!(
            decoded(r#"{"team": "x", "env": "prod", "a": "1"}"#),
            vec![
                owned("a", "1", true),
                owned("env", "prod", true),
                owned("team", "x", true)
            ]
        );
        // A repeated key keeps its last value, as a JSON object read into a map does.
        assert_eq!(
            decoded(r#"{"env": "dev", "team": "x", "env": "prod"}"#),
            vec![owned("env", "prod", true), owned("team", "x", true)]
        );
        assert_eq!(decoded(r#"{"env": "a\"b"}"#), vec![owned("env", "a\"b", false)]);
        assert_eq!(decoded("null"), vec![]);
        assert_eq!(decoded("{}"), vec![]);
        let over: Vec<String> = (0..=MAX_LABELS).map(|i| format!("\"k{i}\": \"v\"")).collect();
        let r = decode_str(&with(&format!("{{{}}}", over.join(", ")))).unwrap_err();
        assert_eq!(r.to_string(), "field_too_long: labels has 17 entries, the limit is 16");
        let r = decode_str(&with(r#"{"env": 5}"#)).unwrap_err();
        assert_eq!(r.code, RejectCode::InvalidField);
        assert!(
            r.message.starts_with("invalid type: integer `5`, expected a string"),
            "{r}"
        );
        let r = decode_str(&with(r#"["env"]"#)).unwrap_err();
        assert!(r.message.starts_with("invalid type: sequence, expected a map"), "{r}");
    }

    #[test]
    fn the_precision_contract_holds_in_every_notation() {
        let compute = |n: &str| decode_str(&GOOD.replace("1234.5", n)).map(|e| e.compute.to_string());
        let refused = |n: &str| decode_str(&GOOD.replace("1234.5", n)).unwrap_err().to_string();
        // One value, four notations.
        for n in ["1500", "1.5e3", "0.15E+4", "15000e-1"] {
            assert_eq!(compute(n).unwrap(), "1500", "{n}");
        }
        // The edges: 10^18, 10 digits after the point, 28 significant digits.
        assert_eq!(compute("1e18").unwrap(), "1000000000000000000");
        assert_eq!(
            compute("1000000000000000000.0000000000").unwrap(),
            "1000000000000000000"
        );
        assert_eq!(compute("0.0000000001").unwrap(), "0.0000000001");
        assert_eq!(compute("1e-10").unwrap(), "0.0000000001");
        assert_eq!(
            compute("123456789012345678.0123456789").unwrap(),
            "123456789012345678.0123456789"
        );
        assert_eq!(compute("0.00").unwrap(), "0");
        assert_eq!(compute("-0").unwrap(), "0");
        assert_eq!(compute("0e99999999999999999999").unwrap(), "0");
        assert_eq!(
            refused("1000000000000000001"),
            "out_of_range: compute 1000000000000000001 exceeds the limit of 1e18 per event"
        );
        assert_eq!(
            refused("1000000000000000000.5"),
            "out_of_range: compute 1000000000000000000.5 exceeds the limit of 1e18 per event"
        );
        assert_eq!(
            refused("0.00000000001"),
            "out_of_range: compute 0.00000000001 has more than 10 digits after the decimal point (the precision contract)"
        );
        assert_eq!(
            refused("1e-11"),
            "out_of_range: compute 1e-11 has more than 10 digits after the decimal point (the precision contract)"
        );
        // 29 significant digits are refused whether written out or in exponent form (the
        // exponent form used to be rounded silently).
        assert_eq!(
            refused("0.1234567890123456789012345678901234567e1"),
            "out_of_range: compute 0.1234567890123456789012345678901234567e1 has more than 28 significant digits and cannot be represented exactly"
        );
        assert_eq!(
            refused("1.2345678901234567890123456789").split(':').next(),
            Some("out_of_range")
        );
        assert_eq!(
            refused("1e19"),
            "out_of_range: compute 1e19 exceeds the limit of 1e18 per event"
        );
        assert_eq!(
            refused("1e99999999999999999999").split(':').next(),
            Some("out_of_range")
        );
        assert_eq!(
            refused("1e-99999999999999999999").split(':').next(),
            Some("out_of_range")
        );
        assert_eq!(refused("-1e-3"), "negative_value: compute must be >= 0, got -1e-3");
    }

    #[test]
    fn only_a_json_object_is_an_event() {
        let array = r#"["req-1", "2026-11-29T03:00:00Z", "m", "a100-80g", 1, 2]"#;
        assert_eq!(
            decode_str(array).unwrap_err().to_string(),
            format!(
                "malformed_json: an event must be a JSON object, got {:?}...",
                &array[..40]
            )
        );
        assert_eq!(code_of("42"), RejectCode::MalformedJson);
        assert_eq!(code_of("  \"text\""), RejectCode::MalformedJson);
    }

    #[test]
    fn a_label_set_is_bounded_in_bytes_so_that_every_accepted_event_is_storable() {
        let with = |labels: String| GOOD.replace(r#"{"tenant": "search"}"#, &labels);
        // 16 labels of 64-character keys and values: within the per-label limits, 2 KB in all.
        let wide: Vec<String> = (0..16)
            .map(|i| format!("\"{}\": \"{}\"", format!("{i:02}").repeat(32), "v".repeat(64)))
            .collect();
        assert_eq!(
            decode_str(&with(format!("{{{}}}", wide.join(", "))))
                .unwrap_err()
                .to_string(),
            "field_too_long: labels are 2048 bytes of UTF-8 in keys and values together, the limit is 1024"
        );
        // Four labels of 128 emoji each are 4 x 512 bytes.
        let emoji: Vec<String> = (0..4).map(|i| format!("\"k{i}\": \"{}\"", "😀".repeat(128))).collect();
        assert_eq!(
            decode_str(&with(format!("{{{}}}", emoji.join(", ")))).unwrap_err().code,
            RejectCode::FieldTooLong
        );
        // Exactly at the limit is accepted.
        let at_limit = format!("{{\"kk\": \"{}\", \"lm\": \"{}\"}}", "😀".repeat(127), "😀".repeat(128));
        let e = decode_str(&with(at_limit)).unwrap();
        assert_eq!(e.labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(), 1024);
    }

    #[test]
    fn plain_numbers_read_fast_are_the_same_decimals_at_the_same_scale() {
        let numbers = [
            "0",
            "0.0",
            "0.00",
            "1",
            "7",
            "10",
            "1500",
            "100.00",
            "1.50",
            "0.5",
            "1234.5",
            "16.25",
            "0.0000000001",
            "123456789012345678",
            "12345678.0123456789",
            "999999999999999999",
            "00.10",
            "5000.000",
        ];
        for n in numbers {
            let fast = plain_quantity(n).unwrap_or_else(|| panic!("{n} is plain"));
            let general = general_quantity(n).unwrap();
            assert_eq!(fast, general, "{n}");
            assert_eq!(fast.scale(), general.scale(), "{n}");
            assert_eq!(
                fast.serialize(),
                general.serialize(),
                "{n}: content digests hash these bytes"
            );
        }
        // Everything else goes the general way (and is refused there when it must be).
        for n in [
            "-1",
            "1e3",
            "1.5E+3",
            "1234567890123456789",
            "0.00000000001",
            "",
            ".",
            "1.2.3",
            "1,5",
        ] {
            assert_eq!(plain_quantity(n), None, "{n}");
        }
    }

    #[test]
    fn timestamps_read_fast_are_the_instants_chrono_reads() {
        let common = [
            "2026-11-29T03:00:00Z",
            "2026-11-29T03:00:00.1Z",
            "2026-11-29T03:00:00.123Z",
            "2026-11-29T03:00:00.123456789Z",
            "2024-02-29T23:59:59.999Z",
            "0001-01-01T00:00:00Z",
        ];
        for t in common {
            let chrono = DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc);
            assert_eq!(utc_timestamp(t), Some(chrono), "{t}");
        }
        // Left to chrono: other offsets and spellings, leap seconds, long fractions, and
        // everything invalid (which chrono words the rejection of).
        let other = [
            "2026-11-29T04:00:00+01:00",
            "2026-11-29t03:00:00z",
            "2026-11-29 03:00:00Z",
            "2026-12-31T23:59:60Z",
            "2026-11-29T03:00:00.1234567891Z",
            "2026-11-29T03:00:00.Z",
            "2026-02-29T03:00:00Z",
            "2026-13-01T03:00:00Z",
            "2026-11-29T24:00:00Z",
            "2026-11-29T03:60:00Z",
            "2026-11-29T03:00:0xZ",
            "yesterday",
        ];
        for t in other {
            assert_eq!(utc_timestamp(t), None, "{t}");
        }
    }

    #[test]
    fn the_time_limits_are_exact_to_the_nanosecond() {
        let limits = limits();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let now = at("2026-11-29T03:05:00.5Z");
        // 300 s of skew, 7 days of age: the bounds themselves are inside.
        assert_eq!(out_of_range(at("2026-11-29T03:10:00.5Z"), &limits, now), (false, false));
        assert_eq!(
            out_of_range(at("2026-11-29T03:10:00.500000001Z"), &limits, now),
            (true, false)
        );
        assert_eq!(out_of_range(at("2026-11-22T03:05:00.5Z"), &limits, now), (false, false));
        assert_eq!(
            out_of_range(at("2026-11-22T03:05:00.499999999Z"), &limits, now),
            (false, true)
        );
        // A leap second (chrono's nanoseconds past 10^9) is compared by chrono itself.
        let leap = DateTime::parse_from_rfc3339("2026-11-29T03:09:60.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let chrono = (
            leap > now + chrono::Duration::seconds(300),
            leap < now - chrono::Duration::days(7),
        );
        assert_eq!(out_of_range(leap, &limits, now), chrono);
    }

    #[test]
    fn max_quantity_is_ten_to_the_eighteenth() {
        assert_eq!(MAX_QUANTITY, Decimal::from(1_000_000_000_000_000_000u64));
    }
}
