//! Per-key rate limiting, checked on arrival: a rolling window (a log of
//! accepted requests) or a continuously refilled token bucket, each over
//! requests and tokens. Times are nanoseconds since the server started.

use crate::config::Shape;
use std::collections::VecDeque;

/// Slack for floating-point bucket arithmetic.
const EPS: f64 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dim {
    Requests,
    Tokens,
}

/// The state of one limit, as reported in rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DimState {
    pub limit: u64,
    pub remaining: u64,
    /// Time until the limit is fully replenished.
    pub reset_ns: u64,
}

/// Both limits of a key; `None` where the key has no such limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub requests: Option<DimState>,
    pub tokens: Option<DimState>,
}

/// Why a request was refused, and when it could succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub dim: Dim,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    /// Time until a request of this size would be accepted.
    pub wait_ns: u64,
    /// The request can never fit (it alone exceeds the limit).
    pub too_large: bool,
}

#[derive(Debug)]
pub(crate) enum Decision {
    Accepted(Snapshot),
    Rejected(Rejection, Snapshot),
}

#[derive(Debug)]
pub(crate) enum Limiter {
    Rolling(Rolling),
    Bucket(Bucket),
}

impl Limiter {
    pub fn new(shape: Shape, rpm: Option<u32>, tpm: Option<u64>, window_ns: u64) -> Self {
        let rpm = rpm.map(u64::from);
        let window = window_ns.max(1);
        match shape {
            Shape::Rolling => Limiter::Rolling(Rolling {
                rpm,
                tpm,
                window,
                log: VecDeque::new(),
                tokens: 0,
            }),
            Shape::TokenBucket => Limiter::Bucket(Bucket {
                rpm,
                tpm,
                window,
                req: rpm.unwrap_or(0) as f64,
                tok: tpm.unwrap_or(0) as f64,
                last: None,
            }),
        }
    }

    /// Admits a request charged `charge` tokens at `now`, or says why not.
    pub fn check(&mut self, now: u64, charge: u64) -> Decision {
        match self {
            Limiter::Rolling(r) => r.check(now, charge),
            Limiter::Bucket(b) => b.check(now, charge),
        }
    }

    /// The current state, without admitting anything.
    pub fn snapshot(&mut self, now: u64) -> Snapshot {
        match self {
            Limiter::Rolling(r) => {
                r.expire(now);
                r.snapshot(now)
            }
            Limiter::Bucket(b) => {
                b.refill(now);
                b.snapshot()
            }
        }
    }
}

/// The refusal that lasts longer wins; a request that can never fit wins over all.
fn worse(a: Option<Rejection>, b: Option<Rejection>) -> Option<Rejection> {
    match (a, b) {
        (Some(a), Some(b)) => {
            if (b.too_large && !a.too_large)
                || (b.too_large == a.too_large && b.wait_ns > a.wait_ns)
            {
                Some(b)
            } else {
                Some(a)
            }
        }
        (a, None) => a,
        (None, b) => b,
    }
}

/// At most `rpm` requests and `tpm` tokens among the accepted requests of
/// the last `window` (an entry at `t` counts while `now - t < window`).
#[derive(Debug)]
pub(crate) struct Rolling {
    rpm: Option<u64>,
    tpm: Option<u64>,
    window: u64,
    /// Accepted requests still in the window: (time, tokens).
    log: VecDeque<(u64, u64)>,
    /// Sum of the tokens in `log`.
    tokens: u64,
}

impl Rolling {
    fn expire(&mut self, now: u64) {
        while let Some(&(t, k)) = self.log.front() {
            if t.saturating_add(self.window) <= now {
                self.log.pop_front();
                self.tokens -= k;
            } else {
                break;
            }
        }
    }

    fn until_expiry(&self, t: u64, now: u64) -> u64 {
        t.saturating_add(self.window).saturating_sub(now)
    }

    fn snapshot(&self, now: u64) -> Snapshot {
        let reset = self
            .log
            .back()
            .map_or(0, |&(t, _)| self.until_expiry(t, now));
        let n = self.log.len() as u64;
        Snapshot {
            requests: self.rpm.map(|limit| DimState {
                limit,
                remaining: limit.saturating_sub(n),
                reset_ns: reset,
            }),
            tokens: self.tpm.map(|limit| DimState {
                limit,
                remaining: limit.saturating_sub(self.tokens),
                reset_ns: reset,
            }),
        }
    }

    fn check(&mut self, now: u64, charge: u64) -> Decision {
        self.expire(now);
        let n = self.log.len() as u64;
        let by_requests = self.rpm.and_then(|rpm| {
            if rpm == 0 {
                return Some(Rejection {
                    dim: Dim::Requests,
                    limit: 0,
                    used: n,
                    requested: 1,
                    wait_ns: self.window,
                    too_large: true,
                });
            }
            (n >= rpm).then(|| {
                // Once the entry at n - rpm expires, n - rpm + 1 have left.
                let t = self.log[(n - rpm) as usize].0;
                Rejection {
                    dim: Dim::Requests,
                    limit: rpm,
                    used: n,
                    requested: 1,
                    wait_ns: self.until_expiry(t, now),
                    too_large: false,
                }
            })
        });
        let by_tokens = self.tpm.and_then(|tpm| {
            if charge > tpm {
                return Some(Rejection {
                    dim: Dim::Tokens,
                    limit: tpm,
                    used: self.tokens,
                    requested: charge,
                    wait_ns: self.window,
                    too_large: true,
                });
            }
            let need = (self.tokens + charge).checked_sub(tpm).filter(|&k| k > 0)?;
            let mut freed = 0;
            let mut wait = self.window;
            for &(t, k) in &self.log {
                freed += k;
                if freed >= need {
                    wait = self.until_expiry(t, now);
                    break;
                }
            }
            Some(Rejection {
                dim: Dim::Tokens,
                limit: tpm,
                used: self.tokens,
                requested: charge,
                wait_ns: wait,
                too_large: false,
            })
        });
        match worse(by_requests, by_tokens) {
            Some(r) => Decision::Rejected(r, self.snapshot(now)),
            None => {
                self.log.push_back((now, charge));
                self.tokens += charge;
                Decision::Accepted(self.snapshot(now))
            }
        }
    }
}

/// Buckets of capacity `rpm` requests and `tpm` tokens, each refilled
/// continuously at capacity per `window`; buckets start full.
#[derive(Debug)]
pub(crate) struct Bucket {
    rpm: Option<u64>,
    tpm: Option<u64>,
    window: u64,
    req: f64,
    tok: f64,
    last: Option<u64>,
}

impl Bucket {
    fn refill(&mut self, now: u64) {
        let last = self.last.unwrap_or(now);
        let dt = now.saturating_sub(last) as f64;
        let w = self.window as f64;
        if let Some(cap) = self.rpm {
            let cap = cap as f64;
            self.req = (self.req + dt * cap / w).min(cap);
        }
        if let Some(cap) = self.tpm {
            let cap = cap as f64;
            self.tok = (self.tok + dt * cap / w).min(cap);
        }
        self.last = Some(now.max(last));
    }

    fn dim(&self, cap: u64, level: f64) -> DimState {
        let capf = cap as f64;
        let reset = if cap == 0 {
            0
        } else {
            ((capf - level).max(0.0) * self.window as f64 / capf).ceil() as u64
        };
        DimState {
            limit: cap,
            remaining: (level + EPS).floor().max(0.0) as u64,
            reset_ns: reset,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.rpm.map(|cap| self.dim(cap, self.req)),
            tokens: self.tpm.map(|cap| self.dim(cap, self.tok)),
        }
    }

    /// Time until `level` reaches `need` in a bucket of capacity `cap`.
    fn wait(&self, cap: u64, level: f64, need: f64) -> u64 {
        ((need - level).max(0.0) * self.window as f64 / cap as f64).ceil() as u64
    }

    fn check(&mut self, now: u64, charge: u64) -> Decision {
        self.refill(now);
        let by_requests = self.rpm.and_then(|cap| {
            let used = cap.saturating_sub((self.req + EPS).floor() as u64);
            if cap == 0 {
                Some(Rejection {
                    dim: Dim::Requests,
                    limit: 0,
                    used,
                    requested: 1,
                    wait_ns: self.window,
                    too_large: true,
                })
            } else if self.req + EPS < 1.0 {
                Some(Rejection {
                    dim: Dim::Requests,
                    limit: cap,
                    used,
                    requested: 1,
                    wait_ns: self.wait(cap, self.req, 1.0),
                    too_large: false,
                })
            } else {
                None
            }
        });
        let by_tokens = self.tpm.and_then(|cap| {
            let used = cap.saturating_sub((self.tok + EPS).floor() as u64);
            let need = charge as f64;
            if charge > cap {
                Some(Rejection {
                    dim: Dim::Tokens,
                    limit: cap,
                    used,
                    requested: charge,
                    wait_ns: self.window,
                    too_large: true,
                })
            } else if self.tok + EPS < need {
                Some(Rejection {
                    dim: Dim::Tokens,
                    limit: cap,
                    used,
                    requested: charge,
                    wait_ns: self.wait(cap, self.tok, need),
                    too_large: false,
                })
            } else {
                None
            }
        });
        match worse(by_requests, by_tokens) {
            Some(r) => Decision::Rejected(r, self.snapshot()),
            None => {
                if self.rpm.is_some() {
                    self.req = (self.req - 1.0).max(0.0);
                }
                if self.tpm.is_some() {
                    self.tok = (self.tok - charge as f64).max(0.0);
                }
                Decision::Accepted(self.snapshot())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn accepted(d: &Decision) -> bool {
        matches!(d, Decision::Accepted(_))
    }

    fn rejection(d: Decision) -> Rejection {
        match d {
            Decision::Rejected(r, _) => r,
            Decision::Accepted(_) => panic!("expected a rejection"),
        }
    }

    #[test]
    fn rolling_counts_requests_in_the_window() {
        let mut l = Limiter::new(Shape::Rolling, Some(2), None, 100 * MS);
        assert!(accepted(&l.check(0, 1)));
        assert!(accepted(&l.check(10 * MS, 1)));
        let r = rejection(l.check(20 * MS, 1));
        assert_eq!((r.dim, r.wait_ns, r.used), (Dim::Requests, 80 * MS, 2));
        // At exactly t0 + window the first entry has left.
        assert!(accepted(&l.check(100 * MS, 1)));
        let r = rejection(l.check(100 * MS, 1));
        assert_eq!(r.wait_ns, 10 * MS);
        match l.check(110 * MS, 1) {
            Decision::Accepted(s) => {
                let req = s.requests.unwrap();
                assert_eq!((req.remaining, req.reset_ns), (0, 100 * MS));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rolling_tokens_wait_until_enough_have_left() {
        let mut l = Limiter::new(Shape::Rolling, None, Some(100), 100 * MS);
        assert!(accepted(&l.check(0, 40)));
        assert!(accepted(&l.check(10 * MS, 40)));
        let r = rejection(l.check(20 * MS, 50));
        // 80 used + 50 > 100: 30 must leave, the first entry (40) suffices.
        assert_eq!(
            (r.dim, r.wait_ns, r.used, r.requested),
            (Dim::Tokens, 80 * MS, 80, 50)
        );
        let r = rejection(l.check(20 * MS, 101));
        assert!(r.too_large);
        assert!(accepted(&l.check(20 * MS, 20)));
    }

    #[test]
    fn bucket_refills_continuously() {
        let mut l = Limiter::new(Shape::TokenBucket, Some(4), None, 400 * MS);
        for _ in 0..4 {
            assert!(accepted(&l.check(0, 1)));
        }
        let r = rejection(l.check(0, 1));
        assert_eq!(r.wait_ns, 100 * MS);
        let r = rejection(l.check(50 * MS, 1));
        assert_eq!(r.wait_ns, 50 * MS);
        assert!(accepted(&l.check(100 * MS, 1)));
        assert!(!accepted(&l.check(100 * MS, 1)));
        let req = l.snapshot(300 * MS).requests.unwrap();
        assert_eq!((req.remaining, req.reset_ns), (2, 200 * MS));
    }

    #[test]
    fn bucket_tokens_and_too_large() {
        let mut l = Limiter::new(Shape::TokenBucket, Some(10), Some(100), 100 * MS);
        assert!(accepted(&l.check(0, 100)));
        let r = rejection(l.check(0, 50));
        assert_eq!((r.dim, r.wait_ns), (Dim::Tokens, 50 * MS));
        assert!(rejection(l.check(0, 101)).too_large);
    }
}
