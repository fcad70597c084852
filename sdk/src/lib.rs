//! # llmq-sdk
//!
//! Everything a provider adapter needs to plug into the llmq daemon:
//!
//! - [`types`]: the canonical job, HTTP request/response and outcome types
//!   that cross the boundary as JSON;
//! - [`abi`]: the C ABI (`llmq_plugin_entry` → [`abi::PluginVTable`]), the
//!   [`Plugin`] trait and the [`export_plugin!`] macro;
//! - [`prepare`]: helpers for building a request (system prompt and
//!   alternating turns, image parts and data URLs, provider options);
//! - [`wire`]: helpers for reading a response (rate-limit headers such as
//!   `6m0s`, `retry-after` and RFC 3339 resets, retry hints in messages, key
//!   masking and truncation of upstream messages);
//! - [`conformance`]: the kit that checks a plugin against recorded fixtures,
//!   directly or (feature `host`) as a loaded `.so`;
//! - `host` (feature `host`): loading a plugin `.so`.
//!
//! Plugins are sans-I/O: they translate and classify, the daemon does the
//! HTTP, timeouts, retries, keys and accounting.

pub mod abi;
pub mod conformance;
pub mod estimate;
pub mod prepare;
pub mod types;
pub mod wire;

#[cfg(feature = "host")]
pub mod host;

pub use abi::Plugin;
pub use types::*;
