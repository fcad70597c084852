//! Producer helpers for the CLI and the admin API: push a job, wait for its
//! result, read a result. Plain Redis commands, as any producer would use.

use super::keys::{done_key, lane_key, result_key, valid_lane};
use super::QueueError;
use crate::job::{parse_job_with, JobLimits, JobResult, DEFAULT_MAX_JOB_BYTES};
use redis::aio::ConnectionLike;
use std::time::{Duration, Instant};

/// Longest single `BLPOP` in [`wait`]: below redis-rs's default 500 ms
/// response timeout, so any async connection works.
const BLPOP_SLICE: Duration = Duration::from_millis(400);

/// Validates a job (as the daemon will), fills `id` when absent, and
/// `XADD`s it to `lane`. Returns the job id.
pub async fn push<C: ConnectionLike + Send>(
    conn: &mut C,
    lane: &str,
    job_json: &str,
) -> Result<String, QueueError> {
    push_limited(conn, lane, job_json, DEFAULT_MAX_JOB_BYTES).await
}

/// [`push`] with the daemon's `max_job_bytes`.
pub(crate) async fn push_limited<C: ConnectionLike + Send>(
    conn: &mut C,
    lane: &str,
    job_json: &str,
    max_job_bytes: usize,
) -> Result<String, QueueError> {
    push_with(
        conn,
        lane,
        job_json,
        &JobLimits {
            max_bytes: max_job_bytes,
            ..JobLimits::default()
        },
    )
    .await
}

/// [`push`] with the daemon's limits (`queue.max_job_bytes`, `queue.max_models`).
pub(crate) async fn push_with<C: ConnectionLike + Send>(
    conn: &mut C,
    lane: &str,
    job_json: &str,
    limits: &JobLimits,
) -> Result<String, QueueError> {
    if !valid_lane(lane) {
        return Err(QueueError::InvalidLane(lane.to_string()));
    }
    let job = parse_job_with(job_json.as_bytes(), limits).map_err(|(e, _)| e)?;
    let body = serde_json::to_string(&job)
        .map_err(|e| crate::job::JobError::Invalid(format!("cannot serialize the job: {e}")))?;
    let _: String = redis::cmd("XADD")
        .arg(lane_key(lane))
        .arg("*")
        .arg("job")
        .arg(body)
        .query_async(conn)
        .await?;
    Ok(job.id)
}

/// The result of job `id`, if it has one.
pub async fn get_result<C: ConnectionLike + Send>(
    conn: &mut C,
    id: &str,
) -> Result<Option<JobResult>, QueueError> {
    let json: Option<String> = redis::cmd("GET")
        .arg(result_key(id))
        .query_async(conn)
        .await?;
    json.map(|j| parse_result(id, &j)).transpose()
}

fn parse_result(id: &str, json: &str) -> Result<JobResult, QueueError> {
    serde_json::from_str(json).map_err(|e| QueueError::BadResult {
        id: id.to_string(),
        message: e.to_string(),
    })
}

/// Waits up to `timeout` for job `id` to finish and returns its result
/// (`None` on timeout). Checks the result first (the `done` marker may have
/// been consumed by another waiter), then `BLPOP`s `llmq:done:<id>` in
/// slices of at most 400 ms, and puts the marker back for other waiters.
/// Blocks the connection it is given while waiting.
pub async fn wait<C: ConnectionLike + Send>(
    conn: &mut C,
    id: &str,
    timeout: Duration,
) -> Result<Option<JobResult>, QueueError> {
    if let Some(r) = get_result(conn, id).await? {
        return Ok(Some(r));
    }
    // A timeout too long for an Instant (`--timeout 1e20s`) waits "forever".
    let deadline = Instant::now().checked_add(timeout);
    let done = done_key(id);
    loop {
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return Ok(None);
        }
        let slice = left.min(BLPOP_SLICE).max(Duration::from_millis(10));
        let popped: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&done)
            .arg(format!("{:.3}", slice.as_secs_f64()))
            .query_async(conn)
            .await?;
        if let Some((_, status)) = popped {
            let (json, pttl): (Option<String>, i64) = redis::pipe()
                .cmd("GET")
                .arg(result_key(id))
                .cmd("PTTL")
                .arg(result_key(id))
                .query_async(conn)
                .await?;
            if pttl > 0 {
                redis::pipe()
                    .cmd("LPUSH")
                    .arg(&done)
                    .arg(&status)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&done)
                    .arg(pttl)
                    .ignore()
                    .query_async::<()>(conn)
                    .await?;
            }
            if let Some(j) = json {
                return parse_result(id, &j).map(Some);
            }
        } else if let Some(r) = get_result(conn, id).await? {
            return Ok(Some(r));
        }
    }
}
