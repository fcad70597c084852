//! Quota accuracy. Keys with mixed per-window request and token limits;
//! the mock enforces the same limits over the same compressed window (a
//! rolling window, as upstreams do). The idle daemon is offered twice the
//! keys' capacity, open loop, for a few windows. Over that span at most
//! `windows × capacity` requests can pass a rolling window, so
//! admitted / that is how much of the quota llmq used, and any upstream
//! 429 is a limit llmq got wrong.

use super::{bench_keys, Rig};
use crate::error::{BenchError, Result};
use crate::queue;
use crate::report::{Row, Target};
use crate::worker::{KeyLimits, System, Worker};
use crate::Ctx;
use llmq_mock::{KeySpec, MockConfig, MockServer};
use llmq_sdk::estimate::charged_tokens;
use llmq_sdk::{ChatRequest, Content, Message};
use std::time::{Duration, Instant};

const NAME: &str = "quota";

/// Tokens every benchmark job is charged (prompt estimate + max_tokens),
/// by the same formula the daemon and the mock use.
pub fn job_charge() -> u64 {
    charged_tokens(&ChatRequest {
        model: queue::MODEL.into(),
        messages: vec![Message {
            role: "user".into(),
            content: Content::Text(queue::content(0)),
        }],
        max_tokens: Some(queue::MAX_TOKENS),
        temperature: None,
        json: false,
    })
}

/// The limits of key `i`: a mix of request-bound, token-bound and both,
/// with token limits that are not multiples of the job charge.
pub fn key_limits(i: usize, charge: u64) -> KeyLimits {
    let i64_ = i as u64;
    match i % 4 {
        0 => KeyLimits {
            rpm: Some(10 + (i64_ % 5) * 4),
            tpm: None,
        },
        1 => KeyLimits {
            rpm: None,
            tpm: Some(charge * (8 + i64_ % 7) + charge / 2),
        },
        2 => KeyLimits {
            rpm: Some(30),
            tpm: Some(charge * 12 + charge / 3),
        },
        _ => KeyLimits {
            rpm: Some(9),
            tpm: Some(charge * 40),
        },
    }
}

/// Requests key `l` can pass per window.
pub fn capacity(l: KeyLimits, charge: u64) -> u64 {
    let by_tokens = l.tpm.map(|t| t / charge.max(1));
    match (l.rpm, by_tokens) {
        (Some(r), Some(t)) => r.min(t),
        (Some(r), None) => r,
        (None, Some(t)) => t,
        (None, None) => u64::MAX,
    }
}

pub async fn run(ctx: &mut Ctx) -> Vec<Row> {
    if !ctx.with_llmq {
        return vec![];
    }
    match measure(ctx).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::error(NAME, "run", e)],
    }
}

async fn measure(ctx: &Ctx) -> Result<Vec<Row>> {
    let s = &ctx.sizes;
    let charge = job_charge();
    let keys = bench_keys(s.quota_keys);
    let limits: Vec<KeyLimits> = (0..keys.len()).map(|i| key_limits(i, charge)).collect();
    let per_window: u64 = limits.iter().map(|l| capacity(*l, charge)).sum();
    // Plain HTTP, like every benchmark mock (see `open_mock`) until issue 17.
    let mut config = MockConfig::default()
        .plain_http()
        .window_ms(s.quota_window_ms);
    for (k, l) in keys.iter().zip(&limits) {
        let mut spec = KeySpec::new(k.clone());
        if let Some(r) = l.rpm {
            spec = spec.rpm(u32::try_from(r).unwrap_or(u32::MAX));
        }
        if let Some(t) = l.tpm {
            spec = spec.tpm(t);
        }
        config = config.key(spec);
    }
    let mock = MockServer::start(config).await?;
    let result = offer(ctx, &mock, keys, limits, per_window).await;
    mock.shutdown().await;
    let (accepted, rejected, peak_over) = result?;
    let window = Duration::from_millis(s.quota_window_ms);
    let capacity = per_window * u64::from(s.quota_windows);
    Ok(vec![
        Row::new(
            NAME,
            "admitted / capacity",
            "count",
            Some(accepted as f64),
            Some(capacity as f64),
        )
        .target(Target::ratio_at_least(0.97))
        .note(format!(
            "{} keys (rpm/tpm mixed, {per_window} requests per {window:?} window in all), offered {:.1}× capacity for {} windows; baseline: the most a rolling window admits in that span",
            s.quota_keys, s.quota_overload, s.quota_windows
        )),
        Row::new(NAME, "upstream 429s", "count", Some(rejected as f64), None)
            .target(Target::at_most(0.0)),
        Row::new(
            NAME,
            "keys whose peak window exceeded their limit",
            "count",
            Some(peak_over as f64),
            None,
        ),
    ])
}

/// Returns (accepted in the span, 429s until the daemon stopped, keys over their limit).
async fn offer(
    ctx: &Ctx,
    mock: &MockServer,
    keys: Vec<String>,
    limits: Vec<KeyLimits>,
    per_window: u64,
) -> Result<(u64, u64, u64)> {
    let s = &ctx.sizes;
    let window = Duration::from_millis(s.quota_window_ms);
    let span = window * s.quota_windows;
    let rate = s.quota_overload * per_window as f64 / window.as_secs_f64();
    let total = (rate * span.as_secs_f64()).ceil() as u64;
    let mut rig = Rig::start().await?;
    let mut setup = rig.setup(mock, s.concurrency, keys, total);
    setup.quota = Some((window, limits.clone()));
    let mut worker = Worker::spawn(System::Llmq, &ctx.bins, &setup)?;
    worker
        .wait_ready(&mut rig.conn, Duration::from_secs(30))
        .await?;
    mock.reset_stats();
    let start = Instant::now();
    let end = start + span;
    let mut sent = 0u64;
    let mut conn = rig.conn.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < end {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        if due <= sent {
            continue;
        }
        let mut pipe = redis::pipe();
        for seq in sent..due {
            pipe.cmd("XADD")
                .arg(queue::LANE)
                .arg("*")
                .arg("job")
                .arg(queue::job_json(&queue::job_id("q", seq), seq))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        sent = due;
    }
    tokio::time::sleep_until(end.into()).await;
    let at_end = mock.stats();
    worker.check_alive()?;
    worker.stop();
    let after = mock.stats();
    if at_end.total_accepted == 0 {
        return Err(worker.fail(format!(
            "the mock accepted nothing ({} calls, outcomes: {:?})",
            after.total_calls,
            after
                .keys
                .values()
                .flat_map(|k| k.outcomes.keys().cloned())
                .collect::<std::collections::BTreeSet<_>>()
        )));
    }
    let over = after
        .keys
        .values()
        .filter(|k| {
            let l = KeyLimits {
                rpm: k.rpm.map(u64::from),
                tpm: k.tpm,
            };
            l.rpm.is_some_and(|r| k.peak_window_accepted > r)
                || l.tpm.is_some_and(|t| k.peak_window_tokens > t)
        })
        .count() as u64;
    if after.keys.len() < limits.len() {
        return Err(BenchError::Invalid(format!(
            "the mock knows {} keys, expected {}",
            after.keys.len(),
            limits.len()
        )));
    }
    Ok((at_end.total_accepted, after.total_429, over))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_mixed_and_capacity_takes_the_tighter_one() {
        let c = job_charge();
        assert!(c > u64::from(queue::MAX_TOKENS));
        let l: Vec<KeyLimits> = (0..4).map(|i| key_limits(i, c)).collect();
        assert!(l[0].tpm.is_none() && l[1].rpm.is_none());
        assert_eq!(capacity(l[0], c), 10);
        assert_eq!(capacity(l[1], c), 9, "floor of 9.5 jobs' worth of tokens");
        assert_eq!(capacity(l[2], c), 12, "tokens bind before 30 requests");
        assert_eq!(
            capacity(l[3], c),
            9,
            "requests bind before 40 jobs of tokens"
        );
    }
}
