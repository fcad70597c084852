//! `prepare`: a canonical job → a Messages API request.
//!
//! System messages move to the top-level `system` field, consecutive
//! same-role messages are merged (the API requires user/assistant to
//! alternate), image parts become `image` blocks, and `max_tokens` — required
//! by Anthropic — always gets a value.

use llmq_sdk::prepare::{
    base_url_or, clamped_temperature, content_items, extra_headers, option_u32, system_and_turns,
    ImageSource,
};
use llmq_sdk::{HttpRequest, PluginError, PrepareInput};
use serde_json::{json, Map, Value};

/// `anthropic-version` sent when `options.anthropic_version` is not set.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";
/// `max_tokens` sent when neither the job nor `options.default_max_tokens` gives one.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;
/// Anthropic accepts temperatures in 0.0..=1.0 (OpenAI-shaped jobs may say up to 2.0).
pub const MAX_TEMPERATURE: f32 = 1.0;
/// Appended to `system` for JSON jobs: the Messages API has no JSON-mode flag.
pub const JSON_INSTRUCTION: &str = "Respond with a single valid JSON value only: no prose before or after it and no Markdown code fences.";

/// Builds the HTTP request for one job.
pub fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
    let req = &input.request;
    let options = &input.provider.options;

    // Turns of (role, blocks), consecutive same-role messages merged.
    let conv = system_and_turns(&req.messages, role, |content| {
        content_items(content, text_block, image_block)
    })?;
    let mut system = conv.system;
    if req.json {
        system.push(JSON_INSTRUCTION.to_string());
    }

    let max_tokens = req
        .max_tokens
        .or_else(|| option_u32(options.get("default_max_tokens")))
        .unwrap_or(DEFAULT_MAX_TOKENS);

    let messages: Vec<Value> = conv
        .turns
        .into_iter()
        .map(|(role, blocks)| json!({"role": role, "content": simplify(blocks)}))
        .collect();

    let mut body = Map::new();
    body.insert("model".into(), json!(req.model));
    body.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert("messages".into(), Value::Array(messages));
    if let Some(t) = req.temperature {
        body.insert(
            "temperature".into(),
            json!(clamped_temperature(t, MAX_TEMPERATURE)?),
        );
    }

    let version = options
        .get("anthropic_version")
        .and_then(Value::as_str)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or(DEFAULT_ANTHROPIC_VERSION);

    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(key) = input.api_key.as_deref() {
        headers.push(("x-api-key".into(), key.to_string()));
    }
    headers.push(("anthropic-version".into(), version.to_string()));
    headers.push(("content-type".into(), "application/json".into()));
    headers.extend(extra_headers(options.get("headers"), "x-api-key")?);

    let body = serde_json::to_string(&Value::Object(body))
        .map_err(|e| PluginError::new(format!("cannot encode the request body: {e}")))?;
    Ok(HttpRequest {
        method: "POST".into(),
        url: format!(
            "{}/messages",
            base_url_or(&input.provider.base_url, crate::DEFAULT_BASE_URL)
        ),
        headers,
        body,
    })
}

/// The Messages API role of a canonical message role.
fn role(role: &str) -> Result<&'static str, PluginError> {
    match role {
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        other => Err(PluginError::new(format!(
            "role {other:?} is not supported by the Anthropic plugin (use system, user or assistant)"
        ))),
    }
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// One image part as an `image` block: `base64` for a data URL, `url` for http(s).
fn image_block(image: ImageSource<'_>) -> Value {
    match image {
        ImageSource::Base64 { media_type, data } => json!({
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data}
        }),
        ImageSource::Url(url) => json!({"type": "image", "source": {"type": "url", "url": url}}),
    }
}

/// A single text block is sent as a plain string, anything else as blocks.
fn simplify(mut blocks: Vec<Value>) -> Value {
    if blocks.len() == 1 && blocks[0]["type"] == "text" {
        if let Some(Value::String(text)) = blocks[0].get_mut("text").map(Value::take) {
            return Value::String(text);
        }
    }
    Value::Array(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmq_sdk::{ChatRequest, Content, Message, ProviderInfo};

    fn input(messages: Vec<Message>) -> PrepareInput {
        PrepareInput {
            request: ChatRequest {
                model: "claude-3-5-haiku-latest".into(),
                messages,
                max_tokens: None,
                temperature: Some(0.2),
                json: false,
            },
            api_key: Some("sk-ant-test".into()),
            provider: ProviderInfo {
                name: "anthropic".into(),
                base_url: "http://127.0.0.1:8080/v1/".into(),
                options: [("headers".to_string(), json!({"X-Api-Key": "other"}))].into(),
            },
        }
    }

    fn msg(role: &str, text: &str) -> Message {
        Message {
            role: role.into(),
            content: Content::Text(text.into()),
        }
    }

    #[test]
    fn extra_headers_cannot_replace_the_key() {
        let err = prepare(&input(vec![msg("user", "hi")])).unwrap_err();
        assert!(err.message.contains("may not set x-api-key"), "{err}");
    }

    #[test]
    fn a_request_with_defaults_system_and_a_plain_string_turn() {
        let mut inp = input(vec![msg("system", "be brief"), msg("user", "hi")]);
        inp.provider.options.clear();
        let req = prepare(&inp).unwrap();
        assert_eq!(req.url, "http://127.0.0.1:8080/v1/messages");
        let body: Value = serde_json::from_str(&req.body).unwrap();
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(body["temperature"].as_f64(), Some(0.2));
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
    }

    #[test]
    fn the_tool_role_is_refused_by_index() {
        let err = prepare(&input(vec![msg("user", "hi"), msg("tool", "x")])).unwrap_err();
        assert!(
            err.message
                .starts_with("message 1: role \"tool\" is not supported by the Anthropic plugin"),
            "{err}"
        );
    }
}
