//! The admin port under abuse, against the real `llmq serve` process (real
//! Redis, real plugin `.so` files, the mock provider): a flood of 20,000 idle
//! connections leaves jobs and `/healthz` alone and the daemon's file
//! descriptors within their reserve; slowloris and idle connections are
//! closed at their timeouts; `/readyz` answers from a background probe within
//! 100 ms, also when Redis is gone; `/v1/run` opens no Redis connection.
//!
//! The tests take turns (one daemon at a time): the flood would skew the
//! timings of the others.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::Status;
use llmq_mock::{KeySpec, MockConfig, Protocol};
use llmq_testkit::daemon::{DaemonProcess, DaemonSpec};
use llmq_testkit::RedisServer;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "e2e-flood-token-7d1e";
const KEY: &str = "sk-test-flood-000000000001";
const WAIT: Duration = Duration::from_secs(30);

/// One test at a time in this file.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    redis: RedisServer,
    _mock: llmq_mock::MockServer,
    daemon: DaemonProcess,
    admin: Admin,
    listen: String,
    /// Holds the fd-limit wrapper script, when there is one.
    _wrapper: Option<tempfile::TempDir>,
}

/// A daemon with provider `p` (model `a`) on the mock, the admin API on a
/// free port with these extra `[admin]` lines, and, with `nofile`, started
/// under that file-descriptor limit (soft and hard).
async fn setup(admin_lines: &str, nofile: Option<u64>) -> Setup {
    let redis = RedisServer::start();
    let mock = mock(
        MockConfig::default()
            .plain_http()
            .key(KeySpec::new(KEY).label("p#1")),
    )
    .await;
    let listen = free_listen();
    let providers = [Provider::new("p", Protocol::OpenAi, "free", "a")];
    let cfg = config(&redis, &mock, &providers, "[queue]\nconcurrency = 32\n");
    let cfg = with_admin(&cfg, &listen).replacen(
        &format!("listen = \"{listen}\"\n"),
        &format!("listen = \"{listen}\"\n{admin_lines}\n"),
        1,
    );
    let mut spec = spec(cfg)
        .env("P_API_KEY_1", KEY)
        .env("LLMQ_ADMIN_TOKEN", TOKEN);
    let wrapper = nofile.map(|n| limited(&mut spec, n));
    let mut daemon = start(&spec);
    let admin = Admin::new(&listen, Some(TOKEN));
    admin.wait_up(&mut daemon, WAIT).await;
    Setup {
        redis,
        _mock: mock,
        daemon,
        admin,
        listen,
        _wrapper: wrapper,
    }
}

/// Makes `spec` start the daemon through `sh -c 'ulimit -n N; exec llmq'`,
/// so it runs with a known descriptor limit it cannot raise.
fn limited(spec: &mut DaemonSpec, nofile: u64) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("llmq-limited");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nulimit -n {nofile} || exit 97\nexec {:?} \"$@\"\n",
            spec.bin.display().to_string()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    spec.bin = script;
    dir
}

fn job_for(id: &str) -> serde_json::Value {
    let mut j = job(id);
    j["model"] = json!("a");
    j
}

/// Pushes `n` jobs and returns their ids.
fn push_jobs(s: &Setup, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        push(&s.redis, "normal", &job_for(id));
    }
    ids
}

/// Waits for the jobs (off the async workers) and checks each succeeded.
async fn all_succeed(s: &Setup, ids: &[String]) {
    let results = tokio::task::block_in_place(|| wait_results(&s.redis, &s.daemon, ids, WAIT));
    for r in &results {
        assert_eq!(
            r.status,
            Status::Succeeded,
            "{r:?}\n{}",
            tail(&s.daemon.log(), 40)
        );
    }
}

/// `log` without ANSI colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `/healthz` on a fresh connection, within `within`.
async fn healthz_within(listen: &str, within: Duration) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .timeout(within)
        .build()
        .map_err(|e| e.to_string())?;
    client
        .get(format!("http://{listen}/healthz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// The environment variables that turn [`flood_holder`] on.
const HOLD_ADDR: &str = "LLMQ_TEST_FLOOD_ADDR";
const HOLD_COUNT: &str = "LLMQ_TEST_FLOOD_COUNT";

/// Not a test: the flood's connections are held by child processes (this
/// test binary again, running only this function with [`HOLD_ADDR`] set), so
/// no process needs more than its usual descriptor limit. It connects
/// [`HOLD_COUNT`] times, prints `held N failed M`, and holds every
/// connection until its stdin closes.
#[test]
#[ignore = "a helper process of twenty_thousand_idle_connections_…; runs only with LLMQ_TEST_FLOOD_ADDR"]
fn flood_holder() {
    use futures::StreamExt;
    use std::io::{Read, Write};
    let (Ok(addr), Ok(count)) = (std::env::var(HOLD_ADDR), std::env::var(HOLD_COUNT)) else {
        return;
    };
    let addr: std::net::SocketAddr = addr.parse().expect("LLMQ_TEST_FLOOD_ADDR");
    let count: usize = count.parse().expect("LLMQ_TEST_FLOOD_COUNT");
    // Many connects in flight: a connect that waits for a SYN retransmit
    // (the accept queue was full for a moment) does not hold up the rest.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let connects = rt.block_on(
        futures::stream::iter(0..count)
            .map(|_| tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)))
            .buffer_unordered(256)
            .collect::<Vec<_>>(),
    );
    let mut held = Vec::with_capacity(count);
    let mut failed = 0usize;
    for c in connects {
        match c {
            Ok(Ok(stream)) => held.push(stream),
            _ => failed += 1,
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "held {} failed {failed}", held.len());
    let _ = out.flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
}

/// A child process holding `count` connections to `addr` (see
/// [`flood_holder`]); dropping it closes them.
struct Holder {
    child: std::process::Child,
}

impl Holder {
    fn spawn(addr: &str, count: usize) -> Holder {
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe().expect("this test binary");
        let child = Command::new(exe)
            .args([
                "flood_holder",
                "--exact",
                "--ignored",
                "--nocapture",
                "--quiet",
            ])
            .args(["--test-threads", "1"])
            .env(HOLD_ADDR, addr)
            .env(HOLD_COUNT, count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a holder process");
        Holder { child }
    }

    /// Waits for the connections: `(held, failed)`.
    fn wait_held(&mut self) -> (usize, usize) {
        use std::io::BufRead;
        let out = self.child.stdout.as_mut().expect("holder stdout");
        for line in std::io::BufReader::new(out).lines() {
            let line = line.expect("holder output");
            if let Some(rest) = line.strip_prefix("held ") {
                let mut parts = rest.split(" failed ");
                let held = parts.next().and_then(|n| n.trim().parse().ok());
                let failed = parts.next().and_then(|n| n.trim().parse().ok());
                if let (Some(h), Some(f)) = (held, failed) {
                    return (h, f);
                }
            }
        }
        panic!("the holder process ended without holding its connections");
    }

    /// Closes its connections and waits for it to exit.
    fn release(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_idle_connections_leave_jobs_and_healthz_alone() {
    let _turn = SERIAL.lock().await;
    // The daemon gets 2,048 descriptors and asks for far more admin
    // connections than it may hold: its cap is a quarter (512), the rest is
    // the reserve that keeps jobs running.
    const NOFILE: u64 = 2048;
    const FLOOD: usize = 20_000;
    const HOLDERS: usize = 4;
    let s = setup(
        "max_connections = 1000000\nheader_timeout = \"120s\"\nidle_timeout = \"120s\"",
        Some(NOFILE),
    )
    .await;
    let pid = s.daemon.pid().expect("daemon pid");
    assert!(
        plain(&s.daemon.log()).contains("max_connections=512"),
        "the admin cap is a quarter of the fd limit:\n{}",
        tail(&s.daemon.log(), 20)
    );
    all_succeed(&s, &push_jobs(&s, "before", 20)).await;
    let baseline = fds(pid);

    // The daemon's descriptors, sampled until the flood is over.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let sampling = sampling.clone();
        move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Acquire) {
                peak = peak.max(fds(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        }
    });

    // Jobs keep arriving while the flood builds up.
    let during = push_jobs(&s, "during", 200);
    let t0 = Instant::now();
    let mut holders: Vec<Holder> = (0..HOLDERS)
        .map(|_| Holder::spawn(&s.listen, FLOOD / HOLDERS))
        .collect();
    let (held, failed) = tokio::task::block_in_place(|| {
        holders
            .iter_mut()
            .map(Holder::wait_held)
            .fold((0, 0), |(h, f), (h2, f2)| (h + h2, f + f2))
    });
    eprintln!(
        "flood: {held} held, {failed} failed after {:?}",
        t0.elapsed()
    );
    assert_eq!(held + failed, FLOOD);
    assert!(
        failed <= FLOOD / 100,
        "{failed} of {FLOOD} connects failed: the daemon stopped accepting"
    );

    // Held: /healthz answers on a fresh connection, jobs succeed, and the
    // daemon holds no more than its cap of admin sockets.
    let t = Instant::now();
    let health = healthz_within(&s.listen, Duration::from_secs(5)).await;
    assert_eq!(
        health,
        Ok(200),
        "/healthz with {held} connections held ({:?})\n{}",
        t.elapsed(),
        tail(&s.daemon.log(), 20)
    );
    let more = push_jobs(&s, "held", 100);
    all_succeed(&s, &during).await;
    all_succeed(&s, &more).await;
    eprintln!("flood: jobs done after {:?}", t0.elapsed());
    let log = s.daemon.log();
    assert!(!log.contains("Too many open files"), "{}", tail(&log, 40));

    // Closed: everything still works.
    tokio::task::block_in_place(|| holders.drain(..).for_each(Holder::release));
    sampling.store(false, std::sync::atomic::Ordering::Release);
    let peak = sampler.join().expect("fd sampler");
    eprintln!(
        "flood: released after {:?}; peak fds {peak}, baseline {baseline}",
        t0.elapsed()
    );
    assert!(
        peak <= baseline + 512 + 32 + 128 && peak < (NOFILE as usize) / 2,
        "the daemon held {peak} descriptors (baseline {baseline}, admin cap 512)"
    );
    all_succeed(&s, &push_jobs(&s, "after", 20)).await;
    assert_eq!(
        healthz_within(&s.listen, Duration::from_secs(5)).await,
        Ok(200)
    );
    let keys = s.admin.get("/v1/keys").await;
    assert_eq!(keys.status, 200, "{keys:?}");
}

/// Reads until the server closes the connection (EOF or reset); how long
/// that took, or `None` if it stayed open for `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_closed_at_their_timeouts() {
    let _turn = SERIAL.lock().await;
    let s = setup("header_timeout = \"1s\"\nidle_timeout = \"3s\"", None).await;
    let addr = s.listen.clone();

    // Silent: closed at the header timeout.
    let mut silent = TcpStream::connect(&addr).await.expect("connect");
    // Slowloris: a head that never ends, a byte every 100 ms.
    let mut slow = TcpStream::connect(&addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let start = Instant::now();
    let drip = tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            if slow.write_all(b"X").await.is_err() {
                return (slow, n, false);
            }
            n += 1;
            match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut [0u8; 64])).await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return (slow, n, true),
                _ => {}
            }
            if n > 100 {
                return (slow, n, false);
            }
        }
    });
    let silent_closed = closed_within(&mut silent, Duration::from_secs(6)).await;
    let (_slow, drips, slow_closed) = drip.await.expect("drip task");
    let slow_after = start.elapsed();
    let silent_closed = silent_closed.expect("a silent connection is closed");
    assert!(
        silent_closed >= Duration::from_millis(800) && silent_closed < Duration::from_secs(3),
        "silent connection closed after {silent_closed:?}"
    );
    assert!(
        slow_closed && slow_after < Duration::from_secs(3),
        "slowloris still open after {drips} drips ({slow_after:?})"
    );

    // Kept alive after a request: open past the header timeout, closed at
    // the idle timeout.
    let mut kept = TcpStream::connect(&addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    while !got.ends_with(b"ok") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert!(n > 0, "closed before answering: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    let idle = closed_within(&mut kept, Duration::from_secs(8))
        .await
        .expect("an idle connection is closed");
    assert!(
        idle >= Duration::from_millis(2_500) && idle < Duration::from_secs(6),
        "idle connection closed after {idle:?}"
    );
    // The API still serves.
    assert_eq!(s.admin.get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_within_100ms_and_sees_redis_go_within_100ms() {
    let _turn = SERIAL.lock().await;
    let mut s = setup("", None).await;
    let anon = s.admin.with_token(None);
    let timed = |a: Admin| async move {
        let t = Instant::now();
        let r = a.get("/readyz").await;
        (r, t.elapsed())
    };
    for _ in 0..20 {
        let (r, took) = timed(anon.clone()).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(took < Duration::from_millis(100), "/readyz took {took:?}");
    }

    s.redis.kill();
    let killed = Instant::now();
    let (down, seen) = loop {
        let (r, took) = timed(anon.clone()).await;
        assert!(
            took < Duration::from_millis(100),
            "/readyz took {took:?} with redis gone"
        );
        if r.status == 503 {
            break (r, killed.elapsed());
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "still ready 2 s after redis went: {r:?}"
        );
    };
    eprintln!("readyz: not ready {seen:?} after redis went");
    assert!(
        seen <= Duration::from_millis(100),
        "not ready only {seen:?} after redis went"
    );
    let dj = down.json();
    assert_eq!(dj["ready"], false, "{dj}");
    assert!(dj["error"].as_str().unwrap_or("").contains("redis"), "{dj}");
    for _ in 0..10 {
        let (r, took) = timed(anon.clone()).await;
        assert_eq!(r.status, 503);
        assert!(took < Duration::from_millis(100), "/readyz took {took:?}");
    }
    assert_eq!(anon.get("/healthz").await.status, 200);

    // Back: ready again.
    s.redis.restart();
    let deadline = Instant::now() + WAIT;
    loop {
        let (r, took) = timed(anon.clone()).await;
        assert!(took < Duration::from_millis(100), "/readyz took {took:?}");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not ready after redis came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections Redis has accepted so far, and those open now.
fn redis_connections(c: &mut redis::Connection) -> (u64, usize) {
    let info: String = redis::cmd("INFO").arg("stats").query(c).expect("INFO");
    let total = info
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(c)
        .expect("CLIENT LIST");
    (total, list.lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_uses_the_shared_redis_connection() {
    let _turn = SERIAL.lock().await;
    let s = setup("", None).await;
    // One call first, so every connection the daemon keeps is already open.
    let first = s.admin.post("/v1/run", Some(&job_for("warm-run"))).await;
    assert_eq!(first.status, 200, "{first:?}");
    let mut c = s.redis.client();
    let (total_before, open_before) = redis_connections(&mut c);
    let mut peak_open = open_before;
    for round in 0..5 {
        let calls = (0..10).map(|i| {
            let admin = s.admin.clone();
            async move {
                admin
                    .post("/v1/run", Some(&job_for(&format!("run-{round}-{i}"))))
                    .await
            }
        });
        let (answers, (_, open)) = tokio::join!(futures::future::join_all(calls), async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tokio::task::block_in_place(|| redis_connections(&mut c))
        });
        peak_open = peak_open.max(open);
        for a in answers {
            assert_eq!(a.status, 200, "{a:?}");
            assert_eq!(a.json()["status"], "succeeded", "{}", a.body);
        }
    }
    let (total_after, open_after) = redis_connections(&mut c);
    assert!(
        total_after - total_before < 5,
        "50 /v1/run calls opened {} Redis connections",
        total_after - total_before
    );
    assert!(
        peak_open <= open_before + 2 && open_after <= open_before + 2,
        "open Redis connections: {open_before} before, {peak_open} at peak, {open_after} after"
    );
}
