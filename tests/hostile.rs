//! Hostile producers against the real daemon, broker and PostgreSQL: no input may stop a
//! partition, every poison lands in `rejected_events` with its reason, and every good event
//! around it is counted exactly.

mod common;

use std::time::{Duration, Instant};

use common::{ago, dec, event, http, raw, World};
use sqlx::Row;

const WAIT: Duration = Duration::from_secs(120);

/// A valid event with a label set given as JSON text.
fn labelled(id: &str, ts: &str, model: &str, hardware: &str, labels: &str) -> costwatch::loadgen::Message {
    raw(
        id,
        format!(
            r#"{{"event_id":"{id}","timestamp":"{ts}","model":"{model}","hardware":"{hardware}","compute":1,"storage":1,"labels":{labels}}}"#
        ),
    )
}

/// `(reason_code, kafka_offset)` of every rejected message, in offset order.
async fn rejections(world: &World) -> Vec<(String, i64)> {
    sqlx::query("SELECT reason_code, kafka_offset FROM rejected_events ORDER BY partition, kafka_offset")
        .fetch_all(&world.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("reason_code"), r.get("kafka_offset")))
        .collect()
}

async fn readyz(addr: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, "GET", "/readyz", None, None).await;
    (status, serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn label_sets_too_wide_to_index_are_rejected_and_the_widest_accepted_one_is_stored() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(60));
    // 16 labels of 128-character keys and values (4 KB): within the per-label limits, once an
    // index row of 4272 bytes that failed every flush of the partition forever.
    let wide: Vec<String> = (0..16)
        .map(|i| format!(r#""{:0>128}":"{}""#, i, "v".repeat(128)))
        .collect();
    let emoji: Vec<String> = (0..4).map(|i| format!(r#""k{i}":"{}""#, "😀".repeat(128))).collect();
    // The widest storable series: model and hardware of 128 four-byte characters and a label
    // set of exactly 1024 bytes.
    let widest_model = "模".repeat(128);
    let widest_hw = "😀".repeat(128);
    let widest_labels = format!(r#"{{"kk":"{}","lm":"{}"}}"#, "😀".repeat(127), "😀".repeat(128));
    let messages = vec![
        event("g0", &ts, "m", "a100-80g", "1", "1"),
        labelled("p1", &ts, "m", "a100-80g", &format!("{{{}}}", wide.join(","))),
        event("g1", &ts, "m", "a100-80g", "1", "1"),
        labelled("p2", &ts, "m", "a100-80g", &format!("{{{}}}", emoji.join(","))),
        event("g2", &ts, "m", "a100-80g", "1", "1"),
        labelled("w", &ts, &widest_model, &widest_hw, &widest_labels),
        event("g3", &ts, "m", "a100-80g", "1", "1"),
    ];
    world.produce(messages).await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(7, WAIT).await;

    let totals = world.totals().await;
    assert_eq!(totals[&("m".into(), "a100-80g".into())], (4, dec("4"), dec("4")));
    assert_eq!(
        totals[&(widest_model.clone(), widest_hw.clone())],
        (1, dec("1"), dec("1"))
    );
    assert_eq!(
        rejections(&world).await,
        vec![("field_too_long".into(), 1), ("field_too_long".into(), 3)]
    );
    let reason: String = sqlx::query_scalar("SELECT reason FROM rejected_events WHERE kafka_offset = 1")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(
        reason,
        "field_too_long: labels are 4096 bytes of UTF-8 in keys and values together, the limit is 1024"
    );
    assert!(!daemon.log_text().contains("flush failed"), "{}", daemon.log_text());
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn large_rejected_payloads_are_kept_bounded_with_their_size_and_digest() {
    use sha2::Digest;
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(60));
    let big: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let mut p = format!(r#"{{"event_id":"big-{i}","pad":""#).into_bytes();
            p.extend(std::iter::repeat_n(b'x', 900_000));
            p.extend_from_slice(b"\"}");
            p
        })
        .collect();
    let mut messages = Vec::new();
    for (i, payload) in big.iter().enumerate() {
        messages.push(event(&format!("g{i}"), &ts, "m", "a100-80g", "1", "1"));
        messages.push(raw(&format!("big-{i}"), payload.clone()));
    }
    messages.push(event("g-last", &ts, "m", "a100-80g", "1", "1"));
    world.produce(messages).await;
    let config = world.config("[ingest]\nflush_interval = \"200ms\"\nmax_rejected_payload_bytes = 1000\n");
    let mut daemon = world.start(&config);
    world.wait_consumed(41, WAIT).await;

    assert_eq!(
        world.totals().await[&("m".into(), "a100-80g".into())],
        (21, dec("21"), dec("21"))
    );
    let rows = sqlx::query(
        "SELECT reason_code, payload, payload_size, payload_sha256, payload_truncated, payload_text
         FROM rejected_events ORDER BY kafka_offset",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 20);
    for (row, payload) in rows.iter().zip(&big) {
        assert_eq!(row.get::<String, _>("reason_code"), "oversized");
        assert_eq!(row.get::<Vec<u8>, _>("payload"), payload[..1000].to_vec());
        assert_eq!(row.get::<i64, _>("payload_size"), payload.len() as i64);
        assert_eq!(
            row.get::<String, _>("payload_sha256"),
            hex::encode(sha2::Sha256::digest(payload))
        );
        assert!(row.get::<bool, _>("payload_truncated"));
        assert_eq!(
            row.get::<Option<String>, _>("payload_text").as_deref().map(str::len),
            Some(1000)
        );
    }
    // 20 x 900 KB in, about 20 x 1 KB stored: the payloads are not held whole, nor twice.
    let stored: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('rejected_event')")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert!(stored < 1_000_000, "rejected_event holds {stored} bytes");
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_row_postgresql_refuses_is_isolated_and_everything_else_commits() {
    let world = World::new(1).await;
    let fixture = world.store_fixture().await;
    drop(fixture);
    // A deterministic refusal validation cannot foresee: a constraint only this row breaks.
    sqlx::query("ALTER TABLE window_usage ADD CONSTRAINT no_poison CHECK (model <> 'poison')")
        .execute(&world.pool)
        .await
        .unwrap();
    let ts = ago(Duration::from_secs(60));
    let later = ago(Duration::from_secs(30));
    world
        .produce(vec![
            event("g0", &ts, "m", "a100-80g", "1", "1"),
            event("p0", &ts, "poison", "a100-80g", "5", "5"),
            event("p1", &ts, "poison", "a100-80g", "7", "7"),
            raw("bad", b"{nope".to_vec()),
            event("g1", &ts, "m", "a100-80g", "2", "2"),
        ])
        .await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(5, WAIT).await;
    // Later batches are written the plain way again.
    world
        .produce(vec![event("g2", &later, "m", "a100-80g", "4", "4")])
        .await;
    world.wait_consumed(6, WAIT).await;

    assert_eq!(
        world.totals().await[&("m".into(), "a100-80g".into())],
        (3, dec("7"), dec("7"))
    );
    let rows = sqlx::query(
        "SELECT reason_code, reason_message, kafka_offset, payload_text FROM rejected_events ORDER BY kafka_offset",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "the malformed message and the refused window row");
    let refused = &rows[0];
    assert_eq!(refused.get::<String, _>("reason_code"), "unstorable");
    assert_eq!(refused.get::<i64, _>("kafka_offset"), 1, "named by its first message");
    let message: String = refused.get("reason_message");
    // The relation PostgreSQL names is the day's partition (window_usage_dYYYYMMDD).
    assert!(
        message.starts_with(
            "PostgreSQL refused the window row of 2 events from this offset on: new row for relation \"window_usage_d"
        ),
        "{message}"
    );
    assert!(
        message.contains("\" violates check constraint \"no_poison\""),
        "{message}"
    );
    assert!(message.ends_with("(SQLSTATE 23514)"), "{message}");
    let row: serde_json::Value = serde_json::from_str(&refused.get::<String, _>("payload_text")).unwrap();
    assert_eq!(row["model"], "poison");
    assert_eq!(row["events"], 2);
    assert_eq!(row["compute"], "12");
    assert_eq!(rows[1].get::<String, _>("reason_code"), "malformed_json");

    let addr = daemon.http_addr().await;
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("costwatch_flush_errors_total{class=\"permanent\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("costwatch_rejected_events_total{reason=\"unstorable\"} 2\n"),
        "{metrics}"
    );
    assert!(daemon.is_running());
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flush_refused_outside_its_rows_stops_costwatch_instead_of_retrying_forever() {
    let world = World::new(1).await;
    let fixture = world.store_fixture().await;
    drop(fixture);
    // Progress rows cannot move: nothing about the batch's rows can be isolated.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'progress is frozen' USING ERRCODE = '42501'; END $$;
         CREATE TRIGGER frozen BEFORE UPDATE ON partition_progress FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    world
        .produce(vec![event(
            "g0",
            &ago(Duration::from_secs(60)),
            "m",
            "a100-80g",
            "1",
            "1",
        )])
        .await;
    let mut daemon = world.start(&world.config(""));
    let status = daemon.wait_exit(WAIT);
    assert!(!status.success(), "a permanent failure must end the process non-zero");
    let log = daemon.log_text();
    assert!(
        log.contains("PostgreSQL refused the flush; writing it again with the refused rows isolated"),
        "{log}"
    );
    assert!(
        log.contains(
            "PostgreSQL refuses this flush even with the refused rows isolated; stopping instead of retrying forever"
        ),
        "{log}"
    );
    assert!(log.contains("progress is frozen"), "{log}");
    assert_eq!(world.accepted_events().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_not_in_utf8_is_refused_at_start() {
    let world = World::new(1).await;
    let latin1 = format!("{}_latin1", world.db_url.rsplit('/').next().unwrap());
    sqlx::query(&format!(
        "CREATE DATABASE {latin1} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    ))
    .execute(&world.pool)
    .await
    .unwrap();
    let url = format!("{}/{latin1}", &world.db_url[..world.db_url.rfind('/').unwrap()]);
    let config = world.config("").to_string_lossy().into_owned();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(["migrate", "--config", &config])
        .env("COSTWATCH__DATABASE__URL", &url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(
            "the database's encoding is LATIN1, costwatch needs UTF8: create the database with CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0"
        ),
        "{stderr}"
    );
    sqlx::query(&format!("DROP DATABASE {latin1}"))
        .execute(&world.pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_producer_stamping_minutes_ahead_finalises_nothing_early_and_makes_nobody_late() {
    let world = World::new(1).await;
    let now = chrono::Utc::now();
    let ahead = (now + chrono::Duration::seconds(270)).to_rfc3339();
    let on_time = (now - chrono::Duration::seconds(5)).to_rfc3339();
    world
        .produce(vec![
            event("ahead", &ahead, "skewed", "a100-80g", "1", "1"),
            event("a", &on_time, "m", "a100-80g", "1", "1"),
            event("b", &on_time, "m", "a100-80g", "1", "1"),
        ])
        .await;
    let config = world.config("[windows]\nsize = \"1m\"\nallowed_lateness = \"10s\"\n");
    let mut daemon = world.start(&config);
    world.wait_consumed(3, WAIT).await;

    let late: i64 = sqlx::query_scalar("SELECT sum(late_events)::int8 FROM usage_costs")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(late, 0, "on-time events are not late because of one skewed clock");
    let on_time_final: bool = sqlx::query_scalar("SELECT bool_or(final) FROM usage_costs WHERE model = 'm'")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert!(!on_time_final, "the current window cannot be final before its end");
    let watermark: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT watermark FROM partition_progress")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert!(
        watermark <= chrono::Utc::now(),
        "the watermark {watermark} ran ahead of the clock"
    );
    // The skewed event itself is counted, in its own window.
    assert_eq!(
        world.totals().await[&("skewed".into(), "a100-80g".into())],
        (1, dec("1"), dec("1"))
    );
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_event_id_with_other_content_is_rejected_visibly_also_across_a_restart() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(60));
    let config = world.config("");
    world
        .produce(vec![
            event("req-1", &ts, "m", "a100-80g", "0", "0"),
            event("req-1", &ts, "m", "a100-80g", "0", "0"),
            event("req-1", &ts, "m", "a100-80g", "1000", "500"),
            // The same value written differently is the same content.
            event("req-2", &ts, "m", "a100-80g", "1.5", "2"),
            event("req-2", &ts, "m", "a100-80g", "1.50", "2.0"),
        ])
        .await;
    let mut daemon = world.start(&config);
    world.wait_consumed(5, WAIT).await;
    assert!(daemon.terminate(WAIT).success());

    // After a restart the stored ids carry their content digests.
    world
        .produce(vec![
            event("req-1", &ts, "m", "a100-80g", "0", "0"),
            event("req-2", &ts, "m", "a100-80g", "3", "2"),
        ])
        .await;
    let mut daemon = world.start(&config);
    world.wait_consumed(7, WAIT).await;

    assert_eq!(
        world.totals().await[&("m".into(), "a100-80g".into())],
        (2, dec("1.5"), dec("2"))
    );
    assert_eq!(
        rejections(&world).await,
        vec![("conflicting_duplicate".into(), 2), ("conflicting_duplicate".into(), 6)]
    );
    let reason: String = sqlx::query_scalar("SELECT reason FROM rejected_events WHERE kafka_offset = 2")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(
        reason,
        "conflicting_duplicate: event_id \"req-1\" was already counted with different content; the first stays counted"
    );
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn quantities_keep_the_precision_contract_and_window_sums_stay_exact_past_96_bits() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(60));
    let mut messages = vec![
        event(
            "x1",
            &ts,
            "m",
            "a100-80g",
            "0.1234567890123456789012345678901234567e1",
            "1",
        ),
        event("x2", &ts, "m", "a100-80g", "0.00000000001", "1"),
        raw("x3", format!(r#"["x3","{ts}","m","a100-80g",1,1]"#)),
        event("tiny", &ts, "big", "a100-80g", "0.0000000001", "0"),
    ];
    // Nine times 10^18 plus 10^-10 in one window: more digits than a 96-bit decimal holds, so
    // the in-memory sum splits and PostgreSQL adds the rows up exactly.
    for i in 0..9 {
        messages.push(event(&format!("e{i}"), &ts, "big", "a100-80g", "1e18", "0"));
    }
    world.produce(messages).await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(13, WAIT).await;

    let (events, compute): (i64, String) =
        sqlx::query_as("SELECT sum(events)::int8, sum(compute)::text FROM usage_costs WHERE model = 'big'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!((events, compute.as_str()), (10, "9000000000000000000.0000000001"));
    assert_eq!(
        rejections(&world).await,
        vec![
            ("out_of_range".into(), 0),
            ("out_of_range".into(), 1),
            ("malformed_json".into(), 2)
        ]
    );
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_whose_offset_stops_moving_while_it_has_lag_is_reported_stalled() {
    let world = World::new(2).await;
    let config = world.config("[ingest]\nflush_interval = \"200ms\"\nstall_after = \"6s\"\n");
    let mut daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    let ts = ago(Duration::from_secs(30));
    world.produce(vec![event("a", &ts, "m", "a100-80g", "1", "1")]).await;
    world.wait_consumed(1, WAIT).await;
    let deadline = Instant::now() + WAIT;
    while readyz(&addr).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready: {:?}", readyz(&addr).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Flushes wait on the lock and time out: stored offsets stop while messages arrive.
    let mut tx = world.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE window_usage IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut n = 0;
    let stalled = loop {
        n += 1;
        world
            .produce(vec![event(&format!("s{n}"), &ts, "m", "a100-80g", "1", "1")])
            .await;
        let (status, body) = readyz(&addr).await;
        if status == 503 && body["stalled_partitions"].as_array().is_some_and(|p| !p.is_empty()) {
            break body;
        }
        assert!(Instant::now() < deadline, "never reported stalled: {body}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(stalled["database"], true);
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    for partition in stalled["stalled_partitions"].as_array().unwrap() {
        assert!(
            metrics.contains(&format!(
                "costwatch_partition_stalled{{topic=\"{}\",partition=\"{partition}\"}} 1\n",
                world.topic
            )),
            "{metrics}"
        );
    }
    tx.rollback().await.unwrap();

    // Unlocked: the backlog is written and readiness comes back.
    world.wait_drained(1 + n, WAIT).await;
    let deadline = Instant::now() + WAIT;
    while readyz(&addr).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready again: {:?}",
            readyz(&addr).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    assert!(
        !metrics.contains(&format!(
            "costwatch_partition_stalled{{topic=\"{}\",partition=\"0\"}} 1",
            world.topic
        )),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&format!(
            "costwatch_partition_stalled{{topic=\"{}\",partition=\"1\"}} 1",
            world.topic
        )),
        "{metrics}"
    );
    assert_eq!(world.accepted_events().await, 1 + n as i64);
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_messages_past_their_retention_are_pruned_by_one_instance() {
    let world = World::new(1).await;
    let fixture = world.store_fixture().await;
    drop(fixture);
    for (offset, age_days) in [(0, 20), (1, 15), (2, 13), (3, 1)] {
        sqlx::query(
            "INSERT INTO rejected_event (received_at, topic, partition, kafka_offset, reason_code, reason_message,
                    payload, payload_size, payload_sha256)
             VALUES (now() - make_interval(days => $1), $2, 0, $3, 'malformed_json', 'x', '\\x7b', 1, sha256('\\x7b'))",
        )
        .bind(age_days)
        .bind(&world.topic)
        .bind(offset as i64)
        .execute(&world.pool)
        .await
        .unwrap();
    }
    let mut daemon = world.start(&world.config(""));
    let deadline = Instant::now() + WAIT;
    loop {
        let left: Vec<i64> = sqlx::query_scalar("SELECT kafka_offset FROM rejected_event ORDER BY kafka_offset")
            .fetch_all(&world.pool)
            .await
            .unwrap();
        if left == vec![2, 3] {
            break;
        }
        assert!(Instant::now() < deadline, "left: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let addr = daemon.http_addr().await;
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    assert!(metrics.contains("costwatch_rejected_pruned_total 2\n"), "{metrics}");
    assert!(daemon
        .log_text()
        .contains("pruned rejected messages past retention.rejected"));
    assert!(daemon.terminate(WAIT).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_database_stops_costwatch_and_the_restart_recounts_from_kafka() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(60));
    world
        .produce(vec![
            event("a", &ts, "m", "a100-80g", "1", "1"),
            event("b", &ts, "m", "a100-80g", "2", "2"),
        ])
        .await;
    let config = world.config("");
    let mut daemon = world.start(&config);
    world.wait_consumed(2, WAIT).await;
    world.drop_database().await;
    world.produce(vec![event("c", &ts, "m", "a100-80g", "4", "4")]).await;

    // "database ... does not exist" is permanent: no retrying forever against it.
    let status = daemon.wait_exit(WAIT);
    let log = daemon.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("does not exist"), "{log}");

    // The restart creates the database again and counts everything the topic holds, once.
    let mut daemon = world.start(&config);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy(&world.db_url)
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let totals: Option<(i64, String)> =
            sqlx::query_as("SELECT sum(events)::int8, sum(compute)::text FROM usage_costs")
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten()
                .filter(|(events, _): &(Option<i64>, Option<String>)| events.is_some())
                .map(|(events, compute)| (events.unwrap(), compute.unwrap()));
        if totals == Some((3, "7".to_owned())) {
            break;
        }
        assert!(Instant::now() < deadline, "totals {totals:?}:\n{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(daemon.terminate(WAIT).success());
}
