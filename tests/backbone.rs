//! The backbone, end to end: Kafka usage events to exact window costs in PostgreSQL, against
//! the real broker and the real database, with the real `costwatch` binary.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{ago, dec, event, raw, World};
use costwatch::ingest::aggregate::{Aggregator, Outcome};
use costwatch::loadgen::{self, LoadSpec};
use costwatch::store::StoreError;
use rust_decimal::Decimal;
use sqlx::Row;

const WAIT: Duration = Duration::from_secs(120);

fn spec(count: u64, seed: u64) -> LoadSpec {
    LoadSpec {
        count,
        seed,
        models: 5,
        hardware: 3,
        rate: 0,
        duplicates: 0.03,
        late: 0.02,
        malformed: 0.02,
        hostile: 0.0,
        late_by: Duration::from_secs(600),
        span: Duration::from_secs(1200),
        end: Utc::now(),
    }
}

/// Compares every (model, hardware) total in `usage_costs` with the generator's ground truth.
async fn assert_exact(world: &World, expected: &loadgen::Expected) {
    world.assert_totals(expected, "backbone").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worked_example_is_priced_at_130() {
    let world = World::new(1).await;
    world
        .produce(vec![event(
            "req-7f3a",
            &ago(Duration::from_secs(30)),
            "qwen2-7b-instruct",
            "a100-80g",
            "1000",
            "500",
        )])
        .await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(1, WAIT).await;

    let row = sqlx::query(
        "SELECT events, compute, storage, compute_cost, storage_cost, total_cost, currency FROM usage_costs",
    )
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("events"), 1);
    assert_eq!(row.get::<Decimal, _>("compute"), dec("1000"));
    assert_eq!(row.get::<Decimal, _>("storage"), dec("500"));
    assert_eq!(row.get::<Decimal, _>("compute_cost"), dec("50"));
    assert_eq!(row.get::<Decimal, _>("storage_cost"), dec("80"));
    assert_eq!(row.get::<Decimal, _>("total_cost"), dec("130"));
    assert_eq!(row.get::<String, _>("currency"), "USD");
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn tens_of_thousands_of_events_over_four_partitions_sum_exactly() {
    let world = World::new(4).await;
    let (messages, expected) = loadgen::generate(&spec(30_000, 42));
    // Produced before the first start: a new group must begin at the earliest offset.
    world.produce(messages).await;
    let mut daemon = world.start(&world.config(""));
    world.wait_drained(expected.messages, WAIT).await;

    assert_exact(&world, &expected).await;
    assert_eq!(world.accepted_events().await, expected.accepted as i64);

    // A priced pair costs exactly C_C*k1*T + C_S*k2*S of its totals; an unpriced one is NULL.
    let priced = expected
        .totals
        .iter()
        .find(|t| t.model == "model-0" && t.hardware == "hw-0")
        .unwrap();
    let want = dec("0.0004") * dec("1.1") * priced.compute + dec("0.00002") * dec("0.9") * priced.storage;
    let got: Decimal =
        sqlx::query_scalar("SELECT sum(total_cost) FROM usage_costs WHERE model = 'model-0' AND hardware = 'hw-0'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(got, want);
    let unpriced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_costs WHERE hardware = 'hw-2' AND (total_cost IS NOT NULL OR compute_cost IS NOT NULL)",
    )
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert_eq!(unpriced, 0, "hw-2 has no price: its cost must be NULL, never 0");
    let late: i64 = sqlx::query_scalar("SELECT sum(late_events)::int8 FROM usage_costs")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert!(late > 0, "events stamped 10 minutes back must be counted as late");
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_whose_final_flush_fails_exits_non_zero_and_says_so() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(90));
    world.produce(vec![event("a", &ts, "m", "a100-80g", "1", "1")]).await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(1, WAIT).await;
    // A transient failure that outlasts the drain: every flush waits on the lock until its
    // 10 s statement timeout (a dropped database would be a permanent failure, which stops
    // costwatch by itself; see tests/hostile.rs).
    let mut lock = world.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE window_usage IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    world.produce(vec![event("b", &ts, "m", "a100-80g", "1", "1")]).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !daemon.log_text().contains("flush failed; pausing consumption") {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush failed after the database was dropped:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The final flush retries for 30 s before it gives up.
    let status = daemon.terminate(WAIT);
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("giving up on the final flush"), "{log}");
    assert!(
        log.lines()
            .any(|l| l
                .starts_with("error: the final flush failed; the unflushed messages will be counted after restart: ")),
        "{log}"
    );
    assert!(!log.contains("stopped cleanly"), "{log}");
    lock.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_is_counted_once_even_across_a_restart() {
    let world = World::new(1).await;
    let config = world.config("");
    let ts = ago(Duration::from_secs(90));
    let first = event("dup-1", &ts, "m", "a100-80g", "10", "1");
    let again = event("dup-1", &ts, "m", "a100-80g", "10", "1");
    world
        .produce(vec![first, event("other-1", &ts, "m", "a100-80g", "5", "1")])
        .await;
    let mut daemon = world.start(&config);
    world.wait_consumed(2, WAIT).await;
    assert!(daemon.terminate(WAIT).success());

    world
        .produce(vec![again, event("other-2", &ts, "m", "a100-80g", "7", "1")])
        .await;
    let mut daemon = world.start(&config);
    world.wait_consumed(4, WAIT).await;
    let totals = world.totals().await;
    assert_eq!(totals[&("m".into(), "a100-80g".into())], (3, dec("22"), dec("3")));
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_event_is_accounted_into_its_own_window() {
    let world = World::new(1).await;
    let recent = ago(Duration::from_secs(60));
    let old = ago(Duration::from_secs(20 * 60));
    world
        .produce(vec![
            event("new", &recent, "m", "a100-80g", "1", "0"),
            event("old", &old, "m", "a100-80g", "2", "0"),
        ])
        .await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(2, WAIT).await;

    let rows = sqlx::query(
        "SELECT window_start, window_end, events, late_events, compute, final FROM usage_costs ORDER BY window_start",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    let old_ts: DateTime<Utc> = old.parse().unwrap();
    let old_row = &rows[0];
    let start: DateTime<Utc> = old_row.get("window_start");
    let end: DateTime<Utc> = old_row.get("window_end");
    assert!(
        start <= old_ts && old_ts < end,
        "{start} .. {end} must contain {old_ts}"
    );
    assert_eq!(end - start, chrono::Duration::minutes(1));
    assert_eq!(old_row.get::<i64, _>("events"), 1);
    assert_eq!(old_row.get::<i64, _>("late_events"), 1);
    assert_eq!(old_row.get::<Decimal, _>("compute"), dec("2"));
    // The old window ended more than allowed_lateness (5m) before the watermark: final.
    assert!(old_row.get::<bool, _>("final"));
    // The recent one is still open to late arrivals.
    assert!(!rows[1].get::<bool, _>("final"));
    assert_eq!(rows[1].get::<i64, _>("late_events"), 0);
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_input_is_rejected_with_its_reason_and_nothing_else_is_lost() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(60));
    let future = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let ancient = (Utc::now() - chrono::Duration::days(8)).to_rfc3339();
    let good = |id: &str, compute: &str| event(id, &ts, "m", "a100-80g", compute, "1");
    let body = |compute: &str| {
        format!(
            r#"{{"event_id":"x","timestamp":"{ts}","model":"m","hardware":"a100-80g","compute":{compute},"storage":1}}"#
        )
    };
    let invalid_utf8 = vec![b'{', b'"', 0xC3, 0x28, b'"', b'}'];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty_payload", Vec::new()),
        (
            "oversized",
            format!(r#"{{"pad":"{}"}}"#, "x".repeat(70 * 1024)).into_bytes(),
        ),
        ("invalid_utf8", invalid_utf8.clone()),
        ("malformed_json", b"{\"event_id\": ".to_vec()),
        (
            "missing_field",
            format!(r#"{{"event_id":"x","timestamp":"{ts}","hardware":"a100-80g","compute":1,"storage":1}}"#)
                .into_bytes(),
        ),
        ("invalid_field", body("\"12\"").into_bytes()),
        ("negative_value", body("-5").into_bytes()),
        ("malformed_json", body("NaN").into_bytes()),
        ("out_of_range", body("1e40").into_bytes()),
        (
            "field_too_long",
            event("x", &ts, &"m".repeat(200), "a100-80g", "1", "1").payload,
        ),
        (
            "invalid_field",
            event("x", &ts, "m\\u0000", "a100-80g", "1", "1").payload,
        ),
        (
            "future_timestamp",
            event("x", &future, "m", "a100-80g", "1", "1").payload,
        ),
        ("too_old", event("x", &ancient, "m", "a100-80g", "1", "1").payload),
    ];
    let mut messages = vec![good("g1", "1.5")];
    for (i, (_, payload)) in cases.iter().enumerate() {
        messages.push(raw(&format!("bad-{i}"), payload.clone()));
        messages.push(good(&format!("g-{i}"), "0.1"));
    }
    let total = messages.len() as i64;
    world.produce(messages).await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(total, WAIT).await;

    // Good events around every bad one are all there: 1.5 + 13 x 0.1.
    assert_eq!(
        world.totals().await[&("m".into(), "a100-80g".into())],
        (14, dec("2.8"), dec("14"))
    );
    let rows =
        sqlx::query("SELECT reason_code, reason, payload, kafka_offset FROM rejected_events ORDER BY kafka_offset")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    let codes: Vec<String> = rows.iter().map(|r| r.get("reason_code")).collect();
    let want: Vec<&str> = cases.iter().map(|c| c.0).collect();
    assert_eq!(codes, want);
    for (row, (_, payload)) in rows.iter().zip(&cases) {
        // Kept byte for byte up to ingest.max_rejected_payload_bytes (4 KiB by default).
        let kept = &payload[..payload.len().min(4096)];
        assert_eq!(
            row.get::<Vec<u8>, _>("payload").as_slice(),
            kept,
            "the raw payload is kept byte for byte"
        );
    }
    let negative = rows
        .iter()
        .find(|r| r.get::<String, _>("reason_code") == "negative_value")
        .unwrap();
    assert_eq!(
        negative.get::<String, _>("reason"),
        "negative_value: compute must be >= 0, got -5"
    );
    let offsets: Vec<i64> = rows.iter().map(|r| r.get("kafka_offset")).collect();
    assert_eq!(offsets, (0..cases.len() as i64).map(|i| 1 + 2 * i).collect::<Vec<_>>());
    assert!(daemon.is_running(), "bad input must never stop the daemon");
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_loses_and_double_counts_nothing() {
    let world = World::new(4).await;
    let config = world.config("");
    let mut load = spec(40_000, 7);
    load.rate = 5_000;
    let (messages, expected) = loadgen::generate(&load);
    let topic = world.topic.clone();
    let producer = tokio::task::spawn_blocking(move || loadgen::send(&common::brokers(), &topic, &messages, load.rate));

    let mut daemon = world.start(&config);
    for pause_ms in [1500, 2300, 1700] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        // Wait for some progress so that each kill lands mid-stream, not before the first poll.
        let before = world.consumed().await;
        let deadline = std::time::Instant::now() + WAIT;
        while world.consumed().await == before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        daemon.kill9();
        daemon = world.start(&config);
    }
    producer.await.unwrap().unwrap();
    world.wait_drained(expected.messages, WAIT).await;
    assert_exact(&world, &expected).await;
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_flushes_stores_offsets_and_exits_zero() {
    let world = World::new(2).await;
    // With an hour between timed flushes, only the shutdown flush can have written anything.
    let config = world.config("\n[ingest]\nflush_interval = \"1h\"\n");
    let (messages, expected) = loadgen::generate(&spec(2_000, 3));
    world.produce(messages).await;
    let mut daemon = world.start(&config);
    let deadline = std::time::Instant::now() + WAIT;
    while !daemon.log_text().contains("partition assigned") {
        assert!(
            std::time::Instant::now() < deadline,
            "no partition assigned:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        world.consumed().await,
        0,
        "nothing is written before the flush interval"
    );

    let status = daemon.terminate(WAIT);
    assert!(status.success(), "exit status {status:?}");
    let log = daemon.log_text();
    assert!(log.contains("left the consumer group"), "{log}");
    // What was consumed before the signal is stored, offsets and sums together.
    let consumed = world.consumed().await;
    assert!(consumed > 0, "the shutdown flush stored nothing:\n{log}");
    // And a restart picks up exactly where it stopped.
    let mut daemon = world.start(&world.config(""));
    world.wait_drained(expected.messages, WAIT).await;
    assert_exact(&world, &expected).await;
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn unpriced_hardware_is_recorded_with_a_null_cost() {
    let world = World::new(1).await;
    world
        .produce(vec![event(
            "e1",
            &ago(Duration::from_secs(30)),
            "m",
            "tpu-v9",
            "100",
            "10",
        )])
        .await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(1, WAIT).await;
    let row = sqlx::query("SELECT events, compute, compute_cost, storage_cost, total_cost FROM usage_costs")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<i64, _>("events"), 1);
    assert_eq!(row.get::<Decimal, _>("compute"), dec("100"));
    assert_eq!(row.get::<Option<Decimal>, _>("compute_cost"), None);
    assert_eq!(row.get::<Option<Decimal>, _>("storage_cost"), None);
    assert_eq!(row.get::<Option<Decimal>, _>("total_cost"), None);
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_instance_cannot_overwrite_the_new_owners_work() {
    let world = World::new(1).await;
    let common::StoreFixture {
        store,
        rules,
        prices,
        layout,
    } = world.store_fixture().await;
    let payload = event("z", &ago(Duration::from_secs(30)), "m", "a100-80g", "1", "1").payload;

    let mut stale = Aggregator::new(rules);
    stale.assign(
        store
            .claim(&world.topic, "stale", &[0], rules.dedup_horizon_ms)
            .await
            .unwrap(),
    );
    let mut fresh = Aggregator::new(rules);
    fresh.assign(
        store
            .claim(&world.topic, "fresh", &[0], rules.dedup_horizon_ms)
            .await
            .unwrap(),
    );

    assert_eq!(
        stale.ingest(0, 0, Some(&payload), Utc::now()),
        Outcome::Accepted { late: false }
    );
    let refused = store.flush(&world.topic, &stale.batch(None), &prices, layout).await;
    assert!(
        matches!(refused, Err(StoreError::Stale { ref fenced, ref applied }) if fenced == &[0] && applied.is_empty()),
        "{refused:?}"
    );
    assert_eq!(world.accepted_events().await, 0, "a fenced flush writes nothing");

    assert_eq!(
        fresh.ingest(0, 0, Some(&payload), Utc::now()),
        Outcome::Accepted { late: false }
    );
    store
        .flush(&world.topic, &fresh.batch(None), &prices, layout)
        .await
        .unwrap();
    assert_eq!(world.accepted_events().await, 1);
    let owner: String = sqlx::query_scalar("SELECT owner FROM partition_progress")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(owner, "fresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_handed_back_continues_only_if_nobody_claimed_it_in_between() {
    let world = World::new(1).await;
    let common::StoreFixture {
        store,
        rules,
        prices,
        layout,
    } = world.store_fixture().await;
    let horizon = rules.dedup_horizon_ms;
    let payload = event("a", &ago(Duration::from_secs(30)), "m", "a100-80g", "1", "1").payload;
    let mut agg = Aggregator::new(rules);
    agg.assign(store.claim(&world.topic, "me", &[0], horizon).await.unwrap());
    agg.ingest(0, 0, Some(&payload), Utc::now());
    let batch = agg.batch(None);
    store.flush(&world.topic, &batch, &prices, layout).await.unwrap();
    agg.flushed(&batch);
    agg.park(&[0]);
    assert_eq!(agg.parked(), vec![(0, 1, 1)]);

    // Straight back: continued, and the stored id is not read again.
    let back = store
        .claim_continuing(&world.topic, "me", &[0], horizon, &agg.parked())
        .await
        .unwrap();
    assert!(
        back[0].continued && back[0].epoch == 2 && back[0].seen.is_empty(),
        "{back:?}"
    );
    agg.assign(back);
    assert_eq!(agg.ingest(0, 1, Some(&payload), Utc::now()), Outcome::Duplicate);
    let batch = agg.batch(None);
    store.flush(&world.topic, &batch, &prices, layout).await.unwrap();
    agg.flushed(&batch);
    agg.park(&[0]);

    // Another instance held it in between: not continued, the ids come from PostgreSQL.
    store.claim(&world.topic, "other", &[0], horizon).await.unwrap();
    let back = store
        .claim_continuing(&world.topic, "me", &[0], horizon, &agg.parked())
        .await
        .unwrap();
    assert!(!back[0].continued && back[0].epoch == 4, "{back:?}");
    assert_eq!(back[0].seen.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec!["a"]);
    assert_eq!(world.accepted_events().await, 1);
}

/// Starts a daemon whose config has one address replaced by an unreachable one (`swap` says
/// which, for the world), waits for `line` in its log, and checks it is still running two
/// seconds later and stops cleanly.
async fn keeps_retrying(swap: fn(&World) -> (String, String), line: &str, why: &str) {
    let world = World::new(1).await;
    let config = world.config("");
    let (from, to) = swap(&world);
    let text = std::fs::read_to_string(&config).unwrap().replace(&from, &to);
    std::fs::write(&config, text).unwrap();
    let mut daemon = world.start(&config);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.log_text().contains(line) {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(daemon.is_running(), "{why}");
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_database_is_waited_for_not_a_crash() {
    keeps_retrying(
        |world| (world.db_url.clone(), "postgres://postgres@127.0.0.1:1/nowhere".into()),
        "PostgreSQL is unreachable, retrying",
        "costwatch must keep retrying, not exit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_is_retried_not_a_crash() {
    keeps_retrying(
        |_| (common::brokers(), "127.0.0.1:1".into()),
        "kafka client error",
        "costwatch must keep retrying the broker, not exit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_retried_after_an_ambiguous_commit_is_not_written_twice() {
    let world = World::new(1).await;
    let common::StoreFixture {
        store,
        rules,
        prices,
        layout,
    } = world.store_fixture().await;
    let mut agg = Aggregator::new(rules);
    agg.assign(
        store
            .claim(&world.topic, "me", &[0], rules.dedup_horizon_ms)
            .await
            .unwrap(),
    );
    let ts = ago(Duration::from_secs(30));
    agg.ingest(
        0,
        0,
        Some(&event("a", &ts, "qwen2-7b-instruct", "a100-80g", "1000", "500").payload),
        Utc::now(),
    );
    let batch = agg.batch(None);

    // The COMMIT goes through, but the client hears a dropped connection and retries.
    store.flush(&world.topic, &batch, &prices, layout).await.unwrap();
    let retried = store.flush(&world.topic, &batch, &prices, layout).await;
    assert!(
        matches!(retried, Err(StoreError::Stale { ref fenced, ref applied }) if fenced.is_empty() && applied == &[0]),
        "{retried:?}"
    );
    let total: Decimal = sqlx::query_scalar("SELECT total_cost FROM usage_costs")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(total, dec("130"), "counted once");

    // The next batch applies on top of the first.
    agg.flushed(&batch);
    agg.ingest(
        0,
        1,
        Some(&event("b", &ts, "m", "a100-80g", "1000", "500").payload),
        Utc::now(),
    );
    store
        .flush(&world.topic, &agg.batch(None), &prices, layout)
        .await
        .unwrap();
    assert_eq!(world.accepted_events().await, 2);
}
