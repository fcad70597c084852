//! Scale-out (issue 7): several `llmq serve` daemons on one Redis behave as
//! one system. Two layers:
//!
//! - the cluster-wide gate (`llmq::global`) driven directly, as several
//!   "daemons" (one connection each) against a private Redis: limits in any
//!   window, global probation, disabled/cooling seen everywhere, operator
//!   actions, and the cost of one admission;
//! - three real `llmq serve` processes with the same config and the mock
//!   provider: the quota scenario, kill -9 mid-run, admission accuracy under
//!   contention, restarts, state propagation and the member list.
//!
//! Windows are compressed (1–3 s); the 60 s variant is `#[ignore]`d.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::config::{Config, Limits, ProviderConfig};
use llmq::global::{Admit, GlobalGate, WaitFor};
use llmq::job::Status;
use llmq::keys::{ApiKey, KeyId, KeyRing};
use llmq::pool::Fate;
use llmq_mock::{FailureKind, Injection, KeySpec, KeyState, MockConfig, MockServer, Protocol};
use llmq_testkit::daemon::{DaemonProcess, DaemonSpec};
use llmq_testkit::RedisServer;
use secrecy::SecretString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// The gate alone.

fn gate_setup(keys: u32, limits: Limits, window: Duration, reprobe: Duration) -> (Config, KeyRing) {
    let mut config = Config::default();
    config.keys.reprobe_interval = reprobe;
    let pc = ProviderConfig {
        limits,
        window: Some(window),
        ..ProviderConfig::default()
    };
    config.providers.insert("g".into(), pc);
    let ring = KeyRing::from_keys((1..=keys).map(|i| {
        ApiKey::new(
            KeyId::new("g", i),
            Some(SecretString::from(format!("sk-gate-test-{i:04}-xxxxxxxx"))),
            "test",
        )
    }));
    (config, ring)
}

async fn gate(redis: &RedisServer, config: &Config, ring: &KeyRing) -> GlobalGate {
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    GlobalGate::new(conn, &format!("test-{}", ulid::Ulid::new()), config, ring)
}

fn granted(a: Admit) -> llmq::global::GlobalCall {
    match a {
        Admit::Granted(c) => c,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn success() -> Fate {
    Fate::Success {
        usage_in: 1,
        usage_out: 1,
        cost_usd: 0.0,
    }
}

/// Polls `f` every few ms until it returns `Some`, for up to `timeout`.
async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_holds_the_limit_in_any_window_across_daemons() {
    let redis = RedisServer::start();
    let window = Duration::from_millis(600);
    let rpm = 10u64;
    let (config, ring) = gate_setup(
        1,
        Limits {
            rpm: Some(rpm),
            ..Limits::default()
        },
        window,
        Duration::from_secs(60),
    );
    let id = KeyId::new("g", 1);
    // Prove the key so several calls may fly at once.
    let first = gate(&redis, &config, &ring).await;
    let call = granted(first.admit(&id, 10, false).await.unwrap());
    assert!(call.is_probe(), "a key's first call is its probe");
    first.complete(call, &success()).await;

    let grants: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let t0 = Instant::now();
    let run_for = window * 3 + window / 2;
    let mut tasks = vec![];
    for _daemon in 0..3 {
        let g = Arc::new(gate(&redis, &config, &ring).await);
        for _job in 0..4 {
            let (g, id, grants) = (g.clone(), id.clone(), grants.clone());
            tasks.push(tokio::spawn(async move {
                while t0.elapsed() < run_for {
                    match g.admit(&id, 10, false).await.unwrap() {
                        Admit::Granted(call) => {
                            grants.lock().unwrap().push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(3)).await;
                            g.complete(call, &success()).await;
                        }
                        Admit::Wait { wait, limit } => {
                            assert_eq!(limit, WaitFor::Rpm);
                            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut g = grants.lock().unwrap().clone();
    g.sort();
    // The first window (the probe's) counts too: one call already went.
    for i in 0..g.len().saturating_sub(rpm as usize) {
        let gap = g[i + rpm as usize] - g[i];
        assert!(
            gap + Duration::from_millis(2) >= window,
            "{} calls within {gap:?} (window {window:?})",
            rpm + 1
        );
    }
    eprintln!(
        "gate: {} grants over {run_for:?} with rpm {rpm} per {window:?} across 3 gates × 4 callers",
        g.len()
    );
    assert!(
        g.len() as u64 >= 3 * rpm - 1,
        "only {} grants in 3.5 windows",
        g.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_probation_lets_one_call_fly_until_a_success() {
    let redis = RedisServer::start();
    let (config, ring) = gate_setup(
        1,
        Limits::default(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    );
    let (a, b) = (
        gate(&redis, &config, &ring).await,
        gate(&redis, &config, &ring).await,
    );
    let id = KeyId::new("g", 1);
    let probe = granted(a.admit(&id, 1, false).await.unwrap());
    assert!(probe.is_probe() && probe.admitted_in_redis());
    match b.admit(&id, 1, false).await.unwrap() {
        Admit::Wait { limit, wait } => {
            assert_eq!(limit, WaitFor::Probation);
            assert!(wait <= llmq::global::PROBATION_RETRY, "{wait:?}");
        }
        other => panic!("a second call while the first is in flight: {other:?}"),
    }
    a.complete(probe, &success()).await;
    assert!(b.state(&id).await.unwrap().proven);
    // Proven and unlimited: several at once, and b learns it needs no round trip.
    let c1 = granted(b.admit(&id, 1, false).await.unwrap());
    let c2 = granted(a.admit(&id, 1, false).await.unwrap());
    assert!(!c1.is_probe() && !c2.is_probe());
    b.complete(c1, &success()).await;
    a.complete(c2, &success()).await;
    let fast = granted(b.admit(&id, 1, false).await.unwrap());
    assert!(
        !fast.admitted_in_redis(),
        "a proven unlimited key skips Redis"
    );
    b.complete(fast, &success()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_disabled_keys_are_refused_everywhere_and_reprobed_once() {
    let redis = RedisServer::start();
    let reprobe = Duration::from_millis(300);
    let (config, ring) = gate_setup(1, Limits::default(), Duration::from_secs(1), reprobe);
    let (a, b) = (
        gate(&redis, &config, &ring).await,
        gate(&redis, &config, &ring).await,
    );
    let id = KeyId::new("g", 1);
    let probe = granted(a.admit(&id, 1, false).await.unwrap());
    a.complete(
        probe,
        &Fate::Disabled {
            reason: "auth_failed: bad key".into(),
        },
    )
    .await;
    match b.admit(&id, 1, false).await.unwrap() {
        Admit::Disabled(d) => {
            assert_eq!(d.reason, "auth_failed: bad key");
            let next = d.next_probe_in.expect("a re-probe is scheduled");
            assert!(next <= reprobe && next > Duration::ZERO, "{next:?}");
        }
        other => panic!("{other:?}"),
    }
    // When the re-probe is due, exactly one of the daemons gets it.
    let reprobe_call = poll(Duration::from_secs(3), "the re-probe", || async {
        match a.admit(&id, 1, true).await.unwrap() {
            Admit::Granted(c) => Some(c),
            Admit::Disabled(_) => None,
            other => panic!("{other:?}"),
        }
    })
    .await;
    assert!(reprobe_call.is_probe());
    assert!(
        matches!(b.admit(&id, 1, true).await.unwrap(), Admit::Disabled(_)),
        "one probe at a time, cluster-wide"
    );
    a.complete(reprobe_call, &success()).await;
    let st = b.state(&id).await.unwrap();
    assert!(st.disabled.is_none() && st.proven, "{st:?}");
    let c = granted(b.admit(&id, 1, false).await.unwrap());
    b.complete(c, &success()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_cooldowns_tokens_and_in_flight_slots() {
    let redis = RedisServer::start();
    let window = Duration::from_millis(300);
    let (config, ring) = gate_setup(
        2,
        Limits {
            rpm: Some(1),
            tpm: Some(100),
            ..Limits::default()
        },
        window,
        Duration::from_secs(60),
    );
    let (a, b) = (
        gate(&redis, &config, &ring).await,
        gate(&redis, &config, &ring).await,
    );
    // A 429 on one daemon cools the key on the other.
    let k1 = KeyId::new("g", 1);
    let c = granted(a.admit(&k1, 10, false).await.unwrap());
    a.complete(
        c,
        &Fate::RateLimited {
            retry_after: Some(Duration::from_millis(5_000)),
        },
    )
    .await;
    match b.admit(&k1, 10, false).await.unwrap() {
        Admit::Cooling(left) => assert!(
            left > Duration::from_millis(4_000) && left <= Duration::from_millis(5_000),
            "{left:?}"
        ),
        other => panic!("{other:?}"),
    }
    // TPM: the window's tokens, summed across daemons.
    let k2 = KeyId::new("g", 2);
    assert!(
        matches!(
            a.admit(&k2, 101, false).await.unwrap(),
            Admit::Wait {
                limit: WaitFor::Tpm,
                ..
            }
        ),
        "more than the TPM never fits"
    );
    let c = granted(a.admit(&k2, 60, false).await.unwrap());
    // An in-flight call holds its slot however long it takes.
    tokio::time::sleep(window * 2).await;
    match b.admit(&k2, 10, false).await.unwrap() {
        Admit::Wait { limit, wait } => {
            assert_eq!(limit, WaitFor::Rpm);
            assert_eq!(wait, window, "in flight: at least a window after it ends");
        }
        other => panic!("{other:?}"),
    }
    let st = b.state(&k2).await.unwrap();
    assert_eq!((st.window_calls, st.window_tokens), (1, 60));
    a.complete(c, &success()).await;
    // Completed: free exactly one window after its completion.
    match b.admit(&k2, 10, false).await.unwrap() {
        Admit::Wait { wait, .. } => assert!(wait <= window && wait > window / 2, "{wait:?}"),
        other => panic!("{other:?}"),
    }
    let started = Instant::now();
    let c = poll(Duration::from_secs(2), "the slot to free", || async {
        match b.admit(&k2, 50, false).await.unwrap() {
            Admit::Granted(c) => Some(c),
            Admit::Wait { .. } => None,
            other => panic!("{other:?}"),
        }
    })
    .await;
    assert!(started.elapsed() + Duration::from_millis(50) >= window / 2);
    b.complete(c, &Fate::NotSent).await;
    let st = b.state(&k2).await.unwrap();
    assert_eq!(st.window_calls, 0, "a call not sent gives its slot back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_operator_disable_and_reset_hold_cluster_wide() {
    let redis = RedisServer::start();
    let (config, ring) = gate_setup(
        1,
        Limits::default(),
        Duration::from_secs(1),
        Duration::from_millis(1),
    );
    let (a, b) = (
        gate(&redis, &config, &ring).await,
        gate(&redis, &config, &ring).await,
    );
    let id = KeyId::new("g", 1);
    let c = granted(a.admit(&id, 1, false).await.unwrap());
    a.complete(c, &success()).await;
    a.disable(&id, "disabled by operator").await.unwrap();
    for probe in [false, true] {
        match b.admit(&id, 1, probe).await.unwrap() {
            Admit::Disabled(d) => {
                assert_eq!(d.reason, "disabled by operator");
                assert_eq!(
                    d.next_probe_in, None,
                    "an operator's disable is never probed"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    b.reset(&id).await.unwrap();
    let st = a.state(&id).await.unwrap();
    assert!(st.disabled.is_none() && !st.proven, "{st:?}");
    // (The resetting daemon asks Redis again; the others drop their cached
    // "proven" when the reset's key event reaches their listener.)
    let c = granted(b.admit(&id, 1, false).await.unwrap());
    assert!(c.is_probe(), "a reset key proves itself again");
    b.complete(c, &success()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_reaps_the_slots_of_a_dead_daemon() {
    let redis = RedisServer::start();
    let window = Duration::from_millis(300);
    let (config, ring) = gate_setup(
        1,
        Limits {
            rpm: Some(1),
            ..Limits::default()
        },
        window,
        Duration::from_secs(60),
    );
    let (dead, alive) = (
        gate(&redis, &config, &ring).await,
        gate(&redis, &config, &ring).await,
    );
    let id = KeyId::new("g", 1);
    // The dead daemon's probe is in flight: nobody else may call the key.
    let orphan = granted(dead.admit(&id, 1, false).await.unwrap());
    assert!(matches!(
        alive.admit(&id, 1, false).await.unwrap(),
        Admit::Wait { .. }
    ));
    assert_eq!(
        alive
            .reap(std::slice::from_ref(&id), "someone-else")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        alive
            .reap(std::slice::from_ref(&id), dead.owner())
            .await
            .unwrap(),
        1
    );
    let st = alive.state(&id).await.unwrap();
    assert!(!st.probing, "the dead daemon's probe marker is gone");
    assert_eq!(st.window_calls, 1, "its call still counts for one window");
    let started = Instant::now();
    let c = poll(
        Duration::from_secs(2),
        "the reaped slot to free",
        || async {
            match alive.admit(&id, 1, false).await.unwrap() {
                Admit::Granted(c) => Some(c),
                _ => None,
            }
        },
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited + Duration::from_millis(30) >= window && waited < window * 3,
        "{waited:?}"
    );
    alive.complete(c, &success()).await;
    drop(orphan);
}

/// Scripts Redis has run (`EVALSHA` calls) so far.
fn evalsha_calls(redis: &RedisServer) -> u64 {
    let mut c = redis.client();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    info.lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_asks_redis_once_for_a_burst_on_a_full_key() {
    let redis = RedisServer::start();
    let (config, ring) = gate_setup(
        3,
        Limits {
            rpm: Some(1),
            ..Limits::default()
        },
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let g = Arc::new(gate(&redis, &config, &ring).await);
    let id = KeyId::new("g", 1);
    let c = granted(g.admit(&id, 1, false).await.unwrap());
    g.complete(c, &success()).await;
    let before = evalsha_calls(&redis);
    // Twenty jobs holding local permits for the same full key at once.
    let answers = futures::future::join_all((0..20).map(|_| {
        let (g, id) = (g.clone(), id.clone());
        async move { g.admit(&id, 1, false).await.unwrap() }
    }))
    .await;
    assert!(answers.iter().all(|a| matches!(
        a,
        Admit::Wait {
            limit: WaitFor::Rpm,
            ..
        }
    )));
    assert_eq!(
        evalsha_calls(&redis) - before,
        1,
        "one round trip, then the cached wait"
    );
    // Many keys' states in one pipeline agree with one-by-one reads.
    let ids: Vec<KeyId> = (1..=3).map(|i| KeyId::new("g", i)).collect();
    let many = g.states(&ids).await.unwrap();
    for (id, st) in ids.iter().zip(&many) {
        assert_eq!(*st, g.state(id).await.unwrap());
    }
    assert_eq!(many[0].window_calls, 1);
}

/// A real 3-node Redis Cluster (no replicas) on free ports, killed on drop.
struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| llmq_testkit::free_port()).collect();
        let mut children = vec![];
        for p in &ports {
            let node_dir = dir.path().join(p.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            children.push(
                std::process::Command::new(llmq_testkit::redis_server_bin())
                    .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ])
                    .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("redis-server starts"),
            );
        }
        let c = RedisCluster {
            ports,
            children,
            _dir: dir,
        };
        for p in &c.ports {
            llmq_testkit::wait_until(Duration::from_secs(10), "a cluster node answers", || {
                c.cmd(*p, &["PING"]).is_ok()
            });
        }
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &c.ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (apt-get install redis-tools) creates the cluster");
        assert!(out.status.success(), "{out:?}");
        llmq_testkit::wait_until(
            Duration::from_secs(20),
            "cluster_state:ok on every node",
            || {
                c.ports.iter().all(|p| {
                    c.cmd(*p, &["CLUSTER", "INFO"])
                        .is_ok_and(|i| i.contains("cluster_state:ok"))
                })
            },
        );
        c
    }

    fn cmd(&self, port: u16, args: &[&str]) -> redis::RedisResult<String> {
        let mut conn =
            redis::Client::open(format!("redis://127.0.0.1:{port}"))?.get_connection()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let v: redis::Value = cmd.query(&mut conn)?;
        Ok(match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::SimpleString(s) => s,
            redis::Value::VerbatimString { text, .. } => text,
            redis::Value::Int(i) => i.to_string(),
            other => format!("{other:?}"),
        })
    }

    fn slot(&self, key: &str) -> u16 {
        self.cmd(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The port of the node that serves `key`'s slot.
    fn owner(&self, key: &str) -> u16 {
        let slot = i64::from(self.slot(key));
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", self.ports[0]))
            .unwrap()
            .get_connection()
            .unwrap();
        let slots: Vec<(i64, i64, Vec<redis::Value>)> =
            redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).unwrap();
        for (lo, hi, master) in slots {
            if (lo..=hi).contains(&slot) {
                if let Some(redis::Value::Int(port)) = master.get(1) {
                    return *port as u16;
                }
            }
        }
        panic!("no node serves slot {slot}")
    }
}

/// The gate's scripts and the member list each stay inside one hash tag, so
/// they run unchanged on a real Redis Cluster node (a multi-slot script
/// would be refused with CROSSSLOT). The rest of the daemon is not
/// Cluster-ready: see ARCHITECTURE.md, "Scale-out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_and_membership_run_on_a_redis_cluster() {
    let rc = RedisCluster::start();
    let (config, ring) = gate_setup(
        2,
        Limits {
            rpm: Some(2),
            ..Limits::default()
        },
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    for i in 1..=2 {
        let id = KeyId::new("g", i);
        let (win, st) = (llmq::global::window_key(&id), llmq::global::state_key(&id));
        assert_eq!(rc.slot(&win), rc.slot(&st), "one slot per API key");
        let port = rc.owner(&win);
        let conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        let g = GlobalGate::new(conn, "cluster-node-test", &config, &ring);
        let probe = granted(g.admit(&id, 5, false).await.unwrap());
        assert!(probe.is_probe());
        g.complete(probe, &success()).await;
        let c = granted(g.admit(&id, 5, false).await.unwrap());
        assert!(matches!(
            g.admit(&id, 5, false).await.unwrap(),
            Admit::Wait {
                limit: WaitFor::Rpm,
                ..
            }
        ));
        assert_eq!(
            g.reap(std::slice::from_ref(&id), "cluster-node-test")
                .await
                .unwrap(),
            1
        );
        g.complete(
            c,
            &Fate::Disabled {
                reason: "auth_failed".into(),
            },
        )
        .await;
        assert!(g.state(&id).await.unwrap().disabled.is_some());
        g.reset(&id).await.unwrap();
        let st = g.states(std::slice::from_ref(&id)).await.unwrap();
        assert!(
            st[0].disabled.is_none() && st[0].window_calls == 2,
            "{st:?}"
        );
        // A node that does not own the slot refuses (MOVED): the test means it.
        let other = *rc.ports.iter().find(|p| **p != port).unwrap();
        let conn = redis::Client::open(format!("redis://127.0.0.1:{other}"))
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        let wrong = GlobalGate::new(conn, "x", &config, &ring);
        assert!(
            wrong.state(&id).await.is_err(),
            "a non-owner node answers MOVED"
        );
    }
    let port = rc.owner(llmq::cluster::DAEMONS_KEY);
    assert_eq!(
        rc.slot(llmq::cluster::DAEMONS_KEY),
        rc.slot(&llmq::cluster::alive_key("x"))
    );
    let conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let m = llmq::cluster::Membership::new(conn.clone(), "node-a", Duration::from_secs(1));
    m.beat().await.unwrap();
    let listed = llmq::cluster::list(&mut conn.clone()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].consumer, "node-a");
    m.leave().await.unwrap();
    assert!(llmq::cluster::list(&mut conn.clone())
        .await
        .unwrap()
        .is_empty());
}

/// The cost of one admission and one completion (a round trip each), for
/// ARCHITECTURE.md and BENCHMARKS.md. Run with `--release` for the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_cost_per_admission() {
    let redis = RedisServer::start();
    let (config, ring) = gate_setup(
        1,
        Limits {
            rpm: Some(1_000_000),
            tpm: Some(1_000_000_000),
            ..Limits::default()
        },
        Duration::from_secs(60),
        Duration::from_secs(60),
    );
    let g = gate(&redis, &config, &ring).await;
    let id = KeyId::new("g", 1);
    let n = 2_000;
    let (mut admit, mut complete) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        let c = granted(g.admit(&id, 50, false).await.unwrap());
        admit.push(t.elapsed());
        let t = Instant::now();
        g.complete(c, &success()).await;
        complete.push(t.elapsed());
    }
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let avg = v.iter().sum::<Duration>() / v.len() as u32;
        (avg, v[v.len() / 2], v[v.len() * 99 / 100])
    };
    // The floor: a PING round trip on a connection of the same kind.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let mut ping = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        ping.push(t.elapsed());
    }
    let (a_avg, a_p50, a_p99) = stats(&mut admit);
    let (c_avg, c_p50, c_p99) = stats(&mut complete);
    let (p_avg, p_p50, p_p99) = stats(&mut ping);
    let st = g.state(&id).await.unwrap();
    eprintln!(
        "gate cost, {n} sequential calls on one key ({} in its window): admit avg {a_avg:?} p50 {a_p50:?} p99 {a_p99:?}; complete avg {c_avg:?} p50 {c_p50:?} p99 {c_p99:?}; PING round trip avg {p_avg:?} p50 {p_p50:?} p99 {p_p99:?}",
        st.window_calls
    );
    assert_eq!(st.window_calls, n as u64);
    assert!(a_p50 < Duration::from_millis(5), "admission p50 {a_p50:?}");
}

// ---------------------------------------------------------------------------
// Three `llmq serve` processes on one Redis.

/// One daemon of a test cluster, with its admin API.
struct Node {
    daemon: DaemonProcess,
    spec: DaemonSpec,
    admin: Admin,
}

struct Cluster {
    redis: RedisServer,
    mock: MockServer,
    nodes: Vec<Node>,
}

impl Cluster {
    /// `n` daemons with the same config (each its own admin port), all
    /// consuming before this returns.
    async fn start(
        mc: MockConfig,
        providers: &[Provider],
        extra: &str,
        env: &[(String, String)],
        n: usize,
    ) -> Cluster {
        let redis = RedisServer::start();
        let mock = mock(mc).await;
        let base = config(&redis, &mock, providers, extra);
        let mut c = Cluster {
            redis,
            mock,
            nodes: vec![],
        };
        for _ in 0..n {
            let listen = free_listen();
            let mut s = spec(with_admin(&base, &listen));
            for (k, v) in env {
                s = s.env(k, v);
            }
            let mut daemon = start(&s);
            let admin = Admin::new(&listen, None);
            admin.wait_up(&mut daemon, Duration::from_secs(30)).await;
            c.nodes.push(Node {
                daemon,
                spec: s,
                admin,
            });
        }
        c.wait_consumers(n).await;
        c
    }

    /// Waits until `n` daemons are in the member list (each has connected
    /// its queue and starts consuming right after).
    async fn wait_consumers(&self, n: usize) {
        let url = self.redis.url();
        poll(
            Duration::from_secs(20),
            "every daemon in the member list",
            || {
                let url = url.clone();
                async move {
                    let mut conn = llmq::redis_conn::connect(&url).await.ok()?;
                    let members = llmq::cluster::list(&mut conn).await.ok()?;
                    (members.len() >= n).then_some(())
                }
            },
        )
        .await;
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- daemon {i}:\n{}", tail(&n.daemon.log(), 40)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn push_all(&self, ids: &[String]) {
        let mut c = self.redis.client();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XADD")
                .arg("llmq:{jobs}:normal")
                .arg("*")
                .arg("job")
                .arg(job(id).to_string())
                .ignore();
        }
        pipe.query::<()>(&mut c).expect("push jobs");
    }

    fn results_present(&self, ids: &[String]) -> usize {
        let mut c = self.redis.client();
        let keys: Vec<String> = ids.iter().map(|id| format!("llmq:result:{id}")).collect();
        keys.chunks(500)
            .map(|chunk| {
                redis::cmd("EXISTS")
                    .arg(chunk)
                    .query::<usize>(&mut c)
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Polls until every id has a result, calling `tick` with the elapsed
    /// time every ~20 ms (samplers, a kill at the right moment).
    async fn wait_all(
        &mut self,
        ids: &[String],
        timeout: Duration,
        mut tick: impl FnMut(&mut Cluster, Duration),
    ) -> Vec<llmq::job::JobResult> {
        let started = Instant::now();
        loop {
            tick(self, started.elapsed());
            let have = self.results_present(ids);
            if have == ids.len() {
                break;
            }
            if started.elapsed() > timeout {
                panic!(
                    "only {have} of {} results after {timeout:?}\n{}",
                    ids.len(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids.iter()
            .map(|id| result(&self.redis, id).expect("result exists"))
            .collect()
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// Status of `id` as a daemon's `GET /v1/keys` shows it.
async fn key_status(admin: &Admin, id: &str) -> String {
    let keys = admin.get("/v1/keys").await.json();
    keys.as_array()
        .and_then(|a| a.iter().find(|k| k["id"] == id))
        .and_then(|k| k["status"].as_str())
        .unwrap_or("missing")
        .to_string()
}

/// Test 1: the issue-4 quota scenario on three daemons at once.
async fn cluster_quota(window: Duration, slack: Duration) {
    let w_ms = window.as_millis() as u64;
    let mut mc = MockConfig::default().window_ms(w_ms);
    let mut env = vec![];
    for i in 1..=4u32 {
        let secret = format!("sk-test-cluster-good-{i:04}-xxxxxxx");
        mc = mc.key(KeySpec::new(&secret).label(format!("q#{i}")).rpm(30));
        env.push((format!("Q_API_KEY_{i}"), secret));
    }
    let invalid = "sk-test-cluster-invalid-0005-xxx";
    mc = mc.key(KeySpec::new(invalid).label("q#5").state(KeyState::Invalid));
    env.push(("Q_API_KEY_5".into(), invalid.into()));
    let provider = Provider::new("q", Protocol::OpenAi, "free", "m")
        .with("limits = { rpm = 30 }")
        .with(&format!("window = \"{w_ms}ms\""));
    let extra = "[routing]\ndefault_deadline = \"10m\"\n\n[queue]\nconcurrency = 100\n";
    let mut c = Cluster::start(mc, &[provider], extra, &env, 3).await;

    let ids = ids("cq", 300);
    let started = Instant::now();
    c.push_all(&ids);
    let mut timeline: Vec<(u128, u64)> = vec![];
    let results = c
        .wait_all(&ids, window * 4 + Duration::from_secs(20), |c, t| {
            timeline.push((t.as_millis(), c.mock.stats().total_accepted))
        })
        .await;
    if std::env::var("LLMQ_TEST_TIMELINE").is_ok() {
        let mut last = 0;
        for (t, n) in &timeline {
            if *n != last {
                eprintln!("  t={t}ms accepted={n}");
                last = *n;
            }
        }
    }
    let wall = started.elapsed();

    let failed: Vec<_> = results
        .iter()
        .filter(|r| r.status != Status::Succeeded)
        .collect();
    assert!(failed.is_empty(), "every job succeeds; failed: {failed:?}");
    let stats = c.mock.stats();
    assert_eq!(stats.total_429, 0, "no upstream 429s: {stats:?}");
    assert_eq!(
        stats.keys["q#5"].calls, 1,
        "exactly one call to the invalid key across three daemons"
    );
    let mut by_daemon = std::collections::BTreeMap::<String, usize>::new();
    for r in &results {
        *by_daemon
            .entry(r.key.clone().unwrap_or_default())
            .or_default() += 1;
    }
    for i in 1..=4 {
        let k = &stats.keys[&format!("q#{i}")];
        assert!(
            k.peak_window_accepted <= 30,
            "q#{i} was sent {} in one window",
            k.peak_window_accepted
        );
    }
    // 120 fit in each window: the last 60 go in the third, two windows on.
    let minimum = window * 2;
    let limit = minimum.mul_f64(1.1) + slack;
    eprintln!(
        "cluster quota: 3 daemons, window {window:?}, 300 jobs, wall {wall:?} (minimum {minimum:?}, limit {limit:?}), 429s {}, invalid-key calls {}, per key {by_daemon:?}",
        stats.total_429, stats.keys["q#5"].calls
    );
    assert!(
        wall >= minimum,
        "cannot finish before two windows: {wall:?}"
    );
    assert!(
        wall <= limit,
        "wall {wall:?} exceeds 1.1 × the physical minimum {minimum:?} + {slack:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_quota_compressed_window() {
    cluster_quota(Duration::from_secs(3), Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "real 60 s window; run with --ignored"]
async fn cluster_quota_real_minute() {
    cluster_quota(Duration::from_secs(60), Duration::ZERO).await;
}

/// When admission rounds start: the first sample of each burst that
/// follows `gap` ms without admissions.
fn round_starts(timeline: &[(u64, u64)], gap: u64) -> Vec<u64> {
    let mut starts = vec![];
    let (mut last_n, mut last_change) = (0u64, None::<u64>);
    for &(ms, n) in timeline {
        if n > last_n {
            if last_change.is_none_or(|c| ms - c >= gap) {
                starts.push(ms);
            }
            last_n = n;
            last_change = Some(ms);
        }
    }
    starts
}

/// Accepted calls in `(from, from + len]` from a timeline of `(ms, total)`.
fn accepted_between(timeline: &[(u64, u64)], from: u64, len: u64) -> u64 {
    let at = |t: u64| {
        timeline
            .iter()
            .take_while(|(ms, _)| *ms <= t)
            .last()
            .map_or(0, |(_, n)| *n)
    };
    at(from + len) - at(from)
}

/// Test 2: kill -9 one of three daemons mid-run. Its jobs finish on the
/// others (reclaimed after the visibility timeout), and the admitted rate
/// is back at ≥ 90% of the keys' capacity within one visibility timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_a_daemon_killed_mid_run() {
    let window = Duration::from_secs(2);
    let w_ms = window.as_millis() as u64;
    let visibility = Duration::from_secs(1);
    let mut mc = MockConfig::default().window_ms(w_ms);
    let mut env = vec![];
    for i in 1..=4u32 {
        let secret = format!("sk-test-cluster-kill-{i:04}-xxxxxxx");
        mc = mc.key(KeySpec::new(&secret).label(format!("k#{i}")).rpm(30));
        env.push((format!("K_API_KEY_{i}"), secret));
    }
    let provider = Provider::new("k", Protocol::OpenAi, "free", "m")
        .with("limits = { rpm = 30 }")
        .with(&format!("window = \"{w_ms}ms\""));
    let extra = format!(
        "[routing]\ndefault_deadline = \"10m\"\n\n[queue]\nconcurrency = 100\nvisibility_timeout = \"{}ms\"\n\n[cluster]\nheartbeat = \"200ms\"\n",
        visibility.as_millis()
    );
    let mut c = Cluster::start(mc, &[provider], &extra, &env, 3).await;
    let members = c.nodes[1].admin.get("/v1/cluster").await.json();
    let members = members.as_array().expect("a member list").clone();
    assert_eq!(members.len(), 3, "{members:?}");
    let victim_pid = c.nodes[0].daemon.pid().expect("running");
    let victim = members
        .iter()
        .find(|m| m["pid"] == victim_pid)
        .and_then(|m| m["consumer"].as_str())
        .expect("the victim is listed")
        .to_string();

    let capacity = 4 * 30u64;
    let ids = ids("ck", 600);
    c.push_all(&ids);
    // Kill between two rounds of admissions (the first takes ~0.5 s).
    let kill_at = window.mul_f64(0.6).as_millis() as u64;
    let mut killed_at: Option<u64> = None;
    let mut gone_at: Option<u64> = None;
    let mut timeline: Vec<(u64, u64)> = vec![];
    let alive = format!("llmq:{{cluster}}:alive:{victim}");
    let results = c
        .wait_all(&ids, window * 8 + Duration::from_secs(20), |c, t| {
            let ms = t.as_millis() as u64;
            timeline.push((ms, c.mock.stats().total_accepted));
            if killed_at.is_none() && ms >= kill_at {
                c.nodes[0].daemon.kill();
                killed_at = Some(ms);
            }
            if killed_at.is_some() && gone_at.is_none() {
                let mut r = c.redis.client();
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&alive)
                    .query(&mut r)
                    .unwrap_or(true);
                if !exists {
                    gone_at = Some(ms);
                }
            }
        })
        .await;
    let killed_at = killed_at.expect("the daemon was killed");
    if std::env::var("LLMQ_TEST_TIMELINE").is_ok() {
        let mut last = 0;
        for (t, n) in &timeline {
            if *n != last {
                eprintln!("  t={t}ms accepted={n}");
                last = *n;
            }
        }
    }
    let failed: Vec<_> = results
        .iter()
        .filter(|r| r.status != Status::Succeeded)
        .collect();
    assert!(failed.is_empty(), "every job succeeds: {failed:?}");
    let stats = c.mock.stats();
    assert_eq!(stats.total_429, 0, "no upstream 429s: {stats:?}");
    for i in 1..=4 {
        let k = &stats.keys[&format!("k#{i}")];
        assert!(
            k.peak_window_accepted <= 30,
            "k#{i}: {}",
            k.peak_window_accepted
        );
    }
    // Admissions come in rounds, one per window: each key's slots re-open
    // a window after their calls complete. The rate after recovery is the
    // admissions from the first round that starts one visibility timeout
    // after the kill to the start of the last round, per window of time.
    let rounds = round_starts(&timeline, w_ms / 2);
    let from = killed_at + visibility.as_millis() as u64;
    let after: Vec<u64> = rounds.iter().copied().filter(|r| *r >= from).collect();
    assert!(
        after.len() >= 3,
        "too few rounds after the kill: {rounds:?}"
    );
    let (first, last) = (after[0], after[after.len() - 1]);
    let admitted = accepted_between(&timeline, first - 1, last - first);
    let rate = admitted as f64 * w_ms as f64 / (last - first) as f64;
    let per_round: Vec<u64> = rounds
        .windows(2)
        .map(|r| accepted_between(&timeline, r[0] - 1, r[1] - r[0]))
        .collect();
    let gone = gone_at.map(|g| g - killed_at);
    eprintln!(
        "kill -9: killed at {killed_at} ms, member entry gone {gone:?} ms later; rounds start at {rounds:?} ms with {per_round:?} admissions; from {first} ms to {last} ms: {rate:.1} per {w_ms} ms window = {:.1}% of the keys' {capacity}; {} upstream calls for {} jobs",
        rate * 100.0 / capacity as f64,
        stats.total_calls,
        ids.len()
    );
    assert!(
        rate >= 0.9 * capacity as f64,
        "admitted {rate:.1} per window after the kill (capacity {capacity})"
    );
    // The dead daemon left the member list within its TTL (3 × 200 ms).
    let gone = gone.expect("the dead daemon's liveness key expired");
    assert!(gone <= 1_500, "{gone} ms");
    let listed = c.nodes[1].admin.get("/v1/cluster").await.json();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
}

/// Test 3: admission accuracy under contention. Three daemons, 20 keys
/// with mixed limits (RPM, some with a binding TPM), offered twice their
/// capacity for three windows: no key is ever sent more than its limit in
/// any window, and ≥ 95% of the capacity is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_admission_is_accurate_under_contention() {
    let window = Duration::from_secs(2);
    let w_ms = window.as_millis() as u64;
    let ids = ids("ac", 1_200);
    let messages: Vec<llmq_sdk::types::Message> =
        serde_json::from_value(job(&ids[0])["messages"].clone()).unwrap();
    let charge = llmq_sdk::estimate::prompt_tokens(&messages) + 16;
    let mut mc = MockConfig::default().window_ms(w_ms);
    let mut env = vec![];
    let mut provider = Provider::new("a", Protocol::OpenAi, "free", "m")
        .with(&format!("window = \"{w_ms}ms\""))
        .with("limits = { rpm = 1000 }");
    let mut capacity = 0u64;
    let mut limits = vec![];
    for i in 1..=20u32 {
        let rpm = [4u64, 8, 12, 16][(i % 4) as usize];
        // Every fourth key is held by its tokens: half its RPM's worth.
        let tpm = (i % 4 == 1).then_some(charge * rpm / 2);
        let secret = format!("sk-test-cluster-acc-{i:04}-xxxxxxx");
        let mut spec = KeySpec::new(&secret)
            .label(format!("a#{i}"))
            .rpm(rpm as u32);
        if let Some(t) = tpm {
            spec = spec.tpm(t);
        }
        mc = mc.key(spec);
        env.push((format!("A_API_KEY_{i}"), secret));
        let tpm_toml = tpm.map_or(String::new(), |t| format!(", tpm = {t}"));
        provider = provider.with(&format!(
            "\n[[providers.a.keys]]\nkey_env = \"A_API_KEY_{i}\"\ninstance = {i}\nlimits = {{ rpm = {rpm}{tpm_toml} }}"
        ));
        capacity += tpm.map_or(rpm, |t| (t / charge).min(rpm));
        limits.push((format!("a#{i}"), rpm, tpm));
    }
    let extra = "[routing]\ndefault_deadline = \"10m\"\n\n[queue]\nconcurrency = 200\n";
    let c = Cluster::start(mc, &[provider], extra, &env, 3).await;
    let offered = 2 * 3 * capacity as usize;
    let ids = &ids[..offered.min(ids.len())];
    c.push_all(ids);
    let mut timeline: Vec<(u64, u64)> = vec![];
    let started = Instant::now();
    while started.elapsed() < window * 3 + Duration::from_millis(200) {
        timeline.push((
            started.elapsed().as_millis() as u64,
            c.mock.stats().total_accepted,
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = timeline
        .iter()
        .find(|(_, n)| *n > 0)
        .map(|(ms, _)| *ms)
        .unwrap_or_else(|| panic!("nothing admitted\n{}", c.logs()));
    let admitted = accepted_between(&timeline, first.saturating_sub(1), 3 * w_ms);
    let stats = c.mock.stats();
    let mut over = vec![];
    let mut per_key = vec![];
    for (label, rpm, tpm) in &limits {
        let k = &stats.keys[label];
        per_key.push(format!(
            "{label} {}/{rpm}{}",
            k.peak_window_accepted,
            tpm.map_or(String::new(), |t| format!(
                " tok {}/{t}",
                k.peak_window_tokens
            ))
        ));
        if k.peak_window_accepted > *rpm || tpm.is_some_and(|t| k.peak_window_tokens > t) {
            over.push(label.clone());
        }
    }
    eprintln!(
        "contention: 3 daemons, 20 keys, capacity {capacity} per {w_ms} ms window, offered {} jobs; admitted {admitted} in the first 3 windows = {:.1}% of {}; 429s {}; peak per window (calls/limit): {}",
        ids.len(),
        admitted as f64 * 100.0 / (3 * capacity) as f64,
        3 * capacity,
        stats.total_429,
        per_key.join(", ")
    );
    assert!(
        over.is_empty(),
        "keys sent more than their limit in a window: {over:?}"
    );
    assert_eq!(stats.total_429, 0);
    assert!(
        admitted * 100 >= 95 * 3 * capacity,
        "admitted {admitted} of {} in three windows",
        3 * capacity
    );
}

/// A bare gate on the test's Redis (to read what the daemons left there).
async fn reader(redis: &RedisServer) -> GlobalGate {
    gate(redis, &Config::default(), &KeyRing::default()).await
}

/// Polls every daemon's `GET /v1/keys` until `id` has `status` on all of
/// them; returns how long that took.
async fn until_status_everywhere(c: &Cluster, id: &str, status: &str) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for n in &c.nodes {
            all &= key_status(&n.admin, id).await == status;
        }
        if all {
            return started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(5) {
            let mut seen = vec![];
            for n in &c.nodes {
                seen.push(key_status(&n.admin, id).await);
            }
            panic!(
                "{id} never became {status} on every daemon: {seen:?}\n{}",
                c.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Test 4: restarting every daemon keeps cooldowns and disabled keys (they
/// live in Redis), today's per-key counters and the day's spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_restart_keeps_key_state_counters_and_spend() {
    let mut mc = MockConfig::default();
    let mut env = vec![];
    for i in 1..=5u32 {
        let secret = format!("sk-test-cluster-rst-{i:04}-xxxxxxxx");
        let mut spec = KeySpec::new(&secret).label(format!("r#{i}")).rpm(100);
        if i == 4 {
            spec = spec.state(KeyState::Invalid);
        }
        mc = mc.key(spec);
        env.push((format!("R_API_KEY_{i}"), secret));
    }
    let provider = Provider::new("r", Protocol::OpenAi, "free", "m").with("limits = { rpm = 100 }");
    let extra = "[routing]\ndefault_deadline = \"1m\"\n\n[queue]\nconcurrency = 20\n";
    let mut c = {
        let redis = RedisServer::start();
        let mock = mock(mc).await;
        let cfg = config(&redis, &mock, &[provider], extra).replace(
            "context = 100000\n",
            "context = 100000\nprice = { input = 3.0, output = 15.0 }\n",
        );
        let mut c = Cluster {
            redis,
            mock,
            nodes: vec![],
        };
        for _ in 0..3 {
            let listen = free_listen();
            let mut s = spec(with_admin(&cfg, &listen));
            for (k, v) in &env {
                s = s.env(k, v);
            }
            let mut daemon = start(&s);
            let admin = Admin::new(&listen, None);
            admin.wait_up(&mut daemon, Duration::from_secs(30)).await;
            c.nodes.push(Node {
                daemon,
                spec: s,
                admin,
            });
        }
        c.wait_consumers(3).await;
        c
    };
    c.mock.inject(
        Some("r#5"),
        vec![Injection::new(FailureKind::RateLimited429, 1).retry_after_ms(120_000)],
    );
    let first = ids("rs-a", 40);
    c.push_all(&first);
    let mut results = c.wait_all(&first, Duration::from_secs(30), |_, _| {}).await;
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    let stats = c.mock.stats();
    assert_eq!(stats.keys["r#4"].calls, 1, "one call to the invalid key");
    assert_eq!(
        stats.keys["r#5"].calls, 1,
        "the 429, then no more while cooling"
    );
    until_status_everywhere(&c, "r#4", "disabled").await;
    until_status_everywhere(&c, "r#5", "cooling").await;

    // Every daemon stops (its keystore flushes), then all start again.
    for n in &mut c.nodes {
        assert_eq!(n.daemon.stop(), Some(0), "a clean stop");
    }
    let gate = reader(&c.redis).await;
    let st4 = gate.state(&KeyId::new("r", 4)).await.unwrap();
    let st5 = gate.state(&KeyId::new("r", 5)).await.unwrap();
    assert!(st4.disabled.is_some(), "{st4:?}");
    assert!(
        st5.cooling.is_some_and(|c| c > Duration::from_secs(100)),
        "{st5:?}"
    );
    let today = llmq::keystore::day_string(llmq::keystore::day_of(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    ));
    let daily = |c: &Cluster, id: &str| -> u64 {
        let mut r = c.redis.client();
        redis::cmd("HGET")
            .arg(format!("llmq:daily:{today}:{id}"))
            .arg("requests")
            .query::<Option<u64>>(&mut r)
            .unwrap()
            .unwrap_or(0)
    };
    let spend = |c: &Cluster| -> f64 {
        let mut r = c.redis.client();
        redis::cmd("HGET")
            .arg(format!("llmq:spend:{today}"))
            .arg("r")
            .query::<Option<f64>>(&mut r)
            .unwrap()
            .unwrap_or(0.0)
    };
    let calls_before: Vec<u64> = (1..=5)
        .map(|i| stats.keys[&format!("r#{i}")].calls)
        .collect();
    let daily_before: Vec<u64> = (1..=5).map(|i| daily(&c, &format!("r#{i}"))).collect();
    assert_eq!(
        daily_before, calls_before,
        "today's counters in Redis are the calls of all three daemons"
    );
    let cost_before: f64 = results.iter().map(|r| r.cost_usd).sum();
    assert!(cost_before > 0.0);
    assert!(
        (spend(&c) - cost_before).abs() < 1e-9,
        "{} vs {cost_before}",
        spend(&c)
    );

    for i in 0..3 {
        let spec = c.nodes[i].spec.clone();
        c.nodes[i].daemon.restart(&spec);
        let admin = c.nodes[i].admin.clone();
        admin
            .wait_up(&mut c.nodes[i].daemon, Duration::from_secs(30))
            .await;
    }
    c.wait_consumers(3).await;
    // Before any new job: every daemon shows the state and today's counts.
    for n in &c.nodes {
        let keys = n.admin.get("/v1/keys").await.json();
        let view = |id: &str| {
            keys.as_array()
                .and_then(|a| a.iter().find(|k| k["id"] == id))
                .cloned()
                .unwrap_or_else(|| panic!("no {id} in {keys}"))
        };
        assert_eq!(view("r#4")["status"], "disabled");
        assert_eq!(view("r#5")["status"], "cooling");
        for i in 1..=3 {
            assert_eq!(
                view(&format!("r#{i}"))["today"]["requests"],
                calls_before[i - 1],
                "r#{i} today's requests after the restart"
            );
        }
    }
    let second = ids("rs-b", 40);
    c.push_all(&second);
    results.extend(
        c.wait_all(&second, Duration::from_secs(30), |_, _| {})
            .await,
    );
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    let stats = c.mock.stats();
    assert_eq!(
        stats.keys["r#4"].calls, 1,
        "still disabled after the restart"
    );
    assert_eq!(
        stats.keys["r#5"].calls, 1,
        "still cooling after the restart"
    );
    for n in &mut c.nodes {
        assert_eq!(n.daemon.stop(), Some(0));
    }
    let cost: f64 = results.iter().map(|r| r.cost_usd).sum();
    let daily_after: Vec<u64> = (1..=5).map(|i| daily(&c, &format!("r#{i}"))).collect();
    let calls_after: Vec<u64> = (1..=5)
        .map(|i| stats.keys[&format!("r#{i}")].calls)
        .collect();
    eprintln!(
        "restart: gate state r#4 {:?}, r#5 cooling {:?}; daily requests before {daily_before:?} after {daily_after:?}; spend ${:.6} (results ${cost:.6})",
        st4.disabled.map(|d| d.reason),
        st5.cooling,
        spend(&c)
    );
    assert_eq!(daily_after, calls_after, "counters add up across restarts");
    assert!((spend(&c) - cost).abs() < 1e-9, "{} vs {cost}", spend(&c));
}

/// A key disabled, re-enabled or cooling on one daemon is so on all of
/// them in well under a second, including keys with no limits (which skip
/// the gate's round trip: the keystore's `llmq:keyevents` carries it).
/// Also the member list through `llmq cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_key_states_propagate_within_a_second() {
    let mut mc = MockConfig::default();
    let mut env = vec![];
    for i in 1..=3u32 {
        let secret = format!("sk-test-cluster-prop-{i:04}-xxxxxxx");
        mc = mc.key(KeySpec::new(&secret).label(format!("p#{i}")));
        env.push((format!("P_API_KEY_{i}"), secret));
    }
    let provider = Provider::new("p", Protocol::OpenAi, "free", "m");
    let c = Cluster::start(mc, &[provider], "", &env, 3).await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmq"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--config")
        .arg(c.nodes[0].daemon.config_path())
        .arg("--json")
        .arg("cluster")
        .output()
        .expect("llmq cluster runs");
    assert!(out.status.success(), "{out:?}");
    let members: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut pids: Vec<u64> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pid"].as_u64().unwrap())
        .collect();
    pids.sort();
    let mut want: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.daemon.pid().unwrap() as u64)
        .collect();
    want.sort();
    assert_eq!(pids, want, "llmq cluster lists the three daemons");

    let r = c.nodes[0]
        .admin
        .post(
            "/v1/keys/p%232/disable",
            Some(&serde_json::json!({"reason": "rotating"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let disabled = until_status_everywhere(&c, "p#2", "disabled").await;
    let r = c.nodes[1].admin.post("/v1/keys/p%232/reset", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let reset = until_status_everywhere(&c, "p#2", "available").await;

    // A 429 on whichever daemon runs the job cools the key on all.
    c.mock.inject(
        Some("p#1"),
        vec![Injection::new(FailureKind::RateLimited429, 1).retry_after_ms(30_000)],
    );
    push(
        &c.redis,
        "normal",
        &serde_json::json!({"id": "prop-429", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "route": {"key": "p#1"}, "deadline_s": 2}),
    );
    let mock = &c.mock;
    let started = Instant::now();
    while !mock.stats().keys["p#1"]
        .outcomes
        .contains_key("rate_limited_429")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no 429 was answered: {:?} {:?}\n{}",
            mock.stats().keys["p#1"],
            result(&c.redis, "prop-429"),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cooling = until_status_everywhere(&c, "p#1", "cooling").await;
    eprintln!(
        "propagation to all 3 daemons: disabled in {disabled:?}, reset in {reset:?}, cooling (after the 429 was answered) in {cooling:?}"
    );
    for d in [disabled, reset, cooling] {
        assert!(d < Duration::from_secs(1), "{d:?}");
    }
}
