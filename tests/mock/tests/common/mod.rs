//! Helpers shared by the HTTP tests: request bodies and senders per protocol.
#![allow(dead_code)]

use llmq_mock::{MockServer, Protocol};
use serde_json::{json, Value};

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

pub fn openai_body(model: &str, text: &str, max_tokens: Option<u64>) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    if let Some(m) = max_tokens {
        b["max_tokens"] = json!(m);
    }
    b
}

pub async fn openai(
    c: &reqwest::Client,
    s: &MockServer,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    c.post(format!("{}/chat/completions", s.base_url(Protocol::OpenAi)))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

pub fn anthropic_body(model: &str, text: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]})
}

pub async fn anthropic(
    c: &reqwest::Client,
    s: &MockServer,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    c.post(format!("{}/messages", s.base_url(Protocol::Anthropic)))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

pub fn gemini_body(text: &str, max_tokens: Option<u64>) -> Value {
    let mut b = json!({"contents": [{"role": "user", "parts": [{"text": text}]}]});
    if let Some(m) = max_tokens {
        b["generationConfig"] = json!({"maxOutputTokens": m});
    }
    b
}

pub async fn gemini(
    c: &reqwest::Client,
    s: &MockServer,
    key: &str,
    model: &str,
    body: &Value,
) -> reqwest::Response {
    c.post(format!(
        "{}/models/{model}:generateContent",
        s.base_url(Protocol::Gemini)
    ))
    .header("x-goog-api-key", key)
    .json(body)
    .send()
    .await
    .unwrap()
}

pub fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

pub fn header_u64(r: &reqwest::Response, name: &str) -> u64 {
    header(r, name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .parse()
        .unwrap()
}

/// Status and JSON body.
pub async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Polls `cond` until it holds (the mock crate cannot use llmq-testkit, which
/// depends on it); panics after `timeout`.
pub async fn wait_for(timeout: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    while !cond() {
        assert!(
            start.elapsed() <= timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}
