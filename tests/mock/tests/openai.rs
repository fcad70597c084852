//! OpenAI chat completions over real HTTP: body shape, usage, rate-limit
//! headers, 429 hints, key states, model and context errors.

mod common;

use common::*;
use llmq_mock::{KeySpec, KeyState, MockConfig, MockServer, Protocol};
use llmq_sdk::wire::parse_duration_ms;
use serde_json::json;

const KEY: &str = "sk-openai-test-000000000001";

#[tokio::test]
async fn success_has_the_real_shape_usage_and_ratelimit_headers() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(1_000)
            .key(KeySpec::new(KEY).rpm(5).tpm(10_000)),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = json!({
        "model": "gpt-4o-mini",
        "max_tokens": 50,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello world"},
        ],
    });
    let r = openai(&c, &s, KEY, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "x-ratelimit-limit-requests"), 5);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-requests"), 4);
    let reset = parse_duration_ms(&header(&r, "x-ratelimit-reset-requests").unwrap()).unwrap();
    assert!(reset > 0 && reset <= 1_000, "reset {reset}");
    // prompt: (4 + ceil(14/4)) + (4 + ceil(11/4)) = 15; charge 15 + 50.
    assert_eq!(header_u64(&r, "x-ratelimit-limit-tokens"), 10_000);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 10_000 - 65);
    assert!(parse_duration_ms(&header(&r, "x-ratelimit-reset-tokens").unwrap()).is_some());
    assert!(header(&r, "x-request-id").is_some());
    assert!(header(&r, "retry-after").is_none());
    let (_, v) = json_of(r).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "mock reply to: hello world"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // "mock reply to: hello world" is 26 bytes: 7 tokens.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 15, "completion_tokens": 7, "total_tokens": 22})
    );

    let st = s.stats();
    let k = &st.keys["sk-o…0001"];
    assert_eq!((k.calls, k.accepted, k.tokens_charged), (1, 1, 65));
    assert_eq!(k.outcomes["ok"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn output_is_capped_by_max_tokens() {
    let s = MockServer::start(MockConfig::default().accept_unknown_keys(true))
        .await
        .unwrap();
    let r = openai(
        &client(&s),
        &s,
        "any-key",
        &openai_body("m", "a long question indeed", Some(3)),
    )
    .await;
    let (status, v) = json_of(r).await;
    assert_eq!(status, 200);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "mock reply t");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    s.shutdown().await;
}

#[tokio::test]
async fn over_the_request_limit_gets_429_with_accurate_hints() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(1_000)
            .key(KeySpec::new(KEY).rpm(3)),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = openai_body("gpt-4o-mini", "hi", Some(10));
    for _ in 0..3 {
        assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);
    }
    let r = openai(&c, &s, KEY, &body).await;
    assert_eq!(r.status(), 429);
    let ms = header_u64(&r, "retry-after-ms");
    assert!(ms > 0 && ms <= 1_000, "retry-after-ms {ms}");
    assert_eq!(header_u64(&r, "retry-after"), 1);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(header_u64(&r, "x-ratelimit-limit-requests"), 3);
    let (_, v) = json_of(r).await;
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("on requests per min (RPM): Limit 3, Used 3, Requested 1"),
        "{msg}"
    );

    // The hint is exact: waiting it is enough.
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);

    let st = s.stats();
    let k = &st.keys["sk-o…0001"];
    assert_eq!((k.accepted, k.rejected_429, k.calls), (4, 1, 5));
    assert!(k.peak_window_accepted <= 3);
    assert_eq!(st.total_429, 1);
    s.shutdown().await;
}

#[tokio::test]
async fn over_the_token_limit_gets_a_tokens_429() {
    let s = MockServer::start(
        MockConfig::default()
            .window_ms(5_000)
            .key(KeySpec::new(KEY).tpm(600)),
    )
    .await
    .unwrap();
    let c = client(&s);
    // "hello": prompt 4 + 2 = 6, no max_tokens: charged 6 + 256 = 262.
    let body = openai_body("gpt-4o-mini", "hello", None);
    for _ in 0..2 {
        assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);
    }
    let r = openai(&c, &s, KEY, &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 600 - 524);
    assert!(header_u64(&r, "retry-after-ms") <= 5_000);
    let (_, v) = json_of(r).await;
    assert_eq!(v["error"]["type"], "tokens");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("tokens per min (TPM): Limit 600, Used 524, Requested 262"),
        "{msg}"
    );

    let r = openai(
        &c,
        &s,
        KEY,
        &openai_body("gpt-4o-mini", "hello", Some(1_000)),
    )
    .await;
    let (status, v) = json_of(r).await;
    assert_eq!(status, 429);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Request too large"));

    let k = &s.stats().keys["sk-o…0001"];
    assert_eq!((k.tokens_charged, k.peak_window_tokens), (524, 524));
    s.shutdown().await;
}

#[tokio::test]
async fn key_states_get_the_real_error_bodies() {
    let s = MockServer::start(
        MockConfig::default()
            .key(KeySpec::new("sk-invalid-key-0000000001").state(KeyState::Invalid))
            .key(KeySpec::new("sk-nocredit-key-000000001").state(KeyState::NoCredit))
            .key(KeySpec::new("sk-suspended-key-00000001").state(KeyState::Suspended)),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = openai_body("gpt-4o-mini", "hi", None);

    let r = openai(&c, &s, "sk-invalid-key-0000000001", &body).await;
    let (status, v) = json_of(r).await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Incorrect API key provided: sk-i…0001."),
        "{msg}"
    );

    let (status, v) = json_of(openai(&c, &s, "sk-never-configured-0001", &body).await).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    let r = c
        .post(format!("{}/chat/completions", s.base_url(Protocol::OpenAi)))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, 401);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("You didn't provide an API key"));

    let r = openai(&c, &s, "sk-nocredit-key-000000001", &body).await;
    assert!(header(&r, "retry-after").is_none());
    let (status, v) = json_of(r).await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    assert!(v["error"]["message"].as_str().unwrap().starts_with(
        "You exceeded your current quota, please check your plan and billing details."
    ));

    let (status, v) = json_of(openai(&c, &s, "sk-suspended-key-00000001", &body).await).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("account_deactivated"))
    );

    let st = s.stats();
    assert_eq!(st.keys["sk-i…0001"].outcomes["invalid_key"], 1);
    assert_eq!(st.keys["sk-n…0001"].outcomes["no_credit"], 1);
    assert_eq!(st.keys["sk-s…0001"].outcomes["suspended"], 1);
    assert_eq!(st.keys["unknown"].outcomes["invalid_key"], 1);
    assert_eq!(st.keys["unknown"].outcomes["missing_key"], 1);
    // No-credit 429s are not rate-limit rejections.
    assert_eq!((st.total_429, st.total_accepted, st.total_calls), (0, 0, 5));
    s.shutdown().await;
}

#[tokio::test]
async fn missing_models_and_long_contexts_are_refused() {
    let s = MockServer::start(
        MockConfig::default()
            .key(KeySpec::new(KEY))
            .context("small-model", 300),
    )
    .await
    .unwrap();
    let c = client(&s);
    let (status, v) =
        json_of(openai(&c, &s, KEY, &openai_body("missing-model-x", "hi", None)).await).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(
        v["error"]["message"],
        "The model `missing-model-x` does not exist or you do not have access to it."
    );

    // 4 + 2 = 6 prompt tokens + 256 default = 262 fits in 300; 400 more does not.
    assert_eq!(
        openai(&c, &s, KEY, &openai_body("small-model", "hello", None))
            .await
            .status(),
        200
    );
    let (status, v) =
        json_of(openai(&c, &s, KEY, &openai_body("small-model", "hello", Some(400))).await).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "messages");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("maximum context length is 300 tokens. However, you requested 406 tokens (6 in the messages, 400 in the completion)"), "{msg}");

    let (status, v) = json_of(openai(&c, &s, KEY, &json!({"messages": []})).await).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );

    let k = &s.stats().keys["sk-o…0001"];
    assert_eq!(k.outcomes["model_not_found"], 1);
    assert_eq!(k.outcomes["context_too_long"], 1);
    assert_eq!(k.outcomes["bad_request"], 1);
    assert_eq!(k.accepted, 1);
    s.shutdown().await;
}
