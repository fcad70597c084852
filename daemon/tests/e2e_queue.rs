//! The queue's guarantees (SPEC §3) proven with the real daemon process:
//! `llmq serve` as a child, a private redis-server, the mock provider.
//! Crashes are real (`kill -9`, or `abort()` through `LLMQ_TEST_HOOKS`),
//! Redis restarts are real, SIGTERM is a real signal.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::{FailureKind, Status};
use llmq_mock::{KeySpec, MockConfig, MockServer, Protocol};
use llmq_testkit::daemon::DaemonSpec;
use llmq_testkit::{Persistence, RedisServer};
use std::time::{Duration, Instant};

const SECRET: &str = "sk-test-oa-000000000001";
const LANES: [&str; 3] = ["high", "normal", "low"];

/// A mock with one key (`oa#1`) answering after `latency_ms`.
async fn mock_with_latency(latency_ms: u64) -> MockServer {
    mock(MockConfig::default().key(KeySpec::new(SECRET).label("oa#1").latency_ms(latency_ms))).await
}

/// A daemon spec with one free provider `oa` on the mock and this `[queue]`.
fn daemon_spec(redis: &RedisServer, mock: &MockServer, queue: &str) -> DaemonSpec {
    let providers = [Provider::new("oa", Protocol::OpenAi, "free", "m1")];
    let extra = format!("[queue]\n{queue}\n");
    spec(config(redis, mock, &providers, &extra)).env("OA_API_KEY_1", SECRET)
}

/// XADDs many jobs in one pipeline.
fn push_many(redis: &RedisServer, lane: &str, jobs: &[serde_json::Value]) {
    let mut c = redis.client();
    let mut p = redis::pipe();
    for j in jobs {
        p.cmd("XADD")
            .arg(format!("llmq:{{jobs}}:{lane}"))
            .arg("*")
            .arg("job")
            .arg(j.to_string())
            .ignore();
    }
    p.query::<()>(&mut c).unwrap();
}

/// XADDs a raw field/value entry (for malformed entries).
fn push_raw(redis: &RedisServer, lane: &str, field: &str, value: &str) {
    let mut c = redis.client();
    let _: String = redis::cmd("XADD")
        .arg(format!("llmq:{{jobs}}:{lane}"))
        .arg("*")
        .arg(field)
        .arg(value)
        .query(&mut c)
        .unwrap();
}

/// Entries delivered to a consumer and not acked, over every lane.
fn pending(redis: &RedisServer) -> usize {
    let mut c = redis.client();
    LANES
        .iter()
        .map(|lane| {
            let v: redis::Value = redis::cmd("XPENDING")
                .arg(format!("llmq:{{jobs}}:{lane}"))
                .arg("llmq")
                .query(&mut c)
                .unwrap_or(redis::Value::Nil);
            match v {
                redis::Value::Array(parts) => match parts.first() {
                    Some(redis::Value::Int(n)) => *n as usize,
                    _ => 0,
                },
                _ => 0,
            }
        })
        .sum()
}

/// Entries still in the lanes (acked entries are deleted).
fn queued(redis: &RedisServer) -> usize {
    let mut c = redis.client();
    LANES
        .iter()
        .map(|lane| {
            redis::cmd("XLEN")
                .arg(format!("llmq:{{jobs}}:{lane}"))
                .query::<usize>(&mut c)
                .unwrap_or(0)
        })
        .sum()
}

/// Results written so far (the `llmq:results` stream).
fn results_written(redis: &RedisServer) -> usize {
    let mut c = redis.client();
    redis::cmd("XLEN")
        .arg("llmq:results")
        .query::<usize>(&mut c)
        .unwrap_or(0)
}

/// The `llmq:dead` hash as field → parsed record.
fn dead_letters(redis: &RedisServer) -> Vec<(String, serde_json::Value)> {
    let mut c = redis.client();
    let m: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg("llmq:dead")
        .query(&mut c)
        .unwrap();
    m.into_iter()
        .map(|(k, v)| (k, serde_json::from_str(&v).expect("dead record is JSON")))
        .collect()
}

fn id_list(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_no_job_and_bills_at_most_the_jobs_in_flight_again() {
    let redis = RedisServer::start();
    let mock = mock_with_latency(5).await;
    let spec = daemon_spec(
        &redis,
        &mock,
        "concurrency = 16\nvisibility_timeout = \"1s\"\nmax_attempts = 5",
    );
    let ids = id_list("k9", 1000);
    let jobs: Vec<_> = ids.iter().map(|id| job(id)).collect();
    push_many(&redis, "normal", &jobs);

    let mut daemon = start(&spec);
    eventually(
        Duration::from_secs(20),
        "the daemon has finished some jobs",
        || results_written(&redis) >= 150,
    );
    daemon.kill();
    let done_at_kill = results_written(&redis);
    let pending_at_kill = pending(&redis);
    let calls_at_kill = mock.stats().total_calls;
    assert!(
        done_at_kill < ids.len(),
        "the kill must land mid-run ({done_at_kill} done)"
    );
    assert!(
        pending_at_kill > 0,
        "jobs were in flight at the kill (calls so far {calls_at_kill}, done {done_at_kill})"
    );

    daemon.restart(&spec);
    let results = wait_results(&redis, &daemon, &ids, Duration::from_secs(30));
    for r in &results {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    let calls = mock.stats().total_calls;
    assert!(
        calls >= ids.len() as u64,
        "every job was called upstream at least once: {calls}"
    );
    assert!(
        calls <= (ids.len() + pending_at_kill) as u64,
        "{calls} upstream calls for {} jobs with {pending_at_kill} in flight at the kill",
        ids.len()
    );
    // The jobs in flight at the kill were reclaimed, and each says it crashed once.
    let crashed = results
        .iter()
        .filter(|r| r.attempts.iter().any(|a| a.outcome == "crashed"))
        .count();
    assert!(
        crashed <= pending_at_kill,
        "{crashed} results list a crash; {pending_at_kill} were pending at the kill"
    );
    eventually(Duration::from_secs(5), "the lanes drain", || {
        queued(&redis) == 0 && pending(&redis) == 0
    });
    assert_eq!(results_written(&redis), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_crashes_the_daemon_every_time_is_dead_lettered_after_max_attempts() {
    let redis = RedisServer::start();
    let mock = mock_with_latency(0).await;
    let max_attempts = 3;
    let spec = daemon_spec(
        &redis,
        &mock,
        &format!("concurrency = 4\nvisibility_timeout = \"1s\"\nmax_attempts = {max_attempts}"),
    )
    .env("LLMQ_TEST_HOOKS", "1");
    let mut poison = job("poison");
    poison["metadata"] = serde_json::json!({"llmq_test": "crash", "who": "poison"});
    push(&redis, "normal", &poison);

    let mut daemon = start(&spec);
    let mut crashes = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Restart the daemon after each crash until the job has a result.
    while result(&redis, "poison").is_none() {
        assert!(
            Instant::now() < deadline,
            "no dead letter after {crashes} crashes; daemon log:\n{}",
            tail(&daemon.log(), 40)
        );
        if !daemon.is_running() {
            crashes += 1;
            assert!(
                daemon
                    .log()
                    .contains("aborting the process as asked by the job"),
                "the daemon stopped for another reason:\n{}",
                tail(&daemon.log(), 20)
            );
            assert!(
                crashes <= max_attempts,
                "the poison job crashed the daemon {crashes} times (max_attempts {max_attempts})"
            );
            daemon.restart(&spec);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(crashes, max_attempts, "one crash per attempt");

    let r = result(&redis, "poison").unwrap();
    assert_eq!(r.status, Status::Failed);
    let err = r.error.as_ref().expect("failed result has an error");
    assert_eq!(err.kind, FailureKind::Exhausted, "{r:?}");
    assert!(err.message.contains("crashed"), "{}", err.message);
    assert_eq!(
        r.attempts.iter().filter(|a| a.outcome == "crashed").count(),
        max_attempts as usize,
        "the history lists every crashed delivery: {:?}",
        r.attempts
    );
    assert_eq!(
        r.metadata.as_ref().and_then(|m| m.get("who")),
        Some(&serde_json::json!("poison")),
        "metadata echoed"
    );
    let dead = dead_letters(&redis);
    let (_, rec) = dead
        .iter()
        .find(|(k, _)| k == "poison")
        .unwrap_or_else(|| panic!("llmq:dead has the poison job: {dead:?}"));
    let reason = rec["reason"].as_str().unwrap_or("");
    assert!(reason.contains("crashed"), "reason: {reason}");
    assert!(
        rec["job"].as_str().unwrap_or("").contains("poison"),
        "{rec}"
    );
    assert_eq!(mock.stats().total_calls, 0, "the poison job never ran");

    // It does not loop: the daemon stays up and serves the next jobs.
    let next = id_list("after-poison", 3);
    for id in &next {
        push(&redis, "normal", &job(id));
    }
    let results = wait_results(&redis, &daemon, &next, Duration::from_secs(10));
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    assert!(daemon.is_running(), "{}", tail(&daemon.log(), 30));
    eventually(Duration::from_secs(5), "the lanes drain", || {
        queued(&redis) == 0 && pending(&redis) == 0
    });
    assert_eq!(dead_letters(&redis).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_loses_no_job_and_the_daemon_resumes_by_itself() {
    let mut redis = RedisServer::start_with(Persistence::Aof);
    let mock = mock_with_latency(5).await;
    let spec = daemon_spec(
        &redis,
        &mock,
        "concurrency = 8\nvisibility_timeout = \"1s\"\nmax_attempts = 5",
    );
    let ids = id_list("rr", 300);
    let jobs: Vec<_> = ids.iter().map(|id| job(id)).collect();
    push_many(&redis, "normal", &jobs);

    let mut daemon = start(&spec);
    eventually(
        Duration::from_secs(15),
        "the daemon has finished some jobs",
        || results_written(&redis) >= 40,
    );
    redis.restart();
    let after_restart = results_written(&redis);
    assert!(
        after_restart < ids.len(),
        "the restart must land mid-run ({after_restart} done)"
    );
    assert!(
        daemon.is_running(),
        "the daemon survives the outage:\n{}",
        tail(&daemon.log(), 30)
    );
    // Jobs pushed after the restart are served too.
    let late = id_list("rr-late", 5);
    for id in &late {
        push(&redis, "high", &job(id));
    }
    let all: Vec<String> = ids.iter().chain(late.iter()).cloned().collect();
    let results = wait_results(&redis, &daemon, &all, Duration::from_secs(30));
    for r in &results {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    assert!(daemon.is_running(), "{}", tail(&daemon.log(), 30));
    eventually(Duration::from_secs(10), "the lanes drain", || {
        queued(&redis) == 0 && pending(&redis) == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jobs_are_dead_lettered_with_a_reason_and_the_next_jobs_run() {
    let redis = RedisServer::start();
    let mock = mock_with_latency(0).await;
    let spec = daemon_spec(&redis, &mock, "concurrency = 4");
    let daemon = start(&spec);

    push_raw(&redis, "normal", "job", "{this is not json");
    push(&redis, "normal", &serde_json::json!({"id": "no-messages"}));
    push(
        &redis,
        "normal",
        &serde_json::json!({"id": "wrong-type", "messages": "hello"}),
    );
    push_raw(&redis, "normal", "payload", "no job field");
    let good = id_list("good", 5);
    for id in &good {
        push(&redis, "normal", &job(id));
    }
    let results = wait_results(&redis, &daemon, &good, Duration::from_secs(10));
    assert!(
        results.iter().all(|r| r.status == Status::Succeeded),
        "{results:?}"
    );

    // Malformed jobs with a readable id get a failed result.
    let bad = wait_results(
        &redis,
        &daemon,
        &["no-messages".to_string(), "wrong-type".to_string()],
        Duration::from_secs(5),
    );
    for r in &bad {
        assert_eq!(r.status, Status::Failed, "{r:?}");
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.kind, FailureKind::InvalidJob, "{r:?}");
        assert!(
            e.message.contains("messages"),
            "names the field: {}",
            e.message
        );
    }
    eventually(Duration::from_secs(5), "four dead letters", || {
        dead_letters(&redis).len() == 4
    });
    let dead = dead_letters(&redis);
    for (field, rec) in &dead {
        let reason = rec["reason"].as_str().unwrap_or("");
        assert!(!reason.is_empty(), "{field}: {rec}");
        assert_eq!(rec["lane"], "normal", "{rec}");
    }
    let reason_of = |f: &str| {
        dead.iter()
            .find(|(k, _)| k == f)
            .map(|(_, r)| r["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("no dead letter {f}: {dead:?}"))
    };
    assert!(reason_of("no-messages").contains("messages"));
    assert!(reason_of("wrong-type").contains("messages"));
    let unreadable: Vec<&(String, serde_json::Value)> = dead
        .iter()
        .filter(|(k, _)| k != "no-messages" && k != "wrong-type")
        .collect();
    assert_eq!(unreadable.len(), 2, "{dead:?}");
    assert!(
        unreadable
            .iter()
            .any(|(_, r)| r["reason"].as_str().unwrap_or("").contains("job")),
        "{unreadable:?}"
    );
    assert_eq!(mock.stats().total_calls, good.len() as u64);
    eventually(Duration::from_secs(5), "the lanes drain", || {
        queued(&redis) == 0 && pending(&redis) == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_id_is_sent_upstream_once() {
    let redis = RedisServer::start();
    // Slow enough that the copies are fetched while the first one runs.
    let mock = mock_with_latency(300).await;
    let spec = daemon_spec(&redis, &mock, "concurrency = 8");
    let daemon = start(&spec);

    for lane in ["normal", "normal", "high", "low"] {
        push(&redis, lane, &job("dup"));
    }
    push(&redis, "normal", &job("other"));
    let ids = vec!["dup".to_string(), "other".to_string()];
    wait_results(&redis, &daemon, &ids, Duration::from_secs(10));
    eventually(Duration::from_secs(5), "every copy is acked", || {
        queued(&redis) == 0 && pending(&redis) == 0
    });
    assert_eq!(
        mock.stats().total_calls,
        2,
        "one call for dup, one for other"
    );

    // A copy pushed after the result exists is acked without a call.
    push(&redis, "normal", &job("dup"));
    eventually(Duration::from_secs(5), "the late copy is acked", || {
        queued(&redis) == 0 && pending(&redis) == 0
    });
    assert_eq!(mock.stats().total_calls, 2);
    assert_eq!(result(&redis, "dup").unwrap().status, Status::Succeeded);
    assert_eq!(results_written(&redis), 2, "one result per id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_jobs_and_leaves_the_rest_for_the_next_daemon() {
    let redis = RedisServer::start();
    let mock = mock_with_latency(500).await;
    let spec = daemon_spec(
        &redis,
        &mock,
        "concurrency = 2\nvisibility_timeout = \"1s\"\nshutdown_grace = \"10s\"",
    );
    let ids = id_list("term", 6);
    let jobs: Vec<_> = ids.iter().map(|id| job(id)).collect();
    push_many(&redis, "normal", &jobs);

    let mut daemon = start(&spec);
    // Both slots are taken (a fresh key admits one call until it is proven,
    // so the second job may still wait for the key) and a call is upstream.
    eventually(Duration::from_secs(10), "two jobs are running", || {
        pending(&redis) == 2 && mock.stats().total_calls >= 1
    });
    assert_eq!(results_written(&redis), 0, "they are still running");
    let code = daemon.stop();
    assert_eq!(
        code,
        Some(0),
        "exit code; log:\n{}",
        tail(&daemon.log(), 30)
    );

    // The running jobs finished (each with its one call); nothing more started.
    let done: Vec<&String> = ids
        .iter()
        .filter(|id| result(&redis, id).is_some())
        .collect();
    assert!(
        (2..ids.len()).contains(&done.len()),
        "results after SIGTERM: {done:?}"
    );
    assert_eq!(mock.stats().total_calls, done.len() as u64);
    for id in &done {
        assert_eq!(result(&redis, id).unwrap().status, Status::Succeeded);
    }
    assert_eq!(
        queued(&redis),
        ids.len() - done.len(),
        "the unstarted jobs stay in the stream"
    );
    assert_eq!(pending(&redis), 0, "and none was taken");

    let next = start(&spec);
    let results = wait_results(&redis, &next, &ids, Duration::from_secs(15));
    assert!(results.iter().all(|r| r.status == Status::Succeeded));
    assert_eq!(mock.stats().total_calls, ids.len() as u64);
}
