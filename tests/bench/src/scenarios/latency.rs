//! Added latency. An open-loop producer offers half of llmq's burn-down
//! throughput with the mock answering after a fixed 50 ms. Each job's
//! end-to-end time runs from the producer's clock at XADD to a tail of
//! `llmq:results` seeing its entry. What the worker added is that, at each
//! percentile, less the median of direct calls to the mock at the
//! same pace (the mock's own HTTP time and its 0–2 ms tokio-timer overshoot
//! are there without any queue too); the raw `end-to-end − 50 ms` figures are
//! in the notes. Idle pickup sends single jobs, spaced out, to an idle
//! worker with the mock at 0 ms, and subtracts the median of direct calls
//! paced the same way. llmq and the baseline loop are measured one after
//! the other.

use super::{bench_keys, open_mock, systems, Rig};
use crate::error::{BenchError, Result};
use crate::queue::{self, ResultTail};
use crate::report::{Row, Target};
use crate::stats::{percentile, sorted};
use crate::worker::{System, Worker};
use crate::Ctx;
use llmq_mock::{MockServer, Protocol};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const NAME: &str = "latency";
/// Idle-pickup samples discarded while connections warm up.
const IDLE_WARMUP: usize = 5;

pub async fn run(ctx: &mut Ctx) -> Vec<Row> {
    let mut errors = Vec::new();
    let rate = ctx.sizes.latency_rate.unwrap_or_else(|| {
        ctx.burn_throughput
            .or(ctx.baseline_throughput)
            .map(|t| t * 0.5)
            .unwrap_or(ctx.sizes.latency_fallback_rate)
    });
    let mock_ms = ctx.sizes.latency_mock_ms;
    // Enough slots for 4× the jobs in flight at this rate.
    let concurrency = ctx
        .sizes
        .concurrency
        .max((rate * mock_ms as f64 / 1e3 * 4.0).ceil() as usize);

    let mut open = Sides::default();
    match open_mock(mock_ms).await {
        Ok(mock) => {
            let n = (rate * ctx.sizes.latency_secs).ceil().max(1.0) as usize;
            let warmup = ctx.sizes.latency_warmup_secs;
            match direct_calls(&mock, Pace::Open { rate, n, warmup }).await {
                Ok(v) => open.direct = Some(v),
                Err(e) => errors.push(Row::error(NAME, "direct calls, open loop", e)),
            }
            for system in systems(ctx) {
                let got = open_loop(ctx, system, &mock, rate, concurrency).await;
                open.record(system, got, "open loop", &mut errors);
            }
            mock.shutdown().await;
        }
        Err(e) => errors.push(Row::error(NAME, "setup", e)),
    }
    let mut out = vec![
        open.row("added p50", 50.0)
            .target(Target::at_most(0.3))
            .note(format!(
                "open loop at {rate:.0} jobs/s for {}s (first {}s not counted), concurrency {concurrency}, mock at {mock_ms} ms. \
                 added = end-to-end percentile − the median direct call to the mock at the same pace \
                 (the mock's HTTP time and timer overshoot are there without a queue too). {}",
                ctx.sizes.latency_secs,
                ctx.sizes.latency_warmup_secs,
                open.raw(mock_ms as f64),
            )),
        open.row("added p99", 99.0).target(Target::at_most(1.0)),
        open.row("added p99.9", 99.9),
    ];

    let mut idle = Sides::default();
    match open_mock(0).await {
        Ok(mock) => {
            match direct_calls(
                &mock,
                Pace::Spaced {
                    n: ctx.sizes.idle_samples,
                },
            )
            .await
            {
                Ok(v) => idle.direct = Some(v),
                Err(e) => errors.push(Row::error(NAME, "direct calls, spaced", e)),
            }
            for system in systems(ctx) {
                let got = idle_pickup(ctx, system, &mock).await;
                idle.record(system, got, "idle pickup", &mut errors);
            }
            mock.shutdown().await;
        }
        Err(e) => errors.push(Row::error(NAME, "idle setup", e)),
    }
    out.push(idle.row("idle pickup p50", 50.0).note(format!(
        "{} single jobs 5–25 ms apart to an idle queue, mock at 0 ms (first {IDLE_WARMUP} not counted); \
         pickup = enqueue → result visible, less the median direct call to the mock. {}",
        ctx.sizes.idle_samples,
        idle.raw(0.0),
    )));
    out.push(
        idle.row("idle pickup p99", 99.0)
            .target(Target::at_most(1.0)),
    );
    out.append(&mut errors);
    out
}

/// End-to-end samples (ms, sorted) of llmq, the baseline and direct calls.
#[derive(Default)]
struct Sides {
    llmq: Option<Vec<f64>>,
    base: Option<Vec<f64>>,
    direct: Option<Vec<f64>>,
}

impl Sides {
    fn record(&mut self, system: System, got: Result<Vec<f64>>, what: &str, errors: &mut Vec<Row>) {
        match (got, system) {
            (Ok(v), System::Llmq) => self.llmq = Some(v),
            (Ok(v), System::Baseline) => self.base = Some(v),
            (Err(e), _) => errors.push(Row::error(NAME, &format!("{} {what}", system.name()), e)),
        }
    }

    /// Percentile `p` of `side` minus the median direct call: the typical
    /// time of the upstream itself. Tail noise of the machine stays in the
    /// figure (conservative), and shows in the baseline column too.
    fn added(&self, side: &Option<Vec<f64>>, p: f64) -> Option<f64> {
        Some(percentile(side.as_ref()?, p)? - percentile(self.direct.as_ref()?, 50.0)?)
    }

    fn row(&self, figure: &str, p: f64) -> Row {
        Row::new(
            NAME,
            figure,
            "ms",
            self.added(&self.llmq, p),
            self.added(&self.base, p),
        )
    }

    /// The raw percentiles, less the nominal mock latency, for the notes.
    fn raw(&self, nominal_ms: f64) -> String {
        let fmt = |name: &str, v: &Option<Vec<f64>>| match v {
            Some(v) => format!(
                "{name} p50 {:.3} / p99 {:.3} / p99.9 {:.3} ms ({} samples)",
                percentile(v, 50.0).unwrap_or(f64::NAN) - nominal_ms,
                percentile(v, 99.0).unwrap_or(f64::NAN) - nominal_ms,
                percentile(v, 99.9).unwrap_or(f64::NAN) - nominal_ms,
                v.len()
            ),
            None => format!("{name}: not measured"),
        };
        format!(
            "Raw end-to-end − {nominal_ms} ms: {}; {}; {}",
            fmt("llmq", &self.llmq),
            fmt("baseline", &self.base),
            fmt("direct call", &self.direct)
        )
    }
}

/// How the direct calls are paced.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// `n` calls at `rate`/s, open loop; those of the first `warmup` s not counted.
    Open { rate: f64, n: usize, warmup: f64 },
    /// `n` calls one at a time, 5–25 ms apart (plus [`IDLE_WARMUP`] uncounted).
    Spaced { n: usize },
}

/// Times POSTs made straight to the mock, like the workers make them, from
/// a thread with its own runtime (as a separate client process would):
/// what a caller without any queue would see.
async fn direct_calls(mock: &MockServer, pace: Pace) -> Result<Vec<f64>> {
    let url = format!("{}/chat/completions", mock.base_url(Protocol::OpenAi));
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let got = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::io("start a runtime", "direct-call thread", e))
            .and_then(|rt| rt.block_on(direct_inner(url, pace)));
        let _ = tx.send(got);
    });
    rx.await
        .map_err(|_| BenchError::Invalid("the direct-call thread died".into()))?
}

async fn direct_inner(url: String, pace: Pace) -> Result<Vec<f64>> {
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let key = bench_keys(1).remove(0);
    let call = |client: reqwest::Client, url: String, key: String, seq: u64| async move {
        let body = serde_json::json!({
            "model": queue::MODEL,
            "messages": [{"role": "user", "content": queue::content(seq)}],
            "max_tokens": queue::MAX_TOKENS,
        });
        let t = Instant::now();
        let r = client
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let ok = r.status().is_success();
        r.bytes().await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if ok {
            Ok(ms)
        } else {
            Err(BenchError::Invalid(
                "a direct call to the mock failed".into(),
            ))
        }
    };
    let mut out = Vec::new();
    match pace {
        Pace::Open { rate, n, warmup } => {
            let start = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0usize;
            while sent < n {
                tick.tick().await;
                let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(n);
                let counted = start.elapsed().as_secs_f64() >= warmup;
                for seq in sent..due {
                    let f = call(client.clone(), url.clone(), key.clone(), seq as u64);
                    tasks.spawn(async move { (counted, f.await) });
                }
                sent = sent.max(due);
            }
            while let Some(joined) = tasks.join_next().await {
                let (counted, r) =
                    joined.map_err(|e| BenchError::Invalid(format!("direct call task: {e}")))?;
                let ms = r?;
                if counted {
                    out.push(ms);
                }
            }
        }
        Pace::Spaced { n } => {
            let mut gaps = Gaps::default();
            for seq in 0..n + IDLE_WARMUP {
                tokio::time::sleep(gaps.next()).await;
                let ms = call(client.clone(), url.clone(), key.clone(), seq as u64).await?;
                if seq >= IDLE_WARMUP {
                    out.push(ms);
                }
            }
        }
    }
    if out.is_empty() {
        return Err(BenchError::Invalid("no direct-call samples".into()));
    }
    Ok(sorted(out))
}

/// Pseudo-random gaps of 5–25 ms (a fixed LCG), so no polling period can alias.
struct Gaps(u64);

impl Default for Gaps {
    fn default() -> Self {
        Gaps(0x2545_f491_4f6c_dd1d)
    }
}

impl Gaps {
    fn next(&mut self) -> Duration {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        Duration::from_millis(5 + (self.0 >> 33) % 21)
    }
}

/// Starts `system` on a fresh Redis with a tail on the results stream.
async fn start(
    ctx: &Ctx,
    system: System,
    mock: &MockServer,
    concurrency: usize,
    prefix: &str,
    n: usize,
    epoch: Instant,
) -> Result<(Rig, ResultTail, Worker)> {
    let mut rig = Rig::start().await?;
    let tail = ResultTail::start(&rig.url(), prefix, n, epoch).await?;
    let setup = rig.setup(mock, concurrency, bench_keys(ctx.sizes.burn_keys), n as u64);
    let mut worker = Worker::spawn(system, &ctx.bins, &setup)?;
    worker
        .wait_ready(&mut rig.conn, Duration::from_secs(30))
        .await?;
    Ok((rig, tail, worker))
}

/// End-to-end time (ms) of every counted job of an open-loop run.
async fn open_loop(
    ctx: &Ctx,
    system: System,
    mock: &MockServer,
    rate: f64,
    concurrency: usize,
) -> Result<Vec<f64>> {
    let n = (rate * ctx.sizes.latency_secs).ceil().max(1.0) as usize;
    let epoch = Instant::now();
    let (rig, tail, mut worker) = start(ctx, system, mock, concurrency, "lat", n, epoch).await?;
    let mut enq_ns = vec![0u64; n];
    let mut conn = rig.conn.clone();
    let start = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < n {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(n);
        if due <= sent {
            continue;
        }
        let mut pipe = redis::pipe();
        for seq in sent..due {
            let body = queue::job_json(&queue::job_id("lat", seq as u64), seq as u64);
            pipe.cmd("XADD")
                .arg(queue::LANE)
                .arg("*")
                .arg("job")
                .arg(body)
                .ignore();
        }
        let t = epoch.elapsed().as_nanos() as u64;
        enq_ns[sent..due].fill(t);
        pipe.query_async::<()>(&mut conn).await?;
        sent = due;
    }
    let grace = Duration::from_secs(10) + Duration::from_millis(ctx.sizes.latency_mock_ms * 10);
    if !tail.wait_count(n, grace).await {
        worker.check_alive()?;
        let seen = tail.seen.load(Ordering::Acquire);
        return Err(worker.fail(format!("only {seen} of {n} results appeared")));
    }
    worker.stop();
    let warmup_ns = (ctx.sizes.latency_warmup_secs * 1e9) as u64;
    let first_ns = enq_ns.first().copied().unwrap_or(0);
    let e2e: Vec<f64> = enq_ns
        .iter()
        .zip(tail.done_ns.iter())
        .filter(|(&e, _)| e >= first_ns + warmup_ns)
        .map(|(&e, d)| (d.load(Ordering::Acquire).saturating_sub(1)) as f64 - e as f64)
        .map(|ns| ns / 1e6)
        .collect();
    if e2e.is_empty() {
        return Err(BenchError::Invalid(
            "no samples after the warm-up: run longer".into(),
        ));
    }
    Ok(sorted(e2e))
}

/// End-to-end time (ms) of single jobs sent to an idle worker.
async fn idle_pickup(ctx: &Ctx, system: System, mock: &MockServer) -> Result<Vec<f64>> {
    let n = ctx.sizes.idle_samples + IDLE_WARMUP;
    let epoch = Instant::now();
    let (rig, tail, mut worker) =
        start(ctx, system, mock, ctx.sizes.concurrency, "idle", n, epoch).await?;
    let mut conn = rig.conn.clone();
    let mut out = Vec::with_capacity(n);
    let mut gaps = Gaps::default();
    for seq in 0..n {
        tokio::time::sleep(gaps.next()).await;
        let body = queue::job_json(&queue::job_id("idle", seq as u64), seq as u64);
        let t = epoch.elapsed().as_nanos() as u64;
        redis::cmd("XADD")
            .arg(queue::LANE)
            .arg("*")
            .arg("job")
            .arg(body)
            .query_async::<()>(&mut conn)
            .await?;
        if !tail.wait_for(seq, Duration::from_secs(10)).await {
            worker.check_alive()?;
            return Err(worker.fail(format!("job {seq} got no result within 10 s")));
        }
        if seq >= IDLE_WARMUP {
            let done = tail.done_ns[seq].load(Ordering::Acquire).saturating_sub(1);
            out.push((done as f64 - t as f64) / 1e6);
        }
    }
    worker.stop();
    Ok(sorted(out))
}
