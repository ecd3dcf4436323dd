//! History at scale (issue 17): fills a database with `--raw-days` days of one-minute windows for
//! `--keys` (model, hardware) keys plus `--days` days of hourly and daily roll-ups, then times,
//! with PostgreSQL warm, the queries a user waits for: the dashboard's SQL panels over 30 days,
//! the cost table behind `/api/v1/costs` (`usage::store::cost_table`, the function the handler
//! calls) at 24 h, 7 d, 30 d and 365 d, and a monthly budget's evaluation
//! (`alerting::evaluator::evaluate_all`), now, in the last minute of the previous month (a
//! whole month's period) and half past the previous hour (the forecast windows' starts read the
//! most raw minutes then); the last line's `budget_p95_ms` is the largest of the three.
//! "before" answers the same questions from the raw windows alone, as costwatch did before
//! roll-ups, in the same run.
//!
//! Bulk path: raw rows are inserted by `INSERT ... SELECT generate_series` instead of through
//! Kafka (35 days x 200 keys is ten million windows); the roll-ups of the raw days are then
//! built by `history::rollup::rebuild_days`, the same grouping the flush's deltas add up to
//! (tests/history.rs proves that equality), and older days' hourly rows directly with the sums
//! sixty such windows would have (the totals across keys follow by the roll-ups' triggers).
//! `exact=` compares every retained day's roll-up totals with its raw totals, and every
//! hour's and day's totals across keys with its roll-up's.
//!
//! Run: `scripts/bench-history.sh [--days N] [--keys K] [--raw-days R] [--runs N]`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as Span, DurationRound, Utc};
use costwatch::store::Store;
use costwatch::usage::store::{cost_table, CostQuery, CostStep};
use costwatch::usage::LabelFilter;
use sqlx::{Executor, PgPool};

struct Args {
    /// Timed runs of each "before" query (reading 35 days of raw windows takes tens of seconds).
    before_runs: usize,
    /// Keep the database of an earlier run with the same sizes instead of filling it again.
    reuse: bool,
    days: i64,
    raw_days: i64,
    keys: i64,
    runs: usize,
    url: String,
}

fn args() -> Args {
    let mut a = Args {
        days: 400,
        raw_days: 35,
        keys: 200,
        runs: 20,
        before_runs: 3,
        reuse: false,
        url: std::env::var("COSTWATCH_BENCH_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/costwatch_bench_history".into()),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = || argv.get(i + 1).and_then(|v| v.parse::<i64>().ok());
        match argv[i].as_str() {
            "--days" => a.days = value().expect("--days N"),
            "--raw-days" => a.raw_days = value().expect("--raw-days N"),
            "--keys" => a.keys = value().expect("--keys K"),
            "--runs" => a.runs = value().expect("--runs N") as usize,
            "--before-runs" => a.before_runs = value().expect("--before-runs N") as usize,
            "--reuse" => {
                a.reuse = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a.raw_days = a.raw_days.min(a.days);
    a
}

/// Percentile `p` (0..=100) of `samples`, in milliseconds.
fn percentile(samples: &mut [Duration], p: usize) -> f64 {
    samples.sort();
    let i = ((samples.len() - 1) * p).div_ceil(100);
    samples[i].as_secs_f64() * 1000.0
}

async fn fill(pool: &PgPool, store: &Store, a: &Args, today: DateTime<Utc>, now: DateTime<Utc>) {
    let started = Instant::now();
    for d in 0..a.raw_days {
        let day = today - Span::days(a.raw_days - 1 - d);
        sqlx::query("SELECT costwatch_ensure_partition(t, $1) FROM unnest(ARRAY['window_usage', 'usage_hourly', 'usage_daily']) t")
            .bind(day)
            .execute(pool)
            .await
            .unwrap();
        // Per key: a model of 20, a hardware target of 10 (every tenth unpriced), an amount
        // that varies by minute with four fractional digits. Today's windows stop at now, as
        // real ones do (a reader may count on nothing stored past the clock).
        sqlx::query(
            "INSERT INTO window_usage (window_start, window_end, finalizes_at, topic, source, model, hardware, labels,
                    events, compute, storage, compute_price, storage_price, k1, k2, coefficients_assumed, currency,
                    price_id)
             SELECT t, t + interval '1 minute', t + interval '6 minutes', 'usage', 'usage', 'model-' || (k % 20),
                    'hw-' || (k / 20), '{}', 1 + (m % 7), (m % 97) * 1.0625 + k, (m % 13) * 0.5,
                    CASE WHEN k % 10 = 9 THEN NULL ELSE 0.0004 END, CASE WHEN k % 10 = 9 THEN NULL ELSE 0.00002 END,
                    CASE WHEN k % 10 = 9 THEN NULL ELSE 1.1 END, CASE WHEN k % 10 = 9 THEN NULL ELSE 0.9 END,
                    false, 'USD', CASE WHEN k % 10 = 9 THEN NULL ELSE 'p' || (k / 20) END
             FROM generate_series(0, 1439) m, generate_series(0, $2 - 1) k,
                  LATERAL (SELECT $1::timestamptz + m * interval '1 minute' AS t) x
             WHERE t < $3",
        )
        .bind(day)
        .bind(a.keys)
        .bind(now)
        .execute(pool)
        .await
        .unwrap();
        let n = day.timestamp_millis().div_euclid(costwatch::history::DAY_MS);
        costwatch::history::rollup::rebuild_days(pool, &[n]).await.unwrap();
    }
    eprintln!(
        "raw windows and their roll-ups: {:.0}s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    for d in a.raw_days..a.days {
        let day = today - Span::days(d);
        sqlx::query("SELECT costwatch_ensure_partition(t, $1) FROM unnest(ARRAY['usage_hourly', 'usage_daily']) t")
            .bind(day)
            .execute(pool)
            .await
            .unwrap();
        for (table, unit, count) in [("usage_hourly", "hour", 24), ("usage_daily", "day", 1)] {
            let per = if unit == "hour" { 60 } else { 1440 };
            sqlx::query(&format!(
                "INSERT INTO {table} (bucket_start, topic, source, model, hardware, labels, usage_from_tokens, profile,
                        currency, price_id, coefficient_version, compute_price, storage_price, k1, k2,
                        coefficients_assumed, events, late_events, compute, storage, input_tokens, output_tokens,
                        finalizes_at)
                 SELECT $1::timestamptz + h * interval '1 {unit}', 'usage', 'usage', 'model-' || (k % 20),
                        'hw-' || (k / 20), '{{}}', false, NULL, 'USD',
                        CASE WHEN k % 10 = 9 THEN NULL ELSE 'p' || (k / 20) END, NULL,
                        CASE WHEN k % 10 = 9 THEN NULL ELSE 0.0004 END, CASE WHEN k % 10 = 9 THEN NULL ELSE 0.00002 END,
                        CASE WHEN k % 10 = 9 THEN NULL ELSE 1.1 END, CASE WHEN k % 10 = 9 THEN NULL ELSE 0.9 END,
                        false, {per} * 4, 0, {per} * (51.5 + k), {per} * 3.0, 0, 0, $1::timestamptz + interval '2 days'
                 FROM generate_series(0, {count} - 1) h, generate_series(0, $2 - 1) k"
            ))
            .bind(day)
            .bind(a.keys)
            .execute(pool)
            .await
            .unwrap();
        }
    }
    pool.execute("VACUUM ANALYZE").await.unwrap();
    let _ = store;
    eprintln!(
        "older roll-ups and VACUUM ANALYZE: {:.0}s",
        started.elapsed().as_secs_f64()
    );
}

/// The shipped dashboard's spend panels, with Grafana's macros expanded for `[from, to)`.
fn dashboard_queries(from: DateTime<Utc>, to: DateTime<Utc>, before: bool) -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/costwatch.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(sql)) = m.get("rawSql") {
                    if sql.contains("usage_costs") {
                        queries.push(sql.clone());
                    }
                }
                stack.extend(m.values());
            }
            serde_json::Value::Array(a) => stack.extend(a.iter()),
            _ => {}
        }
    }
    let range = format!(
        "window_start >= '{}' AND window_start < '{}'",
        from.to_rfc3339(),
        to.to_rfc3339()
    );
    queries
        .into_iter()
        .map(|q| {
            let q = q
                .replace("$__timeFilter(window_start)", &range)
                .replace(
                    "$__timeGroupAlias(window_start, $__interval)",
                    "date_trunc('hour', window_start) AS time",
                )
                .replace("$tenant", "'__all'");
            if before {
                q.replace("usage_costs_hourly", "usage_costs")
                    .replace("usage_costs_by_labels_hourly", "usage_costs_by_labels")
                    .replace("usage_costs_totals_hourly", "usage_costs")
            } else {
                q
            }
        })
        .collect()
}

/// The old cost table: every window of the range from `usage_costs`, as before roll-ups.
async fn before_cost_table(pool: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>, step: &str) {
    sqlx::query(
        "SELECT date_trunc($3, window_start, 'UTC') AS bucket, sum(events)::int8, sum(compute), sum(storage),
                COALESCE(sum(total_cost), 0), COALESCE(sum(events) FILTER (WHERE total_cost IS NULL), 0)::int8
         FROM usage_costs WHERE window_start >= $1 AND window_start < $2 GROUP BY 1 ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .bind(step)
    .fetch_all(pool)
    .await
    .unwrap();
}

/// Whether every retained day's roll-up totals equal its raw totals, and every window's, hour's
/// and day's totals across keys (`usage_totals`, what the unfiltered queries read) equal its
/// tier's.
async fn exact(pool: &PgPool) -> bool {
    let totals_differing: i64 = sqlx::query_scalar(
        "WITH tiers AS (SELECT 'window' AS u, window_start AS b, currency, sum(events) AS e, sum(compute) AS c,
                               sum(storage) AS s,
                               COALESCE(sum(compute * compute_price * k1 + storage * storage_price * k2), 0) AS cost
                        FROM window_usage GROUP BY 1, 2, 3
                        UNION ALL
                        SELECT 'hour', bucket_start, currency, sum(events), sum(compute), sum(storage),
                               COALESCE(sum(compute_cost + storage_cost), 0)
                        FROM usage_hourly GROUP BY 1, 2, 3
                        UNION ALL
                        SELECT 'day', bucket_start, currency, sum(events), sum(compute), sum(storage),
                               COALESCE(sum(compute_cost + storage_cost), 0)
                        FROM usage_daily GROUP BY 1, 2, 3),
              totals AS (SELECT bucket_unit, bucket_start, currency, sum(events), sum(compute), sum(storage),
                                sum(compute_cost + storage_cost)
                         FROM usage_totals GROUP BY 1, 2, 3)
         SELECT (SELECT count(*) FROM (SELECT * FROM tiers EXCEPT SELECT * FROM totals) x)
              + (SELECT count(*) FROM (SELECT * FROM totals EXCEPT SELECT * FROM tiers) x)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    if totals_differing != 0 {
        eprintln!("{totals_differing} buckets of usage_totals differ from their tier's");
        return false;
    }
    let differing: i64 = sqlx::query_scalar(
        "WITH raw AS (SELECT date_trunc('day', window_start, 'UTC') AS d, sum(events) AS e, sum(compute) AS c,
                             sum(storage) AS s, sum(compute * compute_price * k1 + storage * storage_price * k2) AS cost
                      FROM window_usage GROUP BY 1),
              hourly AS (SELECT date_trunc('day', bucket_start, 'UTC') AS d, sum(events) AS e, sum(compute) AS c,
                                sum(storage) AS s, sum(compute * compute_price * k1 + storage * storage_price * k2) AS cost
                         FROM usage_hourly WHERE bucket_start >= (SELECT min(window_start) FROM window_usage) GROUP BY 1),
              daily AS (SELECT bucket_start AS d, sum(events) AS e, sum(compute) AS c, sum(storage) AS s,
                               sum(compute * compute_price * k1 + storage * storage_price * k2) AS cost
                        FROM usage_daily WHERE bucket_start >= (SELECT min(window_start) FROM window_usage) GROUP BY 1)
         SELECT (SELECT count(*) FROM (SELECT * FROM raw EXCEPT SELECT * FROM hourly) x)
              + (SELECT count(*) FROM (SELECT * FROM hourly EXCEPT SELECT * FROM raw) x)
              + (SELECT count(*) FROM (SELECT * FROM raw EXCEPT SELECT * FROM daily) x)
              + (SELECT count(*) FROM (SELECT * FROM daily EXCEPT SELECT * FROM raw) x)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    differing == 0
}

async fn timed<F, Fut>(runs: usize, mut f: F) -> (f64, f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f().await; // warm
    let mut samples: Vec<Duration> = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f().await;
        samples.push(t.elapsed());
    }
    (percentile(&mut samples, 50), percentile(&mut samples, 95))
}

fn budget_settings(url: &str) -> costwatch::config::Settings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:9"
topic = "usage"
group_id = "bench"

[database]
url = "{url}"

[pricing]
currency = "USD"

# An amount no month reaches: the evaluation reads the same, and no alert changes state between
# the budget measured now and over the previous month (a firing alert's writes are not a read).
[[budgets]]
name = "all-monthly"
period = "monthly"
amount = "1000000000"
"#
        ),
    )
    .unwrap();
    costwatch::config::Settings::load(Some(&path)).unwrap()
}

#[tokio::main]
async fn main() {
    let a = args();
    let name = a.url.rsplit('/').next().unwrap().to_owned();
    let admin = format!("{}/postgres", &a.url[..a.url.rfind('/').unwrap()]);
    let admin_pool = PgPool::connect(&admin).await.unwrap();
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&admin_pool)
        .await
        .unwrap();
    let reuse = a.reuse && exists;
    eprintln!("database {name}: {}", if reuse { "reused" } else { "filled anew" });
    if !reuse {
        admin_pool
            .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
            .await
            .unwrap();
        admin_pool
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .unwrap();
    }
    let store = Store::connect_lazy(&a.url, 4).unwrap();
    store.migrate().await.unwrap();
    let pool = store.pool().clone();
    let now = Utc::now();
    let today = now.duration_trunc(Span::days(1)).unwrap();
    if !reuse {
        fill(&pool, &store, &a, today, now).await;
    }

    println!(
        "# history benchmark: {} days of roll-ups, {} of raw windows, {} keys, {} runs per query ({} before)",
        a.days, a.raw_days, a.keys, a.runs, a.before_runs
    );
    for table in ["window_usage", "usage_hourly", "usage_daily", "usage_totals"] {
        // The partitioned tables' size is their partitions'.
        let (rows, bytes): (i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM {table}),
                    (SELECT COALESCE(sum(pg_total_relation_size(inhrelid)), 0)::int8 FROM pg_inherits
                     WHERE inhparent = '{table}'::regclass) + pg_total_relation_size('{table}')"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        println!("table {table}: {rows} rows, {:.1} MB", bytes as f64 / 1e6);
    }
    let mut report = Vec::new();
    let settings = budget_settings(&a.url);
    // After first: its numbers are the ones the targets are about.
    for before in [false, true] {
        if before && a.before_runs == 0 {
            continue;
        }
        let label = if before { "before" } else { "after" };
        let runs = if before { a.before_runs } else { a.runs };
        for (i, sql) in dashboard_queries(now - Span::days(30), now, before).iter().enumerate() {
            let (p50, p95) = timed(runs, || async {
                sqlx::query(sql).fetch_all(&pool).await.unwrap();
            })
            .await;
            println!("{label} dashboard_panel_{i}_30d p50_ms={p50:.1} p95_ms={p95:.1}");
        }
        for (span, days, step) in [
            ("24h", 1, CostStep::Hour),
            ("7d", 7, CostStep::Hour),
            ("30d", 30, CostStep::Hour),
            ("365d", 365, CostStep::Day),
        ] {
            let from = now - Span::days(days);
            let (p50, p95) = timed(runs, || async {
                if before {
                    before_cost_table(&pool, from, now, step.as_str()).await;
                } else {
                    let q = CostQuery {
                        from,
                        to: now,
                        step: Some(step),
                        model: None,
                        hardware: None,
                        labels: &LabelFilter::default(),
                        by: &[],
                    };
                    cost_table(&pool, &q).await.unwrap();
                }
            })
            .await;
            println!("{label} api_costs_{span} p50_ms={p50:.1} p95_ms={p95:.1}");
            report.push((label, format!("q{span}"), p95));
        }
        let (p50, p95) = timed(runs, || async {
            if before {
                let month =
                    costwatch::alerting::budget::period_bounds(costwatch::config::Period::Monthly, chrono_tz::UTC, now);
                sqlx::query_scalar::<_, Option<rust_decimal::Decimal>>(
                    "SELECT sum(compute * compute_price * k1 + storage * storage_price * k2) FROM window_usage
                     WHERE window_start >= $1 AND window_start < $2",
                )
                .bind(month.0)
                .bind(month.1)
                .fetch_one(&pool)
                .await
                .unwrap();
            } else {
                costwatch::alerting::evaluator::evaluate_all(&settings, &store, now)
                    .await
                    .unwrap();
            }
        })
        .await;
        println!("{label} budget_monthly p50_ms={p50:.1} p95_ms={p95:.1}");
        report.push((label, "budget".into(), p95));
        if !before {
            // The same budget in the last minute of the previous month: a whole month's period,
            // the most a monthly budget reads (at the start of a month its period is short).
            // And half past the previous hour: the forecast windows (1 h and 6 h back from then)
            // start on the minute of the hour that reads the most raw minutes (30 a key each).
            let month =
                costwatch::alerting::budget::period_bounds(costwatch::config::Period::Monthly, chrono_tz::UTC, now);
            let half_past = now.duration_trunc(Span::hours(1)).unwrap() - Span::minutes(30);
            for (name, at) in [
                ("budget_whole_month", month.0 - Span::minutes(1)),
                ("budget_half_past", half_past),
            ] {
                let (p50, p95) = timed(runs, || async {
                    costwatch::alerting::evaluator::evaluate_all(&settings, &store, at)
                        .await
                        .unwrap();
                })
                .await;
                println!("{label} {name} p50_ms={p50:.1} p95_ms={p95:.1}");
                report.push((label, name.into(), p95));
            }
        }
    }
    let p95 = |name: &str| {
        report
            .iter()
            .find(|(l, n, _)| *l == "after" && n == name)
            .map_or(f64::NAN, |r| r.2)
    };
    println!(
        "q30d_p95_ms={:.1} q365d_p95_ms={:.1} budget_p95_ms={:.1} exact={}",
        p95("q30d"),
        p95("q365d"),
        p95("budget")
            .max(p95("budget_whole_month"))
            .max(p95("budget_half_past")),
        exact(&pool).await
    );
}
