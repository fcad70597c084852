//! A `llmq serve` child process with its own config and env, for end-to-end
//! tests: started with a clean environment (no stray `*_API_KEY` of the
//! machine leaks in), stopped with SIGTERM or killed with SIGKILL.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A running daemon process. Killed on drop.
pub struct DaemonProcess {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl std::fmt::Debug for DaemonProcess {
    // Not the log lines: they can be long, and a test may print this.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonProcess")
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// What to start the daemon with.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The `llmq` binary (`env!("CARGO_BIN_EXE_llmq")` in the daemon's tests).
    pub bin: PathBuf,
    /// The config file's TOML.
    pub config: String,
    /// Environment variables (API keys, LLMQ_*), on top of PATH/HOME only.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
}

impl DaemonSpec {
    pub fn new(bin: impl Into<PathBuf>, config: impl Into<String>) -> DaemonSpec {
        DaemonSpec {
            bin: bin.into(),
            config: config.into(),
            env: vec![],
            args: vec![],
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> DaemonSpec {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

impl DaemonProcess {
    /// Writes the config into a temp dir and starts `llmq serve`.
    pub fn start(spec: &DaemonSpec) -> DaemonProcess {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Self::start_in(spec, dir)
    }

    /// Starts again with the same dir (and config file) after a kill.
    pub fn restart(&mut self, spec: &DaemonSpec) {
        self.kill();
        let dir = std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
        );
        let fresh = Self::start_in(spec, dir);
        *self = fresh;
    }

    fn start_in(spec: &DaemonSpec, dir: tempfile::TempDir) -> DaemonProcess {
        let cfg = dir.path().join("llmq.toml");
        std::fs::write(&cfg, &spec.config).unwrap_or_else(|e| panic!("write config: {e}"));
        let env_file = dir.path().join("empty.env");
        if !env_file.exists() {
            std::fs::write(&env_file, "").unwrap_or_else(|e| panic!("write env: {e}"));
        }
        let mut cmd = Command::new(&spec.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env(
                "LLMQ_LOG",
                std::env::var("LLMQ_LOG").unwrap_or_else(|_| "info".into()),
            )
            .current_dir(dir.path())
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--env-file")
            .arg(&env_file)
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", spec.bin.display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if std::env::var("LLMQ_TEST_ECHO").is_ok() {
                        eprintln!("[llmq] {line}");
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push(line);
                    }
                }
            });
        }
        DaemonProcess {
            child: Some(child),
            log,
            dir,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("llmq.toml")
    }

    pub fn env_file(&self) -> PathBuf {
        self.dir.path().join("empty.env")
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends a signal (`"TERM"`, `"HUP"`, `"KILL"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal("TERM");
        let mut c = self.child.take()?;
        c.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `pairs` as a `.env` file at `path`.
pub fn write_env_file(path: &Path, pairs: &[(&str, &str)]) {
    let text: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
}
