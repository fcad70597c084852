//! Key-state persistence in Redis, so a restart keeps daily counters,
//! cooldowns and disabled keys, and `llmq usage` has per-day numbers.
//!
//! | key | type | content |
//! |---|---|---|
//! | `llmq:{key:<id>}:state` | hash | the pool's state `pool_status` (available, cooling, disabled), `pool_until_ms`, `pool_reason`, `pool_since_ms`, `pool_next_probe_ms` (Unix ms); lifetime counters `requests`, `successes`, `failures`, `fail:<kind>`, `rate_limited`, `tokens_in`, `tokens_out`, `cost_usd`, `last_used_ms`. The same hash holds the cluster gate's fields (`disabled`, `reason`, …, see `global`): one home per key, the field names never overlap |
//! | `llmq:daily:<YYYY-MM-DD>:<id>` | hash | `requests`, `tokens` of that day of the key's provider (its `daily_reset`: the date in the provider's zone, from its reset time); expires after 48 h |
//! | `llmq:usage:<YYYY-MM-DD>` | hash | `<id>\|<model>\|requests`, `…\|tokens_in`, `…\|tokens_out`, `…\|cost_usd` of that UTC day; expires after 40 days |
//! | `llmq:spend:<YYYY-MM-DD>` | hash | provider → USD spent on that day of the provider (as daily counters); expires after 40 days |
//! | `llmq:keyevents` | pub/sub | every state change as JSON (`id`, `status`, …) |
//!
//! State changes are rare and written at once, in wall-clock terms, so that
//! another daemon (or `llmq keys` without one) can read them. Counters are
//! accumulated in memory by the pool and flushed in one pipeline every
//! `flush_every` (1 s) and at shutdown: the hot path never waits on Redis.
//! Counters are increments (`HINCRBY`), so several daemons add up.
//!
//! Each upstream call is counted when it completes (the pool books it when
//! its permit is reported, before the job's result is written), so a
//! `kill -9` loses at most the calls completed since the last flush (one
//! `flush_every`) and the calls in flight at the kill, whose answer the
//! daemon never saw; the calls of a job that is re-delivered after a crash
//! are counted by the daemon that makes them.
//!
//! While Redis is unreachable the counters of failed flushes are merged,
//! per key and day (and model, and provider for spend), into
//! [`PendingCounters`]: memory grows with the number of keys, not with the
//! length of the outage, and the next flush that lands writes each sum once.
//!
//! Older versions stored the pool's fields in a hash of their own,
//! `llmq:key:<id>` (`status`, `until_ms`, `reason`, `since_ms`,
//! `next_probe_ms` and the counters); [`KeyStore::load`] folds such a hash
//! into the new one and deletes it ([`KeyStore::migrate`]).
//!
//! Nothing here holds a secret: keys are named by id, values are numbers,
//! model names and reasons.

use crate::keys::KeyId;
use crate::limits::Now;
use crate::pool::{
    DailyDelta, Deltas, KeyEvent, KeyPool, KeyStats, KeyStatus, Restored, StateRecord, StatsDelta,
    UsageDelta,
};
use crate::{Error, Result};
use redis::aio::ConnectionManager;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

/// Channel on which state changes are published.
pub const KEY_EVENTS_CHANNEL: &str = "llmq:keyevents";
/// Daily counters outlive their day by a day (a late flush still lands).
pub(crate) const DAILY_TTL_SECS: i64 = 48 * 3600;
/// Usage and spend are kept for `llmq usage` over the last weeks.
pub(crate) const USAGE_TTL_SECS: i64 = 40 * 24 * 3600;

/// `llmq:{key:<id>}:state`: the one hash of a key's state, shared with
/// the cluster gate (`global`), hash-tagged so that it stays in the key's
/// Redis Cluster slot.
pub fn state_key(id: &KeyId) -> String {
    format!("llmq:{{key:{id}}}:state")
}

/// Where older versions kept the pool's state and counters
/// (`llmq:key:<id>`); [`KeyStore::load`] migrates it.
pub fn legacy_state_key(id: &KeyId) -> String {
    format!("llmq:key:{id}")
}

/// The pool's state fields in [`state_key`] (prefixed: the gate's own
/// `reason`, `since_ms`, `next_probe_ms` live in the same hash).
pub const STATUS: &str = "pool_status";
const UNTIL_MS: &str = "pool_until_ms";
const REASON: &str = "pool_reason";
const SINCE_MS: &str = "pool_since_ms";
const NEXT_PROBE_MS: &str = "pool_next_probe_ms";
/// The legacy hash's state fields, in the order of their new names.
const LEGACY_STATE: [(&str, &str); 5] = [
    ("status", STATUS),
    ("until_ms", UNTIL_MS),
    ("reason", REASON),
    ("since_ms", SINCE_MS),
    ("next_probe_ms", NEXT_PROBE_MS),
];

/// `llmq:daily:<YYYY-MM-DD>:<id>`.
pub fn daily_key(day: u64, id: &KeyId) -> String {
    format!("llmq:daily:{}:{id}", day_string(day))
}

/// `llmq:usage:<YYYY-MM-DD>`.
pub fn usage_key(day: u64) -> String {
    format!("llmq:usage:{}", day_string(day))
}

/// `llmq:spend:<YYYY-MM-DD>`.
pub(crate) fn spend_key(day: u64) -> String {
    format!("llmq:spend:{}", day_string(day))
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01).
pub fn day_string(day: u64) -> String {
    crate::calendar::day_string(day as i64)
}

/// The UTC day number of a Unix-milliseconds time (usage is kept by UTC
/// day; daily counters and spend by the provider's day, see
/// [`crate::calendar::DailyReset`]).
pub fn day_of(unix_ms: u64) -> u64 {
    crate::calendar::utc_day(unix_ms).max(0) as u64
}

/// What [`KeyStore::load`] restored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Keys that had anything stored.
    pub keys: usize,
    pub cooling: Vec<KeyId>,
    pub disabled: Vec<KeyId>,
    /// Today's spend per provider (feed it to the budget gate too).
    pub spend: BTreeMap<String, f64>,
}

/// One row of `llmq:usage:<day>`: usage per day, key, provider and model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageRow {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Key id, e.g. `groq#2`.
    pub key: String,
    pub provider: String,
    pub model: String,
    pub requests: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
}

/// Counters taken from the pool and not yet written to Redis, merged: one
/// entry per key (with one row per day, and per day and model for usage) and
/// one per provider and day for spend. Merging keeps a Redis outage's memory
/// bounded by the number of keys, however long it lasts.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PendingCounters {
    keys: BTreeMap<KeyId, PendingKey>,
    /// `(provider, day)` → USD.
    spend: BTreeMap<(Arc<str>, u64), f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct PendingKey {
    stats: StatsDelta,
    /// day → `(requests, tokens)`.
    daily: BTreeMap<u64, (i64, i64)>,
    /// `(UTC day, model)` → counters.
    usage: BTreeMap<(u64, Arc<str>), UsageDelta>,
}

fn add_stats(to: &mut StatsDelta, s: StatsDelta) {
    to.requests += s.requests;
    to.successes += s.successes;
    to.failures += s.failures;
    for (kind, n) in s.failures_by_kind {
        *to.failures_by_kind.entry(kind).or_default() += n;
    }
    to.rate_limited += s.rate_limited;
    to.tokens_in += s.tokens_in;
    to.tokens_out += s.tokens_out;
    to.cost_usd += s.cost_usd;
    to.last_used_ms = to.last_used_ms.max(s.last_used_ms);
}

impl PendingCounters {
    /// Adds counters taken from the pool (increments add up, so a key seen
    /// in several takes keeps one entry).
    pub(crate) fn merge(&mut self, d: Deltas) {
        for k in d.keys {
            let p = self.keys.entry(k.id).or_default();
            add_stats(&mut p.stats, k.stats);
            for daily in k.daily {
                let e = p.daily.entry(daily.day).or_default();
                e.0 += daily.requests;
                e.1 += daily.tokens;
            }
            for u in k.usage {
                let e = p
                    .usage
                    .entry((u.day, u.model.clone()))
                    .or_insert_with(|| UsageDelta {
                        day: u.day,
                        model: u.model.clone(),
                        ..UsageDelta::default()
                    });
                e.requests += u.requests;
                e.tokens_in += u.tokens_in;
                e.tokens_out += u.tokens_out;
                e.cost_usd += u.cost_usd;
            }
        }
        for s in d.spend {
            *self.spend.entry((s.provider, s.day)).or_default() += s.usd;
        }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.spend.is_empty()
    }

    #[cfg(test)]
    /// Keys with unwritten counters.
    pub(crate) fn keys(&self) -> usize {
        self.keys.len()
    }

    #[cfg(test)]
    /// Rows held in all: per key its daily and usage rows, plus the spend
    /// rows. Bounded by keys × days × models, never by flush attempts.
    pub(crate) fn rows(&self) -> usize {
        self.keys
            .values()
            .map(|k| 1 + k.daily.len() + k.usage.len())
            .sum::<usize>()
            + self.spend.len()
    }

    /// The merged counters as one [`Deltas`] (one entry per key, day, model).
    pub(crate) fn to_deltas(&self) -> Deltas {
        Deltas {
            keys: self
                .keys
                .iter()
                .map(|(id, k)| crate::pool::KeyDelta {
                    id: id.clone(),
                    stats: k.stats.clone(),
                    daily: k
                        .daily
                        .iter()
                        .map(|(&day, &(requests, tokens))| DailyDelta {
                            day,
                            requests,
                            tokens,
                        })
                        .collect(),
                    usage: k.usage.values().cloned().collect(),
                })
                .collect(),
            spend: self
                .spend
                .iter()
                .map(|((provider, day), &usd)| crate::pool::SpendDelta {
                    provider: provider.clone(),
                    day: *day,
                    usd,
                })
                .collect(),
        }
    }
}

/// Persists a [`KeyPool`]'s key states and counters in Redis.
pub struct KeyStore {
    conn: ConnectionManager,
    pool: KeyPool,
    flush_every: Duration,
    /// Counters taken from the pool but not yet written, merged per key and
    /// day (a failed flush is retried with the next one). The lock also
    /// serialises flushes.
    unflushed: tokio::sync::Mutex<PendingCounters>,
    /// State writes that failed, latest per key, retried on every tick.
    failed_states: std::sync::Mutex<HashMap<KeyId, KeyEvent>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("flush_every", &self.flush_every)
            .finish_non_exhaustive()
    }
}

fn field<T: std::str::FromStr>(h: &HashMap<String, String>, name: &str) -> Option<T> {
    h.get(name).and_then(|v| v.parse().ok())
}

fn parse_state(h: &HashMap<String, String>) -> Option<StateRecord> {
    let status = KeyStatus::parse(h.get(STATUS)?)?;
    Some(StateRecord {
        status,
        until_ms: field(h, UNTIL_MS),
        reason: h.get(REASON).cloned(),
        since_ms: field(h, SINCE_MS),
        next_probe_ms: field(h, NEXT_PROBE_MS),
    })
}

fn parse_stats(h: &HashMap<String, String>) -> Option<KeyStats> {
    let n = |name: &str| field::<i64>(h, name).unwrap_or(0).max(0) as u64;
    let stats = KeyStats {
        requests: n("requests"),
        successes: n("successes"),
        failures: n("failures"),
        failures_by_kind: h
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("fail:")?.to_string(), v.parse().ok()?)))
            .collect(),
        rate_limited: n("rate_limited"),
        tokens_in: n("tokens_in"),
        tokens_out: n("tokens_out"),
        cost_usd: field(h, "cost_usd").unwrap_or(0.0),
        last_used_ms: field(h, "last_used_ms"),
    };
    (stats != KeyStats::default()).then_some(stats)
}

/// Adds the commands writing one key's state to a pipeline.
fn push_state(pipe: &mut redis::Pipeline, ev: &KeyEvent) {
    let key = state_key(&ev.id);
    let r = &ev.record;
    pipe.cmd("HDEL")
        .arg(&key)
        .arg(UNTIL_MS)
        .arg(REASON)
        .arg(SINCE_MS)
        .arg(NEXT_PROBE_MS)
        .ignore();
    let mut set = redis::cmd("HSET");
    set.arg(&key).arg(STATUS).arg(r.status.as_str());
    if let Some(v) = r.until_ms {
        set.arg(UNTIL_MS).arg(v);
    }
    if let Some(v) = &r.reason {
        set.arg(REASON).arg(v);
    }
    if let Some(v) = r.since_ms {
        set.arg(SINCE_MS).arg(v);
    }
    if let Some(v) = r.next_probe_ms {
        set.arg(NEXT_PROBE_MS).arg(v);
    }
    pipe.add_command(set).ignore();
    if let Ok(json) = serde_json::to_string(ev) {
        pipe.cmd("PUBLISH")
            .arg(KEY_EVENTS_CHANNEL)
            .arg(json)
            .ignore();
    }
}

fn hincr(pipe: &mut redis::Pipeline, key: &str, field: &str, by: i64) {
    if by != 0 {
        pipe.cmd("HINCRBY").arg(key).arg(field).arg(by).ignore();
    }
}

fn hincr_f(pipe: &mut redis::Pipeline, key: &str, field: &str, by: f64) {
    if by != 0.0 {
        pipe.cmd("HINCRBYFLOAT")
            .arg(key)
            .arg(field)
            .arg(by)
            .ignore();
    }
}

fn push_stats(pipe: &mut redis::Pipeline, key: &str, s: &StatsDelta) {
    hincr(pipe, key, "requests", s.requests);
    hincr(pipe, key, "successes", s.successes as i64);
    hincr(pipe, key, "failures", s.failures as i64);
    for (kind, n) in &s.failures_by_kind {
        hincr(pipe, key, &format!("fail:{kind}"), *n as i64);
    }
    hincr(pipe, key, "rate_limited", s.rate_limited as i64);
    hincr(pipe, key, "tokens_in", s.tokens_in as i64);
    hincr(pipe, key, "tokens_out", s.tokens_out as i64);
    hincr_f(pipe, key, "cost_usd", s.cost_usd);
    if let Some(ms) = s.last_used_ms {
        pipe.cmd("HSET")
            .arg(key)
            .arg("last_used_ms")
            .arg(ms)
            .ignore();
    }
}

/// The commands folding a legacy hash `old` into the state hash `key`
/// (see [`KeyStore::migrate`]).
fn fold_legacy(
    key: &str,
    old: &HashMap<String, String>,
    has_state: bool,
    last_used: Option<u64>,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    if !has_state {
        for (from, to) in LEGACY_STATE {
            if let Some(v) = old.get(from) {
                pipe.cmd("HSET").arg(key).arg(to).arg(v).ignore();
            }
        }
    }
    if let Some(stats) = parse_stats(old) {
        let delta = StatsDelta {
            requests: stats.requests as i64,
            successes: stats.successes,
            failures: stats.failures,
            failures_by_kind: stats.failures_by_kind,
            rate_limited: stats.rate_limited,
            tokens_in: stats.tokens_in,
            tokens_out: stats.tokens_out,
            cost_usd: stats.cost_usd,
            last_used_ms: stats
                .last_used_ms
                .filter(|&t| last_used.is_none_or(|l| t > l)),
        };
        push_stats(&mut pipe, key, &delta);
    }
    pipe
}

/// The whole flush as one pipeline; `None` when there is nothing to write.
fn flush_pipeline(d: &Deltas) -> Option<redis::Pipeline> {
    if d.is_empty() {
        return None;
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut expire: BTreeMap<String, i64> = BTreeMap::new();
    for k in &d.keys {
        push_stats(&mut pipe, &state_key(&k.id), &k.stats);
        for daily in &k.daily {
            let key = daily_key(daily.day, &k.id);
            hincr(&mut pipe, &key, "requests", daily.requests);
            hincr(&mut pipe, &key, "tokens", daily.tokens);
            expire.insert(key, DAILY_TTL_SECS);
        }
        for u in &k.usage {
            let key = usage_key(u.day);
            let prefix = format!("{}|{}|", k.id, u.model);
            hincr(
                &mut pipe,
                &key,
                &format!("{prefix}requests"),
                u.requests as i64,
            );
            hincr(
                &mut pipe,
                &key,
                &format!("{prefix}tokens_in"),
                u.tokens_in as i64,
            );
            hincr(
                &mut pipe,
                &key,
                &format!("{prefix}tokens_out"),
                u.tokens_out as i64,
            );
            hincr_f(&mut pipe, &key, &format!("{prefix}cost_usd"), u.cost_usd);
            expire.insert(key, USAGE_TTL_SECS);
        }
    }
    for s in &d.spend {
        let key = spend_key(s.day);
        hincr_f(&mut pipe, &key, &s.provider, s.usd);
        expire.insert(key, USAGE_TTL_SECS);
    }
    for (key, ttl) in expire {
        pipe.cmd("EXPIRE").arg(key).arg(ttl).ignore();
    }
    Some(pipe)
}

impl KeyStore {
    pub(crate) fn new(conn: ConnectionManager, pool: KeyPool) -> KeyStore {
        KeyStore {
            conn,
            pool,
            flush_every: Duration::from_secs(1),
            unflushed: tokio::sync::Mutex::new(PendingCounters::default()),
            failed_states: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Connects to `url` with a reconnecting [`ConnectionManager`].
    pub async fn connect(url: &str, pool: KeyPool) -> Result<KeyStore> {
        let client = redis::Client::open(url)?;
        Ok(KeyStore::new(client.get_connection_manager().await?, pool))
    }

    /// How often counters are flushed (default 1 s).
    pub fn with_flush_every(mut self, every: Duration) -> KeyStore {
        self.flush_every = every.max(Duration::from_millis(1));
        self
    }

    fn now(&self) -> Now {
        Now::of(&**self.pool.clock())
    }

    /// Restores into the pool what Redis knows about its keys: states,
    /// lifetime counters, today's daily counters, and today's spend (each
    /// provider's today, on its `daily_reset` calendar).
    pub async fn load(&self) -> Result<LoadReport> {
        self.migrate(&self.pool.key_ids()).await?;
        let now = self.now();
        let providers = self.pool.providers();
        let day_of: HashMap<&str, u64> = providers
            .iter()
            .map(|p| {
                let day = self.pool.daily_reset(p).day_of(now.unix_ms).max(0) as u64;
                (p.as_str(), day)
            })
            .collect();
        let today = |provider: &str| {
            day_of
                .get(provider)
                .copied()
                .unwrap_or_else(|| now.utc_day())
        };
        let ids = self.pool.key_ids();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(state_key(id));
            pipe.cmd("HGETALL").arg(daily_key(today(id.provider()), id));
        }
        let mut conn = self.conn.clone();
        let hashes: Vec<HashMap<String, String>> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await?
        };
        let mut pipe = redis::pipe();
        for p in &providers {
            pipe.cmd("HGET").arg(spend_key(today(p))).arg(p);
        }
        let spent: Vec<Option<String>> = if providers.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await?
        };
        let spend = providers
            .iter()
            .zip(spent)
            .filter_map(|(p, usd)| Some((p.clone(), usd?)));
        let mut report = LoadReport::default();
        for (id, pair) in ids.iter().zip(hashes.chunks(2)) {
            let [state, daily] = pair else { continue };
            let restored = Restored {
                state: parse_state(state),
                stats: parse_stats(state),
                daily: (!daily.is_empty()).then(|| {
                    let n = |f: &str| field::<i64>(daily, f).unwrap_or(0).max(0) as u64;
                    (n("requests"), n("tokens"))
                }),
            };
            if restored == Restored::default() {
                continue;
            }
            report.keys += 1;
            match restored.state.as_ref().map(|s| s.to_state(now)) {
                Some(crate::pool::KeyState::CoolingDown { .. }) => report.cooling.push(id.clone()),
                Some(crate::pool::KeyState::Disabled { .. }) => report.disabled.push(id.clone()),
                _ => {}
            }
            // The id came from the pool a moment ago; a reload in between
            // only means there is nothing left to restore.
            let _ = self.pool.restore(id, restored);
        }
        for (provider, usd) in spend {
            if let Ok(usd) = usd.parse::<f64>() {
                self.pool.restore_spend(&provider, usd);
                report.spend.insert(provider, usd);
            }
        }
        Ok(report)
    }

    /// Folds each key's legacy hash (`llmq:key:<id>`) into its state hash
    /// and deletes it; returns how many were folded. The legacy hash is
    /// read and deleted in one transaction, so of two daemons starting
    /// together exactly one folds it (counters are added once). Counters add
    /// up; the legacy state is taken only when the new hash has none (it is
    /// older than anything written there); `last_used_ms` keeps the later.
    /// The two hashes lie in different Cluster slots, hence two steps.
    /// One pipelined `EXISTS` per key first, so a start with no legacy
    /// hashes (every start after the first) costs one round trip, not one
    /// per key.
    pub async fn migrate(&self, ids: &[KeyId]) -> Result<usize> {
        let mut conn = self.conn.clone();
        let mut exists = redis::pipe();
        for id in ids {
            exists.cmd("EXISTS").arg(legacy_state_key(id));
        }
        let present: Vec<bool> = if ids.is_empty() {
            Vec::new()
        } else {
            exists.query_async(&mut conn).await?
        };
        let mut folded = 0;
        for (id, _) in ids.iter().zip(present).filter(|(_, p)| *p) {
            let (old, _): (HashMap<String, String>, i64) = redis::pipe()
                .atomic()
                .cmd("HGETALL")
                .arg(legacy_state_key(id))
                .cmd("DEL")
                .arg(legacy_state_key(id))
                .query_async(&mut conn)
                .await?;
            if old.is_empty() {
                continue;
            }
            let key = state_key(id);
            let (has_state, last_used): (bool, Option<u64>) = redis::pipe()
                .cmd("HEXISTS")
                .arg(&key)
                .arg(STATUS)
                .cmd("HGET")
                .arg(&key)
                .arg("last_used_ms")
                .query_async(&mut conn)
                .await?;
            fold_legacy(&key, &old, has_state, last_used)
                .query_async::<()>(&mut conn)
                .await?;
            folded += 1;
        }
        Ok(folded)
    }

    /// Writes one state change (and publishes it).
    pub(crate) async fn write_state(&self, ev: &KeyEvent) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        push_state(&mut pipe, ev);
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn write_or_keep(&self, ev: KeyEvent) {
        if let Err(e) = self.write_state(&ev).await {
            tracing::warn!(key = %ev.id, error = %e, "key state not written to redis; will retry");
            self.lock_failed().insert(ev.id.clone(), ev);
        }
    }

    fn lock_failed(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, KeyEvent>> {
        self.failed_states.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn retry_failed_states(&self) {
        let failed: Vec<KeyEvent> = self.lock_failed().drain().map(|(_, ev)| ev).collect();
        for ev in failed {
            // A newer failure for the same key supersedes this one.
            let id = ev.id.clone();
            if self.write_state(&ev).await.is_err() {
                self.lock_failed().entry(id).or_insert(ev);
            }
        }
    }

    /// Writes the counters accumulated since the last flush, in one
    /// pipeline. Returns how many keys it covered.
    pub async fn flush(&self) -> Result<usize> {
        let conn = self.conn.clone();
        self.flush_via(move |pipe| async move {
            let mut conn = conn;
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        })
        .await
    }

    /// [`KeyStore::flush`] with the write to Redis given: the new counters
    /// are merged into the unwritten ones, and those are dropped only when
    /// `write` succeeded.
    async fn flush_via<F, Fut>(&self, write: F) -> Result<usize>
    where
        F: FnOnce(redis::Pipeline) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut unflushed = self.unflushed.lock().await;
        unflushed.merge(self.pool.take_deltas());
        let Some(pipe) = flush_pipeline(&unflushed.to_deltas()) else {
            return Ok(0);
        };
        write(pipe).await?;
        let n = unflushed.keys.len();
        *unflushed = PendingCounters::default();
        Ok(n)
    }

    #[cfg(test)]
    /// The counters taken from the pool and not yet written.
    pub(crate) async fn pending(&self) -> PendingCounters {
        self.unflushed.lock().await.clone()
    }

    /// Writes state changes as they come and flushes counters every
    /// `flush_every`, until `shutdown` resolves; then drains and flushes once
    /// more. Redis errors are logged and retried, never fatal.
    pub(crate) async fn run(
        &self,
        mut events: UnboundedReceiver<KeyEvent>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                // Before the events: a stream of state changes must not hold
                // the counters back past their second.
                _ = tick.tick() => {
                    if let Err(e) = self.flush().await {
                        tracing::warn!(error = %e, "key counters not flushed to redis; will retry");
                    }
                    self.retry_failed_states().await;
                }
                ev = events.recv() => match ev {
                    Some(ev) => self.write_or_keep(ev).await,
                    None => break,
                },
            }
        }
        while let Ok(ev) = events.try_recv() {
            self.write_or_keep(ev).await;
        }
        self.retry_failed_states().await;
        self.flush().await?;
        match self.lock_failed().len() {
            0 => Ok(()),
            n => Err(Error::Other(format!(
                "{n} key state change(s) could not be written to redis"
            ))),
        }
    }

    /// Subscribes to the pool's state changes and runs in a task.
    pub fn spawn(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let events = self.pool.subscribe_events();
        tokio::spawn(async move { self.run(events, shutdown).await })
    }

    /// A key's stored state, as another daemon or the CLI sees it.
    pub async fn read_state(
        conn: &mut ConnectionManager,
        id: &KeyId,
    ) -> Result<Option<StateRecord>> {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(state_key(id))
            .query_async(conn)
            .await?;
        Ok(parse_state(&h))
    }

    /// Usage of one day (`YYYY-MM-DD`), one row per key and model.
    pub async fn read_usage(conn: &mut ConnectionManager, day: &str) -> Result<Vec<UsageRow>> {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("llmq:usage:{day}"))
            .query_async(conn)
            .await?;
        let mut rows: BTreeMap<(String, String), UsageRow> = BTreeMap::new();
        for (f, v) in &h {
            let mut parts = f.rsplitn(3, '|');
            let (Some(what), Some(model), Some(key)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let row = rows
                .entry((key.to_string(), model.to_string()))
                .or_insert_with(|| UsageRow {
                    day: day.to_string(),
                    key: key.to_string(),
                    provider: key.rsplit_once('#').map_or(key, |(p, _)| p).to_string(),
                    model: model.to_string(),
                    ..UsageRow::default()
                });
            match what {
                "requests" => row.requests = v.parse().unwrap_or(0),
                "tokens_in" => row.tokens_in = v.parse().unwrap_or(0),
                "tokens_out" => row.tokens_out = v.parse().unwrap_or(0),
                "cost_usd" => row.cost_usd = v.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        Ok(rows.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_strings_are_utc_calendar_dates() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(day_of(1_714_521_600_000)), "2024-05-01");
        assert_eq!(day_string(day_of(4_102_444_799_000)), "2099-12-31");
    }

    #[test]
    fn a_state_hash_round_trips() {
        let h: HashMap<String, String> = [
            ("pool_status", "disabled"),
            ("pool_reason", "auth_failed"),
            ("pool_since_ms", "5"),
            ("pool_next_probe_ms", "9"),
            // The gate's fields in the same hash are not the pool's.
            ("reason", "other"),
            ("since_ms", "1"),
            ("disabled", "1"),
            ("requests", "3"),
            ("fail:auth_failed", "1"),
            ("cost_usd", "0.5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = parse_state(&h).unwrap();
        assert_eq!(s.status, KeyStatus::Disabled);
        assert_eq!(
            (s.reason.as_deref(), s.since_ms, s.next_probe_ms, s.until_ms),
            (Some("auth_failed"), Some(5), Some(9), None)
        );
        let st = parse_stats(&h).unwrap();
        assert_eq!((st.requests, st.cost_usd), (3, 0.5));
        assert_eq!(st.failures_by_kind["auth_failed"], 1);
        assert!(parse_state(&HashMap::new()).is_none());
        assert!(parse_stats(&HashMap::new()).is_none());
    }

    /// Five `groq` keys, no limits, on a manual clock at 2024-05-01T10:00Z.
    fn five_keys() -> (KeyPool, crate::clock::ManualClock, Vec<KeyId>) {
        use crate::keys::{ApiKey, KeyRing};
        let ids: Vec<KeyId> = (0..5).map(|n| KeyId::new("groq", n)).collect();
        let ring = KeyRing::from_keys(ids.iter().map(|id| {
            ApiKey::new(
                id.clone(),
                Some(secrecy::SecretString::from(format!("gsk_FAKE_{id}"))),
                "test".to_string(),
            )
        }));
        let mut config = crate::config::Config::default();
        config
            .providers
            .insert("groq".into(), crate::config::ProviderConfig::default());
        let clock = crate::clock::ManualClock::new(1_714_557_600_000);
        let pool = KeyPool::new(
            &config,
            &ring,
            Arc::new(clock.clone()) as Arc<dyn crate::clock::Clock>,
        );
        (pool, clock, ids)
    }

    fn one_call(pool: &KeyPool, id: &KeyId, fate: crate::pool::Fate) {
        let req = crate::pool::AcquireRequest {
            provider: "groq",
            model: "m",
            tokens: 10,
            strategy: None,
            pinned: Some(id),
            instance: None,
        };
        match pool.try_acquire(&req) {
            crate::pool::Acquire::Granted(p) => p.report(fate),
            other => panic!("expected a permit for {id}, got {other:?}"),
        }
    }

    async fn hash(conn: &mut ConnectionManager, key: &str) -> HashMap<String, String> {
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(conn)
            .await
            .unwrap()
    }

    /// Issue 15: during a Redis outage the unwritten counters were appended
    /// once per failed flush (memory grew with keys × seconds). Merged, 10,000
    /// failed flushes over 5 keys and 2 days hold one entry per key with one
    /// row per day, and the flush that lands writes each sum exactly once.
    #[tokio::test]
    async fn failed_flushes_merge_per_key_and_day_and_the_next_flush_writes_the_sums_once() {
        use crate::clock::Clock;
        let redis = llmq_testkit::RedisServer::start();
        let (pool, clock, ids) = five_keys();
        let store = KeyStore::connect(&redis.url(), pool.clone()).await.unwrap();
        let day1 = day_of(clock.unix_ms());
        let down = || async { Err(Error::Other("redis is down".into())) };
        const CYCLES: usize = 10_000;
        for cycle in 0..CYCLES {
            if cycle == CYCLES / 2 {
                clock.advance(Duration::from_secs(24 * 3600));
            }
            let id = &ids[cycle % ids.len()];
            // Every tenth call of each key fails.
            let fate = if (cycle / ids.len()) % 10 == 0 {
                crate::pool::Fate::Transient
            } else {
                crate::pool::Fate::Success {
                    usage_in: 3,
                    usage_out: 2,
                    cost_usd: 0.0,
                }
            };
            one_call(&pool, id, fate);
            assert!(store.flush_via(|_| down()).await.is_err());
        }
        let pending = store.pending().await;
        assert_eq!(pending.keys(), 5, "one entry per key");
        // Per key: its entry, 2 daily rows and 2 usage rows (2 days, 1 model).
        assert_eq!(pending.rows(), 5 * (1 + 2 + 2), "{pending:?}");
        let merged = pending.to_deltas();
        for k in &merged.keys {
            assert_eq!(k.stats.requests, (CYCLES / 5) as i64, "{}", k.id);
            assert_eq!(k.stats.failures, (CYCLES / 5 / 10) as u64, "{}", k.id);
            assert_eq!(k.daily.len(), 2, "{}", k.id);
            assert!(k.daily.iter().all(|d| d.requests == (CYCLES / 10) as i64));
        }
        assert_eq!(store.flush().await.unwrap(), 5);
        assert!(store.pending().await.is_empty());
        assert_eq!(store.flush().await.unwrap(), 0, "nothing is written twice");

        let mut conn = store.conn.clone();
        let day2 = day_of(clock.unix_ms());
        assert_eq!(day2, day1 + 1);
        for id in &ids {
            let h = hash(&mut conn, &state_key(id)).await;
            assert_eq!(h["requests"], (CYCLES / 5).to_string(), "{id}: {h:?}");
            assert_eq!(h["failures"], (CYCLES / 50).to_string(), "{id}: {h:?}");
            let successes = CYCLES / 5 - CYCLES / 50;
            assert_eq!(h["tokens_in"], (3 * successes).to_string(), "{id}");
            for day in [day1, day2] {
                let d = hash(&mut conn, &daily_key(day, id)).await;
                assert_eq!(d["requests"], (CYCLES / 10).to_string(), "{id} {day}");
            }
        }
        let mut total = 0;
        for day in [day1, day2] {
            for row in KeyStore::read_usage(&mut conn, &day_string(day))
                .await
                .unwrap()
            {
                assert_eq!(row.requests, (CYCLES / 10) as u64, "{row:?}");
                total += row.requests;
            }
        }
        assert_eq!(total, CYCLES as u64, "every call counted once");
    }

    /// The flush tick comes before state events: with a backlog of state
    /// writes (a storm of cooldowns), counters still reach Redis within their
    /// flush interval instead of waiting for the whole backlog.
    #[tokio::test]
    async fn a_backlog_of_state_events_does_not_hold_the_counters_back() {
        let redis = llmq_testkit::RedisServer::start();
        let (pool, _clock, ids) = five_keys();
        let store = Arc::new(
            KeyStore::connect(&redis.url(), pool.clone())
                .await
                .unwrap()
                .with_flush_every(Duration::from_millis(20)),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Far more writes than the wait below leaves time for.
        for n in 0..50_000u64 {
            tx.send(KeyEvent {
                id: ids[0].clone(),
                record: StateRecord {
                    status: KeyStatus::Available,
                    until_ms: None,
                    reason: None,
                    since_ms: None,
                    next_probe_ms: None,
                },
                at_ms: n,
            })
            .unwrap();
        }
        one_call(
            &pool,
            &ids[4],
            crate::pool::Fate::Success {
                usage_in: 1,
                usage_out: 1,
                cost_usd: 0.0,
            },
        );
        let task = tokio::spawn({
            let store = store.clone();
            async move { store.run(rx, std::future::pending()).await }
        });
        let mut conn = store.conn.clone();
        llmq_testkit::wait_until_async(
            Duration::from_secs(2),
            "the call's counter is flushed",
            || {
                let mut conn = conn.clone();
                async move {
                    let n: Option<i64> = redis::cmd("HGET")
                        .arg(state_key(&KeyId::new("groq", 4)))
                        .arg("requests")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or(None);
                    n == Some(1)
                }
            },
        )
        .await;
        task.abort();
        drop(tx);
        let h = hash(&mut conn, &state_key(&ids[0])).await;
        assert_eq!(h.get(STATUS).map(String::as_str), Some("available"));
    }
}
