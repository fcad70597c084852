//! HTTP to the providers (SPEC §12). Plugins describe a request; this module
//! sends it with one shared `reqwest` client (connection pooling, HTTP/2,
//! TLS, proxies) and hands the raw response back for the plugin to classify.
//!
//! - **TLS.** rustls on the ring provider. Trusted roots: the platform's
//!   store (`rustls-native-certs`; `SSL_CERT_FILE` / `SSL_CERT_DIR` replace
//!   it when set), plus `[upstream] ca_file`. When the platform has no roots
//!   at all (a bare container without `ca-certificates`) and no
//!   `SSL_CERT_*` variable is set, the compiled-in webpki (Mozilla) roots
//!   are used instead, with a warning; they are never added to a platform
//!   store that exists, so removing a CA from the system removes it here.
//! - **HTTP/2** by ALPN (`[upstream] http2 = "auto"`), with prior knowledge
//!   (h2c), or never.
//! - **Proxies.** `[upstream] proxy` for every call, else `HTTPS_PROXY` /
//!   `HTTP_PROXY` / `ALL_PROXY` from the environment; `NO_PROXY` applies to
//!   both.
//! - **Bounds.** A call lasts at most `min([upstream] timeout, the job's
//!   remaining time)`; a body larger than `max_response_bytes` is refused
//!   while it streams in, so no more than the cap is ever held.
//! - **Errors.** A certificate or handshake failure is [`NetError::Tls`]: the
//!   setup is at fault, not the key.
//!
//! Nothing here logs headers or URLs: the prepared request carries the API
//! key (in a header, or in the URL for some providers).

use crate::config::{Http2Mode, UpstreamConfig};
use crate::endpoint::describe;
pub use crate::endpoint::{check_proxy_url, read_ca_file, CaFileError};
use llmq_sdk::{HttpRequest, HttpResponse};
use std::path::Path;
use std::time::Duration;

/// Why a request got no usable HTTP response.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `[upstream] timeout` passed: transient.
    #[error("request timed out after {0:?} ([upstream] timeout)")]
    Timeout(Duration),
    /// The job's deadline came before the answer.
    #[error("the job's deadline came during the call (after {0:?})")]
    Deadline(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    /// The TLS handshake failed (untrusted or invalid certificate, a plain
    /// HTTP server on an https URL, …): the setup is at fault, not the key.
    #[error("TLS/certificate error: {0}")]
    Tls(String),
    /// The body was larger than `[upstream] max_response_bytes`: transient.
    #[error("response body larger than [upstream] max_response_bytes ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("bad request from plugin: {0}")]
    BadRequest(String),
    #[error("transport error: {0}")]
    Other(String),
}

/// Why the HTTP client could not be built at start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream.ca_file: {0}")]
    CaFile(#[from] CaFileError),
    #[error("upstream.proxy: {0}")]
    Proxy(String),
    #[error("{0}")]
    NoRoots(String),
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Where the trusted roots come from (for `check-config` and the start log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The platform's store (or `SSL_CERT_FILE`/`SSL_CERT_DIR`), N certificates.
    Native { certs: usize, from_env: bool },
    /// The compiled-in webpki roots: the platform has none.
    WebpkiFallback,
}

impl std::fmt::Display for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Roots::Native {
                certs,
                from_env: false,
            } => write!(f, "the platform's store ({certs} certificates)"),
            Roots::Native {
                certs,
                from_env: true,
            } => write!(f, "SSL_CERT_FILE/SSL_CERT_DIR ({certs} certificates)"),
            Roots::WebpkiFallback => write!(
                f,
                "the built-in webpki (Mozilla) roots: the platform has none"
            ),
        }
    }
}

/// The proxy-related environment, injectable for tests.
#[derive(Debug, Clone, Default)]
pub struct ProxyEnv {
    /// Use `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` when `[upstream] proxy` is unset.
    pub from_env: bool,
    /// The `NO_PROXY` list, also applied to `[upstream] proxy`.
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    /// The process's environment.
    pub fn process() -> ProxyEnv {
        ProxyEnv {
            from_env: true,
            no_proxy: ["NO_PROXY", "no_proxy"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty())),
        }
    }
}

/// The shared HTTP client.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    timeout: Duration,
    max_body: u64,
    roots: Roots,
}

impl Upstream {
    /// The client for `[upstream]` in this process's environment.
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, SetupError> {
        Upstream::build(cfg, &ProxyEnv::process())
    }

    /// The client for `[upstream]` with this proxy environment.
    pub fn build(cfg: &UpstreamConfig, env: &ProxyEnv) -> Result<Upstream, SetupError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(cfg.connect_timeout);
        builder = match cfg.http2 {
            Http2Mode::Auto => builder,
            Http2Mode::PriorKnowledge => builder.http2_prior_knowledge(),
            Http2Mode::Never => builder.http1_only(),
        };

        let extra = match &cfg.ca_file {
            Some(path) => read_ca_file(Path::new(path))?,
            None => vec![],
        };
        let native = rustls_native_certs::load_native_certs();
        let from_env = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
            .iter()
            .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
        let roots = if !native.certs.is_empty() {
            builder = builder
                .tls_built_in_native_certs(true)
                .tls_built_in_webpki_certs(false);
            Roots::Native {
                certs: native.certs.len(),
                from_env,
            }
        } else if from_env {
            if extra.is_empty() {
                let errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
                return Err(SetupError::NoRoots(format!(
                    "SSL_CERT_FILE/SSL_CERT_DIR is set but holds no certificate{}; \
                     no https upstream could be verified (set [upstream] ca_file, or fix or unset the variable)",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                )));
            }
            // The operator chose to trust only the ca_file.
            builder = builder
                .tls_built_in_native_certs(false)
                .tls_built_in_webpki_certs(false);
            Roots::Native { certs: 0, from_env }
        } else {
            tracing::warn!(
                "the platform has no CA certificates (install ca-certificates, or set SSL_CERT_FILE): \
                 using the built-in webpki roots"
            );
            builder = builder
                .tls_built_in_native_certs(false)
                .tls_built_in_webpki_certs(true);
            Roots::WebpkiFallback
        };
        for cert in extra {
            builder = builder.add_root_certificate(cert);
        }

        let no_proxy = env
            .no_proxy
            .as_deref()
            .and_then(reqwest::NoProxy::from_string);
        builder = match &cfg.proxy {
            Some(url) => {
                check_proxy_url(url).map_err(SetupError::Proxy)?;
                let proxy = reqwest::Proxy::all(url.as_str())
                    .map_err(|e| SetupError::Proxy(describe(e)))?
                    .no_proxy(no_proxy);
                builder.proxy(proxy)
            }
            // reqwest reads HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY itself.
            None if env.from_env => builder,
            None => builder.no_proxy(),
        };

        let client = builder
            .build()
            .map_err(|e| SetupError::Client(describe(e)))?;
        Ok(Upstream {
            client,
            timeout: cfg.timeout,
            max_body: cfg.max_response_bytes,
            roots,
        })
    }

    /// Where the trusted roots come from.
    pub fn roots(&self) -> &Roots {
        &self.roots
    }

    /// Sends the request and reads the whole (bounded) answer. The call is
    /// cut after `min([upstream] timeout, remaining)`, `remaining` being the
    /// job's time left: [`NetError::Deadline`] when the job's deadline was
    /// the bound, [`NetError::Timeout`] otherwise. `now_unix_ms` stamps the
    /// response for `parse`.
    pub async fn send(
        &self,
        req: HttpRequest,
        remaining: Duration,
        now_unix_ms: impl Fn() -> u64,
    ) -> Result<HttpResponse, NetError> {
        let deadline_bound = remaining < self.timeout;
        let limit = self.timeout.min(remaining);
        match tokio::time::timeout(limit, self.exchange(req, now_unix_ms)).await {
            Ok(answer) => answer,
            Err(_) if deadline_bound => Err(NetError::Deadline(limit)),
            Err(_) => Err(NetError::Timeout(limit)),
        }
    }

    async fn exchange(
        &self,
        req: HttpRequest,
        now_unix_ms: impl Fn() -> u64,
    ) -> Result<HttpResponse, NetError> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| NetError::BadRequest(format!("method {:?}", req.method)))?;
        let mut builder = self.client.request(method, &req.url).body(req.body);
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let mut resp = builder.send().await.map_err(|e| self.classify(e))?;
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
        let declared = resp.content_length();
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(NetError::TooLarge {
                limit: self.max_body,
            });
        }
        // Never more than the cap: each chunk is checked before it is kept.
        let mut body: Vec<u8> =
            Vec::with_capacity(declared.unwrap_or(0).min(self.max_body).min(1 << 20) as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.classify(e))? {
            if body.len() as u64 + chunk.len() as u64 > self.max_body {
                return Err(NetError::TooLarge {
                    limit: self.max_body,
                });
            }
            // Grow by doubling, but never past the cap.
            let needed = body.len() + chunk.len();
            if needed > body.capacity() {
                let target = needed
                    .max(body.capacity().saturating_mul(2))
                    .min(self.max_body as usize);
                body.reserve_exact(target - body.len());
            }
            body.extend_from_slice(&chunk);
        }
        let body = String::from_utf8(body)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Ok(HttpResponse {
            status,
            headers,
            body,
            received_at_unix_ms: now_unix_ms(),
        })
    }

    fn classify(&self, e: reqwest::Error) -> NetError {
        if is_tls(&e) {
            NetError::Tls(describe(e))
        } else if e.is_connect() {
            NetError::Connect(describe(e))
        } else if e.is_timeout() {
            NetError::Timeout(self.timeout)
        } else if e.is_builder() {
            NetError::BadRequest(describe(e))
        } else {
            NetError::Other(describe(e))
        }
    }
}

/// True when a rustls error is anywhere in the chain. rustls errors reach
/// reqwest inside `io::Error`s (tokio-rustls wraps it, hyper-rustls wraps
/// that again), and `io::Error::source()` skips its payload, so each
/// `io::Error` is opened as well.
fn is_tls(e: &reqwest::Error) -> bool {
    fn holds_rustls(err: &(dyn std::error::Error + 'static)) -> bool {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => holds_rustls(inner),
            None => false,
        }
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if holds_rustls(err) {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests;
