//! Cost-priority routing, end to end (issue 5): the real `llmq serve`
//! process, a private Redis and the mock provider, with time compressed into
//! windows of a few seconds.
//!
//! - spill to paid when free is saturated, and return to free after the window;
//! - `max_tier = "free"` jobs wait for free capacity instead of spilling;
//! - capabilities and context size pick the model;
//! - a daily budget stops paid spend at the cap;
//! - fan-out with one failing model;
//! - `llmq routes` output (snapshot);
//! - an upstream 429 moves the job to the next key at once and cools the key.
//!
//! Every test prints its measured figures (`--nocapture` shows them).

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::{FailureKind, JobResult, Status, Tier};
use llmq_mock::{FailureKind as Inject, Injection, KeySpec, MockConfig, MockServer, Protocol};
use llmq_testkit::daemon::DaemonProcess;
use llmq_testkit::{free_port, RedisServer};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

/// A secret for a key label (`fr#1` → `sk-test-fr-1-000000000000`).
fn secret(label: &str) -> String {
    format!("sk-test-{}-000000000000", label.replace('#', "-"))
}

/// A mock key labelled with the daemon's key id.
fn key(label: &str) -> KeySpec {
    KeySpec::new(secret(label)).label(label)
}

/// One `[[providers.<p>.models]]` table.
fn model(
    provider: &str,
    id: &str,
    caps: &[&str],
    context: Option<u64>,
    price: (f64, f64),
) -> String {
    let caps: Vec<String> = caps.iter().map(|c| format!("{c:?}")).collect();
    let context = context.map_or(String::new(), |c| format!("context = {c}\n"));
    format!(
        "\n[[providers.{provider}.models]]\nid = \"{id}\"\ncapabilities = [{}]\n{context}price = {{ input = {:?}, output = {:?} }}\n",
        caps.join(", "),
        price.0,
        price.1
    )
}

/// An OpenAI-protocol provider with hand-written settings and models (the
/// models go after the settings, so `models` of the harness stays empty).
fn provider(name: &str, tier: &'static str, settings: &[&str], models: &[String]) -> Provider {
    let mut extra: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
    extra.extend(models.iter().cloned());
    Provider {
        name: name.into(),
        protocol: Protocol::OpenAi,
        tier,
        models: vec![],
        extra,
    }
}

/// Starts the daemon with these keys (daemon ids such as `fr#1`) and,
/// optionally, the admin API on a free loopback port.
fn start_daemon(config: String, keys: &[&str], admin: Option<u16>) -> DaemonProcess {
    let mut s = spec(config);
    for k in keys {
        let (p, n) = k.split_once('#').expect("key id provider#N");
        s = s.env(&format!("{}_API_KEY_{n}", p.to_uppercase()), &secret(k));
    }
    if let Some(port) = admin {
        s.args.push("--admin-listen".into());
        s.args.push(format!("127.0.0.1:{port}"));
    }
    start(&s)
}

/// XADDs many jobs in one pipeline (a burst), returns their ids.
fn push_all(redis: &RedisServer, lane: &str, jobs: &[Value]) -> Vec<String> {
    let mut c = redis.client();
    let mut pipe = redis::pipe();
    for j in jobs {
        pipe.cmd("XADD")
            .arg(format!("llmq:{{jobs}}:{lane}"))
            .arg("*")
            .arg("job")
            .arg(j.to_string())
            .ignore();
    }
    let _: () = pipe.query(&mut c).expect("XADD pipeline");
    jobs.iter()
        .map(|j| j["id"].as_str().expect("job id").to_string())
        .collect()
}

/// Pushes one job and waits for its result.
fn run_one(redis: &RedisServer, daemon: &DaemonProcess, j: Value) -> JobResult {
    let ids = push_all(redis, "normal", &[j]);
    wait_results(redis, daemon, &ids, Duration::from_secs(10)).remove(0)
}

fn jobs(prefix: &str, n: usize, f: impl Fn(&mut Value)) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut j = job(&format!("{prefix}{i:03}"));
            f(&mut j);
            j
        })
        .collect()
}

fn count(results: &[JobResult], f: impl Fn(&JobResult) -> bool) -> usize {
    results.iter().filter(|r| f(r)).count()
}

fn on(r: &JobResult, provider: &str) -> bool {
    r.provider.as_deref() == Some(provider)
}

fn assert_all_succeeded(results: &[JobResult], daemon: &DaemonProcess) {
    for r in results {
        assert_eq!(
            r.status,
            Status::Succeeded,
            "{r:?}\ndaemon log:\n{}",
            tail(&daemon.log(), 40)
        );
    }
}

fn accepted(mock: &MockServer, label: &str) -> u64 {
    mock.stats().keys.get(label).map_or(0, |k| k.accepted)
}

fn calls(mock: &MockServer, label: &str) -> u64 {
    mock.stats().keys.get(label).map_or(0, |k| k.calls)
}

/// A result's `finished_at` (RFC 3339) as Unix ms.
fn unix_ms(rfc3339: &str) -> u64 {
    let t: jiff::Timestamp = rfc3339
        .parse()
        .unwrap_or_else(|e| panic!("finished_at {rfc3339:?}: {e}"));
    t.as_millisecond() as u64
}

/// The admin API of a daemon, over HTTP.
struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    async fn new(port: u16) -> Admin {
        let a = Admin {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        poll(Duration::from_secs(10), "admin API up", || async {
            a.http
                .get(format!("{}/healthz", a.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        a
    }

    /// `GET /v1/keys`, by id.
    async fn key(&self, id: &str) -> Value {
        let keys: Value = self
            .http
            .get(format!("{}/v1/keys", self.base))
            .send()
            .await
            .expect("GET /v1/keys")
            .json()
            .await
            .expect("keys JSON");
        keys.as_array()
            .expect("a list of keys")
            .iter()
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no key {id} in {keys}"))
    }
}

/// Polls an async condition every 20 ms until it holds or `timeout` passes.
async fn poll<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- 1. spill and return

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_fills_free_then_spills_to_paid_and_returns_to_free_after_the_window() {
    spill_and_return(Some(4000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "real 60 s window; run with --ignored"]
async fn spill_and_return_with_real_minute_windows() {
    spill_and_return(None).await;
}

/// The spill/return scenario; `window_ms = None` is the real minute (no
/// `window` in the daemon's config).
async fn spill_and_return(window_ms: Option<u64>) {
    let t_test = Instant::now();
    let window_line = window_ms.map_or(String::new(), |ms| format!("window = \"{ms}ms\""));
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .window_ms(window_ms.unwrap_or(60_000))
            .key(key("fr#1").rpm(30))
            .key(key("fr#2").rpm(30))
            .key(key("pd#1").rpm(1000)),
    )
    .await;
    let providers = [
        provider(
            "fr",
            "free",
            &["limits = { rpm = 30 }", &window_line],
            &[model("fr", "m-free", &["json"], Some(100_000), (0.0, 0.0))],
        ),
        provider(
            "pd",
            "paid",
            &["limits = { rpm = 1000 }", &window_line],
            &[model("pd", "m-paid", &["json"], Some(100_000), (0.5, 1.5))],
        ),
    ];
    let cfg = config(
        &redis,
        &mock,
        &providers,
        "[routing]\nwait_for_cheaper = \"300ms\"\n",
    );
    let window = Duration::from_millis(window_ms.unwrap_or(60_000));
    let admin_port = free_port();
    let daemon = start_daemon(cfg, &["fr#1", "fr#2", "pd#1"], Some(admin_port));
    let admin = Admin::new(admin_port).await;

    // First burst: 150 jobs, 2 free keys × 30 per window.
    let t0 = Instant::now();
    let ids = push_all(&redis, "normal", &jobs("s1-", 150, |_| {}));
    let first = wait_results(&redis, &daemon, &ids, Duration::from_secs(10));
    let burst1_ms = t0.elapsed().as_millis();
    assert_all_succeeded(&first, &daemon);
    let free = count(&first, |r| r.tier == Some(Tier::Free) && on(r, "fr"));
    let paid = count(&first, |r| r.tier == Some(Tier::Paid) && on(r, "pd"));
    assert_eq!((free, paid), (60, 90), "free vs paid in the first window");
    for r in &first {
        assert_eq!(r.attempts.len(), 1, "no retries needed: {r:?}");
        if on(r, "pd") {
            // It waited `wait_for_cheaper` for free capacity, then spilled
            // without waiting for the free window to reopen.
            assert!(
                r.duration_ms >= 300 && u128::from(r.duration_ms) < window.as_millis(),
                "paid job should spill after 300 ms: {r:?}"
            );
        }
    }
    let s = mock.stats();
    let (f1, f2, p1) = (&s.keys["fr#1"], &s.keys["fr#2"], &s.keys["pd#1"]);
    assert_eq!(f1.accepted + f2.accepted, 60, "{s:?}");
    assert!(
        f1.peak_window_accepted <= 30 && f2.peak_window_accepted <= 30,
        "{s:?}"
    );
    assert_eq!(p1.accepted, 90, "{s:?}");
    assert_eq!(s.total_429, 0, "no upstream 429s: {s:?}");
    assert_eq!(s.total_calls, 150);

    // Return: once the free window has passed, a new burst goes to free only.
    let t_wait = Instant::now();
    poll(
        window + Duration::from_secs(4),
        "free windows empty again",
        || async {
            admin.key("fr#1").await["window"]["requests"] == 0
                && admin.key("fr#2").await["window"]["requests"] == 0
        },
    )
    .await;
    let waited_ms = t_wait.elapsed().as_millis();
    let t1 = Instant::now();
    let ids = push_all(&redis, "normal", &jobs("s2-", 30, |_| {}));
    let second = wait_results(&redis, &daemon, &ids, Duration::from_secs(10));
    let burst2_ms = t1.elapsed().as_millis();
    assert_all_succeeded(&second, &daemon);
    assert_eq!(
        count(&second, |r| r.tier == Some(Tier::Free) && on(r, "fr")),
        30,
        "after the window every job returns to free"
    );
    let s = mock.stats();
    assert_eq!(
        s.keys["fr#1"].accepted + s.keys["fr#2"].accepted,
        90,
        "{s:?}"
    );
    assert_eq!(s.keys["pd#1"].accepted, 90, "no new paid calls: {s:?}");
    assert!(s.keys["fr#1"].peak_window_accepted <= 30 && s.keys["fr#2"].peak_window_accepted <= 30);
    assert_eq!(s.total_429, 0);
    let max_paid_ms = first
        .iter()
        .filter(|r| on(r, "pd"))
        .map(|r| r.duration_ms)
        .max();
    println!(
        "spill/return: burst 1 (150 jobs) free={free} paid={paid} (fr#1 {} + fr#2 {}, pd#1 {}) in {burst1_ms} ms, \
         slowest paid job {max_paid_ms:?} ms; waited {waited_ms} ms for the window; burst 2 (30 jobs) free=30 in {burst2_ms} ms; \
         upstream 429s: {}; test wall {} ms",
        f1.accepted,
        f2.accepted,
        p1.accepted,
        s.total_429,
        t_test.elapsed().as_millis()
    );
}

// ---------------------------------------------------------------- 2. max_tier

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tier_free_jobs_wait_for_free_capacity_instead_of_spilling() {
    let t_test = Instant::now();
    let redis = RedisServer::start();
    let window_ms = 3000u64;
    let mock = mock(
        MockConfig::default()
            .window_ms(window_ms)
            .key(key("fr#1").rpm(5))
            .key(key("fr#2").rpm(5))
            .key(key("pd#1").rpm(1000)),
    )
    .await;
    let providers = [
        provider(
            "fr",
            "free",
            &["limits = { rpm = 5 }", "window = \"3s\""],
            &[model("fr", "m-free", &["json"], Some(100_000), (0.0, 0.0))],
        ),
        provider(
            "pd",
            "paid",
            &["limits = { rpm = 1000 }", "window = \"3s\""],
            &[model("pd", "m-paid", &["json"], Some(100_000), (0.5, 1.5))],
        ),
    ];
    let cfg = config(
        &redis,
        &mock,
        &providers,
        "[routing]\nwait_for_cheaper = \"200ms\"\n",
    );
    let daemon = start_daemon(cfg, &["fr#1", "fr#2", "pd#1"], None);

    // Saturate free: 10 jobs take the 10 slots of this window.
    let ids = push_all(&redis, "normal", &jobs("a", 10, |_| {}));
    let a = wait_results(&redis, &daemon, &ids, Duration::from_secs(10));
    let t_saturated = Instant::now();
    assert_all_succeeded(&a, &daemon);
    assert_eq!(count(&a, |r| on(r, "fr")), 10);

    // Now 10 free-only jobs and 5 unconstrained ones.
    let mut burst = jobs("b", 10, |j| j["route"] = json!({"max_tier": "free"}));
    burst.extend(jobs("c", 5, |_| {}));
    let ids = push_all(&redis, "normal", &burst);
    let results = wait_results(&redis, &daemon, &ids, Duration::from_secs(12));
    let until_done = t_saturated.elapsed().as_millis();
    assert_all_succeeded(&results, &daemon);
    let (b, c) = results.split_at(10);
    assert!(
        b.iter().all(|r| on(r, "fr") && r.tier == Some(Tier::Free)),
        "max_tier free never reaches paid: {b:?}"
    );
    assert!(
        c.iter().all(|r| on(r, "pd")),
        "unconstrained jobs spill meanwhile: {c:?}"
    );
    // They waited for the window (not failed): no free slot can reopen before
    // the earliest first-window call was admitted + the window. And they were
    // woken promptly when it reopened: within a second of the last slot.
    let first_admit = a
        .iter()
        .map(|r| unix_ms(&r.finished_at) - r.duration_ms)
        .min()
        .unwrap_or(0);
    let last_done = a.iter().map(|r| unix_ms(&r.finished_at)).max().unwrap_or(0);
    let b_done: Vec<u64> = b.iter().map(|r| unix_ms(&r.finished_at)).collect();
    let (min_b, max_b) = (
        b_done.iter().min().copied().unwrap_or(0),
        b_done.iter().max().copied().unwrap_or(0),
    );
    assert!(
        min_b >= first_admit + window_ms,
        "free-only jobs ran only once the window reopened: {} ms after the first slot",
        min_b - first_admit
    );
    assert!(
        max_b <= last_done + window_ms + 1000,
        "and promptly: {} ms after the last slot of the first window",
        max_b - last_done
    );
    let waits: Vec<u64> = b.iter().map(|r| r.duration_ms).collect();
    let (min_b, max_b) = (
        waits.iter().min().copied().unwrap_or(0),
        waits.iter().max().copied().unwrap_or(0),
    );
    let s = mock.stats();
    assert_eq!(
        s.keys["pd#1"].accepted, 5,
        "only the unconstrained jobs paid: {s:?}"
    );
    assert_eq!(s.keys["fr#1"].accepted + s.keys["fr#2"].accepted, 20);
    assert!(s.keys["fr#1"].peak_window_accepted <= 5 && s.keys["fr#2"].peak_window_accepted <= 5);
    assert_eq!(s.total_429, 0, "{s:?}");
    println!(
        "max_tier: 10 free-only jobs waited {min_b}..{max_b} ms (window {window_ms} ms), all on free; \
         5 unconstrained spilled to paid; done {until_done} ms after saturation; 429s {}; test wall {} ms",
        s.total_429,
        t_test.elapsed().as_millis()
    );
}

// ---------------------------------------------------------------- 3. capabilities and context

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_and_context_size_choose_the_model() {
    let t_test = Instant::now();
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .window_ms(2000)
            .key(key("sm#1"))
            .key(key("lg#1"))
            .key(key("vi#1").rpm(1))
            // Were a long prompt sent to the small model, the mock would refuse it.
            .context("m-small", 200),
    )
    .await;
    let providers = [
        provider(
            "sm",
            "free",
            &[],
            &[model("sm", "m-small", &["json"], Some(200), (0.0, 0.0))],
        ),
        provider(
            "lg",
            "paid",
            &[],
            &[model("lg", "m-large", &["json"], Some(100_000), (0.2, 0.4))],
        ),
        provider(
            "vi",
            "paid",
            // One call per window: the second vision job has to wait for it.
            &["limits = { rpm = 1 }", "window = \"2s\""],
            &[model(
                "vi",
                "m-vision",
                &["vision"],
                Some(100_000),
                (1.0, 2.0),
            )],
        ),
    ];
    let cfg = config(
        &redis,
        &mock,
        &providers,
        "[routing]\nwait_for_cheaper = \"100ms\"\n",
    );
    let daemon = start_daemon(cfg, &["sm#1", "lg#1", "vi#1"], None);

    let long_text = "lorem ipsum dolor sit amet ".repeat(80); // ~540 tokens > 200
    let jobs = vec![
        job("short"),
        json!({"id": "long", "messages": [{"role": "user", "content": long_text}], "max_tokens": 16}),
        json!({"id": "vision-req", "messages": [{"role": "user", "content": "describe"}],
               "require": ["vision"], "max_tokens": 16}),
        json!({"id": "vision-img", "max_tokens": 16, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}),
        json!({"id": "tools", "messages": [{"role": "user", "content": "call"}], "require": ["tools"]}),
    ];
    let ids = push_all(&redis, "normal", &jobs);
    let r = wait_results(&redis, &daemon, &ids, Duration::from_secs(10));
    let by_id = |id: &str| r.iter().find(|x| x.id == id).expect("result");

    let short = by_id("short");
    assert_eq!(short.status, Status::Succeeded, "{short:?}");
    assert_eq!(
        short.model.as_deref(),
        Some("m-small"),
        "cheapest that fits: {short:?}"
    );

    let long = by_id("long");
    assert_eq!(long.status, Status::Succeeded, "{long:?}");
    assert_eq!(
        long.model.as_deref(),
        Some("m-large"),
        "too long for context 200: the larger (and cheaper than vision) model: {long:?}"
    );
    assert_eq!(
        long.attempts.len(),
        1,
        "sent to the right model first: {long:?}"
    );

    let mut vision_ms = vec![];
    for id in ["vision-req", "vision-img"] {
        let v = by_id(id);
        assert_eq!(v.status, Status::Succeeded, "{v:?}");
        assert_eq!(
            v.model.as_deref(),
            Some("m-vision"),
            "vision only on the vision model, even while it is saturated: {v:?}"
        );
        assert_eq!(v.attempts.len(), 1, "{v:?}");
        vision_ms.push(v.duration_ms);
    }
    // One of the two waited for the vision key's window (~2 s) rather than
    // going to a model without vision.
    let slow = vision_ms.iter().copied().max().unwrap_or(0);
    assert!(
        slow >= 1000,
        "one vision job waited for the window: {vision_ms:?}"
    );

    let tools = by_id("tools");
    assert_eq!(tools.status, Status::Failed, "{tools:?}");
    let err = tools.error.as_ref().expect("error");
    assert_eq!(err.kind, FailureKind::NoRoute, "{tools:?}");
    assert!(err.message.contains("tools"), "{}", err.message);
    assert!(tools.attempts.is_empty(), "never sent: {tools:?}");

    let s = mock.stats();
    assert_eq!(
        (
            s.keys["sm#1"].calls,
            s.keys["lg#1"].calls,
            s.keys["vi#1"].calls
        ),
        (1, 1, 2),
        "{s:?}"
    );
    assert_eq!(s.total_429, 0);
    assert!(!s.keys["sm#1"].outcomes.contains_key("context_too_long"));
    println!(
        "capabilities/context: short→m-small, long→m-large, vision→m-vision ×2 (waits {vision_ms:?} ms), \
         tools→no_route; calls sm/lg/vi = 1/1/2; 429s 0; test wall {} ms",
        t_test.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_refusal_moves_the_job_to_a_larger_context() {
    let redis = RedisServer::start();
    // The config does not know m-short's context; the upstream does.
    let mock = mock(
        MockConfig::default()
            .key(key("uk#1"))
            .key(key("lg#1"))
            .context("m-short", 300),
    )
    .await;
    let providers = [
        provider(
            "uk",
            "trial",
            &[],
            &[model("uk", "m-short", &["json"], None, (0.0, 0.0))],
        ),
        provider(
            "lg",
            "paid",
            &[],
            &[model("lg", "m-large", &["json"], Some(100_000), (0.2, 0.4))],
        ),
    ];
    let cfg = config(&redis, &mock, &providers, "");
    let daemon = start_daemon(cfg, &["uk#1", "lg#1"], None);
    let long_text = "lorem ipsum dolor sit amet ".repeat(80);
    let r = run_one(
        &redis,
        &daemon,
        json!({"id": "ctx", "messages": [{"role": "user", "content": long_text}], "max_tokens": 16}),
    );
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.model.as_deref(), Some("m-large"), "{r:?}");
    let outcomes: Vec<(&str, &str)> = r
        .attempts
        .iter()
        .map(|a| (a.key.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        vec![("uk#1", "context_too_long"), ("lg#1", "success")],
        "{r:?}"
    );
    // A short job still goes to the cheaper model.
    let r = run_one(&redis, &daemon, job("short"));
    assert_eq!(r.model.as_deref(), Some("m-short"), "{r:?}");
}

// ---------------------------------------------------------------- 4. budget

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_budget_stops_paid_spend_at_the_cap() {
    let t_test = Instant::now();
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(key("pa#1")).key(key("pb#1"))).await;
    // Every job's prompt is 8 tokens ("hello from b000": 4 + 4) and the
    // output is free on pa, so a pa job costs exactly 8 × 15625 / 1e6 =
    // $0.125, estimate and bill alike. The cap fits exactly 4.
    let job_cost = 0.125;
    let cap = 0.5;
    let providers = [
        provider(
            "pa",
            "paid",
            &["budget_usd_per_day = 0.5"],
            &[model(
                "pa",
                "m-cheap",
                &["json"],
                Some(100_000),
                (15_625.0, 0.0),
            )],
        ),
        provider(
            "pb",
            "paid",
            &[],
            &[model(
                "pb",
                "m-dear",
                &["json"],
                Some(100_000),
                (31_250.0, 0.0),
            )],
        ),
    ];
    let cfg = config(&redis, &mock, &providers, "");
    let daemon = start_daemon(cfg, &["pa#1", "pb#1"], None);

    // Many jobs at once: pa until its budget, the rest on pb.
    let ids = push_all(&redis, "normal", &jobs("b", 20, |_| {}));
    let r = wait_results(&redis, &daemon, &ids, Duration::from_secs(10));
    assert_all_succeeded(&r, &daemon);
    let on_pa: Vec<&JobResult> = r.iter().filter(|x| on(x, "pa")).collect();
    let spent: f64 = on_pa.iter().map(|x| x.cost_usd).sum();
    for x in &on_pa {
        assert_eq!(x.cost_usd, job_cost, "{x:?}");
    }
    assert!(
        spent <= cap + job_cost,
        "spent ${spent} over the ${cap} cap"
    );
    assert!(
        spent <= cap,
        "with exact estimates the cap is never crossed: ${spent}"
    );
    assert!(
        !on_pa.is_empty(),
        "the cheaper provider is used up to its cap"
    );
    assert_eq!(count(&r, |x| on(x, "pb")), 20 - on_pa.len());

    // The rest of today's budget may be held by settled reservations only:
    // top it up until pa is full (at most 4 jobs in all).
    let mut pa_jobs = on_pa.len();
    let mut more = 0;
    while pa_jobs < 4 {
        let x = run_one(&redis, &daemon, job(&format!("m{more:03}")));
        assert_eq!(x.status, Status::Succeeded);
        assert!(on(&x, "pa"), "room left on pa is used first: {x:?}");
        pa_jobs += 1;
        more += 1;
    }
    assert_eq!(accepted(&mock, "pa#1"), 4, "exactly cap / cost calls on pa");

    // Over the cap: other routes take the job...
    let x = run_one(&redis, &daemon, job("o000"));
    assert!(on(&x, "pb"), "over budget, the job goes elsewhere: {x:?}");
    // ...and a job that may only use pa fails at once, saying why.
    let t = Instant::now();
    let x = run_one(
        &redis,
        &daemon,
        json!({"id": "p000", "messages": [{"role": "user", "content": "hello from p000"}],
               "max_tokens": 16, "route": {"provider": "pa"}}),
    );
    let fail_ms = t.elapsed().as_millis();
    assert_eq!(x.status, Status::Failed, "{x:?}");
    let err = x.error.as_ref().expect("error");
    assert_eq!(err.kind, FailureKind::NoRoute, "{x:?}");
    assert!(
        err.message.contains("budget") && err.message.contains("pa"),
        "{}",
        err.message
    );
    assert!(x.attempts.is_empty(), "{x:?}");
    assert!(x.duration_ms < 500, "fails at once, no waiting: {x:?}");
    let s = mock.stats();
    assert_eq!(s.keys["pa#1"].calls, 4, "{s:?}");
    println!(
        "budget: cap ${cap}, ${job_cost}/job: burst of 20 → {} on pa (${spent}), {} on pb; \
         {more} top-up job(s) filled pa to 4 calls ($0.5); pinned job over budget failed no_route in {fail_ms} ms \
         ({:?}); test wall {} ms",
        on_pa.len(),
        20 - on_pa.len(),
        err.message,
        t_test.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_held_by_calls_in_flight_is_waited_for_not_given_up() {
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(key("pa#1").latency_ms(50))).await;
    // Output only: the estimate charges all 16 max_tokens ($0.25), the bill
    // only the tokens of the (shorter) reply.
    let cap = 1.0;
    let estimate = 0.25;
    let providers = [provider(
        "pa",
        "paid",
        &["budget_usd_per_day = 1.0"],
        &[model(
            "pa",
            "m-cheap",
            &["json"],
            Some(100_000),
            (0.0, 15_625.0),
        )],
    )];
    let cfg = config(&redis, &mock, &providers, "");
    let daemon = start_daemon(cfg, &["pa#1"], None);

    // 12 jobs at once, pa their only route: only 4 estimates fit at first.
    let ids = push_all(&redis, "normal", &jobs("q", 12, |_| {}));
    let r = wait_results(&redis, &daemon, &ids, Duration::from_secs(10));
    let ok: Vec<&JobResult> = r.iter().filter(|x| x.status == Status::Succeeded).collect();
    for x in r.iter().filter(|x| x.status == Status::Failed) {
        let err = x.error.as_ref().expect("error");
        assert_eq!(err.kind, FailureKind::NoRoute, "{x:?}");
        assert!(err.message.contains("daily budget"), "{}", err.message);
    }
    let bill = ok[0].cost_usd;
    assert!(
        bill < estimate,
        "the reply is shorter than max_tokens: {bill}"
    );
    let spent: f64 = ok.iter().map(|x| x.cost_usd).sum();
    assert!(spent <= cap, "spent ${spent} over the ${cap} cap");
    // Jobs waited for the reservations to settle instead of failing while
    // they held the budget: no job was refused while one more would fit.
    assert!(
        spent + estimate > cap,
        "${spent} spent of ${cap}: another ${estimate} job would have fit"
    );
    assert!(
        ok.len() > 4,
        "more than the 4 first reservations: {}",
        ok.len()
    );
    assert_eq!(accepted(&mock, "pa#1"), ok.len() as u64);
    println!(
        "budget held by reservations: {} of 12 pinned jobs ran (${spent} of ${cap}, bill ${bill} vs estimate ${estimate}), {} refused",
        ok.len(),
        12 - ok.len()
    );
}

// ---------------------------------------------------------------- 5. fan-out

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_returns_every_model_and_one_failure_does_not_fail_the_others() {
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(key("fo#1"))).await;
    let models: Vec<String> = ["m-a", "m-b", "missing-c", "missing-d"]
        .iter()
        .map(|m| model("fo", m, &["json"], Some(100_000), (0.1, 0.2)))
        .collect();
    let providers = [provider("fo", "paid", &[], &models)];
    let cfg = config(&redis, &mock, &providers, "");
    let daemon = start_daemon(cfg, &["fo#1"], None);

    let mut j = job("fan");
    j["models"] = json!(["m-a", "m-b", "missing-c"]);
    j["metadata"] = json!({"run": 7});
    let mut all_bad = job("fan-bad");
    all_bad["models"] = json!(["missing-c", "missing-d"]);
    let ids = push_all(&redis, "normal", &[j, all_bad]);
    let r = wait_results(&redis, &daemon, &ids, Duration::from_secs(10));

    let fan = &r[0];
    assert_eq!(
        fan.status,
        Status::Succeeded,
        "at least one model succeeded: {fan:?}"
    );
    assert_eq!((fan.successful, fan.failed), (Some(2), Some(1)), "{fan:?}");
    assert_eq!(fan.metadata, Some(json!({"run": 7})));
    let responses = fan.responses.as_ref().expect("responses");
    let names: Vec<&str> = responses.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(
        names,
        ["m-a", "m-b", "missing-c"],
        "one entry per model, in order"
    );
    for m in &responses[..2] {
        assert_eq!(m.status, Status::Succeeded, "{m:?}");
        assert!(
            m.output
                .as_deref()
                .unwrap_or("")
                .starts_with("mock reply to: hello from fan"),
            "{m:?}"
        );
        assert_eq!(m.provider.as_deref(), Some("fo"));
        assert!(m.usage.is_some() && m.cost_usd > 0.0, "{m:?}");
        assert_eq!(m.attempts.len(), 1);
    }
    let bad = &responses[2];
    assert_eq!(bad.status, Status::Failed, "{bad:?}");
    let err = bad.error.as_ref().expect("error");
    assert_eq!(err.kind, FailureKind::NoRoute, "{bad:?}");
    assert!(err.message.contains("model not found"), "{}", err.message);
    assert_eq!(bad.attempts[0].outcome, "model_not_found");
    let usage = fan.usage.expect("summed usage");
    let sum_in: u64 = responses
        .iter()
        .filter_map(|m| m.usage)
        .map(|u| u.input_tokens)
        .sum();
    assert_eq!(usage.input_tokens, sum_in);
    let sum_cost: f64 = responses.iter().map(|m| m.cost_usd).sum();
    assert!((fan.cost_usd - sum_cost).abs() < 1e-12);
    assert_eq!(fan.attempts.len(), 3);

    let bad = &r[1];
    assert_eq!(bad.status, Status::Failed, "{bad:?}");
    assert_eq!((bad.successful, bad.failed), (Some(0), Some(2)), "{bad:?}");
    assert_eq!(
        bad.error.as_ref().map(|e| e.kind),
        Some(FailureKind::Exhausted)
    );
    assert_eq!(bad.responses.as_ref().map(Vec::len), Some(2));
    assert_eq!(mock.stats().total_calls, 5);
}

// ---------------------------------------------------------------- 6. `llmq routes`

const ROUTES_CONFIG: &str = r#"
[providers.openai]
enabled = false
[providers.anthropic]
enabled = false
[providers.gemini]
enabled = false
[providers.groq]
enabled = false
[providers.mistral]
enabled = false
[providers.nvidia]
enabled = false
[providers.zai]
enabled = false
[providers.bigmodel]
enabled = false
[providers.openrouter]
enabled = false
[providers.ollama]
enabled = false

[providers.fr]
plugin = "openai"
base_url = "http://127.0.0.1:9/v1"
tier = "free"
keys_env = "FR"
[[providers.fr.models]]
id = "fr-small"
capabilities = ["json"]
context = 4096
[[providers.fr.models]]
id = "fr-vision"
capabilities = ["vision", "json"]
context = 8192

[providers.tr]
plugin = "openai"
base_url = "http://127.0.0.1:9/v1"
tier = "trial"
keys_env = "TR"
[[providers.tr.models]]
id = "tr-mid"
capabilities = ["json", "tools"]
context = 32000
price = { input = 0.1, output = 0.3 }

[providers.pd]
plugin = "anthropic"
base_url = "http://127.0.0.1:9/v1"
tier = "paid"
keys_env = "PD"
[[providers.pd.models]]
id = "pd-large"
aliases = ["large"]
capabilities = ["vision", "json", "tools"]
context = 128000
price = { input = 2.5, output = 10.0 }
[[providers.pd.models]]
id = "pd-mini"
capabilities = ["json"]
context = 128000
price = { input = 0.15, output = 0.6 }

[providers.nk]
plugin = "openai"
base_url = "http://127.0.0.1:9/v1"
tier = "free"
keys_env = "NK"
[[providers.nk.models]]
id = "nk-model"
capabilities = ["json", "vision"]
context = 8192
"#;

fn snapshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name)
}

/// Compares with the snapshot file, or rewrites it with `UPDATE_SNAPSHOTS=1`.
fn check_snapshot(name: &str, actual: &str) {
    let path = snapshot_path(name);
    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_SNAPSHOTS=1)", path.display()));
    if expected != actual {
        panic!(
            "{name} differs from {} (UPDATE_SNAPSHOTS=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        );
    }
}

#[test]
fn llmq_routes_prints_the_order_and_the_exclusions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("llmq.toml");
    std::fs::write(&cfg, ROUTES_CONFIG).unwrap();
    let env_file = dir.path().join("empty.env");
    std::fs::write(&env_file, "").unwrap();
    let long = "lorem ipsum dolor sit amet ".repeat(800); // ~5,400 tokens
    let cases: Vec<(&str, String)> = vec![
        ("default job", String::new()),
        (
            "json, max_tokens 100",
            r#"{"messages":[{"role":"user","content":"hi"}],"require":["json"],"max_tokens":100}"#
                .into(),
        ),
        (
            "vision, max_tier trial",
            r#"{"messages":[{"role":"user","content":"look"}],"require":["vision"],"route":{"max_tier":"trial"}}"#
                .into(),
        ),
        (
            "model alias, max_cost_usd",
            r#"{"model":"large","messages":[{"role":"user","content":"hi"}],"route":{"max_cost_usd":0.0001}}"#
                .into(),
        ),
        (
            "fan-out with a long prompt",
            json!({"models": ["fr-small", "pd-mini"], "messages": [{"role": "user", "content": long}]})
                .to_string(),
        ),
        (
            "pinned key of a provider without that model",
            r#"{"model":"fr-small","messages":[{"role":"user","content":"hi"}],"route":{"key":"pd#1"}}"#
                .into(),
        ),
    ];
    let mut out = String::new();
    for (label, job) in &cases {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llmq"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("FR_API_KEY_1", secret("fr#1"))
            .env("FR_API_KEY_2", secret("fr#2"))
            .env("TR_API_KEY", secret("tr#0"))
            .env(
                "PD_API_KEYS",
                format!("{},{}", secret("pd#0"), secret("pd#1")),
            )
            .current_dir(dir.path())
            .arg("routes")
            .arg("--config")
            .arg(&cfg)
            .arg("--env-file")
            .arg(&env_file);
        if !job.is_empty() {
            cmd.arg(job);
        }
        let o = cmd.output().expect("run llmq routes");
        let stdout = String::from_utf8(o.stdout).expect("utf-8");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "llmq routes ({label}) failed: {stderr}");
        assert!(!stdout.contains("sk-test"), "no secret in the output");
        out.push_str(&format!("### {label}\n{stdout}\n"));
    }
    check_snapshot("routes_cli.txt", &out);
}

// ---------------------------------------------------------------- 7. upstream 429

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_moves_the_job_to_the_next_key_at_once_and_cools_the_key() {
    let t_test = Instant::now();
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(key("fr#1")).key(key("fr#2"))).await;
    mock.inject(
        Some("fr#1"),
        vec![Injection::new(Inject::RateLimited429, 1).retry_after_ms(2500)],
    );
    let providers = [provider(
        "fr",
        "free",
        &[],
        &[model("fr", "m-free", &["json"], Some(100_000), (0.0, 0.0))],
    )];
    let cfg = config(&redis, &mock, &providers, "");
    let admin_port = free_port();
    let daemon = start_daemon(cfg, &["fr#1", "fr#2"], Some(admin_port));
    let admin = Admin::new(admin_port).await;

    // Round-robin sends one of the first two jobs to fr#1.
    let first = [
        run_one(&redis, &daemon, job("k0")),
        run_one(&redis, &daemon, job("k1")),
    ];
    let t_429 = Instant::now();
    let hit: Vec<&JobResult> = first.iter().filter(|r| r.attempts.len() == 2).collect();
    assert_eq!(hit.len(), 1, "{first:?}");
    let r = hit[0];
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let trail: Vec<(&str, &str)> = r
        .attempts
        .iter()
        .map(|a| (a.key.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        trail,
        [("fr#1", "rate_limited"), ("fr#2", "success")],
        "{r:?}"
    );
    assert_eq!(r.key.as_deref(), Some("fr#2"));
    let moved_ms = r.duration_ms;
    assert!(
        moved_ms < 1000,
        "moved on at once, not after the 2.5 s hint: {r:?}"
    );

    // The key cools down for the upstream's hint…
    let k = admin.key("fr#1").await;
    assert_eq!(k["status"], "cooling", "{k}");
    assert!(
        k["cooldown_remaining_ms"].as_u64().unwrap_or(0) > 1000,
        "{k}"
    );
    assert_eq!(k["rate_limited"], 1, "{k}");
    // …so meanwhile every job goes to fr#2.
    for i in 0..4 {
        let r = run_one(&redis, &daemon, job(&format!("c{i}")));
        assert_eq!(r.key.as_deref(), Some("fr#2"), "{r:?}");
        assert_eq!(r.attempts.len(), 1);
    }
    assert_eq!(calls(&mock, "fr#1"), 1, "no call to a cooling key");
    // After the cooldown it serves again.
    poll(Duration::from_secs(6), "fr#1 available again", || async {
        admin.key("fr#1").await["status"] == "available"
    })
    .await;
    let cooled_ms = t_429.elapsed().as_millis();
    let r = run_one(&redis, &daemon, job("after"));
    assert_eq!(
        r.key.as_deref(),
        Some("fr#1"),
        "least recently used key again: {r:?}"
    );
    let s = mock.stats();
    assert_eq!(
        s.keys["fr#1"].outcomes.get("rate_limited_429"),
        Some(&1),
        "{s:?}"
    );
    assert_eq!(s.keys["fr#1"].accepted, 1);
    assert_eq!(s.total_429, 0, "the only 429 was injected: {s:?}");
    println!(
        "429: moved to fr#2 in {moved_ms} ms (attempts {trail:?}); fr#1 cooling, back after ~{cooled_ms} ms (hint 2500 ms); test wall {} ms",
        t_test.elapsed().as_millis()
    );
}

// ---------------------------------------------------------------- transient failures

/// CPU time (user + system) the process has used, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_moves_on_at_once_or_backs_off_without_spinning() {
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(key("fr#1")).key(key("fr#2"))).await;
    let providers = [provider(
        "fr",
        "free",
        &[],
        &[model("fr", "m-free", &["json"], Some(100_000), (0.0, 0.0))],
    )];
    let cfg = config(&redis, &mock, &providers, "");
    let daemon = start_daemon(cfg, &["fr#1", "fr#2"], None);

    // A 503 on one key: the job takes the other key at once.
    mock.inject(Some("fr#1"), vec![Injection::new(Inject::Status503, 1)]);
    let first = [
        run_one(&redis, &daemon, job("t0")),
        run_one(&redis, &daemon, job("t1")),
    ];
    let hit: Vec<&JobResult> = first.iter().filter(|r| r.attempts.len() == 2).collect();
    assert_eq!(hit.len(), 1, "{first:?}");
    let trail: Vec<(&str, &str)> = hit[0]
        .attempts
        .iter()
        .map(|a| (a.key.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(trail, [("fr#1", "transient"), ("fr#2", "success")]);
    assert!(hit[0].duration_ms < 1000, "{:?}", hit[0]);

    // Pinned to a key that fails twice: it backs off (1 s, then 2 s) on that
    // key, asleep: the daemon burns next to no CPU meanwhile.
    mock.inject(Some("fr#1"), vec![Injection::new(Inject::Status503, 2)]);
    let pid = daemon.pid().expect("daemon pid");
    let cpu0 = cpu_ticks(pid);
    let r = run_one(
        &redis,
        &daemon,
        json!({"id": "pinned", "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 16, "route": {"key": "fr#1"}}),
    );
    let cpu = cpu_ticks(pid) - cpu0;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let trail: Vec<(&str, &str)> = r
        .attempts
        .iter()
        .map(|a| (a.key.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        trail,
        [
            ("fr#1", "transient"),
            ("fr#1", "transient"),
            ("fr#1", "success")
        ]
    );
    assert!(
        (3000..5000).contains(&r.duration_ms),
        "backed off 1 s + 2 s: {r:?}"
    );
    assert!(
        cpu < 50,
        "the daemon used {cpu} ticks of CPU during a 3 s backoff: it should sleep"
    );
    println!(
        "transient: moved to fr#2 in {} ms; pinned job backed off {} ms using {cpu} CPU ticks",
        hit[0].duration_ms, r.duration_ms
    );
}
