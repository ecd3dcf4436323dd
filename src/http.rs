//! The HTTP listener: `/metrics`, health probes, and the JSON API over the priced history in
//! PostgreSQL (`/api/v1/*`, described by `/api/v1/openapi.json`).

use std::net::SocketAddr;
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
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::alerting::evaluator::SharedBoard;
use crate::calibration::{self, recommend};
use crate::ingest::health::Health;
use crate::pricing::{EstimateError, EstimateRequest, LivePrices};
use crate::store::Store;
use crate::telemetry;
use crate::usage::query::LABEL_PREFIX;
use crate::usage::{self, render, CostQuery, CostRow, CostStep, Dimension, LabelFilter, Month};

/// How long shutdown lets requests in flight finish before their connections are dropped.
const DRAIN_CONNECTIONS: Duration = Duration::from_secs(5);

/// What every handler can reach: the database, prices, health, budgets and the HTTP settings.
#[derive(Clone)]
pub struct AppState {
    /// The database the API reads costs, rejections and alerts from.
    pub store: Store,
    /// The daemon's live price book: calibrated versions appear here as they are loaded.
    pub prices: LivePrices,
    /// The default range of `/api/v1/recommendations`, ending now.
    pub savings_window: Duration,
    /// The Prometheus recorder whose output `/metrics` renders; `None` when none is installed, and then `/metrics` shows only the exact counters and `process_*`.
    pub metrics: Option<PrometheusHandle>,
    /// The bearer token the API (and `/metrics` with `protect_metrics`) requires, from `http.api_token`; `None`: open.
    pub api_token: Option<Arc<str>>,
    /// The consumer's liveness, for `/readyz`.
    pub health: Arc<Health>,
    /// The budget evaluator's latest result.
    pub budgets: SharedBoard,
    /// `/metrics` needs the token too (`http.protect_metrics`).
    pub protect_metrics: bool,
    /// How long to wait on clients and on handlers.
    pub timeouts: Timeouts,
    /// Asks the daemon to re-read its configuration file (`POST /-/reload`); `None`: no
    /// daemon to ask, and the route answers 503.
    pub reload: Option<ReloadTrigger>,
}

/// The answer to a reload request: the keys that changed but wait for a restart, or why the
/// new configuration was refused (nothing changed then).
pub type ReloadOutcome = Result<Vec<String>, String>;

/// Where `POST /-/reload` sends its request; the daemon answers on the enclosed channel once
/// the reload is applied or refused.
pub type ReloadTrigger = tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ReloadOutcome>>;

/// How long the listener waits on a client (`http.header_read_timeout`) and on itself
/// (`http.request_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a client may take to send a request's headers (`http.header_read_timeout`).
    pub header_read: Duration,
    /// How long a handler may take before the client gets a 503 (`http.request_timeout`).
    pub request: Duration,
}

impl Timeouts {
    /// The timeouts of `[http]`.
    pub fn from_settings(http: &crate::config::HttpSettings) -> Self {
        Timeouts {
            header_read: http.header_read_timeout,
            request: http.request_timeout,
        }
    }
}

/// Every route: `/metrics`, `/healthz`, `/readyz` and `/api/v1/*`, with the token and time-limit middleware.
pub fn router(state: AppState) -> Router {
    let token = middleware::from_fn_with_state(state.clone(), require_token);
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if state.protect_metrics {
        metrics_route = metrics_route.route_layer(token.clone());
    }
    let api = Router::new()
        .route("/costs", get(costs))
        .route("/report", get(report))
        .route("/estimate", post(estimate))
        .route("/rejected", get(rejected))
        .route("/recommendations", get(recommendations))
        .route("/budgets", get(budgets))
        .route("/alerts", get(alerts))
        .route_layer(token.clone())
        .route("/openapi.json", get(openapi));
    // Prometheus's lifecycle endpoint path; it changes what the daemon does, so it needs the
    // token whenever the API does.
    let admin = Router::new().route("/-/reload", post(reload)).route_layer(token);
    Router::new()
        .merge(metrics_route)
        .merge(admin)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), time_limit))
        .with_state(state)
}

/// Binds the listener, first thing at start, so that a port in use fails the start rather
/// than later.
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (http.listen): {e}"))?;
    Ok(listener)
}

/// Serves the router on `listener` until `cancel` fires, then gives requests in flight up to 5 s to finish.
pub async fn serve(listener: TcpListener, state: AppState, cancel: CancellationToken) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "http listening (metrics, health, api)");
    let header_read = state.timeouts.header_read;
    let app = router(state);
    // hyper rather than `axum::serve`, which (axum 0.8) sets no timer and so no header timeout.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(header_read);
    let connections = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    warn!(%error, "cannot accept an http connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (http1, app, watcher, cancel) = (http1.clone(), app.clone(), connections.watcher(), cancel.clone());
        tokio::spawn(async move {
            // hyper starts its header timer at a request's first byte, so a connection that
            // never sends one is timed here.
            tokio::select! {
                first = tokio::time::timeout(header_read, stream.readable()) => {
                    if !matches!(first, Ok(Ok(()))) {
                        return;
                    }
                }
                _ = cancel.cancelled() => return,
            }
            let connection = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            // Errors are the client's doing (a reset, a header timeout): nothing to report.
            let _ = watcher.watch(connection).await;
        });
    }
    // Requests in flight may finish; a client that does not read its response does not hold
    // the shutdown up for longer than this.
    if tokio::time::timeout(DRAIN_CONNECTIONS, connections.shutdown())
        .await
        .is_err()
    {
        warn!(after = ?DRAIN_CONNECTIONS, "closing http connections that did not finish");
    }
    Ok(())
}

/// Errors as JSON `{"error": "..."}` with a status that says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong (a parameter out of range, a bad body): 400 with the reason.
    #[error("{0}")]
    BadRequest(String),
    /// The bearer token is missing or wrong: 401.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// No such route: 404.
    #[error("no such endpoint; see /api/v1/openapi.json")]
    NotFound,
    /// PostgreSQL did not answer: 503.
    #[error("the database is unavailable; try again shortly")]
    Unavailable,
    /// The handler ran past `http.request_timeout`: 503 (the configured limit is given).
    #[error("the request took longer than http.request_timeout ({}); try again, or ask for a shorter range", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Unavailable | ApiError::TimedOut(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            .and_then(bearer_token);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// The credentials of a `Bearer` authorization; the scheme name is case-insensitive
/// (RFC 7235 2.1), so `bearer` and `BEARER` work too.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim_start_matches(' '))
}

/// Answers 503 when a request outlasts `http.request_timeout`; the handler is dropped with
/// what it holds (its pool connection goes back, the query ends at `statement_timeout`).
async fn time_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.timeouts.request;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut(limit).into_response(),
    }
}

/// Compares without an early exit, so response time does not reveal a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /-/reload`: re-reads the configuration file as SIGHUP does. 200 with the keys ignored
/// until a restart, or 500 with the reason the file was refused (nothing changed then).
async fn reload(State(state): State<AppState>) -> Response {
    let Some(trigger) = &state.reload else {
        return ApiError::Unavailable.into_response();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if trigger.send(reply).await.is_err() {
        return ApiError::Unavailable.into_response();
    }
    match answer.await {
        Ok(Ok(ignored)) => Json(json!({ "status": "success", "ignored_until_restart": ignored })).into_response(),
        Ok(Err(error)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "status": "error", "error": error })),
        )
            .into_response(),
        Err(_) => ApiError::Unavailable.into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    body.push_str(&telemetry::render_ledger());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Ready while the database answers, a broker is reachable, the consumer polls, the group has
/// handed this member an assignment and no owned partition is stalled; the body names what is
/// not.
async fn readyz(State(state): State<AppState>) -> Response {
    let database = tokio::time::timeout(Duration::from_secs(2), state.store.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let consuming = state.health.consuming();
    let broker = state.health.broker_reachable();
    let joined = state.health.has_joined();
    let stalled = state.health.stalled();
    let body = json!({
        "database": database,
        "broker": broker,
        "consuming": consuming,
        "group_joined": joined,
        "assigned_partitions": state.health.assigned(),
        "stalled_partitions": stalled,
    });
    let status = if database && broker && consuming && joined && stalled.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The times the API takes: RFC 3339's four-digit years. chrono holds about ±262,000 years and
/// PostgreSQL 4713 BC to 294276 AD; past either, arithmetic on a time overflows (a panic) or the
/// query fails (a 503), so such a time is refused up front, naming its parameter.
fn supported_times() -> std::ops::RangeInclusive<DateTime<Utc>> {
    let earliest = chrono::NaiveDate::from_ymd_opt(0, 1, 1).expect("a valid date");
    let latest = chrono::NaiveDate::from_ymd_opt(9999, 12, 31).expect("a valid date");
    earliest.and_time(chrono::NaiveTime::MIN).and_utc()
        ..=latest
            .and_hms_nano_opt(23, 59, 59, 999_999_999)
            .expect("a valid time")
            .and_utc()
}

fn supported(name: &str, time: Option<DateTime<Utc>>) -> Result<Option<DateTime<Utc>>, ApiError> {
    let range = supported_times();
    match time {
        Some(t) if !range.contains(&t) => {
            let show = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            Err(ApiError::BadRequest(format!(
                "{name} must be from {} to {}, got {}",
                show(range.start()),
                show(range.end()),
                show(&t)
            )))
        }
        _ => Ok(time),
    }
}

/// `span` before `to`, but no earlier than the first supported time.
fn back_from(to: DateTime<Utc>, span: chrono::Duration) -> DateTime<Utc> {
    let earliest = *supported_times().start();
    to.checked_sub_signed(span).map_or(earliest, |from| from.max(earliest))
}

/// A query string as pairs, in order and with repeats: `label.<name>` keys are not fixed field
/// names, so they are taken out before the rest is read as a struct.
type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Takes the `label.<name>=<value>` filters out of `pairs` and reads the rest as `T` (whose
/// `deny_unknown_fields` still names a mistyped parameter).
fn labelled_query<T: serde::de::DeserializeOwned>(pairs: QueryPairs) -> Result<(T, LabelFilter), ApiError> {
    let Query(pairs) = pairs?;
    let mut labels = LabelFilter::default();
    let mut rest = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        match key.strip_prefix(LABEL_PREFIX) {
            Some(name) => labels
                .insert(name, &value)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?,
            None => rest.push((key, value)),
        }
    }
    let encoded = serde_urlencoded::to_string(&rest).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let typed = serde_urlencoded::from_str(&encoded)
        .map_err(|e| ApiError::BadRequest(format!("Failed to deserialize query string: {e}")))?;
    Ok((typed, labels))
}

/// A comma-separated group-by list.
fn dimensions(list: Option<&str>) -> Result<Vec<Dimension>, ApiError> {
    let Some(list) = list else { return Ok(Vec::new()) };
    Dimension::parse_list(list.split(',')).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CostsQuery {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    model: Option<String>,
    hardware: Option<String>,
    step: Option<CostStep>,
    group_by: Option<String>,
}

/// Most points one response may hold; a longer range needs a coarser step.
const MAX_POINTS: i64 = 10_000;

async fn costs(State(state): State<AppState>, query: QueryPairs) -> Result<Response, ApiError> {
    let (q, labels) = labelled_query::<CostsQuery>(query)?;
    let to = supported("to", q.to)?.unwrap_or_else(Utc::now);
    let from = match supported("from", q.from)? {
        Some(from) => from,
        None => back_from(to, chrono::Duration::hours(24)),
    };
    if from >= to {
        return Err(ApiError::BadRequest(format!("from ({from}) must be before to ({to})")));
    }
    for (name, value) in [("model", &q.model), ("hardware", &q.hardware)] {
        if value.as_deref().is_some_and(|v| v.contains('\0')) {
            return Err(ApiError::BadRequest(format!("{name} must not contain NUL characters")));
        }
    }
    let by = dimensions(q.group_by.as_deref())?;
    let cost_step = q.step.unwrap_or(CostStep::Hour);
    // Windows are at least a second wide; counting them as a minute (the default) allows about
    // a week at step=window.
    if (to - from).num_seconds() / cost_step.approx_seconds() > MAX_POINTS {
        return Err(ApiError::BadRequest(format!(
            "the range from {from} to {to} has more than {MAX_POINTS} points at this step; use a coarser step or a shorter range"
        )));
    }
    let mut query = CostQuery {
        from,
        to,
        step: Some(cost_step),
        model: q.model.as_deref(),
        hardware: q.hardware.as_deref(),
        labels: &labels,
        by: &[],
    };
    let buckets = usage::store::cost_table(state.store.pool(), &query).await?;
    let mut document = json!({
        "from": from,
        "to": to,
        "step": cost_step.as_str(),
        "model": q.model,
        "hardware": q.hardware,
        "labels": labels.to_json(),
        "currency": state.prices.current().currency(),
        "totals": render::cost_json(&CostRow::total(&buckets), &[]),
        "series": buckets.iter().map(|b| render::cost_json(b, &[])).collect::<Vec<_>>(),
    });
    if !by.is_empty() {
        // Totals per group over the whole range; they add up to `totals`.
        query.step = None;
        query.by = &by;
        let groups = usage::store::cost_table(state.store.pool(), &query).await?;
        let names: Vec<String> = by.iter().map(Dimension::name).collect();
        document["group_by"] = json!(names);
        document["groups"] = groups.iter().map(|g| render::cost_json(g, &names)).collect();
    }
    Ok(Json(document).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    month: Option<String>,
    tz: Option<chrono_tz::Tz>,
    by: Option<String>,
}

/// The range of a report: a calendar month in a time zone, or `from` and `to`.
fn report_range(q: &ReportQuery) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let tz = q.tz.unwrap_or(chrono_tz::UTC);
    let (from, to) = match (&q.month, supported("from", q.from)?, supported("to", q.to)?) {
        (Some(month), None, None) => {
            let month = Month::parse(month).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            crate::alerting::budget::period_bounds(crate::config::Period::Monthly, tz, month.inside())
        }
        (None, Some(from), Some(to)) => (from, to),
        (Some(_), _, _) => {
            return Err(ApiError::BadRequest(
                "give either month or from and to, not both".into(),
            ))
        }
        (None, _, _) => return Err(ApiError::BadRequest("give month, or both from and to".into())),
    };
    if from >= to {
        return Err(ApiError::BadRequest(format!("from ({from}) must be before to ({to})")));
    }
    Ok((from, to))
}

/// Chargeback: one row per group (by default per tenant) over a range or calendar month, with
/// the unpriced usage of each group beside its costs; the totals equal `/api/v1/costs`'.
async fn report(State(state): State<AppState>, query: QueryPairs) -> Result<Response, ApiError> {
    let (q, labels) = labelled_query::<ReportQuery>(query)?;
    let (from, to) = report_range(&q)?;
    let by = dimensions(Some(q.by.as_deref().unwrap_or("tenant")))?;
    let query = CostQuery {
        from,
        to,
        step: None,
        model: None,
        hardware: None,
        labels: &labels,
        by: &by,
    };
    let rows = usage::store::cost_table(state.store.pool(), &query).await?;
    let names: Vec<String> = by.iter().map(Dimension::name).collect();
    let book = state.prices.current();
    let scope = render::TableScope {
        from,
        to,
        step: None,
        names: &names,
        labels: &labels,
        currency: book.currency(),
    };
    let mut document = render::table_json(&scope, &rows, &CostRow::total(&rows));
    if let Some(month) = &q.month {
        document["month"] = json!(month);
        document["tz"] = json!(q.tz.unwrap_or(chrono_tz::UTC).name());
    }
    Ok(Json(document).into_response())
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

/// Characters of each rejected payload `/api/v1/rejected` shows. Payloads may be megabytes and
/// a response is held whole until the client reads it: with this cap 1000 items stay under about
/// 7 MB even at six bytes per JSON-escaped character, where whole payloads let 30 clients that
/// never read hold a gigabyte. The whole payload stays in `rejected_events`.
const REJECTED_PAYLOAD_CHARS: i32 = 1024;

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
    let items: Vec<_> = usage::store::newest_rejected(state.store.pool(), limit, REJECTED_PAYLOAD_CHARS)
        .await?
        .into_iter()
        .map(|r| {
            json!({
                "received_at": r.received_at,
                "topic": r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "reason_code": r.reason_code,
                "reason": r.reason,
                "payload_text": r.payload_text,
                "payload_truncated": r.payload_truncated,
                "payload_bytes": r.payload_bytes,
                "payload_sha256": r.payload_sha256,
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
    let to = supported("to", q.to)?.unwrap_or_else(Utc::now);
    let window = chrono::Duration::from_std(state.savings_window).unwrap_or(chrono::Duration::days(1));
    let from = match supported("from", q.from)? {
        Some(from) => from,
        None => back_from(to, window),
    };
    if from >= to {
        return Err(ApiError::BadRequest(format!("from ({from}) must be before to ({to})")));
    }
    let usage = calibration::store::usage_by_model(state.store.pool(), from, to).await?;
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
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        for header in ["Bearer t", "bearer t", "BEARER t", "Bearer   t"] {
            assert_eq!(bearer_token(header), Some("t"), "{header}");
        }
        for header in ["Basic t", "Bearert", "t", ""] {
            assert_eq!(bearer_token(header), None, "{header}");
        }
    }

    #[test]
    fn times_past_four_digit_years_are_refused_and_defaults_stop_at_the_first() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert!(supported("to", Some(at("9999-12-31T23:59:59.999999999Z"))).is_ok());
        assert!(supported("to", Some(at("0000-01-01T00:00:00Z"))).is_ok());
        let err = supported("from", Some(at("-0001-12-31T23:59:59Z"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "from must be from 0000-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z, got -0001-12-31T23:59:59Z"
        );
        assert_eq!(
            back_from(at("0000-01-01T01:00:00Z"), chrono::Duration::hours(24)),
            at("0000-01-01T00:00:00Z")
        );
        assert_eq!(
            back_from(at("-262143-01-01T00:00:00Z"), chrono::Duration::MAX),
            at("0000-01-01T00:00:00Z")
        );
    }

    #[test]
    fn the_openapi_document_is_json() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        assert_eq!(doc["openapi"], "3.0.3");
        for path in [
            "/api/v1/costs",
            "/api/v1/report",
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
