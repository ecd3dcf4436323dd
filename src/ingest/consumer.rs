//! The Kafka stage: one consumer-group member on a dedicated thread that polls, feeds the
//! [`Aggregator`], flushes to PostgreSQL on a timer, and takes partitions over at the offsets
//! PostgreSQL holds for them.
//!
//! Offsets live in PostgreSQL, in the same transaction as the sums they produced. The Kafka
//! commit that follows each flush is only there so lag tools see progress; costwatch never reads
//! it back. See `docs/architecture.md` for the invariant this keeps.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::bindings::rd_kafka_resp_err_t as RespErr;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{KafkaSettings, StartFrom};

use crate::error_class::{self, ErrorClass, KafkaFailure};
use crate::faults::{self, FaultPoint};
use crate::ingest::aggregate::{start_offset, Aggregator, FlushBatch, IngestRules, Outcome};
use crate::ingest::event::RejectCode;
use crate::ingest::health::Health;
use crate::ingest::source::Source;
use crate::ingest::store::{WindowLayout, WriteOutcome};
use crate::ingest::window::{from_millis, WindowKey, WindowSums};
use crate::kafka;
use crate::pricing::{LivePrices, PriceBook};
use crate::secret;
use crate::store::{Store, StoreError};
use crate::telemetry;

/// Everything the consumer thread and its rebalance callback share.
pub struct Pipeline {
    /// The topic consumed.
    pub topic: String,
    /// The source the topic belongs to: its name goes with every row and rejection.
    pub source: Arc<Source>,
    /// This instance's name in `partition_progress.owner`.
    pub owner: String,
    /// Connections to PostgreSQL: claims, flushes, progress.
    pub store: Store,
    /// Swapped by the daemon when calibrated coefficient versions change; each flush prices
    /// with one snapshot of it.
    pub prices: LivePrices,
    /// How window rows are stamped (size, lateness, rejected-row limits).
    pub layout: WindowLayout,
    /// Where a partition with no stored offset starts (`kafka.start_from`).
    pub start_from: StartFrom,
    /// When pending state is flushed.
    pub flush: FlushLimits,
    /// The tokio runtime the consumer thread and rebalance callbacks block on for database work.
    pub runtime: Handle,
    /// Stops the consumer; cancelled by the daemon on shutdown, and by the consumer itself when it cannot go on (a permanent broker or flush failure).
    pub cancel: CancellationToken,
    /// What `/readyz` reports about this consumer.
    pub health: Arc<Health>,
    /// Shared with the writer thread, which reports the watermark right after its COMMIT.
    aggregator: Arc<Mutex<Aggregator>>,
    /// The write in flight, if any. Only the consumer thread (its loop and the rebalance
    /// callbacks it runs) touches it; the mutex is for the shared `Arc`.
    writing: Mutex<Option<JoinHandle<Written>>>,
}

/// When pending state is written: on a timer, or early once this much is pending.
#[derive(Debug, Clone, Copy)]
pub struct FlushLimits {
    /// The flush timer: pending state is written at least this often (`ingest.flush_interval`).
    pub interval: Duration,
    /// Flush early once this many messages are pending (`ingest.max_pending_events`).
    pub max_pending_events: usize,
    /// Flush early once this many payload bytes are pending (`ingest.max_pending_bytes`).
    pub max_pending_bytes: usize,
}

/// A finished write, with everything its bookkeeping needs.
struct Written {
    batch: FlushBatch,
    prices: Arc<PriceBook>,
    started: Instant,
    result: Result<WriteOutcome, StoreError>,
}

/// Whether [`Pipeline::settle`] waits for the write in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Wait,
    IfDone,
}

/// What a pipeline is told by the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// The topic to consume (`kafka.topic`, or the source's).
    pub topic: String,
    /// The source the topic belongs to (how its messages are read).
    pub source: Arc<Source>,
    /// This instance's name in `partition_progress.owner`.
    pub owner: String,
    /// The rules the aggregator applies.
    pub rules: IngestRules,
    /// Where a partition with no stored offset starts (`kafka.start_from`).
    pub start_from: StartFrom,
    /// When pending state is flushed.
    pub flush: FlushLimits,
}

impl Pipeline {
    /// A pipeline with no partitions yet; call it from inside the tokio runtime it will use.
    pub fn new(
        settings: PipelineSettings,
        store: Store,
        prices: LivePrices,
        health: Arc<Health>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            topic: settings.topic,
            source: settings.source.clone(),
            owner: settings.owner,
            store,
            prices,
            layout: WindowLayout::from_rules(&settings.rules),
            start_from: settings.start_from,
            flush: settings.flush,
            runtime: Handle::current(),
            cancel,
            health,
            aggregator: Arc::new(Mutex::new(Aggregator::for_source(
                settings.rules,
                Some(settings.source),
            ))),
            writing: Mutex::new(None),
        }
    }

    fn aggregator(&self) -> MutexGuard<'_, Aggregator> {
        lock(&self.aggregator)
    }

    /// Claims partitions in PostgreSQL, retrying while the database is away. Returns false only
    /// when shutdown began first.
    fn claim(&self, consumer: &BaseConsumer<KafkaContext>, tpl: &mut TopicPartitionList) -> bool {
        // The write in flight was built under the current assignment; settle it before the
        // aggregator's partitions change under its bookkeeping. A failure keeps the batch to be
        // written again by the loop.
        if let Err(error) = self.settle(consumer, Settle::Wait) {
            warn!(%error, "the flush in flight failed; it is written again after the assignment");
        }
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty() {
            return true;
        }
        let (horizon, parked) = {
            let agg = self.aggregator();
            (agg.rules().dedup_horizon_ms, agg.parked())
        };
        let mut backoff = Backoff::new();
        let claims = loop {
            let claimed = self.runtime.block_on(self.store.claim_continuing(
                &self.topic,
                &self.owner,
                &partitions,
                horizon,
                &parked,
            ));
            match claimed {
                Ok(claims) => break claims,
                Err(error) => {
                    let wait = backoff.next_wait();
                    telemetry::claim_failed(&error, &partitions, wait);
                    if self.sleep_unless_cancelled(wait) {
                        return false;
                    }
                }
            }
        };
        for claim in &claims {
            let offset = match claim.next_offset {
                // Assigned a little before the stored offset (see `START_MARGIN`); what is
                // already counted is skipped.
                Some(next) => Offset::Offset(start_offset(next)),
                None if self.start_from == StartFrom::Latest => Offset::End,
                None => Offset::Beginning,
            };
            if let Err(error) = tpl.set_partition_offset(&self.topic, claim.partition, offset) {
                warn!(partition = claim.partition, %error, "cannot set the start offset");
            }
            info!(
                partition = claim.partition,
                epoch = claim.epoch,
                next_offset = ?claim.next_offset,
                dedup_ids = claim.seen.len(),
                continued = claim.continued,
                "partition assigned"
            );
        }
        let mut agg = self.aggregator();
        agg.assign(claims);
        self.report_assignment(&agg);
        true
    }

    fn report_assignment(&self, agg: &Aggregator) {
        let owned = agg.owned_count();
        self.health.set_assigned(owned);
        telemetry::assignment(agg.owned_count(), agg.dedup_ids(), agg.watermark());
    }

    /// Sleeps up to `d`; true when shutdown began meanwhile.
    fn sleep_unless_cancelled(&self, d: Duration) -> bool {
        let cancel = self.cancel.clone();
        self.runtime.block_on(async move {
            tokio::select! {
                _ = cancel.cancelled() => true,
                _ = tokio::time::sleep(d) => false,
            }
        })
    }

    /// Writes pending state (of `only` those partitions, or all) to PostgreSQL and waits until
    /// it is written: first the write in flight, then everything pending. Partitions that
    /// another instance has claimed meanwhile are dropped and the rest written again.
    fn flush_now(&self, consumer: &BaseConsumer<KafkaContext>, only: Option<&[i32]>) -> Result<(), StoreError> {
        loop {
            self.settle(consumer, Settle::Wait)?;
            if !self.start_write(only) {
                return Ok(());
            }
        }
    }

    /// Hands the next batch (the failed one first, else the pending state of `only` those
    /// partitions) to a writer thread and returns at once; false when there was nothing
    /// to write. At most one write is in flight: the caller settles the previous one first,
    /// because each batch applies only on top of the one before it (`prev_offset`).
    fn start_write(&self, only: Option<&[i32]>) -> bool {
        let mut writing = self.writing();
        assert!(writing.is_none(), "a write is already in flight; settle it first");
        let batch = self.aggregator().batch(only);
        if batch.is_empty() {
            return false;
        }
        let store = self.store.clone();
        let topic = self.topic.clone();
        let source = self.source.name.clone();
        let layout = self.layout;
        let prices = self.prices.current();
        let started = Instant::now();
        let aggregator = self.aggregator.clone();
        let runtime = self.runtime.clone();
        // A thread of its own rather than a runtime task: merging the windows and encoding the
        // rows is tens of milliseconds of CPU for a large batch, too long to hold a runtime
        // worker that also serves the HTTP endpoints. One thread per flush (one a second by
        // default) costs next to nothing.
        let write = move || {
            // Merged once, here, off the consumer thread; the metrics of the flush reuse it.
            let windows = batch.windows();
            let result = runtime.block_on(store.write(&topic, &source, &batch, &windows, &prices, layout));
            if let Ok(outcome) = &result {
                // Right after COMMIT, as when the consumer thread wrote itself: the counters
                // trail the database by as little as they did then.
                let refused: Vec<WindowSums> = outcome.unstorable.iter().map(|&i| windows[i].1).collect();
                let stored: Vec<(&WindowKey, WindowSums)> = windows
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !outcome.unstorable.contains(i))
                    .map(|(_, w)| *w)
                    .collect();
                report_committed(&batch, &stored, &refused, &prices, started, &aggregator);
            }
            Written {
                batch,
                prices,
                started,
                result,
            }
        };
        let task = std::thread::Builder::new()
            .name("costwatch-writer".into())
            .spawn(write)
            .expect("cannot start a thread to write the batch");
        *writing = Some(task);
        true
    }

    /// True while a write is running and its outcome is not yet known.
    fn write_pending(&self) -> bool {
        self.writing().as_ref().is_some_and(|task| !task.is_finished())
    }

    /// Takes the outcome of the write in flight, if any (with [`Settle::IfDone`] only when it
    /// has finished), and does the bookkeeping: a committed batch is reported and mirrored to
    /// Kafka, fenced partitions are dropped, a batch that already landed is not written twice,
    /// and a failed batch is kept to be written again unchanged. Returns whether a write
    /// reached the database; the error of a failed one.
    fn settle(&self, consumer: &BaseConsumer<KafkaContext>, how: Settle) -> Result<bool, StoreError> {
        let mut reached = false;
        loop {
            let task = {
                let mut writing = self.writing();
                match writing.take() {
                    None => return Ok(reached),
                    Some(task) if how == Settle::IfDone && !task.is_finished() => {
                        *writing = Some(task);
                        return Ok(reached);
                    }
                    Some(task) => task,
                }
            };
            let written = match task.join() {
                Ok(written) => written,
                // The writer panicked: its batch is gone with it, and writing anything newer
                // would leave a hole. End the process; the restart recounts from PostgreSQL.
                Err(panic) => std::panic::resume_unwind(panic),
            };
            let Written {
                mut batch,
                prices,
                started,
                result,
            } = written;
            match result {
                Ok(outcome) => {
                    if !outcome.unstorable.is_empty() {
                        error!(
                            rows = outcome.unstorable.len(),
                            "PostgreSQL refused window rows even alone; their usage is in rejected_events (reason unstorable)"
                        );
                    }
                    self.committed(consumer, &batch, started);
                    return Ok(true);
                }
                Err(StoreError::Stale { fenced, applied }) => {
                    reached = true;
                    let done = batch.split_off(&applied);
                    if !done.is_empty() {
                        warn!(partitions = ?applied, "an earlier COMMIT went through although it reported an error; not writing it twice");
                        report_committed(&done, &done.windows(), &[], &prices, started, &self.aggregator);
                        self.committed(consumer, &done, started);
                    }
                    if !fenced.is_empty() {
                        telemetry::partitions_fenced(&fenced);
                        batch.split_off(&fenced);
                        self.aggregator().drop_partitions(&fenced);
                    }
                    if batch.is_empty() {
                        return Ok(reached);
                    }
                    // The rest is written again at once, ahead of anything newer.
                    self.aggregator().failed(batch);
                    self.start_write(None);
                }
                Err(e) => {
                    if e.class() == ErrorClass::Permanent && !batch.isolate {
                        // Writing the same batch again would fail the same way forever (a
                        // stalled partition): write it again at once, isolating the rows
                        // PostgreSQL refuses.
                        telemetry::flush_refused(&e);
                        batch.isolate = true;
                        self.aggregator().failed(batch);
                        self.start_write(None);
                        continue;
                    }
                    self.aggregator().failed(batch);
                    return Err(e);
                }
            }
        }
    }

    fn writing(&self) -> MutexGuard<'_, Option<JoinHandle<Written>>> {
        // As for the aggregator: a panic while holding the lock already ends the process.
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bookkeeping after a batch is known to be in PostgreSQL and reported
    /// ([`report_committed`]).
    fn committed(&self, consumer: &BaseConsumer<KafkaContext>, batch: &FlushBatch, started: Instant) {
        self.aggregator().flushed(batch);
        self.commit_to_kafka(consumer, batch);
        debug!(partitions = batch.parts.len(), took = ?started.elapsed(), "flushed");
    }

    /// Mirrors the stored offsets into Kafka for lag tools. Failure here loses nothing.
    fn commit_to_kafka(&self, consumer: &BaseConsumer<KafkaContext>, batch: &FlushBatch) {
        let mut tpl = TopicPartitionList::new();
        for p in batch.progress() {
            let _ = tpl.add_partition_offset(&self.topic, p.partition, Offset::Offset(p.next_offset));
        }
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(%error, "offset commit to Kafka failed (informational only)");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock already ends the process; poisoning adds nothing.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The metrics of a batch known to be in PostgreSQL, with the watermark and dedup gauges it
/// moved; the `after_commit` fault point comes first, so an abort there leaves the counters
/// behind the database, never ahead.
fn report_committed(
    batch: &FlushBatch,
    windows: &[(&WindowKey, WindowSums)],
    refused: &[WindowSums],
    prices: &PriceBook,
    started: Instant,
    aggregator: &Mutex<Aggregator>,
) {
    faults::reached(FaultPoint::AfterCommit);
    // Refused rows' events count as rejected (`unstorable`), not accepted.
    let (mut counts, mut by_code) = (batch.counts(), batch.rejected_by_code());
    for sums in refused {
        counts.accepted -= sums.events as u64;
        counts.late -= sums.late_events as u64;
        counts.rejected += sums.events as u64;
        *by_code.entry(RejectCode::Unstorable.as_str()).or_default() += sums.events as u64;
    }
    let usage = windows.iter().map(|(key, sums)| telemetry::WindowUsage {
        model: &key.model,
        hardware: &key.hardware,
        start: from_millis(key.start_ms),
        events: sums.events,
        compute: sums.compute,
        storage: sums.storage,
        priceable: !key.usage_from_tokens || key.profile.is_some(),
        labels: &key.labels,
    });
    telemetry::flush_committed(counts, by_code, usage, prices, started.elapsed());
    let agg = lock(aggregator);
    telemetry::assignment(agg.owned_count(), agg.dedup_ids(), agg.watermark());
}

/// librdkafka callbacks: logs into `tracing`, and rebalances that claim partitions in PostgreSQL
/// before any of their messages are fetched.
pub struct KafkaContext {
    pipeline: Arc<Pipeline>,
    /// Set when the broker refused us in a way no retry fixes (see [`error_class::kafka_failure`]).
    failure: Mutex<Option<String>>,
}

impl KafkaContext {
    /// Stops the daemon (draining as for SIGTERM) and remembers why, for its exit.
    fn fail_permanently(&self, failure: KafkaFailure, reason: &str) {
        telemetry::broker_refused(&failure, reason);
        let mut slot = lock(&self.failure);
        if slot.is_none() {
            *slot = Some(format!("kafka: {failure}, not retried: {reason}"));
        }
        self.pipeline.cancel.cancel();
    }
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // librdkafka's texts may quote property values; secrets are scrubbed before logging.
        let message = secret::scrub(message);
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", facility = fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    /// librdkafka's periodic statistics carry each partition's log end (`hi_offset`); lag is
    /// measured against the offset PostgreSQL will resume from, not the Kafka commit.
    /// The same statistics feed stall detection: a partition whose committed offset stays put
    /// while its log end is past it ([`Health::observe`]).
    fn stats(&self, statistics: Statistics) {
        // Bootstrap entries (node id -1) do not count: a broker is reachable once a
        // connection to a cluster member is up.
        let up = statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        self.pipeline.health.set_broker_reachable(up);
        let topic = statistics.topics.get(&self.pipeline.topic);
        let (positions, committed) = {
            let agg = self.pipeline.aggregator();
            (agg.positions(), agg.committed_positions())
        };
        let mut watched = Vec::with_capacity(positions.len());
        for ((partition, next), (_, stored)) in positions.into_iter().zip(committed) {
            let log_end = topic
                .and_then(|t| t.partitions.get(&partition))
                .map(|p| p.hi_offset)
                .filter(|&end| end >= 0);
            if let Some(end) = log_end {
                telemetry::partition_lag(&self.pipeline.topic, partition, end - next.unwrap_or(0));
            }
            watched.push((partition, stored, log_end));
        }
        self.pipeline.health.observe(&watched);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = secret::scrub(reason);
        if let Some(failure) = error_class::kafka_failure(&error, &reason) {
            self.fail_permanently(failure, &reason);
            return;
        }
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.pipeline.health.set_broker_reachable(false);
        }
        telemetry::broker_error(&secret::scrub(&error.to_string()), &reason);
    }
}

impl ConsumerContext for KafkaContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.pipeline.health.joined();
                // Offsets go into the assignment itself rather than a seek afterwards: a seek
                // right after assign races the fetcher (librdkafka #3959).
                if !self.pipeline.claim(consumer, tpl) {
                    return;
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(error) = assigned {
                    error!(%error, "cannot apply the partition assignment");
                }
            }
            RespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions: Vec<i32> = tpl
                    .elements_for_topic(&self.pipeline.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                // The write in flight is settled either way before the partitions go: its
                // outcome decides what their state is. A lost assignment means another member
                // may already own them: writing more would be refused by the fence anyway, so
                // skip straight to dropping.
                let lost = consumer.assignment_lost();
                let flushed = if lost {
                    self.pipeline.settle(consumer, Settle::Wait).map(|_| ())
                } else {
                    self.pipeline.flush_now(consumer, Some(&partitions))
                };
                if let Err(error) = &flushed {
                    warn!(%error, ?partitions, "cannot flush revoked partitions; the next owner recounts them");
                }
                let mut agg = self.pipeline.aggregator();
                // Flushed: nothing of theirs is only in memory, so their state may wait for the
                // assignment that usually follows (see `Aggregator::park`).
                if flushed.is_ok() && !lost {
                    agg.park(&partitions);
                } else {
                    agg.drop_partitions(&partitions);
                }
                self.pipeline.report_assignment(&agg);
                drop(agg);
                info!(?partitions, "partitions revoked");
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = unassigned {
                    error!(%error, "cannot apply the partition revocation");
                }
            }
            other => {
                error!(error = ?other, "rebalance failed");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Builds the group member. Auto-commit is off: offsets are ours to store, in PostgreSQL.
pub fn build_consumer(settings: &KafkaSettings, pipeline: Arc<Pipeline>) -> anyhow::Result<BaseConsumer<KafkaContext>> {
    let base = consumer_properties(settings, &pipeline.owner);
    let mut config = kafka::client_config(&base, settings)
        .map_err(|problems| anyhow::anyhow!("invalid Kafka client configuration: {}", problems.join("; ")))?;
    config.set_log_level(RDKafkaLogLevel::Warning);
    let context = KafkaContext {
        pipeline,
        failure: Mutex::new(None),
    };
    // librdkafka's creation errors may quote a property value: scrubbed.
    let consumer: BaseConsumer<KafkaContext> = config
        .create_with_context(context)
        .map_err(|e| anyhow::anyhow!("{}", kafka::scrubbed(&e)))?;
    Ok(consumer)
}

/// costwatch's own consumer properties; the operator's `kafka.properties` go on top.
pub fn consumer_properties(settings: &KafkaSettings, owner: &str) -> Vec<(&'static str, String)> {
    let start_from = match settings.start_from {
        StartFrom::Earliest => "earliest",
        StartFrom::Latest => "latest",
    };
    vec![
        ("bootstrap.servers", settings.brokers.clone()),
        ("group.id", settings.group_id.clone()),
        ("client.id", format!("costwatch-{owner}")),
        ("enable.auto.commit", "false".into()),
        ("enable.auto.offset.store", "false".into()),
        ("enable.partition.eof", "false".into()),
        ("auto.offset.reset", start_from.into()),
        ("session.timeout.ms", settings.session_timeout.as_millis().to_string()),
        // Statistics carry each partition's log end, for the lag gauge.
        ("statistics.interval.ms", "5000".into()),
        (
            "heartbeat.interval.ms",
            (settings.session_timeout.as_millis() / 4).max(100).to_string(),
        ),
    ]
}

/// Runs the consumer until `pipeline.cancel` fires, then flushes what is pending and leaves the
/// group. Blocking: call it on a thread of its own.
pub fn consume(consumer: BaseConsumer<KafkaContext>, pipeline: Arc<Pipeline>) -> anyhow::Result<()> {
    consumer.subscribe(&[pipeline.topic.as_str()])?;
    info!(topic = %pipeline.topic, source = %pipeline.source.name, format = pipeline.source.format.as_str(), owner = %pipeline.owner, "consuming");

    let mut poll = PollLoop::new();
    // A flush PostgreSQL refuses even with the refused rows isolated: retrying cannot help.
    let mut fatal: Option<StoreError> = None;
    while !pipeline.cancel.is_cancelled() {
        let housekeeping_due = match consumer.poll(Duration::from_millis(100)) {
            None => true,
            Some(Err(error)) => {
                telemetry::broker_error(&error, "consumer poll");
                true
            }
            Some(Ok(message)) => poll.take(&consumer, &pipeline, &message),
        };
        if housekeeping_due {
            if let Err(error) = poll.housekeeping(&consumer, &pipeline) {
                fatal = Some(error);
                break;
            }
        }
    }

    if let Some(error) = fatal {
        // Nothing newer may be written before the failed batch (offsets apply in order), so
        // there is no final flush: the unflushed messages are counted after the restart.
        telemetry::flush_refused_for_good(&error);
        pipeline.cancel.cancel();
        leave_group(consumer);
        return Err(anyhow::Error::new(error)
            .context("a flush failed permanently; the unflushed messages are counted after restart"));
    }
    let unflushed = final_flush(&consumer, &pipeline);
    let refused = leave_group(consumer);
    if let Some(refused) = refused {
        return Err(BrokerRefused(refused).into());
    }
    // A shutdown that could not store everything is not a clean one: say so with the exit code.
    match unflushed {
        Some(source) => Err(FinalFlushFailed(source).into()),
        None => Ok(()),
    }
}

/// The poll loop's own state between messages.
struct PollLoop {
    last_flush: Instant,
    /// When the failed batch is written again, and the backoff that set it.
    retry: Option<(Instant, Backoff)>,
    /// The wall clock for event validation, read at the first message after each housekeeping
    /// round rather than per message: it only enters through the future/too-old limits and the
    /// watermark's cap, and reading it for every message cost 3% of the CPU in profiles.
    clock: Option<DateTime<Utc>>,
    /// Messages since the last housekeeping round.
    unchecked: u32,
}

impl PollLoop {
    fn new() -> Self {
        Self {
            last_flush: Instant::now(),
            retry: None,
            clock: None,
            unchecked: 0,
        }
    }

    /// Counts one message; true when housekeeping is due. Under load the rest of the loop
    /// (liveness, the write in flight, the flush timer) runs once per [`HOUSEKEEPING_EVERY`]
    /// messages: its clock reads and locks cost as much as decoding a message when done for
    /// each one.
    fn take(
        &mut self,
        consumer: &BaseConsumer<KafkaContext>,
        pipeline: &Pipeline,
        message: &BorrowedMessage<'_>,
    ) -> bool {
        let now = *self.clock.get_or_insert_with(Utc::now);
        let partition = message.partition();
        let outcome = pipeline
            .aggregator()
            .ingest(partition, message.offset(), message.payload(), now);
        if let Outcome::Rewind { to } = outcome {
            telemetry::start_rewound(partition, message.offset(), to);
            if let Err(error) = consumer.seek(&pipeline.topic, partition, Offset::Offset(to), Duration::from_secs(10)) {
                warn!(partition, %error, "seek failed; the next message retries it");
            }
        }
        self.unchecked += 1;
        self.unchecked >= HOUSEKEEPING_EVERY
    }

    /// Liveness, the write in flight and the flush timer. Returns the error of a write that
    /// failed permanently even isolating the refused rows.
    fn housekeeping(&mut self, consumer: &BaseConsumer<KafkaContext>, pipeline: &Pipeline) -> Result<(), StoreError> {
        self.unchecked = 0;
        self.clock = None;
        pipeline.health.polled();

        // A write runs while the loop keeps polling; its outcome is taken as soon as it is known.
        if !pipeline.write_pending() {
            let settled = pipeline.settle(consumer, Settle::IfDone);
            written(consumer, pipeline, settled, &mut self.retry)?;
        }
        if !self.flush_due(pipeline) {
            return Ok(());
        }
        // At most one write in flight: the next batch applies on top of this one.
        let settled = pipeline.settle(consumer, Settle::Wait);
        if !written(consumer, pipeline, settled, &mut self.retry)? {
            return Ok(());
        }
        self.last_flush = Instant::now();
        if !pipeline.start_write(None) && self.retry.take().is_some() {
            // The failed batch was settled elsewhere (a rebalance) and nothing is left to write.
            resume(consumer, pipeline);
        }
        Ok(())
    }

    fn flush_due(&self, pipeline: &Pipeline) -> bool {
        match &self.retry {
            // The retry of the failed batch is running; its outcome decides what comes next.
            Some(_) if pipeline.write_pending() => false,
            Some((at, _)) => Instant::now() >= *at,
            None => {
                let full = {
                    let agg = pipeline.aggregator();
                    agg.pending_messages() >= pipeline.flush.max_pending_events
                        || agg.pending_bytes() >= pipeline.flush.max_pending_bytes
                };
                // A write that outlasts the flush interval (a large batch, a slow database) is
                // not waited for: consumption goes on and the next batch starts as soon as it
                // is done. Waiting here let librdkafka's prefetch queue fill up meanwhile, which
                // cost memory and then time to drain. Only a full pending state waits.
                (self.last_flush.elapsed() >= pipeline.flush.interval && !pipeline.write_pending()) || full
            }
        }
    }
}

/// Writes what is pending at shutdown, retrying for up to 30 s; the error when it could not.
fn final_flush(consumer: &BaseConsumer<KafkaContext>, pipeline: &Pipeline) -> Option<StoreError> {
    info!("shutting down: flushing pending usage");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut backoff = Backoff::new();
    loop {
        match pipeline.flush_now(consumer, None) {
            Ok(()) => return None,
            Err(error) if Instant::now() < deadline => {
                let wait = backoff.next_wait();
                warn!(%error, retry_in = ?wait, "final flush failed, retrying");
                std::thread::sleep(wait);
            }
            Err(error) => {
                error!(%error, "giving up on the final flush; the unflushed messages will be counted after restart");
                return Some(error);
            }
        }
    }
}

/// Leaving the group explicitly hands partitions to the other members at once instead of after
/// the session timeout; whatever was stored is in PostgreSQL already.
/// Returns the broker's permanent refusal, if that is what stopped the consumer.
fn leave_group(consumer: BaseConsumer<KafkaContext>) -> Option<String> {
    consumer.unsubscribe();
    let refused = lock(&consumer.context().failure).take();
    drop(consumer);
    info!("left the consumer group");
    refused
}

/// The broker refused costwatch for good (TLS, authentication); the text says how.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerRefused(pub String);

/// The drain at shutdown could not write what was pending. Nothing is lost: the offsets in
/// PostgreSQL still point before those messages, so whoever owns the partitions next counts them.
#[derive(Debug, thiserror::Error)]
#[error("the final flush failed; the unflushed messages will be counted after restart")]
pub struct FinalFlushFailed(#[source] StoreError);

/// Acts on a settled write for the poll loop: after a transient failure, pauses consumption and
/// schedules the retry; after a success that follows failures, resumes. Returns whether the
/// loop may go on to newer work (not before a failed batch's retry is due), or the error of a
/// write that failed permanently even isolating the refused rows: the end of the road.
fn written(
    consumer: &BaseConsumer<KafkaContext>,
    pipeline: &Pipeline,
    settled: Result<bool, StoreError>,
    retry: &mut Option<(Instant, Backoff)>,
) -> Result<bool, StoreError> {
    match settled {
        Ok(reached) => {
            if reached && retry.take().is_some() {
                info!("database writes recovered; resuming consumption");
                resume(consumer, pipeline);
            }
            Ok(true)
        }
        // `settle` writes a batch that failed permanently again at once, isolating the refused
        // rows; only a batch that still failed permanently gets here.
        Err(error) if !error.is_transient() => Err(error),
        Err(error) => {
            let (at, backoff) = retry.get_or_insert_with(|| (Instant::now(), Backoff::new()));
            let wait = backoff.next_wait();
            *at = Instant::now() + wait;
            telemetry::flush_retrying(&error, wait);
            // Pausing keeps memory bounded while we keep polling, which keeps this member in
            // the group (librdkafka evicts members that stop polling).
            match consumer.assignment() {
                Ok(assignment) => {
                    if let Err(error) = consumer.pause(&assignment) {
                        warn!(%error, "cannot pause consumption; pending state grows until the retry");
                    }
                }
                Err(error) => warn!(%error, "cannot read the assignment to pause it"),
            }
            Ok(false)
        }
    }
}

/// Resumes consumption at the offsets the aggregator counts from, not where librdkafka would
/// resume (see [`Aggregator::resume_points`]). The seeks come after the resume: they discard
/// whatever the resumed fetch brings before the next poll.
fn resume(consumer: &BaseConsumer<KafkaContext>, pipeline: &Pipeline) {
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.resume(&assignment);
    }
    let points = pipeline.aggregator().resume_points();
    for (partition, from) in points {
        if let Err(error) = consumer.seek(
            &pipeline.topic,
            partition,
            Offset::Offset(from),
            Duration::from_secs(10),
        ) {
            warn!(partition, %error, "cannot seek back after resuming; the next message checks the position again");
        }
    }
}

/// Messages between two runs of the poll loop's housekeeping under load (every empty poll runs
/// it too). `ingest.max_pending_events` may be overshot by at most this many messages, a
/// finished write is noticed that much later, and the wall clock events are validated against
/// is read once per round: well under a millisecond at full speed; a slow trickle that never
/// leaves the queue empty for a whole poll sees a clock at most this many messages old.
const HOUSEKEEPING_EVERY: u32 = 64;

/// Exponential backoff from 200 ms to 30 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// The first wait: 200 ms.
    pub fn new() -> Self {
        Self {
            next: Duration::from_millis(200),
        }
    }

    /// The wait before the next attempt; each call doubles it, up to 30 s.
    pub fn next_wait(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(30));
        current
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}
