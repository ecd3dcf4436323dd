//! OpenTelemetry traces as the Collector's Kafka exporter writes them: one
//! `ExportTraceServiceRequest` per message, in protobuf (`otlp_proto`, the exporter's default) or
//! in OTLP/JSON (`otlp_json`). Every span with `gen_ai.usage.input_tokens` or
//! `gen_ai.usage.output_tokens` is one event (id = traceId + spanId in hex, time = the span's
//! end); other spans are skipped and counted. Pure.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use prost::Message;
use rust_decimal::Decimal;

use super::Decoded;
use crate::config::{SourceFormat, SourceSettings};
use crate::domain::{ComputeUnits, StorageUnits};
use crate::ingest::event::{self, Basis, Limits, RawLabels, RejectCode, Rejection, UsageEventRef};

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

/// An attribute value as far as costwatch reads it.
#[derive(Debug, Clone, PartialEq)]
enum Attr {
    Text(String),
    /// An integer or a double, as exact decimal text (OTLP/JSON writes int64 as a string).
    Number(String),
    Other,
}

/// One span, from either encoding.
struct Span {
    trace_id: String,
    span_id: String,
    end_unix_nano: u64,
    attributes: Vec<(String, Attr)>,
}

/// A span with its resource's attributes.
struct InResource<'s> {
    span: &'s Span,
    resource: &'s [(String, Attr)],
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
        &self,
        format: SourceFormat,
        payload: Option<&'a [u8]>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Decoded<'a>, Rejection> {
        let bytes = event::checked_payload(payload, limits)?;
        let resources = match format {
            SourceFormat::OtlpProto => from_proto(bytes)?,
            _ => from_json(bytes)?,
        };
        let mut decoded = Decoded::default();
        for (resource, spans) in &resources {
            for span in spans {
                let span = InResource { span, resource };
                match self.span(&span, limits, now) {
                    Some(result) => decoded.events.push(result),
                    None => decoded.skipped += 1,
                }
            }
        }
        Ok(decoded)
    }

    /// The span's event; `None` for a span without GenAI usage.
    fn span<'o>(
        &self,
        span: &InResource<'_>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Option<Result<UsageEventRef<'o>, Rejection>> {
        let input = span.own(&self.input_tokens);
        let output = span.own(&self.output_tokens);
        if input.is_none() && output.is_none() {
            return None;
        }
        Some(self.event(span, input, output, limits, now))
    }

    fn event<'o>(
        &self,
        span: &InResource<'_>,
        input: Option<&Attr>,
        output: Option<&Attr>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<UsageEventRef<'o>, Rejection> {
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
            Hardware::Static(h) => h.clone(),
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
                labels.push((Cow::Owned(name.clone()), Cow::Owned(v)));
            }
        }
        Ok(UsageEventRef {
            event_id: event::name("event_id", Cow::Owned(format!("{trace_id}{span_id}")))?,
            timestamp,
            model: event::name("model", Cow::Owned(model))?,
            hardware: event::name("hardware", Cow::Owned(hardware))?,
            compute: ComputeUnits::default(),
            storage: StorageUnits::default(),
            labels: event::checked_labels(labels)?,
            tokens,
            basis: Basis::NoProfile,
        })
    }
}

impl InResource<'_> {
    /// The span's own attribute `key`.
    fn own(&self, key: &str) -> Option<&Attr> {
        self.span.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Attribute `key` as text, from the span, else from its resource.
    fn text(&self, key: &str) -> Option<String> {
        let attr = self
            .own(key)
            .or_else(|| self.resource.iter().find(|(k, _)| k == key).map(|(_, v)| v))?;
        match attr {
            Attr::Text(s) | Attr::Number(s) => Some(s.clone()),
            Attr::Other => None,
        }
    }
}

/// A token count attribute as an exact quantity.
fn tokens(key: &str, attr: Option<&Attr>) -> Result<Option<Decimal>, Rejection> {
    let Some(attr) = attr else { return Ok(None) };
    let text = match attr {
        Attr::Number(n) => n.clone(),
        Attr::Text(s) => serde_json::to_string(s).expect("a string serializes"),
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

type Resources = Vec<(Vec<(String, Attr)>, Vec<Span>)>;

fn undecodable(format: &str, e: impl std::fmt::Display) -> Rejection {
    Rejection::new(
        RejectCode::MalformedJson,
        format!("not an OTLP ExportTraceServiceRequest in {format}: {e}"),
    )
}

fn from_proto(bytes: &[u8]) -> Result<Resources, Rejection> {
    let request = wire::ExportTraceServiceRequest::decode(bytes).map_err(|e| undecodable("protobuf", e))?;
    let attrs = |kvs: Vec<wire::KeyValue>| -> Vec<(String, Attr)> {
        kvs.into_iter()
            .map(|kv| {
                (
                    kv.key,
                    kv.value.and_then(|v| v.value).map_or(Attr::Other, attr_of_proto),
                )
            })
            .collect()
    };
    Ok(request
        .resource_spans
        .into_iter()
        .map(|rs| {
            let resource = attrs(rs.resource.map(|r| r.attributes).unwrap_or_default());
            let spans = rs
                .scope_spans
                .into_iter()
                .flat_map(|ss| ss.spans)
                .map(|s| Span {
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    end_unix_nano: s.end_time_unix_nano,
                    attributes: attrs(s.attributes),
                })
                .collect();
            (resource, spans)
        })
        .collect())
}

fn attr_of_proto(v: wire::any_value::Value) -> Attr {
    use wire::any_value::Value;
    match v {
        Value::StringValue(s) => Attr::Text(s),
        Value::IntValue(i) => Attr::Number(i.to_string()),
        // The shortest text that reads back as the same double: 1500.0 is "1500".
        Value::DoubleValue(d) if d.is_finite() => Attr::Number(format!("{d}")),
        _ => Attr::Other,
    }
}

fn from_json(bytes: &[u8]) -> Result<Resources, Rejection> {
    let request: json::Request = serde_json::from_slice(bytes).map_err(|e| undecodable("JSON", e))?;
    let attrs = |kvs: Vec<json::KeyValue>| -> Vec<(String, Attr)> {
        kvs.into_iter().map(|kv| (kv.key, kv.value.attr())).collect()
    };
    request
        .resource_spans
        .into_iter()
        .map(|rs| {
            let resource = attrs(rs.resource.map(|r| r.attributes).unwrap_or_default());
            let spans = rs
                .scope_spans
                .into_iter()
                .flat_map(|ss| ss.spans)
                .map(|s| {
                    Ok(Span {
                        trace_id: s.trace_id.to_ascii_lowercase(),
                        span_id: s.span_id.to_ascii_lowercase(),
                        end_unix_nano: s.end_time_unix_nano.number("endTimeUnixNano")?,
                        attributes: attrs(s.attributes),
                    })
                })
                .collect::<Result<Vec<_>, Rejection>>()?;
            Ok((resource, spans))
        })
        .collect()
}

/// OTLP/JSON: the protobuf JSON mapping with lowerCamelCase names, hex trace and span ids,
/// and 64-bit integers as strings (or numbers, which some producers write).
mod json {
    use serde::Deserialize;
    use serde_json::Value;

    use super::{undecodable, Attr, Rejection};

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Request {
        #[serde(default)]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ResourceSpans {
        #[serde(default)]
        pub resource: Option<Resource>,
        #[serde(default)]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Deserialize)]
    pub struct Resource {
        #[serde(default)]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Deserialize)]
    pub struct ScopeSpans {
        #[serde(default)]
        pub spans: Vec<Span>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Span {
        #[serde(default)]
        pub trace_id: String,
        #[serde(default)]
        pub span_id: String,
        #[serde(default)]
        pub end_time_unix_nano: Int,
        #[serde(default)]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Deserialize)]
    pub struct KeyValue {
        pub key: String,
        #[serde(default)]
        pub value: AnyValue,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct AnyValue {
        string_value: Option<String>,
        int_value: Option<Int>,
        double_value: Option<Value>,
    }

    impl AnyValue {
        pub fn attr(self) -> Attr {
            if let Some(s) = self.string_value {
                return Attr::Text(s);
            }
            if let Some(Int(Some(v))) = self.int_value {
                return Attr::Number(v);
            }
            match self.double_value {
                // serde_json prints a double in its shortest exact form.
                Some(Value::Number(n)) => Attr::Number(n.to_string()),
                _ => Attr::Other,
            }
        }
    }

    /// An int64 written as a string or as a number, kept as its decimal text.
    #[derive(Default)]
    pub struct Int(Option<String>);

    impl<'de> Deserialize<'de> for Int {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(match Value::deserialize(d)? {
                Value::String(s) => Int(Some(s)),
                Value::Number(n) if n.is_u64() || n.is_i64() => Int(Some(n.to_string())),
                _ => Int(None),
            })
        }
    }

    impl Int {
        pub fn number(&self, field: &str) -> Result<u64, Rejection> {
            match &self.0 {
                None => Ok(0),
                Some(s) => s
                    .parse()
                    .map_err(|e| undecodable("JSON", format!("{field} {s:?}: {e}"))),
            }
        }
    }
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

    fn source(format: SourceFormat) -> Source {
        let mut s = crate::ingest::source::mapped::tests::settings(format);
        s.hardware = None;
        s.hardware_attribute = Some("host.type".into());
        s.labels.insert("service".into(), "service.name".into());
        Source::new(&s, UsageProfiles::default())
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
        let d = source(SourceFormat::OtlpJson)
            .decode(Some(BATCH.as_bytes()), &limits(), now())
            .unwrap();
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
        let d = source(SourceFormat::OtlpProto)
            .decode(Some(&bytes), &limits(), now())
            .unwrap();
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
