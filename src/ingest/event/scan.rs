//! The fast path of [`super::decode_ref`]: reads the fields of an event in the shape producers
//! send (a flat JSON object of the known fields, strings without escapes, numbers, `labels` an
//! object of plain strings) in one pass over the bytes, without serde's generic machinery
//! (which was about a fifth of the consumer's CPU per event).
//!
//! It answers only when it is sure: anything else (an escape, an unknown or repeated field, a
//! value of another type, a missing field, bad syntax anywhere) returns `None`, and the caller
//! reads the payload with serde_json exactly as before, which then also words the rejection. So
//! for every payload this accepts, serde_json would have produced the same fields, and for every
//! other payload the outcome is serde_json's: the fast path cannot change a result, only its cost.

use std::borrow::Cow;

use super::{sort_labels, Fields, RawLabels};

/// The fields of a payload in the common shape, or `None` for the serde path to decide.
pub(super) fn scan(text: &str) -> Option<Fields<'_>> {
    let mut c = Cursor { text, at: 0 };
    let mut f = Partial::default();
    c.skip_ws();
    c.object(|c, key| match key {
        "event_id" => once(&mut f.event_id, c.string()?),
        "timestamp" => once(&mut f.timestamp, c.string()?),
        "model" => once(&mut f.model, c.string()?),
        "hardware" => once(&mut f.hardware, c.string()?),
        "compute" => once(&mut f.compute, c.number()?),
        "storage" => once(&mut f.storage, c.number()?),
        "labels" => c.labels(&mut f.labels),
        "input_tokens" => once(&mut f.input_tokens, c.number_or_null()?),
        "output_tokens" => once(&mut f.output_tokens, c.number_or_null()?),
        // Unknown fields are ignored by the serde path; it reads them.
        _ => None,
    })?;
    c.skip_ws();
    if c.at != text.len() {
        return None;
    }
    Some(Fields {
        event_id: Cow::Borrowed(f.event_id?),
        timestamp: Cow::Borrowed(f.timestamp?),
        model: Cow::Borrowed(f.model?),
        hardware: Cow::Borrowed(f.hardware?),
        compute: f.compute?,
        storage: f.storage?,
        labels: f.labels.flatten(),
        input_tokens: f.input_tokens.flatten(),
        output_tokens: f.output_tokens.flatten(),
    })
}

/// The members of a message that is one JSON object, each key as written and each value as its
/// JSON text, in one validating pass (the whole text, nested values included, is checked to be
/// JSON); `None` when a key has an escape, when nesting is deep, or when anything is not JSON,
/// so that the caller reads the message with serde_json as before. For the mapped formats.
/// Keys come as `Cow`s (always borrowed here) because that is the form the pointer lookups keep
/// them in, whichever reader found them: no second vector to convert into.
pub(crate) fn object_members(text: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let mut c = Cursor { text, at: 0 };
    c.skip_ws();
    let mut members = Vec::with_capacity(8);
    c.object(|c, key| {
        let start = c.at;
        c.skip_value(1)?;
        members.push((Cow::Borrowed(key), text.get(start..c.at)?));
        Some(())
    })?;
    c.skip_ws();
    (c.at == text.len()).then_some(members)
}

/// Whether `text` is exactly one JSON number token.
pub(crate) fn is_number(text: &str) -> bool {
    let mut c = Cursor { text, at: 0 };
    c.number().is_some_and(|n| n.len() == text.len())
}

/// Deeper nesting is left to serde_json (whose own limit is 128).
const MAX_DEPTH: usize = 100;

/// What was found so far; a field seen twice sends the payload to the serde path (which refuses
/// it as a duplicate field).
#[derive(Default)]
struct Partial<'a> {
    event_id: Option<&'a str>,
    timestamp: Option<&'a str>,
    model: Option<&'a str>,
    hardware: Option<&'a str>,
    compute: Option<&'a str>,
    storage: Option<&'a str>,
    labels: Option<Option<RawLabels<'a>>>,
    input_tokens: Option<Option<&'a str>>,
    output_tokens: Option<Option<&'a str>>,
}

/// Sets a field seen for the first time; a second one is left to the slower path (serde
/// refuses a duplicate field, prost merges a repeated singular one). Shared by every fast reader.
pub(crate) fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// The bytes that end a plain string: its closing quote, or what the fast path leaves to
/// serde (a backslash starts an escape; control characters are not allowed in JSON strings).
const SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// The index of the first [`SPECIAL`] byte. Strings are most of an event's bytes, so they are
/// scanned eight bytes at a time: per word, a flag for every byte that is a quote, a backslash
/// or below 0x20 (the classic "has zero byte" trick, exact for the lowest flagged byte, which
/// is the only one used), then one table look-up per byte for the tail.
fn special_at(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8) {
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let flags = zero_in(w ^ (ONES * u64::from(b'"')))
            | zero_in(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if flags != 0 {
            return Some(at + (flags.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let tail = bytes[at..].iter().position(|&b| SPECIAL[usize::from(b)])?;
    Some(at + tail)
}

/// A position in a JSON text, for the one-pass readers here and in the OTLP/JSON source: each
/// method reads one thing in JSON's grammar and answers `None` at anything else.
pub(crate) struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `text`.
    pub(crate) fn new(text: &'a str) -> Self {
        Self { text, at: 0 }
    }

    /// Whether all of the text was read.
    pub(crate) fn at_end(&self) -> bool {
        self.at == self.text.len()
    }

    #[inline]
    pub(crate) fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    #[inline]
    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    #[inline]
    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// JSON's whitespace only (not Unicode's, which serde_json refuses).
    #[inline]
    pub(crate) fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string without escapes or control characters, borrowed as it is.
    #[inline]
    pub(crate) fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let rest = self.text.as_bytes().get(start..)?;
        let len = special_at(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        self.text.get(start..start + len)
    }

    /// Any JSON value, checked and skipped.
    pub(crate) fn skip_value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.any_string(),
            b'{' => self.skip_container(depth, b'}', true),
            b'[' => self.skip_container(depth, b']', false),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(|_| ()),
        }
    }

    /// An object (`keyed`) or an array, checked and skipped.
    fn skip_container(&mut self, depth: usize, close: u8, keyed: bool) -> Option<()> {
        let open = self.peek()?;
        self.sequence(open, close, |c| {
            if keyed {
                c.any_string()?;
                c.skip_ws();
                c.eat(b':')?;
                c.skip_ws();
            }
            c.skip_value(depth + 1)
        })
    }

    /// `open`, then items separated by commas, then `close`; each item read by `item` with the
    /// cursor at it. The one loop behind objects, arrays and the containers skipped inside them.
    #[inline]
    fn sequence(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(open)?;
        self.skip_ws();
        if self.peek() == Some(close) {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            self.skip_ws();
            match self.next()? {
                b',' => self.skip_ws(),
                b if b == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// A string with JSON's escapes (`\"` `\\` `\/` `\b` `\f` `\n` `\r` `\t` `\uXXXX`), checked
    /// and skipped; control characters are refused, as JSON does.
    fn any_string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            let rest = self.text.as_bytes().get(self.at..)?;
            self.at += special_at(rest)?;
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        let hex = self.text.as_bytes().get(self.at..self.at + 4)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        self.at += 4;
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.text.as_bytes().get(self.at..end)? == word).then(|| self.at = end)
    }

    /// A number token in JSON's grammar (`-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`),
    /// as its text.
    pub(crate) fn number(&mut self) -> Option<&'a str> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.some_digits()?;
        }
        self.text.get(start..self.at)
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    pub(crate) fn null(&mut self) -> Option<()> {
        let end = self.at + 4;
        (self.text.as_bytes().get(self.at..end)? == b"null").then(|| self.at = end)
    }

    /// A number, or `null` (absent).
    fn number_or_null(&mut self) -> Option<Option<&'a str>> {
        if self.peek() == Some(b'n') {
            return self.null().map(|()| None);
        }
        self.number().map(Some)
    }

    /// `null` (no labels) or an object of plain strings, sorted as the serde path sorts it,
    /// read into `slot` where it stays (a label set is a few hundred bytes inline: each move
    /// was a `memcpy`); `None` if `slot` was already filled (a repeated field).
    fn labels(&mut self, slot: &mut Option<Option<RawLabels<'a>>>) -> Option<()> {
        if slot.is_some() {
            return None;
        }
        if self.peek() == Some(b'n') {
            self.null()?;
            *slot = Some(None);
            return Some(());
        }
        let labels = slot.insert(Some(RawLabels::new())).as_mut().expect("just set");
        self.object(|c, key| {
            labels.push((Cow::Borrowed(key), Cow::Borrowed(c.string()?)));
            Some(())
        })?;
        sort_labels(labels);
        Some(())
    }

    /// An object whose keys are plain strings (no escapes), each member's value read by
    /// `member` with the cursor at it; `None` at the first thing that is not that (or when
    /// `member` says so). The one loop behind the event, the labels and a mapped message.
    pub(crate) fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.sequence(b'{', b'}', |c| {
            let key = c.string()?;
            c.skip_ws();
            c.eat(b':')?;
            c.skip_ws();
            member(c, key)
        })
    }

    /// An array, each item read by `item` with the cursor at it; `None` at the first thing
    /// that is not that (or when `item` says so).
    pub(crate) fn array(&mut self, item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.sequence(b'[', b']', item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"event_id":"req-7f3a","timestamp":"2026-11-29T03:00:00.123Z","model":"qwen2-7b-instruct","hardware":"a100-80g","compute":1234.5,"storage":16.25,"labels":{"tenant":"search","env":"prod"}}"#;

    #[test]
    fn the_common_shape_is_read_in_one_pass() {
        let f = scan(GOOD).expect("the common shape");
        assert_eq!(f.event_id, "req-7f3a");
        assert_eq!(f.timestamp, "2026-11-29T03:00:00.123Z");
        assert_eq!((f.compute, f.storage), ("1234.5", "16.25"));
        let labels: Vec<(&str, &str)> = f
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            .collect();
        assert_eq!(labels, [("env", "prod"), ("tenant", "search")]);
        assert_eq!((f.input_tokens, f.output_tokens), (None, None));
        let spaced = " {\n \"event_id\" : \"a\", \"timestamp\":\"t\",\"model\":\"m\",\"hardware\":\"h\",\t\"compute\":-0.5e+3,\"storage\":0,\"labels\":null,\"input_tokens\":null,\"output_tokens\":7}\r\n";
        let f = scan(spaced).expect("whitespace anywhere JSON allows it");
        assert_eq!((f.compute, f.storage, f.output_tokens), ("-0.5e+3", "0", Some("7")));
        assert!(f.labels.is_none() && f.input_tokens.is_none());
    }

    #[test]
    fn the_word_scan_finds_the_first_special_byte_wherever_it_is() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    // Bytes around the special one that the word trick could confuse with it.
                    let mut bytes: Vec<u8> = (0..len).map(|i| [b'a', 0x21, 0x7f, 0xc3, b'!'][i % 5]).collect();
                    bytes[at] = special;
                    if at + 1 < len {
                        bytes[at + 1] = b'"';
                    }
                    assert_eq!(special_at(&bytes), Some(at), "{len} {at} {special}");
                }
            }
            let plain: Vec<u8> = (0..len).map(|i| [b'a', 0x21, 0x7f, 0xc3, 0xff, b' '][i % 6]).collect();
            assert_eq!(special_at(&plain), None, "{len}");
        }
    }

    #[test]
    fn object_members_are_found_in_one_checked_pass() {
        let text = r#" {"id": "x\n\u00e9", "n": -1.5e3, "usage": {"a": [1, {"b": null}], "c": true}, "id": false} "#;
        let members = object_members(text).expect("an object");
        let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["id", "n", "usage", "id"]);
        assert_eq!(members[2].1, r#"{"a": [1, {"b": null}], "c": true}"#);
        assert_eq!(members[3].1, "false");
        // Whatever serde_json refuses, or a key it would have to unescape, is left to it.
        for doc in [
            r#"{"a": "\x"}"#,
            r#"{"a": "\u12"}"#,
            "{\"a\": \"\u{1}\"}",
            r#"{"a": 01}"#,
            r#"{"a": [1,]}"#,
            r#"{"a": {"b" 1}}"#,
            r#"{"a": tru}"#,
            r#"{"\u0061": 1}"#,
            r#"{"a": 1} {}"#,
            r#"{"a": 1"#,
            r#"[1]"#,
        ] {
            assert!(object_members(doc).is_none(), "{doc}");
            let serde: Result<Box<serde_json::value::RawValue>, _> = serde_json::from_str(doc);
            if doc != r#"{"\u0061": 1}"# && doc != "[1]" {
                assert!(serde.is_err(), "{doc}");
            }
        }
        let deep = format!("{{\"a\": {}1{}}}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(object_members(&deep).is_none());
    }

    #[test]
    fn a_number_token_is_the_whole_text_or_nothing() {
        for n in [
            "0",
            "-0",
            "12",
            "1.5",
            "1.5e3",
            "1E-2",
            "123456789012345678901234567890",
        ] {
            assert!(is_number(n), "{n}");
        }
        for n in [
            "", "-", "01", "1.", ".5", "1e", "12x", " 1", "1 ", "0x10", "1,5", "NaN", "+1",
        ] {
            assert!(!is_number(n), "{n}");
        }
    }

    #[test]
    fn anything_unusual_is_left_to_serde() {
        let unusual = [
            GOOD.replace("req-7f3a", "req\\u0041"),             // an escape in a value
            GOOD.replace("\"model\"", "\"mod\\u0065l\""),       // an escape in a key
            GOOD.replace("\"model\"", "\"extra\":1,\"model\""), // an unknown field
            GOOD.replace("\"storage\":16.25", "\"storage\":16.25,\"model\":\"m\""), // a field twice
            GOOD.replace(",\"model\":\"qwen2-7b-instruct\"", ""), // a field missing
            GOOD.replace("1234.5", "\"1234.5\""),               // a number as a string
            GOOD.replace("1234.5", "01"),                       // not JSON's number grammar
            GOOD.replace("1234.5", "1."),
            GOOD.replace("1234.5", ".5"),
            GOOD.replace("1234.5", "1e"),
            GOOD.replace("1234.5", "NaN"),
            GOOD.replace("1234.5", "12x"),
            GOOD.replace("\"search\"", "5"),       // a label that is no string
            GOOD.replace("req-7f3a", "req\t7f3a"), // a control character
            format!("{GOOD} x"),                   // trailing characters
            format!("\u{a0}{GOOD}"),               // whitespace JSON does not know
            GOOD[..GOOD.len() - 1].to_owned(),     // cut short
            "[1]".to_owned(),
            "{}".to_owned(),
        ];
        for payload in &unusual {
            assert!(scan(payload).is_none(), "{payload}");
        }
    }
}
