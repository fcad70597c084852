//! The daemon's control surface: the [`AdminBackend`] the admin API serves,
//! implemented over the live executor, key pool, queue and Redis. It also
//! converts internal snapshots into the views the API and CLI print.

use crate::admin::{
    AdminBackend, AdminError, KeyLimits, KeyStatus as ViewStatus, KeyView, LaneDepth, QueueView,
    Readiness, UsageCount, UsageRow,
};
use crate::executor::Executor;
use crate::keys::KeyId;
use crate::pool::{KeySnapshot, KeyStatus};
use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;

/// The live daemon, as the admin API sees it.
pub struct Control {
    pub executor: Arc<Executor>,
    pub redis: ConnectionManager,
    pub lanes: Vec<String>,
    pub unix_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// A pool snapshot as the API shows it.
pub fn key_view(s: &KeySnapshot, now_ms: u64) -> KeyView {
    KeyView {
        id: s.id.to_string(),
        provider: s.provider.clone(),
        instance: s.instance,
        masked: s.masked.clone(),
        status: match s.status {
            KeyStatus::Available => ViewStatus::Available,
            KeyStatus::Cooling => ViewStatus::Cooling,
            KeyStatus::Disabled => ViewStatus::Disabled,
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
    }
}

impl Control {
    fn parse_id(id: &str) -> Result<KeyId, AdminError> {
        id.parse::<KeyId>()
            .map_err(|_| AdminError::NotFound(format!("no key {id:?} (ids look like groq#2)")))
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
            Ok(self
                .executor
                .runtime()
                .pool
                .snapshot()
                .iter()
                .map(|s| key_view(s, now))
                .collect())
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
            self.view(&key)
        })
    }

    fn usage(&self, since: Option<&str>) -> BoxFuture<'_, Result<Vec<UsageRow>, AdminError>> {
        let since = since.map(str::to_string);
        Box::pin(async move {
            let _ = since;
            Ok(Vec::new())
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
            let job = crate::job::parse_job(&bytes, rt.config.queue.max_job_bytes)
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
                        depth: l.depth,
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
            let id =
                crate::queue::push_limited(&mut conn, "high", &text, rt.config.queue.max_job_bytes)
                    .await
                    .map_err(|e| AdminError::BadRequest(e.to_string()))?;
            let timeout = body
                .get("deadline_s")
                .and_then(|d| d.as_u64())
                .map(Duration::from_secs)
                .unwrap_or(rt.config.routing.default_deadline)
                + Duration::from_secs(5);
            // A dedicated connection: waiting blocks it.
            let mut waiter = crate::commands::connect(&rt.config.redis.url)
                .await
                .map_err(|e| AdminError::Unavailable(e.to_string()))?;
            match crate::queue::wait(&mut waiter, &id, timeout)
                .await
                .map_err(|e| AdminError::Unavailable(e.to_string()))?
            {
                Some(r) => serde_json::to_value(r).map_err(|e| AdminError::Internal(e.to_string())),
                None => Err(AdminError::Unavailable(format!(
                    "job {id} did not finish within {timeout:?}"
                ))),
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Readiness> {
        Box::pin(async move {
            let mut conn = self.redis.clone();
            let redis = redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok();
            Readiness {
                redis,
                plugins: self.executor.runtime().plugins.len(),
            }
        })
    }

    fn cluster(&self) -> BoxFuture<'_, Result<serde_json::Value, AdminError>> {
        Box::pin(async move { Ok(serde_json::json!([])) })
    }
}
