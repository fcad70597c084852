//! Quota pools in the local key pool: keys that name one `account` share one
//! set of limits (RPM/TPM/RPD/TPD), while concurrency and probation stay per
//! key. Driven with a manual clock.

use llmq::clock::{Clock, ManualClock};
use llmq::config::{Config, Limits, ProviderConfig};
use llmq::keys::{ApiKey, KeyId, KeyRing};
use llmq::pool::{Acquire, AcquireRequest, Fate, KeyPool, Permit};
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;

/// 2024-05-01T00:00:00Z.
const BASE_MS: u64 = 1_714_521_600_000;

fn key(n: u32, account: Option<&str>) -> ApiKey {
    let mut k = ApiKey::new(
        KeyId::new("gem", n),
        Some(SecretString::from(format!("test-gem-{n}-secret-value"))),
        format!("test gem#{n}"),
    );
    k.account = account.map(String::from);
    k
}

fn config(limits: Limits, max_concurrent: Option<u32>) -> Config {
    let mut c = Config::default();
    c.providers.insert(
        "gem".into(),
        ProviderConfig {
            limits,
            max_concurrent,
            window: Some(Duration::from_secs(60)),
            ..ProviderConfig::default()
        },
    );
    c
}

fn rpm(n: u64) -> Limits {
    Limits {
        rpm: Some(n),
        ..Limits::default()
    }
}

fn pool(config: &Config, keys: Vec<ApiKey>) -> (KeyPool, ManualClock) {
    let clock = ManualClock::new(BASE_MS);
    let pool = KeyPool::new(
        config,
        &KeyRing::from_keys(keys),
        Arc::new(clock.clone()) as Arc<dyn Clock>,
    );
    (pool, clock)
}

fn req<'a>(pinned: Option<&'a KeyId>) -> AcquireRequest<'a> {
    AcquireRequest {
        provider: "gem",
        model: "m",
        tokens: 10,
        strategy: None,
        pinned,
        instance: None,
    }
}

fn ok() -> Fate {
    Fate::Success {
        usage_in: 5,
        usage_out: 5,
        cost_usd: 0.0,
    }
}

/// Every permit the pool grants now, held (not reported).
fn drain(pool: &KeyPool) -> (Vec<Permit>, Option<Duration>) {
    let mut held = Vec::new();
    loop {
        match pool.try_acquire(&req(None)) {
            Acquire::Granted(p) => held.push(p),
            Acquire::Wait { until, .. } => return (held, Some(until)),
            Acquire::Never(why) => panic!("never: {why}"),
        }
    }
}

/// Ends each key's probation (one call at a time until its first success).
fn prove(pool: &KeyPool, n: u32) {
    for i in 0..n {
        let id = KeyId::new("gem", i);
        match pool.try_acquire(&req(Some(&id))) {
            Acquire::Granted(p) => p.report(ok()),
            other => panic!("{id}: {other:?}"),
        }
    }
}

fn count_by_key(held: &[Permit]) -> [usize; 2] {
    let mut n = [0; 2];
    for p in held {
        n[p.key_id().instance() as usize] += 1;
    }
    n
}

#[test]
fn two_keys_of_one_account_admit_rpm_calls_per_window_between_them() {
    let cfg = config(rpm(10), None);
    let (pool, clock) = pool(&cfg, vec![key(0, Some("proj")), key(1, Some("proj"))]);
    prove(&pool, 2);
    // The two probation calls count too: 8 more in this window.
    let (held, wait) = drain(&pool);
    assert_eq!(held.len(), 8, "10 per window for the account, not 20");
    let [a, b] = count_by_key(&held);
    assert!(a > 0 && b > 0, "both keys serve: {a} + {b}");
    // Nothing passes until the window has passed the first call.
    assert_eq!(wait, Some(Duration::from_secs(60)));
    for p in held {
        p.report(ok());
    }
    clock.advance(Duration::from_secs(30));
    assert!(matches!(pool.try_acquire(&req(None)), Acquire::Wait { .. }));
    // Each window of 60 s: 10 calls between the two keys, never more.
    for window in 1..=3 {
        clock.set(Duration::from_secs(60 * window + 1));
        let (held, wait) = drain(&pool);
        assert_eq!(held.len(), 10, "window {window}");
        assert!(wait.is_some());
        for p in held {
            p.report(ok());
        }
    }
    // The snapshot shows the account and its shared counts on each key.
    for s in pool.snapshot() {
        assert_eq!(s.account.as_deref(), Some("proj"));
        assert_eq!(s.window_requests, 10, "{}", s.id);
        assert_eq!(s.day_requests, 40, "{}", s.id);
    }
}

#[test]
fn without_an_account_each_key_has_its_own_limits() {
    let cfg = config(rpm(10), None);
    let (pool, _clock) = pool(&cfg, vec![key(0, None), key(1, Some("proj"))]);
    prove(&pool, 2);
    let (held, _) = drain(&pool);
    assert_eq!(count_by_key(&held), [9, 9]);
}

#[test]
fn a_pinned_key_is_refused_when_its_account_is_full() {
    let cfg = config(rpm(3), None);
    let (pool, clock) = pool(&cfg, vec![key(0, Some("proj")), key(1, Some("proj"))]);
    prove(&pool, 2);
    let k0 = KeyId::new("gem", 0);
    let k1 = KeyId::new("gem", 1);
    match pool.try_acquire(&req(Some(&k0))) {
        Acquire::Granted(p) => p.report(ok()),
        other => panic!("{other:?}"),
    }
    // 3 calls in the window (2 probes + 1): gem#1 has made one, yet waits.
    match pool.try_acquire(&req(Some(&k1))) {
        Acquire::Wait { until, .. } => assert_eq!(until, Duration::from_secs(60)),
        other => panic!("{other:?}"),
    }
    clock.set(Duration::from_secs(60));
    assert!(matches!(
        pool.try_acquire(&req(Some(&k1))),
        Acquire::Granted(_)
    ));
}

#[test]
fn concurrency_stays_per_key_within_an_account() {
    let cfg = config(rpm(100), Some(2));
    let (pool, _clock) = pool(&cfg, vec![key(0, Some("proj")), key(1, Some("proj"))]);
    prove(&pool, 2);
    let (held, _) = drain(&pool);
    assert_eq!(count_by_key(&held), [2, 2], "max_concurrent 2 on each key");
}

#[test]
fn a_call_given_back_unsent_frees_the_account_for_its_other_keys() {
    let cfg = config(rpm(4), None);
    let mut only_x = key(0, Some("proj"));
    only_x.models = vec!["x".into()];
    let (pool, clock) = pool(&cfg, vec![only_x, key(1, Some("proj"))]);
    let k0 = KeyId::new("gem", 0);
    let k1 = KeyId::new("gem", 1);
    for id in [&k0, &k1] {
        match pool.try_acquire(&AcquireRequest {
            model: "x",
            ..req(Some(id))
        }) {
            Acquire::Granted(p) => p.report(ok()),
            other => panic!("{other:?}"),
        }
    }
    // gem#0 holds a call; gem#1 (the only key for model m) takes the rest.
    let Acquire::Granted(held0) = pool.try_acquire(&AcquireRequest {
        model: "x",
        ..req(Some(&k0))
    }) else {
        panic!("gem#0 should have room")
    };
    let (held, wait) = drain(&pool);
    assert_eq!(held.len(), 1);
    assert_eq!(wait, Some(Duration::from_secs(60)), "gem#1 is set aside");
    clock.advance(Duration::from_secs(1));
    // gem#0's call goes back unsent (e.g. the cluster gate said no): room
    // for gem#1 at once, not when its window ends.
    held0.report(Fate::NotSent);
    assert!(matches!(pool.try_acquire(&req(None)), Acquire::Granted(_)));
}

#[test]
fn daily_caps_are_the_accounts_and_a_reload_can_split_it() {
    let limits = Limits {
        rpd: Some(5),
        ..Limits::default()
    };
    let cfg = config(limits, None);
    let (pool, _clock) = pool(&cfg, vec![key(0, Some("proj")), key(1, Some("proj"))]);
    prove(&pool, 2);
    let (held, wait) = drain(&pool);
    assert_eq!(held.len(), 3, "5 a day for the account");
    // Until the next daily reset (UTC midnight here).
    assert_eq!(wait, Some(Duration::from_secs(86_400)));
    for p in held {
        p.report(ok());
    }
    // SIGHUP: the keys no longer share an account. Each gets a quota of its
    // own (counting from now).
    pool.reload(
        &cfg,
        &KeyRing::from_keys(vec![key(0, None), key(1, Some("other"))]),
    );
    let (held, _) = drain(&pool);
    assert_eq!(count_by_key(&held), [5, 5]);
    let snap = pool.snapshot();
    assert_eq!(snap[0].account, None);
    assert_eq!(snap[1].account.as_deref(), Some("other"));
}

#[test]
fn an_account_is_held_to_the_strictest_of_its_keys_limits() {
    let cfg = config(rpm(10), None);
    let mut strict = key(1, Some("proj"));
    strict.limits.rpm = Some(4);
    let (pool, _clock) = pool(&cfg, vec![key(0, Some("proj")), strict]);
    prove(&pool, 2);
    let (held, _) = drain(&pool);
    assert_eq!(held.len(), 2, "rpm 4 for the account");
    for s in pool.snapshot() {
        assert_eq!(s.limits.rpm, Some(4));
    }
}
