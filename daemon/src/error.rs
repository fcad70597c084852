//! The daemon's one error type. Like pingora's, it knows whether the failed
//! operation may be retried, so callers decide by asking rather than by
//! matching on every variant.

use std::path::PathBuf;

/// Every error that crosses a module boundary in the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Config file/field problems: fatal at start, named precisely.
    #[error("config {file}: field `{field}`: {expected}")]
    Config {
        file: String,
        field: String,
        expected: String,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("plugin: {0}")]
    PluginLoad(#[from] llmq_sdk::host::LoadError),
    #[error("plugin call: {0}")]
    PluginCall(#[from] llmq_sdk::host::CallError),
    #[error("no plugin named {name:?} is loaded (plugins dir {dir})")]
    NoPlugin { name: String, dir: PathBuf },
    #[error("upstream {provider}: {message}")]
    Upstream { provider: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn config(
        file: impl Into<String>,
        field: impl Into<String>,
        expected: impl Into<String>,
    ) -> Error {
        Error::Config {
            file: file.into(),
            field: field.into(),
            expected: expected.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
