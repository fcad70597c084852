//! The job queue: a Redis Streams backend for apalis-core 1.0 that owns
//! everything between a producer's `XADD` and the result a producer reads
//! back (SPEC §3). The executor only says what running a job produced (a
//! [`Disposition`]); this module turns that into Redis writes.
//!
//! # What runs where
//!
//! apalis is the worker runtime: [`Queue::run`] registers one apalis
//! `Worker` under a `Monitor` (graceful shutdown with
//! `shutdown_timeout(config.queue.shutdown_grace)`), built with
//! `WorkerBuilder::backend(StreamsBackend).parallelize(tokio::spawn)`, so
//! every job runs in its own tokio task. Our [`StreamsBackend`] implements
//! apalis-core's `Backend`; behind it, tasks of ours do the Redis work:
//!
//! - **fetcher**: takes a permit per job (`config.queue.concurrency`
//!   permits), reads up to 128 entries in one round trip with a Lua script
//!   that `XREADGROUP`s the lanes in priority order (a lower lane only gets
//!   the COUNT the lanes above left over), reclaims entries of dead
//!   consumers with `XAUTOCLAIM`, runs the per-batch idempotency checks in
//!   one pipeline, dead-letters malformed entries at once, and hands the
//!   rest to the worker. It blocks (`XREADGROUP … BLOCK` on a dedicated
//!   connection) only when every lane is empty.
//! - **writer**: gathers finished jobs (whatever finished while the
//!   previous write was in flight, up to 256) and writes results + acks of
//!   the whole batch in one `MULTI`/`EXEC` pipeline.
//! - **mover**: moves due delayed retries back to their lane (Lua:
//!   `ZRANGEBYSCORE` + `XADD` + `ZREM`).
//! - **lease keeper**: every visibility_timeout/3 resets the idle time of
//!   the entries this daemon is still running (`XCLAIM … JUSTID`, which
//!   does not bump the delivery counter) and the TTL of their in-flight
//!   markers, so a long job is not reclaimed by another daemon while alive.
//!
//! Why the work sits behind the backend rather than in apalis layers:
//! apalis-core 1.0 has no concurrency or timeout layer (those live in the
//! `apalis` crate, which we do not depend on), and strict priority needs
//! the *fetch size* to equal the free slots, which only the backend knows.
//! So the backend enforces `concurrency` with its permits. The executor
//! bounds each run by the job's deadline; as a safety net against a hung
//! run, [`JobService`] stops a run that outlives the deadline (`deadline_s`
//! from enqueue, else `routing.default_deadline`) by a margin of 10%
//! (100 ms to 60 s) and counts it as a `timed_out` attempt.
//!
//! # Redis keys
//!
//! | key | type | use |
//! |---|---|---|
//! | `llmq:{jobs}:<lane>` | stream | a lane (`config.queue.lanes`, highest first), group `llmq` |
//! | `llmq:{jobs}:delayed` | zset | delayed retries, score = due time (Unix ms) |
//! | `llmq:inflight:<id>` | string | `<consumer>\|<lane>\|<entry id>`, `PX visibility_timeout`, while a job runs |
//! | `llmq:result:<id>` | string | result JSON, `EX result_ttl` |
//! | `llmq:done:<id>` | list | status marker for `BLPOP`, same TTL |
//! | `llmq:results` | stream | `id status result`, `MAXLEN ~ results_maxlen` |
//! | `llmq:dead` | hash | id (or entry id) → `{"reason","job","job_bytes","job_truncated","lane","attempts","at"}`; `job` is cut to `dead_body_bytes` |
//!
//! Entry fields: `job` (the job JSON, required); our re-enqueues add
//! `attempts` (attempts already made), `enqueued_ms` (first enqueue) and
//! `history` (JSON list of earlier [`Attempt`]s).
//!
//! # Commands per job (happy path)
//!
//! Batched per fetch (≤128 jobs): one `EVALSHA` (priority fetch). Per job,
//! pipelined per batch: `EXISTS llmq:result:<id>`, `SET llmq:inflight:<id> …
//! NX PX`, `GET llmq:inflight:<id>`. Per job in the writer's `MULTI`: `SET
//! llmq:result:<id> … EX`, `LPUSH llmq:done:<id>`, `EXPIRE`, `XADD
//! llmq:results MAXLEN ~`, `DEL llmq:inflight:<id>`, `XACK`, `XDEL`.
//!
//! # Guarantees and how they are kept
//!
//! - **At-least-once, at-most-once per id.** A job whose result exists is
//!   acked without running; a job whose id is in flight under another
//!   stream entry is acked without running (the other entry will write the
//!   result). A re-delivery of the *same* entry (reclaimed after a crash)
//!   takes the in-flight marker over and runs.
//! - **Crashes count.** attempts = `attempts` carried in the entry + the
//!   entry's delivery counter (which `XAUTOCLAIM` bumps). Each crashed
//!   delivery adds an attempt with outcome `crashed` to the history. When
//!   attempts would exceed `max_attempts` the job is dead-lettered ("crashed/
//!   timed out N times") with a failed result (`exhausted`).
//! - **Results then ack, in one transaction.** In standalone Redis the
//!   writer's pipeline is one `MULTI`/`EXEC`. Result keys hash to other
//!   Cluster slots than `{jobs}`, so on a Cluster the same commands would go
//!   as two steps, result first and ack second: a crash between them only
//!   re-runs a job whose result exists, which the idempotency check acks
//!   without running.
//! - **Redis outages** are logged (`warn`) and retried with backoff (100 ms
//!   → 5 s) by every task; nothing exits or panics because of them.
//!   Finished jobs wait in the writer until Redis is back.
//! - **Graceful stop**: stop fetching, let running jobs finish for up to
//!   `shutdown_grace`, write their results, and leave everything else
//!   unacked (pending in this consumer, so another daemon reclaims it after
//!   the visibility timeout; or still in the stream).
//!
//! # Test-only hook
//!
//! When the env var `LLMQ_TEST_HOOKS=1` is set and a job's `metadata` has
//! `"llmq_test": "crash"`, the process aborts (`std::process::abort()`) as
//! it starts that job. End-to-end tests use it to crash a daemon mid-job.
//! Never set it in production.

mod backend;
mod delayed;
mod fetch;
mod keys;
mod lease;
mod producer;
mod scripts;
mod stats;
mod writer;

pub(crate) use backend::{JobService, StreamsBackend};
pub(crate) use keys::{lane_key, valid_lane};
pub(crate) use producer::push_with;
pub use producer::{get_result, push, wait};
pub use stats::{stats, LaneStats, QueueStats};

use crate::config::{Config, QueueConfig};
use crate::job::{Attempt, Job, JobResult};
use apalis_core::monitor::Monitor;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::ext::parallelize::ParallelizeExt;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

/// Entries fetched per round trip at most.
pub(crate) const FETCH_BATCH: usize = 128;
/// Finished jobs written per transaction at most.
pub(crate) const WRITE_BATCH: usize = 256;
/// Longest single `XREADGROUP … BLOCK`.
pub(crate) const BLOCK_MAX: Duration = Duration::from_secs(2);

/// What running one job produced; the queue turns it into Redis writes.
///
/// Results carry only the attempts of *this* run: the queue prepends the
/// attempts of earlier runs ([`JobContext::previous_attempts`]), so the
/// final result lists every attempt. The queue also fills `id`, `metadata`
/// (echo of the job's) and `queued_ms` when the executor left them empty.
#[derive(Debug, Clone)]
pub enum Disposition {
    /// Write the result, ack.
    Done(JobResult),
    /// Ack and re-enqueue through `llmq:{jobs}:delayed` after `after` (or
    /// the configured exponential backoff when `None`), carrying the
    /// attempts so far. When attempts are exhausted the job is dead-lettered
    /// instead with a failed result (`error.kind = "exhausted"`).
    Retry {
        after: Option<Duration>,
        /// This run's attempts (upstream calls or refusals).
        attempts: Vec<Attempt>,
        reason: String,
    },
    /// `HSET llmq:dead`, write the (failed) result, ack.
    DeadLetter { reason: String, result: JobResult },
}

/// What the queue knows about one delivery of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobContext {
    /// Lane name (`high`, `normal`, …).
    pub lane: String,
    /// 1-based, counting retries and crashed deliveries.
    pub attempt: u32,
    /// `config.queue.max_attempts`.
    pub max_attempts: u32,
    /// When the job was first enqueued (Unix ms): the `enqueued_ms` field
    /// of a re-enqueued entry, else the stream entry id's time.
    pub enqueued_unix_ms: u64,
    /// Fetch time − `enqueued_unix_ms`.
    pub queued_ms: u64,
    /// The stream entry id of this delivery.
    pub entry_id: String,
    /// Attempts of earlier runs (retries, and `crashed` for each crashed delivery).
    pub previous_attempts: Vec<Attempt>,
}

/// Runs one job. The executor implements this; tests use trivial ones.
pub trait JobHandler: Send + Sync + 'static {
    fn run(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, Disposition>;
}

/// Queue errors (defined with the daemon's `Error`, which wraps them).
pub use crate::error::QueueError;

/// A lane: its name and stream key.
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    pub name: String,
    pub key: String,
}

/// State shared by the queue's tasks.
pub(crate) struct Shared {
    pub cfg: QueueConfig,
    pub lanes: Vec<Lane>,
    pub consumer: String,
    pub client: redis::Client,
    /// Multiplexed connection for everything that does not block.
    pub conn: ConnectionManager,
    pub scripts: scripts::Scripts,
    /// Entries handed to the worker and not yet acked: (lane, entry id) → job id.
    pub inflight: Mutex<HashMap<(usize, String), String>>,
    /// Wakes the mover when this daemon scheduled a retry.
    pub mover_wake: Notify,
    /// `LLMQ_TEST_HOOKS=1` (see the module docs).
    pub hooks: bool,
    /// Set by [`Queue::run`]: clones share one consumer name, so only one may run.
    pub running: AtomicBool,
    /// Deadline of a job that gives none (`routing.default_deadline`).
    pub default_deadline: Duration,
}

impl Shared {
    /// Index of the lane used when an entry names no known lane.
    pub(crate) fn default_lane(&self) -> usize {
        self.lanes
            .iter()
            .position(|l| l.name == "normal")
            .unwrap_or(self.lanes.len() / 2)
    }

    /// The in-flight marker value of an entry owned by this consumer.
    pub(crate) fn inflight_value(&self, lane: usize, entry_id: &str) -> String {
        format!("{}|{}|{}", self.consumer, self.lanes[lane].name, entry_id)
    }

    pub(crate) fn track(&self, lane: usize, entry_id: &str, job_id: &str) {
        if let Ok(mut m) = self.inflight.lock() {
            m.insert((lane, entry_id.to_string()), job_id.to_string());
        }
    }

    pub(crate) fn untrack(&self, lane: usize, entry_id: &str) {
        if let Ok(mut m) = self.inflight.lock() {
            m.remove(&(lane, entry_id.to_string()));
        }
    }
}

/// Current Unix time in ms (the one wall-clock helper, under the queue's name).
pub(crate) use crate::clock::unix_ms_now as unix_ms;

/// Exponential backoff for Redis outages: 100 ms doubling to 5 s.
#[derive(Debug)]
pub(crate) struct OutageBackoff {
    next: Duration,
}

impl OutageBackoff {
    pub(crate) fn new() -> OutageBackoff {
        OutageBackoff {
            next: Duration::from_millis(100),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }
}

/// Waits until the stop flag is raised (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Sleeps for `d` unless stopped first; true when stopped.
pub(crate) async fn sleep_or_stop(d: Duration, rx: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *rx.borrow(),
        _ = stopped(rx) => true,
    }
}

fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.' || *c == '_')
        .take(64)
        .collect();
    let host = if host.is_empty() { "llmq".into() } else { host };
    format!("{host}-{}-{}", std::process::id(), ulid::Ulid::new())
}

/// The job queue of one daemon.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("consumer", &self.shared.consumer)
            .field(
                "lanes",
                &self
                    .shared
                    .lanes
                    .iter()
                    .map(|l| &l.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Queue {
    /// Validates the queue config and prepares connections. Connections are
    /// lazy: a Redis that is down now is retried by the running queue, not
    /// an error here (only a malformed URL or queue config is).
    pub async fn connect(cfg: &Config) -> crate::Result<Queue> {
        Ok(Self::connect_queue(cfg)?)
    }

    fn connect_queue(cfg: &Config) -> Result<Queue, QueueError> {
        let q = &cfg.queue;
        if q.lanes.is_empty() {
            return Err(QueueError::Config(
                "`lanes` must name at least one lane".into(),
            ));
        }
        let mut lanes: Vec<Lane> = Vec::with_capacity(q.lanes.len());
        for name in &q.lanes {
            if !valid_lane(name) {
                return Err(QueueError::InvalidLane(name.clone()));
            }
            if lanes.iter().any(|l| &l.name == name) {
                return Err(QueueError::Config(format!("lane {name:?} is listed twice")));
            }
            lanes.push(Lane {
                name: name.clone(),
                key: lane_key(name),
            });
        }
        if q.concurrency == 0 {
            return Err(QueueError::Config(
                "`concurrency` must be at least 1".into(),
            ));
        }
        if q.max_attempts == 0 {
            return Err(QueueError::Config(
                "`max_attempts` must be at least 1".into(),
            ));
        }
        if q.visibility_timeout < Duration::from_millis(100) {
            return Err(QueueError::Config(
                "`visibility_timeout` must be at least 100ms".into(),
            ));
        }
        let client = redis::Client::open(cfg.redis.url.as_str())?;
        let conn = ConnectionManager::new_lazy_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_max_delay(Duration::from_secs(5)),
        )?;
        Ok(Queue {
            shared: Arc::new(Shared {
                cfg: q.clone(),
                lanes,
                consumer: consumer_name(),
                client,
                conn,
                scripts: scripts::Scripts::new(),
                inflight: Mutex::new(HashMap::new()),
                mover_wake: Notify::new(),
                hooks: std::env::var("LLMQ_TEST_HOOKS").as_deref() == Ok("1"),
                running: AtomicBool::new(false),
                default_deadline: cfg.routing.default_deadline,
            }),
        })
    }

    /// This daemon's consumer name in the `llmq` group (`host-pid-ulid`).
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    /// A clone of the queue's multiplexed connection (cheap), for the admin
    /// API and producers. Do not run blocking commands on it.
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.shared.conn.clone()
    }

    /// Depth, pending, delayed and dead counts (for `GET /v1/queue`).
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let names: Vec<String> = self.shared.lanes.iter().map(|l| l.name.clone()).collect();
        stats(&mut self.shared.conn.clone(), &names).await
    }

    /// Runs the workers under apalis until `shutdown` resolves, then drains:
    /// running jobs get up to `shutdown_grace` to finish and have their
    /// results written; everything else stays unacked for another daemon.
    /// A queue (and its clones) runs once; connect again for another consumer.
    pub async fn run(
        self,
        handler: Arc<dyn JobHandler>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> crate::Result<()> {
        Ok(self.run_inner(handler, shutdown).await?)
    }

    async fn run_inner(
        self,
        handler: Arc<dyn JobHandler>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), QueueError> {
        let shared = self.shared;
        if shared.running.swap(true, Ordering::SeqCst) {
            return Err(QueueError::Runtime(
                "this queue is already running (clones share one consumer name)".into(),
            ));
        }
        let grace = shared.cfg.shutdown_grace;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (hard_tx, hard_rx) = watch::channel(false);
        let stopping = Arc::new(AtomicBool::new(false));
        let (deliver_tx, deliver_rx) = mpsc::unbounded_channel();
        let (write_tx, write_rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(shared.cfg.concurrency));

        let writer = tokio::spawn(writer::run(shared.clone(), write_rx));
        let fetcher = tokio::spawn(
            fetch::Fetcher::new(
                shared.clone(),
                permits,
                deliver_tx,
                write_tx.clone(),
                stop_rx.clone(),
            )?
            .run(),
        );
        let mover = tokio::spawn(delayed::run_mover(shared.clone(), stop_rx.clone()));
        let leases = tokio::spawn(lease::run(shared.clone(), stop_rx.clone()));

        let backend = StreamsBackend::new(deliver_rx, stopping.clone());
        let service = JobService::new(handler, shared.clone(), write_tx, hard_rx);
        let worker_name = format!("llmq-{}", shared.consumer);
        let monitor = Monitor::new()
            .register(move |_restarts| {
                WorkerBuilder::new(worker_name.as_str())
                    .backend(backend.clone())
                    .parallelize(tokio::spawn)
                    .build(service.clone())
            })
            .should_restart(|_, e| {
                tracing::warn!(error = %e, "queue worker failed; restarting it");
                true
            })
            .shutdown_timeout(grace);

        let signal_stopping = stopping.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("queue: stopping fetches, draining running jobs");
            signal_stopping.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
            Ok::<(), std::io::Error>(())
        };
        let outcome = monitor.run_with_signal(signal).await;
        // Whatever still runs after the grace period is abandoned: left
        // pending, not acked.
        let _ = hard_tx.send(true);
        stopping.store(true, Ordering::SeqCst);
        for task in [fetcher, mover, leases] {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "queue task ended abnormally");
            }
        }
        // The writer ends once every sender is gone (fetcher, worker, jobs);
        // give it a bounded time to flush if Redis is down.
        let writer_abort = writer.abort_handle();
        if tokio::time::timeout(grace.max(Duration::from_secs(2)), writer)
            .await
            .is_err()
        {
            tracing::warn!("queue: results still unwritten at shutdown; their jobs stay pending");
            writer_abort.abort();
        }
        drop(hard_tx);
        outcome.map_err(|e| QueueError::Runtime(e.to_string()))
    }
}
