//! The three provider wire formats: request parsing (with the shared token
//! estimate), success bodies, error bodies and rate-limit headers.
//!
//! Each protocol implements [`Wire`]; the request pipeline in `server` is
//! generic over it.

pub(crate) mod anthropic;
pub(crate) mod gemini;
pub(crate) mod openai;

use crate::config::Protocol;
use crate::limiter::{Rejection, Snapshot};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use llmq_sdk::estimate::{text_tokens, DEFAULT_MAX_TOKENS, PER_IMAGE_TOKENS, PER_MESSAGE_TOKENS};
use serde_json::Value;
use std::time::Duration;
use tokio::sync::watch;

/// What the pipeline needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub model: String,
    /// The shared prompt estimate (`llmq_sdk::estimate`).
    pub prompt_tokens: u64,
    /// `max_tokens` of the request, or the default (256).
    pub max_tokens: u64,
    /// Text of the last user message (text parts joined with `\n`).
    pub last_user_text: String,
}

impl Parsed {
    /// What the request is charged against tokens-per-window.
    pub fn charge(&self) -> u64 {
        self.prompt_tokens + self.max_tokens
    }
}

/// The deterministic answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub text: String,
    pub output_tokens: u64,
    /// Cut short by `max_tokens`.
    pub truncated: bool,
}

/// `mock reply to: <last user text, first 64 chars>`, cut to `max_tokens`.
pub(crate) fn reply(p: &Parsed) -> Reply {
    let snippet: String = p.last_user_text.chars().take(64).collect();
    let text = format!("mock reply to: {snippet}");
    let tokens = text_tokens(&text);
    if tokens <= p.max_tokens {
        return Reply {
            text,
            output_tokens: tokens,
            truncated: false,
        };
    }
    let mut end = usize::try_from(p.max_tokens.saturating_mul(4)).unwrap_or(usize::MAX);
    end = end.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Reply {
        text: text[..end].to_owned(),
        output_tokens: p.max_tokens,
        truncated: true,
    }
}

/// The 5xx flavours a test can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerError {
    Internal,
    Unavailable,
    Overloaded,
}

/// A response before it is handed to axum, so it can also be sent slowly.
#[derive(Debug)]
pub(crate) struct WireResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl WireResponse {
    pub fn json(status: u16, body: &Value) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        WireResponse {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            headers,
            body: Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
        }
    }

    pub fn html(status: u16, body: &'static str) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        WireResponse {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            headers,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    /// Adds a header; values that are not valid header text are skipped.
    pub fn header(mut self, name: &'static str, value: impl std::fmt::Display) -> Self {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.insert(HeaderName::from_static(name), v);
        }
        self
    }

    /// The headers first, then the body after `delay`.
    pub fn into_slow_response(self, delay: Duration) -> Response {
        let body = self.body;
        let stream = futures::stream::once(async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::io::Error>(body)
        });
        (self.status, self.headers, Body::from_stream(stream)).into_response()
    }
}

impl IntoResponse for WireResponse {
    fn into_response(self) -> Response {
        (self.status, self.headers, self.body).into_response()
    }
}

/// A response whose body fails before its first byte: hyper then closes the
/// connection without flushing the status line, so the client sees the
/// connection drop with no response at all.
pub(crate) fn connection_reset() -> Response {
    let stream = futures::stream::iter([Err::<Bytes, _>(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "injected connection reset",
    ))]);
    (StatusCode::OK, Body::from_stream(stream)).into_response()
}

/// Resolves once the server is stopping (or its state is gone).
pub(crate) async fn until_closed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|closing| *closing).await;
}

fn stopping() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "mock server stopping",
    )
}

/// Size of the chunks of the generated bodies.
const CHUNK: usize = 64 << 10;

/// The JSON around the padded reply text of a `huge_body` success.
fn huge_frame(protocol: Protocol, model: &str) -> (String, &'static str) {
    let model = serde_json::to_string(model).unwrap_or_else(|_| "\"unknown\"".to_owned());
    match protocol {
        Protocol::OpenAi => (
            format!(
                r#"{{"id":"chatcmpl-mockhuge","object":"chat.completion","created":0,"model":{model},"choices":[{{"index":0,"message":{{"role":"assistant","content":""#
            ),
            r#""},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
        ),
        Protocol::Anthropic => (
            format!(
                r#"{{"id":"msg_mockhuge","type":"message","role":"assistant","model":{model},"content":[{{"type":"text","text":""#
            ),
            r#""}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}"#,
        ),
        Protocol::Gemini => (
            r#"{"candidates":[{"content":{"parts":[{"text":""#.to_owned(),
            r#""}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":1,"totalTokenCount":2}}"#,
        ),
    }
}

/// A 200 success of exactly `bytes` bytes (`Content-Length` set), streamed
/// in 64 KiB slices of one shared buffer: the whole body never exists in
/// memory. Below the size of the JSON frame the body is only padding.
pub(crate) fn huge_body(protocol: Protocol, model: &str, bytes: u64) -> Response {
    let (prefix, suffix) = huge_frame(protocol, model);
    let frame = (prefix.len() + suffix.len()) as u64;
    let (head, pad, tail) = if bytes >= frame {
        (
            Bytes::from(prefix),
            bytes - frame,
            Bytes::from_static(suffix.as_bytes()),
        )
    } else {
        (Bytes::new(), bytes, Bytes::new())
    };
    let padding = Bytes::from(vec![b'a'; CHUNK]);
    let pads = futures::stream::unfold(pad, move |left| {
        let padding = padding.clone();
        async move {
            (left > 0).then(|| {
                let n = left.min(CHUNK as u64);
                (padding.slice(..n as usize), left - n)
            })
        }
    });
    let stream = futures::stream::once(async move { head })
        .chain(pads)
        .chain(futures::stream::once(async move { tail }))
        .filter(|b| futures::future::ready(!b.is_empty()))
        .map(Ok::<_, std::io::Error>);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    (StatusCode::OK, headers, Body::from_stream(stream)).into_response()
}

/// A 200 whose chunked body never ends: 64 KiB chunks, `delay` apart.
/// When the server stops, the body fails and the connection is closed.
pub(crate) fn endless_body(closing: watch::Receiver<bool>, delay: Duration) -> Response {
    let chunk = Bytes::from(vec![b' '; CHUNK]);
    let head = Bytes::from_static(br#"{"choices":[{"message":{"content":""#);
    endless(closing, head, chunk, delay, None)
}

/// A 200 declaring a 1 TiB `Content-Length` whose bytes trickle forever,
/// 16 bytes every `delay`, until the server stops.
pub(crate) fn endless_content_length(closing: watch::Receiver<bool>, delay: Duration) -> Response {
    let chunk = Bytes::from_static(b"aaaaaaaaaaaaaaaa");
    let head = Bytes::from_static(br#"{"choices":[{"message":{"content":""#);
    endless(closing, head, chunk, delay, Some(1 << 40))
}

fn endless(
    closing: watch::Receiver<bool>,
    head: Bytes,
    chunk: Bytes,
    delay: Duration,
    content_length: Option<u64>,
) -> Response {
    let first = futures::stream::once(async move { Ok::<_, std::io::Error>(head) });
    let rest = futures::stream::unfold(Some(closing), move |rx| {
        let chunk = chunk.clone();
        async move {
            let mut rx = rx?;
            if *rx.borrow() {
                return Some((Err(stopping()), None));
            }
            if delay.is_zero() {
                return Some((Ok(chunk), Some(rx)));
            }
            tokio::select! {
                _ = until_closed(&mut rx) => Some((Err(stopping()), None)),
                _ = tokio::time::sleep(delay) => Some((Ok(chunk), Some(rx))),
            }
        }
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(len) = content_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    (
        StatusCode::OK,
        headers,
        Body::from_stream(first.chain(rest)),
    )
        .into_response()
}

/// Serves one protocol: parses its requests and renders its answers.
pub(crate) trait Wire {
    /// The protocol this implementation serves.
    const PROTOCOL: Protocol;
    /// Parses and validates a request body. `path_model` is the model from
    /// the URL (Gemini). Errors are the protocol's 400 bodies.
    fn parse(
        id: u64,
        body: &[u8],
        headers: &HeaderMap,
        path_model: Option<&str>,
    ) -> Result<Parsed, Box<WireResponse>>;
    fn success(id: u64, p: &Parsed, r: &Reply, snap: &Snapshot) -> WireResponse;
    fn rate_limited(id: u64, model: &str, rej: &Rejection, snap: &Snapshot) -> WireResponse;
    fn missing_key(id: u64) -> WireResponse;
    /// `masked` is the masked key (never the raw one).
    fn invalid_key(id: u64, masked: &str) -> WireResponse;
    fn no_credit(id: u64) -> WireResponse;
    fn suspended(id: u64, masked: &str) -> WireResponse;
    fn model_not_found(id: u64, model: &str) -> WireResponse;
    fn context_too_long(id: u64, p: &Parsed, limit: u64) -> WireResponse;
    fn server_error(id: u64, e: ServerError) -> WireResponse;
}

/// Tokens of one content part in the request, by the shared estimate.
pub(crate) enum PartTokens {
    Text(u64),
    Image,
    Other,
}

impl PartTokens {
    fn tokens(&self) -> u64 {
        match self {
            PartTokens::Text(t) => *t,
            PartTokens::Image => PER_IMAGE_TOKENS,
            PartTokens::Other => 0,
        }
    }
}

/// Accumulates the prompt estimate message by message.
#[derive(Debug, Default)]
pub(crate) struct Estimate {
    pub tokens: u64,
}

impl Estimate {
    /// One message: the framing charge plus its parts.
    pub fn message(&mut self, parts: impl IntoIterator<Item = PartTokens>) {
        self.tokens += PER_MESSAGE_TOKENS + parts.into_iter().map(|p| p.tokens()).sum::<u64>();
    }
}

/// Tokens of a text part.
pub(crate) fn text_part(text: &str) -> PartTokens {
    PartTokens::Text(text_tokens(text))
}

/// A non-negative integer field, if present.
pub(crate) fn u64_field(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
}

/// `max_tokens` or the default.
pub(crate) fn max_tokens_or_default(v: Option<u64>) -> u64 {
    v.unwrap_or(DEFAULT_MAX_TOKENS)
}

/// Seconds and milliseconds of a retry hint, both rounded up.
pub(crate) fn retry_hint(rej: &Rejection) -> (u64, u64) {
    let ms = crate::format::ns_to_ms_ceil(rej.wait_ns);
    (crate::format::ms_to_secs_ceil(ms), ms)
}

/// Token parts of a message `content` that is a string or a list of typed
/// blocks (`{"type": "text", "text": …}`), as OpenAI and Anthropic send it;
/// `image_type` is the block type of an image (`image_url` / `image`).
pub(crate) fn content_parts(content: Option<&Value>, image_type: &str) -> Vec<PartTokens> {
    match content {
        Some(Value::String(s)) => vec![text_part(s)],
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => text_part(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some(t) if t == image_type => PartTokens::Image,
                _ => PartTokens::Other,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The text of such a `content`, blocks joined with newlines.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str, max_tokens: u64) -> Parsed {
        Parsed {
            model: "m".into(),
            prompt_tokens: 0,
            max_tokens,
            last_user_text: text.into(),
        }
    }

    #[test]
    fn reply_is_deterministic_and_capped() {
        let r = reply(&parsed("hello", 256));
        assert_eq!(r.text, "mock reply to: hello");
        assert_eq!(r.output_tokens, 5);
        assert!(!r.truncated);
        let long = "é".repeat(100);
        let r = reply(&parsed(&long, 256));
        assert_eq!(r.text.chars().count(), "mock reply to: ".len() + 64);
        let r = reply(&parsed("hello", 2));
        assert_eq!(
            (r.text.as_str(), r.output_tokens, r.truncated),
            ("mock rep", 2, true)
        );
        let r = reply(&parsed(&long, 5));
        assert!(r.truncated && r.text.len() <= 20);
    }
}
