//! Sources and formats against the real broker and PostgreSQL: every format sent by an
//! independent producer (Python, `tests/support/produce_sources.py`: vLLM response bodies,
//! LiteLLM CloudEvents, a Collector-style OTLP batch built with opentelemetry-proto's own
//! classes, a billing record, the native contract with tokens), with duplicates, bad input and a
//! `kill -9` in the middle; then a usage profile added afterwards and `costwatch rerate` price
//! the token-only windows.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{dec, World, WAIT_DRAINED};
use costwatch::loadgen;
use rust_decimal::Decimal;
use sqlx::Row;

const WAIT: Duration = Duration::from_secs(60);

/// Formats in the order the producer names them, with the source that reads each.
const FORMATS: [(&str, &str); 6] = [
    ("openai", "vllm"),
    ("cloudevents", "litellm"),
    ("otlp_proto", "traces"),
    ("otlp_json", "traces-json"),
    ("json", "billing"),
    ("costwatch", "native"),
];

/// Messages the producer sends in part 1 and in both parts together.
const PART_1: i64 = 8;
const ALL: i64 = 23;

/// The venv `scripts/test.sh` makes with confluent-kafka and opentelemetry-proto.
fn producer_python() -> PathBuf {
    let python = std::env::var_os("COSTWATCH_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/kafka-venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: scripts/test.sh installs confluent-kafka and opentelemetry-proto into .local/kafka-venv",
        python.display()
    );
    python
}

/// One topic per format, named after the world's topic.
fn topic(world: &World, format: &str) -> String {
    format!("{}-{}", world.topic, format.replace('_', "-"))
}

/// The `[[sources]]`, prices and usage profiles of these tests; `extra_profiles` come first.
fn config(world: &World, extra_profiles: &str) -> PathBuf {
    let t = |f| topic(world, f);
    world.config(&format!(
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

[[pricing.hardware]]
name = "l4"
compute_price = "0.5"
storage_price = "0"

[[pricing.coefficients]]
model = "qwen2-7b-instruct"
hardware = "a100-80g"
k1 = "0.5"
k2 = "0.8"

[[sources]]
name = "vllm"
topic = "{openai}"
format = "openai"
hardware = "a100-80g"

[[sources]]
name = "litellm"
topic = "{cloudevents}"
format = "cloudevents"
hardware = "hw-0"
types = ["litellm_tokens"]
[sources.labels]
team = "/subject"

[[sources]]
name = "traces"
topic = "{otlp_proto}"
format = "otlp_proto"
hardware_attribute = "host.type"
[sources.labels]
service = "service.name"

[[sources]]
name = "traces-json"
topic = "{otlp_json}"
format = "otlp_json"
hardware_attribute = "host.type"

[[sources]]
name = "billing"
topic = "{json}"
format = "json"
hardware_pointer = "/gpu"
timestamp_format = "unix_ms"
[sources.pointers]
event_id = "/request/id"
timestamp = "/at"
model = "/llm/name"
input_tokens = "/usage/in"
output_tokens = "/usage/out"
[sources.labels]
team = "/team"

[[sources]]
name = "native"
topic = "{costwatch}"
format = "costwatch"

{extra_profiles}

[[usage_profiles]]
name = "llama-a100"
model = "meta-llama/*"
hardware = "a100-*"
compute_per_input_token = "0.5"
compute_per_output_token = "2"
storage_per_token = "0.001"

[[usage_profiles]]
model = "*"
hardware = "hw-1"
compute_per_input_token = "0.01"
compute_per_output_token = "0"
storage_per_token = "0"

[[usage_profiles]]
model = "mistral-*"
hardware = "*"
compute_per_input_token = "0.001"
compute_per_output_token = "0.004"
storage_per_token = "0"
"#,
        openai = t("openai"),
        cloudevents = t("cloudevents"),
        otlp_proto = t("otlp_proto"),
        otlp_json = t("otlp_json"),
        json = t("json"),
        costwatch = t("costwatch"),
    ))
}

/// Sends one part of the Python producer's load, every event stamped `ts` (Unix seconds).
fn produce(world: &World, ts: i64, part: u8) {
    let mut command = Command::new(producer_python());
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/produce_sources.py"))
        .args([
            "--brokers",
            &world.brokers,
            "--ts",
            &ts.to_string(),
            "--part",
            &part.to_string(),
        ]);
    for (format, _) in FORMATS {
        command.args(["--topic", &format!("{format}={}", topic(world, format))]);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One (source, model, hardware) as stored: events, tokens, T, S, profile, and what it costs
/// (`None`: unpriced).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Total {
    events: i64,
    input_tokens: Decimal,
    output_tokens: Decimal,
    compute: Decimal,
    storage: Decimal,
    from_tokens: bool,
    profile: Option<String>,
    cost: Option<Decimal>,
}

fn total(events: i64, tokens: (&str, &str), t: &str, s: &str, profile: Option<&str>, cost: Option<&str>) -> Total {
    Total {
        events,
        input_tokens: dec(tokens.0),
        output_tokens: dec(tokens.1),
        compute: dec(t),
        storage: dec(s),
        from_tokens: true,
        profile: profile.map(str::to_owned),
        cost: cost.map(dec),
    }
}

async fn totals(world: &World) -> BTreeMap<(String, String, String), Total> {
    sqlx::query(
        "SELECT source, model, hardware, sum(events)::int8 AS events, sum(input_tokens) AS input_tokens,
                sum(output_tokens) AS output_tokens, sum(compute) AS compute, sum(storage) AS storage,
                bool_and(usage_from_tokens) AS from_tokens, min(profile) AS profile,
                CASE WHEN bool_and(compute_price IS NOT NULL)
                     THEN sum(compute * compute_price * k1 + storage * storage_price * k2) END AS cost
         FROM window_usage GROUP BY source, model, hardware",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        let n = |c: &str| r.get::<Decimal, _>(c).normalize();
        (
            (r.get("source"), r.get("model"), r.get("hardware")),
            Total {
                events: r.get("events"),
                input_tokens: n("input_tokens"),
                output_tokens: n("output_tokens"),
                compute: n("compute"),
                storage: n("storage"),
                from_tokens: r.get("from_tokens"),
                profile: r.get("profile"),
                cost: r.get::<Option<Decimal>, _>("cost").map(|c| c.normalize()),
            },
        )
    })
    .collect()
}

/// What the producer's load must come to, by hand: see the shapes in produce_sources.py.
fn expected() -> BTreeMap<(String, String, String), Total> {
    let key = |s: &str, m: &str, h: &str| (s.to_owned(), m.to_owned(), h.to_owned());
    let llama = "meta-llama/Llama-3.1-8B-Instruct";
    let mut native = total(1, ("800", "200"), "1000", "500", None, Some("130"));
    native.from_tokens = false;
    let mut e = BTreeMap::from([
        // 1200 + 40 prompt, 300 + 10 completion tokens: T = 1240 x 0.5 + 310 x 2, S = 1550 x
        // 0.001; cost 0.1 x 1240 + 0.2 x 1.55.
        (
            key("vllm", llama, "a100-80g"),
            total(2, ("1240", "310"), "1240", "1.55", Some("llama-a100"), Some("124.31")),
        ),
        // No profile for gpt-4o-mini on hw-0: tokens kept, T and S unknown, unpriced.
        (
            key("litellm", "gpt-4o-mini", "hw-0"),
            total(2, ("1300", "350"), "0", "0", None, None),
        ),
        // 1500 + 500 and 250 + 50 tokens: T = 2000 x 0.001 + 300 x 0.004; cost 0.5 x 3.2.
        (
            key("billing", "mistral-7b", "l4"),
            total(2, ("2000", "300"), "3.2", "0", Some("mistral-*@*"), Some("1.6")),
        ),
        (key("native", "qwen2-7b-instruct", "a100-80g"), native),
    ]);
    for source in ["traces", "traces-json"] {
        // 500 x 0.5 + 100 x 2 = 450, 600 x 0.001 = 0.6; cost 45 + 0.12.
        e.insert(
            key(source, llama, "a100-80g"),
            total(1, ("500", "100"), "450", "0.6", Some("llama-a100"), Some("45.12")),
        );
        // 64 x 0.01 = 0.64; cost 0.00025 x 0.64.
        e.insert(
            key(source, "text-embedding-3-small", "hw-1"),
            total(1, ("64", "0"), "0.64", "0", Some("*@hw-1"), Some("0.00016")),
        );
        e.insert(
            key(source, "qwen2-7b-instruct", "hw-1"),
            total(1, ("10", "20"), "0.1", "0", Some("*@hw-1"), Some("0.000025")),
        );
    }
    e
}

/// Rejected messages per source, with their reasons in offset order per topic.
async fn rejections(world: &World) -> BTreeMap<String, Vec<String>> {
    let mut by_source: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in sqlx::query("SELECT source, reason_code FROM rejected_events ORDER BY source, partition, kafka_offset")
        .fetch_all(&world.pool)
        .await
        .unwrap()
    {
        by_source
            .entry(r.get::<Option<String>, _>("source").unwrap_or_default())
            .or_default()
            .push(r.get("reason_code"));
    }
    for reasons in by_source.values_mut() {
        reasons.sort();
    }
    by_source
}

/// The current minute minus ten, so every event is well inside the accepted age.
fn event_time() -> i64 {
    let now = chrono::Utc::now().timestamp();
    now - now % 60 - 600
}

#[tokio::test(flavor = "multi_thread")]
async fn every_format_from_an_independent_producer_counts_exactly_across_a_kill() {
    let world = World::new(1).await;
    for (format, _) in FORMATS {
        loadgen::ensure_topic(&world.brokers, &topic(&world, format), 2)
            .await
            .unwrap();
    }
    let config = config(&world, "");
    let ts = event_time();
    produce(&world, ts, 1);
    let mut daemon = world.start(&config);
    // Part 1 (each source's first messages, the non-GenAI spans and a filtered CloudEvent
    // among them) is counted, then costwatch dies without a word.
    world.wait_consumed(PART_1, WAIT_DRAINED).await;
    daemon.kill9();
    // Part 2 re-sends copies of part 1 (whole OTLP batches included) beside new and bad input.
    produce(&world, ts, 2);
    let mut daemon = world.start(&config);
    world.wait_consumed(ALL, WAIT_DRAINED).await;

    let got = totals(&world).await;
    let want = expected();
    for (key, expected) in &want {
        assert_eq!(got.get(key), Some(expected), "{key:?}");
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
    let reasons = |rs: &[&str]| rs.iter().map(|r| r.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rejections(&world).await,
        BTreeMap::from([
            ("billing".to_owned(), reasons(&["negative_value"])),
            ("litellm".to_owned(), reasons(&["invalid_timestamp"])),
            ("traces".to_owned(), reasons(&["malformed_json", "missing_field"])),
            ("traces-json".to_owned(), reasons(&["malformed_json"])),
            ("vllm".to_owned(), reasons(&["malformed_json", "missing_field"])),
        ])
    );
    // Labels from pointers and from resource attributes.
    let labels: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT labels::text FROM window_usage WHERE source IN ('litellm', 'traces', 'billing') ORDER BY 1",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert_eq!(
        labels,
        [
            r#"{"service": "chat-api"}"#,
            r#"{"service": "rag"}"#,
            r#"{"team": "ads"}"#,
            r#"{"team": "team-search"}"#
        ]
    );
    assert!(daemon.terminate(WAIT).success());

    a_profile_added_afterwards_and_rerate_price_the_token_only_windows(&world, ts).await;
}

/// Part of the test above (it needs its history): the LiteLLM windows were token-only and
/// unpriced; a profile for them plus `costwatch rerate` derive T and S from the stored tokens.
async fn a_profile_added_afterwards_and_rerate_price_the_token_only_windows(world: &World, ts: i64) {
    let with_profile = config(
        world,
        r#"
[[usage_profiles]]
name = "gpt-4o"
model = "gpt-4o-*"
hardware = "hw-*"
compute_per_input_token = "0.0001"
compute_per_output_token = "0.0004"
storage_per_token = "0.00001"
"#,
    );
    let day = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(["--config", with_profile.to_str().unwrap()])
        .args(["rerate", "--from", &day(ts), "--to", &day(ts + 86_400)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = totals(world).await;
    // T = 1300 x 0.0001 + 350 x 0.0004 = 0.27, S = 1650 x 0.00001 = 0.0165;
    // cost 0.0004 x 0.27 + 0.00002 x 0.0165.
    assert_eq!(
        got[&("litellm".into(), "gpt-4o-mini".into(), "hw-0".into())],
        total(2, ("1300", "350"), "0.27", "0.0165", Some("gpt-4o"), Some("0.00010833"))
    );
    // Everything else was priced already and stays exactly as it was.
    let mut want = expected();
    want.remove(&("litellm".into(), "gpt-4o-mini".into(), "hw-0".into()));
    for (key, expected) in &want {
        assert_eq!(got.get(key), Some(expected), "{key:?}");
    }
    // The hourly roll-up moved with the raw rows.
    let hourly: (Decimal, Decimal, Option<String>) =
        sqlx::query_as("SELECT sum(compute), sum(storage), min(profile) FROM usage_hourly WHERE source = 'litellm'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(
        (hourly.0.normalize(), hourly.1.normalize(), hourly.2.as_deref()),
        (dec("0.27"), dec("0.0165"), Some("gpt-4o"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn loadgen_loads_in_every_mapped_format_are_counted_exactly() {
    use costwatch::config::SourceFormat;
    use costwatch::loadgen::{formats, LoadSpec};
    let world = World::new(1).await;
    let mut sources = String::new();
    let mut loads = Vec::new();
    for (i, format) in SourceFormat::ALL
        .into_iter()
        .filter(|f| *f != SourceFormat::Costwatch)
        .enumerate()
    {
        let topic = topic(&world, format.as_str());
        loadgen::ensure_topic(&world.brokers, &topic, 3).await.unwrap();
        let spec = LoadSpec {
            count: 1_500,
            seed: 180 + i as u64,
            models: 3,
            hardware: 2,
            rate: 0,
            duplicates: 0.05,
            late: 0.02,
            malformed: 0.03,
            hostile: 0.0,
            late_by: Duration::from_secs(600),
            span: Duration::from_secs(600),
            end: chrono::Utc::now(),
        };
        let (messages, expected) = loadgen::generate_in(&spec, format);
        let brokers = world.brokers.clone();
        let to = topic.clone();
        tokio::task::spawn_blocking(move || loadgen::send(&brokers, &to, &messages, 0))
            .await
            .unwrap()
            .unwrap();
        let name = format.as_str().replace('_', "-");
        sources.push_str(&formats::source_toml(format, &name, &topic));
        loads.push((name, expected));
    }
    // T = input + 2 x output, S = (input + output) / 2, for every pair.
    let config = world.config(&format!(
        "{sources}\n[[usage_profiles]]\nmodel = \"*\"\nhardware = \"*\"\ncompute_per_input_token = \"1\"\n\
         compute_per_output_token = \"2\"\nstorage_per_token = \"0.5\"\n"
    ));
    let mut daemon = world.start(&config);
    let messages: u64 = loads.iter().map(|(_, e)| e.messages).sum();
    world.wait_consumed(messages as i64, WAIT_DRAINED).await;
    let got = totals(&world).await;
    for (source, expected) in &loads {
        for t in &expected.totals {
            let want = Total {
                events: t.events as i64,
                input_tokens: t.input_tokens,
                output_tokens: t.output_tokens,
                compute: (t.input_tokens + t.output_tokens * dec("2")).normalize(),
                storage: ((t.input_tokens + t.output_tokens) * dec("0.5")).normalize(),
                from_tokens: true,
                profile: Some("*@*".into()),
                cost: None,
            };
            let key = (source.clone(), t.model.clone(), t.hardware.clone());
            let got = got.get(&key).map(|g| Total {
                cost: None,
                ..g.clone()
            });
            assert_eq!(got, Some(want), "{key:?}");
        }
        let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM rejected_events WHERE source = $1")
            .bind(source)
            .fetch_one(&world.pool)
            .await
            .unwrap();
        assert_eq!(rejected, expected.rejected as i64, "{source}: rejections");
    }
    assert!(daemon.terminate(WAIT).success());
}

#[test]
fn check_config_names_every_source_and_profile_problem_by_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("costwatch.toml");
    std::fs::write(
        &path,
        r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "costwatch"

[database]
url = "postgres://postgres@127.0.0.1:5432/costwatch"

[pricing]
currency = "USD"

[[sources]]
name = "vllm"
topic = "vllm-responses"
format = "openai"
[sources.pointers]
model = "model"

[[sources]]
name = "traces"
topic = "vllm-responses"
format = "otlp_proto"
hardware_pointer = "/hw"

[[usage_profiles]]
model = "*"
hardware = "*"
compute_per_input_token = "-1"
compute_per_output_token = "0"
storage_per_token = "0"
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "error: invalid configuration:\n  \
         - sources[0].hardware: set exactly one of hardware, hardware_pointer, hardware_attribute\n  \
         - sources[0].pointers.model: \"model\" is not an RFC 6901 JSON Pointer such as \"/usage/prompt_tokens\"\n  \
         - sources[1].hardware_pointer: the otlp_proto format reads attributes; use hardware_attribute\n  \
         - sources[1].topic: \"vllm-responses\" is read by two sources; one topic has one format\n  \
         - usage_profiles[0].compute_per_input_token: must not be negative"
    );
}
