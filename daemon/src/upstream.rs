//! HTTP to the providers. Plugins describe a request; this module sends it
//! with one shared `reqwest` client (connection pooling, timeouts) and hands
//! the raw response back for the plugin to classify.
//!
//! Nothing here logs headers: the prepared request carries the API key.

use llmq_sdk::{HttpRequest, HttpResponse};
use std::time::Duration;

/// Default whole-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request got no HTTP response. Always retryable on another key.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("bad request from plugin: {0}")]
    BadRequest(String),
    #[error("transport error: {0}")]
    Other(String),
}

/// The shared HTTP client.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    timeout: Duration,
}

impl Upstream {
    pub fn new(timeout: Duration) -> Result<Upstream, NetError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| NetError::Other(describe(e)))?;
        Ok(Upstream { client, timeout })
    }

    /// Sends the request; `now_unix_ms` stamps the response for `parse`.
    pub async fn send(
        &self,
        req: HttpRequest,
        now_unix_ms: impl Fn() -> u64,
    ) -> Result<HttpResponse, NetError> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| NetError::BadRequest(format!("method {:?}", req.method)))?;
        let mut builder = self
            .client
            .request(method, &req.url)
            .timeout(self.timeout)
            .body(req.body);
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let resp = builder.send().await.map_err(|e| self.classify(e))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().ok()?.to_string(),
                ))
            })
            .collect();
        let bytes = resp.bytes().await.map_err(|e| self.classify(e))?;
        Ok(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            received_at_unix_ms: now_unix_ms(),
        })
    }

    fn classify(&self, e: reqwest::Error) -> NetError {
        if e.is_timeout() {
            NetError::Timeout(self.timeout)
        } else if e.is_connect() {
            NetError::Connect(describe(e))
        } else if e.is_builder() {
            NetError::BadRequest(describe(e))
        } else {
            NetError::Other(describe(e))
        }
    }
}

/// A reqwest error without the URL (a careless plugin may put a key in it).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
