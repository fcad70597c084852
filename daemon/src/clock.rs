//! Time as a dependency. Limiters, cooldowns and the spill policy read time
//! through [`Clock`], so tests drive it with [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A monotonic clock plus wall time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Monotonic time since an arbitrary, fixed origin.
    fn now(&self) -> Duration;
    /// Unix milliseconds (for persisted deadlines and daily counters).
    fn unix_ms(&self) -> u64;
}

/// The real clock.
#[derive(Debug, Clone)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn unix_ms(&self) -> u64 {
        unix_ms_now()
    }
}

/// The wall clock in Unix milliseconds (0 before 1970), for code that has
/// no [`Clock`] at hand: heartbeats, log throttles, queue timestamps.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Monotonic milliseconds since `epoch`, plus one: never 0, so that an
/// atomic holding 0 can mean "never" (last PING answered, last activity).
pub fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// A clock that only moves when told to.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
    unix_base_ms: u64,
}

impl ManualClock {
    /// Starts at monotonic zero and the given Unix time.
    pub fn new(unix_base_ms: u64) -> ManualClock {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(0)),
            unix_base_ms,
        }
    }

    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, to: Duration) {
        self.nanos.store(to.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }

    fn unix_ms(&self) -> u64 {
        self.unix_base_ms + self.now().as_millis() as u64
    }
}

pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now(), Duration::ZERO);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now(), Duration::from_millis(1500));
        assert_eq!(c.unix_ms(), 2_500);
    }

    #[test]
    fn helpers_read_the_real_clocks() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let now = unix_ms_now();
        assert!(now >= before && now - before < 60_000, "{before} {now}");
        assert!(SystemClock::default().unix_ms() >= now);
        let epoch = Instant::now();
        assert!(ms_since(epoch) >= 1, "never 0");
        assert!(ms_since(epoch - Duration::from_secs(2)) >= 2_001);
    }
}
