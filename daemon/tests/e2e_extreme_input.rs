//! Extreme input (issue 15, "Extreme input"): jobs with out-of-range
//! numbers, duplicate keys, a 1,000-model fan-out or a 10 MB body are
//! dead-lettered at once by the real daemon, each with a readable reason
//! naming the field, and nothing panics. None of them reaches upstream.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::{FailureKind, Status};
use llmq_mock::{KeySpec, MockConfig, Protocol};
use llmq_testkit::{wait_until, RedisServer};
use std::time::Duration;

const SECRET: &str = "sk-test-oa-000000000001";

/// `XADD llmq:{jobs}:normal * job <body>` for many bodies in one round
/// trip; returns the entry ids.
fn xadd_all(redis: &RedisServer, bodies: &[String]) -> Vec<String> {
    let mut c = redis.client();
    let mut p = redis::pipe();
    for b in bodies {
        p.cmd("XADD")
            .arg("llmq:{jobs}:normal")
            .arg("*")
            .arg("job")
            .arg(b);
    }
    p.query(&mut c).expect("XADD")
}

/// The `llmq:dead` record under `field`, parsed.
fn dead(redis: &RedisServer, field: &str) -> Option<serde_json::Value> {
    let mut c = redis.client();
    let s: Option<String> = redis::cmd("HGET")
        .arg("llmq:dead")
        .arg(field)
        .query(&mut c)
        .ok()?;
    s.map(|s| serde_json::from_str(&s).expect("dead record is JSON"))
}

/// Unix ms of a stream entry id (`<ms>-<seq>`): when Redis took the job.
fn entry_ms(entry_id: &str) -> i128 {
    entry_id
        .split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .expect("entry id has a time")
}

/// Unix ms of a record's `at` (RFC 3339, written as the daemon dead-lettered it).
fn at_ms(rec: &serde_json::Value) -> i128 {
    let at = rec["at"].as_str().expect("record has `at`");
    i128::from(
        at.parse::<jiff::Timestamp>()
            .expect("`at` is RFC 3339")
            .as_millisecond(),
    )
}

fn job_with(id: &str, extra: &str) -> String {
    format!(r#"{{"id":"{id}","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_jobs_are_dead_lettered_at_once_with_a_reason_naming_the_field() {
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(KeySpec::new(SECRET).label("oa#1"))).await;
    let providers = [Provider::new("oa", Protocol::OpenAi, "free", "m1")];
    let extra = "[queue]\nconcurrency = 8\ndead_body_bytes = 4096\n";
    let spec = spec(config(&redis, &mock, &providers, extra))
        .env("OA_API_KEY_1", SECRET)
        .env("RUST_BACKTRACE", "1");
    let mut daemon = start(&spec);

    // The daemon reads its lanes once it has dead-lettered a first entry.
    let probe = xadd_all(&redis, &["{not json".to_string()]);
    wait_until(
        Duration::from_secs(60),
        "the daemon reads its lanes",
        || dead(&redis, &probe[0]).is_some(),
    );

    let models: Vec<String> = (0..1000).map(|i| format!(r#""m{i}""#)).collect();
    let ten_mb = job_with(
        "ten-mb",
        &format!(r#""metadata":"{}""#, "x".repeat(10 << 20)),
    );
    // (body, dead-letter field or None for the entry id, words the reason must hold)
    let cases: Vec<(String, Option<&str>, &[&str])> = vec![
        (
            job_with("deadline-max", r#""deadline_s":18446744073709551615"#),
            Some("deadline-max"),
            &["`deadline_s`", "18446744073709551615"],
        ),
        (
            job_with("deadline-neg", r#""deadline_s":-1"#),
            Some("deadline-neg"),
            &["`deadline_s`", "-1"],
        ),
        (
            job_with("deadline-zero", r#""deadline_s":0"#),
            Some("deadline-zero"),
            &["`deadline_s`", "is 0"],
        ),
        (
            job_with("tokens-2p32", r#""max_tokens":4294967296"#),
            Some("tokens-2p32"),
            &["`max_tokens`", "4294967296"],
        ),
        (
            r#"{"id":"dup-a","id":"dup-b","messages":[{"role":"user","content":"hi"}]}"#.into(),
            None,
            &["`id`", "more than once"],
        ),
        (
            job_with(
                "models-1000",
                &format!(r#""models":[{}]"#, models.join(",")),
            ),
            Some("models-1000"),
            &["`models`", "1000", "max_models"],
        ),
        (ten_mb.clone(), None, &["over the 1048576-byte limit"]),
    ];
    let bodies: Vec<String> = cases.iter().map(|c| c.0.clone()).collect();
    let entries = xadd_all(&redis, &bodies);
    let fields: Vec<String> = cases
        .iter()
        .zip(&entries)
        .map(|(c, e)| c.1.map_or_else(|| e.clone(), str::to_string))
        .collect();
    wait_until(Duration::from_secs(10), "every extreme job is dead", || {
        fields.iter().all(|f| dead(&redis, f).is_some())
    });

    for ((case, entry), field) in cases.iter().zip(&entries).zip(&fields) {
        let rec = dead(&redis, field).unwrap();
        let reason = rec["reason"].as_str().unwrap_or_default();
        for word in case.2 {
            assert!(reason.contains(word), "{field}: {word:?} in {reason:?}");
        }
        // At once: no retry, no backoff, well under a second after Redis took it.
        assert_eq!(rec["attempts"], 1, "{field}: {rec}");
        let after = at_ms(&rec) - entry_ms(entry);
        assert!(
            after < 1000,
            "{field} dead-lettered {after} ms after it was pushed"
        );
        assert_eq!(rec["job_bytes"], case.0.len(), "{field}");
    }

    // A readable id gets a failed `invalid_job` result naming the field.
    let r = result(&redis, "deadline-max").expect("a failed result for deadline-max");
    assert_eq!(r.status, Status::Failed);
    let e = r.error.expect("an error");
    assert_eq!(e.kind, FailureKind::InvalidJob);
    assert!(e.message.contains("deadline_s"), "{}", e.message);
    // Two ids: neither is the job's, so no result is made up for either.
    assert!(result(&redis, "dup-a").is_none() && result(&redis, "dup-b").is_none());

    // The 10 MB body is kept cut to dead_body_bytes, with its length.
    let big = dead(&redis, &entries[6]).unwrap();
    let kept = big["job"].as_str().unwrap();
    assert_eq!(kept.len(), 4096);
    assert!(ten_mb.starts_with(kept));
    assert_eq!(big["job_truncated"], true);
    assert_eq!(big["job_bytes"], ten_mb.len());
    let small = dead(&redis, "deadline-zero").unwrap();
    assert_eq!(
        small["job"],
        cases[2].0.as_str(),
        "a short body is kept whole"
    );
    assert_eq!(small["job_truncated"], false);

    assert_eq!(mock.stats().total_calls, 0, "nothing went upstream");
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{}", tail(&log, 60));
    assert!(daemon.is_running(), "{}", tail(&log, 30));
}
