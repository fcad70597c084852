//! `prepare`: a canonical job → a Messages API request.
//!
//! System messages move to the top-level `system` field, consecutive
//! same-role messages are merged (the API requires user/assistant to
//! alternate), image parts become `image` blocks, and `max_tokens` — required
//! by Anthropic — always gets a value.

use llmq_sdk::{Content, ContentPart, HttpRequest, PluginError, PrepareInput};
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

    let mut system: Vec<String> = Vec::new();
    // (role, blocks) with consecutive same-role messages merged.
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, msg) in req.messages.iter().enumerate() {
        let role = match msg.role.as_str() {
            "system" | "developer" => {
                let text = msg.content.text();
                if !text.trim().is_empty() {
                    system.push(text);
                }
                continue;
            }
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(PluginError::new(format!(
                    "message {i}: role {other:?} is not supported by the Anthropic plugin (use system, user or assistant)"
                )))
            }
        };
        let blocks = content_blocks(&msg.content)
            .map_err(|e| PluginError::new(format!("message {i}: {}", e.message)))?;
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last_role, last_blocks)) if *last_role == role => last_blocks.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if turns.is_empty() {
        return Err(PluginError::new(
            "the job has no user or assistant message with content",
        ));
    }
    if req.json {
        system.push(JSON_INSTRUCTION.to_string());
    }

    let max_tokens = req
        .max_tokens
        .or_else(|| option_u32(options.get("default_max_tokens")))
        .unwrap_or(DEFAULT_MAX_TOKENS);

    let messages: Vec<Value> = turns
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
        if !t.is_finite() {
            return Err(PluginError::new("temperature must be a finite number"));
        }
        body.insert(
            "temperature".into(),
            json!(f32_to_f64(t.clamp(0.0, MAX_TEMPERATURE))),
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
    headers.extend(extra_headers(options.get("headers"))?);

    let body = serde_json::to_string(&Value::Object(body))
        .map_err(|e| PluginError::new(format!("cannot encode the request body: {e}")))?;
    Ok(HttpRequest {
        method: "POST".into(),
        url: format!("{}/messages", base_url(&input.provider.base_url)),
        headers,
        body,
    })
}

/// The base URL without a trailing slash; the default when empty.
fn base_url(configured: &str) -> &str {
    let trimmed = configured.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        crate::DEFAULT_BASE_URL
    } else {
        trimmed
    }
}

/// A message's content as Anthropic content blocks. Empty text is dropped
/// (the API rejects empty text blocks).
fn content_blocks(content: &Content) -> Result<Vec<Value>, PluginError> {
    match content {
        Content::Text(t) if t.is_empty() => Ok(vec![]),
        Content::Text(t) => Ok(vec![json!({"type": "text", "text": t})]),
        Content::Parts(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                match part {
                    ContentPart::Text { text } if text.is_empty() => {}
                    ContentPart::Text { text } => out.push(json!({"type": "text", "text": text})),
                    ContentPart::ImageUrl { image_url } => out.push(image_block(&image_url.url)?),
                }
            }
            Ok(out)
        }
    }
}

/// One image part as an `image` block: `base64` for a data URL, `url` for http(s).
fn image_block(url: &str) -> Result<Value, PluginError> {
    if let Some((media_type, data)) = parse_data_url(url)? {
        return Ok(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data}
        }));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(PluginError::new(
        "image_url must be an http(s) URL or a data:<media type>;base64,<data> URL",
    ))
}

/// Splits `data:<media>;base64,<data>` into (media type, data).
/// `Ok(None)` when the URL is not a data URL at all.
pub fn parse_data_url(url: &str) -> Result<Option<(&str, &str)>, PluginError> {
    let Some(rest) = url
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("data:"))
        .map(|_| &url[5..])
    else {
        return Ok(None);
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| PluginError::new("data URL has no ',' before its data"))?;
    let mut params = meta.split(';');
    let media_type = params.next().unwrap_or("").trim();
    if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(PluginError::new("data URL images must be base64-encoded"));
    }
    if media_type.is_empty() {
        return Err(PluginError::new("data URL has no media type"));
    }
    Ok(Some((media_type, data)))
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

/// An `f32` as the `f64` with the same shortest decimal form (`0.2` stays
/// `0.2` on the wire instead of `0.20000000298023224`).
pub fn f32_to_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// A positive integer option given as a number or a numeric string.
fn option_u32(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n > 0)
}

/// `options.headers`: extra headers as an object of strings (e.g.
/// `anthropic-beta`). They may not replace the key header.
fn extra_headers(v: Option<&Value>) -> Result<Vec<(String, String)>, PluginError> {
    let Some(v) = v else { return Ok(vec![]) };
    let obj = v
        .as_object()
        .ok_or_else(|| PluginError::new("options.headers must be a table of strings"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, value) in obj {
        let value = value
            .as_str()
            .ok_or_else(|| PluginError::new(format!("options.headers.{name} must be a string")))?;
        if name.eq_ignore_ascii_case("x-api-key") {
            return Err(PluginError::new(
                "options.headers may not set x-api-key: keys come from the key pool",
            ));
        }
        out.push((name.to_ascii_lowercase(), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_split_into_media_type_and_data() {
        assert_eq!(
            parse_data_url("data:image/png;base64,iVBORw0KGgo=").unwrap(),
            Some(("image/png", "iVBORw0KGgo="))
        );
        assert_eq!(parse_data_url("https://x/y.png").unwrap(), None);
        assert!(parse_data_url("data:image/png,rawbytes").is_err());
        assert!(parse_data_url("data:;base64,AAAA").is_err());
        assert!(parse_data_url("data:image/png;base64").is_err());
    }

    #[test]
    fn temperatures_keep_their_decimal_form() {
        assert_eq!(f32_to_f64(0.2), 0.2);
        assert_eq!(f32_to_f64(1.0), 1.0);
    }

    #[test]
    fn base_url_defaults_and_loses_trailing_slash() {
        assert_eq!(base_url(""), "https://api.anthropic.com/v1");
        assert_eq!(
            base_url("http://127.0.0.1:8080/v1/"),
            "http://127.0.0.1:8080/v1"
        );
    }

    #[test]
    fn numeric_options_accept_numbers_and_strings() {
        assert_eq!(option_u32(Some(&json!(2048))), Some(2048));
        assert_eq!(option_u32(Some(&json!("512"))), Some(512));
        assert_eq!(option_u32(Some(&json!(0))), None);
        assert_eq!(option_u32(Some(&json!(-5))), None);
        assert_eq!(option_u32(None), None);
    }

    #[test]
    fn extra_headers_cannot_replace_the_key() {
        assert!(extra_headers(Some(&json!({"X-Api-Key": "other"}))).is_err());
        assert_eq!(
            extra_headers(Some(&json!({"Anthropic-Beta": "b1"}))).unwrap(),
            vec![("anthropic-beta".to_string(), "b1".to_string())]
        );
        assert!(extra_headers(Some(&json!({"a": 1}))).is_err());
    }
}
