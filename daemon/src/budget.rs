//! Daily spend caps per provider (`budget_usd_per_day`).
//!
//! Before a call, the executor *reserves* the job's estimated cost; after the
//! call it *settles* the reservation with the real cost from the response's
//! usage (or releases it when nothing was billed). A call is allowed only
//! while `spent + reserved + estimate <= budget`, so concurrent jobs cannot
//! all slip under the cap at once: the overshoot is bounded by the error of
//! one job's estimate. The day is the UTC day; a new day starts from zero.

use std::collections::HashMap;
use std::sync::Mutex;

const DAY_MS: u64 = 86_400_000;

#[derive(Debug, Default, Clone, Copy)]
struct Ledger {
    day: u64,
    spent: f64,
    reserved: f64,
}

/// Budget gates for the providers that have a cap.
#[derive(Debug, Default)]
pub struct Budgets {
    caps: HashMap<String, f64>,
    ledgers: Mutex<HashMap<String, Ledger>>,
}

impl Budgets {
    /// `caps`: provider → USD per UTC day.
    pub fn new(caps: HashMap<String, f64>) -> Budgets {
        Budgets {
            caps,
            ledgers: Mutex::new(HashMap::new()),
        }
    }

    /// Restores what was already spent today (from Redis at start).
    pub fn load_spent(&self, provider: &str, spent: f64, now_unix_ms: u64) {
        self.with(provider, now_unix_ms, |l| l.spent = spent);
    }

    /// True when a call of `estimate` USD fits under the provider's cap.
    pub fn allows(&self, provider: &str, estimate: f64, now_unix_ms: u64) -> bool {
        let Some(cap) = self.caps.get(provider).copied() else {
            return true;
        };
        self.with(provider, now_unix_ms, |l| {
            l.spent + l.reserved + estimate <= cap
        })
    }

    pub fn reserve(&self, provider: &str, estimate: f64, now_unix_ms: u64) {
        if self.caps.contains_key(provider) {
            self.with(provider, now_unix_ms, |l| l.reserved += estimate);
        }
    }

    pub fn release(&self, provider: &str, estimate: f64, now_unix_ms: u64) {
        if self.caps.contains_key(provider) {
            self.with(provider, now_unix_ms, |l| l.reserved = (l.reserved - estimate).max(0.0));
        }
    }

    pub fn settle(&self, provider: &str, estimate: f64, actual: f64, now_unix_ms: u64) {
        if self.caps.contains_key(provider) {
            self.with(provider, now_unix_ms, |l| {
                l.reserved = (l.reserved - estimate).max(0.0);
                l.spent += actual;
            });
        }
    }

    /// Today's spend per capped provider: (provider, spent, cap).
    pub fn snapshot(&self, now_unix_ms: u64) -> Vec<(String, f64, f64)> {
        let mut out: Vec<_> = self
            .caps
            .iter()
            .map(|(p, cap)| (p.clone(), self.with(p, now_unix_ms, |l| l.spent), *cap))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn with<R>(&self, provider: &str, now_unix_ms: u64, f: impl FnOnce(&mut Ledger) -> R) -> R {
        let day = now_unix_ms / DAY_MS;
        let mut map = match self.ledgers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let l = map.entry(provider.to_string()).or_default();
        if l.day != day {
            *l = Ledger {
                day,
                spent: 0.0,
                reserved: 0.0,
            };
        }
        f(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_keep_concurrent_jobs_under_the_cap() {
        let b = Budgets::new(HashMap::from([("openai".to_string(), 1.0)]));
        let t = 5 * DAY_MS;
        assert!(b.allows("openai", 0.4, t));
        b.reserve("openai", 0.4, t);
        assert!(b.allows("openai", 0.4, t));
        b.reserve("openai", 0.4, t);
        // A third concurrent job would cross the cap.
        assert!(!b.allows("openai", 0.4, t));
        b.settle("openai", 0.4, 0.3, t);
        b.release("openai", 0.4, t);
        assert!(b.allows("openai", 0.4, t));
        // Uncapped providers are always allowed.
        assert!(b.allows("groq", 1e9, t));
    }

    #[test]
    fn a_new_utc_day_starts_from_zero() {
        let b = Budgets::new(HashMap::from([("openai".to_string(), 1.0)]));
        b.load_spent("openai", 1.0, DAY_MS);
        assert!(!b.allows("openai", 0.01, DAY_MS + 5));
        assert!(b.allows("openai", 0.01, 2 * DAY_MS));
    }
}
