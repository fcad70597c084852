//! The key pool through its public API, with a manual clock: strategies,
//! pinning, model restrictions, cooldowns, disabling and probes, waking
//! waiters, and the 4 × 30 RPM + 1 invalid key scenario.

use llmq::clock::{Clock, ManualClock};
use llmq::config::{Config, Limits, ProviderConfig};
use llmq::job::Strategy;
use llmq::keys::{ApiKey, KeyId, KeyRing};
use llmq::pool::{
    Acquire, AcquireRequest, Fate, KeyPool, KeyState, KeyStatus, Permit, AUTH_FAILED,
    QUOTA_EXHAUSTED,
};
use llmq_sdk::QuotaReset;
use secrecy::SecretString;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const BASE_MS: u64 = 1_714_521_600_000;

fn secret(provider: &str, n: u32) -> String {
    format!("sk-test-{provider}-{n}-SECRETVALUE")
}

fn key(provider: &str, n: u32) -> ApiKey {
    ApiKey::new(
        KeyId::new(provider, n),
        Some(SecretString::from(secret(provider, n))),
        format!("test {provider}#{n}"),
    )
}

fn provider(limits: Limits) -> ProviderConfig {
    ProviderConfig {
        limits,
        ..ProviderConfig::default()
    }
}

struct Fixture {
    pool: KeyPool,
    clock: ManualClock,
}

fn fixture(pc: ProviderConfig, keys: Vec<ApiKey>) -> Fixture {
    let mut config = Config::default();
    config.providers.insert("groq".into(), pc);
    let clock = ManualClock::new(BASE_MS);
    let pool = KeyPool::new(
        &config,
        &KeyRing::from_keys(keys),
        Arc::new(clock.clone()) as Arc<dyn Clock>,
    );
    Fixture { pool, clock }
}

fn keys(n: u32) -> Vec<ApiKey> {
    (0..n).map(|i| key("groq", i)).collect()
}

fn req(model: &str) -> AcquireRequest<'_> {
    AcquireRequest {
        provider: "groq",
        model,
        tokens: 100,
        strategy: None,
        pinned: None,
        instance: None,
    }
}

fn granted(a: Acquire) -> Permit {
    match a {
        Acquire::Granted(p) => p,
        other => panic!("expected a permit, got {other:?}"),
    }
}

fn wait_until(a: Acquire) -> Duration {
    match a {
        Acquire::Wait { until, .. } => until,
        other => panic!("expected to wait, got {other:?}"),
    }
}

fn never(a: Acquire) -> String {
    match a {
        Acquire::Never(why) => why,
        other => panic!("expected never, got {other:?}"),
    }
}

fn ok() -> Fate {
    Fate::Success {
        usage_in: 10,
        usage_out: 20,
        cost_usd: 0.0,
    }
}

/// Gives every key its first success, which ends its one-call-at-a-time
/// probation (a key whose fate is unknown never takes a burst).
fn prove(f: &Fixture, n: u32) {
    for i in 0..n {
        let id = KeyId::new("groq", i);
        let p = granted(f.pool.try_acquire(&AcquireRequest {
            tokens: 0,
            pinned: Some(&id),
            ..req("m")
        }));
        p.report(Fate::Success {
            usage_in: 0,
            usage_out: 0,
            cost_usd: 0.0,
        });
    }
}

fn inst(p: &Permit) -> u32 {
    p.key_id().instance()
}

#[test]
fn round_robin_takes_the_least_recently_used_key() {
    let f = fixture(provider(Limits::default()), keys(3));
    let order: Vec<u32> = (0..7)
        .map(|_| {
            let p = granted(f.pool.try_acquire(&req("m")));
            let i = inst(&p);
            p.report(ok());
            i
        })
        .collect();
    assert_eq!(order, vec![0, 1, 2, 0, 1, 2, 0]);
}

#[test]
fn least_loaded_takes_the_key_with_fewest_calls_in_flight() {
    let f = fixture(
        ProviderConfig {
            strategy: Strategy::LeastLoaded,
            ..provider(Limits::default())
        },
        keys(3),
    );
    prove(&f, 3);
    let a = granted(f.pool.try_acquire(&req("m")));
    let b = granted(f.pool.try_acquire(&req("m")));
    let c = granted(f.pool.try_acquire(&req("m")));
    assert_eq!((inst(&a), inst(&b), inst(&c)), (0, 1, 2));
    // Two more on keys 0 and 1: loads 2, 2, 1.
    let d = granted(f.pool.try_acquire(&req("m")));
    let e = granted(f.pool.try_acquire(&req("m")));
    assert_eq!((inst(&d), inst(&e)), (0, 1));
    let g = granted(f.pool.try_acquire(&req("m")));
    assert_eq!(inst(&g), 2, "key 2 has the fewest in flight");
    drop(a);
    drop(d);
    // Key 0 now has none in flight.
    let h = granted(f.pool.try_acquire(&req("m")));
    assert_eq!(inst(&h), 0);
    // The job can override the provider's strategy.
    let r = AcquireRequest {
        strategy: Some(Strategy::RoundRobin),
        ..req("m")
    };
    drop((b, c, e, g, h));
    let i = granted(f.pool.try_acquire(&r));
    assert_eq!(inst(&i), 1, "least recently used");
}

fn histogram(f: &Fixture, r: &AcquireRequest<'_>, n: usize) -> HashMap<u32, usize> {
    let mut h = HashMap::new();
    for _ in 0..n {
        let p = granted(f.pool.try_acquire(r));
        *h.entry(inst(&p)).or_default() += 1;
    }
    h
}

#[test]
fn random_spreads_evenly_over_the_keys_that_can_serve() {
    let f = fixture(
        ProviderConfig {
            strategy: Strategy::Random,
            ..provider(Limits::default())
        },
        keys(3),
    );
    let h = histogram(&f, &req("m"), 3000);
    for i in 0..3 {
        let n = h.get(&i).copied().unwrap_or(0);
        assert!((800..1200).contains(&n), "key {i} chosen {n} times: {h:?}");
    }
    // A key that cannot serve is never drawn.
    f.pool.disable(&KeyId::new("groq", 1), "operator").unwrap();
    let h = histogram(&f, &req("m"), 600);
    assert_eq!(h.get(&1), None, "{h:?}");
    assert_eq!(h.values().sum::<usize>(), 600);
}

#[test]
fn weighted_draws_in_proportion_to_weight() {
    let mut ks = keys(2);
    ks[1].weight = 3;
    let f = fixture(
        ProviderConfig {
            strategy: Strategy::Weighted,
            ..provider(Limits::default())
        },
        ks,
    );
    let h = histogram(&f, &req("m"), 4000);
    let (a, b) = (h[&0] as f64, h[&1] as f64);
    assert!((2.5..3.5).contains(&(b / a)), "ratio {}: {h:?}", b / a);
}

#[test]
fn a_pinned_key_or_instance_is_the_only_choice() {
    let mut ks = keys(3);
    ks[2].models = vec!["only-this".into()];
    let f = fixture(provider(Limits::default()), ks);
    let id2 = KeyId::new("groq", 2);
    let pinned = AcquireRequest {
        pinned: Some(&id2),
        ..req("only-this")
    };
    for _ in 0..3 {
        assert_eq!(inst(&granted(f.pool.try_acquire(&pinned))), 2);
    }
    let by_instance = AcquireRequest {
        instance: Some(1),
        ..req("m")
    };
    for _ in 0..3 {
        assert_eq!(inst(&granted(f.pool.try_acquire(&by_instance))), 1);
    }
    let unknown = KeyId::new("groq", 9);
    let why = never(f.pool.try_acquire(&AcquireRequest {
        pinned: Some(&unknown),
        ..req("m")
    }));
    assert!(why.contains("groq#9") && why.contains("unknown"), "{why}");
    let why = never(f.pool.try_acquire(&AcquireRequest {
        pinned: Some(&id2),
        ..req("m")
    }));
    assert!(why.contains("does not serve model m"), "{why}");
    // A pinned key that cools down makes the job wait for it, not move.
    let p = granted(f.pool.try_acquire(&by_instance));
    p.report(Fate::RateLimited {
        retry_after: Some(Duration::from_secs(7)),
    });
    assert_eq!(
        wait_until(f.pool.try_acquire(&by_instance)),
        Duration::from_secs(7)
    );
    f.pool.disable(&KeyId::new("groq", 1), "operator").unwrap();
    let why = never(f.pool.try_acquire(&by_instance));
    assert!(
        why.contains("disabled") && why.contains("operator"),
        "{why}"
    );
}

#[test]
fn only_keys_allowed_the_model_serve_it() {
    let mut ks = keys(3);
    ks[0].models = vec!["a".into()];
    ks[1].models = vec!["b".into(), "a".into()];
    let f = fixture(provider(Limits::default()), ks);
    let seen = |model: &str| {
        let mut s: Vec<u32> = (0..6)
            .map(|_| inst(&granted(f.pool.try_acquire(&req(model)))))
            .collect();
        s.sort();
        s.dedup();
        s
    };
    assert_eq!(seen("a"), vec![0, 1, 2]);
    assert_eq!(seen("b"), vec![1, 2]);
    assert_eq!(seen("c"), vec![2]);
    f.pool.disable(&KeyId::new("groq", 2), "operator").unwrap();
    let why = never(f.pool.try_acquire(&req("c")));
    assert!(why.contains("disabled"), "{why}");
    let f = fixture(provider(Limits::default()), {
        let mut ks = keys(1);
        ks[0].models = vec!["a".into()];
        ks
    });
    let why = never(f.pool.try_acquire(&req("z")));
    assert!(why.contains("serves model z"), "{why}");
    let why = never(f.pool.try_acquire(&AcquireRequest {
        provider: "nope",
        ..req("a")
    }));
    assert!(why.contains("nope"), "{why}");
}

#[test]
fn a_429_cools_the_key_for_the_hint_else_the_cooldown_else_60s() {
    // Hint.
    let f = fixture(provider(Limits::default()), keys(2));
    let p = granted(f.pool.try_acquire(&req("m")));
    assert_eq!(inst(&p), 0);
    p.report(Fate::RateLimited {
        retry_after: Some(Duration::from_secs(5)),
    });
    assert_eq!(
        f.pool.state(&KeyId::new("groq", 0)).unwrap(),
        KeyState::CoolingDown {
            until: Duration::from_secs(5)
        }
    );
    // The job moves to the next key at once.
    for _ in 0..3 {
        let p = granted(f.pool.try_acquire(&req("m")));
        assert_eq!(inst(&p), 1);
    }
    f.clock.advance(Duration::from_secs(5));
    let seen: Vec<u32> = (0..2)
        .map(|_| inst(&granted(f.pool.try_acquire(&req("m")))))
        .collect();
    assert!(seen.contains(&0), "cooled-down key is back: {seen:?}");

    // No hint, no provider cooldown: keys.default_cooldown (60 s).
    let f = fixture(provider(Limits::default()), keys(1));
    granted(f.pool.try_acquire(&req("m"))).report(Fate::RateLimited { retry_after: None });
    assert_eq!(
        wait_until(f.pool.try_acquire(&req("m"))),
        Duration::from_secs(60)
    );
    f.clock.advance(Duration::from_secs(59));
    assert!(matches!(
        f.pool.try_acquire(&req("m")),
        Acquire::Wait { .. }
    ));
    f.clock.advance(Duration::from_secs(1));
    granted(f.pool.try_acquire(&req("m")));

    // The provider's cooldown.
    let f = fixture(
        ProviderConfig {
            cooldown: Some(Duration::from_secs(10)),
            ..provider(Limits::default())
        },
        keys(1),
    );
    granted(f.pool.try_acquire(&req("m"))).report(Fate::RateLimited { retry_after: None });
    assert_eq!(
        wait_until(f.pool.try_acquire(&req("m"))),
        Duration::from_secs(10)
    );
}

#[test]
fn a_bad_key_is_disabled_after_one_failure_and_probed_one_job_at_a_time() {
    let f = fixture(provider(Limits::default()), keys(2));
    let bad = KeyId::new("groq", 0);
    let p = granted(f.pool.try_acquire(&req("m")));
    assert_eq!(p.key_id(), &bad);
    p.report(Fate::Disabled {
        reason: AUTH_FAILED.into(),
    });
    let snap = f.pool.key_snapshot(&bad).unwrap();
    assert_eq!(snap.status, KeyStatus::Disabled);
    assert_eq!(snap.reason.as_deref(), Some(AUTH_FAILED));
    assert_eq!(snap.next_probe_ms, Some(BASE_MS + 30 * 60 * 1000));
    for _ in 0..50 {
        assert_eq!(inst(&granted(f.pool.try_acquire(&req("m")))), 1);
    }
    // At the probe time, exactly one job goes to the bad key.
    f.clock.advance(Duration::from_secs(30 * 60));
    let probe = granted(f.pool.try_acquire(&req("m")));
    assert_eq!(probe.key_id(), &bad);
    assert!(probe.is_probe());
    for _ in 0..20 {
        assert_eq!(inst(&granted(f.pool.try_acquire(&req("m")))), 1);
    }
    // The probe fails: disabled again, next probe pushed.
    probe.report(Fate::Disabled {
        reason: AUTH_FAILED.into(),
    });
    let snap = f.pool.key_snapshot(&bad).unwrap();
    assert_eq!(snap.next_probe_ms, Some(BASE_MS + 60 * 60 * 1000));
    for _ in 0..20 {
        assert_eq!(inst(&granted(f.pool.try_acquire(&req("m")))), 1);
    }
    // Next probe succeeds: the key is back in rotation.
    f.clock.advance(Duration::from_secs(30 * 60));
    let probe = granted(f.pool.try_acquire(&req("m")));
    assert!(probe.is_probe() && probe.key_id() == &bad);
    probe.report(ok());
    assert_eq!(f.pool.state(&bad).unwrap(), KeyState::Available);
    let seen: Vec<u32> = (0..4)
        .map(|_| inst(&granted(f.pool.try_acquire(&req("m")))))
        .collect();
    assert!(seen.contains(&0), "{seen:?}");
}

#[test]
fn all_keys_disabled_is_never_and_reset_re_enables() {
    let f = fixture(provider(Limits::default()), keys(2));
    for reason in [QUOTA_EXHAUSTED, AUTH_FAILED] {
        granted(f.pool.try_acquire(&req("m"))).report(Fate::Disabled {
            reason: reason.into(),
        });
    }
    let why = never(f.pool.try_acquire(&req("m")));
    assert!(
        why.contains("disabled") && why.contains(QUOTA_EXHAUSTED) && why.contains(AUTH_FAILED),
        "{why}"
    );
    f.pool.reset(&KeyId::new("groq", 1)).unwrap();
    assert_eq!(inst(&granted(f.pool.try_acquire(&req("m")))), 1);
    assert!(f.pool.reset(&KeyId::new("groq", 7)).is_err());
}

#[test]
fn transient_and_untouched_failures_leave_the_key_usable() {
    let f = fixture(provider(Limits::default()), keys(1));
    granted(f.pool.try_acquire(&req("m"))).report(Fate::Transient);
    granted(f.pool.try_acquire(&req("m"))).report(Fate::Untouched);
    drop(granted(f.pool.try_acquire(&req("m"))));
    let snap = f.pool.key_snapshot(&KeyId::new("groq", 0)).unwrap();
    assert_eq!(snap.status, KeyStatus::Available);
    assert_eq!(snap.stats.failures, 3);
    assert_eq!(snap.stats.failures_by_kind["transient"], 1);
    assert_eq!(snap.stats.failures_by_kind["untouched"], 1);
    assert_eq!(snap.stats.failures_by_kind["dropped"], 1);
    assert_eq!(snap.stats.requests, 3);
}

#[test]
fn a_full_window_means_wait_until_the_oldest_call_leaves_it() {
    let f = fixture(
        provider(Limits {
            rpm: Some(2),
            ..Limits::default()
        }),
        keys(1),
    );
    granted(f.pool.try_acquire(&req("m"))).report(ok());
    f.clock.advance(Duration::from_secs(10));
    granted(f.pool.try_acquire(&req("m"))).report(ok());
    assert_eq!(
        wait_until(f.pool.try_acquire(&req("m"))),
        Duration::from_secs(60)
    );
    f.clock.advance(Duration::from_secs(50));
    granted(f.pool.try_acquire(&req("m")));
}

#[test]
fn a_call_bigger_than_every_key_allows_is_never() {
    let f = fixture(
        provider(Limits {
            tpm: Some(1000),
            ..Limits::default()
        }),
        keys(2),
    );
    let why = never(f.pool.try_acquire(&AcquireRequest {
        tokens: 5000,
        ..req("m")
    }));
    assert!(why.contains("5000"), "{why}");
    // A smaller call still passes; a too-big one for key 0 only moves on.
    let mut ks = keys(2);
    ks[1].limits.tpm = Some(10_000);
    let f = fixture(
        provider(Limits {
            tpm: Some(1000),
            ..Limits::default()
        }),
        ks,
    );
    let p = granted(f.pool.try_acquire(&AcquireRequest {
        tokens: 5000,
        ..req("m")
    }));
    assert_eq!(inst(&p), 1);
}

#[test]
fn tokens_are_charged_per_key_and_the_window_refills() {
    let f = fixture(
        provider(Limits {
            tpm: Some(1000),
            ..Limits::default()
        }),
        keys(2),
    );
    prove(&f, 2);
    let big = AcquireRequest {
        tokens: 600,
        ..req("m")
    };
    let a = granted(f.pool.try_acquire(&big));
    let b = granted(f.pool.try_acquire(&big));
    assert_ne!(inst(&a), inst(&b));
    // 400 left on each: a 600-token call waits, a 300-token one passes.
    assert!(matches!(f.pool.try_acquire(&big), Acquire::Wait { .. }));
    granted(f.pool.try_acquire(&AcquireRequest {
        tokens: 300,
        ..req("m")
    }));
    a.report(ok());
    b.report(ok());
    let until = wait_until(f.pool.try_acquire(&big));
    assert_eq!(until, Duration::from_secs(60));
    f.clock.set(until);
    granted(f.pool.try_acquire(&big));
}

#[test]
fn a_call_not_sent_gives_its_capacity_back() {
    let f = fixture(
        provider(Limits {
            rpm: Some(1),
            ..Limits::default()
        }),
        keys(1),
    );
    granted(f.pool.try_acquire(&req("m"))).report(Fate::NotSent);
    granted(f.pool.try_acquire(&req("m"))).report(ok());
    assert!(matches!(
        f.pool.try_acquire(&req("m")),
        Acquire::Wait { .. }
    ));
    let snap = f.pool.key_snapshot(&KeyId::new("groq", 0)).unwrap();
    assert_eq!((snap.stats.requests, snap.day_requests), (1, 1));
}

#[test]
fn upstream_headers_saying_nothing_remains_park_the_key() {
    let f = fixture(provider(Limits::default()), keys(2));
    let p = granted(f.pool.try_acquire(&req("m")));
    let id = p.key_id().clone();
    f.pool.observe(
        &id,
        &llmq_sdk::ObservedLimits {
            requests_remaining: Some(0),
            requests_reset_ms: Some(3_000),
            ..Default::default()
        },
    );
    p.report(ok());
    for _ in 0..5 {
        assert_ne!(granted(f.pool.try_acquire(&req("m"))).key_id(), &id);
    }
    f.clock.advance(Duration::from_secs(3));
    let seen: Vec<KeyId> = (0..2)
        .map(|_| granted(f.pool.try_acquire(&req("m"))).key_id().clone())
        .collect();
    assert!(seen.contains(&id));
}

#[test]
fn snapshots_and_debug_output_never_show_a_secret() {
    let f = fixture(
        provider(Limits {
            rpm: Some(10),
            tpm: Some(10_000),
            ..Limits::default()
        }),
        keys(2),
    );
    let p = granted(f.pool.try_acquire(&req("m")));
    assert_eq!(p.secret(), Some(secret("groq", 0).as_str()));
    let debug = format!("{p:?} {:?}", f.pool);
    let snap = f.pool.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    for n in 0..2 {
        assert!(!json.contains(&secret("groq", n)), "{json}");
        assert!(!debug.contains(&secret("groq", n)), "{debug}");
    }
    assert!(json.contains(p.masked()));
    assert_eq!(snap.len(), 2);
    assert_eq!(snap[0].in_flight, 1);
    assert_eq!(snap[0].window_requests, 1);
    assert_eq!(snap[0].window_tokens, 100);
    assert_eq!(snap[0].limits.rpm, Some(10));
    f.clock.advance(Duration::from_secs(2));
    p.report(Fate::Success {
        usage_in: 7,
        usage_out: 9,
        cost_usd: 0.25,
    });
    let s = f.pool.key_snapshot(&KeyId::new("groq", 0)).unwrap();
    assert_eq!((s.stats.tokens_in, s.stats.tokens_out), (7, 9));
    // Last use is the call's start.
    assert_eq!(s.stats.last_used_ms, Some(BASE_MS));
    assert_eq!((s.in_flight, s.day_tokens), (0, 16));
    assert_eq!(f.pool.spend_today("groq"), 0.25);
}

#[test]
fn reload_keeps_the_state_of_keys_that_stay() {
    let f = fixture(provider(Limits::default()), keys(2));
    f.pool.disable(&KeyId::new("groq", 0), "operator").unwrap();
    let mut config = Config::default();
    config
        .providers
        .insert("groq".into(), provider(Limits::default()));
    let ring = KeyRing::from_keys(vec![key("groq", 0), key("groq", 2)]);
    f.pool.reload(&config, &ring);
    assert!(matches!(
        f.pool.state(&KeyId::new("groq", 0)).unwrap(),
        KeyState::Disabled { .. }
    ));
    assert!(f.pool.state(&KeyId::new("groq", 1)).is_err());
    let ids: Vec<String> = f.pool.key_ids().iter().map(|k| k.to_string()).collect();
    assert_eq!(ids, vec!["groq#0", "groq#2"]);
    for _ in 0..3 {
        assert_eq!(inst(&granted(f.pool.try_acquire(&req("m")))), 2);
    }
}

#[test]
fn deltas_are_taken_once() {
    let f = fixture(provider(Limits::default()), keys(1));
    granted(f.pool.try_acquire(&req("m"))).report(Fate::Success {
        usage_in: 3,
        usage_out: 4,
        cost_usd: 0.5,
    });
    granted(f.pool.try_acquire(&req("m2"))).report(Fate::RateLimited { retry_after: None });
    let d = f.pool.take_deltas();
    assert_eq!(d.keys.len(), 1);
    let k = &d.keys[0];
    assert_eq!(k.stats.requests, 2);
    assert_eq!(k.stats.rate_limited, 1);
    assert_eq!(k.usage.len(), 2);
    assert_eq!(&*k.usage[0].model, "m");
    assert_eq!((k.usage[0].requests, k.usage[0].tokens_out), (1, 4));
    // Daily tokens: 100 + 100 charged, the first corrected to 7.
    let tokens: i64 = k.daily.iter().map(|d| d.tokens).sum();
    assert_eq!(tokens, 107);
    assert_eq!(d.spend.len(), 1);
    assert!(f.pool.take_deltas().is_empty());
}

#[tokio::test]
async fn a_waiter_is_woken_when_a_permit_is_released() {
    let f = fixture(
        ProviderConfig {
            max_concurrent: Some(1),
            ..provider(Limits::default())
        },
        keys(1),
    );
    let held = granted(f.pool.try_acquire(&req("m")));
    let epoch = match f.pool.try_acquire(&req("m")) {
        Acquire::Wait { epoch, .. } => epoch,
        other => panic!("{other:?}"),
    };
    let pool = f.pool.clone();
    let waiter = tokio::spawn(async move {
        pool.changed_since(epoch).await;
        match pool.try_acquire(&req("m")) {
            Acquire::Granted(p) => p.key_id().clone(),
            other => panic!("woken but {other:?}"),
        }
    });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    drop(held);
    let id = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was not woken by the release")
        .unwrap();
    assert_eq!(id, KeyId::new("groq", 0));
    // A change that happened before the wait is not missed.
    let epoch = f.pool.epoch();
    f.pool.reset(&KeyId::new("groq", 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(1), f.pool.changed_since(epoch))
        .await
        .expect("an earlier change resolves at once");
}

/// The scenario: 4 keys × 30 RPM + 1 invalid key, 200 calls. All
/// succeed, none is over any key's limit, the invalid key is called once,
/// and the last call goes out at the physical minimum, 60 s.
#[test]
fn four_keys_at_30_rpm_and_one_invalid_key_serve_200_calls_in_60_s() {
    let f = fixture(
        provider(Limits {
            rpm: Some(30),
            ..Limits::default()
        }),
        keys(5),
    );
    let bad = KeyId::new("groq", 4);
    let mut done = 0;
    let mut calls: HashMap<u32, Vec<Duration>> = HashMap::new();
    while done < 200 {
        match f.pool.try_acquire(&req("m")) {
            Acquire::Granted(p) => {
                calls.entry(inst(&p)).or_default().push(f.clock.now());
                if p.key_id() == &bad {
                    p.report(Fate::Disabled {
                        reason: AUTH_FAILED.into(),
                    });
                } else {
                    p.report(ok());
                    done += 1;
                }
            }
            Acquire::Wait { until, .. } => f.clock.set(until),
            Acquire::Never(why) => panic!("{why}"),
        }
    }
    assert_eq!(calls[&4].len(), 1, "the invalid key is called exactly once");
    for (k, times) in &calls {
        for w in times.windows(31) {
            assert!(
                w[30] - w[0] >= Duration::from_secs(60),
                "key {k}: 31 calls in {:?}",
                w[30] - w[0]
            );
        }
    }
    assert_eq!(f.clock.now(), Duration::from_secs(60));
}

#[test]
fn a_late_failure_does_not_undo_an_operators_disable() {
    let f = fixture(provider(Limits::default()), keys(1));
    let id = KeyId::new("groq", 0);
    prove(&f, 1);
    let b = granted(f.pool.try_acquire(&req("m")));
    let c = granted(f.pool.try_acquire(&req("m")));
    f.pool.disable(&id, "operator").unwrap();
    b.report(Fate::RateLimited {
        retry_after: Some(Duration::from_secs(1)),
    });
    c.report(Fate::Disabled {
        reason: AUTH_FAILED.into(),
    });
    match f.pool.state(&id).unwrap() {
        KeyState::Disabled {
            reason, next_probe, ..
        } => assert_eq!((reason.as_str(), next_probe), ("operator", None)),
        other => panic!("{other:?}"),
    }
    // Still disabled long after any probe would have run.
    f.clock.advance(Duration::from_secs(24 * 3600));
    assert!(matches!(f.pool.try_acquire(&req("m")), Acquire::Never(_)));
}

#[test]
fn a_late_restore_does_not_override_a_fresher_state() {
    use llmq::pool::{Restored, StateRecord};
    let f = fixture(provider(Limits::default()), keys(2));
    let (a, b) = (KeyId::new("groq", 0), KeyId::new("groq", 1));
    f.pool.disable(&a, "operator").unwrap();
    let stored = || Restored {
        state: Some(StateRecord {
            status: KeyStatus::Cooling,
            until_ms: Some(BASE_MS + 5_000),
            ..StateRecord::available()
        }),
        stats: None,
        daily: Some((3, 300)),
    };
    f.pool.restore(&a, stored()).unwrap();
    f.pool.restore(&b, stored()).unwrap();
    assert!(matches!(
        f.pool.state(&a).unwrap(),
        KeyState::Disabled { .. }
    ));
    assert_eq!(
        f.pool.state(&b).unwrap(),
        KeyState::CoolingDown {
            until: Duration::from_secs(5)
        }
    );
    assert_eq!(f.pool.key_snapshot(&a).unwrap().day_requests, 3);
}

// ----- quota scope and reset (issue 11) ---------------------------------------

const HOUR: Duration = Duration::from_secs(3600);

/// The Unix ms of the clock's "now".
fn unix_now(f: &Fixture) -> u64 {
    f.clock.unix_ms()
}

fn model_quota(model: &str, reset: Option<QuotaReset>) -> Fate {
    Fate::ModelQuota {
        model: model.into(),
        reason: "quota_exhausted: GenerateRequestsPerDayPerProjectPerModel-FreeTier".into(),
        reset,
    }
}

#[test]
fn a_per_day_quota_of_one_model_parks_only_that_model_on_that_key_until_the_next_pacific_midnight()
{
    // Gemini's per-day quotas reset at midnight Pacific.
    let f = fixture(
        ProviderConfig {
            daily_reset: "00:00 America/Los_Angeles".parse().unwrap(),
            ..provider(Limits::default())
        },
        keys(2),
    );
    prove(&f, 2);
    // 10:00 UTC on 2024-05-01 is 03:00 PDT: the next Pacific midnight is
    // 2024-05-02 07:00 UTC, 21 h away (UTC midnight would be 14 h away).
    f.clock.advance(10 * HOUR);
    let reset_ms = BASE_MS + 31 * 3_600_000;
    let k0 = KeyId::new("groq", 0);
    let k1 = KeyId::new("groq", 1);
    let a = || AcquireRequest {
        pinned: None,
        ..req("gemini-2.0-flash")
    };
    // Key 0 answers a call for model A with a per-day quota of that model
    // (Gemini names it with a `models/` prefix).
    let p = granted(f.pool.try_acquire(&AcquireRequest {
        pinned: Some(&k0),
        ..a()
    }));
    p.report(model_quota(
        "models/gemini-2.0-flash",
        Some(QuotaReset::NextDaily),
    ));
    // The key itself is fine: available, and it serves model B at once.
    assert_eq!(f.pool.state(&k0).unwrap(), KeyState::Available);
    let b = granted(f.pool.try_acquire(&AcquireRequest {
        pinned: Some(&k0),
        ..req("gemini-2.0-flash-lite")
    }));
    b.report(ok());
    // Model A never goes to key 0 while the other key can take it.
    for _ in 0..10 {
        let p = granted(f.pool.try_acquire(&a()));
        assert_eq!(p.key_id(), &k1);
        p.report(ok());
    }
    // Model B still uses both keys.
    let seen: Vec<u32> = (0..4)
        .map(|_| {
            let p = granted(f.pool.try_acquire(&req("gemini-2.0-flash-lite")));
            let i = inst(&p);
            p.report(ok());
            i
        })
        .collect();
    assert!(seen.contains(&0) && seen.contains(&1), "{seen:?}");
    // The park is visible in the key's snapshot.
    let snap = f.pool.key_snapshot(&k0).unwrap();
    assert_eq!(snap.status, KeyStatus::Available);
    assert_eq!(snap.parked_models.len(), 1, "{:?}", snap.parked_models);
    assert_eq!(snap.parked_models[0].model, "gemini-2.0-flash");
    assert_eq!(snap.parked_models[0].until_ms, reset_ms);
    assert!(snap.parked_models[0].reason.contains("PerDay"));
    // Pinned to key 0, model A waits for the reset.
    assert_eq!(
        wait_until(f.pool.try_acquire(&AcquireRequest {
            pinned: Some(&k0),
            ..a()
        })),
        f.clock.now() + 21 * HOUR
    );
    // Key 1 runs out for model A too: A waits for the reset (like a cooling
    // key), it is not refused for ever.
    let p = granted(f.pool.try_acquire(&a()));
    assert_eq!(p.key_id(), &k1);
    p.report(model_quota("gemini-2.0-flash", Some(QuotaReset::NextDaily)));
    let until = wait_until(f.pool.try_acquire(&a()));
    assert_eq!(until, f.clock.now() + 21 * HOUR);
    let why = f.pool.model_parks("groq", "gemini-2.0-flash");
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(
        why[0].starts_with(
            "quota for model gemini-2.0-flash on key groq#0 exhausted until 2024-05-02T07:00:00Z"
        ),
        "{why:?}"
    );
    // One millisecond before the reset, still parked; at the reset, served.
    f.clock.set(until - Duration::from_millis(1));
    assert!(matches!(f.pool.try_acquire(&a()), Acquire::Wait { .. }));
    f.clock.set(until);
    let p = granted(f.pool.try_acquire(&a()));
    p.report(ok());
    assert!(f.pool.key_snapshot(&k0).unwrap().parked_models.is_empty());
    assert!(f.pool.model_parks("groq", "gemini-2.0-flash").is_empty());
}

#[test]
fn a_key_scoped_quota_with_a_reset_time_is_disabled_until_exactly_then() {
    let f = fixture(provider(Limits::default()), keys(1));
    prove(&f, 1);
    let k0 = KeyId::new("groq", 0);
    // The provider says the quota comes back in 5 minutes (not the 30-minute
    // re-probe interval).
    let at = unix_now(&f) + 5 * 60_000;
    granted(f.pool.try_acquire(&req("m"))).report(Fate::QuotaExhausted {
        reason: QUOTA_EXHAUSTED.into(),
        reset: Some(QuotaReset::At { unix_ms: at }),
    });
    let snap = f.pool.key_snapshot(&k0).unwrap();
    assert_eq!(snap.status, KeyStatus::Disabled);
    assert_eq!(snap.next_probe_ms, Some(at));
    never(f.pool.try_acquire(&req("m")));
    f.clock
        .advance(Duration::from_secs(5 * 60) - Duration::from_millis(1));
    never(f.pool.try_acquire(&req("m")));
    f.clock.advance(Duration::from_millis(1));
    let probe = granted(f.pool.try_acquire(&req("m")));
    assert!(probe.is_probe());
    probe.report(ok());
    assert_eq!(f.pool.state(&k0).unwrap(), KeyState::Available);

    // A per-day quota of the whole key: re-probed at the next daily reset.
    f.clock.advance(HOUR);
    granted(f.pool.try_acquire(&req("m"))).report(Fate::QuotaExhausted {
        reason: QUOTA_EXHAUSTED.into(),
        reset: Some(QuotaReset::NextDaily),
    });
    let snap = f.pool.key_snapshot(&k0).unwrap();
    assert_eq!(snap.next_probe_ms, Some(BASE_MS + 24 * 3_600_000));
    // Without a reset time: the re-probe interval, as before.
    f.pool.reset(&k0).unwrap();
    granted(f.pool.try_acquire(&req("m"))).report(Fate::QuotaExhausted {
        reason: QUOTA_EXHAUSTED.into(),
        reset: None,
    });
    let snap = f.pool.key_snapshot(&k0).unwrap();
    assert_eq!(snap.next_probe_ms, Some(unix_now(&f) + 30 * 60_000));
}

#[test]
fn outcomes_map_to_fates_by_quota_scope() {
    use llmq_sdk::{Outcome, QuotaScope};
    let key = Outcome::QuotaExhausted {
        reset: Some(QuotaReset::At { unix_ms: 7 }),
        scope: QuotaScope::Key,
    };
    assert_eq!(
        Fate::from_outcome(&key, 0.0),
        Fate::QuotaExhausted {
            reason: QUOTA_EXHAUSTED.into(),
            reset: Some(QuotaReset::At { unix_ms: 7 }),
        }
    );
    let model = Outcome::QuotaExhausted {
        reset: Some(QuotaReset::NextDaily),
        scope: QuotaScope::Model("gemini-2.0-flash".into()),
    };
    assert!(matches!(
        Fate::from_outcome(&model, 0.0),
        Fate::ModelQuota { model, .. } if model == "gemini-2.0-flash"
    ));
    assert_eq!(
        Fate::from_outcome(&Outcome::RequestTooLarge, 0.0),
        Fate::Untouched
    );
}

#[test]
fn keys_that_refused_a_request_as_too_large_are_skipped_for_it_and_never_when_all_did() {
    let f = fixture(provider(Limits::default()), keys(3));
    prove(&f, 3);
    let k0 = KeyId::new("groq", 0);
    let k1 = KeyId::new("groq", 1);
    let k2 = KeyId::new("groq", 2);
    for _ in 0..6 {
        let p = granted(
            f.pool
                .try_acquire_except(&req("m"), &[k0.clone(), k2.clone()]),
        );
        assert_eq!(p.key_id(), &k1);
        p.report(ok());
    }
    // Excluded keys are untouched for other requests.
    let seen: Vec<u32> = (0..3)
        .map(|_| {
            let p = granted(f.pool.try_acquire(&req("m")));
            let i = inst(&p);
            p.report(ok());
            i
        })
        .collect();
    assert_eq!(seen.len(), 3);
    assert!(seen.contains(&0) && seen.contains(&2), "{seen:?}");
    let why = never(
        f.pool
            .try_acquire_except(&req("m"), &[k0.clone(), k1.clone(), k2.clone()]),
    );
    assert!(why.contains("too large"), "{why}");
    // Even a cooling key that refused it is no reason to wait.
    granted(f.pool.try_acquire(&AcquireRequest {
        pinned: Some(&k1),
        ..req("m")
    }))
    .report(Fate::RateLimited {
        retry_after: Some(Duration::from_secs(30)),
    });
    never(
        f.pool
            .try_acquire_except(&req("m"), &[k0.clone(), k1.clone(), k2.clone()]),
    );
    let why = never(f.pool.try_acquire_except(
        &AcquireRequest {
            pinned: Some(&k0),
            ..req("m")
        },
        std::slice::from_ref(&k0),
    ));
    assert!(why.contains("too large"), "{why}");
}

#[test]
fn a_probe_that_was_never_sent_leaves_the_key_disabled() {
    // A TLS failure reaches no provider: the executor reports it as not
    // sent, which must neither re-enable a disabled key nor push its probe.
    let f = fixture(provider(Limits::default()), keys(1));
    let bad = KeyId::new("groq", 0);
    granted(f.pool.try_acquire(&req("m"))).report(Fate::Disabled {
        reason: AUTH_FAILED.into(),
    });
    f.clock.advance(Duration::from_secs(30 * 60));
    let probe = granted(f.pool.try_acquire(&req("m")));
    assert!(probe.is_probe() && probe.key_id() == &bad);
    probe.report(Fate::NotSent);
    let snap = f.pool.key_snapshot(&bad).unwrap();
    assert_eq!(snap.status, KeyStatus::Disabled);
    assert_eq!(snap.reason.as_deref(), Some(AUTH_FAILED));
    // The probe is due again at once: the next job re-tests the key.
    let again = granted(f.pool.try_acquire(&req("m")));
    assert!(again.is_probe() && again.key_id() == &bad);
}
