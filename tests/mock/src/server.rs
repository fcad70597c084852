//! The HTTP surface: provider routes, the `/_mock/*` control routes, and the
//! request pipeline shared by all protocols (key → injected failure → key
//! state → body → model → context window → limits → latency → answer).

use crate::config::{FailureKind, InjectRequest, Injection, KeySpec, KeyState};
use crate::format::mask_key;
use crate::limiter::{Decision, Dim, Rejection};
use crate::state::{KeyEntry, KeyView, Outcome, Shared};
use crate::wire::anthropic::Anthropic;
use crate::wire::gemini::QuotaPeriod;
use crate::wire::gemini::{self, Gemini};
use crate::wire::openai::groq_tpm_413;
use crate::wire::openai::OpenAi;
use crate::wire::{
    connection_reset, endless_body, endless_content_length, huge_body, reply, until_closed,
    ServerError, Wire, WireResponse,
};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_SLOW_BODY_MS: u64 = 1_000;
const DEFAULT_RETRY_AFTER_MS: u64 = 1_000;
/// Groq's free-tier TPM of `llama-3.1-8b-instant`, when neither the
/// injection nor the key sets one.
const DEFAULT_GROQ_TPM: u64 = 6_000;
const DEFAULT_GEMINI_RPD: u64 = 250;
const DEFAULT_GEMINI_RPM: u64 = 10;
const DEFAULT_GEMINI_DAY_RETRY_MS: u64 = 41_000;
const DEFAULT_GEMINI_MINUTE_RETRY_MS: u64 = 27_000;
const DEFAULT_HUGE_BODY_BYTES: u64 = 100_000_000;
const DEFAULT_TRICKLE_MS: u64 = 100;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/openai/v1/chat/completions", post(openai))
        .route("/anthropic/v1/messages", post(anthropic))
        .route("/gemini/v1beta/models/{model_action}", post(gemini))
        .route("/_mock/stats", get(stats))
        .route("/_mock/keys", post(add_keys))
        .route("/_mock/inject", post(inject))
        .route("/_mock/reset", post(reset))
        .route("/_mock/health", get(health))
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(shared)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

async fn openai(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = header_str(&headers, header::AUTHORIZATION.as_str())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty());
    pipeline::<OpenAi>(&s, key, false, &headers, None, &body).await
}

async fn anthropic(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = header_str(&headers, "x-api-key").map(str::to_owned);
    pipeline::<Anthropic>(&s, key, false, &headers, None, &body).await
}

async fn gemini(
    State(s): State<Arc<Shared>>,
    Path(model_action): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let model = match model_action.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => model,
        _ => return gemini::unknown_method(&model_action).into_response(),
    };
    let url_key = query.get("key").filter(|k| !k.is_empty()).cloned();
    let key_in_url = url_key.is_some();
    let key = header_str(&headers, "x-goog-api-key")
        .map(str::to_owned)
        .or(url_key);
    pipeline::<Gemini>(&s, key, key_in_url, &headers, Some(model), &body).await
}

async fn pause(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

async fn pipeline<W: Wire>(
    s: &Shared,
    key: Option<String>,
    key_in_url: bool,
    headers: &HeaderMap,
    path_model: Option<&str>,
    body: &[u8],
) -> Response {
    let id = s.next_id();
    let (entry, known) = s.lookup(key.as_deref());
    let _in_flight = entry.enter();
    let view = entry.view();
    let latency = view.latency_ms.unwrap_or(s.default_latency_ms);

    if let Some(injection) = s.take_injection(key.as_deref(), &view.label) {
        entry.record(Outcome::Injected(injection.kind), key_in_url);
        pause(latency).await;
        return injected::<W>(s, &entry, id, &injection, headers, path_model, body).await;
    }

    let response = screen::<W>(
        s,
        &entry,
        &view,
        known,
        key.as_deref(),
        key_in_url,
        id,
        headers,
        path_model,
        body,
    );
    pause(latency).await;
    response.into_response()
}

/// Everything after the injection check: the answer a real upstream gives.
#[allow(clippy::too_many_arguments)]
fn screen<W: Wire>(
    s: &Shared,
    entry: &KeyEntry,
    view: &KeyView,
    known: bool,
    key: Option<&str>,
    key_in_url: bool,
    id: u64,
    headers: &HeaderMap,
    path_model: Option<&str>,
    body: &[u8],
) -> WireResponse {
    let refuse = |outcome: Outcome, response: WireResponse| {
        entry.record(outcome, key_in_url);
        response
    };
    let Some(raw) = key else {
        return refuse(Outcome::MissingKey, W::missing_key(id));
    };
    if !known && !s.accept_unknown_keys {
        return refuse(Outcome::InvalidKey, W::invalid_key(id, &mask_key(raw)));
    }
    match view.state {
        KeyState::Valid => {}
        KeyState::Invalid => {
            return refuse(Outcome::InvalidKey, W::invalid_key(id, &mask_key(raw)))
        }
        KeyState::NoCredit => return refuse(Outcome::NoCredit, W::no_credit(id)),
        KeyState::Suspended => return refuse(Outcome::Suspended, W::suspended(id, &mask_key(raw))),
    }
    let parsed = match W::parse(id, body, headers, path_model) {
        Ok(p) => p,
        Err(e) => return refuse(Outcome::BadRequest, *e),
    };
    if parsed.model.starts_with("missing") {
        return refuse(
            Outcome::ModelNotFound,
            W::model_not_found(id, &parsed.model),
        );
    }
    if let Some(&limit) = s.contexts.get(&parsed.model) {
        if parsed.charge() > limit {
            return refuse(
                Outcome::ContextTooLong,
                W::context_too_long(id, &parsed, limit),
            );
        }
    }
    match entry.admit(s.epoch, parsed.charge(), key_in_url) {
        Decision::Accepted(snap) => W::success(id, &parsed, &reply(&parsed), &snap),
        Decision::Rejected(rej, snap) => W::rate_limited(id, &parsed.model, &rej, &snap),
    }
}

async fn injected<W: Wire>(
    s: &Shared,
    entry: &KeyEntry,
    id: u64,
    injection: &Injection,
    headers: &HeaderMap,
    path_model: Option<&str>,
    body: &[u8],
) -> Response {
    match injection.kind {
        FailureKind::Status500 => W::server_error(id, ServerError::Internal).into_response(),
        FailureKind::Status503 => W::server_error(id, ServerError::Unavailable).into_response(),
        FailureKind::Overloaded529 => W::server_error(id, ServerError::Overloaded).into_response(),
        FailureKind::NonJson200 => WireResponse::html(200, "<html>oops</html>").into_response(),
        FailureKind::Reset => connection_reset(),
        FailureKind::SlowBody => {
            let delay = Duration::from_millis(injection.delay_ms.unwrap_or(DEFAULT_SLOW_BODY_MS));
            let snap = entry.snapshot(s.epoch);
            match W::parse(id, body, headers, path_model) {
                Ok(p) => W::success(id, &p, &reply(&p), &snap).into_slow_response(delay),
                Err(e) => e.into_slow_response(delay),
            }
        }
        FailureKind::RateLimited429 => {
            let wait_ms = injection.retry_after_ms.unwrap_or(DEFAULT_RETRY_AFTER_MS);
            let snap = entry.snapshot(s.epoch);
            let model = W::parse(id, body, headers, path_model)
                .map(|p| p.model)
                .unwrap_or_else(|_| path_model.unwrap_or("unknown").to_owned());
            let limit = snap.requests.map_or(0, |d| d.limit);
            let rej = Rejection {
                dim: Dim::Requests,
                limit,
                used: limit,
                requested: 1,
                wait_ns: wait_ms.saturating_mul(1_000_000),
                too_large: false,
            };
            W::rate_limited(id, &model, &rej, &snap).into_response()
        }
        FailureKind::GroqTpm413 => {
            let parsed = W::parse(id, body, headers, path_model).ok();
            let limit = injection
                .limit
                .or(entry.limits().1)
                .unwrap_or(DEFAULT_GROQ_TPM);
            let requested = parsed.as_ref().map_or(0, |p| p.charge()).max(limit + 1);
            let model = model_of(parsed.as_ref(), path_model);
            groq_tpm_413(id, &model, limit, requested).into_response()
        }
        FailureKind::GeminiPerDayQuota | FailureKind::GeminiPerMinuteQuota => {
            let parsed = W::parse(id, body, headers, path_model).ok();
            let model = model_of(parsed.as_ref(), path_model);
            let (period, limit, retry_ms) = if injection.kind == FailureKind::GeminiPerDayQuota {
                (
                    QuotaPeriod::Day,
                    injection.limit.unwrap_or(DEFAULT_GEMINI_RPD),
                    injection
                        .retry_after_ms
                        .unwrap_or(DEFAULT_GEMINI_DAY_RETRY_MS),
                )
            } else {
                (
                    QuotaPeriod::Minute,
                    injection
                        .limit
                        .or(entry.limits().0.map(u64::from))
                        .unwrap_or(DEFAULT_GEMINI_RPM),
                    injection
                        .retry_after_ms
                        .unwrap_or(DEFAULT_GEMINI_MINUTE_RETRY_MS),
                )
            };
            gemini::quota_exhausted(&model, period, limit, retry_ms).into_response()
        }
        FailureKind::Hang => {
            until_closed(&mut s.closing()).await;
            connection_reset()
        }
        FailureKind::HugeBody => {
            let parsed = W::parse(id, body, headers, path_model).ok();
            let model = model_of(parsed.as_ref(), path_model);
            let bytes = injection.bytes.unwrap_or(DEFAULT_HUGE_BODY_BYTES);
            huge_body(W::PROTOCOL, &model, bytes)
        }
        FailureKind::EndlessBody => {
            let delay = Duration::from_millis(injection.delay_ms.unwrap_or(0));
            endless_body(s.closing(), delay)
        }
        FailureKind::EndlessContentLength => {
            let delay = Duration::from_millis(injection.delay_ms.unwrap_or(DEFAULT_TRICKLE_MS));
            endless_content_length(s.closing(), delay)
        }
    }
}

/// The model of a request: from its body, else from the URL (Gemini).
fn model_of(parsed: Option<&crate::wire::Parsed>, path_model: Option<&str>) -> String {
    parsed
        .map(|p| p.model.clone())
        .filter(|m| !m.is_empty())
        .or_else(|| path_model.map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    Json(s.stats()).into_response()
}

/// `POST /_mock/keys` takes `{"keys": [...]}` or a bare list of key specs.
#[derive(Deserialize)]
#[serde(untagged)]
enum KeysBody {
    Wrapped { keys: Vec<KeySpec> },
    List(Vec<KeySpec>),
}

fn bad_control_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

async fn add_keys(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    // Decoding errors are not echoed: they could quote a key.
    let specs = match serde_json::from_slice::<KeysBody>(&body) {
        Ok(KeysBody::Wrapped { keys }) | Ok(KeysBody::List(keys)) => keys,
        Err(_) => {
            return bad_control_request("expected {\"keys\": [KeySpec…]} or [KeySpec…]".to_owned())
        }
    };
    let labels = s.add_keys(&specs);
    Json(json!({ "labels": labels })).into_response()
}

async fn inject(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let req = match serde_json::from_slice::<InjectRequest>(&body) {
        Ok(r) => r,
        Err(e) => return bad_control_request(format!("invalid inject request: {e}")),
    };
    let queued: u32 = req.failures.iter().map(|f| f.count).sum();
    s.inject(req.key.as_deref(), &req.failures);
    Json(json!({ "queued": queued })).into_response()
}

async fn reset(State(s): State<Arc<Shared>>) -> Response {
    s.reset_stats();
    Json(json!({ "reset": true })).into_response()
}

async fn health() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}
