//! The provider-specific failures (Groq 413 TPM, Gemini per-day and
//! per-minute quotas) and the transport-level ones (an upstream that never
//! answers, huge and endless bodies).

mod common;

use common::*;
use llmq_mock::{FailureKind, Injection, KeySpec, MockConfig, MockServer};
use serde_json::Value;
use std::time::Duration;

const KEY: &str = "sk-failure-test-000000001";

async fn server() -> MockServer {
    MockServer::start(MockConfig::default().key(KeySpec::new(KEY).label("main").rpm(15).tpm(6_000)))
        .await
        .unwrap()
}

#[tokio::test]
async fn groq_413_names_the_tpm_limit_and_the_requested_tokens() {
    let s = server().await;
    let c = client();
    s.inject(Some(KEY), vec![Injection::new(FailureKind::GroqTpm413, 1)]);
    // "hi": 4 + 1 prompt tokens, plus max_tokens.
    let body = openai_body("llama-3.1-8b-instant", "hi", Some(7_000));
    let r = openai(&c, &s, KEY, &body).await;
    assert!(header(&r, "x-request-id").is_some());
    let (status, v) = json_of(r).await;
    assert_eq!(status, 413);
    assert_eq!(
        v["error"]["message"],
        "Request too large for model `llama-3.1-8b-instant` in organization `org_01mockmockmockmockmockmock` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 7005, please reduce your message size and try again. Visit https://console.groq.com/docs/rate-limits for more information."
    );
    assert_eq!(v["error"]["type"], "tokens");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    // Only the injected request got Groq's 413 (the mock's own limiter
    // answers OpenAI's 429 for a request above the TPM).
    let small = openai_body("llama-3.1-8b-instant", "hi", Some(10));
    assert_eq!(openai(&c, &s, KEY, &small).await.status(), 200);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 429);

    // An explicit limit wins; Requested is always above it.
    s.inject(
        Some("main"),
        vec![Injection::new(FailureKind::GroqTpm413, 1).limit(500_000)],
    );
    let (_, v) = json_of(openai(&c, &s, KEY, &body).await).await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Limit 500000, Requested 500001,"),
        "{message}"
    );

    let k = &s.stats().keys["main"];
    assert_eq!((k.calls, k.accepted), (4, 1));
    assert_eq!(k.outcomes["groq_tpm_413"], 2);
    s.shutdown().await;
}

fn detail<'a>(v: &'a Value, kind: &str) -> &'a Value {
    v["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == format!("type.googleapis.com/google.rpc.{kind}"))
        .unwrap_or_else(|| panic!("no {kind} detail in {v}"))
}

#[tokio::test]
async fn gemini_per_day_quota_names_the_period_and_the_model() {
    let s = server().await;
    let c = client();
    s.inject(
        Some(KEY),
        vec![Injection::new(FailureKind::GeminiPerDayQuota, 1)],
    );
    let r = gemini(&c, &s, KEY, "gemini-2.5-flash", &gemini_body("hi", None)).await;
    let (status, v) = json_of(r).await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("You exceeded your current quota"));
    assert!(message.contains("* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 250, model: gemini-2.5-flash\nPlease retry in 41.000s."), "{message}");
    let violation = &detail(&v, "QuotaFailure")["violations"][0];
    assert_eq!(
        violation["quotaMetric"],
        "generativelanguage.googleapis.com/generate_content_free_tier_requests"
    );
    assert_eq!(
        violation["quotaId"],
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
    );
    assert_eq!(
        violation["quotaDimensions"],
        serde_json::json!({"location": "global", "model": "gemini-2.5-flash"})
    );
    assert_eq!(violation["quotaValue"], "250");
    assert_eq!(
        detail(&v, "Help")["links"][0]["url"],
        "https://ai.google.dev/gemini-api/docs/rate-limits"
    );
    assert_eq!(detail(&v, "RetryInfo")["retryDelay"], "41s");
    assert_eq!(s.stats().keys["main"].outcomes["gemini_per_day_quota"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn gemini_per_minute_quota_uses_the_key_rpm_and_a_27s_retry() {
    let s = server().await;
    let c = client();
    s.inject(
        Some(KEY),
        vec![
            Injection::new(FailureKind::GeminiPerMinuteQuota, 1),
            Injection::new(FailureKind::GeminiPerDayQuota, 1)
                .limit(20)
                .retry_after_ms(3_500),
        ],
    );
    let body = gemini_body("hi", None);
    let (status, v) = json_of(gemini(&c, &s, KEY, "gemini-2.0-flash", &body).await).await;
    assert_eq!(status, 429);
    let violation = &detail(&v, "QuotaFailure")["violations"][0];
    assert_eq!(
        violation["quotaId"],
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    );
    assert_eq!(violation["quotaValue"], "15");
    assert_eq!(violation["quotaDimensions"]["model"], "gemini-2.0-flash");
    assert_eq!(detail(&v, "RetryInfo")["retryDelay"], "27s");

    let (_, v) = json_of(gemini(&c, &s, KEY, "gemini-2.0-flash", &body).await).await;
    let violation = &detail(&v, "QuotaFailure")["violations"][0];
    assert_eq!(violation["quotaValue"], "20");
    assert_eq!(detail(&v, "RetryInfo")["retryDelay"], "4s");
    s.shutdown().await;
}

#[tokio::test]
async fn hang_holds_the_request_until_the_server_stops() {
    let s = server().await;
    s.inject(Some(KEY), vec![Injection::new(FailureKind::Hang, 1)]);
    let url = format!(
        "{}/chat/completions",
        s.base_url(llmq_mock::Protocol::OpenAi)
    );
    let body = openai_body("m", "hi", None);
    let call = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .map(|r| r.status())
    });
    wait_for(Duration::from_secs(10), "the hanging request", || {
        s.stats().keys["main"].outcomes.get("hang") == Some(&1)
    })
    .await;
    // The request is in the mock and gets no answer.
    assert!(!call.is_finished());
    assert_eq!(s.stats().keys["main"].max_in_flight, 1);
    s.shutdown().await;
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("shutdown ends a hanging request")
        .unwrap();
    assert!(
        answer.is_err(),
        "a hanging request gets no response: {answer:?}"
    );
}

#[tokio::test]
async fn huge_body_is_exactly_the_requested_size_and_valid_json() {
    let s = server().await;
    let c = client();
    const SIZE: u64 = 3 * 1024 * 1024 + 17;
    s.inject(
        Some(KEY),
        vec![
            Injection::new(FailureKind::HugeBody, 1).bytes(SIZE),
            Injection::new(FailureKind::HugeBody, 1).bytes(10),
        ],
    );
    let mut r = openai(&c, &s, KEY, &openai_body("gpt-4o-mini", "hi", None)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(SIZE));
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body.len() as u64, SIZE);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.len() > 3_000_000 && text.bytes().all(|b| b == b'a'));

    // Too small for the JSON frame: padding only.
    let r = gemini(&c, &s, KEY, "gemini-2.0-flash", &gemini_body("hi", None)).await;
    assert_eq!(r.content_length(), Some(10));
    assert_eq!(&r.bytes().await.unwrap()[..], b"aaaaaaaaaa");
    assert_eq!(s.stats().keys["main"].outcomes["huge_body"], 2);
    s.shutdown().await;
}

#[tokio::test]
async fn huge_body_frames_each_protocols_success() {
    let s = server().await;
    let c = client();
    s.inject(
        Some(KEY),
        vec![Injection::new(FailureKind::HugeBody, 2).bytes(100_000)],
    );
    let r = anthropic(&c, &s, KEY, &anthropic_body("claude-x", "hi", 5)).await;
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["model"].as_str()),
        (Some("message"), Some("claude-x"))
    );
    let r = gemini(&c, &s, KEY, "gemini-2.0-flash", &gemini_body("hi", None)).await;
    let bytes = r.bytes().await.unwrap();
    assert_eq!(bytes.len(), 100_000);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    s.shutdown().await;
}

#[tokio::test]
async fn endless_body_keeps_streaming_past_any_size() {
    let s = server().await;
    let c = client();
    s.inject(Some(KEY), vec![Injection::new(FailureKind::EndlessBody, 1)]);
    let mut r = openai(&c, &s, KEY, &openai_body("m", "hi", None)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), None);
    let mut read = 0usize;
    while read < 8 << 20 {
        read += r.chunk().await.unwrap().expect("the body never ends").len();
    }
    drop(r);
    // The server still answers, and stops promptly.
    assert_eq!(
        openai(&c, &s, KEY, &openai_body("m", "hi", None))
            .await
            .status(),
        200
    );
    tokio::time::timeout(Duration::from_secs(5), s.shutdown())
        .await
        .unwrap();
}

#[tokio::test]
async fn endless_content_length_declares_a_huge_size_and_trickles() {
    let s = server().await;
    let c = client();
    s.inject(
        Some(KEY),
        vec![Injection::new(FailureKind::EndlessContentLength, 1).delay_ms(5)],
    );
    let mut r = openai(&c, &s, KEY, &openai_body("m", "hi", None)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(1 << 40));
    let mut read = 0usize;
    for _ in 0..5 {
        read += r.chunk().await.unwrap().expect("the body never ends").len();
    }
    assert!(read < 200, "trickles: {read} bytes in 5 chunks");
    // Shutting down ends the endless body with an error on the client side.
    let reader = tokio::spawn(async move {
        loop {
            match r.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), s.shutdown())
        .await
        .unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(failed, "a body cut short of its Content-Length is an error");
}
