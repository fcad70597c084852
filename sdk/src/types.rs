//! The canonical types that cross the plugin boundary as JSON.
//!
//! A plugin only ever sees these: the daemon turns a queued job into a
//! [`PrepareInput`], the plugin turns it into an [`HttpRequest`], the daemon
//! performs the I/O, and the plugin turns the [`HttpResponse`] into exactly one
//! [`Parsed`] outcome.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One chat message, in the OpenAI shape (the lingua franca of producers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

/// Message content: plain text or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Content {
    /// All text of the content, parts joined with a newline.
    pub fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    ContentPart::ImageUrl { .. } => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// True when any part is an image.
    pub fn has_image(&self) -> bool {
        matches!(self, Content::Parts(p) if p.iter().any(|p| matches!(p, ContentPart::ImageUrl { .. })))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// `https://…` or a `data:image/png;base64,…` URL.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The request a plugin translates: one model, already chosen by the router.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The upstream model id (what goes on the wire), e.g. `llama-3.1-8b-instant`.
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// The job asked for JSON output (`require: ["json"]`).
    #[serde(default)]
    pub json: bool,
}

/// Provider settings a plugin needs to build a request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ProviderInfo {
    /// Provider name from the catalog, e.g. `groq`.
    pub name: String,
    /// Base URL without a trailing slash, e.g. `https://api.groq.com/openai/v1`.
    pub base_url: String,
    /// Free-form provider options from config (e.g. `anthropic_version`).
    #[serde(default)]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// Input of `prepare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareInput {
    pub request: ChatRequest,
    /// The API key secret; `None` for keyless providers (Ollama).
    /// The plugin places it in a header and must never echo it elsewhere.
    #[serde(default)]
    pub api_key: Option<String>,
    pub provider: ProviderInfo,
}

/// Output of `prepare`: the HTTP request the daemon will send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The request body (JSON text for every first-party plugin).
    #[serde(default)]
    pub body: String,
}

/// Input of `parse`: what came back over the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names are lower-case.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
    /// When the response arrived, in Unix milliseconds. Lets `parse` turn an
    /// absolute reset time (Anthropic's RFC 3339 headers) into a duration
    /// without reading a clock, so it stays deterministic.
    #[serde(default)]
    pub received_at_unix_ms: u64,
}

impl HttpResponse {
    /// First header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Token usage of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Why a model stopped, normalized across providers (SPEC §9): OpenAI
/// `finish_reason`, Anthropic `stop_reason`, Gemini `finishReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// Cut off by `max_tokens` (or the model's output limit).
    Length,
    /// The model asked for tool calls.
    ToolCalls,
    /// The provider's safety system stopped or blocked the output.
    ContentFilter,
    /// The model declined to answer.
    Refusal,
}

impl FinishReason {
    /// Stable snake_case name, as in results.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Refusal => "refusal",
        }
    }
}

/// When an exhausted quota comes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaReset {
    /// At this Unix time in milliseconds (a reset time the provider stated).
    At { unix_ms: u64 },
    /// At the provider's next daily reset (its `daily_reset` setting, e.g.
    /// Pacific midnight for Gemini): a per-day quota.
    NextDaily,
}

/// What an exhausted quota covers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    /// The whole key (its account's credit or its plan).
    #[default]
    Key,
    /// One model on that key (Gemini's per-model quotas); other models on
    /// the same key keep serving.
    Model(String),
}

impl QuotaScope {
    pub fn is_key(&self) -> bool {
        matches!(self, QuotaScope::Key)
    }
}

/// The one thing a response means. Exactly one per response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    Success {
        text: String,
        usage: Usage,
        /// Why the model stopped, normalized (SPEC §9). A finish that is not
        /// a clean `stop` is never reported as one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish_reason: Option<FinishReason>,
        /// The model's refusal text, when it declined (OpenAI
        /// `message.refusal`, Anthropic `stop_reason: "refusal"`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refusal: Option<String>,
    },
    /// Slow down: the key is fine but over its rate for now.
    RateLimited {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// No credit / quota left: not a matter of waiting a minute. The key
    /// (or, with `scope: {"model": …}`, only that model on the key) is parked
    /// until `reset`, or re-probed on the daemon's schedule when there is none.
    QuotaExhausted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reset: Option<QuotaReset>,
        #[serde(default, skip_serializing_if = "QuotaScope::is_key")]
        scope: QuotaScope,
    },
    /// The key is invalid, revoked or suspended.
    AuthFailed,
    /// The upstream rejected the request itself; another key won't help.
    InvalidRequest,
    ContextTooLong,
    /// The request is larger than a per-key limit allows in any window
    /// (Groq's 413 "Request too large … on tokens per minute"): this key can
    /// never take it, other keys and routes may. The key itself is fine.
    RequestTooLarge,
    ModelNotFound,
    /// 5xx, overload, garbage: try again, preferably elsewhere.
    Transient,
}

impl Outcome {
    /// `quota_exhausted` for the whole key, with no known reset time.
    pub fn quota_exhausted() -> Outcome {
        Outcome::QuotaExhausted {
            reset: None,
            scope: QuotaScope::Key,
        }
    }

    /// Every outcome's [`name`](Outcome::name), in declaration order.
    pub const KINDS: [&'static str; 9] = [
        "success",
        "rate_limited",
        "quota_exhausted",
        "auth_failed",
        "invalid_request",
        "context_too_long",
        "request_too_large",
        "model_not_found",
        "transient",
    ];

    /// Stable snake_case name, as used in results, metrics and stats.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::QuotaExhausted { .. } => "quota_exhausted",
            Outcome::AuthFailed => "auth_failed",
            Outcome::InvalidRequest => "invalid_request",
            Outcome::ContextTooLong => "context_too_long",
            Outcome::RequestTooLarge => "request_too_large",
            Outcome::ModelNotFound => "model_not_found",
            Outcome::Transient => "transient",
        }
    }
}

/// Limits the upstream reported in its rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ObservedLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_remaining: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_reset_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_remaining: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_reset_ms: Option<u64>,
}

impl ObservedLimits {
    pub fn is_empty(&self) -> bool {
        *self == ObservedLimits::default()
    }
}

/// Output of `parse`: the outcome, the upstream's message, observed limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parsed {
    pub outcome: Outcome,
    /// The upstream's human-readable error message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "ObservedLimits::is_empty")]
    pub limits: ObservedLimits,
}

impl Parsed {
    pub fn new(outcome: Outcome) -> Self {
        Parsed {
            outcome,
            message: None,
            limits: ObservedLimits::default(),
        }
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub fn with_limits(mut self, limits: ObservedLimits) -> Self {
        self.limits = limits;
        self
    }
}

/// A default provider a plugin may advertise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderDefault {
    pub name: String,
    pub base_url: String,
}

/// What a plugin is: returned by `manifest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The plugin name that config refers to (`plugin = "openai"`).
    pub name: String,
    pub version: String,
    /// Wire protocols served, e.g. `["openai-chat"]`.
    pub protocols: Vec<String>,
    #[serde(default)]
    pub providers: Vec<ProviderDefault>,
}

/// An error a plugin returns instead of a request or outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    pub message: String,
}

impl PluginError {
    pub fn new(message: impl Into<String>) -> Self {
        PluginError {
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_lists_every_outcome_name_as_serialized() {
        let all = [
            Outcome::Success {
                text: String::new(),
                usage: Usage::default(),
                finish_reason: None,
                refusal: None,
            },
            Outcome::RateLimited {
                retry_after_ms: None,
            },
            Outcome::QuotaExhausted {
                reset: None,
                scope: QuotaScope::Key,
            },
            Outcome::AuthFailed,
            Outcome::InvalidRequest,
            Outcome::ContextTooLong,
            Outcome::RequestTooLarge,
            Outcome::ModelNotFound,
            Outcome::Transient,
        ];
        // Adding a variant breaks this match: add it to `all` and to KINDS.
        for o in &all {
            match o {
                Outcome::Success { .. }
                | Outcome::RateLimited { .. }
                | Outcome::QuotaExhausted { .. }
                | Outcome::AuthFailed
                | Outcome::InvalidRequest
                | Outcome::ContextTooLong
                | Outcome::RequestTooLarge
                | Outcome::ModelNotFound
                | Outcome::Transient => {}
            }
        }
        let names: Vec<&str> = all.iter().map(Outcome::name).collect();
        assert_eq!(names, Outcome::KINDS);
        for o in &all {
            let json = serde_json::to_value(o).unwrap();
            assert_eq!(json["kind"], o.name());
        }
    }

    #[test]
    fn quota_exhausted_reads_the_v1_shape_and_the_scoped_one() {
        let v1: Outcome = serde_json::from_str(r#"{"kind":"quota_exhausted"}"#).unwrap();
        assert_eq!(
            v1,
            Outcome::QuotaExhausted {
                reset: None,
                scope: QuotaScope::Key
            }
        );
        let scoped = Outcome::QuotaExhausted {
            reset: Some(QuotaReset::NextDaily),
            scope: QuotaScope::Model("gemini-2.5-pro".into()),
        };
        let json = serde_json::to_value(&scoped).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "quota_exhausted", "reset": "next_daily", "scope": {"model": "gemini-2.5-pro"}})
        );
        let at: Outcome = serde_json::from_value(serde_json::json!(
            {"kind": "quota_exhausted", "reset": {"at": {"unix_ms": 5}}}
        ))
        .unwrap();
        assert_eq!(
            at,
            Outcome::QuotaExhausted {
                reset: Some(QuotaReset::At { unix_ms: 5 }),
                scope: QuotaScope::Key
            }
        );
    }

    #[test]
    fn finish_reasons_serialize_as_their_names() {
        for f in [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::ToolCalls,
            FinishReason::ContentFilter,
            FinishReason::Refusal,
        ] {
            assert_eq!(serde_json::to_value(f).unwrap(), f.name());
        }
    }
}
