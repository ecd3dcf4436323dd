//! Test harness: a fresh database and a fresh topic per test, the real `costwatch` binary as a
//! child process, and readers for what a user would query.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use costwatch::config::Settings;
use costwatch::ingest::aggregate::IngestRules;
use costwatch::ingest::store::WindowLayout;
use costwatch::loadgen::{self, Expected, Message};
use costwatch::pricing::PriceBook;
use costwatch::store::Store;
use rand::Rng;
use rust_decimal::Decimal;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

/// How long a test waits for a topic to be drained into PostgreSQL.
pub const WAIT_DRAINED: Duration = Duration::from_secs(180);

pub fn brokers() -> String {
    std::env::var("COSTWATCH_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn admin_url() -> String {
    std::env::var("COSTWATCH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn random_suffix() -> String {
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}

/// One test's world: its database, topic, config file and scratch directory.
pub struct World {
    /// The broker this world's topic lives on (the shared test broker unless `on` was used).
    pub brokers: String,
    pub db_url: String,
    pub pool: PgPool,
    pub topic: String,
    pub dir: tempfile::TempDir,
}

impl World {
    /// A fresh database and a topic with `partitions` partitions.
    pub async fn new(partitions: i32) -> World {
        World::on(&brokers(), partitions).await
    }

    /// A fresh database and a topic on the broker at `brokers`.
    pub async fn on(brokers: &str, partitions: i32) -> World {
        let name = format!("cw_test_{}", random_suffix());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("PostgreSQL must be running for the integration tests (scripts/postgres.sh)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let base = admin_url();
        let db_url = format!("{}/{name}", &base[..base.rfind('/').unwrap()]);
        let pool = PgPoolOptions::new().max_connections(4).connect(&db_url).await.unwrap();
        let topic = format!("cw-test-{}", random_suffix());
        loadgen::ensure_topic(brokers, &topic, partitions)
            .await
            .expect("the broker must be running for the integration tests (scripts/broker.sh)");
        World {
            brokers: brokers.to_owned(),
            db_url,
            pool,
            topic,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes a config for this world; `extra` is appended (TOML) and may override sections
    /// that are not already in the base (ingest, windows) .
    pub fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("costwatch-{}.toml", random_suffix()));
        let has = |section: &str| extra.contains(&format!("[{section}]"));
        let mut text = format!(
            r#"
[kafka]
brokers = "{brokers}"
topic = "{topic}"
group_id = "{topic}-group"
session_timeout = "6s"

[database]
url = "{db}"
"#,
            brokers = self.brokers,
            topic = self.topic,
            db = self.db_url
        );
        if !has("http") {
            text.push_str("\n[http]\nlisten = \"127.0.0.1:0\"\n");
        }
        if !has("windows") {
            text.push_str("\n[windows]\nsize = \"1m\"\nallowed_lateness = \"5m\"\n");
        }
        if !has("ingest") {
            text.push_str("\n[ingest]\nflush_interval = \"200ms\"\n");
        }
        if !has("pricing") {
            text.push_str(
                r#"
[pricing]
currency = "USD"

[[pricing.hardware]]
name = "a100-80g"
compute_price = "0.1"
storage_price = "0.2"

[[pricing.hardware]]
name = "hw-0"
compute_price = "0.0004"
storage_price = "0.00002"

[[pricing.hardware]]
name = "hw-1"
compute_price = "0.00025"
storage_price = "0.00002"

[[pricing.coefficients]]
model = "qwen2-7b-instruct"
hardware = "a100-80g"
k1 = "0.5"
k2 = "0.8"

[[pricing.coefficients]]
model = "model-0"
hardware = "hw-0"
k1 = "1.1"
k2 = "0.9"
"#,
            );
        }
        text.push_str(extra);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path
    }

    pub fn start(&self, config: &Path) -> Daemon {
        self.start_with(config, &[])
    }

    /// Starts a daemon with extra environment variables (e.g. `COSTWATCH_FAULTS`).
    pub fn start_with(&self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start(
            config,
            &self.dir.path().join(format!("daemon-{}.log", random_suffix())),
            env,
        )
    }

    pub async fn produce(&self, messages: Vec<Message>) {
        let (topic, brokers) = (self.topic.clone(), self.brokers.clone());
        tokio::task::spawn_blocking(move || loadgen::send(&brokers, &topic, &messages, 0))
            .await
            .unwrap()
            .unwrap();
    }

    /// Per (model, hardware): events, compute, storage, as `usage_costs` reports them.
    pub async fn totals(&self) -> BTreeMap<(String, String), (i64, Decimal, Decimal)> {
        sqlx::query(
            "SELECT model, hardware, sum(events)::int8 AS events, sum(compute) AS compute, sum(storage) AS storage
             FROM usage_costs GROUP BY model, hardware",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            (
                (r.get("model"), r.get("hardware")),
                (r.get("events"), r.get("compute"), r.get("storage")),
            )
        })
        .collect()
    }

    pub async fn accepted_events(&self) -> i64 {
        sqlx::query_scalar("SELECT COALESCE(sum(events), 0)::int8 FROM usage_costs")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    pub async fn rejected_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM rejected_events")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    /// Sum of stored next offsets over partitions: the number of messages consumed.
    pub async fn consumed(&self) -> i64 {
        sqlx::query_scalar("SELECT COALESCE(sum(next_offset), 0)::int8 FROM partition_progress")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    /// Waits until everything the topic holds now has been consumed and stored: the stored
    /// offsets reach each partition's end. (Counting produced messages is not enough: a
    /// producer retry can write one message twice.)
    pub async fn wait_drained(&self, at_least: u64, timeout: Duration) {
        let (topic, brokers) = (self.topic.clone(), self.brokers.clone());
        let end: i64 = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
            metadata.topics()[0]
                .partitions()
                .iter()
                .map(|p| {
                    consumer
                        .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                        .unwrap()
                        .1
                })
                .sum()
        })
        .await
        .unwrap();
        self.wait_consumed(end.max(at_least as i64), timeout).await;
    }

    /// Waits until every one of `messages` produced messages has been consumed and stored.
    pub async fn wait_consumed(&self, messages: i64, timeout: Duration) {
        let started = Instant::now();
        loop {
            let consumed = self.consumed().await;
            if consumed >= messages {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "only {consumed} of {messages} messages were consumed within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl World {
    /// Takes the database away from under a running daemon: its connections are terminated and
    /// every new one is refused (the database does not exist any more).
    pub async fn drop_database(&self) {
        self.pool.close().await;
        let name = &self.db_url[self.db_url.rfind('/').unwrap() + 1..];
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .unwrap();
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    }
}

/// The store-level pieces a test needs to drive flushes by hand.
pub struct StoreFixture {
    pub store: Store,
    pub rules: IngestRules,
    pub prices: PriceBook,
    pub layout: WindowLayout,
}

impl World {
    /// A migrated store on this world's database, with the rules and prices of its config.
    pub async fn store_fixture(&self) -> StoreFixture {
        let store = Store::connect_lazy(&self.db_url, 2).unwrap();
        store.migrate().await.unwrap();
        let settings = Settings::load(Some(&self.config(""))).unwrap();
        let rules = costwatch::daemon::ingest_rules(&settings);
        StoreFixture {
            store,
            rules,
            prices: PriceBook::from_settings(&settings.pricing),
            layout: WindowLayout::from_rules(&rules),
        }
    }

    /// Every (model, hardware) total and the rejection count equal the generator's ground truth.
    pub async fn assert_totals(&self, expected: &Expected, context: &str) {
        let totals = self.totals().await;
        for t in &expected.totals {
            let got = totals.get(&(t.model.clone(), t.hardware.clone())).copied();
            assert_eq!(
                got,
                Some((t.events as i64, t.compute, t.storage)),
                "{context}: ({}, {})",
                t.model,
                t.hardware
            );
        }
        assert_eq!(totals.len(), expected.totals.len(), "{context}: pairs {totals:?}");
        assert_eq!(
            self.rejected_count().await,
            expected.rejected as i64,
            "{context}: rejections"
        );
    }
}

/// A running `costwatch run`, logging to a file that is printed if the test fails.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_costwatch"))
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,costwatch=debug")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("cannot start costwatch");
        Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
    }

    /// Waits for the process to exit by itself (e.g. an injected abort).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.exit_within(timeout) {
            Some(status) => status,
            None => panic!("costwatch did not exit:\n{}", self.log_text()),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still running.
    pub fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if started.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL: no chance to flush or leave the group.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "costwatch did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address the HTTP listener bound (the tests configure port 0), once the API can
    /// answer: the listener serves from the start (`/healthz`), but the API's queries need
    /// the schema, which is brought up to date after.
    pub async fn http_addr(&self) -> String {
        let addr = self.http_addr_at_start().await;
        self.wait_log("database schema is up to date").await;
        addr
    }

    /// The address the HTTP listener bound, as soon as it listens (before the database is
    /// ready).
    pub async fn http_addr_at_start(&self) -> String {
        let line = self.wait_log("http listening").await;
        line.rsplit("addr=").next().unwrap().trim().to_owned()
    }

    /// Waits for a log line containing `text`; returns the line.
    pub async fn wait_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log_text();
            if let Some(line) = log.lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no log line with {text:?}:\n{log}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- costwatch log ({}) ---\n{}", self.log.display(), self.log_text());
        }
    }
}

/// One well-formed event.
pub fn event(id: &str, ts: &str, model: &str, hardware: &str, compute: &str, storage: &str) -> Message {
    Message {
        key: id.to_owned(),
        payload: format!(
            r#"{{"event_id":"{id}","timestamp":"{ts}","model":"{model}","hardware":"{hardware}","compute":{compute},"storage":{storage}}}"#
        )
        .into_bytes(),
    }
}

pub fn raw(key: &str, payload: impl Into<Vec<u8>>) -> Message {
    Message {
        key: key.to_owned(),
        payload: payload.into(),
    }
}

/// The `time_zone` for a monthly budget in a test that runs from `at` for up to half an hour:
/// UTC, unless a UTC month turns within 30 minutes of `at` (its events and its spend would then
/// fall into two periods); then an hour behind UTC, where the month turned at least half an hour
/// earlier or turns at least half an hour later.
pub fn steady_month_zone(at: chrono::DateTime<chrono::Utc>) -> &'static str {
    use chrono::Datelike;
    let margin = chrono::Duration::minutes(30);
    if (at - margin).month() == (at + margin).month() {
        "UTC"
    } else {
        "Etc/GMT+1"
    }
}

/// An RFC 3339 timestamp `ago` before now.
pub fn ago(ago: Duration) -> String {
    (chrono::Utc::now() - chrono::Duration::from_std(ago).unwrap()).to_rfc3339()
}

pub fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A plain HTTP/1.1 exchange over loopback: (status, body).
pub async fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    try_http(addr, method, path, token, body)
        .await
        .unwrap_or_else(|| panic!("cannot connect to {addr}"))
}

/// As [`http`], but `None` while nothing listens on `addr` yet.
pub async fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<(u16, String)> {
    let authorization = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = authorization.iter().map(|a| ("Authorization", a.as_str())).collect();
    try_http_with(addr, method, path, &headers, body).await
}

/// As [`http`], with any request headers, e.g. `[("Authorization", "bearer ...")]`.
pub async fn http_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    try_http_with(addr, method, path, headers, None)
        .await
        .unwrap_or_else(|| panic!("cannot connect to {addr}"))
}

async fn try_http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: {addr} answered no HTTP status line: {text:?}"));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Some((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}
