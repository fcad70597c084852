//! Keys that share an account share one limiter, and the stats report the
//! account's ground truth next to each key's.

mod common;

use common::*;
use llmq_mock::{KeySpec, MockConfig, MockServer};

const A1: &str = "sk-acme-key-00000000001";
const A2: &str = "sk-acme-key-00000000002";
const SOLO: &str = "sk-solo-key-00000000003";

async fn server() -> MockServer {
    MockServer::start(
        MockConfig::default()
            .window_ms(60_000)
            .key(KeySpec::new(A1).label("acme#0").rpm(3).account("acme"))
            // Later keys of an account do not change its limits.
            .key(KeySpec::new(A2).label("acme#1").rpm(100).account("acme"))
            .key(KeySpec::new(SOLO).label("solo").rpm(3)),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn keys_of_one_account_share_its_limits() {
    let s = server().await;
    let c = client();
    let body = openai_body("m", "hi", Some(1));
    let mut statuses = Vec::new();
    for key in [A1, A2, A2, A1, A2] {
        statuses.push(openai(&c, &s, key, &body).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // The headers show the account's limiter.
    let r = openai(&c, &s, A2, &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header_u64(&r, "x-ratelimit-limit-requests"), 3);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-requests"), 0);
    // Another key is not affected.
    for _ in 0..3 {
        assert_eq!(openai(&c, &s, SOLO, &body).await.status(), 200);
    }

    let st = s.stats();
    let acme = &st.accounts["acme"];
    assert_eq!(acme.keys, ["acme#0", "acme#1"]);
    assert_eq!(
        (acme.accepted, acme.rejected_429, acme.peak_window_accepted),
        (3, 3, 3)
    );
    assert_eq!((acme.rpm, acme.tpm), (Some(3), None));
    assert_eq!(acme.tokens_charged, 3 * (5 + 1));
    assert_eq!(acme.peak_window_tokens, 3 * (5 + 1));
    assert_eq!(st.keys["acme#0"].accepted, 1);
    assert_eq!(st.keys["acme#1"].accepted, 2);
    assert_eq!(st.keys["acme#1"].account.as_deref(), Some("acme"));
    assert_eq!(st.keys["solo"].account, None);
    assert_eq!(st.keys["solo"].accepted, 3);
    assert_eq!(st.accounts.len(), 1);
    assert_eq!(st.total_429, 3);

    s.reset_stats();
    let acme = &s.stats().accounts["acme"];
    assert_eq!((acme.accepted, acme.peak_window_accepted), (0, 0));
    // Counters reset, the limiter did not.
    assert_eq!(openai(&c, &s, A1, &body).await.status(), 429);
    s.shutdown().await;
}

#[tokio::test]
async fn a_key_added_later_joins_the_accounts_limiter() {
    let s = server().await;
    let c = client();
    let body = openai_body("m", "hi", Some(1));
    for key in [A1, A2] {
        assert_eq!(openai(&c, &s, key, &body).await.status(), 200);
    }
    let late = "sk-acme-key-00000000009";
    s.add_keys(vec![KeySpec::new(late).label("acme#2").account("acme")]);
    assert_eq!(openai(&c, &s, late, &body).await.status(), 200);
    assert_eq!(openai(&c, &s, late, &body).await.status(), 429);
    // Over the control route, in JSON.
    let r = c
        .post(s.url("/_mock/keys"))
        .json(&serde_json::json!([{"key": "sk-acme-key-00000000010", "account": "acme", "label": "acme#3"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        openai(&c, &s, "sk-acme-key-00000000010", &body)
            .await
            .status(),
        429
    );
    let st = s.stats();
    assert_eq!(st.accounts["acme"].keys.len(), 4);
    assert_eq!(st.accounts["acme"].accepted, 3);
    let r = c.get(s.url("/_mock/stats")).send().await.unwrap();
    let (_, v) = json_of(r).await;
    assert_eq!(v["accounts"]["acme"]["peak_window_accepted"], 3);
    s.shutdown().await;
}
