//! Shared server state: the key table with each key's limiter and counters,
//! the queue of injected failures, and the [`Stats`] view computed from them.
//!
//! Every key has its own mutex, held only for a few arithmetic steps and
//! never across an await; the key table is behind a read-mostly `RwLock`.

use crate::config::{FailureKind, Injection, KeySpec, KeyState, MockConfig, Shape};
use crate::format::mask_key;
use crate::limiter::{Decision, Limiter, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tokio::time::Instant;

/// The label under which requests with unconfigured or missing keys are counted.
pub const UNKNOWN_LABEL: &str = "unknown";

/// Everything `GET /_mock/stats` returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Every request to a provider route.
    pub total_calls: u64,
    /// Requests served with a normal success (they passed the limits).
    pub total_accepted: u64,
    /// Requests refused because a key's rate limit was exceeded.
    pub total_429: u64,
    /// The limit window, for interpreting the `peak_window_*` figures.
    pub window_ms: u64,
    /// Per key, by label (never the raw key).
    pub keys: BTreeMap<String, KeyStats>,
}

/// Counters of one key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyStats {
    pub calls: u64,
    pub accepted: u64,
    /// Refused by the key's own limits (injected 429s and `insufficient_quota`
    /// are not counted here; see `outcomes`).
    pub rejected_429: u64,
    /// Count per outcome: `ok`, `rate_limited`, `missing_key`, `invalid_key`,
    /// `no_credit`, `suspended`, `bad_request`, `model_not_found`,
    /// `context_too_long`, or an injected failure kind (`status_500`, …).
    pub outcomes: BTreeMap<String, u64>,
    /// Tokens charged (prompt estimate + max_tokens) by accepted requests.
    pub tokens_charged: u64,
    /// Most accepted requests in any `window_ms` interval of the whole run.
    pub peak_window_accepted: u64,
    /// Most charged tokens in any `window_ms` interval of the whole run.
    pub peak_window_tokens: u64,
    /// Most requests of this key being handled at once.
    pub max_in_flight: u64,
    /// Requests that passed the key in the URL (`?key=`) instead of a header.
    pub key_in_url: u64,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
}

/// What happened to one request (the stats `outcomes` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    RateLimited,
    MissingKey,
    InvalidKey,
    NoCredit,
    Suspended,
    BadRequest,
    ModelNotFound,
    ContextTooLong,
    Injected(FailureKind),
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RateLimited => "rate_limited",
            Outcome::MissingKey => "missing_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::NoCredit => "no_credit",
            Outcome::Suspended => "suspended",
            Outcome::BadRequest => "bad_request",
            Outcome::ModelNotFound => "model_not_found",
            Outcome::ContextTooLong => "context_too_long",
            Outcome::Injected(k) => k.as_str(),
        }
    }
}

/// Locks a mutex, recovering the data if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default, Clone)]
struct Counters {
    calls: u64,
    accepted: u64,
    rejected_429: u64,
    tokens_charged: u64,
    key_in_url: u64,
    outcomes: BTreeMap<&'static str, u64>,
}

impl Counters {
    fn count(&mut self, outcome: Outcome, key_in_url: bool) {
        self.calls += 1;
        self.key_in_url += u64::from(key_in_url);
        *self.outcomes.entry(outcome.as_str()).or_default() += 1;
    }
}

struct KeyInner {
    label: Arc<str>,
    state: KeyState,
    latency_ms: Option<u64>,
    rpm: Option<u32>,
    tpm: Option<u64>,
    limiter: Limiter,
    counters: Counters,
    /// Every accepted request of the run: (ns since start, tokens charged).
    history: Vec<(u64, u64)>,
}

/// What the request pipeline needs to know about a key before admitting it.
pub(crate) struct KeyView {
    pub label: Arc<str>,
    pub state: KeyState,
    pub latency_ms: Option<u64>,
}

/// One key (or the shared "unknown" slot) and its live state.
pub(crate) struct KeyEntry {
    inner: Mutex<KeyInner>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// Decrements the in-flight count when a request is done (or cancelled).
pub(crate) struct InFlight<'a>(&'a KeyEntry);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl KeyEntry {
    fn new(label: Arc<str>, spec: Option<&KeySpec>, shape: Shape, window_ns: u64) -> Self {
        let (state, latency_ms, rpm, tpm, shape) = match spec {
            Some(s) => (
                s.state,
                s.latency_ms,
                s.rpm,
                s.tpm,
                s.shape.unwrap_or(shape),
            ),
            None => (KeyState::Valid, None, None, None, shape),
        };
        KeyEntry {
            inner: Mutex::new(KeyInner {
                label,
                state,
                latency_ms,
                rpm,
                tpm,
                limiter: Limiter::new(shape, rpm, tpm, window_ns),
                counters: Counters::default(),
                history: Vec::new(),
            }),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        }
    }

    /// Replaces the key's settings and limiter, keeping its counters.
    fn respec(&self, label: Arc<str>, spec: &KeySpec, shape: Shape, window_ns: u64) {
        let mut g = lock(&self.inner);
        g.label = label;
        g.state = spec.state;
        g.latency_ms = spec.latency_ms;
        g.rpm = spec.rpm;
        g.tpm = spec.tpm;
        g.limiter = Limiter::new(spec.shape.unwrap_or(shape), spec.rpm, spec.tpm, window_ns);
    }

    pub fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn view(&self) -> KeyView {
        let g = lock(&self.inner);
        KeyView {
            label: g.label.clone(),
            state: g.state,
            latency_ms: g.latency_ms,
        }
    }

    /// Counts a request that did not reach the limiter.
    pub fn record(&self, outcome: Outcome, key_in_url: bool) {
        lock(&self.inner).counters.count(outcome, key_in_url);
    }

    /// Checks the limits on arrival and counts the request either way.
    /// The time is read under the lock so each key's history stays sorted.
    pub fn admit(&self, epoch: Instant, charge: u64, key_in_url: bool) -> Decision {
        let mut g = lock(&self.inner);
        let now = epoch.elapsed().as_nanos() as u64;
        let decision = g.limiter.check(now, charge);
        match decision {
            Decision::Accepted(_) => {
                g.counters.count(Outcome::Ok, key_in_url);
                g.counters.accepted += 1;
                g.counters.tokens_charged += charge;
                g.history.push((now, charge));
            }
            Decision::Rejected(..) => {
                g.counters.count(Outcome::RateLimited, key_in_url);
                g.counters.rejected_429 += 1;
            }
        }
        decision
    }

    /// The limiter state, for headers on responses that did not go through it.
    pub fn snapshot(&self, epoch: Instant) -> Snapshot {
        let mut g = lock(&self.inner);
        let now = epoch.elapsed().as_nanos() as u64;
        g.limiter.snapshot(now)
    }

    fn reset_stats(&self) {
        let mut g = lock(&self.inner);
        g.counters = Counters::default();
        g.history = Vec::new();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

struct PendingInjection {
    /// Raw key or label; `None` matches every request.
    target: Option<String>,
    injection: Injection,
    remaining: u32,
}

/// The state shared by all connections of one server.
pub(crate) struct Shared {
    pub epoch: Instant,
    pub window_ms: u64,
    window_ns: u64,
    shape: Shape,
    pub accept_unknown_keys: bool,
    pub default_latency_ms: u64,
    pub contexts: HashMap<String, u64>,
    keys: RwLock<HashMap<String, Arc<KeyEntry>>>,
    unknown: Arc<KeyEntry>,
    injections: Mutex<VecDeque<PendingInjection>>,
    pending: AtomicUsize,
    seq: AtomicU64,
}

impl Shared {
    pub fn new(config: &MockConfig) -> Self {
        let window_ms = config.window_ms.max(1);
        let window_ns = window_ms * 1_000_000;
        let shared = Shared {
            epoch: Instant::now(),
            window_ms,
            window_ns,
            shape: config.shape,
            accept_unknown_keys: config.accept_unknown_keys,
            default_latency_ms: config.default_latency_ms,
            contexts: config
                .contexts
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            keys: RwLock::new(HashMap::new()),
            unknown: Arc::new(KeyEntry::new(
                Arc::from(UNKNOWN_LABEL),
                None,
                config.shape,
                window_ns,
            )),
            injections: Mutex::new(VecDeque::new()),
            pending: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
        };
        shared.add_keys(&config.keys);
        shared
    }

    /// A fresh id for response and request ids.
    pub fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The entry of a key, and whether the key is configured.
    pub fn lookup(&self, key: Option<&str>) -> (Arc<KeyEntry>, bool) {
        if let Some(k) = key {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = keys.get(k) {
                return (e.clone(), true);
            }
        }
        (self.unknown.clone(), false)
    }

    /// Adds keys, or replaces the settings of keys already present (their
    /// counters are kept). Labels are made unique with a `~N` suffix.
    pub fn add_keys(&self, specs: &[KeySpec]) -> Vec<String> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let mut labels = Vec::with_capacity(specs.len());
        for spec in specs {
            let taken: Vec<Arc<str>> = keys
                .iter()
                .filter(|(k, _)| k.as_str() != spec.key)
                .map(|(_, e)| e.view().label)
                .collect();
            let base = spec.label.clone().unwrap_or_else(|| mask_key(&spec.key));
            let mut label = base.clone();
            let mut n = 2;
            while label == UNKNOWN_LABEL || taken.iter().any(|t| **t == *label) {
                label = format!("{base}~{n}");
                n += 1;
            }
            labels.push(label.clone());
            let label: Arc<str> = Arc::from(label);
            match keys.get(&spec.key) {
                Some(entry) => entry.respec(label, spec, self.shape, self.window_ns),
                None => {
                    let entry = KeyEntry::new(label, Some(spec), self.shape, self.window_ns);
                    keys.insert(spec.key.clone(), Arc::new(entry));
                }
            }
        }
        labels
    }

    /// Queues failures for one key (raw key or label) or for all.
    pub fn inject(&self, target: Option<&str>, failures: &[Injection]) {
        let mut q = lock(&self.injections);
        for inj in failures.iter().filter(|i| i.count > 0) {
            q.push_back(PendingInjection {
                target: target.map(str::to_owned),
                injection: inj.clone(),
                remaining: inj.count,
            });
            self.pending.fetch_add(1, Ordering::Release);
        }
    }

    /// Takes the next queued failure matching this request, oldest first.
    pub fn take_injection(&self, raw_key: Option<&str>, label: &str) -> Option<Injection> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut q = lock(&self.injections);
        let idx = q.iter().position(|p| match &p.target {
            None => true,
            Some(t) => Some(t.as_str()) == raw_key || t == label,
        })?;
        let p = &mut q[idx];
        let injection = p.injection.clone();
        p.remaining -= 1;
        if p.remaining == 0 {
            q.remove(idx);
            self.pending.fetch_sub(1, Ordering::Release);
        }
        Some(injection)
    }

    /// Clears all counters and histories (limiters and injections stay).
    pub fn reset_stats(&self) {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        for e in keys.values() {
            e.reset_stats();
        }
        self.unknown.reset_stats();
    }

    pub fn stats(&self) -> Stats {
        struct Acc {
            c: Counters,
            history: Vec<(u64, u64)>,
            merged: bool,
            max_in_flight: u64,
            rpm: Option<u32>,
            tpm: Option<u64>,
        }
        let mut by_label: BTreeMap<String, Acc> = BTreeMap::new();
        let entries: Vec<Arc<KeyEntry>> = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            keys.values().cloned().collect()
        };
        let unknown = self.unknown.clone();
        for (entry, always) in entries
            .iter()
            .map(|e| (e, true))
            .chain(std::iter::once((&unknown, false)))
        {
            let (label, c, history, rpm, tpm) = {
                let g = lock(&entry.inner);
                if !always && g.counters.calls == 0 {
                    continue;
                }
                (
                    g.label.to_string(),
                    g.counters.clone(),
                    g.history.clone(),
                    g.rpm,
                    g.tpm,
                )
            };
            let max_in_flight = entry.max_in_flight.load(Ordering::Relaxed);
            match by_label.get_mut(&label) {
                Some(acc) => {
                    acc.c.calls += c.calls;
                    acc.c.accepted += c.accepted;
                    acc.c.rejected_429 += c.rejected_429;
                    acc.c.tokens_charged += c.tokens_charged;
                    acc.c.key_in_url += c.key_in_url;
                    for (k, v) in c.outcomes {
                        *acc.c.outcomes.entry(k).or_default() += v;
                    }
                    acc.history.extend(history);
                    acc.merged = true;
                    acc.max_in_flight = acc.max_in_flight.max(max_in_flight);
                }
                None => {
                    by_label.insert(
                        label,
                        Acc {
                            c,
                            history,
                            merged: false,
                            max_in_flight,
                            rpm,
                            tpm,
                        },
                    );
                }
            }
        }
        let mut stats = Stats {
            window_ms: self.window_ms,
            ..Stats::default()
        };
        for (label, mut acc) in by_label {
            if acc.merged {
                acc.history.sort_unstable();
            }
            let (peak_n, peak_t) = peak_window(&acc.history, self.window_ns);
            stats.total_calls += acc.c.calls;
            stats.total_accepted += acc.c.accepted;
            stats.total_429 += acc.c.rejected_429;
            stats.keys.insert(
                label,
                KeyStats {
                    calls: acc.c.calls,
                    accepted: acc.c.accepted,
                    rejected_429: acc.c.rejected_429,
                    outcomes: acc
                        .c
                        .outcomes
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), *v))
                        .collect(),
                    tokens_charged: acc.c.tokens_charged,
                    peak_window_accepted: peak_n,
                    peak_window_tokens: peak_t,
                    max_in_flight: acc.max_in_flight,
                    key_in_url: acc.c.key_in_url,
                    rpm: acc.rpm,
                    tpm: acc.tpm,
                },
            );
        }
        stats
    }
}

/// The most entries, and the most tokens, among sorted `(time, tokens)`
/// entries in any half-open interval `[t, t + window)`.
pub(crate) fn peak_window(history: &[(u64, u64)], window: u64) -> (u64, u64) {
    let (mut i, mut sum, mut best_n, mut best_t) = (0usize, 0u64, 0u64, 0u64);
    for (j, &(t, k)) in history.iter().enumerate() {
        sum += k;
        while t - history[i].0 >= window {
            sum -= history[i].1;
            i += 1;
        }
        best_n = best_n.max((j - i + 1) as u64);
        best_t = best_t.max(sum);
    }
    (best_n, best_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FailureKind;

    #[test]
    fn peak_window_is_exact() {
        assert_eq!(peak_window(&[], 10), (0, 0));
        let h = [(0, 1), (5, 2), (9, 3), (10, 4), (19, 5), (30, 6)];
        // [0,10): 3 entries/6 tokens; [9,19): 2; [10,20): 2 entries/9 tokens.
        assert_eq!(peak_window(&h, 10), (3, 9));
        assert_eq!(peak_window(&h, 1), (1, 6));
        assert_eq!(peak_window(&h, 100), (6, 21));
    }

    #[test]
    fn labels_are_unique_and_injections_match_key_or_label() {
        let cfg = MockConfig::default()
            .key(KeySpec::new("sk-aaaa-xxxx-0001"))
            .key(KeySpec::new("sk-aaaa-yyyy-0001"))
            .key(KeySpec::new("raw-3").label("unknown"));
        let s = Shared::new(&cfg);
        let stats = s.stats();
        let labels: Vec<&str> = stats.keys.keys().map(String::as_str).collect();
        assert_eq!(labels, ["sk-a…0001", "sk-a…0001~2", "unknown~2"]);

        s.inject(
            Some("sk-a…0001~2"),
            &[Injection::new(FailureKind::Reset, 2)],
        );
        s.inject(None, &[Injection::new(FailureKind::Status500, 1)]);
        assert_eq!(
            s.take_injection(Some("sk-aaaa-xxxx-0001"), "sk-a…0001")
                .map(|i| i.kind),
            Some(FailureKind::Status500)
        );
        assert!(s
            .take_injection(Some("sk-aaaa-xxxx-0001"), "sk-a…0001")
            .is_none());
        for _ in 0..2 {
            assert_eq!(
                s.take_injection(Some("sk-aaaa-yyyy-0001"), "sk-a…0001~2")
                    .map(|i| i.kind),
                Some(FailureKind::Reset)
            );
        }
        assert!(s
            .take_injection(Some("sk-aaaa-yyyy-0001"), "sk-a…0001~2")
            .is_none());
    }
}
