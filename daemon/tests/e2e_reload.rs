//! The daemon's life cycle as an operator drives it, on the real `llmq
//! serve` process: SIGHUP reloads the keys of `--env-file` without failing
//! a job in flight (an added key is used, a removed one is not); a reload
//! that fails changes nothing; repeated reloads reuse the loaded plugins;
//! and bad start-ups fail fast with an exit code and a message that names
//! the culprit (config field, unsafe admin listen address). A bad plugin
//! file does not stop a start-up: see e2e_plugin_faults.rs.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::Status;
use llmq_mock::{KeySpec, MockConfig, Protocol};
use llmq_testkit::daemon::write_env_file;
use llmq_testkit::{plugin_dir, RedisServer};
use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const K1: &str = "sk-test-reload-key-000000001";
const K2: &str = "sk-test-reload-key-000000002";
const K3: &str = "sk-test-reload-key-000000003";
const TOKEN: &str = "reload-admin-token-1b2c";
const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_keys_from_the_env_file_without_failing_jobs() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(K1).label("p#1").latency_ms(300))
            .key(KeySpec::new(K2).label("p#2").latency_ms(300))
            .key(KeySpec::new(K3).label("p#3").latency_ms(300)),
    )
    .await;
    let listen = free_listen();
    let providers = [Provider::new("p", Protocol::OpenAi, "free", "a")];
    let cfg = with_admin(
        &config(&redis, &mock, &providers, "[queue]\nconcurrency = 8\n"),
        &listen,
    );
    // Keys only in the env file (the process env would win over it and
    // could not be taken away): start once to get the daemon's dir, write
    // the file, start again on the same dir.
    let spec = spec(cfg).env("LLMQ_ADMIN_TOKEN", TOKEN);
    let mut daemon = start(&spec);
    write_env_file(
        &daemon.env_file(),
        &[("P_API_KEY_1", K1), ("P_API_KEY_2", K2)],
    );
    daemon.restart(&spec);
    let admin = Admin::new(&listen, Some(TOKEN));
    admin.wait_up(&mut daemon, WAIT).await;
    let ids_of = |keys: serde_json::Value| -> Vec<String> {
        keys.as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids_of(admin.get("/v1/keys").await.json()), ["p#1", "p#2"]);

    // Jobs in flight (300 ms each, 8 at a time) when the reload happens.
    let first: Vec<String> = (0..16).map(|i| format!("before-{i}")).collect();
    for id in &first {
        push(&redis, "normal", &job(id));
    }
    eventually(WAIT, "calls in flight at the mock", || {
        mock.stats().total_calls >= 4
    });
    write_env_file(
        &daemon.env_file(),
        &[("P_API_KEY_1", K1), ("P_API_KEY_3", K3)],
    );
    let reloads_before = daemon.log().matches("reloaded config and keys").count();
    daemon.signal("HUP");
    eventually(WAIT, "the reload to be logged", || {
        daemon.log().matches("reloaded config and keys").count() > reloads_before
    });
    let done_at_reload = {
        let mut c = redis.client();
        let keys: Vec<String> = first.iter().map(|id| format!("llmq:result:{id}")).collect();
        let n: usize = redis::cmd("EXISTS").arg(&keys).query(&mut c).unwrap();
        n
    };
    assert!(
        done_at_reload < first.len(),
        "the reload came after every job had finished; nothing was in flight"
    );
    assert_eq!(ids_of(admin.get("/v1/keys").await.json()), ["p#1", "p#3"]);
    let p2_calls = mock.stats().keys["p#2"].calls;

    let second: Vec<String> = (0..16).map(|i| format!("after-{i}")).collect();
    for id in &second {
        push(&redis, "normal", &job(id));
    }
    let before = tokio::task::block_in_place(|| wait_results(&redis, &daemon, &first, WAIT));
    let after = tokio::task::block_in_place(|| wait_results(&redis, &daemon, &second, WAIT));

    // No job in flight during the reload failed or was retried.
    for r in &before {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(r.attempts.len(), 1, "{r:?}");
    }
    // After it: the new key serves, the removed one gets nothing.
    for r in &after {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert!(
            r.attempts.iter().all(|a| a.key != "p#2"),
            "a removed key was used: {r:?}"
        );
    }
    let used: BTreeSet<&str> = after.iter().filter_map(|r| r.key.as_deref()).collect();
    assert!(
        used.contains("p#3"),
        "the added key was never used: {used:?}"
    );
    let stats = mock.stats();
    assert_eq!(
        stats.keys["p#2"].calls, p2_calls,
        "p#2 called after the reload"
    );
    assert!(stats.keys["p#3"].calls >= 1, "{stats:?}");
    assert_eq!(stats.total_429, 0);
    assert_eq!(daemon.stop(), Some(0), "{}", tail(&daemon.log(), 30));
}

/// Runs `llmq serve` with this config (and `env`); returns its exit code
/// and stderr. Killed (and the test failed) if it is still up after 10 s.
fn serve_exit(config: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llmq.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("llmq serve did not refuse to start:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err, path.display().to_string())
}

#[test]
fn a_bad_config_exits_2_naming_the_file_and_field() {
    let cfg = format!(
        "[redis]\nurl = \"redis://127.0.0.1:1\"\n[plugins]\ndir = \"{}\"\n[queue]\nconcurrency = \"lots\"\n",
        plugin_dir().display()
    );
    let (code, err, path) = serve_exit(&cfg, &[], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&path), "names the file: {err}");
    assert!(err.contains("queue.concurrency"), "names the field: {err}");

    // A field that does not exist is named too.
    let cfg = cfg.replace("concurrency = \"lots\"", "concurency = 4");
    let (code, err, _) = serve_exit(&cfg, &[], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("concurency"), "names the unknown field: {err}");
}

#[test]
fn a_public_admin_listen_without_a_token_is_refused() {
    let port = llmq_testkit::free_port();
    let cfg = format!(
        "[redis]\nurl = \"redis://127.0.0.1:1\"\n[plugins]\ndir = \"{}\"\n[admin]\nlisten = \"0.0.0.0:{port}\"\n",
        plugin_dir().display()
    );
    let started = Instant::now();
    let (code, err, path) = serve_exit(&cfg, &[], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused before waiting on Redis"
    );
    assert!(err.contains(&path), "names the file: {err}");
    assert!(err.contains("admin.listen"), "names the field: {err}");
    assert!(!err.contains("bad request"), "{err}");
    assert!(
        err.contains("refusing to serve the admin API on non-loopback 0.0.0.0"),
        "{err}"
    );
    assert!(
        err.contains("LLMQ_ADMIN_TOKEN"),
        "says how to fix it: {err}"
    );

    // A blank token counts as none.
    let (code, err, _) = serve_exit(&cfg, &[("LLMQ_ADMIN_TOKEN", "  ")], &[]);
    assert_eq!(code, 2, "{err}");
}

/// Redis down when the daemon starts: it serves its admin API, takes no job
/// until Redis is back and the stored key state is restored, and then
/// honours it (a key a previous run disabled stays disabled).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_state_is_restored_when_redis_comes_back_after_start() {
    let mut redis = RedisServer::start_with(llmq_testkit::Persistence::Aof);
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(K1).label("p#1"))
            .key(KeySpec::new(K2).label("p#2")),
    )
    .await;
    {
        // What an earlier run left: p#1 disabled, no probe for an hour.
        let now = llmq::clock::Clock::unix_ms(&llmq::clock::SystemClock::default());
        let _: () = redis::cmd("HSET")
            .arg("llmq:{key:p#1}:state")
            .arg("pool_status")
            .arg("disabled")
            .arg("pool_reason")
            .arg("auth_failed")
            .arg("pool_since_ms")
            .arg(now)
            .arg("pool_next_probe_ms")
            .arg(now + 3_600_000)
            .query(&mut redis.client())
            .unwrap();
    }
    redis.kill();
    let listen = free_listen();
    let providers = [Provider::new("p", Protocol::OpenAi, "free", "a")];
    let spec = spec(with_admin(&config(&redis, &mock, &providers, ""), &listen))
        .env("P_API_KEY_1", K1)
        .env("P_API_KEY_2", K2)
        .env("LLMQ_ADMIN_TOKEN", TOKEN);
    let mut daemon = start(&spec);
    let admin = Admin::new(&listen, Some(TOKEN));
    admin.wait_up(&mut daemon, WAIT).await;
    assert!(
        daemon.log().contains("key state not restored yet"),
        "{}",
        daemon.log()
    );
    assert_eq!(admin.with_token(None).get("/readyz").await.status, 503);

    redis.restart();
    let ids: Vec<String> = (0..6).map(|i| format!("late-{i}")).collect();
    for id in &ids {
        push(&redis, "normal", &job(id));
    }
    let results = tokio::task::block_in_place(|| wait_results(&redis, &daemon, &ids, WAIT));
    assert!(daemon.log().contains("key state restored from redis"));
    for r in &results {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(r.key.as_deref(), Some("p#2"), "{r:?}");
    }
    assert_eq!(
        mock.stats().keys["p#1"].calls,
        0,
        "the disabled key was called"
    );
    let keys = admin.get("/v1/keys").await.json();
    let p1 = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "p#1")
        .unwrap()
        .clone();
    assert_eq!(p1["status"], "disabled", "{p1}");
    assert_eq!(p1["reason"], "auth_failed", "{p1}");
    assert_eq!(daemon.stop(), Some(0), "{}", tail(&daemon.log(), 30));
}

/// A SIGHUP whose config fails validation (here: a plugins dir that does
/// not exist, which `serve` refuses at start) changes nothing: keys and
/// limits in `/v1/keys` are exactly what they were, though the new env
/// file and config change both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fails_validation_changes_nothing() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(K1).label("p#1"))
            .key(KeySpec::new(K2).label("p#2"))
            .key(KeySpec::new(K3).label("p#3")),
    )
    .await;
    let listen = free_listen();
    let providers = [Provider::new("p", Protocol::OpenAi, "free", "a").with("max_concurrent = 4")];
    let cfg = with_admin(&config(&redis, &mock, &providers, ""), &listen);
    let spec = spec(cfg.clone()).env("LLMQ_ADMIN_TOKEN", TOKEN);
    let mut daemon = start(&spec);
    write_env_file(
        &daemon.env_file(),
        &[("P_API_KEY_1", K1), ("P_API_KEY_2", K2)],
    );
    daemon.restart(&spec);
    let admin = Admin::new(&listen, Some(TOKEN));
    admin.wait_up(&mut daemon, WAIT).await;
    let before = admin.get("/v1/keys").await.json();
    assert_eq!(before.as_array().unwrap().len(), 2, "{before}");
    assert_eq!(before[0]["limits"]["max_concurrent"], 4, "{before}");

    // New keys and limits, and a plugins dir that does not exist.
    write_env_file(
        &daemon.env_file(),
        &[("P_API_KEY_1", K1), ("P_API_KEY_3", K3)],
    );
    let bad = cfg
        .replace("max_concurrent = 4", "max_concurrent = 1")
        .replace(
            &format!("dir = \"{}\"", plugin_dir().display()),
            "dir = \"/nonexistent/llmq-plugins\"",
        );
    assert!(bad.contains("/nonexistent/llmq-plugins") && bad.contains("max_concurrent = 1"));
    std::fs::write(daemon.config_path(), &bad).unwrap();
    daemon.signal("HUP");
    eventually(WAIT, "the reload to fail", || {
        daemon
            .log()
            .contains("reload failed; keeping the running config")
    });
    assert!(
        daemon.log().contains("/nonexistent/llmq-plugins"),
        "the failure names the dir: {}",
        tail(&daemon.log(), 10)
    );
    let after = admin.get("/v1/keys").await.json();
    assert_eq!(before, after, "a failed reload changed the keys");
    assert!(!daemon.log().contains("reloaded config and keys"));

    // The running config still serves.
    push(&redis, "normal", &job("after-failed-reload"));
    let r = tokio::task::block_in_place(|| {
        wait_results(&redis, &daemon, &["after-failed-reload".to_string()], WAIT)
    });
    assert_eq!(r[0].status, Status::Succeeded, "{:?}", r[0]);
    assert_eq!(daemon.stop(), Some(0), "{}", tail(&daemon.log(), 30));
}

/// Lines of /proc/<pid>/maps that map a file in `dir`.
fn mapped_from(pid: u32, dir: &std::path::Path) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let dir = dir.display().to_string();
    maps.lines().filter(|l| l.contains(&dir)).count()
}

/// Ten SIGHUPs load no plugin again: the mapped plugin libraries stay as
/// they were, and no plugin (nor the refused bad-ABI file beside them) is
/// loaded a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reloads_reuse_the_loaded_plugins() {
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(KeySpec::new(K1).label("p#1"))).await;
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(plugin_dir()).unwrap() {
        let f = entry.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let bad = llmq_testkit::fixture_plugin("bad-abi");
    std::fs::copy(&bad, dir.path().join(bad.file_name().unwrap())).unwrap();
    let providers = [Provider::new("p", Protocol::OpenAi, "free", "a")];
    let cfg = config(&redis, &mock, &providers, "").replace(
        &format!("dir = \"{}\"", plugin_dir().display()),
        &format!("dir = \"{}\"", dir.path().display()),
    );
    let spec = spec(cfg).env("P_API_KEY_1", K1);
    let mut daemon = start(&spec);
    push(&redis, "normal", &job("before"));
    let r = tokio::task::block_in_place(|| {
        wait_results(&redis, &daemon, &["before".to_string()], WAIT)
    });
    assert_eq!(r[0].status, Status::Succeeded, "{:?}", r[0]);
    let pid = daemon.pid().unwrap();
    let mapped = mapped_from(pid, dir.path());
    assert!(mapped > 0, "no plugin mapped from {}", dir.path().display());
    let loaded = daemon.log().matches("plugin loaded").count();
    let refused = daemon.log().matches("plugin refused").count();
    assert_eq!(loaded, 3, "{}", tail(&daemon.log(), 20));
    assert_eq!(refused, 1, "{}", tail(&daemon.log(), 20));

    for i in 1..=10 {
        daemon.signal("HUP");
        eventually(WAIT, "the reload to be logged", || {
            daemon.log().matches("reloaded config and keys").count() >= i
        });
    }
    assert_eq!(
        mapped_from(pid, dir.path()),
        mapped,
        "mapped libraries grew"
    );
    assert_eq!(
        daemon.log().matches("plugin loaded").count(),
        loaded,
        "plugins loaded again: {}",
        tail(&daemon.log(), 20)
    );
    assert_eq!(daemon.log().matches("plugin refused").count(), refused);
    push(&redis, "normal", &job("after"));
    let r =
        tokio::task::block_in_place(|| wait_results(&redis, &daemon, &["after".to_string()], WAIT));
    assert_eq!(r[0].status, Status::Succeeded, "{:?}", r[0]);
    assert_eq!(daemon.stop(), Some(0), "{}", tail(&daemon.log(), 30));
}
