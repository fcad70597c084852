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
use llmq_sdk::{
    FinishReason, HttpResponse, ObservedLimits, Outcome, Parsed, QuotaReset, QuotaScope, Usage,
};
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

/// Z.AI / BigModel business codes (`error.code`, four digits), from the
/// tables at <https://docs.z.ai/api-reference/api-code> and
/// <https://docs.bigmodel.cn/cn/api/api-code> (the two platforms share them).
///
/// The key or account is unusable: authentication 1000–1004, account
/// inactive / missing / locked 1110–1112, locked for irregular activity 1121.
const ZAI_AUTH: &[&str] = &[
    "1000", "1001", "1002", "1003", "1004", "1110", "1111", "1112", "1121",
];
/// No credit: in arrears 1113, GLM Coding Plan expired 1309; 1313: the
/// account's use "does not comply with the fair-use policy, its request rate
/// has been restricted" until the owner applies to lift it, so no reset time.
const ZAI_QUOTA: &[&str] = &["1113", "1309", "1313"];
/// 1304: "this API has reached today's call limit".
const ZAI_DAILY: &[&str] = &["1304"];
/// Usage caps whose message says when they reset ("Your limit will reset at
/// {next_flush_time}"): 1308 (usage cap of a window), 1310 (weekly/monthly
/// cap), 1316 / 1317 (the past 5 hours / 7 days, no balance left for extra
/// usage).
const ZAI_CAPPED: &[&str] = &["1308", "1310", "1316", "1317"];
/// 1211: the model does not exist; 1311: the subscription does not include
/// this model.
const ZAI_MODEL: &[&str] = &["1211", "1311"];
/// 1312: "this model is overloaded right now, try later or switch to another
/// model": the provider's capacity, not this key's.
const ZAI_OVERLOADED: &[&str] = &["1312"];
/// 1261: "Prompt 超长" (the prompt is too long).
const ZAI_CONTEXT: &[&str] = &["1261"];
/// Z.AI's `{next_flush_time}` is a wall-clock `YYYY-MM-DD HH:MM:SS` with no
/// zone. The docs do not name the zone; users who compared it with their
/// quota dashboards found Beijing time, UTC+8 (e.g.
/// <https://github.com/can1357/oh-my-pi/issues/11014>). Reading it as UTC+8
/// is also the conservative choice: it is the earlier of the two plausible
/// instants, so at worst the key is tried once early and parked again.
const ZAI_RESET_UTC_OFFSET_MS: i64 = 8 * 3_600_000;

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
        .filter(|r| !r.trim().is_empty())
        .map(String::from);
    let usage = body.get("usage");
    let count = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let raw_finish = choice.get("finish_reason").and_then(Value::as_str);
    // OpenRouter normalizes `finish_reason` and keeps the upstream's own
    // value in `native_finish_reason`; the native one only fills a gap.
    let native_finish = choice.get("native_finish_reason").and_then(Value::as_str);
    let finish = match raw_finish.map(finish_kind) {
        Some(FinishKind::Unknown) | None => native_finish.map(finish_kind),
        known => known,
    };
    let finish_reason = match finish {
        Some(FinishKind::Failed) => {
            let reason = raw_finish.or(native_finish).unwrap_or("error");
            return (
                Outcome::Transient,
                Some(format!(
                    "the provider ended the completion with finish_reason {reason:?}: it failed mid-answer"
                )),
            );
        }
        Some(FinishKind::Normalized(r)) => Some(r),
        Some(FinishKind::Unknown) | None => None,
    };
    // DeepSeek's JSON Output replaces an answer that is not valid JSON with
    // spaces, "even when finish_reason is stop", and advises a retry
    // (https://api-docs.deepseek.com/guides/json_mode). A reply of nothing
    // but whitespace is no answer from any provider: try again.
    let has_tool_calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    if !text.is_empty() && text.trim().is_empty() && !has_tool_calls && refusal.is_none() {
        return (
            Outcome::Transient,
            Some("the completion is blank (only whitespace): no answer was produced".into()),
        );
    }
    // OpenAI sets `message.refusal` when the model declines; the finish
    // reason then still says "stop". A refusal is never a plain stop.
    let finish_reason = if refusal.is_some() {
        Some(FinishReason::Refusal)
    } else {
        finish_reason
    };
    let outcome = Outcome::Success {
        text,
        usage: Usage {
            input_tokens: count("prompt_tokens"),
            output_tokens: count("completion_tokens"),
        },
        finish_reason,
        refusal,
    };
    (outcome, None)
}

/// What a provider's `finish_reason` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinishKind {
    /// A normal end, normalized.
    Normalized(FinishReason),
    /// The provider failed mid-answer: the text is not an answer.
    Failed,
    /// A value no provider documents: reported as no finish reason, never as
    /// a clean stop.
    Unknown,
}

/// Every documented `finish_reason` of the OpenAI-compatible providers:
/// - OpenAI: `stop`, `length`, `tool_calls`, `content_filter`,
///   `function_call` (deprecated)
///   (<https://platform.openai.com/docs/api-reference/chat/object>);
/// - Mistral: `stop`, `length`, `model_length`, `error`, `tool_calls`
///   (<https://docs.mistral.ai/api/#tag/chat/operation/chat_completion_v1_chat_completions_post>);
/// - DeepSeek: `stop`, `length`, `content_filter`, `tool_calls`,
///   `insufficient_system_resource` ("interrupted due to insufficient
///   resource of the inference system",
///   <https://api-docs.deepseek.com/api/create-chat-completion>);
/// - Z.AI / BigModel: `stop`, `tool_calls`, `length`, `sensitive` (blocked by
///   the safety review), `network_error` ("model inference error")
///   (<https://docs.bigmodel.cn/api-reference/%E6%A8%A1%E5%9E%8B-api/%E6%9F%A5%E8%AF%A2%E5%BC%82%E6%AD%A5%E7%BB%93%E6%9E%9C>);
///   Z.AI also sends the undocumented `model_context_window_exceeded`
///   (<https://github.com/anomalyco/opencode/issues/18813>), read as `length`
///   as Anthropic documents the same value;
/// - OpenRouter: `tool_calls`, `stop`, `length`, `content_filter`, `error`,
///   with the upstream's raw value in `native_finish_reason`
///   (<https://openrouter.ai/docs/api-reference/overview>), so the raw
///   values of Anthropic (`end_turn`, `stop_sequence`, `max_tokens`,
///   `tool_use`, `refusal`) and Gemini (`STOP`, `MAX_TOKENS`, `SAFETY`,
///   `RECITATION`, …) are read too;
/// - Ollama passes its `done_reason` through (`stop`, `length`; `tool_calls`
///   when the model called a tool; `load` / `unload` are not completions)
///   (<https://github.com/ollama/ollama/blob/main/openai/openai.go>);
/// - vLLM / TGI: `stop`, `length`, `eos_token`, `abort`.
fn finish_kind(reason: &str) -> FinishKind {
    use FinishReason as F;
    FinishKind::Normalized(match reason.trim().to_ascii_lowercase().as_str() {
        "stop" | "end_turn" | "stop_sequence" | "eos" | "eos_token" | "pause_turn" => F::Stop,
        "length" | "model_length" | "max_tokens" | "model_context_window_exceeded" => F::Length,
        "tool_calls" | "function_call" | "tool_use" => F::ToolCalls,
        "content_filter" | "sensitive" | "safety" | "recitation" | "blocklist"
        | "prohibited_content" | "spii" | "image_safety" => F::ContentFilter,
        "refusal" => F::Refusal,
        "error" | "network_error" | "insufficient_system_resource" | "abort" => {
            return FinishKind::Failed
        }
        _ => return FinishKind::Unknown,
    })
}

/// The outcome of a non-success status (or of an error reported inside a 200).
fn classify(status: u16, resp: &HttpResponse, info: &ErrorInfo) -> Outcome {
    match status {
        429 => {
            if info.zai(ZAI_AUTH) {
                Outcome::AuthFailed
            } else if info.zai(ZAI_MODEL) {
                Outcome::ModelNotFound
            } else if info.zai(ZAI_OVERLOADED) {
                Outcome::Transient
            } else if info.zai(ZAI_DAILY) {
                Outcome::QuotaExhausted {
                    reset: Some(QuotaReset::NextDaily),
                    scope: QuotaScope::Key,
                }
            } else if info.zai(ZAI_CAPPED) || (info.zai_code.is_some() && zai_reset(info).is_some())
            {
                Outcome::QuotaExhausted {
                    reset: zai_reset(info).map(|unix_ms| QuotaReset::At { unix_ms }),
                    scope: QuotaScope::Key,
                }
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
        // Groq: "Request too large for model … on tokens per minute (TPM):
        // Limit 6000, Requested 14810": larger than this key's TPM window, so
        // this key can never take it; other keys and routes may
        // (https://console.groq.com/docs/rate-limits). A 413 that says the
        // prompt overflows the model's context is a context overflow; any
        // other 413 ("The request body is too large",
        // https://console.groq.com/docs/errors) is also a per-request size
        // limit of this endpoint, so it moves on the same way.
        413 => {
            if info.is_context() {
                Outcome::ContextTooLong
            } else {
                Outcome::RequestTooLarge
            }
        }
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

/// The reset instant a Z.AI quota message states ("Your limit will reset at
/// 2026-09-09 05:38:28", "您的限额将在 2026-09-09 05:38:28 重置"), in Unix
/// ms, read as Beijing time (see [`ZAI_RESET_UTC_OFFSET_MS`]).
fn zai_reset(info: &ErrorInfo) -> Option<u64> {
    let message = info.message.as_deref()?;
    let bytes = message.as_bytes();
    (0..bytes.len()).find_map(|i| {
        let stamp = bytes.get(i..i + 19)?;
        let local_ms = parse_wall_clock_ms(stamp)?;
        u64::try_from(local_ms.checked_sub(ZAI_RESET_UTC_OFFSET_MS)?).ok()
    })
}

/// `YYYY-MM-DD HH:MM:SS` (a `T` is accepted for the space) as milliseconds
/// since 1970-01-01T00:00:00 of the same wall clock. Fixed-width digits
/// only, every field range-checked, checked arithmetic throughout.
fn parse_wall_clock_ms(s: &[u8]) -> Option<i64> {
    if s.len() != 19
        || s[4] != b'-'
        || s[7] != b'-'
        || !(s[10] == b' ' || s[10] == b'T')
        || s[13] != b':'
        || s[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        s.get(range)?.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit()
                .then(|| acc.checked_mul(10)?.checked_add(i64::from(b - b'0')))
                .flatten()
        })
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if year < 1970 || !(1..=month_days).contains(&day) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil, years >= 1970).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era
        .checked_mul(146_097)?
        .checked_add(doe)?
        .checked_sub(719_468)?;
    let secs = days
        .checked_mul(86_400)?
        .checked_add(hour * 3_600 + minute * 60 + second)?;
    secs.checked_mul(1_000)
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
        assert_eq!(parse(&groq_tpm).outcome, Outcome::RequestTooLarge);
        let too_long_413 = resp(
            413,
            &[],
            json!({"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.", "type": "invalid_request_error", "code": "context_length_exceeded"}}),
        );
        assert_eq!(parse(&too_long_413).outcome, Outcome::ContextTooLong);
        let body_413 = resp(
            413,
            &[],
            json!({"error": {"message": "Request Entity Too Large"}}),
        );
        assert_eq!(parse(&body_413).outcome, Outcome::RequestTooLarge);
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
        assert_eq!(
            p.outcome,
            Outcome::Success {
                text: String::new(),
                usage: Usage::default(),
                finish_reason: Some(FinishReason::Refusal),
                refusal: Some("I can't help with that.".into()),
            }
        );
        assert_eq!(p.message, None);
        let no_message = resp(200, &[], json!({"choices": [{"text": "legacy"}]}));
        assert_eq!(parse(&no_message).outcome, Outcome::Transient);
    }

    #[test]
    fn every_documented_finish_reason_is_normalized_or_failed() {
        use FinishReason as F;
        for (raw, want) in [
            ("stop", FinishKind::Normalized(F::Stop)),
            ("length", FinishKind::Normalized(F::Length)),
            ("model_length", FinishKind::Normalized(F::Length)),
            (
                "model_context_window_exceeded",
                FinishKind::Normalized(F::Length),
            ),
            ("tool_calls", FinishKind::Normalized(F::ToolCalls)),
            ("function_call", FinishKind::Normalized(F::ToolCalls)),
            ("content_filter", FinishKind::Normalized(F::ContentFilter)),
            ("sensitive", FinishKind::Normalized(F::ContentFilter)),
            ("SAFETY", FinishKind::Normalized(F::ContentFilter)),
            ("MAX_TOKENS", FinishKind::Normalized(F::Length)),
            ("end_turn", FinishKind::Normalized(F::Stop)),
            ("tool_use", FinishKind::Normalized(F::ToolCalls)),
            ("refusal", FinishKind::Normalized(F::Refusal)),
            ("error", FinishKind::Failed),
            ("network_error", FinishKind::Failed),
            ("insufficient_system_resource", FinishKind::Failed),
            ("abort", FinishKind::Failed),
            ("load", FinishKind::Unknown),
            ("", FinishKind::Unknown),
        ] {
            assert_eq!(finish_kind(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn unknown_finish_reason_is_never_reported_as_stop_and_native_fills_the_gap() {
        let finish =
            |choice: Value| match parse(&resp(200, &[], json!({"choices": [choice]}))).outcome {
                Outcome::Success { finish_reason, .. } => finish_reason,
                other => panic!("{other:?}"),
            };
        assert_eq!(
            finish(json!({"message": {"content": "x"}, "finish_reason": "something_new"})),
            None
        );
        assert_eq!(finish(json!({"message": {"content": "x"}})), None);
        assert_eq!(
            finish(
                json!({"message": {"content": "x"}, "finish_reason": null, "native_finish_reason": "MAX_TOKENS"})
            ),
            Some(FinishReason::Length)
        );
        // The normalized value wins over the native one.
        assert_eq!(
            finish(
                json!({"message": {"content": "x"}, "finish_reason": "stop", "native_finish_reason": "end_turn"})
            ),
            Some(FinishReason::Stop)
        );
    }

    #[test]
    fn wall_clock_stamps_parse_with_range_checks() {
        let ms = |s: &str| parse_wall_clock_ms(s.as_bytes());
        assert_eq!(ms("1970-01-01 00:00:00"), Some(0));
        assert_eq!(ms("2026-09-09 05:38:28"), Some(1_788_932_308_000));
        assert_eq!(ms("2024-02-29T23:59:59"), Some(1_709_251_199_000));
        for bad in [
            "2025-02-29 00:00:00",
            "2026-13-01 00:00:00",
            "2026-00-10 00:00:00",
            "2026-04-31 00:00:00",
            "2026-01-01 24:00:00",
            "2026-01-01 23:60:00",
            "2026-01-01 23:00:60",
            "1969-12-31 23:59:59",
            "2026/01/01 00:00:00",
            "2026-01-01 00:00:0",
            "２０２６-01-01 00:00:00",
            "+026-01-01 00:00:00",
        ] {
            assert_eq!(ms(bad), None, "{bad:?}");
        }
        // Found anywhere in the message, read as UTC+8.
        let info = ErrorInfo {
            message: Some("[1308][您的限额将在 2026-09-09 05:38:28 重置][id]".into()),
            ..ErrorInfo::default()
        };
        assert_eq!(zai_reset(&info), Some(1_788_932_308_000 - 8 * 3_600_000));
        let info = ErrorInfo {
            message: Some("Usage limit reached. é 2026-9-9".into()),
            ..ErrorInfo::default()
        };
        assert_eq!(zai_reset(&info), None);
    }

    #[test]
    fn zai_429_codes_by_meaning() {
        let zai = |code: &str, message: &str| {
            parse(&resp(
                429,
                &[],
                json!({"error": {"code": code, "message": message}}),
            ))
            .outcome
        };
        assert_eq!(
            zai(
                "1304",
                "该 API 已达今日调用次数限额,如有更多需求,请联系客服购买"
            ),
            Outcome::QuotaExhausted {
                reset: Some(QuotaReset::NextDaily),
                scope: QuotaScope::Key
            }
        );
        assert_eq!(
            zai(
                "1310",
                "Weekly/Monthly Limit Exhausted. Your limit will reset at 2026-12-07 00:00:00"
            ),
            Outcome::QuotaExhausted {
                reset: Some(QuotaReset::At {
                    unix_ms: 1_796_572_800_000
                }),
                scope: QuotaScope::Key
            }
        );
        assert_eq!(
            zai("1310", "Weekly/Monthly Limit Exhausted."),
            Outcome::quota_exhausted()
        );
        assert_eq!(
            zai(
                "1313",
                "您的账户当前使用模式不符合公平使用策略,请求频率已受到限制。"
            ),
            Outcome::quota_exhausted()
        );
        assert_eq!(
            zai("1311", "当前订阅套餐暂未开放GLM-5权限"),
            Outcome::ModelNotFound
        );
        assert_eq!(
            zai("1312", "该模型当前访问量过大,请您稍后再试"),
            Outcome::Transient
        );
        assert_eq!(
            zai(
                "1303",
                "您当前使用该 API 的频率过高,请降低频率,或联系客服增加限额"
            ),
            Outcome::RateLimited {
                retry_after_ms: None
            }
        );
        // A reset time in a Z.AI code not in the table still means a cap.
        assert_eq!(
            zai(
                "1319",
                "Usage limit reached. Your limit will reset at 2026-12-07 00:00:00"
            ),
            Outcome::QuotaExhausted {
                reset: Some(QuotaReset::At {
                    unix_ms: 1_796_572_800_000
                }),
                scope: QuotaScope::Key
            }
        );
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
