//! The HTTP listener: `/metrics`, health probes, and the JSON API over the priced history in
//! PostgreSQL (`/api/v1/*`, described by `/api/v1/openapi.json`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::alerting::SharedBoard;
use crate::pricing::{EstimateError, EstimateRequest, LivePrices};
use crate::store::Store;
use crate::{calibration_store, recommend, telemetry};

/// What the consumer reports for `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    last_poll_ms: AtomicI64,
    assigned: AtomicUsize,
    /// Set when librdkafka reports every broker down; cleared when its statistics show a
    /// broker connection up again (every 5 s). Not known down until librdkafka says so.
    broker_down: AtomicBool,
}

impl Health {
    pub fn set_broker_reachable(&self, reachable: bool) {
        self.broker_down.store(!reachable, Ordering::Relaxed);
    }

    /// Called by the consumer loop on every poll.
    pub fn polled(&self) {
        self.last_poll_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn set_assigned(&self, n: usize) {
        self.assigned.store(n, Ordering::Relaxed);
    }
}

/// The consumer counts as alive while it polled within this long.
const POLL_STALE: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The daemon's live price book: calibrated versions appear here as they are loaded.
    pub prices: LivePrices,
    /// The default range of `/api/v1/recommendations`, ending now.
    pub savings_window: Duration,
    pub metrics: Option<PrometheusHandle>,
    pub api_token: Option<Arc<str>>,
    pub health: Arc<Health>,
    /// The budget evaluator's latest result.
    pub budgets: SharedBoard,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/costs", get(costs))
        .route("/estimate", post(estimate))
        .route("/rejected", get(rejected))
        .route("/recommendations", get(recommendations))
        .route("/budgets", get(budgets))
        .route("/alerts", get(alerts))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/openapi.json", get(openapi));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

/// Serves until `cancel` fires. Binds first so that a port in use fails the start, not later.
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (http.listen): {e}"))?;
    Ok(listener)
}

pub async fn serve(listener: TcpListener, state: AppState, cancel: CancellationToken) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "http listening (metrics, health, api)");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await?;
    Ok(())
}

/// Errors as JSON `{"error": "..."}` with a status that says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("no such endpoint; see /api/v1/openapi.json")]
    NotFound,
    #[error("the database is unavailable; try again shortly")]
    Unavailable,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        warn!(%error, "api query failed");
        ApiError::Unavailable
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

async fn require_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.api_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// Compares without an early exit, so response time does not reveal a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    body.push_str(&telemetry::render_ledger());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let database = tokio::time::timeout(Duration::from_secs(2), state.store.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let last_poll = state.health.last_poll_ms.load(Ordering::Relaxed);
    let consuming = last_poll > 0 && Utc::now().timestamp_millis() - last_poll < POLL_STALE.as_millis() as i64;
    let broker = !state.health.broker_down.load(Ordering::Relaxed);
    let body = json!({
        "database": database,
        "broker": broker,
        "consuming": consuming,
        "assigned_partitions": state.health.assigned.load(Ordering::Relaxed),
    });
    let status = if database && broker && consuming {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Step {
    Window,
    Hour,
    Day,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CostsQuery {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    model: Option<String>,
    hardware: Option<String>,
    step: Option<Step>,
}

#[derive(Debug, Default, Serialize)]
struct CostPoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<DateTime<Utc>>,
    events: i64,
    compute: String,
    storage: String,
    compute_cost: String,
    storage_cost: String,
    total_cost: String,
    /// Events on unpriced hardware: their usage is in `compute`/`storage`, their cost nowhere.
    unpriced_events: i64,
}

/// Most points one response may hold; a longer range needs a coarser step.
const MAX_POINTS: i64 = 10_000;

async fn costs(
    State(state): State<AppState>,
    query: Result<Query<CostsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or(to - chrono::Duration::hours(24));
    if from >= to {
        return Err(ApiError::BadRequest(format!("from ({from}) must be before to ({to})")));
    }
    for (name, value) in [("model", &q.model), ("hardware", &q.hardware)] {
        if value.as_deref().is_some_and(|v| v.contains('\0')) {
            return Err(ApiError::BadRequest(format!("{name} must not contain NUL characters")));
        }
    }
    let step = q.step.unwrap_or(Step::Hour);
    // Windows are at least a second wide; counting them as a minute (the default) allows about
    // a week at step=window.
    let step_secs = match step {
        Step::Window => 60,
        Step::Hour => 3600,
        Step::Day => 86_400,
    };
    if (to - from).num_seconds() / step_secs > MAX_POINTS {
        return Err(ApiError::BadRequest(format!(
            "the range from {from} to {to} has more than {MAX_POINTS} points at this step; use a coarser step or a shorter range"
        )));
    }
    let trunc = match step {
        Step::Window => "window",
        Step::Hour => "hour",
        Step::Day => "day",
    };
    let rows = sqlx::query(
        "SELECT CASE WHEN $3 = 'window' THEN window_start ELSE date_trunc($3, window_start, 'UTC') END AS bucket,
                sum(events)::int8 AS events, sum(compute) AS compute, sum(storage) AS storage,
                COALESCE(sum(compute_cost), 0) AS compute_cost, COALESCE(sum(storage_cost), 0) AS storage_cost,
                COALESCE(sum(total_cost), 0) AS total_cost,
                COALESCE(sum(events) FILTER (WHERE total_cost IS NULL), 0)::int8 AS unpriced_events
         FROM usage_costs
         WHERE window_start >= $1 AND window_start < $2
           AND ($4::text IS NULL OR model = $4) AND ($5::text IS NULL OR hardware = $5)
         GROUP BY 1 ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .bind(trunc)
    .bind(&q.model)
    .bind(&q.hardware)
    .fetch_all(state.store.pool())
    .await?;

    let mut totals = [Decimal::ZERO; 5];
    let (mut events, mut unpriced) = (0i64, 0i64);
    let mut series = Vec::with_capacity(rows.len());
    for r in rows {
        let values: [Decimal; 5] = [
            r.get("compute"),
            r.get("storage"),
            r.get("compute_cost"),
            r.get("storage_cost"),
            r.get("total_cost"),
        ];
        for (t, v) in totals.iter_mut().zip(values) {
            *t += v;
        }
        events += r.get::<i64, _>("events");
        unpriced += r.get::<i64, _>("unpriced_events");
        series.push(point(
            Some(r.get("bucket")),
            r.get("events"),
            values,
            r.get("unpriced_events"),
        ));
    }
    Ok(Json(json!({
        "from": from,
        "to": to,
        "step": trunc,
        "model": q.model,
        "hardware": q.hardware,
        "currency": state.prices.current().currency(),
        "totals": point(None, events, totals, unpriced),
        "series": series,
    }))
    .into_response())
}

fn point(start: Option<DateTime<Utc>>, events: i64, v: [Decimal; 5], unpriced_events: i64) -> CostPoint {
    let s = |d: Decimal| d.normalize().to_string();
    CostPoint {
        start,
        events,
        compute: s(v[0]),
        storage: s(v[1]),
        compute_cost: s(v[2]),
        storage_cost: s(v[3]),
        total_cost: s(v[4]),
        unpriced_events,
    }
}

async fn estimate(
    State(state): State<AppState>,
    body: Result<Json<EstimateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body?;
    let estimate = request
        .price(Some(&state.prices.current()))
        .map_err(|e: EstimateError| ApiError::BadRequest(e.to_string()))?;
    Ok(Json(estimate).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectedQuery {
    limit: Option<i64>,
}

async fn rejected(
    State(state): State<AppState>,
    query: Result<Query<RejectedQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 1000, got {limit}"
        )));
    }
    let rows = sqlx::query(
        "SELECT received_at, topic, partition, kafka_offset, reason_code, reason_message, payload_text,
                octet_length(payload) AS payload_bytes
         FROM rejected_events ORDER BY received_at DESC, kafka_offset DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(state.store.pool())
    .await?;
    let items: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "received_at": r.get::<DateTime<Utc>, _>("received_at"),
                "topic": r.get::<String, _>("topic"),
                "partition": r.get::<i32, _>("partition"),
                "offset": r.get::<i64, _>("kafka_offset"),
                "reason_code": r.get::<String, _>("reason_code"),
                "reason": r.get::<String, _>("reason_message"),
                "payload_text": r.get::<Option<String>, _>("payload_text"),
                "payload_bytes": r.get::<i32, _>("payload_bytes"),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })).into_response())
}

/// The budgets as of the latest evaluation (every instance evaluates; only the leader alerts).
async fn budgets(State(state): State<AppState>) -> Response {
    let board = state.budgets.read().unwrap_or_else(|p| p.into_inner()).clone();
    Json(board).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsQuery {
    state: Option<String>,
    limit: Option<i64>,
}

/// Alerts as recorded in PostgreSQL: firing ones and past ones, newest first.
async fn alerts(
    State(state): State<AppState>,
    query: Result<Query<AlertsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let filter = match q.state.as_deref() {
        None | Some("all") => None,
        Some(s @ ("firing" | "resolved")) => Some(s),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "state must be firing, resolved or all, got {other:?}"
            )))
        }
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 1000, got {limit}"
        )));
    }
    let items = state.store.list_alerts(filter, limit).await.map_err(|error| {
        warn!(%error, "api query failed");
        ApiError::Unavailable
    })?;
    Ok(Json(json!({ "items": items })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecommendationsQuery {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

async fn recommendations(
    State(state): State<AppState>,
    query: Result<Query<RecommendationsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let to = q.to.unwrap_or_else(Utc::now);
    let window = chrono::Duration::from_std(state.savings_window).unwrap_or(chrono::Duration::days(1));
    let from = match q.from {
        Some(from) => from,
        None => to
            .checked_sub_signed(window)
            .ok_or_else(|| ApiError::BadRequest(format!("to ({to}) is too early to count back from")))?,
    };
    if from >= to {
        return Err(ApiError::BadRequest(format!("from ({from}) must be before to ({to})")));
    }
    let usage = calibration_store::usage_by_model(state.store.pool(), from, to).await?;
    let book = state.prices.current();
    let models = recommend::recommend(&book, &usage, to).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(Json(recommend::Recommendations {
        from,
        to,
        currency: book.currency().to_owned(),
        models,
    })
    .into_response())
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-124", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
    }

    #[test]
    fn the_openapi_document_is_json() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        assert_eq!(doc["openapi"], "3.0.3");
        for path in [
            "/api/v1/costs",
            "/api/v1/estimate",
            "/api/v1/rejected",
            "/api/v1/recommendations",
            "/api/v1/budgets",
            "/api/v1/alerts",
            "/healthz",
            "/readyz",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is not documented");
        }
    }
}
