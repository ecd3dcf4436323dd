//! Settings: one validated tree, loaded from a TOML file and then the environment
//! (`COSTWATCH__SECTION__KEY`), checked in one pass that reports every problem with its key.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::domain::{exact_decimal, fraction, Coefficient, HardwareName, ModelName, Money, UnitPrice};
use crate::secret::Secret;

pub mod sources;
pub use sources::{SourceFormat, SourceSettings, TimestampFormat, UsageProfileSettings};
mod duration;
mod shape;
// Every `with = "humantime_serde"` below reads through our own module, which refuses month
// units (`"1M"` is a month in humantime, almost always a typo for `"1m"`); see `duration`.
use duration as humantime_serde;

/// The environment prefix; keys below it are separated by `__`, e.g. `COSTWATCH__KAFKA__BROKERS`.
pub const ENV_PREFIX: &str = "COSTWATCH";

/// Everything costwatch can be told. Unknown keys are an error, so a typo never goes unnoticed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[kafka]`: the brokers, topic and consumer group.
    pub kafka: KafkaSettings,
    /// `[database]`: where PostgreSQL is and how to log in.
    pub database: DatabaseSettings,
    /// `[windows]`: the event-time windows usage is summed in.
    #[serde(default)]
    pub windows: WindowSettings,
    /// `[ingest]`: validation limits, flushing, back-pressure, retention of rejected messages.
    #[serde(default)]
    pub ingest: IngestSettings,
    /// `[pricing]`: the currency, each hardware target's prices, and configured k1, k2.
    pub pricing: PricingSettings,
    /// `[http]`: the listener for `/metrics`, health probes and the API.
    #[serde(default)]
    pub http: HttpSettings,
    /// `[metrics]`: label caps of the Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// `[alerting]`: Alertmanager, webhooks, and how budgets are evaluated.
    #[serde(default)]
    pub alerting: AlertingSettings,
    /// Spend limits per period and scope, evaluated against the priced history.
    #[serde(default)]
    pub budgets: Vec<BudgetSettings>,
    /// `[calibration]`: how the daemon picks up coefficient versions.
    #[serde(default)]
    pub calibration: CalibrationSettings,
    /// `[recommendations]`: the potential-savings gauge.
    #[serde(default)]
    pub recommendations: RecommendationSettings,
    /// `[log]`: the log format.
    #[serde(default)]
    pub log: LogSettings,
    /// `[retention]`: how long each tier of history and rejected messages are kept.
    #[serde(default)]
    pub retention: RetentionSettings,
    /// `[[sources]]`: the topics usage is read from and their formats; without any, `[kafka]
    /// topic` is the one source, in costwatch's own format.
    #[serde(default)]
    pub sources: Vec<SourceSettings>,
    /// `[[usage_profiles]]`: how token counts become T and S, per (model, hardware) glob pair.
    #[serde(default)]
    pub usage_profiles: Vec<UsageProfileSettings>,
}

/// `[retention]`: how long history is kept, per tier; whole partitions are dropped hourly.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Raw minute windows (`window_usage`, one partition per UTC day).
    #[serde(default = "defaults::windows_retention", with = "humantime_serde")]
    pub windows: Duration,
    /// Hourly roll-ups (`usage_hourly`, one partition per UTC month).
    #[serde(default = "defaults::hourly_retention", with = "humantime_serde")]
    pub hourly: Duration,
    /// Daily roll-ups (`usage_daily`, one partition per UTC year); unset: kept forever.
    #[serde(default, with = "humantime_serde::option")]
    pub daily: Option<Duration>,
    /// Rejected messages (`rejected_events`); formerly `ingest.rejected_retention`.
    #[serde(default, with = "humantime_serde::option")]
    pub rejected: Option<Duration>,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            windows: defaults::windows_retention(),
            hourly: defaults::hourly_retention(),
            daily: None,
            rejected: None,
        }
    }
}

impl Settings {
    /// How long rejected messages are kept: `retention.rejected`, else its old name
    /// `ingest.rejected_retention`, else 14 days.
    pub fn rejected_retention(&self) -> Duration {
        self.retention
            .rejected
            .or(self.ingest.rejected_retention)
            .unwrap_or_else(defaults::rejected_retention)
    }

    fn validate_retention(&self, p: &mut Problems) {
        let r = &self.retention;
        let day = Duration::from_secs(24 * 60 * 60);
        if let (Some(new), Some(old)) = (r.rejected, self.ingest.rejected_retention) {
            p.require(
                new == old,
                format!(
                    "retention.rejected ({}) and its old name ingest.rejected_retention ({}) disagree: \
                     keep retention.rejected only",
                    humantime::format_duration(new),
                    humantime::format_duration(old)
                ),
            );
        }
        p.require(
            self.rejected_retention() >= Duration::from_secs(60 * 60),
            "retention.rejected: must be at least 1h",
        );
        // Raw days are what late events and `rerate` still change: keep them while events for
        // them are accepted.
        let lateness = self.ingest.max_event_age + self.windows.allowed_lateness;
        p.require(
            r.windows >= day && r.windows > lateness,
            format!(
                "retention.windows: must be at least 1d and longer than ingest.max_event_age plus \
                 windows.allowed_lateness ({}), got {}",
                humantime::format_duration(lateness),
                humantime::format_duration(r.windows)
            ),
        );
        p.require(
            r.hourly >= r.windows,
            "retention.hourly: must be at least retention.windows (older hours would be answered by nothing finer than a day)",
        );
        if let Some(daily) = r.daily {
            p.require(daily >= r.hourly, "retention.daily: must be at least retention.hourly");
        }
    }
}

/// `[kafka]`: where usage events come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma separated: `host:port[,host:port]`.
    pub brokers: String,
    /// The topic inference servers publish usage events to; with `[[sources]]` it may be left
    /// out (each source names its topic).
    #[serde(default)]
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
    /// Secret-looking ones (`sasl.password`, ...) are redacted wherever costwatch prints.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties read from files, the `*_file` convention:
    /// `"sasl.password" = "/run/secrets/kafka-password"`. Always treated as secrets.
    #[serde(default)]
    pub property_files: BTreeMap<String, PathBuf>,
    /// Every operator property with its value and where it came from: `properties`, then
    /// `property_files`, then `COSTWATCH_KAFKA_<NAME>` environment variables. Filled by
    /// [`Settings::load`]; [`KafkaSettings::operator_properties`] falls back to `properties`.
    #[serde(skip)]
    pub resolved: Option<Vec<KafkaProperty>>,
}

/// Where a partition with no offset stored in PostgreSQL starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest offset the topic still holds (nothing produced before the first start is lost).
    #[default]
    Earliest,
    /// The end of the partition: only what is produced from now on.
    Latest,
}

/// `[database]`: costwatch's PostgreSQL.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user[:password]@host:port/database[?sslmode=verify-full&sslrootcert=...]`.
    /// Never logged.
    pub url: String,
    /// The password, overriding the URL's; prefer `password_file` or `COSTWATCH__DATABASE__PASSWORD`.
    /// After [`Settings::load`] it holds the password read from `password_file` too.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the password (the `*_file` convention), e.g. `/run/secrets/db-password`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connections in the pool (at least 2: one for flushes, one for the rest).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
}

impl fmt::Debug for DatabaseSettings {
    // The URL may carry a password: keep it out of every debug print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &"<redacted>")
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// `[windows]`: event-time tumbling windows.
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

/// `[ingest]`: what an event may be, and how pending usage is written.
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
    /// Flush early once this many payload bytes were read since the last flush: a burst of
    /// large messages bounds memory too, not only a burst of many.
    #[serde(default = "defaults::max_pending_bytes")]
    pub max_pending_bytes: usize,
    /// At most this many bytes of a rejected message are kept in `rejected_events` (with its
    /// full size and SHA-256).
    #[serde(default = "defaults::max_rejected_payload_bytes")]
    pub max_rejected_payload_bytes: usize,
    /// The old name of `retention.rejected`, still read; [`Settings::rejected_retention`] is
    /// the one in force.
    #[serde(default, with = "humantime_serde::option")]
    pub rejected_retention: Option<Duration>,
    /// A partition whose stored offset has not moved for this long (or for twice
    /// `flush_interval`, if that is longer) while it has messages to read is reported stalled
    /// (`/readyz`, `costwatch_partition_stalled`).
    #[serde(default = "defaults::stall_after", with = "humantime_serde")]
    pub stall_after: Duration,
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
            max_pending_bytes: defaults::max_pending_bytes(),
            max_rejected_payload_bytes: defaults::max_rejected_payload_bytes(),
            rejected_retention: None,
            stall_after: defaults::stall_after(),
        }
    }
}

/// `[pricing]`: the unit prices C_C, C_S per hardware target and the coefficients k1, k2.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingSettings {
    /// ISO 4217 code every price is quoted in, e.g. `USD`.
    pub currency: String,
    /// One entry per hardware target; usage on a target without one is recorded unpriced.
    #[serde(default)]
    pub hardware: Vec<HardwarePrice>,
    /// k1 and k2 per (model, hardware); pairs without an entry use 1 and 1.
    #[serde(default)]
    pub coefficients: Vec<CoefficientEntry>,
}

/// C_C and C_S of one hardware target. Prices are strings ("0.1") so they stay exact.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwarePrice {
    /// The hardware target's name, as events carry it.
    pub name: HardwareName,
    /// C_C: the price of one unit of compute (T) on this target, in `pricing.currency`.
    #[serde(deserialize_with = "exact_decimal")]
    pub compute_price: UnitPrice,
    /// C_S: the price of one unit of storage (S) on this target, in `pricing.currency`.
    #[serde(deserialize_with = "exact_decimal")]
    pub storage_price: UnitPrice,
    /// Where the target runs, shown by `recommend`; untagged when absent.
    #[serde(default)]
    pub deployment: Option<Deployment>,
    /// From when this entry prices the hardware (RFC 3339): a window is priced by the entry in
    /// force at its start, the one with the latest `effective_from` not after it. Absent means
    /// since forever; before a hardware's earliest entry its usage is unpriced.
    #[serde(default)]
    pub effective_from: Option<chrono::DateTime<chrono::Utc>>,
}

/// Where a hardware target runs: a cloud provider's machines or devices at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Deployment {
    /// A cloud provider's machines.
    Cloud,
    /// Devices at the edge.
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
            other => Err(format!("must be \"cloud\" or \"edge\", got {other:?}")),
        }
    }
}

impl TryFrom<String> for Period {
    type Error = String;

    // By hand, as for `Deployment`: the `config` crate's error for an unknown variant does not
    // say which exist.
    fn try_from(s: String) -> Result<Self, String> {
        Period::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Period::ALL.iter().map(|p| p.as_str()).collect();
            format!("must be one of {}, got {s:?}", names.join(", "))
        })
    }
}

impl Deployment {
    /// The name as configured (`cloud`, `edge`).
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
    /// The model's name, as events carry it.
    pub model: ModelName,
    /// The hardware target's name, as events carry it.
    pub hardware: HardwareName,
    /// Multiplies C_C × T in the cost model.
    #[serde(deserialize_with = "exact_decimal")]
    pub k1: Coefficient,
    /// Multiplies C_S × S in the cost model.
    #[serde(deserialize_with = "exact_decimal")]
    pub k2: Coefficient,
}

/// `[http]`: the listener for `/metrics`, health probes and the JSON API.
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
    /// When true, `/metrics` requires the same bearer token as the API (needs `api_token`).
    #[serde(default)]
    pub protect_metrics: bool,
    /// A connection must deliver a request's line and headers within this long (counted from
    /// its first byte, or from the connection's opening), or it is closed: a client trickling
    /// header bytes would otherwise hold a connection and its task forever.
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request that takes longer than this to answer gets `503` with a JSON error.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A file holding the token (the `*_file` convention); read into `api_token` at load.
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
}

impl fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSettings")
            .field("listen", &self.listen)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("protect_metrics", &self.protect_metrics)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("api_token_file", &self.api_token_file)
            .finish()
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: defaults::http_listen(),
            api_token: None,
            protect_metrics: false,
            header_read_timeout: defaults::header_read_timeout(),
            request_timeout: defaults::request_timeout(),
            api_token_file: None,
        }
    }
}

/// `[metrics]`: how many label values the metrics keep.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Distinct models that get their own label value; the rest are reported as `other`.
    #[serde(default = "defaults::max_models")]
    pub max_models: usize,
    /// Distinct hardware targets that get their own label value; the rest are `other`.
    #[serde(default = "defaults::max_hardware")]
    pub max_hardware: usize,
    /// Event labels added to the usage and cost counters (`costwatch_cost_total`,
    /// `costwatch_compute_units_total`, `costwatch_storage_units_total`,
    /// `costwatch_unpriced_events_total`), e.g. `["tenant"]`. None by default: every label
    /// multiplies the series.
    #[serde(default)]
    pub label_dimensions: Vec<String>,
    /// Distinct values each of `label_dimensions` keeps in metrics (and, per budget, the splits
    /// of a `split_by` budget in its gauges); the rest are `other`.
    #[serde(default = "defaults::max_label_values")]
    pub max_label_values: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            max_models: defaults::max_models(),
            max_hardware: defaults::max_hardware(),
            label_dimensions: Vec::new(),
            max_label_values: defaults::max_label_values(),
        }
    }
}

/// Where alerts go and how often budgets are evaluated.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertingSettings {
    /// Alertmanager's base URL, e.g. `http://127.0.0.1:9093`; alerts are posted to its API v2.
    #[serde(default)]
    pub alertmanager_url: Option<String>,
    /// How often spend is read from PostgreSQL and alert states are decided.
    #[serde(default = "defaults::evaluation_interval", with = "humantime_serde")]
    pub evaluation_interval: Duration,
    /// The short and long burn-rate windows of the forecast (see the README).
    #[serde(default = "defaults::forecast_short_window", with = "humantime_serde")]
    pub forecast_short_window: Duration,
    /// The long burn-rate window of the forecast.
    #[serde(default = "defaults::forecast_long_window", with = "humantime_serde")]
    pub forecast_long_window: Duration,
    /// Shown to humans as the alert's source (`generatorURL`), e.g. the costwatch API's address.
    #[serde(default)]
    pub external_url: Option<String>,
    /// Generic HTTP receivers, each getting signed JSON posts.
    #[serde(default)]
    pub webhooks: Vec<WebhookSettings>,
}

impl fmt::Debug for AlertingSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertingSettings")
            .field("alertmanager_url", &self.alertmanager_url.as_deref().map(redact_url))
            .field("evaluation_interval", &self.evaluation_interval)
            .field("forecast_short_window", &self.forecast_short_window)
            .field("forecast_long_window", &self.forecast_long_window)
            .field("webhooks", &self.webhooks)
            .finish()
    }
}

impl Default for AlertingSettings {
    fn default() -> Self {
        Self {
            alertmanager_url: None,
            evaluation_interval: defaults::evaluation_interval(),
            forecast_short_window: defaults::forecast_short_window(),
            forecast_long_window: defaults::forecast_long_window(),
            external_url: None,
            webhooks: Vec::new(),
        }
    }
}

/// One generic webhook receiver. The body is signed with HMAC-SHA256 over the exact bytes.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Names this receiver in the delivery log and metrics; defaults to `webhook-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// The receiver's http(s) URL; never logged (it may carry a token).
    pub url: String,
    /// The signing secret. Prefer `secret_env` so the secret stays out of the file.
    #[serde(default)]
    pub secret: Option<String>,
    /// The name of an environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the secret (the `*_file` convention); read into `secret` at load.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// How long one post may take before it counts as failed and is retried.
    #[serde(default = "defaults::webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl fmt::Debug for WebhookSettings {
    // The secret, and a URL that may carry a token, stay out of every debug print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("name", &self.name)
            .field("url", &"<redacted>")
            .field("secret", &"<redacted>")
            .field("secret_env", &self.secret_env)
            .field("secret_file", &self.secret_file)
            .finish()
    }
}

impl WebhookSettings {
    /// The name this receiver goes by in the outbox, logs and metrics: `name`, else
    /// `webhook-<index>`.
    pub fn name_or_default(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("webhook-{index}"))
    }

    /// The secret from the file or from the named environment variable.
    pub fn resolve_secret(&self) -> Option<String> {
        match (&self.secret, &self.secret_env) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(var)) => std::env::var(var).ok().filter(|s| !s.is_empty()),
            (None, None) => None,
        }
    }
}

/// A spend limit over a calendar period for the usage that matches a scope.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    /// Names the budget in alerts, metrics and the API: letters, digits, '-', '_', '.', ':'.
    pub name: String,
    /// The calendar period the amount is for.
    pub period: Period,
    /// In `pricing.currency`, as a string so it stays exact.
    #[serde(deserialize_with = "exact_decimal")]
    pub amount: Money,
    /// Globs (`*`, `?`) on model, hardware and label values; omitted means everything.
    #[serde(default, rename = "match")]
    pub scope: ScopeSettings,
    /// Label names: the budget is evaluated separately for every combination of their values
    /// seen this period, each with its own spend, state and alerts (per-team budgets without
    /// listing the teams). Usage without one of these labels is in no split.
    #[serde(default)]
    pub split_by: Vec<String>,
    /// Fractions of `amount`; each one alerts once per period when spend reaches it.
    #[serde(default = "defaults::thresholds", deserialize_with = "fractions")]
    pub thresholds: Vec<Decimal>,
    /// Also alert when the projected end-of-period spend exceeds `amount`.
    #[serde(default)]
    pub forecast: bool,
    /// Alert when the recent spend rate jumps above its trailing baseline.
    #[serde(default)]
    pub drift: Option<DriftSettings>,
    /// Alert while usage in scope has no price (default on).
    #[serde(default = "defaults::yes")]
    pub unpriced: bool,
    /// The `severity` label of this budget's threshold, forecast and drift alerts.
    #[serde(default = "defaults::severity")]
    pub severity: String,
    /// Calendar periods start at midnight (and on Mondays, and on the 1st) in this zone.
    #[serde(default = "defaults::time_zone")]
    pub time_zone: chrono_tz::Tz,
}

/// A budget's calendar period, in its time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Period {
    /// From the full hour.
    Hourly,
    /// From midnight.
    Daily,
    /// From Monday midnight.
    Weekly,
    /// From the 1st of the month at midnight.
    Monthly,
    /// From midnight on January, April, July and October 1st.
    Quarterly,
    /// From midnight on January 1st.
    Yearly,
}

impl Period {
    /// Every period, in the order the error for an unknown one lists them.
    pub const ALL: [Period; 6] = [
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Quarterly,
        Period::Yearly,
    ];

    /// The name as configured (`hourly`, `daily`, `weekly`, `monthly`, `quarterly`, `yearly`).
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Quarterly => "quarterly",
            Period::Yearly => "yearly",
        }
    }
}

/// Which usage a budget counts: globs (`*`, `?`) on model, hardware and label values.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeSettings {
    /// A glob on model names; omitted means every model.
    #[serde(default)]
    pub model: Option<String>,
    /// A glob on hardware names; omitted means every target.
    #[serde(default)]
    pub hardware: Option<String>,
    /// Per label name, a glob its value must match (`{ tenant = "search-*" }`); usage without
    /// the label does not match, whatever the glob.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Label names a budget's `split_by` cannot use: its alerts already carry labels of these names.
pub const RESERVED_SPLIT_LABELS: [&str; 8] = [
    "alertname",
    "budget",
    "kind",
    "severity",
    "threshold",
    "period",
    "model",
    "hardware",
];

/// `factor`: how many times the baseline rate the recent rate must be to alert.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSettings {
    /// How many times the baseline rate the recent rate must be to alert (greater than 1).
    #[serde(deserialize_with = "fraction")]
    pub factor: Decimal,
    /// The recent window whose spend rate is compared.
    #[serde(default = "defaults::drift_window", with = "humantime_serde")]
    pub window: Duration,
    /// The trailing window before it that sets the baseline rate.
    #[serde(default = "defaults::drift_baseline", with = "humantime_serde")]
    pub baseline: Duration,
    /// Recent spend below this never alerts, so a jump from nearly nothing stays quiet.
    #[serde(default, deserialize_with = "exact_decimal")]
    pub min_spend: Money,
}

fn fractions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Decimal>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "fraction")] Decimal);
    Ok(Vec::<Wrap>::deserialize(d)?.into_iter().map(|w| w.0).collect())
}

/// `[calibration]`: coefficient versions in a running daemon.
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

/// `[recommendations]`: the `costwatch_potential_savings` gauge.
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

/// How costwatch writes its log (to stderr). The level is `RUST_LOG`'s, `info` by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (default): one human-readable line per event. `json`: one JSON object per line,
    /// with `timestamp`, `level`, `target`, `message` and the event's fields at the top level, for
    /// log collectors; the container image and the manifests set it.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    // By hand, like `Deployment`, so that a wrong value names the allowed ones.
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("must be \"text\" or \"json\", got {other:?}")),
        }
    }
}

impl LogSettings {
    /// The `[log]` section alone, from the same file and environment as [`Settings::load`],
    /// read before anything else so that every line is written in the configured format.
    /// A file that does not parse falls back to the environment alone (so that its error is
    /// still written in the format the environment asks for); anything else wrong yields the
    /// default here, and `load` then reports it with its key.
    pub fn peek(path: Option<&Path>) -> LogSettings {
        let read = |path| layered(path).build().ok()?.get::<LogSettings>("log").ok();
        read(path).or_else(|| read(None)).unwrap_or_default()
    }
}

mod defaults {
    use std::time::Duration;

    use rust_decimal::Decimal;

    pub fn evaluation_interval() -> Duration {
        Duration::from_secs(15)
    }
    pub fn forecast_short_window() -> Duration {
        Duration::from_secs(60 * 60)
    }
    pub fn forecast_long_window() -> Duration {
        Duration::from_secs(6 * 60 * 60)
    }
    pub fn webhook_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn thresholds() -> Vec<Decimal> {
        vec![Decimal::new(5, 1), Decimal::new(8, 1), Decimal::ONE]
    }
    pub fn yes() -> bool {
        true
    }
    pub fn severity() -> String {
        "page".into()
    }
    pub fn time_zone() -> chrono_tz::Tz {
        chrono_tz::UTC
    }
    pub fn drift_window() -> Duration {
        Duration::from_secs(60 * 60)
    }
    pub fn drift_baseline() -> Duration {
        Duration::from_secs(24 * 60 * 60)
    }

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
    pub fn max_pending_bytes() -> usize {
        64 * 1024 * 1024
    }
    pub fn max_rejected_payload_bytes() -> usize {
        4 * 1024
    }
    pub fn rejected_retention() -> Duration {
        Duration::from_secs(14 * 24 * 60 * 60)
    }
    pub fn windows_retention() -> Duration {
        Duration::from_secs(35 * 24 * 60 * 60)
    }
    pub fn hourly_retention() -> Duration {
        Duration::from_secs(400 * 24 * 60 * 60)
    }
    pub fn stall_after() -> Duration {
        Duration::from_secs(2 * 60)
    }
    pub fn max_models() -> usize {
        100
    }
    pub fn max_hardware() -> usize {
        50
    }
    pub fn max_label_values() -> usize {
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
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

/// `url` as messages and logs may show it: the userinfo (`user:password@`) and anything from
/// the query or fragment on become `<redacted>`, since either may carry a credential. It works
/// on text that does not parse as a URL too, which is exactly what validation echoes back.
pub fn redact_url(url: &str) -> String {
    let (address, tail) = match url.find(['?', '#']) {
        Some(at) => (&url[..at], &url[at..at + 1]),
        None => (url, ""),
    };
    // Without a scheme ("user:pw@host:9093") the authority starts the text.
    let authority_start = address.find("://").map_or(0, |at| at + 3);
    let authority_end = address[authority_start..]
        .find('/')
        .map_or(address.len(), |at| authority_start + at);
    let mut shown = match address[authority_start..authority_end].rfind('@') {
        Some(at) => format!(
            "{}<redacted>{}",
            &address[..authority_start],
            &address[authority_start + at..]
        ),
        None => address.to_owned(),
    };
    if !tail.is_empty() {
        shown.push_str(tail);
        shown.push_str("<redacted>");
    }
    shown
}

/// One librdkafka property the operator set, with where it was set.
#[derive(Clone, Debug)]
pub struct KafkaProperty {
    /// The librdkafka property name, e.g. `sasl.password`.
    pub name: String,
    /// Its value; a secret one prints as `<redacted>`.
    pub value: PropertyValue,
    /// Where it was set, as the operator wrote it: `kafka.properties."sasl.password"`,
    /// `kafka.property_files."sasl.password"` or `COSTWATCH_KAFKA_SASL_PASSWORD`.
    pub origin: String,
}

/// A property value; secrets print as `<redacted>`.
#[derive(Clone, Debug)]
pub enum PropertyValue {
    /// A value that may be printed.
    Plain(String),
    /// A value that is never printed.
    Secret(Secret),
}

impl PropertyValue {
    /// The value itself, for librdkafka; never print it.
    pub fn expose(&self) -> &str {
        match self {
            PropertyValue::Plain(v) => v,
            PropertyValue::Secret(s) => s.expose(),
        }
    }
}

/// librdkafka properties from the environment: `COSTWATCH_KAFKA_SASL_PASSWORD` sets
/// `sasl.password` (lower case, `_` for `.`; no librdkafka property has an `_` in its name).
pub const KAFKA_ENV_PREFIX: &str = "COSTWATCH_KAFKA_";

impl KafkaSettings {
    /// The operator's properties, resolved by [`Settings::load`] (or, for settings built
    /// without it, `properties` alone).
    pub fn operator_properties(&self) -> Vec<KafkaProperty> {
        self.resolved.clone().unwrap_or_else(|| self.inline_properties())
    }

    fn inline_properties(&self) -> Vec<KafkaProperty> {
        self.properties
            .iter()
            .map(|(name, value)| KafkaProperty {
                name: name.clone(),
                value: if is_sensitive_property(name) {
                    PropertyValue::Secret(Secret::new(value.clone()))
                } else {
                    PropertyValue::Plain(value.clone())
                },
                origin: format!("kafka.properties.{name:?}"),
            })
            .collect()
    }

    /// `properties`, then `property_files` (read now), then the environment on top, as the
    /// environment overrides the file for every other key.
    fn resolve(&self, env: &[(String, String)], problems: &mut Vec<String>) -> Vec<KafkaProperty> {
        let mut by_name: BTreeMap<String, KafkaProperty> = self
            .inline_properties()
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        for (name, path) in &self.property_files {
            let origin = format!("kafka.property_files.{name:?}");
            if self.properties.contains_key(name) {
                problems.push(format!("{origin}: also set in kafka.properties; set it in one place"));
                continue;
            }
            match Secret::from_file(path) {
                Ok(secret) => {
                    let value = PropertyValue::Secret(secret);
                    by_name.insert(
                        name.clone(),
                        KafkaProperty {
                            name: name.clone(),
                            value,
                            origin,
                        },
                    );
                }
                Err(e) => problems.push(format!("{origin}: cannot read {}: {e}", path.display())),
            }
        }
        for (var, value) in env {
            let Some(suffix) = var.strip_prefix(KAFKA_ENV_PREFIX) else {
                continue;
            };
            if suffix.is_empty() {
                problems.push(format!("{var}: names no librdkafka property"));
                continue;
            }
            let name = suffix.to_ascii_lowercase().replace('_', ".");
            let value = if is_sensitive_property(&name) {
                PropertyValue::Secret(Secret::new(value.clone()))
            } else {
                PropertyValue::Plain(value.clone())
            };
            by_name.insert(
                name.clone(),
                KafkaProperty {
                    name,
                    value,
                    origin: var.clone(),
                },
            );
        }
        by_name.into_values().collect()
    }
}

impl DatabaseSettings {
    /// The password in the URL, if any, so that it can be scrubbed too.
    fn url_password(&self) -> Option<Secret> {
        url_password(&self.url)
    }
}

/// The password of a `scheme://user:password@host` URL, percent-decoded.
fn url_password(url: &str) -> Option<Secret> {
    let url = reqwest::Url::parse(url).ok()?;
    Some(Secret::new(percent_decode(url.password()?)))
}

/// `<key>_file` read into `<key>` (`value`), unless both are set.
fn read_secret_file(key: &str, value: &mut Option<String>, file: &Option<PathBuf>, problems: &mut Vec<String>) {
    let Some(path) = file else {
        return;
    };
    if value.is_some() {
        problems.push(format!("{key}_file: set {key} or {key}_file, not both"));
        return;
    }
    match Secret::from_file(path) {
        Ok(secret) => *value = Some(secret.expose().to_owned()),
        Err(e) => problems.push(format!("{key}_file: cannot read {}: {e}", path.display())),
    }
}

/// `%XX` decoding for the URL's password (the `url` crate leaves it encoded).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Settings {
    /// Reads the `*_file` secrets and the `COSTWATCH_KAFKA_*` properties from `env`; returns
    /// every problem with its key (never with a secret's value).
    pub fn resolve_secrets(&mut self, env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut problems = Vec::new();
        self.kafka.resolved = Some(self.kafka.resolve(&env, &mut problems));
        let db = &mut self.database;
        match (&db.password, &db.password_file) {
            (Some(_), Some(_)) => problems
                .push("database.password_file: set database.password or database.password_file, not both".into()),
            (None, Some(path)) => match Secret::from_file(path) {
                Ok(secret) if secret.expose().is_empty() => {
                    problems.push(format!("database.password_file: {} is empty", path.display()))
                }
                Ok(secret) => db.password = Some(secret),
                Err(e) => problems.push(format!("database.password_file: cannot read {}: {e}", path.display())),
            },
            _ => {}
        }
        read_secret_file(
            "http.api_token",
            &mut self.http.api_token,
            &self.http.api_token_file,
            &mut problems,
        );
        for (i, w) in self.alerting.webhooks.iter_mut().enumerate() {
            read_secret_file(
                &format!("alerting.webhooks[{i}].secret"),
                &mut w.secret,
                &w.secret_file,
                &mut problems,
            );
        }
        problems
    }

    /// Every secret value these settings hold, for [`crate::secret::scrub`].
    pub fn secrets(&self) -> Vec<Secret> {
        let mut secrets: Vec<Secret> = self
            .kafka
            .operator_properties()
            .into_iter()
            .filter_map(|p| match p.value {
                PropertyValue::Secret(s) => Some(s),
                PropertyValue::Plain(_) => None,
            })
            .collect();
        secrets.extend(self.database.password.clone());
        secrets.extend(self.database.url_password());
        secrets.extend(self.alerting.alertmanager_url.as_deref().and_then(url_password));
        secrets.extend(self.http.api_token.clone().map(Secret::new));
        secrets.extend(
            self.alerting
                .webhooks
                .iter()
                .filter_map(|w| w.resolve_secret().map(Secret::new)),
        );
        secrets
    }
}

/// Properties whose values are secrets, as librdkafka marks them (its `_RK_SENSITIVE`, less the
/// file paths and the user name, which help more in an error than they could harm).
const SENSITIVE: &[&str] = &[
    "sasl.password",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "ssl.truststore.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
];

/// True for a property whose value must never be printed. Name fragments catch misspelt ones
/// too (`sasl.passwrod`), which librdkafka rejects but whose value is still a password.
pub fn is_sensitive_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SENSITIVE.contains(&name.as_str())
        || ["pass", "secret", "private", "credential"]
            .iter()
            .any(|fragment| name.contains(fragment))
}

/// Why settings could not be used. Every problem is listed, each with its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not parse (TOML syntax). Not a `#[source]`: the message already holds it,
    /// and `{:#}` would print it twice.
    #[error("cannot read configuration: {0}")]
    Load(config::ConfigError),
    /// The configuration file given does not exist or cannot be read.
    #[error("cannot read configuration file {}: {}", .0.display(), .1)]
    Unreadable(PathBuf, std::io::Error),
    /// The settings are readable but break rules; every problem with its key.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// The sources in order of precedence, lowest first: `path` (if given), then `COSTWATCH__*`
/// environment variables.
fn layered(path: Option<&Path>) -> config::ConfigBuilder<config::builder::DefaultState> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__"),
    )
}

impl From<config::ConfigError> for ConfigError {
    fn from(error: config::ConfigError) -> Self {
        ConfigError::Load(error)
    }
}

impl Settings {
    /// Loads `path` (if given), then `COSTWATCH__*` environment variables on top, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (settings, problems) = Self::load_with_problems(path)?;
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// [`Settings::load`], returning the problems beside the settings instead of failing on
    /// them, for a caller that checks more (librdkafka's verdict) and reports it all at once.
    /// Fails only when the file cannot be read or parsed at all.
    pub fn load_with_problems(path: Option<&Path>) -> Result<(Self, Vec<String>), ConfigError> {
        if let Some(path) = path {
            std::fs::File::open(path).map_err(|e| ConfigError::Unreadable(path.to_owned(), e))?;
        }
        // Variables that are not Unicode are no costwatch settings; std::env::vars would panic.
        let env = std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        let (settings, problems) = Self::from_config(layered(path).build()?, env)?;
        // Before anything can print: librdkafka's and sqlx's texts are scrubbed from now on.
        crate::secret::register(&settings.secrets());
        Ok((settings, problems))
    }

    /// Reads settings from a built configuration: every problem of its shape (missing keys,
    /// wrong types, unknown keys and values, each once with its key), and when there is none,
    /// the secrets from files and `env` and every [`Settings::validate`] problem beside the
    /// settings. With shape problems it fails, listing them with the validation problems that
    /// do not merely echo them.
    pub fn from_config(
        built: config::Config,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let shaped = shape::read::<Settings>(built.try_deserialize()?);
        let Some(mut settings) = shaped.value else {
            return Err(ConfigError::Invalid(shaped.problems));
        };
        let mut problems = settings.resolve_secrets(env);
        if let Err(ConfigError::Invalid(more)) = settings.validate() {
            problems.extend(more);
        }
        if shaped.problems.is_empty() {
            return Ok((settings, problems));
        }
        // The settings were read from a patched tree: keep only what is wrong elsewhere.
        let echoes = |problem: &String| {
            shaped.set_aside.iter().any(|key| {
                problem
                    .strip_prefix(key.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[', ':']))
            })
        };
        let mut all = shaped.problems;
        all.extend(problems.into_iter().filter(|p| !echoes(p)));
        Err(ConfigError::Invalid(all))
    }

    /// Checks what types alone cannot, collecting every problem instead of stopping at the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.kafka.validate(!self.sources.is_empty(), &mut problems);
        self.database.validate(&mut problems);
        self.windows.validate(&mut problems);
        self.ingest.validate(&mut problems);
        self.check_horizons(&mut problems);
        self.pricing.validate(&mut problems);
        self.http.validate(&mut problems);
        self.metrics.validate(&mut problems);
        self.calibration.validate(&mut problems);
        self.recommendations.validate(&mut problems);
        self.alerting.validate(&mut problems);
        self.validate_retention(&mut problems);
        sources::validate_sources(&self.sources, &mut problems);
        sources::validate_profiles(&self.usage_profiles, &mut problems);
        let mut names = HashSet::new();
        for (i, b) in self.budgets.iter().enumerate() {
            b.validate(&format!("budgets[{i}]"), &mut problems);
            problems.require(
                names.insert(b.name.as_str()),
                format!("budgets[{i}].name: {:?} is used by two budgets", b.name),
            );
        }
        problems.into_result()
    }
}

impl Settings {
    /// Durations that only make sense in one order, named with both keys and values: the
    /// mistakes a month-for-minute typo or a copied value make.
    fn check_horizons(&self, p: &mut Problems) {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        let (age, lateness) = (self.ingest.max_event_age, self.windows.allowed_lateness);
        p.require(
            age > lateness,
            format!(
                "ingest.max_event_age: {} must be longer than windows.allowed_lateness ({})",
                show(age),
                show(lateness)
            ),
        );
        // Events older than max_event_age are rejected before dedup looks at them, so ids kept
        // longer than that only cost memory (a month of ids, for "1M").
        let horizon = self.ingest.dedup_horizon;
        p.require(
            horizon <= age,
            format!(
                "ingest.dedup_horizon: {} is longer than ingest.max_event_age ({}); older events are rejected anyway, so make it at most that",
                show(horizon),
                show(age)
            ),
        );
    }
}

/// What a configuration reload does with each section: `pricing`, `budgets`, `alerting` and
/// `metrics` apply to all new work at once; the others hold connections, listeners or running
/// loops and wait for a restart.
impl Settings {
    /// The sections of `new` that differ from `self` but take effect only after a restart.
    /// Compared by their printed form plus the secrets it hides, so a changed password counts.
    pub fn restart_needed(&self, new: &Settings) -> Vec<&'static str> {
        let differs = |a: &dyn fmt::Debug, b: &dyn fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let mut sections = Vec::new();
        let mut check = |name: &'static str, changed: bool| {
            if changed {
                sections.push(name);
            }
        };
        check("kafka", differs(&self.kafka, &new.kafka));
        let password = |d: &DatabaseSettings| d.password.as_ref().map(|p| p.expose().to_owned());
        check(
            "database",
            differs(&self.database, &new.database)
                || self.database.url != new.database.url
                || password(&self.database) != password(&new.database),
        );
        check("http.listen", self.http.listen != new.http.listen);
        let (h, n) = (&self.http, &new.http);
        check(
            "http",
            h.api_token != n.api_token
                || h.api_token_file != n.api_token_file
                || h.protect_metrics != n.protect_metrics
                || h.header_read_timeout != n.header_read_timeout
                || h.request_timeout != n.request_timeout,
        );
        check("windows", differs(&self.windows, &new.windows));
        check("ingest", differs(&self.ingest, &new.ingest));
        check("calibration", differs(&self.calibration, &new.calibration));
        check("recommendations", differs(&self.recommendations, &new.recommendations));
        check("log", differs(&self.log, &new.log));
        check("sources", differs(&self.sources, &new.sources));
        sections
    }

    /// `self` with the sections a reload applies taken from `new`; every other section stays
    /// as the running daemon uses it until a restart.
    pub fn reloaded(&self, new: Settings) -> Settings {
        Settings {
            pricing: new.pricing,
            budgets: new.budgets,
            alerting: new.alerting,
            metrics: new.metrics,
            usage_profiles: new.usage_profiles,
            ..self.clone()
        }
    }
}

/// Every problem found in a configuration, each with its key.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Records `problem` unless `ok`.
    pub fn require(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.0.push(problem.into());
        }
    }

    fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

impl KafkaSettings {
    fn validate(&self, has_sources: bool, p: &mut Problems) {
        p.require(!self.brokers.trim().is_empty(), "kafka.brokers: must not be empty");
        // With `[[sources]]`, the topics are theirs and `kafka.topic` is not read.
        p.require(
            !self.topic.trim().is_empty() || has_sources,
            "kafka.topic: missing or empty; name the usage topic, or configure [[sources]]",
        );
        p.require(!self.group_id.trim().is_empty(), "kafka.group_id: must not be empty");
        p.require(
            self.session_timeout >= Duration::from_secs(1),
            "kafka.session_timeout: must be at least 1s",
        );
    }
}

impl DatabaseSettings {
    fn validate(&self, p: &mut Problems) {
        p.require(
            self.url.starts_with("postgres://") || self.url.starts_with("postgresql://"),
            "database.url: must start with postgres:// or postgresql://",
        );
        p.require(
            self.max_connections >= 2,
            "database.max_connections: must be at least 2",
        );
    }
}

impl WindowSettings {
    fn validate(&self, p: &mut Problems) {
        let size = self.size;
        p.require(
            size >= Duration::from_secs(1) && size.subsec_nanos() == 0,
            "windows.size: must be a whole number of seconds, at least 1s",
        );
        p.require(
            size <= Duration::from_secs(24 * 60 * 60) && (24 * 60 * 60) % size.as_secs().max(1) == 0,
            "windows.size: must divide a day evenly (e.g. 10s, 1m, 5m, 1h), so windows align across days",
        );
    }
}

impl IngestSettings {
    fn validate(&self, p: &mut Problems) {
        p.require(
            self.max_event_bytes >= 256,
            "ingest.max_event_bytes: must be at least 256",
        );
        p.require(
            self.flush_interval >= Duration::from_millis(10),
            "ingest.flush_interval: must be at least 10ms",
        );
        p.require(
            self.max_pending_events >= 1,
            "ingest.max_pending_events: must be at least 1",
        );
        p.require(
            self.max_pending_bytes >= self.max_event_bytes,
            "ingest.max_pending_bytes: must be at least ingest.max_event_bytes",
        );
        p.require(
            (64..=1024 * 1024).contains(&self.max_rejected_payload_bytes),
            "ingest.max_rejected_payload_bytes: must be between 64 and 1048576",
        );
        p.require(
            self.stall_after >= Duration::from_secs(1),
            "ingest.stall_after: must be at least 1s",
        );
    }
}

impl PricingSettings {
    fn validate(&self, p: &mut Problems) {
        let currency = &self.currency;
        p.require(
            currency.len() == 3 && currency.chars().all(|c| c.is_ascii_uppercase()),
            format!("pricing.currency: {currency:?} is not a three-letter ISO 4217 code such as \"USD\""),
        );
        let mut seen_hw = HashSet::new();
        for (i, hw) in self.hardware.iter().enumerate() {
            // Several entries per hardware are its price history; two for the same instant
            // would leave the price at that instant to the order of the file.
            let first = seen_hw.insert((&hw.name, hw.effective_from));
            match hw.effective_from {
                None => p.require(
                    first,
                    format!(
                        "pricing.hardware[{i}].name: {:?} is priced twice without effective_from",
                        hw.name.as_str()
                    ),
                ),
                Some(from) => p.require(
                    first,
                    format!(
                        "pricing.hardware[{i}].effective_from: {:?} has two entries effective from {}",
                        hw.name.as_str(),
                        from.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    ),
                ),
            }
            p.require(
                hw.compute_price.0 >= Decimal::ZERO,
                format!("pricing.hardware[{i}].compute_price: must not be negative"),
            );
            p.require(
                hw.storage_price.0 >= Decimal::ZERO,
                format!("pricing.hardware[{i}].storage_price: must not be negative"),
            );
        }
        let mut seen_pairs = HashSet::new();
        for (i, c) in self.coefficients.iter().enumerate() {
            p.require(
                seen_pairs.insert((&c.model, &c.hardware)),
                format!(
                    "pricing.coefficients[{i}]: ({}, {}) has coefficients twice",
                    c.model, c.hardware
                ),
            );
            p.require(
                c.k1.0 >= Decimal::ZERO,
                format!("pricing.coefficients[{i}].k1: must not be negative"),
            );
            p.require(
                c.k2.0 >= Decimal::ZERO,
                format!("pricing.coefficients[{i}].k2: must not be negative"),
            );
        }
    }
}

impl HttpSettings {
    fn validate(&self, p: &mut Problems) {
        p.require(
            std::net::SocketAddr::from_str(&self.listen).is_ok(),
            format!(
                "http.listen: {:?} is not an address such as 127.0.0.1:9464",
                self.listen
            ),
        );
        p.require(
            self.api_token.as_ref().is_none_or(|t| t.len() >= 16),
            "http.api_token: must be at least 16 characters",
        );
        p.require(
            !self.protect_metrics || self.api_token.is_some(),
            "http.protect_metrics: needs http.api_token, the token /metrics would require",
        );
        p.require(
            self.header_read_timeout >= Duration::from_millis(100),
            "http.header_read_timeout: must be at least 100ms",
        );
        p.require(
            self.request_timeout >= Duration::from_millis(100),
            "http.request_timeout: must be at least 100ms",
        );
    }
}

impl MetricsSettings {
    fn validate(&self, p: &mut Problems) {
        p.require(self.max_models >= 1, "metrics.max_models: must be at least 1");
        p.require(self.max_hardware >= 1, "metrics.max_hardware: must be at least 1");
        p.require(
            self.max_label_values >= 1,
            "metrics.max_label_values: must be at least 1",
        );
        for (i, name) in self.label_dimensions.iter().enumerate() {
            let key = format!("metrics.label_dimensions[{i}]");
            let mut chars = name.chars();
            let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with("__");
            p.require(
                well_formed,
                format!(
                    "{key}: {name:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
                ),
            );
            p.require(
                !METRIC_LABELS_TAKEN.contains(&name.as_str()),
                format!(
                    "{key}: {name:?} is a label costwatch or Prometheus already sets ({}); pick another name",
                    METRIC_LABELS_TAKEN.join(", ")
                ),
            );
            p.require(
                !self.label_dimensions[..i].contains(name),
                format!("{key}: {name:?} is listed twice"),
            );
        }
    }
}

/// Labels the cost counters already carry, or Prometheus adds to every series: an event label
/// of the same name cannot be a metrics dimension.
const METRIC_LABELS_TAKEN: [&str; 6] = ["model", "hardware", "component", "currency", "job", "instance"];

impl CalibrationSettings {
    fn validate(&self, p: &mut Problems) {
        p.require(
            self.reload_interval >= Duration::from_millis(100),
            "calibration.reload_interval: must be at least 100ms",
        );
    }
}

impl RecommendationSettings {
    fn validate(&self, p: &mut Problems) {
        p.require(
            self.savings_window >= Duration::from_secs(60),
            "recommendations.savings_window: must be at least 1m",
        );
        p.require(
            self.refresh_interval >= Duration::from_millis(100),
            "recommendations.refresh_interval: must be at least 100ms",
        );
    }
}

/// Whether `url` parses as an http(s) URL.
fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

impl AlertingSettings {
    fn validate(&self, p: &mut Problems) {
        if let Some(url) = &self.alertmanager_url {
            p.require(
                is_http_url(url),
                format!(
                    "alerting.alertmanager_url: {:?} is not an http(s) URL such as http://127.0.0.1:9093",
                    redact_url(url)
                ),
            );
        }
        if let Some(url) = &self.external_url {
            // Alertmanager refuses a whole post whose generatorURL is not a URL.
            p.require(
                is_http_url(url),
                format!("alerting.external_url: {:?} is not an http(s) URL", redact_url(url)),
            );
        }
        p.require(
            self.evaluation_interval >= Duration::from_secs(1),
            "alerting.evaluation_interval: must be at least 1s",
        );
        p.require(
            self.forecast_short_window >= Duration::from_secs(1)
                && self.forecast_short_window <= self.forecast_long_window,
            "alerting.forecast_short_window: must be at least 1s and no longer than forecast_long_window",
        );
        let mut names = HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate(i, p);
            p.require(
                names.insert(w.name_or_default(i)),
                format!("alerting.webhooks[{i}].name: two webhooks share this name"),
            );
        }
    }
}

impl WebhookSettings {
    fn validate(&self, i: usize, p: &mut Problems) {
        // The URL itself is never echoed: it may carry a token.
        p.require(
            is_http_url(&self.url),
            format!("alerting.webhooks[{i}].url: not an http(s) URL"),
        );
        match (&self.secret, &self.secret_env) {
            (Some(_), Some(_)) => p.require(
                false,
                format!("alerting.webhooks[{i}]: set secret or secret_env, not both"),
            ),
            (None, None) => p.require(
                false,
                format!("alerting.webhooks[{i}]: a signing secret is required (secret, secret_env or secret_file)"),
            ),
            (Some(s), None) => p.require(
                s.len() >= 16,
                format!("alerting.webhooks[{i}].secret: must be at least 16 characters"),
            ),
            (None, Some(var)) => p.require(
                self.resolve_secret().is_some_and(|s| s.len() >= 16),
                format!(
                    "alerting.webhooks[{i}].secret_env: the environment variable {var} must hold a secret of at least 16 characters"
                ),
            ),
        }
    }
}

impl BudgetSettings {
    /// Split labels become alert and metric label names, so they must be valid Prometheus label
    /// names and must not shadow a label every budget alert already has.
    fn validate_split_by(&self, key: &str, p: &mut Problems) {
        let mut seen = HashSet::new();
        for name in &self.split_by {
            let valid = name.len() <= 128
                && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with("__");
            p.require(
                valid,
                format!("{key}.split_by: {name:?} is not a label name (letters, digits and '_', not starting with a digit or '__')"),
            );
            p.require(
                !RESERVED_SPLIT_LABELS.contains(&name.as_str()),
                format!("{key}.split_by: {name:?} is a label every budget alert already has; rename the label or split by another"),
            );
            p.require(seen.insert(name), format!("{key}.split_by: {name:?} is listed twice"));
        }
    }

    /// The budget's split labels and their values for one split, in `split_by` order.
    pub fn split_labels(&self, values: &[String]) -> BTreeMap<String, String> {
        self.split_by.iter().cloned().zip(values.iter().cloned()).collect()
    }

    fn validate(&self, key: &str, p: &mut Problems) {
        p.require(
            !self.name.trim().is_empty()
                && self.name.len() <= 128
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)),
            format!(
                "{key}.name: {:?} must be 1-128 characters of letters, digits, '-', '_', '.' or ':'",
                self.name
            ),
        );
        p.require(
            self.amount.0 > Decimal::ZERO,
            format!("{key}.amount: must be greater than 0"),
        );
        p.require(
            self.thresholds.iter().all(|t| *t > Decimal::ZERO),
            format!("{key}.thresholds: every threshold must be greater than 0 (0.8 means 80% of amount)"),
        );
        let mut seen = HashSet::new();
        p.require(
            self.thresholds.iter().all(|t| seen.insert(t.normalize())),
            format!("{key}.thresholds: a threshold is listed twice"),
        );
        p.require(
            !self.severity.trim().is_empty(),
            format!("{key}.severity: must not be empty"),
        );
        for (field, glob) in [("model", &self.scope.model), ("hardware", &self.scope.hardware)] {
            if let Some(g) = glob {
                p.require(
                    !g.is_empty() && g.len() <= 128,
                    format!("{key}.match.{field}: must be 1-128 characters"),
                );
            }
        }
        for (name, glob) in &self.scope.labels {
            p.require(
                !name.is_empty() && name.len() <= 128 && !glob.is_empty() && glob.len() <= 128,
                format!("{key}.match.labels.{name}: label names and globs must be 1-128 characters"),
            );
        }
        self.validate_split_by(key, p);
        if let Some(d) = &self.drift {
            p.require(
                d.factor > Decimal::ONE,
                format!("{key}.drift.factor: must be greater than 1"),
            );
            p.require(
                d.window >= Duration::from_secs(1) && d.baseline >= d.window,
                format!("{key}.drift: window must be at least 1s and baseline at least as long as window"),
            );
            p.require(
                d.min_spend.0 >= Decimal::ZERO,
                format!("{key}.drift.min_spend: must not be negative"),
            );
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

    /// Reads and validates like `Settings::load`, without secrets (tests resolve those).
    fn parse(toml: &str) -> Result<Settings, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()?;
        let shaped = shape::read::<Settings>(built.try_deserialize()?);
        match shaped.value {
            Some(settings) if shaped.problems.is_empty() => {
                settings.validate()?;
                Ok(settings)
            }
            _ => Err(ConfigError::Invalid(shaped.problems)),
        }
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
    fn label_dimensions_must_be_free_prometheus_label_names() {
        let good = format!("{EXAMPLE}\n[metrics]\nlabel_dimensions = [\"tenant\", \"team_2\"]\n");
        let s = parse(&good).unwrap();
        assert_eq!(s.metrics.label_dimensions, ["tenant", "team_2"]);
        assert_eq!(s.metrics.max_label_values, 50);
        let bad = format!(
            "{EXAMPLE}\n[metrics]\nlabel_dimensions = [\"tenant\", \"model\", \"2x\", \"__x\", \"tenant\"]\nmax_label_values = 0\n"
        );
        let err = parse(&bad).unwrap_err().to_string();
        for problem in [
            "metrics.max_label_values: must be at least 1",
            "metrics.label_dimensions[1]: \"model\" is a label costwatch or Prometheus already sets (model, hardware, component, currency, job, instance); pick another name",
            "metrics.label_dimensions[2]: \"2x\" is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)",
            "metrics.label_dimensions[3]: \"__x\" is not a Prometheus label name",
            "metrics.label_dimensions[4]: \"tenant\" is listed twice",
        ] {
            assert!(err.contains(problem), "{problem}\n{err}");
        }
    }

    #[test]
    fn float_prices_are_refused_with_a_hint() {
        let bad = EXAMPLE.replace("compute_price = \"0.1\"", "compute_price = 0.1");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("write 0.1 as a string (\"0.1\")"), "{err}");
    }

    #[test]
    fn budgets_and_alerting_are_validated_with_their_keys() {
        let good = format!(
            "{EXAMPLE}{}",
            r#"
            [alerting]
            alertmanager_url = "http://127.0.0.1:9093"
            [[alerting.webhooks]]
            url = "https://hooks.example.invalid/x"
            secret = "0123456789abcdef"
            [[budgets]]
            name = "search-llm"
            period = "monthly"
            amount = "5000"
            match = { model = "qwen2-*" }
            thresholds = [0.5, 0.8, 1.0]
            drift = { factor = 3 }
            time_zone = "Europe/Berlin"
            "#
        );
        let s = parse(&good).unwrap();
        let b = &s.budgets[0];
        assert_eq!(b.thresholds, vec![Decimal::new(5, 1), Decimal::new(8, 1), Decimal::ONE]);
        assert_eq!(b.amount.to_string(), "5000");
        assert_eq!(b.drift.as_ref().unwrap().window, Duration::from_secs(3600));
        assert_eq!(b.severity, "page");

        let bad = good
            .replace(
                "alertmanager_url = \"http://127.0.0.1:9093\"",
                "alertmanager_url = \"127.0.0.1:9093\"",
            )
            .replace("secret = \"0123456789abcdef\"", "secret = \"short\"")
            .replace("amount = \"5000\"", "amount = \"0\"")
            .replace("factor = 3", "factor = 0.5");
        let err = parse(&bad).unwrap_err().to_string();
        for want in [
            "alerting.alertmanager_url: \"127.0.0.1:9093\" is not an http(s) URL",
            "alerting.webhooks[0].secret: must be at least 16 characters",
            "budgets[0].amount: must be greater than 0",
            "budgets[0].drift.factor: must be greater than 1",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
        let zone = parse(&good.replace("Europe/Berlin", "Mars/Olympus"))
            .unwrap_err()
            .to_string();
        assert!(zone.contains("Mars/Olympus"), "{zone}");
        let float = parse(&good.replace("amount = \"5000\"", "amount = 5000.5"))
            .unwrap_err()
            .to_string();
        assert!(float.contains("write 5000.5 as a string"), "{float}");
    }

    #[test]
    fn hardware_prices_have_effective_dates_and_one_entry_per_instant() {
        let history = format!(
            "{EXAMPLE}{}",
            r#"
            [[pricing.hardware]]
            name = "a100-80g"
            compute_price = "0.08"
            storage_price = "0.2"
            effective_from = "2026-11-01T00:00:00+01:00"

            [[pricing.hardware]]
            name = "a100-80g"
            compute_price = "0.07"
            storage_price = "0.2"
            effective_from = 2026-12-01T00:00:00Z
            "#
        );
        let s = parse(&history).unwrap();
        let from: Vec<_> = s.pricing.hardware.iter().map(|h| h.effective_from).collect();
        assert_eq!(
            from,
            vec![
                None,
                Some("2026-10-31T23:00:00Z".parse().unwrap()),
                Some("2026-12-01T00:00:00Z".parse().unwrap())
            ]
        );

        let twice = history.replace("2026-12-01T00:00:00Z", "2026-10-31T23:00:00Z");
        let err = parse(&twice).unwrap_err().to_string();
        assert!(
            err.contains(
                "pricing.hardware[2].effective_from: \"a100-80g\" has two entries effective from 2026-10-31T23:00:00Z"
            ),
            "{err}"
        );
        let undated_twice = history.replace("effective_from = \"2026-11-01T00:00:00+01:00\"", "");
        let err = parse(&undated_twice).unwrap_err().to_string();
        assert!(
            err.contains("pricing.hardware[1].name: \"a100-80g\" is priced twice without effective_from"),
            "{err}"
        );
    }

    #[test]
    fn budgets_match_labels_and_split_by_label_names() {
        let budget = |extra: &str| {
            format!("{EXAMPLE}\n[[budgets]]\nname = \"per-team\"\nperiod = \"monthly\"\namount = \"100\"\n{extra}\n")
        };
        let s = parse(&budget(
            r#"match = { model = "qwen2-*", labels = { tenant = "search-*", env = "prod" } }
               split_by = ["tenant"]"#,
        ))
        .unwrap();
        let b = &s.budgets[0];
        assert_eq!(b.scope.labels["tenant"], "search-*");
        assert_eq!(b.scope.labels["env"], "prod");
        assert_eq!(b.split_by, vec!["tenant".to_owned()]);
        assert_eq!(
            b.split_labels(&["search-a".to_owned()]),
            BTreeMap::from([("tenant".to_owned(), "search-a".to_owned())])
        );

        let err = parse(&budget(r#"split_by = ["tenant", "kind", "9x", "tenant"]"#))
            .unwrap_err()
            .to_string();
        for want in [
            "budgets[0].split_by: \"kind\" is a label every budget alert already has; rename the label or split by another",
            "budgets[0].split_by: \"9x\" is not a label name (letters, digits and '_', not starting with a digit or '__')",
            "budgets[0].split_by: \"tenant\" is listed twice",
        ] {
            assert!(err.contains(want), "{want} in {err}");
        }
        let err = parse(&budget(r#"match = { labels = { tenant = "" } }"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("budgets[0].match.labels.tenant: label names and globs must be 1-128 characters"),
            "{err}"
        );
    }

    #[test]
    fn a_reload_applies_pricing_budgets_alerting_and_metrics_and_names_the_rest() {
        let old = parse(EXAMPLE).unwrap();
        let changed = EXAMPLE
            .replace("compute_price = \"0.1\"", "compute_price = \"0.3\"")
            .replace("group_id = \"costwatch\"", "group_id = \"other\"")
            .replace("size = \"1m\"", "size = \"2m\"")
            + "\n[metrics]\nmax_models = 7\n[http]\nlisten = \"127.0.0.1:9999\"\n";
        let new = parse(&changed).unwrap();
        assert_eq!(old.restart_needed(&new), vec!["kafka", "http.listen", "windows"]);
        let applied = old.reloaded(new);
        assert_eq!(applied.pricing.hardware[0].compute_price.to_string(), "0.3");
        assert_eq!(applied.metrics.max_models, 7);
        assert_eq!(applied.kafka.group_id, "costwatch", "kept until restart");
        assert_eq!(applied.windows.size, Duration::from_secs(60));
        assert_eq!(applied.http.listen, old.http.listen);
        assert!(old.restart_needed(&parse(EXAMPLE).unwrap()).is_empty());
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
            err.contains("pricing.hardware[0].deployment: must be \"cloud\" or \"edge\", got \"moon\""),
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
    fn log_format_is_text_unless_set_to_json() {
        assert_eq!(parse(EXAMPLE).unwrap().log.format, LogFormat::Text);
        let json = parse(&format!("{EXAMPLE}\n[log]\nformat = \"json\"\n")).unwrap();
        assert_eq!(json.log.format, LogFormat::Json);
        let err = parse(&format!("{EXAMPLE}\n[log]\nformat = \"xml\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"log.format: must be "text" or "json", got "xml""#),
            "{err}"
        );
    }

    #[test]
    fn urls_are_shown_without_userinfo_query_or_fragment() {
        for (url, shown) in [
            ("http://127.0.0.1:9093", "http://127.0.0.1:9093"),
            ("http://user:secret@am:9093/api", "http://<redacted>@am:9093/api"),
            ("http://user:s@cret@am:notaport", "http://<redacted>@am:notaport"),
            ("https://am/path?token=abc&x=1", "https://am/path?<redacted>"),
            ("https://am/#access_token=abc", "https://am/#<redacted>"),
            ("user:secret@am:9093", "<redacted>@am:9093"),
            ("http://am/a@b", "http://am/a@b"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn protected_metrics_need_the_api_token_and_timeouts_have_floors() {
        let s = parse(EXAMPLE).unwrap();
        assert!(!s.http.protect_metrics);
        assert_eq!(s.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.http.request_timeout, Duration::from_secs(30));
        let bad = format!(
            "{EXAMPLE}\n[http]\nprotect_metrics = true\nheader_read_timeout = \"10ms\"\nrequest_timeout = \"0s\"\n"
        );
        let err = parse(&bad).unwrap_err().to_string();
        for want in [
            "http.protect_metrics: needs http.api_token, the token /metrics would require",
            "http.header_read_timeout: must be at least 100ms",
            "http.request_timeout: must be at least 100ms",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
    }

    #[test]
    fn secrets_come_from_files_and_the_environment_and_every_problem_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let (db, kafka, token) = (
            file("db", "db-secret\n"),
            file("kafka", "kafka-secret\n"),
            file("token", "0123456789abcdef-token"),
        );
        let toml = EXAMPLE.replace(
            "url = \"postgres://postgres@127.0.0.1:5432/costwatch\"",
            &format!(
                "url = \"postgres://costwatch:url%40secret@127.0.0.1:5432/costwatch\"\npassword_file = {db:?}\n[http]\napi_token_file = {token:?}\n[kafka.properties]\n\"sasl.username\" = \"costwatch\"\n\"sasl.password\" = \"inline-secret\"\n[kafka.property_files]\n\"ssl.key.password\" = {kafka:?}"
            ),
        );
        let mut s = parse(&toml).unwrap();
        let env = [
            ("COSTWATCH_KAFKA_SASL_PASSWORD".to_owned(), "env-secret".to_owned()),
            ("COSTWATCH_KAFKA_SECURITY_PROTOCOL".to_owned(), "SASL_SSL".to_owned()),
            ("COSTWATCH_KAFKAESQUE".to_owned(), "not ours".to_owned()),
        ];
        assert_eq!(s.resolve_secrets(env), Vec::<String>::new());
        let properties: Vec<(String, String, String)> = s
            .kafka
            .operator_properties()
            .into_iter()
            .map(|p| (p.name, format!("{:?}", p.value), p.origin))
            .collect();
        let expect = |name: &str, value: &str, origin: &str| (name.to_owned(), value.to_owned(), origin.to_owned());
        assert_eq!(
            properties,
            vec![
                // The environment overrides the file, as it does for every other key.
                expect("sasl.password", "Secret(<redacted>)", "COSTWATCH_KAFKA_SASL_PASSWORD"),
                expect(
                    "sasl.username",
                    "Plain(\"costwatch\")",
                    "kafka.properties.\"sasl.username\""
                ),
                expect(
                    "security.protocol",
                    "Plain(\"SASL_SSL\")",
                    "COSTWATCH_KAFKA_SECURITY_PROTOCOL"
                ),
                expect(
                    "ssl.key.password",
                    "Secret(<redacted>)",
                    "kafka.property_files.\"ssl.key.password\""
                ),
            ]
        );
        assert_eq!(s.database.password.as_ref().map(Secret::expose), Some("db-secret"));
        assert_eq!(s.http.api_token.as_deref(), Some("0123456789abcdef-token"));
        let mut secrets: Vec<String> = s.secrets().iter().map(|s| s.expose().to_owned()).collect();
        secrets.sort();
        assert_eq!(
            secrets,
            [
                "0123456789abcdef-token",
                "db-secret",
                "env-secret",
                "kafka-secret",
                "url@secret"
            ]
        );

        let conflicting = toml
            .replace(
                &format!("password_file = {db:?}"),
                &format!("password = \"x\"\npassword_file = {db:?}"),
            )
            .replace(&kafka, "/nonexistent/kafka")
            .replace("\"ssl.key.password\" =", "\"sasl.username\" =");
        let mut s = parse(&conflicting).unwrap();
        let problems = s
            .resolve_secrets([("COSTWATCH_KAFKA_".to_owned(), "x".to_owned())])
            .join("\n");
        for want in [
            "database.password_file: set database.password or database.password_file, not both",
            "kafka.property_files.\"sasl.username\": also set in kafka.properties; set it in one place",
            "COSTWATCH_KAFKA_: names no librdkafka property",
        ] {
            assert!(problems.contains(want), "{want}\n{problems}");
        }
    }

    #[test]
    fn a_missing_section_and_a_missing_key_are_each_named_once() {
        let bad = EXAMPLE
            .replace(
                "[database]\n        url = \"postgres://postgres@127.0.0.1:5432/costwatch\"\n",
                "",
            )
            .replace("group_id = \"costwatch\"\n", "")
            .replace("k1 = \"0.5\"", "k1 = \"half\"");
        let err = parse(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration:\n  \
             - database: missing; this key is required\n  \
             - kafka.group_id: missing; this key is required\n  \
             - pricing.coefficients[0].k1: \"half\" is not a decimal number"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = EXAMPLE.replace("group_id = \"costwatch\"", "group_id = \"costwatch\"\ngroup = \"x\"");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("kafka.group: unknown key, expected one of `brokers`"),
            "{err}"
        );
    }
}
