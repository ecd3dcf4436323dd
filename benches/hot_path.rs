//! Micro-benchmarks of the per-event hot path and the per-flush work (issue 6).
//!
//! - `decode`: parse + validate one payload (`event::decode`).
//! - `aggregate`: `Aggregator::ingest` over a realistic loadgen mix (decode, dedup, lateness,
//!   window sums), reported per event.
//! - `pricing`: `Rates::price` for one window's sums.
//! - `batch`: one flush batch of K pending keys: `Aggregator::batch` (moves the pending state
//!   out) and `FlushBatch::windows` (merges partitions, sorts by key).
//! - `flush`: one `Store::flush` of K keys (K window upserts, K new dedup ids, 4 partitions)
//!   into a scratch PostgreSQL database; skipped with a message when PostgreSQL is unreachable
//!   (`COSTWATCH_BENCH_DATABASE_URL` names the admin database, default the local one).
//!
//! Run with `cargo bench --bench hot_path`; results and the machine are in BENCHMARKS.md.

use std::hash::{Hash, Hasher};
use std::hint::black_box;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rust_decimal::Decimal;

use costwatch::config::{HardwarePrice, PricingSettings};
use costwatch::domain::{ComputeUnits, HardwareName, StorageUnits, UnitPrice};
use costwatch::ingest::aggregate::{millis, Aggregator, Claim, FlushBatch, IngestRules, SeenIds};
use costwatch::ingest::event::{self, Limits};
use costwatch::ingest::store::WindowLayout;
use costwatch::ingest::window::WindowSize;
use costwatch::loadgen::{self, LoadSpec};
use costwatch::pricing::{PriceBook, Rates};
use costwatch::store::Store;

const PARTITIONS: i32 = 4;
/// The README's documented event, as a producer would send it.
const DOCUMENTED: &[u8] = br#"{"event_id": "req-7f3a", "timestamp": "2026-11-29T03:00:00.123Z", "model": "qwen2-7b-instruct", "hardware": "a100-80g", "compute": 1234.5, "storage": 16.25, "labels": {"tenant": "search"}}"#;

fn end() -> DateTime<Utc> {
    "2026-11-29T04:00:00Z".parse().unwrap()
}

/// What `costwatch run` derives from the default settings.
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

/// The benchmark driver's mix: 50 models x 8 hardware, 2% duplicates, 1% late, 1% malformed.
fn load(count: u64, models: u32, hardware: u32, duplicates: f64, late: f64, malformed: f64) -> Vec<loadgen::Message> {
    let spec = LoadSpec {
        count,
        seed: 42,
        models,
        hardware,
        rate: 0,
        duplicates,
        late,
        malformed,
        hostile: 0.0,
        late_by: Duration::from_secs(600),
        span: Duration::from_secs(600),
        end: end(),
    };
    loadgen::generate(&spec).0
}

/// Stands in for the producer's key partitioner: copies of an event land in one partition.
fn partition_of(key: &str) -> i32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % PARTITIONS as u64) as i32
}

fn fresh_claims() -> Vec<Claim> {
    (0..PARTITIONS)
        .map(|partition| Claim {
            partition,
            epoch: 1,
            next_offset: None,
            watermark: None,
            seen: SeenIds::default(),
            continued: false,
        })
        .collect()
}

fn fresh_aggregator() -> Aggregator {
    let mut agg = Aggregator::new(rules());
    agg.assign(fresh_claims());
    agg
}

/// An aggregator over `claims` holding exactly `keys` pending window keys (one event each, all in
/// one window).
fn aggregator_with_keys(keys: usize, claims: Vec<Claim>) -> Aggregator {
    let mut agg = Aggregator::new(rules());
    agg.assign(claims);
    let now = end();
    for i in 0..keys {
        let payload = format!(
            r#"{{"event_id":"k{i}","timestamp":"2026-11-29T03:59:10.000Z","model":"model-{}","hardware":"hw-{}","compute":{}.125,"storage":{}.5,"labels":{{"tenant":"search"}}}}"#,
            i / 8,
            i % 8,
            i + 1,
            i % 100
        );
        let partition = (i % PARTITIONS as usize) as i32;
        agg.ingest(
            partition,
            (i / PARTITIONS as usize) as i64,
            Some(payload.as_bytes()),
            now,
        );
    }
    agg
}

fn price_book() -> PriceBook {
    PriceBook::from_settings(&PricingSettings {
        currency: "USD".into(),
        hardware: (0..8)
            .map(|h| HardwarePrice {
                name: HardwareName::parse(format!("hw-{h}")).unwrap(),
                compute_price: UnitPrice(Decimal::from_str("0.00025").unwrap()),
                storage_price: UnitPrice(Decimal::from_str("0.00002").unwrap()),
                deployment: None,
                effective_from: None,
            })
            .collect(),
        coefficients: Vec::new(),
    })
}

fn decode(c: &mut Criterion) {
    let limits = rules().limits;
    let now = end();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("documented_event", |b| {
        let documented_now = "2026-11-29T03:01:00Z".parse().unwrap();
        b.iter(|| event::decode(black_box(Some(DOCUMENTED)), &limits, documented_now))
    });
    let messages = load(10_000, 50, 8, 0.02, 0.01, 0.01);
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("loadgen_mix_10k", |b| {
        b.iter(|| {
            for m in &messages {
                let _ = black_box(event::decode(Some(&m.payload), &limits, now));
            }
        })
    });
    group.finish();
}

fn aggregate(c: &mut Criterion) {
    let now = end();
    let load = load(10_000, 50, 8, 0.02, 0.01, 0.01);
    let routed: Vec<(i32, &[u8])> = load
        .iter()
        .map(|m| (partition_of(&m.key), m.payload.as_slice()))
        .collect();
    let mut group = c.benchmark_group("aggregate");
    group.throughput(Throughput::Elements(routed.len() as u64));
    group.bench_function("ingest_loadgen_mix_10k", |b| {
        b.iter_batched_ref(
            fresh_aggregator,
            |agg| {
                let mut offsets = [0i64; PARTITIONS as usize];
                for (partition, payload) in &routed {
                    let offset = &mut offsets[*partition as usize];
                    black_box(agg.ingest(*partition, *offset, Some(payload), now));
                    *offset += 1;
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn pricing(c: &mut Criterion) {
    let rates = Rates {
        compute_price: UnitPrice(Decimal::from_str("0.00025").unwrap()),
        storage_price: UnitPrice(Decimal::from_str("0.00002").unwrap()),
        k1: costwatch::domain::Coefficient(Decimal::from_str("1.1").unwrap()),
        k2: costwatch::domain::Coefficient(Decimal::from_str("0.9").unwrap()),
    };
    // About one minute of one busy pair: 5,000 events of up to 5,000 compute units.
    let compute = ComputeUnits(Decimal::from_str("12500123.457").unwrap());
    let storage = StorageUnits(Decimal::from_str("2500012.25").unwrap());
    let book = price_book();
    let model = costwatch::domain::ModelName::parse("model-7").unwrap();
    let hardware = HardwareName::parse("hw-3").unwrap();
    let window_start = end();
    let mut group = c.benchmark_group("pricing");
    group.throughput(Throughput::Elements(1));
    group.bench_function("price_window", |b| {
        b.iter(|| black_box(&rates).price(black_box(compute), black_box(storage)))
    });
    group.bench_function("lookup_and_price_window", |b| {
        b.iter(|| {
            black_box(&book)
                .rates(black_box(&model), black_box(&hardware), black_box(window_start))
                .map(|r| r.price(compute, storage))
        })
    });
    group.finish();
}

const KEY_COUNTS: [usize; 3] = [100, 1_000, 10_000];

fn batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch");
    for keys in KEY_COUNTS {
        group.throughput(Throughput::Elements(keys as u64));
        // Taking the batch moves the pending state out, so every iteration gets a filled
        // aggregator (built outside the timing). `windows()` is the merge over partitions and
        // the sort by key that the flush writes in.
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, &keys| {
            b.iter_batched(
                || aggregator_with_keys(keys, fresh_claims()),
                |mut agg| {
                    let batch = agg.batch(None);
                    // The merged list borrows the batch's keys; dropping it is freeing one Vec.
                    let merged = batch.windows().len();
                    (agg, batch, merged)
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// A scratch database for the flush bench, dropped when the bench ends.
struct ScratchDb {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchDb {
    async fn create() -> Result<Self, String> {
        let admin_url = std::env::var("COSTWATCH_BENCH_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("cw_bench_{}", std::process::id());
        let url = format!(
            "{}/{name}",
            &admin_url[..admin_url.rfind('/').ok_or("bad database URL")?]
        );
        let admin = Store::connect_lazy(&admin_url, 2).map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(8), admin.ping())
            .await
            .map_err(|_| "no answer within 8s".to_string())?
            .map_err(|e| e.to_string())?;
        Store::create_database_if_missing(&url)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { admin_url, name, url })
    }

    async fn drop_database(&self) {
        if let Ok(admin) = Store::connect_lazy(&self.admin_url, 2) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .execute(admin.pool())
                .await;
        }
    }
}

/// The template with fresh dedup ids, as the next flush interval would bring.
fn with_fresh_ids(template: &FlushBatch, round: u64) -> FlushBatch {
    let mut batch = template.clone();
    for part in &mut batch.parts {
        let mut fresh = SeenIds::default();
        for (id, t) in part.seen.iter() {
            fresh.push(&format!("{id}-r{round}"), t.timestamp_millis(), 1);
        }
        part.seen = fresh;
    }
    batch
}

/// Chains the batch onto what PostgreSQL holds: a flush applies only on top of the offsets
/// stored by the previous one.
fn chain(batch: &mut FlushBatch, stored: Option<i64>, next: i64) {
    for part in &mut batch.parts {
        part.progress.prev_offset = stored;
        part.progress.next_offset = next;
    }
}

fn flush(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // sqlx pools spawn their maintenance tasks on the ambient runtime.
    let _context = runtime.enter();
    let scratch = match runtime.block_on(ScratchDb::create()) {
        Ok(db) => db,
        Err(error) => {
            eprintln!("flush: skipped, PostgreSQL is unreachable ({error})");
            return;
        }
    };
    let store = Store::connect_lazy(&scratch.url, 4).unwrap();
    runtime
        .block_on(store.migrate())
        .expect("migrations apply to the scratch database");
    let prices = price_book();
    let layout = WindowLayout {
        size: rules().window,
        allowed_lateness_ms: rules().allowed_lateness_ms,
        max_rejected_payload_bytes: 4096,
    };
    let partitions: Vec<i32> = (0..PARTITIONS).collect();

    let mut group = c.benchmark_group("flush");
    group.sample_size(10);
    for keys in KEY_COUNTS {
        let topic = format!("bench-{keys}");
        // The flush is fenced by the claim's epochs, so the aggregator starts from the claim.
        let claims = runtime
            .block_on(store.claim(&topic, "bench", &partitions, rules().dedup_horizon_ms))
            .unwrap();
        let mut agg = aggregator_with_keys(keys, claims);
        let template = agg.batch(None);
        let mut round = 0u64;
        let mut stored: Option<i64> = None;
        group.throughput(Throughput::Elements(keys as u64));
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
            b.iter_batched(
                || {
                    round += 1;
                    with_fresh_ids(&template, round)
                },
                |mut batch| {
                    let next = stored.map_or(1, |s| s + 1);
                    chain(&mut batch, stored, next);
                    runtime.block_on(store.flush(&topic, &batch, &prices, layout)).unwrap();
                    stored = Some(next);
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
    runtime.block_on(store.pool().close());
    runtime.block_on(scratch.drop_database());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = decode, aggregate, pricing, batch, flush
}
criterion_main!(benches);
