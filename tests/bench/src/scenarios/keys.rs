//! Key scaling: the same burn-down with 10, 1,000 and 10,000 keys (given as
//! `MOCK_API_KEYS=k1,k2,…` in the daemon's env file). Figures are steady
//! throughput (first → last result), so the one-off cost of loading keys
//! shows in its own startup row instead of in the throughput ratio. The
//! counts run `repeats` times, in alternating order, best run kept.

use super::{bench_keys, burn, keep_best, open_mock, Burn};
use crate::report::{Row, Target};
use crate::worker::System;
use crate::Ctx;

const NAME: &str = "keys";

pub async fn run(ctx: &mut Ctx) -> Vec<Row> {
    if !ctx.with_llmq {
        return vec![];
    }
    let mock = match open_mock(0).await {
        Ok(m) => m,
        Err(e) => return vec![Row::error(NAME, "setup", e)],
    };
    let counts = ctx.sizes.key_counts.clone();
    let jobs = ctx.sizes.key_jobs;
    let mut best: Vec<Option<Burn>> = vec![None; counts.len()];
    let mut errors: Vec<Option<crate::BenchError>> = (0..counts.len()).map(|_| None).collect();
    for r in 0..ctx.sizes.repeats.max(1) {
        let mut order: Vec<usize> = (0..counts.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            match burn(ctx, System::Llmq, &mock, jobs, bench_keys(counts[i]), "ks").await {
                Ok(b) => keep_best(&mut best[i], b, |b| b.steady_jobs_per_s),
                Err(e) => errors[i] = Some(e),
            }
        }
    }
    let results: Vec<(usize, Result<Burn, crate::BenchError>)> = counts
        .iter()
        .zip(best.into_iter().zip(errors))
        .map(|(&k, (b, e))| match (b, e) {
            (_, Some(e)) => (k, Err(e)),
            (Some(b), None) => (k, Ok(b)),
            (None, None) => (k, Err(crate::BenchError::Invalid("not run".into()))),
        })
        .collect();
    mock.shutdown().await;
    let reference = results
        .first()
        .and_then(|(_, r)| r.as_ref().ok())
        .map(|b| b.steady_jobs_per_s);
    let reference_keys = counts.first().copied().unwrap_or(0);
    let last = counts.last().copied();
    let mut rows = Vec::new();
    for (k, r) in results {
        match r {
            Ok(b) => {
                let mut row = Row::new(
                    NAME,
                    &format!("throughput, {k} keys"),
                    "jobs/s",
                    Some(b.steady_jobs_per_s),
                    reference,
                )
                .note(format!(
                    "baseline: llmq with {reference_keys} keys; {jobs} jobs, first→last result; best of {} runs, key counts in alternating order",
                    ctx.sizes.repeats.max(1)
                ));
                if Some(k) == last && k != reference_keys {
                    row = row.target(Target::ratio_at_least(0.9));
                }
                rows.push(row);
                rows.push(Row::new(
                    NAME,
                    &format!("startup, {k} keys"),
                    "ms",
                    Some(b.startup_s * 1e3),
                    None,
                ));
            }
            Err(e) => rows.push(Row::error(NAME, &format!("{k} keys"), e)),
        }
    }
    rows
}
