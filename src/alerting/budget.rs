//! Budgets: calendar periods, scopes, and the pure decision of what a budget's spend means —
//! how far it is used, where it is heading, and which alerts should be firing. No I/O here:
//! `store` reads the spend, `evaluator` acts on the decision.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::{BudgetSettings, Period};
use crate::domain::Money;
use crate::history::read::{self, Part};

/// Alert kinds; the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// Spend has reached one of the budget's `thresholds` (fractions of its amount) this period.
    Threshold,
    /// Spend is projected to pass the amount before the period ends, at the current burn rate.
    Forecast,
    /// The recent spend rate is more than `drift.factor` times its trailing baseline.
    Drift,
    /// Usage in the budget's scope has no price, so the spend shown undercounts it.
    Unpriced,
}

impl AlertKind {
    /// The `kind` label's value, as in the JSON (`threshold`, `forecast`, `drift`, `unpriced`).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Threshold => "threshold",
            AlertKind::Forecast => "forecast",
            AlertKind::Drift => "drift",
            AlertKind::Unpriced => "unpriced",
        }
    }

    /// The `alertname` label: one name per kind, so Alertmanager routes can tell them apart.
    pub fn alertname(self) -> &'static str {
        match self {
            AlertKind::Threshold => "CostwatchBudgetThreshold",
            AlertKind::Forecast => "CostwatchBudgetForecast",
            AlertKind::Drift => "CostwatchBudgetDrift",
            AlertKind::Unpriced => "CostwatchBudgetUnpriced",
        }
    }

    /// Every kind, in label order; e.g. to zero each kind's `costwatch_alerts_firing` gauge.
    pub const ALL: [AlertKind; 4] = [
        AlertKind::Threshold,
        AlertKind::Forecast,
        AlertKind::Drift,
        AlertKind::Unpriced,
    ];
}

/// The calendar period containing `now` in `tz`: `[start, end)`.
pub fn period_bounds(period: Period, tz: chrono_tz::Tz, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let date = now.with_timezone(&tz).date_naive();
    let midnight = |d: NaiveDate| to_utc(tz, d.and_hms_opt(0, 0, 0).expect("midnight"));
    match period {
        Period::Hourly => {
            // Hours are measured on the instant, not on local wall-clock time (which repeats an
            // hour when DST ends): the hour containing `now`, aligned to the zone's offset.
            let offset = i64::from(tz_offset_seconds(tz, now));
            let local = now.timestamp() + offset;
            let start = DateTime::from_timestamp(local - local.rem_euclid(3600) - offset, 0).expect("in range");
            (start, start + ChronoDuration::hours(1))
        }
        Period::Daily => (midnight(date), midnight(date + ChronoDuration::days(1))),
        Period::Weekly => {
            let monday = date - ChronoDuration::days(date.weekday().num_days_from_monday() as i64);
            (midnight(monday), midnight(monday + ChronoDuration::days(7)))
        }
        Period::Monthly | Period::Quarterly | Period::Yearly => {
            let (first_month, months) = match period {
                Period::Quarterly => (date.month0() / 3 * 3 + 1, 3),
                Period::Yearly => (1, 12),
                _ => (date.month(), 1),
            };
            let first = NaiveDate::from_ymd_opt(date.year(), first_month, 1).expect("the 1st");
            let next = first.checked_add_months(chrono::Months::new(months)).expect("in range");
            (midnight(first), midnight(next))
        }
    }
}

fn tz_offset_seconds(tz: chrono_tz::Tz, now: DateTime<Utc>) -> i32 {
    use chrono::Offset;
    now.with_timezone(&tz).offset().fix().local_minus_utc()
}

/// A local wall-clock time as an instant. Midnight can be skipped by a DST change (then the
/// first instant after the gap counts) or happen twice (then the earlier one counts).
fn to_utc(tz: chrono_tz::Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut probe = local;
    for _ in 0..4 {
        if let Some(t) = tz.from_local_datetime(&probe).earliest() {
            return t.with_timezone(&Utc);
        }
        probe += ChronoDuration::minutes(30);
    }
    Utc.from_utc_datetime(&local)
}

/// A scope glob (`*` any run of characters, `?` one character) as a SQL `LIKE` pattern with
/// `\` as the escape character; `None` matches everything.
pub fn like_pattern(glob: Option<&str>) -> String {
    let Some(glob) = glob else {
        return "%".into();
    };
    let mut out = String::with_capacity(glob.len() + 4);
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// The time ranges a budget's evaluation reads, all `[from, to)` over window starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranges {
    /// The calendar period containing now, in the budget's time zone.
    pub period: (DateTime<Utc>, DateTime<Utc>),
    /// The short forecast window, ending now.
    pub short: (DateTime<Utc>, DateTime<Utc>),
    /// The long forecast window, ending now.
    pub long: (DateTime<Utc>, DateTime<Utc>),
    /// The recent drift window, ending now; `None` when the budget has no `drift` section.
    pub drift_recent: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// The drift baseline, ending where `drift_recent` starts; `None` when the budget has no `drift` section.
    pub drift_baseline: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// When the evaluation reads them: nothing is stored past it but events stamped ahead of
    /// the clock.
    pub now: DateTime<Utc>,
}

impl Ranges {
    /// The ranges `budget` reads when evaluated at `now`, with the configured forecast windows.
    pub fn new(budget: &BudgetSettings, windows: ForecastWindows, now: DateTime<Utc>) -> Self {
        let ago = |d: Duration| now - ChronoDuration::from_std(d).unwrap_or(ChronoDuration::zero());
        let drift = budget.drift.as_ref().map(|d| {
            let recent_from = ago(d.window);
            let baseline_from = recent_from - ChronoDuration::from_std(d.baseline).unwrap_or(ChronoDuration::zero());
            ((recent_from, now), (baseline_from, recent_from))
        });
        Self {
            period: period_bounds(budget.period, budget.time_zone, now),
            short: (ago(windows.short), now),
            long: (ago(windows.long), now),
            drift_recent: drift.map(|d| d.0),
            drift_baseline: drift.map(|d| d.1),
            now,
        }
    }

    /// Every range as the [`RangePart`]s it is read as, ranges numbered as in [`Ranges`]'
    /// fields (0 the period .. 4 the drift baseline).
    pub fn parts(&self) -> Vec<RangePart> {
        [
            Some(self.period),
            Some(self.short),
            Some(self.long),
            self.drift_recent,
            self.drift_baseline,
        ]
        .into_iter()
        .enumerate()
        .filter_map(|(i, range)| Some((i, range?)))
        .flat_map(|(i, (from, to))| {
            read::parts(from, to, self.now)
                .into_iter()
                .map(move |part| RangePart { range: i, part })
        })
        .collect()
    }
}

/// A part of one of a budget's ranges as it is read (see [`crate::history::read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangePart {
    /// The range it belongs to (see [`Ranges::parts`]).
    pub range: usize,
    /// The part.
    pub part: Part,
}

/// How far back the two forecast burn rates look (`alerting.forecast_short_window` and `_long_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForecastWindows {
    /// The short window: reacts to the current burn, so a forecast alert clears as soon as it drops.
    pub short: Duration,
    /// The long window: makes a forecast alert need a sustained burn, not a spike.
    pub long: Duration,
}

/// What PostgreSQL holds for a budget's scope over its [`Ranges`]. Spend counts priced usage
/// only; usage without a price is listed in `unpriced`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Priced spend since the period started.
    pub period_spend: Money,
    /// Priced spend over the short forecast window.
    pub short_spend: Money,
    /// Priced spend over the long forecast window.
    pub long_spend: Money,
    /// Priced spend over the recent drift window; zero without a `drift` section.
    pub drift_recent_spend: Money,
    /// Priced spend over the drift baseline; zero without a `drift` section.
    pub drift_baseline_spend: Money,
    /// Each (model, hardware) in scope with usage this period but no price.
    pub unpriced: Vec<UnpricedUsage>,
    /// The values of the budget's `split_by` labels this observation is for, in that order;
    /// empty for a budget without `split_by`.
    pub split: Vec<String>,
}

/// Usage in a budget's scope that has no price this period; each is an `unpriced` alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnpricedUsage {
    /// The model's name, as events carry it.
    pub model: String,
    /// The hardware's name, as events carry it; it has no `[[pricing.hardware]]` entry.
    pub hardware: String,
    /// How many events of this pair went unpriced this period.
    pub events: i64,
}

/// A budget's standing at one instant: what `/api/v1/budgets` shows and the gauges export.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetStatus {
    /// The budget's configured `name`.
    pub name: String,
    /// For a budget with `split_by`, the label values this status is for (`{"tenant": "search-a"}`);
    /// empty otherwise. Each split has its own spend, state and alerts.
    pub split: BTreeMap<String, String>,
    /// The calendar period the budget covers (hourly, daily, weekly, monthly).
    pub period: Period,
    /// When the current period started, in UTC (the period is calendar-aligned in the budget's time zone).
    pub period_start: DateTime<Utc>,
    /// When the current period ends (exclusive).
    pub period_end: DateTime<Utc>,
    /// The currency of `amount` and every spend figure (`pricing.currency`).
    pub currency: String,
    /// The budget for one period, normalised.
    pub amount: Money,
    /// Priced spend so far this period; unpriced usage is not in it.
    pub spend: Money,
    /// spend / amount, rounded to 6 places for display.
    pub utilization: Decimal,
    /// Projected spend at period end; `None` when the budget has `forecast = false`.
    pub forecast: Option<Money>,
    /// Spend per hour over the short and long forecast windows.
    pub burn_rate_short_per_hour: Money,
    /// Spend per hour over the long forecast window.
    pub burn_rate_long_per_hour: Money,
    /// The drift comparison; `None` when the budget has no `drift` section.
    pub drift: Option<DriftStatus>,
    /// The thresholds reached so far this period.
    pub thresholds_reached: Vec<Decimal>,
    /// Unpriced usage this period; empty when the budget has `unpriced = false`.
    pub unpriced: Vec<UnpricedUsage>,
    /// `ok`, `warning` (a threshold below 1 reached, or a forecast or drift alert), `exceeded`.
    pub state: &'static str,
}

/// A budget's recent spend rate against its trailing baseline.
#[derive(Debug, Clone, Serialize)]
pub struct DriftStatus {
    /// Spend per hour over the recent drift window.
    pub recent_per_hour: Money,
    /// Spend per hour over the baseline before it.
    pub baseline_per_hour: Money,
    /// recent / baseline; `None` while the baseline is zero.
    pub ratio: Option<Decimal>,
    /// The configured `drift.factor`: the ratio above which drift fires.
    pub factor: Decimal,
    /// Whether a drift alert should fire: recent spend is above zero and `drift.min_spend`, and its rate above `factor` times the baseline rate.
    pub firing: bool,
}

/// One alert that should be firing now. `key` identifies it across evaluations and restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSpec {
    /// See [`alert_key`]: the labels without `severity` and `alertname`.
    pub key: String,
    /// The name of the budget the alert belongs to.
    pub budget: String,
    /// Which condition fired.
    pub kind: AlertKind,
    /// The labels sent to Alertmanager and webhooks: `alertname`, `budget`, `kind`, `severity`, and per kind `threshold` and `period`, or `model` and `hardware`.
    pub labels: BTreeMap<String, String>,
    /// Human-readable context: spend, amount, currency, utilization, the period, `summary` and `description`.
    pub annotations: BTreeMap<String, String>,
}

fn per_hour(spend: Money, range: (DateTime<Utc>, DateTime<Utc>)) -> Decimal {
    let seconds = (range.1 - range.0).num_seconds();
    if seconds <= 0 {
        return Decimal::ZERO;
    }
    spend.0 * Decimal::from(3600) / Decimal::from(seconds)
}

fn money(d: Decimal) -> Money {
    Money(d.round_dp(6).normalize())
}

/// Decides a budget's status at `now` from what was observed.
pub fn evaluate(
    budget: &BudgetSettings,
    currency: &str,
    ranges: &Ranges,
    seen: &Observed,
    now: DateTime<Utc>,
) -> BudgetStatus {
    let amount = budget.amount.0;
    let spend = seen.period_spend.0;
    let short_rate = per_hour(seen.short_spend, ranges.short);
    let long_rate = per_hour(seen.long_spend, ranges.long);
    // Multi-window burn rate: project with the *smaller* of the two rates, so a forecast alert
    // needs both a sustained (long) and a current (short) burn to fire, and clears as soon as
    // the current burn drops.
    let remaining_hours = Decimal::from((ranges.period.1 - now).num_seconds().max(0)) / Decimal::from(3600);
    let forecast = budget
        .forecast
        .then(|| money(spend + short_rate.min(long_rate) * remaining_hours));
    let drift = budget.drift.as_ref().and_then(|d| {
        let recent = ranges.drift_recent?;
        let baseline = ranges.drift_baseline?;
        let recent_rate = per_hour(seen.drift_recent_spend, recent);
        let baseline_rate = per_hour(seen.drift_baseline_spend, baseline);
        let ratio = (baseline_rate > Decimal::ZERO).then(|| (recent_rate / baseline_rate).round_dp(6).normalize());
        let firing = seen.drift_recent_spend.0 > Decimal::ZERO
            && seen.drift_recent_spend.0 >= d.min_spend.0
            && recent_rate > d.factor * baseline_rate;
        Some(DriftStatus {
            recent_per_hour: money(recent_rate),
            baseline_per_hour: money(baseline_rate),
            ratio,
            factor: d.factor.normalize(),
            firing,
        })
    });
    let mut thresholds_reached: Vec<Decimal> = budget
        .thresholds
        .iter()
        .filter(|t| spend >= **t * amount)
        .map(|t| t.normalize())
        .collect();
    thresholds_reached.sort();
    let forecast_firing = forecast.is_some_and(|f| f.0 > amount);
    let state = if spend >= amount {
        "exceeded"
    } else if !thresholds_reached.is_empty() || forecast_firing || drift.as_ref().is_some_and(|d| d.firing) {
        "warning"
    } else {
        "ok"
    };
    BudgetStatus {
        name: budget.name.clone(),
        split: budget.split_labels(&seen.split),
        period: budget.period,
        period_start: ranges.period.0,
        period_end: ranges.period.1,
        currency: currency.to_owned(),
        amount: Money(amount.normalize()),
        spend: Money(spend.normalize()),
        utilization: (spend / amount).round_dp(6).normalize(),
        forecast,
        burn_rate_short_per_hour: money(short_rate),
        burn_rate_long_per_hour: money(long_rate),
        drift,
        thresholds_reached,
        unpriced: if budget.unpriced {
            seen.unpriced.clone()
        } else {
            Vec::new()
        },
        state,
    }
}

/// The alerts that should be firing for a status. Everything else of this budget resolves.
pub fn desired_alerts(budget: &BudgetSettings, status: &BudgetStatus) -> Vec<AlertSpec> {
    let alerts = Alerts { budget, status };
    let mut out: Vec<AlertSpec> = status.thresholds_reached.iter().map(|t| alerts.threshold(*t)).collect();
    out.extend(
        status
            .forecast
            .filter(|f| f.0 > status.amount.0)
            .map(|f| alerts.forecast(f)),
    );
    out.extend(status.drift.as_ref().filter(|d| d.firing).map(|d| alerts.drift(d)));
    out.extend(status.unpriced.iter().map(|u| alerts.unpriced(u)));
    out
}

/// Builds one budget's alerts, one method per kind, on the labels and annotations they share.
struct Alerts<'a> {
    budget: &'a BudgetSettings,
    status: &'a BudgetStatus,
}

impl Alerts<'_> {
    fn pct(d: Decimal) -> String {
        format!("{}%", (d * Decimal::from(100)).round_dp(1).normalize())
    }

    /// The budget's name, with the split it is for: `search` or `per-team (tenant=search-a)`.
    fn subject(&self) -> String {
        status_subject(self.status)
    }

    /// The labels and annotations every alert of this budget carries.
    fn common(&self, kind: AlertKind, severity: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let status = self.status;
        let mut labels = BTreeMap::new();
        labels.insert("alertname".to_owned(), kind.alertname().to_owned());
        labels.insert("budget".to_owned(), self.budget.name.clone());
        labels.insert("kind".to_owned(), kind.as_str().to_owned());
        labels.insert("severity".to_owned(), severity.to_owned());
        // Split labels make each split's alerts distinct (and routable) in Alertmanager;
        // validation keeps them from overwriting the labels above.
        labels.extend(status.split.clone());
        let mut annotations = BTreeMap::new();
        annotations.insert("spend".to_owned(), status.spend.to_string());
        annotations.insert("amount".to_owned(), status.amount.to_string());
        annotations.insert("currency".to_owned(), status.currency.clone());
        annotations.insert("utilization".to_owned(), Self::pct(status.utilization));
        annotations.insert("period_start".to_owned(), status.period_start.to_rfc3339());
        annotations.insert("period_end".to_owned(), status.period_end.to_rfc3339());
        if let Some(f) = status.forecast {
            annotations.insert("forecast".to_owned(), f.to_string());
        }
        (labels, annotations)
    }

    fn spec(
        &self,
        kind: AlertKind,
        labels: BTreeMap<String, String>,
        mut annotations: BTreeMap<String, String>,
        summary: String,
        description: String,
    ) -> AlertSpec {
        annotations.insert("summary".to_owned(), summary);
        annotations.insert("description".to_owned(), description);
        AlertSpec {
            key: alert_key(&labels),
            budget: self.budget.name.clone(),
            kind,
            labels,
            annotations,
        }
    }

    fn threshold(&self, t: Decimal) -> AlertSpec {
        let (budget, status) = (self.budget, self.status);
        let (amount, cur) = (status.amount, &status.currency);
        let (mut labels, ann) = self.common(AlertKind::Threshold, &budget.severity);
        labels.insert("threshold".to_owned(), t.to_string());
        // One alert per threshold *and period*: next period's crossing is a new page.
        labels.insert("period".to_owned(), status.period_start.to_rfc3339());
        let summary = format!(
            "Budget {} has used {} of {amount} {cur} this period ({} {cur} spent; threshold {})",
            self.subject(),
            Self::pct(status.utilization),
            status.spend,
            Self::pct(t)
        );
        let description = format!(
            "Spend for {} from {} is {} {cur}, at or above {} of the {amount} {cur} budget. \
             See GET /api/v1/budgets and the usage_costs view for the models and hardware behind it.",
            scope_text(budget),
            status.period_start.to_rfc3339(),
            status.spend,
            Self::pct(t)
        );
        self.spec(AlertKind::Threshold, labels, ann, summary, description)
    }

    fn forecast(&self, forecast: Money) -> AlertSpec {
        let (budget, status) = (self.budget, self.status);
        let (amount, cur) = (status.amount, &status.currency);
        let (labels, ann) = self.common(AlertKind::Forecast, &budget.severity);
        let summary = format!(
            "Budget {} is projected to reach {forecast} {cur} by {} (budget {amount} {cur})",
            self.subject(),
            status.period_end.to_rfc3339()
        );
        let description = format!(
            "At the current burn rate ({} {cur}/h over the short window, {} {cur}/h over the long window) \
             spend for {} will exceed the budget before the period ends. {} {cur} spent so far.",
            status.burn_rate_short_per_hour,
            status.burn_rate_long_per_hour,
            scope_text(budget),
            status.spend
        );
        self.spec(AlertKind::Forecast, labels, ann, summary, description)
    }

    fn drift(&self, drift: &DriftStatus) -> AlertSpec {
        let (budget, cur) = (self.budget, &self.status.currency);
        let (labels, mut ann) = self.common(AlertKind::Drift, &budget.severity);
        ann.insert("recent_per_hour".to_owned(), drift.recent_per_hour.to_string());
        ann.insert("baseline_per_hour".to_owned(), drift.baseline_per_hour.to_string());
        let compared = match drift.ratio {
            Some(r) => format!("{r}x its baseline of {} {cur}/h", drift.baseline_per_hour),
            None => format!("from nothing (baseline 0 {cur}/h)"),
        };
        let summary = format!(
            "Spend rate of budget {} jumped to {} {cur}/h, {compared}",
            self.subject(),
            drift.recent_per_hour
        );
        let description = format!(
            "The recent spend rate for {} is above {} times its trailing baseline. \
             Check for a traffic jump, a new model rollout or a pricing change.",
            scope_text(budget),
            drift.factor
        );
        self.spec(AlertKind::Drift, labels, ann, summary, description)
    }

    fn unpriced(&self, u: &UnpricedUsage) -> AlertSpec {
        let (mut labels, ann) = self.common(AlertKind::Unpriced, "warning");
        labels.insert("model".to_owned(), u.model.clone());
        labels.insert("hardware".to_owned(), u.hardware.clone());
        let summary = format!(
            "Budget {} cannot be trusted: {} events of {} on {} have no price this period",
            self.subject(),
            u.events,
            u.model,
            u.hardware
        );
        let description = format!(
            "Hardware {} has no [[pricing.hardware]] entry, so its usage is recorded but not counted as spend. \
             Add its prices to the configuration; past windows keep a NULL cost until re-priced.",
            u.hardware
        );
        self.spec(AlertKind::Unpriced, labels, ann, summary, description)
    }
}

fn scope_text(budget: &BudgetSettings) -> String {
    let mut text = format!(
        "models {} on hardware {}",
        budget.scope.model.as_deref().unwrap_or("*"),
        budget.scope.hardware.as_deref().unwrap_or("*")
    );
    for (name, glob) in &budget.scope.labels {
        text.push_str(&format!(", label {name} {glob}"));
    }
    text
}

/// A status's budget name with its split, as alerts and `costwatch budgets` name it:
/// `search` or `per-team (tenant=search-a)`.
pub fn status_subject(status: &BudgetStatus) -> String {
    if status.split.is_empty() {
        return status.name.clone();
    }
    let split: Vec<String> = status.split.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{} ({})", status.name, split.join(", "))
}

/// The identity of an alert: its labels without `severity` and `alertname` (both derived), in
/// a stable order. The same condition always gets the same key, across restarts and instances.
pub fn alert_key(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .filter(|(k, _)| k.as_str() != "severity" && k.as_str() != "alertname")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DriftSettings, ScopeSettings};
    use crate::test_support::{d, t};

    fn budget() -> BudgetSettings {
        BudgetSettings {
            name: "search-llm".into(),
            period: Period::Monthly,
            amount: Money(d("5000")),
            scope: ScopeSettings {
                model: Some("qwen2-*".into()),
                hardware: None,
                labels: BTreeMap::new(),
            },
            split_by: vec![],
            thresholds: vec![d("0.5"), d("0.8"), d("1")],
            forecast: true,
            drift: Some(DriftSettings {
                factor: d("3"),
                window: Duration::from_secs(3600),
                baseline: Duration::from_secs(24 * 3600),
                min_spend: Money(d("10")),
            }),
            unpriced: true,
            severity: "page".into(),
            time_zone: chrono_tz::UTC,
        }
    }

    const WINDOWS: ForecastWindows = ForecastWindows {
        short: Duration::from_secs(3600),
        long: Duration::from_secs(6 * 3600),
    };

    #[test]
    fn calendar_periods_in_a_time_zone() {
        let now = t("2026-11-29T23:30:00Z");
        let utc = chrono_tz::UTC;
        assert_eq!(
            period_bounds(Period::Monthly, utc, now),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            period_bounds(Period::Quarterly, utc, now),
            (t("2026-10-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            period_bounds(Period::Quarterly, utc, t("2026-04-01T00:00:00Z")),
            (t("2026-04-01T00:00:00Z"), t("2026-07-01T00:00:00Z"))
        );
        assert_eq!(
            period_bounds(Period::Yearly, utc, now),
            (t("2026-01-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
        // Quarters and years start at local midnight of the zone, as months do.
        assert_eq!(
            period_bounds(Period::Yearly, chrono_tz::America::New_York, t("2027-01-01T02:00:00Z")),
            (t("2026-01-01T05:00:00Z"), t("2027-01-01T05:00:00Z"))
        );
        assert_eq!(
            period_bounds(Period::Weekly, utc, now),
            (t("2026-11-23T00:00:00Z"), t("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            period_bounds(Period::Daily, utc, now),
            (t("2026-11-29T00:00:00Z"), t("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            period_bounds(Period::Hourly, utc, now),
            (t("2026-11-29T23:00:00Z"), t("2026-11-30T00:00:00Z"))
        );
        // 23:30 UTC is already 30 November in Berlin, and December's first minutes are still
        // November in New York.
        let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
        assert_eq!(
            period_bounds(Period::Daily, berlin, now),
            (t("2026-11-29T23:00:00Z"), t("2026-11-30T23:00:00Z"))
        );
        let new_york: chrono_tz::Tz = "America/New_York".parse().unwrap();
        assert_eq!(
            period_bounds(Period::Monthly, new_york, t("2026-12-01T02:00:00Z")),
            (t("2026-11-01T04:00:00Z"), t("2026-12-01T05:00:00Z"))
        );
        // India is UTC+5:30: its hours start at :30 UTC.
        let kolkata: chrono_tz::Tz = "Asia/Kolkata".parse().unwrap();
        assert_eq!(
            period_bounds(Period::Hourly, kolkata, t("2026-11-29T10:10:00Z")),
            (t("2026-11-29T09:30:00Z"), t("2026-11-29T10:30:00Z"))
        );
        // The day DST starts in Berlin has 23 hours.
        let (start, end) = period_bounds(Period::Daily, berlin, t("2026-03-29T12:00:00Z"));
        assert_eq!(end - start, ChronoDuration::hours(23));
    }

    #[test]
    fn globs_become_escaped_like_patterns() {
        assert_eq!(like_pattern(None), "%");
        assert_eq!(like_pattern(Some("qwen2-*")), "qwen2-%");
        assert_eq!(like_pattern(Some("a100_?g%")), "a100\\__g\\%");
    }

    fn ranges(now: DateTime<Utc>) -> Ranges {
        Ranges::new(&budget(), WINDOWS, now)
    }

    #[test]
    fn thresholds_forecast_and_state() {
        let now = t("2026-11-16T00:00:00Z"); // 360 hours left in November
        let r = ranges(now);
        let seen = Observed {
            period_spend: Money(d("4100")),
            // 10/h over the short window, 5/h over the long one: the forecast uses 5/h.
            short_spend: Money(d("10")),
            long_spend: Money(d("30")),
            ..Observed::default()
        };
        let s = evaluate(&budget(), "USD", &r, &seen, now);
        assert_eq!(s.utilization, d("0.82"));
        assert_eq!(s.thresholds_reached, vec![d("0.5"), d("0.8")]);
        assert_eq!(s.forecast, Some(Money(d("5900")))); // 4100 + 5 * 360
        assert_eq!(s.state, "warning");
        let alerts = desired_alerts(&budget(), &s);
        let kinds: Vec<_> = alerts
            .iter()
            .map(|a| (a.kind, a.labels.get("threshold").cloned()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (AlertKind::Threshold, Some("0.5".into())),
                (AlertKind::Threshold, Some("0.8".into())),
                (AlertKind::Forecast, None),
            ]
        );
        assert_eq!(
            alerts[1].annotations["summary"],
            "Budget search-llm has used 82% of 5000 USD this period (4100 USD spent; threshold 80%)"
        );
        assert_eq!(
            alerts[1].key,
            "budget=search-llm,kind=threshold,period=2026-11-01T00:00:00+00:00,threshold=0.8"
        );
        assert_eq!(
            alerts[2].annotations["summary"],
            "Budget search-llm is projected to reach 5900 USD by 2026-12-01T00:00:00+00:00 (budget 5000 USD)"
        );

        // The short burn stops: the projection falls to the spend so far and the forecast clears.
        let quiet = Observed {
            short_spend: Money::ZERO,
            ..seen
        };
        let s = evaluate(&budget(), "USD", &r, &quiet, now);
        assert_eq!(s.forecast, Some(Money(d("4100"))));
        assert!(desired_alerts(&budget(), &s)
            .iter()
            .all(|a| a.kind == AlertKind::Threshold));

        let over = Observed {
            period_spend: Money(d("5000")),
            ..Observed::default()
        };
        let s = evaluate(&budget(), "USD", &r, &over, now);
        assert_eq!(s.state, "exceeded");
        assert_eq!(s.thresholds_reached.len(), 3);
    }

    #[test]
    fn drift_needs_the_factor_and_the_minimum_spend() {
        let now = t("2026-11-16T00:00:00Z");
        let r = ranges(now);
        // Baseline 24 over 24 h = 1/h. Recent 3.5/h > 3 x 1/h, but under min_spend 10.
        let small = Observed {
            drift_recent_spend: Money(d("3.5")),
            drift_baseline_spend: Money(d("24")),
            ..Observed::default()
        };
        let s = evaluate(&budget(), "USD", &r, &small, now);
        let drift = s.drift.as_ref().unwrap();
        assert_eq!(drift.ratio, Some(d("3.5")));
        assert!(!drift.firing);
        // 12/h against a 2/h baseline: 6x, and above min_spend.
        let jump = Observed {
            drift_recent_spend: Money(d("12")),
            drift_baseline_spend: Money(d("48")),
            ..Observed::default()
        };
        let s = evaluate(&budget(), "USD", &r, &jump, now);
        assert!(s.drift.as_ref().unwrap().firing);
        let alerts = desired_alerts(&budget(), &s);
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].annotations["summary"],
            "Spend rate of budget search-llm jumped to 12 USD/h, 6x its baseline of 2 USD/h"
        );
        // From a zero baseline: no ratio, and the summary says so.
        let from_zero = Observed {
            drift_recent_spend: Money(d("12")),
            ..Observed::default()
        };
        let s = evaluate(&budget(), "USD", &r, &from_zero, now);
        assert_eq!(s.drift.as_ref().unwrap().ratio, None);
        assert_eq!(
            desired_alerts(&budget(), &s)[0].annotations["summary"],
            "Spend rate of budget search-llm jumped to 12 USD/h, from nothing (baseline 0 USD/h)"
        );
        // Exactly 3x does not fire: the rate must be *above* factor x baseline.
        let edge = Observed {
            drift_recent_spend: Money(d("12")),
            drift_baseline_spend: Money(d("96")),
            ..Observed::default()
        };
        assert!(!evaluate(&budget(), "USD", &r, &edge, now).drift.unwrap().firing);
    }

    #[test]
    fn a_split_has_its_own_status_and_its_alerts_carry_the_split_labels() {
        let now = t("2026-11-16T00:00:00Z");
        let mut per_team = budget();
        per_team.name = "per-team".into();
        per_team.split_by = vec!["tenant".into()];
        per_team.forecast = false;
        let seen = Observed {
            period_spend: Money(d("2600")),
            split: vec!["search-a".into()],
            ..Observed::default()
        };
        let s = evaluate(&per_team, "USD", &ranges(now), &seen, now);
        assert_eq!(s.split, BTreeMap::from([("tenant".to_owned(), "search-a".to_owned())]));
        assert_eq!(status_subject(&s), "per-team (tenant=search-a)");
        let alerts = desired_alerts(&per_team, &s);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].labels["tenant"], "search-a");
        assert_eq!(
            alerts[0].key,
            "budget=per-team,kind=threshold,period=2026-11-01T00:00:00+00:00,tenant=search-a,threshold=0.5"
        );
        assert_eq!(
            alerts[0].annotations["summary"],
            "Budget per-team (tenant=search-a) has used 52% of 5000 USD this period (2600 USD spent; threshold 50%)"
        );
        // Another tenant's crossing is another alert, not a repeat of this one.
        let other = Observed {
            split: vec!["search-b".into()],
            ..seen
        };
        let b = desired_alerts(&per_team, &evaluate(&per_team, "USD", &ranges(now), &other, now));
        assert_ne!(b[0].key, alerts[0].key);
        assert_eq!(
            serde_json::to_value(&s).unwrap()["split"],
            serde_json::json!({"tenant": "search-a"})
        );
    }

    #[test]
    fn unpriced_usage_is_an_alert_per_pair() {
        let now = t("2026-11-16T00:00:00Z");
        let seen = Observed {
            unpriced: vec![UnpricedUsage {
                model: "qwen2-72b".into(),
                hardware: "tpu-v9".into(),
                events: 42,
            }],
            ..Observed::default()
        };
        let s = evaluate(&budget(), "USD", &ranges(now), &seen, now);
        let alerts = desired_alerts(&budget(), &s);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].labels["severity"], "warning");
        assert_eq!(alerts[0].labels["hardware"], "tpu-v9");
        assert_eq!(
            alerts[0].key,
            "budget=search-llm,hardware=tpu-v9,kind=unpriced,model=qwen2-72b"
        );
        let mut quiet = budget();
        quiet.unpriced = false;
        assert!(desired_alerts(&quiet, &evaluate(&quiet, "USD", &ranges(now), &seen, now)).is_empty());
    }
}
