//! Quota pools across daemons (SPEC §11): keys that share an `account`
//! share one set of limits in the cluster-wide gate, as the provider counts
//! them. Two layers, as in `e2e_cluster.rs`:
//!
//! - the gate driven directly by two "daemons" (two connections) against a
//!   private Redis;
//! - two real `llmq serve` processes on one Redis with the mock provider,
//!   whose keys of one account share one limiter and report the account's
//!   ground truth (`Stats::accounts`).

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::config::{Config, Limits, ProviderConfig};
use llmq::global::{Admit, GateKeys, GlobalGate};
use llmq::job::Status;
use llmq::keys::{ApiKey, KeyId, KeyRing};
use llmq::pool::Fate;
use llmq_mock::{KeySpec, MockConfig, Protocol};
use llmq_testkit::daemon::DaemonProcess;
use llmq_testkit::RedisServer;
use secrecy::SecretString;
use std::time::{Duration, Instant};

fn success() -> Fate {
    Fate::Success {
        usage_in: 1,
        usage_out: 1,
        cost_usd: 0.0,
    }
}

/// Provider `g` with `rpm` per `window`; keys g#1 and g#2 of account
/// `proj`, g#3 of none.
fn setup(rpm: u64, window: Duration) -> (Config, KeyRing) {
    let mut config = Config::default();
    config.providers.insert(
        "g".into(),
        ProviderConfig {
            limits: Limits {
                rpm: Some(rpm),
                ..Limits::default()
            },
            window: Some(window),
            ..ProviderConfig::default()
        },
    );
    let ring = KeyRing::from_keys((1..=3).map(|i| {
        let mut k = ApiKey::new(
            KeyId::new("g", i),
            Some(SecretString::from(format!("sk-test-acct-{i:04}-xxxxxxxx"))),
            "test",
        );
        if i < 3 {
            k.account = Some("proj".into());
        }
        k
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_counts_an_accounts_keys_in_one_window_across_daemons() {
    let redis = RedisServer::start();
    let (config, ring) = setup(10, Duration::from_secs(30));
    let a = gate(&redis, &config, &ring).await;
    let b = gate(&redis, &config, &ring).await;
    let (k1, k2, k3) = (KeyId::new("g", 1), KeyId::new("g", 2), KeyId::new("g", 3));
    // Probation is per key: each key's first call is its own probe.
    for (g, k) in [(&a, &k1), (&b, &k2)] {
        let Admit::Granted(call) = g.admit(k, 1, false).await.unwrap() else {
            panic!("{k}'s probe")
        };
        assert!(call.is_probe(), "{k}");
        g.complete(call, &success()).await;
    }
    // Daemon a asks for g#1, daemon b for g#2, in turn, until both wait.
    let mut granted = 2;
    let mut open = [true, true];
    while open.iter().any(|o| *o) {
        for (i, (g, k)) in [(&a, &k1), (&b, &k2)].into_iter().enumerate() {
            if !open[i] {
                continue;
            }
            match g.admit(k, 1, false).await.unwrap() {
                Admit::Granted(call) => {
                    granted += 1;
                    g.complete(call, &success()).await;
                }
                Admit::Wait { .. } => open[i] = false,
                other => panic!("{k}: {other:?}"),
            }
        }
    }
    assert_eq!(granted, 10, "rpm 10 for the account, both keys together");
    assert_eq!(a.limits(&k1).rpm, Some(10));
    // Both keys see the account's window; a key of no account is apart.
    assert_eq!(a.state(&k1).await.unwrap().window_calls, 10);
    assert_eq!(b.state(&k2).await.unwrap().window_calls, 10);
    assert!(matches!(
        a.admit(&k3, 1, false).await.unwrap(),
        Admit::Granted(_)
    ));

    // In Redis: one window for the account, under its hash tag; each
    // key's state on its own hash, under the same tag.
    let mut c = redis.client();
    let keys = GateKeys::of(&k1, Some("proj"));
    assert_eq!(keys.win, "llmq:{acct:g:proj}:win");
    let n: u64 = redis::cmd("ZCARD").arg(&keys.win).query(&mut c).unwrap();
    assert_eq!(n, 10);
    let own: u64 = redis::cmd("EXISTS")
        .arg(llmq::global::window_key(&k1))
        .query(&mut c)
        .unwrap();
    assert_eq!(own, 0, "no per-key window for a key of an account");
    let proven: Option<String> = redis::cmd("HGET")
        .arg(GateKeys::of(&k2, Some("proj")).state)
        .arg("proven")
        .query(&mut c)
        .unwrap();
    assert_eq!(proven.as_deref(), Some("1"));

    // State stays per key: g#1 disabled, g#2 not.
    let Admit::Wait { .. } = a.admit(&k1, 1, false).await.unwrap() else {
        panic!("the account is full")
    };
    a.disable(&k1, "operator: test").await.unwrap();
    assert!(a.state(&k1).await.unwrap().disabled.is_some());
    assert!(b.state(&k2).await.unwrap().disabled.is_none());
}

/// A one-node Redis Cluster holding every slot, killed on drop: it refuses
/// a script whose keys hash to different slots (CROSSSLOT), as any Redis
/// Cluster does.
struct OneNodeCluster {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for OneNodeCluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OneNodeCluster {
    fn start() -> OneNodeCluster {
        let dir = tempfile::tempdir().unwrap();
        let port = llmq_testkit::free_port();
        let child = std::process::Command::new(llmq_testkit::redis_server_bin())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let c = OneNodeCluster {
            port,
            child,
            _dir: dir,
        };
        let url = c.url();
        let query = |args: &[&str]| -> redis::RedisResult<String> {
            let mut conn = redis::Client::open(url.as_str())?.get_connection()?;
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            cmd.query(&mut conn)
        };
        llmq_testkit::wait_until(Duration::from_secs(10), "the node answers", || {
            query(&["PING"]).is_ok()
        });
        query(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).expect("slots assigned");
        llmq_testkit::wait_until(Duration::from_secs(10), "cluster_state:ok", || {
            query(&["CLUSTER", "INFO"]).is_ok_and(|i| i.contains("cluster_state:ok"))
        });
        c
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_gate_scripts_touch_one_cluster_slot() {
    let rc = OneNodeCluster::start();
    let (config, ring) = setup(3, Duration::from_secs(30));
    let conn = redis::Client::open(rc.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    // The node refuses a cross-slot script at all: the check is real.
    let cross: redis::RedisResult<i64> = redis::Script::new("return 1")
        .key("llmq:{a}:x")
        .key("llmq:{b}:y")
        .invoke_async(&mut conn.clone())
        .await;
    assert!(cross.is_err(), "a cross-slot script must fail: {cross:?}");
    let g = GlobalGate::new(conn, "cluster-node-test", &config, &ring);
    let (k1, k2) = (KeyId::new("g", 1), KeyId::new("g", 2));
    for k in [&k1, &k2] {
        let Admit::Granted(probe) = g.admit(k, 5, false).await.unwrap() else {
            panic!("{k}")
        };
        g.complete(probe, &success()).await;
    }
    let Admit::Granted(third) = g.admit(&k1, 5, false).await.unwrap() else {
        panic!("the third call of the account")
    };
    assert!(matches!(
        g.admit(&k2, 5, false).await.unwrap(),
        Admit::Wait { .. }
    ));
    assert_eq!(
        g.reap(&[k1.clone(), k2.clone()], "cluster-node-test")
            .await
            .unwrap(),
        1
    );
    g.complete(third, &Fate::NotSent).await;
    g.disable(&k2, "operator: test").await.unwrap();
    assert!(g.state(&k2).await.unwrap().disabled.is_some());
    let states = g.states(&[k1.clone(), k2.clone()]).await.unwrap();
    assert_eq!(
        states[0].window_calls, 2,
        "the unsent call gave its slot back"
    );
    g.reset(&k2).await.unwrap();
}

// ---------------------------------------------------------------------------
// Two `llmq serve` processes on one Redis, with the mock.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_hold_an_accounts_rpm_between_its_keys() {
    let window = Duration::from_secs(2);
    let w_ms = window.as_millis() as u64;
    let secrets = [
        "sk-test-acct-e2e-0001-xxxxxxx",
        "sk-test-acct-e2e-0002-xxxxxxx",
    ];
    let mut mc = MockConfig::default().window_ms(w_ms);
    for (i, s) in secrets.iter().enumerate() {
        mc = mc.key(
            KeySpec::new(*s)
                .label(format!("a#{}", i + 1))
                .rpm(10)
                .account("proj"),
        );
    }
    let redis = RedisServer::start();
    let mock = mock(mc).await;
    let provider = Provider::new("a", Protocol::OpenAi, "free", "m")
        .with("limits = { rpm = 10 }")
        .with(&format!("window = \"{w_ms}ms\""));
    let extra = "[routing]\ndefault_deadline = \"2m\"\n\n[queue]\nconcurrency = 8\n";
    let base = config(&redis, &mock, &[provider], extra);
    let mut daemons: Vec<(DaemonProcess, Admin)> = Vec::new();
    for _ in 0..2 {
        let listen = free_listen();
        let mut spec = spec(with_admin(&base, &listen));
        for (i, s) in secrets.iter().enumerate() {
            spec = spec
                .env(&format!("A_API_KEY_{}", i + 1), s)
                .env(&format!("A_ACCOUNT_{}", i + 1), "proj");
        }
        let mut daemon = start(&spec);
        let admin = Admin::new(&listen, None);
        admin.wait_up(&mut daemon, Duration::from_secs(30)).await;
        daemons.push((daemon, admin));
    }
    // Each daemon shows the account on both keys (never a secret).
    for (_, admin) in &daemons {
        let keys = admin.get("/v1/keys").await;
        let text = keys.json().to_string();
        assert!(!text.contains("acct-e2e-0001"), "{text}");
        for k in keys.json().as_array().unwrap() {
            assert_eq!(k["account"], "proj", "{k}");
        }
    }

    let n = 40;
    let ids: Vec<String> = (0..n).map(|i| format!("acct-{i:03}")).collect();
    let started = Instant::now();
    for id in &ids {
        push(&redis, "normal", &job(id));
    }
    let results = wait_results(&redis, &daemons[0].0, &ids, Duration::from_secs(60));
    let wall = started.elapsed();
    let failed: Vec<_> = results
        .iter()
        .filter(|r| r.status != Status::Succeeded)
        .collect();
    assert!(failed.is_empty(), "every job succeeds: {failed:?}");

    let stats = mock.stats();
    let acct = &stats.accounts["proj"];
    eprintln!(
        "account quota: 2 daemons, 2 keys of one account, rpm 10 per {window:?}, {n} jobs in {wall:?}; account peak {} per window, 429s {}; per key {:?}",
        acct.peak_window_accepted,
        stats.total_429,
        stats
            .keys
            .iter()
            .map(|(k, s)| (k.clone(), s.accepted))
            .collect::<Vec<_>>()
    );
    assert_eq!(stats.total_429, 0, "no upstream 429s: {stats:?}");
    assert_eq!(acct.accepted, n as u64);
    assert!(
        acct.peak_window_accepted <= 10,
        "the account was sent {} in one window",
        acct.peak_window_accepted
    );
    assert!(
        stats.keys["a#1"].accepted > 0 && stats.keys["a#2"].accepted > 0,
        "both keys serve"
    );
    // 10 per window: 40 calls need at least three windows after the first.
    assert!(wall >= window * 3, "{wall:?}");
    // Both daemons called upstream.
    for (i, (_, admin)) in daemons.iter().enumerate() {
        let keys = admin.get("/v1/keys").await.json();
        let calls: u64 = keys
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["requests"].as_u64().unwrap_or(0))
            .sum();
        assert!(calls > 0, "daemon {i} made no call");
    }
}
