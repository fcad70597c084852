//! The token-bucket shape: governor's GCRA, with burst `limit` refilled at
//! `limit` per window, for upstreams that document a bucket (Anthropic).
//!
//! Two adapters make governor fit the limiter's explicit-time, peekable API:
//! a clock the limiter *sets* to the `now` it was given (so time comes from
//! our [`Clock`](crate::clock::Clock), drivable in tests), and a state store
//! with a dry-run switch (so `check` can ask without consuming a cell).

use super::rolling::Block;
use governor::clock::Clock as GovClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A governor clock that reads the time the limiter last set.
#[derive(Debug, Default)]
struct SetClock(AtomicU64);

impl SetClock {
    fn set(&self, now: Duration) {
        self.0.store(
            now.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }
}

impl GovClock for SetClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// GCRA state (the theoretical arrival time, in nanoseconds since the
/// limiter's start) with a dry-run switch.
#[derive(Debug, Default)]
struct Tat {
    nanos: AtomicU64,
    dry: AtomicBool,
}

#[derive(Debug, Clone, Default)]
struct TatStore(Arc<Tat>);

impl StateStore for TatStore {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let prev = self.0.nanos.load(Ordering::Relaxed);
        let (out, next) = f((prev != 0).then(|| Nanos::new(prev)))?;
        if !self.0.dry.load(Ordering::Relaxed) {
            self.0.nanos.store(next.as_u64(), Ordering::Relaxed);
        }
        Ok(out)
    }
}

type Gcra = RateLimiter<NotKeyed, TatStore, SetClock, NoOpMiddleware<Duration>>;

pub(crate) struct Bucket {
    limit: u64,
    window: Duration,
    /// The limiter's origin on our clock (the GCRA state is relative to it).
    start: Duration,
    gcra: Gcra,
    tat: TatStore,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .field("tat_ns", &self.tat.0.nanos.load(Ordering::Relaxed))
            .finish()
    }
}

/// Burst `limit` (at most u32::MAX cells), one cell back every `window / limit`.
fn quota(limit: u64, window: Duration) -> Quota {
    let burst = limit.clamp(1, u32::MAX as u64) as u32;
    let period = (window / burst).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

impl Bucket {
    pub(crate) fn new(limit: u64, window: Duration, now: Duration) -> Bucket {
        let clock = SetClock::default();
        clock.set(now);
        let tat = TatStore::default();
        Bucket {
            limit,
            window,
            start: now,
            gcra: RateLimiter::new(quota(limit, window), tat.clone(), clock),
            tat,
        }
    }

    fn run(&self, now: Duration, weight: u64, dry: bool) -> Result<(), Block> {
        if weight == 0 {
            return Ok(());
        }
        if weight > self.limit.max(1) {
            return Err(Block::Never(self.limit));
        }
        let n = NonZeroU32::new(weight.min(u32::MAX as u64) as u32).unwrap_or(NonZeroU32::MIN);
        self.gcra.clock().set(now.max(self.start));
        self.tat.0.dry.store(dry, Ordering::Relaxed);
        let out = self.gcra.check_n(n);
        self.tat.0.dry.store(false, Ordering::Relaxed);
        match out {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Block::Until(now + not_until.wait_time_from(now))),
            Err(_) => Err(Block::Never(self.limit)),
        }
    }

    /// Whether `weight` cells conform at `now`, without taking them.
    pub(crate) fn check(&self, now: Duration, weight: u64) -> Result<(), Block> {
        self.run(now, weight, true)
    }

    /// Takes `weight` cells if they conform at `now`.
    pub(crate) fn take(&self, now: Duration, weight: u64) -> Result<(), Block> {
        self.run(now, weight, false)
    }

    /// Cells in use at `now` (how far the bucket is from full), for usage bars.
    pub(crate) fn used(&self, now: Duration) -> u64 {
        let tat = self.tat.0.nanos.load(Ordering::Relaxed);
        let t0 = now.saturating_sub(self.start).as_nanos() as u64;
        let period = self.gcra_period().as_nanos().max(1) as u64;
        tat.saturating_sub(t0).div_ceil(period).min(self.limit)
    }

    fn gcra_period(&self) -> Duration {
        quota(self.limit, self.window).replenish_interval()
    }

    /// A new limit (learned from the upstream): the debt carries over, rescaled.
    pub(crate) fn set_limit(&mut self, limit: u64, now: Duration) {
        if limit == self.limit {
            return;
        }
        let old_period = self.gcra_period().as_nanos().max(1);
        let tat = self.tat.0.nanos.load(Ordering::Relaxed) as u128;
        let t0 = now.saturating_sub(self.start).as_nanos();
        let clock = SetClock::default();
        clock.set(self.start);
        self.limit = limit;
        self.gcra = RateLimiter::new(quota(limit, self.window), self.tat.clone(), clock);
        if tat > t0 {
            let new_period = self.gcra_period().as_nanos().max(1);
            let debt = (tat - t0) * new_period / old_period;
            let new_tat = (t0 + debt).min(u64::MAX as u128) as u64;
            self.tat.0.nanos.store(new_tat, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_peeks_and_take_consumes() {
        let b = Bucket::new(2, Duration::from_secs(60), Duration::ZERO);
        for _ in 0..5 {
            assert_eq!(b.check(Duration::ZERO, 2), Ok(()));
        }
        assert_eq!(b.take(Duration::ZERO, 2), Ok(()));
        assert_eq!(
            b.check(Duration::ZERO, 1),
            Err(Block::Until(Duration::from_secs(30)))
        );
        assert_eq!(b.check(Duration::ZERO, 3), Err(Block::Never(2)));
        assert_eq!(b.used(Duration::ZERO), 2);
    }
}
