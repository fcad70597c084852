//! Configuration of the mock server: keys with their limits and states, the
//! limiter shape, context windows, and the failures a test can inject.
//!
//! Everything here is serde (JSON) and can also be built from Rust. Key
//! secrets live only in [`KeySpec::key`]; `Debug` output masks them.

use crate::format::mask_key;
use crate::MockError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// The wire protocol of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// OpenAI chat completions (`/openai/v1`).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages (`/anthropic/v1`).
    Anthropic,
    /// Google Gemini generateContent (`/gemini/v1beta`).
    Gemini,
}

impl Protocol {
    /// The path prefix of the protocol on the mock server.
    pub fn path_prefix(self) -> &'static str {
        match self {
            Protocol::OpenAi => "/openai/v1",
            Protocol::Anthropic => "/anthropic/v1",
            Protocol::Gemini => "/gemini/v1beta",
        }
    }
}

/// How a key's limits are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// At most `rpm` requests and `tpm` tokens in any `window_ms` interval.
    #[default]
    Rolling,
    /// Buckets of capacity `rpm` / `tpm`, refilled continuously over `window_ms`.
    TokenBucket,
}

/// What the upstream thinks of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Served normally, under its limits.
    #[default]
    Valid,
    /// Rejected with the protocol's authentication error.
    Invalid,
    /// Out of credit / billing quota.
    NoCredit,
    /// Account or consumer suspended.
    Suspended,
}

/// One API key the mock knows.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The secret, as sent by the client. Never shown in stats or logs.
    pub key: String,
    /// The name used in stats; defaults to a masked form of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Requests per window; `None` is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// Tokens per window; `None` is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub state: KeyState,
    /// Delay before every response for this key (overrides `default_latency_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Limiter shape for this key (overrides [`MockConfig::shape`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
}

impl KeySpec {
    /// A valid key without limits.
    pub fn new(key: impl Into<String>) -> Self {
        KeySpec {
            key: key.into(),
            label: None,
            rpm: None,
            tpm: None,
            state: KeyState::Valid,
            latency_ms: None,
            shape: None,
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn rpm(mut self, rpm: u32) -> Self {
        self.rpm = Some(rpm);
        self
    }

    pub fn tpm(mut self, tpm: u64) -> Self {
        self.tpm = Some(tpm);
        self
    }

    pub fn state(mut self, state: KeyState) -> Self {
        self.state = state;
        self
    }

    pub fn latency_ms(mut self, ms: u64) -> Self {
        self.latency_ms = Some(ms);
        self
    }

    pub fn shape(mut self, shape: Shape) -> Self {
        self.shape = Some(shape);
        self
    }
}

impl fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySpec")
            .field("key", &mask_key(&self.key))
            .field("label", &self.label)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("state", &self.state)
            .field("latency_ms", &self.latency_ms)
            .field("shape", &self.shape)
            .finish()
    }
}

/// The whole mock configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    /// Length of the rate-limit window in milliseconds (60000 = "per minute").
    pub window_ms: u64,
    /// Default limiter shape.
    pub shape: Shape,
    pub keys: Vec<KeySpec>,
    /// Serve keys that are not configured (without limits) instead of
    /// answering with the protocol's authentication error.
    pub accept_unknown_keys: bool,
    /// Delay before every response, unless the key sets its own.
    pub default_latency_ms: u64,
    /// Context window per model id, in tokens.
    pub contexts: BTreeMap<String, u64>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            window_ms: 60_000,
            shape: Shape::Rolling,
            keys: Vec::new(),
            accept_unknown_keys: false,
            default_latency_ms: 0,
            contexts: BTreeMap::new(),
        }
    }
}

impl MockConfig {
    /// Parses a JSON config.
    pub fn from_json(text: &str) -> Result<Self, MockError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Reads a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, MockError> {
        let text = std::fs::read_to_string(path).map_err(|source| MockError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn window_ms(mut self, ms: u64) -> Self {
        self.window_ms = ms;
        self
    }

    pub fn shape(mut self, shape: Shape) -> Self {
        self.shape = shape;
        self
    }

    pub fn key(mut self, key: KeySpec) -> Self {
        self.keys.push(key);
        self
    }

    pub fn accept_unknown_keys(mut self, yes: bool) -> Self {
        self.accept_unknown_keys = yes;
        self
    }

    pub fn default_latency_ms(mut self, ms: u64) -> Self {
        self.default_latency_ms = ms;
        self
    }

    pub fn context(mut self, model: impl Into<String>, tokens: u64) -> Self {
        self.contexts.insert(model.into(), tokens);
        self
    }
}

/// A failure the mock serves instead of the normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureKind {
    /// HTTP 500 with the protocol's internal-error body.
    #[serde(rename = "status_500")]
    Status500,
    /// HTTP 503 (Gemini `UNAVAILABLE`, OpenAI/Anthropic server-error bodies).
    #[serde(rename = "status_503")]
    Status503,
    /// Anthropic 529 `overloaded_error`; a 503 for the other protocols.
    #[serde(rename = "overloaded_529")]
    Overloaded529,
    /// HTTP 200 with `<html>oops</html>`.
    #[serde(rename = "non_json_200")]
    NonJson200,
    /// The connection is closed without any response bytes.
    #[serde(rename = "reset")]
    Reset,
    /// A normal success whose body arrives `delay_ms` after the headers.
    #[serde(rename = "slow_body")]
    SlowBody,
    /// The protocol's rate-limit 429, with `retry_after_ms` as the hint.
    #[serde(rename = "rate_limited_429")]
    RateLimited429,
}

impl FailureKind {
    /// The name used in JSON and in the stats `outcomes` map.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Status500 => "status_500",
            FailureKind::Status503 => "status_503",
            FailureKind::Overloaded529 => "overloaded_529",
            FailureKind::NonJson200 => "non_json_200",
            FailureKind::Reset => "reset",
            FailureKind::SlowBody => "slow_body",
            FailureKind::RateLimited429 => "rate_limited_429",
        }
    }
}

fn one() -> u32 {
    1
}

/// `count` consecutive failures of one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    pub kind: FailureKind,
    #[serde(default = "one")]
    pub count: u32,
    /// `slow_body`: delay between headers and body (default 1000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// `rate_limited_429`: the retry hint (default 1000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl Injection {
    pub fn new(kind: FailureKind, count: u32) -> Self {
        Injection {
            kind,
            count,
            delay_ms: None,
            retry_after_ms: None,
        }
    }

    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.delay_ms = Some(ms);
        self
    }

    pub fn retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

/// Body of `POST /_mock/inject`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    /// The raw key or its stats label; `None` matches every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub failures: Vec<Injection>,
}

impl fmt::Debug for InjectRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InjectRequest")
            .field("key", &self.key.as_deref().map(mask_key))
            .field("failures", &self.failures)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_names() {
        let c = MockConfig::from_json(
            r#"{"keys":[{"key":"sk-abcdefghijklmnop","rpm":3,"state":"no_credit","shape":"token_bucket"}]}"#,
        )
        .unwrap();
        assert_eq!(c.window_ms, 60_000);
        assert_eq!(c.shape, Shape::Rolling);
        assert_eq!(c.keys[0].state, KeyState::NoCredit);
        assert_eq!(c.keys[0].shape, Some(Shape::TokenBucket));
        let inj: Injection = serde_json::from_str(r#"{"kind":"status_500"}"#).unwrap();
        assert_eq!(inj.count, 1);
        assert_eq!(inj.kind.as_str(), "status_500");
        assert!(MockConfig::from_json(r#"{"windw_ms":1}"#).is_err());
    }

    #[test]
    fn debug_masks_keys() {
        let spec = KeySpec::new("sk-secret-0123456789").rpm(5);
        let cfg = MockConfig::default().key(spec.clone());
        assert!(!format!("{spec:?}").contains("sk-secret-0123456789"));
        assert!(!format!("{cfg:?}").contains("sk-secret-0123456789"));
        let inj = InjectRequest {
            key: Some("sk-secret-0123456789".into()),
            failures: vec![],
        };
        assert!(!format!("{inj:?}").contains("sk-secret-0123456789"));
    }
}
