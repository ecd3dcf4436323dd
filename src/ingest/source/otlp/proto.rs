//! `otlp_proto`: the spans of an `ExportTraceServiceRequest` in protobuf. A walker over the wire
//! format reads exactly the fields [`super::wire`] declares, borrowing keys, strings and ids
//! from the message (with prost's owned structs, decoding a loadgen message into its events
//! took 22,600 instructions; with the walker 7,100).
//!
//! The walker answers only when it is sure: anything else (a known field in another wire type,
//! a singular field or a oneof given twice, which prost would merge or let the last one win,
//! groups, a bad varint, a length past the end, a string that is not UTF-8) returns `None`, and
//! the message is decoded by prost exactly as before, which then also words the rejection. So
//! the walker cannot change a result, only its cost.

use std::borrow::Cow;

use prost::Message as _;

use super::{undecodable, wire, Attr, Id, Rejection, Spans};
use crate::ingest::event::once;

/// The spans of a protobuf request.
pub(super) fn spans(bytes: &[u8]) -> Result<Spans<'_>, Rejection> {
    match walk(bytes) {
        Some(spans) => Ok(spans),
        None => from_prost(bytes),
    }
}

/// Protobuf's wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// The request's spans, or `None` for prost to decide.
fn walk(bytes: &[u8]) -> Option<Spans<'_>> {
    let mut out = Spans::default();
    fields(bytes, |r, tag, wire| match tag {
        1 => resource_spans(&mut out, r.len(wire)?),
        _ => r.skip(wire),
    })?;
    Some(out)
}

fn resource_spans<'a>(out: &mut Spans<'a>, bytes: &'a [u8]) -> Option<()> {
    let first_span = out.spans.len();
    let mut resource = None;
    fields(bytes, |r, tag, wire| match tag {
        1 => {
            let bytes = r.len(wire)?;
            let start = out.attributes.len();
            fields(bytes, |r, tag, wire| match tag {
                1 => key_value(out, r.len(wire)?),
                _ => r.skip(wire),
            })?;
            once(&mut resource, start..out.attributes.len())
        }
        2 => fields(r.len(wire)?, |r, tag, wire| match tag {
            2 => span(out, r.len(wire)?),
            _ => r.skip(wire),
        }),
        _ => r.skip(wire),
    })?;
    out.end_resource(first_span, resource.unwrap_or_default());
    Some(())
}

fn span<'a>(out: &mut Spans<'a>, bytes: &'a [u8]) -> Option<()> {
    let first_attribute = out.attributes.len();
    let (mut trace_id, mut span_id, mut end) = (None, None, None);
    fields(bytes, |r, tag, wire| match tag {
        1 => once(&mut trace_id, r.len(wire)?),
        2 => once(&mut span_id, r.len(wire)?),
        8 if wire == FIXED64 => once(&mut end, r.fixed64()?),
        8 => None,
        9 => key_value(out, r.len(wire)?),
        _ => r.skip(wire),
    })?;
    let id = |bytes: Option<&'a [u8]>| Id::Bytes(Cow::Borrowed(bytes.unwrap_or_default()));
    out.push_span(id(trace_id), id(span_id), end.unwrap_or(0), first_attribute);
    Some(())
}

fn key_value<'a>(out: &mut Spans<'a>, bytes: &'a [u8]) -> Option<()> {
    let (mut key, mut value) = (None, None);
    fields(bytes, |r, tag, wire| match tag {
        1 => once(&mut key, std::str::from_utf8(r.len(wire)?).ok()?),
        2 => once(&mut value, any_value(r.len(wire)?)?),
        _ => r.skip(wire),
    })?;
    out.attributes
        .push((Cow::Borrowed(key.unwrap_or_default()), value.unwrap_or(Attr::Other)));
    Some(())
}

/// The oneof of an `AnyValue` (tags 1 to 4); bytes, arrays and maps are unknown fields here.
fn any_value(bytes: &[u8]) -> Option<Attr<'_>> {
    let mut value = None;
    fields(bytes, |r, tag, wire| {
        let v = match (tag, wire) {
            (1, LEN) => Attr::Text(Cow::Borrowed(std::str::from_utf8(r.len(wire)?).ok()?)),
            (2, VARINT) => r.varint().map(|_| Attr::Other)?,
            // int64 is the varint's bits, as prost reads it.
            (3, VARINT) => Attr::Int(r.varint()? as i64),
            (4, FIXED64) => Attr::double(f64::from_bits(r.fixed64()?)),
            (1..=4, _) => return None,
            _ => return r.skip(wire),
        };
        once(&mut value, v)
    })?;
    Some(value.unwrap_or(Attr::Other))
}

/// Calls `field` with each field's tag and wire type, the reader at its value, which `field`
/// must consume.
fn fields<'a>(bytes: &'a [u8], mut field: impl FnMut(&mut Reader<'a>, u32, u8) -> Option<()>) -> Option<()> {
    let mut r = Reader { rest: bytes };
    while !r.rest.is_empty() {
        let (tag, wire) = r.key()?;
        field(&mut r, tag, wire)?;
    }
    Some(())
}

/// What is left of a message.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A varint as prost reads it: at most ten bytes, the tenth 0 or 1. Keys and lengths are
    /// almost always one byte, read inline.
    #[inline]
    fn varint(&mut self) -> Option<u64> {
        match self.rest.split_first() {
            Some((&b, rest)) if b < 0x80 => {
                self.rest = rest;
                Some(u64::from(b))
            }
            _ => self.long_varint(),
        }
    }

    fn long_varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.rest.split_first()?;
            self.rest = rest;
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(value);
            }
        }
        None
    }

    /// A field's tag and wire type; prost refuses keys above 32 bits, tag 0 and wire types 6
    /// and 7.
    fn key(&mut self) -> Option<(u32, u8)> {
        let key = u32::try_from(self.varint()?).ok()?;
        let (tag, wire) = (key >> 3, (key & 7) as u8);
        (tag > 0 && wire <= FIXED32).then_some((tag, wire))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(taken)
    }

    /// A length-delimited value (a message, a string, bytes), if that is the wire type.
    fn len(&mut self, wire: u8) -> Option<&'a [u8]> {
        if wire != LEN {
            return None;
        }
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    fn fixed64(&mut self) -> Option<u64> {
        let bytes = self.take(8)?;
        Some(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    /// Skips an unknown field; groups (deprecated, never in OTLP) are left to prost.
    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.len(wire).map(drop),
            FIXED32 => self.take(4).map(drop),
            _ => None,
        }
    }
}

/// The spans of a request as prost decodes it: what the walker leaves, and what it is
/// compared with in tests.
fn from_prost<'a>(bytes: &[u8]) -> Result<Spans<'a>, Rejection> {
    let request = wire::ExportTraceServiceRequest::decode(bytes).map_err(|e| undecodable("protobuf", e))?;
    let mut out = Spans::default();
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
            let first_attribute = out.attributes.len();
            out.attributes.extend(span.attributes.into_iter().map(attr));
            let id = |bytes: Vec<u8>| Id::Bytes(Cow::Owned(bytes));
            out.push_span(
                id(span.trace_id),
                id(span.span_id),
                span.end_time_unix_nano,
                first_attribute,
            );
        }
        out.end_resource(first_span, resource);
    }
    Ok(out)
}

fn attr<'a>(kv: wire::KeyValue) -> (Cow<'a, str>, Attr<'a>) {
    use wire::any_value::Value;
    let value = match kv.value.and_then(|v| v.value) {
        Some(Value::StringValue(s)) => Attr::Text(Cow::Owned(s)),
        Some(Value::IntValue(i)) => Attr::Int(i),
        Some(Value::DoubleValue(d)) => Attr::double(d),
        Some(Value::BoolValue(_)) | None => Attr::Other,
    };
    (Cow::Owned(kv.key), value)
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use prost::Message as _;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::super::tests::agree;
    use super::*;
    use crate::config::SourceFormat;
    use crate::ingest::source::test_values::now;
    use crate::loadgen::formats::{self, TokenEvent};

    /// Whether the walker answered; panics where it disagrees with prost.
    fn answered(bytes: &[u8]) -> bool {
        agree(SourceFormat::OtlpProto, walk(bytes), from_prost(bytes))
    }

    fn loadgen_message(input: u64) -> Vec<u8> {
        let e = TokenEvent {
            id: "5b8efff798038103d269b633813fc60ceee19b7ec3c1b174",
            ts: now() - Duration::seconds(30),
            model: "model-7",
            hardware: "hw-3",
            input,
            output: 17,
            tenant: "tenant-1",
        };
        formats::render(SourceFormat::OtlpProto, &e)
    }

    fn varint(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(v, &mut out);
        out
    }

    /// One field: its key, then `body` as is (a varint or fixed value) or, for `LEN`, its
    /// length and `body`.
    fn field(tag: u32, wire: u8, body: &[u8]) -> Vec<u8> {
        let mut out = varint(u64::from((tag << 3) | u32::from(wire)));
        if wire == LEN {
            out.extend(varint(body.len() as u64));
        }
        out.extend_from_slice(body);
        out
    }

    fn kv(key: &[u8], value: &[u8]) -> Vec<u8> {
        field(9, LEN, &[field(1, LEN, key), field(2, LEN, value)].concat())
    }

    /// A request of one resource (`host.type`) and one span of `span_fields`.
    fn request(span_fields: &[Vec<u8>]) -> Vec<u8> {
        let host = [field(1, LEN, b"host.type"), field(2, LEN, &field(1, LEN, b"h100"))].concat();
        let resource = field(1, LEN, &field(1, LEN, &host));
        let scope = field(2, LEN, &field(2, LEN, &span_fields.concat()));
        field(1, LEN, &[resource, scope].concat())
    }

    fn genai_span() -> Vec<Vec<u8>> {
        vec![
            field(1, LEN, &[0xab; 16]),
            field(2, LEN, &[0x01; 8]),
            field(8, FIXED64, &1_795_921_170_000_000_000u64.to_le_bytes()),
            kv(b"gen_ai.request.model", &field(1, LEN, b"llama")),
            kv(b"gen_ai.usage.input_tokens", &field(3, VARINT, &varint(10))),
        ]
    }

    fn with(extra: Vec<u8>) -> Vec<u8> {
        let mut fields = genai_span();
        fields.push(extra);
        request(&fields)
    }

    #[test]
    fn loadgen_messages_are_walked_as_prost_reads_them() {
        for input in [0, 1, 300, 1 << 40] {
            assert!(answered(&loadgen_message(input)));
        }
        assert!(answered(&request(&genai_span())));
    }

    #[test]
    fn a_resource_after_its_spans_is_still_theirs() {
        let host = [field(1, LEN, b"host.type"), field(2, LEN, &field(1, LEN, b"h100"))].concat();
        let resource = field(1, LEN, &field(1, LEN, &host));
        let scope = field(2, LEN, &field(2, LEN, &genai_span().concat()));
        let first = field(1, LEN, &[scope.clone(), resource].concat());
        // A second resource without attributes: its span must not see the first one's.
        let second = field(1, LEN, &[scope, field(1, LEN, &[])].concat());
        let bytes = [first, second].concat();
        assert!(answered(&bytes));
        let spans = walk(&bytes).unwrap();
        let resources: Vec<usize> = spans.spans.iter().map(|s| s.resource.len()).collect();
        assert_eq!(resources, [1, 0]);
    }

    #[test]
    fn unknown_fields_are_skipped_unread_as_prost_skips_them() {
        for extra in [
            field(5, LEN, b"\xff not UTF-8, but an unknown field"),
            field(6, VARINT, &varint(3)),
            field(7, FIXED64, &[7; 8]),
            field(15, LEN, &field(1, LEN, b"status")),
            field(99, FIXED32, &[1; 4]),
            // An over-long varint key (tag 9, length-delimited) is still a key to prost.
            [vec![0xca, 0x80, 0x00], varint(0)].concat(),
            kv(b"bytes", &field(7, LEN, b"\x00\xff")),
            kv(b"array", &field(5, LEN, &field(1, LEN, &field(1, LEN, b"x")))),
            kv(b"bool", &field(2, VARINT, &[1])),
            kv(b"nan", &field(4, FIXED64, &f64::NAN.to_le_bytes())),
            kv(b"half", &field(4, FIXED64, &1500.5f64.to_le_bytes())),
            kv(b"negative", &field(3, VARINT, &varint(-5i64 as u64))),
            kv(b"", b""),
        ] {
            assert!(answered(&with(extra.clone())), "{extra:?}");
        }
    }

    #[test]
    fn what_prost_would_merge_or_replace_is_left_to_prost() {
        let string = field(1, LEN, b"a");
        for extra in [
            field(1, LEN, &[0xcd; 16]),
            field(2, LEN, &[0x02; 8]),
            field(8, FIXED64, &[0; 8]),
            field(
                9,
                LEN,
                &[field(1, LEN, b"k"), field(1, LEN, b"again"), field(2, LEN, &string)].concat(),
            ),
            field(
                9,
                LEN,
                &[field(1, LEN, b"k"), field(2, LEN, &string), field(2, LEN, &string)].concat(),
            ),
            kv(b"k", &[string.clone(), field(3, VARINT, &[1])].concat()),
            kv(b"k", &[field(3, VARINT, &[1]), field(3, VARINT, &[2])].concat()),
            // A group: deprecated, skipped by prost, not by the walker.
            [field(20, 3, &[]), field(21, VARINT, &[1]), field(20, 4, &[])].concat(),
        ] {
            let bytes = with(extra.clone());
            assert!(!answered(&bytes), "{extra:?}");
            assert!(from_prost(&bytes).is_ok(), "{extra:?}");
        }
        // Two resource_spans are two entries; a resource given twice in one is merged.
        assert!(answered(&[request(&genai_span()), request(&genai_span())].concat()));
        let resource = field(1, LEN, &field(1, LEN, &field(1, LEN, b"k")));
        let merged = field(1, LEN, &[resource.clone(), resource].concat());
        assert!(!answered(&merged) && from_prost(&merged).is_ok());
    }

    #[test]
    fn what_prost_refuses_the_walker_does_not_answer() {
        for extra in [
            field(1, VARINT, &[1]),
            field(8, VARINT, &[1]),
            field(9, FIXED32, &[0; 4]),
            kv(b"\xff\xfe", &field(1, LEN, b"v")),
            kv(b"k", &field(1, LEN, b"\xc3")),
            kv(b"k", &field(3, LEN, b"1")),
            kv(b"k", &field(4, FIXED32, &[0; 4])),
            // A varint of eleven bytes, and one whose tenth byte overflows 64 bits.
            [varint(6 << 3), vec![0xff; 10], vec![0x01]].concat(),
            [varint(6 << 3), vec![0xff; 9], vec![0x02]].concat(),
            field(0, VARINT, &[1]),
            vec![(7 << 3) | 6, 0],
            field(20, 4, &[]),
            [varint((5 << 3) | 2), varint(1000)].concat(),
        ] {
            let bytes = with(extra.clone());
            assert!(!answered(&bytes), "{extra:?}");
            assert!(from_prost(&bytes).is_err(), "{extra:?}");
        }
    }

    #[test]
    fn every_cut_of_a_message_decodes_as_prost_decodes_it() {
        for message in [loadgen_message(300), with(kv(b"d", &field(4, FIXED64, &[0; 8])))] {
            for len in 0..message.len() {
                answered(&message[..len]);
            }
            for at in 0..message.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut m = message.clone();
                    m[at] ^= flip;
                    answered(&m);
                }
            }
        }
    }

    fn random_value(rng: &mut SmallRng) -> Option<wire::AnyValue> {
        use wire::any_value::Value;
        let value = match rng.gen_range(0..10) {
            0 => return None,
            1 => None,
            2 => Some(Value::BoolValue(rng.gen())),
            3 => Some(Value::IntValue(rng.gen())),
            4 | 5 => Some(Value::IntValue(rng.gen_range(-3..100_000))),
            6 => Some(Value::DoubleValue(
                [0.0, -0.0, 1500.0, 0.1, 1e21, f64::NAN, f64::INFINITY, 2.5][rng.gen_range(0..8)],
            )),
            7 => Some(Value::DoubleValue(rng.gen::<f64>() * 1e6)),
            _ => Some(Value::StringValue(
                ["m", "12", "", "é", " 7 "][rng.gen_range(0..5)].into(),
            )),
        };
        Some(wire::AnyValue { value })
    }

    fn random_attributes(rng: &mut SmallRng) -> Vec<wire::KeyValue> {
        const KEYS: [&str; 7] = [
            "gen_ai.usage.input_tokens",
            "gen_ai.usage.output_tokens",
            "gen_ai.request.model",
            "gen_ai.response.model",
            "host.type",
            "service.name",
            "other",
        ];
        (0..rng.gen_range(0..6))
            .map(|_| wire::KeyValue {
                key: KEYS[rng.gen_range(0..KEYS.len())].into(),
                value: random_value(rng),
            })
            .collect()
    }

    fn random_request(rng: &mut SmallRng) -> wire::ExportTraceServiceRequest {
        let id = |rng: &mut SmallRng, len: usize| (0..[0, len, 3][rng.gen_range(0..3)]).map(|_| rng.gen()).collect();
        let end = |rng: &mut SmallRng| match rng.gen_range(0..4) {
            0 => 0,
            1 => u64::MAX,
            _ => 1_795_921_000_000_000_000 + rng.gen_range(0..400_000_000_000),
        };
        let spans = |rng: &mut SmallRng| {
            (0..rng.gen_range(0..3))
                .map(|_| wire::Span {
                    trace_id: id(rng, 16),
                    span_id: id(rng, 8),
                    end_time_unix_nano: end(rng),
                    attributes: random_attributes(rng),
                })
                .collect()
        };
        wire::ExportTraceServiceRequest {
            resource_spans: (0..rng.gen_range(0..3))
                .map(|_| wire::ResourceSpans {
                    resource: rng.gen_bool(0.8).then(|| wire::Resource {
                        attributes: random_attributes(rng),
                    }),
                    scope_spans: (0..rng.gen_range(0..3))
                        .map(|_| wire::ScopeSpans { spans: spans(rng) })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn generated_messages_decode_as_prost_decodes_them() {
        let mut rng = SmallRng::seed_from_u64(18);
        for _ in 0..3000 {
            let bytes = random_request(&mut rng).encode_to_vec();
            assert!(answered(&bytes));
            // Two messages back to back are one merged message to prost.
            let other = random_request(&mut rng).encode_to_vec();
            answered(&[bytes.clone(), other].concat());
            let mut cut = bytes.clone();
            cut.truncate(rng.gen_range(0..=bytes.len()));
            answered(&cut);
            if !bytes.is_empty() {
                let mut flipped = bytes;
                let at = rng.gen_range(0..flipped.len());
                flipped[at] ^= 1u8 << rng.gen_range(0..8u32);
                answered(&flipped);
            }
        }
    }
}
