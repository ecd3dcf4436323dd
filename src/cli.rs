//! The command line: `run`, `migrate`, `check-config`, `estimate` and `loadgen`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{ConfigError, Settings};
use crate::domain::{Coefficient, ComputeUnits, HardwareName, ModelName, StorageUnits, UnitPrice};
use crate::event::parse_decimal;
use crate::pricing::{EstimateRequest, PriceBook};
use crate::{daemon, loadgen, shutdown, telemetry};

/// Exit code for invalid configuration or usage (EX_USAGE), before anything starts.
const EXIT_CONFIG: u8 = 64;

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
    #[command(subcommand)]
    pub command: Command,
}

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
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// T: compute units.
    #[arg(long, value_parser = parse_decimal)]
    pub compute: Decimal,
    /// S: storage units.
    #[arg(long, value_parser = parse_decimal)]
    pub storage: Decimal,
    /// C_C: price of one compute unit (instead of --hardware).
    #[arg(long, value_parser = parse_decimal, requires = "storage_price", conflicts_with = "hardware")]
    pub compute_price: Option<Decimal>,
    /// C_S: price of one storage unit (instead of --hardware).
    #[arg(long, value_parser = parse_decimal, requires = "compute_price")]
    pub storage_price: Option<Decimal>,
    /// k1 (default 1, or the price book's value with --model/--hardware).
    #[arg(long, value_parser = parse_decimal)]
    pub k1: Option<Decimal>,
    /// k2 (default 1, or the price book's value with --model/--hardware).
    #[arg(long, value_parser = parse_decimal)]
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

#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Brokers (default: kafka.brokers from the configuration).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Topic (default: kafka.topic from the configuration).
    #[arg(long)]
    pub topic: Option<String>,
    /// Partitions to create the topic with, if it does not exist.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Number of messages to send.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 5)]
    pub models: u32,
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
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging();
    let result = match cli.command {
        Command::Estimate(ref args) => estimate(cli.config.as_deref(), args),
        Command::CheckConfig => load(cli.config.as_deref()).map(|_| {
            println!("configuration is valid");
        }),
        Command::Loadgen(ref args) => runtime().and_then(|rt| rt.block_on(run_loadgen(cli.config.as_deref(), args))),
        Command::Migrate => load(cli.config.as_deref()).and_then(|settings| {
            runtime()?.block_on(async {
                let cancel = CancellationToken::new();
                shutdown::listen_for_signals(cancel.clone());
                daemon::prepare_database(&settings, &cancel).await?;
                println!("database schema is up to date");
                Ok(())
            })
        }),
        Command::Run => load(cli.config.as_deref()).and_then(|settings| runtime()?.block_on(run(settings))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<ConfigError>().is_some() {
                EXIT_CONFIG
            } else {
                1
            };
            eprintln!("error: {e:#}");
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

async fn run(settings: Settings) -> anyhow::Result<()> {
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
    // We render /metrics ourselves, so the exporter's periodic upkeep (histogram draining) is ours.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let cancel = CancellationToken::new();
    shutdown::listen_for_signals(cancel.clone());
    let result = daemon::run(settings, Some(handle), cancel).await;
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
        (true, None) => bail!("--model/--hardware read the price book: pass --config FILE (or set COSTWATCH_CONFIG)"),
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
            .context("--model")?,
        hardware: args
            .hardware
            .as_deref()
            .map(HardwareName::parse)
            .transpose()
            .context("--hardware")?,
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
    }
    Ok(())
}

async fn run_loadgen(config: Option<&std::path::Path>, args: &LoadgenArgs) -> anyhow::Result<()> {
    let (brokers, topic) = match (&args.brokers, &args.topic) {
        (Some(b), Some(t)) => (b.clone(), t.clone()),
        (b, t) => {
            let settings = load(config).context("loadgen needs --brokers and --topic, or a configuration")?;
            (
                b.clone().unwrap_or(settings.kafka.brokers),
                t.clone().unwrap_or(settings.kafka.topic),
            )
        }
    };
    for (name, share) in [
        ("--duplicates", args.duplicates),
        ("--late", args.late),
        ("--malformed", args.malformed),
    ] {
        if !(0.0..1.0).contains(&share) {
            bail!("{name} is a share of messages between 0 and 1, got {share}");
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
        late_by: args.late_by,
        span: args.span,
        end: args.end.unwrap_or_else(Utc::now),
    };
    let (messages, expected) = loadgen::generate(&spec);
    loadgen::ensure_topic(&brokers, &topic, args.partitions).await?;
    let rate = args.rate;
    tokio::task::spawn_blocking(move || loadgen::send(&brokers, &topic, &messages, rate)).await??;
    if let Some(path) = &args.expected {
        std::fs::write(path, serde_json::to_string_pretty(&expected)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "sent {} messages: {} events, {} duplicates, {} malformed, {} stamped late",
        expected.messages, expected.accepted, expected.duplicates, expected.rejected, expected.late_sent
    );
    Ok(())
}
