//! Anthropic Messages over real HTTP: body shape, usage, RFC 3339 rate-limit
//! headers, required headers and fields, 429s, key states and errors.

mod common;

use common::*;
use llmq_mock::{FailureKind, Injection, KeySpec, KeyState, MockConfig, MockServer, Protocol};
use llmq_sdk::wire::parse_rfc3339_ms;
use serde_json::json;
use std::time::{SystemTime, UNIX_EPOCH};

const KEY: &str = "sk-ant-api03-test-0000000001";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn success_has_the_real_shape_usage_and_ratelimit_headers() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(2_000)
            .key(KeySpec::new(KEY).rpm(10).tpm(5_000)),
    )
    .await
    .unwrap();
    let before = now_ms();
    let body = json!({
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 20,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    });
    let r = anthropic(&client(&s), &s, KEY, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "anthropic-ratelimit-requests-limit"), 10);
    assert_eq!(header_u64(&r, "anthropic-ratelimit-requests-remaining"), 9);
    // prompt: (4 + ceil(9/4)) + (4 + ceil(11/4)) = 14; charge 14 + 20.
    assert_eq!(
        header_u64(&r, "anthropic-ratelimit-tokens-remaining"),
        5_000 - 34
    );
    let reset =
        parse_rfc3339_ms(&header(&r, "anthropic-ratelimit-requests-reset").unwrap()).unwrap();
    assert!(
        reset >= before && reset <= now_ms() + 2_000,
        "reset {reset}"
    );
    assert!(parse_rfc3339_ms(&header(&r, "anthropic-ratelimit-tokens-reset").unwrap()).is_some());
    assert!(header(&r, "request-id").is_some());
    let (_, v) = json_of(r).await;
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-3-5-haiku-latest");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "mock reply to: hello there"}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"], json!({"input_tokens": 14, "output_tokens": 7}));
    s.shutdown().await;
}

#[tokio::test]
async fn version_header_and_max_tokens_are_required() {
    let s = MockServer::start(MockConfig::default().key(KeySpec::new(KEY)))
        .await
        .unwrap();
    let c = client(&s);
    let r = c
        .post(format!("{}/messages", s.base_url(Protocol::Anthropic)))
        .header("x-api-key", KEY)
        .json(&anthropic_body("claude", "hi", 10))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, 400);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "anthropic-version: header is required"
    );

    let body = json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]});
    let (status, v) = json_of(anthropic(&c, &s, KEY, &body).await).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["message"], "max_tokens: Field required");
    assert_eq!(s.stats().keys["sk-a…0001"].outcomes["bad_request"], 2);
    s.shutdown().await;
}

#[tokio::test]
async fn over_the_limit_gets_rate_limit_error_with_retry_after() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(1_000)
            .key(KeySpec::new(KEY).rpm(2)),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = anthropic_body("claude", "hi", 10);
    for _ in 0..2 {
        assert_eq!(anthropic(&c, &s, KEY, &body).await.status(), 200);
    }
    let r = anthropic(&c, &s, KEY, &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header_u64(&r, "retry-after"), 1);
    assert_eq!(header_u64(&r, "anthropic-ratelimit-requests-remaining"), 0);
    let reset =
        parse_rfc3339_ms(&header(&r, "anthropic-ratelimit-requests-reset").unwrap()).unwrap();
    assert!(reset <= now_ms() + 1_000);
    let (_, v) = json_of(r).await;
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("This request would exceed the rate limit for your organization"));
    let k = &s.stats().keys["sk-a…0001"];
    assert_eq!((k.accepted, k.rejected_429), (2, 1));
    assert!(k.peak_window_accepted <= 2);
    s.shutdown().await;
}

#[tokio::test]
async fn key_states_models_and_context_get_the_real_errors() {
    let s = MockServer::start(
        MockConfig::default()
            .key(KeySpec::new(KEY))
            .key(KeySpec::new("sk-ant-invalid-000000001").state(KeyState::Invalid))
            .key(KeySpec::new("sk-ant-nocredit-00000001").state(KeyState::NoCredit))
            .key(KeySpec::new("sk-ant-suspended-0000001").state(KeyState::Suspended))
            .context("claude-small", 100),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = anthropic_body("claude", "hi", 10);

    let (status, v) = json_of(anthropic(&c, &s, "sk-ant-invalid-000000001", &body).await).await;
    assert_eq!(status, 401);
    assert_eq!(
        v["error"],
        json!({"type": "authentication_error", "message": "invalid x-api-key"})
    );

    let (status, v) = json_of(anthropic(&c, &s, "sk-ant-nocredit-00000001", &body).await).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."
    );

    let (status, v) = json_of(anthropic(&c, &s, "sk-ant-suspended-0000001", &body).await).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (403, Some("permission_error"))
    );

    let (status, v) =
        json_of(anthropic(&c, &s, KEY, &anthropic_body("missing-claude", "hi", 10)).await).await;
    assert_eq!(status, 404);
    assert_eq!(
        v["error"],
        json!({"type": "not_found_error", "message": "model: missing-claude"})
    );

    // 4 + 1 prompt tokens + 200 max_tokens > 100.
    let (status, v) =
        json_of(anthropic(&c, &s, KEY, &anthropic_body("claude-small", "hi", 200)).await).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "prompt is too long: 205 tokens > 100 maximum"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn injected_529_is_an_overloaded_error() {
    let s = MockServer::start(MockConfig::default().key(KeySpec::new(KEY)))
        .await
        .unwrap();
    s.inject(
        Some(KEY),
        vec![Injection::new(FailureKind::Overloaded529, 1)],
    );
    let c = client(&s);
    let body = anthropic_body("claude", "hi", 10);
    let (status, v) = json_of(anthropic(&c, &s, KEY, &body).await).await;
    assert_eq!(status, 529);
    assert_eq!(
        v["error"],
        json!({"type": "overloaded_error", "message": "Overloaded"})
    );
    assert_eq!(anthropic(&c, &s, KEY, &body).await.status(), 200);
    s.shutdown().await;
}
