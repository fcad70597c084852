//! `prepare`: a canonical [`PrepareInput`] → the `POST {base_url}/chat/completions`
//! request of the OpenAI chat-completions API.
//!
//! Provider options read here (all optional):
//! - `max_tokens_field`: `"max_tokens"` (default) or `"max_completion_tokens"`
//!   (newer OpenAI models refuse `max_tokens`);
//! - `headers`: an object of extra headers, sent as given (a same-named
//!   default header is replaced);
//! - `http_referer`, `x_title`: OpenRouter's attribution headers, sent only
//!   for the provider named `openrouter`.
//!
//! The API key goes into `authorization: Bearer …` and nowhere else; no error
//! produced here ever contains it.

use llmq_sdk::prepare::f32_to_f64;
use llmq_sdk::{ChatRequest, HttpRequest, PluginError, PrepareInput, ProviderInfo};
use serde_json::{json, Map, Value};

/// Path appended to the provider's base URL.
pub const CHAT_PATH: &str = "/chat/completions";

/// Builds the HTTP request for one chat completion.
pub fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
    let url = chat_url(&input.provider.base_url)?;
    let body = body(&input.request, &input.provider)?;
    let headers = headers(input)?;
    let body = serde_json::to_string(&body)
        .map_err(|e| PluginError::new(format!("cannot encode the request body: {e}")))?;
    Ok(HttpRequest {
        method: "POST".into(),
        url,
        headers,
        body,
    })
}

/// `{base_url}/chat/completions`; refuses anything but an http(s) URL.
pub fn chat_url(base_url: &str) -> Result<String, PluginError> {
    let base = base_url.trim();
    let lower = base.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => {}
        _ => {
            return Err(PluginError::new(format!(
                "base_url {base:?} is not an http(s) URL"
            )))
        }
    }
    if base.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PluginError::new(format!(
            "base_url {base:?} contains whitespace"
        )));
    }
    let base = base.trim_end_matches('/');
    if base.ends_with(CHAT_PATH) {
        // Someone configured the full endpoint: use it as is.
        Ok(base.to_string())
    } else {
        Ok(format!("{base}{CHAT_PATH}"))
    }
}

/// The JSON body of a non-streaming chat completion.
pub fn body(req: &ChatRequest, provider: &ProviderInfo) -> Result<Value, PluginError> {
    if req.model.trim().is_empty() {
        return Err(PluginError::new("the request names no model"));
    }
    if req.messages.is_empty() {
        return Err(PluginError::new("the request has no messages"));
    }
    let messages = serde_json::to_value(&req.messages)
        .map_err(|e| PluginError::new(format!("cannot encode the messages: {e}")))?;
    let mut body = Map::new();
    body.insert("model".into(), Value::String(req.model.clone()));
    body.insert("messages".into(), messages);
    if let Some(max) = req.max_tokens {
        body.insert(max_tokens_field(provider)?.into(), json!(max));
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), temperature(t)?);
    }
    if req.json {
        body.insert("response_format".into(), json!({"type": "json_object"}));
    }
    Ok(Value::Object(body))
}

/// Which field carries the output-token cap for this provider.
fn max_tokens_field(provider: &ProviderInfo) -> Result<&'static str, PluginError> {
    match provider.options.get("max_tokens_field") {
        None | Some(Value::Null) => Ok("max_tokens"),
        Some(Value::String(s)) if s == "max_tokens" => Ok("max_tokens"),
        Some(Value::String(s)) if s == "max_completion_tokens" => Ok("max_completion_tokens"),
        Some(other) => Err(PluginError::new(format!(
            "option max_tokens_field must be \"max_tokens\" or \"max_completion_tokens\", got {other}"
        ))),
    }
}

/// An `f32` temperature as the decimal the producer wrote (0.7, not
/// 0.699999988079071).
fn temperature(t: f32) -> Result<Value, PluginError> {
    serde_json::Number::from_f64(f32_to_f64(t))
        .map(Value::Number)
        .ok_or_else(|| PluginError::new(format!("temperature {t} is not a finite number")))
}

/// Default headers, the bearer key, OpenRouter attribution and `options.headers`.
fn headers(input: &PrepareInput) -> Result<Vec<(String, String)>, PluginError> {
    let mut headers: Vec<(String, String)> =
        vec![("content-type".into(), "application/json".into())];
    if let Some(key) = input.api_key.as_deref().map(str::trim) {
        if key.chars().any(|c| c.is_control()) {
            return Err(PluginError::new(
                "the API key contains control characters and cannot be sent in a header",
            ));
        }
        if !key.is_empty() {
            headers.push(("authorization".into(), format!("Bearer {key}")));
        }
    }
    let options = &input.provider.options;
    if input.provider.name.eq_ignore_ascii_case("openrouter") {
        for (keys, header) in [
            (["http_referer", "HTTP-Referer"], "HTTP-Referer"),
            (["x_title", "X-Title"], "X-Title"),
        ] {
            if let Some(v) = keys.iter().find_map(|k| options.get(*k)) {
                let v = header_value(header, v)?;
                set_header(&mut headers, header, v);
            }
        }
    }
    match options.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(extra)) => {
            for (name, value) in extra {
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(PluginError::new(format!(
                        "options.headers: {name:?} is not a valid header name"
                    )));
                }
                let value = header_value(name, value)?;
                set_header(&mut headers, name, value);
            }
        }
        Some(_) => {
            return Err(PluginError::new(
                "options.headers must be an object of header names to values",
            ))
        }
    }
    Ok(headers)
}

/// A header value from a JSON option: strings, numbers and booleans.
/// The value itself is never echoed in the error (it may be a secret).
fn header_value(name: &str, v: &Value) -> Result<String, PluginError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            return Err(PluginError::new(format!(
                "option for header {name} must be a string"
            )))
        }
    };
    if s.chars().any(|c| c.is_control()) {
        return Err(PluginError::new(format!(
            "option for header {name} contains control characters"
        )));
    }
    Ok(s)
}

/// Replaces a same-named header (case-insensitively) or appends it.
fn set_header(headers: &mut Vec<(String, String)>, name: &str, value: String) {
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    headers.push((name.to_string(), value));
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmq_sdk::{Content, Message};
    use std::collections::BTreeMap;

    fn input(name: &str, base_url: &str, key: Option<&str>) -> PrepareInput {
        PrepareInput {
            request: ChatRequest {
                model: "gpt-4o-mini".into(),
                messages: vec![Message {
                    role: "user".into(),
                    content: Content::Text("hi".into()),
                }],
                max_tokens: None,
                temperature: None,
                json: false,
            },
            api_key: key.map(String::from),
            provider: ProviderInfo {
                name: name.into(),
                base_url: base_url.into(),
                options: BTreeMap::new(),
            },
        }
    }

    fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
        req.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn url_joins_base_and_path_and_refuses_non_http() {
        assert_eq!(
            chat_url("https://api.groq.com/openai/v1/").unwrap(),
            "https://api.groq.com/openai/v1/chat/completions"
        );
        assert_eq!(
            chat_url("http://127.0.0.1:11434/v1").unwrap(),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert_eq!(
            chat_url("https://x.example/v1/chat/completions").unwrap(),
            "https://x.example/v1/chat/completions"
        );
        for bad in [
            "ftp://x/v1",
            "api.openai.com/v1",
            "",
            "https://",
            "file:///etc",
            "https://a b",
        ] {
            assert!(chat_url(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn temperature_keeps_the_decimal_the_producer_wrote() {
        let mut inp = input("openai", "https://api.openai.com/v1", None);
        inp.request.temperature = Some(0.7);
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(b["temperature"].as_f64(), Some(0.7));
        assert!(temperature(f32::NAN).is_err());
    }

    #[test]
    fn max_tokens_field_option_is_validated() {
        let mut inp = input("openai", "https://api.openai.com/v1", None);
        inp.request.max_tokens = Some(64);
        inp.provider
            .options
            .insert("max_tokens_field".into(), json!("max_output_tokens"));
        let err = prepare(&inp).unwrap_err();
        assert!(err.message.contains("max_tokens_field"), "{err}");
    }

    #[test]
    fn key_is_trimmed_and_empty_key_means_no_auth() {
        let req = prepare(&input(
            "groq",
            "https://api.groq.com/openai/v1",
            Some(" gsk_test_aaaa1111\n"),
        ))
        .unwrap();
        assert_eq!(
            header(&req, "authorization"),
            Some("Bearer gsk_test_aaaa1111")
        );
        let req = prepare(&input("ollama", "http://127.0.0.1:11434/v1", Some("  "))).unwrap();
        assert_eq!(header(&req, "authorization"), None);
    }

    #[test]
    fn bad_key_error_does_not_echo_the_key() {
        let err = prepare(&input(
            "openai",
            "https://api.openai.com/v1",
            Some("sk-test-aa\u{7}aa1111"),
        ))
        .unwrap_err();
        assert!(!err.message.contains("aa1111"), "{err}");
    }

    #[test]
    fn openrouter_headers_only_when_given_and_only_for_openrouter() {
        let mut inp = input(
            "openrouter",
            "https://openrouter.ai/api/v1",
            Some("sk-or-v1-test"),
        );
        let req = prepare(&inp).unwrap();
        assert_eq!(header(&req, "http-referer"), None);
        assert_eq!(header(&req, "x-title"), None);
        inp.provider
            .options
            .insert("http_referer".into(), json!("https://llmq.example"));
        inp.provider.options.insert("x_title".into(), json!("llmq"));
        let req = prepare(&inp).unwrap();
        assert_eq!(header(&req, "HTTP-Referer"), Some("https://llmq.example"));
        assert_eq!(header(&req, "X-Title"), Some("llmq"));
        inp.provider.name = "groq".into();
        let req = prepare(&inp).unwrap();
        assert_eq!(header(&req, "x-title"), None);
    }

    #[test]
    fn extra_headers_are_added_replace_defaults_and_are_validated() {
        let mut inp = input("vllm", "http://127.0.0.1:8000/v1", None);
        inp.provider.options.insert(
            "headers".into(),
            json!({"X-Org": "acme", "Content-Type": "application/json; charset=utf-8", "X-Retries": 2}),
        );
        let req = prepare(&inp).unwrap();
        assert_eq!(header(&req, "x-org"), Some("acme"));
        assert_eq!(header(&req, "x-retries"), Some("2"));
        assert_eq!(
            header(&req, "content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(
            req.headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                .count(),
            1
        );
        inp.provider
            .options
            .insert("headers".into(), json!({"bad name": "x"}));
        assert!(prepare(&inp).is_err());
        inp.provider.options.insert("headers".into(), json!(["x"]));
        assert!(prepare(&inp).is_err());
        inp.provider
            .options
            .insert("headers".into(), json!({"X-Nested": {"a": 1}}));
        assert!(prepare(&inp).is_err());
    }

    #[test]
    fn empty_model_is_refused() {
        let mut inp = input("openai", "https://api.openai.com/v1", None);
        inp.request.model = " ".into();
        assert!(prepare(&inp).is_err());
    }
}
