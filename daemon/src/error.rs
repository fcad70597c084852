//! The daemon's error types for what crosses a module boundary at start-up,
//! in the CLI and in the queue loop. A failed *call* (an upstream answer, a
//! network error, a plugin or cluster-gate failure) is not an `Error`: it is
//! classified once into a [`crate::failure::Failure`], which says whether
//! and where retrying may help and what it means for the key.

use crate::job::JobError;
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
    /// The job queue (its config, Redis, a job or result it cannot read).
    #[error(transparent)]
    Queue(#[from] QueueError),
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

/// Queue errors. Defined here, below `queue`, so that [`Error`] can wrap
/// them typed (`queue` re-exports it).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    InvalidJob(#[from] JobError),
    #[error("invalid lane {0:?}: expected 1-64 characters of A-Z a-z 0-9 - _")]
    InvalidLane(String),
    #[error("queue config: {0}")]
    Config(String),
    #[error("unreadable result for job {id}: {message}")]
    BadResult { id: String, message: String },
    #[error("the queue runtime failed: {0}")]
    Runtime(String),
}

impl Error {
    /// True for a setup the operator must fix (exit code `CONFIG`).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::Config { .. } | Error::Queue(QueueError::Config(_))
        )
    }

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
