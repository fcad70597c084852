//! `llmq serve`: wires the modules into a running daemon.
//!
//! Start-up order: config → env/keys → plugins → key pool → key state
//! restored from Redis (keystore) → routes → executor → queue → admin API →
//! READY. Then it waits for signals: SIGTERM/SIGINT drain and stop, SIGHUP
//! reloads keys and config without dropping a job (jobs in flight keep the
//! runtime they started with). While it runs, the keystore writes key state
//! changes at once and flushes counters every second; after the drain it
//! flushes them once more. Each finished job is logged once (id, lane,
//! route, key id — never a key).

use crate::budget::Budgets;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::executor::{Executor, ExecutorHandler, Runtime};
use crate::job::Job;
use crate::keys::{load_keys, EnvSource, KeyRing};
use crate::keystore::KeyStore;
use crate::plugin_host::{CallLimits, PluginHost};
use crate::pool::KeyPool;
use crate::queue::{Disposition, JobContext, JobHandler, Queue};
use crate::router::RouteTable;
use crate::upstream::Upstream;
use futures::future::{BoxFuture, FutureExt};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the daemon's settings come from, and command-line overrides.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    pub config: Option<PathBuf>,
    pub env_file: Option<PathBuf>,
    pub redis_url: Option<String>,
    pub plugins_dir: Option<PathBuf>,
    pub admin_listen: Option<String>,
}

/// Config, keys and the env they came from.
pub struct Settings {
    pub config: Config,
    pub env: EnvSource,
    pub ring: KeyRing,
}

impl Options {
    /// Loads the config with the command-line overrides, without keys.
    pub(crate) fn load_config_only(&self) -> Result<Config> {
        let mut config = crate::config::load(self.config.as_deref())?;
        self.apply(&mut config);
        Ok(config)
    }

    fn apply(&self, config: &mut Config) {
        if let Some(url) = &self.redis_url {
            config.redis.url = url.clone();
        }
        if let Some(dir) = &self.plugins_dir {
            config.plugins.dir = dir.display().to_string();
        }
        if let Some(listen) = &self.admin_listen {
            config.admin.listen = listen.clone();
        }
    }

    /// Loads config (with overrides), the env and the keys. Fails fast with
    /// the file and field on bad config.
    pub(crate) fn load(&self) -> Result<Settings> {
        let config = self.load_config_only()?;
        let env_file = self
            .env_file
            .clone()
            .or_else(|| config.keys.env_file.as_ref().map(PathBuf::from));
        let env = EnvSource::from_process_and_file(env_file.as_deref())?;
        let ring = load_keys(&config.providers, &env)?;
        Ok(Settings { config, env, ring })
    }
}

/// Builds the routes, budgets and runtime for a config and key ring, and
/// loads each provider's spend of the day into the budgets.
pub fn build_runtime(
    settings: &Settings,
    pool: Arc<KeyPool>,
    plugins: Arc<PluginHost>,
    clock: &SharedClock,
) -> Result<Runtime> {
    let runtime = plan_runtime(settings, pool, plugins);
    load_spend(&runtime, clock);
    Ok(runtime)
}

/// The routes and budgets for a config, key ring and plugins; touches
/// nothing shared (a reload builds this before it changes anything). A
/// provider whose plugin is not loaded (or is quarantined) is not routed
/// to: it is disabled with that reason (`/v1/keys`, `/readyz`).
fn plan_runtime(settings: &Settings, pool: Arc<KeyPool>, plugins: Arc<PluginHost>) -> Runtime {
    let config = &settings.config;
    let ring = &settings.ring;
    let plugin_ok = |provider: &str| {
        config
            .providers
            .get(provider)
            .is_some_and(|p| plugins.unavailable(&p.plugin).is_none())
    };
    let router = RouteTable::new(config, |p| !ring.for_provider(p).is_empty() && plugin_ok(p));
    for (name, p) in &config.providers {
        if ring.for_provider(name).is_empty() {
            continue;
        }
        if let Some(why) = plugins.unavailable(&p.plugin) {
            tracing::error!(provider = %name, reason = %why, "provider disabled: its plugin cannot serve");
        }
    }
    Runtime {
        config: Arc::new(config.clone()),
        router: Arc::new(router),
        pool,
        plugins,
        budgets: Arc::new(Budgets::for_providers(&config.providers)),
        global: None,
    }
}

/// Loads each provider's spend of the day (from the pool) into the budgets.
fn load_spend(runtime: &Runtime, clock: &SharedClock) {
    let now = clock.unix_ms();
    for (provider, _, _) in runtime.budgets.snapshot(now) {
        runtime
            .budgets
            .load_spent(&provider, runtime.pool.spend_today(&provider), now);
    }
}

/// A daemon that has started and is serving; created by [`start`].
pub(crate) struct Daemon {
    pub executor: Arc<Executor>,
    pub pool: Arc<KeyPool>,
    pub queue: Queue,
    pub settings: Settings,
    pub clock: SharedClock,
    /// Key states and counters in Redis (restored at start, flushed while
    /// running and once more after the drain).
    pub keystore: Arc<KeyStore>,
    /// The keystore's state was restored at start (else [`Daemon::run`]
    /// restores it before taking any job).
    restored: bool,
    /// The admin API's address and token, validated at start.
    admin: Option<AdminEndpoint>,
}

/// How long start-up waits for Redis to restore key state before it goes
/// on and lets [`Daemon::run`] retry (jobs wait for that restore).
const RESTORE_AT_START: Duration = Duration::from_secs(2);
/// How long the final flush of key counters may take after the drain.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// The HTTP client for `[upstream]` (TLS roots, `ca_file`, proxy): a setup
/// that cannot work fails at start, as `check-config` does.
pub fn upstream_client(config: &Config, file: &str) -> Result<Upstream> {
    use crate::upstream::SetupError;
    let upstream = Upstream::new(&config.upstream).map_err(|e| match e {
        SetupError::CaFile(e) => Error::config(file, "upstream.ca_file", e.to_string()),
        SetupError::Proxy(e) => Error::config(file, "upstream.proxy", e),
        SetupError::NoRoots(e) => Error::config("environment", "SSL_CERT_FILE/SSL_CERT_DIR", e),
        other => Error::Other(format!("upstream: {other}")),
    })?;
    tracing::info!(roots = %upstream.roots(), "upstream TLS roots");
    Ok(upstream)
}

/// Starts everything but the queue loop (so callers can reach the parts).
pub(crate) async fn start(opts: &Options) -> Result<Daemon> {
    let settings = opts.load()?;
    // Fail fast on an unsafe admin address, before plugins or Redis.
    let admin = admin_endpoint(&settings, &config_name(opts))?;
    let clock: SharedClock = Arc::new(SystemClock::default());
    // A plugin file that cannot load is refused (logged, shown in `/readyz`);
    // every provider whose plugin loaded serves.
    let plugins = Arc::new(PluginHost::default().reload(
        std::path::Path::new(&settings.config.plugins.dir),
        CallLimits::of(&settings.config.plugins),
    )?);
    let pool = Arc::new(KeyPool::new(
        &settings.config,
        &settings.ring,
        clock.clone(),
    ));
    // Connections are lazy: a Redis that is down now is retried.
    let queue = Queue::connect(&settings.config).await?;
    let keystore = Arc::new(KeyStore::new(queue.connection(), (*pool).clone()));
    // Daily counters, cooldowns and disabled keys come back before routing.
    let restored = restore_once(&keystore, RESTORE_AT_START).await;
    let mut runtime = build_runtime(&settings, pool.clone(), plugins, &clock)?;
    runtime.global = crate::global::gate_for(&settings.config, &settings.ring, &queue);
    let upstream = upstream_client(&settings.config, &config_name(opts))?;
    let executor = Arc::new(Executor::new(runtime, upstream, clock.clone()));
    tracing::info!(
        keys = settings.ring.len(),
        routes = executor.runtime().router.routes().len(),
        consumer = queue.consumer(),
        "llmq ready"
    );
    Ok(Daemon {
        executor,
        pool,
        queue,
        settings,
        clock,
        keystore,
        restored,
        admin,
    })
}

/// One attempt to restore key state from Redis; false when Redis did not
/// answer in time.
async fn restore_once(keystore: &KeyStore, within: Duration) -> bool {
    match tokio::time::timeout(within, keystore.load()).await {
        Ok(Ok(report)) => {
            tracing::info!(
                keys = report.keys,
                cooling = report.cooling.len(),
                disabled = report.disabled.len(),
                "key state restored from redis"
            );
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "key state not restored yet (redis); jobs wait for it");
            false
        }
        Err(_) => {
            tracing::warn!("key state not restored yet (redis timed out); jobs wait for it");
            false
        }
    }
}

impl Daemon {
    /// Runs until `shutdown` resolves: restores key state if start-up could
    /// not, persists key state changes and counters while jobs run, then
    /// drains in-flight jobs and flushes the counters one last time.
    pub(crate) async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let shutdown = shutdown.boxed().shared();
        if !self.restored && !self.restore_until_ok(shutdown.clone()).await {
            return Ok(());
        }
        let (flush_tx, flush_rx) = tokio::sync::oneshot::channel::<()>();
        let keystore = self.keystore.clone().spawn(async move {
            let _ = flush_rx.await;
        });
        let handler = Arc::new(LoggedHandler(ExecutorHandler(self.executor.clone())));
        let budgets = tokio::spawn(sync_budgets(
            self.executor.clone(),
            self.queue.connection(),
            self.clock.clone(),
        ));
        let result = self.queue.run(handler, shutdown).await;
        budgets.abort();
        // Only now: the drained jobs' counters are in this last flush.
        let _ = flush_tx.send(());
        match tokio::time::timeout(FINAL_FLUSH, keystore).await {
            Ok(Ok(Ok(()))) => tracing::info!("key state and counters flushed to redis"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "final key state flush incomplete"),
            Ok(Err(e)) => tracing::warn!(error = %e, "keystore task failed"),
            Err(_) => tracing::warn!("final key counter flush timed out (redis unreachable?)"),
        }
        result
    }

    /// Retries the restore until it works (true) or `shutdown` (false).
    async fn restore_until_ok(&self, shutdown: impl Future<Output = ()>) -> bool {
        tokio::pin!(shutdown);
        let mut pause = Duration::from_millis(250);
        loop {
            tokio::select! {
                _ = &mut shutdown => return false,
                _ = tokio::time::sleep(pause) => {}
            }
            if restore_once(&self.keystore, RESTORE_AT_START).await {
                let rt = self.executor.runtime();
                let now = self.clock.unix_ms();
                for (provider, _, _) in rt.budgets.snapshot(now) {
                    rt.budgets
                        .load_spent(&provider, self.pool.spend_today(&provider), now);
                }
                return true;
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

/// The executor's handler plus one log line per finished job: its id,
/// lane, attempt, status and the route and key id that served it (never
/// the key itself).
struct LoggedHandler(ExecutorHandler);

impl JobHandler for LoggedHandler {
    fn run(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, Disposition> {
        let id = job.id.clone();
        let lane = ctx.lane.clone();
        let attempt = ctx.attempt;
        let run = self.0.run(job, ctx);
        Box::pin(async move {
            let disposition = run.await;
            log_disposition(&id, &lane, attempt, &disposition);
            disposition
        })
    }
}

fn log_disposition(id: &str, lane: &str, attempt: u32, d: &Disposition) {
    match d {
        Disposition::Done(r) => {
            let error = r.error.as_ref().map(|e| e.kind.as_str());
            // At thousands of jobs a second, one info line per success would
            // be most of the daemon's work: successes log at debug, failures
            // at info.
            macro_rules! finished {
                ($level:expr) => {
                    tracing::event!(
                        $level,
                        job = %id,
                        lane,
                        attempt,
                        status = r.status.as_str(),
                        provider = r.provider.as_deref(),
                        model = r.model.as_deref(),
                        key = r.key.as_deref(),
                        attempts = r.attempts.len(),
                        models = r.responses.as_ref().map(Vec::len),
                        error,
                        queued_ms = r.queued_ms,
                        duration_ms = r.duration_ms,
                        "job finished"
                    )
                };
            }
            match r.status {
                crate::job::Status::Succeeded => finished!(tracing::Level::DEBUG),
                crate::job::Status::Failed => finished!(tracing::Level::INFO),
            }
        }
        Disposition::Retry {
            reason, attempts, ..
        } => tracing::info!(
            job = %id,
            lane,
            attempt,
            attempts = attempts.len(),
            reason = %reason,
            "job will be retried"
        ),
        Disposition::DeadLetter { reason, .. } => tracing::warn!(
            job = %id,
            lane,
            attempt,
            reason = %reason,
            "job dead-lettered"
        ),
    }
}

/// `llmq serve`: start, notify systemd, handle signals, drain on stop.
pub(crate) async fn serve(opts: Options) -> Result<()> {
    let daemon = start(&opts).await?;
    // Membership heartbeat and cross-daemon key states (cluster.rs).
    let node = crate::cluster::Node::start(
        daemon.queue.connection(),
        daemon.queue.consumer(),
        &daemon.settings.config,
        daemon.executor.runtime().global.clone(),
        (*daemon.pool).clone(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = spawn_admin(&daemon, stop_rx.clone()).await?;

    let executor = daemon.executor.clone();
    let pool = daemon.pool.clone();
    let reload_opts = opts.clone();
    let reloader = ReloadHandle {
        executor,
        pool,
        clock: daemon.clock.clone(),
    };
    tokio::spawn(signal_loop(stop_tx, reloader, reload_opts));
    notify_ready();
    let watchdog = spawn_watchdog();

    let mut stop = stop_rx.clone();
    let shutdown = async move {
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
        tracing::info!("stopping: no new jobs; draining in-flight jobs");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    };
    let result = daemon.run(shutdown).await;
    node.stop().await;
    if let Some(w) = watchdog {
        w.abort();
    }
    if let Some(a) = admin {
        a.abort();
    }
    result
}

/// What SIGHUP needs.
struct ReloadHandle {
    executor: Arc<Executor>,
    pool: Arc<KeyPool>,
    clock: SharedClock,
}

impl ReloadHandle {
    /// All or nothing: the new config, keys, plugins, routes and budgets are
    /// built and checked (as `serve` checks them at start) before anything
    /// changes; only then are the pool, the cluster gate and the runtime
    /// switched over. A reload that fails changes nothing.
    fn reload(&self, opts: &Options) -> Result<()> {
        let settings = opts.load()?;
        let file = config_name(opts);
        // What start-up refuses, a reload refuses too (these settings
        // themselves take effect at the next restart).
        admin_endpoint(&settings, &file)?;
        upstream_client(&settings.config, &file)?;
        let old = self.executor.runtime();
        if settings.config.upstream != old.config.upstream
            || settings.config.admin != old.config.admin
        {
            tracing::warn!("[upstream] and [admin] changes take effect at the next restart");
        }
        // Plugins are never unloaded: files seen before are reused, new
        // ones loaded.
        let host = old.plugins.reload(
            std::path::Path::new(&settings.config.plugins.dir),
            CallLimits::of(&settings.config.plugins),
        )?;
        let mut runtime = plan_runtime(&settings, self.pool.clone(), Arc::new(host));
        // Nothing below can fail.
        self.pool.reload(&settings.config, &settings.ring);
        load_spend(&runtime, &self.clock);
        runtime.global = old.global.clone();
        if let Some(gate) = &runtime.global {
            gate.configure(&settings.config, &settings.ring);
        }
        self.executor.replace_runtime(runtime);
        tracing::info!(
            keys = settings.ring.len(),
            "reloaded config and keys (SIGHUP)"
        );
        Ok(())
    }
}

async fn signal_loop(stop: tokio::sync::watch::Sender<bool>, reload: ReloadHandle, opts: Options) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { let _ = stop.send(true); return; }
            _ = int.recv() => { let _ = stop.send(true); return; }
            _ = hup.recv() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                if let Err(e) = reload.reload(&opts) {
                    tracing::error!(error = %e, "reload failed; keeping the running config");
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "sd_notify READY failed (not under systemd?)");
    }
}

fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }))
}

/// Where the admin API listens and the token it requires.
#[derive(Clone)]
struct AdminEndpoint {
    addr: std::net::SocketAddr,
    token: Option<secrecy::SecretString>,
}

/// The config file's name for error messages.
fn config_name(opts: &Options) -> String {
    opts.config
        .as_ref()
        .map_or_else(|| "config".to_string(), |p| p.display().to_string())
}

/// Validates `[admin]` before anything starts: `None` when the API is off;
/// an error naming `admin.listen` for a bad address, or for a non-loopback
/// address without a token.
fn admin_endpoint(settings: &Settings, file: &str) -> Result<Option<AdminEndpoint>> {
    let cfg = &settings.config.admin;
    let listen = cfg.listen.trim();
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        Error::config(
            file,
            "admin.listen",
            format!("host:port, e.g. 127.0.0.1:9090 (got {listen:?})"),
        )
    })?;
    let token = settings
        .env
        .secret(&cfg.token_env)
        .cloned()
        .filter(|t| !secrecy::ExposeSecret::expose_secret(t).trim().is_empty());
    crate::admin::check_listen(&addr, token.as_ref()).map_err(|e| {
        let message = match e {
            crate::admin::AdminError::NotFound(m)
            | crate::admin::AdminError::BadRequest(m)
            | crate::admin::AdminError::Unavailable(m)
            | crate::admin::AdminError::Internal(m) => m,
        };
        Error::config(file, "admin.listen", message)
    })?;
    Ok(Some(AdminEndpoint { addr, token }))
}

/// Starts the admin API when `admin.listen` is set.
async fn spawn_admin(
    daemon: &Daemon,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    // More descriptors for jobs and admin alike; the admin API takes at
    // most a quarter of them (admin/server.rs).
    let nofile = crate::admin::raise_nofile_limit();
    let Some(AdminEndpoint { addr, token }) = daemon.admin.clone() else {
        return Ok(None);
    };
    let limits = crate::admin::ServerLimits::from_config(&daemon.settings.config.admin, nofile);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        auth = token.is_some(),
        max_connections = limits.max_connections,
        fd_limit = %nofile.map_or_else(|| "unlimited".to_string(), |n| n.to_string()),
        "admin API listening"
    );
    let metrics = crate::metrics::install().ok();
    let clock = daemon.clock.clone();
    let control = crate::control::Control {
        executor: daemon.executor.clone(),
        keystore: daemon.keystore.clone(),
        redis: daemon.queue.connection(),
        lanes: daemon.settings.config.queue.lanes.clone(),
        unix_ms: Arc::new(move || clock.unix_ms()),
        probe: crate::control::RedisProbe::start(daemon.queue.connection()).await,
    };
    let router = crate::admin::router(Arc::new(control), token, metrics);
    let mut stop = stop;
    Ok(Some(tokio::spawn(async move {
        let shutdown = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = crate::admin::serve_with(listener, router, limits, shutdown).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    })))
}

/// Every second, adopts the day's spend of every daemon sharing this Redis
/// (the keystore flushes each daemon's spend there), so a budget cap holds
/// across daemons, not just within one.
async fn sync_budgets(
    executor: Arc<Executor>,
    mut conn: redis::aio::ConnectionManager,
    clock: SharedClock,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let rt = executor.runtime();
        if rt.budgets.capped().next().is_none() {
            continue;
        }
        let now = clock.unix_ms();
        // Each provider's spend of its own day (`daily_reset`).
        let capped: Vec<String> = rt.budgets.capped().map(String::from).collect();
        let mut pipe = redis::pipe();
        for provider in &capped {
            let day = rt
                .config
                .providers
                .get(provider)
                .map_or_else(Default::default, |p| p.daily_reset.clone())
                .day_of(now)
                .max(0) as u64;
            pipe.cmd("HGET")
                .arg(crate::keystore::spend_key(day))
                .arg(provider);
        }
        let spent: Vec<Option<f64>> = match pipe.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "budget sync skipped");
                continue;
            }
        };
        for (provider, usd) in capped.iter().zip(spent) {
            if let Some(usd) = usd {
                rt.budgets.sync_spent(provider, usd, now);
            }
        }
    }
}
