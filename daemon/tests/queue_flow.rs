//! Queue end-to-end (real redis-server): results, lane priority, draining a
//! backlog, malformed jobs and duplicate ids.

mod queue_support;

use llmq::job::{FailureKind, Status};
use queue_support::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_over_three_lanes_all_get_complete_results() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let lanes = ["high", "normal", "low"];
    let items: Vec<(String, String)> = (0..1000)
        .map(|i| {
            (
                lanes[i % 3].to_string(),
                job_json(&format!("j{i}"), &format!("hello {i}")),
            )
        })
        .collect();
    xadd_many(&mut c, &items).await;

    let rec = Recorder::echo();
    let q = start(&config(&url), rec.handler()).await;
    wait_results(&url, 1000, Duration::from_secs(30)).await;

    for i in 0..1000 {
        let id = format!("j{i}");
        let raw = get(&mut c, &format!("llmq:result:{id}")).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert!(v.get("queued_ms").is_some_and(|q| q.is_u64()), "{raw}");
        let r = result(&mut c, &id).await.unwrap();
        assert_eq!(r.id, id);
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(r.output.as_deref(), Some(format!("hello {i}").as_str()));
        assert_eq!(
            r.metadata,
            Some(serde_json::json!({"n": id})),
            "metadata echoed"
        );
        assert_eq!(r.attempts.len(), 1);
        let done: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("llmq:done:{id}"))
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(done, vec!["succeeded"]);
        let ttl = int(&mut c, &["TTL", &format!("llmq:done:{id}")]).await;
        assert!(
            ttl > 0 && ttl <= 24 * 3600,
            "done marker has the result TTL: {ttl}"
        );
        let ttl = int(&mut c, &["TTL", &format!("llmq:result:{id}")]).await;
        assert!(ttl > 0 && ttl <= 24 * 3600, "result TTL: {ttl}");
    }
    // The results stream carries id, status and result.
    let last: redis::Value = redis::cmd("XREVRANGE")
        .arg("llmq:results")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    let text = format!("{last:?}");
    assert!(text.contains("status") && text.contains("succeeded") && text.contains("result"));
    assert_eq!(xlen(&mut c, "llmq:results").await, 1000);

    // Every call saw its own lane, attempt 1.
    let calls = rec.calls();
    assert_eq!(calls.len(), 1000);
    for call in &calls {
        let i: usize = call.id[1..].parse().unwrap();
        assert_eq!(call.ctx.lane, lanes[i % 3]);
        assert_eq!(call.ctx.attempt, 1);
        assert!(call.ctx.previous_attempts.is_empty());
    }
    for lane in lanes {
        assert_eq!(xlen(&mut c, &format!("llmq:{{jobs}}:{lane}")).await, 0);
    }
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_job_overtakes_a_normal_backlog() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let items: Vec<(String, String)> = (0..5000)
        .map(|i| ("normal".to_string(), job_json(&format!("n{i}"), "x")))
        .collect();
    xadd_many(&mut c, &items).await;

    let mut cfg = config(&url);
    cfg.queue.concurrency = 8;
    let rec = Recorder::echo_after(Duration::from_millis(2));
    let q = start(&cfg, rec.handler()).await;
    let r2 = rec.clone();
    wait_until_async(Duration::from_secs(20), "200 backlog jobs served", || {
        let n = r2.count();
        async move { n >= 200 }
    })
    .await;
    let served_at_push = rec.count();
    xadd(&mut c, "high", &job_json("urgent", "now")).await;
    wait_result(&url, "urgent", Duration::from_secs(20)).await;

    let calls = rec.calls();
    let pos = calls.iter().position(|c| c.id == "urgent").unwrap();
    assert_eq!(calls[pos].ctx.lane, "high");
    assert!(
        pos < 5000,
        "served before the backlog finished (position {pos})"
    );
    // It waited for at most the jobs already fetched (a few batches of 8 slots).
    assert!(
        pos - served_at_push <= 64,
        "pushed after {served_at_push} calls, served at {pos}"
    );
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_20000_jobs_drains_completely() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let lanes = ["high", "normal", "low"];
    let items: Vec<(String, String)> = (0..20_000)
        .map(|i| (lanes[i % 3].to_string(), job_json(&format!("b{i}"), "x")))
        .collect();
    xadd_many(&mut c, &items).await;

    let mut cfg = config(&url);
    cfg.queue.concurrency = 512;
    let rec = Recorder::echo();
    let started = Instant::now();
    let q = start(&cfg, rec.handler()).await;
    wait_results(&url, 20_000, Duration::from_secs(90)).await;
    let took = started.elapsed();
    eprintln!(
        "drained 20000 jobs in {took:?} ({:.0} jobs/s)",
        20_000.0 / took.as_secs_f64()
    );
    q.stop().await.unwrap();

    for lane in lanes {
        assert_eq!(
            xlen(&mut c, &format!("llmq:{{jobs}}:{lane}")).await,
            0,
            "{lane} empty"
        );
        assert_eq!(pending(&mut c, lane).await, 0, "{lane} has nothing pending");
    }
    let inflight: Vec<String> = redis::cmd("KEYS")
        .arg("llmq:inflight:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(inflight.is_empty(), "in-flight markers released");
    assert_eq!(rec.count(), 20_000, "each job ran once");
    assert_eq!(rec.per_id().len(), 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jobs_are_dead_lettered_and_the_worker_keeps_serving() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let bad_json = xadd(&mut c, "normal", "{not json").await;
    xadd(&mut c, "normal", r#"{"id":"m-nomsg","messages":[]}"#).await;
    xadd(&mut c, "normal", r#"{"id":"m-type","messages":"hello"}"#).await;
    let big = format!(
        r#"{{"id":"m-big","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(3000)
    );
    let too_large = xadd(&mut c, "normal", &big).await;
    let no_job: String = redis::cmd("XADD")
        .arg("llmq:{jobs}:normal")
        .arg("*")
        .arg("payload")
        .arg("hi")
        .query_async(&mut c)
        .await
        .unwrap();
    xadd(&mut c, "normal", &job_json("good", "still served")).await;

    let mut cfg = config(&url);
    cfg.queue.max_job_bytes = 2000;
    cfg.queue.dead_body_bytes = 1000;
    let rec = Recorder::echo();
    let q = start(&cfg, rec.handler()).await;
    let good = wait_result(&url, "good", Duration::from_secs(10)).await;
    assert_eq!(good.status, Status::Succeeded);
    let c2 = c.clone();
    wait_until_async(Duration::from_secs(10), "5 dead letters", || {
        let mut c = c2.clone();
        async move { int(&mut c, &["HLEN", "llmq:dead"]).await == 5 }
    })
    .await;

    let reason = |v: &serde_json::Value| v["reason"].as_str().unwrap().to_string();
    let d = dead(&mut c, &bad_json)
        .await
        .expect("bad JSON keyed by entry id");
    assert!(reason(&d).contains("not valid JSON"), "{d}");
    assert_eq!(d["job"], "{not json");
    assert_eq!(d["lane"], "normal");
    assert!(d["at"].as_str().is_some_and(|s| s.contains('T')));
    let d = dead(&mut c, "m-nomsg").await.unwrap();
    assert!(reason(&d).contains("no messages"), "{d}");
    let d = dead(&mut c, "m-type").await.unwrap();
    assert!(reason(&d).contains("does not match the job format"), "{d}");
    let d = dead(&mut c, &too_large).await.unwrap();
    assert!(reason(&d).contains("over the 2000-byte limit"), "{d}");
    // Kept cut to dead_body_bytes, with the original length.
    assert_eq!(d["job"].as_str().map(str::len), Some(1000), "{d}");
    assert!(big.starts_with(d["job"].as_str().unwrap()));
    assert_eq!(d["job_bytes"], big.len());
    assert_eq!(d["job_truncated"], true);
    let d = dead(&mut c, &no_job).await.unwrap();
    assert!(reason(&d).contains("no `job` field"), "{d}");

    for id in ["m-nomsg", "m-type"] {
        let r = result(&mut c, id)
            .await
            .expect("a failed result where the id was readable");
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.error.unwrap().kind, FailureKind::InvalidJob);
    }
    assert!(
        result(&mut c, "m-big").await.is_none(),
        "too large: the id is not read"
    );
    assert_eq!(rec.count(), 1, "only the good job ran");
    let c2 = c.clone();
    wait_until_async(Duration::from_secs(5), "lane empty", || {
        let mut c = c2.clone();
        async move { xlen(&mut c, "llmq:{jobs}:normal").await == 0 }
    })
    .await;
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_id_runs_once() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    // Three copies in one batch.
    for _ in 0..3 {
        xadd(&mut c, "normal", &job_json("dup", "once")).await;
    }
    let rec = Recorder::echo_after(Duration::from_millis(300));
    let q = start(&config(&url), rec.handler()).await;
    // A copy pushed while the first one runs.
    let r2 = rec.clone();
    wait_until_async(Duration::from_secs(10), "dup started", || {
        let n = r2.count();
        async move { n >= 1 }
    })
    .await;
    xadd(&mut c, "high", &job_json("dup", "once")).await;
    wait_result(&url, "dup", Duration::from_secs(10)).await;
    // And one after it finished.
    xadd(&mut c, "low", &job_json("dup", "once")).await;
    let c2 = c.clone();
    wait_until_async(Duration::from_secs(10), "every copy acked", || {
        let mut c = c2.clone();
        async move {
            let mut n = 0;
            for lane in ["high", "normal", "low"] {
                n += xlen(&mut c, &format!("llmq:{{jobs}}:{lane}")).await;
                n += pending(&mut c, lane).await;
            }
            n == 0
        }
    })
    .await;
    assert_eq!(rec.count_for("dup"), 1);
    assert_eq!(xlen(&mut c, "llmq:results").await, 1);
    assert_eq!(int(&mut c, &["LLEN", "llmq:done:dup"]).await, 1);
    q.stop().await.unwrap();
}
