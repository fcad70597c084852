//! Key state in a real Redis: a "restart" (a new pool and keystore loaded
//! from the same Redis) keeps cooldowns, disabled keys, daily counters,
//! lifetime stats and spend; state changes are written at once and
//! published; no secret ever reaches Redis.

use futures::StreamExt;
use llmq::clock::{Clock, ManualClock};
use llmq::config::{Config, Limits, ProviderConfig};
use llmq::keys::{ApiKey, KeyId, KeyRing};
use llmq::keystore::{self, KeyStore};
use llmq::pool::{Acquire, AcquireRequest, Fate, KeyPool, KeyState, KeyStatus, AUTH_FAILED};
use llmq_testkit::{wait_until_async, RedisServer};
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;

/// 2024-05-01T10:00:00Z.
const BASE_MS: u64 = 1_714_557_600_000;

fn secret(n: u32) -> String {
    format!("gsk_FAKE_SECRET_{n}_do_not_store")
}

fn ring() -> KeyRing {
    KeyRing::from_keys((0..4).map(|n| {
        ApiKey::new(
            KeyId::new("groq", n),
            Some(SecretString::from(secret(n))),
            format!("env GROQ_API_KEY_{n}"),
        )
    }))
}

fn config() -> Config {
    let mut c = Config::default();
    c.providers.insert(
        "groq".into(),
        ProviderConfig {
            limits: Limits {
                rpd: Some(6),
                ..Limits::default()
            },
            ..ProviderConfig::default()
        },
    );
    c
}

fn pool_at(unix_ms: u64) -> (KeyPool, ManualClock) {
    let clock = ManualClock::new(unix_ms);
    let pool = KeyPool::new(
        &config(),
        &ring(),
        Arc::new(clock.clone()) as Arc<dyn Clock>,
    );
    (pool, clock)
}

fn pinned(id: &KeyId) -> AcquireRequest<'_> {
    AcquireRequest {
        provider: "groq",
        model: "llama-3.1-8b-instant",
        tokens: 100,
        strategy: None,
        pinned: Some(id),
        instance: None,
    }
}

fn granted(a: Acquire) -> llmq::pool::Permit {
    match a {
        Acquire::Granted(p) => p,
        other => panic!("expected a permit, got {other:?}"),
    }
}

async fn conn(redis: &RedisServer) -> redis::aio::ConnectionManager {
    redis::Client::open(redis.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap()
}

/// Every key and every value in Redis, as text.
async fn dump(redis: &RedisServer) -> Vec<String> {
    let mut c = conn(redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = keys.clone();
    for k in keys {
        let t: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        match t.as_str() {
            "hash" => {
                let h: Vec<String> = redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                out.extend(h);
            }
            "string" => out.push(redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap()),
            other => panic!("unexpected redis type {other} at {k}"),
        }
    }
    out
}

#[tokio::test]
async fn state_and_counters_survive_a_restart_and_no_secret_reaches_redis() {
    let redis = RedisServer::start();
    let (pool, clock) = pool_at(BASE_MS);
    let store = Arc::new(
        KeyStore::connect(&redis.url(), pool.clone())
            .await
            .unwrap()
            .with_flush_every(Duration::from_millis(20)),
    );
    assert_eq!(store.load().await.unwrap().keys, 0);
    // Watch the published state changes.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(keystore::KEY_EVENTS_CHANNEL)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = store.clone().spawn(async move {
        let _ = stopped.await;
    });

    let ids: Vec<KeyId> = (0..4).map(|n| KeyId::new("groq", n)).collect();
    // groq#0: five successful calls.
    for _ in 0..5 {
        granted(pool.try_acquire(&pinned(&ids[0]))).report(Fate::Success {
            usage_in: 30,
            usage_out: 12,
            cost_usd: 0.01,
        });
    }
    // groq#1: a 429 asking for two minutes.
    granted(pool.try_acquire(&pinned(&ids[1]))).report(Fate::RateLimited {
        retry_after: Some(Duration::from_secs(120)),
    });
    // groq#2: invalid; groq#3: disabled by the operator.
    granted(pool.try_acquire(&pinned(&ids[2]))).report(Fate::Disabled {
        reason: AUTH_FAILED.into(),
    });
    pool.disable(&ids[3], "operator: leaked").unwrap();

    // State changes are written at once, readable by anyone.
    let mut c = conn(&redis).await;
    wait_until_async(Duration::from_secs(5), "groq#3 disabled in redis", || {
        let mut c = c.clone();
        let id = ids[3].clone();
        async move {
            KeyStore::read_state(&mut c, &id)
                .await
                .unwrap()
                .is_some_and(|s| s.status == KeyStatus::Disabled)
        }
    })
    .await;
    let s = KeyStore::read_state(&mut c, &ids[1])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.status, s.until_ms),
        (KeyStatus::Cooling, Some(BASE_MS + 120_000))
    );
    let mut published = Vec::new();
    {
        let mut messages = pubsub.on_message();
        while published.len() < 3 {
            let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .expect("three state changes published")
                .unwrap();
            published.push(msg.get_payload::<String>().unwrap());
        }
    }
    assert!(published[0].contains("\"id\":\"groq#1\"") && published[0].contains("cooling"));
    assert!(published[2].contains("operator: leaked"), "{published:?}");

    // Shut down: the last counters are flushed.
    clock.advance(Duration::from_secs(10));
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();

    let day = keystore::day_of(BASE_MS);
    let daily: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(keystore::daily_key(day, &ids[0]))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(daily["requests"], 5);
    assert_eq!(daily["tokens"], 5 * 42, "real usage, not the estimate");
    let ttl: i64 = redis::cmd("TTL")
        .arg(keystore::daily_key(day, &ids[0]))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((48 * 3600 - 60..=48 * 3600).contains(&ttl), "ttl {ttl}");
    let usage = KeyStore::read_usage(&mut c, "2024-05-01").await.unwrap();
    let row = usage.iter().find(|r| r.key == "groq#0").unwrap();
    assert_eq!(
        (
            row.provider.as_str(),
            row.model.as_str(),
            row.requests,
            row.tokens_in,
            row.tokens_out
        ),
        ("groq", "llama-3.1-8b-instant", 5, 150, 60)
    );
    assert!((row.cost_usd - 0.05).abs() < 1e-9);
    let ttl: i64 = redis::cmd("TTL")
        .arg(keystore::usage_key(day))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 39 * 24 * 3600, "ttl {ttl}");

    // No secret anywhere in Redis: not in a key name, not in a value.
    let everything = dump(&redis).await;
    assert!(everything.len() > 10, "{everything:?}");
    for text in everything.iter().chain(published.iter()) {
        for n in 0..4 {
            assert!(
                !text.contains(&secret(n)),
                "secret {n} found in redis: {text}"
            );
            assert!(!text.contains("FAKE_SECRET"), "{text}");
        }
    }

    // "Restart": a new pool and keystore, 10 s later, on the same Redis.
    drop((pool, store));
    let (pool, clock) = pool_at(BASE_MS + 10_000);
    let store = KeyStore::connect(&redis.url(), pool.clone()).await.unwrap();
    let report = store.load().await.unwrap();
    assert_eq!(report.keys, 4);
    assert_eq!(report.cooling, vec![ids[1].clone()]);
    assert_eq!(report.disabled, vec![ids[2].clone(), ids[3].clone()]);
    assert!((report.spend["groq"] - 0.05).abs() < 1e-9);
    assert!((pool.spend_today("groq") - 0.05).abs() < 1e-9);

    // The cooldown still runs to its end (120 s after it began).
    assert_eq!(
        pool.state(&ids[1]).unwrap(),
        KeyState::CoolingDown {
            until: Duration::from_secs(110)
        }
    );
    match pool.try_acquire(&pinned(&ids[1])) {
        Acquire::Wait { until, .. } => assert_eq!(until, Duration::from_secs(110)),
        other => panic!("{other:?}"),
    }
    // The invalid key is still disabled, its probe still scheduled.
    let s2 = pool.key_snapshot(&ids[2]).unwrap();
    assert_eq!(
        (s2.status, s2.reason.as_deref(), s2.next_probe_ms),
        (
            KeyStatus::Disabled,
            Some(AUTH_FAILED),
            Some(BASE_MS + 30 * 60 * 1000)
        )
    );
    let s3 = pool.key_snapshot(&ids[3]).unwrap();
    assert_eq!(
        (s3.status, s3.reason.as_deref(), s3.next_probe_ms),
        (KeyStatus::Disabled, Some("operator: leaked"), None)
    );
    // Daily counters: 5 of groq#0's 6 requests today are used.
    let s0 = pool.key_snapshot(&ids[0]).unwrap();
    assert_eq!((s0.day_requests, s0.day_tokens), (5, 210));
    assert_eq!((s0.stats.requests, s0.stats.successes), (5, 5));
    assert_eq!(s0.stats.last_used_ms, Some(BASE_MS));
    granted(pool.try_acquire(&pinned(&ids[0]))).report(Fate::Transient);
    match pool.try_acquire(&pinned(&ids[0])) {
        Acquire::Wait { until, .. } => {
            // Until the next UTC midnight (14 h after 10:00).
            assert_eq!(until, clock.now() + Duration::from_secs(14 * 3600 - 10));
        }
        other => panic!("the daily cap must hold across the restart: {other:?}"),
    }
    // Running again: a reset is written through at once ...
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = Arc::new(store).spawn(async move {
        let _ = stopped.await;
    });
    pool.reset(&ids[2]).unwrap();
    wait_until_async(Duration::from_secs(5), "groq#2 re-enabled in redis", || {
        let mut c = c.clone();
        let id = ids[2].clone();
        async move {
            KeyStore::read_state(&mut c, &id)
                .await
                .unwrap()
                .is_some_and(|s| s == llmq::pool::StateRecord::available())
        }
    })
    .await;
    // ... and the lifetime counters keep adding up after the restart.
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let h: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keystore::state_key(&ids[0]))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((h["requests"].as_str(), h["failures"].as_str()), ("6", "1"));
    assert_eq!(h["fail:transient"], "1");
}

#[tokio::test]
async fn a_failed_flush_is_retried_without_losing_counts() {
    let mut redis = RedisServer::start();
    let (pool, _clock) = pool_at(BASE_MS);
    let store = KeyStore::connect(&redis.url(), pool.clone()).await.unwrap();
    let id = KeyId::new("groq", 0);
    granted(pool.try_acquire(&pinned(&id))).report(Fate::Success {
        usage_in: 1,
        usage_out: 1,
        cost_usd: 0.0,
    });
    redis.kill();
    assert!(store.flush().await.is_err());
    redis.restart();
    granted(pool.try_acquire(&pinned(&id))).report(Fate::Success {
        usage_in: 1,
        usage_out: 1,
        cost_usd: 0.0,
    });
    // The manager reconnects; both calls land in one later flush.
    wait_until_async(
        Duration::from_secs(10),
        "a flush after redis is back",
        || async { store.flush().await.is_ok() },
    )
    .await;
    let mut c = conn(&redis).await;
    let n: i64 = redis::cmd("HGET")
        .arg(keystore::daily_key(keystore::day_of(BASE_MS), &id))
        .arg("requests")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
}

/// Issue 16: key state had two homes, `llmq:key:<id>` (the keystore) and
/// `llmq:{key:<id>}:state` (the cluster gate). On load, the legacy hash is
/// folded into the one state hash (its fields renamed, its counters added to
/// what the new hash already counts, the gate's fields left alone) and
/// deleted; the restored pool sees the legacy state.
#[tokio::test]
async fn load_folds_the_legacy_key_hash_into_the_state_hash_and_deletes_it() {
    let redis = RedisServer::start();
    let mut c = conn(&redis).await;
    let (g0, g1) = (KeyId::new("groq", 0), KeyId::new("groq", 1));
    let hset = |key: String, fields: &[(&str, String)]| {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key);
        for (f, v) in fields {
            cmd.arg(*f).arg(v);
        }
        cmd
    };
    let probe_at = BASE_MS + 3_600_000;
    // groq#0: an old daemon disabled it and counted 5 calls; a new one
    // already counted 2 more and the gate keeps its own fields there.
    let old0 = hset(
        keystore::legacy_state_key(&g0),
        &[
            ("status", "disabled".into()),
            ("reason", AUTH_FAILED.into()),
            ("since_ms", BASE_MS.to_string()),
            ("next_probe_ms", probe_at.to_string()),
            ("requests", "5".into()),
            ("failures", "1".into()),
            ("fail:auth_failed", "1".into()),
            ("cost_usd", "0.25".into()),
            ("last_used_ms", (BASE_MS - 10).to_string()),
        ],
    );
    let new0 = hset(
        keystore::state_key(&g0),
        &[
            ("requests", "2".into()),
            ("last_used_ms", (BASE_MS - 5).to_string()),
            ("proven", "1".into()),
            ("reason", "the gate's".into()),
        ],
    );
    // groq#1: the new hash already has a (newer) state: the legacy one is
    // dropped, its counters still count.
    let old1 = hset(
        keystore::legacy_state_key(&g1),
        &[
            ("status", "cooling".into()),
            ("until_ms", (BASE_MS + 60_000).to_string()),
            ("requests", "3".into()),
        ],
    );
    let new1 = hset(
        keystore::state_key(&g1),
        &[(keystore::STATUS, "available".into())],
    );
    for cmd in [old0, new0, old1, new1] {
        cmd.query_async::<()>(&mut c).await.unwrap();
    }

    let (pool, _clock) = pool_at(BASE_MS);
    let store = KeyStore::connect(&redis.url(), pool.clone()).await.unwrap();
    let report = store.load().await.unwrap();
    assert_eq!(report.disabled, vec![g0.clone()], "{report:?}");
    assert!(report.cooling.is_empty(), "{report:?}");
    assert!(matches!(pool.state(&g0), Ok(KeyState::Disabled { .. })));
    assert!(matches!(pool.state(&g1), Ok(KeyState::Available)));

    for id in [&g0, &g1] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(keystore::legacy_state_key(id))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(!exists, "the legacy hash of {id} is deleted");
    }
    let h0: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keystore::state_key(&g0))
        .query_async(&mut c)
        .await
        .unwrap();
    let f = |k: &str| h0.get(k).map(String::as_str);
    assert_eq!(f("pool_status"), Some("disabled"));
    assert_eq!(f("pool_reason"), Some(AUTH_FAILED));
    assert_eq!(f("pool_next_probe_ms"), Some(probe_at.to_string().as_str()));
    assert_eq!(f("requests"), Some("7"), "counters add up: {h0:?}");
    assert_eq!(f("fail:auth_failed"), Some("1"));
    assert_eq!(f("cost_usd"), Some("0.25"));
    assert_eq!(f("last_used_ms"), Some((BASE_MS - 5).to_string().as_str()));
    assert_eq!(f("proven"), Some("1"), "the gate's fields stay");
    assert_eq!(f("reason"), Some("the gate's"), "the gate's fields stay");
    let h1: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keystore::state_key(&g1))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(h1.get("pool_status").map(String::as_str), Some("available"));
    assert!(!h1.contains_key("pool_until_ms"), "{h1:?}");
    assert_eq!(h1.get("requests").map(String::as_str), Some("3"));
    // A second load has nothing left to fold: nothing is counted twice.
    assert_eq!(store.migrate(&[g0.clone(), g1.clone()]).await.unwrap(), 0);
    let again: String = redis::cmd("HGET")
        .arg(keystore::state_key(&g0))
        .arg("requests")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(again, "7");
}

/// A provider whose day starts at midnight in Los Angeles, with 4 calls a day.
fn pacific_pool(unix_ms: u64) -> (KeyPool, ManualClock) {
    let mut c = Config::default();
    c.providers.insert(
        "groq".into(),
        ProviderConfig {
            limits: Limits {
                rpd: Some(4),
                ..Limits::default()
            },
            daily_reset: "00:00 America/Los_Angeles".parse().unwrap(),
            ..ProviderConfig::default()
        },
    );
    let clock = ManualClock::new(unix_ms);
    let pool = KeyPool::new(&c, &ring(), Arc::new(clock.clone()) as Arc<dyn Clock>);
    (pool, clock)
}

#[tokio::test]
async fn daily_counters_and_spend_are_keyed_by_the_providers_day() {
    let redis = RedisServer::start();
    let mut c = conn(&redis).await;
    // 2024-05-01T03:00:00Z is 2024-04-30 20:00 in Los Angeles (PDT).
    let t0 = BASE_MS - 7 * 3600 * 1000;
    let id = KeyId::new("groq", 0);
    let (pool, _clock) = pacific_pool(t0);
    let store = KeyStore::connect(&redis.url(), pool.clone()).await.unwrap();
    for _ in 0..3 {
        granted(pool.try_acquire(&pinned(&id))).report(Fate::Success {
            usage_in: 5,
            usage_out: 5,
            cost_usd: 0.02,
        });
    }
    store.flush().await.unwrap();
    let pacific_day: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg("llmq:daily:2024-04-30:groq#0")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pacific_day["requests"], 3, "the provider's date, not UTC's");
    let utc_day: i64 = redis::cmd("EXISTS")
        .arg("llmq:daily:2024-05-01:groq#0")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(utc_day, 0);
    let spend: f64 = redis::cmd("HGET")
        .arg("llmq:spend:2024-04-30")
        .arg("groq")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((spend - 0.06).abs() < 1e-9);
    // Usage reports stay in UTC days.
    let usage = KeyStore::read_usage(&mut c, "2024-05-01").await.unwrap();
    assert_eq!(usage.iter().map(|r| r.requests).sum::<u64>(), 3);

    // A restart 3 h later (past UTC midnight's date change, 23:00 PDT):
    // still the same provider day, so the counts and the spend come back.
    drop((pool, store));
    let (pool, clock) = pacific_pool(t0 + 3 * 3600 * 1000);
    let store = KeyStore::connect(&redis.url(), pool.clone()).await.unwrap();
    let report = store.load().await.unwrap();
    assert!((report.spend["groq"] - 0.06).abs() < 1e-9);
    assert!((pool.spend_today("groq") - 0.06).abs() < 1e-9);
    assert_eq!(pool.key_snapshot(&id).unwrap().day_requests, 3);
    granted(pool.try_acquire(&pinned(&id))).report(Fate::Transient);
    match pool.try_acquire(&pinned(&id)) {
        // The cap of 4 is reached until Pacific midnight, an hour away.
        Acquire::Wait { until, .. } => {
            assert_eq!(until, clock.now() + Duration::from_secs(3600))
        }
        other => panic!("the daily cap must hold: {other:?}"),
    }
    clock.advance(Duration::from_secs(3600));
    assert_eq!(pool.key_snapshot(&id).unwrap().day_requests, 0);
    assert_eq!(pool.spend_today("groq"), 0.0);
    granted(pool.try_acquire(&pinned(&id))).report(Fate::Transient);
    store.flush().await.unwrap();
    let next: i64 = redis::cmd("HGET")
        .arg("llmq:daily:2024-05-01:groq#0")
        .arg("requests")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(next, 1);

    // A restart after Pacific midnight starts the day from zero.
    drop((pool, store));
    let (pool, _clock) = pacific_pool(t0 + 5 * 3600 * 1000);
    let store = KeyStore::connect(&redis.url(), pool.clone()).await.unwrap();
    let report = store.load().await.unwrap();
    assert!(!report.spend.contains_key("groq"), "{:?}", report.spend);
    assert_eq!(pool.key_snapshot(&id).unwrap().day_requests, 1);
}
