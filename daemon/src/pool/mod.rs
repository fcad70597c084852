//! The key pool: every provider's keys with their limiters, states and
//! stats, and the choice of the key that serves a call.
//!
//! - **Selection** ([`KeyPool::try_acquire`]): only keys that serve the
//!   model, that are not cooling down or disabled and whose limiter admits the
//!   call now; among them by strategy (least recently used, random, fewest in
//!   flight, random by weight). A key that cannot serve *any* call for a while
//!   is parked until then, so a selection costs O(log n), not a scan.
//!   A model parked on a key (a model-scoped quota) is checked when the
//!   key is visited for that model: each such key costs one step of a
//!   selection for that model until its reset, none for other models.
//! - **Fate** ([`KeyPool::report`]): 429s cool a key down for the upstream's
//!   hint (else the provider's `cooldown`, else `keys.default_cooldown`);
//!   invalid or out-of-credit keys are disabled and re-probed on a schedule,
//!   one job at a time (a quota with a known reset is re-probed at that
//!   reset); a quota scoped to one model parks only that model on the key
//!   until its reset, and the key keeps serving its other models; transient
//!   failures are only counted.
//! - **Waiting**: when nothing can serve, [`Acquire::Wait`] says until when;
//!   [`KeyPool::changed_since`] wakes a waiter early when capacity may have
//!   been freed (a permit released, a key reset).
//! - **Persistence hooks** for the keystore: state changes go out as
//!   [`KeyEvent`]s at once; counters accumulate until [`KeyPool::take_deltas`].
//!
//! Secrets stay in [`ApiKey`]; only [`Permit::secret`] exposes one, for the
//! request builder. Snapshots, events and errors carry ids and masked forms.
//!
//! Concurrency: one `std::sync::Mutex` per provider, held for short,
//! non-async sections; a `Permit` releases its slot on drop.

mod provider;
mod ready;

use crate::calendar::rfc3339_ms;
use crate::clock::SharedClock;
use crate::config::{Config, LimitShape, Limits, ProviderConfig};
use crate::job::Strategy;
use crate::keys::{ApiKey, KeyId, KeyRing};
use crate::limits::{Now, Ticket};
use llmq_sdk::{ObservedLimits, Outcome, QuotaReset, QuotaScope};
use provider::{Pick, ProviderState, Settings};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// Disable reason for a key whose credit or quota ran out.
pub const QUOTA_EXHAUSTED: &str = "quota_exhausted";
/// Disable reason for an invalid, revoked or suspended key.
pub const AUTH_FAILED: &str = "auth_failed";

/// What a call needs from the pool.
#[derive(Debug, Clone, Copy)]
pub struct AcquireRequest<'a> {
    pub provider: &'a str,
    /// The model id on the wire.
    pub model: &'a str,
    /// Tokens charged up front (`llmq_sdk::estimate::charged_tokens`).
    pub tokens: u64,
    /// The job's override of the provider's strategy.
    pub strategy: Option<Strategy>,
    /// The job's `route.key`.
    pub pinned: Option<&'a KeyId>,
    /// The job's `route.instance` (ignored when `pinned` is given).
    pub instance: Option<u32>,
}

/// The answer to [`KeyPool::try_acquire`].
#[derive(Debug)]
pub enum Acquire {
    Granted(Permit),
    /// Nothing can serve before `until` (clock time), unless the pool
    /// signals a change after `epoch` (see [`KeyPool::changed_since`]).
    Wait {
        until: Duration,
        epoch: u64,
    },
    /// Nothing will ever serve this: the reason, for the job's error.
    Never(String),
}

/// What happened to a call made with a permit.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    Success {
        usage_in: u64,
        usage_out: u64,
        cost_usd: f64,
    },
    /// 429: cool the key down for the hint, else the configured cooldown.
    RateLimited { retry_after: Option<Duration> },
    /// The key is unusable ([`QUOTA_EXHAUSTED`], [`AUTH_FAILED`]): disable
    /// it and re-probe it on schedule.
    Disabled { reason: String },
    /// The key's quota ran out (`quota_exhausted`, scope key): disabled like
    /// [`Fate::Disabled`], re-probed at `reset` when the provider said when
    /// the quota comes back, else after `keys.reprobe_interval`.
    QuotaExhausted {
        reason: String,
        reset: Option<QuotaReset>,
    },
    /// The quota of one model on this key ran out (`quota_exhausted` with
    /// scope `model`, e.g. Gemini's per-model, per-day quotas): only that
    /// model is parked on the key until `reset` (else for
    /// `keys.reprobe_interval`); the key itself is fine and keeps serving
    /// its other models. `model` is compared with the route's model id,
    /// case-sensitively, after stripping a `models/` prefix.
    ModelQuota {
        model: String,
        reason: String,
        reset: Option<QuotaReset>,
    },
    /// A failure that says nothing about the key (5xx, network).
    Transient,
    /// The request itself was refused (invalid, too long): the key is fine.
    Untouched,
    /// The call was never sent: its capacity is given back.
    NotSent,
}

impl Fate {
    /// The fate of a call from the plugin's outcome and the call's cost.
    pub fn from_outcome(outcome: &Outcome, cost_usd: f64) -> Fate {
        match outcome {
            Outcome::Success { usage, .. } => Fate::Success {
                usage_in: usage.input_tokens,
                usage_out: usage.output_tokens,
                cost_usd,
            },
            Outcome::RateLimited { retry_after_ms } => Fate::RateLimited {
                retry_after: retry_after_ms.map(Duration::from_millis),
            },
            Outcome::QuotaExhausted {
                reset,
                scope: QuotaScope::Key,
            } => Fate::QuotaExhausted {
                reason: QUOTA_EXHAUSTED.into(),
                reset: reset.clone(),
            },
            Outcome::QuotaExhausted {
                reset,
                scope: QuotaScope::Model(model),
            } => Fate::ModelQuota {
                model: model.clone(),
                reason: QUOTA_EXHAUSTED.into(),
                reset: reset.clone(),
            },
            Outcome::AuthFailed => Fate::Disabled {
                reason: AUTH_FAILED.into(),
            },
            Outcome::InvalidRequest
            | Outcome::ContextTooLong
            | Outcome::RequestTooLarge
            | Outcome::ModelNotFound => Fate::Untouched,
            Outcome::Transient => Fate::Transient,
        }
    }
}

/// A key's state. Times are clock times ([`crate::clock::Clock::now`]).
#[derive(Debug, Clone, PartialEq)]
pub enum KeyState {
    Available,
    CoolingDown {
        until: Duration,
    },
    Disabled {
        reason: String,
        /// Unix ms.
        since_ms: u64,
        /// When one job may re-test the key; `None` for an operator's disable.
        next_probe: Option<Duration>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Available,
    Cooling,
    Disabled,
}

impl KeyStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Available => "available",
            KeyStatus::Cooling => "cooling",
            KeyStatus::Disabled => "disabled",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<KeyStatus> {
        match s {
            "available" => Some(KeyStatus::Available),
            "cooling" => Some(KeyStatus::Cooling),
            "disabled" => Some(KeyStatus::Disabled),
            _ => None,
        }
    }
}

/// A key state in wall-clock terms: what is persisted and published, and
/// what another daemon can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub status: KeyStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_probe_ms: Option<u64>,
}

impl StateRecord {
    pub fn available() -> StateRecord {
        StateRecord {
            status: KeyStatus::Available,
            until_ms: None,
            reason: None,
            since_ms: None,
            next_probe_ms: None,
        }
    }

    pub(crate) fn of(state: &KeyState, now: Now) -> StateRecord {
        match state {
            KeyState::CoolingDown { until } if *until > now.mono => StateRecord {
                status: KeyStatus::Cooling,
                until_ms: Some(now.unix_ms_at(*until)),
                ..StateRecord::available()
            },
            KeyState::Available | KeyState::CoolingDown { .. } => StateRecord::available(),
            KeyState::Disabled {
                reason,
                since_ms,
                next_probe,
            } => StateRecord {
                status: KeyStatus::Disabled,
                until_ms: None,
                reason: Some(reason.clone()),
                since_ms: Some(*since_ms),
                next_probe_ms: next_probe.map(|t| now.unix_ms_at(t)),
            },
        }
    }

    pub(crate) fn to_state(&self, now: Now) -> KeyState {
        match self.status {
            KeyStatus::Available => KeyState::Available,
            KeyStatus::Cooling => match self.until_ms {
                Some(ms) if ms > now.unix_ms => KeyState::CoolingDown {
                    until: now.mono_at(ms),
                },
                _ => KeyState::Available,
            },
            KeyStatus::Disabled => KeyState::Disabled {
                reason: self.reason.clone().unwrap_or_else(|| "unknown".into()),
                since_ms: self.since_ms.unwrap_or(now.unix_ms),
                next_probe: self.next_probe_ms.map(|ms| now.mono_at(ms)),
            },
        }
    }
}

/// A key's state changed (sent to the keystore at once).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct KeyEvent {
    pub id: KeyId,
    #[serde(flatten)]
    pub record: StateRecord,
    pub at_ms: u64,
}

/// Lifetime counters of a key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyStats {
    /// Calls sent upstream (counted when they end; see `in_flight`).
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    /// `rate_limited`, `auth_failed`, `quota_exhausted`, `transient`,
    /// `untouched` (the request was refused), `dropped` (no report).
    pub failures_by_kind: BTreeMap<String, u64>,
    /// 429s seen.
    pub rate_limited: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
    pub last_used_ms: Option<u64>,
}

impl KeyStats {
    /// Adds counters restored from storage.
    pub(crate) fn add(&mut self, o: &KeyStats) {
        self.requests += o.requests;
        self.successes += o.successes;
        self.failures += o.failures;
        for (k, v) in &o.failures_by_kind {
            *self.failures_by_kind.entry(k.clone()).or_default() += v;
        }
        self.rate_limited += o.rate_limited;
        self.tokens_in += o.tokens_in;
        self.tokens_out += o.tokens_out;
        self.cost_usd += o.cost_usd;
        self.last_used_ms = self.last_used_ms.max(o.last_used_ms);
    }
}

/// Counter increments not yet flushed to storage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsDelta {
    /// Negative when a call was admitted and then not sent.
    pub requests: i64,
    pub successes: u64,
    pub failures: u64,
    pub failures_by_kind: BTreeMap<String, u64>,
    pub rate_limited: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
    pub last_used_ms: Option<u64>,
}

/// Daily-counter increments of one key for one UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DailyDelta {
    /// Days since the Unix epoch.
    pub day: u64,
    pub requests: i64,
    pub tokens: i64,
}

/// Usage increments of one key for one model and UTC day.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageDelta {
    pub day: u64,
    pub model: Arc<str>,
    pub requests: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
}

/// Spend increments of one provider for one UTC day.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendDelta {
    pub provider: Arc<str>,
    pub day: u64,
    pub usd: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyDelta {
    pub id: KeyId,
    pub stats: StatsDelta,
    pub daily: Vec<DailyDelta>,
    pub usage: Vec<UsageDelta>,
}

/// Everything to flush, taken at once (the keystore merges takes it could
/// not write into `keystore::PendingCounters`, per key and day).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deltas {
    pub keys: Vec<KeyDelta>,
    pub spend: Vec<SpendDelta>,
}

impl Deltas {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.spend.is_empty()
    }
}

/// What storage knew about a key at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    pub state: Option<StateRecord>,
    pub stats: Option<KeyStats>,
    /// Today's `(requests, tokens)`.
    pub daily: Option<(u64, u64)>,
}

/// One key as `llmq keys` and `GET /v1/keys` show it. Never the secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeySnapshot {
    pub id: KeyId,
    pub provider: String,
    pub instance: u32,
    pub masked: String,
    /// Where the key came from (a variable name or config path).
    pub source: String,
    pub weight: u32,
    pub models: Vec<String>,
    /// The account whose limits the key shares, if any.
    pub account: Option<String>,
    pub status: KeyStatus,
    pub reason: Option<String>,
    pub cooldown_until_ms: Option<u64>,
    pub disabled_since_ms: Option<u64>,
    pub next_probe_ms: Option<u64>,
    /// A probe call is in flight.
    pub probing: bool,
    /// Effective limits (configured, tightened by the upstream's headers).
    pub limits: Limits,
    pub max_concurrent: Option<u32>,
    pub window_ms: u64,
    pub shape: LimitShape,
    pub in_flight: u32,
    /// Usage of the current window, for usage bars.
    pub window_requests: u64,
    pub window_tokens: u64,
    /// Today's counts (the provider's day; the account's when shared).
    pub day_requests: u64,
    pub day_tokens: u64,
    pub upstream_blocked_until_ms: Option<u64>,
    pub stats: KeyStats,
    /// Models parked on this key by a model-scoped quota, until their reset.
    pub parked_models: Vec<ParkedModel>,
}

/// One model parked on a key (`quota_exhausted` scoped to that model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedModel {
    /// The model id as the quota named it, without a `models/` prefix.
    pub model: String,
    /// Unix ms when the key may serve the model again.
    pub until_ms: u64,
    pub reason: String,
}

/// A model id as quotas and routes are matched: case-sensitive, without a
/// `models/` prefix (Gemini names models both ways).
pub(crate) fn model_key(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

/// Clock time of a provider's next daily reset (its `daily_reset`, e.g.
/// Pacific midnight for Gemini), when per-day quotas come back.
pub(crate) fn next_daily_reset(provider: &ProviderConfig, now: Now) -> Duration {
    now.mono_at(provider.daily_reset.next_after(now.unix_ms))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("no key {0}")]
    UnknownKey(KeyId),
}

struct Provider {
    state: Mutex<ProviderState>,
}

struct Inner {
    clock: SharedClock,
    /// Wall time as an offset from the monotonic clock (`unix_ms - mono_ms`),
    /// re-read at most once a second: one clock read per call, not two.
    wall_offset_ms: AtomicI64,
    wall_synced_ms: AtomicU64,
    providers: RwLock<FnvMap<Arc<str>, Arc<Provider>>>,
    epoch: AtomicU64,
    notify: Notify,
    events: Mutex<Option<mpsc::UnboundedSender<KeyEvent>>>,
}

impl Inner {
    fn new(clock: SharedClock) -> Inner {
        let now = Now::of(&*clock);
        let mono_ms = now.mono.as_millis() as u64;
        Inner {
            clock,
            wall_offset_ms: AtomicI64::new(now.unix_ms as i64 - mono_ms as i64),
            wall_synced_ms: AtomicU64::new(mono_ms),
            providers: RwLock::new(FnvMap::default()),
            epoch: AtomicU64::new(0),
            notify: Notify::new(),
            events: Mutex::new(None),
        }
    }

    fn now(&self) -> Now {
        let mono = self.clock.now();
        let mono_ms = mono.as_millis() as u64;
        let synced = self.wall_synced_ms.load(Ordering::Relaxed);
        if mono_ms.abs_diff(synced) >= 1_000 {
            let unix_ms = self.clock.unix_ms();
            self.wall_offset_ms
                .store(unix_ms as i64 - mono_ms as i64, Ordering::Relaxed);
            self.wall_synced_ms.store(mono_ms, Ordering::Relaxed);
            return Now { mono, unix_ms };
        }
        let offset = self.wall_offset_ms.load(Ordering::Relaxed);
        Now {
            mono,
            unix_ms: (mono_ms as i64 + offset).max(0) as u64,
        }
    }

    /// Capacity may have been freed: wake the waiters.
    fn signal(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// FNV-1a, for the small maps on the hot path whose keys come from config
/// (provider names, wire model ids): a few ns instead of SipHash's tens.
#[derive(Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

pub(crate) type FnvMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// All providers' keys. Cheap to clone (shared).
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<Inner>,
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let providers = self
            .inner
            .providers
            .read()
            .map(|p| p.len())
            .unwrap_or_default();
        f.debug_struct("KeyPool")
            .field("providers", &providers)
            .finish_non_exhaustive()
    }
}

impl KeyPool {
    /// A pool of the ring's keys, limited as `config` says.
    pub fn new(config: &Config, ring: &KeyRing, clock: SharedClock) -> KeyPool {
        let pool = KeyPool {
            inner: Arc::new(Inner::new(clock)),
        };
        pool.reload(config, ring);
        pool
    }

    pub(crate) fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// Applies a new config and key ring (SIGHUP). Keys that stay keep their
    /// limiter history, state and stats; keys that go are retired (their
    /// permits still release cleanly).
    pub fn reload(&self, config: &Config, ring: &KeyRing) {
        let now = self.inner.now();
        let events = lock(&self.inner.events).clone();
        let mut names: BTreeSet<&str> = ring.providers().collect();
        names.extend(config.providers.keys().map(String::as_str));
        let mut providers = self
            .inner
            .providers
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for name in names {
            let pc = config.providers.get(name).cloned().unwrap_or_default();
            let keys = if pc.enabled {
                ring.for_provider(name)
            } else {
                &[]
            };
            let settings = Settings {
                provider: pc,
                keys: config.keys.clone(),
            };
            let p = providers
                .entry(Arc::from(name))
                .or_insert_with(|| {
                    Arc::new(Provider {
                        state: Mutex::new(ProviderState::new(
                            Arc::from(name),
                            settings.clone(),
                            now,
                        )),
                    })
                })
                .clone();
            let mut st = lock(&p.state);
            st.events = events.clone();
            st.sync(settings, keys, now);
        }
        for (name, p) in providers.iter() {
            if ring.for_provider(name).is_empty() && !config.providers.contains_key(&**name) {
                let mut st = lock(&p.state);
                let settings = st.settings.clone();
                st.sync(settings, &[], now);
            }
        }
        drop(providers);
        self.inner.signal();
    }

    fn provider(&self, name: &str) -> Option<Arc<Provider>> {
        self.inner
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Picks a key that can make this call now and books the call on it.
    pub fn try_acquire(&self, req: &AcquireRequest<'_>) -> Acquire {
        self.try_acquire_except(req, &[])
    }

    /// [`KeyPool::try_acquire`] without the keys in `exclude` (keys that
    /// refused this job's request as too large). When every key that could
    /// serve is excluded the answer is [`Acquire::Never`].
    pub fn try_acquire_except(&self, req: &AcquireRequest<'_>, exclude: &[KeyId]) -> Acquire {
        let epoch = self.inner.epoch.load(Ordering::SeqCst);
        let Some(provider) = self.provider(req.provider) else {
            return Acquire::Never(format!("provider {} has no keys", req.provider));
        };
        let now = self.inner.now();
        let mut st = lock(&provider.state);
        let model = st.model_id(req.model);
        match st.acquire(req, model, exclude, now) {
            Pick::Granted { idx, ticket, probe } => {
                let key = st.keys[idx as usize].key.clone();
                drop(st);
                Acquire::Granted(Permit {
                    inner: self.inner.clone(),
                    provider,
                    idx,
                    key,
                    ticket: Some(ticket),
                    model,
                    probe,
                })
            }
            Pick::Wait(until) => Acquire::Wait { until, epoch },
            Pick::Never(why) => Acquire::Never(why),
        }
    }

    /// Ends a call with what happened upstream.
    pub(crate) fn report(&self, permit: Permit, fate: Fate) {
        permit.report(fate);
    }

    /// Limits the upstream reported for a key (rate-limit headers).
    pub fn observe(&self, id: &KeyId, seen: &ObservedLimits) {
        if seen.is_empty() {
            return;
        }
        if let Some(p) = self.provider(id.provider()) {
            let now = self.inner.now();
            let mut st = lock(&p.state);
            if let Some(idx) = st.index_of(id) {
                st.observe(idx, seen, now);
            }
        }
    }

    /// Grants no call on a key for `hold`: the cluster gate refused it (a
    /// full window, a cooldown or a disabled key elsewhere; `why` says
    /// which, for the log), so this daemon does not ask again sooner. The
    /// key's state and limits are untouched; a key of an account holds the
    /// account's quota back, as an upstream's "no requests remain" would.
    /// An unknown key is ignored (a reload removed it).
    pub fn hold_back(&self, id: &KeyId, hold: Duration, why: &str) {
        if let Some(p) = self.provider(id.provider()) {
            let now = self.inner.now();
            let mut st = lock(&p.state);
            if let Some(idx) = st.index_of(id) {
                tracing::trace!(key = %id, ?hold, why, "pool: key held back");
                st.hold_back(idx, now.mono + hold);
            }
        }
    }

    fn with_key<T>(
        &self,
        id: &KeyId,
        f: impl FnOnce(&mut ProviderState, u32, Now) -> T,
    ) -> Result<T, PoolError> {
        let p = self
            .provider(id.provider())
            .ok_or_else(|| PoolError::UnknownKey(id.clone()))?;
        let now = self.inner.now();
        let mut st = lock(&p.state);
        let idx = st
            .index_of(id)
            .ok_or_else(|| PoolError::UnknownKey(id.clone()))?;
        Ok(f(&mut st, idx, now))
    }

    /// Re-enables a key and clears its cooldown and model parks (operator action).
    pub fn reset(&self, id: &KeyId) -> Result<(), PoolError> {
        self.with_key(id, |st, idx, now| {
            st.keys[idx as usize].parks.clear();
            st.set_state(idx, KeyState::Available, now, true)
        })?;
        self.inner.signal();
        Ok(())
    }

    /// Disables a key until an operator resets it (no probes).
    pub fn disable(&self, id: &KeyId, reason: &str) -> Result<(), PoolError> {
        self.with_key(id, |st, idx, now| {
            let state = KeyState::Disabled {
                reason: reason.to_string(),
                since_ms: now.unix_ms,
                next_probe: None,
            };
            st.set_state(idx, state, now, true)
        })?;
        self.inner.signal();
        Ok(())
    }

    /// Unix ms of a quota's reset for a provider (`NextDaily`: the
    /// provider's next daily reset).
    pub(crate) fn quota_reset_ms(&self, provider: &str, reset: &QuotaReset) -> u64 {
        match reset {
            QuotaReset::At { unix_ms } => *unix_ms,
            QuotaReset::NextDaily => {
                let now = self.inner.now();
                let pc = self
                    .provider(provider)
                    .map(|p| lock(&p.state).settings.provider.clone())
                    .unwrap_or_default();
                now.unix_ms_at(next_daily_reset(&pc, now))
            }
        }
    }

    /// Turns a `NextDaily` quota reset in `outcome` into the instant it
    /// means for this provider, so that the pool and the cluster gate park
    /// the key until the same time.
    pub(crate) fn resolve_reset(&self, provider: &str, outcome: &mut Outcome) {
        if let Outcome::QuotaExhausted {
            reset: Some(reset @ QuotaReset::NextDaily),
            ..
        } = outcome
        {
            *reset = QuotaReset::At {
                unix_ms: self.quota_reset_ms(provider, reset),
            };
        }
    }

    /// Why keys of `provider` cannot serve `model` for a while because of a
    /// model-scoped quota: "quota for model m on key X exhausted until …".
    pub fn model_parks(&self, provider: &str, model: &str) -> Vec<String> {
        let Some(p) = self.provider(provider) else {
            return vec![];
        };
        let now = self.inner.now();
        let st = lock(&p.state);
        let m = model_key(model);
        let mut out = Vec::new();
        for idx in st.live_indexes() {
            let e = &st.keys[idx as usize];
            for park in e
                .parks
                .iter()
                .filter(|p| &*p.model == m && p.until > now.mono)
            {
                out.push(format!(
                    "quota for model {m} on key {} exhausted until {} ({})",
                    e.key.id,
                    rfc3339_ms(now.unix_ms_at(park.until)),
                    park.reason
                ));
            }
        }
        out
    }

    /// A key's current state.
    pub fn state(&self, id: &KeyId) -> Result<KeyState, PoolError> {
        self.with_key(id, |st, idx, _| st.keys[idx as usize].state.clone())
    }

    /// A counter that moves whenever capacity may have been freed.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::SeqCst)
    }

    /// Resolves once the pool has signalled a change after `epoch` (at once
    /// if it already has). Take the epoch *before* trying to acquire — or use
    /// the one in [`Acquire::Wait`] — so that no release is missed:
    /// `select!(sleep_until(min(until, deadline)), pool.changed_since(epoch))`.
    pub async fn changed_since(&self, epoch: u64) {
        let notified = self.inner.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.inner.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        notified.await;
    }

    /// Every key, sorted by id, as `llmq keys` shows them.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        let providers: Vec<Arc<Provider>> = self
            .inner
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let now = self.inner.now();
        let mut out = Vec::new();
        for p in providers {
            let mut st = lock(&p.state);
            let idxs: Vec<u32> = st.live_indexes().collect();
            out.extend(idxs.into_iter().map(|i| st.snapshot(i, now)));
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn key_snapshot(&self, id: &KeyId) -> Result<KeySnapshot, PoolError> {
        self.with_key(id, |st, idx, now| st.snapshot(idx, now))
    }

    /// Ids of every key in the pool.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.snapshot_ids()
    }

    fn snapshot_ids(&self) -> Vec<KeyId> {
        let providers: Vec<Arc<Provider>> = self
            .inner
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut ids = Vec::new();
        for p in providers {
            let st = lock(&p.state);
            ids.extend(
                st.live_indexes()
                    .map(|i| st.keys[i as usize].key.id.clone()),
            );
        }
        ids.sort();
        ids
    }

    /// Names of the providers the pool knows.
    pub(crate) fn providers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .map(|k| k.to_string())
            .collect();
        names.sort();
        names
    }

    /// State changes from now on, for the keystore. A new subscription
    /// replaces the previous one.
    pub(crate) fn subscribe_events(&self) -> mpsc::UnboundedReceiver<KeyEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&self.inner.events) = Some(tx.clone());
        for p in self
            .inner
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            lock(&p.state).events = Some(tx.clone());
        }
        rx
    }

    /// Takes the counters accumulated since the last call.
    pub fn take_deltas(&self) -> Deltas {
        let providers: Vec<Arc<Provider>> = self
            .inner
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut d = Deltas::default();
        for p in providers {
            lock(&p.state).take_deltas(&mut d.keys, &mut d.spend);
        }
        d
    }

    /// Applies what storage knew about a key (at start, or later if Redis
    /// was unreachable then): counters add up; the stored state applies
    /// unless this run already moved the key out of `Available`.
    pub fn restore(&self, id: &KeyId, restored: Restored) -> Result<(), PoolError> {
        self.with_key(id, |st, idx, now| st.restore(idx, restored, now))?;
        self.inner.signal();
        Ok(())
    }

    /// Adds spend already recorded today for a provider (at start).
    pub(crate) fn restore_spend(&self, provider: &str, usd: f64) {
        if let Some(p) = self.provider(provider) {
            let now = self.inner.now();
            lock(&p.state).restore_spend(usd, now);
        }
    }

    /// A provider's spend today (its own day): restored from `llmq:spend`
    /// at start plus the costs reported since. The write side of spend (the
    /// keystore flushes its increments); the budget's cap reads its own
    /// derived ledger (ARCHITECTURE.md, "Where spend lives").
    pub fn spend_today(&self, provider: &str) -> f64 {
        let now = self.inner.now();
        self.provider(provider)
            .map_or(0.0, |p| lock(&p.state).spend_today(now))
    }

    /// When a provider's day starts (its `daily_reset`; UTC midnight for
    /// an unknown provider).
    pub(crate) fn daily_reset(&self, provider: &str) -> crate::calendar::DailyReset {
        self.provider(provider)
            .map(|p| lock(&p.state).settings.provider.daily_reset.clone())
            .unwrap_or_default()
    }
}

/// The right to make one call with one key. Dropping it without a report
/// (an early return, a panic, a job future dropped in the middle of its
/// call) ends the call with an unknown fate: the concurrency slot is
/// released, the limiter ticket completed as if the call was sent (its slot
/// counts from now, never earlier than the upstream saw it), and a probe it
/// held is freed at once (the key keeps its state; a disabled key's
/// re-probe is due again at once).
pub struct Permit {
    inner: Arc<Inner>,
    provider: Arc<Provider>,
    idx: u32,
    key: Arc<ApiKey>,
    ticket: Option<Ticket>,
    model: u32,
    probe: bool,
}

impl Permit {
    pub fn key_id(&self) -> &KeyId {
        &self.key.id
    }

    /// The secret, for the request builder only. `None` when keyless.
    pub fn secret(&self) -> Option<&str> {
        self.key.expose_secret()
    }

    pub fn masked(&self) -> &str {
        &self.key.masked
    }

    /// This call re-tests a disabled key.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Tokens charged up front.
    pub(crate) fn tokens(&self) -> u64 {
        self.ticket.as_ref().map_or(0, Ticket::tokens)
    }

    /// Ends the call with what happened upstream.
    pub fn report(mut self, fate: Fate) {
        if let Some(ticket) = self.ticket.take() {
            self.finish(ticket, Some(fate));
        }
    }

    fn finish(&self, ticket: Ticket, fate: Option<Fate>) {
        let now = self.inner.now();
        lock(&self.provider.state).release(self.idx, ticket, self.model, self.probe, fate, now);
        self.inner.signal();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.finish(ticket, None);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.key.id)
            .field("masked", &self.key.masked)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
