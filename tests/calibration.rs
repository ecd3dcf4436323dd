//! Calibration and recommendation against the real PostgreSQL (and, for live pricing and the
//! API, the real broker): bills import, `calibrate` recovering known coefficients from noisy
//! bills, a new version pricing new windows in a running daemon, `rerate`, and `recommend`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, SecondsFormat, TimeZone, Utc};
use common::{dec, event, http, World};
use costwatch::domain::{HardwareName, UnitPrice};
use costwatch::pricing::PriceId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{PgPool, Row};

const WAIT: Duration = Duration::from_secs(120);
const HEADER: &str = "period_start,period_end,hardware,model,amount,currency\n";

fn costwatch(config: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_costwatch"));
    command.args(args).env_remove("COSTWATCH_CONFIG");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.output().expect("cannot run costwatch")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must succeed and returns its standard output.
fn succeed(config: &Path, args: &[&str]) -> String {
    let out = costwatch(Some(config), args);
    assert!(
        out.status.success(),
        "costwatch {args:?} failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn day(n: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::days(n)
}

/// One window row as the daemon would have written it, with the configured prices.
#[allow(clippy::too_many_arguments)]
async fn insert_usage(
    pool: &PgPool,
    window_start: DateTime<Utc>,
    model: &str,
    hardware: &str,
    compute: Decimal,
    storage: Decimal,
    compute_price: &str,
    storage_price: &str,
) {
    sqlx::query(
        "SELECT costwatch_ensure_partition(t, $1) FROM unnest(ARRAY['window_usage', 'usage_hourly', 'usage_daily']) t",
    )
    .bind(window_start)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO window_usage (window_start, window_end, finalizes_at, topic, source, model, hardware, events,
                                   compute, storage, compute_price, storage_price, k1, k2, currency)
         VALUES ($1, $1 + interval '1 minute', $1 + interval '6 minutes', 'usage', 'usage', $2, $3, 1, $4, $5, $6, $7,
                 1, 1, 'USD')",
    )
    .bind(window_start)
    .bind(model)
    .bind(hardware)
    .bind(compute)
    .bind(storage)
    .bind(dec(compute_price))
    .bind(dec(storage_price))
    .execute(pool)
    .await
    .unwrap();
    // Written by hand, so the roll-ups are rebuilt as a repair would.
    let day = window_start.timestamp_millis().div_euclid(costwatch::history::DAY_MS);
    costwatch::history::rollup::rebuild_days(pool, &[day]).await.unwrap();
}

fn write_file(world: &World, name: &str, text: &str) -> String {
    let path = world.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A generated bill period: its usage and what was billed for it.
struct Period {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    compute: Decimal,
    storage: Decimal,
    amount: Decimal,
}

/// Writes `periods` days of seeded usage for `models` on `hardware` (three window rows per
/// model per day) and bills each day with the true `k1`, `k2` times a uniform noise of up to
/// ±`noise_bp` hundredths of a per cent, rounded to cents as a provider would.
#[allow(clippy::too_many_arguments)]
async fn generate(
    pool: &PgPool,
    rng: &mut StdRng,
    periods: i64,
    models: &[&str],
    hardware: &str,
    (compute_price, storage_price): (&str, &str),
    (k1, k2): (&str, &str),
    noise_bp: i64,
    compute_range: std::ops::Range<i64>,
    storage_range: std::ops::Range<i64>,
) -> Vec<Period> {
    let mut bills = Vec::new();
    for n in 0..periods {
        let (start, end) = (day(n), day(n + 1));
        let (mut compute, mut storage) = (Decimal::ZERO, Decimal::ZERO);
        for model in models {
            for hour in [0, 8, 16] {
                let t = Decimal::new(rng.gen_range(compute_range.clone()), 2);
                let s = Decimal::new(rng.gen_range(storage_range.clone()), 2);
                let at = start + chrono::Duration::hours(hour);
                insert_usage(pool, at, model, hardware, t, s, compute_price, storage_price).await;
                compute += t;
                storage += s;
            }
        }
        let exact = dec(compute_price) * dec(k1) * compute + dec(storage_price) * dec(k2) * storage;
        let factor = Decimal::ONE + Decimal::new(rng.gen_range(-noise_bp..=noise_bp), 4);
        bills.push(Period {
            start,
            end,
            compute,
            storage,
            amount: (exact * factor).round_dp(2),
        });
    }
    bills
}

fn bills_csv(periods: &[Period], hardware: &str, model: &str) -> String {
    periods
        .iter()
        .map(|p| {
            format!(
                "{},{},{hardware},{model},{},USD\n",
                instant(p.start),
                instant(p.end),
                p.amount
            )
        })
        .collect()
}

fn relative_error(got: &Value, truth: &str) -> f64 {
    let got: f64 = got.as_str().unwrap().parse().unwrap();
    let truth: f64 = truth.parse().unwrap();
    (got - truth).abs() / truth
}

#[tokio::test(flavor = "multi_thread")]
async fn calibrate_recovers_known_coefficients_within_one_percent_and_predicts_a_held_out_bill() {
    let world = World::new(1).await;
    world.store_fixture().await; // migrates
    let config = world.config("");
    let mut rng = StdRng::seed_from_u64(20261129);

    // 90 daily bills per (model, hardware) plus a held-out 91st, with ±0.5 % noise: the standard
    // error of each coefficient is about 0.05 %, so 1 % is a real bound, not a coin toss.
    let mut per_model = generate(
        &world.pool,
        &mut rng,
        91,
        &["qwen2-7b-instruct"],
        "a100-80g",
        ("0.1", "0.2"),
        ("0.85", "1.2"),
        50,
        100_000..2_000_000,
        50_000..1_000_000,
    )
    .await;
    let held_out = per_model.pop().unwrap();
    // 60 daily bills of a whole hardware target (two models, an empty model column).
    let per_hardware = generate(
        &world.pool,
        &mut rng,
        60,
        &["model-a", "model-b"],
        "hw-1",
        ("0.00025", "0.00002"),
        ("1.3", "0.6"),
        50,
        100_000_000..2_000_000_000,
        1_000_000_000..20_000_000_000,
    )
    .await;
    let mut csv = HEADER.to_owned();
    csv.push_str(&bills_csv(&per_model, "a100-80g", "qwen2-7b-instruct"));
    csv.push_str(&bills_csv(
        std::slice::from_ref(&held_out),
        "a100-80g",
        "qwen2-7b-instruct",
    ));
    csv.push_str(&bills_csv(&per_hardware, "hw-1", ""));
    let file = write_file(&world, "bills.csv", &csv);
    assert_eq!(
        succeed(&config, &["bills", "import", &file]),
        format!("{file}: 151 bills, 151 new, 0 updated, 0 unchanged\n")
    );

    // --to leaves the held-out bill (ending 2026-04-02) out of the fit.
    let dry = succeed(&config, &["calibrate", "--to", "2026-04-01", "--dry-run"]);
    let lines: Vec<&str> = dry.lines().collect();
    assert_eq!(lines.len(), 4, "{dry}");
    assert!(
        lines[0].starts_with("qwen2-7b-instruct on a100-80g: k1 0.85") && lines[0].contains(" from 90 bill periods; "),
        "{dry}"
    );
    assert_eq!(lines[1], "  not stored (--dry-run)");
    assert!(lines[2].starts_with("hw-1 (all models): k1 1.30"), "{dry}");
    assert!(lines[2].contains(" from 60 bill periods; R² 0.99"), "{dry}");
    assert_eq!(lines[3], "  not stored (--dry-run)");
    assert_eq!(
        count(&world.pool, "coefficient_version").await,
        0,
        "--dry-run stores nothing"
    );

    let out = succeed(
        &config,
        &[
            "calibrate",
            "--to",
            "2026-04-01",
            "--effective-from",
            "2026-04-01T00:00:00Z",
            "--json",
        ],
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["dry_run"], false);
    assert_eq!(report["effective_from"], "2026-04-01T00:00:00Z");
    assert_eq!(report["errors"], serde_json::json!([]));
    let fits = report["fits"].as_array().unwrap();
    assert_eq!(fits.len(), 2, "{report:#}");

    let hardware = &fits[1];
    assert_eq!(
        (hardware["hardware"].as_str(), hardware["model"].as_str()),
        (Some("hw-1"), None)
    );
    assert_eq!(hardware["periods"], 60);
    assert!(relative_error(&hardware["k1"], "1.3") < 0.01, "{hardware:#}");
    assert!(relative_error(&hardware["k2"], "0.6") < 0.01, "{hardware:#}");

    let pair = &fits[0];
    assert_eq!(pair["hardware"], "a100-80g");
    assert_eq!(pair["model"], "qwen2-7b-instruct");
    assert_eq!(pair["periods"], 90);
    assert!(relative_error(&pair["k1"], "0.85") < 0.01, "{pair:#}");
    assert!(relative_error(&pair["k2"], "1.2") < 0.01, "{pair:#}");
    for fit in fits {
        assert_eq!(fit["warnings"], serde_json::json!([]), "{fit:#}");
        let r_squared: f64 = fit["r_squared"].as_str().unwrap().parse().unwrap();
        let mape: f64 = fit["mape"].as_str().unwrap().parse().unwrap();
        assert!(r_squared > 0.999 && mape < 0.5, "{fit:#}");
        assert!(fit["max_residual"].as_str().is_some(), "{fit:#}");
    }

    // The held-out bill, predicted with the stored coefficients, within 3 %.
    let k = |name: &str| dec(pair[name].as_str().unwrap());
    let predicted = dec("0.1") * k("k1") * held_out.compute + dec("0.2") * k("k2") * held_out.storage;
    let error = ((predicted - held_out.amount) / held_out.amount).abs();
    assert!(error < dec("0.03"), "predicted {predicted}, billed {}", held_out.amount);

    // Stored as versions with their statistics, exactly as printed.
    let rows = sqlx::query(
        "SELECT id, model, hardware, k1, k2, effective_from, periods, r_squared, mape, max_residual, warnings,
                fitted_from, fitted_to
         FROM coefficient_version ORDER BY id",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    for (row, fit) in rows.iter().zip(fits) {
        assert_eq!(Some(row.get::<i64, _>("id")), fit["version"].as_i64());
        assert_eq!(row.get::<Option<String>, _>("model").as_deref(), fit["model"].as_str());
        assert_eq!(row.get::<Decimal, _>("k1"), dec(fit["k1"].as_str().unwrap()));
        assert_eq!(row.get::<Decimal, _>("k2"), dec(fit["k2"].as_str().unwrap()));
        assert_eq!(row.get::<i32, _>("periods") as i64, fit["periods"].as_i64().unwrap());
        assert_eq!(
            row.get::<Option<Decimal>, _>("r_squared"),
            Some(dec(fit["r_squared"].as_str().unwrap()))
        );
        assert_eq!(
            row.get::<Decimal, _>("max_residual"),
            dec(fit["max_residual"].as_str().unwrap())
        );
        assert_eq!(
            row.get::<DateTime<Utc>, _>("effective_from"),
            Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(row.get::<Option<DateTime<Utc>>, _>("fitted_from"), None);
        assert_eq!(
            row.get::<Option<DateTime<Utc>>, _>("fitted_to"),
            Some(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap())
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn too_few_periods_is_a_clear_error_and_stores_nothing() {
    let world = World::new(1).await;
    world.store_fixture().await;
    let config = world.config("");

    let out = costwatch(Some(&config), &["calibrate"]);
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        stderr(&out),
        "error: no bills are stored; import some with `costwatch bills import FILE`\n"
    );

    insert_usage(
        &world.pool,
        day(0),
        "qwen2-7b-instruct",
        "a100-80g",
        dec("1000"),
        dec("500"),
        "0.1",
        "0.2",
    )
    .await;
    for (model, t, s) in [("model-a", "1000", "2000"), ("model-b", "500", "7000")] {
        for n in 0..3 {
            insert_usage(
                &world.pool,
                day(n),
                model,
                "hw-1",
                dec(t) * Decimal::from(n + 1),
                dec(s),
                "0.00025",
                "0.00002",
            )
            .await;
        }
    }
    let csv = format!(
        "{HEADER}\
         2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,a100-80g,qwen2-7b-instruct,205,USD\n\
         2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,hw-1,,1,USD\n\
         2026-01-02T00:00:00Z,2026-01-03T00:00:00Z,hw-1,,1.2,USD\n\
         2026-01-03T00:00:00Z,2026-01-04T00:00:00Z,hw-1,,1.5,USD\n"
    );
    let file = write_file(&world, "bills.csv", &csv);
    succeed(&config, &["bills", "import", &file]);

    // The pair with one bill fails; hw-1's three bills still fit, with a warning, in a dry run.
    let out = costwatch(Some(&config), &["calibrate", "--dry-run"]);
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        stderr(&out),
        "error: cannot fit qwen2-7b-instruct on a100-80g: need at least 2 bill periods to fit two coefficients, got 1\n"
    );
    let text = stdout(&out);
    assert!(text.starts_with("hw-1 (all models): k1 "), "{text}");
    assert!(
        text.contains(
            "  warning: too few periods: 3 bill periods for 2 coefficients leave little to check the fit against; \
             4 or more give a trustworthy fit\n"
        ),
        "{text}"
    );

    // Without --dry-run the failed target stores nothing, and only it.
    let out = costwatch(Some(&config), &["calibrate", "--json"]);
    assert_eq!(out.status.code(), Some(65));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["errors"],
        serde_json::json!([{
            "hardware": "a100-80g",
            "model": "qwen2-7b-instruct",
            "error": "need at least 2 bill periods to fit two coefficients, got 1"
        }])
    );
    let stored: Vec<(Option<String>, String)> =
        sqlx::query_as("SELECT model, hardware FROM coefficient_version ORDER BY id")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(stored, [(None, "hw-1".to_owned())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bills_import_reports_every_problem_with_its_line_and_a_reimport_changes_nothing() {
    let world = World::new(1).await;
    let config = world.config("");

    let bad = write_file(
        &world,
        "bad.csv",
        &format!(
            "{HEADER}\
             2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,a100-80g,,12.5,USD\n\
             2026-01-02,2026-01-03T00:00:00Z,a100-80g,,12.5,USD\n\
             2026-01-03T00:00:00Z,2026-01-04T00:00:00Z,a100-80g,,-1,USD\n"
        ),
    );
    let out = costwatch(Some(&config), &["bills", "import", &bad]);
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        stderr(&out),
        "error: invalid bills file:\n  \
         - line 3: period_start \"2026-01-02\" is not an RFC 3339 timestamp such as 2026-01-01T00:00:00Z\n  \
         - line 4: amount must not be negative, got -1\n"
    );

    let euro = write_file(
        &world,
        "euro.csv",
        &format!(
            "{HEADER}\
             2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,a100-80g,,12.5,USD\n\
             2026-01-02T00:00:00Z,2026-01-03T00:00:00Z,a100-80g,,12.5,EUR\n"
        ),
    );
    let out = costwatch(Some(&config), &["bills", "import", &euro]);
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        stderr(&out),
        "error: invalid bills file:\n  - line 3: currency \"EUR\" is not pricing.currency \"USD\"; bills must be in \
         the currency prices are quoted in\n"
    );
    assert_eq!(count(&world.pool, "bill").await, 0, "a refused file imports nothing");

    let rows = "2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,a100-80g,,12.5,USD\n\
                2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,a100-80g,qwen2-7b-instruct,7.25,USD\n\
                2026-01-02T00:00:00+02:00,2026-01-03T00:00:00Z,hw-1,,3,USD\n";
    let good = write_file(&world, "good.csv", &format!("{HEADER}{rows}"));
    assert_eq!(
        succeed(&config, &["bills", "import", &good]),
        format!("{good}: 3 bills, 3 new, 0 updated, 0 unchanged\n")
    );
    let before: Vec<(String, Decimal, DateTime<Utc>)> =
        sqlx::query_as("SELECT bill_key, amount, updated_at FROM bill ORDER BY id")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(
        succeed(&config, &["bills", "import", &good]),
        format!("{good}: 3 bills, 0 new, 0 updated, 3 unchanged\n")
    );
    // The same amounts written differently (12.50 is 12.5), columns in another order.
    let reordered = write_file(
        &world,
        "reordered.csv",
        "currency,amount,model,hardware,period_end,period_start\n\
         USD,12.50,,a100-80g,2026-01-02T00:00:00Z,2026-01-01T00:00:00Z\n",
    );
    assert_eq!(
        succeed(&config, &["bills", "import", &reordered]),
        format!("{reordered}: 1 bills, 0 new, 0 updated, 1 unchanged\n")
    );
    let after: Vec<(String, Decimal, DateTime<Utc>)> =
        sqlx::query_as("SELECT bill_key, amount, updated_at FROM bill ORDER BY id")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(before, after, "re-importing changes nothing");
    assert_eq!(
        after[0].0,
        r#"["2026-01-01T00:00:00Z","2026-01-02T00:00:00Z","a100-80g",null]"#
    );

    // A corrected amount replaces the bill instead of adding one.
    let corrected = write_file(
        &world,
        "corrected.csv",
        &format!("{HEADER}2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,a100-80g,,13,USD\n"),
    );
    assert_eq!(
        succeed(&config, &["bills", "import", &corrected]),
        format!("{corrected}: 1 bills, 0 new, 1 updated, 0 unchanged\n")
    );
    let amounts: Vec<Decimal> = sqlx::query_scalar("SELECT amount FROM bill ORDER BY id")
        .fetch_all(&world.pool)
        .await
        .unwrap();
    assert_eq!(amounts, [dec("13"), dec("7.25"), dec("3")]);
}

#[test]
fn bad_time_arguments_exit_64_with_the_reason() {
    let config = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"));
    let out = costwatch(Some(config), &["calibrate", "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        stderr(&out),
        "error: --from \"yesterday\" is neither an RFC 3339 timestamp (2026-01-01T00:00:00Z) nor a date (2026-01-01)\n"
    );
    let out = costwatch(Some(config), &["rerate", "--from", "2026-02-01", "--to", "2026-01-01"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        stderr(&out),
        "error: --from (2026-02-01T00:00:00Z) must be before --to (2026-01-01T00:00:00Z)\n"
    );
    let out = costwatch(Some(config), &["recommend", "--to", "2026-13-01"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        stderr(&out),
        "error: --to \"2026-13-01\" is neither an RFC 3339 timestamp (2026-01-01T00:00:00Z) nor a date (2026-01-01)\n"
    );
}

/// One window row of the live test: (events, total cost, coefficient version, price id).
async fn window_row(pool: &PgPool, start: DateTime<Utc>) -> (i64, Option<Decimal>, Option<i64>, Option<String>) {
    let row = sqlx::query(
        "SELECT u.events, u.total_cost, w.coefficient_version, w.price_id
         FROM usage_costs u JOIN window_usage w USING (window_start, model, hardware)
         WHERE u.window_start = $1 AND u.model = 'qwen2-7b-instruct'",
    )
    .bind(start)
    .fetch_one(pool)
    .await
    .unwrap();
    (
        row.get("events"),
        row.get::<Option<Decimal>, _>("total_cost").map(|d| d.normalize()),
        row.get("coefficient_version"),
        row.get("price_id"),
    )
}

/// Waits until `/metrics` shows `line`.
async fn wait_metric(addr: &str, line: &str) -> String {
    let started = Instant::now();
    loop {
        let (_, metrics) = http(addr, "GET", "/metrics", None, None).await;
        if metrics.lines().any(|l| l == line) {
            return metrics;
        }
        assert!(started.elapsed() < WAIT, "{line:?} never appeared:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_prices_new_windows_live_and_rerate_reprices_old_ones_exactly() {
    let world = World::new(1).await;
    let config = world.config("\n[calibration]\nreload_interval = \"200ms\"\n");
    let minute = chrono::Duration::minutes(1);
    let now = Utc::now().duration_trunc(minute).unwrap();
    let (first, effective, second) = (
        now - chrono::Duration::minutes(20),
        now - chrono::Duration::minutes(10),
        now - chrono::Duration::minutes(5),
    );
    let ts = |window: DateTime<Utc>| instant(window + chrono::Duration::seconds(10));

    // Before any calibration: the configured k1 = 0.5, k2 = 0.8 price 1000 T and 500 S at 130.
    world
        .produce(vec![event(
            "e1",
            &ts(first),
            "qwen2-7b-instruct",
            "a100-80g",
            "1000",
            "500",
        )])
        .await;
    let daemon = world.start(&config);
    world.wait_consumed(1, WAIT).await;
    let price_id = PriceId::of(
        &HardwareName::parse("a100-80g").unwrap(),
        UnitPrice(dec("0.1")),
        UnitPrice(dec("0.2")),
        "USD",
        None,
    )
    .to_string();
    assert_eq!(
        window_row(&world.pool, first).await,
        (1, Some(dec("130")), None, Some(price_id.clone()))
    );

    // Exact bills for k1 = 0.85, k2 = 1.2 over four January days of recorded usage.
    let mut csv = HEADER.to_owned();
    for (n, (t, s)) in [("1000", "100"), ("100", "1000"), ("500", "500"), ("2000", "50")]
        .into_iter()
        .enumerate()
    {
        let n = n as i64;
        insert_usage(
            &world.pool,
            day(n),
            "qwen2-7b-instruct",
            "a100-80g",
            dec(t),
            dec(s),
            "0.1",
            "0.2",
        )
        .await;
        let amount = dec("0.085") * dec(t) + dec("0.24") * dec(s);
        csv.push_str(&format!(
            "{},{},a100-80g,qwen2-7b-instruct,{amount},USD\n",
            instant(day(n)),
            instant(day(n + 1))
        ));
    }
    let file = write_file(&world, "bills.csv", &csv);
    succeed(&config, &["bills", "import", &file]);
    let out = succeed(
        &config,
        &[
            "calibrate",
            "--to",
            "2026-02-01",
            "--effective-from",
            &instant(effective),
            "--json",
        ],
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    let fit = &report["fits"][0];
    assert_eq!(
        (fit["k1"].as_str(), fit["k2"].as_str()),
        (Some("0.85"), Some("1.2")),
        "{report:#}"
    );
    assert_eq!(fit["max_residual"], "0");
    assert_eq!(fit["version"], 1);

    // The running daemon picks the version up without a restart.
    let addr = daemon.http_addr().await;
    let metrics = wait_metric(&addr, "costwatch_coefficient_version 1").await;
    assert!(
        metrics.lines().any(|l| l == "costwatch_coefficient_reloads_total 1"),
        "{metrics}"
    );
    assert!(
        daemon
            .log_text()
            .contains("loaded calibrated coefficient versions newest_version=Some(1) versions=1"),
        "{}",
        daemon.log_text()
    );

    // A window starting after the effective time is priced with it; one before is not, also
    // when it is written to again after the version was loaded.
    world
        .produce(vec![
            event("e2", &ts(second), "qwen2-7b-instruct", "a100-80g", "1000", "500"),
            event("e3", &ts(first), "qwen2-7b-instruct", "a100-80g", "1000", "500"),
        ])
        .await;
    world.wait_consumed(3, WAIT).await;
    // 0.1 × 0.85 × 1000 + 0.2 × 1.2 × 500 = 85 + 120.
    assert_eq!(
        window_row(&world.pool, second).await,
        (1, Some(dec("205")), Some(1), Some(price_id.clone()))
    );
    assert_eq!(
        window_row(&world.pool, first).await,
        (2, Some(dec("260")), None, Some(price_id.clone()))
    );

    // A recalibration dated back an hour covers the first window too; rerate applies it.
    succeed(
        &config,
        &[
            "calibrate",
            "--to",
            "2026-02-01",
            "--effective-from",
            &instant(now - chrono::Duration::hours(1)),
        ],
    );
    let (from, to) = (instant(now - chrono::Duration::hours(1)), instant(now + minute));
    let dry = succeed(&config, &["rerate", "--from", &from, "--to", &to, "--dry-run"]);
    assert_eq!(
        dry,
        format!(
            "2 window rows from {from} to {to}: 2 would change (--dry-run, nothing written)\n\
             qwen2-7b-instruct on a100-80g: 2 rows, 2 changed, 465 -> 615 USD (+150)\n\
             total: 465 -> 615 USD (+150)\n"
        )
    );
    assert_eq!(
        window_row(&world.pool, first).await.1,
        Some(dec("260")),
        "--dry-run writes nothing"
    );
    let out = succeed(&config, &["rerate", "--from", &from, "--to", &to]);
    // 0.1 × 0.85 × 2000 + 0.2 × 1.2 × 1000 = 410 for the first window; 205 for the second.
    assert_eq!(
        out,
        format!(
            "2 window rows from {from} to {to}: 2 re-priced\n\
             qwen2-7b-instruct on a100-80g: 2 rows, 2 changed, 465 -> 615 USD (+150)\n\
             total: 465 -> 615 USD (+150)\n"
        )
    );
    assert_eq!(
        window_row(&world.pool, first).await,
        (2, Some(dec("410")), Some(2), Some(price_id.clone()))
    );
    assert_eq!(
        window_row(&world.pool, second).await,
        (1, Some(dec("205")), Some(2), Some(price_id.clone()))
    );
    let total: Decimal =
        sqlx::query_scalar("SELECT sum(total_cost) FROM usage_costs WHERE window_start >= $1 AND window_start < $2")
            .bind(now - chrono::Duration::hours(1))
            .bind(now + minute)
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(total, dec("615"));
    // The January rows behind the bills are outside the range and keep their prices.
    let untouched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM window_usage WHERE window_start < '2026-02-01' AND k1 = 1")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(untouched, 4);

    // Re-rating again finds nothing to change.
    let json: Value =
        serde_json::from_str(&succeed(&config, &["rerate", "--from", &from, "--to", &to, "--json"])).unwrap();
    assert_eq!(json["changed"], 0);
    assert_eq!(
        (json["before"].as_str(), json["after"].as_str()),
        (Some("615"), Some("615"))
    );
    assert_eq!(json["difference"], "0");
}

const RECOMMEND_PRICING: &str = r#"
[recommendations]
refresh_interval = "200ms"

[pricing]
currency = "USD"

[[pricing.hardware]]
name = "a100"
compute_price = "0.08"
storage_price = "0.1"
deployment = "cloud"

[[pricing.hardware]]
name = "jetson"
compute_price = "0.02"
storage_price = "0.05"
deployment = "edge"

[[pricing.hardware]]
name = "cpu"
compute_price = "0.01"
storage_price = "0.01"
deployment = "cloud"

[[pricing.hardware]]
name = "tpu"
compute_price = "0.001"
storage_price = "0.001"

[[pricing.coefficients]]
model = "llama"
hardware = "a100"
k1 = "1"
k2 = "0.5"

[[pricing.coefficients]]
model = "llama"
hardware = "cpu"
k1 = "100"
k2 = "100"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn recommend_ranks_targets_cheapest_first_on_a_hand_computed_case() {
    let world = World::new(1).await;
    world.store_fixture().await;
    let config = world.config(RECOMMEND_PRICING);
    // A calibrated default for the edge device, and llama's own version on cpu (which outranks
    // its configured 100, 100).
    sqlx::query(
        "INSERT INTO coefficient_version (model, hardware, k1, k2, effective_from, periods, max_residual)
         VALUES (NULL, 'jetson', 2, 1, '2026-01-01', 12, 0), ('llama', 'cpu', 6, 2, '2026-01-01', 12, 0)",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    let ts = common::ago(Duration::from_secs(30 * 60));
    world
        .produce(vec![
            event("l1", &ts, "llama", "a100", "600", "150"),
            event("l2", &ts, "llama", "a100", "400", "50"),
            event("p1", &ts, "phi", "tpu", "10", "10"),
        ])
        .await;
    let daemon = world.start(&config);
    world.wait_consumed(3, WAIT).await;

    // llama ran on a100: 0.08 × 1 × 1000 + 0.1 × 0.5 × 200 = 90. On jetson: 0.02 × 2 × 1000 +
    // 0.05 × 1 × 200 = 50; on cpu: 0.01 × 6 × 1000 + 0.01 × 2 × 200 = 64. Nothing is known
    // about llama on tpu, so it is priced as a flush would, at the assumed k1 = k2 = 1, and
    // marked: 0.001 × 1000 + 0.001 × 200 = 1.2. phi ran on tpu for 0.02 (assumed 1, 1 too).
    let assumed = "assumed: nothing configured or calibrated for this model here";
    assert_eq!(
        succeed(&config, &["recommend"]),
        format!(
            "llama: T 1000, S 200, actual cost 90 USD\n  \
             1. tpu: 1.2 USD, saving 88.8 USD (98.67 %); k1 1, k2 1 ({assumed})\n  \
             2. jetson (edge): 50 USD, saving 40 USD (44.44 %); k1 2, k2 1 (calibrated hardware default, version 1)\n  \
             3. cpu (cloud): 64 USD, saving 26 USD (28.89 %); k1 6, k2 2 (calibrated, version 2)\n  \
             4. a100 (cloud): 90 USD, saving 0 USD (0 %); k1 1, k2 0.5 (configured)\n\
             phi: T 10, S 10, actual cost 0.02 USD\n  \
             1. tpu: 0.02 USD, saving 0 USD (0 %); k1 1, k2 1 ({assumed})\n  \
             2. cpu (cloud): 0.2 USD, saving -0.18 USD (-900 %); k1 1, k2 1 ({assumed})\n  \
             3. jetson (edge): 0.9 USD, saving -0.88 USD (-4400 %); k1 2, k2 1 (calibrated hardware default, version 1)\n  \
             4. a100 (cloud): 1.8 USD, saving -1.78 USD (-8900 %); k1 1, k2 1 ({assumed})\n"
        )
    );

    let addr = daemon.http_addr().await;
    let (status, body) = http(&addr, "GET", "/api/v1/recommendations", None, None).await;
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["currency"], "USD");
    let llama = &json["models"][0];
    assert_eq!(llama["model"], "llama");
    assert_eq!(llama["actual_cost"], "90");
    assert_eq!(llama["potential_saving"], "88.8");
    assert_eq!(
        llama["targets"][0],
        serde_json::json!({
            "hardware": "tpu", "deployment": null, "compute_price": "0.001", "storage_price": "0.001",
            "k1": "1", "k2": "1", "coefficients": "default", "coefficients_assumed": true,
            "coefficient_version": null, "cost": "1.2", "saving": "88.8", "saving_percent": "98.67"
        })
    );
    assert_eq!(
        llama["targets"][1],
        serde_json::json!({
            "hardware": "jetson", "deployment": "edge", "compute_price": "0.02", "storage_price": "0.05",
            "k1": "2", "k2": "1", "coefficients": "calibrated_hardware_default", "coefficients_assumed": false,
            "coefficient_version": 1, "cost": "50", "saving": "40", "saving_percent": "44.44"
        })
    );
    let order: Vec<&str> = llama["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["hardware"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["tpu", "jetson", "cpu", "a100"]);
    assert_eq!(llama.get("skipped"), None);
    assert_eq!(json["models"][1]["potential_saving"], "0");

    let (status, body) = http(
        &addr,
        "GET",
        "/api/v1/recommendations?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
        None,
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "from (2026-02-01 00:00:00 UTC) must be before to (2026-01-01 00:00:00 UTC)"
    );

    // The gauge Grafana reads: the saving of the cheapest target, never below 0.
    wait_metric(&addr, r#"costwatch_potential_savings{model="llama"} 88.8"#).await;
    let metrics = wait_metric(&addr, r#"costwatch_potential_savings{model="phi"} 0"#).await;
    assert!(
        metrics.contains("# TYPE costwatch_potential_savings gauge"),
        "{metrics}"
    );
}

/// Ingests `events` (id, model, hardware, compute, storage, all at `ts`) into partition 0 from
/// `offset` on, and returns the batch.
fn batch_of(
    agg: &mut costwatch::ingest::aggregate::Aggregator,
    offset: i64,
    ts: &str,
    events: &[(&str, &str, &str, &str, &str)],
) -> costwatch::ingest::aggregate::FlushBatch {
    for (i, (id, model, hardware, compute, storage)) in events.iter().enumerate() {
        let message = event(id, ts, model, hardware, compute, storage);
        agg.ingest(0, offset + i as i64, Some(&message.payload), Utc::now());
    }
    agg.batch(None)
}

/// Per (model, hardware): (k1, k2, coefficient_version, total_cost) as the flush stored them.
async fn priced_rows(
    pool: &PgPool,
) -> Vec<(
    String,
    String,
    Option<Decimal>,
    Option<Decimal>,
    Option<i64>,
    Option<Decimal>,
)> {
    sqlx::query(
        "SELECT w.model, w.hardware, w.k1, w.k2, w.coefficient_version, u.total_cost
         FROM window_usage w JOIN usage_costs u USING (window_start, model, hardware)
         ORDER BY w.model, w.hardware",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let norm = |d: Option<Decimal>| d.map(|d| d.normalize());
        (
            r.get("model"),
            r.get("hardware"),
            norm(r.get("k1")),
            norm(r.get("k2")),
            r.get("coefficient_version"),
            norm(r.get("total_cost")),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flush_prices_each_pair_by_the_documented_precedence() {
    let world = World::new(1).await;
    let common::StoreFixture {
        store, rules, layout, ..
    } = world.store_fixture().await;
    let hour_ago = Utc::now() - chrono::Duration::hours(1);
    // 1: a hardware default for a100-80g; 2: qwen's own version there; 3: a default for hw-0
    // that is not in force yet.
    sqlx::query(
        "INSERT INTO coefficient_version (model, hardware, k1, k2, effective_from, periods, max_residual)
         VALUES (NULL, 'a100-80g', 2, 3, $1, 12, 0), ('qwen2-7b-instruct', 'a100-80g', 0.85, 1.2, $1, 12, 0),
                (NULL, 'hw-0', 7, 7, $1 + interval '2 hours', 12, 0)",
    )
    .bind(hour_ago)
    .execute(&world.pool)
    .await
    .unwrap();
    let settings = costwatch::config::Settings::load(Some(&world.config(""))).unwrap();
    let book = costwatch::pricing::PriceBook::from_settings(&settings.pricing)
        .with_versions(costwatch::calibration::store::load_versions(&world.pool).await.unwrap());

    let mut agg = costwatch::ingest::aggregate::Aggregator::new(rules);
    agg.assign(
        store
            .claim(&world.topic, "me", &[0], rules.dedup_horizon_ms)
            .await
            .unwrap(),
    );
    let ts = common::ago(Duration::from_secs(60));
    let batch = batch_of(
        &mut agg,
        0,
        &ts,
        &[
            ("a", "qwen2-7b-instruct", "a100-80g", "1000", "500"),
            ("b", "m", "a100-80g", "1000", "500"),
            ("c", "model-0", "hw-0", "1000", "500"),
            ("d", "x", "hw-1", "1000", "500"),
            ("e", "y", "tpu-v9", "1000", "500"),
        ],
    );
    store.flush(&world.topic, &batch, &book, layout).await.unwrap();
    let s = |v: &str| v.to_owned();
    let d = |v: &str| Some(dec(v));
    assert_eq!(
        priced_rows(&world.pool).await,
        [
            // Hardware default version 1: 0.1 × 2 × 1000 + 0.2 × 3 × 500.
            (s("m"), s("a100-80g"), d("2"), d("3"), Some(1), d("500")),
            // Configured 1.1, 0.9 (hw-0's default is not in force yet).
            (s("model-0"), s("hw-0"), d("1.1"), d("0.9"), None, d("0.449")),
            // Its own version 2 outranks the hardware default: 85 + 120.
            (
                s("qwen2-7b-instruct"),
                s("a100-80g"),
                d("0.85"),
                d("1.2"),
                Some(2),
                d("205")
            ),
            // Nothing known: 1 and 1.
            (s("x"), s("hw-1"), d("1"), d("1"), None, d("0.26")),
            // Unpriced: no rates, no cost.
            (s("y"), s("tpu-v9"), None, None, None, None),
        ]
    );
    let price_ids: Vec<Option<String>> =
        sqlx::query_scalar("SELECT price_id FROM window_usage ORDER BY model, hardware")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(price_ids.iter().filter(|p| p.is_some()).count(), 4);
    assert_eq!(price_ids[4], None, "an unpriced row has no price id");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_written_across_a_version_change_is_priced_whole_by_its_last_write() {
    let world = World::new(1).await;
    let common::StoreFixture {
        store,
        rules,
        prices: configured,
        layout,
    } = world.store_fixture().await;
    let mut agg = costwatch::ingest::aggregate::Aggregator::new(rules);
    agg.assign(
        store
            .claim(&world.topic, "me", &[0], rules.dedup_horizon_ms)
            .await
            .unwrap(),
    );
    let ts = common::ago(Duration::from_secs(60));

    let first = batch_of(
        &mut agg,
        0,
        &ts,
        &[("a", "qwen2-7b-instruct", "a100-80g", "1000", "500")],
    );
    store.flush(&world.topic, &first, &configured, layout).await.unwrap();
    agg.flushed(&first);
    assert_eq!(priced_rows(&world.pool).await[0].5, Some(dec("130")));

    // A version in force for the window is loaded between two flushes into it.
    let version = costwatch::pricing::CoefficientVersion {
        id: sqlx::query_scalar(
            "INSERT INTO coefficient_version (model, hardware, k1, k2, effective_from, periods, max_residual)
             VALUES ('qwen2-7b-instruct', 'a100-80g', 0.85, 1.2, now() - interval '1 day', 12, 0) RETURNING id",
        )
        .fetch_one(&world.pool)
        .await
        .unwrap(),
        model: Some(costwatch::domain::ModelName::parse("qwen2-7b-instruct").unwrap()),
        hardware: HardwareName::parse("a100-80g").unwrap(),
        k1: costwatch::domain::Coefficient(dec("0.85")),
        k2: costwatch::domain::Coefficient(dec("1.2")),
        effective_from: Utc::now() - chrono::Duration::days(1),
    };
    let calibrated = configured.clone().with_versions(vec![version]);
    let second = batch_of(
        &mut agg,
        1,
        &ts,
        &[("b", "qwen2-7b-instruct", "a100-80g", "1000", "500")],
    );
    store.flush(&world.topic, &second, &calibrated, layout).await.unwrap();

    // Both events' usage at the new rates, never 130 + 205.
    let rows = priced_rows(&world.pool).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].4, Some(1));
    assert_eq!(rows[0].5, Some(dec("410")));
}

#[tokio::test(flavor = "multi_thread")]
async fn rerate_over_several_days_reprices_every_day_and_adds_up_exactly() {
    let world = World::new(1).await;
    world.store_fixture().await;
    let config = world.config("");
    // Written with k1 = k2 = 1 (say, before the configured 0.5 and 0.8 existed), one row a day,
    // and one row on the last day's end that is outside the range.
    for n in 0..4 {
        insert_usage(
            &world.pool,
            day(n) + chrono::Duration::hours(12),
            "qwen2-7b-instruct",
            "a100-80g",
            dec("1000"),
            dec("500"),
            "0.1",
            "0.2",
        )
        .await;
    }
    let out = succeed(
        &config,
        &["rerate", "--from", "2026-01-01", "--to", "2026-01-04", "--json"],
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    // 200 per row before, 130 after.
    assert_eq!(
        (report["rows"].as_i64(), report["changed"].as_i64()),
        (Some(3), Some(3)),
        "{report:#}"
    );
    assert_eq!(
        (
            report["before"].as_str(),
            report["after"].as_str(),
            report["difference"].as_str()
        ),
        (Some("600"), Some("390"), Some("-210"))
    );
    let totals: Vec<Decimal> = sqlx::query_scalar("SELECT total_cost FROM usage_costs ORDER BY window_start")
        .fetch_all(&world.pool)
        .await
        .unwrap();
    let totals: Vec<Decimal> = totals.into_iter().map(|t| t.normalize()).collect();
    assert_eq!(totals, [dec("130"), dec("130"), dec("130"), dec("200")]);
}
