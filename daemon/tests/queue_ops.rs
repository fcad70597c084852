//! Queue operations (real redis-server): Redis restarts, graceful shutdown,
//! the shutdown grace, producer helpers and stats.

mod queue_support;

use futures::FutureExt;
use llmq::job::Status;
use llmq::queue::{self, Disposition, QueueError};
use queue_support::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_job_and_the_queue_resumes_by_itself() {
    let mut redis = RedisServer::start_with(Persistence::Aof);
    let url = redis.url();
    let mut c = conn(&url).await;
    let first: Vec<(String, String)> = (0..300)
        .map(|i| ("normal".to_string(), job_json(&format!("a{i}"), "x")))
        .collect();
    xadd_many(&mut c, &first).await;

    let mut cfg = config(&url);
    cfg.queue.concurrency = 16;
    let rec = Recorder::echo_after(Duration::from_millis(5));
    let q = start(&cfg, rec.handler()).await;
    wait_results(&url, 50, Duration::from_secs(20)).await;
    redis.restart();

    let mut c = conn(&url).await;
    let second: Vec<(String, String)> = (0..300)
        .map(|i| ("high".to_string(), job_json(&format!("b{i}"), "x")))
        .collect();
    xadd_many(&mut c, &second).await;

    let ids: Vec<String> = (0..300)
        .map(|i| format!("a{i}"))
        .chain((0..300).map(|i| format!("b{i}")))
        .collect();
    let c2 = c.clone();
    wait_until_async(Duration::from_secs(30), "all 600 results", || {
        let mut c = c2.clone();
        let keys: Vec<String> = ids.iter().map(|id| format!("llmq:result:{id}")).collect();
        async move {
            let n: i64 = redis::cmd("EXISTS")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .unwrap_or(0);
            n == 600
        }
    })
    .await;
    let c2 = c.clone();
    wait_until_async(Duration::from_secs(10), "lanes drained", || {
        let mut c = c2.clone();
        async move {
            xlen(&mut c, "llmq:{jobs}:normal").await + xlen(&mut c, "llmq:{jobs}:high").await == 0
                && pending(&mut c, "normal").await == 0
        }
    })
    .await;
    for id in ["a0", "a299", "b0", "b299"] {
        assert_eq!(result(&mut c, id).await.unwrap().status, Status::Succeeded);
    }
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_jobs_and_leaves_the_rest() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let items: Vec<(String, String)> = (0..20)
        .map(|i| ("normal".to_string(), job_json(&format!("g{i}"), "x")))
        .collect();
    xadd_many(&mut c, &items).await;

    // Jobs outlive the visibility timeout: only the leases keep them ours.
    let mut cfg = config(&url);
    cfg.queue.concurrency = 4;
    cfg.queue.visibility_timeout = Duration::from_millis(300);
    let slow = Recorder::echo_after(Duration::from_millis(700));
    let q = start(&cfg, slow.handler()).await;
    let s2 = slow.clone();
    wait_until_async(Duration::from_secs(10), "4 jobs running", || {
        let n = s2.count();
        async move { n >= 4 }
    })
    .await;
    let t = Instant::now();
    q.stop().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drained in {:?}",
        t.elapsed()
    );

    let started: HashSet<String> = slow.calls().into_iter().map(|c| c.id).collect();
    assert_eq!(started.len(), 4, "no job started after the stop");
    assert_eq!(
        slow.count(),
        4,
        "leases kept running jobs from being reclaimed"
    );
    for i in 0..20 {
        let id = format!("g{i}");
        let r = result(&mut c, &id).await;
        assert_eq!(
            r.is_some(),
            started.contains(&id),
            "{id}: finished iff started"
        );
    }
    assert_eq!(
        xlen(&mut c, "llmq:{jobs}:normal").await,
        16,
        "unstarted jobs stay in the lane"
    );

    // Another daemon takes the rest (pending ones after the visibility timeout).
    let fast = Recorder::echo();
    let q2 = start(&cfg, fast.handler()).await;
    wait_results(&url, 20, Duration::from_secs(10)).await;
    q2.stop().await.unwrap();
    let second: HashSet<String> = fast.calls().into_iter().map(|c| c.id).collect();
    assert_eq!(second.len(), 16);
    assert!(second.is_disjoint(&started), "no job ran twice");
    assert_eq!(fast.count(), 16);
    assert_eq!(xlen(&mut c, "llmq:{jobs}:normal").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_still_running_after_the_grace_is_left_pending() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    xadd(&mut c, "normal", &job_json("stuck", "x")).await;
    let mut cfg = config(&url);
    cfg.queue.shutdown_grace = Duration::from_millis(200);
    let rec = Recorder::new(|_, _, _| futures::future::pending::<Disposition>().boxed());
    let q = start(&cfg, rec.handler()).await;
    let r2 = rec.clone();
    wait_until_async(Duration::from_secs(10), "stuck started", || {
        let n = r2.count();
        async move { n == 1 }
    })
    .await;
    let t = Instant::now();
    q.stop().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stopped in {:?}",
        t.elapsed()
    );
    assert!(result(&mut c, "stuck").await.is_none());
    assert_eq!(
        pending(&mut c, "normal").await,
        1,
        "left pending for another daemon"
    );
    assert_eq!(xlen(&mut c, "llmq:{jobs}:normal").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_helpers_push_wait_and_read_results_and_stats_count() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;

    let id = queue::push(
        &mut c,
        "high",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(id.len(), 26, "a ULID was filled in");
    let named = queue::push(&mut c, "low", &job_json("named", "yo"))
        .await
        .unwrap();
    assert_eq!(named, "named");
    let bad = queue::push(&mut c, "normal", r#"{"messages":[]}"#).await;
    assert!(matches!(bad, Err(QueueError::InvalidJob(_))), "{bad:?}");
    let bad = queue::push(&mut c, "no such{lane}", &job_json("x", "y")).await;
    assert!(matches!(bad, Err(QueueError::InvalidLane(_))), "{bad:?}");
    xadd(&mut c, "normal", "{broken").await;

    let lanes = vec!["high".to_string(), "normal".to_string(), "low".to_string()];
    let s = queue::stats(&mut c, &lanes).await.unwrap();
    assert_eq!(
        s.lanes
            .iter()
            .map(|l| (l.lane.as_str(), l.depth, l.pending))
            .collect::<Vec<_>>(),
        vec![("high", 1, 0), ("normal", 1, 0), ("low", 1, 0)]
    );
    assert_eq!((s.delayed, s.dead), (0, 0));

    assert!(queue::get_result(&mut c, &id).await.unwrap().is_none());
    let t = Instant::now();
    assert!(queue::wait(&mut c, "nobody", Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    assert!(t.elapsed() >= Duration::from_millis(300));

    // Two waiters on one job, on their own connections.
    let w1 = tokio::spawn({
        let url = url.clone();
        let id = id.clone();
        async move { queue::wait(&mut conn(&url).await, &id, Duration::from_secs(10)).await }
    });
    let w2 = tokio::spawn({
        let url = url.clone();
        let id = id.clone();
        async move { queue::wait(&mut conn(&url).await, &id, Duration::from_secs(10)).await }
    });
    let q = queue::Queue::connect(&config(&url)).await.unwrap();
    let stats_view = q.clone();
    let rec = Recorder::echo_after(Duration::from_millis(100));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(q.run(rec.handler(), async move {
        let _ = rx.await;
    }));
    for w in [w1, w2] {
        let r = w
            .await
            .unwrap()
            .unwrap()
            .expect("both waiters get the result");
        assert_eq!(r.id, id);
        assert_eq!(r.output.as_deref(), Some("hi"));
    }
    let r = queue::wait(&mut c, "named", Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(
        queue::get_result(&mut c, "named")
            .await
            .unwrap()
            .unwrap()
            .output
            .as_deref(),
        Some("yo")
    );
    let c2 = c.clone();
    wait_until_async(Duration::from_secs(5), "dead letter counted", || {
        let view = stats_view.clone();
        let _ = &c2;
        async move { view.stats().await.map(|s| s.dead == 1).unwrap_or(false) }
    })
    .await;
    let s = stats_view.stats().await.unwrap();
    assert!(
        s.lanes.iter().all(|l| l.depth == 0 && l.pending == 0),
        "{s:?}"
    );
    let _ = tx.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_started_while_redis_is_down_serves_once_it_is_up() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let rec = Recorder::echo();
    let q = start(&config(&url), rec.handler()).await;
    redis.restart();
    let mut c = conn(&url).await;
    xadd(&mut c, "low", &job_json("late", "hello")).await;
    let r = wait_result(&url, "late", Duration::from_secs(15)).await;
    assert_eq!(r.status, Status::Succeeded);
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_runs_once_and_bad_queue_config_is_refused() {
    let redis = RedisServer::start();
    let url = redis.url();
    let q = queue::Queue::connect(&config(&url)).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(q.clone().run(Recorder::echo().handler(), async move {
        let _ = rx.await;
    }));
    let c2 = conn(&url).await;
    wait_until_async(Duration::from_secs(5), "groups created", || {
        let mut c = c2.clone();
        async move { int(&mut c, &["EXISTS", "llmq:{jobs}:normal"]).await == 1 }
    })
    .await;
    let second = q.run(Recorder::echo().handler(), async {}).await;
    assert!(
        second.is_err(),
        "a clone must not run a second consumer with the same name"
    );
    let _ = tx.send(());
    first.await.unwrap().unwrap();

    let mut cfg = config(&url);
    cfg.queue.lanes = vec!["high".into(), "bad lane".into()];
    let e = queue::Queue::connect(&cfg).await.unwrap_err();
    assert!(e.to_string().contains("bad lane"), "{e}");
    cfg.queue.lanes = vec![];
    assert!(queue::Queue::connect(&cfg).await.is_err());
    cfg.queue.lanes = vec!["a".into(), "a".into()];
    assert!(queue::Queue::connect(&cfg).await.is_err());
}
