//! The whole path with real parts: a job pushed with plain Redis commands
//! runs through the daemon process, a real plugin `.so` and the mock
//! provider, and its result comes back in the contract's shape.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::Status;
use llmq_mock::{KeySpec, MockConfig, Protocol};
use llmq_testkit::RedisServer;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_flow_through_each_protocol_and_come_back() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new("sk-test-oa-000000000001").label("oa#1"))
            .key(KeySpec::new("sk-ant-test-000000000001").label("an#1"))
            .key(KeySpec::new("AIza-test-0000000000001").label("ge#1")),
    )
    .await;
    let providers = [
        Provider::new("oa", Protocol::OpenAi, "free", "m-openai"),
        Provider::new("an", Protocol::Anthropic, "free", "m-anthropic"),
        Provider::new("ge", Protocol::Gemini, "free", "m-gemini"),
    ];
    let spec = spec(config(&redis, &mock, &providers, ""))
        .env("OA_API_KEY_1", "sk-test-oa-000000000001")
        .env("AN_API_KEY_1", "sk-ant-test-000000000001")
        .env("GE_API_KEY_1", "AIza-test-0000000000001");
    let daemon = start(&spec);

    let mut ids = vec![];
    for (i, model) in ["m-openai", "m-anthropic", "m-gemini"].iter().enumerate() {
        for n in 0..5 {
            let id = format!("j{i}-{n}");
            let mut j = job(&id);
            j["model"] = serde_json::json!(model);
            j["metadata"] = serde_json::json!({"n": n});
            push(&redis, ["high", "normal", "low"][n % 3], &j);
            ids.push(id);
        }
    }
    let results = wait_results(&redis, &daemon, &ids, Duration::from_secs(30));
    for r in &results {
        assert_eq!(
            r.status,
            Status::Succeeded,
            "{r:?}\n{}",
            tail(&daemon.log(), 30)
        );
        assert!(
            r.output
                .as_deref()
                .unwrap_or("")
                .starts_with("mock reply to: hello from"),
            "{r:?}"
        );
        let usage = r.usage.expect("usage");
        assert!(usage.input_tokens > 0 && usage.output_tokens > 0, "{r:?}");
        assert_eq!(r.tier, Some(llmq::job::Tier::Free));
        assert_eq!(r.attempts.len(), 1);
        assert!(
            r.metadata.as_ref().and_then(|m| m.get("n")).is_some(),
            "metadata echoed"
        );
        let (provider, key) = match r.model.as_deref() {
            Some("m-openai") => ("oa", "oa#1"),
            Some("m-anthropic") => ("an", "an#1"),
            Some("m-gemini") => ("ge", "ge#1"),
            other => panic!("unexpected model {other:?}"),
        };
        assert_eq!(r.provider.as_deref(), Some(provider));
        assert_eq!(r.key.as_deref(), Some(key));
    }
    // The done markers and the results stream announce them too.
    let mut c = redis.client();
    let n: usize = redis::cmd("XLEN")
        .arg("llmq:results")
        .query(&mut c)
        .unwrap();
    assert_eq!(n, ids.len());
    let marker: Vec<String> = redis::cmd("LRANGE")
        .arg("llmq:done:j0-0")
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap();
    assert_eq!(marker, vec!["succeeded".to_string()]);
    assert_eq!(mock.stats().total_calls, ids.len() as u64);
}
