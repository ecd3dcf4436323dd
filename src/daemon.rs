//! `costwatch run`: wires settings, PostgreSQL, the metrics endpoint and the Kafka consumer
//! together, and drains them on shutdown.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::signal::unix::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::alerting;
use crate::calibration;
use crate::calibration::recommend;
use crate::config::Settings;
use crate::exit::{ExitClass, Failure};
use crate::history;
use crate::http::{self, AppState, ReloadOutcome};
use crate::ingest::aggregate::{millis, IngestRules};
use crate::ingest::consumer::{self, Backoff, FlushLimits, Pipeline, PipelineSettings};
use crate::ingest::event::Limits;
use crate::ingest::health::Health;
use crate::ingest::source::Source;
use crate::ingest::window::WindowSize;
use crate::pricing::profiles::{LiveProfiles, UsageProfiles};
use crate::pricing::{LivePrices, PriceBook};
use crate::store::{self, ConnectFailure, Store, StoreError};
use crate::telemetry;

/// Derives the ingestion rules from settings.
pub fn ingest_rules(settings: &Settings) -> IngestRules {
    IngestRules {
        limits: Limits {
            max_event_bytes: settings.ingest.max_event_bytes,
            max_future_skew: settings.ingest.max_future_skew,
            max_event_age: settings.ingest.max_event_age,
        },
        max_rejected_payload_bytes: settings.ingest.max_rejected_payload_bytes,
        window: WindowSize::new(settings.windows.size),
        allowed_lateness_ms: millis(settings.windows.allowed_lateness),
        dedup_horizon_ms: millis(settings.ingest.dedup_horizon),
    }
}

/// Connects to PostgreSQL and brings the schema up to date, retrying with backoff until it
/// works or `cancel` fires. A database that is down at start is waited for, not a crash loop.
/// A TLS or login failure ([`StoreError::connect_failure`]) ends it at once, named as such.
pub async fn prepare_database(settings: &Settings, cancel: &CancellationToken) -> anyhow::Result<Option<Store>> {
    let options = store::connect_options(&settings.database.url, settings.database.password.as_ref())?;
    let store = Store::connect_lazy_with(options.clone(), settings.database.max_connections);
    Ok(migrate_when_reachable(&store, &options, cancel).await?.then_some(store))
}

/// [`prepare_database`] on a store that already exists (lazily, not yet connected): true once
/// the schema is up to date, false when shutdown began first.
async fn migrate_when_reachable(
    store: &Store,
    options: &sqlx::postgres::PgConnectOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new();
    loop {
        match Store::create_database_if_missing_with(options).await {
            Ok(true) => info!("created the database named in database.url"),
            Ok(false) => {}
            Err(error) => {
                if let Some(failure) = error.connect_failure() {
                    return Err(permanent(failure, error));
                }
                warn!(%error, "cannot check or create the database; trying to use it as it is")
            }
        }
        match store.migrate().await {
            Ok(()) => return Ok(true),
            Err(e) if e.connect_failure().is_some() => {
                let failure = e.connect_failure().expect("checked");
                return Err(permanent(failure, e));
            }
            Err(e) if e.is_transient() => {
                let wait = backoff.next_wait();
                error!(error = %e, retry_in = ?wait, "PostgreSQL is unreachable, retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e).context("cannot prepare the database schema"),
        }
    }
}

fn permanent(failure: ConnectFailure, error: StoreError) -> anyhow::Error {
    // sqlx's chain repeats itself (its error, the I/O error, rustls's); the innermost cause
    // is the one that says what is wrong.
    let mut cause: &dyn std::error::Error = &error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    Failure::new(
        ExitClass::Unavailable,
        format!("PostgreSQL: {failure}; not retried: {cause}"),
    )
    .into()
}

/// Runs until `cancel` fires, then drains: flush, store offsets, leave the group, stop serving.
/// It reads as the start-up order (listen, serve, database, prices, evaluator, consumer), which
/// is why it stays one function.
pub async fn run(
    settings: Settings,
    reload: ReloadSource,
    metrics: Option<PrometheusHandle>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    // Bind before anything else, so that a port in use fails the start instead of later.
    let listener = http::bind(&settings.http.listen).await?;
    let options = store::connect_options(&settings.database.url, settings.database.password.as_ref())?;
    let store = Store::connect_lazy_with(options.clone(), settings.database.max_connections);
    telemetry::set_label_caps(
        settings.metrics.max_models,
        settings.metrics.max_hardware,
        settings.metrics.max_label_values,
    );
    telemetry::set_label_dimensions(&settings.metrics.label_dimensions, settings.metrics.max_label_values);
    // Configured prices until the calibrated versions are loaded (before the first flush).
    let prices = LivePrices::new(PriceBook::from_settings(&settings.pricing));
    let profiles = LiveProfiles::from(UsageProfiles::new(&settings.usage_profiles));
    // Offsets move once per flush at best: a long flush interval is not a stall.
    let stall_after = settings.ingest.stall_after.max(settings.ingest.flush_interval * 2);
    let health = Arc::new(Health::new(stall_after));
    let board = alerting::SharedBoard::default();
    let (live, live_settings) = watch::channel(Arc::new(settings.clone()));
    let (reload_requests, requests) = mpsc::channel(4);
    let applied = (prices.clone(), profiles.clone());
    tokio::spawn(serve_reloads(reload, live, applied, requests, cancel.clone()));
    let app = AppState {
        store: store.clone(),
        prices: prices.clone(),
        savings_window: settings.recommendations.savings_window,
        metrics,
        api_token: settings.http.api_token.as_deref().map(Arc::from),
        health: health.clone(),
        budgets: board.clone(),
        protect_metrics: settings.http.protect_metrics,
        timeouts: http::Timeouts::from_settings(&settings.http),
        reload: Some(reload_requests),
    };
    // Serving starts at once: `/healthz` answers while the database is still being waited
    // for, and `/readyz` says what is missing.
    let mut tasks = Supervisor::new(cancel.clone());
    tasks.spawn("the http server", http::serve(listener, app, cancel.clone()));

    let started = async {
        if !migrate_when_reachable(&store, &options, &cancel).await? {
            return anyhow::Ok(false);
        }
        info!("database schema is up to date");
        // Calibrated versions are loaded before the first flush, so that no window is priced
        // with configured coefficients while a version in force exists.
        Ok(start_pricing(&settings, &store, &prices, &cancel).await)
    };
    match started.await {
        Ok(true) => {}
        Ok(false) => return tasks.wait().await,
        Err(error) => {
            cancel.cancel();
            let _ = tasks.wait().await;
            return Err(error);
        }
    }
    tokio::spawn(retention(
        store.clone(),
        retention_policy(&settings),
        settings.rejected_retention(),
        cancel.clone(),
    ));
    let settings = Arc::new(settings);
    tasks.spawn(
        "the budget evaluator",
        alerting::run(live_settings, store.clone(), board, cancel.clone()),
    );

    // One consumer per source: each reads one topic in one format, into the same group.
    for source in settings.effective_sources() {
        let source = Arc::new(Source::new(&source, profiles.clone()));
        let pipeline = Arc::new(Pipeline::new(
            pipeline_settings(&settings, source.clone()),
            store.clone(),
            prices.clone(),
            health.member(&source.topic),
            cancel.clone(),
        ));
        let consumer = match consumer::build_consumer(&settings.kafka, pipeline.clone()) {
            Ok(consumer) => consumer,
            Err(error) => {
                cancel.cancel();
                tasks.wait().await?;
                return Err(error).context("cannot create the Kafka consumer");
            }
        };
        tasks.spawn("the consumer", async move {
            tokio::task::spawn_blocking(move || consumer::consume(consumer, pipeline))
                .await
                .map_err(|e| anyhow::anyhow!("the consumer thread panicked: {e}"))?
        });
    }
    tasks.wait().await
}

/// What the ingest pipeline is told by the configuration.
fn pipeline_settings(settings: &Settings, source: Arc<Source>) -> PipelineSettings {
    PipelineSettings {
        topic: source.topic.clone(),
        source,
        owner: instance_name(),
        rules: ingest_rules(settings),
        start_from: settings.kafka.start_from,
        flush: FlushLimits {
            interval: settings.ingest.flush_interval,
            max_pending_events: settings.ingest.max_pending_events,
            max_pending_bytes: settings.ingest.max_pending_bytes,
        },
    }
}

/// Loads every calibrated version into `prices` before the first flush (so that no window is
/// priced with configured coefficients while a version in force exists), then keeps it current
/// and the potential-savings gauge fresh in the background. False when shutdown began first.
async fn start_pricing(settings: &Settings, store: &Store, prices: &LivePrices, cancel: &CancellationToken) -> bool {
    if !load_book(store, prices, cancel).await {
        return false;
    }
    tokio::spawn(reload_coefficients(
        store.clone(),
        prices.clone(),
        settings.calibration.reload_interval,
        cancel.clone(),
    ));
    tokio::spawn(refresh_savings(
        store.clone(),
        prices.clone(),
        settings.recommendations.clone(),
        cancel.clone(),
    ));
    true
}

/// The daemon's long-running tasks, run as one: when any of them ends (an error, a panic, or
/// even a clean return before shutdown began), the shared cancellation token stops the others,
/// and the first error is what `run` returns, so the process exits non-zero. A failed HTTP
/// server or evaluator once left the consumer running without them.
struct Supervisor {
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl Supervisor {
    fn new(cancel: CancellationToken) -> Self {
        Self {
            cancel,
            tasks: tokio::task::JoinSet::new(),
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Waits for every task; returns the first failure.
    async fn wait(mut self) -> anyhow::Result<()> {
        let mut first: Option<anyhow::Error> = None;
        while let Some(joined) = self.tasks.join_next().await {
            let (task, failure) = match joined {
                Ok((name, Ok(()))) => (name, None),
                // The task's own error says what failed; the log line names the task.
                Ok((name, Err(error))) => (name, Some(error)),
                Err(panic) => ("a task", Some(anyhow::anyhow!("a task panicked: {panic}"))),
            };
            if let Some(error) = &failure {
                error!(task, error = format!("{error:#}"), "task failed; stopping everything");
            } else if !self.cancel.is_cancelled() {
                warn!(task, "task ended before shutdown; stopping everything");
            }
            self.cancel.cancel();
            if first.is_none() {
                first = failure;
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Puts every stored version into `prices`, retrying while PostgreSQL is away; false when
/// shutdown began first.
async fn load_book(store: &Store, prices: &LivePrices, cancel: &CancellationToken) -> bool {
    let mut backoff = Backoff::new();
    loop {
        match calibration::store::load_versions(store.pool()).await {
            Ok(versions) => {
                // Onto the book in force, which a reload may already have changed.
                prices.update(|book| book.clone().with_versions(versions));
                let book = prices.current();
                telemetry::coefficients_loaded(book.newest_version(), book.version_count(), false);
                return true;
            }
            Err(error) => {
                let wait = backoff.next_wait();
                error!(%error, retry_in = ?wait, "cannot load coefficient versions, retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Polls `coefficient_version` and swaps the pipeline's price book when it changed, so that
/// a version stored by `costwatch calibrate` prices the next flush without a restart.
async fn reload_coefficients(store: Store, prices: LivePrices, every: std::time::Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let current = prices.current();
    let mut known = (current.newest_version(), current.version_count() as i64);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let marker = match calibration::store::version_marker(store.pool()).await {
            Ok(marker) => marker,
            Err(error) => {
                warn!(%error, "cannot poll coefficient versions; pricing with the loaded ones");
                continue;
            }
        };
        if marker == known {
            continue;
        }
        match calibration::store::load_versions(store.pool()).await {
            Ok(versions) => {
                // Swapped before it is reported, so that whoever sees the metric sees the book.
                prices.update(|book| book.clone().with_versions(versions));
                let book = prices.current();
                let (newest, count) = (book.newest_version(), book.version_count());
                known = (newest, count as i64);
                telemetry::coefficients_loaded(newest, count, true);
            }
            Err(error) => warn!(%error, "cannot load coefficient versions; pricing with the loaded ones"),
        }
    }
}

/// `[retention]` as the history module takes it.
pub fn retention_policy(settings: &Settings) -> history::retention::Policy {
    history::retention::Policy {
        windows: settings.retention.windows,
        hourly: settings.retention.hourly,
        daily: settings.retention.daily,
    }
}

/// At start and then hourly: creates the history partitions of the week ahead, drops those past
/// `[retention]`, and deletes rejected messages older than `retention.rejected`. Every instance
/// tries; one at a time gets each job (advisory locks).
async fn retention(
    store: Store,
    policy: history::retention::Policy,
    rejected: std::time::Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rejected = chrono::Duration::from_std(rejected).unwrap_or(chrono::Duration::MAX);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = chrono::Utc::now();
        if let Err(error) = history::partitions::ensure_ahead(&store, now, PARTITIONS_AHEAD_DAYS).await {
            warn!(%error, "cannot create the history partitions ahead; the flush creates them on demand");
        }
        match history::retention::run(&store, &policy, now, false).await {
            Ok(Some(outcome)) => {
                let dropped: Vec<_> = outcome
                    .dropped
                    .iter()
                    .map(|(p, rows)| (p.name.clone(), p.table, *rows))
                    .collect();
                let kept: Vec<_> = outcome
                    .kept
                    .iter()
                    .map(|(p, why)| (p.name.clone(), why.clone()))
                    .collect();
                telemetry::retention_ran(&dropped, &kept);
            }
            Ok(None) => {}
            Err(error) => warn!(%error, "cannot apply history retention; trying again in an hour"),
        }
        // A retention longer than the calendar can count back keeps everything.
        let Some(before) = now.checked_sub_signed(rejected) else {
            continue;
        };
        match store.prune_rejected(before).await {
            Ok(Some(n)) => telemetry::rejected_pruned(n, before),
            Ok(None) => {}
            Err(error) => warn!(%error, "cannot prune rejected messages; trying again in an hour"),
        }
    }
}

/// How many days of history partitions exist ahead of today.
const PARTITIONS_AHEAD_DAYS: i64 = 7;

/// How often retention runs.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// Recomputes `costwatch_potential_savings` over the last `savings_window`.
async fn refresh_savings(
    store: Store,
    prices: LivePrices,
    settings: crate::config::RecommendationSettings,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.refresh_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let window = chrono::Duration::from_std(settings.savings_window).unwrap_or(chrono::Duration::days(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let to = chrono::Utc::now();
        let usage = match calibration::store::usage_by_model(store.pool(), to - window, to).await {
            Ok(usage) => usage,
            Err(error) => {
                warn!(%error, "cannot read usage for potential savings; keeping the last values");
                continue;
            }
        };
        match recommend::recommend(&prices.current(), &usage, to) {
            Ok(recommendations) => {
                let savings: Vec<(String, rust_decimal::Decimal)> = recommendations
                    .iter()
                    .map(|r| {
                        let saving = r.potential_saving.map(|s| s.value()).unwrap_or_default();
                        (r.model.as_str().to_owned(), saving)
                    })
                    .collect();
                telemetry::potential_savings(&savings);
            }
            Err(error) => warn!(%error, "cannot price recommendations for potential savings"),
        }
    }
}

/// Where `costwatch run` re-reads its configuration from, and the SIGHUPs that ask it to.
pub struct ReloadSource {
    /// The configuration file (`--config`); `None`: the environment alone, read again too.
    pub path: Option<PathBuf>,
    /// SIGHUP, registered when the process starts (until then its default action ends the
    /// process); `None` when it could not be, and only `POST /-/reload` reloads.
    pub hangups: Option<Signal>,
}

/// Serves reloads, from SIGHUP and from `POST /-/reload`, one at a time until `cancel` fires.
async fn serve_reloads(
    source: ReloadSource,
    live: watch::Sender<Arc<Settings>>,
    (prices, profiles): (LivePrices, LiveProfiles),
    mut requests: mpsc::Receiver<oneshot::Sender<ReloadOutcome>>,
    cancel: CancellationToken,
) {
    let ReloadSource { path, mut hangups } = source;
    telemetry::config_reloaded(true);
    loop {
        let hangup = async {
            match hangups.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        let reply = tokio::select! {
            _ = cancel.cancelled() => return,
            Some(()) = hangup => None,
            Some(reply) = requests.recv() => Some(reply),
        };
        let outcome = reload(
            path.as_deref(),
            &live,
            (&prices, &profiles),
            if reply.is_some() { "http" } else { "SIGHUP" },
        );
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
}

/// Reads the configuration again and applies what a reload applies (see
/// [`Settings::reloaded`]): prices to the next flush, budgets and receivers to the next
/// evaluation, label caps to the next metrics. A file that does not load or validate changes
/// nothing; the running configuration stays whole.
fn reload(
    path: Option<&std::path::Path>,
    live: &watch::Sender<Arc<Settings>>,
    (prices, profiles): (&LivePrices, &LiveProfiles),
    trigger: &'static str,
) -> ReloadOutcome {
    let checked = Settings::load(path).map_err(|e| format!("{e:#}")).and_then(|new| {
        match alerting::notify::Notifier::new(&new.alerting) {
            Ok(_) => Ok(new),
            Err(e) => Err(format!("alerting: {e}")),
        }
    });
    let new = match checked {
        Ok(new) => new,
        Err(error) => {
            error!(trigger, %error, "configuration reload failed; the running configuration is unchanged");
            telemetry::config_reloaded(false);
            return Err(error);
        }
    };
    let current = live.borrow().clone();
    let ignored: Vec<String> = current.restart_needed(&new).into_iter().map(str::to_owned).collect();
    let applied = current.reloaded(new);
    prices.update(|book| book.with_settings(&applied.pricing));
    // New token events derive T and S with the reloaded profiles; `rerate` applies them to
    // windows already written.
    profiles.replace(UsageProfiles::new(&applied.usage_profiles));
    let caps = &applied.metrics;
    telemetry::set_label_caps(caps.max_models, caps.max_hardware, caps.max_label_values);
    // Setting the dimensions forgets which values kept their names: only when they changed.
    if current.metrics.label_dimensions != caps.label_dimensions {
        telemetry::set_label_dimensions(&caps.label_dimensions, caps.max_label_values);
    }
    for section in &ignored {
        warn!(trigger, section, "changed in the configuration, ignored until restart");
    }
    info!(
        trigger,
        budgets = applied.budgets.len(),
        priced_hardware = applied.pricing.hardware.len(),
        "configuration reloaded: pricing, usage profiles, budgets, alerting and metrics caps apply to new work"
    );
    live.send_replace(Arc::new(applied));
    telemetry::config_reloaded(true);
    Ok(ignored)
}

/// `host-pid`: unique among live instances, readable in `partition_progress.owner`.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}-{}", std::process::id())
}
