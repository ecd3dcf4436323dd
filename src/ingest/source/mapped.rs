//! The pointer-mapped formats: `openai` (a completion response), `cloudevents` (a structured-mode
//! JSON CloudEvent 1.0) and `json` (any object). Each field is found by an RFC 6901 JSON Pointer,
//! with defaults per format that `[sources.pointers]` overrides. Pure.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::pointer::{self, Doc, Pointer};
use super::Decoded;
use crate::config::{SourceFormat, SourceSettings, TimestampFormat};
use crate::domain::{ComputeUnits, StorageUnits};
use crate::ingest::event::{self, Basis, Limits, RawLabels, RejectCode, Rejection, UsageEventRef};

/// Where a mapped format finds each field.
#[derive(Debug, Clone)]
pub struct Mapping {
    format: SourceFormat,
    event_id: Pointer,
    timestamp: Pointer,
    timestamp_format: TimestampFormat,
    model: Pointer,
    hardware: Hardware,
    input_tokens: Option<Pointer>,
    output_tokens: Option<Pointer>,
    /// Set for a `json` source whose producer measures T and S itself.
    measured: Option<(Pointer, Pointer)>,
    labels: Vec<(String, Pointer)>,
    /// `cloudevents`: the `type`s that carry usage; `None` is all of them.
    types: Option<Vec<String>>,
    /// Where `types` are looked for.
    type_at: Pointer,
}

#[derive(Debug, Clone)]
enum Hardware {
    Static(String),
    At(Pointer),
}

/// The built-in pointers of a format: (event_id, timestamp, model, input_tokens, output_tokens).
fn defaults(format: SourceFormat) -> [Option<&'static str>; 5] {
    match format {
        SourceFormat::Openai => [
            Some("/id"),
            Some("/created"),
            Some("/model"),
            Some("/usage/prompt_tokens"),
            Some("/usage/completion_tokens"),
        ],
        SourceFormat::Cloudevents => [
            Some("/id"),
            Some("/time"),
            Some("/data/model"),
            Some("/data/prompt_tokens"),
            Some("/data/completion_tokens"),
        ],
        _ => [None; 5],
    }
}

impl Mapping {
    /// The mapping of a validated `openai`, `cloudevents` or `json` source.
    pub fn new(s: &SourceSettings) -> Self {
        let [id, ts, model, input, output] = defaults(s.format);
        let pick = |field: &str, default: Option<&str>| {
            s.pointers.get(field).map(String::as_str).or(default).map(Pointer::new)
        };
        // Validation guarantees event_id, timestamp and model for `json`; "" (the whole
        // message) is never a valid value for them, so a gap shows as a rejection, not a panic.
        let must = |field: &str, default| pick(field, default).unwrap_or_else(|| Pointer::new("/"));
        let measured = match (pick("compute", None), pick("storage", None)) {
            (Some(c), Some(s)) => Some((c, s)),
            _ => None,
        };
        let hardware = match (&s.hardware, &s.hardware_pointer) {
            (Some(h), _) => Hardware::Static(h.clone()),
            (None, Some(p)) => Hardware::At(Pointer::new(p)),
            (None, None) => Hardware::At(Pointer::new("/hardware")),
        };
        Self {
            format: s.format,
            event_id: must("event_id", id),
            timestamp: must("timestamp", ts),
            timestamp_format: match s.format {
                SourceFormat::Openai => TimestampFormat::UnixS,
                _ => s.timestamp_format.unwrap_or_default(),
            },
            model: must("model", model),
            hardware,
            input_tokens: pick("input_tokens", input),
            output_tokens: pick("output_tokens", output),
            measured,
            labels: s.labels.iter().map(|(k, p)| (k.clone(), Pointer::new(p))).collect(),
            types: s.types.clone(),
            type_at: Pointer::new("/type"),
        }
    }

    /// Decodes one message into at most one event.
    pub fn decode<'a>(
        &'a self,
        payload: Option<&'a [u8]>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Decoded<'a>, Rejection> {
        let bytes = event::checked_payload(payload, limits)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Rejection::new(RejectCode::InvalidUtf8, format!("the payload is not valid UTF-8: {e}")))?;
        if !text.trim_start().starts_with('{') {
            return Err(Rejection::new(
                RejectCode::MalformedJson,
                format!("a message must be a JSON object, got {}", event::abbreviate(text)),
            ));
        }
        let root = match Doc::parse(text) {
            Some(doc) => doc,
            None => {
                let root: &RawValue = serde_json::from_str(text)
                    .map_err(|e| Rejection::new(RejectCode::MalformedJson, format!("not a JSON object: {e}")))?;
                Doc::new(root)
            }
        };
        if self.skipped_type(&root)? {
            return Ok(Decoded {
                skipped: 1,
                ..Decoded::default()
            });
        }
        Ok(Decoded {
            events: vec![self.event(&root, limits, now)],
            ..Decoded::default()
        })
    }

    /// Whether a CloudEvent's `type` is not one of `types`.
    fn skipped_type(&self, root: &Doc<'_>) -> Result<bool, Rejection> {
        let Some(types) = &self.types else {
            return Ok(false);
        };
        let kind = pointer::text("type", pointer::required(root, "type", &self.type_at)?)?;
        Ok(!types.iter().any(|t| *t == kind))
    }

    fn event<'a>(
        &'a self,
        root: &Doc<'a>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<UsageEventRef<'a>, Rejection> {
        let field = |name: &str, p: &Pointer| pointer::required(root, name, p);
        let event_id = event::name(
            "event_id",
            pointer::text("event_id", field("event_id", &self.event_id)?)?,
        )?;
        let model = event::name("model", pointer::text("model", field("model", &self.model)?)?)?;
        let hardware = match &self.hardware {
            Hardware::Static(h) => Cow::Borrowed(h.as_str()),
            Hardware::At(p) => event::name("hardware", pointer::text("hardware", field("hardware", p)?)?)?,
        };
        let timestamp = pointer::timestamp(field("timestamp", &self.timestamp)?, self.timestamp_format, limits, now)?;
        let quantity = |name: &str, p: &Option<Pointer>| -> Result<Option<rust_decimal::Decimal>, Rejection> {
            match p.as_ref().and_then(|p| p.find_in(root)) {
                Some(raw) => event::quantity_or_text(name, raw).map(Some),
                None => Ok(None),
            }
        };
        let input = quantity("input_tokens", &self.input_tokens)?;
        let output = quantity("output_tokens", &self.output_tokens)?;
        let (compute, storage, tokens, basis) = match &self.measured {
            Some((c, s)) => (
                event::quantity_or_text("compute", field("compute", c)?)?,
                event::quantity_or_text("storage", field("storage", s)?)?,
                event::Tokens {
                    input: input.unwrap_or_default(),
                    output: output.unwrap_or_default(),
                },
                Basis::Measured,
            ),
            None => {
                let what = self.format.as_str();
                let tokens = super::token_pair(input, output, &format_args!("{what} message"))?;
                (Default::default(), Default::default(), tokens, Basis::NoProfile)
            }
        };
        let mut labels = RawLabels::new();
        for (name, p) in &self.labels {
            if let Some(raw) = p.find_in(root) {
                // The field's name only matters for the message of a refused value.
                let value = pointer::text("label", raw).or_else(|_| pointer::text(&format!("label {name}"), raw))?;
                labels.push((Cow::Borrowed(name.as_str()), value));
            }
        }
        Ok(UsageEventRef {
            event_id,
            timestamp,
            model,
            hardware,
            compute: ComputeUnits(compute),
            storage: StorageUnits(storage),
            labels: event::checked_labels(labels)?,
            tokens,
            basis,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ingest::source::test_values::{limits, now};
    use crate::ingest::source::Source;
    use crate::pricing::profiles::UsageProfiles;

    pub(crate) fn settings(format: SourceFormat) -> SourceSettings {
        SourceSettings {
            name: "s".into(),
            topic: "t".into(),
            format,
            hardware: Some("a100-80g".into()),
            hardware_pointer: None,
            hardware_attribute: None,
            pointers: BTreeMap::new(),
            attributes: BTreeMap::new(),
            labels: BTreeMap::new(),
            types: None,
            timestamp_format: None,
        }
    }

    fn one(source: &Source, payload: &str) -> Result<UsageEventRef<'static>, Rejection> {
        let d = source.decode(Some(payload.as_bytes()), &limits(), now())?;
        assert_eq!(d.events.len(), 1);
        d.events.into_iter().next().unwrap().map(|e| UsageEventRef {
            event_id: Cow::Owned(e.event_id.into_owned()),
            model: Cow::Owned(e.model.into_owned()),
            hardware: Cow::Owned(e.hardware.into_owned()),
            labels: e
                .labels
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.into_owned()), Cow::Owned(v.into_owned())))
                .collect(),
            ..e
        })
    }

    /// A vLLM 0.6 `/v1/completions` response body, as the server returned it.
    pub(crate) const VLLM: &str = r#"{"id":"cmpl-8c2a1f7e4b0d4f0e9a6c3b2d1e0f9a8b","object":"text_completion","created":1795921200,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"text":" Paris.","logprobs":null,"finish_reason":"stop","stop_reason":null,"prompt_logprobs":null}],"usage":{"prompt_tokens":1200,"total_tokens":1500,"completion_tokens":300,"prompt_tokens_details":null}}"#;

    #[test]
    fn a_vllm_response_is_a_token_event_priced_by_its_profile() {
        let profiles = UsageProfiles::new(&[crate::config::UsageProfileSettings {
            name: Some("llama-a100".into()),
            model: "meta-llama/*".into(),
            hardware: "a100-*".into(),
            compute_per_input_token: "0.5".parse().unwrap(),
            compute_per_output_token: "2".parse().unwrap(),
            storage_per_token: "0.001".parse().unwrap(),
        }]);
        let source = Source::new(&settings(SourceFormat::Openai), profiles);
        let e = one(&source, VLLM).unwrap();
        assert_eq!(e.event_id, "cmpl-8c2a1f7e4b0d4f0e9a6c3b2d1e0f9a8b");
        assert_eq!(e.model, "meta-llama/Llama-3.1-8B-Instruct");
        assert_eq!(e.hardware, "a100-80g");
        assert_eq!(e.timestamp.to_rfc3339(), "2026-11-29T03:00:00+00:00");
        assert_eq!(
            (e.tokens.input.to_string(), e.tokens.output.to_string()),
            ("1200".into(), "300".into())
        );
        assert_eq!(
            (e.compute.to_string(), e.storage.to_string()),
            ("1200".into(), "1.5".into())
        );
        let decoded = source.decode(Some(VLLM.as_bytes()), &limits(), now()).unwrap();
        assert_eq!(decoded.profile_name(e.basis), Some("llama-a100"));
    }

    #[test]
    fn without_a_profile_tokens_are_kept_and_t_and_s_unknown() {
        let source = Source::new(&settings(SourceFormat::Openai), UsageProfiles::default());
        let e = one(&source, VLLM).unwrap();
        assert_eq!(e.basis, Basis::NoProfile);
        assert!(e.compute.value().is_zero() && e.storage.value().is_zero());
        assert_eq!(e.tokens.input.to_string(), "1200");
    }

    /// What LiteLLM's OpenMeter callback sends (litellm/integrations/openmeter.py).
    pub(crate) const LITELLM: &str = r#"{"specversion":"1.0","type":"litellm_tokens","id":"chatcmpl-9f1c2b3a","time":"2026-11-29T03:00:00.500Z","subject":"team-search","source":"litellm-proxy","data":{"model":"gpt-4o-mini","cost":0.000315,"prompt_tokens":"1200","completion_tokens":300,"total_tokens":1500}}"#;

    #[test]
    fn a_litellm_cloudevent_decodes_and_other_types_are_skipped() {
        let mut s = settings(SourceFormat::Cloudevents);
        s.types = Some(vec!["litellm_tokens".into()]);
        s.labels.insert("team".into(), "/subject".into());
        let source = Source::new(&s, UsageProfiles::default());
        let e = one(&source, LITELLM).unwrap();
        assert_eq!(e.event_id, "chatcmpl-9f1c2b3a");
        assert_eq!(e.timestamp.to_rfc3339(), "2026-11-29T03:00:00.500+00:00");
        assert_eq!(e.tokens.input.to_string(), "1200");
        assert_eq!(
            e.labels.to_vec(),
            vec![(Cow::Borrowed("team"), Cow::Borrowed("team-search"))]
        );
        let other = LITELLM.replace("litellm_tokens", "litellm_spend");
        let d = source.decode(Some(other.as_bytes()), &limits(), now()).unwrap();
        assert_eq!((d.events.len(), d.skipped), (0, 1));
    }

    #[test]
    fn json_reads_every_field_by_pointer_with_unix_millis_and_decimal_strings() {
        let mut s = settings(SourceFormat::Json);
        s.hardware = None;
        s.hardware_pointer = Some("/host/gpu".into());
        s.timestamp_format = Some(TimestampFormat::UnixMs);
        for (f, p) in [
            ("event_id", "/req"),
            ("timestamp", "/ts"),
            ("model", "/m"),
            ("compute", "/usage/t"),
            ("storage", "/usage/s"),
        ] {
            s.pointers.insert(f.into(), p.into());
        }
        let source = Source::new(&s, UsageProfiles::default());
        let e = one(
            &source,
            r#"{"req": 42, "ts": 1795921200000, "m": "qwen", "host": {"gpu": "l4"}, "usage": {"t": "12", "s": 0.50}}"#,
        )
        .unwrap();
        assert_eq!((e.event_id.as_ref(), e.hardware.as_ref()), ("42", "l4"));
        assert_eq!(
            (e.compute.to_string(), e.storage.to_string()),
            ("12".into(), "0.5".into())
        );
        assert_eq!(e.basis, Basis::Measured);
        let bad = |json: &str| one(&source, json).unwrap_err().to_string();
        assert_eq!(
            bad(r#"{"req": "r", "ts": 1795921200000, "m": "qwen", "usage": {"t": 1, "s": 1}}"#),
            "missing_field: missing field `hardware` (at /host/gpu)"
        );
        assert_eq!(
            bad(r#"{"req": "r", "ts": 1795921200000, "m": "q", "host": {"gpu": "l4"}, "usage": {"t": "1,5", "s": 1}}"#),
            "invalid_field: compute must be a number or a decimal string, got \"\\\"1,5\\\"\""
        );
        assert_eq!(
            bad(r#"{"req": "r", "ts": 1795921200000, "m": "q", "host": {"gpu": "l4"}, "usage": {"t": "-1", "s": 1}}"#),
            "negative_value: compute must be >= 0, got -1"
        );
        assert_eq!(
            source.decode(Some(b"[1]"), &limits(), now()).unwrap_err().code,
            RejectCode::MalformedJson
        );
    }

    #[test]
    fn an_openai_body_without_usage_is_missing_its_tokens() {
        let source = Source::new(&settings(SourceFormat::Openai), UsageProfiles::default());
        let body = r#"{"id": "x", "created": 1795921200, "model": "m"}"#;
        assert_eq!(
            one(&source, body).unwrap_err().to_string(),
            "missing_field: missing field `input_tokens` and `output_tokens` (openai message)"
        );
    }
}
