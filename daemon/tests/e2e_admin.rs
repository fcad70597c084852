//! Operate-it acceptance of the admin API against the real `llmq serve`
//! process (real Redis, real plugin `.so` files, the mock provider): every
//! endpoint's auth and body, key reset/disable obeyed by routing, the queue
//! view, a fan-out `POST /v1/run`, `/metrics`, `/readyz` losing Redis, the
//! JSON job-completion log line, and the dashboard in headless Chromium.

#[path = "support/chromium.rs"]
mod chromium;
#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::Status;
use llmq_mock::{KeySpec, KeyState, MockConfig, Protocol};
use llmq_testkit::daemon::DaemonProcess;
use llmq_testkit::RedisServer;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const TOKEN: &str = "e2e-admin-token-4f9c2a";
const P1: &str = "sk-test-adminp1-000000000001";
const P2: &str = "sk-test-adminp2-000000000002";
const Q1: &str = "sk-ant-test-adminq1-0000000001";
const S1: &str = "sk-test-admins1-000000000001";
const WAIT: Duration = Duration::from_secs(15);

/// Providers `p` (model `a`, two keys), `q` (model `b`) and `s` (model
/// `slow`, a key the mock answers after 700 ms).
fn providers() -> Vec<Provider> {
    vec![
        Provider::new("p", Protocol::OpenAi, "free", "a"),
        Provider::new("q", Protocol::Anthropic, "free", "b"),
        Provider::new("s", Protocol::OpenAi, "free", "slow"),
    ]
}

fn mock_config() -> MockConfig {
    MockConfig::default()
        .key(KeySpec::new(P1).label("p#1"))
        .key(KeySpec::new(P2).label("p#2"))
        .key(KeySpec::new(Q1).label("q#1"))
        .key(KeySpec::new(S1).label("s#1").latency_ms(700))
}

struct Setup {
    redis: RedisServer,
    mock: llmq_mock::MockServer,
    daemon: DaemonProcess,
    admin: Admin,
}

async fn setup(mock_cfg: MockConfig, extra: &str, log_json: bool, level: &str) -> Setup {
    let redis = RedisServer::start();
    let mock = mock(mock_cfg).await;
    let listen = free_listen();
    let cfg = with_admin(&config(&redis, &mock, &providers(), extra), &listen);
    let mut spec = spec(cfg)
        .env("P_API_KEY_1", P1)
        .env("P_API_KEY_2", P2)
        .env("Q_API_KEY_1", Q1)
        .env("S_API_KEY_1", S1)
        .env("LLMQ_ADMIN_TOKEN", TOKEN)
        .env("LLMQ_LOG", level);
    if log_json {
        spec.args.push("--log-format".into());
        spec.args.push("json".into());
    }
    let mut daemon = start(&spec);
    let admin = Admin::new(&listen, Some(TOKEN));
    admin.wait_up(&mut daemon, WAIT).await;
    Setup {
        redis,
        mock,
        daemon,
        admin,
    }
}

fn job_for(id: &str, model: &str) -> Value {
    let mut j = job(id);
    j["model"] = json!(model);
    j
}

/// Pushes `n` jobs for `model` and waits for their results (off the async
/// workers, so the in-process mock keeps serving).
async fn run_jobs(s: &Setup, prefix: &str, model: &str, n: usize) -> Vec<llmq::job::JobResult> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        push(&s.redis, "normal", &job_for(id, model));
    }
    let results = tokio::task::block_in_place(|| wait_results(&s.redis, &s.daemon, &ids, WAIT));
    for r in &results {
        assert_eq!(
            r.status,
            Status::Succeeded,
            "{r:?}\n{}",
            tail(&s.daemon.log(), 40)
        );
    }
    results
}

fn calls(mock: &llmq_mock::MockServer, label: &str) -> u64 {
    mock.stats().keys.get(label).map_or(0, |k| k.calls)
}

fn key_row<'a>(keys: &'a Value, id: &str) -> &'a Value {
    keys.as_array()
        .and_then(|a| a.iter().find(|k| k["id"] == id))
        .unwrap_or_else(|| panic!("no key {id} in {keys}"))
}

/// Every protected route, as `(method, path, body)`.
fn protected_routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys/p%231/reset", None),
        ("POST", "/v1/keys/p%231/disable", None),
        ("GET", "/v1/usage", None),
        ("GET", "/v1/routes", None),
        ("GET", "/v1/queue", None),
        (
            "POST",
            "/v1/run",
            Some(json!({"messages": [{"role": "user", "content": "x"}]})),
        ),
        ("GET", "/v1/cluster", None),
        ("GET", "/metrics", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_admin_endpoint_against_the_real_daemon() {
    let s = setup(mock_config(), "[queue]\nconcurrency = 2\n", false, "info").await;
    let admin = &s.admin;

    // Auth: every protected route answers 401 without a token or with a
    // wrong one, and did nothing (no key got disabled, no job ran).
    for (method, path, body) in protected_routes() {
        for anon in [
            admin.with_token(None),
            admin.with_token(Some("wrong-token")),
        ] {
            let a = anon.call(method, path, body.as_ref()).await;
            assert_eq!(
                a.status, 401,
                "{method} {path} without a valid token: {a:?}"
            );
            assert_eq!(a.www_authenticate.as_deref(), Some("Bearer"), "{path}");
            assert!(!a.body.contains(TOKEN));
        }
    }
    assert_eq!(s.mock.stats().total_calls, 0, "an unauthorised /v1/run ran");

    // Health and readiness need no token.
    let anon = admin.with_token(None);
    let h = anon.get("/healthz").await;
    assert_eq!((h.status, h.body.as_str()), (200, "ok"));
    let r = anon.get("/readyz").await;
    assert_eq!(r.status, 200, "{r:?}");
    let rj = r.json();
    assert_eq!(rj["ready"], true, "{rj}");
    assert_eq!(rj["redis"], true, "{rj}");
    assert!(
        rj["plugins"].as_u64().unwrap() >= 2,
        "openai and anthropic loaded: {rj}"
    );

    // Keys: ids, masked forms, status.
    let keys = admin.get("/v1/keys").await;
    assert_eq!(keys.status, 200, "{keys:?}");
    let kj = keys.json();
    let ids: Vec<&str> = kj
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["p#1", "p#2", "q#1", "s#1"], "{kj}");
    assert_eq!(key_row(&kj, "p#1")["masked"], "sk-…0001");
    assert_eq!(key_row(&kj, "q#1")["masked"], "sk-ant-…0001");
    for k in kj.as_array().unwrap() {
        assert_eq!(k["status"], "available", "{k}");
    }
    for secret in [P1, P2, Q1, S1] {
        assert!(!keys.body.contains(secret));
    }

    // Some traffic, spread over both keys of `p`.
    let first = run_jobs(&s, "warm", "a", 6).await;
    let used: BTreeSet<&str> = first.iter().filter_map(|r| r.key.as_deref()).collect();
    assert_eq!(used, BTreeSet::from(["p#1", "p#2"]), "round-robin over p");

    // Disable p#1: the view says so, and routing obeys it.
    let d = admin
        .post(
            "/v1/keys/p%231/disable",
            Some(&json!({"reason": "e2e: parked by operator"})),
        )
        .await;
    assert_eq!(d.status, 200, "{d:?}");
    let dj = d.json();
    assert_eq!(dj["id"], "p#1");
    assert_eq!(dj["status"], "disabled");
    assert_eq!(dj["reason"], "e2e: parked by operator");
    // Persisted before the answer: the keystore hash already says so.
    assert_eq!(
        keystore_status(&s.redis, "p#1").as_deref(),
        Some("disabled")
    );
    let reason: Option<String> = redis::cmd("HGET")
        .arg("llmq:{key:p#1}:state")
        .arg("pool_reason")
        .query(&mut s.redis.client())
        .unwrap();
    assert_eq!(reason.as_deref(), Some("e2e: parked by operator"));
    let kj = admin.get("/v1/keys").await.json();
    assert_eq!(key_row(&kj, "p#1")["status"], "disabled");
    let before = calls(&s.mock, "p#1");
    let parked = run_jobs(&s, "parked", "a", 6).await;
    assert!(
        parked.iter().all(|r| r.key.as_deref() == Some("p#2")),
        "a disabled key got a job: {:?}",
        parked.iter().map(|r| r.key.clone()).collect::<Vec<_>>()
    );
    assert_eq!(calls(&s.mock, "p#1"), before, "the mock saw a call on p#1");

    // Reset it: available again and used again.
    let r = admin.post("/v1/keys/p%231/reset", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["status"], "available");
    assert_eq!(
        keystore_status(&s.redis, "p#1").as_deref(),
        Some("available")
    );
    let back = run_jobs(&s, "back", "a", 6).await;
    assert!(
        back.iter().any(|r| r.key.as_deref() == Some("p#1")),
        "p#1 unused after reset"
    );
    assert!(calls(&s.mock, "p#1") > before);

    // Unknown keys are 404s, not 500s.
    for path in ["/v1/keys/nope%239/reset", "/v1/keys/garbage/disable"] {
        let a = admin.post(path, None).await;
        assert_eq!(a.status, 404, "{path}: {a:?}");
    }

    // Usage: one row per key/provider/model/day with the calls made.
    let usage = admin.get("/v1/usage").await;
    assert_eq!(usage.status, 200, "{usage:?}");
    let rows = usage.json();
    let rows = rows.as_array().unwrap();
    let req_of = |key: &str| -> u64 {
        rows.iter()
            .filter(|r| r["key"] == key)
            .map(|r| r["requests"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(req_of("p#1"), calls(&s.mock, "p#1"), "{rows:?}");
    assert_eq!(req_of("p#2"), calls(&s.mock, "p#2"), "{rows:?}");
    for r in rows.iter().filter(|r| r["key"] == "p#1") {
        assert_eq!(r["provider"], "p");
        assert_eq!(r["model"], "a");
        assert!(r["tokens_in"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["day"].as_str().unwrap().len(), 10, "{r}");
    }
    let bad = admin.get("/v1/usage?since=yesterday").await;
    assert_eq!(bad.status, 400, "{bad:?}");

    // Routes: every route for a plain job; only q/b for model b.
    let routes = admin.get("/v1/routes").await;
    assert_eq!(routes.status, 200, "{routes:?}");
    let rj = routes.json();
    let names: BTreeSet<&str> = rj["branches"][0]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["route"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["p/a", "q/b", "s/slow"]), "{rj}");
    let only_b = admin
        .post(
            "/v1/routes",
            Some(&json!({"model": "b", "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await
        .json();
    let b_routes = only_b["branches"][0]["routes"].as_array().unwrap();
    assert_eq!(b_routes.len(), 1, "{only_b}");
    assert_eq!(b_routes[0]["route"], "q/b");

    // Queue: empty lanes, then depth and in-flight while slow jobs run
    // two at a time, then a dead letter and a delayed retry.
    let q = admin.get("/v1/queue").await;
    assert_eq!(q.status, 200, "{q:?}");
    let qj = q.json();
    let lanes: Vec<&str> = qj["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lane"].as_str().unwrap())
        .collect();
    assert_eq!(lanes, vec!["high", "normal", "low"], "{qj}");
    assert_eq!(qj["in_flight"], 0, "{qj}");
    let slow_ids: Vec<String> = (0..5).map(|i| format!("slow-{i}")).collect();
    for id in &slow_ids {
        push(&s.redis, "low", &job_for(id, "slow"));
    }
    let mut seen_busy = Value::Null;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let qj = admin.get("/v1/queue").await.json();
        let low = qj["lanes"][2]["depth"].as_u64().unwrap();
        if low >= 1 && qj["in_flight"].as_u64().unwrap() >= 1 {
            seen_busy = qj;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !seen_busy.is_null(),
        "never saw a waiting low lane with jobs in flight"
    );
    assert!(seen_busy["in_flight"].as_u64().unwrap() <= 2, "{seen_busy}");
    tokio::task::block_in_place(|| wait_results(&s.redis, &s.daemon, &slow_ids, WAIT));
    {
        let mut c = s.redis.client();
        let _: String = redis::cmd("XADD")
            .arg("llmq:{jobs}:normal")
            .arg("*")
            .arg("job")
            .arg("{not json")
            .query(&mut c)
            .unwrap();
        // A retry due in a day: counted as delayed, never moved back.
        let due = llmq::clock::Clock::unix_ms(&llmq::clock::SystemClock::default()) + 86_400_000;
        let member = format!("normal\n1\n{due}\n0-1\n[]\n{}", job_for("later", "a"));
        let _: i64 = redis::cmd("ZADD")
            .arg("llmq:{jobs}:delayed")
            .arg(due)
            .arg(member)
            .query(&mut c)
            .unwrap();
    }
    let mut last;
    let settled = {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            last = admin.get("/v1/queue").await.json();
            let depth: u64 = last["lanes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["depth"].as_u64().unwrap())
                .sum();
            if last["dead"] == 1 && last["delayed"] == 1 && depth == 0 && last["in_flight"] == 0 {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(
        settled,
        "queue never showed 1 dead, 1 delayed, empty lanes: {last}"
    );

    // Fan-out through POST /v1/run (seed 003's shape).
    let run = admin
        .post(
            "/v1/run",
            Some(&json!({
                "messages": [{"role": "user", "content": "compare us"}],
                "models": ["a", "b"],
                "max_tokens": 16
            })),
        )
        .await;
    assert_eq!(run.status, 200, "{run:?}");
    let rj = run.json();
    assert_eq!(rj["status"], "succeeded", "{rj}");
    assert_eq!(rj["successful"], 2, "{rj}");
    assert_eq!(rj["failed"], 0, "{rj}");
    let models: BTreeSet<&str> = rj["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "succeeded", "{r}");
            assert!(
                r["output"].as_str().unwrap().starts_with("mock reply"),
                "{r}"
            );
            r["model"].as_str().unwrap()
        })
        .collect();
    assert_eq!(models, BTreeSet::from(["a", "b"]));
    let bad_run = admin.post("/v1/run", Some(&json!([1, 2]))).await;
    assert_eq!(bad_run.status, 400, "{bad_run:?}");

    // Prometheus: job and per-key call counters, key states, queue gauges.
    let m = admin.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.body.contains("llmq_jobs_total{"), "{}", m.body);
    let p1_calls = m
        .body
        .lines()
        .find(|l| l.starts_with("llmq_upstream_calls_total{") && l.contains(r#"key="p#1""#))
        .unwrap_or_else(|| panic!("no p#1 call counter:\n{}", m.body));
    assert!(p1_calls.contains(r#"provider="p""#), "{p1_calls}");
    assert!(p1_calls.contains(r#"outcome="success""#), "{p1_calls}");
    assert!(
        m.body
            .contains(r#"llmq_key_state{key="p#1",state="available"} 1"#),
        "{}",
        m.body
    );
    assert!(m.body.contains("llmq_jobs_dead 1"), "{}", m.body);
    for secret in [P1, P2, Q1, S1, TOKEN] {
        assert!(!m.body.contains(secret));
    }

    // Redis goes away: not ready (503), still healthy.
    let mut s = s;
    s.redis.kill();
    let deadline = std::time::Instant::now() + WAIT;
    let last = loop {
        let r = anon.get("/readyz").await;
        if r.status == 503 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(last.status, 503, "{last:?}");
    let lj = last.json();
    assert_eq!(lj["ready"], false, "{lj}");
    assert!(lj["error"].as_str().unwrap().contains("redis"), "{lj}");
    assert_eq!(anon.get("/healthz").await.status, 200);
}

/// One JSON log line per finished job, with the job id, lane, route and
/// key id; lines logged inside a call carry the `job` and `call` spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_completion_is_one_json_log_line_with_ids() {
    let s = setup(mock_config(), "", true, "debug").await;
    s.mock.inject(
        Some("p#1"),
        vec![
            llmq_mock::Injection::new(llmq_mock::FailureKind::RateLimited429, 1)
                .retry_after_ms(5_000),
        ],
    );
    let results = run_jobs(&s, "logged", "a", 3).await;
    let log = s.daemon.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for r in &results {
        let done: Vec<&Value> = lines
            .iter()
            .filter(|l| l["message"] == "job finished" && l["job"] == r.id.as_str())
            .collect();
        assert_eq!(done.len(), 1, "one completion line for {}:\n{log}", r.id);
        let l = done[0];
        assert_eq!(l["lane"], "normal", "{l}");
        assert_eq!(l["status"], "succeeded", "{l}");
        assert_eq!(l["provider"], "p", "{l}");
        assert_eq!(l["model"], "a", "{l}");
        assert_eq!(l["key"], r.key.as_deref().unwrap(), "{l}");
        assert_eq!(l["attempts"], r.attempts.len(), "{l}");
        assert!(l["level"] == "INFO" || l["level"] == "DEBUG", "{l}");
    }
    // The 429 is logged inside the job's span, naming the key by id.
    let cooled = lines
        .iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.contains("429")))
        .unwrap_or_else(|| panic!("no 429 line:\n{log}"));
    assert_eq!(cooled["key"], "p#1", "{cooled}");
    assert_eq!(cooled["span"]["name"], "job", "{cooled}");
    assert!(cooled["span"]["id"]
        .as_str()
        .unwrap()
        .starts_with("logged-"));
    assert_eq!(cooled["span"]["lane"], "normal");
    assert_eq!(cooled["span"]["attempt"], 1);
    // Lines logged during the upstream call carry the `call` span too.
    let in_call = lines
        .iter()
        .find(|l| l["span"]["name"] == "call")
        .unwrap_or_else(|| panic!("no line inside a call span:\n{log}"));
    assert_eq!(in_call["span"]["provider"], "p", "{in_call}");
    assert_eq!(in_call["span"]["model"], "a", "{in_call}");
    assert!(in_call["span"]["key"].as_str().unwrap().starts_with("p#"));
    assert!(
        in_call["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "job"),
        "{in_call}"
    );
    for secret in [P1, P2, Q1, S1, TOKEN] {
        assert!(!log.contains(secret));
    }
}

/// The dashboard in a real headless Chromium against the real daemon: it
/// shows the keys, a key disabled by the upstream (invalid) is reset with
/// its button, and the reset reaches the pool and the keystore in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_resets_a_disabled_key_in_chromium() {
    let bin = chromium::require_chromium("dashboard_resets_a_disabled_key_in_chromium");
    let mock_cfg = MockConfig::default()
        .key(KeySpec::new(P1).label("p#1").state(KeyState::Invalid))
        .key(KeySpec::new(P2).label("p#2"))
        .key(KeySpec::new(Q1).label("q#1"))
        .key(KeySpec::new(S1).label("s#1"));
    let s = setup(
        mock_cfg,
        "[keys]\nreprobe_interval = \"1h\"\n",
        false,
        "info",
    )
    .await;
    // An invalid key is disabled after its first call; the job moves on.
    let results = run_jobs(&s, "dash", "a", 4).await;
    assert!(results.iter().all(|r| r.key.as_deref() == Some("p#2")));
    assert_eq!(calls(&s.mock, "p#1"), 1, "one call found p#1 invalid");
    let kj = s.admin.get("/v1/keys").await.json();
    assert_eq!(key_row(&kj, "p#1")["status"], "disabled", "{kj}");
    assert_eq!(
        keystore_status(&s.redis, "p#1").as_deref(),
        Some("disabled")
    );

    let browser = chromium::Browser::launch(&bin).await;
    let mut page = browser.open(&format!("{}/", s.admin.base)).await;
    page.wait_for(
        "document.getElementById('auth') && !document.getElementById('auth').hidden",
        WAIT,
        "the token prompt",
    )
    .await;
    page.eval(&format!(
        "document.getElementById('token').value = '{TOKEN}'"
    ))
    .await;
    page.click("#token-save").await;
    page.wait_for(
        r#"document.querySelectorAll('tr[data-key-id]').length === 4 && document.querySelector('tr[data-key-id="p#1"]')?.dataset.status === 'disabled'"#,
        WAIT,
        "the four key rows with p#1 disabled",
    )
    .await;
    for (id, masked) in [("p#2", "sk-…0002"), ("q#1", "sk-ant-…0001")] {
        let text = page
            .eval(&format!(
                r#"document.querySelector('tr[data-key-id="{id}"]').textContent"#
            ))
            .await;
        assert!(text.as_str().unwrap().contains(masked), "{id}: {text}");
    }
    page.click(r#"button[data-reset="p#1"]"#).await;
    page.wait_for(
        r#"document.querySelector('tr[data-key-id="p#1"]').dataset.status === 'available'"#,
        WAIT,
        "the p#1 row to show the key available",
    )
    .await;
    let kj = s.admin.get("/v1/keys").await.json();
    assert_eq!(key_row(&kj, "p#1")["status"], "available", "{kj}");
    let redis = &s.redis;
    llmq_testkit::wait_until(WAIT, "the keystore to record p#1 available", || {
        keystore_status(redis, "p#1").as_deref() == Some("available")
    });
    let html = page.eval("document.documentElement.outerHTML").await;
    for secret in [P1, P2, Q1, S1, TOKEN] {
        assert!(!html.as_str().unwrap().contains(secret));
    }
    assert_eq!(
        page.eval("document.getElementById('error').textContent")
            .await,
        ""
    );
}

/// A key's persisted status, read straight from the keystore's Redis hash
/// (`llmq:{key:<id>}:state`, field `pool_status`).
fn keystore_status(redis: &RedisServer, id: &str) -> Option<String> {
    let key = llmq::keystore::state_key(&id.parse().unwrap());
    assert_eq!(key, format!("llmq:{{key:{id}}}:state"));
    redis::cmd("HGET")
        .arg(key)
        .arg(llmq::keystore::STATUS)
        .query(&mut redis.client())
        .unwrap()
}
