//! # llmq-mock
//!
//! A mock upstream that speaks the real wire formats of the OpenAI chat
//! completions, Anthropic Messages and Gemini generateContent APIs —
//! success bodies, usage, rate-limit headers, error bodies and their quirks —
//! and enforces per-key request and token limits (rolling window or token
//! bucket) so tests, the demo and the benchmark can check that llmq never
//! over-sends. Failures can be injected per key or globally, and
//! [`Stats`] report, per key label, what was served, including the exact
//! peak number of accepted requests in any window.
//!
//! It speaks what real providers speak: by default HTTPS with a throwaway CA
//! made at start ([`MockServer::ca_pem`], [`MockServer::ca_file`]), offering
//! HTTP/2 and HTTP/1.1 by ALPN; [`MockConfig::plain_http`] opts out (plain
//! HTTP/1.1, plus HTTP/2 with prior knowledge). [`Stats::http_versions`]
//! shows which HTTP versions were served.
//!
//! ```no_run
//! # async fn demo() -> Result<(), llmq_mock::MockError> {
//! use llmq_mock::{KeySpec, MockConfig, MockServer, Protocol};
//! let server = MockServer::start(
//!     MockConfig::default().window_ms(300).key(KeySpec::new("sk-test-000000000001").rpm(3)),
//! )
//! .await?;
//! let url = format!("{}/chat/completions", server.base_url(Protocol::OpenAi));
//! # let _ = url;
//! assert!(server.stats().keys["sk-t…0001"].peak_window_accepted <= 3);
//! server.shutdown().await;
//! # Ok(()) }
//! ```

mod config;
mod format;
mod limiter;
mod server;
mod state;
mod tls;
mod wire;

pub use config::{
    FailureKind, InjectRequest, Injection, KeySpec, KeyState, MockConfig, Protocol, Shape,
};
pub use format::{go_duration, mask_key, rfc3339_ms};
pub use state::{AccountStats, KeyStats, Stats, UNKNOWN_LABEL};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use state::Shared;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tls::Tls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// How long [`MockServer::shutdown`] lets in-flight requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// A client that opens a connection and never finishes the TLS handshake
/// is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error("cannot bind the mock server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the bound address of the mock server: {0}")]
    LocalAddr(std::io::Error),
    #[error("cannot read the mock config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid mock config: {0}")]
    Config(#[from] serde_json::Error),
    #[error("cannot set up TLS for the mock server: {0}")]
    Tls(String),
    #[error("cannot write the mock CA certificate file: {0}")]
    CaFile(std::io::Error),
}

/// A running mock server. Dropping it stops accepting connections (and
/// removes its CA file).
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<Tls>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl MockServer {
    /// Starts a server on `127.0.0.1` with an ephemeral port.
    pub async fn start(config: MockConfig) -> Result<MockServer, MockError> {
        Self::start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start_on(config: MockConfig, addr: SocketAddr) -> Result<MockServer, MockError> {
        let tls = if config.plain_http {
            None
        } else {
            Some(Tls::generate(addr.ip())?)
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MockError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(MockError::LocalAddr)?;
        let shared = Arc::new(Shared::new(&config));
        let app = server::router(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
        let task = tokio::spawn(serve(listener, acceptor, app, rx));
        tracing::debug!(%addr, keys = config.keys.len(), tls = tls.is_some(), "mock provider listening");
        Ok(MockServer {
            addr,
            shared,
            tls,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the server speaks HTTPS (the default).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The PEM of the throwaway CA that signed the server's certificate;
    /// `None` in plain-HTTP mode.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// A PEM file with that CA (e.g. for `[upstream] ca_file` or
    /// `SSL_CERT_FILE`), in a temp dir owned by the server and removed when
    /// it is dropped; `None` in plain-HTTP mode.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_path())
    }

    /// `https://localhost:PORT` under TLS (the certificate's name; also valid
    /// for 127.0.0.1 and ::1), `http://ADDR` in plain mode.
    pub fn origin(&self) -> String {
        if self.tls.is_none() {
            return format!("http://{}", self.addr);
        }
        let ip = self.addr.ip();
        if ip.is_loopback() || ip.is_unspecified() {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("https://{}", self.addr)
        }
    }

    /// Base URL of a protocol, as a provider `base_url`:
    /// `https://localhost:PORT/openai/v1`, `…/anthropic/v1`, `…/gemini/v1beta`
    /// (`http://127.0.0.1:PORT/…` in plain mode).
    pub fn base_url(&self, protocol: Protocol) -> String {
        format!("{}{}", self.origin(), protocol.path_prefix())
    }

    /// The origin followed by `path` (e.g. `/_mock/stats`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.origin(), path)
    }

    /// The current stats, without HTTP.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Adds keys or replaces the settings of known keys (counters are kept).
    pub fn add_keys(&self, keys: Vec<KeySpec>) {
        self.shared.add_keys(&keys);
    }

    /// Queues failures for the key (raw key or stats label), or for every
    /// request when `key` is `None`. Failures are served in queue order.
    pub fn inject(&self, key: Option<&str>, failures: Vec<Injection>) {
        self.shared.inject(key, &failures);
    }

    /// Clears counters and peak histories; limiter state is kept.
    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }

    /// Stops the server, letting in-flight requests finish for a moment.
    /// Hanging requests and endless bodies are cut at once.
    pub async fn shutdown(mut self) {
        self.shared.close();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Accepts connections until `stop` fires, then shuts every connection down
/// gracefully. Connections live in a `JoinSet`, so aborting this task (after
/// the grace period) aborts them too.
async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    mut stop: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _peer)) => tcp,
                    Err(e) => {
                        // Out of file descriptors and the like: back off.
                        tracing::warn!(error = %e, "mock server cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                // Small request/response pairs: never wait for Nagle.
                let _ = tcp.set_nodelay(true);
                connections.spawn(connection(tcp, tls.clone(), app.clone(), graceful.watcher()));
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one connection: the TLS handshake if any, then HTTP/1.1 or HTTP/2
/// (by ALPN under TLS; by the connection preface in plain mode).
async fn connection(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    app: Router,
    watcher: hyper_util::server::graceful::Watcher,
) {
    match tls {
        None => http(tcp, app, watcher).await,
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => http(stream, app, watcher).await,
                // Untrusting clients abort the handshake: nothing to serve.
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
}

async fn http<I>(io: I, app: Router, watcher: hyper_util::server::graceful::Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(error = %e, "mock connection ended with an error");
    }
}
