//! The Python producer example (`tests/producers/python/producer.py`,
//! redis-py only) against a real Redis and a real daemon: the producer
//! contract of SPEC §3 used from another language, exactly as documented.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq_mock::{KeySpec, MockConfig, Protocol};
use llmq_testkit::RedisServer;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "sk-test-oa-py-000000000001";

fn producer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/producers/python/producer.py")
        .canonicalize()
        .expect("tests/producers/python/producer.py exists")
}

/// Why the Python side cannot run here, if it cannot.
/// Python 3 with redis-py, or a failure that says how to get it: the test
/// never passes by skipping (scripts/test.sh installs both).
fn require_python() {
    match Command::new("python3")
        .args(["-c", "import redis"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Err(e) => panic!("the Python producer test needs python3: not found ({e})"),
        Ok(s) if !s.success() => panic!(
            "the Python producer test needs the python3 `redis` module (pip install redis; scripts/test.sh does)"
        ),
        Ok(_) => {}
    }
}

/// Runs the producer with a deadline; kills it when it overruns.
fn run_producer(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new("python3")
        .arg(producer_script())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "producer.py {args:?} still running after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_producer_gets_every_result_from_the_daemon() {
    require_python();
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(KeySpec::new(SECRET).label("oa#1"))).await;
    let providers = [Provider::new("oa", Protocol::OpenAi, "free", "m1")];
    let daemon = start(&spec(config(&redis, &mock, &providers, "")).env("OA_API_KEY_1", SECRET));

    let out = run_producer(
        &["--redis", &redis.url(), "--jobs", "6", "--timeout", "15"],
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{text}\nstderr:\n{err}\ndaemon:\n{}",
        tail(&daemon.log(), 30)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    for (i, line) in lines[..6].iter().enumerate() {
        assert!(
            line.contains(": succeeded via oa/m1 key=oa#1 tier=free -> ")
                && line.contains(&format!("mock reply to: python job {i}")),
            "{line}"
        );
    }
    assert_eq!(lines[6], "6 of 6 succeeded");
    assert_eq!(mock.stats().total_calls, 6);
    // The jobs went through all three lanes and left nothing behind.
    let mut c = redis.client();
    let written: usize = redis::cmd("XLEN")
        .arg("llmq:results")
        .query(&mut c)
        .unwrap();
    assert_eq!(written, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_producer_exits_1_when_a_job_fails() {
    require_python();
    let redis = RedisServer::start();
    let mock = mock(MockConfig::default().key(KeySpec::new(SECRET).label("oa#1"))).await;
    let providers = [Provider::new("oa", Protocol::OpenAi, "free", "m1")];
    let _daemon = start(&spec(config(&redis, &mock, &providers, "")).env("OA_API_KEY_1", SECRET));

    // No route serves this model: each job fails with a result.
    let out = run_producer(
        &[
            "--redis",
            &redis.url(),
            "--jobs",
            "2",
            "--timeout",
            "15",
            "--model",
            "no-such-model",
        ],
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.matches(": failed (no_route): ").count(), 2, "{text}");
    assert!(text.trim_end().ends_with("0 of 2 succeeded"), "{text}");
    assert_eq!(mock.stats().total_calls, 0);
}
