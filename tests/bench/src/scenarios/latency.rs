//! Added latency. An open-loop producer offers half of llmq's burn-down
//! throughput with the mock answering after a fixed 50 ms; each job's
//! end-to-end time (the producer's clock at XADD → a tail of
//! `llmq:results` seeing its entry) minus those 50 ms is what the worker
//! added. Idle pickup sends single jobs, spaced out, to an idle worker with
//! the mock at 0 ms: there end-to-end is all added. Both are measured for
//! llmq and for the baseline loop on the same machine, one after the other.

use super::{bench_keys, open_mock, systems, Rig};
use crate::error::{BenchError, Result};
use crate::queue::{self, ResultTail};
use crate::report::{Row, Target};
use crate::stats::{percentile, sorted};
use crate::worker::{System, Worker};
use crate::Ctx;
use llmq_mock::MockServer;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const NAME: &str = "latency";
/// Idle-pickup samples discarded while connections warm up.
const IDLE_WARMUP: usize = 5;

pub async fn run(ctx: &mut Ctx) -> Vec<Row> {
    let mut rows = Vec::new();
    let rate = ctx
        .burn_throughput
        .or(ctx.baseline_throughput)
        .map(|t| t * 0.5)
        .unwrap_or(ctx.sizes.latency_fallback_rate);
    let mock_ms = ctx.sizes.latency_mock_ms;
    // Enough slots for 4× the jobs in flight at this rate.
    let concurrency = ctx
        .sizes
        .concurrency
        .max((rate * mock_ms as f64 / 1e3 * 4.0).ceil() as usize);

    let (mut llmq, mut base) = (None, None);
    match open_mock(mock_ms).await {
        Ok(mock) => {
            for system in systems(ctx) {
                match open_loop(ctx, system, &mock, rate, concurrency).await {
                    Ok(v) => match system {
                        System::Llmq => llmq = Some(v),
                        System::Baseline => base = Some(v),
                    },
                    Err(e) => {
                        rows.push(Row::error(NAME, &format!("{} open loop", system.name()), e))
                    }
                }
            }
            mock.shutdown().await;
        }
        Err(e) => rows.push(Row::error(NAME, "setup", e)),
    }
    let pct = |v: &Option<Vec<f64>>, p: f64| v.as_ref().and_then(|v| percentile(v, p));
    let note = format!(
        "open loop at {rate:.0} jobs/s for {}s (first {}s not counted), concurrency {concurrency}, mock at {mock_ms} ms; added = end-to-end − {mock_ms} ms; {} / {} samples",
        ctx.sizes.latency_secs,
        ctx.sizes.latency_warmup_secs,
        llmq.as_ref().map_or(0, Vec::len),
        base.as_ref().map_or(0, Vec::len),
    );
    let mut out = vec![
        Row::new(NAME, "added p50", "ms", pct(&llmq, 50.0), pct(&base, 50.0))
            .target(Target::at_most(0.3))
            .note(note),
        Row::new(NAME, "added p99", "ms", pct(&llmq, 99.0), pct(&base, 99.0))
            .target(Target::at_most(1.0)),
        Row::new(
            NAME,
            "added p99.9",
            "ms",
            pct(&llmq, 99.9),
            pct(&base, 99.9),
        ),
    ];

    let (mut llmq_idle, mut base_idle) = (None, None);
    match open_mock(0).await {
        Ok(mock) => {
            for system in systems(ctx) {
                match idle_pickup(ctx, system, &mock).await {
                    Ok(v) => match system {
                        System::Llmq => llmq_idle = Some(v),
                        System::Baseline => base_idle = Some(v),
                    },
                    Err(e) => rows.push(Row::error(
                        NAME,
                        &format!("{} idle pickup", system.name()),
                        e,
                    )),
                }
            }
            mock.shutdown().await;
        }
        Err(e) => rows.push(Row::error(NAME, "idle setup", e)),
    }
    out.push(
        Row::new(
            NAME,
            "idle pickup p50",
            "ms",
            pct(&llmq_idle, 50.0),
            pct(&base_idle, 50.0),
        )
        .note(format!(
            "{} single jobs 5–25 ms apart to an idle queue, mock at 0 ms (first {IDLE_WARMUP} not counted): enqueue → result visible",
            ctx.sizes.idle_samples
        )),
    );
    out.push(
        Row::new(
            NAME,
            "idle pickup p99",
            "ms",
            pct(&llmq_idle, 99.0),
            pct(&base_idle, 99.0),
        )
        .target(Target::at_most(1.0)),
    );
    out.append(&mut rows);
    out
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

/// Added latency (ms) of every counted job of an open-loop run.
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
    let mock_ns = ctx.sizes.latency_mock_ms * 1_000_000;
    let added: Vec<f64> = enq_ns
        .iter()
        .zip(tail.done_ns.iter())
        .filter(|(&e, _)| e >= first_ns + warmup_ns)
        .map(|(&e, d)| (d.load(Ordering::Acquire) - 1) as f64 - e as f64 - mock_ns as f64)
        .map(|ns| ns / 1e6)
        .collect();
    if added.is_empty() {
        return Err(BenchError::Invalid(
            "no samples after the warm-up: run longer".into(),
        ));
    }
    Ok(sorted(added))
}

/// End-to-end time (ms) of single jobs sent to an idle worker.
async fn idle_pickup(ctx: &Ctx, system: System, mock: &MockServer) -> Result<Vec<f64>> {
    let n = ctx.sizes.idle_samples + IDLE_WARMUP;
    let epoch = Instant::now();
    let (rig, tail, mut worker) =
        start(ctx, system, mock, ctx.sizes.concurrency, "idle", n, epoch).await?;
    let mut conn = rig.conn.clone();
    let mut out = Vec::with_capacity(n);
    // A fixed LCG spreads the gaps over 5–25 ms, so a polling period cannot alias.
    let mut lcg: u64 = 0x2545_f491_4f6c_dd1d;
    for seq in 0..n {
        lcg = lcg
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        tokio::time::sleep(Duration::from_millis(5 + (lcg >> 33) % 21)).await;
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
            let done = tail.done_ns[seq].load(Ordering::Acquire) - 1;
            out.push((done as f64 - t as f64) / 1e6);
        }
    }
    worker.stop();
    Ok(sorted(out))
}
