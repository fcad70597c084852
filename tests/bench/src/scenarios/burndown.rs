//! Burn-down: N preloaded jobs, mock at 0 ms, the worker started after the
//! preload. Throughput counts from process start to the last result
//! (startup included); CPU is the worker's utime + stime per job. Each side
//! runs `repeats` times, alternating, and its fastest run is kept.

use super::{bench_keys, burn, keep_best, open_mock, systems_for_repeat, Burn};
use crate::report::{Row, Target};
use crate::worker::System;
use crate::Ctx;

const NAME: &str = "burn-down";

pub async fn run(ctx: &mut Ctx) -> Vec<Row> {
    let mock = match open_mock(0).await {
        Ok(m) => m,
        Err(e) => return vec![Row::error(NAME, "setup", e)],
    };
    let jobs = ctx.sizes.burn_jobs;
    let mut base: Option<Burn> = None;
    let mut llmq: Option<Burn> = None;
    let mut rows = Vec::new();
    for r in 0..ctx.sizes.repeats.max(1) {
        for system in systems_for_repeat(ctx, r) {
            let keys = bench_keys(ctx.sizes.burn_keys);
            match burn(ctx, system, &mock, jobs, keys, "bd").await {
                Ok(b) => match system {
                    System::Baseline => keep_best(&mut base, b, |b| b.jobs_per_s),
                    System::Llmq => keep_best(&mut llmq, b, |b| b.jobs_per_s),
                },
                Err(e) => rows.push(Row::error(
                    NAME,
                    &format!("{} run {}", system.name(), r + 1),
                    e,
                )),
            }
        }
    }
    ctx.burn_throughput = llmq.map(|b| b.jobs_per_s);
    ctx.baseline_throughput = base.map(|b| b.jobs_per_s);
    let note = format!(
        "{jobs} preloaded jobs, concurrency {}, {} keys, mock at 0 ms; wall time from process start to the last result; best of {} runs per side, in alternating order",
        ctx.sizes.concurrency, ctx.sizes.burn_keys, ctx.sizes.repeats.max(1)
    );
    let mut out = vec![
        Row::new(
            NAME,
            "throughput",
            "jobs/s",
            llmq.map(|b| b.jobs_per_s),
            base.map(|b| b.jobs_per_s),
        )
        .target(Target::at_least(10_000.0))
        .target(Target::ratio_at_least(0.8))
        .note(note),
        Row::new(
            NAME,
            "CPU per job",
            "µs",
            llmq.map(|b| b.cpu_us_per_job),
            base.map(|b| b.cpu_us_per_job),
        )
        .target(Target::at_most(100.0)),
        Row::new(
            NAME,
            "steady throughput (first→last result)",
            "jobs/s",
            llmq.map(|b| b.steady_jobs_per_s),
            base.map(|b| b.steady_jobs_per_s),
        ),
        Row::new(
            NAME,
            "startup (start→first result)",
            "ms",
            llmq.map(|b| b.startup_s * 1e3),
            base.map(|b| b.startup_s * 1e3),
        ),
    ];
    out.append(&mut rows);
    mock.shutdown().await;
    out
}
