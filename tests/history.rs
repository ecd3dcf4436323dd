//! History at scale against the real PostgreSQL and broker: the hourly and daily roll-ups equal
//! the raw windows to the last digit (late events, a kill -9, `rerate`), retention drops whole
//! partitions and the totals over the dropped range still come from the roll-ups, the upgrade
//! from the unpartitioned schema keeps every row, and a backfill topic leaves the live topic's
//! `final` alone.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use chrono::{DateTime, Duration as Span, DurationRound, SecondsFormat, Utc};
use common::{dec, http, raw, World};
use costwatch::loadgen::Message;
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{PgPool, Row};

const WAIT: Duration = Duration::from_secs(120);

fn costwatch(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("COSTWATCH_CONFIG")
        .output()
        .expect("cannot run costwatch")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Event `i` of a spread of events over the `hours` hours before `now`: three models, a priced
/// and an unpriced hardware target, two tenants, and amounts with fractional digits.
fn spread_event(i: usize, now: DateTime<Utc>, hours: i64) -> Message {
    let minutes = hours * 60;
    let at = now - Span::minutes(1 + (i as i64 * 37) % minutes) - Span::seconds((i % 50) as i64);
    let model = ["model-0", "model-1", "qwen2-7b-instruct"][i % 3];
    let hardware = if i % 7 == 0 {
        "unpriced-gpu"
    } else {
        ["hw-0", "a100-80g"][i % 2]
    };
    let tenant = ["search", "ads"][i % 2];
    raw(
        &format!("e{i}"),
        format!(
            r#"{{"event_id":"e{i}","timestamp":"{}","model":"{model}","hardware":"{hardware}","compute":{}.{},"storage":0.{:03},"labels":{{"tenant":"{tenant}"}}}}"#,
            rfc3339(at),
            i % 13,
            i % 10,
            i % 1000
        ),
    )
}

/// The first row of each of two queries' results that the other lacks, as JSON text after its
/// side's name. Empty when both return the same rows.
async fn one_sided_rows(pool: &PgPool, (a_name, a): (&str, &str), (b_name, b): (&str, &str)) -> Vec<String> {
    let sql = format!(
        "WITH a AS ({a}), b AS ({b})
         SELECT '{a_name} only: ' || (SELECT row_to_json(x)::text FROM (SELECT * FROM a EXCEPT SELECT * FROM b) x LIMIT 1)
         UNION ALL
         SELECT '{b_name} only: ' || (SELECT row_to_json(x)::text FROM (SELECT * FROM b EXCEPT SELECT * FROM a) x LIMIT 1)"
    );
    sqlx::query_scalar::<_, Option<String>>(&sql)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .collect()
}

/// Per (bucket, model, hardware, labels): events, ΣT, ΣS, Σ tokens and cost, from the raw
/// windows summed into `unit` buckets and from the roll-up table, as text rows, each side's
/// rows the other lacks. Empty when the tiers agree exactly.
async fn tier_differences(pool: &PgPool, unit: &str, rollup: &str) -> Vec<String> {
    let totals = "sum(events)::int8 AS events, sum(compute) AS compute, sum(storage) AS storage,
                  sum(input_tokens + output_tokens) AS tokens,
                  sum(compute * compute_price * k1 + storage * storage_price * k2) AS cost,
                  count(*) FILTER (WHERE compute_price IS NULL) > 0 AS unpriced";
    let raw = format!(
        "SELECT date_trunc('{unit}', window_start, 'UTC') AS b, model, hardware, labels, {totals}
         FROM window_usage GROUP BY 1, 2, 3, 4"
    );
    let tier = format!("SELECT bucket_start AS b, model, hardware, labels, {totals} FROM {rollup} GROUP BY 1, 2, 3, 4");
    one_sided_rows(pool, ("raw", &raw), ("roll-up", &tier)).await
}

/// Per (bucket, currency, priced): a tier summed across keys and the totals kept for it
/// (`usage_totals`), as text rows, each side's rows the other lacks. Empty when they agree
/// exactly.
async fn totals_differences(pool: &PgPool, unit: &str, table: &str) -> Vec<String> {
    // Raw windows store no cost: it is computed as readers compute it.
    let (start, costs) = if table == "window_usage" {
        (
            "window_start",
            ", compute * compute_price * k1 AS compute_cost, storage * storage_price * k2 AS storage_cost",
        )
    } else {
        ("bucket_start", "")
    };
    let tier = format!(
        "SELECT {start} AS b, currency, priced, sum(events)::int8 AS events, sum(late_events)::int8 AS late,
                sum(compute) AS compute, sum(storage) AS storage, sum(input_tokens) AS input_tokens,
                sum(output_tokens) AS output_tokens,
                COALESCE(sum(compute_cost) FILTER (WHERE priced), 0) AS compute_cost,
                COALESCE(sum(storage_cost) FILTER (WHERE priced), 0) AS storage_cost
         FROM (SELECT *{costs}, compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced FROM {table}) r
         GROUP BY 1, 2, 3"
    );
    let totals = format!(
        "SELECT bucket_start AS b, currency, priced, events, late_events AS late, compute, storage, input_tokens,
                output_tokens, compute_cost, storage_cost
         FROM usage_totals WHERE bucket_unit = '{unit}'"
    );
    one_sided_rows(pool, ("roll-up", &tier), ("totals", &totals)).await
}

async fn assert_totals_equal(pool: &PgPool, context: &str) {
    for (unit, table) in [
        ("window", "window_usage"),
        ("hour", "usage_hourly"),
        ("day", "usage_daily"),
    ] {
        let differences = totals_differences(pool, unit, table).await;
        assert!(
            differences.is_empty(),
            "{context}: usage_totals of unit {unit} differ from {table} summed across keys: {differences:?}"
        );
    }
    // The dashboard's spend stat reads the totals' view: per currency, the spend of the
    // per-label view it replaced.
    let spend = |view: &str| {
        let sql = format!(
            "SELECT currency, COALESCE(sum(total_cost), 0)::text, sum(events)::int8 FROM {view} GROUP BY 1 ORDER BY 1"
        );
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, i64)>(&sql)
                .fetch_all(&pool)
                .await
                .unwrap()
                .into_iter()
                .map(|(c, cost, events)| (c, Decimal::from_str_exact(&cost).unwrap().normalize(), events))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        spend("usage_costs_totals_hourly").await,
        spend("usage_costs_by_labels_hourly").await,
        "{context}: the spend stat's view"
    );
}

async fn assert_tiers_equal(pool: &PgPool, context: &str) {
    assert_totals_equal(pool, context).await;
    let raw_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM window_usage")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(raw_rows > 0, "{context}: no raw rows");
    for (unit, table) in [("hour", "usage_hourly"), ("day", "usage_daily")] {
        let differences = tier_differences(pool, unit, table).await;
        assert!(
            differences.is_empty(),
            "{context}: {table} differs from the raw windows: {differences:?}"
        );
    }
}

/// (events, ΣT, ΣS, priced cost, unpriced events) over windows starting in [from, to), straight
/// from the raw windows.
async fn raw_totals(pool: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>) -> (i64, Decimal, Decimal, Decimal, i64) {
    let r = sqlx::query(
        "SELECT COALESCE(sum(events), 0)::int8 AS events, COALESCE(sum(compute), 0) AS compute,
                COALESCE(sum(storage), 0) AS storage,
                COALESCE(sum(compute * compute_price * k1 + storage * storage_price * k2), 0) AS cost,
                COALESCE(sum(events) FILTER (WHERE compute_price IS NULL), 0)::int8 AS unpriced
         FROM window_usage WHERE window_start >= $1 AND window_start < $2",
    )
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await
    .unwrap();
    (
        r.get("events"),
        r.get("compute"),
        r.get("storage"),
        r.get("cost"),
        r.get("unpriced"),
    )
}

/// The same five numbers from `GET /api/v1/costs` over [from, to) at `step`.
async fn api_totals(
    addr: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: &str,
) -> (i64, Decimal, Decimal, Decimal, i64) {
    let path = format!("/api/v1/costs?from={}&to={}&step={step}", rfc3339(from), rfc3339(to));
    let (status, body) = http(addr, "GET", &path, None, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let total = &v["totals"];
    let d = |k: &str| dec(total[k].as_str().unwrap_or_else(|| panic!("{k} in {body}")));
    (
        total["events"].as_i64().unwrap(),
        d("compute"),
        d("storage"),
        d("total_cost"),
        total["unpriced_events"].as_i64().unwrap(),
    )
}

/// Per UTC hour of windows starting in [from, to): (hour, events, ΣT, priced cost), from the
/// raw windows.
async fn raw_hours(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, i64, Decimal, Decimal)> {
    let rows: Vec<(DateTime<Utc>, i64, Decimal, Decimal)> = sqlx::query_as(
        "SELECT date_trunc('hour', window_start, 'UTC'), sum(events)::int8, sum(compute),
                COALESCE(sum(compute * compute_price * k1 + storage * storage_price * k2), 0)
         FROM window_usage WHERE window_start >= $1 AND window_start < $2 GROUP BY 1 ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(h, e, c, cost)| (h, e, c.normalize(), cost.normalize()))
        .collect()
}

/// The same from `GET /api/v1/costs` at step=hour.
async fn api_hours(addr: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<(DateTime<Utc>, i64, Decimal, Decimal)> {
    let path = format!("/api/v1/costs?from={}&to={}&step=hour", rfc3339(from), rfc3339(to));
    let (status, body) = http(addr, "GET", &path, None, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["series"]
        .as_array()
        .unwrap_or_else(|| panic!("series in {body}"))
        .iter()
        .map(|b| {
            let d = |k: &str| dec(b[k].as_str().unwrap_or_else(|| panic!("{k} in {b}"))).normalize();
            let start = DateTime::parse_from_rfc3339(b["start"].as_str().unwrap())
                .unwrap()
                .to_utc();
            (start, b["events"].as_i64().unwrap(), d("compute"), d("total_cost"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn roll_ups_equal_the_raw_windows_across_late_events_a_kill_and_rerate() {
    let world = World::new(3).await;
    let config =
        world.config("\n[ingest]\nflush_interval = \"200ms\"\nmax_event_age = \"4d\"\ndedup_horizon = \"4d\"\n");
    let now = Utc::now();
    // Three days and a bit: four UTC days, 70-odd hours, so every tier answers some of it.
    let events: Vec<Message> = (0..900).map(|i| spread_event(i, now, 75)).collect();
    let mut daemon = world.start(&config);
    // Newest first, then the older ones: most of the second half is late.
    let (first, second) = events.split_at(450);
    world.produce(first.iter().rev().cloned().collect()).await;
    world.wait_drained(450, WAIT).await;
    daemon.kill9();
    let mut daemon = world.start(&config);
    // Duplicates of the first half, then the second half.
    world.produce(first[..100].to_vec()).await;
    world.produce(second.to_vec()).await;
    world.wait_drained(1000, WAIT).await;
    assert_tiers_equal(&world.pool, "after a kill -9 and late events").await;

    let addr = daemon.http_addr().await;
    let (from, to) = (now - Span::hours(80), now + Span::minutes(1));
    let truth = raw_totals(&world.pool, from, to).await;
    assert_eq!(truth.0, 900, "every event once");
    assert!(truth.4 > 0, "some usage is unpriced");
    for step in ["window", "hour", "day", "month"] {
        assert_eq!(api_totals(&addr, from, to, step).await, truth, "step={step}");
    }
    // A range cut inside hours at both ends reads all three tiers.
    let (from, to) = (now - Span::minutes(3000 + 17), now - Span::minutes(43));
    assert_eq!(
        api_totals(&addr, from, to, "day").await,
        raw_totals(&world.pool, from, to).await
    );
    // Hour by hour too, with ends a few minutes into their hours (read as the whole hour minus
    // the minutes outside): the same buckets as the raw windows, none extra where those
    // minutes held all of an hour's usage.
    for (cut_from, cut_to) in [(7, 3), (3, 7), (1, 58)] {
        let from = (now - Span::hours(30)).duration_trunc(Span::hours(1)).unwrap() + Span::minutes(cut_from);
        let to = (now - Span::hours(2)).duration_trunc(Span::hours(1)).unwrap() + Span::minutes(cut_to);
        assert_eq!(
            api_hours(&addr, from, to).await,
            raw_hours(&world.pool, from, to).await,
            "[{from}, {to}) step=hour"
        );
    }
    daemon.terminate(WAIT);

    // A new price for hw-0 and a price for the unpriced hardware, then rerate over everything.
    let repriced = world.config(
        r#"
[ingest]
max_event_age = "4d"

[pricing]
currency = "USD"

[[pricing.hardware]]
name = "a100-80g"
compute_price = "0.1"
storage_price = "0.2"

[[pricing.hardware]]
name = "hw-0"
compute_price = "0.0005"
storage_price = "0.00003"

[[pricing.hardware]]
name = "unpriced-gpu"
compute_price = "0.7"
storage_price = "0.01"
"#,
    );
    let day = Span::days(1);
    let (from, to) = (
        (now - Span::hours(80)).duration_trunc(day).unwrap(),
        (now + day).duration_trunc(day).unwrap(),
    );
    let out = costwatch(&repriced, &["rerate", "--from", &rfc3339(from), "--to", &rfc3339(to)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_tiers_equal(&world.pool, "after rerate").await;
    let after = raw_totals(&world.pool, from, to).await;
    assert_eq!(after.4, 0, "nothing is unpriced after rerate");
    assert_ne!(after.3, truth.3, "rerate changed the cost");
    // The API (daily and hourly roll-ups) agrees with the re-rated raw windows.
    let mut daemon = world.start(&repriced);
    let addr = daemon.http_addr().await;
    assert_eq!(api_totals(&addr, from, to, "day").await, after);
    daemon.terminate(WAIT);

    // Late events into rows priced otherwise: the first configuration prices hw-0 at 0.0004,
    // the rows carry rerate's 0.0005. Each such row moves whole to the flush's price, and the
    // roll-ups with it; the other rows keep theirs.
    let late: Vec<Message> = (0..120)
        .filter(|i| i % 2 == 0 && i % 7 != 0)
        .map(|i| {
            let original = spread_event(i, now, 75);
            let payload = text(&original.payload).replace(&format!("\"e{i}\""), &format!("\"r{i}\""));
            raw(&format!("r{i}"), payload)
        })
        .collect();
    let touched = late.len();
    let hw0_at = |price: &'static str| {
        let pool = world.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM window_usage WHERE hardware = 'hw-0' AND compute_price = $1::numeric",
            )
            .bind(price)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (old_price, new_price) = (hw0_at("0.0004").await, hw0_at("0.0005").await);
    assert_eq!(old_price, 0, "rerate priced every hw-0 row anew");
    let mut daemon = world.start(&config);
    world.produce(late).await;
    world.wait_drained(1000 + touched as u64, WAIT).await;
    daemon.terminate(WAIT);
    assert_tiers_equal(&world.pool, "after late events into rows priced otherwise").await;
    let moved = hw0_at("0.0004").await;
    assert!(
        moved > 0 && moved <= touched as i64,
        "{moved} rows moved for {touched} events"
    );
    assert_eq!(
        moved + hw0_at("0.0005").await,
        new_price,
        "every other hw-0 row keeps rerate's price"
    );
    let now_total = raw_totals(&world.pool, from, to).await;
    assert_eq!(now_total.0, after.0 + touched as i64, "the late events counted once");
}

/// The names of the partitions of `table`.
/// The UTC day a raw partition (`window_usage_dYYYYMMDD`) holds, as its first instant.
fn partition_day(name: &str) -> DateTime<Utc> {
    chrono::NaiveDate::parse_from_str(&name["window_usage_d".len()..], "%Y%m%d")
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
}

async fn partition_names(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1 ORDER BY 1",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_whole_old_days_and_the_roll_ups_still_answer_for_them() {
    let world = World::new(1).await;
    // A backfill-style instance takes events up to 10 days old.
    let ingest = world.config("\n[ingest]\nflush_interval = \"200ms\"\nmax_event_age = \"10d\"\n");
    let now = Utc::now();
    let events: Vec<Message> = (0..300).map(|i| spread_event(i, now, 24 * 8)).collect();
    let daemon = world.start(&ingest);
    world.produce(events).await;
    world.wait_drained(300, WAIT).await;
    drop(daemon);
    assert_tiers_equal(&world.pool, "before retention").await;
    let day = Span::days(1);
    let (from, to) = (
        (now - Span::days(9)).duration_trunc(day).unwrap(),
        now + Span::minutes(1),
    );
    let truth = raw_totals(&world.pool, from, to).await;
    assert_eq!(truth.0, 300);

    // Keep 3 days of raw windows (the live instance's max_event_age is 1 day).
    let short = world.config("\n[ingest]\nmax_event_age = \"1d\"\n\n[retention]\nwindows = \"3d\"\n");
    let cutoff = now - Span::days(3);
    let due: Vec<String> = partition_names(&world.pool, "window_usage")
        .await
        .into_iter()
        .filter(|name| partition_day(name) + day <= cutoff)
        .collect();
    assert!(due.len() >= 4, "old days: {due:?}");

    // A tampered roll-up day is kept, with the reason; the others would go. One row of that day
    // is tampered with: a ctid is only unique within one partition of the monthly roll-up, so
    // the row is named by its partition too (by ctid alone, a row of another month at the same
    // ctid, today's say, would change as well and no rebuild of the old day would undo it).
    let tampered = sqlx::query(
        "UPDATE usage_hourly SET events = events + 1
         WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM usage_hourly
                                   WHERE bucket_start >= $1 AND bucket_start < $1 + interval '1 day' LIMIT 1)",
    )
    .bind(partition_day(&due[0]))
    .execute(&world.pool)
    .await
    .unwrap();
    assert_eq!(tampered.rows_affected(), 1, "one roll-up row is tampered with");
    let dry = costwatch(&short, &["retention", "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let dry_text = text(&dry.stdout);
    assert!(
        dry_text.contains(&format!(
            "kept {}: usage_hourly does not hold exactly what {} holds",
            due[0], due[0]
        )),
        "{dry_text}"
    );
    for name in &due[1..] {
        assert!(dry_text.contains(&format!("would drop {name} (")), "{name}: {dry_text}");
    }
    assert!(
        partition_names(&world.pool, "window_usage").await.contains(&due[1]),
        "a dry run drops nothing"
    );

    // Repaired (rebuilt from the raw day), then everything due goes.
    let tampered_day = partition_day(&due[0])
        .timestamp_millis()
        .div_euclid(costwatch::history::DAY_MS);
    costwatch::history::rollup::rebuild_days(&world.pool, &[tampered_day])
        .await
        .unwrap();
    let out = costwatch(&short, &["retention"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out_text = text(&out.stdout);
    let left = partition_names(&world.pool, "window_usage").await;
    for name in &due {
        assert!(out_text.contains(&format!("dropped {name} (")), "{name}: {out_text}");
        assert!(!left.contains(name), "{name} is still there: {left:?}");
    }
    assert!(
        out_text.contains("deleted 0 rejected messages received before"),
        "{out_text}"
    );
    // The dropped days' totals across keys left with them.
    assert_totals_equal(&world.pool, "after retention dropped raw days").await;

    // The API's totals over the whole range, dropped days included, are unchanged: the
    // roll-ups answer for the days whose raw windows are gone.
    let daemon = world.start(&short);
    let addr = daemon.http_addr().await;
    assert_eq!(api_totals(&addr, from, to, "day").await, truth);
    assert_eq!(api_totals(&addr, from, to, "hour").await, truth);
    // At window resolution only the raw days are left to answer.
    let recent = now - Span::days(6);
    let (raw_events, ..) = api_totals(&addr, recent, to, "window").await;
    let (all_events, ..) = api_totals(&addr, recent, to, "day").await;
    assert!(raw_events < all_events, "{raw_events} < {all_events}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hourly_month_past_retention_takes_its_totals_along_and_the_days_still_answer() {
    let world = World::new(1).await;
    let store = costwatch::store::Store::connect_lazy(&world.db_url, 2).unwrap();
    store.migrate().await.unwrap();
    // The last two days of January 2020 as roll-ups only (their raw days long gone): three keys
    // an hour, one of them unpriced, and each day the sum of its hours.
    for (table, at) in [("usage_hourly", "2020-01-30"), ("usage_daily", "2020-01-30")] {
        sqlx::query("SELECT costwatch_ensure_partition($1, $2::timestamptz)")
            .bind(table)
            .bind(at)
            .execute(&world.pool)
            .await
            .unwrap();
    }
    // The columns both roll-ups are written with here.
    let columns = "bucket_start, topic, source, model, hardware, labels, usage_from_tokens, currency, price_id,
                   compute_price, storage_price, k1, k2, coefficients_assumed, events, late_events, compute, storage,
                   input_tokens, output_tokens, finalizes_at";
    sqlx::query(&format!(
        "INSERT INTO usage_hourly ({columns})
         SELECT '2020-01-30 00:00+00'::timestamptz + h * interval '1 hour', 'usage', 'usage', 'm' || k,
                CASE WHEN k = 2 THEN 'unpriced-gpu' ELSE 'h100' END, '{{}}', false, 'USD',
                CASE WHEN k = 2 THEN NULL ELSE 'p' END, CASE WHEN k = 2 THEN NULL ELSE 0.1 END,
                CASE WHEN k = 2 THEN NULL ELSE 0.2 END, CASE WHEN k = 2 THEN NULL ELSE 0.5 END,
                CASE WHEN k = 2 THEN NULL ELSE 0.8 END, false, 1 + h % 5 + k, 0, h * 1.125 + k, 0.0625 * k, 0, 0,
                '2020-02-01 00:00+00'
         FROM generate_series(0, 47) h, generate_series(0, 2) k"
    ))
    .execute(&world.pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO usage_daily ({columns})
         SELECT date_trunc('day', bucket_start, 'UTC'), topic, source, model, hardware, labels, usage_from_tokens,
                currency, price_id, compute_price, storage_price, k1, k2, coefficients_assumed, sum(events),
                sum(late_events), sum(compute), sum(storage), sum(input_tokens), sum(output_tokens), max(finalizes_at)
         FROM usage_hourly GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14"
    ))
    .execute(&world.pool)
    .await
    .unwrap();
    assert_totals_equal(&world.pool, "roll-ups written by hand").await;
    let (from, to) = (t("2020-01-30T00:00:00Z"), t("2020-02-01T00:00:00Z"));
    let truth: (i64, Decimal, Decimal, Decimal, i64) = {
        let r = sqlx::query(
            "SELECT sum(events)::int8 AS events, sum(compute) AS compute, sum(storage) AS storage,
                    sum(compute_cost + storage_cost) AS cost,
                    (sum(events) FILTER (WHERE compute_price IS NULL))::int8 AS unpriced
             FROM usage_hourly",
        )
        .fetch_one(&world.pool)
        .await
        .unwrap();
        (
            r.get("events"),
            r.get("compute"),
            r.get("storage"),
            r.get("cost"),
            r.get("unpriced"),
        )
    };
    // The daemon runs retention too: its instance keeps hourly roll-ups for longer.
    let keep = world.config("\n[retention]\nhourly = \"3650d\"\n");
    let daemon = world.start(&keep);
    let addr = daemon.http_addr().await;
    assert_eq!(api_totals(&addr, from, to, "hour").await, truth);
    assert_eq!(api_totals(&addr, from, to, "day").await, truth);
    drop(daemon);

    // Hourly roll-ups are kept 400 days by default: January 2020 goes, its totals with it.
    let config = world.config("");
    let out = costwatch(&config, &["retention"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("dropped usage_hourly_m202001 (144 rows of usage_hourly"),
        "{}",
        text(&out.stdout)
    );
    let left: Vec<(String, i64)> = sqlx::query_as(
        "SELECT bucket_unit, count(*) FROM usage_totals WHERE bucket_start >= $1 AND bucket_start < $2
         GROUP BY 1 ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&world.pool)
    .await
    .unwrap();
    // Two days, priced and unpriced: four daily totals, no hourly ones.
    assert_eq!(left, [("day".to_owned(), 4)]);
    assert_totals_equal(&world.pool, "after the hourly month was dropped").await;
    let daemon = world.start(&keep);
    let addr = daemon.http_addr().await;
    assert_eq!(api_totals(&addr, from, to, "day").await, truth);
    let (hourly_events, ..) = api_totals(&addr, from, to, "hour").await;
    assert_eq!(hourly_events, 0, "no hour of January 2020 is left to answer");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upgrade_from_the_unpartitioned_schema_keeps_every_row() {
    let world = World::new(1).await;
    let mut migrator = sqlx::migrate::Migrator::new(Path::new("migrations")).await.unwrap();
    migrator.migrations =
        std::borrow::Cow::Owned(migrator.migrations.iter().filter(|m| m.version <= 5).cloned().collect());
    migrator.run(&world.pool).await.unwrap();
    // Old rows: labels, a calibrated version, configured and assumed coefficients, unpriced.
    sqlx::query(
        "INSERT INTO coefficient_version (model, hardware, k1, k2, effective_from, periods, max_residual)
         VALUES ('m', 'h100', 0.5, 0.8, '2026-01-01', 3, 0)",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO partition_progress (topic, partition, next_offset, watermark, epoch, owner)
         VALUES ('usage', 0, 5000, '2026-11-29 23:59:00+00', 1, 'old')",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO window_usage (window_start, window_end, model, hardware, labels, events, late_events, compute,
                                   storage, compute_price, storage_price, k1, k2, currency, finalizes_at,
                                   coefficient_version, price_id)
         SELECT t, t + interval '1 minute', 'm' || (i % 3), CASE WHEN i % 5 = 0 THEN 'cpu' ELSE 'h100' END,
                jsonb_build_object('tenant', 't' || (i % 2)), i, i % 4, i * 1.125, i * 0.0625,
                CASE WHEN i % 5 = 0 THEN NULL ELSE 0.1 END, CASE WHEN i % 5 = 0 THEN NULL ELSE 0.2 END,
                CASE WHEN i % 5 = 0 THEN NULL WHEN i % 3 = 0 THEN 0.5 ELSE 1 END,
                CASE WHEN i % 5 = 0 THEN NULL WHEN i % 3 = 0 THEN 0.8 ELSE 1 END, 'USD', t + interval '6 minutes',
                CASE WHEN i % 3 = 0 AND i % 5 <> 0 THEN (SELECT max(id) FROM coefficient_version) END,
                CASE WHEN i % 5 = 0 THEN NULL ELSE 'p' END
         FROM generate_series('2026-11-27 21:07+00'::timestamptz, '2026-11-29 02:13+00', interval '7 minutes')
              WITH ORDINALITY g(t, i)",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    let snapshot = "SELECT window_start, model, hardware, labels::text, events, late_events, compute, storage,
                           compute_price, storage_price, k1, k2, currency, finalizes_at, coefficient_version, price_id
                    FROM window_usage ORDER BY window_start, model, hardware, labels";
    let fingerprint = |rows: Vec<sqlx::postgres::PgRow>| -> Vec<String> {
        rows.iter()
            .map(|r| {
                format!(
                    "{:?}",
                    (
                        r.get::<DateTime<Utc>, _>(0),
                        r.get::<String, _>(1),
                        r.get::<String, _>(2),
                        r.get::<String, _>(3),
                        r.get::<i64, _>(4),
                        r.get::<i64, _>(5),
                        r.get::<Decimal, _>(6),
                        r.get::<Decimal, _>(7),
                        (
                            r.get::<Option<Decimal>, _>(8),
                            r.get::<Option<Decimal>, _>(9),
                            r.get::<Option<Decimal>, _>(10),
                            r.get::<Option<Decimal>, _>(11),
                            r.get::<String, _>(12),
                            r.get::<DateTime<Utc>, _>(13),
                            r.get::<Option<i64>, _>(14),
                            r.get::<Option<String>, _>(15),
                        ),
                    )
                )
            })
            .collect()
    };
    let before = fingerprint(sqlx::query(snapshot).fetch_all(&world.pool).await.unwrap());
    let costs_before: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(u)::text FROM (SELECT window_start, model, hardware, events, compute, storage, compute_cost,
                storage_cost, total_cost, final FROM usage_costs ORDER BY 1, 2, 3) u",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert!(before.len() > 200, "{}", before.len());

    let store = costwatch::store::Store::connect_lazy(&world.db_url, 2).unwrap();
    store.migrate().await.unwrap();

    assert_eq!(
        fingerprint(sqlx::query(snapshot).fetch_all(&world.pool).await.unwrap()),
        before
    );
    let costs_after: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(u)::text FROM (SELECT window_start, model, hardware, events, compute, storage, compute_cost,
                storage_cost, total_cost, final FROM usage_costs ORDER BY 1, 2, 3) u",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert_eq!(costs_after, costs_before);
    // The one topic consumed so far owns the old rows; rows priced at 1 and 1 without a
    // version are marked as assumed.
    let (topics, assumed): (Vec<String>, i64) = (
        sqlx::query_scalar("SELECT DISTINCT topic FROM window_usage")
            .fetch_all(&world.pool)
            .await
            .unwrap(),
        sqlx::query_scalar("SELECT count(*) FROM window_usage WHERE coefficients_assumed")
            .fetch_one(&world.pool)
            .await
            .unwrap(),
    );
    assert_eq!(topics, ["usage"]);
    let expected_assumed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM window_usage WHERE k1 = 1 AND k2 = 1 AND coefficient_version IS NULL")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(assumed, expected_assumed);
    assert!(assumed > 0);
    assert_tiers_equal(&world.pool, "after the upgrade").await;
    assert_eq!(
        partition_names(&world.pool, "window_usage").await[..3],
        [
            "window_usage_d20261127",
            "window_usage_d20261128",
            "window_usage_d20261129"
        ]
    );
}

/// `final` of every window of `topic`'s rows, as the usage_costs view reports it.
async fn finals_of(pool: &PgPool, topic: &str) -> Vec<bool> {
    sqlx::query_scalar(
        "SELECT u.final FROM usage_costs u
         WHERE EXISTS (SELECT 1 FROM window_usage w WHERE w.topic = $1 AND w.window_start = u.window_start
                       AND w.model = u.model AND w.hardware = u.hardware)
         ORDER BY u.window_start",
    )
    .bind(topic)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_topic_leaves_the_live_topics_final_alone() {
    let world = World::new(1).await;
    let now = Utc::now();
    let event = |id: &str, at: DateTime<Utc>| {
        raw(
            id,
            format!(
                r#"{{"event_id":"{id}","timestamp":"{}","model":"model-0","hardware":"hw-0","compute":2,"storage":1}}"#,
                rfc3339(at)
            ),
        )
    };
    // Live: windows 20 and 15 minutes old, and one now that moves the watermark past them.
    let live = world.config("");
    let live_daemon = world.start(&live);
    world
        .produce(vec![
            event("l1", now - Span::minutes(20)),
            event("l2", now - Span::minutes(15)),
            event("l3", now),
        ])
        .await;
    world.wait_drained(3, WAIT).await;
    assert_eq!(finals_of(&world.pool, &world.topic).await, [true, true, false]);

    // Backfill: its own topic and group, a raised max_event_age, the same database.
    let backfill_topic = format!("{}-backfill", world.topic);
    costwatch::loadgen::ensure_topic(&world.brokers, &backfill_topic, 1)
        .await
        .unwrap();
    let backfill =
        std::fs::read_to_string(world.config("\n[ingest]\nflush_interval = \"200ms\"\nmax_event_age = \"30d\"\n"))
            .unwrap()
            .replace(
                &format!("topic = \"{}\"", world.topic),
                &format!("topic = \"{backfill_topic}\""),
            )
            .replace(
                &format!("group_id = \"{}-group\"", world.topic),
                &format!("group_id = \"{backfill_topic}-group\""),
            );
    let backfill_path = world.dir.path().join("backfill.toml");
    std::fs::write(&backfill_path, backfill).unwrap();
    let backfill_daemon = world.start(&backfill_path);
    let (brokers, topic) = (world.brokers.clone(), backfill_topic.clone());
    let old = vec![event("b1", now - Span::days(10)), event("b2", now - Span::days(9))];
    tokio::task::spawn_blocking(move || costwatch::loadgen::send(&brokers, &topic, &old, 0))
        .await
        .unwrap()
        .unwrap();
    let started = std::time::Instant::now();
    while finals_of(&world.pool, &backfill_topic).await.len() < 2 {
        assert!(started.elapsed() < WAIT, "the backfill was not stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The backfill's own watermark (9 days ago) makes its older window final and its newest
    // not yet; the live topic's windows are as final as before.
    assert_eq!(finals_of(&world.pool, &backfill_topic).await, [true, false]);
    assert_eq!(finals_of(&world.pool, &world.topic).await, [true, true, false]);
    let total: i64 = sqlx::query_scalar("SELECT sum(events)::int8 FROM usage_costs")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(total, 5);
    drop((live_daemon, backfill_daemon));
}

/// Readers with many parts query the tiers with bounds computed in Rust (`history::read`), not
/// through `usage_between`: both must cut every range the same way.
#[tokio::test(flavor = "multi_thread")]
async fn the_tier_bounds_computed_in_rust_are_usage_betweens() {
    use costwatch::history::read::{tier_bounds, Finest};
    let world = World::new(1).await;
    let fixture = world.store_fixture().await;
    let pool = fixture.store.pool();
    let base = DateTime::parse_from_rfc3339("2026-11-14T00:00:00Z").unwrap().to_utc();
    let at = |minutes: i64| base + Span::minutes(minutes);
    let mut checked = 0;
    for (from, to) in [
        (0, 0),
        (0, 60),
        (17, 43),
        (17, 77),
        (59, 1441),
        (0, 2880),
        (61, 4319),
        (1439, 1500),
        (30, 20),
    ] {
        for finest in [Finest::Window, Finest::Hour, Finest::Day] {
            let (from, to) = (at(from), at(to));
            let sql: (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
                "SELECT costwatch_h_from($1, $2, $3), costwatch_h_to($1, $2, $3),
                        costwatch_d_from($1, $2, $3), costwatch_d_to($1, $2, $3)",
            )
            .bind(from)
            .bind(to)
            .bind(finest.as_str())
            .fetch_one(pool)
            .await
            .unwrap();
            let rust = tier_bounds(from, to, finest);
            assert_eq!(
                (rust.h_from, rust.h_to, rust.d_from, rust.d_to),
                sql,
                "[{from}, {to}) finest {finest:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 27);
}

/// A range ending 35 minutes into an hour whose only usage is at minute 40: the hour is read as
/// its roll-up minus the raw minutes past the end, which cancel out, and it is not listed.
#[tokio::test(flavor = "multi_thread")]
async fn an_hour_whose_usage_all_lies_outside_the_range_is_not_a_bucket() {
    let world = World::new(1).await;
    let config = world.config("\n[ingest]\nflush_interval = \"200ms\"\nmax_event_age = \"1d\"\n");
    let mut daemon = world.start(&config);
    let hour = (Utc::now() - Span::hours(3)).duration_trunc(Span::hours(1)).unwrap();
    let at = |minutes: i64, id: &str| {
        raw(
            id,
            format!(
                r#"{{"event_id":"{id}","timestamp":"{}","model":"model-0","hardware":"hw-0","compute":3,"storage":1}}"#,
                rfc3339(hour + Span::minutes(minutes))
            ),
        )
    };
    world
        .produce(vec![at(-50, "before"), at(-10, "before-2"), at(40, "inside-40")])
        .await;
    world.wait_drained(3, WAIT).await;
    let addr = daemon.http_addr().await;
    let (from, to) = (hour - Span::minutes(55), hour + Span::minutes(35));
    let hours = api_hours(&addr, from, to).await;
    assert_eq!(hours, raw_hours(&world.pool, from, to).await);
    assert_eq!(hours.len(), 1, "only the hour before has usage in the range: {hours:?}");
    assert_eq!((hours[0].0, hours[0].1), (hour - Span::hours(1), 2));
    assert_eq!(api_totals(&addr, from, to, "hour").await.0, 2);
    daemon.terminate(WAIT);
}
