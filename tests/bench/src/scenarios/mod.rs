//! The scenarios and the pieces they share: a fresh Redis per run, key
//! sets, and the burn-down measurement (preload, start, count results).

pub mod burndown;
pub mod keys;
pub mod latency;
pub mod memory;
pub mod quota;

use crate::error::{BenchError, Result};
use crate::queue;
use crate::report::Row;
use crate::worker::{Setup, System, Worker};
use crate::{Ctx, Scenario};
use llmq_mock::{MockConfig, MockServer, Protocol};
use llmq_testkit::RedisServer;
use redis::aio::MultiplexedConnection;
use std::time::{Duration, Instant};

/// Runs one scenario; failures become error rows.
pub async fn run(s: Scenario, ctx: &mut Ctx) -> Vec<Row> {
    match s {
        Scenario::BurnDown => burndown::run(ctx).await,
        Scenario::Latency => latency::run(ctx).await,
        Scenario::Memory => memory::run(ctx).await,
        Scenario::Keys => keys::run(ctx).await,
        Scenario::Quota => quota::run(ctx).await,
    }
}

/// The systems a scenario compares, baseline first so its figure exists
/// even when the daemon fails.
pub fn systems(ctx: &Ctx) -> Vec<System> {
    if ctx.with_llmq {
        vec![System::Baseline, System::Llmq]
    } else {
        vec![System::Baseline]
    }
}

/// `n` distinct API keys (secrets of the mock; 21 characters so the mock masks them).
pub fn bench_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sk-bench-{i:012}")).collect()
}

/// A mock on 127.0.0.1 that serves any key at a fixed latency.
///
/// Plain HTTP on purpose (the mock's default is HTTPS + HTTP/2): the recorded
/// baselines were all measured over plain HTTP/1.1, and the benchmark keeps
/// comparing like with like until issue 17 moves it (and its baselines) to TLS.
pub async fn open_mock(latency_ms: u64) -> Result<MockServer> {
    Ok(MockServer::start(
        MockConfig::default()
            .plain_http()
            .accept_unknown_keys(true)
            .default_latency_ms(latency_ms),
    )
    .await?)
}

/// A private Redis for one run and a connection to it.
pub struct Rig {
    pub redis: RedisServer,
    pub conn: MultiplexedConnection,
}

impl Rig {
    pub async fn start() -> Result<Rig> {
        let redis = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .map_err(|e| BenchError::Invalid(format!("starting redis-server panicked: {e}")))?;
        let conn = queue::connect(&redis.url()).await?;
        Ok(Rig { redis, conn })
    }

    pub fn url(&self) -> String {
        self.redis.url()
    }

    /// A worker setup against this Redis and `mock`.
    pub fn setup(
        &self,
        mock: &MockServer,
        concurrency: usize,
        keys: Vec<String>,
        jobs: u64,
    ) -> Setup {
        Setup {
            redis_url: self.url(),
            base_url: mock.base_url(Protocol::OpenAi),
            concurrency,
            keys,
            quota: None,
            results_maxlen: (jobs as usize).saturating_mul(2).max(10_000),
        }
    }
}

/// Keeps the run with the higher `score`.
pub fn keep_best(slot: &mut Option<Burn>, run: Burn, score: fn(&Burn) -> f64) {
    if slot.is_none_or(|best| score(&run) > score(&best)) {
        *slot = Some(run);
    }
}

/// The systems of repeat `r`, in alternating order (A B, B A, …).
pub fn systems_for_repeat(ctx: &Ctx, r: usize) -> Vec<System> {
    let mut v = systems(ctx);
    if r % 2 == 1 {
        v.reverse();
    }
    v
}

/// What one burn-down measured.
#[derive(Debug, Clone, Copy)]
pub struct Burn {
    /// Jobs / (spawn → last result).
    pub jobs_per_s: f64,
    /// (Jobs − 1) / (first result → last result).
    pub steady_jobs_per_s: f64,
    /// Spawn → first result.
    pub startup_s: f64,
    /// CPU time of the worker process per job, startup included.
    pub cpu_us_per_job: f64,
}

/// Preloads `jobs` jobs into a fresh Redis, starts `system`, and measures
/// until every result is announced. Checks that the mock accepted every job
/// (so fast failures cannot pass for throughput).
pub async fn burn(
    ctx: &Ctx,
    system: System,
    mock: &MockServer,
    jobs: u64,
    keys: Vec<String>,
    prefix: &str,
) -> Result<Burn> {
    let mut rig = Rig::start().await?;
    queue::preload(&mut rig.conn, prefix, jobs).await?;
    let accepted_before = mock.stats().total_accepted;
    let setup = rig.setup(mock, ctx.sizes.concurrency, keys, jobs);
    let mut worker = Worker::spawn(system, &ctx.bins, &setup)?;
    let t0 = worker.spawned_at;
    // Fail if slower than ~500 jobs/s (or 30 s of startup).
    let timeout = Duration::from_secs(30) + Duration::from_millis(jobs * 2);
    let mut first: Option<Instant> = None;
    let mut polls = 0u64;
    let done_at = loop {
        let n = queue::results_added(&mut rig.conn).await?;
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some(now);
        }
        if n >= jobs {
            break now;
        }
        polls += 1;
        if polls.is_multiple_of(25) {
            worker.check_alive()?;
        }
        if now.duration_since(t0) > timeout {
            return Err(worker.fail(format!(
                "only {n} of {jobs} results after {:.1}s",
                timeout.as_secs_f64()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let cpu = worker.cpu_us()?;
    worker.stop();
    let accepted = mock.stats().total_accepted - accepted_before;
    if accepted < jobs {
        return Err(worker.fail(format!(
            "{jobs} results, but the mock served only {accepted} successful calls: results are failures"
        )));
    }
    let first = first.unwrap_or(done_at);
    let wall = done_at.duration_since(t0).as_secs_f64();
    let steady = done_at.duration_since(first).as_secs_f64();
    Ok(Burn {
        jobs_per_s: jobs as f64 / wall,
        steady_jobs_per_s: if steady > 0.0 {
            (jobs.saturating_sub(1)) as f64 / steady
        } else {
            f64::NAN
        },
        startup_s: first.duration_since(t0).as_secs_f64(),
        cpu_us_per_job: cpu as f64 / jobs as f64,
    })
}
