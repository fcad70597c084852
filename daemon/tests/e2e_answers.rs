//! How a call ended reaches the job and the keys, end to end (issue 11): the
//! real `llmq serve`, a private Redis and the mock provider.
//!
//! - a Groq 413 "Request too large … tokens per minute" leaves the key alone
//!   and moves the job at once to the other routes; when every key of every
//!   route refuses it, the job fails at once as `invalid_request`;
//! - a Gemini per-day quota of one model parks that model on that key only:
//!   the key keeps serving its other models, the model keeps being served by
//!   the other keys, and a job held to the parked pair says why at its deadline;
//! - an answer cut short by `max_tokens` is `succeeded` with
//!   `finish_reason: "length"` and the text in `message.content`.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::{FailureKind, FinishReason, JobResult, Status};
use llmq_mock::{FailureKind as Inject, Injection, KeySpec, MockConfig, MockServer, Protocol};
use llmq_testkit::daemon::DaemonProcess;
use llmq_testkit::RedisServer;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A secret for a key id (`tpm#1` → `sk-test-tpm-1-000000000000`).
fn secret(id: &str) -> String {
    format!("sk-test-{}-000000000000", id.replace('#', "-"))
}

/// A mock key labelled with the daemon's key id.
fn key(id: &str) -> KeySpec {
    KeySpec::new(secret(id)).label(id)
}

async fn mock_with(ids: &[&str]) -> MockServer {
    let mut mc = MockConfig::default();
    for id in ids {
        mc = mc.key(key(id));
    }
    mock(mc).await
}

/// Starts the daemon with these keys (`tpm#1` → `TPM_API_KEY_1`).
fn start_daemon(config: String, ids: &[&str]) -> DaemonProcess {
    let mut s = spec(config);
    for id in ids {
        let (p, n) = id.split_once('#').expect("key id provider#N");
        s = s.env(&format!("{}_API_KEY_{n}", p.to_uppercase()), &secret(id));
    }
    start(&s)
}

fn run_one(redis: &RedisServer, daemon: &DaemonProcess, j: Value, timeout: Duration) -> JobResult {
    let id = j["id"].as_str().expect("job id").to_string();
    push(redis, "normal", &j);
    wait_results(redis, daemon, &[id], timeout).remove(0)
}

fn outcomes(r: &JobResult) -> Vec<String> {
    r.attempts
        .iter()
        .map(|a| format!("{}:{}", a.key, a.outcome))
        .collect()
}

/// A free Groq-like provider (its key answers Groq's 413 on TPM) and a paid
/// route behind it. (Not named `groq`: the catalog's Groq models would add
/// routes, and a key refused as too large for one model is only out for
/// that model, as Groq's TPM limits are per model.)
/// Dearer tiers are held back for 10 minutes while a cheaper one is alive,
/// and jobs may wait 30 s: only a route known dead lets the job spill at once.
const ROUTING: &str = "[routing]\nwait_for_cheaper = \"10m\"\ndefault_deadline = \"30s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_groq_413_on_tpm_the_job_moves_to_another_route_at_once() {
    let redis = RedisServer::start();
    let mock = mock_with(&["tpm#1", "paid#1"]).await;
    mock.inject(
        Some("tpm#1"),
        vec![Injection::new(Inject::GroqTpm413, 100).limit(6000)],
    );
    let providers = [
        Provider::new("tpm", Protocol::OpenAi, "free", "llama-3.1-8b-instant"),
        Provider::new("paid", Protocol::OpenAi, "paid", "gpt-4o-mini"),
    ];
    let daemon = start_daemon(
        config(&redis, &mock, &providers, ROUTING),
        &["tpm#1", "paid#1"],
    );
    let started = Instant::now();
    let r = run_one(&redis, &daemon, job("tpm-1"), Duration::from_secs(25));
    let took = started.elapsed();
    eprintln!(
        "413 TPM then another route: {took:?}, attempts {:?}",
        outcomes(&r)
    );
    assert_eq!(
        r.status,
        Status::Succeeded,
        "{r:?}\n{}",
        tail(&daemon.log(), 40)
    );
    assert_eq!(r.provider.as_deref(), Some("paid"));
    assert_eq!(
        outcomes(&r),
        vec!["tpm#1:request_too_large", "paid#1:success"]
    );
    // At once: not after `wait_for_cheaper`, not at the deadline.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The key was asked once and is not disabled or cooling: the next job
    // (it gets a 413 again) tries it first again, then moves on.
    let r = run_one(&redis, &daemon, job("tpm-2"), Duration::from_secs(25));
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(
        outcomes(&r),
        vec!["tpm#1:request_too_large", "paid#1:success"]
    );
    assert_eq!(mock.stats().keys["tpm#1"].calls, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_key_of_every_route_refuses_a_request_as_too_large_it_fails_at_once() {
    let redis = RedisServer::start();
    let ids = ["tpm#1", "tpm#2", "big#1"];
    let mock = mock_with(&ids).await;
    for id in ids {
        mock.inject(
            Some(id),
            vec![Injection::new(Inject::GroqTpm413, 100).limit(6000)],
        );
    }
    let providers = [
        Provider::new("tpm", Protocol::OpenAi, "free", "llama-3.1-8b-instant"),
        Provider::new("big", Protocol::OpenAi, "paid", "llama-3.3-70b-versatile"),
    ];
    let daemon = start_daemon(config(&redis, &mock, &providers, ROUTING), &ids);
    let started = Instant::now();
    let r = run_one(&redis, &daemon, job("tpm-all"), Duration::from_secs(25));
    let took = started.elapsed();
    eprintln!("413 TPM everywhere: {took:?}, attempts {:?}", outcomes(&r));
    assert_eq!(r.status, Status::Failed);
    let err = r.error.as_ref().expect("an error");
    assert_eq!(err.kind, FailureKind::InvalidRequest, "{err:?}");
    assert!(
        err.message.contains("Request too large") && err.message.contains("tokens per minute"),
        "the upstream's message: {err:?}"
    );
    // Each key was asked exactly once.
    let mut asked: Vec<String> = r.attempts.iter().map(|a| a.key.clone()).collect();
    asked.sort();
    assert_eq!(asked, vec!["big#1", "tpm#1", "tpm#2"], "{:?}", outcomes(&r));
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_per_day_quota_parks_only_that_model_on_that_key() {
    let redis = RedisServer::start();
    let ids = ["gem#1", "gem#2"];
    let mock = mock_with(&ids).await;
    let flash = "gemini-2.0-flash";
    let lite = "gemini-2.0-flash-lite";
    let providers = [Provider::new("gem", Protocol::Gemini, "paid", flash).model(lite)];
    let daemon = start_daemon(
        config(
            &redis,
            &mock,
            &providers,
            "[routing]\ndefault_deadline = \"30s\"\n",
        ),
        &ids,
    );
    // gem#1 has used up today's requests of gemini-2.0-flash.
    mock.inject(
        Some("gem#1"),
        vec![Injection::new(Inject::GeminiPerDayQuota, 1)],
    );
    let pinned = |id: &str, model: &str, deadline_s: u64| {
        json!({"id": id, "model": model, "route": {"key": "gem#1"}, "deadline_s": deadline_s,
               "messages": [{"role": "user", "content": format!("hello from {id}")}], "max_tokens": 16})
    };
    // A job held to gem#1 learns it with one call, then waits for the
    // reset and fails at its deadline, saying why.
    let started = Instant::now();
    let r = run_one(
        &redis,
        &daemon,
        pinned("day-1", flash, 2),
        Duration::from_secs(25),
    );
    eprintln!("per-day quota: {:?}, {:?}", started.elapsed(), r.error);
    assert_eq!(
        r.status,
        Status::Failed,
        "{r:?}\n{}",
        tail(&daemon.log(), 40)
    );
    assert_eq!(outcomes(&r), vec!["gem#1:quota_exhausted"]);
    let err = r.error.as_ref().expect("an error");
    assert_eq!(err.kind, FailureKind::Deadline, "{err:?}");
    assert!(
        err.message
            .contains("quota for model gemini-2.0-flash on key gem#1 exhausted until"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // gem#1 is not disabled: it still serves the other model.
    let r = run_one(
        &redis,
        &daemon,
        pinned("day-2", lite, 20),
        Duration::from_secs(25),
    );
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(outcomes(&r), vec!["gem#1:success"]);
    // The parked model goes to gem#2, however often it is asked for.
    for i in 0..4 {
        let mut j = job(&format!("day-3-{i}"));
        j["model"] = json!(flash);
        let r = run_one(&redis, &daemon, j, Duration::from_secs(25));
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(outcomes(&r), vec!["gem#2:success"]);
    }
    // Held to the parked pair again: no call, and the reason is the park.
    let r = run_one(
        &redis,
        &daemon,
        pinned("day-4", flash, 1),
        Duration::from_secs(25),
    );
    assert!(r.attempts.is_empty(), "{:?}", outcomes(&r));
    let err = r.error.as_ref().expect("an error");
    assert!(
        err.message
            .contains("quota for model gemini-2.0-flash on key gem#1 exhausted until"),
        "{err:?}"
    );
    assert_eq!(
        mock.stats().keys["gem#1"].calls,
        2,
        "gem#1 got the quota error and the gemini-2.0-flash-lite job, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_short_by_max_tokens_is_succeeded_with_finish_reason_length() {
    let redis = RedisServer::start();
    let mock = mock_with(&["tpm#1"]).await;
    let providers = [Provider::new(
        "tpm",
        Protocol::OpenAi,
        "free",
        "llama-3.1-8b-instant",
    )];
    let daemon = start_daemon(config(&redis, &mock, &providers, ""), &["tpm#1"]);
    let mut j = job("cut-1");
    j["max_tokens"] = json!(2);
    let r = run_one(&redis, &daemon, j, Duration::from_secs(20));
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.finish_reason, Some(FinishReason::Length));
    let message = r.message.as_ref().expect("a message");
    assert_eq!(message.role, "assistant");
    assert!(message.refusal.is_none());
    assert_eq!(message.content, r.output, "output = message.content");
    // The raw JSON, as a producer in any language reads it.
    let raw: Value = {
        let mut c = redis.client();
        let s: String = redis::cmd("GET")
            .arg("llmq:result:cut-1")
            .query(&mut c)
            .expect("result");
        serde_json::from_str(&s).expect("JSON")
    };
    assert_eq!(raw["finish_reason"], "length");
    assert_eq!(raw["message"]["content"], raw["output"]);
    assert_eq!(raw["message"]["refusal"], Value::Null);
    // An answer that was not cut short says "stop".
    let r = run_one(&redis, &daemon, job("whole-1"), Duration::from_secs(20));
    assert_eq!(r.finish_reason, Some(FinishReason::Stop), "{r:?}");
}
