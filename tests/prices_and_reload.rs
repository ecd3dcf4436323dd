//! Prices with effective dates and configuration reloads, end to end against the real broker
//! and PostgreSQL: a price change splits one stream exactly at its `effective_from`, `rerate`
//! keeps each side's price, SIGHUP (or `POST /-/reload`) changes budgets and prices in the
//! running process while a broken file changes nothing, and a usage profile added by reload
//! prices new token events at once and earlier ones through `rerate`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, SecondsFormat, Utc};
use common::{dec, http, raw, steady_month_zone, World};
use rust_decimal::Decimal;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// `[pricing]` with a100-80g at C_C 0.1 since forever plus `dated` entries (TOML), and the
/// configured coefficients 0.5 and 0.8: one event of T 1000, S 500 costs 130 at C_C 0.1 and
/// 230 at C_C 0.3.
fn pricing(dated: &str) -> String {
    format!(
        r#"
[pricing]
currency = "USD"

[[pricing.hardware]]
name = "a100-80g"
compute_price = "0.1"
storage_price = "0.2"
{dated}
[[pricing.coefficients]]
model = "qwen2-7b-instruct"
hardware = "a100-80g"
k1 = "0.5"
k2 = "0.8"
"#
    )
}

fn price_from(compute_price: &str, from: DateTime<Utc>) -> String {
    format!(
        r#"
[[pricing.hardware]]
name = "a100-80g"
compute_price = "{compute_price}"
storage_price = "0.2"
effective_from = "{}"
"#,
        instant(from)
    )
}

fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// An event of T 1000, S 500 at `at`.
fn event_at(id: &str, at: DateTime<Utc>) -> costwatch::loadgen::Message {
    raw(
        id,
        format!(
            r#"{{"event_id":"{id}","timestamp":"{}","model":"qwen2-7b-instruct","hardware":"a100-80g","compute":1000,"storage":500}}"#,
            instant(at)
        ),
    )
}

/// One window row: (start, events, C_C, total cost, price id).
type WindowRow = (DateTime<Utc>, i64, Option<Decimal>, Option<Decimal>, Option<String>);

async fn windows(world: &World) -> Vec<WindowRow> {
    let rows: Vec<WindowRow> = sqlx::query_as(
        "SELECT u.window_start, u.events, w.compute_price, u.total_cost, w.price_id
         FROM usage_costs u JOIN window_usage w USING (window_start, model, hardware)
         ORDER BY u.window_start",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(s, e, p, c, id)| (s, e, p.map(|p| p.normalize()), c.map(|c| c.normalize()), id))
        .collect()
}

fn rerate(config: &Path, from: DateTime<Utc>, to: DateTime<Utc>) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args([
            "rerate",
            "--from",
            &instant(from),
            "--to",
            &instant(to),
            "--json",
            "--config",
        ])
        .arg(config)
        .env_remove("COSTWATCH_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_prices_split_one_stream_at_effective_from_and_rerate_keeps_each_side() {
    let world = World::new(1).await;
    // The price rises to C_C 0.3 at a minute boundary two hours ago; events straddle it.
    let boundary = (Utc::now() - chrono::Duration::hours(2))
        .duration_trunc(chrono::Duration::minutes(1))
        .unwrap();
    let ms = chrono::Duration::milliseconds;
    let dated = world.config(&pricing(&price_from("0.3", boundary)));
    let mut daemon = world.start(&dated);
    let stamps = [ms(-120_000), ms(-1), ms(0), ms(59_999), ms(60_000)];
    world
        .produce(
            stamps
                .iter()
                .enumerate()
                .map(|(i, d)| event_at(&format!("e{i}"), boundary + *d))
                .collect(),
        )
        .await;
    world.wait_consumed(5, WAIT).await;
    let minute = chrono::Duration::minutes(1);
    let rows = windows(&world).await;
    let shape: Vec<_> = rows.iter().map(|r| (r.0, r.1, r.2, r.3)).collect();
    assert_eq!(
        shape,
        vec![
            (boundary - minute * 2, 1, Some(dec("0.1")), Some(dec("130"))),
            (boundary - minute, 1, Some(dec("0.1")), Some(dec("130"))),
            (boundary, 2, Some(dec("0.3")), Some(dec("460"))),
            (boundary + minute, 1, Some(dec("0.3")), Some(dec("230"))),
        ]
    );
    // Each side names its own price entry.
    assert_eq!(rows[0].4, rows[1].4);
    assert_eq!(rows[2].4, rows[3].4);
    assert_ne!(rows[1].4, rows[2].4);
    daemon.terminate(WAIT);

    // Re-rated with the undated price alone, the later side falls back to 0.1 ...
    let (from, to) = (
        boundary - chrono::Duration::hours(1),
        boundary + chrono::Duration::hours(1),
    );
    let undated = world.config(&pricing(""));
    let report = rerate(&undated, from, to);
    assert_eq!(
        (report["rows"].as_i64(), report["changed"].as_i64()),
        (Some(4), Some(2))
    );
    assert_eq!(
        (report["before"].as_str(), report["after"].as_str()),
        (Some("950"), Some("650"))
    );
    // ... and re-rated over both with the dated configuration, each side has its own price
    // again: the earlier one is untouched, the later one back at 0.3.
    let report = rerate(&dated, from, to);
    assert_eq!(
        (report["rows"].as_i64(), report["changed"].as_i64()),
        (Some(4), Some(2))
    );
    assert_eq!(
        (report["before"].as_str(), report["after"].as_str()),
        (Some("650"), Some("950"))
    );
    assert_eq!(windows(&world).await, rows);
    assert_eq!(rerate(&dated, from, to)["changed"], 0);
}

async fn budgets(addr: &str) -> Value {
    let (status, body) = http(addr, "GET", "/api/v1/budgets", None, None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn metrics(addr: &str) -> String {
    http(addr, "GET", "/metrics", None, None).await.1
}

/// The budget and alerting sections of the reload test, with `amount`; its month does not turn
/// while the test runs (its events reach into the next minute).
fn budget(amount: &str) -> String {
    format!(
        r#"
[alerting]
evaluation_interval = "1s"

[[budgets]]
name = "team"
period = "monthly"
amount = "{amount}"
time_zone = "{}"
"#,
        steady_month_zone(Utc::now())
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_new_budget_and_price_in_the_running_process_and_a_broken_file_changes_nothing() {
    let world = World::new(1).await;
    let config = world.config(&format!("{}{}", pricing(""), budget("1000")));
    let mut daemon = world.start(&config);
    let pid = daemon.pid();
    let addr = daemon.http_addr().await;
    let now = Utc::now();
    world.produce(vec![event_at("before", now)]).await;
    wait_until("spend 130", || async {
        budgets(&addr).await["budgets"][0]["spend"] == "130"
    })
    .await;
    assert_eq!(
        metric(&metrics(&addr).await, "costwatch_config_last_reload_successful"),
        Some(1.0)
    );

    // New amount, and C_C 0.3 from the next minute on; the file also changes a setting that
    // needs a restart.
    let next_minute = now.duration_trunc(chrono::Duration::minutes(1)).unwrap() + chrono::Duration::minutes(1);
    let text = std::fs::read_to_string(&config).unwrap();
    let changed = text
        .replace("amount = \"1000\"", "amount = \"2000\"")
        .replace(
            "[[pricing.coefficients]]",
            &format!("{}\n[[pricing.coefficients]]", price_from("0.3", next_minute)),
        )
        .replace("session_timeout = \"6s\"", "session_timeout = \"7s\"");
    std::fs::write(&config, &changed).unwrap();
    daemon.signal("HUP");
    daemon.wait_log("configuration reloaded").await;
    let log = daemon.log_text();
    assert!(
        log.contains("section=\"kafka\"") || log.contains("section=kafka"),
        "{log}"
    );
    wait_until("amount 2000", || async {
        budgets(&addr).await["budgets"][0]["amount"] == "2000"
    })
    .await;

    // A window before the new entry keeps C_C 0.1; one from it on is priced 0.3.
    world
        .produce(vec![
            event_at("old-price", now),
            event_at("new-price", next_minute + chrono::Duration::seconds(1)),
        ])
        .await;
    wait_until("spend 490", || async {
        budgets(&addr).await["budgets"][0]["spend"] == "490"
    })
    .await;
    let status = budgets(&addr).await;
    assert_eq!(status["budgets"][0]["utilization"], "0.245");

    // A broken file changes nothing: the gauge says so, the old amount and prices stay.
    std::fs::write(&config, changed.replace("amount = \"2000\"", "amount = \"-5\"")).unwrap();
    daemon.signal("HUP");
    daemon.wait_log("configuration reload failed").await;
    assert!(daemon.log_text().contains("budgets[0].amount: must be greater than 0"));
    let scraped = metrics(&addr).await;
    assert_eq!(metric(&scraped, "costwatch_config_last_reload_successful"), Some(0.0));
    let last_success = metric(&scraped, "costwatch_config_last_reload_success_timestamp_seconds").unwrap();
    world
        .produce(vec![event_at(
            "after-broken",
            next_minute + chrono::Duration::seconds(2),
        )])
        .await;
    wait_until("spend 720", || async {
        budgets(&addr).await["budgets"][0]["spend"] == "720"
    })
    .await;
    assert_eq!(budgets(&addr).await["budgets"][0]["amount"], "2000");

    // POST /-/reload says the same, and works again once the file is fixed.
    let (status, body) = http(&addr, "POST", "/-/reload", None, None).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("budgets[0].amount: must be greater than 0"), "{body}");
    std::fs::write(&config, changed.replace("amount = \"2000\"", "amount = \"3000\"")).unwrap();
    let (status, body) = http(&addr, "POST", "/-/reload", None, None).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["ignored_until_restart"], serde_json::json!(["kafka"]));
    wait_until("amount 3000", || async {
        budgets(&addr).await["budgets"][0]["amount"] == "3000"
    })
    .await;
    let scraped = metrics(&addr).await;
    assert_eq!(metric(&scraped, "costwatch_config_last_reload_successful"), Some(1.0));
    assert!(metric(&scraped, "costwatch_config_last_reload_success_timestamp_seconds").unwrap() > last_success);

    // One process throughout, and every event counted exactly once.
    assert!(daemon.is_running());
    assert_eq!(daemon.pid(), pid);
    let (events, total): (i64, Decimal) = sqlx::query_as("SELECT sum(events)::int8, sum(total_cost) FROM usage_costs")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!((events, total.normalize()), (4, dec("720")));
    let prices: Vec<(DateTime<Utc>, Decimal)> =
        sqlx::query_as("SELECT window_start, compute_price FROM window_usage ORDER BY window_start")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    let prices: Vec<_> = prices
        .into_iter()
        .map(|(s, p)| (s >= next_minute, p.normalize()))
        .collect();
    assert_eq!(prices, vec![(false, dec("0.1")), (true, dec("0.3"))]);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_needs_the_api_token_when_one_is_set() {
    let world = World::new(1).await;
    let token = "reload-token-0123456789";
    let config = world.config(&format!(
        "\n[http]\nlisten = \"127.0.0.1:0\"\napi_token = \"{token}\"\n"
    ));
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    let (status, _) = http(&addr, "POST", "/-/reload", None, None).await;
    assert_eq!(status, 401);
    let (status, body) = http(&addr, "POST", "/-/reload", Some(token), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"ignored_until_restart":[],"status":"success"}"#);
}

/// An OpenAI-style response body (as vLLM returns it) of 800 input and 200 output tokens.
fn completion(id: &str, at: DateTime<Utc>) -> costwatch::loadgen::Message {
    raw(
        id,
        format!(
            r#"{{"id":"{id}","object":"chat.completion","created":{},"model":"qwen2-7b-instruct","choices":[],"usage":{{"prompt_tokens":800,"completion_tokens":200,"total_tokens":1000}}}}"#,
            at.timestamp()
        ),
    )
}

/// (window start, events, input tokens, ΣT, ΣS, profile, cost) per window row, oldest first.
type TokenRow = (
    DateTime<Utc>,
    i64,
    Decimal,
    Decimal,
    Decimal,
    Option<String>,
    Option<Decimal>,
);

async fn token_rows(world: &World) -> Vec<TokenRow> {
    let rows: Vec<TokenRow> = sqlx::query_as(
        "SELECT window_start, events, input_tokens, compute, storage, profile,
                compute * compute_price * k1 + storage * storage_price * k2
         FROM window_usage WHERE usage_from_tokens ORDER BY window_start",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(s, e, i, c, st, p, cost)| {
            (
                s,
                e,
                i.normalize(),
                c.normalize(),
                st.normalize(),
                p,
                cost.map(|c| c.normalize()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_usage_profile_added_by_reload_prices_new_token_events_and_rerate_the_earlier_ones() {
    let world = World::new(1).await;
    let source = format!(
        "\n[[sources]]\nname = \"vllm\"\ntopic = \"{}\"\nformat = \"openai\"\nhardware = \"a100-80g\"\n",
        world.topic
    );
    let config = world.config(&format!("{}{source}", pricing("")));
    let mut daemon = world.start(&config);
    let pid = daemon.pid();
    let minute = chrono::Duration::minutes(1);
    let first = Utc::now().duration_trunc(minute).unwrap() - minute * 3;
    world.produce(vec![completion("cmpl-1", first)]).await;
    world.wait_consumed(1, WAIT).await;
    // No profile yet: the tokens are kept, T and S unknown, the cost NULL (unpriced, not 0).
    assert_eq!(
        token_rows(&world).await,
        vec![(first, 1, dec("800"), dec("0"), dec("0"), None, None)]
    );

    // T = 800 x 0.5 + 200 x 2 = 800, S = 1000 x 0.001 = 1; cost 0.1 x 0.5 x 800 + 0.2 x 0.8 x 1.
    let profile = "\n[[usage_profiles]]\nname = \"qwen-a100\"\nmodel = \"qwen2-*\"\nhardware = \"a100-*\"\n\
                   compute_per_input_token = \"0.5\"\ncompute_per_output_token = \"2\"\nstorage_per_token = \"0.001\"\n";
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}{profile}")).unwrap();
    daemon.signal("HUP");
    daemon.wait_log("configuration reloaded").await;
    let second = first + minute;
    world.produce(vec![completion("cmpl-2", second)]).await;
    world.wait_consumed(2, WAIT).await;
    let priced = (
        second,
        1,
        dec("800"),
        dec("800"),
        dec("1"),
        Some("qwen-a100".to_owned()),
        Some(dec("40.16")),
    );
    assert_eq!(
        token_rows(&world).await,
        vec![(first, 1, dec("800"), dec("0"), dec("0"), None, None), priced.clone()]
    );
    assert!(daemon.is_running());
    assert_eq!(daemon.pid(), pid, "the profile came in by reload, not a restart");
    daemon.terminate(WAIT);

    // rerate applies the profile to the earlier token-only window, exactly.
    let report = rerate(&config, first - minute, second + minute);
    assert_eq!(report["changed"].as_i64(), Some(1), "{report}");
    let after = token_rows(&world).await;
    assert_eq!(
        after[0],
        (
            first,
            1,
            dec("800"),
            dec("800"),
            dec("1"),
            Some("qwen-a100".to_owned()),
            Some(dec("40.16"))
        )
    );
    assert_eq!(after[1], priced);
}
