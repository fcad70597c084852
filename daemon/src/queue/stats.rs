//! Queue statistics for the admin API (`GET /v1/queue`) and `llmq usage`.

use super::keys::{lane_key, DEAD_KEY, DELAYED_KEY, GROUP};
use super::QueueError;
use redis::aio::ConnectionLike;
use redis::Value;
use serde::{Deserialize, Serialize};

/// One lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneStats {
    pub lane: String,
    /// Entries in the stream (`XLEN`): waiting plus pending.
    pub depth: u64,
    /// Delivered to a consumer and not yet acked (`XPENDING`): running, or
    /// abandoned by a dead consumer until reclaimed.
    pub pending: u64,
    /// Not yet delivered: `depth - pending`.
    pub waiting: u64,
    /// Consumers holding pending entries.
    pub consumers: u64,
}

/// The whole queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Highest priority first.
    pub lanes: Vec<LaneStats>,
    /// Retries waiting for their backoff (`ZCARD llmq:{jobs}:delayed`).
    pub delayed: u64,
    /// Dead letters (`HLEN llmq:dead`).
    pub dead: u64,
}

fn int(v: &Value) -> u64 {
    match v {
        Value::Int(n) => (*n).max(0) as u64,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Reads depth and pending per lane, delayed and dead counts in one pipeline.
/// A lane without a stream or group counts as empty.
pub async fn stats<C: ConnectionLike + Send>(
    conn: &mut C,
    lanes: &[String],
) -> Result<QueueStats, QueueError> {
    let mut p = redis::pipe();
    p.ignore_errors();
    for l in lanes {
        let key = lane_key(l);
        p.cmd("XLEN").arg(&key);
        p.cmd("XPENDING").arg(&key).arg(GROUP);
    }
    p.cmd("ZCARD").arg(DELAYED_KEY);
    p.cmd("HLEN").arg(DEAD_KEY);
    let replies: Vec<Value> = match p.query_async::<Value>(conn).await? {
        Value::Array(v) => v,
        _ => Vec::new(),
    };
    let get = |i: usize| replies.get(i).cloned().unwrap_or(Value::Nil);
    let mut out = Vec::with_capacity(lanes.len());
    for (i, l) in lanes.iter().enumerate() {
        let depth = int(&get(2 * i));
        let (pending, consumers) = match get(2 * i + 1) {
            Value::Array(summary) if !summary.is_empty() => {
                let consumers = match summary.get(3) {
                    Some(Value::Array(c)) => c.len() as u64,
                    _ => 0,
                };
                (int(&summary[0]), consumers)
            }
            _ => (0, 0),
        };
        out.push(LaneStats {
            lane: l.clone(),
            depth,
            pending,
            waiting: depth.saturating_sub(pending),
            consumers,
        });
    }
    Ok(QueueStats {
        lanes: out,
        delayed: int(&get(2 * lanes.len())),
        dead: int(&get(2 * lanes.len() + 1)),
    })
}
