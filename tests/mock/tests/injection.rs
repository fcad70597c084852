//! Failure injection and latency: every kind, counts, per-key targeting,
//! the HTTP control route, and that injected failures are never "accepted".

mod common;

use common::*;
use llmq_mock::{FailureKind, Injection, KeySpec, MockConfig, MockServer};
use serde_json::json;
use std::time::{Duration, Instant};

const KEY: &str = "sk-inject-test-0000000001";
const OTHER: &str = "sk-inject-other-000000002";

async fn server() -> MockServer {
    MockServer::start(
        MockConfig::default()
            .key(KeySpec::new(KEY).label("main"))
            .key(KeySpec::new(OTHER).label("other")),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn status_failures_use_each_protocols_bodies() {
    let s = server().await;
    let c = client(&s);
    s.inject(
        Some(KEY),
        vec![
            Injection::new(FailureKind::Status500, 1),
            Injection::new(FailureKind::Status503, 1),
            Injection::new(FailureKind::Overloaded529, 1),
        ],
    );
    let body = openai_body("gpt-4o-mini", "hi", None);
    let (status, v) = json_of(openai(&c, &s, KEY, &body).await).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (500, Some("server_error"))
    );
    let (status, v) = json_of(openai(&c, &s, KEY, &body).await).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (503, Some("server_error"))
    );
    // OpenAI has no 529: an overloaded injection is a 503 there.
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 503);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);

    s.inject(
        Some("main"),
        vec![Injection::new(FailureKind::Status500, 1)],
    );
    let (status, v) =
        json_of(anthropic(&c, &s, KEY, &anthropic_body("claude", "hi", 5)).await).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (500, Some("api_error"))
    );
    s.inject(
        Some("main"),
        vec![Injection::new(FailureKind::Status500, 1)],
    );
    let (status, v) =
        json_of(gemini(&c, &s, KEY, "gemini-2.0-flash", &gemini_body("hi", None)).await).await;
    assert_eq!(
        (status, v["error"]["status"].as_str()),
        (500, Some("INTERNAL"))
    );

    let k = &s.stats().keys["main"];
    assert_eq!(k.calls, 6);
    assert_eq!(k.accepted, 1);
    assert_eq!(k.outcomes["status_500"], 3);
    assert_eq!(k.outcomes["status_503"], 1);
    assert_eq!(k.outcomes["overloaded_529"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn non_json_200_returns_html() {
    let s = server().await;
    s.inject(None, vec![Injection::new(FailureKind::NonJson200, 1)]);
    let r = openai(&client(&s), &s, KEY, &openai_body("m", "hi", None)).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").unwrap().starts_with("text/html"));
    assert_eq!(r.text().await.unwrap(), "<html>oops</html>");
    s.shutdown().await;
}

#[tokio::test]
async fn reset_drops_the_connection_without_a_response() {
    let s = server().await;
    let c = client(&s);
    s.inject(Some(KEY), vec![Injection::new(FailureKind::Reset, 1)]);
    let err = c
        .post(format!(
            "{}/chat/completions",
            s.base_url(llmq_mock::Protocol::OpenAi)
        ))
        .bearer_auth(KEY)
        .json(&openai_body("m", "hi", None))
        .send()
        .await
        .expect_err("the connection should drop before any response");
    assert!(!err.is_status() && !err.is_timeout(), "{err}");
    assert_eq!(
        openai(&c, &s, KEY, &openai_body("m", "hi", None))
            .await
            .status(),
        200
    );
    assert_eq!(s.stats().keys["main"].outcomes["reset"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn slow_body_sends_headers_then_the_body_late() {
    let s = server().await;
    s.inject(
        Some(KEY),
        vec![Injection::new(FailureKind::SlowBody, 1).delay_ms(400)],
    );
    let start = Instant::now();
    let r = openai(&client(&s), &s, KEY, &openai_body("m", "slowly", None)).await;
    let headers_at = start.elapsed();
    assert_eq!(r.status(), 200);
    assert!(
        headers_at < Duration::from_millis(400),
        "headers after {headers_at:?}"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "mock reply to: slowly"
    );
    let k = &s.stats().keys["main"];
    assert_eq!((k.accepted, k.outcomes["slow_body"]), (0, 1));
    s.shutdown().await;
}

#[tokio::test]
async fn rate_limited_429_is_served_under_the_limit() {
    let s = server().await;
    let c = client(&s);
    s.inject(
        Some(KEY),
        vec![Injection::new(FailureKind::RateLimited429, 1).retry_after_ms(2_500)],
    );
    let r = openai(&c, &s, KEY, &openai_body("m", "hi", None)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header_u64(&r, "retry-after-ms"), 2_500);
    assert_eq!(header_u64(&r, "retry-after"), 3);
    let (_, v) = json_of(r).await;
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    s.inject(
        Some(KEY),
        vec![Injection::new(FailureKind::RateLimited429, 1)],
    );
    let (status, v) =
        json_of(gemini(&c, &s, KEY, "gemini-2.0-flash", &gemini_body("hi", None)).await).await;
    assert_eq!(
        (status, v["error"]["status"].as_str()),
        (429, Some("RESOURCE_EXHAUSTED"))
    );
    let retry = v["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
        .unwrap();
    assert_eq!(retry["retryDelay"], "1s");

    let st = s.stats();
    // Injected 429s are not the key's own limit rejections.
    assert_eq!(
        (st.total_429, st.keys["main"].outcomes["rate_limited_429"]),
        (0, 2)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn counts_and_targets_are_respected() {
    let s = server().await;
    let c = client(&s);
    let body = openai_body("m", "hi", None);
    s.inject(Some(KEY), vec![Injection::new(FailureKind::Status500, 2)]);
    assert_eq!(openai(&c, &s, OTHER, &body).await.status(), 200);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 500);
    assert_eq!(openai(&c, &s, OTHER, &body).await.status(), 200);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 500);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);
    s.shutdown().await;
}

#[tokio::test]
async fn inject_over_http_applies_to_every_key() {
    let s = server().await;
    let c = client(&s);
    let r = c
        .post(s.url("/_mock/inject"))
        .json(&json!({"failures": [{"kind": "status_503", "count": 2}]}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v["queued"].as_u64()), (200, Some(2)));
    let body = openai_body("m", "hi", None);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 503);
    assert_eq!(openai(&c, &s, OTHER, &body).await.status(), 503);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);

    let r = c
        .post(s.url("/_mock/inject"))
        .json(&json!({"failures": [{"kind": "explode"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    s.shutdown().await;
}

#[tokio::test]
async fn latency_is_applied_per_key_and_by_default() {
    let s = MockServer::start(
        MockConfig::default()
            .default_latency_ms(300)
            .key(KeySpec::new(KEY).latency_ms(0))
            .key(KeySpec::new(OTHER)),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = openai_body("m", "hi", None);
    let start = Instant::now();
    assert_eq!(openai(&c, &s, OTHER, &body).await.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(300));
    // Two concurrent slow requests of one key are both in flight.
    let (a, b) = tokio::join!(openai(&c, &s, OTHER, &body), openai(&c, &s, OTHER, &body));
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let st = s.stats();
    let other = &st.keys["sk-i…0002"];
    assert_eq!((other.calls, other.max_in_flight), (3, 2));
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);
    s.shutdown().await;
}
