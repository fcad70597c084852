//! Per-key admission control: one limiter per API key, holding requests and
//! tokens per window (RPM/TPM), requests and tokens per provider day
//! (RPD/TPD, rolling over at the provider's `daily_reset`), a cap on
//! concurrent calls and the limits the upstream reports in its headers. This
//! module owns the [`Admission`] trait and its in-process implementation,
//! [`LocalLimiter`]; the key pool drives one per key.
//!
//! # Quota pools (accounts)
//!
//! Providers limit per account or project, not per key. The per-window and
//! per-day limits, the upstream's blocks and learned limits form a key's
//! *quota*; keys that share an `account` share one quota ([`SharedQuota`]),
//! while each key keeps its own concurrency cap and probation. A key without
//! an account owns its quota inline (no lock, no pointer chase). An
//! account's limits are the strictest of its keys' limits, field by field
//! ([`LimiterConfig::for_account`]): never more than any of its keys says.
//!
//! # Shapes
//!
//! A GCRA with burst N admits up to 2N−1 calls in its first window, which an
//! upstream that counts a *rolling* window answers with 429s. So the shape is
//! chosen per provider ([`LimitShape`]):
//! - `Rolling` (default): at most N in ANY window of length `window`. RPM is a
//!   log of the last admissions, TPM a log of `(time, tokens)`; both exact.
//! - `TokenBucket`: governor's GCRA, burst N, refilled at N per window, for
//!   upstreams that document a bucket (Anthropic).
//!
//! # Skew safety (the invariant)
//!
//! The upstream stamps a call when it *receives* it, some time after we admit
//! it. A rolling slot is therefore stamped with the time the call
//! **completes** (`max(admitted, completed)`), and until then it counts as
//! occupied *now*. As the upstream's stamp lies between our admission and our
//! completion, every call the upstream counts in its window at the moment it
//! receives call `r` is, at the moment we admitted `r`, either still in flight
//! or completed less than `window` ago — so it was in our count too. Hence with
//! a window of the same length we never send N+1 calls into any upstream
//! window, whatever the network delay, and without a guessed safety margin.
//! (The token-bucket shape has no such slack: GCRA debits at admission.)
//!
//! # Tokens
//!
//! TPM and TPD are charged *before* the call with the caller's estimate
//! (`llmq_sdk::estimate::charged_tokens`: prompt estimate + `max_tokens`, as
//! OpenAI counts). On completion the daily counter is corrected to the real
//! usage when it is known; the window keeps the estimate (upstreams charge
//! the window up front too).
//!
//! # Time
//!
//! Every call takes a [`Now`] read from the daemon's [`Clock`], so tests drive
//! limiters with `ManualClock`. Windows use monotonic time; days are the
//! provider's days of the wall clock ([`crate::calendar::DailyReset`]).

mod bucket;
mod rolling;

use crate::calendar::DailyReset;
use crate::clock::Clock;
use crate::config::{LimitShape, Limits, ProviderConfig};
use crate::keys::ApiKey;
use bucket::Bucket;
use llmq_sdk::ObservedLimits;
use rolling::{Block, RollingLog};
use serde::Serialize;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The upstreams' rate window, unless a provider sets `window`.
pub(crate) const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// One reading of the clock: monotonic time for windows and deadlines, Unix
/// time for days and persisted timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Duration,
    pub unix_ms: u64,
}

impl Now {
    pub fn of(clock: &dyn Clock) -> Now {
        Now {
            mono: clock.now(),
            unix_ms: clock.unix_ms(),
        }
    }

    /// The UTC day (for reports kept in UTC days, e.g. usage). Provider
    /// days come from the provider's [`DailyReset`].
    pub(crate) fn utc_day(self) -> u64 {
        crate::calendar::utc_day(self.unix_ms).max(0) as u64
    }

    /// Unix milliseconds of a clock time.
    pub(crate) fn unix_ms_at(self, mono: Duration) -> u64 {
        if mono >= self.mono {
            self.unix_ms
                .saturating_add((mono - self.mono).as_millis() as u64)
        } else {
            self.unix_ms
                .saturating_sub((self.mono - mono).as_millis() as u64)
        }
    }

    /// Clock time of a Unix-milliseconds instant (saturating at clock zero).
    pub(crate) fn mono_at(self, unix_ms: u64) -> Duration {
        if unix_ms >= self.unix_ms {
            self.mono + Duration::from_millis(unix_ms - self.unix_ms)
        } else {
            self.mono
                .saturating_sub(Duration::from_millis(self.unix_ms - unix_ms))
        }
    }
}

/// What one key's limiter enforces.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterConfig {
    pub limits: Limits,
    pub max_concurrent: Option<u32>,
    pub window: Duration,
    pub shape: LimitShape,
    /// One call at a time until the key's first success (see
    /// `LocalLimiter::proven`). On for every real key; limiter unit tests
    /// switch it off to test the window shapes alone.
    pub probation: bool,
    /// When RPD/TPD roll over (the provider's `daily_reset`).
    pub daily_reset: DailyReset,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            limits: Limits::default(),
            max_concurrent: None,
            window: DEFAULT_WINDOW,
            shape: LimitShape::Rolling,
            probation: false,
            daily_reset: DailyReset::default(),
        }
    }
}

impl LimiterConfig {
    /// A key's limits: its own overrides over the provider's per-key defaults.
    pub(crate) fn for_key(provider: &ProviderConfig, key: &ApiKey) -> LimiterConfig {
        LimiterConfig {
            limits: key.effective_limits(&provider.limits),
            max_concurrent: key.effective_max_concurrent(provider.max_concurrent),
            window: provider
                .window
                .filter(|w| !w.is_zero())
                .unwrap_or(DEFAULT_WINDOW),
            shape: provider.limit_shape,
            probation: true,
            daily_reset: provider.daily_reset.clone(),
        }
    }

    /// The quota an account's keys share: per field, the strictest of the
    /// keys' limits (an account is never allowed more than any of its keys
    /// says). Concurrency and probation stay per key and are not part of it.
    pub(crate) fn for_account<'a>(
        provider: &ProviderConfig,
        keys: impl IntoIterator<Item = &'a ApiKey>,
    ) -> LimiterConfig {
        let limits = keys
            .into_iter()
            .map(|k| k.effective_limits(&provider.limits))
            .reduce(|a, b| Limits {
                rpm: strictest(a.rpm, b.rpm),
                tpm: strictest(a.tpm, b.tpm),
                rpd: strictest(a.rpd, b.rpd),
                tpd: strictest(a.tpd, b.tpd),
            })
            .unwrap_or(provider.limits);
        LimiterConfig {
            limits,
            max_concurrent: None,
            window: provider
                .window
                .filter(|w| !w.is_zero())
                .unwrap_or(DEFAULT_WINDOW),
            shape: provider.limit_shape,
            probation: false,
            daily_reset: provider.daily_reset.clone(),
        }
    }
}

/// The smaller of two limits; `None` (unlimited) only when both are.
pub(crate) fn strictest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    Concurrency,
    Rpm,
    Tpm,
    Rpd,
    Tpd,
    /// The upstream said no requests remain until its reset.
    UpstreamRequests,
    /// The upstream said no tokens remain until its reset.
    UpstreamTokens,
}

impl LimitKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitKind::Concurrency => "concurrency",
            LimitKind::Rpm => "rpm",
            LimitKind::Tpm => "tpm",
            LimitKind::Rpd => "rpd",
            LimitKind::Tpd => "tpd",
            LimitKind::UpstreamRequests => "upstream_requests",
            LimitKind::UpstreamTokens => "upstream_tokens",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call cannot pass now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such call passes before `until` (clock time). A lower bound: a
    /// check at `until` may still refuse, for another reason.
    Until { until: Duration, kind: LimitKind },
    /// Every concurrency slot is in flight: room comes with a completion.
    Busy,
    /// This call can never pass: it alone asks more than the limit.
    Never {
        kind: LimitKind,
        limit: u64,
        asked: u64,
    },
}

impl Refusal {
    pub(crate) fn until(&self) -> Option<Duration> {
        match self {
            Refusal::Until { until, .. } => Some(*until),
            Refusal::Busy | Refusal::Never { .. } => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Until { until, kind } => write!(f, "{kind} full until {until:?}"),
            Refusal::Busy => f.write_str("all concurrency slots in flight"),
            Refusal::Never { kind, limit, asked } => {
                write!(f, "asks {asked} but the {kind} limit is {limit}")
            }
        }
    }
}

/// Proof of one admission; hand it back with `complete` or `cancel`.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket holds a slot until it is completed or cancelled"]
pub struct Ticket {
    admitted: Duration,
    tokens: u64,
    day: i64,
}

impl Ticket {
    /// Clock time of the admission.
    pub fn admitted(&self) -> Duration {
        self.admitted
    }

    /// Tokens charged up front.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The provider day (see [`DailyReset::day_of`]) it was charged to.
    pub(crate) fn day(&self) -> i64 {
        self.day
    }
}

/// A limiter's current load, for `llmq keys` and the dashboard's usage bars.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct LimiterUsage {
    pub in_flight: u32,
    /// Requests counted in the current window (rolling) or bucket debt.
    pub window_requests: u64,
    /// Tokens counted in the current window (rolling) or bucket debt.
    pub window_tokens: u64,
    /// Today's requests and tokens (the provider's day; the account's when
    /// the key shares a quota).
    pub day_requests: u64,
    pub day_tokens: u64,
    /// Effective limits: configured, tightened by what the upstream reported.
    pub limits: Limits,
    /// Clock time until which the upstream said nothing remains.
    pub upstream_blocked_until: Option<Duration>,
}

/// Admission control for one key.
///
/// The pool calls it under a short lock, never across an await, so every
/// method is synchronous and in memory. An implementation that holds the
/// limits *globally* across daemons keeps that shape: it admits against
/// capacity leased from Redis ahead of time (see ARCHITECTURE.md), and a
/// refusal it cannot decide locally is just an `Until` a little ahead.
pub trait Admission: Send + fmt::Debug {
    /// Whether a call charged `tokens` could pass at `now` (nothing taken).
    fn check(&mut self, now: Now, tokens: u64) -> Result<(), Refusal>;
    /// Takes the capacity for one call, or says why not.
    fn admit(&mut self, now: Now, tokens: u64) -> Result<Ticket, Refusal>;
    /// The call finished (answered or failed) at `now`. `actual_tokens`, when
    /// known, corrects the daily token count.
    fn complete(&mut self, ticket: Ticket, now: Now, actual_tokens: Option<u64>);
    /// The call was never sent: gives its capacity back where the shape can.
    fn cancel(&mut self, ticket: Ticket, now: Now);
    /// Limits read from the upstream's rate-limit headers.
    fn observe(&mut self, seen: &ObservedLimits, now: Now);
    /// Refuses every call until `until` (clock time; a later hold wins):
    /// the cluster gate refused the key, so asking sooner is pointless.
    /// Refusals say [`LimitKind::UpstreamRequests`], as for an upstream's
    /// "no requests remain": the quota is out of calls until then.
    fn hold_back(&mut self, until: Duration);
    fn usage(&mut self, now: Now) -> LimiterUsage;
    /// Adds today's counts restored from storage.
    fn restore_daily(&mut self, now: Now, requests: u64, tokens: u64);
    /// New configuration (SIGHUP); history is kept where the shape allows.
    fn reconfigure(&mut self, cfg: LimiterConfig, now: Now);
    fn config(&self) -> &LimiterConfig;
}

/// The per-window limits (RPM, TPM) in one of the two shapes.
#[derive(Debug)]
enum Meters {
    /// One log for both limits.
    Rolling(RollingLog),
    /// One GCRA per limit; boxed, as governor's limiter is large and this
    /// shape is the rarer one.
    Bucket {
        requests: Option<Box<Bucket>>,
        tokens: Option<Box<Bucket>>,
    },
}

impl Meters {
    /// `None` when there is no per-window limit at all.
    fn new(shape: LimitShape, eff: &Limits, window: Duration, now: Duration) -> Option<Meters> {
        if eff.rpm.is_none() && eff.tpm.is_none() {
            return None;
        }
        Some(match shape {
            LimitShape::Rolling => Meters::Rolling(RollingLog::new(eff.rpm, eff.tpm, window)),
            LimitShape::TokenBucket => Meters::Bucket {
                requests: eff.rpm.map(|n| Box::new(Bucket::new(n, window, now))),
                tokens: eff.tpm.map(|n| Box::new(Bucket::new(n, window, now))),
            },
        })
    }

    fn check_requests(&mut self, now: Duration) -> Result<(), Block> {
        match self {
            Meters::Rolling(r) => r.check_requests(now),
            Meters::Bucket { requests, .. } => {
                requests.as_mut().map_or(Ok(()), |b| b.check(now, 1))
            }
        }
    }

    fn check_tokens(&mut self, now: Duration, tokens: u64) -> Result<(), Block> {
        match self {
            Meters::Rolling(r) => r.check_tokens(now, tokens),
            Meters::Bucket { tokens: b, .. } => b.as_mut().map_or(Ok(()), |b| b.check(now, tokens)),
        }
    }

    fn take(&mut self, now: Duration, tokens: u64) {
        match self {
            Meters::Rolling(r) => r.reserve(tokens),
            Meters::Bucket {
                requests,
                tokens: t,
            } => {
                // Checked just before, under the same lock and time: conforms.
                if let Some(b) = requests {
                    let _ = b.take(now, 1);
                }
                if let Some(b) = t {
                    let _ = b.take(now, tokens);
                }
            }
        }
    }

    fn complete(&mut self, tokens: u64, admitted: Duration, now: Duration) {
        if let Meters::Rolling(r) = self {
            r.complete(tokens, admitted, now);
        }
    }

    fn cancel(&mut self, tokens: u64) {
        if let Meters::Rolling(r) = self {
            r.cancel(tokens);
        }
    }

    /// `(requests, tokens)` in the window (rolling) or the buckets' debt.
    fn used(&mut self, now: Duration) -> (u64, u64) {
        match self {
            Meters::Rolling(r) => r.used(now),
            Meters::Bucket { requests, tokens } => (
                requests.as_ref().map_or(0, |b| b.used(now)),
                tokens.as_ref().map_or(0, |b| b.used(now)),
            ),
        }
    }

    /// New effective limits, keeping history.
    fn set_limits(&mut self, eff: &Limits, window: Duration, now: Duration) {
        fn retune(
            b: &mut Option<Box<Bucket>>,
            limit: Option<u64>,
            window: Duration,
            now: Duration,
        ) {
            match (b.as_mut(), limit) {
                (Some(b), Some(n)) => b.set_limit(n, now),
                (None, Some(n)) => *b = Some(Box::new(Bucket::new(n, window, now))),
                (_, None) => *b = None,
            }
        }
        match self {
            Meters::Rolling(r) => r.set_limits(eff.rpm, eff.tpm),
            Meters::Bucket { requests, tokens } => {
                retune(requests, eff.rpm, window, now);
                retune(tokens, eff.tpm, window, now);
            }
        }
    }
}

/// Today's counts on the provider's calendar, with the day's bounds cached
/// so that the hot path compares two numbers instead of doing zone math.
#[derive(Debug, Clone, Copy, Default)]
struct Daily {
    day: i64,
    /// Unix ms of the day's start and of the next reset; `start == end`
    /// (as at construction) forces a lookup.
    start_ms: u64,
    end_ms: u64,
    requests: u64,
    tokens: u64,
}

/// What keys of one account share: the per-window meters, the day's
/// counts, the upstream's blocks and the limits learned from its headers.
/// A key without an account owns one of its own.
#[derive(Debug)]
struct Quota {
    /// `cfg.limits` tightened by `learned` (kept, not recomputed per call).
    eff: Limits,
    meters: Option<Meters>,
    daily: Daily,
    /// The upstream said no requests / tokens remain until then.
    blocked_requests: Duration,
    blocked_tokens: Duration,
    /// Limits, window, shape and daily reset (concurrency and probation are
    /// the key's, not the quota's).
    cfg: LimiterConfig,
    /// Limits the upstream reported stricter than `cfg` (rpm and tpm).
    learned: Limits,
}

impl Quota {
    fn new(cfg: LimiterConfig, now: Now) -> Quota {
        let mut q = Quota {
            eff: cfg.limits,
            meters: None,
            daily: Daily::default(),
            blocked_requests: Duration::ZERO,
            blocked_tokens: Duration::ZERO,
            cfg,
            learned: Limits::default(),
        };
        q.roll_day(now);
        q.build_meters(now);
        q
    }

    fn update_eff(&mut self) {
        self.eff = Limits {
            rpm: strictest(self.cfg.limits.rpm, self.learned.rpm),
            tpm: strictest(self.cfg.limits.tpm, self.learned.tpm),
            rpd: self.cfg.limits.rpd,
            tpd: self.cfg.limits.tpd,
        };
    }

    fn build_meters(&mut self, now: Now) {
        self.meters = Meters::new(self.cfg.shape, &self.eff, self.cfg.window, now.mono);
    }

    /// Applies changed effective limits, keeping history.
    fn retune(&mut self, now: Now) {
        match self.meters.as_mut() {
            Some(m) if self.eff.rpm.is_some() || self.eff.tpm.is_some() => {
                m.set_limits(&self.eff, self.cfg.window, now.mono)
            }
            _ => self.build_meters(now),
        }
    }

    /// Starts a new day's counts when `now` has left the cached day.
    fn roll_day(&mut self, now: Now) {
        let d = &mut self.daily;
        if now.unix_ms >= d.start_ms && now.unix_ms < d.end_ms {
            return;
        }
        let (day, start_ms, end_ms) = self.cfg.daily_reset.bounds(now.unix_ms);
        if day != d.day {
            d.requests = 0;
            d.tokens = 0;
        }
        d.day = day;
        d.start_ms = start_ms;
        d.end_ms = end_ms;
    }

    /// Clock time of the next daily reset.
    fn next_reset(&self, now: Now) -> Duration {
        now.mono_at(self.daily.end_ms)
    }

    /// Whether the quota lets a call charged `tokens` pass (concurrency
    /// aside).
    fn check(&mut self, now: Now, tokens: u64) -> Result<(), Refusal> {
        self.roll_day(now);
        let eff = self.eff;
        if let Some(tpd) = eff.tpd {
            if tokens > tpd {
                return Err(Refusal::Never {
                    kind: LimitKind::Tpd,
                    limit: tpd,
                    asked: tokens,
                });
            }
        }
        let mut worst: Option<(Duration, LimitKind)> = None;
        let mut later = |until: Duration, kind: LimitKind| {
            if worst.is_none_or(|(t, _)| until > t) {
                worst = Some((until, kind));
            }
        };
        if let Some(m) = self.meters.as_mut() {
            match m.check_tokens(now.mono, tokens) {
                Ok(()) => {}
                Err(Block::Never(limit)) => {
                    return Err(Refusal::Never {
                        kind: LimitKind::Tpm,
                        limit,
                        asked: tokens,
                    })
                }
                Err(Block::Until(t)) => later(t, LimitKind::Tpm),
            }
            match m.check_requests(now.mono) {
                Ok(()) => {}
                // A zero rpm: nothing ever passes this key.
                Err(Block::Never(limit)) => {
                    return Err(Refusal::Never {
                        kind: LimitKind::Rpm,
                        limit,
                        asked: 1,
                    })
                }
                Err(Block::Until(t)) => later(t, LimitKind::Rpm),
            }
        }
        if self.blocked_requests > now.mono {
            later(self.blocked_requests, LimitKind::UpstreamRequests);
        }
        if tokens > 0 && self.blocked_tokens > now.mono {
            later(self.blocked_tokens, LimitKind::UpstreamTokens);
        }
        if let Some(rpd) = eff.rpd {
            if self.daily.requests >= rpd {
                later(self.next_reset(now), LimitKind::Rpd);
            }
        }
        if let Some(tpd) = eff.tpd {
            if self.daily.tokens + tokens > tpd {
                later(self.next_reset(now), LimitKind::Tpd);
            }
        }
        match worst {
            Some((until, kind)) => Err(Refusal::Until { until, kind }),
            None => Ok(()),
        }
    }

    /// Takes one call's capacity (checked just before, under the same lock
    /// and time). Returns the day it was charged to.
    fn take(&mut self, now: Now, tokens: u64) -> i64 {
        if let Some(m) = self.meters.as_mut() {
            m.take(now.mono, tokens);
        }
        self.daily.requests += 1;
        self.daily.tokens += tokens;
        self.daily.day
    }

    fn complete(&mut self, ticket: &Ticket, now: Now, actual_tokens: Option<u64>) {
        if let Some(m) = self.meters.as_mut() {
            m.complete(ticket.tokens, ticket.admitted, now.mono);
        }
        self.roll_day(now);
        if let Some(actual) = actual_tokens {
            if ticket.day == self.daily.day {
                self.daily.tokens = self.daily.tokens.saturating_sub(ticket.tokens) + actual;
            }
        }
    }

    fn cancel(&mut self, ticket: &Ticket, now: Now) {
        if let Some(m) = self.meters.as_mut() {
            m.cancel(ticket.tokens);
        }
        self.roll_day(now);
        if ticket.day == self.daily.day {
            self.daily.requests = self.daily.requests.saturating_sub(1);
            self.daily.tokens = self.daily.tokens.saturating_sub(ticket.tokens);
        }
    }

    fn hold_back(&mut self, until: Duration) {
        self.blocked_requests = self.blocked_requests.max(until);
    }

    fn observe(&mut self, seen: &ObservedLimits, now: Now) {
        let reset =
            |ms: Option<u64>| now.mono + ms.map(Duration::from_millis).unwrap_or(self.cfg.window);
        if seen.requests_remaining == Some(0) {
            self.blocked_requests = self.blocked_requests.max(reset(seen.requests_reset_ms));
        }
        if seen.tokens_remaining == Some(0) {
            self.blocked_tokens = self.blocked_tokens.max(reset(seen.tokens_reset_ms));
        }
        let eff = self.eff;
        let mut changed = false;
        if let Some(l) = seen.requests_limit.filter(|&l| l > 0) {
            if eff.rpm.is_none_or(|c| l < c) {
                self.learned.rpm = Some(l);
                changed = true;
            }
        }
        if let Some(l) = seen.tokens_limit.filter(|&l| l > 0) {
            if eff.tpm.is_none_or(|c| l < c) {
                self.learned.tpm = Some(l);
                changed = true;
            }
        }
        if changed {
            self.update_eff();
            self.retune(now);
        }
    }

    /// The usage fields of the quota (`in_flight` is the key's).
    fn usage(&mut self, now: Now) -> LimiterUsage {
        self.roll_day(now);
        let blocked = self.blocked_requests.max(self.blocked_tokens);
        let (window_requests, window_tokens) =
            self.meters.as_mut().map_or((0, 0), |m| m.used(now.mono));
        LimiterUsage {
            in_flight: 0,
            window_requests,
            window_tokens,
            day_requests: self.daily.requests,
            day_tokens: self.daily.tokens,
            limits: self.eff,
            upstream_blocked_until: (blocked > now.mono).then_some(blocked),
        }
    }

    fn restore_daily(&mut self, now: Now, requests: u64, tokens: u64) {
        self.roll_day(now);
        self.daily.requests += requests;
        self.daily.tokens += tokens;
    }

    /// New limits, window, shape or daily reset; history is kept where the
    /// shape allows (and the day's counts while the day stays the same).
    fn reconfigure(&mut self, cfg: LimiterConfig, now: Now) {
        let same = cfg.limits == self.cfg.limits
            && cfg.window == self.cfg.window
            && cfg.shape == self.cfg.shape
            && cfg.daily_reset == self.cfg.daily_reset;
        if same {
            return;
        }
        let rebuild = cfg.shape != self.cfg.shape || cfg.window != self.cfg.window;
        if cfg.daily_reset != self.cfg.daily_reset {
            // Look the day up again on the new calendar.
            self.daily.start_ms = 0;
            self.daily.end_ms = 0;
        }
        self.cfg = cfg;
        self.roll_day(now);
        self.update_eff();
        if rebuild {
            self.build_meters(now);
        } else {
            self.retune(now);
        }
    }
}

/// One account's quota, shared by the limiters of its keys. Cheap to
/// clone (a handle). The pool calls limiters under its provider lock, so
/// this inner lock is never contended.
#[derive(Debug, Clone)]
pub struct SharedQuota(Arc<Mutex<Quota>>);

impl SharedQuota {
    /// A quota with `cfg`'s limits, window, shape and daily reset (see
    /// [`LimiterConfig::for_account`]).
    pub fn new(cfg: LimiterConfig, now: Now) -> SharedQuota {
        SharedQuota(Arc::new(Mutex::new(Quota::new(cfg, now))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Quota> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// New account limits (SIGHUP); history is kept where the shape allows.
    pub(crate) fn reconfigure(&self, cfg: LimiterConfig, now: Now) {
        self.lock().reconfigure(cfg, now);
    }

    /// Whether two handles are the same account's quota.
    pub(crate) fn same(&self, other: &SharedQuota) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Where a key's quota lives.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // inline on purpose: the hot path reads it
enum QuotaHome {
    Own(Quota),
    Shared(SharedQuota),
}

impl QuotaHome {
    fn with<R>(&mut self, f: impl FnOnce(&mut Quota) -> R) -> R {
        match self {
            QuotaHome::Own(q) => f(q),
            QuotaHome::Shared(s) => f(&mut s.lock()),
        }
    }
}

/// The in-process [`Admission`]: exact, all in memory. `repr(C)` keeps the
/// fields every check reads together, first.
#[derive(Debug)]
#[repr(C)]
pub struct LocalLimiter {
    in_flight: u32,
    /// The key has answered a call successfully since it was loaded. Until
    /// then it takes one call at a time: a bad key (invalid, out of credit)
    /// costs exactly one upstream call however large the burst, because its
    /// fate is known before a second call is admitted.
    proven: bool,
    quota: QuotaHome,
    cfg: LimiterConfig,
}

impl LocalLimiter {
    pub fn new(cfg: LimiterConfig, now: Now) -> LocalLimiter {
        LocalLimiter {
            in_flight: 0,
            proven: !cfg.probation,
            quota: QuotaHome::Own(Quota::new(cfg.clone(), now)),
            cfg,
        }
    }

    /// A key's limiter over its account's quota: the key's own
    /// concurrency cap and probation, the account's limits.
    pub fn sharing(cfg: LimiterConfig, quota: &SharedQuota) -> LocalLimiter {
        LocalLimiter {
            in_flight: 0,
            proven: !cfg.probation,
            quota: QuotaHome::Shared(quota.clone()),
            cfg,
        }
    }

    /// Moves the key onto `quota` (its account's), or back onto one of its
    /// own (`None`, starting empty). A no-op when nothing changes.
    pub(crate) fn share(&mut self, quota: Option<&SharedQuota>, now: Now) {
        match (&self.quota, quota) {
            (QuotaHome::Shared(old), Some(new)) if old.same(new) => {}
            (QuotaHome::Own(_), None) => {}
            (_, Some(new)) => self.quota = QuotaHome::Shared(new.clone()),
            (QuotaHome::Shared(_), None) => {
                self.quota = QuotaHome::Own(Quota::new(self.cfg.clone(), now))
            }
        }
    }

    #[cfg(test)]
    /// Whether the key shares an account's quota.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.quota, QuotaHome::Shared(_))
    }

    #[cfg(test)]
    /// Configured limits tightened by learned ones (the account's when shared).
    pub(crate) fn effective_limits(&mut self) -> Limits {
        self.quota.with(|q| q.eff)
    }
}

impl Admission for LocalLimiter {
    fn check(&mut self, now: Now, tokens: u64) -> Result<(), Refusal> {
        self.quota.with(|q| q.check(now, tokens))?;
        let max = if self.proven {
            self.cfg.max_concurrent
        } else {
            Some(1)
        };
        if let Some(max) = max {
            if self.in_flight >= max {
                return Err(Refusal::Busy);
            }
        }
        Ok(())
    }

    fn admit(&mut self, now: Now, tokens: u64) -> Result<Ticket, Refusal> {
        self.check(now, tokens)?;
        self.in_flight += 1;
        let day = self.quota.with(|q| q.take(now, tokens));
        Ok(Ticket {
            admitted: now.mono,
            tokens,
            day,
        })
    }

    fn complete(&mut self, ticket: Ticket, now: Now, actual_tokens: Option<u64>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        // Usage is only known from a successful answer.
        self.proven |= actual_tokens.is_some();
        self.quota.with(|q| q.complete(&ticket, now, actual_tokens));
    }

    fn cancel(&mut self, ticket: Ticket, now: Now) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.quota.with(|q| q.cancel(&ticket, now));
    }

    fn observe(&mut self, seen: &ObservedLimits, now: Now) {
        self.quota.with(|q| q.observe(seen, now));
    }

    fn hold_back(&mut self, until: Duration) {
        self.quota.with(|q| q.hold_back(until));
    }

    fn usage(&mut self, now: Now) -> LimiterUsage {
        LimiterUsage {
            in_flight: self.in_flight,
            ..self.quota.with(|q| q.usage(now))
        }
    }

    fn restore_daily(&mut self, now: Now, requests: u64, tokens: u64) {
        self.quota.with(|q| q.restore_daily(now, requests, tokens));
    }

    fn reconfigure(&mut self, cfg: LimiterConfig, now: Now) {
        if cfg == self.cfg {
            return;
        }
        if let QuotaHome::Own(q) = &mut self.quota {
            q.reconfigure(cfg.clone(), now);
        }
        self.cfg = cfg;
    }

    fn config(&self) -> &LimiterConfig {
        &self.cfg
    }
}

/// A key's limiter as the pool holds it: the in-process one inline (no
/// pointer chase on the hot path). Another [`Admission`] would be a new
/// variant here.
#[derive(Debug)]
pub(crate) enum Limiter {
    Local(LocalLimiter),
}

impl Limiter {
    fn inner(&mut self) -> &mut dyn Admission {
        match self {
            Limiter::Local(l) => l,
        }
    }

    /// Puts the key on its account's quota, or on its own (see
    /// [`LocalLimiter::share`]).
    pub(crate) fn share(&mut self, quota: Option<&SharedQuota>, now: Now) {
        let Limiter::Local(l) = self;
        l.share(quota, now);
    }
}

impl Admission for Limiter {
    fn check(&mut self, now: Now, tokens: u64) -> Result<(), Refusal> {
        self.inner().check(now, tokens)
    }
    fn admit(&mut self, now: Now, tokens: u64) -> Result<Ticket, Refusal> {
        self.inner().admit(now, tokens)
    }
    fn complete(&mut self, ticket: Ticket, now: Now, actual_tokens: Option<u64>) {
        self.inner().complete(ticket, now, actual_tokens)
    }
    fn cancel(&mut self, ticket: Ticket, now: Now) {
        self.inner().cancel(ticket, now)
    }
    fn observe(&mut self, seen: &ObservedLimits, now: Now) {
        self.inner().observe(seen, now)
    }
    fn hold_back(&mut self, until: Duration) {
        self.inner().hold_back(until)
    }
    fn usage(&mut self, now: Now) -> LimiterUsage {
        self.inner().usage(now)
    }
    fn restore_daily(&mut self, now: Now, requests: u64, tokens: u64) {
        self.inner().restore_daily(now, requests, tokens)
    }
    fn reconfigure(&mut self, cfg: LimiterConfig, now: Now) {
        self.inner().reconfigure(cfg, now)
    }
    fn config(&self) -> &LimiterConfig {
        match self {
            Limiter::Local(l) => l.config(),
        }
    }
}

#[cfg(test)]
mod tests;
