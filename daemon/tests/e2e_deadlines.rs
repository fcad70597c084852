//! Nothing outlives its deadline, and nothing a call holds outlives the call
//! (issue 15, "Deadlines"; issue 16, "a test drops the future").
//!
//! - A real `llmq serve` (cluster gate on, daily budgets) against a mock
//!   upstream that takes 5 s: jobs with `deadline_s: 2` all end by 2.5 s,
//!   and right after, an unproven key and a proven key each serve the next
//!   job at once: no probe, gate slot or budget reservation is left held.
//! - The executor in this process, against a call that hangs: the job's
//!   future is dropped in the middle of the call, and its budget
//!   reservation, the gate's in-flight slot and probe marker, and the pool's
//!   probe are all released (read back from the budgets, Redis and the pool).
//! - The cluster gate alone: a call dropped without its completion frees
//!   its probe marker and is re-stamped at the drop, so another daemon may
//!   probe the key at once.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::budget::Budgets;
use llmq::clock::{SharedClock, SystemClock};
use llmq::executor::Executor;
use llmq::global::{state_key, window_key, GlobalGate};
use llmq::job::{FailureKind as JobFailure, Job, JobResult, Status};
use llmq::keys::{EnvSource, KeyId};
use llmq::plugin_host::PluginHost;
use llmq::pool::KeyPool;
use llmq::queue::JobContext;
use llmq::serve::{build_runtime, upstream_client, Settings};
use llmq_mock::{FailureKind, Injection, KeySpec, KeyState, MockConfig, Protocol};
use llmq_testkit::{plugin_dir, wait_until, RedisServer};
use std::sync::Arc;
use std::time::{Duration, Instant};

const UN: &str = "sk-test-un-000000000001";
const PR: &str = "sk-test-pr-000000000001";
const OA: &str = "sk-test-oa-000000000001";

/// USD per million tokens, input and output alike.
const PRICE: f64 = 1000.0;
const MAX_TOKENS: u64 = 16;
/// A limit the gate holds in its window (far above what the tests send).
const RPM: &str = "limits = { rpm = 1000 }";
const PROMPT: &str = "hello there, how are you today";

fn messages() -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": PROMPT}])
}

/// What the executor reserves for one job: the prompt's estimate plus all
/// of `max_tokens`, at [`PRICE`].
fn estimate() -> f64 {
    let m: Vec<llmq_sdk::Message> = serde_json::from_value(messages()).expect("messages");
    let tokens = llmq_sdk::estimate::prompt_tokens(&m) + MAX_TOKENS;
    tokens as f64 * PRICE / 1e6
}

fn job_on(id: &str, model: &str, deadline_s: u64) -> serde_json::Value {
    serde_json::json!({"id": id, "model": model, "messages": messages(),
        "max_tokens": MAX_TOKENS, "deadline_s": deadline_s})
}

/// The harness config, with every model priced at [`PRICE`].
fn priced(cfg: String) -> String {
    cfg.replace(
        "context = 100000\n",
        &format!("context = 100000\nprice = {{ input = {PRICE:?}, output = {PRICE:?} }}\n"),
    )
}

/// A daily budget that fits about two and a half jobs: one reservation left
/// behind per timed-out job would hold back every later job.
fn budget_line() -> String {
    format!("budget_usd_per_day = {:?}", estimate() * 2.5)
}

fn attempts(r: &JobResult) -> Vec<(&str, &str)> {
    r.attempts
        .iter()
        .map(|a| (a.key.as_str(), a.outcome.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_second_deadlines_against_a_five_second_upstream_end_in_time_and_hold_nothing() {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(UN).label("un#1").latency_ms(5_000))
            .key(KeySpec::new(PR).label("pr#1")),
    )
    .await;
    let providers = [
        Provider::new("un", Protocol::OpenAi, "free", "m-un")
            .with(&budget_line())
            .with(RPM),
        Provider::new("pr", Protocol::OpenAi, "free", "m-pr")
            .with(&budget_line())
            .with(RPM),
    ];
    // The gate is in play (cluster on), the upstream timeout far later.
    let cfg = with_upstream(
        &priced(config(
            &redis,
            &mock,
            &providers,
            "[cluster]\nenabled = true\n",
        )),
        "timeout = \"60s\"",
    );
    let daemon = start(&spec(cfg).env("UN_API_KEY_1", UN).env("PR_API_KEY_1", PR));
    // pr#1 is proven (one success), un#1 has never answered.
    push(&redis, "normal", &job_on("warm", "m-pr", 30));
    let warm = wait_results(&redis, &daemon, &["warm".into()], Duration::from_secs(30));
    assert_eq!(warm[0].status, Status::Succeeded, "{:?}", warm[0]);
    mock.add_keys(vec![KeySpec::new(PR).label("pr#1").latency_ms(5_000)]);

    // Jobs of 2 s against a 5 s upstream, on both keys at once.
    let mut ids = vec![];
    let pushed = Instant::now();
    for i in 0..3 {
        let id = format!("un-{i}");
        push(&redis, "normal", &job_on(&id, "m-un", 2));
        ids.push(id);
    }
    for i in 0..4 {
        let id = format!("pr-{i}");
        push(&redis, "normal", &job_on(&id, "m-pr", 2));
        ids.push(id);
    }
    let results = wait_results(&redis, &daemon, &ids, Duration::from_secs(30));
    let took = pushed.elapsed();
    assert!(
        took <= Duration::from_millis(2_500),
        "every result within 2.5 s, the last after {took:?}: {results:?}"
    );
    for r in &results {
        assert_eq!(r.status, Status::Failed, "{r:?}");
        let e = r.error.as_ref().expect("an error");
        assert_eq!(e.kind, JobFailure::Deadline, "{r:?}");
    }
    // The calls that went upstream say so: their key, cut at the deadline.
    for (prefix, key) in [("un-", "un#1"), ("pr-", "pr#1")] {
        let called: Vec<&JobResult> = results
            .iter()
            .filter(|r| r.id.starts_with(prefix) && !r.attempts.is_empty())
            .collect();
        assert!(!called.is_empty(), "a {key} job made its call: {results:?}");
        for r in called {
            assert_eq!(attempts(r).last(), Some(&(key, "deadline")), "{r:?}");
            let e = r.error.as_ref().expect("an error");
            assert!(
                e.message.contains("during the call") && e.message.contains(key),
                "the message says the call was cut: {r:?}"
            );
        }
    }
    // Right after, both keys serve the next job at once.
    mock.add_keys(vec![
        KeySpec::new(UN).label("un#1"),
        KeySpec::new(PR).label("pr#1"),
    ]);
    let next = Instant::now();
    push(&redis, "normal", &job_on("un-next", "m-un", 10));
    push(&redis, "normal", &job_on("pr-next", "m-pr", 10));
    let after = wait_results(
        &redis,
        &daemon,
        &["un-next".into(), "pr-next".into()],
        Duration::from_secs(30),
    );
    let took = next.elapsed();
    for (r, key) in after.iter().zip(["un#1", "pr#1"]) {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(attempts(r), vec![(key, "success")], "{r:?}");
    }
    assert!(
        took < Duration::from_millis(1_500),
        "served at once, not after a held probe, slot or budget: {took:?}"
    );
}

// ---------------------------------------------------------------------------
// The executor in this process: a job's future dropped mid-call.

struct Local {
    executor: Arc<Executor>,
    pool: Arc<KeyPool>,
    budgets: Arc<Budgets>,
    gate: Arc<GlobalGate>,
    clock: SharedClock,
}

async fn local(redis: &RedisServer, cfg: &str) -> Local {
    let config = llmq::config::load_from_str(cfg, "test.toml").expect("config loads");
    let env = EnvSource::from_pairs([("OA_API_KEY_1", OA)]);
    let ring = llmq::keys::load_keys(&config.providers, &env).expect("keys load");
    let clock: SharedClock = Arc::new(SystemClock::default());
    let plugins = Arc::new(PluginHost::load_dir(plugin_dir()).expect("plugins load"));
    let pool = Arc::new(KeyPool::new(&config, &ring, clock.clone()));
    let settings = Settings { config, env, ring };
    let mut runtime =
        build_runtime(&settings, pool.clone(), plugins, &clock).expect("runtime builds");
    let conn = redis::Client::open(redis.url())
        .expect("redis url")
        .get_connection_manager()
        .await
        .expect("redis connects");
    let gate = Arc::new(GlobalGate::new(
        conn,
        "exec-test",
        &settings.config,
        &settings.ring,
    ));
    runtime.global = Some(gate.clone());
    let budgets = runtime.budgets.clone();
    let upstream = upstream_client(&settings.config, "test.toml").expect("upstream client");
    Local {
        executor: Arc::new(Executor::new(runtime, upstream, clock.clone())),
        pool,
        budgets,
        gate,
        clock,
    }
}

fn parse(v: &serde_json::Value) -> Job {
    llmq::job::parse_job(v.to_string().as_bytes(), 1 << 20).expect("job parses")
}

fn ctx(clock: &SharedClock) -> JobContext {
    JobContext {
        lane: "normal".into(),
        attempt: 1,
        max_attempts: 5,
        enqueued_unix_ms: clock.unix_ms(),
        queued_ms: 0,
        entry_id: "0-1".into(),
        previous_attempts: vec![],
    }
}

/// Redis server time in µs (the gate's clock).
fn redis_now_us(redis: &RedisServer) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(&mut redis.client()).expect("TIME");
    s * 1_000_000 + us
}

/// Polls until the disabled key's re-probe is due in the pool and the gate.
async fn probe_due(l: &Local, id: &KeyId) {
    let start = Instant::now();
    loop {
        let now_ms = l.clock.unix_ms();
        let pool_due = l
            .pool
            .snapshot()
            .into_iter()
            .any(|k| k.id == *id && k.next_probe_ms.is_some_and(|t| t <= now_ms));
        let st = l.gate.state(id).await.expect("gate state");
        let gate_due = st
            .disabled
            .as_ref()
            .is_some_and(|d| d.next_probe_in == Some(Duration::ZERO));
        if pool_due && gate_due {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the re-probe never came due: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_job_future_mid_call_releases_its_reservation_gate_slot_and_probes() {
    let redis = RedisServer::start();
    // The key starts out refused: the job that follows is a re-probe, in
    // the pool and in the gate.
    let mock =
        mock(MockConfig::default().key(KeySpec::new(OA).label("oa#1").state(KeyState::Invalid)))
            .await;
    // An RPM limit: the gate counts the key's calls in its window.
    let providers = [Provider::new("oa", Protocol::OpenAi, "free", "m-oa")
        .with(&budget_line())
        .with(RPM)];
    let cfg = priced(config(
        &redis,
        &mock,
        &providers,
        "[cluster]\nenabled = true\n\n[keys]\nreprobe_interval = \"100ms\"\n",
    ));
    let l = local(&redis, &cfg).await;
    let id = KeyId::new("oa", 1);
    let snapshot = |pool: &KeyPool| {
        pool.snapshot()
            .into_iter()
            .find(|k| k.id == KeyId::new("oa", 1))
            .expect("oa#1 in the pool")
    };

    // 1. The key is refused (auth): disabled here and in the gate.
    let refused = l
        .executor
        .execute(&parse(&job_on("refused", "m-oa", 1)), &ctx(&l.clock))
        .await;
    assert_eq!(refused.status, Status::Failed, "{refused:?}");
    assert_eq!(
        attempts(&refused),
        vec![("oa#1", "auth_failed")],
        "{refused:?}"
    );

    // 2. The key is fixed, but its next call hangs. Once the re-probe is
    // due (here and in the gate), a job makes it.
    mock.add_keys(vec![KeySpec::new(OA).label("oa#1")]);
    mock.inject(Some("oa#1"), vec![Injection::new(FailureKind::Hang, 1)]);
    probe_due(&l, &id).await;
    let (executor, clock) = (l.executor.clone(), l.clock.clone());
    let job = parse(&job_on("dropped", "m-oa", 60));
    let running = tokio::spawn(async move { executor.execute(&job, &ctx(&clock)).await });
    wait_until(Duration::from_secs(10), "the hanging call", || {
        mock.stats()
            .keys
            .get("oa#1")
            .is_some_and(|k| k.outcomes.contains_key("hang"))
    });
    // Everything is held while the call is in flight.
    let now_ms = l.clock.unix_ms();
    assert!(
        l.budgets.reserved("oa", now_ms) > 0.0,
        "the call holds a reservation"
    );
    let k = snapshot(&l.pool);
    assert!(k.probing && k.in_flight == 1, "the pool's probe: {k:?}");
    let mut c = redis.client();
    let probe: Option<String> = redis::cmd("HGET")
        .arg(state_key(&id))
        .arg("probe")
        .query(&mut c)
        .expect("HGET");
    let member = probe.expect("the gate's probe marker is set");

    // 3. The job's future is dropped in the middle of the call (after the
    // upstream saw the request).
    let before_drop_us = redis_now_us(&redis) as f64;
    running.abort();
    assert!(running.await.expect_err("aborted").is_cancelled());

    // The reservation and the pool's probe are released at once.
    assert_eq!(
        l.budgets.reserved("oa", l.clock.unix_ms()),
        0.0,
        "no reservation left"
    );
    let k = snapshot(&l.pool);
    assert!(
        !k.probing && k.in_flight == 0,
        "the pool's probe is free: {k:?}"
    );
    // The gate's slot and probe marker are released by the call's own
    // completion, run on the runtime after the drop.
    wait_until(
        Duration::from_secs(2),
        "the gate's probe marker to go",
        || {
            let probe: Option<String> = redis::cmd("HGET")
                .arg(state_key(&id))
                .arg("probe")
                .query(&mut c)
                .expect("HGET");
            probe.is_none()
        },
    );
    let slots: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(window_key(&id))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut c)
        .expect("ZRANGE");
    let now_us = redis_now_us(&redis) as f64;
    assert!(!slots.is_empty(), "the calls count in the window");
    for (member, score) in &slots {
        assert!(
            *score <= now_us,
            "slot {member} is still stamped in flight ({score} > {now_us}): not completed"
        );
    }
    let (_, stamp) = slots
        .iter()
        .find(|(m, _)| *m == member)
        .expect("the dropped call still counts in the window (it may have been served)");
    assert!(
        *stamp >= before_drop_us,
        "the dropped call is stamped at its drop, never earlier than the upstream saw it: {stamp} < {before_drop_us}"
    );
    let st = l.gate.state(&id).await.expect("gate state");
    assert!(!st.probing, "{st:?}");
    // A cancelled probe proves nothing either way: the key stays disabled,
    // and its re-probe is due again at once, here and in the gate.
    let d = st.disabled.as_ref().expect("still disabled in the gate");
    assert_eq!(d.next_probe_in, Some(Duration::ZERO), "{st:?}");
    let k = snapshot(&l.pool);
    assert!(
        k.next_probe_ms.is_some_and(|t| t <= l.clock.unix_ms()),
        "{k:?}"
    );

    // 4. The key serves the next job at once (its re-probe is due now).
    let started = Instant::now();
    let next = l
        .executor
        .execute(&parse(&job_on("next", "m-oa", 10)), &ctx(&l.clock))
        .await;
    assert_eq!(next.status, Status::Succeeded, "{next:?}");
    assert_eq!(attempts(&next), vec![("oa#1", "success")], "{next:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "served at once: {:?}",
        started.elapsed()
    );
    assert_eq!(l.budgets.reserved("oa", l.clock.unix_ms()), 0.0);
}

// ---------------------------------------------------------------------------
// The gate alone: a call dropped without its completion.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_call_dropped_unfinished_frees_its_probe_and_restamps_its_slot() {
    use llmq::config::{Config, Limits, ProviderConfig};
    use llmq::global::{Admit, WaitFor};
    use llmq::keys::{ApiKey, KeyRing};
    let redis = RedisServer::start();
    let mut config = Config::default();
    config.providers.insert(
        "g".into(),
        ProviderConfig {
            limits: Limits {
                rpm: Some(100),
                ..Limits::default()
            },
            ..ProviderConfig::default()
        },
    );
    let id = KeyId::new("g", 1);
    let ring = KeyRing::from_keys([ApiKey::new(
        id.clone(),
        Some(secrecy::SecretString::from("sk-gate-drop-0001-xxxxxxxx")),
        "test",
    )]);
    let gate = |owner: &'static str| {
        let (config, ring, url) = (config.clone(), ring.clone(), redis.url());
        async move {
            let conn = redis::Client::open(url)
                .expect("redis url")
                .get_connection_manager()
                .await
                .expect("redis connects");
            GlobalGate::new(conn, owner, &config, &ring)
        }
    };
    let (a, b) = (gate("daemon-a").await, gate("daemon-b").await);
    // The key's first call is its probe: nobody else may call it meanwhile.
    let call = match a.admit(&id, 10, false).await.expect("admit") {
        Admit::Granted(c) => c,
        other => panic!("{other:?}"),
    };
    assert!(call.is_probe());
    assert!(matches!(
        b.admit(&id, 10, false).await.expect("admit"),
        Admit::Wait {
            limit: WaitFor::Probation,
            ..
        }
    ));
    let before_drop_us = redis_now_us(&redis) as f64;
    // The job holding it is cancelled: the call is dropped, not completed.
    drop(call);
    let start = Instant::now();
    let st = loop {
        let st = b.state(&id).await.expect("state");
        if !st.probing {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the probe marker stays after the drop: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Unknown fate: not proven, not blamed; the call still counts, stamped
    // at its drop instead of admission + MAX_CALL.
    assert!(!st.proven && st.disabled.is_none(), "{st:?}");
    assert_eq!(st.window_calls, 1, "{st:?}");
    let slots: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(window_key(&id))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut redis.client())
        .expect("ZRANGE");
    let now_us = redis_now_us(&redis) as f64;
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert!(
        slots[0].1 >= before_drop_us && slots[0].1 <= now_us,
        "stamped at the drop: {slots:?}, dropped after {before_drop_us}, now {now_us}"
    );
    // Another daemon probes the key at once.
    match b.admit(&id, 10, false).await.expect("admit") {
        Admit::Granted(c) => {
            assert!(c.is_probe());
            b.complete(
                c,
                &llmq::pool::Fate::Success {
                    usage_in: 1,
                    usage_out: 1,
                    cost_usd: 0.0,
                },
            )
            .await;
        }
        other => panic!("the key is still held after the drop: {other:?}"),
    }
    assert!(b.state(&id).await.expect("state").proven);
}
