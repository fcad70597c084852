//! The exact rolling window: at most `rpm` calls and `tpm` tokens in ANY
//! window of length `window`, kept in one log of `(stamp, tokens)`.
//!
//! Each admitted call *reserves* one request and its tokens; while the call
//! is in flight they count as occupying the window "now". When the call
//! completes it is stamped with the completion time (never earlier than its
//! admission) and leaves the window `window` after that stamp. Completion
//! times are non-decreasing on a monotonic clock, so the log stays sorted and
//! expiry is a pop from the front.

use std::collections::VecDeque;
use std::time::Duration;

/// Why a call does not fit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    /// Not before this clock time (a lower bound).
    Until(Duration),
    /// Never: the call alone is over the limit.
    Never(u64),
}

#[derive(Debug, Clone)]
pub(crate) struct RollingLog {
    rpm: Option<u64>,
    tpm: Option<u64>,
    window: Duration,
    /// Calls and tokens reserved by calls not yet completed.
    in_flight: u64,
    in_flight_tokens: u64,
    /// Completed calls `(stamp, tokens)`, sorted by stamp.
    done: VecDeque<(Duration, u64)>,
    done_tokens: u64,
}

impl RollingLog {
    pub(crate) fn new(rpm: Option<u64>, tpm: Option<u64>, window: Duration) -> RollingLog {
        RollingLog {
            rpm,
            tpm,
            window,
            in_flight: 0,
            in_flight_tokens: 0,
            done: VecDeque::new(),
            done_tokens: 0,
        }
    }

    pub(crate) fn set_limits(&mut self, rpm: Option<u64>, tpm: Option<u64>) {
        self.rpm = rpm;
        self.tpm = tpm;
    }

    /// Drops calls whose window has passed: a stamp `s` counts while `now < s + window`.
    fn purge(&mut self, now: Duration) {
        while let Some(&(stamp, tokens)) = self.done.front() {
            if stamp + self.window > now {
                break;
            }
            self.done.pop_front();
            self.done_tokens -= tokens;
        }
    }

    /// `(calls, tokens)` occupying the window at `now`, in flight included.
    pub(crate) fn used(&mut self, now: Duration) -> (u64, u64) {
        self.purge(now);
        (
            self.in_flight + self.done.len() as u64,
            self.in_flight_tokens + self.done_tokens,
        )
    }

    /// Whether one more call fits the request limit at `now`.
    pub(crate) fn check_requests(&mut self, now: Duration) -> Result<(), Block> {
        let Some(limit) = self.rpm else {
            return Ok(());
        };
        if limit == 0 {
            return Err(Block::Never(0));
        }
        let (used, _) = self.used(now);
        if used < limit {
            return Ok(());
        }
        // `need` completed calls must leave, oldest first. In-flight calls
        // are stamped no earlier than their completion (>= now), so they
        // leave no earlier than `now + window`.
        let need = (used - limit + 1) as usize;
        Err(Block::Until(match self.done.get(need - 1) {
            Some(&(stamp, _)) => stamp + self.window,
            None => now + self.window,
        }))
    }

    /// Whether `tokens` more fit the token limit at `now`.
    pub(crate) fn check_tokens(&mut self, now: Duration, tokens: u64) -> Result<(), Block> {
        let Some(limit) = self.tpm else {
            return Ok(());
        };
        if tokens > limit {
            return Err(Block::Never(limit));
        }
        let (_, used) = self.used(now);
        if used + tokens <= limit {
            return Ok(());
        }
        let need = used + tokens - limit;
        let mut freed = 0;
        for &(stamp, t) in &self.done {
            freed += t;
            if freed >= need {
                return Err(Block::Until(stamp + self.window));
            }
        }
        Err(Block::Until(now + self.window))
    }

    pub(crate) fn reserve(&mut self, tokens: u64) {
        self.in_flight += 1;
        self.in_flight_tokens += tokens;
    }

    /// Re-stamps a reservation with its completion time.
    pub(crate) fn complete(&mut self, tokens: u64, admitted: Duration, now: Duration) {
        if self.in_flight == 0 {
            return;
        }
        self.in_flight -= 1;
        let tokens = tokens.min(self.in_flight_tokens);
        self.in_flight_tokens -= tokens;
        let mut stamp = now.max(admitted);
        if let Some(&(last, _)) = self.done.back() {
            stamp = stamp.max(last);
        }
        self.done.push_back((stamp, tokens));
        self.done_tokens += tokens;
    }

    /// Gives a reservation back (the call was never sent).
    pub(crate) fn cancel(&mut self, tokens: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_tokens -= tokens.min(self.in_flight_tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_full_window_says_when_the_oldest_entries_leave() {
        let mut log = RollingLog::new(Some(2), Some(10), s(60));
        log.reserve(3);
        log.complete(3, s(0), s(1));
        log.reserve(4);
        log.complete(4, s(5), s(7));
        assert_eq!(log.check_requests(s(10)), Err(Block::Until(s(61))));
        assert_eq!(log.check_tokens(s(10), 3), Ok(()));
        assert_eq!(log.check_tokens(s(10), 4), Err(Block::Until(s(61))));
        assert_eq!(log.check_tokens(s(10), 8), Err(Block::Until(s(67))));
        assert_eq!(log.check_tokens(s(10), 11), Err(Block::Never(10)));
        assert_eq!(log.check_requests(s(61)), Ok(()));
        assert_eq!(log.used(s(61)), (1, 4));
    }

    #[test]
    fn in_flight_calls_are_held_until_a_window_after_completion() {
        let mut log = RollingLog::new(Some(1), None, s(60));
        log.reserve(5);
        assert_eq!(log.check_requests(s(100)), Err(Block::Until(s(160))));
        log.cancel(5);
        assert_eq!(log.check_requests(s(100)), Ok(()));
        assert_eq!(log.used(s(100)), (0, 0));
    }
}
