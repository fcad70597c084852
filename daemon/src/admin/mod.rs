//! The admin HTTP API (SPEC §7): routes, bearer-token auth, the dashboard page
//! and `/metrics`. It owns HTTP only; the running daemon supplies the data
//! through [`AdminBackend`], so this module depends on none of the queue, pool
//! or router types.
//!
//! **Auth.** Every route except `/healthz`, `/readyz` and the dashboard page
//! `GET /` needs `Authorization: Bearer <token>` when a token is configured
//! (compared in constant time); otherwise 401 with `WWW-Authenticate: Bearer`
//! and a JSON error. Without a token the API must listen on loopback only:
//! the daemon calls [`check_listen`] at start and fails fast.
//!
//! **The dashboard page is always served without auth.** It is static HTML
//! with no data in it; everything it shows comes from `/v1/*` fetches, which
//! carry the bearer token. When a fetch answers 401 the page asks for the
//! token in a small input, keeps it in `sessionStorage` (gone when the tab
//! closes, never sent anywhere but this origin's `Authorization` header) and
//! retries. So a token-protected daemon leaks nothing through `/`.
//!
//! **Connections.** The listener has header and idle timeouts and a cap on
//! connections that leaves most file descriptors to job traffic; see
//! [`serve_with`] and the `server` module.
//!
//! **No secrets.** Responses carry key ids and masked forms only, and errors
//! never echo the request's `Authorization` header.

mod api;
mod auth;
mod server;
mod types;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub(crate) use server::{raise_nofile_limit, serve_with, ServerLimits};
pub use types::{
    KeyLimits, KeyView, KeyViewStatus, LaneDepth, ParkedModel, QueueView, Readiness, UsageCount,
    UsageRow,
};

/// What the admin API needs from the running daemon. Implemented in
/// `serve.rs`; tests use an in-memory fake.
///
/// Futures borrow only `self`: copy any `&str` argument you need into the
/// future (`let id = id.to_owned(); Box::pin(async move { … })`).
pub trait AdminBackend: Send + Sync + 'static {
    /// Every key, in a stable order.
    fn keys(&self) -> BoxFuture<'_, Result<Vec<KeyView>, AdminError>>;
    /// Clears a key's cooldown/disabled state; `NotFound` for unknown ids.
    fn reset_key(&self, id: &str) -> BoxFuture<'_, Result<KeyView, AdminError>>;
    /// Disables a key with a reason; `NotFound` for unknown ids.
    fn disable_key(&self, id: &str, reason: &str) -> BoxFuture<'_, Result<KeyView, AdminError>>;
    /// Usage rows since a day (`YYYY-MM-DD`, already validated), or all kept.
    fn usage(&self, since: Option<&str>) -> BoxFuture<'_, Result<Vec<UsageRow>, AdminError>>;
    /// The order in which a job (or a default job) would be tried.
    fn routes(
        &self,
        job: Option<serde_json::Value>,
    ) -> BoxFuture<'_, Result<serde_json::Value, AdminError>>;
    /// Queue depths and counters.
    fn queue(&self) -> BoxFuture<'_, Result<QueueView, AdminError>>;
    /// Enqueues a job and waits for its result (the fan-out result shape).
    fn run(&self, body: serde_json::Value) -> BoxFuture<'_, Result<serde_json::Value, AdminError>>;
    /// Is Redis reachable, how many plugins are loaded?
    fn ready(&self) -> BoxFuture<'_, Readiness>;
    /// The daemons sharing this Redis; may be `[]`.
    fn cluster(&self) -> BoxFuture<'_, Result<serde_json::Value, AdminError>>;
    /// Plugin files that were refused and plugins that are quarantined, one
    /// message each naming the file or plugin (`/readyz` shows them).
    fn plugin_problems(&self) -> Vec<String> {
        Vec::new()
    }
}

/// An admin failure, answered as `{"error": "..."}` with 404/400/503/500.
/// Messages must never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AdminError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AdminError {
    /// The HTTP status this error is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The JSON body of every admin error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub error: String,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        if let AdminError::Internal(_) = &self {
            tracing::warn!(error = %self, "admin request failed");
        }
        (
            self.status(),
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// A configured token, or `None` when it is absent or blank (a blank token
/// protects nothing, so it counts as no token).
pub(crate) fn effective_token(token: Option<&SecretString>) -> Option<&SecretString> {
    token.filter(|t| !t.expose_secret().trim().is_empty())
}

/// Refuses to serve the admin API on a non-loopback address without a token.
/// The daemon calls this before binding and fails fast on `Err`.
pub fn check_listen(addr: &SocketAddr, token: Option<&SecretString>) -> Result<(), AdminError> {
    if effective_token(token).is_some() || addr.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err(AdminError::BadRequest(format!(
        "refusing to serve the admin API on non-loopback {addr} without a token: \
         set the admin token (admin.token_env, LLMQ_ADMIN_TOKEN by default) or listen on 127.0.0.1/::1"
    )))
}

/// The admin router: `/v1/*`, `/metrics`, `/healthz`, `/readyz` and `/`.
/// `metrics` is the handle from [`crate::metrics::install`]; without one,
/// `/metrics` answers 503.
pub fn router(
    backend: Arc<dyn AdminBackend>,
    token: Option<SecretString>,
    metrics: Option<PrometheusHandle>,
) -> axum::Router {
    let token = effective_token(token.as_ref())
        .map(|t| Arc::new(SecretString::from(t.expose_secret().to_owned())));
    api::build(api::AppState { backend, metrics }, auth::Auth { token })
}

/// Serves `router` on `listener` with the default [`ServerLimits`] until
/// `shutdown` resolves, then finishes the requests in progress. The daemon
/// uses [`serve_with`] and the limits of `[admin]`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, router, ServerLimits::default(), shutdown).await
}
