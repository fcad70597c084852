//! The one error type of the harness. A scenario that fails reports one of
//! these in its table row instead of aborting the whole suite.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("http to the mock: {0}")]
    Http(#[from] reqwest::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("mock provider: {0}")]
    Mock(#[from] llmq_mock::MockError),
    #[error("{what} ({path}): {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building or locating the binaries failed: {0}")]
    Build(String),
    /// The worker process (llmq or the baseline loop) misbehaved; carries the tail of its log.
    #[error("{what} failed: {reason}{}", log_section(.log_tail))]
    Worker {
        what: String,
        reason: String,
        log_tail: String,
    },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("invalid measurement: {0}")]
    Invalid(String),
}

fn log_section(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of its log ---\n{tail}")
    }
}

impl BenchError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
