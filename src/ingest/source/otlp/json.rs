//! `otlp_json`: the spans of an `ExportTraceServiceRequest` in OTLP/JSON (the protobuf JSON
//! mapping with lowerCamelCase names, hex trace and span ids, and 64-bit integers as strings or,
//! from some producers, numbers). A one-pass reader ([`Cursor`]) borrows keys, strings and ids
//! from the message (with serde's owned structs, decoding a loadgen message into its events
//! took 34,900 instructions; with the reader 12,500).
//!
//! The reader answers only when it is sure: anything else (an escape, a field twice, `null`, a
//! value of another type, an int or end time serde_json would read as a double, bad syntax
//! anywhere) returns `None`, and serde reads the message exactly as before, which then also
//! words the rejection. So the reader cannot change a result, only its cost. (A double's text
//! still comes from serde_json, which parses and prints it.)

use std::borrow::Cow;

use super::{undecodable, Attr, Id, Rejection, Spans};
use crate::ingest::event::{once, Cursor};

/// The spans of an OTLP/JSON request.
pub(super) fn spans(bytes: &[u8]) -> Result<Spans<'_>, Rejection> {
    let read = std::str::from_utf8(bytes).ok().and_then(read);
    match read {
        Some(spans) => Ok(spans),
        None => from_serde(bytes),
    }
}

/// The nesting depth of an unknown value skipped inside an attribute's value: the reader's
/// limit (100) stays below serde_json's (128) with the request's own levels above it.
const DEPTH: usize = 10;

/// The request's spans, or `None` for serde to decide.
fn read(text: &str) -> Option<Spans<'_>> {
    let mut c = Cursor::new(text);
    let mut out = Spans::default();
    let mut seen = None;
    c.skip_ws();
    c.object(|c, key| match key {
        "resourceSpans" => {
            once(&mut seen, ())?;
            c.array(|c| resource_spans(c, &mut out))
        }
        _ => c.skip_value(DEPTH),
    })?;
    c.skip_ws();
    c.at_end().then_some(out)
}

fn resource_spans<'a>(c: &mut Cursor<'a>, out: &mut Spans<'a>) -> Option<()> {
    let first_span = out.spans.len();
    let (mut resource, mut scope_spans) = (None, None);
    c.object(|c, key| match key {
        "resource" => {
            let start = out.attributes.len();
            let mut attributes = None;
            c.object(|c, key| match key {
                "attributes" => {
                    once(&mut attributes, ())?;
                    c.array(|c| key_value(c, out))
                }
                _ => c.skip_value(DEPTH),
            })?;
            once(&mut resource, start..out.attributes.len())
        }
        "scopeSpans" => {
            once(&mut scope_spans, ())?;
            c.array(|c| {
                let mut spans = None;
                c.object(|c, key| match key {
                    "spans" => {
                        once(&mut spans, ())?;
                        c.array(|c| span(c, out))
                    }
                    _ => c.skip_value(DEPTH),
                })
            })
        }
        _ => c.skip_value(DEPTH),
    })?;
    out.end_resource(first_span, resource.unwrap_or_default());
    Some(())
}

fn span<'a>(c: &mut Cursor<'a>, out: &mut Spans<'a>) -> Option<()> {
    let first_attribute = out.attributes.len();
    let (mut trace_id, mut span_id, mut end, mut attributes) = (None, None, None, None);
    c.object(|c, key| match key {
        "traceId" => once(&mut trace_id, c.string()?),
        "spanId" => once(&mut span_id, c.string()?),
        "endTimeUnixNano" => once(&mut end, end_time(c)?),
        "attributes" => {
            once(&mut attributes, ())?;
            c.array(|c| key_value(c, out))
        }
        _ => c.skip_value(DEPTH),
    })?;
    let id = |hex: Option<&'a str>| Id::Hex(Cow::Borrowed(hex.unwrap_or_default()));
    out.push_span(id(trace_id), id(span_id), end.unwrap_or(0), first_attribute);
    Some(())
}

/// `endTimeUnixNano` as a string or an integer that is a u64; serde reads anything else (as 0,
/// or as a rejection of the message).
fn end_time(c: &mut Cursor<'_>) -> Option<u64> {
    if c.peek()? == b'"' {
        let s = c.string()?;
        // What the serde path does with the string, so that they agree on "+1" too.
        return nanos(s).or_else(|| s.parse().ok());
    }
    // Digits beyond a u64 are a double to serde_json, which the serde path reads as 0.
    nanos(c.number()?)
}

/// 1 to 19 ASCII digits as a u64.
fn nanos(s: &str) -> Option<u64> {
    super::digits(s, 19)
}

fn key_value<'a>(c: &mut Cursor<'a>, out: &mut Spans<'a>) -> Option<()> {
    let (mut key, mut value) = (None, None);
    c.object(|c, name| match name {
        "key" => once(&mut key, c.string()?),
        "value" => once(&mut value, any_value(c)?),
        _ => c.skip_value(DEPTH),
    })?;
    out.attributes.push((Cow::Borrowed(key?), value.unwrap_or(Attr::Other)));
    Some(())
}

/// An `AnyValue`: a string, else an int, else a double, as the serde path prefers them.
fn any_value<'a>(c: &mut Cursor<'a>) -> Option<Attr<'a>> {
    let (mut string, mut int, mut double) = (None, None, None);
    c.object(|c, key| match key {
        "stringValue" => once(&mut string, c.string()?),
        "intValue" => {
            let int_value = if c.peek()? == b'"' {
                c.string()?
            } else {
                integer(c.number()?)?
            };
            once(&mut int, int_value)
        }
        "doubleValue" => once(&mut double, double_text(c.number()?)?),
        _ => c.skip_value(DEPTH),
    })?;
    Some(match (string, int, double) {
        (Some(s), _, _) => Attr::Text(Cow::Borrowed(s)),
        (None, Some(i), _) => Attr::Number(Cow::Borrowed(i)),
        (None, None, Some(d)) => Attr::Number(d),
        (None, None, None) => Attr::Other,
    })
}

/// A number token that serde_json reads as a u64 or an i64, whose text is then the same as
/// the number's: no fraction or exponent, in range, and not `-0` (which it reads as a double).
fn integer(n: &str) -> Option<&str> {
    let fits = match n.strip_prefix('-') {
        Some("0") => false,
        Some(digits) => digits.bytes().all(|b| b.is_ascii_digit()) && n.parse::<i64>().is_ok(),
        None => n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u64>().is_ok(),
    };
    fits.then_some(n)
}

/// A double as the serde path prints it: an integer as written, anything else through
/// serde_json's own reading of the token (its float parsing decides the digits).
fn double_text(n: &str) -> Option<Cow<'_, str>> {
    if let Some(n) = integer(n) {
        return Some(Cow::Borrowed(n));
    }
    match serde_json::from_str(n).ok()? {
        serde_json::Value::Number(n) => Some(Cow::Owned(n.to_string())),
        _ => None,
    }
}

/// The spans of a request as serde reads it: what the reader leaves, and what it is compared
/// with in tests.
fn from_serde<'a>(bytes: &[u8]) -> Result<Spans<'a>, Rejection> {
    let request: de::Request = serde_json::from_slice(bytes).map_err(|e| undecodable("JSON", e))?;
    let mut out = Spans::default();
    let attr = |kv: de::KeyValue| (Cow::Owned(kv.key), kv.value.attr());
    for rs in request.resource_spans {
        let first_span = out.spans.len();
        let start = out.attributes.len();
        out.attributes.extend(
            rs.resource
                .map(|r| r.attributes)
                .unwrap_or_default()
                .into_iter()
                .map(attr),
        );
        let resource = start..out.attributes.len();
        for span in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
            let end = span.end_time_unix_nano.number("endTimeUnixNano")?;
            let first_attribute = out.attributes.len();
            out.attributes.extend(span.attributes.into_iter().map(attr));
            let id = |hex: String| Id::Hex(Cow::Owned(hex));
            out.push_span(id(span.trace_id), id(span.span_id), end, first_attribute);
        }
        out.end_resource(first_span, resource);
    }
    Ok(out)
}

/// The request as serde reads it, into owned values.
mod de {
    use std::borrow::Cow;

    use serde::Deserialize;
    use serde_json::Value;

    use super::super::{undecodable, Attr, Rejection};

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
        pub fn attr<'a>(self) -> Attr<'a> {
            if let Some(s) = self.string_value {
                return Attr::Text(Cow::Owned(s));
            }
            if let Some(Int(Some(v))) = self.int_value {
                return Attr::Number(Cow::Owned(v));
            }
            match self.double_value {
                // serde_json prints a double in its shortest exact form.
                Some(Value::Number(n)) => Attr::Number(Cow::Owned(n.to_string())),
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

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::super::tests::agree;
    use super::*;
    use crate::config::SourceFormat;
    use crate::ingest::source::test_values::now;
    use crate::loadgen::formats::{self, TokenEvent};

    /// Whether the reader answered; panics where it disagrees with serde.
    fn answered(bytes: &[u8]) -> bool {
        let fast = std::str::from_utf8(bytes).ok().and_then(read);
        agree(SourceFormat::OtlpJson, fast, from_serde(bytes))
    }

    fn loadgen_message() -> String {
        let e = TokenEvent {
            id: "5b8efff798038103d269b633813fc60ceee19b7ec3c1b174",
            ts: now() - Duration::seconds(30),
            model: "model-7",
            hardware: "hw-3",
            input: 1200,
            output: 17,
            tenant: "tenant-1",
        };
        String::from_utf8(formats::render(SourceFormat::OtlpJson, &e)).unwrap()
    }

    /// A request of one resource and one GenAI span whose attribute list ends with `extra`
    /// (each `{}` in `span` stands for the span's attributes).
    fn doc(span: &str, extra: &str) -> String {
        let attributes = format!(
            r#"[{{"key":"gen_ai.request.model","value":{{"stringValue":"m"}}}},{{"key":"gen_ai.usage.input_tokens","value":{{"intValue":"10"}}}}{extra}]"#
        );
        let span = span.replace("{}", &attributes);
        format!(
            r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"host.type","value":{{"stringValue":"h100"}}}}]}},"scopeSpans":[{{"spans":[{span}]}}]}}]}}"#
        )
    }

    const SPAN: &str = r#"{"traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19B7EC3C1B174","endTimeUnixNano":"1795921170000000000","attributes":{}}"#;

    fn with_attribute(value: &str) -> String {
        doc(
            SPAN,
            &format!(r#",{{"key":"gen_ai.usage.output_tokens","value":{value}}}"#),
        )
    }

    #[test]
    fn loadgen_messages_are_read_as_serde_reads_them() {
        assert!(answered(loadgen_message().as_bytes()));
        assert!(answered(doc(SPAN, "").as_bytes()));
        let spaced = doc(SPAN, "").replace(',', " ,\n\t").replace(':', "\r: ");
        assert!(answered(format!(" {spaced} ").as_bytes()));
    }

    #[test]
    fn values_in_their_usual_forms_are_read_by_the_reader() {
        for value in [
            r#"{"intValue":"300"}"#,
            r#"{"intValue":300}"#,
            r#"{"intValue":-5}"#,
            r#"{"intValue":"-5"}"#,
            r#"{"intValue":"1.5"}"#,
            r#"{"intValue":"abc"}"#,
            r#"{"intValue":18446744073709551615}"#,
            r#"{"intValue":-9223372036854775808}"#,
            r#"{"doubleValue":1500}"#,
            r#"{"doubleValue":1500.0}"#,
            r#"{"doubleValue":1.5}"#,
            r#"{"doubleValue":1e3}"#,
            r#"{"doubleValue":-2.5}"#,
            r#"{"doubleValue":0.1}"#,
            r#"{"doubleValue":123456789012345678901234567890}"#,
            r#"{"stringValue":"12"}"#,
            r#"{"stringValue":"é"}"#,
            r#"{"boolValue":true}"#,
            r#"{"arrayValue":{"values":[{"intValue":"1"},{"kvlistValue":{"values":[]}}]}}"#,
            r#"{}"#,
            r#"{"stringValue":"7","intValue":"8","doubleValue":9}"#,
            r#"{"intValue":"8","doubleValue":9}"#,
            r#"{"intValue":"8","unknown":[1,{"a":null}]}"#,
        ] {
            assert!(answered(with_attribute(value).as_bytes()), "{value}");
        }
    }

    #[test]
    fn ids_and_end_times_in_any_form_serde_reads_are_read_alike() {
        for (span, answers) in [
            (r#"{"attributes":{}}"#, true),
            (
                r#"{"traceId":"","spanId":"","endTimeUnixNano":"0","attributes":{}}"#,
                true,
            ),
            (
                r#"{"traceId":"Ab","spanId":"cD","endTimeUnixNano":1795921170000000000,"attributes":{}}"#,
                true,
            ),
            (
                r#"{"traceId":"ab","spanId":"cd","endTimeUnixNano":"+1795921170000000000","attributes":{}}"#,
                true,
            ),
            (
                r#"{"traceId":"ab","spanId":"cd","endTimeUnixNano":"18446744073709551615","attributes":{}}"#,
                true,
            ),
            (
                r#"{"name":"x","kind":3,"status":{},"traceId":"ab","spanId":"cd","attributes":{}}"#,
                true,
            ),
            (
                r#"{"traceId":"ab","spanId":"cd","endTimeUnixNano":"abc","attributes":{}}"#,
                false,
            ),
            (
                r#"{"traceId":"ab","spanId":"cd","endTimeUnixNano":-5,"attributes":{}}"#,
                false,
            ),
            (
                r#"{"traceId":"ab","spanId":"cd","endTimeUnixNano":1.5e18,"attributes":{}}"#,
                false,
            ),
            (
                r#"{"traceId":"ab","spanId":"cd","endTimeUnixNano":99999999999999999999,"attributes":{}}"#,
                false,
            ),
            (r#"{"traceId":"a\u0062","spanId":"cd","attributes":{}}"#, false),
            (r#"{"traceId":5,"attributes":{}}"#, false),
        ] {
            assert_eq!(answered(doc(span, "").as_bytes()), answers, "{span}");
        }
    }

    #[test]
    fn what_the_reader_is_not_sure_of_is_left_to_serde() {
        for value in [
            r#"{"stringValue":"a\"b"}"#,
            r#"{"stringValue":null}"#,
            r#"{"stringValue":5}"#,
            r#"{"intValue":1.5}"#,
            r#"{"intValue":-0}"#,
            r#"{"intValue":1e3}"#,
            r#"{"intValue":18446744073709551616}"#,
            r#"{"intValue":true}"#,
            r#"{"intValue":null}"#,
            r#"{"doubleValue":"NaN"}"#,
            r#"{"doubleValue":null}"#,
            r#"{"doubleValue":1e400}"#,
            r#"{"stringValue":"a","stringValue":"b"}"#,
            r#"{"intValue":"1","intValue":"2"}"#,
            r#"{"string\u0056alue":"a"}"#,
            r#"null"#,
        ] {
            assert!(!answered(with_attribute(value).as_bytes()), "{value}");
        }
        let doc = doc(SPAN, "");
        for changed in [
            doc.replace(r#""key":"host.type""#, r#""key":"host\u002etype""#),
            doc.replace(r#""key":"host.type","#, ""),
            doc.replace(r#""key":"host.type""#, r#""key":"host.type","key":"k""#),
            doc.replace(r#""spanId""#, r#""traceId":"ab","spanId""#),
            doc.replace(r#""scopeSpans""#, r#""resource":{},"scopeSpans""#),
            doc.replace(r#""resource":{"#, r#""resource":null,"x":{"#),
            doc.replace(r#"{"resourceSpans":"#, r#"{"resourceSpans":[],"resourceSpans":"#),
            doc.replace(r#""scopeSpans":["#, r#""scopeSpans":[null,"#),
            doc.replace("h100", "h\u{1}00"),
            format!("[{doc}]"),
            format!("{doc}x"),
        ] {
            assert!(!answered(changed.as_bytes()), "{changed}");
        }
        let mut not_utf8 = doc.into_bytes();
        let at = not_utf8.windows(4).position(|w| w == b"host").unwrap();
        not_utf8[at] = 0xff;
        assert!(!answered(&not_utf8));
        assert!(from_serde(&not_utf8).is_err());
    }

    #[test]
    fn every_cut_of_a_message_decodes_as_serde_decodes_it() {
        let message = loadgen_message();
        for len in 0..message.len() {
            answered(&message.as_bytes()[..len]);
        }
    }

    /// A random attribute value in one of the forms producers write, or a rarer one.
    fn random_value(rng: &mut SmallRng) -> String {
        let int: i64 = [0, 7, 1200, -3, i64::MAX, i64::MIN, 1_000_000_000_000_000_000][rng.gen_range(0..7)];
        match rng.gen_range(0..9) {
            0 => format!(r#"{{"intValue":"{int}"}}"#),
            1 => format!(r#"{{"intValue":{int}}}"#),
            2 => format!(
                r#"{{"doubleValue":{}}}"#,
                ["1500", "1.5", "1e2", "-0.0", "0.30000000000000004"][rng.gen_range(0..5)]
            ),
            3 => format!(
                r#"{{"stringValue":"{}"}}"#,
                ["m", "12", "", "\\u00e9", " 7 "][rng.gen_range(0..5)]
            ),
            4 => r#"{"boolValue":false}"#.into(),
            5 => r#"{}"#.into(),
            6 => format!(r#"{{"doubleValue":{int},"intValue":"{int}"}}"#),
            7 => format!(r#"{{"intValue":{int}.5}}"#),
            _ => format!(r#"{{"stringValue":"{int}"}}"#),
        }
    }

    fn random_attributes(rng: &mut SmallRng) -> String {
        const KEYS: [&str; 6] = [
            "gen_ai.usage.input_tokens",
            "gen_ai.usage.output_tokens",
            "gen_ai.request.model",
            "host.type",
            "service.name",
            "other",
        ];
        let kvs: Vec<String> = (0..rng.gen_range(0..6))
            .map(|_| {
                format!(
                    r#"{{"key":"{}","value":{}}}"#,
                    KEYS[rng.gen_range(0..6)],
                    random_value(rng)
                )
            })
            .collect();
        format!("[{}]", kvs.join(","))
    }

    /// An object of `members`, in random order, some left out.
    fn object(rng: &mut SmallRng, mut members: Vec<String>) -> String {
        members.retain(|_| rng.gen_bool(0.9));
        for i in (1..members.len()).rev() {
            members.swap(i, rng.gen_range(0..=i));
        }
        format!("{{{}}}", members.join(","))
    }

    fn random_request(rng: &mut SmallRng) -> String {
        let mut resource_spans = Vec::new();
        for _ in 0..rng.gen_range(0..3) {
            let mut spans = Vec::new();
            for _ in 0..rng.gen_range(0..3) {
                let end = [
                    "\"1795921170000000000\"",
                    "1795921170000000000",
                    "\"0\"",
                    "\"18446744073709551615\"",
                ][rng.gen_range(0..4)];
                let members = vec![
                    format!(r#""traceId":"{}""#, ["AB01", "ab01", ""][rng.gen_range(0..3)]),
                    format!(r#""spanId":"{}""#, ["CD", "cd", ""][rng.gen_range(0..3)]),
                    format!(r#""endTimeUnixNano":{end}"#),
                    format!(r#""attributes":{}"#, random_attributes(rng)),
                    r#""name":"chat""#.into(),
                ];
                spans.push(object(rng, members));
            }
            let attributes = vec![format!(r#""attributes":{}"#, random_attributes(rng))];
            let resource = object(rng, attributes);
            let scope_spans = format!(r#""scopeSpans":[{{"spans":[{}]}}]"#, spans.join(","));
            resource_spans.push(object(rng, vec![format!(r#""resource":{resource}"#), scope_spans]));
        }
        format!(r#"{{"resourceSpans":[{}]}}"#, resource_spans.join(","))
    }

    #[test]
    fn generated_messages_decode_as_serde_decodes_them() {
        let mut rng = SmallRng::seed_from_u64(18);
        let mut read = 0;
        for _ in 0..3000 {
            let message = random_request(&mut rng);
            read += usize::from(answered(message.as_bytes()));
            let cut = rng.gen_range(0..=message.len());
            answered(&message.as_bytes()[..cut]);
        }
        // Most generated messages are in forms the reader knows.
        assert!(read > 1500, "{read}");
    }
}
