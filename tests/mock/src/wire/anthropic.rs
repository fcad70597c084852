//! Anthropic Messages: `POST /anthropic/v1/messages`, key in `x-api-key`,
//! `anthropic-version` and `max_tokens` required, `anthropic-ratelimit-*`
//! headers with RFC 3339 reset times, and
//! `{"type":"error","error":{type,message}}` error bodies.

use super::{
    content_parts, content_text, retry_hint, u64_field, Estimate, Parsed, Reply, ServerError, Wire,
    WireResponse,
};
use crate::config::Protocol;
use crate::format::{ns_to_ms_ceil, rfc3339_ms, unix_ms_now};
use crate::limiter::{Dim, Rejection, Snapshot};
use axum::http::HeaderMap;
use serde_json::{json, Value};

pub(crate) struct Anthropic;

fn request_id(id: u64) -> String {
    format!("req_mock{id:016x}")
}

fn error(id: u64, status: u16, kind: &str, message: &str) -> WireResponse {
    WireResponse::json(
        status,
        &json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": request_id(id),
        }),
    )
    .header("request-id", request_id(id))
}

fn invalid_request(id: u64, message: &str) -> WireResponse {
    error(id, 400, "invalid_request_error", message)
}

fn with_limits(mut r: WireResponse, snap: &Snapshot) -> WireResponse {
    let now = unix_ms_now();
    if let Some(d) = snap.requests {
        r = r
            .header("anthropic-ratelimit-requests-limit", d.limit)
            .header("anthropic-ratelimit-requests-remaining", d.remaining)
            .header(
                "anthropic-ratelimit-requests-reset",
                rfc3339_ms(now + ns_to_ms_ceil(d.reset_ns)),
            );
    }
    if let Some(d) = snap.tokens {
        r = r
            .header("anthropic-ratelimit-tokens-limit", d.limit)
            .header("anthropic-ratelimit-tokens-remaining", d.remaining)
            .header(
                "anthropic-ratelimit-tokens-reset",
                rfc3339_ms(now + ns_to_ms_ceil(d.reset_ns)),
            );
    }
    r
}

impl Wire for Anthropic {
    const PROTOCOL: Protocol = Protocol::Anthropic;

    fn parse(
        id: u64,
        body: &[u8],
        headers: &HeaderMap,
        _path_model: Option<&str>,
    ) -> Result<Parsed, Box<WireResponse>> {
        if !headers.contains_key("anthropic-version") {
            return Err(Box::new(invalid_request(
                id,
                "anthropic-version: header is required",
            )));
        }
        let v: Value = serde_json::from_slice(body).map_err(|_| {
            invalid_request(id, "There was an issue with the formatting or content of your request: the body is not valid JSON.")
        })?;
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_request(id, "model: Field required"))?;
        let max_tokens = u64_field(v.get("max_tokens"))
            .ok_or_else(|| invalid_request(id, "max_tokens: Field required"))?;
        let messages = v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid_request(id, "messages: Field required"))?;
        if messages.is_empty() {
            return Err(Box::new(invalid_request(
                id,
                "messages: at least one message is required",
            )));
        }
        let mut estimate = Estimate::default();
        if let Some(system) = v.get("system").filter(|s| !s.is_null()) {
            estimate.message(content_parts(Some(system), "image"));
        }
        let mut last_user_text = String::new();
        for m in messages {
            let content = m.get("content");
            estimate.message(content_parts(content, "image"));
            if m.get("role").and_then(Value::as_str) == Some("user") {
                last_user_text = content_text(content);
            }
        }
        Ok(Parsed {
            model: model.to_owned(),
            prompt_tokens: estimate.tokens,
            max_tokens,
            last_user_text,
        })
    }

    fn success(id: u64, p: &Parsed, r: &Reply, snap: &Snapshot) -> WireResponse {
        let body = json!({
            "id": format!("msg_mock{id:016x}"),
            "type": "message",
            "role": "assistant",
            "model": p.model,
            "content": [{"type": "text", "text": r.text}],
            "stop_reason": if r.truncated { "max_tokens" } else { "end_turn" },
            "stop_sequence": null,
            "usage": {"input_tokens": p.prompt_tokens, "output_tokens": r.output_tokens},
        });
        with_limits(WireResponse::json(200, &body), snap).header("request-id", request_id(id))
    }

    fn rate_limited(id: u64, _model: &str, rej: &Rejection, snap: &Snapshot) -> WireResponse {
        let (secs, _) = retry_hint(rej);
        let unit = match rej.dim {
            Dim::Requests => "requests",
            Dim::Tokens => "tokens",
        };
        let message = format!(
            "This request would exceed the rate limit for your organization (mock-org) of {} {unit} per minute. For details, refer to: https://docs.anthropic.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.",
            rej.limit
        );
        with_limits(error(id, 429, "rate_limit_error", &message), snap).header("retry-after", secs)
    }

    fn missing_key(id: u64) -> WireResponse {
        error(
            id,
            401,
            "authentication_error",
            "x-api-key header is required",
        )
    }

    fn invalid_key(id: u64, _masked: &str) -> WireResponse {
        error(id, 401, "authentication_error", "invalid x-api-key")
    }

    fn no_credit(id: u64) -> WireResponse {
        invalid_request(
            id,
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
        )
    }

    fn suspended(id: u64, _masked: &str) -> WireResponse {
        error(
            id,
            403,
            "permission_error",
            "This organization has been disabled.",
        )
    }

    fn model_not_found(id: u64, model: &str) -> WireResponse {
        error(id, 404, "not_found_error", &format!("model: {model}"))
    }

    fn context_too_long(id: u64, p: &Parsed, limit: u64) -> WireResponse {
        invalid_request(
            id,
            &format!(
                "prompt is too long: {} tokens > {limit} maximum",
                p.charge()
            ),
        )
    }

    fn server_error(id: u64, e: ServerError) -> WireResponse {
        match e {
            ServerError::Internal => error(id, 500, "api_error", "Internal server error"),
            ServerError::Unavailable => error(id, 503, "api_error", "Service unavailable"),
            ServerError::Overloaded => error(id, 529, "overloaded_error", "Overloaded"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versioned() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        h
    }

    #[test]
    fn system_counts_as_one_message() {
        let body = br#"{"model":"claude","max_tokens":10,"system":"abcdefgh",
            "messages":[{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image","source":{}}]}]}"#;
        let p = Anthropic::parse(1, body, &versioned(), None).unwrap();
        assert_eq!(p.prompt_tokens, 4 + 2 + 4 + 1 + 85);
        assert_eq!((p.max_tokens, p.last_user_text.as_str()), (10, "abc"));
    }

    #[test]
    fn version_and_max_tokens_are_required() {
        let ok = br#"{"model":"c","max_tokens":1,"messages":[{"role":"user","content":"x"}]}"#;
        let e = Anthropic::parse(1, ok, &HeaderMap::new(), None).unwrap_err();
        let v: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(
            v["error"]["message"],
            "anthropic-version: header is required"
        );
        let e = Anthropic::parse(
            1,
            br#"{"model":"c","messages":[{"role":"user","content":"x"}]}"#,
            &versioned(),
            None,
        )
        .unwrap_err();
        let v: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(
            (e.status.as_u16(), v["error"]["type"].as_str()),
            (400, Some("invalid_request_error"))
        );
        assert_eq!(v["error"]["message"], "max_tokens: Field required");
    }
}
