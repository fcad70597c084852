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
use tokio::sync::watch;
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
    /// Per account ([`KeySpec::account`]): the ground truth of the limiter
    /// its keys share.
    pub accounts: BTreeMap<String, AccountStats>,
}

/// Counters of one account, over all its keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AccountStats {
    /// Labels of the keys in the account, sorted.
    pub keys: Vec<String>,
    /// Requests of the account's keys served with a normal success.
    pub accepted: u64,
    /// Requests refused by the account's shared limits.
    pub rejected_429: u64,
    /// Tokens charged by accepted requests.
    pub tokens_charged: u64,
    /// Most accepted requests of all the account's keys together in any
    /// `window_ms` interval of the run.
    pub peak_window_accepted: u64,
    /// Most charged tokens of the account in any `window_ms` interval.
    pub peak_window_tokens: u64,
    /// The shared limits (those of the account's first key).
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
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
    /// The key's account, if any (its limits are then the account's).
    pub account: Option<String>,
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

/// A limiter and the requests it admitted: one per key, or one per account
/// shared by all the account's keys.
pub(crate) struct LimitGroup {
    limiter: Limiter,
    rpm: Option<u32>,
    tpm: Option<u64>,
    accepted: u64,
    rejected_429: u64,
    tokens_charged: u64,
    /// Every request admitted by this limiter: (ns since start, tokens charged).
    history: Vec<(u64, u64)>,
}

type Group = Arc<Mutex<LimitGroup>>;

impl LimitGroup {
    fn new(spec: Option<&KeySpec>, shape: Shape, window_ns: u64) -> Group {
        let (rpm, tpm, shape) = match spec {
            Some(s) => (s.rpm, s.tpm, s.shape.unwrap_or(shape)),
            None => (None, None, shape),
        };
        Arc::new(Mutex::new(LimitGroup {
            limiter: Limiter::new(shape, rpm, tpm, window_ns),
            rpm,
            tpm,
            accepted: 0,
            rejected_429: 0,
            tokens_charged: 0,
            history: Vec::new(),
        }))
    }

    fn reset_stats(&mut self) {
        self.accepted = 0;
        self.rejected_429 = 0;
        self.tokens_charged = 0;
        self.history = Vec::new();
    }
}

struct KeyInner {
    label: Arc<str>,
    state: KeyState,
    latency_ms: Option<u64>,
    rpm: Option<u32>,
    tpm: Option<u64>,
    account: Option<String>,
    /// The key's own limiter, or its account's.
    group: Group,
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
    fn new(label: Arc<str>, spec: Option<&KeySpec>, group: Group) -> Self {
        let (state, latency_ms, rpm, tpm, account) = match spec {
            Some(s) => (s.state, s.latency_ms, s.rpm, s.tpm, s.account.clone()),
            None => (KeyState::Valid, None, None, None, None),
        };
        KeyEntry {
            inner: Mutex::new(KeyInner {
                label,
                state,
                latency_ms,
                rpm,
                tpm,
                account,
                group,
                counters: Counters::default(),
                history: Vec::new(),
            }),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        }
    }

    /// Replaces the key's settings and limiter (a fresh one, or its
    /// account's), keeping its counters.
    fn respec(&self, label: Arc<str>, spec: &KeySpec, group: Group) {
        let mut g = lock(&self.inner);
        g.label = label;
        g.state = spec.state;
        g.latency_ms = spec.latency_ms;
        g.rpm = spec.rpm;
        g.tpm = spec.tpm;
        g.account = spec.account.clone();
        g.group = group;
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
    /// The time is read under both locks (key, then its limit group) so the
    /// histories of the key and of its account stay sorted.
    pub fn admit(&self, epoch: Instant, charge: u64, key_in_url: bool) -> Decision {
        let mut g = lock(&self.inner);
        let group = g.group.clone();
        let mut grp = lock(&group);
        let now = epoch.elapsed().as_nanos() as u64;
        let decision = grp.limiter.check(now, charge);
        match decision {
            Decision::Accepted(_) => {
                grp.accepted += 1;
                grp.tokens_charged += charge;
                grp.history.push((now, charge));
                g.counters.count(Outcome::Ok, key_in_url);
                g.counters.accepted += 1;
                g.counters.tokens_charged += charge;
                g.history.push((now, charge));
            }
            Decision::Rejected(..) => {
                grp.rejected_429 += 1;
                g.counters.count(Outcome::RateLimited, key_in_url);
                g.counters.rejected_429 += 1;
            }
        }
        decision
    }

    /// The limiter state, for headers on responses that did not go through it.
    pub fn snapshot(&self, epoch: Instant) -> Snapshot {
        let group = lock(&self.inner).group.clone();
        let mut grp = lock(&group);
        let now = epoch.elapsed().as_nanos() as u64;
        grp.limiter.snapshot(now)
    }

    /// The key's configured `rpm` / `tpm`.
    pub fn limits(&self) -> (Option<u32>, Option<u64>) {
        let g = lock(&self.inner);
        (g.rpm, g.tpm)
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
    /// The shared limiter of each account (only changed under `keys`' write lock).
    accounts: Mutex<BTreeMap<String, Group>>,
    unknown: Arc<KeyEntry>,
    injections: Mutex<VecDeque<PendingInjection>>,
    pending: AtomicUsize,
    seq: AtomicU64,
    /// Becomes `true` when the server shuts down: ends hanging requests and
    /// endless bodies.
    closing: watch::Sender<bool>,
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
            accounts: Mutex::new(BTreeMap::new()),
            unknown: Arc::new(KeyEntry::new(
                Arc::from(UNKNOWN_LABEL),
                None,
                LimitGroup::new(None, config.shape, window_ns),
            )),
            injections: Mutex::new(VecDeque::new()),
            pending: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            closing: watch::Sender::new(false),
        };
        shared.add_keys(&config.keys);
        shared
    }

    /// Tells hanging requests and endless bodies that the server is stopping.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A receiver that turns `true` when the server stops.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
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
            let group = match &spec.account {
                Some(account) => lock(&self.accounts)
                    .entry(account.clone())
                    .or_insert_with(|| LimitGroup::new(Some(spec), self.shape, self.window_ns))
                    .clone(),
                None => LimitGroup::new(Some(spec), self.shape, self.window_ns),
            };
            match keys.get(&spec.key) {
                Some(entry) => entry.respec(label, spec, group),
                None => {
                    let entry = KeyEntry::new(label, Some(spec), group);
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
            // A key without an account owns its group.
            let (group, own) = {
                let g = lock(&e.inner);
                (g.group.clone(), g.account.is_none())
            };
            if own {
                lock(&group).reset_stats();
            }
        }
        for group in lock(&self.accounts).values() {
            lock(group).reset_stats();
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
            account: Option<String>,
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
            let (label, c, history, rpm, tpm, account) = {
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
                    g.account.clone(),
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
                            account,
                        },
                    );
                }
            }
        }
        let mut stats = Stats {
            window_ms: self.window_ms,
            ..Stats::default()
        };
        for (label, acc) in &by_label {
            if let Some(account) = &acc.account {
                let a = stats.accounts.entry(account.clone()).or_default();
                a.keys.push(label.clone());
            }
        }
        let groups: Vec<(String, Group)> = lock(&self.accounts)
            .iter()
            .map(|(name, g)| (name.clone(), g.clone()))
            .collect();
        for (name, group) in groups {
            let (accepted, rejected_429, tokens_charged, history, rpm, tpm) = {
                let g = lock(&group);
                (
                    g.accepted,
                    g.rejected_429,
                    g.tokens_charged,
                    g.history.clone(),
                    g.rpm,
                    g.tpm,
                )
            };
            // An account whose keys all moved elsewhere has no keys left.
            let a = stats.accounts.entry(name).or_default();
            let (peak_n, peak_t) = peak_window(&history, self.window_ns);
            a.keys.sort();
            a.accepted = accepted;
            a.rejected_429 = rejected_429;
            a.tokens_charged = tokens_charged;
            a.peak_window_accepted = peak_n;
            a.peak_window_tokens = peak_t;
            a.rpm = rpm;
            a.tpm = tpm;
        }
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
                    account: acc.account,
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
