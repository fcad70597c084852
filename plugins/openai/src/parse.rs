//! `parse`: an upstream [`HttpResponse`] → exactly one [`Parsed`] outcome.
//!
//! Classification goes by HTTP status first, then by the error body, which
//! comes in several shapes across OpenAI-compatible servers:
//! - OpenAI, Groq, DeepSeek, Ollama: `{"error": {"message", "type", "param", "code"}}`;
//! - OpenRouter: `{"error": {"code": 402, "message", "metadata"}}` (numeric code);
//! - Z.AI: `{"error": {"code": "1113", "message"}}` (four-digit business codes);
//! - Mistral, vLLM: `{"object": "error", "message", "type", "code"}` at top
//!   level, or `{"message": …}` / `{"detail": …}`;
//! - NVIDIA NIM: RFC 7807 `{"status", "title", "detail"}`.
//!
//! The mapping table is in the crate README.

use crate::redact::redact;
use llmq_sdk::wire::{
    duration_after, parse_duration_ms, parse_u64, retry_after_headers_ms, truncate_message,
};
use llmq_sdk::{HttpResponse, ObservedLimits, Outcome, Parsed, Usage};
use serde_json::Value;

/// Longest upstream message passed on, in characters.
const MAX_MESSAGE_CHARS: usize = 1000;
/// Longest slice of a non-JSON body quoted in a message, in characters.
const MAX_SNIPPET_CHARS: usize = 200;

/// Codes (`error.code` / `error.type`) meaning "no credit left".
const QUOTA_CODES: &[&str] = &[
    "insufficient_quota",
    "credit_balance_exhausted",
    "billing_hard_limit_reached",
    "insufficient_balance",
    "insufficient_balance_error",
    "insufficient_credits",
];
/// Messages meaning "no credit left".
const QUOTA_PHRASES: &[&str] = &[
    "exceeded your current quota",
    "insufficient balance",
    "insufficient credits",
    "insufficient quota",
    "credit balance",
    "余额不足",
    "欠费",
];
/// Codes meaning the key or account is unusable.
const AUTH_CODES: &[&str] = &[
    "invalid_api_key",
    "invalid_authentication",
    "authentication_error",
    "permission_error",
    "account_deactivated",
    "organization_deactivated",
    "unauthorized",
    "unsupported_country_region_territory",
];
/// Codes meaning the prompt does not fit.
const CONTEXT_CODES: &[&str] = &["context_length_exceeded", "string_above_max_length"];
/// Messages meaning the prompt does not fit.
const CONTEXT_PHRASES: &[&str] = &[
    "maximum context length",
    "context length",
    "context window",
    "context_length_exceeded",
    "prompt is too long",
    "reduce the length of the messages",
    "prompt 超长",
];
/// Codes meaning the model is unknown, gone or not available to this key.
const MODEL_CODES: &[&str] = &[
    "model_not_found",
    "model_decommissioned",
    "model_not_available",
    "invalid_model",
];
/// Together with the word "model": the model is unknown or gone.
const MODEL_PHRASES: &[&str] = &[
    "does not exist",
    "not found",
    "decommissioned",
    "no longer supported",
    "not a valid model",
    "unknown model",
    "no such model",
    "do not have access",
    "does not have access",
    "not allowed to sample",
];
/// Codes of a generation that failed this time but may succeed on a retry
/// (Groq's JSON mode: "Failed to generate JSON").
const RETRYABLE_CODES: &[&str] = &["json_validate_failed"];
/// Messages of a content-policy refusal (OpenRouter's 403 moderation).
const MODERATION_PHRASES: &[&str] = &["flagged", "moderation", "guardrail", "content policy"];

/// Z.AI business codes (`error.code`, four digits).
const ZAI_AUTH: &[&str] = &[
    "1000", "1001", "1002", "1003", "1004", "1110", "1111", "1112", "1121",
];
const ZAI_QUOTA: &[&str] = &["1113", "1309"];
const ZAI_MODEL: &[&str] = &["1211", "1311"];
const ZAI_CONTEXT: &[&str] = &["1261"];

/// Classifies one response.
pub fn parse(resp: &HttpResponse) -> Parsed {
    let limits = observed_limits(resp);
    let json = parse_json(&resp.body);
    let info = json.as_ref().map(ErrorInfo::from_body).unwrap_or_default();
    let (outcome, message) = if (200..300).contains(&resp.status) {
        match json.as_ref() {
            Some(body) => success(resp, body, &info),
            None => (
                Outcome::Transient,
                Some(format!(
                    "HTTP {} response is not JSON: {}",
                    resp.status,
                    snippet(&resp.body)
                )),
            ),
        }
    } else {
        let message = info.message.clone().or_else(|| {
            Some(if resp.body.trim().is_empty() {
                format!("HTTP {} with an empty body", resp.status)
            } else {
                format!("HTTP {}: {}", resp.status, snippet(&resp.body))
            })
        });
        (classify(resp.status, resp, &info), message)
    };
    Parsed {
        outcome,
        message: message.map(|m| truncate_message(&redact(&m), MAX_MESSAGE_CHARS)),
        limits,
    }
}

fn parse_json(body: &str) -> Option<Value> {
    // OpenRouter pads slow non-streaming answers with leading whitespace.
    let body = body.trim_start_matches('\u{feff}').trim();
    serde_json::from_str(body).ok()
}

/// A 2xx body: a completion, or one of the ways a 200 can still be a failure.
fn success(resp: &HttpResponse, body: &Value, info: &ErrorInfo) -> (Outcome, Option<String>) {
    let choices = body.get("choices").and_then(Value::as_array);
    let Some(choice) = choices.and_then(|c| c.first()) else {
        // OpenRouter reports errors raised after the request was accepted in a
        // 200 body: {"error": {"code": 502, "message": …}}.
        if body.get("error").is_some_and(|e| !e.is_null()) {
            let status = info.status_code.unwrap_or(500);
            let message = info
                .message
                .clone()
                .or_else(|| Some("200 response carries an error".into()));
            return (classify(status, resp, info), message);
        }
        return (
            Outcome::Transient,
            Some(format!(
                "HTTP {} response has no choices: {}",
                resp.status,
                snippet(&resp.body)
            )),
        );
    };
    if let Some(err) = choice.get("error").filter(|e| e.is_object()) {
        let inner = ErrorInfo::from_error_object(err);
        let status = inner.status_code.unwrap_or(500);
        let message = inner
            .message
            .clone()
            .or_else(|| Some("the completion ended with an error".into()));
        return (classify(status, resp, &inner), message);
    }
    let Some(message) = choice.get("message").filter(|m| m.is_object()) else {
        return (
            Outcome::Transient,
            Some("HTTP 200 response: choices[0] has no message".into()),
        );
    };
    let text = match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        // Some servers (Mistral's reasoning models) send a list of typed parts.
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    };
    let refusal = message
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
        .map(String::from);
    let usage = body.get("usage");
    let count = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let outcome = Outcome::Success {
        text,
        usage: Usage {
            input_tokens: count("prompt_tokens"),
            output_tokens: count("completion_tokens"),
        },
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .and_then(normalize_finish),
        refusal: None,
    };
    (outcome, refusal)
}

/// The outcome of a non-success status (or of an error reported inside a 200).
fn classify(status: u16, resp: &HttpResponse, info: &ErrorInfo) -> Outcome {
    match status {
        429 => {
            if info.zai(ZAI_AUTH) {
                Outcome::AuthFailed
            } else if info.is_quota() {
                Outcome::quota_exhausted()
            } else {
                Outcome::RateLimited {
                    retry_after_ms: retry_after_ms(resp, info),
                }
            }
        }
        401 => {
            if info.is_quota() {
                Outcome::quota_exhausted()
            } else {
                Outcome::AuthFailed
            }
        }
        402 => Outcome::quota_exhausted(),
        403 => {
            if info.message_has(MODERATION_PHRASES) {
                Outcome::InvalidRequest
            } else if info.is_model() {
                Outcome::ModelNotFound
            } else if info.is_quota() {
                Outcome::quota_exhausted()
            } else {
                Outcome::AuthFailed
            }
        }
        404 | 410 => Outcome::ModelNotFound,
        // Groq: "Request too large for model … on tokens per minute": the
        // request can never fit this key's window; a bigger route may take it.
        413 => Outcome::ContextTooLong,
        408 | 409 | 425 => Outcome::Transient,
        400..=499 => {
            if info.is_auth() {
                Outcome::AuthFailed
            } else if info.is_quota() {
                Outcome::quota_exhausted()
            } else if info.is_context() {
                Outcome::ContextTooLong
            } else if info.is_model() {
                Outcome::ModelNotFound
            } else if info.has_code(RETRYABLE_CODES) {
                Outcome::Transient
            } else if status == 400 || status == 422 {
                Outcome::InvalidRequest
            } else {
                Outcome::Transient
            }
        }
        _ => Outcome::Transient,
    }
}

/// How long a rate-limited key should rest, from the most to the least
/// authoritative hint: `retry-after-ms`, `retry-after`, the reset header of
/// an exhausted window, OpenRouter's reset stamp, the "try again in 1.5s"
/// of OpenAI's and Groq's messages. `None` when there is no hint at all.
pub fn retry_after_ms(resp: &HttpResponse, info: &ErrorInfo) -> Option<u64> {
    if let Some(ms) = retry_after_headers_ms(resp) {
        return Some(ms);
    }
    let exhausted_reset = |window: &str| {
        let remaining = resp
            .header(&format!("x-ratelimit-remaining-{window}"))
            .and_then(parse_u64)?;
        if remaining > 0 {
            return None;
        }
        resp.header(&format!("x-ratelimit-reset-{window}"))
            .and_then(parse_duration_ms)
    };
    match (exhausted_reset("requests"), exhausted_reset("tokens")) {
        (Some(a), Some(b)) => return Some(a.max(b)),
        (Some(a), None) | (None, Some(a)) => return Some(a),
        (None, None) => {}
    }
    if let Some(ms) = openrouter_reset_ms(resp, info) {
        return Some(ms);
    }
    info.message.as_deref().and_then(message_retry_hint_ms)
}

/// OpenRouter's 429 body: `error.metadata.headers."X-RateLimit-Reset"`, Unix
/// milliseconds, when `X-RateLimit-Remaining` is 0.
fn openrouter_reset_ms(resp: &HttpResponse, info: &ErrorInfo) -> Option<u64> {
    let headers = info.metadata.as_ref()?.get("headers")?.as_object()?;
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| match v {
                Value::String(s) => parse_u64(s),
                other => other.as_u64(),
            })
    };
    if get("x-ratelimit-remaining").is_some_and(|r| r > 0) || resp.received_at_unix_ms == 0 {
        return None;
    }
    let reset = get("x-ratelimit-reset")?;
    Some(reset.saturating_sub(resp.received_at_unix_ms))
}

/// "Please try again in 6m0s." / "try again in 20ms" / "retry after 20 seconds".
fn message_retry_hint_ms(message: &str) -> Option<u64> {
    if let Some(ms) = duration_after(message, "try again in ") {
        return Some(ms);
    }
    let lower = message.to_ascii_lowercase();
    if let Some(idx) = lower.find("retry after ") {
        let rest = &lower[idx + "retry after ".len()..];
        let mut words = rest.split_whitespace();
        let n = words.next()?.parse::<f64>().ok()?;
        if words.next()?.starts_with("second") && n.is_finite() && n >= 0.0 {
            return Some((n * 1000.0).ceil() as u64);
        }
    }
    None
}

/// Rate-limit headers as OpenAI and Groq send them on every response.
pub fn observed_limits(resp: &HttpResponse) -> ObservedLimits {
    let count = |name: &str| resp.header(name).and_then(parse_u64);
    let duration = |name: &str| resp.header(name).and_then(parse_duration_ms);
    ObservedLimits {
        requests_limit: count("x-ratelimit-limit-requests"),
        requests_remaining: count("x-ratelimit-remaining-requests"),
        requests_reset_ms: duration("x-ratelimit-reset-requests"),
        tokens_limit: count("x-ratelimit-limit-tokens"),
        tokens_remaining: count("x-ratelimit-remaining-tokens"),
        tokens_reset_ms: duration("x-ratelimit-reset-tokens"),
    }
}

/// What an error body says, whatever its shape.
#[derive(Debug, Clone, Default)]
pub struct ErrorInfo {
    /// The human-readable message.
    pub message: Option<String>,
    /// Lower-cased `code` and `type` values (nested and top-level).
    pub codes: Vec<String>,
    /// A four-digit nested `error.code` (Z.AI's business codes).
    pub zai_code: Option<String>,
    /// An HTTP status carried in the body (OpenRouter's numeric `error.code`,
    /// RFC 7807 `status`), used for errors reported inside a 200.
    pub status_code: Option<u16>,
    /// OpenRouter's `error.metadata`.
    pub metadata: Option<Value>,
}

impl ErrorInfo {
    /// Reads any of the known error shapes from a JSON body.
    pub fn from_body(body: &Value) -> ErrorInfo {
        let mut info = match body.get("error") {
            Some(err @ Value::Object(_)) => ErrorInfo::from_error_object(err),
            // Ollama's native shape: {"error": "model 'x' not found"}.
            Some(Value::String(s)) => ErrorInfo {
                message: Some(s.clone()),
                ..ErrorInfo::default()
            },
            _ => ErrorInfo::default(),
        };
        if info.message.is_none() {
            info.message = ["message", "detail", "title", "msg"]
                .iter()
                .find_map(|k| body.get(*k).and_then(text_of));
        }
        for key in ["code", "type"] {
            if let Some(c) = body.get(key).and_then(code_of) {
                info.codes.push(c);
            }
        }
        if info.status_code.is_none() {
            info.status_code = body.get("status").and_then(status_of);
        }
        info
    }

    /// Reads an `error` object (`{"message", "type", "code", "metadata"}`).
    pub fn from_error_object(err: &Value) -> ErrorInfo {
        let mut info = ErrorInfo {
            message: err.get("message").and_then(text_of),
            metadata: err.get("metadata").filter(|m| m.is_object()).cloned(),
            ..ErrorInfo::default()
        };
        for key in ["code", "type", "error_code"] {
            if let Some(c) = err.get(key).and_then(code_of) {
                info.codes.push(c);
            }
        }
        if let Some(code) = err.get("code") {
            info.status_code = status_of(code);
            if let Some(c) =
                code_of(code).filter(|c| c.len() == 4 && c.bytes().all(|b| b.is_ascii_digit()))
            {
                info.zai_code = Some(c);
            }
        }
        info
    }

    fn has_code(&self, set: &[&str]) -> bool {
        self.codes.iter().any(|c| set.contains(&c.as_str()))
    }

    fn zai(&self, set: &[&str]) -> bool {
        self.zai_code.as_deref().is_some_and(|c| set.contains(&c))
    }

    fn message_has(&self, phrases: &[&str]) -> bool {
        self.message.as_deref().is_some_and(|m| {
            let m = m.to_lowercase();
            phrases.iter().any(|p| m.contains(p))
        })
    }

    fn is_quota(&self) -> bool {
        self.has_code(QUOTA_CODES) || self.zai(ZAI_QUOTA) || self.message_has(QUOTA_PHRASES)
    }

    fn is_auth(&self) -> bool {
        self.has_code(AUTH_CODES) || self.zai(ZAI_AUTH)
    }

    fn is_context(&self) -> bool {
        self.has_code(CONTEXT_CODES) || self.zai(ZAI_CONTEXT) || self.message_has(CONTEXT_PHRASES)
    }

    fn is_model(&self) -> bool {
        self.has_code(MODEL_CODES)
            || self.zai(ZAI_MODEL)
            || self.message_has(&["模型不存在"])
            || (self.message_has(&["model"]) && self.message_has(MODEL_PHRASES))
    }
}

/// A message field: a string, or a structured value (Mistral's 422 `detail`
/// list, a nested `message` object) flattened to text.
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Array(items) if !items.is_empty() => {
            let parts: Vec<String> = items
                .iter()
                .map(|i| match i.get("msg").and_then(Value::as_str) {
                    Some(msg) => match i.get("loc") {
                        Some(loc) => format!("{msg} (at {loc})"),
                        None => msg.to_string(),
                    },
                    None => text_of(i).unwrap_or_else(|| i.to_string()),
                })
                .collect();
            Some(parts.join("; "))
        }
        Value::Object(o) => o
            .get("message")
            .or_else(|| o.get("detail"))
            .and_then(text_of)
            .or_else(|| Some(v.to_string())),
        _ => None,
    }
}

/// A code or type: strings lower-cased, numbers as decimal text.
fn code_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An HTTP status given as a number or a numeric string.
fn status_of(v: &Value) -> Option<u16> {
    let n = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    u16::try_from(n).ok().filter(|s| (100..=599).contains(s))
}

/// The start of a body, whitespace collapsed, for messages about odd responses.
fn snippet(body: &str) -> String {
    let collapsed = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        "(empty body)".into()
    } else {
        truncate_message(&collapsed, MAX_SNIPPET_CHARS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resp(status: u16, headers: &[(&str, &str)], body: Value) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
            received_at_unix_ms: 1_741_305_000_000,
        }
    }

    #[test]
    fn retry_after_ms_header_wins_over_retry_after() {
        let r = resp(
            429,
            &[("retry-after", "20"), ("retry-after-ms", "1500.2")],
            json!({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}),
        );
        assert_eq!(
            parse(&r).outcome,
            Outcome::RateLimited {
                retry_after_ms: Some(1501)
            }
        );
    }

    #[test]
    fn both_windows_exhausted_takes_the_later_reset() {
        let r = resp(
            429,
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2s"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "1m0s"),
            ],
            json!({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}),
        );
        assert_eq!(
            parse(&r).outcome,
            Outcome::RateLimited {
                retry_after_ms: Some(60_000)
            }
        );
    }

    #[test]
    fn message_hints_are_read_when_headers_are_silent() {
        assert_eq!(
            message_retry_hint_ms("Please try again in 9m38.016s. Need more tokens?"),
            Some(578_016)
        );
        assert_eq!(message_retry_hint_ms("Please try again in 20ms."), Some(20));
        assert_eq!(
            message_retry_hint_ms("Please retry after 7 seconds."),
            Some(7_000)
        );
        assert_eq!(message_retry_hint_ms("Rate limit exceeded"), None);
        assert_eq!(message_retry_hint_ms("try again in a bit"), None);
    }

    #[test]
    fn openrouter_reset_stamp_becomes_a_duration() {
        let r = resp(
            429,
            &[],
            json!({"error": {"message": "Rate limit exceeded: free-models-per-day.", "code": 429,
                "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "1741305600000"}}}}),
        );
        assert_eq!(
            parse(&r).outcome,
            Outcome::RateLimited {
                retry_after_ms: Some(600_000)
            }
        );
    }

    #[test]
    fn zai_business_codes() {
        let quota = resp(
            429,
            &[],
            json!({"error": {"code": "1113", "message": "余额不足或无可用资源包,请充值。"}}),
        );
        assert_eq!(parse(&quota).outcome, Outcome::quota_exhausted());
        let locked = resp(
            429,
            &[],
            json!({"error": {"code": "1112", "message": "您的账户已被锁定,请联系客服解锁"}}),
        );
        assert_eq!(parse(&locked).outcome, Outcome::AuthFailed);
        let busy = resp(
            429,
            &[],
            json!({"error": {"code": "1302", "message": "您当前使用该API的并发数过高,请降低并发,或联系客服增加限额。"}}),
        );
        assert_eq!(
            parse(&busy).outcome,
            Outcome::RateLimited {
                retry_after_ms: None
            }
        );
        let model = resp(
            400,
            &[],
            json!({"error": {"code": "1211", "message": "模型不存在,请检查模型代码。"}}),
        );
        assert_eq!(parse(&model).outcome, Outcome::ModelNotFound);
        let long = resp(
            400,
            &[],
            json!({"error": {"code": "1261", "message": "Prompt 超长"}}),
        );
        assert_eq!(parse(&long).outcome, Outcome::ContextTooLong);
    }

    #[test]
    fn mistral_and_vllm_top_level_shapes() {
        let r = resp(429, &[], json!({"message": "Requests rate limit exceeded"}));
        let p = parse(&r);
        assert_eq!(
            p.outcome,
            Outcome::RateLimited {
                retry_after_ms: None
            }
        );
        assert_eq!(p.message.as_deref(), Some("Requests rate limit exceeded"));
        let r = resp(
            400,
            &[],
            json!({"object": "error", "message": "Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context length", "type": "invalid_request_message_error", "param": null, "code": "3051"}),
        );
        assert_eq!(parse(&r).outcome, Outcome::ContextTooLong);
        let r = resp(
            404,
            &[],
            json!({"object": "error", "message": "The model `foo` does not exist.", "type": "NotFoundError", "param": null, "code": 404}),
        );
        assert_eq!(parse(&r).outcome, Outcome::ModelNotFound);
        let r = resp(
            422,
            &[],
            json!({"object": "error", "message": {"detail": [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required"}]}, "type": "invalid_request_error", "param": null, "code": null}),
        );
        let p = parse(&r);
        assert_eq!(p.outcome, Outcome::InvalidRequest);
        assert!(p.message.unwrap().contains("Field required"));
        let r = resp(401, &[], json!({"detail": "Unauthorized"}));
        assert_eq!(parse(&r).outcome, Outcome::AuthFailed);
    }

    #[test]
    fn nvidia_problem_details() {
        let r = resp(
            403,
            &[],
            json!({"status": 403, "title": "Forbidden", "detail": "Authorization failed"}),
        );
        let p = parse(&r);
        assert_eq!(p.outcome, Outcome::AuthFailed);
        assert_eq!(p.message.as_deref(), Some("Authorization failed"));
        let r = resp(
            404,
            &[],
            json!({"status": 404, "title": "Not Found", "detail": "Function 'f': Not found for account 'a'"}),
        );
        assert_eq!(parse(&r).outcome, Outcome::ModelNotFound);
    }

    #[test]
    fn forbidden_variants() {
        let moderation = resp(
            403,
            &[],
            json!({"error": {"code": 403, "message": "anthropic/claude-3.5-sonnet requires moderation. Your input was flagged for \"harassment\"", "metadata": {"reasons": ["harassment"]}}}),
        );
        assert_eq!(parse(&moderation).outcome, Outcome::InvalidRequest);
        let access = resp(
            403,
            &[],
            json!({"error": {"message": "Project `proj_x` does not have access to model `o1`", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}),
        );
        assert_eq!(parse(&access).outcome, Outcome::ModelNotFound);
        let region = resp(
            403,
            &[],
            json!({"error": {"code": "unsupported_country_region_territory", "message": "Country, region, or territory not supported", "param": null, "type": "request_forbidden"}}),
        );
        assert_eq!(parse(&region).outcome, Outcome::AuthFailed);
    }

    #[test]
    fn other_statuses() {
        let groq_tpm = resp(
            413,
            &[],
            json!({"error": {"message": "Request too large for model `llama-3.1-8b-instant` in organization `org_x` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 12328, please reduce your message size and try again.", "type": "tokens", "code": "rate_limit_exceeded"}}),
        );
        assert_eq!(parse(&groq_tpm).outcome, Outcome::ContextTooLong);
        let decommissioned = resp(
            400,
            &[],
            json!({"error": {"message": "The model `llama3-70b-8192` has been decommissioned and is no longer supported.", "type": "invalid_request_error", "code": "model_decommissioned"}}),
        );
        assert_eq!(parse(&decommissioned).outcome, Outcome::ModelNotFound);
        let deepseek = resp(
            402,
            &[],
            json!({"error": {"message": "Insufficient Balance", "type": "unknown_error", "param": null, "code": "invalid_request_error"}}),
        );
        assert_eq!(parse(&deepseek).outcome, Outcome::quota_exhausted());
        for status in [408, 409, 502, 504, 529, 302, 418] {
            let r = resp(status, &[], json!({"error": {"message": "x"}}));
            assert_eq!(parse(&r).outcome, Outcome::Transient, "status {status}");
        }
        let json_failed = resp(
            400,
            &[],
            json!({"error": {"message": "Failed to generate JSON. Please adjust your prompt. See 'failed_generation' for more details.", "type": "invalid_request_error", "code": "json_validate_failed", "failed_generation": "{\"city\": "}}),
        );
        assert_eq!(parse(&json_failed).outcome, Outcome::Transient);
        let key_on_400 = resp(
            400,
            &[],
            json!({"error": {"message": "API key not valid", "code": "invalid_api_key"}}),
        );
        assert_eq!(parse(&key_on_400).outcome, Outcome::AuthFailed);
    }

    #[test]
    fn two_hundred_failures() {
        let or_err = resp(
            200,
            &[],
            json!({"error": {"code": 502, "message": "Provider returned error"}}),
        );
        let p = parse(&or_err);
        assert_eq!(p.outcome, Outcome::Transient);
        assert_eq!(p.message.as_deref(), Some("Provider returned error"));
        let choice_err = resp(
            200,
            &[],
            json!({"id": "gen-1", "choices": [{"index": 0, "finish_reason": "error", "error": {"code": 429, "message": "Upstream rate limited"}, "message": {"role": "assistant", "content": ""}}]}),
        );
        assert_eq!(
            parse(&choice_err).outcome,
            Outcome::RateLimited {
                retry_after_ms: None
            }
        );
        let empty = resp(200, &[], json!({"id": "x", "choices": []}));
        assert_eq!(parse(&empty).outcome, Outcome::Transient);
        let mut padded = resp(
            200,
            &[],
            json!({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}),
        );
        padded.body = format!("\n\n   \n{}", padded.body);
        assert!(
            matches!(parse(&padded).outcome, Outcome::Success { ref text, .. } if text == "ok")
        );
    }

    #[test]
    fn content_parts_null_content_and_refusals() {
        let parts = resp(
            200,
            &[],
            json!({"choices": [{"message": {"role": "assistant", "content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
            {"type": "text", "text": "Paris"}]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49}}),
        );
        assert_eq!(
            parse(&parts).outcome,
            Outcome::Success {
                text: "Paris".into(),
                usage: Usage {
                    input_tokens: 9,
                    output_tokens: 40
                },
                finish_reason: Some(llmq_sdk::FinishReason::Stop),
                refusal: None
            }
        );
        let refusal = resp(
            200,
            &[],
            json!({"choices": [{"message": {"role": "assistant", "content": null, "refusal": "I can't help with that."}, "finish_reason": "stop"}]}),
        );
        let p = parse(&refusal);
        assert!(matches!(p.outcome, Outcome::Success { ref text, .. } if text.is_empty()));
        assert_eq!(p.message.as_deref(), Some("I can't help with that."));
        let no_message = resp(200, &[], json!({"choices": [{"text": "legacy"}]}));
        assert_eq!(parse(&no_message).outcome, Outcome::Transient);
    }

    #[test]
    fn non_json_error_bodies_get_a_snippet_message() {
        let mut r = resp(502, &[], json!(null));
        r.body = "<html>\n<head><title>502 Bad Gateway</title></head>\n</html>".into();
        let p = parse(&r);
        assert_eq!(p.outcome, Outcome::Transient);
        assert_eq!(
            p.message.as_deref(),
            Some("HTTP 502: <html> <head><title>502 Bad Gateway</title></head> </html>")
        );
        r.body = String::new();
        assert_eq!(
            parse(&r).message.as_deref(),
            Some("HTTP 502 with an empty body")
        );
    }

    #[test]
    fn long_messages_are_truncated_and_keys_redacted() {
        let long = "x".repeat(5000);
        let r = resp(400, &[], json!({"error": {"message": long}}));
        let m = parse(&r).message.unwrap();
        assert_eq!(m.chars().count(), MAX_MESSAGE_CHARS + 1);
        let r = resp(
            401,
            &[],
            json!({"error": {"message": "Invalid key sk-live-0123456789abcdefghij"}}),
        );
        let m = parse(&r).message.unwrap();
        assert!(!m.contains("0123456789abcdef"), "{m}");
    }

    #[test]
    fn limits_are_read_on_any_response_and_bad_values_ignored() {
        let r = resp(
            500,
            &[
                ("x-ratelimit-limit-requests", "14400"),
                ("x-ratelimit-remaining-requests", "-1"),
                ("x-ratelimit-reset-tokens", "soon"),
                ("x-ratelimit-reset-requests", "2m59.56s"),
            ],
            json!({"error": {"message": "boom"}}),
        );
        let l = parse(&r).limits;
        assert_eq!(l.requests_limit, Some(14_400));
        assert_eq!(l.requests_remaining, None);
        assert_eq!(l.requests_reset_ms, Some(179_560));
        assert_eq!(l.tokens_reset_ms, None);
    }
}

/// OpenAI-compatible `finish_reason` → the normalized finish reason.
fn normalize_finish(reason: &str) -> Option<llmq_sdk::FinishReason> {
    use llmq_sdk::FinishReason as F;
    Some(match reason {
        "stop" | "eos" => F::Stop,
        "length" | "model_length" => F::Length,
        "tool_calls" | "function_call" => F::ToolCalls,
        "content_filter" | "sensitive" => F::ContentFilter,
        _ => return None,
    })
}
