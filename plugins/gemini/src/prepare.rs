//! `prepare`: a canonical job → a generateContent request.
//!
//! The key travels in the `x-goog-api-key` header, never in the URL (URLs end
//! up in logs and proxies). System messages become `systemInstruction`,
//! assistant turns become `model` turns, image parts become `inline_data` or
//! `file_data`, and the job's limits go into `generationConfig`.

use llmq_sdk::{Content, ContentPart, HttpRequest, PluginError, PrepareInput};
use serde_json::{json, Map, Value};

/// Gemini accepts temperatures in 0.0..=2.0.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// The mime type assumed for an image URL whose extension says nothing.
pub const DEFAULT_IMAGE_MIME: &str = "image/jpeg";

/// Builds the HTTP request for one job.
pub fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
    let req = &input.request;
    let options = &input.provider.options;

    let mut system: Vec<String> = Vec::new();
    // (role, parts) with consecutive same-role messages merged.
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
            "assistant" | "model" => "model",
            other => {
                return Err(PluginError::new(format!(
                    "message {i}: role {other:?} is not supported by the Gemini plugin (use system, user or assistant)"
                )))
            }
        };
        let parts = content_parts(&msg.content)
            .map_err(|e| PluginError::new(format!("message {i}: {}", e.message)))?;
        if parts.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last_role, last_parts)) if *last_role == role => last_parts.extend(parts),
            _ => turns.push((role, parts)),
        }
    }
    if turns.is_empty() {
        return Err(PluginError::new(
            "the job has no user or assistant message with content",
        ));
    }

    let mut body = Map::new();
    body.insert(
        "contents".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, parts)| json!({"role": role, "parts": parts}))
                .collect(),
        ),
    );
    if !system.is_empty() {
        body.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": system.join("\n\n")}]}),
        );
    }

    let mut config = Map::new();
    if let Some(max) = req
        .max_tokens
        .or_else(|| option_u32(options.get("default_max_tokens")))
    {
        config.insert("maxOutputTokens".into(), json!(max));
    }
    if let Some(t) = req.temperature {
        if !t.is_finite() {
            return Err(PluginError::new("temperature must be a finite number"));
        }
        config.insert(
            "temperature".into(),
            json!(f32_to_f64(t.clamp(0.0, MAX_TEMPERATURE))),
        );
    }
    if req.json {
        config.insert("responseMimeType".into(), json!("application/json"));
    }
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }

    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(key) = input.api_key.as_deref() {
        headers.push(("x-goog-api-key".into(), key.to_string()));
    }
    headers.push(("content-type".into(), "application/json".into()));
    headers.extend(extra_headers(options.get("headers"))?);

    let body = serde_json::to_string(&Value::Object(body))
        .map_err(|e| PluginError::new(format!("cannot encode the request body: {e}")))?;
    Ok(HttpRequest {
        method: "POST".into(),
        url: format!(
            "{}/{}:generateContent",
            base_url(&input.provider.base_url),
            model_path(&req.model)?
        ),
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

/// The resource path of a model: `models/<id>` (a `models/` prefix in the
/// job is accepted) or `tunedModels/<id>`. The id must be URL-path safe, so a
/// model name can never smuggle a query string (or a `key=`) into the URL.
pub fn model_path(model: &str) -> Result<String, PluginError> {
    let model = model.trim();
    let (collection, id) = if let Some(id) = model.strip_prefix("tunedModels/") {
        ("tunedModels", id)
    } else {
        ("models", model.strip_prefix("models/").unwrap_or(model))
    };
    let safe = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !safe {
        return Err(PluginError::new(format!(
            "model id {:?} is not a Gemini model name (letters, digits, '-', '_' and '.')",
            llmq_sdk::wire::mask_keys(model, &[crate::parse::KEY_PREFIX])
        )));
    }
    Ok(format!("{collection}/{id}"))
}

/// A message's content as Gemini parts. Empty text is dropped (the API
/// rejects empty parts).
fn content_parts(content: &Content) -> Result<Vec<Value>, PluginError> {
    match content {
        Content::Text(t) if t.is_empty() => Ok(vec![]),
        Content::Text(t) => Ok(vec![json!({"text": t})]),
        Content::Parts(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                match part {
                    ContentPart::Text { text } if text.is_empty() => {}
                    ContentPart::Text { text } => out.push(json!({"text": text})),
                    ContentPart::ImageUrl { image_url } => out.push(image_part(&image_url.url)?),
                }
            }
            Ok(out)
        }
    }
}

/// One image: `inline_data` for a data URL, `file_data` for an http(s) URL.
fn image_part(url: &str) -> Result<Value, PluginError> {
    if let Some((mime_type, data)) = parse_data_url(url)? {
        return Ok(json!({"inline_data": {"mime_type": mime_type, "data": data}}));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        return Ok(json!({"file_data": {"mime_type": guess_image_mime(url), "file_uri": url}}));
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

/// The image mime type from the URL path's extension (query and fragment
/// ignored); [`DEFAULT_IMAGE_MIME`] when it says nothing.
pub fn guess_image_mime(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let last = path.rsplit('/').next().unwrap_or(path);
    let ext = last
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" | "jpe" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "bmp" => "image/bmp",
        _ => DEFAULT_IMAGE_MIME,
    }
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

/// `options.headers`: extra headers as an object of strings. They may not
/// replace the key header.
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
        if name.eq_ignore_ascii_case("x-goog-api-key") {
            return Err(PluginError::new(
                "options.headers may not set x-goog-api-key: keys come from the key pool",
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
    fn model_paths_are_safe_and_prefixed_once() {
        assert_eq!(
            model_path("gemini-2.0-flash").unwrap(),
            "models/gemini-2.0-flash"
        );
        assert_eq!(
            model_path("models/gemini-1.5-pro-002").unwrap(),
            "models/gemini-1.5-pro-002"
        );
        assert_eq!(
            model_path("tunedModels/my-model_1").unwrap(),
            "tunedModels/my-model_1"
        );
        assert!(model_path("gemini-pro?key=AIza-x").is_err());
        assert!(model_path("../files/x").is_err());
        assert!(model_path("").is_err());
        assert!(model_path("models/").is_err());
    }

    #[test]
    fn image_mime_is_guessed_from_the_path_only() {
        assert_eq!(guess_image_mime("https://x/a/photo.PNG"), "image/png");
        assert_eq!(
            guess_image_mime("https://x/a.webp?size=large.png"),
            "image/webp"
        );
        assert_eq!(guess_image_mime("https://x/a.jpeg#frag"), "image/jpeg");
        assert_eq!(
            guess_image_mime("https://x.example.com/image"),
            "image/jpeg"
        );
        assert_eq!(guess_image_mime("https://x.example.com/"), "image/jpeg");
    }

    #[test]
    fn data_urls_split_into_media_type_and_data() {
        assert_eq!(
            parse_data_url("data:image/webp;base64,UklGRg==").unwrap(),
            Some(("image/webp", "UklGRg=="))
        );
        assert_eq!(parse_data_url("https://x/y.png").unwrap(), None);
        assert!(parse_data_url("data:image/png,raw").is_err());
    }

    #[test]
    fn extra_headers_cannot_replace_the_key() {
        assert!(extra_headers(Some(&json!({"X-Goog-Api-Key": "other"}))).is_err());
        assert_eq!(
            extra_headers(Some(&json!({"X-Goog-User-Project": "p1"}))).unwrap(),
            vec![("x-goog-user-project".to_string(), "p1".to_string())]
        );
    }

    #[test]
    fn temperatures_keep_their_decimal_form() {
        assert_eq!(f32_to_f64(0.7), 0.7);
    }
}
