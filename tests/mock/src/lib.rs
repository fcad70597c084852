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
mod wire;

pub use config::{
    FailureKind, InjectRequest, Injection, KeySpec, KeyState, MockConfig, Protocol, Shape,
};
pub use format::{go_duration, mask_key, rfc3339_ms};
pub use state::{AccountStats, KeyStats, Stats, UNKNOWN_LABEL};

use axum::serve::ListenerExt;
use state::Shared;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long [`MockServer::shutdown`] lets in-flight requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

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
}

/// A running mock server. Dropping it stops accepting connections.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Starts a server on `127.0.0.1` with an ephemeral port.
    pub async fn start(config: MockConfig) -> Result<MockServer, MockError> {
        Self::start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start_on(config: MockConfig, addr: SocketAddr) -> Result<MockServer, MockError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MockError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(MockError::LocalAddr)?;
        let shared = Arc::new(Shared::new(&config));
        let app = server::router(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let listener = listener.tap_io(|tcp| {
            // Small request/response pairs: never wait for Nagle.
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "mock server stopped with an error");
            }
        });
        tracing::debug!(%addr, keys = config.keys.len(), "mock provider listening");
        Ok(MockServer {
            addr,
            shared,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL of a protocol, as a provider `base_url`:
    /// `http://127.0.0.1:PORT/openai/v1`, `…/anthropic/v1`, `…/gemini/v1beta`.
    pub fn base_url(&self, protocol: Protocol) -> String {
        format!("http://{}{}", self.addr, protocol.path_prefix())
    }

    /// `http://ADDR` followed by `path` (e.g. `/_mock/stats`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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
