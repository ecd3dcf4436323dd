//! Logs and metrics: metric names in one place, described once, and one function per noteworthy
//! event that logs and counts it together.

mod process;

use std::time::Duration;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use rust_decimal::Decimal;

use crate::domain::{ComputeUnits, HardwareName, ModelName, Money, StorageUnits};
use crate::error_class::ErrorClass;

/// One window row of a committed flush, as the usage metrics need it.
#[derive(Debug, Clone, Copy)]
pub struct WindowUsage<'a> {
    /// The row's model; its metric label is `other` once `metrics.max_models` other models have one.
    pub model: &'a ModelName,
    /// The row's hardware; its metric label is `other` once `metrics.max_hardware` other targets have one.
    pub hardware: &'a HardwareName,
    /// The window's start: which rates of the price book apply.
    pub start: chrono::DateTime<chrono::Utc>,
    /// Accepted events in the row; counted as unpriced events when the hardware has no price.
    pub events: i64,
    /// ΣT of the row.
    pub compute: ComputeUnits,
    /// ΣS of the row.
    pub storage: StorageUnits,
    /// False for tokens no usage profile turned into T and S: unpriced whatever the hardware.
    pub priceable: bool,
    /// The row's event labels; those named in `metrics.label_dimensions` become metric labels.
    pub labels: &'a BTreeMap<String, String>,
}
use crate::pricing::{CoefficientSource, PriceBook};

/// Messages of a flush by outcome, for `costwatch_events_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// Accepted messages, late ones included.
    pub accepted: u64,
    /// Accepted messages that were late (behind the watermark by more than the allowed lateness).
    pub late: u64,
    /// Messages skipped as copies of a counted `event_id`.
    pub duplicate: u64,
    /// Messages refused (kept in `rejected_events`).
    pub rejected: u64,
    /// Parts of messages without usage, skipped (OTLP spans without GenAI usage, CloudEvents
    /// of other types).
    pub skipped: u64,
}

impl OutcomeCounts {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &OutcomeCounts) {
        self.accepted += o.accepted;
        self.late += o.late;
        self.duplicate += o.duplicate;
        self.rejected += o.rejected;
        self.skipped += o.skipped;
    }
}

/// Counter, label `outcome`: messages consumed by what happened to them.
pub const EVENTS_TOTAL: &str = "costwatch_events_total";
/// Counter, label `reason`: rejected messages by [`RejectCode`](crate::ingest::event::RejectCode).
pub const REJECTED_TOTAL: &str = "costwatch_rejected_events_total";
/// Exact counter, labels `model`, `hardware`: compute units (T) accounted.
pub const COMPUTE_UNITS_TOTAL: &str = "costwatch_compute_units_total";
/// Exact counter, labels `model`, `hardware`: storage units (S) accounted.
pub const STORAGE_UNITS_TOTAL: &str = "costwatch_storage_units_total";
/// Exact counter, labels `model`, `hardware`, `component`, `currency`: money accounted, the same sums as `usage_costs`.
pub const COST_TOTAL: &str = "costwatch_cost_total";
/// The part of [`COST_TOTAL`] priced with the assumed k1 = k2 = 1 (nothing configured or
/// calibrated for the pair), with the same labels.
pub const ASSUMED_COST_TOTAL: &str = "costwatch_assumed_cost_total";
/// Counter, labels `model`, `hardware`: accepted events on hardware without a price.
pub const UNPRICED_EVENTS_TOTAL: &str = "costwatch_unpriced_events_total";
/// Histogram, seconds: time to write one flush.
pub const FLUSH_DURATION: &str = "costwatch_flush_duration_seconds";
/// Gauge, Unix seconds: when the last flush committed.
pub const LAST_FLUSH: &str = "costwatch_last_flush_timestamp_seconds";
/// Counter, label `class` (`transient`, `permanent`): failed flushes.
pub const FLUSH_ERRORS_TOTAL: &str = "costwatch_flush_errors_total";
/// Gauge, labels `topic`, `partition`: 1 while the partition is stalled (see `ingest.stall_after`).
pub const PARTITION_STALLED: &str = "costwatch_partition_stalled";
/// Counter: history partitions dropped by retention, by `table`.
pub const PARTITIONS_DROPPED_TOTAL: &str = "costwatch_history_partitions_dropped_total";
/// Counter: history partitions past retention kept because the next tier did not hold exactly
/// what they held (never expected; see the log).
pub const PARTITIONS_KEPT_TOTAL: &str = "costwatch_history_partitions_kept_total";
/// Gauge: when retention last ran to the end (Unix seconds).
pub const RETENTION_LAST_RUN: &str = "costwatch_retention_last_run_timestamp_seconds";
/// Counter: rejected messages deleted after `retention.rejected`.
pub const REJECTED_PRUNED_TOTAL: &str = "costwatch_rejected_pruned_total";
/// Counter: partitions whose flush was fenced because another instance claimed them.
pub const FENCED_TOTAL: &str = "costwatch_fenced_partitions_total";
/// Counter: errors reported by the Kafka client.
pub const BROKER_ERRORS_TOTAL: &str = "costwatch_broker_errors_total";
/// Gauge: partitions this instance owns.
pub const ASSIGNED_PARTITIONS: &str = "costwatch_assigned_partitions";
/// Gauge: event ids held in memory for dedup.
pub const DEDUP_IDS: &str = "costwatch_dedup_ids";
/// Counter: partition starts read again from further back (the broker began past the stored offset).
pub const START_REWINDS_TOTAL: &str = "costwatch_start_rewinds_total";
/// Gauge, Unix seconds: the lowest event-time watermark over owned partitions.
pub const WATERMARK: &str = "costwatch_watermark_timestamp_seconds";
/// Gauge, seconds: wall clock minus that watermark.
pub const WATERMARK_DELAY: &str = "costwatch_watermark_delay_seconds";
/// Gauge, labels `topic`, `partition`: messages between the stored offset and the log end.
pub const CONSUMER_LAG: &str = "costwatch_consumer_lag";
/// Counter: PostgreSQL errors of flushes and partition claims.
pub const DATABASE_ERRORS_TOTAL: &str = "costwatch_database_errors_total";
/// Gauge: the highest coefficient version the price book holds (0 without versions).
pub const COEFFICIENT_VERSION: &str = "costwatch_coefficient_version";
/// Counter: times new coefficient versions were loaded into the running price book.
pub const COEFFICIENT_RELOADS_TOTAL: &str = "costwatch_coefficient_reloads_total";
/// Gauge, label `model`: what the model would save on its cheapest candidate hardware.
pub const POTENTIAL_SAVINGS: &str = "costwatch_potential_savings";
/// Gauge, label `budget`: the budget's amount for its period.
pub const BUDGET_AMOUNT: &str = "costwatch_budget_amount";
/// Gauge, label `budget`: priced spend so far this period.
pub const BUDGET_SPEND: &str = "costwatch_budget_spend";
/// Gauge, label `budget`: projected spend at period end (only with `forecast = true`).
pub const BUDGET_FORECAST: &str = "costwatch_budget_forecast";
/// Gauge, label `budget`: spend divided by amount.
pub const BUDGET_UTILIZATION: &str = "costwatch_budget_utilization_ratio";
/// Gauge, label `kind`: budget alerts firing.
pub const ALERTS_FIRING: &str = "costwatch_alerts_firing";
/// Gauge: 1 on the instance that holds the alerting lock, 0 elsewhere.
pub const ALERTING_LEADER: &str = "costwatch_alerting_leader";
/// Counter, labels `receiver`, `outcome` (`ok`, `error`): posts to alert receivers.
pub const NOTIFICATIONS_TOTAL: &str = "costwatch_alert_notifications_total";
/// Gauge: alert notifications no receiver has accepted yet (set by the leader).
pub const DELIVERIES_PENDING: &str = "costwatch_alert_deliveries_pending";
/// Gauge, always 1, labels `version`, `revision`, `rustc`: which build runs.
pub const BUILD_INFO: &str = "costwatch_build_info";
/// 1 when the last configuration reload (or the start) succeeded, 0 when it failed.
pub const CONFIG_RELOAD_SUCCESSFUL: &str = "costwatch_config_last_reload_successful";
/// When the configuration was last loaded successfully (the start, or a reload).
pub const CONFIG_RELOAD_SUCCESS_TIME: &str = "costwatch_config_last_reload_success_timestamp_seconds";

/// Sets up `tracing` output on stderr in `format`; `RUST_LOG` overrides the default level
/// (`info`).
pub fn init_logging(format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,librdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        // Fields at the top level next to `message` (not under "fields"), which is what log
        // collectors index without a parsing rule; spans are not used, so none are written.
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

/// Describes every metric once, for the `# HELP` lines, and starts the label-free counters at
/// zero so that dashboards and `rate()` see them before the first error happens. A table of
/// every metric's help text, long because there are that many metrics; each entry is one line
/// of `/metrics` documentation, kept together so that none is forgotten.
pub fn describe_metrics() {
    process::mark_start();
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which build runs: version, git revision, rustc version"
    );
    gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "revision" => env!("COSTWATCH_GIT_REVISION"),
        "rustc" => env!("COSTWATCH_RUSTC_VERSION"),
    )
    .set(1.0);
    for outcome in ["accepted", "late", "duplicate", "rejected", "skipped"] {
        counter!(EVENTS_TOTAL, "outcome" => outcome).increment(0);
    }
    for class in [ErrorClass::Transient, ErrorClass::Permanent] {
        counter!(FLUSH_ERRORS_TOTAL, "class" => class.as_str()).increment(0);
    }
    for name in [
        REJECTED_PRUNED_TOTAL,
        DATABASE_ERRORS_TOTAL,
        BROKER_ERRORS_TOTAL,
        FENCED_TOTAL,
        START_REWINDS_TOTAL,
        COEFFICIENT_RELOADS_TOTAL,
    ] {
        counter!(name).increment(0);
    }
    describe_counter!(
        EVENTS_TOTAL,
        "Messages consumed, by outcome: accepted, late (accepted, behind the watermark), duplicate, rejected, skipped (no usage in it: non-GenAI spans, CloudEvents of other types)"
    );
    describe_counter!(REJECTED_TOTAL, "Rejected messages by reason code");
    describe_gauge!(
        BUDGET_AMOUNT,
        "A budget's amount for its current period, in the pricing currency"
    );
    describe_gauge!(
        BUDGET_SPEND,
        "Priced spend in a budget's scope so far this period (from PostgreSQL)"
    );
    describe_gauge!(
        BUDGET_FORECAST,
        "Projected end-of-period spend of a budget (multi-window burn rate; only with forecast = true)"
    );
    describe_gauge!(BUDGET_UTILIZATION, "Spend so far divided by the budget's amount");
    describe_gauge!(ALERTS_FIRING, "Budget alerts firing, by kind (from PostgreSQL)");
    describe_gauge!(
        ALERTING_LEADER,
        "1 on the instance that holds the alerting lock and sends alerts, 0 elsewhere"
    );
    describe_counter!(
        NOTIFICATIONS_TOTAL,
        "Posts to alert receivers (alertmanager or a webhook name), by outcome: ok, error"
    );
    describe_gauge!(
        DELIVERIES_PENDING,
        "Alert notifications not yet accepted by their receiver (leader only)"
    );
    describe_gauge!(
        CONFIG_RELOAD_SUCCESSFUL,
        "1 when the last configuration reload (SIGHUP, POST /-/reload) or the start succeeded, 0 when it failed"
    );
    describe_gauge!(
        CONFIG_RELOAD_SUCCESS_TIME,
        "When the configuration was last loaded successfully (the start or a reload)"
    );
    describe_counter!(
        UNPRICED_EVENTS_TOTAL,
        "Accepted events on hardware without a price, or with tokens no usage profile prices"
    );
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Time to write one flush to PostgreSQL");
    describe_gauge!(LAST_FLUSH, Unit::Seconds, "Unix time of the last successful flush");
    describe_counter!(
        FLUSH_ERRORS_TOTAL,
        "Failed flushes by error class: transient (retried with backoff) or permanent (written again \
         with the refused rows isolated; a second permanent failure stops costwatch)"
    );
    describe_gauge!(
        PARTITION_STALLED,
        "1 while a partition's stored offset has not moved for ingest.stall_after although it has messages to read"
    );
    describe_counter!(
        REJECTED_PRUNED_TOTAL,
        "Rejected messages deleted after retention.rejected"
    );
    describe_counter!(
        PARTITIONS_DROPPED_TOTAL,
        "History partitions dropped by retention, by table (window_usage, usage_hourly, usage_daily)"
    );
    describe_counter!(
        PARTITIONS_KEPT_TOTAL,
        "History partitions past retention kept because the next tier did not hold exactly what they held"
    );
    describe_gauge!(RETENTION_LAST_RUN, "When retention last ran to the end (Unix seconds)");
    describe_counter!(
        FENCED_TOTAL,
        "Partitions whose flush was refused because another instance claimed them"
    );
    describe_counter!(BROKER_ERRORS_TOTAL, "Errors reported by the Kafka client");
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions this instance owns");
    describe_gauge!(
        DEDUP_IDS,
        "Event ids held in memory for dedup (owned partitions, inside ingest.dedup_horizon)"
    );
    describe_gauge!(
        COEFFICIENT_VERSION,
        "Highest calibrated coefficient version the price book holds (0: configured coefficients only)"
    );
    describe_counter!(
        COEFFICIENT_RELOADS_TOTAL,
        "Times new calibrated coefficient versions were loaded into the running price book"
    );
    describe_gauge!(
        POTENTIAL_SAVINGS,
        "Per model: its actual cost over recommendations.savings_window minus its cost on the cheapest \
         candidate hardware target, at least 0 (0 also when its actual cost is unknown), in pricing.currency"
    );
    describe_gauge!(
        WATERMARK,
        Unit::Seconds,
        "Lowest event-time watermark over owned partitions"
    );
    describe_gauge!(
        WATERMARK_DELAY,
        Unit::Seconds,
        "Wall clock minus the lowest event-time watermark over owned partitions"
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Messages between the offset stored in PostgreSQL and the partition's log end (from librdkafka statistics)"
    );
    describe_counter!(
        DATABASE_ERRORS_TOTAL,
        "PostgreSQL errors: failed flushes and failed partition claims (all retried)"
    );
    describe_counter!(
        START_REWINDS_TOTAL,
        "Partition starts read again from further back because the broker began past the stored offset"
    );
}

/// Records a configuration load, as Prometheus does: whether the last one worked and, if it
/// did, when. The start counts as a successful load.
pub fn config_reloaded(ok: bool) {
    gauge!(CONFIG_RELOAD_SUCCESSFUL).set(if ok { 1.0 } else { 0.0 });
    if ok {
        gauge!(CONFIG_RELOAD_SUCCESS_TIME).set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    }
}

/// One budget status's gauge values: a budget, or one split of a budget with `split_by`.
pub struct BudgetGauges<'a> {
    /// The budget's name: the `budget` label.
    pub name: &'a str,
    /// The split's labels (`tenant` = `search-a`), each a gauge label; empty without `split_by`.
    pub split: &'a BTreeMap<String, String>,
    /// The budget's amount per period.
    pub amount: Money,
    /// Priced spend this period.
    pub spend: Money,
    /// The projected end-of-period spend, when the budget forecasts.
    pub forecast: Option<Money>,
}

/// Exports each budget's standing. Splits keep their own label values up to
/// `metrics.max_label_values` per budget (the first seen keep them); the rest are summed into
/// one series whose split labels read `other` (its utilization is their spend over their
/// amounts). Prometheus values are floats; the exact figures are in `/api/v1/budgets`.
pub fn budget_statuses<'a>(statuses: impl IntoIterator<Item = BudgetGauges<'a>>) {
    // Per label set: amount, spend and forecast, summed over the splits it stands for.
    type Sums = (Decimal, Decimal, Option<Decimal>);
    let mut series: BTreeMap<Vec<(String, String)>, Sums> = BTreeMap::new();
    {
        let mut caps = budget_caps().lock().unwrap_or_else(|p| p.into_inner());
        let max = caps.max;
        for s in statuses {
            let values: Vec<String> = s.split.values().cloned().collect();
            let admitted = caps.seen.entry(s.name.to_owned()).or_default();
            let own = admitted.contains(&values) || admitted.len() < max && admitted.insert(values);
            let mut labels = vec![("budget".to_owned(), s.name.to_owned())];
            for (name, value) in s.split {
                let value = if own { value.clone() } else { OTHER.to_owned() };
                labels.push((name.clone(), value));
            }
            // Every split of a budget forecasts or none does, so a sum is all or nothing.
            let sums = series.entry(labels).or_default();
            sums.0 += s.amount.value();
            sums.1 += s.spend.value();
            sums.2 = s.forecast.map(|f| sums.2.unwrap_or_default() + f.value());
        }
    }
    use rust_decimal::prelude::ToPrimitive;
    let f = |d: Decimal| d.to_f64().unwrap_or(f64::NAN);
    for (labels, (amount, spend, forecast)) in series {
        let labels: Vec<metrics::Label> = labels.into_iter().map(|(k, v)| metrics::Label::new(k, v)).collect();
        gauge!(BUDGET_AMOUNT, labels.clone()).set(f(amount));
        gauge!(BUDGET_SPEND, labels.clone()).set(f(spend));
        let utilization = if amount.is_zero() {
            Decimal::ZERO
        } else {
            spend / amount
        };
        gauge!(BUDGET_UTILIZATION, labels.clone()).set(f(utilization));
        if let Some(forecast) = forecast {
            gauge!(BUDGET_FORECAST, labels).set(f(forecast));
        }
    }
}

/// The split values that have their own budget gauge labels, per budget.
struct BudgetCaps {
    max: usize,
    seen: std::collections::HashMap<String, HashSet<Vec<String>>>,
}

fn budget_caps() -> &'static Mutex<BudgetCaps> {
    static CAPS: OnceLock<Mutex<BudgetCaps>> = OnceLock::new();
    CAPS.get_or_init(|| {
        Mutex::new(BudgetCaps {
            max: 100,
            seen: std::collections::HashMap::new(),
        })
    })
}

/// Starts `costwatch_rejected_events_total` at zero for every reason code, so that dashboards
/// and `rate()` see each one before the first rejection.
pub fn rejection_reasons(reasons: impl IntoIterator<Item = &'static str>) {
    for reason in reasons {
        counter!(REJECTED_TOTAL, "reason" => reason).increment(0);
    }
}

/// Sets how many alerts of `kind` fire, as PostgreSQL holds them.
pub fn alerts_firing(kind: &'static str, n: i64) {
    gauge!(ALERTS_FIRING, "kind" => kind).set(n as f64);
}

/// Sets whether this instance leads alerting.
pub fn alerting_leader(leader: bool) {
    gauge!(ALERTING_LEADER).set(if leader { 1.0 } else { 0.0 });
}

/// Counts one post to `receiver`, by whether it was accepted.
pub fn notification(receiver: &str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(NOTIFICATIONS_TOTAL, "receiver" => receiver.to_owned(), "outcome" => outcome).increment(1);
}

/// Sets how many notifications wait for delivery.
pub fn deliveries_pending(n: i64) {
    gauge!(DELIVERIES_PENDING).set(n as f64);
}

/// Counts a committed flush. Called only after COMMIT, so counters never run ahead of the
/// database: their increase over a range matches `usage_costs` for that range. `windows` are
/// the window rows the flush stored (rows PostgreSQL refused are not among them; the caller
/// counts their events as rejected in `counts` and `rejected_by_code`).
pub fn flush_committed<'a>(
    counts: OutcomeCounts,
    rejected_by_code: BTreeMap<&'static str, u64>,
    windows: impl IntoIterator<Item = WindowUsage<'a>>,
    prices: &PriceBook,
    took: Duration,
) {
    let c = counts;
    counter!(EVENTS_TOTAL, "outcome" => "accepted").increment(c.accepted - c.late);
    counter!(EVENTS_TOTAL, "outcome" => "late").increment(c.late);
    counter!(EVENTS_TOTAL, "outcome" => "duplicate").increment(c.duplicate);
    counter!(EVENTS_TOTAL, "outcome" => "rejected").increment(c.rejected);
    counter!(EVENTS_TOTAL, "outcome" => "skipped").increment(c.skipped);
    for (code, n) in rejected_by_code {
        counter!(REJECTED_TOTAL, "reason" => code).increment(n);
    }
    let series = sum_by_series(windows, prices);
    let ledger = ledger();
    let mut inner = ledger.inner.lock().unwrap_or_else(|p| p.into_inner());
    for (w, sums) in series {
        let model = inner.cap.model(w.model.as_str());
        let hardware = inner.cap.hardware(w.hardware.as_str());
        let mut pair: Labels = vec![("model".into(), model), ("hardware".into(), hardware)];
        pair.extend(inner.cap.dimensions(w.labels));
        inner.add(COMPUTE_UNITS_TOTAL, pair.clone(), sums.compute);
        inner.add(STORAGE_UNITS_TOTAL, pair.clone(), sums.storage);
        if let Some(events) = sums.unpriced_events {
            let labels: Vec<metrics::Label> = pair
                .iter()
                .map(|(k, v)| metrics::Label::new(k.clone().into_owned(), v.clone()))
                .collect();
            counter!(UNPRICED_EVENTS_TOTAL, labels).increment(events);
        }
        for (i, component) in ["compute", "storage"].into_iter().enumerate() {
            let Some(cost) = sums.cost[i] else { continue };
            let mut labels = pair.clone();
            labels.push(("component".into(), component.to_owned()));
            labels.push(("currency".into(), prices.currency().to_owned()));
            if let Some(assumed) = sums.assumed[i] {
                inner.add(ASSUMED_COST_TOTAL, labels.clone(), assumed);
            }
            inner.add(COST_TOTAL, labels, cost);
        }
    }
    drop(inner);
    histogram!(FLUSH_DURATION).record(took.as_secs_f64());
    gauge!(LAST_FLUSH).set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
}

/// What the window rows of one metric series (model, hardware, label set) add to the counters.
#[derive(Default)]
struct SeriesSums {
    compute: Decimal,
    storage: Decimal,
    /// Events of rows that could not be priced; `None` when every row was.
    unpriced_events: Option<u64>,
    /// Per component (compute, storage): the cost of the priced rows; `None` when none was.
    cost: [Option<Decimal>; 2],
    /// The part of `cost` priced with assumed coefficients (k1 = k2 = 1).
    assumed: [Option<Decimal>; 2],
}

/// The rows of a flush summed per metric series, in the order each series first appears (the
/// cardinality caps admit names in that order, as they did row by row). A flush holds a row per
/// window of each series; building and looking up the label sets once per series instead of
/// once per row was most of the metrics' share of a flush. Sums are exact, so adding them up
/// first changes no counter.
fn sum_by_series<'a>(
    windows: impl IntoIterator<Item = WindowUsage<'a>>,
    prices: &PriceBook,
) -> Vec<(WindowUsage<'a>, SeriesSums)> {
    let add = |to: &mut Option<Decimal>, amount: Decimal| {
        let sum = to.unwrap_or(Decimal::ZERO);
        // Past 7.9e28 the counter keeps its last value (see `LedgerInner::add`).
        *to = Some(sum.checked_add(amount).unwrap_or(sum));
    };
    let mut index: ahash::HashMap<(&ModelName, &HardwareName, &BTreeMap<String, String>), usize> =
        ahash::HashMap::default();
    let mut series: Vec<(WindowUsage<'a>, SeriesSums)> = Vec::new();
    for w in windows {
        let at = *index.entry((w.model, w.hardware, w.labels)).or_insert_with(|| {
            series.push((w, SeriesSums::default()));
            series.len() - 1
        });
        let sums = &mut series[at].1;
        sums.compute = sums.compute.checked_add(w.compute.value()).unwrap_or(sums.compute);
        sums.storage = sums.storage.checked_add(w.storage.value()).unwrap_or(sums.storage);
        let Some(priced) = w
            .priceable
            .then(|| prices.priced(w.model, w.hardware, w.start))
            .flatten()
        else {
            *sums.unpriced_events.get_or_insert(0) += w.events as u64;
            continue;
        };
        // Overflow is impossible for validated quantities; skip rather than panic if it happens.
        let Ok(cost) = priced.rates.price(w.compute, w.storage) else {
            continue;
        };
        let assumed = priced.source == CoefficientSource::Unit;
        for (i, amount) in [cost.compute_cost, cost.storage_cost].into_iter().enumerate() {
            add(&mut sums.cost[i], amount.value());
            if assumed {
                add(&mut sums.assumed[i], amount.value());
            }
        }
    }
    series
}

/// A series' labels, in order: model, hardware, the label dimensions a row has, then component
/// and currency. Names are owned when they come from `metrics.label_dimensions`.
type Labels = Vec<(std::borrow::Cow<'static, str>, String)>;

/// Exact decimal counters, rendered by us: the `metrics` crate's counters are integers, and
/// money must not drift through float addition.
struct Ledger {
    inner: Mutex<LedgerInner>,
}

struct LedgerInner {
    series: BTreeMap<&'static str, BTreeMap<Labels, Decimal>>,
    cap: LabelCap,
}

impl LedgerInner {
    fn add(&mut self, name: &'static str, labels: Labels, amount: Decimal) {
        let total = self.series.entry(name).or_default().entry(labels).or_default();
        // A process-lifetime counter past 7.9e28 keeps its last value rather than panic; the
        // exact figures are PostgreSQL's.
        if let Some(sum) = total.checked_add(amount) {
            *total = sum;
        }
    }
}

/// Bounds label cardinality: the first `max` distinct models (hardware targets) keep their
/// names in metrics, the rest are reported as `other`. PostgreSQL keeps the real names.
struct LabelCap {
    max_models: usize,
    max_hardware: usize,
    models: HashSet<String>,
    hardware: HashSet<String>,
    /// `metrics.label_dimensions`, each with the values that keep their name.
    dimensions: Vec<(String, HashSet<String>)>,
    max_label_values: usize,
}

impl LabelCap {
    /// The metric labels of a row's event labels: one per configured dimension the row carries
    /// (a row without it gets none, which Prometheus reads as the empty value), capped.
    fn dimensions(&mut self, labels: &BTreeMap<String, String>) -> Labels {
        let max = self.max_label_values;
        let mut out = Labels::new();
        for (name, seen) in &mut self.dimensions {
            if let Some(value) = labels.get(name.as_str()) {
                out.push((name.clone().into(), Self::admit(seen, max, value)));
            }
        }
        out
    }

    fn model(&mut self, name: &str) -> String {
        Self::admit(&mut self.models, self.max_models, name)
    }

    fn hardware(&mut self, name: &str) -> String {
        Self::admit(&mut self.hardware, self.max_hardware, name)
    }

    fn admit(seen: &mut HashSet<String>, max: usize, name: &str) -> String {
        if seen.contains(name) {
            return name.to_owned();
        }
        if seen.len() < max {
            seen.insert(name.to_owned());
            return name.to_owned();
        }
        OTHER.to_owned()
    }
}

/// The label value that stands for every name past the cardinality cap.
pub const OTHER: &str = "other";

static LEDGER: OnceLock<Ledger> = OnceLock::new();

fn ledger() -> &'static Ledger {
    LEDGER.get_or_init(|| Ledger {
        inner: Mutex::new(LedgerInner {
            series: BTreeMap::new(),
            cap: LabelCap {
                max_models: 100,
                max_hardware: 50,
                models: HashSet::new(),
                hardware: HashSet::new(),
                dimensions: Vec::new(),
                max_label_values: 50,
            },
        }),
    })
}

/// Sets which event labels the cost counters carry (`metrics.label_dimensions`) and how many
/// values each keeps (`metrics.max_label_values`); call at startup, before the first flush.
pub fn set_label_dimensions(names: &[String], max_values: usize) {
    let mut inner = ledger().inner.lock().unwrap_or_else(|p| p.into_inner());
    inner.cap.dimensions = names.iter().map(|n| (n.clone(), HashSet::new())).collect();
    inner.cap.max_label_values = max_values;
}

/// Sets the label cardinality caps: at startup, before the first flush, and again on a
/// configuration reload. A lower cap keeps the names already admitted (a series never changes
/// its labels) and sends only new names to `other`.
pub fn set_label_caps(max_models: usize, max_hardware: usize, max_label_values: usize) {
    let mut inner = ledger().inner.lock().unwrap_or_else(|p| p.into_inner());
    inner.cap.max_models = max_models;
    inner.cap.max_hardware = max_hardware;
    drop(inner);
    budget_caps().lock().unwrap_or_else(|p| p.into_inner()).max = max_label_values;
}

const LEDGER_HELP: [(&str, &str); 4] = [
    (COMPUTE_UNITS_TOTAL, "Compute units (T) accounted"),
    (STORAGE_UNITS_TOTAL, "Storage units (S) accounted"),
    (
        COST_TOTAL,
        "Money accounted, by component (compute, storage); exact decimal sums of usage_costs",
    ),
    (
        ASSUMED_COST_TOTAL,
        "The part of costwatch_cost_total priced with the assumed k1 = k2 = 1 (nothing configured or calibrated)",
    ),
];

/// What `/metrics` shows besides the exporter's output, in the Prometheus text format: the exact
/// decimal counters, then (on Linux) the `process_*` metrics, read from `/proc` at each scrape.
/// Both are rendered here because the `metrics` crate's counters are integers.
pub fn render_ledger() -> String {
    let mut out = render_exact_counters();
    out.push_str(&process::render());
    out
}

fn render_exact_counters() -> String {
    let inner = ledger().inner.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for (name, help) in LEDGER_HELP {
        let Some(series) = inner.series.get(name) else { continue };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in series {
            let rendered: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {}", rendered.join(","), value.normalize());
        }
    }
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn flush_error(class: ErrorClass) {
    counter!(FLUSH_ERRORS_TOTAL, "class" => class.as_str()).increment(1);
    counter!(DATABASE_ERRORS_TOTAL).increment(1);
}

/// A flush failed with a transient error: consumption pauses and the batch is written again
/// after `retry_in`.
pub fn flush_retrying(error: &dyn std::fmt::Display, retry_in: Duration) {
    flush_error(ErrorClass::Transient);
    tracing::error!(%error, ?retry_in, "flush failed; pausing consumption and retrying");
}

/// PostgreSQL refused a flush with a permanent error: the batch is written again at once,
/// isolating the rows it refuses.
pub fn flush_refused(error: &dyn std::fmt::Display) {
    flush_error(ErrorClass::Permanent);
    tracing::error!(%error, "PostgreSQL refused the flush; writing it again with the refused rows isolated");
}

/// The isolating write failed permanently too: the failure is not in the rows, and costwatch
/// stops rather than retry forever.
pub fn flush_refused_for_good(error: &dyn std::fmt::Display) {
    flush_error(ErrorClass::Permanent);
    tracing::error!(
        %error,
        "PostgreSQL refuses this flush even with the refused rows isolated; stopping instead of retrying forever"
    );
}

/// A partition became stalled, or moves again.
pub fn partition_stalled(topic: &str, partition: i32, stalled: bool) {
    gauge!(PARTITION_STALLED, "topic" => topic.to_owned(), "partition" => partition.to_string()).set(if stalled {
        1.0
    } else {
        0.0
    });
    if stalled {
        tracing::warn!(
            topic,
            partition,
            "partition stalled: its stored offset has not moved although it has messages to read"
        );
    } else {
        tracing::info!(topic, partition, "partition no longer stalled");
    }
}

/// Rejected messages older than `before` were deleted.
pub fn rejected_pruned(n: u64, before: chrono::DateTime<chrono::Utc>) {
    counter!(REJECTED_PRUNED_TOTAL).increment(n);
    if n > 0 {
        tracing::info!(deleted = n, %before, "pruned rejected messages past retention.rejected");
    }
}

/// A retention run finished: history partitions dropped and kept.
pub fn retention_ran(dropped: &[(String, &'static str, i64)], kept: &[(String, String)]) {
    for (name, table, rows) in dropped {
        counter!(PARTITIONS_DROPPED_TOTAL, "table" => *table).increment(1);
        tracing::info!(partition = %name, table, rows, "dropped history partition past its retention");
    }
    for (name, reason) in kept {
        counter!(PARTITIONS_KEPT_TOTAL).increment(1);
        tracing::error!(partition = %name, %reason, "history partition past its retention kept");
    }
    gauge!(RETENTION_LAST_RUN).set(chrono::Utc::now().timestamp() as f64);
}

/// Claiming assigned partitions in PostgreSQL failed; retried after `retry_in`.
pub fn claim_failed(error: &dyn std::fmt::Display, partitions: &[i32], retry_in: Duration) {
    counter!(DATABASE_ERRORS_TOTAL).increment(1);
    tracing::error!(%error, ?partitions, ?retry_in, "cannot claim assigned partitions, retrying");
}

/// Lag of one owned partition: log end minus the next offset to count.
pub fn partition_lag(topic: &str, partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "topic" => topic.to_owned(), "partition" => partition.to_string()).set(lag.max(0) as f64);
}

/// Another instance claimed these partitions: their unflushed work is dropped (the new owner
/// counts it from the stored offset).
pub fn partitions_fenced(partitions: &[i32]) {
    counter!(FENCED_TOTAL).increment(partitions.len() as u64);
    tracing::warn!(
        ?partitions,
        "another instance owns these partitions now; dropping their unflushed work"
    );
}

/// The broker refused costwatch in a way no retry fixes (TLS verification, authentication):
/// costwatch drains and stops.
pub fn broker_refused(failure: &dyn std::fmt::Display, reason: &str) {
    counter!(BROKER_ERRORS_TOTAL).increment(1);
    tracing::error!(%failure, reason, "the Kafka broker refused costwatch; this is permanent, stopping");
}

/// An error the Kafka client reported; librdkafka retries by itself.
pub fn broker_error(error: &dyn std::fmt::Display, reason: &str) {
    counter!(BROKER_ERRORS_TOTAL).increment(1);
    tracing::warn!(%error, reason, "kafka client error; librdkafka retries by itself");
}

/// Ownership and progress of the partitions this instance holds, after an assignment change or
/// a committed flush.
pub fn assignment(owned: usize, dedup_ids: usize, watermark: Option<chrono::DateTime<chrono::Utc>>) {
    gauge!(ASSIGNED_PARTITIONS).set(owned as f64);
    gauge!(DEDUP_IDS).set(dedup_ids as f64);
    if let Some(w) = watermark {
        gauge!(WATERMARK).set(w.timestamp_millis() as f64 / 1000.0);
        let delay = chrono::Utc::now() - w;
        gauge!(WATERMARK_DELAY).set(delay.num_milliseconds().max(0) as f64 / 1000.0);
    }
}

/// The daemon prices with these coefficient versions now: at start (`reloaded` false), or
/// after new ones replaced the running book.
pub fn coefficients_loaded(newest: Option<i64>, versions: usize, reloaded: bool) {
    if reloaded {
        counter!(COEFFICIENT_RELOADS_TOTAL).increment(1);
    }
    gauge!(COEFFICIENT_VERSION).set(newest.unwrap_or(0) as f64);
    tracing::info!(newest_version = ?newest, versions, "loaded calibrated coefficient versions");
}

/// Sets `costwatch_potential_savings` per model. Models past `metrics.max_models` are summed
/// under `other`; a model that had a value before and has none now is set to 0, so a stale
/// saving never lingers on a dashboard.
pub fn potential_savings(savings: &[(String, Decimal)]) {
    use rust_decimal::prelude::ToPrimitive;
    static SHOWN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut by_label: BTreeMap<String, Decimal> = BTreeMap::new();
    {
        let mut inner = ledger().inner.lock().unwrap_or_else(|p| p.into_inner());
        for (model, saving) in savings {
            *by_label.entry(inner.cap.model(model)).or_default() += *saving;
        }
    }
    let mut shown = SHOWN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for gone in shown.iter().filter(|m| !by_label.contains_key(*m)) {
        gauge!(POTENTIAL_SAVINGS, "model" => gone.clone()).set(0.0);
    }
    for (model, saving) in &by_label {
        gauge!(POTENTIAL_SAVINGS, "model" => model.clone()).set(saving.to_f64().unwrap_or(0.0));
    }
    shown.extend(by_label.into_keys());
}

/// The broker started a partition past its stored offset: it is read again from `to`.
pub fn start_rewound(partition: i32, got: i64, to: i64) {
    counter!(START_REWINDS_TOTAL).increment(1);
    tracing::warn!(
        partition,
        got,
        rewind_to = to,
        "the broker started this partition past its stored offset; reading again from earlier"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_past_the_cap_become_other() {
        let mut cap = LabelCap {
            max_models: 2,
            max_hardware: 1,
            models: HashSet::new(),
            hardware: HashSet::new(),
            dimensions: Vec::new(),
            max_label_values: 1,
        };
        assert_eq!(cap.model("a"), "a");
        assert_eq!(cap.model("b"), "b");
        assert_eq!(cap.model("c"), OTHER);
        assert_eq!(cap.model("a"), "a");
        assert_eq!(cap.hardware("x"), "x");
        assert_eq!(cap.hardware("y"), OTHER);
    }

    #[test]
    fn label_dimensions_are_capped_and_absent_labels_add_none() {
        let mut cap = LabelCap {
            max_models: 1,
            max_hardware: 1,
            models: HashSet::new(),
            hardware: HashSet::new(),
            dimensions: vec![("tenant".into(), HashSet::new()), ("region".into(), HashSet::new())],
            max_label_values: 2,
        };
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let shown = |l: Labels| -> Vec<(String, String)> { l.into_iter().map(|(k, v)| (k.into_owned(), v)).collect() };
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            shown(cap.dimensions(&labels(&[("tenant", "a"), ("team", "x")]))),
            [pair("tenant", "a")]
        );
        assert_eq!(
            shown(cap.dimensions(&labels(&[("tenant", "b"), ("region", "eu")]))),
            [pair("tenant", "b"), pair("region", "eu")]
        );
        assert_eq!(
            shown(cap.dimensions(&labels(&[("tenant", "c")]))),
            [pair("tenant", OTHER)]
        );
        assert_eq!(
            shown(cap.dimensions(&labels(&[("tenant", "a")]))),
            [pair("tenant", "a")]
        );
        assert!(cap.dimensions(&labels(&[])).is_empty());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
