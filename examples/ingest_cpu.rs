//! The consumer's own per-event work without Kafka or PostgreSQL: a loadgen topic (the same mix
//! as `scripts/bench.sh`) fed through `Aggregator::ingest` partition by partition, with a flush
//! batch taken, merged and reported to the metrics every 50,000 messages as the consumer and
//! its writer thread do (the SQL itself is not run). For
//! instruction counts that repeat on a busy machine:
//!
//!     cargo build --release --example ingest_cpu
//!     valgrind --tool=callgrind --callgrind-out-file=cg.out \
//!         target/release/examples/ingest_cpu --events 200000 [--format openai]
//!     callgrind_annotate cg.out | head -60
//!
//! Without valgrind it prints the CPU time per event of the ingest loop itself.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use costwatch::config::{HardwarePrice, PricingSettings, SourceFormat, UsageProfileSettings};
use costwatch::domain::{HardwareName, UnitPrice};
use costwatch::ingest::aggregate::{millis, Aggregator, Claim, IngestRules, SeenIds};
use costwatch::ingest::event::Limits;
use costwatch::ingest::source::Source;
use costwatch::ingest::window::WindowSize;
use costwatch::loadgen::{self, formats, LoadSpec};
use costwatch::pricing::profiles::UsageProfiles;
use costwatch::pricing::PriceBook;
use costwatch::telemetry::{self, WindowUsage};

const PARTITIONS: i32 = 4;

fn rules() -> IngestRules {
    IngestRules {
        max_rejected_payload_bytes: 4096,
        limits: Limits {
            max_event_bytes: 65_536,
            max_future_skew: Duration::from_secs(300),
            max_event_age: Duration::from_secs(7 * 86_400),
        },
        window: WindowSize::new(Duration::from_secs(60)),
        allowed_lateness_ms: millis(Duration::from_secs(300)),
        dedup_horizon_ms: millis(Duration::from_secs(3_600)),
    }
}

/// The prices `scripts/bench.sh` configures.
fn price_book() -> PriceBook {
    PriceBook::from_settings(&PricingSettings {
        currency: "USD".into(),
        hardware: (0..8)
            .map(|h| HardwarePrice {
                name: HardwareName::parse(format!("hw-{h}")).unwrap(),
                compute_price: UnitPrice("0.00025".parse().unwrap()),
                storage_price: UnitPrice("0.00002".parse().unwrap()),
                deployment: None,
                effective_from: None,
            })
            .collect(),
        coefficients: Vec::new(),
    })
}

fn partition_of(key: &str) -> i32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % PARTITIONS as u64) as i32
}

fn main() {
    let mut events = 200_000u64;
    let mut format = SourceFormat::Costwatch;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--events" => events = args.next().and_then(|v| v.parse().ok()).expect("--events N"),
            "--format" => {
                let name = args.next().expect("--format NAME");
                format = SourceFormat::ALL
                    .into_iter()
                    .find(|f| f.as_str() == name)
                    .expect("a format name");
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let end: DateTime<Utc> = Utc::now();
    let spec = LoadSpec {
        count: events,
        seed: 42,
        models: 50,
        hardware: 8,
        rate: 0,
        duplicates: 0.02,
        late: 0.01,
        malformed: 0.01,
        hostile: 0.0,
        late_by: Duration::from_secs(600),
        span: Duration::from_secs(600),
        end,
    };
    let (messages, expected) = loadgen::generate_in(&spec, format);
    let source = (format != SourceFormat::Costwatch).then(|| {
        let profiles = UsageProfiles::new(&[UsageProfileSettings {
            name: Some("bench".into()),
            model: "*".into(),
            hardware: "*".into(),
            compute_per_input_token: "0.5".parse().unwrap(),
            compute_per_output_token: "2".parse().unwrap(),
            storage_per_token: "0.001".parse().unwrap(),
        }]);
        Arc::new(Source::new(&formats::source(format, "s", "t"), profiles))
    });
    let mut agg = Aggregator::for_source(rules(), source);
    agg.assign(
        (0..PARTITIONS)
            .map(|partition| Claim {
                partition,
                epoch: 1,
                next_offset: None,
                watermark: None,
                seen: SeenIds::default(),
                continued: false,
            })
            .collect(),
    );
    let routed: Vec<(i32, &[u8])> = messages
        .iter()
        .map(|m| (partition_of(&m.key), m.payload.as_slice()))
        .collect();

    let prices = price_book();
    let started = Instant::now();
    let mut offsets = [0i64; PARTITIONS as usize];
    let (mut accepted, mut windows) = (0u64, 0usize);
    for (i, (partition, payload)) in routed.iter().enumerate() {
        let offset = &mut offsets[*partition as usize];
        if matches!(
            agg.ingest(*partition, *offset, Some(payload), end),
            costwatch::ingest::aggregate::Outcome::Accepted { .. }
        ) {
            accepted += 1;
        }
        *offset += 1;
        if (i + 1) % 50_000 == 0 || i + 1 == routed.len() {
            let batch = agg.batch(None);
            let merged = batch.windows();
            windows += merged.len();
            let usage = merged.iter().map(|(key, sums)| WindowUsage {
                model: &key.model,
                hardware: &key.hardware,
                start: costwatch::ingest::window::from_millis(key.start_ms),
                events: sums.events,
                compute: sums.compute,
                storage: sums.storage,
                priceable: !key.usage_from_tokens || key.profile.is_some(),
                labels: &key.labels,
            });
            telemetry::flush_committed(
                batch.counts(),
                batch.rejected_by_code(),
                usage,
                &prices,
                started.elapsed(),
            );
            agg.flushed(&batch);
        }
    }
    let took = started.elapsed();
    println!(
        "{} messages ({} accepted, {} expected) into {windows} window rows in {:.3}s: {:.3} us/message",
        routed.len(),
        accepted,
        expected.accepted,
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / routed.len() as f64
    );
}
