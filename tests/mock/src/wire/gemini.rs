//! Google Gemini: `POST /gemini/v1beta/models/{model}:generateContent`, key
//! in `x-goog-api-key` (or `?key=`), google.rpc-style error bodies
//! (`{"error":{code,message,status,details}}`) with `RetryInfo`,
//! `QuotaFailure` and `ErrorInfo` details. Gemini sends no rate-limit headers.

use super::{
    max_tokens_or_default, retry_hint, text_part, u64_field, Estimate, Parsed, PartTokens, Reply,
    ServerError, Wire, WireResponse,
};
use crate::config::Protocol;
use crate::limiter::{Dim, Rejection, Snapshot};
use axum::http::HeaderMap;
use serde_json::{json, Value};

pub(crate) struct Gemini;

const SERVICE: &str = "generativelanguage.googleapis.com";

fn error(status: u16, rpc_status: &str, message: &str, details: Vec<Value>) -> WireResponse {
    let mut err = json!({"code": status, "message": message, "status": rpc_status});
    if !details.is_empty() {
        err["details"] = Value::Array(details);
    }
    WireResponse::json(status, &json!({ "error": err }))
}

fn invalid_argument(message: &str) -> WireResponse {
    error(400, "INVALID_ARGUMENT", message, Vec::new())
}

/// The 404 for a path that is not `{model}:generateContent`.
pub(crate) fn unknown_method(model_action: &str) -> WireResponse {
    error(
        404,
        "NOT_FOUND",
        &format!(
            "Method not found: models/{model_action}. Only generateContent is served by this mock."
        ),
        Vec::new(),
    )
}

/// A part or a `systemInstruction`/`contents[]` entry field, in either JSON casing.
fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake))
}

fn parts(content: &Value) -> Vec<PartTokens> {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .map(|p| {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        text_part(t)
                    } else if field(p, "inlineData", "inline_data").is_some()
                        || field(p, "fileData", "file_data").is_some()
                    {
                        PartTokens::Image
                    } else {
                        PartTokens::Other
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn text(content: &Value) -> String {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// The period of a Gemini free-tier requests quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuotaPeriod {
    Minute,
    Day,
}

/// Gemini's 429 `RESOURCE_EXHAUSTED` for a free-tier requests quota of one
/// model, with the details real answers carry (in their order: `Help`,
/// `QuotaFailure`, `RetryInfo`). The per-day `quotaId` names the period
/// (`PerDay`) and `quotaDimensions` the model: the quota is per project and
/// per model and resets at midnight Pacific
/// (<https://ai.google.dev/gemini-api/docs/rate-limits>,
/// <https://ai.google.dev/gemini-api/docs/troubleshooting>). Real per-day
/// answers still carry a short `RetryInfo`, which does not mean the quota
/// is back by then.
pub(crate) fn quota_exhausted(
    model: &str,
    period: QuotaPeriod,
    limit: u64,
    retry_ms: u64,
) -> WireResponse {
    let metric = "generativelanguage.googleapis.com/generate_content_free_tier_requests";
    let quota_id = match period {
        QuotaPeriod::Minute => "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        QuotaPeriod::Day => "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    };
    let message = format!(
        "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, head to: https://ai.dev/rate-limit. \n* Quota exceeded for metric: {metric}, limit: {limit}, model: {model}\nPlease retry in {}.{:03}s.",
        retry_ms / 1000,
        retry_ms % 1000
    );
    error(
        429,
        "RESOURCE_EXHAUSTED",
        &message,
        vec![
            json!({
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [{
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }],
            }),
            json!({
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{
                    "quotaMetric": metric,
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": limit.to_string(),
                }],
            }),
            json!({
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": format!("{}s", crate::format::ms_to_secs_ceil(retry_ms)),
            }),
        ],
    )
}

impl Wire for Gemini {
    const PROTOCOL: Protocol = Protocol::Gemini;

    fn parse(
        _id: u64,
        body: &[u8],
        _headers: &HeaderMap,
        path_model: Option<&str>,
    ) -> Result<Parsed, Box<WireResponse>> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|_| invalid_argument("Invalid JSON payload received. Unexpected token."))?;
        let contents = v
            .get("contents")
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                invalid_argument("* GenerateContentRequest.contents: contents is not specified\n")
            })?;
        let mut estimate = Estimate::default();
        if let Some(system) = field(&v, "systemInstruction", "system_instruction") {
            estimate.message(parts(system));
        }
        let mut last_user_text = String::new();
        for c in contents {
            estimate.message(parts(c));
            if matches!(c.get("role").and_then(Value::as_str), None | Some("user")) {
                last_user_text = text(c);
            }
        }
        let max_tokens = field(&v, "generationConfig", "generation_config")
            .and_then(|g| u64_field(field(g, "maxOutputTokens", "max_output_tokens")));
        Ok(Parsed {
            model: path_model.unwrap_or_default().to_owned(),
            prompt_tokens: estimate.tokens,
            max_tokens: max_tokens_or_default(max_tokens),
            last_user_text,
        })
    }

    fn success(id: u64, p: &Parsed, r: &Reply, _snap: &Snapshot) -> WireResponse {
        let body = json!({
            "candidates": [{
                "content": {"parts": [{"text": r.text}], "role": "model"},
                "finishReason": if r.truncated { "MAX_TOKENS" } else { "STOP" },
                "index": 0,
            }],
            "usageMetadata": {
                "promptTokenCount": p.prompt_tokens,
                "candidatesTokenCount": r.output_tokens,
                "totalTokenCount": p.prompt_tokens + r.output_tokens,
            },
            "modelVersion": p.model,
            "responseId": format!("mock{id:016x}"),
        });
        WireResponse::json(200, &body)
    }

    fn rate_limited(_id: u64, model: &str, rej: &Rejection, _snap: &Snapshot) -> WireResponse {
        let (secs, ms) = retry_hint(rej);
        let (metric, quota_id) = match rej.dim {
            Dim::Requests => (
                "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            ),
            Dim::Tokens => (
                "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
                "GenerateContentInputTokensPerModelPerMinute-FreeTier",
            ),
        };
        let message = format!(
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, head to: https://ai.dev/rate-limit. \n* Quota exceeded for metric: {metric}, limit: {}, model: {model}\nPlease retry in {}.{:03}s.",
            rej.limit,
            ms / 1000,
            ms % 1000
        );
        error(
            429,
            "RESOURCE_EXHAUSTED",
            &message,
            vec![
                json!({
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{
                        "quotaMetric": metric,
                        "quotaId": quota_id,
                        "quotaDimensions": {"location": "global", "model": model},
                        "quotaValue": rej.limit.to_string(),
                    }],
                }),
                json!({
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [{
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }],
                }),
                json!({
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": format!("{secs}s"),
                }),
            ],
        )
    }

    fn missing_key(_id: u64) -> WireResponse {
        error(
            403,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            Vec::new(),
        )
    }

    fn invalid_key(_id: u64, _masked: &str) -> WireResponse {
        let message = "API key not valid. Please pass a valid API key.";
        error(
            400,
            "INVALID_ARGUMENT",
            message,
            vec![
                json!({
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": SERVICE},
                }),
                json!({
                    "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                    "locale": "en-US",
                    "message": message,
                }),
            ],
        )
    }

    /// Billing exhausted: Gemini's prepaid-credit answer, a 429
    /// RESOURCE_EXHAUSTED without `RetryInfo` (waiting does not help).
    fn no_credit(_id: u64) -> WireResponse {
        error(
            429,
            "RESOURCE_EXHAUSTED",
            "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage your project and billing.",
            Vec::new(),
        )
    }

    fn suspended(_id: u64, masked: &str) -> WireResponse {
        error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission denied: Consumer 'api_key:{masked}' has been suspended."),
            vec![json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "CONSUMER_SUSPENDED",
                "domain": "googleapis.com",
                "metadata": {"service": SERVICE, "consumer": "projects/mock"},
            })],
        )
    }

    fn model_not_found(_id: u64, model: &str) -> WireResponse {
        error(
            404,
            "NOT_FOUND",
            &format!("models/{model} is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods."),
            Vec::new(),
        )
    }

    fn context_too_long(_id: u64, p: &Parsed, limit: u64) -> WireResponse {
        invalid_argument(&format!(
            "The input token count ({}) exceeds the maximum number of tokens allowed ({limit}).",
            p.charge()
        ))
    }

    fn server_error(_id: u64, e: ServerError) -> WireResponse {
        match e {
            ServerError::Internal => error(
                500,
                "INTERNAL",
                "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
                Vec::new(),
            ),
            ServerError::Unavailable | ServerError::Overloaded => error(
                503,
                "UNAVAILABLE",
                "The model is overloaded. Please try again later.",
                Vec::new(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_instruction_contents_and_images() {
        let body = br#"{"systemInstruction":{"parts":[{"text":"abcdefgh"}]},
            "contents":[{"role":"user","parts":[{"text":"abc"},{"inline_data":{"mime_type":"image/png","data":"AA=="}}]}],
            "generationConfig":{"maxOutputTokens":10}}"#;
        let p = Gemini::parse(1, body, &HeaderMap::new(), Some("gemini-2.0-flash")).unwrap();
        assert_eq!(p.prompt_tokens, 4 + 2 + 4 + 1 + 85);
        assert_eq!((p.max_tokens, p.model.as_str()), (10, "gemini-2.0-flash"));
        assert_eq!(p.last_user_text, "abc");
        let e = Gemini::parse(1, br#"{"contents":[]}"#, &HeaderMap::new(), Some("m")).unwrap_err();
        assert_eq!(e.status, 400);
    }
}
