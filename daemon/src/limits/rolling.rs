//! The exact rolling window: at most `limit` units (requests or tokens) in
//! ANY window of length `window`.
//!
//! Each admitted call *reserves* its weight; while the call is in flight
//! that weight counts as occupying the window "now". When the call
//! completes, its weight is stamped with the completion time (never earlier
//! than its admission) and leaves the window `window` after that stamp.
//! Completion times are non-decreasing on a monotonic clock, so the log of
//! completed entries stays sorted and expiry is a pop from the front.

use std::collections::VecDeque;
use std::time::Duration;

/// Why a weight does not fit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    /// Not before this clock time (a lower bound).
    Until(Duration),
    /// Never: the weight alone is over the limit.
    Never(u64),
}

#[derive(Debug, Clone)]
pub(crate) struct RollingLog {
    limit: u64,
    window: Duration,
    /// Weight reserved by calls not yet completed.
    in_flight: u64,
    /// Completed entries `(stamp, weight)`, sorted by stamp.
    done: VecDeque<(Duration, u64)>,
    done_sum: u64,
}

impl RollingLog {
    pub(crate) fn new(limit: u64, window: Duration) -> RollingLog {
        RollingLog {
            limit,
            window,
            in_flight: 0,
            done: VecDeque::new(),
            done_sum: 0,
        }
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    pub(crate) fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Drops entries whose window has passed: a stamp `s` counts while `now < s + window`.
    fn purge(&mut self, now: Duration) {
        while let Some(&(stamp, w)) = self.done.front() {
            if stamp + self.window <= now {
                self.done.pop_front();
                self.done_sum -= w;
            } else {
                break;
            }
        }
    }

    /// Weight occupying the window at `now` (in flight included).
    pub(crate) fn used(&mut self, now: Duration) -> u64 {
        self.purge(now);
        self.in_flight + self.done_sum
    }

    /// Whether `weight` more fits at `now`, else the earliest time it could.
    pub(crate) fn check(&mut self, now: Duration, weight: u64) -> Result<(), Block> {
        if weight > self.limit {
            return Err(Block::Never(self.limit));
        }
        let used = self.used(now);
        if used + weight <= self.limit {
            return Ok(());
        }
        // Free `need` units, oldest completed entries first. In-flight weight
        // is stamped no earlier than its completion (>= now), so it leaves
        // the window no earlier than `now + window`.
        let need = used + weight - self.limit;
        let mut freed = 0;
        for &(stamp, w) in &self.done {
            freed += w;
            if freed >= need {
                return Err(Block::Until(stamp + self.window));
            }
        }
        Err(Block::Until(now + self.window))
    }

    pub(crate) fn reserve(&mut self, weight: u64) {
        self.in_flight += weight;
    }

    /// Re-stamps a reservation with its completion time.
    pub(crate) fn complete(&mut self, weight: u64, admitted: Duration, now: Duration) {
        let weight = weight.min(self.in_flight);
        if weight == 0 {
            return;
        }
        self.in_flight -= weight;
        let mut stamp = now.max(admitted);
        if let Some(&(last, _)) = self.done.back() {
            stamp = stamp.max(last);
        }
        self.done.push_back((stamp, weight));
        self.done_sum += weight;
    }

    /// Gives a reservation back (the call was never sent).
    pub(crate) fn cancel(&mut self, weight: u64) {
        self.in_flight -= weight.min(self.in_flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_full_window_says_when_the_oldest_entry_leaves() {
        let mut log = RollingLog::new(2, s(60));
        log.reserve(1);
        log.complete(1, s(0), s(1));
        log.reserve(1);
        log.complete(1, s(5), s(7));
        assert_eq!(log.check(s(10), 1), Err(Block::Until(s(61))));
        assert_eq!(log.check(s(61), 1), Ok(()));
        assert_eq!(log.check(s(61), 2), Err(Block::Until(s(67))));
        assert_eq!(log.check(s(61), 3), Err(Block::Never(2)));
    }

    #[test]
    fn in_flight_weight_is_held_until_a_window_after_completion() {
        let mut log = RollingLog::new(1, s(60));
        log.reserve(1);
        assert_eq!(log.check(s(100), 1), Err(Block::Until(s(160))));
        log.cancel(1);
        assert_eq!(log.check(s(100), 1), Ok(()));
    }
}
