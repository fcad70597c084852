//! The rolling window is written twice: in Rust (the local limiter,
//! `limits::rolling`) and in Lua (the cluster gate's admission and
//! completion scripts, `global`). Both promise the same thing (ARCHITECTURE.md,
//! "Skew safety"): at most `rpm` calls and `tpm` tokens in ANY window, an
//! in-flight call occupying its slot "now" and a completed one stamped with
//! its completion time. This property test runs random sequences of events
//! (admit a call of n tokens, complete or cancel one in flight, let time
//! pass) for random RPM/TPM limits and window lengths against both, driven
//! by one `ManualClock` (the gate takes it through its test hook
//! [`GlobalGate::with_clock`]; production keeps Redis `TIME`), and asserts
//! that they admit exactly the same calls and count the same window.
//!
//! The comparison is restricted to what both enforce: rolling-window RPM and
//! TPM of a proven key, of its own or of an account (learned limits,
//! RPD/TPD, concurrency and probation are the local pool's or other state),
//! limits ≥ 1 (the gate reads 0 as "none", the limiter as "never", and the
//! limiter refuses such a key before the gate is asked), and calls shorter than [`MAX_CALL`] (the gate's bound for a slot
//! that is never completed).
//!
//! A seeded loop over `rand` rather than the `proptest` crate: no new
//! dependency to build on a shared machine, every case reproducible from
//! its seed (`GATE_VS_LIMITER_SEED=<n>` runs that one), and a failing case is
//! shrunk here by dropping events while it still fails, then printed.

use llmq::clock::{Clock, ManualClock};
use llmq::config::{Config, Limits, ProviderConfig};
use llmq::global::{Admit, GateKeys, GlobalCall, GlobalGate, MAX_CALL};
use llmq::keys::{ApiKey, KeyId, KeyRing};
use llmq::limits::{Admission, LimiterConfig, LocalLimiter, Now, Refusal, SharedQuota, Ticket};
use llmq::pool::Fate;
use llmq_testkit::RedisServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::ConnectionManager;
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;

/// How many random cases the default suite runs.
const CASES: u64 = 200;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    /// One call charged this many tokens.
    Admit(u64),
    /// The `i % n`-th call in flight completes (successfully) now.
    Complete(usize),
    /// The `i % n`-th call in flight is given back unsent.
    Cancel(usize),
    /// Time passes (ms).
    Advance(u64),
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    rpm: Option<u64>,
    tpm: Option<u64>,
    window_ms: u64,
    /// The key belongs to an account: the gate counts in the account's
    /// window (its own hash tag and meta hash), the limiter in a shared quota.
    account: bool,
    ops: Vec<Op>,
}

fn generate(seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let (rpm, tpm) = match rng.random_range(0..4) {
        0 => (Some(rng.random_range(1..=6)), None),
        1 => (None, Some(rng.random_range(1..=200))),
        _ => (
            Some(rng.random_range(1..=6)),
            Some(rng.random_range(1..=200)),
        ),
    };
    let window_ms = match rng.random_range(0..4) {
        0 => 1_000,
        1 => 60_000,
        _ => rng.random_range(10..=90_000),
    };
    let mut ops = Vec::new();
    for _ in 0..rng.random_range(10..=60) {
        ops.push(match rng.random_range(0..100) {
            0..45 => {
                let top = tpm.unwrap_or(100);
                Op::Admit(match rng.random_range(0..10) {
                    0 => 0,
                    // Sometimes more than the limit alone allows.
                    1 => rng.random_range(top..=top + 10),
                    _ => rng.random_range(1..=(top / 2).max(1)),
                })
            }
            45..65 => Op::Complete(rng.random_range(0..8)),
            65..70 => Op::Cancel(rng.random_range(0..8)),
            // Exactly a window, or a millisecond either side: the boundary
            // (a slot counts while now < stamp + window).
            70..78 => Op::Advance(window_ms - 1 + rng.random_range(0..=2)),
            78..90 => Op::Advance(rng.random_range(0..=window_ms / 10)),
            _ => Op::Advance(rng.random_range(0..=window_ms * 2)),
        });
    }
    Case {
        seed,
        rpm,
        tpm,
        window_ms,
        account: rng.random_bool(0.3),
        ops,
    }
}

/// One key `g#1` with `case`'s limits, for both sides.
fn setup(case: &Case) -> (Config, KeyRing, LimiterConfig) {
    let limits = Limits {
        rpm: case.rpm,
        tpm: case.tpm,
        ..Limits::default()
    };
    let window = Duration::from_millis(case.window_ms);
    let mut config = Config::default();
    config.providers.insert(
        "g".into(),
        ProviderConfig {
            limits,
            window: Some(window),
            ..ProviderConfig::default()
        },
    );
    let mut key = ApiKey::new(
        KeyId::new("g", 1),
        Some(SecretString::from("sk-gate-vs-limiter-0001-xxxxxxxx")),
        "test",
    );
    key.account = case.account.then(|| "team".to_string());
    let ring = KeyRing::from_keys([key]);
    let local = LimiterConfig {
        limits,
        window,
        ..LimiterConfig::default()
    };
    (config, ring, local)
}

fn success() -> Fate {
    Fate::Success {
        usage_in: 1,
        usage_out: 1,
        cost_usd: 0.0,
    }
}

/// Runs `case` against both: `(granted, refused)` admissions, on which they
/// agreed, or the first disagreement.
async fn run(conn: &ConnectionManager, case: &Case) -> Result<(u64, u64), String> {
    let mut c = conn.clone();
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    let (config, ring, local_cfg) = setup(case);
    let id = KeyId::new("g", 1);
    let clock = ManualClock::new(1_700_000_000_000);
    // Away from zero, so no stamp is at the clock's origin.
    clock.advance(Duration::from_secs(1000));
    let gate =
        GlobalGate::new(conn.clone(), "prop", &config, &ring).with_clock(Arc::new(clock.clone()));
    // A proven key: probation is not the window's business.
    let keys = GateKeys::of(&id, case.account.then_some("team"));
    redis::cmd("HSET")
        .arg(&keys.state)
        .arg("proven")
        .arg("1")
        .query_async::<()>(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    let mut limiter = if case.account {
        let quota = SharedQuota::new(local_cfg.clone(), Now::of(&clock));
        LocalLimiter::sharing(local_cfg, &quota)
    } else {
        LocalLimiter::new(local_cfg, Now::of(&clock))
    };
    let mut flying: Vec<(Ticket, GlobalCall)> = Vec::new();
    let (mut granted, mut refused) = (0, 0);

    for (step, op) in case.ops.iter().enumerate() {
        let at = |clock: &ManualClock| clock.now().as_millis();
        match *op {
            Op::Advance(ms) => {
                let target = clock.now() + Duration::from_millis(ms);
                // Calls end before MAX_CALL (the HTTP timeout bounds them):
                // complete the overdue ones just before, oldest first.
                flying.sort_by_key(|(t, _)| t.admitted());
                while flying
                    .first()
                    .is_some_and(|(t, _)| t.admitted() + MAX_CALL <= target)
                {
                    let (ticket, call) = flying.remove(0);
                    let end = ticket.admitted() + MAX_CALL - Duration::from_millis(1);
                    clock.set(end.max(clock.now()));
                    limiter.complete(ticket, Now::of(&clock), Some(1));
                    gate.complete(call, &success()).await;
                }
                clock.set(target);
            }
            Op::Admit(tokens) => {
                let now = Now::of(&clock);
                let local = limiter.admit(now, tokens);
                let global = gate
                    .admit(&id, tokens, false)
                    .await
                    .map_err(|e| e.to_string())?;
                match (local, global) {
                    (Ok(ticket), Admit::Granted(call)) => {
                        granted += 1;
                        flying.push((ticket, call));
                    }
                    (Err(refusal), Admit::Wait { wait, limit }) => {
                        refused += 1;
                        // The gate's wait is a lower bound of the exact one.
                        if let Refusal::Until { until, .. } = refusal {
                            let exact = until - now.mono;
                            if wait > exact {
                                return Err(format!(
                                    "step {step} (t={} ms, {op:?}): the gate waits {wait:?} ({limit:?}), \
                                     more than the limiter's {exact:?} ({refusal})",
                                    at(&clock)
                                ));
                            }
                        }
                    }
                    (local, global) => {
                        return Err(format!(
                            "step {step} (t={} ms, {op:?}): limiter {}, gate {global:?}",
                            at(&clock),
                            match local {
                                Ok(_) => "admits".to_string(),
                                Err(r) => format!("refuses ({r})"),
                            }
                        ))
                    }
                }
            }
            Op::Complete(i) | Op::Cancel(i) => {
                if flying.is_empty() {
                    continue;
                }
                let (ticket, call) = flying.remove(i % flying.len());
                if matches!(op, Op::Cancel(_)) {
                    limiter.cancel(ticket, Now::of(&clock));
                    gate.complete(call, &Fate::NotSent).await;
                } else {
                    let tokens = ticket.tokens();
                    limiter.complete(ticket, Now::of(&clock), Some(tokens));
                    gate.complete(call, &success()).await;
                }
            }
        }
        // Both count the same calls and tokens in the window.
        let usage = limiter.usage(Now::of(&clock));
        let state = gate.state(&id).await.map_err(|e| e.to_string())?;
        if (usage.window_requests, usage.window_tokens) != (state.window_calls, state.window_tokens)
        {
            return Err(format!(
                "after step {step} (t={} ms, {op:?}): the limiter counts {} calls / {} tokens, \
                 the gate {} / {}",
                at(&clock),
                usage.window_requests,
                usage.window_tokens,
                state.window_calls,
                state.window_tokens
            ));
        }
    }
    // Leave no call to complete itself in the background after the flush.
    for (ticket, call) in flying {
        limiter.complete(ticket, Now::of(&clock), Some(1));
        gate.complete(call, &success()).await;
    }
    Ok((granted, refused))
}

/// Drops events while the case still fails: the smallest failing sequence.
async fn shrink(conn: &ConnectionManager, mut case: Case) -> (Case, String) {
    let mut why = run(conn, &case).await.expect_err("a failing case");
    let mut i = 0;
    while i < case.ops.len() {
        let mut smaller = case.clone();
        smaller.ops.remove(i);
        match run(conn, &smaller).await {
            Err(e) => {
                case = smaller;
                why = e;
            }
            Ok(_) => i += 1,
        }
    }
    (case, why)
}

async fn connect(redis: &RedisServer) -> ConnectionManager {
    redis::Client::open(redis.url())
        .expect("redis url")
        .get_connection_manager()
        .await
        .expect("redis connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lua_gate_and_the_rust_limiter_admit_the_same_calls() {
    let redis = RedisServer::start();
    let conn = connect(&redis).await;
    let seeds: Vec<u64> = match std::env::var("GATE_VS_LIMITER_SEED") {
        Ok(s) => vec![s.parse().expect("GATE_VS_LIMITER_SEED is a number")],
        Err(_) => (0..CASES).collect(),
    };
    let (mut granted, mut refused, mut accounts) = (0, 0, 0);
    for &seed in &seeds {
        let case = generate(seed);
        accounts += u64::from(case.account);
        match run(&conn, &case).await {
            Ok((g, r)) => {
                granted += g;
                refused += r;
            }
            Err(first) => {
                let (min, why) = shrink(&conn, case).await;
                panic!(
                    "seed {}: {first}\nshrunk to rpm={:?} tpm={:?} window={} ms account={}, ops {:?}:\n{why}",
                    min.seed, min.rpm, min.tpm, min.window_ms, min.account, min.ops
                );
            }
        }
    }
    // The cases exercised both answers, plenty of each, and both kinds of key.
    if seeds.len() > 1 {
        assert!(
            granted > 1_000 && refused > 500 && accounts > 20,
            "only {granted} grants, {refused} refusals, {accounts} accounts"
        );
    }
    eprintln!(
        "{} cases ({accounts} of an account): {granted} grants, {refused} refusals, all agreed",
        seeds.len()
    );
}

/// Regression (found by the property test): a call given back unsent frees
/// its slot in both windows, but the gate's refusal cache kept answering the
/// RPM "wait" it had cached just before, refusing a call both windows admit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_back_unsent_frees_its_slot_in_the_gate_at_once() {
    let redis = RedisServer::start();
    let conn = connect(&redis).await;
    let case = Case {
        seed: 0,
        rpm: Some(2),
        tpm: None,
        window_ms: 1_000,
        account: false,
        // Two calls fill the window, the third is refused (and cached), the
        // first is given back unsent, the fourth fits again.
        ops: vec![
            Op::Admit(41),
            Op::Admit(37),
            Op::Admit(36),
            Op::Cancel(0),
            Op::Admit(25),
        ],
    };
    assert_eq!(run(&conn, &case).await, Ok((3, 1)));
}

/// Without the test clock the scripts read Redis `TIME`, as in production:
/// the optional "now" argument changes nothing when it is absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_test_clock_the_gate_keeps_redis_time() {
    let redis = RedisServer::start();
    let conn = connect(&redis).await;
    let case = Case {
        seed: 0,
        rpm: Some(1),
        tpm: Some(100),
        window_ms: 60_000,
        account: false,
        ops: vec![],
    };
    let (config, ring, _) = setup(&case);
    let id = KeyId::new("g", 1);
    let gate = GlobalGate::new(conn, "prod", &config, &ring);
    let Admit::Granted(call) = gate.admit(&id, 30, false).await.expect("redis") else {
        panic!("the first call is admitted");
    };
    assert!(call.is_probe(), "an unproven key's first call is its probe");
    gate.complete(call, &success()).await;
    let state = gate.state(&id).await.expect("redis");
    assert!(state.proven);
    assert_eq!((state.window_calls, state.window_tokens), (1, 30));
    match gate.admit(&id, 30, false).await.expect("redis") {
        // Completed just now on the server's clock: it leaves a window later.
        Admit::Wait { wait, .. } => assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
            "{wait:?}"
        ),
        other => panic!("the window is full: {other:?}"),
    }
}
