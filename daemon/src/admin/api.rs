//! Route table and handlers of the admin API. Handlers validate input, call
//! the [`AdminBackend`] and turn its answers into JSON; they hold no state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, map_response};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;

use super::auth::{require_token, Auth};
use super::{AdminBackend, AdminError, KeyView, KeyViewStatus, QueueView};
use ::metrics::gauge;

/// The dashboard: one self-contained page, no build step, no CDN.
const DASHBOARD: &str = include_str!("dashboard.html");

/// How long the `/metrics` gauge refresh waits on the backend.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `/readyz` waits on the backend, which answers from a recorded
/// probe, so a load balancer always gets its answer within this.
const READY_TIMEOUT: Duration = Duration::from_millis(100);

/// Reason recorded when `POST /v1/keys/{id}/disable` has no body.
const DEFAULT_DISABLE_REASON: &str = "disabled by operator";

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) backend: Arc<dyn AdminBackend>,
    pub(crate) metrics: Option<PrometheusHandle>,
}

pub(crate) fn build(state: AppState, auth: Auth) -> Router {
    let protected = Router::new()
        .route("/v1/keys", get(keys))
        .route("/v1/keys/{id}/reset", post(reset_key))
        .route("/v1/keys/{id}/disable", post(disable_key))
        .route("/v1/usage", get(usage))
        .route("/v1/routes", get(routes_get).post(routes_post))
        .route("/v1/queue", get(queue))
        .route("/v1/run", post(run))
        .route("/v1/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route_layer(from_fn_with_state(auth, require_token));
    let open = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    protected
        .merge(open)
        .fallback(not_found)
        .layer(map_response(no_store))
        .with_state(state)
}

/// Admin answers are live data: never cached, never sniffed.
async fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

async fn not_found() -> AdminError {
    AdminError::NotFound("no such admin route".into())
}

async fn keys(State(s): State<AppState>) -> Result<Response, AdminError> {
    Ok(Json(s.backend.keys().await?).into_response())
}

async fn reset_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let view = s.backend.reset_key(&id).await?;
    tracing::info!(key = %id, "key reset by operator");
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisableBody {
    reason: Option<String>,
}

async fn disable_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        parse_json::<DisableBody>(&body)?.reason
    };
    let reason = reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_DISABLE_REASON.to_owned());
    let view = s.backend.disable_key(&id, &reason).await?;
    tracing::info!(key = %id, %reason, "key disabled by operator");
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
struct UsageQuery {
    since: Option<String>,
}

async fn usage(
    State(s): State<AppState>,
    Query(q): Query<UsageQuery>,
) -> Result<Response, AdminError> {
    let since = q.since.filter(|d| !d.is_empty());
    if let Some(day) = &since {
        check_day(day)?;
    }
    Ok(Json(s.backend.usage(since.as_deref()).await?).into_response())
}

/// Accepts only a real calendar day written `YYYY-MM-DD`.
fn check_day(day: &str) -> Result<(), AdminError> {
    let bad = || {
        AdminError::BadRequest(format!(
            "since must be a day written YYYY-MM-DD, got {day:?}"
        ))
    };
    let b = day.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return Err(bad());
    }
    crate::calendar::parse_day(day).map(|_| ()).ok_or_else(bad)
}

async fn routes_get(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, AdminError> {
    let job = match q.get("job").map(|j| j.trim()).filter(|j| !j.is_empty()) {
        Some(j) => Some(parse_json::<serde_json::Value>(j.as_bytes())?),
        None => None,
    };
    Ok(Json(s.backend.routes(job).await?).into_response())
}

async fn routes_post(State(s): State<AppState>, body: Bytes) -> Result<Response, AdminError> {
    let job = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(parse_json::<serde_json::Value>(&body)?)
    };
    Ok(Json(s.backend.routes(job).await?).into_response())
}

async fn queue(State(s): State<AppState>) -> Result<Response, AdminError> {
    Ok(Json(s.backend.queue().await?).into_response())
}

async fn run(State(s): State<AppState>, body: Bytes) -> Result<Response, AdminError> {
    // Duplicate keys are refused here: re-serialized, the job would lose them.
    let job = crate::job::json_value(&body).map_err(|e| AdminError::BadRequest(e.to_string()))?;
    if !job.is_object() {
        return Err(AdminError::BadRequest(
            "the job must be a JSON object".into(),
        ));
    }
    Ok(Json(s.backend.run(job).await?).into_response())
}

async fn cluster(State(s): State<AppState>) -> Result<Response, AdminError> {
    Ok(Json(s.backend.cluster().await?).into_response())
}

/// Refreshes the key and queue gauges from the backend, then renders every
/// metric in the Prometheus text format.
async fn metrics(State(s): State<AppState>) -> Result<Response, AdminError> {
    let Some(handle) = &s.metrics else {
        return Err(AdminError::Unavailable(
            "the metrics recorder is not installed".into(),
        ));
    };
    match tokio::time::timeout(PROBE_TIMEOUT, s.backend.keys()).await {
        Ok(Ok(keys)) => set_key_states(&keys),
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics: key gauges not refreshed"),
        Err(_) => tracing::debug!("metrics: key gauges not refreshed (timeout)"),
    }
    match tokio::time::timeout(PROBE_TIMEOUT, s.backend.queue()).await {
        Ok(Ok(q)) => set_queue_depth(&q),
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics: queue gauges not refreshed"),
        Err(_) => tracing::debug!("metrics: queue gauges not refreshed (timeout)"),
    }
    handle.run_upkeep();
    let mut resp = handle.render().into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 when Redis answers and at least one plugin is loaded, else 503 with
/// the reason.
async fn readyz(State(s): State<AppState>) -> Response {
    let (status, mut body) = match tokio::time::timeout(READY_TIMEOUT, s.backend.ready()).await {
        Ok(r) => match r.reason() {
            None => (
                StatusCode::OK,
                serde_json::json!({"ready": true, "redis": r.redis, "plugins": r.plugins}),
            ),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"ready": false, "redis": r.redis, "plugins": r.plugins, "error": reason}),
            ),
        },
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "error": "readiness check timed out"}),
        ),
    };
    // Refused plugin files and quarantined plugins: the daemon serves
    // without them (their providers are disabled), so they do not make it
    // unready, but the operator sees them here.
    let problems = s.backend.plugin_problems();
    if !problems.is_empty() {
        body["plugin_problems"] = serde_json::json!(problems);
    }
    (status, Json(body)).into_response()
}

/// The page itself holds no data, so it is served without auth; see the
/// module docs.
async fn dashboard() -> Response {
    let mut resp = Html(DASHBOARD).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    resp
}

/// Parses a JSON body; the error says where it broke, not what was sent.
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(bytes).map_err(|e| AdminError::BadRequest(format!("invalid JSON: {e}")))
}

/// Sets `llmq_key_state{key,state}`: 1 for the key's state, 0 for the others,
/// so a state change never leaves two states at 1.
fn set_key_state(key: &KeyView) {
    for state in KeyViewStatus::ALL {
        let value = if state == key.status { 1.0 } else { 0.0 };
        gauge!(crate::metrics::KEY_STATE, "key" => key.id.clone(), "state" => state.as_str())
            .set(value);
    }
}

/// [`set_key_state`] for every key.
fn set_key_states(keys: &[KeyView]) {
    keys.iter().for_each(set_key_state);
}

/// Sets `llmq_queue_depth{lane}`, `llmq_jobs_in_flight`, `llmq_jobs_delayed`
/// and `llmq_jobs_dead` from a queue view.
fn set_queue_depth(queue: &QueueView) {
    for lane in &queue.lanes {
        gauge!(crate::metrics::QUEUE_DEPTH, "lane" => lane.lane.clone()).set(lane.depth as f64);
    }
    gauge!(crate::metrics::JOBS_IN_FLIGHT).set(queue.in_flight as f64);
    gauge!(crate::metrics::JOBS_DELAYED).set(queue.delayed as f64);
    gauge!(crate::metrics::JOBS_DEAD).set(queue.dead as f64);
}

#[cfg(test)]
mod tests {
    use super::check_day;

    #[test]
    fn days_are_validated() {
        assert!(check_day("2024-02-29").is_ok());
        assert!(check_day("2023-02-29").is_err());
        assert!(check_day("2024-13-01").is_err());
        assert!(check_day("2024-1-01").is_err());
        assert!(check_day("yesterday").is_err());
        assert!(check_day("2024-01-0x").is_err());
    }
}
