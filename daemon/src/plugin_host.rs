//! The plugin host: loads every plugin in the plugins dir, hands out the one
//! a provider names, and runs its calls off the async workers with a time
//! limit. The loading and calling itself is `llmq_sdk::host` (the only code
//! with `unsafe`); this module owns the registry and the call guard.
//!
//! **Loading.** A bad plugin file is refused with an error naming the file
//! and the reason. `serve` loads leniently: a refused file is logged and
//! listed ([`PluginHost::refused`]), every plugin that loaded serves, and a
//! provider whose plugin is not loaded is disabled with that reason
//! ([`PluginHost::unavailable`]). [`PluginHost::load_dir`] is the strict
//! form (any bad file is an error).
//!
//! **Reload.** [`PluginHost::reload`] reuses every file it has seen before
//! (same canonical path, size and mtime), loaded or refused, and loads only
//! new ones: libraries are never unloaded, so loading a file again would
//! only leak. A loaded file that changed on disk keeps its loaded version
//! until a restart (the dynamic loader hands back the library it has).
//!
//! **Calls.** `prepare` and `parse` run on a small pool of plain threads
//! (never on a tokio worker) and are awaited with `[plugins] call_timeout`.
//! A call over the limit fails its job with an error naming the plugin and
//! is counted (`llmq_plugin_timeouts_total`). A plugin call cannot be
//! killed, only abandoned: its thread stays busy until the plugin returns,
//! and the pool starts another thread for the next call. A plugin whose
//! calls time out `quarantine_after` times within [`QUARANTINE_WINDOW`] is
//! quarantined until the next reload: every call to it fails at once, and
//! its providers show as disabled with that reason.

use crate::error::{Error, Result};
use llmq_sdk::host::{plugin_files, CallError, LoadError, LoadedPlugin};
use llmq_sdk::{HttpRequest, HttpResponse, Parsed, PrepareInput};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Timeouts are counted over this window for quarantine.
pub(crate) const QUARANTINE_WINDOW: Duration = Duration::from_secs(600);
/// Plugin calls that timed out, by plugin and call.
pub(crate) const PLUGIN_TIMEOUTS_TOTAL: &str = "llmq_plugin_timeouts_total";
/// Plugins quarantined (1) by name, until the next reload.
pub(crate) const PLUGIN_QUARANTINED: &str = "llmq_plugin_quarantined";

/// Loaded plugins by name.
#[derive(Debug, Clone, Default)]
pub struct PluginHost {
    dir: PathBuf,
    plugins: BTreeMap<String, LoadedPlugin>,
    refused: Vec<String>,
    /// Every file seen, by canonical path: what it gave, and its identity
    /// then, so a reload can reuse it.
    seen: BTreeMap<PathBuf, Seen>,
    guard: Arc<CallGuard>,
}

#[derive(Debug, Clone)]
struct Seen {
    id: FileId,
    /// The plugin's name when it loaded, else the refusal.
    outcome: std::result::Result<String, String>,
}

/// What identifies a file's content for reuse: its size and mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    len: u64,
    modified: Option<SystemTime>,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// What `llmq plugins` shows for one plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub protocols: Vec<String>,
    pub file: String,
    pub build: String,
}

/// The limits on plugin calls (`[plugins]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// How long one call may run.
    pub timeout: Duration,
    /// Timeouts within [`QUARANTINE_WINDOW`] that quarantine a plugin; 0: never.
    pub quarantine_after: u32,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits::of(&crate::config::PluginsConfig::default())
    }
}

impl CallLimits {
    pub(crate) fn of(cfg: &crate::config::PluginsConfig) -> CallLimits {
        CallLimits {
            timeout: cfg.call_timeout,
            quarantine_after: cfg.quarantine_after,
        }
    }
}

/// Why a guarded plugin call failed. Each names the plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginCallError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("plugin {plugin} did not return from {call} within {limit:?} (call_timeout); the call was abandoned")]
    TimedOut {
        plugin: String,
        call: &'static str,
        limit: Duration,
    },
    #[error("plugin {plugin} is quarantined until the next reload: {reason}")]
    Quarantined { plugin: String, reason: String },
    #[error("plugin {plugin}: the {call} call was lost (its thread ended without an answer)")]
    Lost { plugin: String, call: &'static str },
    /// No plugin of that name is loaded (a route names it, its file was refused).
    #[error("no plugin named {plugin:?} is loaded (plugins dir {dir})")]
    NotLoaded { plugin: String, dir: PathBuf },
}

/// Time limits and quarantine, shared by the handles of one host.
#[derive(Debug, Default)]
struct CallGuard {
    limits: CallLimits,
    /// Fast path: no plugin has timed out yet.
    troubled: AtomicBool,
    health: Mutex<HashMap<String, Health>>,
}

#[derive(Debug, Default)]
struct Health {
    timeouts: VecDeque<Instant>,
    quarantined: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CallGuard {
    fn new(limits: CallLimits) -> CallGuard {
        CallGuard {
            limits,
            ..CallGuard::default()
        }
    }

    fn quarantined(&self, plugin: &str) -> Option<String> {
        if !self.troubled.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.health)
            .get(plugin)
            .and_then(|h| h.quarantined.clone())
    }

    /// Counts a timeout at `now`; true when it quarantined the plugin.
    fn timed_out(&self, plugin: &str, call: &'static str, now: Instant) -> bool {
        self.troubled.store(true, Ordering::Relaxed);
        metrics::counter!(PLUGIN_TIMEOUTS_TOTAL, "plugin" => plugin.to_string(), "call" => call)
            .increment(1);
        let mut health = lock(&self.health);
        let h = health.entry(plugin.to_string()).or_default();
        h.timeouts.push_back(now);
        while h
            .timeouts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > QUARANTINE_WINDOW)
        {
            h.timeouts.pop_front();
        }
        let n = self.limits.quarantine_after;
        if n == 0 || h.quarantined.is_some() || h.timeouts.len() < n as usize {
            return false;
        }
        h.quarantined = Some(format!(
            "{n} calls timed out (call_timeout {:?}) within {} minutes",
            self.limits.timeout,
            QUARANTINE_WINDOW.as_secs() / 60
        ));
        metrics::gauge!(PLUGIN_QUARANTINED, "plugin" => plugin.to_string()).set(1.0);
        true
    }
}

/// One plugin, callable from async code with the host's limits. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PluginHandle {
    plugin: LoadedPlugin,
    guard: Arc<CallGuard>,
}

impl PluginHandle {
    /// `prepare` on a plugin thread, within the call time limit.
    pub async fn prepare(
        &self,
        input: &PrepareInput,
    ) -> std::result::Result<HttpRequest, PluginCallError> {
        let json = serde_json::to_vec(input)
            .map_err(|e| self.plugin.encode_error("prepare", e.to_string()))?;
        self.run("prepare", move |p| p.prepare_bytes(&json)).await
    }

    /// `parse` on a plugin thread, within the call time limit.
    pub async fn parse(
        &self,
        response: &HttpResponse,
    ) -> std::result::Result<Parsed, PluginCallError> {
        let json = serde_json::to_vec(response)
            .map_err(|e| self.plugin.encode_error("parse", e.to_string()))?;
        self.run("parse", move |p| p.parse_bytes(&json)).await
    }

    async fn run<T: Send + 'static>(
        &self,
        call: &'static str,
        f: impl FnOnce(&LoadedPlugin) -> std::result::Result<T, CallError> + Send + 'static,
    ) -> std::result::Result<T, PluginCallError> {
        let name = self.plugin.name();
        if let Some(reason) = self.guard.quarantined(name) {
            return Err(PluginCallError::Quarantined {
                plugin: name.to_string(),
                reason,
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let plugin = self.plugin.clone();
        workers().submit(Box::new(move || {
            let _ = tx.send(f(&plugin));
        }));
        let limit = self.guard.limits.timeout;
        let started = tokio::time::Instant::now();
        let mut rx = rx;
        // A call answers in microseconds; one that has waited STALLED may
        // sit behind threads that hang: let the pool start another.
        let answer = match tokio::time::timeout(STALLED.min(limit), &mut rx).await {
            Ok(answer) => Ok(answer),
            Err(_) => {
                workers().nudge();
                tokio::time::timeout_at(started + limit, rx).await
            }
        };
        match answer {
            Ok(Ok(result)) => result.map_err(PluginCallError::from),
            Ok(Err(_)) => Err(PluginCallError::Lost {
                plugin: name.to_string(),
                call,
            }),
            Err(_) => {
                let quarantined = self.guard.timed_out(name, call, Instant::now());
                tracing::warn!(plugin = %name, call, limit = ?limit, "plugin call timed out; its thread is abandoned");
                if quarantined {
                    tracing::error!(plugin = %name, "plugin quarantined until the next reload: its calls keep timing out; its providers are disabled");
                }
                Err(PluginCallError::TimedOut {
                    plugin: name.to_string(),
                    call,
                    limit,
                })
            }
        }
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// The threads plugin calls run on: plain OS threads, so a call that never
/// returns holds only its own thread (not a tokio worker, and not the
/// process at exit).
///
/// The pool keeps about one thread per core busy: a call is a few
/// microseconds of JSON, and more threads than cores only add context
/// switches (an unbounded pool grew to 190 threads and cost ~45 µs per job
/// in the burn-down benchmark). A thread whose call has run longer than
/// [`STALLED`] does not count against that bound, so a plugin that hangs or
/// loops holds only its own thread: the next call (or a caller that waited
/// [`STALLED`] for its answer, [`Workers::nudge`]) starts another. Idle
/// threads beyond the first end after a minute without work.
struct Workers {
    tx: mpsc::Sender<Task>,
    rx: Mutex<mpsc::Receiver<Task>>,
    counts: Mutex<Counts>,
    /// Threads that may run calls at once, stalled ones not counted.
    floor: usize,
}

#[derive(Default)]
struct Counts {
    /// Threads waiting for work.
    idle: usize,
    /// Tasks sent and not yet taken by a thread.
    queued: usize,
    total: usize,
    /// When each busy thread's current call began, by thread number.
    busy: HashMap<u64, Instant>,
    next_id: u64,
}

const IDLE_EXIT: Duration = Duration::from_secs(60);
/// A call running this long no longer counts as one of the pool's busy
/// threads; well above a plugin call's normal microseconds.
const STALLED: Duration = Duration::from_millis(20);

fn workers() -> &'static Workers {
    static WORKERS: OnceLock<Workers> = OnceLock::new();
    WORKERS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Workers::new(cores.max(2))
    })
}

impl Workers {
    fn new(floor: usize) -> Workers {
        let (tx, rx) = mpsc::channel();
        Workers {
            tx,
            rx: Mutex::new(rx),
            counts: Mutex::new(Counts::default()),
            floor,
        }
    }

    fn submit(&'static self, task: Task) {
        // Counted (and a thread decided on) under one lock, before the send,
        // so the thread that takes the task always finds it counted.
        let spawn = self.spawn_needed(Instant::now(), 1);
        // A send fails only when every receiver is gone, which this static
        // never is.
        let _ = self.tx.send(task);
        self.spawn(spawn);
    }

    /// Starts a thread when more tasks wait than threads are idle and fewer
    /// than `floor` threads are idle or running a call that has not stalled.
    fn nudge(&'static self) {
        self.nudge_at(Instant::now());
    }

    fn nudge_at(&'static self, now: Instant) {
        let spawn = self.spawn_needed(now, 0);
        self.spawn(spawn);
    }

    /// Counts `sent` more queued tasks and reserves a new thread's number
    /// when one should start.
    fn spawn_needed(&self, now: Instant, sent: usize) -> Option<u64> {
        let mut c = lock(&self.counts);
        c.queued += sent;
        let stalled = c
            .busy
            .values()
            .filter(|&&t| now.saturating_duration_since(t) >= STALLED)
            .count();
        if c.queued > c.idle && c.total - stalled < self.floor {
            c.total += 1;
            c.next_id += 1;
            Some(c.next_id)
        } else {
            None
        }
    }

    fn spawn(&'static self, spawn: Option<u64>) {
        if let Some(id) = spawn {
            let started = std::thread::Builder::new()
                .name("llmq-plugin".into())
                .spawn(move || self.work(id));
            if let Err(e) = started {
                // The task waits for a busy thread to finish.
                lock(&self.counts).total -= 1;
                tracing::error!(error = %e, "cannot start a plugin thread");
            }
        }
    }

    fn work(&'static self, id: u64) {
        lock(&self.counts).idle += 1;
        loop {
            let next = lock(&self.rx).recv_timeout(IDLE_EXIT);
            match next {
                Ok(task) => {
                    {
                        let mut c = lock(&self.counts);
                        c.idle -= 1;
                        c.queued -= 1;
                        c.busy.insert(id, Instant::now());
                    }
                    // Host code around the call could panic; the thread lives on
                    // (the caller sees its answer channel close).
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
                    let mut c = lock(&self.counts);
                    c.busy.remove(&id);
                    c.idle += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let mut c = lock(&self.counts);
                    if c.total > 1 && c.idle > c.queued {
                        c.idle -= 1;
                        c.total -= 1;
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    #[cfg(test)]
    fn threads(&self) -> usize {
        lock(&self.counts).total
    }
}

impl PluginHost {
    /// Loads every plugin in `dir`; any bad file is an error naming it.
    pub fn load_dir(dir: &Path) -> Result<PluginHost> {
        let mut host = Self::empty(dir, CallLimits::default());
        for file in Self::files(dir)? {
            let p = LoadedPlugin::load(&file)?;
            host.insert(p)?;
        }
        Ok(host)
    }

    /// Loads what it can; refused files are kept as messages.
    pub fn load_dir_lenient(dir: &Path) -> Result<PluginHost> {
        PluginHost::default().reload(dir, CallLimits::default())
    }

    /// The host for `dir` after a reload: every file this host has seen
    /// unchanged is reused (loaded or refused), only new or changed files
    /// are loaded. Quarantines are lifted. Loads leniently.
    pub fn reload(&self, dir: &Path, limits: CallLimits) -> Result<PluginHost> {
        let mut host = Self::empty(dir, limits);
        let files = Self::files(dir)?;
        for name in self.plugins.keys() {
            if self.guard.quarantined(name).is_some() {
                metrics::gauge!(PLUGIN_QUARANTINED, "plugin" => name.clone()).set(0.0);
            }
        }
        for file in files {
            let canonical = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            let id = FileId::of(&canonical);
            let before = self.seen.get(&canonical);
            let unchanged = before.is_some_and(|s| Some(&s.id) == id.as_ref());
            // A plugin this host loaded from this file.
            let loaded = before
                .and_then(|s| s.outcome.as_ref().ok())
                .and_then(|name| self.plugins.get(name))
                .filter(|p| p.path() == file.as_path() || p.path() == canonical.as_path());
            let (outcome, fresh) = match (loaded, before) {
                (Some(p), _) => {
                    if !unchanged {
                        // The dynamic loader would hand back the library it has.
                        tracing::warn!(file = %file.display(), plugin = %p.name(), "plugin file changed on disk; the loaded version stays until a restart");
                    }
                    (Ok(p.clone()), false)
                }
                (
                    None,
                    Some(Seen {
                        outcome: Err(reason),
                        ..
                    }),
                ) if unchanged => (Err(reason.clone()), false),
                _ => (Self::load_one(&file), true),
            };
            let outcome = outcome.and_then(|p| {
                let name = p.name().to_string();
                host.add(p, fresh).map(|()| name).map_err(|e| e.to_string())
            });
            if let Err(e) = &outcome {
                if fresh {
                    tracing::warn!(error = %e, "plugin refused");
                }
                host.refused.push(e.clone());
            }
            if let Some(id) = id {
                host.seen.insert(canonical, Seen { id, outcome });
            }
        }
        Ok(host)
    }

    fn load_one(file: &Path) -> std::result::Result<LoadedPlugin, String> {
        LoadedPlugin::load(file).map_err(|e| e.to_string())
    }

    fn empty(dir: &Path, limits: CallLimits) -> PluginHost {
        PluginHost {
            dir: dir.to_path_buf(),
            guard: Arc::new(CallGuard::new(limits)),
            ..PluginHost::default()
        }
    }

    fn files(dir: &Path) -> Result<Vec<PathBuf>> {
        plugin_files(dir).map_err(|e| Error::Other(format!("plugins dir {}: {e}", dir.display())))
    }

    /// Adds one loaded plugin (tests and embedders).
    pub(crate) fn insert(&mut self, plugin: LoadedPlugin) -> Result<()> {
        self.add(plugin, true)
    }

    fn add(&mut self, plugin: LoadedPlugin, log: bool) -> Result<()> {
        let name = plugin.name().to_string();
        if let Some(existing) = self.plugins.get(&name) {
            return Err(Error::PluginLoad(LoadError::Manifest {
                path: plugin.path().to_path_buf(),
                reason: format!(
                    "plugin name {name:?} is already served by {}",
                    existing.path().display()
                ),
            }));
        }
        if log {
            tracing::info!(plugin = %name, version = %plugin.manifest().version, file = %plugin.path().display(), "plugin loaded");
        }
        self.plugins.insert(name, plugin);
        Ok(())
    }

    pub(crate) fn get(&self, name: &str) -> Result<&LoadedPlugin> {
        self.plugins.get(name).ok_or_else(|| Error::NoPlugin {
            name: name.to_string(),
            dir: self.dir.clone(),
        })
    }

    /// The plugin as the executor calls it: off the async workers, within
    /// the call time limit.
    pub fn handle(&self, name: &str) -> std::result::Result<PluginHandle, PluginCallError> {
        let plugin = self
            .plugins
            .get(name)
            .ok_or_else(|| PluginCallError::NotLoaded {
                plugin: name.to_string(),
                dir: self.dir.clone(),
            })?;
        Ok(PluginHandle {
            plugin: plugin.clone(),
            guard: self.guard.clone(),
        })
    }

    /// Why the plugin `name` cannot serve, or `None` when it can: not
    /// loaded (naming the refused files), or quarantined.
    pub fn unavailable(&self, name: &str) -> Option<String> {
        if self.plugins.contains_key(name) {
            return self
                .guard
                .quarantined(name)
                .map(|r| format!("plugin {name:?} is quarantined until the next reload: {r}"));
        }
        let mut why = format!(
            "plugin {name:?} is not loaded from the plugins dir {}",
            self.dir.display()
        );
        if !self.refused.is_empty() {
            why.push_str(&format!("; refused: {}", self.refused.join("; ")));
        }
        Some(why)
    }

    /// Every refused file and every quarantined plugin, one message each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.refused.clone();
        out.extend(self.plugins.keys().filter_map(|name| {
            self.guard
                .quarantined(name)
                .map(|r| format!("plugin {name:?} is quarantined until the next reload: {r}"))
        }));
        out
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
    }

    pub(crate) fn len(&self) -> usize {
        self.plugins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Messages for files that were refused by lenient loading.
    pub fn refused(&self) -> &[String] {
        &self.refused
    }

    pub fn infos(&self) -> Vec<PluginInfo> {
        self.plugins
            .values()
            .map(|p| PluginInfo {
                name: p.name().to_string(),
                version: p.manifest().version.clone(),
                protocols: p.manifest().protocols.clone(),
                file: p.path().display().to_string(),
                build: p.build_info().to_string(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_timeouts_within_the_window_quarantine_a_plugin() {
        let guard = CallGuard::new(CallLimits {
            timeout: Duration::from_secs(2),
            quarantine_after: 3,
        });
        let t0 = Instant::now();
        assert!(!guard.timed_out("p", "parse", t0));
        assert!(!guard.timed_out("p", "parse", t0 + Duration::from_secs(60)));
        // The first one left the window: still two.
        let late = t0 + QUARANTINE_WINDOW + Duration::from_secs(30);
        assert!(!guard.timed_out("p", "parse", late));
        assert_eq!(guard.quarantined("p"), None);
        assert!(guard.timed_out("p", "prepare", late + Duration::from_secs(1)));
        let why = guard.quarantined("p").expect("quarantined");
        assert!(why.contains("3 calls timed out"), "{why}");
        assert_eq!(guard.quarantined("other"), None);
        // Counted once.
        assert!(!guard.timed_out("p", "parse", late + Duration::from_secs(2)));
    }

    #[test]
    fn quarantine_after_zero_never_quarantines() {
        let guard = CallGuard::new(CallLimits {
            timeout: Duration::from_secs(1),
            quarantine_after: 0,
        });
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(!guard.timed_out("p", "parse", t0 + Duration::from_secs(i)));
        }
        assert_eq!(guard.quarantined("p"), None);
    }

    #[test]
    fn a_missing_plugin_is_unavailable_naming_the_refused_files() {
        let mut host = PluginHost::empty(Path::new("/plugins"), CallLimits::default());
        host.refused
            .push("plugin /plugins/libx.so: ABI version 999 is not supported".into());
        let why = host.unavailable("openai").expect("unavailable");
        assert!(why.contains("\"openai\" is not loaded"), "{why}");
        assert!(why.contains("/plugins/libx.so"), "{why}");
    }

    /// A pool of its own (the global one is shared by every test).
    fn pool(floor: usize) -> &'static Workers {
        Box::leak(Box::new(Workers::new(floor)))
    }

    #[test]
    fn quick_calls_keep_the_pool_at_its_floor() {
        // The unbounded pool started a thread whenever none was idle: a
        // burst of calls grew it to hundreds of threads.
        let w = pool(2);
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..2_000 {
            let tx = tx.clone();
            w.submit(Box::new(move || {
                let _ = tx.send(());
            }));
        }
        for _ in 0..2_000 {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("every call ran");
        }
        // Slack for a thread the scheduler kept off the CPU past STALLED.
        assert!(w.threads() <= 2 + 4, "{} threads", w.threads());
    }

    #[test]
    fn a_stalled_call_does_not_hold_back_the_next() {
        let w = pool(1);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        w.submit(Box::new(move || {
            let _ = started_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(10));
        }));
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the first call started");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        w.submit(Box::new(move || {
            let _ = done_tx.send(());
        }));
        // The one thread is busy with a call that has not stalled: the
        // second call waits for it.
        assert_eq!(w.threads(), 1);
        // Once that call has run for STALLED, a nudge starts another thread
        // and the second call runs while the first still hangs.
        w.nudge_at(Instant::now() + STALLED);
        assert_eq!(w.threads(), 2);
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the second call ran beside the stalled one");
        let _ = release_tx.send(());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn plugin_threads_run_tasks_and_grow_when_busy() {
        // Two tasks where one blocks until the other ran: needs two threads.
        let (a_tx, a_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        workers().submit(Box::new(move || {
            let _ = a_rx.recv_timeout(Duration::from_secs(10));
            let _ = done_tx.send(());
        }));
        workers().submit(Box::new(move || {
            let _ = a_tx.send(());
        }));
        tokio::time::timeout(Duration::from_secs(10), done_rx)
            .await
            .expect("the second task ran on another thread")
            .expect("answered");
    }
}
