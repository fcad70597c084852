//! `llmq keys` against a running daemon: the table shows every key's state
//! (a bad key disabled after one call, with its reason), `keys reset` and
//! `keys disable` change the live daemon, and no secret is ever printed.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq_mock::{KeySpec, KeyState, MockConfig, Protocol};
use llmq_testkit::{free_port, RedisServer};
use std::process::Command;
use std::time::Duration;

const GOOD: &str = "sk-test-keyscli-GOOD-000001";
const BAD: &str = "sk-test-keyscli-BAD-0000002";

fn llmq(daemon_cfg: &std::path::Path, env: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LLMQ_ADMIN_TOKEN", "tok-keys-cli")
        .env("P_API_KEY_1", GOOD)
        .env("P_API_KEY_2", BAD)
        .arg("--config")
        .arg(daemon_cfg)
        .arg("--env-file")
        .arg(env)
        .args(args)
        .output()
        .expect("run llmq");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_table_reset_and_disable_against_the_running_daemon() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(GOOD).label("p#1"))
            .key(KeySpec::new(BAD).label("p#2").state(KeyState::Invalid)),
    )
    .await;
    let port = free_port();
    let cfg = config(
        &redis,
        &mock,
        &[Provider::new("p", Protocol::OpenAi, "free", "m")],
        "",
    )
    .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    let spec = spec(cfg)
        .env("P_API_KEY_1", GOOD)
        .env("P_API_KEY_2", BAD)
        .env("LLMQ_ADMIN_TOKEN", "tok-keys-cli");
    let daemon = start(&spec);
    let ids: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    for id in &ids {
        push(&redis, "normal", &job(id));
    }
    wait_results(&redis, &daemon, &ids, Duration::from_secs(30));
    assert_eq!(
        mock.stats().keys["p#2"].calls,
        1,
        "the bad key got exactly one call"
    );

    let (cfg_path, env_path) = (daemon.config_path(), daemon.env_file());
    let (code, out) = llmq(&cfg_path, &env_path, &["keys"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("p#1") && out.contains("p#2"), "{out}");
    assert!(
        out.contains("disabled") && out.contains("auth_failed"),
        "{out}"
    );
    for secret in [GOOD, BAD] {
        assert!(
            !out.contains(secret) && !out.contains(&secret[..14]),
            "secret leaked:\n{out}"
        );
    }

    let (code, out) = llmq(&cfg_path, &env_path, &["keys", "reset", "p#2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("p#2") && out.contains("available"), "{out}");
    let (code, out) = llmq(
        &cfg_path,
        &env_path,
        &["keys", "disable", "p#1", "--reason", "rotating"],
    );
    assert_eq!(code, 0, "{out}");
    let (_, json) = llmq(&cfg_path, &env_path, &["keys", "--json"]);
    let views: serde_json::Value = serde_json::from_str(&json).expect("--json prints JSON");
    let p1 = views
        .as_array()
        .and_then(|a| a.iter().find(|v| v["id"] == "p#1"))
        .expect("p#1 listed");
    assert_eq!(p1["status"], "disabled");
    assert_eq!(p1["reason"], "rotating");

    let (code, out) = llmq(&cfg_path, &env_path, &["keys", "reset", "nope#9"]);
    assert_ne!(code, 0, "{out}");
}
