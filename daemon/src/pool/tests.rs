//! Randomised operation sequences against the pool's internals: every key
//! stays in exactly one place, and the pool never answers "wait" or "never"
//! while some key could serve the call (checked by brute force).

use super::*;
use crate::clock::{Clock, ManualClock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;

/// The models jobs ask for.
const MODELS: [&str; 3] = ["a", "b", "c"];

/// The strategies jobs ask for (`None`: the provider's).
const STRATEGIES: [Option<Strategy>; 5] = [
    None,
    Some(Strategy::RoundRobin),
    Some(Strategy::Random),
    Some(Strategy::LeastLoaded),
    Some(Strategy::Weighted),
];

fn key(n: u32, rng: &mut StdRng) -> ApiKey {
    let mut k = ApiKey::new(
        KeyId::new("p", n),
        Some(SecretString::from(format!("secret-{n}"))),
        "test",
    );
    k.weight = rng.random_range(0..4);
    k.models = match rng.random_range(0..4) {
        0 => vec!["a".into()],
        1 => vec!["b".into(), "a".into()],
        _ => vec![],
    };
    if rng.random_bool(0.3) {
        k.limits.rpm = Some(rng.random_range(1..6));
    }
    if rng.random_bool(0.3) {
        k.max_concurrent = Some(rng.random_range(1..3));
    }
    if rng.random_bool(0.4) {
        k.account = Some(format!("acct{}", rng.random_range(0..2)));
    }
    k
}

fn provider_state(pool: &KeyPool) -> Arc<Provider> {
    pool.provider("p").unwrap()
}

fn check(pool: &KeyPool) {
    lock(&provider_state(pool).state).check_invariants();
}

fn could_serve(pool: &KeyPool, req: &AcquireRequest<'_>) -> bool {
    let now = pool.inner.now();
    lock(&provider_state(pool).state).could_serve(req, now)
}

/// A provider `p` with random limits and shape.
fn random_config(rng: &mut StdRng) -> Config {
    let mut config = Config::default();
    config.providers.insert(
        "p".into(),
        ProviderConfig {
            limits: Limits {
                rpm: Some(rng.random_range(2..8)),
                tpm: Some(rng.random_range(1_000..4_000)),
                rpd: Some(rng.random_range(20..200)),
                tpd: None,
            },
            max_concurrent: Some(rng.random_range(1..4)),
            limit_shape: if rng.random_bool(0.3) {
                LimitShape::TokenBucket
            } else {
                LimitShape::Rolling
            },
            ..ProviderConfig::default()
        },
    );
    config.keys.reprobe_interval = Duration::from_secs(rng.random_range(30..300));
    config
}

/// One random acquisition, checked against the brute-force oracle.
fn acquire_step(
    pool: &KeyPool,
    clock: &ManualClock,
    rng: &mut StdRng,
    (seed, step): (u64, u32),
    held: &mut Vec<Permit>,
    tally: &mut [u32; 4],
) {
    let pinned_id = KeyId::new("p", rng.random_range(0..10));
    let pinned = rng.random_bool(0.05).then_some(&pinned_id);
    let req = AcquireRequest {
        provider: "p",
        model: MODELS[rng.random_range(0..3)],
        tokens: rng.random_range(50..2_500),
        strategy: STRATEGIES[rng.random_range(0..STRATEGIES.len())],
        pinned,
        instance: None,
    };
    match pool.try_acquire(&req) {
        Acquire::Granted(p) => {
            tally[0] += 1;
            tally[3] += u32::from(p.is_probe());
            held.push(p);
        }
        Acquire::Wait { until, .. } => {
            tally[1] += 1;
            let now = clock.now();
            assert!(until > now, "seed {seed} step {step}: wait until the past");
            if pinned.is_none() {
                assert!(
                    !could_serve(pool, &req),
                    "seed {seed} step {step}: told to wait but a key can serve"
                );
                // Nothing can serve until then (no release in between).
                let before = until - Duration::from_millis(1);
                if before > now && rng.random_bool(0.5) {
                    clock.set(before);
                    assert!(
                        !could_serve(pool, &req),
                        "seed {seed} step {step}: a key could serve before {until:?}"
                    );
                }
            }
        }
        Acquire::Never(why) => {
            tally[2] += 1;
            if pinned.is_none() {
                assert!(
                    !could_serve(pool, &req),
                    "seed {seed} step {step}: never ({why}) but a key can serve"
                );
            }
        }
    }
}

/// A random upstream outcome; `None`: the permit is dropped unreported.
fn random_fate(rng: &mut StdRng, clock: &ManualClock) -> Option<Fate> {
    let fate = match rng.random_range(0..20) {
        0 => Fate::Disabled {
            reason: AUTH_FAILED.into(),
        },
        1..=2 => Fate::RateLimited {
            retry_after: rng
                .random_bool(0.5)
                .then(|| Duration::from_millis(rng.random_range(0..90_000))),
        },
        3 => Fate::Transient,
        4 => Fate::Untouched,
        5 => Fate::NotSent,
        7 => Fate::ModelQuota {
            model: format!(
                "{}{}",
                if rng.random_bool(0.5) { "models/" } else { "" },
                MODELS[rng.random_range(0..3)]
            ),
            reason: QUOTA_EXHAUSTED.into(),
            reset: rng.random_bool(0.7).then(|| QuotaReset::At {
                unix_ms: clock.unix_ms() + rng.random_range(0..60_000),
            }),
        },
        8 => Fate::QuotaExhausted {
            reason: QUOTA_EXHAUSTED.into(),
            reset: match rng.random_range(0..3) {
                0 => None,
                1 => Some(QuotaReset::NextDaily),
                _ => Some(QuotaReset::At {
                    unix_ms: clock.unix_ms() + rng.random_range(0..120_000),
                }),
            },
        },
        6 => return None,
        _ => Fate::Success {
            usage_in: rng.random_range(0..500),
            usage_out: rng.random_range(0..500),
            cost_usd: 0.001,
        },
    };
    Some(fate)
}

/// Returns how many acquisitions were granted, told to wait, told never, and probes.
fn run(seed: u64) -> [u32; 4] {
    let mut tally = [0u32; 4];
    let mut rng = StdRng::seed_from_u64(seed);
    let clock = ManualClock::new(1_714_521_600_000);
    let config = random_config(&mut rng);
    let all: Vec<ApiKey> = (0..rng.random_range(1..9))
        .map(|n| key(n, &mut rng))
        .collect();
    let pool = KeyPool::new(
        &config,
        &KeyRing::from_keys(all.clone()),
        Arc::new(clock.clone()) as Arc<dyn Clock>,
    );
    let mut held: Vec<Permit> = Vec::new();
    for step in 0..3_000 {
        let op = rng.random_range(0..100);
        if op < 45 {
            acquire_step(&pool, &clock, &mut rng, (seed, step), &mut held, &mut tally);
        } else if op < 80 {
            if !held.is_empty() {
                let p = held.swap_remove(rng.random_range(0..held.len()));
                match random_fate(&mut rng, &clock) {
                    Some(fate) => pool.report(p, fate),
                    None => drop(p),
                }
            }
        } else if op < 93 {
            clock.advance(Duration::from_millis(rng.random_range(0..20_000)));
        } else if op < 96 {
            let _ = pool.reset(&KeyId::new("p", rng.random_range(0..8)));
        } else if op < 97 {
            let _ = pool.disable(&KeyId::new("p", rng.random_range(0..8)), "operator");
        } else if op < 98 {
            pool.observe(
                &KeyId::new("p", rng.random_range(0..8)),
                &ObservedLimits {
                    requests_remaining: Some(0),
                    requests_reset_ms: Some(rng.random_range(0..30_000)),
                    tokens_limit: rng.random_bool(0.5).then(|| rng.random_range(500..5_000)),
                    ..ObservedLimits::default()
                },
            );
        } else if op < 99 {
            let mut subset = Vec::new();
            for k in &all {
                if rng.random_bool(0.7) {
                    let mut k = k.clone();
                    if rng.random_bool(0.2) {
                        k.models = vec!["b".into()];
                    }
                    subset.push(k);
                }
            }
            pool.reload(&config, &KeyRing::from_keys(subset));
        } else {
            let _ = pool.take_deltas();
            let _ = pool.snapshot();
        }
        check(&pool);
    }
    drop(held);
    check(&pool);
    for s in pool.snapshot() {
        assert_eq!(
            s.in_flight, 0,
            "seed {seed}: {} still has calls in flight",
            s.id
        );
    }
    tally
}

#[test]
fn random_operations_keep_the_pool_consistent_and_never_miss_capacity() {
    let mut total = [0u32; 4];
    for seed in 0..40 {
        for (t, n) in total.iter_mut().zip(run(seed)) {
            *t += n;
        }
    }
    // Every path was exercised many times.
    let [granted, waits, nevers, probes] = total;
    assert!(
        granted > 5_000 && waits > 5_000 && nevers > 1_000 && probes > 20,
        "granted {granted}, waits {waits}, nevers {nevers}, probes {probes}"
    );
}

/// A pool of one key `p#1` of provider `p` on a manual clock; `tune` adjusts
/// the config first.
fn one_key_pool(tune: impl FnOnce(&mut Config)) -> (KeyPool, ManualClock, KeyId) {
    let clock = ManualClock::new(1_714_521_600_000);
    let mut config = Config::default();
    config
        .providers
        .insert("p".into(), ProviderConfig::default());
    tune(&mut config);
    let id = KeyId::new("p", 1);
    let ring = KeyRing::from_keys([ApiKey::new(
        id.clone(),
        Some(SecretString::from("secret-1")),
        "test",
    )]);
    let pool = KeyPool::new(&config, &ring, Arc::new(clock.clone()) as Arc<dyn Clock>);
    (pool, clock, id)
}

#[test]
fn a_dropped_probe_permit_frees_the_probe_at_once_with_an_unknown_fate() {
    let (pool, clock, id) = one_key_pool(|c| c.keys.reprobe_interval = Duration::from_secs(60));
    let req = AcquireRequest {
        provider: "p",
        model: "a",
        tokens: 10,
        strategy: None,
        pinned: None,
        instance: None,
    };
    let granted = |pool: &KeyPool| match pool.try_acquire(&req) {
        Acquire::Granted(p) => p,
        other => panic!("expected a grant, got {other:?}"),
    };
    // The key is refused, then its re-probe comes due.
    let p = granted(&pool);
    p.report(Fate::Disabled {
        reason: "auth_failed".into(),
    });
    assert!(!matches!(pool.try_acquire(&req), Acquire::Granted(_)));
    clock.advance(Duration::from_secs(61));
    let probe = granted(&pool);
    assert!(probe.is_probe());
    assert!(
        !matches!(pool.try_acquire(&req), Acquire::Granted(_)),
        "one probe at a time"
    );
    let snap = |pool: &KeyPool| {
        pool.snapshot()
            .into_iter()
            .find(|k| k.id == id)
            .expect("the key")
    };
    assert!(snap(&pool).probing);
    // Dropped in the middle of the call (a cancelled job future).
    drop(probe);
    check(&pool);
    let k = snap(&pool);
    assert!(!k.probing && k.in_flight == 0, "{k:?}");
    assert_eq!(
        k.status,
        KeyStatus::Disabled,
        "an unknown fate proves nothing"
    );
    assert_eq!(
        k.stats.requests, 2,
        "the dropped call may have been sent: it counts"
    );
    // The re-probe is due again at once, not after another interval.
    let again = granted(&pool);
    assert!(again.is_probe());
    again.report(Fate::Success {
        usage_in: 1,
        usage_out: 1,
        cost_usd: 0.0,
    });
    assert_eq!(snap(&pool).status, KeyStatus::Available);
}

/// Issue 16: the cluster gate held keys back by faking an upstream's "0
/// requests remaining" header. `hold_back` says so: no grant before the
/// hold ends (a shorter hold does not shorten it), the key's state and
/// counters untouched, and a grant again once it ends.
#[test]
fn a_held_back_key_is_granted_nothing_until_the_hold_ends() {
    let (pool, clock, id) = one_key_pool(|_| {});
    let req = AcquireRequest {
        provider: "p",
        model: "a",
        tokens: 10,
        strategy: None,
        pinned: Some(&id),
        instance: None,
    };
    pool.hold_back(&id, Duration::from_secs(2), "test");
    pool.hold_back(&id, Duration::from_millis(500), "a shorter hold");
    pool.hold_back(&KeyId::new("p", 9), Duration::from_secs(1), "unknown key");
    match pool.try_acquire(&req) {
        Acquire::Wait { until, .. } => assert_eq!(until, Duration::from_secs(2)),
        other => panic!("expected a wait for the hold, got {other:?}"),
    }
    let k = pool.snapshot().into_iter().find(|k| k.id == id).unwrap();
    assert_eq!(k.status, KeyStatus::Available);
    assert_eq!((k.stats.requests, k.in_flight), (0, 0));
    clock.advance(Duration::from_millis(1_999));
    assert!(!matches!(pool.try_acquire(&req), Acquire::Granted(_)));
    clock.advance(Duration::from_millis(1));
    match pool.try_acquire(&req) {
        Acquire::Granted(p) => p.report(Fate::NotSent),
        other => panic!("expected a grant after the hold, got {other:?}"),
    }
    check(&pool);
}
