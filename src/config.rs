//! Settings: one validated tree, loaded from a TOML file and then the environment
//! (`COSTWATCH__SECTION__KEY`), checked in one pass that reports every problem with its key.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::domain::{exact_decimal, Coefficient, HardwareName, ModelName, UnitPrice};

/// The environment prefix; keys below it are separated by `__`, e.g. `COSTWATCH__KAFKA__BROKERS`.
pub const ENV_PREFIX: &str = "COSTWATCH";

/// Everything costwatch can be told. Unknown keys are an error, so a typo never goes unnoticed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    #[serde(default)]
    pub windows: WindowSettings,
    #[serde(default)]
    pub ingest: IngestSettings,
    pub pricing: PricingSettings,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub calibration: CalibrationSettings,
    #[serde(default)]
    pub recommendations: RecommendationSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma separated: `host:port[,host:port]`.
    pub brokers: String,
    /// The topic inference servers publish usage events to.
    pub topic: String,
    /// The consumer group; every costwatch instance of one deployment uses the same id.
    pub group_id: String,
    /// Where a partition with no offset stored in PostgreSQL starts: `earliest` (default, so
    /// usage produced before the first start is not lost) or `latest`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// How long the group waits for a silent member before giving its partitions to others.
    #[serde(default = "defaults::session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Extra librdkafka properties (e.g. `"security.protocol" = "SASL_SSL"`), passed unchanged.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user[:password]@host:port/database`. Never logged.
    pub url: String,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
}

impl fmt::Debug for DatabaseSettings {
    // The URL may carry a password: keep it out of every debug print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSettings {
    /// Width of the event-time tumbling windows, aligned to the Unix epoch.
    #[serde(default = "defaults::window_size", with = "humantime_serde")]
    pub size: Duration,
    /// How far behind the watermark an event may be before it counts as late. Late events are
    /// still accounted into their own window; a window is `final` once the watermark has passed
    /// its end plus this.
    #[serde(default = "defaults::allowed_lateness", with = "humantime_serde")]
    pub allowed_lateness: Duration,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            size: defaults::window_size(),
            allowed_lateness: defaults::allowed_lateness(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// A repeated `event_id` within this much event time in the same partition counts once.
    #[serde(default = "defaults::dedup_horizon", with = "humantime_serde")]
    pub dedup_horizon: Duration,
    /// Events stamped further than this in the future are rejected (clock skew guard).
    #[serde(default = "defaults::max_future_skew", with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Events older than this are rejected.
    #[serde(default = "defaults::max_event_age", with = "humantime_serde")]
    pub max_event_age: Duration,
    /// Messages larger than this many bytes are rejected unparsed.
    #[serde(default = "defaults::max_event_bytes")]
    pub max_event_bytes: usize,
    /// How often pending aggregates are written to PostgreSQL; bounds how far the database
    /// trails the stream.
    #[serde(default = "defaults::flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Flush early once this many events are pending, which bounds memory under bursts.
    #[serde(default = "defaults::max_pending_events")]
    pub max_pending_events: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            dedup_horizon: defaults::dedup_horizon(),
            max_future_skew: defaults::max_future_skew(),
            max_event_age: defaults::max_event_age(),
            max_event_bytes: defaults::max_event_bytes(),
            flush_interval: defaults::flush_interval(),
            max_pending_events: defaults::max_pending_events(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingSettings {
    /// ISO 4217 code every price is quoted in, e.g. `USD`.
    pub currency: String,
    #[serde(default)]
    pub hardware: Vec<HardwarePrice>,
    #[serde(default)]
    pub coefficients: Vec<CoefficientEntry>,
}

/// C_C and C_S of one hardware target. Prices are strings ("0.1") so they stay exact.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwarePrice {
    pub name: HardwareName,
    #[serde(deserialize_with = "exact_decimal")]
    pub compute_price: UnitPrice,
    #[serde(deserialize_with = "exact_decimal")]
    pub storage_price: UnitPrice,
    /// Where the target runs, shown by `recommend`; untagged when absent.
    #[serde(default)]
    pub deployment: Option<Deployment>,
}

/// Where a hardware target runs: a cloud provider's machines or devices at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Deployment {
    Cloud,
    Edge,
}

impl TryFrom<String> for Deployment {
    type Error = String;

    // By hand rather than serde's enum support, whose error through the `config` crate
    // ("does not have variant constructor") does not say what is allowed.
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "cloud" => Ok(Deployment::Cloud),
            "edge" => Ok(Deployment::Edge),
            other => Err(format!("deployment must be \"cloud\" or \"edge\", got {other:?}")),
        }
    }
}

impl Deployment {
    pub fn as_str(self) -> &'static str {
        match self {
            Deployment::Cloud => "cloud",
            Deployment::Edge => "edge",
        }
    }
}

/// k1 and k2 of one (model, hardware) pair; pairs without an entry use 1 and 1.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoefficientEntry {
    pub model: ModelName,
    pub hardware: HardwareName,
    #[serde(deserialize_with = "exact_decimal")]
    pub k1: Coefficient,
    #[serde(deserialize_with = "exact_decimal")]
    pub k2: Coefficient,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Where `/metrics`, the health endpoints and the API listen.
    #[serde(default = "defaults::http_listen")]
    pub listen: String,
    /// When set, `/api/v1/*` requires `Authorization: Bearer <token>`. Never logged; prefer
    /// `COSTWATCH__HTTP__API_TOKEN` over the file.
    #[serde(default)]
    pub api_token: Option<String>,
}

impl fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSettings")
            .field("listen", &self.listen)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: defaults::http_listen(),
            api_token: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Distinct models that get their own label value; the rest are reported as `other`.
    #[serde(default = "defaults::max_models")]
    pub max_models: usize,
    /// Distinct hardware targets that get their own label value; the rest are `other`.
    #[serde(default = "defaults::max_hardware")]
    pub max_hardware: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            max_models: defaults::max_models(),
            max_hardware: defaults::max_hardware(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSettings {
    /// How often the daemon looks for coefficient versions stored by `costwatch calibrate`;
    /// a new version prices new windows from the next flush after it is seen.
    #[serde(default = "defaults::reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for CalibrationSettings {
    fn default() -> Self {
        Self {
            reload_interval: defaults::reload_interval(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendationSettings {
    /// The usage behind `costwatch_potential_savings`: this much history, ending now.
    #[serde(default = "defaults::savings_window", with = "humantime_serde")]
    pub savings_window: Duration,
    /// How often the daemon recomputes `costwatch_potential_savings`.
    #[serde(default = "defaults::savings_refresh", with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for RecommendationSettings {
    fn default() -> Self {
        Self {
            savings_window: defaults::savings_window(),
            refresh_interval: defaults::savings_refresh(),
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn session_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_connections() -> u32 {
        4
    }
    pub fn window_size() -> Duration {
        Duration::from_secs(60)
    }
    pub fn allowed_lateness() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn dedup_horizon() -> Duration {
        Duration::from_secs(60 * 60)
    }
    pub fn max_future_skew() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn max_event_age() -> Duration {
        Duration::from_secs(7 * 24 * 60 * 60)
    }
    pub fn max_event_bytes() -> usize {
        64 * 1024
    }
    pub fn flush_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_pending_events() -> usize {
        200_000
    }
    pub fn max_models() -> usize {
        100
    }
    pub fn max_hardware() -> usize {
        50
    }
    pub fn reload_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn savings_window() -> Duration {
        Duration::from_secs(24 * 60 * 60)
    }
    pub fn savings_refresh() -> Duration {
        Duration::from_secs(60)
    }
    pub fn http_listen() -> String {
        "127.0.0.1:9464".to_owned()
    }
}

/// Why settings could not be used. Every problem is listed, each with its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

impl Settings {
    /// Loads `path` (if given), then `COSTWATCH__*` environment variables on top, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot, collecting every problem instead of stopping at the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut require = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };

        require(
            !self.kafka.brokers.trim().is_empty(),
            "kafka.brokers: must not be empty".into(),
        );
        require(
            !self.kafka.topic.trim().is_empty(),
            "kafka.topic: must not be empty".into(),
        );
        require(
            !self.kafka.group_id.trim().is_empty(),
            "kafka.group_id: must not be empty".into(),
        );
        require(
            self.kafka.session_timeout >= Duration::from_secs(1),
            "kafka.session_timeout: must be at least 1s".into(),
        );
        require(
            self.database.url.starts_with("postgres://") || self.database.url.starts_with("postgresql://"),
            "database.url: must start with postgres:// or postgresql://".into(),
        );
        require(
            self.database.max_connections >= 2,
            "database.max_connections: must be at least 2".into(),
        );

        let size = self.windows.size;
        require(
            size >= Duration::from_secs(1) && size.subsec_nanos() == 0,
            "windows.size: must be a whole number of seconds, at least 1s".into(),
        );
        require(
            size <= Duration::from_secs(24 * 60 * 60) && (24 * 60 * 60) % size.as_secs().max(1) == 0,
            "windows.size: must divide a day evenly (e.g. 10s, 1m, 5m, 1h), so windows align across days".into(),
        );
        require(
            self.ingest.max_event_age > self.windows.allowed_lateness,
            "ingest.max_event_age: must be longer than windows.allowed_lateness".into(),
        );
        require(
            self.ingest.max_event_bytes >= 256,
            "ingest.max_event_bytes: must be at least 256".into(),
        );
        require(
            self.ingest.flush_interval >= Duration::from_millis(10),
            "ingest.flush_interval: must be at least 10ms".into(),
        );
        require(
            self.ingest.max_pending_events >= 1,
            "ingest.max_pending_events: must be at least 1".into(),
        );

        let currency = &self.pricing.currency;
        require(
            currency.len() == 3 && currency.chars().all(|c| c.is_ascii_uppercase()),
            format!("pricing.currency: {currency:?} is not a three-letter ISO 4217 code such as \"USD\""),
        );
        let mut seen_hw = HashSet::new();
        for (i, hw) in self.pricing.hardware.iter().enumerate() {
            require(
                seen_hw.insert(&hw.name),
                format!("pricing.hardware[{i}].name: {:?} is priced twice", hw.name.as_str()),
            );
            require(
                hw.compute_price.0 >= Decimal::ZERO,
                format!("pricing.hardware[{i}].compute_price: must not be negative"),
            );
            require(
                hw.storage_price.0 >= Decimal::ZERO,
                format!("pricing.hardware[{i}].storage_price: must not be negative"),
            );
        }
        let mut seen_pairs = HashSet::new();
        for (i, c) in self.pricing.coefficients.iter().enumerate() {
            require(
                seen_pairs.insert((&c.model, &c.hardware)),
                format!(
                    "pricing.coefficients[{i}]: ({}, {}) has coefficients twice",
                    c.model, c.hardware
                ),
            );
            require(
                c.k1.0 >= Decimal::ZERO,
                format!("pricing.coefficients[{i}].k1: must not be negative"),
            );
            require(
                c.k2.0 >= Decimal::ZERO,
                format!("pricing.coefficients[{i}].k2: must not be negative"),
            );
        }
        require(
            std::net::SocketAddr::from_str(&self.http.listen).is_ok(),
            format!(
                "http.listen: {:?} is not an address such as 127.0.0.1:9464",
                self.http.listen
            ),
        );

        require(
            self.http.api_token.as_ref().is_none_or(|t| t.len() >= 16),
            "http.api_token: must be at least 16 characters".into(),
        );
        require(
            self.metrics.max_models >= 1,
            "metrics.max_models: must be at least 1".into(),
        );
        require(
            self.metrics.max_hardware >= 1,
            "metrics.max_hardware: must be at least 1".into(),
        );

        require(
            self.calibration.reload_interval >= Duration::from_millis(100),
            "calibration.reload_interval: must be at least 100ms".into(),
        );
        require(
            self.recommendations.savings_window >= Duration::from_secs(60),
            "recommendations.savings_window: must be at least 1m".into(),
        );
        require(
            self.recommendations.refresh_interval >= Duration::from_millis(100),
            "recommendations.refresh_interval: must be at least 100ms".into(),
        );

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        topic = "inference-usage"
        group_id = "costwatch"

        [database]
        url = "postgres://postgres@127.0.0.1:5432/costwatch"

        [windows]
        size = "1m"
        allowed_lateness = "5m"

        [pricing]
        currency = "USD"

        [[pricing.hardware]]
        name = "a100-80g"
        compute_price = "0.1"
        storage_price = "0.2"

        [[pricing.coefficients]]
        model = "qwen2-7b-instruct"
        hardware = "a100-80g"
        k1 = "0.5"
        k2 = "0.8"
    "#;

    fn parse(toml: &str) -> Result<Settings, ConfigError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    #[test]
    fn the_documented_example_loads_with_defaults() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(s.windows.size, Duration::from_secs(60));
        assert_eq!(s.ingest.dedup_horizon, Duration::from_secs(3600));
        assert_eq!(s.kafka.start_from, StartFrom::Earliest);
        assert_eq!(s.pricing.hardware[0].compute_price.to_string(), "0.1");
        assert_eq!(s.pricing.coefficients[0].k2.to_string(), "0.8");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let bad = EXAMPLE
            .replace("size = \"1m\"", "size = \"7s\"")
            .replace("currency = \"USD\"", "currency = \"dollars\"")
            .replace("k1 = \"0.5\"", "k1 = \"-0.5\"");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("windows.size: must divide a day evenly"), "{err}");
        assert!(
            err.contains("pricing.currency: \"dollars\" is not a three-letter"),
            "{err}"
        );
        assert!(
            err.contains("pricing.coefficients[0].k1: must not be negative"),
            "{err}"
        );
    }

    #[test]
    fn float_prices_are_refused_with_a_hint() {
        let bad = EXAMPLE.replace("compute_price = \"0.1\"", "compute_price = 0.1");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("write 0.1 as a string (\"0.1\")"), "{err}");
    }

    #[test]
    fn hardware_may_carry_a_deployment_tag_and_calibration_has_defaults() {
        let tagged = EXAMPLE.replace(
            "storage_price = \"0.2\"",
            "storage_price = \"0.2\"\ndeployment = \"edge\"",
        );
        let s = parse(&tagged).unwrap();
        assert_eq!(s.pricing.hardware[0].deployment, Some(Deployment::Edge));
        assert_eq!(s.calibration.reload_interval, Duration::from_secs(5));
        assert_eq!(s.recommendations.savings_window, Duration::from_secs(24 * 3600));
        assert_eq!(parse(EXAMPLE).unwrap().pricing.hardware[0].deployment, None);

        let err = parse(&tagged.replace("\"edge\"", "\"moon\"")).unwrap_err().to_string();
        assert!(
            err.contains("deployment must be \"cloud\" or \"edge\", got \"moon\""),
            "{err}"
        );
        let err = parse(&format!("{EXAMPLE}\n[calibration]\nreload_interval = \"1ms\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("calibration.reload_interval: must be at least 100ms"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = EXAMPLE.replace("group_id = \"costwatch\"", "group_id = \"costwatch\"\ngroup = \"x\"");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `group`"), "{err}");
    }
}
