//! `[[sources]]` and `[[usage_profiles]]`: which topics carry usage in which format, and how
//! token counts become compute T and storage S.

use std::collections::{BTreeMap, HashSet};

use rust_decimal::Decimal;
use serde::Deserialize;

use super::Problems;
use crate::domain::exact_decimal;

/// One topic costwatch reads usage from, and how its messages are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// Names the source in `window_usage.source` and `rejected_events`: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The Kafka topic its messages arrive on; one source per topic.
    pub topic: String,
    /// How a message is read: `costwatch`, `openai`, `cloudevents`, `otlp_json`, `otlp_proto` or `json`.
    pub format: SourceFormat,
    /// A static hardware target for every event of the source.
    #[serde(default)]
    pub hardware: Option<String>,
    /// An RFC 6901 JSON Pointer to the hardware target in each message (JSON formats).
    #[serde(default)]
    pub hardware_pointer: Option<String>,
    /// A span or resource attribute naming the hardware target (OTLP formats).
    #[serde(default)]
    pub hardware_attribute: Option<String>,
    /// Field -> RFC 6901 JSON Pointer, overriding the format's defaults (`event_id`, `timestamp`,
    /// `model`, `input_tokens`, `output_tokens`, `compute`, `storage`).
    #[serde(default)]
    pub pointers: BTreeMap<String, String>,
    /// OTLP formats: field -> span attribute name, overriding `gen_ai.response.model`
    /// (`model`), `gen_ai.usage.input_tokens` and `gen_ai.usage.output_tokens`.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Label name -> JSON Pointer (JSON formats) or span/resource attribute name (OTLP formats).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `cloudevents` only: the event `type`s that carry usage; others are skipped and counted.
    #[serde(default)]
    pub types: Option<Vec<String>>,
    /// `json` only: how the timestamp is written: `rfc3339` (default), `unix_s`, `unix_ms`, `unix_ns`.
    #[serde(default)]
    pub timestamp_format: Option<TimestampFormat>,
}

/// How a source's messages are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum SourceFormat {
    /// costwatch's own event contract (see the README), unchanged.
    Costwatch,
    /// An OpenAI-compatible completion response (vLLM, OpenAI, LiteLLM).
    Openai,
    /// A structured-mode JSON CloudEvent 1.0 (OpenMeter, LiteLLM's OpenMeter callback).
    Cloudevents,
    /// An OTLP `ExportTraceServiceRequest` in JSON (the Collector's Kafka exporter, `otlp_json`).
    OtlpJson,
    /// An OTLP `ExportTraceServiceRequest` in protobuf (the Collector's Kafka exporter's default).
    OtlpProto,
    /// Any JSON object, every field given by pointer.
    Json,
}

impl SourceFormat {
    /// Every format, in the order an error lists them.
    pub const ALL: [SourceFormat; 6] = [
        Self::Costwatch,
        Self::Openai,
        Self::Cloudevents,
        Self::OtlpJson,
        Self::OtlpProto,
        Self::Json,
    ];

    /// The name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Costwatch => "costwatch",
            Self::Openai => "openai",
            Self::Cloudevents => "cloudevents",
            Self::OtlpJson => "otlp_json",
            Self::OtlpProto => "otlp_proto",
            Self::Json => "json",
        }
    }

    /// Whether fields are found by JSON Pointer (every mapped format but OTLP).
    pub fn uses_pointers(self) -> bool {
        matches!(self, Self::Openai | Self::Cloudevents | Self::Json)
    }

    /// Whether fields are span attributes.
    pub fn is_otlp(self) -> bool {
        matches!(self, Self::OtlpJson | Self::OtlpProto)
    }
}

impl TryFrom<String> for SourceFormat {
    type Error = String;

    // By hand, like `Deployment`, so that a wrong value names the allowed ones.
    fn try_from(s: String) -> Result<Self, String> {
        Self::ALL.into_iter().find(|f| f.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|f| f.as_str()).collect();
            format!("format must be one of {}, got {s:?}", names.join(", "))
        })
    }
}

/// How a `json` source writes its timestamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum TimestampFormat {
    /// RFC 3339 text with any offset.
    #[default]
    Rfc3339,
    /// Unix seconds (a number or a decimal string; fractions allowed).
    UnixS,
    /// Unix milliseconds.
    UnixMs,
    /// Unix nanoseconds.
    UnixNs,
}

impl TryFrom<String> for TimestampFormat {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "rfc3339" => Ok(Self::Rfc3339),
            "unix_s" => Ok(Self::UnixS),
            "unix_ms" => Ok(Self::UnixMs),
            "unix_ns" => Ok(Self::UnixNs),
            other => Err(format!(
                "timestamp_format must be one of rfc3339, unix_s, unix_ms, unix_ns, got {other:?}"
            )),
        }
    }
}

/// How token counts become T and S for the (model, hardware) pairs its globs match:
/// T = input × `compute_per_input_token` + output × `compute_per_output_token`,
/// S = (input + output) × `storage_per_token`. The first matching profile applies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageProfileSettings {
    /// Names the profile in `window_usage.profile`; defaults to `<model>@<hardware>`.
    #[serde(default)]
    pub name: Option<String>,
    /// A glob (`*`, `?`) on model names.
    pub model: String,
    /// A glob (`*`, `?`) on hardware names.
    pub hardware: String,
    /// T per input (prompt) token, exact.
    #[serde(deserialize_with = "exact_decimal")]
    pub compute_per_input_token: Decimal,
    /// T per output (completion) token, exact.
    #[serde(deserialize_with = "exact_decimal")]
    pub compute_per_output_token: Decimal,
    /// S per token, input and output alike, exact.
    #[serde(deserialize_with = "exact_decimal")]
    pub storage_per_token: Decimal,
}

impl UsageProfileSettings {
    /// The name rows derived by this profile carry.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}@{}", self.model, self.hardware))
    }
}

/// At most this many labels per event (`ingest::event::MAX_LABELS`, which config cannot import).
const MAX_LABELS: usize = 16;

/// Fields a pointer may be given for.
const POINTER_FIELDS: [&str; 7] = [
    "event_id",
    "timestamp",
    "model",
    "input_tokens",
    "output_tokens",
    "compute",
    "storage",
];
/// Fields an OTLP attribute name may be given for.
const ATTRIBUTE_FIELDS: [&str; 3] = ["model", "input_tokens", "output_tokens"];

/// Whether `pointer` is an RFC 6901 JSON Pointer: empty, or `/`-separated tokens in which `~`
/// is only ever followed by `0` or `1`.
pub fn is_json_pointer(pointer: &str) -> bool {
    (pointer.is_empty() || pointer.starts_with('/'))
        && pointer
            .split('~')
            .skip(1)
            .all(|after| after.starts_with('0') || after.starts_with('1'))
}

/// Whether `name` may name a source: 1 to 64 of letters, digits, `-`, `_`, `.`.
fn is_source_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl SourceSettings {
    /// Checks one source; `key` is `sources[i]`.
    pub(super) fn validate(&self, key: &str, p: &mut Problems) {
        p.require(
            is_source_name(&self.name),
            format!(
                "{key}.name: {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                self.name
            ),
        );
        p.require(!self.topic.trim().is_empty(), format!("{key}.topic: must not be empty"));
        let format = self.format;
        self.validate_hardware(key, p);
        if format == SourceFormat::Costwatch {
            for (set, what) in [
                (!self.pointers.is_empty(), "pointers"),
                (!self.attributes.is_empty(), "attributes"),
                (!self.labels.is_empty(), "labels"),
            ] {
                p.require(
                    !set,
                    format!("{key}.{what}: the costwatch format reads its own fields; remove {what}"),
                );
            }
        }
        for (field, pointer) in &self.pointers {
            p.require(
                format.uses_pointers(),
                format!("{key}.pointers: the {} format has no JSON pointers", format.as_str()),
            );
            p.require(
                POINTER_FIELDS.contains(&field.as_str()),
                format!(
                    "{key}.pointers.{field}: not a field; use one of {}",
                    POINTER_FIELDS.join(", ")
                ),
            );
            p.require(
                is_json_pointer(pointer),
                format!("{key}.pointers.{field}: {pointer:?} is not an RFC 6901 JSON Pointer such as \"/usage/prompt_tokens\""),
            );
        }
        for field in self.attributes.keys() {
            p.require(
                format.is_otlp(),
                format!("{key}.attributes: only the otlp formats read span attributes"),
            );
            p.require(
                ATTRIBUTE_FIELDS.contains(&field.as_str()),
                format!(
                    "{key}.attributes.{field}: not a field; use one of {}",
                    ATTRIBUTE_FIELDS.join(", ")
                ),
            );
        }
        self.validate_labels(key, p);
        p.require(
            self.types.is_none() || format == SourceFormat::Cloudevents,
            format!("{key}.types: only the cloudevents format has event types"),
        );
        p.require(
            self.timestamp_format.is_none() || format == SourceFormat::Json,
            format!("{key}.timestamp_format: only the json format takes a timestamp format"),
        );
        if format == SourceFormat::Json {
            self.validate_json_fields(key, p);
        }
    }

    fn validate_hardware(&self, key: &str, p: &mut Problems) {
        let format = self.format;
        let given = [
            self.hardware.is_some(),
            self.hardware_pointer.is_some(),
            self.hardware_attribute.is_some(),
        ];
        let count = given.iter().filter(|g| **g).count();
        if format == SourceFormat::Costwatch {
            p.require(
                count == 0,
                format!("{key}.hardware: the costwatch format carries hardware in each event; remove hardware, hardware_pointer and hardware_attribute"),
            );
            return;
        }
        p.require(
            count == 1,
            format!("{key}.hardware: set exactly one of hardware, hardware_pointer, hardware_attribute"),
        );
        if let Some(hw) = &self.hardware {
            p.require(
                crate::domain::check_name(hw).is_ok(),
                format!("{key}.hardware: {hw:?} is not a hardware name (1 to 128 characters, no NUL)"),
            );
        }
        if let Some(pointer) = &self.hardware_pointer {
            p.require(
                format.uses_pointers(),
                format!(
                    "{key}.hardware_pointer: the {} format reads attributes; use hardware_attribute",
                    format.as_str()
                ),
            );
            p.require(
                is_json_pointer(pointer),
                format!("{key}.hardware_pointer: {pointer:?} is not an RFC 6901 JSON Pointer"),
            );
        }
        p.require(
            self.hardware_attribute.is_none() || format.is_otlp(),
            format!("{key}.hardware_attribute: only the otlp formats have attributes; use hardware_pointer"),
        );
    }

    fn validate_labels(&self, key: &str, p: &mut Problems) {
        p.require(
            self.labels.len() <= MAX_LABELS,
            format!(
                "{key}.labels: {} labels, at most {MAX_LABELS} per event",
                self.labels.len()
            ),
        );
        for (label, from) in &self.labels {
            p.require(
                crate::domain::check_name(label).is_ok(),
                format!("{key}.labels.{label}: not a label name (1 to 128 characters, no NUL)"),
            );
            if self.format.uses_pointers() {
                p.require(
                    is_json_pointer(from),
                    format!("{key}.labels.{label}: {from:?} is not an RFC 6901 JSON Pointer"),
                );
            }
            if self.format.is_otlp() {
                p.require(
                    !from.is_empty(),
                    format!("{key}.labels.{label}: name a span or resource attribute"),
                );
            }
        }
    }

    fn validate_json_fields(&self, key: &str, p: &mut Problems) {
        for field in ["event_id", "timestamp", "model"] {
            p.require(
                self.pointers.contains_key(field),
                format!("{key}.pointers.{field}: the json format needs a pointer for every field it reads"),
            );
        }
        let has = |f: &str| self.pointers.contains_key(f);
        let measured = has("compute") || has("storage");
        let tokens = has("input_tokens") || has("output_tokens");
        p.require(
            measured || tokens,
            format!("{key}.pointers: give compute and storage, or input_tokens and/or output_tokens"),
        );
        p.require(
            !measured || (has("compute") && has("storage")),
            format!("{key}.pointers: compute and storage go together"),
        );
    }
}

/// Checks every source and that names and topics are unique.
pub(super) fn validate_sources(sources: &[SourceSettings], p: &mut Problems) {
    let mut names = HashSet::new();
    let mut topics = HashSet::new();
    for (i, s) in sources.iter().enumerate() {
        let key = format!("sources[{i}]");
        s.validate(&key, p);
        p.require(
            names.insert(s.name.as_str()),
            format!("{key}.name: {:?} is used by two sources", s.name),
        );
        p.require(
            topics.insert(s.topic.as_str()),
            format!(
                "{key}.topic: {:?} is read by two sources; one topic has one format",
                s.topic
            ),
        );
    }
}

/// Checks every usage profile.
pub(super) fn validate_profiles(profiles: &[UsageProfileSettings], p: &mut Problems) {
    let mut names = HashSet::new();
    for (i, u) in profiles.iter().enumerate() {
        let key = format!("usage_profiles[{i}]");
        for (what, glob) in [("model", &u.model), ("hardware", &u.hardware)] {
            p.require(
                !glob.is_empty() && glob.chars().count() <= 128,
                format!("{key}.{what}: a glob of 1 to 128 characters such as \"llama-*\""),
            );
        }
        for (what, value) in [
            ("compute_per_input_token", u.compute_per_input_token),
            ("compute_per_output_token", u.compute_per_output_token),
            ("storage_per_token", u.storage_per_token),
        ] {
            p.require(value >= Decimal::ZERO, format!("{key}.{what}: must not be negative"));
            p.require(
                value.scale() <= 10,
                format!("{key}.{what}: at most 10 digits after the decimal point (the precision contract)"),
            );
        }
        let name = u.display_name();
        p.require(
            crate::domain::check_name(&name).is_ok(),
            format!("{key}.name: {name:?} is not a name (1 to 128 characters, no NUL)"),
        );
        p.require(
            names.insert(name.clone()),
            format!("{key}.name: {name:?} is used by two profiles"),
        );
    }
}

impl super::Settings {
    /// The sources to read: `[[sources]]`, or else `[kafka] topic` as the one source in
    /// costwatch's own format, named after the topic (as migration 0006 named the rows written
    /// before sources existed, so that an upgrade does not split a stream in two).
    pub fn effective_sources(&self) -> Vec<SourceSettings> {
        if !self.sources.is_empty() {
            return self.sources.clone();
        }
        vec![SourceSettings {
            name: self.kafka.topic.clone(),
            topic: self.kafka.topic.clone(),
            format: SourceFormat::Costwatch,
            hardware: None,
            hardware_pointer: None,
            hardware_attribute: None,
            pointers: BTreeMap::new(),
            attributes: BTreeMap::new(),
            labels: BTreeMap::new(),
            types: None,
            timestamp_format: None,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, Settings};

    const BASE: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        group_id = "costwatch"

        [database]
        url = "postgres://postgres@127.0.0.1:5432/costwatch"

        [pricing]
        currency = "USD"
    "#;

    fn parse(extra: &str) -> Result<Settings, ConfigError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                &format!("{BASE}\n{extra}"),
                config::FileFormat::Toml,
            ))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn problems(extra: &str) -> Vec<String> {
        match parse(extra) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn every_format_loads_with_its_options() {
        let s = parse(
            r#"
            [[sources]]
            name = "vllm"
            topic = "vllm-responses"
            format = "openai"
            hardware = "a100-80g"
            [sources.labels]
            tenant = "/user"

            [[sources]]
            name = "litellm"
            topic = "openmeter"
            format = "cloudevents"
            hardware_pointer = "/data/metadata/gpu"
            types = ["litellm_tokens"]

            [[sources]]
            name = "traces"
            topic = "otlp_spans"
            format = "otlp_proto"
            hardware_attribute = "host.type"
            [sources.labels]
            service = "service.name"

            [[sources]]
            name = "billing"
            topic = "billing"
            format = "json"
            hardware = "l4"
            timestamp_format = "unix_ms"
            [sources.pointers]
            event_id = "/req"
            timestamp = "/ts"
            model = "/m"
            compute = "/t"
            storage = "/s"

            [[usage_profiles]]
            model = "llama-*"
            hardware = "a100-*"
            compute_per_input_token = "0.5"
            compute_per_output_token = "2"
            storage_per_token = "0.001"
            "#,
        )
        .unwrap();
        assert_eq!(s.sources.len(), 4);
        assert_eq!(s.sources[2].format, SourceFormat::OtlpProto);
        assert_eq!(s.sources[0].labels["tenant"], "/user");
        assert_eq!(s.sources[3].timestamp_format, Some(TimestampFormat::UnixMs));
        assert_eq!(s.usage_profiles[0].storage_per_token.to_string(), "0.001");
        assert_eq!(s.usage_profiles[0].display_name(), "llama-*@a100-*");
        assert_eq!(s.effective_sources().len(), 4);
    }

    #[test]
    fn without_sources_kafka_topic_is_the_one_native_source() {
        let s = parse("").unwrap_err().to_string();
        assert!(
            s.contains("kafka.topic: missing or empty; name the usage topic, or configure [[sources]]"),
            "{s}"
        );
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                &BASE.replace("[kafka]", "[kafka]\ntopic = \"usage\""),
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        settings.validate().unwrap();
        let sources = settings.effective_sources();
        assert_eq!(sources.len(), 1);
        assert_eq!(
            (sources[0].name.as_str(), sources[0].topic.as_str(), sources[0].format),
            ("usage", "usage", SourceFormat::Costwatch)
        );
    }

    #[test]
    fn every_source_problem_is_named_by_its_key() {
        let p = problems(
            r#"
            [[sources]]
            name = "a b"
            topic = "t"
            format = "openai"
            hardware = "x"
            hardware_pointer = "/hw"
            types = ["x"]
            [sources.pointers]
            model = "model"
            tokens = "/t"

            [[sources]]
            name = "j"
            topic = "t"
            format = "json"
            hardware_attribute = "host.type"
            [sources.pointers]
            compute = "/c"

            [[sources]]
            name = "j"
            topic = "u"
            format = "costwatch"
            hardware = "x"

            [[usage_profiles]]
            model = ""
            hardware = "*"
            compute_per_input_token = "-1"
            compute_per_output_token = "0.00000000001"
            storage_per_token = "0"
            "#,
        );
        let expected = [
            "sources[0].name: \"a b\" must be 1 to 64 letters, digits, '-', '_' or '.'",
            "sources[0].hardware: set exactly one of hardware, hardware_pointer, hardware_attribute",
            "sources[0].pointers.model: \"model\" is not an RFC 6901 JSON Pointer such as \"/usage/prompt_tokens\"",
            "sources[0].pointers.tokens: not a field; use one of event_id, timestamp, model, input_tokens, output_tokens, compute, storage",
            "sources[0].types: only the cloudevents format has event types",
            "sources[1].hardware_attribute: only the otlp formats have attributes; use hardware_pointer",
            "sources[1].pointers.event_id: the json format needs a pointer for every field it reads",
            "sources[1].pointers: compute and storage go together",
            "sources[1].topic: \"t\" is read by two sources; one topic has one format",
            "sources[2].hardware: the costwatch format carries hardware in each event; remove hardware, hardware_pointer and hardware_attribute",
            "sources[2].name: \"j\" is used by two sources",
            "usage_profiles[0].model: a glob of 1 to 128 characters such as \"llama-*\"",
            "usage_profiles[0].compute_per_input_token: must not be negative",
            "usage_profiles[0].compute_per_output_token: at most 10 digits after the decimal point (the precision contract)",
        ];
        for e in expected {
            assert!(p.iter().any(|x| x == e), "missing {e:?} in {p:#?}");
        }
        let err = parse("[[sources]]\nname = \"x\"\ntopic = \"t\"\nformat = \"avro\"").unwrap_err();
        assert!(
            err.to_string().contains(
                "format must be one of costwatch, openai, cloudevents, otlp_json, otlp_proto, json, got \"avro\""
            ),
            "{err}"
        );
    }

    #[test]
    fn a_reload_applies_usage_profiles_and_sources_wait_for_a_restart() {
        let source = "[[sources]]\nname = \"v\"\ntopic = \"t\"\nformat = \"openai\"\nhardware = \"h\"\n";
        let profile = "[[usage_profiles]]\nmodel = \"*\"\nhardware = \"*\"\ncompute_per_input_token = \"1\"\n\
                       compute_per_output_token = \"1\"\nstorage_per_token = \"0\"\n";
        let before = parse(source).unwrap();
        let after = parse(&format!("{}{profile}", source.replace("\"t\"", "\"u\""))).unwrap();
        assert_eq!(before.restart_needed(&after), vec!["sources"]);
        let applied = before.reloaded(after);
        assert_eq!(applied.usage_profiles.len(), 1);
        assert_eq!(applied.sources[0].topic, "t");
    }

    #[test]
    fn json_pointers_follow_rfc_6901() {
        for ok in ["", "/", "/a/b", "/a~1b/~0", "/0"] {
            assert!(is_json_pointer(ok), "{ok}");
        }
        for bad in ["a", "/a~2", "/a~", "usage/prompt_tokens"] {
            assert!(!is_json_pointer(bad), "{bad}");
        }
    }
}
