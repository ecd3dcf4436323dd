//! The command line as a user meets it: the estimate breakdown, configuration errors, exit
//! codes, and README's Commands table against `--help`.

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
    let estimate = |model: &str| {
        let out = costwatch(&[
            "estimate",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml"),
            "--model",
            model,
            "--hardware",
            "a100-80g",
            "--compute",
            "1000",
            "--storage",
            "500",
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let json = estimate("qwen2-7b-instruct");
    assert_eq!(json["total_cost"], "130");
    assert_eq!(json["currency"], "USD");
    assert_eq!(json["coefficients_assumed"], false);
    // Nothing configured for llama there: priced at the assumed 1 and 1, and said so.
    let json = estimate("llama");
    assert_eq!(json["total_cost"], "200");
    assert_eq!(json["coefficients_assumed"], true);
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
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "error: hardware tpu-v9 has no price in the price book (pricing.hardware), so its usage is unpriced"
    );
}

#[test]
fn an_invalid_configuration_lists_every_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let good = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml")).unwrap();
    let bad = good
        .replace("size = \"1m\"", "size = \"7s\"")
        .replace("currency = \"USD\"", "currency = \"usd\"")
        .replace("url = \"postgres://", "url = \"mysql://");
    std::fs::write(&path, bad).unwrap();
    let out = costwatch(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
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
    assert_eq!(out.status.code(), Some(78));
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
    assert_eq!(out.status.code(), Some(78));
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
    assert_eq!(out.status.code(), Some(78));
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
    assert_eq!(out.status.code(), Some(64));
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
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "budgets[2].period: must be one of hourly, daily, weekly, monthly, quarterly, yearly, got \"fortnightly\""
        ),
        "{stderr}"
    );
    // Quarterly and yearly budgets are valid.
    std::fs::write(&path, text.replace("fortnightly", "quarterly")).unwrap();
    let out = costwatch(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The text of `costwatch <args> --help`.
fn help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    let out = costwatch(&all);
    assert!(
        out.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The entries of one section of clap's help (`Commands:`, `Options:`): the first word of each
/// line indented by two spaces, up to the next blank line.
fn help_section(text: &str, section: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| *l != section)
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(|w| w.trim_end_matches(',').to_owned()))
        .collect()
}

/// Every command (`bills import` for a nested one) with its long flags, from `--help`. The
/// flags every command has (`--help`, `--config`) are left out: README describes them once.
fn commands_from_help() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut commands = std::collections::BTreeMap::new();
    let mut pending: Vec<Vec<String>> = help_section(&help(&[]), "Commands:")
        .into_iter()
        .filter(|c| c != "help")
        .map(|c| vec![c])
        .collect();
    while let Some(path) = pending.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        let nested: Vec<String> = help_section(&text, "Commands:")
            .into_iter()
            .filter(|c| c != "help")
            .collect();
        if !nested.is_empty() {
            pending.extend(nested.into_iter().map(|c| [path.clone(), vec![c]].concat()));
            continue;
        }
        // Only the lines that define an option (`  -c, --config <CONFIG>`, `      --from <FROM>`),
        // not descriptions (indented further) that mention one.
        let definitions: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Options:")
            .filter(|l| l.len() - l.trim_start().len() <= 6 && l.trim_start().starts_with('-'))
            .collect();
        let flags = definitions
            .iter()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
            .map(|w| w.trim_end_matches(',').to_owned())
            .filter(|f| !["--help", "--config", "--version"].contains(&f.as_str()))
            .collect();
        commands.insert(path.join(" "), flags);
    }
    commands
}

/// The `--long-flags` in `text`.
fn long_flags(text: &str) -> std::collections::BTreeSet<String> {
    let mut flags = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let name: String = rest[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        let before = rest[..at].chars().last();
        if !name.is_empty() && !matches!(before, Some(c) if c.is_alphanumeric() || c == '-') {
            flags.insert(format!("--{name}"));
        }
        rest = &rest[at + 2 + name.len()..];
    }
    flags
}

/// README's Commands table: each row's command (the words after `costwatch` up to the first
/// flag or placeholder) with the flags its synopsis names.
fn commands_from_readme() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## Commands\n")
        .nth(1)
        .expect("README has a Commands section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `costwatch "))
        .map(|row| {
            let synopsis = row.split('`').next().unwrap();
            let command: Vec<&str> = synopsis
                .split_whitespace()
                .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-'))
                .collect();
            (command.join(" "), long_flags(synopsis))
        })
        .collect()
}

#[test]
fn readme_commands_table_lists_every_command_and_flag_of_the_help_and_nothing_else() {
    let help = commands_from_help();
    let readme = commands_from_readme();
    let names = |m: &std::collections::BTreeMap<String, _>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&readme),
        names(&help),
        "README's Commands table and --help name different commands"
    );
    let drift: Vec<String> = help
        .iter()
        .filter_map(|(command, flags)| {
            let documented = &readme[command];
            let missing: Vec<_> = flags.difference(documented).collect();
            let stale: Vec<_> = documented.difference(flags).collect();
            (!missing.is_empty() || !stale.is_empty()).then(|| {
                format!("costwatch {command}: README lacks {missing:?} and names {stale:?}, which --help does not have")
            })
        })
        .collect();
    assert!(
        drift.is_empty(),
        "README's Commands table drifted from --help:\n{}",
        drift.join("\n")
    );
    // The flag every command takes is described once, under the table.
    let readme_text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme_text
        .split("\n## Commands\n")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    assert!(
        section.contains("`--config FILE`"),
        "README's Commands section does not describe --config"
    );
}

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/costwatch.toml");

/// `costwatch check-config` on the shipped configuration with `env` on top.
fn check_shipped_with(env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(["check-config", "--config", SHIPPED])
        .env_remove("COSTWATCH_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim_end().to_owned()
}

#[test]
fn a_month_where_a_minute_was_meant_is_refused_naming_the_key_and_the_fix() {
    let out = check_shipped_with(&[("COSTWATCH__INGEST__DEDUP_HORIZON", "1M")]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: invalid configuration:\n  - ingest.dedup_horizon: \"1M\" means months (M is a month, m a minute); \
         write \"1m\" for minutes, or days such as \"30d\""
    );
    // Every duration key, however months are spelt.
    let out = check_shipped_with(&[("COSTWATCH__KAFKA__SESSION_TIMEOUT", "1month")]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: invalid configuration:\n  - kafka.session_timeout: \"1month\" counts in months, which costwatch refuses \
         (M and m are easily swapped); write days such as \"30d\""
    );
    assert!(check_shipped_with(&[("COSTWATCH__INGEST__DEDUP_HORIZON", "1m")])
        .status
        .success());
}

#[test]
fn horizons_in_the_wrong_order_are_refused_with_both_keys_and_values() {
    let out = check_shipped_with(&[
        ("COSTWATCH__INGEST__DEDUP_HORIZON", "30d"),
        ("COSTWATCH__WINDOWS__ALLOWED_LATENESS", "8d"),
    ]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: invalid configuration:\n  \
         - ingest.max_event_age: 7days must be longer than windows.allowed_lateness (8days)\n  \
         - ingest.dedup_horizon: 30days is longer than ingest.max_event_age (7days); older events are rejected anyway, \
         so make it at most that"
    );
}

#[test]
fn every_problem_of_a_file_is_reported_once_with_its_key_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("costwatch.toml");
    let shipped = std::fs::read_to_string(SHIPPED).unwrap();
    let broken = shipped
        // A missing required key, a wrong type, an unknown key, and a validation problem.
        .replace("topic = \"inference-usage\"\n", "")
        .replace("[ingest]\n", "[ingest]\nmax_event_bytes = \"lots\"\n")
        .replace("[http]\n", "[http]\nlisten_on = \"0.0.0.0:9464\"\n")
        .replace("size = \"1m\"", "size = \"7s\"")
        // An unknown value in the second budget.
        .replace("period = \"daily\"", "period = \"fortnightly\"");
    assert_ne!(broken, shipped);
    std::fs::write(&path, broken).unwrap();
    let out = costwatch(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "error: invalid configuration:\n  \
         - budgets[1].period: must be one of hourly, daily, weekly, monthly, quarterly, yearly, got \"fortnightly\"\n  \
         - http.listen_on: unknown key, expected one of `listen`, `api_token`, `protect_metrics`, \
         `header_read_timeout`, `request_timeout`, `api_token_file`\n  \
         - ingest.max_event_bytes: invalid type: string \"lots\", expected an integer\n  \
         - kafka.topic: missing or empty; name the usage topic, or configure [[sources]]\n  \
         - windows.size: must divide a day evenly (e.g. 10s, 1m, 5m, 1h), so windows align across days"
    );
}

#[test]
fn each_class_of_failure_has_its_exit_code() {
    // 64: the command line.
    let out = costwatch(&["costs", "--config", SHIPPED, "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "error: --from \"yesterday\" is neither an RFC 3339 timestamp (2026-01-01T00:00:00Z) nor a date (2026-01-01)"
    );
    let out = costwatch(&["estimate", "--bogus"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    // 65: input data (checked before the database is opened).
    let dir = tempfile::tempdir().unwrap();
    let bills = dir.path().join("bills.csv");
    std::fs::write(
        &bills,
        "period_start,period_end,hardware,model,amount,currency\n2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,a100-80g,,-1,USD\n",
    )
    .unwrap();
    let out = costwatch(&["bills", "import", "--config", SHIPPED, bills.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "error: invalid bills file:\n  - line 2: amount must not be negative, got -1"
    );
    // 66: a file to read that is not there, bills or configuration.
    let missing = dir.path().join("missing.csv");
    let out = costwatch(&["bills", "import", "--config", SHIPPED, missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "error: cannot read {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    let missing = dir.path().join("missing.toml");
    let out = costwatch(&["check-config", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "error: cannot read configuration file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    // 69: PostgreSQL is not there (nothing listens on port 1).
    let out = Command::new(env!("CARGO_BIN_EXE_costwatch"))
        .args(["costs", "--config", SHIPPED])
        .env_remove("COSTWATCH_CONFIG")
        .env("COSTWATCH__DATABASE__URL", "postgres://postgres@127.0.0.1:1/costwatch")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("error: cannot prepare the database schema: "),
        "{}",
        stderr(&out)
    );
    // 78: the configuration (the other tests of this file show its messages). 70 (internal) has
    // no command-line trigger; src/exit.rs tests the mapping.
    let out = check_shipped_with(&[("COSTWATCH__WINDOWS__SIZE", "7s")]);
    assert_eq!(out.status.code(), Some(78));
    // Help is no failure.
    assert_eq!(costwatch(&["--help"]).status.code(), Some(0));
}

#[test]
fn estimate_says_when_coefficients_are_assumed() {
    // The worked example without --k2.
    let out = costwatch(&WORKED[..11]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "compute  50 = C_C 0.1 x k1 0.5 x T 1000\nstorage  100 = C_S 0.2 x k2 1 x S 500\ntotal    150\n\
         assumed  k2 = 1: not given, configured or calibrated for this pair (--k1, --k2 set them)\n"
    );
}

/// The keys serde knows under `section` (the root when empty), read from the error for an
/// unknown key there: `expected one of `a`, `b``.
fn known_keys(section: &str) -> std::collections::BTreeSet<String> {
    let var = if section.is_empty() {
        "COSTWATCH__ZZZ_UNKNOWN".to_owned()
    } else {
        format!("COSTWATCH__{}__ZZZ_UNKNOWN", section.to_uppercase())
    };
    let out = check_shipped_with(&[(var.as_str(), "1")]);
    let text = stderr(&out);
    let key = if section.is_empty() {
        "zzz_unknown".to_owned()
    } else {
        format!("{section}.zzz_unknown")
    };
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("  - {key}: unknown key")))
        .unwrap_or_else(|| panic!("no unknown-key problem for {key}:\n{text}"));
    let expected = line.split("expected").nth(1).unwrap();
    expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

#[test]
fn readme_configuration_table_lists_exactly_the_keys_the_validator_knows() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let documented: std::collections::BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            l.split('|')
                .nth(1)
                .unwrap()
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|k| k.contains('.') || k.ends_with("[]"))
        .filter(|k| {
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.' || c == '[' || c == ']')
        })
        .collect();
    let mut drift = Vec::new();
    for root in known_keys("") {
        if documented.contains(&format!("{root}[]")) {
            continue;
        }
        let known: std::collections::BTreeSet<String> =
            known_keys(&root).into_iter().map(|k| format!("{root}.{k}")).collect();
        let listed: std::collections::BTreeSet<String> = documented
            .iter()
            .filter(|k| k.starts_with(&format!("{root}.")))
            .map(|k| k.trim_end_matches("[]").to_owned())
            .collect();
        for missing in known.difference(&listed) {
            drift.push(format!("{missing} is a key but not in README's Configuration table"));
        }
        for stale in listed.difference(&known) {
            drift.push(format!("{stale} is in README's Configuration table but no key"));
        }
    }
    let roots = known_keys("");
    for key in &documented {
        let root = key.split(['.', '[']).next().unwrap();
        if !roots.contains(root) {
            drift.push(format!(
                "{key} is in README's Configuration table but [{root}] is no section"
            ));
        }
    }
    assert!(drift.is_empty(), "{}", drift.join("\n"));
}
