//! The smoke suite through the library API, so CI exercises the harness:
//! every scenario at tiny sizes, first with the baseline loop alone (the
//! harness's own machinery), then with the debug `llmq` daemon end to end.
//! These assert that every figure was measured, not that targets are met:
//! debug builds on a shared CI machine say nothing about performance.

use llmq_bench::{run, Options, Row, Scenario, Sizes, Summary};
use std::path::PathBuf;

fn options(with_llmq: bool) -> Options {
    let mut o = Options::new(
        "smoke-test",
        Sizes::smoke(),
        Scenario::ALL.to_vec(),
        PathBuf::from(env!("CARGO_BIN_EXE_llmq-bench")),
    );
    o.with_llmq = with_llmq;
    o
}

fn row<'a>(s: &'a Summary, scenario: &str, figure: &str) -> &'a Row {
    s.rows
        .iter()
        .find(|r| r.scenario == scenario && r.figure.starts_with(figure))
        .unwrap_or_else(|| panic!("no row {scenario} / {figure}:\n{}", s.table()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_loop_side_measures_every_figure() {
    let s = run(options(false)).await;
    assert!(s.errors().is_empty(), "{}", s.table());
    let bd = row(&s, "burn-down", "throughput");
    assert!(bd.baseline.unwrap() > 0.0, "{}", s.table());
    assert!(bd.value.is_none(), "no llmq figure without llmq");
    assert!(row(&s, "burn-down", "CPU per job").baseline.unwrap() > 0.0);
    for f in [
        "added p50",
        "added p99",
        "idle pickup p50",
        "idle pickup p99",
    ] {
        assert!(
            row(&s, "latency", f).baseline.is_some(),
            "{f}\n{}",
            s.table()
        );
    }
    let rss = row(&s, "memory", "RSS peak").baseline.unwrap();
    assert!(rss > row(&s, "memory", "RSS idle").baseline.unwrap() * 0.5);
    // The baseline loop has no per-key limits and runs the concurrency asked for.
    let in_flight = row(&s, "memory", "most requests in flight")
        .baseline
        .unwrap();
    assert!(in_flight >= 100.0, "{}", s.table());
    let redis = row(&s, "memory", "Redis used_memory");
    assert!(redis.value.unwrap() > redis.baseline.unwrap() * 0.5);
    // Key scaling and quota only measure llmq.
    assert!(s.rows.iter().all(|r| r.scenario != "quota"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmq_side_runs_end_to_end() {
    let s = run(options(true)).await;
    assert!(s.errors().is_empty(), "{}", s.table());
    assert!(row(&s, "burn-down", "throughput").value.unwrap() > 0.0);
    assert!(row(&s, "latency", "added p99").value.is_some());
    assert!(row(&s, "latency", "idle pickup p99").value.is_some());
    assert!(row(&s, "memory", "RSS idle").value.unwrap() > 0.0);
    assert!(row(&s, "keys", "throughput, 100 keys").ratio.is_some());
    let quota = row(&s, "quota", "admitted / capacity");
    assert!(quota.value.unwrap() > 0.0, "{}", s.table());
    assert!(row(&s, "quota", "upstream 429s").value.is_some());
}
