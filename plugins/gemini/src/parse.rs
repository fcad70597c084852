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
use llmq_sdk::{HttpResponse, Outcome, Parsed, Usage};
use serde_json::Value;

/// Upstream messages longer than this are cut (results and logs stay small).
const MAX_MESSAGE_CHARS: usize = 2000;
/// How Google API keys start (`AIza…`, as echoed in "Consumer
/// 'api_key:AIza…' has been suspended"); masked in upstream messages.
pub const KEY_PREFIX: &str = "AIza";

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
const QUOTA_FAILURE: &str = "type.googleapis.com/google.rpc.QuotaFailure";
const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// Candidate finish reasons that mean the output was withheld by a filter.
const BLOCKING_FINISH_REASONS: [&str; 7] = [
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "LANGUAGE",
];

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
    if let Some(reason) = v
        .pointer("/promptFeedback/blockReason")
        .and_then(Value::as_str)
    {
        return Parsed::new(Outcome::InvalidRequest)
            .with_message(format!("prompt blocked: {reason}"));
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
    let finish_reason = candidate
        .get("finishReason")
        .and_then(Value::as_str)
        .map(String::from);
    if let Some(reason) = finish_reason
        .as_deref()
        .filter(|r| text.is_empty() && BLOCKING_FINISH_REASONS.contains(r))
    {
        return Parsed::new(Outcome::InvalidRequest)
            .with_message(format!("response blocked: {reason}"));
    }
    let usage = v.get("usageMetadata");
    let tokens = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Parsed::new(Outcome::Success {
        text,
        usage: Usage {
            input_tokens: tokens("promptTokenCount"),
            // Thinking tokens are billed as output.
            output_tokens: tokens("candidatesTokenCount") + tokens("thoughtsTokenCount"),
        },
        finish_reason: finish_reason.as_deref().and_then(normalize_finish),
        refusal: None,
    })
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
    let daily = e.violations().any(|v| {
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_ascii_lowercase()
        };
        field("quotaId").contains("perday") || field("quotaMetric").contains("per_day")
    });
    let zero_quota = e.lower.contains("limit: 0,")
        || e.lower.ends_with("limit: 0")
        || e.violations()
            .any(|v| v.get("quotaValue").and_then(Value::as_str) == Some("0"));
    let prepaid_empty =
        e.lower.contains("credits are depleted") || e.lower.contains("prepayment credits");
    if daily || zero_quota || prepaid_empty {
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
    fn a_json_array_that_is_not_an_error_is_transient() {
        assert_eq!(parse(&resp(200, "[1,2]")).outcome, Outcome::Transient);
    }
}

/// Gemini `finishReason` → the normalized finish reason.
fn normalize_finish(reason: &str) -> Option<llmq_sdk::FinishReason> {
    use llmq_sdk::FinishReason as F;
    Some(match reason {
        "STOP" => F::Stop,
        "MAX_TOKENS" => F::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            F::ContentFilter
        }
        _ => return None,
    })
}
