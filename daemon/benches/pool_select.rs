//! Key selection + limit check: latency of `try_acquire` (and of reporting
//! the call's success) with 10, 1,000 and 10,000 keys in one provider.
//!
//! `cargo bench -p llmq --bench pool_select` prints p50/p99/p99.9 per
//! scenario (the median of three runs by p99). Each sample times one call with `Instant::now()` around it
//! (≈20 ns of the figure is the timer itself).

use llmq::clock::{Clock, ManualClock, SystemClock};
use llmq::config::{Config, Limits, ProviderConfig};
use llmq::job::Strategy;
use llmq::keys::{ApiKey, KeyId, KeyRing};
use llmq::pool::{Acquire, AcquireRequest, Fate, KeyPool};
use secrecy::SecretString;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SAMPLES: usize = 200_000;
const WARMUP: usize = 20_000;

struct Scenario {
    name: &'static str,
    limits: Limits,
    strategy: Strategy,
    /// Every other key serves only model "a"; calls ask for model "b".
    restricted: bool,
    /// Clock step per call (None: the system clock).
    step: Option<fn(usize) -> Duration>,
    /// Permits held at once (a sliding window of in-flight calls).
    in_flight: usize,
}

fn pool(n: usize, s: &Scenario) -> (KeyPool, Option<ManualClock>) {
    let mut config = Config::default();
    config.providers.insert(
        "bench".into(),
        ProviderConfig {
            limits: s.limits,
            strategy: s.strategy,
            ..ProviderConfig::default()
        },
    );
    let keys = (0..n as u32).map(|i| {
        let mut k = ApiKey::new(
            KeyId::new("bench", i),
            Some(SecretString::from(format!("sk-bench-{i:08}"))),
            "bench",
        );
        k.weight = 1 + i % 3;
        if s.restricted && i % 2 == 1 {
            k.models = vec!["a".into()];
        }
        k
    });
    let ring = KeyRing::from_keys(keys);
    match s.step {
        Some(_) => {
            let clock = ManualClock::new(1_714_521_600_000);
            let pool = KeyPool::new(&config, &ring, Arc::new(clock.clone()) as Arc<dyn Clock>);
            (pool, Some(clock))
        }
        None => (
            KeyPool::new(&config, &ring, Arc::new(SystemClock::default())),
            None,
        ),
    }
}

/// Gives every key its first success (a new key takes one call at a time
/// until then).
fn prove(pool: &KeyPool, n: usize) {
    for i in 0..n as u32 {
        let id = KeyId::new("bench", i);
        let req = AcquireRequest {
            provider: "bench",
            model: "a",
            tokens: 1,
            strategy: None,
            pinned: Some(&id),
            instance: None,
        };
        if let Acquire::Granted(p) = pool.try_acquire(&req) {
            p.report(Fate::Success {
                usage_in: 1,
                usage_out: 0,
                cost_usd: 0.0,
            });
        }
    }
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One run's percentiles: acquire p50/p99/p99.9, release p50/p99, grant share.
struct Stats([u32; 5], f64);

fn run(n: usize, s: &Scenario) -> Stats {
    let (pool, clock) = pool(n, s);
    prove(&pool, n);
    let req = AcquireRequest {
        provider: "bench",
        model: "b",
        tokens: 300,
        strategy: None,
        pinned: None,
        instance: None,
    };
    let mut held = std::collections::VecDeque::new();
    let mut acquire = Vec::with_capacity(SAMPLES);
    let mut release = Vec::with_capacity(SAMPLES);
    let (mut grants, mut waits) = (0usize, 0usize);
    for i in 0..WARMUP + SAMPLES {
        if let (Some(c), Some(step)) = (&clock, s.step) {
            c.advance(step(n));
        }
        let t0 = Instant::now();
        let got = pool.try_acquire(&req);
        let dt = t0.elapsed().as_nanos() as u32;
        match got {
            Acquire::Granted(p) => {
                grants += 1;
                held.push_back(p);
            }
            Acquire::Wait { .. } => waits += 1,
            Acquire::Never(why) => panic!("{why}"),
        }
        let mut rel = None;
        if held.len() > s.in_flight {
            let p = held.pop_front().expect("held");
            let t0 = Instant::now();
            p.report(Fate::Success {
                usage_in: 100,
                usage_out: 50,
                cost_usd: 0.0,
            });
            rel = Some(t0.elapsed().as_nanos() as u32);
        }
        if i >= WARMUP {
            acquire.push(dt);
            release.extend(rel);
        }
    }
    acquire.sort_unstable();
    release.sort_unstable();
    Stats(
        [
            pct(&acquire, 0.5),
            pct(&acquire, 0.99),
            pct(&acquire, 0.999),
            pct(&release, 0.5),
            pct(&release, 0.99),
        ],
        100.0 * grants as f64 / (grants + waits) as f64,
    )
}

fn main() {
    let scenarios = [
        Scenario {
            name: "round-robin, roomy limits",
            limits: Limits {
                rpm: Some(1_000_000),
                tpm: Some(1_000_000_000),
                rpd: Some(1_000_000_000),
                tpd: None,
            },
            strategy: Strategy::RoundRobin,
            restricted: false,
            step: None,
            in_flight: 8,
        },
        Scenario {
            name: "round-robin, every key at its RPM",
            limits: Limits {
                rpm: Some(2),
                ..Limits::default()
            },
            strategy: Strategy::RoundRobin,
            restricted: false,
            // Each call, a little over 1/n of a window passes: about one
            // key frees up per call, all others are full.
            step: Some(|n| Duration::from_secs(60) / (n as u32) / 2 + Duration::from_nanos(1)),
            in_flight: 0,
        },
        Scenario {
            name: "least-loaded, 64 in flight",
            limits: Limits {
                rpm: Some(1_000_000),
                ..Limits::default()
            },
            strategy: Strategy::LeastLoaded,
            restricted: false,
            step: None,
            in_flight: 64,
        },
        Scenario {
            name: "random, half the keys other model",
            limits: Limits {
                rpm: Some(1_000_000),
                ..Limits::default()
            },
            strategy: Strategy::Random,
            restricted: true,
            step: None,
            in_flight: 8,
        },
        Scenario {
            name: "weighted",
            limits: Limits {
                rpm: Some(1_000_000),
                ..Limits::default()
            },
            strategy: Strategy::Weighted,
            restricted: false,
            step: None,
            in_flight: 8,
        },
    ];
    // `cargo bench` passes `--bench`; any other argument filters by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for s in &scenarios {
        if !filter.is_empty() && !filter.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        for n in [10, 1_000, 10_000] {
            // Three runs; the one with the median p99 is shown (the machine
            // may be shared, and one run can catch another process's burst).
            let mut runs: Vec<Stats> = (0..3).map(|_| run(n, s)).collect();
            runs.sort_by_key(|r| r.0[1]);
            let Stats([a50, a99, a999, r50, r99], granted) = runs[1];
            println!(
                "{:<34} {:>6} keys  acquire p50 {a50:>5} ns  p99 {a99:>5} ns  p99.9 {a999:>6} ns | report p50 {r50:>4} ns  p99 {r99:>5} ns | granted {granted:.0}%",
                s.name, n,
            );
        }
    }
}
