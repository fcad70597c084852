//! `parse`: a generateContent response → exactly one outcome.
//!
//! Errors are `google.rpc.Status` objects: `{"error":{"code","message",
//! "status","details":[{"@type": "type.googleapis.com/google.rpc.RetryInfo",
//! …}]}}`, sometimes wrapped in a one-element array. The classification table
//! and the 429 rule live in the crate README. Gemini sends no rate-limit
//! headers, so no limits are reported.

use llmq_sdk::wire::{
    duration_after, mask_keys, parse_duration_ms, parse_retry_after_ms, truncate_message,
};
use llmq_sdk::{FinishReason, HttpResponse, Outcome, Parsed, QuotaReset, QuotaScope, Usage};
use serde_json::Value;

/// Upstream messages longer than this are cut (results and logs stay small).
const MAX_MESSAGE_CHARS: usize = 2000;
/// How Google API keys start (`AIza…`, as echoed in "Consumer
/// 'api_key:AIza…' has been suspended"); masked in upstream messages.
pub const KEY_PREFIX: &str = "AIza";

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
const QUOTA_FAILURE: &str = "type.googleapis.com/google.rpc.QuotaFailure";
const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// Classifies one response. Never fails: garbage is [`Outcome::Transient`].
pub fn parse(resp: &HttpResponse) -> Parsed {
    let body: Option<Value> = serde_json::from_str(&resp.body).ok();
    let status_obj = body.as_ref().and_then(error_object);
    match (resp.status, body.as_ref(), status_obj) {
        (_, _, Some(err)) => error(resp, Some(err)),
        (200..=299, Some(v), None) if v.is_object() => success(v),
        (200..=299, Some(_), None) => {
            Parsed::new(Outcome::Transient).with_message("response body is not a JSON object")
        }
        (200..=299, None, None) => {
            Parsed::new(Outcome::Transient).with_message("response body is not JSON")
        }
        _ => error(resp, None),
    }
}

/// The `error` object of a body, also when wrapped in a one-element array.
fn error_object(body: &Value) -> Option<&Value> {
    let top = match body {
        Value::Array(items) => items.first()?,
        other => other,
    };
    top.get("error").filter(|e| e.is_object())
}

/// A 2xx generateContent body.
fn success(v: &Value) -> Parsed {
    let usage = v.get("usageMetadata");
    let tokens = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let usage = Usage {
        input_tokens: tokens("promptTokenCount"),
        // Thinking tokens are billed as output.
        // Saturating: the counts are the upstream's numbers (fuzz: u64::MAX).
        output_tokens: tokens("candidatesTokenCount").saturating_add(tokens("thoughtsTokenCount")),
    };
    // A blocked prompt has no candidates: the provider answered, its filter
    // withheld the output (SPEC §9: succeeded, finish_reason content_filter).
    if let Some(reason) = v
        .pointer("/promptFeedback/blockReason")
        .and_then(Value::as_str)
    {
        return Parsed::new(Outcome::Success {
            text: String::new(),
            usage,
            finish_reason: Some(FinishReason::ContentFilter),
            refusal: None,
        })
        .with_message(format!("prompt blocked: {}", clean_message(reason)));
    }
    let Some(candidate) = v
        .get("candidates")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
    else {
        return Parsed::new(Outcome::InvalidRequest).with_message("response has no candidates");
    };
    let text: String = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| p.get("thought").and_then(Value::as_bool) != Some(true))
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    let reason = candidate
        .get("finishReason")
        .and_then(Value::as_str)
        .map(clean_message);
    let finish_reason = match reason.as_deref().map(finish) {
        None => None,
        Some(Finish::Is(f)) => Some(f),
        Some(Finish::Retry) => {
            return Parsed::new(Outcome::Transient).with_message(format!(
                "finishReason {}: the model stopped without a usable answer",
                reason.unwrap_or_default()
            ))
        }
        Some(Finish::BadRequest) => {
            return Parsed::new(Outcome::InvalidRequest)
                .with_message(format!("finishReason {}", reason.unwrap_or_default()))
        }
        Some(Finish::Unknown) => {
            return Parsed::new(Outcome::Success {
                text,
                usage,
                finish_reason: None,
                refusal: None,
            })
            .with_message(format!(
                "unknown finishReason {:?}",
                reason.unwrap_or_default()
            ))
        }
    };
    let parsed = Parsed::new(Outcome::Success {
        text,
        usage,
        finish_reason,
        refusal: None,
    });
    match (finish_reason, reason) {
        (Some(FinishReason::ContentFilter), Some(r)) => {
            parsed.with_message(format!("response blocked: {r}"))
        }
        _ => parsed,
    }
}

/// What a candidate's `finishReason` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A success that ended this way.
    Is(FinishReason),
    /// No usable answer this time; another try (or route) may give one.
    Retry,
    /// The request itself is at fault; another key won't help.
    BadRequest,
    /// A value the docs do not list: a success with no finish reason.
    Unknown,
}

/// Gemini `finishReason` → what it means, per the FinishReason enum of
/// <https://ai.google.dev/api/generate-content#FinishReason> (and the same
/// enum in the official google-genai SDKs).
pub fn finish(reason: &str) -> Finish {
    use FinishReason as F;
    match reason {
        // "Natural stop point of the model or provided stop sequence."
        "STOP" => Finish::Is(F::Stop),
        // "The maximum number of tokens as specified in the request was reached."
        "MAX_TOKENS" => Finish::Is(F::Length),
        // "Model called too many tools consecutively, thus the system exited
        // execution": the answer is cut by a system limit, as with Anthropic's
        // pause_turn; a retry would run into the same limit.
        "TOO_MANY_TOOL_CALLS" => Finish::Is(F::Length),
        // The output was flagged and withheld: safety, recitation, the
        // terminology blocklist, prohibited content, sensitive PII, image
        // safety/prohibited content/recitation, and an unsupported language
        // ("The response candidate content was flagged for using an
        // unsupported language").
        "SAFETY"
        | "RECITATION"
        | "LANGUAGE"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => Finish::Is(F::ContentFilter),
        // "The function call generated by the model is invalid" / "The tool
        // call generated by the model is invalid" / "All other reasons that
        // stopped the token generation" / no image although one was expected:
        // the model gave no usable answer; sampling again may.
        "MALFORMED_FUNCTION_CALL"
        | "UNEXPECTED_TOOL_CALL"
        | "OTHER"
        | "FINISH_REASON_UNSPECIFIED"
        | "IMAGE_OTHER"
        | "NO_IMAGE" => Finish::Retry,
        // "Request has at least one thought signature missing": the request
        // is malformed for every key.
        "MISSING_THOUGHT_SIGNATURE" => Finish::BadRequest,
        _ => Finish::Unknown,
    }
}

/// What an error body says, gathered once.
struct ErrorView<'a> {
    status: &'a str,
    message: String,
    lower: String,
    details: &'a [Value],
}

impl<'a> ErrorView<'a> {
    fn of(err: Option<&'a Value>, http_status: u16) -> Self {
        let status = err
            .and_then(|e| e.get("status"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let message = err
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .map(clean_message)
            .unwrap_or_else(|| format!("HTTP {http_status}"));
        let details = err
            .and_then(|e| e.get("details"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        ErrorView {
            status,
            lower: message.to_ascii_lowercase(),
            message,
            details,
        }
    }

    fn details_of(&self, ty: &'static str) -> impl Iterator<Item = &'a Value> + 'a {
        self.details
            .iter()
            .filter(move |d| d.get("@type").and_then(Value::as_str) == Some(ty))
    }

    /// `ErrorInfo.reason` values.
    fn reasons(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.details_of(ERROR_INFO)
            .filter_map(|d| d.get("reason").and_then(Value::as_str))
    }

    /// `QuotaFailure.violations[]`.
    fn violations(&self) -> impl Iterator<Item = &'a Value> + 'a {
        self.details_of(QUOTA_FAILURE)
            .filter_map(|d| d.get("violations").and_then(Value::as_array))
            .flatten()
    }

    /// `RetryInfo.retryDelay` (`"43s"`, `"1.5s"`) in ms.
    fn retry_delay_ms(&self) -> Option<u64> {
        self.details_of(RETRY_INFO)
            .filter_map(|d| d.get("retryDelay").and_then(Value::as_str))
            .find_map(parse_duration_ms)
    }
}

/// The HTTP status to classify by: the response's, or for an error object in
/// a 2xx body, the object's own `code`.
fn effective_status(resp: &HttpResponse, err: Option<&Value>) -> u16 {
    if (200..=299).contains(&resp.status) {
        err.and_then(|e| e.get("code"))
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(500)
    } else {
        resp.status
    }
}

/// An error response.
fn error(resp: &HttpResponse, err: Option<&Value>) -> Parsed {
    let status = effective_status(resp, err);
    let e = ErrorView::of(err, status);
    let outcome = if status == 429 || e.status == "RESOURCE_EXHAUSTED" {
        resource_exhausted(resp, &e)
    } else if is_key_problem(&e) {
        Outcome::AuthFailed
    } else {
        match status {
            400 if e.status == "FAILED_PRECONDITION" && mentions_billing(&e.lower) => {
                Outcome::quota_exhausted()
            }
            400 if is_context_message(&e.lower) => Outcome::ContextTooLong,
            401 | 403 => Outcome::AuthFailed,
            404 if e.lower.contains("files/") => Outcome::InvalidRequest,
            404 => Outcome::ModelNotFound,
            408 | 409 | 499 | 500..=599 => Outcome::Transient,
            400..=499 => Outcome::InvalidRequest,
            _ => Outcome::Transient,
        }
    };
    Parsed::new(outcome).with_message(e.message)
}

/// The 429 rule (see README): a daily, zero or prepaid quota is exhausted and
/// waiting a minute won't help; otherwise it is a rate limit, with the best
/// hint available.
fn resource_exhausted(resp: &HttpResponse, e: &ErrorView<'_>) -> Outcome {
    let field = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    // A per-day quota: Gemini's daily quotas are per project and per model
    // and reset at midnight Pacific (the provider's `daily_reset`).
    if let Some(v) = e.violations().find(|v| {
        field(v, "quotaId").contains("perday") || field(v, "quotaMetric").contains("per_day")
    }) {
        return Outcome::QuotaExhausted {
            reset: Some(QuotaReset::NextDaily),
            scope: model_dimension(v).map_or(QuotaScope::Key, QuotaScope::Model),
        };
    }
    // No quota at all for this model on this project (`limit: 0`): another
    // model may have one.
    let zero_violation = e
        .violations()
        .find(|v| v.get("quotaValue").and_then(Value::as_str) == Some("0"));
    if zero_violation.is_some() || e.lower.contains("limit: 0,") || e.lower.ends_with("limit: 0") {
        let model = zero_violation
            .and_then(model_dimension)
            .or_else(|| model_in_message(&e.message));
        return Outcome::QuotaExhausted {
            reset: None,
            scope: model.map_or(QuotaScope::Key, QuotaScope::Model),
        };
    }
    if e.lower.contains("credits are depleted") || e.lower.contains("prepayment credits") {
        return Outcome::quota_exhausted();
    }
    let hint = e
        .retry_delay_ms()
        // "Please retry in 20.04466179s." (also `…ms`).
        .or_else(|| duration_after(&e.lower, "retry in "))
        .or_else(|| resp.header("retry-after").and_then(parse_retry_after_ms));
    if hint.is_none() && mentions_billing(&e.lower) {
        return Outcome::quota_exhausted();
    }
    Outcome::RateLimited {
        retry_after_ms: hint,
    }
}

/// The model a `QuotaFailure` violation names in `quotaDimensions.model`,
/// without any `models/` prefix.
fn model_dimension(violation: &Value) -> Option<String> {
    violation
        .pointer("/quotaDimensions/model")
        .and_then(Value::as_str)
        .and_then(clean_model)
}

/// The model named in a quota message: "…, limit: 0, model: gemini-2.5-pro".
fn model_in_message(message: &str) -> Option<String> {
    let at = message.find("model: ")? + "model: ".len();
    clean_model(message[at..].split_whitespace().next()?)
}

/// A model id as a quota names it, without the `models/` prefix; `None` when
/// it is empty or holds anything but letters, digits, `-`, `_` and `.`.
fn clean_model(raw: &str) -> Option<String> {
    let id = raw.trim().trim_end_matches([',', '.', ';']);
    let id = id.strip_prefix("models/").unwrap_or(id);
    (!id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    .then(|| id.to_string())
}

fn mentions_billing(lower: &str) -> bool {
    lower.contains("billing")
}

/// The key itself is bad: invalid, expired, blocked, suspended or leaked.
fn is_key_problem(e: &ErrorView<'_>) -> bool {
    e.reasons()
        .any(|r| r.starts_with("API_KEY_") || r == "CONSUMER_SUSPENDED")
        || e.lower.contains("api key not valid")
        || e.lower.contains("api key expired")
        || e.lower.contains("reported as leaked")
}

/// The prompt does not fit the model's input window.
fn is_context_message(lower: &str) -> bool {
    (lower.contains("input token count") || lower.contains("number of tokens"))
        && lower.contains("exceeds the maximum")
}

/// The upstream message, with anything shaped like a key masked and cut to a
/// sane length.
pub fn clean_message(msg: &str) -> String {
    truncate_message(&mask_keys(msg.trim(), &[KEY_PREFIX]), MAX_MESSAGE_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
            received_at_unix_ms: 1_714_564_800_000,
        }
    }

    #[test]
    fn keys_in_messages_are_masked() {
        assert_eq!(
            clean_message(
                "Consumer 'api_key:AIza-test-fake-fake-fake-fake-fakeStUvW' has been suspended. "
            ),
            "Consumer 'api_key:AIza…tUvW' has been suspended."
        );
        assert_eq!(clean_message("AIza-test-aaaa1111"), "AIza…1111");
        assert_eq!(clean_message("nothing to hide"), "nothing to hide");
    }

    #[test]
    fn a_429_message_gives_the_wait_when_details_do_not() {
        let p = parse(&resp(
            429,
            r#"{"error":{"code":429,"message":"Quota exceeded. Please retry in 616.645018ms.","status":"RESOURCE_EXHAUSTED"}}"#,
        ));
        assert_eq!(
            p.outcome,
            Outcome::RateLimited {
                retry_after_ms: Some(617)
            }
        );
    }

    #[test]
    fn an_error_array_is_unwrapped() {
        let p = parse(&resp(
            400,
            r#"[{"error":{"code":400,"message":"The input token count exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}]"#,
        ));
        assert_eq!(p.outcome, Outcome::ContextTooLong);
    }

    #[test]
    fn an_error_object_in_a_200_is_classified_by_its_code() {
        let p = parse(&resp(
            200,
            r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
        ));
        assert_eq!(p.outcome, Outcome::Transient);
        assert_eq!(
            p.message.as_deref(),
            Some("The model is overloaded. Please try again later.")
        );
    }

    #[test]
    fn thought_parts_are_not_answer_text_but_are_billed() {
        let p = parse(&resp(
            200,
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"plan...","thought":true},{"text":"42"}]},"finishReason":"STOP"}],
                "usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":2,"thoughtsTokenCount":30,"totalTokenCount":42}}"#,
        ));
        assert_eq!(
            p.outcome,
            Outcome::Success {
                text: "42".into(),
                usage: Usage {
                    input_tokens: 10,
                    output_tokens: 32
                },
                finish_reason: Some(llmq_sdk::FinishReason::Stop),
                refusal: None,
            }
        );
    }

    #[test]
    fn every_documented_finish_reason_has_a_meaning() {
        use FinishReason as F;
        for (reason, want) in [
            ("STOP", Finish::Is(F::Stop)),
            ("MAX_TOKENS", Finish::Is(F::Length)),
            ("TOO_MANY_TOOL_CALLS", Finish::Is(F::Length)),
            ("SAFETY", Finish::Is(F::ContentFilter)),
            ("RECITATION", Finish::Is(F::ContentFilter)),
            ("LANGUAGE", Finish::Is(F::ContentFilter)),
            ("BLOCKLIST", Finish::Is(F::ContentFilter)),
            ("PROHIBITED_CONTENT", Finish::Is(F::ContentFilter)),
            ("SPII", Finish::Is(F::ContentFilter)),
            ("IMAGE_SAFETY", Finish::Is(F::ContentFilter)),
            ("IMAGE_PROHIBITED_CONTENT", Finish::Is(F::ContentFilter)),
            ("IMAGE_RECITATION", Finish::Is(F::ContentFilter)),
            ("MALFORMED_FUNCTION_CALL", Finish::Retry),
            ("UNEXPECTED_TOOL_CALL", Finish::Retry),
            ("OTHER", Finish::Retry),
            ("FINISH_REASON_UNSPECIFIED", Finish::Retry),
            ("IMAGE_OTHER", Finish::Retry),
            ("NO_IMAGE", Finish::Retry),
            ("MISSING_THOUGHT_SIGNATURE", Finish::BadRequest),
            ("SOMETHING_NEW", Finish::Unknown),
        ] {
            assert_eq!(finish(reason), want, "{reason}");
        }
    }

    #[test]
    fn an_unknown_finish_reason_is_a_success_without_one_and_is_named() {
        let p = parse(&resp(
            200,
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"ok"}]},"finishReason":"SOMETHING_NEW"}]}"#,
        ));
        match p.outcome {
            Outcome::Success {
                text,
                finish_reason,
                ..
            } => {
                assert_eq!(text, "ok");
                assert_eq!(finish_reason, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.message.as_deref(),
            Some("unknown finishReason \"SOMETHING_NEW\"")
        );
    }

    #[test]
    fn quota_model_names_are_bare_and_safe() {
        assert_eq!(
            clean_model("models/gemini-2.5-pro"),
            Some("gemini-2.5-pro".into())
        );
        assert_eq!(
            clean_model("gemini-2.0-flash,"),
            Some("gemini-2.0-flash".into())
        );
        assert_eq!(clean_model("models/"), None);
        assert_eq!(clean_model("a/b"), None);
        assert_eq!(
            model_in_message("limit: 0, model: gemini-2.5-pro\nPlease retry in 20s."),
            Some("gemini-2.5-pro".into())
        );
        assert_eq!(model_in_message("limit: 0"), None);
    }

    #[test]
    fn a_per_day_violation_wins_over_a_per_minute_one_in_the_same_answer() {
        let p = parse(&resp(
            429,
            r#"{"error":{"code":429,"message":"Quota exceeded.","status":"RESOURCE_EXHAUSTED","details":[
                {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[
                  {"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"model":"gemini-2.0-flash"},"quotaValue":"15"},
                  {"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"model":"gemini-2.0-flash"},"quotaValue":"200"}]},
                {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"12s"}]}}"#,
        ));
        assert_eq!(
            p.outcome,
            Outcome::QuotaExhausted {
                reset: Some(QuotaReset::NextDaily),
                scope: QuotaScope::Model("gemini-2.0-flash".into()),
            }
        );
    }

    #[test]
    fn a_json_array_that_is_not_an_error_is_transient() {
        assert_eq!(parse(&resp(200, "[1,2]")).outcome, Outcome::Transient);
    }
}
