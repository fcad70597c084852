//! `llmq demo`: the whole product in one command, on this machine only.
//!
//! It starts a private `redis-server` on a free port, the mock provider
//! (our stand-in for the real APIs, enforcing per-key limits), and the daemon
//! itself in-process, with:
//! - a free provider with two keys limited to a few requests per window,
//!   plus one invalid key and one out-of-credit key;
//! - a paid provider with one generous key.
//!
//! It pushes a burst of jobs, shows live progress, then a second, smaller
//! burst after the window to show traffic returning to free, and finally the
//! per-key table: free capacity used first, the spill to paid, the two bad
//! keys parked after exactly one call each, and zero 429s.

use crate::cli::{exit, DemoArgs, GlobalArgs};
use crate::error::{Error, Result};
use crate::job::{JobResult, Status, Tier};
use crate::pool::KeyStatus;
use crate::serve::Options;
use llmq_mock::{KeySpec, KeyState, MockConfig, MockServer, Protocol};
use llmq_testkit::RedisServer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FREE_RPM: u32 = 20;

/// Runs the demo; returns the exit code (0 when every job succeeded with no 429).
pub async fn run(_g: &GlobalArgs, args: &DemoArgs) -> Result<i32> {
    let window_ms = args.window_s.max(1) * 1000;
    let plugins = demo_plugins_dir(args.plugins_dir.as_deref())?;
    println!("llmq demo: starting a private redis-server, the mock provider and the daemon");
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .map_err(|e| Error::Other(format!("redis-server: {e}")))?;
    let mock = start_mock(window_ms).await?;

    let dir = tempfile::tempdir()?;
    let opts = write_demo_files(dir.path(), &redis.url(), &mock, &plugins, args.window_s)?;
    let daemon = crate::serve::start(&opts).await?;
    let pool = daemon.pool.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(daemon.run(async move {
        while !*stop_rx.borrow() {
            if stop_rx.changed().await.is_err() {
                break;
            }
        }
    }));

    let client = redis::Client::open(redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let started = Instant::now();
    let first = args.jobs;
    println!(
        "\nburst 1: {first} jobs; free keys allow {} requests per {}s window between them",
        2 * FREE_RPM,
        args.window_s
    );
    let ids = push_burst(&mut conn, "a", first).await?;
    let mut results = watch(&mut conn, &ids, &mock, started).await?;

    // After the window, free capacity is back: traffic returns to free.
    let wait_for = Duration::from_millis(window_ms + 300);
    println!(
        "\nwaiting {:.1}s for the free window to roll over…",
        wait_for.as_secs_f64()
    );
    tokio::time::sleep(wait_for).await;
    let second = (FREE_RPM as usize).min(first);
    println!("burst 2: {second} jobs after the window");
    let ids2 = push_burst(&mut conn, "b", second).await?;
    let results2 = watch(&mut conn, &ids2, &mock, Instant::now()).await?;
    let back_to_free = results2
        .iter()
        .filter(|r| r.tier == Some(Tier::Free))
        .count();
    results.extend(results2);

    let stats = mock.stats();
    let snapshots = pool.snapshot();
    print_keys(&snapshots, &stats);
    let ok = results
        .iter()
        .filter(|r| r.status == Status::Succeeded)
        .count();
    let free = results
        .iter()
        .filter(|r| r.tier == Some(Tier::Free))
        .count();
    let paid = results
        .iter()
        .filter(|r| r.tier == Some(Tier::Paid))
        .count();
    println!(
        "\n{ok}/{} jobs succeeded: {free} on free keys, {paid} spilled to paid; \
         burst 2 went {back_to_free}/{second} to free; upstream 429s: {}; {:.1}s in all",
        results.len(),
        stats.total_429,
        started.elapsed().as_secs_f64()
    );

    let _ = stop_tx.send(true);
    let _ = running.await;
    mock.shutdown().await;
    drop(redis);
    Ok(if ok == results.len() && stats.total_429 == 0 {
        exit::OK
    } else {
        exit::FAILURE
    })
}

/// The mock provider: four free keys (two good, one invalid, one out of
/// credit) and one paid key.
async fn start_mock(window_ms: u64) -> Result<MockServer> {
    MockServer::start(
        MockConfig::default()
            .window_ms(window_ms)
            .default_latency_ms(20)
            .key(
                KeySpec::new("sk-demo-free-key-one-0001")
                    .label("free#1")
                    .rpm(FREE_RPM),
            )
            .key(
                KeySpec::new("sk-demo-free-key-two-0002")
                    .label("free#2")
                    .rpm(FREE_RPM),
            )
            .key(
                KeySpec::new("sk-demo-free-key-bad-0003")
                    .label("free#3")
                    .state(KeyState::Invalid),
            )
            .key(
                KeySpec::new("sk-demo-free-key-broke-004")
                    .label("free#4")
                    .state(KeyState::NoCredit),
            )
            .key(
                KeySpec::new("sk-ant-demo-paid-key-0001")
                    .label("paid#1")
                    .rpm(1000),
            ),
    )
    .await
    .map_err(|e| Error::Other(format!("mock provider: {e}")))
}

/// Writes the demo's config and keys file into `dir`; the daemon options
/// that use them.
fn write_demo_files(
    dir: &Path,
    redis_url: &str,
    mock: &MockServer,
    plugins: &Path,
    window_s: u64,
) -> Result<Options> {
    let config_path = dir.join("llmq.toml");
    std::fs::write(
        &config_path,
        demo_config(redis_url, mock, plugins, window_s.max(1)),
    )?;
    let env_path = dir.join("keys.env");
    std::fs::write(
        &env_path,
        "FREE_API_KEY_1=sk-demo-free-key-one-0001\n\
         FREE_API_KEY_2=sk-demo-free-key-two-0002\n\
         FREE_API_KEY_3=sk-demo-free-key-bad-0003\n\
         FREE_API_KEY_4=sk-demo-free-key-broke-004\n\
         PAID_API_KEY_1=sk-ant-demo-paid-key-0001\n",
    )?;
    Ok(Options {
        config: Some(config_path),
        env_file: Some(env_path),
        ..Options::default()
    })
}

/// The per-key table: the daemon's view, with calls and 429s from the mock.
fn print_keys(snapshots: &[crate::pool::KeySnapshot], stats: &llmq_mock::Stats) {
    println!("\nper key (the daemon's view; calls and 429s from the mock provider):");
    println!(
        "{:<8} {:<6} {:<11} {:>6} {:>6} {:>5}  REASON",
        "KEY", "TIER", "STATUS", "CALLS", "OK", "429s"
    );
    for s in snapshots {
        let label = s.id.to_string();
        let ks = stats.keys.get(&label);
        let tier = if s.provider == "free" { "free" } else { "paid" };
        let status = match s.status {
            KeyStatus::Available => "available",
            KeyStatus::Cooling => "cooling",
            KeyStatus::Disabled => "disabled",
        };
        println!(
            "{:<8} {:<6} {:<11} {:>6} {:>6} {:>5}  {}",
            label,
            tier,
            status,
            ks.map(|k| k.calls).unwrap_or(0),
            s.stats.successes,
            ks.map(|k| k.rejected_429).unwrap_or(0),
            s.reason.as_deref().unwrap_or("")
        );
    }
}

async fn push_burst(
    conn: &mut redis::aio::MultiplexedConnection,
    tag: &str,
    n: usize,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    let mut pipe = redis::pipe();
    for i in 0..n {
        let id = format!("demo-{tag}-{i:04}");
        let job = serde_json::json!({
            "id": id,
            "messages": [{"role": "user", "content": format!("Demo question number {i}")}],
            "max_tokens": 32,
        });
        pipe.cmd("XADD")
            .arg("llmq:{jobs}:normal")
            .arg("*")
            .arg("job")
            .arg(job.to_string())
            .ignore();
        ids.push(id);
    }
    pipe.query_async::<()>(conn).await?;
    Ok(ids)
}

/// Prints progress until every id has a result; returns the results.
async fn watch(
    conn: &mut redis::aio::MultiplexedConnection,
    ids: &[String],
    mock: &MockServer,
    started: Instant,
) -> Result<Vec<JobResult>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let keys: Vec<String> = ids.iter().map(|id| format!("llmq:result:{id}")).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        let results: Vec<JobResult> = raw
            .iter()
            .flatten()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect();
        let mut by_tier: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &results {
            *by_tier
                .entry(r.tier.map(|t| t.as_str()).unwrap_or("failed"))
                .or_default() += 1;
        }
        let stats = mock.stats();
        println!(
            "  {:>5.1}s  done {:>4}/{}  free {:>4}  paid {:>4}  upstream 429s {}",
            started.elapsed().as_secs_f64(),
            results.len(),
            ids.len(),
            by_tier.get("free").copied().unwrap_or(0),
            by_tier.get("paid").copied().unwrap_or(0),
            stats.total_429
        );
        if results.len() == ids.len() || Instant::now() > deadline {
            return Ok(results);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn demo_config(redis_url: &str, mock: &MockServer, plugins: &Path, window_s: u64) -> String {
    let mut s = format!(
        "[redis]\nurl = \"{redis_url}\"\n\n[plugins]\ndir = \"{}\"\n\n[admin]\nlisten = \"\"\n\n\
         [routing]\nwait_for_cheaper = \"1s\"\n\n",
        plugins.display()
    );
    // The mock speaks HTTPS with a CA of its own: trust it for this run.
    if let Some(ca) = mock.ca_file() {
        let ca = toml::Value::String(ca.display().to_string());
        s.push_str(&format!("[upstream]\nca_file = {ca}\n\n"));
    }
    // Only the demo's own providers route: every catalog provider is off.
    for name in crate::config::catalog_providers()
        .unwrap_or_default()
        .keys()
    {
        s.push_str(&format!("[providers.{name}]\nenabled = false\n\n"));
    }
    s.push_str(&format!(
        "[providers.free]\nplugin = \"openai\"\nbase_url = \"{}\"\ntier = \"free\"\nkeys_env = \"FREE\"\n\
         limits = {{ rpm = {FREE_RPM} }}\nwindow = \"{window_s}s\"\n\n\
         [[providers.free.models]]\nid = \"llama-demo-8b\"\ncontext = 8192\nprice = {{ input = 0.0, output = 0.0 }}\n\n",
        mock.base_url(Protocol::OpenAi)
    ));
    s.push_str(&format!(
        "[providers.paid]\nplugin = \"anthropic\"\nbase_url = \"{}\"\ntier = \"paid\"\nkeys_env = \"PAID\"\n\
         limits = {{ rpm = 1000 }}\nwindow = \"{window_s}s\"\n\n\
         [[providers.paid.models]]\nid = \"claude-demo\"\ncontext = 200000\nprice = {{ input = 3.0, output = 15.0 }}\n",
        mock.base_url(Protocol::Anthropic)
    ));
    s
}

/// A temp dir holding only the first-party plugins, found in `given`, next
/// to the running binary, or in ./target/{release,debug}.
fn demo_plugins_dir(given: Option<&Path>) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = given.map(Path::to_path_buf).into_iter().collect();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        candidates.push(dir);
    }
    candidates.push(PathBuf::from("target/release"));
    candidates.push(PathBuf::from("target/debug"));
    for dir in candidates {
        let found: Vec<PathBuf> = ["openai", "anthropic", "gemini"]
            .iter()
            .map(|p| {
                dir.join(format!(
                    "{}llmq_plugin_{p}{}",
                    std::env::consts::DLL_PREFIX,
                    std::env::consts::DLL_SUFFIX
                ))
            })
            .filter(|p| p.is_file())
            .collect();
        if found.len() == 3 {
            let out =
                std::env::temp_dir().join(format!("llmq-demo-plugins-{}", std::process::id()));
            std::fs::create_dir_all(&out)?;
            for f in found {
                if let Some(name) = f.file_name() {
                    std::fs::copy(&f, out.join(name))?;
                }
            }
            return Ok(out);
        }
    }
    Err(Error::Other(
        "cannot find the plugin .so files: build them with `cargo build --release --workspace` \
         or pass --plugins-dir"
            .into(),
    ))
}
