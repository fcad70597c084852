use super::*;
use crate::calendar::DAY_MS;
use crate::clock::ManualClock;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BinaryHeap;

/// 2024-05-01T00:00:00Z.
const BASE_MS: u64 = 1_714_521_600_000;
const W: Duration = Duration::from_secs(60);

fn at_ms(ms: u64) -> Now {
    Now {
        mono: Duration::from_millis(ms),
        unix_ms: BASE_MS + ms,
    }
}

fn at(secs: u64) -> Now {
    at_ms(secs * 1000)
}

fn limiter(limits: Limits, shape: LimitShape) -> LocalLimiter {
    LocalLimiter::new(
        LimiterConfig {
            limits,
            max_concurrent: None,
            window: W,
            shape,
            probation: false,
            daily_reset: DailyReset::default(),
        },
        at(0),
    )
}

fn rpm(n: u64) -> Limits {
    Limits {
        rpm: Some(n),
        ..Limits::default()
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn now_reads_the_clock_and_maps_between_mono_and_unix_time() {
    let clock = ManualClock::new(BASE_MS);
    clock.advance(secs(90));
    let now = Now::of(&clock);
    assert_eq!(now, at(90));
    assert_eq!(now.unix_ms_at(secs(100)), BASE_MS + 100_000);
    assert_eq!(now.mono_at(BASE_MS + 30_000), secs(30));
    assert_eq!(now.utc_day(), BASE_MS / DAY_MS);
}

#[test]
fn rolling_window_admits_exactly_n_in_any_window_with_instant_calls() {
    let n = 5;
    let mut l = limiter(rpm(n), LimitShape::Rolling);
    let mut admitted = Vec::new();
    // Demand every 50 ms for 5 minutes; each call completes at once.
    for ms in (0..300_000).step_by(50) {
        if let Ok(t) = l.admit(at_ms(ms), 0) {
            admitted.push(ms);
            l.complete(t, at_ms(ms), None);
        }
    }
    for (i, &start) in admitted.iter().enumerate() {
        let in_window = admitted[i..]
            .iter()
            .take_while(|&&t| t < start + 60_000)
            .count() as u64;
        assert!(in_window <= n, "{in_window} in the window from {start} ms");
    }
    // Saturated demand: exactly N per window, one window after another.
    let expected: Vec<u64> = (0..5u64)
        .flat_map(|k| (0..n).map(move |i| k * 60_000 + i * 50))
        .collect();
    assert_eq!(admitted, expected);
}

/// Random arrivals and latencies; the upstream stamps each call at a random
/// instant between our admission and our completion. Whatever the skew, the
/// upstream never sees N+1 calls in one window.
#[test]
fn rolling_window_never_lets_n_plus_one_into_any_upstream_window() {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(1..8u64);
        let mut l = limiter(rpm(n), LimitShape::Rolling);
        // Completions pending: (Reverse(completion ms), ticket index).
        let mut pending: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = BinaryHeap::new();
        let mut tickets: Vec<Option<Ticket>> = Vec::new();
        let mut upstream_stamps = Vec::new();
        let mut t = 0u64;
        let mut admitted = 0u64;
        while t < 600_000 {
            t += rng.random_range(0..3_000);
            while let Some(std::cmp::Reverse((c, i))) = pending.peek().copied() {
                if c > t {
                    break;
                }
                pending.pop();
                if let Some(ticket) = tickets[i].take() {
                    l.complete(ticket, at_ms(c), None);
                }
            }
            match l.admit(at_ms(t), 0) {
                Ok(ticket) => {
                    admitted += 1;
                    let latency = rng.random_range(0..4_000u64);
                    upstream_stamps.push(t + rng.random_range(0..=latency));
                    tickets.push(Some(ticket));
                    pending.push(std::cmp::Reverse((t + latency, tickets.len() - 1)));
                }
                Err(Refusal::Until { until, kind }) => {
                    assert_eq!(kind, LimitKind::Rpm);
                    assert!(until > Duration::from_millis(t), "seed {seed}");
                }
                Err(other) => panic!("seed {seed}: unexpected {other:?}"),
            }
        }
        upstream_stamps.sort_unstable();
        for w in upstream_stamps.windows(n as usize + 1) {
            assert!(
                w[n as usize] - w[0] >= 60_000,
                "seed {seed}: {} calls within {} ms (limit {n})",
                n + 1,
                w[n as usize] - w[0]
            );
        }
        assert!(admitted >= 5 * n, "seed {seed}: only {admitted} admitted");
    }
}

#[test]
fn the_earliest_pass_time_given_is_exact() {
    let mut l = limiter(rpm(2), LimitShape::Rolling);
    let a = l.admit(at(0), 0).unwrap();
    l.complete(a, at(0), None);
    let b = l.admit(at(10), 0).unwrap();
    l.complete(b, at(10), None);
    let refusal = l.check(at(20), 0).unwrap_err();
    assert_eq!(
        refusal,
        Refusal::Until {
            until: secs(60),
            kind: LimitKind::Rpm
        }
    );
    assert!(l.check(at_ms(59_999), 0).is_err());
    assert!(l.check(at(60), 0).is_ok());
}

#[test]
fn completion_restamps_the_slot_for_skew_safety() {
    let mut l = limiter(rpm(1), LimitShape::Rolling);
    let t = l.admit(at(0), 0).unwrap();
    // In flight: occupied "now", so never free before now + window.
    assert_eq!(l.check(at(30), 0).unwrap_err().until(), Some(secs(90)));
    l.complete(t, at(10), None);
    // Stamped at completion (10 s), not admission (0 s).
    assert_eq!(l.check(at(60), 0).unwrap_err().until(), Some(secs(70)));
    assert!(l.check(at(70), 0).is_ok());
}

#[test]
fn token_bucket_admits_the_gcra_pattern() {
    let n = 3;
    let mut l = limiter(rpm(n), LimitShape::TokenBucket);
    let mut admitted = Vec::new();
    for ms in (0..60_000).step_by(100) {
        if let Ok(t) = l.admit(at_ms(ms), 0) {
            admitted.push(ms);
            l.complete(t, at_ms(ms), None);
        }
    }
    // Burst N at once, then one every window/N: 2N-1 in the first window.
    assert_eq!(admitted, vec![0, 100, 200, 20_000, 40_000]);
    assert_eq!(admitted.len() as u64, 2 * n - 1);
    let mut l = limiter(rpm(n), LimitShape::TokenBucket);
    for _ in 0..n {
        let _ = l.admit(at(0), 0).unwrap();
    }
    assert_eq!(
        l.check(at(0), 0),
        Err(Refusal::Until {
            until: secs(20),
            kind: LimitKind::Rpm
        })
    );
}

#[test]
fn token_bucket_tpm_takes_n_cells_and_refuses_more_than_the_burst() {
    let mut l = limiter(
        Limits {
            tpm: Some(600),
            ..Limits::default()
        },
        LimitShape::TokenBucket,
    );
    let _ = l.admit(at(0), 500).unwrap();
    // 100 left; 200 more needs 100 tokens back at 10 tokens/s.
    assert_eq!(
        l.check(at(0), 200),
        Err(Refusal::Until {
            until: secs(10),
            kind: LimitKind::Tpm
        })
    );
    assert!(l.check(at(0), 100).is_ok());
    assert!(matches!(
        l.check(at(0), 601),
        Err(Refusal::Never {
            kind: LimitKind::Tpm,
            limit: 600,
            asked: 601
        })
    ));
}

#[test]
fn tpm_is_charged_up_front() {
    let mut l = limiter(
        Limits {
            tpm: Some(1000),
            ..Limits::default()
        },
        LimitShape::Rolling,
    );
    let t = l.admit(at(0), 600).unwrap();
    // Charged at admission, before any usage is known.
    assert_eq!(l.usage(at(0)).window_tokens, 600);
    assert_eq!(
        l.check(at(1), 500),
        Err(Refusal::Until {
            until: secs(61),
            kind: LimitKind::Tpm
        })
    );
    assert!(l.check(at(1), 400).is_ok());
    assert_eq!(
        l.check(at(1), 1001),
        Err(Refusal::Never {
            kind: LimitKind::Tpm,
            limit: 1000,
            asked: 1001
        })
    );
    // The window keeps the charge even when the real usage was smaller.
    l.complete(t, at(2), Some(50));
    assert_eq!(l.usage(at(3)).window_tokens, 600);
    assert_eq!(l.check(at(3), 500).unwrap_err().until(), Some(secs(62)));
    assert!(l.check(at(62), 1000).is_ok());
}

#[test]
fn concurrency_cap_holds_until_a_completion() {
    let mut l = LocalLimiter::new(
        LimiterConfig {
            max_concurrent: Some(2),
            ..LimiterConfig::default()
        },
        at(0),
    );
    let a = l.admit(at(0), 10).unwrap();
    let _b = l.admit(at(0), 10).unwrap();
    assert_eq!(l.check(at(0), 10), Err(Refusal::Busy));
    assert_eq!(l.usage(at(0)).in_flight, 2);
    l.complete(a, at(1), None);
    assert!(l.admit(at(1), 10).is_ok());
}

#[test]
fn cancel_gives_a_rolling_slot_back() {
    let mut l = limiter(rpm(1), LimitShape::Rolling);
    let t = l.admit(at(0), 0).unwrap();
    assert!(l.check(at(0), 0).is_err());
    l.cancel(t, at(0));
    assert!(l.check(at(0), 0).is_ok());
    assert_eq!(l.usage(at(0)).day_requests, 0);
}

#[test]
fn upstream_remaining_zero_blocks_until_its_reset() {
    let mut l = limiter(rpm(100), LimitShape::Rolling);
    l.observe(
        &ObservedLimits {
            requests_remaining: Some(0),
            requests_reset_ms: Some(5_000),
            ..ObservedLimits::default()
        },
        at(10),
    );
    assert_eq!(
        l.check(at(10), 1),
        Err(Refusal::Until {
            until: secs(15),
            kind: LimitKind::UpstreamRequests
        })
    );
    assert!(l.check(at(15), 1).is_ok());
    // Tokens: no reset given, so one window.
    l.observe(
        &ObservedLimits {
            tokens_remaining: Some(0),
            ..ObservedLimits::default()
        },
        at(20),
    );
    assert_eq!(l.check(at(20), 1).unwrap_err().until(), Some(secs(80)));
    assert!(l.check(at(80), 1).is_ok());
    // A positive remaining count blocks nothing.
    l.observe(
        &ObservedLimits {
            requests_remaining: Some(3),
            requests_reset_ms: Some(60_000),
            ..ObservedLimits::default()
        },
        at(80),
    );
    assert!(l.check(at(80), 1).is_ok());
}

#[test]
fn a_stricter_upstream_limit_is_adopted_and_a_looser_one_ignored() {
    let mut l = limiter(
        Limits {
            rpm: Some(10),
            tpm: Some(10_000),
            ..Limits::default()
        },
        LimitShape::Rolling,
    );
    let t = l.admit(at(0), 100).unwrap();
    l.complete(t, at(0), None);
    l.observe(
        &ObservedLimits {
            requests_limit: Some(2),
            tokens_limit: Some(50_000),
            ..ObservedLimits::default()
        },
        at(1),
    );
    let eff = l.usage(at(1)).limits;
    assert_eq!((eff.rpm, eff.tpm), (Some(2), Some(10_000)));
    // History is kept: one of the two slots is already used.
    let t = l.admit(at(1), 100).unwrap();
    l.complete(t, at(1), None);
    assert_eq!(l.check(at(2), 100).unwrap_err().until(), Some(secs(60)));
    // A learned limit can appear where none was configured.
    let mut l = limiter(Limits::default(), LimitShape::TokenBucket);
    l.observe(
        &ObservedLimits {
            tokens_limit: Some(300),
            ..ObservedLimits::default()
        },
        at(0),
    );
    assert!(matches!(
        l.check(at(0), 301),
        Err(Refusal::Never {
            kind: LimitKind::Tpm,
            ..
        })
    ));
}

#[test]
fn token_bucket_keeps_its_debt_when_the_limit_tightens() {
    let mut l = limiter(rpm(4), LimitShape::TokenBucket);
    for _ in 0..4 {
        let _ = l.admit(at(0), 0).unwrap();
    }
    l.observe(
        &ObservedLimits {
            requests_limit: Some(2),
            ..ObservedLimits::default()
        },
        at(0),
    );
    // 4 cells used, now draining at one per 30 s: room for one more once
    // 3 have drained, at 90 s.
    assert_eq!(l.check(at(0), 0).unwrap_err().until(), Some(secs(90)));
    assert!(l.check(at(89), 0).is_err());
    assert!(l.check(at(90), 0).is_ok());
}

#[test]
fn daily_caps_roll_over_at_utc_midnight() {
    // 23:59:00 UTC.
    let start = BASE_MS + DAY_MS - 60_000;
    let now = |s: u64| Now {
        mono: secs(s),
        unix_ms: start + s * 1000,
    };
    let mut l = LocalLimiter::new(
        LimiterConfig {
            limits: Limits {
                rpd: Some(2),
                tpd: Some(1_000),
                ..Limits::default()
            },
            ..LimiterConfig::default()
        },
        now(0),
    );
    let a = l.admit(now(0), 100).unwrap();
    let _b = l.admit(now(1), 100).unwrap();
    assert_eq!(
        l.check(now(2), 100),
        Err(Refusal::Until {
            until: secs(60),
            kind: LimitKind::Rpd
        })
    );
    assert_eq!(
        l.check(now(2), 1_001),
        Err(Refusal::Never {
            kind: LimitKind::Tpd,
            limit: 1_000,
            asked: 1_001
        })
    );
    assert!(l.check(now(59), 100).is_err());
    assert!(l.check(now(60), 100).is_ok());
    // A completion from yesterday does not touch today's count.
    l.complete(a, now(61), Some(5));
    let u = l.usage(now(61));
    assert_eq!((u.day_requests, u.day_tokens), (0, 0));
}

#[test]
fn daily_tokens_are_corrected_to_real_usage_and_restored_counts_add_up() {
    let mut l = LocalLimiter::new(
        LimiterConfig {
            limits: Limits {
                tpd: Some(1_000),
                ..Limits::default()
            },
            ..LimiterConfig::default()
        },
        at(0),
    );
    l.restore_daily(at(0), 3, 400);
    let t = l.admit(at(0), 500).unwrap();
    assert_eq!(l.usage(at(0)).day_tokens, 900);
    assert_eq!(l.check(at(0), 200).unwrap_err().until(), Some(secs(86_400)));
    l.complete(t, at(1), Some(120));
    let u = l.usage(at(1));
    assert_eq!((u.day_requests, u.day_tokens), (4, 520));
    assert!(l.check(at(1), 480).is_ok());
}

#[test]
fn reconfigure_keeps_rolling_history_and_rebuilds_on_a_new_shape() {
    let mut l = limiter(rpm(3), LimitShape::Rolling);
    for _ in 0..2 {
        let t = l.admit(at(0), 0).unwrap();
        l.complete(t, at(0), None);
    }
    let mut cfg = l.config().clone();
    cfg.limits.rpm = Some(2);
    l.reconfigure(cfg.clone(), at(1));
    assert!(l.check(at(1), 0).is_err());
    cfg.shape = LimitShape::TokenBucket;
    l.reconfigure(cfg, at(1));
    assert!(l.check(at(1), 0).is_ok());
}

#[test]
fn unlimited_keys_always_pass() {
    let mut l = LocalLimiter::new(LimiterConfig::default(), at(0));
    for i in 0..1000 {
        let t = l.admit(at(0), 1_000_000).unwrap();
        if i % 2 == 0 {
            l.complete(t, at(0), None);
        } else {
            l.cancel(t, at(0));
        }
    }
    assert_eq!(l.usage(at(0)).in_flight, 0);
}

#[test]
fn an_unproven_key_takes_one_call_at_a_time_until_its_first_success() {
    let mut l = LocalLimiter::new(
        LimiterConfig {
            max_concurrent: Some(5),
            probation: true,
            ..LimiterConfig::default()
        },
        at(0),
    );
    let first = l.admit(at(0), 10).unwrap();
    // A burst cannot pile onto a key whose fate is unknown.
    assert_eq!(l.check(at(0), 10), Err(Refusal::Busy));
    // A failed call (no usage) does not prove the key.
    l.complete(first, at(1), None);
    let second = l.admit(at(1), 10).unwrap();
    assert_eq!(l.check(at(1), 10), Err(Refusal::Busy));
    // A success does: the configured cap applies from then on.
    l.complete(second, at(2), Some(12));
    let held: Vec<_> = (0..5).map(|_| l.admit(at(2), 10).unwrap()).collect();
    assert_eq!(held.len(), 5);
    assert_eq!(l.check(at(2), 10), Err(Refusal::Busy));
}

/// Unix ms of an RFC 3339 instant.
fn unix(s: &str) -> u64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64
}

/// A limiter of `rpd` calls a day on `reset`'s calendar, driven by a
/// `ManualClock` that starts at `start`.
fn daily_limiter(rpd: u64, reset: &str, start: u64) -> (ManualClock, LocalLimiter) {
    let clock = ManualClock::new(start);
    let l = LocalLimiter::new(
        LimiterConfig {
            limits: Limits {
                rpd: Some(rpd),
                ..Limits::default()
            },
            daily_reset: DailyReset::parse(reset).unwrap(),
            ..LimiterConfig::default()
        },
        Now::of(&clock),
    );
    (clock, l)
}

/// Admits and completes calls until the limiter refuses; how many passed.
fn fill(l: &mut LocalLimiter, clock: &ManualClock) -> u64 {
    let mut n = 0;
    while let Ok(t) = l.admit(Now::of(clock), 1) {
        l.complete(t, Now::of(clock), Some(1));
        n += 1;
    }
    n
}

#[test]
fn rpd_rolls_over_at_pacific_midnight_not_utc_midnight() {
    // 2024-01-15 20:00 PST = 2024-01-16T04:00Z.
    let (clock, mut l) =
        daily_limiter(3, "00:00 America/Los_Angeles", unix("2024-01-16T04:00:00Z"));
    assert_eq!(fill(&mut l, &clock), 3);
    // The refusal says: until the next Pacific midnight (08:00Z), 4 h on.
    assert_eq!(
        l.check(Now::of(&clock), 1),
        Err(Refusal::Until {
            until: secs(4 * 3600),
            kind: LimitKind::Rpd
        })
    );
    // UTC midnight has passed (the clock started after it) and an hour
    // later still nothing passes: it is 21:00 in Los Angeles.
    clock.advance(secs(3600));
    assert!(l.check(Now::of(&clock), 1).is_err());
    // One ms before Pacific midnight: still the same day.
    clock.set(secs(4 * 3600) - Duration::from_millis(1));
    assert!(l.check(Now::of(&clock), 1).is_err());
    assert_eq!(l.usage(Now::of(&clock)).day_requests, 3);
    // Pacific midnight: a new day, a new allowance.
    clock.set(secs(4 * 3600));
    assert_eq!(l.usage(Now::of(&clock)).day_requests, 0);
    assert_eq!(fill(&mut l, &clock), 3);
}

#[test]
fn the_same_limiter_on_utc_rolls_over_at_utc_midnight() {
    let (clock, mut l) = daily_limiter(3, "00:00 UTC", unix("2024-01-15T23:00:00Z"));
    assert_eq!(fill(&mut l, &clock), 3);
    assert_eq!(
        l.check(Now::of(&clock), 1).unwrap_err().until(),
        Some(secs(3600))
    );
    clock.advance(secs(3600));
    assert_eq!(fill(&mut l, &clock), 3);
}

#[test]
fn rpd_on_dst_transition_days_lasts_the_local_day() {
    // 2024-03-10 in Los Angeles has 23 hours: 08:00Z to 07:00Z next day.
    let (clock, mut l) =
        daily_limiter(2, "00:00 America/Los_Angeles", unix("2024-03-10T08:00:00Z"));
    assert_eq!(fill(&mut l, &clock), 2);
    assert_eq!(
        l.check(Now::of(&clock), 1).unwrap_err().until(),
        Some(secs(23 * 3600)),
        "a 23-hour day"
    );
    clock.set(secs(23 * 3600));
    assert_eq!(fill(&mut l, &clock), 2, "PDT midnight, 07:00Z");
    // 2024-11-03 has 25 hours: 07:00Z to 08:00Z next day.
    let (clock, mut l) =
        daily_limiter(2, "00:00 America/Los_Angeles", unix("2024-11-03T07:00:00Z"));
    assert_eq!(fill(&mut l, &clock), 2);
    clock.set(secs(24 * 3600));
    assert!(
        l.check(Now::of(&clock), 1).is_err(),
        "24 h on it is 23:00 PST, still Nov 3"
    );
    clock.set(secs(25 * 3600));
    assert_eq!(fill(&mut l, &clock), 2);
}

#[test]
fn tickets_carry_the_provider_day() {
    let reset = DailyReset::parse("00:00 America/Los_Angeles").unwrap();
    let t0 = unix("2024-01-16T04:00:00Z");
    let (clock, mut l) = daily_limiter(10, "00:00 America/Los_Angeles", t0);
    let t = l.admit(Now::of(&clock), 1).unwrap();
    assert_eq!(t.day(), reset.day_of(t0));
    assert_eq!(crate::calendar::day_string(t.day()), "2024-01-15");
    l.cancel(t, Now::of(&clock));
}

fn account_cfg(limits: Limits, max_concurrent: Option<u32>) -> LimiterConfig {
    LimiterConfig {
        limits,
        max_concurrent,
        window: W,
        probation: true,
        ..LimiterConfig::default()
    }
}

#[test]
fn keys_of_one_account_share_its_window_and_day() {
    let quota = SharedQuota::new(
        account_cfg(
            Limits {
                rpm: Some(10),
                rpd: Some(15),
                ..Limits::default()
            },
            None,
        ),
        at(0),
    );
    let mut a = LocalLimiter::sharing(account_cfg(Limits::default(), Some(8)), &quota);
    let mut b = LocalLimiter::sharing(account_cfg(Limits::default(), Some(8)), &quota);
    // Prove both keys (probation is per key).
    for l in [&mut a, &mut b] {
        let t = l.admit(at(0), 0).unwrap();
        l.complete(t, at(0), Some(0));
    }
    let mut admitted = 2;
    let mut tickets = Vec::new();
    for i in 0.. {
        let l = if i % 2 == 0 { &mut a } else { &mut b };
        match l.admit(at(1), 0) {
            Ok(t) => {
                admitted += 1;
                tickets.push((i % 2, t));
            }
            Err(r) => {
                assert_eq!(r.until(), Some(secs(60)), "{r}");
                break;
            }
        }
    }
    assert_eq!(admitted, 10, "10 per window between the two keys");
    assert!(b.check(at(1), 0).is_err() && a.check(at(1), 0).is_err());
    let ua = a.usage(at(1));
    let ub = b.usage(at(1));
    assert_eq!((ua.window_requests, ub.window_requests), (10, 10));
    assert_eq!((ua.in_flight, ub.in_flight), (4, 4), "in flight is per key");
    for (k, t) in tickets {
        let l = if k == 0 { &mut a } else { &mut b };
        l.complete(t, at(2), Some(0));
    }
    // The next window: the day's cap of 15 leaves 5 for both together.
    let mut more = 0;
    while a.admit(at(62), 0).is_ok() {
        more += 1;
    }
    while b.admit(at(62), 0).is_ok() {
        more += 1;
    }
    assert_eq!(more, 5);
    assert_eq!(a.check(at(62), 0).unwrap_err().until(), Some(secs(86_400)));
}

#[test]
fn concurrency_and_probation_stay_per_key_on_a_shared_quota() {
    let quota = SharedQuota::new(account_cfg(rpm(100), None), at(0));
    let mut a = LocalLimiter::sharing(account_cfg(Limits::default(), Some(1)), &quota);
    let mut b = LocalLimiter::sharing(account_cfg(Limits::default(), Some(1)), &quota);
    // Both unproven: one call each, at the same time.
    let ta = a.admit(at(0), 0).unwrap();
    assert_eq!(a.check(at(0), 0), Err(Refusal::Busy));
    let tb = b.admit(at(0), 0).unwrap();
    a.complete(ta, at(1), Some(0));
    b.cancel(tb, at(1));
    // A is proven, its cap of 1 holds; b is still on probation.
    let _ta = a.admit(at(1), 0).unwrap();
    assert_eq!(a.check(at(1), 0), Err(Refusal::Busy));
    assert!(b.check(at(1), 0).is_ok());
    // Learned limits are the account's.
    a.observe(
        &ObservedLimits {
            requests_limit: Some(2),
            ..Default::default()
        },
        at(1),
    );
    assert_eq!(b.effective_limits().rpm, Some(2));
}

#[test]
fn an_account_gets_the_strictest_of_its_keys_limits() {
    use crate::keys::{ApiKey, KeyId};
    let provider = ProviderConfig {
        limits: Limits {
            rpm: Some(30),
            tpm: Some(6000),
            ..Limits::default()
        },
        ..ProviderConfig::default()
    };
    let mut k1 = ApiKey::new(KeyId::new("p", 1), Some("test-key-one-000".into()), "t");
    k1.limits.tpm = Some(1000);
    let mut k2 = ApiKey::new(KeyId::new("p", 2), Some("test-key-two-000".into()), "t");
    k2.limits.rpd = Some(50);
    k2.limits.rpm = Some(40);
    let cfg = LimiterConfig::for_account(&provider, [&k1, &k2]);
    assert_eq!(
        cfg.limits,
        Limits {
            rpm: Some(30),
            tpm: Some(1000),
            rpd: Some(50),
            tpd: None
        }
    );
    assert_eq!(cfg.max_concurrent, None);
}

#[test]
fn a_key_moves_between_its_own_quota_and_an_accounts() {
    let quota = SharedQuota::new(account_cfg(rpm(1), None), at(0));
    let mut l = LocalLimiter::new(
        LimiterConfig {
            probation: false,
            ..account_cfg(rpm(5), None)
        },
        at(0),
    );
    assert!(!l.is_shared());
    l.share(Some(&quota), at(0));
    assert!(l.is_shared());
    let t = l.admit(at(0), 0).unwrap();
    l.complete(t, at(0), None);
    assert!(l.check(at(0), 0).is_err(), "the account's rpm of 1");
    l.share(None, at(0));
    assert!(!l.is_shared());
    assert!(l.check(at(0), 0).is_ok(), "its own, fresh quota of 5");
}
