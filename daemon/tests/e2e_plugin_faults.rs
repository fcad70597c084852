//! A plugin that panics or returns garbage fails the job, not the daemon:
//! the real daemon process loads the deliberately broken fixture plugins
//! next to the first-party ones, serves jobs through each, and keeps
//! serving good jobs afterwards.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::{FailureKind, Status};
use llmq_mock::{KeySpec, MockConfig, Protocol};
use llmq_testkit::{fixture_plugin, plugin_dir, RedisServer};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_and_garbage_plugins_fail_their_jobs_and_the_daemon_keeps_serving() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new("sk-test-faults-ok-0001").label("ok#1"))
            .key(KeySpec::new("sk-test-faults-pp-0001").label("pp#1"))
            .key(KeySpec::new("sk-test-faults-gg-0001").label("gg#1")),
    )
    .await;
    // A plugins dir with the first-party plugins and two broken ones.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(plugin_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    for name in ["panicky", "garbage"] {
        let so = fixture_plugin(name);
        std::fs::copy(&so, dir.path().join(so.file_name().unwrap())).unwrap();
    }
    let providers = [
        Provider::new("ok", Protocol::OpenAi, "free", "m-ok"),
        Provider::new("pp", Protocol::OpenAi, "free", "panic").model("pp-parse"),
        Provider::new("gg", Protocol::OpenAi, "free", "gg-m"),
    ];
    let cfg = config(&redis, &mock, &providers, "")
        .replace(
            &format!("dir = \"{}\"", plugin_dir().display()),
            &format!("dir = \"{}\"", dir.path().display()),
        )
        .replace(
            "[providers.pp]\nplugin = \"openai\"",
            "[providers.pp]\nplugin = \"panicky\"",
        )
        .replace(
            "[providers.gg]\nplugin = \"openai\"",
            "[providers.gg]\nplugin = \"garbage\"",
        );
    assert!(cfg.contains("plugin = \"panicky\"") && cfg.contains("plugin = \"garbage\""));
    let spec = spec(cfg)
        .env("OK_API_KEY_1", "sk-test-faults-ok-0001")
        .env("PP_API_KEY_1", "sk-test-faults-pp-0001")
        .env("GG_API_KEY_1", "sk-test-faults-gg-0001");
    let mut daemon = start(&spec);

    let cases = [
        ("prepare-panics", "panic"),
        ("parse-panics", "pp-parse"),
        ("garbage", "gg-m"),
        ("good-1", "m-ok"),
    ];
    let mut ids = vec![];
    for (id, model) in cases {
        let mut j = job(id);
        j["model"] = serde_json::json!(model);
        push(&redis, "normal", &j);
        ids.push(id.to_string());
    }
    let results = wait_results(&redis, &daemon, &ids, Duration::from_secs(30));
    for r in &results[..3] {
        assert_eq!(r.status, Status::Failed, "{r:?}");
        let err = r.error.as_ref().expect("an error");
        assert_eq!(err.kind, FailureKind::Upstream, "{r:?}");
        assert!(err.message.contains("plugin"), "{r:?}");
    }
    assert!(results[0]
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("panicked"));
    assert!(results[1]
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("panicked"));
    assert!(results[2]
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("garbage"));
    assert_eq!(results[3].status, Status::Succeeded, "{:?}", results[3]);
    assert!(daemon.is_running(), "the daemon survived");

    // And it keeps serving.
    let more: Vec<String> = (2..8).map(|i| format!("good-{i}")).collect();
    for id in &more {
        let mut j = job(id);
        j["model"] = serde_json::json!("m-ok");
        push(&redis, "normal", &j);
    }
    let results = wait_results(&redis, &daemon, &more, Duration::from_secs(30));
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    assert!(daemon.is_running());
}
