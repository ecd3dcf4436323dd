//! The shipped dashboard and rules against a real Prometheus scraping a running costwatch under
//! load: every PromQL query of the dashboard returns data, every rule evaluates healthily (and
//! every recording rule has data), and every SQL query of the dashboard runs against the schema as
//! the read-only role the deployment docs give Grafana.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{http, try_http, World};
use costwatch::loadgen::{self, LoadSpec};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

struct Prometheus {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- prometheus log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts Prometheus scraping `target` every second with the shipped rules, evaluated every second.
fn start_prometheus(dir: &Path, target: &str) -> Prometheus {
    let rules = dir.join("rules.yml");
    std::fs::copy(Path::new(ROOT).join("deploy/prometheus/rules.yml"), &rules).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: costwatch\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.join("prometheus.log");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("prometheus must be installed (scripts/test.sh installs the Debian package)");
    Prometheus { child, addr, log }
}

/// Replaces Grafana's variables with values Prometheus accepts. `$job` gets the job this test's
/// Prometheus scrapes, so a panel whose selector misses the job finds no data.
fn promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", "costwatch")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${model:regex}", ".*")
        .replace("${hardware:regex}", ".*")
        .replace("$model", ".*")
        .replace("$hardware", ".*")
}

/// Replaces Grafana's SQL macros with plain SQL over the last day.
fn sql(raw: &str) -> String {
    let mut s = raw.to_owned();
    for (macro_name, replacement) in [
        ("$__timeFilter(", "__TF("),
        ("$__timeGroupAlias(", "__TGA("),
        ("$__timeGroup(", "__TG("),
    ] {
        s = s.replace(macro_name, replacement);
    }
    // Each macro takes a column first; rewrite `__X(col, ...)` by hand.
    let rewrite = |s: &str, name: &str, f: &dyn Fn(&str) -> String| -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find(name) {
            out.push_str(&rest[..i]);
            let after = &rest[i + name.len()..];
            let close = after.find(')').unwrap();
            let col = after[..close].split(',').next().unwrap().trim();
            out.push_str(&f(col));
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        out
    };
    s = rewrite(&s, "__TF(", &|c| {
        format!("{c} BETWEEN now() - interval '1 day' AND now() + interval '1 day'")
    });
    s = rewrite(&s, "__TGA(", &|c| format!("date_trunc('minute', {c}) AS time"));
    s = rewrite(&s, "__TG(", &|c| format!("date_trunc('minute', {c})"));
    // `$tenant` is a multi-value variable whose All value is `'__all'` (used as is, unquoted by
    // Grafana); other selections arrive as quoted, comma-separated values.
    s.replace("$__interval", "'1 minute'")
        .replace("'$model'", "'%'")
        .replace("'$hardware'", "'%'")
        .replace("$tenant", "'__all'")
}

fn targets(dashboard: &Value, out: &mut Vec<Value>) {
    match dashboard {
        Value::Object(map) => {
            if let Some(Value::Array(ts)) = map.get("targets") {
                out.extend(ts.iter().cloned());
            }
            for v in map.values() {
                targets(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| targets(v, out)),
        _ => {}
    }
}

/// Makes a Grafana role with the grants of `deploy/postgres/grafana-grants.sql` in this test's
/// database, under a name of its own (roles are cluster-wide), and returns that name.
async fn grafana_role(pool: &sqlx::PgPool, database: &str) -> String {
    let name = format!("cw_test_grafana_{:016x}", rand::random::<u64>());
    sqlx::query(&format!("CREATE ROLE {name} LOGIN"))
        .execute(pool)
        .await
        .unwrap();
    psql_file("deploy/postgres/grafana-grants.sql", database, &[("grafana", &name)]);
    name
}

async fn query(prom: &str, q: &str) -> Value {
    let path = format!("/api/v1/query?query={}", urlencode(q));
    let (status, body) = http(prom, "GET", &path, None, None).await;
    assert_eq!(status, 200, "{q}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_and_rule_answers_with_live_data() {
    let world = World::new(2).await;
    // A budget the load blows through at once, so that the budget panels and the alert table
    // have data (no receivers: alert state is still kept in PostgreSQL).
    let config = world.config(
        r#"
[alerting]
evaluation_interval = "1s"

# Potential savings are recomputed every second, so their panel has data within the test.
[recommendations]
refresh_interval = "1s"

[[budgets]]
name = "dashboard"
period = "monthly"
amount = "0.001"
thresholds = [0.5]
forecast = true
"#,
    );
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    // Load with priced and unpriced hardware, duplicates, late and malformed events, sent
    // over the whole test so rates have data.
    let (messages, _) = loadgen::generate(&LoadSpec {
        count: 30_000,
        seed: 11,
        models: 3,
        hardware: 3,
        rate: 1_500,
        duplicates: 0.03,
        late: 0.02,
        malformed: 0.02,
        hostile: 0.0,
        late_by: Duration::from_secs(600),
        span: Duration::from_secs(600),
        end: Utc::now(),
    });
    let topic = world.topic.clone();
    let producer = tokio::task::spawn_blocking(move || loadgen::send(&common::brokers(), &topic, &messages, 1_500));

    let prom = start_prometheus(world.dir.path(), &addr);
    // Rates need two samples inside their range; give the scrapes and rule evaluations time.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = try_http(&prom.addr, "GET", "/-/ready", None, None).await;
        if ready.is_some_and(|(status, _)| status == 200) {
            let up = query(&prom.addr, "sum(costwatch_events_total)").await;
            if up["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "prometheus never scraped costwatch");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/dashboards/costwatch.json")).unwrap(),
    )
    .unwrap();
    let mut all = Vec::new();
    targets(&dashboard, &mut all);
    // SQL panels run as the documented read-only role, on one connection that has SET ROLE.
    let role = grafana_role(&world.pool, world.db_url.rsplit('/').next().unwrap()).await;
    let mut grafana = world.pool.acquire().await.unwrap();
    sqlx::query(&format!("SET ROLE {role}"))
        .execute(&mut *grafana)
        .await
        .unwrap();
    let mut promql_count = 0;
    let mut sql_count = 0;
    let mut empty = Vec::new();
    for target in &all {
        if let Some(expr) = target.get("expr").and_then(Value::as_str) {
            promql_count += 1;
            let q = promql(expr);
            let v = query(&prom.addr, &q).await;
            assert_eq!(v["status"], "success", "{q}: {v}");
            if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                empty.push(q);
            }
        }
        if let Some(raw) = target.get("rawSql").and_then(Value::as_str) {
            sql_count += 1;
            let q = sql(raw);
            let rows = sqlx::query(&q)
                .fetch_all(&mut *grafana)
                .await
                .unwrap_or_else(|e| panic!("dashboard SQL failed as the read-only role: {e}\n{q}"));
            assert!(!rows.is_empty(), "dashboard SQL returned no rows:\n{q}");
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    assert!(promql_count >= 8, "only {promql_count} PromQL targets found");

    // The template variables offer values: `label_values(selector, label)` finds the label on
    // live series (the job variable finds job="costwatch", model and hardware their names).
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(definition) = variable["query"].as_str().and_then(|q| q.strip_prefix("label_values(")) else {
            continue;
        };
        let (selector, label) = definition.trim_end_matches(')').rsplit_once(',').unwrap();
        let q = format!("count by ({}) ({})", label.trim(), promql(selector));
        let v = query(&prom.addr, &q).await;
        let values: Vec<&str> = v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["metric"][label.trim()].as_str())
            .collect();
        assert!(!values.is_empty(), "variable {} offers nothing: {q}", variable["name"]);
        if variable["name"] == "job" {
            assert_eq!(values, ["costwatch"], "{q}");
        }
    }
    assert!(sql_count >= 1, "no SQL targets found");
    // SQL variables (the tenant) run as the read-only role and offer the load's values.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["datasource"]["type"] != "grafana-postgresql-datasource" {
            continue;
        }
        let q = sql(variable["query"].as_str().unwrap());
        let values: Vec<String> = sqlx::query_scalar(&q)
            .fetch_all(&mut *grafana)
            .await
            .unwrap_or_else(|e| panic!("dashboard variable SQL failed as the read-only role: {e}\n{q}"));
        if variable["name"] == "tenant" {
            assert_eq!(values, ["ads", "recs", "search"], "{q}");
        }
    }
    sqlx::query("RESET ROLE").execute(&mut *grafana).await.unwrap();
    drop(grafana);
    for statement in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(&statement).execute(&world.pool).await.unwrap();
    }

    // Every rule loaded and evaluated without error; every recording rule has data.
    let (_, body) = http(&prom.addr, "GET", "/api/v1/rules", None, None).await;
    let rules: Value = serde_json::from_str(&body).unwrap();
    let mut seen = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            seen += 1;
            let name = rule["name"].as_str().unwrap();
            assert_eq!(rule["health"], "ok", "rule {name}: {rule}");
            if rule["type"] == "recording" {
                let v = query(&prom.addr, name).await;
                assert!(
                    v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()),
                    "recording rule {name} has no data: {v}"
                );
            }
        }
    }
    assert!(seen >= 5, "only {seen} rules loaded from deploy/prometheus/rules.yml");
    producer.abort();
}

/// Runs one of `deploy/postgres/*.sql` with psql as the test's superuser, against `database`.
fn psql_file(file: &str, database: &str, vars: &[(&str, &str)]) {
    let base = std::env::var("COSTWATCH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let url = format!("{}/{database}", &base[..base.rfind('/').unwrap()]);
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", &url, "-f"]).arg(Path::new(ROOT).join(file));
    for (name, value) in vars {
        cmd.args(["-v", &format!("{name}={value}")]);
    }
    let out = cmd.output().expect("psql");
    assert!(
        out.status.success(),
        "{file}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_grants_suffice_and_grafana_can_only_read() {
    let mut world = World::new(2).await;
    let suffix = world.topic.rsplit('-').next().unwrap().to_owned();
    let (owner, grafana, db) = (
        format!("cw_test_owner_{suffix}"),
        format!("cw_test_grafana_{suffix}"),
        format!("cw_test_least_{suffix}"),
    );
    psql_file(
        "deploy/postgres/roles.sql",
        "postgres",
        &[
            ("owner", &owner),
            ("owner_password", "owner-password"),
            ("grafana", &grafana),
            ("grafana_password", "grafana-password"),
            ("db", &db),
        ],
    );
    // costwatch runs as the owner: migrations, claims, flushes, budgets and alerts all work
    // without superuser rights.
    let base = world.db_url[..world.db_url.rfind('/').unwrap()].to_owned();
    let as_role = |role: &str| base.replacen("postgres@", &format!("{role}@"), 1) + "/" + &db;
    world.db_url = as_role(&owner);
    world.pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&format!("{base}/{db}"))
        .await
        .unwrap();
    let config = world.config(
        "\n[alerting]\nevaluation_interval = \"1s\"\n\n[[budgets]]\nname = \"grants\"\nperiod = \"monthly\"\namount = \"0.001\"\nthresholds = [0.5]\n",
    );
    let mut daemon = world.start(&config);
    let (messages, expected) = loadgen::generate(&LoadSpec {
        count: 500,
        seed: 12,
        models: 2,
        hardware: 2,
        rate: 0,
        duplicates: 0.02,
        late: 0.0,
        malformed: 0.05,
        hostile: 0.0,
        late_by: Duration::from_secs(60),
        span: Duration::from_secs(120),
        end: Utc::now(),
    });
    world.produce(messages).await;
    world
        .wait_consumed(expected.messages as i64, Duration::from_secs(60))
        .await;
    world.assert_totals(&expected, "written as the owner").await;
    // The budget alert fires, so its table has a row for the dashboard to read.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM budget_alert")
        .fetch_one(&world.pool)
        .await
        .unwrap()
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "no budget alert was recorded:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(daemon.terminate(Duration::from_secs(60)).success());

    psql_file("deploy/postgres/grafana-grants.sql", &db, &[("grafana", &grafana)]);
    let reader = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&as_role(&grafana))
        .await
        .unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/dashboards/costwatch.json")).unwrap(),
    )
    .unwrap();
    let mut all = Vec::new();
    targets(&dashboard, &mut all);
    let queries: Vec<String> = all
        .iter()
        .filter_map(|t| t.get("rawSql").and_then(Value::as_str))
        .map(sql)
        .collect();
    assert!(!queries.is_empty());
    for q in &queries {
        let rows = sqlx::query(q)
            .fetch_all(&reader)
            .await
            .unwrap_or_else(|e| panic!("the grafana role cannot run a dashboard query: {e}\n{q}"));
        assert!(!rows.is_empty(), "no rows for the grafana role:\n{q}");
    }
    for write in [
        "DELETE FROM window_usage",
        "UPDATE partition_progress SET next_offset = 0",
        "SELECT * FROM partition_progress",
        "INSERT INTO budget_alert (budget) VALUES ('x')",
        "CREATE TABLE grafana_was_here (x int)",
    ] {
        let err = sqlx::query(write).execute(&reader).await.unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{write}: {err}");
    }
    reader.close().await;
    world.pool.close().await;
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    for statement in [
        format!("DROP DATABASE \"{db}\" WITH (FORCE)"),
        format!("DROP ROLE \"{grafana}\""),
        format!("DROP ROLE \"{owner}\""),
    ] {
        sqlx::query(&statement).execute(&admin).await.unwrap();
    }
}
