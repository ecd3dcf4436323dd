//! How loadgen writes a token event in each mapped format, as the producers it stands for write
//! them. The hardware goes where the source configuration in the README's "Sources and formats"
//! expects it: `/hardware` (openai, json), `/data/hardware` (cloudevents), the resource
//! attribute `host.type` (OTLP).

use chrono::{DateTime, Utc};
use prost::Message as _;

use std::collections::BTreeMap;

use crate::config::{SourceFormat, SourceSettings, TimestampFormat};
use crate::ingest::source::otlp::wire;

/// One request's usage in token terms.
pub struct TokenEvent<'a> {
    /// Unique per request; for OTLP 48 hex digits (trace id + span id).
    pub id: &'a str,
    /// When the request ended.
    pub ts: DateTime<Utc>,
    /// The model.
    pub model: &'a str,
    /// The hardware target.
    pub hardware: &'a str,
    /// Prompt tokens.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
    /// The `tenant` label.
    pub tenant: &'a str,
}

/// The event in `format` (any format but costwatch's own). OTLP messages carry one non-GenAI
/// span beside the GenAI one, which a consumer skips.
pub fn render(format: SourceFormat, e: &TokenEvent<'_>) -> Vec<u8> {
    let TokenEvent {
        id,
        model,
        hardware,
        input,
        output,
        tenant,
        ..
    } = e;
    match format {
        SourceFormat::Openai => format!(
            r#"{{"id":"{id}","object":"chat.completion","created":{},"model":"{model}","hardware":"{hardware}","user":"{tenant}","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{input},"completion_tokens":{output},"total_tokens":{}}}}}"#,
            e.ts.timestamp(),
            input + output
        )
        .into_bytes(),
        SourceFormat::Cloudevents => format!(
            r#"{{"specversion":"1.0","type":"litellm_tokens","id":"{id}","source":"loadgen","time":"{}","subject":"{tenant}","data":{{"model":"{model}","hardware":"{hardware}","cost":0.001,"prompt_tokens":{input},"completion_tokens":{output},"total_tokens":{}}}}}"#,
            e.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            input + output
        )
        .into_bytes(),
        SourceFormat::Json => format!(
            r#"{{"request":"{id}","ts_ms":{},"model":"{model}","hardware":"{hardware}","tenant":"{tenant}","tokens":{{"in":"{input}","out":{output}}}}}"#,
            e.ts.timestamp_millis()
        )
        .into_bytes(),
        SourceFormat::OtlpJson => otlp_json(e),
        SourceFormat::OtlpProto => otlp_proto(e).encode_to_vec(),
        SourceFormat::Costwatch => unreachable!("costwatch events are written by loadgen itself"),
    }
}

/// The trace and span ids of an OTLP event id (48 hex digits).
fn ids(id: &str) -> (&str, &str) {
    id.split_at(32)
}

fn otlp_json(e: &TokenEvent<'_>) -> Vec<u8> {
    let (trace, span) = ids(e.id);
    let end = e.ts.timestamp_nanos_opt().unwrap_or_default();
    format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"{tenant}"}}}},{{"key":"host.type","value":{{"stringValue":"{hw}"}}}}]}},"scopeSpans":[{{"scope":{{"name":"loadgen"}},"spans":[{{"traceId":"{trace}","spanId":"{span}","name":"chat {model}","kind":3,"startTimeUnixNano":"{start}","endTimeUnixNano":"{end}","attributes":[{{"key":"gen_ai.request.model","value":{{"stringValue":"{model}"}}}},{{"key":"gen_ai.usage.input_tokens","value":{{"intValue":"{input}"}}}},{{"key":"gen_ai.usage.output_tokens","value":{{"intValue":"{output}"}}}}]}},{{"traceId":"{trace}","spanId":"00000000000000ff","name":"GET /healthz","kind":2,"endTimeUnixNano":"{end}","attributes":[]}}]}}]}}]}}"#,
        tenant = e.tenant,
        hw = e.hardware,
        model = e.model,
        input = e.input,
        output = e.output,
        start = end - 1_000_000,
    )
    .into_bytes()
}

fn otlp_proto(e: &TokenEvent<'_>) -> wire::ExportTraceServiceRequest {
    use wire::any_value::Value;
    let kv = |key: &str, v: Value| wire::KeyValue {
        key: key.into(),
        value: Some(wire::AnyValue { value: Some(v) }),
    };
    let (trace, span) = ids(e.id);
    let bytes = |hex_text: &str| hex::decode(hex_text).unwrap_or_default();
    let end = e.ts.timestamp_nanos_opt().unwrap_or_default() as u64;
    let genai = wire::Span {
        trace_id: bytes(trace),
        span_id: bytes(span),
        end_time_unix_nano: end,
        attributes: vec![
            kv("gen_ai.request.model", Value::StringValue(e.model.into())),
            kv("gen_ai.usage.input_tokens", Value::IntValue(e.input as i64)),
            kv("gen_ai.usage.output_tokens", Value::IntValue(e.output as i64)),
        ],
    };
    let health = wire::Span {
        trace_id: bytes(trace),
        span_id: vec![0, 0, 0, 0, 0, 0, 0, 0xff],
        end_time_unix_nano: end,
        attributes: vec![kv("http.route", Value::StringValue("/healthz".into()))],
    };
    wire::ExportTraceServiceRequest {
        resource_spans: vec![wire::ResourceSpans {
            resource: Some(wire::Resource {
                attributes: vec![
                    kv("service.name", Value::StringValue(e.tenant.into())),
                    kv("host.type", Value::StringValue(e.hardware.into())),
                ],
            }),
            scope_spans: vec![wire::ScopeSpans {
                spans: vec![genai, health],
            }],
        }],
    }
}

/// A message the source must refuse, in turn: not its format at all, or its format without the
/// usage it must carry.
pub fn malformed(format: SourceFormat, i: u64, ts: DateTime<Utc>) -> Vec<u8> {
    if i % 2 == 0 {
        return match format {
            SourceFormat::OtlpProto => vec![0xff, 0xff, 0xff, 0x01],
            _ => b"{this is not json".to_vec(),
        };
    }
    let id = format!("{:048x}", 0xbad0_0000_0000u64 + i);
    match format {
        SourceFormat::Openai => format!(r#"{{"id":"{id}","created":{},"model":"model-0","hardware":"hw-0"}}"#, ts.timestamp()),
        SourceFormat::Cloudevents => format!(
            r#"{{"specversion":"1.0","type":"litellm_tokens","id":"{id}","source":"loadgen","data":{{"model":"model-0","hardware":"hw-0","prompt_tokens":1}}}}"#
        ),
        SourceFormat::Json => format!(
            r#"{{"request":"{id}","ts_ms":{},"model":"model-0","hardware":"hw-0","tokens":{{"in":"-5"}}}}"#,
            ts.timestamp_millis()
        ),
        // A GenAI span without a model.
        SourceFormat::OtlpJson => format!(
            r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"host.type","value":{{"stringValue":"hw-0"}}}}]}},"scopeSpans":[{{"spans":[{{"traceId":"{}","spanId":"{}","endTimeUnixNano":"{}","attributes":[{{"key":"gen_ai.usage.input_tokens","value":{{"intValue":"5"}}}}]}}]}}]}}]}}"#,
            &id[..32],
            &id[32..],
            ts.timestamp_nanos_opt().unwrap_or_default()
        ),
        SourceFormat::OtlpProto | SourceFormat::Costwatch => {
            // A field whose length runs past the end of the message.
            return vec![0x0a, 0x7f, 0x01];
        }
    }
    .into_bytes()
}

/// The `[[sources]]` entry that reads what [`render`] writes in `format`: the hardware from
/// where loadgen puts it, and the `tenant` label.
pub fn source(format: SourceFormat, name: &str, topic: &str) -> SourceSettings {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let (hardware_pointer, hardware_attribute, labels, pointers) = match format {
        SourceFormat::Openai => (Some("/hardware"), None, map(&[("tenant", "/user")]), map(&[])),
        SourceFormat::Cloudevents => (Some("/data/hardware"), None, map(&[("tenant", "/subject")]), map(&[])),
        SourceFormat::Json => (
            Some("/hardware"),
            None,
            map(&[("tenant", "/tenant")]),
            map(&[
                ("event_id", "/request"),
                ("timestamp", "/ts_ms"),
                ("model", "/model"),
                ("input_tokens", "/tokens/in"),
                ("output_tokens", "/tokens/out"),
            ]),
        ),
        SourceFormat::OtlpJson | SourceFormat::OtlpProto => {
            (None, Some("host.type"), map(&[("tenant", "service.name")]), map(&[]))
        }
        SourceFormat::Costwatch => (None, None, map(&[]), map(&[])),
    };
    SourceSettings {
        name: name.into(),
        topic: topic.into(),
        format,
        hardware: None,
        hardware_pointer: hardware_pointer.map(String::from),
        hardware_attribute: hardware_attribute.map(String::from),
        pointers,
        attributes: BTreeMap::new(),
        labels,
        types: (format == SourceFormat::Cloudevents).then(|| vec!["litellm_tokens".to_owned()]),
        timestamp_format: (format == SourceFormat::Json).then_some(TimestampFormat::UnixMs),
    }
}

/// [`source`] as the TOML `[[sources]]` entry to paste into a configuration.
pub fn source_toml(format: SourceFormat, name: &str, topic: &str) -> String {
    let s = source(format, name, topic);
    let quoted = |v: &str| serde_json::to_string(v).expect("a string serializes");
    let mut out = format!(
        "[[sources]]\nname = {}\ntopic = {}\nformat = {}\n",
        quoted(&s.name),
        quoted(&s.topic),
        quoted(format.as_str())
    );
    for (key, value) in [
        ("hardware_pointer", &s.hardware_pointer),
        ("hardware_attribute", &s.hardware_attribute),
    ] {
        if let Some(v) = value {
            out.push_str(&format!("{key} = {}\n", quoted(v)));
        }
    }
    if let Some(types) = &s.types {
        let types: Vec<String> = types.iter().map(|t| quoted(t)).collect();
        out.push_str(&format!("types = [{}]\n", types.join(", ")));
    }
    if s.timestamp_format.is_some() {
        out.push_str("timestamp_format = \"unix_ms\"\n");
    }
    for (table, map) in [("pointers", &s.pointers), ("labels", &s.labels)] {
        if !map.is_empty() {
            out.push_str(&format!("[sources.{table}]\n"));
            for (k, v) in map {
                out.push_str(&format!("{k} = {}\n", quoted(v)));
            }
        }
    }
    out
}
