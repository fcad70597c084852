//! # llmq-sdk
//!
//! Everything a provider adapter needs to plug into the llmq daemon:
//!
//! - [`types`]: the canonical job, HTTP request/response and outcome types
//!   that cross the boundary as JSON;
//! - [`abi`]: the C ABI (`llmq_plugin_entry` → [`abi::PluginVTable`]), the
//!   [`Plugin`] trait and the [`export_plugin!`] macro;
//! - [`wire`]: parsers for rate-limit headers (`6m0s`, `retry-after`, RFC 3339);
//! - [`conformance`]: the kit that checks a plugin against recorded fixtures,
//!   directly or (feature `host`) as a loaded `.so`;
//! - `host` (feature `host`): loading a plugin `.so`.
//!
//! Plugins are sans-I/O: they translate and classify, the daemon does the
//! HTTP, timeouts, retries, keys and accounting.

pub mod abi;
pub mod conformance;
pub mod estimate;
pub mod types;
pub mod wire;

#[cfg(feature = "host")]
pub mod host;

pub use abi::Plugin;
pub use types::*;
