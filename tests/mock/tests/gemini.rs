//! Gemini generateContent over real HTTP: body shape, usage, key in header
//! or URL, RESOURCE_EXHAUSTED with RetryInfo, google.rpc error details.

mod common;

use common::*;
use llmq_mock::{FailureKind, Injection, KeySpec, KeyState, MockConfig, MockServer, Protocol};
use serde_json::{json, Value};

const KEY: &str = "AIzaSyMockKey-0000000000001";

fn detail<'a>(v: &'a Value, ty: &str) -> Option<&'a Value> {
    v["error"]["details"]
        .as_array()?
        .iter()
        .find(|d| d["@type"] == format!("type.googleapis.com/google.rpc.{ty}"))
}

#[tokio::test]
async fn success_has_the_real_shape_and_usage() {
    let s = MockServer::start(MockConfig::default().key(KeySpec::new(KEY).rpm(10)))
        .await
        .unwrap();
    let body = json!({
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "first"}]},
            {"role": "model", "parts": [{"text": "ok"}]},
            {"role": "user", "parts": [{"text": "what is up"}, {"inlineData": {"mimeType": "image/png", "data": "AA=="}}]},
        ],
        "generationConfig": {"maxOutputTokens": 100},
    });
    let r = gemini(&client(&s), &s, KEY, "gemini-2.0-flash", &body).await;
    let (status, v) = json_of(r).await;
    assert_eq!(status, 200);
    let cand = &v["candidates"][0];
    assert_eq!(cand["content"]["role"], "model");
    assert_eq!(
        cand["content"]["parts"][0]["text"],
        "mock reply to: what is up"
    );
    assert_eq!(cand["finishReason"], "STOP");
    // (4+3) + (4+2) + (4+1) + (4+3+85) = 110 prompt tokens; reply is 25 bytes: 7.
    assert_eq!(
        v["usageMetadata"],
        json!({"promptTokenCount": 110, "candidatesTokenCount": 7, "totalTokenCount": 117})
    );
    let k = &s.stats().keys["AIza…0001"];
    assert_eq!((k.accepted, k.tokens_charged, k.key_in_url), (1, 210, 0));
    s.shutdown().await;
}

#[tokio::test]
async fn key_in_the_url_is_served_and_counted() {
    let s = MockServer::start(MockConfig::default().key(KeySpec::new(KEY)))
        .await
        .unwrap();
    let r = client(&s)
        .post(format!(
            "{}/models/gemini-2.0-flash:generateContent?key={KEY}",
            s.base_url(Protocol::Gemini)
        ))
        .json(&gemini_body("hi", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let k = &s.stats().keys["AIza…0001"];
    assert_eq!((k.accepted, k.key_in_url), (1, 1));
    s.shutdown().await;
}

#[tokio::test]
async fn over_the_limit_is_resource_exhausted_with_retry_info() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(1_000)
            .key(KeySpec::new(KEY).rpm(2)),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = gemini_body("hi", Some(10));
    for _ in 0..2 {
        assert_eq!(
            gemini(&c, &s, KEY, "gemini-2.0-flash", &body)
                .await
                .status(),
            200
        );
    }
    let (status, v) = json_of(gemini(&c, &s, KEY, "gemini-2.0-flash", &body).await).await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(detail(&v, "RetryInfo").unwrap()["retryDelay"], "1s");
    let violation = &detail(&v, "QuotaFailure").unwrap()["violations"][0];
    assert_eq!(
        violation["quotaId"],
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    );
    assert_eq!(violation["quotaDimensions"]["model"], "gemini-2.0-flash");
    assert_eq!(violation["quotaValue"], "2");
    let k = &s.stats().keys["AIza…0001"];
    assert_eq!((k.accepted, k.rejected_429), (2, 1));
    assert!(k.peak_window_accepted <= 2);
    s.shutdown().await;
}

#[tokio::test]
async fn key_states_models_and_context_get_google_rpc_errors() {
    let s = MockServer::start(
        MockConfig::default()
            .key(KeySpec::new(KEY))
            .key(KeySpec::new("AIza-invalid-000000000001").state(KeyState::Invalid))
            .key(KeySpec::new("AIza-nocredit-00000000001").state(KeyState::NoCredit))
            .key(KeySpec::new("AIza-suspended-0000000001").state(KeyState::Suspended))
            .context("gemini-tiny", 50),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = gemini_body("hi", Some(10));

    let (status, v) = json_of(
        gemini(
            &c,
            &s,
            "AIza-invalid-000000000001",
            "gemini-2.0-flash",
            &body,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        v["error"]["message"],
        "API key not valid. Please pass a valid API key."
    );
    assert_eq!(
        detail(&v, "ErrorInfo").unwrap()["reason"],
        "API_KEY_INVALID"
    );

    let (status, v) = json_of(
        gemini(
            &c,
            &s,
            "AIza-nocredit-00000000001",
            "gemini-2.0-flash",
            &body,
        )
        .await,
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(detail(&v, "RetryInfo").is_none());
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("prepayment credits are depleted"));

    let (status, v) = json_of(
        gemini(
            &c,
            &s,
            "AIza-suspended-0000000001",
            "gemini-2.0-flash",
            &body,
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(
        detail(&v, "ErrorInfo").unwrap()["reason"],
        "CONSUMER_SUSPENDED"
    );
    assert!(!v.to_string().contains("AIza-suspended-0000000001"));

    let (status, v) = json_of(gemini(&c, &s, KEY, "missing-gemini", &body).await).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["status"], "NOT_FOUND");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("models/missing-gemini is not found"));

    // 4 + 1 + 60 > 50.
    let (status, v) =
        json_of(gemini(&c, &s, KEY, "gemini-tiny", &gemini_body("hi", Some(60))).await).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        v["error"]["message"],
        "The input token count (65) exceeds the maximum number of tokens allowed (50)."
    );

    let r = client(&s)
        .post(format!(
            "{}/models/gemini-2.0-flash:countTokens",
            s.base_url(Protocol::Gemini)
        ))
        .header("x-goog-api-key", KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    s.shutdown().await;
}

#[tokio::test]
async fn injected_503_is_unavailable() {
    let s = MockServer::start(MockConfig::default().key(KeySpec::new(KEY)))
        .await
        .unwrap();
    s.inject(None, vec![Injection::new(FailureKind::Status503, 1)]);
    let c = client(&s);
    let body = gemini_body("hi", None);
    let (status, v) = json_of(gemini(&c, &s, KEY, "gemini-2.0-flash", &body).await).await;
    assert_eq!(status, 503);
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
    assert_eq!(
        gemini(&c, &s, KEY, "gemini-2.0-flash", &body)
            .await
            .status(),
        200
    );
    s.shutdown().await;
}
