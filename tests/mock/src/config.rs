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
    /// The account (organization / project) the key belongs to. Keys of one
    /// account share ONE limiter, as real providers limit per account: its
    /// `rpm`, `tpm` and `shape` are those of the first key of the account the
    /// server saw; the limits of later keys of the account are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
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
            account: None,
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

    /// Puts the key in an account whose keys share one limiter.
    pub fn account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
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
            .field("account", &self.account)
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
    /// Groq's 413 for a request larger than the key's tokens-per-minute
    /// limit (`type` `tokens`, `code` `rate_limit_exceeded`), on any route:
    /// "Limit" is `limit` (else the key's `tpm`, else 6000), "Requested"
    /// the request's charge (at least Limit + 1).
    /// <https://console.groq.com/docs/errors>, <https://console.groq.com/docs/rate-limits>
    #[serde(rename = "groq_tpm_413")]
    GroqTpm413,
    /// Gemini's 429 `RESOURCE_EXHAUSTED` for the free-tier requests-per-day
    /// quota of the requested model (`QuotaFailure` quotaId
    /// `GenerateRequestsPerDayPerProjectPerModel-FreeTier`), with `Help` and
    /// `RetryInfo` details, on any route. `quotaValue` is `limit` (default
    /// 250); the retry delay is `retry_after_ms` (default 41 s), as real
    /// answers carry one even for daily quotas.
    /// <https://ai.google.dev/gemini-api/docs/rate-limits>
    #[serde(rename = "gemini_per_day_quota")]
    GeminiPerDayQuota,
    /// Gemini's 429 for the per-minute requests quota
    /// (`GenerateRequestsPerMinutePerProjectPerModel-FreeTier`): `quotaValue`
    /// is `limit` (else the key's `rpm`, else 10), `retryDelay` is
    /// `retry_after_ms` (default 27 s), on any route.
    #[serde(rename = "gemini_per_minute_quota")]
    GeminiPerMinuteQuota,
    /// The request is read and never answered: the connection is held open
    /// until the server shuts down (then it is closed without a response).
    #[serde(rename = "hang")]
    Hang,
    /// 200 OK with a `Content-Length` of `bytes` (default 100 MB) and a body
    /// of exactly that size, streamed in 64 KiB chunks and never held in
    /// memory: a valid JSON success of the protocol whose reply text is
    /// padded with `a` (only padding if `bytes` is too small for the JSON).
    #[serde(rename = "huge_body")]
    HugeBody,
    /// 200 OK with a chunked body that never ends (64 KiB chunks, one every
    /// `delay_ms`, default 0 = as fast as the client reads), until shutdown.
    #[serde(rename = "endless_body")]
    EndlessBody,
    /// 200 OK declaring a huge `Content-Length` (1 TiB) whose bytes trickle
    /// forever: 16 bytes every `delay_ms` (default 100 ms), until shutdown.
    #[serde(rename = "endless_content_length")]
    EndlessContentLength,
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
            FailureKind::GroqTpm413 => "groq_tpm_413",
            FailureKind::GeminiPerDayQuota => "gemini_per_day_quota",
            FailureKind::GeminiPerMinuteQuota => "gemini_per_minute_quota",
            FailureKind::Hang => "hang",
            FailureKind::HugeBody => "huge_body",
            FailureKind::EndlessBody => "endless_body",
            FailureKind::EndlessContentLength => "endless_content_length",
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
    /// `slow_body`: delay between headers and body (default 1000 ms);
    /// `endless_body` / `endless_content_length`: delay between chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// `rate_limited_429`: the retry hint (default 1000 ms);
    /// `gemini_per_day_quota` / `gemini_per_minute_quota`: the `retryDelay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// `huge_body`: the exact body size in bytes (default 100 MB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// `groq_tpm_413`: the TPM limit named in the message;
    /// `gemini_per_*_quota`: the `quotaValue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

impl Injection {
    pub fn new(kind: FailureKind, count: u32) -> Self {
        Injection {
            kind,
            count,
            delay_ms: None,
            retry_after_ms: None,
            bytes: None,
            limit: None,
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

    /// The body size of `huge_body`.
    pub fn bytes(mut self, bytes: u64) -> Self {
        self.bytes = Some(bytes);
        self
    }

    /// The limit named by `groq_tpm_413` / `gemini_per_*_quota`.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
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
    fn new_kinds_and_accounts_have_json_names() {
        for (kind, name) in [
            (FailureKind::GroqTpm413, "groq_tpm_413"),
            (FailureKind::GeminiPerDayQuota, "gemini_per_day_quota"),
            (FailureKind::GeminiPerMinuteQuota, "gemini_per_minute_quota"),
            (FailureKind::Hang, "hang"),
            (FailureKind::HugeBody, "huge_body"),
            (FailureKind::EndlessBody, "endless_body"),
            (FailureKind::EndlessContentLength, "endless_content_length"),
        ] {
            assert_eq!(kind.as_str(), name);
            assert_eq!(serde_json::to_value(kind).unwrap(), name);
        }
        let inj: Injection =
            serde_json::from_str(r#"{"kind":"huge_body","bytes":1000,"limit":7}"#).unwrap();
        assert_eq!(
            inj,
            Injection::new(FailureKind::HugeBody, 1)
                .bytes(1000)
                .limit(7)
        );
        let c =
            MockConfig::from_json(r#"{"keys":[{"key":"sk-abcdefghijklmnop","account":"acme"}]}"#)
                .unwrap();
        assert_eq!(
            c.keys[0],
            KeySpec::new("sk-abcdefghijklmnop").account("acme")
        );
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
