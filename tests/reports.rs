//! Chargeback against a running daemon, the real broker and PostgreSQL: cost queries filtered
//! and grouped by labels, `costwatch report` and `/api/v1/report`, and label dimensions on the
//! cost counters. Truth is computed by hand from the configured prices (tests/common's config).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{ago, dec, http, raw, World};
use costwatch::loadgen::Message;
use rust_decimal::Decimal;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);

/// One well-formed event with labels (a JSON object).
fn labelled(id: &str, ts: &str, model: &str, hardware: &str, compute: &str, storage: &str, labels: &str) -> Message {
    raw(
        id,
        format!(
            r#"{{"event_id":"{id}","timestamp":"{ts}","model":"{model}","hardware":"{hardware}","compute":{compute},"storage":{storage},"labels":{labels}}}"#
        ),
    )
}

/// Four tenants' worth of usage in one window: priced and unpriced hardware, a duplicate, a row
/// without a tenant, and a second label on one tenant.
fn chargeback_events() -> Vec<Message> {
    let ts = ago(Duration::from_secs(90));
    vec![
        labelled(
            "s1",
            &ts,
            "qwen2-7b-instruct",
            "a100-80g",
            "1000",
            "500",
            r#"{"tenant":"search"}"#,
        ),
        labelled(
            "s1",
            &ts,
            "qwen2-7b-instruct",
            "a100-80g",
            "1000",
            "500",
            r#"{"tenant":"search"}"#,
        ),
        labelled("s2", &ts, "model-0", "hw-0", "123.456", "7.5", r#"{"tenant":"search"}"#),
        labelled("a1", &ts, "model-0", "hw-0", "0.544", "2.5", r#"{"tenant":"ads"}"#),
        labelled("a2", &ts, "model-1", "tpu-v9", "10", "1", r#"{"tenant":"ads"}"#),
        labelled(
            "r1",
            &ts,
            "model-0",
            "hw-1",
            "4",
            "100",
            r#"{"region":"eu","tenant":"recs"}"#,
        ),
        labelled("n1", &ts, "qwen2-7b-instruct", "a100-80g", "10", "0", "{}"),
    ]
}

/// The hand-computed truth per tenant (`None`: no tenant label), in the report's order, as
/// (tenant, events, compute, storage, compute_cost, storage_cost, total_cost, unpriced events,
/// unpriced compute, unpriced storage). Prices: a100-80g 0.1/0.2 with k 0.5/0.8 for qwen; hw-0
/// 0.0004/0.00002 with k 1.1/0.9 for model-0; hw-1 0.00025/0.00002, k 1; tpu-v9 unpriced.
type Truth = (
    Option<&'static str>,
    i64,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    i64,
    &'static str,
    &'static str,
);
const TRUTH: [Truth; 4] = [
    // a1: 0.544 x 0.0004 x 1.1 = 0.00023936, 2.5 x 0.00002 x 0.9 = 0.000045; a2 unpriced.
    (
        Some("ads"),
        2,
        "10.544",
        "3.5",
        "0.00023936",
        "0.000045",
        "0.00028436",
        1,
        "10",
        "1",
    ),
    // r1: 4 x 0.00025 = 0.001, 100 x 0.00002 = 0.002.
    (Some("recs"), 1, "4", "100", "0.001", "0.002", "0.003", 0, "0", "0"),
    // s1 once (50 + 80); s2: 123.456 x 0.0004 x 1.1 = 0.05432064, 7.5 x 0.00002 x 0.9 = 0.000135.
    (
        Some("search"),
        2,
        "1123.456",
        "507.5",
        "50.05432064",
        "80.000135",
        "130.05445564",
        0,
        "0",
        "0",
    ),
    // n1: 10 x 0.1 x 0.5.
    (None, 1, "10", "0", "0.5", "0", "0.5", 0, "0", "0"),
];

fn assert_truth(row: &Value, truth: &Truth, context: &str) {
    let (tenant, events, compute, storage, cc, sc, tc, ue, uc, us) = *truth;
    assert_eq!(row["tenant"], serde_json::json!(tenant), "{context}: {row}");
    assert_eq!(row["events"], events, "{context}: {row}");
    for (field, want) in [
        ("compute", compute),
        ("storage", storage),
        ("compute_cost", cc),
        ("storage_cost", sc),
        ("total_cost", tc),
        ("unpriced_compute", uc),
        ("unpriced_storage", us),
    ] {
        assert_eq!(row[field], want, "{context} {field}: {row}");
    }
    assert_eq!(row["unpriced_events"], ue, "{context}: {row}");
}

const FIGURES: [&str; 9] = [
    "events",
    "compute",
    "storage",
    "compute_cost",
    "storage_cost",
    "total_cost",
    "unpriced_events",
    "unpriced_compute",
    "unpriced_storage",
];

fn range() -> (String, String) {
    let at = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    (
        at(chrono::Utc::now() - chrono::Duration::hours(1)),
        at(chrono::Utc::now() + chrono::Duration::minutes(1)),
    )
}

async fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, None, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn cli(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_and_grouped_queries_equal_the_hand_computed_truth_per_tenant() {
    let world = World::new(2).await;
    world.produce(chargeback_events()).await;
    let config = world.config("");
    let daemon = world.start(&config);
    world.wait_consumed(7, WAIT).await;
    let addr = daemon.http_addr().await;
    let (from, to) = range();

    let report = get_json(&addr, &format!("/api/v1/report?from={from}&to={to}")).await;
    assert_eq!(report["by"], serde_json::json!(["tenant"]));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), TRUTH.len(), "{report}");
    for (row, truth) in rows.iter().zip(&TRUTH) {
        assert_truth(row, truth, "report");
    }
    let costs = get_json(&addr, &format!("/api/v1/costs?from={from}&to={to}&group_by=tenant")).await;
    // The report's grand total is /api/v1/costs' total, every figure to the last digit.
    for field in FIGURES {
        assert_eq!(report["totals"][field], costs["totals"][field], "{field}");
    }
    assert_eq!(costs["totals"]["total_cost"], "130.55774");
    assert_eq!(costs["totals"]["unpriced_events"], 1);
    let groups = costs["groups"].as_array().unwrap();
    for (group, truth) in groups.iter().zip(&TRUTH) {
        assert_truth(group, truth, "costs groups");
    }
    assert_eq!(groups.len(), TRUTH.len());

    // The source is a column (the topic until sources exist), next to labels.
    let by_source = get_json(
        &addr,
        &format!("/api/v1/costs?from={from}&to={to}&group_by=source,tenant"),
    )
    .await;
    assert_eq!(by_source["group_by"], serde_json::json!(["source", "tenant"]));
    assert_eq!(by_source["groups"][0]["source"], world.topic.as_str());
    assert_eq!(by_source["groups"][0]["tenant"], "ads");

    // Filters: one tenant; two labels ANDed; a label no row has.
    let search = get_json(&addr, &format!("/api/v1/costs?from={from}&to={to}&label.tenant=search")).await;
    assert_eq!(
        (&search["totals"]["events"], &search["totals"]["total_cost"]),
        (&serde_json::json!(2), &serde_json::json!("130.05445564"))
    );
    assert_eq!(search["labels"], serde_json::json!({"tenant": "search"}));
    let both = get_json(
        &addr,
        &format!("/api/v1/costs?from={from}&to={to}&label.tenant=recs&label.region=eu"),
    )
    .await;
    assert_eq!(both["totals"]["total_cost"], "0.003");
    let none = get_json(
        &addr,
        &format!("/api/v1/costs?from={from}&to={to}&label.tenant=search&label.region=eu"),
    )
    .await;
    assert_eq!(
        (&none["totals"]["events"], &none["totals"]["total_cost"]),
        (&serde_json::json!(0), &serde_json::json!("0"))
    );

    // Two dimensions, with a filter: ads' priced and unpriced usage on their own rows.
    let ads = get_json(
        &addr,
        &format!("/api/v1/report?from={from}&to={to}&by=tenant,hardware&label.tenant=ads"),
    )
    .await;
    let pairs: Vec<(String, String, String, i64)> = ads["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["tenant"].as_str().unwrap().to_owned(),
                r["hardware"].as_str().unwrap().to_owned(),
                r["total_cost"].as_str().unwrap().to_owned(),
                r["unpriced_events"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("ads".into(), "hw-0".into(), "0.00028436".into(), 0),
            ("ads".into(), "tpu-v9".into(), "0".into(), 1)
        ]
    );

    // The command line prints the same report.
    let json: Value = serde_json::from_str(&cli(
        &config,
        &["report", "--from", &from, "--to", &to, "--format", "json"],
    ))
    .unwrap();
    assert_eq!(json["rows"], report["rows"]);
    assert_eq!(json["totals"], report["totals"]);
    let table = cli(&config, &["report", "--from", &from, "--to", &to]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().take(3).collect::<Vec<_>>(),
        ["tenant", "events", "compute"],
        "{table}"
    );
    assert!(lines[4].starts_with("(none)"), "{table}");
    assert!(
        lines[5].starts_with("total (USD)") && lines[5].contains("130.55774"),
        "{table}"
    );
    assert_eq!(
        lines[6], "unpriced: 1 events (compute 10, storage 1) have no price and are in no cost",
        "{table}"
    );
    let csv = cli(
        &config,
        &[
            "costs",
            "--from",
            &from,
            "--to",
            &to,
            "--by",
            "tenant",
            "--label",
            "tenant=ads",
            "--format",
            "csv",
        ],
    );
    assert_eq!(
        csv,
        "tenant,events,compute,storage,compute_cost,storage_cost,total_cost,unpriced_events,unpriced_compute,unpriced_storage\n\
         ads,2,10.544,3.5,0.00023936,0.000045,0.00028436,1,10,1\n"
    );

    // The calendar month of the events, in UTC, holds all of them.
    let month = &from[..7];
    if month == &to[..7] {
        // Whole days are read from the daily roll-ups, which keep the label sets too.
        let by_month = get_json(&addr, &format!("/api/v1/report?month={month}")).await;
        assert_eq!(by_month["rows"], report["rows"]);
        assert_eq!(by_month["totals"], report["totals"]);
        assert_eq!(by_month["tz"], "UTC");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_label_names_and_report_ranges_are_refused_with_the_rule() {
    let world = World::new(1).await;
    let config = world.config("");
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    let long = "x".repeat(129);
    let rule = "label names are 1 to 128 characters without NUL";
    for (path, message) in [
        (
            format!("/api/v1/costs?group_by={long}"),
            format!(
                "label name \"{}\" is 129 characters long, the limit is 128; {rule}",
                "x".repeat(40)
            ),
        ),
        (
            "/api/v1/costs?label.=x".into(),
            format!("label name \"\" must not be empty; {rule}"),
        ),
        (
            "/api/v1/costs?group_by=tenant,model,".into(),
            format!("label name \"\" must not be empty; {rule}"),
        ),
        (
            "/api/v1/costs?label.tenant=a&label.tenant=b".into(),
            "label.tenant is given twice; a label has one value per event, filter on it once".into(),
        ),
        (
            "/api/v1/costs?label.ten%00ant=a".into(),
            format!("label name \"ten\\0ant\" must not contain NUL characters; {rule}"),
        ),
        ("/api/v1/report".into(), "give month, or both from and to".into()),
        (
            "/api/v1/report?month=2026-11&from=2026-11-01T00:00:00Z".into(),
            "give either month or from and to, not both".into(),
        ),
        (
            "/api/v1/report?month=2026-13".into(),
            "month must be YYYY-MM (2026-11), got \"2026-13\"".into(),
        ),
        (
            "/api/v1/report?month=2026-11&by=model,model".into(),
            "model is listed twice in the group-by list".into(),
        ),
    ] {
        let (status, body) = http(&addr, "GET", &path, None, None).await;
        assert_eq!(status, 400, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], message, "{path}");
    }
    // A misspelt parameter is still named.
    let (status, body) = http(&addr, "GET", "/api/v1/costs?tenant=search", None, None).await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown field `tenant`"), "{body}");

    // A month in a time zone: Berlin's November 2026 is CET (UTC+1) at both ends.
    let json: Value = serde_json::from_str(&cli(
        &config,
        &[
            "report",
            "--month",
            "2026-11",
            "--tz",
            "Europe/Berlin",
            "--format",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(
        (&json["from"], &json["to"], &json["tz"]),
        (
            &serde_json::json!("2026-10-31T23:00:00Z"),
            &serde_json::json!("2026-11-30T23:00:00Z"),
            &serde_json::json!("Europe/Berlin")
        )
    );
    let (_, body) = http(
        &addr,
        "GET",
        "/api/v1/report?month=2026-03&tz=America/New_York",
        None,
        None,
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    // EST at the start of March, EDT at the start of April.
    assert_eq!(
        (&v["from"], &v["to"]),
        (
            &serde_json::json!("2026-03-01T05:00:00Z"),
            &serde_json::json!("2026-04-01T04:00:00Z")
        )
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .arg("--config")
        .arg(&config)
        .args(["costs", "--label", "tenant"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: --label \"tenant\" must be name=value, e.g. tenant=search"
    );
}

/// Sums a metric's samples per value of `label` (`None`: the series has no such label).
fn by_label(metrics: &str, name: &str, label: &str) -> BTreeMap<Option<String>, Decimal> {
    let mut out: BTreeMap<Option<String>, Decimal> = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !rest.starts_with(['{', ' ']) {
            continue;
        }
        let (series, value) = rest.rsplit_once(' ').unwrap();
        let needle = format!("{label}=\"");
        let value_of = series.find(&needle).map(|i| {
            let after = &series[i + needle.len()..];
            after[..after.find('"').unwrap()].to_owned()
        });
        *out.entry(value_of).or_default() += value.parse::<Decimal>().unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn label_dimensions_reach_the_cost_counters_capped_with_other() {
    let world = World::new(1).await;
    world.produce(chargeback_events()).await;
    let config = world.config("\n[metrics]\nlabel_dimensions = [\"tenant\"]\nmax_label_values = 2\n");
    let daemon = world.start(&config);
    world.wait_consumed(7, WAIT).await;
    let (_, metrics) = http(&daemon.http_addr().await, "GET", "/metrics", None, None).await;
    let compute = by_label(&metrics, "costwatch_compute_units_total", "tenant");
    // Which two tenants keep their names depends on arrival order; what is fixed is that two do,
    // the third is `other`, the untenanted row has no label, and nothing is lost from the sum.
    let truth: BTreeMap<&str, Decimal> = [("ads", "10.544"), ("recs", "4"), ("search", "1123.456")]
        .into_iter()
        .map(|(t, c)| (t, dec(c)))
        .collect();
    let named: Vec<&Option<String>> = compute
        .keys()
        .filter(|k| k.is_some() && k.as_deref() != Some("other"))
        .collect();
    assert_eq!(named.len(), 2, "{compute:?}");
    for tenant in named {
        assert_eq!(compute[tenant], truth[tenant.as_deref().unwrap()], "{compute:?}");
    }
    assert_eq!(compute[&None], dec("10"), "{compute:?}");
    let all: Decimal = compute.values().sum();
    assert_eq!(all, dec("1148"));
    let costs = by_label(&metrics, "costwatch_cost_total", "tenant");
    assert_eq!(costs.values().sum::<Decimal>(), dec("130.55774"), "{costs:?}");
    // The unpriced events counter carries the tenant too (ads' tpu-v9 event, unless capped).
    let unpriced = by_label(&metrics, "costwatch_unpriced_events_total", "tenant");
    assert_eq!(unpriced.values().sum::<Decimal>(), dec("1"), "{unpriced:?}");
    assert!(
        unpriced.contains_key(&Some("ads".into())) || unpriced.contains_key(&Some("other".into())),
        "{unpriced:?}"
    );
}

/// A window whose rows were written with and without a price (the price was added while it was
/// open): the priced row keeps its cost, the unpriced one is reported as unpriced, and neither
/// is folded into the other. `usage_costs`, which prices a window only when all of it is
/// priced, shows no cost for that window at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_price_added_mid_window_keeps_priced_rows_priced_and_unpriced_rows_apart() {
    let world = World::new(1).await;
    let ts = ago(Duration::from_secs(90));
    world
        .produce(vec![labelled(
            "u1",
            &ts,
            "model-1",
            "tpu-v9",
            "10",
            "1",
            r#"{"tenant":"ads"}"#,
        )])
        .await;
    let mut daemon = world.start(&world.config(""));
    world.wait_consumed(1, WAIT).await;
    assert!(daemon.terminate(WAIT).success());

    world
        .produce(vec![labelled(
            "p1",
            &ts,
            "model-1",
            "tpu-v9",
            "20",
            "2",
            r#"{"tenant":"search"}"#,
        )])
        .await;
    let priced = world.config(
        "\n[pricing]\ncurrency = \"USD\"\n\n[[pricing.hardware]]\nname = \"tpu-v9\"\ncompute_price = \"0.5\"\nstorage_price = \"0.25\"\n",
    );
    let daemon = world.start(&priced);
    world.wait_consumed(2, WAIT).await;
    let addr = daemon.http_addr().await;
    let (from, to) = range();
    let report = get_json(&addr, &format!("/api/v1/report?from={from}&to={to}")).await;
    // search: 20 x 0.5 + 2 x 0.25 = 10.5; ads: unpriced, in no cost.
    let rows: Vec<(String, String, i64)> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["tenant"].as_str().unwrap().to_owned(),
                r["total_cost"].as_str().unwrap().to_owned(),
                r["unpriced_events"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [("ads".into(), "0".into(), 1), ("search".into(), "10.5".into(), 0)]
    );
    assert_eq!(report["totals"]["total_cost"], "10.5");
    assert_eq!(report["totals"]["unpriced_compute"], "10");
    let costs = get_json(&addr, &format!("/api/v1/costs?from={from}&to={to}")).await;
    assert_eq!(costs["totals"], report["totals"]);
    let view: Option<Decimal> = sqlx::query_scalar("SELECT sum(total_cost) FROM usage_costs")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(view, None, "usage_costs prices a window only when all of it is priced");
}

/// The text of a numeric field in an event payload, kept exact (serde_json's numbers are f64).
fn number_field(payload: &str, field: &str) -> Decimal {
    let key = format!("\"{field}\":");
    let start = payload.find(&key).unwrap() + key.len();
    let end = payload[start..].find([',', '}']).unwrap() + start;
    dec(payload[start..end].trim())
}

/// The test config's rates per (model, hardware): compute price x k1, storage price x k2;
/// `None` for unpriced hardware.
fn rates(model: &str, hardware: &str) -> Option<(Decimal, Decimal)> {
    let (cp, sp) = match hardware {
        "hw-0" => (dec("0.0004"), dec("0.00002")),
        "hw-1" => (dec("0.00025"), dec("0.00002")),
        _ => return None,
    };
    let (k1, k2) = match (model, hardware) {
        ("model-0", "hw-0") => (dec("1.1"), dec("0.9")),
        _ => (Decimal::ONE, Decimal::ONE),
    };
    Some((cp * k1, sp * k2))
}

/// A seeded load with tenant labels on several models and hardware targets, duplicates and late
/// events: the report per tenant and hardware equals the truth summed from the messages sent,
/// each event priced on its own (duplicates once, unpriced hardware in no cost).
#[tokio::test(flavor = "multi_thread")]
async fn a_seeded_load_reports_per_tenant_what_its_messages_add_up_to() {
    use costwatch::loadgen::{self, LoadSpec};
    let world = World::new(2).await;
    let (messages, expected) = loadgen::generate(&LoadSpec {
        count: 3_000,
        seed: 19,
        models: 2,
        hardware: 3,
        rate: 0,
        duplicates: 0.05,
        late: 0.02,
        malformed: 0.0,
        hostile: 0.0,
        late_by: Duration::from_secs(300),
        span: Duration::from_secs(600),
        end: chrono::Utc::now(),
    });
    // (tenant, hardware) -> [events, compute, storage, compute cost, storage cost, unpriced events]
    let mut truth: BTreeMap<(String, String), [Decimal; 6]> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for m in &messages {
        if !seen.insert(m.key.clone()) {
            continue;
        }
        let payload = std::str::from_utf8(&m.payload).unwrap();
        let v: Value = serde_json::from_str(payload).unwrap();
        let (model, hardware) = (v["model"].as_str().unwrap(), v["hardware"].as_str().unwrap());
        let (compute, storage) = (number_field(payload, "compute"), number_field(payload, "storage"));
        let t = truth
            .entry((v["labels"]["tenant"].as_str().unwrap().to_owned(), hardware.to_owned()))
            .or_default();
        t[0] += Decimal::ONE;
        t[1] += compute;
        t[2] += storage;
        match rates(model, hardware) {
            Some((c, s)) => {
                t[3] += compute * c;
                t[4] += storage * s;
            }
            None => t[5] += Decimal::ONE,
        }
    }
    world.produce(messages).await;
    let daemon = world.start(&world.config(""));
    world.wait_consumed(expected.messages as i64, WAIT).await;
    let addr = daemon.http_addr().await;
    let (from, to) = range();
    let report = get_json(&addr, &format!("/api/v1/report?from={from}&to={to}&by=tenant,hardware")).await;
    let got: BTreeMap<(String, String), [Decimal; 6]> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let d = |f: &str| dec(r[f].as_str().unwrap());
            let n = |f: &str| Decimal::from(r[f].as_i64().unwrap());
            let key = (
                r["tenant"].as_str().unwrap().to_owned(),
                r["hardware"].as_str().unwrap().to_owned(),
            );
            (
                key,
                [
                    n("events"),
                    d("compute"),
                    d("storage"),
                    d("compute_cost"),
                    d("storage_cost"),
                    n("unpriced_events"),
                ],
            )
        })
        .collect();
    let normal = |m: &BTreeMap<(String, String), [Decimal; 6]>| -> BTreeMap<(String, String), [Decimal; 6]> {
        m.iter().map(|(k, v)| (k.clone(), v.map(|d| d.normalize()))).collect()
    };
    assert_eq!(normal(&got), normal(&truth));
    assert_eq!(got.len(), 9, "three tenants on three hardware targets");
    let total: Decimal = truth.values().map(|t| t[3] + t[4]).sum();
    assert_eq!(dec(report["totals"]["total_cost"].as_str().unwrap()), total);
    let costs = get_json(&addr, &format!("/api/v1/costs?from={from}&to={to}")).await;
    assert_eq!(costs["totals"], report["totals"]);
}
