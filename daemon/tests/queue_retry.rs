//! Retries, exhausted attempts and crashed deliveries (real redis-server).

mod queue_support;

use futures::FutureExt;
use llmq::job::{FailureKind, Status};
use llmq::queue::Disposition;
use queue_support::*;
use std::time::Duration;

fn retry_twice_then_done() -> Recorder {
    Recorder::new(|job, _, nth| {
        let r = ok_result(job);
        async move {
            if nth < 2 {
                Disposition::Retry {
                    after: None,
                    attempts: vec![attempt("transient")],
                    reason: "upstream hiccup".into(),
                }
            } else {
                Disposition::Done(r)
            }
        }
        .boxed()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_and_the_result_lists_every_attempt() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    xadd(&mut c, "high", &job_json("r1", "again")).await;
    // No id: the queue derives one that must survive the retries.
    let anon_entry = xadd(
        &mut c,
        "low",
        r#"{"messages":[{"role":"user","content":"anon"}],"metadata":{"who":"anon"}}"#,
    )
    .await;

    let rec = retry_twice_then_done();
    let q = start(&config(&url), rec.handler()).await;
    let r = wait_result(&url, "r1", Duration::from_secs(10)).await;
    assert_eq!(r.status, Status::Succeeded);
    let outcomes: Vec<&str> = r.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["transient", "transient", "success"]);
    assert_eq!(r.metadata, Some(serde_json::json!({"n": "r1"})));

    let calls: Vec<Call> = rec.calls().into_iter().filter(|c| c.id == "r1").collect();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        calls.iter().map(|c| c.ctx.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        calls.iter().all(|c| c.ctx.lane == "high"),
        "retries go back to their lane"
    );
    assert!(calls
        .iter()
        .all(|c| c.ctx.enqueued_unix_ms == calls[0].ctx.enqueued_unix_ms));
    assert_eq!(calls[2].ctx.previous_attempts.len(), 2);
    // initial_delay 50 ms, factor 2: 50 ms then 100 ms.
    assert!(calls[1].at - calls[0].at >= Duration::from_millis(50));
    assert!(calls[2].at - calls[1].at >= Duration::from_millis(100));

    // The id-less job kept one id across its three runs.
    let c2 = rec.clone();
    wait_until_async(Duration::from_secs(10), "anon job ran 3 times", || {
        let n = c2
            .calls()
            .iter()
            .filter(|c| c.metadata == Some(serde_json::json!({"who": "anon"})))
            .count();
        async move { n == 3 }
    })
    .await;
    let anon: Vec<Call> = rec
        .calls()
        .into_iter()
        .filter(|c| c.metadata == Some(serde_json::json!({"who": "anon"})))
        .collect();
    assert!(anon.iter().all(|c| c.id == anon[0].id), "{anon:?}");
    assert_eq!(anon[0].ctx.entry_id, anon_entry);
    let r = wait_result(&url, &anon[0].id, Duration::from_secs(10)).await;
    assert_eq!(r.attempts.len(), 3);
    assert_eq!(int(&mut c, &["ZCARD", "llmq:{jobs}:delayed"]).await, 0);
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_always_retries_is_dead_lettered_after_max_attempts() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    xadd(&mut c, "normal", &job_json("forever", "again")).await;

    let rec = Recorder::new(|_, _, _| {
        async move {
            Disposition::Retry {
                after: None,
                attempts: vec![attempt("transient")],
                reason: "upstream keeps failing".into(),
            }
        }
        .boxed()
    });
    let mut cfg = config(&url);
    cfg.queue.max_attempts = 3;
    let q = start(&cfg, rec.handler()).await;
    let r = wait_result(&url, "forever", Duration::from_secs(10)).await;
    assert_eq!(r.status, Status::Failed);
    let err = r.error.unwrap();
    assert_eq!(err.kind, FailureKind::Exhausted);
    assert!(
        err.message.contains("upstream keeps failing"),
        "{}",
        err.message
    );
    assert_eq!(r.attempts.len(), 3);
    assert_eq!(r.metadata, Some(serde_json::json!({"n": "forever"})));
    assert_eq!(rec.count_for("forever"), 3);
    let d = dead(&mut c, "forever").await.unwrap();
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{d}"
    );
    assert_eq!(d["attempts"], 3);
    assert_eq!(int(&mut c, &["ZCARD", "llmq:{jobs}:delayed"]).await, 0);
    assert_eq!(xlen(&mut c, "llmq:{jobs}:normal").await, 0);
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_deliveries_are_reclaimed_and_count_as_attempts() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let lane = "llmq:{jobs}:normal";
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(lane)
        .arg("llmq")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .unwrap();
    xadd(&mut c, "normal", &job_json("c1", "one")).await;
    xadd(&mut c, "normal", &job_json("c2", "two")).await;
    // A consumer that reads and dies without acking.
    let ghost_read = || {
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("llmq")
            .arg("ghost")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg(lane)
            .arg(">")
            .clone()
    };
    let _: redis::Value = ghost_read().query_async(&mut c).await.unwrap();
    // c3 was delivered (and crashed) max_attempts = 3 times already.
    let c3 = xadd(&mut c, "normal", &job_json("c3", "three")).await;
    let _: redis::Value = ghost_read().query_async(&mut c).await.unwrap();
    for _ in 0..2 {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(lane)
            .arg("llmq")
            .arg("ghost")
            .arg(0)
            .arg(&c3)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let ghost_done = std::time::Instant::now();

    let mut cfg = config(&url);
    cfg.queue.visibility_timeout = Duration::from_millis(300);
    cfg.queue.max_attempts = 3;
    let rec = Recorder::echo();
    let q = start(&cfg, rec.handler()).await;

    for id in ["c1", "c2"] {
        let r = wait_result(&url, id, Duration::from_secs(10)).await;
        assert_eq!(r.status, Status::Succeeded);
        let outcomes: Vec<&str> = r.attempts.iter().map(|a| a.outcome.as_str()).collect();
        assert_eq!(outcomes, vec!["crashed", "success"], "{id}");
    }
    let calls = rec.calls();
    for call in &calls {
        assert_eq!(call.ctx.attempt, 2, "the crash counted: {call:?}");
        assert!(
            call.at - ghost_done >= Duration::from_millis(250),
            "reclaimed only once idle"
        );
    }
    let r = wait_result(&url, "c3", Duration::from_secs(10)).await;
    assert_eq!(r.status, Status::Failed);
    let err = r.error.unwrap();
    assert_eq!(err.kind, FailureKind::Exhausted);
    assert!(
        err.message.contains("crashed/timed out 3 times"),
        "{}",
        err.message
    );
    assert_eq!(r.attempts.len(), 3, "three crashed attempts listed");
    let d = dead(&mut c, "c3").await.unwrap();
    assert!(d["reason"]
        .as_str()
        .unwrap()
        .contains("crashed/timed out 3 times"));
    assert_eq!(rec.count_for("c3"), 0, "a poison job is not run again");
    assert_eq!(rec.count(), 2);
    assert_eq!(pending(&mut c, "normal").await, 0);
    assert_eq!(xlen(&mut c, lane).await, 0);
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_executor_counts_as_an_attempt_and_the_job_is_retried() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    xadd(&mut c, "normal", &job_json("p1", "boom")).await;
    let rec = Recorder::new(|job, _, nth| {
        let r = ok_result(job);
        async move {
            if nth == 0 {
                panic!("executor bug");
            }
            Disposition::Done(r)
        }
        .boxed()
    });
    let q = start(&config(&url), rec.handler()).await;
    let r = wait_result(&url, "p1", Duration::from_secs(10)).await;
    assert_eq!(r.status, Status::Succeeded);
    let outcomes: Vec<&str> = r.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["crashed", "success"]);
    assert_eq!(rec.count_for("p1"), 2);
    q.stop().await.unwrap();
}

const CHILD_URL: &str = "LLMQ_QUEUE_TEST_CHILD_URL";

/// The daemon side of the real-crash test: runs a queue with the test hooks
/// on until a job aborts the process. Does nothing unless started by
/// `a_daemon_that_aborts_mid_job_...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of a_daemon_that_aborts_mid_job_is_recovered_by_another"]
async fn crash_child_process() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let q = start(&config(&url), Recorder::echo().handler()).await;
    // The hook aborts the process when the job starts; never resolves otherwise.
    wait_results(&url, 1, Duration::from_secs(20)).await;
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_aborts_mid_job_is_recovered_by_another() {
    if std::env::var("LLMQ_TEST_HOOKS").as_deref() == Ok("1") {
        eprintln!("skipped: LLMQ_TEST_HOOKS=1 would abort this test process too");
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let body = serde_json::json!({
        "id": "boom",
        "messages": [{"role": "user", "content": "crash me"}],
        "metadata": {"llmq_test": "crash"},
    })
    .to_string();
    xadd(&mut c, "normal", &body).await;

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["crash_child_process", "--exact", "--ignored", "--nocapture"])
        .env("LLMQ_TEST_HOOKS", "1")
        .env(CHILD_URL, &url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until_async(Duration::from_secs(30), "the child daemon aborts", || {
        status = child.try_wait().unwrap();
        let done = status.is_some();
        async move { done }
    })
    .await;
    let status = status.unwrap();
    assert!(!status.success(), "{status:?}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(6), "aborted (SIGABRT): {status:?}");
    }
    assert_eq!(
        pending(&mut c, "normal").await,
        1,
        "the entry stays pending"
    );
    assert!(result(&mut c, "boom").await.is_none());

    // This process runs without the hooks: it reclaims and runs the job.
    let mut cfg = config(&url);
    cfg.queue.visibility_timeout = Duration::from_millis(300);
    let rec = Recorder::echo();
    let q = start(&cfg, rec.handler()).await;
    let r = wait_result(&url, "boom", Duration::from_secs(10)).await;
    assert_eq!(r.status, Status::Succeeded);
    let outcomes: Vec<&str> = r.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["crashed", "success"]);
    assert_eq!(rec.calls()[0].ctx.attempt, 2);
    q.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_run_is_stopped_after_the_deadline_and_counts_as_an_attempt() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url).await;
    let body = serde_json::json!({
        "id": "hung",
        "messages": [{"role": "user", "content": "x"}],
        "deadline_s": 1,
    })
    .to_string();
    xadd(&mut c, "normal", &body).await;
    let rec = Recorder::new(|_, _, _| futures::future::pending::<Disposition>().boxed());
    let mut cfg = config(&url);
    cfg.queue.max_attempts = 2;
    let q = start(&cfg, rec.handler()).await;
    let r = wait_result(&url, "hung", Duration::from_secs(10)).await;
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.unwrap().kind, FailureKind::Exhausted);
    let outcomes: Vec<&str> = r.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["timed_out", "timed_out"]);
    let calls = rec.calls();
    assert_eq!(calls.len(), 2);
    // Deadline 1 s + 10% margin for the first run; the second starts past it.
    assert!(calls[1].at - calls[0].at >= Duration::from_millis(1100));
    assert!(calls[1].at - calls[0].at < Duration::from_secs(3));
    q.stop().await.unwrap();
}
