//! The daemon's control surface: the [`AdminBackend`] the admin API serves,
//! implemented over the live executor, key pool, keystore, queue and Redis.
//! It also converts internal snapshots into the views the API and CLI print.
//! Operator actions (reset, disable) are persisted through the keystore
//! before they are answered; usage is read from the keystore's day hashes
//! after a flush, so it includes the calls of the last second.

use crate::admin::{
    AdminBackend, AdminError, KeyLimits, KeyView, KeyViewStatus, LaneDepth, QueueView, Readiness,
    UsageCount, UsageRow,
};
use crate::executor::Executor;
use crate::keys::KeyId;
use crate::keystore::{day_of, day_string, KeyStore, USAGE_TTL_SECS};
use crate::limits::Now;
use crate::pool::{KeyEvent, KeySnapshot, KeyStatus, StateRecord};
use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;

/// The live daemon, as the admin API sees it.
pub struct Control {
    pub executor: Arc<Executor>,
    pub keystore: Arc<KeyStore>,
    /// The queue's shared connection; every admin route uses it (none opens
    /// its own).
    pub redis: ConnectionManager,
    pub lanes: Vec<String>,
    pub unix_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Redis health for `/readyz`, kept by a background PING.
    pub probe: RedisProbe,
}

/// How often the readiness probe PINGs Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(50);
/// A PING not answered within this counts as Redis down.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// A recorded success older than this no longer counts (the probe stalled).
const PROBE_STALE: Duration = Duration::from_secs(1);
/// Longest pause between two looks for a `/v1/run` job's result.
const RUN_POLL_MAX: Duration = Duration::from_millis(100);

/// Redis reachability as last seen by a background task that PINGs it on
/// the shared connection every [`PROBE_EVERY`], so `/readyz` answers at once
/// from the recorded state and says "not ready" within about one probe of
/// Redis going away. The task stops when this is dropped.
pub struct RedisProbe {
    state: Arc<ProbeState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProbeState {
    ok: std::sync::atomic::AtomicBool,
    /// Milliseconds since `epoch` of the last answered PING, plus one.
    last_ok_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl ProbeState {
    fn now_ms(&self) -> u64 {
        crate::clock::ms_since(self.epoch)
    }

    /// Records one probe; logs when the state changes.
    fn record(&self, ok: bool) {
        use std::sync::atomic::Ordering;
        if ok {
            self.last_ok_ms.store(self.now_ms(), Ordering::Release);
        }
        let was = self.ok.swap(ok, Ordering::AcqRel);
        match (was, ok) {
            (true, false) => tracing::warn!("readiness: redis does not answer PING"),
            (false, true) => tracing::info!("readiness: redis answers PING"),
            _ => {}
        }
    }

    fn redis_ok(&self) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.last_ok_ms.load(Ordering::Acquire);
        let fresh = last != 0
            && self.now_ms().saturating_sub(last)
                <= u64::try_from(PROBE_STALE.as_millis()).unwrap_or(u64::MAX);
        self.ok.load(Ordering::Acquire) && fresh
    }
}

async fn ping(conn: &mut ConnectionManager) -> bool {
    matches!(
        tokio::time::timeout(
            PROBE_TIMEOUT,
            redis::cmd("PING").query_async::<String>(conn)
        )
        .await,
        Ok(Ok(_))
    )
}

impl RedisProbe {
    /// Probes once (at most [`PROBE_TIMEOUT`]), then keeps probing in the
    /// background.
    pub async fn start(mut conn: ConnectionManager) -> RedisProbe {
        let state = Arc::new(ProbeState {
            ok: std::sync::atomic::AtomicBool::new(true),
            last_ok_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        });
        state.record(ping(&mut conn).await);
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    tokio::time::sleep(PROBE_EVERY).await;
                    state.record(ping(&mut conn).await);
                }
            }
        });
        RedisProbe { state, task }
    }

    /// Did Redis answer the latest probe (recently)?
    pub fn redis_ok(&self) -> bool {
        self.state.redis_ok()
    }
}

impl Drop for RedisProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pool snapshot as the API shows it.
pub fn key_view(s: &KeySnapshot, now_ms: u64) -> KeyView {
    KeyView {
        id: s.id.to_string(),
        provider: s.provider.clone(),
        instance: s.instance,
        masked: s.masked.clone(),
        account: s.account.clone(),
        status: match s.status {
            KeyStatus::Available => KeyViewStatus::Available,
            KeyStatus::Cooling => KeyViewStatus::Cooling,
            KeyStatus::Disabled => KeyViewStatus::Disabled,
        },
        reason: s.reason.clone(),
        cooldown_until_ms: s.cooldown_until_ms,
        cooldown_remaining_ms: s.cooldown_until_ms.map(|u| u.saturating_sub(now_ms)),
        limits: KeyLimits {
            rpm: s.limits.rpm,
            tpm: s.limits.tpm,
            rpd: s.limits.rpd,
            tpd: s.limits.tpd,
            max_concurrent: s.max_concurrent,
        },
        window: UsageCount {
            requests: s.window_requests,
            tokens: s.window_tokens,
        },
        today: UsageCount {
            requests: s.day_requests,
            tokens: s.day_tokens,
        },
        in_flight: u64::from(s.in_flight),
        requests: s.stats.requests,
        failures: s.stats.failures,
        rate_limited: s.stats.rate_limited,
        tokens_in: s.stats.tokens_in,
        tokens_out: s.stats.tokens_out,
        cost_usd: s.stats.cost_usd,
        last_used_ms: s.stats.last_used_ms,
        parked_models: s.parked_models.clone(),
    }
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` day (UTC).
fn day_number(day: &str) -> Option<u64> {
    u64::try_from(crate::calendar::parse_day(day)?).ok()
}

impl Control {
    fn parse_id(id: &str) -> Result<KeyId, AdminError> {
        id.parse::<KeyId>()
            .map_err(|_| AdminError::NotFound(format!("no key {id:?} (ids look like groq#2)")))
    }

    /// Writes a key's current state to Redis now, so the answer to an
    /// operator action means it is persisted. A failure is logged; the
    /// keystore also gets the pool's event and retries it.
    async fn persist(&self, id: &KeyId) {
        let pool = self.executor.runtime().pool.clone();
        let Ok(state) = pool.state(id) else { return };
        let now = Now::of(&**pool.clock());
        let event = KeyEvent {
            id: id.clone(),
            record: StateRecord::of(&state, now),
            at_ms: now.unix_ms,
        };
        if let Err(e) = self.keystore.write_state(&event).await {
            tracing::warn!(key = %id, error = %e, "key state not written to redis yet; the keystore retries");
        }
    }

    fn view(&self, id: &KeyId) -> Result<KeyView, AdminError> {
        let pool = self.executor.runtime().pool.clone();
        pool.key_snapshot(id)
            .map(|s| key_view(&s, (self.unix_ms)()))
            .map_err(|e| AdminError::NotFound(e.to_string()))
    }
}

impl AdminBackend for Control {
    fn keys(&self) -> BoxFuture<'_, Result<Vec<KeyView>, AdminError>> {
        Box::pin(async move {
            let now = (self.unix_ms)();
            let rt = self.executor.runtime();
            let mut views: Vec<KeyView> = rt
                .pool
                .snapshot()
                .iter()
                .map(|s| key_view(s, now))
                .collect();
            // A provider whose plugin is not loaded (or is quarantined) is
            // disabled, whatever its keys' own state.
            for v in &mut views {
                let plugin = rt.config.providers.get(&v.provider).map(|p| &p.plugin);
                if let Some(why) = plugin.and_then(|p| rt.plugins.unavailable(p)) {
                    v.status = KeyViewStatus::Disabled;
                    v.reason = Some(why);
                }
            }
            Ok(views)
        })
    }

    fn reset_key(&self, id: &str) -> BoxFuture<'_, Result<KeyView, AdminError>> {
        let id = id.to_string();
        Box::pin(async move {
            let key = Self::parse_id(&id)?;
            self.executor
                .runtime()
                .pool
                .reset(&key)
                .map_err(|e| AdminError::NotFound(e.to_string()))?;
            if let Some(gate) = &self.executor.runtime().global {
                gate.reset(&key)
                    .await
                    .map_err(|e| AdminError::Unavailable(e.to_string()))?;
            }
            self.persist(&key).await;
            self.view(&key)
        })
    }

    fn disable_key(&self, id: &str, reason: &str) -> BoxFuture<'_, Result<KeyView, AdminError>> {
        let id = id.to_string();
        let reason = reason.to_string();
        Box::pin(async move {
            let key = Self::parse_id(&id)?;
            self.executor
                .runtime()
                .pool
                .disable(&key, &reason)
                .map_err(|e| AdminError::NotFound(e.to_string()))?;
            if let Some(gate) = &self.executor.runtime().global {
                gate.disable(&key, &reason)
                    .await
                    .map_err(|e| AdminError::Unavailable(e.to_string()))?;
            }
            self.persist(&key).await;
            self.view(&key)
        })
    }

    fn usage(&self, since: Option<&str>) -> BoxFuture<'_, Result<Vec<UsageRow>, AdminError>> {
        let since = since.map(str::to_string);
        Box::pin(async move {
            // Counters reach Redis once a second; flush so the answer is current.
            if let Err(e) = self.keystore.flush().await {
                tracing::debug!(error = %e, "usage: counters not flushed first");
            }
            let today = day_of((self.unix_ms)());
            let kept = (USAGE_TTL_SECS / 86_400) as u64;
            let oldest = today.saturating_sub(kept);
            let first = match since.as_deref() {
                Some(day) => day_number(day)
                    .ok_or_else(|| AdminError::BadRequest(format!("bad day {day:?}")))?
                    .max(oldest),
                None => oldest,
            };
            let mut conn = self.redis.clone();
            let mut rows = Vec::new();
            for day in first..=today {
                let stored = KeyStore::read_usage(&mut conn, &day_string(day))
                    .await
                    .map_err(|e| AdminError::Unavailable(e.to_string()))?;
                rows.extend(stored);
            }
            Ok(rows)
        })
    }

    fn routes(
        &self,
        job: Option<serde_json::Value>,
    ) -> BoxFuture<'_, Result<serde_json::Value, AdminError>> {
        Box::pin(async move {
            let rt = self.executor.runtime();
            let body = job.unwrap_or_else(
                || serde_json::json!({"messages": [{"role": "user", "content": "hello"}]}),
            );
            let bytes =
                serde_json::to_vec(&body).map_err(|e| AdminError::BadRequest(e.to_string()))?;
            let job = crate::job::parse_job_with(&bytes, &rt.config.queue.job_limits())
                .map_err(|(e, _)| AdminError::BadRequest(e.to_string()))?;
            serde_json::to_value(rt.router.explain_data(&job))
                .map_err(|e| AdminError::Internal(e.to_string()))
        })
    }

    fn queue(&self) -> BoxFuture<'_, Result<QueueView, AdminError>> {
        Box::pin(async move {
            let stats = crate::queue::stats(&mut self.redis.clone(), &self.lanes)
                .await
                .map_err(|e| AdminError::Unavailable(e.to_string()))?;
            Ok(QueueView {
                in_flight: stats.lanes.iter().map(|l| l.pending).sum(),
                lanes: stats
                    .lanes
                    .iter()
                    .map(|l| LaneDepth {
                        lane: l.lane.clone(),
                        // Waiting, not yet delivered (running ones are `in_flight`).
                        depth: l.waiting,
                    })
                    .collect(),
                delayed: stats.delayed,
                dead: stats.dead,
                throughput_per_s: None,
            })
        })
    }

    fn run(&self, body: serde_json::Value) -> BoxFuture<'_, Result<serde_json::Value, AdminError>> {
        Box::pin(async move {
            let rt = self.executor.runtime();
            let text =
                serde_json::to_string(&body).map_err(|e| AdminError::BadRequest(e.to_string()))?;
            let mut conn = self.redis.clone();
            // The operator is waiting: the first (highest-priority) lane.
            let lane = self.lanes.first().map_or("high", String::as_str);
            let id = crate::queue::push_with(&mut conn, lane, &text, &rt.config.queue.job_limits())
                .await
                .map_err(|e| match e {
                    crate::queue::QueueError::Redis(e) => {
                        AdminError::Unavailable(format!("redis: {e}"))
                    }
                    other => AdminError::BadRequest(other.to_string()),
                })?;
            let timeout = body
                .get("deadline_s")
                .and_then(|d| d.as_u64())
                .map(Duration::from_secs)
                .unwrap_or(rt.config.routing.default_deadline)
                .saturating_add(Duration::from_secs(5));
            // Polls the result on the shared connection: a blocking wait
            // would need a connection of its own per request.
            let started = std::time::Instant::now();
            let mut pause = Duration::from_millis(5);
            loop {
                let result = crate::queue::get_result(&mut conn, &id)
                    .await
                    .map_err(|e| AdminError::Unavailable(e.to_string()))?;
                if let Some(r) = result {
                    return serde_json::to_value(r)
                        .map_err(|e| AdminError::Internal(e.to_string()));
                }
                let left = timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(AdminError::Unavailable(format!(
                        "job {id} did not finish within {timeout:?}"
                    )));
                }
                tokio::time::sleep(pause.min(left)).await;
                pause = (pause * 2).min(RUN_POLL_MAX);
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Readiness> {
        Box::pin(async move {
            Readiness {
                redis: self.probe.redis_ok(),
                plugins: self.executor.runtime().plugins.len(),
            }
        })
    }

    fn plugin_problems(&self) -> Vec<String> {
        self.executor.runtime().plugins.problems()
    }

    fn cluster(&self) -> BoxFuture<'_, Result<serde_json::Value, AdminError>> {
        Box::pin(async move {
            let members = crate::cluster::list(&mut self.redis.clone())
                .await
                .map_err(|e| AdminError::Unavailable(e.to_string()))?;
            serde_json::to_value(members).map_err(|e| AdminError::Internal(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::day_number;
    use crate::keystore::day_string;

    #[test]
    fn day_numbers_round_trip_with_the_keystore_days() {
        for day in [0u64, 19_844, 20_000, 47_481] {
            assert_eq!(day_number(&day_string(day)), Some(day));
        }
        assert_eq!(day_number("1969-12-31"), None);
        assert_eq!(day_number("2024-02-30"), None);
    }
}
