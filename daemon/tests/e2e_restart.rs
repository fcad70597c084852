//! A daemon restart keeps what it learned about keys: disabled keys stay
//! disabled (no second call to a bad key), cooldowns keep running, and the
//! daily counters continue from where they were (issue 4).

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::Status;
use llmq_mock::{FailureKind, Injection, KeySpec, KeyState, MockConfig, Protocol};
use llmq_testkit::RedisServer;
use std::collections::HashMap;
use std::time::Duration;

const GOOD: &str = "sk-test-restart-good-00000001";
const COOL: &str = "sk-test-restart-cool-00000002";
const BAD: &str = "sk-test-restart-bad-000000003";

fn key_hash(redis: &RedisServer, id: &str) -> HashMap<String, String> {
    let mut c = redis.client();
    redis::cmd("HGETALL")
        .arg(format!("llmq:{{key:{id}}}:state"))
        .query(&mut c)
        .unwrap_or_default()
}

fn daily_requests(redis: &RedisServer, id: &str) -> u64 {
    let mut c = redis.client();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("llmq:daily:*:{id}"))
        .query(&mut c)
        .unwrap_or_default();
    keys.iter()
        .map(|k| {
            redis::cmd("HGET")
                .arg(k)
                .arg("requests")
                .query::<Option<u64>>(&mut c)
                .ok()
                .flatten()
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_disabled_keys_cooldowns_and_daily_counters() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(GOOD).label("r#1"))
            .key(KeySpec::new(COOL).label("r#2"))
            .key(KeySpec::new(BAD).label("r#3").state(KeyState::Invalid)),
    )
    .await;
    // r#2 answers its first call with a 429 asking for a 10-minute pause.
    mock.inject(
        Some(COOL),
        vec![Injection::new(FailureKind::RateLimited429, 1).retry_after_ms(600_000)],
    );
    let spec = spec(config(
        &redis,
        &mock,
        &[Provider::new("r", Protocol::OpenAi, "free", "m")],
        "",
    ))
    .env("R_API_KEY_1", GOOD)
    .env("R_API_KEY_2", COOL)
    .env("R_API_KEY_3", BAD);
    let mut daemon = start(&spec);
    let ids: Vec<String> = (0..12).map(|i| format!("before-{i}")).collect();
    for id in &ids {
        push(&redis, "normal", &job(id));
    }
    let results = wait_results(&redis, &daemon, &ids, Duration::from_secs(30));
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    let before = mock.stats();
    assert_eq!(before.keys["r#3"].calls, 1);
    assert_eq!(
        before.keys["r#2"].calls, 1,
        "the 429 cooled r#2 down after one call"
    );
    // The flusher writes counters every second; the stop flushes the rest.
    assert_eq!(daemon.stop(), Some(0), "SIGTERM exits cleanly");
    let state = key_hash(&redis, "r#3");
    assert_eq!(
        state.get("pool_status").map(String::as_str),
        Some("disabled"),
        "{state:?}"
    );
    assert_eq!(
        key_hash(&redis, "r#2")
            .get("pool_status")
            .map(String::as_str),
        Some("cooling")
    );
    let daily_before = daily_requests(&redis, "r#1");
    assert!(
        daily_before >= 10,
        "daily requests of r#1 persisted: {daily_before}"
    );

    daemon.restart(&spec);
    let ids: Vec<String> = (0..12).map(|i| format!("after-{i}")).collect();
    for id in &ids {
        push(&redis, "normal", &job(id));
    }
    let results = wait_results(&redis, &daemon, &ids, Duration::from_secs(30));
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    assert!(
        results.iter().all(|r| r.key.as_deref() == Some("r#1")),
        "only the good key serves after the restart: {:?}",
        results.iter().map(|r| r.key.clone()).collect::<Vec<_>>()
    );
    let after = mock.stats();
    assert_eq!(
        after.keys["r#3"].calls, 1,
        "the disabled key was not called again"
    );
    assert_eq!(
        after.keys["r#2"].calls, 1,
        "the cooldown outlived the restart"
    );
    daemon.stop();
    let daily_after = daily_requests(&redis, "r#1");
    assert_eq!(
        daily_after,
        daily_before + 12,
        "daily counters continue across the restart"
    );
}
