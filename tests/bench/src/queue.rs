//! The producer side of the SPEC §3 contract as the harness uses it: job
//! bodies, pipelined preloading, counting results, telling when a worker is
//! listening, and tailing `llmq:results` to timestamp each job's completion.

use crate::error::{BenchError, Result};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The lane every benchmark job goes to.
pub const LANE: &str = "llmq:{jobs}:normal";
/// The consumer group the daemon reads the lanes with.
pub const GROUP: &str = "llmq";
/// The stream every result is announced on.
pub const RESULTS: &str = "llmq:results";
/// The model id the benchmark provider serves.
pub const MODEL: &str = "mock-model";
/// `max_tokens` of every benchmark job (it is part of the TPM charge).
pub const MAX_TOKENS: u32 = 16;

/// Jobs per pipelined round trip when preloading.
const PRELOAD_CHUNK: usize = 1_000;

/// An async connection without a response timeout (blocking reads wait
/// longer than the client's default of 500 ms).
pub async fn connect(url: &str) -> Result<MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(Duration::from_secs(5)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// The content of job `seq`: fixed width, so every job is charged the same tokens.
pub fn content(seq: u64) -> String {
    format!("Say hello to job number {seq:010}.")
}

/// A job body: an id, one user message, the benchmark model and `max_tokens`.
pub fn job_json(id: &str, seq: u64) -> String {
    serde_json::json!({
        "id": id,
        "model": MODEL,
        "messages": [{"role": "user", "content": content(seq)}],
        "max_tokens": MAX_TOKENS,
    })
    .to_string()
}

/// The id of job `seq` of a run (`<prefix>-<seq>`).
pub fn job_id(prefix: &str, seq: u64) -> String {
    format!("{prefix}-{seq}")
}

/// The sequence number of an id made by [`job_id`] with this prefix.
pub fn parse_seq(prefix: &str, id: &str) -> Option<u64> {
    id.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()
}

/// XADDs jobs `0..n` with pipelining; returns the total bytes of the job bodies.
pub async fn preload(conn: &mut MultiplexedConnection, prefix: &str, n: u64) -> Result<u64> {
    let mut bytes = 0u64;
    let mut seq = 0u64;
    while seq < n {
        let mut pipe = redis::pipe();
        let end = (seq + PRELOAD_CHUNK as u64).min(n);
        for s in seq..end {
            let body = job_json(&job_id(prefix, s), s);
            bytes += body.len() as u64;
            pipe.cmd("XADD")
                .arg(LANE)
                .arg("*")
                .arg("job")
                .arg(body)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        seq = end;
    }
    Ok(bytes)
}

/// Fields of a reply that is a map (RESP3) or a flat key/value array (RESP2).
fn field<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    let is = |k: &Value| match k {
        Value::BulkString(b) => b == name.as_bytes(),
        Value::SimpleString(s) => s == name,
        _ => false,
    };
    match reply {
        Value::Map(pairs) => pairs.iter().find(|(k, _)| is(k)).map(|(_, v)| v),
        Value::Array(items) => items
            .chunks(2)
            .find(|kv| kv.len() == 2 && is(&kv[0]))
            .map(|kv| &kv[1]),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// How many results were ever announced on `llmq:results` (trimming does
/// not lower it: `XINFO STREAM … entries-added`, Redis ≥ 7).
pub async fn results_added(conn: &mut MultiplexedConnection) -> Result<u64> {
    let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(RESULTS)
        .query_async(conn)
        .await;
    match reply {
        Ok(v) => field(&v, "entries-added")
            .and_then(as_u64)
            .ok_or_else(|| BenchError::Invalid("XINFO STREAM has no entries-added".into())),
        // The stream does not exist until the first result.
        Err(e) if e.to_string().contains("no such key") => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Whether a worker is reading the lanes: some client's last command is
/// XREADGROUP (typically blocked in it), or group `llmq` has a consumer.
/// (Redis 7.0 creates a consumer only once it is delivered an entry, so an
/// idle worker blocked on an empty lane shows only in `CLIENT LIST`.)
pub async fn consumer_ready(conn: &mut MultiplexedConnection) -> Result<bool> {
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await?;
    if clients
        .lines()
        .any(|l| l.split_whitespace().any(|f| f == "cmd=xreadgroup"))
    {
        return Ok(true);
    }
    let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(LANE)
        .query_async(conn)
        .await;
    let groups = match reply {
        Ok(Value::Array(groups)) => groups,
        Ok(_) => return Ok(false),
        Err(e) if e.to_string().contains("no such key") => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    Ok(groups.iter().any(|g| {
        let named = matches!(field(g, "name"), Some(Value::BulkString(b)) if b == GROUP.as_bytes());
        named && field(g, "consumers").and_then(as_u64).unwrap_or(0) > 0
    }))
}

/// `used_memory` of the Redis server, in bytes.
pub async fn used_memory(conn: &mut MultiplexedConnection) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| BenchError::Invalid("INFO memory has no used_memory".into()))
}

/// The job id of a `llmq:results` entry: its `id` field, or the `id` of a
/// JSON object in any field (the result itself).
pub fn entry_job_id(map: &std::collections::HashMap<String, Value>) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    if let Some(id) = map.get("id").and_then(text) {
        return Some(id);
    }
    map.values().find_map(|v| {
        let t = text(v)?;
        let json: serde_json::Value = serde_json::from_str(&t).ok()?;
        json.get("id")?.as_str().map(str::to_owned)
    })
}

/// Completion times of jobs `<prefix>-0 … <prefix>-(n-1)`, recorded by a
/// task tailing `llmq:results` with blocking XREADs on its own connection.
pub struct ResultTail {
    /// Nanoseconds since the epoch + 1 when the result was seen; 0 = not yet.
    pub done_ns: Arc<Vec<AtomicU64>>,
    /// Distinct jobs seen so far.
    pub seen: Arc<AtomicUsize>,
    /// Signalled after every batch of entries.
    pub progress: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ResultTail {
    pub async fn start(url: &str, prefix: &str, n: usize, epoch: Instant) -> Result<ResultTail> {
        let mut conn = connect(url).await?;
        let done_ns: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let seen = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let (d, s, p, prefix) = (
            done_ns.clone(),
            seen.clone(),
            progress.clone(),
            prefix.to_owned(),
        );
        let task = tokio::spawn(async move {
            let mut last = "0-0".to_owned();
            loop {
                let reply: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(4096)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(RESULTS)
                    .arg(&last)
                    .query_async(&mut conn)
                    .await;
                let now = epoch.elapsed().as_nanos() as u64 + 1;
                let Ok(Some(reply)) = reply else {
                    continue;
                };
                for key in reply.keys {
                    for entry in key.ids {
                        let seq = entry_job_id(&entry.map)
                            .and_then(|id| parse_seq(&prefix, &id))
                            .and_then(|seq| usize::try_from(seq).ok());
                        if let Some(slot) = seq.and_then(|i| d.get(i)) {
                            if slot
                                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                            {
                                s.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        last = entry.id;
                    }
                }
                p.notify_waiters();
            }
        });
        Ok(ResultTail {
            done_ns,
            seen,
            progress,
            task,
        })
    }

    /// Waits until job `seq` is seen, or `timeout` passes; returns whether it was seen.
    pub async fn wait_for(&self, seq: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.progress.notified();
            if self
                .done_ns
                .get(seq)
                .is_some_and(|d| d.load(Ordering::Acquire) != 0)
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self
                    .done_ns
                    .get(seq)
                    .is_some_and(|d| d.load(Ordering::Acquire) != 0);
            }
        }
    }

    /// Waits until `count` distinct jobs are seen, or `timeout` passes.
    pub async fn wait_count(&self, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.progress.notified();
            if self.seen.load(Ordering::Acquire) >= count {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.seen.load(Ordering::Acquire) >= count;
            }
        }
    }
}

impl Drop for ResultTail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn ids_round_trip_and_jobs_have_a_fixed_size() {
        assert_eq!(parse_seq("bd", &job_id("bd", 42)), Some(42));
        assert_eq!(parse_seq("bd", "bdx-1"), None);
        assert_eq!(parse_seq("bd", "other-1"), None);
        assert_eq!(job_json("a-1", 1).len(), job_json("a-2", 999_999).len());
        let v: serde_json::Value = serde_json::from_str(&job_json("a-1", 1)).unwrap();
        assert_eq!(v["id"], "a-1");
        assert_eq!(v["max_tokens"], MAX_TOKENS);
    }

    #[test]
    fn result_entries_name_their_job_by_field_or_embedded_json() {
        let mut m = HashMap::new();
        m.insert("id".to_owned(), Value::BulkString(b"x-1".to_vec()));
        assert_eq!(entry_job_id(&m).as_deref(), Some("x-1"));
        let mut m = HashMap::new();
        m.insert(
            "result".to_owned(),
            Value::BulkString(br#"{"id":"x-2","status":"succeeded"}"#.to_vec()),
        );
        m.insert(
            "status".to_owned(),
            Value::BulkString(b"succeeded".to_vec()),
        );
        assert_eq!(entry_job_id(&m).as_deref(), Some("x-2"));
        assert_eq!(entry_job_id(&HashMap::new()), None);
    }

    #[test]
    fn reads_fields_of_resp2_and_resp3_replies() {
        let resp2 = Value::Array(vec![
            Value::BulkString(b"length".to_vec()),
            Value::Int(3),
            Value::BulkString(b"entries-added".to_vec()),
            Value::Int(7),
        ]);
        assert_eq!(field(&resp2, "entries-added").and_then(as_u64), Some(7));
        let resp3 = Value::Map(vec![(
            Value::SimpleString("consumers".into()),
            Value::BulkString(b"2".to_vec()),
        )]);
        assert_eq!(field(&resp3, "consumers").and_then(as_u64), Some(2));
        assert!(field(&resp3, "nope").is_none());
    }
}
