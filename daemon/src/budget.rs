//! Daily spend caps per provider (`budget_usd_per_day`).
//!
//! Before a call, the executor *reserves* the job's estimated cost; after the
//! call it *settles* the reservation with the real cost from the response's
//! usage (or releases it when nothing was billed). A call is allowed only
//! while `spent + reserved + estimate <= budget`, so concurrent jobs cannot
//! all slip under the cap at once: the overshoot is bounded by the error of
//! one job's estimate (none when the estimate is an upper bound, as the
//! router's is: the prompt plus all of `max_tokens`). The day is the
//! provider's (its `daily_reset`, UTC midnight by default); a new day starts
//! from zero.
//!
//! [`Budgets::check`] tells the executor which of three cases holds: the call
//! fits ([`BudgetCheck::Fits`]); it would fit once calls in flight settle,
//! which may cost less than reserved ([`BudgetCheck::Pending`], so wait); or
//! today's spend alone leaves no room ([`BudgetCheck::Reached`], so this
//! provider is out for the day).
//!
//! The executor holds a reservation as a [`Reservation`] guard
//! ([`Budgets::hold`]): [`Reservation::settle`] books the real cost, and a
//! guard dropped any other way (an early return, a panic, a job future
//! dropped in the middle of its call) gives the reservation back, so none
//! outlives its call.

use crate::calendar::{CachedDay, DailyReset};
use crate::clock::SharedClock;
use crate::config::ProviderConfig;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default, Clone, Copy)]
struct Ledger {
    day: i64,
    /// The provider's current day, cached (no zone math per check).
    today: CachedDay,
    /// The cap's view of today's spend: derived (seeded from the pool,
    /// raised by settles and by the cluster-wide `llmq:spend` total),
    /// never written back; see ARCHITECTURE.md, "Where spend lives".
    spent: f64,
    reserved: f64,
}

/// Whether a call of a given estimated cost fits a provider's budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum BudgetCheck {
    /// No cap, or `spent + reserved + estimate <= cap`.
    Fits,
    /// Only the reservations of calls in flight stand in the way.
    Pending,
    /// `spent + estimate > cap`: nothing will fit before the provider's next day.
    Reached { cap: f64, spent: f64 },
}

/// Budget gates for the providers that have a cap.
#[derive(Debug, Default)]
pub struct Budgets {
    caps: HashMap<String, f64>,
    /// When each capped provider's day starts; UTC midnight when absent.
    resets: HashMap<String, DailyReset>,
    ledgers: Mutex<HashMap<String, Ledger>>,
}

impl Budgets {
    #[cfg(test)]
    /// `caps`: provider → USD per UTC day.
    pub(crate) fn new(caps: HashMap<String, f64>) -> Budgets {
        Budgets {
            caps,
            resets: HashMap::new(),
            ledgers: Mutex::new(HashMap::new()),
        }
    }

    /// The caps of the providers that set `budget_usd_per_day`, each on
    /// its own day (`daily_reset`).
    pub(crate) fn for_providers(providers: &BTreeMap<String, ProviderConfig>) -> Budgets {
        let capped = || {
            providers
                .iter()
                .filter_map(|(name, p)| p.budget_usd_per_day.map(|b| (name, b, p)))
        };
        Budgets {
            caps: capped().map(|(n, b, _)| (n.clone(), b)).collect(),
            resets: capped()
                .map(|(n, _, p)| (n.clone(), p.daily_reset.clone()))
                .collect(),
            ledgers: Mutex::new(HashMap::new()),
        }
    }

    /// Restores what was already spent today (from Redis at start).
    pub(crate) fn load_spent(&self, provider: &str, spent: f64, now_unix_ms: u64) {
        self.with(provider, now_unix_ms, |l| l.spent = spent);
    }

    /// Adopts what every daemon together has spent today, as read from Redis
    /// (`llmq:spend:<day>`), when it is more than this daemon knows of. With
    /// several daemons this bounds the overshoot of a cap by one sync
    /// interval of the others' spend.
    pub(crate) fn sync_spent(&self, provider: &str, shared: f64, now_unix_ms: u64) {
        if self.caps.contains_key(provider) {
            self.with(provider, now_unix_ms, |l| l.spent = l.spent.max(shared));
        }
    }

    /// Providers with a cap.
    pub(crate) fn capped(&self) -> impl Iterator<Item = &str> {
        self.caps.keys().map(String::as_str)
    }

    #[cfg(test)]
    /// True when a call of `estimate` USD fits under the provider's cap now.
    pub(crate) fn allows(&self, provider: &str, estimate: f64, now_unix_ms: u64) -> bool {
        self.check(provider, estimate, now_unix_ms) == BudgetCheck::Fits
    }

    #[cfg(test)]
    /// Whether a call of `estimate` USD fits under the provider's cap now,
    /// later (once calls in flight settle) or not today.
    pub(crate) fn check(&self, provider: &str, estimate: f64, now_unix_ms: u64) -> BudgetCheck {
        let Some(cap) = self.caps.get(provider).copied() else {
            return BudgetCheck::Fits;
        };
        self.with(provider, now_unix_ms, |l| {
            if l.spent + l.reserved + estimate <= cap {
                BudgetCheck::Fits
            } else if l.spent + estimate <= cap {
                BudgetCheck::Pending
            } else {
                BudgetCheck::Reached {
                    cap,
                    spent: l.spent,
                }
            }
        })
    }

    /// [`Budgets::check`], and when the call fits, reserve `estimate` in the
    /// same step (so two jobs cannot both take the last room).
    pub(crate) fn try_reserve(
        &self,
        provider: &str,
        estimate: f64,
        now_unix_ms: u64,
    ) -> BudgetCheck {
        let Some(cap) = self.caps.get(provider).copied() else {
            return BudgetCheck::Fits;
        };
        self.with(provider, now_unix_ms, |l| {
            if l.spent + l.reserved + estimate <= cap {
                l.reserved += estimate;
                BudgetCheck::Fits
            } else if l.spent + estimate <= cap {
                BudgetCheck::Pending
            } else {
                BudgetCheck::Reached {
                    cap,
                    spent: l.spent,
                }
            }
        })
    }

    /// [`Budgets::try_reserve`] as a guard: `Ok` holds the reservation
    /// until it is settled or dropped (dropped = released); `Err` is
    /// [`BudgetCheck::Pending`] or [`BudgetCheck::Reached`] (nothing held).
    pub(crate) fn hold(
        self: &Arc<Self>,
        provider: &str,
        estimate: f64,
        clock: &SharedClock,
    ) -> Result<Reservation, BudgetCheck> {
        match self.try_reserve(provider, estimate, clock.unix_ms()) {
            BudgetCheck::Fits => Ok(Reservation {
                budgets: self.clone(),
                provider: provider.to_string(),
                estimate,
                clock: clock.clone(),
                open: self.caps.contains_key(provider),
            }),
            other => Err(other),
        }
    }

    /// What calls in flight hold of the provider's budget today.
    pub fn reserved(&self, provider: &str, now_unix_ms: u64) -> f64 {
        if !self.caps.contains_key(provider) {
            return 0.0;
        }
        self.with(provider, now_unix_ms, |l| l.reserved)
    }

    #[cfg(test)]
    /// The provider's cap, if it has one.
    pub(crate) fn cap(&self, provider: &str) -> Option<f64> {
        self.caps.get(provider).copied()
    }

    #[cfg(test)]
    pub(crate) fn reserve(&self, provider: &str, estimate: f64, now_unix_ms: u64) {
        if self.caps.contains_key(provider) {
            self.with(provider, now_unix_ms, |l| l.reserved += estimate);
        }
    }

    pub(crate) fn release(&self, provider: &str, estimate: f64, now_unix_ms: u64) {
        if self.caps.contains_key(provider) {
            self.with(provider, now_unix_ms, |l| {
                l.reserved = (l.reserved - estimate).max(0.0)
            });
        }
    }

    pub(crate) fn settle(&self, provider: &str, estimate: f64, actual: f64, now_unix_ms: u64) {
        if self.caps.contains_key(provider) {
            self.with(provider, now_unix_ms, |l| {
                l.reserved = (l.reserved - estimate).max(0.0);
                l.spent += actual;
            });
        }
    }

    /// Today's spend per capped provider: (provider, spent, cap).
    pub(crate) fn snapshot(&self, now_unix_ms: u64) -> Vec<(String, f64, f64)> {
        let mut out: Vec<_> = self
            .caps
            .iter()
            .map(|(p, cap)| (p.clone(), self.with(p, now_unix_ms, |l| l.spent), *cap))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn with<R>(&self, provider: &str, now_unix_ms: u64, f: impl FnOnce(&mut Ledger) -> R) -> R {
        let mut map = match self.ledgers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let l = map.entry(provider.to_string()).or_default();
        let day = match self.resets.get(provider) {
            Some(reset) => l.today.day(reset, now_unix_ms),
            None => l.today.day(&DailyReset::default(), now_unix_ms),
        };
        if l.day != day {
            *l = Ledger {
                day,
                today: l.today,
                spent: 0.0,
                reserved: 0.0,
            };
        }
        f(l)
    }
}

/// One call's reservation of a provider's budget (see [`Budgets::hold`]).
/// Settle it with the real cost; dropping it unsettled releases it.
#[must_use = "a reservation is released when dropped; settle it with the call's cost"]
pub(crate) struct Reservation {
    budgets: Arc<Budgets>,
    provider: String,
    estimate: f64,
    clock: SharedClock,
    /// Still held (false once settled or released, and for an uncapped provider).
    open: bool,
}

impl Reservation {
    #[cfg(test)]
    /// The estimate reserved.
    pub(crate) fn estimate(&self) -> f64 {
        self.estimate
    }

    /// Books the call's real cost in place of the reservation.
    pub(crate) fn settle(mut self, actual: f64) {
        if std::mem::take(&mut self.open) {
            self.budgets
                .settle(&self.provider, self.estimate, actual, self.clock.unix_ms());
        }
    }

    /// Gives the reservation back (nothing was billed). Dropping does the same.
    pub(crate) fn release(self) {}
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if std::mem::take(&mut self.open) {
            self.budgets
                .release(&self.provider, self.estimate, self.clock.unix_ms());
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("provider", &self.provider)
            .field("estimate", &self.estimate)
            .field("open", &self.open)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::DAY_MS;

    #[test]
    fn a_reservation_guard_is_released_on_drop_and_settled_once() {
        let clock: SharedClock = Arc::new(crate::clock::ManualClock::new(7 * DAY_MS + 5));
        let b = Arc::new(Budgets::new(HashMap::from([("openai".to_string(), 1.0)])));
        let now = clock.unix_ms();
        let r = b.hold("openai", 0.6, &clock).expect("fits");
        assert_eq!(r.estimate(), 0.6);
        assert_eq!(b.reserved("openai", now), 0.6);
        assert!(matches!(
            b.hold("openai", 0.6, &clock),
            Err(BudgetCheck::Pending)
        ));
        // Dropped (an early return, a cancelled future): given back.
        drop(r);
        assert_eq!(b.reserved("openai", now), 0.0);
        // A panic while it is held gives it back too.
        let b2 = b.clone();
        let c2 = clock.clone();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _r = b2.hold("openai", 0.5, &c2).expect("fits");
            panic!("in the middle of a call");
        }));
        assert!(panicked.is_err());
        assert_eq!(b.reserved("openai", now), 0.0);
        // Settled: the real cost is spent, the reservation gone, once.
        b.hold("openai", 0.6, &clock).expect("fits").settle(0.25);
        assert_eq!(b.reserved("openai", now), 0.0);
        assert_eq!(b.snapshot(now), vec![("openai".to_string(), 0.25, 1.0)]);
        b.hold("openai", 0.1, &clock).expect("fits").release();
        assert_eq!(b.reserved("openai", now), 0.0);
        // An uncapped provider holds nothing.
        let free = b.hold("groq", 1e9, &clock).expect("uncapped");
        assert_eq!(b.reserved("groq", now), 0.0);
        free.settle(3.0);
        assert_eq!(b.snapshot(now).len(), 1);
    }

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
    fn check_tells_pending_reservations_from_a_reached_cap() {
        let b = Budgets::new(HashMap::from([("openai".to_string(), 1.0)]));
        let t = 9 * DAY_MS + 17;
        assert_eq!(b.check("openai", 0.6, t), BudgetCheck::Fits);
        b.reserve("openai", 0.6, t);
        // The reservation may settle for less: wait, do not give up.
        assert_eq!(b.check("openai", 0.6, t), BudgetCheck::Pending);
        b.settle("openai", 0.6, 0.5, t);
        assert_eq!(b.check("openai", 0.5, t), BudgetCheck::Fits);
        assert_eq!(
            b.check("openai", 0.6, t),
            BudgetCheck::Reached {
                cap: 1.0,
                spent: 0.5
            }
        );
        assert_eq!(b.cap("openai"), Some(1.0));
        // try_reserve takes the room it finds (spent 0.5 so far).
        assert_eq!(b.try_reserve("openai", 0.5, t), BudgetCheck::Fits);
        assert_eq!(b.try_reserve("openai", 0.01, t), BudgetCheck::Pending);
        b.release("openai", 0.5, t);
        assert_eq!(b.try_reserve("openai", 0.25, t), BudgetCheck::Fits);
        assert_eq!(b.try_reserve("openai", 0.5, t), BudgetCheck::Pending);
        assert_eq!(
            b.try_reserve("openai", 0.6, t),
            BudgetCheck::Reached {
                cap: 1.0,
                spent: 0.5
            }
        );
        assert_eq!(b.try_reserve("groq", 1e9, t), BudgetCheck::Fits);
        assert_eq!(b.cap("groq"), None);
        assert_eq!(b.check("groq", 1e9, t), BudgetCheck::Fits);
    }

    #[test]
    fn spend_of_other_daemons_is_adopted_but_never_lowers_our_own() {
        let b = Budgets::new(HashMap::from([("openai".to_string(), 1.0)]));
        let t = 3 * DAY_MS;
        b.settle("openai", 0.0, 0.3, t);
        b.sync_spent("openai", 0.9, t);
        assert!(!b.allows("openai", 0.2, t), "0.9 spent across daemons");
        b.sync_spent("openai", 0.1, t);
        assert!(
            !b.allows("openai", 0.2, t),
            "a stale read does not lower it"
        );
        b.sync_spent("groq", 5.0, t);
        assert!(b.allows("groq", 1e9, t));
    }

    #[test]
    fn a_budget_day_starts_at_the_providers_daily_reset() {
        let providers = BTreeMap::from([(
            "gemini".to_string(),
            ProviderConfig {
                budget_usd_per_day: Some(1.0),
                daily_reset: DailyReset::parse("00:00 America/Los_Angeles").unwrap(),
                ..ProviderConfig::default()
            },
        )]);
        let b = Budgets::for_providers(&providers);
        assert_eq!(b.capped().collect::<Vec<_>>(), ["gemini"]);
        // 2024-01-15 23:00 UTC = 15:00 PST.
        let t = 1_705_359_600_000;
        b.load_spent("gemini", 1.0, t);
        assert!(!b.allows("gemini", 0.01, t));
        assert!(
            !b.allows("gemini", 0.01, t + 3_600_000),
            "UTC midnight: still the 15th in Los Angeles"
        );
        assert!(!b.allows("gemini", 0.01, t + 9 * 3_600_000 - 1));
        assert!(
            b.allows("gemini", 0.01, t + 9 * 3_600_000),
            "Pacific midnight"
        );
    }

    #[test]
    fn a_new_utc_day_starts_from_zero() {
        let b = Budgets::new(HashMap::from([("openai".to_string(), 1.0)]));
        b.load_spent("openai", 1.0, DAY_MS);
        assert!(!b.allows("openai", 0.01, DAY_MS + 5));
        assert!(b.allows("openai", 0.01, 2 * DAY_MS));
    }
}
