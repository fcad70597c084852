//! HTTPS with a throwaway CA and HTTP/2 by ALPN (the default), what an
//! untrusting client sees, and the plain-HTTP opt-out.

mod common;

use common::*;
use llmq_mock::{KeySpec, MockConfig, MockServer, Protocol};
use reqwest::Version;

const KEY: &str = "sk-tls-test-00000000001";

fn config() -> MockConfig {
    MockConfig::default().key(KeySpec::new(KEY).label("tls"))
}

#[tokio::test]
async fn https_negotiates_http2_with_a_client_that_trusts_the_ca() {
    let s = MockServer::start(config()).await.unwrap();
    assert!(s.is_tls());
    let port = s.addr().port();
    assert_eq!(
        s.base_url(Protocol::OpenAi),
        format!("https://localhost:{port}/openai/v1")
    );
    assert_eq!(
        s.url("/_mock/stats"),
        format!("https://localhost:{port}/_mock/stats")
    );
    let pem = s.ca_pem().unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let ca_file = s.ca_file().unwrap().to_owned();
    assert_eq!(std::fs::read_to_string(&ca_file).unwrap(), pem);

    let c = client(&s);
    let r = openai(&c, &s, KEY, &openai_body("m", "hi", None)).await;
    assert_eq!(r.version(), Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let r = gemini(&c, &s, KEY, "gemini-2.0-flash", &gemini_body("hi", None)).await;
    assert_eq!((r.status().as_u16(), r.version()), (200, Version::HTTP_2));
    let st = s.stats();
    assert_eq!(st.http_versions.len(), 1);
    assert_eq!(st.http_versions["HTTP/2.0"], 2);
    assert_eq!(st.keys["tls"].accepted, 2);

    // The certificate is valid for the loopback IP too.
    let r = c
        .get(format!("https://127.0.0.1:{port}/_mock/health"))
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), r.version()), (200, Version::HTTP_2));

    s.reset_stats();
    assert!(s.stats().http_versions.is_empty());
    // The CA file belongs to the server.
    drop(s);
    assert!(!ca_file.exists());
}

#[tokio::test]
async fn an_http1_client_is_served_http1_over_tls() {
    let s = MockServer::start(config()).await.unwrap();
    let c = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(s.ca_pem().unwrap().as_bytes()).unwrap(),
        )
        .http1_only()
        .build()
        .unwrap();
    let r = anthropic(&c, &s, KEY, &anthropic_body("claude", "hi", 5)).await;
    assert_eq!((r.status().as_u16(), r.version()), (200, Version::HTTP_11));
    assert_eq!(s.stats().http_versions["HTTP/1.1"], 1);
    s.shutdown().await;
}

/// The messages of an error and all its sources.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        out.push_str(" / ");
        out.push_str(&inner.to_string());
        cur = inner.source();
    }
    out
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    let s = MockServer::start(config()).await.unwrap();
    // Manual roots only, none added: the throwaway CA is unknown.
    let untrusting = reqwest::Client::builder().build().unwrap();
    let err = untrusting
        .post(format!("{}/chat/completions", s.base_url(Protocol::OpenAi)))
        .bearer_auth(KEY)
        .json(&openai_body("m", "hi", None))
        .send()
        .await
        .expect_err("an untrusted certificate must be refused");
    assert!(err.is_connect(), "{err:?}");
    let text = chain(&err);
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");

    // Another server's CA does not help either.
    let other = MockServer::start(config()).await.unwrap();
    let err = client(&other)
        .get(s.url("/_mock/health"))
        .send()
        .await
        .expect_err("a different CA must be refused");
    assert!(chain(&err).contains("certificate"), "{err:?}");

    // Nothing reached the routes; the trusting client is still served.
    assert_eq!(s.stats().total_calls, 0);
    let c = client(&s);
    assert_eq!(
        openai(&c, &s, KEY, &openai_body("m", "hi", None))
            .await
            .status(),
        200
    );
    s.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn plain_http_serves_http1_and_http2_with_prior_knowledge() {
    let s = MockServer::start(config().plain_http()).await.unwrap();
    assert!(!s.is_tls());
    assert!(s.ca_pem().is_none() && s.ca_file().is_none());
    assert_eq!(
        s.base_url(Protocol::Anthropic),
        format!("http://{}/anthropic/v1", s.addr())
    );
    let c = client(&s);
    let r = openai(&c, &s, KEY, &openai_body("m", "hi", None)).await;
    assert_eq!((r.status().as_u16(), r.version()), (200, Version::HTTP_11));
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = openai(&h2c, &s, KEY, &openai_body("m", "hi", None)).await;
    assert_eq!((r.status().as_u16(), r.version()), (200, Version::HTTP_2));
    let st = s.stats();
    assert_eq!(
        (st.http_versions["HTTP/1.1"], st.http_versions["HTTP/2.0"]),
        (1, 1)
    );
    // `plain_http` is also a config field.
    let cfg = MockConfig::from_json(r#"{"plain_http": true}"#).unwrap();
    assert!(cfg.plain_http);
    s.shutdown().await;
}
