//! The process under test: either the `llmq` daemon (config TOML + env file
//! written to a private temp dir) or the harness's own bare baseline loop
//! (`llmq-bench baseline-worker`, see [`crate::baseline`]). Both run as child
//! processes so their CPU time and memory are read the same way, from /proc.

use crate::artifacts::Daemon;
use crate::error::{BenchError, Result};
use crate::{procfs, queue};
use redis::aio::MultiplexedConnection;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which implementation consumes the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum System {
    Llmq,
    Baseline,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Llmq => "llmq",
            System::Baseline => "baseline loop",
        }
    }
}

/// The binaries a run can start.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The daemon, or why it could not be built.
    pub daemon: std::result::Result<Daemon, String>,
    /// The `llmq-bench` executable (for `baseline-worker`).
    pub bench_exe: PathBuf,
    /// `LLMQ_LOG` for the daemon; `None` leaves its default.
    pub daemon_log: Option<String>,
}

/// Per-key limits for the quota scenario (per compressed window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// Everything a worker needs to know.
#[derive(Debug, Clone)]
pub struct Setup {
    pub redis_url: String,
    /// The mock's OpenAI base URL (`http://…/openai/v1`).
    pub base_url: String,
    pub concurrency: usize,
    /// The API keys (secrets) the worker may use.
    pub keys: Vec<String>,
    /// Compressed rate window and per-key limits (llmq only); `None` = unlimited keys.
    pub quota: Option<(Duration, Vec<KeyLimits>)>,
    /// Cap of the results stream (kept above the job count of a run).
    pub results_maxlen: usize,
}

/// A running worker process, killed on drop.
pub struct Worker {
    pub system: System,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    pub spawned_at: Instant,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| BenchError::io("write", path, e))
}

/// A TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn limits_toml(l: KeyLimits) -> String {
    let mut parts = Vec::new();
    if let Some(r) = l.rpm {
        parts.push(format!("rpm = {r}"));
    }
    if let Some(t) = l.tpm {
        parts.push(format!("tpm = {t}"));
    }
    format!("{{ {} }}", parts.join(", "))
}

/// The env var holding quota key `i`.
fn quota_key_env(i: usize) -> String {
    format!("BENCH_QUOTA_KEY_{i}")
}

/// The daemon config: one free-tier provider `mock` on the OpenAI plugin.
pub fn llmq_config(setup: &Setup, plugins_dir: &Path) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "[redis]\nurl = {}\n", toml_str(&setup.redis_url));
    let _ = writeln!(
        t,
        "[queue]\nconcurrency = {}\nresults_maxlen = {}\n",
        setup.concurrency, setup.results_maxlen
    );
    let _ = writeln!(
        t,
        "[plugins]\ndir = {}\n",
        toml_str(&plugins_dir.to_string_lossy())
    );
    let _ = writeln!(t, "[admin]\nlisten = \"\"\n");
    let _ = writeln!(
        t,
        "[providers.mock]\nplugin = \"openai\"\nbase_url = {}\ntier = \"free\"",
        toml_str(&setup.base_url)
    );
    match &setup.quota {
        None => {
            let _ = writeln!(t, "keys_env = \"MOCK\"");
        }
        Some((window, _)) => {
            // Keys come from [[providers.mock.keys]] only; no env var has this prefix.
            let _ = writeln!(
                t,
                "keys_env = \"BENCHNOKEYS\"\nwindow = \"{}ms\"",
                window.as_millis()
            );
        }
    }
    let _ = writeln!(
        t,
        "\n[[providers.mock.models]]\nid = {}",
        toml_str(queue::MODEL)
    );
    if let Some((_, limits)) = &setup.quota {
        for (i, l) in limits.iter().enumerate() {
            let _ = writeln!(
                t,
                "\n[[providers.mock.keys]]\nkey_env = {}\ninstance = {i}\nlimits = {}",
                toml_str(&quota_key_env(i)),
                limits_toml(*l)
            );
        }
    }
    t
}

/// The daemon's env file: `MOCK_API_KEYS=k1,k2,…`, or one variable per quota key.
/// (A file, not the process env: 10,000 keys exceed the kernel's 128 KiB
/// limit on a single environment string.)
pub fn llmq_env_file(setup: &Setup) -> String {
    match &setup.quota {
        None => format!("MOCK_API_KEYS={}\n", setup.keys.join(",")),
        Some(_) => setup
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{}={k}\n", quota_key_env(i)))
            .collect(),
    }
}

impl Worker {
    /// Starts `system` against `setup`; returns once the process exists
    /// (use [`Worker::wait_ready`] to wait until it listens).
    pub fn spawn(system: System, bins: &Binaries, setup: &Setup) -> Result<Worker> {
        let dir = tempfile::tempdir().map_err(|e| BenchError::io("tempdir", "/tmp", e))?;
        let log = dir.path().join("worker.log");
        let mut cmd = match system {
            System::Llmq => {
                let daemon = bins.daemon.as_ref().map_err(|e| BenchError::Worker {
                    what: "llmq".into(),
                    reason: e.clone(),
                    log_tail: String::new(),
                })?;
                let config = dir.path().join("llmq.toml");
                let env_file = dir.path().join("keys.env");
                write(&config, &llmq_config(setup, &daemon.plugins_dir))?;
                write(&env_file, &llmq_env_file(setup))?;
                let mut cmd = Command::new(&daemon.llmq_bin);
                cmd.arg("--config")
                    .arg(&config)
                    .arg("--env-file")
                    .arg(&env_file)
                    .arg("serve");
                if let Some(level) = &bins.daemon_log {
                    cmd.env("LLMQ_LOG", level);
                }
                cmd
            }
            System::Baseline => {
                let keys_file = dir.path().join("keys.txt");
                write(&keys_file, &setup.keys.join("\n"))?;
                let mut cmd = Command::new(&bins.bench_exe);
                cmd.arg("baseline-worker")
                    .arg("--redis")
                    .arg(&setup.redis_url)
                    .arg("--base-url")
                    .arg(&setup.base_url)
                    .arg("--concurrency")
                    .arg(setup.concurrency.to_string())
                    .arg("--keys-file")
                    .arg(&keys_file)
                    .arg("--results-maxlen")
                    .arg(setup.results_maxlen.to_string());
                cmd
            }
        };
        // The daemon reads ./.env and LLMQ_* / MOCK_* variables: none may
        // leak in from the harness's own environment.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            let ours =
                k.starts_with("LLMQ") || k.starts_with("MOCK") || k.starts_with("BENCH_QUOTA");
            let chosen_log = system == System::Llmq && k == "LLMQ_LOG" && bins.daemon_log.is_some();
            if ours && !chosen_log {
                cmd.env_remove(k.as_ref());
            }
        }
        let log_file =
            std::fs::File::create(&log).map_err(|e| BenchError::io("create log", &log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| BenchError::io("clone log handle", &log, e))?;
        let child = cmd
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| BenchError::Worker {
                what: system.name().into(),
                reason: format!("cannot start: {e}"),
                log_tail: String::new(),
            })?;
        Ok(Worker {
            system,
            child,
            log,
            _dir: dir,
            spawned_at: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cpu_us(&self) -> Result<u64> {
        procfs::cpu_us(self.pid())
    }

    pub fn rss_kib(&self) -> Result<u64> {
        procfs::rss_kib(self.pid())
    }

    /// The last lines of the worker's stdout/stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        if all.is_empty() {
            return "(the process wrote nothing)".into();
        }
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// An error naming this worker, with its log tail.
    pub fn fail(&self, reason: impl Into<String>) -> BenchError {
        BenchError::Worker {
            what: self.system.name().into(),
            reason: reason.into(),
            log_tail: self.log_tail(30),
        }
    }

    /// Errors out if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.fail(format!("exited early with {status}"))),
            Err(e) => Err(self.fail(format!("cannot poll the process: {e}"))),
        }
    }

    /// Waits until the worker reads the lanes (see [`queue::consumer_ready`]).
    pub async fn wait_ready(
        &mut self,
        conn: &mut MultiplexedConnection,
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if queue::consumer_ready(conn).await? {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(self.fail(format!(
                    "never started reading {} (no XREADGROUP) within {timeout:?}",
                    queue::LANE
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(quota: Option<(Duration, Vec<KeyLimits>)>) -> Setup {
        Setup {
            redis_url: "redis://127.0.0.1:1234".into(),
            base_url: "http://127.0.0.1:5/openai/v1".into(),
            concurrency: 64,
            keys: vec![
                "sk-bench-000000000001".into(),
                "sk-bench-000000000002".into(),
            ],
            quota,
            results_maxlen: 1000,
        }
    }

    #[test]
    fn plain_config_names_the_mock_provider_and_reads_mock_keys() {
        let s = setup(None);
        let t = llmq_config(&s, Path::new("/p"));
        assert!(t.contains("url = \"redis://127.0.0.1:1234\""));
        assert!(t.contains("concurrency = 64"));
        assert!(t.contains("listen = \"\""));
        assert!(t.contains("keys_env = \"MOCK\""));
        assert!(t.contains("id = \"mock-model\""));
        assert!(
            !t.contains("sk-bench"),
            "secrets stay out of the config file"
        );
        assert_eq!(
            llmq_env_file(&s),
            "MOCK_API_KEYS=sk-bench-000000000001,sk-bench-000000000002\n"
        );
    }

    #[test]
    fn quota_config_gives_each_key_its_limits_and_window() {
        let limits = vec![
            KeyLimits {
                rpm: Some(5),
                tpm: None,
            },
            KeyLimits {
                rpm: Some(3),
                tpm: Some(200),
            },
        ];
        let s = setup(Some((Duration::from_millis(300), limits)));
        let t = llmq_config(&s, Path::new("/p"));
        assert!(t.contains("window = \"300ms\""));
        assert!(t.contains(
            "key_env = \"BENCH_QUOTA_KEY_1\"\ninstance = 1\nlimits = { rpm = 3, tpm = 200 }"
        ));
        assert!(t.contains("limits = { rpm = 5 }"));
        assert!(llmq_env_file(&s).contains("BENCH_QUOTA_KEY_0=sk-bench-000000000001\n"));
    }
}
