//! # llmq, the daemon
//!
//! Takes LLM jobs off Redis Streams, routes each to a provider, model and API
//! key that can serve it now (free tiers first), calls the upstream through a
//! provider plugin and writes the result back. See ARCHITECTURE.md for the
//! bird's-eye view and the invariants.

pub mod admin;
pub mod budget;
pub(crate) mod calendar;
pub(crate) mod catalog;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod commands;
pub mod config;
pub(crate) mod control;
#[cfg(feature = "demo")]
pub(crate) mod demo;
pub(crate) mod endpoint;
pub mod error;
pub mod executor;
pub(crate) mod failure;
pub mod global;
pub mod job;
pub mod keys;
pub mod keystore;
pub mod limits;
pub mod metrics;
pub mod plugin_host;
pub mod pool;
pub mod queue;
pub mod redis_conn;
pub mod router;
pub mod serve;
pub(crate) mod upstream;

pub use error::{Error, Result};
