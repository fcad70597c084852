//! Delayed retries: the ZSET `llmq:{jobs}:delayed` (score = due time, Unix
//! ms) and the mover that puts due entries back on their lane. Several
//! daemons may run movers at once: the Lua script moves each member
//! atomically, so a member is moved once.

use super::{sleep_or_stop, stopped, unix_ms, OutageBackoff, Shared};
use crate::config::RetryConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Members moved per script call at most.
const MOVE_BATCH: usize = 256;
/// Longest sleep between checks (another daemon may add an earlier entry).
const MAX_IDLE: Duration = Duration::from_secs(1);

/// The delay before retry number `attempt + 1`, after attempt `attempt`
/// (1-based) failed: `initial_delay * factor^(attempt-1)`, capped at `max_delay`.
pub(crate) fn backoff_delay(cfg: &RetryConfig, attempt: u32) -> Duration {
    let factor = if cfg.factor.is_finite() && cfg.factor > 0.0 {
        cfg.factor
    } else {
        1.0
    };
    let exp = attempt.saturating_sub(1).min(1000) as i32;
    let secs = cfg.initial_delay.as_secs_f64() * factor.powi(exp);
    let max = cfg.max_delay.as_secs_f64();
    if secs.is_finite() && secs >= 0.0 {
        Duration::from_secs_f64(secs.min(max))
    } else {
        cfg.max_delay
    }
}

/// A delayed member: `lane \n attempts \n enqueued_ms \n nonce \n history \n job`.
/// The nonce (the acked entry's id) keeps members unique.
pub(crate) fn encode_member(
    lane: &str,
    attempts: u32,
    enqueued_ms: u64,
    nonce: &str,
    history_json: &str,
    job: &str,
) -> String {
    format!("{lane}\n{attempts}\n{enqueued_ms}\n{nonce}\n{history_json}\n{job}")
}

/// Moves due members until stopped; sleeps until the next due time (at
/// most 1 s), or until this daemon schedules a retry.
pub(crate) async fn run_mover(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conn = shared.conn.clone();
    let mut backoff = OutageBackoff::new();
    loop {
        if *stop.borrow() {
            break;
        }
        match move_due(&shared, &mut conn).await {
            Ok((moved, next_due)) => {
                backoff.reset();
                if moved >= MOVE_BATCH {
                    continue;
                }
                let now = unix_ms();
                let wait = next_due
                    .map(|due| Duration::from_millis(due.saturating_sub(now)))
                    .unwrap_or(MAX_IDLE)
                    .clamp(Duration::from_millis(1), MAX_IDLE);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.mover_wake.notified() => {}
                    _ = stopped(&mut stop) => break,
                }
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "queue: cannot move delayed retries");
                if sleep_or_stop(wait, &mut stop).await {
                    break;
                }
            }
        }
    }
}

/// One script call: returns (moved, next due time in ms).
async fn move_due(
    shared: &Shared,
    conn: &mut redis::aio::ConnectionManager,
) -> redis::RedisResult<(usize, Option<u64>)> {
    let mut inv = shared.scripts.move_due.prepare_invoke();
    inv.key(super::keys::DELAYED_KEY);
    for l in &shared.lanes {
        inv.key(&l.key);
    }
    inv.arg(unix_ms())
        .arg(MOVE_BATCH)
        .arg(shared.default_lane() + 1);
    for l in &shared.lanes {
        inv.arg(&l.name);
    }
    let (moved, next): (usize, Option<String>) = inv.invoke_async(conn).await?;
    let next = next.and_then(|s| s.parse::<f64>().ok()).map(|f| f as u64);
    Ok((moved, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let cfg = RetryConfig {
            initial_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(60),
        };
        assert_eq!(backoff_delay(&cfg, 1), Duration::from_secs(1));
        assert_eq!(backoff_delay(&cfg, 2), Duration::from_secs(2));
        assert_eq!(backoff_delay(&cfg, 4), Duration::from_secs(8));
        assert_eq!(backoff_delay(&cfg, 10), Duration::from_secs(60));
        assert_eq!(backoff_delay(&cfg, u32::MAX), Duration::from_secs(60));
        let odd = RetryConfig {
            factor: f64::NAN,
            ..cfg
        };
        assert_eq!(backoff_delay(&odd, 3), Duration::from_secs(1));
    }

    #[test]
    fn members_put_the_job_last() {
        let m = encode_member("high", 2, 17, "1-0", "[]", "{\"a\":\n1}");
        let parts: Vec<&str> = m.splitn(6, '\n').collect();
        assert_eq!(parts, vec!["high", "2", "17", "1-0", "[]", "{\"a\":\n1}"]);
    }
}
