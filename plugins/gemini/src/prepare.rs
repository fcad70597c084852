//! `prepare`: a canonical job → a generateContent request.
//!
//! The key travels in the `x-goog-api-key` header, never in the URL (URLs end
//! up in logs and proxies). System messages become `systemInstruction`,
//! assistant turns become `model` turns, image parts become `inline_data` or
//! `file_data`, and the job's limits go into `generationConfig`.

use llmq_sdk::prepare::{
    base_url_or, clamped_temperature, content_items, extra_headers, option_u32, system_and_turns,
    ImageSource,
};
use llmq_sdk::{HttpRequest, PluginError, PrepareInput};
use serde_json::{json, Map, Value};

/// Gemini accepts temperatures in 0.0..=2.0.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// The mime type assumed for an image URL whose extension says nothing.
pub const DEFAULT_IMAGE_MIME: &str = "image/jpeg";

/// Builds the HTTP request for one job.
pub fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
    let req = &input.request;
    let options = &input.provider.options;

    // Turns of (role, parts), consecutive same-role messages merged.
    let conv = system_and_turns(&req.messages, role, |content| {
        content_items(content, |text| json!({ "text": text }), image_part)
    })?;

    let mut body = Map::new();
    body.insert(
        "contents".into(),
        Value::Array(
            conv.turns
                .into_iter()
                .map(|(role, parts)| json!({"role": role, "parts": parts}))
                .collect(),
        ),
    );
    if !conv.system.is_empty() {
        body.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": conv.system.join("\n\n")}]}),
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
        config.insert(
            "temperature".into(),
            json!(clamped_temperature(t, MAX_TEMPERATURE)?),
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
    headers.extend(extra_headers(options.get("headers"), "x-goog-api-key")?);

    let body = serde_json::to_string(&Value::Object(body))
        .map_err(|e| PluginError::new(format!("cannot encode the request body: {e}")))?;
    Ok(HttpRequest {
        method: "POST".into(),
        url: format!(
            "{}/{}:generateContent",
            base_url_or(&input.provider.base_url, crate::DEFAULT_BASE_URL),
            model_path(&req.model)?
        ),
        headers,
        body,
    })
}

/// The Gemini role of a canonical message role.
fn role(role: &str) -> Result<&'static str, PluginError> {
    match role {
        "user" => Ok("user"),
        "assistant" | "model" => Ok("model"),
        other => Err(PluginError::new(format!(
            "role {other:?} is not supported by the Gemini plugin (use system, user or assistant)"
        ))),
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

/// One image: `inline_data` for a data URL, `file_data` for an http(s) URL.
fn image_part(image: ImageSource<'_>) -> Value {
    match image {
        ImageSource::Base64 { media_type, data } => {
            json!({"inline_data": {"mime_type": media_type, "data": data}})
        }
        ImageSource::Url(url) => {
            json!({"file_data": {"mime_type": guess_image_mime(url), "file_uri": url}})
        }
    }
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

    fn input(options: Value) -> PrepareInput {
        serde_json::from_value(json!({
            "request": {"model": "gemini-2.0-flash", "temperature": 0.7, "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/cat.webp"}}
                ]},
                {"role": "assistant", "content": "a cat"}
            ]},
            "api_key": "AIza-test-aaaa1111",
            "provider": {"name": "gemini", "base_url": "", "options": options}
        }))
        .unwrap()
    }

    #[test]
    fn extra_headers_cannot_replace_the_key() {
        let err = prepare(&input(json!({"headers": {"X-Goog-Api-Key": "other"}}))).unwrap_err();
        assert!(err.message.contains("may not set x-goog-api-key"), "{err}");
        let req = prepare(&input(json!({"headers": {"X-Goog-User-Project": "p1"}}))).unwrap();
        assert!(req
            .headers
            .contains(&("x-goog-user-project".to_string(), "p1".to_string())));
    }

    #[test]
    fn images_become_file_data_and_assistants_model_turns() {
        let req = prepare(&input(json!({}))).unwrap();
        assert_eq!(
            req.url,
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
        );
        let body: Value = serde_json::from_str(&req.body).unwrap();
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [
                    {"text": "what is this?"},
                    {"file_data": {"mime_type": "image/webp", "file_uri": "https://x/cat.webp"}}
                ]},
                {"role": "model", "parts": [{"text": "a cat"}]}
            ])
        );
        assert_eq!(body["generationConfig"]["temperature"].as_f64(), Some(0.7));
    }
}
