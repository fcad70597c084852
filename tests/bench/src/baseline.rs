//! The baseline: the physical limit of this design, a bare loop with no
//! routing, no limiter and no plugin. It XREADGROUPs a batch from the lane,
//! POSTs each job to the mock in OpenAI format (reqwest, the same
//! concurrency as llmq), then in one pipelined round trip per job writes the
//! result the way SPEC §3 says (SET EX, LPUSH + EXPIRE, XADD `llmq:results`)
//! and removes the job (XACK, XDEL). It runs as its own process
//! (`llmq-bench baseline-worker`) so it is measured exactly like the daemon.

use crate::error::{BenchError, Result};
use crate::queue::{self, GROUP, LANE, RESULTS};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most jobs taken by one XREADGROUP.
const BATCH: usize = 256;
/// Result TTL (the daemon's default, 24 h).
const RESULT_TTL_S: u64 = 24 * 3600;

/// What the loop needs.
#[derive(Clone)]
pub struct BaselineArgs {
    pub redis_url: String,
    /// The mock's OpenAI base URL.
    pub base_url: String,
    pub concurrency: usize,
    /// Secrets, used round-robin.
    pub keys: Vec<String>,
    pub results_maxlen: usize,
}

impl std::fmt::Debug for BaselineArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaselineArgs")
            .field("redis_url", &self.redis_url)
            .field("base_url", &self.base_url)
            .field("concurrency", &self.concurrency)
            .field("keys", &self.keys.len())
            .field("results_maxlen", &self.results_maxlen)
            .finish()
    }
}

/// The fields of a job the loop reads; everything else is ignored.
#[derive(Deserialize)]
struct BareJob {
    id: String,
    messages: Vec<serde_json::Value>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
}

struct Shared {
    args: BaselineArgs,
    http: reqwest::Client,
    url: String,
    writer: MultiplexedConnection,
    next_key: AtomicUsize,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the loop until the process is killed.
pub async fn run(args: BaselineArgs) -> Result<()> {
    if args.keys.is_empty() {
        return Err(BenchError::Invalid(
            "the baseline loop needs at least one key".into(),
        ));
    }
    let mut reader = queue::connect(&args.redis_url).await?;
    let writer = queue::connect(&args.redis_url).await?;
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(LANE)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut reader)
        .await;
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            return Err(e.into());
        }
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let shared = Arc::new(Shared {
        url: format!("{}/chat/completions", args.base_url.trim_end_matches('/')),
        args: args.clone(),
        http,
        writer,
        next_key: AtomicUsize::new(0),
    });
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let consumer = format!("baseline-{}", std::process::id());
    loop {
        let Ok(first) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let count = (slots.available_permits() + 1).min(BATCH);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(LANE)
            .arg(">")
            .query_async(&mut reader)
            .await?;
        let mut permit = Some(first);
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            let permit = match permit.take() {
                Some(p) => p,
                None => match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(&shared, entry, permit).await {
                    eprintln!("baseline loop: job failed: {e}");
                }
            });
        }
    }
}

/// One job: POST, then one pipeline that writes the result and drops the job.
async fn handle(s: &Shared, entry: StreamId, _permit: OwnedSemaphorePermit) -> Result<()> {
    let started = Instant::now();
    let body = match entry.map.get("job") {
        Some(redis::Value::BulkString(b)) => b.as_slice(),
        _ => &[][..],
    };
    let Ok(job) = serde_json::from_slice::<BareJob>(body) else {
        // Malformed: drop it (a real daemon dead-letters it).
        let mut pipe = redis::pipe();
        pipe.cmd("XACK")
            .arg(LANE)
            .arg(GROUP)
            .arg(&entry.id)
            .ignore();
        pipe.cmd("XDEL").arg(LANE).arg(&entry.id).ignore();
        pipe.query_async::<()>(&mut s.writer.clone()).await?;
        return Ok(());
    };
    let model = job.model.unwrap_or_else(|| queue::MODEL.to_owned());
    let request = json!({"model": model, "messages": job.messages, "max_tokens": job.max_tokens});
    let k = s.next_key.fetch_add(1, Ordering::Relaxed) % s.args.keys.len();
    let sent = Instant::now();
    let response = s
        .http
        .post(&s.url)
        .bearer_auth(&s.args.keys[k])
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&request)?)
        .send()
        .await;
    let (ok, output, usage) = match response {
        Ok(r) => {
            let status = r.status();
            let bytes = r.bytes().await.unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let text = v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let usage = json!({
                "input_tokens": v["usage"]["prompt_tokens"],
                "output_tokens": v["usage"]["completion_tokens"],
            });
            (status.is_success(), text, usage)
        }
        Err(_) => (false, String::new(), json!({})),
    };
    let ms = sent.elapsed().as_millis() as u64;
    let now_ms = unix_ms();
    let enqueued_ms: u64 = entry
        .id
        .split('-')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(now_ms);
    let status = if ok { "succeeded" } else { "failed" };
    let result = json!({
        "id": job.id,
        "status": status,
        "output": output,
        "provider": "mock",
        "model": model,
        "key": format!("mock#{k}"),
        "tier": "free",
        "usage": usage,
        "cost_usd": 0.0,
        "attempts": [{"provider": "mock", "key": format!("mock#{k}"), "outcome": if ok {"ok"} else {"transient"}, "ms": ms}],
        "queued_ms": now_ms.saturating_sub(enqueued_ms),
        "duration_ms": started.elapsed().as_millis() as u64,
        "finished_at": llmq_mock::rfc3339_ms(now_ms),
    });
    let done_key = format!("llmq:done:{}", job.id);
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(format!("llmq:result:{}", job.id))
        .arg(serde_json::to_vec(&result)?)
        .arg("EX")
        .arg(RESULT_TTL_S)
        .ignore();
    pipe.cmd("LPUSH").arg(&done_key).arg(status).ignore();
    pipe.cmd("EXPIRE").arg(&done_key).arg(RESULT_TTL_S).ignore();
    pipe.cmd("XADD")
        .arg(RESULTS)
        .arg("MAXLEN")
        .arg("~")
        .arg(s.args.results_maxlen)
        .arg("*")
        .arg("id")
        .arg(&job.id)
        .arg("status")
        .arg(status)
        .ignore();
    pipe.cmd("XACK")
        .arg(LANE)
        .arg(GROUP)
        .arg(&entry.id)
        .ignore();
    pipe.cmd("XDEL").arg(LANE).arg(&entry.id).ignore();
    pipe.query_async::<()>(&mut s.writer.clone()).await?;
    Ok(())
}
