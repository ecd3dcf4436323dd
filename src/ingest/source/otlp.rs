//! OpenTelemetry traces as the Collector's Kafka exporter writes them: one
//! `ExportTraceServiceRequest` per message, in protobuf (`otlp_proto`, the exporter's default) or
//! in OTLP/JSON (`otlp_json`). Every span with `gen_ai.usage.input_tokens` or
//! `gen_ai.usage.output_tokens` is one event (id = traceId + spanId in hex, time = the span's
//! end); other spans are skipped and counted. Pure.

use std::borrow::Cow;
use std::ops::Range;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use smallvec::SmallVec;

use super::Decoded;
use crate::config::{SourceFormat, SourceSettings};
use crate::domain::{ComputeUnits, StorageUnits};
use crate::ingest::event::{self, Basis, Limits, RawLabels, RejectCode, Rejection, UsageEventRef};

mod json;
mod proto;

/// The GenAI semantic conventions' attributes costwatch reads by default.
const INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
const OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
const RESPONSE_MODEL: &str = "gen_ai.response.model";
const REQUEST_MODEL: &str = "gen_ai.request.model";

/// Which attributes carry each field.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// `None`: `gen_ai.response.model`, else `gen_ai.request.model`.
    model: Option<String>,
    input_tokens: String,
    output_tokens: String,
    hardware: Hardware,
    labels: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
enum Hardware {
    Static(String),
    Attribute(String),
}

/// An attribute value as far as costwatch reads it, borrowed from the message where it can be.
#[derive(Debug, Clone, PartialEq)]
enum Attr<'a> {
    Text(Cow<'a, str>),
    /// An integer or a double as exact decimal text (OTLP/JSON writes int64 as a string).
    Number(Cow<'a, str>),
    /// A protobuf int64, turned into text only if a name or label reads it.
    Int(i64),
    /// A finite protobuf double, turned into text only when read.
    Double(f64),
    Other,
}

impl<'a> Attr<'a> {
    /// A protobuf double: non-finite values are no numbers costwatch reads.
    fn double(d: f64) -> Self {
        if d.is_finite() {
            Attr::Double(d)
        } else {
            Attr::Other
        }
    }

    /// The value as text: a string as it is, a number as its decimal text.
    fn text(&self) -> Option<Cow<'a, str>> {
        match self {
            Attr::Text(s) | Attr::Number(s) => Some(s.clone()),
            Attr::Int(i) => Some(Cow::Owned(i.to_string())),
            // The shortest text that reads back as the same double: 1500.0 is "1500".
            Attr::Double(d) => Some(Cow::Owned(format!("{d}"))),
            Attr::Other => None,
        }
    }
}

/// A trace or span id: bytes in protobuf, hex text (in either case) in OTLP/JSON.
#[derive(Debug, Clone, PartialEq)]
enum Id<'a> {
    Bytes(Cow<'a, [u8]>),
    Hex(Cow<'a, str>),
}

impl Id<'_> {
    fn is_empty(&self) -> bool {
        match self {
            Id::Bytes(b) => b.is_empty(),
            Id::Hex(h) => h.is_empty(),
        }
    }

    /// Appends the id in lower-case hex, as bytes: pushing chars onto a String cost 290
    /// instructions per id.
    fn push_hex(&self, out: &mut Vec<u8>) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        match self {
            Id::Bytes(bytes) => {
                for b in bytes.iter() {
                    out.extend_from_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]);
                }
            }
            Id::Hex(h) => {
                let start = out.len();
                out.extend_from_slice(h.as_bytes());
                out[start..].make_ascii_lowercase();
            }
        }
    }
}

/// The event id: trace id and span id in lower-case hex.
fn event_id(trace_id: &Id<'_>, span_id: &Id<'_>) -> String {
    let mut id = Vec::with_capacity(48);
    trace_id.push_hex(&mut id);
    span_id.push_hex(&mut id);
    String::from_utf8(id).expect("hex digits, or UTF-8 with its ASCII letters lower-cased")
}

/// An attribute's key and value.
type KeyValue<'a> = (Cow<'a, str>, Attr<'a>);

/// The spans of one request, flat: every attribute (resources' and spans') in one list and each
/// span naming its own and its resource's part of it, so that a message of a few spans costs no
/// allocation (and a large one two lists, whatever its shape).
#[derive(Debug, Default)]
struct Spans<'a> {
    attributes: SmallVec<[KeyValue<'a>; 8]>,
    spans: SmallVec<[Span<'a>; 2]>,
}

/// One span, from either encoding.
#[derive(Debug)]
struct Span<'a> {
    trace_id: Id<'a>,
    span_id: Id<'a>,
    end_unix_nano: u64,
    /// Its own attributes in [`Spans::attributes`].
    own: Range<usize>,
    /// Its resource's attributes in [`Spans::attributes`].
    resource: Range<usize>,
}

impl<'a> Spans<'a> {
    /// Adds a span whose own attributes are those from `first_attribute` on; its resource's
    /// are set by [`Spans::end_resource`].
    fn push_span(&mut self, trace_id: Id<'a>, span_id: Id<'a>, end_unix_nano: u64, first_attribute: usize) {
        self.spans.push(Span {
            trace_id,
            span_id,
            end_unix_nano,
            own: first_attribute..self.attributes.len(),
            resource: 0..0,
        });
    }

    /// Gives the spans from `first_span` on the resource attributes `resource` (the resource
    /// may come before or after its spans in a message).
    fn end_resource(&mut self, first_span: usize, resource: Range<usize>) {
        for span in &mut self.spans[first_span..] {
            span.resource = resource.clone();
        }
    }
}

/// A span with the list its attribute ranges point into.
struct InResource<'s, 'a> {
    span: &'s Span<'a>,
    attributes: &'s [KeyValue<'a>],
}

impl Mapping {
    /// The mapping of a validated `otlp_json` or `otlp_proto` source.
    pub fn new(s: &SourceSettings) -> Self {
        let attr = |f: &str, default: &str| s.attributes.get(f).cloned().unwrap_or_else(|| default.to_owned());
        Self {
            model: s.attributes.get("model").cloned(),
            input_tokens: attr("input_tokens", INPUT_TOKENS),
            output_tokens: attr("output_tokens", OUTPUT_TOKENS),
            hardware: match (&s.hardware, &s.hardware_attribute) {
                (Some(h), _) => Hardware::Static(h.clone()),
                (None, Some(a)) => Hardware::Attribute(a.clone()),
                (None, None) => Hardware::Attribute("host.type".into()),
            },
            labels: s.labels.iter().map(|(k, a)| (k.clone(), a.clone())).collect(),
        }
    }

    /// Decodes one message: a request that does not decode is one rejection; each GenAI span
    /// is an event (or a rejection of its own), every other span is skipped.
    pub fn decode<'a>(
        &'a self,
        format: SourceFormat,
        payload: Option<&'a [u8]>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Decoded<'a>, Rejection> {
        let bytes = event::checked_payload(payload, limits)?;
        let spans = match format {
            SourceFormat::OtlpProto => proto::spans(bytes)?,
            _ => json::spans(bytes)?,
        };
        Ok(self.decoded(&spans, limits, now))
    }

    /// The events of the GenAI spans; the rest are skipped.
    fn decoded<'a>(&'a self, spans: &Spans<'a>, limits: &Limits, now: DateTime<Utc>) -> Decoded<'a> {
        let mut decoded = Decoded::default();
        for span in &spans.spans {
            let span = InResource {
                span,
                attributes: &spans.attributes,
            };
            match self.span(&span, limits, now) {
                Some(result) => decoded.events.push(result),
                None => decoded.skipped += 1,
            }
        }
        decoded
    }

    /// The span's event; `None` for a span without GenAI usage.
    fn span<'a>(
        &'a self,
        span: &InResource<'_, 'a>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Option<Result<UsageEventRef<'a>, Rejection>> {
        let input = span.own(&self.input_tokens);
        let output = span.own(&self.output_tokens);
        if input.is_none() && output.is_none() {
            return None;
        }
        Some(self.event(span, input, output, limits, now))
    }

    fn event<'a>(
        &'a self,
        span: &InResource<'_, 'a>,
        input: Option<&Attr<'_>>,
        output: Option<&Attr<'_>>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<UsageEventRef<'a>, Rejection> {
        let tokens = super::token_pair(tokens(INPUT_TOKENS, input)?, tokens(OUTPUT_TOKENS, output)?, &"span")?;
        let missing = |f: &str| {
            Rejection::new(
                RejectCode::MissingField,
                format!("missing field `{f}` (span attribute)"),
            )
        };
        let model = match &self.model {
            Some(a) => span.text(a),
            None => span.text(RESPONSE_MODEL).or_else(|| span.text(REQUEST_MODEL)),
        }
        .ok_or_else(|| missing("model"))?;
        let hardware = match &self.hardware {
            Hardware::Static(h) => Cow::Borrowed(h.as_str()),
            Hardware::Attribute(a) => span.text(a).ok_or_else(|| missing(a))?,
        };
        let Span {
            trace_id,
            span_id,
            end_unix_nano,
            ..
        } = span.span;
        if trace_id.is_empty() || span_id.is_empty() {
            return Err(missing("traceId/spanId"));
        }
        if *end_unix_nano == 0 {
            return Err(missing("endTimeUnixNano"));
        }
        let end = i64::try_from(*end_unix_nano)
            .map_err(|_| Rejection::new(RejectCode::InvalidTimestamp, "endTimeUnixNano is out of range"))?;
        // The time as written only goes into a rejection's message.
        let timestamp = event::time_in_range(&end, DateTime::from_timestamp_nanos(end), limits, now)?;
        let mut labels = RawLabels::new();
        for (name, attr) in &self.labels {
            if let Some(v) = span.text(attr) {
                labels.push((Cow::Borrowed(name.as_str()), v));
            }
        }
        Ok(UsageEventRef {
            event_id: event::name("event_id", Cow::Owned(event_id(trace_id, span_id)))?,
            timestamp,
            model: event::name("model", model)?,
            hardware: event::name("hardware", hardware)?,
            compute: ComputeUnits::default(),
            storage: StorageUnits::default(),
            labels: event::checked_labels(labels)?,
            tokens,
            basis: Basis::NoProfile,
        })
    }
}

impl<'a> InResource<'_, 'a> {
    /// The span's own attribute `key`.
    fn own(&self, key: &str) -> Option<&Attr<'a>> {
        find(&self.attributes[self.span.own.clone()], key)
    }

    /// Attribute `key` as text, from the span, else from its resource.
    fn text(&self, key: &str) -> Option<Cow<'a, str>> {
        self.own(key)
            .or_else(|| find(&self.attributes[self.span.resource.clone()], key))?
            .text()
    }
}

/// The first attribute named `key`.
fn find<'s, 'a>(attributes: &'s [KeyValue<'a>], key: &str) -> Option<&'s Attr<'a>> {
    attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// A token count attribute as an exact quantity.
fn tokens(key: &str, attr: Option<&Attr<'_>>) -> Result<Option<Decimal>, Rejection> {
    let Some(attr) = attr else { return Ok(None) };
    let text = match attr {
        // What reading the int's decimal text gives, without the text: the same value at scale
        // 0 (`tokens_of_an_int_are_what_its_text_gives` compares them); the rest (negative,
        // above the limit) is read as text for its rejection.
        Attr::Int(i) if (0..=MAX_INT_QUANTITY).contains(i) => return Ok(Some(Decimal::from(*i))),
        Attr::Int(i) => Cow::Owned(i.to_string()),
        Attr::Number(n) => match digits_quantity(n) {
            Some(q) => return Ok(Some(q)),
            None => n.clone(),
        },
        Attr::Double(_) => attr.text().expect("a number has text"),
        Attr::Text(s) => Cow::Owned(serde_json::to_string(s).expect("a string serializes")),
        Attr::Other => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                format!("{key} must be a number"),
            ))
        }
    };
    // A plain number (what an int or double attribute becomes) needs no JSON reading.
    if event::is_number(&text) {
        return event::quantity_or_text(key, &text).map(Some);
    }
    let raw: Box<serde_json::value::RawValue> = serde_json::from_str(&text)
        .map_err(|_| Rejection::new(RejectCode::InvalidField, format!("{key} must be a number")))?;
    event::quantity_or_text(key, raw.get()).map(Some)
}

/// A JSON integer of 1 to 18 digits (OTLP/JSON's usual `"intValue":"1200"`) as the quantity
/// reading it as text gives: the same value at scale 0 (`digit_strings_are_what_their_text_gives`
/// compares them), at a fifth of the cost. Leading zeros are no JSON number, refused there.
fn digits_quantity(s: &str) -> Option<Decimal> {
    if s.starts_with('0') && s != "0" {
        return None;
    }
    digits(s, 18).map(Decimal::from)
}

/// 1 to `max` (at most 19, so below 10^19: no overflow) ASCII digits as a u64, at a third of
/// the cost of `parse`; `None` for anything else.
fn digits(s: &str, max: usize) -> Option<u64> {
    debug_assert!(max <= 19);
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0, |n, b| n * 10 + u64::from(b - b'0')))
}

/// [`event::MAX_QUANTITY`] as an int: 10^18.
const MAX_INT_QUANTITY: i64 = 1_000_000_000_000_000_000;

fn undecodable(format: &str, e: impl std::fmt::Display) -> Rejection {
    Rejection::new(
        RejectCode::MalformedJson,
        format!("not an OTLP ExportTraceServiceRequest in {format}: {e}"),
    )
}

/// The protobuf messages of `opentelemetry/proto/collector/trace/v1` that costwatch reads,
/// with the field numbers of opentelemetry-proto 1.x; prost skips every other field. Public for
/// `loadgen`, which writes them.
pub mod wire {
    /// One OTLP export: what the Collector's Kafka exporter writes per message.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        /// Spans grouped by the resource that produced them.
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    /// The spans of one resource.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        /// The resource (service, host) and its attributes.
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        /// Spans grouped by instrumentation scope.
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    /// A resource's attributes.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        /// `service.name`, `host.type`, ...
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    /// The spans of one instrumentation scope.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        /// The spans.
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }

    /// The parts of a span costwatch reads.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        /// 16 bytes.
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        /// 8 bytes.
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        /// Unix nanoseconds.
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        /// `gen_ai.*` and the rest.
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
    }

    /// One attribute.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        /// Its name.
        #[prost(string, tag = "1")]
        pub key: String,
        /// Its value.
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    /// An attribute value (arrays, maps and bytes are skipped as unknown fields).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        /// The value, if it is one costwatch reads.
        #[prost(oneof = "any_value::Value", tags = "1, 2, 3, 4")]
        pub value: Option<any_value::Value>,
    }

    /// The kinds of [`AnyValue`] costwatch reads.
    pub mod any_value {
        /// A scalar attribute value.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            /// Text.
            #[prost(string, tag = "1")]
            StringValue(String),
            /// A boolean.
            #[prost(bool, tag = "2")]
            BoolValue(bool),
            /// A 64-bit integer.
            #[prost(int64, tag = "3")]
            IntValue(i64),
            /// A double.
            #[prost(double, tag = "4")]
            DoubleValue(f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::ingest::source::test_values::{limits, now};
    use crate::ingest::source::Source;
    use crate::pricing::profiles::UsageProfiles;

    fn settings(format: SourceFormat) -> SourceSettings {
        let mut s = crate::ingest::source::mapped::tests::settings(format);
        s.hardware = None;
        s.hardware_attribute = Some("host.type".into());
        s.labels.insert("service".into(), "service.name".into());
        s
    }

    fn source(format: SourceFormat) -> Source {
        Source::new(&settings(format), UsageProfiles::default())
    }

    type SpanView<'s, 'a> = (&'s Id<'a>, &'s Id<'a>, u64, &'s [KeyValue<'a>], &'s [KeyValue<'a>]);

    /// What the spans say, wherever their attributes sit in the list.
    fn view<'s, 'a>(spans: &'s Spans<'a>) -> Vec<SpanView<'s, 'a>> {
        let at = |r: &Range<usize>| &spans.attributes[r.clone()];
        spans
            .spans
            .iter()
            .map(|s| (&s.trace_id, &s.span_id, s.end_unix_nano, at(&s.own), at(&s.resource)))
            .collect()
    }

    /// Checks a fast reader's answer against the serde or prost path's: when the reader
    /// answers, the other path reads the same spans, and they give the same events and
    /// rejections; when the other path refuses the message, the reader does not answer.
    /// Whether the reader answered.
    pub(super) fn agree(format: SourceFormat, fast: Option<Spans<'_>>, slow: Result<Spans<'_>, Rejection>) -> bool {
        let Some(fast) = fast else { return false };
        let slow = slow.unwrap_or_else(|r| panic!("the reader answered a message the slow path refuses: {r}"));
        assert_eq!(view(&fast), view(&slow));
        // Events borrow names from the mapping for the spans' own lifetime, which is the
        // caller's; a mapping per format made once outlives every call.
        static MAPPINGS: std::sync::OnceLock<[Mapping; 2]> = std::sync::OnceLock::new();
        let mappings = MAPPINGS
            .get_or_init(|| [SourceFormat::OtlpJson, SourceFormat::OtlpProto].map(|f| Mapping::new(&settings(f))));
        let mapping = &mappings[usize::from(format == SourceFormat::OtlpProto)];
        let (fast, slow) = (
            mapping.decoded(&fast, &limits(), now()),
            mapping.decoded(&slow, &limits(), now()),
        );
        assert_eq!(format!("{:?}", fast.events), format!("{:?}", slow.events));
        assert_eq!(fast.skipped, slow.skipped);
        true
    }

    #[test]
    fn tokens_of_an_int_are_what_its_text_gives() {
        let mut ints = vec![
            0,
            1,
            9,
            10,
            300,
            1200,
            1_000_000,
            999_999_999_999_999_999,
            MAX_INT_QUANTITY,
            MAX_INT_QUANTITY + 1,
            i64::MAX,
            -1,
            -300,
            i64::MIN,
        ];
        ints.extend((0..62).map(|p| 1i64 << p));
        ints.extend((0..18).map(|p| 10i64.pow(p) - 1));
        for i in ints {
            let direct = tokens(INPUT_TOKENS, Some(&Attr::Int(i)));
            // What the int's text gave before: the text read as a quantity.
            let text = event::quantity_or_text(INPUT_TOKENS, &i.to_string()).map(Some);
            match (direct, text) {
                (Ok(Some(d)), Ok(Some(t))) => {
                    // Same value, scale and bits: sums and content digests see no difference.
                    assert_eq!(d.serialize(), t.serialize(), "{i}");
                    assert_eq!(d.scale(), 0, "{i}");
                }
                (Err(d), Err(t)) => assert_eq!((d.code, d.to_string()), (t.code, t.to_string()), "{i}"),
                (d, t) => panic!("{i}: {d:?} != {t:?}"),
            }
        }
    }

    #[test]
    fn digit_strings_are_what_their_text_gives() {
        let mut texts: Vec<String> = ["0", "1", "1200", "999999999999999999", "100000000000000000"]
            .into_iter()
            .map(String::from)
            .collect();
        texts.extend((0..18).map(|p| 10u64.pow(p).to_string()));
        for text in &texts {
            // The text path: a JSON number read as a quantity.
            assert!(event::is_number(text), "{text}");
            let slow = event::quantity_or_text(INPUT_TOKENS, text).unwrap();
            let fast = digits_quantity(text).unwrap();
            assert_eq!(fast.serialize(), slow.serialize(), "{text}");
        }
        for text in ["", "00", "007", "1000000000000000000", "1.5", "-1", "+1", "1e3", " 1"] {
            assert!(digits_quantity(text).is_none(), "{text}");
        }
        // Leading zeros stay a rejection, as they were.
        let zeros = tokens(INPUT_TOKENS, Some(&Attr::Number(Cow::Borrowed("007"))));
        assert_eq!(zeros.unwrap_err().code, RejectCode::InvalidField);
    }

    #[test]
    fn a_span_attribute_wins_over_its_resources_and_resources_do_not_mix() {
        let doc = r#"{"resourceSpans":[
          {"scopeSpans":[{"spans":[{"traceId":"AB","spanId":"01","endTimeUnixNano":"1795921200000000000","attributes":[
             {"key":"gen_ai.request.model","value":{"stringValue":"m"}},{"key":"host.type","value":{"stringValue":"span-hw"}},
             {"key":"gen_ai.usage.input_tokens","value":{"intValue":"3"}}]}]}],
           "resource":{"attributes":[{"key":"host.type","value":{"stringValue":"resource-hw"}},{"key":"service.name","value":{"stringValue":"svc"}}]}},
          {"resource":{"attributes":[{"key":"host.type","value":{"stringValue":"other-hw"}}]},
           "scopeSpans":[{"spans":[{"traceId":"AB","spanId":"02","endTimeUnixNano":"1795921200000000000","attributes":[
             {"key":"gen_ai.request.model","value":{"stringValue":"m"}},{"key":"gen_ai.usage.output_tokens","value":{"doubleValue":2}}]}]}]}]}"#;
        let src = source(SourceFormat::OtlpJson);
        let d = src.decode(Some(doc.as_bytes()), &limits(), now()).unwrap();
        let events: Vec<_> = d.events.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            (events[0].event_id.as_ref(), events[0].hardware.as_ref()),
            ("ab01", "span-hw")
        );
        assert_eq!(events[0].labels[0].1, "svc");
        assert_eq!((events[1].hardware.as_ref(), events[1].labels.len()), ("other-hw", 0));
    }

    /// Two resources as a Collector batches them: a chat span and an HTTP span from one
    /// service, and an embeddings span (input tokens only) from another on other hardware.
    const BATCH: &str = r#"{"resourceSpans":[
      {"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"chat-api"}},{"key":"host.type","value":{"stringValue":"a100-80g"}}]},
       "scopeSpans":[{"scope":{"name":"opentelemetry.instrumentation.openai"},"spans":[
         {"traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19B7EC3C1B174","name":"chat gpt-4o","kind":3,
          "startTimeUnixNano":"1795921199000000000","endTimeUnixNano":"1795921200000000000",
          "attributes":[{"key":"gen_ai.request.model","value":{"stringValue":"gpt-4o"}},{"key":"gen_ai.response.model","value":{"stringValue":"gpt-4o-2024-08-06"}},
                        {"key":"gen_ai.usage.input_tokens","value":{"intValue":"1200"}},{"key":"gen_ai.usage.output_tokens","value":{"intValue":300}}]},
         {"traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"AAA19B7EC3C1B174","name":"GET /health","kind":2,
          "endTimeUnixNano":"1795921200000000000","attributes":[{"key":"http.method","value":{"stringValue":"GET"}}]}]}]},
      {"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"embedder"}},{"key":"host.type","value":{"stringValue":"l4"}}]},
       "scopeSpans":[{"spans":[
         {"traceId":"0AF7651916CD43DD8448EB211C80319C","spanId":"B7AD6B7169203331","endTimeUnixNano":"1795921201000000000",
          "attributes":[{"key":"gen_ai.request.model","value":{"stringValue":"text-embedding-3-small"}},{"key":"gen_ai.usage.input_tokens","value":{"intValue":"77"}}]}]}]}]}"#;

    #[test]
    fn a_collector_batch_in_json_gives_one_event_per_genai_span() {
        let src = source(SourceFormat::OtlpJson);
        let d = src.decode(Some(BATCH.as_bytes()), &limits(), now()).unwrap();
        assert_eq!(d.skipped, 1);
        let events: Vec<_> = d.events.into_iter().map(Result::unwrap).collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event_id, "5b8efff798038103d269b633813fc60ceee19b7ec3c1b174");
        assert_eq!(events[0].model, "gpt-4o-2024-08-06");
        assert_eq!(events[0].hardware, "a100-80g");
        assert_eq!(events[0].timestamp.to_rfc3339(), "2026-11-29T03:00:00+00:00");
        assert_eq!(events[0].tokens.output.to_string(), "300");
        assert_eq!(events[0].labels[0].1, "chat-api");
        assert_eq!(events[1].model, "text-embedding-3-small");
        assert_eq!(events[1].hardware, "l4");
        assert_eq!(
            (events[1].tokens.input.to_string(), events[1].tokens.output.to_string()),
            ("77".into(), "0".into())
        );
    }

    #[test]
    fn the_same_batch_in_protobuf_decodes_the_same() {
        use wire::any_value::Value;
        let kv = |k: &str, v: Value| wire::KeyValue {
            key: k.into(),
            value: Some(wire::AnyValue { value: Some(v) }),
        };
        let request = wire::ExportTraceServiceRequest {
            resource_spans: vec![wire::ResourceSpans {
                resource: Some(wire::Resource {
                    attributes: vec![kv("host.type", Value::StringValue("h100".into()))],
                }),
                scope_spans: vec![wire::ScopeSpans {
                    spans: vec![
                        wire::Span {
                            trace_id: vec![0xab; 16],
                            span_id: vec![0x01; 8],
                            end_time_unix_nano: 1_795_834_800_000_000_000,
                            attributes: vec![
                                kv("gen_ai.request.model", Value::StringValue("llama".into())),
                                kv("gen_ai.usage.input_tokens", Value::IntValue(10)),
                                kv("gen_ai.usage.output_tokens", Value::IntValue(5)),
                            ],
                        },
                        wire::Span {
                            trace_id: vec![0xab; 16],
                            span_id: vec![0x02; 8],
                            end_time_unix_nano: 1_795_834_800_000_000_000,
                            attributes: vec![kv("gen_ai.usage.input_tokens", Value::IntValue(10))],
                        },
                    ],
                }],
            }],
        };
        let bytes = request.encode_to_vec();
        let src = source(SourceFormat::OtlpProto);
        let d = src.decode(Some(&bytes), &limits(), now()).unwrap();
        assert_eq!(d.skipped, 0);
        let first = d.events[0].as_ref().unwrap();
        assert_eq!(first.event_id, format!("{}{}", "ab".repeat(16), "01".repeat(8)));
        assert_eq!(first.hardware, "h100");
        assert_eq!(
            d.events[1].as_ref().unwrap_err().to_string(),
            "missing_field: missing field `model` (span attribute)"
        );
        let garbage = source(SourceFormat::OtlpProto)
            .decode(Some(b"\xff\xff\xff not protobuf"), &limits(), now())
            .unwrap_err();
        assert_eq!(garbage.code, RejectCode::MalformedJson);
    }
}
