//! `parse`: a Messages API response → exactly one outcome plus observed limits.
//!
//! The classification table lives in the crate README. Error bodies look like
//! `{"type":"error","error":{"type":"rate_limit_error","message":"…"}}`;
//! limits come from the `anthropic-ratelimit-*` headers, whose resets are
//! RFC 3339 instants turned into durations relative to `received_at_unix_ms`.

use llmq_sdk::wire::{
    mask_keys, parse_rfc3339_ms, parse_u64, retry_after_headers_ms, truncate_message,
};
use llmq_sdk::{
    FinishReason, HttpResponse, ObservedLimits, Outcome, Parsed, QuotaReset, QuotaScope, Usage,
};
use serde_json::Value;

/// Upstream messages longer than this are cut (results and logs stay small).
const MAX_MESSAGE_CHARS: usize = 2000;
/// How Anthropic keys start; masked in upstream messages.
pub const KEY_PREFIX: &str = "sk-ant-";

/// Classifies one response. Never fails: garbage is [`Outcome::Transient`].
pub fn parse(resp: &HttpResponse) -> Parsed {
    let limits = observed_limits(resp);
    let body: Option<Value> = serde_json::from_str(&resp.body).ok();
    let parsed = match (resp.status, &body) {
        (200..=299, Some(v)) if v.get("type").and_then(Value::as_str) != Some("error") => {
            success(v)
        }
        (200..=299, None) => {
            Parsed::new(Outcome::Transient).with_message("response body is not JSON")
        }
        _ => error(resp, body.as_ref()),
    };
    parsed.with_limits(limits)
}

/// A 2xx body: text blocks joined, usage, stop reason.
fn success(v: &Value) -> Parsed {
    let Some(content) = v.get("content").and_then(Value::as_array) else {
        return Parsed::new(Outcome::Transient)
            .with_message("response has no content array (not a Messages API reply?)");
    };
    let text: String = content
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    let usage = v.get("usage");
    let tokens = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let stop_reason = v.get("stop_reason").and_then(Value::as_str);
    let finish_reason = stop_reason.and_then(finish_reason);
    let refusal = (finish_reason == Some(FinishReason::Refusal)).then(|| refusal_text(v, &text));
    let parsed = Parsed::new(Outcome::Success {
        text,
        usage: Usage {
            input_tokens: tokens("input_tokens"),
            output_tokens: tokens("output_tokens"),
        },
        finish_reason,
        refusal,
    });
    match stop_reason {
        Some("pause_turn") => parsed.with_message(PAUSE_TURN_MESSAGE),
        Some(other) if finish_reason.is_none() => {
            parsed.with_message(format!("unknown stop_reason {:?}", clean_message(other)))
        }
        _ => parsed,
    }
}

/// Said with a `pause_turn` answer, which is reported as `length`.
const PAUSE_TURN_MESSAGE: &str =
    "stop_reason pause_turn: a server-tool loop paused the turn before its end; \
     send the assistant content back to continue it";

/// Said as the refusal when the answer carries no explanation and no text.
pub const REFUSAL_FALLBACK: &str = "The model declined to answer (stop_reason: refusal).";

/// Anthropic `stop_reason` → the normalized finish reason, per
/// <https://platform.claude.com/docs/en/build-with-claude/handling-stop-reasons>.
/// `None` for a value the docs do not list (never reported as `stop`).
pub fn finish_reason(stop_reason: &str) -> Option<FinishReason> {
    Some(match stop_reason {
        // "the model reached a natural stopping point" / "one of your
        // provided custom stop_sequences was generated".
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        // "we exceeded the requested max_tokens or the model's maximum" /
        // "The response filled the model's context window. Treat the
        // response as truncated."
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        // "A server-tool loop reached its iteration limit. Send the assistant
        // content back to continue." The answer is incomplete, cut by a
        // limit, and continuing it is the producer's call (llmq does not
        // replay a turn): reported as `length`, never as `stop`.
        "pause_turn" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        // "when streaming classifiers intervene to handle potential policy
        // violations".
        "refusal" => FinishReason::Refusal,
        _ => return None,
    })
}

/// The refusal text of a `stop_reason: "refusal"` answer: the documented
/// `stop_details.explanation`, else the text the model wrote before it
/// stopped, else [`REFUSAL_FALLBACK`].
fn refusal_text(v: &Value, text: &str) -> String {
    let explanation = v
        .pointer("/stop_details/explanation")
        .and_then(Value::as_str)
        .map(clean_message)
        .filter(|e| !e.is_empty());
    match explanation {
        Some(e) => e,
        None if !text.trim().is_empty() => text.to_string(),
        None => REFUSAL_FALLBACK.to_string(),
    }
}

/// An error response (or a 2xx whose body is an error object).
fn error(resp: &HttpResponse, body: Option<&Value>) -> Parsed {
    let err = body.and_then(|b| b.get("error"));
    let kind = err
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(clean_message)
        .unwrap_or_else(|| format!("HTTP {}", resp.status));
    let lower = message.to_ascii_lowercase();
    let error_code = err
        .and_then(|e| e.get("details"))
        .and_then(|d| d.get("error_code"))
        .and_then(Value::as_str)
        .unwrap_or("");

    let outcome = if is_quota_message(&lower)
        || error_code == "enforced_spend_limit_reached"
        || kind == "billing_error"
        || resp.status == 402
    {
        Outcome::QuotaExhausted {
            reset: regain_access_at(&message).map(|unix_ms| QuotaReset::At { unix_ms }),
            scope: QuotaScope::Key,
        }
    } else if is_context_message(&lower) {
        Outcome::ContextTooLong
    } else {
        match (resp.status, kind) {
            (429, _) | (_, "rate_limit_error") => Outcome::RateLimited {
                retry_after_ms: retry_hint(resp),
            },
            (529, _) | (_, "overloaded_error") | (_, "api_error") | (_, "timeout_error") => {
                Outcome::Transient
            }
            (401, _) | (403, _) | (_, "authentication_error") | (_, "permission_error") => {
                Outcome::AuthFailed
            }
            (404, _) | (_, "not_found_error") => Outcome::ModelNotFound,
            (408, _) | (409, _) | (500..=599, _) => Outcome::Transient,
            // 400, 413 `request_too_large`, 422 and any other 4xx.
            (400..=499, _) => Outcome::InvalidRequest,
            // 1xx/3xx or a 2xx error object: nothing we can act on but retry.
            _ => Outcome::Transient,
        }
    };
    Parsed::new(outcome).with_message(message)
}

/// No credit left, or a spend limit reached: waiting a minute will not help.
fn is_quota_message(lower: &str) -> bool {
    lower.contains("credit balance is too low")
        || lower.contains("reached your specified api usage limits")
        || lower.contains("reached your specified workspace api usage limits")
        || lower.contains("you have reached your api usage limits")
}

/// When a spend limit lifts, as its message states it: "You will regain
/// access on 2026-09-01 at 00:00 UTC." (the tier's monthly cap, and the spend
/// limits set in the Console, per
/// <https://platform.claude.com/docs/en/api/rate-limits>), in Unix ms.
pub fn regain_access_at(message: &str) -> Option<u64> {
    const PHRASE: &str = "regain access on ";
    let lower = message.to_ascii_lowercase();
    let rest = &message[lower.find(PHRASE)? + PHRASE.len()..];
    let mut words = rest.split_whitespace();
    let date = words.next()?;
    if words.next()? != "at" {
        return None;
    }
    let time = words.next()?;
    let zone = words.next()?.trim_end_matches(['.', ',', ';']);
    if !zone.eq_ignore_ascii_case("UTC") || time.len() != 5 {
        return None;
    }
    parse_rfc3339_ms(&format!("{date}T{time}:00Z"))
}

/// The prompt (plus `max_tokens`) does not fit the model's context window.
fn is_context_message(lower: &str) -> bool {
    lower.contains("prompt is too long")
        || (lower.contains("exceed context limit") && lower.contains("max_tokens"))
}

/// How long to wait after a 429: `retry-after-ms`, then `retry-after`
/// (seconds), then the latest reset among the rate-limit families whose
/// remaining count is 0. `None` when the response gives no hint.
pub fn retry_hint(resp: &HttpResponse) -> Option<u64> {
    retry_after_headers_ms(resp).or_else(|| {
        FAMILIES
            .iter()
            .filter_map(|f| family(resp, f))
            .filter(|f| f.remaining == Some(0))
            .filter_map(|f| f.reset_ms)
            .max()
    })
}

/// The `anthropic-ratelimit-<family>-*` header families.
const FAMILIES: [&str; 4] = ["requests", "tokens", "input-tokens", "output-tokens"];

/// One header family: `-limit`, `-remaining`, `-reset` (as ms from now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Family {
    limit: Option<u64>,
    remaining: Option<u64>,
    reset_ms: Option<u64>,
}

fn family(resp: &HttpResponse, name: &str) -> Option<Family> {
    let h = |suffix: &str| resp.header(&format!("anthropic-ratelimit-{name}-{suffix}"));
    let f = Family {
        limit: h("limit").and_then(parse_u64),
        remaining: h("remaining").and_then(parse_u64),
        reset_ms: h("reset").and_then(|v| reset_in_ms(v, resp.received_at_unix_ms)),
    };
    (f.limit.is_some() || f.remaining.is_some() || f.reset_ms.is_some()).then_some(f)
}

/// An RFC 3339 reset instant as milliseconds after `received_at_unix_ms`
/// (0 when already past). `None` when the arrival time is unknown (0) or the
/// value does not parse.
pub fn reset_in_ms(value: &str, received_at_unix_ms: u64) -> Option<u64> {
    if received_at_unix_ms == 0 {
        return None;
    }
    parse_rfc3339_ms(value).map(|at| at.saturating_sub(received_at_unix_ms))
}

/// The limits in the headers. Tokens come from the combined `tokens` family
/// when present, else from whichever of `input-tokens` / `output-tokens` is
/// closer to exhaustion (the binding one), input on a tie.
pub fn observed_limits(resp: &HttpResponse) -> ObservedLimits {
    let requests = family(resp, "requests");
    let tokens = family(resp, "tokens").or_else(|| {
        match (family(resp, "input-tokens"), family(resp, "output-tokens")) {
            (Some(i), Some(o)) => Some(if fill(&o) < fill(&i) { o } else { i }),
            (i, o) => i.or(o),
        }
    });
    ObservedLimits {
        requests_limit: requests.and_then(|f| f.limit),
        requests_remaining: requests.and_then(|f| f.remaining),
        requests_reset_ms: requests.and_then(|f| f.reset_ms),
        tokens_limit: tokens.and_then(|f| f.limit),
        tokens_remaining: tokens.and_then(|f| f.remaining),
        tokens_reset_ms: tokens.and_then(|f| f.reset_ms),
    }
}

/// Fraction of the family still available (1.0 when unknown).
fn fill(f: &Family) -> f64 {
    match (f.remaining, f.limit) {
        (Some(r), Some(l)) if l > 0 => r as f64 / l as f64,
        (Some(0), _) => 0.0,
        _ => 1.0,
    }
}

/// The upstream message, with anything that looks like an API key masked
/// and cut to a sane length.
pub fn clean_message(msg: &str) -> String {
    truncate_message(&mask_keys(msg.trim(), &[KEY_PREFIX]), MAX_MESSAGE_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.into(),
            received_at_unix_ms: 1_714_564_800_000, // 2024-05-01T12:00:00Z
        }
    }

    #[test]
    fn keys_in_messages_are_masked() {
        assert_eq!(
            clean_message(" bad key sk-ant-api03-test-fake-fake-1234, try again\n"),
            "bad key sk-ant-…1234, try again"
        );
        assert_eq!(clean_message("no key here"), "no key here");
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE_CHARS + 10);
        let cleaned = clean_message(&long);
        assert_eq!(cleaned.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(cleaned.ends_with('…'));
    }

    #[test]
    fn reset_is_relative_to_arrival_and_never_negative() {
        assert_eq!(
            reset_in_ms("2024-05-01T12:00:30Z", 1_714_564_800_000),
            Some(30_000)
        );
        assert_eq!(
            reset_in_ms("2024-05-01T11:59:00Z", 1_714_564_800_000),
            Some(0)
        );
        assert_eq!(reset_in_ms("2024-05-01T12:00:30Z", 0), None);
        assert_eq!(reset_in_ms("soon", 1_714_564_800_000), None);
    }

    #[test]
    fn retry_after_ms_wins_over_seconds_and_resets() {
        let r = resp(
            429,
            &[
                ("retry-after-ms", "1500"),
                ("retry-after", "9"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2024-05-01T12:00:30Z"),
            ],
            "",
        );
        assert_eq!(retry_hint(&r), Some(1_500));
    }

    #[test]
    fn retry_hint_takes_the_latest_exhausted_family() {
        let r = resp(
            429,
            &[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2024-05-01T12:00:10Z"),
                ("anthropic-ratelimit-output-tokens-remaining", "0"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2024-05-01T12:00:40Z",
                ),
                ("anthropic-ratelimit-input-tokens-remaining", "500"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2024-05-01T12:00:50Z",
                ),
            ],
            "",
        );
        assert_eq!(retry_hint(&r), Some(40_000));
    }

    #[test]
    fn split_token_families_report_the_binding_one() {
        let r = resp(
            200,
            &[
                ("anthropic-ratelimit-input-tokens-limit", "80000"),
                ("anthropic-ratelimit-input-tokens-remaining", "60000"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2024-05-01T12:00:05Z",
                ),
                ("anthropic-ratelimit-output-tokens-limit", "16000"),
                ("anthropic-ratelimit-output-tokens-remaining", "2000"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2024-05-01T12:00:20Z",
                ),
            ],
            "",
        );
        let l = observed_limits(&r);
        assert_eq!(l.tokens_limit, Some(16_000));
        assert_eq!(l.tokens_remaining, Some(2_000));
        assert_eq!(l.tokens_reset_ms, Some(20_000));
        assert_eq!(l.requests_limit, None);
    }

    #[test]
    fn an_error_object_in_a_2xx_is_not_a_success() {
        let p = parse(&resp(
            200,
            &[],
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ));
        assert_eq!(p.outcome, Outcome::Transient);
        assert_eq!(p.message.as_deref(), Some("Overloaded"));
    }

    #[test]
    fn the_regain_access_date_is_read_from_the_message() {
        assert_eq!(
            regain_access_at("You have reached your specified API usage limits. You will regain access on 2024-06-01 at 00:00 UTC."),
            Some(1_717_200_000_000)
        );
        assert_eq!(
            regain_access_at("… You Will Regain Access On 2026-09-01 at 00:00 UTC"),
            Some(1_788_220_800_000)
        );
        // No date, another zone or a broken date: no reset time.
        assert_eq!(regain_access_at("Your credit balance is too low"), None);
        assert_eq!(
            regain_access_at("regain access on 2024-06-01 at 00:00 PST."),
            None
        );
        assert_eq!(
            regain_access_at("regain access on 2024-13-01 at 00:00 UTC."),
            None
        );
        assert_eq!(regain_access_at("regain access on soon"), None);
    }

    #[test]
    fn every_documented_stop_reason_has_a_finish_reason_and_none_else() {
        use FinishReason as F;
        for (reason, want) in [
            ("end_turn", F::Stop),
            ("stop_sequence", F::Stop),
            ("max_tokens", F::Length),
            ("model_context_window_exceeded", F::Length),
            ("pause_turn", F::Length),
            ("tool_use", F::ToolCalls),
            ("refusal", F::Refusal),
        ] {
            assert_eq!(finish_reason(reason), Some(want), "{reason}");
        }
        assert_eq!(finish_reason("something_new"), None);
    }

    #[test]
    fn an_unknown_stop_reason_is_no_finish_reason_and_is_named() {
        let p = parse(&resp(
            200,
            &[],
            r#"{"type":"message","content":[{"type":"text","text":"hi"}],"stop_reason":"something_new","usage":{"input_tokens":1,"output_tokens":1}}"#,
        ));
        match p.outcome {
            Outcome::Success { finish_reason, .. } => assert_eq!(finish_reason, None),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.message.as_deref(),
            Some("unknown stop_reason \"something_new\"")
        );
    }

    #[test]
    fn json_without_content_is_transient() {
        let p = parse(&resp(200, &[], r#"{"id":"msg_1"}"#));
        assert_eq!(p.outcome, Outcome::Transient);
    }
}
