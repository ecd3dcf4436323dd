//! The command line: `run`, `migrate`, `check-config`, `estimate`, `loadgen`, the calibration
//! commands `bills import`, `calibrate`, `rerate` and `recommend`, `budgets` and `alerts`, and
//! the history commands `costs`, `report` and `retention`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::calibration::bills::{self, BillProblem, BillsError};
use crate::calibration::run::CalibrationRequest;
use crate::calibration::{self, recommend, rerate};
use crate::config::{ConfigError, Settings};
use crate::domain::{Coefficient, ComputeUnits, HardwareName, ModelName, StorageUnits, UnitPrice};
use crate::exit::{ExitClass, Failure, InputError, UsageError};
use crate::ingest::consumer;
use crate::ingest::event::parse_decimal;
use crate::pricing::{EstimateRequest, PriceBook};
use crate::store::Store;
use crate::{alerting, daemon, kafka, loadgen, secret, shutdown, store, telemetry};

/// The command line: a global `--config` and one command.
#[derive(Debug, Parser)]
#[command(
    name = "costwatch",
    version,
    about = "Minute-by-minute cost of AI inference, from Kafka usage events to PostgreSQL"
)]
pub struct Cli {
    /// Configuration file (TOML). `COSTWATCH__SECTION__KEY` environment variables override it.
    #[arg(long, short, global = true, env = "COSTWATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// costwatch's commands; each one's doc comment is its `--help` text.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume usage events and keep window costs in PostgreSQL until SIGTERM.
    Run,
    /// Create the database if needed and apply schema migrations, then exit.
    Migrate,
    /// Validate the configuration and print every problem found.
    CheckConfig,
    /// Price a quantity of usage with the core cost model.
    Estimate(EstimateArgs),
    /// Produce seeded synthetic usage events to Kafka.
    Loadgen(LoadgenArgs),
    /// Bills: what providers charged, to calibrate k1 and k2 against.
    #[command(subcommand)]
    Bills(BillsCommand),
    /// Fit k1 and k2 to the stored bills and store them as a new coefficient version.
    Calibrate(CalibrateArgs),
    /// Re-price stored windows with the prices and coefficient versions in force.
    Rerate(RerateArgs),
    /// Rank hardware targets per model by what its observed usage would cost there.
    Recommend(RecommendArgs),
    /// Each configured budget's spend so far, forecast and state, read from PostgreSQL now.
    Budgets(JsonArgs),
    /// Budget alerts as recorded in PostgreSQL, newest first.
    Alerts(AlertsArgs),
    /// Costs from PostgreSQL: totals over a range, by model, hardware or labels, per step; the
    /// same numbers as `GET /api/v1/costs`.
    Costs(CostsArgs),
    /// Chargeback: per tenant (or any labels, model, hardware) events, usage, each cost and the
    /// unpriced usage over a range or a calendar month; the same numbers as `GET /api/v1/report`.
    Report(ReportArgs),
    /// Drop history partitions past `[retention]` (and rejected messages past
    /// `retention.rejected`) now, printing what was dropped; the daemon does this hourly.
    Retention(RetentionArgs),
}

/// The arguments of `costwatch retention`.
#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Print what would be dropped, drop nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The arguments of `costwatch costs`.
#[derive(Debug, Args)]
pub struct CostsArgs {
    /// Windows starting at or after this, RFC 3339 (default: `--to` minus 24 hours).
    #[arg(long)]
    pub from: Option<String>,
    /// Windows starting before this, RFC 3339 (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// Group by these, comma separated: `model`, `hardware`, `source` or a label name such as
    /// `tenant` (`label.model` for a label named like a column); default: one total.
    #[arg(long, value_delimiter = ',')]
    pub by: Vec<String>,
    /// Only usage carrying this label value, `name=value`; repeat to require several.
    #[arg(long = "label", value_name = "NAME=VALUE")]
    pub labels: Vec<String>,
    /// One row per bucket of this width (UTC): `window`, `hour`, `day` or `month` (default: none).
    #[arg(long, value_parser = ["window", "hour", "day", "month"])]
    pub step: Option<String>,
    /// `table` (default), `csv` or `json`; decimals stay exact in every format.
    #[arg(long, value_parser = ["table", "csv", "json"], default_value = "table")]
    pub format: String,
}

/// The arguments of `costwatch report`: a range is `--month` or `--from` and `--to`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("range").required(true).args(["month", "from"])))]
pub struct ReportArgs {
    /// Windows starting at or after this, RFC 3339 or a date (UTC midnight); with `--to`.
    #[arg(long, requires = "to", conflicts_with = "month")]
    pub from: Option<String>,
    /// Windows starting before this, RFC 3339 or a date (UTC midnight); with `--from`.
    #[arg(long, requires = "from", conflicts_with = "month")]
    pub to: Option<String>,
    /// A calendar month, `YYYY-MM`, from its first midnight to the next month's in `--tz`.
    #[arg(long)]
    pub month: Option<String>,
    /// The time zone of `--month` (IANA name, e.g. `Europe/Berlin`).
    #[arg(long, default_value = "UTC")]
    pub tz: chrono_tz::Tz,
    /// One row per value of these, comma separated: a label name such as `tenant`, `model`,
    /// `hardware`, `source` (default: `tenant`).
    #[arg(long, value_delimiter = ',', default_value = "tenant")]
    pub by: Vec<String>,
    /// Only usage carrying this label value, `name=value`; repeat to require several.
    #[arg(long = "label", value_name = "NAME=VALUE")]
    pub labels: Vec<String>,
    /// `table` (default), `csv` or `json`; decimals stay exact in every format.
    #[arg(long, value_parser = ["table", "csv", "json"], default_value = "table")]
    pub format: String,
}

/// The arguments of commands whose only option is `--json`.
#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Print one JSON document with decimal strings.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `costwatch alerts`.
#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// Only alerts in this state.
    #[arg(long, value_parser = ["firing", "resolved", "all"], default_value = "all")]
    pub state: String,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
    pub limit: i64,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// The `bills` subcommands.
#[derive(Debug, Subcommand)]
pub enum BillsCommand {
    /// Import a bills CSV (period_start, period_end, hardware, model, amount, currency).
    /// Importing the same file again changes nothing.
    Import {
        /// The CSV file.
        file: PathBuf,
    },
}

/// The arguments of `costwatch calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Fit only bills whose period starts at or after this (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    pub from: Option<String>,
    /// Fit only bills whose period ends at or before this (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    pub to: Option<String>,
    /// The stored versions price windows starting at or after this (default: now).
    #[arg(long)]
    pub effective_from: Option<String>,
    /// Fit and print, store nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document with decimal strings.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `costwatch rerate`.
#[derive(Debug, Args)]
pub struct RerateArgs {
    /// First window start to re-price (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    pub from: String,
    /// Re-price windows starting before this (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    pub to: String,
    /// Report the difference, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document with decimal strings.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `costwatch recommend`.
#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// Usage in windows starting at or after this (default: `--to` minus
    /// recommendations.savings_window).
    #[arg(long)]
    pub from: Option<String>,
    /// Usage in windows starting before this (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// Print one JSON document with decimal strings.
    #[arg(long)]
    pub json: bool,
}

/// A decimal that must not be negative: quantities, prices and coefficients. A negative one is
/// read as a number (not taken for a flag) and refused with its value.
fn non_negative(s: &str) -> Result<Decimal, String> {
    let value = parse_decimal(s)?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(format!("must be >= 0, got {s}"));
    }
    Ok(value)
}

/// The arguments of `costwatch estimate`.
#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// T: compute units.
    #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
    pub compute: Decimal,
    /// S: storage units.
    #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
    pub storage: Decimal,
    /// C_C: price of one compute unit (instead of --hardware).
    #[arg(long, allow_negative_numbers = true, value_parser = non_negative, requires = "storage_price", conflicts_with = "hardware")]
    pub compute_price: Option<Decimal>,
    /// C_S: price of one storage unit (instead of --hardware).
    #[arg(long, allow_negative_numbers = true, value_parser = non_negative, requires = "compute_price")]
    pub storage_price: Option<Decimal>,
    /// k1 (default 1, or the price book's value with --model/--hardware).
    #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
    pub k1: Option<Decimal>,
    /// k2 (default 1, or the price book's value with --model/--hardware).
    #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
    pub k2: Option<Decimal>,
    /// Take prices and coefficients for this model from the price book (needs --config).
    #[arg(long, requires = "hardware")]
    pub model: Option<String>,
    /// Take prices from the price book for this hardware (needs --config).
    #[arg(long, requires = "model")]
    pub hardware: Option<String>,
    /// Print JSON with decimal strings.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `costwatch loadgen`.
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Brokers (default: kafka.brokers from the configuration).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Topic (default: the topic of the configured source in `--format`, else kafka.topic).
    #[arg(long)]
    pub topic: Option<String>,
    /// Partitions to create the topic with, if it does not exist.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Number of messages to send.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Seed of the generator: the same seed and options produce the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of distinct models (`model-0`, `model-1`, ...).
    #[arg(long, default_value_t = 5)]
    pub models: u32,
    /// Number of distinct hardware targets (`hw-0`, `hw-1`, ...).
    #[arg(long, default_value_t = 3)]
    pub hardware: u32,
    /// Messages per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Share of messages that re-send an earlier event.
    #[arg(long, default_value_t = 0.02)]
    pub duplicates: f64,
    /// Share of events stamped `--late-by` behind the stream.
    #[arg(long, default_value_t = 0.01)]
    pub late: f64,
    /// Share of malformed messages.
    #[arg(long, default_value_t = 0.01)]
    pub malformed: f64,
    /// Share of hostile messages (poison a careless or malicious producer sends: label sets too
    /// wide to store, 37-digit numbers, JSON arrays, oversized payloads, conflicting duplicates,
    /// events stamped minutes ahead, 10^18 quantities), each with a known outcome.
    #[arg(long, default_value_t = 0.0)]
    pub hostile: f64,
    /// How far behind the stream late events are stamped.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub late_by: Duration,
    /// Event times are spread over this span, ending now (or at --end).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub span: Duration,
    /// RFC 3339 end of the span (default: now).
    #[arg(long)]
    pub end: Option<DateTime<Utc>>,
    /// Write the exact expected totals (JSON) to this file.
    #[arg(long)]
    pub expected: Option<PathBuf>,
    /// The message format: costwatch (default), openai, cloudevents, otlp_json, otlp_proto or
    /// json; all but costwatch carry tokens (see the README's "Sources and formats" for the
    /// `[[sources]]` entry that reads each).
    #[arg(long, default_value = "costwatch", value_parser = |s: &str| crate::config::SourceFormat::try_from(s.to_owned()))]
    pub format: crate::config::SourceFormat,
}

/// Parses the command line and runs the command: one match arm per command, so the dispatch
/// reads as a table; [`ExitClass::of`] maps its error to the exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; anything else is a usage error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(ExitClass::Usage.code())
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let log_format = crate::config::LogSettings::peek(cli.config.as_deref()).format;
    telemetry::init_logging(log_format);
    let result = match cli.command {
        Command::Estimate(ref args) => estimate(cli.config.as_deref(), args),
        Command::CheckConfig => check_config(cli.config.as_deref()),
        Command::Loadgen(ref args) => runtime().and_then(|rt| rt.block_on(run_loadgen(cli.config.as_deref(), args))),
        Command::Migrate => load(cli.config.as_deref()).and_then(|settings| {
            runtime()?.block_on(async {
                let cancel = CancellationToken::new();
                shutdown::listen_for_signals(cancel.clone());
                // A signal before the schema is up to date is a failure: whoever runs
                // `migrate` before `run` must not go on.
                match daemon::prepare_database(&settings, &cancel).await? {
                    Some(_) => {
                        println!("database schema is up to date");
                        Ok(())
                    }
                    // Only an unreachable database keeps `migrate` waiting for a signal.
                    None => Err(Failure::new(
                        ExitClass::Unavailable,
                        "stopped by a signal before the schema could be migrated",
                    )
                    .into()),
                }
            })
        }),
        Command::Run => runtime().and_then(|rt| {
            rt.block_on(async {
                // Signals first: one that arrives while librdkafka checks the configuration
                // still drains and exits 0 instead of killing the process.
                let cancel = CancellationToken::new();
                shutdown::listen_for_signals(cancel.clone());
                let reload = daemon::ReloadSource {
                    path: cli.config.clone(),
                    hangups: shutdown::hangups(),
                };
                let (settings, warnings) = load_checked(cli.config.as_deref())?;
                for warning in warnings {
                    tracing::warn!(%warning, "configuration");
                }
                run(settings, reload, cancel).await
            })
        }),
        // The file is read and checked before the database is opened, so that a missing or
        // broken file is reported as such even when PostgreSQL is away.
        Command::Bills(BillsCommand::Import { ref file }) => read_bills(file).and_then(|bills| {
            with_store(cli.config.as_deref(), |settings, store| {
                import_bills(settings, store, file, bills)
            })
        }),
        // Arguments are checked before the database is opened, so that a typo is reported as
        // such even when PostgreSQL is away.
        Command::Calibrate(ref args) => calibration_request(args).and_then(|request| {
            with_store(cli.config.as_deref(), |settings, store| {
                run_calibrate(settings, store, request, args.json)
            })
        }),
        Command::Rerate(ref args) => time_range(Some(&args.from), Some(&args.to)).and_then(|(from, to)| {
            let (from, to) = (from.expect("required"), to.expect("required"));
            with_store(cli.config.as_deref(), |settings, store| {
                run_rerate(settings, store, from, to, args)
            })
        }),
        Command::Budgets(ref args) => with_store(cli.config.as_deref(), |settings, store| {
            show_budgets(settings, store, args.json)
        }),
        Command::Alerts(ref args) => with_store(cli.config.as_deref(), |_, store| {
            show_alerts(store, &args.state, args.limit, args.json)
        }),
        Command::Costs(ref args) => costs_request(args).and_then(|request| {
            with_store(cli.config.as_deref(), |settings, store| {
                show_cost_table(settings, store, request)
            })
        }),
        Command::Report(ref args) => report_request(args).and_then(|request| {
            with_store(cli.config.as_deref(), |settings, store| {
                show_cost_table(settings, store, request)
            })
        }),
        Command::Retention(ref args) => with_store(cli.config.as_deref(), |settings, store| {
            run_retention(settings, store, args.dry_run)
        }),
        Command::Recommend(ref args) => time_range(args.from.as_deref(), args.to.as_deref()).and_then(|(from, to)| {
            with_store(cli.config.as_deref(), |settings, store| {
                run_recommend(settings, store, from, to, args.json)
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = ExitClass::of(&e).code();
            // Errors from librdkafka and sqlx may quote a configured value.
            let text = format!("{e:#}");
            let message = secret::scrub(&text);
            if log_format == crate::config::LogFormat::Json {
                // A log collector gets the reason as one more JSON line, not as bare text.
                error!(error = %message, exit_code = code, "exiting on error");
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::from(code)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Settings> {
    Ok(Settings::load(path)?)
}

/// [`load`], then what only librdkafka and the database URL can tell, without connecting: every
/// Kafka property (unknown, invalid, a mechanism this build lacks, TLS files that do not load)
/// and the URL's TLS files. Returns the settings and the warnings (plaintext-capable `sslmode`,
/// librdkafka's own).
fn load_checked(path: Option<&std::path::Path>) -> anyhow::Result<(Settings, Vec<String>)> {
    let (settings, mut problems) = Settings::load_with_problems(path)?;
    let mut warnings = Vec::new();
    let base = consumer::consumer_properties(&settings.kafka, "check-config");
    match kafka::check(&base, &settings.kafka) {
        Ok(kafka_warnings) => warnings.extend(kafka_warnings.into_iter().map(|w| format!("kafka: {w}"))),
        Err(kafka_problems) => problems.extend(kafka_problems),
    }
    if !problems.iter().any(|p| p.starts_with("database.url")) {
        let (db_problems, db_warnings) = store::check_url(&settings.database.url);
        problems.extend(db_problems);
        warnings.extend(db_warnings);
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems).into());
    }
    Ok((settings, warnings))
}

fn check_config(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (_, warnings) = load_checked(path)?;
    for warning in warnings {
        println!("warning: {warning}");
    }
    println!("configuration is valid");
    Ok(())
}

async fn run(settings: Settings, reload: daemon::ReloadSource, cancel: CancellationToken) -> anyhow::Result<()> {
    // Buckets make the flush duration a real histogram (quantiles aggregate across instances);
    // without them the exporter renders a summary.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(telemetry::FLUSH_DURATION.to_owned()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .context("flush duration buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    telemetry::describe_metrics();
    telemetry::rejection_reasons(crate::ingest::event::RejectCode::ALL.map(|code| code.as_str()));
    // We render /metrics ourselves, so the exporter's periodic upkeep (histogram draining) is ours.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let result = daemon::run(settings, reload, Some(handle), cancel).await;
    match &result {
        Ok(()) => info!("stopped cleanly"),
        Err(e) => error!(error = %format!("{e:#}"), "stopped on error"),
    }
    result
}

fn estimate(config: Option<&std::path::Path>, args: &EstimateArgs) -> anyhow::Result<()> {
    let uses_book = args.model.is_some();
    let book = match (uses_book, config) {
        (true, Some(path)) => Some(PriceBook::from_settings(&load(Some(path))?.pricing)),
        (true, None) => {
            return Err(UsageError(
                "--model/--hardware read the price book: pass --config FILE (or set COSTWATCH_CONFIG)".into(),
            )
            .into())
        }
        (false, _) => None,
    };
    let request = EstimateRequest {
        compute: ComputeUnits(args.compute),
        storage: StorageUnits(args.storage),
        compute_price: args.compute_price.map(UnitPrice),
        storage_price: args.storage_price.map(UnitPrice),
        k1: args.k1.map(Coefficient),
        k2: args.k2.map(Coefficient),
        model: args
            .model
            .as_deref()
            .map(ModelName::parse)
            .transpose()
            .map_err(|e| UsageError(format!("--model: {e}")))?,
        hardware: args
            .hardware
            .as_deref()
            .map(HardwareName::parse)
            .transpose()
            .map_err(|e| UsageError(format!("--hardware: {e}")))?,
    };
    let e = request.price(book.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        let unit = e.currency.map(|c| format!(" {c}")).unwrap_or_default();
        let (r, c) = (e.rates, e.cost);
        println!(
            "compute  {} = C_C {} x k1 {} x T {}{unit}",
            c.compute_cost, r.compute_price, r.k1, e.compute
        );
        println!(
            "storage  {} = C_S {} x k2 {} x S {}{unit}",
            c.storage_cost, r.storage_price, r.k2, e.storage
        );
        println!("total    {}{unit}", c.total_cost);
        let assumed = match e.assumed {
            (true, true) => "k1 = k2 = 1",
            (true, false) => "k1 = 1",
            (false, true) => "k2 = 1",
            (false, false) => "",
        };
        if !assumed.is_empty() {
            println!("assumed  {assumed}: not given, configured or calibrated for this pair (--k1, --k2 set them)");
        }
    }
    Ok(())
}

async fn run_loadgen(config: Option<&std::path::Path>, args: &LoadgenArgs) -> anyhow::Result<()> {
    let settings = match (&args.brokers, &args.topic, config) {
        (Some(_), Some(_), None) => None,
        _ => Some(load(config).context("loadgen needs --brokers and --topic, or a configuration")?),
    };
    let (brokers, topic) = match &settings {
        None => (
            args.brokers.clone().unwrap_or_default(),
            args.topic.clone().unwrap_or_default(),
        ),
        Some(s) => (
            args.brokers.clone().unwrap_or_else(|| s.kafka.brokers.clone()),
            // The topic of the configured source in this format (the native source's too).
            args.topic.clone().unwrap_or_else(|| {
                let sources = s.effective_sources();
                let ours = sources.into_iter().find(|source| source.format == args.format);
                ours.map_or_else(|| s.kafka.topic.clone(), |source| source.topic)
            }),
        ),
    };
    // The configuration's librdkafka properties (TLS, SASL, secrets) reach the producer too.
    let properties: Vec<(String, String)> = settings
        .iter()
        .flat_map(|s| s.kafka.operator_properties())
        .map(|p| (p.name, p.value.expose().to_owned()))
        .collect();
    for (name, share) in [
        ("--duplicates", args.duplicates),
        ("--late", args.late),
        ("--malformed", args.malformed),
        ("--hostile", args.hostile),
    ] {
        if !(0.0..1.0).contains(&share) {
            return Err(UsageError(format!("{name} is a share of messages between 0 and 1, got {share}")).into());
        }
    }
    let spec = loadgen::LoadSpec {
        count: args.count,
        seed: args.seed,
        models: args.models,
        hardware: args.hardware,
        rate: args.rate,
        duplicates: args.duplicates,
        late: args.late,
        malformed: args.malformed,
        hostile: args.hostile,
        late_by: args.late_by,
        span: args.span,
        end: args.end.unwrap_or_else(Utc::now),
    };
    if args.hostile > 0.0 && args.format != crate::config::SourceFormat::Costwatch {
        return Err(UsageError(format!(
            "--hostile is for the costwatch format; use --malformed with --format {}",
            args.format.as_str()
        ))
        .into());
    }
    let (messages, expected) = loadgen::generate_in(&spec, args.format);
    loadgen::ensure_topic_with(&brokers, &topic, args.partitions, &properties).await?;
    let rate = args.rate;
    let topic_name = topic.clone();
    tokio::task::spawn_blocking(move || loadgen::send_with(&brokers, &topic, &messages, rate, &properties)).await??;
    if let Some(path) = &args.expected {
        std::fs::write(path, serde_json::to_string_pretty(&expected)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "sent {} messages: {} events, {} duplicates, {} malformed, {} stamped late",
        expected.messages, expected.accepted, expected.duplicates, expected.rejected, expected.late_sent
    );
    if args.format != crate::config::SourceFormat::Costwatch {
        let name = args.format.as_str().replace('_', "-");
        println!(
            "read them with:\n{}",
            loadgen::formats::source_toml(args.format, &name, &topic_name)
        );
    }
    Ok(())
}

/// Parses a `--from`/`--to` style instant: RFC 3339 with any offset, or a date, meaning its
/// midnight UTC.
pub fn parse_instant(flag: &str, value: &str) -> Result<DateTime<Utc>, UsageError> {
    let value = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Ok(date.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    Err(UsageError(format!(
        "{flag} {value:?} is neither an RFC 3339 timestamp (2026-01-01T00:00:00Z) nor a date (2026-01-01)"
    )))
}

fn parse_optional(flag: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, UsageError> {
    value.map(|v| parse_instant(flag, v)).transpose()
}

type TimeRange = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// `--from` and `--to`, each optional, checked to be in order.
fn time_range(from: Option<&str>, to: Option<&str>) -> anyhow::Result<TimeRange> {
    let from = parse_optional("--from", from)?;
    let to = parse_optional("--to", to)?;
    check_order(from, to)?;
    Ok((from, to))
}

fn check_order(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Result<(), UsageError> {
    match (from, to) {
        (Some(from), Some(to)) if from >= to => Err(UsageError(format!(
            "--from ({}) must be before --to ({})",
            show_instant(from),
            show_instant(to)
        ))),
        _ => Ok(()),
    }
}

fn calibration_request(args: &CalibrateArgs) -> anyhow::Result<CalibrationRequest> {
    let (from, to) = time_range(args.from.as_deref(), args.to.as_deref())?;
    let effective_from = parse_optional("--effective-from", args.effective_from.as_deref())?.unwrap_or_else(Utc::now);
    Ok(CalibrationRequest {
        from,
        to,
        effective_from,
        dry_run: args.dry_run,
    })
}

fn show_instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Loads settings, opens the database (creating it and migrating the schema, as `migrate`
/// does, but without retrying: a one-shot command should fail fast) and runs `command`.
fn with_store<F, Fut>(config: Option<&std::path::Path>, command: F) -> anyhow::Result<()>
where
    F: FnOnce(Settings, Store) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let settings = load(config)?;
    runtime()?.block_on(async move {
        let options = store::connect_options(&settings.database.url, settings.database.password.as_ref())?;
        if let Err(error) = Store::create_database_if_missing_with(&options).await {
            tracing::debug!(%error, "cannot check or create the database; trying to use it as it is");
        }
        let store = Store::connect_lazy_with(options, 2);
        store.migrate().await.context("cannot prepare the database schema")?;
        command(settings, store).await
    })
}

/// `costwatch retention`: one retention run now, as the daemon's hourly one (history partitions,
/// then rejected messages).
async fn run_retention(settings: Settings, store: Store, dry_run: bool) -> anyhow::Result<()> {
    let now = Utc::now();
    let policy = daemon::retention_policy(&settings);
    let Some(outcome) = crate::history::retention::run(&store, &policy, now, dry_run)
        .await
        .context("cannot apply history retention")?
    else {
        anyhow::bail!("another costwatch instance is running retention right now; try again in a minute");
    };
    print!("{}", outcome.to_text(dry_run));
    let keep = chrono::Duration::from_std(settings.rejected_retention()).unwrap_or(chrono::Duration::MAX);
    if let Some(before) = now.checked_sub_signed(keep) {
        let shown = show_instant(before);
        if dry_run {
            let n = crate::usage::store::rejected_before(store.pool(), before)
                .await
                .context("cannot count rejected messages")?;
            println!("would delete {n} rejected messages received before {shown}");
        } else {
            let n = store.prune_rejected(before).await?.unwrap_or(0);
            println!("deleted {n} rejected messages received before {shown}");
        }
    }
    Ok(())
}

/// The configured price book with every stored coefficient version: what the daemon prices with.
async fn current_book(settings: &Settings, store: &Store) -> anyhow::Result<PriceBook> {
    let versions = calibration::store::load_versions(store.pool())
        .await
        .context("cannot read coefficient versions")?;
    Ok(PriceBook::from_settings(&settings.pricing).with_versions(versions))
}

/// The bills of `file`: every problem with its line, or the file cannot be read.
fn read_bills(file: &std::path::Path) -> anyhow::Result<Vec<bills::Bill>> {
    let text = std::fs::read_to_string(file).map_err(|error| InputError {
        path: file.to_owned(),
        error,
    })?;
    Ok(bills::parse_bills(&text)?)
}

async fn import_bills(
    settings: Settings,
    store: Store,
    file: &std::path::Path,
    bills: Vec<bills::Bill>,
) -> anyhow::Result<()> {
    // Bills are compared with prices, which are all in one currency.
    let problems: Vec<BillProblem> = bills
        .iter()
        .filter(|b| b.currency != settings.pricing.currency)
        .map(|b| BillProblem {
            line: b.line,
            message: format!(
                "currency {:?} is not pricing.currency {:?}; bills must be in the currency prices are quoted in",
                b.currency, settings.pricing.currency
            ),
        })
        .collect();
    if !problems.is_empty() {
        return Err(BillsError { problems }.into());
    }
    let outcome = calibration::store::import_bills(store.pool(), &bills)
        .await
        .context("cannot store the bills")?;
    println!(
        "{}: {} bills, {} new, {} updated, {} unchanged",
        file.display(),
        bills.len(),
        outcome.inserted,
        outcome.updated,
        outcome.unchanged
    );
    Ok(())
}

async fn run_calibrate(
    settings: Settings,
    store: Store,
    request: CalibrationRequest,
    json: bool,
) -> anyhow::Result<()> {
    let configured = PriceBook::from_settings(&settings.pricing);
    let report = calibration::run::calibrate(store.pool(), &configured, request).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    let message = match report.errors.as_slice() {
        [] => return Ok(()),
        [one] => format!("cannot fit {}: {}", one.target, one.error),
        many => format!(
            "cannot fit {} targets:\n{}",
            many.len(),
            many.iter()
                .map(|f| format!("  - {}: {}", f.target, f.error))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    };
    // The bills do not hold what a fit needs: input data, not a failure of costwatch.
    Err(Failure::new(ExitClass::Data, message).into())
}

async fn run_rerate(
    settings: Settings,
    store: Store,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    args: &RerateArgs,
) -> anyhow::Result<()> {
    let book = current_book(&settings, &store).await?;
    let profiles = crate::pricing::profiles::UsageProfiles::new(&settings.usage_profiles);
    let report = rerate::rerate(store.pool(), &book, &profiles, from, to, args.dry_run).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

async fn show_budgets(settings: Settings, store: Store, json: bool) -> anyhow::Result<()> {
    let now = Utc::now();
    let evaluated = alerting::evaluator::evaluate_all(&settings, &store, now)
        .await
        .context("cannot read budget spend from PostgreSQL")?;
    let statuses: Vec<_> = evaluated.into_iter().map(|(_, s)| s).collect();
    if json {
        let document = serde_json::json!({ "evaluated_at": now, "budgets": statuses });
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    if statuses.is_empty() {
        println!("no budgets configured ([[budgets]] in the configuration)");
    }
    for s in &statuses {
        let pct = (s.utilization * Decimal::from(100)).round_dp(1).normalize();
        println!(
            "{}: {} of {} {} ({pct}%) this {} period, {} to {}; state {}",
            alerting::budget::status_subject(s),
            s.spend,
            s.amount,
            s.currency,
            s.period.as_str(),
            s.period_start.to_rfc3339(),
            s.period_end.to_rfc3339(),
            s.state
        );
        if let Some(forecast) = s.forecast {
            println!(
                "  forecast {forecast} {} (burn {}/h short, {}/h long)",
                s.currency, s.burn_rate_short_per_hour, s.burn_rate_long_per_hour
            );
        }
        if !s.thresholds_reached.is_empty() {
            let reached: Vec<String> = s.thresholds_reached.iter().map(|t| t.to_string()).collect();
            println!("  thresholds reached: {}", reached.join(", "));
        }
        if let Some(d) = &s.drift {
            let ratio = d.ratio.map(|r| format!("{r}x")).unwrap_or_else(|| "n/a".into());
            println!(
                "  drift: {}/h recent, {}/h baseline ({ratio}; alerts above {}x){}",
                d.recent_per_hour,
                d.baseline_per_hour,
                d.factor,
                if d.firing { ", firing" } else { "" }
            );
        }
        for u in &s.unpriced {
            println!("  unpriced: {} events of {} on {}", u.events, u.model, u.hardware);
        }
    }
    Ok(())
}

/// What `costwatch costs` and `costwatch report` print: one cost table, checked before the
/// database is opened.
#[derive(Debug)]
struct TableRequest {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Option<crate::usage::CostStep>,
    by: Vec<crate::usage::Dimension>,
    labels: crate::usage::LabelFilter,
    format: String,
    /// The report's month and time zone, echoed in its JSON.
    month: Option<(String, chrono_tz::Tz)>,
}

/// `--by` and `--label` as a group-by list and label filters.
fn dimensions_and_labels(
    by: &[String],
    labels: &[String],
) -> Result<(Vec<crate::usage::Dimension>, crate::usage::LabelFilter), UsageError> {
    use crate::usage::{Dimension, LabelFilter};
    let usage = |e: crate::usage::QueryError| UsageError(e.to_string());
    let dimensions = Dimension::parse_list(by.iter().map(String::as_str)).map_err(usage)?;
    let mut filter = LabelFilter::default();
    for label in labels {
        let (name, value) = label
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--label {label:?} must be name=value, e.g. tenant=search")))?;
        filter.insert(name, value).map_err(usage)?;
    }
    Ok((dimensions, filter))
}

fn costs_request(args: &CostsArgs) -> anyhow::Result<TableRequest> {
    let (from, to) = time_range(args.from.as_deref(), args.to.as_deref())?;
    let to = to.unwrap_or_else(Utc::now);
    let from = from.unwrap_or(to - chrono::Duration::hours(24));
    check_order(Some(from), Some(to))?;
    let (by, labels) = dimensions_and_labels(&args.by, &args.labels)?;
    Ok(TableRequest {
        from,
        to,
        step: args.step.as_deref().and_then(crate::usage::CostStep::parse),
        by,
        labels,
        format: args.format.clone(),
        month: None,
    })
}

fn report_request(args: &ReportArgs) -> anyhow::Result<TableRequest> {
    let (by, labels) = dimensions_and_labels(&args.by, &args.labels)?;
    let (from, to) = match &args.month {
        Some(month) => {
            let parsed = crate::usage::Month::parse(month).map_err(|e| UsageError(format!("--{e}")))?;
            alerting::budget::period_bounds(crate::config::Period::Monthly, args.tz, parsed.inside())
        }
        None => {
            let (from, to) = time_range(args.from.as_deref(), args.to.as_deref())?;
            (from.expect("clap requires --from"), to.expect("clap requires --to"))
        }
    };
    Ok(TableRequest {
        from,
        to,
        step: None,
        by,
        labels,
        format: args.format.clone(),
        month: args.month.clone().map(|m| (m, args.tz)),
    })
}

/// `costwatch costs` and `costwatch report`: the cost table, and a total that equals
/// `/api/v1/costs`' for the range.
async fn show_cost_table(settings: Settings, store: Store, request: TableRequest) -> anyhow::Result<()> {
    use crate::usage::{self, render, CostRow};
    let query = usage::CostQuery {
        from: request.from,
        to: request.to,
        step: request.step,
        model: None,
        hardware: None,
        labels: &request.labels,
        by: &request.by,
    };
    let rows = usage::store::cost_table(store.pool(), &query)
        .await
        .context("cannot read costs from PostgreSQL")?;
    let total = CostRow::total(&rows);
    let names: Vec<String> = request.by.iter().map(|d| d.name()).collect();
    let currency = settings.pricing.currency.as_str();
    let with_start = request.step.is_some();
    match request.format.as_str() {
        "json" => {
            let scope = render::TableScope {
                from: request.from,
                to: request.to,
                step: request.step,
                names: &names,
                labels: &request.labels,
                currency,
            };
            let mut document = render::table_json(&scope, &rows, &total);
            if let Some((month, tz)) = &request.month {
                document["month"] = serde_json::json!(month);
                document["tz"] = serde_json::json!(tz.name());
            }
            println!("{}", serde_json::to_string_pretty(&document)?);
        }
        "csv" => print!("{}", render::cost_csv(&rows, &names, with_start)),
        _ => {
            print!("{}", render::cost_text(&rows, &total, &names, with_start, currency));
            if total.unpriced_events > 0 {
                println!(
                    "unpriced: {} events (compute {}, storage {}) have no price and are in no cost",
                    total.unpriced_events,
                    total.unpriced_compute.normalize(),
                    total.unpriced_storage.normalize()
                );
            }
        }
    }
    Ok(())
}

async fn show_alerts(store: Store, state: &str, limit: i64, json: bool) -> anyhow::Result<()> {
    let filter = (state != "all").then_some(state);
    let alerts = store
        .list_alerts(filter, limit)
        .await
        .context("cannot read alerts from PostgreSQL")?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "items": alerts }))?
        );
        return Ok(());
    }
    if alerts.is_empty() {
        println!("no {} alerts", if state == "all" { "budget" } else { state });
    }
    for a in &alerts {
        let summary = a.annotations.get("summary").and_then(|v| v.as_str()).unwrap_or("");
        let since = a.ends_at.unwrap_or(a.starts_at).to_rfc3339();
        let pending = if a.pending_deliveries > 0 {
            format!(
                " [{} notification(s) pending: {}]",
                a.pending_deliveries,
                a.last_error.as_deref().unwrap_or("not sent yet")
            )
        } else {
            String::new()
        };
        println!("{} since {since}: {summary}{pending}", a.state);
    }
    Ok(())
}

async fn run_recommend(
    settings: Settings,
    store: Store,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    json: bool,
) -> anyhow::Result<()> {
    let to = to.unwrap_or_else(Utc::now);
    let from = match from {
        Some(from) => from,
        None => to - chrono::Duration::from_std(settings.recommendations.savings_window)?,
    };
    check_order(Some(from), Some(to))?;
    let book = current_book(&settings, &store).await?;
    let usage = calibration::store::usage_by_model(store.pool(), from, to).await?;
    let recommendations = recommend::recommend(&book, &usage, to)?;
    if json {
        let document = recommend::Recommendations {
            from,
            to,
            currency: book.currency().to_owned(),
            models: recommendations,
        };
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print!("{}", recommend::to_text(&recommendations, book.currency()));
    }
    Ok(())
}
