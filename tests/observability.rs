//! Metrics and the HTTP API against a running daemon, the real broker and PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{ago, dec, event, http, http_with, raw, World};
use rust_decimal::Decimal;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "test-token-0123456789";

/// Sums a metric's samples by one label, e.g. `costwatch_cost_total` by `component`.
fn samples(metrics: &str, name: &str) -> Vec<(BTreeMap<String, String>, Decimal)> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let labels = series
                .split_once('{')
                .map(|(_, rest)| rest.trim_end_matches('}'))
                .unwrap_or("")
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            (labels, value.parse::<Decimal>().unwrap())
        })
        .collect()
}

fn sum_where(metrics: &str, name: &str, key: &str, value: &str) -> Decimal {
    samples(metrics, name)
        .into_iter()
        .filter(|(l, _)| l.get(key).map(String::as_str) == Some(value))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_agree_with_usage_costs_to_the_last_digit() {
    let world = World::new(2).await;
    let ts = ago(Duration::from_secs(90));
    world
        .produce(vec![
            event("a", &ts, "qwen2-7b-instruct", "a100-80g", "1000", "500"),
            event("b", &ts, "model-0", "hw-0", "123.456", "7.5"),
            event("b", &ts, "model-0", "hw-0", "123.456", "7.5"),
            event("c", &ts, "model-1", "tpu-v9", "10", "1"),
            raw("bad", b"{nope".to_vec()),
        ])
        .await;
    let daemon = world.start(&world.config(""));
    world.wait_consumed(5, WAIT).await;
    let addr = daemon.http_addr().await;
    let (status, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);

    let (compute_cost, storage_cost): (Decimal, Decimal) = {
        let row: (Decimal, Decimal) =
            sqlx::query_as("SELECT sum(compute_cost), sum(storage_cost) FROM usage_costs WHERE total_cost IS NOT NULL")
                .fetch_one(&world.pool)
                .await
                .unwrap();
        row
    };
    assert_eq!(
        sum_where(&metrics, "costwatch_cost_total", "component", "compute"),
        compute_cost
    );
    assert_eq!(
        sum_where(&metrics, "costwatch_cost_total", "component", "storage"),
        storage_cost
    );
    assert_eq!(
        compute_cost + storage_cost,
        dec("130") + dec("0.0004") * dec("1.1") * dec("123.456") + dec("0.00002") * dec("0.9") * dec("7.5")
    );
    assert_eq!(
        sum_where(&metrics, "costwatch_compute_units_total", "hardware", "hw-0"),
        dec("123.456")
    );
    assert_eq!(
        sum_where(&metrics, "costwatch_events_total", "outcome", "accepted"),
        dec("3")
    );
    assert_eq!(
        sum_where(&metrics, "costwatch_events_total", "outcome", "duplicate"),
        dec("1")
    );
    assert_eq!(
        sum_where(&metrics, "costwatch_events_total", "outcome", "rejected"),
        dec("1")
    );
    assert_eq!(
        sum_where(&metrics, "costwatch_unpriced_events_total", "hardware", "tpu-v9"),
        dec("1")
    );
    assert_eq!(
        sum_where(&metrics, "costwatch_rejected_events_total", "reason", "malformed_json"),
        dec("1")
    );
    // a, b and c, each once: the duplicate and the rejected message add no id.
    let ids: Decimal = samples(&metrics, "costwatch_dedup_ids")
        .into_iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(ids, dec("3"), "{metrics}");
    assert!(metrics.contains("# TYPE costwatch_cost_total counter"), "{metrics}");
    for name in [
        "costwatch_flush_duration_seconds_count",
        "costwatch_last_flush_timestamp_seconds",
        "costwatch_watermark_delay_seconds",
        "costwatch_assigned_partitions",
    ] {
        assert!(!samples(&metrics, name).is_empty(), "{name} missing:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn label_cardinality_is_capped_with_other() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(90));
    world
        .produce(vec![
            event("a", &ts, "m-1", "a100-80g", "1", "0"),
            event("b", &ts, "m-2", "a100-80g", "2", "0"),
            event("c", &ts, "m-3", "a100-80g", "4", "0"),
        ])
        .await;
    let daemon = world.start(&world.config("\n[metrics]\nmax_models = 1\n"));
    world.wait_consumed(3, WAIT).await;
    let (_, metrics) = http(&daemon.http_addr().await, "GET", "/metrics", None, None).await;
    let by_model: BTreeMap<String, Decimal> = samples(&metrics, "costwatch_compute_units_total")
        .into_iter()
        .map(|(l, v)| (l["model"].clone(), v))
        .collect();
    // Which model keeps its name depends on arrival order; what is fixed is that one does, the
    // rest fold into `other`, and nothing is lost from the sum.
    let compute = BTreeMap::from([("m-1", dec("1")), ("m-2", dec("2")), ("m-3", dec("4"))]);
    assert_eq!(by_model.len(), 2, "{by_model:?}");
    let (kept, value) = by_model.iter().find(|(m, _)| *m != "other").unwrap();
    assert_eq!(Some(value), compute.get(kept.as_str()), "{by_model:?}");
    assert_eq!(by_model["other"], dec("7") - value);
    // The database keeps the real names.
    assert_eq!(world.totals().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_costs_api_answers_with_exact_totals_and_a_series() {
    let world = World::new(1).await;
    let early = ago(Duration::from_secs(3 * 60));
    let late = ago(Duration::from_secs(60));
    world
        .produce(vec![
            event("a", &early, "qwen2-7b-instruct", "a100-80g", "500", "250"),
            event("b", &late, "qwen2-7b-instruct", "a100-80g", "500", "250"),
            event("c", &late, "m", "tpu-v9", "5", "5"),
        ])
        .await;
    let daemon = world.start(&world.config(""));
    world.wait_consumed(3, WAIT).await;
    let addr = daemon.http_addr().await;

    let (status, body) = http(
        &addr,
        "GET",
        "/api/v1/costs?step=window&model=qwen2-7b-instruct",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["totals"]["total_cost"], "130");
    assert_eq!(v["totals"]["compute_cost"], "50");
    assert_eq!(v["totals"]["events"], 2);
    assert_eq!(v["currency"], "USD");
    assert_eq!(v["series"].as_array().unwrap().len(), 2, "{body}");

    let (_, body) = http(&addr, "GET", "/api/v1/costs?step=day", None, None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["totals"]["events"], 3);
    assert_eq!(v["totals"]["total_cost"], "130", "unpriced usage adds no cost");
    assert_eq!(v["totals"]["unpriced_events"], 1);
    assert_eq!(v["totals"]["compute"], "1005");

    let (status, body) = http(&addr, "GET", "/api/v1/costs?step=weekly", None, None).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("unknown variant `weekly`, expected one of `window`, `hour`, `day`"),
        "{body}"
    );
    let (status, body) = http(
        &addr,
        "GET",
        "/api/v1/costs?from=2026-11-29T02:00:00Z&to=2026-11-29T01:00:00Z",
        None,
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("must be before to"), "{body}");
    let (status, _) = http(&addr, "GET", "/api/v1/costs?from=yesterday", None, None).await;
    assert_eq!(status, 400);

    let (status, body) = http(&addr, "GET", "/api/v1/rejected?limit=0", None, None).await;
    assert_eq!(
        (status, body.contains("limit must be between 1 and 1000")),
        (400, true),
        "{body}"
    );
    let (status, body) = http(&addr, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["paths"]["/api/v1/costs"].is_object());
    let (status, body) = http(&addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_estimate_api_prices_explicit_rates_and_the_price_book() {
    let world = World::new(1).await;
    let daemon = world.start(&world.config(""));
    let addr = daemon.http_addr().await;
    let explicit = r#"{"compute": 1000, "storage": "500", "compute_price": "0.1", "storage_price": "0.2", "k1": "0.5", "k2": "0.8"}"#;
    let (status, body) = http(&addr, "POST", "/api/v1/estimate", None, Some(explicit)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            v["compute_cost"].as_str(),
            v["storage_cost"].as_str(),
            v["total_cost"].as_str()
        ),
        (Some("50"), Some("80"), Some("130"))
    );
    assert_eq!(v["coefficients_assumed"], false);

    let book = r#"{"compute": "1000", "storage": "500", "model": "qwen2-7b-instruct", "hardware": "a100-80g"}"#;
    let (_, body) = http(&addr, "POST", "/api/v1/estimate", None, Some(book)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["total_cost"], "130");
    assert_eq!(v["currency"], "USD");
    assert_eq!(v["coefficients_assumed"], false);
    // Nothing configured or calibrated for this model there: priced at 1 and 1, as a flush
    // would, and said so.
    let assumed = r#"{"compute": "1000", "storage": "500", "model": "llama", "hardware": "a100-80g"}"#;
    let (_, body) = http(&addr, "POST", "/api/v1/estimate", None, Some(assumed)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["total_cost"].as_str(), v["k1"].as_str()), (Some("200"), Some("1")));
    assert_eq!(v["coefficients_assumed"], true);

    let unpriced = r#"{"compute": 1, "storage": 1, "model": "m", "hardware": "tpu-v9"}"#;
    let (status, body) = http(&addr, "POST", "/api/v1/estimate", None, Some(unpriced)).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("hardware tpu-v9 has no price in the price book"),
        "{body}"
    );
    let float = r#"{"compute": 0.1, "storage": 1, "compute_price": "1", "storage_price": "1"}"#;
    let (status, body) = http(&addr, "POST", "/api/v1/estimate", None, Some(float)).await;
    assert_eq!(status, 400);
    assert!(body.contains("write 0.1 as a string"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_token_guards_the_api_but_not_health_or_metrics() {
    let world = World::new(1).await;
    let daemon = world.start(&world.config(&format!(
        "\n[http]\nlisten = \"127.0.0.1:0\"\napi_token = \"{TOKEN}\"\n"
    )));
    let addr = daemon.http_addr().await;
    let (status, body) = http(&addr, "GET", "/api/v1/costs", None, None).await;
    assert_eq!(
        (status, body.contains("missing or wrong bearer token")),
        (401, true),
        "{body}"
    );
    let (status, _) = http(&addr, "GET", "/api/v1/costs", Some("wrong-token-0123456789"), None).await;
    assert_eq!(status, 401);
    let (status, _) = http(&addr, "GET", "/api/v1/costs", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    assert_eq!(http(&addr, "GET", "/healthz", None, None).await.0, 200);
    assert_eq!(http(&addr, "GET", "/metrics", None, None).await.0, 200);
    assert!(!daemon.log_text().contains(TOKEN), "the token must never be logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_driven_fuzzer_finds_no_server_error_and_no_off_schema_response() {
    // scripts/test.sh installs schemathesis (PyPI) and points this variable at it.
    let Ok(schemathesis) = std::env::var("COSTWATCH_SCHEMATHESIS") else {
        eprintln!("skipped: COSTWATCH_SCHEMATHESIS is not set (scripts/test.sh sets it)");
        return;
    };
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(90));
    world
        .produce(vec![
            event("a", &ts, "qwen2-7b-instruct", "a100-80g", "1000", "500"),
            raw("bad", b"{nope".to_vec()),
        ])
        .await;
    let daemon = world.start(&world.config(""));
    world.wait_consumed(2, WAIT).await;
    let addr = daemon.http_addr().await;
    let out = tokio::process::Command::new(schemathesis)
        .args([
            "run",
            &format!("http://{addr}/api/v1/openapi.json"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,negative_data_rejection",
            "--max-examples",
            "100",
            "--generation-deterministic",
        ])
        .output()
        .await
        .expect("cannot run schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What an operator points at a running daemon: `promtool check metrics` (HELP and TYPE on every
/// family, Prometheus' naming rules) finds nothing in a live scrape, and the build and process
/// metrics every platform dashboard expects are there with believable values.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_scrape_passes_promtool_and_has_build_and_process_metrics() {
    let started = chrono::Utc::now().timestamp() as f64;
    let world = World::new(2).await;
    let ts = ago(Duration::from_secs(90));
    world
        .produce(vec![
            event("a", &ts, "qwen2-7b-instruct", "a100-80g", "1000", "500"),
            event("b", &ts, "model-1", "tpu-v9", "10", "1"),
            raw("bad", b"{nope".to_vec()),
        ])
        .await;
    let daemon = world.start(&world.config(""));
    world.wait_consumed(3, WAIT).await;
    let addr = daemon.http_addr().await;
    // The lag gauge comes from librdkafka's statistics (every 5 s): wait for a scrape that has
    // every family the daemon exports under load.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (status, metrics) = http(&addr, "GET", "/metrics", None, None).await;
        assert_eq!(status, 200);
        let complete = [
            "costwatch_consumer_lag{",
            "costwatch_watermark_delay_seconds ",
            "costwatch_cost_total{",
        ]
        .iter()
        .all(|s| metrics.contains(s));
        if complete {
            break metrics;
        }
        assert!(std::time::Instant::now() < deadline, "incomplete scrape:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/test.sh installs Debian's prometheus)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- scrape ---\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let build = samples(&metrics, "costwatch_build_info");
    assert_eq!(build.len(), 1, "{metrics}");
    let (labels, value) = &build[0];
    assert_eq!(*value, dec("1"));
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(labels["rustc"].starts_with("rustc "), "{labels:?}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let expected = option_env!("COSTWATCH_BUILD_REVISION")
        .map(str::to_owned)
        .or(head)
        .unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(labels["revision"], expected, "the revision the binary was built from");

    let one = |name: &str| -> f64 {
        let found = samples(&metrics, name);
        assert_eq!(found.len(), 1, "{name}:\n{metrics}");
        found[0].1.to_string().parse().unwrap()
    };
    let now = chrono::Utc::now().timestamp() as f64;
    let start = one("process_start_time_seconds");
    // btime has whole seconds and the start ticks hundredths: allow for both.
    assert!(
        start >= started - 2.0 && start <= now + 1.0,
        "start {start} not in [{started}, {now}]"
    );
    assert!(one("process_cpu_seconds_total") > 0.0);
    let rss = one("process_resident_memory_bytes");
    let peak = daemon.peak_rss_kib() as f64 * 1024.0;
    assert!(rss > 1e6 && rss <= peak, "rss {rss}, peak {peak}");
    assert!(one("process_virtual_memory_bytes") >= rss);
    let fds = one("process_open_fds");
    assert!(fds >= 3.0 && fds <= one("process_max_fds"), "{fds} open fds");
    assert!(one("process_threads") >= 2.0);
}

/// With `log.format = "json"` every line the daemon writes is one JSON object a log collector
/// can index without a parsing rule: timestamp, level, target, message and the event's fields
/// at the top level, from start to a clean stop.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_with_fields_at_the_top() {
    let world = World::new(1).await;
    let mut daemon = world.start(&world.config("\n[log]\nformat = \"json\"\n"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let listening = daemon.log_text().lines().find_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            let message = v["message"].as_str()?;
            message
                .starts_with("http listening")
                .then(|| v["addr"].as_str().map(str::to_owned))?
        });
        if let Some(addr) = listening {
            break addr;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no listening line:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(http(&addr, "GET", "/healthz", None, None).await.0, 200);
    assert!(daemon.terminate(Duration::from_secs(60)).success());

    let log = daemon.log_text();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v[key].is_string(), "{key} missing: {line}");
        }
    }
    assert!(
        lines.iter().any(|l| l.contains(r#""message":"stopped cleanly""#)),
        "{log}"
    );
}

/// A container that logs JSON and is given a bad configuration still writes only JSON: the
/// problems arrive as one line with the exit code, for a file that fails validation and for
/// one that is not even TOML.
#[test]
fn a_configuration_error_is_one_json_line_when_logs_are_json() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, expect) in [
        (
            "invalid.toml",
            "[kafka]\nbrokers = \"b:9092\"\ntopic = \"t\"\ngroup_id = \"g\"\n[database]\nurl = \"mysql://x\"\n[pricing]\ncurrency = \"USD\"\n",
            "database.url: must start with postgres://",
        ),
        ("broken.toml", "[kafka\n", "cannot read configuration"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_costwatch"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env("COSTWATCH__LOG__FORMAT", "json")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {l}")))
            .collect();
        assert_eq!(lines.len(), 1, "{name}: {stderr}");
        assert_eq!(lines[0]["level"], "ERROR", "{stderr}");
        assert_eq!(lines[0]["exit_code"], 78, "{stderr}");
        assert!(lines[0]["error"].as_str().unwrap().contains(expect), "{name}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn times_outside_the_supported_range_are_refused_naming_the_parameter() {
    let world = World::new(1).await;
    let daemon = world.start(&world.config(""));
    let addr = daemon.http_addr().await;
    let range = "0000-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z";
    for (path, parameter, got) in [
        // Counting 24 h back from this overflowed chrono and dropped the connection.
        (
            "/api/v1/costs?to=-262143-01-01T00:00:00Z",
            "to",
            "-262143-01-01T00:00:00Z",
        ),
        // PostgreSQL refused this one, which read as "the database is unavailable" (503).
        (
            "/api/v1/costs?from=-5000-01-01T00:00:00Z",
            "from",
            "-5000-01-01T00:00:00Z",
        ),
        (
            "/api/v1/costs?from=2026-01-01T00:00:00Z&to=%2B20000-01-01T00:00:00Z",
            "to",
            "+20000-01-01T00:00:00Z",
        ),
        (
            "/api/v1/recommendations?to=-262143-01-01T00:00:00Z",
            "to",
            "-262143-01-01T00:00:00Z",
        ),
        (
            "/api/v1/recommendations?from=-5000-01-01T00:00:00Z&to=2026-01-01T00:00:00Z",
            "from",
            "-5000-01-01T00:00:00Z",
        ),
    ] {
        let (status, body) = http(&addr, "GET", path, None, None).await;
        assert_eq!(
            (status, body),
            (
                400,
                format!(r#"{{"error":"{parameter} must be from {range}, got {got}"}}"#)
            ),
            "{path}"
        );
    }
    // The edges themselves are served; the default range stops at the earliest time.
    let (status, body) = http(&addr, "GET", "/api/v1/costs?to=0000-01-01T06:00:00Z", None, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["from"].as_str(), v["series"].as_array().map(Vec::len)),
        (Some("0000-01-01T00:00:00Z"), Some(0))
    );
    let (status, body) = http(
        &addr,
        "GET",
        "/api/v1/recommendations?from=0000-01-01T00:00:00Z&to=9999-12-31T23:59:59.999999999Z",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(daemon.log_text().contains("http listening") && !daemon.log_text().contains("panicked"));
}

/// Reads until the daemon closes the connection; `false` if it is still open after `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // hyper answers 408 before it closes.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_trickles_or_withholds_its_headers_is_disconnected() {
    use tokio::io::AsyncWriteExt;
    let world = World::new(1).await;
    let daemon = world.start(&world.config("\n[http]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\n"));
    let addr = daemon.http_addr().await;

    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut trickling = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickling.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut trickle_closed = false;
    // One header line every 200 ms: the connection is never idle, its headers never end.
    while started.elapsed() < Duration::from_secs(6) {
        if closed_within(&mut trickling, Duration::from_millis(200)).await {
            trickle_closed = true;
            break;
        }
        if trickling.write_all(b"X-Slow: a\r\n").await.is_err() {
            trickle_closed = true;
            break;
        }
    }
    let trickled_for = started.elapsed();
    assert!(
        trickle_closed,
        "a trickling client was still connected after {trickled_for:?}"
    );
    assert!(
        trickled_for < Duration::from_secs(3),
        "closed only after {trickled_for:?}"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(2)).await,
        "a connection that sent nothing was still open after 3s"
    );
    assert_eq!(
        http(&addr, "GET", "/healthz", None, None).await,
        (200, "ok\n".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_outlasts_the_time_limit_gets_a_json_503() {
    let world = World::new(1).await;
    let daemon = world.start(&world.config("\n[http]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"1s\"\n"));
    let addr = daemon.http_addr().await;
    // The API's read of rejected events waits behind this lock for as long as the test holds it.
    let mut lock = world.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE rejected_event IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = http(&addr, "GET", "/api/v1/rejected", None, None).await;
    let took = started.elapsed();
    lock.rollback().await.unwrap();
    assert_eq!(
        answer,
        (
            503,
            r#"{"error":"the request took longer than http.request_timeout (1s); try again, or ask for a shorter range"}"#
                .to_owned()
        )
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    let (status, body) = http(&addr, "GET", "/api/v1/rejected", None, None).await;
    assert_eq!((status, body.as_str()), (200, r#"{"items":[]}"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rejected_api_caps_each_payload_so_clients_that_never_read_hold_little_memory() {
    use tokio::io::AsyncWriteExt;
    let world = World::new(1).await;
    // 200 malformed messages of 60 kB each: 12 MB per uncapped response.
    let payload = format!("{{{}", "x".repeat(60_000));
    world
        .produce((0..200).map(|i| raw(&format!("k{i}"), payload.clone())).collect())
        .await;
    let daemon = world.start(&world.config(""));
    world.wait_consumed(200, WAIT).await;
    let addr = daemon.http_addr().await;

    let before = daemon.peak_rss_kib();
    let mut idle = Vec::new();
    for _ in 0..30 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(format!("GET /api/v1/rejected?limit=1000 HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        idle.push(stream);
    }
    // Every response is built and waiting on its unread socket well within this.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let grown_mib = daemon.peak_rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "30 clients that do not read cost {grown_mib} MiB");

    let (status, body) = http(&addr, "GET", "/api/v1/rejected?limit=1000", None, None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 200);
    for item in items {
        assert_eq!(item["payload_text"].as_str(), Some(&payload[..1024]));
        assert_eq!(item["payload_truncated"], true);
        assert_eq!(item["payload_bytes"], 60_001);
        assert_eq!(item["reason_code"], "malformed_json");
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bearer_scheme_is_case_insensitive() {
    let world = World::new(1).await;
    let daemon = world.start(&world.config(&format!(
        "\n[http]\nlisten = \"127.0.0.1:0\"\napi_token = \"{TOKEN}\"\n"
    )));
    let addr = daemon.http_addr().await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let authorization = format!("{scheme} {TOKEN}");
        let (status, body) = http_with(&addr, "GET", "/api/v1/budgets", &[("Authorization", &authorization)]).await;
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    for wrong in [format!("Basic {TOKEN}"), format!("Bearer{TOKEN}"), TOKEN.to_owned()] {
        let (status, _) = http_with(&addr, "GET", "/api/v1/budgets", &[("Authorization", &wrong)]).await;
        assert_eq!(status, 401, "{wrong}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn protect_metrics_puts_metrics_behind_the_api_token() {
    let world = World::new(1).await;
    let daemon = world.start(&world.config(&format!(
        "\n[http]\nlisten = \"127.0.0.1:0\"\napi_token = \"{TOKEN}\"\nprotect_metrics = true\n"
    )));
    let addr = daemon.http_addr().await;
    assert_eq!(
        http(&addr, "GET", "/metrics", None, None).await,
        (401, r#"{"error":"missing or wrong bearer token"}"#.to_owned())
    );
    let (status, _) = http(&addr, "GET", "/metrics", Some("wrong-token-0123456789"), None).await;
    assert_eq!(status, 401);
    let (status, metrics) = http(&addr, "GET", "/metrics", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE costwatch_"), "{metrics}");
    // Probes stay open: the orchestrator that calls them holds no token.
    assert_eq!(http(&addr, "GET", "/healthz", None, None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_at_once_while_the_database_is_still_awaited() {
    let world = World::new(1).await;
    let config = world.config("");
    // Nothing listens on port 1: costwatch waits for PostgreSQL, retrying with backoff.
    let daemon = world.start_with(
        &config,
        &[("COSTWATCH__DATABASE__URL", "postgres://postgres@127.0.0.1:1/costwatch")],
    );
    let addr = daemon.http_addr_at_start().await;
    let (status, body) = http(&addr, "GET", "/healthz", None, None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http(&addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["database"], false, "{body}");
    assert_eq!(v["consuming"], false, "{body}");
    assert_eq!(v["group_joined"], false, "{body}");
    let deadline = std::time::Instant::now() + WAIT;
    while !daemon.log_text().contains("PostgreSQL is unreachable, retrying") {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `costwatch costs` reads the same history as `/api/v1/costs`: its total equals the API's to
/// the last digit, and its groups add up to the events produced.
#[tokio::test(flavor = "multi_thread")]
async fn the_costs_command_equals_the_api_to_the_last_digit() {
    let world = World::new(2).await;
    let ts = ago(Duration::from_secs(90));
    world
        .produce(vec![
            event("a", &ts, "qwen2-7b-instruct", "a100-80g", "1000", "500"),
            event("b", &ts, "model-0", "hw-0", "123.456", "7.5"),
            event("c", &ts, "model-0", "hw-0", "0.544", "2.5"),
            event("d", &ts, "model-1", "tpu-v9", "10", "1"),
        ])
        .await;
    let config = world.config("");
    let daemon = world.start(&config);
    world.wait_consumed(4, WAIT).await;
    let addr = daemon.http_addr().await;
    let (from, to) = (
        (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    let (status, body) = http(&addr, "GET", &format!("/api/v1/costs?from={from}&to={to}"), None, None).await;
    assert_eq!(status, 200, "{body}");
    let api: Value = serde_json::from_str(&body).unwrap();

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_costwatch"))
            .arg("--config")
            .arg(&config)
            .args(["costs", "--from", &from, "--to", &to])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let json: Value = serde_json::from_str(&cli(&["--by", "model,hardware", "--format", "json"])).unwrap();
    for field in [
        "events",
        "compute",
        "storage",
        "compute_cost",
        "storage_cost",
        "total_cost",
        "unpriced_events",
    ] {
        assert_eq!(json["totals"][field], api["totals"][field], "{field}");
    }
    let rows: Vec<(String, String, String, String)> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap().to_owned(),
                r["hardware"].as_str().unwrap().to_owned(),
                r["compute"].as_str().unwrap().to_owned(),
                r["total_cost"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // qwen on a100: the worked example, 130; model-0 on hw-0: (124 x 0.0004 x 1.1) + (10 x
    // 0.00002 x 0.9); tpu-v9 has no price: its usage is there, its cost is not.
    assert_eq!(
        rows,
        vec![
            ("model-0".into(), "hw-0".into(), "124".into(), "0.05474".into()),
            ("model-1".into(), "tpu-v9".into(), "10".into(), "0".into()),
            (
                "qwen2-7b-instruct".into(),
                "a100-80g".into(),
                "1000".into(),
                "130".into()
            ),
        ]
    );
    assert_eq!(json["totals"]["unpriced_events"], 1);

    let table = cli(&["--by", "model"]);
    let total = table.lines().find(|l| l.starts_with("total (USD)")).unwrap();
    assert!(total.contains(api["totals"]["total_cost"].as_str().unwrap()), "{table}");
    // The unpriced usage is called out under the total, never folded into it.
    assert_eq!(
        table.lines().last().unwrap(),
        "unpriced: 1 events (compute 10, storage 1) have no price and are in no cost",
        "{table}"
    );
    let csv = cli(&["--format", "csv", "--step", "hour"]);
    assert!(
        csv.starts_with(
            "start,events,compute,storage,compute_cost,storage_cost,total_cost,unpriced_events,unpriced_compute,unpriced_storage\n"
        ),
        "{csv}"
    );
}
