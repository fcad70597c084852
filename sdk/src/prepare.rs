//! Helpers for building a request: what most adapters of a non-OpenAI chat
//! API need to turn the canonical (OpenAI-shaped) job into their wire format.
//!
//! - [`system_and_turns`]: system messages split off, consecutive same-role
//!   messages merged into alternating turns, each message's content converted
//!   by [`content_items`] (empty text dropped, images classified by
//!   [`image_source`] / [`parse_data_url`]).
//! - Provider options: [`option_u32`] for numeric settings, [`extra_headers`]
//!   for `options.headers` (which may never replace the key header), and
//!   [`base_url_or`] for the configured base URL.
//! - [`clamped_temperature`] / [`f32_to_f64`]: a job's `f32` temperature as
//!   the decimal the producer wrote (`0.2`, not `0.20000000298023224`).
//!
//! Every error is a [`PluginError`] that never contains the API key.

use crate::types::{Content, ContentPart, Message, PluginError};
use serde_json::Value;

/// Where an image part's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource<'a> {
    /// A `data:<media type>;base64,<data>` URL, split.
    Base64 { media_type: &'a str, data: &'a str },
    /// An `http://` or `https://` URL, as given.
    Url(&'a str),
}

/// Classifies an image part's URL: a base64 data URL or an http(s) URL.
/// Anything else (another scheme, a non-base64 data URL) is refused.
pub fn image_source(url: &str) -> Result<ImageSource<'_>, PluginError> {
    if let Some((media_type, data)) = parse_data_url(url)? {
        return Ok(ImageSource::Base64 { media_type, data });
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        return Ok(ImageSource::Url(url));
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

/// A message's content as the provider's items (blocks, parts…): `text`
/// makes one from a piece of text, `image` one from an image. Empty text is
/// dropped (APIs reject empty text items), so the result may be empty.
pub fn content_items<T>(
    content: &Content,
    text: impl Fn(&str) -> T,
    image: impl Fn(ImageSource<'_>) -> T,
) -> Result<Vec<T>, PluginError> {
    match content {
        Content::Text(t) if t.is_empty() => Ok(vec![]),
        Content::Text(t) => Ok(vec![text(t)]),
        Content::Parts(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                match part {
                    ContentPart::Text { text: t } if t.is_empty() => {}
                    ContentPart::Text { text: t } => out.push(text(t)),
                    ContentPart::ImageUrl { image_url } => {
                        out.push(image(image_source(&image_url.url)?))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// A job's messages split for an API with a separate system prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation<R, T> {
    /// The text of each non-blank `system` / `developer` message, in order.
    pub system: Vec<String>,
    /// `(role, items)`, no two neighbours with the same role, none empty.
    pub turns: Vec<(R, Vec<T>)>,
}

/// The job's messages as APIs with a separate system prompt and alternating
/// turns want them: the text of every `system` / `developer` message (blank
/// ones dropped), and the other messages as `(role, items)` turns, with
/// consecutive turns of the same role merged and messages without items
/// skipped.
///
/// `role` maps a message role to the provider's (or refuses it); `items`
/// converts a message's content, usually through [`content_items`]. Their
/// errors are prefixed with `message <index>: `. A job left without any turn
/// is refused.
pub fn system_and_turns<R: PartialEq, T>(
    messages: &[Message],
    role: impl Fn(&str) -> Result<R, PluginError>,
    items: impl Fn(&Content) -> Result<Vec<T>, PluginError>,
) -> Result<Conversation<R, T>, PluginError> {
    let at = |i: usize| move |e: PluginError| PluginError::new(format!("message {i}: {e}"));
    let mut system = Vec::new();
    let mut turns: Vec<(R, Vec<T>)> = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        if matches!(msg.role.as_str(), "system" | "developer") {
            let text = msg.content.text();
            if !text.trim().is_empty() {
                system.push(text);
            }
            continue;
        }
        let role = role(&msg.role).map_err(at(i))?;
        let items = items(&msg.content).map_err(at(i))?;
        if items.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last_role, last_items)) if *last_role == role => last_items.extend(items),
            _ => turns.push((role, items)),
        }
    }
    if turns.is_empty() {
        return Err(PluginError::new(
            "the job has no user or assistant message with content",
        ));
    }
    Ok(Conversation { system, turns })
}

/// An `f32` as the `f64` with the same shortest decimal form (`0.2` stays
/// `0.2` on the wire instead of `0.20000000298023224`).
pub fn f32_to_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// A job's temperature clamped to `0.0..=max` (APIs differ in range), in its
/// decimal form. Refuses NaN and infinities.
pub fn clamped_temperature(t: f32, max: f32) -> Result<f64, PluginError> {
    if !t.is_finite() {
        return Err(PluginError::new("temperature must be a finite number"));
    }
    Ok(f32_to_f64(t.clamp(0.0, max)))
}

/// A positive integer option given as a number or a numeric string
/// (`default_max_tokens = 512` or `"512"`); `None` when absent, zero or not
/// a number that fits.
pub fn option_u32(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n > 0)
}

/// `options.headers`: extra headers as an object of strings, names
/// lower-cased. They may not set `key_header` (the header that carries the
/// API key): keys come from the key pool only.
pub fn extra_headers(
    v: Option<&Value>,
    key_header: &str,
) -> Result<Vec<(String, String)>, PluginError> {
    let Some(v) = v else { return Ok(vec![]) };
    let obj = v
        .as_object()
        .ok_or_else(|| PluginError::new("options.headers must be a table of strings"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, value) in obj {
        let value = value
            .as_str()
            .ok_or_else(|| PluginError::new(format!("options.headers.{name} must be a string")))?;
        if name.eq_ignore_ascii_case(key_header) {
            return Err(PluginError::new(format!(
                "options.headers may not set {key_header}: keys come from the key pool"
            )));
        }
        out.push((name.to_ascii_lowercase(), value.to_string()));
    }
    Ok(out)
}

/// The configured base URL without surrounding white space and trailing
/// slashes; `default` when that leaves nothing.
pub fn base_url_or<'a>(configured: &'a str, default: &'a str) -> &'a str {
    let trimmed = configured.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        default
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ImageUrl;
    use serde_json::json;

    #[test]
    fn data_urls_split_into_media_type_and_data() {
        assert_eq!(
            parse_data_url("data:image/png;base64,iVBORw0KGgo=").unwrap(),
            Some(("image/png", "iVBORw0KGgo="))
        );
        assert_eq!(
            parse_data_url("DATA:image/webp; charset=x ;Base64,UklGRg==").unwrap(),
            Some(("image/webp", "UklGRg=="))
        );
        assert_eq!(parse_data_url("https://x/y.png").unwrap(), None);
        assert!(parse_data_url("data:image/png,rawbytes").is_err());
        assert!(parse_data_url("data:;base64,AAAA").is_err());
        assert!(parse_data_url("data:image/png;base64").is_err());
    }

    #[test]
    fn image_sources_are_data_or_http_urls() {
        assert_eq!(
            image_source("data:image/gif;base64,R0lG").unwrap(),
            ImageSource::Base64 {
                media_type: "image/gif",
                data: "R0lG"
            }
        );
        assert_eq!(
            image_source("HTTPS://x/y.png").unwrap(),
            ImageSource::Url("HTTPS://x/y.png")
        );
        assert_eq!(
            image_source("http://x").unwrap(),
            ImageSource::Url("http://x")
        );
        for bad in [
            "ftp://x/y.png",
            "file:///etc/passwd",
            "x",
            "",
            "data:image/png,raw",
        ] {
            assert!(image_source(bad).is_err(), "{bad:?}");
        }
    }

    fn text(t: &str) -> Content {
        Content::Text(t.into())
    }

    fn msg(role: &str, content: Content) -> Message {
        Message {
            role: role.into(),
            content,
        }
    }

    /// Items as strings: `t:<text>`, `b:<media type>`, `u:<url>`.
    fn items(c: &Content) -> Result<Vec<String>, PluginError> {
        content_items(
            c,
            |t| format!("t:{t}"),
            |img| match img {
                ImageSource::Base64 { media_type, .. } => format!("b:{media_type}"),
                ImageSource::Url(u) => format!("u:{u}"),
            },
        )
    }

    fn role(r: &str) -> Result<&'static str, PluginError> {
        match r {
            "user" => Ok("user"),
            "assistant" | "model" => Ok("model"),
            other => Err(PluginError::new(format!("role {other:?} is not supported"))),
        }
    }

    #[test]
    fn content_items_drop_empty_text_and_convert_images() {
        let image = |url: &str| ContentPart::ImageUrl {
            image_url: ImageUrl {
                url: url.into(),
                detail: None,
            },
        };
        let parts = Content::Parts(vec![
            ContentPart::Text { text: "".into() },
            ContentPart::Text { text: "a".into() },
            image("data:image/png;base64,AA=="),
            image("https://x/y.jpg"),
        ]);
        assert_eq!(
            items(&parts).unwrap(),
            ["t:a", "b:image/png", "u:https://x/y.jpg"]
        );
        assert!(items(&text("")).unwrap().is_empty());
        assert!(items(&Content::Parts(vec![image("ftp://x")])).is_err());
    }

    #[test]
    fn system_is_split_off_and_same_role_turns_merge() {
        let messages = [
            msg("system", text("be brief")),
            msg("user", text("a")),
            msg("developer", text("  ")),
            msg("user", text("b")),
            msg("assistant", text("")),
            msg("model", text("c")),
            msg("assistant", text("d")),
            msg("developer", text("json only")),
            msg("user", text("e")),
        ];
        let conv = system_and_turns(&messages, role, items).unwrap();
        assert_eq!(conv.system, ["be brief", "json only"]);
        assert_eq!(
            conv.turns,
            [
                ("user", vec!["t:a".to_string(), "t:b".into()]),
                ("model", vec!["t:c".into(), "t:d".into()]),
                ("user", vec!["t:e".into()]),
            ]
        );
    }

    #[test]
    fn system_and_turns_errors_name_the_message() {
        let bad_role = [msg("user", text("a")), msg("tool", text("x"))];
        let err = system_and_turns(&bad_role, role, items).unwrap_err();
        assert_eq!(err.message, "message 1: role \"tool\" is not supported");
        let bad_image = [msg(
            "user",
            Content::Parts(vec![ContentPart::ImageUrl {
                image_url: ImageUrl {
                    url: "ftp://x".into(),
                    detail: None,
                },
            }]),
        )];
        let err = system_and_turns(&bad_image, role, items).unwrap_err();
        assert!(
            err.message.starts_with("message 0: image_url must be"),
            "{err}"
        );
        let only_system = [msg("system", text("hi")), msg("user", text(""))];
        let err = system_and_turns(&only_system, role, items).unwrap_err();
        assert_eq!(
            err.message,
            "the job has no user or assistant message with content"
        );
    }

    #[test]
    fn temperatures_keep_their_decimal_form_and_range() {
        assert_eq!(f32_to_f64(0.2), 0.2);
        assert_eq!(f32_to_f64(0.7), 0.7);
        assert_eq!(clamped_temperature(1.5, 1.0).unwrap(), 1.0);
        assert_eq!(clamped_temperature(-0.5, 2.0).unwrap(), 0.0);
        assert_eq!(clamped_temperature(0.3, 2.0).unwrap(), 0.3);
        assert!(clamped_temperature(f32::NAN, 1.0).is_err());
        assert!(clamped_temperature(f32::INFINITY, 1.0).is_err());
    }

    #[test]
    fn numeric_options_accept_numbers_and_strings() {
        assert_eq!(option_u32(Some(&json!(2048))), Some(2048));
        assert_eq!(option_u32(Some(&json!(" 512 "))), Some(512));
        assert_eq!(option_u32(Some(&json!(0))), None);
        assert_eq!(option_u32(Some(&json!(-5))), None);
        assert_eq!(option_u32(Some(&json!(5_000_000_000u64))), None);
        assert_eq!(option_u32(Some(&json!(true))), None);
        assert_eq!(option_u32(None), None);
    }

    #[test]
    fn extra_headers_are_lowercased_and_cannot_replace_the_key() {
        assert_eq!(
            extra_headers(Some(&json!({"Anthropic-Beta": "b1"})), "x-api-key").unwrap(),
            vec![("anthropic-beta".to_string(), "b1".to_string())]
        );
        let err = extra_headers(Some(&json!({"X-Api-Key": "other"})), "x-api-key").unwrap_err();
        assert_eq!(
            err.message,
            "options.headers may not set x-api-key: keys come from the key pool"
        );
        assert!(!err.message.contains("other"));
        assert!(extra_headers(Some(&json!({"a": 1})), "x-api-key").is_err());
        assert!(extra_headers(Some(&json!(["a"])), "x-api-key").is_err());
        assert_eq!(extra_headers(None, "x-api-key").unwrap(), vec![]);
    }

    #[test]
    fn base_url_defaults_and_loses_trailing_slashes() {
        assert_eq!(base_url_or("", "https://d/v1"), "https://d/v1");
        assert_eq!(base_url_or("  / ", "https://d/v1"), "https://d/v1");
        assert_eq!(
            base_url_or(" http://127.0.0.1:8080/v1// ", "https://d/v1"),
            "http://127.0.0.1:8080/v1"
        );
    }
}
