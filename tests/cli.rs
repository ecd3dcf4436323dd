//! The command line as a user meets it: the estimate breakdown and configuration errors.

use std::process::{Command, Output};

fn costwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(args)
        .env_remove("COSTWATCH_CONFIG")
        .output()
        .expect("cannot run costwatch")
}

const WORKED: [&str; 13] = [
    "estimate",
    "--compute",
    "1000",
    "--storage",
    "500",
    "--compute-price",
    "0.1",
    "--storage-price",
    "0.2",
    "--k1",
    "0.5",
    "--k2",
    "0.8",
];

#[test]
fn estimate_prints_the_worked_example_breakdown() {
    let out = costwatch(&WORKED);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        "compute  50 = C_C 0.1 x k1 0.5 x T 1000\nstorage  80 = C_S 0.2 x k2 0.8 x S 500\ntotal    130\n"
    );
}

#[test]
fn estimate_json_uses_decimal_strings() {
    let mut args = WORKED.to_vec();
    args.push("--json");
    let out = costwatch(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["compute_cost"], "50");
    assert_eq!(json["storage_cost"], "80");
    assert_eq!(json["total_cost"], "130");
    assert_eq!(json["k1"], "0.5");
    assert_eq!(json["compute"], "1000");
}

#[test]
fn estimate_reads_the_price_book() {
    let out = costwatch(&[
        "estimate",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"),
        "--model",
        "qwen2-7b-instruct",
        "--hardware",
        "a100-80g",
        "--compute",
        "1000",
        "--storage",
        "500",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["total_cost"], "130");
    assert_eq!(json["currency"], "USD");
}

#[test]
fn estimate_refuses_unpriced_hardware_with_a_reason() {
    let out = costwatch(&[
        "estimate",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"),
        "--model",
        "m",
        "--hardware",
        "tpu-v9",
        "--compute",
        "1",
        "--storage",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "error: hardware tpu-v9 has no price in the price book (pricing.hardware), so its usage is unpriced"
    );
}

#[test]
fn an_invalid_configuration_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let good = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml")).unwrap();
    let bad = good
        .replace("size = \"1m\"", "size = \"7s\"")
        .replace("currency = \"USD\"", "currency = \"usd\"")
        .replace("url = \"postgres://", "url = \"mysql://");
    std::fs::write(&path, bad).unwrap();
    let out = costwatch(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid configuration:"), "{err}");
    assert!(err.contains("windows.size: must divide a day evenly"), "{err}");
    assert!(
        err.contains("pricing.currency: \"usd\" is not a three-letter ISO 4217 code"),
        "{err}"
    );
    assert!(err.contains("database.url: must start with postgres://"), "{err}");
}

#[test]
fn the_shipped_configuration_is_valid_and_env_overrides_it() {
    let out = costwatch(&[
        "check-config",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"),
        ])
        .env("COSTWATCH__WINDOWS__SIZE", "7s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("windows.size"));
}

#[test]
fn check_config_never_prints_credentials_from_a_url() {
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"),
        ])
        .env(
            "COSTWATCH__ALERTING__ALERTMANAGER_URL",
            "http://alice:s3cret-pass@alertmanager:notaport",
        )
        .env(
            "COSTWATCH__ALERTING__EXTERNAL_URL",
            "ftp://bob:hunter2@costwatch.example/?token=t0ken-value",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "alerting.alertmanager_url: \"http://<redacted>@alertmanager:notaport\" is not an http(s) URL such as http://127.0.0.1:9093"
        ),
        "{err}"
    );
    assert!(
        err.contains("alerting.external_url: \"ftp://<redacted>@costwatch.example/?<redacted>\" is not an http(s) URL"),
        "{err}"
    );
    for secret in ["alice", "s3cret-pass", "bob", "hunter2", "t0ken-value"] {
        assert!(!err.contains(secret), "{secret} was printed:\n{err}");
    }
}

#[test]
fn protected_metrics_without_an_api_token_is_a_configuration_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"),
        ])
        .env("COSTWATCH__HTTP__PROTECT_METRICS", "true")
        .env_remove("COSTWATCH__HTTP__API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "error: invalid configuration:\n  - http.protect_metrics: needs http.api_token, the token /metrics would require"
    );
}

#[test]
fn a_negative_estimate_input_is_read_as_a_number_and_refused_with_its_value() {
    let out = costwatch(&[
        "estimate",
        "--compute",
        "-1",
        "--storage",
        "2",
        "--compute-price",
        "0.1",
        "--storage-price",
        "0.2",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value '-1' for '--compute <COMPUTE>': must be >= 0, got -1"),
        "{stderr}"
    );
    // Zero, also written -0, is fine.
    let out = costwatch(&[
        "estimate",
        "--compute",
        "-0",
        "--storage",
        "0",
        "--compute-price",
        "0.1",
        "--storage-price",
        "0.2",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unknown_budget_period_names_the_ones_that_exist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("costwatch.toml");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml")).unwrap();
    let text = format!("{shipped}\n[[budgets]]\nname = \"q\"\nperiod = \"fortnightly\"\namount = \"100\"\n");
    std::fs::write(&path, &text).unwrap();
    let out = costwatch(&["--config", path.to_str().unwrap(), "check-config"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("period must be one of hourly, daily, weekly, monthly, quarterly, yearly, got \"fortnightly\""),
        "{stderr}"
    );
    // Quarterly and yearly budgets are valid.
    std::fs::write(&path, text.replace("fortnightly", "quarterly")).unwrap();
    let out = costwatch(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
