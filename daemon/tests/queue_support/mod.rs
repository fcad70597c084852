//! Shared helpers for the queue integration tests: a config pointing at a
//! private Redis, a queue running in the background, an echo handler that
//! records every call, and small Redis helpers.
#![allow(dead_code)]

use futures::future::BoxFuture;
use futures::FutureExt;
use llmq::config::Config;
use llmq::job::{Attempt, Job, JobResult, Status, UsageOut};
use llmq::queue::{Disposition, JobContext, JobHandler, Queue};
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[allow(unused_imports)]
pub use llmq_testkit::{wait_until_async, Persistence, RedisServer};

/// A config for tests: the given Redis, short delays.
pub fn config(url: &str) -> Config {
    let mut c = Config::default();
    c.redis.url = url.to_string();
    c.queue.concurrency = 64;
    c.queue.visibility_timeout = Duration::from_secs(5);
    c.queue.retry.initial_delay = Duration::from_millis(50);
    c.queue.retry.max_delay = Duration::from_secs(1);
    c.queue.shutdown_grace = Duration::from_secs(5);
    c
}

/// An async connection with a generous response timeout.
pub async fn conn(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap()
}

/// A valid job JSON with id, one user message and metadata `{"n": id}`.
pub fn job_json(id: &str, text: &str) -> String {
    serde_json::json!({
        "id": id,
        "messages": [{"role": "user", "content": text}],
        "metadata": {"n": id},
    })
    .to_string()
}

/// `XADD llmq:{jobs}:<lane> * job <body>`; returns the entry id.
pub async fn xadd(c: &mut MultiplexedConnection, lane: &str, body: &str) -> String {
    redis::cmd("XADD")
        .arg(format!("llmq:{{jobs}}:{lane}"))
        .arg("*")
        .arg("job")
        .arg(body)
        .query_async(c)
        .await
        .unwrap()
}

/// Pipelined `XADD`s, in chunks.
pub async fn xadd_many(c: &mut MultiplexedConnection, items: &[(String, String)]) {
    for chunk in items.chunks(2000) {
        let mut p = redis::pipe();
        for (lane, body) in chunk {
            p.cmd("XADD")
                .arg(format!("llmq:{{jobs}}:{lane}"))
                .arg("*")
                .arg("job")
                .arg(body)
                .ignore();
        }
        p.query_async::<()>(c).await.unwrap();
    }
}

pub async fn int(c: &mut MultiplexedConnection, cmd: &[&str]) -> i64 {
    let mut r = redis::cmd(cmd[0]);
    for a in &cmd[1..] {
        r.arg(*a);
    }
    r.query_async(c).await.unwrap()
}

pub async fn xlen(c: &mut MultiplexedConnection, key: &str) -> i64 {
    int(c, &["XLEN", key]).await
}

/// Pending entries of the `llmq` group on a lane (0 without a group).
pub async fn pending(c: &mut MultiplexedConnection, lane: &str) -> i64 {
    let v: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(format!("llmq:{{jobs}}:{lane}"))
        .arg("llmq")
        .query_async(c)
        .await;
    match v {
        Ok(redis::Value::Array(items)) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

pub async fn get(c: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(c).await.unwrap()
}

pub async fn result(c: &mut MultiplexedConnection, id: &str) -> Option<JobResult> {
    get(c, &format!("llmq:result:{id}"))
        .await
        .map(|j| serde_json::from_str(&j).unwrap())
}

pub async fn dead(c: &mut MultiplexedConnection, field: &str) -> Option<serde_json::Value> {
    let v: Option<String> = redis::cmd("HGET")
        .arg("llmq:dead")
        .arg(field)
        .query_async(c)
        .await
        .unwrap();
    v.map(|j| serde_json::from_str(&j).unwrap())
}

/// Waits until `llmq:results` holds at least `n` entries.
pub async fn wait_results(url: &str, n: i64, timeout: Duration) {
    let c = conn(url).await;
    wait_until_async(timeout, &format!("{n} results"), || {
        let mut c = c.clone();
        async move { xlen(&mut c, "llmq:results").await >= n }
    })
    .await;
}

/// Waits until job `id` has a result.
pub async fn wait_result(url: &str, id: &str, timeout: Duration) -> JobResult {
    let c = conn(url).await;
    let key = format!("llmq:result:{id}");
    wait_until_async(timeout, &format!("a result for {id}"), || {
        let mut c = c.clone();
        let key = key.clone();
        async move { get(&mut c, &key).await.is_some() }
    })
    .await;
    result(&mut c.clone(), id).await.unwrap()
}

/// A queue running in the background until [`Running::stop`].
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<llmq::Result<()>>,
    pub consumer: String,
}

impl Running {
    /// Signals shutdown and waits for the queue to drain and return.
    pub async fn stop(mut self) -> llmq::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.handle).await.unwrap()
    }
}

pub async fn start(cfg: &Config, handler: Arc<dyn JobHandler>) -> Running {
    let q = Queue::connect(cfg).await.unwrap();
    let consumer = q.consumer().to_string();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(q.run(handler, async move {
        let _ = rx.await;
    }));
    Running {
        stop: Some(tx),
        handle,
        consumer,
    }
}

/// A successful result echoing the last user message.
pub fn ok_result(job: &Job) -> JobResult {
    let mut r = JobResult::failure(&job.id, llmq::job::FailureKind::Upstream, "");
    r.status = Status::Succeeded;
    r.error = None;
    r.output = Some(job.last_user_text());
    r.provider = Some("echo".into());
    r.model = Some("echo-1".into());
    r.key = Some("echo#0".into());
    r.usage = Some(UsageOut {
        input_tokens: 1,
        output_tokens: 1,
    });
    r.attempts = vec![attempt("success")];
    r
}

pub fn attempt(outcome: &str) -> Attempt {
    Attempt {
        provider: "echo".into(),
        model: "echo-1".into(),
        key: "echo#0".into(),
        outcome: outcome.into(),
        ms: 1,
    }
}

/// How a [`Recorder`] answers: `(job, ctx, nth call for this id)`.
type Answer = dyn Fn(&Job, &JobContext, usize) -> BoxFuture<'static, Disposition> + Send + Sync;

/// One handler call.
#[derive(Debug, Clone)]
pub struct Call {
    pub id: String,
    pub ctx: JobContext,
    pub metadata: Option<serde_json::Value>,
    pub at: Instant,
}

/// Records calls; what it answers is up to `answer`.
#[derive(Clone)]
pub struct Recorder {
    pub calls: Arc<Mutex<Vec<Call>>>,
    per_id: Arc<Mutex<HashMap<String, usize>>>,
    answer: Arc<Answer>,
}

impl Recorder {
    /// `answer(job, ctx, nth call for this id (0-based))`.
    pub fn new(
        answer: impl Fn(&Job, &JobContext, usize) -> BoxFuture<'static, Disposition>
            + Send
            + Sync
            + 'static,
    ) -> Recorder {
        Recorder {
            calls: Arc::new(Mutex::new(Vec::new())),
            per_id: Arc::new(Mutex::new(HashMap::new())),
            answer: Arc::new(answer),
        }
    }

    /// Answers `Done(ok_result)` at once.
    pub fn echo() -> Recorder {
        Recorder::new(|job, _, _| {
            let r = ok_result(job);
            async move { Disposition::Done(r) }.boxed()
        })
    }

    /// Answers `Done(ok_result)` after `d`.
    pub fn echo_after(d: Duration) -> Recorder {
        Recorder::new(move |job, _, _| {
            let r = ok_result(job);
            async move {
                tokio::time::sleep(d).await;
                Disposition::Done(r)
            }
            .boxed()
        })
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub fn count_for(&self, id: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.id == id)
            .count()
    }

    pub fn per_id(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for c in self.calls.lock().unwrap().iter() {
            *m.entry(c.id.clone()).or_insert(0) += 1;
        }
        m
    }

    pub fn handler(&self) -> Arc<dyn JobHandler> {
        Arc::new(self.clone())
    }
}

impl JobHandler for Recorder {
    fn run(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, Disposition> {
        let nth = {
            let mut per_id = self.per_id.lock().unwrap();
            let n = per_id.entry(job.id.clone()).or_insert(0);
            *n += 1;
            *n - 1
        };
        {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                id: job.id.clone(),
                ctx: ctx.clone(),
                metadata: job.metadata.clone(),
                at: Instant::now(),
            });
        }
        (self.answer)(&job, &ctx, nth)
    }
}
