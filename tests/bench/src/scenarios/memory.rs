//! Memory. Worker RSS (`VmRSS`) idle, then its peak while 10k jobs are in
//! flight at once (mock latency 1 s, concurrency above 10k, twice that many
//! jobs queued so the in-flight plateau lasts). Redis `used_memory` growth
//! per 10k queued jobs, against the bytes of the job bodies themselves.

use super::{bench_keys, open_mock, systems, Rig};
use crate::error::Result;
use crate::queue;
use crate::report::{Row, Target};
use crate::worker::{System, Worker};
use crate::Ctx;
use llmq_mock::MockServer;
use std::time::{Duration, Instant};

const NAME: &str = "memory";

#[derive(Debug, Clone, Copy)]
struct Mem {
    idle_mib: f64,
    peak_mib: f64,
    max_in_flight: u64,
}

pub async fn run(ctx: &mut Ctx) -> Vec<Row> {
    let mut errors = Vec::new();
    let (mut llmq, mut base) = (None, None);
    match open_mock(ctx.sizes.mem_latency_ms).await {
        Ok(mock) => {
            for system in systems(ctx) {
                match rss(ctx, system, &mock).await {
                    Ok(m) => match system {
                        System::Llmq => llmq = Some(m),
                        System::Baseline => base = Some(m),
                    },
                    Err(e) => errors.push(Row::error(NAME, &format!("{} RSS", system.name()), e)),
                }
            }
            mock.shutdown().await;
        }
        Err(e) => errors.push(Row::error(NAME, "setup", e)),
    }
    let in_flight = ctx.sizes.mem_in_flight;
    let mut rows = vec![
        Row::new(
            NAME,
            "RSS idle",
            "MiB",
            llmq.map(|m| m.idle_mib),
            base.map(|m| m.idle_mib),
        )
        .target(Target::at_most(64.0)),
        Row::new(
            NAME,
            &format!("RSS peak, {in_flight} in flight"),
            "MiB",
            llmq.map(|m| m.peak_mib),
            base.map(|m| m.peak_mib),
        )
        .target(Target::at_most(100.0))
        .note(format!(
            "{} jobs queued, concurrency {}, mock at {} ms; RSS sampled every 10 ms",
            in_flight * 2,
            concurrency(ctx),
            ctx.sizes.mem_latency_ms
        )),
        Row::new(
            NAME,
            "most requests in flight at the mock",
            "count",
            llmq.map(|m| m.max_in_flight as f64),
            base.map(|m| m.max_in_flight as f64),
        ),
    ];
    match redis_memory(ctx).await {
        Ok((used, payload)) => rows.push(
            Row::new(
                NAME,
                "Redis used_memory per 10k queued jobs",
                "B",
                Some(used),
                Some(payload),
            )
            .note("baseline: the bytes of the 10k job bodies themselves"),
        ),
        Err(e) => rows.push(Row::error(NAME, "Redis used_memory", e)),
    }
    rows.append(&mut errors);
    rows
}

fn concurrency(ctx: &Ctx) -> usize {
    ctx.sizes.mem_in_flight + ctx.sizes.mem_in_flight / 20
}

async fn rss(ctx: &Ctx, system: System, mock: &MockServer) -> Result<Mem> {
    let mut rig = Rig::start().await?;
    let jobs = (ctx.sizes.mem_in_flight * 2) as u64;
    let setup = rig.setup(
        mock,
        concurrency(ctx),
        bench_keys(ctx.sizes.burn_keys),
        jobs,
    );
    let mut worker = Worker::spawn(system, &ctx.bins, &setup)?;
    worker
        .wait_ready(&mut rig.conn, Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_millis(ctx.sizes.mem_settle_ms)).await;
    worker.check_alive()?;
    let idle = worker.rss_kib()?;
    mock.reset_stats();
    queue::preload(&mut rig.conn, "mem", jobs).await?;
    let mut peak = idle;
    let deadline = Instant::now()
        + Duration::from_secs(60)
        + Duration::from_millis(ctx.sizes.mem_latency_ms * 4);
    loop {
        peak = peak.max(worker.rss_kib()?);
        if queue::results_added(&mut rig.conn).await? >= jobs {
            break;
        }
        if Instant::now() > deadline {
            worker.check_alive()?;
            return Err(worker.fail("the loaded memory run did not finish within its deadline"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.stop();
    let max_in_flight = mock
        .stats()
        .keys
        .values()
        .map(|k| k.max_in_flight)
        .max()
        .unwrap_or(0);
    Ok(Mem {
        idle_mib: idle as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
        max_in_flight,
    })
}

/// (used_memory growth, job body bytes), both scaled to 10k jobs.
async fn redis_memory(ctx: &Ctx) -> Result<(f64, f64)> {
    let mut rig = Rig::start().await?;
    let jobs = ctx.sizes.redis_mem_jobs.max(1);
    let before = queue::used_memory(&mut rig.conn).await?;
    let payload = queue::preload(&mut rig.conn, "rm", jobs).await?;
    let after = queue::used_memory(&mut rig.conn).await?;
    let scale = 10_000.0 / jobs as f64;
    Ok((
        after.saturating_sub(before) as f64 * scale,
        payload as f64 * scale,
    ))
}
