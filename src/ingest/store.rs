//! The ingest feature's SQL: partition claims (fencing), the one-transaction flush that writes
//! window sums, rejections, dedup ids and offsets together (and its isolating retry), and the
//! pruning of old rejected messages. Methods of [`Store`], kept beside the feature they serve.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;

use crate::faults::{self, FaultPoint};
use crate::history::{self, partitions, rollup};
use crate::ingest::aggregate::{Claim, FlushBatch, IngestRules, RejectedMessage, SeenIds};
use crate::ingest::event::{RejectCode, Rejection};
use crate::ingest::window::{from_millis, WindowKey, WindowSize, WindowSums};
use crate::pricing::{CoefficientSource, PriceBook, Rates};
use crate::store::{database_message, Store, StoreError};

/// How the window rows are stamped when written.
#[derive(Debug, Clone, Copy)]
pub struct WindowLayout {
    /// The window size, for each row's `window_end`.
    pub size: WindowSize,
    /// `windows.allowed_lateness` in milliseconds: a row is final once the lowest watermark passes its end plus this.
    pub allowed_lateness_ms: i64,
    /// How much of a refused window row's description is kept in `rejected_events`.
    pub max_rejected_payload_bytes: usize,
}

impl WindowLayout {
    /// The layout the ingestion rules imply.
    pub fn from_rules(rules: &IngestRules) -> Self {
        Self {
            size: rules.window,
            allowed_lateness_ms: rules.allowed_lateness_ms,
            max_rejected_payload_bytes: rules.max_rejected_payload_bytes,
        }
    }
}

/// What a committed write left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Positions in the written windows of the rows PostgreSQL refused even alone (only when
    /// the batch was written isolating, see [`FlushBatch::isolate`]); their usage went to
    /// `rejected_events` with reason `unstorable` and the database's message.
    pub unstorable: Vec<usize>,
}

impl Store {
    /// Deletes rejected messages received before `before`, a bounded batch per transaction,
    /// while no other instance is doing the same (a transaction-scoped advisory lock: whoever
    /// gets it prunes, the others skip). Returns the rows deleted, or `None` when another
    /// instance held the lock.
    pub async fn prune_rejected(&self, before: DateTime<Utc>) -> Result<Option<u64>, StoreError> {
        let mut deleted = 0;
        loop {
            let mut tx = self.pool().begin().await?;
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(PRUNE_LOCK)
                .fetch_one(&mut *tx)
                .await?;
            if !locked {
                return Ok((deleted > 0).then_some(deleted));
            }
            let n = sqlx::query(
                "DELETE FROM rejected_event WHERE id IN
                   (SELECT id FROM rejected_event WHERE received_at < $1 ORDER BY id LIMIT $2)",
            )
            .bind(before)
            .bind(PRUNE_BATCH)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            deleted += n;
            if n < PRUNE_BATCH as u64 {
                return Ok(Some(deleted));
            }
        }
    }

    /// Takes over `partitions` for `owner`: bumps each one's epoch (fencing out the previous
    /// owner) and returns where it stands, with the dedup ids inside the horizon.
    pub async fn claim(
        &self,
        topic: &str,
        owner: &str,
        partitions: &[i32],
        dedup_horizon_ms: i64,
    ) -> Result<Vec<Claim>, StoreError> {
        self.claim_continuing(topic, owner, partitions, dedup_horizon_ms, &[])
            .await
    }

    /// [`Store::claim`], told which partitions this instance parked and at which (epoch, next
    /// offset). A partition that comes back at exactly the next epoch and the same offset was
    /// claimed by nobody in between (every claim bumps the epoch by one), so PostgreSQL holds
    /// what the parked state says: its claim is marked `continued` and its dedup ids are not
    /// read again.
    pub async fn claim_continuing(
        &self,
        topic: &str,
        owner: &str,
        partitions: &[i32],
        dedup_horizon_ms: i64,
        parked: &[(i32, i64, i64)],
    ) -> Result<Vec<Claim>, StoreError> {
        let mut sorted = partitions.to_vec();
        sorted.sort_unstable();
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(
            "INSERT INTO partition_progress (topic, partition, epoch, owner)
             SELECT $1, p, 1, $3 FROM UNNEST($2::int4[]) AS p
             ON CONFLICT (topic, partition) DO UPDATE
               SET epoch = partition_progress.epoch + 1, owner = excluded.owner, claimed_at = now()
             RETURNING partition, epoch, next_offset, watermark",
        )
        .bind(topic)
        .bind(&sorted)
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?;
        let mut claims: Vec<Claim> = rows
            .iter()
            .map(|r| {
                let (partition, epoch, next_offset) = (r.get("partition"), r.get("epoch"), r.get("next_offset"));
                let continued = parked
                    .iter()
                    .any(|&(p, e, next)| p == partition && e + 1 == epoch && next_offset == Some(next));
                Claim {
                    partition,
                    epoch,
                    next_offset,
                    watermark: r.get("watermark"),
                    seen: SeenIds::default(),
                    continued,
                }
            })
            .collect();
        let load: Vec<i32> = claims.iter().filter(|c| !c.continued).map(|c| c.partition).collect();
        let seen_rows = sqlx::query(
            "SELECT s.partition, s.ids
             FROM seen_event_batch s JOIN partition_progress p USING (topic, partition)
             WHERE s.topic = $1 AND s.partition = ANY($2)
               AND s.max_event_time >= p.watermark - ($3::bigint * interval '1 millisecond')",
        )
        .bind(topic)
        .bind(&load)
        .bind(dedup_horizon_ms)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        for r in seen_rows {
            let partition: i32 = r.get("partition");
            if let Some(c) = claims.iter_mut().find(|c| c.partition == partition) {
                let ids: &[u8] = r.get("ids");
                c.seen.extend_packed(ids);
            }
        }
        Ok(claims)
    }

    /// Writes a batch in one transaction. Offsets move only if this instance still holds each
    /// partition's epoch; otherwise nothing is written and [`StoreError::Stale`] names them.
    pub async fn flush(
        &self,
        topic: &str,
        batch: &FlushBatch,
        prices: &PriceBook,
        layout: WindowLayout,
    ) -> Result<WriteOutcome, StoreError> {
        self.write(topic, topic, batch, &batch.windows(), prices, layout).await
    }

    /// [`Store::flush`] with the batch's windows already merged ([`FlushBatch::windows`]), for a
    /// caller that uses them again afterwards.
    ///
    /// A batch marked [`FlushBatch::isolate`] (its plain write failed with a permanent error)
    /// is written row group by row group under savepoints, halving a refused group until the
    /// rows PostgreSQL refuses even alone are found: those go to `rejected_events` as
    /// `unstorable` with the database's message, and everything else commits as usual, in the
    /// same transaction as the offsets. Validation makes this rare (every accepted event is
    /// storable by construction); it is the net for what validation did not foresee.
    pub async fn write(
        &self,
        topic: &str,
        source: &str,
        batch: &FlushBatch,
        windows: &[(&WindowKey, WindowSums)],
        prices: &PriceBook,
        layout: WindowLayout,
    ) -> Result<WriteOutcome, StoreError> {
        let mut days: Vec<i64> = windows.iter().map(|(k, _)| history::day_of_ms(k.start_ms)).collect();
        days.sort_unstable();
        days.dedup();
        partitions::ensure_days(self, &days).await?;
        match self
            .write_once(topic, source, batch, windows, &days, prices, layout)
            .await
        {
            // Another instance's retention dropped a partition this process thought was there:
            // make sure of them again and write once more.
            Err(e) if partitions::is_missing_partition(&e) => {
                partitions::forget(self);
                partitions::ensure_days(self, &days).await?;
                self.write_once(topic, source, batch, windows, &days, prices, layout)
                    .await
            }
            outcome => outcome,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_once(
        &self,
        topic: &str,
        source: &str,
        batch: &FlushBatch,
        windows: &[(&WindowKey, WindowSums)],
        days: &[i64],
        prices: &PriceBook,
        layout: WindowLayout,
    ) -> Result<WriteOutcome, StoreError> {
        let mut tx = self.pool().begin().await?;

        // A stalled flush (a lock, a slow disk) must fail and be retried rather than block the
        // consumer thread so long that the group evicts it.
        sqlx::query("SET LOCAL statement_timeout = '10s'")
            .execute(&mut *tx)
            .await?;

        self.advance_progress(&mut tx, topic, batch).await?;
        // Every writer of a day's rows holds the day's lock until it commits: the roll-up
        // deltas below rely on the rows' old content staying what they read.
        rollup::lock_days(&mut tx, days).await?;

        // In statements of bounded size: one statement for a 30,000-row flush held about 35 MB
        // of encoded arguments at once (the argument buffer and sqlx's copy of it in the Bind
        // message), the largest single allocation of a busy instance. The rows stay sorted
        // across statements, so concurrent writers still lock them in the same order. A key
        // that appears twice (sums too long to add exactly in memory) goes in a later round:
        // one upsert statement cannot touch a row twice.
        let mut unstorable: Vec<(usize, String)> = Vec::new();
        for round in rounds(windows) {
            for chunk in round.chunks(WINDOW_ROWS_PER_STATEMENT) {
                if batch.isolate {
                    let feed = (topic, source);
                    unstorable.extend(isolate_windows(&mut tx, feed, windows, chunk, prices, layout).await?);
                } else {
                    let rows: Vec<_> = chunk.iter().map(|&i| &windows[i]).collect();
                    write_windows(&mut tx, (topic, source), &rows, prices, layout).await?;
                }
            }
        }

        let refused: Vec<RejectedMessage> = unstorable
            .iter()
            .map(|(i, message)| unstorable_window(&windows[*i], message, layout))
            .collect();
        let rejected: Vec<&RejectedMessage> = batch.rejected().chain(&refused).collect();
        insert_rejected(&mut tx, (topic, source), &rejected, batch.isolate).await?;
        self.remember_ids(&mut tx, topic, batch).await?;

        faults::reached(FaultPoint::BeforeCommit);
        tx.commit().await?;
        if faults::reached(FaultPoint::AmbiguousCommit) {
            return Err(StoreError::Database(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected fault: connection dropped after COMMIT",
            ))));
        }
        Ok(WriteOutcome {
            unstorable: unstorable.into_iter().map(|(i, _)| i).collect(),
        })
    }

    /// Moves each partition's offset and watermark, first in the flush: it takes the partition
    /// rows' locks, so a concurrent claim either waits for this commit (and then reads its
    /// offsets) or has already fenced us out. The `prev_offset` condition makes the batch apply
    /// only once, even when retried after a COMMIT whose outcome we never heard. Rolls back and
    /// returns [`StoreError::Stale`] when any partition did not match.
    async fn advance_progress(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        topic: &str,
        batch: &FlushBatch,
    ) -> Result<(), StoreError> {
        let progress: Vec<_> = batch.progress().collect();
        let partitions: Vec<i32> = progress.iter().map(|p| p.partition).collect();
        let epochs: Vec<i64> = progress.iter().map(|p| p.epoch).collect();
        let prev: Vec<Option<i64>> = progress.iter().map(|p| p.prev_offset).collect();
        let offsets: Vec<i64> = progress.iter().map(|p| p.next_offset).collect();
        let watermarks: Vec<Option<DateTime<Utc>>> = progress.iter().map(|p| p.watermark).collect();
        let updated: Vec<i32> = sqlx::query_scalar(
            "UPDATE partition_progress AS p
               SET next_offset = u.next_offset, watermark = COALESCE(u.watermark, p.watermark), updated_at = now()
             FROM UNNEST($2::int4[], $3::int8[], $4::int8[], $5::int8[], $6::timestamptz[])
                  AS u(partition, epoch, prev_offset, next_offset, watermark)
             WHERE p.topic = $1 AND p.partition = u.partition AND p.epoch = u.epoch
               AND p.next_offset IS NOT DISTINCT FROM u.prev_offset
             RETURNING p.partition",
        )
        .bind(topic)
        .bind(&partitions)
        .bind(&epochs)
        .bind(&prev)
        .bind(&offsets)
        .bind(&watermarks)
        .fetch_all(&mut **tx)
        .await?;
        if updated.len() == partitions.len() {
            return Ok(());
        }
        let missing: Vec<i32> = partitions.iter().copied().filter(|p| !updated.contains(p)).collect();
        let rows = sqlx::query(
            "SELECT partition, epoch, next_offset FROM partition_progress WHERE topic = $1 AND partition = ANY($2)",
        )
        .bind(topic)
        .bind(&missing)
        .fetch_all(&mut **tx)
        .await?;
        let (mut fenced, mut applied) = (Vec::new(), Vec::new());
        for p in progress.iter().filter(|p| missing.contains(&p.partition)) {
            let row = rows.iter().find(|r| r.get::<i32, _>("partition") == p.partition);
            let already = row.is_some_and(|r| {
                r.get::<i64, _>("epoch") == p.epoch && r.get::<Option<i64>, _>("next_offset") == Some(p.next_offset)
            });
            if already {
                applied.push(p.partition);
            } else {
                fenced.push(p.partition);
            }
        }
        Err(StoreError::Stale { fenced, applied })
    }

    /// Stores the batch's new dedup ids (one packed row per partition: a per-event row cost more
    /// than everything else in the flush together) and forgets those past the horizon.
    async fn remember_ids(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        topic: &str,
        batch: &FlushBatch,
    ) -> Result<(), StoreError> {
        let packed: Vec<(i32, DateTime<Utc>, &[u8])> = batch
            .parts
            .iter()
            .filter_map(|part| Some((part.progress.partition, part.seen.newest()?, part.seen.as_bytes())))
            .collect();
        if !packed.is_empty() {
            sqlx::query(
                "INSERT INTO seen_event_batch (topic, partition, max_event_time, ids)
                 SELECT $1, * FROM UNNEST($2::int4[], $3::timestamptz[], $4::bytea[])",
            )
            .bind(topic)
            .bind(packed.iter().map(|p| p.0).collect::<Vec<_>>())
            .bind(packed.iter().map(|p| p.1).collect::<Vec<_>>())
            .bind(packed.iter().map(|p| p.2).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
        }

        let forget: Vec<(i32, DateTime<Utc>)> = batch
            .progress()
            .filter_map(|p| Some((p.partition, p.forget_before?)))
            .collect();
        if !forget.is_empty() {
            sqlx::query(
                "DELETE FROM seen_event_batch s USING UNNEST($2::int4[], $3::timestamptz[]) AS u(partition, before)
                 WHERE s.topic = $1 AND s.partition = u.partition AND s.max_event_time < u.before",
            )
            .bind(topic)
            .bind(forget.iter().map(|f| f.0).collect::<Vec<_>>())
            .bind(forget.iter().map(|f| f.1).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

/// The advisory lock key of the rejected-message pruning job ("cw-prune" in ASCII).
const PRUNE_LOCK: i64 = 0x6377_2d70_7275_6e65;
/// Rows deleted per pruning transaction.
const PRUNE_BATCH: i64 = 10_000;

/// Positions of `windows` (sorted by key) in write rounds: every key's first row in the first
/// round, its second row (if any) in the second, and so on. Without repeated keys, the usual
/// case, that is one round of every position.
fn rounds(windows: &[(&WindowKey, WindowSums)]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = vec![Vec::with_capacity(windows.len())];
    let mut repeat = 0;
    for i in 0..windows.len() {
        repeat = if i > 0 && windows[i - 1].0 == windows[i].0 {
            repeat + 1
        } else {
            0
        };
        if rounds.len() <= repeat {
            rounds.push(Vec::new());
        }
        rounds[repeat].push(i);
    }
    rounds
}

/// Writes the window rows at `positions` of `windows` under savepoints, halving any group
/// PostgreSQL refuses with a permanent error until single rows remain; returns those rows'
/// positions with the database's message. A transient error aborts the whole write (it is
/// retried as usual).
async fn isolate_windows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    feed: Feed<'_>,
    windows: &[(&WindowKey, WindowSums)],
    positions: &[usize],
    prices: &PriceBook,
    layout: WindowLayout,
) -> Result<Vec<(usize, String)>, StoreError> {
    let mut refused = Vec::new();
    // Depth first, left half first: rows are still written in key order.
    let mut groups = vec![positions];
    while let Some(group) = groups.pop() {
        let rows: Vec<_> = group.iter().map(|&i| &windows[i]).collect();
        sqlx::query("SAVEPOINT costwatch_isolate").execute(&mut **tx).await?;
        let written = write_windows(tx, feed, &rows, prices, layout).await;
        match settle_savepoint(tx, written).await? {
            None => {}
            Some(message) if group.len() == 1 => refused.push((group[0], message)),
            Some(_) => {
                let (left, right) = group.split_at(group.len() / 2);
                groups.push(right);
                groups.push(left);
            }
        }
    }
    Ok(refused)
}

/// Ends the savepoint `costwatch_isolate` after a write: released when it succeeded (`None`),
/// rolled back to when it failed with a permanent error (the database's message; the
/// transaction goes on), and a transient error is returned as is.
async fn settle_savepoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    written: Result<(), StoreError>,
) -> Result<Option<String>, StoreError> {
    let refused = match written {
        Ok(()) => None,
        Err(e) if e.is_transient() => return Err(e),
        Err(e) => Some(database_message(&e)),
    };
    if refused.is_some() {
        sqlx::query("ROLLBACK TO SAVEPOINT costwatch_isolate")
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("RELEASE SAVEPOINT costwatch_isolate")
        .execute(&mut **tx)
        .await?;
    Ok(refused)
}

/// Rejected messages per INSERT statement, and at most this many payload bytes in one.
const REJECTED_ROWS_PER_STATEMENT: usize = 1024;
const REJECTED_BYTES_PER_STATEMENT: usize = 4 * 1024 * 1024;

/// Inserts rejected messages in statements of bounded size. `isolating`: a group PostgreSQL
/// refuses with a permanent error is halved down to single rows, and a single refused row is
/// kept without its payload, its reason saying why; the message is never lost.
async fn insert_rejected(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    feed: Feed<'_>,
    rejected: &[&RejectedMessage],
    isolating: bool,
) -> Result<(), StoreError> {
    let mut groups: Vec<&[&RejectedMessage]> = Vec::new();
    let (mut from, mut bytes) = (0, 0);
    for (i, m) in rejected.iter().enumerate() {
        if i > from
            && (i - from >= REJECTED_ROWS_PER_STATEMENT || bytes + m.payload.len() > REJECTED_BYTES_PER_STATEMENT)
        {
            groups.push(&rejected[from..i]);
            (from, bytes) = (i, 0);
        }
        bytes += m.payload.len();
    }
    if from < rejected.len() {
        groups.push(&rejected[from..]);
    }
    groups.reverse();
    while let Some(group) = groups.pop() {
        if !isolating {
            write_rejected(tx, feed, group).await?;
            continue;
        }
        sqlx::query("SAVEPOINT costwatch_isolate").execute(&mut **tx).await?;
        let written = write_rejected(tx, feed, group).await;
        match settle_savepoint(tx, written).await? {
            None => {}
            Some(message) if group.len() == 1 => {
                let m = group[0];
                let kept = RejectedMessage {
                    rejection: Rejection::new(
                        m.rejection.code,
                        format!(
                            "{} (the payload was not kept: PostgreSQL refused it: {message})",
                            m.rejection.message
                        ),
                    ),
                    payload: Vec::new(),
                    ..m.clone()
                };
                write_rejected(tx, feed, &[&kept]).await?;
            }
            Some(_) => {
                let (left, right) = group.split_at(group.len() / 2);
                groups.push(right);
                groups.push(left);
            }
        }
    }
    Ok(())
}

async fn write_rejected(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    (topic, source): Feed<'_>,
    r: &[&RejectedMessage],
) -> Result<(), StoreError> {
    // One message may hold several rejected events (an OTLP export): the first is kept.
    sqlx::query(
        "INSERT INTO rejected_event (topic, source, partition, kafka_offset, reason_code, reason_message, payload,
                payload_size, payload_sha256, payload_is_text)
         SELECT $1, $10, * FROM UNNEST($2::int4[], $3::int8[], $4::text[], $5::text[], $6::bytea[], $7::int8[],
                $8::bytea[], $9::bool[])
         ON CONFLICT (topic, partition, kafka_offset) DO NOTHING",
    )
    .bind(topic)
    .bind(r.iter().map(|m| m.partition).collect::<Vec<_>>())
    .bind(r.iter().map(|m| m.offset).collect::<Vec<_>>())
    .bind(r.iter().map(|m| m.rejection.code.as_str()).collect::<Vec<_>>())
    .bind(r.iter().map(|m| m.rejection.message.as_str()).collect::<Vec<_>>())
    .bind(r.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>())
    .bind(r.iter().map(|m| m.payload_size).collect::<Vec<_>>())
    .bind(r.iter().map(|m| m.payload_sha256.as_slice()).collect::<Vec<_>>())
    .bind(r.iter().map(|m| m.is_text()).collect::<Vec<_>>())
    .bind(source)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A window row PostgreSQL refused, as a rejected message: named by the first message that
/// added to it, with the row's content (key and sums) as its payload.
fn unstorable_window((key, sums): &(&WindowKey, WindowSums), message: &str, layout: WindowLayout) -> RejectedMessage {
    let row = serde_json::json!({
        "window_start": from_millis(key.start_ms),
        "model": key.model,
        "hardware": key.hardware,
        "labels": &*key.labels,
        "events": sums.events,
        "compute": sums.compute,
        "storage": sums.storage,
    })
    .to_string();
    let rejection = Rejection::new(
        RejectCode::Unstorable,
        format!(
            "PostgreSQL refused the window row of {} events from this offset on: {message}",
            sums.events
        ),
    );
    RejectedMessage::new(
        sums.origin.0,
        sums.origin.1,
        rejection,
        row.as_bytes(),
        layout.max_rejected_payload_bytes,
    )
}

/// Where a flush's rows and rejections came from: the topic and its source's name.
type Feed<'a> = (&'a str, &'a str);

/// Window rows per INSERT statement of a flush (see [`Store::write`]).
const WINDOW_ROWS_PER_STATEMENT: usize = 4096;

/// Writes `windows` to `window_usage` with the roll-up deltas they imply (see
/// [`crate::history::rollup`]), under the days' locks the flush holds.
///
/// The usual row keeps its price: it is new, or its stored identity equals the one this flush
/// computed. One statement adds those ([`Upsert::SameIdentity`]) and their deltas are just what
/// was added, so nothing is read back. A row priced anew (prices or coefficients changed since
/// it was stored) is left alone by that statement; only then are the rows read, those whose
/// stored identity differs found, and moved whole to the new identity. Reading every row's old
/// content first tripled PostgreSQL's share of a flush (BENCHMARKS.md, session 6).
async fn write_windows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    feed: Feed<'_>,
    windows: &[&(&WindowKey, WindowSums)],
    prices: &PriceBook,
    layout: WindowLayout,
) -> Result<(), StoreError> {
    let rows: Vec<NewRow> = windows
        .iter()
        .map(|&&(key, sums)| NewRow::of(feed, key, sums, prices, layout))
        .collect();
    let applied = upsert_windows(tx, &rows, Upsert::SameIdentity).await?;
    let added = |row: &NewRow| rollup::row_change(&row.key, None, &row.sums, &row.identity, row.finalizes_at);
    if applied == rows.len() as u64 {
        // The usual case: every row added to, none priced anew. Its delta is the row itself,
        // moved rather than cloned (eight strings a row).
        let deltas: Vec<rollup::Delta> = rows.into_iter().map(NewRow::into_delta).collect();
        return rollup::apply(tx, &deltas).await;
    }
    // After that statement every row is stored; those whose identity is still not this flush's
    // are exactly the ones it skipped, their old content untouched.
    let stored = read_rows(tx, &rows).await?;
    let mut deltas = Vec::with_capacity(rows.len() + 1);
    let mut repriced = Vec::new();
    for (row, stored) in rows.iter().zip(stored) {
        match stored {
            Some((identity, sums)) if identity != row.identity => {
                let old = Some((&identity, &sums));
                deltas.extend(rollup::row_change(
                    &row.key,
                    old,
                    &row.sums,
                    &row.identity,
                    row.finalizes_at,
                ));
                repriced.push(row.clone());
            }
            _ => deltas.extend(added(row)),
        }
    }
    upsert_windows(tx, &repriced, Upsert::Replace).await?;
    rollup::apply(tx, &deltas).await
}

/// What [`upsert_windows`] does to a stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upsert {
    /// Adds to it only if its identity equals the new one; leaves it alone otherwise.
    SameIdentity,
    /// Adds to it and gives it the new identity.
    Replace,
}

/// A window row as this flush writes it: its key, what it adds, and its identity now.
#[derive(Clone)]
struct NewRow {
    key: rollup::RowKey,
    end: DateTime<Utc>,
    finalizes_at: DateTime<Utc>,
    sums: rollup::Sums,
    identity: rollup::Identity,
}

impl NewRow {
    fn of(
        (topic, source): Feed<'_>,
        key: &WindowKey,
        sums: WindowSums,
        prices: &PriceBook,
        layout: WindowLayout,
    ) -> Self {
        let end_ms = key.start_ms + layout.size.millis();
        // Coefficients in force at the window's start, as `rerate` would choose them, so that
        // a live-priced row and a re-rated one agree.
        let priced = prices.priced(&key.model, &key.hardware, from_millis(key.start_ms));
        // Tokens that no usage profile turned into T and S have no cost yet: unpriced, like a
        // hardware without a price, until a profile and `rerate` derive them.
        let priced = priced.filter(|_| !key.usage_from_tokens || key.profile.is_some());
        NewRow {
            key: rollup::RowKey {
                window_start: from_millis(key.start_ms),
                topic: topic.to_owned(),
                source: source.to_owned(),
                model: key.model.as_str().to_owned(),
                hardware: key.hardware.as_str().to_owned(),
                // BTreeMap serializes with sorted keys, so one label set always has one text form.
                labels: serde_json::to_string(&key.labels).unwrap_or_else(|_| "{}".into()),
                usage_from_tokens: key.usage_from_tokens,
            },
            end: from_millis(end_ms),
            finalizes_at: from_millis(end_ms + layout.allowed_lateness_ms),
            sums: rollup::Sums {
                events: sums.events,
                late_events: sums.late_events,
                compute: sums.compute.value(),
                storage: sums.storage.value(),
                input_tokens: sums.input_tokens,
                output_tokens: sums.output_tokens,
            },
            identity: rollup::Identity {
                profile: key.profile.as_deref().map(str::to_owned),
                currency: prices.currency().to_owned(),
                price_id: priced.map(|p| p.price_id.to_string()),
                coefficient_version: priced.and_then(|p| p.source.version()),
                rates: priced.map(|p| p.rates),
                coefficients_assumed: priced.is_some_and(|p| p.source == CoefficientSource::Unit),
            },
        }
    }
}

impl NewRow {
    /// The roll-up delta of a row added to under its own identity, `+sums`: what
    /// [`rollup::row_change`] gives for a row without old content, moved instead of cloned.
    fn into_delta(self) -> rollup::Delta {
        rollup::Delta {
            key: self.key,
            identity: self.identity,
            sums: self.sums,
            finalizes_at: self.finalizes_at,
        }
    }
}

/// The key columns of `rows`, bound as `$1` to `$7` in the order of `window_usage`'s key.
fn bind_keys<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    rows: &'q [NewRow],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(rows.iter().map(|r| r.key.model.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key.hardware.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key.labels.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key.topic.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key.source.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key.usage_from_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key.window_start).collect::<Vec<_>>())
}

/// The stored content and identity of each of `rows` (in order; `None`: not stored yet).
async fn read_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[NewRow],
) -> Result<Vec<Option<(rollup::Identity, rollup::Sums)>>, StoreError> {
    let found = bind_keys(
        sqlx::query(
            "SELECT k.i, w.profile, w.currency, w.price_id, w.coefficient_version, w.compute_price, w.storage_price,
                    w.k1, w.k2, w.coefficients_assumed, w.events, w.late_events, w.compute, w.storage,
                    w.input_tokens, w.output_tokens
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::timestamptz[])
                  WITH ORDINALITY AS k(m, h, l, t, s, uft, ws, i)
             JOIN window_usage w ON w.model = k.m AND w.hardware = k.h AND w.labels = k.l::jsonb AND w.topic = k.t
                                AND w.source = k.s AND w.usage_from_tokens = k.uft AND w.window_start = k.ws",
        ),
        rows,
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut old = vec![None; rows.len()];
    for r in &found {
        let i: i64 = r.get("i");
        old[(i - 1) as usize] = Some((rollup::Identity::from_row(r), rollup::Sums::from_row(r)));
    }
    Ok(old)
}

/// The upsert of window rows, `$1` to `$7` the key ([`bind_keys`]), then the rest of the row.
const UPSERT_WINDOWS: &str =
    "INSERT INTO window_usage AS w (model, hardware, labels, topic, source, usage_from_tokens, window_start,
                    window_end, finalizes_at, events, late_events, compute, storage, input_tokens, output_tokens,
                    profile, currency, price_id, coefficient_version, compute_price, storage_price, k1, k2,
                    coefficients_assumed)
             SELECT m, h, l::jsonb, t, s, uft, ws, e, f, ev, le, c, st, it, ot, prof, cur, pid, cv, cp, sp, a, b, ass
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::timestamptz[],
                         $8::timestamptz[], $9::timestamptz[], $10::int8[], $11::int8[], $12::numeric[],
                         $13::numeric[], $14::numeric[], $15::numeric[], $16::text[], $17::text[], $18::text[],
                         $19::int8[], $20::numeric[], $21::numeric[], $22::numeric[], $23::numeric[], $24::bool[])
                  AS t(m, h, l, t, s, uft, ws, e, f, ev, le, c, st, it, ot, prof, cur, pid, cv, cp, sp, a, b, ass)
             ON CONFLICT (model, hardware, labels, topic, source, usage_from_tokens, window_start) DO UPDATE SET
                 events = w.events + excluded.events,
                 late_events = w.late_events + excluded.late_events,
                 compute = w.compute + excluded.compute,
                 storage = w.storage + excluded.storage,
                 input_tokens = w.input_tokens + excluded.input_tokens,
                 output_tokens = w.output_tokens + excluded.output_tokens,
                 profile = excluded.profile,
                 currency = excluded.currency,
                 price_id = excluded.price_id,
                 coefficient_version = excluded.coefficient_version,
                 compute_price = excluded.compute_price,
                 storage_price = excluded.storage_price,
                 k1 = excluded.k1,
                 k2 = excluded.k2,
                 coefficients_assumed = excluded.coefficients_assumed,
                 updated_at = now()";

/// The condition that makes [`UPSERT_WINDOWS`] leave a row priced otherwise alone.
const SAME_IDENTITY: &str = "
             WHERE w.profile IS NOT DISTINCT FROM excluded.profile AND w.currency = excluded.currency
               AND w.price_id IS NOT DISTINCT FROM excluded.price_id
               AND w.coefficient_version IS NOT DISTINCT FROM excluded.coefficient_version
               AND w.compute_price IS NOT DISTINCT FROM excluded.compute_price
               AND w.storage_price IS NOT DISTINCT FROM excluded.storage_price
               AND w.k1 IS NOT DISTINCT FROM excluded.k1 AND w.k2 IS NOT DISTINCT FROM excluded.k2
               AND w.coefficients_assumed = excluded.coefficients_assumed";

/// The upsert of `rows` into `window_usage`: sums added, and the identity replaced or required
/// to be unchanged (`mode`). Returns how many rows it inserted or changed.
async fn upsert_windows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[NewRow],
    mode: Upsert,
) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let sql = match mode {
        Upsert::SameIdentity => format!("{UPSERT_WINDOWS}{SAME_IDENTITY}"),
        Upsert::Replace => UPSERT_WINDOWS.to_owned(),
    };
    let rate = |pick: fn(&Rates) -> Decimal| -> Vec<Option<Decimal>> {
        rows.iter().map(|r| r.identity.rates.as_ref().map(pick)).collect()
    };
    let sum = |pick: fn(&rollup::Sums) -> Decimal| -> Vec<Decimal> { rows.iter().map(|r| pick(&r.sums)).collect() };
    let done = bind_keys(sqlx::query(&sql), rows)
        .bind(rows.iter().map(|r| r.end).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.finalizes_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.sums.events).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.sums.late_events).collect::<Vec<_>>())
        .bind(sum(|s| s.compute))
        .bind(sum(|s| s.storage))
        .bind(sum(|s| s.input_tokens))
        .bind(sum(|s| s.output_tokens))
        .bind(rows.iter().map(|r| r.identity.profile.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.identity.currency.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.identity.price_id.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.identity.coefficient_version).collect::<Vec<_>>())
        .bind(rate(|r| r.compute_price.value()))
        .bind(rate(|r| r.storage_price.value()))
        .bind(rate(|r| r.k1.value()))
        .bind(rate(|r| r.k2.value()))
        .bind(rows.iter().map(|r| r.identity.coefficients_assumed).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected())
}
