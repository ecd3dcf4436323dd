//! PostgreSQL for budgets: the spend a budget's scope has (read from the priced history, the
//! source of truth), the alert state machine, the webhook outbox, and the advisory lock that makes
//! one instance the evaluator.
//!
//! Every write of alert state goes through the connection that holds the advisory lock: if that
//! session is gone, so is the lock, and the write fails instead of racing a new leader.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};
use tracing::warn;

use crate::alerting::budget::{like_pattern, AlertSpec, Observed, Ranges, UnpricedUsage};
use crate::alerting::notify::AlertmanagerAlert;
use crate::config::BudgetSettings;
use crate::domain::Money;
use crate::history::read::{self, Detail, Finest, Slice};
use crate::store::{Store, StoreError};

/// The advisory lock key held by the instance that evaluates budgets ("costwatc" in ASCII).
const ALERTING_LOCK: i64 = 0x636f_7374_7761_7463;

/// The longest list of unpriced (model, hardware) pairs one budget reports.
const MAX_UNPRICED_PAIRS: i64 = 100;

/// Row cost, NULL when unpriced: what the `usage_costs` view sums (over
/// [`read::SLICE_COLUMNS`], signed).
const ROW_COST: &str = "compute_cost + storage_cost";

/// The most splits one budget evaluates (the highest spenders this period first); past it a
/// split's spend is not watched, which `observe_budget` logs.
pub const MAX_SPLITS: i64 = 1000;

/// A budget's scope and split as query parameters, bound in this order by [`bind_scope`].
struct ScopeParams {
    model: String,
    hardware: String,
    label_names: Vec<String>,
    label_patterns: Vec<String>,
    split_by: Vec<String>,
}

impl ScopeParams {
    /// What the budget reads of each row: the totals across keys when it neither scopes nor
    /// splits (every row is in it), the keys otherwise.
    fn detail(&self) -> Detail {
        let whole =
            self.model == "%" && self.hardware == "%" && self.label_names.is_empty() && self.split_by.is_empty();
        if whole {
            Detail::Totals
        } else {
            Detail::Keys
        }
    }

    fn of(budget: &BudgetSettings) -> Self {
        Self {
            model: like_pattern(budget.scope.model.as_deref()),
            hardware: like_pattern(budget.scope.hardware.as_deref()),
            label_names: budget.scope.labels.keys().cloned().collect(),
            label_patterns: budget.scope.labels.values().map(|g| like_pattern(Some(g))).collect(),
            split_by: budget.split_by.clone(),
        }
    }
}

/// The scope as SQL conditions with the parameters `$first..$first+4` ([`ScopeParams`]):
/// model and hardware globs, every label glob matched by a present label, every split label
/// present (usage without one is in no split). Each test is guarded by a test of its parameter
/// alone (`'%'`, an empty list) that the planner folds to a constant (costwatch's sessions plan
/// every statement with its parameters, `plan_cache_mode = force_custom_plan`), so a budget
/// without labels does not run a subquery per row.
fn scope_condition(first: usize) -> String {
    let (model, hardware, names, patterns, split) = (first, first + 1, first + 2, first + 3, first + 4);
    format!(
        "(${model} = '%' OR model LIKE ${model} ESCAPE '\\') AND (${hardware} = '%' OR hardware LIKE ${hardware} ESCAPE '\\')
         AND (cardinality(${names}::text[]) = 0
              OR NOT EXISTS (SELECT 1 FROM unnest(${names}::text[], ${patterns}::text[]) AS g(name, pattern)
                             WHERE (labels->>g.name LIKE g.pattern ESCAPE '\\') IS NOT TRUE))
         AND (cardinality(${split}::text[]) = 0 OR labels ?& ${split}::text[])"
    )
}

/// The split a row belongs to: the values of the `split_by` labels (parameter `$split`), in
/// that order; `{}` for a budget without `split_by` (folded to that constant when planned).
fn split_expr(split: usize) -> String {
    format!(
        "CASE WHEN cardinality(${split}::text[]) = 0 THEN '{{}}'::text[]
              ELSE ARRAY(SELECT labels->>s.name FROM unnest(${split}::text[]) WITH ORDINALITY AS s(name, i) ORDER BY s.i) END"
    )
}

fn bind_scope<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    p: &'q ScopeParams,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(&p.model)
        .bind(&p.hardware)
        .bind(&p.label_names)
        .bind(&p.label_patterns)
        .bind(&p.split_by)
}

/// One split's spend over each range, from a row of `observe_budget`'s query.
fn observed_spend(row: &sqlx::postgres::PgRow) -> Observed {
    let m = |name: &str| Money(row.get::<Decimal, _>(name));
    Observed {
        period_spend: m("period"),
        short_spend: m("short"),
        long_spend: m("long"),
        drift_recent_spend: m("recent"),
        drift_baseline_spend: m("baseline"),
        unpriced: Vec::new(),
        split: split_of(row),
    }
}

fn split_of(row: &sqlx::postgres::PgRow) -> Vec<String> {
    let values: Vec<Option<String>> = row.get("split");
    values.into_iter().map(Option::unwrap_or_default).collect()
}

impl Store {
    /// Reads what a budget's scope spent over each of `ranges`, and its unpriced usage: one
    /// [`Observed`] per split seen this period (ordered by split), or exactly one for a budget
    /// without `split_by`.
    pub async fn observe_budget(
        &self,
        budget: &BudgetSettings,
        currency: &str,
        ranges: &Ranges,
    ) -> Result<Vec<Observed>, StoreError> {
        let scope = ScopeParams::of(budget);
        // Each range in the parts that read the fewest raw windows (`Ranges::parts`: whole hours
        // from the roll-ups, the minutes outside the range taken back out), each part from the
        // tiers that cover it (whole days daily, whole hours hourly, the rest raw), one arm per
        // slice with constant bounds. Splits are kept when they have usage this period; a budget
        // without splits always is.
        // $1 the currency, $2..$6 the scope, $7 the limit, then each slice's bounds.
        // A budget over everything reads the totals across keys (`ScopeParams::detail`): its
        // scope and split conditions fold to true there.
        let (split, in_scope, detail) = (split_expr(6), scope_condition(2), scope.detail());
        let slices: Vec<(usize, Slice)> = ranges
            .parts()
            .into_iter()
            .flat_map(|p| {
                read::slices(p.part, Finest::Day, detail)
                    .into_iter()
                    .map(move |s| (p.range, s))
            })
            .collect();
        let mut arms: Vec<String> = slices
            .iter()
            .enumerate()
            .map(|(i, (range, slice))| {
                format!(
                    "SELECT {range} AS range, {ROW_COST} AS cost, events, priced, {split} AS split
                     FROM ({}) AS s WHERE (currency = $1 OR NOT priced) AND {in_scope}",
                    read::slice_sql(slice, 8 + 2 * i, 9 + 2 * i)
                )
            })
            .collect();
        if arms.is_empty() {
            arms.push(format!(
                "SELECT 0 AS range, {ROW_COST} AS cost, events, priced, {split} AS split FROM ({}) AS s",
                read::NO_SLICE
            ));
        }
        // `unpriced_events`: the period's unpriced events in every split kept, the ones past
        // the limit too: whether the per-pair listing of unpriced usage has anything to find (it
        // reads every key's rows of the period; the totals cannot answer it). Unpriced usage is
        // read in any currency, as that listing does: it has no cost to count in another.
        let sql = format!(
            "SELECT split,
               COALESCE(sum(sum(events) FILTER (WHERE range = 0 AND NOT priced)) OVER (), 0)::int8 AS unpriced_events,
               COALESCE(sum(cost) FILTER (WHERE range = 0), 0) AS period,
               COALESCE(sum(cost) FILTER (WHERE range = 1), 0) AS short,
               COALESCE(sum(cost) FILTER (WHERE range = 2), 0) AS long,
               COALESCE(sum(cost) FILTER (WHERE range = 3), 0) AS recent,
               COALESCE(sum(cost) FILTER (WHERE range = 4), 0) AS baseline
             FROM ({}) w
             GROUP BY split
             HAVING cardinality($6::text[]) = 0 OR sum(events) FILTER (WHERE range = 0) > 0
             ORDER BY period DESC, split LIMIT $7",
            arms.join(" UNION ALL ")
        );
        let mut query = bind_scope(sqlx::query(&sql).bind(currency), &scope).bind(MAX_SPLITS);
        for (_, slice) in &slices {
            query = query.bind(slice.from).bind(slice.to);
        }
        let rows = query.fetch_all(self.pool()).await?;
        if rows.len() as i64 == MAX_SPLITS {
            warn!(budget = %budget.name, max = MAX_SPLITS, "budget has more splits than are evaluated; the smallest spenders are not watched");
        }
        let mut observed: BTreeMap<Vec<String>, Observed> = rows
            .iter()
            .map(observed_spend)
            .map(|seen| (seen.split.clone(), seen))
            .collect();
        if budget.split_by.is_empty() {
            observed.entry(Vec::new()).or_default();
        }
        let any_unpriced = rows.iter().any(|r| r.get::<i64, _>("unpriced_events") != 0);
        if budget.unpriced && any_unpriced {
            for (split, usage) in self.unpriced_usage(&scope, ranges).await? {
                let entry = observed.entry(split.clone()).or_insert_with(|| Observed {
                    split,
                    ..Observed::default()
                });
                entry.unpriced.push(usage);
            }
        }
        Ok(observed.into_values().collect())
    }

    /// Each (split, model, hardware) in scope with usage this period but no price.
    async fn unpriced_usage(
        &self,
        scope: &ScopeParams,
        ranges: &Ranges,
    ) -> Result<Vec<(Vec<String>, UnpricedUsage)>, StoreError> {
        // The period as the budget's spend reads it (see `observe_budget`); a pair whose parts
        // cancel out had no usage this period.
        let slices: Vec<Slice> = read::parts(ranges.period.0, ranges.period.1, ranges.now)
            .into_iter()
            .flat_map(|part| read::slices(part, Finest::Day, Detail::Keys))
            .collect();
        let sql = format!(
            "SELECT split, model, hardware, sum(events)::int8 AS events
             FROM (SELECT {split} AS split, model, hardware, events FROM ({rows}) AS s
                   WHERE NOT priced AND {scope}) w
             GROUP BY split, model, hardware HAVING sum(events) > 0
             ORDER BY split, model, hardware LIMIT $6",
            split = split_expr(5),
            scope = scope_condition(1),
            rows = read::union_sql(&slices, 7),
        );
        let mut query = bind_scope(sqlx::query(&sql), scope).bind(MAX_UNPRICED_PAIRS);
        for slice in &slices {
            query = query.bind(slice.from).bind(slice.to);
        }
        let rows = query.fetch_all(self.pool()).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let usage = UnpricedUsage {
                    model: r.get("model"),
                    hardware: r.get("hardware"),
                    events: r.get("events"),
                };
                (split_of(r), usage)
            })
            .collect())
    }

    /// A dedicated session for the alerting lock (outside the pool: the lock lives and dies
    /// with this one connection).
    pub async fn lock_session(&self) -> Result<PgConnection, StoreError> {
        let options = (*self.pool().connect_options()).clone();
        Ok(PgConnection::connect_with(&options).await?)
    }

    /// Firing and recently changed alerts, newest first, for `GET /api/v1/alerts`.
    pub async fn list_alerts(&self, state: Option<&str>, limit: i64) -> Result<Vec<AlertRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.alert_key, a.budget, a.kind, a.labels, a.annotations, a.state, a.generation,
                    a.starts_at, a.ends_at, a.updated_at, a.alertmanager_pending,
                    (SELECT count(*) FROM alert_delivery d
                      WHERE d.alert_key = a.alert_key AND d.delivered_at IS NULL) AS pending_deliveries,
                    (SELECT d.last_error FROM alert_delivery d
                      WHERE d.alert_key = a.alert_key AND d.delivered_at IS NULL AND d.last_error IS NOT NULL
                      ORDER BY d.id DESC LIMIT 1) AS last_error
             FROM budget_alert a
             WHERE $1::text IS NULL OR a.state = $1
             ORDER BY a.updated_at DESC, a.alert_key LIMIT $2",
        )
        .bind(state)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(AlertRecord::from_row).collect())
    }

    /// Firing alerts per kind, for the `costwatch_alerts_firing` gauge.
    pub async fn firing_counts(&self) -> Result<HashMap<String, i64>, StoreError> {
        let rows = sqlx::query("SELECT kind, count(*) AS n FROM budget_alert WHERE state = 'firing' GROUP BY kind")
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().map(|r| (r.get("kind"), r.get("n"))).collect())
    }
}

/// One alert as stored.
#[derive(Debug, Clone, Serialize)]
pub struct AlertRecord {
    /// The alert's identity ([`alert_key`](crate::alerting::budget::alert_key)).
    pub key: String,
    /// The name of the budget it belongs to.
    pub budget: String,
    /// Its [`AlertKind`](crate::alerting::budget::AlertKind) as the `kind` label spells it.
    pub kind: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// The labels as last sent, a JSON object of strings.
    pub labels: Value,
    /// The annotations as last evaluated, a JSON object of strings.
    pub annotations: Value,
    /// Which firing this is; it goes up by one each time the alert fires again.
    pub generation: i32,
    /// When the current generation started firing.
    pub starts_at: DateTime<Utc>,
    /// When it resolved; `None` while it fires.
    pub ends_at: Option<DateTime<Utc>>,
    /// The last time the row changed (a transition or fresh annotations).
    pub updated_at: DateTime<Utc>,
    /// Whether Alertmanager has yet to acknowledge the current state.
    pub alertmanager_pending: bool,
    /// Webhook notifications of this alert not delivered yet, and the last error trying.
    pub pending_deliveries: i64,
    /// The last error delivering one of them; `None` when the last attempt succeeded or none was made.
    pub last_error: Option<String>,
}

impl AlertRecord {
    fn from_row(r: &sqlx::postgres::PgRow) -> Self {
        Self {
            key: r.get("alert_key"),
            budget: r.get("budget"),
            kind: r.get("kind"),
            state: r.get("state"),
            labels: r.get("labels"),
            annotations: r.get("annotations"),
            generation: r.get("generation"),
            starts_at: r.get("starts_at"),
            ends_at: r.get("ends_at"),
            updated_at: r.get("updated_at"),
            alertmanager_pending: r.get("alertmanager_pending"),
            pending_deliveries: r.get("pending_deliveries"),
            last_error: r.get("last_error"),
        }
    }
}

/// A state change recorded by [`apply_transitions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The alert's identity ([`alert_key`](crate::alerting::budget::alert_key)).
    pub key: String,
    /// `firing` or `resolved`: the state the alert moved to.
    pub status: &'static str,
    /// The generation the transition belongs to (a new one for each firing).
    pub generation: i32,
}

/// One webhook notification waiting in the outbox.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The outbox row's id, sent as the delivery id so a receiver can drop repeats.
    pub id: i64,
    /// The webhook's name.
    pub receiver: String,
    /// The JSON body to send (`version`, `status`, `alert`), fixed when the transition was recorded.
    pub payload: Value,
    /// How many times sending it failed so far; sets the next [`retry_delay`](crate::alerting::notify::retry_delay).
    pub attempts: i32,
    /// Not to be retried before this instant.
    pub next_attempt_at: DateTime<Utc>,
}

/// Tries to take the alerting lock on `session`: true when this instance now evaluates budgets.
/// The lock is held until the session ends.
pub async fn try_lock(session: &mut PgConnection) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(ALERTING_LOCK)
        .fetch_one(session)
        .await?)
}

/// Mirrors the configured budgets into the `budget` table; budgets no longer configured are
/// marked inactive.
pub async fn sync_budgets(
    conn: &mut PgConnection,
    budgets: &[BudgetSettings],
    currency: &str,
) -> Result<(), StoreError> {
    let mut tx = conn.begin().await?;
    for b in budgets {
        sqlx::query(
            "INSERT INTO budget (name, period, amount, currency, model_glob, hardware_glob, thresholds, forecast,
                                 drift, severity, time_zone, label_globs, split_by, active, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, true, now())
             ON CONFLICT (name) DO UPDATE SET
               period = excluded.period, amount = excluded.amount, currency = excluded.currency,
               model_glob = excluded.model_glob, hardware_glob = excluded.hardware_glob,
               label_globs = excluded.label_globs, split_by = excluded.split_by,
               thresholds = excluded.thresholds, forecast = excluded.forecast, drift = excluded.drift,
               severity = excluded.severity, time_zone = excluded.time_zone, active = true, updated_at = now()",
        )
        .bind(&b.name)
        .bind(
            serde_json::to_value(b.period)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned)),
        )
        .bind(b.amount.value())
        .bind(currency)
        .bind(b.scope.model.as_deref().unwrap_or("*"))
        .bind(b.scope.hardware.as_deref().unwrap_or("*"))
        .bind(&b.thresholds)
        .bind(b.forecast)
        .bind(b.drift.as_ref().map(|d| {
            json!({
                "factor": d.factor.normalize().to_string(),
                "window": humantime::format_duration(d.window).to_string(),
                "baseline": humantime::format_duration(d.baseline).to_string(),
                "min_spend": d.min_spend.to_string(),
            })
        }))
        .bind(&b.severity)
        .bind(b.time_zone.name())
        .bind(json!(b.scope.labels))
        .bind(&b.split_by)
        .execute(&mut *tx)
        .await?;
    }
    let names: Vec<&str> = budgets.iter().map(|b| b.name.as_str()).collect();
    sqlx::query("UPDATE budget SET active = false, updated_at = now() WHERE active AND name <> ALL($1)")
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Records `spec` as firing, in a new generation if it fired before; returns the generation.
async fn fire(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    spec: &AlertSpec,
    labels: &Value,
    annotations: &Value,
    now: DateTime<Utc>,
) -> Result<i32, StoreError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO budget_alert (alert_key, budget, kind, labels, annotations, state, starts_at)
         VALUES ($1, $2, $3, $4, $5, 'firing', $6)
         ON CONFLICT (alert_key) DO UPDATE SET
           state = 'firing', generation = budget_alert.generation + 1, starts_at = excluded.starts_at,
           ends_at = NULL, labels = excluded.labels, annotations = excluded.annotations,
           alertmanager_pending = true, updated_at = now()
         RETURNING generation",
    )
    .bind(&spec.key)
    .bind(&spec.budget)
    .bind(spec.kind.as_str())
    .bind(labels)
    .bind(annotations)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?)
}

/// Moves the stored alerts to `desired` in one transaction: new ones fire (a new generation),
/// firing ones no longer desired resolve, and each transition queues one notification per
/// webhook `receivers`. Alerts that stay firing only get fresh annotations.
pub async fn apply_transitions(
    conn: &mut PgConnection,
    desired: &[AlertSpec],
    receivers: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<Transition>, StoreError> {
    let mut tx = conn.begin().await?;
    let firing: HashSet<String> =
        sqlx::query_scalar("SELECT alert_key FROM budget_alert WHERE state = 'firing' FOR UPDATE")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let mut transitions = Vec::new();
    let mut wanted = HashSet::new();
    for spec in desired {
        wanted.insert(spec.key.as_str());
        let labels = serde_json::to_value(&spec.labels).unwrap_or_default();
        let annotations = serde_json::to_value(&spec.annotations).unwrap_or_default();
        if firing.contains(&spec.key) {
            sqlx::query(
                "UPDATE budget_alert SET labels = $2, annotations = $3, updated_at = now() WHERE alert_key = $1",
            )
            .bind(&spec.key)
            .bind(&labels)
            .bind(&annotations)
            .execute(&mut *tx)
            .await?;
            continue;
        }
        let generation = fire(&mut tx, spec, &labels, &annotations, now).await?;
        let alert = json!({
            "key": spec.key, "labels": labels, "annotations": annotations,
            "starts_at": now, "ends_at": null, "generation": generation,
        });
        enqueue(&mut tx, &spec.key, generation, "firing", alert, receivers).await?;
        transitions.push(Transition {
            key: spec.key.clone(),
            status: "firing",
            generation,
        });
    }
    for key in firing.iter().filter(|k| !wanted.contains(k.as_str())) {
        let row = sqlx::query(
            "UPDATE budget_alert SET state = 'resolved', ends_at = $2, alertmanager_pending = true, updated_at = now()
             WHERE alert_key = $1 RETURNING labels, annotations, generation, starts_at",
        )
        .bind(key)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let generation: i32 = row.get("generation");
        let alert = json!({
            "key": key, "labels": row.get::<Value, _>("labels"), "annotations": row.get::<Value, _>("annotations"),
            "starts_at": row.get::<DateTime<Utc>, _>("starts_at"), "ends_at": now, "generation": generation,
        });
        enqueue(&mut tx, key, generation, "resolved", alert, receivers).await?;
        transitions.push(Transition {
            key: key.clone(),
            status: "resolved",
            generation,
        });
    }
    tx.commit().await?;
    Ok(transitions)
}

async fn enqueue(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: &str,
    generation: i32,
    status: &str,
    alert: Value,
    receivers: &[String],
) -> Result<(), StoreError> {
    let payload = json!({ "version": "1", "status": status, "alert": alert });
    for receiver in receivers {
        sqlx::query(
            "INSERT INTO alert_delivery (alert_key, generation, status, receiver, payload)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(generation)
        .bind(status)
        .bind(receiver)
        .bind(&payload)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Every firing alert (Alertmanager wants them re-sent while they fire) and every resolution
/// Alertmanager has not acknowledged yet.
pub async fn alertmanager_batch(conn: &mut PgConnection) -> Result<Vec<AlertmanagerAlert>, StoreError> {
    let rows = sqlx::query(
        "SELECT alert_key, state, generation, labels, annotations, starts_at, ends_at FROM budget_alert
         WHERE state = 'firing' OR alertmanager_pending ORDER BY alert_key",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| AlertmanagerAlert {
            key: r.get("alert_key"),
            state: r.get("state"),
            generation: r.get("generation"),
            labels: serde_json::from_value(r.get("labels")).unwrap_or_default(),
            annotations: serde_json::from_value(r.get("annotations")).unwrap_or_default(),
            starts_at: r.get("starts_at"),
            ends_at: r.get("ends_at"),
        })
        .collect())
}

/// Records that Alertmanager accepted `sent`; a state that changed meanwhile stays pending.
pub async fn alertmanager_acknowledged(conn: &mut PgConnection, sent: &[AlertmanagerAlert]) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE budget_alert a SET alertmanager_pending = false, alertmanager_sent_at = now()
         FROM UNNEST($1::text[], $2::text[], $3::int4[]) AS s(alert_key, state, generation)
         WHERE a.alert_key = s.alert_key AND a.state = s.state AND a.generation = s.generation",
    )
    .bind(sent.iter().map(|a| a.key.as_str()).collect::<Vec<_>>())
    .bind(sent.iter().map(|a| a.state.as_str()).collect::<Vec<_>>())
    .bind(sent.iter().map(|a| a.generation).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Undelivered webhook notifications, oldest first per receiver.
pub async fn pending_deliveries(conn: &mut PgConnection, limit: i64) -> Result<Vec<Delivery>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, receiver, payload, attempts, next_attempt_at FROM alert_delivery
         WHERE delivered_at IS NULL ORDER BY receiver, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| Delivery {
            id: r.get("id"),
            receiver: r.get("receiver"),
            payload: r.get("payload"),
            attempts: r.get("attempts"),
            next_attempt_at: r.get("next_attempt_at"),
        })
        .collect())
}

/// Marks an outbox entry delivered; it is never sent again.
pub async fn delivered(conn: &mut PgConnection, id: i64) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE alert_delivery SET delivered_at = now(), attempts = attempts + 1, last_error = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt with its error (shown in `costwatch alerts`/the API) and when to try again.
pub async fn delivery_failed(
    conn: &mut PgConnection,
    id: i64,
    error: &str,
    retry_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE alert_delivery SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(retry_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Undelivered notifications: webhook rows plus alerts Alertmanager has yet to acknowledge.
pub async fn pending_count(conn: &mut PgConnection, alertmanager: bool) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM alert_delivery WHERE delivered_at IS NULL)
              + (SELECT count(*) FROM budget_alert WHERE alertmanager_pending AND $1)",
    )
    .bind(alertmanager)
    .fetch_one(conn)
    .await?)
}
