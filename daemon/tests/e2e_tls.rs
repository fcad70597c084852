//! Reaching real providers (issue 11, SPEC §12), end to end with the daemon
//! process: HTTPS with HTTP/2 through each plugin, an untrusted certificate
//! (a TLS error that leaves the key alone), the bounds of a call (the job's
//! deadline, the body cap), base URLs checked at start, proxies from the
//! environment, and the TLS backend in the build.
//!
//! The mock serves HTTPS by default and the harness trusts its CA through
//! `[upstream] ca_file`; [`a_plain_http_upstream_still_works`] is the one
//! e2e test on plain HTTP.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::{FailureKind as JobFailure, Status};
use llmq_mock::{FailureKind, Injection, KeySpec, MockConfig, Protocol};
use llmq_testkit::RedisServer;
use std::process::Command;
use std::time::{Duration, Instant};

const OA: &str = "sk-test-oa-000000000001";

fn oa_mock_config() -> MockConfig {
    MockConfig::default().key(KeySpec::new(OA).label("oa#1"))
}

fn oa() -> Vec<Provider> {
    vec![Provider::new("oa", Protocol::OpenAi, "free", "m-oa")]
}

/// The resident set of a process, in bytes (`VmRSS` of /proc/PID/status).
fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

/// Peak resident set of the process so far (`VmHWM`).
fn peak_rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb * 1024
}

/// One job through, so what follows is not spent on start-up.
fn warm_up(redis: &RedisServer, daemon: &llmq_testkit::daemon::DaemonProcess) {
    let id = format!("warm-{}", ulid::Ulid::new());
    push(redis, "normal", &job(&id));
    let r = wait_results(redis, daemon, &[id], Duration::from_secs(30))
        .pop()
        .unwrap();
    assert_eq!(
        r.status,
        Status::Succeeded,
        "{r:?}\n{}",
        tail(&daemon.log(), 30)
    );
}

/// The config without `[upstream] ca_file`: the mock's CA is not trusted.
fn without_ca_file(config: &str) -> String {
    let out: Vec<&str> = config
        .lines()
        .filter(|l| !l.starts_with("ca_file = "))
        .collect();
    assert_ne!(
        out.len(),
        config.lines().count(),
        "the config had a ca_file"
    );
    out.join("\n") + "\n"
}

/// Points `[providers.<name>]` at another base URL.
fn retarget(config: &str, name: &str, base_url: &str) -> String {
    let at = config
        .find(&format!("[providers.{name}]\n"))
        .expect("the provider is in the config");
    let line = config[at..].find("base_url = ").expect("its base_url") + at;
    let end = config[line..].find('\n').expect("a line end") + line;
    format!(
        "{}base_url = \"{base_url}\"{}",
        &config[..line],
        &config[end..]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_plugin_reaches_the_mock_over_https_with_http2() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(OA).label("oa#1"))
            .key(KeySpec::new("sk-ant-test-000000000001").label("an#1"))
            .key(KeySpec::new("AIza-test-0000000000001").label("ge#1")),
    )
    .await;
    assert!(mock.base_url(Protocol::OpenAi).starts_with("https://"));
    let providers = [
        Provider::new("oa", Protocol::OpenAi, "free", "m-openai"),
        Provider::new("an", Protocol::Anthropic, "free", "m-anthropic"),
        Provider::new("ge", Protocol::Gemini, "free", "m-gemini"),
    ];
    let cfg = config(&redis, &mock, &providers, "");
    assert!(cfg.contains("ca_file = "), "{cfg}");
    let daemon = start(
        &spec(cfg)
            .env("OA_API_KEY_1", OA)
            .env("AN_API_KEY_1", "sk-ant-test-000000000001")
            .env("GE_API_KEY_1", "AIza-test-0000000000001"),
    );
    let mut ids = vec![];
    for model in ["m-openai", "m-anthropic", "m-gemini"] {
        let mut j = job(model);
        j["model"] = serde_json::json!(model);
        push(&redis, "normal", &j);
        ids.push(model.to_string());
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
                .starts_with("mock reply to:"),
            "{r:?}"
        );
    }
    let keys: Vec<&str> = results.iter().filter_map(|r| r.key.as_deref()).collect();
    assert_eq!(keys, ["oa#1", "an#1", "ge#1"]);
    // The mock's side: every call came over HTTP/2, negotiated by ALPN.
    let versions = mock.stats().http_versions;
    assert_eq!(versions.get("HTTP/2.0").copied(), Some(3), "{versions:?}");
    assert_eq!(versions.len(), 1, "only HTTP/2: {versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_the_job_with_a_tls_error_and_leaves_the_key_available() {
    let redis = RedisServer::start();
    let mock = mock(oa_mock_config()).await;
    let trusted = config(&redis, &mock, &oa(), "");
    let listen = free_listen();
    let untrusted = with_admin(&without_ca_file(&trusted), &listen);
    let mut daemon = start(&spec(untrusted).env("OA_API_KEY_1", OA));
    let admin = Admin::new(&listen, None);
    admin.wait_up(&mut daemon, Duration::from_secs(30)).await;

    push(&redis, "normal", &job("untrusted"));
    let r = wait_results(
        &redis,
        &daemon,
        &["untrusted".into()],
        Duration::from_secs(30),
    )
    .pop()
    .unwrap();
    assert_eq!(r.status, Status::Failed, "{r:?}");
    let error = r.error.as_ref().expect("an error");
    assert_eq!(error.kind, JobFailure::Upstream, "{r:?}");
    eprintln!("result error: {}", error.message);
    for needle in ["TLS/certificate error", "provider oa", "certificate"] {
        assert!(
            error.message.contains(needle),
            "{needle}: {}",
            error.message
        );
    }
    // One call, refused at the handshake: no retries, no HTTP request.
    let outcomes: Vec<(&str, &str)> = r
        .attempts
        .iter()
        .map(|a| (a.key.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, [("oa#1", "tls_error")], "{r:?}");
    assert_eq!(mock.stats().total_calls, 0);

    // The key was not at fault: it stays available ...
    let keys = admin.get("/v1/keys").await.json();
    let row = keys
        .as_array()
        .and_then(|a| a.iter().find(|k| k["id"] == "oa#1"))
        .unwrap_or_else(|| panic!("oa#1 in {keys}"));
    assert_eq!(row["status"], "available", "{row}");
    drop(daemon);

    // ... and a daemon that trusts the CA, on the same Redis, uses it at once.
    let daemon = start(&spec(trusted).env("OA_API_KEY_1", OA));
    push(&redis, "normal", &job("trusted"));
    let r = wait_results(
        &redis,
        &daemon,
        &["trusted".into()],
        Duration::from_secs(30),
    )
    .pop()
    .unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.key.as_deref(), Some("oa#1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_failure_drops_that_provider_and_the_job_goes_on_elsewhere() {
    let redis = RedisServer::start();
    let good = mock(MockConfig::default().key(KeySpec::new(OA).label("good#1"))).await;
    // Another mock with a CA of its own, which the daemon does not trust.
    let stranger =
        mock(MockConfig::default().key(KeySpec::new("sk-test-bad-000000000001").label("bad#1")))
            .await;
    let providers = [
        Provider::new("bad", Protocol::OpenAi, "free", "m"),
        Provider::new("good", Protocol::OpenAi, "paid", "m"),
    ];
    let cfg = retarget(
        &config(&redis, &good, &providers, ""),
        "bad",
        &stranger.base_url(Protocol::OpenAi),
    );
    let daemon = start(
        &spec(cfg)
            .env("BAD_API_KEY_1", "sk-test-bad-000000000001")
            .env("GOOD_API_KEY_1", OA),
    );
    push(&redis, "normal", &job("elsewhere"));
    let r = wait_results(
        &redis,
        &daemon,
        &["elsewhere".into()],
        Duration::from_secs(30),
    )
    .pop()
    .unwrap();
    assert_eq!(
        r.status,
        Status::Succeeded,
        "{r:?}\n{}",
        tail(&daemon.log(), 30)
    );
    let outcomes: Vec<(&str, &str)> = r
        .attempts
        .iter()
        .map(|a| (a.key.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [("bad#1", "tls_error"), ("good#1", "success")],
        "{r:?}"
    );
    assert_eq!(stranger.stats().total_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_cert_file_and_ssl_cert_dir_are_trusted_and_an_empty_one_stops_start() {
    let redis = RedisServer::start();
    let mock = mock(oa_mock_config()).await;
    let ca = mock.ca_file().expect("the mock speaks TLS").to_path_buf();
    let cfg = without_ca_file(&config(&redis, &mock, &oa(), ""));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ca, dir.path().join("mock-ca.pem")).unwrap();
    for (var, value) in [
        ("SSL_CERT_FILE", ca.display().to_string()),
        ("SSL_CERT_DIR", dir.path().display().to_string()),
    ] {
        let daemon = start(&spec(cfg.clone()).env("OA_API_KEY_1", OA).env(var, &value));
        warm_up(&redis, &daemon);
    }

    // Set, but without a certificate: no https upstream could be verified,
    // so check-config (and serve) stop at start.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let path = dir.path().join("llmq.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("SSL_CERT_FILE", &empty)
        .env("OA_API_KEY_1", OA)
        .args(["--config", path.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SSL_CERT_FILE/SSL_CERT_DIR is set but holds no certificate"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_upstream_still_works() {
    // The one e2e test on plain HTTP: http:// base URLs (a local Ollama or
    // vLLM) keep working, over HTTP/1.1, with no CA configured.
    let redis = RedisServer::start();
    let mock = mock(oa_mock_config().plain_http()).await;
    assert!(mock.base_url(Protocol::OpenAi).starts_with("http://"));
    let cfg = config(&redis, &mock, &oa(), "");
    assert!(!cfg.contains("ca_file"), "{cfg}");
    let daemon = start(&spec(cfg).env("OA_API_KEY_1", OA));
    warm_up(&redis, &daemon);
    let versions = mock.stats().http_versions;
    assert_eq!(versions.get("HTTP/1.1").copied(), Some(1), "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_ends_the_job_at_its_deadline() {
    let redis = RedisServer::start();
    let mock = mock(oa_mock_config()).await;
    // The upstream timeout is far later than the job's deadline.
    let cfg = with_upstream(&config(&redis, &mock, &oa(), ""), "timeout = \"60s\"");
    let daemon = start(&spec(cfg).env("OA_API_KEY_1", OA));
    warm_up(&redis, &daemon);

    mock.inject(Some("oa#1"), vec![Injection::new(FailureKind::Hang, 1)]);
    let mut j = job("hang");
    j["deadline_s"] = serde_json::json!(3);
    let pushed = Instant::now();
    push(&redis, "normal", &j);
    let r = wait_results(&redis, &daemon, &["hang".into()], Duration::from_secs(30))
        .pop()
        .unwrap();
    let took = pushed.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_secs(4),
        "result after {took:?}, not at the 3 s deadline: {r:?}"
    );
    assert_eq!(r.status, Status::Failed, "{r:?}");
    let error = r.error.as_ref().expect("an error");
    assert_eq!(error.kind, JobFailure::Deadline, "{r:?}");
    let last = r.attempts.last().expect("the hung call is an attempt");
    assert_eq!(
        (last.key.as_str(), last.outcome.as_str()),
        ("oa#1", "deadline"),
        "{r:?}"
    );
    assert!(mock.stats().keys["oa#1"].outcomes.contains_key("hang"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_or_endless_body_fails_the_call_as_transient_without_growing_the_daemon() {
    let redis = RedisServer::start();
    let mock = mock(oa_mock_config()).await;
    let daemon = start(&spec(config(&redis, &mock, &oa(), "")).env("OA_API_KEY_1", OA));
    warm_up(&redis, &daemon);
    let pid = daemon.pid().expect("the daemon runs");
    let before = rss_bytes(pid);

    // A plain body (100 MB, Content-Length declared and sent at full
    // speed), then a chunked body that never ends: each is read up to the
    // 16 MiB default cap. Each call fails, the key backs off, and the job's
    // retry on the same key succeeds.
    for (id, kind) in [
        ("huge", FailureKind::HugeBody),
        ("endless", FailureKind::EndlessBody),
    ] {
        mock.inject(Some("oa#1"), vec![Injection::new(kind, 1)]);
        push(&redis, "normal", &job(id));
        let r = wait_results(&redis, &daemon, &[id.to_string()], Duration::from_secs(30))
            .pop()
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        let outcomes: Vec<&str> = r.attempts.iter().map(|a| a.outcome.as_str()).collect();
        assert_eq!(outcomes, ["response_too_large", "success"], "{r:?}");
        assert!(r.attempts.iter().all(|a| a.key == "oa#1"), "{r:?}");
    }
    let after = rss_bytes(pid);
    // Issue 15: the peak stays within max_response_bytes + 50 MB.
    let peak = peak_rss_bytes(pid);
    assert!(
        peak < before + (16 << 20) + (50 << 20),
        "peak RSS {} KiB, from {} KiB",
        peak / 1024,
        before / 1024
    );
    let grown = after.saturating_sub(before);
    eprintln!("daemon RSS {} → {} KiB", before / 1024, after / 1024);
    assert!(
        grown < 20 * 1024 * 1024,
        "RSS grew by {} KiB ({} → {} KiB)",
        grown / 1024,
        before / 1024,
        after / 1024
    );
}

#[test]
fn a_base_url_llmq_cannot_speak_stops_serve_and_check_config_naming_the_provider() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llmq.toml");
    let mut cfg = String::from("[redis]\nurl = \"redis://127.0.0.1:1\"\n\n");
    for name in llmq::config::catalog_providers().unwrap().keys() {
        cfg.push_str(&format!("[providers.{name}]\nenabled = false\n\n"));
    }
    cfg.push_str(
        "[providers.foo]\nplugin = \"openai\"\nbase_url = \"ftp://files.example.com/v1\"\n\
         [[providers.foo.models]]\nid = \"m\"\n",
    );
    std::fs::write(&path, cfg).unwrap();
    for args in [&["serve"][..], &["check-config"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("providers.foo.base_url")
                && stderr.contains(
                    "\"ftp://files.example.com/v1\" cannot work: llmq speaks http and https"
                ),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_come_from_the_environment_and_no_proxy_is_honoured() {
    let redis = RedisServer::start();
    let mock = mock(oa_mock_config()).await;
    // A proxy that refuses every connection.
    let dead = format!("http://127.0.0.1:{}", llmq_testkit::free_port());
    let cfg = config(&redis, &mock, &oa(), "");
    let through = |no_proxy: Option<&str>| {
        let mut s = spec(cfg.clone())
            .env("OA_API_KEY_1", OA)
            .env("HTTPS_PROXY", &dead)
            .env("HTTP_PROXY", &dead);
        if let Some(n) = no_proxy {
            s = s.env("NO_PROXY", n);
        }
        s
    };

    // NO_PROXY names the mock's host: the proxy is bypassed.
    let daemon = start(&through(Some("localhost,127.0.0.1")));
    warm_up(&redis, &daemon);
    drop(daemon);

    // Without it every call goes to the dead proxy.
    let daemon = start(&through(None));
    let mut j = job("proxied");
    j["deadline_s"] = serde_json::json!(3);
    push(&redis, "normal", &j);
    let r = wait_results(
        &redis,
        &daemon,
        &["proxied".into()],
        Duration::from_secs(30),
    )
    .pop()
    .unwrap();
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert!(
        r.attempts.iter().all(|a| a.outcome == "network"),
        "every call failed at the proxy: {r:?}"
    );
    assert!(!r.attempts.is_empty(), "{r:?}");
}

#[test]
fn the_build_has_a_rustls_tls_backend() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["tree", "-p", "llmq", "-e", "features", "--offline"])
        .output()
        .expect("cargo tree runs");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "reqwest feature \"rustls-tls-native-roots\"",
        "rustls feature \"ring\"",
        "rustls-native-certs",
    ] {
        assert!(tree.contains(needle), "no {needle} in cargo tree:\n{tree}");
    }
    assert!(
        !tree.contains("aws-lc-rs"),
        "aws-lc-rs is not wanted:\n{tree}"
    );
    assert!(!tree.contains("openssl-sys"), "no OpenSSL:\n{tree}");
}
