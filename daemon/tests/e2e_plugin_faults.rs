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

/// A plugins dir with the first-party plugins and these fixture plugins.
fn plugins_with(fixtures: &[&str]) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(plugin_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let copies = fixtures
        .iter()
        .map(|name| {
            let so = fixture_plugin(name);
            let copy = dir.path().join(so.file_name().unwrap());
            std::fs::copy(&so, &copy).unwrap();
            copy
        })
        .collect();
    (dir, copies)
}

/// The e2e config on another plugins dir.
fn on_plugins_dir(cfg: String, dir: &std::path::Path) -> String {
    let from = format!("dir = \"{}\"", plugin_dir().display());
    assert!(cfg.contains(&from));
    cfg.replace(&from, &format!("dir = \"{}\"", dir.display()))
}

const TOKEN: &str = "plugin-faults-admin-token";

/// A bad-ABI `.so` beside the real plugins: `serve` starts, serves every
/// provider whose plugin loaded, and names the refused file in `/readyz`,
/// `/v1/keys` and `llmq keys` (the provider that wanted it is disabled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_abi_plugin_is_refused_and_the_other_providers_serve() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new("sk-test-badabi-ok-0001").label("ok#1"))
            .key(KeySpec::new("sk-test-badabi-an-0001").label("an#1"))
            .key(KeySpec::new("sk-test-badabi-bb-0001").label("bb#1")),
    )
    .await;
    let (dir, copies) = plugins_with(&["bad-abi"]);
    let bad_name = copies[0].file_name().unwrap().to_str().unwrap().to_string();
    let providers = [
        Provider::new("ok", Protocol::OpenAi, "free", "m-ok"),
        Provider::new("an", Protocol::Anthropic, "free", "m-an"),
        Provider::new("bb", Protocol::OpenAi, "free", "m-bb"),
    ];
    let listen = free_listen();
    let cfg = with_admin(
        &on_plugins_dir(config(&redis, &mock, &providers, ""), dir.path()),
        &listen,
    )
    .replace(
        "[providers.bb]\nplugin = \"openai\"",
        "[providers.bb]\nplugin = \"bad-abi\"",
    );
    assert!(cfg.contains("plugin = \"bad-abi\""));
    let spec = spec(cfg)
        .env("OK_API_KEY_1", "sk-test-badabi-ok-0001")
        .env("AN_API_KEY_1", "sk-test-badabi-an-0001")
        .env("BB_API_KEY_1", "sk-test-badabi-bb-0001")
        .env("LLMQ_ADMIN_TOKEN", TOKEN);
    let mut daemon = start(&spec);
    let admin = Admin::new(&listen, Some(TOKEN));
    admin.wait_up(&mut daemon, Duration::from_secs(20)).await;
    assert!(
        daemon.log().contains(&bad_name),
        "the refusal is logged naming the file: {}",
        tail(&daemon.log(), 30)
    );

    // Jobs for the providers whose plugins loaded succeed; the one whose
    // plugin was refused is not routed to.
    let cases = [("ok-1", "m-ok"), ("an-1", "m-an"), ("bb-1", "m-bb")];
    let mut ids = vec![];
    for (id, model) in cases {
        let mut j = job(id);
        j["model"] = serde_json::json!(model);
        push(&redis, "normal", &j);
        ids.push(id.to_string());
    }
    let results = tokio::task::block_in_place(|| {
        wait_results(&redis, &daemon, &ids, Duration::from_secs(30))
    });
    assert_eq!(results[0].status, Status::Succeeded, "{:?}", results[0]);
    assert_eq!(results[1].status, Status::Succeeded, "{:?}", results[1]);
    assert_eq!(results[2].status, Status::Failed, "{:?}", results[2]);
    assert_eq!(mock.stats().keys["bb#1"].calls, 0);

    // /readyz: ready (providers serve), and the refused file is named.
    let ready = admin.with_token(None).get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let body = ready.json();
    assert_eq!(body["ready"], true, "{body}");
    let problems = body["plugin_problems"].to_string();
    assert!(
        problems.contains(&bad_name) && problems.to_lowercase().contains("abi"),
        "{body}"
    );

    // /v1/keys: the provider without its plugin is disabled, naming the file.
    let keys = admin.get("/v1/keys").await.json();
    let key = |id: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap_or_else(|| panic!("no key {id} in {keys}"))
            .clone()
    };
    let bb = key("bb#1");
    assert_eq!(bb["status"], "disabled", "{bb}");
    let reason = bb["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("bad-abi") && reason.contains(&bad_name),
        "{bb}"
    );
    assert_eq!(key("ok#1")["status"], "available");

    // `llmq keys` shows the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmq"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LLMQ_ADMIN_TOKEN", TOKEN)
        .arg("--config")
        .arg(daemon.config_path())
        .arg("--env-file")
        .arg(daemon.env_file())
        .arg("keys")
        .output()
        .expect("run llmq keys");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("bb#1"))
        .unwrap_or_else(|| panic!("no bb#1 row: {text}"));
    assert!(
        line.contains("disabled") && line.contains(&bad_name),
        "{line}"
    );
    assert!(daemon.is_running());
    assert_eq!(daemon.stop(), Some(0), "{}", tail(&daemon.log(), 30));
}

/// A plugin whose `parse` spins for 10 s: each of its jobs fails at the
/// call time limit (1 s here) naming the plugin, jobs of another provider
/// keep flowing meanwhile, and after 3 timeouts the plugin is quarantined:
/// its next job fails at once and its keys show as disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_fails_its_jobs_at_the_time_limit_and_is_quarantined() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new("sk-test-looping-ok-0001").label("ok#1"))
            .key(KeySpec::new("sk-test-looping-lp-0001").label("lp#1")),
    )
    .await;
    let (dir, _) = plugins_with(&["looping"]);
    let providers = [
        Provider::new("ok", Protocol::OpenAi, "free", "m-ok"),
        Provider::new("lp", Protocol::OpenAi, "free", "m-lp"),
    ];
    let listen = free_listen();
    let cfg = with_admin(
        &on_plugins_dir(
            config(&redis, &mock, &providers, "[queue]\nconcurrency = 16\n"),
            dir.path(),
        ),
        &listen,
    )
    .replace(
        "[providers.lp]\nplugin = \"openai\"",
        "[providers.lp]\nplugin = \"looping\"",
    )
    .replace(
        &format!("dir = \"{}\"", dir.path().display()),
        &format!(
            "dir = \"{}\"\ncall_timeout = \"1s\"\nquarantine_after = 3",
            dir.path().display()
        ),
    );
    assert!(cfg.contains("call_timeout = \"1s\"") && cfg.contains("plugin = \"looping\""));
    let spec = spec(cfg)
        .env("OK_API_KEY_1", "sk-test-looping-ok-0001")
        .env("LP_API_KEY_1", "sk-test-looping-lp-0001")
        .env("LLMQ_ADMIN_TOKEN", TOKEN);
    let mut daemon = start(&spec);
    let admin = Admin::new(&listen, Some(TOKEN));
    admin.wait_up(&mut daemon, Duration::from_secs(20)).await;

    // Three looping jobs first, then a stream of good ones.
    let looping: Vec<String> = (0..3).map(|i| format!("loop-{i}")).collect();
    for id in &looping {
        let mut j = job(id);
        j["model"] = serde_json::json!("m-lp");
        push(&redis, "normal", &j);
    }
    eventually(
        Duration::from_secs(10),
        "the looping calls upstream",
        || mock.stats().keys.get("lp#1").is_some_and(|k| k.calls >= 3),
    );
    let pushed = std::time::Instant::now();
    let good: Vec<String> = (0..12).map(|i| format!("good-{i}")).collect();
    for id in &good {
        let mut j = job(id);
        j["model"] = serde_json::json!("m-ok");
        push(&redis, "normal", &j);
    }
    let good_results = tokio::task::block_in_place(|| {
        wait_results(&redis, &daemon, &good, Duration::from_secs(30))
    });
    for r in &good_results {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    // They flowed while the plugin spun (it spins 10 s per call).
    assert!(
        pushed.elapsed() < Duration::from_secs(8),
        "good jobs took {:?}",
        pushed.elapsed()
    );
    let loop_results = tokio::task::block_in_place(|| {
        wait_results(&redis, &daemon, &looping, Duration::from_secs(30))
    });
    for r in &loop_results {
        assert_eq!(r.status, Status::Failed, "{r:?}");
        let msg = &r.error.as_ref().expect("an error").message;
        assert!(
            msg.contains("plugin looping") && msg.contains("call_timeout"),
            "{r:?}"
        );
        assert!(r.duration_ms < 8_000, "failed at its time limit: {r:?}");
    }
    assert!(
        daemon.log().contains("plugin call timed out"),
        "{}",
        tail(&daemon.log(), 30)
    );

    // Quarantined: the next job fails at once, without a call upstream.
    let calls = mock.stats().keys["lp#1"].calls;
    let mut j = job("loop-after");
    j["model"] = serde_json::json!("m-lp");
    push(&redis, "normal", &j);
    let r = tokio::task::block_in_place(|| {
        wait_results(
            &redis,
            &daemon,
            &["loop-after".to_string()],
            Duration::from_secs(30),
        )
    });
    assert_eq!(r[0].status, Status::Failed, "{:?}", r[0]);
    let msg = &r[0].error.as_ref().unwrap().message;
    assert!(msg.contains("quarantined"), "{:?}", r[0]);
    assert!(r[0].duration_ms < 1_000, "{:?}", r[0]);
    assert_eq!(mock.stats().keys["lp#1"].calls, calls);
    let keys = admin.get("/v1/keys").await.json();
    let lp = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "lp#1")
        .unwrap()
        .clone();
    assert_eq!(lp["status"], "disabled", "{lp}");
    assert!(
        lp["reason"].as_str().unwrap_or("").contains("quarantined"),
        "{lp}"
    );
    assert!(daemon.is_running());
}
