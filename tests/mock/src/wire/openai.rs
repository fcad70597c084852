//! OpenAI chat completions: `POST /openai/v1/chat/completions`, key in
//! `Authorization: Bearer`, `x-ratelimit-*` headers with Go-style reset
//! durations, and `{"error":{message,type,param,code}}` error bodies.

use super::{
    content_parts, content_text, max_tokens_or_default, retry_hint, u64_field, Estimate, Parsed,
    Reply, ServerError, Wire, WireResponse,
};
use crate::config::Protocol;
use crate::format::{go_duration, ns_to_ms_ceil, unix_ms_now};
use crate::limiter::{Dim, Rejection, Snapshot};
use axum::http::HeaderMap;
use serde_json::{json, Value};

pub(crate) struct OpenAi;

fn error(
    id: u64,
    status: u16,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> WireResponse {
    WireResponse::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
    .header("x-request-id", request_id(id))
}

fn request_id(id: u64) -> String {
    format!("req_mock{id:016x}")
}

fn invalid_request(
    id: u64,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> WireResponse {
    error(id, 400, message, "invalid_request_error", param, code)
}

fn with_limits(mut r: WireResponse, snap: &Snapshot) -> WireResponse {
    if let Some(d) = snap.requests {
        r = r
            .header("x-ratelimit-limit-requests", d.limit)
            .header("x-ratelimit-remaining-requests", d.remaining)
            .header(
                "x-ratelimit-reset-requests",
                go_duration(ns_to_ms_ceil(d.reset_ns)),
            );
    }
    if let Some(d) = snap.tokens {
        r = r
            .header("x-ratelimit-limit-tokens", d.limit)
            .header("x-ratelimit-remaining-tokens", d.remaining)
            .header(
                "x-ratelimit-reset-tokens",
                go_duration(ns_to_ms_ceil(d.reset_ns)),
            );
    }
    r
}

/// Groq's 413 for a request larger than the key's tokens-per-minute limit,
/// as Groq's OpenAI-compatible API sends it (error docs:
/// <https://console.groq.com/docs/errors>, limits:
/// <https://console.groq.com/docs/rate-limits>): `type` `tokens`, `code`
/// `rate_limit_exceeded`, no `param`. Waiting does not help: the request
/// alone is above the limit.
pub(crate) fn groq_tpm_413(id: u64, model: &str, limit: u64, requested: u64) -> WireResponse {
    let message = format!(
        "Request too large for model `{model}` in organization `org_01mockmockmockmockmockmock` service tier `on_demand` on tokens per minute (TPM): Limit {limit}, Requested {requested}, please reduce your message size and try again. Visit https://console.groq.com/docs/rate-limits for more information."
    );
    WireResponse::json(
        413,
        &json!({"error": {"message": message, "type": "tokens", "code": "rate_limit_exceeded"}}),
    )
    .header("x-request-id", request_id(id))
}

impl Wire for OpenAi {
    const PROTOCOL: Protocol = Protocol::OpenAi;

    fn parse(
        id: u64,
        body: &[u8],
        _headers: &HeaderMap,
        _path_model: Option<&str>,
    ) -> Result<Parsed, Box<WireResponse>> {
        let v: Value = serde_json::from_slice(body).map_err(|_| {
            invalid_request(
                id,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
                None,
                None,
            )
        })?;
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| invalid_request(id, "you must provide a model parameter", None, None))?;
        let messages = v.get("messages").and_then(Value::as_array).ok_or_else(|| {
            invalid_request(
                id,
                "Missing required parameter: 'messages'.",
                Some("messages"),
                Some("missing_required_parameter"),
            )
        })?;
        if messages.is_empty() {
            return Err(Box::new(invalid_request(
                id,
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages"),
                Some("empty_array"),
            )));
        }
        let mut estimate = Estimate::default();
        let mut last_user_text = String::new();
        for m in messages {
            let content = m.get("content");
            estimate.message(content_parts(content, "image_url"));
            if m.get("role").and_then(Value::as_str) == Some("user") {
                last_user_text = content_text(content);
            }
        }
        let max_tokens =
            u64_field(v.get("max_completion_tokens")).or_else(|| u64_field(v.get("max_tokens")));
        Ok(Parsed {
            model: model.to_owned(),
            prompt_tokens: estimate.tokens,
            max_tokens: max_tokens_or_default(max_tokens),
            last_user_text,
        })
    }

    fn success(id: u64, p: &Parsed, r: &Reply, snap: &Snapshot) -> WireResponse {
        let body = json!({
            "id": format!("chatcmpl-mock{id:016x}"),
            "object": "chat.completion",
            "created": unix_ms_now() / 1000,
            "model": p.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": r.text, "refusal": null},
                "logprobs": null,
                "finish_reason": if r.truncated { "length" } else { "stop" },
            }],
            "usage": {
                "prompt_tokens": p.prompt_tokens,
                "completion_tokens": r.output_tokens,
                "total_tokens": p.prompt_tokens + r.output_tokens,
            },
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        });
        with_limits(WireResponse::json(200, &body), snap).header("x-request-id", request_id(id))
    }

    fn rate_limited(id: u64, model: &str, rej: &Rejection, snap: &Snapshot) -> WireResponse {
        let (secs, ms) = retry_hint(rej);
        let (unit, kind) = match rej.dim {
            Dim::Requests => ("requests per min (RPM)", "requests"),
            Dim::Tokens => ("tokens per min (TPM)", "tokens"),
        };
        let message = if rej.too_large {
            format!(
                "Request too large for {model} in organization org-mock on {unit}: Limit {}, Requested {}. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
                rej.limit, rej.requested
            )
        } else {
            format!(
                "Rate limit reached for {model} in organization org-mock on {unit}: Limit {}, Used {}, Requested {}. Please try again in {}. Visit https://platform.openai.com/account/rate-limits to learn more.",
                rej.limit,
                rej.used,
                rej.requested,
                go_duration(ms)
            )
        };
        with_limits(
            error(id, 429, &message, kind, None, Some("rate_limit_exceeded")),
            snap,
        )
        .header("retry-after", secs)
        .header("retry-after-ms", ms)
    }

    fn missing_key(id: u64) -> WireResponse {
        error(
            id,
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        )
    }

    fn invalid_key(id: u64, masked: &str) -> WireResponse {
        error(
            id,
            401,
            &format!("Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        )
    }

    fn no_credit(id: u64) -> WireResponse {
        error(
            id,
            429,
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            None,
            Some("insufficient_quota"),
        )
    }

    fn suspended(id: u64, _masked: &str) -> WireResponse {
        error(
            id,
            401,
            "This key is associated with a deactivated account. If you feel this is an error, contact us through our help center at help.openai.com.",
            "invalid_request_error",
            None,
            Some("account_deactivated"),
        )
    }

    fn model_not_found(id: u64, model: &str) -> WireResponse {
        error(
            id,
            404,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        )
    }

    fn context_too_long(id: u64, p: &Parsed, limit: u64) -> WireResponse {
        invalid_request(
            id,
            &format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
                p.charge(),
                p.prompt_tokens,
                p.max_tokens
            ),
            Some("messages"),
            Some("context_length_exceeded"),
        )
    }

    fn server_error(id: u64, e: ServerError) -> WireResponse {
        match e {
            ServerError::Internal => error(
                id,
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
                None,
            ),
            ServerError::Unavailable | ServerError::Overloaded => error(
                id,
                503,
                "The server is overloaded or not ready yet.",
                "server_error",
                None,
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_matches_the_sdk_formula() {
        let body = br#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[
            {"role":"system","content":"abcdefgh"},
            {"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"u"}}]}]}"#;
        let p = OpenAi::parse(1, body, &HeaderMap::new(), None).unwrap();
        assert_eq!(p.prompt_tokens, 4 + 2 + 4 + 1 + 85);
        assert_eq!(p.charge(), 96 + 10);
        assert_eq!(p.last_user_text, "abc");
        let p = OpenAi::parse(
            1,
            br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            &HeaderMap::new(),
            None,
        )
        .unwrap();
        assert_eq!(p.max_tokens, 256);
    }

    #[test]
    fn bad_requests_get_openai_errors() {
        for body in [
            &b"nope"[..],
            br#"{"messages":[]}"#,
            br#"{"model":"m"}"#,
            br#"{"model":"m","messages":[]}"#,
        ] {
            let e = OpenAi::parse(1, body, &HeaderMap::new(), None).unwrap_err();
            assert_eq!(e.status, 400);
            let v: Value = serde_json::from_slice(&e.body).unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error");
        }
    }
}
