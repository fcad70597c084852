//! Limit enforcement with short windows: rolling window vs token bucket,
//! concurrent bursts, and a client that obeys the hints never over-sends.

mod common;

use common::*;
use llmq_mock::{KeySpec, MockConfig, MockServer, Shape};
use std::time::{Duration, Instant};

const ROLLING: &str = "sk-rolling-key-000000001";
const BUCKET: &str = "sk-bucket-key-0000000002";

#[tokio::test]
async fn rolling_window_and_token_bucket_differ_after_a_burst() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(4_000)
            .key(KeySpec::new(ROLLING).rpm(4).label("rolling"))
            .key(
                KeySpec::new(BUCKET)
                    .rpm(4)
                    .shape(Shape::TokenBucket)
                    .label("bucket"),
            ),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = openai_body("m", "hi", Some(1));
    for key in [ROLLING, BUCKET] {
        for _ in 0..4 {
            assert_eq!(openai(&c, &s, key, &body).await.status(), 200);
        }
    }
    // Rolling: the next slot frees when the first request leaves the window.
    let r = openai(&c, &s, ROLLING, &body).await;
    assert_eq!(r.status(), 429);
    let rolling_wait = header_u64(&r, "retry-after-ms");
    assert!(
        rolling_wait > 2_000 && rolling_wait <= 4_000,
        "{rolling_wait}"
    );
    // Bucket: one request refills every window / rpm = 1 s.
    let r = openai(&c, &s, BUCKET, &body).await;
    assert_eq!(r.status(), 429);
    let bucket_wait = header_u64(&r, "retry-after-ms");
    assert!(bucket_wait > 0 && bucket_wait <= 1_000, "{bucket_wait}");

    tokio::time::sleep(Duration::from_millis(bucket_wait)).await;
    let r = openai(&c, &s, BUCKET, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-requests"), 0);
    let r = openai(&c, &s, BUCKET, &body).await;
    assert_eq!(r.status(), 429);
    assert!(header_u64(&r, "retry-after-ms") > 500);
    // The rolling key is still full.
    assert_eq!(openai(&c, &s, ROLLING, &body).await.status(), 429);

    let st = s.stats();
    assert_eq!(
        (st.keys["rolling"].accepted, st.keys["rolling"].rejected_429),
        (4, 2)
    );
    assert_eq!(
        (st.keys["bucket"].accepted, st.keys["bucket"].rejected_429),
        (5, 2)
    );
    assert_eq!(st.keys["rolling"].peak_window_accepted, 4);
    assert_eq!(st.total_429, 4);
    s.shutdown().await;
}

#[tokio::test]
async fn a_concurrent_burst_accepts_exactly_the_limit() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(10_000)
            .key(KeySpec::new(ROLLING).rpm(10).label("k")),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = openai_body("m", "hi", Some(1));
    let responses =
        futures::future::join_all((0..40).map(|_| openai(&c, &s, ROLLING, &body))).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let limited = responses.iter().filter(|r| r.status() == 429).count();
    assert_eq!((ok, limited), (10, 30));
    let k = &s.stats().keys["k"];
    assert_eq!((k.calls, k.accepted, k.rejected_429), (40, 10, 30));
    assert_eq!(k.peak_window_accepted, 10);
    assert!(k.max_in_flight >= 1);
    s.shutdown().await;
}

#[tokio::test]
async fn a_client_obeying_the_hints_is_never_refused_twice_and_never_over_sends() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(300)
            .key(KeySpec::new(ROLLING).rpm(5).tpm(2_000).label("k")),
    )
    .await
    .unwrap();
    let c = client(&s);
    // Prompt 4 + 1 = 5 tokens + 295 max_tokens: 300 per request, so tokens
    // (2000 / 300 → 6) are looser than requests (5) here.
    let body = openai_body("m", "hi", Some(295));
    let start = Instant::now();
    let mut accepted = 0;
    while start.elapsed() < Duration::from_millis(1_500) {
        let r = openai(&c, &s, ROLLING, &body).await;
        if r.status() == 200 {
            accepted += 1;
            continue;
        }
        assert_eq!(r.status(), 429);
        let wait = header_u64(&r, "retry-after-ms");
        assert!(wait <= 300, "{wait}");
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let r = openai(&c, &s, ROLLING, &body).await;
        assert_eq!(
            r.status(),
            200,
            "a request after the hinted wait was refused"
        );
        accepted += 1;
    }
    let k = &s.stats().keys["k"];
    assert_eq!(k.accepted, accepted);
    assert!(accepted >= 10, "only {accepted} accepted");
    assert_eq!(k.peak_window_accepted, 5);
    assert!(k.peak_window_tokens <= 2_000);
    assert_eq!(k.tokens_charged, accepted * 300);
    s.shutdown().await;
}

#[tokio::test]
async fn token_bucket_tokens_refill_continuously() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(2_000)
            .shape(Shape::TokenBucket)
            .key(KeySpec::new(BUCKET).tpm(1_000).label("k")),
    )
    .await
    .unwrap();
    let c = client(&s);
    // 5 + 495 = 500 tokens each: two fit, the third needs 500 more tokens,
    // which refill in 500 / 1000 * 2 s = 1 s.
    let body = openai_body("m", "hi", Some(495));
    assert_eq!(openai(&c, &s, BUCKET, &body).await.status(), 200);
    assert_eq!(openai(&c, &s, BUCKET, &body).await.status(), 200);
    let r = openai(&c, &s, BUCKET, &body).await;
    assert_eq!(r.status(), 429);
    let wait = header_u64(&r, "retry-after-ms");
    assert!(wait > 500 && wait <= 1_000, "{wait}");
    let (_, v) = json_of(r).await;
    assert_eq!(v["error"]["type"], "tokens");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(openai(&c, &s, BUCKET, &body).await.status(), 200);
    s.shutdown().await;
}
