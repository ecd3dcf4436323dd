//! `costwatch loadgen`: seeded synthetic usage for the quickstart, tests and benchmarks, with
//! duplicates, late and malformed events mixed in, and the exact expected totals on request; in
//! costwatch's own format or as token events in any source format ([`formats`]).

pub mod formats;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rust_decimal::Decimal;
use serde::Serialize;
use tracing::info;

use crate::config::SourceFormat;
use crate::exit::{ExitClass, Failure};

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Messages to send, all kinds together.
    pub count: u64,
    /// Seed of the generator: the same spec always produces the same messages.
    pub seed: u64,
    /// Number of distinct models (`model-0`, ...).
    pub models: u32,
    /// Number of distinct hardware targets (`hw-0`, ...).
    pub hardware: u32,
    /// Events per second; 0 sends as fast as the broker takes them.
    pub rate: u64,
    /// Shares of the `count` messages, each in [0, 1).
    pub duplicates: f64,
    /// Share of events stamped `late_by` behind the stream.
    pub late: f64,
    /// Share of malformed messages, each rejected.
    pub malformed: f64,
    /// Share of hostile messages: valid-looking poison (label sets too wide to index, emoji
    /// labels, 37-digit exponents, JSON arrays, oversized payloads, conflicting duplicates) and
    /// valid events a careless producer sends (stamped minutes ahead, 10^18 quantities). Each
    /// has a known outcome, so the totals stay exact.
    pub hostile: f64,
    /// How far behind the stream a late event is stamped.
    pub late_by: Duration,
    /// Event times are spread over `span` ending at `end`.
    pub span: Duration,
    /// The end of the span of event times.
    pub end: DateTime<Utc>,
}

/// The ground truth of one generated load, per (model, hardware).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Expected {
    /// The seed the load was generated with.
    pub seed: u64,
    /// Messages sent, all kinds together.
    pub messages: u64,
    /// Events a correct consumer accepts (late ones included).
    pub accepted: u64,
    /// Re-sent copies a correct consumer skips.
    pub duplicates: u64,
    /// Messages a correct consumer rejects.
    pub rejected: u64,
    /// Events stamped late; whether each one counts as late depends on the watermark when it arrives.
    pub late_sent: u64,
    /// Rejections by reason code (hostile messages only; malformed ones are in `rejected`).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Parts of messages without usage a correct consumer skips (OTLP spans without GenAI usage).
    pub skipped: u64,
    /// Per (model, hardware), the sums a correct consumer stores.
    pub totals: Vec<PairTotal>,
}

/// The accepted events of one (model, hardware) pair, summed exactly.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PairTotal {
    /// The model's name, as the events carry it.
    pub model: String,
    /// The hardware's name, as the events carry it.
    pub hardware: String,
    /// Accepted events of the pair.
    pub events: u64,
    /// ΣT of those events.
    pub compute: Decimal,
    /// ΣS of those events (0 for token formats: S depends on the usage profile in force).
    pub storage: Decimal,
    /// Σ input tokens (token formats).
    pub input_tokens: Decimal,
    /// Σ output tokens (token formats).
    pub output_tokens: Decimal,
}

/// One message to send, with its key.
#[derive(Debug, Clone)]
pub struct Message {
    /// The Kafka key: the event id, so copies land in the same partition as the original.
    pub key: String,
    /// The message's bytes (JSON, or deliberately not).
    pub payload: Vec<u8>,
}

/// Generates the messages of `spec` and the totals a correct consumer must arrive at. Pure and
/// deterministic for a given spec, so a failing seed can be replayed.
pub fn generate(spec: &LoadSpec) -> (Vec<Message>, Expected) {
    generate_in(spec, SourceFormat::Costwatch)
}

/// [`generate`] in `format`: every format but `costwatch` carries tokens instead of T and S
/// (hostile messages are the costwatch format's; in the others they are malformed ones).
pub fn generate_in(spec: &LoadSpec, format: SourceFormat) -> (Vec<Message>, Expected) {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut messages = Vec::with_capacity(spec.count as usize);
    let mut truth = Truth::new(spec.seed);
    let span_ms = spec.span.as_millis().max(1) as i64;
    let start = spec.end - chrono::Duration::milliseconds(span_ms);
    let late_by = chrono::Duration::from_std(spec.late_by).unwrap_or_default();
    let mut sent_good: Vec<usize> = Vec::new();
    let mut huge_sent = 0u32;

    for i in 0..spec.count {
        let roll: f64 = rng.gen();
        if roll >= 1.0 - spec.hostile && format == SourceFormat::Costwatch {
            let kind = rng.gen_range(0..HOSTILE_KINDS);
            let good_id = (!sent_good.is_empty()).then(|| sent_good[rng.gen_range(0..sent_good.len())]);
            match hostile(kind, i, spec, good_id.map(|g| &messages[g]), &mut huge_sent) {
                Hostile::Rejected(message, reason) => {
                    messages.push(message);
                    truth.expected.rejected += 1;
                    *truth.expected.rejected_by_reason.entry(reason.to_owned()).or_default() += 1;
                }
                Hostile::Valid { ts, compute, storage } => {
                    let event_id = format!("s{}-h{i}", spec.seed);
                    let payload = event_json(&event_id, ts, "model-0", "hw-0", compute, storage, None);
                    truth.accept("model-0", "hw-0", compute, storage);
                    messages.push(Message { key: event_id, payload });
                }
            }
            continue;
        }
        if roll < spec.malformed || roll >= 1.0 - spec.hostile {
            messages.push(match format {
                SourceFormat::Costwatch => malformed(i, &mut rng, spec.end),
                format => Message {
                    key: format!("bad-{i}"),
                    payload: formats::malformed(format, i, spec.end),
                },
            });
            truth.expected.rejected += 1;
            continue;
        }
        if roll < spec.malformed + spec.duplicates && !sent_good.is_empty() {
            let original = &messages[sent_good[rng.gen_range(0..sent_good.len())]];
            let copy = Message {
                key: original.key.clone(),
                payload: original.payload.clone(),
            };
            messages.push(copy);
            truth.expected.duplicates += 1;
            truth.expected.skipped += skipped_per_message(format);
            continue;
        }
        let is_late = roll < spec.malformed + spec.duplicates + spec.late;
        let offset_ms = span_ms * i as i64 / spec.count.max(1) as i64 + rng.gen_range(0..1000);
        let mut ts = start + chrono::Duration::milliseconds(offset_ms.min(span_ms));
        if is_late {
            ts -= late_by;
            truth.expected.late_sent += 1;
        }
        let model = format!("model-{}", rng.gen_range(0..spec.models.max(1)));
        let hardware = format!("hw-{}", rng.gen_range(0..spec.hardware.max(1)));
        let compute = Decimal::new(rng.gen_range(1..=5_000_000), 3);
        let storage = Decimal::new(rng.gen_range(0..=100_000), 2);
        let tenant = ["search", "recs", "ads"][rng.gen_range(0..3)];
        let (event_id, payload) = if format == SourceFormat::Costwatch {
            let event_id = format!("s{}-e{i}", spec.seed);
            let payload = event_json(&event_id, ts, &model, &hardware, compute, storage, Some(tenant));
            truth.accept(&model, &hardware, compute, storage);
            (event_id, payload)
        } else {
            let event_id = token_event_id(format, spec.seed, i);
            let (input, output) = (rng.gen_range(1..=4000u64), rng.gen_range(0..=1000u64));
            let (id, model, hardware) = (event_id.as_str(), model.as_str(), hardware.as_str());
            let event = formats::TokenEvent {
                id,
                ts,
                model,
                hardware,
                input,
                output,
                tenant,
            };
            truth.accept_tokens(format, &event);
            let payload = formats::render(format, &event);
            (event_id, payload)
        };
        sent_good.push(messages.len());
        messages.push(Message { key: event_id, payload });
    }
    truth.expected.messages = messages.len() as u64;
    (messages, truth.finish())
}

/// The ground truth as a load is generated.
struct Truth {
    expected: Expected,
    totals: BTreeMap<(String, String), PairTotal>,
}

impl Truth {
    fn new(seed: u64) -> Self {
        Self {
            expected: Expected {
                seed,
                ..Expected::default()
            },
            totals: BTreeMap::new(),
        }
    }

    /// One token event a correct consumer counts (T and S depend on the profile in force),
    /// with the parts of its message it skips.
    fn accept_tokens(&mut self, format: SourceFormat, e: &formats::TokenEvent<'_>) {
        self.accept(e.model, e.hardware, Decimal::ZERO, Decimal::ZERO);
        let t = self
            .totals
            .get_mut(&(e.model.to_owned(), e.hardware.to_owned()))
            .expect("just counted");
        t.input_tokens += Decimal::from(e.input);
        t.output_tokens += Decimal::from(e.output);
        self.expected.skipped += skipped_per_message(format);
    }

    /// One event a correct consumer counts.
    fn accept(&mut self, model: &str, hardware: &str, compute: Decimal, storage: Decimal) {
        let t = self
            .totals
            .entry((model.to_owned(), hardware.to_owned()))
            .or_insert_with(|| PairTotal {
                model: model.to_owned(),
                hardware: hardware.to_owned(),
                ..PairTotal::default()
            });
        t.events += 1;
        t.compute += compute;
        t.storage += storage;
        self.expected.accepted += 1;
    }

    fn finish(mut self) -> Expected {
        self.expected.totals = self.totals.into_values().collect();
        self.expected
    }
}

/// The id of the `i`th token event: OTLP ids are a trace id and a span id in hex (48 digits),
/// the other formats take any text.
fn token_event_id(format: SourceFormat, seed: u64, i: u64) -> String {
    match format {
        SourceFormat::OtlpJson | SourceFormat::OtlpProto => format!("{seed:016x}{i:016x}{:016x}", i + 1),
        _ => format!("s{seed}-e{i}"),
    }
}

/// Non-GenAI spans per message of `format`, which a consumer skips.
fn skipped_per_message(format: SourceFormat) -> u64 {
    match format {
        SourceFormat::OtlpJson | SourceFormat::OtlpProto => 1,
        _ => 0,
    }
}

/// One event in the producer contract, with an optional tenant label.
fn event_json(
    event_id: &str,
    ts: DateTime<Utc>,
    model: &str,
    hardware: &str,
    compute: Decimal,
    storage: Decimal,
    tenant: Option<&str>,
) -> Vec<u8> {
    let labels = tenant
        .map(|t| format!(r#","labels":{{"tenant":"{t}"}}"#))
        .unwrap_or_default();
    format!(
        r#"{{"event_id":"{event_id}","timestamp":"{}","model":"{model}","hardware":"{hardware}","compute":{compute},"storage":{storage}{labels}}}"#,
        ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
    .into_bytes()
}

/// How many kinds [`hostile`] makes.
const HOSTILE_KINDS: u32 = 8;

/// At most this many 10^18 quantities per load: their pair's total must stay within what a
/// 96-bit decimal holds exactly at 10 fractional digits (7.9e18) for the expected totals.
const MAX_HUGE: u32 = 5;

/// What a hostile message does.
enum Hostile {
    /// Rejected with this reason code.
    Rejected(Message, &'static str),
    /// A valid event on (model-0, hw-0) that must be counted exactly.
    Valid {
        ts: DateTime<Utc>,
        compute: Decimal,
        storage: Decimal,
    },
}

/// One hostile message of `kind`, one match arm per kind. `earlier` is a good message already
/// sent, for a conflicting re-use of its id.
fn hostile(kind: u32, i: u64, spec: &LoadSpec, earlier: Option<&Message>, huge_sent: &mut u32) -> Hostile {
    let id = format!("s{}-x{i}", spec.seed);
    let ts = spec.end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let event = |model: &str, compute: &str, labels: &str| {
        format!(
            r#"{{"event_id":"{id}","timestamp":"{ts}","model":"{model}","hardware":"hw-0","compute":{compute},"storage":1,"labels":{labels}}}"#
        )
        .into_bytes()
    };
    let rejected = |payload: Vec<u8>, reason| {
        Hostile::Rejected(
            Message {
                key: id.clone(),
                payload,
            },
            reason,
        )
    };
    match kind {
        0 => {
            // 16 labels of 128-character keys and values: once a stalled partition.
            let labels: Vec<String> = (0..16)
                .map(|k| format!(r#""{:0>128}":"{}""#, k, "v".repeat(128)))
                .collect();
            rejected(
                event("model-0", "1", &format!("{{{}}}", labels.join(","))),
                "field_too_long",
            )
        }
        1 => {
            let labels: Vec<String> = (0..4).map(|k| format!(r#""k{k}":"{}""#, "😀".repeat(128))).collect();
            rejected(
                event("model-0", "1", &format!("{{{}}}", labels.join(","))),
                "field_too_long",
            )
        }
        2 => rejected(
            event("model-0", "0.1234567890123456789012345678901234567e1", "{}"),
            "out_of_range",
        ),
        3 => rejected(
            format!(r#"["{id}","{ts}","model-0","hw-0",1,1]"#).into_bytes(),
            "malformed_json",
        ),
        4 => {
            // Over the default ingest.max_event_bytes (64 KiB): rejected unparsed, kept bounded.
            let mut payload = event("model-0", "1", "{}");
            payload.extend(std::iter::repeat_n(b' ', 100_000));
            rejected(payload, "oversized")
        }
        5 => match earlier {
            // The id of an event already counted, with other content: not counted again.
            Some(m) => {
                let text = String::from_utf8_lossy(&m.payload).replace("\"storage\":", "\"storage\":1");
                Hostile::Rejected(
                    Message {
                        key: m.key.clone(),
                        payload: text.into_bytes(),
                    },
                    "conflicting_duplicate",
                )
            }
            None => rejected(b"[]".to_vec(), "malformed_json"),
        },
        6 => Hostile::Valid {
            // Minutes ahead of the clock, inside max_future_skew: counted, but it must not move
            // anyone's watermark past the clock.
            ts: Utc::now() + chrono::Duration::seconds(150),
            compute: Decimal::new(25, 1),
            storage: Decimal::ONE,
        },
        _ if *huge_sent < MAX_HUGE => {
            *huge_sent += 1;
            Hostile::Valid {
                ts: spec.end,
                compute: Decimal::from(1_000_000_000_000_000_000u64),
                storage: Decimal::new(1, 10),
            }
        }
        _ => rejected(b"[1]".to_vec(), "malformed_json"),
    }
}

/// One of the malformed kinds, in turn; each is rejected for a different reason.
fn malformed(i: u64, rng: &mut StdRng, now: DateTime<Utc>) -> Message {
    let id = format!("bad-{i}");
    let ts = now.to_rfc3339();
    let payload: Vec<u8> = match rng.gen_range(0..6) {
        0 => b"{this is not json".to_vec(),
        1 => format!(r#"{{"event_id":"{id}","timestamp":"{ts}","hardware":"hw-0","compute":1,"storage":1}}"#)
            .into_bytes(),
        2 => format!(
            r#"{{"event_id":"{id}","timestamp":"{ts}","model":"model-0","hardware":"hw-0","compute":-5,"storage":1}}"#
        )
        .into_bytes(),
        3 => format!(
            r#"{{"event_id":"{id}","timestamp":"{ts}","model":"model-0","hardware":"hw-0","compute":"12","storage":1}}"#
        )
        .into_bytes(),
        4 => {
            let future = (now + chrono::Duration::days(1)).to_rfc3339();
            format!(r#"{{"event_id":"{id}","timestamp":"{future}","model":"model-0","hardware":"hw-0","compute":1,"storage":1}}"#)
                .into_bytes()
        }
        _ => vec![b'{', 0xC3, 0x28, b'}'],
    };
    Message { key: id, payload }
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    ensure_topic_with(brokers, topic, partitions, &[]).await
}

/// [`ensure_topic`] with extra librdkafka properties (TLS, SASL).
pub async fn ensure_topic_with(
    brokers: &str,
    topic: &str,
    partitions: i32,
    properties: &[(String, String)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, properties)
        .create()
        .map_err(|e| anyhow::anyhow!("{}", crate::kafka::scrubbed(&e)))
        .context("cannot create the Kafka admin client")?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&new_topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .with_context(|| format!("cannot create topic {topic} on {brokers}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Failure::new(ExitClass::Unavailable, format!("cannot create topic {name}: {code}")).into())
            }
        }
    }
    Ok(())
}

fn client_config(brokers: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (name, value) in properties {
        config.set(name, value);
    }
    config
}

/// Counts deliveries the broker did not acknowledge.
#[derive(Default)]
struct DeliveryTally {
    failed: Arc<AtomicU64>,
}

impl ClientContext for DeliveryTally {}

impl ProducerContext for DeliveryTally {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends `messages` to `topic`, paced to `rate` per second (0: unpaced); fails if any message
/// was not acknowledged.
pub fn send(brokers: &str, topic: &str, messages: &[Message], rate: u64) -> anyhow::Result<()> {
    send_with(brokers, topic, messages, rate, &[])
}

/// [`send`] with extra librdkafka properties (TLS, SASL), set after loadgen's own.
pub fn send_with(
    brokers: &str,
    topic: &str,
    messages: &[Message],
    rate: u64,
    properties: &[(String, String)],
) -> anyhow::Result<()> {
    let failed = Arc::new(AtomicU64::new(0));
    let mut config = client_config(brokers, &[]);
    config
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .set("message.max.bytes", "2000000");
    for (name, value) in properties {
        config.set(name, value);
    }
    let producer: ThreadedProducer<DeliveryTally> = config
        .create_with_context(DeliveryTally { failed: failed.clone() })
        .map_err(|e| anyhow::anyhow!("{}", crate::kafka::scrubbed(&e)))
        .context("cannot create the Kafka producer")?;
    let started = Instant::now();
    for (i, m) in messages.iter().enumerate() {
        if rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let mut record = BaseRecord::to(topic)
            .key(m.key.as_bytes())
            .payload(m.payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("cannot send to Kafka"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("not every message was delivered within 60s")?;
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        let message = format!(
            "{failed} of {} messages were not acknowledged by the broker",
            messages.len()
        );
        return Err(Failure::new(ExitClass::Unavailable, message).into());
    }
    info!(messages = messages.len(), took = ?started.elapsed(), "sent");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoadSpec {
        LoadSpec {
            count: 2000,
            seed: 7,
            models: 3,
            hardware: 2,
            rate: 0,
            duplicates: 0.05,
            late: 0.02,
            malformed: 0.03,
            hostile: 0.0,
            late_by: Duration::from_secs(600),
            span: Duration::from_secs(600),
            end: "2026-11-29T04:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn every_format_decodes_to_the_expected_token_totals() {
        use crate::ingest::event::Limits;
        use crate::ingest::source::Source;
        for format in SourceFormat::ALL.into_iter().filter(|f| *f != SourceFormat::Costwatch) {
            let spec = LoadSpec { count: 300, ..spec() };
            let (messages, expected) = generate_in(&spec, format);
            let source = Source::new(
                &formats::source(format, "s", "t"),
                crate::pricing::profiles::UsageProfiles::default(),
            );
            let limits = Limits {
                max_event_bytes: 65536,
                max_future_skew: Duration::from_secs(300),
                max_event_age: Duration::from_secs(86400),
            };
            let now = spec.end;
            let (mut accepted, mut rejected, mut skipped) = (0u64, 0u64, 0u64);
            let mut seen = std::collections::HashSet::new();
            let mut input = Decimal::ZERO;
            for m in &messages {
                match source.decode(Some(&m.payload), &limits, now) {
                    Err(_) => rejected += 1,
                    Ok(d) => {
                        skipped += d.skipped;
                        for e in d.events {
                            match e {
                                Err(_) => rejected += 1,
                                Ok(e) if seen.insert(e.event_id.to_string()) => {
                                    accepted += 1;
                                    input += e.tokens.input;
                                }
                                Ok(_) => {}
                            }
                        }
                    }
                }
            }
            let name = format.as_str();
            assert_eq!(accepted, expected.accepted, "{name}");
            assert_eq!(rejected, expected.rejected, "{name}");
            assert_eq!(skipped, expected.skipped, "{name}");
            assert_eq!(
                input,
                expected.totals.iter().map(|t| t.input_tokens).sum::<Decimal>(),
                "{name}"
            );
        }
    }

    #[test]
    fn the_same_seed_generates_the_same_load() {
        let (a, ea) = generate(&spec());
        let (b, eb) = generate(&spec());
        assert_eq!(ea, eb);
        assert!(a.iter().zip(&b).all(|(x, y)| x.payload == y.payload));
    }

    #[test]
    fn expected_totals_add_up() {
        let (messages, e) = generate(&spec());
        assert_eq!(e.messages, 2000);
        assert_eq!(e.accepted + e.duplicates + e.rejected, messages.len() as u64);
        assert_eq!(e.totals.iter().map(|t| t.events).sum::<u64>(), e.accepted);
        assert!(e.duplicates > 0 && e.rejected > 0 && e.late_sent > 0);
    }
}
