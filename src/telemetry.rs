//! Logs and metrics: metric names in one place, described once, and one function per noteworthy
//! event that logs and counts it together.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use rust_decimal::prelude::ToPrimitive;

use crate::aggregate::FlushBatch;
use crate::pricing::PriceBook;

pub const EVENTS_TOTAL: &str = "costwatch_events_total";
pub const REJECTED_TOTAL: &str = "costwatch_rejected_events_total";
pub const COMPUTE_UNITS_TOTAL: &str = "costwatch_compute_units_total";
pub const STORAGE_UNITS_TOTAL: &str = "costwatch_storage_units_total";
pub const COST_TOTAL: &str = "costwatch_cost_total";
pub const UNPRICED_EVENTS_TOTAL: &str = "costwatch_unpriced_events_total";
pub const FLUSH_DURATION: &str = "costwatch_flush_duration_seconds";
pub const LAST_FLUSH: &str = "costwatch_last_flush_timestamp_seconds";
pub const FLUSH_ERRORS_TOTAL: &str = "costwatch_flush_errors_total";
pub const FENCED_TOTAL: &str = "costwatch_fenced_partitions_total";
pub const BROKER_ERRORS_TOTAL: &str = "costwatch_broker_errors_total";
pub const ASSIGNED_PARTITIONS: &str = "costwatch_assigned_partitions";
pub const START_REWINDS_TOTAL: &str = "costwatch_start_rewinds_total";
pub const WATERMARK: &str = "costwatch_watermark_timestamp_seconds";

/// Sets up `tracing` output; `RUST_LOG` overrides the default level (`info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,librdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Describes every metric once, for the `# HELP` lines.
pub fn describe_metrics() {
    describe_counter!(
        EVENTS_TOTAL,
        "Messages consumed, by outcome: accepted, late (accepted, behind the watermark), duplicate, rejected"
    );
    describe_counter!(REJECTED_TOTAL, "Rejected messages by reason code");
    describe_counter!(COMPUTE_UNITS_TOTAL, "Compute units (T) accounted");
    describe_counter!(STORAGE_UNITS_TOTAL, "Storage units (S) accounted");
    describe_counter!(COST_TOTAL, "Money accounted, by component (compute, storage)");
    describe_counter!(UNPRICED_EVENTS_TOTAL, "Accepted events on hardware without a price");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Time to write one flush to PostgreSQL");
    describe_gauge!(LAST_FLUSH, Unit::Seconds, "Unix time of the last successful flush");
    describe_counter!(FLUSH_ERRORS_TOTAL, "Flushes that failed and will be retried");
    describe_counter!(
        FENCED_TOTAL,
        "Partitions whose flush was refused because another instance claimed them"
    );
    describe_counter!(BROKER_ERRORS_TOTAL, "Errors reported by the Kafka client");
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions this instance owns");
    describe_gauge!(
        WATERMARK,
        Unit::Seconds,
        "Lowest event-time watermark over owned partitions"
    );
}

/// Counts a committed flush. Called only after COMMIT, so counters never run ahead of the
/// database: their increase over a range matches `usage_costs` for that range.
pub fn flush_committed(batch: &FlushBatch, prices: &PriceBook, took: Duration) {
    let c = &batch.counts;
    counter!(EVENTS_TOTAL, "outcome" => "accepted").increment(c.accepted - c.late);
    counter!(EVENTS_TOTAL, "outcome" => "late").increment(c.late);
    counter!(EVENTS_TOTAL, "outcome" => "duplicate").increment(c.duplicate);
    counter!(EVENTS_TOTAL, "outcome" => "rejected").increment(c.rejected);
    for (code, n) in &batch.rejected_by_code {
        counter!(REJECTED_TOTAL, "reason" => *code).increment(*n);
    }
    for (key, sums) in &batch.windows {
        let labels = [
            ("model", key.model.as_str().to_owned()),
            ("hardware", key.hardware.as_str().to_owned()),
        ];
        add_f64(COMPUTE_UNITS_TOTAL, &labels, sums.compute.value());
        add_f64(STORAGE_UNITS_TOTAL, &labels, sums.storage.value());
        match prices.rates(&key.model, &key.hardware) {
            Some(rates) => {
                if let Ok(cost) = rates.price(sums.compute, sums.storage) {
                    let currency = prices.currency().to_owned();
                    for (component, amount) in [("compute", cost.compute_cost), ("storage", cost.storage_cost)] {
                        let l = [
                            labels[0].clone(),
                            labels[1].clone(),
                            ("component", component.to_owned()),
                            ("currency", currency.clone()),
                        ];
                        add_f64(COST_TOTAL, &l, amount.value());
                    }
                }
            }
            None => counter!(UNPRICED_EVENTS_TOTAL, &labels).increment(sums.events as u64),
        }
    }
    histogram!(FLUSH_DURATION).record(took.as_secs_f64());
    gauge!(LAST_FLUSH).set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
}

/// Prometheus counters are floats; the exact figure lives in PostgreSQL. The `metrics` crate's
/// counters are integers, so fractional amounts go through a float gauge used as a counter.
fn add_f64(name: &'static str, labels: &[(&'static str, String)], amount: rust_decimal::Decimal) {
    gauge!(name, labels).increment(amount.to_f64().unwrap_or(0.0));
}

pub fn flush_failed() {
    counter!(FLUSH_ERRORS_TOTAL).increment(1);
}

pub fn partitions_fenced(n: usize) {
    counter!(FENCED_TOTAL).increment(n as u64);
}

pub fn broker_error() {
    counter!(BROKER_ERRORS_TOTAL).increment(1);
}

pub fn assignment(owned: usize, watermark: Option<chrono::DateTime<chrono::Utc>>) {
    gauge!(ASSIGNED_PARTITIONS).set(owned as f64);
    if let Some(w) = watermark {
        gauge!(WATERMARK).set(w.timestamp_millis() as f64 / 1000.0);
    }
}

pub fn start_rewound() {
    counter!(START_REWINDS_TOTAL).increment(1);
}
