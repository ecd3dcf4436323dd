//! Budgets and alerts end to end: the real broker and PostgreSQL, a real Alertmanager (Debian's
//! `prometheus-alertmanager`) routing to a webhook receiver run by the test, and costwatch's own
//! signed webhooks to the same receiver.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use chrono::Utc;
use common::{event, http, steady_month_zone, World};
use costwatch::alerting::budget::{period_bounds, AlertKind, AlertSpec};
use costwatch::alerting::store as alert_store;
use costwatch::config::Period;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const SECRET: &str = "test-secret-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(90);

/// What the test's HTTP receiver got: Alertmanager's notifications on `/am`, costwatch's
/// webhooks on `/hook`.
#[derive(Clone, Default)]
struct Inbox {
    received: Arc<Mutex<Vec<Received>>>,
    /// While set, every request is answered 503 (and not recorded as received).
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

/// One alert in an Alertmanager notification: its status, labels and annotations.
type Notified = (String, BTreeMap<String, String>, BTreeMap<String, String>);

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Inbox {
    async fn start() -> (Inbox, String) {
        let inbox = Inbox::default();
        let app = axum::Router::new().fallback(receive).with_state(inbox.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (inbox, addr)
    }

    fn on(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Alertmanager notifications, flattened to (status, labels) per alert in them.
    fn am_alerts(&self) -> Vec<Notified> {
        self.on("/am")
            .iter()
            .flat_map(|r| {
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                body["alerts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| {
                        (
                            a["status"].as_str().unwrap().to_owned(),
                            serde_json::from_value(a["labels"].clone()).unwrap(),
                            serde_json::from_value(a["annotations"].clone()).unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// costwatch webhooks as (status, alert labels), after checking each one's signature.
    fn hooks(&self) -> Vec<(String, BTreeMap<String, String>, Value)> {
        self.on("/hook")
            .iter()
            .map(|r| {
                let signature = r.headers["x-costwatch-signature"].to_str().unwrap();
                let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                mac.update(&r.body);
                let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                assert_eq!(signature, want, "webhook signature");
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                let delivery = r.headers["x-costwatch-delivery"].to_str().unwrap();
                assert_eq!(body["delivery_id"].to_string(), delivery);
                (
                    body["status"].as_str().unwrap().to_owned(),
                    serde_json::from_value(body["alert"]["labels"].clone()).unwrap(),
                    body,
                )
            })
            .collect()
    }
}

async fn receive(State(inbox): State<Inbox>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    if inbox.failing.load(Ordering::SeqCst) {
        inbox.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    inbox.received.lock().unwrap().push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    StatusCode::OK
}

/// A real Alertmanager on `port`, every alert in a group of its own, notifying `/am`.
struct Alertmanager {
    child: Child,
    log: PathBuf,
}

impl Alertmanager {
    async fn start(dir: &std::path::Path, port: u16, receiver: &str) -> Alertmanager {
        let config = dir.join(format!("alertmanager-{port}.yml"));
        std::fs::write(
            &config,
            format!(
                r#"
route:
  receiver: test
  group_by: ['...']
  group_wait: 1s
  group_interval: 2s
  repeat_interval: 4h
receivers:
  - name: test
    webhook_configs:
      - url: http://{receiver}/am
        send_resolved: true
"#
            ),
        )
        .unwrap();
        let storage = dir.join(format!("alertmanager-data-{port}"));
        let log = dir.join(format!("alertmanager-{port}.log"));
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", storage.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus-alertmanager (Debian package) must be installed; scripts/test.sh installs it");
        let am = Alertmanager { child, log };
        let addr = format!("127.0.0.1:{port}");
        wait_until("alertmanager ready", Duration::from_secs(30), || async {
            common::try_http(&addr, "GET", "/-/ready", None, None)
                .await
                .is_some_and(|(s, _)| s == 200)
        })
        .await;
        am
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- alertmanager log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One test's setting: a world, the receiver, and a config with `budgets` whose alerts go to
/// Alertmanager on `am_port` (running, or not yet) and to the signed webhook.
struct Scene {
    world: World,
    inbox: Inbox,
    receiver: String,
    am_port: u16,
    config: PathBuf,
    am: Option<Alertmanager>,
}

impl Scene {
    async fn start(partitions: i32, alertmanager: bool, budgets: &str) -> Scene {
        let world = World::new(partitions).await;
        let (inbox, receiver) = Inbox::start().await;
        let am_port = free_port();
        let am = match alertmanager {
            true => Some(Alertmanager::start(world.dir.path(), am_port, &receiver).await),
            false => None,
        };
        // Events stamped up to minutes before now, and the spends asserted over the test, fall
        // into one monthly period only if the month does not turn meanwhile: monthly budgets
        // are kept in a time zone where it does not (UTC, unless its month turns within half an
        // hour of now). A scene's monthly budget therefore sets no `time_zone` of its own.
        let budgets = budgets.replace(
            "period = \"monthly\"\n",
            &format!(
                "period = \"monthly\"\ntime_zone = \"{}\"\n",
                steady_month_zone(Utc::now())
            ),
        );
        let config = world.config(&format!("{}{budgets}", alerting_toml(am_port, &receiver)));
        Scene {
            world,
            inbox,
            receiver,
            am_port,
            config,
            am,
        }
    }
}

/// The `[alerting]` section plus one webhook to the test receiver.
fn alerting_toml(am_port: u16, receiver: &str) -> String {
    format!(
        r#"
[windows]
size = "10s"
allowed_lateness = "1m"

[alerting]
evaluation_interval = "1s"
alertmanager_url = "http://127.0.0.1:{am_port}"
forecast_short_window = "20s"
forecast_long_window = "40s"

[[alerting.webhooks]]
name = "test-hook"
url = "http://{receiver}/hook"
secret = "{SECRET}"
"#
    )
}

/// One event of cost 130 (the brief's worked example) at the current time.
fn priced_event(id: &str) -> costwatch::loadgen::Message {
    event(
        id,
        &Utc::now().to_rfc3339(),
        "qwen2-7b-instruct",
        "a100-80g",
        "1000",
        "500",
    )
}

async fn budgets(addr: &str) -> Value {
    let (status, body) = http(addr, "GET", "/api/v1/budgets", None, None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn wait_spend(addr: &str, budget: usize, spend: &str) {
    wait_until(&format!("budget spend {spend}"), WAIT, || async {
        budgets(addr).await["budgets"][budget]["spend"] == spend
    })
    .await;
}

async fn alert_rows(world: &World) -> Vec<(String, String, i32)> {
    sqlx::query_as("SELECT alert_key, state, generation FROM budget_alert ORDER BY alert_key")
        .fetch_all(&world.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_threshold_crossing_pages_exactly_once_even_across_a_restart() {
    let Scene {
        world,
        inbox,
        config,
        am: _am,
        ..
    } = Scene::start(
        2,
        true,
        r#"
[[budgets]]
name = "team-a"
period = "monthly"
amount = "1000"
match = { model = "qwen2-*" }
thresholds = [0.5]
"#,
    )
    .await;
    let mut daemon = world.start(&config);
    let addr = daemon.http_addr().await;

    // 3 x 130 = 390: 39% of the budget, below the threshold.
    world
        .produce((0..3).map(|i| priced_event(&format!("a{i}"))).collect())
        .await;
    wait_spend(&addr, 0, "390").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        inbox.am_alerts().is_empty() && inbox.hooks().is_empty(),
        "nothing crossed yet"
    );

    // One more: 520, 52%.
    world.produce(vec![priced_event("a3")]).await;
    wait_until("the threshold notification", WAIT, || async {
        !inbox.am_alerts().is_empty() && !inbox.hooks().is_empty()
    })
    .await;
    let status = budgets(&addr).await;
    assert_eq!(status["budgets"][0]["spend"], "520");
    assert_eq!(status["budgets"][0]["utilization"], "0.52");
    assert_eq!(status["budgets"][0]["thresholds_reached"], serde_json::json!(["0.5"]));
    assert_eq!(status["budgets"][0]["state"], "warning");
    assert_eq!(status["leader"], true);

    let (state, labels, annotations) = inbox.am_alerts()[0].clone();
    assert_eq!(state, "firing");
    assert_eq!(labels["alertname"], "CostwatchBudgetThreshold");
    assert_eq!(labels["budget"], "team-a");
    assert_eq!(labels["kind"], "threshold");
    assert_eq!(labels["threshold"], "0.5");
    assert_eq!(labels["severity"], "page");
    assert_eq!(
        annotations["summary"],
        "Budget team-a has used 52% of 1000 USD this period (520 USD spent; threshold 50%)"
    );
    assert_eq!(annotations["spend"], "520");
    let hooks = inbox.hooks();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].0, "firing");
    assert_eq!(hooks[0].1, labels);

    // Restart while the alert fires: the new process re-sends it to Alertmanager (same labels,
    // same startsAt) and neither Alertmanager nor the webhook notifies again.
    daemon.kill9();
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    wait_until("the restarted instance to lead", WAIT, || async {
        budgets(&addr).await["leader"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(inbox.am_alerts().len(), 1, "{:?}", inbox.am_alerts());
    assert_eq!(inbox.hooks().len(), 1);
    let rows = alert_rows(&world).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("firing", 1));
    // The same from the command line, for whoever is on call without the API at hand.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_costwatch"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let budgets_text = cli(&["budgets"]);
    assert!(
        budgets_text.starts_with("team-a: 520 of 1000 USD (52%) this monthly period, "),
        "{budgets_text}"
    );
    assert!(budgets_text.contains("  thresholds reached: 0.5\n"), "{budgets_text}");
    let alerts_text = cli(&["alerts", "--state", "firing"]);
    assert!(
        alerts_text.starts_with("firing since ")
            && alerts_text
                .ends_with(": Budget team-a has used 52% of 1000 USD this period (520 USD spent; threshold 50%)\n"),
        "{alerts_text}"
    );
    let (status, body) = http(&addr, "GET", "/api/v1/alerts?state=firing", None, None).await;
    assert_eq!(status, 200);
    let alerts: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(alerts["items"][0]["labels"]["threshold"], "0.5");
    assert_eq!(alerts["items"][0]["pending_deliveries"], 0);
    assert_eq!(alerts["items"][0]["alertmanager_pending"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forecast_alert_fires_on_a_burn_and_resolves_when_it_stops() {
    // Whichever calendar period has more time left, so that the projection is far above the
    // amount whatever day the test runs.
    let now = Utc::now();
    let period = [Period::Monthly, Period::Weekly]
        .into_iter()
        .max_by_key(|p| period_bounds(*p, chrono_tz::UTC, now).1)
        .unwrap();
    let period = serde_json::to_value(period).unwrap();
    let Scene {
        world,
        inbox,
        config,
        am: _am,
        ..
    } = Scene::start(
        1,
        true,
        &format!(
            r#"
[[budgets]]
name = "burn"
period = {period}
amount = "1000"
thresholds = []
forecast = true
severity = "ticket"
"#
        ),
    )
    .await;
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;

    world.produce(vec![priced_event("f1")]).await;
    wait_until("the forecast alert", WAIT, || async {
        inbox.am_alerts().iter().any(|a| a.0 == "firing") && !inbox.hooks().is_empty()
    })
    .await;
    let (_, labels, annotations) = inbox.am_alerts()[0].clone();
    assert_eq!(labels["alertname"], "CostwatchBudgetForecast");
    assert_eq!(labels["kind"], "forecast");
    assert_eq!(labels["severity"], "ticket");
    assert!(
        annotations["summary"].starts_with("Budget burn is projected to reach "),
        "{annotations:?}"
    );
    let forecast: rust_decimal::Decimal = annotations["forecast"].parse().unwrap();
    assert!(forecast > common::dec("1000"), "{forecast}");

    // No more spend: once the event leaves the 20 s short window the projection falls back to
    // the 130 spent, and the alert resolves — at Alertmanager and at the webhook.
    wait_until("the forecast to resolve", WAIT, || async {
        inbox.am_alerts().iter().any(|a| a.0 == "resolved") && inbox.hooks().iter().any(|h| h.0 == "resolved")
    })
    .await;
    let status = budgets(&addr).await;
    assert_eq!(status["budgets"][0]["forecast"], "130");
    assert_eq!(status["budgets"][0]["state"], "ok");
    let statuses: Vec<String> = inbox.hooks().into_iter().map(|h| h.0).collect();
    assert_eq!(statuses, vec!["firing", "resolved"]);
    let rows = alert_rows(&world).await;
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("resolved", 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drift_alert_fires_on_a_jump_and_unpriced_usage_alerts_on_its_own() {
    // The baseline reaches five minutes back: the budget's month must not turn within them
    // (the scene's monthly budgets are kept where it does not).
    let Scene {
        world,
        inbox,
        config,
        am: _am,
        ..
    } = Scene::start(
        2,
        true,
        r#"
[[budgets]]
name = "drifty"
period = "monthly"
amount = "1000000"
thresholds = []
drift = { factor = 3, window = "30s", baseline = "5m", min_spend = "1" }
"#,
    )
    .await;
    // A steady baseline over the last five minutes: 0.5 every 30 s.
    let now = Utc::now();
    let mut baseline = Vec::new();
    for i in 0..9 {
        let ts = (now - chrono::Duration::seconds(60 + 30 * i)).to_rfc3339();
        baseline.push(event(&format!("b{i}"), &ts, "qwen2-7b-instruct", "a100-80g", "10", "0"));
    }
    world.produce(baseline).await;
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    wait_spend(&addr, 0, "4.5").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(inbox.am_alerts().is_empty(), "a steady baseline does not drift");

    // The jump: 2 x 130 within the recent window, and one event on hardware without a price.
    world
        .produce(vec![
            priced_event("j1"),
            priced_event("j2"),
            event("u1", &Utc::now().to_rfc3339(), "qwen2-72b", "tpu-v9", "5", "5"),
        ])
        .await;
    wait_until("the drift and unpriced alerts", WAIT, || async {
        let kinds: Vec<String> = inbox.am_alerts().iter().map(|a| a.1["kind"].clone()).collect();
        kinds.contains(&"drift".to_owned()) && kinds.contains(&"unpriced".to_owned())
    })
    .await;
    let alerts = inbox.am_alerts();
    let drift = alerts.iter().find(|a| a.1["kind"] == "drift").unwrap();
    assert_eq!(drift.1["alertname"], "CostwatchBudgetDrift");
    assert!(
        drift.2["summary"].starts_with("Spend rate of budget drifty jumped to "),
        "{:?}",
        drift.2
    );
    let status = budgets(&addr).await;
    let ratio: rust_decimal::Decimal = status["budgets"][0]["drift"]["ratio"]
        .as_str()
        .map(|r| r.parse().unwrap())
        .unwrap_or(rust_decimal::Decimal::MAX);
    assert!(ratio > common::dec("3"), "{status}");
    let unpriced = alerts.iter().find(|a| a.1["kind"] == "unpriced").unwrap();
    assert_eq!(unpriced.1["alertname"], "CostwatchBudgetUnpriced");
    assert_eq!(unpriced.1["model"], "qwen2-72b");
    assert_eq!(unpriced.1["hardware"], "tpu-v9");
    assert_eq!(unpriced.1["severity"], "warning");
    assert_eq!(
        unpriced.2["summary"],
        "Budget drifty cannot be trusted: 1 events of qwen2-72b on tpu-v9 have no price this period"
    );
    assert_eq!(status["budgets"][0]["unpriced"][0]["events"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_outage_delays_the_notification_but_does_not_lose_it() {
    let Scene {
        world,
        inbox,
        receiver,
        am_port,
        config,
        am: _am,
    } = Scene::start(
        2,
        false,
        r#"
[[budgets]]
name = "outage"
period = "monthly"
amount = "100"
thresholds = [1.0]
"#,
    )
    .await;
    inbox.failing.store(true, Ordering::SeqCst);
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    world.produce(vec![priced_event("o1")]).await;

    wait_until("failed delivery attempts", WAIT, || async {
        let (_, body) = http(&addr, "GET", "/api/v1/alerts", None, None).await;
        let alerts: Value = serde_json::from_str(&body).unwrap();
        inbox.refused.load(Ordering::SeqCst) >= 2
            && alerts["items"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("test-hook answered 503"))
            && alerts["items"][0]["alertmanager_pending"] == true
    })
    .await;
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains(r#"costwatch_alert_notifications_total{receiver="alertmanager",outcome="error"}"#),
        "{metrics}"
    );
    assert!(inbox.am_alerts().is_empty() && inbox.hooks().is_empty());

    // Both receivers come back: each gets the notification, once.
    inbox.failing.store(false, Ordering::SeqCst);
    let _am = Alertmanager::start(world.dir.path(), am_port, &receiver).await;
    wait_until("the delayed notifications", WAIT, || async {
        !inbox.am_alerts().is_empty() && !inbox.hooks().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let am = inbox.am_alerts();
    assert_eq!(am.len(), 1, "{am:?}");
    assert_eq!(am[0].1["budget"], "outage");
    assert_eq!(am[0].1["threshold"], "1");
    assert_eq!(inbox.hooks().len(), 1);
    let (_, body) = http(&addr, "GET", "/api/v1/alerts", None, None).await;
    let alerts: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(alerts["items"][0]["pending_deliveries"], 0);
    assert_eq!(alerts["items"][0]["last_error"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_never_both_send_and_the_survivor_takes_over() {
    let Scene {
        world,
        inbox,
        config,
        am: _am,
        ..
    } = Scene::start(
        2,
        true,
        r#"
[[budgets]]
name = "shared"
period = "monthly"
amount = "1000"
thresholds = [0.1, 0.3]
"#,
    )
    .await;
    let mut daemons = [world.start(&config), world.start(&config)];
    let addrs = [daemons[0].http_addr().await, daemons[1].http_addr().await];
    wait_until("exactly one leader", WAIT, || async {
        let a = budgets(&addrs[0]).await["leader"] == true;
        let b = budgets(&addrs[1]).await["leader"] == true;
        a != b
    })
    .await;

    world.produce(vec![priced_event("s1")]).await; // 130: 13%
    wait_until("the first notification", WAIT, || async {
        !inbox.am_alerts().is_empty() && !inbox.hooks().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(inbox.am_alerts().len(), 1);
    assert_eq!(inbox.hooks().len(), 1);

    // The leader dies; the other instance takes the lock and sends the next crossing, once.
    let leader = if budgets(&addrs[0]).await["leader"] == true {
        0
    } else {
        1
    };
    daemons[leader].kill9();
    let survivor = &addrs[1 - leader];
    wait_until("the survivor to lead", WAIT, || async {
        budgets(survivor).await["leader"] == true
    })
    .await;
    // tansu 0.6 hands a dead member's partitions over only when a member joins after the dead
    // one's session expired (see README): let a third instance join then, and more if the
    // stream still does not move. None of them may lead.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut others = vec![world.start(&config)];
    world.produce(vec![priced_event("s2"), priced_event("s3")]).await; // 390: 39%
    let mut since = Instant::now();
    while world.consumed().await < 3 {
        if since.elapsed() > Duration::from_secs(20) && others.len() < 3 {
            others.push(world.start(&config));
            since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_until("the second notification", WAIT, || async {
        inbox.hooks().len() >= 2 && inbox.am_alerts().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for other in &others {
        assert_eq!(budgets(&other.http_addr().await).await["leader"], false);
    }
    let thresholds: Vec<String> = inbox.hooks().iter().map(|h| h.1["threshold"].clone()).collect();
    assert_eq!(thresholds, vec!["0.1", "0.3"]);
    let mut am: Vec<String> = inbox.am_alerts().iter().map(|a| a.1["threshold"].clone()).collect();
    am.sort();
    assert_eq!(am, vec!["0.1", "0.3"]);
}

/// The state machine alone, against PostgreSQL: each transition queues exactly one
/// notification per webhook, and re-evaluating an unchanged state queues nothing.
#[tokio::test(flavor = "multi_thread")]
async fn transitions_queue_one_notification_each() {
    let world = World::new(1).await;
    let fixture = world.store_fixture().await;
    let mut conn = fixture.store.lock_session().await.unwrap();
    assert!(
        alert_store::try_lock(&mut conn).await.unwrap(),
        "nobody else leads this database"
    );
    let mut other = fixture.store.lock_session().await.unwrap();
    assert!(
        !alert_store::try_lock(&mut other).await.unwrap(),
        "a second session must not get the lock"
    );
    // The lock is the session's: when the leader's session ends, another one gets it.
    let mut labels = BTreeMap::new();
    labels.insert("alertname".to_owned(), "CostwatchBudgetDrift".to_owned());
    labels.insert("budget".to_owned(), "b".to_owned());
    labels.insert("kind".to_owned(), "drift".to_owned());
    let spec = AlertSpec {
        key: costwatch::alerting::budget::alert_key(&labels),
        budget: "b".into(),
        kind: AlertKind::Drift,
        labels,
        annotations: BTreeMap::new(),
    };
    let receivers = vec!["one".to_owned(), "two".to_owned()];
    let now = Utc::now();
    let mut steps = Vec::new();
    for desired in [
        vec![spec.clone()],
        vec![spec.clone()],
        vec![],
        vec![],
        vec![spec.clone()],
    ] {
        let t = alert_store::apply_transitions(&mut conn, &desired, &receivers, now)
            .await
            .unwrap();
        steps.push(t.iter().map(|t| (t.status, t.generation)).collect::<Vec<_>>());
    }
    assert_eq!(
        steps,
        vec![
            vec![("firing", 1)],
            vec![],
            vec![("resolved", 1)],
            vec![],
            vec![("firing", 2)]
        ]
    );
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !alert_store::try_lock(&mut other).await.unwrap() {
        assert!(Instant::now() < deadline, "the lock outlived its session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT receiver, status, generation FROM alert_delivery ORDER BY id")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    let want: Vec<(String, String, i32)> = [("firing", 1), ("resolved", 1), ("firing", 2)]
        .iter()
        .flat_map(|(s, g)| receivers.iter().map(move |r| (r.clone(), s.to_string(), *g)))
        .collect();
    assert_eq!(deliveries, want);
}

/// One event of cost 130 at the current time, labelled `tenant` (none when `tenant` is empty).
fn tenant_event(id: &str, tenant: &str) -> costwatch::loadgen::Message {
    let labels = match tenant {
        "" => String::new(),
        t => format!(r#","labels":{{"tenant":"{t}","env":"prod"}}"#),
    };
    common::raw(
        id,
        format!(
            r#"{{"event_id":"{id}","timestamp":"{}","model":"qwen2-7b-instruct","hardware":"a100-80g","compute":1000,"storage":500{labels}}}"#,
            Utc::now().to_rfc3339()
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_split_budget_pages_once_for_the_tenant_that_crossed_and_not_for_the_others() {
    let Scene {
        world,
        inbox,
        config,
        am: _am,
        ..
    } = Scene::start(
        2,
        true,
        r#"
[metrics]
max_label_values = 1

[[budgets]]
name = "per-team"
period = "monthly"
amount = "300"
match = { model = "qwen2-*", labels = { tenant = "search-*" } }
split_by = ["tenant"]
thresholds = [0.5]
"#,
    )
    .await;
    let mut daemon = world.start(&config);
    let addr = daemon.http_addr().await;

    // search-a: 2 x 130 = 260 (87%, past 50%); search-b: 130 (43%); ads-x is outside the glob
    // and the unlabelled event has no tenant: neither is in any split, whatever they cost.
    let mut events = vec![
        tenant_event("sa0", "search-a"),
        tenant_event("sb0", "search-b"),
        tenant_event("none0", ""),
    ];
    events.extend((0..5).map(|i| tenant_event(&format!("ads{i}"), "ads-x")));
    world.produce(events).await;
    world.wait_consumed(8, WAIT).await;
    wait_until("both splits", WAIT, || async {
        budgets(&addr).await["budgets"].as_array().unwrap().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        inbox.am_alerts().is_empty() && inbox.hooks().is_empty(),
        "nobody crossed yet"
    );

    world.produce(vec![tenant_event("sa1", "search-a")]).await;
    wait_until("the threshold notification", WAIT, || async {
        !inbox.am_alerts().is_empty() && !inbox.hooks().is_empty()
    })
    .await;
    let status = budgets(&addr).await;
    let splits: Vec<(Value, Value, Value)> = status["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["split"].clone(), b["spend"].clone(), b["state"].clone()))
        .collect();
    assert_eq!(
        splits,
        vec![
            (
                serde_json::json!({"tenant": "search-a"}),
                "260".into(),
                "warning".into()
            ),
            (serde_json::json!({"tenant": "search-b"}), "130".into(), "ok".into()),
        ]
    );

    let (state, labels, annotations) = inbox.am_alerts()[0].clone();
    assert_eq!(state, "firing");
    assert_eq!(labels["budget"], "per-team");
    assert_eq!(labels["tenant"], "search-a");
    assert_eq!(
        annotations["summary"],
        "Budget per-team (tenant=search-a) has used 86.7% of 300 USD this period (260 USD spent; threshold 50%)"
    );
    let hooks = inbox.hooks();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].1, labels);
    assert_eq!(hooks[0].2["alert"]["labels"]["tenant"], "search-a");

    // Gauges per split, within metrics.max_label_values = 1: the first split keeps its name,
    // the other is reported as `other`.
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains(r#"costwatch_budget_spend{budget="per-team",tenant="search-a"} 260"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"costwatch_budget_spend{budget="per-team",tenant="other"} 130"#),
        "{metrics}"
    );

    // kill -9 while it fires: the restarted instance neither pages again nor pages search-b.
    daemon.kill9();
    let daemon = world.start(&config);
    let addr = daemon.http_addr().await;
    wait_until("the restarted instance to lead", WAIT, || async {
        budgets(&addr).await["leader"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let am = inbox.am_alerts();
    assert_eq!(am.len(), 1, "{am:?}");
    assert_eq!(inbox.hooks().len(), 1);
    let rows = alert_rows(&world).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].0.contains("tenant=search-a"), "{rows:?}");
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("firing", 1));
    let (globs, split_by): (Value, Vec<String>) =
        sqlx::query_as("SELECT label_globs, split_by FROM budget WHERE name = 'per-team'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(globs, serde_json::json!({"tenant": "search-*"}));
    assert_eq!(split_by, vec!["tenant".to_owned()]);
}
