//! `prepare`: a canonical [`PrepareInput`] → the `POST {base_url}/chat/completions`
//! request of the OpenAI chat-completions API.
//!
//! Provider options read here (all optional):
//! - `max_tokens_field`: `"max_tokens"` or `"max_completion_tokens"`; when
//!   unset, OpenAI reasoning models get `max_completion_tokens` and every
//!   other model `max_tokens` (see [`reasoning_model`]);
//! - `reasoning_model`: `true` / `false` overrides the model-id detection
//!   (an Azure deployment named `prod-chat` that serves `o4-mini`);
//! - `headers`: an object of extra headers, sent as given (a same-named
//!   default header is replaced);
//! - `http_referer`, `x_title`: OpenRouter's attribution headers, sent only
//!   for the provider named `openrouter`.
//!
//! Nothing a model is documented to reject is sent:
//! - OpenAI reasoning models (the o-series and gpt-5) reject `max_tokens`
//!   ("not compatible with o-series models",
//!   <https://platform.openai.com/docs/api-reference/chat/create>) and any
//!   `temperature` other than the default 1 (400 `unsupported_value`,
//!   <https://platform.openai.com/docs/guides/reasoning>): the cap goes out
//!   as `max_completion_tokens`, a non-default temperature is dropped.
//! - JSON mode (`response_format: json_object`) needs the word "JSON" in the
//!   messages on OpenAI (400 otherwise,
//!   <https://platform.openai.com/docs/guides/structured-outputs#json-mode>) and
//!   Mistral and DeepSeek ask for it too
//!   (<https://docs.mistral.ai/capabilities/json_mode>,
//!   <https://api-docs.deepseek.com/guides/json_mode>):
//!   when no message says "JSON", [`JSON_INSTRUCTION`] is appended to the
//!   leading system message (or sent as one), as the anthropic plugin does;
//!   the producer's own text is never changed.
//!
//! The API key goes into `authorization: Bearer …` and nowhere else; no error
//! produced here ever contains it.

use llmq_sdk::prepare::f32_to_f64;
use llmq_sdk::{ChatRequest, HttpRequest, Message, PluginError, PrepareInput, ProviderInfo};
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

/// Added to the leading system message of a JSON job whose messages never
/// say "JSON" (OpenAI answers 400 without the word). Worded like the
/// anthropic plugin's instruction.
pub const JSON_INSTRUCTION: &str = "Respond with a single valid JSON object only: no prose before or after it and no Markdown code fences.";

/// The JSON body of a non-streaming chat completion.
pub fn body(req: &ChatRequest, provider: &ProviderInfo) -> Result<Value, PluginError> {
    if req.model.trim().is_empty() {
        return Err(PluginError::new("the request names no model"));
    }
    if req.messages.is_empty() {
        return Err(PluginError::new("the request has no messages"));
    }
    let mut messages = serde_json::to_value(&req.messages)
        .map_err(|e| PluginError::new(format!("cannot encode the messages: {e}")))?;
    if req.json && !mentions_json(&req.messages) {
        add_json_instruction(&mut messages);
    }
    let reasoning = reasoning_override(provider)?.unwrap_or_else(|| reasoning_model(&req.model));
    let mut body = Map::new();
    body.insert("model".into(), Value::String(req.model.clone()));
    body.insert("messages".into(), messages);
    if let Some(max) = req.max_tokens {
        let field =
            max_tokens_field(provider)?.unwrap_or(if reasoning && !req.model.contains('/') {
                "max_completion_tokens"
            } else {
                "max_tokens"
            });
        body.insert(field.into(), json!(max));
    }
    if let Some(t) = req.temperature {
        // Reasoning models accept only the default temperature, 1.
        if !reasoning || t == 1.0 {
            body.insert("temperature".into(), temperature(t)?);
        }
    }
    if req.json {
        body.insert("response_format".into(), json!({"type": "json_object"}));
    }
    Ok(Value::Object(body))
}

/// Whether `model` is one of OpenAI's reasoning models, which take
/// `max_completion_tokens` and only the default temperature: the o-series
/// (`o1`, `o3-mini`, `o4-mini`, dated snapshots…) and the gpt-5 family
/// (`gpt-5`, `gpt-5-mini`, `gpt-5.1`, `gpt-5-chat-latest`…). Recognised by
/// the OpenAI model id, bare or behind one `openai/` vendor prefix as
/// OpenRouter names it (`openai/gpt-5`); other vendors' ids (`openai/gpt-oss-20b`
/// on Groq, `deepseek-reasoner`) are not OpenAI reasoning models.
///
/// The gpt-5 chat variants accept some temperatures on some snapshots, but
/// not all of them (`gpt-5.1-chat-latest` rejects 0.7), so the whole family
/// is treated alike: dropping a temperature never fails a call.
pub fn reasoning_model(model: &str) -> bool {
    let id = model.trim().to_ascii_lowercase();
    let id = id.strip_prefix("openai/").unwrap_or(&id);
    let mut chars = id.chars();
    let o_series = chars.next() == Some('o') && chars.next().is_some_and(|c| c.is_ascii_digit());
    o_series || id.starts_with("gpt-5")
}

/// `options.reasoning_model`, when set.
fn reasoning_override(provider: &ProviderInfo) -> Result<Option<bool>, PluginError> {
    match provider.options.get("reasoning_model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(PluginError::new(format!(
            "option reasoning_model must be true or false, got {other}"
        ))),
    }
}

/// True when any message's text says "JSON" (case-insensitively), as
/// OpenAI's check for JSON mode demands.
fn mentions_json(messages: &[Message]) -> bool {
    messages
        .iter()
        .any(|m| m.content.text().to_ascii_lowercase().contains("json"))
}

/// Appends [`JSON_INSTRUCTION`] to the leading system (or developer) message,
/// or puts a system message with it in front. Other messages are untouched.
fn add_json_instruction(messages: &mut Value) {
    let Some(list) = messages.as_array_mut() else {
        return;
    };
    let leading = list.first_mut().filter(|m| {
        matches!(
            m.get("role").and_then(Value::as_str),
            Some("system" | "developer")
        )
    });
    if let Some(first) = leading {
        match first.get_mut("content") {
            Some(Value::String(text)) => {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(JSON_INSTRUCTION);
                return;
            }
            Some(Value::Array(parts)) => {
                parts.push(json!({"type": "text", "text": JSON_INSTRUCTION}));
                return;
            }
            _ => {}
        }
    }
    list.insert(0, json!({"role": "system", "content": JSON_INSTRUCTION}));
}

/// Which field carries the output-token cap, when `options.max_tokens_field`
/// names one.
fn max_tokens_field(provider: &ProviderInfo) -> Result<Option<&'static str>, PluginError> {
    match provider.options.get("max_tokens_field") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "max_tokens" => Ok(Some("max_tokens")),
        Some(Value::String(s)) if s == "max_completion_tokens" => {
            Ok(Some("max_completion_tokens"))
        }
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
    use llmq_sdk::Content;
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
    fn reasoning_models_are_recognised_by_openai_model_id() {
        for id in [
            "o1",
            "o1-mini",
            "o1-2024-12-17",
            "o3",
            "o3-mini",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano-2025-08-07",
            "gpt-5.1",
            "gpt-5-chat-latest",
            "GPT-5",
            "openai/gpt-5",
            "openai/o4-mini",
        ] {
            assert!(reasoning_model(id), "{id} is a reasoning model");
        }
        for id in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4-turbo",
            "openai/gpt-oss-120b",
            "openai/gpt-4o-mini",
            "omni-moderation-latest",
            "ollama",
            "deepseek-reasoner",
            "llama-3.1-8b-instant",
            "anthropic/o1-like",
        ] {
            assert!(!reasoning_model(id), "{id} is not a reasoning model");
        }
    }

    #[test]
    fn reasoning_model_option_overrides_detection_and_is_validated() {
        let mut inp = input("azure", "https://x.openai.azure.com/openai/v1", None);
        inp.request.model = "prod-chat".into();
        inp.request.temperature = Some(0.2);
        inp.request.max_tokens = Some(50);
        inp.provider
            .options
            .insert("reasoning_model".into(), json!(true));
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(b.get("temperature"), None);
        assert_eq!(b["max_completion_tokens"], json!(50));
        inp.request.model = "o3".into();
        inp.provider
            .options
            .insert("reasoning_model".into(), json!(false));
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(b["temperature"].as_f64(), Some(0.2));
        assert_eq!(b["max_tokens"], json!(50));
        inp.provider
            .options
            .insert("reasoning_model".into(), json!("yes"));
        assert!(body(&inp.request, &inp.provider).is_err());
    }

    #[test]
    fn reasoning_model_keeps_the_default_temperature_and_an_explicit_field() {
        let mut inp = input("openai", "https://api.openai.com/v1", None);
        inp.request.model = "gpt-5-mini".into();
        inp.request.temperature = Some(1.0);
        inp.request.max_tokens = Some(10);
        inp.provider
            .options
            .insert("max_tokens_field".into(), json!("max_tokens"));
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(b["temperature"].as_f64(), Some(1.0));
        assert_eq!(b["max_tokens"], json!(10));
        // OpenRouter's id: the temperature goes, the cap stays `max_tokens`
        // (OpenRouter's own parameter, which it translates per provider).
        let mut inp = input("openrouter", "https://openrouter.ai/api/v1", None);
        inp.request.model = "openai/gpt-5".into();
        inp.request.temperature = Some(0.3);
        inp.request.max_tokens = Some(10);
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(b.get("temperature"), None);
        assert_eq!(b["max_tokens"], json!(10));
        assert_eq!(b.get("max_completion_tokens"), None);
    }

    #[test]
    fn json_instruction_is_added_only_when_no_message_says_json() {
        let mut inp = input("openai", "https://api.openai.com/v1", None);
        inp.request.json = true;
        // No system message: one is put in front.
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(
            b["messages"],
            json!([{"role": "system", "content": JSON_INSTRUCTION}, {"role": "user", "content": "hi"}])
        );
        // A leading system message gets the instruction appended.
        inp.request.messages.insert(
            0,
            Message {
                role: "system".into(),
                content: Content::Text("Be terse.".into()),
            },
        );
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(
            b["messages"][0]["content"],
            json!(format!("Be terse.\n\n{JSON_INSTRUCTION}"))
        );
        assert_eq!(b["messages"][1], json!({"role": "user", "content": "hi"}));
        // A system message made of parts gets one more text part.
        inp.request.messages[0].content = Content::Parts(vec![llmq_sdk::ContentPart::Text {
            text: "Be terse.".into(),
        }]);
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(
            b["messages"][0]["content"],
            json!([{"type": "text", "text": "Be terse."}, {"type": "text", "text": JSON_INSTRUCTION}])
        );
        // Any mention of "json", in any case and any message, is enough.
        inp.request.messages[1].content = Content::Text("answer as Json please".into());
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(
            b["messages"][0]["content"],
            json!([{"type": "text", "text": "Be terse."}])
        );
        assert_eq!(b["messages"].as_array().map(Vec::len), Some(2));
        // Not a JSON job: nothing is added.
        inp.request.json = false;
        inp.request.messages[1].content = Content::Text("hi".into());
        let b = body(&inp.request, &inp.provider).unwrap();
        assert_eq!(b["messages"].as_array().map(Vec::len), Some(2));
        assert_eq!(b.get("response_format"), None);
    }

    #[test]
    fn empty_model_is_refused() {
        let mut inp = input("openai", "https://api.openai.com/v1", None);
        inp.request.model = " ".into();
        assert!(prepare(&inp).is_err());
    }
}
